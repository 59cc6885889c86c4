//! L4 relay vs direct, in one run: throughput, 1-byte ping-pong latency, new
//! connections/s, and memory per idle relayed connection. Prints the ratios at the end.
//!
//! `cargo bench --bench relay` (add `-- --quick` for a shorter run).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use proxystack::{drain, tcp, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const BULK: usize = 256 << 20;

/// Seconds per operation, per benchmark id, for the ratio table.
static RESULTS: Mutex<BTreeMap<String, f64>> = Mutex::new(BTreeMap::new());

fn record(id: &str, total: Duration, ops: u64) {
    let per_op = total.as_secs_f64() / ops.max(1) as f64;
    let mut r = RESULTS.lock().unwrap();
    let slot = r.entry(id.to_string()).or_insert(f64::MAX);
    *slot = slot.min(per_op); // best sample: least disturbed by the shared machine
}

struct Setup {
    sink: SocketAddr,
    echo: SocketAddr,
    relay_to_sink: SocketAddr,
    relay_to_echo: SocketAddr,
    _signal: drain::Signal,
}

async fn setup() -> Setup {
    let sink = serve_fn(|mut s| async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        let _ = s.write_all(&total.to_be_bytes()).await;
    })
    .await;
    let echo = serve_fn(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let (signal, watch) = drain::channel();
    let relay_to_sink = relay(sink, watch.clone()).await;
    let relay_to_echo = relay(echo, watch).await;
    Setup {
        sink,
        echo,
        relay_to_sink,
        relay_to_echo,
        _signal: signal,
    }
}

async fn serve_fn<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            s.set_nodelay(true).unwrap();
            tokio::spawn(f(s));
        }
    });
    addr
}

async fn relay(upstream: SocketAddr, watch: drain::Watch) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let svc = tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &proxystack::conn::Metadata| Some(Target::from(upstream)));
    tokio::spawn(async move { Server::new().serve(l, svc, watch).await });
    addr
}

async fn bulk(addr: SocketAddr, bytes: usize) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    s.shutdown().await.unwrap();
    let mut total = [0u8; 8];
    s.read_exact(&mut total).await.unwrap();
    assert_eq!(u64::from_be_bytes(total), bytes as u64);
}

async fn ping_pong(s: &mut TcpStream, rounds: u64) {
    let mut b = [0u8; 1];
    for _ in 0..rounds {
        s.write_all(b"x").await.unwrap();
        s.read_exact(&mut b).await.unwrap();
    }
}

async fn connect_once(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(setup());

    let mut g = c.benchmark_group("throughput_256MiB");
    g.sample_size(10).throughput(Throughput::Bytes(BULK as u64));
    for (id, addr) in [("direct", s.sink), ("relay", s.relay_to_sink)] {
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    rt.block_on(bulk(addr, BULK));
                }
                let e = t.elapsed();
                record(&format!("throughput/{id}"), e, iters);
                e
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("ping_pong_1B");
    for (id, addr) in [("direct", s.echo), ("relay", s.relay_to_echo)] {
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut conn = TcpStream::connect(addr).await.unwrap();
                    conn.set_nodelay(true).unwrap();
                    let t = Instant::now();
                    ping_pong(&mut conn, iters).await;
                    let e = t.elapsed();
                    record(&format!("ping_pong/{id}"), e, iters);
                    e
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("new_connection");
    for (id, addr) in [("direct", s.echo), ("relay", s.relay_to_echo)] {
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                rt.block_on(async {
                    for _ in 0..iters {
                        connect_once(addr).await;
                    }
                });
                let e = t.elapsed();
                record(&format!("connect/{id}"), e, iters);
                e
            })
        });
    }
    g.finish();

    idle_memory(&rt, &s);
}

/// RSS growth per idle connection: N connections through the relay minus N direct ones,
/// so only what the relay adds (its task, buffers, two sockets' user-space state) counts.
fn idle_memory(rt: &Runtime, s: &Setup) {
    const N: usize = 2000;
    let measure = |addr: SocketAddr| -> f64 {
        rt.block_on(async {
            let before = rss_kib();
            let mut conns = Vec::with_capacity(N);
            for _ in 0..N {
                let mut c = TcpStream::connect(addr).await.unwrap();
                // One round trip proves the connection is fully set up on both hops.
                c.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await.unwrap();
                conns.push(c);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let after = rss_kib();
            drop(conns);
            tokio::time::sleep(Duration::from_millis(200)).await;
            (after - before) as f64 / N as f64
        })
    };
    let direct = measure(s.echo);
    let relayed = measure(s.relay_to_echo);
    let mut r = RESULTS.lock().unwrap();
    r.insert("idle_kib_per_conn/direct".into(), direct);
    r.insert("idle_kib_per_conn/relay".into(), relayed);
}

fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn summary() {
    let r = RESULTS.lock().unwrap();
    let get = |k: &str| r.get(k).copied();
    println!("\n== relay vs direct (best sample) ==");
    if let (Some(d), Some(p)) = (get("throughput/direct"), get("throughput/relay")) {
        let gbps = |s: f64| BULK as f64 * 8.0 / s / 1e9;
        println!(
            "throughput: direct {:.2} Gb/s, relay {:.2} Gb/s, ratio {:.2}",
            gbps(d),
            gbps(p),
            d / p
        );
    }
    if let (Some(d), Some(p)) = (get("ping_pong/direct"), get("ping_pong/relay")) {
        println!(
            "1-byte round trip: direct {:.1} µs, relay {:.1} µs, ratio {:.2}",
            d * 1e6,
            p * 1e6,
            p / d
        );
    }
    if let (Some(d), Some(p)) = (get("connect/direct"), get("connect/relay")) {
        println!(
            "new connections/s: direct {:.0}, relay {:.0}, ratio {:.2}",
            1.0 / d,
            1.0 / p,
            d / p
        );
    }
    if let (Some(d), Some(p)) = (
        get("idle_kib_per_conn/direct"),
        get("idle_kib_per_conn/relay"),
    ) {
        println!(
            "idle memory: {:.2} KiB RSS per relayed connection (direct baseline {:.2})",
            p - d,
            d
        );
    }
}

criterion_group!(relay_benches, benches);

fn main() {
    relay_benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
