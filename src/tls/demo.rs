//! An in-memory certificate authority for examples and tests (feature `demo-certs`).
//!
//! Keys are ECDSA P-256, generated per process and never written anywhere. Do not use for
//! anything real: every process trusts only its own CA.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use rustls::RootCertStore;

use super::CertKey;
use crate::identity::SpiffeId;

/// A throwaway CA that issues server and SPIFFE workload certificates.
///
/// ```
/// use proxystack::tls::demo::DemoCa;
/// let ca = DemoCa::new("cluster.local");
/// let server = ca.server_cert(&["localhost", "127.0.0.1"]);
/// let workload = ca.workload_cert("default", "reviews");
/// assert_eq!(workload.spiffe_ids()[0].as_str(), "spiffe://cluster.local/ns/default/sa/reviews");
/// # let _ = server;
/// ```
pub struct DemoCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
}

impl std::fmt::Debug for DemoCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl DemoCa {
    /// A new CA for `trust_domain`.
    ///
    /// # Panics
    /// If key generation fails, which only a broken crypto backend does.
    #[allow(clippy::expect_used)]
    pub fn new(trust_domain: &str) -> Self {
        Self::try_new(trust_domain).expect("demo CA generation")
    }

    /// A new CA for `trust_domain`, reporting generation errors.
    pub fn try_new(trust_domain: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("proxystack demo CA ({trust_domain})"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            root_pem: root.pem(),
            root: root.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate.
    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// The CA certificate in PEM, for clients such as curl (`--cacert`).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A root store trusting only this CA.
    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        // A freshly generated, well-formed root cannot be rejected.
        let _ = roots.add(self.root.clone());
        Arc::new(roots)
    }

    /// A server certificate for DNS names and IP addresses (strings that parse as IPs).
    ///
    /// # Panics
    /// If a name is not a valid DNS name or IP address.
    #[allow(clippy::expect_used)]
    pub fn server_cert(&self, names: &[&str]) -> CertKey {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("valid server names");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params).expect("demo certificate")
    }

    /// A workload certificate with the Istio SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`,
    /// valid for both client and server authentication (as mesh certificates are).
    ///
    /// # Panics
    /// If namespace or service account are not valid SPIFFE path segments.
    #[allow(clippy::expect_used)]
    pub fn workload_cert(&self, namespace: &str, service_account: &str) -> CertKey {
        let id = SpiffeId::istio(&self.trust_domain, namespace, service_account)
            .expect("valid identity");
        self.spiffe_cert(&id).expect("demo certificate")
    }

    /// A certificate whose only SAN is `id`, for client and server authentication.
    pub fn spiffe_cert(&self, id: &SpiffeId) -> Result<CertKey, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params)
    }

    /// A certificate revocation list from this CA revoking `revoked` (certificates it
    /// issued), for [`ServerConfigBuilder::crls`](super::ServerConfigBuilder::crls).
    pub fn crl(
        &self,
        revoked: &[&CertKey],
    ) -> Result<CertificateRevocationListDer<'static>, rcgen::Error> {
        let mut revoked_certs = Vec::new();
        for cert in revoked {
            let der = cert
                .chain
                .first()
                .ok_or(rcgen::Error::CouldNotParseCertificate)?;
            let (_, parsed) = x509_parser::parse_x509_certificate(der)
                .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(parsed.raw_serial()),
                revocation_time: rcgen::date_time_ymd(2020, 1, 1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.der().clone())
    }

    /// Issues a certificate from arbitrary parameters (expired ones, odd SANs…) with a
    /// fresh key.
    pub fn issue(&self, mut params: CertificateParams) -> Result<CertKey, rcgen::Error> {
        if params.key_usages.is_empty() {
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertKey {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }
}
