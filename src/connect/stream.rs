//! [`H2Stream`]: one HTTP/2 CONNECT stream as a byte stream (RFC 9113 §8.5).
//!
//! The mapping between TCP and the stream, both ways (ztunnel's, plus resets):
//!
//! | TCP side                     | HTTP/2 stream                                   |
//! |------------------------------|-------------------------------------------------|
//! | bytes                        | `DATA` frames                                   |
//! | FIN (`poll_shutdown`)        | empty `DATA` with `END_STREAM`                  |
//! | EOF on read                  | `END_STREAM`, or `RST_STREAM(NO_ERROR/CANCEL)`  |
//! | reset (`ConnectionReset`)    | `RST_STREAM(CONNECT_ERROR)`, both ways          |
//! | broken pipe                  | `RST_STREAM(STREAM_CLOSED)` received            |
//! | other I/O error              | any other `RST_STREAM` code, `GOAWAY`, I/O      |
//!
//! Flow control: received capacity is released as bytes are handed to the reader (so a
//! reader that stops reading stops the peer after one window), and a write sends only what
//! the connection granted (`reserve_capacity` / `poll_capacity`), so the bytes buffered in
//! `h2` never exceed the send window.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conn::Abort;

/// The most one write asks the connection for (h2 counts windows in `u32`).
const MAX_RESERVE: usize = 16 << 20;

/// An HTTP/2 stream as an [`AsyncRead`] + [`AsyncWrite`] byte stream: the tunnel of a
/// CONNECT request, on either side.
///
/// * `poll_shutdown` sends `END_STREAM` (a TCP FIN); reading `END_STREAM` is EOF.
/// * Dropping the stream before both directions ended resets it: with
///   `RST_STREAM(CONNECT_ERROR)` if its [`Abort`] handle was aborted (the other side of a
///   relay failed), else with `RST_STREAM(CANCEL)`.
/// * A `RST_STREAM` from the peer surfaces as EOF (`NO_ERROR`, `CANCEL`) or as an error
///   (`CONNECT_ERROR` → [`ConnectionReset`](io::ErrorKind::ConnectionReset), so a relay
///   resets its TCP side), also on a write that waits for flow-control capacity.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read; its flow-control capacity is not released yet.
    buf: Bytes,
    abort: Abort,
    /// `END_STREAM` or `RST_STREAM` sent: nothing more may be written.
    send_closed: bool,
    reset_sent: bool,
}

impl H2Stream {
    /// Wraps the two halves of a stream whose `200` has been sent or received.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self::with_abort(send, recv, Abort::new())
    }

    /// Same, sharing `abort` with whoever may need to reset the stream (a relay, through
    /// the tunnel connection's metadata).
    pub fn with_abort(send: SendStream<Bytes>, recv: RecvStream, abort: Abort) -> Self {
        Self {
            send,
            recv,
            buf: Bytes::new(),
            abort,
            send_closed: false,
            reset_sent: false,
        }
    }

    /// The handle that makes this stream end with `RST_STREAM(CONNECT_ERROR)`.
    pub fn abort_handle(&self) -> &Abort {
        &self.abort
    }

    /// Resets the stream now with `RST_STREAM(CONNECT_ERROR)`: the peer (RFC 9113 §8.5)
    /// resets its TCP connection. Later reads and writes fail.
    pub fn abort(&mut self) {
        self.abort.abort();
        self.reset(Reason::CONNECT_ERROR);
    }

    fn reset(&mut self, reason: Reason) {
        if !self.reset_sent {
            self.reset_sent = true;
            self.send_closed = true;
            self.send.send_reset(reason);
        }
    }

    fn check_abort(&mut self) -> io::Result<()> {
        if self.abort.is_aborted() {
            self.reset(Reason::CONNECT_ERROR);
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "tunnel aborted",
            ));
        }
        Ok(())
    }

    /// The error for a failed send: the peer's reset reason if there is one.
    fn send_error(&mut self, cx: &mut Context<'_>, fallback: io::Error) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(reset) => reset_error(reset),
            Poll::Pending => fallback,
        }
    }
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("id", &self.send.stream_id().as_u32())
            .field("send_closed", &self.send_closed)
            .field("aborted", &self.abort.is_aborted())
            .finish()
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        // Bytes received but never read still hold connection-level window: give it back,
        // or the connection would shrink with every stream dropped mid-read.
        if !self.buf.is_empty() {
            let _ = self.recv.flow_control().release_capacity(self.buf.len());
        }
        if self.abort.is_aborted() {
            self.reset(Reason::CONNECT_ERROR);
        }
        // Otherwise h2 resets a stream dropped while still open with RST_STREAM(CANCEL),
        // and sends nothing for one that ended cleanly both ways.
    }
}

/// Maps an error from the receive side (REFERENCE §2.7, ztunnel's mapping).
fn read_result(e: h2::Error) -> io::Result<()> {
    if e.is_reset() {
        match e.reason() {
            Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => return Ok(()),
            Some(Reason::STREAM_CLOSED) => {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
            }
            _ => {}
        }
    }
    Err(to_io(e))
}

/// A reset seen from the send side: the peer no longer takes data.
fn reset_error(reset: Result<Reason, h2::Error>) -> io::Error {
    match reset {
        Ok(reason @ (Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED)) => {
            io::Error::new(io::ErrorKind::BrokenPipe, h2::Error::from(reason))
        }
        Ok(reason) => to_io(h2::Error::from(reason)),
        Err(e) => to_io(e),
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 connection I/O error"));
    }
    let kind = if e.reason() == Some(Reason::CONNECT_ERROR) {
        // The peer's TCP connection was reset (RFC 9113 §8.5): pass the reset on.
        io::ErrorKind::ConnectionReset
    } else if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_abort()?;
        if this.buf.is_empty() {
            loop {
                match ready!(this.recv.poll_data(cx)) {
                    None => return Poll::Ready(Ok(())),
                    // Empty DATA frames carry nothing (h2 bounds how many it accepts).
                    Some(Ok(chunk)) if chunk.is_empty() => continue,
                    Some(Ok(chunk)) => {
                        this.buf = chunk;
                        break;
                    }
                    Some(Err(e)) => return Poll::Ready(read_result(e)),
                }
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        // Handed to the reader: the peer may send this much more.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_abort()?;
        if this.send_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the tunnel was closed",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // A reset from the peer ends writing, also while we wait for capacity below (both
        // register this task for the stream's send-side events).
        if let Poll::Ready(reset) = this.send.poll_reset(cx) {
            return Poll::Ready(Err(reset_error(reset)));
        }
        let want = buf.len().min(MAX_RESERVE);
        this.send.reserve_capacity(want);
        loop {
            let granted = this.send.capacity();
            if granted > 0 {
                let n = granted.min(want);
                return Poll::Ready(
                    match this
                        .send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    {
                        Ok(()) => Ok(n),
                        Err(e) => Err(this.send_error(cx, to_io(e))),
                    },
                );
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(this.send_error(cx, to_io(e)))),
                None => {
                    let closed = io::Error::new(io::ErrorKind::BrokenPipe, "stream closed");
                    return Poll::Ready(Err(this.send_error(cx, closed)));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // DATA handed to h2 is written by the connection task; there is nothing to wait for.
        Poll::Ready(self.get_mut().check_abort())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_abort()?;
        if this.send_closed {
            return Poll::Ready(Ok(()));
        }
        this.send_closed = true;
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(match this.send.poll_reset(cx) {
                // The peer ended the stream cleanly first: nothing left to close.
                Poll::Ready(Ok(Reason::NO_ERROR)) => Ok(()),
                Poll::Ready(reset) => Err(reset_error(reset)),
                Poll::Pending => Err(to_io(e)),
            }),
        }
    }
}
