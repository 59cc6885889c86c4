//! [`CountingIo`]: a stream wrapper that counts the bytes moved each way.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::io::Io;

use crate::admission::Abort;

/// How many bytes a connection may move before its counts are published. Publishing on
/// every read would put one shared atomic add per read on every core; batching keeps the
/// per-read cost to a local addition while a long-lived connection still shows progress
/// on a dashboard (at most this much per connection is not yet visible).
const FLUSH_EVERY: u64 = 64 * 1024;

/// The byte counts of one connection, shared between its [`CountingIo`] and the layer that
/// reports them when the connection closes. Relaxed atomics: only the totals matter, and
/// they are read after the stream is gone.
pub(crate) struct Tally {
    /// Bytes read from the stream (received from the peer).
    received: AtomicU64,
    /// Bytes written to the stream (sent to the peer).
    sent: AtomicU64,
    /// Metric counters that follow the totals (listener, Istio), published in batches.
    received_sinks: Vec<Counter>,
    sent_sinks: Vec<Counter>,
    /// Counted once when the last handle goes (an upstream connection closed).
    on_close: Option<Counter>,
}

impl Tally {
    /// A tally that also adds to the given counters.
    pub(crate) fn new(received_sinks: Vec<Counter>, sent_sinks: Vec<Counter>) -> Self {
        Self {
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received_sinks,
            sent_sinks,
            on_close: None,
        }
    }

    /// A tally that also counts `on_close` when the last handle to it is dropped.
    pub(crate) fn with_close(
        received_sinks: Vec<Counter>,
        sent_sinks: Vec<Counter>,
        on_close: Counter,
    ) -> Self {
        let mut tally = Self::new(received_sinks, sent_sinks);
        tally.on_close = Some(on_close);
        tally
    }

    /// Bytes received from the peer so far (as published).
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes sent to the peer so far (as published).
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn publish(&self, received: u64, sent: u64) {
        if received > 0 {
            self.received.fetch_add(received, Ordering::Relaxed);
            for c in &self.received_sinks {
                c.inc_by(received);
            }
        }
        if sent > 0 {
            self.sent.fetch_add(sent, Ordering::Relaxed);
            for c in &self.sent_sinks {
                c.inc_by(sent);
            }
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if let Some(c) = &self.on_close {
            c.inc();
        }
    }
}

/// The connection's reset switch and the function that arms a reset on the stream.
type Reset<I> = (Abort, fn(&I));

/// A stream that counts the bytes read from and written to it.
///
/// The metrics and access-log layers hand their inner service a `Conn<CountingIo<I>>`.
/// Counts are published every 64 KiB and when the stream is dropped, so a connection's
/// totals are exact once its service has finished with it.
///
/// [`tcp::Relay`](crate::tcp::Relay) still uses `splice(2)` (or passes `Bytes` to an
/// HTTP/2 tunnel) behind it, and reports what it moved to the counts.
pub struct CountingIo<I> {
    io: I,
    tally: Arc<Tally>,
    pending_received: u64,
    pending_sent: u64,
    /// The connection's reset switch and how to reset `io`; see [`CountingIo::new`].
    reset: Option<Reset<I>>,
}

impl<I: Io> CountingIo<I> {
    /// Wraps `io`, counting into `tally`.
    ///
    /// `tcp::Relay` resets a TCP peer (`SO_LINGER 0`) when the other side failed, through
    /// [`Io::tcp_socket`], which this wrapper passes on. It also takes the connection's
    /// [`Abort`] handle (the one `Relay` signals) and, when it is dropped aborted, arms the
    /// reset on the socket underneath itself, for services that abort without a relay: a
    /// failure reaches the peer as a reset, never as a clean FIN.
    pub(crate) fn new(io: I, tally: Arc<Tally>, abort: Abort) -> Self {
        Self {
            io,
            tally,
            pending_received: 0,
            pending_sent: 0,
            reset: Some((abort, |io: &I| {
                crate::tcp::arm_reset(io);
            })),
        }
    }
}

/// The connection's [`Abort`] handle, added to its metadata if it has none yet, so that
/// `tcp::Relay` signals it.
pub(crate) fn abort_handle(metadata: &mut http::Extensions) -> Abort {
    if let Some(a) = metadata.get::<Abort>() {
        return a.clone();
    }
    let a = Abort::new();
    metadata.insert(a.clone());
    a
}

/// Every fast path of the stream underneath stays open (`splice(2)` on its socket, `Bytes`
/// to and from its HTTP/2 stream, its read-ahead): a relay that takes one reports the
/// bytes it moved to this stream's counts through [`Io::direct_count`].
impl<I: Io> Io for CountingIo<I> {
    fn tcp_socket(&self) -> Option<&tokio::net::TcpStream> {
        self.io.tcp_socket()
    }
    fn raw_tcp_socket(&self) -> Option<&tokio::net::TcpStream> {
        self.io.raw_tcp_socket()
    }
    fn take_read_ahead(&mut self) -> bytes::Bytes {
        self.io.take_read_ahead()
    }
    #[cfg(feature = "connect")]
    fn h2_stream(&mut self) -> Option<&mut crate::connect::H2Stream> {
        self.io.h2_stream()
    }
    fn direct_count(&self, count: &mut crate::io::DirectCount) {
        count.push(self.tally.clone());
        self.io.direct_count(count);
    }
}

impl crate::io::ByteCount for Tally {
    fn add(&self, received: u64, sent: u64) {
        self.publish(received, sent);
    }
}

impl<I> CountingIo<I> {
    /// The wrapped stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The wrapped stream, mutably (bytes moved through it directly are not counted).
    pub fn get_mut(&mut self) -> &mut I {
        &mut self.io
    }

    fn flush_counts(&mut self) {
        self.tally.publish(self.pending_received, self.pending_sent);
        self.pending_received = 0;
        self.pending_sent = 0;
    }

    fn add_received(&mut self, n: usize) {
        self.pending_received += n as u64;
        if self.pending_received >= FLUSH_EVERY {
            self.flush_counts();
        }
    }

    fn add_sent(&mut self, n: usize) {
        self.pending_sent += n as u64;
        if self.pending_sent >= FLUSH_EVERY {
            self.flush_counts();
        }
    }
}

impl<I> Drop for CountingIo<I> {
    fn drop(&mut self) {
        self.flush_counts();
        if let Some((abort, arm)) = &self.reset {
            if abort.is_aborted() {
                arm(&self.io);
            }
        }
    }
}

impl<I> fmt::Debug for CountingIo<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingIo")
            .field("received", &(self.tally.received() + self.pending_received))
            .field("sent", &(self.tally.sent() + self.pending_sent))
            .finish_non_exhaustive()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for CountingIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.add_received(buf.filled().len().saturating_sub(before));
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for CountingIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            // A writer claiming more than it was given is not believed.
            this.add_sent(n.min(buf.len()));
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            let offered: usize = bufs.iter().map(|b| b.len()).sum();
            this.add_sent(n.min(offered));
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_ways_and_publishes_on_drop() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (rx, tx) = (Counter::default(), Counter::default());
        let tally = Arc::new(Tally::new(vec![rx.clone()], vec![tx.clone()]));
        let mut io = CountingIo::new(a, tally.clone(), Abort::new());
        io.write_all(&[1; 100]).await.unwrap();
        // Below the batch size: not published yet.
        assert_eq!((tx.get(), tally.sent()), (0, 0));
        b.write_all(&[2; 70_000]).await.unwrap();
        let mut buf = vec![0; 70_000];
        io.read_exact(&mut buf).await.unwrap();
        // Crossing the batch size publishes everything pending.
        assert_eq!((rx.get(), tx.get()), (70_000, 100));
        io.write_all(&[1; 10]).await.unwrap();
        drop(io);
        assert_eq!((tally.received(), tally.sent()), (70_000, 110));
        assert_eq!((rx.get(), tx.get()), (70_000, 110));
    }
}
