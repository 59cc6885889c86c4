//! Graceful shutdown: one [`Signal`], many [`Watch`]es.
//!
//! Every long-lived task (an accept loop, an HTTP/2 connection, a pooled tunnel) holds a
//! [`Watch`]. When the owner calls [`Signal::drain`], watchers see [`Watch::signaled`]
//! complete: accept loops stop accepting, HTTP servers send `GOAWAY` / `Connection: close`,
//! and `drain()` resolves once every watcher has been dropped. Deadlines are the business of
//! whoever waits (e.g. [`Server::drain_timeout`](crate::Server::drain_timeout)), so this
//! module stays a pure signal.

use tokio::sync::watch;

/// SIGTERM and Ctrl-C (SIGINT) handlers: the two usual reasons for a proxy to drain.
///
/// The handlers are installed when this is created, not when it is first awaited: create
/// it *before* telling anyone the proxy is ready (a `listening on` line, a readiness
/// probe), or a signal sent right after that may still find the default action and kill
/// the process instead of draining it.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// let shutdown = proxystack::drain::ShutdownSignal::install()?;
/// let (signal, watch) = proxystack::drain::channel();
/// // … serve with `watch`, announce readiness …
/// shutdown.recv().await;
/// signal.drain().await;
/// # let _ = watch; Ok(()) }
/// ```
#[derive(Debug)]
pub struct ShutdownSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    /// Installs the handlers (needs a tokio runtime with signal support).
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Completes on the first SIGTERM or Ctrl-C.
    pub async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Creates a drain signal and its first watcher.
pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    (Signal(tx), Watch(rx))
}

/// The sending half: starts the drain.
#[derive(Debug)]
pub struct Signal(watch::Sender<bool>);

/// The receiving half: cheap to clone, one per task that must react to shutdown.
#[derive(Debug, Clone)]
pub struct Watch(watch::Receiver<bool>);

impl Signal {
    /// Tells every watcher to drain, then waits until all of them have been dropped.
    pub async fn drain(self) {
        self.start();
        self.0.closed().await;
    }

    /// Tells every watcher to drain without waiting.
    pub fn start(&self) {
        self.0.send_replace(true);
    }

    /// A new watcher on this signal.
    pub fn watch(&self) -> Watch {
        Watch(self.0.subscribe())
    }
}

impl Watch {
    /// A watcher that is never signaled, for code that needs no shutdown.
    pub fn never() -> Self {
        // The sender is dropped at once: `signaled` reads a closed channel as "never", so
        // nothing needs to keep it alive (leaking it cost one allocation per connection).
        let (_, rx) = watch::channel(false);
        Watch(rx)
    }

    /// Completes once draining has started (immediately if it already has).
    pub async fn signaled(&self) {
        let mut rx = self.0.clone();
        // An error means the signal was dropped without draining: treat it as "never".
        if rx.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Found by the `hbone_request` fuzz target (LeakSanitizer): `never()` leaked its
    /// sender, once per connection served without a drain watch.
    #[tokio::test]
    async fn never_holds_no_sender_and_never_fires() {
        let watch = Watch::never();
        assert!(watch.0.has_changed().is_err(), "a sender is still alive");
        assert!(!watch.is_draining());
        let fired = tokio::time::timeout(Duration::from_millis(50), watch.signaled()).await;
        assert!(fired.is_err());
    }

    #[tokio::test]
    async fn drain_fires_watchers() {
        let (signal, watch) = channel();
        let task = tokio::spawn(async move { watch.signaled().await });
        signal.drain().await;
        task.await.unwrap();
    }
}
