//! Istio's standard metrics: the label model, where each label comes from, and the cap on
//! distinct label sets.

use std::hash::Hash;
use std::sync::{Arc, OnceLock};

use http::Extensions;
use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{find, LabelBudget};
use crate::identity::{PeerIdentity, SpiffeId};

/// Who reports a metric: Istio's `reporter` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client side's proxy (an outbound capture: sidecar or ztunnel outbound).
    Source,
    /// The server side's proxy (an inbound listener, HBONE inbound).
    Destination,
    /// A waypoint between them.
    Waypoint,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// What is known about one workload (a pod): the `source_*` or `destination_*` labels.
///
/// Fields left `None` are reported as `unknown`.
///
/// ```
/// use proxystack::metrics::Workload;
/// let me = Workload::new()
///     .name("reviews-v2")
///     .namespace("default")
///     .canonical_service("reviews")
///     .canonical_revision("v2");
/// # let _ = me;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Workload {
    /// Workload name (`*_workload`), e.g. the Deployment's name.
    pub name: Option<String>,
    /// Namespace (`*_workload_namespace`).
    pub namespace: Option<String>,
    /// Canonical service (`*_canonical_service`, also `*_app`).
    pub canonical_service: Option<String>,
    /// Canonical revision (`*_canonical_revision`, also `*_version`).
    pub canonical_revision: Option<String>,
    /// Cluster id (`*_cluster`).
    pub cluster: Option<String>,
    /// The workload's SPIFFE identity (`*_principal`).
    pub principal: Option<SpiffeId>,
}

impl Workload {
    /// Nothing known yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// What an authenticated identity alone says: the principal, and the namespace of an
    /// Istio-form ID (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub fn from_identity(id: &SpiffeId) -> Self {
        Self {
            namespace: id.istio_parts().map(|(ns, _)| ns.to_owned()),
            principal: Some(id.clone()),
            ..Self::default()
        }
    }

    /// Sets the workload name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Sets the canonical service (reported as `*_canonical_service` and `*_app`).
    pub fn canonical_service(mut self, service: impl Into<String>) -> Self {
        self.canonical_service = Some(service.into());
        self
    }

    /// Sets the canonical revision (reported as `*_canonical_revision` and `*_version`).
    pub fn canonical_revision(mut self, revision: impl Into<String>) -> Self {
        self.canonical_revision = Some(revision.into());
        self
    }

    /// Sets the cluster id.
    pub fn cluster(mut self, cluster: impl Into<String>) -> Self {
        self.cluster = Some(cluster.into());
        self
    }

    /// Sets the principal.
    pub fn principal(mut self, principal: SpiffeId) -> Self {
        self.principal = Some(principal);
        self
    }
}

type PeerResolver = Arc<dyn Fn(&Extensions) -> Option<Workload> + Send + Sync>;
type ServiceResolver = Arc<dyn Fn(&Extensions) -> Option<String> + Send + Sync>;

/// Longest label value taken from a connection (host names, principals); longer values are
/// cut, so one peer cannot make every series it touches kilobytes long.
const MAX_VALUE_LEN: usize = 256;

/// Istio's standard metrics, registered under their Istio names.
///
/// Names and labels follow Istio's "Istio Standard Metrics" reference and ztunnel's
/// implementation of it, so Istio's Grafana dashboards and Kiali's graph read them as they
/// read ztunnel's or Envoy's:
///
/// * TCP: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
///   `istio_tcp_sent_bytes_total` (bytes sent *during response*, i.e. towards the
///   client), `istio_tcp_received_bytes_total` (bytes of the request, from the client);
/// * HTTP: `istio_requests_total`, `istio_request_duration_milliseconds` (to the response
///   head), with `response_code` and `grpc_response_status` in addition;
/// * labels: `reporter`, `source_workload`, `source_canonical_service`,
///   `source_canonical_revision`, `source_workload_namespace`, `source_principal`,
///   `source_app`, `source_version`, `source_cluster`, `destination_service`,
///   `destination_service_namespace`, `destination_service_name`, `destination_workload`,
///   `destination_canonical_service`, `destination_canonical_revision`,
///   `destination_workload_namespace`, `destination_principal`, `destination_app`,
///   `destination_version`, `destination_cluster`, `request_protocol`, `response_flags`,
///   `connection_security_policy`. A value we cannot know is `unknown`, as Istio writes it.
///
/// Cheap to clone. Hand it to [`ConnectionMetricsLayer::istio`] (TCP metrics, and the
/// per-connection label cache) and to [`HttpMetricsLayer::istio`] (request metrics).
///
/// Where the labels come from, per connection:
///
/// * `reporter`: the builder's [`Reporter`];
/// * this proxy's own side (`destination_*` for [`Reporter::Destination`], `source_*` for
///   [`Reporter::Source`]): the builder's [`workload`](IstioMetricsBuilder::workload);
/// * the other side: the builder's [`peer`](IstioMetricsBuilder::peer) resolver (your
///   workload registry), else what the connection proves: the mutual-TLS
///   [`PeerIdentity`] (looked up through tunnels) as `source_principal` and the namespace
///   of its Istio-form ID;
/// * `destination_service`: the [`destination_service`](IstioMetricsBuilder::destination_service)
///   resolver, else the HBONE `forwarded: host=`, else the tunnel authority's host name,
///   else the TLS SNI; `destination_service_name` / `_namespace` split from
///   `<name>.<namespace>.svc.<domain>`;
/// * `connection_security_policy`: `mutual_tls` when the connection, or a tunnel it came
///   through, was TLS with a verified client certificate, else `none`; `unknown` for
///   [`Reporter::Source`] (as Istio documents it);
/// * `request_protocol`: `tcp`, or per request `http` / `grpc`;
/// * `response_flags`: `-`, or on a closed connection `DENY` (policy) / `CONNECT`
///   (upstream unreachable), as ztunnel reports them.
///
/// **Cardinality:** distinct label sets (per connection, before `response_code`) are
/// capped ([`max_label_sets`](IstioMetricsBuilder::max_label_sets), default 10 000).
/// Beyond the cap, every value derived from the peer becomes `other` and
/// `proxystack_istio_label_overflow_total` counts the connections so collapsed: a flood of
/// identities or host names costs a bounded number of series.
///
/// [`ConnectionMetricsLayer::istio`]: super::ConnectionMetricsLayer::istio
/// [`HttpMetricsLayer::istio`]: super::HttpMetricsLayer::istio
///
/// ```
/// use prometheus_client::registry::Registry;
/// use proxystack::metrics::{IstioMetrics, Reporter, Workload};
/// let mut registry = Registry::default();
/// let istio = IstioMetrics::builder(Reporter::Destination)
///     .workload(Workload::new().name("reviews-v1").namespace("default"))
///     .register(&mut registry);
/// # let _ = istio;
/// ```
#[derive(Clone)]
pub struct IstioMetrics {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for IstioMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioMetrics")
            .field("reporter", &self.inner.reporter)
            .finish_non_exhaustive()
    }
}

/// Builds [`IstioMetrics`]; see there for what each setting feeds.
pub struct IstioMetricsBuilder {
    reporter: Reporter,
    local: Workload,
    peer: Option<PeerResolver>,
    service: Option<ServiceResolver>,
    max_label_sets: usize,
}

impl std::fmt::Debug for IstioMetricsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioMetricsBuilder")
            .field("reporter", &self.reporter)
            .field("local", &self.local)
            .field("max_label_sets", &self.max_label_sets)
            .finish_non_exhaustive()
    }
}

impl IstioMetricsBuilder {
    /// This proxy's own workload.
    pub fn workload(mut self, workload: Workload) -> Self {
        self.local = workload;
        self
    }

    /// Resolves the other side's workload from the connection's metadata (e.g. from a
    /// workload registry by [`PeerIdentity`] or `OriginalDst`). Called once per
    /// connection; `None` falls back to what the connection proves.
    pub fn peer(
        mut self,
        resolve: impl Fn(&Extensions) -> Option<Workload> + Send + Sync + 'static,
    ) -> Self {
        self.peer = Some(Arc::new(resolve));
        self
    }

    /// Resolves `destination_service` (a host name such as
    /// `reviews.default.svc.cluster.local`) from the connection's metadata. Called once
    /// per connection; `None` falls back to the default sources.
    pub fn destination_service(
        mut self,
        resolve: impl Fn(&Extensions) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.service = Some(Arc::new(resolve));
        self
    }

    /// Most distinct label sets kept (default 10 000); see [`IstioMetrics`].
    pub fn max_label_sets(mut self, n: usize) -> Self {
        self.max_label_sets = n;
        self
    }

    /// Registers the metrics in `registry` under their Istio names.
    pub fn register(self, registry: &mut Registry) -> IstioMetrics {
        let istio = registry.sub_registry_with_prefix("istio");
        #[cfg(feature = "http")]
        let requests = Family::default();
        #[cfg(feature = "http")]
        istio.register(
            "requests",
            "Requests handled, by response code",
            requests.clone(),
        );
        #[cfg(feature = "http")]
        let duration: RequestHistograms = Family::new_with_constructor(request_histogram);
        #[cfg(feature = "http")]
        istio.register(
            "request_duration_milliseconds",
            "Time to the response head, in milliseconds",
            duration.clone(),
        );
        let tcp_opened = Family::default();
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        let tcp_closed = Family::default();
        istio.register(
            "tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        let tcp_sent = Family::default();
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent during response (towards the client) on TCP connections",
            tcp_sent.clone(),
        );
        let tcp_received = Family::default();
        istio.register(
            "tcp_received_bytes",
            "Bytes received during request (from the client) on TCP connections",
            tcp_received.clone(),
        );
        let overflow = Counter::default();
        registry.register(
            "proxystack_istio_label_overflow",
            "Connections whose Istio labels were collapsed to `other` because the label-set cap was reached",
            overflow.clone(),
        );
        let unknown: Arc<str> = Arc::from("unknown");
        let local = LocalLabels::new(&self.local, &unknown);
        IstioMetrics {
            inner: Arc::new(Inner {
                reporter: self.reporter,
                local,
                peer: self.peer,
                service: self.service,
                #[cfg(feature = "http")]
                requests,
                #[cfg(feature = "http")]
                duration,
                tcp_opened,
                tcp_closed,
                tcp_sent,
                tcp_received,
                budget: LabelBudget::new(self.max_label_sets, overflow),
                other: Arc::from("other"),
                unknown,
            }),
        }
    }
}

#[cfg(feature = "http")]
type RequestHistograms = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// Istio's default request duration buckets, in milliseconds.
#[cfg(feature = "http")]
fn request_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

pub(crate) struct Inner {
    reporter: Reporter,
    local: LocalLabels,
    peer: Option<PeerResolver>,
    service: Option<ServiceResolver>,
    #[cfg(feature = "http")]
    requests: Family<HttpLabels, Counter>,
    #[cfg(feature = "http")]
    duration: RequestHistograms,
    tcp_opened: Family<TrafficLabels, Counter>,
    tcp_closed: Family<TrafficLabels, Counter>,
    tcp_sent: Family<TrafficLabels, Counter>,
    tcp_received: Family<TrafficLabels, Counter>,
    budget: LabelBudget,
    other: Arc<str>,
    unknown: Arc<str>,
}

impl IstioMetrics {
    /// Starts building for the given reporter.
    pub fn builder(reporter: Reporter) -> IstioMetricsBuilder {
        IstioMetricsBuilder {
            reporter,
            local: Workload::default(),
            peer: None,
            service: None,
            max_label_sets: 10_000,
        }
    }

    /// The labels of a connection with this metadata, within the cap.
    pub(crate) fn connection(&self, metadata: &Extensions) -> Arc<ConnLabels> {
        let inner = &self.inner;
        let mut labels = self.derive(metadata);
        if !inner.budget.admit(&labels) {
            labels.collapse(&inner.other);
        }
        Arc::new(ConnLabels {
            metrics: self.clone(),
            tcp: labels,
            http_cache: Default::default(),
        })
    }

    fn derive(&self, metadata: &Extensions) -> TrafficLabels {
        let inner = &self.inner;
        let peer = inner
            .peer
            .as_ref()
            .and_then(|resolve| resolve(metadata))
            .or_else(|| self.proven_peer(metadata))
            .unwrap_or_default();
        let peer = PeerLabels::new(&peer, &inner.unknown);
        let service = inner
            .service
            .as_ref()
            .and_then(|resolve| resolve(metadata))
            .or_else(|| default_service(metadata));
        let (service, service_name, service_namespace) = match service {
            Some(host) => {
                let host = bounded(&host);
                let (name, ns) = split_service(host);
                (
                    Arc::from(host),
                    Arc::from(name),
                    ns.map_or_else(|| inner.unknown.clone(), Arc::from),
                )
            }
            None => (
                inner.unknown.clone(),
                inner.unknown.clone(),
                inner.unknown.clone(),
            ),
        };
        let security = match inner.reporter {
            Reporter::Source => "unknown",
            _ if came_over_mtls(metadata) => "mutual_tls",
            _ => "none",
        };
        let local = inner.local.side();
        let (source, destination) = match inner.reporter {
            Reporter::Source => (local, peer),
            // A waypoint is neither end; what it knows about the destination comes from
            // the peer resolver's view of the connection too, so only the source is set.
            Reporter::Destination => (peer, local),
            Reporter::Waypoint => (peer, PeerLabels::unknown(&inner.unknown)),
        };
        TrafficLabels {
            reporter: inner.reporter,
            source: source.retag(),
            destination_service: service,
            destination_service_namespace: service_namespace,
            destination_service_name: service_name,
            destination: destination.retag(),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: security,
        }
    }

    /// What the connection itself proves about the other side.
    fn proven_peer(&self, metadata: &Extensions) -> Option<Workload> {
        match self.inner.reporter {
            // The authenticated client is the source; on the source side, the downstream
            // is our own application, not the destination.
            Reporter::Destination | Reporter::Waypoint => {
                find::<PeerIdentity>(metadata).map(|id| Workload::from_identity(&id.0))
            }
            Reporter::Source => None,
        }
    }

    #[cfg(feature = "http")]
    pub(crate) fn record_request(
        &self,
        conn: &ConnLabels,
        protocol: &'static str,
        code: u16,
        grpc_status: &'static str,
        millis: f64,
    ) {
        let cached = protocol == "http" && grpc_status.is_empty();
        let slot = if cached {
            common_code_index(code).and_then(|i| conn.http_cache.get(i))
        } else {
            None
        };
        let record = |(count, hist): &(Counter, Histogram)| {
            count.inc();
            hist.observe(millis);
        };
        match slot {
            // Lock-free after a connection's first request with this code.
            Some(slot) => {
                record(slot.get_or_init(|| self.http_handles(conn, protocol, code, grpc_status)))
            }
            None => record(&self.http_handles(conn, protocol, code, grpc_status)),
        }
    }

    #[cfg(feature = "http")]
    fn http_handles(
        &self,
        conn: &ConnLabels,
        protocol: &'static str,
        code: u16,
        grpc_status: &'static str,
    ) -> (Counter, Histogram) {
        let mut traffic = conn.tcp.clone();
        traffic.request_protocol = protocol;
        let labels = HttpLabels {
            traffic,
            response_code: code,
            grpc_response_status: grpc_status,
        };
        (
            self.inner.requests.get_or_create_owned(&labels),
            self.inner.duration.get_or_create_owned(&labels),
        )
    }
}

/// One connection's labels and its caches, shared by the connection's layers and requests.
#[derive(Debug)]
pub(crate) struct ConnLabels {
    metrics: IstioMetrics,
    tcp: TrafficLabels,
    /// Request handles for the common status codes (`request_protocol="http"`, no gRPC
    /// status), filled on first use: later requests look them up without a lock.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    http_cache: [OnceLock<(Counter, Histogram)>; COMMON_CODES.len()],
}

impl ConnLabels {
    /// Whether these labels were made by `metrics` (a stack could hold two).
    pub(crate) fn is_from(&self, metrics: &IstioMetrics) -> bool {
        Arc::ptr_eq(&self.metrics.inner, &metrics.inner)
    }

    /// Counts the connection opened; returns the byte counters (received, sent).
    pub(crate) fn open_tcp(&self) -> (Counter, Counter) {
        let m = &self.metrics.inner;
        m.tcp_opened.get_or_create(&self.tcp).inc();
        (
            m.tcp_received.get_or_create_owned(&self.tcp),
            m.tcp_sent.get_or_create_owned(&self.tcp),
        )
    }

    /// Counts the connection closed, with the response flags its end calls for.
    pub(crate) fn close_tcp(&self, flags: &'static str) {
        let m = &self.metrics.inner;
        if flags == self.tcp.response_flags {
            m.tcp_closed.get_or_create(&self.tcp).inc();
        } else {
            let mut labels = self.tcp.clone();
            labels.response_flags = flags;
            m.tcp_closed.get_or_create(&labels).inc();
        }
    }

    #[cfg(feature = "http")]
    pub(crate) fn metrics(&self) -> &IstioMetrics {
        &self.metrics
    }
}

/// Status codes whose request handles are cached per connection.
const COMMON_CODES: [u16; 25] = [
    200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 413,
    429, 500, 501, 502, 503, 504,
];

#[cfg(feature = "http")]
fn common_code_index(code: u16) -> Option<usize> {
    COMMON_CODES.binary_search(&code).ok()
}

/// The labels every Istio metric carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct TrafficLabels {
    reporter: Reporter,
    #[prometheus(flatten)]
    source: SideLabels<Source>,
    destination_service: Arc<str>,
    destination_service_namespace: Arc<str>,
    destination_service_name: Arc<str>,
    #[prometheus(flatten)]
    destination: SideLabels<Destination>,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

impl TrafficLabels {
    /// Replaces every value that came from the peer with `other`.
    fn collapse(&mut self, other: &Arc<str>) {
        let local_is_source = self.reporter == Reporter::Source;
        if !local_is_source {
            self.source.collapse(other);
        }
        if self.reporter != Reporter::Destination {
            self.destination.collapse(other);
        }
        self.destination_service = other.clone();
        self.destination_service_namespace = other.clone();
        self.destination_service_name = other.clone();
    }
}

/// `TrafficLabels` plus the two request-only labels.
#[cfg(feature = "http")]
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct HttpLabels {
    #[prometheus(flatten)]
    traffic: TrafficLabels,
    response_code: u16,
    grpc_response_status: &'static str,
}

/// Which side a [`SideLabels`] describes: decides the label names.
pub(crate) trait SideName: Clone + std::fmt::Debug + PartialEq + Eq + Hash {
    const NAMES: [&'static str; 8];
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Source;
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Destination;

impl SideName for Source {
    const NAMES: [&'static str; 8] = [
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
    ];
}

impl SideName for Destination {
    const NAMES: [&'static str; 8] = [
        "destination_workload",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_cluster",
    ];
}

/// One side's eight labels, in Istio's order (app = canonical service, version =
/// canonical revision, as ztunnel reports them).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SideLabels<S> {
    workload: Arc<str>,
    canonical_service: Arc<str>,
    canonical_revision: Arc<str>,
    namespace: Arc<str>,
    principal: Arc<str>,
    cluster: Arc<str>,
    side: std::marker::PhantomData<S>,
}

impl<S> SideLabels<S> {
    fn collapse(&mut self, other: &Arc<str>) {
        for v in [
            &mut self.workload,
            &mut self.canonical_service,
            &mut self.canonical_revision,
            &mut self.namespace,
            &mut self.principal,
            &mut self.cluster,
        ] {
            *v = other.clone();
        }
    }

    fn retag<T>(self) -> SideLabels<T> {
        SideLabels {
            workload: self.workload,
            canonical_service: self.canonical_service,
            canonical_revision: self.canonical_revision,
            namespace: self.namespace,
            principal: self.principal,
            cluster: self.cluster,
            side: std::marker::PhantomData,
        }
    }
}

impl<S: SideName> EncodeLabelSet for SideLabels<S> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let [workload, service, revision, namespace, principal, app, version, cluster] = S::NAMES;
        let values: [(&str, &Arc<str>); 8] = [
            (workload, &self.workload),
            (service, &self.canonical_service),
            (revision, &self.canonical_revision),
            (namespace, &self.namespace),
            (principal, &self.principal),
            (app, &self.canonical_service),
            (version, &self.canonical_revision),
            (cluster, &self.cluster),
        ];
        for (name, value) in values {
            EncodeLabel::encode(&(name, &**value), encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A side's labels before they know which side they are.
type PeerLabels = SideLabels<()>;

impl PeerLabels {
    fn new(w: &Workload, unknown: &Arc<str>) -> Self {
        let value = |v: &Option<String>| {
            v.as_deref()
                .map_or_else(|| unknown.clone(), |v| Arc::from(bounded(v)))
        };
        Self {
            workload: value(&w.name),
            canonical_service: value(&w.canonical_service),
            canonical_revision: value(&w.canonical_revision),
            namespace: value(&w.namespace),
            principal: w
                .principal
                .as_ref()
                .map_or_else(|| unknown.clone(), |p| Arc::from(bounded(p.as_str()))),
            cluster: value(&w.cluster),
            side: std::marker::PhantomData,
        }
    }

    fn unknown(unknown: &Arc<str>) -> Self {
        Self::new(&Workload::default(), unknown)
    }
}

/// This proxy's own side, built once.
struct LocalLabels(PeerLabels);

impl LocalLabels {
    fn new(w: &Workload, unknown: &Arc<str>) -> Self {
        Self(PeerLabels::new(w, unknown))
    }

    fn side(&self) -> PeerLabels {
        self.0.clone()
    }
}

/// Cuts `v` to [`MAX_VALUE_LEN`] bytes at a character boundary.
fn bounded(v: &str) -> &str {
    if v.len() <= MAX_VALUE_LEN {
        return v;
    }
    let mut end = MAX_VALUE_LEN;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v.get(..end).unwrap_or_default()
}

/// `(name, namespace)` of a Kubernetes service host `<name>.<namespace>.svc[.<domain>]`;
/// any other host is its own name.
fn split_service(host: &str) -> (&str, Option<&str>) {
    let mut parts = host.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some("svc")) if !name.is_empty() && !ns.is_empty() => {
            (name, Some(ns))
        }
        _ => (host, None),
    }
}

/// The service host a connection was meant for, from what its tunnels and TLS said.
fn default_service(metadata: &Extensions) -> Option<String> {
    #[cfg(feature = "hbone")]
    if let Some(host) =
        find::<crate::hbone::HboneHeaders>(metadata).and_then(|h| h.forwarded_host.clone())
    {
        return Some(host);
    }
    #[cfg(feature = "connect")]
    if let Some(info) = find::<crate::connect::TunnelInfo>(metadata) {
        if let crate::addr::Host::Name(name) = info.authority.host() {
            return Some(name.to_string());
        }
    }
    #[cfg(feature = "tls")]
    if let Some(sni) = find::<crate::tls::Sni>(metadata) {
        return Some(sni.0.clone());
    }
    let _ = metadata;
    None
}

/// Whether the connection, or a connection it was tunnelled in, was TLS with a client
/// certificate the server verified.
fn came_over_mtls(metadata: &Extensions) -> bool {
    #[cfg(feature = "tls")]
    {
        super::levels(metadata).any(|m| {
            m.get::<crate::tls::TlsInfo>().is_some()
                && m.get::<crate::tls::PeerCertificates>().is_some()
        })
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = metadata;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_split_like_istio() {
        assert_eq!(
            split_service("reviews.default.svc.cluster.local"),
            ("reviews", Some("default"))
        );
        assert_eq!(split_service("example.com"), ("example.com", None));
        assert_eq!(split_service("a.b.svc"), ("a", Some("b")));
    }

    #[test]
    fn long_values_are_cut_at_a_char_boundary() {
        let long = "é".repeat(200);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_VALUE_LEN && long.starts_with(cut));
    }
}
