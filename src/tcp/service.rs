//! [`Relay`]: the terminal L4 service.

#[cfg(target_os = "linux")]
use crate::io::DirectCount;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Service, ServiceExt};
use tracing::{debug, warn};

use super::relay::{relay_with, RelayConfig, RelayError, Side};
use crate::admission::{refusal_for, Abort, Admission, Refusal};
use crate::conn::{Conn, Metadata};
use crate::io::Io;
use crate::{BoxError, Target};

/// Relays each connection to an upstream chosen from its metadata.
///
/// The upstream function sees the connection's [`Metadata`] (peer, original destination,
/// SNI, tunnel authority…) and returns the [`Target`], or `None` to close the connection. Any
/// connector works: plain TCP, TLS, a CONNECT tunnel, HBONE.
///
/// When the connection came through a tunnel whose terminator waits for an
/// [`Admission`], the relay admits it only after the upstream connected, and otherwise
/// refuses with the reason (so an HBONE client gets 503 for a refused upstream, not 200
/// followed by a close). An upstream that is one of the process's own listeners (a
/// connector with [`TcpConnector::own_listeners`](super::TcpConnector::own_listeners))
/// is refused as [`Refusal::Loop`] (503) with a `warn` event; without a tunnel, the
/// connection is closed.
///
/// When one side fails (a reset, an I/O error), the other side is reset too: a TCP socket
/// with `SO_LINGER 0`, a stream that is not a socket (an HTTP/2 tunnel) through the
/// [`Abort`] handle in its connection's metadata. A clean end on both sides closes both
/// cleanly (FIN, `END_STREAM`).
///
/// ```
/// use proxystack::conn::Metadata;
/// use proxystack::{tcp, Conn, Target};
/// use std::time::Duration;
/// let relay = tcp::Relay::new(tcp::TcpConnector::new())
///     .upstream(|_: &Metadata| Some(Target::from_static("127.0.0.1:8080")))
///     .idle_timeout(Some(Duration::from_secs(300)));
/// # let _ = relay;
/// ```
#[derive(Debug, Clone)]
pub struct Relay<C, U = ()> {
    connector: C,
    upstream: U,
    config: RelayConfig,
}

impl<C> Relay<C> {
    /// A relay over `connector`; set the upstream with [`Relay::upstream`].
    pub fn new(connector: C) -> Self {
        Self {
            connector,
            upstream: (),
            config: RelayConfig::default(),
        }
    }
}

impl<C, U> Relay<C, U> {
    /// Relays every connection to one fixed `target`: the shorthand for
    /// `.upstream(move |_| Some(target.clone()))`.
    ///
    /// ```
    /// use proxystack::{tcp, Target};
    /// let relay = tcp::Relay::new(tcp::TcpConnector::new()).to(Target::from_static("127.0.0.1:5432"));
    /// # let _ = relay;
    /// ```
    pub fn to(
        self,
        target: Target,
    ) -> Relay<C, impl Fn(&Metadata) -> Option<Target> + Clone + Send + Sync + 'static> {
        self.upstream(move |_: &Metadata| Some(target.clone()))
    }

    /// Chooses the upstream for each connection.
    pub fn upstream<F>(self, upstream: F) -> Relay<C, F> {
        Relay {
            connector: self.connector,
            upstream,
            config: self.config,
        }
    }

    /// Replaces the relay settings.
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// See [`RelayConfig::idle_timeout`].
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config = self.config.idle_timeout(timeout);
        self
    }

    /// See [`RelayConfig::total_timeout`].
    pub fn total_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config = self.config.total_timeout(timeout);
        self
    }
}

/// The splice fast path when both ends are plain TCP sockets (also behind a `BoxIo` or a
/// drained replay buffer, or a deferred tunnel stream once it exists), else the copy loop
/// (which passes `Bytes` to and from an HTTP/2 tunnel stream).
async fn relay_any<I: Io, O: Io>(
    down: &mut I,
    up: &mut O,
    config: &RelayConfig,
) -> super::RelayStats {
    // A stream handed over later (a CONNECT tunnel, which exists only once the `200` is
    // written) names its socket, or its HTTP/2 stream, only then: a flush, which moves no
    // bytes, waits for it, within the relay's timeouts (past them, the copy loop ends it).
    // A stream already over a socket (a metered or TLS one) needs no wait: it exists.
    if down.raw_tcp_socket().is_none() && down.tcp_socket().is_none() {
        let _ = settle(down, config).await;
    }
    #[cfg(target_os = "linux")]
    if config.splice_enabled() && down.tcp_socket().is_some() && up.tcp_socket().is_some() {
        // Bytes a wrapper read ahead of us (hyper, with a CONNECT head) go first; then
        // the sockets are spliced.
        let (to_up, to_down) = (down.take_read_ahead(), up.take_read_ahead());
        // The counting wrappers (metrics) are bypassed from here on: they are told.
        let counts = (DirectCount::of(down), DirectCount::of(up));
        counts.0.add(to_up.len() as u64, 0);
        counts.1.add(to_down.len() as u64, 0);
        if !to_up.is_empty() || !to_down.is_empty() {
            // Boxed: a rare path (bytes behind a CONNECT head) that would otherwise make
            // every relay's future, and so every idle connection, larger.
            if let Err(stats) = Box::pin(pass_on(down, up, &to_up, &to_down, config)).await {
                return stats;
            }
        }
        if let (Some(d), Some(u)) = (down.raw_tcp_socket(), up.raw_tcp_socket()) {
            // Each path's future is boxed on its own: inline, this future would be as large
            // as the larger of the two (the splice one, with its timers and readiness
            // futures), and a copy-loop connection would carry the splice path's size for
            // its whole life.
            let mut stats = Box::pin(super::splice::splice_relay(d, u, config, &counts)).await;
            stats.bytes_up += to_up.len() as u64;
            stats.bytes_down += to_down.len() as u64;
            return stats;
        }
        if !to_up.is_empty() || !to_down.is_empty() {
            // Unreachable by `take_read_ahead`'s contract (bytes only for a stream
            // that then is its socket); the copy loop goes on after the bytes passed.
            let mut stats = Box::pin(relay_with(down, up, config)).await;
            stats.bytes_up += to_up.len() as u64;
            stats.bytes_down += to_down.len() as u64;
            return stats;
        }
    }
    Box::pin(relay_with(down, up, config)).await
}

/// Writes bytes read ahead of the relay to the other side (both directions at once, so
/// neither waits on the other), within the idle timeout. `Err`: the relay's result.
#[cfg(target_os = "linux")]
async fn pass_on<I: Io, O: Io>(
    down: &mut I,
    up: &mut O,
    to_up: &[u8],
    to_down: &[u8],
    config: &RelayConfig,
) -> Result<(), super::RelayStats> {
    use super::relay::{finish, Ending};
    use tokio::io::AsyncWriteExt;
    let started = std::time::Instant::now();
    let (idle, _) = config.timeouts();
    let both = async {
        let (u, d) = tokio::join!(
            async { up.write_all(to_up).await.map_err(|e| (Side::Upstream, e)) },
            async {
                down.write_all(to_down)
                    .await
                    .map_err(|e| (Side::Downstream, e))
            },
        );
        u.and(d)
    };
    let ending = match idle {
        Some(t) => match tokio::time::timeout(t, both).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err((side, e))) => Ending::Failed(side, e),
            Err(_) => Ending::IdleTimeout(t),
        },
        None => match both.await {
            Ok(()) => return Ok(()),
            Err((side, e)) => Ending::Failed(side, e),
        },
    };
    let mut first_close = None;
    let result = finish(ending, &mut first_close, |side| {
        match side {
            Side::Downstream => crate::tcp::arm_reset(&*up),
            Side::Upstream => crate::tcp::arm_reset(&*down),
        };
    });
    Err(super::RelayStats {
        bytes_up: 0,
        bytes_down: 0,
        duration: started.elapsed(),
        first_close,
        result,
    })
}

/// Flushes `io` (no bytes move), within the idle timeout (else the total timeout).
async fn settle<I: Io>(io: &mut I, config: &RelayConfig) -> Option<std::io::Result<()>> {
    use tokio::io::AsyncWriteExt;
    let (idle, total) = config.timeouts();
    match idle.or(total) {
        Some(idle) => tokio::time::timeout(idle, io.flush()).await.ok(),
        None => Some(io.flush().await),
    }
}

/// Whether one more connect failure may be logged at WARN: at most 10 per second for the
/// process, the rest at DEBUG.
fn connect_warning_allowed() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    const PER_SECOND: u64 = 10;
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // High bits: the second; low 16 bits: warnings in it.
    let prev = WINDOW.load(Ordering::Relaxed);
    let (second, count) = (prev >> 16, prev & 0xffff);
    let next = if second == now {
        (now << 16) | (count + 1)
    } else {
        (now << 16) | 1
    };
    WINDOW
        .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
        && (next & 0xffff) <= PER_SECOND
}

/// Why a [`Relay`] connection ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayServiceError {
    /// The upstream function returned `None`.
    #[error("no upstream for this connection")]
    NoUpstream,
    /// Connecting to the upstream failed.
    #[error("upstream connect to {target} failed")]
    Connect {
        /// Where we tried to connect.
        target: String,
        /// The connector's error.
        #[source]
        source: BoxError,
    },
    /// The relay itself ended with an error or timeout.
    #[error("relay to {target} failed")]
    Relay {
        /// The upstream.
        target: String,
        /// What happened.
        #[source]
        source: RelayError,
    },
}

impl<C, F, I, O> Service<Conn<I>> for Relay<C, F>
where
    I: Io,
    O: Io,
    F: Fn(&Metadata) -> Option<Target>,
    C: Service<Target, Response = Conn<O>> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
{
    type Response = ();
    type Error = RelayServiceError;
    type Future = Pin<Box<dyn Future<Output = Result<(), RelayServiceError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Connector readiness is awaited per connection in `call`, so one slow upstream
        // does not stall the accept loop.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        let target = (self.upstream)(conn.metadata());
        let connector = self.connector.clone();
        let config = self.config.clone();
        let fut = async move {
            let admission = conn.get::<Admission>().cloned();
            let Some(target) = target else {
                if let Some(a) = &admission {
                    a.refuse(Refusal::Unreachable);
                }
                debug!("no upstream; closing");
                return Err(RelayServiceError::NoUpstream);
            };
            // Kept as the authority (no allocation for an IP literal) and formatted only
            // when logged or put in an error: a `String` per connection cost a format and
            // an allocation held for the connection's life.
            let name = target.authority().clone();
            let upstream = match connector.oneshot(target).await {
                Ok(upstream) => upstream,
                Err(e) => {
                    let e: BoxError = e.into();
                    let refusal = refusal_for(&*e);
                    if let Some(a) = &admission {
                        a.refuse(refusal);
                    }
                    if refusal == Refusal::Loop {
                        // Someone tried to reach the proxy through itself: worth a look.
                        warn!(upstream = %name, "upstream is one of our own listeners (a self call); closing without dialling");
                    } else if connect_warning_allowed() {
                        // Visible at the default level (a failed identity pin included),
                        // but a dead upstream under load must not flood the log.
                        let error = crate::error_chain::DisplayChain(&*e);
                        warn!(upstream = %name, %error, "upstream connect failed");
                    } else {
                        debug!(upstream = %name, error = %e, "upstream connect failed");
                    }
                    return Err(RelayServiceError::Connect {
                        target: name.to_string(),
                        source: e,
                    });
                }
            };
            if let Some(a) = &admission {
                a.admit();
            }
            // Streams that are not sockets are reset through their metadata's handle.
            let down_abort = conn.get::<Abort>().cloned();
            let up_abort = upstream.get::<Abort>().cloned();
            let (mut down, _) = conn.into_parts();
            let (mut up, _) = upstream.into_parts();
            let stats = relay_any(&mut down, &mut up, &config).await;
            if let Err(RelayError::Io { side, .. }) = &stats.result {
                let healthy = match side {
                    Side::Downstream => &up_abort,
                    Side::Upstream => &down_abort,
                };
                if let Some(abort) = healthy {
                    abort.abort();
                }
            }
            debug!(
                upstream = %name,
                bytes.up = stats.bytes_up,
                bytes.down = stats.bytes_down,
                duration_ms = stats.duration.as_millis() as u64,
                first_close = ?stats.first_close,
                "relay closed"
            );
            stats.result.map_err(|source| RelayServiceError::Relay {
                target: name.to_string(),
                source,
            })
        };
        Box::pin(fut)
    }
}
