//! CONNECT level: H1 and H2 tunnels, nesting, pooling, status codes — real sockets, curl.
#![cfg(feature = "connect")]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::StatusCode;
use proptest::prelude::*;
use proxystack::conn::Metadata;
use proxystack::conn::{BoxInbound, BoxIo};
use proxystack::connect::{
    ConnectAuthority, ConnectTerminate, Decision, H2ConnectPool, H2Settings, Http1ConnectConnector,
    TunnelError, TunnelInfo,
};
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
    let pool = H2ConnectPool::with_settings(
        tcp::TcpConnector::new(),
        H2Settings {
            max_streams_per_connection: 100,
            ..Default::default()
        },
    );
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

/// An upstream reset ends the HTTP/2 tunnel at once. Like ztunnel (#1483) it arrives as
/// END_STREAM: hyper's upgraded streams cannot send RST_STREAM with a chosen code (see
/// the CHANGELOG's known limitations).
#[tokio::test]
async fn upstream_reset_ends_the_h2_tunnel_promptly() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    });
    let proxy = proxy_to(upstream, |t| t).await;
    let target =
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse("x.test:1").unwrap()));
    let mut t = H2ConnectPool::new(tcp::TcpConnector::new())
        .oneshot(target)
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the tunnel must end when its upstream resets");
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
