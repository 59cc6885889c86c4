#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use super::*;

fn complete(input: &[u8]) -> (ProxyHeader, usize) {
    let (header, consumed) = decode(input).unwrap().unwrap();
    // Every strict prefix of the header must itself be undecided.
    for end in 0..consumed {
        assert_eq!(decode(&input[..end]), Ok(None), "prefix of {end} bytes");
    }
    (header, consumed)
}

fn error(input: &[u8]) -> ProxyProtocolError {
    decode(input).unwrap_err()
}

fn inet(src: &str, dst: &str) -> Addresses {
    Addresses::Inet {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
    }
}

#[test]
fn haproxy_send_proxy_tcp4() {
    // Exactly what haproxy's `send-proxy` writes (spec section 2.1 example).
    let wire = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n";
    let (h, n) = complete(wire);
    assert_eq!(n, 47);
    assert_eq!(h.version, Version::V1);
    assert_eq!(h.command, Command::Proxy);
    assert_eq!(h.transport, Transport::Stream);
    assert_eq!(h.addresses, inet("192.168.0.1:56324", "192.168.0.11:443"));
    assert_eq!(encode(&h).unwrap(), &wire[..n]);
}

#[test]
fn tcp6() {
    let wire = b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 0 65535\r\n";
    let (h, n) = complete(wire);
    assert_eq!(n, wire.len());
    assert_eq!(
        h.addresses,
        inet("[2001:db8::1]:0", "[::ffff:10.0.0.1]:65535")
    );
    assert_eq!(encode(&h).unwrap(), &wire[..]);
}

#[test]
fn unknown_ignores_rest_of_line() {
    assert_eq!(
        complete(b"PROXY UNKNOWN\r\n"),
        (ProxyHeader::v1_unknown(), 15)
    );
    let wire = b"PROXY UNKNOWN whatever  goes\there\r\nx";
    assert_eq!(complete(wire), (ProxyHeader::v1_unknown(), wire.len() - 1));
    assert_eq!(
        encode(&ProxyHeader::v1_unknown()).unwrap(),
        &b"PROXY UNKNOWN\r\n"[..]
    );
}

#[test]
fn longest_header_is_accepted() {
    let ff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let wire = format!("PROXY UNKNOWN {ff} {ff} 65535 65535\r\n");
    assert_eq!(wire.len(), MAX_LEN);
    assert_eq!(complete(wire.as_bytes()).1, MAX_LEN);
    let tcp6 = format!("PROXY TCP6 {ff} {ff} 65535 65535\r\n");
    assert_eq!(complete(tcp6.as_bytes()).1, tcp6.len());
}

#[test]
fn too_long() {
    let mut wire = b"PROXY UNKNOWN ".to_vec();
    wire.resize(MAX_LEN, b'a');
    assert_eq!(decode(&wire[..MAX_LEN - 1]).unwrap(), None);
    assert_eq!(error(&wire), ProxyProtocolError::V1TooLong);
    // CR as the 107th byte leaves no room for LF.
    wire[MAX_LEN - 1] = b'\r';
    assert_eq!(error(&wire), ProxyProtocolError::V1TooLong);
    // Addresses in the long embedded-IPv4 form push TCP6 over the limit too.
    let long = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255";
    let tcp6 = format!("PROXY TCP6 {long} {long} 1 2\r\n");
    assert_eq!(error(tcp6.as_bytes()), ProxyProtocolError::V1TooLong);
}

#[test]
fn missing_crlf_waits_then_fails() {
    assert_eq!(decode(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2").unwrap(), None);
    assert_eq!(decode(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r").unwrap(), None);
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"),
        malformed("CR not followed by LF")
    );
}

#[test]
fn lone_lf() {
    let lf = malformed("LF without preceding CR");
    assert_eq!(error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), lf);
    assert_eq!(error(b"PROXY UNKNOWN\n"), lf);
    assert_eq!(error(b"PROXY UNKNOWN abc\ndef\r\n"), lf);
}

#[test]
fn leading_zeros() {
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n"),
        malformed("port has a leading zero")
    );
    // Rejected at the second digit, without waiting for the rest of the line.
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00"),
        malformed("port has a leading zero")
    );
    assert_eq!(
        error(b"PROXY TCP4 01.2.3.4"),
        malformed("IPv4 address octet has a leading zero")
    );
    assert_eq!(complete(b"PROXY TCP4 0.0.0.0 10.0.0.1 0 10\r\n").1, 34);
}

#[test]
fn out_of_range() {
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536"),
        malformed("port exceeds 65535")
    );
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.256"),
        malformed("IPv4 address octet exceeds 255")
    );
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4.5"),
        malformed("IPv4 address has more than four octets")
    );
    assert_eq!(
        error(b"PROXY TCP4 1..3.4"),
        malformed("IPv4 address has an empty octet")
    );
    assert_eq!(
        error(b"PROXY TCP4 1.2.3 "),
        malformed("invalid IPv4 address")
    );
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1"),
        malformed("port is not a decimal number")
    );
}

#[test]
fn family_must_match_protocol() {
    assert_eq!(
        error(b"PROXY TCP4 ::1"),
        malformed("TCP4 address is not a dotted-quad IPv4 address")
    );
    assert_eq!(
        error(b"PROXY TCP6 1.2.3.4 "),
        malformed("invalid IPv6 address")
    );
    assert_eq!(
        error(b"PROXY TCP6 fe80::1%eth0"),
        malformed("TCP6 address contains a character not allowed in an IPv6 address")
    );
}

#[test]
fn spacing_is_strict() {
    let empty = malformed("empty field (fields are separated by exactly one space)");
    assert_eq!(error(b"PROXY  TCP4"), empty);
    assert_eq!(error(b"PROXY TCP4 1.2.3.4  "), empty);
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
        malformed("unexpected data after destination port")
    );
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
        malformed("missing destination port")
    );
    assert_eq!(
        error(b"PROXY TCP4\r\n"),
        malformed("missing addresses and ports")
    );
}

#[test]
fn protocol_is_checked_early() {
    let unknown = malformed("unknown protocol (expected TCP4, TCP6 or UNKNOWN)");
    assert_eq!(error(b"PROXY UDP4"), unknown);
    assert_eq!(error(b"PROXY TCP5"), unknown);
    assert_eq!(error(b"PROXY tcp4"), unknown);
    assert_eq!(error(b"PROXY UNKNOWNX"), unknown);
    assert_eq!(decode(b"PROXY UNKNO").unwrap(), None);
    assert_eq!(error(b"PROXYX"), ProxyProtocolError::NotProxyProtocol);
}

#[test]
fn encode_rejects_what_v1_cannot_express() {
    let src: SocketAddr = "1.2.3.4:1".parse().unwrap();
    let v6: SocketAddr = "[::1]:2".parse().unwrap();
    let v1 = ProxyHeader::v1_proxy(src, src);
    assert!(matches!(
        encode(&v1.clone().with_identity("x")),
        Err(EncodeError::V1Unsupported(_))
    ));
    assert!(matches!(
        encode(&v1.clone().with_transport(Transport::Dgram)),
        Err(EncodeError::V1Unsupported(_))
    ));
    assert_eq!(
        encode(&ProxyHeader::v1_proxy(src, v6)),
        Err(EncodeError::MixedAddressFamilies)
    );
    let local = ProxyHeader {
        version: Version::V1,
        ..ProxyHeader::local()
    };
    assert!(matches!(encode(&local), Err(EncodeError::V1Unsupported(_))));
    let unix = ProxyHeader {
        addresses: Addresses::Unix {
            src: b"/a".to_vec(),
            dst: b"/b".to_vec(),
        },
        ..v1
    };
    assert!(matches!(encode(&unix), Err(EncodeError::V1Unsupported(_))));
}
