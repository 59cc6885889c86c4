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
