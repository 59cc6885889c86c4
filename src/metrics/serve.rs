//! The accept loop's own counters ([`ServeStats`]) as Prometheus metrics.
//!
//! [`Server`](crate::Server) counts accepted, open, failed, panicked and aborted
//! connections and failed `accept` calls in lock-free atomics; [`ServeMetrics`] reads them
//! at scrape time (a `prometheus-client` collector), so the accept loop pays nothing for
//! being observed. What the layers above see (bytes, durations, failure reasons) comes
//! from [`ConnectionMetricsLayer`](super::ConnectionMetricsLayer).

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::serve::ServeStats;

/// The counters of one or more accept loops, labelled by listener:
/// `proxystack_connections_accepted_total`, `proxystack_connections_active`,
/// `proxystack_connection_errors_total`, `proxystack_connection_panics_total`,
/// `proxystack_connections_aborted_total` and `proxystack_accept_errors_total`.
///
/// ```
/// use prometheus_client::registry::Registry;
/// use proxystack::metrics::ServeMetrics;
/// use proxystack::Server;
///
/// let mut registry = Registry::default();
/// let serve_metrics = ServeMetrics::register(&mut registry);
/// let server = Server::new();
/// serve_metrics.listener("inbound", server.stats());
///
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
/// assert!(text.contains(r#"proxystack_connections_accepted_total{listener="inbound"} 0"#));
/// ```
#[derive(Default)]
pub struct ServeMetrics {
    listeners: Mutex<Vec<(String, Arc<ServeStats>)>>,
}

impl ServeMetrics {
    /// A collector registered in `registry`; add listeners with [`listener`](Self::listener).
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Arc::new(Self::default());
        registry.register_collector(Box::new(metrics.clone()));
        metrics
    }

    /// Reports `stats` (from [`Server::stats`](crate::Server::stats)) as listener `name`.
    /// Reporting the same stats under the same name again (a listener re-opened by a
    /// reload) changes nothing.
    pub fn listener(&self, name: impl Into<String>, stats: Arc<ServeStats>) {
        let name = name.into();
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let known = |(n, s): &(String, Arc<ServeStats>)| *n == name && Arc::ptr_eq(s, &stats);
        if !listeners.iter().any(known) {
            listeners.push((name, stats));
        }
    }
}

impl fmt::Debug for ServeMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let names: Vec<&str> = listeners.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ServeMetrics")
            .field("listeners", &names)
            .finish()
    }
}

type Read = fn(&ServeStats) -> u64;

/// Name (without `_total`, which the encoder adds to counters), help, counter or gauge, value.
const METRICS: [(&str, &str, bool, Read); 6] = [
    (
        "proxystack_connections_accepted",
        "Connections accepted.",
        true,
        |s| s.accepted.load(Ordering::Relaxed),
    ),
    (
        "proxystack_connections_active",
        "Connections open now.",
        false,
        |s| s.active.load(Ordering::Relaxed),
    ),
    (
        "proxystack_connection_errors",
        "Connections that ended with an error.",
        true,
        |s| s.errors.load(Ordering::Relaxed),
    ),
    (
        "proxystack_connection_panics",
        "Connection tasks that panicked.",
        true,
        |s| s.panics.load(Ordering::Relaxed),
    ),
    (
        "proxystack_connections_aborted",
        "Connections aborted at the drain deadline.",
        true,
        |s| s.aborted.load(Ordering::Relaxed),
    ),
    (
        "proxystack_accept_errors",
        "Failed accept calls.",
        true,
        |s| s.accept_errors.load(Ordering::Relaxed),
    ),
];

impl Collector for ServeMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (name, help, is_counter, read) in METRICS {
            if is_counter {
                let mut family = encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    ConstCounter::new(0u64).metric_type(),
                )?;
                for (listener, stats) in listeners.iter() {
                    let labels = [("listener", listener.as_str())];
                    ConstCounter::new(read(stats)).encode(family.encode_family(&labels)?)?;
                }
            } else {
                let mut family = encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    ConstGauge::new(0i64).metric_type(),
                )?;
                for (listener, stats) in listeners.iter() {
                    let labels = [("listener", listener.as_str())];
                    let value = i64::try_from(read(stats)).unwrap_or(i64::MAX);
                    ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
