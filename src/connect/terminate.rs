//! The inbound side: serve HTTP on a connection and turn each CONNECT into a tunnel.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tower::{Service, ServiceExt};
use tracing::{debug, info_span, Instrument};

use super::deferred::DeferredIo;
use super::{status_for, Outer, TunnelInfo};
use crate::addr::Authority;
use crate::conn::{box_inbound, Admission, BoxInbound, BoxIo, Conn, ConnectionId, Io};
use crate::{drain, BoxError};

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
    keepalive: Option<(Duration, Duration)>,
    extended_connect: bool,
    header_read_timeout: Duration,
}

/// A terminal inbound service that accepts CONNECT tunnels (see the [module docs](super)).
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
    policy: Option<Policy>,
    settings: Arc<ServerSettings>,
    max_depth: u8,
    non_connect: StatusCode,
    admission_timeout: Duration,
}

impl std::fmt::Debug for ConnectTerminate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTerminate")
            .field("settings", &self.settings)
            .field("max_depth", &self.max_depth)
            .finish_non_exhaustive()
    }
}

impl ConnectTerminate {
    /// Runs each tunnel on `inner`. Defaults: HTTP/1.1 and HTTP/2, no policy (allow all),
    /// depth ≤ 4, non-CONNECT requests → 405, 30 s for the inner service to admit.
    pub fn new<S>(inner: S) -> Self
    where
        S: Service<Conn<BoxIo>, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        Self {
            inner: box_inbound(inner),
            policy: None,
            settings: Arc::new(ServerSettings {
                http1: true,
                http2: true,
                stream_window: 4 << 20,
                connection_window: 16 << 20,
                max_frame_size: 1 << 20,
                max_concurrent_streams: 200,
                max_header_list_size: 64 << 10,
                keepalive: Some((Duration::from_secs(10), Duration::from_secs(20))),
                extended_connect: false,
                header_read_timeout: Duration::from_secs(10),
            }),
            max_depth: 4,
            non_connect: StatusCode::METHOD_NOT_ALLOWED,
            admission_timeout: Duration::from_secs(30),
        }
    }

    fn with_settings(mut self, f: impl FnOnce(&mut ServerSettings)) -> Self {
        f(Arc::make_mut(&mut self.settings));
        self
    }

    /// Decides per tunnel before anything is dialled.
    pub fn policy(
        mut self,
        policy: impl Fn(&TunnelRequest<'_>) -> Decision + Send + Sync + 'static,
    ) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    /// Serve only HTTP/2 (as HBONE does).
    pub fn http2_only(self) -> Self {
        self.with_settings(|s| {
            s.http1 = false;
            s.http2 = true;
        })
    }

    /// Serve only HTTP/1.1.
    pub fn http1_only(self) -> Self {
        self.with_settings(|s| {
            s.http1 = true;
            s.http2 = false;
        })
    }

    /// Accept extended CONNECT (RFC 8441, advertised with SETTINGS_ENABLE_CONNECT_PROTOCOL).
    pub fn extended_connect(self, on: bool) -> Self {
        self.with_settings(|s| s.extended_connect = on)
    }

    /// HTTP/2 flow-control windows (default 4 MiB per stream, 16 MiB per connection).
    pub fn h2_windows(self, stream: u32, connection: u32) -> Self {
        self.with_settings(|s| {
            s.stream_window = stream;
            s.connection_window = connection;
        })
    }

    /// Largest HTTP/2 frame accepted (default 1 MiB).
    pub fn h2_max_frame_size(self, bytes: u32) -> Self {
        self.with_settings(|s| s.max_frame_size = bytes)
    }

    /// Concurrent tunnels per HTTP/2 connection (default 200, as ztunnel advertises).
    pub fn h2_max_concurrent_streams(self, n: u32) -> Self {
        self.with_settings(|s| s.max_concurrent_streams = n)
    }

    /// Largest request header list (default 64 KiB; also bounds CONTINUATION floods).
    pub fn max_header_list_size(self, bytes: u32) -> Self {
        self.with_settings(|s| s.max_header_list_size = bytes)
    }

    /// HTTP/2 PING keepalive: interval and timeout (default 10 s / 20 s); `None` disables.
    pub fn h2_keepalive(self, keepalive: Option<(Duration, Duration)>) -> Self {
        self.with_settings(|s| s.keepalive = keepalive)
    }

    /// Deepest tunnel nesting accepted (default 4); deeper requests get 508.
    pub fn max_depth(mut self, depth: u8) -> Self {
        self.max_depth = depth;
        self
    }

    /// The status for requests that are not CONNECT (default 405; HBONE uses 400).
    pub fn non_connect_status(mut self, status: StatusCode) -> Self {
        self.non_connect = status;
        self
    }

    /// How long the inner service may take to admit or refuse a tunnel (answer: 504).
    pub fn admission_timeout(mut self, timeout: Duration) -> Self {
        self.admission_timeout = timeout;
        self
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let s = &self.settings;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout)
            .max_buf_size((s.max_header_list_size as usize).max(8192));
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .adaptive_window(false)
            .max_frame_size(s.max_frame_size)
            .max_concurrent_streams(s.max_concurrent_streams)
            .max_header_list_size(s.max_header_list_size)
            .max_pending_accept_reset_streams(20)
            .keep_alive_interval(s.keepalive.map(|k| k.0));
        if let Some((_, timeout)) = s.keepalive {
            h2.keep_alive_timeout(timeout);
        }
        if s.extended_connect {
            h2.enable_connect_protocol();
        }
        match (s.http1, s.http2) {
            (true, false) => builder.http1_only(),
            (false, true) => builder.http2_only(),
            _ => builder,
        }
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
            let handler = Handler {
                terminate: this.clone(),
                outer: Arc::new(metadata),
            };
            let builder = this.builder();
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), handler);
            tokio::pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                () = watch.signaled() => {
                    // GOAWAY (HTTP/2) or `Connection: close` (HTTP/1), then let open
                    // tunnels finish; the accept loop enforces the deadline.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            result.map_err(|e| -> BoxError { e })
        })
    }
}

/// Per-connection request handler.
#[derive(Clone)]
struct Handler {
    terminate: ConnectTerminate,
    outer: Arc<http::Extensions>,
}

type Reply = Response<Full<Bytes>>;

fn reply(version: http::Version, status: StatusCode, why: &'static str) -> Reply {
    // HTTP/2 errors are a HEADERS frame with END_STREAM, as ztunnel sends them; HTTP/1
    // clients get a one-line reason.
    let body = if version == http::Version::HTTP_2 {
        Bytes::new()
    } else {
        Bytes::from(format!("{why}\n"))
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp
}

impl hyper::service::Service<Request<Incoming>> for Handler {
    type Response = Reply;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

impl Handler {
    async fn handle(self, req: Request<Incoming>) -> Reply {
        let version = req.version();
        let t = &self.terminate;
        if req.method() != Method::CONNECT {
            debug!(method = %req.method(), "not a CONNECT request");
            return reply(version, t.non_connect, "only CONNECT is served here");
        }
        let protocol = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .map(|p| p.as_str().to_owned());
        // RFC 9113 §8.5: a plain CONNECT has only :method and :authority.
        if protocol.is_none()
            && (req.uri().scheme().is_some() || req.uri().path_and_query().is_some())
        {
            return reply(
                version,
                StatusCode::BAD_REQUEST,
                "CONNECT must not carry :scheme or :path",
            );
        }
        let Some(authority) = req.uri().authority().map(|a| Authority::parse(a.as_str())) else {
            return reply(
                version,
                StatusCode::BAD_REQUEST,
                "CONNECT needs an authority (host:port)",
            );
        };
        let authority = match authority {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "bad CONNECT authority");
                return reply(
                    version,
                    StatusCode::BAD_REQUEST,
                    "invalid CONNECT authority",
                );
            }
        };
        let depth = super::lookup::<TunnelInfo>(&self.outer)
            .map_or(0, |t| t.depth)
            .saturating_add(1);
        if depth > t.max_depth {
            debug!(depth, "tunnel nesting too deep");
            return reply(
                version,
                StatusCode::LOOP_DETECTED,
                "tunnel nesting too deep",
            );
        }
        if let Some(policy) = &t.policy {
            let request = TunnelRequest {
                authority: &authority,
                headers: req.headers(),
                protocol: protocol.as_deref(),
                connection: &self.outer,
            };
            if let Decision::Deny(status) = policy(&request) {
                debug!(tunnel.authority = %authority, %status, "tunnel denied by policy");
                return reply(version, status, "tunnel denied by policy");
            }
        }

        let (admission, decision) = Admission::new();
        let (io, stream_tx) = DeferredIo::new(admission.clone());
        let mut metadata = http::Extensions::new();
        let id = ConnectionId::next();
        metadata.insert(TunnelInfo {
            authority: authority.clone(),
            version,
            protocol,
            headers: req.headers().clone(),
            depth,
        });
        metadata.insert(Outer(self.outer.clone()));
        metadata.insert(admission);
        metadata.insert(id);
        if let Some(watch) = self.outer.get::<drain::Watch>() {
            metadata.insert(watch.clone());
        }
        let tunnel = Conn::from_parts(BoxIo::new(io), metadata);
        let span = info_span!("tunnel", id = id.0, tunnel.authority = %authority, depth);
        let inner = t.inner.clone();
        tokio::spawn(
            async move {
                if let Err(e) = inner.oneshot(tunnel).await {
                    debug!(error = %crate::serve::DisplayChain(&*e), "tunnel ended with error");
                }
            }
            .instrument(span),
        );

        match tokio::time::timeout(t.admission_timeout, decision).await {
            Ok(Ok(Ok(()))) => {
                let upgrade = hyper::upgrade::on(req);
                tokio::spawn(async move {
                    let stream = upgrade
                        .await
                        .map(|u| BoxIo::new(TokioIo::new(u)))
                        .map_err(std::io::Error::other);
                    let _ = stream_tx.send(stream);
                });
                Response::new(Full::new(Bytes::new()))
            }
            Ok(Ok(Err(refusal))) => {
                debug!(tunnel.authority = %authority, ?refusal, "tunnel refused");
                reply(version, status_for(refusal), "upstream refused the tunnel")
            }
            Ok(Err(_)) => reply(
                version,
                StatusCode::SERVICE_UNAVAILABLE,
                "tunnel closed before it was admitted",
            ),
            Err(_) => reply(
                version,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream did not answer in time",
            ),
        }
    }
}
