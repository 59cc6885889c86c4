//! Tunnels vs direct, in one run: single-stream throughput direct, through an HTTP/1.1
//! CONNECT proxy, and through HBONE (mTLS + pooled HTTP/2 CONNECT); tunnels opened per
//! second on a warm pooled HBONE connection; memory per idle HBONE tunnel.
//!
//! `cargo bench --bench tunnel --all-features` (add `-- --quick` for a shorter run).

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use proxystack::conn::Metadata;
use proxystack::connect::{ConnectAuthority, ConnectTerminate, Http1ConnectConnector, TunnelInfo};
use proxystack::hbone::{self, HboneTarget, Inbound};
use proxystack::identity::SpiffeId;
use proxystack::tls::demo::DemoCa;
use proxystack::{drain, tcp, Authority, Target};
use support::{get, listen, record, set};
use tokio::net::TcpStream;
use tower::ServiceExt;

const BULK: usize = 128 << 20;

fn benches(c: &mut Criterion) {
    let rt = support::runtime();
    let ca = DemoCa::new("cluster.local");
    let (_signal, watch) = drain::channel();
    // Tunnels go to 127.0.0.1:<authority port>: the sink or the echo server.
    let to_local = tcp::Relay::new(tcp::TcpConnector::new()).upstream(|m: &Metadata| {
        Some(Target::from((
            [127, 0, 0, 1],
            m.get::<TunnelInfo>()?.authority.port(),
        )))
    });
    let (sink, echo, h1_proxy, hbone_server) = rt.block_on(async {
        let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
            .service(to_local.clone())
            .unwrap();
        (
            support::sink().await,
            support::echo().await,
            listen(ConnectTerminate::new(to_local).http1_only(), watch.clone()).await,
            listen(inbound, watch.clone()).await,
        )
    });
    let h1 = Http1ConnectConnector::new(tcp::TcpConnector::new());
    let hbone = hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots()).unwrap();
    let server_id = SpiffeId::istio("cluster.local", "default", "server").unwrap();
    let hbone_to = |port: u16| {
        HboneTarget::new(
            hbone_server,
            Authority::from(SocketAddr::from(([127, 0, 0, 1], port))),
            [server_id.clone()],
        )
        .into_target()
    };
    let h1_to = |port: u16| {
        Target::from(h1_proxy).with(ConnectAuthority(Authority::from(SocketAddr::from((
            [127, 0, 0, 1],
            port,
        )))))
    };

    let mut g = c.benchmark_group("tunnel_throughput_128MiB");
    g.sample_size(10).throughput(Throughput::Bytes(BULK as u64));
    g.bench_function("direct", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                rt.block_on(async {
                    support::bulk(TcpStream::connect(sink).await.unwrap(), BULK).await
                });
            }
            record("bulk/direct", t.elapsed(), iters);
            t.elapsed()
        })
    });
    g.bench_function("h1_connect", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                rt.block_on(async {
                    support::bulk(h1.clone().oneshot(h1_to(sink.port())).await.unwrap(), BULK).await
                });
            }
            record("bulk/h1", t.elapsed(), iters);
            t.elapsed()
        })
    });
    g.bench_function("hbone", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                rt.block_on(async {
                    support::bulk(
                        hbone.clone().oneshot(hbone_to(sink.port())).await.unwrap(),
                        BULK,
                    )
                    .await
                });
            }
            record("bulk/hbone", t.elapsed(), iters);
            t.elapsed()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("tunnel_open");
    g.bench_function("hbone_warm_pool", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            rt.block_on(async {
                for _ in 0..iters {
                    let mut tunnel = hbone.clone().oneshot(hbone_to(echo.port())).await.unwrap();
                    support::ping(&mut tunnel).await;
                }
            });
            record("open/hbone", t.elapsed(), iters);
            t.elapsed()
        })
    });
    g.bench_function("h1_connect", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            rt.block_on(async {
                for _ in 0..iters {
                    let mut tunnel = h1.clone().oneshot(h1_to(echo.port())).await.unwrap();
                    support::ping(&mut tunnel).await;
                }
            });
            record("open/h1", t.elapsed(), iters);
            t.elapsed()
        })
    });
    g.finish();

    // Memory per idle HBONE tunnel (both ends live in this process, as do the app-side
    // sockets): RSS growth for 1,000 open tunnels.
    const N: usize = 1000;
    let per_tunnel = rt.block_on(async {
        let before = support::rss_kib();
        let mut open = Vec::with_capacity(N);
        for _ in 0..N {
            let mut t = hbone.clone().oneshot(hbone_to(echo.port())).await.unwrap();
            support::ping(&mut t).await;
            open.push(t);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = support::rss_kib();
        drop(open);
        (after - before) as f64 / N as f64
    });
    set("idle_kib/hbone", per_tunnel);
}

fn summary() {
    println!("\n== tunnels vs direct (best sample) ==");
    let direct = get("bulk/direct");
    for (id, name) in [
        ("bulk/direct", "direct"),
        ("bulk/h1", "HTTP/1.1 CONNECT"),
        ("bulk/hbone", "HBONE"),
    ] {
        if let (Some(d), Some(v)) = (direct, get(id)) {
            println!(
                "throughput {name}: {:.2} Gb/s, ratio to direct {:.2}",
                support::gbps(BULK, v),
                d / v
            );
        }
    }
    for (id, name) in [
        ("open/hbone", "HBONE on a warm pooled connection"),
        ("open/h1", "HTTP/1.1 CONNECT (new TCP each)"),
    ] {
        if let Some(v) = get(id) {
            println!("tunnels/s {name}: {:.0}", 1.0 / v);
        }
    }
    if let Some(k) = get("idle_kib/hbone") {
        println!("idle memory: {k:.1} KiB RSS per HBONE tunnel (client and server side both in this process)");
    }
}

criterion_group!(tunnel_benches, benches);

fn main() {
    tunnel_benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
