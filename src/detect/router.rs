//! [`Router`]: one inner service per detected protocol.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};
use tracing::{debug, info, warn};

use super::classify::{Protocol, Undecided};
use crate::conn::Conn;
use crate::io::{BoxIo, Io};
use crate::BoxError;

type Route = BoxCloneSyncService<Conn<BoxIo>, (), BoxError>;

/// What a refused connection that looked like HTTP/1 is told before it is closed.
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// How long a refusal may take (writing the `400`, reading what the client still sends so
/// that closing does not reset the connection before the answer is read).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Sends each connection to the service registered for its [`Protocol`] (recorded by
/// [`DetectLayer`](super::DetectLayer)).
///
/// **Fail closed.** A protocol without a route is refused: the connection is closed with a
/// tracing event and counted in [`RouterStats`]; an undecided connection that looked like
/// an HTTP/1 request (see [`Undecided::http_like`]) is first answered
/// `400 Bad Request`. In particular [`Protocol::Undecided`] goes to a route only when one
/// is registered with [`Router::undecided`]: a router that serves HTTP with policy and
/// relays [`Protocol::Opaque`] does not relay a request that merely *looks* odd (`GET  /`,
/// `http/1.1`, a pause in the request line), which a lenient backend might still read as
/// HTTP. A connection without `Protocol` metadata is refused too.
///
/// Routes are boxed (one allocation per connection, at this protocol boundary) so a
/// router's type does not depend on its routes.
///
/// ```
/// use proxystack::detect::Router;
/// use proxystack::{tcp, Conn, Target};
/// let relay = tcp::Relay::new(tcp::TcpConnector::new())
///     .upstream(|_: &proxystack::Metadata| Some(Target::from_static("127.0.0.1:8080")));
/// let router = Router::new()
///     .http1(relay.clone())
///     .opaque(relay);
/// # let _ = router;
/// ```
#[derive(Clone, Default)]
pub struct Router {
    tls: Option<Route>,
    http1: Option<Route>,
    http2: Option<Route>,
    opaque: Option<Route>,
    undecided: Option<Route>,
    /// The layered service of a [`RouterLayer`]: every *decided* protocol without a route.
    fallback: Option<Route>,
    stats: Arc<RouterStats>,
}

/// What a [`Router`] refused; shared by the router and all its clones.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RouterStats {
    /// Connections refused because no route serves their protocol.
    pub refused: AtomicU64,
    /// Of those, connections answered `400 Bad Request` (undecided, but HTTP-like).
    pub bad_requests: AtomicU64,
}

/// Why a [`Router`] did not serve a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// No route for the detected protocol.
    #[error("no route for {0:?}")]
    NoRoute(Protocol),
    /// The connection was undecided and no route takes undecided connections.
    #[error("protocol not recognised ({0:?}) and no route for undecided connections")]
    Undecided(Undecided),
    /// No `Protocol` metadata: `DetectLayer` is missing in front of the router.
    #[error("connection has no Protocol metadata")]
    Undetected,
    /// The route's service failed.
    #[error(transparent)]
    Route(BoxError),
}

impl Router {
    /// A router with no routes.
    pub fn new() -> Self {
        Self::default()
    }

    fn boxed<S>(svc: S) -> Route
    where
        S: crate::conn::BoxableInbound,
    {
        svc.boxed()
    }

    /// Route for TLS connections.
    pub fn tls<S>(mut self, svc: S) -> Self
    where
        S: crate::conn::BoxableInbound,
    {
        self.tls = Some(Self::boxed(svc));
        self
    }

    /// Route for HTTP/1 connections.
    pub fn http1<S>(mut self, svc: S) -> Self
    where
        S: crate::conn::BoxableInbound,
    {
        self.http1 = Some(Self::boxed(svc));
        self
    }

    /// Route for HTTP/2 prior-knowledge (h2c) connections.
    pub fn http2<S>(mut self, svc: S) -> Self
    where
        S: crate::conn::BoxableInbound,
    {
        self.http2 = Some(Self::boxed(svc));
        self
    }

    /// Route for connections that are definitely something else ([`Protocol::Opaque`]).
    pub fn opaque<S>(mut self, svc: S) -> Self
    where
        S: crate::conn::BoxableInbound,
    {
        self.opaque = Some(Self::boxed(svc));
        self
    }

    /// Route for connections detection could not decide ([`Protocol::Undecided`]):
    /// server-first protocols whose client stays silent, and text that resembles HTTP but
    /// is not well-formed. Register one only where no HTTP policy is expected to hold
    /// (typically the same relay as [`opaque`](Self::opaque)); without it they are refused.
    pub fn undecided<S>(mut self, svc: S) -> Self
    where
        S: crate::conn::BoxableInbound,
    {
        self.undecided = Some(Self::boxed(svc));
        self
    }

    /// The refusal counters of this router (and all its clones).
    pub fn stats(&self) -> Arc<RouterStats> {
        self.stats.clone()
    }

    /// This router as a [`RouterLayer`] (the layered service serves the decided protocols
    /// it has no route for).
    pub fn into_layer(self) -> RouterLayer {
        RouterLayer::new(self)
    }

    fn route(&self, protocol: Protocol) -> Option<&Route> {
        let own = match protocol {
            Protocol::Tls => self.tls.as_ref(),
            Protocol::Http1 => self.http1.as_ref(),
            Protocol::Http2 => self.http2.as_ref(),
            Protocol::Opaque => self.opaque.as_ref(),
            // Fail closed: only an explicit route takes what detection could not decide.
            Protocol::Undecided => return self.undecided.as_ref(),
        };
        own.or(self.fallback.as_ref())
    }
}

/// A [`Router`] as a [`tower::Layer`]: the layered service serves every **decided**
/// protocol the router has no route for, so a stack reads as "these protocols here, the
/// rest goes on" — typically an HTTP server on `http1`/`http2` over a relay for the rest.
///
/// Why the fallback, and why not for undecided connections: the layered service of a
/// detection router can only be *one* of its routes, and the one a stack continues to is
/// the general case (opaque bytes, TLS that is passed through). [`Protocol::Undecided`]
/// still needs its own route ([`Router::undecided`]): a fallback taking it would relay
/// malformed HTTP past the HTTP policy (see the [module docs](super), *fail closed*).
/// The fallback is boxed like the routes: detection is a protocol boundary and every
/// route gets a [`Conn<BoxIo>`](crate::Conn) anyway.
///
/// ```
/// # #[cfg(feature = "http")] {
/// use proxystack::detect::{DetectLayer, Router, RouterLayer};
/// use proxystack::http::{Forward, HttpServer};
/// use proxystack::{tcp, Target};
/// use tower::ServiceBuilder;
/// let upstream = Target::from_static("127.0.0.1:8080");
/// let http = HttpServer::new(Forward::to(tcp::TcpConnector::new(), upstream.clone()));
/// // HTTP/1 and h2c get the HTTP server; TLS and other protocols are relayed as bytes.
/// let svc = ServiceBuilder::new()
///     .layer(DetectLayer::new())
///     .layer(RouterLayer::new(Router::new().http1(http.clone()).http2(http)))
///     .service(tcp::Relay::new(tcp::TcpConnector::new()).to(upstream));
/// # let _ = svc; }
/// ```
#[derive(Clone, Debug, Default)]
pub struct RouterLayer {
    router: Router,
}

impl RouterLayer {
    /// `router`'s routes; the layered service takes the decided protocols without one.
    /// The routers it builds share `router`'s [`stats`](Router::stats).
    pub fn new(router: Router) -> Self {
        Self { router }
    }
}

impl From<Router> for RouterLayer {
    fn from(router: Router) -> Self {
        Self::new(router)
    }
}

impl<S: crate::conn::BoxableInbound> tower::Layer<S> for RouterLayer {
    type Service = Router;

    fn layer(&self, inner: S) -> Router {
        Router {
            fallback: Some(Router::boxed(inner)),
            ..self.router.clone()
        }
    }
}

/// Refuses a connection nobody serves: `400` first where the client was trying HTTP/1.
async fn refuse<I: Io>(conn: Conn<I>, protocol: Protocol, stats: Arc<RouterStats>) -> RouterError {
    stats.refused.fetch_add(1, Ordering::Relaxed);
    let why = conn.get::<Undecided>().copied();
    let (mut io, _) = conn.into_parts();
    match why {
        Some(why) if why.http_like() => {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            info!(
                ?why,
                "not a well-formed HTTP request and no route for it; 400"
            );
            // Bounded: a client that neither reads nor closes costs at most the linger.
            let _ = tokio::time::timeout(REFUSAL_LINGER, async {
                io.write_all(BAD_REQUEST).await?;
                io.shutdown().await?;
                let mut sink = [0u8; 4096];
                let mut left: usize = 64 * 1024;
                while left > 0 {
                    let n = io.read(&mut sink).await?;
                    if n == 0 {
                        break;
                    }
                    left = left.saturating_sub(n);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
        }
        Some(why) => info!(?why, "protocol not recognised and no route for it; closing"),
        None => info!(?protocol, "no route for detected protocol; closing"),
    }
    match why {
        Some(why) if protocol == Protocol::Undecided => RouterError::Undecided(why),
        _ => RouterError::NoRoute(protocol),
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("tls", &self.tls.is_some())
            .field("http1", &self.http1.is_some())
            .field("http2", &self.http2.is_some())
            .field("opaque", &self.opaque.is_some())
            .field("undecided", &self.undecided.is_some())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl<I: Io> Service<Conn<I>> for Router {
    type Response = ();
    type Error = RouterError;
    type Future = Pin<Box<dyn Future<Output = Result<(), RouterError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        let Some(protocol) = conn.get::<Protocol>().copied() else {
            warn!("connection without Protocol metadata; is DetectLayer missing? closing");
            return Box::pin(async { Err(RouterError::Undetected) });
        };
        let Some(route) = self.route(protocol).cloned() else {
            let stats = self.stats.clone();
            return Box::pin(async move { Err(refuse(conn, protocol, stats).await) });
        };
        debug!(?protocol, "routing");
        Box::pin(async move {
            route
                .oneshot(conn.boxed())
                .await
                .map_err(RouterError::Route)
        })
    }
}
