//! The inbound side: serve HTTP on a connection and turn each CONNECT into a tunnel.
//!
//! HTTP/1.1 is served by hyper (a tunnel is the upgraded connection). HTTP/2 is served with
//! the `h2` crate directly, so a tunnel is an [`H2Stream`] that can end with
//! `RST_STREAM(CONNECT_ERROR)` when its upstream resets (hyper's upgraded HTTP/2 streams
//! only end with `END_STREAM`). A connection's protocol is told by its first bytes, the
//! HTTP/2 preface, unless only one protocol is enabled. Both paths share the request checks
//! and the admission-driven answer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::{Layer, Service, ServiceExt};
use tracing::{debug, info_span, Instrument};

use super::deferred::{DeferredIo, StreamSender};
use super::stream::H2Stream;
use super::{keepalive, status_for, Outer, TunnelInfo};
use crate::addr::Authority;
use crate::admission::{Abort, Admission, Refusal};
use crate::conn::{box_inbound, BoxInbound, Conn, ConnectionId};
use crate::io::{BoxIo, Io, PrefixedIo};
use crate::sniff::sniff_h2_preface;
use crate::task::ConnectionTasks;
use crate::{drain, BoxError, H2Config};

/// A policy's verdict on one tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Open the tunnel (the inner service still decides whether it can connect).
    Allow,
    /// Refuse with this status (401 or 403 usually) without dialling anything.
    Deny(StatusCode),
}

/// What a policy sees of a CONNECT request.
#[derive(Debug)]
pub struct TunnelRequest<'a> {
    /// The parsed authority.
    pub authority: &'a Authority,
    /// The request headers.
    pub headers: &'a http::HeaderMap,
    /// The extended CONNECT protocol, if any.
    pub protocol: Option<&'a str>,
    /// The metadata of the connection the request arrived on (peer address, identity…).
    pub connection: &'a http::Extensions,
}

/// Decides per tunnel; see [`ConnectTerminate::policy`].
pub type Policy = Arc<dyn Fn(&TunnelRequest<'_>) -> Decision + Send + Sync>;

/// HTTP/2 settings of the terminator (and, with [`H2Settings`](super::H2Settings), of the
/// pool): defaults follow ztunnel's HBONE server.
#[derive(Debug, Clone)]
struct ServerSettings {
    http1: bool,
    http2: bool,
    stream_window: u32,
    connection_window: u32,
    max_frame_size: u32,
    max_concurrent_streams: u32,
    max_header_list_size: u32,
    max_pending_accept_reset_streams: usize,
    max_local_error_reset_streams: Option<usize>,
    keepalive: Option<(Duration, Duration)>,
    extended_connect: bool,
    header_read_timeout: Duration,
}

/// Everything a [`ConnectTerminateLayer`] configures, shared by the services it builds.
#[derive(Clone)]
struct Config {
    policy: Option<Policy>,
    settings: ServerSettings,
    max_depth: u8,
    non_connect: StatusCode,
    admission_timeout: Option<Duration>,
}

/// Builds [`ConnectTerminate`] services: the CONNECT terminator as a [`tower::Layer`]
/// whose inner service runs every accepted tunnel.
///
/// The layer carries all the terminator's configuration; [`layer`](Layer::layer) only adds
/// the inner service. That service is type-erased into a [`BoxInbound`]: a tunnel is a new
/// connection (an HTTP/2 stream or an upgraded HTTP/1.1 connection, as
/// [`Conn<BoxIo>`](crate::Conn)), so this is a protocol boundary, boxing costs one
/// allocation per tunnel next to the task spawned for it, and the HTTP/1.1 and HTTP/2
/// servers are compiled once instead of once per inner service type.
///
/// Defaults: HTTP/1.1 and HTTP/2, no policy (allow all), depth ≤ 4, non-CONNECT
/// requests → 405, 30 s for the inner service to admit, HTTP/2 settings as
/// [`h2`](Self::h2) lists.
///
/// ```
/// use proxystack::conn::Metadata;
/// use proxystack::connect::{ConnectTerminateLayer, Decision, TunnelInfo};
/// use proxystack::{tcp, Target, H2Config};
/// use http::StatusCode;
/// use tower::ServiceBuilder;
/// // An egress proxy: tunnels go to the requested authority, port 443 only.
/// let relay = tcp::Relay::new(tcp::TcpConnector::new())
///     .upstream(|c: &Metadata| c.get::<TunnelInfo>().map(|t| Target::from(t.authority.clone())));
/// let proxy = ServiceBuilder::new()
///     .layer(
///         ConnectTerminateLayer::new()
///             .h2(H2Config::new().max_concurrent_streams(100))
///             .policy(|req| match req.authority.port() {
///                 443 => Decision::Allow,
///                 _ => Decision::Deny(StatusCode::FORBIDDEN),
///             }),
///     )
///     .service(relay);
/// # let _ = proxy;
/// ```
#[derive(Clone)]
pub struct ConnectTerminateLayer {
    config: Arc<Config>,
}

impl std::fmt::Debug for ConnectTerminateLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTerminateLayer")
            .field("settings", &self.config.settings)
            .field("max_depth", &self.config.max_depth)
            .field("non_connect", &self.config.non_connect)
            .field("admission_timeout", &self.config.admission_timeout)
            .field("policy", &self.config.policy.is_some())
            .finish()
    }
}

impl Default for ConnectTerminateLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectTerminateLayer {
    /// The defaults listed [above](Self).
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                policy: None,
                settings: ServerSettings {
                    http1: true,
                    http2: true,
                    stream_window: 4 << 20,
                    connection_window: 16 << 20,
                    max_frame_size: 1 << 20,
                    max_concurrent_streams: 200,
                    max_header_list_size: 64 << 10,
                    max_pending_accept_reset_streams: 20,
                    max_local_error_reset_streams: Some(1024),
                    keepalive: Some((Duration::from_secs(10), Duration::from_secs(20))),
                    extended_connect: false,
                    header_read_timeout: Duration::from_secs(10),
                },
                max_depth: 4,
                non_connect: StatusCode::METHOD_NOT_ALLOWED,
                admission_timeout: Some(Duration::from_secs(30)),
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Decides per tunnel before anything is dialled.
    pub fn policy(
        self,
        policy: impl Fn(&TunnelRequest<'_>) -> Decision + Send + Sync + 'static,
    ) -> Self {
        self.with(|c| c.policy = Some(Arc::new(policy)))
    }

    /// Serve only HTTP/2 (as HBONE does).
    pub fn http2_only(self) -> Self {
        self.with(|c| {
            c.settings.http1 = false;
            c.settings.http2 = true;
        })
    }

    /// Serve only HTTP/1.1.
    pub fn http1_only(self) -> Self {
        self.with(|c| {
            c.settings.http1 = true;
            c.settings.http2 = false;
        })
    }

    /// Accept extended CONNECT (RFC 8441, advertised with SETTINGS_ENABLE_CONNECT_PROTOCOL).
    pub fn extended_connect(self, on: bool) -> Self {
        self.with(|c| c.settings.extended_connect = on)
    }

    /// HTTP/2 settings; what `h2` leaves unset keeps the defaults, which follow ztunnel:
    /// 4 MiB stream and 16 MiB connection windows, 1 MiB frames, 200 concurrent tunnels,
    /// a 64 KiB header list (it also bounds an HTTP/1.1 request head), a PING every 10 s
    /// answered within 20 s, and at most 20 streams reset before they were accepted
    /// (rapid reset) and 1,024 reset for client errors.
    pub fn h2(self, h2: H2Config) -> Self {
        self.with(|c| {
            let s = &mut c.settings;
            s.stream_window = h2.stream_window.unwrap_or(s.stream_window);
            s.connection_window = h2.connection_window.unwrap_or(s.connection_window);
            s.max_frame_size = h2.max_frame_size.unwrap_or(s.max_frame_size);
            s.max_concurrent_streams = h2
                .max_concurrent_streams
                .unwrap_or(s.max_concurrent_streams);
            s.max_header_list_size = h2.max_header_list_size.unwrap_or(s.max_header_list_size);
            s.max_pending_accept_reset_streams = h2
                .max_pending_accept_reset_streams
                .unwrap_or(s.max_pending_accept_reset_streams);
            s.max_local_error_reset_streams = h2
                .max_local_error_reset_streams
                .unwrap_or(s.max_local_error_reset_streams);
            s.keepalive = h2.keep_alive_over(s.keepalive);
        })
    }

    /// Deepest tunnel nesting accepted (default 4); deeper requests get 508.
    pub fn max_depth(self, depth: u8) -> Self {
        self.with(|c| c.max_depth = depth)
    }

    /// The status for requests that are not CONNECT (default 405; HBONE uses 400).
    pub fn non_connect_status(self, status: StatusCode) -> Self {
        self.with(|c| c.non_connect = status)
    }

    /// How long the inner service may take to admit or refuse a tunnel (default 30 s;
    /// answer: 504). `None` waits as long as the inner service does (a relay is then
    /// bounded by its connector's connect timeout).
    pub fn admission_timeout(self, timeout: Option<Duration>) -> Self {
        self.with(|c| c.admission_timeout = timeout)
    }
}

impl<S: crate::conn::BoxableInbound> Layer<S> for ConnectTerminateLayer {
    type Service = ConnectTerminate;

    fn layer(&self, inner: S) -> ConnectTerminate {
        ConnectTerminate {
            inner: box_inbound(inner),
            layer: self.clone(),
        }
    }
}

/// A terminal inbound service that accepts CONNECT tunnels (see the [module docs](super)),
/// built by [`ConnectTerminateLayer`].
///
/// `ConnectTerminate::new(inner)` and its setters are shorthand for the layer's:
/// `ConnectTerminate::new(relay).max_depth(2)` is
/// `ConnectTerminateLayer::new().max_depth(2).layer(relay)`.
///
/// ```
/// use proxystack::conn::Metadata;
/// use proxystack::connect::{ConnectTerminate, Decision};
/// use proxystack::{tcp, Conn, Target};
/// use proxystack::connect::TunnelInfo;
/// use http::StatusCode;
/// // An egress proxy: tunnels go to the requested authority, port 443 only.
/// let relay = tcp::Relay::new(tcp::TcpConnector::new())
///     .upstream(|c: &Metadata| c.get::<TunnelInfo>().map(|t| Target::from(t.authority.clone())));
/// let proxy = ConnectTerminate::new(relay).policy(|req| {
///     if req.authority.port() == 443 { Decision::Allow } else { Decision::Deny(StatusCode::FORBIDDEN) }
/// });
/// # let _ = proxy;
/// ```
#[derive(Clone)]
pub struct ConnectTerminate {
    inner: BoxInbound,
    layer: ConnectTerminateLayer,
}

impl std::fmt::Debug for ConnectTerminate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTerminate")
            .field("settings", &self.layer.config.settings)
            .field("max_depth", &self.layer.config.max_depth)
            .finish_non_exhaustive()
    }
}

impl ConnectTerminate {
    /// Runs each tunnel on `inner`, with [`ConnectTerminateLayer`]'s defaults.
    pub fn new<S>(inner: S) -> Self
    where
        S: crate::conn::BoxableInbound,
    {
        ConnectTerminateLayer::new().layer(inner)
    }

    fn with(mut self, f: impl FnOnce(ConnectTerminateLayer) -> ConnectTerminateLayer) -> Self {
        self.layer = f(self.layer);
        self
    }

    /// See [`ConnectTerminateLayer::policy`].
    pub fn policy(
        self,
        policy: impl Fn(&TunnelRequest<'_>) -> Decision + Send + Sync + 'static,
    ) -> Self {
        self.with(|l| l.policy(policy))
    }

    /// See [`ConnectTerminateLayer::http2_only`].
    pub fn http2_only(self) -> Self {
        self.with(ConnectTerminateLayer::http2_only)
    }

    /// See [`ConnectTerminateLayer::http1_only`].
    pub fn http1_only(self) -> Self {
        self.with(ConnectTerminateLayer::http1_only)
    }

    /// See [`ConnectTerminateLayer::extended_connect`].
    pub fn extended_connect(self, on: bool) -> Self {
        self.with(|l| l.extended_connect(on))
    }

    /// See [`ConnectTerminateLayer::h2`].
    pub fn h2(self, h2: H2Config) -> Self {
        self.with(|l| l.h2(h2))
    }

    /// See [`ConnectTerminateLayer::max_depth`].
    pub fn max_depth(self, depth: u8) -> Self {
        self.with(|l| l.max_depth(depth))
    }

    /// See [`ConnectTerminateLayer::non_connect_status`].
    pub fn non_connect_status(self, status: StatusCode) -> Self {
        self.with(|l| l.non_connect_status(status))
    }

    /// See [`ConnectTerminateLayer::admission_timeout`].
    pub fn admission_timeout(self, timeout: Option<Duration>) -> Self {
        self.with(|l| l.admission_timeout(timeout))
    }

    fn config(&self) -> &Config {
        &self.layer.config
    }
}

impl<I: Io> Service<Conn<I>> for ConnectTerminate {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (io, metadata) = conn.into_parts();
            let watch = metadata
                .get::<drain::Watch>()
                .cloned()
                .unwrap_or_else(drain::Watch::never);
            let settings = this.config().settings.clone();
            let handler = Handler {
                terminate: this,
                outer: Arc::new(metadata),
                h1_tunnel: ConnectionTasks::default(),
                recover: recover_upgraded::<PrefixedIo<I>>,
            };
            let (io, h2) = match (settings.http1, settings.http2) {
                (false, true) => (PrefixedIo::new(Bytes::new(), io), true),
                (true, false) => (PrefixedIo::new(Bytes::new(), io), false),
                _ => match sniff_h2_preface(io, settings.header_read_timeout).await? {
                    None => return Ok(()),
                    Some(sniffed) => sniffed,
                },
            };
            if h2 {
                handler.serve_h2(io, watch).await
            } else {
                handler.serve_h1(io, watch).await
            }
        })
    }
}

/// Per-connection request handler.
#[derive(Clone)]
struct Handler {
    terminate: ConnectTerminate,
    outer: Arc<http::Extensions>,
    /// HTTP/1.1: the task of the tunnel this connection turned into.
    h1_tunnel: ConnectionTasks,
    /// HTTP/1.1: the accepted stream back from hyper's upgrade (it knows the stream's type).
    recover: fn(Upgraded) -> BoxIo,
}

/// The stream under an HTTP/1.1 tunnel, taken back from hyper: the accepted connection
/// itself, so that a tunnel over plain TCP is the socket byte for byte and the relay can
/// `splice(2)` it ([`Io::raw_tcp_socket`]). Bytes hyper read past the `CONNECT` head (a
/// client that did not wait for the `200`) are replayed first; until they are read, the
/// stream does not claim its socket. A type other than the one served (never, with hyper's
/// HTTP/1 server) falls back to hyper's upgraded stream.
fn recover_upgraded<I: Io>(upgraded: Upgraded) -> BoxIo {
    match upgraded.downcast::<TokioIo<I>>() {
        Ok(parts) if parts.read_buf.is_empty() => BoxIo::new(parts.io.into_inner()),
        Ok(parts) => BoxIo::new(PrefixedIo::new(parts.read_buf, parts.io.into_inner())),
        Err(upgraded) => BoxIo::new(TokioIo::new(upgraded)),
    }
}

/// What the checks need of a CONNECT request, whichever protocol carried it.
struct Head<'a> {
    method: &'a Method,
    uri: &'a http::Uri,
    headers: &'a http::HeaderMap,
    protocol: Option<String>,
    version: http::Version,
}

/// A tunnel refused before it opened: the status, and a reason for HTTP/1 bodies.
type Refused = (StatusCode, &'static str);

/// A tunnel handed to the inner service, waiting for it to be admitted.
struct Pending {
    authority: Authority,
    decision: oneshot::Receiver<Result<(), Refusal>>,
    stream_tx: StreamSender,
}

impl Pending {
    /// The sender for the tunnel's stream once the inner service admitted it.
    async fn admitted(self, timeout: Option<Duration>) -> Result<StreamSender, Refused> {
        let decision = match timeout {
            Some(limit) => match tokio::time::timeout(limit, self.decision).await {
                Ok(decision) => decision,
                Err(_) => {
                    debug!(tunnel.authority = %self.authority, "tunnel not admitted in time");
                    return Err((
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream did not answer in time",
                    ));
                }
            },
            None => self.decision.await,
        };
        match decision {
            Ok(Ok(())) => Ok(self.stream_tx),
            Ok(Err(refusal)) => {
                debug!(tunnel.authority = %self.authority, ?refusal, "tunnel refused");
                Err((status_for(refusal), "upstream refused the tunnel"))
            }
            Err(_) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "tunnel closed before it was admitted",
            )),
        }
    }
}

impl Handler {
    /// The checks both protocols share (method, RFC 9113 §8.5 form, authority, depth,
    /// policy); then the tunnel goes to the inner service, whose admission decides the
    /// answer. `abort` is the tunnel stream's reset handle, if it has one.
    fn start(
        &self,
        head: Head<'_>,
        abort: Option<Abort>,
    ) -> Result<(Pending, JoinHandle<()>), Refused> {
        let t = self.terminate.config();
        if head.method != Method::CONNECT {
            debug!(method = %head.method, "not a CONNECT request");
            return Err((t.non_connect, "only CONNECT is served here"));
        }
        // RFC 9113 §8.5: a plain CONNECT has only :method and :authority.
        if head.protocol.is_none()
            && (head.uri.scheme().is_some() || head.uri.path_and_query().is_some())
        {
            return Err((
                StatusCode::BAD_REQUEST,
                "CONNECT must not carry :scheme or :path",
            ));
        }
        let Some(authority) = head.uri.authority().map(|a| Authority::parse(a.as_str())) else {
            return Err((
                StatusCode::BAD_REQUEST,
                "CONNECT needs an authority (host:port)",
            ));
        };
        let authority = authority.map_err(|e| {
            debug!(error = %e, "bad CONNECT authority");
            (StatusCode::BAD_REQUEST, "invalid CONNECT authority")
        })?;
        let depth = super::lookup::<TunnelInfo>(&self.outer)
            .map_or(0, |t| t.depth)
            .saturating_add(1);
        if depth > t.max_depth {
            debug!(depth, "tunnel nesting too deep");
            return Err((StatusCode::LOOP_DETECTED, "tunnel nesting too deep"));
        }
        if let Some(policy) = &t.policy {
            let request = TunnelRequest {
                authority: &authority,
                headers: head.headers,
                protocol: head.protocol.as_deref(),
                connection: &self.outer,
            };
            if let Decision::Deny(status) = policy(&request) {
                debug!(tunnel.authority = %authority, %status, "tunnel denied by policy");
                return Err((status, "tunnel denied by policy"));
            }
        }

        let (admission, decision) = Admission::new();
        let (io, stream_tx) = DeferredIo::new(admission.clone());
        let mut metadata = http::Extensions::new();
        let id = ConnectionId::next();
        metadata.insert(TunnelInfo {
            authority: authority.clone(),
            version: head.version,
            protocol: head.protocol,
            headers: head.headers.clone(),
            depth,
        });
        metadata.insert(Outer(self.outer.clone()));
        metadata.insert(admission);
        metadata.insert(id);
        if let Some(abort) = abort {
            metadata.insert(abort);
        }
        if let Some(watch) = self.outer.get::<drain::Watch>() {
            metadata.insert(watch.clone());
        }
        let tunnel = Conn::from_parts(BoxIo::new(io), metadata);
        let span = info_span!("tunnel", id = id.0, tunnel.authority = %authority, depth);
        let inner = self.terminate.inner.clone();
        let task = crate::task::spawn(
            async move {
                if let Err(e) = inner.oneshot(tunnel).await {
                    debug!(error = %crate::error_chain::DisplayChain(&*e), "tunnel ended with error");
                }
            }
            .instrument(span),
        );
        Ok((
            Pending {
                authority,
                decision,
                stream_tx,
            },
            task,
        ))
    }

    // ----- HTTP/1.1 (hyper) -----

    async fn serve_h1<I: Io>(self, io: I, watch: drain::Watch) -> Result<(), BoxError> {
        let s = self.terminate.config().settings.clone();
        let tunnel = self.h1_tunnel.clone();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout)
            .max_buf_size((s.max_header_list_size as usize).max(8192));
        let connection = builder
            .serve_connection(TokioIo::new(io), self)
            .with_upgrades();
        tokio::pin!(connection);
        let result = tokio::select! {
            r = connection.as_mut() => r,
            () = watch.signaled() => {
                // `Connection: close` after the current request; open tunnels go on, the
                // accept loop enforces the deadline.
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        // A CONNECT ends the HTTP connection; the tunnel goes on in its own task, which
        // this (the accept loop's) task now waits for.
        tunnel.join().await;
        result.map_err(Into::into)
    }

    async fn handle_h1(self, req: Request<Incoming>) -> Reply {
        let head = Head {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            protocol: None,
            version: req.version(),
        };
        // An HTTP/1.1 tunnel is the whole connection it arrived on (hyper cannot reset it):
        // if that connection is itself a resettable stream, aborting the tunnel aborts it.
        let carrier = self.outer.get::<Abort>().cloned();
        let (admitted, task) = match self.start(head, carrier) {
            Ok((pending, task)) => (
                pending
                    .admitted(self.terminate.config().admission_timeout)
                    .await,
                Some(task),
            ),
            Err(refused) => (Err(refused), None),
        };
        match admitted {
            Ok(stream_tx) => {
                if let Some(task) = task {
                    self.h1_tunnel.push(task);
                }
                let upgrade = hyper::upgrade::on(req);
                let recover = self.recover;
                crate::task::spawn(async move {
                    let stream = upgrade.await.map(recover).map_err(std::io::Error::other);
                    let _ = stream_tx.send(stream);
                });
                Response::new(Full::new(Bytes::new()))
            }
            Err((status, why)) => {
                // HTTP/1 clients get a one-line reason.
                let mut resp = Response::new(Full::new(Bytes::from(format!("{why}\n"))));
                *resp.status_mut() = status;
                resp
            }
        }
    }

    // ----- HTTP/2 (h2) -----

    async fn serve_h2<I: Io>(self, io: I, watch: drain::Watch) -> Result<(), BoxError> {
        let s = self.terminate.config().settings.clone();
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(keepalive::window(s.stream_window))
            .initial_connection_window_size(keepalive::window(s.connection_window))
            .max_frame_size(keepalive::frame_size(s.max_frame_size))
            .max_concurrent_streams(s.max_concurrent_streams)
            .max_header_list_size(s.max_header_list_size)
            // Rapid reset (CVE-2023-44487): GOAWAY after this many streams reset unaccepted.
            .max_pending_accept_reset_streams(s.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(s.max_local_error_reset_streams);
        if s.extended_connect {
            builder.enable_connect_protocol();
        }
        let handshake = builder.handshake::<_, Bytes>(io);
        let mut connection = match tokio::time::timeout(s.header_read_timeout, handshake).await {
            Ok(connection) => connection?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 preface in time",
                )
                .into())
            }
        };
        let keepalive = keepalive::maybe_keepalive(connection.ping_pong(), s.keepalive);
        tokio::pin!(keepalive);
        let mut draining = false;
        loop {
            tokio::select! {
                next = connection.accept() => match next {
                    Some(Ok((req, respond))) => {
                        crate::task::spawn(self.clone().handle_h2(req, respond).in_current_span());
                    }
                    // A peer closing (or resetting) its connection while we drain, as
                    // the GOAWAY reaches it, is how a drain is meant to end.
                    Some(Err(e)) if draining && crate::serve::peer_gone(e.get_io()) => {
                        debug!(error = %e, "peer closed its connection during the drain");
                        return Ok(());
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(()),
                },
                () = watch.signaled(), if !draining => {
                    // GOAWAY; open tunnels go on (accept() returns None once they are
                    // done), the accept loop enforces the deadline.
                    draining = true;
                    connection.graceful_shutdown();
                }
                failure = &mut keepalive => {
                    debug!(error = %failure, "HTTP/2 keepalive failed; closing the connection");
                    return Err(failure.into());
                }
            }
        }
    }

    async fn handle_h2(self, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        let (parts, body) = req.into_parts();
        let head = Head {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            protocol: parts
                .extensions
                .get::<h2::ext::Protocol>()
                .map(|p| p.as_str().to_owned()),
            version: http::Version::HTTP_2,
        };
        let abort = Abort::new();
        let admitted = match self.start(head, Some(abort.clone())) {
            // An HTTP/2 tunnel's task needs no keeping: when the connection goes, so do its
            // streams, and the tunnel fails.
            Ok((pending, _task)) => {
                let timeout = self.terminate.config().admission_timeout;
                tokio::select! {
                    admitted = pending.admitted(timeout) => admitted,
                    // The client gave up (RST_STREAM) while the inner service connected:
                    // dropping the stream sender fails the tunnel's I/O, which resets it.
                    _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
                        debug!("client reset the CONNECT stream before it was answered");
                        return;
                    }
                }
            }
            Err(refused) => Err(refused),
        };
        match admitted {
            Ok(stream_tx) => match respond.send_response(Response::new(()), false) {
                Ok(send) => {
                    let stream = H2Stream::with_abort(send, body, abort);
                    let _ = stream_tx.send(Ok(BoxIo::new(stream)));
                }
                Err(e) => {
                    let _ = stream_tx.send(Err(std::io::Error::other(e)));
                }
            },
            Err((status, _)) => {
                // A HEADERS frame with END_STREAM, as ztunnel sends errors.
                let mut resp = Response::new(());
                *resp.status_mut() = status;
                let _ = respond.send_response(resp, true);
            }
        }
    }
}

type Reply = Response<Full<Bytes>>;

impl hyper::service::Service<Request<Incoming>> for Handler {
    type Response = Reply;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle_h1(req).await) })
    }
}
