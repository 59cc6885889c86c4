//! The accept loop: TCP listener → [`Conn`] → an inbound service, one task per connection.
//!
//! [`Server`] applies socket options (`TCP_NODELAY`, keepalive; on Linux once, on the
//! listener, whose accepted sockets inherit them), records [`LocalAddr`],
//! [`PeerAddr`], [`ConnectionId`] and [`AcceptedAt`] metadata, runs each connection in its
//! own `tracing` span, survives accept errors such as `EMFILE` (it backs off and logs) and
//! panics inside a connection (caught, logged, counted), and drains gracefully.
//!
//! **Connection limit:** when `max_connections` connections are open the loop *stops
//! accepting* until one closes. Excess clients wait in the kernel's listen backlog, which is
//! kinder than accept-and-close (clients retry on their own, no RST storm) and costs no file
//! descriptors.
//!
//! **Drain:** when the [`drain::Watch`] fires the listener is closed (new connects are
//! refused), live connections are left to finish (they see the same watch in their metadata
//! and may wind down, e.g. HTTP `GOAWAY`), and after [`Server::drain_timeout`] the rest are
//! aborted. `serve` returns once every connection task has ended.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::Service;
use tracing::{debug, info_span, warn, Instrument};

use crate::conn::{AcceptedAt, Conn, ConnectionId, LocalAddr, PeerAddr};
use crate::{drain, BoxError};

/// Accept-loop configuration. `Server::new()` has production defaults.
#[derive(Debug, Clone)]
pub struct Server {
    max_connections: usize,
    nodelay: bool,
    keepalive: Option<Duration>,
    drain_timeout: Duration,
    stats: Arc<ServeStats>,
}

/// Counters an accept loop keeps; share them with an admin endpoint via [`Server::stats`].
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections currently open.
    pub active: AtomicU64,
    /// Connection tasks whose service returned an error.
    pub errors: AtomicU64,
    /// Connection tasks that panicked (the loop survives them).
    pub panics: AtomicU64,
    /// Connection tasks aborted because the drain deadline passed.
    pub aborted: AtomicU64,
    /// Accept calls that failed (e.g. `EMFILE`).
    pub accept_errors: AtomicU64,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// Defaults: 100 000 connections, `TCP_NODELAY` on, keepalive after 60 s idle, 30 s drain.
    pub fn new() -> Self {
        Self {
            max_connections: 100_000,
            nodelay: true,
            keepalive: Some(Duration::from_secs(60)),
            drain_timeout: Duration::from_secs(30),
            stats: Arc::default(),
        }
    }

    /// Most connections open at once; at the limit the loop stops accepting.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Sets `TCP_NODELAY` on accepted sockets (default on: proxies forward what they get).
    ///
    /// On Linux this option and [`tcp_keepalive`](Self::tcp_keepalive) are set once on the
    /// listener passed to [`serve`](Self::serve) (the kernel copies them to each accepted
    /// socket), not per connection; `false` leaves the listener's own setting alone.
    pub fn tcp_nodelay(mut self, on: bool) -> Self {
        self.nodelay = on;
        self
    }

    /// TCP keepalive idle time for accepted sockets (`None` disables keepalive).
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.keepalive = idle;
        self
    }

    /// How long live connections may keep running after drain starts before they are
    /// aborted.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The counters this server updates.
    pub fn stats(&self) -> Arc<ServeStats> {
        self.stats.clone()
    }

    /// Runs the accept loop until `drain` fires and every connection has ended.
    pub async fn serve<S>(
        &self,
        listener: TcpListener,
        service: S,
        drain: drain::Watch,
    ) -> io::Result<()>
    where
        S: Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let local = listener.local_addr()?;
        // Socket options set once on the listener reach every accepted socket (Linux copies
        // them at accept), which saves four setsockopt calls per connection.
        let mut per_connection_options = !self.configure_listener(&listener);
        // Connections that completed their handshake before that were cloned from the
        // listener without the options: take them off the queue now and configure each.
        let mut early = std::collections::VecDeque::new();
        // (Nothing to take when there are no options to set.)
        let has_options = self.nodelay || self.keepalive.is_some();
        if has_options && !per_connection_options {
            per_connection_options = !take_backlog(&listener, self.max_connections, &mut early);
        }
        // The address a client dialled is the listener's own unless the listener is a
        // wildcard or transparent one: only then ask the kernel per connection.
        let fixed_local = fixed_local_addr(&listener, local);
        // The listener's address goes in a span made once, the parent of every connection's
        // span: a span's fields are formatted when it is created (by `tracing-subscriber`'s
        // fmt layer), and formatting an address per connection cost ~2.7k instructions of
        // a relayed connection's ~44k.
        let listener_span = info_span!("listener", local.addr = %local);
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let mut tasks = JoinSet::new();
        let mut backoff = Duration::from_millis(5);

        loop {
            reap(&mut tasks, &self.stats);
            let permit = tokio::select! {
                biased;
                () = drain.signaled() => break,
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (stream, peer, configured) = if let Some((stream, peer)) = early.pop_front() {
                (stream, peer, false)
            } else {
                let (stream, peer) = tokio::select! {
                    biased;
                    () = drain.signaled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) if is_per_connection(&e) => continue,
                        Err(e) => {
                            // EMFILE/ENFILE/ENOBUFS: the pending connection stays in the backlog;
                            // retrying at once would spin, so back off (capped at 1 s).
                            self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                            warn!(%local, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                            drop(permit);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                            continue;
                        }
                    },
                };
                (stream, peer, !per_connection_options)
            };
            backoff = Duration::from_millis(5);
            if !configured {
                self.configure(&stream);
            }

            // The socket's own address: on a wildcard listener (0.0.0.0, [::]) it is the
            // address the client dialled, which policies (HBONE's local-IP check) and
            // PROXY headers need; the listener's address would say 0.0.0.0.
            let dialled = match fixed_local {
                Some(addr) => addr,
                None => stream.local_addr().unwrap_or(local),
            };
            let id = ConnectionId::next();
            let mut conn = Conn::new(stream);
            conn.insert(LocalAddr(dialled));
            conn.insert(PeerAddr(peer));
            conn.insert(id);
            conn.insert(AcceptedAt(Instant::now()));
            conn.insert(drain.clone());

            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            self.stats.active.fetch_add(1, Ordering::Relaxed);
            let span = info_span!(parent: &listener_span, "conn", id = id.0, peer.addr = %peer);
            // Captured as they are, not moved into locals: an `async` block keeps its
            // captures and its locals apart, so a rebinding would store each twice.
            let mut service = service.clone();
            let stats = self.stats.clone();
            let inner_fut = async move {
                let _active = ActiveGuard(&stats);
                let _permit = &permit;
                let ready: Result<(), BoxError> = std::future::poll_fn(|cx| service.poll_ready(cx))
                    .await
                    .map_err(Into::into);
                let result = match ready {
                    Ok(()) => service.call(conn).await.map_err(Into::into),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    debug!(error = %crate::error_chain::DisplayChain(&*e), "connection ended with error");
                }
            };
            // Inline (`task::serving` stores it once): one allocation per connection, the
            // task's.
            tasks.spawn(crate::task::serving(self.stats.clone(), inner_fut).instrument(span));
        }

        drop(listener);
        debug!(%local, open = tasks.len(), "draining");
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while let Some(done) = tasks.join_next().await {
                account(done, &self.stats);
            }
        })
        .await;
        if drained.is_err() {
            warn!(%local, open = tasks.len(), "drain deadline passed; aborting connections");
            self.stats
                .aborted
                .fetch_add(tasks.len() as u64, Ordering::Relaxed);
            tasks.abort_all();
            while let Some(done) = tasks.join_next().await {
                account(done, &self.stats);
            }
        }
        Ok(())
    }

    /// Sets the accepted sockets' options on the listener itself, where the kernel copies
    /// them to each socket it accepts (Linux does for `TCP_NODELAY` and the keepalive
    /// settings). Returns whether that worked; if not, [`configure`](Self::configure) sets
    /// them on every accepted socket as before.
    #[cfg(target_os = "linux")]
    fn configure_listener(&self, listener: &TcpListener) -> bool {
        let sock = socket2::SockRef::from(listener);
        let mut ok = true;
        if self.nodelay {
            if let Err(e) = sock.set_tcp_nodelay(true) {
                debug!(error = %e, "TCP_NODELAY on the listener; setting it per connection");
                ok = false;
            }
        }
        if let Some(idle) = self.keepalive {
            let params = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(Duration::from_secs(10));
            if let Err(e) = sock.set_tcp_keepalive(&params) {
                debug!(error = %e, "SO_KEEPALIVE on the listener; setting it per connection");
                ok = false;
            }
        }
        ok
    }

    /// Elsewhere accepted sockets may not inherit the listener's options: set them on
    /// each one.
    #[cfg(not(target_os = "linux"))]
    fn configure_listener(&self, _: &TcpListener) -> bool {
        false
    }

    fn configure(&self, stream: &TcpStream) {
        if self.nodelay {
            if let Err(e) = stream.set_nodelay(true) {
                debug!(error = %e, "TCP_NODELAY");
            }
        }
        if let Some(idle) = self.keepalive {
            let params = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(Duration::from_secs(10));
            if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
                debug!(error = %e, "SO_KEEPALIVE");
            }
        }
    }
}

impl Server {
    /// Serves every listener with `service` until `shutdown` completes, then drains them
    /// all (no new connections; live ones get [`drain_timeout`](Self::drain_timeout)) and
    /// returns once every accept loop has ended. An accept loop that fails ends the whole
    /// thing the same way; its error is returned.
    ///
    /// `shutdown` is any future: usually [`ShutdownSignal::recv`](drain::ShutdownSignal)
    /// (SIGTERM or Ctrl-C). For several services on one drain, use [`drain::channel`] and
    /// [`Server::serve`] per listener; where nothing should ever drain, pass
    /// [`drain::Watch::never()`] to `serve`.
    ///
    /// ```no_run
    /// use proxystack::drain::ShutdownSignal;
    /// use proxystack::{tcp, Server, Target};
    /// # async fn run() -> std::io::Result<()> {
    /// let relay = tcp::Relay::new(tcp::TcpConnector::new()).to(Target::from_static("127.0.0.1:8080"));
    /// let listeners = vec![tokio::net::TcpListener::bind("0.0.0.0:9000").await?];
    /// let shutdown = ShutdownSignal::install()?; // before announcing readiness
    /// eprintln!("listening on 0.0.0.0:9000");
    /// Server::new().serve_until(listeners, relay, shutdown.recv()).await
    /// # }
    /// ```
    pub async fn serve_until<S>(
        &self,
        listeners: Vec<TcpListener>,
        service: S,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> io::Result<()>
    where
        S: Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let (signal, watch) = drain::channel();
        let mut loops = JoinSet::new();
        for listener in listeners {
            let (server, service, watch) = (self.clone(), service.clone(), watch.clone());
            loops.spawn(async move { server.serve(listener, service, watch).await });
        }
        drop(watch);
        let mut result = Ok(());
        let mut keep = |done: Result<io::Result<()>, tokio::task::JoinError>| match done {
            Ok(Err(e)) if result.is_ok() => result = Err(e),
            Err(e) if result.is_ok() => result = Err(io::Error::other(e)),
            _ => {}
        };
        tokio::select! {
            () = shutdown => tracing::info!("shutting down; draining"),
            Some(done) = loops.join_next() => keep(done),
        }
        signal.start();
        while let Some(done) = loops.join_next().await {
            keep(done);
        }
        signal.drain().await;
        result
    }
}

/// Runs [`Server::new()`]'s accept loop; see [`Server::serve`].
pub async fn serve<S>(listener: TcpListener, service: S, drain: drain::Watch) -> io::Result<()>
where
    S: Service<Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    Server::new().serve(listener, service, drain).await
}

/// Accepts, without waiting, the connections already queued on `listener` (at most
/// `limit`) into `early`, as sockets of this runtime. Returns whether the queue was
/// emptied; if not (more than `limit`, or an accept error), the caller must configure every
/// socket it accepts itself.
#[cfg(target_os = "linux")]
fn take_backlog(
    listener: &TcpListener,
    limit: usize,
    early: &mut std::collections::VecDeque<(TcpStream, SocketAddr)>,
) -> bool {
    let sock = socket2::SockRef::from(listener);
    // tokio's listener is non-blocking: accept fails with WouldBlock once the queue is
    // empty. The loop is bounded by `limit` (and the kernel's backlog).
    while early.len() < limit {
        let taken = sock.accept().and_then(|(socket, peer)| {
            socket.set_nonblocking(true)?;
            let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
            Ok((stream, peer.as_socket()))
        });
        match taken {
            Ok((stream, Some(peer))) => early.push_back((stream, peer)),
            Ok((_, None)) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                debug!(error = %e, "accepting the early backlog; configuring sockets one by one");
                return false;
            }
        }
    }
    false
}

#[cfg(not(target_os = "linux"))]
fn take_backlog(
    _: &TcpListener,
    _: usize,
    _: &mut std::collections::VecDeque<(TcpStream, SocketAddr)>,
) -> bool {
    false
}

/// The local address of every socket `listener` accepts, when it is known without asking:
/// a listener bound to one address (not a wildcard) that is not transparent (`TPROXY`
/// hands it connections for other addresses) accepts only connections to that address.
fn fixed_local_addr(listener: &TcpListener, local: SocketAddr) -> Option<SocketAddr> {
    if local.ip().is_unspecified() {
        return None;
    }
    #[cfg(target_os = "linux")]
    {
        let sock = socket2::SockRef::from(listener);
        let transparent = match local {
            SocketAddr::V4(_) => sock.ip_transparent_v4(),
            SocketAddr::V6(_) => sock.ip_transparent_v6(),
        };
        // In doubt, ask per connection.
        if transparent.unwrap_or(true) {
            return None;
        }
        Some(local)
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Other systems have their own ways to accept for foreign addresses: ask.
        let _ = listener;
        None
    }
}

struct ActiveGuard<'a>(&'a ServeStats);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn reap(tasks: &mut JoinSet<()>, stats: &ServeStats) {
    while let Some(done) = tasks.try_join_next() {
        account(done, stats);
    }
}

fn account(done: Result<(), tokio::task::JoinError>, stats: &ServeStats) {
    if let Err(e) = done {
        if e.is_panic() {
            stats.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "connection task panicked");
        }
    }
}

/// Errors that concern one pending connection, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Whether an I/O error only says the peer has gone (closed or reset the connection, or the
/// write of a last frame found it gone): the end of a connection, not a failure of it.
#[cfg(any(feature = "http", feature = "connect"))]
pub(crate) fn peer_gone(e: Option<&io::Error>) -> bool {
    e.is_some_and(|e| {
        matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::NotConnected
        )
    })
}
