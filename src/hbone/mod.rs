//! Istio ambient's HBONE, composed from the levels below: TLS 1.3 with SPIFFE mutual
//! authentication, ALPN `h2`, HTTP/2, one CONNECT stream per application connection, on
//! port 15008. Wire conventions (headers, settings, status codes) follow ztunnel's.
//!
//! * [`Inbound`] (as a layer: [`InboundLayer`]) = [`TerminateLayer`] (client certificate
//!   required, same trust domain) + [`ConnectTerminate`]
//!   (HTTP/2 only, only CONNECT → else 400, authority checks → 400, policy → 401,
//!   illegal ports → 503, `200` only after the inner service connected). Tunnels carry
//!   [`HboneHeaders`] parsed from `forwarded` (`for=` client, `host=` service),
//!   `baggage`, `traceparent` and `x-forwarded-network` (the client's network, sent on the
//!   inner CONNECT of double HBONE through a network gateway; see [`HboneTarget::network`]).
//!   A hop in the middle passes them on with [`HboneTarget::continue_from`]. The fixed
//!   [`ILLEGAL_PORTS`] cover ztunnel's well-known ports only; to refuse *every* listener
//!   of the process (any port, the admin endpoint included) on every address of the host,
//!   let the inner service dial with a `TcpConnector` that knows them
//!   ([`TcpConnector::own_listeners`] with a [`tcp::OwnListeners`](crate::tcp::OwnListeners)
//!   where each listener is registered): such a tunnel gets 503 too, nothing is dialled.
//! * [`Connector`] = [`H2ConnectPool`] over
//!   [`TlsConnector`] over [`TcpConnector`]: no SNI, TLS 1.3,
//!   AES-GCM, ALPN `h2`, SAN pinning, pooled per (source identity, destination identities,
//!   next hop). [`HboneTarget`] builds the target: next hop, `:authority`, identities and
//!   the request headers ztunnel sends.
//!
//! On the wire, unlike ztunnel (#1483), a reset is not turned into a FIN: an application's
//! TCP reset travels as `RST_STREAM(CONNECT_ERROR)` and resets the application connection
//! on the other side (see [`connect`](crate::connect)); `END_STREAM` ↔ FIN as usual, and a
//! received `RST_STREAM(CANCEL)` is read as a FIN, as ztunnel sends it.
//!
//! Certificates rotate without a restart with [`Inbound::live`] and
//! [`Connector::hbone_live`] (a [`LiveIdentity`] as the source): see
//! [`tls::LiveIdentity`] for what changes when.
//!
//! Double HBONE is the same types nested: an unpooled HBONE connector whose TCP layer is
//! replaced by a pooled HBONE connector to the gateway ([`Connector::through`]).
//!
//! Not here: xDS, workload discovery, RBAC language; those are inputs (closures) here.

mod headers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use rustls::pki_types::CertificateRevocationListDer;
use rustls::RootCertStore;
use tower::{Layer, Service, ServiceExt};

pub use headers::{HboneHeaders, TraceParent};

use crate::addr::Authority;
use crate::conn::{Conn, LocalAddr};
use crate::connect::{
    ConnectAuthority, ConnectHeaders, ConnectTerminate, ConnectTerminateLayer, Decision,
    H2ConnectPool, PoolKey, TunnelInfo, TunnelRequest,
};
use crate::identity::SpiffeId;
use crate::io::BoxIo;
use crate::tcp::TcpConnector;
use crate::tls::{
    self, CertKey, ClientAuth, ExpectedIdentities, LiveIdentity, ServerConfigBuilder, SniMode,
    TerminateLayer, TerminateService, TlsConfigError, TlsConnector,
};
use crate::{H2Config, Target};

/// The HBONE port.
pub const PORT: u16 = 15008;

/// Ports a tunnel may never target: ztunnel's own capture and HBONE ports (a tunnel to
/// them would loop through the proxy).
pub const ILLEGAL_PORTS: [u16; 4] = [15001, 15006, 15008, 15080];

type PolicyFn = Arc<dyn Fn(&TunnelRequest<'_>) -> bool + Send + Sync>;

/// Builds the HBONE server side (the listener on port 15008): configure it, then turn it
/// into an [`InboundLayer`] with [`into_layer`](Self::into_layer) (or call
/// [`service`](Self::service) for the service directly).
///
/// The CONNECT terminator's knobs that HBONE leaves open (HTTP/2 settings, nesting depth,
/// admission timeout) are set here; HBONE fixes the rest (HTTP/2 only, `400` for anything
/// but CONNECT, its own policy, see [`allow`](Self::allow)).
///
/// ```
/// # #[cfg(feature = "demo-certs")] {
/// use proxystack::conn::Metadata;
/// use proxystack::hbone::Inbound;
/// use proxystack::tls::demo::DemoCa;
/// use proxystack::{tcp, Conn, Target, connect::TunnelInfo};
/// let ca = DemoCa::new("cluster.local");
/// // Tunnels go to the local application on the port the client asked for.
/// let app = tcp::Relay::new(tcp::TcpConnector::new()).upstream(|c: &Metadata| {
///     let port = c.get::<TunnelInfo>()?.authority.port();
///     Some(Target::from(([127, 0, 0, 1], port)))
/// });
/// let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
///     .allow(|req| req.authority.port() != 22)
///     .service(app)
///     .unwrap();
/// # let _ = inbound; }
/// ```
#[derive(Clone)]
pub struct Inbound {
    cert: CertKey,
    roots: Arc<RootCertStore>,
    trust_domains: Vec<String>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    policy: Option<PolicyFn>,
    check_local_ip: bool,
    illegal_ports: Vec<u16>,
    connect: ConnectTerminateLayer,
    /// Certificate, roots and CRLs that can change while serving ([`Inbound::live`]).
    live: Option<LiveIdentity>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("trust_domains", &self.trust_domains)
            .field("check_local_ip", &self.check_local_ip)
            .field("connect", &self.connect)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// Serves HBONE with this workload certificate, trusting `roots`; clients must be in
    /// the certificate's own trust domain.
    pub fn new(cert: CertKey, roots: Arc<RootCertStore>) -> Self {
        let trust_domains = cert
            .spiffe_ids()
            .iter()
            .map(|id| id.trust_domain().to_owned())
            .collect();
        Self {
            cert,
            roots,
            trust_domains,
            crls: Vec::new(),
            policy: None,
            check_local_ip: true,
            illegal_ports: ILLEGAL_PORTS.to_vec(),
            connect: ConnectTerminateLayer::new(),
            live: None,
        }
    }

    /// Serves HBONE with the certificate, roots and revocation lists of `identity` as they
    /// are at each handshake: a rotated certificate is presented to the next client, and an
    /// open connection whose client certificate a new revocation list revokes is closed
    /// with its tunnels (see [`TerminateLayer::live`]). Clients must be in the trust domain
    /// of the identity's certificate at the time of this call.
    pub fn live(identity: LiveIdentity) -> Self {
        let current = identity.current();
        let mut inbound = Self::new(current.cert().clone(), current.roots().clone());
        inbound.live = Some(identity);
        inbound
    }

    /// Accept clients from these trust domains instead.
    pub fn trust_domains<S: Into<String>>(mut self, domains: impl IntoIterator<Item = S>) -> Self {
        self.trust_domains = domains.into_iter().map(Into::into).collect();
        self
    }

    /// Refuse client certificates these revocation lists revoke (see
    /// [`ServerConfigBuilder::crls`]).
    pub fn crls(
        mut self,
        crls: impl IntoIterator<Item = CertificateRevocationListDer<'static>>,
    ) -> Self {
        self.crls = crls.into_iter().collect();
        self
    }

    /// Authorization (ztunnel's L4 RBAC): `false` answers 401 and dials nothing. The
    /// request's `connection` metadata carries the client's
    /// [`PeerIdentity`](crate::identity::PeerIdentity).
    pub fn allow(
        mut self,
        policy: impl Fn(&TunnelRequest<'_>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    /// Whether an IP authority must equal the address the client dialled (default on: the
    /// anti-SSRF rule of ztunnel; turn off for waypoints and gateways that serve many
    /// addresses, and check the authority in [`allow`](Self::allow) instead).
    pub fn check_local_ip(mut self, on: bool) -> Self {
        self.check_local_ip = on;
        self
    }

    /// Destination ports refused with 503 (default [`ILLEGAL_PORTS`]), on any address. For
    /// the process's own listeners, whatever their ports, prefer
    /// [`TcpConnector::own_listeners`] on the inner service's connector: it also knows
    /// ephemeral ports and the admin endpoint.
    pub fn illegal_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.illegal_ports = ports.into_iter().collect();
        self
    }

    /// HTTP/2 settings of the tunnels' connections (see [`ConnectTerminateLayer::h2`] for
    /// the defaults, which follow ztunnel).
    pub fn h2(mut self, h2: H2Config) -> Self {
        self.connect = self.connect.h2(h2);
        self
    }

    /// Deepest tunnel nesting accepted (default 4; see [`ConnectTerminateLayer::max_depth`]).
    pub fn max_depth(mut self, depth: u8) -> Self {
        self.connect = self.connect.max_depth(depth);
        self
    }

    /// How long the inner service may take to admit or refuse a tunnel (default 30 s;
    /// answer: 504).
    pub fn admission_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.connect = self.connect.admission_timeout(timeout);
        self
    }

    /// The HBONE inbound as a layer; fails if the TLS configuration cannot be built.
    pub fn into_layer(self) -> Result<InboundLayer, TlsConfigError> {
        let tls = ServerConfigBuilder::new()
            .provider(tls::aes_gcm_provider())
            .tls13_only()
            .alpn(["h2"])
            .default_cert(self.cert.clone())
            .client_auth(ClientAuth::Required(self.roots.clone()))
            .trust_domains(self.trust_domains.clone())
            .crls(self.crls.clone());
        let tls = match &self.live {
            Some(identity) => TerminateLayer::live(tls.build_live(identity)?),
            None => TerminateLayer::new(tls.build()?),
        };
        Ok(InboundLayer {
            tls,
            connect: self.connect_layer(),
        })
    }

    /// The inbound service: every accepted tunnel runs on `inner` with [`TunnelInfo`] and
    /// [`HboneHeaders`] metadata (`self.into_layer()?.layer(inner)`).
    pub fn service<S>(self, inner: S) -> Result<TerminateService<ConnectTerminate>, TlsConfigError>
    where
        S: crate::conn::BoxableInbound,
    {
        Ok(self.into_layer()?.layer(inner))
    }

    /// The CONNECT half of [`service`](Self::service) without TLS: HTTP/2 only, the
    /// authority, port and policy checks, [`HboneHeaders`] metadata and the CONNECT knobs
    /// set here. For connections whose TLS is terminated by another layer, e.g. in tests
    /// and fuzzing; it does not check the client certificate, so in front of it something
    /// must (the `connection` metadata the policy sees is whatever that layer recorded).
    pub fn tunnels<S>(self, inner: S) -> ConnectTerminate
    where
        S: crate::conn::BoxableInbound,
    {
        tunnels(&self.connect_layer(), inner)
    }

    /// The terminator with HBONE's fixed rules over the knobs set here.
    fn connect_layer(&self) -> ConnectTerminateLayer {
        let rules = Rules {
            policy: self.policy.clone(),
            check_local_ip: self.check_local_ip,
            illegal_ports: self.illegal_ports.clone(),
        };
        self.connect
            .clone()
            .http2_only()
            .non_connect_status(StatusCode::BAD_REQUEST)
            .policy(move |req| rules.decide(req))
    }
}

/// The CONNECT terminator over `inner`, which sees [`HboneHeaders`] on every tunnel.
fn tunnels<S>(connect: &ConnectTerminateLayer, inner: S) -> ConnectTerminate
where
    S: crate::conn::BoxableInbound,
{
    let with_headers = inner.boxed().map_request(|mut conn: Conn<BoxIo>| {
        if let Some(info) = conn.get::<TunnelInfo>() {
            let headers = HboneHeaders::parse(&info.headers);
            conn.insert(headers);
        }
        conn
    });
    connect.layer(with_headers)
}

/// The HBONE server side as a [`tower::Layer`], built by [`Inbound::into_layer`]: mutual
/// TLS 1.3 ([`TerminateLayer`]), then HTTP/2 CONNECT ([`ConnectTerminate`]); every
/// accepted tunnel runs on the layered service, with [`TunnelInfo`] and [`HboneHeaders`]
/// metadata.
///
/// The layered service is boxed once, where the tunnels start (a protocol boundary: each
/// tunnel is a new connection over an HTTP/2 stream), not per level.
///
/// ```
/// # #[cfg(feature = "demo-certs")] {
/// use proxystack::conn::Metadata;
/// use proxystack::hbone::Inbound;
/// use proxystack::tls::demo::DemoCa;
/// use proxystack::{tcp, Target, H2Config, connect::TunnelInfo};
/// use tower::ServiceBuilder;
/// let ca = DemoCa::new("cluster.local");
/// let hbone = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
///     .h2(H2Config::new().max_concurrent_streams(100))
///     .into_layer()
///     .unwrap();
/// // Tunnels go to the local application on the port the client asked for.
/// let inbound = ServiceBuilder::new().layer(hbone).service(
///     tcp::Relay::new(tcp::TcpConnector::new()).upstream(|c: &Metadata| {
///         let port = c.get::<TunnelInfo>()?.authority.port();
///         Some(Target::from(([127, 0, 0, 1], port)))
///     }),
/// );
/// # let _ = inbound; }
/// ```
#[derive(Clone)]
pub struct InboundLayer {
    tls: TerminateLayer,
    connect: ConnectTerminateLayer,
}

impl std::fmt::Debug for InboundLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundLayer")
            .field("connect", &self.connect)
            .finish_non_exhaustive()
    }
}

impl<S: crate::conn::BoxableInbound> Layer<S> for InboundLayer {
    type Service = TerminateService<ConnectTerminate>;

    fn layer(&self, inner: S) -> Self::Service {
        self.tls.layer(tunnels(&self.connect, inner))
    }
}

struct Rules {
    policy: Option<PolicyFn>,
    check_local_ip: bool,
    illegal_ports: Vec<u16>,
}

impl Rules {
    fn decide(&self, req: &TunnelRequest<'_>) -> Decision {
        if self.check_local_ip {
            if let (Some(ip), Some(local)) = (
                req.authority.canonical_ip(),
                req.connection.get::<LocalAddr>(),
            ) {
                if ip != local.0.ip().to_canonical() {
                    tracing::debug!(tunnel.authority = %req.authority, local = %local.0, "authority IP is not ours");
                    return Decision::Deny(StatusCode::BAD_REQUEST);
                }
            }
        }
        if self.illegal_ports.contains(&req.authority.port()) {
            tracing::debug!(tunnel.authority = %req.authority, "tunnel to a proxy port refused");
            return Decision::Deny(StatusCode::SERVICE_UNAVAILABLE);
        }
        match &self.policy {
            Some(allow) if !allow(req) => Decision::Deny(StatusCode::UNAUTHORIZED),
            _ => Decision::Allow,
        }
    }
}

/// The HBONE client: pooled HTTP/2 CONNECT over mutual TLS over TCP (or, for double
/// HBONE, over another HBONE tunnel).
///
/// ```
/// # #[cfg(feature = "demo-certs")] {
/// use proxystack::hbone::{self, HboneTarget};
/// use proxystack::identity::SpiffeId;
/// use proxystack::tls::demo::DemoCa;
/// use proxystack::Authority;
/// let ca = DemoCa::new("cluster.local");
/// let client = hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots()).unwrap();
/// // Dial the workload's HBONE port, ask for its app port, pin its identity.
/// let target = HboneTarget::new(
///     "10.0.0.7:15008".parse().unwrap(),
///     Authority::parse("10.0.0.7:8080").unwrap(),
///     [SpiffeId::istio("cluster.local", "default", "reviews").unwrap()],
/// )
/// .forwarded_for("10.0.0.3:41234".parse().unwrap())
/// .into_target();
/// // `tower::ServiceExt::oneshot(client, target).await` opens the tunnel.
/// # let _ = (client, target); }
/// ```
pub type Connector<C = TcpConnector> = H2ConnectPool<TlsConnector<C>>;

impl Connector {
    /// An HBONE client presenting `cert`, trusting `roots`, dialling over TCP.
    pub fn hbone(cert: CertKey, roots: Arc<RootCertStore>) -> Result<Self, TlsConfigError> {
        Self::hbone_with(TcpConnector::new(), cert, roots)
    }

    /// The same, dialling with `tcp`: a node proxy behind an iptables `REDIRECT` marks its
    /// own connections (`TcpConnector::mark`) so the rules let them pass instead of
    /// sending them back to the proxy.
    pub fn hbone_with(
        tcp: TcpConnector,
        cert: CertKey,
        roots: Arc<RootCertStore>,
    ) -> Result<Self, TlsConfigError> {
        Ok(H2ConnectPool::new(hbone_tls(tcp, cert, roots)?))
    }

    /// An HBONE client presenting the certificate of `identity`, trusting its roots, as they
    /// are at each handshake. After a rotation, pooled connections made with the old
    /// certificate take no new tunnels and drain; the next tunnel dials a fresh connection
    /// presenting the new one.
    pub fn hbone_live(identity: LiveIdentity) -> Self {
        Self::hbone_live_with(TcpConnector::new(), identity)
    }

    /// [`hbone_live`](Self::hbone_live), dialling with `tcp` (see [`hbone_with`](Self::hbone_with)).
    pub fn hbone_live_with(tcp: TcpConnector, identity: LiveIdentity) -> Self {
        H2ConnectPool::new(
            TlsConnector::live(tcp, identity)
                .provider(tls::aes_gcm_provider())
                .tls13_only()
                .alpn(["h2"])
                .sni(SniMode::None),
        )
    }
}

impl<C> Connector<C> {
    /// An *unpooled* HBONE client whose tunnels run inside tunnels opened by `outer`
    /// (double HBONE: the inner TLS session is end to end with the final destination, the
    /// gateway in between sees only ciphertext). The [`HboneTarget`] for it names the
    /// gateway as next hop (see [`HboneTarget::via`]).
    pub fn through(
        outer: C,
        cert: CertKey,
        roots: Arc<RootCertStore>,
    ) -> Result<Self, TlsConfigError> {
        Ok(H2ConnectPool::unpooled(hbone_tls(outer, cert, roots)?))
    }
}

fn hbone_tls<C>(
    inner: C,
    cert: CertKey,
    roots: Arc<RootCertStore>,
) -> Result<TlsConnector<C>, TlsConfigError> {
    Ok(TlsConnector::new(inner, roots)
        .provider(tls::aes_gcm_provider())
        .tls13_only()
        .client_cert(cert)?
        .alpn(["h2"])
        .sni(SniMode::None))
}

/// Where an HBONE tunnel goes, as ztunnel addresses it.
#[derive(Debug, Clone)]
pub struct HboneTarget {
    next_hop: SocketAddr,
    authority: Authority,
    identities: Vec<SpiffeId>,
    source_identity: Option<SpiffeId>,
    forwarded_for: Option<SocketAddr>,
    forwarded_host: Option<String>,
    baggage: Option<String>,
    traceparent: Option<TraceParent>,
    network: Option<String>,
    gateway: Option<(SocketAddr, Vec<SpiffeId>)>,
}

impl HboneTarget {
    /// A tunnel to `authority` (the logical destination, e.g. `podIP:8080`) through the
    /// HBONE endpoint `next_hop` (e.g. `podIP:15008`), whose certificate must carry one
    /// of `identities`.
    pub fn new(
        next_hop: SocketAddr,
        authority: Authority,
        identities: impl IntoIterator<Item = SpiffeId>,
    ) -> Self {
        Self {
            next_hop,
            authority,
            identities: identities.into_iter().collect(),
            source_identity: None,
            forwarded_for: None,
            forwarded_host: None,
            baggage: None,
            traceparent: None,
            network: None,
            gateway: None,
        }
    }

    /// The client's own identity, part of the pool key (never share a connection across
    /// source identities).
    pub fn source_identity(mut self, id: SpiffeId) -> Self {
        self.source_identity = Some(id);
        self
    }

    /// Sends `forwarded: for="<client>"` (the application's address).
    pub fn forwarded_for(mut self, client: SocketAddr) -> Self {
        self.forwarded_for = Some(client);
        self
    }

    /// Adds `;host=<service hostname>` to `forwarded`.
    pub fn forwarded_host(mut self, host: impl Into<String>) -> Self {
        self.forwarded_host = Some(host.into());
        self
    }

    /// Sends a `baggage` header (W3C format, e.g. `k8s.namespace.name=default`).
    pub fn baggage(mut self, baggage: impl Into<String>) -> Self {
        self.baggage = Some(baggage.into());
        self
    }

    /// Continues the caller's trace: sends this `traceparent` instead of starting a new one
    /// (a hop between two ztunnels, such as a waypoint, passes on what it received).
    pub fn traceparent(mut self, trace: TraceParent) -> Self {
        self.traceparent = Some(trace);
        self
    }

    /// Sends `x-forwarded-network: <network>`: the network this client is in, which a
    /// destination across a network gateway uses to attribute the connection (ztunnel sends
    /// it on the inner CONNECT of double HBONE). Names outside `[A-Za-z0-9._-]{1,128}` are
    /// not sent.
    pub fn network(mut self, network: impl Into<String>) -> Self {
        self.network = Some(network.into());
        self
    }

    /// Passes on what the previous hop said about the connection (client address, service
    /// host, baggage, trace context, network), as a hop in the middle of a mesh path does.
    pub fn continue_from(mut self, incoming: &HboneHeaders) -> Self {
        if let Some(client) = incoming.forwarded_for {
            self.forwarded_for = Some(client);
        }
        if let Some(host) = &incoming.forwarded_host {
            self.forwarded_host = Some(host.clone());
        }
        if !incoming.baggage.is_empty() {
            let entries: Vec<String> = incoming
                .baggage
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            self.baggage = Some(entries.join(","));
        }
        if let Some(trace) = incoming.traceparent {
            self.traceparent = Some(trace);
        }
        if let Some(network) = &incoming.forwarded_network {
            self.network = Some(network.clone());
        }
        self
    }

    /// Double HBONE: the outer tunnel goes to `gateway` (whose certificate must carry one
    /// of `gateway_identities`) with the same `:authority`; the inner one is end to end.
    pub fn via(
        mut self,
        gateway: SocketAddr,
        gateway_identities: impl IntoIterator<Item = SpiffeId>,
    ) -> Self {
        self.gateway = Some((gateway, gateway_identities.into_iter().collect()));
        self
    }

    /// The [`Target`] for [`Connector`].
    pub fn into_target(self) -> Target {
        let headers = headers::request_headers(&headers::Outgoing {
            forwarded_for: self.forwarded_for,
            forwarded_host: self.forwarded_host.as_deref(),
            baggage: self.baggage.as_deref(),
            traceparent: self.traceparent,
            network: self.network.as_deref(),
        });
        let key = |hop: &SocketAddr, ids: &[SpiffeId]| {
            let ids: Vec<&str> = ids.iter().map(SpiffeId::as_str).collect();
            let src = self.source_identity.as_ref().map_or("", SpiffeId::as_str);
            PoolKey(format!("{src}|{}|{hop}", ids.join(",")))
        };
        let mut target = Target::from(self.next_hop)
            .with(ConnectAuthority(self.authority.clone()))
            .with(ExpectedIdentities(self.identities.clone()))
            .with(ConnectHeaders(headers))
            .with(key(&self.next_hop, &self.identities));
        if let Some((gateway, ids)) = self.gateway {
            // The outer hop reads these; the inner TLS layer reads ExpectedIdentities.
            target.insert(OuterHop(
                Target::from(gateway)
                    .with(ConnectAuthority(self.authority))
                    .with(ExpectedIdentities(ids.clone()))
                    .with(key(&gateway, &ids)),
            ));
        }
        target
    }
}

/// Target metadata for double HBONE: the target the outer connector gets.
#[derive(Debug, Clone)]
pub struct OuterHop(pub Target);

/// Rewrites each target into its [`OuterHop`] (if any) before calling the outer
/// connector: the glue between the inner and outer connectors of double HBONE.
#[derive(Debug, Clone)]
pub struct ToOuterHop<C>(pub C);

impl<C: Service<Target>> Service<Target> for ToOuterHop<C> {
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let next = target
            .get::<OuterHop>()
            .map(|h| h.0.clone())
            .unwrap_or(target);
        self.0.call(next)
    }
}

/// The double-HBONE client: inner unpooled HBONE through an outer pooled one.
pub type DoubleConnector = Connector<ToOuterHop<Connector>>;

/// Builds a [`DoubleConnector`] from the pooled connector to gateways.
pub fn double(
    outer: Connector,
    cert: CertKey,
    roots: Arc<RootCertStore>,
) -> Result<DoubleConnector, TlsConfigError> {
    Connector::through(ToOuterHop(outer), cert, roots)
}
