//! Service insertion ("the sandwich"): traffic arrives over HBONE, is handed in plaintext
//! to one or more third-party proxies (a WAF, an IDS, haproxy…) with a PROXY v2 header,
//! comes back from the last of them and leaves re-encapsulated in HBONE to its destination.
//!
//! ```text
//! HBONE client ──▶ ingress :15008   hbone::Inbound → tcp::Relay over
//! (mTLS, CONNECT D)                 ProxyProtocolConnector ── PROXY v2 ─▶ proxy A
//!                                                                         │ accept-proxy
//!                  egress :15009 ◀── PROXY v2 ────────────────────────────┘ send-proxy-v2
//!                   ProxyProtocolLayer (trusted: the chain's sources)
//!                   another proxy? ── PROXY v2, next flow token ────────▶ proxy B
//!                  egress :15009 ◀── PROXY v2 ────────────────────────────┘
//!                   last one: hbone::Connector ── mTLS, CONNECT D ──────▶ destination
//! ```
//!
//! ```text
//! cargo run --example insertion --all-features -- --demo
//! echo hello | nc -N 127.0.0.1 15001     # HBONE client → insertion → A → B → HBONE → echo app
//! cargo run --example insertion --all-features -- --config insertion.toml
//! ```
//!
//! `--demo` runs everything on loopback: demo certificates, an HBONE client side on
//! 127.0.0.1:15001, the insertion proxy (ingress 127.0.0.1:15008, egress 127.0.0.1:15009),
//! two inserted proxies (127.0.0.1:17001 and :17002: haproxy if installed, else the
//! built-in stand-in, also forced with `--stand-in`), and an echo app behind an HBONE
//! server. `--config` runs only the insertion proxy; the inserted proxies, the clients
//! and the destinations are yours.
//!
//! # What the inserted proxy gets
//!
//! One connection per tunnel, plaintext, starting with a PROXY v2 header:
//!
//! * source = the client: the tunnel's `forwarded: for=` (the client is an authenticated
//!   mesh peer; `trust_forwarded_for = false` uses its socket address instead);
//! * destination = the destination's IP address: the tunnel's `:authority` itself, or for
//!   a host-name authority the `address` (a VIP) configured for it;
//! * `0xD0` = the client's SPIFFE identity (from its mTLS certificate), `0xD1` = the
//!   destination service's host name, `AUTHORITY` (0x02) = that host name too (haproxy
//!   can read and forward it, unlike `0xD0`/`0xD1`), `UNIQUE_ID` (0x05) = a flow token.
//!
//! # How the destination survives the inserted proxy
//!
//! The PROXY header's destination address is the carrier: a proxy with `accept-proxy` and
//! `send-proxy-v2` repeats it on its outbound connection, and the egress side routes on it
//! (looked up in the destination table, which restores host-name authorities). The flow
//! token, which haproxy forwards as `UNIQUE_ID`, leads to the flow record the ingress side
//! made: it must name the same destination (else the connection is refused: the inserted
//! proxy changed where the traffic goes), and it supplies what haproxy 2.6 cannot forward:
//! the `0xD0` identity and the `0xD1` service. A proxy that does forward `0xD0` (the
//! stand-in; haproxy ≥ 2.9 with `set-proxy-v2-tlv-fmt`) must repeat the same identity.
//!
//! # Loop prevention
//!
//! A loop here is the egress side's HBONE connection coming back into the ingress side
//! (a destination table entry that points at this proxy, directly or through a load
//! balancer, NAT or a second insertion proxy); each round would open new connections
//! through every inserted proxy, without end. Three rules stop it:
//!
//! 1. **Traffic that went through an insertion chain is not inserted again.** The egress
//!    side authenticates with this proxy's own identity and sends
//!    `x-proxystack-insertions: <n+1>` on every CONNECT it opens. The ingress side refuses
//!    (401, nothing dialled) a tunnel whose client identity is its own, or whose count has
//!    reached `max_insertions` (default: 1). The identity check needs no cooperation and
//!    cannot be forged without our key; the count also stops loops between two insertion
//!    proxies with different identities, and a client can only use it to get itself
//!    refused, never to skip the chain. Two legitimate insertion domains in a row need
//!    `max_insertions = 2`.
//! 2. **A flow comes back at most once per inserted proxy, in order.** Flow tokens are
//!    single-use, expire, and record which proxy the flow was sent to; the egress side only
//!    continues flows it minted, so a proxy wired back to itself or to an earlier one ends
//!    after at most `chain.len()` returns.
//! 3. **Obvious self-references fail at start-up**: a destination whose HBONE endpoint, or
//!    an inserted proxy whose address, is one of our own listeners, and a proxy listed
//!    twice, exit non-zero naming the entry.
//!
//! The ingress side answers the HBONE client `200` once the first inserted proxy accepted
//! the connection (an L7 proxy may not dial onward before it has seen a request, so waiting
//! for the far end would deadlock); a failure further on closes the tunnel.
//!
//! # Config
//!
//! ```toml
//! [identity]                # this proxy's SPIFFE certificate (spiffe://td/ns/NS/sa/SA)
//! cert = "insertion.pem"
//! key = "insertion.key"
//! roots = "root.pem"
//! # demo_dir = "/tmp/insertion-demo"  # instead: a fresh demo CA; writes root.pem and
//! #                                    # client/server .pem/.key there for your peers
//! [ingress]
//! listen = "0.0.0.0:15008"
//! trust_forwarded_for = true   # PROXY source = `forwarded: for=` of the HBONE client
//! max_insertions = 1           # refuse tunnels that were already inserted this often
//! [egress]
//! listen = "127.0.0.1:15009"   # the inserted proxies' `server` lines point here
//! flow_timeout_secs = 60       # time an inserted proxy has to dial onward
//!
//! [[chain]]                    # the inserted proxies, in order
//! name = "waf"
//! address = "127.0.0.1:17001"  # its `bind … accept-proxy`
//! sources = ["127.0.0.1/32"]   # where its outbound connections come from (default: address)
//! [[chain]]
//! name = "ids"
//! address = "127.0.0.1:17002"
//!
//! [[destination]]              # only these authorities are accepted
//! authority = "reviews.default.svc.cluster.local:9080"
//! address = "10.96.0.20:9080"  # PROXY destination (required for host names)
//! hbone = "10.244.1.7:15008"   # its HBONE endpoint
//! identity = "spiffe://cluster.local/ns/default/sa/reviews"
//! service = "reviews.default.svc.cluster.local"  # 0xD1 (default: the authority's host)
//! ```
//!
//! Each inserted haproxy (2.6) looks like [`haproxy_config`]: `mode tcp`, `bind …
//! accept-proxy`, `server … send-proxy-v2 proxy-v2-options authority,unique-id` and
//! `unique-id-format %[fc_pp_unique_id]` so that the flow token goes on. haproxy can
//! also chain directly (A's `server` line → B's `accept-proxy` bind): list only A, with
//! B's addresses as its `sources`. In `mode http`, set `http-reuse never`: a server
//! connection shared by two clients would carry the first one's PROXY header for both.

#[path = "../support/mod.rs"]
mod support;

mod config; // the config file, the resolved plan and its start-up checks
mod flows; // flow tokens: what the ingress side knew, for the egress side
mod inserted; // inserted proxies for the demo and tests: haproxy or the stand-in
mod proxy; // the ingress and egress sides

// What `tests/insertion.rs` drives: it includes this file as a module.
pub use config::{Config, Destination, Hop, Plan, Settings};
pub use inserted::{find_haproxy, haproxy_config, spawn_stand_in, HaproxyChild};
pub use proxy::{start, Insertion, InsertionStats, Started, INSERTIONS_HEADER};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use proxystack::conn::{Metadata, PeerAddr};
use proxystack::drain::Watch;
use proxystack::hbone::{self, HboneTarget, Inbound};
use proxystack::identity::SpiffeId;
use proxystack::serve::ServeStats;
use proxystack::{tcp, Authority, Server, Target};
use tokio::task::JoinHandle;

#[derive(Parser, Debug)]
#[command(about = "Service insertion: HBONE in, third-party proxies in the middle, HBONE out")]
struct Args {
    /// TOML config (see the example's docs).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Zero-config run: demo certificates, two inserted proxies, an echo app behind HBONE.
    #[arg(long)]
    demo: bool,
    /// With --demo: use the built-in stand-in proxies even when haproxy is installed.
    #[arg(long, requires = "demo")]
    stand_in: bool,
    #[command(flatten)]
    common: support::Common,
}

// ---------------------------------------------------------------------------------------
// main and the demo.

#[tokio::main]
async fn main() {
    support::init_tracing();
    let args = Args::parse();
    let drain = Duration::from_secs(args.common.drain_secs);
    let (signal, watch) = proxystack::drain::channel();
    let mut servers = Vec::new();
    let mut stats = Vec::new();
    let mut addrs = Vec::new();
    let mut children = Vec::new();

    let (plan, demo) = match (&args.config, args.demo) {
        (Some(path), false) => (
            Plan::from_config(support::load_config(path)).unwrap_or_else(|e| support::fail(e)),
            None,
        ),
        (None, true) => {
            let (plan, ca, dest) = demo_plan(drain, &watch, &mut servers).await;
            (plan, Some((ca, dest)))
        }
        _ => support::fail("give exactly one of --config FILE or --demo"),
    };
    let mut listeners = support::bind_all(&[plan.ingress, plan.egress]).await;
    let egress = listeners.remove(1);
    let ingress = listeners.remove(0);

    if demo.is_some() {
        let upstream = egress.local_addr().unwrap_or_else(|e| support::fail(e));
        let haproxy = if args.stand_in { None } else { find_haproxy() };
        for hop in &plan.chain {
            match &haproxy {
                Some(bin) => {
                    let config = haproxy_config(&hop.name, hop.address, upstream, "stderr");
                    let mut child = HaproxyChild::spawn(
                        bin,
                        &hop.name,
                        &config,
                        std::process::Stdio::null(),
                        std::process::Stdio::inherit(),
                    )
                    .unwrap_or_else(|e| support::fail(format!("starting haproxy: {e}")));
                    child
                        .wait_ready(hop.address, Duration::from_secs(10))
                        .await
                        .unwrap_or_else(|e| support::fail(e));
                    children.push(child);
                }
                None => {
                    let listener = support::bind_all(&[hop.address]).await.remove(0);
                    let (s, task) = spawn_stand_in(listener, upstream, drain, watch.clone());
                    stats.push((format!("stand_in_{}", hop.name), s));
                    servers.push(task);
                }
            }
            addrs.push(hop.address);
        }
        eprintln!(
            "demo: inserted proxies: {}",
            match &haproxy {
                Some(bin) => format!("haproxy ({})", bin.display()),
                None => "the built-in stand-in (haproxy not installed or --stand-in)".into(),
            }
        );
    }

    let started = start(plan, ingress, egress, drain, &watch).unwrap_or_else(|e| support::fail(e));
    addrs.extend([started.ingress, started.egress]);
    stats.extend(started.stats);
    servers.extend(started.servers);

    if let Some((ca, dest)) = demo {
        let (addr, s, task) =
            demo_client(&ca, started.ingress, &started.state, dest, drain, &watch).await;
        addrs.push(addr);
        stats.push(("demo_client".to_string(), s));
        servers.push(task);
        eprintln!(
            "demo: try `echo hello | nc -N {addr}`",
            addr = addr.to_string().replace(':', " ")
        );
    }
    if let Some(admin) = args.common.admin {
        let state = started.state.clone();
        let metrics = support::Metrics::new();
        for (name, s) in stats {
            metrics.serve_stats(&name, s);
        }
        addrs.push(support::admin(admin, metrics, Arc::new(move || state.metrics())).await);
    }
    support::announce(&addrs);
    drop(watch);
    support::run_until_signal(signal, servers).await;
    drop(children);
}

/// Demo certificates, an echo app behind an HBONE server, and the plan: ingress
/// 127.0.0.1:15008, egress 127.0.0.1:15009, proxies `a` (127.0.0.1:17001) and `b`
/// (127.0.0.1:17002), one destination `echo.default.svc.cluster.local:7000` (VIP
/// 240.0.0.10:7000, never dialled).
async fn demo_plan(
    drain: Duration,
    watch: &Watch,
    servers: &mut Vec<JoinHandle<std::io::Result<()>>>,
) -> (Plan, proxystack::tls::demo::DemoCa, Authority) {
    let ca = proxystack::tls::demo::DemoCa::new("cluster.local");
    let app = support::demo_echo_backend().await;
    let to_app = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &Metadata| Some(Target::from(app)));
    let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
        .check_local_ip(false)
        .service(to_app)
        .unwrap_or_else(|e| support::fail(format!("demo destination TLS: {e}")));
    let listener = support::bind_all(&["127.0.0.1:0".parse().unwrap_or_else(|e| support::fail(e))])
        .await
        .remove(0);
    let dest_addr = listener.local_addr().unwrap_or_else(|e| support::fail(e));
    let server = Server::new().drain_timeout(drain);
    let w = watch.clone();
    servers.push(tokio::spawn(async move {
        server.serve(listener, inbound, w).await
    }));

    let authority = Authority::parse("echo.default.svc.cluster.local:7000")
        .unwrap_or_else(|e| support::fail(e));
    let plan = Plan {
        cert: ca.workload_cert("istio-system", "insertion"),
        roots: ca.roots(),
        ingress: ([127, 0, 0, 1], hbone::PORT).into(),
        egress: ([127, 0, 0, 1], 15009).into(),
        settings: Settings::default(),
        chain: vec![
            Hop::new("a", ([127, 0, 0, 1], 17001).into()),
            Hop::new("b", ([127, 0, 0, 1], 17002).into()),
        ],
        destinations: vec![Destination {
            authority: authority.clone(),
            address: ([240, 0, 0, 10], 7000).into(),
            hbone: dest_addr,
            identity: SpiffeId::istio("cluster.local", "default", "server")
                .unwrap_or_else(|e| support::fail(e)),
            service: None,
        }],
    };
    (plan, ca, authority)
}

/// The demo's HBONE client side on 127.0.0.1:15001: plain TCP in, HBONE (as
/// `default/client`) to the insertion proxy's ingress, for the demo destination.
async fn demo_client(
    ca: &proxystack::tls::demo::DemoCa,
    ingress: SocketAddr,
    state: &Insertion,
    authority: Authority,
    drain: Duration,
    watch: &Watch,
) -> (SocketAddr, Arc<ServeStats>, JoinHandle<std::io::Result<()>>) {
    let connector = hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots())
        .unwrap_or_else(|e| support::fail(format!("demo client TLS: {e}")));
    let insertion = state.identity().clone();
    let relay = tcp::Relay::new(connector).upstream(move |m: &Metadata| {
        let mut target = HboneTarget::new(ingress, authority.clone(), [insertion.clone()]);
        if let Some(peer) = m.get::<PeerAddr>() {
            target = target.forwarded_for(peer.0);
        }
        Some(target.into_target())
    });
    let listener = support::bind_all(&[([127, 0, 0, 1], 15001).into()])
        .await
        .remove(0);
    let addr = listener.local_addr().unwrap_or_else(|e| support::fail(e));
    let server = Server::new().drain_timeout(drain);
    let stats = server.stats();
    let w = watch.clone();
    (
        addr,
        stats,
        tokio::spawn(async move { server.serve(listener, relay, w).await }),
    )
}
