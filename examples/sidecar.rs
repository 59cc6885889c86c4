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
//! Our own listeners — outbound, fixed, inbound and `--admin`, whatever their ports — are
//! never a destination, on any address of this host: a redirected connection to one is
//! closed without a dial (logged as a `self call`), an HBONE tunnel to one gets 503. They
//! are known by the registry every listener is put in when bound (`support::own_listeners`),
//! before any of them accepts; HBONE to our own inbound port stays allowed (a local pod).
//!
//! **SIGHUP** re-reads `--config` (not with `--demo`): workloads, baggage, the fixed
//! destinations and the inbound allow list apply to new connections and tunnels at once; a
//! running inbound tunnel whose client the new allow list refuses is cut; listeners that
//! appear, move or disappear are opened or drained (`--outbound`/`--inbound` still win).
//! A config that does not parse or check out is refused (logged with the reason) and the
//! running one stays; so is a new `mark`, which needs a restart. `[identity]` is read once
//! and its files are watched. `/metrics`: `proxystack_config_reloads_total`,
//! `proxystack_config_reload_failures_total`.
//!
//! Without iptables there is no original destination to recover, so the demo adds three
//! listeners that *pretend* every connection was redirected from a fixed destination
//! (`[[outbound.fixed]]` below; useful in labs too). With `--outbound 127.0.0.1:0` (and
//! `--inbound 127.0.0.1:0`) every demo port is ephemeral. `listening on` lines come in this
//! order: outbound, each fixed listener, inbound, admin.
//!
//! ```toml
//! mark = 0x539                  # SO_MARK on everything we dial, so the REDIRECT rule
//!                               # (-m mark ! --mark 0x539 -j REDIRECT --to-ports 15001)
//!                               # lets our own connections pass
//! [identity]                    # this node's SPIFFE certificate, key and the mesh roots
//! cert = "node.pem"
//! key = "node.key"
//! roots = "root.pem"
//! # … or, built with feature istio-ca, from the Istio CA (renewed at half-life):
//! # ca = "istiod.istio-system.svc:15012"
//! # spiffe_id = "spiffe://cluster.local/ns/default/sa/ztunnel"
//! # token = "/var/run/secrets/tokens/istio-token"   # optional
//! # ca_server_name = "istiod.istio-system.svc"      # optional, when ca is an IP
//! [outbound]
//! listen = "127.0.0.1:15001"
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
use proxystack::admission::RecheckLayer;
use proxystack::conn::{Metadata, OriginalDst, PeerAddr};
use proxystack::connect::{lookup, TunnelInfo};
use proxystack::hbone::{self, HboneTarget, Inbound};
use proxystack::identity::{PeerIdentity, SpiffeId};
use proxystack::metrics::{ConnectionMetricsLayer, Reporter};
use proxystack::tls::{Credentials, LiveIdentity};
use proxystack::{tcp, Authority, Conn, Target};
use serde::Deserialize;
use support::{IdentityPattern, MeshConnector};
use tower::ServiceBuilder;

#[derive(Parser, Debug)]
#[command(about = "ztunnel-shaped node proxy: outbound HBONE or passthrough, inbound HBONE")]
pub struct Args {
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
struct Config {
    identity: Option<support::IdentityFiles>,
    mark: Option<u32>,
    outbound: OutboundConfig,
    inbound: InboundConfig,
    #[serde(default)]
    workload: Vec<Workload>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundConfig {
    listen: SocketAddr,
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
    run(Args::parse()).await
}

/// Everything `main` does after logging is set up: serves until SIGTERM/Ctrl-C, then drains.
/// Public for `examples/mesh.rs`, which runs several examples in one process.
///
/// With `--config`, SIGHUP re-reads the file (see [`reload`]).
pub async fn run(args: Args) {
    let (mut config, identity, _watch) = match (&args.config, args.demo) {
        (Some(path), false) => {
            let config: Config = support::load_config(path);
            let Some(files) = &config.identity else {
                support::fail(format!("{}: [identity] is missing", path.display()));
            };
            // Watched: a rotated certificate is used by new handshakes.
            let (identity, watch) = files.live().await;
            (config, identity, Some(watch))
        }
        (None, true) => demo(&args).await,
        _ => support::fail("give exactly one of --config FILE or --demo"),
    };
    let overrides = Overrides {
        outbound: args.outbound,
        inbound: args.inbound,
    };

    // Bind everything first: our own ports take part in the routing decisions below.
    let wanted = overrides.listeners(&config);
    let addrs: Vec<_> = wanted.iter().map(|(_, a)| *a).collect();
    let listeners = support::bind_all(&addrs).await;
    let own = support::local_addrs(&listeners);
    if args.demo {
        // The demo's self call goes to our outbound port, its HBONE to our inbound one.
        config.outbound.fixed[2].original_dst = own[0];
        config.workload[0].next_hop = own.last().copied();
    }
    let policy = Policy::new(&config).unwrap_or_else(|e| support::fail(e));
    let (policies, policy) = tokio::sync::watch::channel(Arc::new(policy));

    // Everything we dial carries the mark, or a REDIRECT rule would send it back to us.
    let tcp = tcp::TcpConnector::new().mark(config.mark);
    let hbone = hbone::Connector::hbone_live_with(tcp.clone(), identity.clone());
    let connector = MeshConnector {
        hbone: Some(hbone),
        tcp,
    };
    let me = identity.current().spiffe_id().cloned();
    let mut servers = support::Servers::new(&args.common);
    // Istio's metrics as the destination side: per inbound tunnel, with the client's identity.
    let istio = servers.metrics().istio(Reporter::Destination, me.as_ref());
    let tunnel_metrics = servers.metrics().tunnels("inbound_tunnels", &istio);
    support::identity_metrics(servers.metrics(), &identity);
    let relay = tcp::Relay::new(connector).upstream(outbound_route(policy.clone(), me));
    let inbound = inbound_service(config.mark, policy.clone(), identity, tunnel_metrics);
    // One place that knows which service each listener name gets: used at start and when
    // a reload opens a listener.
    let spawn = move |servers: &mut support::Servers, name: &str, at, listener| match name {
        "outbound" => servers.spawn_configured(
            name,
            Some(at),
            listener,
            ServiceBuilder::new()
                .layer(tcp::OriginalDstLayer::new())
                .service(relay.clone()),
        ),
        "inbound" => servers.spawn_configured(name, Some(at), listener, inbound.clone()),
        fixed => {
            // No REDIRECT happened, so say where the connection "was going" ourselves:
            // the current config's destination for this listener.
            let index = fixed
                .strip_prefix(FIXED)
                .and_then(|i| i.parse::<usize>().ok());
            let policy = policy.clone();
            let pretend = ServiceBuilder::new()
                .map_request(move |mut c: Conn<proxystack::BoxIo>| {
                    let dst = index.and_then(|i| policy.borrow().fixed.get(i).copied());
                    if let Some(dst) = dst {
                        c.insert(OriginalDst(dst));
                    }
                    c
                })
                .service(relay.clone());
            servers.spawn_configured(name, Some(at), listener, pretend)
        }
    };
    for ((name, at), listener) in wanted.into_iter().zip(listeners) {
        spawn(&mut servers, &name, at, listener);
    }
    if args.demo {
        let [_, mesh, outside, own_port, ..] = own[..] else {
            unreachable!()
        };
        eprintln!("demo: echo hello | nc -N {mesh}  # to a mesh workload: HBONE");
        eprintln!("demo: curl http://{outside}/     # outside the mesh: passthrough");
        eprintln!("demo: nc -v {own_port}           # to our own port: closed");
    }
    let Some(path) = args.config.clone() else {
        return servers
            .run_reloading(args.common.admin, support::reload::without_config_file)
            .await;
    };
    let (mark, identity_files) = (config.mark, config.identity.clone());
    servers
        .run_reloading(args.common.admin, move |servers| {
            let config: Config = support::reload::read_config(&path)?;
            support::reload::unchanged("mark", &mark, &config.mark)?;
            support::reload::unchanged("[identity]", &identity_files, &config.identity)?;
            let policy = Policy::new(&config)?;
            let wanted = overrides.listeners(&config);
            let opened = servers.bind_changed(&wanted)?;
            // From here on nothing can fail: new connections, tunnels and requests follow
            // the new policy, running tunnels it refuses are cut (`RecheckLayer`).
            policies.send_replace(Arc::new(policy));
            for (name, at, listener) in opened {
                spawn(servers, &name, at, listener);
            }
            servers.retain(|name| wanted.iter().any(|(n, _)| n == name));
            Ok(())
        })
        .await;
}

/// Listener name prefix of `[[outbound.fixed]]` entries, followed by their index.
const FIXED: &str = "outbound_fixed_";

/// The listener addresses given on the command line; they win over the config's, at start
/// and on every reload.
#[derive(Clone, Copy)]
struct Overrides {
    outbound: Option<SocketAddr>,
    inbound: Option<SocketAddr>,
}

impl Overrides {
    /// Every listener by name and configured address: outbound, each fixed one, inbound.
    fn listeners(&self, config: &Config) -> Vec<(String, SocketAddr)> {
        let outbound = self.outbound.unwrap_or(config.outbound.listen);
        let mut all = vec![("outbound".to_owned(), outbound)];
        let fixed = config.outbound.fixed.iter().enumerate();
        all.extend(fixed.map(|(i, f)| (format!("{FIXED}{i}"), f.listen)));
        let inbound = self.inbound.unwrap_or(config.inbound.listen);
        all.push(("inbound".to_owned(), inbound));
        all
    }
}

/// What a reload can change besides listeners: the workload table, the baggage, where fixed
/// listeners pretend to go, and who may tunnel in. (`mark` and `[identity]` are read once;
/// the identity files are watched for rotation.)
struct Policy {
    workloads: HashMap<Key, Workload>,
    baggage: Option<String>,
    fixed: Vec<SocketAddr>,
    app_ip: IpAddr,
    allow: Vec<IdentityPattern>,
}

impl Policy {
    /// Checks what parsing cannot: every HBONE workload pins an identity.
    fn new(config: &Config) -> Result<Self, String> {
        let unpinned = |w: &Workload| w.protocol == Protocol::Hbone && w.identity.is_none();
        if let Some(i) = config.workload.iter().position(unpinned) {
            return Err(format!("workload[{i}]: HBONE needs an identity to pin"));
        }
        Ok(Self {
            workloads: config
                .workload
                .iter()
                .map(|w| (w.address, w.clone()))
                .collect(),
            baggage: config.outbound.baggage.clone(),
            fixed: config
                .outbound
                .fixed
                .iter()
                .map(|f| f.original_dst)
                .collect(),
            app_ip: config.inbound.app_ip,
            allow: config.inbound.allow.clone(),
        })
    }
}

type Policies = tokio::sync::watch::Receiver<Arc<Policy>>;

/// Outbound: where each redirected connection goes (`None` closes it without a dial).
fn outbound_route(
    policy: Policies,
    me: Option<SpiffeId>,
) -> impl Fn(&Metadata) -> Option<Target> + Clone {
    let own = support::own_listeners().clone();
    move |m: &Metadata| {
        let Some(OriginalDst(dst)) = m.get::<OriginalDst>().copied() else {
            tracing::debug!("no original destination (not redirected); closing");
            return None;
        };
        // A connection to one of our own listeners (any of them, the admin endpoint too, on
        // any address of this host) would come straight back here: closed before it could
        // leave as HBONE. Plain TCP is refused again by the connector (`MeshConnector`).
        if own.contains(dst) {
            tracing::warn!(%dst, "self call; closing without dialling");
            return None;
        }
        let policy = policy.borrow().clone();
        let ip = dst.ip().to_canonical();
        let workload = policy
            .workloads
            .get(&Key(ip, Some(dst.port())))
            .or_else(|| policy.workloads.get(&Key(ip, None)));
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
                if let Some(b) = &policy.baggage {
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
/// then the local app on the port the client asked for, unless that is one of our own
/// listeners (503). A running tunnel whose client a reloaded allow list no longer admits
/// is cut.
fn inbound_service(
    mark: Option<u32>,
    policy: Policies,
    identity: LiveIdentity,
    tunnel_metrics: ConnectionMetricsLayer,
) -> impl tower::Service<
    Conn<proxystack::BoxIo>,
    Response = (),
    Error = impl Into<proxystack::BoxError>,
    Future = impl Send,
> + Clone {
    // A tunnel to one of our own listeners (whatever its port, the admin endpoint too)
    // gets 503 and dials nothing: it would loop back into this proxy.
    let tcp = tcp::TcpConnector::new()
        .mark(mark)
        .own_listeners(support::own_listeners().clone());
    let app_policy = policy.clone();
    let app = tcp::Relay::new(tcp).upstream(move |m: &Metadata| {
        let app_ip = app_policy.borrow().app_ip;
        Some(Target::from((
            app_ip,
            m.get::<TunnelInfo>()?.authority.port(),
        )))
    });
    let still_allowed = RecheckLayer::new(policy.clone(), |m: &Metadata| {
        let client = lookup::<PeerIdentity>(m).map(|p| p.0.clone());
        move |p: &Arc<Policy>| IdentityPattern::admits(&p.allow, client.as_ref())
    });
    Inbound::live(identity)
        .allow(move |req| {
            let client = lookup::<PeerIdentity>(req.connection).map(|p| &p.0);
            let ok = IdentityPattern::admits(&policy.borrow().allow, client);
            if !ok {
                let client = client.map(SpiffeId::as_str);
                tracing::info!(client, tunnel.authority = %req.authority, "denied");
            }
            ok
        })
        .service(
            ServiceBuilder::new()
                .layer(tunnel_metrics)
                .layer(still_allowed)
                .service(app),
        )
        .unwrap_or_else(|e| support::fail(format!("inbound TLS: {e}")))
}

/// The demo: an in-memory CA, an echo app that counts as a mesh workload (with our own
/// identity; its node proxy is us), an HTTP server outside the mesh, and three listeners
/// that pretend their connections were redirected (mesh, outside, our own port).
async fn demo(args: &Args) -> (Config, LiveIdentity, Option<support::IdentityGuard>) {
    let ca = proxystack::tls::demo::DemoCa::new("cluster.local");
    let echo = support::demo_echo_backend().await;
    let web = support::demo_http_backend("hello from a host outside the mesh\n").await;
    let ephemeral = args.outbound.is_some_and(|a| a.port() == 0);
    let port = |p: u16| if ephemeral { 0 } else { p };
    let me = "spiffe://cluster.local/ns/default/sa/demo";
    let config = format!(
        r#"
        [outbound]
        listen = "127.0.0.1:15001"
        baggage = "k8s.namespace.name=default,service.name=demo"
        [[outbound.fixed]]
        listen = "127.0.0.1:{}"
        original_dst = "{echo}"
        [[outbound.fixed]]
        listen = "127.0.0.1:{}"
        original_dst = "{web}"
        [[outbound.fixed]]
        listen = "127.0.0.1:{}"
        original_dst = "127.0.0.1:15001"
        [inbound]
        listen = "127.0.0.1:{}"
        app_ip = "127.0.0.1"
        allow = ["{me}"]
        [[workload]]
        address = "{echo}"
        identity = "{me}"
        protocol = "hbone"
        next_hop = "127.0.0.1:15008"
        "#,
        port(15011),
        port(15012),
        port(15013),
        port(hbone::PORT),
    );
    let config = toml::from_str(&config).unwrap_or_else(|e| support::fail(e));
    let credentials = Credentials::new(ca.workload_cert("default", "demo"), [ca.root()]);
    let identity = LiveIdentity::new(credentials).unwrap_or_else(|e| support::fail(e));
    (config, identity, None)
}
