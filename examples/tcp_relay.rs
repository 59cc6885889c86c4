//! A TCP relay: listen, pick an upstream, copy bytes both ways.
//!
//! ```text
//! cargo run --example tcp_relay -- --demo
//! cargo run --example tcp_relay -- --listen 127.0.0.1:9000 --upstream 127.0.0.1:8080
//! cargo run --example tcp_relay -- --listen 0.0.0.0:15001 --original-dst   # behind iptables REDIRECT
//! ```
//!
//! `--demo` starts a built-in echo server as the upstream; try it with
//! `echo hello | nc -N 127.0.0.1 15001`.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use proxystack::conn::Metadata;
use proxystack::conn::OriginalDst;
use proxystack::{tcp, Server, Target};
use tower::ServiceBuilder;

#[derive(Parser, Debug)]
#[command(about = "TCP relay built from proxystack layers")]
struct Args {
    /// Address to accept connections on (repeatable).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Fixed upstream (host:port).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "original_dst")]
    upstream: Option<Target>,
    /// Relay to each connection's original destination (iptables REDIRECT).
    #[arg(long)]
    original_dst: bool,
    /// Zero-config run: relay from 127.0.0.1:15001 to a built-in echo server.
    #[arg(long)]
    demo: bool,
    /// Close connections idle for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    idle_timeout: u64,
    #[command(flatten)]
    common: support::Common,
}

#[tokio::main]
async fn main() {
    support::init_tracing();
    let mut args = Args::parse();
    if args.demo {
        if args.listen.is_empty() {
            args.listen.push(([127, 0, 0, 1], 15001).into());
        }
        args.upstream = Some(support::demo_echo_backend().await.into());
    }
    if args.listen.is_empty() {
        support::fail("no --listen address (or use --demo)");
    }
    if args.upstream.is_none() && !args.original_dst {
        support::fail("say where to relay: --upstream HOST:PORT or --original-dst (or use --demo)");
    }

    let fixed = args.upstream.clone();
    let relay = tcp::Relay::new(tcp::TcpConnector::new())
        .idle_timeout(Some(Duration::from_secs(args.idle_timeout)))
        .upstream(move |conn: &Metadata| match &fixed {
            Some(target) => Some(target.clone()),
            None => conn.get::<OriginalDst>().map(Target::from),
        });
    // SO_ORIGINAL_DST is a syscall per connection: only ask when it is used.
    let svc = ServiceBuilder::new()
        .option_layer(args.original_dst.then(tcp::OriginalDstLayer::new))
        .service(relay);

    let listeners = support::bind_all(&args.listen).await;
    let mut addrs = support::local_addrs(&listeners);
    let server = Server::new().drain_timeout(Duration::from_secs(args.common.drain_secs));
    let metrics = support::Metrics::new();
    let svc = metrics.listener("relay", &server, svc);
    if let Some(admin) = args.common.admin {
        addrs.push(support::admin(admin, metrics, std::sync::Arc::new(String::new)).await);
    }
    support::announce(&addrs);
    if args.demo {
        eprintln!(
            "demo: try `echo hello | nc -N {} {}`",
            addrs[0].ip(),
            addrs[0].port()
        );
    }

    support::serve_all(listeners, server, svc).await;
}
