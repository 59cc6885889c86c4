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

use std::net::IpAddr;

use crate::cidr::{Cidr, CidrError};

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
        Self(vec![Cidr::ANY_V4, Cidr::ANY_V6])
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
