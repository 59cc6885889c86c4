//! What every example shares: flags, logging, the admin endpoint, signals, `listening on`.
//!
//! Copy this file along with an example; it is deliberately plain.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use proxystack::serve::ServeStats;
use tokio::net::TcpListener;

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

/// Logs to stderr; `RUST_LOG` overrides the default `info`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Binds every address or exits with a message naming the one that failed.
pub async fn bind_all(addrs: &[SocketAddr]) -> Vec<TcpListener> {
    let mut out = Vec::new();
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => out.push(l),
            Err(e) => fail(format!("cannot listen on {addr}: {e}")),
        }
    }
    out
}

/// Prints `listening on ADDR` for each bound address; call once all are bound.
pub fn announce(addrs: &[SocketAddr]) {
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

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => fail(format!("cannot install SIGTERM handler: {e}")),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received; draining");
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
    tracing::info!("drained");
}

/// Serves `/ready` (200 once called) and `/metrics` (Prometheus text) from `stats`.
/// Returns the bound address.
pub async fn admin(addr: SocketAddr, stats: Vec<(String, Arc<ServeStats>)>) -> SocketAddr {
    admin_with(addr, stats, Arc::new(String::new)).await
}

/// Like [`admin`], with `extra()` (more Prometheus text) appended to `/metrics`.
pub async fn admin_with(
    addr: SocketAddr,
    stats: Vec<(String, Arc<ServeStats>)>,
    extra: Arc<dyn Fn() -> String + Send + Sync>,
) -> SocketAddr {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => fail(format!("cannot listen on admin address {addr}: {e}")),
    };
    let bound = listener.local_addr().unwrap_or(addr);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let stats = stats.clone();
            tokio::spawn(serve_admin(stream, stats, extra.clone()));
        }
    });
    bound
}

fn serve_admin(
    stream: tokio::net::TcpStream,
    stats: Vec<(String, Arc<ServeStats>)>,
    extra: Arc<dyn Fn() -> String + Send + Sync>,
) -> impl Future<Output = ()> {
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let stats = stats.clone();
        let extra = extra.clone();
        async move {
            let (status, body) = match req.uri().path() {
                "/ready" => (StatusCode::OK, "ready\n".to_string()),
                "/metrics" => (StatusCode::OK, metrics(&stats) + &extra()),
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

fn metrics(stats: &[(String, Arc<ServeStats>)]) -> String {
    let mut out = String::new();
    for (name, help, get) in [
        (
            "proxystack_connections_accepted_total",
            "Connections accepted.",
            &(|s: &ServeStats| s.accepted.load(Ordering::Relaxed)) as &dyn Fn(&ServeStats) -> u64,
        ),
        (
            "proxystack_connections_active",
            "Connections open now.",
            &|s: &ServeStats| s.active.load(Ordering::Relaxed),
        ),
        (
            "proxystack_connection_errors_total",
            "Connections that ended with an error.",
            &|s: &ServeStats| s.errors.load(Ordering::Relaxed),
        ),
        (
            "proxystack_connection_panics_total",
            "Connection tasks that panicked.",
            &|s: &ServeStats| s.panics.load(Ordering::Relaxed),
        ),
        (
            "proxystack_accept_errors_total",
            "Failed accept calls.",
            &|s: &ServeStats| s.accept_errors.load(Ordering::Relaxed),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {}\n",
            if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            }
        ));
        for (listener, s) in stats {
            out.push_str(&format!("{name}{{listener=\"{listener}\"}} {}\n", get(s)));
        }
    }
    out
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
    let (signal, watch) = proxystack::drain::channel();
    let servers = listeners
        .into_iter()
        .map(|l| {
            let (server, svc, watch) = (server.clone(), svc.clone(), watch.clone());
            tokio::spawn(async move { server.serve(l, svc, watch).await })
        })
        .collect();
    run_until_signal(signal, servers).await;
}
