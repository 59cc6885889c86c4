//! Tunnel admission: how a service behind a tunnel terminator tells it to answer `200`
//! (admitted) or an error status (refused, and why), and how a tunnel is aborted.
//!
//! A CONNECT or HBONE terminator must not say `200` before the upstream really accepted
//! (RFC 9110 §9.3.6), and must answer a refusal with the status its reason maps to. This
//! module carries that decision between the levels; it does no IO itself.
//!
//! A decision can be taken again: [`RecheckLayer`] re-checks running connections against a
//! policy that changes (a reloaded config) and cuts those it no longer allows.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

mod recheck;
pub use recheck::{while_unchanged, Recheck, RecheckError, RecheckLayer};

/// Why an inner service refused a connection handed to it through a tunnel, so the tunnel
/// terminator can answer with the right status (see [`Admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Policy denied the connection (HTTP 401/403).
    Denied,
    /// The upstream refused or reset the connection (HTTP 503).
    Refused,
    /// The upstream could not be reached: no route, DNS failure (HTTP 502).
    Unreachable,
    /// Connecting to the upstream timed out (HTTP 504).
    TimedOut,
    /// The upstream is one of this proxy's own listeners (its tunnel ports, its admin
    /// endpoint): a tunnel to it would loop back into the proxy — ztunnel's "recursive
    /// call to ourselves" (HTTP 503). See `tcp::OwnListeners`.
    Loop,
}

/// An error that carries the [`Refusal`] a tunnel terminator should answer with; put it
/// in an error's `source()` chain so that layers above can map it to a status code.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("upstream refused: {0:?}")]
pub struct UpstreamRefusal(pub Refusal);

/// The [`Refusal`] for an upstream failure: the first [`UpstreamRefusal`] or TCP connect
/// error in the `source()` chain, else [`Refusal::Unreachable`] (a 502-class answer).
pub fn refusal_for(e: &(dyn std::error::Error + 'static)) -> Refusal {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<UpstreamRefusal>() {
            return r.0;
        }
        #[cfg(feature = "tcp")]
        if let Some(c) = err.downcast_ref::<crate::tcp::ConnectError>() {
            return c.refusal();
        }
        cur = err.source();
    }
    Refusal::Unreachable
}

/// Metadata: the "may I say 200?" handle of a tunnel.
///
/// A CONNECT terminator must answer `200` only once the connection has really been
/// accepted. It puts an `Admission` into the tunnel's metadata and waits. A service that
/// dials an upstream (like `tcp::Relay`) calls [`Admission::admit`] once connected, or
/// [`Admission::refuse`] with the reason. Services that do not know about admission need do
/// nothing: the tunnel's stream admits itself on its first read or write, so any layer
/// that starts speaking implicitly accepts.
#[derive(Clone)]
pub struct Admission(Arc<Mutex<Option<AdmissionSender>>>);

type AdmissionSender = oneshot::Sender<Result<(), Refusal>>;

impl Admission {
    /// A new admission handle and the receiver the terminator waits on. The receiver sees
    /// a closed channel if every handle is dropped without a decision.
    pub fn new() -> (Self, oneshot::Receiver<Result<(), Refusal>>) {
        let (tx, rx) = oneshot::channel();
        (Self(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Accepts the connection. Only the first decision counts.
    pub fn admit(&self) {
        self.decide(Ok(()));
    }

    /// Refuses the connection. Only the first decision counts.
    pub fn refuse(&self, why: Refusal) {
        self.decide(Err(why));
    }

    /// Whether a decision has been made.
    pub fn is_decided(&self) -> bool {
        self.0.lock().map(|s| s.is_none()).unwrap_or(true)
    }

    fn decide(&self, decision: Result<(), Refusal>) {
        let sender = match self.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(tx) = sender {
            let _ = tx.send(decision);
        }
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("decided", &self.is_decided())
            .finish()
    }
}

/// Metadata: the "end with a reset, not a clean close" switch of a stream that is not a
/// TCP socket.
///
/// A clean close (TCP FIN, HTTP/2 `END_STREAM`) tells the peer that all data arrived; after
/// the other side of a relay failed, that would be a lie. A TCP socket is made to reset with
/// `SO_LINGER 0`; a stream that is not a socket — an HTTP/2 CONNECT tunnel — shares an
/// `Abort` with its connection's metadata instead. [`tcp::Relay`](crate::tcp::Relay) calls
/// [`Abort::abort`] on the healthy side's handle when the other side failed, and the stream
/// then ends with a reset when it is dropped (HTTP/2: `RST_STREAM(CONNECT_ERROR)`, RFC 9113
/// §8.5) or at its next read or write.
///
/// ```
/// use proxystack::admission::Abort;
/// let abort = Abort::new();
/// let seen_by_stream = abort.clone();
/// abort.abort();
/// assert!(seen_by_stream.is_aborted());
/// ```
#[derive(Clone, Default)]
pub struct Abort(Arc<AtomicBool>);

impl Abort {
    /// A handle that is not aborted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the stream to end with a reset. Idempotent; cannot be undone.
    pub fn abort(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`Abort::abort`] was called on this handle or a clone of it.
    pub fn is_aborted(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Abort").field(&self.is_aborted()).finish()
    }
}
