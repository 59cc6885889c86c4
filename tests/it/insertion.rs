//! Service insertion ("the sandwich", `examples/insertion/`) over real loopback sockets:
//! HBONE in, haproxy (or the built-in stand-in) in the middle, HBONE out; the chain of
//! two; loop prevention; what the egress side refuses; config errors.
//!
//! The example's own code is under test: it is compiled into this test as a module.
#![cfg(all(feature = "hbone", feature = "proxy-protocol", feature = "demo-certs"))]

#[allow(dead_code)]
#[path = "../../examples/insertion/main.rs"]
mod example;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use example::{Destination, HaproxyChild, Hop, Plan, Settings, Started, INSERTIONS_HEADER};
use http::{HeaderValue, StatusCode};
use proxystack::conn::Metadata;
use proxystack::connect::{lookup, ConnectHeaders, TunnelError, TunnelInfo};
use proxystack::drain::{self, Signal};
use proxystack::hbone::{self, HboneHeaders, HboneTarget, Inbound};
use proxystack::identity::{PeerIdentity, SpiffeId};
use proxystack::proxy_protocol::{decode, Decoded, Limits, ProxyHeader};
use proxystack::tls::demo::DemoCa;
use proxystack::{tcp, Authority, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tower::ServiceExt;

const TD: &str = "cluster.local";
const SERVICE: &str = "echo.default.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(10);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::istio(TD, ns, sa).unwrap()
}

fn client_addr(i: u16) -> SocketAddr {
    SocketAddr::from(([10, 1, 2, 3], 4567 + i))
}

// ---------------------------------------------------------------------------------------
// The destination: an echo app that records what it received, behind an HBONE server
// that records what each tunnel looked like.

#[derive(Clone, Default)]
struct AppSeen(Arc<Mutex<Vec<Vec<u8>>>>);

impl AppSeen {
    /// The connections recorded so far, once there are `n` (or after a bounded wait).
    async fn wait_for(&self, n: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.0.lock().unwrap().clone();
            if seen.len() >= n || Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An echo server that records each connection's bytes once it ends.
async fn recording_echo() -> (SocketAddr, AppSeen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = AppSeen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            if conn.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = conn.shutdown().await;
                s.0.lock().unwrap().push(got);
            });
        }
    });
    (addr, seen)
}

/// What the destination's HBONE server saw of one tunnel.
#[derive(Debug, Clone)]
struct DestTunnel {
    authority: String,
    client: Option<SpiffeId>,
    headers: HboneHeaders,
    insertions: Option<String>,
}

#[derive(Clone, Default)]
struct DestSeen(Arc<Mutex<Vec<DestTunnel>>>);

impl DestSeen {
    fn all(&self) -> Vec<DestTunnel> {
        self.0.lock().unwrap().clone()
    }
}

/// The destination's HBONE server (`default/server`): every tunnel goes to `app`.
async fn destination(ca: &DemoCa, app: SocketAddr) -> (Running, DestSeen) {
    let seen = DestSeen::default();
    let s = seen.clone();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |m: &Metadata| {
        let info = m.get::<TunnelInfo>()?;
        s.0.lock().unwrap().push(DestTunnel {
            authority: info.authority.to_string(),
            client: lookup::<PeerIdentity>(m).map(|p| p.0.clone()),
            headers: m.get::<HboneHeaders>().cloned().unwrap_or_default(),
            insertions: info
                .headers
                .get(INSERTIONS_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
        Some(Target::from(app))
    });
    let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
        .check_local_ip(false)
        .service(relay)
        .unwrap();
    (start(Server::new(), inbound).await, seen)
}

// ---------------------------------------------------------------------------------------
// The insertion proxy under test, and an HBONE client for it.

struct Insertion {
    started: Started,
    signal: Signal,
}

impl Insertion {
    fn stat(&self, pick: fn(&example::InsertionStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        pick(&self.started.state.stats).load(Ordering::SeqCst)
    }

    async fn shutdown(self) {
        self.signal.start();
        for s in self.started.servers {
            let _ = tokio::time::timeout(WAIT, s).await;
        }
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Starts the insertion proxy (`istio-system/insertion`) on pre-bound listeners.
fn start_insertion(
    ca: &DemoCa,
    ingress: TcpListener,
    egress: TcpListener,
    chain: Vec<Hop>,
    destinations: Vec<Destination>,
    settings: Settings,
) -> Insertion {
    init_tracing();
    let plan = Plan {
        cert: ca.workload_cert("istio-system", "insertion"),
        roots: ca.roots(),
        ingress: ingress.local_addr().unwrap(),
        egress: egress.local_addr().unwrap(),
        settings,
        chain,
        destinations,
    };
    let (signal, watch) = drain::channel();
    let started = example::start(plan, ingress, egress, Duration::from_secs(1), &watch).unwrap();
    Insertion { started, signal }
}

fn hbone_client(ca: &DemoCa, sa: &str) -> hbone::Connector {
    hbone::Connector::hbone(ca.workload_cert("default", sa), ca.roots()).unwrap()
}

/// A tunnel to `authority` through the insertion proxy, as an HBONE client (a node proxy
/// speaking for the application at `client`) would open it.
fn via_insertion(ingress: SocketAddr, authority: &str, client: SocketAddr) -> Target {
    HboneTarget::new(
        ingress,
        Authority::parse(authority).unwrap(),
        [id("istio-system", "insertion")],
    )
    .source_identity(id("default", "client"))
    .forwarded_for(client)
    .into_target()
}

/// Deterministic, non-repeating test bytes.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9u32 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Opens a tunnel, writes `data`, half-closes, and returns everything read back.
async fn send_through(connector: hbone::Connector, target: Target, data: &[u8]) -> Vec<u8> {
    let tunnel = tokio::time::timeout(WAIT, connector.oneshot(target))
        .await
        .expect("tunnel opened in time")
        .expect("tunnel opened");
    let (mut r, mut w) = tokio::io::split(tunnel);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let (_, n) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("round trip in time");
    n.unwrap();
    back
}

// ---------------------------------------------------------------------------------------
// haproxy as the inserted proxy.

fn haproxy_bin() -> Option<PathBuf> {
    let found = example::find_haproxy();
    if found.is_none() {
        println!("SKIPPED: haproxy not installed");
    }
    found
}

/// A haproxy inserted proxy logging one line per relayed connection to a file.
struct Haproxy {
    name: String,
    addr: SocketAddr,
    log: PathBuf,
    _child: HaproxyChild,
}

impl Haproxy {
    async fn start(bin: &std::path::Path, name: &str, upstream: SocketAddr) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = example::haproxy_config(name, addr, upstream, "stdout");
        let log = std::env::temp_dir().join(format!(
            "proxystack-insertion-test-{}-{name}-{}.log",
            std::process::id(),
            free_port()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let mut child = HaproxyChild::spawn(
            bin,
            name,
            &config,
            file.try_clone().unwrap().into(),
            file.into(),
        )
        .unwrap();
        if let Err(e) = child.wait_ready(addr, WAIT).await {
            panic!(
                "{e}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Haproxy {
            name: name.to_owned(),
            addr,
            log,
            _child: child,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log lines of relayed connections (not the readiness probe's error line).
    fn relayed(&self) -> Vec<String> {
        let prefix = format!("{} client=", self.name);
        self.log()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(str::to_owned)
            .collect()
    }

    /// Waits (bounded) until `n` connections were relayed; returns their log lines.
    async fn wait_relayed(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let lines = self.relayed();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `key=value` field of a log line.
    fn field<'a>(line: &'a str, key: &str) -> &'a str {
        line.split(' ')
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_flow_token(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

// ---------------------------------------------------------------------------------------
// End to end.

/// HBONE client → insertion → haproxy (accept-proxy / send-proxy-v2) → insertion → HBONE
/// → destination → app: bytes arrive byte-identical, haproxy saw the client and the
/// destination, the destination sees the original authority and our identity, and the
/// egress side knows the client's 0xD0 identity.
#[tokio::test]
async fn haproxy_inserted_end_to_end() {
    let Some(bin) = haproxy_bin() else { return };
    let ca = DemoCa::new(TD);
    let (app, app_seen) = recording_echo().await;
    let (dest, dest_seen) = destination(&ca, app).await;
    let (ingress, egress) = (bind().await, bind().await);
    let hap = Haproxy::start(&bin, "a", egress.local_addr().unwrap()).await;

    // An IP destination: the PROXY destination is the authority itself.
    let authority: SocketAddr = ([127, 0, 0, 1], app.port()).into();
    let mut dst = Destination::ip(authority, dest.addr, id("default", "server"));
    dst.service = Some(SERVICE.into());
    let ins = start_insertion(
        &ca,
        ingress,
        egress,
        vec![Hop::new("a", hap.addr)],
        vec![dst],
        Settings::default(),
    );

    let data = payload(256 * 1024, 1);
    let target = via_insertion(ins.started.ingress, &authority.to_string(), client_addr(0));
    let back = send_through(hbone_client(&ca, "client"), target, &data).await;
    assert!(
        back == data,
        "echo differs ({} bytes back):\n{}",
        back.len(),
        hap.log()
    );
    assert!(
        app_seen.wait_for(1).await == vec![data.clone()],
        "the app got other bytes"
    );

    // haproxy saw the client (from `forwarded: for=`) and the destination, from PROXY v2.
    let lines = hap.wait_relayed(1).await;
    assert_eq!(lines.len(), 1, "{}", hap.log());
    assert_eq!(Haproxy::field(&lines[0], "client"), "10.1.2.3:4567");
    assert_eq!(
        Haproxy::field(&lines[0], "destination"),
        authority.to_string()
    );
    assert_eq!(Haproxy::field(&lines[0], "authority"), SERVICE);
    assert!(
        is_flow_token(Haproxy::field(&lines[0], "flow")),
        "{lines:?}"
    );

    // The destination: original authority, our identity, the client and the service.
    let tunnels = dest_seen.all();
    assert_eq!(tunnels.len(), 1);
    let t = &tunnels[0];
    assert_eq!(t.authority, authority.to_string());
    assert_eq!(t.client, Some(id("istio-system", "insertion")));
    assert_eq!(t.headers.forwarded_for, Some(client_addr(0)));
    assert_eq!(t.headers.forwarded_host.as_deref(), Some(SERVICE));
    assert_eq!(t.insertions.as_deref(), Some("1"));

    // The egress side got the 0xD0 identity the ingress side sent (through the flow
    // token: haproxy 2.6 does not forward custom TLVs).
    let records = ins.started.state.recent();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].identity, Some(id("default", "client")));
    assert!(!records[0].identity_in_header);
    assert_eq!(records[0].service.as_deref(), Some(SERVICE));
    assert_eq!(records[0].client, client_addr(0));
    assert_eq!(records[0].hops, ["a"]);
    assert_eq!(ins.stat(|s| &s.inserted), 1);
    assert_eq!(ins.stat(|s| &s.delivered), 1);
    assert_eq!(ins.stat(|s| &s.returns_refused), 0);
    assert_eq!(ins.started.state.pending_flows(), 0);
    ins.shutdown().await;
}

/// Two haproxies in a row, a host-name destination (VIP in the PROXY header), several
/// tunnels at once over one pooled HBONE connection: every flow keeps its own client,
/// both proxies relay every connection, the destination gets the host-name authority.
#[tokio::test]
async fn chain_of_two_haproxies() {
    let Some(bin) = haproxy_bin() else { return };
    let ca = DemoCa::new(TD);
    let (app, app_seen) = recording_echo().await;
    let (dest, dest_seen) = destination(&ca, app).await;
    let (ingress, egress) = (bind().await, bind().await);
    let upstream = egress.local_addr().unwrap();
    let a = Haproxy::start(&bin, "a", upstream).await;
    let b = Haproxy::start(&bin, "b", upstream).await;
    let vip: SocketAddr = "240.0.0.10:7000".parse().unwrap();
    let authority = format!("{SERVICE}:7000");
    let ins = start_insertion(
        &ca,
        ingress,
        egress,
        vec![Hop::new("a", a.addr), Hop::new("b", b.addr)],
        vec![Destination {
            authority: Authority::parse(&authority).unwrap(),
            address: vip,
            hbone: dest.addr,
            identity: id("default", "server"),
            service: None,
        }],
        Settings::default(),
    );

    const N: u16 = 5;
    let connector = hbone_client(&ca, "client");
    let runs: Vec<_> = (0..N)
        .map(|i| {
            let target = via_insertion(ins.started.ingress, &authority, client_addr(i));
            let data = payload(64 * 1024 + usize::from(i), i as u8);
            let c = connector.clone();
            tokio::spawn(async move { (send_through(c, target, &data).await, data) })
        })
        .collect();
    for run in runs {
        let (back, data) = run.await.unwrap();
        assert!(back == data, "echo differs:\n{}\n{}", a.log(), b.log());
    }
    assert_eq!(
        connector.connections_dialled(),
        1,
        "one pooled HBONE connection"
    );
    assert_eq!(
        app_seen.wait_for(usize::from(N)).await.len(),
        usize::from(N)
    );

    // Both proxies relayed every tunnel, each for its own client, towards the VIP.
    let clients: std::collections::BTreeSet<String> =
        (0..N).map(|i| client_addr(i).to_string()).collect();
    let mut tokens = std::collections::HashSet::new();
    for hap in [&a, &b] {
        let lines = hap.wait_relayed(usize::from(N)).await;
        assert_eq!(lines.len(), usize::from(N), "{}", hap.log());
        let seen: std::collections::BTreeSet<String> = lines
            .iter()
            .map(|l| Haproxy::field(l, "client").to_owned())
            .collect();
        assert_eq!(seen, clients, "{}", hap.log());
        for l in &lines {
            assert_eq!(Haproxy::field(l, "destination"), vip.to_string());
            assert_eq!(Haproxy::field(l, "authority"), SERVICE);
            assert!(
                tokens.insert(Haproxy::field(l, "flow").to_owned()),
                "token reused"
            );
        }
    }

    // The destination: the host-name authority, restored; each client once.
    let tunnels = dest_seen.all();
    assert_eq!(tunnels.len(), usize::from(N));
    let forwarded: std::collections::BTreeSet<String> = tunnels
        .iter()
        .map(|t| {
            assert_eq!(t.authority, authority);
            assert_eq!(t.client, Some(id("istio-system", "insertion")));
            assert_eq!(t.headers.forwarded_host.as_deref(), Some(SERVICE));
            t.headers.forwarded_for.unwrap().to_string()
        })
        .collect();
    assert_eq!(forwarded, clients);
    for r in ins.started.state.recent() {
        assert_eq!(r.hops, ["a", "b"]);
        assert_eq!(r.identity, Some(id("default", "client")));
    }
    assert_eq!(ins.stat(|s| &s.next_hop), u64::from(N));
    assert_eq!(ins.stat(|s| &s.delivered), u64::from(N));
    assert_eq!(ins.stat(|s| &s.returns_refused), 0);
    ins.shutdown().await;
}

/// The built-in stand-in forwards the custom TLVs too: the 0xD0 identity arrives at the
/// egress side in the header itself (and must match the flow's). Needs no haproxy.
#[tokio::test]
async fn stand_in_proxy_forwards_the_identity_tlv() {
    let ca = DemoCa::new(TD);
    let (app, _) = recording_echo().await;
    let (dest, dest_seen) = destination(&ca, app).await;
    let (ingress, egress) = (bind().await, bind().await);
    let (signal, watch) = drain::channel();
    let stand_in = bind().await;
    let stand_in_addr = stand_in.local_addr().unwrap();
    let (_, task) = example::spawn_stand_in(
        stand_in,
        egress.local_addr().unwrap(),
        Duration::from_secs(1),
        watch,
    );
    let authority: SocketAddr = ([127, 0, 0, 1], app.port()).into();
    let ins = start_insertion(
        &ca,
        ingress,
        egress,
        vec![Hop::new("stand-in", stand_in_addr)],
        vec![Destination::ip(
            authority,
            dest.addr,
            id("default", "server"),
        )],
        Settings::default(),
    );
    let data = payload(100_000, 7);
    let target = via_insertion(ins.started.ingress, &authority.to_string(), client_addr(0));
    assert!(send_through(hbone_client(&ca, "client"), target, &data).await == data);
    let records = ins.started.state.recent();
    assert_eq!(records.len(), 1);
    assert!(records[0].identity_in_header, "0xD0 came through");
    assert_eq!(records[0].identity, Some(id("default", "client")));
    assert_eq!(dest_seen.all()[0].authority, authority.to_string());
    ins.shutdown().await;
    signal.start();
    let _ = tokio::time::timeout(WAIT, task).await;
}

// ---------------------------------------------------------------------------------------
// Loop prevention.

/// A destination table entry that points back at this proxy through an alias (a plain
/// TCP forwarder, as a load balancer or NAT would be) passes the start-up checks; without
/// the runtime rule every round would go through haproxy again. The second round is
/// refused at the ingress side, nothing spins, and the client's tunnel is closed.
#[tokio::test]
async fn loop_through_an_alias_is_refused_not_spinning() {
    let Some(bin) = haproxy_bin() else { return };
    let ca = DemoCa::new(TD);
    let (app, app_seen) = recording_echo().await;
    let (ingress, egress) = (bind().await, bind().await);
    let ingress_addr = ingress.local_addr().unwrap();
    let alias_dials = Arc::new(AtomicUsize::new(0));
    let d = alias_dials.clone();
    let alias = start(
        Server::new().drain_timeout(Duration::from_secs(1)),
        tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |_: &Metadata| {
            d.fetch_add(1, Ordering::SeqCst);
            Some(Target::from(ingress_addr))
        }),
    )
    .await;
    let hap = Haproxy::start(&bin, "a", egress.local_addr().unwrap()).await;
    // The misconfiguration: the destination's HBONE endpoint (and identity) are ours.
    let authority: SocketAddr = ([127, 0, 0, 1], app.port()).into();
    let ins = start_insertion(
        &ca,
        ingress,
        egress,
        vec![Hop::new("a", hap.addr)],
        vec![Destination::ip(
            authority,
            alias.addr,
            id("istio-system", "insertion"),
        )],
        Settings::default(),
    );

    let target = via_insertion(ins.started.ingress, &authority.to_string(), client_addr(0));
    let mut tunnel = tokio::time::timeout(WAIT, hbone_client(&ca, "client").oneshot(target))
        .await
        .expect("tunnel in time")
        .expect("the first proxy accepted");
    let _ = tunnel.write_all(b"ping").await;
    let mut back = Vec::new();
    let closed = tokio::time::timeout(WAIT, tunnel.read_to_end(&mut back)).await;
    assert!(closed.is_ok(), "the tunnel is closed, not left hanging");
    assert!(back.is_empty(), "nothing came back: {back:?}");

    // Exactly one extra round reached the ingress side, and was refused; then quiet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ins.stat(|s| &s.tunnels), 2, "original + one looped tunnel");
    assert_eq!(ins.stat(|s| &s.loops_refused), 1);
    assert_eq!(
        ins.stat(|s| &s.inserted),
        1,
        "the loop was not inserted again"
    );
    assert_eq!(alias_dials.load(Ordering::SeqCst), 1);
    assert_eq!(hap.relayed().len(), 1, "{}", hap.log());
    assert!(app_seen.0.lock().unwrap().is_empty());
    ins.shutdown().await;
}

/// The start-up checks refuse a plan that points at this proxy's own listeners.
#[tokio::test]
async fn self_references_fail_at_start_up() {
    let ca = DemoCa::new(TD);
    let (ingress, egress) = (bind().await, bind().await);
    let (i, e) = (ingress.local_addr().unwrap(), egress.local_addr().unwrap());
    let plan = |chain: Vec<Hop>, dests: Vec<Destination>| Plan {
        cert: ca.workload_cert("istio-system", "insertion"),
        roots: ca.roots(),
        ingress: i,
        egress: e,
        settings: Settings::default(),
        chain,
        destinations: dests,
    };
    let app: SocketAddr = "10.0.0.9:8080".parse().unwrap();
    let ok_dest = || Destination::ip(app, "10.0.0.9:15008".parse().unwrap(), id("default", "s"));
    let ok_hop = || Hop::new("waf", "127.0.0.1:17001".parse().unwrap());
    for (plan, want) in [
        (
            plan(
                vec![ok_hop()],
                vec![Destination::ip(app, i, id("default", "s"))],
            ),
            "hbone 127.0.0.1",
        ),
        (
            plan(vec![Hop::new("x", e)], vec![ok_dest()]),
            "own egress listener",
        ),
        (
            plan(vec![Hop::new("x", i)], vec![ok_dest()]),
            "own ingress listener",
        ),
        (
            plan(vec![ok_hop(), ok_hop()], vec![ok_dest()]),
            "repeats chain[0]",
        ),
        (plan(vec![], vec![ok_dest()]), "chain is empty"),
        (
            plan(vec![ok_hop()], vec![ok_dest(), ok_dest()]),
            "must be unique",
        ),
    ] {
        let err = plan.validate(i, e).unwrap_err();
        assert!(err.contains(want), "{err:?} should mention {want:?}");
    }
    // The same through start(): an error, not a running proxy.
    let bad = plan(vec![Hop::new("x", e)], vec![ok_dest()]);
    let (_signal, watch) = drain::channel();
    let err = example::start(bad, ingress, egress, Duration::from_secs(1), &watch)
        .err()
        .expect("refused");
    assert!(err.contains("would loop"), "{err}");
}

/// Rule 1 at the ingress side: a tunnel from this proxy's own identity, or one already
/// inserted `max_insertions` times, is refused with 401 and nothing is dialled; so is an
/// authority outside the destination table.
#[tokio::test]
async fn ingress_refuses_loops_and_unknown_destinations() {
    let ca = DemoCa::new(TD);
    let (app, _) = recording_echo().await;
    let (dest, _) = destination(&ca, app).await;
    let first_hop = bind().await; // never reached
    let (ingress, egress) = (bind().await, bind().await);
    let authority: SocketAddr = ([127, 0, 0, 1], app.port()).into();
    let ins = start_insertion(
        &ca,
        ingress,
        egress,
        vec![Hop::new("a", first_hop.local_addr().unwrap())],
        vec![Destination::ip(
            authority,
            dest.addr,
            id("default", "server"),
        )],
        Settings::default(),
    );
    let at = |authority: &str, insertions: Option<&'static str>| {
        let mut t = via_insertion(ins.started.ingress, authority, client_addr(0));
        if let Some(n) = insertions {
            let headers = t.metadata_mut().get_mut::<ConnectHeaders>().unwrap();
            headers
                .0
                .insert(INSERTIONS_HEADER, HeaderValue::from_static(n));
        }
        t
    };
    async fn status(c: hbone::Connector, t: Target) -> Option<StatusCode> {
        match tokio::time::timeout(WAIT, c.oneshot(t))
            .await
            .expect("in time")
        {
            Err(TunnelError::Refused { status, .. }) => Some(status),
            Err(e) => panic!("expected a status, got {e:?}"),
            Ok(_) => None,
        }
    }
    let client = hbone_client(&ca, "client");
    let here = authority.to_string();
    for (c, t, why) in [
        (
            client.clone(),
            at("10.9.9.9:80", None),
            "unknown destination",
        ),
        (client.clone(), at(&here, Some("1")), "already inserted"),
        (client.clone(), at(&here, Some("lots")), "malformed count"),
        (
            hbone::Connector::hbone(ca.workload_cert("istio-system", "insertion"), ca.roots())
                .unwrap(),
            at(&here, None),
            "our own identity",
        ),
    ] {
        assert_eq!(status(c, t).await, Some(StatusCode::UNAUTHORIZED), "{why}");
    }
    assert_eq!(ins.stat(|s| &s.loops_refused), 3);
    assert_eq!(ins.stat(|s| &s.unknown_destination), 1);
    assert_eq!(ins.stat(|s| &s.inserted), 0, "nothing was dialled");

    // max_insertions = 2 lets a once-inserted tunnel through once more, not twice.
    let settings = Settings {
        max_insertions: 2,
        ..Settings::default()
    };
    let (i2, e2) = (bind().await, bind().await);
    let two = start_insertion(
        &ca,
        i2,
        e2,
        vec![Hop::new("a", first_hop.local_addr().unwrap())],
        vec![Destination::ip(
            authority,
            dest.addr,
            id("default", "server"),
        )],
        settings,
    );
    let headers = |n: &'static str| {
        let mut h = http::HeaderMap::new();
        h.insert(INSERTIONS_HEADER, HeaderValue::from_static(n));
        h
    };
    let other = id("default", "client");
    assert_eq!(
        two.started.state.loop_check(&headers("1"), Some(&other)),
        Ok(1)
    );
    assert!(two
        .started
        .state
        .loop_check(&headers("2"), Some(&other))
        .is_err());
    assert!(two
        .started
        .state
        .loop_check(
            &http::HeaderMap::new(),
            Some(&id("istio-system", "insertion"))
        )
        .is_err());
    two.shutdown().await;
    ins.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The PROXY header on the wire, and what the egress side refuses. The test plays the
// inserted proxy itself.

/// Accepts one connection on `listener` and decodes its PROXY header.
async fn accept_header(listener: &TcpListener) -> (TcpStream, ProxyHeader) {
    let (mut conn, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the insertion proxy connected")
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if let Ok(Decoded::Complete { header, consumed }) = decode(&buf, &Limits::default()) {
            assert_eq!(consumed, buf.len(), "nothing after the header before 200");
            return (conn, header);
        }
        let n = tokio::time::timeout(WAIT, conn.read(&mut chunk))
            .await
            .expect("header in time")
            .unwrap();
        assert!(n > 0, "closed before a complete header");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects to the egress side from `from` and sends `header`; returns the stream.
async fn return_with(from: [u8; 4], egress: SocketAddr, header: &ProxyHeader) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let mut s = socket.connect(egress).await.unwrap();
    s.write_all(&header.encode().unwrap()).await.unwrap();
    s
}

/// Whether the egress side closes `s` without sending anything.
async fn is_refused(mut s: TcpStream) -> bool {
    let _ = s.write_all(b"x").await;
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn proxy_header_on_the_wire_and_egress_refusals() {
    let ca = DemoCa::new(TD);
    let (app, app_seen) = recording_echo().await;
    let (dest, dest_seen) = destination(&ca, app).await;
    let hop = bind().await; // the test is the inserted proxy
    let (ingress, egress) = (bind().await, bind().await);
    let authority: SocketAddr = ([127, 0, 0, 1], app.port()).into();
    let mut dst = Destination::ip(authority, dest.addr, id("default", "server"));
    dst.service = Some(SERVICE.into());
    let other: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let ins = start_insertion(
        &ca,
        ingress,
        egress,
        vec![Hop::new("test", hop.local_addr().unwrap())],
        vec![
            dst,
            Destination::ip(other, dest.addr, id("default", "server")),
        ],
        Settings::default(),
    );
    let egress = ins.started.egress;
    let client = hbone_client(&ca, "client");
    let target = || via_insertion(ins.started.ingress, &authority.to_string(), client_addr(0));

    // What the ingress side sends to the inserted proxy.
    let first = tokio::spawn(client.clone().oneshot(target()));
    let (mut from_ingress, header) = accept_header(&hop).await;
    let mut tunnel = first.await.unwrap().expect("200 once the proxy accepted");
    assert_eq!(header.source(), Some(client_addr(0)));
    assert_eq!(header.destination(), Some(authority));
    assert_eq!(
        header.identity(),
        Some("spiffe://cluster.local/ns/default/sa/client")
    );
    assert_eq!(header.service(), Some(SERVICE));
    assert_eq!(header.authority(), Some(SERVICE));
    let token = std::str::from_utf8(header.unique_id().unwrap()).unwrap();
    assert!(is_flow_token(token), "{token}");

    // Untrusted sender (127.0.0.2 is not the hop's source): closed.
    assert!(is_refused(return_with([127, 0, 0, 2], egress, &header).await).await);
    // No token, an unknown token: closed.
    let mut no_token = header.clone();
    no_token
        .tlvs
        .retain(|t| t.kind != proxystack::proxy_protocol::PP2_TYPE_UNIQUE_ID);
    assert!(is_refused(return_with([127, 0, 0, 1], egress, &no_token).await).await);
    let forged = no_token.clone().with_tlv(
        proxystack::proxy_protocol::PP2_TYPE_UNIQUE_ID,
        "00000000000000000000000000000000",
    );
    assert!(is_refused(return_with([127, 0, 0, 1], egress, &forged).await).await);

    // The real return works: the test relays between the two like a proxy would.
    let mut to_egress = return_with([127, 0, 0, 1], egress, &header).await;
    let relay = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut from_ingress, &mut to_egress).await;
    });
    tunnel.write_all(b"through the sandwich").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, tunnel.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"through the sandwich");
    let _ = tokio::time::timeout(WAIT, relay).await;

    // The same token again (a replay, or a proxy looping the flow back): closed.
    assert!(is_refused(return_with([127, 0, 0, 1], egress, &header).await).await);

    // A proxy that changes the destination is refused, even to another known one.
    let second = tokio::spawn(client.clone().oneshot(target()));
    let (_from_ingress, header2) = accept_header(&hop).await;
    let _tunnel2 = second.await.unwrap().unwrap();
    let mut moved = ProxyHeader::v2_proxy(client_addr(0), other);
    moved.tlvs = header2.tlvs.clone();
    assert!(is_refused(return_with([127, 0, 0, 1], egress, &moved).await).await);

    assert_eq!(app_seen.wait_for(1).await.len(), 1);
    assert_eq!(
        dest_seen.all().len(),
        1,
        "only the real return was delivered"
    );
    assert_eq!(ins.stat(|s| &s.delivered), 1);
    assert_eq!(ins.stat(|s| &s.returns_refused), 4);
    ins.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Config.

fn config_text(identity: &str, chain: &str, destinations: &str) -> String {
    format!(
        "{identity}
[ingress]
listen = \"127.0.0.1:15008\"
[egress]
listen = \"127.0.0.1:15009\"
{chain}
{destinations}"
    )
}

const CHAIN: &str = "[[chain]]
name = \"waf\"
address = \"127.0.0.1:17001\"
[[chain]]
name = \"ids\"
address = \"127.0.0.1:17002\"
sources = [\"127.0.0.0/8\"]";

const DESTS: &str = "[[destination]]
authority = \"reviews.default.svc.cluster.local:9080\"
address = \"10.96.0.20:9080\"
hbone = \"10.244.1.7:15008\"
identity = \"spiffe://cluster.local/ns/default/sa/reviews\"
[[destination]]
authority = \"10.244.1.8:8080\"
hbone = \"10.244.1.8:15008\"
identity = \"spiffe://cluster.local/ns/default/sa/ratings\"";

fn plan_from(text: &str) -> Result<Plan, String> {
    let config: example::Config = toml::from_str(text).map_err(|e| e.to_string())?;
    let plan = Plan::from_config(config)?;
    plan.validate(plan.ingress, plan.egress)?;
    Ok(plan)
}

/// A config with demo certificates: parses, writes usable PEM files for peers; bad
/// configs fail with a message naming the entry.
#[test]
fn config_files_and_their_errors() {
    let dir = std::env::temp_dir().join(format!("proxystack-insertion-cfg-{}", std::process::id()));
    let identity = format!("[identity]\ndemo_dir = {:?}", dir.display().to_string());
    let plan = plan_from(&config_text(&identity, CHAIN, DESTS)).unwrap();
    assert_eq!(plan.chain.len(), 2);
    assert!(plan.chain[1].sources.contains("127.9.9.9".parse().unwrap()));
    assert!(!plan.chain[0].sources.contains("127.9.9.9".parse().unwrap()));
    assert_eq!(
        plan.destinations[0].address,
        "10.96.0.20:9080".parse().unwrap()
    );
    assert_eq!(
        plan.destinations[1].address,
        "10.244.1.8:8080".parse().unwrap()
    );
    assert_eq!(
        plan.cert.spiffe_ids(),
        vec![id("istio-system", "insertion")]
    );
    // The demo identities for peers load as real files, e.g. for the hbone example.
    for sa in ["client", "server"] {
        let ck = proxystack::tls::CertKey::from_pem_files(
            &dir.join(format!("{sa}.pem")).to_string_lossy(),
            &dir.join(format!("{sa}.key")).to_string_lossy(),
        )
        .unwrap();
        assert_eq!(ck.spiffe_ids(), vec![id("default", sa)]);
    }
    assert_eq!(
        proxystack::tls::load_pem_certs(&dir.join("root.pem").to_string_lossy())
            .unwrap()
            .len(),
        1
    );
    // With those files as its identity, the same config loads too.
    let files = format!(
        "[identity]\ncert = {:?}\nkey = {:?}\nroots = {:?}",
        dir.join("server.pem").display().to_string(),
        dir.join("server.key").display().to_string(),
        dir.join("root.pem").display().to_string()
    );
    assert!(plan_from(&config_text(&files, CHAIN, DESTS)).is_ok());

    for (text, want) in [
        (
            config_text(
                &identity,
                CHAIN,
                &DESTS.replace("address = \"10.96.0.20:9080\"\n", ""),
            ),
            "needs an `address`",
        ),
        (
            config_text(
                &identity,
                CHAIN,
                &DESTS.replace("10.244.1.7:15008", "127.0.0.1:15008"),
            ),
            "own ingress listener",
        ),
        (
            config_text(&identity, &CHAIN.replace("17002", "15009"), DESTS),
            "chain[1] (ids) address 127.0.0.1:15009 is this proxy's own egress listener",
        ),
        (
            config_text(&identity, &CHAIN.replace("\"ids\"", "\"waf\""), DESTS),
            "repeats chain[0]",
        ),
        (
            config_text(&identity, CHAIN, &DESTS.replace("sa/reviews", "sa/")),
            "destination[0].identity",
        ),
        (
            config_text(
                &identity,
                &CHAIN.replace("127.0.0.0/8", "127.0.0.0/99"),
                DESTS,
            ),
            "chain[1] (ids).sources",
        ),
        (config_text(&identity, "", DESTS), "chain is empty"),
        (
            config_text(&identity, CHAIN, &format!("{DESTS}\nport = 1")),
            "unknown field",
        ),
        (
            config_text("[identity]\ncert = \"x.pem\"", CHAIN, DESTS),
            "give cert, key and roots, or only demo_dir",
        ),
    ] {
        let err = plan_from(&text).err().unwrap_or_default();
        assert!(err.contains(want), "{err:?} should mention {want:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
