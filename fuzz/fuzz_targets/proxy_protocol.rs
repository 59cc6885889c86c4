//! Fuzzes the PROXY protocol decoder.
//!
//! The first input byte picks where incremental feeding starts; the rest is the stream.
//! Checked, besides "never panics":
//! * the verdict depends only on the bytes it was made on: every prefix from the chosen
//!   split on is `Incomplete` until the decoder decides, and the same header or the same
//!   error after;
//! * a decoded header re-encodes, and the result decodes to the same header (byte for
//!   byte for v2 PROXY; a v2 LOCAL header may shed its address block, which changes its
//!   CRC32C; v1 addresses are re-spelled canonically).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxystack::proxy_protocol::{
    decode, Command, Decoded, Limits, ProxyHeader, Version, PP2_TYPE_CRC32C,
};

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let limits = Limits::default();
    let verdict = decode(input, &limits);

    let start = usize::from(split) * input.len() / usize::from(u8::MAX);
    for end in start..=input.len() {
        let prefix = decode(&input[..end], &limits);
        let undecided = prefix == Ok(Decoded::Incomplete);
        match &verdict {
            Ok(Decoded::Complete { consumed, .. }) if end < *consumed => assert!(undecided),
            _ => assert!(
                undecided || prefix == verdict,
                "prefix {end}: {prefix:?} vs {verdict:?}"
            ),
        }
    }

    let Ok(Decoded::Complete { header, consumed }) = verdict else {
        return;
    };
    let wire = header.encode().expect("a decoded header must re-encode");
    if header.version == Version::V2 && header.command == Command::Proxy {
        assert_eq!(&wire[..], &input[..consumed]);
    }
    match decode(&wire, &limits) {
        Ok(Decoded::Complete {
            header: again,
            consumed,
        }) => {
            assert_eq!(consumed, wire.len());
            assert_eq!(blank_crc(again), blank_crc(header));
        }
        other => panic!("re-encoded header does not decode: {other:?}"),
    }
});

/// The CRC32C covers the header bytes, so it legitimately changes when a LOCAL header
/// drops its address block on re-encoding.
fn blank_crc(mut header: ProxyHeader) -> ProxyHeader {
    for tlv in header.tlvs.iter_mut().filter(|t| t.kind == PP2_TYPE_CRC32C) {
        tlv.value = Default::default();
    }
    header
}
