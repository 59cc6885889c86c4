#![cfg(feature = "tls")]
//! Property tests for `proxystack::tls::client_hello` against real
//! ClientHellos written by rustls, re-framed and re-chunked at random, and
//! against arbitrary and mutated input.

use std::sync::{Arc, OnceLock};

use proptest::collection::vec;
use proptest::prelude::*;
use proxystack::tls::client_hello::{
    parse, ClientHello, ClientHelloError, ClientHelloParser, Status, DEFAULT_MAX_HELLO_LEN,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

type Verdict = Result<Option<ClientHello>, ClientHelloError>;

/// The first flight rustls writes for `sni` and `alpn`: a single handshake
/// record holding the ClientHello.
pub(crate) fn rustls_hello(sni: &str, alpn: &[Vec<u8>], tls12_only: bool) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("ring supports these versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.to_vec();
    let name = ServerName::try_from(sni.to_owned()).expect("valid DNS name");
    let mut conn = ClientConnection::new(Arc::new(config), name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write to a Vec");
    }
    out
}

/// The handshake bytes carried by a sequence of handshake records.
fn handshake_payload(mut records: &[u8]) -> Vec<u8> {
    let mut hs = Vec::new();
    while let [22, _, _, hi, lo, rest @ ..] = records {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        hs.extend_from_slice(&rest[..len]);
        records = &rest[len..];
    }
    assert!(
        records.is_empty(),
        "rustls wrote something other than handshake records"
    );
    hs
}

/// Frame `hs` into handshake records whose sizes cycle through `sizes`. The
/// first record says 0x0301 and the rest 0x0303, as TLS 1.3 clients may.
fn reframe(hs: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = hs;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (payload, tail) = rest.split_at(size.min(rest.len()));
        let version: u16 = if out.is_empty() { 0x0301 } else { 0x0303 };
        out.push(22);
        out.extend(version.to_be_bytes());
        out.extend((payload.len() as u16).to_be_bytes());
        out.extend(payload);
        rest = tail;
    }
    out
}

/// Feed `input` in pieces whose sizes cycle through `chunks`, stopping at the
/// first answer other than `NeedMore`.
fn feed(parser: &mut ClientHelloParser, input: &[u8], chunks: &[usize]) -> Verdict {
    let mut rest = input;
    for &size in chunks.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(size.clamp(1, rest.len()));
        rest = tail;
        if let Status::Done(hello) = parser.push(piece)? {
            return Ok(Some(hello));
        }
    }
    Ok(None)
}

fn dns_name() -> impl Strategy<Value = String> {
    let label = "[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?";
    (vec(label, 0..4), "[a-z]{2,8}").prop_map(|(mut labels, tld)| {
        labels.push(tld);
        labels.join(".")
    })
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![Just(1usize), 1usize..=16, 1usize..=3000], 1..16)
}

/// A real hello split over three records, to mutate.
fn sample_hello() -> &'static [u8] {
    static SAMPLE: OnceLock<Vec<u8>> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let single = rustls_hello(
            "www.example.com",
            &[b"h2".to_vec(), b"http/1.1".to_vec()],
            false,
        );
        let hs = handshake_payload(&single);
        reframe(&hs, &[40, 100, 16384])
    })
}

fn arbitrary_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Anything at all: mostly rejected on the first byte.
        vec(any::<u8>(), 0..400),
        // A plausible record header, then noise.
        vec(any::<u8>(), 0..400).prop_map(|tail| {
            let mut v = vec![22, 3, 1];
            v.extend(tail);
            v
        }),
        // A plausible record and ClientHello header, then noise.
        (1u8..=255, vec(any::<u8>(), 0..400)).prop_map(|(len, tail)| {
            let mut v = vec![22, 3, 1, 0, len, 1, 0, 0, len.saturating_sub(4)];
            v.extend(tail);
            v
        }),
        // A real hello with a few bytes overwritten and maybe cut short.
        (
            vec((any::<prop::sample::Index>(), any::<u8>()), 1..5),
            any::<prop::sample::Index>(),
            any::<bool>(),
        )
            .prop_map(|(edits, cut, truncate)| {
                let mut v = sample_hello().to_vec();
                for (at, byte) in edits {
                    let i = at.index(v.len());
                    v[i] = byte;
                }
                if truncate {
                    v.truncate(cut.index(v.len()));
                }
                v
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn rustls_hellos_in_any_framing_and_chunking(
        sni in dns_name(),
        alpn in vec(vec(any::<u8>(), 1..=20), 1..=5),
        tls12_only in any::<bool>(),
        record_sizes in vec(prop_oneof![Just(1usize), 1usize..=64, 1usize..=16384], 1..8),
        chunks in chunk_sizes(),
        trailer in vec(any::<u8>(), 0..32),
    ) {
        let single = rustls_hello(&sni, &alpn, tls12_only);
        let framed = reframe(&handshake_payload(&single), &record_sizes);
        let mut input = framed.clone();
        input.extend(&trailer);

        let mut parser = ClientHelloParser::new();
        let hello = feed(&mut parser, &input, &chunks)
            .expect("rustls hellos are valid")
            .expect("the whole hello was fed");

        prop_assert_eq!(hello.sni.as_deref(), Some(sni.as_str()));
        prop_assert_eq!(&hello.alpn, &alpn);
        prop_assert_eq!(hello.len, framed.len());
        prop_assert_eq!(parser.consumed(), framed.len());
        prop_assert_eq!(hello.record_version, 0x0301);
        prop_assert_eq!(hello.offers_tls13(), !tls12_only);
        prop_assert!(alpn.iter().all(|p| hello.has_alpn(p)));
        // Framing changes nothing but the framing.
        let as_sent = parse(&single).expect("valid").expect("complete");
        prop_assert_eq!(hello, ClientHello { len: framed.len(), record_version: 0x0301, ..as_sent });
    }

    #[test]
    fn verdict_does_not_depend_on_chunking(
        input in arbitrary_input(),
        chunks_a in chunk_sizes(),
        chunks_b in chunk_sizes(),
        limit in prop_oneof![Just(DEFAULT_MAX_HELLO_LEN), 0usize..600],
    ) {
        let mut whole = ClientHelloParser::with_limit(limit);
        let expected = feed(&mut whole, &input, &[input.len().max(1)]);
        for chunks in [&chunks_a, &chunks_b, &vec![1]] {
            let mut parser = ClientHelloParser::with_limit(limit);
            prop_assert_eq!(&feed(&mut parser, &input, chunks), &expected);
            prop_assert_eq!(parser.consumed(), whole.consumed());
            prop_assert_eq!(parser.finish(), whole.finish());
        }
        if limit == DEFAULT_MAX_HELLO_LEN {
            prop_assert_eq!(parse(&input), expected);
        }
    }
}

/// Every single-byte corruption of a real hello is handled the same way
/// whether fed at once or a byte at a time.
#[test]
fn every_single_byte_corruption() {
    let sample = sample_hello();
    let mut outcomes = [0usize; 3];
    for i in 0..sample.len() {
        for byte in [0x00, 0xff, sample[i] ^ 0x01, sample[i].wrapping_add(1)] {
            let mut input = sample.to_vec();
            input[i] = byte;
            let whole = parse(&input);
            let mut parser = ClientHelloParser::new();
            assert_eq!(
                feed(&mut parser, &input, &[1]),
                whole,
                "byte {i} set to {byte:#04x}"
            );
            outcomes[match whole {
                Ok(Some(_)) => 0,
                Ok(None) => 1,
                Err(_) => 2,
            }] += 1;
        }
    }
    // Corrupting the random or a key share leaves a valid hello; corrupting
    // a length does not.
    assert!(outcomes.iter().all(|&n| n > 0), "{outcomes:?}");
}

#[test]
fn sample_is_a_three_record_hello() {
    let hello = parse(sample_hello()).unwrap().unwrap();
    assert_eq!(hello.sni.as_deref(), Some("www.example.com"));
    assert_eq!(hello.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(hello.len, sample_hello().len());
    assert!(hello.offers_tls13());
    assert!(hello.len > 2 * 5 + 140);
}

#[test]
fn rustls_hello_without_alpn() {
    let hello = parse(&rustls_hello("a.test", &[], false)).unwrap().unwrap();
    assert!(hello.alpn.is_empty());
    assert!(!hello.extensions.contains(&16));
    assert_eq!(hello.sni.as_deref(), Some("a.test"));
}
