//! [`Router`]: one inner service per detected protocol.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};
use tracing::{debug, warn};

use super::classify::Protocol;
use crate::conn::{BoxIo, Conn, Io};
use crate::BoxError;

type Route = BoxCloneSyncService<Conn<BoxIo>, (), BoxError>;

/// Sends each connection to the service registered for its [`Protocol`] (recorded by
/// [`DetectLayer`](super::DetectLayer)). A protocol without a route is closed with a
/// tracing event; so is a connection without `Protocol` metadata.
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
}

/// Why a [`Router`] did not serve a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// No route for the detected protocol.
    #[error("no route for {0:?}")]
    NoRoute(Protocol),
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
        S: Service<Conn<BoxIo>, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        BoxCloneSyncService::new(svc.map_err(Into::into))
    }

    /// Route for TLS connections.
    pub fn tls<S>(mut self, svc: S) -> Self
    where
        S: Service<Conn<BoxIo>, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.tls = Some(Self::boxed(svc));
        self
    }

    /// Route for HTTP/1 connections.
    pub fn http1<S>(mut self, svc: S) -> Self
    where
        S: Service<Conn<BoxIo>, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.http1 = Some(Self::boxed(svc));
        self
    }

    /// Route for HTTP/2 prior-knowledge (h2c) connections.
    pub fn http2<S>(mut self, svc: S) -> Self
    where
        S: Service<Conn<BoxIo>, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.http2 = Some(Self::boxed(svc));
        self
    }

    /// Route for everything else, including server-first protocols.
    pub fn opaque<S>(mut self, svc: S) -> Self
    where
        S: Service<Conn<BoxIo>, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.opaque = Some(Self::boxed(svc));
        self
    }

    fn route(&self, protocol: Protocol) -> Option<&Route> {
        match protocol {
            Protocol::Tls => self.tls.as_ref(),
            Protocol::Http1 => self.http1.as_ref(),
            Protocol::Http2 => self.http2.as_ref(),
            Protocol::Opaque => self.opaque.as_ref(),
        }
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("tls", &self.tls.is_some())
            .field("http1", &self.http1.is_some())
            .field("http2", &self.http2.is_some())
            .field("opaque", &self.opaque.is_some())
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
            warn!(?protocol, "no route for detected protocol; closing");
            return Box::pin(async move { Err(RouterError::NoRoute(protocol)) });
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
