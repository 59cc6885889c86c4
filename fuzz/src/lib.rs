//! Shared harness of the connection-level fuzz targets (`hbone_request`, `http1_server`,
//! `h2_frames`) and of the seed generator (`examples/seeds.rs`).
//!
//! * [`run`]: one paused-clock, current-thread tokio runtime per thread, reused across
//!   executions. Timers auto-advance whenever every task is idle, so a server's timeouts
//!   (10 s header reads, 30 s admission…) cost no wall-clock time, and a connection that
//!   would wait forever surfaces as the harness's own virtual-time timeout firing.
//! * [`wire`]: raw HTTP/2 frames and HPACK "literal without indexing, new name" fields, so
//!   any byte string can be sent as a header name or value.
//! * [`input`]: the encoding of the structured inputs. `Blob` and `List` read a length
//!   prefix from the front, so every field of an input is read front to back and the seed
//!   generator can write inputs field by field ([`input::Encode`]); it checks each seed by
//!   decoding it again.
//! * [`hbone`], [`frames`]: the input types of `hbone_request` and `h2_frames`.
//! * [`services`]: the inner services and servers the targets run.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Runtime;

pub mod frames;
pub mod hbone;
pub mod input;
pub mod services;
pub mod wire;

/// How long (virtual time) tasks an execution spawned may outlive it before the harness
/// calls them leaked. Longer than every timeout the servers have (30 s admission, 20 s
/// keepalive), far shorter than forever.
pub const TASK_GRACE: Duration = Duration::from_secs(600);

thread_local! {
    static RUNTIME: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
}

/// Whether `PROXYSTACK_FUZZ_TRACE` is set: the targets then print what each input did
/// (run one input or a seed directory with `-runs=0` to see it).
pub fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("PROXYSTACK_FUZZ_TRACE").is_some())
}

/// Runs `f` on this thread's paused-clock runtime, then waits (in virtual time) until every
/// task it spawned has finished; panics if some are still alive after [`TASK_GRACE`], which
/// would be a task leaked by a closed connection.
pub fn run<F: Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| {
        let out = rt.block_on(f);
        rt.block_on(async {
            let metrics = tokio::runtime::Handle::current().metrics();
            let deadline = tokio::time::Instant::now() + TASK_GRACE;
            let mut pause = Duration::from_millis(1);
            while metrics.num_alive_tasks() > 0 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} task(s) still alive {TASK_GRACE:?} after the connection closed",
                    metrics.num_alive_tasks()
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
        out
    })
}
