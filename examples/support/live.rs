//! Live identities for the mesh examples: `[identity]` files watched for changes, so new
//! handshakes use a rotated certificate without a restart.

use std::time::Duration;

use proxystack::tls::{FileWatch, LiveIdentity};

use super::{fail, IdentityFiles};

/// How often the identity files are read (Kubernetes updates secret mounts within a
/// minute; a few seconds keeps the lag small at the cost of reading a few KiB).
const POLL: Duration = Duration::from_secs(2);

impl IdentityFiles {
    /// Loads the files into a [`LiveIdentity`] expecting the certificate's SPIFFE ID (a
    /// rotated file for someone else is refused and logged), and watches them until the
    /// returned handle is dropped. Exits naming the problem when the first load fails.
    pub fn live(&self) -> (LiveIdentity, FileWatch) {
        let files = proxystack::tls::IdentityFiles::new(&self.cert, &self.key, &self.roots)
            .poll_interval(POLL);
        let credentials = files.load().unwrap_or_else(|e| fail(e));
        let Some(id) = credentials.cert.spiffe_ids().into_iter().next() else {
            fail(format!("{} has no spiffe:// URI SAN", self.cert.display()));
        };
        let identity = LiveIdentity::builder()
            .expect_identity(id)
            .build(credentials)
            .unwrap_or_else(|e| fail(format!("[identity]: {e}")));
        let watch = files.watch(&identity);
        (identity, watch)
    }
}

/// Registers, in `metrics`, when the certificate in use expires and how many identity
/// changes were applied (both read at scrape time).
pub fn identity_metrics(metrics: &mut super::Metrics, identity: &LiveIdentity) {
    let live = identity.clone();
    metrics.gauge_fn(
        "proxystack_identity_cert_expiry_timestamp_seconds",
        "notAfter of the certificate in use, seconds since the epoch.",
        move || {
            let not_after = live.current().not_after();
            not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        },
    );
    let live = identity.clone();
    metrics.counter_fn(
        "proxystack_identity_changes",
        "Certificate or root changes applied since start.",
        move || live.generation().saturating_sub(1),
    );
}
