//! Opening a tunnel through an HTTP/1.1 proxy (`CONNECT host:port HTTP/1.1`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tower::{Service, ServiceExt};
use tracing::debug;

use super::{ConnectAuthority, ConnectHeaders, ConnectResponse, TunnelError};
use crate::conn::Conn;
use crate::io::Io;
use crate::{BoxError, Target};

/// Connects to an HTTP/1.1 proxy with any connector and asks it for a tunnel to the
/// target's [`ConnectAuthority`] (default: the target itself). One connection per tunnel.
///
/// ```
/// use proxystack::connect::{ConnectAuthority, Http1ConnectConnector};
/// use proxystack::{tcp::TcpConnector, Authority, Target};
/// let via_proxy = Http1ConnectConnector::new(TcpConnector::new())
///     .proxy_authorization("Basic dXNlcjpwYXNz").unwrap();
/// let target = Target::from_static("127.0.0.1:3128")      // the proxy
///     .with(ConnectAuthority(Authority::parse("example.com:443").unwrap()));
/// # let _ = (via_proxy, target);
/// ```
#[derive(Clone, Debug)]
pub struct Http1ConnectConnector<C> {
    connector: C,
    proxy_authorization: Option<HeaderValue>,
    response_timeout: Duration,
}

impl<C> Http1ConnectConnector<C> {
    /// Tunnels through the proxy `connector` reaches.
    pub fn new(connector: C) -> Self {
        Self {
            connector,
            proxy_authorization: None,
            response_timeout: Duration::from_secs(30),
        }
    }

    /// Sends `Proxy-Authorization: <value>` with every CONNECT.
    pub fn proxy_authorization(
        mut self,
        value: &str,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut value = HeaderValue::from_str(value)?;
        value.set_sensitive(true);
        self.proxy_authorization = Some(value);
        Ok(self)
    }

    /// Time allowed for the proxy's answer.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }
}

impl<C, O> Service<Target> for Http1ConnectConnector<C>
where
    C: Service<Target, Response = Conn<O>> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    O: Io,
{
    type Response = Conn<TokioIo<Upgraded>>;
    type Error = TunnelError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, TunnelError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = target
                .get::<ConnectAuthority>()
                .map(|a| a.0.to_string())
                .unwrap_or_else(|| target.authority().to_string());
            let extra = target.get::<ConnectHeaders>().cloned().unwrap_or_default();
            let conn = this
                .connector
                .oneshot(target)
                .await
                .map_err(|e| TunnelError::Connect(e.into()))?;
            let (io, metadata) = conn.into_parts();
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|source| TunnelError::Handshake {
                    context: "HTTP/1.1 handshake with the proxy failed",
                    source: source.into(),
                })?;
            crate::task::spawn(async move {
                if let Err(e) = connection.with_upgrades().await {
                    debug!(error = %e, "HTTP/1.1 CONNECT connection ended");
                }
            });
            let mut req = Request::builder()
                .method(Method::CONNECT)
                .uri(authority.as_str())
                .header(header::HOST, authority.as_str())
                .body(Empty::<Bytes>::new())
                .map_err(TunnelError::InvalidRequest)?;
            req.headers_mut().extend(extra.0);
            if let Some(auth) = this.proxy_authorization {
                req.headers_mut().insert(header::PROXY_AUTHORIZATION, auth);
            }
            let response = tokio::time::timeout(this.response_timeout, sender.send_request(req))
                .await
                .map_err(|_| TunnelError::Timeout(this.response_timeout))?
                .map_err(|e| TunnelError::Request(e.into()))?;
            if response.status() != StatusCode::OK {
                return Err(TunnelError::refused(response.status()));
            }
            let headers = response.headers().clone();
            let upgraded = hyper::upgrade::on(response)
                .await
                .map_err(|e| TunnelError::Request(e.into()))?;
            let mut conn = Conn::from_parts(TokioIo::new(upgraded), metadata);
            conn.insert(ConnectResponse(headers));
            Ok(conn)
        })
    }
}
