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
//!  HBONE            hbone::InboundLayer                 hbone::Connector (pooled mTLS + H2 CONNECT)
//!  CONNECT          connect::ConnectTerminateLayer      connect::H2ConnectPool<C>,
//!                                                       connect::Http1ConnectConnector<C>
//!  HTTP/1 + HTTP/2  http::HttpServer, http::Forward     (pooled inside http::Forward)
//!  detection        detect::DetectLayer, detect::RouterLayer
//!  PROXY protocol   proxy_protocol::ProxyProtocolLayer  proxy_protocol::ProxyProtocolConnector<C>
//!  TLS              tls::PeekLayer, tls::TerminateLayer tls::TlsConnector<C>
//!  TCP (L4)         serve(), tcp::Relay                 tcp::TcpConnector
//!  glue             steer::SteerLayer, recursive::Recursive
//! ```
//!
//! A terminated tunnel is a new [`Conn`] that re-enters an inbound service — usually the
//! same graph (see [`recursive::Recursive`]) — so tunnels nest to any (bounded) depth.
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
//! use proxystack::drain::ShutdownSignal;
//! use proxystack::{tcp, Server, Target};
//! use tokio::net::TcpListener;
//!
//! # async fn run() -> std::io::Result<()> {
//! let relay = tcp::Relay::new(tcp::TcpConnector::new()).to(Target::from(([127, 0, 0, 1], 8080)));
//! let listeners = vec![TcpListener::bind("127.0.0.1:9000").await?];
//! let shutdown = ShutdownSignal::install()?;
//! // Serve until SIGTERM or Ctrl-C, then stop accepting and let live connections finish.
//! Server::new().serve_until(listeners, relay, shutdown.recv()).await
//! # }
//! ```
//!
//! ## Logging
//!
//! Every level reports through [`tracing`](https://docs.rs/tracing): a span per connection,
//! events for refusals and failures (upstream connect failures at WARN, rate-limited; bad
//! client input at DEBUG or INFO, so an attacker cannot flood the log). Nothing is printed
//! until the application installs a subscriber, e.g. `tracing_subscriber::fmt().init()`.
//!
//! ## Cargo features
//!
//! | feature | level |
//! |---|---|
//! | `tcp` (default) | accept loop, relay, TCP connector, original destination |
//! | `tls` | ClientHello peek, TLS terminate and originate, SPIFFE identities (rustls) |
//! | `demo-certs` | an in-memory CA for examples and tests (rcgen) |
//! | `connect` | CONNECT over HTTP/1.1 and HTTP/2: terminate, originate, pooled H2 CONNECT |
//! | `hbone` | Istio ambient HBONE (mTLS + HTTP/2 CONNECT), composed from the levels above |
//! | `proxy-protocol` | PROXY protocol v1/v2: codec (incl. ztunnel's `0xD0`/`0xD1` TLVs), inbound layer with trusted sources, v2 connector |
//! | `detect` | protocol detection (TLS / HTTP/1 / HTTP/2 / opaque) and its router |
//! | `http` | HTTP/1 + HTTP/2 server, reverse-proxy forwarding with an upstream pool |
//! | `istio-ca` | Istio CA client: obtain and renew a SPIFFE workload certificate over gRPC (tonic + prost) |
//! | `metrics` | metrics (Prometheus / OpenMetrics via `prometheus-client`, Istio's standard metrics) and access-log layers |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::todo,
        clippy::indexing_slicing
    )
)]

pub mod addr;
pub mod admission;
mod cidr;
pub mod conn;
#[cfg(feature = "connect")]
#[cfg_attr(docsrs, doc(cfg(feature = "connect")))]
pub mod connect;
#[cfg(feature = "detect")]
#[cfg_attr(docsrs, doc(cfg(feature = "detect")))]
pub mod detect;
pub mod drain;
#[cfg(feature = "tcp")]
mod error_chain;
#[cfg(any(feature = "http", feature = "connect"))]
mod h2_config;
#[cfg(feature = "hbone")]
#[cfg_attr(docsrs, doc(cfg(feature = "hbone")))]
pub mod hbone;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod identity;
pub mod io;
#[cfg(feature = "istio-ca")]
#[cfg_attr(docsrs, doc(cfg(feature = "istio-ca")))]
pub mod istio_ca;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(feature = "proxy-protocol")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
pub mod proxy_protocol;
pub mod recursive;
#[cfg(feature = "tcp")]
pub mod serve;
pub mod sniff;
pub mod steer;
#[cfg(feature = "tcp")]
mod task;
#[cfg(feature = "tcp")]
#[cfg_attr(docsrs, doc(cfg(feature = "tcp")))]
pub mod tcp;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub mod tls;

pub use addr::{Authority, AuthorityError, Host};
pub use conn::{Conn, Metadata, Target};
#[cfg(any(feature = "http", feature = "connect"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "http", feature = "connect"))))]
pub use h2_config::H2Config;
pub use io::{BoxIo, Io, PrefixedIo};
#[cfg(feature = "tcp")]
pub use serve::{serve, Server};

/// A type-erased error, as used at the boundaries between levels.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The README's code blocks, compiled as doctests so they cannot rot.
#[cfg(all(doctest, feature = "tcp"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The cookbook's recipes, compiled as doctests (each gated on the features it uses).
#[cfg(all(doctest, feature = "tcp"))]
#[doc = include_str!("../docs/cookbook.md")]
pub struct CookbookDoctests;
