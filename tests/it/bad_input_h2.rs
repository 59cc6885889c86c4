//! HTTP/2 and HBONE bad inputs (REFERENCE.md §4.2 "HTTP/2 / HBONE", "Lifecycle /
//! resources" minus drain): malformed CONNECT requests and authorities, stream-lifecycle
//! abuse, frame floods with bounded memory, HBONE metadata headers, policy flips, certificate
//! rotation and head-of-line blocking on a pooled connection.
//!
//! Targets: `connect::ConnectTerminate` and `hbone::Inbound` (the HTTP/2 CONNECT path, `h2`
//! directly) and `http::HttpServer` (the hyper HTTP/2 path). Requests are hand-written frames
//! (`common::RawH2`) so that nothing a well-behaved client library would refuse to send is
//! out of reach. Each case asserts the exact answer (status, RST_STREAM or GOAWAY code, or
//! close), that nothing reached an upstream that should not have, and that the server still
//! serves the next good connection.
#![cfg(all(feature = "http", feature = "hbone", feature = "demo-certs"))]

use crate::common;
use crate::http_common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{
    h2_frame, h2f, hpack_int, hpack_literal, hpack_literals, start, RawH2, RssWatch,
};
use http::StatusCode;
use proxystack::admission::{Admission, Refusal};
use proxystack::conn::Metadata;
use proxystack::connect::{
    ConnectAuthority, ConnectTerminate, Decision, H2ConnectPool, TunnelInfo,
};
use proxystack::hbone::{self, HboneHeaders, HboneTarget, Inbound};
use proxystack::http::{Forward, HttpServer, Incoming};
use proxystack::identity::SpiffeId;
use proxystack::io::BoxIo;
use proxystack::tls::demo::DemoCa;
use proxystack::{tcp, Authority, Conn, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{service_fn, ServiceExt};

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(10);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::istio(TD, ns, sa).unwrap()
}

// ---------------------------------------------------------------------------------------
// A capturing upstream: records every byte and how each connection ended, echoes back.

#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    Open,
    Eof,
    Error(std::io::ErrorKind),
}

#[derive(Debug)]
struct Log {
    bytes: Vec<u8>,
    end: End,
}

#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Mutex<Log>>>>>,
}

impl Upstream {
    fn accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Bytes and end of the `i`th accepted connection.
    fn conn(&self, i: usize) -> (Vec<u8>, End) {
        let c = self.conns.lock().unwrap()[i].clone();
        let log = c.lock().unwrap();
        (log.bytes.clone(), log.end.clone())
    }

    fn all_bytes(&self) -> Vec<u8> {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .flat_map(|c| c.lock().unwrap().bytes.clone())
            .collect()
    }

    /// Waits until connection `i` has ended (or `WAIT`).
    async fn ended(&self, i: usize) -> (Vec<u8>, End) {
        for _ in 0..(WAIT.as_millis() / 20) {
            if self.accepted() > i {
                let (bytes, end) = self.conn(i);
                if end != End::Open {
                    return (bytes, end);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.conn(i)
    }
}

/// An echo upstream on `ip` that logs what it gets.
async fn capture_upstream_on(ip: [u8; 4]) -> Upstream {
    let listener = TcpListener::bind(SocketAddr::from((ip, 0))).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns: Arc<Mutex<Vec<Arc<Mutex<Log>>>>> = Arc::default();
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = Arc::new(Mutex::new(Log {
                bytes: Vec::new(),
                end: End::Open,
            }));
            c.lock().unwrap().push(log.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => {
                            log.lock().unwrap().end = End::Eof;
                            let _ = s.shutdown().await;
                            break;
                        }
                        Ok(n) => {
                            log.lock().unwrap().bytes.extend_from_slice(&buf[..n]);
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            log.lock().unwrap().end = End::Error(e.kind());
                            break;
                        }
                    }
                }
            });
        }
    });
    Upstream { addr, conns }
}

async fn capture_upstream() -> Upstream {
    capture_upstream_on([127, 0, 0, 1]).await
}

// ---------------------------------------------------------------------------------------
// Raw requests and verdicts.

/// What the server did with one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Status(u16),
    Reset(u32),
    GoAway(u32),
    Closed,
    Silent,
}

async fn verdict<I>(raw: &mut RawH2<I>, stream: u32) -> Verdict
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    raw.pump_until(WAIT, |s| {
        s.status.contains_key(&stream) || s.resets.contains_key(&stream) || s.goaway.is_some()
    })
    .await;
    let s = &raw.seen;
    if let Some(status) = s.status.get(&stream) {
        Verdict::Status(*status)
    } else if let Some(code) = s.resets.get(&stream) {
        Verdict::Reset(*code)
    } else if let Some((_, code)) = s.goaway {
        Verdict::GoAway(code)
    } else if s.closed {
        Verdict::Closed
    } else {
        Verdict::Silent
    }
}

fn headers(stream: u32, end_stream: bool, block: &[u8]) -> Vec<u8> {
    let flags = h2f::END_HEADERS | if end_stream { h2f::END_STREAM } else { 0 };
    h2_frame(h2f::HEADERS, flags, stream, block)
}

fn data(stream: u32, end_stream: bool, payload: &[u8]) -> Vec<u8> {
    let flags = if end_stream { h2f::END_STREAM } else { 0 };
    h2_frame(h2f::DATA, flags, stream, payload)
}

fn rst(stream: u32, code: u32) -> Vec<u8> {
    h2_frame(h2f::RST_STREAM, 0, stream, &code.to_be_bytes())
}

fn connect_block(authority: &str) -> Vec<u8> {
    hpack_literals(&[(":method", "CONNECT"), (":authority", authority)])
}

/// Waits until `stream` has received `n` DATA bytes.
async fn read_data<I>(raw: &mut RawH2<I>, stream: u32, n: usize) -> Vec<u8>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    raw.pump_until(WAIT, |s| s.data.get(&stream).map_or(0, Vec::len) >= n)
        .await;
    raw.seen.data.get(&stream).cloned().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// HBONE servers over real mutual TLS.

/// What the HBONE server's relay saw.
#[derive(Default, Clone)]
struct Seen {
    dials: Arc<AtomicUsize>,
    headers: Arc<Mutex<Vec<(HboneHeaders, http::HeaderMap)>>>,
}

/// The relay behind an HBONE server: IP authorities go to `app`'s IP at the authority's
/// port (never the authority IP, as ztunnel); host names go through `names` (name → port on
/// `app`'s IP), unknown names get no upstream.
fn hbone_relay(
    app: SocketAddr,
    names: HashMap<String, u16>,
    seen: Seen,
) -> tcp::Relay<tcp::TcpConnector, impl Fn(&Metadata) -> Option<Target> + Clone + Send + Sync> {
    tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
        let info = c.get::<TunnelInfo>()?;
        if let Some(h) = c.get::<HboneHeaders>() {
            seen.headers
                .lock()
                .unwrap()
                .push((h.clone(), info.headers.clone()));
        }
        let port = match info.authority.host() {
            proxystack::addr::Host::Ip(_) => info.authority.port(),
            proxystack::addr::Host::Name(n) => *names.get(n)?,
        };
        seen.dials.fetch_add(1, Ordering::SeqCst);
        Some(Target::from((app.ip(), port)))
    })
}

/// An HBONE server on `listener` in front of `app`.
async fn hbone_on(
    ca: &DemoCa,
    listener: TcpListener,
    app: SocketAddr,
    names: HashMap<String, u16>,
    configure: impl FnOnce(Inbound) -> Inbound,
) -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let inbound = configure(Inbound::new(
        ca.workload_cert("default", "server"),
        ca.roots(),
    ))
    .service(hbone_relay(app, names, seen.clone()))
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let (signal, watch) = proxystack::drain::channel();
    tokio::spawn(async move {
        let _keep = signal;
        Server::new().serve(listener, inbound, watch).await
    });
    (addr, seen)
}

async fn hbone_server(
    ca: &DemoCa,
    app: SocketAddr,
    configure: impl FnOnce(Inbound) -> Inbound,
) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    hbone_on(ca, listener, app, HashMap::new(), configure).await
}

/// A raw HTTP/2 connection to an HBONE server over mutual TLS with a mesh certificate.
async fn hbone_raw(
    ca: &DemoCa,
    server: SocketAddr,
) -> RawH2<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> {
    let tls = proxystack::tls::TlsConnector::new(tcp::TcpConnector::new(), ca.roots())
        .client_cert(ca.workload_cert("default", "client"))
        .unwrap()
        .alpn(["h2"])
        .sni(proxystack::tls::SniMode::None)
        .expect_identities([id("default", "server")]);
    let io = tls.oneshot(Target::from(server)).await.unwrap();
    RawH2::handshake(io, &[]).await
}

fn hbone_client(ca: &DemoCa) -> hbone::Connector {
    hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots()).unwrap()
}

fn hbone_target(server: SocketAddr, authority: &str) -> Target {
    HboneTarget::new(
        server,
        Authority::parse(authority).unwrap(),
        [id("default", "server")],
    )
    .into_target()
}

/// A good tunnel through the HBONE server still works.
async fn hbone_still_serves(ca: &DemoCa, server: SocketAddr, app: SocketAddr) {
    let mut t = hbone_client(ca)
        .oneshot(hbone_target(server, &format!("127.0.0.1:{}", app.port())))
        .await
        .unwrap();
    t.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    tokio::time::timeout(WAIT, t.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"still here");
}

// ---------------------------------------------------------------------------------------
// Plain CONNECT and HTTP servers.

fn relay_counting(
    to: SocketAddr,
    dials: Arc<AtomicUsize>,
) -> tcp::Relay<tcp::TcpConnector, impl Fn(&Metadata) -> Option<Target> + Clone + Send + Sync> {
    tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |_: &Metadata| {
        dials.fetch_add(1, Ordering::SeqCst);
        Some(Target::from(to))
    })
}

async fn connect_proxy(
    up: &Upstream,
    configure: impl FnOnce(ConnectTerminate) -> ConnectTerminate,
) -> (common::Running, Arc<AtomicUsize>) {
    let dials = Arc::new(AtomicUsize::new(0));
    let terminate = configure(ConnectTerminate::new(relay_counting(
        up.addr,
        dials.clone(),
    )));
    (start(Server::new(), terminate).await, dials)
}

/// A good tunnel through a plain CONNECT proxy still works (a new pooled connection).
async fn connect_still_serves(proxy: SocketAddr) {
    let target =
        Target::from(proxy).with(ConnectAuthority(Authority::parse("echo.test:7").unwrap()));
    let mut t = H2ConnectPool::new(tcp::TcpConnector::new())
        .oneshot(target)
        .await
        .unwrap();
    t.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    tokio::time::timeout(WAIT, t.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"still here");
}

async fn tcp_raw(addr: SocketAddr) -> RawH2<TcpStream> {
    RawH2::handshake(TcpStream::connect(addr).await.unwrap(), &[]).await
}

// =======================================================================================
// CONNECT request shapes and authorities (hbone::Inbound = ConnectTerminate + ztunnel rules)

/// Every malformed CONNECT request and authority of §4.2 against an HBONE server: the exact
/// answer, nothing dialled, and the server still serves. `[::ffff:127.0.0.1]` is the local
/// IPv4 address in IPv6 form: the local-IP rule compares canonical addresses, so it is
/// accepted as the local address (and, as always, only the port is used to dial).
#[tokio::test]
async fn hbone_malformed_connect_requests_and_authorities() {
    common::init_tracing();
    let ca = DemoCa::new(TD);
    let app = capture_upstream().await;
    let (server, seen) = hbone_server(&ca, app.addr, |i| i).await;
    let port = app.addr.port();
    let ok = format!("127.0.0.1:{port}");
    let cases: Vec<(&str, Vec<u8>, Verdict)> = vec![
        (
            "GET instead of CONNECT",
            hpack_literals(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", &ok),
            ]),
            Verdict::Status(400),
        ),
        (
            "CONNECT with :scheme and :path (RFC 9113 §8.5)",
            hpack_literals(&[
                (":method", "CONNECT"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", &ok),
            ]),
            Verdict::Reset(h2f::PROTOCOL_ERROR),
        ),
        (
            "CONNECT with :path only",
            hpack_literals(&[(":method", "CONNECT"), (":path", "/"), (":authority", &ok)]),
            Verdict::Reset(h2f::PROTOCOL_ERROR),
        ),
        (
            "CONNECT without :authority",
            hpack_literals(&[(":method", "CONNECT")]),
            Verdict::Status(400),
        ),
        (
            "authority without port",
            connect_block("127.0.0.1"),
            Verdict::Status(400),
        ),
        ("port 0", connect_block("127.0.0.1:0"), Verdict::Status(400)),
        (
            "port > 65535",
            connect_block("127.0.0.1:65536"),
            Verdict::Status(400),
        ),
        (
            "port with sign",
            connect_block("127.0.0.1:+80"),
            Verdict::Status(400),
        ),
        (
            "userinfo",
            connect_block(&format!("a@127.0.0.1:{port}")),
            Verdict::Status(400),
        ),
        (
            "userinfo a@b:1",
            connect_block("a@b:1"),
            Verdict::Status(400),
        ),
        (
            "unbracketed IPv6",
            connect_block(&format!("::1:{port}")),
            Verdict::Reset(h2f::PROTOCOL_ERROR),
        ),
        (
            "IPv6 zone id",
            connect_block(&format!("[fe80::1%25eth0]:{port}")),
            Verdict::Status(400),
        ),
        (
            "IPv4-mapped IPv6 of another address",
            connect_block(&format!("[::ffff:127.0.0.2]:{port}")),
            Verdict::Status(400),
        ),
        (
            "authority IP is not the local IP",
            connect_block(&format!("127.0.0.2:{port}")),
            Verdict::Status(400),
        ),
        (
            "numeric last label (resolver would read it as IPv4)",
            connect_block(&format!("127.1:{port}")),
            Verdict::Status(400),
        ),
        (
            "path in the authority",
            connect_block(&format!("127.0.0.1:{port}/x")),
            Verdict::Reset(h2f::PROTOCOL_ERROR),
        ),
        (
            "a proxy port (ILLEGAL_PORTS)",
            connect_block("127.0.0.1:15008"),
            Verdict::Status(503),
        ),
    ];
    for (name, block, want) in cases {
        let mut raw = hbone_raw(&ca, server).await;
        raw.send(&headers(1, false, &block)).await.unwrap();
        let got = verdict(&mut raw, 1).await;
        assert_eq!(got, want, "{name}");
        assert_eq!(seen.dials.load(Ordering::SeqCst), 0, "{name}: dialled");
        assert_eq!(app.accepted(), 0, "{name}: reached the app");
        // A refused stream does not take the connection down: a good CONNECT on the same
        // connection is answered 200.
        if !matches!(got, Verdict::GoAway(_) | Verdict::Closed) {
            raw.send(&headers(3, false, &connect_block(&ok)))
                .await
                .unwrap();
            assert_eq!(verdict(&mut raw, 3).await, Verdict::Status(200), "{name}");
            raw.send(&rst(3, h2f::CANCEL)).await.unwrap();
            seen.dials.store(0, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            app.conns.lock().unwrap().clear();
        }
    }

    // The IPv4-mapped form of the local address is the local address.
    let mut raw = hbone_raw(&ca, server).await;
    raw.send(&headers(
        1,
        false,
        &connect_block(&format!("[::ffff:127.0.0.1]:{port}")),
    ))
    .await
    .unwrap();
    assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
    raw.send(&data(1, false, b"mapped")).await.unwrap();
    assert_eq!(read_data(&mut raw, 1, 6).await, b"mapped");
    hbone_still_serves(&ca, server, app.addr).await;
}

/// Host-name authorities (ztunnel: service FQDN, resolved by the server; unknown → 503).
/// Here the inner service resolves: a `tcp::Relay` whose upstream function returns `None`
/// refuses with `Refusal::Unreachable`, which the terminator answers `502`; an inner
/// service that refuses with `Refusal::Refused` gets ztunnel's `503`. Either way nothing is
/// dialled.
#[tokio::test]
async fn hbone_host_name_authorities_known_and_unknown() {
    let ca = DemoCa::new(TD);
    let app = capture_upstream().await;
    let names = HashMap::from([(
        "reviews.default.svc.cluster.local".to_string(),
        app.addr.port(),
    )]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server, seen) = hbone_on(&ca, listener, app.addr, names, |i| i).await;
    let mut raw = hbone_raw(&ca, server).await;
    raw.send(&headers(
        1,
        false,
        &connect_block("reviews.default.svc.cluster.local:9080"),
    ))
    .await
    .unwrap();
    assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
    raw.send(&data(1, false, b"by name")).await.unwrap();
    assert_eq!(read_data(&mut raw, 1, 7).await, b"by name");
    assert_eq!(seen.dials.load(Ordering::SeqCst), 1);

    raw.send(&headers(
        3,
        false,
        &connect_block("unknown.default.svc:9080"),
    ))
    .await
    .unwrap();
    assert_eq!(verdict(&mut raw, 3).await, Verdict::Status(502));
    assert_eq!(seen.dials.load(Ordering::SeqCst), 1, "unknown name dialled");
    assert_eq!(app.accepted(), 1);

    // ztunnel's answer, from an inner service that says why it refuses.
    let relay = hbone_relay(app.addr, HashMap::new(), Seen::default());
    let resolving = service_fn(move |conn: Conn<BoxIo>| {
        let relay = relay.clone();
        async move {
            let known = conn
                .get::<TunnelInfo>()
                .is_some_and(|t| matches!(t.authority.host(), proxystack::addr::Host::Ip(_)));
            if !known {
                if let Some(a) = conn.get::<Admission>() {
                    a.refuse(Refusal::Refused);
                }
                return Ok(());
            }
            relay
                .oneshot(conn)
                .await
                .map_err(proxystack::BoxError::from)
        }
    });
    let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
        .service(resolving)
        .unwrap();
    let proxy = start(Server::new(), inbound).await;
    let mut raw = hbone_raw(&ca, proxy.addr).await;
    raw.send(&headers(
        1,
        false,
        &connect_block("unknown.default.svc:9080"),
    ))
    .await
    .unwrap();
    assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(503));
    assert_eq!(app.accepted(), 1);
    hbone_still_serves(&ca, server, app.addr).await;
}

/// A tunnel to the HBONE server's own port would loop through it: with that port in
/// `illegal_ports` it is refused with `503` (ztunnel's answer for its own ports) before
/// anything is dialled.
#[tokio::test]
async fn hbone_authority_port_equal_to_the_proxy_port_is_503() {
    let ca = DemoCa::new(TD);
    let app = capture_upstream().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let own = listener.local_addr().unwrap().port();
    let illegal: Vec<u16> = hbone::ILLEGAL_PORTS.iter().copied().chain([own]).collect();
    let (server, seen) = hbone_on(&ca, listener, app.addr, HashMap::new(), |i| {
        i.illegal_ports(illegal)
    })
    .await;
    for port in [own, 15001, 15006, 15008, 15080] {
        let mut raw = hbone_raw(&ca, server).await;
        raw.send(&headers(
            1,
            false,
            &connect_block(&format!("127.0.0.1:{port}")),
        ))
        .await
        .unwrap();
        assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(503), "{port}");
        // The refusal is a HEADERS frame with END_STREAM, as ztunnel sends errors.
        assert!(raw.seen.ended.contains(&1), "{port}");
    }
    assert_eq!(seen.dials.load(Ordering::SeqCst), 0);
    hbone_still_serves(&ca, server, app.addr).await;
}

/// Extended CONNECT (`:protocol`, RFC 8441) to a server that did not advertise
/// SETTINGS_ENABLE_CONNECT_PROTOCOL: a malformed request, reset with PROTOCOL_ERROR by the
/// codec; nothing is dialled.
#[tokio::test]
async fn extended_connect_when_not_advertised_is_reset() {
    let up = capture_upstream().await;
    let (proxy, dials) = connect_proxy(&up, |t| t).await;
    let mut raw = tcp_raw(proxy.addr).await;
    raw.pump_until(WAIT, |s| !s.settings.is_empty()).await;
    assert!(
        !raw.seen.settings.iter().any(|(id, _)| *id == 0x8),
        "SETTINGS_ENABLE_CONNECT_PROTOCOL advertised: {:?}",
        raw.seen.settings
    );
    let block = hpack_literals(&[
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "http"),
        (":path", "/chat"),
        (":authority", "chat.test:80"),
    ]);
    raw.send(&headers(1, false, &block)).await.unwrap();
    assert_eq!(
        verdict(&mut raw, 1).await,
        Verdict::Reset(h2f::PROTOCOL_ERROR)
    );
    // The connection survives the stream error.
    raw.send(&headers(3, false, &connect_block("echo.test:7")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 3).await, Verdict::Status(200));
    assert_eq!(
        dials.load(Ordering::SeqCst),
        1,
        "only the plain CONNECT dialled"
    );
    connect_still_serves(proxy.addr).await;
}

// =======================================================================================
// Stream lifecycle on the tunnel

/// A CONNECT proxy whose dials take `delay` (a slow upstream), so the client's frames
/// arrive before the `200`.
async fn slow_connect_proxy(
    up: &Upstream,
    delay: Duration,
    configure: impl FnOnce(ConnectTerminate) -> ConnectTerminate,
) -> (common::Running, Arc<AtomicUsize>) {
    let dials = Arc::new(AtomicUsize::new(0));
    let d = dials.clone();
    let to = up.addr;
    let slow = service_fn(move |t: Target| async move {
        tokio::time::sleep(delay).await;
        tcp::TcpConnector::new().oneshot(t).await
    });
    let relay = tcp::Relay::new(slow).upstream(move |_: &Metadata| {
        d.fetch_add(1, Ordering::SeqCst);
        Some(Target::from(to))
    });
    let terminate = configure(ConnectTerminate::new(relay));
    (start(Server::new(), terminate).await, dials)
}

/// DATA sent before the `200` (client early data, which RFC 9113 §8.5 does not allow and
/// ztunnel's client never sends): it is buffered by flow control, not lost and not
/// misrouted — once the upstream connected it receives the early bytes first, in order.
/// If the tunnel is refused instead, the early bytes go nowhere.
#[tokio::test]
async fn early_data_before_the_200_is_buffered_in_order_or_dropped_with_the_refusal() {
    let up = capture_upstream().await;
    let (proxy, dials) = slow_connect_proxy(&up, Duration::from_millis(300), |t| {
        t.policy(|req| {
            if req.authority.port() == 22 {
                Decision::Deny(StatusCode::FORBIDDEN)
            } else {
                Decision::Allow
            }
        })
    })
    .await;
    let mut raw = tcp_raw(proxy.addr).await;
    let mut burst = headers(1, false, &connect_block("echo.test:7"));
    burst.extend(data(1, false, b"early-1 "));
    burst.extend(data(1, false, b"early-2 "));
    raw.send(&burst).await.unwrap();
    assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
    assert!(
        raw.seen.data.get(&1).is_none_or(Vec::is_empty),
        "nothing before the upstream connected"
    );
    raw.send(&data(1, true, b"late")).await.unwrap();
    assert_eq!(read_data(&mut raw, 1, 20).await, b"early-1 early-2 late");
    let (bytes, end) = up.ended(0).await;
    assert_eq!(bytes, b"early-1 early-2 late");
    assert_eq!(end, End::Eof);
    raw.pump_until(WAIT, |s| s.ended.contains(&1)).await;
    assert!(
        raw.seen.ended.contains(&1),
        "the upstream's FIN ends the stream"
    );

    // Refused by policy: 403, and the early bytes reach no one.
    let mut burst = headers(3, false, &connect_block("echo.test:22"));
    burst.extend(data(3, false, b"secret"));
    raw.send(&burst).await.unwrap();
    assert_eq!(verdict(&mut raw, 3).await, Verdict::Status(403));
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert_eq!(up.accepted(), 1);
    assert!(!up.all_bytes().windows(6).any(|w| w == b"secret"));
    connect_still_serves(proxy.addr).await;
}

/// HEADERS on the tunnel stream after the `200` (nghttp2#2849). Trailers (with END_STREAM)
/// end the client's direction like a FIN; the other direction keeps working. A second
/// HEADERS without END_STREAM is malformed (RFC 9113 §8.1): the codec resets the stream
/// with PROTOCOL_ERROR, and the upstream connection ends (FIN, the H2 side read a clean
/// end of data before the reset; or reset) — nothing after it is delivered.
#[tokio::test]
async fn headers_after_the_200_on_the_tunnel_stream() {
    let up = capture_upstream().await;
    let (proxy, _) = connect_proxy(&up, |t| t).await;
    let mut raw = tcp_raw(proxy.addr).await;
    raw.send(&headers(1, false, &connect_block("echo.test:7")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
    raw.send(&data(1, false, b"before trailers")).await.unwrap();
    assert_eq!(read_data(&mut raw, 1, 15).await, b"before trailers");
    raw.send(&headers(1, true, &hpack_literals(&[("x-trailer", "1")])))
        .await
        .unwrap();
    let (bytes, end) = up.ended(0).await;
    assert_eq!((bytes.as_slice(), end), (&b"before trailers"[..], End::Eof));
    raw.pump_until(WAIT, |s| s.ended.contains(&1) || s.resets.contains_key(&1))
        .await;
    assert!(raw.seen.ended.contains(&1), "{:?}", raw.seen);
    assert_eq!(raw.seen.resets.get(&1), None);

    // HEADERS without END_STREAM in the middle of the tunnel.
    raw.send(&headers(3, false, &connect_block("echo.test:7")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 3).await, Verdict::Status(200));
    raw.send(&data(3, false, b"one")).await.unwrap();
    assert_eq!(read_data(&mut raw, 3, 3).await, b"one");
    let mut bad = headers(3, false, &hpack_literals(&[("x-mid", "1")]));
    bad.extend(data(3, false, b"after"));
    raw.send(&bad).await.unwrap();
    raw.pump_until(WAIT, |s| s.resets.contains_key(&3) || s.goaway.is_some())
        .await;
    assert_eq!(
        raw.seen.resets.get(&3),
        Some(&h2f::PROTOCOL_ERROR),
        "{:?}",
        raw.seen
    );
    let (bytes, end) = up.ended(1).await;
    assert_eq!(
        bytes, b"one",
        "nothing after the malformed HEADERS is delivered"
    );
    assert_ne!(end, End::Open);
    // The connection is still usable.
    raw.send(&headers(5, false, &connect_block("echo.test:7")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 5).await, Verdict::Status(200));
    connect_still_serves(proxy.addr).await;
}

/// END_STREAM at once: on the CONNECT HEADERS itself (a tunnel with nothing to send), and
/// as an empty DATA right after the `200`. Both read as a FIN upstream; the upstream's
/// bytes still flow back (half-close) and its FIN ends the stream.
#[tokio::test]
async fn end_stream_with_the_connect_or_right_after_the_200_is_a_half_close() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An upstream that reads to EOF, then answers and closes.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                let _ = s
                    .write_all(format!("read {} bytes", got.len()).as_bytes())
                    .await;
            });
        }
    });
    let dials = Arc::new(AtomicUsize::new(0));
    let proxy = start(
        Server::new(),
        ConnectTerminate::new(relay_counting(addr, dials.clone())),
    )
    .await;
    let mut raw = tcp_raw(proxy.addr).await;
    raw.send(&headers(1, true, &connect_block("x.test:1")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
    raw.pump_until(WAIT, |s| s.ended.contains(&1)).await;
    assert_eq!(raw.seen.data.get(&1).unwrap(), b"read 0 bytes");

    raw.send(&headers(3, false, &connect_block("x.test:1")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 3).await, Verdict::Status(200));
    raw.send(&data(3, true, b"")).await.unwrap();
    raw.pump_until(WAIT, |s| s.ended.contains(&3)).await;
    assert_eq!(raw.seen.data.get(&3).unwrap(), b"read 0 bytes");
    assert!(raw.seen.resets.is_empty(), "{:?}", raw.seen.resets);
    assert_eq!(dials.load(Ordering::SeqCst), 2);
    // A new connection still gets tunnels.
    let mut next = tcp_raw(proxy.addr).await;
    next.send(&headers(1, true, &connect_block("x.test:1")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut next, 1).await, Verdict::Status(200));
}

/// DATA on a stream right after the client reset it (REFERENCE §4.1, the use-after-free
/// class of CVE-2026-26311): the bytes after the RST_STREAM never reach the upstream (which
/// sees a clean end: CANCEL reads as EOF, as in ztunnel), the late DATA is answered with
/// RST_STREAM(STREAM_CLOSED) or ignored, and the connection keeps working. Also with
/// HEADERS, RST and DATA in one burst before the `200`.
#[tokio::test]
async fn data_right_after_rst_on_the_same_stream_goes_nowhere() {
    let up = capture_upstream().await;
    let (proxy, dials) = connect_proxy(&up, |t| t).await;
    let mut raw = tcp_raw(proxy.addr).await;
    raw.send(&headers(1, false, &connect_block("echo.test:7")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
    raw.send(&data(1, false, b"first")).await.unwrap();
    assert_eq!(read_data(&mut raw, 1, 5).await, b"first");
    let mut burst = rst(1, h2f::CANCEL);
    burst.extend(data(1, false, b"after-rst"));
    burst.extend(data(1, true, b"more"));
    raw.send(&burst).await.unwrap();
    let (bytes, end) = up.ended(0).await;
    assert_eq!(bytes, b"first");
    assert_eq!(end, End::Eof);
    raw.pump_for(Duration::from_millis(300)).await;
    assert!(
        matches!(raw.seen.resets.get(&1), None | Some(&h2f::STREAM_CLOSED)),
        "{:?}",
        raw.seen.resets
    );
    assert_eq!(raw.seen.goaway, None);

    // Before the 200: HEADERS, RST, DATA in one write.
    let mut burst = headers(3, false, &connect_block("echo.test:7"));
    burst.extend(rst(3, h2f::CANCEL));
    burst.extend(data(3, false, b"ghost"));
    raw.send(&burst).await.unwrap();
    raw.pump_for(Duration::from_millis(500)).await;
    assert_eq!(raw.seen.goaway, None);
    assert!(
        !up.all_bytes().windows(5).any(|w| w == b"ghost"),
        "data after RST reached the upstream"
    );
    // Whatever the upstream side did with stream 3 (dialled before the reset was read, or
    // not at all), it is gone: at most one more upstream connection, and it ended.
    assert!(dials.load(Ordering::SeqCst) <= 2);
    if up.accepted() == 2 {
        assert_ne!(up.ended(1).await.1, End::Open);
    }
    // The same connection still opens tunnels.
    raw.send(&headers(5, false, &connect_block("echo.test:7")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 5).await, Verdict::Status(200));
    raw.send(&data(5, false, b"alive")).await.unwrap();
    assert_eq!(read_data(&mut raw, 5, 5).await, b"alive");
    connect_still_serves(proxy.addr).await;
}

// =======================================================================================
// Floods, against both HTTP/2 servers: hyper's (HttpServer + Forward) and h2's
// (ConnectTerminate). Serialized, so that one flood's memory does not count for another.

static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Upper bound on the RSS growth of this test process (server included) during a flood.
const RSS_BOUND_MIB: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// `HttpServer` (hyper) forwarding to an HTTP backend.
    Http,
    /// `ConnectTerminate` (h2) relaying to a TCP echo upstream.
    Connect,
}

type Router = Box<dyn Fn(&http::Request<Incoming>) -> Option<Target> + Send + Sync>;
type HttpFwd = HttpServer<Forward<tcp::TcpConnector, Router>>;

struct FloodTarget {
    flavor: Flavor,
    addr: SocketAddr,
    backend: Option<http_common::Backend>,
    upstream: Option<Upstream>,
    _server: Box<dyn std::any::Any + Send>,
}

impl FloodTarget {
    async fn http() -> Self {
        Self::http_with(|s| s).await
    }

    async fn http_with(configure: impl FnOnce(HttpFwd) -> HttpFwd) -> Self {
        let b = http_common::backend().await;
        let to = b.addr;
        let router: Router = Box::new(move |_: &http::Request<Incoming>| Some(Target::from(to)));
        let server = configure(HttpServer::new(Forward::new(
            tcp::TcpConnector::new(),
            router,
        )));
        let running = http_common::serve_http(server).await;
        Self {
            flavor: Flavor::Http,
            addr: running.addr,
            backend: Some(b),
            upstream: None,
            _server: Box::new(running),
        }
    }

    async fn connect() -> Self {
        Self::connect_with(|t| t).await
    }

    async fn connect_with(configure: impl FnOnce(ConnectTerminate) -> ConnectTerminate) -> Self {
        let up = capture_upstream().await;
        let (running, _) = connect_proxy(&up, configure).await;
        Self {
            flavor: Flavor::Connect,
            addr: running.addr,
            backend: None,
            upstream: Some(up),
            _server: Box::new(running),
        }
    }

    async fn both() -> [Self; 2] {
        [Self::http().await, Self::connect().await]
    }

    /// A request whose stream stays open for more frames and is answered `200` at once.
    fn open_block(&self) -> Vec<u8> {
        match self.flavor {
            Flavor::Http => hpack_literals(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/echo"),
                (":authority", "a"),
            ]),
            Flavor::Connect => connect_block("echo.test:7"),
        }
    }

    /// Requests (HTTP) or tunnels (CONNECT) that reached the upstream.
    fn reached(&self) -> usize {
        match (&self.backend, &self.upstream) {
            (Some(b), _) => b.seen.heads.load(Ordering::SeqCst),
            (_, Some(u)) => u.accepted(),
            _ => 0,
        }
    }

    async fn raw(&self) -> RawH2<TcpStream> {
        tcp_raw(self.addr).await
    }

    /// A good request on a new connection is still served.
    async fn still_serves(&self) {
        match self.flavor {
            Flavor::Http => {
                let mut send = http_common::h2_client(self.addr).await;
                let req = http::Request::get("http://a/headers")
                    .body(http_common::empty())
                    .unwrap();
                let resp = tokio::time::timeout(WAIT, send.send_request(req))
                    .await
                    .expect("answered")
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
            }
            Flavor::Connect => connect_still_serves(self.addr).await,
        }
    }

    /// A good request on this (flooded) connection is still answered.
    async fn same_connection_serves<I>(&self, raw: &mut RawH2<I>, stream: u32)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        raw.send(&headers(stream, false, &self.open_block()))
            .await
            .unwrap();
        assert_eq!(
            verdict(raw, stream).await,
            Verdict::Status(200),
            "{:?}",
            self.flavor
        );
        raw.send(&data(stream, true, b"ok")).await.unwrap();
        assert_eq!(read_data(raw, stream, 2).await, b"ok", "{:?}", self.flavor);
    }
}

/// Sends `total` frames made by `frame(i)` in batches; after each batch reads what the
/// server sent until `caught_up(seen, sent)` holds (so that a flood the server answers
/// does not deadlock on full socket buffers; `|_, _| true` for floods it does not answer). Stops early at a GOAWAY, a close or a write
/// error. Returns how many frames were written.
async fn flood<I>(
    raw: &mut RawH2<I>,
    total: usize,
    batch: usize,
    frame: impl Fn(usize) -> Vec<u8>,
    caught_up: impl Fn(&common::H2Seen, usize) -> bool,
) -> usize
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut sent = 0;
    while sent < total {
        let n = batch.min(total - sent);
        let bytes: Vec<u8> = (sent..sent + n).flat_map(&frame).collect();
        if raw.send(&bytes).await.is_err() {
            break;
        }
        sent += n;
        // A short look for a GOAWAY, then as long as it takes to catch up.
        raw.pump_until(Duration::from_millis(10), |s| s.goaway.is_some())
            .await;
        if raw.seen.goaway.is_some() || raw.seen.closed {
            break;
        }
        if !caught_up(&raw.seen, sent) {
            raw.pump_until(WAIT, |s| s.goaway.is_some() || caught_up(s, sent))
                .await;
        }
    }
    sent
}

/// PING flood: every PING is answered (h2 queues at most one PONG and stops reading while
/// it cannot write it), so the cost is bounded by the socket buffers; h2 has no PING-rate
/// limit, so there is no GOAWAY. The connection serves requests afterwards.
#[tokio::test]
async fn ping_flood_is_answered_with_bounded_memory() {
    let _serial = FLOODS.lock().await;
    const N: usize = 100_000;
    for t in FloodTarget::both().await {
        let rss = RssWatch::start();
        let mut raw = t.raw().await;
        let sent = flood(
            &mut raw,
            N,
            2_000,
            |i| h2_frame(h2f::PING, 0, 0, &(i as u64).to_be_bytes()),
            |s, sent| s.pongs + 10_000 >= sent,
        )
        .await;
        raw.pump_until(WAIT, |s| s.pongs >= N).await;
        assert_eq!((sent, raw.seen.pongs), (N, N), "{:?}", t.flavor);
        assert_eq!(raw.seen.goaway, None, "{:?}", t.flavor);
        let growth = rss.peak_growth_mib();
        println!("{:?}: {N} PINGs, RSS growth {growth} MiB", t.flavor);
        assert!(growth < RSS_BOUND_MIB, "{:?}: {growth} MiB", t.flavor);
        t.same_connection_serves(&mut raw, 1).await;
        t.still_serves().await;
    }
}

/// SETTINGS flood, each frame changing INITIAL_WINDOW_SIZE while a stream is open (so that
/// each one touches every stream): each is acknowledged, in order, with bounded memory and
/// no GOAWAY (h2 acknowledges one at a time before reading on).
#[tokio::test]
async fn settings_flood_is_acknowledged_with_bounded_memory() {
    let _serial = FLOODS.lock().await;
    const N: usize = 50_000;
    for t in FloodTarget::both().await {
        let rss = RssWatch::start();
        let mut raw = t.raw().await;
        raw.pump_until(WAIT, |s| s.settings_acks >= 1).await;
        raw.send(&headers(1, false, &t.open_block())).await.unwrap();
        assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
        let acks_before = raw.seen.settings_acks;
        let sent = flood(
            &mut raw,
            N,
            2_000,
            |i| {
                let window: u32 = 65_535 - (i % 2) as u32;
                let mut p = 0x4u16.to_be_bytes().to_vec();
                p.extend_from_slice(&window.to_be_bytes());
                h2_frame(h2f::SETTINGS, 0, 0, &p)
            },
            |s, sent| s.settings_acks - acks_before + 5_000 >= sent,
        )
        .await;
        raw.pump_until(WAIT, |s| s.settings_acks - acks_before >= N)
            .await;
        assert_eq!(
            (sent, raw.seen.settings_acks - acks_before),
            (N, N),
            "{:?}",
            t.flavor
        );
        assert_eq!(raw.seen.goaway, None, "{:?}", t.flavor);
        let growth = rss.peak_growth_mib();
        println!("{:?}: {N} SETTINGS, RSS growth {growth} MiB", t.flavor);
        assert!(growth < RSS_BOUND_MIB, "{:?}: {growth} MiB", t.flavor);
        // The open stream still works.
        raw.send(&data(1, true, b"still")).await.unwrap();
        assert_eq!(read_data(&mut raw, 1, 5).await, b"still");
        t.same_connection_serves(&mut raw, 3).await;
        t.still_serves().await;
    }
}

/// Empty DATA frames without END_STREAM (RUSTSEC-2026-0258, fixed in h2 0.4.16): after at
/// most 100 of them the connection ends with GOAWAY(ENHANCE_YOUR_CALM).
#[tokio::test]
async fn empty_data_frame_flood_gets_goaway_enhance_your_calm() {
    let _serial = FLOODS.lock().await;
    const N: usize = 100_000;
    for t in FloodTarget::both().await {
        let rss = RssWatch::start();
        let mut raw = t.raw().await;
        raw.send(&headers(1, false, &t.open_block())).await.unwrap();
        assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
        let sent = flood(&mut raw, N, 50, |_| data(1, false, b""), |_, _| true).await;
        raw.pump_until(WAIT, |s| s.goaway.is_some()).await;
        assert_eq!(
            raw.seen.goaway.map(|g| g.1),
            Some(h2f::ENHANCE_YOUR_CALM),
            "{:?} after {sent} frames",
            t.flavor
        );
        assert!(sent < N, "{:?}: the flood was read to the end", t.flavor);
        println!("{:?}: GOAWAY after {sent} empty DATA frames", t.flavor);
        assert!(rss.peak_growth_mib() < RSS_BOUND_MIB);
        t.still_serves().await;
    }
}

/// A header block split into HEADERS + CONTINUATION frames of at most `max` bytes.
fn header_frames(stream: u32, end_stream: bool, block: &[u8], max: usize) -> Vec<u8> {
    let chunks: Vec<&[u8]> = block.chunks(max).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let end_headers = if last { h2f::END_HEADERS } else { 0 };
        if i == 0 {
            let es = if end_stream { h2f::END_STREAM } else { 0 };
            out.extend(h2_frame(h2f::HEADERS, es | end_headers, stream, chunk));
        } else {
            out.extend(h2_frame(h2f::CONTINUATION, end_headers, stream, chunk));
        }
    }
    out
}

/// HPACK literals too large: a 70 KiB value (over the 64 KiB header list limit) is
/// answered `431` without reaching the upstream; a 1 MiB value (split over CONTINUATION
/// frames) ends the connection with GOAWAY (ENHANCE_YOUR_CALM: too many CONTINUATION
/// frames / header list way too large). Memory stays bounded either way.
#[tokio::test]
async fn hpack_huge_literals_get_431_or_goaway() {
    let _serial = FLOODS.lock().await;
    for t in FloodTarget::both().await {
        let rss = RssWatch::start();
        let mut raw = t.raw().await;
        let mut block = t.open_block();
        hpack_literal(&mut block, b"x-big", &vec![b'v'; 70 * 1024]);
        raw.send(&header_frames(1, true, &block, 16_384))
            .await
            .unwrap();
        assert_eq!(
            verdict(&mut raw, 1).await,
            Verdict::Status(431),
            "{:?}",
            t.flavor
        );
        assert_eq!(t.reached(), 0, "{:?}", t.flavor);
        // The connection survives the refused stream.
        t.same_connection_serves(&mut raw, 3).await;
        let reached = t.reached();

        let mut raw = t.raw().await;
        let mut block = t.open_block();
        hpack_literal(&mut block, b"x-huge", &vec![b'v'; 1 << 20]);
        let _ = raw.send(&header_frames(1, true, &block, 16_384)).await;
        let v = verdict(&mut raw, 1).await;
        assert_eq!(v, Verdict::GoAway(h2f::ENHANCE_YOUR_CALM), "{:?}", t.flavor);
        assert_eq!(t.reached(), reached, "{:?}", t.flavor);
        let growth = rss.peak_growth_mib();
        println!("{:?}: huge literals, RSS growth {growth} MiB", t.flavor);
        assert!(growth < RSS_BOUND_MIB);
        t.still_serves().await;
    }
}

/// Zero-length HPACK entries: an empty value is legal; an empty name fails decoding (h2
/// ends the connection with GOAWAY(PROTOCOL_ERROR), nothing forwarded). A block of thousands of zero-length-value
/// entries costs 32 bytes each against the header list limit (RFC 7541 §4.1): 3,000 of
/// them (12 KiB on the wire) are over the 64 KiB list → `431`, and so are 20,000 spread
/// over CONTINUATION frames; 200,000 in one frame → GOAWAY.
#[tokio::test]
async fn hpack_zero_length_entries() {
    let _serial = FLOODS.lock().await;
    for t in FloodTarget::both().await {
        let rss = RssWatch::start();
        let mut raw = t.raw().await;
        let mut ok = t.open_block();
        hpack_literal(&mut ok, b"x-empty", b"");
        raw.send(&headers(1, false, &ok)).await.unwrap();
        assert_eq!(
            verdict(&mut raw, 1).await,
            Verdict::Status(200),
            "{:?}",
            t.flavor
        );
        raw.send(&rst(1, h2f::CANCEL)).await.unwrap();
        let reached = t.reached();

        let mut many = t.open_block();
        for _ in 0..3_000 {
            hpack_literal(&mut many, b"e", b"");
        }
        raw.send(&header_frames(3, true, &many, 16_384))
            .await
            .unwrap();
        assert_eq!(
            verdict(&mut raw, 3).await,
            Verdict::Status(431),
            "{:?}",
            t.flavor
        );
        assert_eq!(t.reached(), reached, "{:?}", t.flavor);
        t.same_connection_serves(&mut raw, 5).await;
        let reached = t.reached();

        // An empty name fails HPACK decoding itself: h2 ends the connection.
        for (name, value) in [(&b""[..], &b"v"[..]), (b"", b"")] {
            let mut raw = t.raw().await;
            let mut bad = t.open_block();
            hpack_literal(&mut bad, name, value);
            raw.send(&headers(1, true, &bad)).await.unwrap();
            assert_eq!(
                verdict(&mut raw, 1).await,
                Verdict::GoAway(h2f::PROTOCOL_ERROR),
                "{:?}",
                t.flavor
            );
        }
        assert_eq!(t.reached(), reached, "{:?}", t.flavor);

        // 20,000 of them in 16 KiB frames: h2 stops storing fields once the list is over
        // the limit, and counts each frame's decoded size against 4x the limit; 4,000
        // entries per frame stay under that, so this is a 431 too.
        let mut raw = t.raw().await;
        let mut flood = t.open_block();
        for _ in 0..20_000 {
            hpack_literal(&mut flood, b"e", b"");
        }
        raw.send(&header_frames(1, true, &flood, 16_384))
            .await
            .unwrap();
        assert_eq!(
            verdict(&mut raw, 1).await,
            Verdict::Status(431),
            "{:?}",
            t.flavor
        );
        // 200,000 in one frame (6.6 MB decoded): GOAWAY(ENHANCE_YOUR_CALM) where frames
        // that large are allowed (ConnectTerminate: 1 MiB, as ztunnel), else the frame
        // itself is refused with FRAME_SIZE_ERROR (hyper's default 16 KiB).
        let mut raw = t.raw().await;
        let mut bomb = t.open_block();
        for _ in 0..200_000 {
            hpack_literal(&mut bomb, b"e", b"");
        }
        let _ = raw.send(&headers(1, true, &bomb)).await;
        let want = match t.flavor {
            Flavor::Http => Verdict::GoAway(0x6),
            Flavor::Connect => Verdict::GoAway(h2f::ENHANCE_YOUR_CALM),
        };
        assert_eq!(verdict(&mut raw, 1).await, want, "{:?}", t.flavor);
        assert_eq!(t.reached(), reached, "{:?}", t.flavor);
        assert!(rss.peak_growth_mib() < RSS_BOUND_MIB);
        t.still_serves().await;
    }
}

/// HPACK dynamic table abuse: (1) churn — 300 requests on one connection, each inserting
/// 20 new 200-byte entries (the 4 KiB table evicts all the time) after a table size update
/// to 0 and back, are all answered; (2) a size update above SETTINGS_HEADER_TABLE_SIZE and
/// (3) an index past the table end the connection — h2 reports every HPACK decoding
/// failure as GOAWAY(PROTOCOL_ERROR), where RFC 9113 §4.3 says COMPRESSION_ERROR; (4) the "HPACK bomb" — one entry
/// referenced 60,000 times (60 KB on the wire, ~4 MB decoded) — ends in GOAWAY.
#[tokio::test]
async fn hpack_dynamic_table_churn_and_bombs() {
    let _serial = FLOODS.lock().await;
    for t in FloodTarget::both().await {
        let rss = RssWatch::start();
        let mut raw = t.raw().await;
        let value = vec![b'c'; 200];
        let mut stream = 1;
        for round in 0..300u32 {
            // Size update to 0 (evicts everything) and back to 4096, then new entries.
            let mut block = Vec::new();
            hpack_int(&mut block, 5, 0x20, 0);
            hpack_int(&mut block, 5, 0x20, 4096);
            block.extend(t.open_block());
            for k in 0..20 {
                block.push(0x40); // literal with incremental indexing, new name
                let name = format!("x-churn-{round}-{k}");
                hpack_int(&mut block, 7, 0, name.len());
                block.extend_from_slice(name.as_bytes());
                hpack_int(&mut block, 7, 0, value.len());
                block.extend_from_slice(&value);
            }
            // Reference the newest entry too.
            block.push(0x80 | 62);
            raw.send(&headers(stream, true, &block)).await.unwrap();
            let v = verdict(&mut raw, stream).await;
            assert_eq!(v, Verdict::Status(200), "{:?} round {round}", t.flavor);
            stream += 2;
        }
        assert_eq!(raw.seen.goaway, None);

        // Size update above the advertised table size.
        let mut block = Vec::new();
        hpack_int(&mut block, 5, 0x20, 1 << 20);
        block.extend(t.open_block());
        raw.send(&headers(stream, true, &block)).await.unwrap();
        assert_eq!(
            verdict(&mut raw, stream).await,
            Verdict::GoAway(h2f::PROTOCOL_ERROR),
            "{:?}",
            t.flavor
        );

        // An index past the end of the (empty) dynamic table.
        let mut raw = t.raw().await;
        let mut block = t.open_block();
        block.push(0x80 | 70);
        raw.send(&headers(1, true, &block)).await.unwrap();
        assert_eq!(
            verdict(&mut raw, 1).await,
            Verdict::GoAway(h2f::PROTOCOL_ERROR),
            "{:?}",
            t.flavor
        );

        // One 60-byte entry, then 60,000 one-byte references to it.
        let reached = t.reached();
        let mut raw = t.raw().await;
        let mut block = t.open_block();
        block.push(0x40);
        hpack_int(&mut block, 7, 0, 6);
        block.extend_from_slice(b"x-bomb");
        hpack_int(&mut block, 7, 0, 60);
        block.extend_from_slice(&[b'b'; 60]);
        block.extend(std::iter::repeat_n(0x80 | 62, 60_000));
        let _ = raw.send(&header_frames(1, true, &block, 16_384)).await;
        assert_eq!(
            verdict(&mut raw, 1).await,
            Verdict::GoAway(h2f::ENHANCE_YOUR_CALM),
            "{:?}",
            t.flavor
        );
        assert_eq!(t.reached(), reached, "{:?}", t.flavor);
        let growth = rss.peak_growth_mib();
        println!(
            "{:?}: HPACK churn and bombs, RSS growth {growth} MiB",
            t.flavor
        );
        assert!(growth < RSS_BOUND_MIB);
        t.still_serves().await;
    }
}

/// Flow-control windows pushed past 2^31−1 (RFC 9113 §6.9.1): on the connection → GOAWAY
/// FLOW_CONTROL_ERROR; on a stream → RST_STREAM FLOW_CONTROL_ERROR (the connection lives
/// on). SETTINGS_INITIAL_WINDOW_SIZE above the maximum → GOAWAY PROTOCOL_ERROR (h2 rejects
/// the SETTINGS frame as malformed; RFC 9113 §6.5.2 names FLOW_CONTROL_ERROR). A zero
/// increment is GOAWAY PROTOCOL_ERROR, on a stream too.
#[tokio::test]
async fn window_update_overflow_and_zero_increment() {
    let _serial = FLOODS.lock().await;
    let max = 0x7fff_ffffu32.to_be_bytes();
    for t in FloodTarget::both().await {
        let reached = t.reached();
        // Connection window: 65,535 + (2^31 − 1) overflows.
        let mut raw = t.raw().await;
        raw.send(&h2_frame(h2f::WINDOW_UPDATE, 0, 0, &max))
            .await
            .unwrap();
        raw.pump_until(WAIT, |s| s.goaway.is_some()).await;
        assert_eq!(
            raw.seen.goaway.map(|g| g.1),
            Some(h2f::FLOW_CONTROL_ERROR),
            "{:?}",
            t.flavor
        );

        // Stream window.
        let mut raw = t.raw().await;
        raw.send(&headers(1, false, &t.open_block())).await.unwrap();
        assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
        raw.send(&h2_frame(h2f::WINDOW_UPDATE, 0, 1, &max))
            .await
            .unwrap();
        raw.pump_until(WAIT, |s| s.resets.contains_key(&1) || s.goaway.is_some())
            .await;
        assert_eq!(
            raw.seen.resets.get(&1),
            Some(&h2f::FLOW_CONTROL_ERROR),
            "{:?}: {:?}",
            t.flavor,
            raw.seen
        );
        assert_eq!(raw.seen.goaway, None);
        t.same_connection_serves(&mut raw, 3).await;
        // A zero increment, on a stream or on the connection: h2 ends the connection
        // (RFC 9113 §6.9 asks only for a stream error in the first case).
        for stream in [1u32, 0] {
            let mut raw = t.raw().await;
            raw.send(&headers(1, false, &t.open_block())).await.unwrap();
            assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
            raw.send(&h2_frame(h2f::WINDOW_UPDATE, 0, stream, &[0; 4]))
                .await
                .unwrap();
            raw.pump_until(WAIT, |s| s.goaway.is_some()).await;
            assert_eq!(
                raw.seen.goaway.map(|g| g.1),
                Some(h2f::PROTOCOL_ERROR),
                "{:?} stream {stream}",
                t.flavor
            );
        }

        // SETTINGS_INITIAL_WINDOW_SIZE = 2^31.
        let mut raw = RawH2::handshake(
            TcpStream::connect(t.addr).await.unwrap(),
            &[(0x4, 0x8000_0000)],
        )
        .await;
        raw.pump_until(WAIT, |s| s.goaway.is_some()).await;
        assert_eq!(
            raw.seen.goaway.map(|g| g.1),
            Some(h2f::PROTOCOL_ERROR),
            "{:?}",
            t.flavor
        );
        // Only the good requests reached the upstream.
        assert_eq!(t.reached() - reached, 4, "{:?}", t.flavor);
        t.still_serves().await;
    }
}

/// An upstream that writes as fast as it is allowed to, counting what the proxy took.
async fn firehose() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicBool::new(false));
    let (w, e) = (written.clone(), ended.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (w, e) = (w.clone(), e.clone());
            tokio::spawn(async move {
                let chunk = vec![b'f'; 64 * 1024];
                // Bounded: 1 GiB at most.
                for _ in 0..16_384 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                    w.fetch_add(chunk.len(), Ordering::SeqCst);
                }
                e.store(true, Ordering::SeqCst);
            });
        }
    });
    (addr, written, ended)
}

/// A client that opens a stream and keeps its flow-control window at zero forever
/// (SETTINGS_INITIAL_WINDOW_SIZE 0, no WINDOW_UPDATE) while the upstream has gigabytes to
/// send: nothing is sent on the stream, and nothing piles up in the proxy — the upstream
/// is stopped by backpressure (memory bounded).
/// * `HttpServer` has no timeout for a stalled response body: the stream stays open until
///   the client resets it or the connection ends (documented here; the HTTP/2 keepalive
///   only checks that the client answers PINGs, which this one does). When the window
///   opens, the body flows: nothing was lost.
/// * `ConnectTerminate` + `tcp::Relay`: the relay's idle timeout (here 1 s; default 1 h)
///   ends the stalled tunnel: the stream is reset and the upstream connection closed.
#[tokio::test]
async fn zero_window_held_forever_is_bounded() {
    let _serial = FLOODS.lock().await;
    let hold = Duration::from_secs(2);
    let zero_window = [(0x4u16, 0u32)];

    // HttpServer, 1 GiB response.
    let t = FloodTarget::http().await;
    let rss = RssWatch::start();
    let mut raw = RawH2::handshake(TcpStream::connect(t.addr).await.unwrap(), &zero_window).await;
    let block = hpack_literals(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/big?bytes=1073741824"),
        (":authority", "a"),
    ]);
    raw.send(&headers(1, true, &block)).await.unwrap();
    assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
    raw.pump_for(hold).await;
    assert_eq!(raw.seen.data.get(&1).map_or(0, Vec::len), 0);
    assert!(raw.seen.resets.is_empty() && raw.seen.goaway.is_none());
    let growth = rss.peak_growth_mib();
    println!("Http: zero window for {hold:?}, RSS growth {growth} MiB");
    assert!(growth < RSS_BOUND_MIB, "{growth} MiB");
    // Opening the window lets the body flow.
    raw.send(&h2_frame(
        h2f::WINDOW_UPDATE,
        0,
        1,
        &(1u32 << 20).to_be_bytes(),
    ))
    .await
    .unwrap();
    assert!(read_data(&mut raw, 1, 1 << 20).await.len() >= 1 << 20);
    raw.send(&rst(1, h2f::CANCEL)).await.unwrap();
    t.still_serves().await;

    // ConnectTerminate, relay with a 1 s idle timeout.
    let (up, written, up_ended) = firehose().await;
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &Metadata| Some(Target::from(up)))
        .idle_timeout(Some(Duration::from_secs(1)));
    let proxy = start(Server::new(), ConnectTerminate::new(relay)).await;
    let rss = RssWatch::start();
    let mut raw =
        RawH2::handshake(TcpStream::connect(proxy.addr).await.unwrap(), &zero_window).await;
    raw.send(&headers(1, false, &connect_block("fire.test:1")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
    raw.pump_until(WAIT, |s| s.resets.contains_key(&1) || s.goaway.is_some())
        .await;
    assert_eq!(raw.seen.data.get(&1).map_or(0, Vec::len), 0);
    let reset = raw.seen.resets.get(&1).copied();
    let taken = written.load(Ordering::SeqCst);
    let growth = rss.peak_growth_mib();
    println!(
        "Connect: zero window, stream reset {reset:?} after the idle timeout; upstream wrote \
         {} KiB; RSS growth {growth} MiB",
        taken / 1024
    );
    assert_eq!(reset, Some(h2f::CANCEL));
    assert!(taken < 32 << 20, "the proxy took {taken} bytes");
    assert!(growth < RSS_BOUND_MIB, "{growth} MiB");
    for _ in 0..(WAIT.as_millis() / 20) {
        if up_ended.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        up_ended.load(Ordering::SeqCst),
        "upstream connection not closed"
    );
    assert_eq!(raw.seen.goaway, None, "only the stream ends");
    // The same connection still opens tunnels (answered 200; the upstream talks first).
    raw.send(&headers(3, false, &connect_block("fire.test:1")))
        .await
        .unwrap();
    assert_eq!(verdict(&mut raw, 3).await, Verdict::Status(200));
}

/// More streams than SETTINGS_MAX_CONCURRENT_STREAMS: the extra stream is refused with
/// RST_STREAM(REFUSED_STREAM) and never reaches the upstream; once a stream closes, a new
/// one is accepted on the same connection. (HttpServer: 100 by default; ConnectTerminate:
/// 200 by default, 5 here.)
#[tokio::test]
async fn more_than_max_concurrent_streams_is_refused_stream() {
    let _serial = FLOODS.lock().await;
    for t in [
        FloodTarget::http().await,
        FloodTarget::connect_with(|c| c.h2(proxystack::H2Config::new().max_concurrent_streams(5)))
            .await,
    ] {
        let mut raw = t.raw().await;
        raw.pump_until(WAIT, |s| s.settings.iter().any(|(id, _)| *id == 0x3))
            .await;
        let max = raw
            .seen
            .settings
            .iter()
            .find(|(id, _)| *id == 0x3)
            .map(|(_, v)| *v)
            .unwrap();
        let mut burst = Vec::new();
        for i in 0..max {
            burst.extend(headers(1 + 2 * i, false, &t.open_block()));
        }
        raw.send(&burst).await.unwrap();
        let last = 1 + 2 * (max - 1);
        raw.pump_until(WAIT, |s| {
            (0..max).all(|i| s.status.contains_key(&(1 + 2 * i)))
        })
        .await;
        let reached = t.reached();
        assert_eq!(reached, max as usize, "{:?}", t.flavor);
        let extra = last + 2;
        raw.send(&headers(extra, false, &t.open_block()))
            .await
            .unwrap();
        assert_eq!(
            verdict(&mut raw, extra).await,
            Verdict::Reset(h2f::REFUSED_STREAM),
            "{:?}",
            t.flavor
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            t.reached(),
            reached,
            "{:?}: the refused stream reached it",
            t.flavor
        );
        // Closing one makes room.
        raw.send(&rst(1, h2f::CANCEL)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.same_connection_serves(&mut raw, extra + 2).await;
        assert_eq!(raw.seen.goaway, None);
        t.still_serves().await;
    }
}

/// Stream identifiers out of order (RFC 9113 §5.1.1): a lower id after a higher one, a
/// closed stream reused, an even (server-initiated) id, stream 0 — each a connection error:
/// GOAWAY(PROTOCOL_ERROR), nothing forwarded for the bad stream.
#[tokio::test]
async fn stream_id_regression_and_reuse_are_protocol_errors() {
    let _serial = FLOODS.lock().await;
    for t in FloodTarget::both().await {
        let mut raw = t.raw().await;
        raw.send(&headers(5, false, &t.open_block())).await.unwrap();
        assert_eq!(verdict(&mut raw, 5).await, Verdict::Status(200));
        let reached = t.reached();
        raw.send(&headers(3, false, &t.open_block())).await.unwrap();
        assert_eq!(
            verdict(&mut raw, 3).await,
            Verdict::GoAway(h2f::PROTOCOL_ERROR),
            "{:?}: lower id",
            t.flavor
        );
        assert_eq!(raw.seen.goaway.map(|g| g.0), Some(5), "last stream id");

        // Reuse of a stream that is done.
        let mut raw = t.raw().await;
        raw.send(&headers(1, false, &t.open_block())).await.unwrap();
        assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
        raw.send(&data(1, true, b"x")).await.unwrap();
        raw.pump_until(WAIT, |s| s.ended.contains(&1)).await;
        assert!(raw.seen.ended.contains(&1), "{:?}", t.flavor);
        let reached_reuse = t.reached();
        raw.send(&headers(1, false, &t.open_block())).await.unwrap();
        raw.pump_until(WAIT, |s| s.goaway.is_some() || s.resets.contains_key(&1))
            .await;
        assert_eq!(
            raw.seen.goaway.map(|g| g.1),
            Some(h2f::PROTOCOL_ERROR),
            "{:?}: reused id",
            t.flavor
        );
        assert_eq!(t.reached(), reached_reuse, "{:?}", t.flavor);

        for (name, stream) in [("even id", 2u32), ("stream 0", 0)] {
            let mut raw = t.raw().await;
            raw.send(&headers(stream, false, &t.open_block()))
                .await
                .unwrap();
            raw.pump_until(WAIT, |s| s.goaway.is_some()).await;
            assert_eq!(
                raw.seen.goaway.map(|g| g.1),
                Some(h2f::PROTOCOL_ERROR),
                "{:?}: {name}",
                t.flavor
            );
        }
        assert_eq!(t.reached(), reached_reuse, "{:?}", t.flavor);
        let _ = reached;
        t.still_serves().await;
    }
}

/// PRIORITY flood (deprecated by RFC 9113, ignored by h2): 100,000 frames for open, idle
/// and closed streams cost nothing that lasts — no GOAWAY, bounded memory, and the
/// connection serves requests afterwards. A PRIORITY that makes a stream depend on itself
/// is a stream error (RFC 9113 §5.3.1): RST_STREAM(PROTOCOL_ERROR).
#[tokio::test]
async fn priority_flood_is_ignored_with_bounded_memory() {
    let _serial = FLOODS.lock().await;
    const N: usize = 100_000;
    for t in FloodTarget::both().await {
        let rss = RssWatch::start();
        let mut raw = t.raw().await;
        raw.send(&headers(1, false, &t.open_block())).await.unwrap();
        assert_eq!(verdict(&mut raw, 1).await, Verdict::Status(200));
        let sent = flood(
            &mut raw,
            N,
            5_000,
            |i| {
                // Stream: the open one, then ever newer idle ones; dependency: the previous.
                let stream = if i % 2 == 0 { 1 } else { 3 + 2 * i as u32 };
                let dep = (stream.saturating_sub(2)).to_be_bytes();
                let mut p = dep.to_vec();
                p.push(15);
                h2_frame(h2f::PRIORITY, 0, stream, &p)
            },
            |_, _| true,
        )
        .await;
        raw.pump_for(Duration::from_millis(200)).await;
        assert_eq!(sent, N, "{:?}", t.flavor);
        assert_eq!(raw.seen.goaway, None, "{:?}", t.flavor);
        let growth = rss.peak_growth_mib();
        println!(
            "{:?}: {N} PRIORITY frames, RSS growth {growth} MiB",
            t.flavor
        );
        assert!(growth < RSS_BOUND_MIB);
        raw.send(&data(1, true, b"after")).await.unwrap();
        assert_eq!(read_data(&mut raw, 1, 5).await, b"after");
        // Self-dependency.
        let next = 3 + 2 * N as u32;
        raw.send(&headers(next, false, &t.open_block()))
            .await
            .unwrap();
        assert_eq!(verdict(&mut raw, next).await, Verdict::Status(200));
        let mut p = next.to_be_bytes().to_vec();
        p.push(15);
        raw.send(&h2_frame(h2f::PRIORITY, 0, next, &p))
            .await
            .unwrap();
        raw.pump_until(WAIT, |s| s.resets.contains_key(&next) || s.goaway.is_some())
            .await;
        assert_eq!(
            raw.seen.resets.get(&next),
            Some(&h2f::PROTOCOL_ERROR),
            "{:?}",
            t.flavor
        );
        assert_eq!(raw.seen.goaway, None, "{:?}", t.flavor);
        t.still_serves().await;
    }
}

/// Rapid reset (CVE-2023-44487), on both servers: open-then-RST in a loop ends with
/// GOAWAY(ENHANCE_YOUR_CALM) after ~20 unaccepted resets. Streams that were accepted before
/// their reset may have reached the upstream; they are bounded by the loop ending, and on
/// the CONNECT path no upstream connection is left open.
#[tokio::test]
async fn rapid_reset_gets_goaway() {
    let _serial = FLOODS.lock().await;
    const N: usize = 20_000;
    for t in FloodTarget::both().await {
        let rss = RssWatch::start();
        let mut raw = t.raw().await;
        let block = t.open_block();
        let sent = flood(
            &mut raw,
            N,
            100,
            |i| {
                let stream = 1 + 2 * i as u32;
                let mut f = headers(stream, false, &block);
                f.extend(rst(stream, h2f::CANCEL));
                f
            },
            |_, _| true,
        )
        .await;
        raw.pump_until(WAIT, |s| s.goaway.is_some()).await;
        println!(
            "{:?} rapid reset: GOAWAY {:?} after {sent} streams, {} reached the upstream",
            t.flavor,
            raw.seen.goaway,
            t.reached()
        );
        assert_eq!(
            raw.seen.goaway.map(|g| g.1),
            Some(h2f::ENHANCE_YOUR_CALM),
            "{:?}",
            t.flavor
        );
        assert!(sent < N, "{:?}: the flood was read to the end", t.flavor);
        assert!(rss.peak_growth_mib() < RSS_BOUND_MIB);
        if let Some(up) = &t.upstream {
            // Every upstream connection that was opened is closed again.
            tokio::time::sleep(Duration::from_millis(500)).await;
            for i in 0..up.accepted() {
                assert_ne!(
                    up.ended(i).await.1,
                    End::Open,
                    "upstream connection {i} left open"
                );
            }
        }
        t.still_serves().await;
    }
}

/// CONTINUATION flood (CVE-2024-27919 class), on both servers: HEADERS without END_HEADERS
/// then endless CONTINUATION frames → GOAWAY (ENHANCE_YOUR_CALM: too many CONTINUATION
/// frames), the flood is not read to the end, nothing reaches the upstream.
#[tokio::test]
async fn continuation_flood_gets_goaway() {
    let _serial = FLOODS.lock().await;
    const N: usize = 4_096;
    for t in FloodTarget::both().await {
        let rss = RssWatch::start();
        let mut raw = t.raw().await;
        raw.send(&h2_frame(h2f::HEADERS, 0, 1, &t.open_block()))
            .await
            .unwrap();
        let sent = flood(
            &mut raw,
            N,
            16,
            |i| {
                let mut block = Vec::new();
                hpack_literal(&mut block, format!("x-flood-{i}").as_bytes(), &[b'v'; 8000]);
                h2_frame(h2f::CONTINUATION, 0, 1, &block)
            },
            |_, _| true,
        )
        .await;
        raw.pump_until(WAIT, |s| s.goaway.is_some()).await;
        println!(
            "{:?} CONTINUATION flood: GOAWAY {:?} after {sent} frames",
            t.flavor, raw.seen.goaway
        );
        assert_eq!(
            raw.seen.goaway.map(|g| g.1),
            Some(h2f::ENHANCE_YOUR_CALM),
            "{:?}",
            t.flavor
        );
        assert!(sent < N, "{:?}: the flood was read to the end", t.flavor);
        assert_eq!(t.reached(), 0, "{:?}", t.flavor);
        assert!(rss.peak_growth_mib() < RSS_BOUND_MIB);
        t.still_serves().await;
    }
}

// =======================================================================================
// HBONE metadata headers: forwarded, baggage, traceparent, x-forwarded-network

fn with_fields(authority: &str, fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut block = connect_block(authority);
    for (name, value) in fields {
        hpack_literal(&mut block, name, value);
    }
    block
}

/// Oversized, non-ASCII and malformed metadata never break the tunnel and are never
/// half-used: a value that does not parse is dropped (`None` / no entries), a list over the
/// 64 KiB header limit is refused with `431` before anything is dialled. `baggage` is
/// parsed to at most 64 entries. `x-forwarded-network` is parsed for attribution only
/// (`HboneHeaders::forwarded_network`, a bounded name; anything else is dropped): no policy
/// reads it, so forging it grants nothing.
#[tokio::test]
async fn hbone_metadata_headers_oversized_non_ascii_and_malformed() {
    let ca = DemoCa::new(TD);
    let app = capture_upstream().await;
    let (server, seen) = hbone_server(&ca, app.addr, |i| i).await;
    let authority = format!("127.0.0.1:{}", app.addr.port());
    let big_baggage: String = (0..2_000)
        .map(|i| format!("k{i}=v{i}"))
        .collect::<Vec<_>>()
        .join(",");
    assert!(big_baggage.len() > 16 << 10 && big_baggage.len() < 60 << 10);
    let big_forwarded = format!(
        "for=\"10.1.2.3:4567\";host=reviews.default.svc, {}",
        "for=\"10.9.9.9:1\", ".repeat(1_000)
    );
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    type Check = fn(&HboneHeaders, &http::HeaderMap) -> bool;
    type Fields = Vec<(&'static [u8], Vec<u8>)>;
    let cases: Vec<(&str, Fields, Verdict, Check)> = vec![
        (
            "baggage > 16 KiB",
            vec![(b"baggage", big_baggage.clone().into_bytes())],
            Verdict::Status(200),
            |h, _| h.baggage.len() == 64 && h.baggage[0] == ("k0".into(), "v0".into()),
        ),
        (
            "forwarded > 16 KiB: first element only",
            vec![(b"forwarded", big_forwarded.clone().into_bytes())],
            Verdict::Status(200),
            |h, _| {
                h.forwarded_for == Some("10.1.2.3:4567".parse().unwrap())
                    && h.forwarded_host.as_deref() == Some("reviews.default.svc")
            },
        ),
        (
            "traceparent > 16 KiB",
            vec![(
                b"traceparent",
                format!("{tp}{}", "0".repeat(20_000)).into_bytes(),
            )],
            Verdict::Status(200),
            |h, _| h.traceparent.is_none(),
        ),
        (
            "metadata list > 64 KiB",
            vec![
                (b"baggage", big_baggage.clone().into_bytes()),
                (b"forwarded", big_forwarded.clone().into_bytes()),
                (b"x-pad", vec![b'p'; 40_000]),
            ],
            Verdict::Status(431),
            |_, _| true,
        ),
        (
            "non-ASCII baggage",
            vec![(
                b"baggage",
                "k8s.namespace.name=d\u{e9}faut,service.name=x".into(),
            )],
            Verdict::Status(200),
            |h, _| h.baggage.is_empty(),
        ),
        (
            "non-ASCII forwarded",
            vec![(
                b"forwarded",
                "for=\"10.1.2.3:4567\";host=r\u{e9}views".into(),
            )],
            Verdict::Status(200),
            |h, _| h.forwarded_for.is_none() && h.forwarded_host.is_none(),
        ),
        (
            "non-ASCII traceparent",
            vec![(b"traceparent", format!("{}\u{e9}", &tp[..54]).into_bytes())],
            Verdict::Status(200),
            |h, _| h.traceparent.is_none(),
        ),
        (
            "traceparent 54 characters",
            vec![(b"traceparent", tp[..54].into())],
            Verdict::Status(200),
            |h, _| h.traceparent.is_none(),
        ),
        (
            "traceparent 56 characters",
            vec![(b"traceparent", format!("{tp}0").into_bytes())],
            Verdict::Status(200),
            |h, _| h.traceparent.is_none(),
        ),
        (
            "traceparent not hex",
            vec![(b"traceparent", tp.replace('a', "g").into_bytes())],
            Verdict::Status(200),
            |h, _| h.traceparent.is_none(),
        ),
        (
            "traceparent upper-case hex",
            vec![(b"traceparent", tp.to_uppercase().into_bytes())],
            Verdict::Status(200),
            |h, _| h.traceparent.is_none(),
        ),
        (
            "traceparent version ff",
            vec![(b"traceparent", format!("ff{}", &tp[2..]).into_bytes())],
            Verdict::Status(200),
            |h, _| h.traceparent.is_none(),
        ),
        (
            "traceparent well-formed",
            vec![(b"traceparent", tp.into())],
            Verdict::Status(200),
            |h, _| {
                h.traceparent.is_some_and(|t| {
                    t.trace_id == 0x0af7651916cd43dd8448eb211c80319c && t.flags == 1
                })
            },
        ),
        (
            "forged x-forwarded-network",
            vec![(b"x-forwarded-network", b"attacker-net".to_vec())],
            Verdict::Status(200),
            |h, raw| {
                h.forwarded_network.as_deref() == Some("attacker-net")
                    && raw
                        .get("x-forwarded-network")
                        .is_some_and(|v| v == "attacker-net")
            },
        ),
        (
            "malformed x-forwarded-network",
            vec![(b"x-forwarded-network", b"net a;evil=1".to_vec())],
            Verdict::Status(200),
            |h, _| *h == HboneHeaders::default(),
        ),
    ];
    for (name, fields, want, check) in cases {
        let fields: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let mut raw = hbone_raw(&ca, server).await;
        let before = seen.dials.load(Ordering::SeqCst);
        raw.send(&header_frames(
            1,
            false,
            &with_fields(&authority, &fields),
            65_536,
        ))
        .await
        .unwrap();
        assert_eq!(verdict(&mut raw, 1).await, want, "{name}");
        if want == Verdict::Status(200) {
            raw.send(&data(1, false, b"tunnel ok")).await.unwrap();
            assert_eq!(read_data(&mut raw, 1, 9).await, b"tunnel ok", "{name}");
            let (parsed, raw_headers) = seen.headers.lock().unwrap().last().cloned().unwrap();
            assert!(check(&parsed, &raw_headers), "{name}: {parsed:?}");
        } else {
            assert_eq!(seen.dials.load(Ordering::SeqCst), before, "{name}: dialled");
        }
    }
    hbone_still_serves(&ca, server, app.addr).await;
}

/// `forwarded` quoted-string edge cases (RFC 7239 §4, RFC 9110 §5.6.4), through
/// `HboneHeaders::parse`: a quoted value is one value whatever `;` or `,` it contains, an
/// unterminated quote or a repeated parameter makes the element malformed (dropped, never
/// half-used), escapes are honoured, parameter names are case-insensitive.
#[test]
fn forwarded_quoted_string_edge_cases() {
    let parse = |v: &str| {
        let mut h = http::HeaderMap::new();
        h.insert("forwarded", http::HeaderValue::from_str(v).unwrap());
        let p = HboneHeaders::parse(&h);
        (p.forwarded_for.map(|a| a.to_string()), p.forwarded_host)
    };
    let some = |a: &str| Some(a.to_string());
    type ForAndHost = (Option<String>, Option<String>);
    let cases: &[(&str, ForAndHost)] = &[
        ("for=\"10.1.2.3:4567\"", (some("10.1.2.3:4567"), None)),
        (
            "For=\"10.1.2.3:4567\";HOST=a.svc",
            (some("10.1.2.3:4567"), some("a.svc")),
        ),
        (
            "for=\"[::1]:80\";host=\"a.svc\"",
            (some("[::1]:80"), some("a.svc")),
        ),
        // A `;` or `,` inside quotes belongs to the value: no host parameter here, and the
        // value is not an address.
        ("for=\"10.1.2.3:4567;host=evil.example\"", (None, None)),
        ("for=\"10.1.2.3:4567,for=6.6.6.6:1\"", (None, None)),
        // The second element is another hop: only the first counts.
        (
            "for=\"10.1.2.3:4567\", for=\"6.6.6.6:1\";host=evil",
            (some("10.1.2.3:4567"), None),
        ),
        // Unterminated quote: malformed.
        ("for=\"10.1.2.3:4567", (None, None)),
        ("for=\"10.1.2.3:4567;host=a.svc", (None, None)),
        // Escaped quotes stay inside the value.
        ("for=\"\\\"10.1.2.3:4567\\\"\"", (None, None)),
        (
            "for=\"10.1.2.3:4567\";host=\"a\\.svc\"",
            (some("10.1.2.3:4567"), some("a.svc")),
        ),
        // A parameter twice in one element: which one is meant is ambiguous.
        ("for=\"10.1.2.3:4567\";for=\"6.6.6.6:1\"", (None, None)),
        ("host=a.svc;for=\"10.1.2.3:4567\";host=b.svc", (None, None)),
        // Not a host name.
        (
            "for=\"10.1.2.3:4567\";host=\"a b\"",
            (some("10.1.2.3:4567"), None),
        ),
        ("for=unknown;host=a.svc", (None, some("a.svc"))),
        ("for=_hidden", (None, None)),
        ("", (None, None)),
        ("\"", (None, None)),
        (";;,,", (None, None)),
    ];
    for (value, want) in cases {
        assert_eq!(&parse(value), want, "{value:?}");
    }
}

// =======================================================================================
// Lifecycle: policy flip, certificate rotation, head-of-line blocking on a pooled connection

/// A policy flip on a live connection: the policy closure reads shared state, so every new
/// stream — on the same pooled HTTP/2 connection — sees the new verdict at once (HBONE:
/// `401`, nothing dialled; HTTP: the router's `404`). Tunnels already open are not
/// re-evaluated: unlike ztunnel, which closes connections whose RBAC verdict changed
/// (REFERENCE §2.7), they keep running until they end.
#[tokio::test]
async fn policy_flip_applies_to_new_streams_on_a_live_connection() {
    let ca = DemoCa::new(TD);
    let app = capture_upstream().await;
    let allowed = Arc::new(AtomicBool::new(true));
    let a = allowed.clone();
    let (server, seen) = hbone_server(&ca, app.addr, move |i| {
        i.allow(move |_| a.load(Ordering::SeqCst))
    })
    .await;
    let connector = hbone_client(&ca);
    let target = hbone_target(server, &format!("127.0.0.1:{}", app.addr.port()));
    let mut open = connector.clone().oneshot(target.clone()).await.unwrap();
    open.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    open.read_exact(&mut buf).await.unwrap();

    allowed.store(false, Ordering::SeqCst);
    let err = connector.clone().oneshot(target.clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            proxystack::connect::TunnelError::Refused {
                status: StatusCode::UNAUTHORIZED,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        seen.dials.load(Ordering::SeqCst),
        1,
        "a denied tunnel dialled"
    );
    // The open tunnel is not re-evaluated.
    open.write_all(b"two").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");

    allowed.store(true, Ordering::SeqCst);
    let mut again = connector.clone().oneshot(target).await.unwrap();
    again.write_all(b"three").await.unwrap();
    let mut buf = [0u8; 5];
    again.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        connector.connections_dialled(),
        1,
        "all on one pooled connection"
    );

    // HTTP: a router reading shared state, on one HTTP/2 connection.
    let b = http_common::backend().await;
    let to = b.addr;
    let on = Arc::new(AtomicBool::new(true));
    let o = on.clone();
    let router: Router = Box::new(move |_: &http::Request<Incoming>| {
        o.load(Ordering::SeqCst).then(|| Target::from(to))
    });
    let proxy = http_common::serve_http(HttpServer::new(Forward::new(
        tcp::TcpConnector::new(),
        router,
    )))
    .await;
    let mut send = http_common::h2_client(proxy.addr).await;
    for (state, want) in [(true, 200), (false, 404), (true, 200)] {
        on.store(state, Ordering::SeqCst);
        let req = http::Request::get("http://a/headers")
            .body(http_common::empty())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), want);
    }
    assert_eq!(b.seen.heads.load(Ordering::SeqCst), 2);
    assert_eq!(b.seen.connections.load(Ordering::SeqCst), 1);
}

/// Certificate rotation while connections are open. A `TerminateLayer` holds one
/// `rustls::ServerConfig` and cannot swap it; rotation is done above it, by swapping the
/// whole inbound service for new connections (or with a custom
/// `rustls::server::ResolvesServerCert`). TLS 1.3 has no renegotiation, so an established
/// connection keeps the certificate it was made with: new tunnels on a pooled connection
/// still see the old one and keep working, new connections see the new one.
#[tokio::test]
async fn certificate_rotation_mid_connection() {
    use proxystack::tls::PeerCertificates;
    let ca = DemoCa::new(TD);
    let app = capture_upstream().await;
    let inbound = |cert| {
        Inbound::new(cert, ca.roots())
            .service(hbone_relay(app.addr, HashMap::new(), Seen::default()))
            .unwrap()
    };
    let current = Arc::new(std::sync::RwLock::new(inbound(
        ca.workload_cert("default", "server"),
    )));
    let c = current.clone();
    let swappable = service_fn(move |conn: Conn<TcpStream>| {
        let svc = c.read().unwrap().clone();
        async move { svc.oneshot(conn).await }
    });
    let proxy = start(Server::new(), swappable).await;
    let target = hbone_target(proxy.addr, &format!("127.0.0.1:{}", app.addr.port()));
    let leaf = |t: &Conn<BoxIo>| t.get::<PeerCertificates>().unwrap().0[0].clone();
    let echo = |mut t: Conn<BoxIo>, msg: &'static [u8]| async move {
        t.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, t.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
        t
    };

    let pooled = hbone_client(&ca);
    let first = pooled
        .clone()
        .oneshot(target.clone())
        .await
        .unwrap()
        .boxed();
    let old_leaf = leaf(&first);
    let first = echo(first, b"before").await;

    *current.write().unwrap() = inbound(ca.workload_cert("default", "server"));

    // The pooled connection still has the old session: a new tunnel on it works and sees
    // the old certificate; the open tunnel keeps working.
    let second = pooled
        .clone()
        .oneshot(target.clone())
        .await
        .unwrap()
        .boxed();
    assert_eq!(leaf(&second), old_leaf);
    echo(second, b"same connection").await;
    echo(first, b"still open").await;
    assert_eq!(pooled.connections_dialled(), 1);
    // A new connection gets the new certificate (same identity, new key).
    let fresh = hbone_client(&ca).oneshot(target).await.unwrap().boxed();
    assert_ne!(leaf(&fresh), old_leaf);
    assert_eq!(
        fresh.get::<proxystack::identity::PeerIdentity>().unwrap().0,
        id("default", "server")
    );
    echo(fresh, b"after rotation").await;
    assert_eq!(proxy.stats.accepted.load(Ordering::Relaxed), 2);
}

/// An upstream for the head-of-line test: `L` → 256 MiB then FIN (bounded), `S` + 5 bytes →
/// those 5 bytes back, then FIN.
async fn large_and_small_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut kind = [0u8; 1];
                if s.read_exact(&mut kind).await.is_err() {
                    return;
                }
                if kind[0] == b'L' {
                    let chunk = vec![b'l'; 64 * 1024];
                    for _ in 0..4096 {
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let mut msg = [0u8; 5];
                    if s.read_exact(&mut msg).await.is_ok() {
                        let _ = s.write_all(&msg).await;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn small_round_trip(pool: &H2ConnectPool<tcp::TcpConnector>, target: &Target, i: usize) {
    let mut t = pool.clone().oneshot(target.clone()).await.unwrap();
    let msg = format!("{:05}", i % 100_000);
    t.write_all(format!("S{msg}").as_bytes()).await.unwrap();
    let mut got = vec![0u8; 5];
    tokio::time::timeout(WAIT, t.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("small tunnel {i} blocked"))
        .unwrap();
    assert_eq!(got, msg.as_bytes());
}

/// 10 large downloads and 60 small exchanges on one pooled HTTP/2 connection (ztunnel#1945,
/// istio#51305): while the large ones stream, every small one completes — there is no
/// head-of-line blocking beyond flow control. With large streams whose readers stall, each
/// holds up to its stream window (4 MiB) of the connection window (16 MiB): three stalled
/// ones leave room and small exchanges still complete. (Four or more stalled streams can use
/// up the connection window and then stall every tunnel on the connection: that is HTTP/2
/// flow control with ztunnel's window sizes, measured and printed here, not asserted.)
#[tokio::test]
async fn large_and_small_streams_share_a_pooled_connection() {
    let _serial = FLOODS.lock().await;
    let up = large_and_small_upstream().await;
    let dials = Arc::new(AtomicUsize::new(0));
    let proxy = start(
        Server::new(),
        ConnectTerminate::new(relay_counting(up, dials.clone())),
    )
    .await;
    let pool = H2ConnectPool::new(tcp::TcpConnector::new());
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("mix.test:1").unwrap()));

    // Large streams, read steadily (64 KiB every 10 ms each) until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut large = Vec::new();
    for _ in 0..10 {
        let mut t = pool.clone().oneshot(target.clone()).await.unwrap();
        t.write_all(b"L").await.unwrap();
        let stop = stop.clone();
        large.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            while !stop.load(Ordering::SeqCst) {
                match tokio::time::timeout(WAIT, t.read(&mut buf)).await {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => total += n,
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            total
        }));
    }
    // Wait until all large streams are flowing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let smalls: Vec<_> = (0..60)
        .map(|i| {
            let (pool, target) = (pool.clone(), target.clone());
            tokio::spawn(async move { small_round_trip(&pool, &target, i).await })
        })
        .collect();
    for s in smalls {
        s.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let mut totals = Vec::new();
    for l in large {
        totals.push(l.await.unwrap());
    }
    println!("large streams read (bytes) while the small ones ran: {totals:?}");
    assert!(
        totals.iter().all(|&n| n > 0 && n < 256 << 20),
        "every large stream was still streaming: {totals:?}"
    );
    assert_eq!(pool.connections_dialled(), 1, "one pooled connection");

    // Stalled readers: 3 fill 12 of the 16 MiB connection window.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut t = pool.clone().oneshot(target.clone()).await.unwrap();
        t.write_all(b"L").await.unwrap();
        stalled.push(t);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..20 {
        small_round_trip(&pool, &target, 1000 + i).await;
    }
    // A fourth stalled reader: measured, not asserted.
    let mut t = pool.clone().oneshot(target.clone()).await.unwrap();
    t.write_all(b"L").await.unwrap();
    stalled.push(t);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let blocked = {
        let mut t = pool.clone().oneshot(target.clone()).await.unwrap();
        t.write_all(b"Sprobe").await.unwrap();
        let mut got = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(3), t.read_exact(&mut got))
            .await
            .is_err()
    };
    println!(
        "with 4 stalled 4 MiB-window streams on a 16 MiB connection window, a small \
         exchange on the same connection is {}",
        if blocked { "BLOCKED" } else { "still served" }
    );
    assert_eq!(pool.connections_dialled(), 1);
    drop(stalled);
}

// ---------------------------------------------------------------------------------------
// The HTTP server with an HTTP/1 upstream: malformed HTTP/2 never reaches it; floods.
mod behind_http_server {
    use super::*;
    use crate::common::{h2_frame, H2_PREFACE};
    use crate::http_common::*;
    use http::Request;

    /// `GET http://a/` pseudo-fields: static-table :method GET, :scheme http, :path /, and
    /// :authority `a` (literal, indexed name 1).
    fn request_block() -> Vec<u8> {
        let mut b = vec![0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
        b.shrink_to_fit();
        b
    }

    /// Frames the server sent, until EOF/reset or `wait`: (type, flags, stream, payload).
    async fn read_frames(s: &mut TcpStream, wait: Duration) -> (Vec<(u8, u8, u32, Vec<u8>)>, bool) {
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut head = [0u8; 9];
            match tokio::time::timeout_at(deadline, s.read_exact(&mut head)).await {
                Err(_) => return (frames, false),
                Ok(Err(_)) => return (frames, true),
                Ok(Ok(_)) => {}
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return (frames, true);
            }
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            frames.push((head[3], head[4], stream, payload));
        }
    }

    async fn h2_raw(addr: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut hello = H2_PREFACE.to_vec();
        hello.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
        s.write_all(&hello).await.unwrap();
        s
    }

    #[tokio::test]
    async fn h2_malformed_fields_never_reach_the_http1_upstream() {
        let b = backend().await;
        let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
        let cases: [(&str, &[u8], &[u8]); 5] = [
            ("CR LF in value", b"x-inject", b"a\r\nx-evil: 1"),
            ("LF in value", b"x-inject", b"a\nb"),
            ("connection header", b"connection", b"keep-alive"),
            ("te: gzip", b"te", b"gzip"),
            ("uppercase name", b"X-Upper", b"v"),
        ];
        for (name, field, value) in cases {
            let mut s = h2_raw(proxy.addr).await;
            let mut block = request_block();
            hpack_literal(&mut block, field, value);
            s.write_all(&h2_frame(0x1, 0x4 | 0x1, 1, &block))
                .await
                .unwrap(); // END_HEADERS|END_STREAM
            let (frames, _) = read_frames(&mut s, Duration::from_millis(500)).await;
            let refused = frames.iter().any(|(kind, _, stream, _)| {
                (*kind == 0x3 && *stream == 1) || *kind == 0x7 // RST_STREAM or GOAWAY
            });
            // A 400 HEADERS answer would also be acceptable; a 200 is not.
            let answered_ok = frames.iter().any(|(kind, _, stream, p)| {
                *kind == 0x1 && *stream == 1 && p.first() == Some(&0x88)
            });
            assert!(refused && !answered_ok, "{name}: {frames:?}");
            assert_eq!(
                b.seen.heads.load(Ordering::SeqCst),
                0,
                "{name} reached the upstream"
            );
        }
        // Leading/trailing whitespace is valid HPACK but malformed HTTP/2 (RFC 9113 §8.2.1):
        // the proxy answers 400 itself.
        let mut send = h2_client(proxy.addr).await;
        for v in [" lead", "trail ", "\ttab"] {
            let req = Request::get("http://a/headers")
                .header("x-ws", v)
                .body(empty())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{v:?}");
        }
        assert_eq!(b.seen.heads.load(Ordering::SeqCst), 0);
        assert_still_serves(proxy.addr).await;
        proxy.shutdown().await;
    }
}
