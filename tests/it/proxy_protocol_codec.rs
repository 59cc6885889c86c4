#![cfg(feature = "proxy-protocol")]
//! Property tests for the PROXY protocol codec: encode/decode round trips under arbitrary
//! read boundaries, and robustness of the incremental decoder on arbitrary input.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use bytes::Bytes;
use proptest::prelude::*;
use proxystack::proxy_protocol::{
    decode, Addresses, Command, Decoded, Limits, ProxyHeader, ProxyProtocolError, Ssl, Tlv,
    Transport, Version, PP2_TYPE_CRC32C, PP2_TYPE_ISTIO_IDENTITY, PP2_TYPE_ISTIO_SERVICE,
    PP2_TYPE_SSL, PP2_TYPE_UNIQUE_ID, UNIX_ADDR_LEN,
};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

fn v4_pair() -> impl Strategy<Value = Addresses> {
    (
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<[u8; 4]>(),
        any::<u16>(),
    )
        .prop_map(|(s, sp, d, dp)| Addresses::Inet {
            src: SocketAddrV4::new(Ipv4Addr::from(s), sp).into(),
            dst: SocketAddrV4::new(Ipv4Addr::from(d), dp).into(),
        })
}

fn v6_pair() -> impl Strategy<Value = Addresses> {
    // The wire carries neither flow info nor scope id, so both stay 0.
    (
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<[u8; 16]>(),
        any::<u16>(),
    )
        .prop_map(|(s, sp, d, dp)| Addresses::Inet {
            src: SocketAddrV6::new(Ipv6Addr::from(s), sp, 0, 0).into(),
            dst: SocketAddrV6::new(Ipv6Addr::from(d), dp, 0, 0).into(),
        })
}

/// A `sun_path` as it survives the wire: trailing NULs are padding.
fn unix_path() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=UNIX_ADDR_LEN).prop_map(|mut path| {
        while path.last() == Some(&0) {
            path.pop();
        }
        path
    })
}

fn tlv() -> impl Strategy<Value = Tlv> {
    prop_oneof![
        // Any type whose value the spec does not constrain.
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_filter(
                "constrained types have their own strategies",
                |(kind, _)| { ![PP2_TYPE_CRC32C, PP2_TYPE_SSL].contains(kind) }
            )
            .prop_map(|(kind, value)| Tlv::new(kind, value)),
        prop::collection::vec(any::<u8>(), 0..=128).prop_map(|id| Tlv::new(PP2_TYPE_UNIQUE_ID, id)),
        "\\PC{0,40}".prop_map(|s| Tlv::new(PP2_TYPE_ISTIO_IDENTITY, Bytes::from(s))),
        "\\PC{0,40}".prop_map(|s| Tlv::new(PP2_TYPE_ISTIO_SERVICE, Bytes::from(s))),
        (
            any::<u8>(),
            any::<u32>(),
            prop::collection::vec((0x21u8..=0x25, "[ -~]{0,24}"), 0..5)
        )
            .prop_map(|(client, verify, subs)| {
                let ssl = subs
                    .into_iter()
                    .fold(Ssl::new(client, verify), |ssl, (k, v)| {
                        ssl.with_sub_tlv(k, v)
                    });
                Tlv::new(PP2_TYPE_SSL, ssl.encode().unwrap_or_default())
            }),
    ]
}

fn v1_header() -> impl Strategy<Value = ProxyHeader> {
    prop_oneof![
        v4_pair().prop_map(|a| with_addresses(ProxyHeader::v1_unknown(), a, Transport::Stream)),
        v6_pair().prop_map(|a| with_addresses(ProxyHeader::v1_unknown(), a, Transport::Stream)),
        Just(ProxyHeader::v1_unknown()),
    ]
}

fn with_addresses(header: ProxyHeader, addresses: Addresses, transport: Transport) -> ProxyHeader {
    ProxyHeader {
        addresses,
        transport,
        ..header
    }
}

fn v2_header() -> impl Strategy<Value = ProxyHeader> {
    let transport = prop_oneof![Just(Transport::Stream), Just(Transport::Dgram)];
    // AF_UNSPEC is only defined with UNSPEC transport (0x00); INET, INET6 and UNIX only
    // with STREAM or DGRAM (spec section 2.2).
    let addresses = prop_oneof![
        Just((Addresses::Unspec, Transport::Unspec)),
        (v4_pair(), transport.clone()),
        (v6_pair(), transport.clone()),
        ((unix_path(), unix_path()), transport)
            .prop_map(|((src, dst), t)| (Addresses::Unix { src, dst }, t)),
    ];
    (
        prop_oneof![Just(Command::Local), Just(Command::Proxy)],
        addresses,
        prop::collection::vec(tlv(), 0..6),
    )
        .prop_map(|(command, (addresses, transport), tlvs)| ProxyHeader {
            version: Version::V2,
            command,
            transport,
            addresses,
            tlvs,
        })
}

/// What decoding should give back: LOCAL discards family and addresses.
fn expected(header: &ProxyHeader) -> ProxyHeader {
    match header.command {
        Command::Local => ProxyHeader {
            transport: Transport::Unspec,
            addresses: Addresses::Unspec,
            ..header.clone()
        },
        Command::Proxy => header.clone(),
    }
}

/// Splits `len` bytes into consecutive chunks of the given (cycled) sizes.
fn chunk_ends(len: usize, sizes: &[usize]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at >= len {
            break;
        }
        at = (at + size.max(&1)).min(len);
        ends.push(at);
    }
    ends
}

/// Reads `stream` as it would arrive in chunks, re-decoding the accumulated buffer after
/// every push until the decoder decides; returns the outcome and how much was buffered.
fn feed(stream: &[u8], sizes: &[usize]) -> (Result<Decoded, ProxyProtocolError>, usize) {
    let mut buf = Vec::new();
    let mut outcome = (Ok(Decoded::Incomplete), 0);
    for end in chunk_ends(stream.len(), sizes) {
        buf.extend_from_slice(&stream[buf.len()..end]);
        outcome = (decode(&buf, &Limits::default()), buf.len());
        if outcome.0 != Ok(Decoded::Incomplete) {
            break;
        }
    }
    outcome
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..40, 1..16)
}

fn check_round_trip(header: &ProxyHeader, wire: &[u8], trailing: &[u8], sizes: &[usize]) {
    let stream = [wire, trailing].concat();
    let (outcome, buffered) = feed(&stream, sizes);
    let Ok(Decoded::Complete {
        header: decoded,
        consumed,
    }) = outcome
    else {
        panic!("expected a complete header, got {outcome:?}");
    };
    assert_eq!(consumed, wire.len());
    // Decided by the first push that completed the header, not later.
    assert!(buffered >= wire.len());
    assert!(buffered - wire.len() < sizes.iter().max().copied().unwrap_or(1).max(1));
    assert_eq!(decoded, *header);
    let again = decoded.encode().unwrap();
    if decoded.command == Command::Proxy {
        // Byte for byte, TLV order, NOOP and CRC32C placement included.
        assert_eq!(again, wire);
    }
    // A LOCAL header may shed an address block it was sent with (which changes its
    // checksum), nothing more.
    let Ok(Decoded::Complete {
        header: redecoded,
        consumed,
    }) = decode(&again, &Limits::default())
    else {
        panic!("re-encoded header does not decode");
    };
    assert_eq!(consumed, again.len());
    assert_eq!(blank_crc(redecoded), blank_crc(decoded));
}

fn blank_crc(mut header: ProxyHeader) -> ProxyHeader {
    for tlv in header.tlvs.iter_mut().filter(|t| t.kind == PP2_TYPE_CRC32C) {
        tlv.value = Bytes::new();
    }
    header
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn v1_round_trip(
        header in v1_header(),
        trailing in prop::collection::vec(any::<u8>(), 0..64),
        sizes in chunk_sizes(),
    ) {
        let wire = header.encode().unwrap();
        prop_assert!(wire.len() <= 107);
        check_round_trip(&header, &wire, &trailing, &sizes);
    }

    #[test]
    fn v2_round_trip(
        header in v2_header(),
        crc in any::<bool>(),
        trailing in prop::collection::vec(any::<u8>(), 0..64),
        sizes in chunk_sizes(),
    ) {
        if crc {
            let wire = header.encode_with_crc32c().unwrap();
            let stored = Bytes::copy_from_slice(&wire[wire.len() - 4..]);
            let mut with_crc = expected(&header);
            with_crc.tlvs.push(Tlv::new(PP2_TYPE_CRC32C, stored));
            check_round_trip(&with_crc, &wire, &trailing, &sizes);
        } else {
            let wire = header.encode().unwrap();
            check_round_trip(&expected(&header), &wire, &trailing, &sizes);
        }
    }

    #[test]
    fn strict_prefixes_are_incomplete(
        header in prop_oneof![v1_header(), v2_header()],
        crc in any::<bool>(),
    ) {
        let wire = if crc { header.encode_with_crc32c() } else { header.encode() }.unwrap();
        for end in 0..wire.len() {
            prop_assert_eq!(decode(&wire[..end], &Limits::default()), Ok(Decoded::Incomplete));
        }
    }

    #[test]
    fn arbitrary_input_never_panics_and_decides_once(
        preamble in prop_oneof![
            Just(&b""[..]),
            Just(&b"PROXY "[..]),
            Just(&b"PROXY TCP4 "[..]),
            Just(&b"PROXY TCP6 "[..]),
            Just(&b"\r\n\r\n\0\r\nQUIT\n"[..]),
            Just(&b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00"[..]),
        ],
        body in prop::collection::vec(any::<u8>(), 0..300),
        sizes in chunk_sizes(),
    ) {
        check_decides_once(&[preamble, &body].concat(), &sizes)?;
    }

    #[test]
    fn corrupted_headers_never_panic_and_decide_once(
        header in prop_oneof![v1_header(), v2_header()],
        crc in any::<bool>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        sizes in chunk_sizes(),
    ) {
        let wire = if crc { header.encode_with_crc32c() } else { header.encode() };
        let mut wire = wire.unwrap().to_vec();
        for (at, byte) in flips {
            let at = at.index(wire.len());
            wire[at] = byte;
        }
        check_decides_once(&wire, &sizes)?;
    }
}

/// Decoding each chunked prefix never panics, and once the decoder has decided (header
/// or error), every longer input gets the same decision: the verdict depends only on the
/// bytes up to where it was made, never on where reads happened to split.
fn check_decides_once(stream: &[u8], sizes: &[usize]) -> Result<(), TestCaseError> {
    let mut decided: Option<Result<Decoded, ProxyProtocolError>> = None;
    for end in chunk_ends(stream.len(), sizes) {
        let outcome = decode(&stream[..end], &Limits::default());
        match (&decided, &outcome) {
            (None, Ok(Decoded::Incomplete)) => {}
            (None, _) => decided = Some(outcome),
            (Some(first), _) => prop_assert_eq!(first, &outcome),
        }
    }
    if let Some(Ok(Decoded::Complete { consumed, .. })) = decided {
        prop_assert!(consumed <= stream.len());
    }
    Ok(())
}

#[test]
fn ztunnel_header_round_trips_with_random_chunking_example() {
    let header = ProxyHeader::v2_proxy(
        SocketAddr::from(([10, 244, 1, 7], 52000)),
        SocketAddr::from(([10, 244, 2, 9], 9080)),
    )
    .with_identity("spiffe://cluster.local/ns/default/sa/client")
    .with_service("reviews.default.svc.cluster.local");
    let wire = header.encode_with_crc32c().unwrap();
    let (outcome, _) = feed(&[&wire[..], b"GET / HTTP/1.1\r\n"].concat(), &[1]);
    let Ok(Decoded::Complete {
        header: decoded,
        consumed,
    }) = outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(consumed, wire.len());
    assert_eq!(decoded.identity(), header.identity());
    assert_eq!(decoded.service(), header.service());
}
