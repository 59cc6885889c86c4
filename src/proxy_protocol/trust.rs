//! Which peers may send a PROXY header: a small CIDR list for IPv4 and IPv6.
//!
//! The spec (haproxy `proxy-protocol.txt`, section 2, "security considerations") leaves
//! trust to configuration: a header is a claim by the *sender*, so a receiver must only
//! accept it from proxies it controls. [`TrustedSources`] is that configuration, checked
//! against the socket's [`PeerAddr`](crate::conn::PeerAddr).
//!
//! IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`, as a dual-stack `[::]` listener reports IPv4
//! clients) match IPv4 networks too, so `10.0.0.0/8` means the same on either kind of
//! listener. Not here: host names, port ranges, negation.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP network: an address and a prefix length, e.g. `10.0.0.0/8` or `fd00::/8`.
///
/// Parsing is strict: the address must not have bits set past the prefix
/// (`10.0.0.1/8` is rejected, as it is almost always a typo for `/32` or `10.0.0.0/8`).
/// A bare address means a single host (`/32` or `/128`).
///
/// ```
/// use proxystack::proxy_protocol::Cidr;
/// let lb: Cidr = "10.1.0.0/16".parse().unwrap();
/// assert!(lb.contains("10.1.2.3".parse().unwrap()));
/// assert!(!lb.contains("10.2.0.1".parse().unwrap()));
/// assert!("10.1.0.1/16".parse::<Cidr>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a string is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidrError {
    /// The part before `/` is not an IP address.
    #[error("{0:?} is not an IP address or network")]
    Address(String),
    /// The prefix length is not a number, or too long for the address family.
    #[error("invalid prefix length in {0:?} (0-32 for IPv4, 0-128 for IPv6)")]
    Prefix(String),
    /// Bits are set after the prefix.
    #[error("{0:?} has host bits set; did you mean the network address or a /32 or /128?")]
    HostBits(String),
}

impl Cidr {
    /// The network `addr/prefix`.
    ///
    /// # Errors
    /// [`CidrError::Prefix`] if `prefix` exceeds the address length,
    /// [`CidrError::HostBits`] if `addr` has bits set past it.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let text = || format!("{addr}/{prefix}");
        if prefix > max_prefix(addr) {
            return Err(CidrError::Prefix(text()));
        }
        if mask(addr, prefix) != addr {
            return Err(CidrError::HostBits(text()));
        }
        Ok(Self {
            network: addr,
            prefix,
        })
    }

    /// The single address `addr` (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        Self {
            network: addr,
            prefix: max_prefix(addr),
        }
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `addr` is in this network. An IPv4-mapped IPv6 address also matches as
    /// the IPv4 address it maps.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.contains_exact(addr) || self.contains_exact(addr.to_canonical())
    }

    fn contains_exact(&self, addr: IpAddr) -> bool {
        match (self.network, addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(addr, self.prefix) == self.network
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with every bit after the first `prefix` cleared (`prefix` ≤ the family's length).
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            // checked_shl: a shift by the full width (prefix 0) is an overflow in Rust.
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & keep).into())
        }
        IpAddr::V6(a) => {
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & keep).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| CidrError::Address(s.to_owned()))?;
        match prefix {
            None => Ok(Self::host(ip)),
            Some(p) => {
                // `u8::from_str` accepts a leading `+`; a prefix is plain digits.
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CidrError::Prefix(s.to_owned()));
                }
                let prefix = p.parse().map_err(|_| CidrError::Prefix(s.to_owned()))?;
                Self::new(ip, prefix).map_err(|e| match e {
                    CidrError::HostBits(_) => CidrError::HostBits(s.to_owned()),
                    _ => CidrError::Prefix(s.to_owned()),
                })
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl From<IpAddr> for Cidr {
    fn from(addr: IpAddr) -> Self {
        Self::host(addr)
    }
}

/// The peers allowed to send PROXY headers. Empty by default: nobody is trusted.
///
/// ```
/// use proxystack::proxy_protocol::TrustedSources;
/// let lbs = TrustedSources::parse(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]).unwrap();
/// assert!(lbs.contains("10.9.8.7".parse().unwrap()));
/// assert!(lbs.contains("::ffff:10.9.8.7".parse().unwrap()));
/// assert!(lbs.contains("192.0.2.7".parse().unwrap()));
/// assert!(!lbs.contains("192.0.2.8".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedSources(Vec<Cidr>);

impl TrustedSources {
    /// Trusts nobody.
    pub fn none() -> Self {
        Self::default()
    }

    /// Trusts every peer (`0.0.0.0/0` and `::/0`): only for listeners that nothing but
    /// your own proxies can reach (a Unix socket, a private network namespace).
    pub fn any() -> Self {
        Self(vec![
            Cidr {
                network: IpAddr::V4(0.into()),
                prefix: 0,
            },
            Cidr {
                network: IpAddr::V6(0.into()),
                prefix: 0,
            },
        ])
    }

    /// Parses networks such as `"10.0.0.0/8"`, `"::1/128"` or `"192.0.2.7"`.
    ///
    /// # Errors
    /// The first entry that is not a valid [`Cidr`].
    pub fn parse<T: AsRef<str>>(networks: impl IntoIterator<Item = T>) -> Result<Self, CidrError> {
        networks
            .into_iter()
            .map(|n| n.as_ref().trim().parse())
            .collect()
    }

    /// Adds a network.
    pub fn push(&mut self, network: Cidr) {
        self.0.push(network);
    }

    /// Whether `addr` is in one of the networks.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(addr))
    }

    /// Whether no peer is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The networks.
    pub fn networks(&self) -> &[Cidr] {
        &self.0
    }
}

impl FromIterator<Cidr> for TrustedSources {
    fn from_iter<T: IntoIterator<Item = Cidr>>(iter: T) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl Extend<Cidr> for TrustedSources {
    fn extend<T: IntoIterator<Item = Cidr>>(&mut self, iter: T) {
        self.0.extend(iter);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_networks() {
        let n = cidr("192.168.4.0/22");
        for inside in ["192.168.4.0", "192.168.5.17", "192.168.7.255"] {
            assert!(n.contains(ip(inside)), "{inside}");
        }
        for outside in ["192.168.3.255", "192.168.8.0", "10.0.0.1", "::1"] {
            assert!(!n.contains(ip(outside)), "{outside}");
        }
        assert!(cidr("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::2")));
        assert!(cidr("127.0.0.1/32").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1/32").contains(ip("127.0.0.2")));
        assert_eq!(cidr("127.0.0.1"), cidr("127.0.0.1/32"));
    }

    #[test]
    fn v6_networks() {
        let n = cidr("2001:db8:abcd::/48");
        assert!(n.contains(ip("2001:db8:abcd:ffff::1")));
        assert!(!n.contains(ip("2001:db8:abce::1")));
        assert!(!n.contains(ip("10.0.0.1")));
        assert!(cidr("::/0").contains(ip("fe80::1")));
        assert!(cidr("::1").contains(ip("::1")));
        assert!(!cidr("::1").contains(ip("::2")));
        // Prefixes that do not fall on a 16-bit group boundary.
        let odd = cidr("fc00::/7");
        assert!("fd00::/7".parse::<Cidr>().is_err(), "host bit set");
        assert!(odd.contains(ip("fc00::1")) && odd.contains(ip("fdff::1")));
        assert!(!odd.contains(ip("fe00::1")));
        assert!(cidr("2001:db8::8000/113").contains(ip("2001:db8::ffff")));
        assert!(!cidr("2001:db8::8000/113").contains(ip("2001:db8::7fff")));
    }

    #[test]
    fn mapped_addresses_match_v4_networks() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
        // A network written in mapped form still matches mapped addresses.
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn invalid() {
        for (s, want) in [
            ("", CidrError::Address(String::new())),
            ("10.0.0/8", CidrError::Address("10.0.0/8".into())),
            ("example.com/8", CidrError::Address("example.com/8".into())),
            ("10.0.0.0/33", CidrError::Prefix("10.0.0.0/33".into())),
            ("10.0.0.0/", CidrError::Prefix("10.0.0.0/".into())),
            ("10.0.0.0/+8", CidrError::Prefix("10.0.0.0/+8".into())),
            ("10.0.0.0/8/8", CidrError::Prefix("10.0.0.0/8/8".into())),
            ("::/129", CidrError::Prefix("::/129".into())),
            ("::/0128", CidrError::Prefix("::/0128".into())),
            ("10.0.0.1/8", CidrError::HostBits("10.0.0.1/8".into())),
            (
                "2001:db8::1/32",
                CidrError::HostBits("2001:db8::1/32".into()),
            ),
        ] {
            assert_eq!(s.parse::<Cidr>(), Err(want), "{s:?}");
        }
    }

    #[test]
    fn lists() {
        assert!(!TrustedSources::none().contains(ip("127.0.0.1")));
        assert!(TrustedSources::any().contains(ip("203.0.113.1")));
        assert!(TrustedSources::any().contains(ip("2001:db8::1")));
        let t = TrustedSources::parse([" 127.0.0.1/32 ", "::1"]).unwrap();
        assert_eq!(t.networks().len(), 2);
        assert!(t.contains(ip("127.0.0.1")) && t.contains(ip("::1")));
        assert!(!t.contains(ip("127.0.0.2")));
        assert!(TrustedSources::parse(["127.0.0.1/32", "nope"]).is_err());
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }
}
