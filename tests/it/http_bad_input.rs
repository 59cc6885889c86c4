//! HTTP level, bad inputs (REFERENCE.md §4.2): smuggling and malformed HTTP/1.1 over raw
//! sockets, malformed HTTP/2 from the h2 crate and hand-written frames, floods, slowloris.
//! Each case asserts the exact answer, that the upstream never saw the request, and that
//! the proxy still serves the next good connection.
#![cfg(feature = "http")]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::hpack_literal;
use crate::http_common::*;
use http::{Request, StatusCode};
use proxystack::http::HttpServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GOOD: &[u8] = b"GET /headers HTTP/1.1\r\nHost: good\r\nConnection: close\r\n\r\n";

async fn assert_still_serves(proxy: SocketAddr) {
    let (out, _) = raw_exchange(proxy, GOOD, Duration::from_secs(5)).await;
    assert_eq!(
        status_of(&out),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

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

// ---- HTTP/2 ----

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET http://a/` pseudo-fields: static-table :method GET, :scheme http, :path /, and
/// :authority `a` (literal, indexed name 1).
fn request_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
    b.shrink_to_fit();
    b
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
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
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(0x4, 0, 0, &[])); // SETTINGS
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
        s.write_all(&frame(0x1, 0x4 | 0x1, 1, &block))
            .await
            .unwrap(); // END_HEADERS|END_STREAM
        let (frames, _) = read_frames(&mut s, Duration::from_millis(500)).await;
        let refused = frames.iter().any(|(kind, _, stream, _)| {
            (*kind == 0x3 && *stream == 1) || *kind == 0x7 // RST_STREAM or GOAWAY
        });
        // A 400 HEADERS answer would also be acceptable; a 200 is not.
        let answered_ok = frames
            .iter()
            .any(|(kind, _, stream, p)| *kind == 0x1 && *stream == 1 && p.first() == Some(&0x88));
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

#[tokio::test]
async fn h2_rapid_reset_gets_goaway() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut opened = 0;
    for _ in 0..10_000 {
        let mut client = match client.clone().ready().await {
            Ok(c) => c,
            Err(_) => break,
        };
        let req = Request::get("http://a/slow?ms=5000").body(()).unwrap();
        match client.send_request(req, true) {
            Ok((_resp, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(_) => break,
        }
        if conn.is_finished() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let result = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the server closed the connection")
        .unwrap();
    let err = result.expect_err("the server ended the connection, not the client");
    // GOAWAY ENHANCE_YOUR_CALM, unless our own writes hit the closed socket before the
    // GOAWAY was read (then the connection ends with an I/O error): closed either way.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "{err:?} after {opened} streams"
    );
    assert!(opened < 10_000);
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2_continuation_flood_gets_goaway() {
    let b = backend().await;
    let proxy = serve_http(HttpServer::new(forward_to(b.addr))).await;
    let mut s = h2_raw(proxy.addr).await;
    let (mut r, mut w) = s.split();
    // HEADERS without END_HEADERS, then CONTINUATION frames without end.
    let writer = async {
        w.write_all(&frame(0x1, 0x1, 1, &request_block()))
            .await
            .unwrap();
        let mut sent = 0usize;
        for i in 0..4096 {
            let mut block = Vec::new();
            hpack_literal(&mut block, format!("x-flood-{i}").as_bytes(), &[b'v'; 8000]);
            if w.write_all(&frame(0x9, 0, 1, &block)).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    };
    let reader = async {
        let mut frames = Vec::new();
        let mut head = [0u8; 9];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut head)).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if r.read_exact(&mut payload).await.is_err() {
                break;
            }
            frames.push((head[3], payload));
        }
        frames
    };
    let (sent, frames) = tokio::join!(writer, reader);
    let goaway = frames
        .iter()
        .find(|(kind, _)| *kind == 0x7)
        .map(|(_, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
    // ENHANCE_YOUR_CALM (0xb) for too many CONTINUATION frames, or COMPRESSION_ERROR (0x9)
    // for an over-long header block.
    assert!(
        matches!(goaway, Some(0xb) | Some(0x9)),
        "GOAWAY {goaway:?} after {sent} frames"
    );
    assert!(sent < 4096, "the server kept reading the flood");
    assert_eq!(b.seen.heads.load(Ordering::SeqCst), 0);
    assert_still_serves(proxy.addr).await;
    proxy.shutdown().await;
}
