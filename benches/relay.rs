//! L4 relay vs direct, in one run: throughput, 1-byte ping-pong latency, new
//! connections/s, and memory per idle relayed connection. Prints the ratios at the end.
//!
//! `cargo bench --bench relay` (add `-- --quick` for a shorter run).

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use proxystack::{drain, tcp, Server, Target};
use support::{get, record, rss_kib, set};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const BULK: usize = 256 << 20;

struct Setup {
    sink: SocketAddr,
    echo: SocketAddr,
    relay_to_sink: SocketAddr,
    copy_relay_to_sink: SocketAddr,
    relay_to_echo: SocketAddr,
    copy_relay_to_echo: SocketAddr,
    _signal: drain::Signal,
}

async fn setup() -> Setup {
    let sink = support::sink().await;
    let echo = support::echo().await;
    let (signal, watch) = drain::channel();
    let relay_to_sink = relay(sink, true, watch.clone()).await;
    let copy_relay_to_sink = relay(sink, false, watch.clone()).await;
    let relay_to_echo = relay(echo, true, watch.clone()).await;
    let copy_relay_to_echo = relay(echo, false, watch).await;
    Setup {
        sink,
        echo,
        relay_to_sink,
        copy_relay_to_sink,
        relay_to_echo,
        copy_relay_to_echo,
        _signal: signal,
    }
}

/// A relay to `upstream`; `splice` chooses `splice(2)` or the portable copy loop.
async fn relay(upstream: SocketAddr, splice: bool, watch: drain::Watch) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let svc = tcp::Relay::new(tcp::TcpConnector::new())
        .config(tcp::RelayConfig::new().splice(splice))
        .upstream(move |_: &proxystack::conn::Metadata| Some(Target::from(upstream)));
    tokio::spawn(async move { Server::new().serve(l, svc, watch).await });
    addr
}

async fn connect_once(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    support::ping(&mut s).await;
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
    for (id, addr) in [
        ("direct", s.sink),
        ("relay", s.relay_to_sink),
        ("relay_copy", s.copy_relay_to_sink),
    ] {
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    rt.block_on(async {
                        support::bulk(TcpStream::connect(addr).await.unwrap(), BULK).await
                    });
                }
                let e = t.elapsed();
                record(&format!("throughput/{id}"), e, iters);
                e
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("ping_pong_1B");
    for (id, addr) in [
        ("direct", s.echo),
        ("relay", s.relay_to_echo),
        ("relay_copy", s.copy_relay_to_echo),
    ] {
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut conn = TcpStream::connect(addr).await.unwrap();
                    conn.set_nodelay(true).unwrap();
                    let t = Instant::now();
                    for _ in 0..iters {
                        support::ping(&mut conn).await;
                    }
                    let e = t.elapsed();
                    record(&format!("ping_pong/{id}"), e, iters);
                    e
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("new_connection");
    for (id, addr) in [
        ("direct", s.echo),
        ("relay", s.relay_to_echo),
        ("relay_copy", s.copy_relay_to_echo),
    ] {
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

/// RSS growth per idle connection: N connections direct, then N through each relay, all
/// kept open to the end so freed memory is never reused between measurements; a relay's
/// cost is its growth minus the direct growth (client and server sockets).
fn idle_memory(rt: &Runtime, s: &Setup) {
    // 1,000 per variant, all held: about 10,000 descriptors in this one process.
    const N: usize = 1000;
    rt.block_on(async {
        let mut held = Vec::new();
        for (id, addr) in [
            ("direct", s.echo),
            ("relay", s.relay_to_echo),
            ("relay_copy", s.copy_relay_to_echo),
        ] {
            let before = rss_kib();
            for _ in 0..N {
                let mut c = TcpStream::connect(addr).await.unwrap();
                // One round trip proves the connection is fully set up on every hop.
                support::ping(&mut c).await;
                held.push(c);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            set(
                &format!("idle_kib_per_conn/{id}"),
                (rss_kib() - before) as f64 / N as f64,
            );
        }
    });
}

fn summary() {
    println!("\n== relay vs direct (best sample; relay = splice(2) path, relay_copy = portable copy loop) ==");
    for variant in ["relay", "relay_copy"] {
        if let (Some(d), Some(p)) = (
            get("throughput/direct"),
            get(&format!("throughput/{variant}")),
        ) {
            let gbps = |s: f64| support::gbps(BULK, s);
            println!(
                "throughput: direct {:.2} Gb/s, {variant} {:.2} Gb/s, ratio {:.2}",
                gbps(d),
                gbps(p),
                d / p
            );
        }
        if let (Some(d), Some(p)) = (
            get("ping_pong/direct"),
            get(&format!("ping_pong/{variant}")),
        ) {
            println!(
                "1-byte round trip: direct {:.1} µs, {variant} {:.1} µs, ratio {:.2}",
                d * 1e6,
                p * 1e6,
                p / d
            );
        }
        if let (Some(d), Some(p)) = (get("connect/direct"), get(&format!("connect/{variant}"))) {
            println!(
                "new connections/s: direct {:.0}, {variant} {:.0}, ratio {:.2}",
                1.0 / d,
                1.0 / p,
                d / p
            );
        }
        if let (Some(d), Some(p)) = (
            get("idle_kib_per_conn/direct"),
            get(&format!("idle_kib_per_conn/{variant}")),
        ) {
            println!("idle memory: {:.2} KiB RSS per connection through {variant} (direct baseline {d:.2})", p - d);
        }
    }
}

criterion_group!(relay_benches, benches);

fn main() {
    relay_benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
