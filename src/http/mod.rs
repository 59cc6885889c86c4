//! The HTTP level: terminate HTTP/1.1 and HTTP/2 on a connection, and forward requests to
//! upstreams as a reverse proxy.
//!
//! * [`HttpServer`] — the terminal inbound service: serves HTTP/1.1 (RFC 9112, with
//!   upgrades) and HTTP/2 (RFC 9113, prior knowledge or after ALPN) on any [`Conn`] with
//!   one `tower` service of `Request<Incoming>`. Connection metadata is copied into every
//!   request's extensions; a drain turns into `GOAWAY` / `Connection: close`. Limits for
//!   slowloris, header floods, rapid reset (CVE-2023-44487) and CONTINUATION floods
//!   (CVE-2024-27919 class) are on by default. A strict HTTP/1 request-head check rejects
//!   what hyper alone would accept but a proxy must not forward: `Content-Length` together
//!   with `Transfer-Encoding`, obfuscated `Transfer-Encoding`, bare LF line ends, duplicate
//!   or (HTTP/1.1) missing `Host` (RFC 9112 §2.2, §3.2, §6.1, §6.3).
//! * [`Forward`] — a reverse proxy `Service<Request<_>>`: per-request upstream choice,
//!   any connector (plain TCP, TLS, tunnels), pooled upstream connections (HTTP/1 idle
//!   reuse, one multiplexed HTTP/2 connection per upstream), hop-by-hop header removal
//!   (RFC 9110 §7.6.1), optional `Forwarded` (RFC 7239) / `X-Forwarded-*` / `Via`
//!   (RFC 9110 §7.6.3), HTTP/1 ↔ HTTP/2 translation with `Host` ↔ `:authority` kept
//!   consistent (RFC 9113 §8.3.1), streaming bodies with backpressure, HTTP/1 `Upgrade`
//!   (WebSocket) passthrough on a `101` only, and `502`/`504` for upstream failures.
//! * [`NormalizePathLayer`] — rewrites request paths (dot segments, duplicate slashes,
//!   needless escapes; encoded separators refused) so that policies and upstreams see the
//!   same path: put it in front of any path-based rule.
//!
//! Not here (deliberately): caching, retries of requests that reached an upstream, load
//! balancing (the router picks one [`Target`]), HTTP/3, `CONNECT` (the `connect` level),
//! RFC 8441 extended CONNECT (WebSocket over HTTP/2), and `Upgrade: h2c` (never forwarded:
//! it is a known request-smuggling vector).
//!
//! [`Conn`]: crate::Conn
//! [`Target`]: crate::Target

mod error;
mod exec;
mod forward;
mod guard;
mod headers;
mod path;
mod pool;
mod server;

use bytes::Bytes;

pub use error::{ErrorOrigin, ForwardError, ForwardErrorKind};
pub use forward::{
    FixedTarget, Forward, ForwardedMode, RequestScheme, RouteRequest, UpstreamProtocol,
    UpstreamTimeout,
};
pub use hyper::body::Incoming;
pub use path::{normalize_path, NormalizePath, NormalizePathLayer, PathError};
pub use pool::PoolKey;
pub use server::{HttpServer, HttpServerError};

/// The body type [`Forward`] answers with: a boxed stream of `Bytes` frames.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, crate::BoxError>;

/// A short plain-text response in [`BoxBody`], for a service or layer in front of
/// [`Forward`] that answers some requests itself (a policy denial, a failed API key check,
/// a misdirected request).
///
/// ```
/// use http::StatusCode;
/// let resp = proxystack::http::plain_response(StatusCode::FORBIDDEN, "denied\n");
/// assert_eq!(resp.status(), StatusCode::FORBIDDEN);
/// assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
/// ```
pub fn plain_response(status: http::StatusCode, text: impl Into<Bytes>) -> http::Response<BoxBody> {
    use http_body_util::BodyExt;
    let body = http_body_util::Full::new(text.into())
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
