//! CONNECT tunnels: terminate and originate them over HTTP/1.1 (RFC 9110 §9.3.6) and
//! HTTP/2 (RFC 9113 §8.5, extended CONNECT RFC 8441).
//!
//! * [`ConnectTerminate`] is a terminal inbound service: it serves HTTP/1.1 and/or HTTP/2
//!   on the connection, and every accepted CONNECT becomes a new [`Conn<BoxIo>`] handed
//!   to an inbound service — normally the same graph again (see
//!   [`Recursive`](crate::recursive::Recursive)), so tunnels nest to any depth (bounded).
//!   The tunnel carries [`TunnelInfo`] (authority, headers, depth) and [`Outer`] (the
//!   metadata of the connection it arrived on). `200` is sent only once the inner service
//!   has *admitted* the tunnel ([`Admission`](crate::admission::Admission)): `tcp::Relay` does
//!   so after its upstream connected; a refusal becomes `502/503/504`, a policy denial
//!   `401/403`, a malformed request or authority `400`, and a destination that is one of
//!   the proxy's own listeners ([`tcp::OwnListeners`](crate::tcp::OwnListeners), checked
//!   by the relay's `TcpConnector`) `503`.
//!   A connection speaks HTTP/2 if it starts with the HTTP/2 preface, else HTTP/1.1
//!   (unless one of them is switched off). [`ConnectTerminateLayer`] builds it in a
//!   `ServiceBuilder`, the layered service running the tunnels.
//! * [`H2ConnectPool`] opens tunnels as streams of pooled, multiplexed HTTP/2 connections
//!   over any connector; [`Http1ConnectConnector`] opens one through an HTTP/1.1 proxy.
//!
//! HTTP/2 is spoken with the `h2` crate directly, on both sides, so that each tunnel is an
//! [`H2Stream`] with RFC 9113 §8.5's mapping: FIN ↔ `END_STREAM`, TCP reset ↔
//! `RST_STREAM(CONNECT_ERROR)`, both ways. A relay whose other side failed aborts the
//! tunnel through the [`Abort`](crate::admission::Abort) handle in its metadata (the stream then
//! ends with `CONNECT_ERROR`); a received `CONNECT_ERROR` reads as a reset
//! ([`ConnectionReset`](std::io::ErrorKind::ConnectionReset)), so the relay resets its TCP
//! side. A received `RST_STREAM(NO_ERROR|CANCEL)` reads as EOF, as ztunnel does; a tunnel
//! dropped without shutdown or abort sends `RST_STREAM(CANCEL)`. Both sides send PINGs
//! (default every 10 s, 20 s to answer) and drop a connection whose peer stopped answering;
//! the terminator answers a drain with `GOAWAY` and lets open tunnels finish. HTTP/1.1 is
//! hyper's: its tunnels can only end with a FIN, except that one running inside an HTTP/2
//! tunnel aborts that tunnel.
//!
//! Not here: CONNECT-UDP (RFC 9298), HTTP/3, proxy authentication schemes beyond a static
//! header.
//!
//! [`Conn<BoxIo>`]: crate::Conn

mod deferred;
mod h1_client;
mod keepalive;
mod pool;
mod stream;
mod terminate;

use std::sync::Arc;

use http::{HeaderMap, StatusCode};

pub use h1_client::Http1ConnectConnector;
pub use pool::{H2ConnectPool, PoolKey, PooledTunnel};
pub use stream::H2Stream;
pub use terminate::{ConnectTerminate, ConnectTerminateLayer, Decision, Policy, TunnelRequest};

use crate::addr::Authority;
use crate::admission::Refusal;

/// Metadata on a tunnel's connection: what the CONNECT request said.
#[derive(Debug, Clone)]
pub struct TunnelInfo {
    /// The requested `host:port`.
    pub authority: Authority,
    /// HTTP/1.1 or HTTP/2.
    pub version: http::Version,
    /// The extended CONNECT `:protocol` (RFC 8441), e.g. `websocket`.
    pub protocol: Option<String>,
    /// The request headers (pseudo-headers excluded).
    pub headers: HeaderMap,
    /// 1 for a tunnel on a plain connection, 2 for a tunnel inside a tunnel, …
    pub depth: u8,
}

/// Metadata on a tunnel's connection: the metadata of the connection it arrived on.
#[derive(Debug, Clone)]
pub struct Outer(pub Arc<http::Extensions>);

/// Finds a metadata fact on a connection or, failing that, on the connections it is
/// tunnelled in (innermost first).
pub fn lookup<T: Send + Sync + 'static>(metadata: &http::Extensions) -> Option<&T> {
    let mut cur = metadata;
    loop {
        if let Some(v) = cur.get::<T>() {
            return Some(v);
        }
        cur = &cur.get::<Outer>()?.0;
    }
}

/// Target metadata for CONNECT connectors: the `:authority` to request, when it differs
/// from the address dialled (HBONE: dial `pod:15008`, request `pod:8080`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectAuthority(pub Authority);

/// Target metadata for CONNECT connectors: extra request headers.
#[derive(Debug, Clone, Default)]
pub struct ConnectHeaders(pub HeaderMap);

/// Metadata on a tunnel a connector opened: the response headers.
#[derive(Debug, Clone)]
pub struct ConnectResponse(pub HeaderMap);

/// The status a terminator answers for a refusal from its inner service.
pub fn status_for(refusal: Refusal) -> StatusCode {
    match refusal {
        Refusal::Denied => StatusCode::FORBIDDEN,
        // A loop to ourselves is answered as ztunnel answers it.
        Refusal::Refused | Refusal::Loop => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Unreachable => StatusCode::BAD_GATEWAY,
        Refusal::TimedOut => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// The refusal a non-200 answer to our CONNECT means, so an outer terminator can pass it on.
pub fn refusal_for_status(status: StatusCode) -> Refusal {
    match status {
        StatusCode::UNAUTHORIZED
        | StatusCode::FORBIDDEN
        | StatusCode::PROXY_AUTHENTICATION_REQUIRED => Refusal::Denied,
        StatusCode::SERVICE_UNAVAILABLE => Refusal::Refused,
        StatusCode::GATEWAY_TIMEOUT => Refusal::TimedOut,
        _ => Refusal::Unreachable,
    }
}

/// Why a CONNECT tunnel could not be opened.
///
/// The HTTP errors inside are a `hyper::Error` (HTTP/1.1) or an `h2::Error` (HTTP/2);
/// downcast the source to inspect them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// The connection to the proxy could not be made.
    #[error("connecting to the proxy failed")]
    Connect(#[source] crate::BoxError),
    /// The HTTP handshake with the proxy failed.
    #[error("{context}")]
    Handshake {
        /// What to check.
        context: &'static str,
        /// The HTTP error.
        #[source]
        source: crate::BoxError,
    },
    /// The proxy answered something other than 200.
    #[error("proxy refused the tunnel with {status}")]
    Refused {
        /// The status.
        status: StatusCode,
        /// The refusal class, for an outer terminator.
        #[source]
        refusal: crate::admission::UpstreamRefusal,
    },
    /// The request or the upgrade failed.
    #[error("CONNECT request failed")]
    Request(#[source] crate::BoxError),
    /// The proxy closed the connection without answering.
    #[error(
        "the proxy closed the connection without answering the CONNECT; on a new TLS \
         connection this usually means it rejected our client certificate (TLS 1.3 servers \
         report that only after the handshake)"
    )]
    PeerClosed(#[source] crate::BoxError),
    /// Building the request failed (invalid header value, authority).
    #[error("invalid CONNECT request")]
    InvalidRequest(#[source] http::Error),
    /// The proxy did not answer in time.
    #[error("no answer to CONNECT within {0:?}")]
    Timeout(std::time::Duration),
}

impl TunnelError {
    fn refused(status: StatusCode) -> Self {
        TunnelError::Refused {
            status,
            refusal: crate::admission::UpstreamRefusal(refusal_for_status(status)),
        }
    }

    /// Whether another attempt could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            TunnelError::Refused { status, .. } => status.is_server_error(),
            TunnelError::InvalidRequest(_) => false,
            _ => true,
        }
    }
}
