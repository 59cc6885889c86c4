//! Workload identities: SPIFFE IDs and the [`PeerIdentity`] metadata.
//!
//! A SPIFFE ID (SPIFFE ID specification §2) is `spiffe://<trust-domain>/<path>`: the trust
//! domain is lowercase letters, digits, `.`, `-` and `_`; the path is `/`-separated,
//! non-empty segments of letters, digits, `.`, `-` and `_`, none of them `.` or `..`, no
//! trailing `/`. Istio's form is `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
//!
//! This module lives outside `tls` because identities also arrive by other routes (the
//! PROXY protocol `0xD0` TLV from a trusted sender); `tls` re-exports it.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted (the specification's limit for URI SANs).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A validated SPIFFE ID.
///
/// ```
/// use proxystack::identity::SpiffeId;
/// let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/reviews".parse().unwrap();
/// assert_eq!(id.trust_domain(), "cluster.local");
/// assert_eq!(id.istio_parts(), Some(("default", "reviews")));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_end: usize,
}

/// The URI, as a person reads it: `SpiffeId("spiffe://…")`.
impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&self.uri).finish()
    }
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// Does not start with `spiffe://`.
    #[error("not a SPIFFE ID: must start with spiffe://")]
    Scheme,
    /// Longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    /// The trust domain is empty or has a character other than `a-z 0-9 . - _`.
    #[error("invalid trust domain {0:?} (allowed: lowercase letters, digits, '.', '-', '_')")]
    TrustDomain(String),
    /// The path has an empty, `.` or `..` segment, a trailing `/`, or a bad character.
    #[error("invalid SPIFFE ID path {0:?}")]
    Path(String),
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let td_ok = !td.is_empty()
            && td.len() <= 255
            && td.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !td_ok {
            return Err(SpiffeIdError::TrustDomain(td.to_owned()));
        }
        if !path.is_empty() {
            let segments_ok = path
                .strip_prefix('/')
                .map(|p| p.split('/').all(valid_segment))
                .unwrap_or(false);
            if !segments_ok {
                return Err(SpiffeIdError::Path(path.to_owned()));
            }
        }
        Ok(Self {
            uri: s.to_owned(),
            td_end: "spiffe://".len() + td.len(),
        })
    }

    /// The Istio identity `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn istio(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        self.uri
            .get("spiffe://".len()..self.td_end)
            .unwrap_or_default()
    }

    /// The path including its leading `/` (empty for a trust domain's own ID).
    pub fn path(&self) -> &str {
        self.uri.get(self.td_end..).unwrap_or_default()
    }

    /// `(namespace, service account)` when the path is exactly `/ns/<ns>/sa/<sa>`, the
    /// only form Istio's ztunnel accepts.
    pub fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut it = self.path().strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

fn valid_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// Metadata: the authenticated identity of the peer — from its mTLS certificate (first
/// valid SPIFFE URI SAN), or from a PROXY protocol header sent by a *trusted* hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub SpiffeId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_uri_only() {
        let id = SpiffeId::istio("cluster.local", "default", "reviews").unwrap();
        assert_eq!(
            format!("{id:?}"),
            r#"SpiffeId("spiffe://cluster.local/ns/default/sa/reviews")"#
        );
    }

    #[test]
    fn valid() {
        for s in [
            "spiffe://cluster.local/ns/default/sa/reviews",
            "spiffe://td",
            "spiffe://a-b_c.d/x/y.z/w-1",
        ] {
            assert_eq!(SpiffeId::parse(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn invalid() {
        for s in [
            "http://td/x",
            "spiffe://",
            "spiffe://TD/x",
            "spiffe://td:443/x",
            "spiffe://user@td/x",
            "spiffe://td/",
            "spiffe://td/ns/x/sa/",
            "spiffe://td//x",
            "spiffe://td/./x",
            "spiffe://td/../x",
            "spiffe://td/x?y",
            "spiffe://td/x#y",
            "spiffe://td/a b",
            "spiffe://td/x,y",
        ] {
            assert!(SpiffeId::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn istio_form() {
        let id = SpiffeId::istio("cluster.local", "ns1", "sa1").unwrap();
        assert_eq!(id.istio_parts(), Some(("ns1", "sa1")));
        for s in [
            "spiffe://td/ns/x/sa",
            "spiffe://td/ns/x/sa/y/z",
            "spiffe://td/x/ns/sa/y",
        ] {
            assert_eq!(SpiffeId::parse(s).unwrap().istio_parts(), None, "{s}");
        }
    }
}
