//! Branching an inbound graph on connection metadata.
//!
//! Level: none of its own (glue between inbound services). [`SteerLayer`] sends each
//! connection either to one of its branches or on to the service it wraps, chosen from the
//! connection's metadata (SNI, detected protocol, tunnel authority…). Not here: routing on
//! bytes (see [`detect`](crate::detect)), load balancing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service, ServiceExt};

use crate::conn::{box_inbound, BoxInbound, BoxableInbound, Conn, Metadata};
use crate::io::Io;
use crate::BoxError;

/// Builds [`Steer`] services: connections `pick` sends to a branch go there, all others
/// go on to the layered service.
///
/// The layered service keeps its type and its connection's IO type (steering is a choice
/// within one level, so nothing needs erasing on that path); the branches are boxed, as
/// they are different services by nature.
///
/// ```
/// use proxystack::conn::{LocalAddr, Metadata};
/// use proxystack::steer::SteerLayer;
/// use proxystack::{tcp, Target};
/// use tower::ServiceBuilder;
/// let to = |addr| tcp::Relay::new(tcp::TcpConnector::new()).to(Target::from_static(addr));
/// // Connections accepted on port 5433 go to the replica, all others to the primary.
/// let svc = ServiceBuilder::new()
///     .layer(SteerLayer::when(
///         |c: &Metadata| c.get::<LocalAddr>().is_some_and(|a| a.0.port() == 5433),
///         to("10.0.0.2:5432"),
///     ))
///     .service(to("10.0.0.1:5432"));
/// # let _ = svc;
/// ```
#[derive(Clone)]
pub struct SteerLayer<F> {
    branches: Arc<[BoxInbound]>,
    pick: F,
}

impl<F> std::fmt::Debug for SteerLayer<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SteerLayer")
            .field("branches", &self.branches.len())
            .finish()
    }
}

impl<F> SteerLayer<F>
where
    F: Fn(&Metadata) -> usize,
{
    /// `pick` returns an index into `branches`; an index past their end means the layered
    /// service (so no `branches` at all is a pass-through).
    pub fn new(branches: Vec<BoxInbound>, pick: F) -> Self {
        Self {
            branches: branches.into(),
            pick,
        }
    }
}

impl SteerLayer<()> {
    /// Two-way branch: `branch` when `predicate` holds, else the layered service.
    pub fn when<P, B>(predicate: P, branch: B) -> SteerLayer<impl Fn(&Metadata) -> usize + Clone>
    where
        P: Fn(&Metadata) -> bool + Clone,
        B: BoxableInbound,
    {
        SteerLayer::new(vec![box_inbound(branch)], move |m: &Metadata| {
            usize::from(!predicate(m))
        })
    }
}

impl<F: Clone, S> Layer<S> for SteerLayer<F> {
    type Service = Steer<F, S>;

    fn layer(&self, inner: S) -> Steer<F, S> {
        Steer {
            branches: self.branches.clone(),
            pick: self.pick.clone(),
            inner,
        }
    }
}

/// Sends each connection to one of several inbound services, chosen from its metadata;
/// built by [`SteerLayer`], or by [`Steer::new`] and [`Steer::by`]
/// where every service is boxed alike.
///
/// ```
/// use proxystack::conn::{LocalAddr, Metadata};
/// use proxystack::steer::Steer;
/// use proxystack::{tcp, Target};
/// let to = |addr| tcp::Relay::new(tcp::TcpConnector::new()).to(Target::from_static(addr));
/// // Connections accepted on port 5433 go to the replica, all others to the primary.
/// let svc = Steer::by(
///     |c: &Metadata| c.get::<LocalAddr>().is_some_and(|a| a.0.port() == 5433),
///     to("10.0.0.2:5432"),
///     to("10.0.0.1:5432"),
/// );
/// # let _ = svc;
/// ```
#[derive(Clone)]
pub struct Steer<F, S = BoxInbound> {
    branches: Arc<[BoxInbound]>,
    pick: F,
    inner: S,
}

impl<F, S> std::fmt::Debug for Steer<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steer")
            .field("services", &(self.branches.len() + 1))
            .finish()
    }
}

impl<F> Steer<F>
where
    F: Fn(&Metadata) -> usize + Clone,
{
    /// `pick` returns an index into `services`; an index past the end means the last one.
    ///
    /// # Panics
    /// If `services` is empty.
    #[allow(clippy::panic)]
    pub fn new(mut services: Vec<BoxInbound>, pick: F) -> Self {
        let Some(last) = services.pop() else {
            panic!("Steer needs at least one service");
        };
        SteerLayer::new(services, pick).layer(last)
    }
}

impl Steer<()> {
    /// Two-way branch: `yes` when `predicate` holds, else `no`
    /// (`SteerLayer::when(predicate, yes).layer(no)`).
    pub fn by<P, A, B>(predicate: P, yes: A, no: B) -> Steer<impl Fn(&Metadata) -> usize + Clone, B>
    where
        P: Fn(&Metadata) -> bool + Clone,
        A: BoxableInbound,
    {
        SteerLayer::when(predicate, yes).layer(no)
    }
}

impl<F, S, I> Service<Conn<I>> for Steer<F, S>
where
    F: Fn(&Metadata) -> usize,
    I: Io,
    S: Service<Conn<I>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Which service is called is known only per connection: each is readied in
        // `oneshot` on its own clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        match self.branches.get((self.pick)(conn.metadata())).cloned() {
            Some(branch) => Box::pin(branch.oneshot(conn.boxed())),
            None => {
                let inner = self.inner.clone();
                Box::pin(async move { inner.oneshot(conn).await.map_err(Into::into) })
            }
        }
    }
}
