//! [`DetectLayer`]: read, classify, replay.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};
use tracing::debug;

use super::classify::{classify, decided, settle, Protocol, Undecided, Verdict};
use crate::conn::Conn;
use crate::io::{BoxIo, Io};
use crate::sniff::{sniff, Outcome, SniffLimits, Sniffer, Step, Stop};
use crate::BoxError;

/// Detects the protocol of each connection; see the [module docs](crate::detect).
///
/// ```
/// use proxystack::detect::{DetectLayer, Protocol, Router};
/// use proxystack::tcp;
/// use std::time::Duration;
/// use tower::ServiceBuilder;
///
/// let opaque = tcp::Relay::new(tcp::TcpConnector::new())
///     .upstream(|_: &proxystack::Metadata| Some(proxystack::Target::from_static("127.0.0.1:5432")));
/// let svc = ServiceBuilder::new()
///     .layer(DetectLayer::new().timeout(Some(Duration::from_millis(300))))
///     .service(Router::new().opaque(opaque));
/// # let _ = svc;
/// ```
#[derive(Debug, Clone)]
pub struct DetectLayer {
    config: Config,
}

#[derive(Debug, Clone)]
struct Config {
    max_bytes: usize,
    timeout: Option<Duration>,
    on_empty_eof: Option<Protocol>,
}

impl Default for DetectLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl DetectLayer {
    /// Defaults: 8 KiB buffer, 1 s timeout, a connection closed before its first byte is
    /// still handed on as [`Protocol::Undecided`] ([`Undecided::Closed`]), so a relay
    /// routed for undecided connections can propagate the close.
    pub fn new() -> Self {
        Self {
            config: Config {
                max_bytes: 8 * 1024,
                timeout: Some(Duration::from_secs(1)),
                on_empty_eof: Some(Protocol::Undecided),
            },
        }
    }

    /// Most bytes read before deciding (at least 32). When the buffer fills while a request
    /// line is still arriving the connection counts as HTTP/1 (the HTTP server will answer
    /// `414`), otherwise as [`Protocol::Undecided`].
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.config.max_bytes = bytes.max(32);
        self
    }

    /// How long to wait for the bytes that decide, from the start of the connection. When
    /// it passes the connection is [`Protocol::Undecided`] ([`Undecided::Silent`] if the
    /// client sent nothing: server-first protocols). `None` waits as long as it takes.
    ///
    /// Where only HTTP is served, set it as long as the HTTP server's head timeout: a slow
    /// client is then refused no sooner than the HTTP server would refuse it.
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// What a connection that closes before sending any byte counts as (default
    /// [`Protocol::Undecided`]); `None` closes it without calling the inner service.
    pub fn on_empty_eof(mut self, protocol: Option<Protocol>) -> Self {
        self.config.on_empty_eof = protocol;
        self
    }
}

impl<S> Layer<S> for DetectLayer {
    type Service = DetectService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DetectService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service made by [`DetectLayer`].
#[derive(Debug, Clone)]
pub struct DetectService<S> {
    inner: S,
    config: Config,
}

/// Why detection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetectError {
    /// Reading the first bytes failed.
    #[error("reading the first bytes failed")]
    Io(#[source] io::Error),
    /// The inner service failed.
    #[error(transparent)]
    Inner(BoxError),
}

impl<S, I> Service<Conn<I>> for DetectService<S>
where
    I: Io,
    S: Service<Conn<BoxIo>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = ();
    type Error = DetectError;
    type Future = Pin<Box<dyn Future<Output = Result<(), DetectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service is made ready per connection, after detection.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        let inner = self.inner.clone();
        let config = self.config.clone();
        Box::pin(async move {
            let (io, mut metadata) = conn.into_parts();
            let limits = SniffLimits::new(config.max_bytes, config.timeout);
            let (outcome, io) = sniff(io, &mut Detect(&config), limits)
                .await
                .map_err(DetectError::Io)?;
            let (protocol, undecided) = match outcome {
                Outcome::Match(Some(found)) => found,
                Outcome::Match(None) => {
                    debug!("closed before sending anything; not handed on");
                    return Ok(());
                }
                Outcome::Reject(never) => match never {},
                // `Detect::finish` always decides; were it not to, settle here.
                Outcome::Undecided(stop) => settle(io.prefix(), stop),
            };
            debug!(
                ?protocol,
                ?undecided,
                bytes = io.prefix().len(),
                "protocol detected"
            );
            metadata.insert(protocol);
            if let Some(why) = undecided {
                metadata.insert(why);
            }
            let conn = Conn::from_parts(BoxIo::new(io), metadata);
            inner
                .oneshot(conn)
                .await
                .map_err(|e| DetectError::Inner(e.into()))
        })
    }
}

/// Detection as a [`Sniffer`]: the classifier after every read, [`settle`] at the end.
/// `None` is "closed before a byte, and `on_empty_eof` says skip the inner service".
struct Detect<'a>(&'a Config);

type Found = Option<(Protocol, Option<Undecided>)>;

impl Sniffer for Detect<'_> {
    type Output = Found;
    type Error = std::convert::Infallible;

    fn push(&mut self, seen: &[u8]) -> Step<Found, Self::Error> {
        match classify(seen) {
            Verdict::Known(p) => Step::Match(Some(decided(p))),
            Verdict::NeedMore => Step::NeedMore,
        }
    }

    fn finish(&mut self, seen: &[u8], stop: Stop) -> Outcome<Found, Self::Error> {
        if seen.is_empty() && stop == Stop::Eof {
            return Outcome::Match(self.0.on_empty_eof.map(|p| match p {
                Protocol::Undecided => (p, Some(Undecided::Closed)),
                p => (p, None),
            }));
        }
        if stop == Stop::Timeout {
            debug!(bytes = seen.len(), "detection timed out");
        }
        Outcome::Match(Some(settle(seen, stop)))
    }
}
