//! The decoded form of a PROXY header, shared by v1 and v2, with builders and typed
//! accessors for the TLVs.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;

use bytes::Bytes;

use super::error::EncodeError;
use super::tlv::{
    first_str, Ssl, Tlv, PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_ISTIO_IDENTITY,
    PP2_TYPE_ISTIO_SERVICE, PP2_TYPE_NETNS, PP2_TYPE_SSL, PP2_TYPE_UNIQUE_ID,
};
use super::{v1, v2};

/// Size of each `sun_path` in a v2 AF_UNIX address block, and the longest path it holds.
pub const UNIX_ADDR_LEN: usize = 108;

/// Protocol version of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// The human-readable text format (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary format with the 12-byte signature.
    V2,
}

/// What the receiver should do with the addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// The proxy opened the connection itself (e.g. a health check): use the real
    /// connection endpoints. v2 only.
    Local,
    /// The connection was relayed on behalf of the client in [`Addresses`].
    Proxy,
}

/// Transport protocol of the proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Unknown or not conveyed (v1 `UNKNOWN`, v2 `AF_UNSPEC` and LOCAL).
    Unspec,
    /// `SOCK_STREAM`: TCP, or a stream UNIX socket.
    Stream,
    /// `SOCK_DGRAM`: UDP, or a datagram UNIX socket.
    Dgram,
}

/// The original endpoints of the proxied connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addresses {
    /// No addresses: v1 `UNKNOWN`, v2 `AF_UNSPEC`, or any v2 LOCAL header.
    Unspec,
    /// TCP/UDP over IPv4 or IPv6; both addresses are of the same family.
    ///
    /// The wire formats carry neither IPv6 flow info nor scope id, so those are always 0
    /// after decoding and ignored when encoding.
    Inet {
        /// The client.
        src: SocketAddr,
        /// The address the client connected to.
        dst: SocketAddr,
    },
    /// AF_UNIX socket paths (`sun_path`), at most [`UNIX_ADDR_LEN`] bytes each.
    ///
    /// On the wire each path is NUL-padded to 108 bytes; decoding strips the trailing
    /// NULs, so a path's own trailing NULs do not survive a round trip (the wire cannot
    /// tell them from padding). Leading NULs, as in Linux abstract-namespace names, are
    /// kept.
    Unix {
        /// The client's path.
        src: Vec<u8>,
        /// The path the client connected to.
        dst: Vec<u8>,
    },
}

/// A PROXY protocol header (v1 or v2).
///
/// Build one with [`ProxyHeader::v2_proxy`], [`ProxyHeader::local`] or
/// [`ProxyHeader::v1_proxy`] and the `with_*` methods, then [`encode`](Self::encode) it;
/// or get one from [`decode`](super::decode).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyHeader {
    /// Wire format.
    pub version: Version,
    /// LOCAL or PROXY; always [`Command::Proxy`] for v1.
    pub command: Command,
    /// Transport protocol; [`Transport::Stream`] for v1 `TCP4`/`TCP6`.
    pub transport: Transport,
    /// The original endpoints.
    pub addresses: Addresses,
    /// v2 TLVs in wire order, including `PP2_TYPE_NOOP` and `PP2_TYPE_CRC32C`; always
    /// empty for v1.
    pub tlvs: Vec<Tlv>,
}

impl ProxyHeader {
    /// A v2 PROXY header for a TCP connection from `src` to `dst`.
    pub fn v2_proxy(src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            version: Version::V2,
            command: Command::Proxy,
            transport: Transport::Stream,
            addresses: Addresses::Inet { src, dst },
            tlvs: Vec::new(),
        }
    }

    /// A v2 LOCAL header, as sent on health checks: no addresses, no TLVs.
    pub fn local() -> Self {
        Self {
            version: Version::V2,
            command: Command::Local,
            transport: Transport::Unspec,
            addresses: Addresses::Unspec,
            tlvs: Vec::new(),
        }
    }

    /// A v1 `TCP4`/`TCP6` header for a TCP connection from `src` to `dst`.
    pub fn v1_proxy(src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            version: Version::V1,
            ..Self::v2_proxy(src, dst)
        }
    }

    /// A v1 `PROXY UNKNOWN` header.
    pub fn v1_unknown() -> Self {
        Self {
            version: Version::V1,
            command: Command::Proxy,
            transport: Transport::Unspec,
            addresses: Addresses::Unspec,
            tlvs: Vec::new(),
        }
    }

    /// Replaces the transport protocol (e.g. [`Transport::Dgram`] for UDP).
    pub fn with_transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Appends a TLV; v2 only.
    pub fn with_tlv(mut self, kind: u8, value: impl Into<Bytes>) -> Self {
        self.tlvs.push(Tlv::new(kind, value));
        self
    }

    /// Appends a [`PP2_TYPE_ALPN`] TLV.
    pub fn with_alpn(self, alpn: impl Into<Bytes>) -> Self {
        self.with_tlv(PP2_TYPE_ALPN, alpn)
    }

    /// Appends a [`PP2_TYPE_AUTHORITY`] TLV.
    pub fn with_authority(self, authority: &str) -> Self {
        self.with_tlv(
            PP2_TYPE_AUTHORITY,
            Bytes::copy_from_slice(authority.as_bytes()),
        )
    }

    /// Appends Istio's [`PP2_TYPE_ISTIO_IDENTITY`] TLV with the client's SPIFFE URI.
    pub fn with_identity(self, identity: &str) -> Self {
        self.with_tlv(
            PP2_TYPE_ISTIO_IDENTITY,
            Bytes::copy_from_slice(identity.as_bytes()),
        )
    }

    /// Appends Istio's [`PP2_TYPE_ISTIO_SERVICE`] TLV with the destination service host name.
    pub fn with_service(self, service: &str) -> Self {
        self.with_tlv(
            PP2_TYPE_ISTIO_SERVICE,
            Bytes::copy_from_slice(service.as_bytes()),
        )
    }

    /// The client address, if the header carries IP addresses.
    pub fn source(&self) -> Option<SocketAddr> {
        match self.addresses {
            Addresses::Inet { src, .. } => Some(src),
            _ => None,
        }
    }

    /// The address the client connected to, if the header carries IP addresses.
    pub fn destination(&self) -> Option<SocketAddr> {
        match self.addresses {
            Addresses::Inet { dst, .. } => Some(dst),
            _ => None,
        }
    }

    /// The value of the first TLV of type `kind`.
    ///
    /// All accessors below return the first occurrence: the spec does not say what
    /// repeated TLVs mean, and taking the first is what haproxy does.
    pub fn tlv(&self, kind: u8) -> Option<&Bytes> {
        self.tlvs.iter().find(|t| t.kind == kind).map(|t| &t.value)
    }

    /// The [`PP2_TYPE_ALPN`] protocol identifier (raw bytes, as in the TLS extension).
    pub fn alpn(&self) -> Option<&[u8]> {
        self.tlv(PP2_TYPE_ALPN).map(|v| v.as_ref())
    }

    /// The [`PP2_TYPE_AUTHORITY`] host name; `None` if absent or not UTF-8 (the raw value
    /// stays available through [`tlv`](Self::tlv)).
    pub fn authority(&self) -> Option<&str> {
        first_str(&self.tlvs, PP2_TYPE_AUTHORITY)
    }

    /// The [`PP2_TYPE_UNIQUE_ID`] connection identifier.
    pub fn unique_id(&self) -> Option<&[u8]> {
        self.tlv(PP2_TYPE_UNIQUE_ID).map(|v| v.as_ref())
    }

    /// The [`PP2_TYPE_NETNS`] namespace name; `None` if absent or not UTF-8.
    pub fn netns(&self) -> Option<&str> {
        first_str(&self.tlvs, PP2_TYPE_NETNS)
    }

    /// The parsed [`PP2_TYPE_SSL`] TLV.
    ///
    /// `None` if absent, or malformed — which [`decode`](super::decode) never lets
    /// through, so that only happens for hand-built headers.
    pub fn ssl(&self) -> Option<Ssl> {
        Ssl::parse(self.tlv(PP2_TYPE_SSL)?)
    }

    /// Istio ztunnel's source identity ([`PP2_TYPE_ISTIO_IDENTITY`]), a SPIFFE URI.
    ///
    /// `None` if absent or not UTF-8. An identity that cannot be read is reported as no
    /// identity, so a policy keyed on it fails closed. Nothing here checks that the sender
    /// is trusted to assert identities: only accept this from a peer you authenticated.
    pub fn identity(&self) -> Option<&str> {
        first_str(&self.tlvs, PP2_TYPE_ISTIO_IDENTITY)
    }

    /// Istio ztunnel's destination service host name ([`PP2_TYPE_ISTIO_SERVICE`]);
    /// `None` if absent or not UTF-8.
    pub fn service(&self) -> Option<&str> {
        first_str(&self.tlvs, PP2_TYPE_ISTIO_SERVICE)
    }

    /// Serializes the header in the format given by [`version`](Self::version).
    ///
    /// A `PP2_TYPE_CRC32C` TLV already in [`tlvs`](Self::tlvs) is kept in place and its
    /// value recomputed, so decoded headers re-encode to the bytes they came from.
    ///
    /// # Errors
    ///
    /// [`EncodeError`] if v1 is asked to carry TLVs, UNIX addresses, LOCAL or datagrams; if
    /// the addresses mix IPv4 and IPv6; if the family/transport pair is undefined by the
    /// spec; if a spec-defined TLV is invalid; or if the v2 payload exceeds 65535 bytes.
    pub fn encode(&self) -> Result<Bytes, EncodeError> {
        match self.version {
            Version::V1 => v1::encode(self),
            Version::V2 => v2::encode(self, false),
        }
    }

    /// Like [`encode`](Self::encode) for v2, appending a `PP2_TYPE_CRC32C` TLV unless one
    /// is already present. A v1 header is encoded as v1, without a checksum.
    ///
    /// # Errors
    ///
    /// As for [`encode`](Self::encode).
    pub fn encode_with_crc32c(&self) -> Result<Bytes, EncodeError> {
        match self.version {
            Version::V1 => v1::encode(self),
            Version::V2 => v2::encode(self, true),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proxy_protocol::tlv::{Ssl, PP2_CLIENT_SSL, PP2_SUBTYPE_SSL_VERSION};

    #[test]
    fn builders_and_accessors() {
        let src: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:443".parse().unwrap();
        let ssl = Ssl::new(PP2_CLIENT_SSL, 0).with_sub_tlv(PP2_SUBTYPE_SSL_VERSION, "TLSv1.2");
        let h = ProxyHeader::v2_proxy(src, dst)
            .with_alpn("h2")
            .with_authority("example.com")
            .with_identity("spiffe://cluster.local/ns/default/sa/client")
            .with_service("reviews.default.svc.cluster.local")
            .with_tlv(PP2_TYPE_UNIQUE_ID, &b"id-1"[..])
            .with_tlv(PP2_TYPE_NETNS, "blue")
            .with_tlv(PP2_TYPE_SSL, ssl.encode().unwrap());
        assert_eq!(h.source(), Some(src));
        assert_eq!(h.destination(), Some(dst));
        assert_eq!(h.alpn(), Some(&b"h2"[..]));
        assert_eq!(h.authority(), Some("example.com"));
        assert_eq!(
            h.identity(),
            Some("spiffe://cluster.local/ns/default/sa/client")
        );
        assert_eq!(h.service(), Some("reviews.default.svc.cluster.local"));
        assert_eq!(h.unique_id(), Some(&b"id-1"[..]));
        assert_eq!(h.netns(), Some("blue"));
        assert_eq!(h.ssl(), Some(ssl));
    }

    #[test]
    fn non_utf8_identity_reads_as_absent() {
        let h = ProxyHeader::local().with_tlv(PP2_TYPE_ISTIO_IDENTITY, &[0xFF, 0xFE][..]);
        assert_eq!(h.identity(), None);
        assert_eq!(h.tlv(PP2_TYPE_ISTIO_IDENTITY).map(|v| v.len()), Some(2));
    }

    #[test]
    fn first_tlv_wins() {
        let h = ProxyHeader::local()
            .with_service("a.svc")
            .with_service("b.svc");
        assert_eq!(h.service(), Some("a.svc"));
    }
}
