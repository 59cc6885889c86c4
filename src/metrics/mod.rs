//! Metrics and access logs, as layers stacked like any other.
//!
//! * [`ConnectionMetricsLayer`] — inbound, per listener: connections opened and closed,
//!   bytes each way, duration, failures by [`FailureReason`] (and TLS handshake failures
//!   by alert); optionally Istio's TCP metrics ([`ConnectionMetricsLayer::istio`]).
//! * [`UpstreamMetricsLayer`] — around a connector, per upstream: connects, connect
//!   latency, failures by reason, bytes each way, connections closed.
//! * [`HttpMetricsLayer`] — around a request service (e.g. `http::Forward`): requests by
//!   method class and status, duration to the response head, upstream connect and
//!   response-head latency, new upstream connections (so pool reuse); optionally Istio's
//!   request metrics ([`HttpMetricsLayer::istio`]).
//! * [`IstioMetrics`] — `istio_requests_total`, `istio_request_duration_milliseconds`,
//!   `istio_tcp_*` with Istio's labels, so Istio's dashboards and Kiali work unchanged.
//! * [`AccessLogLayer`] and [`HttpAccessLogLayer`] — one `tracing` event per connection
//!   or request, at target `proxystack::access`, with ztunnel's field names.
//! * [`ServeMetrics`] — the accept loop's own counters ([`ServeStats`](crate::serve::ServeStats):
//!   accepted, open, failed, panicked, aborted connections, failed `accept` calls), read
//!   at scrape time.
//! * [`record_route`] — wraps a `Relay` upstream function or a `Forward` router so the
//!   layers above learn which upstream was picked.
//!
//! Metrics are [`prometheus_client`] types registered in a
//! [`Registry`](prometheus_client::registry::Registry) you own; expose it with
//! [`prometheus_client::encoding::text::encode`] (OpenMetrics) or
//! `prometheus_client::encoding::prometheus_text::encode` (Prometheus 0.0.4 text).
//! `prometheus-client` is the OpenMetrics project's own Rust client (under the
//! `prometheus` GitHub organisation), the one ztunnel uses: typed label sets instead of
//! string slices, no global registry, and its text output is what Istio's tooling
//! already scrapes from ztunnel.
//!
//! ## Example
//!
//! A TCP relay with connection, upstream and access-log layers, one connection through
//! it, and the exposition a `/metrics` endpoint would serve:
//!
//! ```
//! use prometheus_client::registry::Registry;
//! use proxystack::conn::Metadata;
//! use proxystack::metrics::{
//!     record_route, AccessLogLayer, ConnectionMetrics, ConnectionMetricsLayer,
//!     UpstreamMetricsLayer,
//! };
//! use proxystack::{drain, serve, tcp, Target};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio::net::{TcpListener, TcpStream};
//! use tower::{Layer, ServiceBuilder};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let echo = TcpListener::bind("127.0.0.1:0").await?;
//! # let upstream = echo.local_addr()?;
//! # tokio::spawn(async move {
//! #     while let Ok((mut s, _)) = echo.accept().await {
//! #         tokio::spawn(async move {
//! #             let (mut r, mut w) = s.split();
//! #             let _ = tokio::io::copy(&mut r, &mut w).await;
//! #         });
//! #     }
//! # });
//! // Access-log lines as JSON: tracing_subscriber::fmt().json().init();
//! let mut registry = Registry::default();
//! let metrics = ConnectionMetrics::new(&mut registry);
//! let connector = UpstreamMetricsLayer::new(&metrics).layer(tcp::TcpConnector::new());
//! let relay = tcp::Relay::new(connector)
//!     .upstream(record_route(move |_: &Metadata| Some(Target::from(upstream))));
//! let service = ServiceBuilder::new()
//!     .layer(ConnectionMetricsLayer::new(&metrics, "tcp"))
//!     .layer(AccessLogLayer::inbound())
//!     .service(relay);
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let (signal, watch) = drain::channel();
//! let server = tokio::spawn(serve(listener, service, watch));
//!
//! let mut client = TcpStream::connect(addr).await?;
//! client.write_all(b"hello").await?;
//! let mut reply = [0; 5];
//! client.read_exact(&mut reply).await?;
//! drop(client);
//! signal.drain().await; // returns once the connection has ended
//! server.await??;
//!
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry)?;
//! assert!(text.contains(r#"proxystack_connections_closed_total{listener="tcp"} 1"#));
//! assert!(text.contains(r#"proxystack_connection_received_bytes_total{listener="tcp"} 5"#));
//! # Ok(()) }
//! ```
//!
//! ## What the layers see
//!
//! An inbound layer sees the connection's metadata and its inner service's result, not
//! which upstream the service picked. [`record_route`] (around the upstream function or
//! router) and [`UpstreamMetricsLayer`] (around the connector) report it to the layers
//! above through a task-local scope, for services that call them from the connection's or
//! request's own future, as `tcp::Relay` and `http::Forward` do. Per-upstream *metrics*
//! come from [`UpstreamMetricsLayer`] alone, labelled by the target's authority.
//!
//! Not visible without a hook in `http::Forward`'s pool: which requests were retried on a
//! fresh connection (the pool retries once when a reused connection was already closed).
//!
//! ## Cost
//!
//! Per connection: a few atomic adds, one allocation for the byte tally, and (with Istio)
//! one label derivation and capped lookup. Per read or write: a local addition; counts
//! are published in 64 KiB batches and at close. Per request: no allocation for label
//! sets that repeat — the method × status counters and the Istio handles for common
//! codes are cached in `OnceLock`s and looked up without a lock; the histograms take
//! `prometheus-client`'s per-histogram lock to observe. Measured with `benches/http.rs`
//! (1 KiB responses, 8 clients, 2 shared cores): every layer on — connection, upstream,
//! HTTP and Istio metrics, connection and request access logs formatted by
//! `tracing_subscriber::fmt` — costs 10 % (HTTP/1.1) to 16 % (h2c) of the proxy's
//! requests per second.
//!
//! ## Where to put them
//!
//! The connection layers hand their inner service a [`CountingIo`] around the stream, so:
//!
//! * socket options still reach the socket: the wrapper passes
//!   [`Io::tcp_socket`](crate::Io::tcp_socket) on, so
//!   [`tcp::OriginalDstLayer`](crate::tcp::OriginalDstLayer) may sit on either side and
//!   resets propagate (the layers also give the connection an
//!   [`Abort`](crate::admission::Abort) handle that resets the socket under the wrapper when it
//!   is dropped aborted, for services other than the relay);
//! * a [`tcp::Relay`](crate::tcp::Relay) behind them keeps its fast paths (`splice(2)`
//!   between sockets, `Bytes` to and from an HTTP/2 tunnel): the wrapper offers the stream
//!   underneath ([`Io::raw_tcp_socket`](crate::Io::raw_tcp_socket),
//!   [`Io::h2_stream`](crate::Io::h2_stream)) and its counter
//!   ([`Io::direct_count`](crate::Io::direct_count)), and the relay reports what it moved
//!   past the wrapper.
//!
//! ## Cardinality
//!
//! Every label is either a closed set (reason, method class, status code, alert), a name
//! you give (listener), or capped: upstream authorities (1 000 by default,
//! [`ConnectionMetrics::max_upstreams`]) and Istio label sets (10 000 by default); past
//! the cap, values become `other` and an `*_label_overflow_total` counter counts them.

mod access_log;
mod conn;
#[cfg(feature = "http")]
mod http;
mod io;
mod istio;
mod reason;
mod scope;
mod serve;

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use ::http::Extensions;
use prometheus_client::metrics::counter::Counter;

use crate::Target;

pub use self::access_log::{AccessLogFuture, AccessLogLayer, AccessLogService, Direction};
#[cfg(feature = "http")]
pub use self::access_log::{HttpAccessLogFuture, HttpAccessLogLayer, HttpAccessLogService};
pub use self::conn::{
    ConnectionMetrics, ConnectionMetricsFuture, ConnectionMetricsLayer, ConnectionMetricsService,
    UpstreamMetricsLayer, UpstreamMetricsService,
};
#[cfg(feature = "http")]
pub use self::http::{
    HttpMetrics, HttpMetricsFuture, HttpMetricsLayer, HttpMetricsService, MethodClass,
};
pub use self::io::CountingIo;
pub use self::istio::{IstioMetrics, IstioMetricsBuilder, Reporter, Workload};
pub use self::reason::FailureReason;
pub use self::serve::ServeMetrics;

/// Wraps an upstream function (`tcp::Relay::upstream`) or router (`http::Forward::new`)
/// so that the metrics and access-log layers above learn which upstream it picked.
///
/// ```
/// use proxystack::conn::{Metadata, OriginalDst};
/// use proxystack::metrics::record_route;
/// use proxystack::tcp;
/// let relay = tcp::Relay::new(tcp::TcpConnector::new())
///     .upstream(record_route(|m: &Metadata| m.get::<OriginalDst>().map(Into::into)));
/// # let _ = relay;
/// ```
pub fn record_route<A, F>(route: F) -> impl Fn(&A) -> Option<Target> + Clone + Send + Sync + 'static
where
    A: ?Sized,
    F: Fn(&A) -> Option<Target> + Clone + Send + Sync + 'static,
{
    move |input: &A| {
        let target = route(input);
        if let Some(t) = &target {
            scope::record_route(t.authority());
        }
        target
    }
}

/// A cap on the distinct label sets a family may grow to.
pub(crate) struct LabelBudget {
    seen: Mutex<HashSet<u64>>,
    // Random keys: a peer that picks label values cannot aim for hash collisions.
    hasher: RandomState,
    cap: AtomicUsize,
    overflow: Counter,
}

impl LabelBudget {
    pub(crate) fn new(cap: usize, overflow: Counter) -> Self {
        Self {
            seen: Mutex::new(HashSet::new()),
            hasher: RandomState::new(),
            cap: AtomicUsize::new(cap),
            overflow,
        }
    }

    pub(crate) fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
    }

    /// Whether `labels` may have a series of its own: yes if seen before or under the
    /// cap; otherwise counts the overflow.
    pub(crate) fn admit<K: Hash>(&self, labels: &K) -> bool {
        let key = self.hasher.hash_one(labels);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&key) {
            return true;
        }
        if seen.len() < self.cap.load(Ordering::Relaxed) {
            seen.insert(key);
            return true;
        }
        drop(seen);
        self.overflow.inc();
        false
    }
}

/// A connection's metadata, then that of each connection it was tunnelled in (innermost
/// first). Bounded, whatever the metadata says.
pub(crate) fn levels(metadata: &Extensions) -> impl Iterator<Item = &Extensions> {
    std::iter::successors(Some(metadata), |m| outer(m)).take(64)
}

fn outer(metadata: &Extensions) -> Option<&Extensions> {
    #[cfg(feature = "connect")]
    {
        metadata.get::<crate::connect::Outer>().map(|o| &*o.0)
    }
    #[cfg(not(feature = "connect"))]
    {
        let _ = metadata;
        None
    }
}

/// A metadata fact on the connection or on the connections it was tunnelled in.
pub(crate) fn find<T: Send + Sync + 'static>(metadata: &Extensions) -> Option<&T> {
    levels(metadata).find_map(|m| m.get::<T>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_admits_known_sets_past_the_cap_and_counts_the_rest() {
        let overflow = Counter::default();
        let budget = LabelBudget::new(2, overflow.clone());
        assert!(budget.admit(&"a"));
        assert!(budget.admit(&"b"));
        assert!(!budget.admit(&"c"));
        assert!(budget.admit(&"a"));
        assert_eq!(overflow.get(), 1);
    }
}
