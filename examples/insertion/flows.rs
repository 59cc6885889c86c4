//! Flows: what the ingress side knew about a tunnel, kept for the egress side under a
//! single-use token that travels through the inserted proxies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proxystack::identity::SpiffeId;

/// What the ingress side learnt about a tunnel, for the egress side.
#[derive(Debug, Clone)]
pub(super) struct Flow {
    pub(super) client: SocketAddr,
    pub(super) destination: usize,
    pub(super) identity: Option<SpiffeId>,
    pub(super) service: Option<String>,
    /// Index of the inserted proxy the flow was last sent to.
    pub(super) hop: usize,
    /// How often the tunnel had been inserted before (from the CONNECT header).
    pub(super) insertions: u8,
}

/// Single-use flow tokens → flows, with expiry and a size bound.
pub(super) struct FlowTable {
    ttl: Duration,
    max: usize,
    inner: Mutex<FlowMap>,
}

struct FlowMap {
    flows: HashMap<String, (Flow, Instant)>,
    swept: Instant,
}

impl FlowTable {
    pub(super) fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            inner: Mutex::new(FlowMap {
                flows: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlowMap> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `flow` under a fresh token; `None` when the table is full.
    pub(super) fn mint(&self, flow: Flow) -> Option<String> {
        let now = Instant::now();
        let mut map = self.lock();
        if now.duration_since(map.swept) >= Duration::from_secs(1) || map.flows.len() >= self.max {
            map.flows.retain(|_, (_, expires)| *expires > now);
            map.swept = now;
        }
        if map.flows.len() >= self.max {
            return None;
        }
        let token = new_token();
        map.flows.insert(token.clone(), (flow, now + self.ttl));
        Some(token)
    }

    /// Removes and returns the flow of `token`, unless unknown or expired.
    pub(super) fn take(&self, token: &str) -> Option<Flow> {
        let (flow, expires) = self.lock().flows.remove(token)?;
        (expires > Instant::now()).then_some(flow)
    }

    pub(super) fn len(&self) -> usize {
        self.lock().flows.len()
    }
}

/// 128 unpredictable bits as 32 hex digits: SipHash under the process's random keys
/// (`RandomState`) of a counter. Not a CSPRNG, but nothing outside this process can
/// predict it, which is all a token needs.
pub(super) fn new_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let word = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u64(salt);
        h.finish()
    };
    format!("{:016x}{:016x}", word(1), word(2))
}
