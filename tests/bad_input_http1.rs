//! HTTP/1.1 bad inputs at the gateway / waypoint L7 level (REFERENCE.md §4.2 "HTTP/1.1",
//! incl. "H2→H1 translation"), the cases `http_bad_input.rs` does not already cover:
//! Transfer-Encoding case variants, chunk extensions, bare CR and control characters,
//! underscore names, size limits, HTTP/1.0 and missing Host, absolute-form URIs, requests
//! pipelined behind CONNECT, CONNECT with a body, path tricks, forged forwarding headers,
//! and HTTP/2 requests whose fields must not be translated into HTTP/1.
//!
//! Target: `http::HttpServer` + `http::Forward` (and `connect::ConnectTerminate` for
//! CONNECT over HTTP/1.1). Each case asserts the exact answer, what the upstream received
//! (a hyper backend, or a raw one that records the request head byte for byte), and that
//! the proxy still serves the next good connection.
#![cfg(all(feature = "http", feature = "connect"))]

mod common;
mod http_common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{h2_frame, h2f, hpack_literal, hpack_literals, RawH2};
use http_common::{backend, forward_to, raw_exchange, serve_http, status_of, Backend};
use proxystack::conn::Metadata;
use proxystack::connect::{ConnectTerminate, Decision};
use proxystack::http::{ForwardedMode, HttpServer};
use proxystack::{tcp, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(5);
const GOOD: &[u8] = b"GET /headers HTTP/1.1\r\nHost: good\r\nConnection: close\r\n\r\n";

async fn assert_still_serves(proxy: SocketAddr) {
    let (out, _) = raw_exchange(proxy, GOOD, WAIT).await;
    assert_eq!(
        status_of(&out),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

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
/// hyper — and 100 fields pass while 101 do not (`http_bad_input.rs` has the 431 cases).
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
