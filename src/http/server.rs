//! [`HttpServer`]: HTTP/1.1 + HTTP/2 on one connection, with one service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Extensions, Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tower::{Service, ServiceExt};
use tracing::debug;

use super::guard::{H1Guard, SwitchSignal};
use crate::conn::Conn;
use crate::io::{Io, PrefixedIo};
use crate::sniff::sniff_h2_preface;
use crate::task::ConnectionTasks;
use crate::{drain, BoxError, H2Config};

/// The terminal HTTP service: serves HTTP/1.1 (with upgrades) and HTTP/2 (prior knowledge,
/// or after TLS ALPN) on each connection with one `tower` service.
///
/// * every request's extensions get a copy of the connection's metadata
///   ([`PeerAddr`](crate::conn::PeerAddr), SNI, peer identity…), so handlers and
///   [`Forward`](super::Forward) can read it;
/// * when the [`drain::Watch`] in the connection's metadata fires, the connection is shut
///   down gracefully (`GOAWAY` for HTTP/2, `Connection: close` after the current HTTP/1
///   response);
/// * defaults are safe at an edge: 10 s to receive a request head (slowloris), 64 KiB of
///   request head and 100 fields (`431` beyond), HTTP/2 at most 100 concurrent streams, a
///   64 KiB header list (CONTINUATION floods end in `GOAWAY`), and at most 20 streams
///   reset by the client before the server saw them (rapid reset, CVE-2023-44487);
/// * only the head is timed: for slow bodies put tower-http's `TimeoutLayer` (whole
///   request, `408`) and `RequestBodyTimeoutLayer` (gap between body frames) in front of
///   the service (the crate's HTTP bad-input tests do exactly that);
/// * a strict HTTP/1 head check refuses `Content-Length` + `Transfer-Encoding`, any
///   `Transfer-Encoding` other than `chunked`, bare LF, obs-fold, control characters,
///   duplicate `Host` and HTTP/1.1 without `Host` with `400` before the service sees the
///   request ([`HttpServer::strict_http1`]). It covers every request on the connection
///   until the protocol actually changes — a `101 Switching Protocols`, or a `2xx` to
///   `CONNECT` — whatever the requests before asked for: a request with `Upgrade` answered
///   `200` or `404`, or a refused `CONNECT`, leaves the next request checked. Bytes a
///   client pipelines behind an upgrade request wait until the service's response status
///   is known.
///
/// ```
/// use proxystack::http::HttpServer;
/// use std::time::Duration;
///
/// let hello = tower::service_fn(|_req: http::Request<proxystack::http::Incoming>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello\n")))
/// });
/// let server = HttpServer::new(hello)
///     .header_read_timeout(Some(Duration::from_secs(5)))
///     .h2(proxystack::H2Config::new().max_concurrent_streams(250));
/// // proxystack::serve(listener, server, drain_watch).await
/// # let _ = server;
/// ```
#[derive(Debug, Clone)]
pub struct HttpServer<S> {
    service: S,
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    header_read_timeout: Option<Duration>,
    max_headers: usize,
    max_buf_size: usize,
    keep_alive: bool,
    strict_h1: bool,
    h2: H2Config,
}

/// `HttpServer`'s HTTP/2 defaults (hyper's for what is not listed): at most 100 concurrent
/// streams, a 64 KiB header list, 20 streams reset before the server saw them, 1,024
/// streams reset for client errors, no keep-alive PINGs (20 s to answer one when enabled).
fn h2_defaults() -> H2Config {
    H2Config::new()
        .max_concurrent_streams(100)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(1024))
        .keep_alive_interval(None)
        .keep_alive_timeout(Duration::from_secs(20))
}

/// hyper's HTTP/1 field limit when none is set (`hyper::proto::h1::role::DEFAULT_MAX_HEADERS`,
/// not exported), which is also this server's default.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Why an HTTP connection ended badly (malformed input, timeouts, I/O errors).
#[derive(Debug, thiserror::Error)]
#[error("HTTP connection failed")]
pub struct HttpServerError(#[source] BoxError);

impl<S> HttpServer<S> {
    /// Serves `service` with the defaults listed on [`HttpServer`].
    pub fn new(service: S) -> Self {
        Self {
            service,
            config: Arc::new(Config {
                header_read_timeout: Some(Duration::from_secs(10)),
                max_headers: HYPER_DEFAULT_MAX_HEADERS,
                max_buf_size: 64 * 1024,
                keep_alive: true,
                strict_h1: true,
                h2: h2_defaults(),
            }),
        }
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// HTTP/1: time allowed to receive a whole request head; the connection is closed
    /// after it (slowloris). Runs for every request on a kept-alive connection. `None`
    /// disables it.
    pub fn header_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config().header_read_timeout = timeout;
        self
    }

    /// HTTP/1: most header fields in a request (`431` beyond).
    pub fn max_headers(mut self, n: usize) -> Self {
        self.config().max_headers = n;
        self
    }

    /// HTTP/1: read buffer limit, which bounds the request head (`431` beyond); at least
    /// 8 KiB.
    pub fn max_buf_size(mut self, bytes: usize) -> Self {
        // hyper asserts a minimum of 8 KiB; clamp instead of panicking.
        self.config().max_buf_size = bytes.max(8 * 1024);
        self
    }

    /// HTTP/1: keep connections open between requests (default on).
    pub fn keep_alive(mut self, on: bool) -> Self {
        self.config().keep_alive = on;
        self
    }

    /// HTTP/1: the strict request-head check (default on); see [`HttpServer`].
    pub fn strict_http1(mut self, on: bool) -> Self {
        self.config().strict_h1 = on;
        self
    }

    /// HTTP/2 settings; what `h2` leaves unset keeps this server's defaults (listed on
    /// [`HttpServer`]).
    pub fn h2(mut self, h2: H2Config) -> Self {
        self.config().h2 = h2.or(&h2_defaults());
        self
    }

    fn builder(&self) -> auto::Builder<super::exec::Executor> {
        let c = &self.config;
        let mut b = auto::Builder::new(super::exec::Executor);
        let mut b1 = b.http1();
        b1.timer(TokioTimer::new())
            .header_read_timeout(c.header_read_timeout)
            .max_buf_size(c.max_buf_size)
            .keep_alive(c.keep_alive);
        // hyper's own limit is the same 100 fields, kept in an array on the stack; an
        // explicit limit makes it fill two 100-entry vectors for every request head
        // instead (about 1,700 instructions per request), so only say it when it differs.
        if c.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            b1.max_headers(c.max_headers);
        }
        let h2 = &c.h2;
        let mut b2 = b.http2();
        b2.timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_concurrent_streams)
            .initial_stream_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .max_frame_size(h2.max_frame_size)
            .keep_alive_interval(h2.keep_alive_interval.flatten());
        if let Some(n) = h2.max_pending_accept_reset_streams {
            b2.max_pending_accept_reset_streams(n);
        }
        if let Some(n) = h2.max_local_error_reset_streams {
            b2.max_local_error_reset_streams(n);
        }
        if let Some(n) = h2.max_header_list_size {
            b2.max_header_list_size(n);
        }
        if let Some(t) = h2.keep_alive_timeout {
            b2.keep_alive_timeout(t);
        }
        b
    }
}

/// The I/O error at the root of an error chain, if there is one.
/// (hyper turns HTTP/2 I/O errors into I/O errors, so this finds those too.)
fn io_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// Adapts a `tower` service to hyper's, copying the connection metadata into each request.
struct WithMetadata<S> {
    service: S,
    metadata: Arc<Extensions>,
    /// The strict HTTP/1 guard's signal: told whether the response to an upgrade
    /// candidate switched protocols. `None` when the guard is off.
    switch: Option<Arc<SwitchSignal>>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for WithMetadata<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = ReportSwitch<tower::util::Oneshot<S, Request<Incoming>>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let report = match &self.switch {
            Some(signal) if is_upgrade_candidate(&req) => Some(Report {
                signal: signal.clone(),
                connect: req.method() == Method::CONNECT,
            }),
            _ => None,
        };
        // Values already on the request (hyper's upgrade handle) are kept; metadata adds
        // to them.
        req.extensions_mut().extend((*self.metadata).clone());
        ReportSwitch {
            inner: self.service.clone().oneshot(req),
            report,
        }
    }
}

/// An HTTP/1 request whose response may switch the connection to another protocol: the
/// same test the guard makes on the raw head (method `CONNECT` or an `Upgrade` field), so
/// that each request the guard waits for is reported exactly once. HTTP/2 requests never
/// switch the connection (and the guard is off on HTTP/2 connections).
fn is_upgrade_candidate<B>(req: &Request<B>) -> bool {
    req.version() < Version::HTTP_2
        && (req.method() == Method::CONNECT || req.headers().contains_key(http::header::UPGRADE))
}

/// Where and how to report an upgrade candidate's response.
struct Report {
    signal: Arc<SwitchSignal>,
    connect: bool,
}

pin_project_lite::pin_project! {
    /// The service's response future; for an upgrade candidate it also tells the guard,
    /// as soon as the status is known, whether hyper will switch protocols. Other
    /// requests pass straight through (no allocation, no lock).
    struct ReportSwitch<F> {
        #[pin]
        inner: F,
        report: Option<Report>,
    }
}

impl<F, B, E> Future for ReportSwitch<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Some(report) = this.report.take() {
            // What hyper does with the status (hyper 1.x `Server::encode`): after a `101`,
            // or a `2xx` to CONNECT, it never parses HTTP on the connection again; after
            // anything else (an error included: no response at all) it may read the next
            // request, which must be checked.
            let switched = result.as_ref().is_ok_and(|resp| {
                let status = resp.status();
                status == StatusCode::SWITCHING_PROTOCOLS || (report.connect && status.is_success())
            });
            debug!(switched, "response to an upgrade request");
            report.signal.report(switched);
        }
        Poll::Ready(result)
    }
}

impl<S, B, I> Service<Conn<I>> for HttpServer<S>
where
    I: Io,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = ();
    type Error = HttpServerError;
    type Future = Pin<Box<dyn Future<Output = Result<(), HttpServerError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The service is cloned per request; readiness is awaited there (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Conn<I>) -> Self::Future {
        let builder = self.builder();
        let service = self.service.clone();
        let strict = self.config.strict_h1;
        let max_head = self.config.max_buf_size;
        let head_timeout = self.config.header_read_timeout;
        Box::pin(async move {
            let (io, mut metadata) = conn.into_parts();
            let drain = metadata.get::<drain::Watch>().cloned();
            // Where `Forward` leaves the relay of a connection it switched to another
            // protocol (`101`).
            let upgrades = ConnectionTasks::default();
            metadata.insert(upgrades.clone());
            // hyper's header timeout starts only once the protocol is told (the HTTP/2
            // preface or a byte that is not part of it): without this a client that sends
            // nothing, or part of the preface, holds the connection forever.
            let io = match head_timeout {
                Some(limit) => {
                    let sniffed = sniff_h2_preface(io, limit);
                    let sniffed = match &drain {
                        Some(drain) => tokio::select! {
                            sniffed = sniffed => sniffed,
                            () = drain.signaled() => return Ok(()),
                        },
                        None => sniffed.await,
                    };
                    match sniffed {
                        Ok(Some((io, _))) => io,
                        Ok(None) => return Ok(()),
                        Err(e) => {
                            debug!(error = %e, "no request on the connection");
                            return Err(HttpServerError(e.into()));
                        }
                    }
                }
                None => PrefixedIo::new(Bytes::new(), io),
            };
            let switch = strict.then(|| Arc::new(SwitchSignal::default()));
            let io = match &switch {
                Some(signal) => H1Guard::new(io, max_head, signal.clone()),
                None => H1Guard::passthrough(io),
            };
            let service = WithMetadata {
                service,
                metadata: Arc::new(metadata),
                switch,
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let result = match drain {
                Some(drain) => {
                    tokio::select! {
                        result = conn.as_mut() => result,
                        () = drain.signaled() => {
                            debug!("draining: graceful HTTP shutdown");
                            conn.as_mut().graceful_shutdown();
                            // A peer closing its connection as the GOAWAY (or the
                            // close) reaches it is how a drain is meant to end.
                            conn.await.or_else(|e| {
                                if crate::serve::peer_gone(io_error_in(&*e)) {
                                    debug!(error = %e, "peer closed its connection during the drain");
                                    Ok(())
                                } else {
                                    Err(e)
                                }
                            })
                        }
                    }
                }
                None => conn.await,
            };
            // Upgraded connections go on in their own tasks; this one waits for them, and
            // aborts them if it is aborted itself.
            upgrades.join().await;
            result.map_err(HttpServerError)
        })
    }
}
