//! Host and port parsing, shared by [`Target`](crate::Target) and CONNECT authorities.
//!
//! Accepts exactly the `authority-form` of RFC 9110 §7.2 / RFC 9112 §3.2.3 minus
//! everything a proxy should not accept from a peer: `host:port` with a DNS name, an IPv4
//! literal or a bracketed IPv6 literal, and a port in `1..=65535`.
//!
//! Deliberately rejected: userinfo (`user@host:1`), paths, queries and fragments,
//! unbracketed IPv6, IPv6 zone identifiers, a missing or zero port, and hostnames whose last
//! label is numeric (`127.1`, `0x7f.1`): the system resolver would read those as IPv4
//! addresses, which would let a name slip past an IP-based allow-list.
//!
//! This parser is small, bounded (it never allocates more than the input) and owned by us,
//! so it is fuzzed (`fuzz/fuzz_targets/authority.rs`) and property-tested.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

pub use crate::cidr::{Cidr, CidrError};

/// Longest authority text we accept: a 253-byte DNS name, `:` and five port digits.
pub const MAX_AUTHORITY_LEN: usize = 253 + 1 + 5;

/// The host part of an [`Authority`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A DNS name, as written (case preserved, no trailing dot).
    Name(String),
}

/// A validated `host:port` pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authority {
    host: Host,
    port: u16,
}

/// Why a `host:port` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The input was empty.
    #[error("empty authority")]
    Empty,
    /// The input is longer than [`MAX_AUTHORITY_LEN`].
    #[error("authority is {0} bytes, longer than the {MAX_AUTHORITY_LEN}-byte limit")]
    TooLong(usize),
    /// The input contains `@`: userinfo is not allowed in an authority we act on.
    #[error("authority contains userinfo (`@`)")]
    Userinfo,
    /// The input contains a path, query or fragment.
    #[error("authority contains a path, query or fragment")]
    Path,
    /// No `:port` suffix.
    #[error("authority has no port (expected host:port)")]
    MissingPort,
    /// The port is not a decimal number in `1..=65535`.
    #[error("port {0:?} is not a number in 1..=65535")]
    BadPort(String),
    /// An IPv6 literal without brackets, e.g. `::1:80`.
    #[error("IPv6 address must be in brackets, e.g. [::1]:80")]
    UnbracketedIpv6,
    /// A bracketed literal that is not an IPv6 address (zone IDs are not accepted).
    #[error("invalid IPv6 literal {0:?}")]
    BadIpv6(String),
    /// The host is neither an IP literal nor a valid DNS name.
    #[error("invalid host name {0:?}")]
    BadHost(String),
    /// A name whose last label is numeric; resolvers would treat it as an IPv4 address.
    #[error("host name {0:?} ends in a numeric label and would be read as an IPv4 address")]
    NumericHost(String),
}

impl Authority {
    /// Parses `host:port` (see the [module docs](self) for the exact rules).
    pub fn parse(s: &str) -> Result<Self, AuthorityError> {
        if s.is_empty() {
            return Err(AuthorityError::Empty);
        }
        if s.len() > MAX_AUTHORITY_LEN + 2 {
            return Err(AuthorityError::TooLong(s.len()));
        }
        if s.contains('@') {
            return Err(AuthorityError::Userinfo);
        }
        if s.contains(['/', '?', '#']) {
            return Err(AuthorityError::Path);
        }
        if let Some(rest) = s.strip_prefix('[') {
            let (literal, after) = rest
                .split_once(']')
                .ok_or_else(|| AuthorityError::BadIpv6(s.to_owned()))?;
            let port = after.strip_prefix(':').ok_or(AuthorityError::MissingPort)?;
            let ip = Ipv6Addr::from_str(literal)
                .map_err(|_| AuthorityError::BadIpv6(literal.to_owned()))?;
            return Ok(Self::new(Host::Ip(IpAddr::V6(ip)), parse_port(port)?));
        }
        let (host, port) = s.rsplit_once(':').ok_or(AuthorityError::MissingPort)?;
        if host.contains(':') {
            return Err(AuthorityError::UnbracketedIpv6);
        }
        let port = parse_port(port)?;
        Ok(Self::new(parse_host(host)?, port))
    }

    /// Builds an authority from parts. The name is not re-validated; use
    /// [`Authority::parse`] for untrusted input.
    pub fn new(host: Host, port: u16) -> Self {
        Self { host, port }
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The same host with another port.
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// The socket address, when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Name(_) => None,
        }
    }

    /// The IP literal with IPv4-mapped IPv6 (`[::ffff:127.0.0.1]`) turned into IPv4, so that
    /// address policies see the address the kernel will actually dial.
    pub fn canonical_ip(&self) -> Option<IpAddr> {
        match self.host {
            Host::Ip(ip) => Some(ip.to_canonical()),
            Host::Name(_) => None,
        }
    }
}

impl From<SocketAddr> for Authority {
    fn from(addr: SocketAddr) -> Self {
        Self::new(Host::Ip(addr.ip()), addr.port())
    }
}

impl FromStr for Authority {
    type Err = AuthorityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

fn parse_port(s: &str) -> Result<u16, AuthorityError> {
    let bad = || AuthorityError::BadPort(s.to_owned());
    // `u16::from_str` accepts a leading `+`; a port is digits only.
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(port) => Ok(port),
    }
}

fn parse_host(s: &str) -> Result<Host, AuthorityError> {
    if s.is_empty() {
        return Err(AuthorityError::BadHost(String::new()));
    }
    if let Ok(ip) = Ipv4Addr::from_str(s) {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    if s.len() > 253 || !s.split('.').all(valid_label) {
        return Err(AuthorityError::BadHost(s.to_owned()));
    }
    let last = s.rsplit('.').next().unwrap_or(s);
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"));
    if numeric {
        return Err(AuthorityError::NumericHost(s.to_owned()));
    }
    Ok(Host::Name(s.to_owned()))
}

/// RFC 1123 labels, plus `_` which service names (`_http._tcp`) use in practice.
fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts() {
        for (s, display) in [
            ("example.com:443", "example.com:443"),
            ("10.0.0.1:80", "10.0.0.1:80"),
            ("[::1]:8080", "[::1]:8080"),
            ("[::ffff:127.0.0.1]:1", "[::ffff:127.0.0.1]:1"),
            (
                "svc.ns.svc.cluster.local:15008",
                "svc.ns.svc.cluster.local:15008",
            ),
            ("a:65535", "a:65535"),
        ] {
            let a = Authority::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(a.to_string(), display);
        }
    }

    #[test]
    fn rejects() {
        use AuthorityError::*;
        for (s, want) in [
            ("", Empty),
            ("user@host:80", Userinfo),
            ("host:80/path", Path),
            ("host", MissingPort),
            ("host:", BadPort(String::new())),
            ("host:0", BadPort("0".into())),
            ("host:65536", BadPort("65536".into())),
            ("host:+80", BadPort("+80".into())),
            ("::1:80", UnbracketedIpv6),
            ("[::1]", MissingPort),
            ("[fe80::1%eth0]:80", BadIpv6("fe80::1%eth0".into())),
            ("bad host:80", BadHost("bad host".into())),
            ("-a.com:80", BadHost("-a.com".into())),
            ("127.1:80", NumericHost("127.1".into())),
            ("0x7f.1:80", NumericHost("0x7f.1".into())),
            ("010.0.0.1:80", NumericHost("010.0.0.1".into())),
        ] {
            assert_eq!(Authority::parse(s), Err(want), "{s}");
        }
    }

    #[test]
    fn canonical_ip_unmaps_ipv4() {
        let a = Authority::parse("[::ffff:127.0.0.1]:80").unwrap();
        assert_eq!(a.canonical_ip(), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
