//! HTTP request metrics: [`HttpMetricsLayer`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use super::conn::latency_histogram;
use super::istio::{ConnLabels, IstioMetrics};
use super::scope::{self, ConnScope, RequestScope, Scope};

/// A request method, folded into a closed set for the `method` label: the methods of
/// RFC 9110 §9 and `PATCH`, every other (extension) method is `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MethodClass {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// `CONNECT`
    Connect,
    /// `OPTIONS`
    Options,
    /// `TRACE`
    Trace,
    /// `PATCH`
    Patch,
    /// Any other method.
    Other,
}

impl MethodClass {
    const COUNT: usize = 10;

    /// The class of `method`.
    ///
    /// ```
    /// use proxystack::metrics::MethodClass;
    /// assert_eq!(MethodClass::of(&http::Method::GET).as_str(), "GET");
    /// let odd = http::Method::from_bytes(b"BREW").unwrap();
    /// assert_eq!(MethodClass::of(&odd), MethodClass::Other);
    /// ```
    pub fn of(method: &Method) -> Self {
        match *method {
            Method::GET => MethodClass::Get,
            Method::HEAD => MethodClass::Head,
            Method::POST => MethodClass::Post,
            Method::PUT => MethodClass::Put,
            Method::DELETE => MethodClass::Delete,
            Method::CONNECT => MethodClass::Connect,
            Method::OPTIONS => MethodClass::Options,
            Method::TRACE => MethodClass::Trace,
            Method::PATCH => MethodClass::Patch,
            _ => MethodClass::Other,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            MethodClass::Get => "GET",
            MethodClass::Head => "HEAD",
            MethodClass::Post => "POST",
            MethodClass::Put => "PUT",
            MethodClass::Delete => "DELETE",
            MethodClass::Connect => "CONNECT",
            MethodClass::Options => "OPTIONS",
            MethodClass::Trace => "TRACE",
            MethodClass::Patch => "PATCH",
            MethodClass::Other => "other",
        }
    }
}

impl EncodeLabelValue for MethodClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// A status code, or `error` when the service failed without a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct StatusLabel(Option<u16>);

impl EncodeLabelValue for StatusLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(code) => EncodeLabelValue::encode(&code, encoder),
            None => EncodeLabelValue::encode(&"error", encoder),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: MethodClass,
    status: StatusLabel,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabel {
    method: MethodClass,
}

/// Status codes with a cached counter: every code HTTP defines a class for.
const FIRST_CODE: u16 = 100;
const CODES: usize = 500;

/// The HTTP metric families, registered under `proxystack_http_`.
///
/// | metric | labels |
/// |---|---|
/// | `proxystack_http_requests_total` | `method` ([`MethodClass`]), `status` (code, or `error`) |
/// | `proxystack_http_request_duration_seconds` (histogram, to the response head) | `method` |
/// | `proxystack_http_upstream_connect_duration_seconds` (histogram) | — |
/// | `proxystack_http_upstream_response_head_duration_seconds` (histogram) | — |
/// | `proxystack_http_upstream_dials_total` | — |
///
/// The `upstream_*` metrics need [`UpstreamMetricsLayer`](super::UpstreamMetricsLayer)
/// around `http::Forward`'s connector: a request that dialled a new connection observes
/// its connect time and counts a dial; the response-head time is the time to the head
/// minus that connect time, for responses that came from an upstream (not `Forward`'s own
/// `404`/`502`/`504`). Pool reuse is `1 - dials / upstream responses`.
///
/// ```
/// use prometheus_client::registry::Registry;
/// use proxystack::metrics::HttpMetrics;
/// let mut registry = Registry::default();
/// let http = HttpMetrics::new(&mut registry);
/// # let _ = http;
/// ```
#[derive(Clone)]
pub struct HttpMetrics {
    inner: Arc<Families>,
}

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetrics").finish_non_exhaustive()
    }
}

struct Families {
    requests: Family<RequestLabels, Counter>,
    duration: Family<MethodLabel, Histogram, fn() -> Histogram>,
    upstream_connect: Histogram,
    upstream_head: Histogram,
    dials: Counter,
    /// Per method class, lazily: one counter slot per status code 100..=599.
    counters: [OnceLock<Box<[OnceLock<Counter>]>>; MethodClass::COUNT],
    histograms: [OnceLock<Histogram>; MethodClass::COUNT],
}

impl HttpMetrics {
    /// Registers the HTTP families in `registry` (prefix `proxystack_http_`).
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("proxystack_http");
        let f = Families {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            upstream_connect: latency_histogram(),
            upstream_head: latency_histogram(),
            dials: Counter::default(),
            counters: Default::default(),
            histograms: Default::default(),
        };
        r.register(
            "requests",
            "Requests answered, by method class and status",
            f.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from the request to its response head",
            Unit::Seconds,
            f.duration.clone(),
        );
        r.register_with_unit(
            "upstream_connect_duration",
            "Time to connect to the upstream, for requests that needed a new connection",
            Unit::Seconds,
            f.upstream_connect.clone(),
        );
        r.register_with_unit(
            "upstream_response_head_duration",
            "Time to the upstream's response head, connecting excluded",
            Unit::Seconds,
            f.upstream_head.clone(),
        );
        r.register(
            "upstream_dials",
            "Requests for which a new upstream connection was dialled",
            f.dials.clone(),
        );
        Self { inner: Arc::new(f) }
    }

    /// The counter for (method, status): two lock-free lookups once warm.
    fn requests(&self, method: MethodClass, status: Option<u16>) -> Counter {
        let f = &self.inner;
        let make = || {
            f.requests.get_or_create_owned(&RequestLabels {
                method,
                status: StatusLabel(status),
            })
        };
        let slot = status.and_then(|code| {
            let index = usize::from(code.checked_sub(FIRST_CODE)?);
            let slots = f
                .counters
                .get(method as usize)?
                .get_or_init(|| (0..CODES).map(|_| OnceLock::new()).collect());
            slots.get(index)
        });
        match slot {
            Some(slot) => slot.get_or_init(make).clone(),
            None => make(),
        }
    }

    fn duration(&self, method: MethodClass) -> Option<&Histogram> {
        let f = &self.inner;
        let slot = f.histograms.get(method as usize)?;
        Some(slot.get_or_init(|| f.duration.get_or_create_owned(&MethodLabel { method })))
    }
}

/// Records request metrics around a request service (`Service<Request<B>, Response =
/// Response<RB>>`, e.g. `http::Forward`); see [`HttpMetrics`] for the metrics. The
/// duration runs to the response head (bodies stream on; their time is not measured).
///
/// ```
/// use prometheus_client::registry::Registry;
/// use proxystack::http::{Forward, HttpServer, Incoming};
/// use proxystack::metrics::{HttpMetrics, HttpMetricsLayer};
/// use proxystack::{tcp, Target};
/// use tower::ServiceBuilder;
///
/// let mut registry = Registry::default();
/// let metrics = HttpMetrics::new(&mut registry);
/// let forward = Forward::new(tcp::TcpConnector::new(), |_: &http::Request<Incoming>| {
///     Some(Target::from_static("127.0.0.1:8080"))
/// });
/// let server = HttpServer::new(
///     ServiceBuilder::new()
///         .layer(HttpMetricsLayer::new(&metrics))
///         .service(forward),
/// );
/// # let _ = server;
/// ```
#[derive(Clone)]
pub struct HttpMetricsLayer {
    metrics: HttpMetrics,
    istio: Option<IstioMetrics>,
}

impl std::fmt::Debug for HttpMetricsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetricsLayer")
            .field("istio", &self.istio.is_some())
            .finish_non_exhaustive()
    }
}

impl HttpMetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: &HttpMetrics) -> Self {
        Self {
            metrics: metrics.clone(),
            istio: None,
        }
    }

    /// Also records `istio_requests_total` and `istio_request_duration_milliseconds`.
    ///
    /// The labels are those of the connection the request came on, computed once per
    /// connection when a [`ConnectionMetricsLayer`](super::ConnectionMetricsLayer) or
    /// [`AccessLogLayer`](super::AccessLogLayer) sits in front of the HTTP server (else
    /// once per request).
    pub fn istio(mut self, istio: &IstioMetrics) -> Self {
        self.istio = Some(istio.clone());
        self
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HttpMetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`HttpMetricsLayer`].
#[derive(Clone, Debug)]
pub struct HttpMetricsService<S> {
    inner: S,
    layer: HttpMetricsLayer,
}

/// The request's scope: the one an outer HTTP layer made, else a new one.
pub(crate) fn request_scope(extensions: &mut http::Extensions) -> Arc<Scope> {
    if let Some(s) = extensions.get::<RequestScope>() {
        return s.0.clone();
    }
    let s = Arc::new(Scope::default());
    extensions.insert(RequestScope(s.clone()));
    s
}

/// The Istio labels of the request's connection: cached on the connection's scope when
/// there is one.
fn istio_labels(istio: &IstioMetrics, extensions: &http::Extensions) -> Arc<ConnLabels> {
    let Some(conn) = extensions.get::<ConnScope>() else {
        return istio.connection(extensions);
    };
    if let Some(labels) = conn.0.istio.get().filter(|l| l.is_from(istio)) {
        return labels.clone();
    }
    let labels = istio.connection(extensions);
    let _ = conn.0.istio.set(labels.clone());
    labels
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl<S, B, RB> Service<Request<B>> for HttpMetricsService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = HttpMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let method = MethodClass::of(req.method());
        let scope = request_scope(req.extensions_mut());
        let istio = self.layer.istio.as_ref().map(|istio| IstioRequest {
            labels: istio_labels(istio, req.extensions()),
            grpc: is_grpc(&req),
        });
        let inner = &mut self.inner;
        let fut = scope::sync_in(&scope, || inner.call(req));
        HttpMetricsFuture {
            inner: scope::in_scope(scope.clone(), fut),
            record: Some(RequestRecord {
                metrics: self.layer.metrics.clone(),
                method,
                istio,
                scope,
                started: Instant::now(),
            }),
        }
    }
}

struct IstioRequest {
    labels: Arc<ConnLabels>,
    grpc: bool,
}

pin_project! {
    /// The future of [`HttpMetricsService`].
    pub struct HttpMetricsFuture<F> {
        #[pin]
        inner: TaskLocalFuture<Arc<Scope>, F>,
        record: Option<RequestRecord>,
    }
}

impl<F> std::fmt::Debug for HttpMetricsFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetricsFuture").finish_non_exhaustive()
    }
}

struct RequestRecord {
    metrics: HttpMetrics,
    method: MethodClass,
    istio: Option<IstioRequest>,
    scope: Arc<Scope>,
    started: Instant,
}

impl<F, RB, E> Future for HttpMetricsFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(record) = this.record.take() {
            record.finish(result.as_ref().ok());
        }
        Poll::Ready(result)
    }
}

impl RequestRecord {
    fn finish<RB>(self, response: Option<&Response<RB>>) {
        let elapsed = self.started.elapsed();
        let m = &self.metrics;
        let status = response.map(|r| r.status().as_u16());
        m.requests(self.method, status).inc();
        if let Some(h) = m.duration(self.method) {
            h.observe(elapsed.as_secs_f64());
        }
        if let Some(resp) = response {
            if from_upstream(resp) {
                self.upstream(elapsed);
            }
            if let Some(istio) = &self.istio {
                let (protocol, grpc_status) = if istio.grpc {
                    ("grpc", grpc_status(resp))
                } else {
                    ("http", "")
                };
                istio.labels.metrics().record_request(
                    &istio.labels,
                    protocol,
                    resp.status().as_u16(),
                    grpc_status,
                    elapsed.as_secs_f64() * 1000.0,
                );
            }
        }
    }

    fn upstream(&self, elapsed: Duration) {
        let f = &self.metrics.inner;
        match self.scope.dial() {
            Some(dial) => {
                f.dials.inc();
                f.upstream_connect.observe(dial.connect_time.as_secs_f64());
                f.upstream_head
                    .observe(elapsed.saturating_sub(dial.connect_time).as_secs_f64());
            }
            None => f.upstream_head.observe(elapsed.as_secs_f64()),
        }
    }
}

/// Whether a response came from an upstream rather than from `Forward` itself (its error
/// responses carry their `ForwardErrorKind`).
fn from_upstream<RB>(resp: &Response<RB>) -> bool {
    resp.extensions()
        .get::<crate::http::ForwardErrorKind>()
        .is_none()
}

/// The `grpc-status` of a trailers-only gRPC response (`""` when absent or not 0..=16):
/// a closed set of label values.
fn grpc_status<RB>(resp: &Response<RB>) -> &'static str {
    const STATUS: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .and_then(|i| STATUS.get(i).copied())
        .unwrap_or("")
}
