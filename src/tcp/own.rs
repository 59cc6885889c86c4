//! The proxy's own listeners and this host's addresses: destinations a tunnel must never
//! reach.
//!
//! A tunnel (CONNECT, HBONE, a redirected connection) whose destination is one of the
//! proxy's own listeners is a "recursive call to ourselves" (ztunnel's words): at best a
//! loop that burns a connection per hop, at worst a way around the proxy's own checks, or
//! a window onto its admin endpoint (`/metrics`). A listener answers on every address of
//! the host it is bound to (`0.0.0.0` and `[::]` on all of them, and the kernel routes
//! `127.x`, `0.0.0.0` and the host's interface addresses to itself), so "ours" must be
//! judged by port *and* by "is this address this host", not by the listener's own address
//! alone.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tracing::warn;

/// How long a read of the interface addresses is trusted before it is read again.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(1);

/// More interface addresses than this is treated as a failed read (and so fails closed):
/// it bounds the work done on one read of a list the kernel controls.
const MAX_INTERFACE_ADDRESSES: usize = 1 << 16;

/// The addresses by which this host reaches itself: loopback (`127.0.0.0/8`, `::1`), the
/// unspecified addresses (`0.0.0.0` and `[::]` connect to the host itself), and every
/// address of a local network interface (read with `getifaddrs(3)`).
///
/// The interface list is read lazily and cached for a short time (default 1 s, see
/// [`max_age`](Self::max_age)), so an address added to an interface is known at the latest
/// that long after. An IPv4-mapped IPv6 address (`[::ffff:10.0.0.1]`) is judged as the IPv4
/// address the kernel will dial. If the list cannot be read and was never read, every
/// address counts as this host's (fail closed) and a `warn` event says why; after a failed
/// refresh the last list read stays in use.
///
/// Clones share one cache.
///
/// ```
/// use proxystack::tcp::HostAddresses;
/// let host = HostAddresses::new();
/// assert!(host.contains([127, 0, 0, 1].into()));
/// assert!(host.contains("::ffff:127.0.0.1".parse().unwrap()));
/// assert!(!host.contains([192, 0, 2, 1].into())); // TEST-NET-1: on no interface here
/// ```
#[derive(Clone)]
pub struct HostAddresses {
    max_age: Duration,
    cache: Arc<Mutex<Option<Snapshot>>>,
}

/// One read of the interface addresses: sorted and deduplicated, or `None` when the read
/// failed and nothing better is known.
struct Snapshot {
    read_at: Instant,
    addrs: Option<Arc<[IpAddr]>>,
}

impl std::fmt::Debug for HostAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAddresses")
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl Default for HostAddresses {
    fn default() -> Self {
        Self::new()
    }
}

impl HostAddresses {
    /// A cache of this host's addresses, re-read at most once a second.
    pub fn new() -> Self {
        Self {
            max_age: DEFAULT_MAX_AGE,
            cache: Arc::new(Mutex::new(None)),
        }
    }

    /// How long one read of the interface list is used (default 1 s). Shorter notices new
    /// addresses sooner; each read is one `getifaddrs(3)` call (a netlink dump).
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Whether `ip` reaches this host: loopback, unspecified, or an interface address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        match self.interface_addresses() {
            Some(addrs) => addrs.binary_search(&ip).is_ok(),
            // Unknown: better to refuse a destination than to let a loop through.
            None => true,
        }
    }

    /// The interface addresses as last read (sorted, IPv4-mapped ones canonicalised), or
    /// `None` when they could not be read.
    pub fn interface_addresses(&self) -> Option<Arc<[IpAddr]>> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let fresh = cache
            .as_ref()
            .is_some_and(|s| now.saturating_duration_since(s.read_at) < self.max_age);
        if !fresh {
            let previous = cache.as_ref().and_then(|s| s.addrs.clone());
            let addrs = match read_interface_addresses() {
                Ok(mut addrs) => {
                    addrs.sort_unstable();
                    addrs.dedup();
                    Some(Arc::from(addrs))
                }
                Err(e) => {
                    warn!(
                        error = %e,
                        have_previous = previous.is_some(),
                        "cannot read this host's interface addresses; using the last list \
                         read, or refusing every destination on the ports checked if none"
                    );
                    previous
                }
            };
            // A failed read is remembered too, so it is retried once per `max_age`, not on
            // every connection.
            *cache = Some(Snapshot {
                read_at: now,
                addrs,
            });
        }
        cache.as_ref().and_then(|s| s.addrs.clone())
    }
}

/// Frees a `getifaddrs` list when dropped, so every return path releases it.
#[cfg(unix)]
struct IfAddrs(*mut libc::ifaddrs);

#[cfg(unix)]
impl Drop for IfAddrs {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful getifaddrs and is freed only here.
        unsafe { libc::freeifaddrs(self.0) }
    }
}

/// The IPv4 and IPv6 addresses of every local interface, in the kernel's order.
#[cfg(unix)]
fn read_interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success the list is ours to free.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let list = IfAddrs(head);
    let mut out = Vec::new();
    let mut cur = list.0.cast_const();
    while !cur.is_null() {
        if out.len() >= MAX_INTERFACE_ADDRESSES {
            return Err(io::Error::other(format!(
                "more than {MAX_INTERFACE_ADDRESSES} interface addresses"
            )));
        }
        // SAFETY: `cur` is a non-null node of the list `list` owns, alive until it drops.
        let entry = unsafe { &*cur };
        // SAFETY: `ifa_addr` is null or points to a sockaddr of the family it names.
        if let Some(ip) = unsafe { sockaddr_ip(entry.ifa_addr) } {
            out.push(ip.to_canonical());
        }
        cur = entry.ifa_next.cast_const();
    }
    Ok(out)
}

/// The IP of an `AF_INET`/`AF_INET6` socket address; `None` for null or other families.
///
/// # Safety
/// `addr` is null or points to a valid `sockaddr` whose storage is as large as its family
/// requires (as `getifaddrs` guarantees).
#[cfg(unix)]
unsafe fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: non-null and valid per the function's contract.
    match i32::from(unsafe { (*addr).sa_family }) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*addr.cast::<libc::sockaddr_in>() };
            // `s_addr` holds the address in network byte order, i.e. as its bytes in memory.
            Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 = unsafe { &*addr.cast::<libc::sockaddr_in6>() };
            Some(IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

#[cfg(not(unix))]
fn read_interface_addresses() -> io::Result<Vec<IpAddr>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "reading interface addresses is implemented for Unix only",
    ))
}

/// The listeners of this process: every address it accepts connections on (the admin
/// endpoint included), so that tunnels and relays can refuse to dial them.
///
/// Register each listener right after binding it, with its *bound* address
/// (`listener.local_addr()`, so that port 0 is resolved), before the first connection is
/// accepted anywhere: [`register_listener`](Self::register_listener) does both.
/// [`TcpConnector::own_listeners`](super::TcpConnector::own_listeners) then refuses every
/// destination that [`contains`](Self::contains) one, and a tunnel terminator answers
/// `503` ([`Refusal::Loop`](crate::admission::Refusal::Loop)).
///
/// A destination is ours when its port is the port of one of our listeners and its
/// address is this host ([`HostAddresses`]: loopback, unspecified, an interface address)
/// or the listener's own address, whichever address the listener is bound to: a listener
/// on `10.0.0.5:8080` is not reachable on `127.0.0.1:8080`, but refusing that too costs
/// nothing real and needs no reasoning about which addresses a listener accepts on
/// (dual-stack sockets, `127.0.0.0/8`, the weak host model).
///
/// Clones share one registry.
///
/// ```
/// use proxystack::tcp::{OwnListeners, TcpConnector};
/// # async fn run() -> std::io::Result<()> {
/// let own = OwnListeners::new();
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
/// let bound = own.register_listener(&listener)?;
/// assert!(own.contains(([127, 0, 0, 1], bound.port()).into()));
/// // Tunnels dial through this connector: a destination that is ours fails before a dial.
/// let connector = TcpConnector::new().own_listeners(own.clone());
/// # let _ = connector; Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct OwnListeners {
    listeners: Arc<RwLock<Vec<SocketAddr>>>,
    host: HostAddresses,
}

impl std::fmt::Debug for OwnListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("OwnListeners").field(&self.addrs()).finish()
    }
}

impl OwnListeners {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry judging "this host" with `host` (e.g. to share its cache, or
    /// with another [`max_age`](HostAddresses::max_age)).
    pub fn with_host_addresses(host: HostAddresses) -> Self {
        Self {
            listeners: Arc::default(),
            host,
        }
    }

    /// Records a listener by its bound address. Port 0 means the address was taken before
    /// binding: it is ignored with a `warn` event (use the listener's `local_addr()`).
    pub fn register(&self, bound: SocketAddr) {
        if bound.port() == 0 {
            warn!(%bound, "not registering a listener with port 0: pass its bound address");
            return;
        }
        let bound = SocketAddr::new(bound.ip().to_canonical(), bound.port());
        let mut listeners = self
            .listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !listeners.contains(&bound) {
            listeners.push(bound);
        }
    }

    /// Records `listener` by its bound address, and returns that address.
    pub fn register_listener(&self, listener: &tokio::net::TcpListener) -> io::Result<SocketAddr> {
        let bound = listener.local_addr()?;
        self.register(bound);
        Ok(bound)
    }

    /// Forgets a listener that was closed (e.g. removed by a config reload), so its port
    /// may be dialled again if something else binds it.
    pub fn unregister(&self, bound: SocketAddr) {
        let bound = SocketAddr::new(bound.ip().to_canonical(), bound.port());
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|l| *l != bound);
    }

    /// The registered listeners' addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether dialling `dst` would reach one of our listeners.
    pub fn contains(&self, dst: SocketAddr) -> bool {
        let ip = dst.ip().to_canonical();
        let on_a_listener_address = {
            let listeners = self
                .listeners
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let mut same_port = listeners
                .iter()
                .filter(|l| l.port() == dst.port())
                .peekable();
            if same_port.peek().is_none() {
                // Most destinations are on other ports: no interface list is needed.
                return false;
            }
            same_port.any(|l| l.ip() == ip)
        };
        on_a_listener_address || self.host.contains(ip)
    }

    /// The [`HostAddresses`] this registry judges "this host" with.
    pub fn host_addresses(&self) -> &HostAddresses {
        &self.host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_addresses_include_loopback() {
        let addrs = HostAddresses::new().interface_addresses().unwrap();
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }

    #[test]
    fn every_address_of_this_host_is_ours_on_our_ports_only() {
        let own = OwnListeners::new();
        own.register(([127, 0, 0, 1], 4000).into());
        own.register(([0, 0, 0, 0], 0).into()); // ignored
        for dst in [
            "127.0.0.1:4000",
            "127.0.0.2:4000",
            "0.0.0.0:4000",
            "[::]:4000",
            "[::1]:4000",
            "[::ffff:127.0.0.1]:4000",
        ] {
            assert!(own.contains(dst.parse().unwrap()), "{dst}");
        }
        for dst in ["127.0.0.1:4001", "192.0.2.1:4000", "127.0.0.1:0"] {
            assert!(!own.contains(dst.parse().unwrap()), "{dst}");
        }
        // Any interface address of this host, not only loopback.
        let host = own.host_addresses().interface_addresses().unwrap();
        for ip in host.iter() {
            assert!(own.contains(SocketAddr::new(*ip, 4000)), "{ip}");
        }
    }

    #[test]
    fn a_listener_on_a_foreign_address_is_matched_by_that_address() {
        // IP_FREEBIND/transparent listeners can be bound to addresses no interface has.
        let own = OwnListeners::new();
        own.register("[::ffff:192.0.2.7]:443".parse().unwrap());
        assert!(own.contains(([192, 0, 2, 7], 443).into()));
        assert!(!own.contains(([192, 0, 2, 8], 443).into()));
    }

    #[test]
    fn an_unregistered_listener_is_no_longer_ours() {
        let own = OwnListeners::new();
        own.register(([127, 0, 0, 1], 4000).into());
        own.register(([127, 0, 0, 1], 4001).into());
        own.unregister("[::ffff:127.0.0.1]:4000".parse().unwrap());
        assert!(!own.contains(([127, 0, 0, 1], 4000).into()));
        assert!(own.contains(([127, 0, 0, 1], 4001).into()));
    }
}
