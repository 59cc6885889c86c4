//! HBONE, both ends: a client side that tunnels plain TCP connections over mutual TLS +
//! HTTP/2 CONNECT, and a server side (port 15008) that terminates them to a local app.
//!
//! ```text
//! cargo run --example hbone --features hbone,demo-certs -- --demo
//! echo hello | nc -N 127.0.0.1 15001        # client side → HBONE → server side → echo app
//! cargo run --example hbone --features hbone,demo-certs -- --config hbone.toml
//! ```
//!
//! The server side refuses tunnels to the process's own ports — its HBONE listener, the
//! client side's listener, the `--admin` endpoint, whatever their numbers, on every address
//! of the host — with 503 before dialling anything (`TcpConnector::own_listeners`), as well
//! as ztunnel's fixed ports (15001, 15006, 15008, 15080). `listening on` lines come in
//! this order: server side, client side, admin.
//!
//! Config (TOML; either section may be left out):
//!
//! ```toml
//! [identity]              # or ca + spiffe_id: the Istio CA (see sidecar.rs)
//! cert = "workload.pem"     # SPIFFE certificate chain (spiffe://td/ns/NS/sa/SA)
//! key = "workload.key"
//! roots = "root.pem"
//! [server]
//! listen = "0.0.0.0:15008"
//! app_ip = "127.0.0.1"      # tunnels go here; only the port comes from :authority
//! [client]
//! listen = "127.0.0.1:15001"
//! peer = "10.0.0.2:15008"   # the HBONE next hop
//! authority = "10.0.0.2:8080"
//! identity = "spiffe://cluster.local/ns/default/sa/server"
//! ```

#[path = "support/mod.rs"]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use proxystack::conn::Metadata;
use proxystack::conn::PeerAddr;
use proxystack::connect::TunnelInfo;
use proxystack::hbone::{self, HboneTarget, Inbound};
use proxystack::identity::SpiffeId;
use proxystack::metrics::Reporter;
use proxystack::tls::{Credentials, LiveIdentity};
use proxystack::{tcp, Authority, Target};
use serde::Deserialize;
use tower::ServiceBuilder;

#[derive(Parser, Debug)]
#[command(about = "HBONE client and server sides built from proxystack layers")]
struct Args {
    /// TOML config (see the example's docs).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Zero-config run: both sides, demo certificates, a built-in echo app.
    #[arg(long)]
    demo: bool,
    #[command(flatten)]
    common: support::Common,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    identity: support::IdentityFiles,
    server: Option<ServerSide>,
    client: Option<ClientSide>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSide {
    listen: SocketAddr,
    app_ip: IpAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientSide {
    listen: SocketAddr,
    peer: SocketAddr,
    authority: String,
    identity: String,
}

/// Everything both sides need, resolved.
struct Plan {
    server: Option<(SocketAddr, IpAddr, LiveIdentity)>,
    client: Option<(SocketAddr, SocketAddr, Authority, SpiffeId, LiveIdentity)>,
    /// Keeps the `[identity]` files watched while the proxy runs.
    _watch: Option<support::IdentityGuard>,
}

#[tokio::main]
async fn main() {
    support::init_tracing();
    let args = Args::parse();
    let plan = match (&args.config, args.demo) {
        (Some(path), false) => from_config(support::load_config(path)).await,
        (None, true) => demo().await,
        _ => support::fail("give exactly one of --config FILE or --demo"),
    };
    let mut servers = support::Servers::new(&args.common);

    if let Some((listen, app_ip, cert)) = plan.server {
        // Istio's metrics as the destination side, per tunnel, with the client's identity.
        let me = cert.current().spiffe_id().cloned();
        let istio = servers.metrics().istio(Reporter::Destination, me.as_ref());
        let tunnel_metrics = servers.metrics().tunnels("hbone_tunnels", &istio);
        // Tunnels reach the local app on the requested port; the peer never picks the IP,
        // and never one of our own ports (this listener, the client side's, the admin
        // endpoint): those get 503, nothing is dialled.
        let connector = tcp::TcpConnector::new().own_listeners(support::own_listeners().clone());
        let app = tcp::Relay::new(connector).upstream(move |c: &Metadata| {
            Some(Target::from((
                app_ip,
                c.get::<TunnelInfo>()?.authority.port(),
            )))
        });
        let hbone_in = Inbound::live(cert)
            .check_local_ip(false)
            .into_layer()
            .unwrap_or_else(|e| support::fail(format!("server TLS: {e}")));
        let inbound = ServiceBuilder::new()
            .layer(hbone_in)
            .layer(tunnel_metrics)
            .service(app);
        let listener = support::bind_all(&[listen]).await.remove(0);
        servers.spawn("hbone_server", listener, inbound);
    }
    let mut client_addr = None;
    if let Some((listen, peer, authority, identity, cert)) = plan.client {
        let source = cert.current().spiffe_id().cloned();
        // The peer may well be our own server side (the demo): HBONE to it is no loop.
        let connector = hbone::Connector::hbone_live(cert);
        let relay = tcp::Relay::new(connector).upstream(move |c: &Metadata| {
            let mut target = HboneTarget::new(peer, authority.clone(), [identity.clone()]);
            if let Some(src) = &source {
                target = target.source_identity(src.clone());
            }
            if let Some(client) = c.get::<PeerAddr>() {
                target = target.forwarded_for(client.0);
            }
            Some(target.into_target())
        });
        let listener = support::bind_all(&[listen]).await.remove(0);
        client_addr = listener.local_addr().ok();
        servers.spawn("hbone_client", listener, relay);
    }
    if servers.addrs().is_empty() {
        support::fail("the config has neither [server] nor [client]");
    }
    if let (true, Some(client)) = (args.demo, client_addr) {
        let (ip, port) = (client.ip(), client.port());
        eprintln!("demo: try `echo hello | nc -N {ip} {port}`");
    }
    // Binds the admin endpoint (registered as ours too) before any listener accepts.
    servers.run(args.common.admin).await;
}

async fn from_config(config: Config) -> Plan {
    // Watched: a rotated certificate is used by new handshakes on both sides.
    let (cert, watch) = config.identity.live().await;
    let client = config.client.map(|c| {
        let authority = Authority::parse(&c.authority)
            .unwrap_or_else(|e| support::fail(format!("client.authority {:?}: {e}", c.authority)));
        let identity = SpiffeId::parse(&c.identity)
            .unwrap_or_else(|e| support::fail(format!("client.identity {:?}: {e}", c.identity)));
        (c.listen, c.peer, authority, identity, cert.clone())
    });
    Plan {
        server: config.server.map(|s| (s.listen, s.app_ip, cert.clone())),
        client,
        _watch: Some(watch),
    }
}

/// Both sides on loopback with demo certificates: client 127.0.0.1:15001 → server
/// 127.0.0.1:15008 → echo app.
async fn demo() -> Plan {
    let ca = proxystack::tls::demo::DemoCa::new("cluster.local");
    let app = support::demo_echo_backend().await;
    let server_id =
        SpiffeId::istio("cluster.local", "default", "server").unwrap_or_else(|e| support::fail(e));
    let server_addr: SocketAddr = ([127, 0, 0, 1], hbone::PORT).into();
    let live = |sa: &str| {
        LiveIdentity::new(Credentials::new(
            ca.workload_cert("default", sa),
            [ca.root()],
        ))
        .unwrap_or_else(|e| support::fail(e))
    };
    Plan {
        server: Some((server_addr, app.ip(), live("server"))),
        client: Some((
            ([127, 0, 0, 1], 15001).into(),
            server_addr,
            Authority::from(SocketAddr::new(server_addr.ip(), app.port())),
            server_id,
            live("client"),
        )),
        _watch: None,
    }
}
