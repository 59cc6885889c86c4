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
//! **SIGHUP** re-reads `--config`: a section that appears, moves or disappears opens or
//! drains its listener; a changed `app_ip`, or a changed `peer`/`authority`/`identity`, cuts
//! the running tunnels made under the old values and applies to new ones. A bad config is
//! refused with the reason and the running one stays. `[identity]` is read once (its files
//! are watched).
//!
//! Config (TOML; either section may be left out):
//!
//! ```toml
//! [identity]
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
use std::sync::Arc;

use clap::Parser;
use proxystack::admission::{while_unchanged, RecheckLayer};
use proxystack::conn::{Metadata, PeerAddr};
use proxystack::connect::TunnelInfo;
use proxystack::hbone::{self, HboneTarget, Inbound};
use proxystack::identity::SpiffeId;
use proxystack::metrics::{ConnectionMetricsLayer, Reporter};
use proxystack::tls::{Credentials, LiveIdentity};
use proxystack::{tcp, Authority, BoxIo, Conn, Target};
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

/// Everything both sides need, resolved: what a reload can change.
struct Plan {
    server: Option<ServerPlan>,
    client: Option<ClientPlan>,
}

#[derive(Clone, PartialEq)]
struct ServerPlan {
    listen: SocketAddr,
    app_ip: IpAddr,
}

#[derive(Clone, PartialEq)]
struct ClientPlan {
    listen: SocketAddr,
    peer: SocketAddr,
    authority: Authority,
    identity: SpiffeId,
}

impl Plan {
    /// Checks what parsing cannot: the client's authority and pinned identity, and that
    /// there is something to serve.
    fn new(config: &Config) -> Result<Self, String> {
        let client = match &config.client {
            None => None,
            Some(c) => Some(ClientPlan {
                listen: c.listen,
                peer: c.peer,
                authority: Authority::parse(&c.authority)
                    .map_err(|e| format!("client.authority {:?}: {e}", c.authority))?,
                identity: SpiffeId::parse(&c.identity)
                    .map_err(|e| format!("client.identity {:?}: {e}", c.identity))?,
            }),
        };
        let server = config.server.as_ref().map(|s| ServerPlan {
            listen: s.listen,
            app_ip: s.app_ip,
        });
        if server.is_none() && client.is_none() {
            return Err("the config has neither [server] nor [client]".into());
        }
        Ok(Self { server, client })
    }

    /// The listeners by name and configured address: server side, client side.
    fn listeners(&self) -> Vec<(String, SocketAddr)> {
        let server = self.server.as_ref().map(|s| (SERVER.to_owned(), s.listen));
        let client = self.client.as_ref().map(|c| (CLIENT.to_owned(), c.listen));
        server.into_iter().chain(client).collect()
    }
}

/// An identity from `[identity]`: what keeps it current, and the section (a reload may not
/// change it).
type FromFiles = (support::IdentityGuard, support::IdentityFiles);

/// Listener names (in metrics).
const SERVER: &str = "hbone_server";
const CLIENT: &str = "hbone_client";

type Plans = tokio::sync::watch::Receiver<Arc<Plan>>;

#[tokio::main]
async fn main() {
    support::init_tracing();
    let args = Args::parse();
    // Kept for the process's life: the watch (or CA renewal) and the section it came from.
    let (plan, identity, client_identity, from_files) = match (&args.config, args.demo) {
        (Some(path), false) => {
            let config: Config = support::load_config(path);
            let plan = Plan::new(&config).unwrap_or_else(|e| support::fail(e));
            // Watched: a rotated certificate is used by new handshakes on both sides.
            let (identity, watch) = config.identity.live().await;
            (
                plan,
                identity.clone(),
                identity,
                Some((watch, config.identity)),
            )
        }
        (None, true) => demo().await,
        _ => support::fail("give exactly one of --config FILE or --demo"),
    };
    let wanted = plan.listeners();
    let (plans, plan) = tokio::sync::watch::channel(Arc::new(plan));
    let mut servers = support::Servers::new(&args.common);
    support::identity_metrics(servers.metrics(), &identity);
    // Istio's metrics as the destination side, per tunnel, with the client's identity.
    let me = identity.current().spiffe_id().cloned();
    let istio = servers.metrics().istio(Reporter::Destination, me.as_ref());
    let tunnel_metrics = servers.metrics().tunnels("hbone_tunnels", &istio);
    let inbound = server_side(plan.clone(), identity.clone(), tunnel_metrics);
    let outbound = client_side(plan, client_identity);
    let spawn = move |servers: &mut support::Servers, name: &str, at, listener| {
        if name == SERVER {
            servers.spawn_configured(name, Some(at), listener, inbound.clone());
        } else {
            servers.spawn_configured(name, Some(at), listener, outbound.clone());
        }
    };
    let addrs: Vec<_> = wanted.iter().map(|(_, at)| *at).collect();
    let listeners = support::bind_all(&addrs).await;
    for ((name, at), listener) in wanted.into_iter().zip(listeners) {
        spawn(&mut servers, &name, at, listener);
    }
    if args.demo {
        if let Some(client) = servers.addrs().get(1) {
            let (ip, port) = (client.ip(), client.port());
            eprintln!("demo: try `echo hello | nc -N {ip} {port}`");
        }
    }
    // Binds the admin endpoint (registered as ours too) before any listener accepts.
    let Some(path) = args.config.clone() else {
        return servers
            .run_reloading(args.common.admin, support::reload::without_config_file)
            .await;
    };
    // SIGHUP: both sides from the file again (`[identity]` is read once; its files are
    // watched). Tunnels whose side changed (another app IP; another peer, authority or
    // pinned identity) are cut; listeners follow the sections.
    servers
        .run_reloading(args.common.admin, move |servers| {
            let config: Config = support::reload::read_config(&path)?;
            let at_start = from_files.as_ref().map(|(_, files)| files);
            support::reload::unchanged("[identity]", &at_start, &Some(&config.identity))?;
            let plan = Plan::new(&config)?;
            let wanted = plan.listeners();
            let opened = servers.bind_changed(&wanted)?;
            plans.send_replace(Arc::new(plan));
            for (name, at, listener) in opened {
                spawn(servers, &name, at, listener);
            }
            servers.retain(|name| wanted.iter().any(|(n, _)| n == name));
            Ok(())
        })
        .await;
}

/// A running tunnel's verdict on each new plan.
type StillAllowed = Box<dyn FnMut(&Arc<Plan>) -> bool + Send>;

/// Cuts a running tunnel once a reload changes the part of the plan it was made with
/// (`part` gives it; `None`: that side is gone).
fn cut_when_changed<T: PartialEq + Send + 'static>(
    plans: Plans,
    part: fn(&Plan) -> Option<T>,
) -> RecheckLayer<Arc<Plan>, impl Fn(&Metadata) -> StillAllowed + Clone> {
    RecheckLayer::new(plans, move |_: &Metadata| {
        Box::new(while_unchanged(move |plan: &Arc<Plan>| part(plan))) as StillAllowed
    })
}

/// The server side: HBONE in, tunnels to the local app on the requested port; the peer
/// never picks the IP, and never one of our own ports (this listener, the client side's,
/// the admin endpoint): those get 503, nothing is dialled.
fn server_side(
    plans: Plans,
    identity: LiveIdentity,
    tunnel_metrics: ConnectionMetricsLayer,
) -> impl tower::Service<
    Conn<BoxIo>,
    Response = (),
    Error = impl Into<proxystack::BoxError>,
    Future = impl Send,
> + Clone {
    let connector = tcp::TcpConnector::new().own_listeners(support::own_listeners().clone());
    let plan = plans.clone();
    let app = tcp::Relay::new(connector).upstream(move |c: &Metadata| {
        let app_ip = plan.borrow().server.as_ref()?.app_ip;
        Some(Target::from((
            app_ip,
            c.get::<TunnelInfo>()?.authority.port(),
        )))
    });
    let hbone_in = Inbound::live(identity)
        .check_local_ip(false)
        .into_layer()
        .unwrap_or_else(|e| support::fail(format!("server TLS: {e}")));
    let app_ip = |p: &Plan| p.server.as_ref().map(|s| s.app_ip);
    ServiceBuilder::new()
        .layer(hbone_in)
        .layer(tunnel_metrics)
        .layer(cut_when_changed(plans, app_ip))
        .service(app)
}

/// The client side: every accepted connection leaves as an HBONE tunnel to the peer. The
/// peer may well be our own server side (the demo): HBONE to it is no loop.
fn client_side(
    plans: Plans,
    identity: LiveIdentity,
) -> impl tower::Service<
    Conn<BoxIo>,
    Response = (),
    Error = impl Into<proxystack::BoxError>,
    Future = impl Send,
> + Clone {
    let source = identity.current().spiffe_id().cloned();
    let connector = hbone::Connector::hbone_live(identity);
    let plan = plans.clone();
    let relay = tcp::Relay::new(connector).upstream(move |c: &Metadata| {
        let client = plan.borrow().client.clone()?;
        let mut target = HboneTarget::new(client.peer, client.authority, [client.identity]);
        if let Some(src) = &source {
            target = target.source_identity(src.clone());
        }
        if let Some(client) = c.get::<PeerAddr>() {
            target = target.forwarded_for(client.0);
        }
        Some(target.into_target())
    });
    let route = |p: &Plan| {
        let c = p.client.as_ref()?;
        Some((c.peer, c.authority.clone(), c.identity.clone()))
    };
    ServiceBuilder::new()
        .layer(cut_when_changed(plans, route))
        .service(relay)
}

/// Both sides on loopback with demo certificates: client 127.0.0.1:15001 → server
/// 127.0.0.1:15008 → echo app.
async fn demo() -> (Plan, LiveIdentity, LiveIdentity, Option<FromFiles>) {
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
    let plan = Plan {
        server: Some(ServerPlan {
            listen: server_addr,
            app_ip: app.ip(),
        }),
        client: Some(ClientPlan {
            listen: ([127, 0, 0, 1], 15001).into(),
            peer: server_addr,
            authority: Authority::from(SocketAddr::new(server_addr.ip(), app.port())),
            identity: server_id,
        }),
    };
    (plan, live("server"), live("client"), None)
}
