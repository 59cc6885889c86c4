//! The example binaries as tests run them: build them once, start one with its flags,
//! read its `listening on ADDR` lines, talk to it over loopback, SIGTERM it. Shared by
//! tests/examples.rs and tests/soak.rs.
#![cfg(unix)]
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const STARTUP: Duration = Duration::from_secs(30);
pub const EXIT: Duration = Duration::from_secs(15);
pub const IO: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Finding, building and running the binaries

pub fn enabled_features() -> Vec<&'static str> {
    let all = [
        ("tcp", cfg!(feature = "tcp")),
        ("tls", cfg!(feature = "tls")),
        ("demo-certs", cfg!(feature = "demo-certs")),
        ("proxy-protocol", cfg!(feature = "proxy-protocol")),
        ("detect", cfg!(feature = "detect")),
        ("http", cfg!(feature = "http")),
        ("connect", cfg!(feature = "connect")),
        ("hbone", cfg!(feature = "hbone")),
        ("metrics", cfg!(feature = "metrics")),
        ("istio-ca", cfg!(feature = "istio-ca")),
    ];
    all.iter().filter(|(_, on)| *on).map(|(f, _)| *f).collect()
}

/// `target/<profile>/examples`, after one `cargo build --examples` (a no-op when `cargo
/// test` built them already) so a stale binary is never tested.
pub fn examples_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().ok()?; // target/<profile>/deps/examples-…
        let profile_dir = exe.parent()?.parent()?;
        let target_dir = profile_dir.parent()?;
        let profile = match profile_dir.file_name()?.to_str()? {
            "debug" => "dev",
            "release" => "release",
            other => {
                println!("unknown profile directory {other:?}; not building the examples");
                return Some(profile_dir.join("examples"));
            }
        };
        let started = Instant::now();
        let mut cargo = Command::new(env!("CARGO"));
        // What cargo set for this test process describes the package, not the build;
        // build scripts that watch such variables (ring watches CARGO_MANIFEST_DIR) would
        // otherwise rebuild on every switch between this build and a shell's.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || k.starts_with("CARGO_BIN_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&k.as_ref())
            {
                cargo.env_remove(&key);
            }
        }
        let out = cargo
            .args(["build", "--examples", "--profile", profile, "--target-dir"])
            .arg(target_dir)
            .args([
                "--no-default-features",
                "--features",
                &enabled_features().join(","),
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output();
        match out {
            Ok(out) if out.status.success() => {
                println!("examples built in {:?}", started.elapsed());
            }
            Ok(out) => panic!(
                "building the examples failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => println!("cannot run cargo ({e}); using the example binaries as they are"),
        }
        Some(profile_dir.join("examples"))
    })
    .as_deref()
}

/// The example's binary, or `None` (with the reason printed).
pub fn binary(name: &str) -> Option<PathBuf> {
    let Some(dir) = examples_dir() else {
        println!("SKIPPED {name}: cannot locate target/<profile>/examples");
        return None;
    };
    let path = dir.join(name);
    if path.is_file() {
        Some(path)
    } else {
        println!(
            "SKIPPED {name}: {} not found (example missing or its features are off)",
            path.display()
        );
        None
    }
}

/// A running example: stdout lines arrive on a channel, stderr is collected.
pub struct Example {
    name: String,
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Example {
    pub fn start(name: &str, args: &[&str]) -> Option<Example> {
        Self::start_with(&[], name, args)
    }

    /// Starts the example behind a wrapper command (`ip netns exec NS`), which must exec
    /// it (so that the pid we signal is the example's).
    pub fn start_with(wrapper: &[&str], name: &str, args: &[&str]) -> Option<Example> {
        let path = binary(name)?;
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(path);
                c
            }
            None => Command::new(path),
        };
        let mut child = command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Some(Example {
            name: name.to_string(),
            child,
            lines,
            stderr,
        })
    }

    /// The process id (for /proc/PID/…).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for `n` `listening on ADDR` lines.
    pub fn listening(&mut self, n: usize) -> Vec<SocketAddr> {
        let deadline = Instant::now() + STARTUP;
        let mut addrs = Vec::new();
        while addrs.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        addrs.push(
                            addr.trim().parse().unwrap_or_else(|e| {
                                panic!("{}: bad line {line:?}: {e}", self.name)
                            }),
                        );
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: {} of {n} `listening on` lines after {STARTUP:?}; stderr:\n{}",
                    self.name,
                    addrs.len(),
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: exited before listening ({:?}); stderr:\n{}",
                    self.name,
                    self.child.try_wait(),
                    self.stderr()
                ),
            }
        }
        addrs
    }

    /// Waits (bounded) until stderr contains `needle`; returns the line that does.
    pub fn stderr_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + IO;
        loop {
            if let Some(line) = self.stderr().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {needle:?} on stderr:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGHUP (the examples that support it re-read `--config`).
    pub fn hangup(&self) {
        // SAFETY: kill(2) on the pid of our own child process, which we have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// SIGTERM, then the exit status (bounded).
    pub fn terminate(mut self) -> (ExitStatus, String) {
        // SAFETY: kill(2) on the pid of our own child process, which we have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let status = wait_bounded(&mut self.child, EXIT)
            .unwrap_or_else(|| panic!("{}: still running {EXIT:?} after SIGTERM", self.name));
        std::thread::sleep(Duration::from_millis(50)); // let the stderr thread finish
        (status, self.stderr())
    }

    /// SIGTERM and assert a clean drain (exit 0).
    pub fn stop(self) {
        let name = self.name.clone();
        let (status, stderr) = self.terminate();
        assert!(
            status.success(),
            "{name}: exit {status} after SIGTERM; stderr:\n{stderr}"
        );
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        // A failed test must not leave its example running; only our own child is killed.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------------------------
// Clients

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO)).unwrap();
    s.set_write_timeout(Some(IO)).unwrap();
    s
}

/// Writes `data`, half-closes if asked (HTTP servers close at once on a half-close, so
/// HTTP requests are not), reads to EOF or reset.
pub fn exchange_with(addr: SocketAddr, data: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = connect(addr);
    let _ = s.write_all(data);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A raw HTTP/1.1 request (with `Connection: close`); status and body. `None` when the
/// connection closed without a response.
pub fn http(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Option<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    parse_response(&exchange_with(addr, req.as_bytes(), false))
}

/// `--admin`'s `/metrics`, read with a real Prometheus text parser: the samples named
/// `name` as (labels, value).
pub fn metric(
    admin: SocketAddr,
    name: &str,
) -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
    let (status, text) = http(admin, "admin", "/metrics", "").expect("a /metrics answer");
    assert_eq!(status, 200, "{text}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{text}"));
    scrape
        .samples
        .into_iter()
        .filter(|s| s.metric == name)
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (labels, value)
        })
        .collect()
}

pub fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

pub fn temp_file(tag: &str, contents: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "proxystack-examples-test-{}-{n}-{tag}",
        std::process::id()
    ));
    std::fs::write(&path, contents).unwrap();
    path
}

/// Temporary files, removed on drop (also when a test fails half-way).
#[derive(Default)]
pub struct TempFiles(Vec<PathBuf>);

impl TempFiles {
    pub fn add(&mut self, tag: &str, contents: &str) -> PathBuf {
        let path = temp_file(tag, contents);
        self.0.push(path.clone());
        path
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Identity files for the mesh examples' --config

pub fn base64(der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                T[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// `[identity]` for a config: the workload `ns/sa` of `ca`, written to temp files.
#[cfg(all(feature = "hbone", feature = "demo-certs"))]
pub fn identity_section(
    ca: &proxystack::tls::demo::DemoCa,
    ns: &str,
    sa: &str,
    files: &mut TempFiles,
) -> String {
    let ck = ca.workload_cert(ns, sa);
    let cert = files.add("cert.pem", &pem("CERTIFICATE", ck.chain[0].as_ref()));
    let key = files.add("key.pem", &pem("PRIVATE KEY", ck.key.secret_der()));
    let roots = files.add("roots.pem", ca.root_pem());
    let section = format!(
        "[identity]\ncert = {:?}\nkey = {:?}\nroots = {:?}\n",
        cert.display().to_string(),
        key.display().to_string(),
        roots.display().to_string()
    );
    section
}

/// A plain TCP echo app on loopback (threads end with the test process).
pub fn echo_app() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    addr
}

/// Waits (bounded) until `--admin`'s `/metrics` counts `applied` and `failed` SIGHUP
/// config reloads.
pub fn wait_reloads(admin: SocketAddr, applied: u64, failed: u64) {
    let count = |name: &str| metric(admin, name).first().map(|(_, v)| *v as u64);
    let reached = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        count("proxystack_config_reloads_total") == Some(applied)
            && count("proxystack_config_reload_failures_total") == Some(failed)
    });
    assert!(
        reached,
        "reloads never reached {applied} applied, {failed} failed"
    );
}

/// Runs an example to completion (it is expected to exit on its own, within [`EXIT`]) and
/// returns its status and stderr; `None` when the example is not built.
pub fn run_to_exit(name: &str, args: &[&str]) -> Option<(ExitStatus, String)> {
    run_to_exit_within(name, args, EXIT)
}

/// [`run_to_exit`], for an example that may take up to `limit` to give up.
pub fn run_to_exit_within(
    name: &str,
    args: &[&str],
    limit: Duration,
) -> Option<(ExitStatus, String)> {
    let path = binary(name)?;
    let mut child = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_bounded(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{name} {args:?} did not exit within {limit:?}");
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    status.map(|s| (s, stderr))
}

/// Sends `ping` through an echoing tunnel and checks it comes back (bounded); the tunnel,
/// to go on with.
pub async fn ping(
    mut t: proxystack::Conn<proxystack::BoxIo>,
) -> proxystack::Conn<proxystack::BoxIo> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    t.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(IO, t.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping");
    t
}
