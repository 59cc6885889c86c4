//! Istio CA client (feature `istio-ca`): obtain and renew a SPIFFE workload certificate
//! from istiod (or any CA speaking `istio.v1.auth.IstioCertificateService`), as ztunnel does.
//!
//! * [`CaClient::fetch`] generates an ECDSA P-256 key pair, sends a CSR whose only SAN is
//!   the SPIFFE ID (RFC 2986 CSR, RFC 5280 URI SAN) in one gRPC `CreateCertificate` call
//!   over TLS 1.2/1.3 verified by the configured CA root and HTTP/2 (RFC 9113), with the
//!   Kubernetes service-account token as `authorization: Bearer …` (RFC 6750) when one is
//!   configured and ztunnel's `ClusterID` header. The answer is checked before it is
//!   returned: every certificate parses, the leaf is for the new key, its only SPIFFE ID is
//!   the requested one, it has not expired, and it chains (as a TLS client certificate) to
//!   the roots it will be published with. Anything else is refused with a [`CaError`].
//! * [`IssuedIdentity`] is the result: chain, key, roots, validity. Its
//!   [`cert_key`](IssuedIdentity::cert_key) and [`root_store`](IssuedIdentity::root_store)
//!   feed the [`tls`](crate::tls) module.
//! * [`Renewer`] keeps one current: renews at half of the lifetime (with jitter), retries
//!   with exponential back-off, keeps the old identity until it expires, and publishes each
//!   new one on a `tokio::sync::watch` channel.
//!
//! **Root rotation.** The CA connection trusts the root given to the builder, or the
//! current content of a [`root_file`](CaClientBuilder::root_file) read at every request.
//! An issued identity's roots are the self-signed root that ends the CA's chain (how istiod
//! hands out a new root) plus the configured ones.
//!
//! Not here: SDS (serving certificates to Envoy), issuing or validating JWTs (the token is
//! read from a file and passed through), impersonation of other identities (the node
//! agent's `ImpersonatedIdentity` metadata), client-certificate authentication to the CA
//! (renewing with the current certificate instead of a token), revocation checks of the
//! issued chain.
//!
//! **Into TLS.** [`Renewer::publish_to`] (or
//! [`LiveIdentity::follow`](crate::tls::LiveIdentity::follow)) feeds each new identity to a
//! [`LiveIdentity`](crate::tls::LiveIdentity), which checks it and serves it on new
//! handshakes of every layer built on it.
//!
//! ```no_run
//! use proxystack::identity::SpiffeId;
//! use proxystack::istio_ca::{CaClient, Renewer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let root = std::fs::read("/var/run/secrets/istio/root-cert.pem")?;
//! let client = CaClient::builder(
//!     "istiod.istio-system.svc:15012",
//!     root,
//!     SpiffeId::istio("cluster.local", "default", "reviews")?,
//! )
//! .root_file("/var/run/secrets/istio/root-cert.pem")
//! .token_file("/var/run/secrets/tokens/istio-token")
//! .build()?;
//!
//! // One certificate now…
//! let issued = client.fetch().await?;
//! println!("{} until {:?}", issued.identity, issued.not_after);
//!
//! // …or one kept fresh for as long as the renewer runs.
//! let renewer = Renewer::builder(client).spawn();
//! let mut current = renewer.subscribe();
//! current.wait_for(Option::is_some).await?;
//! renewer.stop().await;
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod issued;
mod live;
pub mod proto;
mod renew;

pub use client::{
    CaClient, CaClientBuilder, DEFAULT_CLUSTER_ID, DEFAULT_TIMEOUT, DEFAULT_VALIDITY,
};
pub use error::CaError;
pub use issued::IssuedIdentity;
pub use live::Following;
pub use renew::{
    IdentityReceiver, Renewer, RenewerBuilder, DEFAULT_INITIAL_BACKOFF, DEFAULT_JITTER,
    DEFAULT_MAX_BACKOFF,
};
