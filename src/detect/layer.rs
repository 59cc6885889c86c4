//! [`DetectLayer`]: read, classify, replay.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tracing::debug;

use super::classify::{classify, settle, Protocol, Stop, Undecided, Verdict};
use crate::conn::{BoxIo, Conn, Io, PrefixedIo};
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
            let (mut io, mut metadata) = conn.into_parts();
            let (protocol, undecided, prefix) = match detect(&mut io, &config).await {
                Ok(Some(found)) => found,
                Ok(None) => {
                    debug!("closed before sending anything; not handed on");
                    return Ok(());
                }
                Err(e) => return Err(DetectError::Io(e)),
            };
            debug!(
                ?protocol,
                ?undecided,
                bytes = prefix.len(),
                "protocol detected"
            );
            metadata.insert(protocol);
            if let Some(why) = undecided {
                metadata.insert(why);
            }
            let conn = Conn::from_parts(BoxIo::new(PrefixedIo::new(prefix, io)), metadata);
            inner
                .oneshot(conn)
                .await
                .map_err(|e| DetectError::Inner(e.into()))
        })
    }
}

/// What detection found: the protocol, why it is undecided (if it is), the bytes read.
type Found = (Protocol, Option<Undecided>, bytes::Bytes);

/// Reads until the classifier decides, the buffer fills, the timeout passes or EOF.
/// `Ok(None)`: EOF before any byte and `on_empty_eof` is `None`.
async fn detect<I: Io>(io: &mut I, config: &Config) -> io::Result<Option<Found>> {
    let mut buf = BytesMut::with_capacity(config.max_bytes.min(1024));
    let deadline = config.timeout.map(|t| Instant::now() + t);
    let (protocol, undecided) = loop {
        match classify(&buf) {
            Verdict::Known(Protocol::Undecided) => {
                break (Protocol::Undecided, Some(Undecided::MalformedHttp1))
            }
            Verdict::Known(p) => break (p, None),
            Verdict::NeedMore => {}
        }
        if buf.len() >= config.max_bytes {
            break settle(&buf, Stop::Full);
        }
        // Never read past the limit: the rest stays in the socket for the inner service.
        let room = config.max_bytes - buf.len();
        buf.reserve(room.min(4096));
        let mut limited = (&mut *io).take(room as u64);
        let read = limited.read_buf(&mut buf);
        let n = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                Ok(n) => n?,
                Err(_) => {
                    debug!(bytes = buf.len(), "detection timed out");
                    break settle(&buf, Stop::Timeout);
                }
            },
            None => read.await?,
        };
        if n == 0 {
            if buf.is_empty() {
                match config.on_empty_eof {
                    Some(Protocol::Undecided) => {
                        break (Protocol::Undecided, Some(Undecided::Closed))
                    }
                    Some(p) => break (p, None),
                    None => return Ok(None),
                }
            }
            break settle(&buf, Stop::Eof);
        }
    };
    Ok(Some((protocol, undecided, buf.freeze())))
}
