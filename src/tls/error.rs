//! TLS errors: what went wrong and what to check.

use std::fmt;
use std::io;
use std::time::Duration;

use super::client_hello::ClientHelloError;
use crate::identity::SpiffeId;
use crate::BoxError;

/// A TLS connection that could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The handshake failed; the source says why (certificate, protocol, alert).
    #[error("TLS handshake failed")]
    Handshake(#[source] io::Error),
    /// The handshake did not finish in time.
    #[error("TLS handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    /// The connection under the TLS session could not be made.
    #[error("connecting under TLS failed")]
    Connect(#[source] BoxError),
    /// The ClientHello could not be read.
    #[error("could not read a TLS ClientHello")]
    ClientHello(#[source] ClientHelloError),
    /// No ClientHello arrived in time.
    #[error("no TLS ClientHello within {0:?}")]
    PeekTimeout(Duration),
    /// The inner service failed.
    #[error("service behind TLS failed")]
    Inner(#[source] BoxError),
}

impl TlsError {
    /// Whether another attempt could succeed (timeouts and connect failures; not
    /// certificate or protocol errors, which will fail the same way again).
    pub fn is_retryable(&self) -> bool {
        matches!(self, TlsError::HandshakeTimeout(_) | TlsError::Connect(_))
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// Reading a PEM file failed.
    #[error("cannot read {path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A certificate chain was empty.
    #[error("no certificate in the chain for {0}")]
    EmptyChain(String),
    /// rustls rejected the configuration (bad key, key/cert mismatch, versions…).
    #[error("invalid TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (e.g. no roots).
    #[error("invalid client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The server's certificate did not carry any expected identity (SAN pinning).
#[derive(Debug, Clone)]
pub struct IdentityMismatch {
    /// The identities we would accept.
    pub expected: Vec<SpiffeId>,
    /// The URI SANs the server presented.
    pub presented: Vec<String>,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expected: Vec<&str> = self.expected.iter().map(SpiffeId::as_str).collect();
        write!(
            f,
            "server certificate identity mismatch: expected one of [{}], presented [{}]",
            expected.join(", "),
            self.presented.join(", ")
        )
    }
}

impl std::error::Error for IdentityMismatch {}
