//! HTTP/1 request heads through the server stack: the input's bytes, delivered in chunks,
//! to `http::HttpServer` (strict HTTP/1 guard on), directly or behind
//! `detect::DetectLayer` + `detect::Router`. The service reads each body and answers 200.
//!
//! The first input byte is control: bit 0 routes through detection, the other bits
//! place the first chunk boundary and set the stride of the rest (1 to 13 bytes, which
//! puts boundaries inside request lines, field lines and chunk sizes).
//!
//! Checked, besides "never panics":
//! * the server closes the connection within bounded (virtual) time of the client's
//!   half-close, and no task outlives it;
//! * unless the input is HTTP/2 (starts with the preface), what the server writes is
//!   empty or starts with an HTTP/1 status line;
//! * the strict guard's promise: no request the service sees has both `Content-Length`
//!   and `Transfer-Encoding`, a `Transfer-Encoding` other than `chunked`, or two `Host`
//!   fields, up to the first CONNECT on the connection (the service answers it `200`,
//!   which switches the connection to a tunnel; nothing after it is HTTP). An `Upgrade`
//!   request answered `200` switches nothing, so the promise holds past it.
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::Request;
use libfuzzer_sys::fuzz_target;
use proxystack::detect::{DetectLayer, Router};
use proxystack::http::{HttpServer, Incoming};
use proxystack_fuzz::services;
use proxystack_fuzz::wire::PREFACE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Layer, ServiceExt};

/// Most input bytes used (the server's request head limit is 64 KiB).
const MAX_INPUT: usize = 96 * 1024;
/// Chunks beyond this many are sent as one (each costs a scheduler round trip).
const MAX_CHUNKS: usize = 64;
/// Virtual time for the whole exchange: well past the 10 s header read timeout.
const WITHIN: Duration = Duration::from_secs(120);

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let input = &input[..input.len().min(MAX_INPUT)];
    proxystack_fuzz::run(exchange(control, input));
});

/// What the service saw on one connection.
#[derive(Debug, Default)]
struct Seen {
    /// A CONNECT went by and was answered `200`: the connection is a tunnel now.
    guard_off: bool,
}

impl Seen {
    fn check(&mut self, req: &Request<Incoming>) {
        if req.version() > http::Version::HTTP_11 {
            return;
        }
        let h = req.headers();
        if !self.guard_off {
            let te: Vec<_> = h.get_all(TRANSFER_ENCODING).iter().collect();
            assert!(te.len() <= 1, "several Transfer-Encoding fields: {h:?}");
            if let Some(v) = te.first() {
                assert!(
                    v.as_bytes().eq_ignore_ascii_case(b"chunked"),
                    "Transfer-Encoding {v:?}"
                );
                assert!(
                    !h.contains_key(CONTENT_LENGTH),
                    "Content-Length and Transfer-Encoding: {h:?}"
                );
            }
            assert!(
                h.get_all(HOST).iter().count() <= 1,
                "several Host fields: {h:?}"
            );
        }
        if req.method() == http::Method::CONNECT {
            self.guard_off = true;
        }
    }
}

async fn exchange(control: u8, input: &[u8]) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let service = {
        let seen = seen.clone();
        tower::service_fn(move |req: Request<Incoming>| {
            seen.lock().unwrap().check(&req);
            services::http_ok(req)
        })
    };
    let server = HttpServer::new(service);
    let (client, server_io) = tokio::io::duplex(1 << 20);
    let conn = services::accepted(server_io);
    let task = if control & 1 == 1 {
        let detect = DetectLayer::new().layer(Router::new().http1(server.clone()).http2(server));
        tokio::spawn(async move { detect.oneshot(conn).await.is_ok() })
    } else {
        tokio::spawn(async move { server.oneshot(conn).await.is_ok() })
    };

    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = async {
        let knob = usize::from(control >> 1);
        let (head, tail) = input.split_at(knob * input.len() / 127);
        let stride = knob % 13 + 1;
        let mut chunks: Vec<&[u8]> = std::iter::once(head).chain(tail.chunks(stride)).collect();
        if chunks.len() > MAX_CHUNKS {
            let start = chunks[MAX_CHUNKS - 1].as_ptr() as usize - input.as_ptr() as usize;
            chunks.truncate(MAX_CHUNKS - 1);
            chunks.push(&input[start..]);
        }
        for chunk in chunks {
            if wr.write_all(chunk).await.is_err() {
                break;
            }
            // Lets the server read this chunk on its own.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = wr.shutdown().await;
    };
    let reader = async {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let Ok(((), out)) = tokio::time::timeout(WITHIN, async { tokio::join!(writer, reader) }).await
    else {
        panic!("connection still open {WITHIN:?} after the client's half-close");
    };

    if proxystack_fuzz::trace() {
        let text = String::from_utf8_lossy(&out);
        let status: Vec<&str> = text
            .match_indices("HTTP/1.")
            .map(|(i, _)| &text[i..text[i..].find('\r').map_or(text.len(), |e| i + e)])
            .collect();
        eprintln!("http1_server: {} bytes out, {status:?}", out.len());
    }
    if !input.starts_with(PREFACE) && !out.is_empty() {
        assert!(
            out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
            "not an HTTP/1 response: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(64)])
        );
    }
    match tokio::time::timeout(WITHIN, task).await {
        Ok(Ok(_)) => {}
        Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
        Err(_) => panic!("server still running after the connection closed"),
    }
}
