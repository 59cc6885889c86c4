//! The upstream connection pool behind [`Forward`](super::Forward).
//!
//! Why not hyper-util's legacy `Client`: it keys connections by the request URI's
//! scheme and authority and hands its connector only that URI. Here the unit of connection
//! is a [`Target`], which carries metadata the connector needs (expected identity, SNI,
//! tunnel headers), is chosen independently of the request's `:authority` (a request for
//! `api.example.com` goes to `10.0.0.7:8080`, and an HTTP/2 upstream must still see
//! `:authority: api.example.com`), and picks HTTP/1 or HTTP/2 per upstream. The pool is small:
//!
//! * key: the target's authority, its [`PoolKey`] metadata if any, and the requested
//!   protocol;
//! * HTTP/2: one multiplexed connection per key, shared by every request until it closes;
//! * HTTP/1: idle connections per key (most recently used first), returned once their
//!   response body has been read to the end, dropped after an idle timeout;
//! * a request that finds its reused connection already closed (the keep-alive race) is
//!   retried once on a fresh connection: hyper hands back requests it never started.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tower::{Service, ServiceExt};
use tracing::{debug, trace};

use super::error::{ForwardError, ForwardErrorKind};
use super::forward::UpstreamProtocol;
use super::BoxBody;
use crate::conn::Conn;
use crate::io::Io;
use crate::{Authority, BoxError, Target};

/// Target metadata: connections are shared only between targets with the same authority
/// *and* the same `PoolKey`. Set it when two targets with one address must not share
/// connections (e.g. different expected identities or client certificates).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey(pub Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    authority: Authority,
    extra: Option<PoolKey>,
    protocol: UpstreamProtocol,
}

#[derive(Default)]
struct Slot {
    h2: Option<http2::SendRequest<BoxBody>>,
    h1: Vec<(http1::SendRequest<BoxBody>, Instant)>,
}

#[derive(Debug, Clone)]
pub(crate) struct PoolConfig {
    pub(crate) idle_timeout: Duration,
    pub(crate) max_idle_per_key: usize,
}

struct Shared {
    slots: Mutex<HashMap<Key, Slot>>,
    last_sweep: Mutex<Instant>,
}

pub(crate) struct Pool<C> {
    connector: C,
    shared: Arc<Shared>,
    config: PoolConfig,
}

impl<C: Clone> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Self {
            connector: self.connector.clone(),
            shared: self.shared.clone(),
            config: self.config.clone(),
        }
    }
}

enum Sender {
    H1(http1::SendRequest<BoxBody>),
    H2(http2::SendRequest<BoxBody>),
}

impl<C> Pool<C> {
    pub(crate) fn new(connector: C, config: PoolConfig) -> Self {
        Self {
            connector,
            shared: Arc::new(Shared {
                slots: Mutex::new(HashMap::new()),
                last_sweep: Mutex::new(Instant::now()),
            }),
            config,
        }
    }

    /// The same connector with new settings and an empty pool (builder use only).
    pub(crate) fn reconfigure(self, config: PoolConfig) -> Self {
        Self::new(self.connector, config)
    }
}

impl<C, O> Pool<C>
where
    C: Service<Target, Response = Conn<O>> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    O: Io,
{
    /// Sends `req` to `target`, reusing a pooled connection when there is one.
    pub(crate) async fn send(
        &self,
        target: Target,
        protocol: UpstreamProtocol,
        mut req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let key = Key {
            authority: target.authority().clone(),
            extra: target.get::<PoolKey>().cloned(),
            protocol,
        };
        // At most one retry, and then on a fresh connection: a request is only retried
        // when hyper hands it back unsent from a reused connection.
        let mut retried = false;
        loop {
            let pooled = if retried { None } else { self.checkout(&key) };
            let (sender, reused) = match pooled {
                Some(sender) => (sender, true),
                // Boxed: dialling (connect, maybe TLS, the HTTP/2 handshake) is a large
                // future that most requests never run; inline, it made every request's
                // future that much larger to move around.
                None => (Box::pin(self.dial(target.clone(), &key)).await?, false),
            };
            let result = match sender {
                Sender::H1(mut s) => {
                    let sent = s.try_send_request(req).await;
                    if sent.is_ok() {
                        self.recycle(key.clone(), s);
                    }
                    sent
                }
                Sender::H2(mut s) => {
                    if s.ready().await.is_err() {
                        self.forget_h2(&key);
                        if reused && !retried {
                            retried = true;
                            continue;
                        }
                    }
                    let sent = s.try_send_request(req).await;
                    // A reset stream is that request's problem; a closed connection or an
                    // unsent request means the connection is done for.
                    if let Err(e) = &sent {
                        if s.is_closed() || e.message().is_some() {
                            self.forget_h2(&key);
                        }
                    }
                    sent
                }
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused && !retried => {
                        trace!("pooled connection closed before the request was sent; retrying");
                        retried = true;
                        req = unsent;
                    }
                    _ => {
                        let e = e.into_error();
                        return Err(ForwardError::with(upstream_kind(&e), e));
                    }
                },
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        // A panic while holding the lock cannot leave a slot half-updated in a way that
        // matters (entries are whole connections), so poisoning is ignored.
        self.shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn checkout(&self, key: &Key) -> Option<Sender> {
        let mut slots = self.lock();
        let slot = slots.get_mut(key)?;
        if let Some(h2) = &slot.h2 {
            if !h2.is_closed() {
                return Some(Sender::H2(h2.clone()));
            }
            slot.h2 = None;
        }
        let now = Instant::now();
        while let Some((s, since)) = slot.h1.pop() {
            if !s.is_closed() && s.is_ready() && now - since < self.config.idle_timeout {
                return Some(Sender::H1(s));
            }
        }
        None
    }

    /// Drops the key's HTTP/2 connection after it failed us; the next request dials anew.
    fn forget_h2(&self, key: &Key) {
        if let Some(slot) = self.lock().get_mut(key) {
            slot.h2 = None;
        }
    }

    /// Returns an HTTP/1 connection to the pool once its response has been read to the end
    /// (before that it cannot take another request).
    fn recycle(&self, key: Key, mut sender: http1::SendRequest<BoxBody>) {
        // Usually the connection is ready again by the time its response head is here: the
        // connection task read the whole (small) response in the same read and went back
        // to waiting for a request. Then it goes straight back, without a task to wait.
        if sender.is_ready() {
            idle(&self.shared, &self.config, key, sender);
            return;
        }
        let pool = self.shared.clone();
        let config = self.config.clone();
        crate::task::spawn(async move {
            if sender.ready().await.is_err() {
                return; // closed, or upgraded
            }
            idle(&pool, &config, key, sender);
        });
    }

    async fn dial(&self, target: Target, key: &Key) -> Result<Sender, ForwardError> {
        let name = target.to_string();
        let conn = self.connector.clone().oneshot(target).await.map_err(|e| {
            let e: BoxError = e.into();
            debug!(upstream = %name, error = %e, "upstream connect failed");
            ForwardError::with(connect_kind(&*e), e)
        })?;
        let (io, metadata) = conn.into_parts();
        // A connector that negotiated the protocol (TLS ALPN) records it; it wins.
        let protocol = match metadata.get::<UpstreamProtocol>() {
            Some(p @ (UpstreamProtocol::Http1 | UpstreamProtocol::Http2)) => *p,
            _ => key.protocol,
        };
        let io = TokioIo::new(io);
        match protocol {
            UpstreamProtocol::Http2 => {
                let (sender, conn) = http2::Builder::new(super::exec::Executor)
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(|e| ForwardError::with(ForwardErrorKind::Upstream, e))?;
                crate::task::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                self.lock().entry(key.clone()).or_default().h2 = Some(sender.clone());
                Ok(Sender::H2(sender))
            }
            _ => {
                let (sender, conn) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(|e| ForwardError::with(ForwardErrorKind::Upstream, e))?;
                crate::task::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "upstream HTTP/1 connection ended");
                    }
                });
                Ok(Sender::H1(sender))
            }
        }
    }
}

/// Puts a ready HTTP/1 connection in its key's idle list (if there is room), then sweeps.
fn idle(shared: &Shared, config: &PoolConfig, key: Key, sender: http1::SendRequest<BoxBody>) {
    let now = Instant::now();
    let mut slots = shared.slots.lock().unwrap_or_else(PoisonError::into_inner);
    let slot = slots.entry(key).or_default();
    if slot.h1.len() < config.max_idle_per_key {
        slot.h1.push((sender, now));
    }
    drop(slots);
    sweep(shared, config, now);
}

/// Drops expired idle connections of every key, at most once per idle timeout.
fn sweep(shared: &Shared, config: &PoolConfig, now: Instant) {
    {
        let mut last = shared
            .last_sweep
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(*last) < config.idle_timeout {
            return;
        }
        *last = now;
    }
    let mut slots = shared.slots.lock().unwrap_or_else(PoisonError::into_inner);
    slots.retain(|_, slot| {
        slot.h1
            .retain(|(s, since)| !s.is_closed() && now - *since < config.idle_timeout);
        if slot.h2.as_ref().is_some_and(|s| s.is_closed()) {
            slot.h2 = None;
        }
        slot.h2.is_some() || !slot.h1.is_empty()
    });
}

fn connect_kind(e: &(dyn std::error::Error + 'static)) -> ForwardErrorKind {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<crate::tcp::ConnectError>() {
            if c.kind() == crate::tcp::ConnectErrorKind::TimedOut {
                return ForwardErrorKind::Timeout;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return ForwardErrorKind::Timeout;
            }
        }
        cur = err.source();
    }
    ForwardErrorKind::Connect
}

/// A failed exchange: if the request body failed it is the client's fault (decided by the
/// caller, which knows); a timeout is a timeout; everything else is a broken upstream.
fn upstream_kind(e: &hyper::Error) -> ForwardErrorKind {
    if e.is_timeout() {
        ForwardErrorKind::Timeout
    } else {
        ForwardErrorKind::Upstream
    }
}
