//! Version detection and the incremental decoding entry point.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use super::error::ProxyProtocolError;
use super::header::ProxyHeader;
use super::{v1, v2};

/// A parsing step of the version-specific decoders: `Ok(None)` when the input ends
/// before the step could finish.
pub(crate) type Step<T> = Result<Option<T>, ProxyProtocolError>;

/// Unwraps a [`Step`], returning "need more input" from the enclosing function.
macro_rules! ready {
    ($step:expr) => {
        match $step {
            Ok(Some(value)) => value,
            Ok(None) => return Ok(None),
            Err(err) => return Err(err),
        }
    };
}
pub(crate) use ready;

/// Resource limits applied while decoding. Build with `Limits::default()` and its setters
/// (new limits may be added without a breaking change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest v2 `len` (bytes after the 16-byte fixed header) to accept.
    ///
    /// The field is chosen by the peer, so without a limit a header could make the
    /// receiver buffer 64 KiB before anything is validated. Real headers are a few
    /// hundred bytes at most. Defaults to 16 KiB.
    pub max_v2_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_v2_len: 16 * 1024,
        }
    }
}

impl Limits {
    /// Sets [`max_v2_len`](Self::max_v2_len).
    pub fn max_v2_len(mut self, bytes: usize) -> Self {
        self.max_v2_len = bytes;
        self
    }
}

/// Outcome of a successful [`decode`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// The input is a strict prefix of a header that may still be valid: read more and
    /// call [`decode`] again on the whole buffer.
    Incomplete,
    /// A complete header.
    Complete {
        /// The decoded header.
        header: ProxyHeader,
        /// Length of the header in bytes; anything after it is the proxied stream.
        consumed: usize,
    },
}

/// Outcome of [`detect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detect {
    /// Everything so far matches a PROXY preamble; read more.
    NeedMore,
    /// The input starts with `"PROXY "`.
    V1,
    /// The input starts with the 12-byte v2 signature.
    V2,
    /// The input cannot start a PROXY header: treat it as the proxied stream itself.
    NotProxy,
}

/// Longest input [`detect`] ever needs: the v2 signature.
pub const DETECT_LEN: usize = v2::SIGNATURE.len();

/// Tells whether `buf` starts with a PROXY header, for listeners where the header is
/// optional.
///
/// Decides [`Detect::NotProxy`] at the first byte that matches neither preamble and needs
/// at most [`DETECT_LEN`] (12) bytes. Neither preamble is a prefix of the other, and no
/// plausible client protocol (TLS, HTTP, SSH…) opens with either, so the answer is
/// unambiguous.
pub fn detect(buf: &[u8]) -> Detect {
    let (preamble, version): (&[u8], _) = match buf.first() {
        None => return Detect::NeedMore,
        Some(b'P') => (v1::PREFIX, Detect::V1),
        Some(b'\r') => (&v2::SIGNATURE, Detect::V2),
        Some(_) => return Detect::NotProxy,
    };
    if buf.iter().zip(preamble).any(|(have, want)| have != want) {
        Detect::NotProxy
    } else if buf.len() < preamble.len() {
        Detect::NeedMore
    } else {
        version
    }
}

/// Decodes a PROXY header (v1 or v2) at the start of `buf`.
///
/// Call it again with the whole buffer each time more bytes arrive: any strict prefix of
/// a valid header gives [`Decoded::Incomplete`], and the input is rejected at the first
/// byte that rules out a valid header, whichever way it was split. At most 107 bytes
/// (v1) or `16 + limits.max_v2_len` bytes (v2) are ever examined.
///
/// # Errors
///
/// [`ProxyProtocolError::NotProxyProtocol`] if `buf` starts with neither preamble (in an
/// optional-PROXY setup, see [`detect`]); any other variant for a malformed header.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Decoded, ProxyProtocolError> {
    let step = match detect(buf) {
        Detect::NeedMore => return Ok(Decoded::Incomplete),
        Detect::NotProxy => return Err(ProxyProtocolError::NotProxyProtocol),
        Detect::V1 => v1::decode(buf)?,
        Detect::V2 => v2::decode(buf, limits)?,
    };
    Ok(match step {
        None => Decoded::Incomplete,
        Some((header, consumed)) => Decoded::Complete { header, consumed },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::super::header::{Addresses, Command, Transport, Version};
    use super::super::tlv::*;
    use super::*;

    /// Decodes `wire`, checking first that a peer sending it one byte at a time would
    /// get `Incomplete` until the header's last byte.
    fn feed(wire: &[u8]) -> (ProxyHeader, usize) {
        let Ok(Decoded::Complete { header, consumed }) = decode(wire, &Limits::default()) else {
            panic!("not a complete header");
        };
        for end in 0..consumed {
            assert_eq!(
                decode(&wire[..end], &Limits::default()),
                Ok(Decoded::Incomplete),
                "prefix of {end} bytes"
            );
        }
        (header, consumed)
    }

    #[test]
    fn detect_decides_at_first_mismatch() {
        assert_eq!(detect(b""), Detect::NeedMore);
        assert_eq!(detect(b"G"), Detect::NotProxy);
        assert_eq!(detect(b"\x16\x03\x01"), Detect::NotProxy);
        assert_eq!(detect(b"PRO"), Detect::NeedMore);
        assert_eq!(detect(b"PROXZ"), Detect::NotProxy);
        assert_eq!(detect(b"PROXY"), Detect::NeedMore);
        assert_eq!(detect(b"PROXY "), Detect::V1);
        assert_eq!(detect(b"PROXY TCP4 junk"), Detect::V1);
        assert_eq!(detect(b"\r\n\r\n"), Detect::NeedMore);
        assert_eq!(detect(b"\r\n\r\nGET"), Detect::NotProxy);
        assert_eq!(detect(&v2::SIGNATURE[..11]), Detect::NeedMore);
        assert_eq!(detect(&v2::SIGNATURE), Detect::V2);
    }

    #[test]
    fn not_proxy_protocol_is_reported_early() {
        let limits = Limits::default();
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\n", &limits),
            Err(ProxyProtocolError::NotProxyProtocol)
        );
        assert_eq!(
            decode(b"\r\n\r\n\0\r\nQUIX", &limits),
            Err(ProxyProtocolError::NotProxyProtocol)
        );
        assert_eq!(decode(b"\r\n\r", &limits), Ok(Decoded::Incomplete));
        assert_eq!(decode(b"", &limits), Ok(Decoded::Incomplete));
    }

    #[test]
    fn haproxy_send_proxy_v1() {
        let wire = b"PROXY TCP6 2001:db8::10 2001:db8::1 40000 8443\r\n\x16\x03\x01";
        let (h, n) = feed(wire);
        assert_eq!(n, wire.len() - 3);
        assert_eq!(h.version, Version::V1);
        assert_eq!(h.source(), Some("[2001:db8::10]:40000".parse().unwrap()));
        assert_eq!(h.destination(), Some("[2001:db8::1]:8443".parse().unwrap()));
    }

    /// `send-proxy-v2` with `proxy-v2-options authority`, behind `alpn h2` on the bind
    /// line: haproxy writes the address block, then ALPN, then AUTHORITY.
    #[rustfmt::skip]
    const HAPROXY_V2_ALPN_AUTHORITY: &[u8] = &[
        // signature
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
        0x21,       // version 2, PROXY
        0x11,       // AF_INET, STREAM
        0x00, 0x20, // len = 12 + (3 + 2) + (3 + 12) = 32
        192, 168, 0, 1,   // src 192.168.0.1
        192, 168, 0, 11,  // dst 192.168.0.11
        0xDC, 0x04,       // sport 56324
        0x01, 0xBB,       // dport 443
        0x01, 0x00, 0x02, b'h', b'2', // PP2_TYPE_ALPN "h2"
        0x02, 0x00, 0x0C, b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm', b'.',
        // PP2_TYPE_AUTHORITY "example.com."
    ];

    #[test]
    fn haproxy_send_proxy_v2_with_alpn_and_authority() {
        let mut wire = HAPROXY_V2_ALPN_AUTHORITY.to_vec();
        wire.extend_from_slice(b"PRI * HTTP/2.0\r\n");
        let (h, n) = feed(&wire);
        assert_eq!(n, HAPROXY_V2_ALPN_AUTHORITY.len());
        assert_eq!(h.version, Version::V2);
        assert_eq!(h.command, Command::Proxy);
        assert_eq!(h.transport, Transport::Stream);
        assert_eq!(h.source(), Some("192.168.0.1:56324".parse().unwrap()));
        assert_eq!(h.destination(), Some("192.168.0.11:443".parse().unwrap()));
        assert_eq!(h.alpn(), Some(&b"h2"[..]));
        assert_eq!(h.authority(), Some("example.com."));
        let rebuilt = ProxyHeader::v2_proxy(
            "192.168.0.1:56324".parse().unwrap(),
            "192.168.0.11:443".parse().unwrap(),
        )
        .with_alpn("h2")
        .with_authority("example.com.");
        assert_eq!(rebuilt, h);
        assert_eq!(rebuilt.encode().unwrap(), HAPROXY_V2_ALPN_AUTHORITY);
    }

    /// haproxy with `proxy-v2-options crc32c,ssl,ssl-cn`: the CRC32C TLV comes first and
    /// is filled in last; the checksum below was computed by an independent bit-by-bit
    /// CRC32C implementation, not by this crate.
    #[rustfmt::skip]
    const HAPROXY_V2_CRC_SSL: &[u8] = &[
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
        0x21, 0x11, 0x00, 0x35, // len = 12 + 7 + 34 = 53
        10, 0, 0, 1,  10, 0, 0, 2,  0x30, 0x39,  0x01, 0xBB, // 10.0.0.1:12345 -> 10.0.0.2:443
        0x03, 0x00, 0x04, 0x9C, 0x94, 0xA9, 0x14,           // PP2_TYPE_CRC32C
        0x20, 0x00, 0x1F,                                   // PP2_TYPE_SSL, 31 bytes
        0x07, 0x00, 0x00, 0x00, 0x00,                       // client = SSL|CERT_CONN|CERT_SESS, verify = 0
        0x21, 0x00, 0x07, b'T', b'L', b'S', b'v', b'1', b'.', b'3',   // VERSION
        0x22, 0x00, 0x0D, b'c', b'l', b'i', b'e', b'n', b't', b'.', b'l', b'o', b'c', b'a', b'l', b'.',
        // CN "client.local." (13 bytes)
    ];

    #[test]
    fn haproxy_send_proxy_v2_with_crc32c_and_ssl() {
        let (h, n) = feed(HAPROXY_V2_CRC_SSL);
        assert_eq!(n, HAPROXY_V2_CRC_SSL.len());
        assert_eq!(
            h.tlv(PP2_TYPE_CRC32C).map(|v| &v[..]),
            Some(&[0x9C, 0x94, 0xA9, 0x14][..])
        );
        let ssl = h.ssl().unwrap();
        assert!(ssl.client_ssl() && ssl.client_cert_conn() && ssl.verified());
        assert_eq!(ssl.version(), Some("TLSv1.3"));
        assert_eq!(ssl.cn(), Some("client.local."));
        assert_eq!(h.encode().unwrap(), HAPROXY_V2_CRC_SSL);
    }

    #[test]
    fn haproxy_local_health_check() {
        // What haproxy sends on `check-send-proxy` health checks: LOCAL, AF_UNSPEC, len 0.
        let wire = [&v2::SIGNATURE[..], &[0x20, 0x00, 0x00, 0x00]].concat();
        assert_eq!(feed(&wire), (ProxyHeader::local(), 16));
    }

    #[test]
    fn ztunnel_identity_and_service() {
        let header = ProxyHeader::v2_proxy(
            "10.244.0.5:43210".parse().unwrap(),
            "10.244.0.9:9080".parse().unwrap(),
        )
        .with_identity("spiffe://cluster.local/ns/default/sa/client")
        .with_service("reviews.default.svc.cluster.local");
        let wire = header.encode().unwrap();
        assert_eq!(&wire[28..31], &[0xD0, 0x00, 43]);
        let (decoded, n) = feed(&wire);
        assert_eq!(n, wire.len());
        assert_eq!(decoded, header);
        assert_eq!(
            decoded.identity(),
            Some("spiffe://cluster.local/ns/default/sa/client")
        );
        assert_eq!(decoded.service(), Some("reviews.default.svc.cluster.local"));
        assert!(matches!(decoded.addresses, Addresses::Inet { .. }));
    }
}
