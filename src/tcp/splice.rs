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
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;

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

/// When a byte last moved, in nanoseconds since the relay started (shared by both
/// directions without a lock).
struct Activity {
    started: Instant,
    last_nanos: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.started + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed))
    }
}

/// Copies `from` → `to` until EOF, then shuts down `to`'s write half. What moves is
/// reported to the streams' counters (`counts`: `from`'s, `to`'s), which it bypassed.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    bytes: &mut u64,
    last: &Activity,
    counts: (&DirectCount, &DirectCount),
) -> Result<(), (Side, io::Error)> {
    // Invariant: whenever control is back at the top of the loop, everything spliced
    // into the pipe has been spliced out, so a pipe given back is empty.
    let mut pipe: Option<Pipe> = None;
    loop {
        from.readable().await.map_err(|e| (Side::Downstream, e))?;
        let p = match &pipe {
            Some(p) => p,
            None => pipe.insert(take_pipe().map_err(|e| (Side::Downstream, e))?),
        };
        let n = match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), p.write.as_raw_fd(), CHUNK)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Drained for now: no pipe while idle.
                if let Some(p) = pipe.take() {
                    give_back(p);
                }
                continue;
            }
            Err(e) => return Err((Side::Downstream, e)),
        };
        if n == 0 {
            if let Some(p) = pipe.take() {
                give_back(p);
            }
            // EOF: pass the FIN on, keep the other direction going.
            return socket2::SockRef::from(to)
                .shutdown(std::net::Shutdown::Write)
                .map_err(|e| (Side::Upstream, e));
        }
        *bytes += n as u64;
        counts.0.add(n as u64, 0);
        last.touch();
        let mut left = n;
        while left > 0 {
            let r = to
                .async_io(Interest::WRITABLE, || {
                    splice(p.read.as_raw_fd(), to.as_raw_fd(), left)
                })
                .await
                .map_err(|e| (Side::Upstream, e))?;
            left -= r;
        }
        counts.1.add(0, n as u64);
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
    let last = Activity {
        started,
        last_nanos: AtomicU64::new(0),
    };
    let (mut bytes_up, mut bytes_down) = (0u64, 0u64);
    let mut first_close: Option<Close> = None;
    let (idle, total) = config.timeouts();
    let ending = {
        let upward = one_way(down, up, &mut bytes_up, &last, (&counts.0, &counts.1));
        let downward = one_way(up, down, &mut bytes_down, &last, (&counts.1, &counts.0));
        tokio::pin!(upward, downward);
        let (mut up_done, mut down_done) = (false, false);
        let total_deadline = total.map(|t| tokio::time::Instant::from_std(started + t));
        loop {
            let idle_deadline = idle.map(|t| tokio::time::Instant::from_std(last.last() + t));
            tokio::select! {
                r = &mut upward, if !up_done => match r {
                    Ok(()) => {
                        up_done = true;
                        first_close.get_or_insert(Close { side: Side::Downstream, kind: CloseKind::Eof });
                    }
                    Err((side, e)) => break Ending::Failed(side, e),
                },
                r = &mut downward, if !down_done => match r {
                    Ok(()) => {
                        down_done = true;
                        first_close.get_or_insert(Close { side: Side::Upstream, kind: CloseKind::Eof });
                    }
                    // `one_way` names its reader "downstream"; going down, that is upstream.
                    Err((side, e)) => break Ending::Failed(side.other(), e),
                },
                () = sleep_until(idle_deadline), if idle_deadline.is_some() => {
                    if let Some(t) = idle.filter(|t| last.last().elapsed() >= *t) {
                        break Ending::IdleTimeout(t);
                    }
                },
                () = sleep_until(total_deadline), if total_deadline.is_some() => {
                    break Ending::TotalTimeout(total.unwrap_or_default());
                },
            }
            if up_done && down_done {
                break Ending::Done;
            }
        }
    };
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

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
