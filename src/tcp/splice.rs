//! Linux `splice(2)` relay for plain TCP ↔ TCP: bytes move socket → pipe → socket inside
//! the kernel, never copied to user space.
//!
//! Same semantics as the portable relay (half-close, reset propagation, idle and total
//! timeouts, stats). A direction holds a pipe only while bytes flow: it takes one when its
//! socket turns readable and hands it back, empty, to a small per-thread pool as soon as
//! the socket has nothing more to read. An idle connection therefore holds no pipe (no
//! descriptors beyond its two sockets, no pipe buffers against the per-user pipe limit),
//! and a new connection's first bytes do not pay for creating and sizing one. Selected by
//! [`RelayConfig::splice`](super::RelayConfig::splice) when both ends are `TcpStream`s.

use crate::io::DirectCount;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::sleep;

use super::relay::{
    finish, poll_timeouts, Close, CloseKind, Ending, PipeError, RelayConfig, RelayStats, Side,
};

/// Largest chunk moved per `splice` call; also the pipe capacity we ask for.
const CHUNK: usize = 1 << 20;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by us alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe means fewer syscalls per megabyte; failure (e.g. the per-user pipe
        // limit) just leaves the default 64 KiB.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(Self { read, write })
    }
}

/// Empty pipes kept per thread for the next burst; more are closed. A small number covers
/// connection churn (a direction holds its pipe only while bytes flow, usually within one
/// poll) and bounds the descriptors the pool keeps from accepting connections (EMFILE).
const POOL_MAX: usize = 4;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe from this thread's pool, or a new one.
fn take_pipe() -> io::Result<Pipe> {
    let pooled = PIPES
        .try_with(|pool| pool.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .ok()
        .flatten();
    match pooled {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Returns an **empty** pipe to this thread's pool (or closes it when the pool is full).
fn give_back(pipe: Pipe) {
    let _ = PIPES.try_with(|pool| {
        if let Ok(mut pool) = pool.try_borrow_mut() {
            if pool.len() < POOL_MAX {
                pool.push(pipe);
            }
        }
    });
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors owned by the caller; null offsets mean "use
    // and advance the file position", which is what sockets and pipes need.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One direction of the relay: a pipe while bytes flow, and how many sit in it.
#[derive(Default)]
struct Direction {
    pipe: Option<Pipe>,
    /// Spliced in from the reader, not yet out to the writer.
    in_pipe: usize,
    /// Bytes moved so far.
    bytes: u64,
    done: bool,
}

impl Direction {
    /// Moves `from` → `to` until neither can go on, or until EOF (then shuts down `to`'s
    /// write half). What moves is reported to the streams' counters (`counts`: `from`'s,
    /// `to`'s), which it bypassed.
    ///
    /// A poll function rather than an `async fn`: its state is these few fields, not two
    /// readiness futures per direction kept for every idle connection.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        counts: (&DirectCount, &DirectCount),
        progressed: &mut bool,
    ) -> Poll<Result<(), PipeError>> {
        loop {
            // Invariant: the pipe is emptied before anything more is read into it, so a
            // pipe given back is empty.
            while self.in_pipe > 0 {
                let Some(p) = &self.pipe else {
                    self.in_pipe = 0;
                    break;
                };
                ready!(to.poll_write_ready(cx)).map_err(PipeError::Write)?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(p.read.as_raw_fd(), to.as_raw_fd(), self.in_pipe)
                }) {
                    Ok(r) => {
                        self.in_pipe = self.in_pipe.saturating_sub(r);
                        counts.1.add(0, r as u64);
                        *progressed = true;
                    }
                    // Readiness cleared: the next `poll_write_ready` waits for more.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(PipeError::Write(e))),
                }
            }
            ready!(from.poll_read_ready(cx)).map_err(PipeError::Read)?;
            let p = match &self.pipe {
                Some(p) => p,
                None => self.pipe.insert(take_pipe().map_err(PipeError::Read)?),
            };
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), p.write.as_raw_fd(), CHUNK)
            }) {
                Ok(0) => {
                    if let Some(p) = self.pipe.take() {
                        give_back(p);
                    }
                    // EOF: pass the FIN on, keep the other direction going.
                    return Poll::Ready(
                        socket2::SockRef::from(to)
                            .shutdown(std::net::Shutdown::Write)
                            .map_err(PipeError::Write),
                    );
                }
                Ok(n) => {
                    self.in_pipe = n;
                    self.bytes += n as u64;
                    counts.0.add(n as u64, 0);
                    *progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Drained for now: no pipe while idle (it is empty).
                    if let Some(p) = self.pipe.take() {
                        give_back(p);
                    }
                }
                Err(e) => return Poll::Ready(Err(PipeError::Read(e))),
            }
        }
    }
}

/// Relays with `splice(2)`; see the module docs.
///
/// `counts` are the counters of the streams `down` and `up` were taken from (see
/// [`DirectCount`]).
pub(crate) async fn splice_relay(
    down: &TcpStream,
    up: &TcpStream,
    config: &RelayConfig,
    counts: &(DirectCount, DirectCount),
) -> RelayStats {
    let started = Instant::now();
    let (mut upward, mut downward) = (Direction::default(), Direction::default());
    let mut first_close: Option<Close> = None;
    let (idle, total) = config.timeouts();
    let mut last_activity = started;
    let mut idle_timer = std::pin::pin!(sleep(idle.unwrap_or(Duration::MAX / 4)));
    let mut total_timer = std::pin::pin!(sleep(total.unwrap_or(Duration::MAX / 4)));
    let ending = poll_fn(|cx| {
        let mut progressed = false;
        // As in the copy loop: each direction named by the side it reads from.
        for (direction, side, from, to, counts) in [
            (
                &mut upward,
                Side::Downstream,
                down,
                up,
                (&counts.0, &counts.1),
            ),
            (
                &mut downward,
                Side::Upstream,
                up,
                down,
                (&counts.1, &counts.0),
            ),
        ] {
            if direction.done {
                continue;
            }
            match direction.poll_move(cx, from, to, counts, &mut progressed) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => {
                    direction.done = true;
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
        if upward.done && downward.done {
            return Poll::Ready(Ending::Done);
        }
        if progressed {
            last_activity = Instant::now();
        }
        let timers = (idle_timer.as_mut(), total_timer.as_mut());
        poll_timeouts(cx, (idle, total), timers, last_activity)
    })
    .await;
    // Pipes still holding bytes (an error mid-way) are closed, not pooled.
    drop((upward.pipe.take(), downward.pipe.take()));
    let result = finish(ending, &mut first_close, |side| {
        let healthy = match side {
            Side::Downstream => up,
            Side::Upstream => down,
        };
        let _ = socket2::SockRef::from(healthy).set_linger(Some(Duration::ZERO));
    });
    RelayStats {
        bytes_up: upward.bytes,
        bytes_down: downward.bytes,
        duration: started.elapsed(),
        first_close,
        result,
    }
}
