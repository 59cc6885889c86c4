//! Reading a connection's first bytes to decide what it is, then replaying them.
//!
//! Level: below every terminating level. TLS peeking (ClientHello), PROXY protocol
//! headers, protocol detection and the HTTP/2 preface check all do the same thing: read a
//! bounded prefix under a deadline, ask a parser after every read whether it can decide,
//! and hand on a stream that replays every byte read. [`sniff`] is that loop, written
//! once: the limits on bytes and time, what end-of-stream means, and the replay are the
//! same for all of them. A [`Sniffer`] is only the decision.
//!
//! The loop never reads past [`SniffLimits::max_bytes`] (what a read brings beyond the
//! decision stays in the stream, replayed), never waits past the deadline, and stops at
//! the first verdict: a client dripping one byte at a time gets exactly as much time as
//! one sending everything at once.
//!
//! Not here: what to do with the verdict (route, refuse, fall back). That belongs to the
//! layer that sniffs.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::io::{Io, PrefixedIo};

/// The HTTP/2 connection preface a client sends first (RFC 9113 §3.4): what protocol
/// detection and the HTTP servers look for.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A sniffer's answer after a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<T, E> {
    /// Decided: the bytes are this.
    Match(T),
    /// The bytes are malformed for what this sniffer expects; no more bytes will help.
    Reject(E),
    /// Consistent with more than one answer: read more.
    NeedMore,
}

/// The end of sniffing: a verdict, or why no verdict came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T, E> {
    /// Decided: the bytes are this.
    Match(T),
    /// The bytes are malformed for what the sniffer expects.
    Reject(E),
    /// No verdict: no more bytes came in time, the client closed, or the buffer filled.
    Undecided(Stop),
}

/// Why no more bytes will come before a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stop {
    /// The deadline passed.
    Timeout,
    /// The client closed its side.
    Eof,
    /// [`SniffLimits::max_bytes`] were read.
    Full,
}

/// Decides what a connection is from its first bytes. Kept free of I/O so it can be
/// fuzzed and property-tested on its own.
pub trait Sniffer {
    /// What a match says.
    type Output;
    /// Why the bytes were rejected.
    type Error;

    /// Called after every read with **all** bytes seen so far (a parser that consumes
    /// bytes incrementally remembers how many it has had).
    fn push(&mut self, seen: &[u8]) -> Step<Self::Output, Self::Error>;

    /// Called once when no more bytes will come, with all bytes seen (possibly none):
    /// the last chance to decide. The default decides nothing.
    fn finish(&mut self, seen: &[u8], stop: Stop) -> Outcome<Self::Output, Self::Error> {
        let _ = seen;
        Outcome::Undecided(stop)
    }
}

/// How much and how long [`sniff`] may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SniffLimits {
    /// Most bytes read before the sniffer must decide.
    pub max_bytes: usize,
    /// How long from the start of sniffing; `None` waits as long as it takes.
    pub timeout: Option<Duration>,
}

impl SniffLimits {
    /// At most `max_bytes`, within `timeout`.
    pub fn new(max_bytes: usize, timeout: Option<Duration>) -> Self {
        Self { max_bytes, timeout }
    }
}

/// Reads `io` until `sniffer` decides or the limits are reached; returns the outcome and
/// the stream with every byte read put back in front.
///
/// Only read errors are errors; a timeout, an early close or a full buffer are outcomes
/// ([`Outcome::Undecided`], unless the sniffer's [`finish`](Sniffer::finish) decides).
///
/// ```
/// use proxystack::sniff::{sniff, Outcome, SniffLimits, Sniffer, Step};
/// use tokio::io::AsyncReadExt;
///
/// /// Matches a connection that starts with `PING`.
/// struct Ping;
/// impl Sniffer for Ping {
///     type Output = ();
///     type Error = ();
///     fn push(&mut self, seen: &[u8]) -> Step<(), ()> {
///         match seen.len() {
///             n if n < 4 => if b"PING".starts_with(seen) { Step::NeedMore } else { Step::Reject(()) },
///             _ => if seen.starts_with(b"PING") { Step::Match(()) } else { Step::Reject(()) },
///         }
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let (mut client, server) = tokio::io::duplex(64);
/// tokio::io::AsyncWriteExt::write_all(&mut client, b"PING\r\n").await.unwrap();
/// drop(client);
/// let (outcome, mut replay) = sniff(server, &mut Ping, SniffLimits::new(64, None)).await.unwrap();
/// assert_eq!(outcome, Outcome::Match(()));
/// let mut all = Vec::new();
/// replay.read_to_end(&mut all).await.unwrap();
/// assert_eq!(all, b"PING\r\n"); // nothing lost
/// # });
/// ```
pub async fn sniff<I: Io, S: Sniffer>(
    mut io: I,
    sniffer: &mut S,
    limits: SniffLimits,
) -> io::Result<(Outcome<S::Output, S::Error>, PrefixedIo<I>)> {
    let mut seen = BytesMut::with_capacity(limits.max_bytes.min(1024));
    let deadline = limits.timeout.map(|t| Instant::now() + t);
    let outcome = loop {
        if seen.len() >= limits.max_bytes {
            break sniffer.finish(&seen, Stop::Full);
        }
        // Never read past the limit: the rest stays in the socket for whoever comes next.
        let room = limits.max_bytes - seen.len();
        seen.reserve(room.min(4096));
        let mut limited = (&mut io).take(room as u64);
        let read = limited.read_buf(&mut seen);
        let n = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                Ok(n) => n?,
                Err(_) => break sniffer.finish(&seen, Stop::Timeout),
            },
            None => read.await?,
        };
        if n == 0 {
            break sniffer.finish(&seen, Stop::Eof);
        }
        match sniffer.push(&seen) {
            Step::Match(value) => break Outcome::Match(value),
            Step::Reject(error) => break Outcome::Reject(error),
            Step::NeedMore => {}
        }
    };
    Ok((outcome, PrefixedIo::new(seen.freeze(), io)))
}

/// Reads until the bytes either are the HTTP/2 preface or cannot be; returns the stream with
/// those bytes put back and whether it speaks HTTP/2. `None`: closed before sending a byte.
/// Bounded by `limit` (the server's request-head timeout, `TimedOut` past it), so a client
/// that sends nothing, or stops inside the preface, cannot hold a connection forever.
#[cfg(any(feature = "http", feature = "connect"))]
pub(crate) async fn sniff_h2_preface<I: crate::Io>(
    io: I,
    limit: std::time::Duration,
) -> std::io::Result<Option<(crate::PrefixedIo<I>, bool)>> {
    use crate::sniff::{sniff, Outcome, SniffLimits, Step, Stop, H2_PREFACE};

    /// Decides at the first byte that leaves the preface, or at its last byte.
    struct Preface;
    impl crate::sniff::Sniffer for Preface {
        type Output = bool;
        type Error = std::convert::Infallible;
        fn push(&mut self, seen: &[u8]) -> Step<bool, Self::Error> {
            if seen.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(seen) {
                Step::Match(seen.starts_with(H2_PREFACE))
            } else {
                Step::NeedMore
            }
        }
        fn finish(&mut self, seen: &[u8], stop: Stop) -> Outcome<bool, Self::Error> {
            match stop {
                Stop::Eof if !seen.is_empty() => Outcome::Match(false),
                _ => Outcome::Undecided(stop),
            }
        }
    }

    let limits = SniffLimits::new(H2_PREFACE.len(), Some(limit));
    match sniff(io, &mut Preface, limits).await? {
        (Outcome::Match(is_h2), io) => Ok(Some((io, is_h2))),
        (Outcome::Reject(never), _) => match never {},
        (Outcome::Undecided(Stop::Eof), _) => Ok(None),
        (Outcome::Undecided(_), _) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no request on the connection in time",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Matches `HELLO`, rejects anything else; at the end decides nothing.
    struct Hello;
    impl Sniffer for Hello {
        type Output = usize;
        type Error = ();
        fn push(&mut self, seen: &[u8]) -> Step<usize, ()> {
            if seen.starts_with(b"HELLO") {
                Step::Match(seen.len())
            } else if b"HELLO".starts_with(seen) {
                Step::NeedMore
            } else {
                Step::Reject(())
            }
        }
    }

    async fn replayed(io: PrefixedIo<tokio::io::DuplexStream>) -> Vec<u8> {
        let (prefix, _) = io.into_parts();
        prefix.to_vec()
    }

    #[tokio::test]
    async fn one_byte_at_a_time_matches_and_keeps_every_byte() {
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for b in b"HELLO world" {
                client.write_all(&[*b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let limits = SniffLimits::new(64, Some(Duration::from_secs(5)));
        let (outcome, io) = sniff(server, &mut Hello, limits).await.unwrap();
        assert!(matches!(outcome, Outcome::Match(5..)));
        let (prefix, mut rest) = io.into_parts();
        drop(writer.await.unwrap());
        let mut tail = Vec::new();
        rest.read_to_end(&mut tail).await.unwrap();
        assert_eq!(
            [&prefix[..], &tail].concat(),
            b"HELLO world",
            "every byte, in order"
        );
    }

    #[tokio::test]
    async fn stops_are_outcomes_not_errors() {
        // Timeout.
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"HEL").await.unwrap();
        let limits = SniffLimits::new(64, Some(Duration::from_millis(50)));
        let (outcome, io) = sniff(server, &mut Hello, limits).await.unwrap();
        assert_eq!(outcome, Outcome::Undecided(Stop::Timeout));
        assert_eq!(replayed(io).await, b"HEL");
        // EOF before a byte.
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let (outcome, _) = sniff(server, &mut Hello, limits).await.unwrap();
        assert_eq!(outcome, Outcome::Undecided(Stop::Eof));
        // Full: never reads past the limit, the rest stays in the stream.
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"HELLO").await.unwrap();
        let (outcome, io) = sniff(server, &mut Hello, SniffLimits::new(3, None))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Undecided(Stop::Full));
        let (prefix, mut rest) = io.into_parts();
        assert_eq!(&prefix[..], b"HEL");
        let mut tail = [0u8; 2];
        rest.read_exact(&mut tail).await.unwrap();
        assert_eq!(&tail, b"LO");
        // Reject.
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"HEX").await.unwrap();
        let (outcome, _) = sniff(server, &mut Hello, limits).await.unwrap();
        assert_eq!(outcome, Outcome::Reject(()));
    }
}
