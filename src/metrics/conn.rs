//! L4 metrics: [`ConnectionMetricsLayer`] (inbound, per listener) and
//! [`UpstreamMetricsLayer`] (around a connector, per upstream).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use pin_project_lite::pin_project;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use super::io::{abort_handle, CountingIo, Tally};
use super::istio::{ConnLabels, IstioMetrics};
use super::reason::FailureReason;
use super::scope::{self, ConnScope, Scope};
use super::LabelBudget;
use crate::conn::{Conn, PeerAddr};
use crate::identity::PeerIdentity;
use crate::io::Io;
use crate::{BoxError, Target};

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabel {
    listener: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    listener: Arc<str>,
    reason: FailureReason,
}

#[cfg(feature = "tls")]
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TlsFailureLabels {
    listener: Arc<str>,
    alert: &'static str,
    sender: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamFailureLabels {
    upstream: Arc<str>,
    reason: FailureReason,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Connection durations: 1 ms to about 70 min, ×4 per bucket.
fn connection_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// Connect latencies: 0.5 ms to about 16 s, ×2 per bucket.
pub(crate) fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The L4 metric families, registered under `proxystack_`.
///
/// Cheap to clone (an `Arc`). One per registry; hand it to a [`ConnectionMetricsLayer`]
/// per listener and to an [`UpstreamMetricsLayer`] per connector.
///
/// | metric | labels |
/// |---|---|
/// | `proxystack_connections_opened_total` | `listener` |
/// | `proxystack_connections_closed_total` | `listener` |
/// | `proxystack_connection_failures_total` | `listener`, `reason` ([`FailureReason`]) |
/// | `proxystack_connection_received_bytes_total` (from the client) | `listener` |
/// | `proxystack_connection_sent_bytes_total` (to the client) | `listener` |
/// | `proxystack_connection_duration_seconds` (histogram) | `listener` |
/// | `proxystack_tls_handshake_failures_total` | `listener`, `alert` (RFC 8446 name or `none`), `sender` (`local`/`peer`/`none`) |
/// | `proxystack_upstream_connects_total` (attempts) | `upstream` |
/// | `proxystack_upstream_connect_failures_total` | `upstream`, `reason` |
/// | `proxystack_upstream_connect_duration_seconds` (histogram, successful connects) | `upstream` |
/// | `proxystack_upstream_connections_closed_total` | `upstream` |
/// | `proxystack_upstream_received_bytes_total` / `_sent_bytes_total` | `upstream` |
/// | `proxystack_upstream_label_overflow_total` | — |
///
/// `upstream` is the target's `host:port`; distinct values are capped
/// ([`max_upstreams`](Self::max_upstreams), default 1 000), later ones are counted under
/// `upstream="other"`.
///
/// ```
/// use prometheus_client::registry::Registry;
/// use proxystack::metrics::ConnectionMetrics;
/// let mut registry = Registry::default();
/// let metrics = ConnectionMetrics::new(&mut registry).max_upstreams(200);
/// # let _ = metrics;
/// ```
#[derive(Clone)]
pub struct ConnectionMetrics {
    inner: Arc<Families>,
}

impl std::fmt::Debug for ConnectionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionMetrics").finish_non_exhaustive()
    }
}

struct Families {
    opened: Family<ListenerLabel, Counter>,
    closed: Family<ListenerLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    received: Family<ListenerLabel, Counter>,
    sent: Family<ListenerLabel, Counter>,
    duration: Histograms<ListenerLabel>,
    #[cfg(feature = "tls")]
    tls_failures: Family<TlsFailureLabels, Counter>,
    upstream_connects: Family<UpstreamLabel, Counter>,
    upstream_failures: Family<UpstreamFailureLabels, Counter>,
    upstream_connect_duration: Histograms<UpstreamLabel>,
    upstream_closed: Family<UpstreamLabel, Counter>,
    upstream_received: Family<UpstreamLabel, Counter>,
    upstream_sent: Family<UpstreamLabel, Counter>,
    upstreams: LabelBudget,
    other: Arc<str>,
}

impl ConnectionMetrics {
    /// Registers the L4 families in `registry` (prefix `proxystack_`).
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("proxystack");
        let families = Families {
            opened: Family::default(),
            closed: Family::default(),
            failures: Family::default(),
            received: Family::default(),
            sent: Family::default(),
            duration: Family::new_with_constructor(connection_histogram),
            #[cfg(feature = "tls")]
            tls_failures: Family::default(),
            upstream_connects: Family::default(),
            upstream_failures: Family::default(),
            upstream_connect_duration: Family::new_with_constructor(latency_histogram),
            upstream_closed: Family::default(),
            upstream_received: Family::default(),
            upstream_sent: Family::default(),
            upstreams: LabelBudget::new(1000, Counter::default()),
            other: Arc::from("other"),
        };
        let f = &families;
        r.register(
            "connections_opened",
            "Connections accepted",
            f.opened.clone(),
        );
        r.register(
            "connections_closed",
            "Connections ended, cleanly or not",
            f.closed.clone(),
        );
        r.register(
            "connection_failures",
            "Connections that ended with an error, by reason",
            f.failures.clone(),
        );
        r.register_with_unit(
            "connection_received",
            "Bytes received from clients",
            Unit::Bytes,
            f.received.clone(),
        );
        r.register_with_unit(
            "connection_sent",
            "Bytes sent to clients",
            Unit::Bytes,
            f.sent.clone(),
        );
        r.register_with_unit(
            "connection_duration",
            "Connection lifetimes",
            Unit::Seconds,
            f.duration.clone(),
        );
        #[cfg(feature = "tls")]
        r.register(
            "tls_handshake_failures",
            "Failed TLS handshakes, by alert and who sent it",
            f.tls_failures.clone(),
        );
        r.register(
            "upstream_connects",
            "Upstream connection attempts",
            f.upstream_connects.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Upstream connection attempts that failed, by reason",
            f.upstream_failures.clone(),
        );
        r.register_with_unit(
            "upstream_connect_duration",
            "Time to connect to upstreams (successful attempts)",
            Unit::Seconds,
            f.upstream_connect_duration.clone(),
        );
        r.register(
            "upstream_connections_closed",
            "Upstream connections closed",
            f.upstream_closed.clone(),
        );
        r.register_with_unit(
            "upstream_received",
            "Bytes received from upstreams",
            Unit::Bytes,
            f.upstream_received.clone(),
        );
        r.register_with_unit(
            "upstream_sent",
            "Bytes sent to upstreams",
            Unit::Bytes,
            f.upstream_sent.clone(),
        );
        r.register(
            "upstream_label_overflow",
            "Upstream connects counted under upstream=\"other\" because the upstream cap was reached",
            f.upstreams.overflow_counter(),
        );
        Self {
            inner: Arc::new(families),
        }
    }

    /// Most distinct `upstream` label values (default 1 000).
    pub fn max_upstreams(self, n: usize) -> Self {
        self.inner.upstreams.set_cap(n);
        self
    }

    fn upstream_label(&self, target: &Target) -> Arc<str> {
        let name = target.authority().to_string();
        if self.inner.upstreams.admit(&name) {
            Arc::from(name)
        } else {
            self.inner.other.clone()
        }
    }
}

impl LabelBudget {
    fn overflow_counter(&self) -> Counter {
        self.overflow.clone()
    }
}

/// Records connection metrics for one listener; see [`ConnectionMetrics`] for the metrics.
///
/// Wraps an inbound service (`Service<Conn<I>, Response = ()>`): its inner service gets a
/// `Conn<CountingIo<I>>`. The error becomes a [`BoxError`] (the original, boxed, so layers
/// above can still downcast it). A connection dropped before its service finished (the
/// drain deadline) counts as closed with reason `aborted`. The connection gets an
/// [`Abort`](crate::admission::Abort) handle in its metadata if it has none, so that resets
/// still reach the peer through the counting stream (see the
/// [module docs](super#where-to-put-them)).
///
/// ```
/// use prometheus_client::registry::Registry;
/// use proxystack::conn::Metadata;
/// use proxystack::metrics::{ConnectionMetrics, ConnectionMetricsLayer};
/// use proxystack::{tcp, Target};
/// use tower::Layer;
///
/// let mut registry = Registry::default();
/// let metrics = ConnectionMetrics::new(&mut registry);
/// let relay = tcp::Relay::new(tcp::TcpConnector::new())
///     .upstream(|_: &Metadata| Some(Target::from_static("127.0.0.1:8080")));
/// let service = ConnectionMetricsLayer::new(&metrics, "public").layer(relay);
/// # let _ = service;
/// ```
#[derive(Clone)]
pub struct ConnectionMetricsLayer {
    handles: Arc<ListenerHandles>,
    istio: Option<IstioMetrics>,
}

impl std::fmt::Debug for ConnectionMetricsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionMetricsLayer")
            .field("listener", &self.handles.listener)
            .field("istio", &self.istio.is_some())
            .finish()
    }
}

/// The listener's counters, resolved once so a connection does no family lookup.
struct ListenerHandles {
    listener: Arc<str>,
    metrics: ConnectionMetrics,
    opened: Counter,
    closed: Counter,
    received: Counter,
    sent: Counter,
    duration: Histogram,
    failures: [OnceLock<Counter>; FailureReason::ALL.len()],
}

impl ListenerHandles {
    fn failure(&self, reason: FailureReason) -> Option<&Counter> {
        let slot = self.failures.get(reason.index())?;
        Some(slot.get_or_init(|| {
            self.metrics
                .inner
                .failures
                .get_or_create_owned(&FailureLabels {
                    listener: self.listener.clone(),
                    reason,
                })
        }))
    }
}

impl ConnectionMetricsLayer {
    /// Records into `metrics` under `listener="<listener>"`.
    pub fn new(metrics: &ConnectionMetrics, listener: impl Into<String>) -> Self {
        let listener: Arc<str> = Arc::from(listener.into());
        let label = ListenerLabel {
            listener: listener.clone(),
        };
        let f = &metrics.inner;
        Self {
            handles: Arc::new(ListenerHandles {
                opened: f.opened.get_or_create_owned(&label),
                closed: f.closed.get_or_create_owned(&label),
                received: f.received.get_or_create_owned(&label),
                sent: f.sent.get_or_create_owned(&label),
                duration: f.duration.get_or_create_owned(&label),
                failures: Default::default(),
                listener,
                metrics: metrics.clone(),
            }),
            istio: None,
        }
    }

    /// Also records Istio's TCP metrics (`istio_tcp_*`) for these connections, and keeps
    /// their Istio labels for the [`HttpMetricsLayer`](super::HttpMetricsLayer) of the
    /// requests they carry.
    pub fn istio(mut self, istio: &IstioMetrics) -> Self {
        self.istio = Some(istio.clone());
        self
    }
}

impl<S> Layer<S> for ConnectionMetricsLayer {
    type Service = ConnectionMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ConnectionMetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`ConnectionMetricsLayer`].
#[derive(Clone, Debug)]
pub struct ConnectionMetricsService<S> {
    inner: S,
    layer: ConnectionMetricsLayer,
}

/// The scope of a connection: the one an outer layer made, else a new one recorded in
/// the metadata for layers further in.
pub(crate) fn conn_scope(metadata: &mut http::Extensions) -> Arc<Scope> {
    if let Some(s) = metadata.get::<ConnScope>() {
        return s.0.clone();
    }
    let s = Arc::new(Scope::default());
    metadata.insert(ConnScope(s.clone()));
    s
}

impl<S, I> Service<Conn<I>> for ConnectionMetricsService<S>
where
    I: Io,
    S: Service<Conn<CountingIo<I>>, Response = ()>,
    S::Error: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = ConnectionMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut conn: Conn<I>) -> Self::Future {
        let handles = self.layer.handles.clone();
        handles.opened.inc();
        let scope = conn_scope(conn.metadata_mut());
        let mut received = vec![handles.received.clone()];
        let mut sent = vec![handles.sent.clone()];
        let istio = self.layer.istio.as_ref().map(|istio| {
            let labels = scope
                .istio
                .get()
                .filter(|l| l.is_from(istio))
                .cloned()
                .unwrap_or_else(|| {
                    let labels = istio.connection(conn.metadata());
                    let _ = scope.istio.set(labels.clone());
                    labels
                });
            let (r, s) = labels.open_tcp();
            received.push(r);
            sent.push(s);
            labels
        });
        let tally = Arc::new(Tally::new(received, sent));
        let abort = abort_handle(conn.metadata_mut());
        let conn = conn.map_io(|io| CountingIo::new(io, tally, abort));
        let inner = &mut self.inner;
        let fut = scope::sync_in(&scope, || inner.call(conn));
        ConnectionMetricsFuture {
            inner: scope::in_scope(scope, fut),
            record: CloseRecord {
                handles,
                istio,
                started: Instant::now(),
                done: false,
            },
        }
    }
}

pin_project! {
    /// The future of [`ConnectionMetricsService`].
    pub struct ConnectionMetricsFuture<F> {
        // Declared first so it is dropped first: the stream inside it publishes its last
        // counts before `record` reads them.
        #[pin]
        inner: TaskLocalFuture<Arc<Scope>, F>,
        record: CloseRecord,
    }
}

impl<F> std::fmt::Debug for ConnectionMetricsFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionMetricsFuture")
            .finish_non_exhaustive()
    }
}

impl<F, E> Future for ConnectionMetricsFuture<F>
where
    F: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx)).map_err(Into::into);
        match &result {
            Ok(()) => this.record.finish(None),
            Err(e) => {
                let reason = FailureReason::classify(&**e);
                #[cfg(feature = "tls")]
                if let Some((sender, alert)) = super::reason::tls_alert(&**e) {
                    this.record.tls_failure(sender.as_str(), alert);
                }
                this.record.finish(Some(reason));
            }
        }
        Poll::Ready(result)
    }
}

/// Records a connection's end once: when its service returns, or as `aborted` when the
/// future is dropped first. (Its bytes were published by the stream itself, which is
/// gone by then.)
struct CloseRecord {
    handles: Arc<ListenerHandles>,
    istio: Option<Arc<ConnLabels>>,
    started: Instant,
    done: bool,
}

impl CloseRecord {
    fn finish(&mut self, reason: Option<FailureReason>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let h = &self.handles;
        h.closed.inc();
        h.duration.observe(self.started.elapsed().as_secs_f64());
        if let Some(counter) = reason.and_then(|r| h.failure(r)) {
            counter.inc();
        }
        if let Some(istio) = &self.istio {
            istio.close_tcp(FailureReason::istio_flags(reason));
        }
    }

    #[cfg(feature = "tls")]
    fn tls_failure(&self, sender: &'static str, alert: &'static str) {
        let h = &self.handles;
        h.metrics
            .inner
            .tls_failures
            .get_or_create(&TlsFailureLabels {
                listener: h.listener.clone(),
                alert,
                sender,
            })
            .inc();
    }
}

impl Drop for CloseRecord {
    fn drop(&mut self) {
        self.finish(Some(FailureReason::Aborted));
    }
}

/// Records per-upstream metrics around a connector (`Service<Target, Response =
/// Conn<O>>`); see [`ConnectionMetrics`] for the metrics. The connections it returns are
/// `Conn<CountingIo<O>>` with their metadata unchanged.
///
/// It also tells the inbound layers above (access log, HTTP metrics) what it dialled:
/// address, identity, connect time; see the [module docs](super#what-the-layers-see).
///
/// ```
/// use prometheus_client::registry::Registry;
/// use proxystack::metrics::{ConnectionMetrics, UpstreamMetricsLayer};
/// use proxystack::tcp;
/// use tower::Layer;
/// let mut registry = Registry::default();
/// let metrics = ConnectionMetrics::new(&mut registry);
/// let connector = UpstreamMetricsLayer::new(&metrics).layer(tcp::TcpConnector::new());
/// # let _ = connector;
/// ```
#[derive(Clone, Debug)]
pub struct UpstreamMetricsLayer {
    metrics: ConnectionMetrics,
}

impl UpstreamMetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: &ConnectionMetrics) -> Self {
        Self {
            metrics: metrics.clone(),
        }
    }
}

impl<C> Layer<C> for UpstreamMetricsLayer {
    type Service = UpstreamMetricsService<C>;
    fn layer(&self, inner: C) -> Self::Service {
        UpstreamMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The connector made by [`UpstreamMetricsLayer`].
#[derive(Clone, Debug)]
pub struct UpstreamMetricsService<C> {
    inner: C,
    metrics: ConnectionMetrics,
}

impl<C, O> Service<Target> for UpstreamMetricsService<C>
where
    C: Service<Target, Response = Conn<O>>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    O: Io,
{
    type Response = Conn<CountingIo<O>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let metrics = self.metrics.clone();
        let label = metrics.upstream_label(&target);
        let key = UpstreamLabel { upstream: label };
        let f = &metrics.inner;
        f.upstream_connects.get_or_create(&key).inc();
        let authority = target.authority().clone();
        #[cfg(feature = "connect")]
        let tunnel_authority = target
            .get::<crate::connect::ConnectAuthority>()
            .map(|a| a.0.clone());
        let started = Instant::now();
        let connect = self.inner.call(target);
        // Taken here, while the caller's scope is current: the future may be polled from
        // anywhere, but the record belongs to whoever asked for the connection.
        let current = scope::capture();
        Box::pin(async move {
            let f = &metrics.inner;
            match connect.await {
                Ok(mut conn) => {
                    f.upstream_connect_duration
                        .get_or_create(&key)
                        .observe(started.elapsed().as_secs_f64());
                    if let Some(current) = &current {
                        current.record_dial(|| scope::Dial {
                            authority,
                            peer: conn.get::<PeerAddr>().map(|p| p.0),
                            identity: super::find::<PeerIdentity>(conn.metadata())
                                .map(|i| i.0.clone()),
                            #[cfg(feature = "connect")]
                            tunnel_authority,
                            #[cfg(not(feature = "connect"))]
                            tunnel_authority: None,
                            connect_time: started.elapsed(),
                        });
                    }
                    let tally = Arc::new(Tally::with_close(
                        vec![f.upstream_received.get_or_create_owned(&key)],
                        vec![f.upstream_sent.get_or_create_owned(&key)],
                        f.upstream_closed.get_or_create_owned(&key),
                    ));
                    let abort = abort_handle(conn.metadata_mut());
                    Ok(conn.map_io(|io| CountingIo::new(io, tally, abort)))
                }
                Err(e) => {
                    let e: BoxError = e.into();
                    f.upstream_failures
                        .get_or_create(&UpstreamFailureLabels {
                            upstream: key.upstream.clone(),
                            reason: FailureReason::classify(&*e),
                        })
                        .inc();
                    Err(e)
                }
            }
        })
    }
}
