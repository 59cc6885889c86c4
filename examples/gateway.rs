//! An ingress gateway: TLS terminated with the certificate the client's SNI names (ALPN h2
//! and http/1.1), HTTP routed on Host + path prefix (404 when nothing matches, 421 when the
//! Host is not the name the TLS connection was made for), edge hardening (the client's
//! `Forwarded` / `X-Forwarded-*` / `X-Real-IP` / `X-Original-*` are dropped and this hop's
//! written, never trusted), an optional TLS passthrough listener routed by SNI, an optional
//! PROXY protocol requirement per listener (only from the load balancers' networks), and
//! backends in plain TCP or HBONE, each with a response timeout (504).
//!
//! * Misdirected requests: on a TLS listener, `Host`/`:authority` must be the SNI (when
//!   the client sent one) and a name of the certificate the connection presented (the
//!   `names` of its `[[tls.cert]]`), else `421` (HTTP/2 connection reuse, clients that
//!   ignore the certificate). A ClientHello without SNI is refused at the handshake with
//!   `unknown_sni = "refuse"`; with `"default"` it gets the first certificate and may only
//!   ask for that certificate's names.
//! * The scheme reported upstream (`X-Forwarded-Proto`, `Forwarded: proto=`) is the
//!   listener's: `https` on a TLS listener, `http` otherwise, whatever the request line
//!   says.
//! * An HTTP/1.0 request without `Host` matches only a `host = "*"` route.
//!
//! ```text
//! cargo run --example gateway --features hbone,http,proxy-protocol,demo-certs -- --demo
//! curl --cacert $CA --resolve app.example.com:8443:127.0.0.1 https://app.example.com:8443/
//! curl --cacert $CA --resolve app.example.com:8443:127.0.0.1 https://app.example.com:8443/mesh
//! curl -H 'Host: nope.example.com' http://127.0.0.1:8080/       # 404
//! curl --cacert $CA --resolve pass.example.com:9443:127.0.0.1 https://pass.example.com:9443/
//! cargo run --example gateway --features hbone,http,proxy-protocol -- --config gateway.toml
//! ```
//!
//! **SIGHUP** re-reads `--config` (not with `--demo`): routes, certificates
//! (`[[tls.cert]]`, `[tls]`), passthrough SNIs and each listener's `tls` mode and
//! `proxy_protocol` apply to the next connection or request; requests in flight finish; a
//! passthrough connection whose SNI is now routed elsewhere, or nowhere, is cut; listeners
//! that appear, move or disappear are opened or drained (`--listen` still replaces their
//! addresses, and must then name as many). A bad config (a file that does not parse, a
//! certificate that does not load, a route that does not check out) is refused with the
//! reason and the running one stays. `[identity]` is read once (its files are watched).
//!
//! The demo prints `$CA` (its CA certificate, written to a temporary file). `listening on`
//! order: the config's listeners in order (demo: https 8443, http 8080, passthrough 9443),
//! then admin; `--listen ADDR`, repeated, replaces their addresses in that order.
//!
//! ```toml
//! [[listener]]
//! listen = "0.0.0.0:443"
//! tls = "terminate"                # "terminate", "passthrough" (by SNI) or "none" (HTTP)
//! proxy_protocol = ["10.0.0.0/24"] # optional: a PROXY header is required, from these only
//! [tls]
//! unknown_sni = "refuse"           # or "default": the first certificate
//! [[tls.cert]]
//! names = ["app.example.com"]
//! cert = "app.pem"
//! key = "app.key"
//! [[route]]                        # most specific host, then longest path prefix, wins
//! host = "app.example.com"         # exact, "*.example.com", or "*"
//! path_prefix = "/api"             # on segment boundaries: /api, /api/x, not /apix
//! backend = "10.0.0.5:8080"
//! timeout_secs = 30                # until the response head (connecting included); 504
//! identity = "spiffe://cluster.local/ns/default/sa/api"  # optional: HBONE, SAN pinned
//! # next_hop = "10.0.0.5:15008"    # HBONE next hop (default: backend IP, port 15008)
//! [[passthrough]]
//! sni = "db.example.com"
//! backend = "10.0.0.7:5432"
//! [identity]                       # the gateway's mesh identity, for HBONE backends
//! cert = "gateway.pem"
//! key = "gateway.key"
//! roots = "root.pem"
//! ```

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::{Request, StatusCode};
use prometheus_client::metrics::{family::Family, gauge::Gauge};
use proxystack::addr::{Cidr, Host};
use proxystack::admission::{while_unchanged, RecheckLayer};
use proxystack::conn::Metadata;
use proxystack::hbone::{self, HboneTarget};
use proxystack::http::{
    Forward, ForwardedMode, HttpServer, Incoming, NormalizePathLayer, PoolKey, UpstreamTimeout,
};
use proxystack::identity::SpiffeId;
use proxystack::metrics::{HttpAccessLogLayer, HttpMetrics, HttpMetricsLayer};
use proxystack::proxy_protocol::ProxyProtocolLayer;
use proxystack::tls::{
    CertKey, Credentials, LiveIdentity, PeekLayer, ServerConfigBuilder, Sni, TerminateLayer,
    TlsInfo, UnknownSni,
};
use proxystack::{tcp, Authority, BoxIo, Conn, Target};
use serde::Deserialize;
use support::MeshConnector;
use tower::{ServiceBuilder, ServiceExt};

#[derive(Parser, Debug)]
#[command(about = "Ingress gateway: TLS by SNI, Host/path routing, edge hardening, HBONE backends")]
pub struct Args {
    /// TOML config (see the example's docs).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Zero-config run on loopback with demo certificates and backends.
    #[arg(long)]
    demo: bool,
    /// Replaces the listeners' addresses, in config order (repeatable).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    #[command(flatten)]
    common: support::Common,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    listener: Vec<Listener>,
    #[serde(default)]
    tls: TlsFiles,
    #[serde(default)]
    route: Vec<Route>,
    #[serde(default)]
    passthrough: Vec<Passthrough>,
    identity: Option<support::IdentityFiles>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Listener {
    listen: SocketAddr,
    tls: Mode,
    #[serde(default, deserialize_with = "support::parse_all")]
    proxy_protocol: Vec<Cidr>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Terminate,
    Passthrough,
    None,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TlsFiles {
    #[serde(default)]
    unknown_sni: Unknown,
    #[serde(default)]
    cert: Vec<CertFiles>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Unknown {
    #[default]
    Refuse,
    Default,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertFiles {
    names: Vec<String>,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Route {
    host: String,
    #[serde(default = "slash")]
    path_prefix: String,
    #[serde(deserialize_with = "support::parse")]
    backend: Authority,
    #[serde(default, deserialize_with = "support::parse_opt")]
    identity: Option<SpiffeId>,
    next_hop: Option<SocketAddr>,
    /// Seconds until the backend's response head, as `http_proxy --timeout`.
    #[serde(default = "default_timeout_secs")]
    timeout_secs: u64,
}

fn slash() -> String {
    "/".into()
}

/// The same default as `http_proxy --timeout`.
fn default_timeout_secs() -> u64 {
    30
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Passthrough {
    sni: String,
    #[serde(deserialize_with = "support::parse")]
    backend: Target,
}

/// Certificates by server name, loaded (or made up by the demo).
type Certs = Vec<(Vec<String>, CertKey)>;
/// The gateway's mesh identity and roots, for HBONE backends, and the watch on their files.
type Mesh = Option<(LiveIdentity, Option<support::IdentityGuard>)>;

impl Route {
    /// How well this route matches, or `None`: (host specificity, prefix length).
    fn score(&self, host: &str, path: &str) -> Option<(u8, usize)> {
        let pattern = self.host.to_ascii_lowercase();
        let rank = match pattern.strip_prefix('*') {
            None if pattern == host => 2,
            Some(suffix) if suffix.starts_with('.') && host.ends_with(suffix) => 1,
            Some("") => 0,
            _ => return None,
        };
        let p = self.path_prefix.as_str();
        let rest = path.strip_prefix(p)?;
        (rest.is_empty() || p.ends_with('/') || rest.starts_with('/')).then_some((rank, p.len()))
    }

    /// Plain TCP, or HBONE with the backend's identity pinned and ours presented; with the
    /// route's response timeout.
    fn target(&self, me: Option<&SpiffeId>) -> Option<Target> {
        let timeout = UpstreamTimeout(Some(Duration::from_secs(self.timeout_secs)));
        let Some(id) = &self.identity else {
            return Some(Target::from(self.backend.clone()).with(timeout));
        };
        let default_hop = || Some(SocketAddr::new(self.backend.canonical_ip()?, hbone::PORT));
        let next_hop = self.next_hop.or_else(default_hop)?;
        let mut t = HboneTarget::new(next_hop, self.backend.clone(), [id.clone()]);
        if let Some(me) = me {
            t = t.source_identity(me.clone());
        }
        // Requests to two backends behind one next hop must not share a connection.
        Some(
            t.into_target()
                .with(PoolKey(self.backend.to_string().into()))
                .with(timeout),
        )
    }
}

/// The names each certificate is served for, to tell which certificate a TLS connection
/// presented: the one configured for its SNI (exact, then `*.` one label up, as
/// `ServerConfigBuilder` resolves it), else the default (the first).
struct CertNames {
    /// Lower-case name → index into `names`; a later `[[tls.cert]]` wins, as in the config.
    by_name: HashMap<String, usize>,
    names: Vec<Vec<String>>,
}

impl CertNames {
    fn new(certs: &Certs) -> Self {
        let names: Vec<Vec<String>> = (certs.iter())
            .map(|(names, _)| names.iter().map(|n| n.to_ascii_lowercase()).collect())
            .collect();
        let by_name = (names.iter().enumerate())
            .flat_map(|(i, names)| names.iter().map(move |n| (n.clone(), i)))
            .collect();
        Self { by_name, names }
    }

    /// The names of the certificate served to a client that sent `sni` (lower case).
    fn presented(&self, sni: Option<&str>) -> &[String] {
        let wildcard = |sni: &str| {
            let (_, parent) = sni.split_once('.')?;
            self.by_name.get(&format!("*.{parent}"))
        };
        let i = sni.and_then(|sni| self.by_name.get(sni).or_else(|| wildcard(sni)));
        self.names
            .get(i.copied().unwrap_or(0))
            .map_or(&[], Vec::as_slice)
    }
}

/// Whether `host` is one of `names` (`*.example.com` covers exactly one label).
fn covers(names: &[String], host: &str) -> bool {
    names.iter().any(|name| match name.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => name == host,
    })
}

/// A request on a TLS connection for a host the connection was not made for: another name
/// than the SNI (HTTP/2 connection reuse), or a name the certificate served does not carry
/// (a client that sent no SNI, or with `unknown_sni = "default"` an unknown one, and
/// ignored the certificate). A request without any authority on TLS is misdirected too.
/// Cleartext requests never are.
fn misdirected(req: &Request<Incoming>, certs: &CertNames) -> bool {
    if req.extensions().get::<TlsInfo>().is_none() {
        return false;
    }
    let sni = (req.extensions().get::<Sni>()).map(|s| s.0.to_ascii_lowercase());
    let Some(host) = request_host(req) else {
        return true;
    };
    sni.as_ref().is_some_and(|sni| *sni != host) || !covers(certs.presented(sni.as_deref()), &host)
}

/// The host a request is for (`:authority` or `Host`), lower case, without the port.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => req
            .headers()
            .get(http::header::HOST)?
            .to_str()
            .ok()?
            .parse()
            .ok()?,
    };
    Some(
        authority
            .host()
            .trim_matches(['[', ']'])
            .to_ascii_lowercase(),
    )
}

#[tokio::main]
async fn main() {
    support::init_tracing();
    run(Args::parse()).await
}

/// Everything `main` does after logging is set up: serves until SIGTERM/Ctrl-C, then drains.
/// Public for `examples/mesh.rs`, which runs several examples in one process.
///
/// With `--config`, SIGHUP re-reads the file (see the module docs).
pub async fn run(args: Args) {
    let (config, certs, mesh) = match (&args.config, args.demo) {
        (Some(path), false) => {
            let config: Config = support::load_config(path);
            let mesh = mesh_identity(&config).await;
            let certs = load_certs(&config).unwrap_or_else(|e| support::fail(e));
            (config, certs, mesh)
        }
        (None, true) => demo().await,
        _ => support::fail("give exactly one of --config FILE or --demo"),
    };
    // Outbound: plain TCP, or HBONE with the gateway's identity for mesh backends.
    // The watch (if any) lives as long as `run`: rotated files reach new HBONE connections.
    let (mesh, _watch) = mesh.map_or((None, None), |(id, w)| (Some(id), w));
    let has_mesh = mesh.is_some();
    let identity_files = config.identity.clone();
    let mut servers = support::Servers::new(&args.common);
    let expiry = CertExpiry::register(servers.metrics().registry());
    expiry.set(&certs);
    let plan =
        Plan::new(config, certs, &args.listen, has_mesh).unwrap_or_else(|e| support::fail(e));
    let wanted = plan.listener_names();
    let (plans, current) = tokio::sync::watch::channel(Arc::new(plan));
    let me = mesh.as_ref().and_then(|c| c.current().spiffe_id().cloned());
    if let Some(identity) = &mesh {
        support::identity_metrics(servers.metrics(), identity);
    }
    let connector = MeshConnector {
        hbone: mesh.map(hbone::Connector::hbone_live),
        tcp: tcp::TcpConnector::new().connect_timeout(Duration::from_secs(5)),
    };
    let plan = current.clone();
    let forward = Forward::new(connector, move |req: &Request<Incoming>| {
        // No authority at all (HTTP/1.0 without Host): only a `*` route matches "".
        let host = request_host(req).unwrap_or_default();
        let plan = plan.borrow().clone();
        let best = (plan.routes.iter())
            .filter_map(|r| Some((r.score(&host, req.uri().path())?, r)))
            .max_by_key(|(s, _)| *s);
        best?.1.target(me.as_ref())
    })
    // Every route sets its own (UpstreamTimeout); this is the same default.
    .timeout(Some(Duration::from_secs(default_timeout_secs())))
    // At the edge the client's forwarding fields are forgeries until proven otherwise:
    // Overwrite drops all of them (X-Forwarded-*, X-Real-IP, X-Original-*, Forwarded) and
    // writes this hop's, with the scheme of the connection (https after TerminateLayer).
    .forwarded(ForwardedMode::Overwrite)
    .x_forwarded(ForwardedMode::Overwrite);
    let plan = current.clone();
    let edge = tower::service_fn(move |req: Request<Incoming>| {
        let forward = forward.clone();
        let plan = plan.borrow().clone();
        async move {
            if misdirected(&req, &plan.cert_names) {
                tracing::debug!(
                    host = request_host(&req).unwrap_or_default(),
                    "misdirected request"
                );
                return Ok(proxystack::http::plain_response(
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected request\n",
                ));
            }
            forward.oneshot(req).await
        }
    });
    let http_metrics = HttpMetrics::new(servers.metrics().registry());
    // Routes and backends see one normal path: `/x/../admin` cannot dodge a route.
    let edge = ServiceBuilder::new()
        .layer(HttpMetricsLayer::new(&http_metrics))
        .layer(HttpAccessLogLayer::inbound())
        .layer(NormalizePathLayer)
        .service(edge);
    let http = HttpServer::new(edge).header_read_timeout(Some(Duration::from_secs(10)));
    let plan = current.clone();
    let by_sni = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |m: &Metadata| {
        let sni = m.get::<Sni>()?.0.to_ascii_lowercase();
        plan.borrow().passthrough.get(&sni).cloned()
    });
    // A passthrough connection is cut once a reload routes its SNI elsewhere, or nowhere.
    let rerouted = RecheckLayer::new(current.clone(), |m: &Metadata| {
        let sni = m.get::<Sni>().map(|s| s.0.to_ascii_lowercase());
        while_unchanged(move |plan: &Arc<Plan>| {
            Some(plan.passthrough.get(sni.as_ref()?)?.to_string())
        })
    });
    let passthrough = ServiceBuilder::new()
        .layer(PeekLayer::new())
        .layer(rerouted)
        .service(by_sni);
    let listener_service = move |index: usize| {
        let (plan, http, passthrough) = (current.clone(), http.clone(), passthrough.clone());
        // Each connection is served as the plan in force says for this listener: its TLS
        // mode, PROXY protocol and certificates follow reloads.
        tower::service_fn(move |conn: Conn<BoxIo>| -> Served {
            let plan = plan.borrow().clone();
            let Some(l) = plan.listeners.get(index) else {
                return Box::pin(std::future::ready(Ok(()))); // removed by a reload; it drains
            };
            let pp = l.proxy_protocol.clone();
            match (l.tls, &plan.tls) {
                (Mode::Terminate, Some(tls)) => {
                    let tls = TerminateLayer::new(tls.clone());
                    let svc = ServiceBuilder::new()
                        .layer(pp)
                        .layer(tls)
                        .service(http.clone());
                    Box::pin(ServiceExt::<Conn<BoxIo>>::map_err(svc, Into::into).oneshot(conn))
                }
                (Mode::Terminate, None) => Box::pin(std::future::ready(Err(
                    "no certificate to terminate with".into(),
                ))),
                (Mode::None, _) => {
                    let svc = ServiceBuilder::new().layer(pp).service(http.clone());
                    Box::pin(ServiceExt::<Conn<BoxIo>>::map_err(svc, Into::into).oneshot(conn))
                }
                // Peek at the ClientHello, relay it untouched; no SNI or not TLS → closed.
                (Mode::Passthrough, _) => {
                    let svc = ServiceBuilder::new().layer(pp).service(passthrough.clone());
                    Box::pin(ServiceExt::<Conn<BoxIo>>::map_err(svc, Into::into).oneshot(conn))
                }
            }
        })
    };
    let spawn = move |servers: &mut support::Servers, name: &str, at, listener| {
        let index = name.strip_prefix(LISTENER).and_then(|i| i.parse().ok());
        let Some(index) = index else {
            return;
        };
        servers.spawn_configured(name, Some(at), listener, listener_service(index));
    };
    let addrs: Vec<_> = wanted.iter().map(|(_, at)| *at).collect();
    let listeners = support::bind_all(&addrs).await;
    for ((name, at), listener) in wanted.into_iter().zip(listeners) {
        spawn(&mut servers, &name, at, listener);
    }
    if args.demo {
        let [https, http, pass, ..] = servers.addrs()[..] else {
            unreachable!()
        };
        let ca = DEMO_CA.get().cloned().unwrap_or_default();
        let curl = |name: &str, at: SocketAddr, path: &str| {
            let p = at.port();
            let (ca, resolve) = (ca.display(), format!("{name}:{p}:127.0.0.1"));
            eprintln!("demo: curl --cacert {ca} --resolve {resolve} https://{name}:{p}{path}");
        };
        curl("app.example.com", https, "/mesh");
        curl("pass.example.com", pass, "/");
        eprintln!("demo: curl -H 'Host: nope.example.com' http://{http}/   # 404");
    }
    let Some(path) = args.config.clone() else {
        return servers
            .run_reloading(args.common.admin, support::reload::without_config_file)
            .await;
    };
    let listen = args.listen.clone();
    servers
        .run_reloading(args.common.admin, move |servers| {
            let config: Config = support::reload::read_config(&path)?;
            support::reload::unchanged("[identity]", &identity_files, &config.identity)?;
            let certs = load_certs(&config)?;
            let expiring = certs.clone();
            let plan = Plan::new(config, certs, &listen, has_mesh)?;
            let wanted = plan.listener_names();
            let opened = servers.bind_changed(&wanted)?;
            // Routes, certificates and passthrough SNIs apply from the next connection or
            // request on; passthrough connections routed elsewhere now are cut.
            plans.send_replace(Arc::new(plan));
            expiry.set(&expiring);
            for (name, at, listener) in opened {
                spawn(servers, &name, at, listener);
            }
            servers.retain(|name| wanted.iter().any(|(n, _)| n == name));
            Ok(())
        })
        .await;
}

/// One listener connection being served, whatever the listener's mode.
type Served =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), proxystack::BoxError>> + Send>>;

/// Listener name prefix (in metrics), followed by the listener's index in the config.
const LISTENER: &str = "listener_";

/// What the config says, checked and loaded: what a reload swaps.
struct Plan {
    listeners: Vec<ListenerPlan>,
    routes: Vec<Route>,
    passthrough: HashMap<String, Target>,
    /// The server config for every terminating listener (`None`: no `[[tls.cert]]`).
    tls: Option<Arc<proxystack::tls::ServerConfig>>,
    cert_names: CertNames,
}

struct ListenerPlan {
    listen: SocketAddr,
    tls: Mode,
    /// PROXY protocol first, on the raw socket; "off" is a pass-through, same types.
    proxy_protocol: ProxyProtocolLayer,
}

impl Plan {
    /// Checks what parsing cannot; `listen` (from `--listen`) replaces the listeners'
    /// addresses in order; `has_mesh`: whether `[identity]` was loaded at start.
    fn new(
        config: Config,
        certs: Certs,
        listen: &[SocketAddr],
        has_mesh: bool,
    ) -> Result<Self, String> {
        if !listen.is_empty() && listen.len() != config.listener.len() {
            let n = config.listener.len();
            return Err(format!("{} --listen for {n} listeners", listen.len()));
        }
        if let Some(r) = config.route.iter().find(|r| r.timeout_secs == 0) {
            return Err(format!(
                "route to {}: timeout_secs must be at least 1",
                r.backend
            ));
        }
        for r in config.route.iter().filter(|r| r.identity.is_some()) {
            if !has_mesh {
                return Err(format!("route to {}: HBONE needs [identity]", r.backend));
            }
            if r.next_hop.is_none() && !matches!(r.backend.host(), Host::Ip(_)) {
                return Err(format!(
                    "route to {}: HBONE by name needs next_hop",
                    r.backend
                ));
            }
        }
        let terminates = config.listener.iter().any(|l| l.tls == Mode::Terminate);
        if terminates && certs.is_empty() {
            return Err("a listener terminates TLS but there is no [[tls.cert]]".into());
        }
        let tls = match certs.is_empty() {
            true => None,
            false => Some(tls_config(&certs, config.tls.unknown_sni)?),
        };
        let listeners = (config.listener.iter().enumerate())
            .map(|(i, l)| ListenerPlan {
                listen: listen.get(i).copied().unwrap_or(l.listen),
                tls: l.tls,
                proxy_protocol: if l.proxy_protocol.is_empty() {
                    ProxyProtocolLayer::off()
                } else {
                    ProxyProtocolLayer::required()
                        .trusted_sources(l.proxy_protocol.iter().copied().collect())
                        .peer_addr_from_header(true)
                },
            })
            .collect();
        let passthrough = (config.passthrough.into_iter())
            .map(|p| (p.sni.to_ascii_lowercase(), p.backend))
            .collect();
        Ok(Self {
            listeners,
            routes: config.route,
            passthrough,
            tls,
            cert_names: CertNames::new(&certs),
        })
    }

    /// Every listener by name and configured address.
    fn listener_names(&self) -> Vec<(String, SocketAddr)> {
        (self.listeners.iter().enumerate())
            .map(|(i, l)| (format!("{LISTENER}{i}"), l.listen))
            .collect()
    }
}

/// Where the demo wrote its CA certificate (for the `curl` lines).
static DEMO_CA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn tls_config(
    certs: &Certs,
    unknown: Unknown,
) -> Result<Arc<proxystack::tls::ServerConfig>, String> {
    let mut b = ServerConfigBuilder::new()
        .alpn(["h2", "http/1.1"])
        .unknown_sni(match unknown {
            Unknown::Refuse => UnknownSni::Refuse,
            Unknown::Default => UnknownSni::UseDefault,
        });
    for (i, (names, cert)) in certs.iter().enumerate() {
        if i == 0 {
            b = b.default_cert(cert.clone());
        }
        for name in names {
            b = b.cert_for(name, cert.clone());
        }
    }
    b.build().map_err(|e| format!("TLS configuration: {e}"))
}

/// The gateway's mesh identity from `[identity]`, if any (read once; its files are
/// watched, or the CA renews it).
async fn mesh_identity(config: &Config) -> Mesh {
    let (identity, watch) = config.identity.as_ref()?.live().await;
    Some((identity, Some(watch)))
}

/// The `[[tls.cert]]` files, loaded; the error names the file. An expired certificate is
/// refused: serving it would fail every handshake.
fn load_certs(config: &Config) -> Result<Certs, String> {
    (config.tls.cert.iter())
        .map(|c| {
            let pair = CertKey::from_pem_files(&c.cert.to_string_lossy(), &c.key.to_string_lossy())
                .map_err(|e| e.to_string())?;
            match pair.not_after() {
                Some(t) if t > std::time::SystemTime::now() => Ok((c.names.clone(), pair)),
                Some(_) => Err(format!("{}: the certificate has expired", c.cert.display())),
                None => Err(format!(
                    "{}: the certificate does not parse",
                    c.cert.display()
                )),
            }
        })
        .collect()
}

/// `proxystack_tls_cert_expiry_timestamp_seconds{names="…"}`: when each served certificate
/// expires, set again by every reload.
#[derive(Clone)]
struct CertExpiry(Family<Vec<(&'static str, String)>, Gauge>);

impl CertExpiry {
    fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let family = Family::default();
        registry.register(
            "proxystack_tls_cert_expiry_timestamp_seconds",
            "notAfter of each [[tls.cert]] served, seconds since the epoch, by its names.",
            family.clone(),
        );
        Self(family)
    }

    fn set(&self, certs: &Certs) {
        self.0.clear();
        for (names, cert) in certs {
            let at = cert
                .not_after()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            let secs = at.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            self.0
                .get_or_create(&vec![("names", names.join(","))])
                .set(secs);
        }
    }
}

/// The demo: `app.example.com` (plain backend, and `/mesh` behind an HBONE endpoint),
/// `admin.example.com` (its own certificate), `pass.example.com` (TLS passed through to a
/// backend that terminates it itself).
async fn demo() -> (Config, Certs, Mesh) {
    let ca = proxystack::tls::demo::DemoCa::new("cluster.local");
    let path = support::demo_ca_file("gateway", ca.root_pem());
    eprintln!("demo: CA={}", path.display());
    let _ = DEMO_CA.set(path);
    let app = support::demo_http_backend("hello from app\n").await;
    let admin = support::demo_http_backend("hello from admin\n").await;
    let meshed = support::demo_http_backend("hello from a mesh backend, over HBONE\n").await;
    let pod = support::demo_hbone_endpoint(&ca, "default", "api").await;
    let pass_cert = ca.server_cert(&["pass.example.com"]);
    let pass = support::demo_tls_backend(
        pass_cert,
        "hello from pass.example.com; TLS passed through\n",
    );
    let pass = pass.await;
    let config = format!(
        r#"
        [[listener]]
        listen = "127.0.0.1:8443"
        tls = "terminate"
        [[listener]]
        listen = "127.0.0.1:8080"
        tls = "none"
        [[listener]]
        listen = "127.0.0.1:9443"
        tls = "passthrough"
        [[route]]
        host = "app.example.com"
        backend = "{app}"
        [[route]]
        host = "app.example.com"
        path_prefix = "/mesh"
        backend = "{meshed}"
        identity = "spiffe://cluster.local/ns/default/sa/api"
        next_hop = "{pod}"
        [[route]]
        host = "admin.example.com"
        backend = "{admin}"
        [[passthrough]]
        sni = "pass.example.com"
        backend = "{pass}"
        "#
    );
    let certs = ["app.example.com", "admin.example.com"]
        .map(|n| (vec![n.to_string()], ca.server_cert(&[n])));
    let credentials = Credentials::new(ca.workload_cert("istio-system", "gateway"), [ca.root()]);
    let mesh = LiveIdentity::new(credentials).unwrap_or_else(|e| support::fail(e));
    let config = toml::from_str(&config).unwrap_or_else(|e| support::fail(e));
    (config, certs.into(), Some((mesh, None)))
}
