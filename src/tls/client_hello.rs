//! A bounded, incremental parser for the TLS ClientHello.
//!
//! A proxy that routes on SNI or ALPN must read the client's first flight
//! before it can choose a backend, and must do so without trusting the peer.
//! [`ClientHelloParser`] is fed bytes exactly as they come off the socket, in
//! any chunking, and answers [`Status::Done`] as soon as a complete ClientHello
//! has been seen, or an error as soon as the input can no longer be one.
//! [`parse`] is the same thing over a buffer that is already in memory.
//!
//! # What is parsed
//!
//! - The record layer (RFC 8446 §5.1): plaintext `handshake` records. The
//!   ClientHello is reassembled across as many records as the client chose to
//!   split it into; a hello with a large post-quantum key share or a padding
//!   extension easily exceeds one 16 KiB record.
//! - The ClientHello message (RFC 8446 §4.1.2, which keeps the RFC 5246
//!   §7.4.1.2 wire format): `legacy_version`, `random`, `legacy_session_id`,
//!   `cipher_suites`, `legacy_compression_methods` and the extension block
//!   (RFC 8446 §4.2). Every length prefix is checked against its container and
//!   the message must be consumed exactly.
//! - The contents of three extensions: `server_name` (RFC 6066 §3),
//!   `application_layer_protocol_negotiation` (RFC 7301 §3.1) and
//!   `supported_versions` (RFC 8446 §4.2.1). Any other extension is only
//!   framed, checked for duplicates and recorded by type.
//!
//! # Bounds
//!
//! The parser never holds more than the handshake message itself, and refuses
//! with [`ClientHelloError::TooLarge`] once the raw input that the hello
//! occupies (record headers included) would exceed the limit, or as soon as the
//! handshake header announces a message that cannot fit. Each input byte is
//! looked at a bounded number of times, however the input is chunked, so
//! feeding one byte at a time costs the same as feeding the whole hello. The
//! verdict does not depend on the chunking either: errors are raised at the
//! byte that makes them certain.
//!
//! # What it deliberately does not do
//!
//! - SSLv2-compatible hellos (RFC 5246 appendix E.2) are rejected as
//!   [`ClientHelloError::NotTls`] with `sslv2: true`, not parsed; no client
//!   that can speak TLS 1.2 or later needs them.
//! - Encrypted Client Hello is not decrypted: what is parsed is the outer hello,
//!   whose SNI is the public name. The `encrypted_client_hello` extension is
//!   just a type in [`ClientHello::extensions`].
//! - No checks that belong to the TLS server that will terminate the
//!   connection, such as whether the offered versions, suites or groups are
//!   known, or whether a TLS 1.3 hello has exactly the `null` compression
//!   method. GREASE values (RFC 8701) are returned as they were sent.
//! - No normalisation of the server name (see [`ClientHello::sni`]).
//! - The parser copies only the handshake payload it needs. A proxy that peeks
//!   must keep the raw bytes itself to replay them to the backend;
//!   [`ClientHello::len`] says how many of them the hello occupied.

#![deny(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::HashSet;
use std::fmt;

/// The default bound on the raw bytes, record headers included, that a
/// ClientHello may occupy.
///
/// Real hellos are a few hundred bytes, or a few KiB with a post-quantum key
/// share; 64 KiB leaves room for growth while keeping a misbehaving peer
/// cheap.
pub const DEFAULT_MAX_HELLO_LEN: usize = 64 * 1024;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// A plaintext record may carry at most 2^14 bytes (RFC 8446 §5.1); the slack
/// is the ciphertext allowance of §5.2, tolerated so that a sloppy but
/// harmless client is not the reason a connection fails.
const MAX_RECORD_PAYLOAD: usize = 16384 + 2048;
/// SSL 3.0 up to the TLS 1.3 value. TLS 1.3 froze the record version at
/// 0x0301/0x0303 (RFC 8446 §5.1), so a later protocol will not raise it.
const RECORD_VERSIONS: std::ops::RangeInclusive<u16> = 0x0300..=0x0304;
const MAX_SESSION_ID_LEN: usize = 32;
const RANDOM_LEN: usize = 32;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// The DNS limit on a name in wire form (RFC 1035 §2.3.4); a presentation
/// form is never longer, so nothing legitimate is refused.
const MAX_HOST_NAME_LEN: usize = 255;
const TLS13: u16 = 0x0304;

/// The parts of a ClientHello that a proxy routes and filters on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// `legacy_version` from the handshake message, e.g. `0x0303`. TLS 1.3
    /// clients send `0x0303` here and their real versions in
    /// [`supported_versions`](Self::supported_versions).
    pub legacy_version: u16,
    /// `legacy_record_version` from the first record header, usually `0x0301`.
    /// Later records of the same hello may carry another value; RFC 8446 §5.1
    /// has receivers ignore it, so only its range is checked.
    pub record_version: u16,
    /// The versions listed in `supported_versions`, in order, GREASE values
    /// included; empty when the extension is absent.
    pub supported_versions: Vec<u16>,
    /// The offered cipher suites, in order, GREASE values included.
    pub cipher_suites: Vec<u16>,
    /// The `host_name` entry of `server_name`, if the client sent one.
    ///
    /// The rule is deliberately lenient about what a name looks like and
    /// strict about what could hurt whoever handles it next: 1 to 255 bytes,
    /// each printable ASCII (`0x21..=0x7e`). NUL, CR, LF, space, DEL and any
    /// non-ASCII byte (an IDN must be sent as A-labels) make the extension
    /// malformed. The name is not otherwise validated as DNS syntax and is
    /// returned exactly as sent: not lowercased, a trailing dot kept.
    ///
    /// IP literals are forbidden by RFC 6066 §3 but sent by some clients; they
    /// are accepted as strings. A router that must not match them can test
    /// `sni.parse::<std::net::IpAddr>()`.
    pub sni: Option<String>,
    /// The protocol names of the ALPN extension, in the client's order; empty
    /// when the extension is absent.
    pub alpn: Vec<Vec<u8>>,
    /// Every extension type in the order the client sent them, GREASE values
    /// and unknown types included.
    pub extensions: Vec<u16>,
    /// The number of raw input bytes, record headers included, that the hello
    /// occupied. Input after it belongs to whatever follows and is not counted.
    pub len: usize,
}

impl ClientHello {
    /// Whether the client offers TLS 1.3, i.e. lists `0x0304` in
    /// `supported_versions`. `legacy_version` cannot say so (RFC 8446 §4.1.2).
    pub fn offers_tls13(&self) -> bool {
        self.supported_versions.contains(&TLS13)
    }

    /// Whether `proto` is one of the ALPN protocol names offered.
    pub fn has_alpn(&self, proto: &[u8]) -> bool {
        self.alpn.iter().any(|p| p.as_slice() == proto)
    }
}

/// Why the input is not, or cannot become, an acceptable ClientHello.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientHelloError {
    /// The stream does not start with a TLS handshake record, or it ended
    /// before its first byte.
    #[error("not a TLS handshake{}", if *.sslv2 { " (SSLv2-style hello)" } else { "" })]
    NotTls {
        /// The first byte had its high bit set, as in an SSLv2 record header
        /// (RFC 5246 appendix E.2), rather than being some other protocol.
        sslv2: bool,
    },
    /// A record header carries a version outside `0x0300..=0x0304`.
    #[error("unsupported TLS record version {0:#06x}")]
    UnsupportedRecordVersion(u16),
    /// The hello occupies, or announces, more raw bytes than the limit.
    #[error("ClientHello exceeds the {limit}-byte limit")]
    TooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The input ended before the hello was complete.
    #[error("input ended before the ClientHello was complete")]
    Truncated,
    /// The first handshake message is not a ClientHello; carries its type.
    #[error("handshake message of type {0} where a ClientHello was expected")]
    NotClientHello(u8),
    /// The record framing or the ClientHello message is malformed.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The contents of an extension that the parser interprets are malformed.
    #[error("malformed extension {ext_type:#06x}: {reason}")]
    MalformedExtension {
        /// The extension type.
        ext_type: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An extension type appears twice, which RFC 8446 §4.2 forbids. GREASE
    /// types are types like any other.
    #[error("duplicate extension {0:#06x}")]
    DuplicateExtension(u16),
    /// A record of another content type arrived before the hello was complete;
    /// carries that content type. Handshake messages may not be interleaved
    /// with other records (RFC 8446 §5.1).
    #[error("record of content type {0} interleaved with the ClientHello")]
    InterleavedRecord(u8),
}

/// What [`ClientHelloParser::push`] made of the input so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The hello is not complete yet; push more bytes, or call
    /// [`ClientHelloParser::finish`] at EOF.
    NeedMore,
    /// The hello is complete.
    Done(ClientHello),
}

/// An incremental ClientHello parser that keeps its state between pushes.
///
/// Once it has answered [`Status::Done`] or an error, it keeps giving the same
/// answer and ignores further input.
#[derive(Clone)]
pub struct ClientHelloParser {
    limit: usize,
    consumed: usize,
    /// Position within the current record header; meaningful while
    /// `record_left` is zero.
    header_pos: u8,
    /// The first byte of the two-byte header field being read.
    header_hi: u8,
    /// Payload bytes still to come in the current record.
    record_left: usize,
    /// Set by the first record header; also tells later headers that they
    /// continue a hello rather than start a stream.
    record_version: Option<u16>,
    /// The handshake message, header included, as reassembled so far.
    handshake: Vec<u8>,
    /// Total length of the handshake message, once its header has been read.
    handshake_len: Option<usize>,
    outcome: Option<Result<ClientHello, ClientHelloError>>,
}

impl ClientHelloParser {
    /// A parser bounded by [`DEFAULT_MAX_HELLO_LEN`].
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_MAX_HELLO_LEN)
    }

    /// A parser that refuses a hello occupying more than `max_len` raw bytes,
    /// record headers included.
    pub fn with_limit(max_len: usize) -> Self {
        Self {
            limit: max_len,
            consumed: 0,
            header_pos: 0,
            header_hi: 0,
            record_left: 0,
            record_version: None,
            handshake: Vec::new(),
            handshake_len: None,
            outcome: None,
        }
    }

    /// Feed the next bytes exactly as read from the socket, in any chunking,
    /// one byte at a time included.
    ///
    /// Bytes after the end of the hello are ignored; [`ClientHello::len`] (or
    /// [`consumed`](Self::consumed)) says where it ended.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Status, ClientHelloError> {
        if let Some(outcome) = &self.outcome {
            return outcome.clone().map(Status::Done);
        }
        let outcome = match self.advance(bytes) {
            Ok(None) => return Ok(Status::NeedMore),
            Ok(Some(hello)) => Ok(hello),
            Err(err) => Err(err),
        };
        self.handshake = Vec::new();
        self.outcome = Some(outcome.clone());
        outcome.map(Status::Done)
    }

    /// The error to report when the input ends (EOF) while
    /// [`push`](Self::push) still wants more: [`ClientHelloError::NotTls`] if
    /// not a single byte was fed, [`ClientHelloError::Truncated`] otherwise.
    ///
    /// If the parser has already failed, this is that error. After
    /// [`Status::Done`] there is nothing to report and the answer is
    /// `Truncated`, which callers should not be asking for.
    pub fn finish(&self) -> ClientHelloError {
        match &self.outcome {
            Some(Err(err)) => err.clone(),
            _ if self.consumed == 0 => ClientHelloError::NotTls { sslv2: false },
            _ => ClientHelloError::Truncated,
        }
    }

    /// How many input bytes the parser has taken as part of the hello so far;
    /// after [`Status::Done`], the hello's [`len`](ClientHello::len). After an
    /// error it counts the bytes up to and including the one that was refused,
    /// except for [`TooLarge`](ClientHelloError::TooLarge), where it stops at
    /// the limit.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    fn advance(&mut self, mut input: &[u8]) -> Result<Option<ClientHello>, ClientHelloError> {
        while !input.is_empty() {
            // Checked before every byte taken, so that the byte crossing the
            // limit is the same whatever the chunking.
            let budget = self.limit.saturating_sub(self.consumed);
            if budget == 0 {
                return Err(ClientHelloError::TooLarge { limit: self.limit });
            }
            if self.record_left == 0 {
                // Headers go byte by byte: five bytes per record is cheap, and
                // it lets each field be judged as soon as it is known.
                let Some((&byte, rest)) = input.split_first() else {
                    break;
                };
                input = rest;
                self.consumed = self.consumed.saturating_add(1);
                self.record_header_byte(byte)?;
                continue;
            }
            let take = input
                .len()
                .min(self.record_left)
                .min(budget)
                .min(self.handshake_wanted());
            let Some((chunk, rest)) = input.split_at_checked(take) else {
                break;
            };
            input = rest;
            self.consumed = self.consumed.saturating_add(take);
            self.record_left = self.record_left.saturating_sub(take);
            self.handshake.extend_from_slice(chunk);
            if let Some(hello) = self.handshake_progress()? {
                return Ok(Some(hello));
            }
        }
        Ok(None)
    }

    fn record_header_byte(&mut self, byte: u8) -> Result<(), ClientHelloError> {
        match self.header_pos {
            0 if self.record_version.is_none() => {
                if byte & 0x80 != 0 {
                    return Err(ClientHelloError::NotTls { sslv2: true });
                }
                if byte != CONTENT_TYPE_HANDSHAKE {
                    return Err(ClientHelloError::NotTls { sslv2: false });
                }
            }
            0 => {
                if byte != CONTENT_TYPE_HANDSHAKE {
                    return Err(ClientHelloError::InterleavedRecord(byte));
                }
            }
            1 | 3 => self.header_hi = byte,
            2 => {
                let version = u16::from_be_bytes([self.header_hi, byte]);
                if !RECORD_VERSIONS.contains(&version) {
                    return Err(ClientHelloError::UnsupportedRecordVersion(version));
                }
                self.record_version.get_or_insert(version);
            }
            _ => {
                let len = usize::from(u16::from_be_bytes([self.header_hi, byte]));
                if len == 0 {
                    // RFC 8446 §5.1 forbids them, and accepting them would let a
                    // peer stretch the hello over headers alone.
                    return Err(ClientHelloError::Malformed("zero-length handshake record"));
                }
                if len > MAX_RECORD_PAYLOAD {
                    return Err(ClientHelloError::Malformed(
                        "record longer than 2^14 + 2048",
                    ));
                }
                self.record_left = len;
                self.header_pos = 0;
                return Ok(());
            }
        }
        self.header_pos = self.header_pos.saturating_add(1);
        Ok(())
    }

    /// How many more handshake bytes to take before there is something to
    /// check. The type byte is taken on its own so that a stream of some other
    /// handshake message is refused at its first byte. Never zero while the
    /// message is incomplete, which is what keeps `advance` moving.
    fn handshake_wanted(&self) -> usize {
        match self.handshake_len {
            None if self.handshake.is_empty() => 1,
            None => HANDSHAKE_HEADER_LEN.saturating_sub(self.handshake.len()),
            Some(total) => total.saturating_sub(self.handshake.len()),
        }
    }

    fn handshake_progress(&mut self) -> Result<Option<ClientHello>, ClientHelloError> {
        if self.handshake_len.is_none() {
            match *self.handshake.as_slice() {
                [msg_type] if msg_type != HANDSHAKE_TYPE_CLIENT_HELLO => {
                    return Err(ClientHelloError::NotClientHello(msg_type));
                }
                [_, a, b, c] => {
                    let body_len = u32::from_be_bytes([0, a, b, c]);
                    let total = usize::try_from(body_len)
                        .unwrap_or(usize::MAX)
                        .saturating_add(HANDSHAKE_HEADER_LEN);
                    // At least one record header is unavoidable, so a message
                    // this long can never fit: say so now rather than after
                    // buffering up to the limit.
                    if total.saturating_add(RECORD_HEADER_LEN) > self.limit {
                        return Err(ClientHelloError::TooLarge { limit: self.limit });
                    }
                    self.handshake_len = Some(total);
                    // Bounded by the limit just checked; the cap avoids a large
                    // allocation on the word of a peer that may never send it.
                    self.handshake.reserve(
                        total
                            .min(MAX_RECORD_PAYLOAD)
                            .saturating_sub(HANDSHAKE_HEADER_LEN),
                    );
                }
                _ => return Ok(None),
            }
        }
        if self.handshake_len != Some(self.handshake.len()) {
            return Ok(None);
        }
        let body = self
            .handshake
            .get(HANDSHAKE_HEADER_LEN..)
            .unwrap_or_default();
        let mut hello = parse_body(body)?;
        if self.record_left != 0 {
            // The client has nothing else to send in this flight, and a proxy
            // that replays `len` bytes must not cut a record in two.
            return Err(ClientHelloError::Malformed(
                "data after the ClientHello in the same record",
            ));
        }
        hello.record_version = self.record_version.unwrap_or_default();
        hello.len = self.consumed;
        Ok(Some(hello))
    }
}

impl Default for ClientHelloParser {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ClientHelloParser {
    // The buffered handshake bytes are not worth printing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHelloParser")
            .field("limit", &self.limit)
            .field("consumed", &self.consumed)
            .field("buffered", &self.handshake.len())
            .field("handshake_len", &self.handshake_len)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

/// Parse a ClientHello from a buffer that starts at the beginning of the
/// stream: `Ok(None)` if the buffer ends before the hello does.
///
/// Equivalent to one [`ClientHelloParser::push`] of the whole buffer into a
/// parser bounded by [`DEFAULT_MAX_HELLO_LEN`].
pub fn parse(buf: &[u8]) -> Result<Option<ClientHello>, ClientHelloError> {
    match ClientHelloParser::new().push(buf)? {
        Status::NeedMore => Ok(None),
        Status::Done(hello) => Ok(Some(hello)),
    }
}

/// A cursor over untrusted bytes where every read is checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        let (&byte, tail) = self.rest.split_first()?;
        self.rest = tail;
        Some(byte)
    }

    fn u16(&mut self) -> Option<u16> {
        let (head, tail) = self.rest.split_first_chunk::<2>()?;
        self.rest = tail;
        Some(u16::from_be_bytes(*head))
    }

    /// An `opaque<..2^8-1>` vector.
    fn vec_u8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// An `opaque<..2^16-1>` vector.
    fn vec_u16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

fn malformed(reason: &'static str) -> ClientHelloError {
    ClientHelloError::Malformed(reason)
}

/// Parse the ClientHello body, leaving `record_version` and `len` for the
/// caller, which knows the framing.
fn parse_body(body: &[u8]) -> Result<ClientHello, ClientHelloError> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16().ok_or(malformed("truncated legacy_version"))?;
    r.take(RANDOM_LEN).ok_or(malformed("truncated random"))?;
    let session_id = r.vec_u8().ok_or(malformed("truncated legacy_session_id"))?;
    if session_id.len() > MAX_SESSION_ID_LEN {
        return Err(malformed("legacy_session_id longer than 32 bytes"));
    }
    let suites = r.vec_u16().ok_or(malformed("truncated cipher_suites"))?;
    if suites.is_empty() || suites.len() & 1 != 0 {
        return Err(malformed("cipher_suites length is zero or odd"));
    }
    let mut cipher_suites = Vec::with_capacity(suites.len() / 2);
    let mut suites = Reader::new(suites);
    while let Some(suite) = suites.u16() {
        cipher_suites.push(suite);
    }
    let compression = r
        .vec_u8()
        .ok_or(malformed("truncated legacy_compression_methods"))?;
    if compression.is_empty() {
        return Err(malformed("no compression methods"));
    }

    let mut hello = ClientHello {
        legacy_version,
        record_version: 0,
        supported_versions: Vec::new(),
        cipher_suites,
        sni: None,
        alpn: Vec::new(),
        extensions: Vec::new(),
        len: 0,
    };
    // RFC 5246 §7.4.1.2: a hello without extensions simply ends here.
    if r.is_empty() {
        return Ok(hello);
    }
    let block = r
        .vec_u16()
        .ok_or(malformed("extensions block overruns the handshake message"))?;
    if !r.is_empty() {
        return Err(malformed("trailing bytes after the extensions block"));
    }
    parse_extensions(block, &mut hello)?;
    Ok(hello)
}

fn parse_extensions(block: &[u8], hello: &mut ClientHello) -> Result<(), ClientHelloError> {
    let mut block = Reader::new(block);
    let mut seen = HashSet::new();
    while !block.is_empty() {
        let ext_type = block.u16().ok_or(malformed("truncated extension header"))?;
        let data = block
            .vec_u16()
            .ok_or(malformed("extension overruns the extensions block"))?;
        if !seen.insert(ext_type) {
            return Err(ClientHelloError::DuplicateExtension(ext_type));
        }
        // RFC 8446 §4.2.11: the binders cover everything before them, so
        // nothing may follow pre_shared_key.
        if hello.extensions.last() == Some(&EXT_PRE_SHARED_KEY) {
            return Err(ClientHelloError::MalformedExtension {
                ext_type: EXT_PRE_SHARED_KEY,
                reason: "pre_shared_key is not the last extension",
            });
        }
        hello.extensions.push(ext_type);
        match ext_type {
            EXT_SERVER_NAME => hello.sni = parse_server_name(data)?,
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            EXT_SUPPORTED_VERSIONS => hello.supported_versions = parse_supported_versions(data)?,
            _ => {}
        }
    }
    Ok(())
}

/// RFC 6066 §3.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, ClientHelloError> {
    let bad = |reason| ClientHelloError::MalformedExtension {
        ext_type: EXT_SERVER_NAME,
        reason,
    };
    let mut data = Reader::new(data);
    let list = data.vec_u16().ok_or(bad("truncated server_name_list"))?;
    if !data.is_empty() {
        return Err(bad("trailing bytes after server_name_list"));
    }
    if list.is_empty() {
        return Err(bad("empty server_name_list"));
    }
    let mut list = Reader::new(list);
    let mut host_name = None;
    while !list.is_empty() {
        let name_type = list.u8().ok_or(bad("truncated name_type"))?;
        // Only host_name was ever defined, but every registered and proposed
        // type shares its opaque<1..2^16-1> framing, so others can be skipped.
        let name = list.vec_u16().ok_or(bad("truncated server name"))?;
        if name.is_empty() {
            return Err(bad("empty server name"));
        }
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host_name.is_some() {
            return Err(bad("more than one host_name"));
        }
        if name.len() > MAX_HOST_NAME_LEN {
            return Err(bad("host_name longer than 255 bytes"));
        }
        if !name.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(bad("host_name has a byte outside printable ASCII"));
        }
        let name = std::str::from_utf8(name).map_err(|_| bad("host_name is not ASCII"))?;
        host_name = Some(name.to_owned());
    }
    Ok(host_name)
}

/// RFC 7301 §3.1.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, ClientHelloError> {
    let bad = |reason| ClientHelloError::MalformedExtension {
        ext_type: EXT_ALPN,
        reason,
    };
    let mut data = Reader::new(data);
    let list = data.vec_u16().ok_or(bad("truncated protocol_name_list"))?;
    if !data.is_empty() {
        return Err(bad("trailing bytes after protocol_name_list"));
    }
    if list.is_empty() {
        return Err(bad("empty protocol_name_list"));
    }
    let mut list = Reader::new(list);
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.vec_u8().ok_or(bad("truncated protocol name"))?;
        if name.is_empty() {
            return Err(bad("empty protocol name"));
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// RFC 8446 §4.2.1, ClientHello form.
fn parse_supported_versions(data: &[u8]) -> Result<Vec<u16>, ClientHelloError> {
    let bad = |reason| ClientHelloError::MalformedExtension {
        ext_type: EXT_SUPPORTED_VERSIONS,
        reason,
    };
    let mut data = Reader::new(data);
    let list = data.vec_u8().ok_or(bad("truncated versions list"))?;
    if !data.is_empty() {
        return Err(bad("trailing bytes after versions list"));
    }
    if list.is_empty() || list.len() & 1 != 0 {
        return Err(bad("versions list length is zero or odd"));
    }
    let mut versions = Vec::with_capacity(list.len() / 2);
    let mut list = Reader::new(list);
    while let Some(version) = list.u16() {
        versions.push(version);
    }
    Ok(versions)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    const GREASE: u16 = 0x2a2a;

    /// A ClientHello body built field by field, so each test can break
    /// exactly one thing.
    #[derive(Clone)]
    struct Hello {
        legacy_version: u16,
        session_id: Vec<u8>,
        suites: Vec<u8>,
        compression: Vec<u8>,
        /// `None`: no extensions block at all.
        extensions: Option<Vec<(u16, Vec<u8>)>>,
        trailing: Vec<u8>,
    }

    impl Hello {
        fn new() -> Self {
            Self {
                legacy_version: 0x0303,
                session_id: vec![7; 32],
                suites: be16s(&[0x1301, 0x1302, 0xc02f]),
                compression: vec![0],
                extensions: Some(vec![]),
                trailing: vec![],
            }
        }

        fn ext(mut self, ext_type: u16, data: Vec<u8>) -> Self {
            self.extensions
                .get_or_insert_with(Vec::new)
                .push((ext_type, data));
            self
        }

        fn body(&self) -> Vec<u8> {
            let mut b = self.legacy_version.to_be_bytes().to_vec();
            b.extend([0x42; 32]);
            b.push(self.session_id.len() as u8);
            b.extend(&self.session_id);
            b.extend((self.suites.len() as u16).to_be_bytes());
            b.extend(&self.suites);
            b.push(self.compression.len() as u8);
            b.extend(&self.compression);
            if let Some(exts) = &self.extensions {
                let mut block = Vec::new();
                for (ext_type, data) in exts {
                    block.extend(ext_type.to_be_bytes());
                    block.extend((data.len() as u16).to_be_bytes());
                    block.extend(data);
                }
                b.extend((block.len() as u16).to_be_bytes());
                b.extend(block);
            }
            b.extend(&self.trailing);
            b
        }

        fn handshake(&self) -> Vec<u8> {
            handshake(1, &self.body())
        }

        /// Framed the way clients do: one record unless it exceeds 2^14.
        fn bytes(&self) -> Vec<u8> {
            records(&self.handshake(), &[16384])
        }
    }

    fn be16s(values: &[u16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    fn handshake(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![msg_type];
        m.extend(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend(body);
        m
    }

    fn record(content_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut r = vec![content_type, 3, 1];
        r.extend((payload.len() as u16).to_be_bytes());
        r.extend(payload);
        r
    }

    /// Frame `hs` into handshake records of the given sizes, the last size
    /// repeating until the message is used up.
    fn records(hs: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = hs;
        let mut sizes = sizes
            .iter()
            .copied()
            .chain(std::iter::repeat(*sizes.last().unwrap()));
        while !rest.is_empty() {
            let n = sizes.next().unwrap().min(rest.len());
            out.extend(record(22, &rest[..n]));
            rest = &rest[n..];
        }
        out
    }

    fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(*name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        data
    }

    fn host(name: &[u8]) -> Vec<u8> {
        sni_ext(&[(0, name)])
    }

    fn alpn_ext(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protocols {
            list.push(p.len() as u8);
            list.extend(*p);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        data
    }

    fn versions_ext(versions: &[u16]) -> Vec<u8> {
        let list = be16s(versions);
        let mut data = vec![list.len() as u8];
        data.extend(list);
        data
    }

    fn typical() -> Hello {
        Hello::new()
            .ext(0, host(b"example.com"))
            .ext(16, alpn_ext(&[b"h2", b"http/1.1"]))
            .ext(43, versions_ext(&[0x0304, 0x0303]))
    }

    fn done(input: &[u8]) -> ClientHello {
        match parse(input) {
            Ok(Some(hello)) => hello,
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    fn err(input: &[u8]) -> ClientHelloError {
        match parse(input) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn ext_err(hello: Hello) -> (u16, &'static str) {
        match err(&hello.bytes()) {
            ClientHelloError::MalformedExtension { ext_type, reason } => (ext_type, reason),
            other => panic!("expected MalformedExtension, got {other:?}"),
        }
    }

    /// Feed `input` in `chunk`-sized pieces, returning the final answer the
    /// way a caller at EOF would see it.
    fn feed(
        parser: &mut ClientHelloParser,
        input: &[u8],
        chunk: usize,
    ) -> Result<Option<ClientHello>, ClientHelloError> {
        for piece in input.chunks(chunk) {
            match parser.push(piece)? {
                Status::NeedMore => {}
                Status::Done(hello) => return Ok(Some(hello)),
            }
        }
        Ok(None)
    }

    #[test]
    fn parses_a_typical_hello() {
        let input = typical().bytes();
        let hello = done(&input);
        assert_eq!(
            hello,
            ClientHello {
                legacy_version: 0x0303,
                record_version: 0x0301,
                supported_versions: vec![0x0304, 0x0303],
                cipher_suites: vec![0x1301, 0x1302, 0xc02f],
                sni: Some("example.com".into()),
                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                extensions: vec![0, 16, 43],
                len: input.len(),
            }
        );
        assert!(hello.offers_tls13());
        assert!(hello.has_alpn(b"h2"));
        assert!(!hello.has_alpn(b"h3"));
    }

    #[test]
    fn hello_without_extensions_block() {
        let mut hello = Hello::new();
        hello.extensions = None;
        let parsed = done(&hello.bytes());
        assert!(parsed.extensions.is_empty());
        assert_eq!(parsed.sni, None);
        assert!(parsed.alpn.is_empty());
        assert!(!parsed.offers_tls13());
    }

    #[test]
    fn empty_extensions_block_is_fine() {
        assert!(done(&Hello::new().bytes()).extensions.is_empty());
    }

    #[test]
    fn hello_over_16k_spans_two_records() {
        let hello = typical().ext(21, vec![0; 20_000]);
        let hs = hello.handshake();
        assert!(hs.len() > 16384);
        let input = records(&hs, &[16384]);
        assert_eq!(input.len(), hs.len() + 2 * RECORD_HEADER_LEN);
        let parsed = done(&input);
        assert_eq!(parsed.sni.as_deref(), Some("example.com"));
        assert_eq!(parsed.extensions, [0, 16, 43, 21]);
        assert_eq!(parsed.len, input.len());
        // And fed in awkward pieces.
        for chunk in [1, 3, 4096, 16389, 16390] {
            let mut p = ClientHelloParser::new();
            assert_eq!(feed(&mut p, &input, chunk).unwrap().unwrap(), parsed);
        }
    }

    #[test]
    fn one_byte_records_including_the_handshake_header() {
        let hs = typical().handshake();
        let input = records(&hs, &[1]);
        let parsed = done(&input);
        assert_eq!(parsed.len, hs.len() * 6);
        assert_eq!(parsed.sni.as_deref(), Some("example.com"));
    }

    #[test]
    fn record_longer_than_allowed_is_malformed() {
        let hs = typical().ext(21, vec![0; 20_000]).handshake();
        let input = records(&hs, &[MAX_RECORD_PAYLOAD + 1]);
        assert_eq!(
            err(&input[..5]),
            malformed("record longer than 2^14 + 2048")
        );
        // The slack itself is accepted.
        done(&records(&hs, &[MAX_RECORD_PAYLOAD]));
    }

    #[test]
    fn zero_length_record_is_malformed() {
        let mut input = record(22, &[]);
        input.extend(typical().bytes());
        assert_eq!(err(&input), malformed("zero-length handshake record"));
    }

    #[test]
    fn raw_bytes_over_the_limit() {
        let input = typical().bytes();
        let exact = ClientHelloParser::with_limit(input.len()).push(&input);
        assert!(matches!(exact, Ok(Status::Done(_))));
        let mut p = ClientHelloParser::with_limit(input.len() - 1);
        assert_eq!(
            p.push(&input),
            Err(ClientHelloError::TooLarge {
                limit: input.len() - 1
            })
        );
    }

    #[test]
    fn record_headers_count_towards_the_limit() {
        // The handshake length fits easily; the framing does not.
        let hs = typical().handshake();
        let input = records(&hs, &[1]);
        let limit = hs.len() * 2;
        let mut p = ClientHelloParser::with_limit(limit);
        assert_eq!(
            feed(&mut p, &input, 7),
            Err(ClientHelloError::TooLarge { limit })
        );
        assert_eq!(p.consumed(), limit);
    }

    #[test]
    fn handshake_length_over_the_limit_fails_at_once() {
        let mut input = vec![22, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x00];
        assert_eq!(
            err(&input),
            ClientHelloError::TooLarge {
                limit: DEFAULT_MAX_HELLO_LEN
            }
        );
        // Just under the limit: needs more.
        input[6..9].copy_from_slice(&(DEFAULT_MAX_HELLO_LEN as u32 - 9).to_be_bytes()[1..]);
        assert_eq!(parse(&input), Ok(None));
        input[6..9].copy_from_slice(&(DEFAULT_MAX_HELLO_LEN as u32 - 8).to_be_bytes()[1..]);
        assert_eq!(
            err(&input),
            ClientHelloError::TooLarge {
                limit: DEFAULT_MAX_HELLO_LEN
            }
        );
    }

    #[test]
    fn truncated_then_finish() {
        let input = typical().bytes();
        let mut p = ClientHelloParser::new();
        assert_eq!(p.push(&input[..input.len() - 1]), Ok(Status::NeedMore));
        assert_eq!(p.finish(), ClientHelloError::Truncated);
        assert_eq!(p.consumed(), input.len() - 1);
        // Truncated inside a record header, too.
        let mut p = ClientHelloParser::new();
        assert_eq!(p.push(&input[..3]), Ok(Status::NeedMore));
        assert_eq!(p.finish(), ClientHelloError::Truncated);
    }

    #[test]
    fn finish_with_nothing_fed() {
        let mut p = ClientHelloParser::new();
        assert_eq!(p.push(&[]), Ok(Status::NeedMore));
        assert_eq!(p.finish(), ClientHelloError::NotTls { sslv2: false });
        assert_eq!(parse(&[]), Ok(None));
    }

    #[test]
    fn not_tls() {
        // SSLv2-compatible hello: 2-byte header with the high bit set, then
        // msg_type 1 and version 3.1.
        let v2 = [0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15];
        assert_eq!(err(&v2), ClientHelloError::NotTls { sslv2: true });
        assert_eq!(
            err(b"GET / HTTP/1.1\r\n"),
            ClientHelloError::NotTls { sslv2: false }
        );
        assert_eq!(
            err(&[0x15, 3, 1, 0, 2, 2, 40]),
            ClientHelloError::NotTls { sslv2: false }
        );
        let mut p = ClientHelloParser::new();
        assert!(p.push(&[0x80]).is_err());
        assert_eq!(p.finish(), ClientHelloError::NotTls { sslv2: true });
    }

    #[test]
    fn handshake_record_followed_by_garbage() {
        assert_eq!(
            err(&[22, b'G', b'E', b'T']),
            ClientHelloError::UnsupportedRecordVersion(0x4745)
        );
        assert_eq!(
            err(&[22, 3, 5]),
            ClientHelloError::UnsupportedRecordVersion(0x0305)
        );
        // A ServerHello, or anything else, where the ClientHello belongs.
        assert_eq!(
            err(&[22, 3, 3, 0, 10, 2]),
            ClientHelloError::NotClientHello(2)
        );
        assert_eq!(
            err(&[22, 3, 1, 0, 10, 0xff, 0, 0]),
            ClientHelloError::NotClientHello(0xff)
        );
        // A ClientHello header followed by noise.
        let noise = handshake(1, &[0xff; 40]);
        assert!(matches!(
            err(&record(22, &noise)),
            ClientHelloError::Malformed(_)
        ));
        // Empty body.
        assert_eq!(
            err(&record(22, &handshake(1, &[]))),
            malformed("truncated legacy_version")
        );
    }

    #[test]
    fn later_records_may_use_another_version() {
        let hs = typical().handshake();
        let mut input = record(22, &hs[..10]);
        let mut second = record(22, &hs[10..]);
        second[2] = 3;
        input.extend(second);
        assert_eq!(done(&input).record_version, 0x0301);
    }

    #[test]
    fn structural_errors() {
        let mut h = Hello::new();
        h.session_id = vec![0; 33];
        assert_eq!(
            err(&h.bytes()),
            malformed("legacy_session_id longer than 32 bytes")
        );

        let mut h = Hello::new();
        h.session_id = vec![];
        done(&h.bytes());

        let mut h = Hello::new();
        h.suites = vec![0x13, 0x01, 0x13];
        assert_eq!(
            err(&h.bytes()),
            malformed("cipher_suites length is zero or odd")
        );

        let mut h = Hello::new();
        h.suites = vec![];
        assert_eq!(
            err(&h.bytes()),
            malformed("cipher_suites length is zero or odd")
        );

        let mut h = Hello::new();
        h.compression = vec![];
        assert_eq!(err(&h.bytes()), malformed("no compression methods"));

        let mut h = typical();
        h.trailing = vec![0];
        assert_eq!(
            err(&h.bytes()),
            malformed("trailing bytes after the extensions block")
        );

        // A lone byte where the extensions block length should be.
        let mut h = Hello::new();
        h.extensions = None;
        h.trailing = vec![0];
        assert_eq!(
            err(&h.bytes()),
            malformed("extensions block overruns the handshake message")
        );

        // An extension whose length overruns the block.
        let mut body = typical().body();
        let n = body.len();
        body[n - 1 - versions_ext(&[0x0304, 0x0303]).len()] += 1;
        assert_eq!(
            err(&record(22, &handshake(1, &body))),
            malformed("extension overruns the extensions block")
        );

        // A block with a stray byte after the last extension.
        let mut h = typical();
        h.extensions = None;
        let mut block = Vec::new();
        block.extend([0, 0x2b, 0, 3]);
        block.extend(versions_ext(&[0x0304]));
        block.push(0);
        h.trailing = (block.len() as u16).to_be_bytes().to_vec();
        h.trailing.extend(block);
        assert_eq!(err(&h.bytes()), malformed("truncated extension header"));
    }

    #[test]
    fn data_after_the_hello_in_its_record_is_malformed() {
        let mut hs = typical().handshake();
        hs.push(0);
        assert_eq!(
            err(&record(22, &hs)),
            malformed("data after the ClientHello in the same record")
        );
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let input = typical().bytes();
        let mut with_more = input.clone();
        with_more.extend(record(23, b"early data"));
        let hello = done(&with_more);
        assert_eq!(hello.len, input.len());
        let mut p = ClientHelloParser::new();
        assert!(matches!(p.push(&with_more), Ok(Status::Done(_))));
        assert_eq!(p.consumed(), input.len());
    }

    #[test]
    fn alpn_rules() {
        let (t, r) = ext_err(Hello::new().ext(16, alpn_ext(&[])));
        assert_eq!((t, r), (16, "empty protocol_name_list"));
        let (t, r) = ext_err(Hello::new().ext(16, alpn_ext(&[b"h2", b""])));
        assert_eq!((t, r), (16, "empty protocol name"));
        let (t, _) = ext_err(Hello::new().ext(16, vec![]));
        assert_eq!(t, 16);
        let mut data = alpn_ext(&[b"h2"]);
        data.push(0);
        assert_eq!(
            ext_err(Hello::new().ext(16, data)),
            (16, "trailing bytes after protocol_name_list")
        );
        // A name length running past the list.
        assert_eq!(
            ext_err(Hello::new().ext(16, vec![0, 2, 5, b'h'])),
            (16, "truncated protocol name")
        );
        let long = [b'x'; 255];
        assert_eq!(
            done(&Hello::new().ext(16, alpn_ext(&[&long])).bytes()).alpn,
            [long.to_vec()]
        );
    }

    #[test]
    fn sni_length_bounds() {
        let name = |n: usize| {
            let mut s = "a.".repeat(n / 2).into_bytes();
            s.resize(n, b'b');
            s
        };
        let ok = done(&Hello::new().ext(0, host(&name(255))).bytes());
        assert_eq!(ok.sni.unwrap().len(), 255);
        for n in [256, 1000, 20000] {
            assert_eq!(
                ext_err(Hello::new().ext(0, host(&name(n)))),
                (0, "host_name longer than 255 bytes")
            );
        }
        assert_eq!(
            ext_err(Hello::new().ext(0, host(b""))),
            (0, "empty server name")
        );
        assert_eq!(
            done(&Hello::new().ext(0, host(b"x")).bytes())
                .sni
                .as_deref(),
            Some("x")
        );
    }

    #[test]
    fn sni_characters() {
        for bad in [
            &b"a\0b"[..],
            b"a\rb",
            b"a\nb",
            b"a b",
            b"a\x7fb",
            b"caf\xc3\xa9.fr",
            b"\t",
        ] {
            assert_eq!(
                ext_err(Hello::new().ext(0, host(bad))),
                (0, "host_name has a byte outside printable ASCII"),
                "{bad:?}"
            );
        }
        // Not DNS-validated, not normalised.
        for good in ["Example.COM.", "xn--caf-dma.fr", "_srv.example", "a..b"] {
            assert_eq!(
                done(&Hello::new().ext(0, host(good.as_bytes())).bytes())
                    .sni
                    .as_deref(),
                Some(good)
            );
        }
    }

    #[test]
    fn ip_literal_sni_is_accepted_as_a_string() {
        for ip in ["192.0.2.1", "2001:db8::1", "[::1]"] {
            let sni = done(&Hello::new().ext(0, host(ip.as_bytes())).bytes())
                .sni
                .unwrap();
            assert_eq!(sni, ip);
        }
    }

    #[test]
    fn server_name_list_rules() {
        assert_eq!(
            ext_err(Hello::new().ext(0, sni_ext(&[(0, b"a.test"), (0, b"b.test")]))),
            (0, "more than one host_name")
        );
        assert_eq!(
            ext_err(Hello::new().ext(0, sni_ext(&[]))),
            (0, "empty server_name_list")
        );
        // The server's empty acknowledgement is not a client's extension.
        assert_eq!(
            ext_err(Hello::new().ext(0, vec![])),
            (0, "truncated server_name_list")
        );
        // Unknown name types are skipped, around or instead of a host_name.
        let hello = done(
            &Hello::new()
                .ext(0, sni_ext(&[(7, b"\x00\x01"), (0, b"a.test")]))
                .bytes(),
        );
        assert_eq!(hello.sni.as_deref(), Some("a.test"));
        assert_eq!(
            done(&Hello::new().ext(0, sni_ext(&[(7, b"opaque")])).bytes()).sni,
            None
        );
    }

    #[test]
    fn supported_versions_rules() {
        assert_eq!(
            ext_err(Hello::new().ext(43, vec![0])),
            (43, "versions list length is zero or odd")
        );
        assert_eq!(
            ext_err(Hello::new().ext(43, vec![3, 3, 4, 3])),
            (43, "versions list length is zero or odd")
        );
        assert_eq!(
            ext_err(Hello::new().ext(43, vec![4, 3, 4])),
            (43, "truncated versions list")
        );
        assert_eq!(
            ext_err(Hello::new().ext(43, vec![2, 3, 4, 0])),
            (43, "trailing bytes after versions list")
        );
        let hello = done(&Hello::new().ext(43, versions_ext(&[0x0303])).bytes());
        assert!(!hello.offers_tls13());
    }

    #[test]
    fn duplicate_extensions() {
        let h = typical().ext(0, host(b"other.test"));
        assert_eq!(err(&h.bytes()), ClientHelloError::DuplicateExtension(0));
        let h = typical().ext(16, alpn_ext(&[b"h2"]));
        assert_eq!(err(&h.bytes()), ClientHelloError::DuplicateExtension(16));
        let h = typical().ext(GREASE, vec![]).ext(GREASE, vec![0]);
        assert_eq!(
            err(&h.bytes()),
            ClientHelloError::DuplicateExtension(GREASE)
        );
    }

    #[test]
    fn grease_is_kept() {
        let mut h = Hello::new()
            .ext(GREASE, vec![])
            .ext(0, host(b"example.com"))
            .ext(43, versions_ext(&[0x7a7a, 0x0304, 0x0303]))
            .ext(0xfafa, vec![0]);
        h.suites = be16s(&[0x0a0a, 0x1301]);
        let hello = done(&h.bytes());
        assert_eq!(hello.cipher_suites, [0x0a0a, 0x1301]);
        assert_eq!(hello.extensions, [GREASE, 0, 43, 0xfafa]);
        assert_eq!(hello.supported_versions, [0x7a7a, 0x0304, 0x0303]);
        assert!(hello.offers_tls13());
    }

    #[test]
    fn pre_shared_key_must_be_last() {
        done(&typical().ext(41, vec![0; 8]).bytes());
        assert_eq!(
            ext_err(typical().ext(41, vec![0; 8]).ext(21, vec![0])),
            (41, "pre_shared_key is not the last extension")
        );
    }

    #[test]
    fn interleaved_records() {
        let hs = typical().handshake();
        for (content_type, payload) in [(20u8, &[1u8][..]), (21, &[1, 0]), (23, b"data")] {
            let mut input = record(22, &hs[..20]);
            input.extend(record(content_type, payload));
            input.extend(record(22, &hs[20..]));
            assert_eq!(
                err(&input),
                ClientHelloError::InterleavedRecord(content_type)
            );
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let input = records(&typical().ext(21, vec![0; 300]).handshake(), &[100]);
        let whole = done(&input);
        let mut p = ClientHelloParser::new();
        for (i, byte) in input.iter().enumerate() {
            match p.push(std::slice::from_ref(byte)).unwrap() {
                Status::NeedMore => assert!(i + 1 < input.len()),
                Status::Done(hello) => {
                    assert_eq!(i + 1, input.len());
                    assert_eq!(hello, whole);
                }
            }
            assert_eq!(p.consumed(), i + 1);
        }
    }

    #[test]
    fn near_limit_hello_byte_at_a_time() {
        // Close to the default limit, split over four records: the parser does
        // the same work however the bytes arrive.
        let hs = typical().ext(21, vec![0; 65_000]).handshake();
        let input = records(&hs, &[16384]);
        assert!(input.len() <= DEFAULT_MAX_HELLO_LEN);
        let whole = done(&input);
        let mut p = ClientHelloParser::new();
        assert_eq!(feed(&mut p, &input, 1), Ok(Some(whole)));
        // One byte less of budget fails on the last byte.
        let mut p = ClientHelloParser::with_limit(input.len() - 1);
        assert_eq!(
            feed(&mut p, &input, 1),
            Err(ClientHelloError::TooLarge {
                limit: input.len() - 1
            })
        );
        assert_eq!(p.consumed(), input.len() - 1);
    }

    #[test]
    fn zero_limit() {
        let mut p = ClientHelloParser::with_limit(0);
        assert_eq!(p.push(&[]), Ok(Status::NeedMore));
        assert_eq!(p.push(&[22]), Err(ClientHelloError::TooLarge { limit: 0 }));
    }

    #[test]
    fn errors_do_not_depend_on_chunking() {
        let mut bad = typical().ext(16, alpn_ext(&[])).handshake();
        bad.push(0);
        let inputs = [
            records(&bad, &[9]),
            records(
                &typical().ext(0, host(b"x")).ext(0, host(b"y")).handshake(),
                &[3, 50],
            ),
            records(&typical().handshake(), &[30]),
        ];
        for input in inputs {
            let whole = parse(&input);
            for chunk in 1..=input.len() {
                let mut p = ClientHelloParser::new();
                assert_eq!(feed(&mut p, &input, chunk), whole, "chunk {chunk}");
            }
        }
    }

    #[test]
    fn parser_is_fused() {
        let input = typical().bytes();
        let mut p = ClientHelloParser::new();
        let first = p.push(&input).unwrap();
        assert_eq!(p.push(b"more"), Ok(first));
        assert_eq!(p.consumed(), input.len());

        let mut p = ClientHelloParser::new();
        let e = p.push(b"GET").unwrap_err();
        assert_eq!(p.push(&input), Err(e.clone()));
        assert_eq!(p.finish(), e);
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            ClientHelloError::NotTls { sslv2: true }.to_string(),
            "not a TLS handshake (SSLv2-style hello)"
        );
        assert_eq!(
            ClientHelloError::MalformedExtension {
                ext_type: 16,
                reason: "empty protocol name"
            }
            .to_string(),
            "malformed extension 0x0010: empty protocol name"
        );
    }
}
