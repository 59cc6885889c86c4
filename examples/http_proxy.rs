//! An HTTP reverse proxy: one port, protocol detection, HTTP/1.1 and h2c in, HTTP/1.1 or
//! HTTP/2 out, with tower-http tracing.
//!
//! ```text
//! cargo run --example http_proxy --features http -- --demo
//! cargo run --example http_proxy --features http -- --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000
//! cargo run --example http_proxy --features http -- --listen 0.0.0.0:8080 --upstream backend:80 \
//!     --upstream-h2 --forwarded overwrite --timeout 10
//! ```
//!
//! `--demo` starts a built-in backend and serves TLS too (demo certificate for
//! `localhost`); try `curl -v http://127.0.0.1:15080/`,
//! `curl --http2-prior-knowledge http://127.0.0.1:15080/` and
//! `curl --cacert <printed CA file> https://localhost:15080/` — all on the same port.
//! Outside the demo, `--cert FILE --key FILE` (PEM) enables the TLS route.

#[path = "support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::{Request, Response};
use proxystack::detect::{DetectLayer, Router};
use proxystack::http::{Forward, ForwardedMode, HttpServer, Incoming, UpstreamProtocol};
use proxystack::metrics::{HttpAccessLogLayer, HttpMetrics, HttpMetricsLayer};
use proxystack::tls::{CertKey, ServerConfigBuilder, TerminateLayer};
use proxystack::{drain, tcp, Server, Target};
use tower::ServiceBuilder;
use tower_http::trace::TraceLayer;

#[derive(Parser, Debug)]
#[command(about = "HTTP/1.1 + h2c reverse proxy built from proxystack layers")]
struct Args {
    /// Address to accept connections on (repeatable).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// The upstream (host:port) every request goes to.
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Option<Target>,
    /// Speak HTTP/2 (prior knowledge) to the upstream instead of HTTP/1.1.
    #[arg(long)]
    upstream_h2: bool,
    /// Zero-config run: proxy 127.0.0.1:15080 to a built-in backend.
    #[arg(long)]
    demo: bool,
    /// Seconds to wait for the upstream's response head (504 after).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    /// Seconds a client may take to send a request head (slowloris).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    header_read_timeout: u64,
    /// TLS certificate chain (PEM) for the TLS route; with `--key`.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// TLS private key (PEM) for the TLS route.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// What to do with Forwarded / X-Forwarded-* fields.
    #[arg(long, value_enum, default_value_t = Forwarding::Off)]
    forwarded: Forwarding,
    #[command(flatten)]
    common: support::Common,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum Forwarding {
    /// Pass the client's fields through untouched.
    Off,
    /// Add this hop to the client's fields (behind a trusted proxy).
    Append,
    /// Replace the client's fields (at the edge).
    Overwrite,
}

#[tokio::main]
async fn main() {
    support::init_tracing();
    let mut args = Args::parse();
    if args.demo {
        if args.listen.is_empty() {
            args.listen.push(([127, 0, 0, 1], 15080).into());
        }
        args.upstream = Some(demo_backend().await.into());
    }
    if args.listen.is_empty() {
        support::fail("no --listen address (or use --demo)");
    }
    let Some(upstream) = args.upstream.clone() else {
        support::fail("say where to forward: --upstream HOST:PORT (or use --demo)");
    };

    let mode = match args.forwarded {
        Forwarding::Off => ForwardedMode::Off,
        Forwarding::Append => ForwardedMode::Append,
        Forwarding::Overwrite => ForwardedMode::Overwrite,
    };
    let forward = Forward::new(tcp::TcpConnector::new(), move |_: &Request<Incoming>| {
        Some(upstream.clone())
    })
    .upstream_protocol(if args.upstream_h2 {
        UpstreamProtocol::Http2
    } else {
        UpstreamProtocol::Http1
    })
    .timeout(Some(Duration::from_secs(args.timeout)))
    .forwarded(mode)
    .x_forwarded(mode)
    .via(Some("proxystack"));
    let mut metrics = support::Metrics::new();
    let http_metrics = HttpMetrics::new(metrics.registry());
    let app = ServiceBuilder::new()
        .layer(HttpMetricsLayer::new(&http_metrics))
        .layer(HttpAccessLogLayer::inbound())
        .layer(TraceLayer::new_for_http())
        .service(forward);
    let http = HttpServer::new(app)
        .header_read_timeout(Some(Duration::from_secs(args.header_read_timeout)));

    let mut router = Router::new().http1(http.clone()).http2(http.clone());
    // TLS on the same port: terminate (ALPN h2 or http/1.1) and hand the plaintext to the
    // same HttpServer, which tells HTTP/1.1 from HTTP/2 by itself (and Forward reports
    // `https` in Forwarded / X-Forwarded-Proto: the connection's TLS says so).
    if let Some(cert) = tls_certificate(&args) {
        let config = ServerConfigBuilder::new()
            .default_cert(cert)
            .alpn(["h2", "http/1.1"])
            .build()
            .unwrap_or_else(|e| support::fail(format!("TLS configuration: {e}")));
        router = router.tls(
            ServiceBuilder::new()
                .layer(TerminateLayer::new(config))
                .service(http.clone()),
        );
    }
    let svc = ServiceBuilder::new()
        .layer(DetectLayer::new())
        .service(router);

    let listeners = support::bind_all(&args.listen).await;
    let mut addrs = support::local_addrs(&listeners);
    let server = Server::new().drain_timeout(Duration::from_secs(args.common.drain_secs));
    let svc = metrics.listener("http", &server, svc);
    if let Some(admin) = args.common.admin {
        addrs.push(support::admin(admin, metrics, std::sync::Arc::new(String::new)).await);
    }
    support::announce(&addrs);
    if args.demo {
        eprintln!(
            "demo: try `curl -v http://{0}/` or `curl --http2-prior-knowledge http://{0}/`",
            addrs[0]
        );
    }

    support::serve_all(listeners, server, svc).await;
}

/// The TLS certificate: from `--cert/--key`, or a demo certificate for `localhost`.
fn tls_certificate(args: &Args) -> Option<CertKey> {
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let pair = CertKey::from_pem_files(&cert.to_string_lossy(), &key.to_string_lossy());
        return Some(pair.unwrap_or_else(|e| support::fail(e)));
    }
    if !args.demo {
        return None;
    }
    let ca = proxystack::tls::demo::DemoCa::new("example.org");
    support::demo_ca_file("http-proxy", ca.root_pem());
    Some(ca.server_cert(&["localhost", "127.0.0.1"]))
}

/// A loopback HTTP/1.1 + h2c backend that describes the request it got.
async fn demo_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| support::fail(format!("demo backend: {e}")));
    let addr = listener.local_addr().unwrap_or_else(|e| support::fail(e));
    let svc = tower::service_fn(|req: Request<Incoming>| async move {
        let mut text = format!(
            "hello from the demo backend\n{} {} {:?}\n",
            req.method(),
            req.uri(),
            req.version()
        );
        for (name, value) in req.headers() {
            text.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        Ok::<_, Infallible>(Response::new(text))
    });
    let server = HttpServer::new(svc);
    let (_signal, watch) = drain::channel();
    tokio::spawn(async move {
        let _keep = _signal;
        let _ = Server::new().serve(listener, server, watch).await;
    });
    addr
}
