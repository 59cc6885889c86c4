//! Glue between the renewal task and the TLS layers: every identity a [`Renewer`]
//! publishes goes into a [`LiveIdentity`], so new handshakes present it at once.

use tokio::task::JoinHandle;
use tracing::{debug, error};

use super::{IdentityReceiver, IssuedIdentity, Renewer};
use crate::tls::{Credentials, LiveIdentity};

impl IssuedIdentity {
    /// The chain, key and roots as [`Credentials`] for a [`LiveIdentity`] (no revocation
    /// lists: the CA hands out none).
    pub fn credentials(&self) -> Credentials {
        Credentials::new(self.cert_key(), self.roots.iter().cloned())
    }
}

impl Renewer {
    /// Applies every identity this renewer publishes (the current one first) to
    /// `identity`, until the returned handle is dropped; see [`LiveIdentity::follow`].
    pub fn publish_to(&self, identity: &LiveIdentity) -> Following {
        identity.follow(self.subscribe())
    }
}

impl LiveIdentity {
    /// Applies every identity published on `identities` (e.g. [`Renewer::subscribe`]),
    /// the current one first, until the returned handle is dropped or the sender is gone.
    /// Needs a Tokio runtime.
    ///
    /// Each one goes through [`set`](LiveIdentity::set), keeping the revocation lists in
    /// use: one that fails its checks (e.g. another SPIFFE ID than
    /// [`expect_identity`](crate::tls::LiveIdentityBuilder::expect_identity)) is refused
    /// with a `WARN` event and the material in use stays. A withdrawn identity (`None`:
    /// expired without a successor) cannot be un-set; it logs an `ERROR` and the expired
    /// certificate stays, which every peer refuses (fail closed) until a new one arrives.
    ///
    /// ```no_run
    /// # async fn run(client: proxystack::istio_ca::CaClient) -> Result<(), Box<dyn std::error::Error>> {
    /// use proxystack::istio_ca::Renewer;
    /// use proxystack::tls::LiveIdentity;
    /// let renewer = Renewer::builder(client).spawn();
    /// let mut issued = renewer.subscribe();
    /// let first = issued.wait_for(Option::is_some).await?.clone().ok_or("no identity")?;
    /// let identity = LiveIdentity::builder()
    ///     .expect_identity(first.identity.clone())
    ///     .build(first.credentials())?;
    /// let _following = renewer.publish_to(&identity); // stops when dropped
    /// // … TerminateLayer::live(&identity), TlsConnector::live(&identity), …
    /// # Ok(()) }
    /// ```
    pub fn follow(&self, mut identities: IdentityReceiver) -> Following {
        let identity = self.clone();
        let task = crate::task::spawn(async move {
            loop {
                let issued = identities.borrow_and_update().clone();
                match issued {
                    Some(issued) => {
                        let current = identity.current();
                        let credentials = issued.credentials().crls(current.crls().to_vec());
                        if current.holds(&credentials) {
                            debug!("issued identity already in use");
                        } else {
                            // `set` logs what it applies or refuses.
                            let _ = identity.set(credentials);
                        }
                    }
                    None => error!(
                        "the CA identity expired without a successor; \
                         the expired certificate stays and peers will refuse it"
                    ),
                }
                if identities.changed().await.is_err() {
                    debug!("identity source closed; no more changes");
                    return;
                }
            }
        });
        Following { task }
    }
}

/// Stops [`LiveIdentity::follow`] when dropped.
#[derive(Debug)]
#[must_use = "following stops when the handle is dropped"]
pub struct Following {
    task: JoinHandle<()>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.task.abort();
    }
}
