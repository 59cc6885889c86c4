//! Detection level: the layer and the router on real loopback sockets (the classifier's
//! properties are unit tests in `src/detect/classify.rs`).
#![cfg(feature = "detect")]

use std::time::{Duration, Instant};

use crate::common::*;
use proxystack::detect::{classify, DetectLayer, Protocol, Router, Undecided, Verdict, H2_PREFACE};
use proxystack::{tcp, BoxIo, Conn, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::ServiceBuilder;

/// What the inner service saw: the recorded protocol and every byte it could read.
async fn detect_server(
    layer: DetectLayer,
) -> (Running, mpsc::UnboundedReceiver<(Protocol, Vec<u8>)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let inner = tower::service_fn(move |conn: Conn<BoxIo>| {
        let tx = tx.clone();
        async move {
            let protocol = *conn.get::<Protocol>().unwrap();
            let (mut io, _) = conn.into_parts();
            let mut all = Vec::new();
            io.read_to_end(&mut all).await?;
            let _ = tx.send((protocol, all));
            Ok::<_, std::io::Error>(())
        }
    });
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    (start(Server::new(), svc).await, rx)
}

async fn send_in_pieces(addr: std::net::SocketAddr, pieces: &[&[u8]], gap: Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for p in pieces {
        s.write_all(p).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(gap).await;
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
}

#[tokio::test]
async fn preface_in_one_byte_writes_is_http2_and_replayed() {
    let (proxy, mut rx) = detect_server(DetectLayer::new()).await;
    let mut data = H2_PREFACE.to_vec();
    data.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"); // empty SETTINGS
    let pieces: Vec<&[u8]> = data.chunks(1).collect();
    send_in_pieces(proxy.addr, &pieces, Duration::from_millis(5)).await;
    let (protocol, bytes) = rx.recv().await.unwrap();
    assert_eq!(protocol, Protocol::Http2);
    assert_eq!(bytes, data, "every byte replayed, in order");
    proxy.shutdown().await;
}

#[tokio::test]
async fn short_first_segment_is_not_misclassified() {
    let (proxy, mut rx) = detect_server(DetectLayer::new()).await;
    let cases: [(&[&[u8]], Protocol); 4] = [
        (
            &[b"GET", b" /index.html HTTP/1.1\r\nHost: a\r\n\r\n"],
            Protocol::Http1,
        ),
        (&[b"PRI", b" * HTTP/2.0\r\n\r\nSM\r\n\r\n"], Protocol::Http2),
        (&[b"\x16\x03", b"\x01\x00\x05hello"], Protocol::Tls),
        (&[b"\x16", b"\x03", b"\x03"], Protocol::Tls),
    ];
    for (pieces, want) in cases {
        send_in_pieces(proxy.addr, pieces, Duration::from_millis(60)).await;
        let (protocol, bytes) = rx.recv().await.unwrap();
        assert_eq!(protocol, want, "{pieces:?}");
        assert_eq!(bytes, pieces.concat());
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn garbage_is_opaque_and_silence_times_out_to_undecided() {
    let (proxy, mut rx) =
        detect_server(DetectLayer::new().timeout(Some(Duration::from_millis(200)))).await;
    send_in_pieces(proxy.addr, &[b"\x00\xffgarbage\r\n"], Duration::ZERO).await;
    let (protocol, bytes) = rx.recv().await.unwrap();
    assert_eq!(protocol, Protocol::Opaque);
    assert_eq!(bytes, b"\x00\xffgarbage\r\n");

    // A partial request line, then silence: undecided (not opaque: it may well be HTTP)
    // after the timeout, bytes kept.
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GE").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
    s.shutdown().await.unwrap();
    let (protocol, bytes) = rx.recv().await.unwrap();
    assert_eq!(protocol, Protocol::Undecided);
    assert_eq!(bytes, b"GET / HTTP/1.1\r\n");
    assert!(started.elapsed() < Duration::from_secs(5));
    proxy.shutdown().await;
}

#[tokio::test]
async fn eof_before_any_byte_can_skip_the_inner_service() {
    let (proxy, mut rx) = detect_server(DetectLayer::new().on_empty_eof(None)).await;
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "inner service was called");
    let (proxy2, mut rx2) = detect_server(DetectLayer::new()).await;
    drop(TcpStream::connect(proxy2.addr).await.unwrap());
    let (protocol, bytes) = rx2.recv().await.unwrap();
    assert_eq!((protocol, bytes.len()), (Protocol::Undecided, 0));
    proxy.shutdown().await;
    proxy2.shutdown().await;
}

#[tokio::test]
async fn server_first_protocol_passes_through_after_timeout() {
    // The backend greets first; the client says nothing until it has the greeting.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"220 smtp.example ESMTP\r\n").await.unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"221 bye\r\n").await.unwrap();
    });
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &proxystack::Metadata| Some(Target::from(backend)));
    let svc = ServiceBuilder::new()
        .layer(DetectLayer::new().timeout(Some(Duration::from_millis(300))))
        .service(Router::new().opaque(relay.clone()).undecided(relay));
    let proxy = start(Server::new(), svc).await;
    let started = Instant::now();
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let mut greeting = [0u8; 24];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut greeting))
        .await
        .expect("greeting arrives after the detection timeout, not never")
        .unwrap();
    assert_eq!(&greeting, b"220 smtp.example ESMTP\r\n");
    assert!(started.elapsed() >= Duration::from_millis(250));
    c.write_all(b"QUIT\r\n").await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"221 bye\r\n");
    drop(c);
    proxy.shutdown().await;
}

#[tokio::test]
async fn router_sends_each_protocol_to_its_route_and_closes_unrouted() {
    let echo = echo_server().await;
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &proxystack::Metadata| Some(Target::from(echo)));
    let svc = ServiceBuilder::new()
        .layer(DetectLayer::new())
        .service(Router::new().http1(relay.clone()).opaque(relay));
    let proxy = start(Server::new(), svc).await;
    assert_eq!(
        round_trip(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await,
        b"GET / HTTP/1.1\r\n\r\n"
    );
    assert_eq!(
        round_trip(proxy.addr, b"\x01\x02\x03").await,
        b"\x01\x02\x03"
    );
    // No http2 route: the connection is closed without an answer.
    assert_eq!(round_trip(proxy.addr, H2_PREFACE).await, b"");
    proxy.shutdown().await;
}

/// Issue 14 item 1: what detection cannot decide is refused unless a route asks for it —
/// `400` when it resembles HTTP/1, a plain close otherwise — counted, and never handed to
/// the opaque route (a relay past HTTP policy).
#[tokio::test]
async fn router_refuses_undecided_without_a_route_and_answers_400_to_http_lookalikes() {
    let echo = echo_server().await;
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &proxystack::Metadata| Some(Target::from(echo)));
    let router = Router::new().http1(relay.clone()).opaque(relay);
    let stats = router.stats();
    let svc = ServiceBuilder::new()
        .layer(DetectLayer::new().timeout(Some(Duration::from_millis(300))))
        .service(router);
    let proxy = start(Server::new(), svc).await;
    let bad_request = &b"HTTP/1.1 400 Bad Request\r\n"[..];
    for odd in [
        &b"GET  /admin HTTP/1.1\r\n\r\n"[..],
        b"GET /admin http/1.1\r\n\r\n",
        b"GET\t/admin HTTP/1.1\r\n\r\n",
        b"GET /admin HTTP/2.0\r\n\r\n",
        b"GET /admin\r\n",
        b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA /admin HTTP/1.1\r\n\r\n",
        b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
    ] {
        let got = round_trip(proxy.addr, odd).await;
        assert!(
            got.starts_with(bad_request),
            "{:?}: {:?}",
            String::from_utf8_lossy(odd),
            String::from_utf8_lossy(&got)
        );
    }
    // A request line cut short by the timeout: 400 too; silence: closed, nothing relayed.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /adm").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(
        got.starts_with(bad_request),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"");
    // Definitely another protocol still goes to the opaque route.
    assert_eq!(
        round_trip(proxy.addr, b"\x01\x02\x03").await,
        b"\x01\x02\x03"
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.refused.load(Relaxed), 9);
    assert_eq!(stats.bad_requests.load(Relaxed), 8);
    proxy.shutdown().await;
}

#[tokio::test]
async fn undecided_reasons_are_recorded() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let inner = tower::service_fn(move |conn: Conn<BoxIo>| {
        let _ = tx.send((
            *conn.get::<Protocol>().unwrap(),
            conn.get::<Undecided>().copied(),
        ));
        async { Ok::<_, std::io::Error>(()) }
    });
    let svc = ServiceBuilder::new()
        .layer(DetectLayer::new().timeout(Some(Duration::from_millis(200))))
        .service(inner);
    let proxy = start(Server::new(), svc).await;
    let undecided = |why| (Protocol::Undecided, Some(why));
    let _silent = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), undecided(Undecided::Silent));
    drop(TcpStream::connect(proxy.addr).await.unwrap());
    assert_eq!(rx.recv().await.unwrap(), undecided(Undecided::Closed));
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"\x16\x03").await.unwrap();
    let http_like = false;
    assert_eq!(
        rx.recv().await.unwrap(),
        undecided(Undecided::Incomplete { http_like })
    );
    let mut s2 = TcpStream::connect(proxy.addr).await.unwrap();
    s2.write_all(b"GET  /").await.unwrap();
    assert_eq!(
        rx.recv().await.unwrap(),
        undecided(Undecided::MalformedHttp1)
    );
    drop((s, s2));
    proxy.shutdown().await;
}

#[test]
fn classify_examples_from_the_docs() {
    assert_eq!(classify(b"GET"), Verdict::NeedMore);
    assert_eq!(classify(H2_PREFACE), Verdict::Known(Protocol::Http2));
}

/// Issue 15 item 4: `RouterLayer` composes in a `ServiceBuilder` under `DetectLayer` and
/// over another layer: HTTP/1 goes to its route, the decided protocols without a route
/// (opaque bytes, the HTTP/2 preface) go on to the layered service, and an undecided
/// connection is still refused (`400`), never handed to that fallback.
#[tokio::test]
async fn router_layer_composes_in_service_builder_with_a_fallback() {
    use proxystack::detect::RouterLayer;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let echo = echo_server().await;
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &proxystack::Metadata| Some(Target::from(echo)));
    // The HTTP/1 route answers itself, so which service served is visible on the wire.
    let http1 = tower::service_fn(|conn: Conn<BoxIo>| async move {
        let (mut io, _) = conn.into_parts();
        // Read the request to its end first: closing with unread bytes would reset.
        io.read_to_end(&mut Vec::new()).await?;
        io.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
            .await?;
        io.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let fallbacks = Arc::new(AtomicUsize::new(0));
    let f = fallbacks.clone();
    let router = Router::new().http1(http1);
    let stats = router.stats();
    let svc = ServiceBuilder::new()
        .layer(DetectLayer::new().timeout(Some(Duration::from_millis(300))))
        .layer(RouterLayer::new(router))
        .layer(tower::util::MapRequestLayer::new(
            move |conn: Conn<BoxIo>| {
                f.fetch_add(1, Ordering::SeqCst);
                conn
            },
        ))
        .service(relay);
    let proxy = start(Server::new(), svc).await;

    let answer = round_trip(proxy.addr, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(answer.starts_with(b"HTTP/1.1 204"), "{answer:?}");
    assert_eq!(
        round_trip(proxy.addr, b"\x01\x02\x03").await,
        b"\x01\x02\x03"
    );
    assert_eq!(round_trip(proxy.addr, H2_PREFACE).await, H2_PREFACE);
    assert_eq!(fallbacks.load(Ordering::SeqCst), 2);

    let refused = round_trip(proxy.addr, b"GET  /admin HTTP/1.1\r\n\r\n").await;
    assert!(refused.starts_with(b"HTTP/1.1 400"), "{refused:?}");
    assert_eq!(
        fallbacks.load(Ordering::SeqCst),
        2,
        "undecided reached the fallback"
    );
    assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
    proxy.shutdown().await;
}
