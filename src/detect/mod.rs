//! Protocol detection: is this connection TLS, HTTP/1, HTTP/2 (prior knowledge) or
//! something else? Decided from its first bytes, which are then replayed.
//!
//! Level: between L4 and the first terminating level. [`DetectLayer`] reads into a bounded
//! buffer until [`classify`] can decide (possibly over several reads: a 3-byte first segment
//! is never guessed at), records the [`Protocol`] as connection metadata and hands its inner
//! service a [`Conn<BoxIo>`] wrapping a [`PrefixedIo`] that replays every byte read.
//! [`Router`] then sends each protocol to its own service; as a [`RouterLayer`] it sends
//! the decided protocols it has no route for on to the layered service.
//!
//! What it recognises:
//! * TLS: a handshake record header (`0x16 0x03 0x00..=0x04`, RFC 8446 §5.1);
//! * HTTP/2 with prior knowledge: the 24-byte client preface (RFC 9113 §3.4);
//! * HTTP/1: a well-formed request line, `token SP target SP "HTTP/1."` (RFC 9112 §3),
//!   after at most a few empty lines (RFC 9112 §2.2);
//! * [`Protocol::Opaque`]: bytes that cannot begin any of these (binary data, a word alone
//!   on a line such as an SSH banner);
//! * [`Protocol::Undecided`]: everything detection could not decide, with the reason as
//!   [`Undecided`] metadata — silence until the timeout, a prefix cut short by the timeout
//!   or EOF, and text that resembles an HTTP/1 request but breaks its grammar (`GET  /`,
//!   `http/1.1`, a 40-byte method, a tab for a space, more than 8 empty lines first).
//!
//! **Fail closed.** "Not recognised" is not "safe to relay": a lenient backend may still
//! read a malformed request as HTTP, so a proxy that applies HTTP policy must not relay an
//! undecided connection past that policy. [`Router`] therefore refuses
//! [`Protocol::Undecided`] unless a route is registered for it ([`Router::undecided`]),
//! answering `400` where the client was attempting HTTP/1, and counts every refusal
//! ([`RouterStats`]). Where a port serves *only* HTTP (a service with L7 rules), register
//! no other route at all, and give detection as long as the HTTP server's head timeout.
//!
//! **Server-first protocols** (SMTP, MySQL, SSH servers…) send nothing from the client until
//! the server greets it. Waiting for client bytes would hang them forever (envoy#21044), so
//! detection gives up after [`DetectLayer::timeout`] (default **1 s**) and calls the
//! connection [`Protocol::Undecided`] ([`Undecided::Silent`]); a relay that should carry
//! them is registered with [`Router::undecided`]. One second is far more than any
//! client-first protocol needs to send its first bytes after the TCP handshake, and short
//! enough that a server-first protocol only pays it once per connection; set a shorter
//! timeout on ports where such protocols are common, or `None` where every client speaks
//! first.
//!
//! Not here: TLS ClientHello parsing (SNI/ALPN, see the TLS level), HTTP/2 over TLS (ALPN
//! decides that, after TLS is terminated), and protocol *upgrades* (`Upgrade: h2c`), which
//! the HTTP level handles.
//!
//! [`Conn<BoxIo>`]: crate::Conn
//! [`PrefixedIo`]: crate::PrefixedIo

mod classify;
mod layer;
mod router;

/// For the fuzz targets (`cargo fuzz` builds with `--cfg fuzzing`); not part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub use classify::{check_rechunking, fuzz_one};
pub use classify::{classify, Protocol, Undecided, Verdict, H2_PREFACE};
pub use layer::{DetectError, DetectLayer, DetectService};
pub use router::{Router, RouterError, RouterLayer, RouterStats};
