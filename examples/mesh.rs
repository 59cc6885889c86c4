//! The whole mesh in one process, on loopback, with demo identities from one CA:
//!
//! ```text
//! app client → sidecar A (outbound) ─HBONE→ waypoint (L7 policy) ─HBONE→ sidecar B (inbound) → app
//!                          ingress gateway ─HBONE↗
//! ```
//!
//! ```text
//! cargo run --example mesh --all-features
//! ```
//!
//! It is the `sidecar`, `waypoint` and `gateway` examples, unchanged, each run from a TOML
//! config this file writes (their documented formats) with its own `--admin`. Sidecar A's
//! `[[outbound.fixed]]` listeners stand in for iptables redirection to two service VIPs
//! (HTTP and a TCP echo); its `[[workload]]` sends both to the waypoint, which applies the
//! rule (`/admin` → 403) and re-encapsulates to sidecar B's inbound, which lets the
//! waypoint's identity in to the apps. The gateway routes every host to the HTTP VIP through
//! the waypoint too. The demo sends one allowed request, one denied, one TCP echo and one
//! through the gateway, prints the Istio metrics each hop recorded (who it saw on each
//! side), and serves on until Ctrl-C with the commands to try.
//!
//! What it does not do: redirect real traffic (no iptables), or run several processes;
//! ports are picked by binding `127.0.0.1:0` first, so a port can in theory be taken in
//! between (start again).

// Each example brings its own copy of `support` on purpose: its statics (the registry of
// own listeners every connector refuses to dial) are then per example, not one for the
// whole process, so the waypoint and the gateway may dial the sidecars' ports. The two
// sidecars share one copy: they only reach each other through the waypoint here.
#![allow(clippy::duplicate_mod)]

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "gateway.rs"]
mod gateway;
#[allow(dead_code)]
#[path = "sidecar.rs"]
mod sidecar;
#[allow(dead_code)]
#[path = "waypoint.rs"]
mod waypoint;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use proxystack::tls::demo::DemoCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The two service VIPs: nothing listens there, sidecar A's fixed listeners pretend
/// connections were redirected from them.
const HTTP_VIP: &str = "10.96.0.10:80";
const ECHO_VIP: &str = "10.96.0.11:7";
const NS: &str = "spiffe://cluster.local/ns/default/sa";

#[tokio::main]
async fn main() {
    support::init_tracing();
    let ca = DemoCa::new("cluster.local");
    let dir = tempfile::tempdir().unwrap_or_else(|e| support::fail(e));
    let d = dir.path();
    write(d, "root.pem", ca.root_pem());
    for sa in ["productpage", "waypoint", "reviews", "ingress"] {
        let cert = ca.workload_cert("default", sa);
        write(d, &format!("{sa}.pem"), &cert.chain_pem());
        write(d, &format!("{sa}.key"), &cert.key_pem());
    }
    let identity = |sa: &str| {
        let (c, k, r) = (
            d.join(format!("{sa}.pem")),
            d.join(format!("{sa}.key")),
            d.join("root.pem"),
        );
        format!("[identity]\ncert = {c:?}\nkey = {k:?}\nroots = {r:?}\n")
    };

    let app = support::demo_http_backend("hello from the app behind sidecar B\n").await;
    let echo = support::demo_echo_backend().await;
    let [a_out, a_http, a_echo, a_in, a_admin, b_out, b_in, b_admin, wp, wp_admin, gw, gw_admin] =
        free_ports::<12>();

    let sidecar_a = format!(
        "{}[outbound]\nlisten = \"{a_out}\"\n\
         [[outbound.fixed]]\nlisten = \"{a_http}\"\noriginal_dst = \"{HTTP_VIP}\"\n\
         [[outbound.fixed]]\nlisten = \"{a_echo}\"\noriginal_dst = \"{ECHO_VIP}\"\n\
         [inbound]\nlisten = \"{a_in}\"\napp_ip = \"127.0.0.1\"\n\
         [[workload]]\naddress = \"{HTTP_VIP}\"\nidentity = \"{NS}/waypoint\"\nprotocol = \"hbone\"\nnext_hop = \"{wp}\"\n\
         [[workload]]\naddress = \"{ECHO_VIP}\"\nidentity = \"{NS}/waypoint\"\nprotocol = \"hbone\"\nnext_hop = \"{wp}\"\n",
        identity("productpage")
    );
    let sidecar_b = format!(
        "{}[outbound]\nlisten = \"{b_out}\"\n\
         [inbound]\nlisten = \"{b_in}\"\napp_ip = \"127.0.0.1\"\nallow = [\"{NS}/waypoint\"]\n",
        identity("reviews")
    );
    let waypoint = format!(
        "listen = \"{wp}\"\n{}\
         [[service]]\naddresses = [\"{HTTP_VIP}\"]\nprotocol = \"http\"\nallow = [\"{NS}/*\"]\n\
         [[service.endpoint]]\naddress = \"{app}\"\nidentity = \"{NS}/reviews\"\nnext_hop = \"{b_in}\"\n\
         [[service.rule]]\naction = \"deny\"\npath_prefix = \"/admin\"\n\
         [[service]]\naddresses = [\"{ECHO_VIP}\"]\nprotocol = \"tcp\"\nallow = [\"{NS}/*\"]\n\
         [[service.endpoint]]\naddress = \"{echo}\"\nidentity = \"{NS}/reviews\"\nnext_hop = \"{b_in}\"\n",
        identity("waypoint")
    );
    let gateway = format!(
        "[[listener]]\nlisten = \"{gw}\"\ntls = \"none\"\n\
         [[route]]\nhost = \"*\"\nbackend = \"{HTTP_VIP}\"\nidentity = \"{NS}/waypoint\"\nnext_hop = \"{wp}\"\n{}",
        identity("ingress")
    );

    // Each proxy is its example's `run`, in its own task; all of them drain on Ctrl-C.
    let config = |name: &str, toml: &str| write(d, &format!("{name}.toml"), toml);
    let (sa, sb) = (
        config("sidecar-a", &sidecar_a),
        config("sidecar-b", &sidecar_b),
    );
    let (w, g) = (config("waypoint", &waypoint), config("gateway", &gateway));
    let args = |path: &Path, admin: SocketAddr| {
        let path = path.display().to_string();
        [
            "mesh".to_string(),
            "--config".into(),
            path,
            "--admin".into(),
            admin.to_string(),
        ]
    };
    let tasks = vec![
        tokio::spawn(sidecar::run(sidecar::Args::parse_from(args(&sa, a_admin)))),
        tokio::spawn(sidecar::run(sidecar::Args::parse_from(args(&sb, b_admin)))),
        tokio::spawn(waypoint::run(waypoint::Args::parse_from(args(
            &w, wp_admin,
        )))),
        tokio::spawn(gateway::run(gateway::Args::parse_from(args(&g, gw_admin)))),
    ];
    for admin in [a_admin, b_admin, wp_admin, gw_admin] {
        wait_ready(admin).await;
    }

    eprintln!("mesh: address app-http {a_http}");
    eprintln!("mesh: address app-tcp {a_echo}");
    eprintln!("mesh: address gateway {gw}");
    eprintln!("mesh: address waypoint-admin {wp_admin}");
    eprintln!("mesh: identities: app client's node {NS}/productpage, waypoint {NS}/waypoint,");
    eprintln!("mesh:   app's node {NS}/reviews, gateway {NS}/ingress (CA: one demo root)");
    let hops = "sidecar A → HBONE → waypoint → HBONE → sidecar B → app";
    let tour = [
        (a_http, "/", format!("app client → {hops}")),
        (
            a_http,
            "/admin",
            "app client → sidecar A → waypoint: denied by its L7 rule".into(),
        ),
        (
            gw,
            "/",
            "curl → ingress gateway → HBONE → waypoint → HBONE → sidecar B → app".to_string(),
        ),
    ];
    for (addr, path, what) in &tour {
        let answer = get(*addr, path).await;
        let status = answer.lines().next().unwrap_or("no answer").to_string();
        eprintln!("mesh: GET {path} via {addr}: {status}   ({what})");
    }
    let echoed = tcp_echo(a_echo, b"hello over plain TCP\n").await;
    eprintln!("mesh: TCP via {a_echo}: echoed {echoed:?}   (app client → {hops}, bytes only)");

    // What each hop saw, from its own Istio metrics: the peer identities on both sides.
    for (name, admin) in [("sidecar B", b_admin), ("waypoint", wp_admin)] {
        let text = get(admin, "/metrics").await;
        let moved = text.lines().filter(|l| !l.ends_with(" 0")).filter(|l| {
            l.starts_with("istio_requests_total{")
                || l.starts_with("istio_tcp_connections_opened_total{")
        });
        for line in moved {
            let (metric, value) = (
                line.split('{').next().unwrap_or(""),
                line.rsplit(' ').next().unwrap_or(""),
            );
            let code = label(line, "response_code")
                .map(|c| format!(" {c}"))
                .unwrap_or_default();
            let (from, to) = (
                label(line, "source_principal"),
                label(line, "destination_principal"),
            );
            let (from, to) = (from.unwrap_or("?"), to.unwrap_or("?"));
            eprintln!("mesh: {name} saw {from} → {to}: {metric}{code} = {value}");
        }
    }
    eprintln!("mesh: metrics at http://{a_admin}/metrics (sidecar A), http://{b_admin}/metrics (sidecar B),");
    eprintln!("mesh:   http://{wp_admin}/metrics (waypoint), http://{gw_admin}/metrics (gateway)");
    eprintln!("mesh: try  curl http://{a_http}/            # allowed: 200");
    eprintln!("mesh: try  curl http://{a_http}/admin       # denied by the waypoint: 403");
    eprintln!(
        "mesh: try  echo hello | nc -N {} {}   # plain TCP through the mesh",
        a_echo.ip(),
        a_echo.port()
    );
    eprintln!("mesh: try  curl http://{gw}/            # through the ingress gateway");
    eprintln!("mesh: serving; Ctrl-C drains every proxy");
    for t in tasks {
        let _ = t.await;
    }
    drop(dir);
}

/// The value of label `key` in one line of Prometheus text (ours: no `"` in values).
fn label<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.split_once(&format!("{key}=\""))?.1;
    Some(rest.split('"').next().unwrap_or(rest))
}

/// Writes `contents` to `dir/name`, or exits.
fn write(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap_or_else(|e| support::fail(format!("{name}: {e}")));
    path
}

/// `N` distinct free loopback ports: bound to `:0` together, then released for the
/// proxies to bind.
fn free_ports<const N: usize>() -> [SocketAddr; N] {
    let bind = |_| std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| support::fail(e));
    let held: [std::net::TcpListener; N] = std::array::from_fn(bind);
    held.map(|l| l.local_addr().unwrap_or_else(|e| support::fail(e)))
}

/// Waits (bounded: 10 s) until an admin endpoint answers `/ready`.
async fn wait_ready(admin: SocketAddr) {
    for _ in 0..200 {
        if get(admin, "/ready").await.starts_with("HTTP/1.1 200") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    support::fail(format!("{admin} did not become ready"));
}

/// A plain HTTP/1.1 GET; the raw answer, or "" (bounded by a 10 s timeout).
async fn get(addr: SocketAddr, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: reviews.mesh\r\nConnection: close\r\n\r\n");
    String::from_utf8_lossy(&exchange(addr, req.as_bytes(), false).await).into_owned()
}

/// Sends `data`, half-closes, returns what came back (bounded by a 10 s timeout).
async fn tcp_echo(addr: SocketAddr, data: &[u8]) -> String {
    String::from_utf8_lossy(&exchange(addr, data, true).await).into_owned()
}

/// Writes `data` (then half-closes if asked: HTTP servers may close on a half-close) and
/// reads to the end; empty on any error or after 10 s.
async fn exchange(addr: SocketAddr, data: &[u8], half_close: bool) -> Vec<u8> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(data).await?;
        if half_close {
            s.shutdown().await?;
        }
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    match tokio::time::timeout(Duration::from_secs(10), io).await {
        Ok(Ok(out)) => out,
        _ => Vec::new(),
    }
}
