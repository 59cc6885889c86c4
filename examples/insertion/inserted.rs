//! Inserted proxies for the demo and the tests: haproxy, or a built-in stand-in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxystack::conn::Metadata;
use proxystack::drain::Watch;
use proxystack::proxy_protocol::{
    Command, ProxyHeader, ProxyProtocolConnector, ProxyProtocolLayer, SendProxyHeader,
    PP2_TYPE_AUTHORITY, PP2_TYPE_UNIQUE_ID,
};
use proxystack::serve::ServeStats;
use proxystack::{tcp, Server, Target};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;

/// The haproxy 2.6 config of one inserted proxy: `mode tcp`, PROXY v2 in on `listen`,
/// PROXY v2 out to `upstream` (our egress side), forwarding the addresses, the
/// `AUTHORITY` TLV and the flow token (`UNIQUE_ID`). `log` is a haproxy log target
/// (`stderr`, `stdout`); each connection logs one line `<name> client=… destination=…
/// authority=… flow=…` as soon as it is relayed.
pub fn haproxy_config(name: &str, listen: SocketAddr, upstream: SocketAddr, log: &str) -> String {
    format!(
        "global
    maxconn 1000
    log {log} format raw local0
defaults
    log global
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
    unique-id-format %[fc_pp_unique_id]
frontend {name}
    bind {listen} accept-proxy
    option logasap
    log-format \"{name} client=%ci:%cp destination=%fi:%fp authority=%[fc_pp_authority] flow=%ID\"
    default_backend {name}_out
backend {name}_out
    server insertion {upstream} send-proxy-v2 proxy-v2-options authority,unique-id
"
    )
}

/// The haproxy binary, if installed.
pub fn find_haproxy() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// A haproxy child process with its config directory; killed (only this child, by its
/// handle) and cleaned up on drop.
pub struct HaproxyChild {
    child: std::process::Child,
    dir: PathBuf,
}

impl HaproxyChild {
    /// Starts `bin` with `config`; its stdout and stderr go to `output`.
    pub fn spawn(
        bin: &Path,
        name: &str,
        config: &str,
        output: std::process::Stdio,
        errors: std::process::Stdio,
    ) -> std::io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "proxystack-insertion-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config)?;
        let child = std::process::Command::new(bin)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(std::process::Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn();
        match child {
            Ok(child) => Ok(Self { child, dir }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// The directory holding the config (and whatever the caller puts there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits (bounded) until something listens on `addr`; fails if haproxy exits.
    pub async fn wait_ready(&mut self, addr: SocketAddr, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("haproxy exited with {status}"));
            }
            if is_listening(addr).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("haproxy not listening on {addr} after {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether a socket listens on `addr`. On Linux this reads `/proc/net/tcp{,6}` instead of
/// connecting: a probe connection without a PROXY header would make haproxy log an error.
async fn is_listening(addr: SocketAddr) -> bool {
    let port = format!(":{:04X} ", addr.port());
    let mut found_table = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        found_table = true;
        // Fields: sl local_address rem_address st …; st 0A is LISTEN.
        if text.lines().any(|l| {
            let mut f = l.split_whitespace().skip(1);
            let (local, st) = (f.next().unwrap_or_default(), f.nth(1).unwrap_or_default());
            format!("{local} ").ends_with(&port) && st == "0A"
        }) {
            return true;
        }
    }
    !found_table && tokio::net::TcpStream::connect(addr).await.is_ok()
}

impl Drop for HaproxyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A built-in stand-in for an inserted proxy: accepts PROXY v2 from loopback and relays
/// each connection to `upstream` under a PROXY v2 header of its own that repeats the
/// addresses and the `0xD0`, `0xD1`, `AUTHORITY` and `UNIQUE_ID` TLVs (what haproxy does
/// with `accept-proxy` + `send-proxy-v2`, plus the custom TLVs haproxy 2.6 drops).
pub fn spawn_stand_in(
    listener: TcpListener,
    upstream: SocketAddr,
    drain: Duration,
    watch: Watch,
) -> (Arc<ServeStats>, JoinHandle<std::io::Result<()>>) {
    let relay = tcp::Relay::new(ProxyProtocolConnector::new(tcp::TcpConnector::new())).upstream(
        move |m: &Metadata| {
            let header = m.get::<ProxyHeader>()?;
            if header.command != Command::Proxy {
                return None;
            }
            // Addresses from the header, and 0xD0 (recorded as PeerIdentity by the layer).
            let mut send = SendProxyHeader::from_inbound(m)?;
            if let Some(service) = header.service() {
                send = send.service(service);
            }
            for kind in [PP2_TYPE_AUTHORITY, PP2_TYPE_UNIQUE_ID] {
                if let Some(value) = header.tlv(kind) {
                    send = send.tlv(kind, value.clone());
                }
            }
            Some(Target::from(upstream).with(send))
        },
    );
    let svc = ServiceBuilder::new()
        .layer(ProxyProtocolLayer::required().trusted(["127.0.0.0/8", "::1/128"]))
        .service(relay);
    let server = Server::new().drain_timeout(drain);
    let stats = server.stats();
    (
        stats,
        tokio::spawn(async move { server.serve(listener, svc, watch).await }),
    )
}
