//! IP networks (`10.0.0.0/8`, `fd00::/8`) for address policies: trusted PROXY protocol
//! senders, CONNECT destination allow/deny lists.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as a dual-stack `[::]` listener reports
//! IPv4 peers) match IPv4 networks too, so `10.0.0.0/8` means the same on either kind of
//! socket. Not here: host names, port ranges, negation.

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
/// use proxystack::addr::Cidr;
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
    /// Every IPv4 address, `0.0.0.0/0`.
    pub const ANY_V4: Cidr = Cidr {
        network: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        prefix: 0,
    };

    /// Every IPv6 address, `::/0`.
    pub const ANY_V6: Cidr = Cidr {
        network: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        prefix: 0,
    };

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
