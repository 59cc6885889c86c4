//! Branching an inbound graph on connection metadata.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Service, ServiceExt};

use crate::conn::{box_inbound, BoxInbound, Conn, Metadata};

use crate::io::Io;
use crate::BoxError;

/// Sends each connection to one of several inbound services, chosen from the connection
/// from its metadata (SNI, detected protocol, tunnel authority…).
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
pub struct Steer<F> {
    services: Arc<[BoxInbound]>,
    pick: F,
}

impl<F> std::fmt::Debug for Steer<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steer")
            .field("services", &self.services.len())
            .finish()
    }
}

impl<F> Steer<F>
where
    F: Fn(&Metadata) -> usize,
{
    /// `pick` returns an index into `services`; an index past the end means the last one.
    ///
    /// # Panics
    /// If `services` is empty.
    #[allow(clippy::panic)]
    pub fn new(services: Vec<BoxInbound>, pick: F) -> Self {
        if services.is_empty() {
            panic!("Steer needs at least one service");
        }
        Self {
            services: services.into(),
            pick,
        }
    }
}

impl Steer<()> {
    /// Two-way branch: `yes` when `predicate` holds, else `no`.
    pub fn by<P, A, B>(predicate: P, yes: A, no: B) -> Steer<impl Fn(&Metadata) -> usize + Clone>
    where
        P: Fn(&Metadata) -> bool + Clone,
        A: crate::conn::BoxableInbound,
        B: crate::conn::BoxableInbound,
    {
        Steer::new(
            vec![box_inbound(yes), box_inbound(no)],
            move |m: &Metadata| usize::from(!predicate(m)),
        )
    }
}

impl<F, I> Service<Conn<I>> for Steer<F>
where
    F: Fn(&Metadata) -> usize,
    I: Io,
{
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        let conn = conn.boxed();
        let index = (self.pick)(conn.metadata()).min(self.services.len().saturating_sub(1));
        let service = self.services.get(index).cloned();
        Box::pin(async move {
            match service {
                Some(s) => s.oneshot(conn).await,
                None => Ok(()),
            }
        })
    }
}
