//! [`Forward`]: the reverse-proxy service.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use tower::Service;
use tracing::{debug, warn};

use super::error::{ErrorOrigin, ForwardError, ForwardErrorKind};
use super::headers;
use super::pool::{Pool, PoolConfig};
use super::BoxBody;
use crate::conn::{Conn, PeerAddr};
use crate::io::Io;
use crate::task::ConnectionTasks;
use crate::tcp::{relay_with, RelayConfig};
use crate::{BoxError, Target};

/// Which HTTP version to speak to an upstream. Also [`Target`] metadata (the router's
/// choice for one upstream) and upstream [`Conn`] metadata (a connector that negotiated
/// the protocol, e.g. by ALPN, records the result; it wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, connections pooled and reused one request at a time.
    Http1,
    /// HTTP/2 with prior knowledge (h2c on plain TCP), one multiplexed connection.
    Http2,
    /// Whatever the client spoke.
    MatchClient,
}

/// How [`Forward`] treats a forwarding header (`Forwarded`, `X-Forwarded-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedMode {
    /// Neither add nor remove: the client's values pass through untouched.
    #[default]
    Off,
    /// Add this hop to what earlier (trusted) proxies wrote.
    Append,
    /// At the edge: drop whatever the client sent (it may be forged) and write only this
    /// hop. Either [`Forward::forwarded`] or [`Forward::x_forwarded`] in this mode makes
    /// the proxy an edge: *every* field a client could forge to pose as an earlier proxy
    /// goes, not only the ones this hop writes — `Forwarded`, all `X-Forwarded-*`
    /// (`-For`, `-Proto`, `-Host`, `-Port`, `-Prefix`, `-Scheme`, `-Ssl`, `-Server`,
    /// `-Uri`, …), `X-Real-IP` and all `X-Original-*` (`-Forwarded-For`, `-URL`, …). An
    /// `Append` on the other family then only adds this hop.
    Overwrite,
}

/// Connection (or request) metadata: the scheme the client's *connection* used, for
/// `Forwarded: proto=`, `X-Forwarded-Proto` and the upstream `:scheme`.
///
/// [`Forward`] never takes the scheme from the request: an absolute-form
/// `GET https://…` or an h2c `:scheme: https` on a cleartext connection is the client's
/// claim, not a fact. It uses, in order: this metadata when a layer inserted it (e.g.
/// behind a trusted TLS-terminating load balancer), else `https` when the request's
/// extensions hold `tls::TlsInfo` *directly* (inserted by `tls::TerminateLayer` on this
/// connection; feature `tls`), else `http`. A tunnel's metadata nests its outer connection
/// under `connect::Outer`, so the outer TLS of an HBONE tunnel does not make the cleartext
/// HTTP inside it `https`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestScheme(pub Scheme);

/// [`Target`] metadata: the router's response timeout for one upstream, overriding
/// [`Forward::timeout`] (`None`: wait as long as the connection lives). The same rules
/// apply: from the start of forwarding until the response head, `504` after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTimeout(pub Option<Duration>);

/// A reverse proxy: forwards each request to the [`Target`] a router picks, over any
/// connector, with pooled upstream connections.
///
/// * hop-by-hop fields are removed both ways (RFC 9110 §7.6.1), including those named in
///   `Connection`; `TE: trailers` is kept;
/// * `Host` and `:authority` are kept consistent: an HTTP/1 upstream gets `Host` = the
///   request's authority (the absolute-form URI wins over `Host`, RFC 9112 §3.2.2), an
///   HTTP/2 upstream gets `:authority` and no `Host`; an HTTP/2 request whose `Host`
///   disagrees with `:authority`, and an authority with userinfo (`user@host`), are
///   refused (RFC 9113 §8.3.1, RFC 9110 §4.2.4);
/// * `Cookie` fields an HTTP/2 client split are joined with `; ` for an HTTP/1 upstream
///   (RFC 9113 §8.2.3);
/// * bodies stream both ways with backpressure; nothing is buffered whole;
/// * an HTTP/1 `Upgrade` (WebSocket…) is passed on, and bytes are relayed only when the
///   upstream answers `101`; any other answer is an ordinary response;
/// * the scheme reported upstream (`Forwarded: proto=`, `X-Forwarded-Proto`, HTTP/2
///   `:scheme`) is the connection's, never the request's (see [`RequestScheme`]): `https`
///   exactly when this connection's TLS was terminated here;
/// * failures become short plain-text responses: no route `404`, refused request `400`,
///   connect failure `502`, timeout `504` (see [`ForwardError`]).
///
/// ```
/// use proxystack::http::{Forward, ForwardedMode, HttpServer, Incoming};
/// use proxystack::{tcp, Target};
/// use std::time::Duration;
///
/// let forward = Forward::new(tcp::TcpConnector::new(), |_req: &http::Request<Incoming>| {
///     Some(Target::from_static("127.0.0.1:8080"))
/// })
/// .timeout(Some(Duration::from_secs(10)))
/// .forwarded(ForwardedMode::Overwrite);
/// let server = HttpServer::new(forward); // a Service<Conn<I>> for serve()
/// # let _: HttpServer<Forward<_, _>> = server;
/// ```
pub struct Forward<C, R> {
    pool: Pool<C>,
    router: Arc<R>,
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    timeout: Option<Duration>,
    protocol: UpstreamProtocol,
    forwarded: ForwardedMode,
    x_forwarded: ForwardedMode,
    /// `Via` values for HTTP/1.0, 1.1, 2 and 3, built once rather than per message.
    via: Option<Arc<[HeaderValue; 4]>>,
    relay: RelayConfig,
    pool: PoolConfig,
}

impl<C: Clone, R> Clone for Forward<C, R> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            router: self.router.clone(),
            config: self.config.clone(),
        }
    }
}

impl<C, R> std::fmt::Debug for Forward<C, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C> Forward<C, FixedTarget> {
    /// Forwards every request over `connector` to one fixed `target`: the shorthand for
    /// `Forward::new(connector, move |_| Some(target.clone()))`.
    ///
    /// ```
    /// use proxystack::http::{Forward, HttpServer};
    /// use proxystack::{tcp, Target};
    /// let forward = Forward::to(tcp::TcpConnector::new(), Target::from_static("127.0.0.1:8080"));
    /// let server = HttpServer::new(forward);
    /// # let _ = server;
    /// ```
    pub fn to(connector: C, target: Target) -> Self {
        Forward::new(connector, FixedTarget(target))
    }
}

/// Picks the upstream [`Target`] of a request for [`Forward`] (`None`: `404`). Implemented
/// for every `Fn(&Request<B>) -> Option<Target>` and for [`FixedTarget`].
pub trait RouteRequest<B> {
    /// The upstream for `req`.
    fn route(&self, req: &Request<B>) -> Option<Target>;
}

impl<B, F: Fn(&Request<B>) -> Option<Target>> RouteRequest<B> for F {
    fn route(&self, req: &Request<B>) -> Option<Target> {
        self(req)
    }
}

/// One upstream for every request ([`Forward::to`]).
#[derive(Debug, Clone)]
pub struct FixedTarget(pub Target);

impl<B> RouteRequest<B> for FixedTarget {
    fn route(&self, _: &Request<B>) -> Option<Target> {
        Some(self.0.clone())
    }
}

impl<C, R> Forward<C, R> {
    /// Forwards over `connector` to the target `router` picks for each request (`None`:
    /// `404`). Defaults: HTTP/1.1 upstreams, 30 s timeout for the response head, no
    /// forwarding headers, idle upstream connections kept 90 s (at most 256 per upstream).
    pub fn new(connector: C, router: R) -> Self {
        let pool = PoolConfig {
            idle_timeout: Duration::from_secs(90),
            // Enough for a busy upstream's steady concurrency: a cap below it makes every
            // burst close idle connections that the next requests must dial again (at 64
            // concurrent clients, 32 closed and re-dialled 13% of upstream connections).
            max_idle_per_key: 256,
        };
        Self {
            pool: Pool::new(connector, pool.clone()),
            router: Arc::new(router),
            config: Arc::new(Config {
                timeout: Some(Duration::from_secs(30)),
                protocol: UpstreamProtocol::Http1,
                forwarded: ForwardedMode::Off,
                x_forwarded: ForwardedMode::Off,
                via: None,
                relay: RelayConfig::default(),
                pool,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Time allowed from the start of forwarding until the upstream's response head
    /// (connecting included); `504` after it. Bodies are not covered: a long download is
    /// not a slow upstream. `None` waits as long as the connection lives. A router can
    /// choose another per upstream with [`UpstreamTimeout`] target metadata.
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config_mut().timeout = timeout;
        self
    }

    /// The HTTP version for upstreams whose [`Target`] does not say.
    pub fn upstream_protocol(mut self, protocol: UpstreamProtocol) -> Self {
        self.config_mut().protocol = protocol;
        self
    }

    /// Writes an RFC 7239 `Forwarded` element for this hop:
    /// `for="<client ip:port>";host=<authority>;proto=<scheme>` (IPv6 as `"[::1]:80"`;
    /// the scheme of the connection, see [`RequestScheme`]). With
    /// [`ForwardedMode::Overwrite`] every forwarding field the client sent is dropped
    /// first.
    pub fn forwarded(mut self, mode: ForwardedMode) -> Self {
        self.config_mut().forwarded = mode;
        self
    }

    /// Writes `X-Forwarded-For` (the client IP) and `X-Forwarded-Proto` (the scheme of the
    /// connection, see [`RequestScheme`]). With [`ForwardedMode::Overwrite`] every
    /// forwarding field the client sent is dropped first.
    pub fn x_forwarded(mut self, mode: ForwardedMode) -> Self {
        self.config_mut().x_forwarded = mode;
        self
    }

    /// Adds `Via: <version> <pseudonym>` to requests and responses (RFC 9110 §7.6.3);
    /// `None` (the default) adds nothing. The pseudonym must be a valid header value.
    pub fn via(mut self, pseudonym: Option<impl Into<String>>) -> Self {
        self.config_mut().via = pseudonym.and_then(|p| {
            let p: String = p.into();
            let value = |v: &str| HeaderValue::from_str(&format!("{v} {p}")).ok();
            Some(Arc::new([
                value("1.0")?,
                value("1.1")?,
                value("2")?,
                value("3")?,
            ]))
        });
        self
    }

    /// How upgraded (e.g. WebSocket) connections are relayed: idle timeout, buffers.
    pub fn upgrade_relay(mut self, config: RelayConfig) -> Self {
        self.config_mut().relay = config;
        self
    }

    /// How long an idle upstream HTTP/1 connection is kept for reuse.
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().pool.idle_timeout = timeout;
        self.rebuild_pool()
    }

    /// Most idle HTTP/1 connections kept per upstream (default 256). Keep it at or above
    /// the concurrency you expect per upstream, or bursts churn connections.
    pub fn pool_max_idle_per_upstream(mut self, n: usize) -> Self {
        self.config_mut().pool.max_idle_per_key = n;
        self.rebuild_pool()
    }

    fn rebuild_pool(self) -> Self {
        let Self {
            pool,
            router,
            config,
        } = self;
        Self {
            pool: pool.reconfigure(config.pool.clone()),
            router,
            config,
        }
    }
}

impl<C, R, B, O> Service<Request<B>> for Forward<C, R>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    R: RouteRequest<B> + Send + Sync + 'static,
    C: Service<Target, Response = Conn<O>> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    O: Io,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let version = req.version();
            let method = req.method().clone();
            // For the log line on failure; cloning shares the parsed bytes, no copy.
            let uri = req.uri().clone();
            Ok(match this.forward(req).await {
                Ok(resp) => resp,
                Err(e) => {
                    let status = e.status();
                    match e.origin() {
                        ErrorOrigin::Upstream => warn!(
                            %method, path = uri.path(), status = status.as_u16(), error = %crate::error_chain::DisplayChain(&e),
                            "forwarding failed"
                        ),
                        _ => debug!(
                            %method, path = uri.path(), status = status.as_u16(), error = %crate::error_chain::DisplayChain(&e),
                            "request refused"
                        ),
                    }
                    let downstream = e.origin() == ErrorOrigin::Downstream;
                    let mut resp = e.into_response();
                    if downstream && version <= Version::HTTP_11 {
                        // The connection's framing can no longer be trusted.
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    resp
                }
            })
        })
    }
}

impl<C, R, O> Forward<C, R>
where
    C: Service<Target, Response = Conn<O>> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    O: Io,
{
    async fn forward<B>(&self, mut req: Request<B>) -> Result<Response<BoxBody>, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        R: RouteRequest<B>,
    {
        let bad = |why| ForwardError::new(ForwardErrorKind::BadRequest(why));
        if req.method() == Method::CONNECT {
            return Err(ForwardError::new(ForwardErrorKind::MethodNotAllowed));
        }
        // hyper's HTTP/1 parser already drops Content-Length when Transfer-Encoding is
        // present (and the strict head check refuses both); this also covers requests
        // built by other layers.
        if req.headers().contains_key(header::CONTENT_LENGTH)
            && req.headers().contains_key(header::TRANSFER_ENCODING)
        {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        if headers::find_bad_value(req.headers()).is_some() {
            return Err(bad("malformed field value"));
        }
        let client_version = req.version();
        let authority = request_authority(&req).map_err(bad)?;
        let target = self
            .router
            .route(&req)
            .ok_or(ForwardError::new(ForwardErrorKind::NoRoute))?;

        let upgrade = if client_version == Version::HTTP_11 {
            headers::upgrade_protocols(req.headers())
        } else {
            None
        };
        let downstream_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let upgrade_tasks = req.extensions().get::<ConnectionTasks>().cloned();
        let protocol = if upgrade.is_some() {
            UpstreamProtocol::Http1 // upgrades exist only in HTTP/1.1
        } else {
            let wanted = target
                .get::<UpstreamProtocol>()
                .copied()
                .unwrap_or(self.config.protocol);
            match wanted {
                UpstreamProtocol::MatchClient if client_version == Version::HTTP_2 => {
                    UpstreamProtocol::Http2
                }
                UpstreamProtocol::MatchClient => UpstreamProtocol::Http1,
                p => p,
            }
        };

        let timeout = target
            .get::<UpstreamTimeout>()
            .map_or(self.config.timeout, |t| t.0);
        let (mut parts, body) = req.into_parts();
        let scheme = connection_scheme(&parts.extensions);
        headers::remove_hop_by_hop(&mut parts.headers, upgrade.is_some());
        if let Some(protocols) = upgrade {
            parts.headers.insert(header::UPGRADE, protocols);
        }
        if protocol == UpstreamProtocol::Http1 {
            headers::join_cookies(&mut parts.headers);
        }
        self.add_forwarding_headers(&mut parts, authority.as_deref(), &scheme, client_version);
        let authority = authority.unwrap_or_else(|| target.authority().to_string());
        set_upstream_uri(&mut parts, protocol, &scheme, &authority).map_err(bad)?;

        // Remember whether the request body failed, so that a failed exchange is blamed
        // on the client (400) rather than on the upstream (502).
        let body_failed = Arc::new(AtomicBool::new(false));
        let flag = body_failed.clone();
        let body = body
            .map_err(move |e| {
                flag.store(true, Ordering::Relaxed);
                e.into()
            })
            .boxed_unsync();

        let send = self
            .pool
            .send(target, protocol, Request::from_parts(parts, body));
        let result = match timeout {
            Some(t) => tokio::time::timeout(t, send)
                .await
                .unwrap_or_else(|_| Err(ForwardError::new(ForwardErrorKind::Timeout))),
            None => send.await,
        };
        let mut resp = result.map_err(|e| {
            if body_failed.load(Ordering::Relaxed) {
                ForwardError::new(ForwardErrorKind::DownstreamBody)
            } else {
                e
            }
        })?;

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(downstream) = downstream_upgrade else {
                return Err(ForwardError::with(
                    ForwardErrorKind::Upstream,
                    "101 Switching Protocols to a request that asked for no upgrade",
                ));
            };
            let upstream = hyper::upgrade::on(&mut resp);
            let task = self.spawn_upgrade_relay(downstream, upstream);
            if let Some(tasks) = upgrade_tasks {
                tasks.push(task);
            }
            let (mut rparts, _) = resp.into_parts();
            headers::remove_hop_by_hop(&mut rparts.headers, true);
            self.add_via(&mut rparts.headers, Version::HTTP_11);
            let empty = Empty::new().map_err(|never| match never {}).boxed_unsync();
            return Ok(Response::from_parts(rparts, empty));
        }

        // Not a 101: whatever the upstream said, this is an ordinary response and the
        // connection is not switched (CVE-2024-23326: a 200 is not an upgrade).
        let (mut rparts, rbody) = resp.into_parts();
        headers::remove_hop_by_hop(&mut rparts.headers, false);
        let upstream_version = rparts.version;
        self.add_via(&mut rparts.headers, upstream_version);
        Ok(Response::from_parts(
            rparts,
            rbody.map_err(Into::into).boxed_unsync(),
        ))
    }

    fn add_forwarding_headers(
        &self,
        parts: &mut Parts,
        authority: Option<&str>,
        scheme: &Scheme,
        version: Version,
    ) {
        let client = parts.extensions.get::<PeerAddr>().map(|p| p.0);
        if self.config.forwarded == ForwardedMode::Overwrite
            || self.config.x_forwarded == ForwardedMode::Overwrite
        {
            // At the edge nothing the client wrote about earlier hops is true, whichever
            // of the fields this hop writes itself.
            headers::remove_forwarding_fields(&mut parts.headers);
        }
        if self.config.forwarded != ForwardedMode::Off {
            let element = headers::forwarded_element(client, None, authority, scheme.as_str());
            headers::append_list(&mut parts.headers, header::FORWARDED, &element);
        }
        match self.config.x_forwarded {
            ForwardedMode::Off => {}
            mode => {
                let xff = http::HeaderName::from_static("x-forwarded-for");
                let xfp = http::HeaderName::from_static("x-forwarded-proto");
                let ip =
                    client.map_or_else(|| "unknown".to_string(), |c| headers::xff_node(c.ip()));
                if mode == ForwardedMode::Overwrite {
                    headers::set(&mut parts.headers, xff, &ip);
                    headers::set(&mut parts.headers, xfp, scheme.as_str());
                } else {
                    headers::append_list(&mut parts.headers, xff, &ip);
                    if !parts.headers.contains_key(&xfp) {
                        headers::set(&mut parts.headers, xfp, scheme.as_str());
                    }
                }
            }
        }
        self.add_via(&mut parts.headers, version);
    }

    fn add_via(&self, headers: &mut http::HeaderMap, version: Version) {
        let Some(values) = &self.config.via else {
            return;
        };
        let [v10, v11, v2, v3] = &**values;
        let value = match version {
            Version::HTTP_10 => v10,
            Version::HTTP_2 => v2,
            Version::HTTP_3 => v3,
            _ => v11,
        };
        if headers.contains_key(header::VIA) {
            if let Ok(element) = value.to_str() {
                headers::append_list(headers, header::VIA, element);
            }
        } else {
            headers.insert(header::VIA, value.clone());
        }
    }

    fn spawn_upgrade_relay(
        &self,
        downstream: hyper::upgrade::OnUpgrade,
        upstream: hyper::upgrade::OnUpgrade,
    ) -> tokio::task::JoinHandle<()> {
        let config = self.config.relay.clone();
        crate::task::spawn(async move {
            // The client side completes once hyper has written our 101.
            let (down, up) = tokio::join!(downstream, upstream);
            match (down, up) {
                (Ok(down), Ok(up)) => {
                    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                    let stats = relay_with(&mut down, &mut up, &config).await;
                    debug!(
                        bytes.up = stats.bytes_up,
                        bytes.down = stats.bytes_down,
                        first_close = ?stats.first_close,
                        "upgraded connection closed"
                    );
                }
                (down, up) => debug!(
                    downstream_ok = down.is_ok(),
                    upstream_ok = up.is_ok(),
                    "upgrade did not complete"
                ),
            }
        })
    }
}

/// The authority the client addressed: `:authority` / the absolute-form URI, else `Host`.
fn request_authority<B>(req: &Request<B>) -> Result<Option<String>, &'static str> {
    let host = match req.headers().get_all(header::HOST).iter().count() {
        0 => None,
        1 => req.headers().get(header::HOST),
        _ => return Err("more than one Host field"),
    };
    let host = host
        .map(|h| h.to_str().map_err(|_| "invalid Host"))
        .transpose()?;
    let authority = match (req.uri().authority(), host) {
        (Some(a), Some(h))
            if req.version() == Version::HTTP_2 && !a.as_str().eq_ignore_ascii_case(h) =>
        {
            return Err("Host differs from :authority")
        }
        (Some(a), _) => a.as_str().to_string(),
        (None, Some(h)) if h.parse::<http::uri::Authority>().is_ok() => h.to_string(),
        (None, Some(_)) => return Err("invalid Host"),
        (None, None) => return Ok(None),
    };
    // Userinfo is deprecated in http(s) URIs and an error in a request (RFC 9110 §4.2.4,
    // RFC 9113 §8.3.1); forwarded, it would become an invalid `Host` carrying credentials.
    if authority.contains('@') {
        return Err("userinfo in the authority");
    }
    Ok(Some(authority))
}

/// The scheme of the client's connection (see [`RequestScheme`]); the request's own
/// scheme is a claim and is ignored.
fn connection_scheme(extensions: &http::Extensions) -> Scheme {
    if let Some(s) = extensions.get::<RequestScheme>() {
        return s.0.clone();
    }
    // `get`, not `connect::lookup`: the TLS of an outer connection (a tunnel's carrier)
    // says nothing about the cleartext inside the tunnel.
    #[cfg(feature = "tls")]
    if extensions.get::<crate::tls::TlsInfo>().is_some() {
        return Scheme::HTTPS;
    }
    Scheme::HTTP
}

/// Rewrites the request line for the upstream: origin-form plus `Host` for HTTP/1.1,
/// absolute URI (→ `:scheme`, `:authority`, `:path`) and no `Host` for HTTP/2.
fn set_upstream_uri(
    parts: &mut Parts,
    protocol: UpstreamProtocol,
    scheme: &Scheme,
    authority: &str,
) -> Result<(), &'static str> {
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if protocol == UpstreamProtocol::Http2 {
        parts.uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|_| "invalid authority")?;
        parts.headers.remove(header::HOST);
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = Uri::from(path);
        // Usually the client's own (single, checked) `Host` already says it: keep it
        // rather than validate and copy the same bytes into a new value.
        let same = parts
            .headers
            .get(header::HOST)
            .is_some_and(|h| h.as_bytes() == authority.as_bytes());
        if !same {
            let host = HeaderValue::from_str(authority).map_err(|_| "invalid authority")?;
            parts.headers.insert(header::HOST, host);
        }
        parts.version = Version::HTTP_11;
    }
    Ok(())
}
