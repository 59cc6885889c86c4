//! HTTP test helpers: a real hyper backend (h1 + h2c), proxy wiring, small clients.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxystack::http::{BoxBody, Forward, HttpServer};
use proxystack::{drain, tcp, Conn, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::Service;

/// What the backend saw.
#[derive(Default)]
pub struct Seen {
    /// Requests whose head reached the backend.
    pub heads: AtomicUsize,
    /// Requests whose body was read to the end without error.
    pub complete: AtomicUsize,
    /// TCP connections accepted.
    pub connections: AtomicUsize,
}

pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|n| match n {}).boxed_unsync()
}

fn query_num(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok())?
    })
}

/// A hyper backend serving HTTP/1.1 and h2c:
/// * `/headers` — answers with the request line, version and every header it saw;
/// * `/echo` — streams the request body back;
/// * `/slow?ms=N` — waits N ms first;
/// * `/big?bytes=N` — streams N bytes (64 KiB chunks);
/// * `/ws` — `101` + echo of the upgraded bytes; `/ws200` — `200` with an `Upgrade` field.
///
/// Anything else: reads the body and answers `ok <len>`.
pub async fn backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = s.clone();
            seen.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, seen.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Backend { addr, seen }
}

async fn handle(
    mut req: Request<Incoming>,
    seen: Arc<Seen>,
) -> Result<Response<BoxBody>, Infallible> {
    seen.heads.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/headers" => {
            let mut text = format!(
                "method: {}\nuri: {}\nversion: {:?}\n",
                req.method(),
                req.uri(),
                req.version()
            );
            for (k, v) in req.headers() {
                text.push_str(&format!(
                    "{}: {}\n",
                    k,
                    String::from_utf8_lossy(v.as_bytes())
                ));
            }
            if req.into_body().collect().await.is_ok() {
                seen.complete.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Response::new(full(text)))
        }
        "/echo" => Ok(Response::new(
            req.into_body().map_err(Into::into).boxed_unsync(),
        )),
        "/slow" => {
            let ms = query_num(&req, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Response::new(full("slow")))
        }
        "/big" => {
            let total = query_num(&req, "bytes").unwrap_or(1 << 20) as usize;
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            Ok(Response::new(
                RepeatBody { left: total, chunk }.boxed_unsync(),
            ))
        }
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
            Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .header("sec-websocket-accept", "test")
                .body(Empty::new().map_err(|n| match n {}).boxed_unsync())
                .unwrap())
        }
        "/ws200" => Ok(Response::builder()
            .header("upgrade", "websocket")
            .body(full("not upgraded"))
            .unwrap()),
        _ => match req.into_body().collect().await {
            Ok(b) => {
                seen.complete.fetch_add(1, Ordering::SeqCst);
                Ok(Response::new(full(format!("ok {}", b.to_bytes().len()))))
            }
            Err(_) => Ok(Response::new(full("body failed"))),
        },
    }
}

/// A body of `left` bytes in `chunk`-sized frames, produced lazily.
pub struct RepeatBody {
    pub left: usize,
    pub chunk: Bytes,
}

impl hyper::body::Body for RepeatBody {
    type Data = Bytes;
    type Error = proxystack::BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len());
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
}

/// A body fed by a channel: the test decides when each chunk is sent.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = proxystack::BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A `Forward` to one fixed upstream.
pub fn forward_to(
    upstream: SocketAddr,
) -> Forward<tcp::TcpConnector, impl Fn(&Request<Incoming>) -> Option<Target> + Send + Sync + 'static>
{
    Forward::new(tcp::TcpConnector::new(), move |_: &Request<Incoming>| {
        Some(Target::from(upstream))
    })
}

pub struct Running {
    pub addr: SocketAddr,
    pub signal: Option<drain::Signal>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub async fn shutdown(mut self) {
        if let Some(s) = self.signal.take() {
            s.start();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// Serves any inbound service on an ephemeral loopback port.
pub async fn serve<S>(svc: S) -> Running
where
    S: Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<proxystack::BoxError>,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (signal, watch) = drain::channel();
    let task = tokio::spawn(async move {
        Server::new()
            .drain_timeout(Duration::from_secs(5))
            .serve(listener, svc, watch)
            .await
    });
    Running {
        addr,
        signal: Some(signal),
        task,
    }
}

/// Starts an `HttpServer` around a `Forward`.
pub async fn serve_http<S>(server: HttpServer<S>) -> Running
where
    HttpServer<S>: Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
    <HttpServer<S> as Service<Conn<TcpStream>>>::Error: Into<proxystack::BoxError>,
    <HttpServer<S> as Service<Conn<TcpStream>>>::Future: Send + 'static,
{
    serve(server).await
}

/// Runs curl with `args`; `None` when curl is not installed.
pub async fn curl(args: &[&str]) -> Option<std::process::Output> {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20"]).args(args);
    match cmd.output().await {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("curl: {e}"),
    }
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok()
}

/// Writes raw bytes, half-closes nothing, and reads the answer until EOF or `wait`.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(wait, s.read_to_end(&mut out))
        .await
        .is_ok();
    (out, closed)
}

/// The status code of the first response in `raw`.
pub fn status_of(raw: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(raw.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// An HTTP/1.1 or h2c client connection (hyper) to `addr`.
pub async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<BoxBody> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<BoxBody> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

pub fn body(b: impl Into<Bytes>) -> BoxBody {
    full(b)
}

pub fn empty() -> BoxBody {
    Empty::new().map_err(|n| match n {}).boxed_unsync()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A good HTTP/1.1 request for `/headers` that closes the connection.
pub const GOOD: &[u8] = b"GET /headers HTTP/1.1\r\nHost: good\r\nConnection: close\r\n\r\n";

/// The proxy still answers a good request with `200` on a new connection (after a bad one).
pub async fn assert_still_serves(proxy: SocketAddr) {
    let (out, _) = raw_exchange(proxy, GOOD, Duration::from_secs(5)).await;
    assert_eq!(
        status_of(&out),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out)
    );
}
