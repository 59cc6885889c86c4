//! Connections and targets: the two values every layer passes around.
//!
//! * [`Conn<I>`] — a byte stream `I` plus connection **metadata**, an [`http::Extensions`]
//!   map holding one small struct per fact ([`PeerAddr`], [`OriginalDst`], and, from higher
//!   levels, SNI, peer identity, tunnel authority…). Inbound layers read and extend it.
//! * [`Target`] — where a connector should connect, plus metadata for the outbound layers
//!   (expected identity, SNI, PROXY TLVs, CONNECT headers).
//!
//! Layers that terminate a protocol hand their inner service a [`Conn<BoxIo>`]: one
//! allocation per connection keeps types (and build times) small without a per-byte cost.

use std::any::Any;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use http::Extensions;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::addr::{Authority, AuthorityError, Host};

/// A byte stream a proxy can hold: readable, writable, sendable across tasks, and able to
/// say which TCP socket it runs on.
///
/// Socket options that must reach the kernel socket — `SO_LINGER` to turn a close into a
/// reset, `SO_ORIGINAL_DST`, `splice(2)` — work through any stack of wrappers because each
/// wrapper passes [`tcp_socket`](Io::tcp_socket) on to the stream it wraps (as linkerd's
/// io crate does), instead of a list of known wrapper types.
///
/// Implemented here for `TcpStream`, every wrapper of this crate ([`BoxIo`], [`PrefixedIo`],
/// [`Conn`], TLS streams, CONNECT tunnel streams), hyper's upgraded connections and tokio's
/// in-memory `DuplexStream`. For a stream type of your own, one line is enough:
///
/// ```
/// # use std::{io, pin::Pin, task::{Context, Poll}};
/// # use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
/// struct MyStream(tokio::io::DuplexStream);
/// # impl AsyncRead for MyStream {
/// #     fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &mut ReadBuf<'_>) -> Poll<io::Result<()>> { Pin::new(&mut self.get_mut().0).poll_read(cx, b) }
/// # }
/// # impl AsyncWrite for MyStream {
/// #     fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> { Pin::new(&mut self.get_mut().0).poll_write(cx, b) }
/// #     fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> { Pin::new(&mut self.get_mut().0).poll_flush(cx) }
/// #     fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> { Pin::new(&mut self.get_mut().0).poll_shutdown(cx) }
/// # }
/// impl proxystack::Io for MyStream {} // not over a TCP socket: the defaults say so
/// ```
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The TCP socket at the bottom of this stream, through every wrapper, for socket
    /// options. `None` when there is none (in-memory streams, tunnels multiplexed over
    /// HTTP/2).
    fn tcp_socket(&self) -> Option<&TcpStream> {
        None
    }

    /// The TCP socket when this stream *is* that socket byte for byte (nothing buffered,
    /// nothing transformed in between), so that it may be read and written directly, e.g.
    /// with `splice(2)`. `None` for TLS, a replay buffer not yet drained, and anything that
    /// is not a plain socket.
    fn raw_tcp_socket(&self) -> Option<&TcpStream> {
        None
    }

    /// Takes the bytes this stream read from its socket ahead of its reader and still
    /// holds (a replay buffer), for a caller that passes them on itself and then moves the
    /// rest on [`raw_tcp_socket`](Io::raw_tcp_socket) directly, as the TCP relay does to
    /// `splice(2)` an HTTP/1.1 tunnel whose client sent bytes behind its `CONNECT`.
    /// Non-empty only when the stream is its socket byte for byte once they are taken;
    /// empty by default.
    fn take_read_ahead(&mut self) -> Bytes {
        Bytes::new()
    }

    /// The HTTP/2 CONNECT stream this stream is, byte for byte, through wrappers that
    /// neither buffer nor change bytes: a relay then writes h2's received `Bytes` straight
    /// to the other side and hands h2 the buffers it read, instead of copying both ways
    /// through `AsyncRead`/`AsyncWrite`. `None` by default.
    #[cfg(feature = "connect")]
    fn h2_stream(&mut self) -> Option<&mut crate::connect::H2Stream> {
        None
    }
}

impl Io for TcpStream {
    fn tcp_socket(&self) -> Option<&TcpStream> {
        Some(self)
    }
    fn raw_tcp_socket(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Io for tokio::io::DuplexStream {}

/// A connection hyper switched to another protocol (`101`, HTTP/1.1 `CONNECT`). Its bytes
/// may still sit in hyper's read buffer, so it does not claim the socket under it.
#[cfg(any(feature = "http", feature = "connect"))]
impl Io for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {}

/// Passes both socket lookups to the wrapped stream: for wrappers that neither buffer nor
/// transform bytes.
macro_rules! delegate_socket {
    ($field:tt) => {
        fn tcp_socket(&self) -> Option<&tokio::net::TcpStream> {
            self.$field.tcp_socket()
        }
        fn raw_tcp_socket(&self) -> Option<&tokio::net::TcpStream> {
            self.$field.raw_tcp_socket()
        }
        fn take_read_ahead(&mut self) -> bytes::Bytes {
            self.$field.take_read_ahead()
        }
        #[cfg(feature = "connect")]
        fn h2_stream(&mut self) -> Option<&mut crate::connect::H2Stream> {
            self.$field.h2_stream()
        }
    };
}

/// A boxed [`Io`]: what a terminating layer hands to the level above it.
pub struct BoxIo(Box<dyn Io>);

impl Io for BoxIo {
    delegate_socket!(0);
}

impl BoxIo {
    /// Boxes `io`; a `BoxIo` is not boxed twice.
    pub fn new<I: Io>(io: I) -> Self {
        let mut slot = Some(io);
        if let Some(boxed) = (&mut slot as &mut dyn Any).downcast_mut::<Option<BoxIo>>() {
            if let Some(boxed) = boxed.take() {
                return boxed;
            }
        }
        match slot {
            Some(io) => BoxIo(Box::new(io)),
            None => unreachable_empty_slot(),
        }
    }
}

#[cold]
fn unreachable_empty_slot() -> BoxIo {
    // Only reachable if the downcast above took the value without returning it; a closed
    // in-memory pipe is a harmless stand-in.
    BoxIo(Box::new(tokio::io::duplex(1).0))
}

impl fmt::Debug for BoxIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxIo")
    }
}

/// Implements `AsyncWrite` for a wrapper by passing every call to one field: wrappers
/// that only change how bytes are *read* (replay, inspection) write straight through.
macro_rules! delegate_write {
    ($ty:ty, $field:tt $(, $gen:ident : $bound:path)?) => {
        impl$(<$gen: $bound>)? tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
            }
            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
            }
        }
    };
}
#[cfg_attr(not(feature = "http"), allow(unused_imports))]
pub(crate) use delegate_write;

macro_rules! delegate_io {
    ($ty:ty, $field:tt $(, $gen:ident : $bound:path)?) => {
        impl$(<$gen: $bound>)? AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().$field).poll_read(cx, buf)
            }
        }
        delegate_write!($ty, $field $(, $gen: $bound)?);
    };
}

delegate_io!(BoxIo, 0);
delegate_io!(Conn<I>, io, I: AsyncReadWriteUnpin);

impl<I: Io> Io for Conn<I> {
    delegate_socket!(io);
}

/// `AsyncRead + AsyncWrite + Unpin`, as one bound for the delegation macros.
pub(crate) trait AsyncReadWriteUnpin: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> AsyncReadWriteUnpin for T {}

/// `AsyncWrite + Unpin`, as one bound for the delegation macros.
pub(crate) trait AsyncWriteUnpin: AsyncWrite + Unpin {}
impl<T: AsyncWrite + Unpin> AsyncWriteUnpin for T {}

/// A stream that first replays bytes already read from it (by a peek or detection layer),
/// then continues with the stream itself. Writes go straight through.
#[derive(Debug)]
pub struct PrefixedIo<I> {
    prefix: Bytes,
    io: I,
}

impl<I> PrefixedIo<I> {
    /// Replays `prefix` before reading from `io`.
    pub fn new(prefix: impl Into<Bytes>, io: I) -> Self {
        Self {
            prefix: prefix.into(),
            io,
        }
    }

    /// The bytes not yet replayed.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The unreplayed prefix and the underlying stream.
    pub fn into_parts(self) -> (Bytes, I) {
        (self.prefix, self.io)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefixedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

delegate_write!(PrefixedIo<I>, io, I: AsyncWriteUnpin);

impl<I: Io> Io for PrefixedIo<I> {
    fn tcp_socket(&self) -> Option<&TcpStream> {
        self.io.tcp_socket()
    }
    /// Only once every replayed byte has been read: until then the socket is behind.
    fn raw_tcp_socket(&self) -> Option<&TcpStream> {
        if self.prefix.is_empty() {
            self.io.raw_tcp_socket()
        } else {
            None
        }
    }
    /// Only once every replayed byte has been read.
    #[cfg(feature = "connect")]
    fn h2_stream(&mut self) -> Option<&mut crate::connect::H2Stream> {
        if self.prefix.is_empty() {
            self.io.h2_stream()
        } else {
            None
        }
    }
    /// The bytes not yet replayed, when the stream under them is a plain socket.
    fn take_read_ahead(&mut self) -> Bytes {
        if self.io.raw_tcp_socket().is_none() {
            return Bytes::new();
        }
        let mut ahead = std::mem::take(&mut self.prefix);
        let below = self.io.take_read_ahead();
        if !below.is_empty() {
            // Replayed in order: ours first, then what the stream under us held.
            let mut both = bytes::BytesMut::with_capacity(ahead.len() + below.len());
            both.extend_from_slice(&ahead);
            both.extend_from_slice(&below);
            ahead = both.freeze();
        }
        ahead
    }
}

/// Reads until the bytes either are the HTTP/2 preface or cannot be; returns the stream with
/// those bytes put back and whether it speaks HTTP/2. `None`: closed before sending a byte.
/// Bounded by `limit` (the server's request-head timeout, `TimedOut` past it), so a client
/// that sends nothing, or stops inside the preface, cannot hold a connection forever.
#[cfg(any(feature = "http", feature = "connect"))]
pub(crate) async fn sniff_h2_preface<I: Io>(
    io: I,
    limit: std::time::Duration,
) -> io::Result<Option<(PrefixedIo<I>, bool)>> {
    use crate::sniff::{sniff, Outcome, SniffLimits, Step, Stop, H2_PREFACE};

    /// Decides at the first byte that leaves the preface, or at its last byte.
    struct Preface;
    impl crate::sniff::Sniffer for Preface {
        type Output = bool;
        type Error = std::convert::Infallible;
        fn push(&mut self, seen: &[u8]) -> Step<bool, Self::Error> {
            if seen.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(seen) {
                Step::Match(seen.starts_with(H2_PREFACE))
            } else {
                Step::NeedMore
            }
        }
        fn finish(&mut self, seen: &[u8], stop: Stop) -> Outcome<bool, Self::Error> {
            match stop {
                Stop::Eof if !seen.is_empty() => Outcome::Match(false),
                _ => Outcome::Undecided(stop),
            }
        }
    }

    let limits = SniffLimits::new(H2_PREFACE.len(), Some(limit));
    match sniff(io, &mut Preface, limits).await? {
        (Outcome::Match(is_h2), io) => Ok(Some((io, is_h2))),
        (Outcome::Reject(never), _) => match never {},
        (Outcome::Undecided(Stop::Eof), _) => Ok(None),
        (Outcome::Undecided(_), _) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no request on the connection in time",
        )),
    }
}

/// Connection metadata: one value per type ([`PeerAddr`], `Sni`, `PeerIdentity`…). Routing
/// closures (`Relay::upstream`, `Steer`) receive it, so they read like
/// `|m: &Metadata| m.get::<OriginalDst>()`.
pub type Metadata = Extensions;

/// A byte stream plus its connection metadata.
///
/// ```
/// use proxystack::{Conn, conn::PeerAddr};
/// let mut conn = Conn::new(tokio::io::empty());
/// conn.insert(PeerAddr(([127, 0, 0, 1], 4000).into()));
/// assert_eq!(conn.get::<PeerAddr>().map(|p| p.0.port()), Some(4000));
/// ```
pub struct Conn<I> {
    io: I,
    metadata: Extensions,
}

impl<I> Conn<I> {
    /// A connection with no metadata yet.
    pub fn new(io: I) -> Self {
        Self::from_parts(io, Extensions::new())
    }

    /// A connection with the given metadata.
    pub fn from_parts(io: I, metadata: Extensions) -> Self {
        Self { io, metadata }
    }

    /// One metadata fact, by type.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.metadata.get::<T>()
    }

    /// Records a metadata fact, returning the previous value of that type.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) -> Option<T> {
        self.metadata.insert(value)
    }

    /// All metadata.
    pub fn metadata(&self) -> &Extensions {
        &self.metadata
    }

    /// All metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut Extensions {
        &mut self.metadata
    }

    /// The stream.
    pub fn io(&self) -> &I {
        &self.io
    }

    /// The stream, mutably.
    pub fn io_mut(&mut self) -> &mut I {
        &mut self.io
    }

    /// Splits into stream and metadata.
    pub fn into_parts(self) -> (I, Extensions) {
        (self.io, self.metadata)
    }

    /// Replaces the stream (e.g. with its TLS session), keeping the metadata.
    pub fn map_io<J>(self, f: impl FnOnce(I) -> J) -> Conn<J> {
        Conn::from_parts(f(self.io), self.metadata)
    }

    /// Boxes the stream; see [`BoxIo`].
    pub fn boxed(self) -> Conn<BoxIo>
    where
        I: Io,
    {
        self.map_io(BoxIo::new)
    }
}

impl<I> fmt::Debug for Conn<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.get::<PeerAddr>())
            .field("local", &self.get::<LocalAddr>())
            .finish_non_exhaustive()
    }
}

/// Where a connector should connect, plus metadata for outbound layers.
///
/// ```
/// use proxystack::Target;
/// let t: Target = "backend.internal:8080".parse().unwrap();
/// assert_eq!(t.authority().port(), 8080);
/// ```
#[derive(Clone)]
pub struct Target {
    authority: Authority,
    metadata: Extensions,
}

impl Target {
    /// A target with no metadata.
    pub fn new(authority: Authority) -> Self {
        Self {
            authority,
            metadata: Extensions::new(),
        }
    }

    /// Parses `host:port` (see [`Authority::parse`]).
    pub fn parse(s: &str) -> Result<Self, AuthorityError> {
        Authority::parse(s).map(Self::new)
    }

    /// Parses a `host:port` literal written in the program.
    ///
    /// # Panics
    /// If `s` is not a valid `host:port`; use [`Target::parse`] for input from elsewhere.
    #[allow(clippy::panic)]
    pub fn from_static(s: &'static str) -> Self {
        match Self::parse(s) {
            Ok(t) => t,
            Err(e) => panic!("invalid target literal {s:?}: {e}"),
        }
    }

    /// Where to connect.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The socket address, when the target is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.authority.socket_addr()
    }

    /// Same target, another port.
    pub fn with_port(mut self, port: u16) -> Self {
        self.authority = self.authority.with_port(port);
        self
    }

    /// One metadata fact, by type.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.metadata.get::<T>()
    }

    /// Records a metadata fact.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) -> Option<T> {
        self.metadata.insert(value)
    }

    /// Builder form of [`Target::insert`].
    pub fn with<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.metadata.insert(value);
        self
    }

    /// All metadata.
    pub fn metadata(&self) -> &Extensions {
        &self.metadata
    }

    /// All metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut Extensions {
        &mut self.metadata
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Target")
            .field(&self.authority.to_string())
            .finish()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.authority.fmt(f)
    }
}

impl std::str::FromStr for Target {
    type Err = AuthorityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Self::new(addr.into())
    }
}

impl<I: Into<std::net::IpAddr>> From<(I, u16)> for Target {
    fn from((ip, port): (I, u16)) -> Self {
        Self::new(Authority::new(Host::Ip(ip.into()), port))
    }
}

impl From<Authority> for Target {
    fn from(authority: Authority) -> Self {
        Self::new(authority)
    }
}

/// Metadata: the local address the connection was accepted on (or connected from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);

/// Metadata: the remote address of the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Metadata: where the client meant to connect before a `REDIRECT`/`TPROXY` rule sent it
/// here (`SO_ORIGINAL_DST`); see `tcp::OriginalDstLayer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalDst(pub SocketAddr);

impl From<OriginalDst> for Target {
    fn from(dst: OriginalDst) -> Self {
        dst.0.into()
    }
}

impl From<&OriginalDst> for Target {
    fn from(dst: &OriginalDst) -> Self {
        dst.0.into()
    }
}

/// Metadata: a process-unique number for the accepted connection, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    /// The next unused id.
    pub fn next() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Metadata: when the connection was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptedAt(pub Instant);

/// Why an inner service refused a connection handed to it through a tunnel, so the tunnel
/// terminator can answer with the right status (see [`Admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Policy denied the connection (HTTP 401/403).
    Denied,
    /// The upstream refused or reset the connection (HTTP 503).
    Refused,
    /// The upstream could not be reached: no route, DNS failure (HTTP 502).
    Unreachable,
    /// Connecting to the upstream timed out (HTTP 504).
    TimedOut,
    /// The upstream is one of this proxy's own listeners (its tunnel ports, its admin
    /// endpoint): a tunnel to it would loop back into the proxy — ztunnel's "recursive
    /// call to ourselves" (HTTP 503). See `tcp::OwnListeners`.
    Loop,
}

/// An error that carries the [`Refusal`] a tunnel terminator should answer with; put it
/// in an error's `source()` chain so that layers above can map it to a status code.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("upstream refused: {0:?}")]
pub struct UpstreamRefusal(pub Refusal);

/// The [`Refusal`] for an upstream failure: the first [`UpstreamRefusal`] or TCP connect
/// error in the `source()` chain, else [`Refusal::Unreachable`] (a 502-class answer).
pub fn refusal_for(e: &(dyn std::error::Error + 'static)) -> Refusal {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<UpstreamRefusal>() {
            return r.0;
        }
        #[cfg(feature = "tcp")]
        if let Some(c) = err.downcast_ref::<crate::tcp::ConnectError>() {
            return c.refusal();
        }
        cur = err.source();
    }
    Refusal::Unreachable
}

/// Metadata: the "may I say 200?" handle of a tunnel.
///
/// A CONNECT terminator must answer `200` only once the connection has really been
/// accepted. It puts an `Admission` into the tunnel's metadata and waits. A service that
/// dials an upstream (like `tcp::Relay`) calls [`Admission::admit`] once connected, or
/// [`Admission::refuse`] with the reason. Services that do not know about admission need do
/// nothing: the tunnel's stream admits itself on its first read or write, so any layer
/// that starts speaking implicitly accepts.
#[derive(Clone)]
pub struct Admission(Arc<Mutex<Option<AdmissionSender>>>);

type AdmissionSender = oneshot::Sender<Result<(), Refusal>>;

impl Admission {
    /// A new admission handle and the receiver the terminator waits on. The receiver sees
    /// a closed channel if every handle is dropped without a decision.
    pub fn new() -> (Self, oneshot::Receiver<Result<(), Refusal>>) {
        let (tx, rx) = oneshot::channel();
        (Self(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Accepts the connection. Only the first decision counts.
    pub fn admit(&self) {
        self.decide(Ok(()));
    }

    /// Refuses the connection. Only the first decision counts.
    pub fn refuse(&self, why: Refusal) {
        self.decide(Err(why));
    }

    /// Whether a decision has been made.
    pub fn is_decided(&self) -> bool {
        self.0.lock().map(|s| s.is_none()).unwrap_or(true)
    }

    fn decide(&self, decision: Result<(), Refusal>) {
        let sender = match self.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(tx) = sender {
            let _ = tx.send(decision);
        }
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("decided", &self.is_decided())
            .finish()
    }
}

/// Metadata: the "end with a reset, not a clean close" switch of a stream that is not a
/// TCP socket.
///
/// A clean close (TCP FIN, HTTP/2 `END_STREAM`) tells the peer that all data arrived; after
/// the other side of a relay failed, that would be a lie. A TCP socket is made to reset with
/// `SO_LINGER 0`; a stream that is not a socket — an HTTP/2 CONNECT tunnel — shares an
/// `Abort` with its connection's metadata instead. [`tcp::Relay`](crate::tcp::Relay) calls
/// [`Abort::abort`] on the healthy side's handle when the other side failed, and the stream
/// then ends with a reset when it is dropped (HTTP/2: `RST_STREAM(CONNECT_ERROR)`, RFC 9113
/// §8.5) or at its next read or write.
///
/// ```
/// use proxystack::conn::Abort;
/// let abort = Abort::new();
/// let seen_by_stream = abort.clone();
/// abort.abort();
/// assert!(seen_by_stream.is_aborted());
/// ```
#[derive(Clone, Default)]
pub struct Abort(Arc<AtomicBool>);

impl Abort {
    /// A handle that is not aborted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the stream to end with a reset. Idempotent; cannot be undone.
    pub fn abort(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`Abort::abort`] was called on this handle or a clone of it.
    pub fn is_aborted(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Abort").field(&self.is_aborted()).finish()
    }
}

/// A type-erased inbound service over boxed connections: what routers, fallbacks and
/// recursive graphs store. Cheap to clone, `Send + Sync`.
pub type BoxInbound = tower::util::BoxCloneSyncService<Conn<BoxIo>, (), crate::BoxError>;

/// The bound on every inbound service that a router, a fallback, a terminator or a
/// recursive graph stores, named once: a cloneable, `Send + Sync`
/// `Service<Conn<BoxIo>, Response = ()>` whose error converts into a
/// [`BoxError`](crate::BoxError) and whose future is `Send`. Implemented for every such
/// service; [`boxed`](Self::boxed) erases it into a [`BoxInbound`].
pub trait BoxableInbound: Clone + Send + Sync + 'static {
    /// The service, type-erased.
    fn boxed(self) -> BoxInbound;
}

impl<S> BoxableInbound for S
where
    S: tower::Service<Conn<BoxIo>, Response = ()> + Clone + Send + Sync + 'static,
    S::Error: Into<crate::BoxError>,
    S::Future: Send + 'static,
{
    fn boxed(self) -> BoxInbound {
        use tower::ServiceExt;
        BoxInbound::new(self.map_err(Into::into))
    }
}

/// Erases an inbound service's type (and its error type) into a [`BoxInbound`].
pub fn box_inbound<S: BoxableInbound>(service: S) -> BoxInbound {
    service.boxed()
}
