//! HBONE: mutual TLS + HTTP/2 CONNECT composed from the levels, with ztunnel's rules.
#![cfg(all(feature = "hbone", feature = "demo-certs"))]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use http::StatusCode;
use proxystack::conn::Metadata;
use proxystack::connect::{TunnelError, TunnelInfo};
use proxystack::hbone::{self, HboneHeaders, HboneTarget, Inbound};
use proxystack::identity::{PeerIdentity, SpiffeId};
use proxystack::tls::demo::DemoCa;
use proxystack::tls::{PeekLayer, PeekedHello};
use proxystack::{tcp, Authority, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::istio(TD, ns, sa).unwrap()
}

/// What the server side saw of the last tunnel: client identity, headers, authority.
type LastTunnel = (Option<PeerIdentity>, Option<HboneHeaders>, String);

#[derive(Default, Clone)]
struct Seen {
    dials: Arc<AtomicUsize>,
    last: Arc<Mutex<Option<LastTunnel>>>,
}

/// An HBONE server in front of `app`: tunnels go to `app`'s port on 127.0.0.1.
async fn hbone_server(
    ca: &DemoCa,
    app: SocketAddr,
    configure: impl FnOnce(Inbound) -> Inbound,
) -> (Running, Seen) {
    let seen = Seen::default();
    let s = seen.clone();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
        s.dials.fetch_add(1, Ordering::SeqCst);
        let info = c.get::<TunnelInfo>()?;
        let identity = proxystack::connect::lookup::<PeerIdentity>(c).cloned();
        *s.last.lock().unwrap() = Some((
            identity,
            c.get::<HboneHeaders>().cloned(),
            info.authority.to_string(),
        ));
        // Only the port comes from the peer: never dial the authority's IP (ztunnel's rule).
        Some(Target::from((app.ip(), info.authority.port())))
    });
    let inbound = configure(Inbound::new(
        ca.workload_cert("default", "server"),
        ca.roots(),
    ))
    .service(relay)
    .unwrap();
    (start(Server::new(), inbound).await, seen)
}

fn client(ca: &DemoCa) -> hbone::Connector {
    hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots()).unwrap()
}

fn target(server: SocketAddr, app: SocketAddr) -> Target {
    HboneTarget::new(
        server,
        Authority::from(SocketAddr::new(server.ip(), app.port())),
        [id("default", "server")],
    )
    .source_identity(id("default", "client"))
    .forwarded_for("10.1.2.3:4567".parse().unwrap())
    .baggage("k8s.namespace.name=default,service.name=client")
    .into_target()
}

async fn echo_on(tunnel: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), msg: &[u8]) -> Vec<u8> {
    tunnel.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tunnel.read_exact(&mut got).await.unwrap();
    got
}

#[tokio::test]
async fn tunnel_round_trip_with_identities_and_headers() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let (server, seen) = hbone_server(&ca, app, |i| i).await;
    let connector = client(&ca);
    let mut t = connector
        .clone()
        .oneshot(target(server.addr, app))
        .await
        .unwrap();
    assert_eq!(echo_on(&mut t, b"hello hbone").await, b"hello hbone");
    // Half-close travels as END_STREAM and the echo closes back.
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    // Client side: the server's identity.
    assert_eq!(t.get::<PeerIdentity>().unwrap().0, id("default", "server"));
    // Server side: the client's identity and its headers.
    let (identity, headers, authority) = seen.last.lock().unwrap().clone().unwrap();
    assert_eq!(identity.unwrap().0, id("default", "client"));
    let headers = headers.unwrap();
    assert_eq!(
        headers.forwarded_for,
        Some("10.1.2.3:4567".parse().unwrap())
    );
    assert!(headers.traceparent.is_some());
    assert_eq!(
        headers.baggage[0],
        ("k8s.namespace.name".into(), "default".into())
    );
    assert_eq!(authority, format!("127.0.0.1:{}", app.port()));
}

#[tokio::test]
async fn tunnels_share_pooled_connections() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let (server, _) = hbone_server(&ca, app, |i| i).await;
    let connector = client(&ca);
    let tunnels: Vec<_> = (0..200)
        .map(|i| {
            let (c, t) = (connector.clone(), target(server.addr, app));
            tokio::spawn(async move {
                let mut tunnel = c.oneshot(t).await.unwrap();
                let msg = format!("#{i}");
                assert_eq!(echo_on(&mut tunnel, msg.as_bytes()).await, msg.as_bytes());
                tunnel
            })
        })
        .collect();
    let mut open = Vec::new();
    for t in tunnels {
        open.push(t.await.unwrap());
    }
    // 200 tunnels at the default cap of 100 per connection: two TLS handshakes.
    assert_eq!(server.stats.accepted.load(Ordering::Relaxed), 2);
    assert_eq!(connector.connections_dialled(), 2);
}

async fn refused_status(connector: hbone::Connector, target: Target) -> Option<StatusCode> {
    match connector.oneshot(target).await {
        Err(TunnelError::Refused { status, .. }) => Some(status),
        Err(e) => panic!("expected a status, got {e:?}"),
        Ok(_) => None,
    }
}

#[tokio::test]
async fn server_rules_answer_like_ztunnel() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let (server, seen) = hbone_server(&ca, app, |i| {
        i.allow(|req| {
            let client = proxystack::connect::lookup::<PeerIdentity>(req.connection);
            client.is_some_and(|c| c.0.istio_parts() != Some(("default", "blocked")))
        })
    })
    .await;
    let at = |authority: &str| {
        HboneTarget::new(
            server.addr,
            Authority::parse(authority).unwrap(),
            [id("default", "server")],
        )
        .into_target()
    };
    // Authority IP other than the address dialled → 400.
    assert_eq!(
        refused_status(client(&ca), at(&format!("127.0.0.2:{}", app.port()))).await,
        Some(StatusCode::BAD_REQUEST)
    );
    // A proxy port → 503.
    assert_eq!(
        refused_status(client(&ca), at("127.0.0.1:15008")).await,
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    // Nothing listening → 503 after the dial.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_eq!(
        refused_status(client(&ca), at(&format!("127.0.0.1:{dead}"))).await,
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    let dials_before = seen.dials.load(Ordering::SeqCst);
    // Policy denies this client → 401 and no dial.
    let blocked =
        hbone::Connector::hbone(ca.workload_cert("default", "blocked"), ca.roots()).unwrap();
    assert_eq!(
        refused_status(blocked, at(&format!("127.0.0.1:{}", app.port()))).await,
        Some(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        seen.dials.load(Ordering::SeqCst),
        dials_before,
        "denied tunnel dialled"
    );
    // And a good tunnel still works.
    let mut ok = client(&ca)
        .oneshot(at(&format!("127.0.0.1:{}", app.port())))
        .await
        .unwrap();
    assert_eq!(echo_on(&mut ok, b"ok").await, b"ok");
}

#[tokio::test]
async fn non_connect_is_400_over_real_hbone_tls() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let (server, _) = hbone_server(&ca, app, |i| i).await;
    // A raw HTTP/2 client over the HBONE TLS settings, sending GET.
    let tls = proxystack::tls::TlsConnector::new(tcp::TcpConnector::new(), ca.roots())
        .client_cert(ca.workload_cert("default", "client"))
        .unwrap()
        .alpn(["h2"])
        .sni(proxystack::tls::SniMode::None)
        .expect_identities([id("default", "server")]);
    let conn = tls.oneshot(Target::from(server.addr)).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(conn).await.unwrap();
    tokio::spawn(connection);
    let req = http::Request::builder()
        .method("GET")
        .uri(format!("https://127.0.0.1:{}/", app.port()))
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn clients_without_mesh_certificates_are_rejected() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let (server, seen) = hbone_server(&ca, app, |i| i).await;
    let t = || target(server.addr, app);
    // Another CA (foreign root).
    let foreign = DemoCa::new(TD);
    let err = hbone::Connector::hbone(foreign.workload_cert("default", "client"), ca.roots())
        .unwrap()
        .oneshot(t())
        .await;
    assert!(err.is_err());
    // Same CA, other trust domain.
    let other_td = ca
        .spiffe_cert(&SpiffeId::parse("spiffe://other.local/ns/default/sa/client").unwrap())
        .unwrap();
    let err = hbone::Connector::hbone(other_td, ca.roots())
        .unwrap()
        .oneshot(t())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TunnelError::PeerClosed(_) | TunnelError::Handshake { .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("client certificate"), "{err}");
    // Server identity not the expected one: the client refuses.
    let wrong = HboneTarget::new(
        server.addr,
        Authority::from(app),
        [id("default", "someone-else")],
    )
    .into_target();
    let err = client(&ca).oneshot(wrong).await.unwrap_err();
    assert!(format!("{err:?}").contains("someone-else"), "{err:?}");
    assert_eq!(seen.dials.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn double_hbone_through_a_gateway_that_cannot_read_the_inner_tunnel() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    // The destination: an HBONE server in front of the app.
    let (dest, dest_seen) = hbone_server(&ca, app, |i| i.check_local_ip(false)).await;
    // The gateway terminates only the outer tunnel and relays its bytes — still TLS — to
    // the destination's HBONE port. A PeekLayer proves what it sees is a TLS ClientHello.
    let peeked = Arc::new(AtomicUsize::new(0));
    let p = peeked.clone();
    let forward = ServiceBuilder::new().layer(PeekLayer::new()).service(
        tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
            if c.get::<PeekedHello>().is_some() {
                p.fetch_add(1, Ordering::SeqCst);
            }
            Some(Target::from(dest.addr))
        }),
    );
    let gateway_inbound = Inbound::new(ca.workload_cert("istio-system", "gateway"), ca.roots())
        .check_local_ip(false)
        .service(forward)
        .unwrap();
    let gateway = start(Server::new(), gateway_inbound).await;

    let outer = client(&ca);
    let double = hbone::double(
        outer.clone(),
        ca.workload_cert("default", "client"),
        ca.roots(),
    )
    .unwrap();
    let service =
        Authority::parse(&format!("reviews.default.svc.cluster.local:{}", app.port())).unwrap();
    // Issue 19 item 7 and issue 18: the inner request says which network the client is in,
    // and carries the caller's trace context rather than a new one.
    let trace = proxystack::hbone::TraceParent::parse(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    .unwrap();
    let target = HboneTarget::new(dest.addr, service, [id("default", "server")])
        .via(gateway.addr, [id("istio-system", "gateway")])
        .network("network-a")
        .traceparent(trace)
        .into_target();
    let mut t = double.clone().oneshot(target.clone()).await.unwrap();
    assert_eq!(echo_on(&mut t, b"inner bytes").await, b"inner bytes");
    assert_eq!(
        peeked.load(Ordering::SeqCst),
        1,
        "the gateway saw a TLS ClientHello, not plaintext"
    );
    // The inner TLS session is end to end: the client sees the destination's identity.
    assert_eq!(t.get::<PeerIdentity>().unwrap().0, id("default", "server"));
    let (client_id, headers, authority) = dest_seen.last.lock().unwrap().clone().unwrap();
    assert_eq!(client_id.unwrap().0, id("default", "client"));
    assert!(authority.starts_with("reviews.default.svc.cluster.local:"));
    let headers = headers.unwrap();
    assert_eq!(headers.forwarded_network.as_deref(), Some("network-a"));
    assert_eq!(headers.traceparent, Some(trace));
    // A second double tunnel reuses the pooled outer connection to the gateway.
    let mut t2 = double.oneshot(target).await.unwrap();
    assert_eq!(echo_on(&mut t2, b"again").await, b"again");
    assert_eq!(outer.connections_dialled(), 1);
    assert_eq!(gateway.stats.accepted.load(Ordering::Relaxed), 1);
    let _ = Duration::ZERO;
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// RFC 9113 §8.5: a plain CONNECT carries no `:scheme` or `:path`. One that does is
/// malformed: the stream is reset or answered 400, and nothing is dialled.
#[tokio::test]
async fn connect_with_scheme_and_path_is_rejected() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let (server, seen) = hbone_server(&ca, app, |i| i).await;
    let tls = proxystack::tls::TlsConnector::new(tcp::TcpConnector::new(), ca.roots())
        .client_cert(ca.workload_cert("default", "client"))
        .unwrap()
        .alpn(["h2"])
        .sni(proxystack::tls::SniMode::None)
        .expect_identities([id("default", "server")]);
    let mut conn = tls.oneshot(Target::from(server.addr)).await.unwrap();
    let authority = format!("127.0.0.1:{}", app.port());
    let block = hpack_literals(&[
        (":method", "CONNECT"),
        (":scheme", "https"),
        (":path", "/"),
        (":authority", &authority),
    ]);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS, stream 1
    conn.write_all(&out).await.unwrap();
    // Read frames until stream 1 is answered (HEADERS) or reset (RST_STREAM), or GOAWAY.
    let verdict = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut head = [0u8; 9];
            conn.read_exact(&mut head).await.unwrap();
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            match (head[3], stream) {
                (0x1, 1) => return format!("HEADERS {payload:02x?}"),
                (0x3, 1) => return "RST_STREAM".to_string(),
                (0x7, _) => return "GOAWAY".to_string(),
                _ => continue,
            }
        }
    })
    .await
    .expect("the server answered");
    // A 400 response starts with the HPACK static-table index for `:status 400` (0x8c).
    assert!(
        verdict == "RST_STREAM" || verdict == "GOAWAY" || verdict.starts_with("HEADERS [8c"),
        "{verdict}"
    );
    assert_eq!(
        seen.dials.load(Ordering::SeqCst),
        0,
        "a malformed CONNECT must not dial"
    );
}

/// A TLS connection to an HBONE server with the client's mesh certificate, for raw HTTP/2.
async fn hbone_tls_to(ca: &DemoCa, server: SocketAddr) -> proxystack::Conn<impl proxystack::Io> {
    let tls = proxystack::tls::TlsConnector::new(tcp::TcpConnector::new(), ca.roots())
        .client_cert(ca.workload_cert("default", "client"))
        .unwrap()
        .alpn(["h2"])
        .sni(proxystack::tls::SniMode::None)
        .expect_identities([id("default", "server")]);
    tls.oneshot(Target::from(server)).await.unwrap()
}

/// The server's SETTINGS and connection window are ztunnel's (REFERENCE §2.10), read as raw
/// frames: MAX_CONCURRENT_STREAMS 200, INITIAL_WINDOW_SIZE 4 MiB, MAX_FRAME_SIZE 1 MiB,
/// MAX_HEADER_LIST_SIZE 64 KiB, then a WINDOW_UPDATE raising the connection window to 16 MiB.
#[tokio::test]
async fn server_advertises_ztunnels_settings_on_the_wire() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let (server, _) = hbone_server(&ca, app, |i| i).await;
    let mut io = hbone_tls_to(&ca, server.addr).await;
    io.write_all(H2_PREFACE).await.unwrap();
    io.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
    let (mut settings, mut window_update) = (None, None);
    while settings.is_none() || window_update.is_none() {
        let f = tokio::time::timeout(Duration::from_secs(5), read_h2_frame(&mut io))
            .await
            .unwrap()
            .expect("the server closed before its SETTINGS");
        match (f.kind, f.stream) {
            (4, 0) if f.flags & 1 == 0 => settings = Some(h2_settings(&f.payload)),
            (8, 0) => {
                let p = &f.payload;
                window_update = Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff);
            }
            _ => {}
        }
    }
    let settings = settings.unwrap();
    let value = |id: u16| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
    assert_eq!(
        value(0x3),
        Some(200),
        "MAX_CONCURRENT_STREAMS in {settings:?}"
    );
    assert_eq!(
        value(0x4),
        Some(4 << 20),
        "INITIAL_WINDOW_SIZE in {settings:?}"
    );
    assert_eq!(value(0x5), Some(1 << 20), "MAX_FRAME_SIZE in {settings:?}");
    assert_eq!(
        value(0x6),
        Some(64 << 10),
        "MAX_HEADER_LIST_SIZE in {settings:?}"
    );
    assert_eq!(value(0x8), None, "extended CONNECT is off by default");
    assert_eq!(
        65_535 + window_update.unwrap(),
        16 << 20,
        "connection window"
    );
}

/// The same settings as the h2 crate, as a client, sees them: the peer's stream limit, and
/// a stream that may send exactly 4 MiB before a WINDOW_UPDATE (the stream window, within a
/// connection window larger than the default 64 KiB).
#[tokio::test]
async fn server_settings_as_an_h2_client_sees_them() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let (server, _) = hbone_server(&ca, app, |i| i).await;
    let io = hbone_tls_to(&ca, server.addr).await;
    let (h2, connection) = h2::client::Builder::new()
        .max_send_buffer_size(16 << 20)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("127.0.0.1:{}", app.port()))
        .body(())
        .unwrap();
    let (response, mut send) = h2.send_request(req, false).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    // The SETTINGS frame came before the response.
    assert_eq!(h2.current_max_send_streams(), 200);
    send.reserve_capacity(8 << 20);
    let capacity = tokio::time::timeout(Duration::from_secs(5), async {
        while send.capacity() < 4 << 20 {
            std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
        }
        send.capacity()
    })
    .await
    .expect("the stream window must open to 4 MiB");
    assert_eq!(capacity, 4 << 20, "INITIAL_WINDOW_SIZE");
}

/// An application reset travels back over HBONE as RST_STREAM(CONNECT_ERROR) and reaches
/// the client as a reset (ztunnel turns it into a FIN, #1483).
#[tokio::test]
async fn app_reset_reaches_the_hbone_client_as_a_reset() {
    let ca = DemoCa::new(TD);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let (server, _) = hbone_server(&ca, app, |i| i).await;
    let mut t = client(&ca).oneshot(target(server.addr, app)).await.unwrap();
    let mut buf = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut buf))
        .await
        .expect("the tunnel must end")
        .expect_err("a reset is not EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
}

#[tokio::test]
async fn wildcard_listener_checks_the_address_the_client_dialled() {
    // ztunnel listens on 0.0.0.0:15008; the local-IP rule must compare the authority with
    // the address this connection arrived on, not with the listener's 0.0.0.0.
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
        Some(Target::from((
            app.ip(),
            c.get::<TunnelInfo>()?.authority.port(),
        )))
    });
    let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
        .service(relay)
        .unwrap();
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_signal, watch) = proxystack::drain::channel();
    tokio::spawn(async move { Server::new().serve(listener, inbound, watch).await });
    let dialled: SocketAddr = ([127, 0, 0, 1], port).into();
    let at = |ip: &str| {
        HboneTarget::new(
            dialled,
            Authority::parse(&format!("{ip}:{}", app.port())).unwrap(),
            [id("default", "server")],
        )
        .into_target()
    };
    let mut t = client(&ca).oneshot(at("127.0.0.1")).await.unwrap();
    assert_eq!(echo_on(&mut t, b"via 0.0.0.0").await, b"via 0.0.0.0");
    assert_eq!(
        refused_status(client(&ca), at("127.0.0.2")).await,
        Some(StatusCode::BAD_REQUEST)
    );
}

// ---- Rotation (issue 17 item 1) ----

use proxystack::tls::{Credentials, LiveIdentity, PeerCertificates};

/// Sends `rounds` distinct 16 KiB chunks through an echo tunnel and checks each exactly.
async fn flows(tunnel: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), rounds: u8) {
    for round in 0..rounds {
        let chunk: Vec<u8> = (0..16 * 1024u32)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(round))
            .collect();
        assert_eq!(echo_on(tunnel, &chunk).await, chunk, "round {round}");
    }
}

#[tokio::test]
async fn pooled_connection_stops_taking_tunnels_after_client_rotation() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    // The client certificate each tunnel arrived with, as the server saw it.
    let presented: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let p = presented.clone();
    let (server, _) = hbone_server(&ca, app, move |i| {
        i.allow(move |req| {
            let cert = req.connection.get::<PeerCertificates>().unwrap().0[0].to_vec();
            p.lock().unwrap().push(cert);
            true
        })
    })
    .await;
    let first = ca.workload_cert("default", "client");
    let identity = LiveIdentity::builder()
        .expect_identity(id("default", "client"))
        .build(Credentials::new(first.clone(), [ca.root()]))
        .unwrap();
    let connector = hbone::Connector::hbone_live(identity.clone());
    let open = || connector.clone().oneshot(target(server.addr, app));

    let mut old1 = open().await.unwrap();
    let mut old2 = open().await.unwrap();
    flows(&mut old1, 1).await;
    flows(&mut old2, 1).await;
    assert_eq!(connector.connections_dialled(), 1);

    let second = ca.workload_cert("default", "client");
    identity.set_cert(second.clone()).unwrap();

    // The next tunnel does not join the old connection: a new one presents the new cert.
    let mut new1 = open().await.unwrap();
    let mut new2 = open().await.unwrap();
    flows(&mut new1, 1).await;
    flows(&mut new2, 1).await;
    assert_eq!(connector.connections_dialled(), 2);
    assert_eq!(server.stats.accepted.load(Ordering::Relaxed), 2);
    let seen = presented.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            first.chain[0].to_vec(),
            first.chain[0].to_vec(),
            second.chain[0].to_vec(),
            second.chain[0].to_vec()
        ]
    );
    // Tunnels on the old connection keep flowing, byte-exact, while it drains.
    flows(&mut old1, 8).await;
    flows(&mut old2, 2).await;
    // Once they end, the old connection closes (the pool let go of it at the next checkout).
    drop((old1, old2));
    let mut new3 = open().await.unwrap();
    flows(&mut new3, 1).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            server.stats.active.load(Ordering::Relaxed) == 1
        })
        .await,
        "the drained connection stayed open"
    );
    assert_eq!(connector.connections_dialled(), 2);
}

#[tokio::test]
async fn inbound_rotates_its_certificate_and_cuts_a_revoked_client() {
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let server_first = ca.workload_cert("default", "server");
    let identity = LiveIdentity::new(Credentials::new(server_first.clone(), [ca.root()])).unwrap();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
        let info = c.get::<TunnelInfo>()?;
        Some(Target::from((app.ip(), info.authority.port())))
    });
    let inbound = Inbound::live(identity.clone()).service(relay).unwrap();
    let server = start(Server::new(), inbound).await;
    let server_cert = |t: &proxystack::Conn<_>| t.get::<PeerCertificates>().unwrap().0[0].to_vec();

    let doomed_cert = ca.workload_cert("default", "doomed");
    let doomed = hbone::Connector::hbone(doomed_cert.clone(), ca.roots()).unwrap();
    let mut before = doomed.oneshot(target(server.addr, app)).await.unwrap();
    assert_eq!(server_cert(&before), server_first.chain[0].to_vec());
    flows(&mut before, 1).await;

    let server_second = ca.workload_cert("default", "server");
    identity.set_cert(server_second.clone()).unwrap();
    let fine = client(&ca);
    let mut after = fine
        .clone()
        .oneshot(target(server.addr, app))
        .await
        .unwrap();
    assert_eq!(server_cert(&after), server_second.chain[0].to_vec());
    flows(&mut after, 1).await;
    // The tunnel opened before the rotation is untouched by it.
    flows(&mut before, 4).await;

    // Revoking the first client's certificate closes its connection and tunnel.
    identity
        .set_crls([ca.crl(&[&doomed_cert]).unwrap()])
        .unwrap();
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), before.read(&mut buf)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "revoked client's tunnel still open: {ended:?}"
    );
    flows(&mut after, 2).await;
}

/// Issue 15 item 4: `hbone::InboundLayer` composes in a `ServiceBuilder` over a layer that
/// sees every tunnel (with its `HboneHeaders`), serves real HBONE, and the CONNECT knobs
/// set on `Inbound` (here the nesting depth) reach the terminator.
#[tokio::test]
async fn inbound_layer_composes_in_service_builder() {
    use proxystack::io::BoxIo;
    use proxystack::Conn;

    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let inbound = |depth: u8| {
        let s = s.clone();
        ServiceBuilder::new()
            .layer(
                Inbound::new(ca.workload_cert("default", "server"), ca.roots())
                    .h2(proxystack::H2Config::new().max_concurrent_streams(16))
                    .max_depth(depth)
                    .into_layer()
                    .unwrap(),
            )
            .layer(tower::util::MapRequestLayer::new(
                move |conn: Conn<BoxIo>| {
                    let forwarded = conn.get::<HboneHeaders>().and_then(|h| h.forwarded_for);
                    s.lock().unwrap().push(forwarded);
                    conn
                },
            ))
            .service(
                tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
                    let port = c.get::<TunnelInfo>()?.authority.port();
                    Some(Target::from((app.ip(), port)))
                }),
            )
    };
    let server = start(Server::new(), inbound(4)).await;
    let mut t = client(&ca).oneshot(target(server.addr, app)).await.unwrap();
    assert_eq!(echo_on(&mut t, b"layered hbone").await, b"layered hbone");
    drop(t);
    assert_eq!(
        *seen.lock().unwrap(),
        [Some("10.1.2.3:4567".parse().unwrap())]
    );

    // Depth 0 admits no tunnel at all: 508 from the terminator, the inner layers see nothing.
    let shallow = start(Server::new(), inbound(0)).await;
    assert_eq!(
        refused_status(client(&ca), target(shallow.addr, app)).await,
        Some(StatusCode::LOOP_DETECTED)
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    server.shutdown().await;
    shallow.shutdown().await;
}
