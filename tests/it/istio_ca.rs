//! Istio CA client against a real gRPC CA started by the test: a tonic server (TLS, HTTP/2)
//! that signs the client's CSRs with an rcgen CA. Obtain, token, refusals, renewal, outage,
//! root rotation.
#![cfg(feature = "istio-ca")]

use crate::common;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use proxystack::identity::SpiffeId;
use proxystack::istio_ca::proto::{
    IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH,
};
use proxystack::istio_ca::{CaClient, CaError, IdentityReceiver, IssuedIdentity, Renewer};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::server::UnaryService;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// The name the test CA's serving certificate carries (as istiod's does).
pub(crate) const CA_NAME: &str = "istiod.istio-system.svc";
/// Every wait in this file ends by then at the latest.
const LIMIT: Duration = Duration::from_secs(20);

pub(crate) fn reviews() -> SpiffeId {
    SpiffeId::istio("cluster.local", "default", "reviews").unwrap()
}

// ---- the test CA ----

/// An rcgen root CA: signs CSRs and the gRPC server's own certificate.
pub(crate) struct TestCa {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) root_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> Arc<Self> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("test Istio CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = params.self_signed(&key).unwrap();
        let issuer = Issuer::new(params, key);
        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec![CA_NAME.to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        Arc::new(Self {
            issuer,
            root_pem: root.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
        })
    }

    fn root_der(&self) -> Vec<u8> {
        rustls::pki_types::CertificateDer::from_pem_slice(self.root_pem.as_bytes())
            .unwrap()
            .to_vec()
    }
}

use rustls::pki_types::pem::PemObject;

/// How the CA answers.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Normal,
    /// Signs the CSR's key, but for another identity.
    WrongIdentity,
    /// Signs a certificate for a key of its own.
    OtherKey,
    /// Signs a certificate that has already expired.
    Expired,
    /// Signs with another CA, but sends its usual root at the end of the chain.
    ForeignCa,
}

pub(crate) struct CaState {
    ca: Mutex<Arc<TestCa>>,
    lifetime: Duration,
    mode: Mutex<Mode>,
    /// When set, requests without exactly this `authorization` are refused.
    pub(crate) required_auth: Mutex<Option<String>>,
    /// `(authorization, clusterid)` of every request.
    seen: Mutex<Vec<(Option<String>, Option<String>)>>,
    pub(crate) issued: AtomicUsize,
}

impl CaState {
    pub(crate) fn new(ca: Arc<TestCa>, lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            ca: Mutex::new(ca),
            lifetime,
            mode: Mutex::new(Mode::Normal),
            required_auth: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            issued: AtomicUsize::new(0),
        })
    }

    fn sign(&self, req: &IstioCertificateRequest) -> Result<IstioCertificateResponse, Status> {
        let ca = self.ca.lock().unwrap().clone();
        let mode = *self.mode.lock().unwrap();
        let mut csr = CertificateSigningRequestParams::from_pem(&req.csr)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        assert!(
            matches!(csr.params.subject_alt_names.as_slice(), [SanType::URI(_)]),
            "the CSR carries exactly the SPIFFE URI SAN"
        );
        let now = time::OffsetDateTime::now_utc();
        let lifetime = time::Duration::try_from(self.lifetime).unwrap();
        csr.params.not_before = now - time::Duration::seconds(1);
        csr.params.not_after = now + lifetime;
        if mode == Mode::Expired {
            csr.params.not_before = now - time::Duration::hours(2);
            csr.params.not_after = now - time::Duration::hours(1);
        }
        if mode == Mode::WrongIdentity {
            csr.params.subject_alt_names = vec![SanType::URI(
                "spiffe://cluster.local/ns/default/sa/admin"
                    .try_into()
                    .unwrap(),
            )];
        }
        let leaf = if mode == Mode::OtherKey {
            let key = KeyPair::generate().unwrap();
            csr.params.signed_by(&key, &ca.issuer).unwrap()
        } else if mode == Mode::ForeignCa {
            csr.signed_by(&TestCa::new("foreign").issuer).unwrap()
        } else {
            csr.signed_by(&ca.issuer).unwrap()
        };
        self.issued.fetch_add(1, Ordering::SeqCst);
        // As istiod: the workload certificate first, the root last.
        Ok(IstioCertificateResponse {
            cert_chain: vec![leaf.pem(), ca.root_pem.clone()],
        })
    }
}

// ---- the gRPC service, written out as tonic's codegen would (one method, no router) ----

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

#[derive(Clone)]
struct CaService(Arc<CaState>);

impl tower::Service<http::Request<tonic::body::Body>> for CaService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != CREATE_CERTIFICATE_PATH {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(CreateCertificate(state), req).await)
        })
    }
}

struct CreateCertificate(Arc<CaState>);

impl UnaryService<IstioCertificateRequest> for CreateCertificate {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<Result<Response<IstioCertificateResponse>, Status>>;

    fn call(&mut self, req: Request<IstioCertificateRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let header = |name: &str| {
                req.metadata()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let auth = header("authorization");
            state
                .seen
                .lock()
                .unwrap()
                .push((auth.clone(), header("clusterid")));
            if let Some(required) = &*state.required_auth.lock().unwrap() {
                if auth.as_deref() != Some(required.as_str()) {
                    return Err(Status::unauthenticated("bad token"));
                }
            }
            state.sign(req.get_ref()).map(Response::new)
        })
    }
}

/// A running test CA server.
pub(crate) struct CaServer {
    pub(crate) addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl CaServer {
    /// Serves `state` on `addr` (port 0: any) with TLS from the state's current CA.
    pub(crate) async fn start(addr: SocketAddr, state: Arc<CaState>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ca = state.ca.lock().unwrap().clone();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&ca.server_cert_pem, &ca.server_key_pem));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::builder().tls_config(tls).unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let _ = server
                .serve_with_incoming_shutdown(CaService(state), incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self { addr, stop, task }
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("CA server stops")
            .unwrap();
    }
}

fn client(addr: SocketAddr, ca: &TestCa) -> proxystack::istio_ca::CaClientBuilder {
    CaClient::builder(addr.to_string(), &ca.root_pem, reviews()).server_name(CA_NAME)
}

/// Waits (bounded) until the receiver holds a value that `pred` accepts.
async fn wait_for(
    rx: &mut IdentityReceiver,
    pred: impl FnMut(&Option<Arc<IssuedIdentity>>) -> bool,
) -> Option<Arc<IssuedIdentity>> {
    tokio::time::timeout(LIMIT, rx.wait_for(pred))
        .await
        .expect("identity within the limit")
        .expect("renewer running")
        .clone()
}

fn localhost() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

// ---- tests ----

#[tokio::test]
async fn obtains_a_checked_certificate() {
    common::init_tracing();
    let ca = TestCa::new("a");
    let state = CaState::new(ca.clone(), Duration::from_secs(3600));
    let server = CaServer::start(localhost(), state.clone()).await;

    let issued = client(server.addr, &ca)
        .build()
        .unwrap()
        .fetch()
        .await
        .unwrap();
    assert_eq!(issued.identity, reviews());
    assert_eq!(issued.chain.len(), 1, "the root is not part of the chain");
    assert_eq!(
        issued.roots.len(),
        1,
        "the root the CA sent = the configured root"
    );
    assert_eq!(issued.roots[0].as_ref(), ca.root_der().as_slice());
    assert_eq!(
        proxystack::tls::spiffe_ids(&issued.chain[0]),
        vec![reviews()]
    );
    let now = SystemTime::now();
    assert!(issued.not_before <= now && now < issued.not_after);
    // The key is the leaf's: rustls accepts the pair for a server.
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(issued.chain.clone(), issued.key.clone_key())
        .expect("chain and key belong together");
    // ztunnel's ClusterID header, no token when none is configured.
    assert_eq!(
        state.seen.lock().unwrap().as_slice(),
        &[(None, Some("Kubernetes".to_owned()))]
    );
    server.stop().await;
}

#[tokio::test]
async fn bearer_token_is_sent_and_reread() {
    common::init_tracing();
    let ca = TestCa::new("a");
    let state = CaState::new(ca.clone(), Duration::from_secs(3600));
    let server = CaServer::start(localhost(), state.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "token-one\n").unwrap();
    let client = client(server.addr, &ca)
        .token_file(&token)
        .cluster_id(Some("east".into()))
        .build()
        .unwrap();

    *state.required_auth.lock().unwrap() = Some("Bearer token-one".into());
    client.fetch().await.unwrap();
    // The kubelet rotated the token: the next request carries the new one.
    std::fs::write(&token, "token-two").unwrap();
    *state.required_auth.lock().unwrap() = Some("Bearer token-two".into());
    client.fetch().await.unwrap();
    // A token the CA does not accept: a typed refusal, no certificate.
    *state.required_auth.lock().unwrap() = Some("Bearer token-three".into());
    match client.fetch().await {
        Err(CaError::Rpc { code, .. }) => assert_eq!(code, "Unauthenticated"),
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
    std::fs::remove_file(&token).unwrap();
    assert!(matches!(client.fetch().await, Err(CaError::Token { .. })));
    let seen = state.seen.lock().unwrap().clone();
    let east = Some("east".to_owned());
    assert_eq!(
        seen,
        vec![
            (Some("Bearer token-one".into()), east.clone()),
            (Some("Bearer token-two".into()), east.clone()),
            (Some("Bearer token-two".into()), east),
        ]
    );
    assert_eq!(state.issued.load(Ordering::SeqCst), 2);
    server.stop().await;
}

#[tokio::test]
async fn bad_certificates_are_refused() {
    common::init_tracing();
    let ca = TestCa::new("a");
    let state = CaState::new(ca.clone(), Duration::from_secs(3600));
    let server = CaServer::start(localhost(), state.clone()).await;
    let client = client(server.addr, &ca).build().unwrap();

    *state.mode.lock().unwrap() = Mode::WrongIdentity;
    match client.fetch().await {
        Err(CaError::IdentityMismatch { expected, got }) => {
            assert_eq!(expected, reviews());
            assert_eq!(
                got[0].as_str(),
                "spiffe://cluster.local/ns/default/sa/admin"
            );
        }
        other => panic!("expected IdentityMismatch, got {other:?}"),
    }
    *state.mode.lock().unwrap() = Mode::OtherKey;
    assert!(matches!(client.fetch().await, Err(CaError::KeyMismatch)));
    *state.mode.lock().unwrap() = Mode::Expired;
    assert!(matches!(client.fetch().await, Err(CaError::Expired { .. })));
    *state.mode.lock().unwrap() = Mode::ForeignCa;
    assert!(matches!(client.fetch().await, Err(CaError::Untrusted(_))));

    // A renewer never publishes a refused certificate.
    *state.mode.lock().unwrap() = Mode::WrongIdentity;
    let renewer = Renewer::builder(client.clone())
        .initial_backoff(Duration::from_millis(50))
        .max_backoff(Duration::from_millis(100))
        .spawn();
    let before = state.issued.load(Ordering::SeqCst);
    assert!(
        common::eventually(LIMIT, || state.issued.load(Ordering::SeqCst) >= before + 3).await,
        "the renewer retries"
    );
    assert!(renewer.current().is_none());
    // Once the CA behaves, the renewer's next retry succeeds.
    *state.mode.lock().unwrap() = Mode::Normal;
    let mut rx = renewer.subscribe();
    let id = wait_for(&mut rx, Option::is_some).await.unwrap();
    assert_eq!(id.identity, reviews());
    renewer.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn renews_at_half_life() {
    common::init_tracing();
    let ca = TestCa::new("a");
    // 6 s certificates: renewed about every 3 s, with 3 s to spare before expiry.
    let state = CaState::new(ca.clone(), Duration::from_secs(6));
    let server = CaServer::start(localhost(), state.clone()).await;
    let renewer = Renewer::builder(client(server.addr, &ca).build().unwrap())
        .initial_backoff(Duration::from_millis(100))
        .spawn();
    let mut rx = renewer.subscribe();

    let first = wait_for(&mut rx, Option::is_some).await.unwrap();
    // The next one arrives before the first expires: no gap without an identity.
    let second = wait_for(&mut rx, |c| match c {
        Some(c) => !Arc::ptr_eq(c, &first),
        None => panic!("identity withdrawn although the CA is up"),
    })
    .await
    .unwrap();
    assert!(second.not_after >= first.not_after);
    assert_ne!(second.chain[0], first.chain[0]);
    let third = wait_for(&mut rx, |c| match c {
        Some(c) => !Arc::ptr_eq(c, &second),
        None => panic!("identity withdrawn although the CA is up"),
    })
    .await
    .unwrap();
    assert_ne!(third.chain[0], second.chain[0]);
    assert!(state.issued.load(Ordering::SeqCst) >= 3);
    renewer.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn survives_a_ca_outage() {
    common::init_tracing();
    let ca = TestCa::new("a");
    let state = CaState::new(ca.clone(), Duration::from_secs(4));
    let server = CaServer::start(localhost(), state.clone()).await;
    let addr = server.addr;
    let renewer = Renewer::builder(client(addr, &ca).build().unwrap())
        .initial_backoff(Duration::from_millis(100))
        .max_backoff(Duration::from_millis(400))
        .jitter(0.0)
        .spawn();
    let mut rx = renewer.subscribe();
    let first = wait_for(&mut rx, Option::is_some).await.unwrap();

    // The CA goes away before the renewal is due.
    server.stop().await;
    // Past the renewal time (half-life) the failed renewals leave the old identity in place.
    let past_half = first.not_before + first.lifetime().mul_f64(0.75);
    tokio::time::sleep(
        past_half
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    assert!(
        renewer.current().is_some_and(|c| Arc::ptr_eq(&c, &first)),
        "the old identity is kept while the CA is down"
    );
    assert_eq!(state.issued.load(Ordering::SeqCst), 1);
    // At its expiry it is withdrawn: no expired certificate is served.
    wait_for(&mut rx, Option::is_none).await;
    assert!(SystemTime::now() >= first.not_after);

    // The CA comes back on the same address: a retry gets a new identity.
    let server = CaServer::start(addr, state.clone()).await;
    let next = wait_for(&mut rx, Option::is_some).await.unwrap();
    assert!(next.not_after > first.not_after);
    assert_eq!(state.issued.load(Ordering::SeqCst), 2);
    renewer.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn follows_a_root_rotation() {
    common::init_tracing();
    let old = TestCa::new("old");
    let new = TestCa::new("new");
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root-cert.pem");
    std::fs::write(&root_file, &old.root_pem).unwrap();

    let state = CaState::new(old.clone(), Duration::from_secs(3600));
    let server = CaServer::start(localhost(), state.clone()).await;
    let addr = server.addr;
    let reloading = client(addr, &old).root_file(&root_file).build().unwrap();
    let pinned = client(addr, &old).build().unwrap();
    let before = reloading.fetch().await.unwrap();
    assert_eq!(before.roots.len(), 1);
    assert_eq!(before.roots[0].as_ref(), old.root_der().as_slice());
    server.stop().await;

    // The CA moves to a new root; the mounted root file is updated (atomic replace, as the
    // kubelet does) to the bundle of both.
    *state.ca.lock().unwrap() = new.clone();
    let server = CaServer::start(addr, state.clone()).await;
    let tmp = dir.path().join("root-cert.pem.tmp");
    std::fs::write(&tmp, format!("{}{}", new.root_pem, old.root_pem)).unwrap();
    std::fs::rename(&tmp, &root_file).unwrap();

    let after = reloading.fetch().await.unwrap();
    // The new root comes first (from the CA's chain), then the bundle from the file.
    assert_eq!(after.roots.len(), 2);
    assert_eq!(after.roots[0].as_ref(), new.root_der().as_slice());
    assert!(after
        .roots
        .iter()
        .any(|r| r.as_ref() == old.root_der().as_slice()));
    // The new chain verifies under the published roots (a peer's view).
    let verifier = rustls::server::WebPkiClientVerifier::builder(after.root_store())
        .build()
        .unwrap();
    verifier
        .verify_client_cert(
            &after.chain[0],
            &after.chain[1..],
            rustls::pki_types::UnixTime::now(),
        )
        .expect("the new certificate chains to the published roots");

    // A client that still trusts only the old root cannot even reach the CA now.
    match pinned.fetch().await {
        Err(CaError::Connect { .. }) => {}
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_silent_ca_times_out() {
    common::init_tracing();
    let ca = TestCa::new("a");
    // Accepts TCP and never says a word (no TLS ServerHello): the request's bound ends it.
    let listener = TcpListener::bind(localhost()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let client = client(addr, &ca)
        .timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    let result = tokio::time::timeout(LIMIT, client.fetch()).await.unwrap();
    assert!(
        matches!(result, Err(CaError::Timeout(t)) if t == Duration::from_millis(300)),
        "{result:?}"
    );
    holder.abort();
}

/// A TLS handshake with a server on `addr`, trusting `root_pem`; returns the leaf the
/// server presented.
async fn presented_leaf(addr: SocketAddr, root_pem: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap())
        .unwrap();
    // Workload certificates carry only a SPIFFE URI SAN: a name check would fail, so
    // verify the chain with webpki and skip the name (what mesh peers do instead).
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(
            rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
                .build()
                .unwrap(),
        )))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio::time::timeout(
        LIMIT,
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("reviews.default").unwrap(), tcp),
    )
    .await
    .expect("handshake within the limit")
    .expect("handshake succeeds");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Verifies the chain to the roots, ignoring only a name mismatch.
#[derive(Debug)]
pub(crate) struct ChainOnly(pub(crate) Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[tokio::test]
async fn renewed_identities_reach_a_live_tls_server() {
    use proxystack::tls::LiveIdentity;
    common::init_tracing();
    let ca = TestCa::new("a");
    let state = CaState::new(ca.clone(), Duration::from_secs(3600));
    let server = CaServer::start(localhost(), state.clone()).await;
    let client = client(server.addr, &ca).build().unwrap();
    // The renewer would renew only after 30 min: drive renewals by hand, through a watch
    // channel of the same type the renewer publishes on.
    let first = Arc::new(client.fetch().await.unwrap());
    let (tx, rx) = tokio::sync::watch::channel(Some(first.clone()));
    let identity = LiveIdentity::builder()
        .expect_identity(reviews())
        .build(first.credentials())
        .unwrap();
    let following = identity.follow(rx);

    // A TLS server whose certificate comes from the live identity.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(identity.clone()));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(localhost()).await.unwrap();
    let tls_addr = listener.local_addr().unwrap();
    let tls_server = tokio::spawn(async move {
        // Bounded: one handshake per client below.
        for _ in 0..3 {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        }
    });
    assert_eq!(
        presented_leaf(tls_addr, &ca.root_pem).await,
        first.chain[0].to_vec()
    );

    // The CA rotates to a new root and issues a renewal; it is published.
    let new_ca = TestCa::new("b");
    *state.ca.lock().unwrap() = new_ca.clone();
    let second = Arc::new(client.fetch().await.unwrap());
    assert_ne!(second.chain[0], first.chain[0]);
    let mut applied = identity.subscribe();
    tx.send(Some(second.clone())).unwrap();
    tokio::time::timeout(LIMIT, applied.wait_for(|s| s.generation() == 2))
        .await
        .expect("applied within the limit")
        .unwrap();
    // A new client, trusting the new root, sees the new certificate.
    assert_eq!(
        presented_leaf(tls_addr, &new_ca.root_pem).await,
        second.chain[0].to_vec()
    );

    // A withdrawal (expired without a successor) cannot un-set it: the renewed one stays.
    tx.send(None).unwrap(); // a withdrawal keeps the material in use
    assert_eq!(
        presented_leaf(tls_addr, &new_ca.root_pem).await,
        second.chain[0].to_vec()
    );
    assert_eq!(identity.generation(), 2);

    drop(following);
    tokio::time::timeout(LIMIT, tls_server)
        .await
        .expect("server done")
        .unwrap();
    server.stop().await;
}

/// Issue 17: `Renewer::publish_to` feeds each renewed identity into a `LiveIdentity`, so a TLS
/// server built on it presents the renewed certificate to the next client.
#[tokio::test]
async fn half_life_renewals_reach_a_live_tls_server() {
    use proxystack::tls::{
        LiveIdentity, PeerCertificates, ServerConfigBuilder, SniMode, TerminateLayer, TlsConnector,
    };
    use proxystack::{tcp, BoxIo, Conn, Target};
    use tower::{Layer, ServiceExt};

    common::init_tracing();
    let ca = TestCa::new("a");
    let state = CaState::new(ca.clone(), Duration::from_secs(6));
    let server = CaServer::start(localhost(), state.clone()).await;
    let renewer = Renewer::builder(client(server.addr, &ca).build().unwrap())
        .initial_backoff(Duration::from_millis(100))
        .spawn();
    let mut rx = renewer.subscribe();
    let first = wait_for(&mut rx, Option::is_some).await.unwrap();
    let live = LiveIdentity::new(first.credentials()).unwrap();
    let feed = renewer.publish_to(&live);

    let config = ServerConfigBuilder::new().build_live(&live).unwrap();
    let done = tower::service_fn(|_: Conn<BoxIo>| async { Ok::<_, std::convert::Infallible>(()) });
    let tls = common::start(
        proxystack::Server::new(),
        TerminateLayer::live(config).layer(done),
    )
    .await;
    let presented = |roots| {
        TlsConnector::new(tcp::TcpConnector::new(), roots)
            .sni(SniMode::None)
            .expect_identities([reviews()])
            .oneshot(Target::from(tls.addr))
    };
    let conn = presented(first.root_store()).await.unwrap();
    assert_eq!(conn.get::<PeerCertificates>().unwrap().0[0], first.chain[0]);

    let second = wait_for(&mut rx, |c| matches!(c, Some(c) if !Arc::ptr_eq(c, &first)))
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || live.current().cert().chain[0]
            == second.chain[0])
        .await,
        "the renewed certificate never reached the live identity"
    );
    let conn = presented(second.root_store()).await.unwrap();
    assert_eq!(
        conn.get::<PeerCertificates>().unwrap().0[0],
        second.chain[0]
    );
    drop(feed);
    renewer.stop().await;
    server.stop().await;
}
