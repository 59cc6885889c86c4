//! The config file and the resolved plan: settings, inserted proxies, destinations, and
//! the start-up checks that refuse obvious loops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proxystack::addr::Cidr;
use proxystack::identity::SpiffeId;
use proxystack::proxy_protocol::TrustedSources;
use proxystack::tls::{load_pem_certs, CertKey};
use proxystack::{Authority, Host};
use rustls::RootCertStore;
use serde::Deserialize;

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

    pub(super) fn service_name(&self) -> Option<String> {
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

pub(super) fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
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
        std::fs::write(dir.join(format!("{sa}.pem")), ck.chain_pem())?;
        std::fs::write(dir.join(format!("{sa}.key")), ck.key_pem())?;
    }
    Ok(())
}
