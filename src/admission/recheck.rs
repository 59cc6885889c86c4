//! Re-admission: a connection that was allowed when it started is checked again whenever
//! the policy that allowed it changes, and cut once the policy in force would refuse it.
//!
//! Admission decides once, at the start of a connection or tunnel; a policy that is
//! reloaded while the proxy runs (new allow lists, removed routes) would otherwise leave
//! connections open that it no longer allows. ztunnel closes such connections on every
//! policy change; [`RecheckLayer`] does the same for any inbound service. It does no IO
//! itself: the cut is dropping the served connection (both of its sides close), after
//! asking a non-socket stream for a reset through its [`Abort`](super::Abort) handle.
//!
//! Not here: where the policy comes from (any `tokio::sync::watch` channel: a reloaded
//! config file, a control plane), and checks of the peer's credentials (a revoked
//! certificate is cut by `tls::TerminateLayer::live`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tower::{Layer, Service};

use super::{Abort, Admission, Refusal, UpstreamRefusal};
use crate::conn::{Conn, Metadata};
use crate::BoxError;

/// Why [`Recheck`] ended a connection: the policy in force refuses it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[non_exhaustive]
pub enum RecheckError {
    /// The policy had already changed to refuse it when the connection reached the layer.
    #[error("refused by the policy in force")]
    Refused(#[source] UpstreamRefusal),
    /// A policy change while the connection ran refuses it: the connection was cut.
    #[error("no longer allowed by the changed policy; connection closed")]
    Revoked,
}

/// Wraps a service so that each connection is checked against a changing policy: when it
/// arrives (refused with [`Refusal::Denied`]: a tunnel terminator answers 401/403) and each
/// time the policy changes while it runs (cut: the served connection is dropped, so both of
/// its sides close, after a non-socket stream is asked for a reset through its
/// [`Abort`](super::Abort)).
///
/// `check` looks at the connection's metadata once, when it arrives, and returns the
/// verdict function for it: a closure that keeps what it needs (the peer's identity, the
/// route it took) and answers, for a policy, whether that connection is still allowed.
///
/// ```
/// use proxystack::admission::RecheckLayer;
/// use proxystack::conn::{Metadata, PeerAddr};
/// use proxystack::{Conn, BoxIo};
/// use std::net::IpAddr;
/// use tower::ServiceBuilder;
///
/// // The policy: which client addresses may stay connected. Reloading sends a new list.
/// let (reload, policy) = tokio::sync::watch::channel(vec![IpAddr::from([127, 0, 0, 1])]);
/// let service = ServiceBuilder::new()
///     .layer(RecheckLayer::new(policy, |m: &Metadata| {
///         let client = m.get::<PeerAddr>().map(|p| p.0.ip());
///         move |allowed: &Vec<IpAddr>| client.is_some_and(|c| allowed.contains(&c))
///     }))
///     .service_fn(|_conn: Conn<BoxIo>| async { Ok::<_, std::io::Error>(()) });
/// // Later: every connection from 127.0.0.1 is cut.
/// reload.send_replace(Vec::new());
/// # let _ = service;
/// ```
#[derive(Clone)]
pub struct RecheckLayer<P, F> {
    policy: watch::Receiver<P>,
    check: F,
}

impl<P, F> RecheckLayer<P, F> {
    /// Checks each connection with `check` against the values of `policy`.
    pub fn new(policy: watch::Receiver<P>, check: F) -> Self {
        Self { policy, check }
    }
}

impl<S, P, F: Clone> Layer<S> for RecheckLayer<P, F> {
    type Service = Recheck<S, P, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Recheck {
            inner,
            policy: self.policy.clone(),
            check: self.check.clone(),
        }
    }
}

impl<P, F> std::fmt::Debug for RecheckLayer<P, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecheckLayer").finish_non_exhaustive()
    }
}

/// A verdict for [`RecheckLayer`]: a connection stays allowed while `key` gives, for the
/// policy in force, the same `Some` value it gave when the connection arrived (the backend
/// it was routed to, how it is served); `None` refuses it. For policies where "still
/// allowed" means "nothing this connection depends on changed".
///
/// ```
/// use std::collections::HashMap;
/// use proxystack::admission::while_unchanged;
///
/// // Routes by name; a connection routed by "app" stays while "app" goes where it went.
/// let mut still_allowed = while_unchanged(|routes: &HashMap<&str, u16>| routes.get("app").copied());
/// assert!(still_allowed(&HashMap::from([("app", 8080)]))); // on arrival: recorded
/// assert!(still_allowed(&HashMap::from([("app", 8080), ("new", 9090)])));
/// assert!(!still_allowed(&HashMap::from([("app", 8081)]))); // rerouted: cut
/// ```
pub fn while_unchanged<P, K: PartialEq>(
    mut key: impl FnMut(&P) -> Option<K>,
) -> impl FnMut(&P) -> bool {
    let mut at_arrival = None;
    move |policy| {
        let Some(now) = key(policy) else {
            return false;
        };
        if let Some(first) = &at_arrival {
            return *first == now;
        }
        at_arrival = Some(now);
        true
    }
}

/// The service of [`RecheckLayer`].
#[derive(Clone)]
pub struct Recheck<S, P, F> {
    inner: S,
    policy: watch::Receiver<P>,
    check: F,
}

impl<S, P, F> std::fmt::Debug for Recheck<S, P, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recheck").finish_non_exhaustive()
    }
}

impl<S, I, P, F, C> Service<Conn<I>> for Recheck<S, P, F>
where
    S: Service<Conn<I>, Response = ()>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    P: Send + Sync + 'static,
    F: Fn(&Metadata) -> C,
    C: FnMut(&P) -> bool + Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        let mut allowed = (self.check)(conn.metadata());
        let mut policy = self.policy.clone();
        // The policy in force now, not the one an earlier admission step saw: a change in
        // between must not let the connection through.
        if !allowed(&policy.borrow_and_update()) {
            if let Some(admission) = conn.get::<Admission>() {
                admission.refuse(Refusal::Denied);
            }
            tracing::info!("refused by the policy in force");
            let refused = RecheckError::Refused(UpstreamRefusal(Refusal::Denied));
            return Box::pin(std::future::ready(Err(refused.into())));
        }
        let abort = conn.get::<Abort>().cloned();
        let served = self.inner.call(conn);
        Box::pin(async move {
            // Converted where it completes: the service's own error type need not be `Send`.
            let served = async move { served.await.map_err(Into::into) };
            tokio::pin!(served);
            loop {
                let changed = tokio::select! {
                    result = &mut served => return result,
                    changed = policy.changed() => changed.is_ok(),
                };
                if !changed {
                    // Nobody can change the policy any more: nothing left to check.
                    return served.await;
                }
                let still_allowed = allowed(&policy.borrow_and_update());
                if !still_allowed {
                    if let Some(abort) = &abort {
                        abort.abort();
                    }
                    tracing::info!("no longer allowed by the changed policy; closing");
                    return Err(RecheckError::Revoked.into());
                }
            }
        })
    }
}
