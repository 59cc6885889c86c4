//! TLS passthrough with a look at the ClientHello.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};
use tracing::debug;

use super::client_hello::{
    ClientHello, ClientHelloError, ClientHelloParser, Status, DEFAULT_MAX_HELLO_LEN,
};
use super::{OfferedAlpn, PeekedHello, Sni, TlsError};
use crate::conn::{box_inbound, BoxInbound, Conn};
use crate::io::{BoxIo, Io, PrefixedIo};
use crate::sniff::{sniff, Outcome, SniffLimits, Sniffer, Step, Stop};
use crate::BoxError;

/// Reads the ClientHello, records what it says, and replays every byte to the inner
/// service, which therefore sees the untouched TLS stream (to relay it, or to terminate
/// it after all).
///
/// Input that is not TLS, or no complete hello within the timeout (a server-first
/// protocol, a silent client), goes to the [`fallback`](PeekLayer::fallback) service with
/// the bytes read so far replayed, or is closed when there is none. A malformed or
/// oversized hello is closed.
///
/// ```
/// use proxystack::conn::Metadata;
/// use proxystack::tls::{PeekLayer, Sni};
/// use proxystack::{tcp, Conn, Target};
/// use tower::ServiceBuilder;
/// // SNI-routed passthrough: TLS stays end to end.
/// let svc = ServiceBuilder::new()
///     .layer(PeekLayer::new())
///     .service(tcp::Relay::new(tcp::TcpConnector::new()).upstream(|c: &Metadata| {
///         match c.get::<Sni>()?.0.as_str() {
///             "a.example.com" => Some(Target::from_static("10.0.0.1:443")),
///             _ => None,
///         }
///     }));
/// # let _ = svc;
/// ```
#[derive(Clone)]
pub struct PeekLayer {
    max_len: usize,
    timeout: Duration,
    fallback: Option<BoxInbound>,
}

impl Default for PeekLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PeekLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeekLayer")
            .field("max_len", &self.max_len)
            .field("timeout", &self.timeout)
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl PeekLayer {
    /// Up to 64 KiB of hello, 5 s to send it, no fallback.
    pub fn new() -> Self {
        Self {
            max_len: DEFAULT_MAX_HELLO_LEN,
            timeout: Duration::from_secs(5),
            fallback: None,
        }
    }

    /// Most bytes the hello may take (record headers included).
    pub fn max_len(mut self, bytes: usize) -> Self {
        self.max_len = bytes;
        self
    }

    /// Time allowed for the whole hello to arrive.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where non-TLS connections (and silent ones, after the timeout) go.
    pub fn fallback<S>(mut self, service: S) -> Self
    where
        S: crate::conn::BoxableInbound,
    {
        self.fallback = Some(box_inbound(service));
        self
    }
}

impl<S> Layer<S> for PeekLayer {
    type Service = PeekService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PeekService {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service made by [`PeekLayer`].
#[derive(Clone, Debug)]
pub struct PeekService<S> {
    layer: PeekLayer,
    inner: S,
}

enum Peeked {
    Hello(ClientHello),
    NotTls(TlsError),
}

/// The ClientHello parser as a [`Sniffer`]: fed the bytes it has not seen yet.
struct HelloSniffer {
    parser: ClientHelloParser,
    fed: usize,
}

impl Sniffer for HelloSniffer {
    type Output = ClientHello;
    type Error = ClientHelloError;

    fn push(&mut self, seen: &[u8]) -> Step<ClientHello, ClientHelloError> {
        let fresh = seen.get(self.fed..).unwrap_or_default();
        self.fed = seen.len();
        match self.parser.push(fresh) {
            Ok(Status::NeedMore) => Step::NeedMore,
            Ok(Status::Done(hello)) => Step::Match(hello),
            Err(e) => Step::Reject(e),
        }
    }

    fn finish(&mut self, _: &[u8], stop: Stop) -> Outcome<ClientHello, ClientHelloError> {
        match stop {
            // Closed (or out of room, which the parser's own limit normally reports
            // first) before the hello was complete: truncated, or not TLS at all.
            Stop::Eof | Stop::Full => Outcome::Reject(self.parser.finish()),
            _ => Outcome::Undecided(stop),
        }
    }
}

/// Reads the ClientHello: the hello and the replaying stream, or why there is none.
async fn read_hello<I: Io>(io: I, layer: &PeekLayer) -> Result<(Peeked, PrefixedIo<I>), TlsError> {
    let mut sniffer = HelloSniffer {
        parser: ClientHelloParser::with_limit(layer.max_len),
        fed: 0,
    };
    let limits = SniffLimits::new(layer.max_len, Some(layer.timeout));
    let (outcome, io) = sniff(io, &mut sniffer, limits)
        .await
        .map_err(TlsError::Handshake)?;
    let peeked = match outcome {
        Outcome::Match(hello) => Peeked::Hello(hello),
        Outcome::Reject(e @ ClientHelloError::NotTls { .. }) => {
            Peeked::NotTls(TlsError::ClientHello(e))
        }
        Outcome::Reject(e) => return Err(TlsError::ClientHello(e)),
        Outcome::Undecided(_) => Peeked::NotTls(TlsError::PeekTimeout(layer.timeout)),
    };
    Ok((peeked, io))
}

impl<S, I> Service<Conn<I>> for PeekService<S>
where
    I: Io,
    S: Service<Conn<BoxIo>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = ();
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<(), TlsError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        let layer = self.layer.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let (io, mut metadata) = conn.into_parts();
            let (peeked, io) = match read_hello(io, &layer).await {
                Ok(p) => p,
                Err(e) => {
                    debug!(error = %e, "not a usable ClientHello; closing");
                    return Err(e);
                }
            };
            let replay = Conn::from_parts(BoxIo::new(io), metadata.clone());
            match peeked {
                Peeked::Hello(hello) => {
                    debug!(
                        tls.sni = hello.sni.as_deref().unwrap_or(""),
                        "peeked ClientHello"
                    );
                    let (io, _) = replay.into_parts();
                    if let Some(sni) = &hello.sni {
                        metadata.insert(Sni(sni.clone()));
                    }
                    metadata.insert(OfferedAlpn(hello.alpn.clone()));
                    metadata.insert(PeekedHello(Arc::new(hello)));
                    inner
                        .oneshot(Conn::from_parts(io, metadata))
                        .await
                        .map_err(|e| TlsError::Inner(e.into()))
                }
                Peeked::NotTls(why) => match layer.fallback {
                    Some(fallback) => {
                        debug!(reason = %why, "not TLS; using fallback");
                        fallback.oneshot(replay).await.map_err(TlsError::Inner)
                    }
                    None => {
                        debug!(reason = %why, "not TLS and no fallback; closing");
                        Err(why)
                    }
                },
            }
        })
    }
}
