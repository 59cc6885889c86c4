//! PROXY protocol level: the inbound layer and the outbound connector over real loopback
//! sockets, with haproxy as the real peer on both sides where it is installed, and the bad
//! inputs of REFERENCE §4.2.
#![cfg(feature = "proxy-protocol")]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use proxystack::conn::{LocalAddr, PeerAddr};
use proxystack::identity::{PeerIdentity, SpiffeId};
use proxystack::proxy_protocol::{
    decode, Command as PpCommand, Decoded, Limits, MissingHeader, ProxiedAddrs, ProxiedBy,
    ProxyConnectError, ProxyHeader, ProxyProtocolConnector, ProxyProtocolLayer, SendProxyHeader,
    Version, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C,
};
use proxystack::Metadata;
use proxystack::{tcp, Server, Target};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

// ---------------------------------------------------------------------------------------
// Harness: a listener with the layer in front of a service that reports metadata and
// echoes; the layer's errors are reported too.

async fn harness(layer: ProxyProtocolLayer) -> Harness {
    Harness::start(layer).await
}

async fn read_n(s: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    buf
}

/// Connects to `to` from the loopback address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Waits for the server to close `s` (FIN or RST) without sending anything, and returns
/// how long that took.
async fn expect_closed(s: &mut TcpStream, within: Duration) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {within:?}"),
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => panic!("server sent {n} bytes: {:?}", &buf[..n]),
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    t.elapsed()
}

fn v2(src: &str, dst: &str) -> ProxyHeader {
    ProxyHeader::v2_proxy(src.parse().unwrap(), dst.parse().unwrap())
}

fn localhost() -> IpAddr {
    [127, 0, 0, 1].into()
}

/// A loopback address outside the trusted `127.0.0.1/32`.
fn untrusted_ip() -> IpAddr {
    [127, 0, 0, 2].into()
}

// ---------------------------------------------------------------------------------------
// haproxy as the real peer.

fn haproxy_bin() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file());
    if found.is_none() {
        println!("SKIPPED: haproxy not installed");
    }
    found
}

/// A haproxy child process with its own config directory; killed and cleaned up on drop.
struct Haproxy {
    child: Child,
    dir: PathBuf,
}

impl Haproxy {
    /// Starts haproxy with `config` and waits (bounded) until `ready` accepts connections.
    async fn start(bin: &PathBuf, config: &str, ready: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "proxystack-pp-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.join("haproxy.log")).unwrap();
        let child = Command::new(bin)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut hap = Haproxy { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = hap.child.try_wait().unwrap() {
                panic!("haproxy exited with {status}:\n{}", hap.log());
            }
            if TcpStream::connect(ready).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy not ready:\n{}",
                hap.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        hap
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // Only the child we started, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port for haproxy to bind (released just before haproxy takes it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const DEFAULTS: &str = "
global
    maxconn 100
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
";

/// haproxy (`mode tcp`, `server ... <send>`) in front of our required-PROXY listener: the
/// client address we see must be the test client's socket address, as haproxy saw it.
async fn haproxy_in_front(send: &str, version: Version) {
    let Some(bin) = haproxy_bin() else { return };
    let mut h = harness(ProxyProtocolLayer::required().trusted(["127.0.0.1/32"])).await;
    let fe: SocketAddr = SocketAddr::new(localhost(), free_port());
    let config = format!(
        "{DEFAULTS}
frontend fe
    mode tcp
    bind {fe}
    default_backend be
backend be
    mode tcp
    server ours {ours} {send} check inter 300ms
",
        ours = h.addr()
    );
    let hap = Haproxy::start(&bin, &config, fe).await;

    let mut client = TcpStream::connect(fe).await.unwrap();
    let client_addr = client.local_addr().unwrap();
    client.write_all(b"ping").await.unwrap();
    assert_eq!(read_n(&mut client, 4).await, b"ping", "{}", hap.log());

    // haproxy's health checks connect too, as does the readiness probe; pick ours.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut ours, mut check) = (None, None);
    while ours.is_none() || check.is_none() {
        assert!(Instant::now() < deadline, "{}", hap.log());
        let meta = h.next_seen().await;
        let header = meta.get::<ProxyHeader>().expect("header recorded").clone();
        assert_eq!(header.version, version);
        match meta.get::<ProxiedAddrs>() {
            Some(p) if p.source == client_addr => ours = Some(meta),
            Some(p) if p.destination == fe => {} // the readiness probe, relayed like a client
            _ => check = Some((meta, header)),
        }
    }
    let ours = ours.unwrap();
    assert_eq!(
        ours.get::<ProxiedAddrs>().unwrap().destination,
        fe,
        "destination is haproxy's frontend"
    );
    // The socket peer is haproxy, and stays the PeerAddr.
    let peer = ours.get::<PeerAddr>().unwrap().0;
    assert_eq!(peer.ip(), localhost());
    assert_ne!(peer, client_addr);
    assert_eq!(ours.get::<ProxiedBy>(), Some(&ProxiedBy(peer)));

    // Health checks have no client. v2 sends LOCAL: no proxied addresses, the real ones
    // stay. v1 has no LOCAL, so haproxy describes the check connection itself.
    let (check, header) = check.unwrap();
    let check_peer = check.get::<PeerAddr>().unwrap().0;
    match version {
        Version::V2 => {
            assert_eq!(header.command, PpCommand::Local);
            assert!(check.get::<ProxiedAddrs>().is_none());
        }
        Version::V1 => assert_eq!(
            check.get::<ProxiedAddrs>(),
            Some(&ProxiedAddrs {
                source: check_peer,
                destination: h.addr()
            })
        ),
    }
    assert!(check.get::<PeerIdentity>().is_none());
    drop(client);
    drop(hap);
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn haproxy_send_proxy_v2_in_front() {
    haproxy_in_front("send-proxy-v2 proxy-v2-options crc32c", Version::V2).await;
}

#[tokio::test]
async fn haproxy_send_proxy_v1_in_front() {
    haproxy_in_front("send-proxy", Version::V1).await;
}

/// A tiny HTTP/1.1 backend that answers every request with
/// `<X-Forwarded-For>|<X-PP-Authority>` as the body.
async fn reporting_http_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let header = |name: &str| {
                    text.lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.trim()
                                .eq_ignore_ascii_case(name)
                                .then(|| v.trim().to_owned())
                        })
                        .unwrap_or_default()
                };
                let body = format!("{}|{}", header("x-forwarded-for"), header("x-pp-authority"));
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Sends one HTTP request over `conn` and returns the response body.
async fn http_get<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(conn: &mut I) -> String {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut resp))
        .await
        .expect("response in time")
        .unwrap();
    let resp = String::from_utf8(resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// Our connector → haproxy with `accept-proxy`: haproxy must take the client address
/// (and the authority TLV) we sent, with a CRC32C it verifies.
#[tokio::test]
async fn connector_to_haproxy_accept_proxy() {
    let Some(bin) = haproxy_bin() else { return };
    init_tracing();
    let backend = reporting_http_backend().await;
    let fe = SocketAddr::new(localhost(), free_port());
    let config = format!(
        "{DEFAULTS}
frontend fe
    mode http
    bind {fe} accept-proxy
    option forwardfor
    http-request set-header X-PP-Authority %[fc_pp_authority]
    default_backend be
backend be
    mode http
    server app {backend}
"
    );
    // accept-proxy makes haproxy drop the readiness probe (no header); that is fine.
    let hap = Haproxy::start(&bin, &config, fe).await;

    let id = SpiffeId::parse(CLIENT_ID).unwrap();
    let claimed: SocketAddr = "203.0.113.7:41234".parse().unwrap();
    let connector = ProxyProtocolConnector::new(tcp::TcpConnector::new()).crc32c(true);
    let target = Target::from(fe).with(
        SendProxyHeader::proxy(claimed, fe)
            .tlv(PP2_TYPE_AUTHORITY, "app.example")
            .identity(&id)
            .service("reviews.default.svc.cluster.local"),
    );
    let mut conn = connector.clone().oneshot(target).await.unwrap();
    assert_eq!(
        http_get(&mut conn).await,
        "203.0.113.7|app.example",
        "{}",
        hap.log()
    );

    // IPv6 client addresses go out as AF_INET6 even over an IPv4 connection.
    let claimed6: SocketAddr = "[2001:db8::7]:41234".parse().unwrap();
    let target = Target::from(fe).with(SendProxyHeader::proxy(
        claimed6,
        "[2001:db8::1]:80".parse().unwrap(),
    ));
    let mut conn = connector.clone().oneshot(target).await.unwrap();
    assert_eq!(http_get(&mut conn).await, "2001:db8::7|", "{}", hap.log());

    // haproxy really checks the CRC32C: the same header with one flipped bit is dropped,
    // so the success above proves our checksum right.
    let mut wire = SendProxyHeader::proxy(claimed, fe)
        .header()
        .encode_with_crc32c()
        .unwrap()
        .to_vec();
    wire[16] ^= 1;
    wire.extend_from_slice(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let mut raw = TcpStream::connect(fe).await.unwrap();
    let _ = raw.write_all(&wire).await; // haproxy may reset the connection at once
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut resp))
        .await
        .expect("haproxy closes");
    assert!(
        !resp.starts_with(b"HTTP/1.1 200"),
        "haproxy accepted a bad CRC: {}",
        String::from_utf8_lossy(&resp)
    );

    // LOCAL (no SendProxyHeader, opted in): haproxy uses the real connection source.
    let local = connector.when_missing(MissingHeader::Local);
    let mut conn = local.oneshot(Target::from(fe)).await.unwrap();
    let real_source = conn.get::<LocalAddr>().unwrap().0;
    assert_eq!(
        http_get(&mut conn).await,
        format!("{}|", real_source.ip()),
        "{}",
        hap.log()
    );
    drop(hap);
}

// ---------------------------------------------------------------------------------------
// Bad inputs (REFERENCE §4.2, PROXY protocol).

const SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn bytes(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Every malformed header is closed at once (well before the timeout), nothing reaches
/// the inner service, the layer reports why, and the next good connection works.
#[tokio::test]
async fn malformed_headers_are_rejected() {
    let layer_timeout = Duration::from_secs(3);
    let mut h = harness(
        ProxyProtocolLayer::required()
            .trusted(["127.0.0.1/32"])
            .timeout(layer_timeout),
    )
    .await;
    let addr4 = [127, 0, 0, 1, 127, 0, 0, 2, 0x9C, 0x40, 0x01, 0xBB];
    let mut crc_mismatch = v2("10.0.0.1:1000", "10.0.0.2:2000")
        .encode_with_crc32c()
        .unwrap()
        .to_vec();
    crc_mismatch[16] ^= 0x01; // flip a bit of the source address after the CRC was made
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "header absent",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "Missing",
        ),
        (
            "v1 longer than 107 bytes",
            bytes(&[b"PROXY UNKNOWN ", &[b'x'; 120]]),
            "V1TooLong",
        ),
        (
            "v1 lone LF",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000\nhello".to_vec(),
            "V1Malformed",
        ),
        (
            "v1 leading zeros",
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1000 2000\r\n".to_vec(),
            "V1Malformed",
        ),
        (
            "v2 bad signature",
            bytes(&[b"\r\n\r\n\0\r\nQUIX\n", &[0x21, 0x11, 0, 12], &addr4]),
            "Missing",
        ),
        (
            "v2 version 3",
            bytes(&[SIG, &[0x31, 0x11, 0, 12], &addr4]),
            "BadVersion(3)",
        ),
        (
            "v2 command 0xF",
            bytes(&[SIG, &[0x2F, 0x11, 0, 12], &addr4]),
            "BadCommand(15)",
        ),
        (
            "v2 family 4",
            bytes(&[SIG, &[0x21, 0x41, 0, 12], &addr4]),
            "BadFamily(4)",
        ),
        (
            "v2 INET with UNSPEC transport",
            bytes(&[SIG, &[0x21, 0x10, 0, 12], &addr4]),
            "BadFamilyTransport(16)",
        ),
        (
            "v2 len shorter than the address block",
            bytes(&[SIG, &[0x21, 0x11, 0, 8], &addr4[..8]]),
            "AddressBlockTooShort",
        ),
        (
            "v2 TLV past the end",
            bytes(&[SIG, &[0x21, 0x11, 0, 16], &addr4, &[0xD0, 0, 9, b'a']]),
            "TlvOverrun",
        ),
        (
            "v2 len over the limit",
            bytes(&[SIG, &[0x21, 0x11, 0xFF, 0xFF], &addr4]),
            "TooLarge",
        ),
        ("v2 CRC32C mismatch", crc_mismatch, "Crc32cMismatch"),
    ];
    let n = cases.len();
    for (name, wire, expected) in cases {
        let mut s = TcpStream::connect(h.addr()).await.unwrap();
        let _ = s.write_all(&wire).await; // the server may already have closed
        let took = expect_closed(&mut s, layer_timeout).await;
        assert!(
            took < layer_timeout,
            "{name}: closed by the timeout, not the parser"
        );
        let err = h.next_error().await;
        assert!(err.contains(expected), "{name}: got {err}");
        h.assert_nothing_reached_inner();
        h.assert_good_connection_works().await;
    }
    assert_eq!(n, 13);
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn partial_header_then_stall_times_out() {
    let timeout = Duration::from_millis(600);
    let mut h = harness(
        ProxyProtocolLayer::required()
            .trusted(["127.0.0.1/32"])
            .timeout(timeout),
    )
    .await;
    let wire = v2("10.0.0.1:1000", "10.0.0.2:2000").encode().unwrap();
    let mut s = TcpStream::connect(h.addr()).await.unwrap();
    s.write_all(&wire[..20]).await.unwrap();
    let took = expect_closed(&mut s, Duration::from_secs(5)).await;
    assert!(
        took >= timeout - Duration::from_millis(50),
        "closed after {took:?}"
    );
    assert!(
        took < timeout + Duration::from_secs(2),
        "closed after {took:?}"
    );
    assert!(h.next_error().await.starts_with("Timeout("));
    h.assert_nothing_reached_inner();
    h.assert_good_connection_works().await;
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn close_mid_header_is_rejected() {
    let mut h = harness(ProxyProtocolLayer::required().trusted(["127.0.0.1/32"])).await;
    let wire = v2("10.0.0.1:1000", "10.0.0.2:2000").encode().unwrap();
    let mut s = TcpStream::connect(h.addr()).await.unwrap();
    s.write_all(&wire[..20]).await.unwrap();
    s.shutdown().await.unwrap();
    expect_closed(&mut s, Duration::from_secs(2)).await;
    assert_eq!(h.next_error().await, "Closed { read: 20 }");
    h.assert_nothing_reached_inner();
    h.assert_good_connection_works().await;
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn header_from_untrusted_peer_is_closed_when_required() {
    let mut h = harness(ProxyProtocolLayer::required().trusted(["127.0.0.1/32"])).await;
    let wire = v2("10.0.0.1:1000", "10.0.0.2:2000")
        .with_identity(CLIENT_ID)
        .encode()
        .unwrap();
    let mut s = connect_from(untrusted_ip(), h.addr()).await;
    let from = s.local_addr().unwrap();
    let _ = s.write_all(&wire).await;
    expect_closed(&mut s, Duration::from_secs(2)).await;
    assert_eq!(
        h.next_error().await,
        format!("Untrusted {{ peer: Some({from}) }}")
    );
    h.assert_nothing_reached_inner();
    h.assert_good_connection_works().await;
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn identity_from_untrusted_peer_is_data_when_optional() {
    let mut h = harness(ProxyProtocolLayer::optional().trusted(["127.0.0.1/32"])).await;
    let mut wire = v2("10.0.0.1:1000", "10.0.0.2:2000")
        .with_identity(CLIENT_ID)
        .encode()
        .unwrap()
        .to_vec();
    wire.extend_from_slice(b"payload");
    let mut s = connect_from(untrusted_ip(), h.addr()).await;
    s.write_all(&wire).await.unwrap();
    // The header comes back as plain data: it was never parsed or trusted.
    assert_eq!(read_n(&mut s, wire.len()).await, wire);
    let meta = h.next_seen().await;
    assert!(meta.get::<PeerIdentity>().is_none());
    assert!(meta.get::<ProxyHeader>().is_none());
    assert!(meta.get::<ProxiedAddrs>().is_none());
    assert_eq!(meta.get::<PeerAddr>().unwrap().0, s.local_addr().unwrap());
    h.assert_good_connection_works().await;
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn header_is_data_when_off() {
    let mut h = harness(ProxyProtocolLayer::off().trusted(["127.0.0.1/32"])).await;
    for header in [
        ProxyHeader::v1_proxy(
            "10.0.0.1:1000".parse().unwrap(),
            "10.0.0.2:2000".parse().unwrap(),
        ),
        v2("10.0.0.1:1000", "10.0.0.2:2000").with_identity(CLIENT_ID),
    ] {
        let mut wire = header.encode().unwrap().to_vec();
        wire.extend_from_slice(b"after");
        let mut s = TcpStream::connect(h.addr()).await.unwrap();
        s.write_all(&wire).await.unwrap();
        assert_eq!(read_n(&mut s, wire.len()).await, wire);
        let meta = h.next_seen().await;
        assert!(meta.get::<ProxyHeader>().is_none());
        assert!(meta.get::<ProxiedAddrs>().is_none());
        assert!(meta.get::<PeerIdentity>().is_none());
    }
}

#[tokio::test]
async fn header_split_into_one_byte_writes() {
    let mut h = harness(ProxyProtocolLayer::required().trusted(["127.0.0.1/32"])).await;
    let src: SocketAddr = "[2001:db8::10]:40000".parse().unwrap();
    let dst: SocketAddr = "[2001:db8::1]:8443".parse().unwrap();
    for header in [
        ProxyHeader::v1_proxy(src, dst),
        ProxyHeader::v2_proxy(src, dst)
            .with_identity(CLIENT_ID)
            .with_service("reviews.default.svc.cluster.local"),
    ] {
        let mut wire = header.encode_with_crc32c().unwrap().to_vec();
        wire.extend_from_slice(b"tail");
        let mut s = TcpStream::connect(h.addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        for b in &wire {
            s.write_all(std::slice::from_ref(b)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(read_n(&mut s, 4).await, b"tail");
        let meta = h.next_seen().await;
        assert_eq!(
            meta.get::<ProxiedAddrs>(),
            Some(&ProxiedAddrs {
                source: src,
                destination: dst
            })
        );
        let got = meta.get::<ProxyHeader>().unwrap();
        assert_eq!(got.version, header.version);
        if header.version == Version::V2 {
            assert!(got.tlv(PP2_TYPE_CRC32C).is_some());
            assert_eq!(
                meta.get::<PeerIdentity>().map(|p| p.0.as_str()),
                Some(CLIENT_ID)
            );
        }
    }
    h.proxy.shutdown().await;
}

/// The payload that arrives in the same segment as the header is replayed exactly,
/// however large.
#[tokio::test]
async fn bytes_after_the_header_are_replayed() {
    let mut h = harness(ProxyProtocolLayer::required().trusted(["127.0.0.1/32"])).await;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut wire = v2("10.0.0.1:1000", "10.0.0.2:2000")
        .encode()
        .unwrap()
        .to_vec();
    wire.extend_from_slice(&payload);
    let s = TcpStream::connect(h.addr()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&wire).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert!(
        back == payload,
        "replayed {} of {} bytes",
        back.len(),
        payload.len()
    );
    h.next_seen().await;
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn identity_tlv_from_trusted_sender() {
    let mut h = harness(ProxyProtocolLayer::required().trusted(["127.0.0.0/8"])).await;
    let cases = [
        (
            v2("10.0.0.1:1000", "10.0.0.2:2000").with_identity(CLIENT_ID),
            Some(CLIENT_ID),
        ),
        // Not a SPIFFE ID: no identity, the header is still accepted.
        (
            v2("10.0.0.1:1000", "10.0.0.2:2000").with_identity("spiffe://TD/x"),
            None,
        ),
        (
            v2("10.0.0.1:1000", "10.0.0.2:2000").with_tlv(0xD0, &[0xFF, 0xFE][..]),
            None,
        ),
    ];
    for (header, want) in cases {
        let mut s = TcpStream::connect(h.addr()).await.unwrap();
        let mut wire = header.encode().unwrap().to_vec();
        wire.push(b'!');
        s.write_all(&wire).await.unwrap();
        assert_eq!(read_n(&mut s, 1).await, b"!");
        let meta = h.next_seen().await;
        assert!(meta.get::<ProxyHeader>().is_some());
        assert_eq!(meta.get::<PeerIdentity>().map(|p| p.0.as_str()), want);
    }
    // Switched off: the TLV stays in the header but vouches for nothing.
    let mut h2 = harness(
        ProxyProtocolLayer::required()
            .trusted(["127.0.0.1/32"])
            .identity_tlv(false),
    )
    .await;
    let mut s = TcpStream::connect(h2.addr()).await.unwrap();
    let mut wire = v2("10.0.0.1:1000", "10.0.0.2:2000")
        .with_identity(CLIENT_ID)
        .encode()
        .unwrap()
        .to_vec();
    wire.push(b'!');
    s.write_all(&wire).await.unwrap();
    read_n(&mut s, 1).await;
    let meta = h2.next_seen().await;
    assert_eq!(
        meta.get::<ProxyHeader>().unwrap().identity(),
        Some(CLIENT_ID)
    );
    assert!(meta.get::<PeerIdentity>().is_none());
}

/// A raw upstream that decodes the PROXY header of each connection and reports it with
/// the bytes that followed (to EOF).
async fn header_reporting_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<(ProxyHeader, Vec<u8>)>)
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
                match decode(&buf, &Limits::default()) {
                    Ok(Decoded::Complete { header, consumed }) => {
                        let _ = tx.send((header, buf[consumed..].to_vec()));
                    }
                    other => panic!("upstream got no PROXY header: {other:?} {buf:?}"),
                }
            });
        }
    });
    (addr, rx)
}

/// PROXY-in → relay → PROXY-out, as a chain of two proxies would be.
async fn forwarding_proxy(upstream: SocketAddr) -> Running {
    let relay = tcp::Relay::new(ProxyProtocolConnector::new(tcp::TcpConnector::new())).upstream(
        move |c: &Metadata| {
            let send = SendProxyHeader::from_inbound(c)?;
            Some(Target::from(upstream).with(send))
        },
    );
    let svc = ServiceBuilder::new()
        .layer(ProxyProtocolLayer::required().trusted(["127.0.0.1/32"]))
        .service(relay);
    start(Server::new(), svc).await
}

/// LOCAL keeps the real addresses, and what goes upstream is built from them: nothing is
/// fabricated from the LOCAL header's (absent or ignored) address block, and its identity
/// claim is not forwarded (CVE-2024-23327 class).
#[tokio::test]
async fn local_keeps_real_addresses_and_fabricates_nothing_upstream() {
    init_tracing();
    // Inbound view.
    let mut h = harness(ProxyProtocolLayer::required().trusted(["127.0.0.1/32"])).await;
    let local_with_block = bytes(&[
        SIG,
        &[0x20, 0x11, 0, 12 + 3 + CLIENT_ID.len() as u8],
        &[10, 9, 9, 9, 10, 8, 8, 8, 0x04, 0xD2, 0x00, 0x50],
        &[0xD0, 0, CLIENT_ID.len() as u8],
        CLIENT_ID.as_bytes(),
    ]);
    for wire in [
        ProxyHeader::local().encode().unwrap().to_vec(),
        local_with_block.clone(),
    ] {
        let mut s = TcpStream::connect(h.addr()).await.unwrap();
        s.write_all(&[&wire[..], b"x"].concat()).await.unwrap();
        assert_eq!(read_n(&mut s, 1).await, b"x");
        let meta = h.next_seen().await;
        assert_eq!(meta.get::<ProxyHeader>().unwrap().command, PpCommand::Local);
        assert!(meta.get::<ProxiedAddrs>().is_none());
        assert!(meta.get::<PeerIdentity>().is_none());
        assert_eq!(meta.get::<PeerAddr>().unwrap().0, s.local_addr().unwrap());
    }
    h.proxy.shutdown().await;

    // Through a forwarding proxy: the upstream hears about the real client socket.
    let (upstream, mut heard) = header_reporting_upstream().await;
    let proxy = forwarding_proxy(upstream).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(&[&local_with_block[..], b"data"].concat())
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let (sent, data) = tokio::time::timeout(Duration::from_secs(5), heard.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sent.command, PpCommand::Proxy);
    assert_eq!(sent.version, Version::V2);
    assert_eq!(sent.source(), Some(me), "the real client, not 10.9.9.9");
    assert_eq!(sent.destination(), Some(proxy.addr));
    assert_eq!(
        sent.identity(),
        None,
        "the LOCAL header's identity claim is dropped"
    );
    assert_eq!(data, b"data");

    // And a PROXY header is forwarded with the client it named.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let inbound = v2("192.0.2.44:5555", "192.0.2.1:443").with_identity(CLIENT_ID);
    s.write_all(&[&inbound.encode().unwrap()[..], b"more"].concat())
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let (sent, data) = tokio::time::timeout(Duration::from_secs(5), heard.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        sent,
        v2("192.0.2.44:5555", "192.0.2.1:443").with_identity(CLIENT_ID)
    );
    assert_eq!(data, b"more");
    proxy.shutdown().await;
}

#[tokio::test]
async fn optional_mode_detects_v1_v2_and_plain_streams() {
    let mut h = harness(
        ProxyProtocolLayer::optional()
            .trusted(["127.0.0.1/32"])
            .timeout(Duration::from_millis(500)),
    )
    .await;
    let src: SocketAddr = "192.0.2.9:1234".parse().unwrap();
    let dst: SocketAddr = "192.0.2.1:80".parse().unwrap();
    for (wire, addrs) in [
        (
            ProxyHeader::v1_proxy(src, dst).encode().unwrap().to_vec(),
            true,
        ),
        (
            ProxyHeader::v2_proxy(src, dst).encode().unwrap().to_vec(),
            true,
        ),
        (Vec::new(), false),
        (b"PRO".to_vec(), false), // a preamble prefix that turns out to be data
    ] {
        let mut s = TcpStream::connect(h.addr()).await.unwrap();
        let payload = b"GET / HTTP/1.0\r\n\r\n";
        s.write_all(&wire).await.unwrap();
        if !addrs {
            // Let the first bytes arrive alone, so detection has to decide on them.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.write_all(payload).await.unwrap();
        let echoed_len = if addrs {
            payload.len()
        } else {
            wire.len() + payload.len()
        };
        let back = read_n(&mut s, echoed_len).await;
        let meta = h.next_seen().await;
        if addrs {
            assert_eq!(back, payload);
            assert_eq!(meta.get::<ProxiedAddrs>().unwrap().source, src);
        } else {
            assert_eq!(back, [&wire[..], payload].concat());
            assert!(meta.get::<ProxyHeader>().is_none());
        }
    }

    // A silent client (server-first protocol) is passed on after the timeout.
    let t = Instant::now();
    let _s = TcpStream::connect(h.addr()).await.unwrap();
    let meta = h.next_seen().await;
    assert!(t.elapsed() >= Duration::from_millis(450));
    assert!(meta.get::<ProxyHeader>().is_none());

    // A detected header that is malformed is still rejected.
    let mut s = TcpStream::connect(h.addr()).await.unwrap();
    let _ = s.write_all(&bytes(&[SIG, &[0x31, 0x11, 0, 0]])).await;
    expect_closed(&mut s, Duration::from_secs(2)).await;
    assert!(h.next_error().await.contains("BadVersion"));
    h.assert_nothing_reached_inner();
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn peer_addr_from_header_is_opt_in() {
    let mut h = harness(
        ProxyProtocolLayer::required()
            .trusted(["127.0.0.1"])
            .peer_addr_from_header(true),
    )
    .await;
    let mut s = TcpStream::connect(h.addr()).await.unwrap();
    let me = s.local_addr().unwrap();
    let wire = v2("203.0.113.50:6000", "203.0.113.1:443").encode().unwrap();
    s.write_all(&[&wire[..], b"?"].concat()).await.unwrap();
    read_n(&mut s, 1).await;
    let meta = h.next_seen().await;
    assert_eq!(
        meta.get::<PeerAddr>().unwrap().0,
        "203.0.113.50:6000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(meta.get::<ProxiedBy>(), Some(&ProxiedBy(me)));
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn ipv6_listener_and_trusted_network() {
    let Ok(listener) = TcpListener::bind("[::1]:0").await else {
        println!("SKIPPED: no IPv6 loopback");
        return;
    };
    init_tracing();
    let addr = listener.local_addr().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let svc = ServiceBuilder::new()
        .layer(ProxyProtocolLayer::required().trusted(["::1/128"]))
        .service(capture(tx));
    let (_signal, watch) = proxystack::drain::channel();
    tokio::spawn(async move { Server::new().serve(listener, svc, watch).await });
    let mut s = TcpStream::connect(addr).await.unwrap();
    let wire = v2("[2001:db8::5]:7000", "[2001:db8::1]:443")
        .encode()
        .unwrap();
    s.write_all(&[&wire[..], b"6"].concat()).await.unwrap();
    assert_eq!(read_n(&mut s, 1).await, b"6");
    let meta = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        meta.get::<ProxiedAddrs>().unwrap().source,
        "[2001:db8::5]:7000".parse::<SocketAddr>().unwrap()
    );
}

// ---------------------------------------------------------------------------------------
// The connector without haproxy.

#[tokio::test]
async fn connector_sends_v2_with_tlvs_and_crc_before_payload() {
    let (upstream, mut heard) = header_reporting_upstream().await;
    let id = SpiffeId::parse(CLIENT_ID).unwrap();
    let src: SocketAddr = "10.244.0.5:43210".parse().unwrap();
    let dst: SocketAddr = "10.244.0.9:9080".parse().unwrap();
    let connector = ProxyProtocolConnector::new(tcp::TcpConnector::new()).crc32c(true);
    let target = Target::from(upstream).with(
        SendProxyHeader::proxy(src, dst)
            .identity(&id)
            .service("reviews.default.svc.cluster.local"),
    );
    let mut conn = connector.oneshot(target).await.unwrap();
    conn.write_all(b"payload").await.unwrap();
    conn.shutdown().await.unwrap();
    let (header, data) = heard.recv().await.unwrap();
    assert_eq!(header.version, Version::V2);
    assert_eq!(
        (header.source(), header.destination()),
        (Some(src), Some(dst))
    );
    assert_eq!(header.identity(), Some(CLIENT_ID));
    assert_eq!(header.service(), Some("reviews.default.svc.cluster.local"));
    assert!(header.tlv(PP2_TYPE_CRC32C).is_some(), "decode verified it");
    assert_eq!(data, b"payload");
}

#[tokio::test]
async fn connector_without_instructions_rejects_or_sends_local() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let err = ProxyProtocolConnector::new(tcp::TcpConnector::new())
        .oneshot(Target::from(addr))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProxyConnectError::MissingHeader(_)),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    // Rejected before connecting: nothing reached the listener.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), listener.accept())
            .await
            .is_err()
    );
    drop(listener);

    let (upstream, mut heard) = header_reporting_upstream().await;
    let mut conn = ProxyProtocolConnector::new(tcp::TcpConnector::new())
        .when_missing(MissingHeader::Local)
        .oneshot(Target::from(upstream))
        .await
        .unwrap();
    conn.shutdown().await.unwrap();
    let (header, data) = heard.recv().await.unwrap();
    assert_eq!(header, ProxyHeader::local());
    assert!(data.is_empty());
}

#[tokio::test]
async fn connector_reports_unencodable_headers_and_connect_failures() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let connector = ProxyProtocolConnector::new(tcp::TcpConnector::new());
    // A UNIQUE_ID longer than the spec's 128 bytes is refused before connecting.
    let bad = Target::from(dead).with(SendProxyHeader::local().tlv(
        proxystack::proxy_protocol::PP2_TYPE_UNIQUE_ID,
        vec![0u8; 129],
    ));
    let err = connector.clone().oneshot(bad).await.unwrap_err();
    assert!(matches!(err, ProxyConnectError::Encode(_)), "{err:?}");
    let err = connector
        .oneshot(Target::from(dead).with(SendProxyHeader::local()))
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyConnectError::Connect(_)), "{err:?}");
    assert!(err.is_retryable());
}
