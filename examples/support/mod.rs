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
            tokio::spawn(serve_admin(stream, stats));
        }
    });
    bound
}

fn serve_admin(
    stream: tokio::net::TcpStream,
    stats: Vec<(String, Arc<ServeStats>)>,
) -> impl Future<Output = ()> {
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let stats = stats.clone();
        async move {
            let (status, body) = match req.uri().path() {
                "/ready" => (StatusCode::OK, "ready\n".to_string()),
                "/metrics" => (StatusCode::OK, metrics(&stats)),
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
