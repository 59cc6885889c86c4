//! Byte streams: the [`Io`] trait every stream a proxy holds implements, and the two
//! wrappers every level uses — [`BoxIo`] (type erasure at a protocol boundary) and
//! [`PrefixedIo`] (replays bytes a sniffer already read).
//!
//! Each wrapper passes [`Io::tcp_socket`] on to the stream it wraps, so socket options that
//! must reach the kernel socket (`SO_LINGER` resets, `SO_ORIGINAL_DST`, `splice(2)`) work
//! through any stack of wrappers. This module does no protocol work.

use std::any::Any;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A byte stream a proxy can hold: readable, writable, sendable across tasks, and able to
/// say which TCP socket it runs on.
///
/// Socket options that must reach the kernel socket — `SO_LINGER` to turn a close into a
/// reset, `SO_ORIGINAL_DST`, `splice(2)` — work through any stack of wrappers because each
/// wrapper passes [`tcp_socket`](Io::tcp_socket) on to the stream it wraps (as linkerd's
/// io crate does), instead of a list of known wrapper types.
///
/// Implemented here for `TcpStream`, every wrapper of this crate ([`BoxIo`], [`PrefixedIo`],
/// [`Conn`](crate::Conn), TLS streams, CONNECT tunnel streams), hyper's upgraded connections and tokio's
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

    /// Adds to `count` the byte counters of this stream and of the streams it wraps, for
    /// a relay that moves bytes past them on [`raw_tcp_socket`](Io::raw_tcp_socket) or
    /// [`h2_stream`](Io::h2_stream) (see [`DirectCount`]). Wrappers that count bytes add
    /// theirs and pass the call on; the default adds nothing.
    fn direct_count(&self, count: &mut DirectCount) {
        let _ = count;
    }
}

/// The byte counters a relay reports to when it moves bytes past a stream's
/// `AsyncRead`/`AsyncWrite`: `splice(2)` on its [`raw_tcp_socket`](Io::raw_tcp_socket), or
/// `Bytes` straight to and from its [`h2_stream`](Io::h2_stream). A counting wrapper (the
/// metrics layers' streams) would otherwise see nothing of them; with its counter here it
/// counts them as if they had passed through it, and the fast paths stay open to metered
/// connections.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use proxystack::io::{ByteCount, DirectCount};
///
/// #[derive(Default)]
/// struct Received(AtomicU64);
/// impl ByteCount for Received {
///     fn add(&self, received: u64, _sent: u64) {
///         self.0.fetch_add(received, Ordering::Relaxed);
///     }
/// }
/// let counter = Arc::new(Received::default());
/// let mut count = DirectCount::default();
/// count.push(counter.clone());
/// count.add(1500, 0); // what a relay does after splicing 1500 bytes in from this peer
/// assert_eq!(counter.0.load(Ordering::Relaxed), 1500);
/// ```
#[derive(Clone, Default)]
pub struct DirectCount(Vec<std::sync::Arc<dyn ByteCount>>);

/// A counter of the bytes received from and sent to one peer (see [`DirectCount`]).
pub trait ByteCount: Send + Sync {
    /// Adds `received` bytes read from the peer and `sent` bytes written to it.
    fn add(&self, received: u64, sent: u64);
}

impl DirectCount {
    /// The counters of `io` and of the streams it wraps.
    pub fn of<I: Io + ?Sized>(io: &I) -> Self {
        let mut count = Self::default();
        io.direct_count(&mut count);
        count
    }

    /// Adds a counter.
    pub fn push(&mut self, counter: std::sync::Arc<dyn ByteCount>) {
        self.0.push(counter);
    }

    /// Whether no counter was added.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reports bytes moved directly: `received` from the peer, `sent` to it.
    pub fn add(&self, received: u64, sent: u64) {
        if received > 0 || sent > 0 {
            for counter in &self.0 {
                counter.add(received, sent);
            }
        }
    }
}

impl fmt::Debug for DirectCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectCount")
            .field("counters", &self.0.len())
            .finish()
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
        fn direct_count(&self, count: &mut $crate::io::DirectCount) {
            self.$field.direct_count(count)
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
        impl$(<$gen: $bound>)? tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_read(cx, buf)
            }
        }
        $crate::io::delegate_write!($ty, $field $(, $gen: $bound)?);
    };
}

delegate_io!(BoxIo, 0);

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
    fn direct_count(&self, count: &mut DirectCount) {
        self.io.direct_count(count)
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

pub(crate) use delegate_io;
pub(crate) use delegate_socket;
