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
    /// The server's certificate is valid but names someone else (SAN pinning).
    #[error(transparent)]
    IdentityMismatch(IdentityMismatch),
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
    /// The peer's certificate stopped verifying after the identity's roots or revocation
    /// lists changed (e.g. it was revoked); the connection was closed.
    #[error("peer certificate no longer valid")]
    PeerNoLongerValid(#[source] rustls::Error),
    /// The inner service failed.
    #[error("service behind TLS failed")]
    Inner(#[source] BoxError),
}

impl TlsError {
    /// A client handshake error, with an identity mismatch lifted out of rustls's
    /// `CertificateError::Other` (which prints it with `Debug`) so that it reads well.
    pub(crate) fn from_client_handshake(e: io::Error) -> Self {
        let mismatch = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .and_then(|tls| match tls {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                    other.0.downcast_ref::<IdentityMismatch>()
                }
                _ => None,
            });
        match mismatch {
            Some(m) => TlsError::IdentityMismatch(m.clone()),
            None => TlsError::Handshake(e),
        }
    }

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
///
/// Prints as `server identity mismatch: expected spiffe://…, presented spiffe://…`, with
/// `Debug` too (rustls shows the error it carries with `Debug`).
#[derive(Clone)]
pub struct IdentityMismatch {
    /// The identities we would accept.
    pub expected: Vec<SpiffeId>,
    /// The URI SANs the server presented.
    pub presented: Vec<String>,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expected: Vec<&str> = self.expected.iter().map(SpiffeId::as_str).collect();
        f.write_str("server identity mismatch: expected ")?;
        if expected.len() > 1 {
            f.write_str("one of ")?;
        }
        f.write_str(&expected.join(" or "))?;
        if self.presented.is_empty() {
            f.write_str(", presented no URI SAN")
        } else {
            write!(f, ", presented {}", self.presented.join(" and "))
        }
    }
}

impl fmt::Debug for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for IdentityMismatch {}
