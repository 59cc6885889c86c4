//! Finding the TCP socket under a stack of wrappers.

use tokio::net::TcpStream;

use crate::conn::{BoxIo, Conn, PrefixedIo};

/// The TCP socket at the bottom of `io`, if it is one of the wrappers this crate knows
/// (`BoxIo`, `PrefixedIo`, `Conn`, TLS streams). Used for socket options that must reach
/// the kernel socket: `SO_LINGER` for reset propagation, `SO_ORIGINAL_DST`.
pub fn find_tcp(io: &dyn std::any::Any) -> Option<&TcpStream> {
    if let Some(tcp) = io.downcast_ref::<TcpStream>() {
        return Some(tcp);
    }
    if let Some(boxed) = io.downcast_ref::<BoxIo>() {
        return find_tcp(boxed.inner());
    }
    if let Some(p) = io.downcast_ref::<PrefixedIo<TcpStream>>() {
        return Some(p.get_ref());
    }
    if let Some(p) = io.downcast_ref::<PrefixedIo<BoxIo>>() {
        return find_tcp(p.get_ref().inner());
    }
    if let Some(c) = io.downcast_ref::<Conn<TcpStream>>() {
        return Some(c.io());
    }
    if let Some(c) = io.downcast_ref::<Conn<BoxIo>>() {
        return find_tcp(c.io().inner());
    }
    #[cfg(feature = "tls")]
    {
        if let Some(t) = io.downcast_ref::<tokio_rustls::server::TlsStream<TcpStream>>() {
            return Some(t.get_ref().0);
        }
        if let Some(t) = io.downcast_ref::<tokio_rustls::server::TlsStream<BoxIo>>() {
            return find_tcp(t.get_ref().0.inner());
        }
        if let Some(t) = io.downcast_ref::<tokio_rustls::client::TlsStream<TcpStream>>() {
            return Some(t.get_ref().0);
        }
    }
    None
}

/// Makes the next close of the socket under `io` send a TCP RST instead of a FIN.
pub(crate) fn arm_reset(io: &dyn std::any::Any) -> bool {
    match find_tcp(io) {
        Some(tcp) => socket2::SockRef::from(tcp)
            .set_linger(Some(std::time::Duration::ZERO))
            .is_ok(),
        None => false,
    }
}
