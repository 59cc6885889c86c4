//! The insertion proxy: the ingress side (HBONE in, PROXY v2 out to the first inserted
//! proxy) and the egress side (PROXY v2 in, the next proxy or HBONE out).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
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
use proxystack::{tcp, Authority, Conn, Server, Target};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tracing::{debug, info, warn};

use super::config::{same_addr, Destination, Hop, Plan, Settings};
use super::flows::{Flow, FlowTable};

/// The CONNECT header that counts how often a tunnel went through an insertion chain.
pub const INSERTIONS_HEADER: &str = "x-proxystack-insertions";

/// Flows waiting for their inserted proxy to dial onward, at most.
const MAX_FLOWS: usize = 100_000;

/// Egress records kept for `recent()`.
const RECENT: usize = 64;

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
