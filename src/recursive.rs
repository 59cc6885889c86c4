//! Graphs that refer to themselves: the terminated tunnel re-enters the same stack.
//!
//! A CONNECT terminator needs an inbound service to run each tunnel on, and that service
//! is usually the very graph that contains the terminator (a tunnel may carry TLS, which
//! may carry another CONNECT…). [`Recursive::new`] hands the graph's builder a
//! [`LateBound`] handle that resolves to the finished graph. Runaway nesting is stopped by
//! the terminators' maximum depth, not here.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tower::Service;

use crate::conn::{box_inbound, BoxInbound, Conn};

use crate::io::BoxIo;
use crate::BoxError;

/// A handle to an inbound service that is defined later (usually: the graph containing
/// this handle). Cheap to clone.
#[derive(Clone, Default)]
pub struct LateBound(Arc<OnceLock<BoxInbound>>);

impl std::fmt::Debug for LateBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LateBound")
            .field("bound", &self.0.get().is_some())
            .finish()
    }
}

/// The handle was called before [`LateBound::bind`].
#[derive(Debug, thiserror::Error)]
#[error("late-bound service used before it was bound")]
pub struct Unbound;

impl LateBound {
    /// An unbound handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds the handle; later calls are ignored (the first binding wins).
    pub fn bind(&self, service: BoxInbound) {
        let _ = self.0.set(service);
    }
}

impl Service<Conn<BoxIo>> for LateBound {
    type Response = ();
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<BoxIo>) -> Self::Future {
        match self.0.get() {
            Some(svc) => {
                let mut svc = svc.clone();
                Box::pin(async move {
                    std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                    svc.call(conn).await
                })
            }
            None => Box::pin(async { Err(Unbound.into()) }),
        }
    }
}

/// Builds a self-referential inbound graph.
///
/// ```
/// use proxystack::conn::Metadata;
/// use proxystack::recursive::Recursive;
/// use proxystack::{tcp, Conn, Target};
/// // A graph that may hand connections back to itself (here it never does).
/// let graph = Recursive::new(|_itself| {
///     tcp::Relay::new(tcp::TcpConnector::new())
///         .upstream(|_: &Metadata| Some(Target::from_static("127.0.0.1:9")))
/// });
/// # let _ = graph;
/// ```
#[derive(Debug)]
pub struct Recursive;

impl Recursive {
    /// Calls `build` with a handle to the graph it is building and returns the graph,
    /// type-erased; the handle is bound to the same graph.
    #[allow(clippy::new_ret_no_self)]
    pub fn new<F, S>(build: F) -> BoxInbound
    where
        F: FnOnce(LateBound) -> S,
        S: crate::conn::BoxableInbound,
    {
        let handle = LateBound::new();
        let graph = box_inbound(build(handle.clone()));
        handle.bind(graph.clone());
        graph
    }
}
