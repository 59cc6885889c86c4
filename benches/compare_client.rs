//! The load client of `bench/compare.sh` for what its off-the-shelf tools cannot do
//! soundly: full TLS 1.3 handshakes per second (wrk negotiates TLS 1.2 and resumes
//! sessions; `openssl s_time` runs one connection at a time), CONNECT tunnels per second,
//! a CONNECT driver for iperf3, and holding thousands of idle relayed connections for the
//! memory measurement. One thread (the script pins it to the endpoints' CPU); every loop is
//! bounded in time and count.
//!
//! ```text
//! compare_client rate  --connect 127.0.0.1:8443 [--tls localhost] [--via-connect 127.0.0.1:80] \
//!                      [--path /1k.bin] [--concurrency 32] [--seconds 10]
//! compare_client drive --listen 127.0.0.1:9000 --proxy 127.0.0.1:3128 --target 127.0.0.1:5201
//! compare_client sink  --listen 127.0.0.1:9001
//! compare_client hold  --connect 127.0.0.1:9000 -n 10000    # through a proxy to the sink
//! ```
//!
//! `rate` prints `rate <ops/s> ok <n> errors <n>`; `hold` prints `held <n>` once every
//! connection has carried one byte each way, then holds them until it is killed (or the
//! time limit). `cargo bench` runs it without a command: it prints this usage and exits.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Upper bound for one operation (connect + handshake + request), so a stuck peer cannot
/// stall a run.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(about = "load client for bench/compare.sh")]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// New connections per second, each carrying one HTTP/1.1 request with Connection: close.
    Rate {
        #[arg(long)]
        connect: SocketAddr,
        /// Do a full TLS 1.3 handshake (no resumption) with this SNI.
        #[arg(long)]
        tls: Option<String>,
        /// Open a CONNECT tunnel to this target through `--connect` (an HTTP proxy) first.
        #[arg(long)]
        via_connect: Option<String>,
        #[arg(long, default_value = "/1k.bin")]
        path: String,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// A local port that CONNECTs each accepted connection through `--proxy` to `--target`
    /// (or, without `--proxy`, dials `--target` directly) and relays with `splice(2)`.
    Drive {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        proxy: Option<SocketAddr>,
        #[arg(long)]
        target: String,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
    },
    /// Open `-n` connections to `--connect`, one at a time, send one byte on each and
    /// wait for one byte back (from `sink`), then hold them idle.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(short, default_value_t = 10_000)]
        n: usize,
        /// Exit after this many seconds in total (setting up and holding).
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// Accept connections, answer the first byte of each with one byte, hold them idle.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
}

fn main() {
    let args = Args::parse();
    let Some(cmd) = args.cmd else {
        eprintln!("compare_client: a load client for bench/compare.sh; see --help");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let code = rt.block_on(async move {
        match cmd {
            Cmd::Rate {
                connect,
                tls,
                via_connect,
                path,
                concurrency,
                seconds,
            } => rate(connect, tls, via_connect, path, concurrency, seconds).await,
            Cmd::Drive {
                listen,
                proxy,
                target,
                seconds,
            } => drive(listen, proxy, target, seconds).await,
            Cmd::Hold {
                connect,
                n,
                seconds,
            } => hold(connect, n, seconds).await,
            Cmd::Sink { listen, seconds } => sink(listen, seconds).await,
        }
    });
    std::process::exit(code);
}

async fn rate(
    connect: SocketAddr,
    sni: Option<String>,
    via: Option<String>,
    path: String,
    concurrency: usize,
    seconds: f64,
) -> i32 {
    let tls = sni.map(|name| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(
                rustls::crypto::ring::default_provider(),
            )))
            .with_no_client_auth();
        // Every connection is a full handshake, like a new client's.
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(name).unwrap();
        (tokio_rustls::TlsConnector::from(Arc::new(config)), name)
    });
    let request: Arc<[u8]> =
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .into_bytes()
            .into();
    let connect_head: Option<Arc<[u8]>> = via.map(|t| {
        format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n")
            .into_bytes()
            .into()
    });
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (tls, request, connect_head) = (tls.clone(), request.clone(), connect_head.clone());
        let (ok, errors) = (ok.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut last_error = None;
            while Instant::now() < deadline {
                let op = one_request(connect, tls.as_ref(), connect_head.as_deref(), &request);
                match tokio::time::timeout(OP_TIMEOUT, op).await {
                    Ok(Ok(())) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        last_error = Some(e.to_string());
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        last_error = Some("timed out".into());
                    }
                }
            }
            last_error
        }));
    }
    let mut last_error = None;
    for t in tasks {
        if let Ok(Some(e)) = t.await {
            last_error = Some(e);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (ok, errors) = (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    if let Some(e) = last_error {
        eprintln!("compare_client: {errors} errors, last: {e}");
    }
    println!("rate {:.1} ok {ok} errors {errors}", ok as f64 / elapsed);
    // A run where more than 1% failed measures the failure path, not the proxy.
    if ok == 0 || errors * 100 > ok {
        1
    } else {
        0
    }
}

async fn one_request(
    addr: SocketAddr,
    tls: Option<&(tokio_rustls::TlsConnector, ServerName<'static>)>,
    connect_head: Option<&[u8]>,
    request: &[u8],
) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    if let Some(head) = connect_head {
        tcp.write_all(head).await?;
        let response = read_head(&mut tcp).await?;
        if !response.starts_with(b"HTTP/1.1 200") && !response.starts_with(b"HTTP/1.0 200") {
            return Err(other("CONNECT refused"));
        }
    }
    match tls {
        Some((connector, name)) => {
            let mut s = connector.connect(name.clone(), tcp).await?;
            exchange(&mut s, request).await
        }
        None => exchange(&mut tcp, request).await,
    }
}

/// Sends the request and reads the response to its end (Content-Length) or to EOF.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    request: &[u8],
) -> std::io::Result<()> {
    s.write_all(request).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16384];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(n) => n,
            // A peer closing without close_notify after a complete response is fine.
            Err(e) if complete(&buf) => {
                let _ = e;
                0
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if complete(&buf) {
            break;
        }
    }
    if buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200") {
        Ok(())
    } else {
        Err(other("bad response"))
    }
}

/// Whether `buf` holds a whole response with a Content-Length.
fn complete(buf: &[u8]) -> bool {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| buf.len() >= end + 4 + len)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads a response head byte by byte so nothing after it is consumed.
async fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || s.read(&mut byte).await? == 0 {
            return Err(other("bad CONNECT response"));
        }
        head.push(byte[0]);
    }
    Ok(head)
}

async fn drive(listen: SocketAddr, proxy: Option<SocketAddr>, target: String, seconds: u64) -> i32 {
    let listener = TcpListener::bind(listen).await.unwrap();
    println!("listening on {listen}");
    let head: Arc<[u8]> = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
        .into_bytes()
        .into();
    let target: Arc<str> = target.into();
    let serve = async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let (head, target) = (head.clone(), target.clone());
            tokio::spawn(async move {
                let upstream = async {
                    let up = match proxy {
                        Some(p) => {
                            let mut up = TcpStream::connect(p).await?;
                            up.write_all(&head).await?;
                            let response = read_head(&mut up).await?;
                            if !response.starts_with(b"HTTP/1.1 200") {
                                return Err(other("CONNECT refused"));
                            }
                            up
                        }
                        None => TcpStream::connect(&*target).await?,
                    };
                    up.set_nodelay(true)?;
                    Ok::<_, std::io::Error>(up)
                };
                match upstream.await {
                    Ok(up) => {
                        let _ = client.set_nodelay(true);
                        splice_both_ways(client, up).await;
                    }
                    Err(e) => eprintln!("compare_client drive: {e}"),
                }
            });
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(seconds), serve).await;
    0
}

async fn hold(connect: SocketAddr, n: usize, seconds: u64) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let step = async {
            let mut c = TcpStream::connect(connect).await?;
            c.write_all(b"x").await?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(c)
        };
        match tokio::time::timeout_at(deadline.into(), tokio::time::timeout(OP_TIMEOUT, step)).await
        {
            Ok(Ok(Ok(c))) => held.push(c),
            Ok(Ok(Err(e))) => {
                eprintln!("compare_client hold: connection {i}: {e}");
                return 1;
            }
            _ => {
                eprintln!("compare_client hold: connection {i}: timed out");
                return 1;
            }
        }
    }
    println!("held {}", held.len());
    // The script reads the proxy's RSS now and then kills us; the deadline is a backstop.
    tokio::time::sleep_until(deadline.into()).await;
    0
}

async fn sink(listen: SocketAddr, seconds: u64) -> i32 {
    let listener = TcpListener::bind(listen).await.unwrap();
    let serve = async {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                // Out of descriptors, most likely: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() && s.write_all(b"y").await.is_ok() {
                    // Hold the connection until the peer closes it.
                    let _ = s.read(&mut b).await;
                }
            });
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(seconds), serve).await;
    0
}

/// Copies both ways with `splice(2)` (socket → pipe → socket, no user-space copies), so the
/// driver costs the endpoints' CPU as little as possible; each direction ends with a FIN.
async fn splice_both_ways(a: TcpStream, b: TcpStream) {
    let (a, b) = (Arc::new(a), Arc::new(b));
    let one = tokio::spawn(splice_one_way(a.clone(), b.clone()));
    let _ = splice_one_way(b, a).await;
    let _ = one.await;
}

async fn splice_one_way(from: Arc<TcpStream>, to: Arc<TcpStream>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (rd, wr) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: fcntl on a descriptor owned here.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    let splice = |from: i32, to: i32, len: usize| {
        // SAFETY: plain syscall on descriptors that outlive the call.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    };
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), wr.as_raw_fd(), 1 << 20)
            })
            .await?;
        if n == 0 {
            return socket2::SockRef::from(&*to).shutdown(std::net::Shutdown::Write);
        }
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(rd.as_raw_fd(), to.as_raw_fd(), left)
                })
                .await?;
        }
    }
}

fn other(msg: &str) -> std::io::Error {
    std::io::Error::other(msg.to_string())
}

/// Accepts any certificate and handshake signature: a load generator, not a client to
/// trust (key exchange and record protection are still real).
#[derive(Debug)]
struct AnyCert(rustls::crypto::CryptoProvider);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Not checked: an ECDSA verification costs the client more than signing costs
        // the server, and the client must not be what limits handshakes per second.
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
