//! Request-path normalization, so that a policy and the upstream see the same path.
//!
//! A rule such as "deny `/admin`" matched against the raw path is bypassed by `/x/../admin`,
//! `//admin` or `/%61dmin`, which many servers resolve to `/admin`. [`NormalizePathLayer`]
//! rewrites the path before anything looks at it, like Envoy's `normalize_path` +
//! `merge_slashes`:
//!
//! * percent-encoded unreserved characters are decoded and other escapes get upper-case
//!   hex (RFC 3986 §6.2.2.1–2);
//! * an encoded `/`, `\` or NUL (`%2F`, `%5C`, `%00`) is refused: whether a server splits
//!   on it differs from server to server, so no rule can be matched safely;
//! * runs of `/` collapse into one;
//! * `.` and `..` segments are removed (RFC 3986 §5.2.4); `..` never climbs above `/`.
//!
//! The query is left as it is. Targets that are not paths (`*`, authority-form) pass
//! unchanged.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use tower::{Layer, Service};

/// Why a path cannot be normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("invalid percent-encoding in the path")]
    InvalidEncoding,
    /// `%2F`, `%5C` or `%00`: a separator or NUL in disguise.
    #[error("encoded '/', '\\' or NUL in the path")]
    EncodedSeparator,
}

/// Normalizes a request path by the rules of [`NormalizePathLayer`]; borrows when nothing
/// changes.
///
/// ```
/// use proxystack::http::normalize_path;
/// assert_eq!(normalize_path("/x/../admin").unwrap(), "/admin");
/// assert_eq!(normalize_path("//admin/./").unwrap(), "/admin/");
/// assert_eq!(normalize_path("/%61dmin%3f").unwrap(), "/admin%3F");
/// assert!(normalize_path("/a%2Fb").is_err());
/// ```
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    // Empty segments (from `//`) vanish; the last one decides the trailing slash.
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        let (before, escape) = rest.split_at(at);
        out.push_str(before);
        let hex = escape
            .get(1..3)
            // `from_str_radix` alone would accept a leading `+`.
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(PathError::InvalidEncoding)?;
        let byte = u8::from_str_radix(hex, 16).map_err(|_| PathError::InvalidEncoding)?;
        match byte {
            b'/' | b'\\' | 0 => return Err(PathError::EncodedSeparator),
            b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => out.push(char::from(b)),
            b => {
                out.push('%');
                out.push_str(&format!("{b:02X}"));
            }
        }
        rest = escape.get(3..).unwrap_or_default();
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

/// Normalizes each request's path before the inner service sees it, so that a policy and
/// the upstream see the same path (a rule for `/admin` matched against the raw path is
/// bypassed by `/x/../admin`, `//admin` or `/%61dmin`), like Envoy's `normalize_path` +
/// `merge_slashes`:
///
/// * percent-encoded unreserved characters are decoded and other escapes get upper-case
///   hex (RFC 3986 §6.2.2.1–2);
/// * an encoded `/`, `\` or NUL (`%2F`, `%5C`, `%00`) is refused with `400`: whether a
///   server splits on it differs from server to server;
/// * runs of `/` collapse into one;
/// * `.` and `..` segments are removed (RFC 3986 §5.2.4); `..` never climbs above `/`.
///
/// The query is left as it is; targets that are not paths (`*`, authority-form) pass
/// unchanged.
///
/// ```
/// use proxystack::http::{HttpServer, NormalizePathLayer};
/// use tower::ServiceBuilder;
/// let policy = tower::service_fn(|req: http::Request<proxystack::http::Incoming>| async move {
///     // `/x/../admin` and `//admin` arrive here as `/admin`.
///     let status = if req.uri().path().starts_with("/admin") { 403 } else { 200 };
///     let mut res = http::Response::new(String::new());
///     *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
///     Ok::<_, std::convert::Infallible>(res)
/// });
/// let server = HttpServer::new(ServiceBuilder::new().layer(NormalizePathLayer).service(policy));
/// # let _ = server;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NormalizePathLayer;

impl<S> Layer<S> for NormalizePathLayer {
    type Service = NormalizePath<S>;

    fn layer(&self, inner: S) -> NormalizePath<S> {
        NormalizePath { inner }
    }
}

/// The service of [`NormalizePathLayer`].
#[derive(Debug, Clone)]
pub struct NormalizePath<S> {
    inner: S,
}

impl<S, B, R> Service<Request<B>> for NormalizePath<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match normalized_uri(req.uri()) {
            Ok(Some(uri)) => *req.uri_mut() = uri,
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(path = req.uri().path(), error = %e, "refusing request path");
                let mut res = Response::new(R::default());
                *res.status_mut() = StatusCode::BAD_REQUEST;
                return Box::pin(std::future::ready(Ok(res)));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// The URI with its path normalized; `None` when it is already normal.
fn normalized_uri(uri: &Uri) -> Result<Option<Uri>, PathError> {
    let Cow::Owned(path) = normalize_path(uri.path())? else {
        return Ok(None);
    };
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    // Normalization only removes or decodes characters a URI already accepted, so the
    // result parses; should it not, refusing is the safe answer.
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).map_err(|_| PathError::InvalidEncoding)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| PathError::InvalidEncoding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//a///b", "/a/b"),
            ("/a/./b/.", "/a/b/"),
            ("/a/../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/..", "/"),
            ("/%2e%2e/admin", "/admin"),
            ("/%2E/admin", "/admin"),
            ("/%7euser", "/~user"),
            ("/a%3fb", "/a%3Fb"),
            ("/a%20b", "/a%20b"),
            ("*", "*"),
        ] {
            assert_eq!(normalize_path(raw).unwrap(), want, "{raw}");
        }
        for bad in ["/a%2fb", "/a%5Cb", "/a%00", "/a%", "/a%4", "/a%zz", "/a%+1"] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unchanged_paths_are_borrowed() {
        assert!(matches!(normalize_path("/a/b?"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize_path("/a/%41"), Ok(Cow::Owned(_))));
    }

    #[test]
    fn query_is_kept() {
        let uri: Uri = "/a/../b?x=/../y".parse().unwrap();
        assert_eq!(normalized_uri(&uri).unwrap().unwrap(), "/b?x=/../y");
        let uri: Uri = "http://h/a//b".parse().unwrap();
        assert_eq!(normalized_uri(&uri).unwrap().unwrap(), "http://h/a/b");
    }

    proptest! {
        #[test]
        fn normal_form_is_stable_and_clean(
            segments in prop::collection::vec(
                prop::sample::select(vec!["", ".", "..", "a", "%2e", "%2E%2e", "b%41", "%7E", "c%3f"]),
                0..12,
            ),
            trailing in any::<bool>(),
        ) {
            let mut path = String::new();
            for s in &segments {
                path.push('/');
                path.push_str(s);
            }
            if trailing || path.is_empty() {
                path.push('/');
            }
            let once = normalize_path(&path).unwrap().into_owned();
            prop_assert_eq!(normalize_path(&once).unwrap(), once.as_str());
            prop_assert!(once.starts_with('/'));
            prop_assert!(!once.contains("//"), "{}", once);
            prop_assert!(!once.split('/').any(|s| s == "." || s == ".."), "{}", once);
            // Parses as a URI path whenever the input did.
            prop_assert!(PathAndQuery::try_from(once.as_str()).is_ok());
        }
    }
}
