//! The server side of TLS: handshake, then plaintext to the inner service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use tower::{Layer, Service, ServiceExt};
use tracing::debug;

use super::{record_session, TlsError};
use crate::conn::Conn;
use crate::io::{BoxIo, Io};
use crate::BoxError;

/// Terminates TLS on each connection and hands the plaintext on as `Conn<BoxIo>`.
///
/// The inner service sees [`Sni`](super::Sni), [`Alpn`](super::Alpn),
/// [`TlsInfo`](super::TlsInfo) and, for client certificates,
/// [`PeerCertificates`](super::PeerCertificates) and
/// [`PeerIdentity`](crate::identity::PeerIdentity). A failed or slow handshake closes the
/// connection (rustls sends the alert) and is logged.
///
/// ```
/// # #[cfg(feature = "demo-certs")] {
/// use proxystack::conn::Metadata;
/// use proxystack::tls::{demo::DemoCa, ServerConfigBuilder, TerminateLayer};
/// use proxystack::{tcp, Conn, Target};
/// use tower::ServiceBuilder;
/// let ca = DemoCa::new("example.org");
/// let config = ServerConfigBuilder::new().default_cert(ca.server_cert(&["localhost"])).build().unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(TerminateLayer::new(config))
///     .service(tcp::Relay::new(tcp::TcpConnector::new())
///         .upstream(|_: &Metadata| Some(Target::from_static("127.0.0.1:8080"))));
/// # let _ = svc; }
/// ```
#[derive(Clone)]
pub struct TerminateLayer {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
}

impl TerminateLayer {
    /// Terminates with `config` (see [`ServerConfigBuilder`](super::ServerConfigBuilder));
    /// 10 s handshake timeout.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            acceptor: TlsAcceptor::from(config),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Time allowed for the whole handshake.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }
}

impl std::fmt::Debug for TerminateLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminateLayer")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for TerminateLayer {
    type Service = TerminateService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TerminateService {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service made by [`TerminateLayer`].
#[derive(Clone, Debug)]
pub struct TerminateService<S> {
    layer: TerminateLayer,
    inner: S,
}

impl<S, I> Service<Conn<I>> for TerminateService<S>
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
            let tls = match tokio::time::timeout(layer.handshake_timeout, layer.acceptor.accept(io))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    return Err(TlsError::Handshake(e));
                }
                Err(_) => {
                    debug!(timeout = ?layer.handshake_timeout, "TLS handshake timed out");
                    return Err(TlsError::HandshakeTimeout(layer.handshake_timeout));
                }
            };
            let session = tls.get_ref().1;
            record_session(&mut metadata, session, session.server_name());
            debug!(
                tls.sni = session.server_name().unwrap_or(""),
                tls.peer_identity = metadata
                    .get::<super::PeerIdentity>()
                    .map(|p| p.0.as_str())
                    .unwrap_or(""),
                "TLS established"
            );
            inner
                .oneshot(Conn::from_parts(BoxIo::new(tls), metadata))
                .await
                .map_err(|e| TlsError::Inner(e.into()))
        })
    }
}
