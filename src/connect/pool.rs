//! Pooled, multiplexed HTTP/2 CONNECT: many tunnels per connection (ztunnel's pool), on
//! the `h2` crate directly so that each tunnel is an [`H2Stream`] that can be reset.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::{Service, ServiceExt};
use tracing::debug;

use super::keepalive;
use super::stream::H2Stream;
use super::{ConnectAuthority, ConnectHeaders, ConnectResponse, TunnelError};
use crate::admission::Abort;
use crate::conn::{Conn, CredentialsCurrent};
use crate::io::Io;
use crate::{BoxError, H2Config, Target};

/// Target metadata: which pooled connections a tunnel may share. Tunnels with equal keys
/// share connections; without one the key is the dialled address. HBONE keys on (source
/// identity, destination identities, next hop).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey(pub String);

/// HTTP/2 client settings; defaults follow ztunnel's HBONE client.
#[derive(Debug, Clone)]
pub(crate) struct H2Settings {
    /// Most tunnels per connection; the peer's MAX_CONCURRENT_STREAMS (ztunnel advertises
    /// 200, Envoy 100) caps it further once its SETTINGS arrived.
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
    /// A connection without tunnels for this long is closed (`None`: kept).
    pub idle_timeout: Option<Duration>,
    /// Time allowed for the 200 after the CONNECT was sent (`None`: no limit).
    pub response_timeout: Option<Duration>,
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
            idle_timeout: Some(Duration::from_secs(300)),
            response_timeout: Some(Duration::from_secs(30)),
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
/// * Idle connections close after `idle_timeout`; PING keepalive drops dead ones (a PING
///   unanswered for the keepalive timeout closes the connection and fails its tunnels). A
///   connection that leaves a CONNECT unanswered for `response_timeout` gets no new
///   tunnels, so a silently dead peer is left behind even without keepalive.
/// * Each tunnel is a [`PooledTunnel`] over an [`H2Stream`]: shutting it down sends
///   `END_STREAM`; its connection's metadata carries its [`Abort`] handle, so a
///   [`tcp::Relay`](crate::tcp::Relay) whose other side failed makes it end with
///   `RST_STREAM(CONNECT_ERROR)`, and a peer's `RST_STREAM(CONNECT_ERROR)` reads as a reset.
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
    sender: SendRequest<Bytes>,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
    metadata: http::Extensions,
}

impl PooledConn {
    /// Whether new streams may go on this connection: its task still runs and it has
    /// neither received a GOAWAY nor failed (h2 then refuses new streams at once).
    /// Nor was it made with credentials that have since been replaced (a rotated client
    /// certificate): it then drains, and the next tunnel dials afresh.
    fn usable(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        if let Some(credentials) = self.metadata.get::<CredentialsCurrent>() {
            if !credentials.is_current() {
                return false;
            }
        }
        let mut probe = self.sender.clone();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        !matches!(probe.poll_ready(&mut cx), Poll::Ready(Err(_)))
    }

    /// Claims one stream slot, if the connection has one: at most `cap`, and at most the
    /// peer's MAX_CONCURRENT_STREAMS.
    fn reserve(self: &Arc<Self>, cap: usize) -> Option<StreamGuard> {
        if !self.usable() {
            return None;
        }
        let cap = cap.min(self.sender.current_max_send_streams());
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
    /// A pool over `connector`. Defaults follow ztunnel's HBONE client: 4 MiB stream and
    /// 16 MiB connection windows, 1 MiB frames, a 16 KiB response header list, at most 100
    /// tunnels per connection, a PING every 10 s answered within 20 s, idle connections
    /// closed after 300 s, 30 s for the answer to a CONNECT.
    pub fn new(connector: C) -> Self {
        Self {
            connector,
            settings: Arc::new(H2Settings::default()),
            pooled: true,
            shared: Arc::default(),
        }
    }

    fn with_settings(mut self, f: impl FnOnce(&mut H2Settings)) -> Self {
        f(Arc::make_mut(&mut self.settings));
        self
    }

    /// HTTP/2 settings; what `h2` leaves unset keeps the defaults (see [`new`](Self::new)).
    /// `max_concurrent_streams` is the most tunnels one pooled connection carries.
    pub fn h2(self, h2: H2Config) -> Self {
        self.with_settings(|s| {
            if let Some(n) = h2.max_concurrent_streams {
                s.max_streams_per_connection = usize::try_from(n).unwrap_or(usize::MAX).max(1);
            }
            s.stream_window = h2.stream_window.unwrap_or(s.stream_window);
            s.connection_window = h2.connection_window.unwrap_or(s.connection_window);
            s.max_frame_size = h2.max_frame_size.unwrap_or(s.max_frame_size);
            s.max_header_list_size = h2.max_header_list_size.unwrap_or(s.max_header_list_size);
            s.keepalive = h2.keep_alive_over(s.keepalive);
        })
    }

    /// Close a pooled connection after it carried no tunnel for this long (default 300 s;
    /// `None`: keep it until the peer closes it).
    pub fn idle_timeout(self, timeout: Option<Duration>) -> Self {
        self.with_settings(|s| s.idle_timeout = timeout)
    }

    /// How long to wait for the answer to a CONNECT (default 30 s; `None`: no limit). A
    /// connection that leaves one unanswered takes no new tunnels.
    pub fn response_timeout(self, timeout: Option<Duration>) -> Self {
        self.with_settings(|s| s.response_timeout = timeout)
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
        let Some(idle) = self.settings.idle_timeout else {
            return;
        };
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        crate::task::spawn(async move {
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
        let mut builder = h2::client::Builder::new();
        builder
            .enable_push(false)
            .initial_window_size(keepalive::window(s.stream_window))
            .initial_connection_window_size(keepalive::window(s.connection_window))
            .max_frame_size(keepalive::frame_size(s.max_frame_size))
            .max_header_list_size(s.max_header_list_size)
            .max_send_buffer_size(s.stream_window as usize);
        let (sender, mut connection) =
            builder
                .handshake::<_, Bytes>(io)
                .await
                .map_err(|source| TunnelError::Handshake {
                    context:
                        "HTTP/2 handshake with the proxy failed (if it closed right after the TLS \
                      handshake, it may have rejected our client certificate)",
                    source: source.into(),
                })?;
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        let ping_pong = connection.ping_pong();
        let keepalive = s.keepalive;
        crate::task::spawn(async move {
            let keepalive = keepalive::maybe_keepalive(ping_pong, keepalive);
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        debug!(error = %e, "pooled HTTP/2 connection ended");
                    }
                }
                failure = keepalive => {
                    // Dropping the connection fails its streams: their relays reset.
                    debug!(error = %failure, "pooled HTTP/2 connection dropped");
                }
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
                .body(())
                .map_err(TunnelError::InvalidRequest)?;
            req.headers_mut().extend(headers.0.clone());
            let sender = conn.sender.clone();
            let sent = async {
                let mut sender = sender.ready().await?;
                // No END_STREAM: the request's DATA frames are the tunnel's upstream bytes.
                let (response, send) = sender.send_request(req, false)?;
                Ok::<_, h2::Error>((response.await?, send))
            };
            let limit = self.settings.response_timeout;
            let answered = match limit {
                Some(limit) => tokio::time::timeout(limit, sent).await,
                None => Ok(sent.await),
            };
            let (response, send) = match answered {
                Err(_) => {
                    // No answer at all: the peer may be gone without a trace (a stale
                    // half-open connection, ztunnel#1637), which only a keepalive PING
                    // would otherwise reveal. New tunnels go to a fresh connection; the
                    // ones already open here carry on.
                    conn.closed.store(true, Ordering::Release);
                    return Err(TunnelError::Timeout(limit.unwrap_or_default()));
                }
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    // GOAWAY, a dead connection, or a stream the server refused unseen
                    // (REFUSED_STREAM): safe to try once more, on another connection.
                    let gone = !conn.usable() || e.is_go_away() || e.is_io();
                    if gone {
                        conn.closed.store(true, Ordering::Release);
                    }
                    let retry = gone || e.reason() == Some(h2::Reason::REFUSED_STREAM);
                    if retry && attempt == 1 {
                        debug!(error = %e, "stream not opened; retrying on a fresh connection");
                        continue;
                    }
                    return Err(if gone {
                        TunnelError::PeerClosed(e.into())
                    } else {
                        TunnelError::Request(e.into())
                    });
                }
            };
            if response.status() != StatusCode::OK {
                // Dropping `send` and the response cancels the stream (RST_STREAM(CANCEL)).
                return Err(TunnelError::refused(response.status()));
            }
            let (parts, recv) = response.into_parts();
            let abort = Abort::new();
            let mut metadata = conn.metadata.clone();
            metadata.insert(ConnectResponse(parts.headers));
            // This tunnel's reset handle replaces any of the connection it runs over.
            metadata.insert(abort.clone());
            let tunnel = PooledTunnel {
                io: H2Stream::with_abort(send, recv, abort),
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

/// A tunnel opened by [`H2ConnectPool`]: the stream's bytes ([`H2Stream`]), holding its
/// pool slot. Its [`Conn`] metadata carries the stream's [`Abort`] handle.
pub struct PooledTunnel {
    io: H2Stream,
    _guard: StreamGuard,
}

impl PooledTunnel {
    /// The HTTP/2 stream.
    pub fn stream(&self) -> &H2Stream {
        &self.io
    }

    /// Resets the tunnel now with `RST_STREAM(CONNECT_ERROR)` (see [`H2Stream::abort`]).
    pub fn abort(&mut self) {
        self.io.abort();
    }
}

impl std::fmt::Debug for PooledTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PooledTunnel").field(&self.io).finish()
    }
}

impl crate::io::Io for PooledTunnel {
    fn h2_stream(&mut self) -> Option<&mut H2Stream> {
        Some(&mut self.io)
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
