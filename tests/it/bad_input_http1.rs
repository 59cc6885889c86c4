//! HTTP/1.1 bad inputs at the gateway / waypoint L7 level (REFERENCE.md §4.2 "HTTP/1.1",
//! incl. "H2→H1 translation"), all in this one file: CL+TE and the other smuggling heads,
//! invalid chunk sizes, h2c upgrades, slowloris heads and slow bodies; Transfer-Encoding case variants, chunk extensions, bare CR and control characters,
//! underscore names, size limits, HTTP/1.0 and missing Host, absolute-form URIs, requests
//! pipelined behind CONNECT, CONNECT with a body, path tricks, forged forwarding headers,
//! HTTP/2 requests whose fields must not be translated into HTTP/1, and requests behind an
//! upgrade request that did not switch protocols.
//!
//! Target: `http::HttpServer` + `http::Forward` (and `connect::ConnectTerminate` for
//! CONNECT over HTTP/1.1). Each case asserts the exact answer, what the upstream received
//! (a hyper backend, or a raw one that records the request head byte for byte), and that
//! the proxy still serves the next good connection.
#![cfg(all(feature = "http", feature = "connect"))]

use crate::common;
use crate::http_common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{h2_frame, h2f, hpack_literal, hpack_literals, init_tracing, RawH2};
use crate::http_common::{
    assert_still_serves, backend, forward_to, raw_exchange, serve_http, status_of, Backend,
};
use http::{Request, StatusCode};
use proxystack::conn::Metadata;
use proxystack::connect::{ConnectTerminate, Decision};
use proxystack::http::{ForwardedMode, HttpServer};
use proxystack::{tcp, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(5);

/// Sends `request` on a new connection; returns everything the proxy answered until it
/// closed (which it must, within `WAIT`).
async fn exchange(proxy: SocketAddr, request: &[u8]) -> String {
    let (out, closed) = raw_exchange(proxy, request, WAIT).await;
    assert!(
        closed,
        "connection left open: {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The status codes of every response in `raw`, in order.
fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

fn reset(b: &Backend) {
    b.seen.heads.store(0, Ordering::SeqCst);
    b.seen.complete.store(0, Ordering::SeqCst);
}

/// An upstream that records each request head byte for byte, answers `200 ok` and closes.
#[derive(Clone)]
struct RawBackend {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl RawBackend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let h = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 256 * 1024 {
                        match s.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    h.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self { addr, heads }
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.heads.lock().unwrap())
    }
}

// =======================================================================================
// Framing: Transfer-Encoding variants, chunk extensions, bare CR, control characters

/// Transfer-Encoding with another case (`CHUNKED`, `Chunked`, an upper-case field name) is
/// the same coding (RFC 9112 §7: case-insensitive): the body is decoded as chunked and the
/// request behind it is a separate request — no desync. Together with Content-Length it is
/// refused like any CL+TE.
#[tokio::test]
async fn transfer_encoding_case_variants_are_chunked_without_desync() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    for (name, te) in [
        ("upper-case value", "Transfer-Encoding: CHUNKED"),
        ("mixed-case value", "Transfer-Encoding: Chunked"),
        ("upper-case name", "TRANSFER-ENCODING: chunked"),
    ] {
        let request = format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\n{te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
             GET /headers HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        );
        let out = exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&out), [200, 200], "{name}: {out}");
        assert!(
            out.contains("ok 5"),
            "{name}: body not decoded as chunked: {out}"
        );
        assert!(out.contains("uri: /headers"), "{name}: {out}");
        assert_eq!(b.seen.heads.load(Ordering::SeqCst), 2, "{name}");
        assert_eq!(b.seen.complete.load(Ordering::SeqCst), 2, "{name}");
        reset(&b);

        let smuggle = format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n{te}\r\n\r\n0\r\n\r\nG"
        );
        let out = exchange(proxy.addr, smuggle.as_bytes()).await;
        assert_eq!(statuses(&out), [400], "{name} + CL: {out}");
        assert_eq!(b.seen.heads.load(Ordering::SeqCst), 0, "{name} + CL");
    }
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}

/// Chunk extensions (RFC 9112 §7.1.1) are legal and ignored (never forwarded: the body is
/// re-framed): plain, quoted (with `;` inside the quotes) and with whitespace before the
/// `;` all decode to the same body. Malformed ones — a bare LF or a control character
/// inside, more extension bytes than hyper's limit, a bare CR after the size — fail the
/// body: `400` for the client, and the upstream never gets a complete request (the head
/// may already be on its way: bodies stream). A control character in an extension also
/// ends the connection, so the strict head check cannot be switched off for a request
/// pipelined behind it (regression: it used to be tolerated, and turned the check off).
#[tokio::test]
async fn chunk_extensions_valid_and_malformed() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let body = |chunks: &str| {
        format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n{chunks}"
        )
    };
    for (name, chunks) in [
        ("name=value", "5;name=value\r\nhello\r\n0\r\n\r\n"),
        ("name only", "5;ext\r\nhello\r\n0;last\r\n\r\n"),
        ("quoted with ;", "5;n=\"a;b\"\r\nhello\r\n0\r\n\r\n"),
        ("whitespace before ;", "5 ;n=v\r\nhello\r\n0\r\n\r\n"),
    ] {
        let out = exchange(proxy.addr, body(chunks).as_bytes()).await;
        assert_eq!(statuses(&out), [200], "{name}: {out}");
        assert!(out.ends_with("ok 5"), "{name}: {out}");
    }
    assert_eq!(b.seen.complete.load(Ordering::SeqCst), 4);
    reset(&b);
    let huge = format!("5;x={}\r\nhello\r\n0\r\n\r\n", "e".repeat(20 * 1024));
    for (name, chunks) in [
        (
            "bare LF in extension",
            "5;ext\nhello\r\n0\r\n\r\n".to_string(),
        ),
        (
            "NUL in extension",
            "5;e\0x\r\nhello\r\n0\r\n\r\n".to_string(),
        ),
        ("bare CR after size", "5\rhello\r\n0\r\n\r\n".to_string()),
        ("20 KiB extension", huge),
    ] {
        let out = exchange(proxy.addr, body(&chunks).as_bytes()).await;
        assert_eq!(statuses(&out), [400], "{name}: {out}");
        assert_eq!(b.seen.complete.load(Ordering::SeqCst), 0, "{name}");
        assert_still_serves(proxy.addr).await;
        reset(&b);
    }
    // Behind a tolerated-looking extension, a head the strict check refuses (bare LF).
    let pipelined = "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                     5;e\x01x\r\nhello\r\n0\r\n\r\n\
                     GET /headers HTTP/1.1\nHost: a\nConnection: close\n\n";
    let out = exchange(proxy.addr, pipelined.as_bytes()).await;
    assert_eq!(statuses(&out), [400], "{out}");
    assert!(!out.contains("uri: /headers"), "{out}");
    proxy.shutdown().await;
}

/// Bare CR (RFC 9112 §2.2: a recipient of a bare CR MUST treat it as invalid or replace it
/// with SP before processing) and other control characters anywhere in the head: `400`
/// before anything reaches the upstream.
#[tokio::test]
async fn bare_cr_and_control_characters_in_the_head_are_400() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let cases: [(&str, &[u8]); 8] = [
        (
            "bare CR ending the request line",
            b"GET / HTTP/1.1\rHost: a\r\n\r\n",
        ),
        (
            "bare CR in a value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
        ),
        (
            "bare CR in a name",
            b"GET / HTTP/1.1\r\nX\rY: a\r\nHost: a\r\n\r\n",
        ),
        (
            "bare CR in the target",
            b"GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        (
            "NUL in the target",
            b"GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        (
            "NUL in a name",
            b"GET / HTTP/1.1\r\nX\0Y: a\r\nHost: a\r\n\r\n",
        ),
        (
            "DEL in a value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n\r\n",
        ),
        (
            "SOH in a value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n",
        ),
    ];
    for (name, request) in cases {
        let out = exchange(proxy.addr, request).await;
        assert_eq!(statuses(&out), [400], "{name}: {out}");
        assert_eq!(
            b.seen.heads.load(Ordering::SeqCst),
            0,
            "{name} reached the upstream"
        );
        assert_still_serves(proxy.addr).await;
        reset(&b);
    }
    proxy.shutdown().await;
}

// =======================================================================================
// Names, limits, Host

/// Header names with underscores are valid tokens (RFC 9110 §5.6.2) and are forwarded
/// verbatim — not dropped (nginx's default) and not rewritten. Note for operators: a
/// backend that maps `-` and `_` to the same variable (CGI, WSGI) sees `Transfer_Encoding`
/// as `Transfer-Encoding`; drop such names in the router if that matters. Here the
/// framing is decided by the real fields only.
#[tokio::test]
async fn underscore_header_names_are_forwarded_verbatim() {
    let up = RawBackend::start().await;
    let proxy = serve_http(HttpServer::new(forward_to(up.addr))).await;
    let out = exchange(
        proxy.addr,
        b"POST /u HTTP/1.1\r\nHost: a\r\nX_Custom_Name: v\r\nTransfer_Encoding: chunked\r\n\
          Content_Length: 99\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(statuses(&out), [200], "{out}");
    let heads = up.take();
    assert_eq!(heads.len(), 1);
    let head = heads[0].to_ascii_lowercase();
    assert!(head.contains("\r\nx_custom_name: v\r\n"), "{head}");
    assert!(
        head.contains("\r\ntransfer_encoding: chunked\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\ncontent_length: 99\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-length: 5\r\n"), "{head}");
    assert!(!head.contains("\r\ntransfer-encoding:"), "{head}");
    proxy.shutdown().await;
}

/// Size limits: 60 KiB of header fields are accepted (the limit is a 64 KiB head), a
/// request line longer than the head limit is refused — `414 URI Too Long` or `431` from
/// hyper — and 100 fields pass while 101 do not (the smuggling table below has the 431 cases).
#[tokio::test]
async fn head_size_limits_at_the_boundary() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let sixty = format!(
        "GET /headers HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(60 * 1024)
    );
    let out = exchange(proxy.addr, sixty.as_bytes()).await;
    assert_eq!(statuses(&out), [200], "60 KiB header");
    let hundred = format!(
        "GET /headers HTTP/1.1\r\nHost: a\r\n{}Connection: close\r\n\r\n",
        (0..98)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let out = exchange(proxy.addr, hundred.as_bytes()).await;
    assert_eq!(statuses(&out), [200], "100 fields");
    reset(&b);
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70 * 1024));
    let out = exchange(proxy.addr, long_line.as_bytes()).await;
    let status = statuses(&out);
    assert!(
        status == [414] || status == [431],
        "long request line: {status:?}"
    );
    println!("request line of 70 KiB → {status:?}");
    assert_eq!(b.seen.heads.load(Ordering::SeqCst), 0);
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}

/// Requests without Host. HTTP/1.0 does not require it: the request is forwarded as
/// HTTP/1.1 with `Host` set to the upstream the router chose. HTTP/1.1 requires it
/// (RFC 9112 §3.2: "A server MUST respond with a 400"): an origin-form request without
/// Host is refused before the upstream (regression: it used to be forwarded with the
/// upstream's address as Host). An absolute-form target names the authority itself and
/// is accepted without Host (see `absolute_form_target_wins_over_host`).
#[tokio::test]
async fn http10_without_host_is_forwarded_and_http11_without_host_is_400() {
    let up = RawBackend::start().await;
    let proxy = serve_http(HttpServer::new(forward_to(up.addr))).await;
    let out = exchange(proxy.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    let heads = up.take();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].starts_with("GET /old HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    assert!(
        heads[0]
            .to_ascii_lowercase()
            .contains(&format!("\r\nhost: {}\r\n", up.addr)),
        "{}",
        heads[0]
    );

    let out = exchange(
        proxy.addr,
        b"GET /new HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&out), [400], "{out}");
    assert!(
        up.take().is_empty(),
        "a Host-less HTTP/1.1 request was forwarded"
    );
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}

/// An absolute-form target with a different Host, or none: the target wins (RFC 9112
/// §3.2.2) and the upstream gets exactly one Host, the target's authority. A target with
/// userinfo (`http://user@host/`) is refused (RFC 9110 §4.2.4: treat it as an error;
/// regression: it used to be forwarded as `Host: user:pw@host`).
#[tokio::test]
async fn absolute_form_target_wins_over_host() {
    let up = RawBackend::start().await;
    let proxy = serve_http(HttpServer::new(forward_to(up.addr))).await;
    let out = exchange(
        proxy.addr,
        b"GET http://a.example:8080/p?q=1 HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&out), [200], "{out}");
    let head = up.take().pop().unwrap();
    assert!(head.starts_with("GET /p?q=1 HTTP/1.1\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert_eq!(lower.matches("\r\nhost:").count(), 1, "{head}");
    assert!(lower.contains("\r\nhost: a.example:8080\r\n"), "{head}");

    let out = exchange(
        proxy.addr,
        b"GET http://c.example/ HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&out), [200], "{out}");
    let head = up.take().pop().unwrap().to_ascii_lowercase();
    assert!(head.contains("\r\nhost: c.example\r\n"), "{head}");

    let out = exchange(
        proxy.addr,
        b"GET http://user:pw@a.example/ HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&out), [400], "{out}");
    assert!(up.take().is_empty(), "forwarded with userinfo");
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}

// =======================================================================================
// CONNECT over HTTP/1.1

/// A ConnectTerminate over HTTP/1.1 whose tunnels go to `up`, port 22 denied.
async fn h1_connect_proxy(up: SocketAddr) -> (common::Running, Arc<AtomicUsize>) {
    let dials = Arc::new(AtomicUsize::new(0));
    let d = dials.clone();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |_: &Metadata| {
        d.fetch_add(1, Ordering::SeqCst);
        Some(Target::from(up))
    });
    let terminate = ConnectTerminate::new(relay).http1_only().policy(|req| {
        if req.authority.port() == 22 {
            Decision::Deny(http::StatusCode::FORBIDDEN)
        } else {
            Decision::Allow
        }
    });
    (common::start(Server::new(), terminate).await, dials)
}

/// A request pipelined behind a CONNECT. Reverse proxy (`Forward`): CONNECT is `405` with
/// `Connection: close`, and the pipelined request is never read. CONNECT terminator: bytes
/// after an accepted CONNECT's head are tunnel data (that is what CONNECT means), delivered
/// to the upstream after the `200`, never parsed as a request; after a refused CONNECT the
/// next request is parsed on its own (a GET: `405`) and nothing is dialled.
#[tokio::test]
async fn requests_pipelined_behind_connect() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let out = exchange(
        proxy.addr,
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n\
          GET /headers HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&out), [405], "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert_eq!(b.seen.heads.load(Ordering::SeqCst), 0);
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;

    let up = RawBackend::start().await;
    let (connect, dials) = h1_connect_proxy(up.addr).await;
    let out = exchange(
        connect.addr,
        b"CONNECT x.test:80 HTTP/1.1\r\nHost: x.test:80\r\n\r\n\
          GET /inside HTTP/1.1\r\nHost: inside\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.ends_with("ok"),
        "the upstream's answer comes through the tunnel: {out}"
    );
    assert_eq!(up.take(), ["GET /inside HTTP/1.1\r\nHost: inside\r\n\r\n"]);

    let (out, _) = raw_exchange(
        connect.addr,
        b"CONNECT x.test:22 HTTP/1.1\r\nHost: x.test:22\r\n\r\n\
          GET /after-refusal HTTP/1.1\r\nHost: inside\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    let out = String::from_utf8_lossy(&out);
    assert_eq!(statuses(&out), [403, 405], "{out}");
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert!(up.take().is_empty());
}

/// CONNECT with a body (RFC 9110 §9.3.6: a CONNECT request has no content). Reverse proxy:
/// `405`, nothing forwarded. CONNECT terminator: hyper takes `Content-Length` /
/// `Transfer-Encoding` on a CONNECT as its body framing — the declared body is read as
/// request content and dropped, never relayed — and the tunnel carries only what follows.
#[tokio::test]
async fn connect_with_a_body() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let out = exchange(
        proxy.addr,
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(statuses(&out), [405], "{out}");
    assert_eq!(b.seen.heads.load(Ordering::SeqCst), 0);
    proxy.shutdown().await;

    let up = RawBackend::start().await;
    let (connect, _) = h1_connect_proxy(up.addr).await;
    for (name, request) in [
        (
            "Content-Length",
            &b"CONNECT x.test:80 HTTP/1.1\r\nHost: x.test:80\r\nContent-Length: 5\r\n\r\nhello\
              GET /t HTTP/1.1\r\n\r\n"[..],
        ),
        (
            "chunked",
            b"CONNECT x.test:80 HTTP/1.1\r\nHost: x.test:80\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\nGET /t HTTP/1.1\r\n\r\n",
        ),
    ] {
        let (out, _) = raw_exchange(connect.addr, request, WAIT).await;
        let out = String::from_utf8_lossy(&out);
        // The CONNECT's 200, then the upstream's answer through the tunnel.
        assert_eq!(statuses(&out), [200, 200], "{name}: {out}");
        assert_eq!(
            up.take(),
            ["GET /t HTTP/1.1\r\n\r\n"],
            "{name}: body relayed?"
        );
    }
}

// =======================================================================================
// Paths and forwarding headers

/// Path tricks (`%2F`, `/../`, `//`, `%00`, `/./`, `%2e%2e`, `;`) are forwarded verbatim:
/// `Forward` does not normalise or decode the target, so the upstream sees exactly what the
/// client sent. A router or policy that matches on `req.uri().path()` sees the raw form
/// too — normalise there before matching prefixes (`/x/../admin` is not under `/admin`
/// textually, but a normalising backend serves `/admin`).
#[tokio::test]
async fn path_tricks_are_forwarded_verbatim() {
    let up = RawBackend::start().await;
    let seen_paths = Arc::new(Mutex::new(Vec::new()));
    let s = seen_paths.clone();
    let to = up.addr;
    let fwd = proxystack::http::Forward::new(
        tcp::TcpConnector::new(),
        move |req: &http::Request<proxystack::http::Incoming>| {
            s.lock().unwrap().push(req.uri().path().to_string());
            Some(Target::from(to))
        },
    );
    let proxy = serve_http(HttpServer::new(fwd)).await;
    for target in [
        "/a/%2F/b",
        "/a%2fb",
        "/x/../admin",
        "//admin//x",
        "/a%00b",
        "/./admin/./x",
        "/%2e%2e/admin",
        "/admin;x=1/..;/y",
        "/a?x=../y&z=%00",
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let out = exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&out), [200], "{target}: {out}");
        let head = up.take().pop().unwrap();
        assert!(
            head.starts_with(&format!("GET {target} HTTP/1.1\r\n")),
            "{target} → {head}"
        );
        let path = target.split('?').next().unwrap();
        assert_eq!(seen_paths.lock().unwrap().pop().as_deref(), Some(path));
    }
    proxy.shutdown().await;
}

/// Forwarding headers from an untrusted client. `ForwardedMode::Off` (the default) passes
/// `Forwarded` / `X-Forwarded-*` through untouched — only right behind a trusted hop;
/// `Overwrite` replaces `Forwarded`, `X-Forwarded-For` and `X-Forwarded-Proto` (all field
/// lines of each) with this hop's values; `Append` keeps the client's values and adds
/// this hop. `X-Forwarded-Host`, `X-Real-IP` and the like are not fields `Forward` writes:
/// they pass with `Off` and `Append`, and `Overwrite` (the edge) drops them with every other
/// forwarding field the client sent.
#[tokio::test]
async fn forged_forwarding_headers_per_mode() {
    let up = RawBackend::start().await;
    let forged = b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=6.6.6.6;host=evil\r\n\
                   X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n\
                   X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\
                   X-Real-IP: 6.6.6.6\r\nConnection: close\r\n\r\n";
    let fwd = |mode| forward_to(up.addr).forwarded(mode).x_forwarded(mode);
    for mode in [
        ForwardedMode::Off,
        ForwardedMode::Overwrite,
        ForwardedMode::Append,
    ] {
        let proxy = serve_http(HttpServer::new(fwd(mode))).await;
        let out = exchange(proxy.addr, forged).await;
        assert_eq!(statuses(&out), [200], "{mode:?}: {out}");
        let head = up.take().pop().unwrap().to_ascii_lowercase();
        let fields = |name: &str| -> Vec<String> {
            head.split("\r\n")
                .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::to_string)
                .collect()
        };
        // Never rewritten by `Forward`; dropped at the edge.
        if mode == ForwardedMode::Overwrite {
            assert!(fields("x-forwarded-host").is_empty(), "{head}");
            assert!(fields("x-real-ip").is_empty(), "{head}");
        } else {
            assert_eq!(fields("x-forwarded-host"), ["evil.example"], "{mode:?}");
            assert_eq!(fields("x-real-ip"), ["6.6.6.6"], "{mode:?}");
        }
        match mode {
            ForwardedMode::Off => {
                assert_eq!(fields("forwarded"), ["for=6.6.6.6;host=evil"]);
                assert_eq!(fields("x-forwarded-for").len(), 2, "{head}");
                assert_eq!(fields("x-forwarded-proto"), ["https"]);
            }
            ForwardedMode::Overwrite => {
                let f = fields("forwarded");
                assert_eq!(f.len(), 1, "{head}");
                assert!(
                    f[0].starts_with("for=\"127.0.0.1:") && !f[0].contains("evil"),
                    "{f:?}"
                );
                assert_eq!(fields("x-forwarded-for"), ["127.0.0.1"], "{head}");
                assert_eq!(fields("x-forwarded-proto"), ["http"], "{head}");
            }
            ForwardedMode::Append => {
                let f = fields("forwarded");
                assert!(
                    f[0].starts_with("for=6.6.6.6;host=evil, for=\"127.0.0.1:"),
                    "{f:?}"
                );
                assert_eq!(fields("x-forwarded-for"), ["6.6.6.6, 7.7.7.7, 127.0.0.1"]);
                assert_eq!(
                    fields("x-forwarded-proto"),
                    ["https"],
                    "an existing proto is kept"
                );
            }
        }
        proxy.shutdown().await;
    }
}

// =======================================================================================
// HTTP/2 → HTTP/1.1 translation

/// One HTTP/2 request with `fields` after the pseudo-fields (GET http://a/headers),
/// END_STREAM; the verdict for stream 1.
async fn h2_request(proxy: SocketAddr, fields: &[(&[u8], &[u8])]) -> RawH2<TcpStream> {
    let mut raw = RawH2::handshake(TcpStream::connect(proxy).await.unwrap(), &[]).await;
    let mut block = hpack_literals(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/headers"),
        (":authority", "a.example"),
    ]);
    for (name, value) in fields {
        hpack_literal(&mut block, name, value);
    }
    raw.send(&h2_frame(
        h2f::HEADERS,
        h2f::END_HEADERS | h2f::END_STREAM,
        1,
        &block,
    ))
    .await
    .unwrap();
    raw.pump_until(WAIT, |s| {
        s.ended.contains(&1) || s.resets.contains_key(&1) || s.goaway.is_some()
    })
    .await;
    raw
}

/// Connection-specific fields are malformed in HTTP/2 (RFC 9113 §8.2.2): `keep-alive`,
/// `proxy-connection`, `transfer-encoding`, `upgrade` (and `connection`, `te: gzip`, in
/// `bad_input_h2::behind_http_server`) reset the stream with PROTOCOL_ERROR before anything is forwarded;
/// `te: trailers` is allowed and kept. Control characters in a value (NUL, DEL, SOH) never
/// reach the HTTP/1 upstream either (the connection ends: h2 rejects the value while
/// decoding). A value with obs-text (bytes ≥ 0x80) is legal and forwarded as is.
#[tokio::test]
async fn h2_connection_specific_and_control_fields_are_not_translated() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    for (name, value) in [
        (&b"keep-alive"[..], &b"timeout=5"[..]),
        (b"proxy-connection", b"keep-alive"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
    ] {
        let raw = h2_request(proxy.addr, &[(name, value)]).await;
        let label = String::from_utf8_lossy(name);
        assert_eq!(
            raw.seen.resets.get(&1),
            Some(&h2f::PROTOCOL_ERROR),
            "{label}: {:?}",
            raw.seen
        );
        assert_eq!(
            b.seen.heads.load(Ordering::SeqCst),
            0,
            "{label} reached the upstream"
        );
    }
    for (label, value) in [
        ("NUL", &b"a\0b"[..]),
        ("DEL", b"a\x7fb"),
        ("SOH", b"a\x01b"),
    ] {
        let raw = h2_request(proxy.addr, &[(b"x-ctl", value)]).await;
        let refused = raw.seen.resets.get(&1) == Some(&h2f::PROTOCOL_ERROR)
            || raw.seen.goaway.map(|g| g.1) == Some(h2f::PROTOCOL_ERROR);
        assert!(refused, "{label}: {:?}", raw.seen);
        assert!(!raw.seen.status.contains_key(&1), "{label} answered");
        assert_eq!(
            b.seen.heads.load(Ordering::SeqCst),
            0,
            "{label} reached the upstream"
        );
    }
    let raw = h2_request(
        proxy.addr,
        &[(b"te", b"trailers"), (b"x-obs", b"caf\xc3\xa9")],
    )
    .await;
    assert_eq!(raw.seen.status.get(&1), Some(&200), "{:?}", raw.seen);
    let body = String::from_utf8_lossy(raw.seen.data.get(&1).unwrap()).into_owned();
    assert!(body.contains("\nte: trailers\n"), "{body}");
    assert!(body.contains("\nx-obs: caf\u{e9}\n"), "{body}");
    drop(raw);
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}

/// `:authority` and `host` in one HTTP/2 request (RFC 9113 §8.3.1): equal (also up to
/// case) → one `Host` upstream; different → `400`; two `host` fields → `400`; `host`
/// without `:authority` → used as the authority; `:authority` with userinfo → `400`.
/// Multiple `cookie` fields (HTTP/2 splits them, RFC 9113 §8.2.3) reach the HTTP/1
/// upstream joined into one `cookie` line with `; ` (regression: they used to arrive as
/// several `cookie` lines, which HTTP/1.1 does not allow).
#[tokio::test]
async fn h2_authority_host_and_cookie_translation() {
    let up = RawBackend::start().await;
    let proxy = serve_http(HttpServer::new(forward_to(up.addr))).await;
    let request = |authority: Option<&str>, extra: &[(&str, &str)]| {
        let mut fields = vec![(":method", "GET"), (":scheme", "http"), (":path", "/p")];
        if let Some(a) = authority {
            fields.push((":authority", a));
        }
        fields.extend_from_slice(extra);
        hpack_literals(&fields)
    };
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "same host",
            request(Some("a.example"), &[("host", "a.example")]),
            Some("a.example"),
        ),
        (
            "host differs in case",
            request(Some("a.example"), &[("host", "A.Example")]),
            Some("a.example"),
        ),
        (
            "host differs",
            request(Some("a.example"), &[("host", "b.example")]),
            None,
        ),
        (
            "two host fields",
            request(None, &[("host", "a.example"), ("host", "b.example")]),
            None,
        ),
        (
            "host only",
            request(None, &[("host", "h.example")]),
            Some("h.example"),
        ),
        ("userinfo", request(Some("u@a.example"), &[]), None),
    ];
    for (name, block, want_host) in cases {
        let mut raw = RawH2::handshake(TcpStream::connect(proxy.addr).await.unwrap(), &[]).await;
        raw.send(&h2_frame(
            h2f::HEADERS,
            h2f::END_HEADERS | h2f::END_STREAM,
            1,
            &block,
        ))
        .await
        .unwrap();
        raw.pump_until(WAIT, |s| s.ended.contains(&1) || s.resets.contains_key(&1))
            .await;
        let heads = up.take();
        match want_host {
            Some(host) => {
                assert_eq!(
                    raw.seen.status.get(&1),
                    Some(&200),
                    "{name}: {:?}",
                    raw.seen
                );
                let head = heads[0].to_ascii_lowercase();
                assert_eq!(head.matches("\r\nhost:").count(), 1, "{name}: {head}");
                assert!(
                    head.contains(&format!("\r\nhost: {host}\r\n")),
                    "{name}: {head}"
                );
            }
            None => {
                let status = raw.seen.status.get(&1);
                let reset = raw.seen.resets.get(&1);
                assert!(
                    status == Some(&400) || reset == Some(&h2f::PROTOCOL_ERROR),
                    "{name}: {:?}",
                    raw.seen
                );
                println!("{name} → status {status:?}, reset {reset:?}");
                assert!(heads.is_empty(), "{name} forwarded: {heads:?}");
            }
        }
    }

    let block = request(
        Some("a.example"),
        &[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")],
    );
    let mut raw = RawH2::handshake(TcpStream::connect(proxy.addr).await.unwrap(), &[]).await;
    raw.send(&h2_frame(
        h2f::HEADERS,
        h2f::END_HEADERS | h2f::END_STREAM,
        1,
        &block,
    ))
    .await
    .unwrap();
    raw.pump_until(WAIT, |s| s.ended.contains(&1)).await;
    assert_eq!(raw.seen.status.get(&1), Some(&200));
    let head = up.take().pop().unwrap().to_ascii_lowercase();
    let cookies: Vec<&str> = head
        .split("\r\n")
        .filter_map(|l| l.strip_prefix("cookie: "))
        .collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"], "{head}");
    drop(raw);
    proxy.shutdown().await;
}

// =======================================================================================
// Upgrade requests that are not switched (issue 14 item 2)

/// Requests the strict HTTP/1 check refuses and hyper alone would accept, each for
/// `/smuggled`: none may reach a service or an upstream.
const SMUGGLED: [(&str, &[u8]); 5] = [
    (
        "CL + TE",
        b"POST /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    ),
    ("bare LF", b"GET /smuggled HTTP/1.1\nHost: a\n\n"),
    (
        "TE identity, chunked",
        b"POST /smuggled HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n\
          0\r\n\r\n",
    ),
    (
        "two TE fields",
        b"POST /smuggled HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "HTTP/1.1 without Host",
        b"GET /smuggled HTTP/1.1\r\nX-A: b\r\n\r\n",
    ),
];

/// Reads one response head (bounded by `WAIT` and 64 KiB).
async fn read_response_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("no response head in time");
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads one response with a `Content-Length` body; returns its status.
async fn read_response(s: &mut TcpStream) -> u16 {
    let head = read_response_head(s).await;
    let len: usize = head
        .to_ascii_lowercase()
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length: ")?.parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    let mut body = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut body))
        .await
        .expect("no body in time")
        .expect("body cut short");
    status_of(head.as_bytes()).unwrap_or_else(|| panic!("not a response: {head}"))
}

/// Sends `first`, then `bad`: in one write (`pipelined`) or after `first`'s response
/// (kept alive). Returns the statuses of all responses; the proxy must close.
async fn first_then_bad(proxy: SocketAddr, first: &[u8], bad: &[u8], pipelined: bool) -> Vec<u16> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut seen = Vec::new();
    if pipelined {
        s.write_all(&[first, bad].concat()).await.unwrap();
    } else {
        s.write_all(first).await.unwrap();
        seen.push(read_response(&mut s).await);
        s.write_all(bad).await.unwrap();
    }
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .is_ok();
    let rest = String::from_utf8_lossy(&rest);
    assert!(closed, "connection left open: {rest}");
    seen.extend(statuses(&rest));
    seen
}

/// Echoes what arrives on an upgraded connection (a switched protocol or a tunnel).
fn echo_upgraded(on: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let (mut r, mut w) = tokio::io::split(hyper_util::rt::TokioIo::new(up));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
}

/// An `HttpServer` whose service records `METHOD target` of every request and answers:
/// `/upgrade` → `101` and echoes; `CONNECT open:1` → `200` and echoes the tunnel; any other
/// CONNECT → `403`; `/404` → `404`; anything else → reads the body, `200`.
async fn recording_server() -> (http_common::Running, Arc<Mutex<Vec<String>>>) {
    use http::{Method, Response, StatusCode};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let service = tower::service_fn(move |mut req: http::Request<proxystack::http::Incoming>| {
        let seen = s.clone();
        async move {
            seen.lock()
                .unwrap()
                .push(format!("{} {}", req.method(), req.uri()));
            let status = if req.method() == Method::CONNECT {
                if req.uri().authority().map(|a| a.as_str()) == Some("open:1") {
                    echo_upgraded(hyper::upgrade::on(&mut req));
                    let mut ok = Response::new(http_common::empty());
                    *ok.status_mut() = StatusCode::OK;
                    return Ok::<_, std::convert::Infallible>(ok);
                }
                StatusCode::FORBIDDEN
            } else if req.uri().path() == "/upgrade" {
                echo_upgraded(hyper::upgrade::on(&mut req));
                let mut switched = Response::new(http_common::empty());
                *switched.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                switched.headers_mut().insert(
                    http::header::UPGRADE,
                    http::HeaderValue::from_static("echo"),
                );
                switched.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("upgrade"),
                );
                return Ok(switched);
            } else if req.uri().path() == "/404" {
                StatusCode::NOT_FOUND
            } else {
                let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                StatusCode::OK
            };
            let mut resp = Response::new(http_common::body("answer"));
            *resp.status_mut() = status;
            Ok(resp)
        }
    });
    (serve_http(HttpServer::new(service)).await, seen)
}

/// Regression (issue 14 item 2): a request with `Upgrade` (or a `CONNECT`) switched the
/// strict HTTP/1 check off for the rest of the connection, even when no switch happened.
/// Now, after an upgrade request answered `200` or `404` (with or without
/// `Connection: upgrade`, with or without a body) or a CONNECT answered `403`, each
/// request the check refuses — CL + TE, bare LF, `identity, chunked`, two
/// `Transfer-Encoding` fields, HTTP/1.1 without Host — gets `400` and never reaches the
/// service, kept alive or pipelined behind the first request.
#[tokio::test]
async fn upgrade_not_switched_keeps_the_strict_check_on() {
    let (proxy, seen) = recording_server().await;
    let firsts: [(&str, &[u8], u16, &str); 5] = [
        (
            "Upgrade answered 200",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
            200,
            "GET /ws",
        ),
        (
            "Upgrade + Connection: upgrade answered 404",
            b"GET /404 HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            404,
            "GET /404",
        ),
        (
            "Upgrade with a Content-Length body answered 200",
            b"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
            200,
            "POST /ws",
        ),
        (
            "Upgrade with a chunked body answered 200",
            b"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            200,
            "POST /ws",
        ),
        (
            "CONNECT answered 403",
            b"CONNECT closed:1 HTTP/1.1\r\nHost: closed:1\r\n\r\n",
            403,
            "CONNECT closed:1",
        ),
    ];
    for (first_name, first, first_status, first_line) in firsts {
        for (bad_name, bad) in SMUGGLED {
            for pipelined in [false, true] {
                let case = format!("{first_name}, then {bad_name} (pipelined: {pipelined})");
                let got = first_then_bad(proxy.addr, first, bad, pipelined).await;
                assert_eq!(got, [first_status, 400], "{case}");
                let lines = std::mem::take(&mut *seen.lock().unwrap());
                assert_eq!(lines, [first_line], "{case}: the service saw it");
            }
        }
    }
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}

/// The review's setup for issue 14 item 2: `Forward` in front of an origin that records
/// every request head. An `Upgrade` request without `Connection: upgrade` is forwarded as
/// a plain request, one with it is answered `200` by the origin; neither switches, and a
/// request the strict check refuses, kept alive or pipelined behind it, gets `400` and
/// never reaches the origin.
#[tokio::test]
async fn upgrade_not_switched_through_forward_keeps_the_strict_check_on() {
    let origin = RawBackend::start().await;
    let proxy = serve_http(HttpServer::new(forward_to(origin.addr))).await;
    let firsts: [(&str, &[u8]); 2] = [
        (
            "Upgrade without Connection: upgrade",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
        ),
        (
            "Upgrade answered 200 by the origin",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ),
    ];
    for (first_name, first) in firsts {
        for (bad_name, bad) in SMUGGLED {
            for pipelined in [false, true] {
                let case = format!("{first_name}, then {bad_name} (pipelined: {pipelined})");
                let got = first_then_bad(proxy.addr, first, bad, pipelined).await;
                assert_eq!(got, [200, 400], "{case}");
                let heads = origin.take();
                assert_eq!(heads.len(), 1, "{case}: {heads:?}");
                assert!(
                    heads[0].starts_with("GET /ws HTTP/1.1\r\n"),
                    "{case}: {heads:?}"
                );
            }
        }
    }
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}

/// The other side of the fix: a real switch still hands the connection over byte for
/// byte — `101` from a service, `101` from an origin through `Forward`, and `200` to a
/// CONNECT — including bytes pipelined in the same write as the request (held by the
/// check until the status is known) that would be refused as HTTP (bare LF, NUL, every
/// byte value).
#[tokio::test]
async fn switched_upgrade_and_connect_relay_byte_exact() {
    let (server, seen) = recording_server().await;
    let b = backend().await;
    let forward = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let early: Vec<u8> = b"GET /smuggled HTTP/1.1\nHost: a\n\n\0"
        .iter()
        .copied()
        .chain(0..=255)
        .collect();
    let late: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    let cases: [(&str, SocketAddr, &[u8], u16); 3] = [
        (
            "service answers 101",
            server.addr,
            b"GET /upgrade HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
            101,
        ),
        (
            "origin answers 101 through Forward",
            forward.addr,
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            101,
        ),
        (
            "service answers 200 to CONNECT",
            server.addr,
            b"CONNECT open:1 HTTP/1.1\r\nHost: open:1\r\n\r\n",
            200,
        ),
    ];
    for (name, addr, request, status) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[request, &early[..]].concat()).await.unwrap();
        let head = read_response_head(&mut s).await;
        assert_eq!(status_of(head.as_bytes()), Some(status), "{name}: {head}");
        let mut echoed = vec![0u8; early.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut echoed))
            .await
            .unwrap_or_else(|_| panic!("{name}: no echo"))
            .unwrap();
        assert_eq!(echoed, early, "{name}: pipelined bytes");
        s.write_all(&late).await.unwrap();
        let mut echoed = vec![0u8; late.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut echoed))
            .await
            .unwrap_or_else(|_| panic!("{name}: no echo"))
            .unwrap();
        assert_eq!(echoed, late, "{name}: later bytes");
    }
    let lines = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(lines, ["GET /upgrade", "CONNECT open:1"]);
    server.shutdown().await;
    forward.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The HTTP server + Forward alone (no CONNECT): smuggling, malformed heads, slow clients.

/// Sends `request` on a fresh connection and returns the status and whether the proxy
/// closed the connection afterwards.
async fn answer(proxy: SocketAddr, request: &[u8]) -> (Option<u16>, String) {
    let (out, closed) = raw_exchange(proxy, request, Duration::from_secs(5)).await;
    assert!(closed, "connection left open after a refused request");
    (status_of(&out), String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn http1_smuggling_and_malformed_heads_are_refused_before_the_upstream() {
    init_tracing();
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
        (0..101)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("CL+TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG".to_vec(), 400),
        ("TE+CL", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nG".to_vec(), 400),
        ("two different CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde".to_vec(), 400),
        ("TE chunked<TAB>", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE xchunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE chunked, identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("bare LF", b"GET / HTTP/1.1\nHost: a\n\n".to_vec(), 400),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n".to_vec(), 400),
        ("NUL in header", b"GET / HTTP/1.1\r\nHost: a\r\nX-Nul: a\0b\r\n\r\n".to_vec(), 400),
        ("two Host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), 400),
        ("space before colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad : v\r\n\r\n".to_vec(), 400),
        ("> 100 headers", many_headers.into_bytes(), 431),
        ("> 64 KiB head", big_header.into_bytes(), 431),
    ];
    for (name, request, want) in cases {
        let (status, raw) = answer(proxy.addr, &request).await;
        assert_eq!(status, Some(want), "{name}: {raw}");
        assert_eq!(
            b.seen.heads.load(Ordering::SeqCst),
            0,
            "{name}: upstream saw the request"
        );
        assert_still_serves(proxy.addr).await;
        b.seen.heads.store(0, Ordering::SeqCst);
        b.seen.complete.store(0, Ordering::SeqCst);
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn invalid_chunk_size_is_400_and_never_completes_upstream() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    for bad in [
        &b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"[..],
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n",
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    ] {
        let (status, raw) = answer(proxy.addr, bad).await;
        // The head was valid, so it may have been forwarded (bodies stream); the body
        // failed, so the upstream never got a complete request and the client gets 400.
        let name = String::from_utf8_lossy(bad);
        assert_eq!(status, Some(400), "{name}: {raw}");
        assert_eq!(b.seen.complete.load(Ordering::SeqCst), 0, "{name}: {raw}");
        assert_still_serves(proxy.addr).await;
        b.seen.complete.store(0, Ordering::SeqCst);
    }
    proxy.shutdown().await;
}

/// Found by fuzzing (`fuzz/fuzz_targets/http1_server.rs`): chunked bodies that hyper
/// accepts but the strict guard could not follow (17+ digit sizes, control bytes in chunk
/// extensions) or ended elsewhere than hyper (a bare LF after the last chunk) turned the
/// checks off for the rest of the connection, so a request pipelined after them reached
/// the upstream unchecked.
#[tokio::test]
async fn strict_checks_survive_every_chunked_body_hyper_accepts() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    // hyper accepts bare LF heads; the guard refuses them.
    let smuggled = b"GET /smuggled HTTP/1.1\nHost: a\n\n";
    for body in [
        &b"00000000000000000005\r\nhello\r\n0\r\n\r\n"[..],
        b"5;\x01\r\nhello\r\n0\r\n\r\n",
        b"0\r\n\nX: 1\r\nContent-Length: 32\r\n\r\n",
    ] {
        let mut request =
            b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        request.extend_from_slice(body);
        request.extend_from_slice(smuggled);
        let (out, _) = raw_exchange(proxy.addr, &request, Duration::from_secs(5)).await;
        let out = String::from_utf8_lossy(&out);
        let name = String::from_utf8_lossy(body);
        assert!(out.contains("HTTP/1.1 400"), "{name}: {out}");
        assert!(
            b.seen.heads.load(Ordering::SeqCst) <= 1,
            "{name}: the upstream saw the smuggled request"
        );
        assert_still_serves(proxy.addr).await;
        b.seen.heads.store(0, Ordering::SeqCst);
        b.seen.complete.store(0, Ordering::SeqCst);
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2c_upgrade_is_never_forwarded() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let (out, _) = raw_exchange(
        proxy.addr,
        b"GET /headers HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let t = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert_eq!(status_of(&out), Some(200), "{t}");
    assert!(
        !t.contains("upgrade:") && !t.contains("http2-settings"),
        "{t}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn slowloris_head_is_cut_off() {
    let b = backend().await;
    let proxy = serve_http(
        HttpServer::new(forward_to(b.addr)).header_read_timeout(Some(Duration::from_millis(500))),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let head =
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut sent = 0;
    let mut closed = false;
    for byte in head {
        if s.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 256];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            // Either a 408 or a plain close; both end the connection.
            let n = r.unwrap_or(0);
            assert!(
                n == 0 || buf[..n].starts_with(b"HTTP/1.1 408"),
                "{:?}",
                &buf[..n]
            );
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "connection still open after the whole head trickled in"
    );
    assert!(sent < head.len());
    assert_eq!(b.seen.heads.load(Ordering::SeqCst), 0);
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}

/// A request body trickling in (slowloris on the body): `HttpServer` itself times only the
/// head, so the documented defence is tower-http's timeouts in front of `Forward` — the
/// client gets `408` once the request outlives its deadline, the upstream never sees a
/// complete body, and the proxy serves the next client.
#[tokio::test]
async fn slow_request_body_is_cut_off_by_tower_http_timeouts() {
    use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
    let b = backend().await;
    let upstream = b.addr;
    let forward = proxystack::http::Forward::new(
        proxystack::tcp::TcpConnector::new(),
        move |_: &Request<_>| Some(proxystack::Target::from(upstream)),
    );
    let guarded = tower::ServiceBuilder::new()
        // The whole request (head to last body byte and the answer) within 2 s…
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(2),
        ))
        // …and no gap of more than 1 s between body frames.
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(1)))
        .service(forward);
    let proxy = serve_http(HttpServer::new(guarded)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let started = std::time::Instant::now();
    // One byte every 300 ms: never idle long enough for the body timeout, so the request
    // deadline has to end it. Bounded: at most 40 bytes (12 s).
    for _ in 0..40 {
        if s.write_all(b"x").await.is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            answer.extend_from_slice(&buf[..r.unwrap_or(0)]);
            break;
        }
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 408"),
        "after {:?}: {:?}",
        started.elapsed(),
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(b.seen.complete.load(Ordering::SeqCst), 0);
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}
