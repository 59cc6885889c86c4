//! One TLS listener, routed by SNI: some names pass through untouched (the backend
//! terminates TLS), others are terminated here and relayed as plaintext.
//!
//! ```text
//! cargo run --example sni_router --features tls,demo-certs -- --demo
//! cargo run --example sni_router --features tls -- --config sni_router.toml
//! ```
//!
//! Config (TOML):
//!
//! ```toml
//! listen = ["0.0.0.0:8443"]
//! [[passthrough]]
//! sni = "pass.example.com"
//! upstream = "10.0.0.1:443"
//! [[terminate]]
//! sni = "term.example.com"
//! cert = "term.pem"
//! key = "term.key"
//! upstream = "127.0.0.1:8080"
//! ```
//!
//! Composition: `PeekLayer` (records SNI, replays the hello) → `SteerLayer` on SNI →
//! either `Relay` (passthrough) or `TerminateLayer` → `Relay` (plaintext).

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use proxystack::conn::Metadata;
use proxystack::steer::SteerLayer;
use proxystack::tls::{CertKey, PeekLayer, ServerConfigBuilder, Sni, TerminateLayer, UnknownSni};
use proxystack::{tcp, Server, Target};
use serde::Deserialize;
use tower::ServiceBuilder;

#[derive(Parser, Debug)]
#[command(about = "SNI router: TLS passthrough or termination per server name")]
struct Args {
    /// Address to accept TLS on (repeatable; overrides the config's `listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// TOML config with the routes.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Zero-config run with demo certificates and built-in backends.
    #[arg(long)]
    demo: bool,
    #[command(flatten)]
    common: support::Common,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    listen: Vec<SocketAddr>,
    #[serde(default)]
    passthrough: Vec<Passthrough>,
    #[serde(default)]
    terminate: Vec<Terminate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Passthrough {
    sni: String,
    upstream: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Terminate {
    sni: String,
    cert: PathBuf,
    key: PathBuf,
    upstream: String,
}

/// Routes with certificates loaded.
struct Routes {
    passthrough: HashMap<String, Target>,
    terminate: HashMap<String, (Target, CertKey)>,
}

#[tokio::main]
async fn main() {
    support::init_tracing();
    let args = Args::parse();
    let (mut listen, routes) = match (&args.config, args.demo) {
        (Some(path), false) => load(support::load_config(path)),
        (None, true) => demo().await,
        _ => support::fail("give exactly one of --config FILE or --demo"),
    };
    if !args.listen.is_empty() {
        listen = args.listen.clone();
    }
    if listen.is_empty() {
        support::fail("no listen address: set --listen or `listen` in the config");
    }

    // The plaintext is relayed as bytes, so offer only what the backends are known to
    // speak; a backend that speaks h2 could be offered "h2" too.
    let mut tls = ServerConfigBuilder::new()
        .unknown_sni(UnknownSni::Refuse)
        .alpn(["http/1.1"]);
    for (name, (_, cert)) in &routes.terminate {
        tls = tls.cert_for(name, cert.clone());
    }
    let tls = tls
        .build()
        .unwrap_or_else(|e| support::fail(format!("TLS configuration: {e}")));

    let terminate_upstreams: Arc<HashMap<String, Target>> = Arc::new(
        routes
            .terminate
            .iter()
            .map(|(k, (t, _))| (k.clone(), t.clone()))
            .collect(),
    );
    let pass_upstreams = Arc::new(routes.passthrough);
    let terminated = ServiceBuilder::new()
        .layer(TerminateLayer::new(tls))
        .service(
            tcp::Relay::new(tcp::TcpConnector::new())
                .upstream(move |c: &Metadata| sni_lookup(c, &terminate_upstreams)),
        );
    let passthrough = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |c: &Metadata| sni_lookup(c, &pass_upstreams));
    let terminate_names: Arc<[String]> = routes.terminate.keys().cloned().collect();
    let svc = ServiceBuilder::new()
        .layer(PeekLayer::new())
        .layer(SteerLayer::when(
            move |c: &Metadata| {
                c.get::<Sni>()
                    .is_some_and(|s| terminate_names.contains(&s.0.to_ascii_lowercase()))
            },
            terminated,
        ))
        .service(passthrough);

    let listeners = support::bind_all(&listen).await;
    let mut addrs = support::local_addrs(&listeners);
    let server =
        Server::new().drain_timeout(std::time::Duration::from_secs(args.common.drain_secs));
    let metrics = support::Metrics::new();
    let svc = metrics.listener("sni_router", &server, svc);
    if let Some(admin) = args.common.admin {
        addrs.push(support::admin(admin, metrics, std::sync::Arc::new(String::new)).await);
    }
    support::announce(&addrs);
    if args.demo {
        let port = addrs[0].port();
        let ca = DEMO_CA.get().cloned().unwrap_or_default();
        for name in ["term.example.com", "pass.example.com"] {
            eprintln!(
                "demo: curl --cacert {} --resolve {name}:{port}:127.0.0.1 https://{name}:{port}/",
                ca.display()
            );
        }
    }
    support::serve_all(listeners, server, svc).await;
}

fn sni_lookup(conn: &Metadata, table: &HashMap<String, Target>) -> Option<Target> {
    table
        .get(&conn.get::<Sni>()?.0.to_ascii_lowercase())
        .cloned()
}

fn parse_target(s: &str) -> Target {
    Target::parse(s).unwrap_or_else(|e| support::fail(format!("invalid upstream {s:?}: {e}")))
}

fn load(config: Config) -> (Vec<SocketAddr>, Routes) {
    let passthrough = config
        .passthrough
        .iter()
        .map(|p| (p.sni.to_ascii_lowercase(), parse_target(&p.upstream)))
        .collect();
    let terminate = config
        .terminate
        .iter()
        .map(|t| {
            let (cert, key) = (t.cert.to_string_lossy(), t.key.to_string_lossy());
            let pair = CertKey::from_pem_files(&cert, &key).unwrap_or_else(|e| support::fail(e));
            (
                t.sni.to_ascii_lowercase(),
                (parse_target(&t.upstream), pair),
            )
        })
        .collect();
    (
        config.listen,
        Routes {
            passthrough,
            terminate,
        },
    )
}

/// Where the demo wrote its CA certificate (for the `curl` lines).
static DEMO_CA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Demo: `term.example.com` is terminated here and relayed to a plaintext HTTP backend;
/// `pass.example.com` is passed through to a backend that terminates TLS itself.
async fn demo() -> (Vec<SocketAddr>, Routes) {
    let ca = proxystack::tls::demo::DemoCa::new("example.org");
    let _ = DEMO_CA.set(support::demo_ca_file("sni-router", ca.root_pem()));
    let plain = support::demo_http_backend("terminated by sni_router, served in plaintext\n").await;
    // The passthrough backend terminates TLS itself.
    let backend_addr = support::demo_tls_backend(
        ca.server_cert(&["pass.example.com"]),
        "TLS passed through, terminated by the backend\n",
    )
    .await;

    let routes = Routes {
        passthrough: HashMap::from([("pass.example.com".to_string(), Target::from(backend_addr))]),
        terminate: HashMap::from([(
            "term.example.com".to_string(),
            (Target::from(plain), ca.server_cert(&["term.example.com"])),
        )]),
    };
    (vec![([127, 0, 0, 1], 8443).into()], routes)
}
