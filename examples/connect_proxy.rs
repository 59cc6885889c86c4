//! A forward (egress) proxy: HTTP/1.1 and HTTP/2 (h2c) CONNECT, with an address policy
//! that by default refuses what a forward proxy must never reach: loopback, link-local
//! and cloud metadata addresses (169.254.169.254), unspecified and multicast addresses,
//! and the proxy's own ports — also when a host name resolves to them.
//!
//! ```text
//! cargo run --example connect_proxy --all-features -- --demo
//! curl -p -x http://127.0.0.1:3128 http://example.com/     # any allowed destination
//! cargo run --example connect_proxy --all-features -- --listen 0.0.0.0:3128 --allow-net 10.0.0.0/8
//! ```
//!
//! `--allow-net CIDR` (repeatable) makes networks reachable that the default policy denies
//! (a lab on loopback, an internal range); `--deny-net CIDR` adds to the denied ones.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use proxystack::addr::Cidr;
use proxystack::conn::Metadata;
use proxystack::connect::{ConnectTerminate, TunnelInfo};
use proxystack::{tcp, Server, Target};

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
    own: Vec<SocketAddr>,
}

impl Policy {
    fn permits(&self, dst: SocketAddr) -> bool {
        let ip = dst.ip().to_canonical();
        // Our own listeners are never a destination: a tunnel to ourselves is a loop.
        let own = self.own.iter().any(|l| {
            l.port() == dst.port() && (l.ip().is_unspecified() || l.ip().to_canonical() == ip)
        });
        if own {
            return false;
        }
        if self.allow.iter().any(|n| n.contains(ip)) {
            return true;
        }
        if self.deny.iter().any(|n| n.contains(ip)) {
            return false;
        }
        !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || is_link_local(ip))
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
    let listeners = support::bind_all(&args.listen).await;
    let own = support::local_addrs(&listeners);
    let policy = Arc::new(Policy {
        allow: args.allow_net.clone(),
        deny: args.deny_net.clone(),
        own: own.clone(),
    });

    let connector = tcp::TcpConnector::new()
        .connect_timeout(Duration::from_secs(10))
        .allow_addresses(move |dst| policy.permits(dst));
    // Denied destinations fail in the connector, so the client gets 403 and nothing is
    // dialled; names are resolved once and the checked address is the one dialled.
    let relay = tcp::Relay::new(connector)
        .upstream(|m: &Metadata| Some(Target::from(m.get::<TunnelInfo>()?.authority.clone())));
    let proxy = ConnectTerminate::new(relay).max_depth(1);

    let mut addrs = own;
    let server = Server::new().drain_timeout(Duration::from_secs(args.common.drain_secs));
    if let Some(admin) = args.common.admin {
        addrs.push(support::admin(admin, vec![("connect_proxy".into(), server.stats())]).await);
    }
    support::announce(&addrs);
    support::serve_all(listeners, server, proxy).await;
}
