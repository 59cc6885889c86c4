//! The request headers ztunnel sends with an HBONE CONNECT, and their parsing.
//!
//! `forwarded` (RFC 7239: `for="<ip:port>"[;host=<hostname>]`), `baggage` (W3C Baggage:
//! comma-separated `key=value`), `traceparent` (W3C Trace Context: `00-<32 hex>-<16 hex>-<2
//! hex>`, 55 characters), and `x-forwarded-network` (the network the client's node proxy is
//! in, which ztunnel sends on the inner CONNECT of a double-HBONE tunnel through a network
//! gateway, so that the destination can attribute the connection). Parsing is lenient in what it ignores and strict in what it
//! accepts: a malformed value is dropped, never half-used, and nothing parsed here is
//! copied into another header without re-encoding.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue};

/// Bound on what is parsed from one header, whatever the peer sends.
const MAX_BAGGAGE_ENTRIES: usize = 64;

/// Metadata on an HBONE tunnel: what the client said about the connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HboneHeaders {
    /// The original client address (`forwarded: for=`).
    pub forwarded_for: Option<SocketAddr>,
    /// The intended service host name (`forwarded: host=`).
    pub forwarded_host: Option<String>,
    /// `baggage` entries, in order.
    pub baggage: Vec<(String, String)>,
    /// The trace context.
    pub traceparent: Option<TraceParent>,
    /// The client's network (`x-forwarded-network`, double HBONE across networks).
    pub forwarded_network: Option<String>,
}

/// A W3C `traceparent` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 128-bit trace id.
    pub trace_id: u128,
    /// 64-bit parent span id.
    pub parent_id: u64,
    /// Trace flags.
    pub flags: u8,
}

impl TraceParent {
    /// A random trace context (ztunnel makes one per connection). Not cryptographic.
    pub fn random() -> Self {
        let word = || {
            let mut h = RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.finish()
        };
        Self {
            trace_id: (u128::from(word()) << 64) | u128::from(word()),
            parent_id: word(),
            flags: 0,
        }
    }

    /// Parses the 55-character `00-…` form; other versions and lengths are rejected.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |p: &str, n: usize| {
            p.len() == n
                && p.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if parts.next().is_some()
            || version != "00"
            || !hex(trace, 32)
            || !hex(parent, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        Some(Self {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            parent_id: u64::from_str_radix(parent, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl HboneHeaders {
    /// Parses the headers of a CONNECT request; malformed values are skipped.
    pub fn parse(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let mut out = Self::default();
        if let Some((for_addr, host)) = text("forwarded").and_then(parse_forwarded) {
            out.forwarded_for = for_addr;
            out.forwarded_host = host;
        }
        if let Some(baggage) = text("baggage") {
            out.baggage = baggage
                .split(',')
                .filter_map(|entry| {
                    let (k, v) = entry.split(';').next()?.trim().split_once('=')?;
                    let (k, v) = (k.trim(), v.trim());
                    (!k.is_empty() && k.bytes().all(is_token_char))
                        .then(|| (k.to_owned(), v.to_owned()))
                })
                .take(MAX_BAGGAGE_ENTRIES)
                .collect();
        }
        out.traceparent = text("traceparent").and_then(TraceParent::parse);
        out.forwarded_network = text("x-forwarded-network")
            .filter(|n| is_network_name(n))
            .map(str::to_owned);
        out
    }
}

/// The `for` and `host` parameters of the first `forwarded` element (RFC 7239 §4): the
/// element describes the hop that made the request. Separators inside a quoted-string
/// belong to the value; an unterminated quoted-string or a parameter given twice makes the
/// element malformed (`None`), so that nothing from it is half-used.
fn parse_forwarded(value: &str) -> Option<(Option<SocketAddr>, Option<String>)> {
    let (mut for_addr, mut host) = (None, None);
    let (mut seen_for, mut seen_host) = (false, false);
    let mut rest = value;
    loop {
        let (pair, sep, after) = split_pair(rest)?;
        if let Some((k, v)) = pair.split_once('=') {
            let v = unquote(v.trim())?;
            match k.trim().to_ascii_lowercase().as_str() {
                "for" if seen_for => return None,
                "for" => {
                    seen_for = true;
                    for_addr = v.parse().ok();
                }
                "host" if seen_host => return None,
                "host" => {
                    seen_host = true;
                    host = is_host(&v).then_some(v);
                }
                _ => {}
            }
        }
        match sep {
            Some(';') => rest = after,
            _ => return Some((for_addr, host)),
        }
    }
}

/// Splits off the next `name=value` pair at the first `;` or `,` outside a quoted-string:
/// (pair, separator, rest). `None` when a quoted-string is not terminated.
fn split_pair(s: &str) -> Option<(&str, Option<char>, &str)> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' | ',' if !quoted => return Some((&s[..i], Some(c), &s[i + 1..])),
            _ => {}
        }
    }
    (!quoted).then_some((s, None, ""))
}

/// A token as is, or a quoted-string without its quotes and escapes; `None` if malformed.
fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"') else {
        return (!v.contains('"')).then(|| v.to_owned());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A network name as Istio writes them (`network1`, `vpc-a.us-east`): bounded, and only
/// characters that cannot smuggle structure into logs or labels.
fn is_network_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

fn is_host(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

/// The `forwarded`, `baggage` and `traceparent` headers of an HBONE CONNECT.
/// What a client says about a tunnel in its CONNECT request headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outgoing<'a> {
    pub(crate) forwarded_for: Option<SocketAddr>,
    pub(crate) forwarded_host: Option<&'a str>,
    pub(crate) baggage: Option<&'a str>,
    /// `None`: a new trace (ztunnel starts one per connection).
    pub(crate) traceparent: Option<TraceParent>,
    pub(crate) network: Option<&'a str>,
}

pub(crate) fn request_headers(out: &Outgoing<'_>) -> HeaderMap {
    let (for_addr, host, baggage) = (out.forwarded_for, out.forwarded_host, out.baggage);
    let mut headers = HeaderMap::new();
    if let Some(addr) = for_addr {
        // SocketAddr's Display brackets IPv6 (`[::1]:80`), as RFC 7239 §6 requires inside quotes.
        let mut value = format!("for=\"{addr}\"");
        if let Some(host) = host.filter(|h| is_host(h)) {
            value.push_str(";host=");
            value.push_str(host);
        }
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("forwarded", v);
        }
    }
    if let Some(v) = baggage.and_then(|b| HeaderValue::from_str(b).ok()) {
        headers.insert("baggage", v);
    }
    let trace = out.traceparent.unwrap_or_else(TraceParent::random);
    if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
        headers.insert("traceparent", v);
    }
    if let Some(v) = out
        .network
        .filter(|n| is_network_name(n))
        .and_then(|n| HeaderValue::from_str(n).ok())
    {
        headers.insert("x-forwarded-network", v);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_parse() {
        let h = request_headers(&Outgoing {
            forwarded_for: Some("[::1]:80".parse().unwrap()),
            forwarded_host: Some("reviews.default.svc"),
            baggage: Some("k8s.namespace.name=default,service.name=reviews"),
            ..Outgoing::default()
        });
        assert_eq!(h["forwarded"], "for=\"[::1]:80\";host=reviews.default.svc");
        assert_eq!(h["traceparent"].len(), 55);
        let parsed = HboneHeaders::parse(&h);
        assert_eq!(parsed.forwarded_for, Some("[::1]:80".parse().unwrap()));
        assert_eq!(
            parsed.forwarded_host.as_deref(),
            Some("reviews.default.svc")
        );
        assert_eq!(parsed.baggage.len(), 2);
        assert!(parsed.traceparent.is_some());
    }

    #[test]
    fn trace_context_and_network_are_passed_on() {
        let tp = TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let h = request_headers(&Outgoing {
            traceparent: tp,
            network: Some("network-1"),
            ..Outgoing::default()
        });
        assert_eq!(
            h["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        let parsed = HboneHeaders::parse(&h);
        assert_eq!(
            (parsed.traceparent, parsed.forwarded_network.as_deref()),
            (tp, Some("network-1"))
        );
        // A network name with structure in it is neither sent nor read.
        let mut bad = HeaderMap::new();
        bad.insert("x-forwarded-network", HeaderValue::from_static("a b;c"));
        assert_eq!(HboneHeaders::parse(&bad).forwarded_network, None);
        let h = request_headers(&Outgoing {
            network: Some("a\"b"),
            ..Outgoing::default()
        });
        assert!(h.get("x-forwarded-network").is_none());
    }

    #[test]
    fn rejects_bad_values() {
        for tp in [
            "00-abc-def-00",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01x",
        ] {
            assert!(TraceParent::parse(tp).is_none(), "{tp}");
        }
        assert!(
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_some()
        );
        let mut h = HeaderMap::new();
        h.insert(
            "forwarded",
            HeaderValue::from_static("for=\"not an address\";host=a b"),
        );
        h.insert("baggage", HeaderValue::from_static("=x, ok=1, bad key=2"));
        let p = HboneHeaders::parse(&h);
        assert_eq!(p.forwarded_for, None);
        assert_eq!(p.forwarded_host, None);
        assert_eq!(p.baggage, vec![("ok".to_string(), "1".to_string())]);
    }

    #[test]
    fn forwarded_quoted_strings_are_one_value() {
        let parse = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("forwarded", HeaderValue::from_static(v));
            let p = HboneHeaders::parse(&h);
            (p.forwarded_for, p.forwarded_host)
        };
        // A `;` inside quotes does not start a `host` parameter.
        assert_eq!(parse("for=\"10.1.2.3:4;host=evil\""), (None, None));
        // Unterminated quote, repeated parameter: malformed, nothing used.
        assert_eq!(parse("for=\"10.1.2.3:4;host=evil"), (None, None));
        assert_eq!(parse("for=\"10.1.2.3:4\";for=\"6.6.6.6:1\""), (None, None));
        assert_eq!(
            parse("For=\"10.1.2.3:4\";host=\"a\\.svc\", for=\"6.6.6.6:1\""),
            (
                Some("10.1.2.3:4".parse().unwrap()),
                Some("a.svc".to_string())
            )
        );
    }
}
