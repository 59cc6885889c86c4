//! A forward (egress) proxy: HTTP/1.1 and HTTP/2 (h2c) CONNECT, with an address policy
//! that by default refuses what a forward proxy must never reach: loopback, link-local
//! and cloud metadata addresses (169.254.169.254), unspecified and multicast addresses,
//! this host's own interface addresses (on every port: a service bound to `0.0.0.0` or
//! `[::]` answers on them) — also when a host name resolves to them — and, on any
//! address, the proxy's own listeners, `--admin` included.
//!
//! ```text
//! cargo run --example connect_proxy --all-features -- --demo
//! curl -p -x http://127.0.0.1:3128 http://example.com/     # any allowed destination
//! cargo run --example connect_proxy --all-features -- --listen 0.0.0.0:3128 \
//!     --allow-net 10.0.0.0/8 --allow-port 443
//! ```
//!
//! `--allow-net CIDR` (repeatable) makes networks reachable that the default policy denies
//! (a lab on loopback, an internal range, one of this host's addresses); `--deny-net CIDR`
//! adds to the denied ones. Denied destinations get `403`.
//!
//! `--allow-port PORT` (repeatable) restricts the destination ports, as squid restricts
//! CONNECT to its `SSL_ports` (443): other ports get `403` before anything is resolved.
//! Without it every port is allowed, so that existing setups keep working and the demo's
//! origin (on an ephemeral port) is reachable; a proxy for HTTPS egress should say
//! `--allow-port 443` (a startup log line reminds of it).
//!
//! The proxy's own listeners (`--listen`, `--admin`, whatever their ports) are never a
//! destination on any address of this host, even inside an `--allow-net` range: a tunnel
//! to them would loop back into the proxy or expose `/metrics`, and gets `503`
//! (`TcpConnector::own_listeners`; every listener is registered as it is bound, before
//! any accepts).

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::StatusCode;
use proxystack::addr::Cidr;
use proxystack::conn::Metadata;
use proxystack::connect::{ConnectTerminateLayer, Decision, TunnelInfo};
use proxystack::tcp::HostAddresses;
use proxystack::{tcp, Server, Target};
use tower::Layer;

#[derive(Parser, Debug)]
#[command(about = "Egress CONNECT proxy (HTTP/1.1 and h2c) with an SSRF-safe address policy")]
struct Args {
    /// Address to accept proxy clients on (repeatable).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Allow destinations in this network even if the default policy denies them.
    #[arg(long, value_name = "CIDR")]
    allow_net: Vec<Cidr>,
    /// Also deny destinations in this network.
    #[arg(long, value_name = "CIDR")]
    deny_net: Vec<Cidr>,
    /// Allow only these destination ports (repeatable; default: every port).
    #[arg(long, value_name = "PORT")]
    allow_port: Vec<u16>,
    /// Zero-config run on 127.0.0.1:3128 with a demo HTTP origin on loopback (allowed).
    #[arg(long)]
    demo: bool,
    #[command(flatten)]
    common: support::Common,
}

/// The destination policy, applied to resolved addresses right before dialling.
struct Policy {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    /// This host's addresses: the loopback and interface addresses it answers on.
    host: HostAddresses,
}

impl Policy {
    fn permits(&self, dst: SocketAddr) -> bool {
        let ip = dst.ip().to_canonical();
        if self.allow.iter().any(|n| n.contains(ip)) {
            return true;
        }
        if self.deny.iter().any(|n| n.contains(ip)) {
            return false;
        }
        // `host` covers loopback and unspecified too: every way of reaching this host.
        !(self.host.contains(ip) || ip.is_multicast() || is_link_local(ip))
    }
}

fn is_link_local(ip: std::net::IpAddr) -> bool {
    match ip {
        // 169.254.0.0/16 holds the cloud metadata service (169.254.169.254).
        std::net::IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[tokio::main]
async fn main() {
    support::init_tracing();
    let mut args = Args::parse();
    if args.demo {
        if args.listen.is_empty() {
            args.listen.push(([127, 0, 0, 1], 3128).into());
        }
        let origin = support::demo_http_backend("hello through the CONNECT proxy\n").await;
        args.allow_net.push(Cidr::host(origin.ip()));
        eprintln!(
            "demo: curl -p -x http://{} http://{origin}/",
            args.listen[0]
        );
    }
    if args.listen.is_empty() {
        support::fail("no --listen address (or use --demo)");
    }
    if args.allow_port.is_empty() {
        tracing::info!("CONNECT is allowed to every port; restrict it with --allow-port 443");
    }
    // Registered as our own as they are bound; the admin endpoint joins below, before
    // anything is accepted.
    let listeners = support::bind_all(&args.listen).await;
    let own = support::own_listeners().clone();
    let policy = Arc::new(Policy {
        allow: args.allow_net.clone(),
        deny: args.deny_net.clone(),
        host: own.host_addresses().clone(),
    });

    let connector = tcp::TcpConnector::new()
        .connect_timeout(Duration::from_secs(10))
        .allow_addresses(move |dst| policy.permits(dst))
        .own_listeners(own);
    // Denied destinations fail in the connector, so the client gets 403 (503 for our own
    // listeners) and nothing is dialled; names are resolved once and the checked address
    // is the one dialled.
    let relay = tcp::Relay::new(connector)
        .upstream(|m: &Metadata| Some(Target::from(m.get::<TunnelInfo>()?.authority.clone())));
    let ports = args.allow_port.clone();
    let proxy = ConnectTerminateLayer::new()
        .max_depth(1)
        .policy(move |req| {
            let port = req.authority.port();
            if ports.is_empty() || ports.contains(&port) {
                Decision::Allow
            } else {
                tracing::info!(tunnel.authority = %req.authority, "destination port not allowed");
                Decision::Deny(StatusCode::FORBIDDEN)
            }
        })
        .layer(relay);

    let mut addrs = support::local_addrs(&listeners);
    let server = Server::new().drain_timeout(Duration::from_secs(args.common.drain_secs));
    let metrics = support::Metrics::new();
    let proxy = metrics.listener("connect_proxy", &server, proxy);
    if let Some(admin) = args.common.admin {
        addrs.push(support::admin(admin, metrics, std::sync::Arc::new(String::new)).await);
    }
    support::announce(&addrs);
    support::serve_all(listeners, server, proxy).await;
}
