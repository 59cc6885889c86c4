//! The PROXY protocol, versions 1 and 2: codec, inbound layer, outbound connector.
//!
//! A proxy that terminates TCP loses the client's address; the PROXY protocol has it send
//! a header with the original endpoints ahead of the relayed bytes. This module implements
//! haproxy's `proxy-protocol.txt` (2020 revision):
//!
//! * the codec — v1, the text line (section 2.1): `TCP4`, `TCP6` and `UNKNOWN`; v2, the
//!   binary header (section 2.2): LOCAL and PROXY; AF_UNSPEC, AF_INET, AF_INET6 and
//!   AF_UNIX over STREAM or DGRAM; TLVs (sections 2.2.1 to 2.2.7) with checked `CRC32C`,
//!   `UNIQUE_ID` and `SSL` values and typed accessors for ALPN, authority, unique ID, SSL
//!   and netns, plus the two custom TLVs Istio's ztunnel sends: the client's SPIFFE
//!   identity (`0xD0`) and the destination service (`0xD1`);
//! * [`ProxyProtocolLayer`] (inbound, section 3's receiver rules) reads the header of
//!   connections from [`TrustedSources`] only — required, optional (auto-detected v1/v2)
//!   or off — with a timeout and [`Limits`], and records [`ProxyHeader`],
//!   [`ProxiedAddrs`], [`ProxiedBy`] and, from `0xD0`,
//!   [`PeerIdentity`](crate::identity::PeerIdentity) as metadata; bytes read past the
//!   header are replayed to the inner service;
//! * [`ProxyProtocolConnector`] (outbound) writes a v2 header, optionally with CRC32C,
//!   before any payload, built from the target's [`SendProxyHeader`] metadata — never
//!   copied from a received header.
//!
//! [`decode`] is incremental and bounded: call it on everything read so far until it
//! returns a header; it needs at most 107 bytes for v1 and `16 +` [`Limits::max_v2_len`]
//! for v2, and rejects the input at the first byte that rules out a valid header. Use
//! [`detect`] where the header is optional. [`ProxyHeader::encode`] writes either version.
//!
//! ```
//! use proxystack::proxy_protocol::{decode, Decoded, Limits, ProxyHeader};
//!
//! let header = ProxyHeader::v2_proxy(
//!     "10.0.0.1:43210".parse().unwrap(),
//!     "10.0.0.2:8080".parse().unwrap(),
//! )
//! .with_identity("spiffe://cluster.local/ns/default/sa/client");
//! let wire = header.encode_with_crc32c().unwrap();
//!
//! let Ok(Decoded::Complete { header: got, consumed }) = decode(&wire, &Limits::default())
//! else {
//!     panic!("expected a header");
//! };
//! assert_eq!(consumed, wire.len());
//! assert_eq!(got.identity(), Some("spiffe://cluster.local/ns/default/sa/client"));
//! ```
//!
//! A header is only as truthful as its sender: the layer accepts one only from networks
//! you list, and trusts nobody by default.
//!
//! ```
//! use proxystack::proxy_protocol::{ProxyProtocolConnector, ProxyProtocolLayer, SendProxyHeader};
//! use proxystack::{tcp, Metadata, Target};
//! use tower::ServiceBuilder;
//!
//! // Accept PROXY from the load balancers, relay to a backend that also speaks PROXY,
//! // telling it about the real client.
//! let svc = ServiceBuilder::new()
//!     .layer(ProxyProtocolLayer::required().trusted(["10.0.0.0/24"]))
//!     .service(
//!         tcp::Relay::new(ProxyProtocolConnector::new(tcp::TcpConnector::new()))
//!                     .upstream(|c: &Metadata| {
//!                 let send = SendProxyHeader::from_inbound(c)?;
//!                 Some(Target::from_static("10.1.0.5:8080").with(send))
//!             }),
//!     );
//! # let _ = svc;
//! ```
//!
//! Not covered: typed access to SSL sub-TLVs beyond the five of the 2020 revision (they
//! are kept raw in [`Ssl::tlvs`]), acting on `NETNS`, sending v1, and UDP: the layer and
//! the connector are for stream connections.

mod codec;
mod connector;
mod crc32c;
mod error;
mod header;
mod layer;
mod tlv;
mod trust;
mod v1;
mod v2;

pub use codec::{decode, detect, Decoded, Detect, Limits, DETECT_LEN};
pub use connector::{MissingHeader, ProxyConnectError, ProxyProtocolConnector, SendProxyHeader};
pub use error::{EncodeError, ProxyProtocolError};
pub use header::{Addresses, Command, ProxyHeader, Transport, Version, UNIX_ADDR_LEN};
pub use layer::{
    AcceptError, Mode, ProxiedAddrs, ProxiedBy, ProxyProtocolLayer, ProxyProtocolService,
};
pub use tlv::{
    Ssl, Tlv, PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS, PP2_CLIENT_SSL, PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_KEY_ALG, PP2_SUBTYPE_SSL_SIG_ALG, PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, PP2_TYPE_ISTIO_IDENTITY,
    PP2_TYPE_ISTIO_SERVICE, PP2_TYPE_NETNS, PP2_TYPE_NOOP, PP2_TYPE_SSL, PP2_TYPE_UNIQUE_ID,
};
pub use trust::TrustedSources;
