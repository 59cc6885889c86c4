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
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use crate::admission::Abort;

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

    /// Sends the front of `data` without copying it, as much as the connection granted
    /// (split off `data`); `Ready(Ok(n))` with `n > 0`, or the error a write would get.
    /// What a relay uses instead of [`AsyncWrite::poll_write`], which must copy the slice
    /// it is lent into a `Bytes` of its own.
    pub(crate) fn poll_send_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, data.len(), |n| data.split_to(n))
    }

    /// Waits for send capacity for up to `len` bytes, then sends `take(n)`: the `n` bytes
    /// granted (`n > 0`).
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        take: impl FnOnce(usize) -> Bytes,
    ) -> Poll<io::Result<usize>> {
        self.check_abort()?;
        if self.send_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the tunnel was closed",
            )));
        }
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        // A reset from the peer ends writing, also while we wait for capacity below (both
        // register this task for the stream's send-side events).
        if let Poll::Ready(reset) = self.send.poll_reset(cx) {
            return Poll::Ready(Err(reset_error(reset)));
        }
        let want = len.min(MAX_RESERVE);
        self.send.reserve_capacity(want);
        let n = loop {
            let granted = self.send.capacity();
            if granted > 0 {
                break granted.min(want);
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(self.send_error(cx, to_io(e)))),
                None => {
                    let closed = io::Error::new(io::ErrorKind::BrokenPipe, "stream closed");
                    return Poll::Ready(Err(self.send_error(cx, closed)));
                }
            }
        };
        Poll::Ready(match self.send.send_data(take(n), false) {
            Ok(()) => Ok(n),
            Err(e) => Err(self.send_error(cx, to_io(e))),
        })
    }

    /// Makes `buf` hold received bytes, unless the stream ended (then it stays empty).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_abort()?;
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => break,
                // Empty DATA frames carry nothing (h2 bounds how many it accepts).
                Some(Ok(chunk)) => self.buf = chunk,
                Some(Err(e)) => return Poll::Ready(read_result(e)),
            }
        }
        Poll::Ready(Ok(()))
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
        // Bytes received but never read still hold connection-level window: give it back
        // now rather than when h2 forgets the stream.
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

/// Maps an error from the receive side, as ztunnel maps it.
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

/// A stream of a multiplexed HTTP/2 connection: no socket of its own.
impl crate::io::Io for H2Stream {
    fn h2_stream(&mut self) -> Option<&mut H2Stream> {
        Some(self)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_fill(cx))?;
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf.split_to(n));
        // Handed to the reader: the peer may send this much more.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

/// Received `DATA` lent out in place, so that a relay writes h2's `Bytes` straight to the
/// other side instead of copying them into a buffer of its own; flow-control capacity is
/// released as bytes are consumed, as for reads.
impl AsyncBufRead for H2Stream {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        ready!(this.poll_fill(cx))?;
        Poll::Ready(Ok(&this.buf))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        let n = amt.min(this.buf.len());
        this.buf.advance(n);
        let _ = this.recv.flow_control().release_capacity(n);
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, buf.len(), |n| {
            Bytes::copy_from_slice(buf.get(..n).unwrap_or_default())
        })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Opens a CONNECT stream on `h2` and waits for the answer.
    async fn open(h2: h2::client::SendRequest<Bytes>) -> H2Stream {
        let mut h2 = h2.ready().await.unwrap();
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("x.test:1")
            .body(())
            .unwrap();
        let (response, send) = h2.send_request(req, false).unwrap();
        H2Stream::new(send, response.await.unwrap().into_body())
    }

    /// An in-memory HTTP/2 connection with h2's default settings (64 KiB - 1 windows): the
    /// client's request sender and the server side of each stream it opens.
    async fn connection() -> (
        h2::client::SendRequest<Bytes>,
        tokio::sync::mpsc::UnboundedReceiver<H2Stream>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let send = respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                let _ = tx.send(H2Stream::new(send, req.into_body()));
            }
        });
        let (h2, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        (h2, rx)
    }

    /// One stream: (client side, server side).
    async fn pair() -> (H2Stream, H2Stream) {
        let (h2, mut accepted) = connection().await;
        let client = open(h2).await;
        (client, accepted.recv().await.unwrap())
    }

    const WINDOW: usize = 65_535;

    /// Writes until a write stalls for 200 ms; returns the bytes accepted.
    async fn write_until_stalled(s: &mut H2Stream) -> usize {
        let chunk = [7u8; 8192];
        let mut total = 0;
        while let Ok(r) = tokio::time::timeout(Duration::from_millis(200), s.write(&chunk)).await {
            total += r.unwrap();
        }
        total
    }

    #[tokio::test]
    async fn writes_stop_at_the_peer_window_until_it_reads() {
        let (mut client, mut server) = pair().await;
        // Only granted capacity is sent: nothing piles up beyond the window.
        assert_eq!(write_until_stalled(&mut client).await, WINDOW);
        let mut got = vec![0u8; WINDOW];
        server.read_exact(&mut got).await.unwrap();
        // Reading released the capacity: the writer may go on.
        assert!(write_until_stalled(&mut client).await > 0);
    }

    #[tokio::test]
    async fn a_peer_reset_fails_a_write_waiting_for_capacity() {
        let (mut client, mut server) = pair().await;
        write_until_stalled(&mut client).await;
        let blocked = tokio::spawn(async move { client.write_all(&[1u8; 1024]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.abort();
        let err = tokio::time::timeout(Duration::from_secs(5), blocked)
            .await
            .expect("the reset must wake the writer")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err:?}");
    }

    #[tokio::test]
    async fn shutdown_is_end_stream_and_reads_as_eof() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
        // The other direction is still open.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
        assert!(client.write(b"x").await.is_err(), "write after shutdown");
    }

    #[tokio::test]
    async fn dropping_an_aborted_stream_is_a_reset_and_a_plain_drop_is_eof() {
        let (client, mut server) = pair().await;
        client.abort_handle().abort();
        drop(client);
        let err = server.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err:?}");

        // Dropped without shutdown and without abort: RST_STREAM(CANCEL), read as EOF…
        let (client, mut server) = pair().await;
        drop(client);
        assert_eq!(server.read(&mut [0u8; 8]).await.unwrap(), 0);
        // …and the peer's writes now fail.
        let err = server.write_all(b"anyone?").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err:?}");
    }

    #[tokio::test]
    async fn streams_dropped_mid_read_do_not_shrink_the_connection_window() {
        let (h2, mut accepted) = connection().await;
        // Each stream sends a full window (the whole 64 KiB connection window) that the
        // server reads one byte of before dropping the stream: if the unread bytes stayed
        // charged to the connection, the next stream could not send.
        for _ in 0..4 {
            let mut client = open(h2.clone()).await;
            let mut server = accepted.recv().await.unwrap();
            let sent =
                tokio::time::timeout(Duration::from_secs(5), client.write_all(&[3u8; WINDOW]))
                    .await;
            assert!(sent.is_ok(), "connection window leaked");
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap();
            drop(server);
            drop(client);
        }
    }
}
