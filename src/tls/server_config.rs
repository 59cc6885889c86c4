//! Building a rustls `ServerConfig` for the terminate layer: certificates by SNI, ALPN,
//! versions, client certificates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

use super::live::{IdentitySnapshot, LiveIdentity};
use super::verify::TrustDomainClientVerifier;
use super::{CertKey, TlsConfigError};

/// What to do when the client asks for a server name we have no certificate for, or names
/// none at all (no SNI; an IP address in SNI, which rustls ignores, counts as none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownSni {
    /// Serve the default certificate (clients that check names will refuse it). A client
    /// that ignores the certificate can then name any `Host`: an HTTP layer behind should
    /// check `Host` against the names of the certificate served (as the gateway example
    /// does, answering `421`).
    #[default]
    UseDefault,
    /// Abort the handshake: rustls sends an `access_denied` alert and the inner service
    /// never runs. A hello *without* SNI is refused too: it names no server we know, and
    /// would otherwise get the default certificate and then ask for any `Host`. Every
    /// refusal is a `debug` event (`tls.sni`, empty for a missing name).
    Refuse,
}

/// Client certificate policy.
#[derive(Debug, Clone, Default)]
pub enum ClientAuth {
    /// Do not ask for a client certificate.
    #[default]
    None,
    /// Ask; accept clients without one, verify those that send one.
    Optional(Arc<RootCertStore>),
    /// Require a certificate that chains to these roots.
    Required(Arc<RootCertStore>),
}

/// Builds the `ServerConfig` for [`TerminateLayer`](super::TerminateLayer).
///
/// ```
/// # #[cfg(feature = "demo-certs")] {
/// use proxystack::tls::{demo::DemoCa, ServerConfigBuilder, UnknownSni};
/// let ca = DemoCa::new("example.org");
/// let config = ServerConfigBuilder::new()
///     .cert_for("a.example.com", ca.server_cert(&["a.example.com"]))
///     .default_cert(ca.server_cert(&["default.example.com"]))
///     .unknown_sni(UnknownSni::Refuse)
///     .alpn(["h2", "http/1.1"])
///     .build()
///     .unwrap();
/// # let _ = config; }
/// ```
#[derive(Debug, Clone)]
pub struct ServerConfigBuilder {
    provider: Arc<CryptoProvider>,
    default_cert: Option<CertKey>,
    by_name: Vec<(String, CertKey)>,
    unknown_sni: UnknownSni,
    alpn: Vec<Vec<u8>>,
    tls12: bool,
    client_auth: ClientAuth,
    trust_domains: Vec<String>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Default for ServerConfigBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerConfigBuilder {
    /// TLS 1.2 and 1.3, no ALPN, no client certificates, unknown SNI → default cert.
    pub fn new() -> Self {
        Self {
            provider: super::default_provider(),
            default_cert: None,
            by_name: Vec::new(),
            unknown_sni: UnknownSni::default(),
            alpn: Vec::new(),
            tls12: true,
            client_auth: ClientAuth::None,
            trust_domains: Vec::new(),
            crls: Vec::new(),
        }
    }

    /// With [`UnknownSni::UseDefault`], the certificate for clients without SNI or with an
    /// SNI we have no certificate for (with [`UnknownSni::Refuse`] those are refused).
    pub fn default_cert(mut self, cert: CertKey) -> Self {
        self.default_cert = Some(cert);
        self
    }

    /// The certificate for one server name; `*.example.com` matches one label.
    pub fn cert_for(mut self, name: &str, cert: CertKey) -> Self {
        self.by_name.push((name.to_ascii_lowercase(), cert));
        self
    }

    /// Policy for unknown server names.
    pub fn unknown_sni(mut self, policy: UnknownSni) -> Self {
        self.unknown_sni = policy;
        self
    }

    /// Application protocols in order of preference, e.g. `["h2", "http/1.1"]`.
    pub fn alpn<P: AsRef<[u8]>>(mut self, protocols: impl IntoIterator<Item = P>) -> Self {
        self.alpn = protocols.into_iter().map(|p| p.as_ref().to_vec()).collect();
        self
    }

    /// Accept only TLS 1.3 (as Istio HBONE does).
    pub fn tls13_only(mut self) -> Self {
        self.tls12 = false;
        self
    }

    /// Client certificate policy.
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.client_auth = auth;
        self
    }

    /// Certificate revocation lists (DER) for client certificates: a revoked client is
    /// refused with a `certificate_revoked` alert. Every certificate of a client's chain
    /// must be covered by a list from its issuer (webpki's default: an unknown status is a
    /// refusal). The lists are read when the config is built; to change them while serving,
    /// and to close open connections they newly revoke, give them to a
    /// [`LiveIdentity`] and use [`build_live`](Self::build_live).
    pub fn crls(
        mut self,
        crls: impl IntoIterator<Item = CertificateRevocationListDer<'static>>,
    ) -> Self {
        self.crls = crls.into_iter().collect();
        self
    }

    /// Client certificates must carry exactly one SPIFFE ID, in one of these trust domains.
    pub fn trust_domains<S: Into<String>>(mut self, domains: impl IntoIterator<Item = S>) -> Self {
        self.trust_domains = domains.into_iter().map(Into::into).collect();
        self
    }

    /// The crypto provider (default: ring with all its suites).
    pub fn provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = provider;
        self
    }

    /// Builds the configuration.
    pub fn build(self) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let (config, _) =
            self.assemble(self.default_cert.clone(), &self.client_auth, &self.crls)?;
        Ok(config)
    }

    /// Builds a configuration that follows `identity`: its certificate is the default
    /// certificate (certificates for names given with [`cert_for`](Self::cert_for) stay as
    /// they are), and with client authentication on, its roots replace the roots given in
    /// [`ClientAuth`] and its revocation lists add to [`crls`](Self::crls). A new
    /// `ServerConfig` is made on the first handshake after each change, so new handshakes
    /// use the new material at once and open connections keep theirs.
    ///
    /// ```
    /// # #[cfg(feature = "demo-certs")] {
    /// use proxystack::tls::{demo::DemoCa, Credentials, LiveIdentity, ServerConfigBuilder, TerminateLayer};
    /// let ca = DemoCa::new("example.org");
    /// let identity = LiveIdentity::new(Credentials::new(ca.server_cert(&["localhost"]), [ca.root()])).unwrap();
    /// let layer = TerminateLayer::live(ServerConfigBuilder::new().build_live(&identity).unwrap());
    /// identity.set_cert(ca.server_cert(&["localhost"])).unwrap(); // the next handshake serves it
    /// # let _ = layer; }
    /// ```
    pub fn build_live(self, identity: &LiveIdentity) -> Result<LiveServerConfig, TlsConfigError> {
        let snapshot = identity.current();
        let built = self.assemble_for(&snapshot)?;
        Ok(LiveServerConfig {
            inner: Arc::new(LiveInner {
                template: self,
                identity: identity.clone(),
                built: Mutex::new(built),
            }),
        })
    }

    fn assemble_for(&self, snapshot: &IdentitySnapshot) -> Result<Built, TlsConfigError> {
        let client_auth = match &self.client_auth {
            ClientAuth::None => ClientAuth::None,
            ClientAuth::Optional(_) => ClientAuth::Optional(snapshot.roots().clone()),
            ClientAuth::Required(_) => ClientAuth::Required(snapshot.roots().clone()),
        };
        let mut crls = self.crls.clone();
        crls.extend(snapshot.crls().iter().cloned());
        let (config, verifier) =
            self.assemble(Some(snapshot.cert().clone()), &client_auth, &crls)?;
        Ok(Built {
            generation: snapshot.generation(),
            config,
            verifier,
        })
    }

    /// The config and the client verifier it uses (kept to re-check open connections).
    fn assemble(
        &self,
        default_cert: Option<CertKey>,
        client_auth: &ClientAuth,
        crls: &[CertificateRevocationListDer<'static>],
    ) -> Result<(Arc<ServerConfig>, Option<Verifier>), TlsConfigError> {
        let certified = |c: CertKey| -> Result<Arc<CertifiedKey>, TlsConfigError> {
            Ok(Arc::new(CertifiedKey::from_der(
                c.chain,
                c.key,
                &self.provider,
            )?))
        };
        let mut by_name = HashMap::new();
        for (name, cert) in self.by_name.clone() {
            by_name.insert(name, certified(cert)?);
        }
        let default = default_cert.map(certified).transpose()?;
        let resolver = SniResolver {
            by_name,
            default,
            unknown: self.unknown_sni,
        };

        let versions: &[&rustls::SupportedProtocolVersion] = if self.tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(versions)?;
        let verifier = match client_auth {
            ClientAuth::None => None,
            ClientAuth::Optional(roots) => Some(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
                    .with_crls(crls.to_vec())
                    .allow_unauthenticated()
                    .build()?,
            ),
            ClientAuth::Required(roots) => Some(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
                    .with_crls(crls.to_vec())
                    .build()?,
            ),
        };
        let verifier: Option<Verifier> = match verifier {
            Some(v) if !self.trust_domains.is_empty() => Some(Arc::new(
                TrustDomainClientVerifier::new(v, self.trust_domains.clone()),
            )),
            other => other,
        };
        let builder = match &verifier {
            None => builder.with_no_client_auth(),
            Some(v) => builder.with_client_cert_verifier(v.clone()),
        };
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = self.alpn.clone();
        // No tickets or session cache: every connection authenticates afresh, as ztunnel does.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok((Arc::new(config), verifier))
    }
}

/// A server configuration that follows a [`LiveIdentity`]; made by
/// [`ServerConfigBuilder::build_live`], used by
/// [`TerminateLayer::live`](super::TerminateLayer::live). Cheap to clone.
#[derive(Clone)]
pub struct LiveServerConfig {
    inner: Arc<LiveInner>,
}

struct LiveInner {
    template: ServerConfigBuilder,
    identity: LiveIdentity,
    built: Mutex<Built>,
}

/// The client-certificate verifier a config uses.
type Verifier = Arc<dyn ClientCertVerifier>;

struct Built {
    generation: u64,
    config: Arc<ServerConfig>,
    verifier: Option<Verifier>,
}

impl std::fmt::Debug for LiveServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveServerConfig")
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

impl LiveServerConfig {
    /// The identity it follows.
    pub fn identity(&self) -> &LiveIdentity {
        &self.inner.identity
    }

    /// The config for the current generation (made now if the identity changed since).
    pub fn current(&self) -> Arc<ServerConfig> {
        self.refreshed(|b| b.config.clone())
    }

    /// Verifies a client chain accepted earlier (at `verified_at`) against the current
    /// roots and revocation lists (and trust domains); an error means the connection must
    /// end.
    pub(crate) fn recheck_client(
        &self,
        chain: &[CertificateDer<'static>],
        verified_at: UnixTime,
    ) -> Result<(), rustls::Error> {
        let Some(verifier) = self.refreshed(|b| b.verifier.clone()) else {
            return Ok(());
        };
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Ok(());
        };
        verifier
            .verify_client_cert(end_entity, intermediates, verified_at)
            .map(|_| ())
    }

    fn refreshed<T>(&self, f: impl FnOnce(&Built) -> T) -> T {
        let mut built = self.inner.built.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = self.inner.identity.current();
        if built.generation != snapshot.generation() {
            match self.inner.template.assemble_for(&snapshot) {
                Ok(new) => *built = new,
                Err(e) => {
                    // The identity validated this material, so this is unexpected; the
                    // config in use stays (fail towards the last known-good material).
                    tracing::warn!(
                        error = %e,
                        tls.identity.generation = snapshot.generation(),
                        "cannot build a TLS server config for the new identity; keeping the previous one"
                    );
                    built.generation = snapshot.generation();
                }
            }
        }
        f(&built)
    }
}

#[derive(Debug)]
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    unknown: UnknownSni,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return match self.unknown {
                UnknownSni::UseDefault => self.default.clone(),
                UnknownSni::Refuse => {
                    // No name is an unknown name: the default certificate would let the
                    // client ask for any Host behind it.
                    tracing::debug!(tls.sni = "", "no server name in the ClientHello; refusing");
                    None
                }
            };
        };
        let name = name.to_ascii_lowercase();
        let wildcard = name.split_once('.').map(|(_, rest)| format!("*.{rest}"));
        let found = self
            .by_name
            .get(&name)
            .or_else(|| wildcard.and_then(|w| self.by_name.get(&w)));
        match (found, self.unknown) {
            (Some(cert), _) => Some(cert.clone()),
            (None, UnknownSni::UseDefault) => self.default.clone(),
            (None, UnknownSni::Refuse) => {
                tracing::debug!(tls.sni = %name, "no certificate for server name; refusing");
                None
            }
        }
    }
}
