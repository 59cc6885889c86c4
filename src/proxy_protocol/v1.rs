//! PROXY protocol version 1, the text format (spec section 2.1).
//!
//! The decoder is deliberately stricter than the grammar's prose: exactly one space between
//! fields, ports and IPv4 octets in canonical decimal (no sign, no leading zeros, so `0`
//! but never `080`), and a bare LF anywhere is an error rather than a line end. haproxy,
//! nginx and Envoy all emit this canonical form, and rejecting anything else leaves no
//! room for two parsers in a chain to read one header differently.
//!
//! Parsing is a single left-to-right pass that re-runs on every call: each field is
//! checked as a prefix while it grows, so a header is rejected at the first byte that
//! cannot lead to a valid line, and any shorter input reports `None` (need more) instead.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;

use super::codec::{ready, Step};
use super::error::{EncodeError, ProxyProtocolError};
use super::header::{Addresses, Command, ProxyHeader, Transport, Version};

/// What a v1 header starts with.
pub(crate) const PREFIX: &[u8] = b"PROXY ";

/// Longest v1 header including CRLF: `PROXY UNKNOWN` with two 39-character IPv6
/// addresses and two 5-digit ports (spec section 2.1).
const MAX_LEN: usize = 107;

/// Longest textual IPv6 address (`INET6_ADDRSTRLEN` - 1, with an embedded IPv4 suffix).
const MAX_IPV6_TEXT: usize = 45;

const LONE_LF: &str = "LF without preceding CR";
const UNKNOWN_PROTOCOL: &str = "unknown protocol (expected TCP4, TCP6 or UNKNOWN)";

fn malformed(reason: &'static str) -> ProxyProtocolError {
    ProxyProtocolError::V1Malformed(reason)
}

/// Decodes a v1 header at the start of `buf`; `Ok(None)` if `buf` is a strict prefix of one.
pub(crate) fn decode(buf: &[u8]) -> Step<(ProxyHeader, usize)> {
    let mut line = Scanner { buf, pos: 0 };
    for &expected in PREFIX {
        if ready!(line.next()) != expected {
            return Err(ProxyProtocolError::NotProxyProtocol);
        }
    }

    let header = match ready!(line.field(check_protocol)) {
        (b"UNKNOWN", Delim::Cr) => {
            ready!(line.lf());
            ProxyHeader::v1_unknown()
        }
        (b"UNKNOWN", Delim::Space) => {
            // The spec makes receivers ignore whatever follows UNKNOWN up to CRLF.
            ready!(line.skip_to_crlf());
            ProxyHeader::v1_unknown()
        }
        (b"TCP4", Delim::Space) => ready!(inet(&mut line, Family::V4)),
        (b"TCP6", Delim::Space) => ready!(inet(&mut line, Family::V6)),
        (b"TCP4" | b"TCP6", Delim::Cr) => return Err(malformed("missing addresses and ports")),
        _ => return Err(malformed(UNKNOWN_PROTOCOL)),
    };
    Ok(Some((header, line.pos)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// Parses `SRC DST SPORT DPORT\r\n` after `TCP4 ` / `TCP6 `.
fn inet(line: &mut Scanner<'_>, family: Family) -> Step<ProxyHeader> {
    let check_addr = match family {
        Family::V4 => check_ipv4_prefix,
        Family::V6 => check_ipv6_prefix,
    };
    let (src, delim) = ready!(line.field(check_addr));
    let src = parse_ip(src, family)?;
    delim.expect_space("missing destination address")?;

    let (dst, delim) = ready!(line.field(check_addr));
    let dst = parse_ip(dst, family)?;
    delim.expect_space("missing source port")?;

    let (sport, delim) = ready!(line.field(check_port_prefix));
    let sport = parse_port(sport)?;
    delim.expect_space("missing destination port")?;

    let (dport, delim) = ready!(line.field(check_port_prefix));
    let dport = parse_port(dport)?;
    if delim == Delim::Space {
        return Err(malformed("unexpected data after destination port"));
    }
    ready!(line.lf());

    Ok(Some(ProxyHeader::v1_proxy(
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
    )))
}

/// What ended a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delim {
    Space,
    /// A CR; the LF that must follow is not consumed yet.
    Cr,
}

impl Delim {
    fn expect_space(self, reason: &'static str) -> Result<(), ProxyProtocolError> {
        match self {
            Delim::Space => Ok(()),
            Delim::Cr => Err(malformed(reason)),
        }
    }
}

/// A cursor over the line that enforces the 107-byte limit.
struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn next(&mut self) -> Step<u8> {
        // Checked before availability: a byte at offset 107 can never belong to a valid
        // header, so waiting for it would only let a peer hold the connection open.
        if self.pos >= MAX_LEN {
            return Err(ProxyProtocolError::V1TooLong);
        }
        let Some(&byte) = self.buf.get(self.pos) else {
            return Ok(None);
        };
        self.pos += 1;
        Ok(Some(byte))
    }

    /// Reads a non-empty field up to a space or CR, validating every prefix with `check`
    /// so that garbage is rejected without waiting for the delimiter.
    fn field(&mut self, check: fn(&[u8]) -> Result<(), &'static str>) -> Step<(&'a [u8], Delim)> {
        let start = self.pos;
        let delim = loop {
            match ready!(self.next()) {
                b' ' => break Delim::Space,
                b'\r' => break Delim::Cr,
                b'\n' => return Err(malformed(LONE_LF)),
                _ => check(self.consumed_since(start)).map_err(malformed)?,
            }
        };
        let field = self.consumed_since(start);
        let field = field.split_last().map_or(field, |(_delim, field)| field);
        if field.is_empty() {
            return Err(malformed(
                "empty field (fields are separated by exactly one space)",
            ));
        }
        Ok(Some((field, delim)))
    }

    fn lf(&mut self) -> Step<()> {
        match ready!(self.next()) {
            b'\n' => Ok(Some(())),
            _ => Err(malformed("CR not followed by LF")),
        }
    }

    fn skip_to_crlf(&mut self) -> Step<()> {
        loop {
            match ready!(self.next()) {
                b'\r' => return self.lf(),
                b'\n' => return Err(malformed(LONE_LF)),
                _ => {}
            }
        }
    }

    fn consumed_since(&self, start: usize) -> &'a [u8] {
        self.buf.get(start..self.pos).unwrap_or_default()
    }
}

fn check_protocol(prefix: &[u8]) -> Result<(), &'static str> {
    let known: [&[u8]; 3] = [b"TCP4", b"TCP6", b"UNKNOWN"];
    if known.iter().any(|p| p.starts_with(prefix)) {
        Ok(())
    } else {
        Err(UNKNOWN_PROTOCOL)
    }
}

/// Accepts any prefix of a canonical dotted quad: at most four octets of 1-3 digits,
/// each at most 255 and without leading zeros.
fn check_ipv4_prefix(prefix: &[u8]) -> Result<(), &'static str> {
    let mut octets = 0;
    let mut parts = prefix.split(|&b| b == b'.').peekable();
    while let Some(part) = parts.next() {
        octets += 1;
        if octets > 4 {
            return Err("IPv4 address has more than four octets");
        }
        if part.is_empty() && parts.peek().is_some() {
            return Err("IPv4 address has an empty octet");
        }
        check_decimal(part, 3, 255).map_err(|e| match e {
            DecimalError::NotDigit => "TCP4 address is not a dotted-quad IPv4 address",
            DecimalError::LeadingZero => "IPv4 address octet has a leading zero",
            DecimalError::TooLarge => "IPv4 address octet exceeds 255",
        })?;
    }
    Ok(())
}

/// Only the alphabet and length can be judged before the address is complete; the
/// standard library parser then decides (it also accepts `::ffff:a.b.c.d` forms).
fn check_ipv6_prefix(prefix: &[u8]) -> Result<(), &'static str> {
    if prefix.len() > MAX_IPV6_TEXT {
        return Err("IPv6 address too long");
    }
    if prefix
        .iter()
        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    {
        Ok(())
    } else {
        Err("TCP6 address contains a character not allowed in an IPv6 address")
    }
}

fn check_port_prefix(prefix: &[u8]) -> Result<(), &'static str> {
    check_decimal(prefix, 5, 65535).map_err(|e| match e {
        DecimalError::NotDigit => "port is not a decimal number",
        DecimalError::LeadingZero => "port has a leading zero",
        DecimalError::TooLarge => "port exceeds 65535",
    })
}

enum DecimalError {
    NotDigit,
    LeadingZero,
    TooLarge,
}

/// Checks a (possibly partial) canonical decimal number of at most `max_digits` digits
/// whose value is at most `max`.
fn check_decimal(digits: &[u8], max_digits: usize, max: u32) -> Result<(), DecimalError> {
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(DecimalError::NotDigit);
    }
    if digits.len() > 1 && digits.first() == Some(&b'0') {
        return Err(DecimalError::LeadingZero);
    }
    if digits.len() > max_digits {
        return Err(DecimalError::TooLarge);
    }
    let value = digits
        .iter()
        .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'));
    if value > max {
        return Err(DecimalError::TooLarge);
    }
    Ok(())
}

fn parse_ip(field: &[u8], family: Family) -> Result<IpAddr, ProxyProtocolError> {
    let text = std::str::from_utf8(field).map_err(|_| malformed("address is not ASCII"))?;
    match family {
        Family::V4 => text
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| malformed("invalid IPv4 address")),
        Family::V6 => text
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| malformed("invalid IPv6 address")),
    }
}

fn parse_port(field: &[u8]) -> Result<u16, ProxyProtocolError> {
    // The prefix check already guarantees canonical digits within range.
    std::str::from_utf8(field)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| malformed("invalid port"))
}

/// Encodes a v1 header: `PROXY TCP4|TCP6 ...` for TCP over IP, `PROXY UNKNOWN` otherwise.
pub(crate) fn encode(header: &ProxyHeader) -> Result<Bytes, EncodeError> {
    debug_assert_eq!(header.version, Version::V1);
    if !header.tlvs.is_empty() {
        return Err(EncodeError::V1Unsupported("v1 cannot carry TLVs"));
    }
    if header.command == Command::Local {
        return Err(EncodeError::V1Unsupported(
            "v1 has no LOCAL command (PROXY UNKNOWN is the closest equivalent)",
        ));
    }
    let line = match (&header.addresses, header.transport) {
        (Addresses::Unspec, Transport::Unspec) => "PROXY UNKNOWN\r\n".to_owned(),
        (Addresses::Inet { src, dst }, Transport::Stream) => {
            let protocol = match (src, dst) {
                (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
                (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
                _ => return Err(EncodeError::MixedAddressFamilies),
            };
            format!(
                "PROXY {protocol} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
        }
        (Addresses::Unix { .. }, _) => {
            return Err(EncodeError::V1Unsupported("v1 cannot carry UNIX addresses"))
        }
        (Addresses::Inet { .. }, _) => {
            return Err(EncodeError::V1Unsupported(
                "v1 addresses describe TCP only (transport must be Stream)",
            ))
        }
        (Addresses::Unspec, _) => {
            return Err(EncodeError::V1Unsupported(
                "v1 UNKNOWN carries no transport (transport must be Unspec)",
            ))
        }
    };
    debug_assert!(line.len() <= MAX_LEN);
    Ok(Bytes::from(line))
}

#[cfg(test)]
mod tests;
