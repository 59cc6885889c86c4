//! `SO_ORIGINAL_DST`: where a redirected connection was going.
//!
//! When iptables `REDIRECT` (or nftables `redirect`) sends a client's connection to the
//! proxy, the kernel remembers the address the client dialled; Linux exposes it through
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (IPv4) and `SOL_IPV6, IP6T_SO_ORIGINAL_DST`.
//! TPROXY needs no such call: the local address already is the original destination.

use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tokio::net::TcpStream;
use tower::{Layer, Service};

use crate::conn::{Conn, LocalAddr, OriginalDst};

use crate::io::Io;

/// Reads the original destination of a redirected TCP connection.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    original_dst_from(stream, stream.local_addr()?)
}

/// [`original_dst`] for a socket whose local address is already known (one syscall less).
fn original_dst_from(stream: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// Adds [`OriginalDst`] metadata to each connection whose socket has one.
///
/// Connections that were not redirected keep no `OriginalDst` (the kernel reports
/// `ENOENT`); the inner service decides what that means. Use with `tcp::Relay` to build a
/// transparent proxy:
///
/// ```
/// use proxystack::conn::Metadata;
/// use proxystack::{conn::OriginalDst, tcp, Conn, Target};
/// use tower::ServiceBuilder;
/// let svc = ServiceBuilder::new()
///     .layer(tcp::OriginalDstLayer::new())
///     .service(tcp::Relay::new(tcp::TcpConnector::new())
///         .upstream(|c: &Metadata| c.get::<OriginalDst>().map(Target::from)));
/// # let _: &tcp::OriginalDstService<_> = &svc;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct OriginalDstLayer(());

impl OriginalDstLayer {
    /// The layer.
    pub fn new() -> Self {
        Self(())
    }
}

impl<S> Layer<S> for OriginalDstLayer {
    type Service = OriginalDstService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        OriginalDstService { inner }
    }
}

/// The service made by [`OriginalDstLayer`].
#[derive(Debug, Clone)]
pub struct OriginalDstService<S> {
    inner: S,
}

impl<S, I> Service<Conn<I>> for OriginalDstService<S>
where
    S: Service<Conn<I>>,
    I: Io,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut conn: Conn<I>) -> Self::Future {
        // The accept loop recorded the local address; asking the socket again would cost
        // a syscall per connection.
        let known = conn.get::<LocalAddr>().map(|l| l.0);
        let found = conn.io().tcp_socket().map(|tcp| {
            let local = known.map_or_else(|| tcp.local_addr(), Ok)?;
            Ok::<_, io::Error>((original_dst_from(tcp, local)?, local))
        });
        match found {
            Some(Ok((dst, local))) => {
                // Without a REDIRECT rule Linux reports the local address itself; that is
                // not an *original* destination, and relaying to it would loop.
                if local != dst {
                    conn.insert(OriginalDst(dst));
                }
            }
            Some(Err(e)) => tracing::trace!(error = %e, "no original destination"),
            None => tracing::trace!("not a TCP socket: no original destination"),
        }
        self.inner.call(conn)
    }
}
