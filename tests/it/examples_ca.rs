//! The mesh examples with `[identity] ca = …` (issue 17 item 3): the sidecar binary gets its
//! certificate from the real tonic CA of `istio_ca.rs`, presents it on its HBONE port,
//! serves tunnels with it and renews it (the CA issues 6 s certificates). A bad
//! `[identity]` combination exits non-zero naming the problem.
#![cfg(all(
    unix,
    feature = "istio-ca",
    feature = "hbone",
    feature = "demo-certs",
    feature = "metrics"
))]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proxystack::hbone::{self, HboneTarget};
use proxystack::identity::SpiffeId;
use proxystack::tls::CertKey;
use proxystack::Authority;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tower::ServiceExt;

use crate::examples_common::{
    echo_app, metric, ping, run_to_exit_within, Example, TempFiles, EXIT, IO,
};
use crate::istio_ca::{reviews, CaServer, CaState, ChainOnly, TestCa, CA_NAME};

/// Lifetime of the certificates the test CA issues: the sidecar renews at about half.
const LIFETIME: Duration = Duration::from_secs(6);
const TOKEN: &str = "mesh-token";

/// A client workload certificate signed by the test CA.
fn client_cert(ca: &TestCa, id: &SpiffeId) -> CertKey {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    CertKey {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

fn roots(ca: &TestCa) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.root_pem.as_bytes()).unwrap())
        .unwrap();
    Arc::new(roots)
}

/// An mTLS handshake with `addr` as `client`, verifying the server's chain to the test
/// CA's root (not its name: workload certificates carry only a SPIFFE URI SAN); the leaf
/// the server presented.
async fn presented_leaf(addr: SocketAddr, ca: &TestCa, client: &CertKey) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca), provider.clone())
            .build()
            .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
        .with_client_auth_cert(client.chain.clone(), client.key.clone_key())
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio::time::timeout(
        IO,
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("reviews.default").unwrap(), tcp),
    )
    .await
    .expect("handshake within the limit")
    .expect("the sidecar's certificate chains to the CA's root");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// An HBONE tunnel to `app` through the sidecar's `inbound` port, pinning the sidecar's
/// identity to `reviews`; checks that bytes come back.
async fn echo_through(connector: &hbone::Connector, inbound: SocketAddr, app: SocketAddr) {
    let target = HboneTarget::new(
        inbound,
        Authority::parse(&app.to_string()).unwrap(),
        [reviews()],
    )
    .into_target();
    let t = tokio::time::timeout(IO, connector.clone().oneshot(target))
        .await
        .expect("tunnel within the limit")
        .expect("tunnel opens");
    ping(t.boxed()).await;
}

/// One sample of an unlabelled metric (blocking scrape, off the runtime's worker).
fn scrape(admin: SocketAddr, name: &str) -> Option<f64> {
    tokio::task::block_in_place(|| metric(admin, name))
        .first()
        .map(|(_, v)| *v)
}

// Multi-threaded: the CA server runs on this runtime while the test blocks on the
// example's output and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_identity_from_the_istio_ca_is_served_and_renewed() {
    crate::common::init_tracing();
    let ca = TestCa::new("mesh");
    let state = CaState::new(ca.clone(), LIFETIME);
    *state.required_auth.lock().unwrap() = Some(format!("Bearer {TOKEN}"));
    let server = CaServer::start(([127, 0, 0, 1], 0).into(), state.clone()).await;

    let mut files = TempFiles::default();
    let root_file = files.add("ca-root.pem", &ca.root_pem);
    let token = files.add("istio-token", &format!("{TOKEN}\n"));
    let config = format!(
        "[identity]\nca = \"{}\"\nca_server_name = \"{CA_NAME}\"\nroots = {:?}\n\
         spiffe_id = \"{}\"\ntoken = {:?}\n\
         [outbound]\nlisten = \"127.0.0.1:0\"\n[inbound]\nlisten = \"127.0.0.1:0\"\n\
         app_ip = \"127.0.0.1\"\nallow = [\"spiffe://cluster.local/ns/default/*\"]\n",
        server.addr,
        root_file.display().to_string(),
        reviews(),
        token.display().to_string(),
    );
    let config = files.add("sidecar-ca.toml", &config);
    let cfg = config.to_string_lossy().into_owned();
    let args = ["--config", &cfg, "--admin", "127.0.0.1:0"];
    let Some(mut ex) = tokio::task::block_in_place(|| Example::start("sidecar", &args)) else {
        return;
    };
    let [_, inbound, admin] = tokio::task::block_in_place(|| ex.listening(3))[..] else {
        unreachable!()
    };
    assert!(state.issued.load(Ordering::SeqCst) >= 1);

    // The inbound HBONE port presents a certificate of the CA, for the requested identity.
    let client_id = SpiffeId::istio("cluster.local", "default", "client").unwrap();
    let client = client_cert(&ca, &client_id);
    let first = presented_leaf(inbound, &ca, &client).await;
    assert_eq!(
        proxystack::tls::spiffe_ids(&CertificateDer::from(first.clone())),
        vec![reviews()]
    );
    // A tunnel through it reaches the app.
    let app = echo_app();
    let connector = hbone::Connector::hbone(client.clone(), roots(&ca)).unwrap();
    echo_through(&connector, inbound, app).await;

    let expiry = "proxystack_identity_cert_expiry_timestamp_seconds";
    let changes = "proxystack_identity_changes_total";
    assert!(
        scrape(admin, expiry).is_some_and(|t| t > 0.0),
        "expiry metric"
    );
    let changes_at_start = scrape(admin, changes).expect("changes metric");

    // Renewal at about half of the 6 s lifetime: the change counter rises and new
    // handshakes get a new certificate. Bounded: 80 tries, 250 ms apart.
    let mut renewed = false;
    for _ in 0..80 {
        if scrape(admin, changes).is_some_and(|n| n > changes_at_start) {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(renewed, "no renewal applied; stderr:\n{}", ex.stderr());
    assert!(state.issued.load(Ordering::SeqCst) >= 2);
    let second = presented_leaf(inbound, &ca, &client).await;
    assert_ne!(first, second, "the renewed certificate is served");
    assert_eq!(
        proxystack::tls::spiffe_ids(&CertificateDer::from(second)),
        vec![reviews()]
    );
    assert!(scrape(admin, expiry).is_some_and(|t| t > 0.0));
    echo_through(&connector, inbound, app).await;

    tokio::task::block_in_place(|| ex.stop());
    server.stop().await;
}

/// Runs the sidecar with `config` and expects a prompt non-zero exit; its stderr.
fn refused(config: &str) -> Option<String> {
    refused_within(config, EXIT)
}

/// Runs the sidecar with `config` and expects a non-zero exit within `limit`; its stderr.
fn refused_within(config: &str, limit: Duration) -> Option<String> {
    let mut files = TempFiles::default();
    let path = files.add("sidecar-bad-identity.toml", config);
    let path = path.to_string_lossy();
    let (status, stderr) = run_to_exit_within("sidecar", &["--config", &path], limit)?;
    assert!(
        !status.success(),
        "exit 0 for:\n{config}\nstderr:\n{stderr}"
    );
    Some(stderr)
}

#[test]
fn bad_identity_combinations_exit_naming_the_problem() {
    let rest = "[outbound]\nlisten = \"127.0.0.1:0\"\n[inbound]\nlisten = \"127.0.0.1:0\"\napp_ip = \"127.0.0.1\"\n";
    let id = "spiffe_id = \"spiffe://cluster.local/ns/default/sa/reviews\"\n";
    for (identity, expected) in [
        (
            format!(
                "cert = \"c.pem\"\nkey = \"k.pem\"\nca = \"127.0.0.1:15012\"\n{id}roots = \"r.pem\"\n"
            ),
            "give either cert + key or ca + spiffe_id, not both",
        ),
        (
            "ca = \"127.0.0.1:15012\"\nroots = \"r.pem\"\n".to_owned(),
            "ca without spiffe_id",
        ),
        (
            "cert = \"c.pem\"\nroots = \"r.pem\"\n".to_owned(),
            "cert without key",
        ),
        (
            "cert = \"c.pem\"\nkey = \"k.pem\"\ntoken = \"t\"\nroots = \"r.pem\"\n".to_owned(),
            "token and ca_server_name go with ca",
        ),
        (
            "roots = \"r.pem\"\n".to_owned(),
            "give cert + key (files) or ca + spiffe_id",
        ),
        (
            "ca = \"127.0.0.1:15012\"\nspiffe_id = \"not-spiffe\"\nroots = \"r.pem\"\n".to_owned(),
            "spiffe_id \"not-spiffe\"",
        ),
    ] {
        let config = format!("[identity]\n{identity}{rest}");
        let Some(stderr) = refused(&config) else {
            return;
        };
        assert!(
            stderr.contains(expected),
            "expected {expected:?} for:\n{config}\nstderr:\n{stderr}"
        );
    }
}

/// A CA that refuses the token: no first certificate, so the sidecar exits (after its
/// 30 s wait) naming the CA and its answer instead of listening without an identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_exits_naming_the_ca_when_it_refuses() {
    crate::common::init_tracing();
    let ca = TestCa::new("refusing");
    let state = CaState::new(ca.clone(), LIFETIME);
    *state.required_auth.lock().unwrap() = Some("Bearer another-token".to_owned());
    let server = CaServer::start(([127, 0, 0, 1], 0).into(), state.clone()).await;
    let mut files = TempFiles::default();
    let root_file = files.add("ca-root.pem", &ca.root_pem);
    let token = files.add("istio-token", TOKEN);
    let config = format!(
        "[identity]\nca = \"{}\"\nca_server_name = \"{CA_NAME}\"\nroots = {:?}\n\
         spiffe_id = \"{}\"\ntoken = {:?}\n\
         [outbound]\nlisten = \"127.0.0.1:0\"\n[inbound]\nlisten = \"127.0.0.1:0\"\n\
         app_ip = \"127.0.0.1\"\n",
        server.addr,
        root_file.display().to_string(),
        reviews(),
        token.display().to_string(),
    );
    let stderr = tokio::task::block_in_place(|| refused_within(&config, Duration::from_secs(60)));
    if let Some(stderr) = stderr {
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.contains(&format!("ca = \"{}\"", server.addr))
                && last.contains("no certificate for spiffe://cluster.local/ns/default/sa/reviews")
                && last.contains("Unauthenticated"),
            "{stderr}"
        );
        assert_eq!(state.issued.load(Ordering::SeqCst), 0);
    }
    server.stop().await;
}
