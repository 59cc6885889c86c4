//! Pooled, multiplexed HTTP/2 CONNECT: many tunnels per connection (ztunnel's pool).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::{Service, ServiceExt};
use tracing::debug;

use super::{ConnectAuthority, ConnectHeaders, ConnectResponse, TunnelError};
use crate::conn::{Conn, Io};
use crate::{BoxError, Target};

/// Target metadata: which pooled connections a tunnel may share. Tunnels with equal keys
/// share connections; without one the key is the dialled address. HBONE keys on (source
/// identity, destination identities, next hop).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey(pub String);

/// HTTP/2 client settings; defaults follow ztunnel's HBONE client.
#[derive(Debug, Clone)]
pub struct H2Settings {
    /// Most tunnels per connection. Keep it at or below the peer's
    /// MAX_CONCURRENT_STREAMS (ztunnel advertises 200, Envoy 100): above it, extra streams
    /// wait for a free slot on that connection instead of opening another.
    pub max_streams_per_connection: usize,
    /// Per-stream flow-control window.
    pub stream_window: u32,
    /// Per-connection flow-control window.
    pub connection_window: u32,
    /// Largest frame we accept.
    pub max_frame_size: u32,
    /// Largest response header list we accept.
    pub max_header_list_size: u32,
    /// PING interval and the time to wait for the answer.
    pub keepalive: Option<(Duration, Duration)>,
    /// A connection without tunnels for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for the 200 after the CONNECT was sent.
    pub response_timeout: Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            max_header_list_size: 16 << 10,
            keepalive: Some((Duration::from_secs(10), Duration::from_secs(20))),
            idle_timeout: Duration::from_secs(300),
            response_timeout: Duration::from_secs(30),
        }
    }
}

/// Opens CONNECT tunnels as streams of pooled HTTP/2 connections made with any connector.
///
/// * One connection per [`PoolKey`] carries up to `max_streams_per_connection` tunnels;
///   past that a second connection opens.
/// * Concurrent first tunnels to one key share one handshake (a per-key dial lock).
/// * Closed or `GOAWAY`'d connections are skipped; a tunnel that fails because its
///   connection went away is retried once on a fresh one.
/// * Idle connections close after `idle_timeout`; PING keepalive drops dead ones.
///
/// The dialled address is the [`Target`]'s; the `:authority` requested is its
/// [`ConnectAuthority`] (default: the same). [`H2ConnectPool::unpooled`] gives every
/// tunnel its own connection (double HBONE's inner hop).
///
/// ```
/// use proxystack::connect::{ConnectAuthority, H2ConnectPool};
/// use proxystack::{tcp::TcpConnector, Authority, Target};
/// let pool = H2ConnectPool::new(TcpConnector::new());
/// let target = Target::from_static("127.0.0.1:15008")
///     .with(ConnectAuthority(Authority::parse("10.0.0.7:8080").unwrap()));
/// # let _ = (pool, target);
/// ```
pub struct H2ConnectPool<C> {
    connector: C,
    settings: Arc<H2Settings>,
    pooled: bool,
    shared: Arc<Shared>,
}

impl<C: Clone> Clone for H2ConnectPool<C> {
    fn clone(&self) -> Self {
        Self {
            connector: self.connector.clone(),
            settings: self.settings.clone(),
            pooled: self.pooled,
            shared: self.shared.clone(),
        }
    }
}

impl<C> std::fmt::Debug for H2ConnectPool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2ConnectPool")
            .field("pooled", &self.pooled)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    conns: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    dial_locks: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    reaper_started: AtomicBool,
    dials: AtomicUsize,
}

struct PooledConn {
    sender: SendRequest<Empty<Bytes>>,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
    metadata: http::Extensions,
}

impl PooledConn {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && !self.sender.is_closed()
    }

    /// Claims one stream slot, if the connection has one.
    fn reserve(self: &Arc<Self>, cap: usize) -> Option<StreamGuard> {
        if !self.usable() {
            return None;
        }
        let mut n = self.active.load(Ordering::Acquire);
        loop {
            if n >= cap {
                return None;
            }
            match self
                .active
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(StreamGuard(self.clone())),
                Err(actual) => n = actual,
            }
        }
    }
}

/// Holds a stream slot (and, for unpooled tunnels, the connection itself).
struct StreamGuard(Arc<PooledConn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

impl<C> H2ConnectPool<C> {
    /// A pool over `connector` with [`H2Settings::default`].
    pub fn new(connector: C) -> Self {
        Self::with_settings(connector, H2Settings::default())
    }

    /// A pool with explicit settings.
    pub fn with_settings(connector: C, settings: H2Settings) -> Self {
        Self {
            connector,
            settings: Arc::new(settings),
            pooled: true,
            shared: Arc::default(),
        }
    }

    /// A connector that opens a fresh HTTP/2 connection for every tunnel and closes it with
    /// the tunnel (no sharing: for inner hops that must not pin to one backend).
    pub fn unpooled(connector: C) -> Self {
        Self {
            pooled: false,
            ..Self::new(connector)
        }
    }

    /// HTTP/2 connections dialled so far (for tests and metrics).
    pub fn connections_dialled(&self) -> usize {
        self.shared.dials.load(Ordering::Relaxed)
    }

    fn checkout(&self, key: &PoolKey) -> Option<(Arc<PooledConn>, StreamGuard)> {
        let mut conns = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| c.usable());
        list.iter().find_map(|c| {
            c.reserve(self.settings.max_streams_per_connection)
                .map(|g| (c.clone(), g))
        })
    }

    fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .shared
            .dial_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        locks.entry(key.clone()).or_default().clone()
    }

    fn start_reaper(&self) {
        if self.shared.reaper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let idle = self.settings.idle_timeout;
        tokio::spawn(async move {
            let period = (idle / 4).max(Duration::from_millis(100));
            loop {
                tokio::time::sleep(period).await;
                let Some(shared) = weak.upgrade() else { return };
                let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
                for list in conns.values_mut() {
                    list.retain(|c| {
                        let idle_for = c.idle_since.lock().map(|t| t.elapsed()).unwrap_or_default();
                        c.usable() && !(c.active.load(Ordering::Acquire) == 0 && idle_for >= idle)
                    });
                }
                conns.retain(|_, list| !list.is_empty());
            }
        });
    }
}

impl<C, O> H2ConnectPool<C>
where
    C: Service<Target, Response = Conn<O>> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    O: Io,
{
    async fn dial(&self, target: Target) -> Result<Arc<PooledConn>, TunnelError> {
        let conn = self
            .connector
            .clone()
            .oneshot(target)
            .await
            .map_err(|e| TunnelError::Connect(e.into()))?;
        let (io, metadata) = conn.into_parts();
        let s = &self.settings;
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .adaptive_window(false)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(s.max_header_list_size)
            .max_send_buf_size(s.stream_window as usize)
            .keep_alive_interval(s.keepalive.map(|k| k.0))
            .keep_alive_while_idle(true);
        if let Some((_, timeout)) = s.keepalive {
            builder.keep_alive_timeout(timeout);
        }
        let (sender, connection) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| TunnelError::Handshake {
                context:
                    "HTTP/2 handshake with the proxy failed (if it closed right after the TLS \
                      handshake, it may have rejected our client certificate)",
                source,
            })?;
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "pooled HTTP/2 connection ended");
            }
            done.store(true, Ordering::Release);
        });
        self.shared.dials.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(PooledConn {
            sender,
            active: AtomicUsize::new(0),
            closed,
            idle_since: Mutex::new(Instant::now()),
            metadata,
        }))
    }

    async fn acquire(
        &self,
        key: &PoolKey,
        target: &Target,
    ) -> Result<(Arc<PooledConn>, StreamGuard), TunnelError> {
        if !self.pooled {
            let conn = self.dial(target.clone()).await?;
            let guard = conn.reserve(usize::MAX).ok_or_else(closed_early)?;
            return Ok((conn, guard));
        }
        if let Some(found) = self.checkout(key) {
            return Ok(found);
        }
        // One dial per key at a time: a burst of first tunnels shares one handshake.
        let lock = self.dial_lock(key);
        let _dialling = lock.lock().await;
        if let Some(found) = self.checkout(key) {
            return Ok(found);
        }
        let conn = self.dial(target.clone()).await?;
        let guard = conn
            .reserve(self.settings.max_streams_per_connection)
            .ok_or_else(closed_early)?;
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        self.start_reaper();
        Ok((conn, guard))
    }

    async fn open(&self, target: Target) -> Result<Conn<PooledTunnel>, TunnelError> {
        let authority = target
            .get::<ConnectAuthority>()
            .map(|a| a.0.clone())
            .unwrap_or_else(|| target.authority().clone());
        let key = target
            .get::<PoolKey>()
            .cloned()
            .unwrap_or_else(|| PoolKey(target.authority().to_string()));
        let headers = target.get::<ConnectHeaders>().cloned().unwrap_or_default();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (conn, guard) = self.acquire(&key, &target).await?;
            let mut req = Request::builder()
                .method(Method::CONNECT)
                .uri(authority.to_string())
                .version(http::Version::HTTP_2)
                .body(Empty::<Bytes>::new())
                .map_err(TunnelError::InvalidRequest)?;
            req.headers_mut().extend(headers.0.clone());
            let mut sender = conn.sender.clone();
            let sent = async {
                sender.ready().await?;
                sender.send_request(req).await
            };
            let response = match tokio::time::timeout(self.settings.response_timeout, sent).await {
                Err(_) => return Err(TunnelError::Timeout(self.settings.response_timeout)),
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    // GOAWAY or a dead connection: that connection is done; try once more.
                    let gone = !conn.usable() || e.is_closed() || e.is_canceled();
                    if gone {
                        conn.closed.store(true, Ordering::Release);
                    }
                    if gone && attempt == 1 {
                        debug!(error = %e, "pooled connection unusable; retrying on a fresh one");
                        continue;
                    }
                    return Err(if gone {
                        TunnelError::PeerClosed(e)
                    } else {
                        TunnelError::Request(e)
                    });
                }
            };
            if response.status() != StatusCode::OK {
                return Err(TunnelError::refused(response.status()));
            }
            let response_headers = response.headers().clone();
            let upgraded = hyper::upgrade::on(response)
                .await
                .map_err(TunnelError::Request)?;
            let mut metadata = conn.metadata.clone();
            metadata.insert(ConnectResponse(response_headers));
            let tunnel = PooledTunnel {
                io: TokioIo::new(upgraded),
                _guard: guard,
            };
            return Ok(Conn::from_parts(tunnel, metadata));
        }
    }
}

fn closed_early() -> TunnelError {
    TunnelError::Connect(Box::new(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "HTTP/2 connection closed before its first stream",
    )))
}

impl<C, O> Service<Target> for H2ConnectPool<C>
where
    C: Service<Target, Response = Conn<O>> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    O: Io,
{
    type Response = Conn<PooledTunnel>;
    type Error = TunnelError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn<PooledTunnel>, TunnelError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.open(target).await })
    }
}

/// A tunnel opened by [`H2ConnectPool`]: the stream's bytes, holding its pool slot.
pub struct PooledTunnel {
    io: TokioIo<Upgraded>,
    _guard: StreamGuard,
}

impl std::fmt::Debug for PooledTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PooledTunnel")
    }
}

impl AsyncRead for PooledTunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledTunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
