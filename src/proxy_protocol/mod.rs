//! The PROXY protocol, versions 1 and 2.
//!
//! A proxy that terminates TCP loses the client's address; the PROXY protocol has it send
//! a header with the original endpoints ahead of the relayed bytes. This module implements
//! the codec of haproxy's `proxy-protocol.txt` (2020 revision):
//!
//! * v1, the text line (section 2.1): `TCP4`, `TCP6` and `UNKNOWN`;
//! * v2, the binary header (section 2.2): LOCAL and PROXY; AF_UNSPEC, AF_INET, AF_INET6
//!   and AF_UNIX over STREAM or DGRAM; TLVs (sections 2.2.1 to 2.2.7) with checked `CRC32C`,
//!   `UNIQUE_ID` and `SSL` values and typed accessors for ALPN, authority, unique ID, SSL
//!   and netns, plus the two custom TLVs Istio's ztunnel sends: the client's SPIFFE
//!   identity (`0xD0`) and the destination service (`0xD1`).
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
//! Not covered: typed access to SSL sub-TLVs beyond the five of the 2020 revision (they
//! are kept raw in [`Ssl::tlvs`]), acting on `NETNS`, timeouts and I/O (the layer's job:
//! the spec wants a connection that closes mid-header rejected), and trust: a header is
//! only as truthful as its sender, so accept it only from peers you authenticate or
//! control.

mod codec;
mod crc32c;
mod error;
mod header;
mod tlv;
mod v1;
mod v2;

pub use codec::{decode, detect, Decoded, Detect, Limits, DETECT_LEN};
pub use error::{EncodeError, ProxyProtocolError};
pub use header::{Addresses, Command, ProxyHeader, Transport, Version, UNIX_ADDR_LEN};
pub use tlv::{
    Ssl, Tlv, PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS, PP2_CLIENT_SSL, PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_KEY_ALG, PP2_SUBTYPE_SSL_SIG_ALG, PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, PP2_TYPE_ISTIO_IDENTITY,
    PP2_TYPE_ISTIO_SERVICE, PP2_TYPE_NETNS, PP2_TYPE_NOOP, PP2_TYPE_SSL, PP2_TYPE_UNIQUE_ID,
};
