//! TLS termination vs plaintext, in one run: bulk throughput through a relay that
//! terminates TLS vs the same relay in plaintext, and handshakes/s with and without client
//! certificates, with static material and with a `LiveIdentity` (rotatable) on both sides.
//! Prints the ratios at the end.
//!
//! `cargo bench --bench tls --all-features` (add `-- --quick` for a shorter run). The
//! `records` group compares the two crypto libraries rustls can run on (ring, aws-lc-rs) on
//! TLS 1.3 AES-GCM records: `cargo bench --all-features --bench tls -- records`.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, Criterion, Throughput};
use proxystack::conn::Metadata;
use proxystack::tls::demo::DemoCa;
use proxystack::tls::{
    ClientAuth, Credentials, LiveIdentity, ServerConfigBuilder, SniMode, TerminateLayer,
    TlsConnector,
};
use proxystack::{drain, tcp, Target};
use support::{get, listen, record};
use tokio::net::TcpStream;
use tower::{ServiceBuilder, ServiceExt};

const BULK: usize = 64 << 20;

fn relay_to(
    upstream: SocketAddr,
) -> tcp::Relay<tcp::TcpConnector, impl Fn(&Metadata) -> Option<Target> + Clone> {
    tcp::Relay::new(tcp::TcpConnector::new())
        .upstream(move |_: &Metadata| Some(Target::from(upstream)))
}

fn benches(c: &mut Criterion) {
    let rt = support::runtime();
    let ca = DemoCa::new("cluster.local");
    let (_signal, watch) = drain::channel();
    let server_identity = LiveIdentity::new(Credentials::new(
        ca.workload_cert("default", "server"),
        [ca.root()],
    ))
    .unwrap();
    let client_identity = LiveIdentity::new(Credentials::new(
        ca.workload_cert("default", "client"),
        [ca.root()],
    ))
    .unwrap();
    let (plain, tls, echo_tls, echo_mtls, echo_mtls_live) = rt.block_on(async {
        let sink = support::sink().await;
        let echo = support::echo().await;
        let server_tls = ServerConfigBuilder::new()
            .default_cert(ca.server_cert(&["localhost"]))
            .build()
            .unwrap();
        let server_mtls = ServerConfigBuilder::new()
            .default_cert(ca.workload_cert("default", "server"))
            .client_auth(ClientAuth::Required(ca.roots()))
            .build()
            .unwrap();
        let server_mtls_live = ServerConfigBuilder::new()
            .client_auth(ClientAuth::Required(ca.roots()))
            .build_live(&server_identity)
            .unwrap();
        let terminate_live = ServiceBuilder::new()
            .layer(TerminateLayer::live(server_mtls_live))
            .service(relay_to(echo));
        let terminate = |cfg: Arc<rustls::ServerConfig>, to| {
            ServiceBuilder::new()
                .layer(TerminateLayer::new(cfg))
                .service(relay_to(to))
        };
        (
            listen(relay_to(sink), watch.clone()).await,
            listen(terminate(server_tls.clone(), sink), watch.clone()).await,
            listen(terminate(server_tls, echo), watch.clone()).await,
            listen(terminate(server_mtls, echo), watch.clone()).await,
            listen(terminate_live, watch.clone()).await,
        )
    });
    let tls_client = TlsConnector::new(tcp::TcpConnector::new(), ca.roots())
        .sni(SniMode::Fixed("localhost".into()));
    let mtls_client = TlsConnector::new(tcp::TcpConnector::new(), ca.roots())
        .client_cert(ca.workload_cert("default", "client"))
        .unwrap()
        .sni(SniMode::None)
        .expect_identities(ca.workload_cert("default", "server").spiffe_ids());
    let mtls_live_client = TlsConnector::live(tcp::TcpConnector::new(), client_identity)
        .sni(SniMode::None)
        .expect_identities(ca.workload_cert("default", "server").spiffe_ids());

    let mut g = c.benchmark_group("bulk_64MiB");
    g.sample_size(10).throughput(Throughput::Bytes(BULK as u64));
    g.bench_function("plaintext_relay", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                rt.block_on(async {
                    support::bulk(TcpStream::connect(plain).await.unwrap(), BULK).await
                });
            }
            record("bulk/plain", t.elapsed(), iters);
            t.elapsed()
        })
    });
    g.bench_function("tls_terminate_relay", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let conn = rt
                    .block_on(tls_client.clone().oneshot(Target::from(tls)))
                    .unwrap();
                rt.block_on(support::bulk(conn, BULK));
            }
            record("bulk/tls", t.elapsed(), iters);
            t.elapsed()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("handshake");
    for (id, client, addr) in [
        ("tls", &tls_client, echo_tls),
        ("mtls", &mtls_client, echo_mtls),
        ("mtls_live", &mtls_live_client, echo_mtls_live),
    ] {
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                rt.block_on(async {
                    for _ in 0..iters {
                        let mut conn = client.clone().oneshot(Target::from(addr)).await.unwrap();
                        support::ping(&mut conn).await;
                    }
                });
                record(&format!("handshake/{id}"), t.elapsed(), iters);
                t.elapsed()
            })
        });
    }
    g.finish();
}

fn summary() {
    println!("\n== TLS vs plaintext (best sample) ==");
    if let (Some(p), Some(t)) = (get("bulk/plain"), get("bulk/tls")) {
        println!(
            "bulk: plaintext relay {:.2} Gb/s, TLS-terminating relay {:.2} Gb/s, ratio {:.2}",
            support::gbps(BULK, p),
            support::gbps(BULK, t),
            p / t
        );
    }
    for suite in ["aes128", "aes256"] {
        if let (Some(r), Some(a)) = (
            get(&format!("records/ring/{suite}")),
            get(&format!("records/aws-lc-rs/{suite}")),
        ) {
            println!(
                "{suite}-gcm, 16 KiB records sealed + opened: ring {:.2} Gb/s, aws-lc-rs {:.2} Gb/s, aws-lc-rs / ring {:.2}",
                support::gbps(RECORDS, r),
                support::gbps(RECORDS, a),
                r / a
            );
        }
    }
    for id in ["tls", "mtls", "mtls_live"] {
        if let Some(h) = get(&format!("handshake/{id}")) {
            println!(
                "handshakes/s ({id}, incl. connect and 1-byte echo): {:.0}",
                1.0 / h
            );
        }
    }
}

/// Seals then opens `bytes` of 16 KiB TLS 1.3 records (5-byte header as AAD) with one AEAD:
/// what rustls's provider does per record on the bulk paths, without the record layer, which
/// is the same code for both libraries. `$lib` is `ring` or `aws_lc_rs` (same `aead` API).
macro_rules! aead_records {
    ($lib:ident, $alg:expr, $bytes:expr) => {{
        use $lib::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
        let key = LessSafeKey::new(UnboundKey::new($alg, &[7u8; 32][..$alg.key_len()]).unwrap());
        let mut record = vec![0x17u8; 16 << 10];
        let header = [0x17, 0x03, 0x03, 0x40, 0x11];
        let t = Instant::now();
        for i in 0..($bytes / record.len()) as u64 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&i.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(header),
                    &mut record,
                )
                .unwrap();
            let mut sealed = std::mem::take(&mut record);
            sealed.extend_from_slice(tag.as_ref());
            let opened = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(header),
                    &mut sealed,
                )
                .unwrap()
                .len();
            sealed.truncate(opened);
            record = sealed;
        }
        t.elapsed()
    }};
}

const RECORDS: usize = 16 << 20;

/// ring vs aws-lc-rs on the TLS 1.3 AES-GCM suites, in one run.
fn providers(c: &mut Criterion) {
    let mut g = c.benchmark_group("records");
    g.throughput(Throughput::Bytes(RECORDS as u64));
    for (suite, ring_alg, lc_alg) in [
        (
            "aes128",
            &ring::aead::AES_128_GCM,
            &aws_lc_rs::aead::AES_128_GCM,
        ),
        (
            "aes256",
            &ring::aead::AES_256_GCM,
            &aws_lc_rs::aead::AES_256_GCM,
        ),
    ] {
        g.bench_function(format!("ring/{suite}"), |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    total += aead_records!(ring, ring_alg, RECORDS);
                }
                record(&format!("records/ring/{suite}"), total, iters);
                total
            })
        });
        g.bench_function(format!("aws-lc-rs/{suite}"), |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    total += aead_records!(aws_lc_rs, lc_alg, RECORDS);
                }
                record(&format!("records/aws-lc-rs/{suite}"), total, iters);
                total
            })
        });
    }
    g.finish();
}

criterion_group!(tls_benches, benches, providers);

fn main() {
    tls_benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
