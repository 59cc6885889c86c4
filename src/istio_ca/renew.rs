//! The renewal task: keeps a current certificate, renewing it before it expires.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::{CaClient, IssuedIdentity};

/// What a [`Renewer`] publishes: the current identity, or `None` before the first one
/// arrives and after the last one expired without a successor.
pub type IdentityReceiver = watch::Receiver<Option<Arc<IssuedIdentity>>>;

/// Default first retry delay after a failed request.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Default longest retry delay.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Default jitter: renewal happens up to this fraction of the lifetime before its half.
pub const DEFAULT_JITTER: f64 = 0.1;

/// A task that obtains a certificate from a [`CaClient`] and renews it for as long as it
/// runs, publishing every new identity on a [`watch`] channel.
///
/// * Renews at half of the certificate's lifetime, earlier by a random part of up to
///   [`jitter`](RenewerBuilder::jitter) of the lifetime, so that a fleet started together
///   does not renew together.
/// * On failure, retries with exponential back-off (doubling from
///   [`initial_backoff`](RenewerBuilder::initial_backoff) to
///   [`max_backoff`](RenewerBuilder::max_backoff), each delay jittered). The current
///   identity stays published meanwhile; if it expires first, `None` is published (fail
///   closed: an expired certificate would be refused by every peer anyway) and an error
///   is logged.
/// * Stops on [`stop`](Renewer::stop) or when dropped.
///
/// ```no_run
/// # async fn run(client: proxystack::istio_ca::CaClient) {
/// use proxystack::istio_ca::Renewer;
/// let renewer = Renewer::builder(client).spawn();
/// let mut identities = renewer.subscribe();
/// while identities.changed().await.is_ok() {
///     if let Some(id) = identities.borrow_and_update().clone() {
///         println!("new certificate, valid until {:?}", id.not_after);
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Renewer {
    rx: IdentityReceiver,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Configuration of a [`Renewer`]; from [`Renewer::builder`].
#[must_use]
#[derive(Debug)]
pub struct RenewerBuilder {
    client: CaClient,
    initial_backoff: Duration,
    max_backoff: Duration,
    jitter: f64,
}

impl Renewer {
    /// Starts configuring a renewer for `client`.
    pub fn builder(client: CaClient) -> RenewerBuilder {
        RenewerBuilder {
            client,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            jitter: DEFAULT_JITTER,
        }
    }

    /// A receiver of every identity this renewer publishes.
    pub fn subscribe(&self) -> IdentityReceiver {
        self.rx.clone()
    }

    /// The identity published last.
    pub fn current(&self) -> Option<Arc<IssuedIdentity>> {
        self.rx.borrow().clone()
    }

    /// Stops the task and waits for it to end. Receivers keep the last value and see the
    /// channel closed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RenewerBuilder {
    /// First retry delay after a failure (default [`DEFAULT_INITIAL_BACKOFF`]); also the
    /// shortest wait before renewing a certificate that is already past its half-life.
    pub fn initial_backoff(mut self, delay: Duration) -> Self {
        self.initial_backoff = delay;
        self
    }

    /// Longest retry delay (default [`DEFAULT_MAX_BACKOFF`]).
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.max_backoff = delay;
        self
    }

    /// Fraction of the lifetime by which renewal may come early, and of each retry delay
    /// by which it may vary (default [`DEFAULT_JITTER`]; clamped to `0.0..=0.5`).
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 0.5)
        } else {
            DEFAULT_JITTER
        };
        self
    }

    /// Spawns the task on the current Tokio runtime; the first request starts at once.
    ///
    /// # Panics
    /// Outside a Tokio runtime (as `tokio::spawn`).
    pub fn spawn(self) -> Renewer {
        let (tx, rx) = watch::channel(None);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(self, tx, stop_rx));
        Renewer {
            rx,
            stop: Some(stop_tx),
            task,
        }
    }
}

async fn run(
    cfg: RenewerBuilder,
    tx: watch::Sender<Option<Arc<IssuedIdentity>>>,
    mut stop: oneshot::Receiver<()>,
) {
    let identity = cfg.client.identity().clone();
    let mut backoff = cfg.initial_backoff;
    let mut current: Option<Arc<IssuedIdentity>> = None;
    loop {
        // A request may take long (or forever, with no client timeout): the current
        // identity is still withdrawn at its expiry meanwhile.
        let fetch = cfg.client.fetch();
        tokio::pin!(fetch);
        let fetched = loop {
            let expiry = current.as_ref().map(|c| at(c.not_after));
            tokio::select! {
                _ = &mut stop => return,
                r = &mut fetch => break r,
                _ = sleep_until_some(expiry) => {
                    withdraw(&identity, &mut current, &tx);
                }
            }
        };
        let next = match fetched {
            Ok(issued) => {
                backoff = cfg.initial_backoff;
                let issued = Arc::new(issued);
                let renew_at = renewal_time(&issued, cfg.jitter);
                tracing::info!(%identity, renew_in = ?until(renew_at), "new certificate published");
                tx.send_replace(Some(issued.clone()));
                current = Some(issued);
                at(renew_at).max(Instant::now() + cfg.initial_backoff)
            }
            Err(e) => {
                let delay = jittered(backoff, cfg.jitter);
                tracing::warn!(%identity, error = %e, retry_in = ?delay, "certificate renewal failed; keeping the current one");
                backoff = backoff.saturating_mul(2).min(cfg.max_backoff);
                Instant::now() + delay
            }
        };
        // Wait for `next`, but withdraw the current identity the moment it expires.
        loop {
            let expiry = current.as_ref().map(|c| at(c.not_after));
            let wake = match expiry {
                Some(expiry) if expiry < next => expiry,
                _ => next,
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep_until(wake) => {}
            }
            if Some(wake) == expiry {
                withdraw(&identity, &mut current, &tx);
            }
            if Instant::now() >= next {
                break;
            }
        }
    }
}

/// Publishes `None` in place of an expired identity (fail closed: peers would refuse it).
fn withdraw(
    identity: &crate::identity::SpiffeId,
    current: &mut Option<Arc<IssuedIdentity>>,
    tx: &watch::Sender<Option<Arc<IssuedIdentity>>>,
) {
    if current.take().is_some() {
        tracing::error!(%identity, "certificate expired before it could be renewed; no identity until the CA answers");
        tx.send_replace(None);
    }
}

/// Sleeps until `t`, or forever when there is none.
async fn sleep_until_some(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Half-life, earlier by a random part of up to `jitter` of the lifetime.
fn renewal_time(issued: &IssuedIdentity, jitter: f64) -> SystemTime {
    let lifetime = issued.lifetime();
    let early = lifetime.mul_f64(jitter * random_fraction());
    (issued.not_before + lifetime / 2)
        .checked_sub(early)
        .unwrap_or(issued.not_before)
}

/// `delay` varied by up to ±`jitter` of itself.
fn jittered(delay: Duration, jitter: f64) -> Duration {
    delay.mul_f64(1.0 + jitter * (2.0 * random_fraction() - 1.0))
}

/// The Tokio instant of a wall-clock time (now when it is past).
fn at(t: SystemTime) -> Instant {
    Instant::now() + until(t)
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

/// A number in `[0, 1)`, random enough for jitter: std's per-instance `RandomState` keys
/// are random, which spares a dependency on an RNG crate for this one use.
fn random_fraction() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f));
            let d = jittered(Duration::from_secs(10), 0.1);
            assert!(d >= Duration::from_secs(9) && d <= Duration::from_secs(11));
        }
    }
}
