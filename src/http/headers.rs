//! Header rewriting for forwarding: hop-by-hop removal (RFC 9110 §7.6.1), `Forwarded`
//! (RFC 7239), `X-Forwarded-For`/`-Proto`, `Via` (RFC 9110 §7.6.3), and the edge's removal
//! of every forwarding field a client sent.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Fields that only concern one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// legacy `Proxy-Connection`, RFC 7540 §3.2.1 `HTTP2-Settings`, and the proxy
/// authentication fields, which are addressed to this proxy), in the order of
/// [`hop_by_hop_index`]. Names, not strings: removing by `&str` would parse each one again
/// for every message.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("http2-settings"),
];

/// The longest name in [`HOP_BY_HOP`] (`proxy-authorization`).
const LONGEST_HOP_BY_HOP: usize = 19;

/// Where a lower-case field name is in [`HOP_BY_HOP`]. A `match` on the string (length
/// first, then one comparison) rather than nine `HeaderName` comparisons: it runs for
/// every field of every message.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "transfer-encoding" => 3,
        "te" => 4,
        "upgrade" => 5,
        "proxy-authorization" => 6,
        "proxy-authenticate" => 7,
        "http2-settings" => 8,
        _ => return None,
    })
}

/// Whether a `Connection` token (any case) names a field that is removed anyway, or `Host`
/// (which `Connection: host` must not take from the request).
fn removed_anyway(token: &str) -> bool {
    let mut lower = [0u8; LONGEST_HOP_BY_HOP];
    let Some(buf) = lower.get_mut(..token.len()) else {
        return false; // longer than every such name
    };
    for (l, b) in buf.iter_mut().zip(token.bytes()) {
        *l = b.to_ascii_lowercase();
    }
    // ASCII-lowered bytes of a `str` are still UTF-8.
    std::str::from_utf8(buf).is_ok_and(|t| t == "host" || hop_by_hop_index(t).is_some())
}

/// Whether the `Connection` fields contain `token` (case-insensitive).
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop fields, including every field named in `Connection`. `TE: trailers`
/// survives (it is end-to-end in meaning, RFC 9110 §10.1.4, and HTTP/2 allows it). With
/// `upgrade` set, `Upgrade` is kept and `Connection: upgrade` re-added, so the next hop sees
/// a well-formed upgrade request or `101` response.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the few names present finds the hop-by-hop ones (most messages carry
    // none, or just `Connection`); only those are then looked up and removed.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name.as_str()) {
            present |= 1 << i;
        }
    }
    let has = |name: &HeaderName| {
        hop_by_hop_index(name.as_str()).is_some_and(|i| present & (1 << i) != 0)
    };
    if has(&header::CONNECTION) {
        // The fields named there, found before any is removed. Usually there are none
        // (`keep-alive`, `close`, `upgrade` name no field of the message), and then nothing
        // is allocated.
        let mut named: Vec<HeaderName> = Vec::new();
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            // By `&str`: looked up without allocating for absent names.
            if !removed_anyway(token) && headers.contains_key(token) {
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    let trailers = has(&header::TE)
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
            });
    if present != 0 {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            if present & (1 << i) != 0 && !(upgrade && name == header::UPGRADE) {
                headers.remove(name);
            }
        }
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The `Upgrade` protocols a request asks for, minus `h2c` (an HTTP/2 upgrade through a
/// proxy gives the client a raw HTTP/2 connection to the upstream, bypassing the proxy's
/// per-request rules: a known smuggling vector). `None` when nothing is left.
pub(crate) fn upgrade_protocols(headers: &HeaderMap) -> Option<HeaderValue> {
    if !connection_has(headers, "upgrade") {
        return None;
    }
    let kept: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.to_ascii_lowercase().starts_with("h2c"))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// A `Forwarded` node (RFC 7239 §6): an IP with port, quoted whenever it contains `:` or
/// `[` (always for IPv6 and whenever a port is present).
pub(crate) fn forwarded_node(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("\"{}:{}\"", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("\"[{}]:{}\"", a.ip(), a.port()),
    }
}

/// A `Forwarded` value: a token when it is one, else a quoted-string with `"` and `\`
/// escaped (RFC 7239 §4, RFC 9110 §5.6.4).
pub(crate) fn forwarded_value(v: &str) -> String {
    if !v.is_empty() && v.bytes().all(is_tchar) {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// One `Forwarded` element for this hop.
pub(crate) fn forwarded_element(
    client: Option<SocketAddr>,
    by: Option<SocketAddr>,
    host: Option<&str>,
    proto: &str,
) -> String {
    let mut out = String::new();
    if let Some(by) = by {
        let _ = write!(out, "by={};", forwarded_node(by));
    }
    match client {
        Some(c) => {
            let _ = write!(out, "for={}", forwarded_node(c));
        }
        None => out.push_str("for=unknown"),
    }
    if let Some(host) = host {
        let _ = write!(out, ";host={}", forwarded_value(host));
    }
    let _ = write!(out, ";proto={}", forwarded_value(proto));
    out
}

/// `X-Forwarded-For` writes bare IPs (IPv6 unbracketed), by convention.
pub(crate) fn xff_node(ip: IpAddr) -> String {
    ip.to_string()
}

/// Whether a field is one a client can forge to pose as an earlier proxy or to steer the
/// origin's idea of the request's URL: `Forwarded`, `X-Forwarded-*`, `X-Real-IP`,
/// `X-Original-*` (field names are lower case in `http`).
fn is_forwarding_field(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "forwarded"
        || name == "x-real-ip"
        || name.starts_with("x-forwarded-")
        || name.starts_with("x-original-")
}

/// Removes every forwarding field (see `is_forwarding_field`): one pass over the distinct
/// names present; allocates only when there is something to remove.
pub(crate) fn remove_forwarding_fields(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_forwarding_field(name))
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
}

/// Appends `element` to a comma-separated list field, or starts it.
pub(crate) fn append_list(headers: &mut HeaderMap, name: HeaderName, element: &str) {
    let joined = {
        let existing: Vec<&str> = headers
            .get_all(&name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if existing.is_empty() {
            element.to_string()
        } else {
            format!("{}, {element}", existing.join(", "))
        }
    };
    // Elements are built from socket addresses, tokens and escaped quoted-strings, and
    // existing values were valid header values, so this only fails on obs-text input;
    // then the field is replaced by our element alone.
    match HeaderValue::from_str(&joined) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => {
            if let Ok(v) = HeaderValue::from_str(element) {
                headers.insert(name, v);
            }
        }
    }
}

/// Replaces a field with `element`.
pub(crate) fn set(headers: &mut HeaderMap, name: HeaderName, element: &str) {
    if let Ok(v) = HeaderValue::from_str(element) {
        headers.insert(name, v);
    } else {
        headers.remove(name);
    }
}

/// Joins several `Cookie` fields into one with `; ` (RFC 9113 §8.2.3: HTTP/2 may split the
/// cookie into many fields, which MUST be joined before entering HTTP/1.1, where a second
/// `Cookie` line is not allowed, RFC 6265 §5.4).
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// Whether any field value starts or ends with whitespace or holds a control character:
/// malformed in HTTP/2 (RFC 9113 §8.2.1) and never to be forwarded into HTTP/1.
pub(crate) fn find_bad_value(headers: &HeaderMap) -> Option<&HeaderName> {
    headers.iter().find_map(|(name, value)| {
        let b = value.as_bytes();
        let edge_ws =
            matches!(b.first(), Some(b' ' | b'\t')) || matches!(b.last(), Some(b' ' | b'\t'));
        let ctl = b.iter().any(|&c| (c < 0x20 && c != b'\t') || c == 0x7f);
        (edge_ws || ctl).then_some(name)
    })
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_go() {
        let mut h = map(&[
            ("connection", "close, x-secret"),
            ("connection", "Host"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip, trailers;q=0.5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("host", "a"),
            ("x-keep", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "te", "x-keep"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn messages_without_hop_by_hop_fields_are_untouched() {
        let mut h = map(&[("host", "a"), ("x-keep", "yes"), ("x-keep", "twice")]);
        let before = h.clone();
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        let mut h = map(&[
            ("Connection", "X-Secret, CLOSE"),
            ("x-secret", "1"),
            ("close", "2"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn connection_tokens_match_names_in_any_case() {
        let mut h = map(&[
            (
                "connection",
                " Keep-Alive ,HOST, X-A-Rather-Long-Field-Name ,, x-absent",
            ),
            ("keep-alive", "timeout=5"),
            ("x-a-rather-long-field-name", "1"),
            ("host", "a"),
            ("x-keep", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "x-keep"]);
        assert!(removed_anyway("PROXY-AUTHORIZATION"));
        assert!(!removed_anyway("proxy-authorization-x"));
        assert!(!removed_anyway("é"));
    }

    #[test]
    fn upgrade_is_kept_when_upgrading() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(upgrade_protocols(&h).unwrap(), "websocket");
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        let h2c = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(upgrade_protocols(&h2c).is_none());
    }

    #[test]
    fn cookies_are_joined_for_http1() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2"), ("x", "y")]);
        join_cookies(&mut h);
        assert_eq!(
            h.get_all("cookie").iter().collect::<Vec<_>>(),
            [&HeaderValue::from_static("a=1; b=2")]
        );
        let mut one = map(&[("cookie", "a=1")]);
        join_cookies(&mut one);
        assert_eq!(one["cookie"], "a=1");
    }

    #[test]
    fn forwarding_fields_are_removed_and_others_kept() {
        let mut h = map(&[
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-prefix", "/p"),
            ("x-original-forwarded-for", "1.2.3.4"),
            ("x-original-url", "/admin"),
            ("x-real-ip", "1.2.3.4"),
            ("x-forwarded", "not a forwarding field"),
            ("x-originals", "nor this"),
            ("host", "a"),
        ]);
        remove_forwarding_fields(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "x-forwarded", "x-originals"]);
    }

    #[test]
    fn forwarded_quotes_per_rfc7239() {
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let v4: SocketAddr = "192.0.2.60:4711".parse().unwrap();
        assert_eq!(forwarded_node(v6), "\"[::1]:80\"");
        assert_eq!(
            forwarded_element(Some(v4), None, Some("example.com:8080"), "http"),
            "for=\"192.0.2.60:4711\";host=\"example.com:8080\";proto=http"
        );
        assert_eq!(forwarded_value("a\"b"), "\"a\\\"b\"");
    }
}
