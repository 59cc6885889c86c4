//! Why a certificate could not be obtained from the CA.

use std::io;
use std::time::{Duration, SystemTime};

use crate::identity::SpiffeId;
use crate::tls::TlsConfigError;
use crate::BoxError;

/// A failed [`CaClient::fetch`](super::CaClient::fetch) or an invalid client configuration.
///
/// [`is_refused_certificate`](CaError::is_refused_certificate) tells the errors where the CA
/// answered but its certificate was refused from those where it could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The client configuration is unusable (bad address, server name or header).
    #[error("invalid CA client configuration: {0}")]
    Config(String),
    /// The CA root could not be loaded (unreadable file, no certificate in it).
    #[error("cannot load the CA root")]
    Root(#[source] TlsConfigError),
    /// The service-account token file could not be read, or holds no usable token.
    #[error("cannot read the token file {path}")]
    Token {
        /// The token file.
        path: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// Key generation or CSR encoding failed (a broken crypto backend).
    #[error("cannot generate the key pair or the CSR")]
    Csr(#[source] rcgen::Error),
    /// The CA could not be reached: TCP connect, TLS handshake (e.g. its certificate does
    /// not chain to the root) or HTTP/2 failed.
    #[error("cannot connect to the CA at {addr}")]
    Connect {
        /// The CA address.
        addr: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The request did not finish within the configured timeout.
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    /// The CA answered with a gRPC error (e.g. `Unauthenticated` for a bad token).
    #[error("the CA refused the request: {code}: {message}")]
    Rpc {
        /// The gRPC status code's name, e.g. `Unauthenticated`.
        code: String,
        /// The status message.
        message: String,
    },
    /// The response held no certificate.
    #[error("the CA returned no certificate")]
    EmptyResponse,
    /// A returned certificate is not valid PEM/X.509.
    #[error("the CA returned an unparsable certificate: {0}")]
    BadCertificate(String),
    /// The returned certificate is not for the key this client generated.
    #[error("the CA returned a certificate for another key")]
    KeyMismatch,
    /// The returned certificate names another identity than the one requested.
    #[error("the CA returned a certificate for {got:?}, expected {expected}")]
    IdentityMismatch {
        /// The identity that was requested.
        expected: SpiffeId,
        /// The SPIFFE IDs in the returned certificate.
        got: Vec<SpiffeId>,
    },
    /// The returned chain does not lead to any of the roots (the CA's returned root and
    /// the configured ones), or the leaf is not valid for TLS client authentication.
    #[error("the CA returned a certificate that does not verify: {0}")]
    Untrusted(String),
    /// The returned certificate has already expired.
    #[error("the CA returned a certificate that expired at {not_after:?}")]
    Expired {
        /// Its `notAfter`.
        not_after: SystemTime,
    },
}

impl CaError {
    /// Whether the CA answered with a certificate that was refused (wrong key, identity,
    /// expired, unparsable or empty), as opposed to a CA that could not be reached or
    /// refused the request.
    pub fn is_refused_certificate(&self) -> bool {
        matches!(
            self,
            CaError::EmptyResponse
                | CaError::BadCertificate(_)
                | CaError::KeyMismatch
                | CaError::IdentityMismatch { .. }
                | CaError::Expired { .. }
                | CaError::Untrusted(_)
        )
    }
}
