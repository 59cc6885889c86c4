//! A waypoint in the shape of Istio ambient's: it accepts only HBONE (port 15008), picks the
//! service by the tunnel's `:authority` (refusing anything it does not serve, so it is no
//! open relay), applies L7 rules (deny → 403) and balances per request, relays other
//! protocols as bytes where no L7 rule applies, and re-encapsulates to the service's
//! endpoints in HBONE or plain TCP. The client identity from the outer mTLS drives policy.
//!
//! What goes where, per service:
//! * `protocol = "tcp"`: never sniffed, relayed as bytes (L7 rules are a config error).
//!   This is the east-west gateway shape for double HBONE across networks: the inner,
//!   end-to-end HBONE tunnel is TLS to the waypoint, which relays it unread to the
//!   destination's HBONE port (and passes on the caller's `x-forwarded-network`);
//! * `protocol = "http"`, or any service with `[[service.rule]]`: **HTTP only**. Only
//!   well-formed HTTP/1 and HTTP/2 reach the rules; anything else is refused (`400` when it
//!   resembles HTTP, else closed) and counted in `proxystack_waypoint_refused_total`. A
//!   client gets as long to send its request as the HTTP head timeout (10 s): a slow or
//!   oddly written request is never relayed past the rules;
//! * `protocol = "auto"` (default) without rules: HTTP is served per request, TLS and every
//!   other protocol (including server-first ones) relayed as bytes, so the waypoint also
//!   works as an east-west gateway for double HBONE (TLS inside the tunnel).
//!
//! Rules match the normalized path (`/x/../admin`, `//admin` and `/%61dmin` are `/admin`)
//! by prefix, **case-sensitively** as RFC 3986 says paths are; set `ignore_case = true` on a
//! rule when the backend treats paths case-insensitively (then `/ADMIN` matches `/admin`).
//!
//! **SIGHUP** re-reads `--config` (not with `--demo`): services, endpoints, rules, allow
//! lists and `listen` apply to new tunnels and requests at once. A running tunnel is cut when
//! the new config refuses its client, drops its service, or changes how it is served (e.g.
//! rules added to a service whose tunnel was relayed as bytes would otherwise be bypassed).
//! A bad config is refused with the reason and the running one stays; `[identity]` is read
//! once (its files are watched). Reloads are counted on `/metrics`.
//!
//! ```text
//! cargo run --example waypoint --features hbone,http,demo-certs -- --demo
//! curl http://127.0.0.1:15011/          # HBONE → waypoint (reviews VIP) → HBONE → backend
//! curl http://127.0.0.1:15011/admin     # 403 from the waypoint's L7 rule
//! echo hello | nc -N 127.0.0.1 15012    # echo VIP, declared `tcp`: relayed as bytes
//! curl http://127.0.0.1:15013/          # unknown authority: tunnel refused (401), closed
//! cargo run --example waypoint --features hbone,http -- --config waypoint.toml
//! ```
//!
//! The demo ports 15011–15013 are in-process HBONE *clients* standing in for the callers'
//! node proxies (`sidecar` with a `next_hop` to the waypoint does the same). `listening
//! on` order: the waypoint, the demo clients, admin; `--listen 127.0.0.1:0` makes every demo
//! port ephemeral.
//!
//! ```toml
//! listen = "0.0.0.0:15008"
//! [identity]                       # the waypoint's SPIFFE certificate, key, mesh roots
//! cert = "waypoint.pem"
//! key = "waypoint.key"
//! roots = "root.pem"
//! [[service]]
//! addresses = ["10.96.0.10:9080", "reviews.default.svc.cluster.local:9080"]
//! protocol = "auto"                # HTTP per request, else bytes; "http": HTTP only; "tcp": bytes
//! allow = ["spiffe://cluster.local/ns/default/*"]   # L4: who may use it at all (else 401)
//! [[service.endpoint]]
//! address = "10.0.1.5:9080"
//! identity = "spiffe://cluster.local/ns/default/sa/reviews"  # HBONE to 10.0.1.5:15008
//! [[service.endpoint]]
//! address = "10.0.1.6:9080"        # no identity: plain TCP
//! [[service.rule]]                 # L7, first match wins, no match allows
//! action = "allow"
//! path_prefix = "/admin"
//! principal = "spiffe://cluster.local/ns/ops/*"
//! [[service.rule]]
//! action = "deny"                  # → 403
//! path_prefix = "/admin"
//! ignore_case = true               # optional: /ADMIN too
//! ```

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::{Request, StatusCode};
use proxystack::admission::{while_unchanged, RecheckLayer};
use proxystack::conn::Metadata;
use proxystack::connect::{lookup, TunnelInfo};
use proxystack::detect::{DetectLayer, Router, RouterLayer};
use proxystack::hbone::{self, HboneHeaders, HboneTarget, Inbound};
use proxystack::http::{Forward, HttpServer, Incoming, NormalizePathLayer, PoolKey};
use proxystack::identity::{PeerIdentity, SpiffeId};
use proxystack::metrics::{HttpAccessLogLayer, HttpMetrics, HttpMetricsLayer, Reporter};
use proxystack::steer::Steer;
use proxystack::tls::{CertKey, Credentials, LiveIdentity, RootCertStore};
use proxystack::{tcp, Authority, Target};
use serde::Deserialize;
use support::{IdentityPattern, MeshConnector};
use tower::{ServiceBuilder, ServiceExt};

#[derive(Parser, Debug)]
#[command(about = "Istio-shaped waypoint: HBONE in, L7 policy, HBONE or TCP to endpoints")]
pub struct Args {
    /// TOML config (see the example's docs).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Zero-config run on loopback with demo certificates, backends and HBONE clients.
    #[arg(long)]
    demo: bool,
    /// HBONE listener; overrides the config.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    common: support::Common,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    listen: SocketAddr,
    identity: Option<support::IdentityFiles>,
    service: Vec<Service>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    #[serde(deserialize_with = "support::parse_all")]
    addresses: Vec<Authority>,
    #[serde(default)]
    protocol: AppProtocol,
    #[serde(default, deserialize_with = "support::parse_all")]
    allow: Vec<IdentityPattern>,
    endpoint: Vec<Endpoint>,
    #[serde(default)]
    rule: Vec<Rule>,
    #[serde(skip)]
    next: AtomicUsize,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum AppProtocol {
    #[default]
    Auto,
    Http,
    Tcp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Endpoint {
    address: SocketAddr,
    #[serde(default, deserialize_with = "support::parse_opt")]
    identity: Option<SpiffeId>,
    next_hop: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    action: Action,
    path_prefix: Option<String>,
    #[serde(default)]
    ignore_case: bool,
    #[serde(default, deserialize_with = "support::parse_opt")]
    principal: Option<IdentityPattern>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Action {
    Allow,
    Deny,
}

/// The services by every address they answer to, and who we are.
struct Table {
    by_authority: HashMap<String, Arc<Service>>,
    me: Option<SpiffeId>,
}

impl Table {
    /// Checks what parsing cannot: every service has an endpoint, and rules only where
    /// HTTP is parsed.
    fn new(services: Vec<Service>, me: Option<SpiffeId>) -> Result<Self, String> {
        let mut by_authority = HashMap::new();
        for s in services {
            if s.endpoint.is_empty() {
                return Err(format!("service {:?} has no endpoint", s.addresses));
            }
            if s.protocol == AppProtocol::Tcp && !s.rule.is_empty() {
                return Err(format!(
                    "service {:?}: L7 rules need protocol \"http\" or \"auto\", not \"tcp\"",
                    s.addresses
                ));
            }
            let s = Arc::new(s);
            for a in &s.addresses {
                by_authority.insert(a.to_string().to_ascii_lowercase(), s.clone());
            }
        }
        Ok(Self { by_authority, me })
    }

    /// The service a tunnel (or a request inside it) is for.
    fn service(&self, m: &Metadata) -> Option<&Arc<Service>> {
        self.by_name(&m.get::<TunnelInfo>()?.authority)
    }

    fn by_name(&self, authority: &Authority) -> Option<&Arc<Service>> {
        let authority = authority.to_string();
        self.by_authority.get(&authority.to_ascii_lowercase())
    }

    /// Whether `client` may open a tunnel to `authority`, and how it would be served.
    fn admits(&self, authority: &Authority, client: Option<&SpiffeId>) -> Option<Serving> {
        let service = self.by_name(authority)?;
        IdentityPattern::admits(&service.allow, client).then(|| service.serving())
    }

    /// The next endpoint of `s` (round robin): HBONE with its identity pinned, or TCP.
    fn endpoint(&self, s: &Service, m: &Metadata) -> Target {
        let ep = &s.endpoint[s.next.fetch_add(1, Ordering::Relaxed) % s.endpoint.len()];
        let Some(id) = &ep.identity else {
            return Target::from(ep.address);
        };
        let next_hop = ep
            .next_hop
            .unwrap_or(SocketAddr::new(ep.address.ip(), hbone::PORT));
        let mut t = HboneTarget::new(next_hop, Authority::from(ep.address), [id.clone()]);
        if let Some(me) = &self.me {
            t = t.source_identity(me.clone());
        }
        // Pass on what the caller's node proxy said: the original client, the service host,
        // baggage, the trace context (one trace across the hop) and the network.
        if let Some(h) = m.get::<HboneHeaders>() {
            t = t.continue_from(h);
        }
        // HTTP connections to two endpoints behind one next hop must not be shared.
        t.into_target().with(PoolKey(ep.address.to_string().into()))
    }
}

impl Service {
    /// Whether only HTTP may pass: declared so, or L7 rules that a byte relay would skip.
    fn http_only(&self) -> bool {
        self.protocol == AppProtocol::Http || !self.rule.is_empty()
    }

    /// How a tunnel to this service is served, chosen when it starts.
    fn serving(&self) -> Serving {
        match self.protocol {
            AppProtocol::Tcp => Serving::Bytes,
            _ if self.http_only() => Serving::HttpOnly,
            _ => Serving::Auto,
        }
    }
}

/// How a tunnel is served: a reload that changes it for a running tunnel (e.g. rules added
/// to a service whose tunnels were relayed as bytes) cuts the tunnel, so that nothing
/// keeps bypassing the new rules.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Serving {
    Bytes,
    HttpOnly,
    Auto,
}

impl Rule {
    fn matches(&self, path: &str, client: Option<&SpiffeId>) -> bool {
        self.path_prefix.as_ref().is_none_or(|p| {
            let head = path.get(..p.len());
            if self.ignore_case {
                head.is_some_and(|h| h.eq_ignore_ascii_case(p))
            } else {
                head == Some(p.as_str())
            }
        }) && self
            .principal
            .as_ref()
            .is_none_or(|p| client.is_some_and(|c| p.matches(c)))
    }
}

#[tokio::main]
async fn main() {
    support::init_tracing();
    run(Args::parse()).await
}

/// Everything `main` does after logging is set up: serves until SIGTERM/Ctrl-C, then drains.
/// Public for `examples/mesh.rs`, which runs several examples in one process.
pub async fn run(args: Args) {
    let (config, identity, _watch, demo_clients) = match (&args.config, args.demo) {
        (Some(path), false) => {
            let config: Config = support::load_config(path);
            let Some(files) = &config.identity else {
                support::fail(format!("{}: [identity] is missing", path.display()));
            };
            // Watched: a rotated certificate is used by new handshakes.
            let (identity, watch) = files.live().await;
            (config, identity, Some(watch), None)
        }
        (None, true) => {
            let (config, identity, clients) = demo::config().await;
            (config, identity, None, clients)
        }
        _ => support::fail("give exactly one of --config FILE or --demo"),
    };
    let listen = args.listen.unwrap_or(config.listen);
    let me = identity.current().spiffe_id().cloned();
    let identity_files = config.identity.clone();
    let table = Table::new(config.service, me.clone()).unwrap_or_else(|e| support::fail(e));
    // Routes and rules read the table in force per tunnel and per request; a reload sends
    // a new one.
    let (tables, table) = tokio::sync::watch::channel(Arc::new(table));
    let current = move || table.borrow().clone();
    let mut servers = support::Servers::new(&args.common);
    // Istio's metrics as a waypoint: per tunnel (TCP) and per request (HTTP).
    let istio = servers.metrics().istio(Reporter::Waypoint, me.as_ref());
    let tunnel_metrics = servers.metrics().tunnels("waypoint_tunnels", &istio);
    let http_metrics = HttpMetrics::new(servers.metrics().registry());
    let connector = MeshConnector {
        hbone: Some(hbone::Connector::hbone_live(identity.clone())),
        tcp: tcp::TcpConnector::new().connect_timeout(Duration::from_secs(5)),
    };

    // Bytes: one endpoint per connection.
    let tb = current.clone();
    let l4 = tcp::Relay::new(connector.clone()).upstream(move |m: &Metadata| {
        let t = tb();
        Some(t.endpoint(t.service(m)?, m))
    });

    // HTTP: rules first (the client identity is the outer mTLS peer), then one endpoint
    // per request.
    let tb = current.clone();
    let forward = Forward::new(connector, move |req: &Request<Incoming>| {
        let t = tb();
        Some(t.endpoint(t.service(req.extensions())?, req.extensions()))
    });
    let tb = current.clone();
    let l7 = tower::service_fn(move |req: Request<Incoming>| {
        let (forward, t) = (forward.clone(), tb());
        async move {
            let client = lookup::<PeerIdentity>(req.extensions()).map(|p| &p.0);
            let rules = t.service(req.extensions()).map_or(&[][..], |s| &s.rule[..]);
            let hit = rules.iter().find(|r| r.matches(req.uri().path(), client));
            if hit.is_some_and(|r| r.action == Action::Deny) {
                let (path, client) = (req.uri().path(), client.map(SpiffeId::as_str));
                tracing::info!(path, client, "denied by L7 rule");
                return Ok(proxystack::http::plain_response(
                    StatusCode::FORBIDDEN,
                    "denied by waypoint policy\n",
                ));
            }
            forward.oneshot(req).await
        }
    });
    // Rules match, and the backend receives, the normalized path: `/x/../admin`, `//admin`
    // and `/%61dmin` are all `/admin` (encoded separators are refused with 400).
    let head_timeout = Duration::from_secs(10);
    let http = HttpServer::new(
        ServiceBuilder::new()
            .layer(HttpMetricsLayer::new(&http_metrics).istio(&istio))
            .layer(HttpAccessLogLayer::inbound())
            .layer(NormalizePathLayer)
            .service(l7),
    )
    .header_read_timeout(Some(head_timeout));
    // HTTP only (rules, or declared): nothing but well-formed HTTP reaches the rules, and
    // nothing else is relayed past them. A client gets as long as the HTTP head timeout.
    let strict = Router::new().http1(http.clone()).http2(http.clone());
    let refused = strict.stats();
    let http_only = ServiceBuilder::new()
        .layer(DetectLayer::new().timeout(Some(head_timeout)))
        .service(strict);
    // No rules: HTTP per request, everything else (TLS, server-first, odd) as bytes. Sniff
    // with a short timeout: a server-first protocol pays it once per connection.
    let auto = ServiceBuilder::new()
        .layer(DetectLayer::new().timeout(Some(Duration::from_millis(500))))
        .layer(RouterLayer::new(
            // TLS and opaque streams fall through to `l4`; undecided ones only by name.
            Router::new()
                .http1(http.clone())
                .http2(http)
                .undecided(l4.clone()),
        ))
        .service(l4.clone());
    let (t, t2) = (current.clone(), current.clone());
    let serving = move |t: &Table, m: &Metadata| t.service(m).map(|s| s.serving());
    let per_tunnel = Steer::by(
        move |m: &Metadata| serving(&t(), m) == Some(Serving::Bytes),
        l4,
        Steer::by(
            move |m: &Metadata| serving(&t2(), m) == Some(Serving::HttpOnly),
            http_only,
            auto,
        ),
    );
    // A running tunnel is cut when a reload refuses its client, removes its service, or
    // changes how it is served.
    let still_allowed = RecheckLayer::new(tables.subscribe(), |m: &Metadata| {
        let authority = m.get::<TunnelInfo>().map(|t| t.authority.clone());
        let client = lookup::<PeerIdentity>(m).map(|p| p.0.clone());
        // Admitted, and served as when the tunnel started.
        while_unchanged(move |t: &Arc<Table>| t.admits(authority.as_ref()?, client.as_ref()))
    });

    // HBONE in: the authority must name a served service and the client pass its `allow`
    // (else 401, nothing dialled). Many addresses are served, so no local-IP check.
    let tb = current.clone();
    support::identity_metrics(servers.metrics(), &identity);
    let inbound = Inbound::live(identity)
        .check_local_ip(false)
        .allow(move |req| {
            let client = lookup::<PeerIdentity>(req.connection).map(|p| &p.0);
            let ok = tb().admits(req.authority, client).is_some();
            if !ok {
                let client = client.map(SpiffeId::as_str);
                tracing::info!(tunnel.authority = %req.authority, client, "tunnel refused");
            }
            ok
        })
        .service(
            ServiceBuilder::new()
                .layer(tunnel_metrics)
                .layer(still_allowed)
                .service(per_tunnel),
        )
        .unwrap_or_else(|e| support::fail(format!("inbound TLS: {e}")));

    servers.metrics().counter_fn(
        "proxystack_waypoint_refused",
        "Connections to HTTP-only services refused as not HTTP.",
        move || refused.refused.load(std::sync::atomic::Ordering::Relaxed),
    );
    let listener = support::bind_all(&[listen]).await.remove(0);
    let waypoint = listener.local_addr().unwrap_or(listen);
    servers.spawn_configured(WAYPOINT, Some(listen), listener, inbound.clone());
    if let Some(clients) = demo_clients {
        demo::clients(&mut servers, waypoint, clients, listen.port() == 0).await;
    }
    let Some(path) = args.config.clone() else {
        return servers
            .run_reloading(args.common.admin, support::reload::without_config_file)
            .await;
    };
    // SIGHUP: services, rules, allow lists and the listen address from the file again
    // (`[identity]` is read once; its files are watched).
    let listen_override = args.listen;
    servers
        .run_reloading(args.common.admin, move |servers| {
            let config: Config = support::reload::read_config(&path)?;
            support::reload::unchanged("[identity]", &identity_files, &config.identity)?;
            let table = Table::new(config.service, me.clone())?;
            let listen = listen_override.unwrap_or(config.listen);
            let opened = servers.bind_changed(&[(WAYPOINT.to_owned(), listen)])?;
            tables.send_replace(Arc::new(table));
            for (name, at, listener) in opened {
                servers.spawn_configured(&name, Some(at), listener, inbound.clone());
            }
            Ok(())
        })
        .await;
}

/// The waypoint's listener name (in metrics).
const WAYPOINT: &str = "waypoint";

mod demo {
    use super::*;

    /// What the demo clients need: the CA-issued client identity and the waypoint's.
    pub struct Clients {
        cert: CertKey,
        roots: Arc<RootCertStore>,
        waypoint_id: SpiffeId,
    }

    /// Two services on made-up VIPs: `reviews` (HTTP, behind an HBONE endpoint, `/admin`
    /// denied) and `echo` (declared TCP, plain TCP endpoint).
    pub async fn config() -> (Config, LiveIdentity, Option<Clients>) {
        let ca = proxystack::tls::demo::DemoCa::new("cluster.local");
        let web = support::demo_http_backend("hello from reviews, through the waypoint\n").await;
        let echo = support::demo_echo_backend().await;
        let pod = support::demo_hbone_endpoint(&ca, "default", "reviews").await;
        let config = format!(
            r#"
            listen = "127.0.0.1:15008"
            [[service]]
            addresses = ["10.96.0.10:9080", "reviews.default.svc.cluster.local:9080"]
            [[service.endpoint]]
            address = "{web}"
            identity = "spiffe://cluster.local/ns/default/sa/reviews"
            next_hop = "{pod}"
            [[service.rule]]
            action = "deny"
            path_prefix = "/admin"
            [[service]]
            addresses = ["10.96.0.11:7"]
            protocol = "tcp"
            [[service.endpoint]]
            address = "{echo}"
            "#
        );
        let config = toml::from_str(&config).unwrap_or_else(|e| support::fail(e));
        let clients = Clients {
            cert: ca.workload_cert("default", "productpage"),
            roots: ca.roots(),
            waypoint_id: SpiffeId::istio("cluster.local", "default", "waypoint")
                .unwrap_or_else(|e| support::fail(e)),
        };
        let credentials = Credentials::new(ca.workload_cert("default", "waypoint"), [ca.root()]);
        let identity = LiveIdentity::new(credentials).unwrap_or_else(|e| support::fail(e));
        (config, identity, Some(clients))
    }

    /// Plain TCP in, HBONE to the waypoint out, one port per `:authority`: what the
    /// callers' node proxies would do.
    pub async fn clients(
        servers: &mut support::Servers,
        waypoint: SocketAddr,
        c: Clients,
        ephemeral: bool,
    ) {
        let connector = hbone::Connector::hbone(c.cert, c.roots)
            .unwrap_or_else(|e| support::fail(format!("demo client TLS: {e}")));
        for (port, authority) in [
            (15011, "10.96.0.10:9080"),
            (15012, "10.96.0.11:7"),
            (15013, "10.96.0.99:80"),
        ] {
            let authority = Authority::parse(authority).unwrap_or_else(|e| support::fail(e));
            let id = c.waypoint_id.clone();
            let relay = tcp::Relay::new(connector.clone()).upstream(move |m: &Metadata| {
                let mut t = HboneTarget::new(waypoint, authority.clone(), [id.clone()])
                    .baggage("k8s.namespace.name=default,service.name=productpage");
                if let Some(p) = m.get::<proxystack::conn::PeerAddr>() {
                    t = t.forwarded_for(p.0);
                }
                Some(t.into_target())
            });
            let addr: SocketAddr = ([127, 0, 0, 1], if ephemeral { 0 } else { port }).into();
            let listener = support::bind_all(&[addr]).await.remove(0);
            servers.spawn(&format!("demo_client_{port}"), listener, relay);
        }
        let p = |i: usize| servers.addrs()[i].port();
        eprintln!("demo: curl http://127.0.0.1:{}/  (and /admin → 403)", p(1));
        eprintln!("demo: echo hello | nc -N 127.0.0.1 {}", p(2));
        eprintln!(
            "demo: curl http://127.0.0.1:{}/  (unknown authority: refused)",
            p(3)
        );
    }
}
