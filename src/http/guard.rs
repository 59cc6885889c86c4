//! A strict check of HTTP/1 request heads, in front of hyper's parser.
//!
//! hyper parses leniently where the RFCs allow it: it accepts bare LF line ends
//! (RFC 9112 §2.2 "MAY"), and for a request with both `Content-Length` and
//! `Transfer-Encoding: chunked` it drops the length and decodes chunked (RFC 9112 §6.3), so a
//! service behind hyper cannot even see that the request was ambiguous. A proxy should
//! refuse such requests (Envoy does by default): another hop may frame them differently.
//!
//! [`H1Guard`] wraps the connection's byte stream *below* hyper. It follows message framing
//! (heads, `Content-Length` bodies, chunked bodies) as bytes are read and checks each
//! complete request head before hyper gets its final byte. A rejected head is made
//! unparseable for hyper (its last line feed becomes a NUL, followed by an empty line so
//! hyper's parser sees a complete, invalid head), so hyper itself answers
//! `400 Bad Request` and closes, in order after any pipelined responses; nothing after the
//! bad head is read.
//!
//! # Upgrades and `CONNECT`
//!
//! A request with an `Upgrade` field, or a `CONNECT`, only *may* end HTTP on the
//! connection: hyper parses its body like any other (`Content-Length` / chunked), and stops
//! parsing HTTP only once a `101` was sent for it, or a `2xx` for a `CONNECT`; after any
//! other status it reads the next request. Only the response says which, so the guard
//! follows such a request's body like any other and, at its end, waits
//! ([`State::AwaitSwitch`]) for the status the server wrote, which the server reports
//! through the connection's [`SwitchSignal`]. While it waits, hyper gets nothing more;
//! bytes already read past the request (at most one read's worth: nothing more is read
//! while waiting) are held and handed on after the decision — unchecked after a switch
//! (they belong to the new protocol), through the usual checks otherwise. A request that
//! asked for an upgrade and did not get one therefore cannot switch the checks off for
//! the requests behind it.
//!
//! hyper remains the authority on framing: the guard ends every message where hyper's
//! decoder ends it, and when it cannot follow a message (a chunked body hyper rejects, a
//! head larger than hyper's buffer, the HTTP/2 preface) it stops checking that connection.
//! A chunk extension with a control character in it is invalid, not merely odd: the
//! connection's input ends there (hyper sees a truncated body and the client gets `400`),
//! so that a tolerated malformation cannot switch the checks off for requests pipelined
//! behind it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tracing::debug;

/// The stream wrapper; see the module docs.
pub(crate) struct H1Guard<I> {
    io: I,
    state: State,
    head: Vec<u8>,
    max_head: usize,
    /// The message being followed is an upgrade candidate (`Upgrade` field or `CONNECT`):
    /// at its end, wait for the response status.
    candidate: bool,
    /// A candidate head went to hyper in the last `feed`: any report still in the signal
    /// is stale (a report for this request cannot exist before hyper has its head).
    candidate_started: bool,
    /// Bytes read past a candidate message's end, not yet handed to hyper.
    held: BytesMut,
    /// Where the server reports the status of a candidate's response; `None` for a guard
    /// that checks nothing.
    switch: Option<Arc<SwitchSignal>>,
}

/// How the server tells the guard whether the response to an upgrade candidate switched
/// the connection to another protocol. One per connection, shared by the guard and the
/// service adapter. hyper serves HTTP/1 requests one at a time and reads nothing past a
/// candidate until the guard has its answer, so a report always belongs to the candidate
/// the guard is waiting for (or is about to wait for, when the service answered before
/// the request body was read).
#[derive(Debug, Default)]
pub(crate) struct SwitchSignal {
    inner: Mutex<Signal>,
}

#[derive(Debug, Default)]
struct Signal {
    /// `Some(true)`: a `101` (or a `2xx` to `CONNECT`) was sent; `Some(false)`: any other
    /// outcome.
    switched: Option<bool>,
    /// The guard's reader, waiting for the report.
    waker: Option<Waker>,
}

impl SwitchSignal {
    /// Records the outcome of the current candidate's response and wakes the guard.
    pub(crate) fn report(&self, switched: bool) {
        let waker = {
            let mut signal = self.lock();
            signal.switched = Some(switched);
            signal.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Takes the report, or registers `cx` to be woken by it.
    fn poll_switched(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut signal = self.lock();
        match signal.switched.take() {
            Some(switched) => Poll::Ready(switched),
            None => {
                match &mut signal.waker {
                    Some(waker) => waker.clone_from(cx.waker()),
                    slot @ None => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    /// Drops a report no request is waiting for.
    fn clear(&self) {
        self.lock().switched = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Signal> {
        // Nothing panics while the lock is held; a poisoned lock still holds valid data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Skipping a `Content-Length` body: bytes left.
    Body(u64),
    /// Following a chunked body.
    Chunked(Chunk),
    /// An upgrade candidate's message ended: hand hyper nothing more until the server
    /// reports whether its response switched protocols.
    AwaitSwitch,
    /// No more checks on this connection.
    Passthrough,
    /// A head was rejected: hand hyper the rest of the poison (bytes of [`POISON_TAIL`]
    /// not yet delivered), then EOF.
    Rejected(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Chunk size digits (count, value), then optional whitespace / extension.
    Size {
        digits: u8,
        value: u64,
        ext: bool,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer section: length of the current line so far (0: at a line start, where
    /// `\r` begins the final CRLF).
    Trailer {
        line: usize,
    },
    /// A trailer line's `\r` was read.
    TrailerLf,
    /// The final CRLF's `\r` was read.
    EndLf,
}

/// What follows the NUL that replaces a rejected head's last line feed.
const POISON_TAIL: &[u8] = b"\r\n\r\n";

/// What a checked head says about the bytes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checked {
    /// How its body is framed.
    pub(crate) framing: Framing,
    /// It may switch protocols (`Upgrade` field or `CONNECT`), depending on the response.
    pub(crate) upgrade: bool,
}

/// How a checked head's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// The HTTP/2 preface: what follows is not HTTP/1, stop following.
    Stop,
}

impl<I> H1Guard<I> {
    /// A checking wrapper; `switch` is where the server reports the responses to upgrade
    /// candidates.
    pub(crate) fn new(io: I, max_head: usize, switch: Arc<SwitchSignal>) -> Self {
        Self {
            io,
            state: State::Head,
            head: Vec::new(),
            max_head,
            candidate: false,
            candidate_started: false,
            held: BytesMut::new(),
            switch: Some(switch),
        }
    }

    /// A wrapper that checks nothing.
    pub(crate) fn passthrough(io: I) -> Self {
        Self {
            io,
            state: State::Passthrough,
            head: Vec::new(),
            max_head: 0,
            candidate: false,
            candidate_started: false,
            held: BytesMut::new(),
            switch: None,
        }
    }

    /// Feeds bytes hyper is about to get. Returns how many of them hyper may have: all of
    /// them, up to and including the final byte of a rejected head (which is then
    /// poisoned), or up to the end of an upgrade candidate's message (the rest waits for
    /// the response status, [`State::AwaitSwitch`]).
    fn feed(&mut self, data: &mut [u8]) -> usize {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Passthrough => return data.len(),
                State::Rejected(_) | State::AwaitSwitch => return i,
                State::Body(left) => {
                    let n = (data.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        self.message_end()
                    } else {
                        State::Body(left)
                    };
                }
                State::Chunked(Chunk::Data(left)) => {
                    let n = (data.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += n;
                    let left = left - n as u64;
                    self.state = State::Chunked(if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    });
                }
                State::Chunked(chunk) => {
                    let Some(&b) = data.get(i) else { break };
                    self.state = match step_chunk(chunk, b) {
                        Some(State::Head) => self.message_end(),
                        Some(next) => next,
                        None => {
                            debug!("chunked framing not followed; strict checks off for this connection");
                            State::Passthrough
                        }
                    };
                    i += 1;
                }
                State::Head => {
                    if self.head.is_empty() {
                        // Empty lines before a request line are skipped (RFC 9112 §2.2),
                        // by hyper too.
                        let skip = data
                            .get(i..)
                            .unwrap_or_default()
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        i += skip;
                        let rest = data.get(i..).unwrap_or_default();
                        if rest.is_empty() {
                            break;
                        }
                        // The common case: the whole head arrived in this read. Check it
                        // in place instead of collecting it byte by byte.
                        if let Some(end) = head_end(rest) {
                            if end > self.max_head + 1 {
                                // hyper answers 431 for this itself.
                                self.state = State::Passthrough;
                                continue;
                            }
                            let verdict = check_head(rest.get(..end).unwrap_or_default());
                            i += end;
                            if !self.after_head(verdict) {
                                if let Some(last) = data.get_mut(i - 1) {
                                    *last = 0;
                                }
                                return i;
                            }
                            continue;
                        }
                    }
                    // A head split across reads: collect it a line at a time.
                    let rest = data.get(i..).unwrap_or_default();
                    let line = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(rest.len(), |lf| lf + 1);
                    self.head
                        .extend_from_slice(rest.get(..line).unwrap_or_default());
                    i += line;
                    if self.head.last() == Some(&b'\n') && head_complete(&self.head) {
                        let verdict = check_head(&self.head);
                        self.head.clear();
                        if !self.after_head(verdict) {
                            if let Some(last) = data.get_mut(i - 1) {
                                *last = 0;
                            }
                            return i;
                        }
                    } else if self.head.len() > self.max_head {
                        // hyper answers 431 for this itself.
                        self.head = Vec::new();
                        self.state = State::Passthrough;
                    }
                }
            }
        }
        data.len()
    }
}

impl<I> H1Guard<I> {
    /// Moves on after a complete head: follows its body, or stops checking. `false` when
    /// the head was rejected (the state is then [`State::Rejected`] and the caller
    /// poisons the head's last byte).
    fn after_head(&mut self, verdict: Result<Checked, &'static str>) -> bool {
        let checked = match verdict {
            Ok(checked) => checked,
            Err(reason) => {
                debug!(reason, "rejecting HTTP/1 request head");
                self.state = State::Rejected(0);
                return false;
            }
        };
        self.candidate = checked.upgrade;
        self.candidate_started |= checked.upgrade;
        self.state = match checked.framing {
            Framing::None | Framing::Length(0) => self.message_end(),
            Framing::Length(n) => State::Body(n),
            Framing::Chunked => State::Chunked(Chunk::Size {
                digits: 0,
                value: 0,
                ext: false,
            }),
            Framing::Stop => State::Passthrough,
        };
        true
    }

    /// The state after a message's last byte: the next head, or, after an upgrade
    /// candidate, the wait for its response status.
    fn message_end(&mut self) -> State {
        if std::mem::take(&mut self.candidate) {
            State::AwaitSwitch
        } else {
            State::Head
        }
    }

    /// Leaves [`State::AwaitSwitch`] once the server reported the candidate's response:
    /// no more checks after a switch, the next head otherwise.
    fn poll_switch(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let switched = match &self.switch {
            Some(signal) => ready!(signal.poll_switched(cx)),
            // Not reachable (a guard without a signal checks nothing); fail closed.
            None => false,
        };
        self.state = if switched {
            debug!("protocol switched; strict checks off for this connection");
            State::Passthrough
        } else {
            State::Head
        };
        Poll::Ready(())
    }

    /// After `feed`: a new candidate's head is on its way to hyper, so a report still in
    /// the signal cannot be its own. Dropping it keeps a stray report from deciding for
    /// the wrong request.
    fn forget_stale_report(&mut self) {
        if std::mem::take(&mut self.candidate_started) {
            if let Some(signal) = &self.switch {
                signal.clear();
            }
        }
    }

    /// Appends what fits of the poison tail; once it is all out, reads report EOF.
    fn emit_poison(&mut self, buf: &mut ReadBuf<'_>) {
        if let State::Rejected(sent) = self.state {
            let rest = POISON_TAIL.get(sent..).unwrap_or_default();
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            self.state = State::Rejected(sent + n);
        }
    }
}

/// A head ends with an empty line: `\n\n` or `\n\r\n`.
fn head_complete(head: &[u8]) -> bool {
    head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n")
}

/// The length of the head at the start of `buf` (through its final line feed), if it is
/// all there: the first line feed followed by `\n` or `\r\n`.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let lf = from + buf.get(from..)?.iter().position(|&b| b == b'\n')?;
        match buf.get(lf + 1..) {
            Some([b'\n', ..]) => return Some(lf + 2),
            Some([b'\r', b'\n', ..]) => return Some(lf + 3),
            _ => from = lf + 1,
        }
    }
}

/// One byte of chunked framing. It must end each message exactly where hyper's decoder
/// does (hyper 1.x `ChunkedState`): a guard that ends a message early or late checks the
/// wrong bytes as the next head. Where hyper fails the body (and so the connection) the
/// guard may be laxer, and gives up checking (`None`).
fn step_chunk(chunk: Chunk, b: u8) -> Option<State> {
    let next = match chunk {
        Chunk::Size { digits, value, ext } => match b {
            // hyper skips every extension byte up to CR (LF is its error).
            _ if ext => match b {
                b'\r' => Chunk::SizeLf { value },
                b'\t' | b' '..=b'~' | 0x80..=0xff => chunk,
                // A control character in an extension: hyper would skip it (extensions are
                // not forwarded), but a message that lenient parsers disagree on ends the
                // connection rather than turning the checks off for what follows.
                _ => return Some(State::Rejected(POISON_TAIL.len())),
            },
            // No digit limit (hyper has none: leading zeros are fine), only overflow.
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                let d = u64::from((b as char).to_digit(16)?);
                Chunk::Size {
                    digits: digits.saturating_add(1),
                    value: value.checked_mul(16)?.checked_add(d)?,
                    ext,
                }
            }
            b';' | b' ' | b'\t' if digits > 0 => Chunk::Size {
                digits,
                value,
                ext: true,
            },
            b'\r' if digits > 0 => Chunk::SizeLf { value },
            _ => return None,
        },
        Chunk::SizeLf { value } => match b {
            b'\n' if value == 0 => Chunk::Trailer { line: 0 },
            b'\n' => Chunk::Data(value),
            _ => return None,
        },
        Chunk::Data(_) => return None, // handled in bulk by the caller
        Chunk::DataCr => match b {
            b'\r' => Chunk::DataLf,
            _ => return None,
        },
        Chunk::DataLf => match b {
            b'\n' => Chunk::Size {
                digits: 0,
                value: 0,
                ext: false,
            },
            _ => return None,
        },
        // hyper: trailer lines end with CRLF (a bare LF is part of the line), the section
        // with an empty line, CRLF.
        Chunk::Trailer { line } => match b {
            b'\r' if line == 0 => Chunk::EndLf,
            b'\r' => Chunk::TrailerLf,
            _ => Chunk::Trailer {
                line: line.saturating_add(1),
            },
        },
        Chunk::TrailerLf => match b {
            b'\n' => Chunk::Trailer { line: 0 },
            _ => return None,
        },
        Chunk::EndLf => match b {
            b'\n' => return Some(State::Head),
            _ => return None,
        },
    };
    Some(State::Chunked(next))
}

/// Checks one complete request head (request line, fields, final empty line).
pub(crate) fn check_head(head: &[u8]) -> Result<Checked, &'static str> {
    if head.starts_with(b"PRI * HTTP/2.0\r\n") {
        return Ok(Checked {
            framing: Framing::Stop,
            upgrade: false,
        });
    }
    let mut lines = head.split(|&b| b == b'\n');
    let request_line = lines.next().unwrap_or_default();
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encodings = 0;
    let mut hosts = 0;
    // An upgrade candidate exactly when the server adapter sees one (`is_upgrade_candidate`
    // in server.rs): method `CONNECT` (case-sensitive, like hyper) or any `Upgrade` field.
    let mut upgrade = request_line.starts_with(b"CONNECT ");
    check_line(request_line)?;
    for raw in lines {
        if raw.is_empty() {
            // The split after the final "\n".
            break;
        }
        let line = check_line(raw)?;
        if line.is_empty() {
            break; // the empty line ending the head
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err("obsolete line folding");
        }
        let mut parts = line.splitn(2, |&b| b == b':');
        let name = parts.next().unwrap_or_default();
        let Some(raw_value) = parts.next() else {
            return Err("field line without colon");
        };
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err("invalid field name");
        }
        let value = trim_ows(raw_value);
        if name.eq_ignore_ascii_case(b"content-length") {
            if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length");
            }
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("invalid Content-Length")?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err("conflicting Content-Length values");
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encodings += 1;
            // Only the exact coding `chunked`: no lists, no tabs, no look-alikes.
            let spaced = raw_value.strip_prefix(b" ").unwrap_or(raw_value);
            let spaced = spaced.strip_suffix(b" ").unwrap_or(spaced);
            if !spaced.eq_ignore_ascii_case(b"chunked") {
                return Err("Transfer-Encoding other than chunked");
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    if transfer_encodings > 1 {
        return Err("more than one Transfer-Encoding field");
    }
    if chunked && content_length.is_some() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if hosts > 1 {
        return Err("more than one Host field");
    }
    // RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
    // HTTP/1.1 request message that lacks a Host header field". Enforced where nothing else
    // names the authority: origin-form (`/path`) and asterisk-form targets; an absolute-form
    // or authority-form target carries it (and wins over Host, §3.2.2). HTTP/1.0 may omit it.
    if hosts == 0 {
        let line = request_line.strip_suffix(b"\r").unwrap_or(request_line);
        let mut parts = line.split(|&b| b == b' ');
        let (_, target, version) = (parts.next(), parts.next(), parts.next());
        let no_authority = target.is_some_and(|t| t.starts_with(b"/") || t == b"*");
        if no_authority && version == Some(&b"HTTP/1.1"[..]) {
            return Err("HTTP/1.1 request without Host");
        }
    }
    // hyper frames an upgrade or CONNECT request's body like any other (RFC 9110 §9.3.6
    // gives a CONNECT body no meaning, but a length still delimits it).
    let framing = if chunked {
        Framing::Chunked
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::None
    };
    Ok(Checked { framing, upgrade })
}

/// Checks one line of a head and returns it without its CR.
fn check_line(line: &[u8]) -> Result<&[u8], &'static str> {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err("bare LF line ending");
    };
    // No early exit: a branch-free fold over the whole line vectorizes.
    let bad = line.iter().fold(false, |bad, &b| {
        bad | ((b < 0x20) & (b != b'\t')) | (b == 0x7f)
    });
    if bad {
        return Err("control character in head");
    }
    Ok(line)
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn is_tchar(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'!' | b'#'..=b'\'' | b'*' | b'+'
        | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

impl<I: AsyncRead + Unpin> AsyncRead for H1Guard<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.state {
            State::Rejected(_) => {
                this.emit_poison(buf);
                return Poll::Ready(Ok(()));
            }
            // Nothing is read while waiting: the held bytes stay bounded by one read.
            State::AwaitSwitch => ready!(this.poll_switch(cx)),
            _ => {}
        }
        if !this.held.is_empty() {
            this.deliver_held(buf);
            return Poll::Ready(Ok(()));
        }
        if let State::Passthrough = this.state {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let fresh = buf.filled_mut().get_mut(before..).unwrap_or_default();
        let keep = this.feed(fresh);
        this.forget_stale_report();
        if let State::AwaitSwitch = this.state {
            this.held
                .extend_from_slice(fresh.get(keep..).unwrap_or_default());
        }
        buf.set_filled(before + keep);
        if let State::Rejected(_) = this.state {
            this.emit_poison(buf);
        }
        Poll::Ready(Ok(()))
    }
}

impl<I> H1Guard<I> {
    /// Hands hyper bytes held back while a switch was pending: unchecked after a switch,
    /// through `feed` otherwise (they may end another candidate, and be held again).
    fn deliver_held(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.held.len().min(buf.remaining());
        let before = buf.filled().len();
        buf.put_slice(self.held.get(..n).unwrap_or_default());
        let keep = match self.state {
            State::Passthrough => n,
            _ => {
                let keep = self.feed(buf.filled_mut().get_mut(before..).unwrap_or_default());
                self.forget_stale_report();
                keep
            }
        };
        buf.set_filled(before + keep);
        match self.state {
            // Nothing after a rejected head is read, held bytes included.
            State::Rejected(_) => {
                self.held = BytesMut::new();
                self.emit_poison(buf);
            }
            _ => {
                self.held.advance(keep);
                if self.held.is_empty() {
                    // Give the buffer back: a kept-alive connection holds nothing between
                    // requests.
                    self.held = BytesMut::new();
                }
            }
        }
    }
}

crate::io::delegate_write!(H1Guard<I>, io, I: crate::io::AsyncWriteUnpin);

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_head: usize) -> H1Guard<()> {
        H1Guard::new((), max_head, Arc::default())
    }

    fn feed_all(input: &[u8], chunk: usize) -> (Vec<u8>, State) {
        let mut g = guard(64 * 1024);
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            let mut piece = piece.to_vec();
            let n = g.feed(&mut piece);
            out.extend_from_slice(&piece[..n]);
            if let State::Rejected(_) | State::AwaitSwitch = g.state {
                break;
            }
        }
        (out, g.state)
    }

    /// An `AsyncRead` that returns the given reads one by one, then EOF.
    struct Reads(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Reads {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut next) = self.0.pop_front() {
                let n = next.len().min(buf.remaining());
                buf.put_slice(&next[..n]);
                if n < next.len() {
                    self.0.push_front(next.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// A checking guard over `reads`, and its switch signal.
    fn guard_over(reads: &[&[u8]]) -> (H1Guard<Reads>, Arc<SwitchSignal>) {
        let signal = Arc::new(SwitchSignal::default());
        let reads = Reads(reads.iter().map(|r| r.to_vec()).collect());
        (H1Guard::new(reads, 64 * 1024, signal.clone()), signal)
    }

    /// One `poll_read` with room for `room` bytes: what hyper got, `None` when pending.
    fn read(g: &mut H1Guard<Reads>, room: usize) -> Option<Vec<u8>> {
        let mut storage = vec![0u8; room];
        let mut buf = ReadBuf::new(&mut storage);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(g).poll_read(&mut cx, &mut buf) {
            Poll::Ready(result) => {
                result.unwrap();
                Some(buf.filled().to_vec())
            }
            Poll::Pending => None,
        }
    }

    /// Everything hyper gets until EOF or a pending read, in reads of `room` bytes.
    fn read_all(g: &mut H1Guard<Reads>, room: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            match read(g, room) {
                Some(got) if !got.is_empty() => out.extend_from_slice(&got),
                _ => return out,
            }
        }
        panic!("no end after 10,000 reads");
    }

    #[test]
    fn good_pipelined_requests_pass_untouched() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
            GET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        for chunk in [1, 2, 7, 1000] {
            let (out, state) = feed_all(input, chunk);
            assert_eq!(out, input, "chunk {chunk}");
            assert_eq!(state, State::Head);
        }
    }

    #[test]
    fn smuggling_heads_are_poisoned() {
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-No-Host: a\r\n\r\n",
        ] {
            // 3: heads collected across reads; 4096: whole heads checked in place.
            for chunk in [3, 4096] {
                let (out, state) = feed_all(bad, chunk);
                assert_eq!(state, State::Rejected(0), "{:?}", String::from_utf8_lossy(bad));
                assert_eq!(out.len(), bad.len());
                assert_eq!(out.last(), Some(&0));
            }
        }
    }

    #[test]
    fn leading_empty_lines_and_split_terminators() {
        let input = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        for chunk in 1..input.len() {
            let mut g = guard(64 * 1024);
            let (first, second) = input.split_at(chunk);
            for piece in [first, second] {
                let mut piece = piece.to_vec();
                assert_eq!(g.feed(&mut piece), piece.len(), "split at {chunk}");
            }
            assert_eq!(g.state, State::Head, "split at {chunk}");
            assert!(g.head.is_empty(), "split at {chunk}");
        }
    }

    #[test]
    fn oversized_heads_are_left_to_hyper() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for (max_head, state) in [
            (head.len() - 2, State::Passthrough),
            (head.len() - 1, State::Head),
        ] {
            for chunk in [1, head.len()] {
                let mut g = guard(max_head);
                for piece in head.chunks(chunk) {
                    let mut piece = piece.to_vec();
                    assert_eq!(g.feed(&mut piece), piece.len());
                }
                assert_eq!(g.state, state, "max_head {max_head}, chunk {chunk}");
            }
        }
    }

    /// Found with the `http1_server` fuzz target: chunked framing that hyper accepts but
    /// the guard could not follow (17-digit sizes, odd extensions) or ended
    /// elsewhere than hyper (a bare LF after the last chunk, which hyper reads as the start
    /// of a trailer line) turned the checks off, and the next request went unchecked.
    #[test]
    fn chunked_framing_ends_where_hyper_ends_it() {
        let smuggled = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
        for body in [
            &b"00000000000000000005\r\nhello\r\n0\r\n\r\n"[..],
            b"5;ext=\"\xff\"\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-T: 1\r\nX-U: \n2\r\n\r\n",
        ] {
            let mut input =
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(body);
            for chunk in [1, 5, 1000] {
                let (_, state) = feed_all(&input, chunk);
                assert_eq!(state, State::Head, "{:?}", String::from_utf8_lossy(body));
            }
            input.extend_from_slice(smuggled);
            let (out, state) = feed_all(&input, 7);
            assert_eq!(
                state,
                State::Rejected(0),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(out.len(), input.len());
        }
        // hyper reads this "\nX: 1\r\nContent-Length: 36\r\n" as trailers; taking the bare
        // LF as the end of the message made the guard skip the next request as a body.
        let mut input = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            0\r\n\nX: 1\r\nContent-Length: 36\r\n\r\n"
            .to_vec();
        input.extend_from_slice(smuggled);
        let (_, state) = feed_all(&input, 3);
        assert_eq!(state, State::Rejected(0));
    }

    #[test]
    fn control_character_in_a_chunk_extension_ends_the_input() {
        let input = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;e\0x\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\nHost: a\n\n";
        for chunk in [1, 3, 1000] {
            let (out, state) = feed_all(input, chunk);
            assert_eq!(state, State::Rejected(POISON_TAIL.len()), "chunk {chunk}");
            assert!(out.ends_with(b"5;e\0"), "chunk {chunk}: {out:?}");
        }
    }

    #[test]
    fn only_the_preface_stops_checking() {
        assert_eq!(
            check_head(b"PRI * HTTP/2.0\r\n\r\n").map(|c| c.framing),
            Ok(Framing::Stop)
        );
        let (_, state) = feed_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0", 4);
        assert_eq!(state, State::Passthrough);
        for (head, framing) in [
            (
                &b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
                    [..],
                Framing::None,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nupgrade: x\r\nContent-Length: 3\r\n\r\n",
                Framing::Length(3),
            ),
            (
                b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Chunked,
            ),
        ] {
            let checked = check_head(head);
            assert_eq!(
                checked,
                Ok(Checked {
                    framing,
                    upgrade: true
                })
            );
        }
        // Not candidates: the method is case-sensitive (hyper's too), and only the
        // `Upgrade` field counts.
        for head in [
            &b"connect a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nX-Upgrade: x\r\n\r\n",
        ] {
            assert_eq!(check_head(head).map(|c| c.upgrade), Ok(false));
        }
        // A candidate is still checked itself.
        for bad in [
            &b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"[..],
            b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(check_head(bad).is_err());
        }
    }

    /// Issue 14 item 2: an upgrade candidate's body is followed like any other (hyper
    /// frames it), and the guard waits at the body's end, not at the head's: body bytes
    /// that look like a bad head are body, not a head.
    #[test]
    fn upgrade_request_bodies_are_followed_to_their_end() {
        let next = b"GET / HTTP/1.1\nHost: a\n\n";
        for request in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\nContent-Length: 16\r\n\r\n\
               GET / HTTP/1.1\n\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              10\r\nGET / HTTP/1.1\n\n\r\n0\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 2\r\n\r\nhi",
            b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n",
        ] {
            let input = [request, &next[..]].concat();
            for chunk in [1, 3, 7, 1000] {
                let (out, state) = feed_all(&input, chunk);
                let name = String::from_utf8_lossy(request);
                assert_eq!(state, State::AwaitSwitch, "{name}, chunk {chunk}");
                assert_eq!(out, request, "{name}, chunk {chunk}");
            }
        }
    }

    /// Issue 14 item 2: bytes pipelined behind an upgrade candidate are held until the
    /// server reports its response; without a switch they go through the checks (a bad
    /// head is poisoned, a good one passes), with one they pass untouched.
    #[test]
    fn held_bytes_are_checked_unless_the_protocol_switched() {
        let candidate = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
        let bad = b"GET /x HTTP/1.1\nHost: a\n\n";
        let good = b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n";
        let read1 = [&candidate[..], &bad[..]].concat();

        let (mut g, signal) = guard_over(&[&read1]);
        assert_eq!(read(&mut g, 4096).unwrap(), candidate);
        assert_eq!(
            read(&mut g, 4096),
            None,
            "hyper gets nothing before the status"
        );
        assert_eq!(read(&mut g, 4096), None);
        signal.report(false);
        let poisoned = read_all(&mut g, 4096);
        assert_eq!(poisoned.len(), bad.len() + POISON_TAIL.len());
        assert!(poisoned.starts_with(&bad[..bad.len() - 1]));
        assert!(poisoned.ends_with(b"\0\r\n\r\n"));
        assert_eq!(g.state, State::Rejected(POISON_TAIL.len()));
        assert!(g.held.is_empty());

        let read1 = [&candidate[..], &good[..]].concat();
        let (mut g, signal) = guard_over(&[&read1, bad]);
        assert_eq!(read(&mut g, 4096).unwrap(), candidate);
        signal.report(false);
        assert_eq!(read(&mut g, 4096).unwrap(), good);
        assert_eq!(g.state, State::Head);
        assert!(
            read_all(&mut g, 4096).ends_with(b"\0\r\n\r\n"),
            "the next read is checked"
        );

        let (mut g, signal) = guard_over(&[&read1, bad]);
        assert_eq!(read(&mut g, 4096).unwrap(), candidate);
        signal.report(true);
        assert_eq!(read_all(&mut g, 4096), [&good[..], &bad[..]].concat());
        assert_eq!(g.state, State::Passthrough);
    }

    /// Held bytes larger than hyper's buffer are handed on across several reads, and may
    /// hold a second candidate (held again) and a report that came early: the service
    /// answered before the candidate's body was read.
    #[test]
    fn held_bytes_split_across_reads() {
        let first = b"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\nContent-Length: 5\r\n\r\nhello";
        let good = b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n";
        let second = b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n";
        let bad = b"POST /z HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n";
        let input = [&first[..], good, second, bad].concat();
        for room in [1, 2, 7, 64] {
            let (mut g, signal) = guard_over(&[&input]);
            // The head and part of the body; the service answers before the rest is read.
            let mut got = read(&mut g, first.len() - 3).unwrap();
            assert_eq!(g.state, State::Body(3));
            signal.report(false);
            // The body's end, in one read with everything after it: that is held.
            got.extend(read(&mut g, 4096).unwrap());
            assert_eq!(got, first, "room {room}");
            assert_eq!(g.held.len(), input.len() - first.len());
            // Held bytes in reads of `room` bytes, up to the end of the second candidate.
            assert_eq!(
                read_all(&mut g, room),
                [&good[..], second].concat(),
                "room {room}"
            );
            assert_eq!(g.state, State::AwaitSwitch, "room {room}");
            assert_eq!(read(&mut g, room), None, "room {room}");
            signal.report(false);
            let rest = read_all(&mut g, room);
            assert_eq!(rest.len(), bad.len() + POISON_TAIL.len(), "room {room}");
            assert!(rest.ends_with(b"\0\r\n\r\n"), "room {room}");
            assert!(g.held.is_empty(), "room {room}");
        }
    }

    /// A report left in the signal when a new candidate's head goes to hyper cannot be
    /// that request's (hyper has not seen it yet); it is dropped, so the guard waits for
    /// the real one.
    #[test]
    fn a_stale_report_is_not_taken_for_the_next_candidate() {
        let candidate = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
        let (mut g, signal) = guard_over(&[candidate, b"GET / HTTP/1.1\nHost: a\n\n"]);
        signal.report(true);
        assert_eq!(read(&mut g, 4096).unwrap(), candidate);
        assert_eq!(read(&mut g, 4096), None, "the stale `true` was dropped");
        signal.report(false);
        assert!(read_all(&mut g, 4096).ends_with(b"\0\r\n\r\n"));
    }
}
