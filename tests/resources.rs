//! Resource bounds with many connections (issue 10 part 3): 10 000 idle connections through
//! the TCP relay, the HTTP server and HBONE tunnels (descriptors and RSS per connection,
//! every one still works at the end), the accept loop's connection limit (never more than
//! the limit at once; the excess waits in the kernel's listen backlog and is served once
//! others close), connection storms with and without client resets (nothing is left
//! behind), and the HTTP server's cut-off of connections that never send a request.
//!
//! Everything runs in this one process, which holds both ends (clients, proxy, upstreams):
//! the numbers printed are for all of them together. The tests read process-wide numbers
//! (`/proc/self/fd`, `VmRSS`), so they take a lock and run one at a time, each on its own
//! runtime. They raise `RLIMIT_NOFILE` themselves; where the hard limit cannot be raised
//! (no `CAP_SYS_RESOURCE`), the idle tests hold as many connections as fit under it and
//! say so on stderr, and a test skips, saying why, only when too few would fit.
//! Memory is asserted only against a generous bound; time is never asserted.
#![cfg(all(feature = "http", feature = "hbone", feature = "demo-certs"))]

#[path = "it/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use proxystack::conn::Metadata;
use proxystack::connect::TunnelInfo;
use proxystack::hbone::{self, HboneTarget, Inbound};
use proxystack::http::{HttpServer, Incoming};
use proxystack::identity::SpiffeId;
use proxystack::tls::demo::DemoCa;
use proxystack::{tcp, Authority, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Idle connections per test.
const N: usize = 10_000;
/// Per connection, all ends together; generous on purpose (allocator slack counts too).
const MAX_RSS_PER_CONN_KIB: u64 = 64;
/// Connects in flight at once while opening many connections.
const OPENING: usize = 256;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one test alone (process-wide numbers) on a fresh two-worker runtime; dropping the
/// runtime afterwards closes whatever the test left open.
fn run(test: impl Future<Output = ()>) {
    let _alone = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test);
}

/// The soft `RLIMIT_NOFILE`.
fn nofile() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

/// Raises `RLIMIT_NOFILE` to `want` (soft, and hard if it is lower, which needs
/// `CAP_SYS_RESOURCE`).
fn raise_nofile(want: u64) -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    let want = want as libc::rlim_t;
    if lim.rlim_cur >= want {
        return Ok(());
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        let e = std::io::Error::last_os_error();
        // Without CAP_SYS_RESOURCE the hard limit stays; use all of it.
        let soft = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
        return Err(format!(
            "setrlimit to {want} (soft {}, hard {}): {e}",
            lim.rlim_cur, lim.rlim_max
        ));
    }
    Ok(())
}

/// How many connections a test holds at once: [`N`] when the descriptor limit can be
/// raised for `fds_per_conn` each plus `reserve`, else as many as fit under the limit
/// there is (said on stderr); `None` (skip) below 1 000.
fn connections(fds_per_conn: usize, reserve: usize) -> Option<usize> {
    let want = N * fds_per_conn + reserve + open_fds();
    match raise_nofile(want as u64) {
        Ok(()) => Some(N),
        Err(why) => {
            let fit = nofile().saturating_sub(open_fds() + reserve) / fds_per_conn;
            let n = fit.min(N);
            if n < 1_000 {
                eprintln!("SKIPPED: {why}; only {n} connections would fit");
                return None;
            }
            eprintln!("NOTE: {why}; holding {n} connections instead of {N}");
            Some(n)
        }
    }
}

/// Skips the test (with the reason on stderr) when fewer than `n` descriptors may be open.
macro_rules! need_fds {
    ($n:expr) => {
        if let Err(why) = raise_nofile($n) {
            if nofile() < $n {
                eprintln!("SKIPPED: {why}");
                return;
            }
        }
    };
}

/// This process's resident set size in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn relay_to(
    upstream: SocketAddr,
) -> tcp::Relay<tcp::TcpConnector, impl Fn(&Metadata) -> Option<Target> + Clone> {
    tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &Metadata| Some(Target::from(upstream)))
}

/// Like `common::start`, with a listen backlog of 4096 instead of tokio's 128: clients
/// whose handshake completes while the accept queue is full are dropped by the kernel
/// without telling them, and an idle client would wait forever.
async fn serve_on<S>(server: Server, svc: S) -> Running
where
    S: tower::Service<proxystack::Conn<TcpStream>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let addr = listener.local_addr().unwrap();
    let (signal, watch) = proxystack::drain::channel();
    let stats = server.stats();
    let task = tokio::spawn(async move { server.serve(listener, svc, watch).await });
    Running {
        addr,
        signal: Some(signal),
        task,
        stats,
    }
}

/// An HTTP handler that answers every request `200 ok`.
fn ok_service() -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

/// Opens `n` connections to `addr` served by a server with these `stats`, keeping at most
/// [`OPENING`] of them not yet accepted.
async fn open_many(
    addr: SocketAddr,
    n: usize,
    stats: &Arc<proxystack::serve::ServeStats>,
) -> Vec<TcpStream> {
    let accepted0 = stats.accepted.load(SeqCst) as usize;
    let mut out = Vec::with_capacity(n);
    let mut set = JoinSet::new();
    for i in 0..n {
        let waited = eventually(Duration::from_secs(30), || {
            i < stats.accepted.load(SeqCst) as usize - accepted0 + OPENING
        })
        .await;
        assert!(waited, "the server stopped accepting at {i}");
        set.spawn(async move {
            tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(addr))
                .await
                .expect("connect in time")
                .expect("connect")
        });
        while let Some(s) = set.try_join_next() {
            out.push(s.unwrap());
        }
    }
    while let Some(s) = set.join_next().await {
        out.push(s.unwrap());
    }
    out
}

/// Runs `f` on every stream, [`OPENING`] at a time, and returns what each gave back
/// (the stream itself, to keep it open).
async fn on_each<S, T, F, Fut>(streams: Vec<S>, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, S) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(OPENING));
    let mut set = JoinSet::new();
    let n = streams.len();
    for (i, s) in streams.into_iter().enumerate() {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let job = f(i, s);
        set.spawn(async move {
            let s = job.await;
            drop(permit);
            s
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(s) = set.join_next().await {
        out.push(s.unwrap());
    }
    out
}

/// Writes one byte and reads it back.
async fn echo_byte(s: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), byte: u8) {
    s.write_all(&[byte]).await.unwrap();
    let mut got = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(got[0], byte);
}

/// Sends a keep-alive `GET /` and reads exactly one response; returns its head.
async fn h1_get(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: res.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    assert_eq!(buf.len(), end + 4 + len, "one response only");
                    return head;
                }
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed mid-response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("response in time")
}

/// Waits until the server holds no connection and the descriptor count is back within
/// `margin` of `baseline` (plus the splice pipes the two runtime threads may keep pooled).
async fn assert_released(stats: &proxystack::serve::ServeStats, baseline: usize, margin: usize) {
    let margin = margin + 2 * SPLICE_POOL_FDS_PER_THREAD;
    assert!(
        eventually(Duration::from_secs(30), || stats.active.load(SeqCst) == 0).await,
        "server still holds {} connections",
        stats.active.load(SeqCst)
    );
    assert!(
        eventually(Duration::from_secs(10), || open_fds() <= baseline + margin).await,
        "descriptors: {} now, {baseline} before",
        open_fds()
    );
}

fn per_conn(after: u64, before: u64, n: usize) -> f64 {
    after.saturating_sub(before) as f64 / n as f64
}

/// Idle relays cost four descriptors each here (client, accepted, upstream, the upstream's
/// socket) and no splice pipe; a pipe pair per direction appears with the first byte.
#[test]
fn relay_holds_10k_idle_connections_and_each_still_echoes() {
    // Up to OPENING relays hold their pipes at once at the end, PIPE_SAMPLE while measured.
    const PIPE_SAMPLE: usize = 256;
    let Some(n) = connections(4, 4 * OPENING.max(PIPE_SAMPLE) + 512) else {
        return;
    };
    run(async move {
        let (echo, upstream) = counting_echo_server().await;
        let proxy = serve_on(Server::new(), relay_to(echo)).await;
        assert_eq!(round_trip(proxy.addr, b"warm").await, b"warm");
        assert!(
            eventually(Duration::from_secs(5), || proxy.stats.active.load(SeqCst)
                == 0)
            .await
        );
        let (fds0, rss0) = (open_fds(), rss_kib());

        let mut clients = open_many(proxy.addr, n, &proxy.stats).await;
        assert!(
            eventually(Duration::from_secs(30), || {
                proxy.stats.active.load(SeqCst) == n as u64 && upstream.live.load(SeqCst) == n
            })
            .await,
            "active {}, upstream {}",
            proxy.stats.active.load(SeqCst),
            upstream.live.load(SeqCst)
        );
        let (fds1, rss1) = (open_fds(), rss_kib());
        let rss = per_conn(rss1, rss0, n);
        eprintln!(
            "relay, {n} idle: {:.2} fds and {rss:.2} KiB RSS per connection \
             (client + proxy + upstream, one process)",
            per_conn(fds1 as u64, fds0 as u64, n)
        );
        assert!(
            (fds1 - fds0).abs_diff(4 * n) <= 32,
            "{} descriptors for {n} idle relays",
            fds1 - fds0
        );
        assert!(
            rss < MAX_RSS_PER_CONN_KIB as f64,
            "{rss:.2} KiB per idle relay"
        );

        // A few relays that moved a byte each way, kept open: their pipes.
        let rest = clients.split_off(PIPE_SAMPLE);
        let sample = on_each(clients, |i, mut s| async move {
            echo_byte(&mut s, (i % 251) as u8).await;
            s
        })
        .await;
        let fds2 = open_fds();
        eprintln!(
            "relay: {:.2} more fds per relay once a byte moved each way (splice pipes)",
            per_conn(fds2 as u64, fds1 as u64, PIPE_SAMPLE)
        );
        assert_eq!(proxy.stats.active.load(SeqCst), n as u64);
        drop(sample);

        // Every other relay still works; each closes after its byte, so that not all of
        // them hold pipes at once.
        let echoed = Arc::new(AtomicUsize::new(PIPE_SAMPLE));
        let e = echoed.clone();
        on_each(rest, move |i, mut s| {
            let e = e.clone();
            async move {
                echo_byte(&mut s, (i % 251) as u8).await;
                e.fetch_add(1, SeqCst);
            }
        })
        .await;
        assert_eq!(echoed.load(SeqCst), n);
        assert_released(&proxy.stats, fds0, 16).await;
        assert!(eventually(Duration::from_secs(10), || upstream.live.load(SeqCst) == 0).await);
        assert_eq!(proxy.stats.errors.load(SeqCst), 0);
        proxy.shutdown().await;
    });
}

/// `Server::max_connections(L)`: at the limit the accept loop stops accepting; clients
/// beyond it complete the TCP handshake in the kernel's listen backlog and wait, unserved,
/// until a connection closes. The test keeps at most `L + EXCESS` clients at once, fewer
/// than the listen backlog (4096): past the backlog the kernel drops handshakes and
/// clients wait for retransmits, seconds apart.
#[test]
fn connection_limit_is_never_exceeded_and_the_excess_waits() {
    const L: usize = 1_000;
    const EXCESS: usize = 500;
    need_fds!(12_000);
    run(async {
        let (echo, upstream) = counting_echo_server().await;
        let proxy = serve_on(Server::new().max_connections(L), relay_to(echo)).await;
        let addr = proxy.addr;
        let fds0 = open_fds();

        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (stats, stop) = (proxy.stats.clone(), stop.clone());
            tokio::spawn(async move {
                let mut peak = 0;
                while !stop.load(SeqCst) {
                    peak = peak.max(stats.active.load(SeqCst));
                    assert!(peak <= L as u64, "{peak} connections open, limit {L}");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                peak
            })
        };

        let connected = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let clients = {
            let (connected, served) = (connected.clone(), served.clone());
            tokio::spawn(async move {
                let gate = Arc::new(Semaphore::new(L + EXCESS));
                let mut set = JoinSet::new();
                for i in 0..N {
                    let permit = gate.clone().acquire_owned().await.unwrap();
                    let (connected, served) = (connected.clone(), served.clone());
                    let mut released = released.clone();
                    set.spawn(async move {
                        let _permit = permit;
                        let mut s =
                            tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(addr))
                                .await
                                .expect("connect in time")
                                .expect("connect");
                        connected.fetch_add(1, SeqCst);
                        echo_byte(&mut s, (i % 251) as u8).await;
                        served.fetch_add(1, SeqCst);
                        if i < L + EXCESS {
                            // The first wave holds its connections until the test looked.
                            let _ = released.wait_for(|r| *r).await;
                        } else {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    });
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap();
                }
            })
        };

        // First wave: L served and held, EXCESS connected (in the backlog) but unserved.
        assert!(
            eventually(Duration::from_secs(30), || {
                connected.load(SeqCst) == L + EXCESS && served.load(SeqCst) == L
            })
            .await,
            "connected {}, served {}",
            connected.load(SeqCst),
            served.load(SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(served.load(SeqCst), L, "served beyond the limit");
        assert_eq!(proxy.stats.accepted.load(SeqCst), L as u64);
        assert_eq!(proxy.stats.active.load(SeqCst), L as u64);
        assert_eq!(upstream.live.load(SeqCst), L);
        let held = open_fds() - fds0;
        eprintln!(
            "limit {L}: {} clients connected, {L} served; {held} descriptors in the process \
             (clients {} + per served relay: accepted, upstream, 4 pipe ends, upstream's socket)",
            L + EXCESS,
            L + EXCESS
        );
        assert!(
            held <= (L + EXCESS) + 7 * L + 32,
            "{held} descriptors: the excess was accepted?"
        );

        // Release the first wave: the waiting clients are served as others close.
        release.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(50), clients)
            .await
            .expect("every client served")
            .unwrap();
        stop.store(true, SeqCst);
        let peak = sampler.await.unwrap();
        assert_eq!(served.load(SeqCst), N);
        assert_eq!(proxy.stats.accepted.load(SeqCst), N as u64);
        assert_eq!(peak, L as u64, "the limit is reached, never passed");
        eprintln!("limit {L}: {N} clients served, peak {peak} open at once");
        assert_released(&proxy.stats, fds0, 16).await;
        proxy.shutdown().await;
    });
}

#[test]
fn http_server_holds_10k_idle_keepalive_connections() {
    let Some(n) = connections(2, 1024) else {
        return;
    };
    run(async move {
        // Long enough that no idle connection is cut while the test runs (see
        // http_server_closes_connections_that_send_no_request_in_time for the cut).
        let server =
            HttpServer::new(ok_service()).header_read_timeout(Some(Duration::from_secs(300)));
        let proxy = serve_on(Server::new(), server).await;
        let mut warm = TcpStream::connect(proxy.addr).await.unwrap();
        h1_get(&mut warm).await;
        drop(warm);
        assert!(
            eventually(Duration::from_secs(5), || proxy.stats.active.load(SeqCst)
                == 0)
            .await
        );
        let (fds0, rss0) = (open_fds(), rss_kib());

        // Half sent nothing yet, half sent one request and idle on the kept-alive connection.
        let clients = open_many(proxy.addr, n, &proxy.stats).await;
        let clients = on_each(clients, |i, mut s| async move {
            if i % 2 == 1 {
                let head = h1_get(&mut s).await;
                assert!(head.starts_with("http/1.1 200"), "{head}");
            }
            s
        })
        .await;
        assert!(
            eventually(Duration::from_secs(30), || proxy.stats.active.load(SeqCst)
                == n as u64)
            .await,
            "active {}",
            proxy.stats.active.load(SeqCst)
        );
        let (fds1, rss1) = (open_fds(), rss_kib());
        let rss = per_conn(rss1, rss0, n);
        eprintln!(
            "http, {n} idle (half silent, half after one request): {:.2} fds and {rss:.2} KiB \
             RSS per connection (client + server, one process)",
            per_conn(fds1 as u64, fds0 as u64, n)
        );
        assert!((fds1 - fds0).abs_diff(2 * n) <= 32, "{}", fds1 - fds0);
        assert!(
            rss < MAX_RSS_PER_CONN_KIB as f64,
            "{rss:.2} KiB per idle HTTP connection"
        );

        // Every connection still works (and stays kept alive).
        let clients = on_each(clients, |_, mut s| async move {
            let head = h1_get(&mut s).await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
            s
        })
        .await;
        assert_eq!(proxy.stats.active.load(SeqCst), n as u64);
        drop(clients);
        assert_released(&proxy.stats, fds0, 16).await;
        assert_eq!(proxy.stats.errors.load(SeqCst), 0);
        proxy.shutdown().await;
    });
}

/// 10 000 HBONE tunnels (mutual TLS + HTTP/2 CONNECT) at once, multiplexed by the pooled
/// client at its default 100 streams per connection (the server allows 200), each relayed
/// to an echo upstream.
#[test]
fn hbone_holds_10k_idle_tunnels() {
    // Two per tunnel (upstream and its accepted socket); the mTLS connections are few.
    let Some(n) = connections(2, 1024) else {
        return;
    };
    run(async move {
        let ca = DemoCa::new("cluster.local");
        let (app, upstream) = counting_echo_server().await;
        let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |c: &Metadata| {
            let port = c.get::<TunnelInfo>()?.authority.port();
            Some(Target::from((app.ip(), port)))
        });
        let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
            .service(relay)
            .unwrap();
        let proxy = serve_on(Server::new(), inbound).await;
        let connector =
            hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots()).unwrap();
        let server_id = SpiffeId::istio("cluster.local", "default", "server").unwrap();
        let target = HboneTarget::new(
            proxy.addr,
            Authority::from(SocketAddr::new(proxy.addr.ip(), app.port())),
            [server_id],
        )
        .into_target();
        let mut warm = connector.clone().oneshot(target.clone()).await.unwrap();
        echo_byte(&mut warm, 1).await;
        drop(warm);
        assert!(eventually(Duration::from_secs(5), || upstream.live.load(SeqCst) == 0).await);
        let (fds0, rss0) = (open_fds(), rss_kib());

        let gate = Arc::new(Semaphore::new(OPENING));
        let mut set = JoinSet::new();
        for _ in 0..n {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let (connector, target) = (connector.clone(), target.clone());
            set.spawn(async move {
                let t = tokio::time::timeout(Duration::from_secs(30), connector.oneshot(target))
                    .await
                    .expect("tunnel in time")
                    .expect("tunnel");
                drop(permit);
                t
            });
        }
        let mut tunnels = Vec::with_capacity(n);
        while let Some(t) = set.join_next().await {
            tunnels.push(t.unwrap());
        }
        assert!(
            eventually(Duration::from_secs(30), || upstream.live.load(SeqCst) == n).await,
            "upstream connections {}",
            upstream.live.load(SeqCst)
        );
        let (fds1, rss1) = (open_fds(), rss_kib());
        let rss = per_conn(rss1, rss0, n);
        let h2_connections = connector.connections_dialled();
        eprintln!(
            "hbone, {n} idle tunnels over {h2_connections} mTLS HTTP/2 connections: {:.2} fds \
             and {rss:.2} KiB RSS per tunnel (client pool + server + relay + upstream, one process)",
            per_conn(fds1 as u64, fds0 as u64, n)
        );
        assert!(
            rss < MAX_RSS_PER_CONN_KIB as f64,
            "{rss:.2} KiB per idle tunnel"
        );
        assert!(
            h2_connections <= 2 * n / 100 + 1,
            "{h2_connections} connections"
        );

        let tunnels = on_each(tunnels, |i, mut t| async move {
            echo_byte(&mut t, (i % 251) as u8).await;
            t
        })
        .await;
        assert_eq!(upstream.live.load(SeqCst), n);
        drop(tunnels);
        assert!(
            eventually(Duration::from_secs(30), || upstream.live.load(SeqCst) == 0).await,
            "upstream connections {} after the tunnels closed",
            upstream.live.load(SeqCst)
        );
        drop(connector);
        assert_released(&proxy.stats, fds0, 16).await;
        proxy.shutdown().await;
    });
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Relay,
    Http,
}

#[derive(Debug, Default)]
struct StormResult {
    completed: usize,
    reset: usize,
}

const STORM_CYCLES: usize = 20_000;
const STORM_CONCURRENCY: usize = 64;
const STORM_TIME: Duration = Duration::from_secs(30);

/// `cycles` connect / one exchange / close cycles (or until `time` passes), 64 at once.
/// With `reset_half`, every other client aborts mid-request with a TCP RST (`SO_LINGER 0`).
async fn storm(addr: SocketAddr, kind: Kind, cycles: usize, reset_half: bool) -> StormResult {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + STORM_TIME;
    let mut workers = JoinSet::new();
    for _ in 0..STORM_CONCURRENCY {
        let next = next.clone();
        workers.spawn(async move {
            let mut out = StormResult::default();
            loop {
                let i = next.fetch_add(1, SeqCst);
                if i >= cycles || Instant::now() >= deadline {
                    return out;
                }
                let reset = reset_half && i % 2 == 1;
                tokio::time::timeout(Duration::from_secs(20), cycle(addr, kind, i, reset))
                    .await
                    .unwrap_or_else(|_| panic!("{kind:?} cycle {i} hung"));
                if reset {
                    out.reset += 1;
                } else {
                    out.completed += 1;
                }
            }
        });
    }
    let mut total = StormResult::default();
    while let Some(r) = workers.join_next().await {
        let r = r.unwrap();
        total.completed += r.completed;
        total.reset += r.reset;
    }
    total
}

async fn cycle(addr: SocketAddr, kind: Kind, i: usize, reset: bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let byte = (i % 251) as u8;
    if reset {
        match kind {
            Kind::Relay => s.write_all(&[byte]).await.unwrap(),
            Kind::Http => s.write_all(b"GET / HTTP/1.1\r\nHost: st").await.unwrap(),
        }
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        return;
    }
    let mut out = Vec::new();
    match kind {
        Kind::Relay => {
            s.write_all(&[byte]).await.unwrap();
            s.shutdown().await.unwrap();
            s.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, [byte]);
        }
        Kind::Http => {
            s.write_all(b"GET / HTTP/1.1\r\nHost: storm.test\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            s.read_to_end(&mut out).await.unwrap();
            let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
            assert!(text.starts_with("http/1.1 200"), "{text}");
            assert!(text.ends_with("\r\n\r\nok"), "{text}");
        }
    }
}

async fn storm_case(kind: Kind, cycles: usize, reset_half: bool) {
    let proxy = match kind {
        Kind::Relay => {
            let (echo, _) = counting_echo_server().await;
            serve_on(Server::new(), relay_to(echo)).await
        }
        Kind::Http => serve_on(Server::new(), HttpServer::new(ok_service())).await,
    };
    let fds0 = open_fds();
    let started = Instant::now();
    let result = storm(proxy.addr, kind, cycles, reset_half).await;
    let took = started.elapsed();
    assert_released(&proxy.stats, fds0, 8).await;
    let s = &proxy.stats;
    eprintln!(
        "storm {kind:?}{}: {} completed + {} reset of {cycles} in {took:.1?} \
         ({:.0}/s, {STORM_CONCURRENCY} at once); server: accepted {}, errors {}, panics {}",
        if reset_half { " with resets" } else { "" },
        result.completed,
        result.reset,
        (result.completed + result.reset) as f64 / took.as_secs_f64(),
        s.accepted.load(SeqCst),
        s.errors.load(SeqCst),
        s.panics.load(SeqCst),
    );
    assert_eq!(s.panics.load(SeqCst), 0);
    if !reset_half {
        assert_eq!(s.accepted.load(SeqCst), result.completed as u64);
        assert_eq!(s.errors.load(SeqCst), 0);
    }
    proxy.shutdown().await;
}

#[test]
fn relay_storm_leaves_nothing_behind() {
    need_fds!(8_192);
    run(storm_case(Kind::Relay, STORM_CYCLES, false));
}

#[test]
fn http_storm_leaves_nothing_behind() {
    need_fds!(8_192);
    run(storm_case(Kind::Http, STORM_CYCLES, false));
}

/// Half the clients abort mid-request with a reset: nothing is left behind either.
#[test]
fn storm_with_resetting_clients_leaves_nothing_behind() {
    need_fds!(8_192);
    run(async {
        storm_case(Kind::Relay, STORM_CYCLES / 2, true).await;
        storm_case(Kind::Http, STORM_CYCLES / 2, true).await;
    });
}

/// The HTTP server's `header_read_timeout` also cuts connections that never send a byte
/// or stop inside the HTTP/2 preface, and kept-alive connections idle between requests.
#[test]
fn http_server_closes_connections_that_send_no_request_in_time() {
    run(async {
        let server =
            HttpServer::new(ok_service()).header_read_timeout(Some(Duration::from_millis(500)));
        let proxy = serve_on(Server::new(), server).await;
        let silent = TcpStream::connect(proxy.addr).await.unwrap();
        let mut partial_preface = TcpStream::connect(proxy.addr).await.unwrap();
        partial_preface
            .write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .unwrap();
        let mut kept_alive = TcpStream::connect(proxy.addr).await.unwrap();
        let head = h1_get(&mut kept_alive).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        for (name, mut s) in [
            ("silent", silent),
            ("partial HTTP/2 preface", partial_preface),
            ("idle keep-alive", kept_alive),
        ] {
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
            assert!(closed.is_ok(), "{name} connection left open");
        }
        assert!(
            eventually(Duration::from_secs(5), || proxy.stats.active.load(SeqCst)
                == 0)
            .await,
            "active {}",
            proxy.stats.active.load(SeqCst)
        );
        proxy.shutdown().await;
    });
}
