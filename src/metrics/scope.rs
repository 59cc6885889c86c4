//! What the outbound side did for one connection or request, seen from the inbound layers.
//!
//! The inbound layers ([`ConnectionMetricsLayer`](super::ConnectionMetricsLayer),
//! [`AccessLogLayer`](super::AccessLogLayer), and the HTTP ones per request) cannot see
//! which upstream their inner service picked or dialled: `tcp::Relay` and `http::Forward`
//! keep it to themselves. Rather than changing those services, each inbound layer runs its
//! inner service inside a tokio task-local [`Scope`], and the outbound hooks —
//! [`record_route`](super::record_route) around a router and
//! [`UpstreamMetricsLayer`](super::UpstreamMetricsLayer) around a connector — write into
//! whatever scope they run in. A router and a connector called from the same future as the
//! layer (as `Relay` and `Forward` call theirs) find it; one called from another task does
//! not, and then nothing is recorded (never a wrong value).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::addr::Authority;
use crate::identity::SpiffeId;

tokio::task_local! {
    static CURRENT: Arc<Scope>;
}

/// One upstream connection a connector made.
#[derive(Debug, Clone)]
pub(crate) struct Dial {
    /// The target's authority.
    pub(crate) authority: Authority,
    /// The address actually connected to, when the connector reported it.
    pub(crate) peer: Option<SocketAddr>,
    /// The upstream's authenticated identity (mutual TLS), when known.
    pub(crate) identity: Option<SpiffeId>,
    /// The `:authority` of the CONNECT tunnel carrying it (HBONE), if any.
    pub(crate) tunnel_authority: Option<Authority>,
    /// How long connecting took.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) connect_time: Duration,
}

/// The record of one connection (or one request): the route chosen and the first dial.
#[derive(Debug, Default)]
pub(crate) struct Scope {
    route: OnceLock<Authority>,
    /// Boxed: set only behind a metered connector, and a `Dial` inline would make every
    /// connection's scope (held while it is open) several times larger.
    dial: OnceLock<Box<Dial>>,
    /// The connection's Istio labels, computed once and shared by all its requests.
    pub(crate) istio: OnceLock<Arc<super::istio::ConnLabels>>,
    /// The connection's ends as the access log reports them, read once for all requests.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) ends: OnceLock<Arc<super::access_log::Ends>>,
}

impl Scope {
    /// The first upstream a router picked.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn route(&self) -> Option<&Authority> {
        self.route.get()
    }

    /// The first successful dial.
    pub(crate) fn dial(&self) -> Option<&Dial> {
        self.dial.get().map(|d| &**d)
    }

    /// Records a successful dial (the first one counts).
    pub(crate) fn record_dial(&self, dial: impl FnOnce() -> Dial) {
        if self.dial.get().is_none() {
            let _ = self.dial.set(Box::new(dial()));
        }
    }
}

/// Metadata: the connection-level scope, so that nested layers share one record (and the
/// HTTP layers find the connection's cached labels through the request extensions).
#[derive(Clone)]
pub(crate) struct ConnScope(pub(crate) Arc<Scope>);

/// Request extension: the request-level scope, shared by nested HTTP layers.
#[cfg(feature = "http")]
#[derive(Clone)]
pub(crate) struct RequestScope(pub(crate) Arc<Scope>);

/// Runs `f` (a service's `call`) with `scope` current, for services that pick their
/// upstream synchronously in `call` (as `tcp::Relay` does).
pub(crate) fn sync_in<R>(scope: &Arc<Scope>, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(scope.clone(), f)
}

/// Runs `fut` with `scope` current whenever it is polled.
pub(crate) fn in_scope<F: std::future::Future>(
    scope: Arc<Scope>,
    fut: F,
) -> tokio::task::futures::TaskLocalFuture<Arc<Scope>, F> {
    CURRENT.scope(scope, fut)
}

/// Records the route in the current scope (the first one counts).
pub(crate) fn record_route(authority: &Authority) {
    let _ = CURRENT.try_with(|s| {
        if s.route.get().is_none() {
            let _ = s.route.set(authority.clone());
        }
    });
}

/// The current scope, to record into later from elsewhere.
pub(crate) fn capture() -> Option<Arc<Scope>> {
    CURRENT.try_with(Arc::clone).ok()
}
