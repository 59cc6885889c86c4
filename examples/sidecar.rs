//! A node proxy in the shape of Istio ambient's ztunnel: apps' outbound TCP (redirected to
//! port 15001) leaves as HBONE when the destination is in the mesh, as plain TCP when it is
//! not; HBONE arriving on 15008 is let in to the local app if the client identity is allowed.
//! The Kubernetes inputs (pods, services, policies) are a static config file.
//!
//! ```text
//! cargo run --example sidecar --features hbone,demo-certs -- --demo
//! echo hello | nc -N 127.0.0.1 15011   # "to a mesh workload": HBONE to our own 15008, echo app
//! curl http://127.0.0.1:15012/         # "to a host outside the mesh": plain TCP passthrough
//! nc -v 127.0.0.1 15013                # "to our own port 15001": a self call, closed at once
//! cargo run --example sidecar --features hbone -- --config sidecar.toml
//! ```
//!
//! Without iptables there is no original destination to recover, so the demo adds three
//! listeners that *pretend* every connection was redirected from a fixed destination
//! (`[[outbound.fixed]]` below; useful in labs too). With `--outbound 127.0.0.1:0` (and
//! `--inbound 127.0.0.1:0`) every demo port is ephemeral. `listening on` lines come in this
//! order: outbound, each fixed listener, inbound, admin.
//!
//! ```toml
//! [identity]                    # this node's SPIFFE certificate, key and the mesh roots
//! cert = "node.pem"
//! key = "node.key"
//! roots = "root.pem"
//! [outbound]
//! listen = "127.0.0.1:15001"    # iptables: -p tcp -j REDIRECT --to-ports 15001
//! mark = 0x539                  # SO_MARK on passthrough dials, so the rules can skip them
//! baggage = "k8s.namespace.name=default,service.name=productpage"
//! [[outbound.fixed]]            # optional: pretend-redirected listeners
//! listen = "127.0.0.1:15011"
//! original_dst = "10.0.0.2:9080"
//! [inbound]
//! listen = "0.0.0.0:15008"
//! app_ip = "127.0.0.1"          # tunnels reach this IP; only the port comes from :authority
//! allow = ["spiffe://cluster.local/ns/default/sa/productpage", "spiffe://cluster.local/ns/ops/*"]
//! [[workload]]                  # destinations in the mesh (IP, or IP:port for one port)
//! address = "10.0.0.2"
//! identity = "spiffe://cluster.local/ns/default/sa/reviews"   # SAN the peer must present
//! protocol = "hbone"            # or "tcp": known, but reached in plain TCP
//! # next_hop = "10.0.0.9:15008" # a waypoint in front of a service VIP (default: IP:15008)
//! ```

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use proxystack::conn::{Metadata, OriginalDst, PeerAddr};
use proxystack::connect::{lookup, TunnelInfo};
use proxystack::hbone::{self, HboneTarget, Inbound};
use proxystack::identity::{PeerIdentity, SpiffeId};
use proxystack::tls::{rustls::RootCertStore, CertKey};
use proxystack::{tcp, Authority, Target};
use serde::Deserialize;
use support::{IdentityPattern, MeshConnector};
use tower::ServiceBuilder;

#[derive(Parser, Debug)]
#[command(about = "ztunnel-shaped node proxy: outbound HBONE or passthrough, inbound HBONE")]
struct Args {
    /// TOML config (see the example's docs).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Zero-config run on loopback: demo certificates, echo and HTTP apps, pretend ports.
    #[arg(long)]
    demo: bool,
    /// Outbound (redirected) listener; overrides the config.
    #[arg(long, value_name = "ADDR")]
    outbound: Option<SocketAddr>,
    /// Inbound HBONE listener; overrides the config.
    #[arg(long, value_name = "ADDR")]
    inbound: Option<SocketAddr>,
    #[command(flatten)]
    common: support::Common,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    identity: support::IdentityFiles,
    outbound: OutboundConfig,
    inbound: InboundConfig,
    #[serde(default)]
    workload: Vec<Workload>,
}

/// The config with the certificates loaded (or made up, in the demo).
struct Config {
    cert: CertKey,
    roots: Arc<RootCertStore>,
    outbound: OutboundConfig,
    inbound: InboundConfig,
    workload: Vec<Workload>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundConfig {
    listen: SocketAddr,
    mark: Option<u32>,
    baggage: Option<String>,
    #[serde(default)]
    fixed: Vec<Fixed>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Fixed {
    listen: SocketAddr,
    original_dst: SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundConfig {
    listen: SocketAddr,
    app_ip: IpAddr,
    #[serde(default, deserialize_with = "support::parse_all")]
    allow: Vec<IdentityPattern>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    Hbone,
    Tcp,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Workload {
    #[serde(deserialize_with = "support::parse")]
    address: Key,
    #[serde(default, deserialize_with = "support::parse_opt")]
    identity: Option<SpiffeId>,
    protocol: Protocol,
    next_hop: Option<SocketAddr>,
}

/// A workload table key: an IP (every port) or an IP:port.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key(IpAddr, Option<u16>);

impl std::str::FromStr for Key {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match (s.parse::<SocketAddr>(), s.parse::<IpAddr>()) {
            (Ok(a), _) => Ok(Key(a.ip(), Some(a.port()))),
            (_, Ok(ip)) => Ok(Key(ip, None)),
            _ => Err("expected IP or IP:port".into()),
        }
    }
}

#[tokio::main]
async fn main() {
    support::init_tracing();
    let args = Args::parse();
    let mut config = match (&args.config, args.demo) {
        (Some(path), false) => {
            let file: File = support::load_config(path);
            let (cert, roots) = file.identity.load();
            Config {
                cert,
                roots,
                outbound: file.outbound,
                inbound: file.inbound,
                workload: file.workload,
            }
        }
        (None, true) => demo_config(&args).await,
        _ => support::fail("give exactly one of --config FILE or --demo"),
    };
    config.outbound.listen = args.outbound.unwrap_or(config.outbound.listen);
    config.inbound.listen = args.inbound.unwrap_or(config.inbound.listen);

    // Bind everything first: our own ports take part in the routing decisions below.
    let mut addrs = vec![config.outbound.listen];
    addrs.extend(config.outbound.fixed.iter().map(|f| f.listen));
    addrs.push(config.inbound.listen);
    let mut listeners = support::bind_all(&addrs).await;
    let own = support::local_addrs(&listeners);
    if args.demo {
        demo_fixup(&mut config, &own);
    }
    let inbound = listeners
        .pop()
        .unwrap_or_else(|| support::fail("no inbound listener"));
    let outbound = listeners.remove(0);

    let mut servers = support::Servers::new(&args.common);
    let connector = MeshConnector {
        hbone: Some(
            hbone::Connector::hbone(config.cert.clone(), config.roots.clone())
                .unwrap_or_else(|e| support::fail(format!("HBONE client TLS: {e}"))),
        ),
        tcp: tcp::TcpConnector::new().mark(config.outbound.mark),
    };
    let relay = tcp::Relay::new(connector).upstream(outbound_route(&config, own.clone()));
    servers.spawn(
        "outbound",
        outbound,
        ServiceBuilder::new()
            .layer(tcp::OriginalDstLayer::new())
            .service(relay.clone()),
    );
    for (i, (listener, f)) in listeners
        .into_iter()
        .zip(config.outbound.fixed.clone())
        .enumerate()
    {
        // No REDIRECT happened, so say where the connection "was going" ourselves.
        let pretend = ServiceBuilder::new()
            .map_request(move |mut c: proxystack::Conn<tokio::net::TcpStream>| {
                c.insert(OriginalDst(f.original_dst));
                c
            })
            .service(relay.clone());
        servers.spawn(&format!("outbound_fixed_{i}"), listener, pretend);
    }
    servers.spawn("inbound", inbound, inbound_service(&config, &own));
    if args.demo {
        let p = |i: usize| own[i].port();
        eprintln!(
            "demo: echo hello | nc -N 127.0.0.1 {}   # mesh workload: HBONE",
            p(1)
        );
        eprintln!(
            "demo: curl http://127.0.0.1:{}/         # outside the mesh: passthrough",
            p(2)
        );
        eprintln!(
            "demo: nc -v 127.0.0.1 {}                # self call: closed",
            p(3)
        );
    }
    servers.run(args.common.admin).await;
}

/// Outbound: where each redirected connection goes (`None` closes it without a dial).
fn outbound_route(
    config: &Config,
    own: Vec<SocketAddr>,
) -> impl Fn(&Metadata) -> Option<Target> + Clone {
    let table: Arc<HashMap<Key, Workload>> = Arc::new(
        config
            .workload
            .iter()
            .map(|w| (w.address, w.clone()))
            .collect(),
    );
    let me = config.cert.spiffe_ids().into_iter().next();
    let baggage = config.outbound.baggage.clone();
    move |m: &Metadata| {
        let Some(OriginalDst(dst)) = m.get::<OriginalDst>().copied() else {
            tracing::debug!("no original destination (not redirected); closing");
            return None;
        };
        // A connection to one of our own ports on loopback would come straight back here.
        let ip = dst.ip().to_canonical();
        if own.iter().any(|o| o.port() == dst.port())
            && (ip.is_loopback() || ip.is_unspecified() || own.iter().any(|o| o.ip() == ip))
        {
            tracing::warn!(%dst, "self call; closing without dialling");
            return None;
        }
        let workload = table
            .get(&Key(ip, Some(dst.port())))
            .or_else(|| table.get(&Key(ip, None)));
        match workload {
            Some(w) if w.protocol == Protocol::Hbone => {
                let next_hop = w.next_hop.unwrap_or(SocketAddr::new(ip, hbone::PORT));
                let mut t = HboneTarget::new(next_hop, Authority::from(dst), w.identity.clone());
                if let Some(id) = &me {
                    t = t.source_identity(id.clone());
                }
                if let Some(PeerAddr(client)) = m.get::<PeerAddr>() {
                    t = t.forwarded_for(*client);
                }
                if let Some(b) = &baggage {
                    t = t.baggage(b.clone());
                }
                tracing::debug!(%dst, %next_hop, "mesh destination: HBONE");
                Some(t.into_target())
            }
            _ => {
                tracing::debug!(%dst, "not in the mesh: passthrough");
                Some(Target::from(dst))
            }
        }
    }
}

/// Inbound: mTLS + CONNECT (hbone::Inbound), an allow rule on the client identity (401),
/// then the local app on the port the client asked for.
fn inbound_service(
    config: &Config,
    own: &[SocketAddr],
) -> impl tower::Service<
    proxystack::Conn<tokio::net::TcpStream>,
    Response = (),
    Error = impl Into<proxystack::BoxError>,
    Future = impl Send,
> + Clone {
    let app_ip = config.inbound.app_ip;
    let app = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |m: &Metadata| {
        Some(Target::from((
            app_ip,
            m.get::<TunnelInfo>()?.authority.port(),
        )))
    });
    let allow = config.inbound.allow.clone();
    let mut illegal = hbone::ILLEGAL_PORTS.to_vec();
    illegal.extend(own.iter().map(|a| a.port()));
    Inbound::new(config.cert.clone(), config.roots.clone())
        .illegal_ports(illegal)
        .allow(move |req| {
            let client = lookup::<PeerIdentity>(req.connection);
            let ok = allow.is_empty() || client.is_some_and(|c| allow.iter().any(|p| p.matches(&c.0)));
            if !ok {
                tracing::info!(client = ?client.map(|c| c.0.as_str()), tunnel.authority = %req.authority, "denied");
            }
            ok
        })
        .service(app)
        .unwrap_or_else(|e| support::fail(format!("inbound TLS: {e}")))
}

/// The demo: an in-memory CA, loopback apps, and three pretend-redirected listeners.
/// Destinations that depend on bound ports are filled in by [`demo_fixup`].
async fn demo_config(args: &Args) -> Config {
    let ca = proxystack::tls::demo::DemoCa::new("cluster.local");
    let echo = support::demo_echo_backend().await;
    let web = support::demo_http_backend("hello from a host outside the mesh\n").await;
    let me =
        SpiffeId::istio("cluster.local", "default", "demo").unwrap_or_else(|e| support::fail(e));
    let ephemeral = args.outbound.is_some_and(|a| a.port() == 0);
    let port = |p: u16| if ephemeral { 0 } else { p };
    let fixed = |p: u16, dst: SocketAddr| Fixed {
        listen: ([127, 0, 0, 1], port(p)).into(),
        original_dst: dst,
    };
    Config {
        cert: ca.workload_cert("default", "demo"),
        roots: ca.roots(),
        outbound: OutboundConfig {
            listen: ([127, 0, 0, 1], 15001).into(),
            mark: None,
            baggage: Some("k8s.namespace.name=default,service.name=demo".into()),
            fixed: vec![
                fixed(15011, echo),
                fixed(15012, web),
                fixed(15013, ([127, 0, 0, 1], 15001).into()), // set to our own port below
            ],
        },
        inbound: InboundConfig {
            listen: ([127, 0, 0, 1], port(hbone::PORT)).into(),
            app_ip: [127, 0, 0, 1].into(),
            allow: vec![me
                .as_str()
                .parse()
                .unwrap_or_else(|e: String| support::fail(e))],
        },
        // The echo app is "a mesh workload" with our own identity; its HBONE next hop is
        // our own inbound listener (set below).
        workload: vec![Workload {
            address: Key(echo.ip(), Some(echo.port())),
            identity: Some(me),
            protocol: Protocol::Hbone,
            next_hop: None,
        }],
    }
}

/// Points the demo at the ports actually bound: `own` is outbound, fixed…, inbound.
fn demo_fixup(config: &mut Config, own: &[SocketAddr]) {
    if let (Some(first), Some(last)) = (own.first(), own.last()) {
        config.outbound.fixed[2].original_dst = *first;
        config.workload[0].next_hop = Some(*last);
    }
}
