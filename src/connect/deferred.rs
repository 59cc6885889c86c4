//! The stream a tunnel's inner service receives before the tunnel exists on the wire.
//!
//! A CONNECT terminator may answer `200` only after the inner service admitted the
//! tunnel, and the upgraded stream (HTTP/1.1) or the response's send half (HTTP/2) only
//! exists after that answer. So the inner service gets this placeholder: its first read
//! or write admits the tunnel (a service that starts talking has evidently accepted it)
//! and then waits for the real stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::io::BoxIo;

use crate::admission::Admission;

pub(crate) type StreamSender = oneshot::Sender<io::Result<BoxIo>>;

pub(crate) struct DeferredIo {
    admission: Option<Admission>,
    state: State,
}

enum State {
    Waiting(oneshot::Receiver<io::Result<BoxIo>>),
    Ready(BoxIo),
    Failed,
}

impl DeferredIo {
    pub(crate) fn new(admission: Admission) -> (Self, StreamSender) {
        let (tx, rx) = oneshot::channel();
        let io = Self {
            admission: Some(admission),
            state: State::Waiting(rx),
        };
        (io, tx)
    }

    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut BoxIo>> {
        if let Some(admission) = self.admission.take() {
            admission.admit();
        }
        if let State::Waiting(rx) = &mut self.state {
            let next = match ready!(Pin::new(rx).poll(cx)) {
                Ok(Ok(io)) => State::Ready(io),
                Ok(Err(e)) => {
                    self.state = State::Failed;
                    return Poll::Ready(Err(e));
                }
                Err(_) => State::Failed,
            };
            self.state = next;
        }
        match &mut self.state {
            State::Ready(io) => Poll::Ready(Ok(io)),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tunnel was not established",
            ))),
        }
    }
}

use std::future::Future;

/// The tunnel's stream, once the terminator handed it over (an HTTP/1.1 `CONNECT` tunnel
/// runs on the client's TCP socket; an HTTP/2 one on a stream of a shared connection).
impl crate::io::Io for DeferredIo {
    fn tcp_socket(&self) -> Option<&tokio::net::TcpStream> {
        match &self.state {
            State::Ready(io) => crate::io::Io::tcp_socket(io),
            _ => None,
        }
    }
    fn raw_tcp_socket(&self) -> Option<&tokio::net::TcpStream> {
        match &self.state {
            State::Ready(io) => crate::io::Io::raw_tcp_socket(io),
            _ => None,
        }
    }
    fn h2_stream(&mut self) -> Option<&mut super::H2Stream> {
        match &mut self.state {
            State::Ready(io) => crate::io::Io::h2_stream(io),
            _ => None,
        }
    }
    fn take_read_ahead(&mut self) -> bytes::Bytes {
        match &mut self.state {
            State::Ready(io) => crate::io::Io::take_read_ahead(io),
            _ => bytes::Bytes::new(),
        }
    }
    fn direct_count(&self, count: &mut crate::io::DirectCount) {
        if let State::Ready(io) = &self.state {
            crate::io::Io::direct_count(io, count);
        }
    }
}

impl AsyncRead for DeferredIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let io = ready!(self.get_mut().poll_stream(cx))?;
        Pin::new(io).poll_read(cx, buf)
    }
}

impl AsyncWrite for DeferredIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let io = ready!(self.get_mut().poll_stream(cx))?;
        Pin::new(io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let io = ready!(self.get_mut().poll_stream(cx))?;
        Pin::new(io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let io = ready!(self.get_mut().poll_stream(cx))?;
        Pin::new(io).poll_shutdown(cx)
    }
}
