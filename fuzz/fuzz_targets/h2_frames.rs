//! Structured HTTP/2 frame sequences (SETTINGS with edge values, HEADERS with and without
//! END_HEADERS, CONTINUATION chains, DATA, RST_STREAM bursts, PING, WINDOW_UPDATE with
//! zero and overflowing increments, PRIORITY, GOAWAY, PUSH_PROMISE, unknown types, stream
//! id regressions) sent after the client preface to one of three servers, chosen by the
//! input: `http::HttpServer` (hyper), `connect::ConnectTerminate` (h2, extended CONNECT
//! on) or `hbone::Inbound::tunnels`.
//!
//! Checked, besides "never panics": once the server has handled the frames (and after an
//! optional linger), the client half-closes; the server must close the connection within bounded (virtual)
//! time, and no task may outlive it.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use proxystack::connect::ConnectTerminate;
use proxystack::http::HttpServer;
use proxystack_fuzz::frames::{Sequence, Server};
use proxystack_fuzz::hbone::Inner;
use proxystack_fuzz::services;
use proxystack_fuzz::wire;
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;

/// Virtual time for the whole exchange after the linger: longer than every server
/// timeout (keepalive 10 s + 20 s, admission 30 s).
const WITHIN: Duration = Duration::from_secs(120);

fuzz_target!(|seq: Sequence| {
    proxystack_fuzz::run(exchange(&seq));
});

async fn exchange(seq: &Sequence) {
    let (client, server_io) = tokio::io::duplex(1 << 20);
    let conn = services::accepted(server_io);
    let task = match seq.server {
        Server::Http => {
            let server = HttpServer::new(tower::service_fn(services::http_ok));
            tokio::spawn(async move { server.oneshot(conn).await.is_ok() })
        }
        Server::Connect => {
            let server = ConnectTerminate::new(services::tunnel_service(Inner::Echo, false))
                .extended_connect(true);
            tokio::spawn(async move { server.oneshot(conn).await.is_ok() })
        }
        Server::Hbone => {
            let server = services::inbound().tunnels(services::tunnel_service(Inner::Echo, true));
            tokio::spawn(async move { server.oneshot(conn).await.is_ok() })
        }
    };

    let bytes = seq.client_bytes();
    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = async {
        let _ = wr.write_all(&bytes).await;
        // The clock only moves when every task is idle: this returns once the server has
        // handled everything it could (else the half-close would overtake the answers).
        tokio::time::sleep(Duration::from_millis(1)).await;
        if let Some(secs) = seq.linger {
            tokio::time::sleep(Duration::from_secs(secs.into())).await;
        }
        let _ = wr.shutdown().await;
    };
    let reader = async {
        let mut frames = Vec::new();
        while let Some(frame) = wire::read_frame(&mut rd).await {
            if proxystack_fuzz::trace() {
                frames.push((frame.kind, frame.flags, frame.stream, frame.payload.len()));
            }
        }
        // Bytes after the last whole frame (the server's side ended mid-frame) are
        // dropped with the reader.
        frames
    };
    let linger = Duration::from_secs(seq.linger.map_or(0, u64::from));
    let Ok(((), frames)) =
        tokio::time::timeout(WITHIN + linger, async { tokio::join!(writer, reader) }).await
    else {
        panic!("connection still open {WITHIN:?} after the client's half-close");
    };
    if proxystack_fuzz::trace() {
        eprintln!(
            "h2_frames: {:?} -> (type, flags, stream, len) {frames:?}",
            seq.server
        );
    }
    match tokio::time::timeout(WITHIN, task).await {
        Ok(Ok(_)) => {}
        Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
        Err(_) => panic!("server still running after the connection closed"),
    }
}
