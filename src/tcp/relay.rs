//! Bidirectional byte copy between a downstream and an upstream stream.
//!
//! Rules (RFC 9293 §3.6 half-close; the reset behaviour ztunnel users ask for in #1483):
//!
//! * EOF from one side → flush and `shutdown()` the other side's write half; the other
//!   direction keeps flowing until it, too, ends.
//! * A read or write error on one side → the other side is **reset** (`SO_LINGER 0`, so
//!   dropping it sends RST, not FIN) when it is a TCP socket; an abort never looks like a
//!   clean end to the other peer. Streams that are not sockets (HTTP/2 tunnels) are reset
//!   by [`Relay`](super::Relay) through the [`Abort`](crate::admission::Abort) handle in their
//!   connection's metadata.
//! * Buffers are bounded: each direction reads up to a small size and grows it (×16, up to
//!   [`RelayConfig::max_buffer`]) only after a read fills it, so a busy relay copies in
//!   large chunks. A direction holds a buffer only while bytes flow: when its reader has
//!   nothing more (and everything read was written) the buffer goes back to a small
//!   per-thread pool, so an idle relay holds no buffer at all (as the `splice(2)` path
//!   holds no pipe). Nothing is read while the previous chunk is unwritten, so a peer that
//!   does not read applies backpressure instead of growing memory.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::ReadBuf;
use tokio::time::{sleep, Sleep};

use super::arm_reset;
use crate::io::Io;

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    idle_timeout: Option<Duration>,
    total_timeout: Option<Duration>,
    initial_buffer: usize,
    max_buffer: usize,
    splice: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Some(Duration::from_secs(3600)),
            total_timeout: None,
            initial_buffer: 1024,
            max_buffer: 256 * 1024,
            splice: cfg!(target_os = "linux"),
        }
    }
}

impl RelayConfig {
    /// Defaults: 1 h idle timeout, no total timeout, buffers from 1 KiB up to 256 KiB.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the relay when no byte has moved in either direction for this long.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Ends the relay this long after it started, busy or not.
    pub fn total_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.total_timeout = timeout;
        self
    }

    /// Buffer size per direction before any traffic (at least 64 bytes).
    pub fn initial_buffer(mut self, bytes: usize) -> Self {
        self.initial_buffer = bytes.max(64);
        self.max_buffer = self.max_buffer.max(self.initial_buffer);
        self
    }

    /// Use `splice(2)` when both ends are plain TCP sockets (Linux; default on): bytes
    /// then never enter user space. That includes sockets behind wrappers that do not
    /// change the bytes ([`Io::raw_tcp_socket`](crate::Io::raw_tcp_socket)), such as an
    /// HTTP/1.1 `CONNECT` tunnel over TCP from `connect::ConnectTerminate`. Off forces
    /// the portable copy loop.
    pub fn splice(mut self, on: bool) -> Self {
        self.splice = on;
        self
    }

    pub(super) fn splice_enabled(&self) -> bool {
        self.splice
    }

    pub(super) fn timeouts(&self) -> (Option<Duration>, Option<Duration>) {
        (self.idle_timeout, self.total_timeout)
    }

    /// Largest buffer per direction; this bounds the relay's memory per connection.
    pub fn max_buffer(mut self, bytes: usize) -> Self {
        self.max_buffer = bytes.max(self.initial_buffer);
        self
    }
}

/// Which end of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepted connection (the client).
    Downstream,
    /// The connection the proxy opened.
    Upstream,
}

impl Side {
    pub(super) fn other(self) -> Self {
        match self {
            Side::Downstream => Side::Upstream,
            Side::Upstream => Side::Downstream,
        }
    }
}

/// How one side stopped sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// A clean end of stream (TCP FIN, TLS close_notify, HTTP/2 END_STREAM).
    Eof,
    /// The connection was reset or the pipe broke.
    Reset,
    /// Another I/O error.
    Error(io::ErrorKind),
}

/// The first close the relay saw: who, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// The side that closed.
    pub side: Side,
    /// How it closed.
    pub kind: CloseKind,
}

/// Why a relay did not end with both directions cleanly closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// One side failed; the other side was reset in turn.
    #[error("{side:?} connection failed")]
    Io {
        /// The side whose read or write failed.
        side: Side,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// No byte moved for the idle timeout.
    #[error("idle for {0:?}")]
    IdleTimeout(Duration),
    /// The total timeout passed.
    #[error("relay exceeded its {0:?} total timeout")]
    TotalTimeout(Duration),
}

impl RelayError {
    /// Whether the failure was a reset (or broken pipe) rather than another error.
    pub fn is_reset(&self) -> bool {
        matches!(self, RelayError::Io { source, .. } if is_reset(source))
    }
}

/// What a relay did.
#[derive(Debug)]
pub struct RelayStats {
    /// Bytes copied downstream → upstream.
    pub bytes_up: u64,
    /// Bytes copied upstream → downstream.
    pub bytes_down: u64,
    /// Wall time from start to end.
    pub duration: Duration,
    /// The first side to stop sending, and how.
    pub first_close: Option<Close>,
    /// `Ok` when both directions ended with EOF.
    pub result: Result<(), RelayError>,
}

/// Relays between `downstream` and `upstream` with [`RelayConfig::default()`].
pub async fn relay<A: Io, B: Io>(downstream: &mut A, upstream: &mut B) -> RelayStats {
    relay_with(downstream, upstream, &RelayConfig::default()).await
}

/// Relays between `downstream` and `upstream` until both directions end, one side fails,
/// or a timeout fires. The streams are left open for the caller to drop; after a failure
/// the healthy side is armed to reset when dropped.
pub async fn relay_with<A: Io, B: Io>(
    downstream: &mut A,
    upstream: &mut B,
    config: &RelayConfig,
) -> RelayStats {
    let started = Instant::now();
    let mut up = Pipe::new(config);
    let mut down = Pipe::new(config);
    let mut first_close = None;
    let mut last_activity = started;
    let mut idle = std::pin::pin!(sleep(config.idle_timeout.unwrap_or(Duration::MAX / 4)));
    let mut total = std::pin::pin!(sleep(config.total_timeout.unwrap_or(Duration::MAX / 4)));

    let ending = poll_fn(|cx| {
        let mut progressed = false;
        for (pipe, side) in [(&mut up, Side::Downstream), (&mut down, Side::Upstream)] {
            if pipe.done {
                continue;
            }
            let polled = match side {
                Side::Downstream => pipe.poll_copy(cx, downstream, upstream, &mut progressed),
                Side::Upstream => pipe.poll_copy(cx, upstream, downstream, &mut progressed),
            };
            match polled {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => {
                    pipe.done = true;
                    first_close.get_or_insert(Close {
                        side,
                        kind: CloseKind::Eof,
                    });
                }
                Poll::Ready(Err(PipeError::Read(e))) => {
                    return Poll::Ready(Ending::Failed(side, e))
                }
                Poll::Ready(Err(PipeError::Write(e))) => {
                    return Poll::Ready(Ending::Failed(side.other(), e))
                }
            }
        }
        if up.done && down.done {
            return Poll::Ready(Ending::Done);
        }
        if progressed {
            last_activity = Instant::now();
        }
        let timers = (idle.as_mut(), total.as_mut());
        poll_timeouts(cx, config.timeouts(), timers, last_activity)
    })
    .await;

    let result = finish(ending, &mut first_close, |side| {
        // Propagate the abort: the healthy peer must not mistake it for a clean FIN.
        match side {
            Side::Downstream => arm_reset(&*upstream),
            Side::Upstream => arm_reset(&*downstream),
        };
    });
    RelayStats {
        bytes_up: up.bytes,
        bytes_down: down.bytes,
        duration: started.elapsed(),
        first_close,
        result,
    }
}

/// How a relay ended, before it is reported.
pub(super) enum Ending {
    Done,
    Failed(Side, io::Error),
    IdleTimeout(Duration),
    TotalTimeout(Duration),
}

/// Turns an [`Ending`] into the reported result; `reset_healthy` is called with the side
/// that failed so the other one can be armed to reset.
/// A relay's idle and total timeouts, polled once per wake-up with the relay's two timers
/// (`idle`, `total`, created with the timeouts or far in the future): `Ready` with the
/// ending once one has passed, else `Pending`.
///
/// Re-arming the idle timer on every chunk would cost a timer-wheel update per read;
/// instead the timer fires at the old deadline and is pushed out if there was activity
/// (`last_activity`) since.
pub(super) fn poll_timeouts(
    cx: &mut Context<'_>,
    (idle, total): (Option<Duration>, Option<Duration>),
    (mut idle_timer, total_timer): (Pin<&mut Sleep>, Pin<&mut Sleep>),
    last_activity: Instant,
) -> Poll<Ending> {
    if let Some(timeout) = idle {
        while idle_timer.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(Ending::IdleTimeout(timeout));
            }
            idle_timer.as_mut().reset(deadline.into());
        }
    }
    if let Some(timeout) = total {
        if total_timer.poll(cx).is_ready() {
            return Poll::Ready(Ending::TotalTimeout(timeout));
        }
    }
    Poll::Pending
}

pub(super) fn finish(
    ending: Ending,
    first_close: &mut Option<Close>,
    reset_healthy: impl FnOnce(Side),
) -> Result<(), RelayError> {
    match ending {
        Ending::Done => Ok(()),
        Ending::IdleTimeout(t) => Err(RelayError::IdleTimeout(t)),
        Ending::TotalTimeout(t) => Err(RelayError::TotalTimeout(t)),
        Ending::Failed(side, source) => {
            let kind = if is_reset(&source) {
                CloseKind::Reset
            } else {
                CloseKind::Error(source.kind())
            };
            first_close.get_or_insert(Close { side, kind });
            reset_healthy(side);
            Err(RelayError::Io { side, source })
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

pub(super) enum PipeError {
    Read(io::Error),
    Write(io::Error),
}

/// How a direction moves bytes, chosen at its first poll.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Undecided,
    /// `AsyncRead` into our buffer, `AsyncWrite` out of it.
    Copy,
    /// From an HTTP/2 stream: h2's received `Bytes` are written out in place.
    #[cfg(feature = "connect")]
    FromH2,
    /// To an HTTP/2 stream: what we read is handed to h2 as it is.
    #[cfg(feature = "connect")]
    ToH2,
}

#[cfg(feature = "connect")]
impl Pipe {
    /// [`Mode::FromH2`]: writes the stream's received `DATA` in place (no copy into our
    /// buffer); its flow-control capacity is released as the writer takes the bytes.
    fn poll_from_h2<W: Io>(
        &mut self,
        cx: &mut Context<'_>,
        h2: &mut crate::connect::H2Stream,
        writer: &mut W,
        progressed: &mut bool,
    ) -> Poll<Result<(), PipeError>> {
        use tokio::io::AsyncBufRead;
        while !self.eof {
            let chunk = match Pin::new(&mut *h2).poll_fill_buf(cx) {
                Poll::Pending => {
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(PipeError::Write)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PipeError::Read(e))),
                Poll::Ready(Ok(chunk)) => chunk,
            };
            if chunk.is_empty() {
                self.eof = true;
                break;
            }
            let len = chunk.len();
            let n =
                ready!(Pin::new(&mut *writer).poll_write(cx, chunk)).map_err(PipeError::Write)?;
            if n == 0 {
                return Poll::Ready(Err(PipeError::Write(io::ErrorKind::WriteZero.into())));
            }
            let n = n.min(len);
            Pin::new(&mut *h2).consume(n);
            self.bytes += n as u64;
            self.direct.add(n as u64, 0);
            self.need_flush = true;
            *progressed = true;
        }
        if self.need_flush {
            ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(PipeError::Write)?;
            self.need_flush = false;
        }
        ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(PipeError::Write)?;
        Poll::Ready(Ok(()))
    }

    /// [`Mode::ToH2`]: reads into a `BytesMut` and hands each chunk to h2 as it is (no
    /// copy into a new `Bytes`). The same buffer sizes as the copy loop; a chunk is read
    /// only once the previous one was handed over, and h2 takes only what the peer's
    /// window allows, so memory stays bounded as before.
    fn poll_to_h2<R: Io>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        h2: &mut crate::connect::H2Stream,
        progressed: &mut bool,
    ) -> Poll<Result<(), PipeError>> {
        use tokio::io::AsyncWrite;
        loop {
            if self.out.is_empty() && !self.eof {
                if self.grow {
                    self.size = (self.size * 16).min(self.max);
                    self.grow = false;
                }
                let size = self.size;
                self.inbuf.reserve(size);
                let mut limited = bytes::BufMut::limit(&mut self.inbuf, size);
                match tokio_util::io::poll_read_buf(Pin::new(&mut *reader), cx, &mut limited) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(PipeError::Read(e))),
                    Poll::Ready(Ok(0)) => self.eof = true,
                    Poll::Ready(Ok(n)) => {
                        self.out = self.inbuf.split().freeze();
                        self.bytes += n as u64;
                        self.grow = n == size && size < self.max;
                        *progressed = true;
                    }
                }
            }
            while !self.out.is_empty() {
                let n = ready!(h2.poll_send_bytes(cx, &mut self.out)).map_err(PipeError::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(PipeError::Write(io::ErrorKind::WriteZero.into())));
                }
                self.direct.add(0, n as u64);
                *progressed = true;
            }
            if self.eof {
                ready!(Pin::new(&mut *h2).poll_shutdown(cx)).map_err(PipeError::Write)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// One direction of the relay.
struct Pipe {
    mode: Mode,
    /// Read, not yet handed to h2 ([`Mode::ToH2`]).
    #[cfg(feature = "connect")]
    out: bytes::Bytes,
    /// Where [`Mode::ToH2`] reads to; its chunks are frozen and handed over.
    #[cfg(feature = "connect")]
    inbuf: bytes::BytesMut,
    /// The counters of the HTTP/2 side's wrappers, which [`Mode::FromH2`] and
    /// [`Mode::ToH2`] bypass.
    #[cfg(feature = "connect")]
    direct: crate::io::DirectCount,
    buf: Vec<u8>,
    /// The read size: `initial_buffer`, ×16 up to `max` after reads that fill it.
    size: usize,
    start: usize,
    end: usize,
    max: usize,
    grow: bool,
    eof: bool,
    need_flush: bool,
    done: bool,
    bytes: u64,
}

impl Pipe {
    fn new(config: &RelayConfig) -> Self {
        Self {
            mode: Mode::Undecided,
            #[cfg(feature = "connect")]
            out: bytes::Bytes::new(),
            #[cfg(feature = "connect")]
            inbuf: bytes::BytesMut::new(),
            #[cfg(feature = "connect")]
            direct: crate::io::DirectCount::default(),
            // Allocated at the first read in copy mode (see `poll_copy`).
            buf: Vec::new(),
            size: config.initial_buffer,
            start: 0,
            end: 0,
            max: config.max_buffer,
            grow: false,
            eof: false,
            need_flush: false,
            done: false,
            bytes: 0,
        }
    }

    fn poll_copy<R: Io, W: Io>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        progressed: &mut bool,
    ) -> Poll<Result<(), PipeError>> {
        if self.mode == Mode::Undecided {
            self.mode = Mode::Copy;
            #[cfg(feature = "connect")]
            if reader.h2_stream().is_some() {
                self.mode = Mode::FromH2;
                self.direct = crate::io::DirectCount::of(&*reader);
            } else if writer.h2_stream().is_some() {
                self.mode = Mode::ToH2;
                self.direct = crate::io::DirectCount::of(&*writer);
            }
        }
        #[cfg(feature = "connect")]
        match self.mode {
            Mode::FromH2 => {
                if let Some(h2) = reader.h2_stream() {
                    return self.poll_from_h2(cx, h2, writer, progressed);
                }
            }
            Mode::ToH2 => {
                if let Some(h2) = writer.h2_stream() {
                    return self.poll_to_h2(cx, reader, h2, progressed);
                }
            }
            _ => {}
        }
        loop {
            if self.start == self.end && !self.eof {
                if self.grow {
                    // Grow only while empty: no copying, and a connection that never fills
                    // its buffer never pays for a bigger one.
                    self.size = (self.size * 16).min(self.max);
                    self.grow = false;
                }
                if self.buf.len() < self.size {
                    give_back(std::mem::take(&mut self.buf));
                    self.buf = take_buffer(self.size);
                }
                let read_into = self.buf.get_mut(..self.size).unwrap_or_default();
                let mut rb = ReadBuf::new(read_into);
                match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing buffered and nothing to read: an idle direction keeps no
                        // buffer (the pool hands one back at the next wake-up).
                        give_back(std::mem::take(&mut self.buf));
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))
                                .map_err(PipeError::Write)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(PipeError::Read(e))),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            self.start = 0;
                            self.end = n;
                            self.bytes += n as u64;
                            self.grow = n == self.size && n < self.max;
                            *progressed = true;
                        }
                    }
                }
            }
            while self.start < self.end {
                let chunk = self.buf.get(self.start..self.end).unwrap_or_default();
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, chunk))
                    .map_err(PipeError::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(PipeError::Write(io::ErrorKind::WriteZero.into())));
                }
                // A writer claiming more than it was given must not move us past `end`.
                self.start += n.min(chunk.len());
                self.need_flush = true;
                *progressed = true;
            }
            if self.eof {
                give_back(std::mem::take(&mut self.buf));
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(PipeError::Write)?;
                    self.need_flush = false;
                }
                ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(PipeError::Write)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Empty copy buffers kept per thread for the next burst. A direction holds a buffer only
/// between a read that returned bytes and the write that took the last of them (usually
/// within one poll), so a few cover a thread's whole share of connections; more are freed.
/// At most `POOL_MAX` × [`RelayConfig::max_buffer`] bytes stay allocated per thread.
const POOL_MAX: usize = 4;

thread_local! {
    static BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of at least `size` bytes from this thread's pool, or a new one.
fn take_buffer(size: usize) -> Vec<u8> {
    let pooled = BUFFERS
        .try_with(|pool| {
            let mut pool = pool.try_borrow_mut().ok()?;
            let i = pool.iter().position(|b| b.len() >= size)?;
            Some(pool.swap_remove(i))
        })
        .ok()
        .flatten();
    pooled.unwrap_or_else(|| vec![0; size])
}

/// Returns a buffer (its contents are stale, never read) to this thread's pool, or frees
/// it when the pool is full; the pool keeps the largest ones.
fn give_back(buf: Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    let _ = BUFFERS.try_with(|pool| {
        if let Ok(mut pool) = pool.try_borrow_mut() {
            if pool.len() < POOL_MAX {
                pool.push(buf);
            } else if let Some(smallest) = pool.iter_mut().min_by_key(|b| b.len()) {
                if smallest.len() < buf.len() {
                    *smallest = buf;
                }
            }
        }
    });
}

impl Drop for Pipe {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.buf));
    }
}
