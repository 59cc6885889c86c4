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

#[path = "support/mod.rs"]
mod support;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use http::{HeaderMap, HeaderValue};
use proxystack::addr::Cidr;
use proxystack::conn::{Metadata, PeerAddr};
use proxystack::connect::{lookup, ConnectHeaders, TunnelInfo, TunnelRequest};
use proxystack::drain::Watch;
use proxystack::hbone::{self, HboneHeaders, HboneTarget, Inbound};
use proxystack::identity::{PeerIdentity, SpiffeId};
use proxystack::io::BoxIo;
use proxystack::proxy_protocol::{
    Command, ProxiedAddrs, ProxiedBy, ProxyHeader, ProxyProtocolConnector, ProxyProtocolLayer,
    SendProxyHeader, TrustedSources, PP2_TYPE_AUTHORITY, PP2_TYPE_UNIQUE_ID,
};
use proxystack::serve::ServeStats;
use proxystack::tls::{load_pem_certs, CertKey};
use proxystack::{tcp, Authority, Conn, Host, Server, Target};
use rustls::RootCertStore;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tracing::{debug, info, warn};

/// The CONNECT header that counts how often a tunnel went through an insertion chain.
pub const INSERTIONS_HEADER: &str = "x-proxystack-insertions";

/// Flows waiting for their inserted proxy to dial onward, at most.
const MAX_FLOWS: usize = 100_000;

/// Egress records kept for `recent()`.
const RECENT: usize = 64;

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
// Configuration.

/// The config file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    identity: IdentityConfig,
    ingress: IngressConfig,
    egress: EgressConfig,
    #[serde(default)]
    chain: Vec<HopConfig>,
    #[serde(default)]
    destination: Vec<DestinationConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityConfig {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    roots: Option<PathBuf>,
    demo_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IngressConfig {
    listen: SocketAddr,
    #[serde(default = "yes")]
    trust_forwarded_for: bool,
    #[serde(default = "one")]
    max_insertions: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressConfig {
    listen: SocketAddr,
    #[serde(default = "sixty")]
    flow_timeout_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HopConfig {
    name: String,
    address: SocketAddr,
    #[serde(default)]
    sources: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationConfig {
    authority: String,
    address: Option<SocketAddr>,
    hbone: SocketAddr,
    identity: String,
    service: Option<String>,
}

fn yes() -> bool {
    true
}
fn one() -> u8 {
    1
}
fn sixty() -> u64 {
    60
}

/// Tunables of the insertion proxy.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PROXY source = the HBONE client's `forwarded: for=` when it sends one.
    pub trust_forwarded_for: bool,
    /// Tunnels already inserted this often are refused.
    pub max_insertions: u8,
    /// How long an inserted proxy has to dial onward with a flow token.
    pub flow_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trust_forwarded_for: true,
            max_insertions: 1,
            flow_timeout: Duration::from_secs(60),
        }
    }
}

/// One inserted proxy.
#[derive(Debug, Clone)]
pub struct Hop {
    /// For logs.
    pub name: String,
    /// Where we send its traffic (its `accept-proxy` bind).
    pub address: SocketAddr,
    /// Where its outbound connections come from: trusted for PROXY headers.
    pub sources: TrustedSources,
}

impl Hop {
    /// A proxy whose outbound connections come from its own IP address.
    pub fn new(name: &str, address: SocketAddr) -> Self {
        Self {
            name: name.to_owned(),
            address,
            sources: [Cidr::host(address.ip())].into_iter().collect(),
        }
    }
}

/// A destination the ingress side accepts, and how the egress side reaches it.
#[derive(Debug, Clone)]
pub struct Destination {
    /// The `:authority` clients ask for (and that the destination gets).
    pub authority: Authority,
    /// The PROXY destination address: the authority if it is an IP, else its VIP.
    pub address: SocketAddr,
    /// Its HBONE endpoint.
    pub hbone: SocketAddr,
    /// The identity its certificate must carry.
    pub identity: SpiffeId,
    /// The service host name for `0xD1`; defaults to the authority's host name.
    pub service: Option<String>,
}

impl Destination {
    /// A destination for an IP authority.
    pub fn ip(authority: SocketAddr, hbone: SocketAddr, identity: SpiffeId) -> Self {
        Self {
            authority: authority.into(),
            address: authority,
            hbone,
            identity,
            service: None,
        }
    }

    fn service_name(&self) -> Option<String> {
        self.service.clone().or(match self.authority.host() {
            Host::Name(name) => Some(name.clone()),
            Host::Ip(_) => None,
        })
    }
}

/// Everything the proxy needs, resolved.
pub struct Plan {
    /// Our certificate (its SPIFFE ID is our identity).
    pub cert: CertKey,
    /// The mesh roots.
    pub roots: Arc<RootCertStore>,
    /// Ingress (HBONE) listen address.
    pub ingress: SocketAddr,
    /// Egress (PROXY v2 from the inserted proxies) listen address.
    pub egress: SocketAddr,
    /// Tunables.
    pub settings: Settings,
    /// The inserted proxies, in order.
    pub chain: Vec<Hop>,
    /// The destination table.
    pub destinations: Vec<Destination>,
}

impl Plan {
    /// Resolves a config file: loads (or, with `demo_dir`, makes) the identity and parses
    /// every entry. Errors name the entry.
    pub fn from_config(config: Config) -> Result<Plan, String> {
        let (cert, roots) = load_identity(&config.identity)?;
        let mut chain = Vec::new();
        for (i, h) in config.chain.into_iter().enumerate() {
            let mut hop = Hop::new(&h.name, h.address);
            if !h.sources.is_empty() {
                hop.sources = TrustedSources::parse(&h.sources)
                    .map_err(|e| format!("chain[{i}] ({}).sources: {e}", h.name))?;
            }
            chain.push(hop);
        }
        let mut destinations = Vec::new();
        for (i, d) in config.destination.into_iter().enumerate() {
            let at = |field: &str| format!("destination[{i}].{field} ({:?})", d.authority);
            let authority =
                Authority::parse(&d.authority).map_err(|e| format!("{}: {e}", at("authority")))?;
            let address = match (d.address, authority.socket_addr()) {
                (Some(a), _) | (None, Some(a)) => a,
                (None, None) => {
                    return Err(format!(
                        "{}: a host-name authority needs an `address` (its VIP) for the \
                         PROXY header",
                        at("address")
                    ))
                }
            };
            let identity =
                SpiffeId::parse(&d.identity).map_err(|e| format!("{}: {e}", at("identity")))?;
            destinations.push(Destination {
                authority,
                address,
                hbone: d.hbone,
                identity,
                service: d.service,
            });
        }
        Ok(Plan {
            cert,
            roots,
            ingress: config.ingress.listen,
            egress: config.egress.listen,
            settings: Settings {
                trust_forwarded_for: config.ingress.trust_forwarded_for,
                max_insertions: config.ingress.max_insertions,
                flow_timeout: Duration::from_secs(config.egress.flow_timeout_secs),
            },
            chain,
            destinations,
        })
    }

    /// Checks the plan against the addresses actually bound: rule 3 of the loop
    /// prevention, and what would make the tables ambiguous.
    pub fn validate(&self, ingress: SocketAddr, egress: SocketAddr) -> Result<(), String> {
        if self.chain.is_empty() {
            return Err("the insertion chain is empty: add at least one [[chain]] proxy".into());
        }
        if self.destinations.is_empty() {
            return Err("no [[destination]]: the ingress side would refuse everything".into());
        }
        if self.settings.max_insertions == 0 {
            return Err("ingress.max_insertions must be at least 1".into());
        }
        if self.cert.spiffe_ids().is_empty() {
            return Err("the certificate has no SPIFFE URI SAN: no identity to use".into());
        }
        let ours = |addr: SocketAddr| {
            [("ingress", ingress), ("egress", egress)]
                .into_iter()
                .find(|(_, l)| same_listener(addr, *l))
                .map(|(name, _)| name)
        };
        for (i, hop) in self.chain.iter().enumerate() {
            if let Some(which) = ours(hop.address) {
                return Err(format!(
                    "chain[{i}] ({}) address {} is this proxy's own {which} listener: the \
                     traffic would loop",
                    hop.name, hop.address
                ));
            }
            if let Some(j) = self.chain[..i]
                .iter()
                .position(|h| h.address == hop.address || h.name == hop.name)
            {
                return Err(format!(
                    "chain[{i}] ({}) repeats chain[{j}] ({}): a proxy may appear once",
                    hop.name, self.chain[j].name
                ));
            }
        }
        for (i, d) in self.destinations.iter().enumerate() {
            if let Some(which) = ours(d.hbone) {
                return Err(format!(
                    "destination[{i}] ({}) hbone {} is this proxy's own {which} listener: the \
                     traffic would loop",
                    d.authority, d.hbone
                ));
            }
            if let Some(j) = self.destinations[..i]
                .iter()
                .position(|o| o.authority == d.authority || same_addr(o.address, d.address))
            {
                return Err(format!(
                    "destination[{i}] ({}) has the authority or address of destination[{j}] \
                     ({}): the egress side routes on the address, so both must be unique",
                    d.authority, self.destinations[j].authority
                ));
            }
        }
        Ok(())
    }
}

/// Whether dialling `addr` reaches the listener bound at `listener`, as far as can be
/// told without knowing the host's addresses (the runtime checks cover the rest).
fn same_listener(addr: SocketAddr, listener: SocketAddr) -> bool {
    same_addr(addr, listener)
        || (addr.port() == listener.port()
            && listener.ip().is_unspecified()
            && (addr.ip().is_loopback() || addr.ip().is_unspecified()))
}

fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

fn load_identity(files: &IdentityConfig) -> Result<(CertKey, Arc<RootCertStore>), String> {
    match (&files.cert, &files.key, &files.roots, &files.demo_dir) {
        (Some(cert), Some(key), Some(roots), None) => {
            let certkey = CertKey::from_pem_files(&cert.to_string_lossy(), &key.to_string_lossy())
                .map_err(|e| format!("identity.cert/key: {e}"))?;
            let mut store = RootCertStore::empty();
            for root in load_pem_certs(&roots.to_string_lossy())
                .map_err(|e| format!("identity.roots: {e}"))?
            {
                store
                    .add(root)
                    .map_err(|e| format!("identity.roots: bad root in {}: {e}", roots.display()))?;
            }
            Ok((certkey, Arc::new(store)))
        }
        (None, None, None, Some(dir)) => {
            let ca = proxystack::tls::demo::DemoCa::new("cluster.local");
            write_demo_identities(&ca, dir)
                .map_err(|e| format!("identity.demo_dir {}: {e}", dir.display()))?;
            Ok((ca.workload_cert("istio-system", "insertion"), ca.roots()))
        }
        _ => Err("identity: give cert, key and roots, or only demo_dir".into()),
    }
}

/// Writes the demo CA's root and two workload identities (`default/client`,
/// `default/server`) as PEM files, for HBONE peers in other processes (e.g. the `hbone`
/// example's `--config`).
pub fn write_demo_identities(
    ca: &proxystack::tls::demo::DemoCa,
    dir: &Path,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("root.pem"), ca.root_pem())?;
    for sa in ["client", "server"] {
        let ck = ca.workload_cert("default", sa);
        let chain: String = ck.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
        std::fs::write(dir.join(format!("{sa}.pem")), chain)?;
        std::fs::write(
            dir.join(format!("{sa}.key")),
            pem("PRIVATE KEY", ck.key.secret_der()),
        )?;
    }
    Ok(())
}

/// PEM-encodes `der` (RFC 7468): base64 in 64-character lines.
fn pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = Vec::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            text.push(if i <= chunk.len() {
                B64[((n >> (18 - 6 * i)) & 63) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

// ---------------------------------------------------------------------------------------
// Flows: what the ingress side knew, for the egress side.

/// What the ingress side learnt about a tunnel, for the egress side.
#[derive(Debug, Clone)]
struct Flow {
    client: SocketAddr,
    destination: usize,
    identity: Option<SpiffeId>,
    service: Option<String>,
    /// Index of the inserted proxy the flow was last sent to.
    hop: usize,
    /// How often the tunnel had been inserted before (from the CONNECT header).
    insertions: u8,
}

/// Single-use flow tokens → flows, with expiry and a size bound.
struct FlowTable {
    ttl: Duration,
    max: usize,
    inner: Mutex<FlowMap>,
}

struct FlowMap {
    flows: HashMap<String, (Flow, Instant)>,
    swept: Instant,
}

impl FlowTable {
    fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            inner: Mutex::new(FlowMap {
                flows: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlowMap> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `flow` under a fresh token; `None` when the table is full.
    fn mint(&self, flow: Flow) -> Option<String> {
        let now = Instant::now();
        let mut map = self.lock();
        if now.duration_since(map.swept) >= Duration::from_secs(1) || map.flows.len() >= self.max {
            map.flows.retain(|_, (_, expires)| *expires > now);
            map.swept = now;
        }
        if map.flows.len() >= self.max {
            return None;
        }
        let token = new_token();
        map.flows.insert(token.clone(), (flow, now + self.ttl));
        Some(token)
    }

    /// Removes and returns the flow of `token`, unless unknown or expired.
    fn take(&self, token: &str) -> Option<Flow> {
        let (flow, expires) = self.lock().flows.remove(token)?;
        (expires > Instant::now()).then_some(flow)
    }

    fn len(&self) -> usize {
        self.lock().flows.len()
    }
}

/// 128 unpredictable bits as 32 hex digits: SipHash under the process's random keys
/// (`RandomState`) of a counter. Not a CSPRNG, but nothing outside this process can
/// predict it, which is all a token needs.
fn new_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let word = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u64(salt);
        h.finish()
    };
    format!("{:016x}{:016x}", word(1), word(2))
}

// ---------------------------------------------------------------------------------------
// The insertion proxy.

/// Counters, also on `/metrics`.
#[derive(Debug, Default)]
pub struct InsertionStats {
    /// CONNECT requests seen by the ingress side.
    pub tunnels: AtomicU64,
    /// Tunnels handed to the first inserted proxy (flows created).
    pub inserted: AtomicU64,
    /// Tunnels refused as loops (rule 1).
    pub loops_refused: AtomicU64,
    /// Tunnels refused for an authority not in the destination table.
    pub unknown_destination: AtomicU64,
    /// Connections accepted back from an inserted proxy with a valid flow.
    pub returned: AtomicU64,
    /// Connections from inserted proxies refused (no/unknown/used token, wrong sender,
    /// changed destination, contradicting identity).
    pub returns_refused: AtomicU64,
    /// Flows sent on to the next inserted proxy.
    pub next_hop: AtomicU64,
    /// Flows re-encapsulated in HBONE to their destination.
    pub delivered: AtomicU64,
}

/// What the egress side sent to a destination, for logs and tests.
#[derive(Debug, Clone)]
pub struct EgressRecord {
    /// The original client.
    pub client: SocketAddr,
    /// The `:authority` sent to the destination.
    pub authority: String,
    /// The client's identity (the `0xD0` the ingress side sent).
    pub identity: Option<SpiffeId>,
    /// Whether the last inserted proxy also forwarded the `0xD0` TLV itself.
    pub identity_in_header: bool,
    /// The service (`0xD1`).
    pub service: Option<String>,
    /// The inserted proxies the flow went through, in order.
    pub hops: Vec<String>,
}

/// The state shared by the ingress and egress sides.
pub struct Insertion {
    own: SpiffeId,
    settings: Settings,
    chain: Vec<Hop>,
    destinations: Vec<Destination>,
    flows: FlowTable,
    /// Counters.
    pub stats: InsertionStats,
    recent: Mutex<VecDeque<EgressRecord>>,
}

/// Where the egress side sends a returned connection.
enum Route {
    NextHop(Target),
    Destination(Target),
}

/// Target metadata: the upstream [`Route`] chose.
#[derive(Clone)]
struct Upstream(Target);

impl Insertion {
    fn new(own: SpiffeId, plan: &Plan) -> Self {
        Self {
            own,
            settings: plan.settings.clone(),
            chain: plan.chain.clone(),
            destinations: plan.destinations.clone(),
            flows: FlowTable::new(plan.settings.flow_timeout, MAX_FLOWS),
            stats: InsertionStats::default(),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// This proxy's identity.
    pub fn identity(&self) -> &SpiffeId {
        &self.own
    }

    /// The last egress records, oldest first.
    pub fn recent(&self) -> Vec<EgressRecord> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// Flows waiting for an inserted proxy.
    pub fn pending_flows(&self) -> usize {
        self.flows.len()
    }

    /// Rule 1: `Ok(insertions so far)` if a tunnel may be inserted, else why not.
    pub fn loop_check(&self, headers: &HeaderMap, client: Option<&SpiffeId>) -> Result<u8, String> {
        if client == Some(&self.own) {
            return Err(format!(
                "the client is this proxy itself ({}): the tunnel came back from our egress side",
                self.own
            ));
        }
        let count = match headers.get(INSERTIONS_HEADER) {
            None => 0,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u8>().ok())
                .ok_or_else(|| format!("malformed {INSERTIONS_HEADER} header"))?,
        };
        if count >= self.settings.max_insertions {
            return Err(format!(
                "the tunnel already went through {count} insertion chain(s) (max_insertions = {})",
                self.settings.max_insertions
            ));
        }
        Ok(count)
    }

    /// The ingress policy: loops and unknown destinations are refused (401).
    fn admit(&self, req: &TunnelRequest<'_>) -> bool {
        self.stats.tunnels.fetch_add(1, Ordering::Relaxed);
        let client = lookup::<PeerIdentity>(req.connection).map(|p| &p.0);
        if let Err(why) = self.loop_check(req.headers, client) {
            self.stats.loops_refused.fetch_add(1, Ordering::Relaxed);
            warn!(authority = %req.authority, "insertion loop refused: {why}");
            return false;
        }
        if self.destination_for(req.authority).is_none() {
            self.stats
                .unknown_destination
                .fetch_add(1, Ordering::Relaxed);
            info!(authority = %req.authority, "refused: not in the destination table");
            return false;
        }
        true
    }

    fn destination_for(&self, authority: &Authority) -> Option<usize> {
        self.destinations.iter().position(|d| {
            match (d.authority.canonical_ip(), authority.canonical_ip()) {
                (Some(a), Some(b)) => a == b && d.authority.port() == authority.port(),
                _ => d.authority == *authority,
            }
        })
    }

    /// The ingress relay's upstream: the first inserted proxy, with a PROXY header that
    /// describes the tunnel.
    fn ingress_target(&self, m: &Metadata) -> Option<Target> {
        let info = m.get::<TunnelInfo>()?;
        let destination = self.destination_for(&info.authority)?;
        let headers = m.get::<HboneHeaders>();
        let forwarded = headers
            .and_then(|h| h.forwarded_for)
            .filter(|_| self.settings.trust_forwarded_for);
        let client = forwarded.or_else(|| lookup::<PeerAddr>(m).map(|p| p.0))?;
        let identity = lookup::<PeerIdentity>(m).map(|p| p.0.clone());
        let insertions = self.loop_check(&info.headers, identity.as_ref()).ok()?;
        let service = self.destinations[destination]
            .service_name()
            .or_else(|| headers.and_then(|h| h.forwarded_host.clone()));
        let flow = Flow {
            client,
            destination,
            identity,
            service,
            hop: 0,
            insertions,
        };
        let target = self.hop_target(flow)?;
        self.stats.inserted.fetch_add(1, Ordering::Relaxed);
        Some(target)
    }

    /// The connection to inserted proxy `flow.hop`, under a fresh flow token.
    fn hop_target(&self, flow: Flow) -> Option<Target> {
        let hop = self.chain.get(flow.hop)?;
        let dest = self.destinations.get(flow.destination)?;
        let mut send = SendProxyHeader::proxy(flow.client, dest.address);
        if let Some(id) = &flow.identity {
            send = send.identity(id);
        }
        if let Some(service) = &flow.service {
            send = send
                .service(service)
                .tlv(PP2_TYPE_AUTHORITY, service.clone());
        }
        let (client, name) = (flow.client, hop.name.clone());
        let Some(token) = self.flows.mint(flow) else {
            warn!("flow table full; refusing");
            return None;
        };
        debug!(%client, hop = %name, flow = %token, "to inserted proxy");
        Some(Target::from(hop.address).with(send.tlv(PP2_TYPE_UNIQUE_ID, token)))
    }

    /// The egress side's decision for a connection back from an inserted proxy.
    fn route_return(&self, m: &Metadata) -> Result<Route, String> {
        let header = m.get::<ProxyHeader>().ok_or("no PROXY header")?;
        if header.command == Command::Local {
            return Err("PROXY LOCAL (a health check): no flow to continue".into());
        }
        let token = header
            .unique_id()
            .and_then(|t| std::str::from_utf8(t).ok())
            .ok_or(
                "no flow token (UNIQUE_ID TLV): the inserted proxy must forward it \
                 (haproxy: unique-id-format %[fc_pp_unique_id], proxy-v2-options unique-id)",
            )?;
        let flow = self
            .flows
            .take(token)
            .ok_or_else(|| format!("flow token {token:?} is unknown, expired or already used"))?;
        let hop = &self.chain[flow.hop];
        let sender = m.get::<ProxiedBy>().map(|p| p.0);
        if !sender.is_some_and(|s| hop.sources.contains(s.ip())) {
            return Err(format!(
                "flow sent to {} came back from {sender:?}, outside its sources",
                hop.name
            ));
        }
        // The PROXY destination address is what routes; the flow must agree with it.
        let addrs = m
            .get::<ProxiedAddrs>()
            .ok_or("PROXY header without addresses")?;
        let by_address = self
            .destinations
            .iter()
            .position(|d| same_addr(d.address, addrs.destination))
            .ok_or_else(|| {
                format!(
                    "PROXY destination {} (from {}) is not in the destination table",
                    addrs.destination, hop.name
                )
            })?;
        if by_address != flow.destination {
            return Err(format!(
                "{} changed the destination from {} to {}",
                hop.name, self.destinations[flow.destination].address, addrs.destination
            ));
        }
        let claimed = m.get::<PeerIdentity>().map(|p| &p.0);
        if claimed.is_some() && claimed != flow.identity.as_ref() {
            return Err(format!(
                "{} sent identity {claimed:?}, the flow has {:?}",
                hop.name, flow.identity
            ));
        }
        if !same_addr(addrs.source, flow.client) {
            debug!(hop = %hop.name, source = %addrs.source, client = %flow.client,
                "inserted proxy reported another client address; keeping ours");
        }
        if flow.hop + 1 < self.chain.len() {
            let next = Flow {
                hop: flow.hop + 1,
                ..flow
            };
            self.stats.next_hop.fetch_add(1, Ordering::Relaxed);
            return self
                .hop_target(next)
                .map(Route::NextHop)
                .ok_or_else(|| "flow table full".into());
        }
        Ok(Route::Destination(
            self.destination_target(flow, claimed.is_some()),
        ))
    }

    /// HBONE to the destination, with our identity and the insertion count.
    fn destination_target(&self, flow: Flow, identity_in_header: bool) -> Target {
        let dest = &self.destinations[flow.destination];
        let mut target =
            HboneTarget::new(dest.hbone, dest.authority.clone(), [dest.identity.clone()])
                .source_identity(self.own.clone())
                .forwarded_for(flow.client);
        if let Some(service) = &flow.service {
            target = target.forwarded_host(service.clone());
        }
        let mut target = target.into_target();
        if let Some(headers) = target.metadata_mut().get_mut::<ConnectHeaders>() {
            headers.0.insert(
                INSERTIONS_HEADER,
                HeaderValue::from(u16::from(flow.insertions) + 1),
            );
        }
        let record = EgressRecord {
            client: flow.client,
            authority: dest.authority.to_string(),
            identity: flow.identity,
            identity_in_header,
            service: flow.service,
            hops: self.chain.iter().map(|h| h.name.clone()).collect(),
        };
        info!(
            client = %record.client,
            identity = record.identity.as_ref().map_or("-", |i| i.as_str()),
            authority = %record.authority,
            hops = ?record.hops,
            "inserted flow re-encapsulated to its destination"
        );
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(record);
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        target
    }

    /// The counters in Prometheus text format.
    pub fn metrics(&self) -> String {
        let s = &self.stats;
        let mut out = String::new();
        for (name, value) in [
            ("tunnels", &s.tunnels),
            ("inserted", &s.inserted),
            ("loops_refused", &s.loops_refused),
            ("unknown_destination", &s.unknown_destination),
            ("returned", &s.returned),
            ("returns_refused", &s.returns_refused),
            ("next_hop", &s.next_hop),
            ("delivered", &s.delivered),
        ] {
            out.push_str(&format!(
                "# TYPE insertion_{name}_total counter\ninsertion_{name}_total {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        out.push_str(&format!(
            "# TYPE insertion_pending_flows gauge\ninsertion_pending_flows {}\n",
            self.flows.len()
        ));
        out
    }
}

fn chosen_upstream(m: &Metadata) -> Option<Target> {
    m.get::<Upstream>().map(|u| u.0.clone())
}

/// The running insertion proxy.
pub struct Started {
    /// Shared state and counters.
    pub state: Arc<Insertion>,
    /// The bound ingress address.
    pub ingress: SocketAddr,
    /// The bound egress address.
    pub egress: SocketAddr,
    /// The two accept loops.
    pub servers: Vec<JoinHandle<std::io::Result<()>>>,
    /// Their counters, for `/metrics`.
    pub stats: Vec<(String, Arc<ServeStats>)>,
}

/// Serves the ingress side on `ingress` and the egress side on `egress` until `watch`
/// drains. Fails (naming the problem) on an invalid plan.
pub fn start(
    plan: Plan,
    ingress: TcpListener,
    egress: TcpListener,
    drain: Duration,
    watch: &Watch,
) -> Result<Started, String> {
    let ingress_addr = ingress.local_addr().map_err(|e| e.to_string())?;
    let egress_addr = egress.local_addr().map_err(|e| e.to_string())?;
    plan.validate(ingress_addr, egress_addr)?;
    let own = plan
        .cert
        .spiffe_ids()
        .into_iter()
        .next()
        .ok_or("the certificate has no SPIFFE ID")?;
    let state = Arc::new(Insertion::new(own, &plan));

    // Ingress: HBONE in; each tunnel goes to the first inserted proxy under PROXY v2.
    let s = state.clone();
    let to_first = tcp::Relay::new(ProxyProtocolConnector::new(tcp::TcpConnector::new()))
        .upstream(move |m: &Metadata| s.ingress_target(m));
    let s = state.clone();
    let inbound = Inbound::new(plan.cert.clone(), plan.roots.clone())
        // Destinations are other hosts: the authority is checked against the table instead.
        .check_local_ip(false)
        .allow(move |req| s.admit(req))
        .service(to_first)
        .map_err(|e| format!("ingress TLS: {e}"))?;

    // Egress: PROXY v2 from the inserted proxies only; on to the next one, or HBONE out.
    let to_next = tcp::Relay::new(ProxyProtocolConnector::new(tcp::TcpConnector::new()))
        .upstream(chosen_upstream);
    let hbone = hbone::Connector::hbone(plan.cert.clone(), plan.roots.clone())
        .map_err(|e| format!("egress TLS: {e}"))?;
    let to_destination = tcp::Relay::new(hbone).upstream(chosen_upstream);
    let s = state.clone();
    let route = service_fn(move |mut conn: Conn<BoxIo>| {
        let (s, to_next, to_destination) = (s.clone(), to_next.clone(), to_destination.clone());
        async move {
            match s.route_return(conn.metadata()) {
                Ok(route) => {
                    s.stats.returned.fetch_add(1, Ordering::Relaxed);
                    let result = match route {
                        Route::NextHop(t) => {
                            conn.insert(Upstream(t));
                            to_next.oneshot(conn).await
                        }
                        Route::Destination(t) => {
                            conn.insert(Upstream(t));
                            to_destination.oneshot(conn).await
                        }
                    };
                    result.map_err(proxystack::BoxError::from)
                }
                Err(why) => {
                    s.stats.returns_refused.fetch_add(1, Ordering::Relaxed);
                    warn!("connection from an inserted proxy refused: {why}");
                    Err(why.into())
                }
            }
        }
    });
    let trusted: TrustedSources = plan
        .chain
        .iter()
        .flat_map(|h| h.sources.networks().iter().copied())
        .collect();
    let outbound = ServiceBuilder::new()
        .layer(ProxyProtocolLayer::required().trusted_sources(trusted))
        .service(route);

    let mut servers = Vec::new();
    let mut stats = Vec::new();
    let server = Server::new().drain_timeout(drain);
    stats.push(("insertion_ingress".to_string(), server.stats()));
    let w = watch.clone();
    servers.push(tokio::spawn(async move {
        server.serve(ingress, inbound, w).await
    }));
    let server = Server::new().drain_timeout(drain);
    stats.push(("insertion_egress".to_string(), server.stats()));
    let w = watch.clone();
    servers.push(tokio::spawn(async move {
        server.serve(egress, outbound, w).await
    }));
    Ok(Started {
        state,
        ingress: ingress_addr,
        egress: egress_addr,
        servers,
        stats,
    })
}

// ---------------------------------------------------------------------------------------
// Inserted proxies for the demo (and the tests): haproxy, or a built-in stand-in.

/// The haproxy 2.6 config of one inserted proxy: `mode tcp`, PROXY v2 in on `listen`,
/// PROXY v2 out to `upstream` (our egress side), forwarding the addresses, the
/// `AUTHORITY` TLV and the flow token (`UNIQUE_ID`). `log` is a haproxy log target
/// (`stderr`, `stdout`); each connection logs one line `<name> client=… destination=…
/// authority=… flow=…` as soon as it is relayed.
pub fn haproxy_config(name: &str, listen: SocketAddr, upstream: SocketAddr, log: &str) -> String {
    format!(
        "global
    maxconn 1000
    log {log} format raw local0
defaults
    log global
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
    unique-id-format %[fc_pp_unique_id]
frontend {name}
    bind {listen} accept-proxy
    option logasap
    log-format \"{name} client=%ci:%cp destination=%fi:%fp authority=%[fc_pp_authority] flow=%ID\"
    default_backend {name}_out
backend {name}_out
    server insertion {upstream} send-proxy-v2 proxy-v2-options authority,unique-id
"
    )
}

/// The haproxy binary, if installed.
pub fn find_haproxy() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// A haproxy child process with its config directory; killed (only this child, by its
/// handle) and cleaned up on drop.
pub struct HaproxyChild {
    child: std::process::Child,
    dir: PathBuf,
}

impl HaproxyChild {
    /// Starts `bin` with `config`; its stdout and stderr go to `output`.
    pub fn spawn(
        bin: &Path,
        name: &str,
        config: &str,
        output: std::process::Stdio,
        errors: std::process::Stdio,
    ) -> std::io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "proxystack-insertion-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config)?;
        let child = std::process::Command::new(bin)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(std::process::Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn();
        match child {
            Ok(child) => Ok(Self { child, dir }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// The directory holding the config (and whatever the caller puts there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits (bounded) until something listens on `addr`; fails if haproxy exits.
    pub async fn wait_ready(&mut self, addr: SocketAddr, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("haproxy exited with {status}"));
            }
            if is_listening(addr).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("haproxy not listening on {addr} after {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether a socket listens on `addr`. On Linux this reads `/proc/net/tcp{,6}` instead of
/// connecting: a probe connection without a PROXY header would make haproxy log an error.
async fn is_listening(addr: SocketAddr) -> bool {
    let port = format!(":{:04X} ", addr.port());
    let mut found_table = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        found_table = true;
        // Fields: sl local_address rem_address st …; st 0A is LISTEN.
        if text.lines().any(|l| {
            let mut f = l.split_whitespace().skip(1);
            let (local, st) = (f.next().unwrap_or_default(), f.nth(1).unwrap_or_default());
            format!("{local} ").ends_with(&port) && st == "0A"
        }) {
            return true;
        }
    }
    !found_table && tokio::net::TcpStream::connect(addr).await.is_ok()
}

impl Drop for HaproxyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A built-in stand-in for an inserted proxy: accepts PROXY v2 from loopback and relays
/// each connection to `upstream` under a PROXY v2 header of its own that repeats the
/// addresses and the `0xD0`, `0xD1`, `AUTHORITY` and `UNIQUE_ID` TLVs (what haproxy does
/// with `accept-proxy` + `send-proxy-v2`, plus the custom TLVs haproxy 2.6 drops).
pub fn spawn_stand_in(
    listener: TcpListener,
    upstream: SocketAddr,
    drain: Duration,
    watch: Watch,
) -> (Arc<ServeStats>, JoinHandle<std::io::Result<()>>) {
    let relay = tcp::Relay::new(ProxyProtocolConnector::new(tcp::TcpConnector::new())).upstream(
        move |m: &Metadata| {
            let header = m.get::<ProxyHeader>()?;
            if header.command != Command::Proxy {
                return None;
            }
            // Addresses from the header, and 0xD0 (recorded as PeerIdentity by the layer).
            let mut send = SendProxyHeader::from_inbound(m)?;
            if let Some(service) = header.service() {
                send = send.service(service);
            }
            for kind in [PP2_TYPE_AUTHORITY, PP2_TYPE_UNIQUE_ID] {
                if let Some(value) = header.tlv(kind) {
                    send = send.tlv(kind, value.clone());
                }
            }
            Some(Target::from(upstream).with(send))
        },
    );
    let svc = ServiceBuilder::new()
        .layer(ProxyProtocolLayer::required().trusted(["127.0.0.0/8", "::1/128"]))
        .service(relay);
    let server = Server::new().drain_timeout(drain);
    let stats = server.stats();
    (
        stats,
        tokio::spawn(async move { server.serve(listener, svc, watch).await }),
    )
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
        addrs.push(support::admin_with(admin, stats, Arc::new(move || state.metrics())).await);
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
