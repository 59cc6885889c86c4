//! An ingress gateway: TLS terminated with the certificate the client's SNI names (ALPN h2
//! and http/1.1), HTTP routed on Host + path prefix (404 when nothing matches, 421 when the
//! Host is not the name the TLS connection was made for), edge hardening (the client's
//! `Forwarded` / `X-Forwarded-*` are replaced, never trusted), an optional TLS passthrough
//! listener routed by SNI, an optional PROXY protocol requirement per listener (only from
//! the load balancers' networks), and backends in plain TCP or HBONE.
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

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proxystack::addr::{Cidr, Host};
use proxystack::conn::Metadata;
use proxystack::hbone::{self, HboneTarget};
use proxystack::http::{Forward, ForwardedMode, HttpServer, Incoming, PoolKey, RequestScheme};
use proxystack::identity::SpiffeId;
use proxystack::proxy_protocol::ProxyProtocolLayer;
use proxystack::tls::rustls::RootCertStore;
use proxystack::tls::{CertKey, PeekLayer, ServerConfigBuilder, Sni, TerminateLayer, UnknownSni};
use proxystack::{tcp, Authority, Conn, Target};
use serde::Deserialize;
use support::MeshConnector;
use tower::{ServiceBuilder, ServiceExt};

#[derive(Parser, Debug)]
#[command(about = "Ingress gateway: TLS by SNI, Host/path routing, edge hardening, HBONE backends")]
struct Args {
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
struct File {
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
}

fn slash() -> String {
    "/".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Passthrough {
    sni: String,
    #[serde(deserialize_with = "support::parse")]
    backend: Target,
}

/// Everything resolved: certificates loaded (or made up by the demo).
struct Gateway {
    listeners: Vec<Listener>,
    certs: Vec<(Vec<String>, CertKey)>,
    unknown_sni: Unknown,
    routes: Vec<Route>,
    passthrough: HashMap<String, Target>,
    mesh: Option<(CertKey, Arc<RootCertStore>)>,
}

impl Route {
    /// How well this route matches, or `None`: (host specificity, prefix length).
    fn score(&self, host: &str, path: &str) -> Option<(u8, usize)> {
        let rank = match self.host.strip_prefix('*') {
            _ if self.host.eq_ignore_ascii_case(host) => 2,
            Some("") => 0,
            Some(suffix)
                if suffix.starts_with('.')
                    && host.len() > suffix.len()
                    && host
                        .to_ascii_lowercase()
                        .ends_with(&suffix.to_ascii_lowercase()) =>
            {
                1
            }
            _ => return None,
        };
        let p = &self.path_prefix;
        let on_boundary = path == p
            || (path.starts_with(p.as_str())
                && (p.ends_with('/') || path[p.len()..].starts_with('/')));
        on_boundary.then_some((rank, p.len()))
    }

    fn target(&self, me: Option<&SpiffeId>) -> Target {
        let Some(id) = &self.identity else {
            return Target::from(self.backend.clone());
        };
        // Validated at load: an HBONE backend has an IP or an explicit next hop.
        let next_hop = self
            .next_hop
            .or_else(|| Some(SocketAddr::new(self.backend.canonical_ip()?, hbone::PORT)));
        let next_hop = next_hop.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], hbone::PORT)));
        let mut t = HboneTarget::new(next_hop, self.backend.clone(), [id.clone()]);
        if let Some(me) = me {
            t = t.source_identity(me.clone());
        }
        t.into_target()
            .with(PoolKey(self.backend.to_string().into()))
    }
}

/// The host the request is for, without the port.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.as_str().to_string(),
        None => req
            .headers()
            .get(http::header::HOST)?
            .to_str()
            .ok()?
            .to_string(),
    };
    let host = match raw.parse::<http::uri::Authority>() {
        Ok(a) => a
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        Err(_) => return None,
    };
    Some(host.to_ascii_lowercase())
}

fn text(status: StatusCode, body: &'static str) -> Response<proxystack::http::BoxBody> {
    let body = Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {});
    let mut resp = Response::new(body.boxed_unsync());
    *resp.status_mut() = status;
    resp
}

#[tokio::main]
async fn main() {
    support::init_tracing();
    let args = Args::parse();
    let mut gw = match (&args.config, args.demo) {
        (Some(path), false) => load(support::load_config(path)),
        (None, true) => demo().await,
        _ => support::fail("give exactly one of --config FILE or --demo"),
    };
    if !args.listen.is_empty() {
        if args.listen.len() != gw.listeners.len() {
            support::fail(format!(
                "{} --listen addresses for {} listeners",
                args.listen.len(),
                gw.listeners.len()
            ));
        }
        for (l, addr) in gw.listeners.iter_mut().zip(&args.listen) {
            l.listen = *addr;
        }
    }

    // Outbound: plain TCP, or HBONE with the gateway's identity for mesh backends.
    let me = gw
        .mesh
        .as_ref()
        .and_then(|(c, _)| c.spiffe_ids().into_iter().next());
    let connector = MeshConnector {
        hbone: gw.mesh.clone().map(|(cert, roots)| {
            hbone::Connector::hbone(cert, roots)
                .unwrap_or_else(|e| support::fail(format!("HBONE client TLS: {e}")))
        }),
        tcp: tcp::TcpConnector::new().connect_timeout(Duration::from_secs(5)),
    };
    let routes = Arc::new(gw.routes.clone());
    let forward = Forward::new(connector, move |req: &Request<Incoming>| {
        let host = request_host(req)?;
        let best = routes
            .iter()
            .filter_map(|r| Some((r.score(&host, req.uri().path())?, r)))
            .max_by_key(|(s, _)| *s);
        Some(best?.1.target(me.as_ref()))
    })
    .timeout(Some(Duration::from_secs(30)))
    // At the edge the client's forwarding fields are forgeries until proven otherwise.
    .forwarded(ForwardedMode::Overwrite)
    .x_forwarded(ForwardedMode::Overwrite);
    let edge = tower::service_fn(move |mut req: Request<Incoming>| {
        let forward = forward.clone();
        async move {
            // HTTP/2 connection reuse: a request for a host other than the one the TLS
            // connection (and its certificate) was made for must not be routed.
            let sni = req
                .extensions()
                .get::<Sni>()
                .map(|s| s.0.to_ascii_lowercase());
            if sni.is_some() && sni != request_host(&req) {
                return Ok(text(
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected request\n",
                ));
            }
            for name in ["x-forwarded-host", "x-forwarded-port", "x-real-ip"] {
                req.headers_mut().remove(name);
            }
            forward.oneshot(req).await
        }
    });
    let http = HttpServer::new(edge).header_read_timeout(Some(Duration::from_secs(10)));
    let https = http.clone().map_request(|mut c: Conn<proxystack::BoxIo>| {
        c.insert(RequestScheme(http::uri::Scheme::HTTPS));
        c
    });
    let passthrough = Arc::new(std::mem::take(&mut gw.passthrough));
    let by_sni = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |m: &Metadata| {
        passthrough
            .get(&m.get::<Sni>()?.0.to_ascii_lowercase())
            .cloned()
    });

    let mut servers = support::Servers::new(&args.common);
    for (i, l) in gw.listeners.iter().enumerate() {
        // PROXY protocol first, on the raw socket; "off" is a pass-through, same types.
        let pp = if l.proxy_protocol.is_empty() {
            ProxyProtocolLayer::off()
        } else {
            ProxyProtocolLayer::required()
                .trusted_sources(l.proxy_protocol.iter().copied().collect())
                .peer_addr_from_header(true)
        };
        let listener = support::bind_all(&[l.listen]).await.remove(0);
        let name = format!("listener_{i}");
        match l.tls {
            Mode::Terminate => {
                let tls = TerminateLayer::new(tls_config(&gw));
                servers.spawn(
                    &name,
                    listener,
                    ServiceBuilder::new()
                        .layer(pp)
                        .layer(tls)
                        .service(https.clone()),
                );
            }
            Mode::None => servers.spawn(
                &name,
                listener,
                ServiceBuilder::new().layer(pp).service(http.clone()),
            ),
            // Peek at the ClientHello, relay it untouched; no SNI or not TLS → closed.
            Mode::Passthrough => servers.spawn(
                &name,
                listener,
                ServiceBuilder::new()
                    .layer(pp)
                    .layer(PeekLayer::new())
                    .service(by_sni.clone()),
            ),
        }
    }
    servers.run(args.common.admin).await;
    if args.demo {
        let _ = std::fs::remove_file(demo_ca_path());
    }
}

fn tls_config(gw: &Gateway) -> Arc<proxystack::tls::rustls::ServerConfig> {
    let mut b = ServerConfigBuilder::new()
        .alpn(["h2", "http/1.1"])
        .unknown_sni(match gw.unknown_sni {
            Unknown::Refuse => UnknownSni::Refuse,
            Unknown::Default => UnknownSni::UseDefault,
        });
    for (i, (names, cert)) in gw.certs.iter().enumerate() {
        if i == 0 {
            b = b.default_cert(cert.clone());
        }
        for name in names {
            b = b.cert_for(name, cert.clone());
        }
    }
    b.build()
        .unwrap_or_else(|e| support::fail(format!("TLS configuration: {e}")))
}

fn load(file: File) -> Gateway {
    let mesh = file.identity.as_ref().map(|i| i.load());
    for r in &file.route {
        if r.identity.is_some() && mesh.is_none() {
            support::fail(format!(
                "route to {} uses HBONE but there is no [identity]",
                r.backend
            ));
        }
        if r.identity.is_some() && r.next_hop.is_none() && !matches!(r.backend.host(), Host::Ip(_))
        {
            support::fail(format!(
                "route to {}: an HBONE backend by name needs next_hop",
                r.backend
            ));
        }
    }
    if file.listener.iter().any(|l| l.tls == Mode::Terminate) && file.tls.cert.is_empty() {
        support::fail("a listener terminates TLS but [[tls.cert]] is empty");
    }
    let certs = file
        .tls
        .cert
        .iter()
        .map(|c| {
            let pair = CertKey::from_pem_files(&c.cert.to_string_lossy(), &c.key.to_string_lossy());
            (c.names.clone(), pair.unwrap_or_else(|e| support::fail(e)))
        })
        .collect();
    Gateway {
        listeners: file.listener,
        certs,
        unknown_sni: file.tls.unknown_sni,
        routes: file.route,
        passthrough: file
            .passthrough
            .into_iter()
            .map(|p| (p.sni.to_ascii_lowercase(), p.backend))
            .collect(),
        mesh,
    }
}

fn demo_ca_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "proxystack-gateway-demo-ca-{}.pem",
        std::process::id()
    ))
}

/// The demo: `app.example.com` (plain backend, and `/mesh` behind an HBONE endpoint),
/// `admin.example.com` (its own certificate), `pass.example.com` (TLS passed through to a
/// backend that terminates it itself).
async fn demo() -> Gateway {
    let ca = proxystack::tls::demo::DemoCa::new("cluster.local");
    std::fs::write(demo_ca_path(), ca.root_pem()).unwrap_or_else(|e| support::fail(e));
    eprintln!("demo: CA={}", demo_ca_path().display());
    let app = support::demo_http_backend("hello from app\n").await;
    let admin = support::demo_http_backend("hello from admin\n").await;
    let meshed = support::demo_http_backend("hello from a mesh backend, over HBONE\n").await;
    let pod = support::demo_hbone_endpoint(&ca, "default", "api").await;
    let pass = demo_tls_backend(ca.server_cert(&["pass.example.com"])).await;
    let route = |host: &str, path_prefix: &str, backend: SocketAddr| Route {
        host: host.into(),
        path_prefix: path_prefix.into(),
        backend: backend.into(),
        identity: None,
        next_hop: None,
    };
    let mesh_id =
        SpiffeId::istio("cluster.local", "default", "api").unwrap_or_else(|e| support::fail(e));
    let listener = |port: u16, tls| Listener {
        listen: ([127, 0, 0, 1], port).into(),
        tls,
        proxy_protocol: Vec::new(),
    };
    Gateway {
        listeners: vec![
            listener(8443, Mode::Terminate),
            listener(8080, Mode::None),
            listener(9443, Mode::Passthrough),
        ],
        certs: vec![
            (
                vec!["app.example.com".into()],
                ca.server_cert(&["app.example.com"]),
            ),
            (
                vec!["admin.example.com".into()],
                ca.server_cert(&["admin.example.com"]),
            ),
        ],
        unknown_sni: Unknown::Refuse,
        routes: vec![
            route("app.example.com", "/", app),
            Route {
                identity: Some(mesh_id),
                next_hop: Some(pod),
                ..route("app.example.com", "/mesh", meshed)
            },
            route("admin.example.com", "/", admin),
        ],
        passthrough: HashMap::from([("pass.example.com".to_string(), Target::from(pass))]),
        mesh: Some((ca.workload_cert("istio-system", "gateway"), ca.roots())),
    }
}

/// A backend that terminates TLS itself (for the passthrough listener).
async fn demo_tls_backend(cert: CertKey) -> SocketAddr {
    let inner =
        support::demo_http_backend("hello from pass.example.com; TLS passed through\n").await;
    let tls = ServerConfigBuilder::new()
        .default_cert(cert)
        .build()
        .unwrap_or_else(|e| support::fail(e));
    let svc = ServiceBuilder::new()
        .layer(TerminateLayer::new(tls))
        .service(
            tcp::Relay::new(tcp::TcpConnector::new())
                .upstream(move |_: &Metadata| Some(Target::from(inner))),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| support::fail(e));
    let addr = listener.local_addr().unwrap_or_else(|e| support::fail(e));
    tokio::spawn(proxystack::serve(
        listener,
        svc,
        proxystack::drain::Watch::never(),
    ));
    addr
}
