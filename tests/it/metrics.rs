//! Metrics and access-log layers on real loopback traffic: a TCP relay, TLS, HBONE and an
//! HTTP server + Forward. The exposition is read back with a Prometheus text parser
//! (`prometheus-parse`); access-log events are captured with a `tracing` layer.
#![cfg(feature = "metrics")]

use crate::common;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{echo_server, eventually, round_trip, start};
use prometheus_client::registry::Registry;
use proxystack::conn::{Metadata, PeerAddr};
use proxystack::metrics::{
    record_route, AccessLogLayer, ConnectionMetrics, ConnectionMetricsLayer, IstioMetrics,
    Reporter, UpstreamMetricsLayer, Workload,
};
use proxystack::{tcp, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceBuilder};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};

// ---- exposition ----

/// The registry in the Prometheus text format, parsed.
fn scrape(registry: &Registry) -> prometheus_parse::Scrape {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry).unwrap();
    parse(&text)
}

fn parse(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

fn number(v: &prometheus_parse::Value) -> f64 {
    use prometheus_parse::Value as V;
    match v {
        V::Counter(x) | V::Gauge(x) | V::Untyped(x) => *x,
        V::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
        V::Summary(_) => f64::NAN,
    }
}

/// The samples of `name` whose labels include `labels`.
fn samples<'a>(
    s: &'a prometheus_parse::Scrape,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
    s.samples.iter().filter(move |x| {
        x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
    })
}

/// The value of the one sample of `name` with `labels` (`None` if there is none).
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<_> = samples(s, name, labels).collect();
    assert!(found.len() <= 1, "{name} {labels:?}: {found:?}");
    found.first().map(|x| number(&x.value))
}

// ---- access log capture ----

type Line = BTreeMap<String, String>;

/// Collects `proxystack::access` events.
#[derive(Clone, Default)]
struct AccessLog(Arc<Mutex<Vec<Line>>>);

impl AccessLog {
    /// Captures events of this thread (the tests run on a current-thread runtime, so the
    /// proxy's tasks run here too).
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn lines(&self) -> Vec<Line> {
        self.0.lock().unwrap().clone()
    }
}

struct Fields<'a>(&'a mut Line);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for AccessLog {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "proxystack::access" {
            return;
        }
        let mut line = Line::new();
        line.insert("level".into(), event.metadata().level().to_string());
        event.record(&mut Fields(&mut line));
        self.0.lock().unwrap().push(line);
    }
}

fn field<'a>(line: &'a Line, name: &str) -> Option<&'a str> {
    line.get(name).map(String::as_str)
}

// ---- upstreams that fail ----

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// An upstream that accepts, waits for the first byte, then resets.
async fn resetting_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                let _ = s.read(&mut b).await;
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            });
        }
    });
    addr
}

/// Connects, writes `data`, and reads until the proxy closes (bounded).
async fn poke(addr: SocketAddr, data: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(data).await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
}

const IO: Duration = Duration::from_secs(10);

// ---- L4 ----

#[tokio::test]
async fn relay_connections_bytes_and_upstreams_are_counted_and_logged() {
    let log = AccessLog::default();
    let _guard = log.install();
    let mut registry = Registry::default();
    let metrics = ConnectionMetrics::new(&mut registry);
    let echo = echo_server().await;
    let connector = UpstreamMetricsLayer::new(&metrics).layer(tcp::TcpConnector::new());
    let relay = tcp::Relay::new(connector)
        .upstream(record_route(move |_: &Metadata| Some(Target::from(echo))));
    let svc = ServiceBuilder::new()
        .layer(ConnectionMetricsLayer::new(&metrics, "tcp"))
        .layer(AccessLogLayer::inbound())
        .service(relay);
    let proxy = start(Server::new(), svc).await;

    // Larger than the 64 KiB publishing batch, and not a multiple of it.
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    for _ in 0..3 {
        assert_eq!(round_trip(proxy.addr, &data).await, data);
    }
    let closed = |r: &Registry| {
        value(
            &scrape(r),
            "proxystack_connections_closed_total",
            &[("listener", "tcp")],
        )
    };
    assert!(eventually(IO, || closed(&registry) == Some(3.0)).await);

    let s = scrape(&registry);
    let l = [("listener", "tcp")];
    let total = 3.0 * data.len() as f64;
    assert_eq!(
        value(&s, "proxystack_connections_opened_total", &l),
        Some(3.0)
    );
    assert_eq!(
        value(&s, "proxystack_connection_received_bytes_total", &l),
        Some(total)
    );
    assert_eq!(
        value(&s, "proxystack_connection_sent_bytes_total", &l),
        Some(total)
    );
    assert_eq!(
        value(&s, "proxystack_connection_duration_seconds_count", &l),
        Some(3.0)
    );
    assert_eq!(
        samples(&s, "proxystack_connection_failures_total", &[]).count(),
        0
    );
    let upstream = echo.to_string();
    let u = [("upstream", upstream.as_str())];
    assert_eq!(
        value(&s, "proxystack_upstream_connects_total", &u),
        Some(3.0)
    );
    assert_eq!(
        value(&s, "proxystack_upstream_sent_bytes_total", &u),
        Some(total)
    );
    assert_eq!(
        value(&s, "proxystack_upstream_received_bytes_total", &u),
        Some(total)
    );
    assert_eq!(
        value(&s, "proxystack_upstream_connections_closed_total", &u),
        Some(3.0)
    );
    assert_eq!(
        value(&s, "proxystack_upstream_connect_duration_seconds_count", &u),
        Some(3.0)
    );
    // The histogram's buckets are cumulative and end with +Inf = count.
    let hist = samples(&s, "proxystack_connection_duration_seconds", &l)
        .next()
        .unwrap();
    let prometheus_parse::Value::Histogram(buckets) = &hist.value else {
        panic!("{hist:?}")
    };
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    assert_eq!(
        buckets.last().map(|b| (b.less_than, b.count)),
        Some((f64::INFINITY, 3.0))
    );

    // The OpenMetrics encoding carries the same values.
    let mut open = String::new();
    prometheus_client::encoding::text::encode(&mut open, &registry).unwrap();
    assert!(open.ends_with("# EOF\n"));
    assert_eq!(
        value(&parse(&open), "proxystack_connections_opened_total", &l),
        Some(3.0)
    );

    let lines = log.lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert_eq!(field(line, "level"), Some("INFO"));
        assert_eq!(field(line, "message"), Some("connection complete"));
        assert_eq!(field(line, "direction"), Some("inbound"));
        assert_eq!(field(line, "dst.addr"), Some(upstream.as_str()));
        assert_eq!(field(line, "bytes_sent"), Some("100000"));
        assert_eq!(field(line, "bytes_recv"), Some("100000"));
        assert!(field(line, "src.addr").unwrap().starts_with("127.0.0.1:"));
        assert!(field(line, "duration").unwrap().ends_with("ms"));
        assert_eq!(field(line, "error"), None);
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn failures_are_counted_by_reason() {
    let log = AccessLog::default();
    let _guard = log.install();
    let mut registry = Registry::default();
    let metrics = ConnectionMetrics::new(&mut registry);
    let connector = UpstreamMetricsLayer::new(&metrics).layer(tcp::TcpConnector::new());
    let serve = |listener: &'static str, upstream: Option<SocketAddr>, idle: Option<Duration>| {
        let relay = tcp::Relay::new(connector.clone())
            .upstream(move |_: &Metadata| upstream.map(Target::from))
            .idle_timeout(idle);
        start(
            Server::new(),
            ConnectionMetricsLayer::new(&metrics, listener)
                .layer(AccessLogLayer::inbound().layer(relay)),
        )
    };
    let refused_at = closed_port().await;
    let refused = serve("refused", Some(refused_at), None).await;
    let no_route = serve("no_route", None, None).await;
    let reset = serve("reset", Some(resetting_upstream().await), None).await;
    let idle = serve(
        "idle",
        Some(echo_server().await),
        Some(Duration::from_millis(100)),
    )
    .await;
    poke(refused.addr, b"x").await;
    poke(no_route.addr, b"x").await;
    poke(reset.addr, b"x").await;
    poke(idle.addr, b"").await;

    let failed = |r: &Registry, listener: &str, reason: &str| {
        value(
            &scrape(r),
            "proxystack_connection_failures_total",
            &[("listener", listener), ("reason", reason)],
        )
    };
    for (listener, reason) in [
        ("refused", "refused"),
        ("no_route", "no_route"),
        ("reset", "reset"),
        ("idle", "timeout"),
    ] {
        assert!(
            eventually(IO, || failed(&registry, listener, reason) == Some(1.0)).await,
            "{listener}: {:?}",
            scrape(&registry).samples
        );
    }
    let s = scrape(&registry);
    let refused_label = refused_at.to_string();
    assert_eq!(
        value(
            &s,
            "proxystack_upstream_connect_failures_total",
            &[("upstream", &refused_label), ("reason", "refused")]
        ),
        Some(1.0)
    );
    // Every failure is also a close.
    assert_eq!(
        samples(&s, "proxystack_connections_closed_total", &[])
            .map(|x| number(&x.value))
            .sum::<f64>(),
        4.0
    );
    let lines = log.lines();
    let mut reasons: Vec<_> = lines
        .iter()
        .filter_map(|l| field(l, "reason").map(str::to_owned))
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["no_route", "refused", "reset", "timeout"]);
    let refused_line = lines
        .iter()
        .find(|l| field(l, "reason") == Some("refused"))
        .unwrap();
    assert!(
        field(refused_line, "error")
            .unwrap()
            .contains("upstream connect"),
        "{refused_line:?}"
    );
    for p in [refused, no_route, reset, idle] {
        p.shutdown().await;
    }
}

#[tokio::test]
async fn an_upstream_reset_still_reaches_the_client_as_a_reset_behind_the_layers() {
    // The relay resets the client's socket when the upstream failed; the counting stream
    // the layers put in between must not turn that into a clean FIN.
    let mut registry = Registry::default();
    let metrics = ConnectionMetrics::new(&mut registry);
    let upstream = resetting_upstream().await;
    let relay =
        tcp::Relay::new(UpstreamMetricsLayer::new(&metrics).layer(tcp::TcpConnector::new()))
            .upstream(move |_: &Metadata| Some(Target::from(upstream)));
    let proxy = start(
        Server::new(),
        ServiceBuilder::new()
            .layer(ConnectionMetricsLayer::new(&metrics, "tcp"))
            .layer(AccessLogLayer::inbound())
            .service(relay),
    )
    .await;
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut sink = Vec::new();
        let read = tokio::time::timeout(IO, s.read_to_end(&mut sink))
            .await
            .expect("the proxy ends the connection");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "a clean EOF would tell the client all data arrived"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn connections_cut_at_the_drain_deadline_count_as_aborted() {
    let log = AccessLog::default();
    let _guard = log.install();
    let mut registry = Registry::default();
    let metrics = ConnectionMetrics::new(&mut registry);
    let echo = echo_server().await;
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &Metadata| Some(Target::from(echo)));
    let proxy = start(
        Server::new().drain_timeout(Duration::from_millis(100)),
        ConnectionMetricsLayer::new(&metrics, "drain")
            .layer(AccessLogLayer::inbound().layer(relay)),
    )
    .await;
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    idle.read_exact(&mut b).await.unwrap();
    proxy.shutdown().await;
    let s = scrape(&registry);
    let l = [("listener", "drain")];
    assert_eq!(
        value(&s, "proxystack_connections_closed_total", &l),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "proxystack_connection_failures_total",
            &[("listener", "drain"), ("reason", "aborted")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "proxystack_connection_received_bytes_total", &l),
        Some(4.0)
    );
    let lines = log.lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(field(&lines[0], "reason"), Some("aborted"));
    assert_eq!(field(&lines[0], "bytes_recv"), Some("4"));
}

#[tokio::test]
async fn upstream_labels_are_capped() {
    let mut registry = Registry::default();
    let metrics = ConnectionMetrics::new(&mut registry).max_upstreams(2);
    let mut echoes = Vec::new();
    for _ in 0..4 {
        echoes.push(echo_server().await);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let picks = echoes.clone();
    let relay =
        tcp::Relay::new(UpstreamMetricsLayer::new(&metrics).layer(tcp::TcpConnector::new()))
            .upstream(move |_: &Metadata| {
                let i = next.fetch_add(1, Ordering::SeqCst);
                picks.get(i % picks.len()).copied().map(Target::from)
            });
    let proxy = start(Server::new(), relay).await;
    for _ in 0..4 {
        assert_eq!(round_trip(proxy.addr, b"x").await, b"x");
    }
    let s = scrape(&registry);
    let labels: BTreeSet<_> = samples(&s, "proxystack_upstream_connects_total", &[])
        .map(|x| x.labels.get("upstream").unwrap().to_owned())
        .collect();
    let want: BTreeSet<_> = [echoes[0].to_string(), echoes[1].to_string(), "other".into()]
        .into_iter()
        .collect();
    assert_eq!(labels, want);
    assert_eq!(
        value(
            &s,
            "proxystack_upstream_connects_total",
            &[("upstream", "other")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "proxystack_upstream_label_overflow_total", &[]),
        Some(2.0)
    );
    proxy.shutdown().await;
}

// ---- Istio ----

/// Istio's standard labels (istio.io "Istio Standard Metrics"; ztunnel's label set).
const ISTIO_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

fn label_names(sample: &prometheus_parse::Sample) -> BTreeSet<String> {
    sample.labels.keys().cloned().collect()
}

/// A relay to an echo server behind `ConnectionMetricsLayer::istio`.
async fn istio_relay(registry: &mut Registry, istio: &IstioMetrics) -> common::Running {
    let metrics = ConnectionMetrics::new(registry);
    let echo = echo_server().await;
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &Metadata| Some(Target::from(echo)));
    start(
        Server::new(),
        ConnectionMetricsLayer::new(&metrics, "mesh")
            .istio(istio)
            .layer(relay),
    )
    .await
}

fn istio_closed(r: &Registry) -> f64 {
    samples(&scrape(r), "istio_tcp_connections_closed_total", &[])
        .map(|x| number(&x.value))
        .sum()
}

#[tokio::test]
async fn istio_label_sets_are_capped() {
    let mut registry = Registry::default();
    // Every connection claims another workload and service (from its source port): a
    // flood of label sets, as from a peer with many identities or host names.
    let istio = IstioMetrics::builder(Reporter::Destination)
        .max_label_sets(2)
        .peer(|m: &Metadata| {
            let port = m.get::<PeerAddr>()?.0.port();
            Some(Workload::new().name(format!("w{port}")))
        })
        .destination_service(|m: &Metadata| {
            let port = m.get::<PeerAddr>()?.0.port();
            Some(format!("{}{port}.attack", "a".repeat(1000)))
        })
        .register(&mut registry);
    let proxy = istio_relay(&mut registry, &istio).await;
    for _ in 0..5 {
        assert_eq!(round_trip(proxy.addr, b"hi").await, b"hi");
    }
    assert!(eventually(IO, || istio_closed(&registry) == 5.0).await);
    let s = scrape(&registry);
    let opened: Vec<_> = samples(&s, "istio_tcp_connections_opened_total", &[]).collect();
    assert_eq!(opened.len(), 3, "2 label sets + other: {opened:?}");
    assert_eq!(
        value(
            &s,
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service", "other"),
                ("source_workload", "other")
            ]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(&s, "proxystack_istio_label_overflow_total", &[]),
        Some(3.0)
    );
    // Our own side is not the peer's to change: it stays.
    assert!(opened
        .iter()
        .all(|x| x.labels.get("reporter") == Some("destination")));
    // Values from the connection are cut to 256 bytes.
    for x in &opened {
        let service = x.labels.get("destination_service").unwrap();
        assert!(
            service == "other" || service.len() == 256,
            "{}",
            service.len()
        );
    }
    proxy.shutdown().await;
}

/// A sample line of the Prometheus text format, read strictly: `name{k="v",...} value`,
/// label values escaped with backslash-backslash, backslash-quote and backslash-n.
struct SampleLine {
    name: String,
    labels: Vec<(String, String)>,
}

fn strict_sample(line: &str) -> Option<SampleLine> {
    let name_end = line.find(['{', ' '])?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=')?;
            let key = rest[..eq].to_string();
            let mut chars = rest[eq + 1..].strip_prefix('"')?.char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        _ => return None,
                    },
                    (i, '"') => break i,
                    (_, '\n') => return None,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key, value));
            rest = &rest[eq + 1..][1 + end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let _value: f64 = rest.strip_prefix(' ')?.parse().ok()?;
    Some(SampleLine {
        name: name.to_string(),
        labels,
    })
}

#[tokio::test]
async fn istio_label_values_cannot_inject_series() {
    let mut registry = Registry::default();
    let hostile = "w\"} evil_series 1\n# TYPE evil_series counter\\";
    let istio = IstioMetrics::builder(Reporter::Destination)
        .peer(move |_: &Metadata| Some(Workload::new().name(hostile)))
        .register(&mut registry);
    let proxy = istio_relay(&mut registry, &istio).await;
    assert_eq!(round_trip(proxy.addr, b"hi").await, b"hi");
    let mut text = String::new();
    assert!(
        eventually(IO, || {
            text.clear();
            prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
            text.contains("istio_tcp_connections_closed_total{")
        })
        .await
    );
    let mut workloads = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let SampleLine { name, labels } =
            strict_sample(line).unwrap_or_else(|| panic!("malformed line: {line:?}"));
        assert!(
            name.starts_with("istio_") || name.starts_with("proxystack_"),
            "injected series: {line:?}"
        );
        workloads.extend(
            labels
                .into_iter()
                .filter(|(k, _)| k == "source_workload")
                .map(|(_, v)| v),
        );
    }
    assert_eq!(workloads.into_iter().collect::<Vec<_>>(), [hostile]);
    assert!(!text.lines().any(|l| l.starts_with("# TYPE evil")));
    proxy.shutdown().await;
}

#[cfg(all(feature = "hbone", feature = "demo-certs"))]
#[tokio::test]
async fn hbone_tunnels_report_istio_tcp_metrics_and_access_logs() {
    use proxystack::hbone::{self, HboneTarget, Inbound};
    use proxystack::identity::SpiffeId;
    use proxystack::tls::demo::DemoCa;
    use proxystack::Authority;
    use tower::ServiceExt;

    let log = AccessLog::default();
    let _guard = log.install();
    let ca = DemoCa::new("cluster.local");
    let id = |sa: &str| SpiffeId::istio("cluster.local", "default", sa).unwrap();
    let mut registry = Registry::default();
    let metrics = ConnectionMetrics::new(&mut registry);
    let istio = IstioMetrics::builder(Reporter::Destination)
        .workload(
            Workload::new()
                .name("reviews-v1")
                .namespace("default")
                .canonical_service("reviews")
                .canonical_revision("v1")
                .cluster("Kubernetes")
                .principal(id("server")),
        )
        .register(&mut registry);
    let app = echo_server().await;
    let relay =
        tcp::Relay::new(UpstreamMetricsLayer::new(&metrics).layer(tcp::TcpConnector::new()))
            .upstream(move |m: &Metadata| {
                let port = m.get::<proxystack::connect::TunnelInfo>()?.authority.port();
                Some(Target::from((app.ip(), port)))
            });
    let tunnels = ServiceBuilder::new()
        .layer(ConnectionMetricsLayer::new(&metrics, "hbone").istio(&istio))
        .layer(AccessLogLayer::inbound().identity(id("server")))
        .service(relay);
    let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
        .service(tunnels)
        .unwrap();
    let server = start(Server::new(), inbound).await;

    let authority = Authority::from(SocketAddr::new(server.addr.ip(), app.port()));
    let target = HboneTarget::new(server.addr, authority.clone(), [id("server")])
        .source_identity(id("client"))
        .forwarded_for("10.1.2.3:4567".parse().unwrap())
        .forwarded_host("reviews.default.svc.cluster.local")
        .into_target();
    let connector =
        hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots()).unwrap();
    let mut t = connector.oneshot(target).await.unwrap();
    t.write_all(b"hello mesh").await.unwrap();
    let mut got = [0u8; 10];
    t.read_exact(&mut got).await.unwrap();
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).await.unwrap();
    drop(t);

    let closed = |r: &Registry| {
        value(
            &scrape(r),
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination")],
        )
    };
    assert!(eventually(IO, || closed(&registry) == Some(1.0)).await);
    let s = scrape(&registry);
    let opened = samples(&s, "istio_tcp_connections_opened_total", &[])
        .next()
        .unwrap();
    let want: BTreeSet<String> = ISTIO_LABELS.iter().map(|s| s.to_string()).collect();
    assert_eq!(label_names(opened), want);
    for (k, v) in [
        ("reporter", "destination"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/client",
        ),
        ("source_workload_namespace", "default"),
        ("source_workload", "unknown"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/server",
        ),
        ("destination_workload", "reviews-v1"),
        ("destination_workload_namespace", "default"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v1"),
        ("destination_app", "reviews"),
        ("destination_version", "v1"),
        ("destination_cluster", "Kubernetes"),
        ("destination_service", "reviews.default.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "default"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(opened.labels.get(k), Some(v), "{k}");
    }
    let r = [("reporter", "destination")];
    assert_eq!(value(&s, "istio_tcp_received_bytes_total", &r), Some(10.0));
    assert_eq!(value(&s, "istio_tcp_sent_bytes_total", &r), Some(10.0));
    assert_eq!(
        value(
            &s,
            "proxystack_connections_opened_total",
            &[("listener", "hbone")]
        ),
        Some(1.0)
    );

    let lines = log.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(
        field(line, "src.identity"),
        Some("spiffe://cluster.local/ns/default/sa/client")
    );
    assert_eq!(
        field(line, "dst.identity"),
        Some("spiffe://cluster.local/ns/default/sa/server")
    );
    assert_eq!(
        field(line, "dst.hbone_addr"),
        Some(authority.to_string().as_str())
    );
    assert_eq!(field(line, "dst.addr"), Some(app.to_string().as_str()));
    assert_eq!(field(line, "bytes_recv"), Some("10"));
    assert_eq!(field(line, "bytes_sent"), Some("10"));
    server.shutdown().await;
}

// ---- TLS ----

#[cfg(all(feature = "tls", feature = "demo-certs"))]
#[tokio::test]
async fn tls_handshake_failures_are_counted_by_alert() {
    use proxystack::identity::SpiffeId;
    use proxystack::tls::demo::DemoCa;
    use proxystack::tls::{ClientAuth, ServerConfigBuilder, SniMode, TerminateLayer, TlsConnector};
    use tower::ServiceExt;

    let ca = DemoCa::new("cluster.local");
    let server_id = SpiffeId::istio("cluster.local", "default", "server").unwrap();
    // Workload certificates carry only a SPIFFE ID: pin it, send no SNI (as HBONE does).
    let client = |roots| {
        TlsConnector::new(tcp::TcpConnector::new(), roots)
            .sni(SniMode::None)
            .expect_identities([server_id.clone()])
    };
    let config = ServerConfigBuilder::new()
        .default_cert(ca.workload_cert("default", "server"))
        .client_auth(ClientAuth::Required(ca.roots()))
        .tls13_only()
        .build()
        .unwrap();
    let mut registry = Registry::default();
    let metrics = ConnectionMetrics::new(&mut registry);
    let echo = echo_server().await;
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &Metadata| Some(Target::from(echo)));
    let svc = ServiceBuilder::new()
        .layer(ConnectionMetricsLayer::new(&metrics, "mtls"))
        .layer(TerminateLayer::new(config).handshake_timeout(Duration::from_secs(5)))
        .service(relay);
    let proxy = start(Server::new(), svc).await;

    // No client certificate: the server refuses with certificate_required.
    let bare = client(ca.roots());
    if let Ok(mut conn) = bare.oneshot(Target::from(proxy.addr)).await {
        // TLS 1.3 clients finish before the server checks; the refusal comes on read.
        let _ = conn.write_all(b"x").await;
        let mut b = Vec::new();
        let _ = tokio::time::timeout(IO, conn.read_to_end(&mut b)).await;
    }
    // A client that does not trust the server's CA refuses it with unknown_ca.
    let other = DemoCa::new("other.local");
    let distrusting = client(other.roots())
        .client_cert(other.workload_cert("default", "client"))
        .unwrap();
    assert!(distrusting.oneshot(Target::from(proxy.addr)).await.is_err());
    // A good client.
    let good = client(ca.roots())
        .client_cert(ca.workload_cert("default", "client"))
        .unwrap();
    let mut conn = good.oneshot(Target::from(proxy.addr)).await.unwrap();
    conn.write_all(b"ok").await.unwrap();
    let mut b = [0u8; 2];
    conn.read_exact(&mut b).await.unwrap();
    drop(conn);

    let tls = |r: &Registry, alert: &str, sender: &str| {
        value(
            &scrape(r),
            "proxystack_tls_handshake_failures_total",
            &[("listener", "mtls"), ("alert", alert), ("sender", sender)],
        )
    };
    assert!(
        eventually(IO, || tls(&registry, "certificate_required", "local")
            == Some(1.0))
        .await,
        "{:?}",
        scrape(&registry).samples
    );
    assert!(
        eventually(IO, || tls(&registry, "unknown_ca", "peer") == Some(1.0)).await,
        "{:?}",
        samples(
            &scrape(&registry),
            "proxystack_tls_handshake_failures_total",
            &[]
        )
        .map(|x| &x.labels)
        .collect::<Vec<_>>()
    );
    assert!(
        eventually(IO, || value(
            &scrape(&registry),
            "proxystack_connections_closed_total",
            &[("listener", "mtls")]
        ) == Some(3.0))
        .await
    );
    assert_eq!(
        value(
            &scrape(&registry),
            "proxystack_connection_failures_total",
            &[("listener", "mtls"), ("reason", "tls_handshake")]
        ),
        Some(2.0)
    );
    proxy.shutdown().await;
}

// ---- HTTP ----

#[cfg(feature = "http")]
#[tokio::test]
async fn http_requests_are_counted_timed_and_logged() {
    use crate::http_common::{backend, body, empty, h1_client, h2_client};
    use bytes::Bytes;
    use http::{Method, Request, StatusCode};
    use http_body_util::BodyExt;
    use proxystack::http::{Forward, HttpServer, Incoming, UpstreamProtocol};
    use proxystack::metrics::{HttpAccessLogLayer, HttpMetrics, HttpMetricsLayer};

    let log = AccessLog::default();
    let _guard = log.install();
    let mut registry = Registry::default();
    let conn_metrics = ConnectionMetrics::new(&mut registry);
    let http_metrics = HttpMetrics::new(&mut registry);
    let istio = IstioMetrics::builder(Reporter::Destination)
        .workload(Workload::new().name("web").namespace("default"))
        .register(&mut registry);
    let upstream = backend().await;
    let up = upstream.addr;
    let connector = UpstreamMetricsLayer::new(&conn_metrics).layer(tcp::TcpConnector::new());
    let forward = Forward::new(
        connector,
        record_route(move |req: &Request<Incoming>| {
            (req.uri().path() != "/nowhere").then(|| Target::from(up))
        }),
    )
    .upstream_protocol(UpstreamProtocol::MatchClient);
    let requests = ServiceBuilder::new()
        .layer(HttpMetricsLayer::new(&http_metrics).istio(&istio))
        .layer(HttpAccessLogLayer::inbound())
        .service(forward);
    let svc = ServiceBuilder::new()
        .layer(ConnectionMetricsLayer::new(&conn_metrics, "web"))
        .service(HttpServer::new(requests));
    let proxy = start(Server::new(), svc).await;

    let req = |method: Method, path: &str, b| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web.example")
            .body(b)
            .unwrap()
    };
    let mut h1 = h1_client(proxy.addr).await;
    for _ in 0..3 {
        let resp = h1
            .send_request(req(Method::GET, "/a", empty()))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
    }
    let resp = h1
        .send_request(req(Method::POST, "/echo", body("payload")))
        .await
        .unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from("payload")
    );
    let resp = h1
        .send_request(req(Method::GET, "/nowhere", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    resp.into_body().collect().await.unwrap();
    let brew = Method::from_bytes(b"BREW").unwrap();
    let resp = h1.send_request(req(brew, "/pot", empty())).await.unwrap();
    resp.into_body().collect().await.unwrap();
    // HTTP/2 requests are served on their own tasks: still counted.
    let mut h2 = h2_client(proxy.addr).await;
    let h2req = Request::builder()
        .uri(format!("http://{}/h2", proxy.addr))
        .body(empty())
        .unwrap();
    let resp = h2.send_request(h2req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();

    let s = scrape(&registry);
    let count = |method: &str, status: &str| {
        value(
            &s,
            "proxystack_http_requests_total",
            &[("method", method), ("status", status)],
        )
    };
    assert_eq!(count("GET", "200"), Some(4.0));
    assert_eq!(count("POST", "200"), Some(1.0));
    assert_eq!(count("GET", "404"), Some(1.0));
    assert_eq!(count("other", "200"), Some(1.0));
    assert_eq!(
        value(
            &s,
            "proxystack_http_request_duration_seconds_count",
            &[("method", "GET")]
        ),
        Some(5.0)
    );
    // Six responses came from the upstream (the 404 did not); each needed a connection
    // either dialled or reused, and every dial the pool made was seen by the request.
    let heads = value(
        &s,
        "proxystack_http_upstream_response_head_duration_seconds_count",
        &[],
    );
    assert_eq!(heads, Some(6.0));
    let dials = value(&s, "proxystack_http_upstream_dials_total", &[]).unwrap();
    let connects = value(
        &s,
        "proxystack_upstream_connects_total",
        &[("upstream", &up.to_string())],
    )
    .unwrap();
    assert!(
        (1.0..6.0).contains(&dials),
        "pool reuse: {dials} dials for 6 requests"
    );
    assert_eq!(dials, connects);
    assert_eq!(
        value(
            &s,
            "proxystack_http_upstream_connect_duration_seconds_count",
            &[]
        ),
        Some(dials)
    );
    // Istio request metrics, with Istio's labels plus the request-only ones.
    let ok: Vec<_> = samples(
        &s,
        "istio_requests_total",
        &[("response_code", "200"), ("request_protocol", "http")],
    )
    .collect();
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(number(&ok[0].value), 6.0);
    let mut want: BTreeSet<String> = ISTIO_LABELS.iter().map(|s| s.to_string()).collect();
    want.extend([
        "response_code".to_string(),
        "grpc_response_status".to_string(),
    ]);
    assert_eq!(label_names(ok[0]), want);
    for (k, v) in [
        ("reporter", "destination"),
        ("destination_workload", "web"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "none"),
    ] {
        assert_eq!(ok[0].labels.get(k), Some(v), "{k}");
    }
    assert_eq!(
        value(
            &s,
            "istio_request_duration_milliseconds_count",
            &[("response_code", "404")]
        ),
        Some(1.0)
    );

    let lines: Vec<_> = log
        .lines()
        .into_iter()
        .filter(|l| field(l, "message") == Some("request complete"))
        .collect();
    assert_eq!(lines.len(), 7, "{lines:?}");
    let upstream_label = up.to_string();
    assert!(lines
        .iter()
        .all(|l| field(l, "src.addr").is_some_and(|a| a.starts_with("127.0.0.1:"))));
    // Requests that dialled name the address; pooled ones have none to name.
    assert!(lines
        .iter()
        .any(|l| field(l, "dst.addr") == Some(upstream_label.as_str())));
    let post = lines
        .iter()
        .find(|l| field(l, "method") == Some("POST"))
        .unwrap();
    assert_eq!(field(post, "path"), Some("/echo"));
    assert_eq!(field(post, "status"), Some("200"));
    assert_eq!(field(post, "upstream"), Some(upstream_label.as_str()));
    assert_eq!(field(post, "direction"), Some("inbound"));
    let missing = lines
        .iter()
        .find(|l| field(l, "path") == Some("/nowhere"))
        .unwrap();
    assert_eq!(field(missing, "status"), Some("404"));
    assert_eq!(field(missing, "upstream"), None);
    proxy.shutdown().await;
}
