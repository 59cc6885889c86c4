//! Live identities for the mesh examples, from `[identity]`: either PEM files watched for
//! changes (a rotated Kubernetes secret mount is used by new handshakes without a restart),
//! or the Istio CA (feature `istio-ca`): a certificate obtained with a CSR over gRPC
//! `CreateCertificate` and renewed at half of its lifetime, as ztunnel does.
//!
//! ```toml
//! [identity]                     # files …
//! cert = "node.pem"
//! key = "node.key"
//! roots = "root.pem"
//!
//! [identity]                     # … or the Istio CA
//! ca = "istiod.istio-system.svc:15012"
//! roots = "/var/run/secrets/istio/root-cert.pem"
//! spiffe_id = "spiffe://cluster.local/ns/default/sa/reviews"
//! token = "/var/run/secrets/tokens/istio-token"   # optional
//! ca_server_name = "istiod.istio-system.svc"      # optional, for a CA reached by IP
//! ```
//!
//! Not here: SDS, CA client certificates (renewing with the current certificate instead of a
//! token), several identities per process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proxystack::identity::SpiffeId;
use proxystack::tls::{FileWatch, LiveIdentity};

use super::fail;

/// How often the identity files are read (Kubernetes updates secret mounts within a
/// minute; a few seconds keeps the lag small at the cost of reading a few KiB).
const POLL: Duration = Duration::from_secs(2);

/// How long a proxy configured with `ca` waits for its first certificate before it exits:
/// without one it cannot serve a single mesh connection, and a restart (with the
/// orchestrator's back-off) says so more visibly than a proxy that listens and refuses.
const FIRST_CERTIFICATE: Duration = Duration::from_secs(30);

/// Bound on one CA request: istiod answers in milliseconds; a silent one is retried by the
/// renewer with back-off instead of holding it for the client's default 30 s.
const CA_REQUEST: Duration = Duration::from_secs(10);

/// `[identity]` in the mesh examples' configs: this proxy's SPIFFE identity and the mesh
/// trust roots. Exactly one source: `cert` + `key` (PEM files, watched) or `ca` +
/// `spiffe_id` (the Istio CA, feature `istio-ca`); `roots` always. [`source`](Self::source)
/// checks the combination.
#[derive(serde::Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct IdentityFiles {
    /// Certificate chain (end entity first) with a `spiffe://` URI SAN.
    pub cert: Option<PathBuf>,
    /// Private key of `cert`.
    pub key: Option<PathBuf>,
    /// Trust roots (PEM). With `ca`, they also verify the CA's own certificate; read at
    /// every CA request, so a rotated root is used from the next renewal on.
    pub roots: PathBuf,
    /// The Istio CA's `host:port` (istiod serves it on 15012).
    pub ca: Option<String>,
    /// With `ca`: the SPIFFE ID to ask for.
    pub spiffe_id: Option<String>,
    /// With `ca`: a file holding the bearer token (a projected service-account token),
    /// read anew for every request.
    pub token: Option<PathBuf>,
    /// With `ca`: the name the CA's certificate carries, when the address is an IP.
    pub ca_server_name: Option<String>,
}

/// Where the identity comes from, after [`IdentityFiles::source`] checked the combination.
#[derive(Debug)]
#[non_exhaustive]
pub enum IdentitySource<'a> {
    /// `cert` + `key` files.
    Files {
        /// The certificate chain file.
        cert: &'a Path,
        /// The key file.
        key: &'a Path,
    },
    /// The Istio CA.
    Ca {
        /// `host:port` of the CA.
        addr: &'a str,
        /// The identity to ask for.
        spiffe_id: SpiffeId,
    },
}

/// Keeps an identity from [`IdentityFiles::live`] current for as long as it lives: the file
/// watch, or the CA renewal task and what feeds its certificates to the [`LiveIdentity`].
#[must_use = "the identity stops being renewed when the guard is dropped"]
pub struct IdentityGuard {
    _inner: Guard,
}

enum Guard {
    Files(#[allow(dead_code)] FileWatch),
    #[cfg(feature = "istio-ca")]
    Ca {
        // Dropped in this order: no more identities applied, then the task stopped.
        _following: proxystack::istio_ca::Following,
        _renewer: proxystack::istio_ca::Renewer,
    },
}

impl std::fmt::Debug for IdentityGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self._inner {
            Guard::Files(_) => "files",
            #[cfg(feature = "istio-ca")]
            Guard::Ca { .. } => "ca",
        };
        f.debug_struct("IdentityGuard")
            .field("source", &kind)
            .finish()
    }
}

impl IdentityFiles {
    /// The identity's source, or the problem with the combination of keys: exactly one of
    /// `cert` + `key` or `ca` + `spiffe_id`; `token` and `ca_server_name` only with `ca`.
    pub fn source(&self) -> Result<IdentitySource<'_>, String> {
        let files = self.cert.is_some() || self.key.is_some();
        let ca = self.ca.is_some() || self.spiffe_id.is_some();
        if files && ca {
            return Err("[identity]: give either cert + key or ca + spiffe_id, not both".into());
        }
        if files {
            if self.token.is_some() || self.ca_server_name.is_some() {
                return Err(
                    "[identity]: token and ca_server_name go with ca, not with cert + key".into(),
                );
            }
            return match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => Ok(IdentitySource::Files { cert, key }),
                (Some(_), None) => Err("[identity]: cert without key".into()),
                _ => Err("[identity]: key without cert".into()),
            };
        }
        if !ca {
            return Err("[identity]: give cert + key (files) or ca + spiffe_id (Istio CA)".into());
        }
        match (&self.ca, &self.spiffe_id) {
            (Some(addr), Some(id)) => {
                let spiffe_id =
                    SpiffeId::parse(id).map_err(|e| format!("[identity] spiffe_id {id:?}: {e}"))?;
                Ok(IdentitySource::Ca { addr, spiffe_id })
            }
            (Some(_), None) => {
                Err("[identity]: ca without spiffe_id (the identity to ask for)".into())
            }
            _ => Err("[identity]: spiffe_id without ca".into()),
        }
    }

    /// Obtains the identity as a [`LiveIdentity`] that expects its SPIFFE ID (a certificate
    /// for someone else is refused and logged), kept current until the returned guard is
    /// dropped: files are watched; the CA's certificate is renewed at half of its lifetime.
    /// Exits naming the problem when the configuration is wrong or no first certificate
    /// can be had (files unreadable; the CA silent or refusing for
    /// [`FIRST_CERTIFICATE`]).
    pub async fn live(&self) -> (LiveIdentity, IdentityGuard) {
        match self.source().unwrap_or_else(|e| fail(e)) {
            IdentitySource::Files { cert, key } => {
                let (identity, watch) = self.live_files(cert, key);
                let _inner = Guard::Files(watch);
                (identity, IdentityGuard { _inner })
            }
            IdentitySource::Ca { addr, spiffe_id } => self.live_ca(addr, spiffe_id).await,
        }
    }

    fn live_files(&self, cert: &Path, key: &Path) -> (LiveIdentity, FileWatch) {
        let files = proxystack::tls::IdentityFiles::new(cert, key, &self.roots).poll_interval(POLL);
        let credentials = files.load().unwrap_or_else(|e| fail(e));
        let Some(id) = credentials.cert.spiffe_ids().into_iter().next() else {
            fail(format!("{} has no spiffe:// URI SAN", cert.display()));
        };
        let identity = LiveIdentity::builder()
            .expect_identity(id)
            .build(credentials)
            .unwrap_or_else(|e| fail(format!("[identity]: {e}")));
        let watch = files.watch(&identity);
        (identity, watch)
    }

    #[cfg(not(feature = "istio-ca"))]
    async fn live_ca(&self, addr: &str, _: SpiffeId) -> (LiveIdentity, IdentityGuard) {
        fail(format!(
            "[identity] ca = {addr:?}: this binary was built without feature istio-ca \
             (rebuild with --features istio-ca, or use cert + key files)"
        ))
    }

    #[cfg(feature = "istio-ca")]
    async fn live_ca(&self, addr: &str, spiffe_id: SpiffeId) -> (LiveIdentity, IdentityGuard) {
        use proxystack::istio_ca::{CaClient, Renewer};

        // Read once now so that a missing or empty file is named at start; the client
        // re-reads it at every request (root rotation).
        let roots = std::fs::read(&self.roots)
            .unwrap_or_else(|e| fail(format!("[identity] roots {}: {e}", self.roots.display())));
        let mut builder = CaClient::builder(addr, roots, spiffe_id.clone())
            .root_file(&self.roots)
            .timeout(Some(CA_REQUEST));
        if let Some(token) = &self.token {
            builder = builder.token_file(token);
        }
        if let Some(name) = &self.ca_server_name {
            builder = builder.server_name(name);
        }
        let client = builder
            .build()
            .unwrap_or_else(|e| fail(format!("[identity] ca = {addr:?}: {e}")));
        let renewer = Renewer::builder(client.clone()).spawn();
        let mut issued = renewer.subscribe();
        let first = tokio::time::timeout(FIRST_CERTIFICATE, issued.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|first| first.clone()));
        let Some(first) = first else {
            drop(renewer);
            // The renewer logs each failure; one more request names the reason here, in
            // the message the proxy exits with.
            let reason = match client.fetch().await {
                Err(e) => with_sources(&e),
                Ok(_) => "it answered only now".to_owned(),
            };
            fail(format!(
                "[identity] ca = {addr:?}: no certificate for {spiffe_id} within \
                 {FIRST_CERTIFICATE:?}: {reason}"
            ));
        };
        tracing::info!(ca = addr, identity = %spiffe_id, not_after = ?first.not_after,
            "certificate from the Istio CA");
        let identity = LiveIdentity::builder()
            .expect_identity(spiffe_id)
            .build(first.credentials())
            .unwrap_or_else(|e| fail(format!("[identity] ca = {addr:?}: {e}")));
        let following = renewer.publish_to(&identity);
        let _inner = Guard::Ca {
            _following: following,
            _renewer: renewer,
        };
        (identity, IdentityGuard { _inner })
    }
}

/// `e` and its sources, `: `-separated (the CA error says "cannot connect", its source
/// says why).
#[cfg(feature = "istio-ca")]
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    // Bounded: error chains are short, but nothing stops a cyclic one.
    let mut source = e.source();
    for _ in 0..8 {
        let Some(s) = source else { break };
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Registers, in `metrics`, when the certificate in use expires and how many identity
/// changes were applied (both read at scrape time).
pub fn identity_metrics(metrics: &mut super::Metrics, identity: &LiveIdentity) {
    let live = identity.clone();
    metrics.gauge_fn(
        "proxystack_identity_cert_expiry_timestamp_seconds",
        "notAfter of the certificate in use, seconds since the epoch.",
        move || {
            let not_after = live.current().not_after();
            not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        },
    );
    let live = identity.clone();
    metrics.counter_fn(
        "proxystack_identity_changes",
        "Certificate or root changes applied since start.",
        move || live.generation().saturating_sub(1),
    );
}
