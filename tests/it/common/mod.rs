//! Helpers shared by the integration tests: real loopback servers, no mocks.
#![allow(dead_code)]

#[cfg(target_os = "linux")]
pub mod netns;

use std::net::SocketAddr;
use std::time::Duration;

use proxystack::{drain, Conn, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower::Service;

pub type BoxError = proxystack::BoxError;

/// An echo server on 127.0.0.1: writes back what it reads, then FIN. The one echo server
/// of the tests: see [`counting_echo_server`] for its counters.
pub async fn echo_server() -> SocketAddr {
    counting_echo_server().await.0
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
    start_at(SocketAddr::from(([127, 0, 0, 1], 0)), server, svc).await
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

/// Descriptors the splice relay may keep per runtime thread after its connections closed:
/// up to 4 empty pipes, pooled for the next connection (`src/tcp/splice.rs`).
pub const SPLICE_POOL_FDS_PER_THREAD: usize = 8;

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The raw HTTP/2 frame and HPACK writer, shared with the fuzz targets (one writer for both).
#[path = "../../../fuzz/src/wire.rs"]
pub mod wire;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = wire::PREFACE;

// Not every test area uses every piece.
#[allow(unused_imports)]
pub use wire::{hpack_int, hpack_literal, read_frame as read_h2_frame, Frame as RawFrame};

/// One raw HTTP/2 frame (RFC 9113 §4.1), as bytes.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    wire::frame(&mut f, kind, flags, stream, payload);
    f
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
pub fn capture(tx: tokio::sync::mpsc::UnboundedSender<proxystack::Metadata>) -> Capture {
    Capture(tx)
}

/// The service [`capture`] returns.
#[derive(Clone)]
pub struct Capture(tokio::sync::mpsc::UnboundedSender<proxystack::Metadata>);

impl Service<Conn<proxystack::BoxIo>> for Capture {
    type Response = ();
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<proxystack::BoxIo>) -> Self::Future {
        let tx = self.0.clone();
        Box::pin(async move {
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
        })
    }
}

/// Serves `svc` on `addr` (port 0 for an ephemeral one), like [`start`].
pub async fn start_at<S>(addr: SocketAddr, server: Server, svc: S) -> Running
where
    S: Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind(addr).await.unwrap();
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

/// Connections seen by a [`counting_echo_server`].
#[derive(Debug, Default)]
pub struct EchoCount {
    /// Open now.
    pub live: std::sync::atomic::AtomicUsize,
    /// Accepted in all.
    pub accepted: std::sync::atomic::AtomicUsize,
}

/// The echo server, with counters of its open and accepted connections, so a test can tell
/// how many upstream connections a proxy holds. Its listen backlog is 4096, not tokio's
/// 128: past the backlog the kernel drops completed handshakes without telling the client,
/// and an idle one would wait forever. Its accept loop survives errors (EMFILE), for tests
/// that run the process out of descriptors and need the upstream there afterwards.
pub async fn counting_echo_server() -> (SocketAddr, std::sync::Arc<EchoCount>) {
    use std::sync::atomic::Ordering;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(EchoCount::default());
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let mut s = match listener.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            c.accepted.fetch_add(1, Ordering::SeqCst);
            c.live.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
                drop(s);
                c.live.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, count)
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- HPACK by hand (RFC 7541), for header blocks no well-behaved client would send ----

/// A header block of literal fields (no indexing, no Huffman), pseudo-fields included.
pub fn hpack_literals(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        hpack_literal(&mut out, name.as_bytes(), value.as_bytes());
    }
    out
}

// ---- a raw HTTP/2 client that sends exactly the frames a test writes ----

/// HTTP/2 frame types and flags (RFC 9113 §6).
#[allow(unused_imports)]
pub mod h2f {
    pub use super::wire::error_code::*;
    pub use super::wire::{
        ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PADDED, PING, PRIORITY,
        RST_STREAM, SETTINGS, WINDOW_UPDATE,
    };
}

/// What a [`RawH2`] client has seen from the server so far.
#[derive(Debug, Default)]
pub struct H2Seen {
    /// `:status` of each stream's response.
    pub status: std::collections::HashMap<u32, u16>,
    /// DATA payloads per stream.
    pub data: std::collections::HashMap<u32, Vec<u8>>,
    /// Streams the server ended (END_STREAM).
    pub ended: std::collections::HashSet<u32>,
    /// HEADERS after the response head (trailers), per stream.
    pub trailers: std::collections::HashMap<u32, usize>,
    /// RST_STREAM error code per stream.
    pub resets: std::collections::HashMap<u32, u32>,
    /// GOAWAY: (last stream id, error code).
    pub goaway: Option<(u32, u32)>,
    /// The server's SETTINGS.
    pub settings: Vec<(u16, u32)>,
    /// PING ACKs received (answers to our PINGs).
    pub pongs: usize,
    /// SETTINGS ACKs received.
    pub settings_acks: usize,
    /// The connection ended (EOF or error).
    pub closed: bool,
}

/// A hand-driven HTTP/2 client connection: writes whatever bytes a test builds, and reads
/// the server's frames into [`H2Seen`], answering SETTINGS and PINGs like a live client
/// and returning flow-control window as it reads (each switchable).
pub struct RawH2<I> {
    pub io: I,
    pub seen: H2Seen,
    /// Answer the server's PINGs.
    pub auto_pong: bool,
    /// Send WINDOW_UPDATEs for DATA received.
    pub auto_window: bool,
    /// The server's HPACK dynamic table, as far as `:status` values go (newest first).
    table: Vec<u16>,
    rbuf: bytes::BytesMut,
}

impl<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> RawH2<I> {
    /// Sends the client preface and a SETTINGS frame with `settings`.
    pub async fn handshake(mut io: I, settings: &[(u16, u32)]) -> Self {
        let mut payload = Vec::new();
        for (id, v) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&v.to_be_bytes());
        }
        let mut hello = H2_PREFACE.to_vec();
        hello.extend(h2_frame(h2f::SETTINGS, 0, 0, &payload));
        io.write_all(&hello).await.unwrap();
        Self {
            io,
            seen: H2Seen::default(),
            auto_pong: true,
            auto_window: true,
            table: Vec::new(),
            rbuf: bytes::BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Writes raw bytes; an error means the server closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await
    }

    /// Reads frames until `done` holds, the connection ends, or `wait` passes; returns
    /// whether `done` holds. Frames are parsed out of an internal buffer, so a `wait` that
    /// expires mid-frame loses nothing.
    pub async fn pump_until(&mut self, wait: Duration, done: impl Fn(&H2Seen) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(f) = self.take_frame() {
                self.on_frame(f).await;
            }
            if done(&self.seen) || self.seen.closed {
                break;
            }
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf)).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => self.seen.closed = true,
                Ok(Ok(_)) => {}
            }
        }
        done(&self.seen)
    }

    /// Reads frames for `wait` (or until the connection ends).
    pub async fn pump_for(&mut self, wait: Duration) {
        self.pump_until(wait, |_| false).await;
    }

    /// One complete frame from the read buffer.
    fn take_frame(&mut self) -> Option<RawFrame> {
        let head = self.rbuf.get(..9)?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        if self.rbuf.len() < 9 + len {
            return None;
        }
        let f = self.rbuf.split_to(9 + len);
        Some(RawFrame {
            kind: f[3],
            flags: f[4],
            stream: u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff,
            payload: f[9..].to_vec(),
        })
    }

    async fn on_frame(&mut self, f: RawFrame) {
        let s = &mut self.seen;
        match f.kind {
            h2f::HEADERS => {
                match s.status.entry(f.stream) {
                    std::collections::hash_map::Entry::Occupied(_) => {
                        *s.trailers.entry(f.stream).or_default() += 1;
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        if let Some(status) = decode_status(&f.payload, &mut self.table) {
                            slot.insert(status);
                        }
                    }
                }
                if f.flags & h2f::END_STREAM != 0 {
                    s.ended.insert(f.stream);
                }
            }
            h2f::DATA => {
                let mut body = &f.payload[..];
                if f.flags & h2f::PADDED != 0 && !body.is_empty() {
                    let pad = body[0] as usize;
                    body = &body[1..body.len().saturating_sub(pad).max(1)];
                }
                s.data.entry(f.stream).or_default().extend_from_slice(body);
                if f.flags & h2f::END_STREAM != 0 {
                    s.ended.insert(f.stream);
                }
                if self.auto_window && !f.payload.is_empty() {
                    let inc = (f.payload.len() as u32).to_be_bytes();
                    let mut out = h2_frame(h2f::WINDOW_UPDATE, 0, 0, &inc);
                    out.extend(h2_frame(h2f::WINDOW_UPDATE, 0, f.stream, &inc));
                    let _ = self.io.write_all(&out).await;
                }
            }
            h2f::RST_STREAM if f.payload.len() == 4 => {
                let code = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
                s.resets.insert(f.stream, code);
            }
            h2f::SETTINGS if f.flags & h2f::ACK != 0 => s.settings_acks += 1,
            h2f::SETTINGS => {
                s.settings.extend(h2_settings(&f.payload));
                let _ = self
                    .io
                    .write_all(&h2_frame(h2f::SETTINGS, h2f::ACK, 0, &[]))
                    .await;
            }
            h2f::PING if f.flags & h2f::ACK != 0 => s.pongs += 1,
            h2f::PING if self.auto_pong => {
                let _ = self
                    .io
                    .write_all(&h2_frame(h2f::PING, h2f::ACK, 0, &f.payload))
                    .await;
            }
            h2f::GOAWAY if f.payload.len() >= 8 => {
                let last = u32::from_be_bytes(f.payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                let code = u32::from_be_bytes(f.payload[4..8].try_into().unwrap());
                s.goaway = Some((last, code));
            }
            _ => {}
        }
    }
}

/// The `:status` at the start of a response header block (the first field a server
/// writes), enough HPACK for statuses: static and dynamic indexes, literals, and the
/// Huffman codes of the ten digits (RFC 7541 Appendix B). `table` is the connection's
/// dynamic table of statuses, newest first.
pub fn decode_status(block: &[u8], table: &mut Vec<u16>) -> Option<u16> {
    let mut i = 0;
    // Dynamic table size updates (`001xxxxx`, a 5-bit-prefix integer) may come first.
    while *block.get(i)? & 0xe0 == 0x20 {
        let long = *block.get(i)? & 0x1f == 0x1f;
        i += 1;
        if long {
            while *block.get(i)? & 0x80 != 0 {
                i += 1;
            }
            i += 1;
        }
    }
    let first = *block.get(i)?;
    if first & 0x80 != 0 {
        let idx = usize::from(first & 0x7f);
        return match idx {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            n if n >= 62 => table.get(n - 62).copied(),
            _ => None,
        };
    }
    // A literal whose name is static index 8 (`:status`), with incremental indexing (0x48)
    // or without (0x08 / never 0x18).
    let indexed = match first {
        0x48 => true,
        0x08 | 0x18 => false,
        _ => return None,
    };
    let len_byte = *block.get(i + 1)?;
    let len = usize::from(len_byte & 0x7f);
    let raw = block.get(i + 2..i + 2 + len)?;
    let text = if len_byte & 0x80 != 0 {
        huffman_digits(raw)?
    } else {
        String::from_utf8(raw.to_vec()).ok()?
    };
    let status: u16 = text.parse().ok()?;
    if indexed {
        table.insert(0, status);
    }
    Some(status)
}

/// Decodes a Huffman string made of the digits 0-9 only (5-bit codes for 0-2, 6-bit codes
/// 0b011001.. for 3-9).
fn huffman_digits(raw: &[u8]) -> Option<String> {
    let bits: Vec<u8> = raw
        .iter()
        .flat_map(|b| (0..8).rev().map(move |k| (b >> k) & 1))
        .collect();
    let take = |at: usize, n: usize| -> Option<u8> {
        let slice = bits.get(at..at + n)?;
        Some(slice.iter().fold(0u8, |acc, b| (acc << 1) | b))
    };
    let mut out = String::new();
    let mut at = 0;
    while bits.len() - at >= 5 {
        // Padding: the remaining bits are all ones (EOS prefix).
        if bits[at..].iter().all(|&b| b == 1) {
            break;
        }
        let five = take(at, 5)?;
        if five <= 2 {
            out.push((b'0' + five) as char);
            at += 5;
            continue;
        }
        let six = take(at, 6)?;
        if (25..=31).contains(&six) {
            out.push((b'0' + six - 22) as char);
            at += 6;
        } else {
            return None;
        }
    }
    Some(out)
}

/// The resident set size of this process, in KiB (`VmRSS` in `/proc/self/status`).
pub fn vm_rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples [`vm_rss_kib`] on its own thread (so a busy runtime cannot hide a peak) until
/// dropped or [`RssWatch::peak_growth_mib`] is read.
pub struct RssWatch {
    baseline: usize,
    peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RssWatch {
    pub fn start() -> Self {
        use std::sync::atomic::Ordering;
        let baseline = vm_rss_kib();
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(baseline));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            // Bounded: stops when told, and after 5 minutes whatever happens.
            for _ in 0..60_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                p.fetch_max(vm_rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            baseline,
            peak,
            stop,
        }
    }

    /// Highest RSS seen minus the RSS at start, in MiB.
    pub fn peak_growth_mib(&self) -> usize {
        use std::sync::atomic::Ordering;
        let peak = self.peak.load(Ordering::Relaxed).max(vm_rss_kib());
        peak.saturating_sub(self.baseline) / 1024
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A listener with a layer in front of [`capture`]: what reached the inner service, and
/// the errors the layer returned (as `Debug` text), for bad-input tests.
pub struct Harness {
    pub proxy: Running,
    seen: tokio::sync::mpsc::UnboundedReceiver<proxystack::Metadata>,
    errors: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Harness {
    /// Serves `layer` around [`capture`] on an ephemeral port. Clients a test leaves open must not
    /// hold up shutdown for the default 30 s, so the drain deadline is 1 s.
    pub async fn start<L, S>(layer: L) -> Self
    where
        L: tower::Layer<Capture, Service = S>,
        S: Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
        S::Error: std::fmt::Debug + Into<BoxError>,
        S::Future: Send + 'static,
    {
        init_tracing();
        let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
        let (etx, errors) = tokio::sync::mpsc::unbounded_channel();
        let svc = tower::ServiceBuilder::new()
            .map_err(move |e: S::Error| {
                let _ = etx.send(format!("{e:?}"));
                e
            })
            .service(layer.layer(capture(tx)));
        Harness {
            proxy: start(Server::new().drain_timeout(Duration::from_secs(1)), svc).await,
            seen,
            errors,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.addr
    }

    /// The metadata of the next connection that reached the inner service.
    pub async fn next_seen(&mut self) -> proxystack::Metadata {
        tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
            .await
            .expect("a connection reached the inner service")
            .unwrap()
    }

    /// The next error the layer returned.
    pub async fn next_error(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.errors.recv())
            .await
            .expect("the layer reported an error")
            .unwrap()
    }

    pub fn assert_nothing_reached_inner(&mut self) {
        assert!(
            self.seen.try_recv().is_err(),
            "a refused connection reached the inner service"
        );
    }
}

#[cfg(feature = "proxy-protocol")]
impl Harness {
    /// Sends `header` + `payload`, expects `payload` echoed; the metadata recorded and the
    /// client's own address.
    pub async fn accepted(
        &mut self,
        header: &[u8],
        payload: &[u8],
    ) -> (proxystack::Metadata, SocketAddr) {
        let mut s = TcpStream::connect(self.proxy.addr).await.unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(&[header, payload].concat()).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, payload);
        (self.next_seen().await, me)
    }

    /// A well-formed v2 connection from 127.0.0.1 still works and is recorded right.
    pub async fn assert_good_connection_works(&mut self) {
        use proxystack::proxy_protocol::{ProxiedAddrs, ProxyHeader};
        let src: SocketAddr = "198.51.100.20:40000".parse().unwrap();
        let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let header = ProxyHeader::v2_proxy(src, dst).encode().unwrap();
        let (meta, _) = self.accepted(&header, b"good").await;
        let expected = ProxiedAddrs {
            source: src,
            destination: dst,
        };
        assert_eq!(meta.get::<ProxiedAddrs>(), Some(&expected));
    }
}
