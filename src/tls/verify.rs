//! Certificate verifiers for mesh identities.
//!
//! Both check the chain with webpki against the configured roots; on top of that:
//!
//! * [`PinnedServerVerifier`] (client side) ignores DNS names when identities are
//!   expected and requires the server certificate's one SPIFFE ID to equal an expected
//!   one (ztunnel's `upstream_sans`). Without expected identities it checks the server
//!   name like a browser would.
//! * [`TrustDomainClientVerifier`] (server side) additionally requires the client's SPIFFE
//!   ID to belong to one of the allowed trust domains (ztunnel's `TrustDomainVerifier`).
//!   It does not authorize a particular identity: that is policy, decided later with the
//!   [`PeerIdentity`](crate::identity::PeerIdentity) metadata.
//!
//! On both sides the certificate must carry exactly one SPIFFE ID, as an X.509-SVID does
//! (SPIFFE X509-SVID §2): with several, the one checked and the one recorded as the peer's
//! identity could differ.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use super::keys::{spiffe_ids, uri_sans};
use super::IdentityMismatch;
use crate::identity::SpiffeId;

/// Verifies a server chain against roots, then pins its identity (see module docs).
#[derive(Debug)]
pub struct PinnedServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl PinnedServerVerifier {
    /// A verifier accepting servers whose chain ends in `roots` and whose certificate
    /// carries one of `expected` (or, if `expected` is empty, the server name).
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: Vec<SpiffeId>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.expected.is_empty() {
            verify_server_name(&cert, server_name)?;
        } else if !matches!(spiffe_ids(end_entity).as_slice(), [id] if self.expected.contains(id)) {
            let mismatch = IdentityMismatch {
                expected: self.expected.clone(),
                presented: uri_sans(end_entity),
            };
            return Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(mismatch)),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Wraps a webpki client verifier with a trust-domain check (see module docs).
#[derive(Debug)]
pub struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domains: Vec<String>,
}

/// The client's certificate has no SPIFFE ID, several, or one outside the allowed trust
/// domains.
#[derive(Debug)]
struct WrongTrustDomain {
    allowed: Vec<String>,
    presented: Vec<String>,
}

impl std::fmt::Display for WrongTrustDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client certificate must carry exactly one SPIFFE ID, in trust domain [{}]; URI SANs presented: [{}]",
            self.allowed.join(", "),
            self.presented.join(", ")
        )
    }
}

impl std::error::Error for WrongTrustDomain {}

impl TrustDomainClientVerifier {
    /// Requires, after `inner` accepted the chain, exactly one SPIFFE ID, in one of
    /// `trust_domains`.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, trust_domains: Vec<String>) -> Self {
        Self {
            inner,
            trust_domains,
        }
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        // Exactly one: `PeerIdentity` records the first SPIFFE ID, so accepting a
        // certificate because a later one is in the domain would let the first one, from
        // any domain the roots sign for, stand as the peer's identity.
        let ok = match spiffe_ids(end_entity).as_slice() {
            [id] => self.trust_domains.iter().any(|td| td == id.trust_domain()),
            _ => false,
        };
        if !ok {
            let e = WrongTrustDomain {
                allowed: self.trust_domains.clone(),
                presented: uri_sans(end_entity),
            };
            return Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(e)),
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
