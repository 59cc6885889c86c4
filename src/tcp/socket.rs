//! Socket options that must reach the TCP socket under any stack of wrappers.

use crate::io::Io;

/// Makes the next close of the socket under `io` send a TCP RST instead of a FIN. `false`
/// when `io` runs on no TCP socket (an in-memory stream, an HTTP/2 tunnel stream).
pub(crate) fn arm_reset<I: Io + ?Sized>(io: &I) -> bool {
    match io.tcp_socket() {
        Some(tcp) => socket2::SockRef::from(tcp)
            .set_linger(Some(std::time::Duration::ZERO))
            .is_ok(),
        None => false,
    }
}
