//! Identity material that changes while the proxy runs: the certificate chain and key a
//! proxy presents, the roots it trusts and the revocation lists it applies.
//!
//! A [`LiveIdentity`] holds the current [`IdentitySnapshot`] and a generation counter that
//! grows by one on every accepted change; every change is validated first (see
//! [`LiveIdentity::set`]) and a refused one leaves the current material in use. Two sources
//! feed it:
//!
//! * code: [`LiveIdentity::set`] (or [`set_cert`](LiveIdentity::set_cert),
//!   [`set_roots`](LiveIdentity::set_roots), [`set_crls`](LiveIdentity::set_crls)), e.g.
//!   from a CA client that renews the workload certificate;
//! * files: [`IdentityFiles`] polls PEM files and applies a change once all of them read
//!   the same twice in a row (an atomic replace or a Kubernetes `..data` symlink swap).
//!
//! Consumers: [`ServerConfigBuilder::build_live`](super::ServerConfigBuilder::build_live)
//! for [`TerminateLayer::live`](super::TerminateLayer::live) and `hbone::Inbound::live`,
//! and [`TlsConnector::live`](super::TlsConnector::live) for clients (and
//! `hbone::Connector::hbone_live`). A `LiveIdentity` also implements rustls's
//! [`ResolvesServerCert`] and [`ResolvesClientCert`] for hand-built rustls configs.
//!
//! Not here: asking a CA for certificates (a CA client calls [`LiveIdentity::set`]),
//! OCSP, per-SNI certificates that rotate (the identity is the default certificate; SNI
//! certificates of [`ServerConfigBuilder`](super::ServerConfigBuilder) stay static).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use tokio::sync::watch;
use tracing::{info, warn};

use super::keys::{spiffe_ids, uri_sans};
use super::CertKey;
use crate::identity::SpiffeId;

/// New identity material: a chain and key, the trust roots, the revocation lists.
///
/// ```
/// # #[cfg(feature = "demo-certs")] {
/// use proxystack::tls::{demo::DemoCa, Credentials, LiveIdentity};
/// let ca = DemoCa::new("cluster.local");
/// let creds = Credentials::new(ca.workload_cert("default", "app"), [ca.root()]);
/// let identity = LiveIdentity::new(creds).unwrap();
/// # let _ = identity; }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Credentials {
    /// The chain (end entity first) and its private key.
    pub cert: CertKey,
    /// The trust roots for peers (and for this chain's own issuer).
    pub roots: Vec<CertificateDer<'static>>,
    /// Revocation lists (DER) applied to peer (client) certificates.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Credentials {
    /// A chain and key with these roots and no revocation lists.
    pub fn new(cert: CertKey, roots: impl IntoIterator<Item = CertificateDer<'static>>) -> Self {
        Self {
            cert,
            roots: roots.into_iter().collect(),
            crls: Vec::new(),
        }
    }

    /// With these revocation lists.
    pub fn crls(
        mut self,
        crls: impl IntoIterator<Item = CertificateRevocationListDer<'static>>,
    ) -> Self {
        self.crls = crls.into_iter().collect();
        self
    }
}

/// Why new identity material was refused (the material in use stays).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The chain has no certificate.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// The end-entity certificate is not valid X.509.
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// The private key belongs to another certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// The private key cannot be used (unsupported or malformed).
    #[error("the private key cannot be used")]
    Key(#[source] rustls::Error),
    /// The certificate's `notAfter` has passed.
    #[error("the certificate expired ({not_after})")]
    Expired {
        /// The certificate's `notAfter`, as X.509 prints it.
        not_after: String,
    },
    /// The certificate's `notBefore` is still to come.
    #[error("the certificate is not valid yet ({not_before})")]
    NotYetValid {
        /// The certificate's `notBefore`, as X.509 prints it.
        not_before: String,
    },
    /// The certificate does not carry exactly the expected SPIFFE ID.
    #[error("the certificate must carry exactly {expected}; its URI SANs: [{}]", presented.join(", "))]
    WrongIdentity {
        /// The identity the source was built to expect.
        expected: SpiffeId,
        /// The URI SANs the certificate carries.
        presented: Vec<String>,
    },
    /// No trust root was given.
    #[error("no trust root")]
    NoRoots,
    /// A trust root is not a usable CA certificate.
    #[error("invalid trust root")]
    Root(#[source] rustls::Error),
    /// The roots and revocation lists do not make a verifier (e.g. an unparsable CRL).
    #[error("invalid roots or revocation lists")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_FILE_LEN`].
    #[error("{} is larger than {MAX_FILE_LEN} bytes", path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A file holds no valid PEM of the expected kind.
    #[error("{}: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The identity material in use, with its generation (1 for the first, +1 per change).
#[derive(Debug)]
pub struct IdentitySnapshot {
    generation: u64,
    cert: CertKey,
    certified: Arc<CertifiedKey>,
    spiffe_id: Option<SpiffeId>,
    not_after: SystemTime,
    roots: Arc<RootCertStore>,
    /// The roots as given: `RootCertStore` keeps trust anchors only, and a change that
    /// keeps the roots (`set_cert`) validates them again from DER.
    roots_der: Arc<[CertificateDer<'static>]>,
    crls: Arc<[CertificateRevocationListDer<'static>]>,
}

impl IdentitySnapshot {
    /// 1 for the first material, one more for every accepted change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The chain and key.
    pub fn cert(&self) -> &CertKey {
        &self.cert
    }

    /// The chain and key as rustls uses them.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    /// The SPIFFE ID of the end-entity certificate, when it carries exactly one.
    pub fn spiffe_id(&self) -> Option<&SpiffeId> {
        self.spiffe_id.as_ref()
    }

    /// When the end-entity certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The trust roots.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The revocation lists.
    pub fn crls(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.crls
    }
}

/// Changeable identity material: the certificate chain and key a proxy presents, the roots
/// it trusts and the revocation lists it applies; cheap to clone (clones share it).
///
/// It holds the current [`IdentitySnapshot`] and a generation that grows by one on every
/// accepted change; every change is validated first (see [`set`](Self::set)) and a refused
/// one leaves the material in use. Sources: code ([`set`](Self::set),
/// [`set_cert`](Self::set_cert), [`set_roots`](Self::set_roots),
/// [`set_crls`](Self::set_crls), e.g. from a CA client) and files ([`IdentityFiles`]).
/// Consumers: [`ServerConfigBuilder::build_live`](super::ServerConfigBuilder::build_live)
/// for [`TerminateLayer::live`](super::TerminateLayer::live) and `hbone::Inbound::live`,
/// [`TlsConnector::live`](super::TlsConnector::live) and `hbone::Connector::hbone_live`.
/// New handshakes use the new material at once, open connections keep theirs, pooled
/// connections made with an older client certificate drain, and a server closes open
/// connections whose client certificate new roots or revocation lists no longer accept.
/// It also implements rustls's [`ResolvesServerCert`] and [`ResolvesClientCert`] for
/// hand-built rustls configs.
///
/// ```
/// # #[cfg(feature = "demo-certs")] {
/// use proxystack::tls::{demo::DemoCa, Credentials, LiveIdentity};
/// let ca = DemoCa::new("cluster.local");
/// let identity = LiveIdentity::builder()
///     .expect_identity("spiffe://cluster.local/ns/default/sa/app".parse().unwrap())
///     .build(Credentials::new(ca.workload_cert("default", "app"), [ca.root()]))
///     .unwrap();
/// // A renewed certificate: new handshakes present it at once.
/// assert_eq!(identity.set_cert(ca.workload_cert("default", "app")).unwrap(), 2);
/// // Someone else's is refused (a WARN event), and the renewed one stays.
/// assert!(identity.set_cert(ca.workload_cert("default", "other")).is_err());
/// assert_eq!(identity.generation(), 2);
/// # }
/// ```
#[derive(Clone)]
pub struct LiveIdentity {
    shared: Arc<Shared>,
}

struct Shared {
    tx: watch::Sender<Arc<IdentitySnapshot>>,
    /// Serializes changes: `set_cert` reads the roots in use and must not race a `set_roots`.
    write: Mutex<()>,
    expected: Option<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("LiveIdentity")
            .field("generation", &current.generation)
            .field("spiffe_id", &current.spiffe_id)
            .field("expected", &self.shared.expected)
            .finish_non_exhaustive()
    }
}

/// Builds a [`LiveIdentity`].
#[derive(Debug, Clone, Default)]
pub struct LiveIdentityBuilder {
    expected: Option<SpiffeId>,
    provider: Option<Arc<CryptoProvider>>,
}

impl LiveIdentityBuilder {
    /// Every certificate must carry exactly this SPIFFE ID (a renewed workload
    /// certificate keeps its identity; one for someone else is refused).
    pub fn expect_identity(mut self, id: SpiffeId) -> Self {
        self.expected = Some(id);
        self
    }

    /// The crypto provider that loads keys (default: ring).
    pub fn provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Validates `initial` (as [`LiveIdentity::set`] does) and makes the identity.
    pub fn build(self, initial: Credentials) -> Result<LiveIdentity, IdentityError> {
        let provider = self.provider.unwrap_or_else(super::default_provider);
        let first = validate(initial, 1, self.expected.as_ref(), &provider)?;
        Ok(LiveIdentity {
            shared: Arc::new(Shared {
                tx: watch::Sender::new(Arc::new(first)),
                write: Mutex::new(()),
                expected: self.expected,
                provider,
            }),
        })
    }
}

impl LiveIdentity {
    /// An identity from validated `initial` material, expecting no particular SPIFFE ID.
    pub fn new(initial: Credentials) -> Result<Self, IdentityError> {
        Self::builder().build(initial)
    }

    /// A builder (expected identity, crypto provider).
    pub fn builder() -> LiveIdentityBuilder {
        LiveIdentityBuilder::default()
    }

    /// The material in use now.
    pub fn current(&self) -> Arc<IdentitySnapshot> {
        self.shared.tx.borrow().clone()
    }

    /// The generation in use now (see [`IdentitySnapshot::generation`]).
    pub fn generation(&self) -> u64 {
        self.shared.tx.borrow().generation
    }

    /// A receiver that wakes on every accepted change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<IdentitySnapshot>> {
        self.shared.tx.subscribe()
    }

    /// The SPIFFE ID every certificate must carry, if one was set.
    pub fn expected_identity(&self) -> Option<&SpiffeId> {
        self.shared.expected.as_ref()
    }

    /// Replaces all material; returns the new generation. Refused, with a `WARN` event
    /// and the material in use kept, when the chain is empty or unparsable, the key does
    /// not match, the certificate is expired or not yet valid, it lacks the expected
    /// SPIFFE ID, there is no root, or a root or revocation list is unusable.
    pub fn set(&self, new: Credentials) -> Result<u64, IdentityError> {
        self.change(|_| new)
    }

    /// Replaces the chain and key, keeping roots and revocation lists (see [`set`](Self::set)).
    pub fn set_cert(&self, cert: CertKey) -> Result<u64, IdentityError> {
        self.change(|cur| Credentials {
            cert,
            roots: cur.roots_der(),
            crls: cur.crls.to_vec(),
        })
    }

    /// Replaces the trust roots (see [`set`](Self::set)).
    pub fn set_roots(
        &self,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<u64, IdentityError> {
        let roots = roots.into_iter().collect();
        self.change(|cur| Credentials {
            cert: cur.cert.clone(),
            roots,
            crls: cur.crls.to_vec(),
        })
    }

    /// Replaces the revocation lists; open connections whose client certificate they now
    /// revoke are closed by the layers that serve them (see [`set`](Self::set)).
    pub fn set_crls(
        &self,
        crls: impl IntoIterator<Item = CertificateRevocationListDer<'static>>,
    ) -> Result<u64, IdentityError> {
        let crls = crls.into_iter().collect();
        self.change(|cur| Credentials {
            cert: cur.cert.clone(),
            roots: cur.roots_der(),
            crls,
        })
    }

    pub(crate) fn provider(&self) -> &Arc<CryptoProvider> {
        &self.shared.provider
    }

    fn change(
        &self,
        make: impl FnOnce(&IdentitySnapshot) -> Credentials,
    ) -> Result<u64, IdentityError> {
        let _writing = self.shared.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        let next = current.generation.saturating_add(1);
        let new = make(&current);
        match validate(
            new,
            next,
            self.shared.expected.as_ref(),
            &self.shared.provider,
        ) {
            Ok(snapshot) => {
                info!(
                    tls.identity.generation = next,
                    tls.identity = snapshot.spiffe_id.as_ref().map_or("", SpiffeId::as_str),
                    tls.identity.expires = snapshot
                        .not_after
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    "TLS identity changed"
                );
                self.shared.tx.send_replace(Arc::new(snapshot));
                Ok(next)
            }
            Err(e) => {
                warn!(
                    error = %e,
                    tls.identity.generation = current.generation,
                    "new TLS identity refused; the current one stays in use"
                );
                Err(e)
            }
        }
    }
}

impl IdentitySnapshot {
    /// Whether `other` trusts and revokes exactly what this one does (a peer accepted under
    /// one is accepted under the other).
    pub(crate) fn same_trust(&self, other: &IdentitySnapshot) -> bool {
        self.roots_der == other.roots_der && self.crls == other.crls
    }

    /// Whether `c` is exactly the material in use.
    pub(crate) fn holds(&self, c: &Credentials) -> bool {
        self.cert.chain == c.cert.chain
            && self.cert.key.secret_der() == c.cert.key.secret_der()
            && *self.roots_der == *c.roots
            && *self.crls == *c.crls
    }

    fn roots_der(&self) -> Vec<CertificateDer<'static>> {
        self.roots_der.to_vec()
    }
}

/// Checks new material and makes the snapshot for generation `generation`.
fn validate(
    new: Credentials,
    generation: u64,
    expected: Option<&SpiffeId>,
    provider: &Arc<CryptoProvider>,
) -> Result<IdentitySnapshot, IdentityError> {
    let leaf = new.cert.chain.first().ok_or(IdentityError::EmptyChain)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(IdentityError::Expired {
            not_after: validity.not_after.to_string(),
        });
    }
    if validity.not_before > now {
        return Err(IdentityError::NotYetValid {
            not_before: validity.not_before.to_string(),
        });
    }
    let not_after = u64::try_from(validity.not_after.timestamp())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .unwrap_or(UNIX_EPOCH);
    let ids = spiffe_ids(leaf);
    if let Some(expected) = expected {
        if !matches!(ids.as_slice(), [id] if id == expected) {
            return Err(IdentityError::WrongIdentity {
                expected: expected.clone(),
                presented: uri_sans(leaf),
            });
        }
    }
    let certified =
        CertifiedKey::from_der(new.cert.chain.clone(), new.cert.key.clone_key(), provider)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => IdentityError::KeyMismatch,
                other => IdentityError::Key(other),
            })?;
    if new.roots.is_empty() {
        return Err(IdentityError::NoRoots);
    }
    let mut roots = RootCertStore::empty();
    for root in &new.roots {
        roots.add(root.clone()).map_err(IdentityError::Root)?;
    }
    let roots = Arc::new(roots);
    // Build the verifier the layers will build, so that a CRL it cannot parse (or roots it
    // cannot use) is refused here rather than at the next handshake.
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(new.crls.clone())
        .build()
        .map_err(IdentityError::Verifier)?;
    let spiffe_id = match ids.as_slice() {
        [id] => Some(id.clone()),
        _ => None,
    };
    Ok(IdentitySnapshot {
        generation,
        cert: new.cert,
        certified: Arc::new(certified),
        spiffe_id,
        not_after,
        roots,
        roots_der: new.roots.into(),
        crls: new.crls.into(),
    })
}

/// The current certificate for every server handshake (any SNI).
impl ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().certified.clone())
    }
}

/// The current certificate for every client handshake whose server asks for one.
impl ResolvesClientCert for LiveIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let certified = self.current().certified.clone();
        certified
            .key
            .choose_scheme(sigschemes)
            .map(|_| certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Largest identity file read (a chain of a few certificates is a few KiB).
pub const MAX_FILE_LEN: u64 = 1 << 20;

/// PEM files that feed a [`LiveIdentity`]: a chain, a key, roots and optional revocation
/// lists, polled for changes.
///
/// Why polling the content rather than file-system events: Kubernetes updates a secret
/// volume by swapping a `..data` symlink, which inotify reports on the directory and not on
/// the file path one watches; editors and `mv` replace the inode; network and overlay file
/// systems may send no events at all. Reading a few KiB every few seconds sees all of these
/// the same way, needs no extra crate, and cannot miss an event. A change applies once two
/// reads in a row agree (so a chain and key caught half-replaced are not applied) and
/// every file parses; content that failed is not retried until it changes again, so a
/// broken file logs one `WARN`, not one per poll.
///
/// ```no_run
/// # async fn run() -> Result<(), proxystack::tls::IdentityError> {
/// use std::time::Duration;
/// use proxystack::tls::{IdentityFiles, LiveIdentity};
/// let files = IdentityFiles::new("/etc/certs/cert-chain.pem", "/etc/certs/key.pem", "/etc/certs/root-cert.pem")
///     .poll_interval(Duration::from_secs(5));
/// let identity = LiveIdentity::new(files.load()?)?;
/// let _watch = files.watch(&identity); // stops when dropped
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IdentityFiles {
    cert: PathBuf,
    key: PathBuf,
    roots: PathBuf,
    crls: Vec<PathBuf>,
    interval: Duration,
}

impl IdentityFiles {
    /// The chain (PEM, end entity first), the key (PEM) and the roots (PEM); polled every
    /// 5 s.
    pub fn new(
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        roots: impl Into<PathBuf>,
    ) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            roots: roots.into(),
            crls: Vec::new(),
            interval: Duration::from_secs(5),
        }
    }

    /// Revocation lists (PEM `X509 CRL`), one or more per file.
    pub fn crls<P: Into<PathBuf>>(mut self, paths: impl IntoIterator<Item = P>) -> Self {
        self.crls = paths.into_iter().map(Into::into).collect();
        self
    }

    /// How often the files are read (at least 10 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Reads and parses the files once.
    pub fn load(&self) -> Result<Credentials, IdentityError> {
        parse_files(self, &self.read_all()?)
    }

    /// Polls the files and applies every change to `identity` (refused changes log a
    /// `WARN` and keep the material in use) until the returned handle is dropped. Needs a
    /// Tokio runtime.
    pub fn watch(&self, identity: &LiveIdentity) -> FileWatch {
        let files = self.clone();
        let identity = identity.clone();
        let task = crate::task::spawn(async move {
            // What was last applied or refused: the same content is not tried again. None
            // at first, so that a change between `load` and `watch` is not missed (content
            // equal to the material in use is recognised and not applied twice).
            let mut last: Option<Vec<Vec<u8>>> = None;
            let mut unreadable_logged = false;
            let mut ticker = tokio::time::interval(files.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                // Twice: the files must agree with themselves, or a writer is mid-way. On a
                // blocking thread: a network file system may be slow to answer.
                let reader = files.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let first = reader.read_all()?;
                    let second = reader.read_all()?;
                    Ok::<_, IdentityError>((second == first).then_some(first))
                })
                .await;
                let content = match read {
                    Ok(Ok(Some(content))) => content,
                    // A writer is mid-way: look again at the next tick.
                    Ok(Ok(None)) => continue,
                    Ok(Err(e)) => {
                        // Missing for a moment (a replace in progress) or gone: keep what
                        // we have, and say so once.
                        if !unreadable_logged {
                            warn!(error = %e, "identity files unreadable; the current identity stays in use");
                            unreadable_logged = true;
                        }
                        continue;
                    }
                    Err(_) => continue,
                };
                unreadable_logged = false;
                if last.as_ref() == Some(&content) {
                    continue;
                }
                match parse_files(&files, &content) {
                    Ok(credentials) if identity.current().holds(&credentials) => {}
                    // `set` logs what it applies or refuses.
                    Ok(credentials) => {
                        let _ = identity.set(credentials);
                    }
                    Err(e) => warn!(
                        error = %e,
                        "identity files not applied; the current identity stays in use"
                    ),
                }
                last = Some(content);
            }
        });
        FileWatch { task }
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [&self.cert, &self.key, &self.roots]
            .into_iter()
            .chain(self.crls.iter())
            .map(PathBuf::as_path)
    }

    fn read_all(&self) -> Result<Vec<Vec<u8>>, IdentityError> {
        self.paths().map(read_bounded).collect()
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, IdentityError> {
    use std::io::Read;
    let read_err = |source| IdentityError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut buf = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(IdentityError::FileTooLarge {
            path: path.to_owned(),
        });
    }
    Ok(buf)
}

fn parse_files(files: &IdentityFiles, contents: &[Vec<u8>]) -> Result<Credentials, IdentityError> {
    let pem_err = |path: &Path, reason: String| IdentityError::Pem {
        path: path.to_owned(),
        reason,
    };
    let content = |i: usize| contents.get(i).map(Vec::as_slice).unwrap_or_default();
    let certs = |i: usize, path: &Path| -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let certs = CertificateDer::pem_slice_iter(content(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(path, e.to_string()))?;
        if certs.is_empty() {
            return Err(pem_err(path, "no CERTIFICATE block".into()));
        }
        Ok(certs)
    };
    let chain = certs(0, &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(content(1))
        .map_err(|e| pem_err(&files.key, e.to_string()))?;
    let roots = certs(2, &files.roots)?;
    let mut crls = Vec::new();
    for (i, path) in files.crls.iter().enumerate() {
        let before = crls.len();
        for crl in CertificateRevocationListDer::pem_slice_iter(content(3 + i)) {
            crls.push(crl.map_err(|e| pem_err(path, e.to_string()))?);
        }
        if crls.len() == before {
            // A configured list that says nothing would revoke nothing: refuse it.
            return Err(pem_err(path, "no X509 CRL block".into()));
        }
    }
    Ok(Credentials {
        cert: CertKey { chain, key },
        roots,
        crls,
    })
}

/// Stops the polling of [`IdentityFiles::watch`] when dropped.
#[derive(Debug)]
pub struct FileWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    fn files(dir: &Path, cert: &[u8], key: &[u8], roots: &[u8]) -> IdentityFiles {
        IdentityFiles::new(
            write(dir, "cert.pem", cert),
            write(dir, "key.pem", key),
            write(dir, "roots.pem", roots),
        )
    }

    #[test]
    fn unreadable_and_malformed_files_are_typed_errors() {
        let dir = std::env::temp_dir().join(format!("proxystack-live-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = IdentityFiles::new(dir.join("nope"), dir.join("nope"), dir.join("nope"));
        assert!(matches!(missing.load(), Err(IdentityError::Read { .. })));

        let no_cert = files(&dir, b"not pem", b"", b"");
        let e = no_cert.load().unwrap_err();
        assert!(
            matches!(&e, IdentityError::Pem { path, .. } if path.ends_with("cert.pem")),
            "{e}"
        );

        let big = vec![b'a'; usize::try_from(MAX_FILE_LEN).unwrap() + 1];
        let too_large = files(&dir, &big, b"", b"");
        assert!(matches!(
            too_large.load(),
            Err(IdentityError::FileTooLarge { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(feature = "demo-certs")]
    #[test]
    fn set_cert_keeps_roots_and_crls_and_counts_generations() {
        let ca = crate::tls::demo::DemoCa::new("cluster.local");
        let revoked = ca.workload_cert("ns", "gone");
        let identity = LiveIdentity::new(
            Credentials::new(ca.workload_cert("ns", "me"), [ca.root()])
                .crls([ca.crl(&[&revoked]).unwrap()]),
        )
        .unwrap();
        assert_eq!(identity.generation(), 1);
        let before = identity.current();
        assert_eq!(identity.set_cert(ca.workload_cert("ns", "me")).unwrap(), 2);
        let after = identity.current();
        assert!(after.same_trust(&before));
        assert_eq!(after.crls().len(), 1);
        assert_ne!(after.cert().chain, before.cert().chain);
        // An unparsable CRL is refused like a bad certificate.
        let bad_crl = CertificateRevocationListDer::from(vec![0x30, 0x00]);
        assert!(matches!(
            identity.set_crls([bad_crl]),
            Err(IdentityError::Verifier(_))
        ));
        assert_eq!(identity.generation(), 2);
    }
}
