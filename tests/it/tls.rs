//! TLS level: terminate, originate, peek, mTLS identities — real handshakes on loopback,
//! plus openssl s_client and curl where installed.
#![cfg(all(feature = "tls", feature = "demo-certs"))]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use proxystack::conn::Metadata;
use proxystack::identity::{PeerIdentity, SpiffeId};
use proxystack::tls::demo::DemoCa;
use proxystack::tls::{
    Alpn, ClientAuth, ExpectedIdentities, OfferedAlpn, PeekLayer, ServerConfigBuilder, SniMode,
    TerminateLayer, TlsConnector, TlsError, UnknownSni,
};
use proxystack::{tcp, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};

type Meta = http::Extensions;

/// Serves TLS termination with `config`, echoing plaintext and reporting metadata.
async fn terminating_server(
    config: Arc<rustls::ServerConfig>,
) -> (Running, mpsc::UnboundedReceiver<Meta>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let svc = ServiceBuilder::new()
        .layer(TerminateLayer::new(config).handshake_timeout(Duration::from_secs(2)))
        .service(capture(tx));
    (start(Server::new(), svc).await, rx)
}

async fn echo_once<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    io: &mut I,
    msg: &[u8],
) -> Vec<u8> {
    io.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    io.read_exact(&mut got).await.unwrap();
    got
}

fn client(ca: &DemoCa) -> TlsConnector<tcp::TcpConnector> {
    TlsConnector::new(tcp::TcpConnector::new(), ca.roots())
        .handshake_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn terminate_selects_certificate_by_sni_and_negotiates_alpn() {
    let ca = DemoCa::new("example.org");
    let config = ServerConfigBuilder::new()
        .cert_for("a.example.com", ca.server_cert(&["a.example.com"]))
        .cert_for(
            "*.wild.example.com",
            ca.server_cert(&["*.wild.example.com"]),
        )
        .default_cert(ca.server_cert(&["default.example.com"]))
        .alpn(["h2", "http/1.1"])
        .build()
        .unwrap();
    let (server, mut meta) = terminating_server(config).await;
    for name in ["a.example.com", "x.wild.example.com"] {
        let connector = client(&ca)
            .sni(SniMode::Fixed(name.into()))
            .alpn(["http/1.1"]);
        let mut conn = connector.oneshot(Target::from(server.addr)).await.unwrap();
        assert_eq!(echo_once(&mut conn, b"ping").await, b"ping");
        assert_eq!(conn.get::<Alpn>().unwrap().0, b"http/1.1");
        let m = meta.recv().await.unwrap();
        assert_eq!(m.get::<proxystack::tls::Sni>().unwrap().0, name);
        assert_eq!(m.get::<Alpn>().unwrap().0, b"http/1.1");
        assert!(m.get::<proxystack::tls::TlsInfo>().is_some());
    }
    // A name the default certificate does not cover fails verification on the client.
    let err = client(&ca)
        .sni(SniMode::Fixed("unknown.example.com".into()))
        .oneshot(Target::from(server.addr))
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
}

#[tokio::test]
async fn unknown_sni_can_be_refused() {
    let ca = DemoCa::new("example.org");
    let config = ServerConfigBuilder::new()
        .cert_for("a.example.com", ca.server_cert(&["a.example.com"]))
        .default_cert(ca.server_cert(&["a.example.com"]))
        .unknown_sni(UnknownSni::Refuse)
        .build()
        .unwrap();
    let (server, _meta) = terminating_server(config).await;
    let err = client(&ca)
        .sni(SniMode::Fixed("other.example.com".into()))
        .oneshot(Target::from(server.addr))
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
    // The server still serves the next good client.
    let mut ok = client(&ca)
        .sni(SniMode::Fixed("a.example.com".into()))
        .oneshot(Target::from(server.addr))
        .await
        .unwrap();
    assert_eq!(echo_once(&mut ok, b"x").await, b"x");
}

fn mtls_server_config(ca: &DemoCa) -> Arc<rustls::ServerConfig> {
    ServerConfigBuilder::new()
        .default_cert(ca.workload_cert("default", "server"))
        .client_auth(ClientAuth::Required(ca.roots()))
        .trust_domains([ca.trust_domain()])
        .tls13_only()
        .alpn(["h2"])
        .build()
        .unwrap()
}

fn server_id(ca: &DemoCa) -> SpiffeId {
    SpiffeId::istio(ca.trust_domain(), "default", "server").unwrap()
}

/// TLS 1.3 servers reject a client certificate after the client's handshake finished, so
/// the client learns it on its first read.
async fn rejected(connector: TlsConnector<tcp::TcpConnector>, addr: SocketAddr) -> bool {
    match connector.oneshot(Target::from(addr)).await {
        Err(_) => true,
        Ok(mut conn) => {
            let _ = conn.write_all(b"hello").await;
            let mut buf = [0u8; 5];
            !matches!(
                tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await,
                Ok(Ok(5))
            )
        }
    }
}

#[tokio::test]
async fn mtls_accepts_mesh_identity_and_records_it() {
    let ca = DemoCa::new("cluster.local");
    let (server, mut meta) = terminating_server(mtls_server_config(&ca)).await;
    let connector = client(&ca)
        .client_cert(ca.workload_cert("ns1", "client"))
        .unwrap()
        .sni(SniMode::None)
        .alpn(["h2"])
        .expect_identities([server_id(&ca)]);
    let mut conn = connector.oneshot(Target::from(server.addr)).await.unwrap();
    assert_eq!(echo_once(&mut conn, b"mtls").await, b"mtls");
    // The client sees the server's identity…
    assert_eq!(conn.get::<PeerIdentity>().unwrap().0, server_id(&ca));
    // …and the server the client's.
    let m = meta.recv().await.unwrap();
    assert_eq!(
        m.get::<PeerIdentity>().unwrap().0.as_str(),
        "spiffe://cluster.local/ns/ns1/sa/client"
    );
    assert!(
        m.get::<proxystack::tls::Sni>().is_none(),
        "HBONE-style clients send no SNI"
    );
}

#[tokio::test]
async fn mtls_rejects_bad_client_certificates() {
    let ca = DemoCa::new("cluster.local");
    let (server, _meta) = terminating_server(mtls_server_config(&ca)).await;
    let base = || {
        client(&ca)
            .sni(SniMode::None)
            .expect_identities([server_id(&ca)])
    };

    // No client certificate.
    assert!(
        rejected(base(), server.addr).await,
        "no client cert accepted"
    );
    // Certificate from a foreign root.
    let foreign = DemoCa::new("cluster.local");
    assert!(
        rejected(
            base()
                .client_cert(foreign.workload_cert("ns1", "client"))
                .unwrap(),
            server.addr
        )
        .await
    );
    // Right root, wrong trust domain.
    let wrong_td = ca
        .spiffe_cert(&SpiffeId::parse("spiffe://evil.local/ns/ns1/sa/client").unwrap())
        .unwrap();
    assert!(rejected(base().client_cert(wrong_td).unwrap(), server.addr).await);
    // Expired.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/ns1/sa/client"
            .try_into()
            .unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let expired = ca.issue(params).unwrap();
    assert!(rejected(base().client_cert(expired).unwrap(), server.addr).await);
    // URI SAN that is not SPIFFE.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "https://cluster.local/x".try_into().unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    assert!(
        rejected(
            base().client_cert(ca.issue(params).unwrap()).unwrap(),
            server.addr
        )
        .await
    );

    // And a good client still gets through afterwards.
    let good = base()
        .client_cert(ca.workload_cert("ns1", "client"))
        .unwrap();
    let mut conn = good.oneshot(Target::from(server.addr)).await.unwrap();
    assert_eq!(echo_once(&mut conn, b"ok").await, b"ok");
}

#[tokio::test]
async fn connector_pins_server_identity() {
    let ca = DemoCa::new("cluster.local");
    let (server, _meta) = terminating_server(mtls_server_config(&ca)).await;
    let wrong = SpiffeId::istio("cluster.local", "default", "someone-else").unwrap();
    let connector = client(&ca)
        .client_cert(ca.workload_cert("ns1", "client"))
        .unwrap()
        .sni(SniMode::None);
    let err = connector
        .clone()
        .oneshot(Target::from(server.addr).with(ExpectedIdentities(vec![wrong])))
        .await
        .unwrap_err();
    let chain = format!("{:?}", err);
    assert!(
        chain.contains("someone-else") && chain.contains("ns/default/sa/server"),
        "{chain}"
    );
    // The same connector with the right per-target expectation succeeds.
    let mut ok = connector
        .oneshot(Target::from(server.addr).with(ExpectedIdentities(vec![server_id(&ca)])))
        .await
        .unwrap();
    assert_eq!(echo_once(&mut ok, b"pinned").await, b"pinned");
}

/// A TLS backend that answers plaintext `pong` to whatever it reads, for passthrough tests.
async fn tls_backend(ca: &DemoCa, name: &str) -> SocketAddr {
    let config = ServerConfigBuilder::new()
        .default_cert(ca.server_cert(&[name]))
        .build()
        .unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let svc = ServiceBuilder::new()
        .layer(TerminateLayer::new(config))
        .service(capture(tx));
    let running = start(Server::new(), svc).await;
    let addr = running.addr;
    std::mem::forget(running); // lives for the test process
    addr
}

#[tokio::test]
async fn peek_routes_by_sni_and_keeps_tls_end_to_end() {
    let ca = DemoCa::new("example.org");
    let backend_a = tls_backend(&ca, "a.example.com").await;
    let backend_b = tls_backend(&ca, "b.example.com").await;
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
        match c.get::<proxystack::tls::Sni>()?.0.as_str() {
            "a.example.com" => Some(Target::from(backend_a)),
            "b.example.com" => Some(Target::from(backend_b)),
            _ => None,
        }
    });
    let svc = ServiceBuilder::new().layer(PeekLayer::new()).service(relay);
    let proxy = start(Server::new(), svc).await;
    for name in ["a.example.com", "b.example.com"] {
        // The client verifies the *backend's* certificate: the proxy never terminated.
        let mut conn = client(&ca)
            .sni(SniMode::Fixed(name.into()))
            .oneshot(Target::from(proxy.addr))
            .await
            .unwrap();
        assert_eq!(echo_once(&mut conn, name.as_bytes()).await, name.as_bytes());
    }
    // Unknown SNI: no upstream, closed.
    assert!(client(&ca)
        .sni(SniMode::Fixed("c.example.com".into()))
        .oneshot(Target::from(proxy.addr))
        .await
        .is_err());
}

#[tokio::test]
async fn peek_records_offered_alpn_and_sends_non_tls_to_fallback() {
    let (tx, mut meta) = mpsc::unbounded_channel();
    let (ftx, mut fallback_meta) = mpsc::unbounded_channel();
    let svc = ServiceBuilder::new()
        .layer(
            PeekLayer::new()
                .timeout(Duration::from_millis(300))
                .fallback(capture(ftx)),
        )
        .service(capture(tx));
    let proxy = start(Server::new(), svc).await;

    // TLS: metadata recorded, bytes replayed (the capture echoes the raw hello back).
    let ca = DemoCa::new("example.org");
    let connector = client(&ca)
        .sni(SniMode::Fixed("x.example.com".into()))
        .alpn(["h2", "http/1.1"]);
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        connector.oneshot(Target::from(proxy.addr)),
    )
    .await;
    let m = meta.recv().await.unwrap();
    assert_eq!(m.get::<proxystack::tls::Sni>().unwrap().0, "x.example.com");
    assert_eq!(
        m.get::<OfferedAlpn>().unwrap().0,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );

    // Not TLS: the fallback gets every byte.
    assert_eq!(
        round_trip(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await,
        b"GET / HTTP/1.1\r\n\r\n"
    );
    fallback_meta.recv().await.unwrap();

    // Server-first protocol: the client says nothing; after the timeout the fallback runs
    // and can speak first.
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fallback_meta.recv().await.unwrap();
    silent.write_all(b"late").await.unwrap();
    let mut buf = [0u8; 4];
    silent.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"late");
}

#[tokio::test]
async fn peek_closes_malformed_and_oversized_hellos() {
    let (tx, mut meta) = mpsc::unbounded_channel();
    let svc = ServiceBuilder::new()
        .layer(PeekLayer::new().max_len(1024))
        .service(capture(tx));
    let proxy = start(Server::new(), svc).await;
    // A handshake record claiming a 64 KiB hello.
    let oversized = [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xfc];
    // A handshake record followed by garbage.
    let garbage = [0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0xff, 0xff, 0xff, 0xff];
    for input in [&oversized[..], &garbage[..]] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(input).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .unwrap();
        assert!(r.is_err() || buf.is_empty(), "expected a close");
    }
    assert!(
        meta.try_recv().is_err(),
        "nothing reached the inner service"
    );
}

// ---- real clients ----

fn have(bin: &str) -> bool {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .is_ok()
        || std::process::Command::new(bin)
            .arg("version")
            .output()
            .is_ok()
}

/// A TLS-terminating proxy in front of a minimal HTTP/1.1 responder.
async fn https_proxy(ca: &DemoCa) -> Running {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    )
                    .await;
            });
        }
    });
    let config = ServerConfigBuilder::new()
        .cert_for("a.example.com", ca.server_cert(&["a.example.com"]))
        .default_cert(ca.server_cert(&["localhost"]))
        .alpn(["h2", "http/1.1"])
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(TerminateLayer::new(config))
        .service(
            tcp::Relay::new(tcp::TcpConnector::new())
                .upstream(move |_: &Metadata| Some(Target::from(backend_addr))),
        );
    start(Server::new(), svc).await
}

#[tokio::test]
async fn curl_through_terminate() {
    if !have("curl") {
        println!("SKIPPED: curl not installed");
        return;
    }
    let ca = DemoCa::new("example.org");
    let proxy = https_proxy(&ca).await;
    let dir = std::env::temp_dir().join(format!("proxystack-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.root_pem()).unwrap();
    let port = proxy.addr.port();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "10", "--cacert"])
        .arg(&ca_file)
        .args([
            "--resolve",
            &format!("a.example.com:{port}:127.0.0.1"),
            &format!("https://a.example.com:{port}/"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"ok\n");
}

#[tokio::test]
async fn openssl_s_client_negotiates_alpn_and_sni() {
    if !have("openssl") {
        println!("SKIPPED: openssl not installed");
        return;
    }
    let ca = DemoCa::new("example.org");
    let proxy = https_proxy(&ca).await;
    let ca_file =
        std::env::temp_dir().join(format!("proxystack-tls-ossl-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.root_pem()).unwrap();
    for (alpn, want) in [
        ("h2", "ALPN protocol: h2"),
        ("http/1.1", "ALPN protocol: http/1.1"),
    ] {
        let mut child = tokio::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &proxy.addr.to_string(),
                "-servername",
                "a.example.com",
                "-alpn",
                alpn,
            ])
            .args(["-verify_hostname", "a.example.com", "-CAfile"])
            .arg(&ca_file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdin.take()); // EOF: s_client exits after the handshake
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(want), "{text}");
        // The certificate chosen by SNI verifies for that name.
        assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    }
}

#[tokio::test]
async fn openssl_s_client_through_peek_passthrough() {
    if !have("openssl") {
        println!("SKIPPED: openssl not installed");
        return;
    }
    let ca = DemoCa::new("example.org");
    let backend = tls_backend(&ca, "a.example.com").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
        let _ = tx.send(c.get::<proxystack::tls::Sni>().map(|s| s.0.clone()));
        Some(Target::from(backend))
    });
    let proxy = start(
        Server::new(),
        ServiceBuilder::new().layer(PeekLayer::new()).service(relay),
    )
    .await;
    let mut child = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &proxy.addr.to_string(),
            "-servername",
            "a.example.com",
            "-quiet",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"through the tunnel\n").await.unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = vec![0u8; 19];
    tokio::time::timeout(Duration::from_secs(10), stdout.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"through the tunnel\n");
    assert_eq!(rx.recv().await.unwrap().as_deref(), Some("a.example.com"));
    drop(stdin);
    let _ = child.kill().await;
}

/// Issue 14 item 7: a ClientHello without SNI is an unknown name. With
/// `UnknownSni::Refuse` it is refused (rustls sends `access_denied`; the inner service
/// never runs) instead of getting the default certificate and then naming any Host.
/// rustls sends no SNI to an IP target; openssl's `-noservername` sends none either.
/// `UseDefault` still serves the default certificate.
#[tokio::test]
async fn missing_sni_is_refused_where_unknown_names_are() {
    let ca = DemoCa::new("example.org");
    let build = |policy| {
        ServerConfigBuilder::new()
            .cert_for("a.example.com", ca.server_cert(&["a.example.com"]))
            .default_cert(ca.server_cert(&["127.0.0.1"]))
            .unknown_sni(policy)
            .build()
            .unwrap()
    };
    let (server, mut meta) = terminating_server(build(UnknownSni::Refuse)).await;
    let err = client(&ca)
        .oneshot(Target::from(server.addr))
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
    assert!(
        err.to_string().contains("AccessDenied") || format!("{err:?}").contains("AccessDenied"),
        "{err:?}"
    );
    if have("openssl") {
        let mut child = tokio::process::Command::new("openssl")
            .args(["s_client", "-connect", &server.addr.to_string()])
            .arg("-noservername")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdin.take());
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("access denied"), "{text}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"),
            "no certificate is served"
        );
    } else {
        println!("SKIPPED the openssl part: openssl not installed");
    }
    // The refused hellos never reached the inner service; a named client still works.
    let mut ok = client(&ca)
        .sni(SniMode::Fixed("a.example.com".into()))
        .oneshot(Target::from(server.addr))
        .await
        .unwrap();
    assert_eq!(echo_once(&mut ok, b"x").await, b"x");
    let m = meta.recv().await.unwrap();
    assert_eq!(m.get::<proxystack::tls::Sni>().unwrap().0, "a.example.com");

    // UseDefault: a client without SNI gets the default certificate (its IP SAN verifies).
    let (server, mut meta) = terminating_server(build(UnknownSni::UseDefault)).await;
    let mut conn = client(&ca)
        .oneshot(Target::from(server.addr))
        .await
        .unwrap();
    assert_eq!(echo_once(&mut conn, b"no sni").await, b"no sni");
    assert!(meta
        .recv()
        .await
        .unwrap()
        .get::<proxystack::tls::Sni>()
        .is_none());
}

// ---- Rotation: a LiveIdentity behind TerminateLayer::live (issue 17 item 1) ----

use proxystack::tls::{
    CertKey, Credentials, IdentityError, IdentityFiles, LiveIdentity, PeerCertificates,
};

/// A terminating echo server whose material follows `identity`.
async fn live_server(
    builder: ServerConfigBuilder,
    identity: &LiveIdentity,
) -> (Running, mpsc::UnboundedReceiver<Meta>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let layer = TerminateLayer::live(builder.build_live(identity).unwrap())
        .handshake_timeout(Duration::from_secs(2));
    let svc = ServiceBuilder::new().layer(layer).service(capture(tx));
    (start(Server::new(), svc).await, rx)
}

/// The end-entity certificate the server presented on `conn`.
fn served_cert<I>(conn: &proxystack::Conn<I>) -> Vec<u8> {
    conn.get::<PeerCertificates>().unwrap().0[0].to_vec()
}

/// Sends `rounds` distinct 16 KiB chunks through an echo and checks each comes back exactly.
async fn flows<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(io: &mut I, rounds: u8) {
    for round in 0..rounds {
        let chunk: Vec<u8> = (0..16 * 1024u32)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(round))
            .collect();
        assert_eq!(echo_once(io, &chunk).await, chunk, "round {round}");
    }
}

/// An open session's read ends (EOF or error) within a bound: the server closed it.
async fn cut<I: tokio::io::AsyncRead + Unpin>(io: &mut I) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn localhost_client(ca: &DemoCa) -> TlsConnector<tcp::TcpConnector> {
    client(ca).sni(SniMode::Fixed("localhost".into()))
}

#[tokio::test]
async fn rotated_certificate_serves_new_clients_while_an_open_session_flows() {
    let ca = DemoCa::new("example.org");
    let first = ca.server_cert(&["localhost"]);
    let identity = LiveIdentity::new(Credentials::new(first.clone(), [ca.root()])).unwrap();
    let (server, _meta) = live_server(ServerConfigBuilder::new(), &identity).await;

    let mut before = localhost_client(&ca)
        .oneshot(Target::from(server.addr))
        .await
        .unwrap();
    assert_eq!(served_cert(&before), first.chain[0].to_vec());
    flows(&mut before, 2).await;

    let second = ca.server_cert(&["localhost"]);
    assert_eq!(identity.set_cert(second.clone()).unwrap(), 2);

    let mut after = localhost_client(&ca)
        .oneshot(Target::from(server.addr))
        .await
        .unwrap();
    assert_eq!(served_cert(&after), second.chain[0].to_vec());
    flows(&mut after, 2).await;
    // The session opened before the rotation keeps its keys and flows byte-exact.
    flows(&mut before, 8).await;
    assert_eq!(served_cert(&before), first.chain[0].to_vec());
}

#[tokio::test]
async fn broken_certificate_is_refused_and_the_old_one_serves_on() {
    init_tracing();
    let ca = DemoCa::new("cluster.local");
    let me = server_id(&ca);
    let good = ca.workload_cert("default", "server");
    let identity = LiveIdentity::builder()
        .expect_identity(me.clone())
        .build(Credentials::new(good.clone(), [ca.root()]))
        .unwrap();
    let (server, _meta) = live_server(ServerConfigBuilder::new(), &identity).await;

    // A key from another certificate.
    let other = ca.workload_cert("default", "server");
    let mismatched = CertKey {
        chain: good.chain.clone(),
        key: other.key.clone_key(),
    };
    assert!(matches!(
        identity.set_cert(mismatched),
        Err(IdentityError::KeyMismatch)
    ));
    // Not a certificate at all.
    let garbage = CertKey {
        chain: vec![vec![0x30, 0x03, 0x02, 0x01, 0x00].into()],
        key: good.key.clone_key(),
    };
    assert!(matches!(
        identity.set_cert(garbage),
        Err(IdentityError::Unparsable(_))
    ));
    // Expired, with the right identity.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(me.as_str().try_into().unwrap())];
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let expired = ca.issue(params).unwrap();
    let refused = identity.set_cert(expired).unwrap_err();
    assert!(
        matches!(refused, IdentityError::Expired { .. }),
        "{refused}"
    );
    // Valid, but someone else's identity.
    let refused = identity
        .set_cert(ca.workload_cert("default", "intruder"))
        .unwrap_err();
    assert!(
        refused.to_string().contains("sa/intruder"),
        "the error names what was presented: {refused}"
    );
    // No roots.
    assert!(matches!(
        identity.set(Credentials::new(ca.workload_cert("default", "server"), [])),
        Err(IdentityError::NoRoots)
    ));

    // Nothing applied: the first certificate still serves.
    assert_eq!(identity.generation(), 1);
    let mut conn = client(&ca)
        .sni(SniMode::None)
        .expect_identities([me])
        .oneshot(Target::from(server.addr))
        .await
        .unwrap();
    assert_eq!(served_cert(&conn), good.chain[0].to_vec());
    flows(&mut conn, 1).await;
}

#[tokio::test]
async fn revoked_client_is_cut_when_the_revocation_list_changes() {
    init_tracing();
    let ca = DemoCa::new("cluster.local");
    let identity = LiveIdentity::new(Credentials::new(
        ca.workload_cert("default", "server"),
        [ca.root()],
    ))
    .unwrap();
    let builder = ServerConfigBuilder::new()
        .client_auth(ClientAuth::Required(ca.roots()))
        .trust_domains([ca.trust_domain()])
        .tls13_only();
    let (server, _meta) = live_server(builder, &identity).await;
    let mtls = |cert| {
        client(&ca)
            .sni(SniMode::None)
            .expect_identities([server_id(&ca)])
            .client_cert(cert)
            .unwrap()
    };
    let doomed = ca.workload_cert("ns1", "doomed");
    let fine = ca.workload_cert("ns1", "fine");
    let mut doomed_conn = mtls(doomed.clone())
        .oneshot(Target::from(server.addr))
        .await
        .unwrap();
    let mut fine_conn = mtls(fine.clone())
        .oneshot(Target::from(server.addr))
        .await
        .unwrap();
    flows(&mut doomed_conn, 1).await;
    flows(&mut fine_conn, 1).await;

    identity.set_crls([ca.crl(&[&doomed]).unwrap()]).unwrap();

    assert!(cut(&mut doomed_conn).await, "revoked peer still connected");
    // The other client is untouched, and the revoked one cannot come back.
    flows(&mut fine_conn, 2).await;
    assert!(rejected(mtls(doomed), server.addr).await);
    let mut again = mtls(fine).oneshot(Target::from(server.addr)).await.unwrap();
    flows(&mut again, 1).await;
}

/// A minimal PEM encoder (RFC 7468) for writing test files.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= n {
                b64.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Publishes cert, key and roots the way the kubelet updates a secret volume: a new
/// timestamped directory, then an atomic rename of the `..data` symlink onto it.
fn publish(dir: &std::path::Path, version: u32, cert: &CertKey, roots_pem: &str) {
    let data = dir.join(format!("..v{version}"));
    std::fs::create_dir(&data).unwrap();
    let chain: String = cert.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    std::fs::write(data.join("cert.pem"), chain).unwrap();
    std::fs::write(
        data.join("key.pem"),
        pem("PRIVATE KEY", cert.key.secret_der()),
    )
    .unwrap();
    std::fs::write(data.join("roots.pem"), roots_pem).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for name in ["cert.pem", "key.pem", "roots.pem"] {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

#[tokio::test]
async fn file_source_picks_up_an_atomic_replace_and_refuses_a_broken_one() {
    let ca = DemoCa::new("example.org");
    let dir = tempfile::tempdir().unwrap();
    let first = ca.server_cert(&["localhost"]);
    publish(dir.path(), 1, &first, ca.root_pem());
    let files = IdentityFiles::new(
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("roots.pem"),
    )
    .poll_interval(Duration::from_millis(20));
    let identity = LiveIdentity::new(files.load().unwrap()).unwrap();
    let _watch = files.watch(&identity);
    let (server, _meta) = live_server(ServerConfigBuilder::new(), &identity).await;
    let connect = || localhost_client(&ca).oneshot(Target::from(server.addr));

    let mut before = connect().await.unwrap();
    assert_eq!(served_cert(&before), first.chain[0].to_vec());

    let second = ca.server_cert(&["localhost"]);
    publish(dir.path(), 2, &second, ca.root_pem());
    assert!(
        eventually(Duration::from_secs(10), || identity.generation() == 2).await,
        "the replaced files were not picked up"
    );
    let after = connect().await.unwrap();
    assert_eq!(served_cert(&after), second.chain[0].to_vec());
    flows(&mut before, 2).await;

    // A broken update (a certificate with the previous key) is refused; the second stays.
    let third = ca.server_cert(&["localhost"]);
    let broken = CertKey {
        chain: third.chain.clone(),
        key: second.key.clone_key(),
    };
    publish(dir.path(), 3, &broken, ca.root_pem());
    // Then a good one: applied, which shows the broken one was read and passed over.
    let fourth = ca.server_cert(&["localhost"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(identity.generation(), 2, "the broken files were applied");
    assert_eq!(
        served_cert(&connect().await.unwrap()),
        second.chain[0].to_vec()
    );
    publish(dir.path(), 4, &fourth, ca.root_pem());
    assert!(eventually(Duration::from_secs(10), || identity.generation() == 3).await);
    assert_eq!(
        served_cert(&connect().await.unwrap()),
        fourth.chain[0].to_vec()
    );
}

#[tokio::test]
async fn client_trusts_a_rotated_root_at_the_next_handshake() {
    let old_ca = DemoCa::new("example.org");
    let new_ca = DemoCa::new("example.org");
    // The server already presents a certificate from the new root.
    let (server, _meta) = terminating_server(
        ServerConfigBuilder::new()
            .default_cert(new_ca.server_cert(&["localhost"]))
            .build()
            .unwrap(),
    )
    .await;
    let me = LiveIdentity::new(Credentials::new(
        old_ca.server_cert(&["client.example.org"]),
        [old_ca.root()],
    ))
    .unwrap();
    let connector = TlsConnector::live(tcp::TcpConnector::new(), me.clone())
        .sni(SniMode::Fixed("localhost".into()))
        .handshake_timeout(Duration::from_secs(5));
    let refused = connector
        .clone()
        .oneshot(Target::from(server.addr))
        .await
        .unwrap_err();
    assert!(matches!(refused, TlsError::Handshake(_)), "{refused}");
    // Both roots during the rotation: the next handshake verifies.
    me.set_roots([old_ca.root(), new_ca.root()]).unwrap();
    let mut conn = connector.oneshot(Target::from(server.addr)).await.unwrap();
    flows(&mut conn, 1).await;
}

/// The server certificate `openssl s_client` received, as the PEM it prints.
async fn openssl_served_pem(addr: SocketAddr, ca_file: &std::path::Path) -> String {
    let mut child = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .args(["-verify_hostname", "localhost", "-CAfile"])
        .arg(ca_file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take()); // EOF: s_client exits after the handshake
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    text
}

#[tokio::test]
async fn openssl_s_client_sees_the_rotated_certificate() {
    if !have("openssl") {
        println!("SKIPPED: openssl not installed");
        return;
    }
    let ca = DemoCa::new("example.org");
    let first = ca.server_cert(&["localhost"]);
    let identity = LiveIdentity::new(Credentials::new(first.clone(), [ca.root()])).unwrap();
    let (server, _meta) = live_server(ServerConfigBuilder::new(), &identity).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.root_pem()).unwrap();

    let seen = openssl_served_pem(server.addr, &ca_file).await;
    assert!(
        seen.contains(&pem("CERTIFICATE", &first.chain[0])),
        "{seen}"
    );
    let second = ca.server_cert(&["localhost"]);
    identity.set_cert(second.clone()).unwrap();
    let seen = openssl_served_pem(server.addr, &ca_file).await;
    assert!(
        seen.contains(&pem("CERTIFICATE", &second.chain[0])),
        "{seen}"
    );
    assert!(!seen.contains(&pem("CERTIFICATE", &first.chain[0])));
}

#[tokio::test]
async fn file_source_reads_revocation_lists_and_refuses_an_empty_one() {
    let ca = DemoCa::new("cluster.local");
    let dir = tempfile::tempdir().unwrap();
    let me = ca.workload_cert("default", "server");
    publish(dir.path(), 1, &me, ca.root_pem());
    let crl = ca.crl(&[&ca.workload_cert("default", "gone")]).unwrap();
    std::fs::write(dir.path().join("crl.pem"), pem("X509 CRL", &crl)).unwrap();
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let files = |crl: &str| {
        IdentityFiles::new(
            dir.path().join("cert.pem"),
            dir.path().join("key.pem"),
            dir.path().join("roots.pem"),
        )
        .crls([dir.path().join(crl)])
    };
    let identity = LiveIdentity::new(files("crl.pem").load().unwrap()).unwrap();
    assert_eq!(identity.current().crls(), &[crl]);
    let refused = files("empty.pem").load().unwrap_err();
    assert!(matches!(refused, IdentityError::Pem { .. }), "{refused}");
}
