#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use super::*;
use crate::proxy_protocol::tlv::{
    Ssl, PP2_CLIENT_SSL, PP2_SUBTYPE_SSL_VERSION, PP2_TYPE_ALPN, PP2_TYPE_NOOP, PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
};

fn v4(src: &str, dst: &str) -> ProxyHeader {
    ProxyHeader::v2_proxy(src.parse().unwrap(), dst.parse().unwrap())
}

/// A raw header: fixed part with the given bytes 13/14, then `payload` with a matching `len`.
fn raw(ver_cmd: u8, fam: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.extend_from_slice(&[ver_cmd, fam]);
    out.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn ok(buf: &[u8]) -> (ProxyHeader, usize) {
    for end in 0..buf.len() {
        assert!(
            matches!(decode(&buf[..end], &Limits::default()), Ok(None)),
            "prefix of {end} bytes was not incomplete"
        );
    }
    decode(buf, &Limits::default()).unwrap().unwrap()
}

fn err(buf: &[u8]) -> ProxyProtocolError {
    decode(buf, &Limits::default()).unwrap_err()
}

const INET_BLOCK_BYTES: [u8; 12] = [127, 0, 0, 1, 127, 0, 0, 2, 0x1F, 0x90, 0x00, 0x50];

#[test]
fn bad_signature() {
    let mut wire = v4("1.1.1.1:1", "2.2.2.2:2").encode().unwrap().to_vec();
    wire[11] = b'X';
    assert_eq!(err(&wire), ProxyProtocolError::NotProxyProtocol);
    assert_eq!(err(&wire[..12]), ProxyProtocolError::NotProxyProtocol);
    assert!(matches!(decode(&wire[..11], &Limits::default()), Ok(None)));
}

#[test]
fn version_must_be_2() {
    for ver_cmd in [0x11, 0x31, 0x01, 0xF1] {
        let wire = raw(ver_cmd, 0x11, &INET_BLOCK_BYTES);
        // Rejected as soon as byte 13 arrives.
        assert_eq!(
            err(&wire[..13]),
            ProxyProtocolError::BadVersion(ver_cmd >> 4)
        );
        assert_eq!(err(&wire), ProxyProtocolError::BadVersion(ver_cmd >> 4));
    }
}

#[test]
fn command_must_be_local_or_proxy() {
    for cmd in [0x2, 0x3, 0xF] {
        let wire = raw(0x20 | cmd, 0x11, &INET_BLOCK_BYTES);
        assert_eq!(err(&wire[..13]), ProxyProtocolError::BadCommand(cmd));
    }
}

#[test]
fn family_and_transport_must_be_defined() {
    assert_eq!(
        err(&raw(0x21, 0x41, &[])[..14]),
        ProxyProtocolError::BadFamily(4)
    );
    assert_eq!(
        err(&raw(0x21, 0xF1, &[])),
        ProxyProtocolError::BadFamily(0xF)
    );
    assert_eq!(
        err(&raw(0x21, 0x13, &[])[..14]),
        ProxyProtocolError::BadTransport(3)
    );
    // Both nibbles defined, combination not: section 2.2 lists only these seven bytes.
    for fam in [0x01, 0x02, 0x10, 0x20, 0x30] {
        assert_eq!(
            err(&raw(0x21, fam, &[])[..14]),
            ProxyProtocolError::BadFamilyTransport(fam)
        );
        assert_eq!(
            err(&raw(0x20, fam, &[])[..14]),
            ProxyProtocolError::BadFamilyTransport(fam)
        );
    }
}

#[test]
fn len_shorter_than_address_block() {
    for (fam, required) in [(0x11, 12), (0x12, 12), (0x21, 36), (0x31, 216), (0x32, 216)] {
        let wire = raw(0x21, fam, &[0; 11]);
        let expected = ProxyProtocolError::AddressBlockTooShort {
            family: fam >> 4,
            len: 11,
            required,
        };
        // Known from the length field alone.
        assert_eq!(err(&wire[..16]), expected);
        assert_eq!(err(&wire), expected);
    }
}

#[test]
fn len_over_limit() {
    let mut wire = raw(0x21, 0x11, &INET_BLOCK_BYTES);
    wire[14..16].copy_from_slice(&0xFFFFu16.to_be_bytes());
    assert_eq!(
        err(&wire[..16]),
        ProxyProtocolError::TooLarge {
            len: 0xFFFF,
            limit: 16 * 1024
        }
    );
    let tight = Limits { max_v2_len: 11 };
    assert_eq!(
        decode(&raw(0x21, 0x11, &INET_BLOCK_BYTES), &tight).unwrap_err(),
        ProxyProtocolError::TooLarge { len: 12, limit: 11 }
    );
    let exact = Limits { max_v2_len: 12 };
    assert!(decode(&raw(0x21, 0x11, &INET_BLOCK_BYTES), &exact)
        .unwrap()
        .is_some());
}

#[test]
fn inet_inet6_unix_dgram() {
    let (h, n) = ok(&raw(0x21, 0x11, &INET_BLOCK_BYTES));
    assert_eq!((h, n), (v4("127.0.0.1:8080", "127.0.0.2:80"), 28));

    let v6 = ProxyHeader::v2_proxy(
        "[2001:db8::1]:1".parse().unwrap(),
        "[::1]:65535".parse().unwrap(),
    )
    .with_transport(Transport::Dgram);
    let wire = v6.encode().unwrap();
    assert_eq!(&wire[12..16], &[0x21, 0x22, 0x00, 36]);
    assert_eq!(ok(&wire), (v6, 52));

    let unix = ProxyHeader {
        version: Version::V2,
        command: Command::Proxy,
        transport: Transport::Stream,
        addresses: Addresses::Unix {
            src: b"/var/run/src.sock".to_vec(),
            dst: b"\0abstract".to_vec(),
        },
        tlvs: vec![],
    };
    let wire = unix.encode().unwrap();
    assert_eq!(&wire[12..16], &[0x21, 0x31, 0x00, 216]);
    assert_eq!(&wire[16..33], b"/var/run/src.sock");
    assert!(wire[33..124].iter().all(|&b| b == 0));
    assert_eq!(&wire[124..133], b"\0abstract");
    assert_eq!(ok(&wire), (unix, 232));
}

#[test]
fn proxy_with_af_unspec_has_no_addresses_but_keeps_tlvs() {
    let wire = raw(0x21, 0x00, &[0x01, 0x00, 0x02, b'h', b'2']);
    let (h, _) = ok(&wire);
    assert_eq!(h.command, Command::Proxy);
    assert_eq!(h.addresses, Addresses::Unspec);
    assert_eq!(h.alpn(), Some(&b"h2"[..]));
}

#[test]
fn local_without_address_block() {
    let (h, n) = ok(&raw(0x20, 0x00, &[]));
    assert_eq!((h, n), (ProxyHeader::local(), 16));
}

#[test]
fn local_with_address_block_ignores_it() {
    let mut payload = INET_BLOCK_BYTES.to_vec();
    payload.extend_from_slice(&[0xD0, 0x00, 0x01, b'x']);
    let (h, n) = ok(&raw(0x20, 0x11, &payload));
    assert_eq!(n, 16 + 16);
    assert_eq!(h, ProxyHeader::local().with_tlv(0xD0, &b"x"[..]));
}

#[test]
fn local_with_block_too_short_for_its_family_is_skipped() {
    // A LOCAL header must be accepted; 5 bytes cannot hold an AF_INET block, so the
    // payload is skipped whole rather than misread as TLVs.
    let (h, n) = ok(&raw(0x20, 0x11, &[0xD0, 0x00, 0x02, b'h', b'i']));
    assert_eq!((h, n), (ProxyHeader::local(), 21));
}

#[test]
fn tlv_past_the_end() {
    // Value runs past `len`: rejected as soon as the TLV header is seen.
    let mut payload = INET_BLOCK_BYTES.to_vec();
    payload.extend_from_slice(&[0x02, 0x00, 0x10, b'a', b'b']);
    let wire = raw(0x21, 0x11, &payload);
    let overrun = ProxyProtocolError::TlvOverrun { offset: 28 };
    assert_eq!(err(&wire[..31]), overrun);
    assert_eq!(err(&wire), overrun);
    assert!(matches!(decode(&wire[..30], &Limits::default()), Ok(None)));

    // Fewer than 3 bytes left for a TLV header.
    let mut payload = INET_BLOCK_BYTES.to_vec();
    payload.extend_from_slice(&[0x04, 0x00]);
    assert_eq!(err(&raw(0x21, 0x11, &payload)), overrun);
}

#[test]
fn noop_is_kept_for_exact_re_encoding() {
    let h = v4("1.2.3.4:5", "6.7.8.9:10")
        .with_tlv(PP2_TYPE_NOOP, vec![0; 5])
        .with_alpn("http/1.1");
    let wire = h.encode().unwrap();
    let (decoded, _) = ok(&wire);
    assert_eq!(decoded.tlvs[0].kind, PP2_TYPE_NOOP);
    assert_eq!(decoded, h);
    assert_eq!(decoded.encode().unwrap(), wire);
}

#[test]
fn crc32c_match_and_mismatch() {
    let h = v4("10.0.0.1:1000", "10.0.0.2:2000").with_identity("spiffe://td/ns/a/sa/b");
    let wire = h.encode_with_crc32c().unwrap();
    let (decoded, n) = ok(&wire);
    assert_eq!(n, wire.len());
    assert_eq!(decoded.tlvs[..1], h.tlvs[..]);
    assert_eq!(decoded.tlvs[1].kind, PP2_TYPE_CRC32C);
    // Re-encoding keeps the TLV where it was and reproduces the checksum.
    assert_eq!(decoded.encode().unwrap(), wire);
    assert_eq!(decoded.encode_with_crc32c().unwrap(), wire);

    let stored = u32::from_be_bytes(wire[wire.len() - 4..].try_into().unwrap());
    // A flipped address bit.
    let mut corrupt = wire.to_vec();
    corrupt[19] ^= 0x01;
    assert!(matches!(
        err(&corrupt),
        ProxyProtocolError::Crc32cMismatch { expected, actual } if expected == stored && actual != stored
    ));
    // A flipped checksum bit.
    let mut corrupt = wire.to_vec();
    *corrupt.last_mut().unwrap() ^= 0x80;
    assert!(matches!(
        err(&corrupt),
        ProxyProtocolError::Crc32cMismatch { .. }
    ));
    // Still undecided until the last byte: the checksum covers the whole header.
    assert!(matches!(
        decode(&corrupt[..corrupt.len() - 1], &Limits::default()),
        Ok(None)
    ));
}

#[test]
fn crc32c_placement_is_preserved() {
    // haproxy puts the checksum first; the encoder fills it in wherever it sits.
    let h = v4("10.0.0.1:1000", "10.0.0.2:2000")
        .with_tlv(PP2_TYPE_CRC32C, vec![0; 4])
        .with_authority("example.com");
    let wire = h.encode().unwrap();
    assert_eq!(wire[28], PP2_TYPE_CRC32C);
    let (decoded, _) = ok(&wire);
    assert_eq!(decoded.authority(), Some("example.com"));
    assert_eq!(decoded.encode().unwrap(), wire);
}

#[test]
fn crc32c_tlv_rules() {
    let mut payload = INET_BLOCK_BYTES.to_vec();
    payload.extend_from_slice(&[0x03, 0x00, 0x02, 0, 0]);
    assert_eq!(
        err(&raw(0x21, 0x11, &payload)),
        ProxyProtocolError::TlvMalformed {
            kind: 0x03,
            reason: "CRC32C value must be exactly 4 bytes"
        }
    );
    let two = v4("10.0.0.1:1", "10.0.0.2:2")
        .with_tlv(PP2_TYPE_CRC32C, vec![0; 4])
        .with_tlv(PP2_TYPE_CRC32C, vec![0; 4]);
    assert!(matches!(
        two.encode(),
        Err(EncodeError::InvalidTlv { kind: 0x03, .. })
    ));
    let mut payload = INET_BLOCK_BYTES.to_vec();
    payload.extend_from_slice(&[0x03, 0x00, 0x04, 0, 0, 0, 0, 0x03, 0x00, 0x04, 0, 0, 0, 0]);
    assert_eq!(
        err(&raw(0x21, 0x11, &payload)),
        ProxyProtocolError::TlvMalformed {
            kind: 0x03,
            reason: "more than one CRC32C TLV"
        }
    );
}

#[test]
fn malformed_spec_tlvs() {
    let mut payload = INET_BLOCK_BYTES.to_vec();
    payload.extend_from_slice(&[0x20, 0x00, 0x03, 1, 0, 0]);
    assert!(matches!(
        err(&raw(0x21, 0x11, &payload)),
        ProxyProtocolError::TlvMalformed { kind: 0x20, .. }
    ));
    let mut payload = INET_BLOCK_BYTES.to_vec();
    payload.extend_from_slice(&[0x05, 0x00, 129]);
    payload.extend_from_slice(&[b'u'; 129]);
    assert!(matches!(
        err(&raw(0x21, 0x11, &payload)),
        ProxyProtocolError::TlvMalformed { kind: 0x05, .. }
    ));
    let long_id = v4("10.0.0.1:1", "10.0.0.2:2").with_tlv(PP2_TYPE_UNIQUE_ID, vec![0; 129]);
    assert!(matches!(
        long_id.encode(),
        Err(EncodeError::InvalidTlv { kind: 0x05, .. })
    ));
}

#[test]
fn ssl_tlv() {
    let ssl = Ssl::new(PP2_CLIENT_SSL, 0).with_sub_tlv(PP2_SUBTYPE_SSL_VERSION, "TLSv1.2");
    let h = v4("10.0.0.1:1", "10.0.0.2:2").with_tlv(PP2_TYPE_SSL, ssl.encode().unwrap());
    let (decoded, _) = ok(&h.encode().unwrap());
    assert_eq!(decoded.ssl(), Some(ssl));
}

#[test]
fn encode_errors() {
    let v6: SocketAddr = "[::1]:1".parse().unwrap();
    let mixed = ProxyHeader::v2_proxy("1.2.3.4:1".parse().unwrap(), v6);
    assert_eq!(mixed.encode(), Err(EncodeError::MixedAddressFamilies));
    let unspec_stream = ProxyHeader::local().with_transport(Transport::Stream);
    assert_eq!(
        unspec_stream.encode(),
        Err(EncodeError::BadFamilyTransport(0x01))
    );
    let inet_unspec = v4("1.2.3.4:1", "1.2.3.4:2").with_transport(Transport::Unspec);
    assert_eq!(
        inet_unspec.encode(),
        Err(EncodeError::BadFamilyTransport(0x10))
    );
    // 12 + 3 + 65521 = 65536: one byte too many for `len`.
    let big = v4("1.2.3.4:1", "1.2.3.4:2").with_tlv(0xE0, vec![0; 65521]);
    assert_eq!(big.encode(), Err(EncodeError::TooLarge { len: 65536 }));
    let max = v4("1.2.3.4:1", "1.2.3.4:2").with_tlv(0xE0, vec![0; 65520]);
    let wire = max.encode().unwrap();
    assert_eq!(wire.len(), 16 + 65535);
    let roomy = Limits {
        max_v2_len: usize::from(u16::MAX),
    };
    assert_eq!(decode(&wire, &roomy).unwrap(), Some((max, wire.len())));
    let long_path = ProxyHeader {
        addresses: Addresses::Unix {
            src: vec![b'a'; 109],
            dst: vec![],
        },
        ..v4("1.2.3.4:1", "1.2.3.4:2")
    };
    assert_eq!(
        long_path.encode(),
        Err(EncodeError::UnixPathTooLong { len: 109 })
    );
    let full_path = ProxyHeader {
        addresses: Addresses::Unix {
            src: vec![b'a'; 108],
            dst: vec![b'b'; 108],
        },
        ..v4("1.2.3.4:1", "1.2.3.4:2")
    };
    assert_eq!(ok(&full_path.encode().unwrap()).0, full_path);
    let too_long_tlv = ProxyHeader::local().with_tlv(PP2_TYPE_ALPN, vec![0; 70_000]);
    assert!(matches!(
        too_long_tlv.encode(),
        Err(EncodeError::TooLarge { .. })
    ));
}
