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
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::sleep;

use super::relay::{finish, Close, CloseKind, Ending, RelayConfig, RelayStats, Side};

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
    done: bool,
}

impl Direction {
    /// Moves `from` → `to` until neither can go on, or until EOF (then shuts down `to`'s
    /// write half). What moves is reported to the streams' counters (`counts`: `from`'s,
    /// `to`'s), which it bypassed. Errors name the side as if `from` were downstream.
    ///
    /// A poll function rather than an `async fn`: its state is these few fields, not two
    /// readiness futures per direction kept for every idle connection.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        bytes: &mut u64,
        counts: (&DirectCount, &DirectCount),
        progressed: &mut bool,
    ) -> Poll<Result<(), (Side, io::Error)>> {
        loop {
            // Invariant: the pipe is emptied before anything more is read into it, so a
            // pipe given back is empty.
            while self.in_pipe > 0 {
                let Some(p) = &self.pipe else {
                    self.in_pipe = 0;
                    break;
                };
                ready!(to.poll_write_ready(cx)).map_err(|e| (Side::Upstream, e))?;
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
                    Err(e) => return Poll::Ready(Err((Side::Upstream, e))),
                }
            }
            ready!(from.poll_read_ready(cx)).map_err(|e| (Side::Downstream, e))?;
            let p = match &self.pipe {
                Some(p) => p,
                None => self
                    .pipe
                    .insert(take_pipe().map_err(|e| (Side::Downstream, e))?),
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
                            .map_err(|e| (Side::Upstream, e)),
                    );
                }
                Ok(n) => {
                    self.in_pipe = n;
                    *bytes += n as u64;
                    counts.0.add(n as u64, 0);
                    *progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Drained for now: no pipe while idle (it is empty).
                    if let Some(p) = self.pipe.take() {
                        give_back(p);
                    }
                }
                Err(e) => return Poll::Ready(Err((Side::Downstream, e))),
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
    let (mut bytes_up, mut bytes_down) = (0u64, 0u64);
    let mut first_close: Option<Close> = None;
    let (idle, total) = config.timeouts();
    let mut last_activity = started;
    let mut idle_timer = std::pin::pin!(sleep(idle.unwrap_or(Duration::MAX / 4)));
    let mut total_timer = std::pin::pin!(sleep(total.unwrap_or(Duration::MAX / 4)));
    let ending = poll_fn(|cx| {
        let mut progressed = false;
        if !upward.done {
            let moved = upward.poll_move(
                cx,
                down,
                up,
                &mut bytes_up,
                (&counts.0, &counts.1),
                &mut progressed,
            );
            match moved {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => {
                    upward.done = true;
                    first_close.get_or_insert(Close {
                        side: Side::Downstream,
                        kind: CloseKind::Eof,
                    });
                }
                Poll::Ready(Err((side, e))) => return Poll::Ready(Ending::Failed(side, e)),
            }
        }
        if !downward.done {
            let moved = downward.poll_move(
                cx,
                up,
                down,
                &mut bytes_down,
                (&counts.1, &counts.0),
                &mut progressed,
            );
            match moved {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => {
                    downward.done = true;
                    first_close.get_or_insert(Close {
                        side: Side::Upstream,
                        kind: CloseKind::Eof,
                    });
                }
                // `poll_move` names its reader "downstream"; going down, that is upstream.
                Poll::Ready(Err((side, e))) => return Poll::Ready(Ending::Failed(side.other(), e)),
            }
        }
        if upward.done && downward.done {
            return Poll::Ready(Ending::Done);
        }
        if progressed {
            last_activity = Instant::now();
        }
        if let Some(timeout) = idle {
            // As in the copy loop: the timer fires at the old deadline and is pushed out
            // if there was activity since, instead of being re-armed per chunk.
            while idle_timer.as_mut().poll(cx).is_ready() {
                let deadline = last_activity + timeout;
                if deadline <= Instant::now() {
                    return Poll::Ready(Ending::IdleTimeout(timeout));
                }
                idle_timer.as_mut().reset(deadline.into());
            }
        }
        if let Some(timeout) = total {
            if total_timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ending::TotalTimeout(timeout));
            }
        }
        Poll::Pending
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
        bytes_up,
        bytes_down,
        duration: started.elapsed(),
        first_close,
        result,
    }
}
