//! The server side of TLS: handshake, then plaintext to the inner service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use tower::{Layer, Service, ServiceExt};
use tracing::{debug, warn};

use super::{record_session, LiveServerConfig, TlsError};
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
///
/// With a [`LiveServerConfig`] ([`TerminateLayer::live`]) each handshake uses the material
/// current when it starts; open connections keep theirs, except that a connection whose
/// client certificate no longer verifies after the identity's roots or revocation lists
/// changed is closed (a `WARN` event; the inner service's future is dropped, which closes
/// the connection). Each connection re-checks its own peer chain, which it keeps anyway, on
/// every change: no shared registry to bound or clean up.
#[derive(Clone)]
pub struct TerminateLayer {
    source: Source,
    handshake_timeout: Duration,
}

#[derive(Clone)]
enum Source {
    Static(TlsAcceptor),
    Live(LiveServerConfig),
}

impl TerminateLayer {
    /// Terminates with `config` (see [`ServerConfigBuilder`](super::ServerConfigBuilder));
    /// 10 s handshake timeout.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            source: Source::Static(TlsAcceptor::from(config)),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Terminates with material that can change while serving (see
    /// [`ServerConfigBuilder::build_live`](super::ServerConfigBuilder::build_live));
    /// 10 s handshake timeout.
    pub fn live(config: LiveServerConfig) -> Self {
        Self {
            source: Source::Live(config),
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
            // Subscribed before the handshake: a change during it is seen afterwards.
            let (acceptor, live) = match &layer.source {
                Source::Static(acceptor) => (acceptor.clone(), None),
                Source::Live(live) => {
                    // In this order: the snapshot is never newer than the config, so a
                    // change that lands in between is re-checked, not skipped.
                    let changes = live.identity().subscribe();
                    let snapshot = changes.borrow().clone();
                    let acceptor = TlsAcceptor::from(live.current());
                    (acceptor, Some((live.clone(), changes, snapshot)))
                }
            };
            let tls = match tokio::time::timeout(layer.handshake_timeout, acceptor.accept(io)).await
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
            let peer_chain = session.peer_certificates().map(<[_]>::to_vec);
            // Re-checks verify as of now-at-handshake: a revocation or a removed root ends
            // the connection, a client certificate that merely expired since does not.
            let verified_at = rustls::pki_types::UnixTime::now();
            let served = async move {
                inner
                    .oneshot(Conn::from_parts(BoxIo::new(tls), metadata))
                    .await
                    .map_err(|e| TlsError::Inner(e.into()))
            };
            match (live, peer_chain) {
                (Some((live, changes, snapshot)), Some(chain)) => {
                    let at_handshake = Checked {
                        snapshot,
                        time: verified_at,
                    };
                    while_still_valid(served, &live, changes, &chain, at_handshake).await
                }
                _ => served.await,
            }
        })
    }
}

/// What a connection's peer chain was last verified against, and the time it was
/// verified at.
struct Checked {
    snapshot: Arc<super::IdentitySnapshot>,
    time: rustls::pki_types::UnixTime,
}

/// Runs `served` until it ends or a change of the identity makes `chain` (the client's)
/// fail verification; then drops it, closing the connection.
async fn while_still_valid<F>(
    served: F,
    live: &LiveServerConfig,
    mut changes: tokio::sync::watch::Receiver<Arc<super::IdentitySnapshot>>,
    chain: &[rustls::pki_types::CertificateDer<'static>],
    mut checked: Checked,
) -> Result<(), TlsError>
where
    F: Future<Output = Result<(), TlsError>>,
{
    tokio::pin!(served);
    loop {
        tokio::select! {
            result = &mut served => return result,
            changed = changes.changed() => {
                if changed.is_err() {
                    // The identity is gone (cannot happen while `live` holds it): serve on.
                    return served.await;
                }
                let now = changes.borrow_and_update().clone();
                if now.same_trust(&checked.snapshot) {
                    // A new certificate of our own only: nothing about the peer changed.
                    continue;
                }
                checked.snapshot = now;
                if let Err(e) = live.recheck_client(chain, checked.time) {
                    warn!(
                        error = %e,
                        tls.peer_identity = chain
                            .first()
                            .and_then(|c| super::spiffe_ids(c).into_iter().next())
                            .as_ref()
                            .map_or("", |id| id.as_str()),
                        "peer certificate no longer valid after an identity change; closing the connection"
                    );
                    return Err(TlsError::PeerNoLongerValid(e));
                }
            }
        }
    }
}
