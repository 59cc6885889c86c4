//! Panics in connection work: a panic in a connection task, in an HTTP/2 stream task (spawned
//! by hyper) or in a tunnel task (spawned by the CONNECT terminator) is caught, logged and
//! counted in the server's `ServeStats::panics`, and the listener — and, for streams, the
//! connection — keeps serving.
#![cfg(all(feature = "http", feature = "connect"))]

use crate::common;
use crate::http_common;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use proxystack::connect::{ConnectAuthority, ConnectTerminate, H2ConnectPool};
use proxystack::http::HttpServer;
use proxystack::{tcp, Authority, BoxError, Conn, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::{service_fn, ServiceExt};

const WAIT: Duration = Duration::from_secs(10);

/// Waits (bounded) until `counter` reaches `want`.
async fn until(counter: &std::sync::atomic::AtomicU64, want: u64) {
    tokio::time::timeout(WAIT, async {
        while counter.load(Ordering::Relaxed) < want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("counter stayed at {}", counter.load(Ordering::Relaxed)));
}

#[tokio::test]
async fn panicking_connection_is_counted_and_the_listener_survives() {
    // First byte `!` panics the connection task; anything else is echoed.
    let svc = service_fn(|conn: Conn<TcpStream>| async move {
        let (mut io, _) = conn.into_parts();
        let mut first = [0u8; 1];
        io.read_exact(&mut first).await?;
        if first[0] == b'!' {
            panic!("test panic in a connection task");
        }
        io.write_all(&first).await?;
        Ok::<_, BoxError>(())
    });
    let proxy = common::start(Server::new(), svc).await;
    let mut bad = TcpStream::connect(proxy.addr).await.unwrap();
    bad.write_all(b"!").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, bad.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        buf.is_empty(),
        "a panicking connection is closed without output"
    );
    until(&proxy.stats.panics, 1).await;
    assert_eq!(common::round_trip(proxy.addr, b"x").await, b"x");
    assert_eq!(proxy.stats.panics.load(Ordering::Relaxed), 1);
    proxy.shutdown().await;
}

fn panicking_handler() -> HttpServer<
    impl tower::Service<
            Request<Incoming>,
            Response = Response<String>,
            Error = Infallible,
            Future = impl Send,
        > + Clone,
> {
    HttpServer::new(service_fn(|req: Request<Incoming>| async move {
        if req.uri().path() == "/panic" {
            panic!("test panic in a request handler");
        }
        Ok::<_, Infallible>(Response::new(String::from("ok")))
    }))
}

#[tokio::test]
async fn panicking_http1_handler_closes_only_its_connection() {
    let proxy = common::start(Server::new(), panicking_handler()).await;
    let (raw, _) =
        http_common::raw_exchange(proxy.addr, b"GET /panic HTTP/1.1\r\nHost: t\r\n\r\n", WAIT)
            .await;
    assert!(raw.is_empty(), "no response after the panic: {raw:?}");
    until(&proxy.stats.panics, 1).await;
    let mut client = http_common::h1_client(proxy.addr).await;
    let ok = client
        .send_request(
            Request::get("/")
                .header("host", "t")
                .body(http_common::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn panicking_http2_stream_is_counted_and_the_connection_keeps_serving() {
    let proxy = common::start(Server::new(), panicking_handler()).await;
    let mut client = http_common::h2_client(proxy.addr).await;
    let failed = client
        .send_request(Request::get("/panic").body(http_common::empty()).unwrap())
        .await;
    assert!(failed.is_err(), "the panicking stream is reset");
    until(&proxy.stats.panics, 1).await;
    // Same HTTP/2 connection: the other streams are unaffected.
    let ok = client
        .send_request(Request::get("/").body(http_common::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(proxy.stats.accepted.load(Ordering::Relaxed), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn panicking_tunnel_is_counted_and_the_next_tunnel_works() {
    let echo = common::echo_server().await;
    // Tunnels to port 1 panic in the tunnel task; the others are relayed to the echo server.
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &proxystack::conn::Metadata| Some(Target::from(echo)));
    let inner = service_fn(move |conn: Conn<proxystack::BoxIo>| {
        let relay = relay.clone();
        async move {
            let port = conn
                .get::<proxystack::connect::TunnelInfo>()
                .map(|t| t.authority.port());
            if port == Some(1) {
                panic!("test panic in a tunnel task");
            }
            relay.oneshot(conn).await
        }
    });
    let proxy = common::start(Server::new(), ConnectTerminate::new(inner)).await;
    let pool = H2ConnectPool::new(tcp::TcpConnector::new());
    let to = |authority: &str| {
        Target::from(proxy.addr).with(ConnectAuthority(Authority::parse(authority).unwrap()))
    };
    let refused = pool.clone().oneshot(to("panic.test:1")).await;
    assert!(
        refused.is_err(),
        "a tunnel whose task panicked is not opened"
    );
    until(&proxy.stats.panics, 1).await;
    let mut tunnel = pool.clone().oneshot(to("echo.test:7")).await.unwrap();
    tunnel.write_all(b"still tunnelling").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut got = Vec::new();
    tunnel.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"still tunnelling");
    assert_eq!(proxy.stats.panics.load(Ordering::Relaxed), 1);
    proxy.shutdown().await;
}
