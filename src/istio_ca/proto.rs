//! The wire messages of `istio.v1.auth.IstioCertificateService` (Istio's
//! `security/v1alpha1/ca.proto`), written by hand with `prost`'s derive so that building
//! the crate needs no `protoc`.
//!
//! Only the fields the client uses are declared; protobuf skips unknown fields, so a CA
//! that sends more still decodes. Public so that a test or a fake CA can speak the same
//! protocol.

/// The full gRPC path of `CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// `istio.v1.auth.IstioCertificateRequest`. Field 4 (`metadata`, a `google.protobuf.Struct`
/// used for impersonation by node agents) is not sent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// The PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// The requested lifetime in seconds (the CA may shorten it).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates: the workload certificate first, then intermediates, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}
