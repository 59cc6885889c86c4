//! Shared by the benches: loopback endpoints, a best-sample recorder and RSS readings.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Seconds per operation (best sample) per benchmark id, for the ratio table.
static RESULTS: Mutex<BTreeMap<String, f64>> = Mutex::new(BTreeMap::new());

/// Records `total / ops`, keeping the best (least disturbed) sample.
pub fn record(id: &str, total: Duration, ops: u64) {
    let per_op = total.as_secs_f64() / ops.max(1) as f64;
    let mut r = RESULTS.lock().unwrap();
    let slot = r.entry(id.to_string()).or_insert(f64::MAX);
    *slot = slot.min(per_op);
}

/// Stores a raw value (e.g. KiB per connection).
pub fn set(id: &str, value: f64) {
    RESULTS.lock().unwrap().insert(id.to_string(), value);
}

/// A recorded value.
pub fn get(id: &str) -> Option<f64> {
    RESULTS.lock().unwrap().get(id).copied()
}

/// Accepts connections and runs `f` on each.
pub async fn serve_fn<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            s.set_nodelay(true).unwrap();
            tokio::spawn(f(s));
        }
    });
    addr
}

/// Reads everything, then answers with the byte count (8 bytes, big endian).
pub async fn sink() -> SocketAddr {
    serve_fn(|mut s| async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        let _ = s.write_all(&total.to_be_bytes()).await;
    })
    .await
}

/// Echoes.
pub async fn echo() -> SocketAddr {
    serve_fn(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// Sends `bytes` to a [`sink`] (through whatever `s` is) and checks the count.
pub async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: usize) {
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    s.shutdown().await.unwrap();
    let mut total = [0u8; 8];
    s.read_exact(&mut total).await.unwrap();
    assert_eq!(u64::from_be_bytes(total), bytes as u64);
}

/// One byte out, one byte back.
pub async fn ping<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
}

/// Resident set size of this process, KiB.
pub fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Gb/s for `bytes` moved in `secs`.
pub fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e9
}

/// A runtime like a small proxy deployment's: two worker threads.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Serves `svc` on an ephemeral loopback port with the crate's accept loop.
pub async fn listen<S>(svc: S, watch: proxystack::drain::Watch) -> SocketAddr
where
    S: tower::Service<proxystack::Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<proxystack::BoxError>,
    S::Future: Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { proxystack::Server::new().serve(l, svc, watch).await });
    addr
}
