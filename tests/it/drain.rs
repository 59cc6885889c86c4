//! Graceful shutdown with in-flight work of every kind at once (issue 10 part 5): four
//! listeners in one process share one drain signal — HTTP (`HttpServer` + `Forward` to a
//! slow upstream), CONNECT (`ConnectTerminate`, HTTP/1.1 and HTTP/2), HBONE
//! (`hbone::Inbound`) and a plain TCP relay.
//!
//! * Work that ends before the drain deadline finishes intact (every byte, checked), new
//!   connections are refused, HTTP/1 keep-alive connections get `Connection: close`, HTTP/2
//!   connections get `GOAWAY`, idle keep-alive connections are closed, and every `serve`
//!   returns without aborting anything.
//! * Work that outlives the deadline is cut when it passes (not before): clients see EOF or
//!   a reset, every `serve` returns, and no descriptor is left behind.
#![cfg(all(feature = "http", feature = "hbone", feature = "demo-certs"))]

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxystack::conn::Metadata;
use proxystack::connect::{ConnectTerminate, TunnelInfo};
use proxystack::hbone::{self, HboneTarget, Inbound};
use proxystack::http::{Forward, HttpServer, Incoming};
use proxystack::identity::SpiffeId;
use proxystack::serve::ServeStats;
use proxystack::tls::demo::DemoCa;
use proxystack::{drain, tcp, Authority, Conn, Server, Target};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

const TD: &str = "cluster.local";
/// Bytes per tunnel write.
const CHUNK: usize = 16 * 1024;
/// Generous bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(15);

/// Deterministic test bytes; `seed` makes each stream's differ.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// FNV-1a, the checksum the upstream reports for uploads.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

// ----- the slow upstream -----

/// An HTTP/1.1 + h2c upstream: `/slow?bytes=N` answers `pattern(N, 7)` once `release` is
/// set, `/upload` answers `"<len> <fnv>"` of the request body, `/ws` switches protocols
/// (`101`) and echoes, anything else `ok`.
async fn slow_backend(release: watch::Receiver<bool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let release = release.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let mut release = release.clone();
                    async move {
                        let body = match req.uri().path() {
                            "/ws" => {
                                let upgrade = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    if let Ok(up) = upgrade.await {
                                        let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                                        let _ = tokio::io::copy(&mut r, &mut w).await;
                                        let _ = w.shutdown().await;
                                    }
                                });
                                let resp = Response::builder()
                                    .status(101)
                                    .header("connection", "upgrade")
                                    .header("upgrade", "websocket")
                                    .body(Full::new(Bytes::new()))
                                    .unwrap();
                                return Ok::<_, Infallible>(resp);
                            }
                            "/slow" => {
                                let n = req
                                    .uri()
                                    .query()
                                    .and_then(|q| q.strip_prefix("bytes="))
                                    .and_then(|n| n.parse().ok())
                                    .unwrap_or(1024);
                                let _ = release.wait_for(|r| *r).await;
                                Bytes::from(pattern(n, 7))
                            }
                            "/upload" => {
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                Bytes::from(format!("{} {:016x}", body.len(), fnv(&body)))
                            }
                            _ => Bytes::from_static(b"ok"),
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

// ----- the proxies -----

struct Proxy {
    name: &'static str,
    addr: SocketAddr,
    stats: Arc<ServeStats>,
    task: JoinHandle<io::Result<()>>,
}

async fn listen<S>(
    name: &'static str,
    drain_timeout: Duration,
    svc: S,
    watch: drain::Watch,
) -> Proxy
where
    S: tower::Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new().drain_timeout(drain_timeout);
    let stats = server.stats();
    let task = tokio::spawn(async move { server.serve(listener, svc, watch).await });
    Proxy {
        name,
        addr,
        stats,
        task,
    }
}

/// Everything one test runs: upstreams, then the four proxies on one drain signal.
struct World {
    http: SocketAddr,
    connect: SocketAddr,
    relay: SocketAddr,
    proxies: Vec<Proxy>,
    signal: drain::Signal,
    echo: SocketAddr,
    release: watch::Sender<bool>,
    hbone: hbone::Connector,
    hbone_target: Target,
    /// Descriptors open before the proxies started.
    fds0: usize,
}

async fn world(drain_timeout: Duration) -> World {
    let (echo, _) = counting_echo_server().await;
    let (release, released) = watch::channel(false);
    let backend = slow_backend(released).await;
    let ca = DemoCa::new(TD);
    let hbone = hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots()).unwrap();
    let fds0 = open_fds();

    let (signal, watch) = drain::channel();
    let forward = Forward::new(tcp::TcpConnector::new(), move |_: &Request<Incoming>| {
        Some(Target::from(backend))
    });
    let to_authority = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(|c: &Metadata| Some(Target::from(c.get::<TunnelInfo>()?.authority.clone())));
    let to_app_port = tcp::Relay::new(tcp::TcpConnector::new()).upstream(|c: &Metadata| {
        let port = c.get::<TunnelInfo>()?.authority.port();
        Some(Target::from(([127, 0, 0, 1], port)))
    });
    let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
        .service(to_app_port)
        .unwrap();
    let to_echo = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &Metadata| Some(Target::from(echo)));
    let proxies = vec![
        listen(
            "http",
            drain_timeout,
            HttpServer::new(forward),
            watch.clone(),
        )
        .await,
        listen(
            "connect",
            drain_timeout,
            ConnectTerminate::new(to_authority),
            watch.clone(),
        )
        .await,
        listen("hbone", drain_timeout, inbound, watch.clone()).await,
        listen("relay", drain_timeout, to_echo, watch).await,
    ];
    let hbone_target = HboneTarget::new(
        proxies[2].addr,
        Authority::from(SocketAddr::new(proxies[2].addr.ip(), echo.port())),
        [SpiffeId::istio(TD, "default", "server").unwrap()],
    )
    .into_target();
    World {
        http: proxies[0].addr,
        connect: proxies[1].addr,
        relay: proxies[3].addr,
        proxies,
        signal,
        echo,
        release,
        hbone,
        hbone_target,
        fds0,
    }
}

// ----- clients -----

/// A TCP stream that keeps a copy of every byte it reads, to look for frames afterwards.
struct Tap {
    io: TcpStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.seen
            .lock()
            .unwrap()
            .extend_from_slice(&buf.filled()[before..]);
        polled
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Whether the server's bytes (frames after its SETTINGS) contain a GOAWAY.
fn has_goaway(seen: &Mutex<Vec<u8>>) -> bool {
    let seen = seen.lock().unwrap();
    let mut i = 0;
    while i + 9 <= seen.len() {
        if seen[i + 3] == 0x7 {
            return true;
        }
        i += 9
            + (usize::from(seen[i]) << 16
                | usize::from(seen[i + 1]) << 8
                | usize::from(seen[i + 2]));
    }
    false
}

/// An HTTP/2 client connection (the h2 crate) whose received bytes are kept.
struct H2 {
    send: h2::client::SendRequest<Bytes>,
    conn: JoinHandle<Result<(), h2::Error>>,
    seen: Arc<Mutex<Vec<u8>>>,
}

async fn h2_connect(addr: SocketAddr) -> H2 {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tap = Tap {
        io: TcpStream::connect(addr).await.unwrap(),
        seen: seen.clone(),
    };
    // Windows larger than the responses: the test reads its streams one after another, and
    // with h2's 64 KiB defaults the unread ones would starve the one being read.
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .handshake(tap)
        .await
        .unwrap();
    H2 {
        send,
        conn: tokio::spawn(conn),
        seen,
    }
}

impl H2 {
    async fn request(
        &mut self,
        req: Request<()>,
        end: bool,
    ) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
        let mut send = self.send.clone().ready().await.unwrap();
        send.send_request(req, end).unwrap()
    }
}

async fn h2_body(mut body: h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An HTTP/2 CONNECT tunnel as two halves of a stream.
struct H2Tunnel {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    buffered: Vec<u8>,
}

impl H2Tunnel {
    async fn open(h2: &mut H2, authority: SocketAddr) -> Self {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        let (response, send) = h2.request(req, false).await;
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        H2Tunnel {
            send,
            recv: response.into_body(),
            buffered: Vec::new(),
        }
    }

    /// Sends `data` and reads it back from the echo behind the tunnel.
    async fn exchange(&mut self, data: &[u8]) {
        self.send
            .send_data(Bytes::copy_from_slice(data), false)
            .unwrap();
        while self.buffered.len() < data.len() {
            let chunk = self.recv.data().await.expect("tunnel open").unwrap();
            let _ = self.recv.flow_control().release_capacity(chunk.len());
            self.buffered.extend_from_slice(&chunk);
        }
        let got: Vec<u8> = self.buffered.drain(..data.len()).collect();
        assert!(got == data, "tunnel bytes differ");
    }

    /// Ends our side and reads the rest (the echo closes in turn).
    async fn finish(mut self) -> Vec<u8> {
        self.send.send_data(Bytes::new(), true).unwrap();
        let mut rest = std::mem::take(&mut self.buffered);
        rest.extend(h2_body(self.recv).await.unwrap());
        rest
    }
}

async fn exchange(s: &mut (impl AsyncRead + AsyncWrite + Unpin), data: &[u8]) {
    s.write_all(data).await.unwrap();
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).await.unwrap();
    assert!(got == data, "tunnel bytes differ");
}

/// Reads one HTTP/1.1 response with a `Content-Length`; returns the lower-cased head and
/// the body.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .unwrap_or_else(|| panic!("no content-length: {head}"))
                .trim()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                return (head, body);
            }
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `CONNECT` over HTTP/1.1: the stream, once the proxy answered 200.
async fn h1_connect(proxy: SocketAddr, authority: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).await.unwrap(),
            1,
            "closed before the answer"
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// An HTTP/1.1 `Upgrade` through the HTTP proxy: the stream, once `101` came back.
async fn h1_upgrade(proxy: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: drain.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).await.unwrap(),
            1,
            "closed before the answer"
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Waits until the drain has started.
async fn drained(mut started: watch::Receiver<bool>) {
    let _ = started.wait_for(|s| *s).await;
}

/// A tunnel's work: some bytes before the drain, the rest after it, then a clean close.
async fn stream_through(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    seed: u8,
    ready: mpsc::Sender<()>,
    started: watch::Receiver<bool>,
) {
    let data = pattern(8 * CHUNK, seed);
    exchange(&mut s, &data[..2 * CHUNK]).await;
    ready.send(()).await.unwrap();
    drained(started).await;
    for c in data[2 * CHUNK..].chunks(CHUNK) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        exchange(&mut s, c).await;
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

/// Waits until connecting to `addr` is refused.
async fn refused(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + SOON;
    while Instant::now() < deadline {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return true,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    false
}

/// The descriptor count comes back to where it was before the proxies started.
async fn assert_no_fd_leak(fds0: usize) {
    assert!(
        // Two runtime threads, each of which may keep pooled splice pipes.
        eventually(Duration::from_secs(10), || {
            open_fds() <= fds0 + 4 + 2 * SPLICE_POOL_FDS_PER_THREAD
        })
        .await,
        "{} descriptors open, {fds0} before the proxies started",
        open_fds()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_inflight_work_of_every_kind_finish() {
    init_tracing();
    let w = world(Duration::from_secs(20)).await;
    let (ready, mut ready_rx) = mpsc::channel(16);
    let (start, started) = watch::channel(false);
    let mut work: JoinSet<&'static str> = JoinSet::new();

    // HTTP/1: a kept-alive connection whose second request is in flight (twice), and one
    // uploading its body slowly; each answer must say `Connection: close`.
    for seed in [1u8, 2] {
        let (ready, addr) = (ready.clone(), w.http);
        work.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /fast HTTP/1.1\r\nHost: drain.test\r\n\r\n")
                .await
                .unwrap();
            let (head, body) = read_response(&mut s).await;
            assert!(
                head.starts_with("http/1.1 200") && !head.contains("connection: close"),
                "{head}"
            );
            assert_eq!(body, b"ok");
            let n = 100_000 + usize::from(seed);
            s.write_all(
                format!("GET /slow?bytes={n} HTTP/1.1\r\nHost: drain.test\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            ready.send(()).await.unwrap();
            let (head, body) = read_response(&mut s).await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(
                head.contains("connection: close"),
                "no Connection: close while draining: {head}"
            );
            assert!(body == pattern(n, 7), "HTTP/1 body differs");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            "http1 slow response"
        });
    }
    {
        let (ready, started, addr) = (ready.clone(), started.clone(), w.http);
        work.spawn(async move {
            let body = pattern(6 * CHUNK, 3);
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!(
                    "POST /upload HTTP/1.1\r\nHost: drain.test\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            s.write_all(&body[..2 * CHUNK]).await.unwrap();
            ready.send(()).await.unwrap();
            drained(started).await;
            for c in body[2 * CHUNK..].chunks(CHUNK) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                s.write_all(c).await.unwrap();
            }
            let (head, answer) = read_response(&mut s).await;
            assert!(head.contains("connection: close"), "{head}");
            assert_eq!(
                answer,
                format!("{} {:016x}", body.len(), fnv(&body)).as_bytes()
            );
            "http1 slow upload"
        });
    }
    // HTTP/1 idle keep-alive: closed by the drain.
    {
        let (ready, addr) = (ready.clone(), w.http);
        work.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /fast HTTP/1.1\r\nHost: drain.test\r\n\r\n")
                .await
                .unwrap();
            read_response(&mut s).await;
            ready.send(()).await.unwrap();
            let mut rest = Vec::new();
            tokio::time::timeout(SOON, s.read_to_end(&mut rest))
                .await
                .expect("idle keep-alive connection closed on drain")
                .unwrap();
            assert!(rest.is_empty());
            "http1 idle keep-alive"
        });
    }
    // HTTP/2: three slow responses and a slow upload on one connection; GOAWAY.
    {
        let (ready, started, addr) = (ready.clone(), started.clone(), w.http);
        work.spawn(async move {
            let mut h2 = h2_connect(addr).await;
            let mut responses = Vec::new();
            for i in 0..3 {
                let req = Request::get(format!("http://drain.test/slow?bytes={}", 200_000 + i))
                    .body(())
                    .unwrap();
                responses.push((200_000 + i, h2.request(req, true).await.0));
            }
            let upload = pattern(6 * CHUNK, 4);
            let req = Request::post("http://drain.test/upload").body(()).unwrap();
            let (answer, mut send) = h2.request(req, false).await;
            send.send_data(Bytes::copy_from_slice(&upload[..2 * CHUNK]), false)
                .unwrap();
            ready.send(()).await.unwrap();
            drained(started).await;
            for c in upload[2 * CHUNK..].chunks(CHUNK) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                send.send_data(Bytes::copy_from_slice(c), false).unwrap();
            }
            send.send_data(Bytes::new(), true).unwrap();
            for (n, response) in responses {
                let response = response.await.unwrap();
                assert_eq!(response.status(), 200);
                assert!(
                    h2_body(response.into_body()).await.unwrap() == pattern(n, 7),
                    "h2 body differs"
                );
            }
            let answer = h2_body(answer.await.unwrap().into_body()).await.unwrap();
            assert_eq!(
                answer,
                format!("{} {:016x}", upload.len(), fnv(&upload)).as_bytes()
            );
            drop(h2.send);
            tokio::time::timeout(SOON, h2.conn)
                .await
                .expect("h2 connection closed after its streams")
                .unwrap()
                .unwrap();
            assert!(has_goaway(&h2.seen), "no GOAWAY on the HTTP/2 connection");
            "h2 streams"
        });
    }
    // An upgraded (WebSocket-style) HTTP/1.1 connection.
    {
        let (ready, started, addr) = (ready.clone(), started.clone(), w.http);
        work.spawn(async move {
            stream_through(h1_upgrade(addr).await, 10, ready, started).await;
            "http1 upgrade"
        });
    }
    // CONNECT over HTTP/1.1 and HTTP/2 (GOAWAY), HBONE, and the plain relay.
    {
        let (ready, started, addr, echo) = (ready.clone(), started.clone(), w.connect, w.echo);
        work.spawn(async move {
            stream_through(h1_connect(addr, echo).await, 5, ready, started).await;
            "h1 CONNECT tunnel"
        });
    }
    {
        let (ready, started, addr, echo) = (ready.clone(), started.clone(), w.connect, w.echo);
        work.spawn(async move {
            let mut h2 = h2_connect(addr).await;
            let mut tunnels = Vec::new();
            for _ in 0..2 {
                tunnels.push(H2Tunnel::open(&mut h2, echo).await);
            }
            let data = pattern(8 * CHUNK, 6);
            for t in &mut tunnels {
                t.exchange(&data[..2 * CHUNK]).await;
            }
            ready.send(()).await.unwrap();
            drained(started).await;
            for c in data[2 * CHUNK..].chunks(CHUNK) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                for t in &mut tunnels {
                    t.exchange(c).await;
                }
            }
            for t in tunnels {
                assert!(t.finish().await.is_empty());
            }
            drop(h2.send);
            tokio::time::timeout(SOON, h2.conn)
                .await
                .expect("h2 CONNECT connection closed after its tunnels")
                .unwrap()
                .unwrap();
            assert!(has_goaway(&h2.seen), "no GOAWAY on the CONNECT connection");
            "h2 CONNECT tunnels"
        });
    }
    {
        let (ready, started) = (ready.clone(), started.clone());
        let (connector, target) = (w.hbone.clone(), w.hbone_target.clone());
        work.spawn(async move {
            let tunnel = connector.oneshot(target).await.unwrap();
            stream_through(tunnel, 8, ready, started).await;
            "hbone tunnel"
        });
    }
    {
        let (ready, started, addr) = (ready.clone(), started.clone(), w.relay);
        work.spawn(async move {
            stream_through(TcpStream::connect(addr).await.unwrap(), 9, ready, started).await;
            "tcp relay"
        });
    }
    drop(ready);

    let kinds = work.len();
    for _ in 0..kinds {
        tokio::time::timeout(SOON, ready_rx.recv())
            .await
            .expect("work in flight")
            .expect("no work failed before the drain");
    }
    w.signal.start();
    start.send(true).unwrap();
    // The slow answers come while the drain is under way.
    let release = w.release;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        release.send(true).unwrap();
    });
    for p in &w.proxies {
        assert!(
            refused(p.addr).await,
            "{}: new connections still accepted while draining",
            p.name
        );
    }
    let mut done = Vec::new();
    while let Some(finished) = tokio::time::timeout(SOON, work.join_next())
        .await
        .expect("in-flight work finished")
    {
        let kind = finished.unwrap();
        eprintln!("finished: {kind}");
        done.push(kind);
    }
    eprintln!("finished intact while draining: {done:?}");
    assert_eq!(done.len(), kinds);
    for p in w.proxies {
        tokio::time::timeout(SOON, p.task)
            .await
            .unwrap_or_else(|_| panic!("{}: serve did not return", p.name))
            .unwrap()
            .unwrap();
        let s = &p.stats;
        eprintln!(
            "{}: accepted {}, errors {}, aborted {}",
            p.name,
            s.accepted.load(SeqCst),
            s.errors.load(SeqCst),
            s.aborted.load(SeqCst)
        );
        assert_eq!(
            s.aborted.load(SeqCst),
            0,
            "{}: work cut before the deadline",
            p.name
        );
        assert_eq!(s.active.load(SeqCst), 0);
    }
    drop(w.hbone);
    assert_no_fd_leak(w.fds0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_everything_left() {
    init_tracing();
    const DEADLINE: Duration = Duration::from_secs(1);
    let w = world(DEADLINE).await;
    let (ready, mut ready_rx) = mpsc::channel(16);
    // Each client reports how long after the drain started it saw its connection end.
    let mut work: JoinSet<(&'static str, Option<Duration>)> = JoinSet::new();
    let t0 = Arc::new(Mutex::new(None::<Instant>));
    let since = |t0: &Mutex<Option<Instant>>| t0.lock().unwrap().map(|t| t.elapsed());

    // A closed connection: EOF or an error, within SOON.
    async fn ends(s: &mut (impl AsyncRead + Unpin)) {
        let mut buf = vec![0u8; 64 * 1024];
        tokio::time::timeout(SOON, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("closed after the deadline");
    }

    {
        let (ready, addr, t0) = (ready.clone(), w.http, t0.clone());
        work.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /slow?bytes=1000 HTTP/1.1\r\nHost: drain.test\r\n\r\n")
                .await
                .unwrap();
            ready.send(()).await.unwrap();
            ends(&mut s).await;
            ("http1 slow response", since(&t0))
        });
    }
    {
        let (ready, addr) = (ready.clone(), w.http);
        work.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /fast HTTP/1.1\r\nHost: drain.test\r\n\r\n")
                .await
                .unwrap();
            read_response(&mut s).await;
            ready.send(()).await.unwrap();
            ends(&mut s).await;
            // Idle: closed at once, not at the deadline.
            ("http1 idle keep-alive", None)
        });
    }
    {
        let (ready, addr, t0) = (ready.clone(), w.http, t0.clone());
        work.spawn(async move {
            let mut h2 = h2_connect(addr).await;
            let req = Request::get("http://drain.test/slow?bytes=1000")
                .body(())
                .unwrap();
            let (response, _send) = h2.request(req, true).await;
            ready.send(()).await.unwrap();
            let _ = tokio::time::timeout(SOON, response)
                .await
                .expect("h2 stream ended");
            let _ = tokio::time::timeout(SOON, h2.conn)
                .await
                .expect("h2 connection closed");
            ("h2 slow stream", since(&t0))
        });
    }
    {
        let (ready, addr, t0) = (ready.clone(), w.http, t0.clone());
        work.spawn(async move {
            let mut s = h1_upgrade(addr).await;
            exchange(&mut s, b"before").await;
            ready.send(()).await.unwrap();
            ends(&mut s).await;
            ("http1 upgrade", since(&t0))
        });
    }
    {
        let (ready, addr, echo, t0) = (ready.clone(), w.connect, w.echo, t0.clone());
        work.spawn(async move {
            let mut s = h1_connect(addr, echo).await;
            exchange(&mut s, b"before").await;
            ready.send(()).await.unwrap();
            ends(&mut s).await;
            ("h1 CONNECT tunnel", since(&t0))
        });
    }
    {
        let (ready, addr, echo, t0) = (ready.clone(), w.connect, w.echo, t0.clone());
        work.spawn(async move {
            let mut h2 = h2_connect(addr).await;
            let mut t = H2Tunnel::open(&mut h2, echo).await;
            t.exchange(b"before").await;
            ready.send(()).await.unwrap();
            let _ = tokio::time::timeout(SOON, h2.conn)
                .await
                .expect("h2 CONNECT connection closed");
            ("h2 CONNECT tunnel", since(&t0))
        });
    }
    {
        let (ready, t0) = (ready.clone(), t0.clone());
        let (connector, target) = (w.hbone.clone(), w.hbone_target.clone());
        work.spawn(async move {
            let mut t = connector.oneshot(target).await.unwrap();
            exchange(&mut t, b"before").await;
            ready.send(()).await.unwrap();
            ends(&mut t).await;
            ("hbone tunnel", since(&t0))
        });
    }
    {
        let (ready, addr, t0) = (ready.clone(), w.relay, t0.clone());
        work.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            exchange(&mut s, b"before").await;
            ready.send(()).await.unwrap();
            ends(&mut s).await;
            ("tcp relay", since(&t0))
        });
    }
    drop(ready);
    for _ in 0..work.len() {
        tokio::time::timeout(SOON, ready_rx.recv())
            .await
            .unwrap()
            .unwrap();
    }

    *t0.lock().unwrap() = Some(Instant::now());
    w.signal.start();
    for p in &w.proxies {
        assert!(
            refused(p.addr).await,
            "{}: new connections accepted while draining",
            p.name
        );
    }
    while let Some(finished) = work.join_next().await {
        let (kind, after) = finished.unwrap();
        eprintln!("{kind}: closed {after:?} after the drain started");
        if let Some(after) = after {
            assert!(
                after >= DEADLINE,
                "{kind} cut {after:?} into a {DEADLINE:?} drain"
            );
        }
    }
    for p in w.proxies {
        tokio::time::timeout(SOON, p.task)
            .await
            .unwrap_or_else(|_| panic!("{}: serve did not return", p.name))
            .unwrap()
            .unwrap();
        let s = &p.stats;
        eprintln!(
            "{}: aborted {} at the deadline",
            p.name,
            s.aborted.load(SeqCst)
        );
        assert!(
            s.aborted.load(SeqCst) >= 1,
            "{}: nothing was left to abort?",
            p.name
        );
        assert_eq!(s.active.load(SeqCst), 0);
    }
    // The upstream's held answers may go now; nothing may be left open in the proxies.
    w.release.send(true).unwrap();
    drop(w.hbone);
    assert_no_fd_leak(w.fds0).await;
}

/// Issue 14 item 9: a peer that resets its idle HTTP/2 connection just as the drain's
/// `GOAWAY` reaches it (the GOAWAY unread, so its close is a reset) ends that connection
/// cleanly: it is not logged or counted as a connection error.
#[tokio::test]
async fn peer_closing_an_idle_connection_during_a_drain_is_not_an_error() {
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(|c: &Metadata| Some(Target::from(c.get::<TunnelInfo>()?.authority.clone())));
    let hello = tower::service_fn(|_: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hi"))))
    });
    assert_eq!(
        idle_h2_peer_resets_during_drain(ConnectTerminate::new(relay)).await,
        0
    );
    assert_eq!(
        idle_h2_peer_resets_during_drain(HttpServer::new(hello)).await,
        0
    );
}

/// Serves `svc`, opens an idle HTTP/2 connection, drains, resets the connection after the
/// GOAWAY arrived; the number of connection errors counted.
async fn idle_h2_peer_resets_during_drain<S>(svc: S) -> u64
where
    S: tower::Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let (signal, watch) = drain::channel();
    let proxy = listen("h2", SOON, svc, watch).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // The server's SETTINGS frame header: the connection is established and idle.
    let mut head = [0u8; 9];
    tokio::time::timeout(SOON, c.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[3], 0x4, "SETTINGS first");
    let drained = tokio::spawn(signal.drain());
    // Let the GOAWAY arrive and stay unread: closing now sends a reset.
    tokio::time::sleep(Duration::from_millis(200)).await;
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    tokio::time::timeout(SOON, proxy.task)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
    drained.await.unwrap();
    proxy.stats.errors.load(SeqCst)
}
