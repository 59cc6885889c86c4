//! The integration tests, one module per area, in one test binary: every module links the
//! shared helpers (`common`, `http_common`, `examples_common`) once instead of once per file,
//! which cuts build and link time. Each module gates itself on the features it needs
//! (`#![cfg(...)]` at its top), so `cargo test` with any feature set builds this binary.
//!
//! Run one area with a filter: `cargo test --all-features --test it hbone::`.
//! `tests/resources.rs` stays a binary of its own: it reads process-wide numbers
//! (`/proc/self/fd`, `VmRSS`, `RLIMIT_NOFILE`) that tests running beside it would disturb.

mod common;
#[cfg(unix)]
mod examples_common;
#[cfg(feature = "http")]
mod http_common;

mod bad_input_h2;
mod bad_input_http1;
mod bad_input_l4;
mod bad_input_tls;
mod connect;
mod detect;
mod drain;
mod examples;
mod examples_ca;
mod hbone;
mod http_proxy;
mod insertion;
mod istio_ca;
mod metrics;
mod panics;
mod proxy_protocol;
mod proxy_protocol_codec;
mod soak;
mod tcp_relay;
mod tcp_transparency;
mod tls;
mod tls_client_hello;
