//! What every example shares: flags, logging, the admin endpoint, signals, `listening on`.
//!
//! Every listener bound here ([`bind_all`], [`admin`], [`Servers`]) is registered in the
//! process's [`own_listeners`] as soon as it is bound and before any connection is
//! accepted on any of them, so connectors built with
//! `TcpConnector::own_listeners(support::own_listeners().clone())` (and [`MeshConnector`]
//! for plain TCP) refuse to dial back into the process: its tunnel ports, its admin
//! endpoint, on every address of the host.
//!
//! Copy this file along with an example; it is deliberately plain.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use proxystack::metrics::{
    AccessLogLayer, ConnectionMetrics, ConnectionMetricsLayer, ServeMetrics,
};
use proxystack::{BoxIo, Conn};
use tokio::net::TcpListener;
use tower::ServiceBuilder;

/// Flags every example accepts.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Serve `/metrics` and `/ready` on this address.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Seconds live connections may run after SIGTERM/Ctrl-C before they are closed.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub drain_secs: u64,
}

/// Process setup every example does first: logs to stderr (`RUST_LOG` overrides the
/// default `info`), and [`tune_allocator`]. Access-log lines (target `proxystack::access`,
/// one per connection and per request) are formatted as `PROXYSTACK_ACCESS_LOG` says:
/// `text` (the default, like every other line), `json` (one JSON object per line, for log
/// shippers) or `off`.
pub fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::prelude::*;

    tune_allocator();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let is_access = |m: &tracing::Metadata<'_>| m.target() == "proxystack::access";
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_filter(filter_fn(move |m| !is_access(m)));
    let format = std::env::var("PROXYSTACK_ACCESS_LOG").unwrap_or_else(|_| "text".into());
    let access = match format.as_str() {
        "text" => Some(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .with_filter(filter_fn(is_access))
                .boxed(),
        ),
        "json" => Some(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_filter(filter_fn(is_access))
                .boxed(),
        ),
        "off" => None,
        other => fail(format!(
            "PROXYSTACK_ACCESS_LOG={other:?}: expected \"text\", \"json\" or \"off\""
        )),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(access)
        .init();
}

/// Keeps glibc's allocator from handing memory back to the kernel after every large free.
///
/// A proxy allocates and frees many short-lived buffers of 16 KiB to 1 MiB (TLS records,
/// HTTP/2 frames, copies of relayed chunks). With glibc's defaults, those above 128 KiB are
/// mmapped and unmapped each time, and freeing smaller ones trims the heap with `madvise`,
/// so the next allocation page-faults fresh zeroed pages in: on the HBONE path this was
/// about 40% of the CPU time (4.8 → 2.8 CPU s per GB relayed, `bench/compare.sh`). Other
/// allocators (jemalloc, mimalloc) keep such memory by design; this is the glibc knob.
/// The cost is up to 8 MiB of freed memory kept per allocator arena.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters and is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// The listeners of this process, for connectors that must never dial them (see the
/// module docs). Demo backends standing in for other hosts are not in it.
pub fn own_listeners() -> &'static proxystack::tcp::OwnListeners {
    static OWN: OnceLock<proxystack::tcp::OwnListeners> = OnceLock::new();
    OWN.get_or_init(proxystack::tcp::OwnListeners::new)
}

/// Binds `addr` (synchronously, with the options `TcpListener::bind` uses, so that a
/// reload can bind too) and registers it in [`own_listeners`]; the error names `what`
/// (e.g. `"admin address "`, or nothing) and the address.
pub fn bind_now(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    let listener = bind().map_err(|e| format!("cannot listen on {what}{addr}: {e}"))?;
    // Registered with the bound address, so a port 0 is known by its real number.
    own_listeners()
        .register_listener(&listener)
        .map_err(|e| format!("cannot read the bound address of {what}{addr}: {e}"))?;
    Ok(listener)
}

/// [`bind_now`], or exits naming what failed.
fn bind_own(addr: SocketAddr, what: &str) -> TcpListener {
    bind_now(addr, what).unwrap_or_else(|e| fail(e))
}

/// Binds every address (registering each in [`own_listeners`]) or exits with a message
/// naming the one that failed.
pub async fn bind_all(addrs: &[SocketAddr]) -> Vec<TcpListener> {
    let mut out = Vec::new();
    for addr in addrs {
        out.push(bind_own(*addr, ""));
    }
    out
}

/// Prints `listening on ADDR` for each bound address; call once all are bound.
pub fn announce(addrs: &[SocketAddr]) {
    install_signal_handlers();
    for addr in addrs {
        println!("listening on {addr}");
    }
}

/// The bound address of each listener.
pub fn local_addrs(listeners: &[TcpListener]) -> Vec<SocketAddr> {
    listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect()
}

/// Exits non-zero with a message.
pub fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2);
}

/// The SIGTERM / SIGINT handlers, installed by [`announce`] *before* the `listening on`
/// lines are printed: a script that signals right after reading them must find them in
/// place.
static SHUTDOWN: std::sync::Mutex<Option<proxystack::drain::ShutdownSignal>> =
    std::sync::Mutex::new(None);

fn install_signal_handlers() {
    let mut slot = SHUTDOWN.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        match proxystack::drain::ShutdownSignal::install() {
            Ok(signal) => *slot = Some(signal),
            Err(e) => fail(format!("cannot install signal handlers: {e}")),
        }
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    install_signal_handlers();
    let taken = SHUTDOWN.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(signal) = taken {
        signal.recv().await;
    }
    tracing::info!("shutdown signal received; draining");
}

/// Files the demo wrote, removed when the example has drained (see [`demo_ca_file`]).
static DEMO_FILES: std::sync::Mutex<Vec<tempfile::TempPath>> = std::sync::Mutex::new(Vec::new());

/// Writes a demo CA certificate for clients such as curl to a new file with a unique name
/// (created exclusively: it cannot overwrite another run's file, nor follow a file or
/// symlink planted under a predictable name), prints where, and removes it when the
/// example exits after draining.
pub fn demo_ca_file(example: &str, pem: &str) -> std::path::PathBuf {
    use std::io::Write;
    let file = tempfile::Builder::new()
        .prefix(&format!("proxystack-{example}-demo-ca-"))
        .suffix(".pem")
        .tempfile()
        .and_then(|mut f| f.write_all(pem.as_bytes()).map(|()| f))
        .unwrap_or_else(|e| fail(format!("cannot write the demo CA file: {e}")));
    let path = file.into_temp_path();
    let shown = path.to_path_buf();
    eprintln!("demo: CA written to {}", shown.display());
    DEMO_FILES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path);
    shown
}

/// Removes the files [`demo_ca_file`] wrote.
fn remove_demo_files() {
    DEMO_FILES.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// Runs `servers` until a shutdown signal, then drains them.
pub async fn run_until_signal(
    signal: proxystack::drain::Signal,
    servers: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
) {
    shutdown_signal().await;
    signal.start();
    for s in servers {
        match s.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "server failed"),
            Err(e) => tracing::error!(error = %e, "server task failed"),
        }
    }
    remove_demo_files();
    tracing::info!("drained");
}

/// The process's metrics: one `prometheus-client` registry, with the accept loops'
/// counters ([`ServeMetrics`]) and per-listener connection metrics (bytes, durations,
/// failures by reason: [`ConnectionMetricsLayer`]) registered; examples register more
/// (HTTP, Istio, their own) through [`registry`](Self::registry). [`admin`] serves it.
pub struct Metrics {
    registry: Registry,
    connections: ConnectionMetrics,
    serve: Arc<ServeMetrics>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connections = ConnectionMetrics::new(&mut registry);
        let serve = ServeMetrics::register(&mut registry);
        Self {
            registry,
            connections,
            serve,
        }
    }

    /// For more metrics: HTTP, Istio, an example's own.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The connection and upstream metrics, e.g. for an [`UpstreamMetricsLayer`].
    pub fn connections(&self) -> &ConnectionMetrics {
        &self.connections
    }

    /// Istio's standard metrics (`istio_tcp_*`, `istio_requests_total`…), reported by this
    /// proxy as `reporter` for workload `me`. One reporter per process: the families are
    /// registered once.
    #[cfg(feature = "tls")]
    pub fn istio(
        &mut self,
        reporter: proxystack::metrics::Reporter,
        me: Option<&proxystack::identity::SpiffeId>,
    ) -> proxystack::metrics::IstioMetrics {
        let workload = me
            .map(proxystack::metrics::Workload::from_identity)
            .unwrap_or_default();
        proxystack::metrics::IstioMetrics::builder(reporter)
            .workload(workload)
            .register(&mut self.registry)
    }

    /// Connection metrics (and Istio's TCP metrics) per tunnel, where the peer's identity
    /// is known: put it in front of the service an HBONE inbound hands its tunnels to.
    #[cfg(feature = "tls")]
    pub fn tunnels(
        &self,
        name: &str,
        istio: &proxystack::metrics::IstioMetrics,
    ) -> ConnectionMetricsLayer {
        ConnectionMetricsLayer::new(&self.connections, name).istio(istio)
    }

    /// A counter read at scrape time from `read` (e.g. an atomic a layer already keeps), in
    /// the registry like every other metric. `name` without `_total`: the encoder adds it.
    pub fn counter_fn(
        &mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.sampled(name, help, true, Box::new(read));
    }

    /// A gauge read at scrape time from `read`.
    pub fn gauge_fn(
        &mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.sampled(name, help, false, Box::new(read));
    }

    fn sampled(
        &mut self,
        name: &'static str,
        help: &'static str,
        counter: bool,
        read: Box<dyn Fn() -> u64 + Send + Sync>,
    ) {
        let sampled = Sampled {
            name,
            help,
            counter,
            read,
        };
        self.registry.register_collector(Box::new(sampled));
    }

    /// Reports an accept loop's counters as listener `name` (for a server whose service is
    /// wrapped elsewhere; [`listener`](Self::listener) does this itself).
    pub fn serve_stats(&self, name: &str, stats: Arc<proxystack::serve::ServeStats>) {
        self.serve.listener(name, stats);
    }

    /// Wraps the service of listener `name`: its accept loop's counters, connection metrics
    /// and one access-log line per connection (target `proxystack::access`, INFO).
    pub fn listener<S>(
        &self,
        name: &str,
        server: &proxystack::Server,
        svc: S,
    ) -> impl tower::Service<
        Conn<tokio::net::TcpStream>,
        Response = (),
        Error = proxystack::BoxError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + 'static
    where
        S: tower::Service<Conn<BoxIo>, Response = ()> + Clone + Send + 'static,
        S::Error: Into<proxystack::BoxError>,
        S::Future: Send + 'static,
    {
        self.serve.listener(name, server.stats());
        // Boxed under the layers: one stream type for every example's service.
        ServiceBuilder::new()
            .layer(ConnectionMetricsLayer::new(&self.connections, name))
            .layer(AccessLogLayer::inbound())
            .map_request(|conn: Conn<_>| conn.boxed())
            .map_err(Into::into)
            .service(svc)
    }
}

/// One value read at scrape time: [`Metrics::counter_fn`], [`Metrics::gauge_fn`].
struct Sampled {
    name: &'static str,
    help: &'static str,
    counter: bool,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for Sampled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampled").field("name", &self.name).finish()
    }
}

impl prometheus_client::collector::Collector for Sampled {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::{counter::ConstCounter, gauge::ConstGauge};
        let value = (self.read)();
        if self.counter {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(
                self.name,
                self.help,
                None,
                metric.metric_type(),
            )?)
        } else {
            let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            metric.encode(encoder.encode_descriptor(
                self.name,
                self.help,
                None,
                metric.metric_type(),
            )?)
        }
    }
}

/// Serves `/ready` (200 once called) and `/metrics` (Prometheus text, from `metrics` plus
/// `extra()`, an example's hand-counted additions) on `addr`. Returns the bound address,
/// registered in [`own_listeners`]: tunnels cannot read it.
pub async fn admin(
    addr: SocketAddr,
    metrics: Metrics,
    extra: Arc<dyn Fn() -> String + Send + Sync>,
) -> SocketAddr {
    let listener = bind_own(addr, "admin address ");
    let bound = listener.local_addr().unwrap_or(addr);
    let registry = Arc::new(metrics.registry);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve_admin(stream, registry.clone(), extra.clone()));
        }
    });
    bound
}

fn serve_admin(
    stream: tokio::net::TcpStream,
    registry: Arc<Registry>,
    extra: Arc<dyn Fn() -> String + Send + Sync>,
) -> impl Future<Output = ()> {
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let registry = registry.clone();
        let extra = extra.clone();
        async move {
            let (status, body) = match req.uri().path() {
                "/ready" => (StatusCode::OK, "ready\n".to_string()),
                "/metrics" => {
                    // The Prometheus 0.0.4 text format: what every scraper reads.
                    let mut text = String::new();
                    match prometheus_text::encode(&mut text, &registry) {
                        Ok(()) => (StatusCode::OK, text + &extra()),
                        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
                    }
                }
                _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
            };
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    async move {
        let io = hyper_util::rt::TokioIo::new(stream);
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await;
    }
}

/// A loopback HTTP/1.1 server answering every request with `body`, standing in for a real
/// backend in `--demo` runs.
pub async fn demo_http_backend(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| fail(format!("demo backend: {e}")));
    let addr = listener.local_addr().unwrap_or_else(|e| fail(e));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(
                move |_req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        body.as_bytes(),
                    ))))
                },
            );
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    addr
}

/// A loopback echo server standing in for a real backend in `--demo` runs.
pub async fn demo_echo_backend() -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| fail(format!("echo backend: {e}")));
    let addr = listener.local_addr().unwrap_or_else(|e| fail(e));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Reads and parses a TOML config file, or exits naming the file and the problem.
pub fn load_config<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> T {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| fail(format!("cannot read {}: {e}", path.display())));
    toml::from_str(&text)
        .unwrap_or_else(|e| fail(format!("invalid config {}: {e}", path.display())))
}

/// Serves `svc` on every listener and runs until SIGTERM/Ctrl-C, then drains.
pub async fn serve_all<S>(listeners: Vec<TcpListener>, server: proxystack::Server, svc: S)
where
    S: tower::Service<proxystack::Conn<tokio::net::TcpStream>, Response = ()>
        + Clone
        + Send
        + 'static,
    S::Error: Into<proxystack::BoxError>,
    S::Future: Send + 'static,
{
    let result = server.serve_until(listeners, svc, shutdown_signal()).await;
    remove_demo_files();
    match result {
        Ok(()) => tracing::info!("drained"),
        Err(e) => tracing::error!(error = %e, "server failed"),
    }
}

/// Serde helper for config fields of any `FromStr` type (`Authority`, `SpiffeId`, `Cidr`…):
/// `#[serde(deserialize_with = "support::parse")]`. A bad value fails the whole file with
/// the parser's message and the TOML position.
pub fn parse<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = <String as serde::Deserialize>::deserialize(d)?;
    s.parse()
        .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

/// [`parse`] for a list of values.
pub fn parse_all<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    <Vec<String> as serde::Deserialize>::deserialize(d)?
        .into_iter()
        .map(|s| {
            s.parse()
                .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
        })
        .collect()
}

/// [`parse`] for an optional value (use with `#[serde(default)]`).
pub fn parse_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    parse(d).map(Some)
}

/// An accept loop waiting to be started with its drain watch (`Send`, so that an example's
/// whole `run` can be a task of its own, as in `mesh`).
type PendingServer = Box<
    dyn FnOnce(proxystack::drain::Watch) -> tokio::task::JoinHandle<std::io::Result<()>> + Send,
>;

/// The reload hook of a [`Servers`] that does not reload (SIGHUP keeps its default action).
type NoReload = fn(&mut Servers) -> Result<(), String>;

/// One named listener of [`Servers`].
struct Listener {
    name: String,
    /// The address the config asked for (maybe port 0): what a reload compares.
    configured: SocketAddr,
    bound: SocketAddr,
    /// Stops this listener's accept loop and drains its connections.
    signal: proxystack::drain::Signal,
    state: ListenerState,
}

enum ListenerState {
    Pending(proxystack::drain::Watch, PendingServer),
    Running(tokio::task::JoinHandle<std::io::Result<()>>),
    Taken,
}

/// The listeners of one process: each served by its own accept loop (own stats for
/// `/metrics`), all announced together, all drained together. No loop accepts before
/// [`run`](Self::run) has bound (and registered) the admin endpoint too, so no tunnel can
/// slip in to a listener [`own_listeners`] does not know yet.
///
/// With [`run_reloading`](Self::run_reloading), listeners can also come and go while the
/// process runs (see [`reload`]): each has its own drain signal.
pub struct Servers {
    drain: std::time::Duration,
    metrics: Metrics,
    listeners: Vec<Listener>,
    /// One accept-loop config (and so one set of counters) per listener name, kept when a
    /// listener moves to another address.
    servers: std::collections::HashMap<String, proxystack::Server>,
    /// Listeners removed or moved by a reload, still draining.
    retired: Vec<(String, tokio::task::JoinHandle<std::io::Result<()>>)>,
    running: bool,
}

impl Servers {
    /// No listeners yet; `common` gives the drain deadline.
    pub fn new(common: &Common) -> Self {
        Self {
            drain: std::time::Duration::from_secs(common.drain_secs),
            metrics: Metrics::new(),
            listeners: Vec::new(),
            servers: std::collections::HashMap::new(),
            retired: Vec::new(),
            running: false,
        }
    }

    /// The process's metrics, to register more (HTTP, Istio) before [`run`](Self::run).
    pub fn metrics(&mut self) -> &mut Metrics {
        &mut self.metrics
    }

    /// Serves `svc` on `listener` (started by [`run`](Self::run), or at once if it runs
    /// already), under the connection metrics and access log of [`Metrics::listener`];
    /// `name` labels its metrics. The listener must come from [`bind_all`] or
    /// [`bind_now`] (which registered it). A listener of the same name is replaced: it
    /// stops accepting and drains.
    pub fn spawn<S>(&mut self, name: &str, listener: TcpListener, svc: S)
    where
        S: tower::Service<Conn<BoxIo>, Response = ()> + Clone + Send + 'static,
        S::Error: Into<proxystack::BoxError>,
        S::Future: Send + 'static,
    {
        self.spawn_configured(name, None, listener, svc);
    }

    /// [`spawn`](Self::spawn), remembering that the config asked for `configured` (which
    /// may be port 0), so that [`bind_changed`](Self::bind_changed) leaves it alone while
    /// the config still says the same.
    pub fn spawn_configured<S>(
        &mut self,
        name: &str,
        configured: Option<SocketAddr>,
        listener: TcpListener,
        svc: S,
    ) where
        S: tower::Service<Conn<BoxIo>, Response = ()> + Clone + Send + 'static,
        S::Error: Into<proxystack::BoxError>,
        S::Future: Send + 'static,
    {
        let drain = self.drain;
        let server = self
            .servers
            .entry(name.to_owned())
            .or_insert_with(|| proxystack::Server::new().drain_timeout(drain))
            .clone();
        let svc = self.metrics.listener(name, &server, svc);
        let Ok(bound) = listener.local_addr() else {
            tracing::error!(listener = name, "listener has no local address; not served");
            return;
        };
        let start: PendingServer = Box::new(move |watch| {
            tokio::spawn(async move { server.serve(listener, svc, watch).await })
        });
        let (signal, watch) = proxystack::drain::channel();
        let state = if self.running {
            ListenerState::Running(start(watch))
        } else {
            ListenerState::Pending(watch, start)
        };
        let new = Listener {
            name: name.to_owned(),
            configured: configured.unwrap_or(bound),
            bound,
            signal,
            state,
        };
        match self.listeners.iter().position(|l| l.name == name) {
            Some(i) => {
                let old = std::mem::replace(&mut self.listeners[i], new);
                tracing::info!(listener = name, from = %old.bound, to = %bound, "listener moved");
                println!("listening on {bound}");
                self.retire(old);
            }
            None => {
                if self.running {
                    // Like every listener: one `listening on` line once bound.
                    tracing::info!(listener = name, %bound, "listener added");
                    println!("listening on {bound}");
                }
                self.listeners.push(new);
            }
        }
    }

    /// Stops every listener whose name `keep` rejects: no new connections, the open ones
    /// drain (within the drain deadline).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let (kept, removed) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|l| keep(&l.name));
        self.listeners = kept;
        for old in removed {
            tracing::info!(listener = %old.name, addr = %old.bound, "listener removed; draining");
            self.retire(old);
        }
    }

    fn retire(&mut self, mut old: Listener) {
        old.signal.start();
        own_listeners().unregister(old.bound);
        if let ListenerState::Running(task) =
            std::mem::replace(&mut old.state, ListenerState::Taken)
        {
            self.retired.push((old.name, task));
        }
    }

    /// The bound addresses, in the order the listeners were spawned.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.bound).collect()
    }

    /// Starts the admin endpoint (if asked), then every accept loop, prints `listening on`
    /// for every listener (admin last), then runs until SIGTERM/Ctrl-C and drains.
    pub async fn run(self, admin_addr: Option<SocketAddr>) {
        self.run_inner(admin_addr, None::<NoReload>).await;
    }

    pub(crate) async fn run_inner(
        mut self,
        admin_addr: Option<SocketAddr>,
        mut reload: Option<impl FnMut(&mut Servers) -> Result<(), String>>,
    ) {
        let mut hangups = reload.as_ref().map(|_| reload::hangup_signal());
        let reloads = reload::Counters::register(&mut self.metrics, reload.is_some());
        let mut addrs = self.addrs();
        if let Some(addr) = admin_addr {
            // The registry goes to the admin endpoint; the families stay here, so that
            // listeners a reload opens report into what `/metrics` serves.
            let metrics = Metrics {
                registry: std::mem::take(&mut self.metrics.registry),
                connections: self.metrics.connections.clone(),
                serve: self.metrics.serve.clone(),
            };
            addrs.push(admin(addr, metrics, Arc::new(String::new)).await);
        }
        self.running = true;
        for l in &mut self.listeners {
            if let ListenerState::Pending(watch, start) =
                std::mem::replace(&mut l.state, ListenerState::Taken)
            {
                l.state = ListenerState::Running(start(watch));
            }
        }
        announce(&addrs);
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                Some(()) = hangup => {
                    if let Some(reload) = reload.as_mut() {
                        reloads.record(reload(&mut self));
                    }
                }
            }
        }
        for l in &self.listeners {
            l.signal.start();
        }
        let running = self.listeners.drain(..).filter_map(|l| match l.state {
            ListenerState::Running(task) => Some((l.name, task)),
            _ => None,
        });
        let all: Vec<_> = running.chain(self.retired.drain(..)).collect();
        for (name, task) in all {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(listener = %name, error = %e, "server failed"),
                Err(e) => tracing::error!(listener = %name, error = %e, "server task failed"),
            }
        }
        remove_demo_files();
        tracing::info!("drained");
    }
}

pub mod reload;

#[cfg(feature = "tls")]
mod live;
#[cfg(feature = "tls")]
#[allow(unused_imports)] // only the mesh examples use it
pub use live::{identity_metrics, IdentityFiles, IdentityGuard};

/// The outbound side of the mesh examples: HBONE for targets built with `HboneTarget`
/// (they carry a `ConnectAuthority`), plain TCP for everything else. Both answers are boxed
/// so `Relay` and `Forward` see one connector type. Plain TCP never dials one of
/// [`own_listeners`] (a loop, or `/metrics` for anyone): `Relay` closes, a tunnel gets 503.
/// HBONE may: a node proxy's own HBONE port is a legitimate next hop for a local pod.
#[cfg(feature = "hbone")]
#[derive(Clone)]
pub struct MeshConnector {
    /// The pooled HBONE client; `None` when this proxy has no mesh identity.
    pub hbone: Option<proxystack::hbone::Connector>,
    /// Plain TCP.
    pub tcp: proxystack::tcp::TcpConnector,
}

#[cfg(feature = "hbone")]
impl tower::Service<proxystack::Target> for MeshConnector {
    type Response = proxystack::Conn<proxystack::BoxIo>;
    type Error = proxystack::BoxError;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, proxystack::BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: proxystack::Target) -> Self::Future {
        use tower::ServiceExt;
        let hbone = target
            .get::<proxystack::connect::ConnectAuthority>()
            .is_some();
        match (hbone, self.hbone.clone()) {
            (true, Some(h)) => Box::pin(async move { Ok(h.oneshot(target).await?.boxed()) }),
            (true, None) => Box::pin(async { Err("HBONE target, but no mesh identity".into()) }),
            (false, _) => {
                let tcp = self.tcp.clone().own_listeners(own_listeners().clone());
                Box::pin(async move { Ok(tcp.oneshot(target).await?.boxed()) })
            }
        }
    }
}

/// A demo HBONE endpoint (a "pod" with its own node proxy) on loopback: mTLS with the
/// workload certificate `ns/sa`, tunnels go to `127.0.0.1:<port of :authority>`.
#[cfg(all(feature = "hbone", feature = "demo-certs"))]
pub async fn demo_hbone_endpoint(
    ca: &proxystack::tls::demo::DemoCa,
    namespace: &str,
    service_account: &str,
) -> SocketAddr {
    use proxystack::connect::TunnelInfo;
    let app = proxystack::tcp::Relay::new(proxystack::tcp::TcpConnector::new()).upstream(
        |m: &proxystack::Metadata| {
            let port = m.get::<TunnelInfo>()?.authority.port();
            Some(proxystack::Target::from(([127, 0, 0, 1], port)))
        },
    );
    let inbound =
        proxystack::hbone::Inbound::new(ca.workload_cert(namespace, service_account), ca.roots())
            .service(app)
            .unwrap_or_else(|e| fail(format!("demo HBONE endpoint: {e}")));
    serve_demo("demo HBONE endpoint", inbound).await
}

/// A client-identity pattern for allow rules: an exact SPIFFE ID, or a prefix ending in
/// `/*` (`spiffe://cluster.local/ns/ops/*` is every service account of namespace `ops`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPattern(String);

impl std::str::FromStr for IdentityPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // Validate with the SPIFFE ID parser: a prefix must be a valid ID once completed.
        let check = match s.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') => format!("{prefix}x"),
            Some(_) => return Err("`*` is only allowed as a whole last segment (`…/*`)".into()),
            None => s.to_string(),
        };
        proxystack::identity::SpiffeId::parse(&check).map_err(|e| e.to_string())?;
        Ok(Self(s.to_string()))
    }
}

impl IdentityPattern {
    /// Whether `id` matches.
    pub fn matches(&self, id: &proxystack::identity::SpiffeId) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => id.as_str().starts_with(prefix),
            None => id.as_str() == self.0,
        }
    }

    /// An allow list's verdict on a client: an empty list admits every client (mTLS
    /// already vouched for its trust domain), otherwise one pattern must match.
    pub fn admits(list: &[Self], client: Option<&proxystack::identity::SpiffeId>) -> bool {
        list.is_empty() || client.is_some_and(|c| list.iter().any(|p| p.matches(c)))
    }
}

/// A loopback backend that terminates TLS itself (with `cert`) in front of an HTTP
/// backend answering `body`: the far end of a TLS passthrough route in demos.
#[cfg(feature = "demo-certs")]
pub async fn demo_tls_backend(cert: proxystack::tls::CertKey, body: &'static str) -> SocketAddr {
    let inner = demo_http_backend(body).await;
    let tls = proxystack::tls::ServerConfigBuilder::new()
        .default_cert(cert)
        .build()
        .unwrap_or_else(|e| fail(e));
    let svc = tower::ServiceBuilder::new()
        .layer(proxystack::tls::TerminateLayer::new(tls))
        .service(
            proxystack::tcp::Relay::new(proxystack::tcp::TcpConnector::new())
                .upstream(move |_: &proxystack::Metadata| Some(proxystack::Target::from(inner))),
        );
    serve_demo("demo TLS backend", svc).await
}

/// Serves a demo backend on an ephemeral loopback port for the life of the process.
#[cfg(feature = "demo-certs")]
async fn serve_demo<S>(what: &str, svc: S) -> SocketAddr
where
    S: tower::Service<proxystack::Conn<tokio::net::TcpStream>, Response = ()>
        + Clone
        + Send
        + 'static,
    S::Error: Into<proxystack::BoxError>,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| fail(format!("{what}: {e}")));
    let addr = listener.local_addr().unwrap_or_else(|e| fail(e));
    tokio::spawn(proxystack::serve(
        listener,
        svc,
        proxystack::drain::Watch::never(),
    ));
    addr
}
