//! The client side of TLS: a connector that wraps any connector with a handshake.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::client::TlsStream;
use tower::{Service, ServiceExt};

use super::verify::PinnedServerVerifier;
use super::LiveIdentity;
use super::{record_session, CertKey, TlsConfigError, TlsError};
use crate::addr::Host;
use crate::conn::{Conn, CredentialsCurrent};
use crate::identity::SpiffeId;
use crate::io::Io;
use crate::{BoxError, Target};

/// Which server name the ClientHello carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SniMode {
    /// The target's host name; none for IP targets.
    #[default]
    FromTarget,
    /// Never send SNI (HBONE: "IPs are illegal in SNI", identities are pinned instead).
    None,
    /// Always this name.
    Fixed(String),
}

/// Target metadata: the server must present one of these SPIFFE IDs (overrides the
/// connector's own [`TlsConnector::expect_identities`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedIdentities(pub Vec<SpiffeId>);

/// Wraps a connector with a TLS client handshake.
///
/// With expected identities (from the connector or the [`Target`]'s
/// [`ExpectedIdentities`]) the server's DNS names are ignored and one of its URI SANs must
/// match (SAN pinning); otherwise the server name is verified as usual.
///
/// ```
/// # #[cfg(feature = "demo-certs")] {
/// use proxystack::tls::{demo::DemoCa, SniMode, TlsConnector};
/// use proxystack::{identity::SpiffeId, tcp::TcpConnector};
/// let ca = DemoCa::new("cluster.local");
/// let me = ca.workload_cert("default", "client");
/// let connector = TlsConnector::new(TcpConnector::new(), ca.roots())
///     .client_cert(me).unwrap()
///     .alpn(["h2"])
///     .sni(SniMode::None)
///     .expect_identities([SpiffeId::istio("cluster.local", "default", "server").unwrap()]);
/// # let _ = connector; }
/// ```
#[derive(Clone)]
pub struct TlsConnector<C> {
    inner: C,
    settings: Arc<Settings>,
    configs: Arc<Mutex<ConfigCache>>,
}

/// Client configs per expected-identity set, for one identity generation.
#[derive(Default)]
struct ConfigCache {
    generation: u64,
    by_expected: HashMap<Vec<SpiffeId>, Arc<ClientConfig>>,
}

#[derive(Clone)]
struct Settings {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    client_cert: Option<CertKey>,
    alpn: Vec<Vec<u8>>,
    sni: SniMode,
    expected: Vec<SpiffeId>,
    tls12: bool,
    handshake_timeout: Duration,
    /// When set, client certificate and roots come from here at every handshake.
    identity: Option<LiveIdentity>,
}

/// Configs are cached per expected-identity set; past this many sets the cache restarts,
/// which bounds memory against targets with ever-new identities.
const CONFIG_CACHE_LIMIT: usize = 1024;

impl<C> TlsConnector<C> {
    /// Verifies servers against `roots`; TLS 1.2 and 1.3, SNI from the target, no ALPN,
    /// no client certificate, 10 s handshake timeout.
    pub fn new(inner: C, roots: Arc<RootCertStore>) -> Self {
        Self::from_settings(
            inner,
            Settings {
                roots,
                provider: super::default_provider(),
                client_cert: None,
                alpn: Vec::new(),
                sni: SniMode::FromTarget,
                expected: Vec::new(),
                tls12: true,
                handshake_timeout: Duration::from_secs(10),
                identity: None,
            },
        )
    }

    /// Presents the certificate of `identity` and verifies servers against its roots, as
    /// they are at each handshake ([`client_cert`](Self::client_cert) is then not used);
    /// otherwise as [`new`](Self::new). Connections it makes
    /// carry [`CredentialsCurrent`] metadata, so a pool over it (such as
    /// [`H2ConnectPool`](crate::connect::H2ConnectPool)) opens no new tunnels on a
    /// connection made with an older certificate and lets it drain.
    ///
    /// ```
    /// # #[cfg(feature = "demo-certs")] {
    /// use proxystack::tls::{demo::DemoCa, Credentials, LiveIdentity, TlsConnector};
    /// use proxystack::tcp::TcpConnector;
    /// let ca = DemoCa::new("cluster.local");
    /// let me = LiveIdentity::new(Credentials::new(ca.workload_cert("default", "client"), [ca.root()])).unwrap();
    /// let connector = TlsConnector::live(TcpConnector::new(), me.clone()).alpn(["h2"]);
    /// me.set_cert(ca.workload_cert("default", "client")).unwrap(); // next handshake presents it
    /// # let _ = connector; }
    /// ```
    pub fn live(inner: C, identity: LiveIdentity) -> Self {
        let roots = identity.current().roots().clone();
        let provider = identity.provider().clone();
        let this = Self::new(inner, roots).provider(provider);
        this.with(|s| s.identity = Some(identity))
    }

    fn from_settings(inner: C, settings: Settings) -> Self {
        Self {
            inner,
            settings: Arc::new(settings),
            configs: Arc::default(),
        }
    }

    fn with(self, f: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = (*self.settings).clone();
        f(&mut settings);
        Self::from_settings(self.inner, settings)
    }

    /// Presents this certificate (mutual TLS). Fails if rustls rejects the key.
    pub fn client_cert(self, cert: CertKey) -> Result<Self, TlsConfigError> {
        // Build once now so a bad key is reported here, not at the first connection.
        ClientConfig::builder_with_provider(self.settings.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.settings.roots.clone())
            .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
        Ok(self.with(|s| s.client_cert = Some(cert)))
    }

    /// Application protocols to offer, e.g. `["h2"]`.
    pub fn alpn<P: AsRef<[u8]>>(self, protocols: impl IntoIterator<Item = P>) -> Self {
        let alpn = protocols.into_iter().map(|p| p.as_ref().to_vec()).collect();
        self.with(|s| s.alpn = alpn)
    }

    /// Which SNI to send.
    pub fn sni(self, mode: SniMode) -> Self {
        self.with(|s| s.sni = mode)
    }

    /// Requires the server to present one of these SPIFFE IDs.
    pub fn expect_identities(self, ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        let ids = ids.into_iter().collect();
        self.with(|s| s.expected = ids)
    }

    /// Offer only TLS 1.3.
    pub fn tls13_only(self) -> Self {
        self.with(|s| s.tls12 = false)
    }

    /// The crypto provider (default: ring).
    pub fn provider(self, provider: Arc<CryptoProvider>) -> Self {
        self.with(|s| s.provider = provider)
    }

    /// Time allowed for the handshake (after the inner connect).
    pub fn handshake_timeout(self, timeout: Duration) -> Self {
        self.with(|s| s.handshake_timeout = timeout)
    }

    /// The config for `expected` and the identity generation it was made with (0: static).
    fn config_for(&self, expected: &[SpiffeId]) -> Result<(Arc<ClientConfig>, u64), TlsError> {
        let mut cache = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        let s = &self.settings;
        let snapshot = s.identity.as_ref().map(LiveIdentity::current);
        let generation = snapshot.as_ref().map_or(0, |c| c.generation());
        if cache.generation != generation {
            // New material: configs made with the old certificate or roots are dropped.
            cache.by_expected.clear();
            cache.generation = generation;
        }
        if let Some(config) = cache.by_expected.get(expected) {
            return Ok((config.clone(), generation));
        }
        let roots = snapshot.as_ref().map_or(&s.roots, |c| c.roots());
        let client_cert = snapshot
            .as_ref()
            .map(|c| c.cert())
            .or(s.client_cert.as_ref());
        let verifier = Arc::new(PinnedServerVerifier::new(
            roots.clone(),
            expected.to_vec(),
            s.provider.clone(),
        ));
        let versions: &[&rustls::SupportedProtocolVersion] = if s.tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let config_err = |e: rustls::Error| TlsError::Connect(Box::new(TlsConfigError::Rustls(e)));
        let builder = ClientConfig::builder_with_provider(s.provider.clone())
            .with_protocol_versions(versions)
            .map_err(config_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_cert {
            Some(c) => builder
                .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
                .map_err(config_err)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = s.alpn.clone();
        config.enable_sni = s.sni != SniMode::None;
        config.resumption = Resumption::disabled();
        let config = Arc::new(config);
        if cache.by_expected.len() >= CONFIG_CACHE_LIMIT {
            cache.by_expected.clear();
        }
        cache.by_expected.insert(expected.to_vec(), config.clone());
        Ok((config, generation))
    }

    fn server_name(&self, target: &Target) -> ServerName<'static> {
        let ip_name = |ip: IpAddr| ServerName::IpAddress(ip.into());
        match (&self.settings.sni, target.authority().host()) {
            (SniMode::Fixed(name), _) => ServerName::try_from(name.clone())
                .unwrap_or_else(|_| ip_name(Ipv4Addr::UNSPECIFIED.into())),
            (SniMode::FromTarget, Host::Name(name)) => ServerName::try_from(name.clone())
                .unwrap_or_else(|_| ip_name(Ipv4Addr::UNSPECIFIED.into())),
            (SniMode::FromTarget, Host::Ip(ip)) => ip_name(*ip),
            // rustls sends no SNI for IP names; HBONE's convention is 0.0.0.0.
            (SniMode::None, _) => ip_name(Ipv4Addr::UNSPECIFIED.into()),
        }
    }
}

impl<C> std::fmt::Debug for TlsConnector<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("sni", &self.settings.sni)
            .field("expected", &self.settings.expected)
            .finish_non_exhaustive()
    }
}

impl<C, O> Service<Target> for TlsConnector<C>
where
    C: Service<Target, Response = Conn<O>> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    O: Io,
{
    type Response = Conn<TlsStream<O>>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, TlsError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let expected = target
            .get::<ExpectedIdentities>()
            .map(|e| e.0.clone())
            .unwrap_or_else(|| self.settings.expected.clone());
        let config = self.config_for(&expected);
        let server_name = self.server_name(&target);
        let timeout = self.settings.handshake_timeout;
        let inner = self.inner.clone();
        let identity = self.settings.identity.clone();
        Box::pin(async move {
            let (config, generation) = config?;
            let conn = inner
                .oneshot(target)
                .await
                .map_err(|e| TlsError::Connect(e.into()))?;
            let (io, mut metadata) = conn.into_parts();
            let connector = tokio_rustls::TlsConnector::from(config);
            let tls = match tokio::time::timeout(timeout, connector.connect(server_name, io)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return Err(TlsError::from_client_handshake(e)),
                Err(_) => return Err(TlsError::HandshakeTimeout(timeout)),
            };
            record_session(&mut metadata, tls.get_ref().1, None);
            if let Some(identity) = identity {
                metadata.insert(CredentialsCurrent::new(move || {
                    identity.generation() == generation
                }));
            }
            Ok(Conn::from_parts(tls, metadata))
        })
    }
}
