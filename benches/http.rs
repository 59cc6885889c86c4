//! HTTP reverse proxy vs direct, in one run: requests/s and p50/p99 latency for HTTP/1.1
//! and h2c, with 1 KiB and 1 MiB response bodies. A bounded load generator (hyper client,
//! fixed concurrency, fixed request count per batch) drives both paths. Prints the ratios
//! at the end.
//!
//! With the `metrics` feature a third path runs the same proxy with every metrics and
//! access-log layer on (connection + upstream + HTTP + Istio metrics, connection and request
//! access logs formatted by a `tracing_subscriber::fmt` writer into `io::sink`), to show
//! what observability costs per request.
//!
//! `cargo bench --bench http --features http` (add `-- --quick` for a shorter run;
//! `--features http,metrics` for the metered path).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxystack::http::{Forward, HttpServer, UpstreamProtocol};
use proxystack::{drain, tcp, Server, Target};
use tokio::net::{TcpListener, TcpStream};

const CONCURRENCY: usize = 8;
const SIZES: [(&str, usize, usize); 2] = [("1KiB", 1024, 400), ("1MiB", 1 << 20, 40)];

#[derive(Default)]
struct Stats {
    /// Best seconds per request, per id.
    per_request: BTreeMap<String, f64>,
    /// Every request latency, per id.
    latencies: BTreeMap<String, Vec<Duration>>,
}

static RESULTS: Mutex<Option<Stats>> = Mutex::new(None);

fn record(id: &str, total: Duration, requests: usize, latencies: Vec<Duration>) {
    let mut guard = RESULTS.lock().unwrap();
    let stats = guard.get_or_insert_with(Stats::default);
    let per = total.as_secs_f64() / requests.max(1) as f64;
    let slot = stats.per_request.entry(id.to_string()).or_insert(f64::MAX);
    *slot = slot.min(per);
    stats
        .latencies
        .entry(id.to_string())
        .or_default()
        .extend(latencies);
}

async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let small = Bytes::from(vec![b'a'; 1024]);
    let big = Bytes::from(vec![b'b'; 1 << 20]);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            s.set_nodelay(true).unwrap();
            let (small, big) = (small.clone(), big.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = if req.uri().path() == "/1MiB" {
                        big.clone()
                    } else {
                        small.clone()
                    };
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn proxy(upstream: SocketAddr, watch: drain::Watch) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let forward = Forward::new(tcp::TcpConnector::new(), move |_: &Request<Incoming>| {
        Some(Target::from(upstream))
    })
    .upstream_protocol(UpstreamProtocol::MatchClient);
    tokio::spawn(async move {
        Server::new()
            .serve(listener, HttpServer::new(forward), watch)
            .await
    });
    addr
}

/// The same proxy with every metrics and access-log layer on.
#[cfg(feature = "metrics")]
async fn metered_proxy(upstream: SocketAddr, watch: drain::Watch) -> SocketAddr {
    use proxystack::metrics::{
        record_route, AccessLogLayer, ConnectionMetrics, ConnectionMetricsLayer,
        HttpAccessLogLayer, HttpMetrics, HttpMetricsLayer, IstioMetrics, Reporter,
        UpstreamMetricsLayer,
    };
    use tower::{Layer, ServiceBuilder};

    // Access-log lines are formatted as in production, then thrown away.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_env_filter("proxystack::access=info")
        .try_init();
    let mut registry = prometheus_client::registry::Registry::default();
    let conns = ConnectionMetrics::new(&mut registry);
    let requests = HttpMetrics::new(&mut registry);
    let istio = IstioMetrics::builder(Reporter::Destination).register(&mut registry);
    let connector = UpstreamMetricsLayer::new(&conns).layer(tcp::TcpConnector::new());
    let forward = Forward::new(
        connector,
        record_route(move |_: &Request<Incoming>| Some(Target::from(upstream))),
    )
    .upstream_protocol(UpstreamProtocol::MatchClient);
    let per_request = ServiceBuilder::new()
        .layer(HttpMetricsLayer::new(&requests).istio(&istio))
        .layer(HttpAccessLogLayer::inbound())
        .service(forward);
    let per_connection = ServiceBuilder::new()
        .layer(ConnectionMetricsLayer::new(&conns, "bench").istio(&istio))
        .layer(AccessLogLayer::inbound())
        .service(HttpServer::new(per_request));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let served = Server::new().serve(listener, per_connection, watch).await;
        // The registry lives as long as the proxy; a scrape at the end proves it encodes.
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        served
    });
    addr
}

enum Client {
    H1(Vec<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn client(addr: SocketAddr, h2: bool) -> Client {
    async fn tcp(addr: SocketAddr) -> TokioIo<TcpStream> {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        TokioIo::new(s)
    }
    if h2 {
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake(tcp(addr).await)
            .await
            .unwrap();
        tokio::spawn(conn);
        Client::H2(send)
    } else {
        let mut conns = Vec::new();
        for _ in 0..CONCURRENCY {
            let (send, conn) = hyper::client::conn::http1::handshake(tcp(addr).await)
                .await
                .unwrap();
            tokio::spawn(conn);
            conns.push(send);
        }
        Client::H1(conns)
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One worker: takes request numbers until `requests` are done.
async fn worker(
    mut sender: Sender,
    path: &'static str,
    next: Arc<AtomicUsize>,
    requests: usize,
) -> (Sender, Vec<Duration>) {
    let mut latencies = Vec::new();
    while next.fetch_add(1, Ordering::Relaxed) < requests {
        let t = Instant::now();
        let resp = match &mut sender {
            Sender::H1(s) => {
                let req = Request::get(path)
                    .header("host", "bench")
                    .body(Empty::new())
                    .unwrap();
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Sender::H2(s) => {
                let req = Request::get(format!("http://bench{path}"))
                    .body(Empty::new())
                    .unwrap();
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        };
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(!body.is_empty());
        latencies.push(t.elapsed());
    }
    (sender, latencies)
}

/// Sends `requests` GETs with `CONCURRENCY` workers (one connection each for HTTP/1.1,
/// streams on one connection for HTTP/2); returns the client, wall time and latencies.
async fn load(
    client: Client,
    path: &'static str,
    requests: usize,
) -> (Client, Duration, Vec<Duration>) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let senders: Vec<Sender> = match client {
        Client::H1(conns) => conns.into_iter().map(Sender::H1).collect(),
        Client::H2(s) => (0..CONCURRENCY).map(|_| Sender::H2(s.clone())).collect(),
    };
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|s| tokio::spawn(worker(s, path, next.clone(), requests)))
        .collect();
    let mut h1 = Vec::new();
    let mut h2 = None;
    let mut all = Vec::new();
    for t in tasks {
        let (sender, latencies) = t.await.unwrap();
        match sender {
            Sender::H1(s) => h1.push(s),
            Sender::H2(s) => h2 = Some(s),
        }
        all.extend(latencies);
    }
    let elapsed = started.elapsed();
    let client = match h2 {
        Some(s) => Client::H2(s),
        None => Client::H1(h1),
    };
    (client, elapsed, all)
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_signal, watch) = drain::channel();
    let (direct, proxied) = rt.block_on(async {
        let b = backend().await;
        (b, proxy(b, watch.clone()).await)
    });
    #[allow(unused_mut)]
    let mut paths = vec![("direct", direct), ("proxy", proxied)];
    #[cfg(feature = "metrics")]
    paths.push(("metered", rt.block_on(metered_proxy(direct, watch))));
    for (proto, h2) in [("h1", false), ("h2c", true)] {
        for (size, bytes, requests) in SIZES {
            let mut g = c.benchmark_group(format!("{proto}_{size}"));
            g.sample_size(10)
                .throughput(Throughput::Bytes((bytes * requests) as u64));
            let path: &'static str = if bytes > 1024 { "/1MiB" } else { "/1KiB" };
            for &(via, addr) in &paths {
                let id = format!("{proto}/{size}/{via}");
                let mut slot = Some(rt.block_on(client(addr, h2)));
                g.bench_function(via, |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let c = slot.take().unwrap();
                            let (c, t, latencies) = rt.block_on(load(c, path, requests));
                            slot = Some(c);
                            record(&id, t, requests, latencies);
                            total += t;
                        }
                        total
                    })
                });
            }
            g.finish();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn summary() {
    let mut guard = RESULTS.lock().unwrap();
    let Some(stats) = guard.as_mut() else { return };
    println!("\n== HTTP proxy vs direct (best batch; latency over all batches) ==");
    println!(
        "{:<12} {:>12} {:>12} {:>7}   {:>21}   {:>21}",
        "case", "direct req/s", "proxy req/s", "ratio", "direct p50/p99 (µs)", "proxy p50/p99 (µs)"
    );
    for (proto, _) in [("h1", false), ("h2c", true)] {
        for (size, _, _) in SIZES {
            let d = format!("{proto}/{size}/direct");
            let p = format!("{proto}/{size}/proxy");
            let (Some(&dt), Some(&pt)) = (stats.per_request.get(&d), stats.per_request.get(&p))
            else {
                continue;
            };
            let mut lat = |id: &str| {
                let v = stats.latencies.entry(id.to_string()).or_default();
                v.sort();
                (
                    percentile(v, 0.5).as_micros(),
                    percentile(v, 0.99).as_micros(),
                )
            };
            let (d50, d99) = lat(&d);
            let (p50, p99) = lat(&p);
            println!(
                "{:<12} {:>12.0} {:>12.0} {:>7.2}   {:>10}/{:<10}   {:>10}/{:<10}",
                format!("{proto} {size}"),
                1.0 / dt,
                1.0 / pt,
                dt / pt,
                d50,
                d99,
                p50,
                p99
            );
            let m = format!("{proto}/{size}/metered");
            if let Some(&mt) = stats.per_request.get(&m) {
                let (m50, m99) = lat(&m);
                println!(
                    "{:<12} {:>12} {:>12.0} {:>7.2}   {:>21}   {:>10}/{:<10}  (metered vs proxy)",
                    format!("{proto} {size}"),
                    "",
                    1.0 / mt,
                    pt / mt,
                    "",
                    m50,
                    m99
                );
            }
        }
    }
}

criterion_group!(http_benches, benches);

fn main() {
    http_benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
