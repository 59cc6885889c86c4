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
        assert!(out.contains("ok 5"), "{name}: body not decoded as chunked: {out}");
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
        ("bare LF in extension", "5;ext\nhello\r\n0\r\n\r\n".to_string()),
        ("NUL in extension", "5;e\0x\r\nhello\r\n0\r\n\r\n".to_string()),
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
        ("bare CR ending the request line", b"GET / HTTP/1.1\rHost: a\r\n\r\n"),
        ("bare CR in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n"),
        ("bare CR in a name", b"GET / HTTP/1.1\r\nX\rY: a\r\nHost: a\r\n\r\n"),
        ("bare CR in the target", b"GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("NUL in the target", b"GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("NUL in a name", b"GET / HTTP/1.1\r\nX\0Y: a\r\nHost: a\r\n\r\n"),
        ("DEL in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n\r\n"),
        ("SOH in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n"),
    ];
    for (name, request) in cases {
        let out = exchange(proxy.addr, request).await;
        assert_eq!(statuses(&out), [400], "{name}: {out}");
        assert_eq!(b.seen.heads.load(Ordering::SeqCst), 0, "{name} reached the upstream");
        assert_still_serves(proxy.addr).await;
        reset(&b);
    }
    proxy.shutdown().await;
}
