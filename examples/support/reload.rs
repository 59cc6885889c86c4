//! SIGHUP reload for the examples that support it: the config file is read again, checked
//! as a whole, and only then applied; a bad one is refused with a message naming the
//! problem and the running config stays.
//!
//! What "applied" means is the example's business (its reload closure, given to
//! [`Servers::run_reloading`]): typically a new snapshot sent on a `tokio::sync::watch`
//! channel that routes and policies read per connection or request (so new ones follow it
//! at once), `admission::RecheckLayer` cutting running tunnels the new policy refuses, and
//! listeners opened ([`Servers::bind_changed`] + [`Servers::spawn_configured`]) or
//! drained ([`Servers::retain`]).
//!
//! `/metrics` counts `proxystack_config_reloads_total` and
//! `proxystack_config_reload_failures_total`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;

use super::{own_listeners, Metrics, Servers};

/// The reload of a run without a config file (`--demo`): refused and counted, and the
/// process runs on, where SIGHUP's default action would end it.
pub fn without_config_file(_: &mut Servers) -> Result<(), String> {
    Err("--demo has no config file to re-read".into())
}

/// Reads and parses a TOML config file; the error names the file and the problem.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("invalid config {}: {e}", path.display()))
}

/// Refuses a reload that changes `what`, a part of the config read only at start (an
/// identity source, a socket mark): applying the rest and silently ignoring it would leave
/// the file saying something the proxy does not do.
pub fn unchanged<T: PartialEq>(what: &str, at_start: &T, now: &T) -> Result<(), String> {
    if at_start == now {
        Ok(())
    } else {
        Err(format!("{what}: changing it needs a restart"))
    }
}

/// SIGHUP as a stream, installed before the `listening on` lines are printed (a script
/// that reloads right after reading them must not kill the process: SIGHUP's default
/// action is to terminate).
pub(super) fn hangup_signal() -> tokio::signal::unix::Signal {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup())
        .unwrap_or_else(|e| super::fail(format!("cannot install the SIGHUP handler: {e}")))
}

/// Reloads applied and refused, for `/metrics`.
#[derive(Default)]
pub(super) struct Counters {
    applied: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    /// Registers both counters in `metrics` when the example reloads at all.
    pub(super) fn register(metrics: &mut Metrics, reloading: bool) -> Arc<Self> {
        let counters = Arc::new(Self::default());
        if reloading {
            let c = counters.clone();
            metrics.counter_fn(
                "proxystack_config_reloads",
                "Config reloads (SIGHUP) applied.",
                move || c.applied.load(Ordering::Relaxed),
            );
            let c = counters.clone();
            metrics.counter_fn(
                "proxystack_config_reload_failures",
                "Config reloads (SIGHUP) refused; the previous config stayed in use.",
                move || c.failed.load(Ordering::Relaxed),
            );
        }
        counters
    }

    /// Counts and logs one reload's outcome.
    pub(super) fn record(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                self.applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!("config reloaded");
            }
            Err(problem) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%problem, "config reload refused; the running config stays");
            }
        }
    }
}

impl Servers {
    /// [`run`](Self::run), and on every SIGHUP calls `reload`: it reads the config again,
    /// checks all of it, and applies it only if everything is right (`Err` names the
    /// problem; nothing may have changed then).
    pub async fn run_reloading(
        self,
        admin_addr: Option<SocketAddr>,
        reload: impl FnMut(&mut Servers) -> Result<(), String>,
    ) {
        self.run_inner(admin_addr, Some(reload)).await;
    }

    /// Binds the listeners of `wanted` (name, configured address) that do not run on that
    /// configured address yet — all or none: on the first failure the ones bound so far are
    /// closed and the error names the address. Serve each returned listener with
    /// [`spawn_configured`](Self::spawn_configured) (replacing the old one of its name),
    /// then [`retain`](Self::retain) the wanted names.
    pub fn bind_changed(
        &self,
        wanted: &[(String, SocketAddr)],
    ) -> Result<Vec<(String, SocketAddr, TcpListener)>, String> {
        let mut bound = Vec::new();
        for (name, addr) in wanted {
            let unchanged = self
                .listeners
                .iter()
                // The same configured address, or the one it was bound to (a port 0
                // written back as the port it got).
                .any(|l| &l.name == name && (l.configured == *addr || l.bound == *addr));
            if unchanged {
                continue;
            }
            match super::bind_now(*addr, "") {
                Ok(listener) => bound.push((name.clone(), *addr, listener)),
                Err(e) => {
                    for (_, _, l) in &bound {
                        if let Ok(a) = l.local_addr() {
                            own_listeners().unregister(a);
                        }
                    }
                    return Err(format!("{name}: {e}"));
                }
            }
        }
        Ok(bound)
    }
}
