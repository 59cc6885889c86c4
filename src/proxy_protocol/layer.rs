//! [`ProxyProtocolLayer`]: reads the PROXY header of accepted connections.
//!
//! Implements the receiver side of haproxy's `proxy-protocol.txt`: section 2 (the header
//! comes first, in one piece; only accept it from trusted senders), 2.1 and 2.2 through the
//! codec, 2.2's LOCAL command (use the real endpoints) and section 3's receiver rules
//! (a connection that closes mid-header or sends an invalid one is dropped; wait at least
//! 3 seconds for the header).
//!
//! Bytes read past the header are replayed to the inner service ([`PrefixedIo`]), so it
//! sees exactly the stream the client sent after the header. Not here: UDP (`DGRAM`), and
//! acting on any TLV other than `0xD0` (all of them stay available in the [`ProxyHeader`]
//! metadata).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Extensions;
use tower::{Layer, Service, ServiceExt};
use tracing::{debug, trace};

use super::codec::{decode, detect, Decoded, Detect, Limits};
use super::error::ProxyProtocolError;
use super::header::{Addresses, Command, ProxyHeader};
use super::trust::TrustedSources;
use crate::cidr::CidrError;
use crate::conn::{Conn, PeerAddr};
use crate::identity::{PeerIdentity, SpiffeId};
use crate::io::{BoxIo, Io, PrefixedIo};
use crate::sniff::{sniff, Outcome, SniffLimits, Sniffer, Step, Stop};
use crate::BoxError;

/// Whether a listener expects PROXY headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Every connection must start with a header from a trusted peer; anything else is
    /// closed. What the spec asks for: a receiver must not guess.
    Required,
    /// Trusted peers may send a header (v1 or v2, told apart with
    /// [`detect`](super::detect)); if the first bytes are not a PROXY preamble they are the
    /// stream itself. Bytes from untrusted peers are never examined. Use while migrating a
    /// listener to PROXY; note that a trusted client that waits for the server to speak
    /// first (SMTP, MySQL) is held until the timeout before its connection is passed on.
    Optional,
    /// Pass-through: no header is read, every byte goes to the inner service.
    Off,
}

/// Metadata: the endpoints a trusted PROXY header (command PROXY, TCP/UDP over IP)
/// reported: the client and the address it connected to on the sending proxy.
///
/// [`PeerAddr`] stays the socket's peer (the proxy that sent the header) unless the layer
/// is told otherwise with [`ProxyProtocolLayer::peer_addr_from_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProxiedAddrs {
    /// The original client.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

impl ProxiedAddrs {
    /// The client of a connection: the header's source when a trusted header gave one,
    /// otherwise the socket's [`PeerAddr`].
    ///
    /// ```
    /// use proxystack::conn::PeerAddr;
    /// use proxystack::proxy_protocol::ProxiedAddrs;
    /// let mut meta = http::Extensions::new();
    /// meta.insert(PeerAddr("10.0.0.1:5000".parse().unwrap()));
    /// assert_eq!(ProxiedAddrs::client_of(&meta), Some("10.0.0.1:5000".parse().unwrap()));
    /// meta.insert(ProxiedAddrs {
    ///     source: "203.0.113.9:40000".parse().unwrap(),
    ///     destination: "198.51.100.1:443".parse().unwrap(),
    /// });
    /// assert_eq!(ProxiedAddrs::client_of(&meta), Some("203.0.113.9:40000".parse().unwrap()));
    /// ```
    pub fn client_of(metadata: &Extensions) -> Option<SocketAddr> {
        match metadata.get::<ProxiedAddrs>() {
            Some(p) => Some(p.source),
            None => metadata.get::<PeerAddr>().map(|p| p.0),
        }
    }
}

/// Metadata: the socket peer that sent an accepted PROXY header (the load balancer or
/// proxy in front). Recorded for every accepted header, so the hop stays known even when
/// [`PeerAddr`] is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProxiedBy(pub SocketAddr);

/// Why [`ProxyProtocolLayer`] closed a connection, or the inner service's failure.
///
/// Every variant but [`Inner`](Self::Inner) comes from the downstream peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// A PROXY header is required, but the peer is not a trusted source (or the
    /// connection has no [`PeerAddr`] to check).
    #[error("PROXY header required but peer {} is not a trusted source", DisplayPeer(*.peer))]
    Untrusted {
        /// The socket peer, if known.
        peer: Option<SocketAddr>,
    },
    /// A header is required and the stream does not start with one.
    #[error("no PROXY header, but this listener requires one")]
    Missing,
    /// The header is invalid.
    #[error("invalid PROXY header")]
    Malformed(#[source] ProxyProtocolError),
    /// The header did not arrive completely in time.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection before the header was complete.
    #[error("connection closed after {read} bytes, before the PROXY header was complete")]
    Closed {
        /// Bytes received.
        read: usize,
    },
    /// Reading the header failed.
    #[error("reading the PROXY header failed")]
    Io(#[source] io::Error),
    /// The inner service failed.
    #[error("service behind the PROXY protocol layer failed")]
    Inner(#[source] BoxError),
}

impl AcceptError {
    /// Whether the client could succeed by trying again: after a timeout or an I/O error,
    /// not after a missing, malformed or untrusted header.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AcceptError::Timeout(_) | AcceptError::Io(_))
    }
}

struct DisplayPeer(Option<SocketAddr>);

impl std::fmt::Display for DisplayPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(p) => p.fmt(f),
            None => f.write_str("(unknown)"),
        }
    }
}

/// Reads the PROXY header (v1 or v2) of each connection from a trusted peer and records
/// it as metadata, then hands the inner service the rest of the stream.
///
/// * Trust: a header is only read from peers whose [`PeerAddr`] is in the
///   [`trusted`](Self::trusted) networks (none by default). In [`Mode::Required`] other
///   peers are closed; in [`Mode::Optional`] their bytes are passed on untouched and
///   never parsed.
/// * Bounds: the header must be complete within the [`timeout`](Self::timeout)
///   (default 5 s; the spec asks receivers to wait at least 3 s) and within
///   [`Limits`]; a connection that closes mid-header, or sends an invalid one, is closed.
/// * Metadata for an accepted header: the whole [`ProxyHeader`] (TLVs included),
///   [`ProxiedBy`] (the sender), and for the PROXY command with IP addresses
///   [`ProxiedAddrs`]. A LOCAL header (health checks) or v1 `UNKNOWN` adds no addresses:
///   the real endpoints stay in force. Istio's identity TLV `0xD0` becomes
///   [`PeerIdentity`] if it is a valid SPIFFE ID (and the command is PROXY); it replaces
///   any identity recorded before (place the layer directly on the TCP socket).
/// * [`PeerAddr`] keeps the socket peer by default: policies and logs keyed on it keep
///   meaning "the host that connected to us", a nested layer checks trust against the real
///   sender, and code that wants the client asks for it explicitly
///   ([`ProxiedAddrs::client_of`]). Opt in to the haproxy-style rewrite with
///   [`peer_addr_from_header`](Self::peer_addr_from_header).
///
/// The inner service gets a [`Conn<BoxIo>`] in every mode, so switching modes never
/// changes types.
///
/// ```
/// use proxystack::proxy_protocol::{ProxiedAddrs, ProxyProtocolLayer};
/// use proxystack::{tcp, Metadata, Target};
/// use std::time::Duration;
/// use tower::ServiceBuilder;
///
/// // Behind an L4 load balancer at 10.0.0.0/24 that sends PROXY v1 or v2.
/// let svc = ServiceBuilder::new()
///     .layer(
///         ProxyProtocolLayer::required()
///             .trusted(["10.0.0.0/24"])
///             .timeout(Duration::from_secs(3)),
///     )
///     .service(tcp::Relay::new(tcp::TcpConnector::new()).upstream(|c: &Metadata| {
///         let client = ProxiedAddrs::client_of(c)?;
///         tracing::info!(%client, "relaying");
///         Some(Target::from_static("127.0.0.1:8080"))
///     }));
/// # let _ = svc;
/// ```
#[derive(Clone, Debug)]
pub struct ProxyProtocolLayer {
    mode: Mode,
    trusted: Arc<TrustedSources>,
    timeout: Duration,
    limits: Limits,
    peer_addr_from_header: bool,
    identity_tlv: bool,
}

impl ProxyProtocolLayer {
    /// A layer in `mode`, trusting nobody yet, 5 s header timeout, default [`Limits`].
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            trusted: Arc::new(TrustedSources::none()),
            timeout: Duration::from_secs(5),
            limits: Limits::default(),
            peer_addr_from_header: false,
            identity_tlv: true,
        }
    }

    /// [`Mode::Required`].
    pub fn required() -> Self {
        Self::new(Mode::Required)
    }

    /// [`Mode::Optional`].
    pub fn optional() -> Self {
        Self::new(Mode::Optional)
    }

    /// [`Mode::Off`]: pass-through.
    pub fn off() -> Self {
        Self::new(Mode::Off)
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Also trusts these networks (`"10.0.0.0/8"`, `"::1/128"`, `"192.0.2.7"`), written
    /// in the program.
    ///
    /// # Panics
    /// If an entry is not a valid network; use [`try_trusted`](Self::try_trusted) for
    /// networks read from configuration.
    #[allow(clippy::panic)]
    pub fn trusted<T: AsRef<str>>(self, networks: impl IntoIterator<Item = T>) -> Self {
        match self.try_trusted(networks) {
            Ok(layer) => layer,
            Err(e) => panic!("invalid trusted network: {e}"),
        }
    }

    /// Also trusts these networks.
    ///
    /// # Errors
    /// The first entry that is not a valid network.
    pub fn try_trusted<T: AsRef<str>>(
        self,
        networks: impl IntoIterator<Item = T>,
    ) -> Result<Self, CidrError> {
        let more = TrustedSources::parse(networks)?;
        let mut all = (*self.trusted).clone();
        all.extend(more.networks().iter().copied());
        Ok(self.trusted_sources(all))
    }

    /// Replaces the trusted networks.
    pub fn trusted_sources(mut self, trusted: TrustedSources) -> Self {
        self.trusted = Arc::new(trusted);
        self
    }

    /// Time allowed for the whole header to arrive (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Decoding limits (largest v2 header).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// When on, a header's source address replaces [`PeerAddr`] (the sender stays in
    /// [`ProxiedBy`]), so layers that only know `PeerAddr` see the client. Off by default;
    /// see the type's documentation for why.
    pub fn peer_addr_from_header(mut self, on: bool) -> Self {
        self.peer_addr_from_header = on;
        self
    }

    /// Whether the identity TLV `0xD0` of a trusted header becomes [`PeerIdentity`]
    /// (default on). Turn it off when the senders you trust for addresses are not trusted
    /// to vouch for identities.
    pub fn identity_tlv(mut self, on: bool) -> Self {
        self.identity_tlv = on;
        self
    }
}

impl<S> Layer<S> for ProxyProtocolLayer {
    type Service = ProxyProtocolService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ProxyProtocolService {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service made by [`ProxyProtocolLayer`].
#[derive(Clone, Debug)]
pub struct ProxyProtocolService<S> {
    layer: ProxyProtocolLayer,
    inner: S,
}

/// What the start of a trusted stream turned out to be.
enum Start {
    Header {
        header: ProxyHeader,
        consumed: usize,
    },
    /// Optional mode only: not a PROXY preamble; everything read is stream data.
    Data,
}

/// Longest header [`decode`] can need under `limits`: a v1 line or a v2 header.
fn max_header_len(limits: &Limits) -> usize {
    const V1_MAX: usize = 107;
    const V2_FIXED: usize = 16;
    V1_MAX.max(V2_FIXED.saturating_add(limits.max_v2_len))
}

/// The length of a v2 header whose fixed part is in `buf`.
///
/// Once [`decode`] has checked the fixed part, nothing can complete (or newly fail) before
/// this many bytes are in, except the TLVs' early overrun checks; waiting for them keeps a
/// peer that trickles a large header byte by byte from costing a TLV walk per byte.
fn v2_total_len(buf: &[u8]) -> Option<usize> {
    if detect(buf) != Detect::V2 {
        return None;
    }
    let len = <[u8; 2]>::try_from(buf.get(14..16)?).ok()?;
    Some(16 + usize::from(u16::from_be_bytes(len)))
}

/// The PROXY preamble as a [`Sniffer`]: a complete header, or (when `optional`) proof
/// that there is none. Bytes after the header may be read too; they are replayed.
struct Preamble<'a> {
    limits: &'a Limits,
    timeout: Duration,
    /// Until a full preamble signature is seen, optional mode may still decide "no header".
    undecided: bool,
    /// Decoding is repeated on the whole buffer, so it is skipped while it cannot complete.
    decode_at: usize,
}

impl Sniffer for Preamble<'_> {
    type Output = Start;
    type Error = AcceptError;

    fn push(&mut self, seen: &[u8]) -> Step<Start, AcceptError> {
        if self.undecided {
            match detect(seen) {
                Detect::NotProxy => return Step::Match(Start::Data),
                Detect::NeedMore => return Step::NeedMore,
                Detect::V1 | Detect::V2 => self.undecided = false,
            }
        }
        if seen.len() < self.decode_at {
            return Step::NeedMore;
        }
        match decode(seen, self.limits) {
            Ok(Decoded::Complete { header, consumed }) => {
                Step::Match(Start::Header { header, consumed })
            }
            Ok(Decoded::Incomplete) => {
                self.decode_at = v2_total_len(seen).unwrap_or(0);
                Step::NeedMore
            }
            Err(ProxyProtocolError::NotProxyProtocol) => Step::Reject(AcceptError::Missing),
            Err(e) => Step::Reject(AcceptError::Malformed(e)),
        }
    }

    fn finish(&mut self, seen: &[u8], stop: Stop) -> Outcome<Start, AcceptError> {
        // A silent or slow client whose bytes are not (yet) a preamble: in optional mode
        // that is a server-first protocol (or a short message), not a stalled header.
        if self.undecided {
            return Outcome::Match(Start::Data);
        }
        Outcome::Reject(match stop {
            Stop::Timeout => AcceptError::Timeout(self.timeout),
            Stop::Eof => AcceptError::Closed { read: seen.len() },
            // The codec refuses longer headers first; this is only the backstop.
            _ if detect(seen) == Detect::V2 => {
                AcceptError::Malformed(ProxyProtocolError::TooLarge {
                    len: seen.len().saturating_sub(16),
                    limit: self.limits.max_v2_len,
                })
            }
            _ => AcceptError::Malformed(ProxyProtocolError::V1TooLong),
        })
    }
}

/// Records an accepted header as metadata.
fn record(
    header: ProxyHeader,
    meta: &mut Extensions,
    peer: SocketAddr,
    layer: &ProxyProtocolLayer,
) {
    meta.insert(ProxiedBy(peer));
    if header.command == Command::Proxy {
        if let Addresses::Inet { src, dst } = header.addresses {
            debug!(client = %src, destination = %dst, version = ?header.version, "PROXY header accepted");
            meta.insert(ProxiedAddrs {
                source: src,
                destination: dst,
            });
            if layer.peer_addr_from_header {
                meta.insert(PeerAddr(src));
            }
        } else {
            debug!(version = ?header.version, "PROXY header without IP addresses; keeping the real ones");
        }
        if layer.identity_tlv {
            if let Some(raw) = header.tlv(super::PP2_TYPE_ISTIO_IDENTITY) {
                match std::str::from_utf8(raw).map(SpiffeId::parse) {
                    Ok(Ok(id)) => {
                        meta.insert(PeerIdentity(id));
                    }
                    // Reported as no identity, so identity-based policy fails closed.
                    _ => debug!("identity TLV 0xD0 is not a valid SPIFFE ID; ignored"),
                }
            }
        }
    } else {
        // LOCAL: the sender opened this connection itself (a health check). Its address
        // block and any identity claim describe no client: keep the real endpoints.
        debug!("PROXY LOCAL header; keeping the real addresses");
    }
    meta.insert(header);
}

impl<S, I> Service<Conn<I>> for ProxyProtocolService<S>
where
    I: Io,
    S: Service<Conn<BoxIo>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = ();
    type Error = AcceptError;
    type Future = Pin<Box<dyn Future<Output = Result<(), AcceptError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service is driven per connection with `oneshot`, so a connection
        // still sending its header never holds up the accept loop.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        let layer = self.layer.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let (io, mut meta) = conn.into_parts();
            let peer = meta.get::<PeerAddr>().map(|p| p.0);
            let trusted_peer = peer.filter(|p| layer.trusted.contains(p.ip()));
            let pass = |io: BoxIo, meta: Extensions| async move {
                inner
                    .oneshot(Conn::from_parts(io, meta))
                    .await
                    .map_err(|e| AcceptError::Inner(e.into()))
            };

            let trusted_peer = match (layer.mode, trusted_peer) {
                (Mode::Off, _) => return pass(BoxIo::new(io), meta).await,
                (Mode::Optional, None) => {
                    // Nothing is read, so the peer's bytes reach the inner service as sent,
                    // whatever they look like.
                    trace!("peer not trusted for PROXY headers; passing through");
                    return pass(BoxIo::new(io), meta).await;
                }
                (Mode::Required, None) => {
                    let e = AcceptError::Untrusted { peer };
                    debug!(error = %e, "closing");
                    return Err(e);
                }
                (Mode::Required | Mode::Optional, Some(p)) => p,
            };

            let mut preamble = Preamble {
                limits: &layer.limits,
                timeout: layer.timeout,
                undecided: layer.mode == Mode::Optional,
                decode_at: 0,
            };
            let limits = SniffLimits::new(max_header_len(&layer.limits), Some(layer.timeout));
            let start = match sniff(io, &mut preamble, limits).await {
                Ok((Outcome::Match(start), io)) => Ok((start, io)),
                Ok((Outcome::Reject(e), _)) => Err(e),
                Ok((Outcome::Undecided(_), _)) => Err(AcceptError::Timeout(layer.timeout)),
                Err(e) => Err(AcceptError::Io(e)),
            };
            let (rest, io, meta) = match start {
                Ok((Start::Header { header, consumed }, io)) => {
                    record(header, &mut meta, trusted_peer, &layer);
                    let (buf, io) = io.into_parts();
                    (buf.slice(consumed.min(buf.len())..), io, meta)
                }
                Ok((Start::Data, io)) => {
                    let (buf, io) = io.into_parts();
                    trace!(bytes = buf.len(), "no PROXY header; passing the stream on");
                    (buf, io, meta)
                }
                Err(e) => {
                    debug!(error = %crate::error_chain::DisplayChain(&e), "rejecting connection");
                    return Err(e);
                }
            };
            let io = if rest.is_empty() {
                BoxIo::new(io)
            } else {
                BoxIo::new(PrefixedIo::new(rest, io))
            };
            pass(io, meta).await
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_strict() {
        let layer = ProxyProtocolLayer::required();
        assert_eq!(layer.mode(), Mode::Required);
        assert!(layer.trusted.is_empty(), "nobody is trusted by default");
        // The spec wants receivers to wait at least 3 s for the header.
        assert!(layer.timeout >= Duration::from_secs(3));
        assert!(!layer.peer_addr_from_header);
        assert_eq!(ProxyProtocolLayer::optional().mode(), Mode::Optional);
        assert_eq!(ProxyProtocolLayer::off().mode(), Mode::Off);
    }

    #[test]
    fn trusted_networks_accumulate() {
        let layer = ProxyProtocolLayer::required()
            .trusted(["10.0.0.0/8"])
            .trusted(["::1"]);
        assert_eq!(layer.trusted.networks().len(), 2);
        assert!(layer.trusted.contains("10.1.1.1".parse().unwrap()));
        assert!(layer.trusted.contains("::1".parse().unwrap()));
        assert!(ProxyProtocolLayer::required()
            .try_trusted(["10.0.0.0/8", "10.0.0.1/8"])
            .is_err());
    }

    #[test]
    #[should_panic(expected = "invalid trusted network")]
    fn trusted_panics_on_a_bad_literal() {
        let _ = ProxyProtocolLayer::required().trusted(["not a network"]);
    }

    #[test]
    fn v2_length_is_known_after_the_fixed_part() {
        let wire =
            ProxyHeader::v2_proxy("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap())
                .with_service("svc")
                .encode()
                .unwrap();
        assert_eq!(v2_total_len(&wire[..15]), None);
        assert_eq!(v2_total_len(&wire[..16]), Some(wire.len()));
        assert_eq!(v2_total_len(b"PROXY TCP4 1.2.3.4"), None);
    }

    #[test]
    fn buffer_bound_covers_both_versions() {
        assert_eq!(max_header_len(&Limits { max_v2_len: 0 }), 107);
        assert_eq!(max_header_len(&Limits::default()), 16 + 16 * 1024);
    }
}
