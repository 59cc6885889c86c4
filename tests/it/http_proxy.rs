//! HTTP level: the reverse proxy with real clients (curl, h2load, hyper) on loopback.
#![cfg(feature = "http")]

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::http_common::*;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use proxystack::detect::{DetectLayer, Router};
use proxystack::http::{Forward, ForwardedMode, HttpServer, UpstreamProtocol};
use proxystack::{conn::PeerAddr, drain, tcp, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;

/// Detection in front, one HttpServer for HTTP/1 and h2c, forwarding to `backend`.
async fn detecting_proxy<R>(forward: Forward<tcp::TcpConnector, R>) -> Running
where
    R: Fn(&Request<Incoming>) -> Option<Target> + Send + Sync + 'static,
{
    let server = HttpServer::new(forward);
    let svc = ServiceBuilder::new()
        .layer(DetectLayer::new())
        .service(Router::new().http1(server.clone()).http2(server));
    serve(svc).await
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

macro_rules! need {
    ($prog:expr) => {
        if !have($prog) {
            println!("SKIPPED: {} not installed", $prog);
            return;
        }
    };
}

#[tokio::test]
async fn curl_http1_and_h2c_through_the_proxy() {
    need!("curl");
    init_tracing();
    let b = backend().await;
    let proxy = detecting_proxy(forward_to(b.addr)).await;
    let url = format!("http://{}/headers", proxy.addr);

    let out = curl(&["--http1.1", "-w", "\n%{http_code} %{http_version}", &url])
        .await
        .unwrap();
    let t = text(&out);
    assert!(t.ends_with("200 1.1"), "{t}");
    assert!(t.contains("version: HTTP/1.1"), "{t}");
    assert!(t.contains(&format!("host: {}", proxy.addr)), "{t}");

    let out = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_code} %{http_version}",
        &url,
    ])
    .await
    .unwrap();
    let t = text(&out);
    assert!(t.ends_with("200 2"), "client spoke h2: {t}");
    // Default upstream protocol is HTTP/1.1: :authority became Host.
    assert!(t.contains("version: HTTP/1.1"), "{t}");
    assert!(t.contains(&format!("host: {}", proxy.addr)), "{t}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2load_h2c_bounded_run() {
    need!("h2load");
    let b = backend().await;
    let proxy =
        detecting_proxy(forward_to(b.addr).upstream_protocol(UpstreamProtocol::Http2)).await;
    let out = tokio::process::Command::new("h2load")
        .args(["-n", "200", "-c", "4", "-m", "10", "-T", "20"])
        .arg(format!("http://{}/", proxy.addr))
        .output()
        .await
        .unwrap();
    let t = text(&out);
    assert!(
        t.contains("200 total") || t.contains("requests: 200 total"),
        "{t}"
    );
    assert!(t.contains("200 succeeded, 0 failed"), "{t}");
    assert!(t.contains("status codes: 200 2xx"), "{t}");
    assert_eq!(b.seen.complete.load(Ordering::SeqCst), 200);
    proxy.shutdown().await;
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.unwrap();
        assert!(n == 1, "EOF in head: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test]
async fn websocket_upgrade_is_relayed_after_101() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("sec-websocket-accept: test"), "{head}");
    for msg in [&b"ping"[..], b"\x81\x05hello", &[0u8; 3000]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    proxy.shutdown().await;
}

#[tokio::test]
async fn upgrade_answered_200_is_not_an_upgrade() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws200 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("upgrade:"),
        "Upgrade must not reach the client: {head}"
    );
    let mut body = [0u8; 12];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"not upgraded");
    // The connection is still HTTP: a smuggled-looking request is parsed as HTTP, not
    // relayed as raw bytes to the upstream.
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_fields_are_removed() {
    need!("curl");
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let url = format!("http://{}/headers", proxy.addr);
    let out = curl(&[
        "--http1.1",
        "-H",
        "Connection: keep-alive, X-Secret",
        "-H",
        "X-Secret: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "Proxy-Connection: keep-alive",
        "-H",
        "Proxy-Authorization: Basic Zm9vOmJhcg==",
        "-H",
        "TE: trailers, deflate",
        "-H",
        "Upgrade: h2c",
        "-H",
        "X-End-To-End: kept",
        &url,
    ])
    .await
    .unwrap();
    let t = text(&out).to_ascii_lowercase();
    for gone in [
        "x-secret",
        "keep-alive:",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
        "connection:",
    ] {
        assert!(!t.contains(gone), "{gone} leaked: {t}");
    }
    assert!(t.contains("te: trailers\n"), "{t}");
    assert!(t.contains("x-end-to-end: kept"), "{t}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn forwarded_headers_overwrite_append_and_ipv6_quoting() {
    need!("curl");
    let b = backend().await;
    let upstream = b.addr;
    // IPv6 loopback listener for the proxy, so the client address is IPv6.
    let listener = match TcpListener::bind("[::1]:0").await {
        Ok(l) => l,
        Err(e) => {
            println!("SKIPPED: no IPv6 loopback ({e})");
            return;
        }
    };
    let addr = listener.local_addr().unwrap();
    let fwd = forward_to(upstream)
        .forwarded(ForwardedMode::Overwrite)
        .x_forwarded(ForwardedMode::Overwrite)
        .via(Some("proxystack"));
    let (signal, watch) = drain::channel();
    let task = tokio::spawn(async move {
        Server::new()
            .serve(listener, HttpServer::new(fwd), watch)
            .await
    });
    let url = format!("http://{addr}/headers");
    let out = curl(&[
        "--http1.1",
        "-H",
        "Forwarded: for=6.6.6.6",
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        &url,
    ])
    .await
    .unwrap();
    let t = text(&out);
    let lines: Vec<&str> = t.lines().collect();
    let fwd_line = lines.iter().find(|l| l.starts_with("forwarded: ")).unwrap();
    // for="[::1]:PORT";host="[::1]:PORT";proto=http — quoted per RFC 7239 §6.
    assert!(
        fwd_line.starts_with("forwarded: for=\"[::1]:"),
        "{fwd_line}"
    );
    assert!(
        fwd_line.contains(&format!(";host=\"{addr}\";proto=http")),
        "{fwd_line}"
    );
    assert!(
        !t.contains("6.6.6.6"),
        "client-supplied values survive overwrite: {t}"
    );
    assert!(t.contains("x-forwarded-for: ::1\n"), "{t}");
    assert!(t.contains("x-forwarded-proto: http\n"), "{t}");
    assert!(t.contains("via: 1.1 proxystack\n"), "{t}");
    signal.start();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;

    // Append mode keeps the (trusted) earlier hops.
    let proxy = serve_http(HttpServer::new(
        forward_to(upstream)
            .forwarded(ForwardedMode::Append)
            .x_forwarded(ForwardedMode::Append),
    ))
    .await;
    let url = format!("http://{}/headers", proxy.addr);
    let out = curl(&[
        "-H",
        "Forwarded: for=192.0.2.1",
        "-H",
        "X-Forwarded-For: 192.0.2.1",
        &url,
    ])
    .await
    .unwrap();
    let t = text(&out);
    assert!(
        t.contains("forwarded: for=192.0.2.1, for=\"127.0.0.1:"),
        "{t}"
    );
    assert!(t.contains("x-forwarded-for: 192.0.2.1, 127.0.0.1\n"), "{t}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    need!("curl");
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = serve_http(HttpServer::new(forward_to(dead))).await;
    let out = curl(&["-w", "\n%{http_code}", &format!("http://{}/", proxy.addr)])
        .await
        .unwrap();
    assert_eq!(text(&out), "upstream unreachable\n\n502");
    proxy.shutdown().await;

    let b = backend().await;
    let proxy = serve_http(HttpServer::new(
        forward_to(b.addr).timeout(Some(Duration::from_millis(300))),
    ))
    .await;
    let out = curl(&[
        "-w",
        "\n%{http_code}",
        &format!("http://{}/slow?ms=3000", proxy.addr),
    ])
    .await
    .unwrap();
    assert_eq!(text(&out), "upstream timed out\n\n504");
    // A fast request on the same proxy still works.
    let out = curl(&[
        "-w",
        "\n%{http_code}",
        &format!("http://{}/slow?ms=10", proxy.addr),
    ])
    .await
    .unwrap();
    assert_eq!(text(&out), "slow\n200");
    proxy.shutdown().await;
}

#[tokio::test]
async fn h1_client_to_h2_upstream_and_back() {
    need!("curl");
    let b = backend().await;
    let proxy =
        detecting_proxy(forward_to(b.addr).upstream_protocol(UpstreamProtocol::Http2)).await;
    let out = curl(&[
        "--http1.1",
        "-H",
        "Host: api.example:8080",
        "-w",
        "\n%{http_version}",
        &format!("http://{}/headers?q=1", proxy.addr),
    ])
    .await
    .unwrap();
    let t = text(&out);
    assert!(t.contains("version: HTTP/2.0"), "{t}");
    assert!(
        t.contains("uri: http://api.example:8080/headers?q=1"),
        ":authority from Host: {t}"
    );
    assert!(!t.contains("\nhost:"), "no Host next to :authority: {t}");
    assert!(t.ends_with("\n1.1"), "{t}");

    // h2 client → h1 upstream: :authority becomes Host.
    let proxy2 = detecting_proxy(forward_to(b.addr)).await;
    let mut send = h2_client(proxy2.addr).await;
    let req = Request::get("http://api.example:8443/headers")
        .body(empty())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(t.contains("version: HTTP/1.1"), "{t}");
    assert!(t.contains("host: api.example:8443\n"), "{t}");
    assert!(t.contains("uri: /headers\n"), "{t}");

    // h2 with a Host that disagrees with :authority is refused.
    let req = Request::get("http://a.example/headers")
        .header("host", "b.example")
        .body(empty())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    proxy.shutdown().await;
    proxy2.shutdown().await;
}

/// 8 MiB each way through `/echo`: the first echoed bytes must arrive while most of the
/// request body has not even been produced yet, so neither direction is buffered whole.
async fn stream_both_ways(h2: bool) {
    const TOTAL: usize = 8 << 20;
    const CHUNK: usize = 64 * 1024;
    let b = backend().await;
    let fwd = forward_to(b.addr).upstream_protocol(UpstreamProtocol::MatchClient);
    let proxy = serve_http(HttpServer::new(fwd)).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let req = Request::post("http://echo.test/echo")
        .body(http_body_util::BodyExt::boxed_unsync(ChannelBody(rx)))
        .unwrap();
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    tx.send(chunk.clone()).await.unwrap();
    let resp = if h2 {
        let mut send = h2_client(proxy.addr).await;
        tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await
    } else {
        let mut send = h1_client(proxy.addr).await;
        tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await
    }
    .expect("response head before the request body ended")
    .unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first echoed bytes before the request body ended")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let mut received = first.len();
    let sender = tokio::spawn(async move {
        for _ in 1..TOTAL / CHUNK {
            tx.send(chunk.clone()).await.unwrap();
        }
    });
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            assert!(data.iter().all(|&b| b == 7));
            received += data.len();
        }
    }
    sender.await.unwrap();
    assert_eq!(received, TOTAL);
    proxy.shutdown().await;
}

#[tokio::test]
async fn streams_8mib_both_ways_http1() {
    stream_both_ways(false).await;
}

#[tokio::test]
async fn streams_8mib_both_ways_http2() {
    stream_both_ways(true).await;
}

#[tokio::test]
async fn upstream_connections_are_pooled() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    for _ in 0..5 {
        let mut send = h1_client(proxy.addr).await; // a new client connection each time
        let resp = send
            .send_request(Request::get("/").header("host", "x").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok 0");
    }
    assert_eq!(b.seen.complete.load(Ordering::SeqCst), 5);
    assert_eq!(
        b.seen.connections.load(Ordering::SeqCst),
        1,
        "one pooled upstream connection"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn connection_metadata_reaches_request_extensions_and_drain_closes() {
    let svc = tower::service_fn(|req: Request<Incoming>| async move {
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.to_string());
        Ok::<_, std::convert::Infallible>(http::Response::new(body(peer.unwrap_or_default())))
    });
    let mut proxy = serve_http(HttpServer::new(svc)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let me = s.local_addr().unwrap().to_string();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    let mut peer = vec![0u8; len];
    s.read_exact(&mut peer).await.unwrap();
    assert_eq!(String::from_utf8(peer).unwrap(), me);
    // Drain: the idle keep-alive connection is closed by the server.
    proxy.signal.take().unwrap().start();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("idle connection closed on drain")
        .unwrap();
    assert!(rest.is_empty());
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Issue 14 items 3 and 6: the scheme is a fact about the connection; at the edge, every
// forwarding field the client sent is dropped.

/// The `/headers` page through `proxy` for a raw HTTP/1.1 request (the body).
async fn raw_headers_page(proxy: std::net::SocketAddr, request: &str) -> String {
    let (out, _) = raw_exchange(proxy, request.as_bytes(), Duration::from_secs(10)).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(status_of(out.as_bytes()), Some(200), "{out}");
    out
}

/// `GET https://…` in HTTP/1.1 or `:scheme: https` over h2c, on a cleartext connection,
/// does not make the proxy tell the origin the client used TLS: `X-Forwarded-Proto`,
/// `Forwarded: proto=` and the upstream `:scheme` say `http`. A TLS connection that
/// `TerminateLayer` terminated says `https` without any hand-inserted `RequestScheme`; the
/// outer TLS of a tunnel (HBONE) does not count for the cleartext inside it.
#[tokio::test]
async fn forwarding_proto_comes_from_the_connection_not_the_request() {
    need!("curl");
    let b = backend().await;
    let edge = |fwd: Forward<tcp::TcpConnector, _>| {
        fwd.forwarded(ForwardedMode::Overwrite)
            .x_forwarded(ForwardedMode::Overwrite)
            .upstream_protocol(UpstreamProtocol::MatchClient)
    };
    let proxy = detecting_proxy(edge(forward_to(b.addr))).await;

    // HTTP/1.1, absolute-form https target on a cleartext connection.
    let t = raw_headers_page(
        proxy.addr,
        "GET https://app.example.com/headers HTTP/1.1\r\nHost: app.example.com\r\n\
         X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(t.contains("x-forwarded-proto: http\n"), "{t}");
    assert!(t.contains(";proto=http\n"), "{t}");
    assert!(!t.contains("https"), "the client's scheme leaked: {t}");

    // h2c with `:scheme: https` (hyper sends the URI's scheme), to an h2 upstream.
    let mut send = h2_client(proxy.addr).await;
    let req = Request::get("https://app.example.com/headers")
        .body(empty())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(t.contains("version: HTTP/2.0"), "{t}");
    assert!(
        t.contains("uri: http://app.example.com/headers\n"),
        "upstream :scheme: {t}"
    );
    assert!(t.contains("x-forwarded-proto: http\n"), "{t}");
    assert!(!t.contains("https"), "the client's :scheme leaked: {t}");

    // The same through curl's h2c client, for good measure.
    let out = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "X-Forwarded-Proto: https",
        &format!("http://{}/headers", proxy.addr),
    ])
    .await
    .unwrap();
    let t = text(&out);
    assert!(t.contains("x-forwarded-proto: http\n"), "{t}");
    proxy.shutdown().await;

    // A tunnel's metadata nests the outer (TLS) connection under `Outer`: the HTTP inside
    // is cleartext, and it says so.
    #[cfg(all(feature = "connect", feature = "tls"))]
    {
        use proxystack::connect::Outer;
        use std::sync::Arc;
        use tower::ServiceExt;
        let fwd = edge(forward_to(b.addr));
        let in_tunnel = tower::service_fn(move |mut req: Request<Incoming>| {
            let mut outer = http::Extensions::new();
            outer.insert(proxystack::tls::TlsInfo {
                version: proxystack::tls::ProtocolVersion::TLSv1_3,
                cipher: proxystack::tls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            });
            req.extensions_mut().insert(Outer(Arc::new(outer)));
            fwd.clone().oneshot(req)
        });
        let proxy = serve_http(HttpServer::new(in_tunnel)).await;
        let t = raw_headers_page(
            proxy.addr,
            "GET /headers HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(t.contains("x-forwarded-proto: http\n"), "{t}");
        proxy.shutdown().await;
    }

    // A TLS connection: `https`, from `TlsInfo`, with no `RequestScheme` inserted by hand.
    #[cfg(all(feature = "tls", feature = "demo-certs"))]
    {
        use proxystack::tls::{demo::DemoCa, ServerConfigBuilder, TerminateLayer};
        let ca = DemoCa::new("example.org");
        let config = ServerConfigBuilder::new()
            .cert_for("app.example.com", ca.server_cert(&["app.example.com"]))
            .alpn(["h2", "http/1.1"])
            .build()
            .unwrap();
        let server = HttpServer::new(edge(forward_to(b.addr)));
        let proxy = serve(
            ServiceBuilder::new()
                .layer(TerminateLayer::new(config))
                .service(server),
        )
        .await;
        let ca_file = std::env::temp_dir().join(format!(
            "proxystack-http-proxy-scheme-{}.pem",
            std::process::id()
        ));
        std::fs::write(&ca_file, ca.root_pem()).unwrap();
        let port = proxy.addr.port();
        for version in ["--http1.1", "--http2"] {
            let out = curl(&[
                version,
                "--cacert",
                &ca_file.to_string_lossy(),
                "--resolve",
                &format!("app.example.com:{port}:127.0.0.1"),
                &format!("https://app.example.com:{port}/headers"),
            ])
            .await
            .unwrap();
            let t = text(&out);
            assert!(t.contains("x-forwarded-proto: https\n"), "{version}: {t}");
            assert!(t.contains(";proto=https\n"), "{version}: {t}");
        }
        let _ = std::fs::remove_file(ca_file);
        proxy.shutdown().await;
    }
}

/// What a client may send to look like it came through other proxies, or to steer an
/// origin's idea of its own URL.
const FORGED_FORWARDING_FIELDS: &[(&str, &str)] = &[
    ("Forwarded", "for=6.6.6.6;proto=https"),
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "666"),
    ("X-Forwarded-Prefix", "/evil"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Forwarded-Ssl", "on"),
    ("X-Forwarded-Server", "evil.example"),
    ("X-Forwarded-Uri", "/evil"),
    ("X-Original-Forwarded-For", "6.6.6.6"),
    ("X-Original-URL", "/evil"),
    ("X-Real-IP", "6.6.6.6"),
];

/// `ForwardedMode::Overwrite` (on either field family) drops every `Forwarded`,
/// `X-Forwarded-*`, `X-Real-IP` and `X-Original-*` field the client sent, over HTTP/1.1
/// and h2c, and writes only this hop's; unrelated fields pass; `Append` keeps them.
#[tokio::test]
async fn overwrite_drops_every_client_forwarding_field() {
    need!("curl");
    let b = backend().await;
    let mut args: Vec<String> = Vec::new();
    for (name, value) in FORGED_FORWARDING_FIELDS {
        args.push("-H".into());
        args.push(format!("{name}: {value}"));
    }
    args.extend(["-H".into(), "X-Forwarded: kept".into()]);
    args.extend(["-H".into(), "X-Originals: kept".into()]);
    let modes = [
        (ForwardedMode::Overwrite, ForwardedMode::Overwrite),
        (ForwardedMode::Overwrite, ForwardedMode::Off),
        (ForwardedMode::Off, ForwardedMode::Overwrite),
        (ForwardedMode::Append, ForwardedMode::Overwrite),
    ];
    for (forwarded, x_forwarded) in modes {
        let fwd = forward_to(b.addr)
            .forwarded(forwarded)
            .x_forwarded(x_forwarded);
        let proxy = detecting_proxy(fwd).await;
        let url = format!("http://{}/headers", proxy.addr);
        for version in ["--http1.1", "--http2-prior-knowledge"] {
            let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
            a.extend([version, url.as_str()]);
            let t = text(&curl(&a).await.unwrap());
            let mode = format!("{forwarded:?}/{x_forwarded:?} {version}");
            assert!(t.starts_with("method: GET"), "{mode}: {t}");
            assert!(!t.contains("6.6.6.6"), "{mode}: {t}");
            assert!(!t.contains("evil"), "{mode}: {t}");
            assert!(!t.contains("https"), "{mode}: {t}");
            for name in [
                "x-forwarded-port",
                "x-forwarded-ssl",
                "x-real-ip",
                "x-original-",
            ] {
                assert!(!t.contains(name), "{mode}: {name} passed: {t}");
            }
            assert!(t.contains("x-forwarded: kept\n"), "{mode}: {t}");
            assert!(t.contains("x-originals: kept\n"), "{mode}: {t}");
            let hop_forwarded = t.contains("forwarded: for=\"127.0.0.1:");
            assert_eq!(
                hop_forwarded,
                forwarded != ForwardedMode::Off,
                "{mode}: {t}"
            );
            let hop_xff = t.contains("x-forwarded-for: 127.0.0.1\n")
                && t.contains("x-forwarded-proto: http\n");
            assert_eq!(hop_xff, x_forwarded != ForwardedMode::Off, "{mode}: {t}");
        }
        proxy.shutdown().await;
    }

    // Append (a proxy behind trusted ones) keeps what earlier hops wrote.
    let proxy = detecting_proxy(
        forward_to(b.addr)
            .forwarded(ForwardedMode::Append)
            .x_forwarded(ForwardedMode::Append),
    )
    .await;
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    let url = format!("http://{}/headers", proxy.addr);
    a.push(&url);
    let t = text(&curl(&a).await.unwrap());
    assert!(t.contains("x-forwarded-prefix: /evil\n"), "{t}");
    assert!(t.contains("x-real-ip: 6.6.6.6\n"), "{t}");
    assert!(t.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1\n"), "{t}");
    proxy.shutdown().await;
}
