//! The base outbound connector: `Target` → TCP connection.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tower::Service;
use tracing::debug;

use super::OwnListeners;
use crate::addr::Host;
use crate::admission::Refusal;
use crate::conn::{Conn, LocalAddr, PeerAddr};
use crate::Target;

/// Connects to a [`Target`] over TCP.
///
/// Names are resolved with the system resolver and tried in order until one connects;
/// the connect timeout covers resolution and all attempts.
///
/// ```
/// use proxystack::tcp::TcpConnector;
/// use std::time::Duration;
/// let connector = TcpConnector::new().connect_timeout(Duration::from_secs(2));
/// # let _ = connector;
/// ```
#[derive(Clone)]
pub struct TcpConnector {
    connect_timeout: Duration,
    nodelay: bool,
    keepalive: Option<Duration>,
    bind: Option<IpAddr>,
    transparent: bool,
    freebind: bool,
    mark: Option<u32>,
    allow: Option<AddressFilter>,
    own: Option<OwnListeners>,
}

/// Decides which resolved addresses may be dialled.
type AddressFilter = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

impl std::fmt::Debug for TcpConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConnector")
            .field("connect_timeout", &self.connect_timeout)
            .field("bind", &self.bind)
            .field("transparent", &self.transparent)
            .field("mark", &self.mark)
            .field("filtered", &self.allow.is_some())
            .field("own_listeners", &self.own)
            .finish_non_exhaustive()
    }
}

impl Default for TcpConnector {
    fn default() -> Self {
        Self::new()
    }
}

impl TcpConnector {
    /// Defaults: 10 s connect timeout, `TCP_NODELAY`, keepalive after 60 s idle.
    pub fn new() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            nodelay: true,
            keepalive: Some(Duration::from_secs(60)),
            bind: None,
            transparent: false,
            freebind: false,
            mark: None,
            allow: None,
            own: None,
        }
    }

    /// Time allowed for resolving and connecting.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets `TCP_NODELAY` (default on).
    pub fn tcp_nodelay(mut self, on: bool) -> Self {
        self.nodelay = on;
        self
    }

    /// TCP keepalive idle time (`None` disables it).
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.keepalive = idle;
        self
    }

    /// Binds outgoing connections to this source address (port chosen by the kernel).
    pub fn bind(mut self, source: IpAddr) -> Self {
        self.bind = Some(source);
        self
    }

    /// Sets `IP_TRANSPARENT` so [`bind`](Self::bind) may use an address this host does not
    /// own: the upstream sees the original client's IP. Needs `CAP_NET_ADMIN` and TPROXY
    /// routing for the return path.
    pub fn transparent(mut self, on: bool) -> Self {
        self.transparent = on;
        self
    }

    /// Sets `IP_FREEBIND` so [`bind`](Self::bind) may use an address not (yet) configured.
    pub fn freebind(mut self, on: bool) -> Self {
        self.freebind = on;
        self
    }

    /// Sets `SO_MARK` on outgoing sockets, so firewall rules can exempt the proxy's own
    /// connections from redirection (ztunnel uses mark `0x539` for this). Needs
    /// `CAP_NET_ADMIN`.
    pub fn mark(mut self, mark: Option<u32>) -> Self {
        self.mark = mark;
        self
    }

    /// Dials only addresses for which `allow` returns true. The check runs on the
    /// *resolved* addresses, right before each connect, so a name cannot smuggle a
    /// forbidden address past it (SSRF, DNS rebinding). `allow` sees an IPv4-mapped IPv6
    /// address (`[::ffff:127.0.0.1]`) as the IPv4 address the kernel will reach, so checks
    /// such as `is_loopback()` apply to it too. A target with no allowed address fails with
    /// [`ConnectErrorKind::Forbidden`] (a tunnel answers 403).
    pub fn allow_addresses(
        mut self,
        allow: impl Fn(SocketAddr) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.allow = Some(Arc::new(allow));
        self
    }

    /// Never dials one of these listeners, this process's own (see [`OwnListeners`]): a
    /// tunnel or relay to them would loop back into the proxy or reach its admin endpoint.
    /// Checked on every resolved address right before the connect, after the
    /// [`allow_addresses`](Self::allow_addresses) filter: an address the filter refuses
    /// fails with [`ConnectErrorKind::Forbidden`] (403) whether or not it is ours, a
    /// permitted one that is ours is skipped, and a target left with nothing to dial for
    /// that reason fails with [`ConnectErrorKind::Loop`] (a tunnel answers 503, a relay
    /// closes).
    pub fn own_listeners(mut self, own: OwnListeners) -> Self {
        self.own = Some(own);
        self
    }

    /// Connects to `target`.
    pub async fn connect(&self, target: &Target) -> Result<Conn<TcpStream>, ConnectError> {
        let err = |kind, source| ConnectError {
            target: target.to_string(),
            kind,
            source,
        };
        let attempt = async {
            let addrs: Vec<SocketAddr> = match target.authority().host() {
                Host::Ip(ip) => vec![SocketAddr::new(*ip, target.authority().port())],
                Host::Name(name) => {
                    tokio::net::lookup_host((name.as_str(), target.authority().port()))
                        .await
                        .map_err(|e| err(ConnectErrorKind::Resolve, e))?
                        .collect()
                }
            };
            let mut last = None;
            let allowed = self.dialable(addrs).map_err(|(kind, e)| err(kind, e))?;
            for addr in allowed {
                match self.connect_addr(addr).await {
                    Ok(stream) => return Ok((stream, addr)),
                    Err(e) => {
                        debug!(%addr, error = %e, "connect attempt failed");
                        last = Some(e);
                    }
                }
            }
            let e = last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "name resolved to no addresses")
            });
            Err(err(ConnectErrorKind::from_io(&e), e))
        };
        let (stream, dialled) = match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(err(
                    ConnectErrorKind::TimedOut,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {:?}", self.connect_timeout),
                    ),
                ))
            }
        };
        let mut conn = Conn::new(stream);
        if let Ok(local) = conn.io().local_addr() {
            conn.insert(LocalAddr(local));
        }
        // The address just dialled is the peer's: no getpeername(2) per connection.
        conn.insert(PeerAddr(dialled));
        Ok(conn)
    }

    /// The resolved addresses that may be dialled (the address filter, then our own
    /// listeners), or why none may.
    fn dialable(
        &self,
        addrs: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, (ConnectErrorKind, io::Error)> {
        let (permitted, denied): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| {
            // `[::ffff:127.0.0.1]` reaches 127.0.0.1, but `Ipv6Addr::is_loopback`
            // says no: judge the address the kernel will actually dial.
            let canonical = SocketAddr::new(a.ip().to_canonical(), a.port());
            self.allow.as_ref().is_none_or(|allow| allow(canonical))
        });
        let (ours, allowed): (Vec<_>, Vec<_>) = permitted
            .into_iter()
            .partition(|a| self.own.as_ref().is_some_and(|own| own.contains(*a)));
        if !allowed.is_empty() {
            return Ok(allowed);
        }
        if let Some(first) = ours.first() {
            let e = io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{first} is one of this proxy's own listeners"),
            );
            return Err((ConnectErrorKind::Loop, e));
        }
        if let Some(first) = denied.first() {
            let e = io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("address {first} is not allowed"),
            );
            return Err((ConnectErrorKind::Forbidden, e));
        }
        Ok(allowed)
    }

    async fn connect_addr(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(source) = self.bind {
            let sock = socket2::SockRef::from(&socket);
            match source {
                IpAddr::V4(_) => {
                    if self.transparent {
                        sock.set_ip_transparent_v4(true)?;
                    }
                    if self.freebind {
                        sock.set_freebind_v4(true)?;
                    }
                }
                IpAddr::V6(_) => {
                    if self.transparent {
                        sock.set_ip_transparent_v6(true)?;
                    }
                    if self.freebind {
                        sock.set_freebind_v6(true)?;
                    }
                }
            }
            socket.bind(SocketAddr::new(source, 0))?;
        }
        if let Some(mark) = self.mark {
            socket2::SockRef::from(&socket).set_mark(mark)?;
        }
        socket.set_nodelay(self.nodelay)?;
        if let Some(idle) = self.keepalive {
            let params = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(Duration::from_secs(10));
            socket2::SockRef::from(&socket).set_tcp_keepalive(&params)?;
        }
        socket.connect(addr).await
    }
}

impl Service<Target> for TcpConnector {
    type Response = Conn<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn<TcpStream>, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(&target).await })
    }
}

/// Why a TCP connect failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectErrorKind {
    /// The name did not resolve.
    Resolve,
    /// The target refused the connection (nothing listening, or a firewall reject).
    Refused,
    /// No route to the target.
    Unreachable,
    /// The connect timeout passed.
    TimedOut,
    /// Every address of the target is excluded by [`TcpConnector::allow_addresses`].
    Forbidden,
    /// Every permitted address of the target is one of this process's own listeners
    /// ([`TcpConnector::own_listeners`]): dialling it would loop back into the proxy.
    Loop,
    /// Another local error (e.g. binding the source address).
    Other,
}

impl ConnectErrorKind {
    fn from_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => Self::Refused,
            io::ErrorKind::TimedOut => Self::TimedOut,
            io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NotFound => Self::Unreachable,
            _ => Self::Other,
        }
    }
}

/// A failed connect, with the target it was for.
#[derive(Debug, thiserror::Error)]
#[error("{} {}", .kind.action(), .target)]
pub struct ConnectError {
    target: String,
    kind: ConnectErrorKind,
    #[source]
    source: io::Error,
}

impl ConnectError {
    /// What went wrong.
    pub fn kind(&self) -> ConnectErrorKind {
        self.kind
    }

    /// Whether another attempt (e.g. to another endpoint) could succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self.kind,
            ConnectErrorKind::Other | ConnectErrorKind::Forbidden | ConnectErrorKind::Loop
        )
    }

    /// The answer a tunnel terminator should give for this failure.
    pub fn refusal(&self) -> Refusal {
        match self.kind {
            ConnectErrorKind::Refused => Refusal::Refused,
            ConnectErrorKind::TimedOut => Refusal::TimedOut,
            ConnectErrorKind::Forbidden => Refusal::Denied,
            ConnectErrorKind::Loop => Refusal::Loop,
            ConnectErrorKind::Resolve | ConnectErrorKind::Unreachable | ConnectErrorKind::Other => {
                Refusal::Unreachable
            }
        }
    }
}

impl ConnectErrorKind {
    fn action(self) -> &'static str {
        match self {
            ConnectErrorKind::Resolve => "could not resolve",
            ConnectErrorKind::Refused => "connection refused by",
            ConnectErrorKind::Unreachable => "cannot reach",
            ConnectErrorKind::TimedOut => "timed out connecting to",
            ConnectErrorKind::Forbidden => "not allowed to connect to",
            ConnectErrorKind::Loop => "refusing to connect to this proxy's own listener",
            ConnectErrorKind::Other => "failed to connect to",
        }
    }
}
