//! Running the work of a served connection so that a panic anywhere in it is caught,
//! logged and counted.
//!
//! [`Server`](crate::Server) runs each connection through [`serving`]: a panic in it is
//! caught, logged through `tracing` and counted in [`ServeStats::panics`] at once. A
//! connection also spawns work of its own: hyper runs each HTTP/2 stream in a task, the
//! CONNECT terminator runs each tunnel in one, pools drive their upstream connections in
//! others. Those are spawned with `spawn`, which carries the server's counters along (a
//! task-local), so their panics are counted by the same server.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::serve::ServeStats;

tokio::task_local! {
    static SERVING: Arc<ServeStats>;
}

/// Runs `fut` as the work of a connection served with `stats` (see the module docs).
///
/// A future struct, not an `async fn`: the state of an `async fn` keeps its argument
/// beside the future it builds from it (rust-lang/rust#62958), which would store every
/// connection's future twice in its task.
pub(crate) fn serving<F: Future<Output = ()>>(stats: Arc<ServeStats>, fut: F) -> Serving<F> {
    Serving {
        inner: SERVING.scope(stats.clone(), CatchPanic { inner: fut }),
        stats,
    }
}

pin_project_lite::pin_project! {
    /// See [`serving`].
    pub(crate) struct Serving<F> {
        #[pin]
        inner: tokio::task::futures::TaskLocalFuture<Arc<ServeStats>, CatchPanic<F>>,
        stats: Arc<ServeStats>,
    }
}

impl<F: Future<Output = ()>> Future for Serving<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(panic)) => {
                report(Some(this.stats), &*panic);
                Poll::Ready(())
            }
        }
    }
}

/// Spawns `fut` as part of the current connection's work (see the module docs).
#[cfg(any(feature = "http", feature = "connect", feature = "tls"))]
pub(crate) fn spawn<F>(fut: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let stats = SERVING.try_with(Arc::clone).ok();
    tokio::spawn(async move {
        match stats {
            Some(stats) => serving(stats, fut).await,
            None => {
                if let Err(panic) = (CatchPanic { inner: fut }).await {
                    report(None, &*panic);
                }
            }
        }
    })
}

fn report(stats: Option<&ServeStats>, panic: &(dyn std::any::Any + Send)) {
    if let Some(stats) = stats {
        stats.panics.fetch_add(1, Ordering::Relaxed);
    }
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string payload");
    tracing::error!(panic = message, "connection work panicked");
}

/// hyper's executor for the streams and connections it drives: `spawn`.
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Executor;

#[cfg(feature = "http")]
impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        // hyper does not join what it spawns.
        drop(spawn(async move {
            fut.await;
        }));
    }
}

pin_project_lite::pin_project! {
    /// Resolves to `Err` with the payload if polling `inner` panics.
    struct CatchPanic<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        // The future is never polled again after a panic (we return Ready), so no broken
        // invariant inside it can be observed.
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Tasks that carry a connection on after its protocol handler returned: an HTTP/1.1
/// `CONNECT` tunnel, a connection switched to another protocol (`101`). The connection's
/// task ends with [`join`](Self::join), so the accept loop counts them against its limit
/// and, when it aborts the connection at the drain deadline, they are aborted with it.
#[cfg(any(feature = "http", feature = "connect"))]
#[derive(Clone, Default)]
pub(crate) struct ConnectionTasks(Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>);

#[cfg(any(feature = "http", feature = "connect"))]
impl ConnectionTasks {
    pub(crate) fn push(&self, task: tokio::task::JoinHandle<()>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    /// Waits for every task pushed so far; aborts those left if dropped first.
    pub(crate) async fn join(&self) {
        let tasks = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let guards: Vec<AbortOnDrop> = tasks.into_iter().map(AbortOnDrop).collect();
        for mut guard in guards {
            let _ = (&mut guard.0).await;
        }
    }
}

/// Aborts a task when dropped.
#[cfg(any(feature = "http", feature = "connect"))]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

#[cfg(any(feature = "http", feature = "connect"))]
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
