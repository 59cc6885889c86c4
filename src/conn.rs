//! Connections and targets: the two values every layer passes around.
//!
//! * [`Conn<I>`] — a byte stream `I` plus connection **metadata**, an [`http::Extensions`]
//!   map holding one small struct per fact ([`PeerAddr`], [`OriginalDst`], and, from higher
//!   levels, SNI, peer identity, tunnel authority…). Inbound layers read and extend it.
//! * [`Target`] — where a connector should connect, plus metadata for the outbound layers
//!   (expected identity, SNI, PROXY TLVs, CONNECT headers).
//!
//! Layers that terminate a protocol hand their inner service a [`Conn<BoxIo>`]: one
//! allocation per connection keeps types (and build times) small without a per-byte cost.

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use http::Extensions;

use crate::addr::{Authority, AuthorityError, Host};
use crate::io::{delegate_io, delegate_socket, AsyncReadWriteUnpin, BoxIo, Io};

/// Connection metadata: one value per type ([`PeerAddr`], `Sni`, `PeerIdentity`…). Routing
/// closures (`Relay::upstream`, `Steer`) receive it, so they read like
/// `|m: &Metadata| m.get::<OriginalDst>()`.
pub type Metadata = Extensions;

/// A byte stream plus its connection metadata.
///
/// ```
/// use proxystack::{Conn, conn::PeerAddr};
/// let mut conn = Conn::new(tokio::io::empty());
/// conn.insert(PeerAddr(([127, 0, 0, 1], 4000).into()));
/// assert_eq!(conn.get::<PeerAddr>().map(|p| p.0.port()), Some(4000));
/// ```
pub struct Conn<I> {
    io: I,
    metadata: Extensions,
}

impl<I> Conn<I> {
    /// A connection with no metadata yet.
    pub fn new(io: I) -> Self {
        Self::from_parts(io, Extensions::new())
    }

    /// A connection with the given metadata.
    pub fn from_parts(io: I, metadata: Extensions) -> Self {
        Self { io, metadata }
    }

    /// One metadata fact, by type.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.metadata.get::<T>()
    }

    /// Records a metadata fact, returning the previous value of that type.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) -> Option<T> {
        self.metadata.insert(value)
    }

    /// All metadata.
    pub fn metadata(&self) -> &Extensions {
        &self.metadata
    }

    /// All metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut Extensions {
        &mut self.metadata
    }

    /// The stream.
    pub fn io(&self) -> &I {
        &self.io
    }

    /// The stream, mutably.
    pub fn io_mut(&mut self) -> &mut I {
        &mut self.io
    }

    /// Splits into stream and metadata.
    pub fn into_parts(self) -> (I, Extensions) {
        (self.io, self.metadata)
    }

    /// Replaces the stream (e.g. with its TLS session), keeping the metadata.
    pub fn map_io<J>(self, f: impl FnOnce(I) -> J) -> Conn<J> {
        Conn::from_parts(f(self.io), self.metadata)
    }

    /// Boxes the stream; see [`BoxIo`].
    pub fn boxed(self) -> Conn<BoxIo>
    where
        I: Io,
    {
        self.map_io(BoxIo::new)
    }
}

impl<I> fmt::Debug for Conn<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.get::<PeerAddr>())
            .field("local", &self.get::<LocalAddr>())
            .finish_non_exhaustive()
    }
}

/// Where a connector should connect, plus metadata for outbound layers.
///
/// ```
/// use proxystack::Target;
/// let t: Target = "backend.internal:8080".parse().unwrap();
/// assert_eq!(t.authority().port(), 8080);
/// ```
#[derive(Clone)]
pub struct Target {
    authority: Authority,
    metadata: Extensions,
}

impl Target {
    /// A target with no metadata.
    pub fn new(authority: Authority) -> Self {
        Self {
            authority,
            metadata: Extensions::new(),
        }
    }

    /// Parses `host:port` (see [`Authority::parse`]).
    pub fn parse(s: &str) -> Result<Self, AuthorityError> {
        Authority::parse(s).map(Self::new)
    }

    /// Parses a `host:port` literal written in the program.
    ///
    /// # Panics
    /// If `s` is not a valid `host:port`; use [`Target::parse`] for input from elsewhere.
    #[allow(clippy::panic)]
    pub fn from_static(s: &'static str) -> Self {
        match Self::parse(s) {
            Ok(t) => t,
            Err(e) => panic!("invalid target literal {s:?}: {e}"),
        }
    }

    /// Where to connect.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The socket address, when the target is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.authority.socket_addr()
    }

    /// Same target, another port.
    pub fn with_port(mut self, port: u16) -> Self {
        self.authority = self.authority.with_port(port);
        self
    }

    /// One metadata fact, by type.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.metadata.get::<T>()
    }

    /// Records a metadata fact.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) -> Option<T> {
        self.metadata.insert(value)
    }

    /// Builder form of [`Target::insert`].
    pub fn with<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.metadata.insert(value);
        self
    }

    /// All metadata.
    pub fn metadata(&self) -> &Extensions {
        &self.metadata
    }

    /// All metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut Extensions {
        &mut self.metadata
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Target")
            .field(&self.authority.to_string())
            .finish()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.authority.fmt(f)
    }
}

impl std::str::FromStr for Target {
    type Err = AuthorityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Self::new(addr.into())
    }
}

impl<I: Into<std::net::IpAddr>> From<(I, u16)> for Target {
    fn from((ip, port): (I, u16)) -> Self {
        Self::new(Authority::new(Host::Ip(ip.into()), port))
    }
}

impl From<Authority> for Target {
    fn from(authority: Authority) -> Self {
        Self::new(authority)
    }
}

/// Metadata: the local address the connection was accepted on (or connected from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);

/// Metadata: the remote address of the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Metadata: where the client meant to connect before a `REDIRECT`/`TPROXY` rule sent it
/// here (`SO_ORIGINAL_DST`); see `tcp::OriginalDstLayer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalDst(pub SocketAddr);

impl From<OriginalDst> for Target {
    fn from(dst: OriginalDst) -> Self {
        dst.0.into()
    }
}

impl From<&OriginalDst> for Target {
    fn from(dst: &OriginalDst) -> Self {
        dst.0.into()
    }
}

/// Metadata: a process-unique number for the accepted connection, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    /// The next unused id.
    pub fn next() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Metadata: when the connection was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptedAt(pub Instant);

delegate_io!(Conn<I>, io, I: AsyncReadWriteUnpin);

impl<I: Io> Io for Conn<I> {
    delegate_socket!(io);
}

/// A type-erased inbound service over boxed connections: what routers, fallbacks and
/// recursive graphs store. Cheap to clone, `Send + Sync`.
pub type BoxInbound = tower::util::BoxCloneSyncService<Conn<BoxIo>, (), crate::BoxError>;

/// The bound on every inbound service that a router, a fallback, a terminator or a
/// recursive graph stores, named once: a cloneable, `Send + Sync`
/// `Service<Conn<BoxIo>, Response = ()>` whose error converts into a
/// [`BoxError`](crate::BoxError) and whose future is `Send`. Implemented for every such
/// service; [`boxed`](Self::boxed) erases it into a [`BoxInbound`].
pub trait BoxableInbound: Clone + Send + Sync + 'static {
    /// The service, type-erased.
    fn boxed(self) -> BoxInbound;
}

impl<S> BoxableInbound for S
where
    S: tower::Service<Conn<BoxIo>, Response = ()> + Clone + Send + Sync + 'static,
    S::Error: Into<crate::BoxError>,
    S::Future: Send + 'static,
{
    fn boxed(self) -> BoxInbound {
        use tower::ServiceExt;
        BoxInbound::new(self.map_err(Into::into))
    }
}

/// Erases an inbound service's type (and its error type) into a [`BoxInbound`].
pub fn box_inbound<S: BoxableInbound>(service: S) -> BoxInbound {
    service.boxed()
}

/// Metadata: whether the credentials a connection was made with (e.g. a TLS client
/// certificate) are still the current ones. A pool that finds them outdated opens no new
/// streams on the connection and lets the open ones finish, so every new stream presents
/// the current credentials. [`TlsConnector::live`](crate::tls::TlsConnector::live) sets it.
#[derive(Clone)]
pub struct CredentialsCurrent(std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

impl CredentialsCurrent {
    /// Asks `check` each time the question comes up.
    pub fn new(check: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(check))
    }

    /// Whether the credentials are still current.
    pub fn is_current(&self) -> bool {
        (self.0)()
    }
}

impl fmt::Debug for CredentialsCurrent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CredentialsCurrent")
            .field(&self.is_current())
            .finish()
    }
}
