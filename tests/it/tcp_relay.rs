//! L4 level: relay semantics over real loopback sockets.
#![cfg(feature = "tcp")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use proptest::prelude::*;
use proxystack::conn::Metadata;
use proxystack::tcp::{self, CloseKind, RelayConfig, Side};
use proxystack::{Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn relay_to(
    upstream: SocketAddr,
) -> tcp::Relay<tcp::TcpConnector, impl Fn(&Metadata) -> Option<Target> + Clone> {
    relay_via(upstream, true)
}

/// `splice` picks the relay's path: `splice(2)` (TCP↔TCP on Linux) or the portable copy loop.
fn relay_via(
    upstream: SocketAddr,
    splice: bool,
) -> tcp::Relay<tcp::TcpConnector, impl Fn(&Metadata) -> Option<Target> + Clone> {
    tcp::Relay::new(tcp::TcpConnector::new())
        .config(RelayConfig::new().splice(splice))
        .upstream(move |_: &Metadata| Some(Target::from(upstream)))
}

/// Writes `data` in `chunk`-sized pieces, optionally waiting first, then half-closes.
async fn send_chunked(
    w: &mut (impl AsyncWriteExt + Unpin),
    data: &[u8],
    chunk: usize,
    delay_ms: u64,
) {
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    for piece in data.chunks(chunk.max(1)) {
        w.write_all(piece).await.unwrap();
    }
    w.shutdown().await.unwrap();
}

/// Reads to EOF, then checks that EOF is sticky (seen exactly once, nothing after).
async fn recv_all(r: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    let mut probe = [0u8; 1];
    assert_eq!(r.read(&mut probe).await.unwrap(), 0, "data after EOF");
    out
}

async fn bidirectional_case(
    up_data: Vec<u8>,
    down_data: Vec<u8>,
    chunks: (usize, usize),
    delays: (u64, u64),
    splice: bool,
) {
    // The upstream sends `down_data` and collects what it receives, concurrently.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let server_side = {
        let down_data = down_data.clone();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            let (_, got) = tokio::join!(
                send_chunked(&mut w, &down_data, chunks.1, delays.1),
                recv_all(&mut r)
            );
            got
        })
    };
    let proxy = start(Server::new(), relay_via(upstream_addr, splice)).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut r, mut w) = client.split();
    let (_, client_got) = tokio::join!(
        send_chunked(&mut w, &up_data, chunks.0, delays.0),
        recv_all(&mut r)
    );
    let server_got = server_side.await.unwrap();
    assert!(
        client_got == down_data,
        "downstream bytes differ ({} vs {})",
        client_got.len(),
        down_data.len()
    );
    assert!(
        server_got == up_data,
        "upstream bytes differ ({} vs {})",
        server_got.len(),
        up_data.len()
    );
    drop(client);
    proxy.shutdown().await;
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    // Mostly small, sometimes up to 4 MiB; content is random so reordering would show.
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..4096),
        1 => (0usize..4 << 20).prop_map(|n| (0..n).map(|i| (i * 31 % 251) as u8).collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn relay_is_byte_identical_with_any_half_close_order(
        up in payload(), down in payload(),
        chunk_up in 1usize..70_000, chunk_down in 1usize..70_000,
        delay_up in 0u64..20, delay_down in 0u64..20,
        splice in any::<bool>(),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(bidirectional_case(up, down, (chunk_up, chunk_down), (delay_up, delay_down), splice));
    }
}

#[tokio::test]
async fn half_close_keeps_other_direction_flowing() {
    // Client sends and half-closes first; the server answers only after seeing EOF.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(&req.repeat(3)).await.unwrap();
    });
    let proxy = start(Server::new(), relay_to(addr)).await;
    assert_eq!(round_trip(proxy.addr, b"abc").await, b"abcabcabc");
    proxy.shutdown().await;
}

#[tokio::test]
async fn server_first_protocol_works() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"220 hello\r\n").await.unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
    });
    let proxy = start(Server::new(), relay_to(addr)).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let mut greeting = [0u8; 11];
    c.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 hello\r\n");
    c.write_all(b"QUIT\r\n").await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"QUIT\r\n");
}

fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

#[tokio::test]
async fn upstream_reset_reaches_client_as_reset() {
    for splice in [true, false] {
        upstream_reset_case(splice).await;
    }
}

async fn upstream_reset_case(splice: bool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&[7u8; 100_000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        reset(s);
    });
    let proxy = start(Server::new(), relay_via(addr, splice)).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let mut sink = Vec::new();
    let err = c
        .read_to_end(&mut sink)
        .await
        .expect_err("a reset, not a clean EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_reset_reaches_upstream_as_reset() {
    for splice in [true, false] {
        client_reset_case(splice).await;
    }
}

async fn client_reset_case(splice: bool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut sink = Vec::new();
        s.read_to_end(&mut sink).await
    });
    let proxy = start(Server::new(), relay_via(addr, splice)).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"partial request").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    reset(c);
    let err = upstream
        .await
        .unwrap()
        .expect_err("a reset, not a clean EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    proxy.shutdown().await;
}

#[tokio::test]
async fn relay_function_reports_stats() {
    let (mut a_near, mut a_far) = loopback_pair().await;
    let (mut b_near, mut b_far) = loopback_pair().await;
    let relay = tokio::spawn(async move { tcp::relay(&mut a_far, &mut b_far).await });
    a_near.write_all(b"hello").await.unwrap();
    a_near.shutdown().await.unwrap();
    let mut got = Vec::new();
    // b sees the bytes and the FIN, then answers and closes.
    b_near.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello");
    b_near.write_all(b"world!").await.unwrap();
    b_near.shutdown().await.unwrap();
    let mut back = Vec::new();
    a_near.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"world!");
    let stats = relay.await.unwrap();
    assert!(stats.result.is_ok());
    assert_eq!((stats.bytes_up, stats.bytes_down), (5, 6));
    let first = stats.first_close.unwrap();
    assert_eq!((first.side, first.kind), (Side::Downstream, CloseKind::Eof));
}

async fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

#[tokio::test]
async fn idle_timeout_closes_quiet_connections() {
    let (mut a_near, mut a_far) = loopback_pair().await;
    let (_b_near, mut b_far) = loopback_pair().await;
    let config = RelayConfig::new().idle_timeout(Some(Duration::from_millis(200)));
    let relay = tokio::spawn(async move { tcp::relay_with(&mut a_far, &mut b_far, &config).await });
    // Activity pushes the deadline out.
    for _ in 0..3 {
        a_near.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!relay.is_finished(), "timed out despite activity");
    let stats = tokio::time::timeout(Duration::from_secs(5), relay)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(stats.result, Err(tcp::RelayError::IdleTimeout(_))),
        "{:?}",
        stats.result
    );
    assert_eq!(stats.bytes_up, 3);
}

#[tokio::test]
async fn total_timeout_ends_busy_relays() {
    let (_a_near, mut a_far) = loopback_pair().await;
    let (_b_near, mut b_far) = loopback_pair().await;
    let config = RelayConfig::new().total_timeout(Some(Duration::from_millis(100)));
    let stats = tokio::time::timeout(
        Duration::from_secs(5),
        tcp::relay_with(&mut a_far, &mut b_far, &config),
    )
    .await
    .unwrap();
    assert!(matches!(
        stats.result,
        Err(tcp::RelayError::TotalTimeout(_))
    ));
}

#[tokio::test]
async fn upstream_connect_failure_closes_client() {
    // A port with nothing listening.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start(Server::new(), relay_to(dead)).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(n.is_ok_and(|n| n == 0) || buf.is_empty());
    // The proxy still serves.
    let echo = echo_server().await;
    let proxy2 = start(Server::new(), relay_to(echo)).await;
    assert_eq!(round_trip(proxy2.addr, b"ok").await, b"ok");
    assert!(proxy.stats.errors.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn connection_limit_holds_under_burst() {
    const LIMIT: usize = 8;
    // An upstream that counts concurrent connections and holds each for a while.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let live = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    {
        let (live, peak) = (live.clone(), peak.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (live, peak) = (live.clone(), peak.clone());
                tokio::spawn(async move {
                    let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    live.fetch_sub(1, Ordering::SeqCst);
                    let _ = s.write_all(b"done").await;
                });
            }
        });
    }
    let proxy = start(Server::new().max_connections(LIMIT), relay_to(addr)).await;
    let clients: Vec<_> = (0..LIMIT * 2)
        .map(|_| {
            let a = proxy.addr;
            tokio::spawn(async move {
                let mut c = TcpStream::connect(a).await.unwrap();
                let mut buf = Vec::new();
                c.read_to_end(&mut buf).await.unwrap();
                buf
            })
        })
        .collect();
    for c in clients {
        assert_eq!(
            c.await.unwrap(),
            b"done",
            "every client is served eventually"
        );
    }
    assert!(
        peak.load(Ordering::SeqCst) <= LIMIT,
        "peak {} > limit",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(
        proxy.stats.accepted.load(Ordering::Relaxed),
        (LIMIT * 2) as u64
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn drain_lets_inflight_finish_and_refuses_new() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = s.write_all(b"late answer").await;
            });
        }
    });
    let mut proxy = start(
        Server::new().drain_timeout(Duration::from_secs(5)),
        relay_to(addr),
    )
    .await;
    let mut inflight = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.signal.take().unwrap().start();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(proxy.addr).await.is_err(),
        "listener closed during drain"
    );
    let mut answer = Vec::new();
    inflight.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"late answer");
    tokio::time::timeout(Duration::from_secs(5), proxy.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn drain_deadline_forces_close() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // never answers, never closes
        }
    });
    let mut proxy = start(
        Server::new().drain_timeout(Duration::from_millis(200)),
        relay_to(addr),
    )
    .await;
    let mut stuck = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.signal.take().unwrap().start();
    tokio::time::timeout(Duration::from_secs(5), proxy.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(proxy.stats.aborted.load(Ordering::Relaxed), 1);
    let mut buf = Vec::new();
    // Aborted: the client sees the connection end.
    let _ = tokio::time::timeout(Duration::from_secs(5), stuck.read_to_end(&mut buf))
        .await
        .unwrap();
}

#[tokio::test]
async fn slow_reader_applies_backpressure() {
    for splice in [true, false] {
        slow_reader_case(splice).await;
    }
}

async fn slow_reader_case(splice: bool) {
    // The upstream accepts and never reads: the relay must stop reading from the client
    // instead of buffering without bound.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (_s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let proxy = start(Server::new(), relay_via(addr, splice)).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), c.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break, // stalled: backpressure reached the client
        }
        assert!(
            written < 64 << 20,
            "relay kept accepting data: {written} bytes"
        );
    }
    // Kernel buffers on both hops plus one relay buffer (256 KiB) is all it may hold.
    assert!(written < 32 << 20, "{written} bytes buffered");
}

/// EMFILE: in a child process with a tiny RLIMIT_NOFILE the accept loop must survive
/// running out of descriptors and serve again once some are free.
#[test]
fn accept_loop_survives_emfile() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "tcp_relay::emfile_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PROXYSTACK_EMFILE_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("EMFILE-CHILD-OK"), "{stdout}");
}

#[test]
fn emfile_child() {
    if std::env::var_os("PROXYSTACK_EMFILE_CHILD").is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The echo server shares this process's descriptor limit: it must outlive EMFILE.
        let echo = echo_server().await;
        let proxy = start(Server::new(), relay_to(echo)).await;
        let base = open_fds() as u64;
        let limit = base + 24;
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: setrlimit with a valid pointer to an initialized struct.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) }, 0);
        // Hold many client sockets open (each relayed connection needs 2 more fds), so the
        // proxy runs out of descriptors. Client connects themselves may fail too.
        let mut held = Vec::new();
        for _ in 0..40 {
            match TcpStream::connect(proxy.addr).await {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let errors = proxy.stats.accept_errors.load(Ordering::Relaxed);
        drop(held);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The loop is alive: a fresh client is relayed.
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            round_trip(proxy.addr, b"still alive"),
        )
        .await
        .unwrap();
        assert_eq!(got, b"still alive");
        println!("accept_errors={errors} EMFILE-CHILD-OK");
    });
}

#[tokio::test]
async fn idle_timeout_applies_on_both_paths() {
    for splice in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let relay = tcp::Relay::new(tcp::TcpConnector::new())
            .config(
                RelayConfig::new()
                    .splice(splice)
                    .idle_timeout(Some(Duration::from_millis(200))),
            )
            .upstream(move |_: &Metadata| Some(Target::from(addr)));
        let proxy = start(Server::new(), relay).await;
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        let mut buf = Vec::new();
        // The quiet relay is closed by the proxy well before the upstream's 30 s.
        let closed = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "splice={splice}: idle relay not closed");
    }
}

/// Issue 15 item 2: an upstream reset reaches the client as a reset through every wrapper
/// between the relay and the client's socket — here a replay buffer nested twice, and TLS
/// terminated over a boxed stream (detection in front) — because each wrapper passes
/// `Io::tcp_socket` on instead of being looked up in a list of known types.
#[tokio::test]
async fn upstream_reset_reaches_the_client_through_nested_wrappers() {
    use proxystack::{BoxIo, Conn, PrefixedIo};
    use tower::ServiceExt;

    let upstream = || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&[7u8; 10_000]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            reset(s);
        });
        addr
    };

    // BoxIo<PrefixedIo<PrefixedIo<TcpStream>>>; with nothing left to replay the splice
    // path sees through them too.
    for splice in [false, true] {
        let relay = relay_via(upstream().await, splice);
        let nested = tower::service_fn(move |conn: Conn<TcpStream>| {
            let relay = relay.clone();
            let (io, meta) = conn.into_parts();
            let io = PrefixedIo::new(&b""[..], PrefixedIo::new(&b""[..], io));
            relay.oneshot(Conn::from_parts(BoxIo::new(io), meta))
        });
        let proxy = start(Server::new(), nested).await;
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        let err = c.read_to_end(&mut Vec::new()).await.expect_err("a reset");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset,
            "splice {splice}"
        );
        proxy.shutdown().await;
    }

    #[cfg(all(feature = "detect", feature = "demo-certs"))]
    {
        use proxystack::detect::{DetectLayer, Router};
        use proxystack::tls::{demo::DemoCa, ServerConfigBuilder, TerminateLayer};
        use tower::ServiceBuilder;
        let ca = DemoCa::new("example.org");
        let config = ServerConfigBuilder::new()
            .default_cert(ca.server_cert(&["localhost"]))
            .build()
            .unwrap();
        // TlsStream<BoxIo<PrefixedIo<TcpStream>>>, boxed again for the relay.
        let tls = ServiceBuilder::new()
            .layer(TerminateLayer::new(config))
            .service(relay_via(upstream().await, false));
        let svc = ServiceBuilder::new()
            .layer(DetectLayer::new())
            .service(Router::new().tls(tls));
        let proxy = start(Server::new(), svc).await;
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(ca.roots())
            .with_no_client_auth();
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
            .connect(name, tcp)
            .await
            .unwrap();
        let err = c.read_to_end(&mut Vec::new()).await.expect_err("a reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        proxy.shutdown().await;
    }
}

/// What the accept loop no longer asks or sets per connection is still right: on Linux
/// `TCP_NODELAY` and keepalive are set once on the listener and every accepted socket has
/// them; `LocalAddr` of a listener bound to one address is that address without a
/// `getsockname`; a connector's `PeerAddr` is the address it dialled.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn accepted_sockets_inherit_options_and_addresses_are_right() {
    use proxystack::conn::{Conn, LocalAddr, PeerAddr};
    type Seen = (
        bool,
        bool,
        Duration,
        Duration,
        Option<SocketAddr>,
        SocketAddr,
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Seen>(4);
    let svc = tower::service_fn(move |conn: Conn<TcpStream>| {
        let tx = tx.clone();
        async move {
            let sock = socket2::SockRef::from(conn.io());
            let seen = (
                sock.tcp_nodelay()?,
                sock.keepalive()?,
                sock.tcp_keepalive_time()?,
                sock.tcp_keepalive_interval()?,
                conn.get::<LocalAddr>().map(|a| a.0),
                conn.io().local_addr()?,
            );
            let _ = tx.send(seen).await;
            Ok::<(), std::io::Error>(())
        }
    });
    let server = Server::new().tcp_keepalive(Some(Duration::from_secs(42)));
    let proxy = start(server, svc).await;
    for _ in 0..3 {
        let _c = TcpStream::connect(proxy.addr).await.unwrap();
        let (nodelay, keepalive, idle, interval, recorded, actual) =
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
        assert!(nodelay && keepalive);
        assert_eq!(idle, Duration::from_secs(42));
        assert_eq!(interval, Duration::from_secs(10));
        assert_eq!(recorded, Some(actual));
        assert_eq!(actual, proxy.addr);
    }
    proxy.shutdown().await;

    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = origin.local_addr().unwrap();
    let conn = tcp::TcpConnector::new()
        .connect(&Target::from(addr))
        .await
        .unwrap();
    assert_eq!(conn.get::<PeerAddr>().map(|p| p.0), Some(addr));
    assert_eq!(
        conn.get::<LocalAddr>().map(|l| l.0),
        conn.io().local_addr().ok()
    );
}

/// Connections that completed their handshake before `serve` set the options on the
/// listener were cloned without them: the accept loop sets them on those itself.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn connections_queued_before_serve_get_the_options_too() {
    use proxystack::conn::Conn;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Queued in the kernel before the accept loop runs.
    let _early: Vec<TcpStream> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(TcpStream::connect(addr).await.unwrap());
        }
        v
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(bool, bool)>(8);
    let svc = tower::service_fn(move |conn: Conn<TcpStream>| {
        let tx = tx.clone();
        async move {
            let sock = socket2::SockRef::from(conn.io());
            let _ = tx.send((sock.tcp_nodelay()?, sock.keepalive()?)).await;
            Ok::<(), std::io::Error>(())
        }
    });
    let (signal, watch) = proxystack::drain::channel();
    let task = tokio::spawn(async move { Server::new().serve(listener, svc, watch).await });
    let _late = TcpStream::connect(addr).await.unwrap();
    for _ in 0..4 {
        let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, (true, true));
    }
    signal.start();
    signal.drain().await;
    task.await.unwrap().unwrap();
}

/// `admission::RecheckLayer` in front of a relay: a connection the policy in force refuses
/// never dials; a running one is cut (both sides closed) once a policy change refuses it,
/// while the ones it still allows keep flowing.
#[tokio::test]
async fn recheck_cuts_relays_a_changed_policy_refuses() {
    use proxystack::admission::RecheckLayer;
    use proxystack::conn::PeerAddr;

    let echo = echo_server().await;
    // The policy: the client ports allowed. Every client here is 127.0.0.1, so ports
    // tell the connections apart.
    let (policy, watched) = tokio::sync::watch::channel(Vec::<u16>::new());
    let layer = RecheckLayer::new(watched, |m: &Metadata| {
        let port = m.get::<PeerAddr>().map(|p| p.0.port());
        move |allowed: &Vec<u16>| port.is_some_and(|p| allowed.contains(&p))
    });
    let proxy = start(
        Server::new(),
        tower::ServiceBuilder::new()
            .layer(layer)
            .service(relay_to(echo)),
    )
    .await;
    let io = Duration::from_secs(5);

    // Not allowed: closed without a byte.
    let mut refused = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = Vec::new();
    let end = tokio::time::timeout(io, refused.read_to_end(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "{end:?}");

    // Bound before connecting: the policy knows their ports before they reach the layer.
    let bound = || {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
        socket
    };
    let (cut, kept) = (bound(), bound());
    let ports = [
        cut.local_addr().unwrap().port(),
        kept.local_addr().unwrap().port(),
    ];
    policy.send_replace(ports.to_vec());
    let mut cut = cut.connect(proxy.addr).await.unwrap();
    let mut kept = kept.connect(proxy.addr).await.unwrap();
    for s in [&mut cut, &mut kept] {
        s.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(io, s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"ping");
    }
    policy.send_replace(vec![ports[1]]);
    let end = tokio::time::timeout(io, cut.read_to_end(&mut buf)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "still relayed: {end:?}"
    );
    kept.write_all(b"pong").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(io, kept.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"pong");
    drop((refused, cut, kept));
    proxy.shutdown().await;
}
