//! hyper's executor for the HTTP level: `crate::task::Executor`, with the future boxed first.
//!
//! hyper spawns a task for every HTTP/2 stream it serves (the service's future and the
//! response body) and, as a client, for every request it sends on an HTTP/2 connection.
//! Those futures are large (the whole service stack is cloned into each), and
//! `crate::task::spawn` nests them in two more `async` blocks (the panic catcher and the
//! server's counters), each of which stores its input beside the future it builds from
//! it. Spawned as they are, every stream's task was several kilobytes, copied into the
//! task and again over its whole size each time the task's stage changed: about half of
//! the instructions of an h2c → h2 request went to `memcpy`. Boxed first, the future is
//! copied once into its box and the task holds a pointer.

use std::future::Future;

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        crate::task::Executor.execute(Box::pin(fut));
    }
}
