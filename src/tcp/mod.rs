//! L4: TCP relay, TCP connector, original destination.
//!
//! * [`relay`] copies bytes both ways between two streams with half-close, reset
//!   propagation, idle/total timeouts and adaptive buffers, and reports [`RelayStats`].
//! * [`Relay`] is the terminal inbound service built on it: pick an upstream [`Target`]
//!   from the connection's metadata, connect with any connector, relay.
//! * [`TcpConnector`] is the outbound base: connect timeout, socket options, transparent
//!   source binding (`IP_TRANSPARENT`/`IP_FREEBIND`), and the checks on what it may dial:
//!   an address filter, and never one of the process's [`OwnListeners`] (on any address
//!   of this host, [`HostAddresses`]).
//! * [`OriginalDstLayer`] records `SO_ORIGINAL_DST` (iptables `REDIRECT`) as
//!   [`OriginalDst`](crate::conn::OriginalDst) metadata.
//!
//! Not here: UDP, and SOCKS (not yet).
//!
//! [`Target`]: crate::Target

mod connector;
mod original_dst;
mod own;
mod relay;
mod service;
mod socket;
pub(crate) use socket::arm_reset;
#[cfg(target_os = "linux")]
mod splice;

pub use connector::{ConnectError, ConnectErrorKind, TcpConnector};
pub use original_dst::{original_dst, OriginalDstLayer, OriginalDstService};
pub use own::{HostAddresses, OwnListeners};
pub use relay::{relay, relay_with, Close, CloseKind, RelayConfig, RelayError, RelayStats, Side};
pub use service::{Relay, RelayServiceError};
