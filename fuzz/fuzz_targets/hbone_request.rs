//! HBONE request validation: one HTTP/2 CONNECT request, its pseudo-headers and the HBONE
//! headers (`forwarded`, `baggage`, `traceparent`) from the input, sent over an in-memory
//! connection to `hbone::Inbound::tunnels` (the HBONE server without its TLS).
//!
//! Checked, besides "never panics":
//! * the server answers the request (HEADERS or RST_STREAM on its stream, or GOAWAY)
//!   unless the client reset it first, and closes the connection once the client is
//!   gone, all within bounded (virtual) time; no task outlives the connection;
//! * a tunnel reaches the inner service only if it passed the HBONE checks (port, local
//!   IP, policy), with `HboneHeaders` that are `HboneHeaders::parse` of its headers; a
//!   `200` goes only to a CONNECT whose authority parses and whose tunnel was admitted;
//! * `HboneHeaders::parse` on the same fields keeps only well-formed values, and what it
//!   keeps, written back as headers, parses to the same value; `TraceParent::parse`
//!   accepts every value it prints and prints back exactly what it accepted.
#![no_main]

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use proxystack::hbone::{HboneHeaders, TraceParent, ILLEGAL_PORTS};
use proxystack::Authority;
use proxystack_fuzz::hbone::{Inner, Method, Request, TraceParentIn};
use proxystack_fuzz::services::{self, DENIED_PORT};
use proxystack_fuzz::wire::{self, Frame};
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;

/// Virtual time the server has to answer: past the 30 s admission timeout.
const ANSWER_WITHIN: Duration = Duration::from_secs(120);
/// Virtual time the server has to close once the client is gone.
const CLOSE_WITHIN: Duration = Duration::from_secs(60);

fuzz_target!(|req: Request| {
    check_header_parsing(&req);
    proxystack_fuzz::run(exchange(&req));
});

#[derive(Debug, PartialEq)]
enum Answer {
    Response { ok: bool },
    Reset,
    GoAway,
}

async fn exchange(req: &Request) {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let service = services::inbound().tunnels(services::tunnel_service(req.inner, true));
    let server = tokio::spawn(service.oneshot(services::accepted(server)));

    client.write_all(&req.client_bytes()).await.unwrap();
    let answer = tokio::time::timeout(ANSWER_WITHIN, async {
        loop {
            let frame = wire::read_frame(&mut client).await?;
            match answer(&frame) {
                Some(a) => return Some(a),
                None => ack(&mut client, &frame).await,
            }
        }
    })
    .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(_) if req.reset.is_some() => None,
        Err(_) => panic!("no answer within {ANSWER_WITHIN:?}"),
    };
    if proxystack_fuzz::trace() {
        eprintln!(
            "hbone_request: {:?} {:?} -> {answer:?}",
            req.method, req.authority
        );
    }
    match &answer {
        None => assert!(
            req.reset.is_some(),
            "connection closed without answering the request or sending GOAWAY"
        ),
        Some(Answer::Response { ok: true }) => check_admitted(req),
        Some(_) => {}
    }

    drop(client);
    match tokio::time::timeout(CLOSE_WITHIN, server).await {
        Ok(Ok(_)) => {}
        Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
        Err(_) => panic!("server still running {CLOSE_WITHIN:?} after the client left"),
    }
}

/// The server's answer to stream 1, if `frame` is one.
fn answer(frame: &Frame) -> Option<Answer> {
    match (frame.kind, frame.stream) {
        // h2 sends `:status: 200` as static table entry 8 first in the block.
        (wire::HEADERS, 1) => Some(Answer::Response {
            ok: frame.payload.first() == Some(&0x88),
        }),
        (wire::RST_STREAM, 1) => Some(Answer::Reset),
        (wire::GOAWAY, 0) => Some(Answer::GoAway),
        _ => None,
    }
}

/// Acknowledges SETTINGS and PING as a live client does (else keepalive closes the
/// connection before a slow admission is answered).
async fn ack(client: &mut tokio::io::DuplexStream, frame: &Frame) {
    let mut out = Vec::new();
    match frame.kind {
        wire::SETTINGS if frame.flags & wire::ACK == 0 => {
            wire::frame(&mut out, wire::SETTINGS, wire::ACK, 0, &[]);
        }
        wire::PING if frame.flags & wire::ACK == 0 => {
            wire::frame(&mut out, wire::PING, wire::ACK, 0, &frame.payload);
        }
        _ => return,
    }
    let _ = client.write_all(&out).await;
}

/// A `200` means: CONNECT, an authority that parses and passes the HBONE checks, and an
/// inner service that admitted the tunnel in time.
fn check_admitted(req: &Request) {
    assert_eq!(req.method, Some(Method::Connect), "200 for a non-CONNECT");
    assert!(
        matches!(req.inner, Inner::Echo)
            || matches!(req.inner, Inner::Delay { seconds } if seconds <= 30),
        "200 although the inner service did not admit the tunnel: {:?}",
        req.inner
    );
    let raw = req
        .authority
        .as_ref()
        .expect("200 without :authority")
        .bytes();
    let text = std::str::from_utf8(&raw).expect("200 for a non-UTF-8 authority");
    let authority = Authority::parse(text).expect("200 for an authority that does not parse");
    let port = authority.port();
    assert!(port != DENIED_PORT && !ILLEGAL_PORTS.contains(&port));
}

/// `HboneHeaders::parse` and `TraceParent::parse` on the request's fields.
fn check_header_parsing(req: &Request) {
    let mut map = HeaderMap::new();
    for (name, value) in req.regular_fields() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&name),
            HeaderValue::from_bytes(&value),
        ) {
            map.append(n, v);
        }
    }
    let parsed = HboneHeaders::parse(&map);

    assert!(parsed.baggage.len() <= 64);
    for (k, v) in &parsed.baggage {
        assert!(
            !k.is_empty() && k.bytes().all(is_token_char),
            "baggage key {k:?}"
        );
        assert!(
            !v.contains([',', ';']) && v.trim() == v,
            "baggage value {v:?}"
        );
    }
    if let Some(host) = &parsed.forwarded_host {
        assert!(
            !host.is_empty() && host.len() <= 253,
            "forwarded host {host:?}"
        );
        assert!(host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b)));
    }
    if let Some(tp) = parsed.traceparent {
        let sent = map.get("traceparent").and_then(|v| v.to_str().ok());
        assert_eq!(Some(tp.to_string().as_str()), sent);
    }

    // What was kept, written as ztunnel writes it, parses to the same.
    let mut again = HeaderMap::new();
    let mut forwarded = Vec::new();
    if let Some(addr) = parsed.forwarded_for {
        forwarded.push(format!("for=\"{addr}\""));
    }
    if let Some(host) = &parsed.forwarded_host {
        forwarded.push(format!("host={host}"));
    }
    if !forwarded.is_empty() {
        again.insert("forwarded", forwarded.join(";").parse().unwrap());
    }
    if !parsed.baggage.is_empty() {
        let entries: Vec<String> = parsed
            .baggage
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        again.insert("baggage", entries.join(",").parse().unwrap());
    }
    if let Some(tp) = parsed.traceparent {
        again.insert("traceparent", tp.to_string().parse().unwrap());
    }
    assert_eq!(HboneHeaders::parse(&again), parsed);

    // TraceParent: what parses prints back verbatim; what it prints parses.
    if let Some(tp) = &req.traceparent {
        let bytes = tp.bytes();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            match TraceParent::parse(text) {
                Some(parsed) => assert_eq!(parsed.to_string(), text),
                None => assert!(!matches!(tp, TraceParentIn::Valid { .. }), "{text}"),
            }
        }
        if let TraceParentIn::Valid {
            trace_id,
            parent_id,
            flags,
        } = *tp
        {
            let value = TraceParent {
                trace_id,
                parent_id,
                flags,
            };
            assert_eq!(TraceParent::parse(&value.to_string()), Some(value));
        }
    }
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
