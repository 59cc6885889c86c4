//! Error types for decoding and encoding PROXY protocol headers.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

/// Why a byte sequence was rejected as a PROXY protocol header.
///
/// Every variant is final: once [`decode`](super::decode) returns an error, no amount of
/// additional input can turn the same prefix into a valid header, so the caller should
/// close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyProtocolError {
    /// The input starts with neither the v1 `"PROXY "` prefix nor the v2 signature.
    #[error("not a PROXY protocol header: input matches neither the v1 \"PROXY \" prefix nor the v2 signature")]
    NotProxyProtocol,

    /// No CRLF within the first 107 bytes of a v1 header (spec section 2.1).
    #[error("PROXY v1 header is longer than 107 bytes (no CRLF found)")]
    V1TooLong,

    /// A v1 header is syntactically invalid; the message names the offending part.
    #[error("malformed PROXY v1 header: {0}")]
    V1Malformed(&'static str),

    /// The v2 version nibble (high 4 bits of byte 13) is not `2`.
    #[error("unsupported PROXY v2 version {0} (only version 2 is defined)")]
    BadVersion(u8),

    /// The v2 command nibble (low 4 bits of byte 13) is neither LOCAL (0) nor PROXY (1).
    #[error("invalid PROXY v2 command {0:#x} (expected LOCAL 0x0 or PROXY 0x1)")]
    BadCommand(u8),

    /// The v2 address family nibble (high 4 bits of byte 14) is not one of
    /// AF_UNSPEC, AF_INET, AF_INET6 or AF_UNIX.
    #[error("invalid PROXY v2 address family {0:#x} (expected 0x0..=0x3)")]
    BadFamily(u8),

    /// The v2 transport protocol nibble (low 4 bits of byte 14) is not one of
    /// UNSPEC, STREAM or DGRAM.
    #[error("invalid PROXY v2 transport protocol {0:#x} (expected 0x0..=0x2)")]
    BadTransport(u8),

    /// Family and transport are individually defined, but the spec does not define their
    /// combination (e.g. `0x10`, INET with UNSPEC transport) and requires receivers to reject it.
    #[error("undefined PROXY v2 family/transport combination {0:#04x}")]
    BadFamilyTransport(u8),

    /// The v2 `len` field is smaller than the address block its family requires.
    #[error("PROXY v2 length {len} is shorter than the {required}-byte address block of family {family:#x}")]
    AddressBlockTooShort {
        /// The address family nibble.
        family: u8,
        /// The `len` field of the header.
        len: u16,
        /// Bytes the family's address block occupies.
        required: u16,
    },

    /// The v2 `len` field exceeds [`Limits::max_v2_len`](super::Limits::max_v2_len).
    #[error("PROXY v2 header announces {len} bytes after the fixed header, more than the limit of {limit}")]
    TooLarge {
        /// The `len` field of the header.
        len: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A TLV (or the 3-byte TLV header itself) extends past the end announced by `len`.
    #[error("PROXY v2 TLV at offset {offset} runs past the end of the header")]
    TlvOverrun {
        /// Offset of the TLV's type byte from the start of the header.
        offset: usize,
    },

    /// A TLV defined by the spec has an invalid value.
    #[error("invalid PROXY v2 TLV {kind:#04x}: {reason}")]
    TlvMalformed {
        /// The TLV type.
        kind: u8,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The PP2_TYPE_CRC32C checksum does not match the header.
    #[error("PROXY v2 CRC32C mismatch: header carries {expected:#010x}, computed {actual:#010x}")]
    Crc32cMismatch {
        /// The checksum carried in the TLV.
        expected: u32,
        /// The checksum computed over the received header.
        actual: u32,
    },
}

/// Why a [`ProxyHeader`](super::ProxyHeader) cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The header uses something the v1 text format cannot express.
    #[error("cannot encode as PROXY v1: {0}")]
    V1Unsupported(&'static str),

    /// Source and destination are not both IPv4 or both IPv6.
    #[error("source and destination addresses belong to different address families")]
    MixedAddressFamilies,

    /// The spec forbids this family/transport combination on the wire (section 2.2).
    #[error("undefined PROXY v2 family/transport combination {0:#04x}")]
    BadFamilyTransport(u8),

    /// A TLV defined by the spec has a value receivers would reject.
    #[error("invalid PROXY v2 TLV {kind:#04x}: {reason}")]
    InvalidTlv {
        /// The TLV type.
        kind: u8,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An AF_UNIX path is longer than the 108 bytes of `sun_path`.
    #[error("UNIX socket path of {len} bytes exceeds the 108-byte sun_path")]
    UnixPathTooLong {
        /// Length of the offending path.
        len: usize,
    },

    /// Addresses and TLVs do not fit the 16-bit `len` field.
    #[error("PROXY v2 header payload of {len} bytes exceeds the 65535-byte maximum")]
    TooLarge {
        /// The payload length that was needed.
        len: usize,
    },
}
