//! The pure classifier: bytes seen so far → verdict. No I/O, no allocation, no panics, so it
//! can be fuzzed and property-tested on its own.

pub use crate::sniff::H2_PREFACE;

/// Longest method token we accept as "plausibly HTTP/1" (`UPDATEREDIRECTREF` is 17).
const MAX_METHOD: usize = 32;

/// Leading empty lines a server should ignore before a request line (RFC 9112 §2.2).
const MAX_LEADING_NEWLINES: usize = 8;

/// What a connection speaks, as far as its first bytes tell.
///
/// The first four are facts about the bytes; [`Undecided`](Protocol::Undecided) says the
/// bytes did not settle it. A proxy that applies HTTP policy must treat only
/// [`Http1`](Protocol::Http1) and [`Http2`](Protocol::Http2) as HTTP and must not relay
/// anything else where that policy is expected to hold (see [`Router`](super::Router),
/// which refuses an undecided connection unless a route is registered for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// A TLS record header carrying a handshake (`0x16 0x03 0x00..=0x04`).
    Tls,
    /// A well-formed HTTP/1.x request line: `token SP target SP "HTTP/1."`.
    Http1,
    /// The HTTP/2 prior-knowledge preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
    Http2,
    /// Definitely none of the above: the bytes cannot begin a TLS handshake, an HTTP/2
    /// preface or an HTTP/1 request (binary data, a byte outside a request line's grammar
    /// that is not even text).
    Opaque,
    /// Not decided: the client stayed silent until the timeout (server-first protocols),
    /// stopped or closed in the middle of a prefix, or sent text that resembles an HTTP/1
    /// request but breaks its grammar (`GET  /`, `http/1.1`, a 40-byte method, many empty
    /// lines, a tab for a space). [`Undecided`] metadata says
    /// which. Never route this to a relay behind which HTTP policy is expected to hold.
    Undecided,
}

/// Connection metadata next to [`Protocol::Undecided`]: why detection could not decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Undecided {
    /// Nothing arrived before the detection timeout (a server-first protocol, or a client
    /// that waits).
    Silent,
    /// The client closed its side before sending a byte.
    Closed,
    /// Some bytes arrived, then nothing more before the timeout, or the client closed, or
    /// the buffer filled, before they decided anything.
    Incomplete {
        /// Whether the bytes so far are text that could start an HTTP/1 request.
        http_like: bool,
    },
    /// Text that looks like an HTTP/1 request line but breaks its grammar.
    MalformedHttp1,
}

impl Undecided {
    /// Whether the client sent something that could be an attempt at HTTP/1 (a refusal
    /// then answers `400 Bad Request` rather than just closing).
    pub fn http_like(self) -> bool {
        match self {
            Undecided::MalformedHttp1 => true,
            Undecided::Incomplete { http_like } => http_like,
            Undecided::Silent | Undecided::Closed => false,
        }
    }
}

/// The classifier's answer for a prefix of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No longer bytes can change this answer. `Known(Protocol::Undecided)` means the
    /// bytes can no longer become a recognised protocol but resemble HTTP/1
    /// ([`Undecided::MalformedHttp1`]).
    Known(Protocol),
    /// The prefix is consistent with more than one answer; read more.
    NeedMore,
}

/// Classifies the first bytes of a connection.
///
/// The verdict is **stable**: once it is `Known(p)` for some prefix, it is `Known(p)` for
/// every extension of that prefix, so the result does not depend on how the bytes were
/// split into reads. A short first segment (`b"GE"`, `b"\x16\x03"`, `b"PRI"`) is
/// `NeedMore`, never a guess.
///
/// ```
/// use proxystack::detect::{classify, Protocol, Verdict};
/// assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Verdict::Known(Protocol::Http1));
/// assert_eq!(classify(b"GET"), Verdict::NeedMore);
/// assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Verdict::Known(Protocol::Http2));
/// assert_eq!(classify(&[0x16, 0x03, 0x01]), Verdict::Known(Protocol::Tls));
/// assert_eq!(classify(b"\x00\x01garbage"), Verdict::Known(Protocol::Opaque));
/// // Looks like HTTP, is not: never mistaken for something safe to relay.
/// assert_eq!(classify(b"GET  /admin HTTP/1.1\r\n"), Verdict::Known(Protocol::Undecided));
/// assert_eq!(classify(b"GET /admin http/1.1\r\n"), Verdict::Known(Protocol::Undecided));
/// ```
pub fn classify(prefix: &[u8]) -> Verdict {
    let Some(&first) = prefix.first() else {
        return Verdict::NeedMore;
    };
    if first == 0x16 {
        return classify_tls(prefix);
    }
    // "PRI * HTTP/2.0" is also a syntactically valid HTTP/1 request line, so the preface
    // is checked first and HTTP/1 only once the bytes leave it.
    match match_prefix(prefix, H2_PREFACE) {
        Some(true) => Verdict::Known(Protocol::Http2),
        Some(false) => Verdict::NeedMore,
        None => classify_http1(prefix),
    }
}

/// How `bytes` relate to `expected`: `Some(true)` when they start with all of it,
/// `Some(false)` when they are a strict prefix of it (undecided), `None` when they leave it.
fn match_prefix(bytes: &[u8], expected: &[u8]) -> Option<bool> {
    if bytes.starts_with(expected) {
        Some(true)
    } else if expected.starts_with(bytes) {
        Some(false)
    } else {
        None
    }
}

pub(crate) use crate::sniff::Stop;

/// A decided protocol with its reason when it is [`Protocol::Undecided`]: the classifier
/// decides "undecided" only for text that breaks the HTTP/1 request-line grammar.
pub(crate) fn decided(p: Protocol) -> (Protocol, Option<Undecided>) {
    match p {
        Protocol::Undecided => (p, Some(Undecided::MalformedHttp1)),
        p => (p, None),
    }
}

/// The answer when no more bytes will come: the classifier's verdict if it has one; a
/// request line still in progress when the buffer filled is HTTP/1 (a very long target:
/// the HTTP server answers `414`); everything else is [`Protocol::Undecided`], with why.
pub(crate) fn settle(prefix: &[u8], stop: Stop) -> (Protocol, Option<Undecided>) {
    match classify(prefix) {
        Verdict::Known(p) => decided(p),
        Verdict::NeedMore if stop == Stop::Full && http1_target_started(prefix) => {
            (Protocol::Http1, None)
        }
        Verdict::NeedMore => {
            let why = match (prefix.is_empty(), stop) {
                (true, Stop::Eof) => Undecided::Closed,
                (true, _) => Undecided::Silent,
                (false, _) => Undecided::Incomplete {
                    http_like: http1_started(prefix),
                },
            };
            (Protocol::Undecided, Some(why))
        }
    }
}

fn classify_tls(prefix: &[u8]) -> Verdict {
    // ContentType handshake(22), ProtocolVersion major 3, minor 0 (SSL 3.0) to 4.
    match prefix {
        [0x16] | [0x16, 0x03] => Verdict::NeedMore,
        [0x16, 0x03, minor, ..] if *minor <= 0x04 => Verdict::Known(Protocol::Tls),
        _ => Verdict::Known(Protocol::Opaque),
    }
}

/// Where a request-line scan stopped.
enum Line {
    Done(Verdict),
    /// Still consistent; `true` once the request target has begun.
    Partial(bool),
}

fn classify_http1(prefix: &[u8]) -> Verdict {
    match scan_request_line(prefix) {
        Line::Done(v) => v,
        Line::Partial(_) => Verdict::NeedMore,
    }
}

fn http1_target_started(prefix: &[u8]) -> bool {
    matches!(scan_request_line(prefix), Line::Partial(true))
}

/// Whether an undecided prefix is on its way to an HTTP/1 request line (as opposed to a
/// TLS record header or the HTTP/2 preface, which are undecided too while incomplete).
fn http1_started(prefix: &[u8]) -> bool {
    prefix.first() != Some(&0x16)
        && !H2_PREFACE.starts_with(prefix)
        && matches!(scan_request_line(prefix), Line::Partial(_))
}

/// A byte where the request-line grammar was broken decides the verdict: text resembles
/// a malformed request (undecided, answered `400` where HTTP is expected), anything else
/// is another protocol.
fn deviation(b: u8) -> Line {
    let text = matches!(b, b'\t' | b'\n' | b'\r' | 0x20..=0x7e);
    Line::Done(Verdict::Known(if text {
        Protocol::Undecided
    } else {
        Protocol::Opaque
    }))
}

fn scan_request_line(prefix: &[u8]) -> Line {
    const MALFORMED: Line = Line::Done(Verdict::Known(Protocol::Undecided));
    // Leading CRLFs (or bare LFs) before the request line.
    let newlines = prefix
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if newlines > MAX_LEADING_NEWLINES * 2 {
        return MALFORMED;
    }
    let rest = prefix.get(newlines..).unwrap_or_default();
    // method = token, then one space.
    let method = rest.iter().take_while(|&&b| is_tchar(b)).count();
    if method > MAX_METHOD {
        return MALFORMED;
    }
    let Some((&space, rest)) = rest.get(method..).and_then(<[u8]>::split_first) else {
        return Line::Partial(false);
    };
    if method == 0 {
        // Not even a token: text here is no request anyone meant (`{`, `<`, `/`).
        return Line::Done(Verdict::Known(Protocol::Opaque));
    }
    if space == b'\r' || space == b'\n' {
        // A word alone on a line (`PING`, an SSH banner): no HTTP parser reads a request
        // into it, so it is another protocol.
        return Line::Done(Verdict::Known(Protocol::Opaque));
    }
    if space != b' ' {
        return deviation(space);
    }
    // request-target: visible ASCII, at least one byte, then one space.
    let target = rest
        .iter()
        .take_while(|b| (0x21..=0x7e).contains(*b))
        .count();
    let Some((&space, rest)) = rest.get(target..).and_then(<[u8]>::split_first) else {
        return Line::Partial(true);
    };
    if target == 0 || space != b' ' {
        return deviation(space);
    }
    match match_prefix(rest, b"HTTP/1.") {
        Some(true) => Line::Done(Verdict::Known(Protocol::Http1)),
        Some(false) => Line::Partial(true),
        None => {
            // The first byte that leaves "HTTP/1." decides.
            let at = rest
                .iter()
                .zip(b"HTTP/1.")
                .take_while(|(a, b)| a == b)
                .count();
            rest.get(at).map_or(Line::Partial(true), |&b| deviation(b))
        }
    }
}

/// `tchar` from RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The property the fuzz target and the property tests check, as plain code so all of them
/// share it: classifying `data` as it arrives in chunks (lengths taken cyclically from
/// `chunk_lens`, 0 meaning 1) stops at the same verdict as classifying it whole, and every
/// longer prefix of a decided prefix keeps that verdict. Returns a description of the first
/// violation.
#[cfg(any(test, fuzzing))]
pub fn check_rechunking(data: &[u8], chunk_lens: &[u8]) -> Result<(), String> {
    let whole = classify(data);
    // Incremental, as the layer does it: stop at the first decided verdict.
    let mut seen = 0;
    let mut lens = chunk_lens.iter().cycle();
    let mut incremental = Verdict::NeedMore;
    while seen < data.len() {
        let step = usize::from(lens.next().copied().unwrap_or(1)).max(1);
        seen = (seen + step).min(data.len());
        incremental = classify(data.get(..seen).unwrap_or(data));
        if let Verdict::Known(_) = incremental {
            break;
        }
    }
    if let Verdict::Known(p) = incremental {
        if whole != incremental {
            return Err(format!(
                "chunked verdict {p:?} after {seen} bytes, whole verdict {whole:?}"
            ));
        }
    } else if whole != Verdict::NeedMore {
        return Err(format!(
            "chunked verdict undecided, whole verdict {whole:?}"
        ));
    }
    // Monotonic: once decided, every extension agrees.
    let mut known = None;
    for end in 0..=data.len() {
        match (classify(data.get(..end).unwrap_or(data)), known) {
            (Verdict::Known(p), None) => known = Some(p),
            (Verdict::Known(p), Some(k)) if p != k => {
                return Err(format!(
                    "verdict changed from {k:?} to {p:?} at {end} bytes"
                ))
            }
            (Verdict::NeedMore, Some(k)) => {
                return Err(format!("verdict {k:?} became undecided at {end} bytes"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The fuzz target's body (`fuzz/fuzz_targets/detect.rs`), here so that unit tests run
/// exactly the same code: the first byte says how many of the next bytes (0–7) are chunk
/// lengths, the rest is the connection's data.
#[cfg(any(test, fuzzing))]
pub fn fuzz_one(input: &[u8]) -> Result<(), String> {
    let Some((&n, rest)) = input.split_first() else {
        return Ok(());
    };
    let (lens, data) = rest.split_at(usize::from(n % 8).min(rest.len()));
    let _ = classify(data);
    for stop in [Stop::Timeout, Stop::Eof, Stop::Full] {
        let (protocol, why) = settle(data, stop);
        if (protocol == Protocol::Undecided) != why.is_some() {
            return Err(format!("settled as {protocol:?} with reason {why:?}"));
        }
    }
    check_rechunking(data, lens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_stable(data: &[u8]) {
        for lens in [&[1u8][..], &[3], &[2, 7, 1], &[255]] {
            if let Err(e) = check_rechunking(data, lens) {
                panic!("{e}: {:?}", String::from_utf8_lossy(data));
            }
        }
    }

    #[test]
    fn examples() {
        use Protocol::*;
        for (input, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Verdict::Known(Http1)),
            (b"\r\nPOST /x?y HTTP/1.0\r\n", Verdict::Known(Http1)),
            (b"OPTIONS * HTTP/1.", Verdict::Known(Http1)),
            (b"CONNECT a:443 HTTP/1.1", Verdict::Known(Http1)),
            (b"GET / HTTP/2.0", Verdict::Known(Undecided)),
            (b"GET  / HTTP/1.1", Verdict::Known(Undecided)),
            (b"GET /admin http/1.1\r\n", Verdict::Known(Undecided)),
            (b"GET\t/admin HTTP/1.1\r\n", Verdict::Known(Undecided)),
            (b"GET /admin\r\n", Verdict::Known(Undecided)),
            (b"GET /admin HTTP/1.1\x00", Verdict::Known(Http1)),
            (b"GET /admin HTTP/\x00", Verdict::Known(Opaque)),
            (b"GET /\x00", Verdict::Known(Opaque)),
            (&[b'A'; 33], Verdict::Known(Undecided)),
            (&[b'A'; 32], Verdict::NeedMore),
            (
                b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET",
                Verdict::Known(Undecided),
            ),
            (b"{\"jsonrpc\":", Verdict::Known(Opaque)),
            (b"PING\r\n", Verdict::Known(Opaque)),
            (b"GE", Verdict::NeedMore),
            (b"GET /", Verdict::NeedMore),
            (b"GET / HTT", Verdict::NeedMore),
            (b"PRI", Verdict::NeedMore),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r", Verdict::NeedMore),
            (H2_PREFACE, Verdict::Known(Http2)),
            (b"PRI * HTTP/1.1\r\n", Verdict::Known(Http1)),
            (b"\x16", Verdict::NeedMore),
            (b"\x16\x03", Verdict::NeedMore),
            (b"\x16\x03\x01\x02\x00", Verdict::Known(Tls)),
            (b"\x16\x03\x09", Verdict::Known(Opaque)),
            (b"\x16\x02", Verdict::Known(Opaque)),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Verdict::Known(Opaque)),
            (b"\x00", Verdict::Known(Opaque)),
            (b"", Verdict::NeedMore),
        ] {
            assert_eq!(
                classify(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            check_stable(input);
        }
    }

    #[test]
    fn settle_decides() {
        use Undecided::*;
        let undecided = |why| (Protocol::Undecided, Some(why));
        assert_eq!(settle(b"", Stop::Timeout), undecided(Silent));
        assert_eq!(settle(b"", Stop::Eof), undecided(Closed));
        let http_like = Incomplete { http_like: true };
        assert_eq!(settle(b"GET", Stop::Timeout), undecided(http_like));
        assert_eq!(settle(b"GET /adm", Stop::Eof), undecided(http_like));
        assert_eq!(settle(b"\r\n", Stop::Timeout), undecided(http_like));
        assert_eq!(settle(b"GET /aaaa", Stop::Full), (Protocol::Http1, None));
        assert_eq!(settle(b"GET", Stop::Full), undecided(http_like));
        let not_http = Incomplete { http_like: false };
        assert_eq!(settle(b"\x16\x03", Stop::Timeout), undecided(not_http));
        assert_eq!(settle(b"PRI * ", Stop::Timeout), undecided(not_http));
        assert_eq!(settle(b"\x16\x03\x03", Stop::Eof), (Protocol::Tls, None));
        assert_eq!(settle(b"GET  /", Stop::Eof), undecided(MalformedHttp1));
        assert!(MalformedHttp1.http_like() && !Silent.http_like());
    }

    fn interesting_prefix() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let seeds: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            b"POST /upload?x=1 HTTP/1.0\r\n".to_vec(),
            H2_PREFACE.to_vec(),
            b"PRI * HTTP/1.1\r\n".to_vec(),
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01],
            b"SSH-2.0-OpenSSH\r\n".to_vec(),
            b"\r\n\r\nOPTIONS * HTTP/1.1\r\n".to_vec(),
            b"GET  /admin http/1.1\r\n".to_vec(),
        ];
        prop_oneof![
            // A known prefix, truncated and with random bytes appended.
            (
                proptest::sample::select(seeds),
                0usize..40,
                proptest::collection::vec(any::<u8>(), 0..16)
            )
                .prop_map(|(s, cut, tail)| {
                    let mut v = s[..cut.min(s.len())].to_vec();
                    v.extend(tail);
                    v
                }),
            proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2000, ..proptest::prelude::ProptestConfig::default()
        })]
        #[test]
        fn classification_is_stable_under_rechunking(
            data in interesting_prefix(),
            lens in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..8),
        ) {
            proptest::prop_assert_eq!(check_rechunking(&data, &lens), Ok(()));
        }
    }

    /// The fuzz target's code on its seed corpus (the fuzz crate itself is built by CI only).
    #[test]
    fn fuzz_seed_corpus_passes_the_fuzz_target_check() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/detect");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            fuzz_one(&data).unwrap();
            n += 1;
        }
        assert!(n >= 5, "seed corpus has {n} files");
    }

    #[test]
    fn seed_corpus_is_stable() {
        // The same inputs as fuzz/corpus/detect; the fuzz target runs `check_stable` too.
        for seed in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            H2_PREFACE,
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
            b"SSH-2.0-x\r\n",
            b"\r\n\r\nPUT /x HTTP/1.0\r\n",
        ] {
            check_stable(seed);
        }
    }
}
