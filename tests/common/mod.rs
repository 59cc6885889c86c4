//! Helpers shared by the integration tests: real loopback servers, no mocks.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use proxystack::{drain, Conn, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower::Service;

pub type BoxError = proxystack::BoxError;

/// An echo server on 127.0.0.1: writes back what it reads, then FIN.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A running proxy under test.
pub struct Running {
    pub addr: SocketAddr,
    pub signal: Option<drain::Signal>,
    pub task: JoinHandle<std::io::Result<()>>,
    pub stats: std::sync::Arc<proxystack::serve::ServeStats>,
}

impl Running {
    /// Starts draining and waits for `serve` to return.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.signal.take() {
            s.start();
        }
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("serve returned")
            .unwrap()
            .unwrap();
    }
}

/// Serves `svc` on an ephemeral loopback port.
pub async fn start<S>(server: Server, svc: S) -> Running
where
    S: Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (signal, watch) = drain::channel();
    let stats = server.stats();
    let task = tokio::spawn(async move { server.serve(listener, svc, watch).await });
    Running {
        addr,
        signal: Some(signal),
        task,
        stats,
    }
}

/// Writes `data` then half-closes; returns everything read until EOF.
pub async fn round_trip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut out = Vec::new();
    let read = r.read_to_end(&mut out);
    let (_, n) = tokio::join!(write, read);
    n.unwrap();
    out
}

/// Installs a tracing subscriber once (RUST_LOG respected).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One raw HTTP/2 frame (RFC 9113 §4.1), for tests that must see or send exact frames.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A raw HTTP/2 frame as read: type, flags, stream id, payload.
pub struct RawFrame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Reads one raw HTTP/2 frame; `None` at EOF or on an error.
pub async fn read_h2_frame(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<RawFrame> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    Some(RawFrame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// The (identifier, value) pairs of a SETTINGS payload.
pub fn h2_settings(payload: &[u8]) -> Vec<(u16, u32)> {
    payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

/// An inbound service that reports each connection's metadata on `tx`, then echoes to EOF.
pub fn capture(
    tx: tokio::sync::mpsc::UnboundedSender<proxystack::Metadata>,
) -> impl tower::Service<
    Conn<proxystack::BoxIo>,
    Response = (),
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + Sync {
    tower::service_fn(move |conn: Conn<proxystack::BoxIo>| {
        let tx = tx.clone();
        async move {
            let (mut io, meta) = conn.into_parts();
            let _ = tx.send(meta);
            let mut buf = vec![0u8; 4096];
            loop {
                let n = io.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                io.write_all(&buf[..n]).await?;
            }
            io.shutdown().await
        }
    })
}

/// Like [`echo_server`], but its accept loop survives errors (EMFILE): for tests that run a
/// process out of descriptors and need the upstream to be there afterwards.
pub async fn resilient_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((mut s, _)) => {
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    });
    addr
}
