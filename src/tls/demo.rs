//! An in-memory certificate authority for examples and tests (feature `demo-certs`).
//!
//! Keys are ECDSA P-256, generated per process and never written anywhere. Do not use for
//! anything real: every process trusts only its own CA.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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
        self.try_server_cert(names).expect("valid server names")
    }

    /// [`server_cert`](Self::server_cert), reporting invalid names as an error.
    pub fn try_server_cert(&self, names: &[&str]) -> Result<CertKey, rcgen::Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
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
    /// fresh key. A leaf left with rcgen's placeholder subject (`CN=rcgen self signed
    /// cert`) gets its first name as CN instead.
    pub fn issue(&self, mut params: CertificateParams) -> Result<CertKey, rcgen::Error> {
        if params.key_usages.is_empty() {
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        name_subject_after_first_san(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertKey {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// A certificate resolver for TLS servers that issues, on first use, a certificate for
    /// whatever name the client's SNI asks for (`fallback` when it sends none), and keeps
    /// it for the next handshakes (at most 1,024 names; past that, every new name gets a
    /// fresh certificate that is not kept). For demos and tests only: it answers any name.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use proxystack::tls::demo::DemoCa;
    /// use proxystack::tls::ServerConfig;
    /// let ca = Arc::new(DemoCa::new("example.org"));
    /// let config = ServerConfig::builder()
    ///     .with_no_client_auth()
    ///     .with_cert_resolver(ca.resolver("localhost"));
    /// // TerminateLayer::new(Arc::new(config))
    /// # let _ = config;
    /// ```
    pub fn resolver(self: &Arc<Self>, fallback: &str) -> Arc<dyn ResolvesServerCert> {
        Arc::new(AnyNameResolver {
            ca: self.clone(),
            fallback: fallback.to_owned(),
            issued: Mutex::new(HashMap::new()),
        })
    }
}

/// Replaces rcgen's placeholder subject with the certificate's first name (a DNS name, an
/// IP address or a URI such as a SPIFFE ID), as a person expects to read it.
fn name_subject_after_first_san(params: &mut CertificateParams) {
    let placeholder = matches!(
        params.distinguished_name.get(&DnType::CommonName),
        Some(DnValue::Utf8String(cn)) if cn == "rcgen self signed cert"
    );
    if !placeholder {
        return;
    }
    params.distinguished_name.remove(DnType::CommonName);
    let first = match params.subject_alt_names.first() {
        Some(SanType::DnsName(name)) => Some(name.as_str().to_owned()),
        Some(SanType::URI(uri)) => Some(uri.as_str().to_owned()),
        Some(SanType::IpAddress(ip)) => Some(ip.to_string()),
        _ => None,
    };
    // X.520 bounds a common name at 64 characters; a longer name stays in the SAN only.
    if let Some(name) = first.filter(|n| n.len() <= 64) {
        params.distinguished_name.push(DnType::CommonName, name);
    }
}

/// See [`DemoCa::resolver`].
struct AnyNameResolver {
    ca: Arc<DemoCa>,
    fallback: String,
    issued: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

/// Most names an [`AnyNameResolver`] keeps certificates for.
const MAX_ISSUED: usize = 1024;

impl AnyNameResolver {
    fn issue(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let cert = self.ca.try_server_cert(&[name]).ok()?;
        let provider = rustls::crypto::ring::default_provider();
        let key = provider.key_provider.load_private_key(cert.key).ok()?;
        Some(Arc::new(CertifiedKey::new(cert.chain, key)))
    }
}

impl ResolvesServerCert for AnyNameResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()
            .unwrap_or(&self.fallback)
            .to_ascii_lowercase();
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(key) = issued.get(&name) {
            return Some(key.clone());
        }
        let key = self.issue(&name)?;
        if issued.len() < MAX_ISSUED {
            issued.insert(name, key.clone());
        }
        Some(key)
    }
}

/// PEM text (RFC 7468) of a certificate and its key, for a peer in another process that
/// reads files: haproxy, nginx, curl, an example's `--config`. The inverse of
/// [`CertKey::from_pem_files`].
///
/// ```
/// use proxystack::tls::demo::DemoCa;
/// let ck = DemoCa::new("cluster.local").workload_cert("default", "client");
/// assert!(ck.chain_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
/// assert!(ck.key_pem().starts_with("-----BEGIN PRIVATE KEY-----\n"));
/// ```
impl CertKey {
    /// The chain as `CERTIFICATE` blocks, end entity first.
    pub fn chain_pem(&self) -> String {
        let blocks: Vec<pem::Pem> = self
            .chain
            .iter()
            .map(|c| pem::Pem::new("CERTIFICATE", c.as_ref()))
            .collect();
        pem::encode_many_config(&blocks, pem_config())
    }

    /// The private key as one block labelled by its encoding: `PRIVATE KEY` (PKCS #8),
    /// `RSA PRIVATE KEY` (PKCS #1) or `EC PRIVATE KEY` (SEC 1).
    pub fn key_pem(&self) -> String {
        let label = match &self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        pem::encode_config(&pem::Pem::new(label, self.key.secret_der()), pem_config())
    }
}

/// `\n` line ends (the crate's default is `\r\n`), as OpenSSL writes them.
fn pem_config() -> pem::EncodeConfig {
    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF)
}

impl std::fmt::Debug for AnyNameResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnyNameResolver")
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn common_name(cert: &CertKey) -> String {
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
        let cn = parsed.subject().iter_common_name().next().unwrap();
        cn.as_str().unwrap().to_owned()
    }

    #[test]
    fn pem_text_reads_back_as_the_same_certificate_and_key() {
        let ca = DemoCa::new("cluster.local");
        let dir = std::env::temp_dir().join(format!("proxystack-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for ck in [
            ca.workload_cert("default", "client"),
            ca.server_cert(&["localhost"]),
        ] {
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            std::fs::write(&cert, ck.chain_pem()).unwrap();
            std::fs::write(&key, ck.key_pem()).unwrap();
            let back =
                CertKey::from_pem_files(cert.to_str().unwrap(), key.to_str().unwrap()).unwrap();
            assert_eq!(back.chain, ck.chain);
            assert_eq!(back.key.secret_der(), ck.key.secret_der());
            assert!(!ck.chain_pem().contains('\r'));
            assert!(ck.chain_pem().lines().all(|l| l.len() <= 64));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leaves_are_named_after_their_first_name() {
        let ca = DemoCa::new("cluster.local");
        assert_eq!(
            common_name(&ca.server_cert(&["app.example.com", "x"])),
            "app.example.com"
        );
        assert_eq!(common_name(&ca.server_cert(&["127.0.0.1"])), "127.0.0.1");
        assert_eq!(
            common_name(&ca.workload_cert("default", "reviews")),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );
    }

    /// A real TLS handshake over loopback for a name nobody configured, then one without
    /// SNI (the fallback name), both verified against the CA.
    #[tokio::test]
    async fn resolver_issues_a_certificate_for_any_sni() {
        let ca = Arc::new(DemoCa::new("example.org"));
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(ca.resolver("fallback.test"));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = acceptor.accept(tcp).await.unwrap();
                tls.write_all(b"hi").await.unwrap();
                tls.shutdown().await.unwrap();
            }
        });
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(ca.roots())
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        for name in ["anything.example.net", "fallback.test"] {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
            let send_sni = name != "fallback.test";
            let mut tls = if send_sni {
                connector.connect(server_name, tcp).await.unwrap()
            } else {
                // No SNI on the wire; the certificate must still be valid for the fallback.
                let mut config = rustls::ClientConfig::builder()
                    .with_root_certificates(ca.roots())
                    .with_no_client_auth();
                config.enable_sni = false;
                tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(server_name, tcp)
                    .await
                    .unwrap()
            };
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hi", "{name}");
        }
    }
}
