//! The CA client: one `CreateCertificate` call per [`CaClient::fetch`].

use std::future::Future;
use std::io::Read;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::uri::{Authority, PathAndQuery};
use http::Uri;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    string::Ia5String, CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};

use super::proto::{IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH};
use super::{CaError, IssuedIdentity};
use crate::identity::SpiffeId;
use crate::tls::{default_provider, CryptoProvider, TlsConfigError};

/// Default requested certificate lifetime: Istio's default workload certificate TTL.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
/// Default bound on one whole request (connect, TLS, HTTP/2, answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest token file accepted.
const MAX_TOKEN_SIZE: u64 = 64 * 1024;
/// Largest `CreateCertificate` answer accepted.
const MAX_RESPONSE_SIZE: usize = 1024 * 1024;
/// The cluster ID ztunnel sends when none is configured (its `CLUSTER_ID` default).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// A client of Istio's certificate service (`istio.v1.auth.IstioCertificateService`).
///
/// Cheap to clone. Each [`fetch`](Self::fetch) generates a new key pair, opens a new TLS +
/// HTTP/2 connection verified by the current CA root, sends one `CreateCertificate`
/// request and checks the answer. A fresh connection per request costs one handshake a
/// renewal (hours apart) and means a rotated root or token is always the one used.
#[derive(Clone)]
pub struct CaClient {
    inner: Arc<Inner>,
}

struct Inner {
    authority: Authority,
    origin: Uri,
    server_name: ServerName<'static>,
    roots: RootSource,
    identity: SpiffeId,
    token_file: Option<PathBuf>,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    validity: Duration,
    timeout: Option<Duration>,
    provider: Arc<CryptoProvider>,
}

enum RootSource {
    Pem(Vec<CertificateDer<'static>>),
    File(PathBuf),
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("addr", &self.inner.authority)
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

/// Configuration of a [`CaClient`]; from [`CaClient::builder`].
#[must_use]
#[derive(Debug)]
pub struct CaClientBuilder {
    addr: String,
    root_pem: Vec<u8>,
    root_file: Option<PathBuf>,
    identity: SpiffeId,
    server_name: Option<String>,
    token_file: Option<PathBuf>,
    cluster_id: Option<String>,
    headers: Vec<(String, String)>,
    validity: Duration,
    timeout: Option<Duration>,
    provider: Option<Arc<CryptoProvider>>,
}

impl CaClient {
    /// Starts a client for the CA at `addr` (`host:port` or `https://host:port`, e.g.
    /// `istiod.istio-system.svc:15012`), trusting the PEM roots `root_pem` for the CA's own
    /// certificate, that asks for certificates of `identity`.
    pub fn builder(
        addr: impl Into<String>,
        root_pem: impl AsRef<[u8]>,
        identity: SpiffeId,
    ) -> CaClientBuilder {
        CaClientBuilder {
            addr: addr.into(),
            root_pem: root_pem.as_ref().to_vec(),
            root_file: None,
            identity,
            server_name: None,
            token_file: None,
            cluster_id: Some(DEFAULT_CLUSTER_ID.to_owned()),
            headers: Vec::new(),
            validity: DEFAULT_VALIDITY,
            timeout: Some(DEFAULT_TIMEOUT),
            provider: None,
        }
    }

    /// The identity this client asks for.
    pub fn identity(&self) -> &SpiffeId {
        &self.inner.identity
    }

    /// Obtains a new certificate: generates an ECDSA P-256 key pair, sends a CSR for the
    /// identity, and checks the returned chain (it parses, the leaf is for the new key, its
    /// only SPIFFE ID is the requested one, it has not expired, it chains to the roots).
    ///
    /// A certificate that fails a check is refused with a typed error and a `tracing`
    /// warning; nothing is returned that a proxy should not present.
    pub async fn fetch(&self) -> Result<IssuedIdentity, CaError> {
        let result = match self.inner.timeout {
            Some(t) => tokio::time::timeout(t, self.fetch_unbounded())
                .await
                .unwrap_or(Err(CaError::Timeout(t))),
            None => self.fetch_unbounded().await,
        };
        match &result {
            Ok(issued) => tracing::info!(
                identity = %issued.identity,
                valid_for = ?issued.not_after.duration_since(SystemTime::now()).unwrap_or_default(),
                "certificate obtained from the Istio CA"
            ),
            Err(e) if e.is_refused_certificate() => tracing::warn!(
                identity = %self.inner.identity,
                error = %e,
                "certificate from the Istio CA refused"
            ),
            Err(e) => tracing::warn!(
                identity = %self.inner.identity,
                ca = %self.inner.authority,
                error = %e,
                source = ?std::error::Error::source(e).map(ToString::to_string),
                "Istio CA request failed"
            ),
        }
        result
    }

    async fn fetch_unbounded(&self) -> Result<IssuedIdentity, CaError> {
        let inner = &*self.inner;
        let ca_roots = self.load_roots()?;
        let token = self.read_token()?;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Csr)?;
        let mut params = CertificateParams::default();
        // Istio's CA takes the identity from the SAN only (and checks it against the token).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(inner.identity.as_str()).map_err(CaError::Csr)?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(CaError::Csr)?;
        let public_key = key.subject_public_key_info();
        let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

        let request = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(inner.validity.as_secs()).unwrap_or(i64::MAX),
        };
        let response = self.call(&ca_roots, token, request).await?;
        IssuedIdentity::from_response(
            &response.cert_chain,
            private_key,
            &public_key,
            &inner.identity,
            &ca_roots,
            &inner.provider,
            SystemTime::now(),
        )
    }

    /// The roots for the CA connection: the file's current content when one is configured
    /// (Kubernetes updates a mounted ConfigMap in place), else the PEM given to the builder.
    fn load_roots(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        match &self.inner.roots {
            RootSource::Pem(certs) => Ok(certs.clone()),
            RootSource::File(path) => {
                let display = path.display().to_string();
                let certs = crate::tls::load_pem_certs(&display).map_err(CaError::Root)?;
                if certs.is_empty() {
                    return Err(CaError::Root(TlsConfigError::EmptyChain(display)));
                }
                Ok(certs)
            }
        }
    }

    /// The bearer token, read anew for every request: projected service-account tokens are
    /// rotated by the kubelet.
    fn read_token(&self) -> Result<Option<AsciiMetadataValue>, CaError> {
        let Some(path) = &self.inner.token_file else {
            return Ok(None);
        };
        let token_err = |source| CaError::Token {
            path: path.display().to_string(),
            source,
        };
        // Kubernetes tokens are about 1 KiB; read at most MAX_TOKEN_SIZE + 1 to notice more.
        let mut raw = String::new();
        std::fs::File::open(path)
            .map_err(token_err)?
            .take(MAX_TOKEN_SIZE + 1)
            .read_to_string(&mut raw)
            .map_err(token_err)?;
        if raw.len() as u64 > MAX_TOKEN_SIZE {
            return Err(token_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the token file is larger than {MAX_TOKEN_SIZE} bytes"),
            )));
        }
        let token = raw.trim();
        if token.is_empty() {
            return Err(token_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the token file is empty",
            )));
        }
        AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map(Some)
            .map_err(|_| {
                token_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the token holds characters not allowed in a header",
                ))
            })
    }

    async fn call(
        &self,
        ca_roots: &[CertificateDer<'static>],
        token: Option<AsciiMetadataValue>,
        request: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, CaError> {
        let inner = &*self.inner;
        let connect_err = |source: crate::BoxError| CaError::Connect {
            addr: inner.authority.to_string(),
            source,
        };
        let mut store = RootCertStore::empty();
        for root in ca_roots {
            store
                .add(root.clone())
                .map_err(|e| CaError::Root(TlsConfigError::Rustls(e)))?;
        }
        let mut tls = ClientConfig::builder_with_provider(inner.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Root(TlsConfigError::Rustls(e)))?
            .with_root_certificates(store)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];

        let tcp = tokio::net::TcpStream::connect(inner.authority.as_str())
            .await
            .map_err(|e| connect_err(e.into()))?;
        // Nagle would delay the small gRPC frames by a round trip.
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(inner.server_name.clone(), tcp)
            .await
            .map_err(|e| connect_err(e.into()))?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| connect_err(e.into()))?;
        // The connection lives exactly as long as this call (aborted on return or drop).
        let conn = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "Istio CA connection ended");
            }
        }));

        // A chain is a few KiB: 1 MiB bounds what a broken or hostile CA can make us hold
        // (tonic's default is 4 MiB).
        let mut grpc = tonic::client::Grpc::with_origin(H2Service(send), inner.origin.clone())
            .max_decoding_message_size(MAX_RESPONSE_SIZE);
        grpc.ready().await.map_err(|e| connect_err(e.into()))?;
        let mut req = tonic::Request::new(request);
        let metadata = req.metadata_mut();
        for (name, value) in &inner.headers {
            metadata.insert(name.clone(), value.clone());
        }
        if let Some(token) = token {
            metadata.insert("authorization", token);
        }
        let response = grpc
            .unary(
                req,
                PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .map_err(|status| CaError::Rpc {
                code: format!("{:?}", status.code()),
                message: status.message().to_owned(),
            })?;
        drop(conn);
        Ok(response.into_inner())
    }
}

impl CaClientBuilder {
    /// Reads the CA root from this PEM file at every request instead of using the PEM
    /// given to [`CaClient::builder`], so a rotated root (a ConfigMap update, e.g. Istio's
    /// `istio-ca-root-cert`) is picked up without a restart.
    pub fn root_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_file = Some(path.into());
        self
    }

    /// The name the CA's certificate must carry (default: the host of the address). For a
    /// CA reached by IP, or through another name than its certificate's, e.g.
    /// `istiod.istio-system.svc`.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Sends the token in this file as `authorization: Bearer …`, read anew for every
    /// request (e.g. `/var/run/secrets/tokens/istio-token`, a projected service-account
    /// token with audience `istio-ca`). Default: no token.
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    /// The `ClusterID` header, by which istiod picks the cluster that checks the token
    /// (default [`DEFAULT_CLUSTER_ID`], as ztunnel). `None` sends none.
    pub fn cluster_id(mut self, id: Option<String>) -> Self {
        self.cluster_id = id;
        self
    }

    /// Another header to send with every request (ztunnel's `CA_HEADER_*`).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The certificate lifetime to ask for (default [`DEFAULT_VALIDITY`]; the CA may give
    /// less).
    pub fn validity(mut self, validity: Duration) -> Self {
        self.validity = validity;
        self
    }

    /// Bound on one whole request (default [`DEFAULT_TIMEOUT`]; `None`: unbounded).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The rustls crypto provider for the CA connection (default
    /// [`default_provider`](crate::tls::default_provider)).
    pub fn provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Checks the configuration and builds the client. The root PEM must hold at least one
    /// certificate unless a [`root_file`](Self::root_file) is set (read at each request).
    pub fn build(self) -> Result<CaClient, CaError> {
        let addr = self.addr.strip_prefix("https://").unwrap_or(&self.addr);
        let addr = addr.strip_suffix('/').unwrap_or(addr);
        let authority: Authority = addr
            .parse()
            .map_err(|e| CaError::Config(format!("CA address {addr:?}: {e}")))?;
        if authority.port_u16().is_none() {
            return Err(CaError::Config(format!(
                "CA address {addr:?} has no port (istiod serves it on 15012)"
            )));
        }
        let origin = Uri::builder()
            .scheme("https")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| CaError::Config(format!("CA address {addr:?}: {e}")))?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let name = self.server_name.as_deref().unwrap_or(host).to_owned();
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| CaError::Config(format!("server name {name:?}: {e}")))?;

        let roots = match self.root_file {
            Some(path) => RootSource::File(path),
            None => {
                let certs = CertificateDer::pem_slice_iter(&self.root_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        CaError::Root(TlsConfigError::Pem {
                            path: "<root PEM>".into(),
                            reason: e.to_string(),
                        })
                    })?;
                if certs.is_empty() {
                    return Err(CaError::Root(TlsConfigError::EmptyChain(
                        "<root PEM>".into(),
                    )));
                }
                RootSource::Pem(certs)
            }
        };

        let mut headers = Vec::new();
        let cluster = self.cluster_id.map(|id| ("clusterid".to_owned(), id));
        for (name, value) in self.headers.into_iter().chain(cluster) {
            let key = AsciiMetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|e| CaError::Config(format!("header name {name:?}: {e}")))?;
            let value = AsciiMetadataValue::try_from(value.as_str())
                .map_err(|e| CaError::Config(format!("header {name}: {e}")))?;
            headers.push((key, value));
        }

        Ok(CaClient {
            inner: Arc::new(Inner {
                authority,
                origin,
                server_name,
                roots,
                identity: self.identity,
                token_file: self.token_file,
                headers,
                validity: self.validity,
                timeout: self.timeout,
                provider: self.provider.unwrap_or_else(default_provider),
            }),
        })
    }
}

/// hyper's HTTP/2 sender as the tower service tonic's client drives.
struct H2Service(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

type ResponseFuture =
    Pin<Box<dyn Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for H2Service {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBZjCCAQ2gAwIBAgIUQ5Xf\n-----END CERTIFICATE-----\n";

    fn build(addr: &str) -> Result<CaClient, CaError> {
        let id = SpiffeId::istio("cluster.local", "default", "reviews").unwrap();
        // A root file skips the PEM check: only the address is under test.
        CaClient::builder(addr, "", id)
            .root_file("/nonexistent")
            .build()
    }

    #[test]
    fn addresses() {
        let c = build("istiod.istio-system.svc:15012").unwrap();
        assert_eq!(c.inner.origin, "https://istiod.istio-system.svc:15012/");
        assert!(matches!(c.inner.server_name, ServerName::DnsName(_)));
        let c = build("https://[::1]:15012/").unwrap();
        assert_eq!(c.inner.authority.as_str(), "[::1]:15012");
        assert!(matches!(c.inner.server_name, ServerName::IpAddress(_)));
        for bad in ["istiod", "", "https://", "a b:1", "host:port"] {
            assert!(
                matches!(build(bad), Err(CaError::Config(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn roots_and_headers_are_checked_at_build() {
        let id = SpiffeId::istio("cluster.local", "default", "reviews").unwrap();
        let b = || CaClient::builder("127.0.0.1:15012", ROOT, id.clone());
        assert!(matches!(
            CaClient::builder("127.0.0.1:15012", "no PEM here", id.clone()).build(),
            Err(CaError::Root(_))
        ));
        assert!(matches!(
            b().header("bad name", "x").build(),
            Err(CaError::Config(_))
        ));
        assert!(matches!(
            b().cluster_id(Some("line\nbreak".into())).build(),
            Err(CaError::Config(_))
        ));
    }
}
