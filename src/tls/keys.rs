//! Certificates and keys: PEM loading and SPIFFE URI SAN extraction.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsConfigError;
use crate::identity::SpiffeId;

/// A certificate chain (end entity first) and its private key.
#[derive(Debug)]
pub struct CertKey {
    /// The chain, end entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for CertKey {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl CertKey {
    /// Loads a chain and a key from PEM files.
    pub fn from_pem_files(cert_path: &str, key_path: &str) -> Result<Self, TlsConfigError> {
        let pem_err = |path: &str, e: &dyn std::fmt::Display| TlsConfigError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let chain = CertificateDer::pem_file_iter(cert_path)
            .map_err(|e| pem_err(cert_path, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert_path, &e))?;
        if chain.is_empty() {
            return Err(TlsConfigError::EmptyChain(cert_path.to_owned()));
        }
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| pem_err(key_path, &e))?;
        Ok(Self { chain, key })
    }

    /// The SPIFFE IDs of the end-entity certificate.
    pub fn spiffe_ids(&self) -> Vec<SpiffeId> {
        self.chain.first().map(spiffe_ids).unwrap_or_default()
    }

    /// When the end-entity certificate expires (`notAfter`); `None` if it does not parse.
    /// For expiry metrics, and to refuse an expired certificate before serving it.
    ///
    /// ```
    /// # #[cfg(feature = "demo-certs")] {
    /// let ca = proxystack::tls::demo::DemoCa::new("example.org");
    /// let cert = ca.server_cert(&["localhost"]);
    /// assert!(cert.not_after().is_some_and(|t| t > std::time::SystemTime::now()));
    /// # }
    /// ```
    pub fn not_after(&self) -> Option<std::time::SystemTime> {
        let (_, parsed) = x509_parser::parse_x509_certificate(self.chain.first()?.as_ref()).ok()?;
        let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
    }
}

/// Loads every certificate of a PEM file (e.g. trust roots).
pub fn load_pem_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsConfigError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// The valid SPIFFE IDs among a certificate's URI SANs, in certificate order. Malformed
/// certificates and non-SPIFFE URIs yield nothing.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Vec<SpiffeId> {
    uri_sans(cert)
        .iter()
        .filter_map(|u| SpiffeId::parse(u).ok())
        .collect()
}

/// All URI SANs of a certificate.
pub(crate) fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}
