//! TLS level: peek at the ClientHello, terminate, or originate (RFC 8446, RFC 6066 §3 SNI,
//! RFC 7301 ALPN), with SPIFFE peer identities for mutual TLS.
//!
//! * [`PeekLayer`] reads the ClientHello with our own bounded parser ([`client_hello`]),
//!   records [`Sni`], [`OfferedAlpn`] and the whole [`PeekedHello`], and replays every byte
//!   to the inner service: the TLS session stays end-to-end (passthrough).
//! * [`TerminateLayer`] runs the server handshake (certificate by SNI, ALPN, client
//!   certificates none/optional/required) and hands the inner service the plaintext, with
//!   [`Sni`], [`Alpn`], [`TlsInfo`], [`PeerCertificates`] and
//!   [`PeerIdentity`] metadata.
//! * [`TlsConnector`] wraps any connector with a client handshake: SNI from the target or
//!   none (as HBONE clients do), ALPN, client certificate, and **SAN pinning**: the server's
//!   URI SAN must be one of the expected SPIFFE IDs, whatever its DNS names say.
//! * [`demo`] (feature `demo-certs`) makes an in-memory CA for examples and tests.
//!
//! * [`LiveIdentity`] holds certificate, key, roots and CRLs that change while the proxy
//!   runs (set from code, or polled from files with [`IdentityFiles`]);
//!   [`TerminateLayer::live`] and [`TlsConnector::live`] use the current material for
//!   every new handshake, and a server closes open connections whose client certificate a
//!   new revocation list revokes.
//!
//! Built on rustls with the `ring` provider. Not here: session resumption (off, as in
//! ztunnel), OCSP stapling, CRLs for *server* certificates (client certificates can be
//! checked against CRLs: [`ServerConfigBuilder::crls`]), ECH, TLS 1.0/1.1.

pub mod client_hello;
mod connector;
#[cfg(feature = "demo-certs")]
#[cfg_attr(docsrs, doc(cfg(feature = "demo-certs")))]
pub mod demo;
mod error;
mod keys;
mod live;
mod peek;
mod server_config;
mod terminate;
mod verify;

use std::sync::Arc;

pub use connector::{ExpectedIdentities, SniMode, TlsConnector};
pub use error::{IdentityMismatch, TlsConfigError, TlsError};
pub use keys::{load_pem_certs, spiffe_ids, CertKey};
pub use live::{
    Credentials, FileWatch, IdentityError, IdentityFiles, IdentitySnapshot, LiveIdentity,
    LiveIdentityBuilder, MAX_FILE_LEN,
};
pub use peek::{PeekLayer, PeekService};
pub use server_config::{ClientAuth, LiveServerConfig, ServerConfigBuilder, UnknownSni};
pub use terminate::{TerminateLayer, TerminateService};
pub use verify::{PinnedServerVerifier, TrustDomainClientVerifier};

use crate::identity::PeerIdentity;
/// The rustls types that appear in this module's signatures, re-exported so that a user
/// needs no direct rustls dependency to call them (and cannot pick a mismatched version).
pub use rustls::{
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName},
    server::ResolvesServerCert,
    CipherSuite, ClientConfig, ProtocolVersion, RootCertStore, ServerConfig,
};

/// Metadata: the server name the client asked for (from the ClientHello).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sni(pub String);

/// Metadata: the application protocol negotiated by the handshake (e.g. `b"h2"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alpn(pub Vec<u8>);

/// Metadata: the application protocols a peeked ClientHello offered, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedAlpn(pub Vec<Vec<u8>>);

/// Metadata: the whole ClientHello seen by [`PeekLayer`].
#[derive(Debug, Clone)]
pub struct PeekedHello(pub Arc<client_hello::ClientHello>);

/// Metadata: the negotiated TLS version and cipher suite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TlsInfo {
    /// Protocol version, e.g. `TLSv1_3`.
    pub version: rustls::ProtocolVersion,
    /// Cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: rustls::CipherSuite,
}

/// Metadata: the peer's certificate chain (end entity first), when it presented one.
#[derive(Debug, Clone)]
pub struct PeerCertificates(pub Arc<[rustls::pki_types::CertificateDer<'static>]>);

/// The crypto provider every config in this module uses unless told otherwise.
pub fn default_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A provider limited to the AES-GCM TLS 1.3 suites Istio's ztunnel accepts
/// (`TLS13_AES_256_GCM_SHA384`, `TLS13_AES_128_GCM_SHA256`; no ChaCha20).
pub fn aes_gcm_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(p)
}

/// The socket under a TLS session: for socket options only (its bytes are ciphertext).
impl<I: crate::io::Io> crate::io::Io for tokio_rustls::server::TlsStream<I> {
    fn tcp_socket(&self) -> Option<&tokio::net::TcpStream> {
        self.get_ref().0.tcp_socket()
    }
}

/// The socket under a TLS session: for socket options only (its bytes are ciphertext).
impl<I: crate::io::Io> crate::io::Io for tokio_rustls::client::TlsStream<I> {
    fn tcp_socket(&self) -> Option<&tokio::net::TcpStream> {
        self.get_ref().0.tcp_socket()
    }
}

/// Records the facts of a finished handshake as metadata.
fn record_session(meta: &mut http::Extensions, state: &rustls::CommonState, sni: Option<&str>) {
    if let Some(sni) = sni {
        meta.insert(Sni(sni.to_owned()));
    }
    if let Some(alpn) = state.alpn_protocol() {
        meta.insert(Alpn(alpn.to_vec()));
    }
    if let (Some(version), Some(suite)) =
        (state.protocol_version(), state.negotiated_cipher_suite())
    {
        meta.insert(TlsInfo {
            version,
            cipher: suite.suite(),
        });
    }
    if let Some(chain) = state.peer_certificates() {
        if let Some(id) = chain.first().and_then(|c| spiffe_ids(c).into_iter().next()) {
            meta.insert(PeerIdentity(id));
        }
        meta.insert(PeerCertificates(chain.to_vec().into()));
    }
}
