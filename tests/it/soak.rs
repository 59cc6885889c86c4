//! Soak through the example binaries: mixed traffic, concurrently, for a bounded time,
//! with injected faults, then a health check of every example process.
//!
//! Traffic (each kind from its own client tasks, against in-process upstreams that the
//! test owns):
//! * TCP relay: `tcp_relay` → echo upstream;
//! * HTTP/1.1 and h2c: `http_proxy` → HTTP upstream that answers with the request body and
//!   its checksum (`x-sum`);
//! * HTTP/1.1 CONNECT: `connect_proxy` → echo upstream;
//! * HBONE: an `hbone` client-side process → mTLS + HTTP/2 CONNECT → an `hbone`
//!   server-side process → echo upstream;
//! * a nested tunnel, all through the binaries: a second `hbone` client-side process whose
//!   tunnels lead to `connect_proxy`, and the test opens an HTTP/1.1 CONNECT tunnel inside
//!   each of those HBONE tunnels (client → HBONE → CONNECT → echo upstream).
//!
//! Chaos, from a seeded xorshift (`SOAK_SEED`): clients drop their connection mid-transfer
//! (plain close, or RST via SO_LINGER 0), and upstreams are killed (listener and every
//! connection gone, by FIN or RST) and rebound on the same port a moment later.
//!
//! Every completed transfer is verified byte for byte and by checksum (FNV-1a); a transfer
//! that failed counts as an error unless it overlapped an upstream restart of its own
//! upstream (corruption is never excused). Afterwards: no panics on any example's
//! `/metrics`, open fds and RSS of every example back near the baseline taken after the
//! warm-up, and every example drains and exits 0 within 15 s of SIGTERM.
//!
//! `soak_short` runs ~20 s of traffic; `soak` is ignored and runs `SOAK_SECONDS` (default
//! 300): `cargo test --all-features --test it soak:: -- --ignored soak --nocapture`.
#![cfg(all(
    unix,
    feature = "http",
    feature = "connect",
    feature = "hbone",
    feature = "demo-certs"
))]

use crate::examples_common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::examples_common::{http, identity_section, Example, TempFiles};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Upper bound for one transfer (or one HTTP connection's requests); generous, never a
/// speed check.
const TRANSFER: Duration = Duration::from_secs(15);
/// Share of client connections that are aborted on purpose, in percent.
const ABORT_PERCENT: u64 = 12;
/// Client tasks per kind of traffic.
const WORKERS: usize = 2;
/// How long faults are still blamed on a restart after the upstream is back (pooled
/// upstream connections in the proxies notice the kill).
const GRACE: Duration = Duration::from_secs(1);
/// Margins for "back near the baseline".
const FD_MARGIN: usize = 16;
const RSS_MARGIN_KIB: u64 = 32 * 1024;

#[test]
fn soak_short() {
    run(Duration::from_secs(20), Duration::from_secs(3));
}

#[test]
#[ignore = "long; SOAK_SECONDS (default 300)"]
fn soak() {
    let secs = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    run(Duration::from_secs(secs), Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------
// Randomness and checksums

/// xorshift64*: small, seeded, good enough to pick sizes and faults.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn fork(&mut self) -> Rng {
        Rng::new(self.next())
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// Mostly small payloads, some medium, a few large.
fn payload_len(rng: &mut Rng, large: u64) -> usize {
    (match rng.below(10) {
        0..=4 => rng.range(1, 4096),
        5..=8 => rng.range(4097, 64 * 1024),
        _ => rng.range(64 * 1024 + 1, large),
    }) as usize
}

/// FNV-1a, 64 bit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn of(data: &[u8]) -> Self {
        let mut f = Fnv::new();
        f.update(data);
        f
    }
    fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

// ---------------------------------------------------------------------------------------
// Upstreams the test owns, with kill and restart

#[derive(Clone, Copy)]
enum Serve {
    /// Echo every byte, FIN after the client's FIN.
    Echo,
    /// HTTP/1.1 or h2c: answer with the request body and `x-sum: <fnv of it>`.
    Http,
}

struct Upstream {
    name: &'static str,
    serve: Serve,
    addr: SocketAddr,
    /// Odd from the moment a kill starts until `GRACE` after the rebind.
    epoch: AtomicU64,
    /// Set while a kill is in progress: connections then close with RST instead of FIN.
    rst: Arc<AtomicBool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Upstream {
    /// Binds outside the kernel's ephemeral port range, so no outgoing connection (ours or
    /// another process') can take the port while the upstream is down.
    async fn start(name: &'static str, serve: Serve, rng: &mut Rng) -> Arc<Self> {
        let mut listener = None;
        for _ in 0..500 {
            let port = 20_000 + rng.below(10_000) as u16;
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
                listener = Some(l);
                break;
            }
        }
        let listener = listener.expect("a free port in 20000..30000");
        let up = Arc::new(Upstream {
            name,
            serve,
            addr: listener.local_addr().unwrap(),
            epoch: AtomicU64::new(0),
            rst: Arc::new(AtomicBool::new(false)),
            task: Mutex::new(None),
        });
        up.spawn(listener);
        up
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    fn spawn(&self, listener: TcpListener) {
        let (serve, rst) = (self.serve, self.rst.clone());
        let task = tokio::spawn(async move {
            // Owning the connection tasks here means aborting this task kills them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => {
                            let rst = rst.clone();
                            conns.spawn(async move {
                                match serve {
                                    Serve::Echo => echo(s, rst).await,
                                    Serve::Http => http_upstream(s, rst).await,
                                }
                            });
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Kills the listener and every connection (RST if `rst`), stays down for `down`,
    /// rebinds the same port. Faults until `grace` after that are blamed on the restart.
    async fn restart(&self, down: Duration, grace: Duration, rst: bool) {
        self.epoch.fetch_add(1, SeqCst);
        self.rst.store(rst, SeqCst);
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        tokio::time::sleep(down).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{}: cannot rebind {}: {e}", self.name, self.addr),
            }
        };
        self.rst.store(false, SeqCst);
        self.spawn(listener);
        tokio::time::sleep(grace).await;
        self.epoch.fetch_add(1, SeqCst);
    }
}

/// Sets SO_LINGER 0 on the socket when dropped during a kill, so that the close that
/// follows is an RST. Must be declared after the socket's owner (dropped before it).
struct LingerOnDrop {
    fd: RawFd,
    rst: Arc<AtomicBool>,
}

impl Drop for LingerOnDrop {
    fn drop(&mut self) {
        if self.rst.load(SeqCst) {
            // SAFETY: the socket owning `fd` is declared before this guard and is still open.
            let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
            let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
        }
    }
}

async fn echo(mut s: TcpStream, rst: Arc<AtomicBool>) {
    let _guard = LingerOnDrop {
        fd: s.as_raw_fd(),
        rst,
    };
    let (mut r, mut w) = s.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

async fn http_upstream(s: TcpStream, rst: Arc<AtomicBool>) {
    let fd = s.as_raw_fd();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(s), hyper::service::service_fn(echo_body));
    let _guard = LingerOnDrop { fd, rst };
    let _ = conn.await;
}

async fn echo_body(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = req.into_body().collect().await?.to_bytes();
    let sum = Fnv::of(&body).hex();
    Ok(Response::builder()
        .header("x-sum", sum)
        .body(Full::new(body))
        .unwrap())
}

// ---------------------------------------------------------------------------------------
// Accounting

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Relay,
    Http1,
    H2c,
    Connect,
    Hbone,
    Nested,
}

const KINDS: [Kind; 6] = [
    Kind::Relay,
    Kind::Http1,
    Kind::H2c,
    Kind::Connect,
    Kind::Hbone,
    Kind::Nested,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Relay => "relay",
            Kind::Http1 => "http1",
            Kind::H2c => "h2c",
            Kind::Connect => "connect",
            Kind::Hbone => "hbone",
            Kind::Nested => "hbone+connect",
        }
    }
}

enum Outcome {
    /// Every byte came back, checksum equal; the payload size.
    Verified(u64),
    /// The client aborted on purpose.
    Aborted,
    /// Did not complete; excused only by an upstream restart.
    Failed(String),
    /// Wrong bytes: never excused.
    Corrupt(String),
}

#[derive(Default)]
struct KindStats {
    connections: AtomicU64,
    verified: AtomicU64,
    bytes: AtomicU64,
    aborts: AtomicU64,
    aborted_transfers: AtomicU64,
    excused: AtomicU64,
    errors: AtomicU64,
}

#[derive(Default)]
struct Stats {
    kinds: [KindStats; 6],
    restarts: AtomicU64,
    messages: Mutex<Vec<String>>,
}

impl Stats {
    fn of(&self, kind: Kind) -> &KindStats {
        &self.kinds[KINDS.iter().position(|k| *k == kind).unwrap()]
    }

    fn record(&self, kind: Kind, up: &Upstream, epoch0: u64, outcome: Outcome) {
        let s = self.of(kind);
        let error = match outcome {
            Outcome::Verified(n) => {
                s.verified.fetch_add(1, SeqCst);
                s.bytes.fetch_add(n, SeqCst);
                return;
            }
            Outcome::Aborted => {
                s.aborted_transfers.fetch_add(1, SeqCst);
                return;
            }
            Outcome::Failed(msg) => {
                // A kill that started before the transfer ended, or one still in its
                // grace period when the transfer started, explains the failure.
                if epoch0 % 2 == 1 || up.epoch() != epoch0 {
                    s.excused.fetch_add(1, SeqCst);
                    return;
                }
                msg
            }
            Outcome::Corrupt(msg) => format!("CORRUPT: {msg}"),
        };
        s.errors.fetch_add(1, SeqCst);
        let mut m = self.messages.lock().unwrap();
        if m.len() < 30 {
            m.push(format!("{}: {error}", kind.name()));
        }
    }

    fn errors(&self) -> u64 {
        self.kinds.iter().map(|k| k.errors.load(SeqCst)).sum()
    }

    fn total(&self, f: impl Fn(&KindStats) -> &AtomicU64) -> u64 {
        self.kinds.iter().map(|k| f(k).load(SeqCst)).sum()
    }
}

// ---------------------------------------------------------------------------------------
// Clients

/// Where each kind of traffic enters, and the upstream it ends at.
struct Targets {
    relay: SocketAddr,
    http: SocketAddr,
    connect: SocketAddr,
    hbone: SocketAddr,
    nested: SocketAddr,
    up_relay: Arc<Upstream>,
    up_http: Arc<Upstream>,
    up_connect: Arc<Upstream>,
    up_hbone: Arc<Upstream>,
    up_nested: Arc<Upstream>,
}

impl Targets {
    fn upstream(&self, kind: Kind) -> &Arc<Upstream> {
        match kind {
            Kind::Relay => &self.up_relay,
            Kind::Http1 | Kind::H2c => &self.up_http,
            Kind::Connect => &self.up_connect,
            Kind::Hbone => &self.up_hbone,
            Kind::Nested => &self.up_nested,
        }
    }

    fn upstreams(&self) -> [&Arc<Upstream>; 5] {
        [
            &self.up_relay,
            &self.up_http,
            &self.up_connect,
            &self.up_hbone,
            &self.up_nested,
        ]
    }
}

/// A client's planned abort: after `at` payload bytes sent (or, past the payload's end,
/// after `at - len` bytes received), wait `linger` and drop the connection.
#[derive(Clone, Copy)]
struct Abort {
    at: usize,
    rst: bool,
    linger: Duration,
}

fn plan_abort(rng: &mut Rng, aborts: bool, len: usize) -> Option<Abort> {
    (aborts && rng.chance(ABORT_PERCENT)).then(|| abort_mark(rng, len))
}

fn abort_mark(rng: &mut Rng, len: usize) -> Abort {
    Abort {
        at: rng.below(2 * len as u64 + 1) as usize,
        rst: rng.chance(50),
        linger: rng.ms(0, 20),
    }
}

fn set_rst(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

async fn dial(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).unwrap();
    Ok(s)
}

/// `CONNECT authority` on `s`; Ok once the 200 head has been read.
async fn connect_handshake(s: &mut TcpStream, authority: SocketAddr) -> Result<(), String> {
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("CONNECT write: {e}"))?;
    // Byte by byte: nothing of the tunnel may be consumed with the head.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match s.read_u8().await {
            Ok(b) if head.len() < 8192 => head.push(b),
            Ok(_) => return Err("CONNECT: response head too long".into()),
            Err(e) => return Err(format!("CONNECT: no response head: {e}")),
        }
    }
    let status = examples_common::parse_response(&head).map_or(0, |(s, _)| s);
    if status == 200 {
        Ok(())
    } else {
        Err(format!("CONNECT status {status}"))
    }
}

/// One byte-stream transfer (relay, CONNECT, HBONE, nested): open, echo a payload.
async fn stream_conn(t: &Targets, stats: &Stats, kind: Kind, rng: &mut Rng, aborts: bool) {
    let up = t.upstream(kind);
    let epoch0 = up.epoch();
    let payload = {
        let len = payload_len(rng, 1 << 20);
        rng.bytes(len)
    };
    let abort = plan_abort(rng, aborts, payload.len());
    let chunk = rng.range(1, 16 * 1024) as usize;
    stats.of(kind).connections.fetch_add(1, SeqCst);
    let run = async {
        let mut s = match kind {
            Kind::Relay => dial(t.relay).await?,
            Kind::Hbone => dial(t.hbone).await?,
            Kind::Connect => {
                let mut s = dial(t.connect).await?;
                connect_handshake(&mut s, t.up_connect.addr).await?;
                s
            }
            Kind::Nested => {
                // The HBONE tunnel leads to connect_proxy; this CONNECT runs inside it.
                let mut s = dial(t.nested).await?;
                connect_handshake(&mut s, t.up_nested.addr).await?;
                s
            }
            Kind::Http1 | Kind::H2c => unreachable!(),
        };
        Ok::<_, String>(echo_transfer(&mut s, &payload, chunk, abort).await)
    };
    let outcome = match tokio::time::timeout(TRANSFER, run).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Outcome::Failed(e),
        Err(_) => Outcome::Failed(format!("no end within {TRANSFER:?}")),
    };
    if abort.is_some() && matches!(outcome, Outcome::Aborted) {
        stats.of(kind).aborts.fetch_add(1, SeqCst);
    }
    stats.record(kind, up, epoch0, outcome);
}

enum ReadErr {
    Io(String),
    Corrupt(String),
}

/// Reads the echo until EOF (or until `stop_after` bytes), checking each byte against
/// `payload`; the count and checksum of what came back.
async fn read_echo(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    payload: &[u8],
    stop_after: Option<usize>,
) -> Result<(usize, Fnv), ReadErr> {
    let mut got = 0;
    let mut sum = Fnv::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if stop_after.is_some_and(|n| got >= n) {
            return Ok((got, sum));
        }
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| ReadErr::Io(format!("read after {got} of {} B: {e}", payload.len())))?;
        if n == 0 {
            return Ok((got, sum));
        }
        let Some(expected) = payload.get(got..got + n) else {
            return Err(ReadErr::Corrupt(format!(
                "{} B back for a {} B payload",
                got + n,
                payload.len()
            )));
        };
        if &buf[..n] != expected {
            return Err(ReadErr::Corrupt(format!(
                "bytes {got}..{} differ from what was sent",
                got + n
            )));
        }
        sum.update(&buf[..n]);
        got += n;
    }
}

async fn echo_transfer(
    s: &mut TcpStream,
    payload: &[u8],
    chunk: usize,
    abort: Option<Abort>,
) -> Outcome {
    if abort.is_some_and(|a| a.rst) {
        set_rst(s);
    }
    let (mut r, mut w) = s.split();
    let len = payload.len();
    let send_until = abort.map_or(len, |a| a.at.min(len));
    let write = async {
        for c in payload[..send_until].chunks(chunk.max(1)) {
            w.write_all(c).await.map_err(|e| format!("write: {e}"))?;
        }
        if abort.is_none() {
            w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        }
        Ok::<_, String>(())
    };
    if let Some(a) = abort {
        if a.at <= len {
            // Read alongside so the echo never blocks the writer; vanish at the mark.
            tokio::select! {
                _ = write => {}
                r = read_echo(&mut r, payload, None) => {
                    if let Err(ReadErr::Corrupt(e)) = r {
                        return Outcome::Corrupt(e);
                    }
                }
            }
        } else {
            let (_, read) = tokio::join!(write, read_echo(&mut r, payload, Some(a.at - len)));
            if let Err(ReadErr::Corrupt(e)) = read {
                return Outcome::Corrupt(e);
            }
        }
        tokio::time::sleep(a.linger).await;
        return Outcome::Aborted; // the caller drops the socket
    }
    let (write, read) = tokio::join!(write, read_echo(&mut r, payload, None));
    match read {
        Err(ReadErr::Corrupt(e)) => Outcome::Corrupt(e),
        Err(ReadErr::Io(e)) => Outcome::Failed(e),
        Ok((got, sum)) if got == len && sum == Fnv::of(payload) => Outcome::Verified(len as u64),
        Ok((got, _)) if got == len => Outcome::Corrupt("checksum differs".into()),
        Ok((got, _)) => Outcome::Failed(format!(
            "{got} of {len} B came back{}",
            write.err().map_or(String::new(), |e| format!(" ({e})"))
        )),
    }
}

/// A request body fed through a channel, so a client can stop half-way.
struct ChanBody {
    rx: mpsc::Receiver<Bytes>,
    left: u64,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => {
                self.left = self.left.saturating_sub(b.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// Feeds `payload` into the request body (`tx`) while the request is in flight and checks
/// the answer: status 200, `x-sum` of what the upstream received, the echoed body byte for
/// byte. With `abort`, stops at the mark and returns `Aborted`; the caller then kills the
/// connection.
async fn one_request(
    response: impl std::future::Future<Output = hyper::Result<Response<Incoming>>>,
    tx: mpsc::Sender<Bytes>,
    payload: &[u8],
    chunk: usize,
    abort: Option<Abort>,
) -> Outcome {
    let len = payload.len();
    if let Some(a) = abort.filter(|a| a.at < len) {
        // hyper's connection task sends what we feed; the response is not awaited.
        for c in payload[..a.at].chunks(chunk.max(1)) {
            if tx.send(Bytes::copy_from_slice(c)).await.is_err() {
                break;
            }
        }
        tokio::time::sleep(a.linger).await;
        drop(response);
        return Outcome::Aborted;
    }
    let feed = async move {
        for c in payload.chunks(chunk.max(1)) {
            if tx.send(Bytes::copy_from_slice(c)).await.is_err() {
                break;
            }
        }
    };
    let (_, response) = tokio::join!(feed, response);
    let response = match response {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("request: {e}")),
    };
    if response.status() != 200 {
        return Outcome::Failed(format!("status {}", response.status()));
    }
    let upstream_sum = response
        .headers()
        .get("x-sum")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if upstream_sum != Fnv::of(payload).hex() {
        return Outcome::Corrupt(format!(
            "the upstream got a body with checksum {upstream_sum:?}"
        ));
    }
    let stop_after = abort.map(|a| a.at - len);
    let mut body = response.into_body();
    let (mut got, mut sum) = (0usize, Fnv::new());
    loop {
        if stop_after.is_some_and(|n| got >= n) {
            break;
        }
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return Outcome::Failed(format!("response body after {got} of {len} B: {e}")),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if payload.get(got..got + data.len()) != Some(&data[..]) {
            return Outcome::Corrupt(format!(
                "response bytes {got}..{} differ from the request's",
                got + data.len()
            ));
        }
        sum.update(&data);
        got += data.len();
    }
    if let Some(a) = abort {
        tokio::time::sleep(a.linger).await;
        return Outcome::Aborted;
    }
    if got != len {
        Outcome::Failed(format!("{got} of {len} B in the response body"))
    } else if sum != Fnv::of(payload) {
        Outcome::Corrupt("response checksum differs".into())
    } else {
        Outcome::Verified(len as u64)
    }
}

fn request_body(len: usize) -> (mpsc::Sender<Bytes>, ChanBody) {
    let (tx, rx) = mpsc::channel(4);
    (
        tx,
        ChanBody {
            rx,
            left: len as u64,
        },
    )
}

/// Up to a few requests on one HTTP/1.1 connection, one after the other.
async fn h1_requests(
    addr: SocketAddr,
    up: &Upstream,
    payloads: &[Vec<u8>],
    chunk: usize,
    abort: Option<(usize, Abort)>,
) -> Vec<(u64, Outcome)> {
    let epoch0 = up.epoch();
    let s = match dial(addr).await {
        Ok(s) => s,
        Err(e) => return vec![(epoch0, Outcome::Failed(e))],
    };
    if abort.is_some_and(|(_, a)| a.rst) {
        set_rst(&s);
    }
    let (mut send, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(s)).await {
        Ok(x) => x,
        Err(e) => return vec![(epoch0, Outcome::Failed(format!("handshake: {e}")))],
    };
    let conn = tokio::spawn(conn);
    let mut out = Vec::new();
    for (i, payload) in payloads.iter().enumerate() {
        let epoch0 = up.epoch();
        if let Err(e) = send.ready().await {
            out.push((epoch0, Outcome::Failed(format!("connection: {e}"))));
            break;
        }
        let (tx, body) = request_body(payload.len());
        let req = Request::post("/echo")
            .header(hyper::header::HOST, "soak.test")
            .body(body)
            .unwrap();
        let mark = abort.filter(|(at, _)| *at == i).map(|(_, a)| a);
        let outcome = one_request(send.send_request(req), tx, payload, chunk, mark).await;
        let done = !matches!(outcome, Outcome::Verified(_));
        out.push((epoch0, outcome));
        if done {
            break;
        }
    }
    drop(send);
    finish(conn, abort.is_some()).await;
    out
}

/// Up to a few concurrent requests on one h2c connection.
async fn h2_requests(
    addr: SocketAddr,
    up: &Arc<Upstream>,
    payloads: &[Vec<u8>],
    chunk: usize,
    abort: Option<(usize, Abort)>,
) -> Vec<(u64, Outcome)> {
    let epoch0 = up.epoch();
    let s = match dial(addr).await {
        Ok(s) => s,
        Err(e) => return vec![(epoch0, Outcome::Failed(e))],
    };
    if abort.is_some_and(|(_, a)| a.rst) {
        set_rst(&s);
    }
    let handshake = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s));
    let (send, conn) = match handshake.await {
        Ok(x) => x,
        Err(e) => return vec![(epoch0, Outcome::Failed(format!("handshake: {e}")))],
    };
    let conn = tokio::spawn(conn);
    let mut requests = JoinSet::new();
    for (i, payload) in payloads.iter().enumerate() {
        let (mut send, payload, up) = (send.clone(), payload.clone(), up.clone());
        let mark = abort.filter(|(at, _)| *at == i).map(|(_, a)| a);
        requests.spawn(async move {
            let epoch0 = up.epoch();
            if let Err(e) = send.ready().await {
                return (epoch0, Outcome::Failed(format!("connection: {e}")));
            }
            let (tx, body) = request_body(payload.len());
            let req = Request::post("http://soak.test/echo").body(body).unwrap();
            let outcome = one_request(send.send_request(req), tx, &payload, chunk, mark).await;
            (epoch0, outcome)
        });
    }
    drop(send);
    let mut out = Vec::new();
    let mut killed = false;
    while let Some(joined) = requests.join_next().await {
        let (epoch0, outcome) = joined.unwrap();
        if matches!(outcome, Outcome::Aborted) && !killed {
            killed = true;
            conn.abort();
        }
        // Once we killed the connection on purpose, its other streams die with it.
        let outcome = match outcome {
            Outcome::Failed(_) if killed => Outcome::Aborted,
            o => o,
        };
        out.push((epoch0, outcome));
    }
    finish(conn, killed || abort.is_some()).await;
    out
}

/// Ends a client connection task: killed (the socket is dropped, RST if SO_LINGER 0 was
/// set), or allowed a bounded graceful close.
async fn finish<T>(conn: JoinHandle<T>, kill: bool) {
    if !kill {
        let abort = conn.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .is_err()
        {
            abort.abort();
        }
    } else {
        conn.abort();
    }
}

/// One HTTP connection (HTTP/1.1 or h2c) with 1–4 requests.
async fn http_conn(t: &Targets, stats: &Stats, kind: Kind, rng: &mut Rng, aborts: bool) {
    let up = &t.up_http;
    let n = rng.range(1, 4) as usize;
    let payloads: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            let len = payload_len(rng, 256 * 1024);
            rng.bytes(len)
        })
        .collect();
    let abort = (aborts && rng.chance(ABORT_PERCENT)).then(|| {
        let i = rng.below(n as u64) as usize;
        (i, abort_mark(rng, payloads[i].len()))
    });
    let chunk = rng.range(1, 16 * 1024) as usize;
    stats.of(kind).connections.fetch_add(1, SeqCst);
    let epoch0 = up.epoch();
    let run = async {
        match kind {
            Kind::Http1 => h1_requests(t.http, up, &payloads, chunk, abort).await,
            _ => h2_requests(t.http, up, &payloads, chunk, abort).await,
        }
    };
    let results = match tokio::time::timeout(TRANSFER, run).await {
        Ok(results) => results,
        Err(_) => vec![(
            epoch0,
            Outcome::Failed(format!("connection not done within {TRANSFER:?}")),
        )],
    };
    if results.iter().any(|(_, o)| matches!(o, Outcome::Aborted)) {
        stats.of(kind).aborts.fetch_add(1, SeqCst);
    }
    for (epoch0, outcome) in results {
        stats.record(kind, up, epoch0, outcome);
    }
}

// ---------------------------------------------------------------------------------------
// Load and chaos

async fn worker(
    t: Arc<Targets>,
    stats: Arc<Stats>,
    kind: Kind,
    mut rng: Rng,
    until: Instant,
    aborts: bool,
) {
    for _ in 0..1_000_000 {
        if Instant::now() >= until {
            break;
        }
        match kind {
            Kind::Http1 | Kind::H2c => http_conn(&t, &stats, kind, &mut rng, aborts).await,
            _ => stream_conn(&t, &stats, kind, &mut rng, aborts).await,
        }
    }
}

/// Kills and restarts a random upstream every 0.5–2 s.
async fn chaos(t: Arc<Targets>, stats: Arc<Stats>, mut rng: Rng, until: Instant) {
    for _ in 0..100_000 {
        tokio::time::sleep(rng.ms(500, 2000)).await;
        if Instant::now() >= until {
            break;
        }
        let up = t.upstreams()[rng.below(5) as usize].clone();
        up.restart(rng.ms(50, 500), GRACE, rng.chance(50)).await;
        stats.restarts.fetch_add(1, SeqCst);
    }
}

/// Every kind of traffic from `WORKERS` tasks each until `duration` has passed; with
/// `chaos`, client aborts and upstream restarts too.
async fn traffic(
    t: Arc<Targets>,
    stats: Arc<Stats>,
    rng: &mut Rng,
    duration: Duration,
    chaos_on: bool,
) {
    let until = Instant::now() + duration;
    let mut tasks = JoinSet::new();
    for kind in KINDS {
        for _ in 0..WORKERS {
            tasks.spawn(worker(
                t.clone(),
                stats.clone(),
                kind,
                rng.fork(),
                until,
                chaos_on,
            ));
        }
    }
    if chaos_on {
        tasks.spawn(chaos(t.clone(), stats.clone(), rng.fork(), until));
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// Restarts every upstream once, which closes the proxies' idle pooled connections to
/// them, so that fd counts compare like with like.
async fn recycle(t: &Targets) {
    for up in t.upstreams() {
        up.restart(Duration::from_millis(50), Duration::ZERO, false)
            .await;
    }
}

// ---------------------------------------------------------------------------------------
// The example processes

struct Proc {
    label: &'static str,
    ex: Example,
    admin: SocketAddr,
    base_fds: usize,
    base_rss: u64,
}

impl Proc {
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.ex.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// VmRSS in KiB.
    fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.ex.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// The values of `proxystack_connection_panics_total` on `/metrics`.
    fn panics(&self) -> Result<Vec<u64>, String> {
        let (status, body) = http(self.admin, "admin", "/metrics", "")
            .ok_or_else(|| format!("{}: no answer from /metrics", self.label))?;
        if status != 200 {
            return Err(format!("{}: /metrics status {status}", self.label));
        }
        let values: Vec<u64> = body
            .lines()
            .filter(|l| l.starts_with("proxystack_connection_panics_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse().ok())
            .collect();
        if values.is_empty() {
            return Err(format!("{}: no panics counter in\n{body}", self.label));
        }
        Ok(values)
    }
}

/// Starts `name` with `args` plus `--admin`; its traffic address and the admin address.
fn start(label: &'static str, name: &str, args: &[&str]) -> Option<(Proc, SocketAddr)> {
    let args = [args, &["--admin", "127.0.0.1:0"]].concat();
    let mut ex = Example::start(name, &args)?;
    let [addr, admin] = ex.listening(2)[..] else {
        unreachable!()
    };
    let p = Proc {
        label,
        ex,
        admin,
        base_fds: 0,
        base_rss: 0,
    };
    Some((p, addr))
}

fn hbone_config(files: &mut TempFiles, ca: &proxystack::tls::demo::DemoCa, side: &str) -> String {
    let sa = if side.starts_with("[server]") {
        "server"
    } else {
        "client"
    };
    let text = format!("{}\n{side}", identity_section(ca, "default", sa, files));
    files
        .add("hbone.toml", &text)
        .to_string_lossy()
        .into_owned()
}

fn hbone_client_config(
    files: &mut TempFiles,
    ca: &proxystack::tls::demo::DemoCa,
    server: SocketAddr,
    authority: SocketAddr,
) -> String {
    let side = format!(
        "[client]\nlisten = \"127.0.0.1:0\"\npeer = \"{server}\"\nauthority = \"{authority}\"\n\
         identity = \"spiffe://cluster.local/ns/default/sa/server\"\n"
    );
    hbone_config(files, ca, &side)
}

// ---------------------------------------------------------------------------------------
// The run

fn run(duration: Duration, warmup: Duration) {
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => s.parse().ok(),
            }
        })
        .unwrap_or(0x5eed_50a4);
    let mut rng = Rng::new(seed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let [up_relay, up_http, up_connect, up_hbone, up_nested] = rt.block_on(async {
        [
            Upstream::start("relay-echo", Serve::Echo, &mut rng).await,
            Upstream::start("http", Serve::Http, &mut rng).await,
            Upstream::start("connect-echo", Serve::Echo, &mut rng).await,
            Upstream::start("hbone-echo", Serve::Echo, &mut rng).await,
            Upstream::start("nested-echo", Serve::Echo, &mut rng).await,
        ]
    });

    // The example processes, each with its admin endpoint.
    let mut files = TempFiles::default();
    let ca = proxystack::tls::demo::DemoCa::new("cluster.local");
    let relay_up = up_relay.addr.to_string();
    let http_up = up_http.addr.to_string();
    let Some((relay, relay_addr)) = start(
        "tcp_relay",
        "tcp_relay",
        &["--listen", "127.0.0.1:0", "--upstream", &relay_up],
    ) else {
        return;
    };
    let Some((http_proxy, http_addr)) = start(
        "http_proxy",
        "http_proxy",
        &["--listen", "127.0.0.1:0", "--upstream", &http_up],
    ) else {
        return;
    };
    let Some((connect_proxy, connect_addr)) = start(
        "connect_proxy",
        "connect_proxy",
        &["--listen", "127.0.0.1:0", "--allow-net", "127.0.0.1/32"],
    ) else {
        return;
    };
    let server_config = hbone_config(
        &mut files,
        &ca,
        "[server]\nlisten = \"127.0.0.1:0\"\napp_ip = \"127.0.0.1\"\n",
    );
    let Some((hbone_server, hbone_server_addr)) =
        start("hbone server", "hbone", &["--config", &server_config])
    else {
        return;
    };
    let direct = hbone_client_config(&mut files, &ca, hbone_server_addr, up_hbone.addr);
    let Some((hbone_client, hbone_addr)) = start("hbone client", "hbone", &["--config", &direct])
    else {
        return;
    };
    // The nested kind: HBONE tunnels to connect_proxy, CONNECT inside them.
    let nested = hbone_client_config(&mut files, &ca, hbone_server_addr, connect_addr);
    let Some((hbone_nested, nested_addr)) =
        start("hbone client→connect", "hbone", &["--config", &nested])
    else {
        return;
    };
    let mut procs = vec![
        relay,
        http_proxy,
        connect_proxy,
        hbone_server,
        hbone_client,
        hbone_nested,
    ];
    let targets = Arc::new(Targets {
        relay: relay_addr,
        http: http_addr,
        connect: connect_addr,
        hbone: hbone_addr,
        nested: nested_addr,
        up_relay,
        up_http,
        up_connect,
        up_hbone,
        up_nested,
    });

    // Warm-up without faults: everything must work, then the baseline.
    let warm = Arc::new(Stats::default());
    rt.block_on(traffic(
        targets.clone(),
        warm.clone(),
        &mut rng,
        warmup,
        false,
    ));
    assert_eq!(
        warm.errors(),
        0,
        "errors during the warm-up (no faults injected):\n{}",
        warm.messages.lock().unwrap().join("\n")
    );
    rt.block_on(recycle(&targets));
    std::thread::sleep(Duration::from_secs(1));
    for p in &mut procs {
        p.base_fds = p.fds();
        p.base_rss = p.rss();
    }

    // The soak.
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    rt.block_on(traffic(
        targets.clone(),
        stats.clone(),
        &mut rng,
        duration,
        true,
    ));
    let elapsed = started.elapsed();

    // Back to idle: pooled upstream connections closed, then fds and RSS settle.
    rt.block_on(recycle(&targets));
    let mut problems = Vec::new();
    let settle = Instant::now() + Duration::from_secs(20);
    while procs.iter().any(|p| p.fds() > p.base_fds + FD_MARGIN) && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(250));
    }
    let after: Vec<(usize, u64)> = procs.iter().map(|p| (p.fds(), p.rss())).collect();
    for (p, &(fds, rss)) in procs.iter().zip(&after) {
        if fds > p.base_fds + FD_MARGIN {
            problems.push(format!(
                "{}: {fds} fds open, baseline {} (+{FD_MARGIN} allowed)",
                p.label, p.base_fds
            ));
        }
        if rss > p.base_rss + RSS_MARGIN_KIB {
            problems.push(format!(
                "{}: RSS {rss} KiB, baseline {} KiB (+{RSS_MARGIN_KIB} allowed)",
                p.label, p.base_rss
            ));
        }
        match p.panics() {
            Ok(v) if v.iter().all(|&n| n == 0) => {}
            Ok(v) => problems.push(format!("{}: panics counters {v:?}", p.label)),
            Err(e) => problems.push(e),
        }
    }

    // The summary line.
    let mib = |kib: u64| kib as f64 / 1024.0;
    let per_kind = |f: fn(&KindStats) -> &AtomicU64| {
        KINDS
            .iter()
            .map(|k| format!("{}={}", k.name(), f(stats.of(*k)).load(SeqCst)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let procs_line = procs
        .iter()
        .zip(&after)
        .map(|(p, (fds, rss))| {
            format!(
                "{} fds {}→{fds} rss {:.1}→{:.1} MiB",
                p.label,
                p.base_fds,
                mib(p.base_rss),
                mib(*rss)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "soak summary: duration {:.1}s seed {seed:#x}; connections {}; verified transfers {}; \
         bytes verified {} ({:.1} MiB); aborts injected {} ({} transfers); upstream restarts {}; \
         failures explained by restarts {}; errors {}; {procs_line}",
        elapsed.as_secs_f64(),
        per_kind(|k| &k.connections),
        per_kind(|k| &k.verified),
        stats.total(|k| &k.bytes),
        mib(stats.total(|k| &k.bytes) / 1024),
        stats.total(|k| &k.aborts),
        stats.total(|k| &k.aborted_transfers),
        stats.restarts.load(SeqCst),
        stats.total(|k| &k.excused),
        stats.errors(),
    );

    // SIGTERM to all at once; each must drain and exit 0 within 15 s (`terminate`
    // panics, on its thread, past that).
    type Exit = (f64, std::process::ExitStatus, String);
    let exits: Vec<(&str, Option<Exit>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = procs
            .into_iter()
            .map(|p| {
                let label = p.label;
                let handle = scope.spawn(move || {
                    let t0 = Instant::now();
                    let (status, stderr) = p.ex.terminate();
                    (t0.elapsed().as_secs_f64(), status, stderr)
                });
                (label, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(label, h)| (label, h.join().ok()))
            .collect()
    });
    let mut exit_times = Vec::new();
    for (label, exit) in exits {
        let Some((secs, status, stderr)) = exit else {
            problems.push(format!("{label}: still running 15 s after SIGTERM"));
            continue;
        };
        exit_times.push(format!("{label} {secs:.1}s"));
        if !status.success() {
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            problems.push(format!(
                "{label}: exit {status} after SIGTERM; stderr ends with:\n{tail}"
            ));
        }
    }
    println!("soak exits after SIGTERM: {}", exit_times.join(", "));
    drop(rt);

    for kind in KINDS {
        if stats.of(kind).verified.load(SeqCst) == 0 {
            problems.push(format!("{}: no transfer completed", kind.name()));
        }
    }
    if stats.total(|k| &k.aborts) == 0 || stats.restarts.load(SeqCst) == 0 {
        problems.push("no faults were injected".into());
    }
    if stats.errors() > 0 {
        problems.push(format!(
            "{} transfers failed without an injected fault:\n{}",
            stats.errors(),
            stats.messages.lock().unwrap().join("\n")
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
