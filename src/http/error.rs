//! The forwarding error: where it came from, whether a retry could help, which status.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::BoxBody;
use crate::BoxError;

/// Which side of the proxy a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorOrigin {
    /// The client sent something we refuse, or its body failed.
    Downstream,
    /// The upstream could not be reached, timed out or broke the protocol.
    Upstream,
    /// Configuration or routing (no route).
    Internal,
}

/// What went wrong while forwarding a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardErrorKind {
    /// The router returned no target (`404`).
    NoRoute,
    /// A request the proxy refuses to forward: ambiguous framing, malformed fields,
    /// `Host`/`:authority` conflict (`400`).
    BadRequest(&'static str),
    /// A method this level does not forward, i.e. `CONNECT` (`405`).
    MethodNotAllowed,
    /// The client's request body failed mid-stream (`400`).
    DownstreamBody,
    /// Connecting to the upstream failed (`502`).
    Connect,
    /// Connecting to the upstream timed out, or it did not answer within the request
    /// timeout (`504`).
    Timeout,
    /// The upstream connection failed or broke the protocol (`502`).
    Upstream,
}

/// A forwarding failure, turned into a short plain-text response by [`Forward`].
///
/// [`Forward`]: super::Forward
#[derive(Debug)]
pub struct ForwardError {
    kind: ForwardErrorKind,
    source: Option<BoxError>,
}

impl ForwardError {
    pub(crate) fn new(kind: ForwardErrorKind) -> Self {
        Self { kind, source: None }
    }

    pub(crate) fn with(kind: ForwardErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: Some(source.into()),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ForwardErrorKind {
        self.kind
    }

    /// Where it came from.
    pub fn origin(&self) -> ErrorOrigin {
        match self.kind {
            ForwardErrorKind::NoRoute => ErrorOrigin::Internal,
            ForwardErrorKind::BadRequest(_)
            | ForwardErrorKind::MethodNotAllowed
            | ForwardErrorKind::DownstreamBody => ErrorOrigin::Downstream,
            ForwardErrorKind::Connect | ForwardErrorKind::Timeout | ForwardErrorKind::Upstream => {
                ErrorOrigin::Upstream
            }
        }
    }

    /// Whether sending the same request again (maybe elsewhere) could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ForwardErrorKind::Connect | ForwardErrorKind::Timeout | ForwardErrorKind::Upstream
        )
    }

    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ForwardErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ForwardErrorKind::BadRequest(_) | ForwardErrorKind::DownstreamBody => {
                StatusCode::BAD_REQUEST
            }
            ForwardErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ForwardErrorKind::Connect | ForwardErrorKind::Upstream => StatusCode::BAD_GATEWAY,
            ForwardErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The response for the client: the status, a one-line plain-text body, and the kind
    /// in the response extensions (for logging/metrics middleware).
    pub fn into_response(self) -> Response<BoxBody> {
        let status = self.status();
        let text = match self.kind {
            ForwardErrorKind::BadRequest(why) => format!("bad request: {why}\n"),
            ForwardErrorKind::NoRoute => "no route\n".to_string(),
            ForwardErrorKind::MethodNotAllowed => "method not allowed\n".to_string(),
            ForwardErrorKind::DownstreamBody => "request body failed\n".to_string(),
            ForwardErrorKind::Connect => "upstream unreachable\n".to_string(),
            ForwardErrorKind::Timeout => "upstream timed out\n".to_string(),
            ForwardErrorKind::Upstream => "upstream failed\n".to_string(),
        };
        let body = Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp.extensions_mut().insert(self.kind);
        resp
    }
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ForwardErrorKind::NoRoute => f.write_str("no route for request"),
            ForwardErrorKind::BadRequest(why) => write!(f, "bad request: {why}"),
            ForwardErrorKind::MethodNotAllowed => f.write_str("method not forwarded"),
            ForwardErrorKind::DownstreamBody => f.write_str("request body failed"),
            ForwardErrorKind::Connect => f.write_str("upstream connect failed"),
            ForwardErrorKind::Timeout => f.write_str("upstream timed out"),
            ForwardErrorKind::Upstream => f.write_str("upstream failed"),
        }
    }
}

impl std::error::Error for ForwardError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
