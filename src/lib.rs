//! # proxystack
//!
//! Composable [`tower`] layers for building proxies, one per **termination level**.
//!
//! A proxy is best described by what it terminates. proxystack gives each level its own
//! layer or connector, so a proxy is a stack of exactly the levels it needs:
//!
//! ```text
//!  level            inbound (accepting) side            outbound (connecting) side
//!  ───────────────  ──────────────────────────────────  ────────────────────────────
//!  HTTP/1 + HTTP/2  http::HttpServer, http::Forward     (pooled inside http::Forward)
//!  detection        detect::DetectLayer, detect::Router
//!  PROXY protocol   proxy_protocol::ProxyProtocolLayer  proxy_protocol::ProxyProtocolConnector<C>
//!  TLS              tls::PeekLayer, tls::TerminateLayer tls::TlsConnector<C>
//!  TCP (L4)         serve(), tcp::Relay                 tcp::TcpConnector
//! ```
//!
//! Everything is a [`tower::Service`] of one of two shapes:
//!
//! * **inbound** — `Service<Conn<I>, Response = ()>` handles one accepted connection to the
//!   end; layers wrap such services and terminal services ([`tcp::Relay`]) end the chain;
//! * **outbound** — `Service<Target, Response = Conn<O>>` is a *connector*; connectors wrap
//!   connectors.
//!
//! A [`Conn`] is a byte stream plus typed **metadata** ([`http::Extensions`](::http::Extensions)): peer and local
//! address, original destination, SNI, peer identity… each layer reads and extends it.
//!
//! ## Example: a TCP relay
//!
//! ```no_run
//! use proxystack::{drain, serve, tcp, Conn, Target};
//! use tokio::net::TcpListener;
//!
//! # async fn run() -> std::io::Result<()> {
//! let relay = tcp::Relay::new(tcp::TcpConnector::new())
//!     .upstream(|_conn: &Conn<_>| Some(Target::from(([127, 0, 0, 1], 8080))));
//! let (signal, watch) = drain::channel();
//! let listener = TcpListener::bind("127.0.0.1:9000").await?;
//! let server = tokio::spawn(serve(listener, relay, watch));
//! tokio::signal::ctrl_c().await?;
//! signal.drain().await; // stop accepting, let live connections finish
//! # let _ = server.await;
//! # Ok(()) }
//! ```
//!
//! ## Cargo features
//!
//! | feature | level |
//! |---|---|
//! | `tcp` (default) | accept loop, relay, TCP connector, original destination |
//! | `detect` | protocol detection (TLS / HTTP/1 / HTTP/2 / opaque) and its router |
//! | `http` | HTTP/1 + HTTP/2 server, reverse-proxy forwarding with an upstream pool |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::todo)
)]

pub mod addr;
pub mod conn;
#[cfg(feature = "detect")]
#[cfg_attr(docsrs, doc(cfg(feature = "detect")))]
pub mod detect;
pub mod drain;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
#[cfg(feature = "tcp")]
pub mod serve;
#[cfg(feature = "tcp")]
#[cfg_attr(docsrs, doc(cfg(feature = "tcp")))]
pub mod tcp;

pub use addr::{Authority, AuthorityError, Host};
pub use conn::{BoxIo, Conn, Io, PrefixedIo, Target};
#[cfg(feature = "tcp")]
pub use serve::{serve, Server};

/// A type-erased error, as used at the boundaries between levels.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
