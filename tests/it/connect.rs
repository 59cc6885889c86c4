//! CONNECT level: H1 and H2 tunnels, nesting, pooling, status codes — real sockets, curl.
#![cfg(feature = "connect")]

use proxystack::H2Config;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use http::StatusCode;
use proptest::prelude::*;
use proxystack::admission::Abort;
use proxystack::conn::BoxInbound;
use proxystack::conn::Metadata;
use proxystack::connect::{
    ConnectAuthority, ConnectTerminate, Decision, H2ConnectPool, Http1ConnectConnector,
    TunnelError, TunnelInfo,
};
use proxystack::io::BoxIo;
use proxystack::recursive::Recursive;
use proxystack::steer::Steer;
use proxystack::{tcp, Authority, Conn, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{service_fn, Service, ServiceExt};

fn relay_to(
    addr: SocketAddr,
) -> tcp::Relay<tcp::TcpConnector, impl Fn(&Metadata) -> Option<Target> + Clone> {
    tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |_: &Metadata| Some(Target::from(addr)))
}

/// A CONNECT proxy whose tunnels all go to `upstream`.
async fn proxy_to(
    upstream: SocketAddr,
    configure: impl FnOnce(ConnectTerminate) -> ConnectTerminate,
) -> Running {
    let terminate = configure(ConnectTerminate::new(relay_to(upstream)));
    start(Server::new(), terminate).await
}

fn via(authority: &str) -> Target {
    // The dialled address is irrelevant for connectors over `over()`.
    Target::from_static("127.0.0.1:9").with(ConnectAuthority(Authority::parse(authority).unwrap()))
}

/// A connector that hands out one already-open connection (to nest connectors).
fn over(
    conn: Conn<BoxIo>,
) -> impl Service<Target, Response = Conn<BoxIo>, Error = std::io::Error, Future = impl Send>
       + Clone
       + Send
       + Sync {
    let slot = Arc::new(Mutex::new(Some(conn)));
    service_fn(move |_: Target| {
        let c = slot.lock().unwrap().take();
        async move { c.ok_or_else(|| std::io::Error::other("used twice")) }
    })
}

async fn tcp_conn(addr: SocketAddr) -> Conn<BoxIo> {
    tcp::TcpConnector::new()
        .connect(&Target::from(addr))
        .await
        .unwrap()
        .boxed()
}

#[tokio::test]
async fn h1_and_h2_connect_round_trip() {
    let echo = echo_server().await;
    let proxy = proxy_to(echo, |t| t).await;
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("echo.test:7").unwrap()));
    let mut t1 = Http1ConnectConnector::new(tcp::TcpConnector::new())
        .oneshot(target.clone())
        .await
        .unwrap();
    t1.write_all(b"over h1").await.unwrap();
    t1.shutdown().await.unwrap();
    let mut got = Vec::new();
    t1.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"over h1");

    let pool = H2ConnectPool::new(tcp::TcpConnector::new());
    let mut t2 = pool.clone().oneshot(target).await.unwrap();
    t2.write_all(b"over h2").await.unwrap();
    t2.shutdown().await.unwrap(); // END_STREAM
    let mut got = Vec::new();
    t2.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"over h2");
    proxy.shutdown().await;
}

async fn status_of(proxy: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn status_codes_follow_the_upstream_decision() {
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = proxy_to(dead, |t| t).await;
    assert!(status_of(
        refused.addr,
        "CONNECT a.test:80 HTTP/1.1\r\nHost: a.test:80\r\n\r\n"
    )
    .await
    .contains("503"));

    let echo = echo_server().await;
    let dialled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d = dialled.clone();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |_: &Metadata| {
        d.fetch_add(1, Ordering::SeqCst);
        Some(Target::from(echo))
    });
    let terminate = ConnectTerminate::new(relay).max_depth(1).policy(|req| {
        if req.authority.port() == 22 {
            Decision::Deny(StatusCode::FORBIDDEN)
        } else {
            Decision::Allow
        }
    });
    let proxy = start(Server::new(), terminate).await;
    let cases = [
        (
            "CONNECT a.test:22 HTTP/1.1\r\nHost: a.test:22\r\n\r\n",
            "403",
        ),
        (
            "CONNECT user@a.test:80 HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "400",
        ),
        ("CONNECT a.test:0 HTTP/1.1\r\nHost: a.test\r\n\r\n", "400"),
        ("CONNECT ::1:80 HTTP/1.1\r\nHost: a.test\r\n\r\n", "400"),
        ("CONNECT a.test HTTP/1.1\r\nHost: a.test\r\n\r\n", "400"),
        ("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", "405"),
        (
            "CONNECT a.test:80 HTTP/1.1\r\nHost: a.test:80\r\n\r\n",
            "200",
        ),
    ];
    for (req, want) in cases {
        let got = status_of(proxy.addr, req).await;
        assert!(got.contains(want), "{req:?} → {got:?}, want {want}");
    }
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        1,
        "only the allowed tunnel dialled"
    );
}

#[tokio::test]
async fn curl_uses_the_proxy_as_h1_connect_client() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED: curl not installed");
        return;
    }
    // An HTTP origin reached through the tunnel.
    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = origin.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntunnelled").await;
            });
        }
    });
    let seen = Arc::new(Mutex::new(None));
    let s2 = seen.clone();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
        *s2.lock().unwrap() = c.get::<TunnelInfo>().map(|t| t.authority.to_string());
        Some(Target::from(origin_addr))
    });
    let proxy = start(Server::new(), ConnectTerminate::new(relay)).await;
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-p",
            "-x",
            &format!("http://{}", proxy.addr),
        ])
        .arg(format!("http://origin.test:{}/", origin_addr.port()))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"tunnelled");
    assert_eq!(
        seen.lock().unwrap().as_deref(),
        Some(format!("origin.test:{}", origin_addr.port()).as_str())
    );
}

#[derive(Debug, Clone, Copy)]
enum Hop {
    H1,
    H2,
}

/// A graph that terminates CONNECT and sends tunnels for `nest.test` back into itself and
/// all others to `echo`.
fn nesting_graph(echo: SocketAddr) -> BoxInbound {
    Recursive::new(move |itself| {
        let terminate: BoxInbound = proxystack::conn::box_inbound(ConnectTerminate::new(itself));
        let relay: BoxInbound = proxystack::conn::box_inbound(relay_to(echo));
        Steer::new(vec![terminate, relay], |conn: &Metadata| {
            match conn.get::<TunnelInfo>() {
                Some(t) if t.authority.to_string() != "nest.test:1" => 1,
                _ => 0,
            }
        })
    })
}

async fn open_nested(proxy: SocketAddr, hops: &[Hop]) -> Conn<BoxIo> {
    open_nested_to(proxy, hops, "echo.test:2").await
}

async fn open_nested_to(proxy: SocketAddr, hops: &[Hop], last: &str) -> Conn<BoxIo> {
    let mut conn = tcp_conn(proxy).await;
    for (i, hop) in hops.iter().enumerate() {
        let authority = if i + 1 < hops.len() {
            "nest.test:1"
        } else {
            last
        };
        conn = match hop {
            Hop::H1 => Http1ConnectConnector::new(over(conn))
                .oneshot(via(authority))
                .await
                .unwrap()
                .boxed(),
            Hop::H2 => H2ConnectPool::unpooled(over(conn))
                .oneshot(via(authority))
                .await
                .unwrap()
                .boxed(),
        };
    }
    conn
}

async fn nested_case(hops: Vec<Hop>, data: Vec<u8>, chunk: usize) {
    let echo = echo_server().await;
    let graph = nesting_graph(echo);
    let proxy = start(
        Server::new(),
        graph.map_request(|c: Conn<TcpStream>| c.boxed()),
    )
    .await;
    let conn = open_nested(proxy.addr, &hops).await;
    let (mut r, mut w) = tokio::io::split(conn);
    let write = async {
        for piece in data.chunks(chunk.max(1)) {
            w.write_all(piece).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        let mut probe = [0u8; 1];
        assert_eq!(r.read(&mut probe).await.unwrap(), 0, "data after EOF");
        out
    };
    let (_, got) = tokio::join!(write, read);
    assert!(
        got == data,
        "{hops:?}: {} bytes back of {}",
        got.len(),
        data.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn nested_tunnels_are_byte_identical(
        hops in proptest::collection::vec(prop_oneof![Just(Hop::H1), Just(Hop::H2)], 1..=3),
        data in proptest::collection::vec(any::<u8>(), 0..300_000),
        chunk in 1usize..70_000,
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(nested_case(hops, data, chunk));
    }
}

#[tokio::test]
async fn nesting_depth_is_bounded() {
    let echo = echo_server().await;
    let graph = Recursive::new(move |itself| {
        let terminate: BoxInbound =
            proxystack::conn::box_inbound(ConnectTerminate::new(itself).max_depth(2));
        let relay: BoxInbound = proxystack::conn::box_inbound(relay_to(echo));
        Steer::new(vec![terminate, relay], |conn: &Metadata| {
            match conn.get::<TunnelInfo>() {
                Some(t) if t.authority.to_string() != "nest.test:1" => 1,
                _ => 0,
            }
        })
    });
    let proxy = start(
        Server::new(),
        graph.map_request(|c: Conn<TcpStream>| c.boxed()),
    )
    .await;
    // Depth 1 and 2 are allowed; the CONNECT inside the second tunnel would be depth 3.
    let conn = open_nested_to(proxy.addr, &[Hop::H2, Hop::H2], "nest.test:1").await;
    let err = Http1ConnectConnector::new(over(conn))
        .oneshot(via("nest.test:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TunnelError::Refused {
                status: StatusCode::LOOP_DETECTED,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn pool_shares_connections_and_opens_another_at_the_cap() {
    let echo = echo_server().await;
    let proxy = proxy_to(echo, |t| t).await;
    let pool = H2ConnectPool::new(tcp::TcpConnector::new())
        .h2(H2Config::new().max_concurrent_streams(100));
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("echo.test:7").unwrap()));
    let tunnels: Vec<_> = (0..200)
        .map(|i| {
            let (pool, target) = (pool.clone(), target.clone());
            tokio::spawn(async move {
                let mut t = pool.oneshot(target).await.unwrap();
                let msg = format!("tunnel {i}");
                t.write_all(msg.as_bytes()).await.unwrap();
                let mut got = vec![0u8; msg.len()];
                t.read_exact(&mut got).await.unwrap();
                assert_eq!(got, msg.as_bytes());
                t // keep it open
            })
        })
        .collect();
    let mut open = Vec::new();
    for t in tunnels {
        open.push(t.await.unwrap());
    }
    assert_eq!(
        pool.connections_dialled(),
        2,
        "200 tunnels at cap 100 need exactly 2 connections"
    );
    assert_eq!(proxy.stats.accepted.load(Ordering::Relaxed), 2);
    // The 201st tunnel needs a third connection while all 200 stay open…
    let _extra = pool.clone().oneshot(target.clone()).await.unwrap();
    assert_eq!(pool.connections_dialled(), 3);
    // …but once tunnels close, slots are reused.
    drop(open);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _again = pool.clone().oneshot(target).await.unwrap();
    assert_eq!(pool.connections_dialled(), 3);
}

/// An HTTP/2 CONNECT server (h2 crate) that sends GOAWAY after its first tunnel, keeps
/// serving that tunnel, and accepts new connections.
async fn goaway_after_first_stream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut h2 = h2::server::handshake(s).await.unwrap();
                if let Some(Ok((req, mut respond))) = h2.accept().await {
                    let mut send = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    h2.graceful_shutdown();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(data)) = body.data().await {
                            let _ = body.flow_control().release_capacity(data.len());
                            let _ = send.send_data(data, false);
                        }
                        let _ = send.send_data(bytes::Bytes::new(), true);
                    });
                }
                while let Some(Ok((_req, mut respond))) = h2.accept().await {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn goaway_mid_use_moves_new_tunnels_to_a_new_connection() {
    let (addr, conns) = goaway_after_first_stream().await;
    let pool = H2ConnectPool::new(tcp::TcpConnector::new());
    let target = Target::from(addr).with(ConnectAuthority(Authority::parse("x.test:1").unwrap()));
    let mut first = pool.clone().oneshot(target.clone()).await.unwrap();
    first.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    first.read_exact(&mut buf).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // the GOAWAY arrives
    let mut second = pool.clone().oneshot(target).await.unwrap();
    second.write_all(b"two").await.unwrap();
    second.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    // The first tunnel still works after the GOAWAY.
    first.write_all(b"uno").await.unwrap();
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"uno");
}

/// An upstream that accepts one connection, waits, then resets it.
async fn resetting_upstream(after: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(after).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    });
    upstream
}

/// An upstream that resets every connection it accepts after `after`.
async fn always_resetting_upstream(after: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            });
        }
    });
    upstream
}

/// Nested tunnels pass a reset on: the innermost HTTP/2 stream is reset, and an HTTP/1.1
/// tunnel inside an HTTP/2 one resets the HTTP/2 stream that carries it.
#[tokio::test]
async fn upstream_reset_crosses_nested_tunnels() {
    let upstream = always_resetting_upstream(Duration::from_millis(100)).await;
    let graph = nesting_graph(upstream);
    let proxy = start(
        Server::new(),
        graph.map_request(|c: Conn<TcpStream>| c.boxed()),
    )
    .await;
    for hops in [
        vec![Hop::H2, Hop::H2],
        vec![Hop::H1, Hop::H2],
        vec![Hop::H2, Hop::H1],
    ] {
        let mut conn = open_nested(proxy.addr, &hops).await;
        let mut buf = Vec::new();
        let err = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
            .await
            .expect("the nested tunnel must end")
            .expect_err("a reset is not EOF");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{hops:?}: {err:?}"
        );
    }
}

/// An upstream TCP reset becomes RST_STREAM(CONNECT_ERROR) (RFC 9113 §8.5), which the
/// client reads as a reset, not as a clean end of stream.
#[tokio::test]
async fn upstream_reset_reaches_the_h2_client_as_a_reset() {
    let upstream = resetting_upstream(Duration::from_millis(100)).await;
    let proxy = proxy_to(upstream, |t| t).await;
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("x.test:1").unwrap()));
    let mut t = H2ConnectPool::new(tcp::TcpConnector::new())
        .oneshot(target)
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut buf))
        .await
        .expect("the tunnel must end when its upstream resets");
    let err = r.expect_err("an upstream reset must not read as EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
}

/// The same through a client-side relay: the application's TCP connection is reset.
#[tokio::test]
async fn upstream_reset_resets_the_client_application_through_two_relays() {
    let upstream = resetting_upstream(Duration::from_millis(200)).await;
    let proxy = proxy_to(upstream, |t| t).await;
    let client_side = client_relay(proxy.addr).await;
    let mut app = TcpStream::connect(client_side.addr).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut buf))
        .await
        .expect("the application connection must end");
    let err = r.expect_err("an upstream reset must reach the application as a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
}

/// A client-side proxy: plain TCP in, pooled HTTP/2 CONNECT to `proxy` out.
async fn client_relay(proxy: SocketAddr) -> Running {
    let pool = H2ConnectPool::new(tcp::TcpConnector::new());
    let relay = tcp::Relay::new(pool).upstream(move |_: &Metadata| {
        Some(Target::from(proxy).with(ConnectAuthority(Authority::parse("x.test:1").unwrap())))
    });
    start(Server::new(), relay).await
}

/// An upstream listener whose first accepted connection the test drives.
async fn one_upstream() -> (SocketAddr, tokio::sync::oneshot::Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let _ = tx.send(s);
    });
    (addr, rx)
}

/// Reads until an error, which must come within 5 s (no EOF in between).
async fn expect_reset(s: &mut TcpStream) -> std::io::Error {
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return None,
                Ok(_) => continue,
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .expect("the upstream connection must end");
    r.expect("the upstream saw a clean EOF, not a reset")
}

/// A tunnel the client aborts ends with RST_STREAM(CONNECT_ERROR): the server resets its
/// upstream TCP connection.
#[tokio::test]
async fn aborted_tunnel_resets_the_server_upstream() {
    let (upstream, accepted) = one_upstream().await;
    let proxy = proxy_to(upstream, |t| t).await;
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("x.test:1").unwrap()));
    let mut t = H2ConnectPool::new(tcp::TcpConnector::new())
        .oneshot(target)
        .await
        .unwrap();
    t.write_all(b"hello").await.unwrap();
    let mut up = accepted.await.unwrap();
    let mut got = [0u8; 5];
    up.read_exact(&mut got).await.unwrap();
    // What a relay does when the other side of the tunnel failed: abort, then drop.
    t.get::<Abort>()
        .expect("tunnels carry their abort handle")
        .abort();
    drop(t);
    let err = expect_reset(&mut up).await;
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
}

/// An application that resets its connection to a client-side relay resets the server's
/// upstream connection, across the HTTP/2 tunnel between them.
#[tokio::test]
async fn client_reset_crosses_the_tunnel_to_the_upstream() {
    let (upstream, accepted) = one_upstream().await;
    let proxy = proxy_to(upstream, |t| t).await;
    let client_side = client_relay(proxy.addr).await;
    let mut app = TcpStream::connect(client_side.addr).await.unwrap();
    app.write_all(b"hello").await.unwrap();
    let mut up = accepted.await.unwrap();
    let mut got = [0u8; 5];
    up.read_exact(&mut got).await.unwrap();
    socket2::SockRef::from(&app)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(app);
    let err = expect_reset(&mut up).await;
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
}

/// A raw HTTP/2 client opens a tunnel and cancels it with RST_STREAM(CANCEL). Like ztunnel
/// (REFERENCE §2.7), CANCEL reads as the end of the client's data: the upstream sees a clean
/// EOF (FIN). Whatever it sends afterwards finds the stream gone, and then it is reset.
#[tokio::test]
async fn cancel_from_a_raw_h2_client_is_eof_upstream_then_reset() {
    let (upstream, accepted) = one_upstream().await;
    let proxy = proxy_to(upstream, |t| t).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::builder()
        .method("CONNECT")
        .uri("x.test:1")
        .body(())
        .unwrap();
    let (response, mut send) = h2.send_request(req, false).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    send.send_data(bytes::Bytes::from_static(b"hello"), false)
        .unwrap();
    let mut up = accepted.await.unwrap();
    let mut got = [0u8; 5];
    up.read_exact(&mut got).await.unwrap();
    send.send_reset(h2::Reason::CANCEL);
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), up.read(&mut buf))
        .await
        .expect("the upstream must see the end")
        .expect("CANCEL reads as EOF upstream, not as a reset");
    assert_eq!(n, 0);
    // The upstream answers; the tunnel is gone, so the proxy resets it.
    let failed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Err(e) = up.write_all(b"late").await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("writes after the cancel must fail");
    assert!(
        matches!(
            failed.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{failed:?}"
    );
}

/// A CONNECT proxy whose relay results are reported on `results`.
async fn recording_proxy(
    upstream: SocketAddr,
) -> (
    Running,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let relay = relay_to(upstream);
    let recorded = service_fn(move |conn: Conn<BoxIo>| {
        let (relay, tx) = (relay.clone(), tx.clone());
        async move {
            let r = relay.oneshot(conn).await;
            let _ = tx.send(r.as_ref().map(|_| ()).map_err(|e| format!("{e:?}")));
            r
        }
    });
    (
        start(Server::new(), ConnectTerminate::new(recorded)).await,
        rx,
    )
}

/// END_STREAM ↔ FIN in both directions and in either order, with no reset anywhere: the
/// server's relay ends cleanly and every reader sees a plain EOF.
#[tokio::test]
async fn end_stream_and_fin_map_both_ways() {
    // The client finishes first.
    let (upstream, accepted) = one_upstream().await;
    let (proxy, mut results) = recording_proxy(upstream).await;
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("x.test:1").unwrap()));
    let pool = H2ConnectPool::new(tcp::TcpConnector::new());
    let mut t = pool.clone().oneshot(target.clone()).await.unwrap();
    t.write_all(b"ping").await.unwrap();
    t.shutdown().await.unwrap(); // END_STREAM
    let mut up = accepted.await.unwrap();
    let mut got = Vec::new();
    up.read_to_end(&mut got).await.unwrap(); // FIN
    assert_eq!(got, b"ping");
    up.write_all(b"pong").await.unwrap();
    up.shutdown().await.unwrap(); // FIN
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap(); // END_STREAM
    assert_eq!(got, b"pong");
    let relay = tokio::time::timeout(Duration::from_secs(5), results.recv()).await;
    assert_eq!(relay.unwrap(), Some(Ok(())));

    // The upstream finishes first; the client keeps sending after it read EOF.
    let (upstream, accepted) = one_upstream().await;
    let (proxy, mut results) = recording_proxy(upstream).await;
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("x.test:1").unwrap()));
    let mut t = pool.oneshot(target).await.unwrap();
    let mut up = accepted.await.unwrap();
    up.write_all(b"banner").await.unwrap();
    up.shutdown().await.unwrap(); // FIN
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap(); // END_STREAM
    assert_eq!(got, b"banner");
    t.write_all(b"after").await.unwrap();
    t.shutdown().await.unwrap();
    let mut got = Vec::new();
    up.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"after");
    let relay = tokio::time::timeout(Duration::from_secs(5), results.recv()).await;
    assert_eq!(relay.unwrap(), Some(Ok(())));
}

#[tokio::test]
async fn address_filter_refuses_forbidden_destinations_with_403() {
    // An origin on 127.0.0.2, the only loopback address the filter allows.
    let origin = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = origin.accept().await {
            let _ = s.write_all(b"ok").await;
        }
    });
    let connector = tcp::TcpConnector::new()
        .allow_addresses(|a: SocketAddr| a.ip() == std::net::Ipv4Addr::new(127, 0, 0, 2));
    let relay = tcp::Relay::new(connector)
        .upstream(|m: &Metadata| Some(Target::from(m.get::<TunnelInfo>()?.authority.clone())));
    let proxy = start(Server::new(), ConnectTerminate::new(relay)).await;
    let port = origin_addr.port();
    for (authority, want) in [
        (format!("127.0.0.1:{port}"), "403"),
        // A name resolving to a forbidden address is refused the same way.
        (format!("localhost:{port}"), "403"),
        (format!("[::1]:{port}"), "403"),
        ("169.254.169.254:80".to_string(), "403"),
        (format!("127.0.0.2:{port}"), "200"),
    ] {
        let got = status_of(
            proxy.addr,
            &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        )
        .await;
        assert!(got.contains(want), "{authority}: {got}");
    }
}

const SETTINGS: u8 = 4;
const HEADERS: u8 = 1;
const PING: u8 = 6;
const ACK: u8 = 1;

/// An HTTP/2 server written frame by frame that answers every CONNECT with 200 but never
/// answers a PING. Reports the PINGs it got once the client closed the connection.
async fn server_ignoring_pings() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                s.read_exact(&mut preface).await.unwrap();
                assert_eq!(preface, H2_PREFACE);
                s.write_all(&h2_frame(SETTINGS, 0, 0, &[])).await.unwrap();
                let mut pings = 0;
                while let Some(f) = read_h2_frame(&mut s).await {
                    match f.kind {
                        SETTINGS if f.flags & ACK == 0 => {
                            let _ = s.write_all(&h2_frame(SETTINGS, ACK, 0, &[])).await;
                        }
                        // `:status: 200` (HPACK static index 8), END_HEADERS.
                        HEADERS => {
                            let _ = s
                                .write_all(&h2_frame(HEADERS, 0x4, f.stream, &[0x88]))
                                .await;
                        }
                        PING if f.flags & ACK == 0 => pings += 1,
                        _ => {}
                    }
                }
                let _ = tx.send(pings);
            });
        }
    });
    (addr, rx)
}

/// PING keepalive: a peer that stops answering PINGs is dropped after the timeout, and its
/// tunnels fail (an error, not EOF, so relays reset their applications).
#[tokio::test]
async fn pool_drops_a_connection_whose_peer_never_answers_pings() {
    let (addr, mut closed) = server_ignoring_pings().await;
    let pool = H2ConnectPool::new(tcp::TcpConnector::new()).h2(H2Config::new()
        .keep_alive_interval(Some(Duration::from_millis(100)))
        .keep_alive_timeout(Duration::from_millis(300)));
    let target = Target::from(addr).with(ConnectAuthority(Authority::parse("x.test:1").unwrap()));
    let mut t = pool.clone().oneshot(target.clone()).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf))
        .await
        .expect("the tunnel must fail once the keepalive gives up");
    assert!(
        read.is_err(),
        "a dropped connection is not a clean EOF: {read:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let pings = tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .expect("the client must close the connection")
        .unwrap();
    assert!(pings >= 1, "the client sent no PING");
    // The next tunnel needs a new connection.
    let _next = pool.clone().oneshot(target).await.unwrap();
    assert_eq!(pool.connections_dialled(), 2);
}

/// The terminator's keepalive: a client that never answers PINGs is disconnected.
#[tokio::test]
async fn terminator_drops_a_client_that_never_answers_pings() {
    let echo = echo_server().await;
    let proxy = proxy_to(echo, |t| {
        t.h2(H2Config::new()
            .keep_alive_interval(Some(Duration::from_millis(100)))
            .keep_alive_timeout(Duration::from_millis(300)))
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(H2_PREFACE).await.unwrap();
    s.write_all(&h2_frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let pings = tokio::time::timeout(Duration::from_secs(5), async {
        let mut pings = 0;
        while let Some(f) = read_h2_frame(&mut s).await {
            match f.kind {
                SETTINGS if f.flags & ACK == 0 => {
                    let _ = s.write_all(&h2_frame(SETTINGS, ACK, 0, &[])).await;
                }
                PING if f.flags & ACK == 0 => pings += 1,
                _ => {}
            }
        }
        pings
    })
    .await
    .expect("the server must close a connection whose PINGs go unanswered");
    assert!(pings >= 1);
}

/// Drain on HTTP/2: GOAWAY, the open tunnel keeps working, and the connection closes as
/// soon as its last tunnel ends (well before the drain deadline).
#[tokio::test]
async fn drain_lets_open_h2_tunnels_finish_then_closes() {
    let echo = echo_server().await;
    let mut proxy = proxy_to(echo, |t| t).await;
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("echo.test:7").unwrap()));
    let mut t = H2ConnectPool::new(tcp::TcpConnector::new())
        .oneshot(target)
        .await
        .unwrap();
    t.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    t.read_exact(&mut got).await.unwrap();
    proxy.signal.take().unwrap().start();
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.write_all(b"during").await.unwrap();
    t.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"during");
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), proxy.task)
        .await
        .expect("serve returns once the drained connection's last tunnel ended")
        .unwrap()
        .unwrap();
}

/// Extended CONNECT (RFC 8441) over the h2 server: advertised when enabled, and the
/// `:protocol` reaches the tunnel's metadata.
#[tokio::test]
async fn extended_connect_carries_its_protocol() {
    let echo = echo_server().await;
    let seen = Arc::new(Mutex::new(None));
    let s2 = seen.clone();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
        *s2.lock().unwrap() = c.get::<TunnelInfo>().and_then(|t| t.protocol.clone());
        Some(Target::from(echo))
    });
    let proxy = start(
        Server::new(),
        ConnectTerminate::new(relay).extended_connect(true),
    )
    .await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    // The server's SETTINGS must have arrived before an extended CONNECT may be sent.
    for _ in 0..100 {
        if h2.is_extended_connect_protocol_enabled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h2.is_extended_connect_protocol_enabled());
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri("http://chat.test:80/room")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (response, mut send) = h2.send_request(req, false).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    send.send_data(bytes::Bytes::from_static(b"frame"), true)
        .unwrap();
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"frame");
    assert_eq!(seen.lock().unwrap().as_deref(), Some("websocket"));
}

/// curl as an HTTP/2 CONNECT client (`--proxy-http2`, curl ≥ 8.1) through a TLS proxy whose
/// ALPN offers h2: TLS terminate → ConnectTerminate → relay to an HTTP origin.
#[cfg(all(feature = "tls", feature = "demo-certs"))]
#[tokio::test]
async fn curl_as_h2_connect_client_when_supported() {
    let help = std::process::Command::new("curl")
        .args(["--help", "all"])
        .output();
    let supported =
        help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--proxy-http2"));
    if !supported {
        println!("SKIPPED: installed curl has no --proxy-http2 (needs curl 8.1+)");
        return;
    }
    use proxystack::tls::{demo::DemoCa, ServerConfigBuilder, TerminateLayer};
    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = origin.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nover2",
                    )
                    .await;
            });
        }
    });
    let ca = DemoCa::new("example.org");
    let tls = ServerConfigBuilder::new()
        .default_cert(ca.server_cert(&["localhost", "127.0.0.1"]))
        .alpn(["h2"])
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(TerminateLayer::new(tls))
        .service(ConnectTerminate::new(relay_to(origin_addr)).http2_only());
    let proxy = start(Server::new(), svc).await;
    let ca_file =
        std::env::temp_dir().join(format!("proxystack-connect-h2-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.root_pem()).unwrap();
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--proxy-http2",
            "-p",
            "--proxy-cacert",
        ])
        .arg(&ca_file)
        .args(["-x", &format!("https://127.0.0.1:{}", proxy.addr.port())])
        .arg(format!("http://origin.test:{}/", origin_addr.port()))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"over2");
}

// ---- Issue 14 item 4: the proxy's own listeners are never a tunnel's destination ----

/// A CONNECT proxy whose tunnels go to the requested authority through a connector that
/// knows `own`; the proxy's own address is registered too.
async fn proxy_knowing(own: &tcp::OwnListeners) -> Running {
    let connector = tcp::TcpConnector::new().own_listeners(own.clone());
    let relay = tcp::Relay::new(connector)
        .upstream(|m: &Metadata| Some(Target::from(m.get::<TunnelInfo>()?.authority.clone())));
    let proxy = start(Server::new(), ConnectTerminate::new(relay)).await;
    own.register(proxy.addr);
    proxy
}

#[tokio::test]
async fn connect_to_own_listeners_is_refused_with_503() {
    // A stand-in for the admin endpoint (`/metrics`) that counts what reaches it.
    let (admin, admin_seen) = counting_echo_server().await;
    let own = tcp::OwnListeners::new();
    own.register(admin);
    let proxy = proxy_knowing(&own).await;
    let pool = H2ConnectPool::new(tcp::TcpConnector::new());
    let mut h1_requests = 0;
    for port in [proxy.addr.port(), admin.port()] {
        // Every way of naming this host: a name, another loopback address, the unspecified
        // address, an IPv4-mapped one, IPv6 loopback.
        for host in [
            "127.0.0.1",
            "localhost",
            "127.0.0.2",
            "0.0.0.0",
            "[::ffff:127.0.0.1]",
            "[::1]",
        ] {
            let authority = format!("{host}:{port}");
            let got = status_of(
                proxy.addr,
                &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
            )
            .await;
            h1_requests += 1;
            assert!(got.contains("503"), "HTTP/1.1 CONNECT {authority}: {got}");
        }
        let target = Target::from(proxy.addr).with(ConnectAuthority(
            Authority::parse(&format!("127.0.0.1:{port}")).unwrap(),
        ));
        match pool.clone().oneshot(target).await {
            Err(TunnelError::Refused { status, .. }) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "HTTP/2 to {port}")
            }
            Ok(_) => panic!("HTTP/2 tunnel to our own port {port} opened"),
            Err(e) => panic!("HTTP/2 tunnel to {port}: {e}"),
        }
    }
    // Nothing was dialled: the admin stand-in saw no connection, the proxy only ours.
    assert_eq!(admin_seen.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(proxy.stats.accepted.load(Ordering::SeqCst), h1_requests + 1);
    // Other destinations still open.
    let origin = echo_server().await;
    let got = status_of(
        proxy.addr,
        &format!("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n"),
    )
    .await;
    assert!(got.contains("200"), "{got}");
    proxy.shutdown().await;
}

#[cfg(all(feature = "hbone", feature = "demo-certs"))]
#[tokio::test]
async fn hbone_inbound_to_own_listeners_is_refused_with_503() {
    use proxystack::hbone::{self, HboneTarget, Inbound};
    use proxystack::identity::SpiffeId;
    use proxystack::tls::demo::DemoCa;

    let ca = DemoCa::new("cluster.local");
    let (admin, admin_seen) = counting_echo_server().await;
    let own = tcp::OwnListeners::new();
    own.register(admin);
    let app_port = echo_server().await.port();
    // As ztunnel: tunnels reach the local app on the port the client asked for.
    let app = tcp::Relay::new(tcp::TcpConnector::new().own_listeners(own.clone())).upstream(
        |m: &Metadata| {
            let port = m.get::<TunnelInfo>()?.authority.port();
            Some(Target::from(([127, 0, 0, 1], port)))
        },
    );
    let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
        .service(app)
        .unwrap();
    let server = start(Server::new(), inbound).await;
    own.register(server.addr);

    let client =
        hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots()).unwrap();
    let server_id = SpiffeId::istio("cluster.local", "default", "server").unwrap();
    let open = |port: u16| {
        let authority = Authority::from(SocketAddr::from(([127, 0, 0, 1], port)));
        let target = HboneTarget::new(server.addr, authority, [server_id.clone()]).into_target();
        tokio::time::timeout(Duration::from_secs(10), client.clone().oneshot(target))
    };
    // The HBONE listener itself (an ephemeral port, not one of ILLEGAL_PORTS) and the
    // admin stand-in.
    for port in [server.addr.port(), admin.port()] {
        match open(port).await.expect("an answer in time") {
            Err(TunnelError::Refused { status, .. }) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "port {port}")
            }
            Ok(_) => panic!("HBONE tunnel to our own port {port} opened"),
            Err(e) => panic!("HBONE tunnel to {port}: {e}"),
        }
    }
    assert_eq!(admin_seen.accepted.load(Ordering::SeqCst), 0);
    // The app is still reachable, over the same pooled connection: the server accepted
    // one connection, ours, and never one from itself.
    let mut t = open(app_port).await.unwrap().unwrap();
    t.write_all(b"app").await.unwrap();
    let mut got = [0u8; 3];
    t.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"app");
    assert_eq!(server.stats.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn relay_to_own_listener_closes_without_dialling() {
    let (ours, seen) = counting_echo_server().await;
    let own = tcp::OwnListeners::new();
    own.register(ours);
    let relay = tcp::Relay::new(tcp::TcpConnector::new().own_listeners(own))
        .upstream(move |_: &Metadata| Some(Target::from(ours)));
    let (tx, mut kinds) = tokio::sync::mpsc::unbounded_channel();
    let svc = tower::ServiceBuilder::new()
        .map_err(move |e: tcp::RelayServiceError| {
            let kind = match &e {
                tcp::RelayServiceError::Connect { source, .. } => source
                    .downcast_ref::<tcp::ConnectError>()
                    .map(|c| (c.kind(), proxystack::admission::refusal_for(c))),
                _ => None,
            };
            let _ = tx.send(kind);
            e
        })
        .service(relay);
    let proxy = start(Server::new(), svc).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = s.write_all(b"loop?").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed without data: {read:?}"
    );
    let kind = tokio::time::timeout(Duration::from_secs(10), kinds.recv()).await;
    assert_eq!(
        kind.unwrap().unwrap(),
        Some((
            tcp::ConnectErrorKind::Loop,
            proxystack::admission::Refusal::Loop
        ))
    );
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 0);
    proxy.shutdown().await;
}

/// Issue 15 item 4: `ConnectTerminateLayer` composes in a `ServiceBuilder` — here over a
/// layer that sees every tunnel — and its knobs (policy, HTTP/2 settings) hold on real
/// HTTP/1.1 and HTTP/2 tunnels.
#[tokio::test]
async fn connect_terminate_layer_composes_in_service_builder() {
    use proxystack::connect::ConnectTerminateLayer;
    use tower::ServiceBuilder;

    let echo = echo_server().await;
    let tunnels = Arc::new(Mutex::new(Vec::new()));
    let t = tunnels.clone();
    let svc = ServiceBuilder::new()
        .layer(
            ConnectTerminateLayer::new()
                .h2(H2Config::new().max_concurrent_streams(8))
                .policy(|req| match req.authority.port() {
                    22 => Decision::Deny(StatusCode::FORBIDDEN),
                    _ => Decision::Allow,
                }),
        )
        .layer(tower::util::MapRequestLayer::new(
            move |conn: Conn<BoxIo>| {
                if let Some(info) = conn.get::<TunnelInfo>() {
                    t.lock()
                        .unwrap()
                        .push((info.version, info.authority.to_string()));
                }
                conn
            },
        ))
        .service(relay_to(echo));
    let proxy = start(Server::new(), svc).await;
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("echo.test:7").unwrap()));

    let mut t1 = Http1ConnectConnector::new(tcp::TcpConnector::new())
        .oneshot(target.clone())
        .await
        .unwrap();
    t1.write_all(b"layered h1").await.unwrap();
    t1.shutdown().await.unwrap();
    let mut got = Vec::new();
    t1.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"layered h1");

    let mut t2 = H2ConnectPool::new(tcp::TcpConnector::new())
        .oneshot(target)
        .await
        .unwrap();
    t2.write_all(b"layered h2").await.unwrap();
    t2.shutdown().await.unwrap();
    let mut got = Vec::new();
    t2.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"layered h2");

    // The layer's policy: refused before the inner layers see anything.
    let denied = status_of(
        proxy.addr,
        "CONNECT a.test:22 HTTP/1.1\r\nHost: a.test:22\r\n\r\n",
    )
    .await;
    assert!(denied.contains("403"), "{denied:?}");
    assert_eq!(
        *tunnels.lock().unwrap(),
        [
            (http::Version::HTTP_11, "echo.test:7".to_owned()),
            (http::Version::HTTP_2, "echo.test:7".to_owned()),
        ]
    );
    proxy.shutdown().await;
}

/// Issue 15 item 4: `SteerLayer` composes in a `ServiceBuilder` with
/// `ConnectTerminateLayer`: a recursive graph where connections and `nest.test` tunnels
/// are terminated again and all other tunnels go on to the layered relay (typed, not
/// boxed), over real nested HTTP/2 and HTTP/1.1 tunnels.
#[tokio::test]
async fn steer_layer_composes_in_service_builder() {
    use proxystack::connect::ConnectTerminateLayer;
    use proxystack::steer::SteerLayer;
    use tower::Layer;
    use tower::ServiceBuilder;

    let echo = echo_server().await;
    let graph = Recursive::new(move |itself| {
        ServiceBuilder::new()
            .layer(SteerLayer::when(
                |m: &Metadata| {
                    m.get::<TunnelInfo>()
                        .is_none_or(|t| t.authority.to_string() == "nest.test:1")
                },
                ConnectTerminateLayer::new().max_depth(3).layer(itself),
            ))
            .service(relay_to(echo))
    });
    let proxy = start(
        Server::new(),
        graph.map_request(|c: Conn<TcpStream>| c.boxed()),
    )
    .await;
    let mut conn = open_nested(proxy.addr, &[Hop::H2, Hop::H1, Hop::H2]).await;
    conn.write_all(b"steered").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"steered");
    proxy.shutdown().await;
}

/// A CONNECT proxy whose tunnels go to `upstream`, reporting for each tunnel whether the
/// stream handed to the inner service is the accepted TCP socket byte for byte (so the
/// relay may `splice(2)` it).
async fn raw_reporting_proxy(
    upstream: SocketAddr,
) -> (Running, tokio::sync::mpsc::UnboundedReceiver<bool>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let relay = relay_to(upstream);
    let reporting = service_fn(move |mut conn: Conn<BoxIo>| {
        let (relay, tx) = (relay.clone(), tx.clone());
        async move {
            // The tunnel's stream exists once the `200` is out; a flush waits for it.
            let _ = conn.flush().await;
            let _ = tx.send(proxystack::Io::raw_tcp_socket(&conn).is_some());
            relay.oneshot(conn).await
        }
    });
    (
        start(Server::new(), ConnectTerminate::new(reporting)).await,
        rx,
    )
}

/// Sends an HTTP/1.1 CONNECT head (and `early` bytes in the same write) and reads the
/// `200` head byte by byte, so nothing after it is consumed.
async fn h1_connect(proxy: SocketAddr, early: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut request = b"CONNECT x.test:1 HTTP/1.1\r\nHost: x.test:1\r\n\r\n".to_vec();
    request.extend_from_slice(early);
    s.write_all(&request).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 1024, "no end of head: {head:?}");
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("the proxy must answer")
            .unwrap();
        assert_eq!(n, 1, "closed inside the head: {head:?}");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    s
}

/// An HTTP/1.1 CONNECT tunnel over plain TCP is the accepted socket itself once hyper is
/// done with it (so it is spliced), and keeps FIN ↔ FIN in both directions and orders.
#[tokio::test]
async fn h1_tunnel_over_tcp_is_the_socket_and_half_closes() {
    for client_first in [true, false] {
        let (upstream, accepted) = one_upstream().await;
        let (proxy, mut raw) = raw_reporting_proxy(upstream).await;
        let mut t = h1_connect(proxy.addr, b"").await;
        let mut up = accepted.await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), raw.recv()).await;
        assert_eq!(got.unwrap(), Some(true), "the tunnel is not the raw socket");
        // Bigger than a pipe, so the spliced path loops.
        let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let (first, second): (&mut TcpStream, &mut TcpStream) = if client_first {
            (&mut t, &mut up)
        } else {
            (&mut up, &mut t)
        };
        let (write, read) = tokio::join!(
            async {
                first.write_all(&data).await.unwrap();
                first.shutdown().await.unwrap(); // FIN
            },
            async {
                let mut got = Vec::new();
                second.read_to_end(&mut got).await.unwrap(); // FIN
                got
            }
        );
        let () = write;
        assert!(
            read == data,
            "bytes differ ({} of {})",
            read.len(),
            data.len()
        );
        // The other direction is still open after the first FIN.
        second.write_all(b"after").await.unwrap();
        second.shutdown().await.unwrap();
        let mut got = Vec::new();
        first.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"after");
    }
}

/// Bytes a client sends right behind its CONNECT head (before the `200`) are read by hyper
/// with the head; they reach the upstream first, then the stream goes on.
#[tokio::test]
async fn h1_tunnel_passes_on_bytes_sent_with_the_connect_head() {
    let (upstream, accepted) = one_upstream().await;
    let (proxy, _raw) = raw_reporting_proxy(upstream).await;
    let mut t = h1_connect(proxy.addr, b"early ").await;
    t.write_all(b"late").await.unwrap();
    t.shutdown().await.unwrap();
    let mut up = accepted.await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), up.read_to_end(&mut got))
        .await
        .expect("the upstream must see the FIN")
        .unwrap();
    assert_eq!(got, b"early late");
    up.write_all(b"reply").await.unwrap();
    drop(up);
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"reply");
}

/// A reset on either side of a spliced HTTP/1.1 tunnel reaches the other side as a reset.
#[tokio::test]
async fn h1_tunnel_over_tcp_passes_resets_both_ways() {
    // The client resets.
    let (upstream, accepted) = one_upstream().await;
    let (proxy, _raw) = raw_reporting_proxy(upstream).await;
    let mut t = h1_connect(proxy.addr, b"").await;
    t.write_all(b"hello").await.unwrap();
    let mut up = accepted.await.unwrap();
    let mut got = [0u8; 5];
    up.read_exact(&mut got).await.unwrap();
    socket2::SockRef::from(&t)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(t);
    let err = expect_reset(&mut up).await;
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");

    // The upstream resets.
    let (upstream, accepted) = one_upstream().await;
    let (proxy, _raw) = raw_reporting_proxy(upstream).await;
    let mut t = h1_connect(proxy.addr, b"").await;
    t.write_all(b"hello").await.unwrap();
    let mut up = accepted.await.unwrap();
    let mut got = [0u8; 5];
    up.read_exact(&mut got).await.unwrap();
    socket2::SockRef::from(&up)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(up);
    let err = expect_reset(&mut t).await;
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
}

/// Bulk bytes both ways through two relays that hand h2 their buffers and write h2's
/// received `Bytes` in place (client side: TCP → pooled HTTP/2 CONNECT; server side: the
/// terminated stream → TCP): byte-identical across buffer growth, FIN ↔ END_STREAM.
#[tokio::test]
async fn bulk_through_h2_relays_is_byte_identical_and_half_closes() {
    let echo = echo_server().await;
    let proxy = proxy_to(echo, |t| t).await;
    let client_side = client_relay(proxy.addr).await;
    let app = TcpStream::connect(client_side.addr).await.unwrap();
    let data: Vec<u8> = (0..5 << 20).map(|i| (i * 7 % 253) as u8).collect();
    let (mut rd, mut wr) = app.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(100_000) {
            wr.write_all(chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap(); // FIN → END_STREAM → FIN at the echo server
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut got))
        .await
        .expect("the echo must end after our FIN")
        .unwrap();
    writer.await.unwrap();
    assert!(
        got == data,
        "bytes differ ({} of {})",
        got.len(),
        data.len()
    );
}

/// An upstream that stops reading stops the client after bounded buffering, also on the
/// relays' `Bytes` paths: the server side keeps unconsumed DATA charged to the stream
/// window, so the client side's h2 cannot take more than the window.
#[tokio::test]
async fn a_stalled_upstream_stalls_the_client_through_h2_relays() {
    let (upstream, accepted) = one_upstream().await;
    let proxy = proxy_to(upstream, |t| t).await;
    let client_side = client_relay(proxy.addr).await;
    let mut app = TcpStream::connect(client_side.addr).await.unwrap();
    let _up = accepted; // accepted but never read
    const CAP: usize = 96 << 20;
    let chunk = vec![5u8; 64 << 10];
    let mut sent = 0;
    while sent < CAP {
        match tokio::time::timeout(Duration::from_millis(500), app.write(&chunk)).await {
            Ok(r) => sent += r.unwrap(),
            Err(_) => break, // stalled
        }
    }
    assert!(
        sent < CAP,
        "{sent} bytes accepted without the upstream reading"
    );
}
