//! Access logs: one `tracing` event per connection ([`AccessLogLayer`]) or request
//! ([`HttpAccessLogLayer`]).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use super::conn::conn_scope;
use super::find;
use super::io::{abort_handle, CountingIo, Tally};
use super::reason::FailureReason;
use super::scope::{self, Scope};
use crate::addr::Authority;
use crate::conn::{Conn, LocalAddr, OriginalDst, PeerAddr};
use crate::error_chain::DisplayChain;
use crate::identity::{PeerIdentity, SpiffeId};
use crate::io::Io;
use crate::BoxError;

/// Which way the traffic goes, from this proxy's point of view (ztunnel's `direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Towards a workload behind this proxy (HBONE inbound, a server-side proxy).
    Inbound,
    /// From a workload behind this proxy out to a destination (an outbound capture).
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// A duration as ztunnel logs it: whole milliseconds with a unit, `12ms`.
struct Millis(Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

/// What a connection's metadata says about its ends, read once when it opens.
#[derive(Debug)]
pub(crate) struct Ends {
    src: Option<SocketAddr>,
    peer_identity: Option<SpiffeId>,
    local_dst: Option<SocketAddr>,
    hbone: Option<Authority>,
}

impl Ends {
    fn of(metadata: &http::Extensions) -> Self {
        #[cfg(feature = "connect")]
        let hbone = find::<crate::connect::TunnelInfo>(metadata).map(|t| t.authority.clone());
        #[cfg(not(feature = "connect"))]
        let hbone = None;
        Self {
            src: find::<PeerAddr>(metadata).map(|p| p.0),
            peer_identity: find::<PeerIdentity>(metadata).map(|p| p.0.clone()),
            local_dst: find::<OriginalDst>(metadata)
                .map(|d| d.0)
                .or_else(|| metadata.get::<LocalAddr>().map(|l| l.0)),
            hbone,
        }
    }
}

/// Identities and addresses to log, resolved for the direction.
struct Resolved<'a> {
    src_identity: Option<&'a SpiffeId>,
    dst_identity: Option<&'a SpiffeId>,
    dst_addr: Option<String>,
    hbone: Option<&'a Authority>,
}

fn resolve<'a>(
    direction: Direction,
    own: Option<&'a SpiffeId>,
    ends: &'a Ends,
    scope: &'a Scope,
    connection: bool,
) -> Resolved<'a> {
    let dial = scope.dial();
    let dst_addr = dial
        .and_then(|d| d.peer.map(|p| p.to_string()))
        .or_else(|| dial.map(|d| d.authority.to_string()))
        .or_else(|| {
            connection
                .then_some(ends.local_dst)
                .flatten()
                .map(|a| a.to_string())
        });
    let hbone = ends
        .hbone
        .as_ref()
        .or_else(|| dial.and_then(|d| d.tunnel_authority.as_ref()));
    match direction {
        Direction::Inbound => Resolved {
            src_identity: ends.peer_identity.as_ref(),
            dst_identity: own,
            dst_addr,
            hbone,
        },
        Direction::Outbound => Resolved {
            src_identity: own,
            dst_identity: dial.and_then(|d| d.identity.as_ref()),
            dst_addr,
            hbone,
        },
    }
}

/// Logs one line per connection when it ends.
///
/// Events go to target `proxystack::access` at level `INFO`, so they are routed like any
/// other `tracing` output: filter them with `proxystack::access=info` (or `=off`), send them
/// to their own file with a per-target layer, or print them as JSON with
/// `tracing_subscriber::fmt().json()`. Field names are ztunnel's:
///
/// | field | connection | request |
/// |---|---|---|
/// | `src.addr` | the client's address (through tunnels: the outermost connection's) | same |
/// | `src.identity` | the client's authenticated SPIFFE ID (inbound), or ours (outbound) | same |
/// | `dst.addr` | the upstream address dialled; else the original destination; else the local address | the upstream address dialled, when the request dialled one |
/// | `dst.hbone_addr` | the tunnel's `:authority` (HBONE target) | same |
/// | `dst.identity` | ours (inbound), or the upstream's authenticated identity (outbound) | same |
/// | `direction` | `inbound` / `outbound` | same |
/// | `bytes_sent`, `bytes_recv` | inbound: to / from the client; outbound: to / from the destination, as ztunnel counts them | — |
/// | `duration` | e.g. `"12ms"` | to the response head |
/// | `error`, `reason` | the error chain and its [`FailureReason`](super::FailureReason), on failure | the service's error, if any |
/// | `method`, `path`, `status`, `upstream` | — | the request's; `upstream` is the route [`record_route`](super::record_route) saw, else the authority dialled |
///
/// Wraps an inbound service (`Service<Conn<I>, Response = ()>`); its inner service gets a
/// `Conn<CountingIo<I>>` (with an [`Abort`](crate::admission::Abort) handle in its metadata,
/// as [`ConnectionMetricsLayer`](super::ConnectionMetricsLayer) adds) and its error is
/// passed on boxed. A connection cut before its service finished is logged with reason
/// `aborted`.
///
/// ```
/// use proxystack::conn::Metadata;
/// use proxystack::metrics::AccessLogLayer;
/// use proxystack::{tcp, Target};
/// use tower::Layer;
///
/// // Print access logs as JSON lines:
/// // tracing_subscriber::fmt().json().with_env_filter("proxystack::access=info").init();
/// let relay = tcp::Relay::new(tcp::TcpConnector::new())
///     .upstream(|_: &Metadata| Some(Target::from_static("127.0.0.1:8080")));
/// let service = AccessLogLayer::inbound().layer(relay);
/// # let _ = service;
/// ```
#[derive(Clone, Debug)]
pub struct AccessLogLayer {
    direction: Direction,
    identity: Option<Arc<SpiffeId>>,
}

impl AccessLogLayer {
    /// Logs with the given direction.
    pub fn new(direction: Direction) -> Self {
        Self {
            direction,
            identity: None,
        }
    }

    /// `direction=inbound`.
    pub fn inbound() -> Self {
        Self::new(Direction::Inbound)
    }

    /// `direction=outbound`.
    pub fn outbound() -> Self {
        Self::new(Direction::Outbound)
    }

    /// This proxy's (or its workload's) own identity: `dst.identity` inbound,
    /// `src.identity` outbound.
    pub fn identity(mut self, id: SpiffeId) -> Self {
        self.identity = Some(Arc::new(id));
        self
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessLogService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`AccessLogLayer`].
#[derive(Clone, Debug)]
pub struct AccessLogService<S> {
    inner: S,
    layer: AccessLogLayer,
}

impl<S, I> Service<Conn<I>> for AccessLogService<S>
where
    I: Io,
    S: Service<Conn<CountingIo<I>>, Response = ()>,
    S::Error: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut conn: Conn<I>) -> Self::Future {
        let scope = conn_scope(conn.metadata_mut());
        let ends = Ends::of(conn.metadata());
        let tally = Arc::new(Tally::new(Vec::new(), Vec::new()));
        let abort = abort_handle(conn.metadata_mut());
        let conn = conn.map_io(|io| CountingIo::new(io, tally.clone(), abort));
        let inner = &mut self.inner;
        let fut = scope::sync_in(&scope, || inner.call(conn));
        AccessLogFuture {
            inner: scope::in_scope(scope.clone(), fut),
            record: ConnLine {
                layer: self.layer.clone(),
                ends,
                scope,
                tally,
                started: Instant::now(),
                done: false,
            },
        }
    }
}

pin_project! {
    /// The future of [`AccessLogService`].
    pub struct AccessLogFuture<F> {
        // First, so the stream is dropped (and its counts published) before the line.
        #[pin]
        inner: TaskLocalFuture<Arc<Scope>, F>,
        record: ConnLine,
    }
}

impl<F> fmt::Debug for AccessLogFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLogFuture").finish_non_exhaustive()
    }
}

impl<F, E> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx)).map_err(Into::into);
        match &result {
            Ok(()) => this.record.log(None),
            Err(e) => this.record.log(Some(&**e)),
        }
        Poll::Ready(result)
    }
}

/// One connection's line, written once.
struct ConnLine {
    layer: AccessLogLayer,
    ends: Ends,
    scope: Arc<Scope>,
    tally: Arc<Tally>,
    started: Instant,
    done: bool,
}

/// Stands in for the error of a connection that was cut before its service finished.
#[derive(Debug, thiserror::Error)]
#[error("connection aborted before its service finished")]
struct Aborted;

impl ConnLine {
    fn log(&mut self, error: Option<&(dyn std::error::Error + 'static)>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let direction = self.layer.direction;
        let r = resolve(
            direction,
            self.layer.identity.as_deref(),
            &self.ends,
            &self.scope,
            true,
        );
        let (from_client, to_client) = (self.tally.received(), self.tally.sent());
        // ztunnel's convention: inbound counts towards/from the client, outbound
        // towards/from the destination.
        let (bytes_sent, bytes_recv) = match direction {
            Direction::Inbound => (to_client, from_client),
            Direction::Outbound => (from_client, to_client),
        };
        let reason = match error {
            Some(e) if e.is::<Aborted>() => Some(FailureReason::Aborted),
            Some(e) => Some(FailureReason::classify(e)),
            None => None,
        };
        tracing::event!(
            target: "proxystack::access",
            tracing::Level::INFO,
            src.addr = self.ends.src.map(display),
            src.identity = r.src_identity.map(display),
            dst.addr = r.dst_addr.as_deref(),
            dst.hbone_addr = r.hbone.map(display),
            dst.identity = r.dst_identity.map(display),
            direction = direction.as_str(),
            bytes_sent,
            bytes_recv,
            duration = %Millis(self.started.elapsed()),
            error = error.map(|e| display(DisplayChain(e))),
            reason = reason.map(FailureReason::as_str),
            "connection complete"
        );
    }
}

impl Drop for ConnLine {
    fn drop(&mut self) {
        self.log(Some(&Aborted));
    }
}

/// Logs one line per request when its response head is ready, with the fields listed at
/// [`AccessLogLayer`].
///
/// Wraps a request service (`Service<Request<B>, Response = Response<RB>>`, e.g.
/// `http::Forward`).
///
/// ```
/// use proxystack::http::{Forward, HttpServer, Incoming};
/// use proxystack::metrics::{record_route, HttpAccessLogLayer};
/// use proxystack::{tcp, Target};
/// use tower::Layer;
///
/// let forward = Forward::new(
///     tcp::TcpConnector::new(),
///     record_route(|_: &http::Request<Incoming>| Some(Target::from_static("127.0.0.1:8080"))),
/// );
/// let server = HttpServer::new(HttpAccessLogLayer::inbound().layer(forward));
/// # let _ = server;
/// ```
#[cfg(feature = "http")]
#[derive(Clone, Debug)]
pub struct HttpAccessLogLayer {
    conn: AccessLogLayer,
}

#[cfg(feature = "http")]
impl HttpAccessLogLayer {
    /// Logs with the given direction.
    pub fn new(direction: Direction) -> Self {
        Self {
            conn: AccessLogLayer::new(direction),
        }
    }

    /// `direction=inbound`.
    pub fn inbound() -> Self {
        Self::new(Direction::Inbound)
    }

    /// `direction=outbound`.
    pub fn outbound() -> Self {
        Self::new(Direction::Outbound)
    }

    /// This proxy's own identity; see [`AccessLogLayer::identity`].
    pub fn identity(mut self, id: SpiffeId) -> Self {
        self.conn = self.conn.identity(id);
        self
    }
}

#[cfg(feature = "http")]
impl<S> Layer<S> for HttpAccessLogLayer {
    type Service = HttpAccessLogService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HttpAccessLogService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`HttpAccessLogLayer`].
#[cfg(feature = "http")]
#[derive(Clone, Debug)]
pub struct HttpAccessLogService<S> {
    inner: S,
    layer: HttpAccessLogLayer,
}

#[cfg(feature = "http")]
impl<S, B, RB> Service<http::Request<B>> for HttpAccessLogService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: std::fmt::Display,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = HttpAccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let scope = super::http::request_scope(req.extensions_mut());
        // Read once per connection when a connection layer left its scope in the metadata.
        let ends = match req.extensions().get::<super::scope::ConnScope>() {
            Some(conn) => conn
                .0
                .ends
                .get_or_init(|| Arc::new(Ends::of(req.extensions())))
                .clone(),
            None => Arc::new(Ends::of(req.extensions())),
        };
        let line = RequestLine {
            layer: self.layer.conn.clone(),
            ends,
            method: req.method().clone(),
            // Cloning a `Uri` shares its bytes.
            uri: req.uri().clone(),
            scope: scope.clone(),
            started: Instant::now(),
        };
        let inner = &mut self.inner;
        let fut = scope::sync_in(&scope, || inner.call(req));
        HttpAccessLogFuture {
            inner: scope::in_scope(scope, fut),
            line: Some(line),
        }
    }
}

#[cfg(feature = "http")]
pin_project! {
    /// The future of [`HttpAccessLogService`].
    pub struct HttpAccessLogFuture<F> {
        #[pin]
        inner: TaskLocalFuture<Arc<Scope>, F>,
        line: Option<RequestLine>,
    }
}

#[cfg(feature = "http")]
impl<F> fmt::Debug for HttpAccessLogFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpAccessLogFuture")
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "http")]
impl<F, RB, E> Future for HttpAccessLogFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    E: std::fmt::Display,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(line) = this.line.take() {
            match &result {
                Ok(resp) => line.log(Some(resp.status().as_u16()), None),
                Err(e) => line.log(None, Some(e)),
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(feature = "http")]
struct RequestLine {
    layer: AccessLogLayer,
    ends: Arc<Ends>,
    method: http::Method,
    uri: http::Uri,
    scope: Arc<Scope>,
    started: Instant,
}

#[cfg(feature = "http")]
impl RequestLine {
    fn log(self, status: Option<u16>, error: Option<&dyn fmt::Display>) {
        let direction = self.layer.direction;
        let r = resolve(
            direction,
            self.layer.identity.as_deref(),
            &self.ends,
            &self.scope,
            false,
        );
        let upstream = self
            .scope
            .route()
            .or_else(|| self.scope.dial().map(|d| &d.authority));
        tracing::event!(
            target: "proxystack::access",
            tracing::Level::INFO,
            src.addr = self.ends.src.map(display),
            src.identity = r.src_identity.map(display),
            dst.addr = r.dst_addr.as_deref(),
            dst.hbone_addr = r.hbone.map(display),
            dst.identity = r.dst_identity.map(display),
            direction = direction.as_str(),
            method = %self.method,
            path = self.uri.path(),
            status,
            upstream = upstream.map(display),
            duration = %Millis(self.started.elapsed()),
            error = error.map(display),
            "request complete"
        );
    }
}
