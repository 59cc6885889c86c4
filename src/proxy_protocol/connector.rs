//! [`ProxyProtocolConnector`]: writes a PROXY v2 header on outbound connections.
//!
//! The sender side of haproxy's `proxy-protocol.txt`: section 2 (the header goes first and
//! in one piece), 2.2 (v2 binary format; LOCAL and PROXY), 2.2.3 (optional CRC32C) and
//! the custom TLVs Istio's ztunnel sends (`0xD0` client identity, `0xD1` service).
//!
//! What is sent is always constructed explicitly, per target, from [`SendProxyHeader`]:
//! a PROXY command exists only together with the two addresses it was built from, so a
//! received LOCAL header (no addresses) can never come out as a PROXY header with
//! made-up or empty ones (the CVE-2024-23327 class). Not here: v1 output, UNIX and UDP
//! addresses, the SSL TLV.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Extensions;
use tokio::io::AsyncWriteExt;
use tower::{Service, ServiceExt};
use tracing::debug;

use super::error::EncodeError;
use super::header::ProxyHeader;
use super::layer::ProxiedAddrs;
use crate::conn::{Conn, LocalAddr, OriginalDst};
use crate::identity::{PeerIdentity, SpiffeId};
use crate::io::Io;
use crate::{BoxError, Target};

/// Target metadata: the PROXY v2 header [`ProxyProtocolConnector`] sends for this target.
///
/// Built from explicit values only: [`proxy`](Self::proxy) (client and destination
/// addresses), [`local`](Self::local) (no addresses, the receiver uses the real ones), or
/// [`from_inbound`](Self::from_inbound), which picks the addresses of an accepted
/// connection from its metadata. There is deliberately no conversion from a received
/// [`ProxyHeader`].
///
/// ```
/// use proxystack::identity::SpiffeId;
/// use proxystack::proxy_protocol::SendProxyHeader;
/// use proxystack::Target;
///
/// let client = "10.244.0.5:43210".parse().unwrap();
/// let dest = "10.244.0.9:9080".parse().unwrap();
/// let id = SpiffeId::istio("cluster.local", "default", "client").unwrap();
/// let target = Target::from(dest).with(
///     SendProxyHeader::proxy(client, dest)
///         .identity(&id)
///         .service("reviews.default.svc.cluster.local"),
/// );
/// let header = target.get::<SendProxyHeader>().unwrap().header();
/// assert_eq!(header.source(), Some(client));
/// assert_eq!(header.identity(), Some(id.as_str()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendProxyHeader(ProxyHeader);

impl SendProxyHeader {
    /// A PROXY command for a TCP connection from `source` to `destination`.
    ///
    /// If one address is IPv4 and the other IPv6, the IPv4 one is sent as IPv4-mapped
    /// IPv6 (`::ffff:a.b.c.d`), as the wire needs one family; IPv4-mapped pairs are sent
    /// as plain IPv4.
    pub fn proxy(source: SocketAddr, destination: SocketAddr) -> Self {
        let (source, destination) = same_family(source, destination);
        Self(ProxyHeader::v2_proxy(source, destination))
    }

    /// A LOCAL command: the receiver uses the connection's real endpoints (as for health
    /// checks). Carries TLVs if you add any.
    pub fn local() -> Self {
        Self(ProxyHeader::local())
    }

    /// A PROXY command describing an accepted connection, from its metadata: the client
    /// is [`ProxiedAddrs::source`] if a trusted header gave one, else
    /// [`PeerAddr`](crate::conn::PeerAddr); the
    /// destination is [`ProxiedAddrs::destination`], else [`OriginalDst`], else
    /// [`LocalAddr`]; a [`PeerIdentity`] becomes the `0xD0` TLV. `None` without a client
    /// or destination address.
    ///
    /// An inbound LOCAL header records no `ProxiedAddrs`, so it yields the real socket
    /// addresses here, never empty or invented ones.
    ///
    /// ```
    /// use proxystack::conn::{LocalAddr, PeerAddr};
    /// use proxystack::proxy_protocol::SendProxyHeader;
    /// let mut meta = http::Extensions::new();
    /// meta.insert(PeerAddr("192.0.2.1:5555".parse().unwrap()));
    /// meta.insert(LocalAddr("192.0.2.2:443".parse().unwrap()));
    /// let send = SendProxyHeader::from_inbound(&meta).unwrap();
    /// assert_eq!(send.header().source(), Some("192.0.2.1:5555".parse().unwrap()));
    /// assert_eq!(send.header().destination(), Some("192.0.2.2:443".parse().unwrap()));
    /// ```
    pub fn from_inbound(metadata: &Extensions) -> Option<Self> {
        let proxied = metadata.get::<ProxiedAddrs>();
        let source = ProxiedAddrs::client_of(metadata)?;
        let destination = proxied
            .map(|p| p.destination)
            .or_else(|| metadata.get::<OriginalDst>().map(|d| d.0))
            .or_else(|| metadata.get::<LocalAddr>().map(|l| l.0))?;
        let send = Self::proxy(source, destination);
        Some(match metadata.get::<PeerIdentity>() {
            Some(PeerIdentity(id)) => send.identity(id),
            None => send,
        })
    }

    /// Adds Istio's `0xD0` TLV: the client's SPIFFE identity.
    pub fn identity(self, id: &SpiffeId) -> Self {
        Self(self.0.with_identity(id.as_str()))
    }

    /// Adds Istio's `0xD1` TLV: the destination service's host name.
    pub fn service(self, service: &str) -> Self {
        Self(self.0.with_service(service))
    }

    /// Adds any other TLV (e.g. `PP2_TYPE_AUTHORITY`, `PP2_TYPE_UNIQUE_ID`). Values the
    /// spec forbids make the connect fail with [`ProxyConnectError::Encode`]; a
    /// `PP2_TYPE_CRC32C` TLV gets its value computed.
    pub fn tlv(self, kind: u8, value: impl Into<Bytes>) -> Self {
        Self(self.0.with_tlv(kind, value))
    }

    /// The header that will be sent (before the optional CRC32C is added).
    pub fn header(&self) -> &ProxyHeader {
        &self.0
    }
}

/// Puts both addresses in one family, as a v2 address block requires.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    let (src, dst) = (canonical(src), canonical(dst));
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (mapped(src), mapped(dst))
    }
}

/// What [`ProxyProtocolConnector`] does for a target without [`SendProxyHeader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MissingHeader {
    /// Fail before connecting (the default): a connector set up to speak PROXY that does
    /// not know whom it speaks for is a bug, and guessing could hand the upstream the
    /// proxy's own address as the client's.
    #[default]
    Reject,
    /// Send a LOCAL header: the upstream uses this connection's real endpoints.
    Local,
}

/// Why [`ProxyProtocolConnector`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyConnectError {
    /// The target has no [`SendProxyHeader`] and [`MissingHeader::Reject`] is in force.
    #[error("target {0} has no SendProxyHeader metadata")]
    MissingHeader(String),
    /// The header cannot be encoded (e.g. an invalid spec-defined TLV value).
    #[error("cannot encode the PROXY header")]
    Encode(#[source] EncodeError),
    /// The inner connector failed.
    #[error("connecting under the PROXY header failed")]
    Connect(#[source] BoxError),
    /// Writing the header failed.
    #[error("writing the PROXY header failed")]
    Write(#[source] io::Error),
    /// Writing the header did not finish in time.
    #[error("writing the PROXY header took longer than {0:?}")]
    WriteTimeout(Duration),
}

impl ProxyConnectError {
    /// Whether another attempt could succeed: connect and write failures, not a missing or
    /// unencodable header.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProxyConnectError::Connect(_)
                | ProxyConnectError::Write(_)
                | ProxyConnectError::WriteTimeout(_)
        )
    }
}

/// Wraps a connector: after it connects, writes a PROXY v2 header built from the target's
/// [`SendProxyHeader`], before any payload.
///
/// The header is encoded before connecting, so an unusable one costs no connection, and
/// written with one `write_all` (one segment on TCP, as the spec asks).
///
/// ```
/// use proxystack::proxy_protocol::{MissingHeader, ProxyProtocolConnector, SendProxyHeader};
/// use proxystack::{tcp, Target};
///
/// let connector = ProxyProtocolConnector::new(tcp::TcpConnector::new())
///     .crc32c(true)
///     .when_missing(MissingHeader::Local);
/// let target = Target::from_static("10.0.0.7:8080").with(SendProxyHeader::proxy(
///     "203.0.113.9:40000".parse().unwrap(),
///     "198.51.100.1:443".parse().unwrap(),
/// ));
/// # let _ = (connector, target);
/// ```
#[derive(Debug, Clone)]
pub struct ProxyProtocolConnector<C> {
    inner: C,
    crc32c: bool,
    missing: MissingHeader,
    write_timeout: Duration,
}

impl<C> ProxyProtocolConnector<C> {
    /// Wraps `inner`: no CRC32C, [`MissingHeader::Reject`], 5 s to write the header.
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            crc32c: false,
            missing: MissingHeader::Reject,
            write_timeout: Duration::from_secs(5),
        }
    }

    /// Appends a `PP2_TYPE_CRC32C` checksum (spec section 2.2.3) to every header.
    pub fn crc32c(mut self, on: bool) -> Self {
        self.crc32c = on;
        self
    }

    /// What to do for targets without [`SendProxyHeader`].
    pub fn when_missing(mut self, missing: MissingHeader) -> Self {
        self.missing = missing;
        self
    }

    /// Time allowed for writing the header once connected.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    fn encode(&self, target: &Target) -> Result<Bytes, ProxyConnectError> {
        let local;
        let header = match (target.get::<SendProxyHeader>(), self.missing) {
            (Some(send), _) => &send.0,
            (None, MissingHeader::Local) => {
                local = ProxyHeader::local();
                &local
            }
            (None, MissingHeader::Reject) => {
                return Err(ProxyConnectError::MissingHeader(target.to_string()))
            }
        };
        let wire = if self.crc32c {
            header.encode_with_crc32c()
        } else {
            header.encode()
        };
        wire.map_err(ProxyConnectError::Encode)
    }
}

impl<C, O> Service<Target> for ProxyProtocolConnector<C>
where
    C: Service<Target, Response = Conn<O>> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    O: Io,
{
    type Response = Conn<O>;
    type Error = ProxyConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn<O>, ProxyConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner connector is driven per call with `oneshot`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let wire = self.encode(&target);
        let inner = self.inner.clone();
        let timeout = self.write_timeout;
        Box::pin(async move {
            let wire = wire?;
            let mut conn = inner
                .oneshot(target)
                .await
                .map_err(|e| ProxyConnectError::Connect(e.into()))?;
            let write = async {
                conn.io_mut().write_all(&wire).await?;
                conn.io_mut().flush().await
            };
            match tokio::time::timeout(timeout, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(ProxyConnectError::Write(e)),
                Err(_) => return Err(ProxyConnectError::WriteTimeout(timeout)),
            }
            debug!(bytes = wire.len(), "PROXY v2 header sent");
            Ok(conn)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::conn::PeerAddr;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let send = SendProxyHeader::proxy(addr("192.0.2.1:1"), addr("[2001:db8::1]:2"));
        assert_eq!(send.header().source(), Some(addr("[::ffff:192.0.2.1]:1")));
        assert!(send.header().encode().is_ok());
        // Both mapped: plain IPv4 on the wire.
        let send =
            SendProxyHeader::proxy(addr("[::ffff:192.0.2.1]:1"), addr("[::ffff:192.0.2.2]:2"));
        assert_eq!(send.header().source(), Some(addr("192.0.2.1:1")));
        assert_eq!(send.header().destination(), Some(addr("192.0.2.2:2")));
    }

    #[test]
    fn from_inbound_prefers_header_then_original_dst_then_local() {
        let mut meta = Extensions::new();
        assert_eq!(SendProxyHeader::from_inbound(&meta), None);
        meta.insert(PeerAddr(addr("10.0.0.1:1000")));
        assert_eq!(SendProxyHeader::from_inbound(&meta), None, "no destination");
        meta.insert(LocalAddr(addr("10.0.0.2:80")));
        let h = SendProxyHeader::from_inbound(&meta).unwrap();
        assert_eq!(h.header().destination(), Some(addr("10.0.0.2:80")));
        meta.insert(OriginalDst(addr("10.0.0.3:8080")));
        let h = SendProxyHeader::from_inbound(&meta).unwrap();
        assert_eq!(h.header().destination(), Some(addr("10.0.0.3:8080")));
        meta.insert(ProxiedAddrs {
            source: addr("203.0.113.1:5"),
            destination: addr("203.0.113.2:6"),
        });
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        meta.insert(PeerIdentity(id.clone()));
        let h = SendProxyHeader::from_inbound(&meta).unwrap();
        assert_eq!(
            h.header(),
            &ProxyHeader::v2_proxy(addr("203.0.113.1:5"), addr("203.0.113.2:6"))
                .with_identity(id.as_str())
        );
    }

    #[test]
    fn encode_follows_settings() {
        let c = ProxyProtocolConnector::new(());
        let t = Target::from(addr("10.0.0.9:1"));
        assert!(matches!(
            c.encode(&t),
            Err(ProxyConnectError::MissingHeader(_))
        ));
        let local = c
            .clone()
            .when_missing(MissingHeader::Local)
            .encode(&t)
            .unwrap();
        assert_eq!(local, ProxyHeader::local().encode().unwrap());
        let with = t.with(SendProxyHeader::local());
        let crc = c.crc32c(true).encode(&with).unwrap();
        assert_eq!(crc.len(), 16 + 7, "LOCAL plus a CRC32C TLV");
    }
}
