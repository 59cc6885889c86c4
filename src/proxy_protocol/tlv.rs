//! Type-length-value extensions of PROXY v2 (spec section 2.2), including the SSL TLV's
//! nested structure and the custom types Istio's ztunnel sends.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::error::EncodeError;

/// `PP2_TYPE_ALPN`: the application protocol negotiated on the client connection (e.g. `h2`).
pub const PP2_TYPE_ALPN: u8 = 0x01;
/// `PP2_TYPE_AUTHORITY`: the host name the client asked for (TLS SNI or HTTP authority), UTF-8.
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// `PP2_TYPE_CRC32C`: big-endian CRC32C of the whole header with this field zeroed.
pub const PP2_TYPE_CRC32C: u8 = 0x03;
/// `PP2_TYPE_NOOP`: padding, to be ignored by receivers.
pub const PP2_TYPE_NOOP: u8 = 0x04;
/// `PP2_TYPE_UNIQUE_ID`: an opaque connection identifier of at most 128 bytes.
pub const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
/// `PP2_TYPE_SSL`: TLS details of the client connection; see [`Ssl`].
pub const PP2_TYPE_SSL: u8 = 0x20;
/// `PP2_SUBTYPE_SSL_VERSION`: TLS version string (e.g. `TLSv1.3`), nested in [`PP2_TYPE_SSL`].
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
/// `PP2_SUBTYPE_SSL_CN`: common name of the client certificate, nested in [`PP2_TYPE_SSL`].
pub const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
/// `PP2_SUBTYPE_SSL_CIPHER`: negotiated cipher name, nested in [`PP2_TYPE_SSL`].
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// `PP2_SUBTYPE_SSL_SIG_ALG`: client certificate signature algorithm, nested in [`PP2_TYPE_SSL`].
pub const PP2_SUBTYPE_SSL_SIG_ALG: u8 = 0x24;
/// `PP2_SUBTYPE_SSL_KEY_ALG`: client certificate key algorithm, nested in [`PP2_TYPE_SSL`].
pub const PP2_SUBTYPE_SSL_KEY_ALG: u8 = 0x25;
/// `PP2_TYPE_NETNS`: name of the network namespace the connection was accepted in.
pub const PP2_TYPE_NETNS: u8 = 0x30;
/// Istio ztunnel's source identity TLV: the client workload's SPIFFE URI, UTF-8
/// (e.g. `spiffe://cluster.local/ns/default/sa/client`). Not part of the spec.
pub const PP2_TYPE_ISTIO_IDENTITY: u8 = 0xD0;
/// Istio ztunnel's service TLV: the destination service host name, UTF-8
/// (e.g. `reviews.default.svc.cluster.local`). Not part of the spec.
pub const PP2_TYPE_ISTIO_SERVICE: u8 = 0xD1;

/// [`Ssl::client`] bit: the client connected over TLS.
pub const PP2_CLIENT_SSL: u8 = 0x01;
/// [`Ssl::client`] bit: the client presented a certificate on this connection.
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// [`Ssl::client`] bit: the client presented a certificate at least once in this TLS session.
pub const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// Longest `PP2_TYPE_UNIQUE_ID` value the spec allows.
const MAX_UNIQUE_ID_LEN: usize = 128;
/// `client` (1 byte) + `verify` (4 bytes) that open the SSL TLV.
const SSL_FIXED_LEN: usize = 5;

/// One PROXY v2 TLV, kept with its raw value so headers re-encode byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tlv {
    /// The type byte (`PP2_TYPE_*`).
    pub kind: u8,
    /// The value, without the 3-byte type/length prefix.
    pub value: Bytes,
}

impl Tlv {
    /// A TLV of the given type and value.
    pub fn new(kind: u8, value: impl Into<Bytes>) -> Self {
        Self {
            kind,
            value: value.into(),
        }
    }
}

/// The parsed value of a `PP2_TYPE_SSL` TLV (spec section 2.2.6).
///
/// Obtained from [`ProxyHeader::ssl`](super::ProxyHeader::ssl); build one with
/// [`Ssl::new`] and [`Ssl::encode`] to send it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ssl {
    /// Bit field of `PP2_CLIENT_*` flags.
    pub client: u8,
    /// Zero if the client presented a certificate and it was verified; non-zero otherwise.
    pub verify: u32,
    /// The nested `PP2_SUBTYPE_SSL_*` TLVs, in wire order.
    pub tlvs: Vec<Tlv>,
}

impl Ssl {
    /// An SSL TLV value with the given flags and verification result and no sub-TLVs.
    pub fn new(client: u8, verify: u32) -> Self {
        Self {
            client,
            verify,
            tlvs: Vec::new(),
        }
    }

    /// Appends a sub-TLV (e.g. [`PP2_SUBTYPE_SSL_VERSION`]).
    pub fn with_sub_tlv(mut self, kind: u8, value: impl Into<Bytes>) -> Self {
        self.tlvs.push(Tlv::new(kind, value));
        self
    }

    /// Parses an SSL TLV value; `None` if its sub-TLVs are not framed correctly.
    pub fn parse(value: &Bytes) -> Option<Self> {
        let client = *value.first()?;
        let verify = u32::from_be_bytes(value.get(1..SSL_FIXED_LEN)?.try_into().ok()?);
        let mut tlvs = Vec::new();
        walk_sub_tlvs(value.get(SSL_FIXED_LEN..)?, |kind, range| {
            tlvs.push(Tlv::new(kind, value.slice(range)));
        })
        .ok()?;
        Some(Self {
            client,
            verify,
            tlvs,
        })
    }

    /// Serializes this as the value of a [`PP2_TYPE_SSL`] TLV.
    ///
    /// # Errors
    ///
    /// [`EncodeError::InvalidTlv`] if a sub-TLV value is longer than 65535 bytes.
    pub fn encode(&self) -> Result<Bytes, EncodeError> {
        let len = SSL_FIXED_LEN + self.tlvs.iter().map(|t| 3 + t.value.len()).sum::<usize>();
        let mut out = BytesMut::with_capacity(len);
        out.put_u8(self.client);
        out.put_u32(self.verify);
        for tlv in &self.tlvs {
            put_tlv(&mut out, tlv).map_err(|reason| EncodeError::InvalidTlv {
                kind: PP2_TYPE_SSL,
                reason,
            })?;
        }
        Ok(out.freeze())
    }

    /// Whether the client connected over TLS ([`PP2_CLIENT_SSL`]).
    pub fn client_ssl(&self) -> bool {
        self.client & PP2_CLIENT_SSL != 0
    }

    /// Whether the client presented a certificate on this connection ([`PP2_CLIENT_CERT_CONN`]).
    pub fn client_cert_conn(&self) -> bool {
        self.client & PP2_CLIENT_CERT_CONN != 0
    }

    /// Whether the client presented a certificate in this TLS session ([`PP2_CLIENT_CERT_SESS`]).
    pub fn client_cert_sess(&self) -> bool {
        self.client & PP2_CLIENT_CERT_SESS != 0
    }

    /// Whether a client certificate was presented and verified (`verify == 0`).
    ///
    /// Only meaningful together with [`client_cert_conn`](Self::client_cert_conn) or
    /// [`client_cert_sess`](Self::client_cert_sess): senders put zero here when no
    /// certificate was requested at all.
    pub fn verified(&self) -> bool {
        self.verify == 0
    }

    /// The first sub-TLV of the given type, as UTF-8; `None` if absent or not UTF-8.
    pub fn sub_tlv_str(&self, kind: u8) -> Option<&str> {
        first_str(&self.tlvs, kind)
    }

    /// The TLS version ([`PP2_SUBTYPE_SSL_VERSION`]), e.g. `TLSv1.3`.
    pub fn version(&self) -> Option<&str> {
        self.sub_tlv_str(PP2_SUBTYPE_SSL_VERSION)
    }

    /// The client certificate's common name ([`PP2_SUBTYPE_SSL_CN`]).
    pub fn cn(&self) -> Option<&str> {
        self.sub_tlv_str(PP2_SUBTYPE_SSL_CN)
    }

    /// The negotiated cipher ([`PP2_SUBTYPE_SSL_CIPHER`]), e.g. `ECDHE-RSA-AES128-GCM-SHA256`.
    pub fn cipher(&self) -> Option<&str> {
        self.sub_tlv_str(PP2_SUBTYPE_SSL_CIPHER)
    }

    /// The client certificate's signature algorithm ([`PP2_SUBTYPE_SSL_SIG_ALG`]).
    pub fn sig_alg(&self) -> Option<&str> {
        self.sub_tlv_str(PP2_SUBTYPE_SSL_SIG_ALG)
    }

    /// The client certificate's key algorithm ([`PP2_SUBTYPE_SSL_KEY_ALG`]), e.g. `RSA2048`.
    pub fn key_alg(&self) -> Option<&str> {
        self.sub_tlv_str(PP2_SUBTYPE_SSL_KEY_ALG)
    }
}

/// The first TLV of `kind` in `tlvs`, as UTF-8.
pub(crate) fn first_str(tlvs: &[Tlv], kind: u8) -> Option<&str> {
    let tlv = tlvs.iter().find(|t| t.kind == kind)?;
    std::str::from_utf8(&tlv.value).ok()
}

/// Rejects values of spec-defined TLV types that receivers must not accept.
///
/// Shared by the decoder and the encoder so that anything we emit, we also accept.
pub(crate) fn validate(kind: u8, value: &[u8]) -> Result<(), &'static str> {
    match kind {
        PP2_TYPE_CRC32C if value.len() != 4 => Err("CRC32C value must be exactly 4 bytes"),
        PP2_TYPE_UNIQUE_ID if value.len() > MAX_UNIQUE_ID_LEN => {
            Err("unique ID longer than 128 bytes")
        }
        PP2_TYPE_SSL => match value.get(SSL_FIXED_LEN..) {
            Some(sub_tlvs) => walk_sub_tlvs(sub_tlvs, |_, _| {}),
            None => Err("SSL value shorter than its 5-byte client/verify prefix"),
        },
        _ => Ok(()),
    }
}

/// Walks a run of TLVs that must end exactly at the end of `buf`, as nested in the SSL
/// TLV, passing each type and value range (relative to the enclosing value, which starts
/// `SSL_FIXED_LEN` bytes before `buf`) to `visit`.
fn walk_sub_tlvs(buf: &[u8], mut visit: impl FnMut(u8, Range<usize>)) -> Result<(), &'static str> {
    let mut offset = 0;
    while offset < buf.len() {
        let (kind, len) = match buf.get(offset..offset + 3) {
            Some(&[kind, hi, lo]) => (kind, usize::from(u16::from_be_bytes([hi, lo]))),
            _ => return Err("truncated SSL sub-TLV header"),
        };
        let start = offset + 3;
        let end = start + len;
        if end > buf.len() {
            return Err("SSL sub-TLV runs past the end of the SSL TLV");
        }
        visit(kind, SSL_FIXED_LEN + start..SSL_FIXED_LEN + end);
        offset = end;
    }
    Ok(())
}

/// Appends `tlv` in wire format.
pub(crate) fn put_tlv(out: &mut BytesMut, tlv: &Tlv) -> Result<(), &'static str> {
    let len = u16::try_from(tlv.value.len()).map_err(|_| "value longer than 65535 bytes")?;
    out.put_u8(tlv.kind);
    out.put_u16(len);
    out.put_slice(&tlv.value);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn haproxy_ssl() -> Ssl {
        Ssl::new(
            PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
            0,
        )
        .with_sub_tlv(PP2_SUBTYPE_SSL_VERSION, "TLSv1.3")
        .with_sub_tlv(PP2_SUBTYPE_SSL_CN, "client.example")
        .with_sub_tlv(PP2_SUBTYPE_SSL_CIPHER, "TLS_AES_256_GCM_SHA384")
        .with_sub_tlv(PP2_SUBTYPE_SSL_SIG_ALG, "SHA256")
        .with_sub_tlv(PP2_SUBTYPE_SSL_KEY_ALG, "RSA2048")
    }

    #[test]
    fn ssl_round_trip_and_accessors() {
        let ssl = haproxy_ssl();
        let bytes = ssl.encode().unwrap();
        assert_eq!(&bytes[..5], &[0x07, 0, 0, 0, 0]);
        assert_eq!(&bytes[5..8], &[0x21, 0x00, 0x07]);
        let parsed = Ssl::parse(&bytes).unwrap();
        assert_eq!(parsed, ssl);
        assert!(parsed.client_ssl() && parsed.client_cert_conn() && parsed.client_cert_sess());
        assert!(parsed.verified());
        assert_eq!(parsed.version(), Some("TLSv1.3"));
        assert_eq!(parsed.cn(), Some("client.example"));
        assert_eq!(parsed.cipher(), Some("TLS_AES_256_GCM_SHA384"));
        assert_eq!(parsed.sig_alg(), Some("SHA256"));
        assert_eq!(parsed.key_alg(), Some("RSA2048"));
        assert!(validate(PP2_TYPE_SSL, &bytes).is_ok());
    }

    #[test]
    fn ssl_without_sub_tlvs() {
        let bytes = Bytes::from_static(&[0x00, 0, 0, 0, 1]);
        let ssl = Ssl::parse(&bytes).unwrap();
        assert!(!ssl.client_ssl() && !ssl.verified());
        assert_eq!(ssl.version(), None);
    }

    #[test]
    fn malformed_ssl_is_rejected() {
        let short = Bytes::from_static(&[0x01, 0, 0, 0]);
        assert!(validate(PP2_TYPE_SSL, &short).is_err());
        assert_eq!(Ssl::parse(&short), None);
        // Sub-TLV claims 5 bytes, only 2 follow.
        let overrun = Bytes::from_static(&[0x01, 0, 0, 0, 0, 0x21, 0, 5, b'T', b'L']);
        assert!(validate(PP2_TYPE_SSL, &overrun).is_err());
        assert_eq!(Ssl::parse(&overrun), None);
        // Two bytes cannot hold a sub-TLV header.
        let truncated = Bytes::from_static(&[0x01, 0, 0, 0, 0, 0x21, 0]);
        assert!(validate(PP2_TYPE_SSL, &truncated).is_err());
    }

    #[test]
    fn spec_limits_on_values() {
        assert!(validate(PP2_TYPE_UNIQUE_ID, &Bytes::from(vec![0; 128])).is_ok());
        assert!(validate(PP2_TYPE_UNIQUE_ID, &Bytes::from(vec![0; 129])).is_err());
        assert!(validate(PP2_TYPE_CRC32C, &Bytes::from_static(&[0; 3])).is_err());
        assert!(validate(PP2_TYPE_NOOP, &Bytes::new()).is_ok());
        assert!(validate(0xE0, &Bytes::from(vec![0; 1000])).is_ok());
    }

    #[test]
    fn oversized_sub_tlv_cannot_be_encoded() {
        let ssl = Ssl::new(PP2_CLIENT_SSL, 0).with_sub_tlv(PP2_SUBTYPE_SSL_CN, vec![b'a'; 70_000]);
        assert!(matches!(
            ssl.encode(),
            Err(EncodeError::InvalidTlv {
                kind: PP2_TYPE_SSL,
                ..
            })
        ));
    }
}
