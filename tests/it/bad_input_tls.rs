//! Bad inputs for the TLS level (REFERENCE §4.2 "TLS peek / terminate", mTLS list): what
//! `PeekLayer` and `TerminateLayer` do with hellos that are slow, huge, truncated, not TLS,
//! GREASEd, duplicated, empty, oddly named or unnamed, and what mutual TLS does with every
//! kind of wrong client certificate. Each case checks the exact outcome on the wire (alert
//! or close), that nothing reached the service behind the layer, and that the next good
//! connection still works. Hellos are taken from rustls and edited field by field; real
//! handshakes use rustls (async and blocking) and `openssl s_client` where installed.
#![cfg(all(feature = "tls", feature = "demo-certs"))]

use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::common::*;
use proxystack::conn::Metadata;
use proxystack::identity::{PeerIdentity, SpiffeId};
use proxystack::tls::demo::DemoCa;
use proxystack::tls::{
    Alpn, CertKey, ClientAuth, OfferedAlpn, PeekLayer, PeekedHello, ServerConfigBuilder, Sni,
    SniMode, TerminateLayer, TlsConnector, TlsError, TlsInfo, UnknownSni,
};
use proxystack::{tcp, Conn, Server, Target};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, ClientConfig, ClientConnection, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tower::{service_fn, Layer, ServiceExt};

type Meta = http::Extensions;

const TD: &str = "cluster.local";
const NAME: &str = "a.example.com";

// ---------------------------------------------------------------------------------------
// ClientHellos: rustls writes them, the tests take them apart and break one thing.

const EXT_SNI: u16 = 0;
const EXT_GROUPS: u16 = 10;
const EXT_ALPN: u16 = 16;
const EXT_VERSIONS: u16 = 43;
const EXT_KEY_SHARE: u16 = 51;
const EXT_ECH: u16 = 0xfe0d;

/// The first flight of a rustls client: one or more handshake records.
fn first_flight(config: ClientConfig, sni: Option<&str>) -> Vec<u8> {
    // rustls sends no SNI for an IP server name.
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

fn client_config(
    ca: &DemoCa,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// The handshake bytes carried by a sequence of handshake records.
fn handshake_payload(mut records: &[u8]) -> Vec<u8> {
    let mut hs = Vec::new();
    while let [22, _, _, hi, lo, rest @ ..] = records {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        hs.extend_from_slice(&rest[..len]);
        records = &rest[len..];
    }
    assert!(records.is_empty());
    hs
}

/// A ClientHello taken apart.
#[derive(Clone)]
struct Hello {
    legacy_version: [u8; 2],
    random: Vec<u8>,
    session_id: Vec<u8>,
    suites: Vec<u16>,
    compression: Vec<u8>,
    exts: Vec<(u16, Vec<u8>)>,
}

fn be16(v: usize) -> [u8; 2] {
    u16::try_from(v).unwrap().to_be_bytes()
}

impl Hello {
    /// rustls's TLS 1.3 (and 1.2) hello for `sni` offering `alpn`.
    fn rustls(ca: &DemoCa, sni: Option<&str>, alpn: &[&[u8]]) -> Self {
        let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
        Self::parse(&first_flight(client_config(ca, &versions, alpn), sni))
    }

    fn parse(records: &[u8]) -> Self {
        let hs = handshake_payload(records);
        assert_eq!(hs[0], 1, "a ClientHello");
        let b = &hs[4..];
        let mut at = 0;
        let mut take = |n: usize| {
            let s = b[at..at + n].to_vec();
            at += n;
            s
        };
        let legacy_version = [take(1)[0], take(1)[0]];
        let random = take(32);
        let sid_len = take(1)[0] as usize;
        let session_id = take(sid_len);
        let l = take(2);
        let suites = take(u16::from_be_bytes([l[0], l[1]]) as usize)
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        let comp_len = take(1)[0] as usize;
        let compression = take(comp_len);
        let l = take(2);
        let block = take(u16::from_be_bytes([l[0], l[1]]) as usize);
        let mut exts = Vec::new();
        let mut rest = &block[..];
        while !rest.is_empty() {
            let typ = u16::from_be_bytes([rest[0], rest[1]]);
            let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
            exts.push((typ, rest[4..4 + len].to_vec()));
            rest = &rest[4 + len..];
        }
        Hello {
            legacy_version,
            random,
            session_id,
            suites,
            compression,
            exts,
        }
    }

    fn ext(&self, typ: u16) -> Option<&Vec<u8>> {
        self.exts.iter().find(|(t, _)| *t == typ).map(|(_, d)| d)
    }

    /// Replaces extension `typ` where it is, or appends it.
    fn set(mut self, typ: u16, data: Vec<u8>) -> Self {
        match self.exts.iter_mut().find(|(t, _)| *t == typ) {
            Some(slot) => slot.1 = data,
            None => self.exts.push((typ, data)),
        }
        self
    }

    /// Adds another extension of a type it may already have.
    fn push(mut self, typ: u16, data: Vec<u8>) -> Self {
        self.exts.push((typ, data));
        self
    }

    fn handshake(&self) -> Vec<u8> {
        let mut body = self.legacy_version.to_vec();
        body.extend(&self.random);
        body.push(self.session_id.len() as u8);
        body.extend(&self.session_id);
        body.extend(be16(self.suites.len() * 2));
        body.extend(self.suites.iter().flat_map(|s| s.to_be_bytes()));
        body.push(self.compression.len() as u8);
        body.extend(&self.compression);
        let mut block = Vec::new();
        for (typ, data) in &self.exts {
            block.extend(typ.to_be_bytes());
            block.extend(be16(data.len()));
            block.extend(data);
        }
        body.extend(be16(block.len()));
        body.extend(block);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        hs
    }

    /// The hello in handshake records of at most `max` payload bytes.
    fn records(&self, max: usize) -> Vec<u8> {
        self.handshake()
            .chunks(max)
            .flat_map(|c| [&[22, 3, 1][..], &be16(c.len()), c].concat())
            .collect()
    }

    fn bytes(&self) -> Vec<u8> {
        self.records(16384)
    }
}

fn sni_ext(name: &[u8]) -> Vec<u8> {
    let mut entry = vec![0];
    entry.extend(be16(name.len()));
    entry.extend(name);
    [&be16(entry.len())[..], &entry].concat()
}

fn alpn_ext(protocols: &[&[u8]]) -> Vec<u8> {
    let list: Vec<u8> = protocols
        .iter()
        .flat_map(|p| [&[p.len() as u8][..], p].concat())
        .collect();
    [&be16(list.len())[..], &list].concat()
}

/// A name of exactly `n` bytes made of short labels.
fn long_name(n: usize) -> String {
    let mut s = "a.".repeat(n / 2);
    s.truncate(n - 1);
    s.push('b');
    assert_eq!(s.len(), n);
    s
}

// ---------------------------------------------------------------------------------------
// Servers and raw clients.

/// How the server ended a raw connection.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Fin,
    Reset,
}

/// Writes `bytes` (ignoring a server that stopped reading), then reads until the server
/// closes; what it sent and how it closed. Panics if it does not close within 10 s.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], then_fin: bool) -> (Vec<u8>, End) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    if then_fin {
        let _ = s.shutdown().await;
    }
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut TcpStream) -> (Vec<u8>, End) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Err(_) => panic!("not closed within 10 s; got {got:02x?}"),
            Ok(Ok(0)) => return (got, End::Fin),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                return (got, End::Reset);
            }
        }
    }
}

/// The alert in a plaintext alert record, if that is what the server sent first.
fn alert_record(data: &[u8]) -> Option<(u8, u8)> {
    match data {
        [0x15, 3, _, 0, 2, level, desc, ..] => Some((*level, *desc)),
        _ => None,
    }
}

/// Whether the server's first record is a handshake record holding a ServerHello (or a
/// HelloRetryRequest, which has the same type): it accepted the ClientHello.
fn is_server_hello(data: &[u8]) -> bool {
    matches!(data, [0x16, 3, 3, _, _, 2, ..])
}

fn fatal(desc: AlertDescription) -> Option<(u8, u8)> {
    Some((2, u8::from(desc)))
}

/// A terminating server for `NAME` (and a default certificate for everything else).
fn server_config(ca: &DemoCa) -> Arc<rustls::ServerConfig> {
    ServerConfigBuilder::new()
        .cert_for(NAME, ca.server_cert(&[NAME]))
        .default_cert(ca.server_cert(&["default.example.com"]))
        .alpn(["h2", "http/1.1"])
        .build()
        .unwrap()
}

fn terminate(config: Arc<rustls::ServerConfig>) -> TerminateLayer {
    TerminateLayer::new(config).handshake_timeout(Duration::from_secs(5))
}

fn tls_client(ca: &DemoCa) -> TlsConnector<tcp::TcpConnector> {
    TlsConnector::new(tcp::TcpConnector::new(), ca.roots())
        .handshake_timeout(Duration::from_secs(10))
}

async fn echo_once(io: &mut (impl AsyncRead + AsyncWrite + Unpin), msg: &[u8]) -> Vec<u8> {
    io.write_all(msg).await.unwrap();
    io.flush().await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    got
}

/// A good client still completes a handshake with the terminating harness and is echoed.
async fn assert_terminate_serves(h: &mut Harness, ca: &DemoCa) {
    let mut conn = tls_client(ca)
        .sni(SniMode::Fixed(NAME.into()))
        .oneshot(Target::from(h.addr()))
        .await
        .unwrap();
    assert_eq!(echo_once(&mut conn, b"next").await, b"next");
    assert_eq!(h.next_seen().await.get::<Sni>().unwrap().0, NAME);
    close_cleanly(&mut conn).await;
}

/// close_notify, then wait for the server's: its service ends without an error to report.
async fn close_cleanly(io: &mut (impl AsyncRead + AsyncWrite + Unpin)) {
    io.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
}

/// A good hello still passes the peeking harness: replayed byte for byte, SNI recorded.
async fn assert_peek_serves(h: &mut Harness, ca: &DemoCa) {
    let good = Hello::rustls(ca, Some(NAME), &[b"h2"]).bytes();
    let mut s = TcpStream::connect(h.addr()).await.unwrap();
    s.write_all(&good).await.unwrap();
    let mut back = vec![0u8; good.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, good);
    assert_eq!(h.next_seen().await.get::<Sni>().unwrap().0, NAME);
}

/// The alert a TLS error carries, looking through io::Error wrappers and sources.
fn alert_in(e: &(dyn std::error::Error + 'static)) -> Option<AlertDescription> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let rustls_err = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(a)) = rustls_err {
            return Some(*a);
        }
        cur = err.source();
    }
    None
}

fn have(bin: &str) -> bool {
    std::process::Command::new(bin)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `openssl s_client` with `args`, stdin closed at once; its stdout and stderr.
async fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string()])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("s_client finished")
    .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A blocking rustls client: handshake, write `msg`, read as many bytes back. Returns the
/// echo and the negotiated version.
fn blocking_round_trip(
    addr: SocketAddr,
    config: ClientConfig,
    name: &str,
    msg: &[u8],
) -> std::io::Result<(Vec<u8>, Option<ProtocolVersion>)> {
    let name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    let mut conn = ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let mut sock = std::net::TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(msg)?;
    tls.flush()?;
    let mut got = vec![0u8; msg.len()];
    tls.read_exact(&mut got)?;
    Ok((got, conn.protocol_version()))
}

// ---------------------------------------------------------------------------------------
// Malformed hellos: refused by both layers, each in its own way.

/// Every malformed first flight is closed by `PeekLayer` with the parser's reason, and
/// answered by `TerminateLayer` (rustls) with the alert RFC 8446 §6.2 asks for — or, for a
/// handshake header announcing 16 MiB, closed without one. A FIN either way (the server
/// read all there was), nothing reaches the service behind, and the next good connection
/// is served.
#[tokio::test]
async fn malformed_hellos_are_refused_by_peek_and_terminate() {
    use AlertDescription::{DecodeError, IllegalParameter};
    let ca = DemoCa::new("example.org");
    let base = Hello::rustls(&ca, Some(NAME), &[b"h2"]);
    let sslv2 = [
        &[
            0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
        ][..],
        &[
            0, 0, 0x39, 0, 0, 0x38, 0, 0, 0x35, 0, 0, 0x16, 0, 0, 0x13, 0, 0, 0x0a, 7, 0, 0xc0,
        ],
        &[0x5a; 16],
    ]
    .concat();
    // (case, bytes, PeekLayer's error, TerminateLayer's alert or None for a bare close)
    let cases: Vec<(&str, Vec<u8>, &str, Option<AlertDescription>)> = vec![
        (
            "record type 0x16 then text",
            b"\x16GET / HTTP/1.1\r\n\r\n".to_vec(),
            "UnsupportedRecordVersion(18245)",
            Some(DecodeError),
        ),
        (
            "a ServerHello header where the ClientHello belongs",
            vec![0x16, 3, 1, 0, 5, 2, 0xff, 0xff, 0xff, 0xff],
            "NotClientHello(2)",
            None,
        ),
        (
            "ClientHello header then noise",
            [&[0x16u8, 3, 1, 0, 44, 1, 0, 0, 40][..], &[0xff; 40]].concat(),
            "Malformed(\"truncated legacy_session_id\")",
            Some(DecodeError),
        ),
        (
            "SSLv2-compatible hello",
            sslv2,
            "NotTls { sslv2: true }",
            Some(DecodeError),
        ),
        (
            "duplicate server_name extension",
            base.clone()
                .push(EXT_SNI, sni_ext(b"b.example.com"))
                .bytes(),
            "DuplicateExtension(0)",
            Some(IllegalParameter),
        ),
        (
            "duplicate ALPN extension",
            base.clone().push(EXT_ALPN, alpn_ext(&[b"h2"])).bytes(),
            "DuplicateExtension(16)",
            Some(IllegalParameter),
        ),
        (
            "empty ALPN protocol list",
            base.clone().set(EXT_ALPN, vec![0, 0]).bytes(),
            "empty protocol_name_list",
            Some(DecodeError),
        ),
        (
            "SNI of 256 bytes",
            base.clone()
                .set(EXT_SNI, sni_ext(long_name(256).as_bytes()))
                .bytes(),
            "host_name longer than 255 bytes",
            Some(IllegalParameter),
        ),
        (
            "SNI with a space",
            base.clone()
                .set(EXT_SNI, sni_ext(b"a.example.com b.example.com"))
                .bytes(),
            "host_name has a byte outside printable ASCII",
            Some(IllegalParameter),
        ),
        (
            "SNI with CR LF",
            base.clone()
                .set(EXT_SNI, sni_ext(b"a.example.com\r\nx-injected: 1"))
                .bytes(),
            "host_name has a byte outside printable ASCII",
            Some(IllegalParameter),
        ),
    ];
    let mut peek = Harness::start(PeekLayer::new()).await;
    let mut term = Harness::start(terminate(server_config(&ca))).await;
    for (case, bytes, peek_error, alert) in cases {
        let (back, end) = raw_exchange(peek.addr(), &bytes, false).await;
        assert_eq!((back.len(), end), (0, End::Fin), "peek, {case}");
        let err = peek.next_error().await;
        assert!(
            err.starts_with("ClientHello(") && err.contains(peek_error),
            "peek, {case}: {err}"
        );
        peek.assert_nothing_reached_inner();
        assert_peek_serves(&mut peek, &ca).await;

        let (back, end) = raw_exchange(term.addr(), &bytes, false).await;
        assert_eq!(end, End::Fin, "terminate, {case}");
        match alert {
            Some(desc) => assert_eq!(alert_record(&back), fatal(desc), "terminate, {case}"),
            None => assert!(back.is_empty(), "terminate, {case}: {back:02x?}"),
        }
        let err = term.next_error().await;
        assert!(err.starts_with("Handshake("), "{case}: {err}");
        term.assert_nothing_reached_inner();
        assert_terminate_serves(&mut term, &ca).await;
    }
    peek.proxy.shutdown().await;
    term.proxy.shutdown().await;
}

/// A hello cut short: with a FIN, `PeekLayer` reports `Truncated` and terminate the EOF,
/// both close without a word; when the client stalls instead, each closes at its timeout.
/// With a fallback, the stalled partial hello goes there verbatim — documented: "no
/// complete hello within the timeout" is treated like a silent client — as does an SSLv2
/// hello, which is "not TLS" to the parser.
#[tokio::test]
async fn truncated_hellos_are_closed_or_fall_back() {
    let ca = DemoCa::new("example.org");
    let whole = Hello::rustls(&ca, Some(NAME), &[b"h2"]).bytes();
    let cut = &whole[..whole.len() - 10];

    let mut peek = Harness::start(PeekLayer::new().timeout(Duration::from_millis(500))).await;
    let mut term = Harness::start(
        TerminateLayer::new(server_config(&ca)).handshake_timeout(Duration::from_millis(500)),
    )
    .await;
    // Then FIN.
    assert_eq!(
        raw_exchange(peek.addr(), cut, true).await,
        (vec![], End::Fin)
    );
    assert_eq!(peek.next_error().await, "ClientHello(Truncated)");
    assert_eq!(
        raw_exchange(term.addr(), cut, true).await,
        (vec![], End::Fin)
    );
    let err = term.next_error().await;
    assert!(err.contains("UnexpectedEof"), "{err}");
    // Then silence.
    for h in [&mut peek, &mut term] {
        let started = std::time::Instant::now();
        assert_eq!(raw_exchange(h.addr(), cut, false).await, (vec![], End::Fin));
        assert!(started.elapsed() >= Duration::from_millis(450));
    }
    assert_eq!(peek.next_error().await, "PeekTimeout(500ms)");
    assert_eq!(term.next_error().await, "HandshakeTimeout(500ms)");
    peek.assert_nothing_reached_inner();
    term.assert_nothing_reached_inner();
    assert_peek_serves(&mut peek, &ca).await;
    assert_terminate_serves(&mut term, &ca).await;

    // With a fallback: the bytes read so far are replayed to it, unchanged.
    let (ftx, mut fallback_seen) = mpsc::unbounded_channel();
    let mut peek = Harness::start(
        PeekLayer::new()
            .timeout(Duration::from_millis(500))
            .fallback(capture(ftx)),
    )
    .await;
    let sslv2 = [
        0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
    ];
    for input in [cut, &sslv2[..]] {
        let mut s = TcpStream::connect(peek.addr()).await.unwrap();
        s.write_all(input).await.unwrap();
        let mut back = vec![0u8; input.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, input);
        let meta = tokio::time::timeout(Duration::from_secs(5), fallback_seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(meta.get::<PeekedHello>().is_none() && meta.get::<Sni>().is_none());
    }
    peek.assert_nothing_reached_inner();
    assert_peek_serves(&mut peek, &ca).await;
}

/// Names that are no DNS names: `PeekLayer` records what is printable ASCII verbatim (`,`
/// `:` included, 255 bytes included), and a router matching names exactly does not match
/// them, so nothing is dialled; rustls refuses all of them with `illegal_parameter`,
/// except an IP literal, which it treats as no SNI (RFC 6066 §3 forbids IP literals).
#[tokio::test]
async fn odd_server_names_are_recorded_verbatim_or_refused() {
    let ca = DemoCa::new("example.org");
    let base = Hello::rustls(&ca, Some(NAME), &[b"h2"]);
    let mut peek = Harness::start(PeekLayer::new()).await;
    let mut term = Harness::start(terminate(server_config(&ca))).await;
    for name in [
        long_name(255),
        "a.example.com,b.example.com".to_owned(),
        "a.example.com:443".to_owned(),
        "127.0.0.1".to_owned(),
        "[::1]".to_owned(),
    ] {
        let hello = base.clone().set(EXT_SNI, sni_ext(name.as_bytes())).bytes();
        let (back, end) = raw_exchange(peek.addr(), &hello, true).await;
        assert_eq!((back == hello, end), (true, End::Fin), "{name}");
        let meta = peek.next_seen().await;
        assert_eq!(meta.get::<Sni>().unwrap().0, name);
        assert_eq!(
            meta.get::<PeekedHello>().unwrap().0.sni.as_deref(),
            Some(&*name)
        );

        let (back, _) = raw_exchange(term.addr(), &hello, true).await;
        if name == "127.0.0.1" {
            assert!(is_server_hello(&back), "{back:02x?}");
        } else {
            assert_eq!(
                alert_record(&back),
                fatal(AlertDescription::IllegalParameter),
                "{name}"
            );
        }
        let _ = term.next_error().await;
        term.assert_nothing_reached_inner();
    }
    assert_terminate_serves(&mut term, &ca).await;

    // Exact-match routing on the recorded name: the odd ones match nothing, dial nothing.
    let (backend, mut backend_seen) = {
        let (tx, rx) = mpsc::unbounded_channel();
        let svc = capture(tx).map_request(|c: Conn<TcpStream>| c.boxed());
        (start(Server::new(), svc).await, rx)
    };
    let backend_addr = backend.addr;
    let router = PeekLayer::new().layer(tcp::Relay::new(tcp::TcpConnector::new()).upstream(
        move |m: &Metadata| (m.get::<Sni>()?.0 == NAME).then(|| Target::from(backend_addr)),
    ));
    let router = start(Server::new(), router).await;
    for name in [
        "a.example.com,b.example.com",
        "a.example.com:443",
        "A.EXAMPLE.COM.",
    ] {
        let hello = base.clone().set(EXT_SNI, sni_ext(name.as_bytes())).bytes();
        assert_eq!(
            raw_exchange(router.addr, &hello, false).await,
            (vec![], End::Fin),
            "{name}"
        );
    }
    assert!(backend_seen.try_recv().is_err(), "an odd name was routed");
    let (back, _) = raw_exchange(router.addr, &base.bytes(), true).await;
    assert_eq!(back, base.bytes());
    assert!(backend_seen.recv().await.is_some());
}

/// An IP literal in SNI, from a real client (openssl sends what it is given): rustls
/// ignores it, so it is treated as no SNI: with `UnknownSni::UseDefault` the handshake
/// completes with the default certificate and no `Sni` metadata; with
/// `UnknownSni::Refuse` it is refused like any hello without a name (issue 14 item 7).
#[tokio::test]
async fn ip_literal_sni_from_openssl_is_treated_as_no_sni() {
    if !have("openssl") {
        println!("SKIPPED: openssl not installed");
        return;
    }
    let ca = DemoCa::new("example.org");
    let build = |policy| {
        ServerConfigBuilder::new()
            .cert_for(NAME, ca.server_cert(&[NAME]))
            .default_cert(ca.server_cert(&["127.0.0.1"]))
            .unknown_sni(policy)
            .build()
            .unwrap()
    };
    let mut refusing = Harness::start(terminate(build(UnknownSni::Refuse))).await;
    let out = s_client(refusing.addr(), &["-servername", "127.0.0.1"]).await;
    assert!(out.contains("alert access denied"), "{out}");
    refusing.next_error().await;
    refusing.assert_nothing_reached_inner();

    let mut term = Harness::start(terminate(build(UnknownSni::UseDefault))).await;
    let ca_file = std::env::temp_dir().join(format!("bad-input-tls-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.root_pem()).unwrap();
    let out = s_client(
        term.addr(),
        &[
            "-servername",
            "127.0.0.1",
            "-verify_ip",
            "127.0.0.1",
            "-CAfile",
            ca_file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    let meta = term.next_seen().await;
    assert!(meta.get::<Sni>().is_none());
    // A name it has no certificate for is refused where unknown names are.
    let out = s_client(refusing.addr(), &["-servername", "other.example.com"]).await;
    assert!(out.contains("alert"), "{out}");
    let _ = std::fs::remove_file(ca_file);
}

/// No SNI at all: `PeekLayer` records the hello without `Sni` (a router on SNI closes it,
/// dialling nothing); `TerminateLayer` serves the default certificate with
/// `UnknownSni::UseDefault` and records no `Sni`; with `UnknownSni::Refuse` a missing name
/// is an unknown name: `access_denied`, nothing reaches the inner service (issue 14 item 7).
#[tokio::test]
async fn hello_without_sni() {
    let ca = DemoCa::new("example.org");
    let hello = Hello::rustls(&ca, None, &[b"h2"]);
    assert!(hello.ext(EXT_SNI).is_none());
    let mut peek = Harness::start(PeekLayer::new()).await;
    let (back, _) = raw_exchange(peek.addr(), &hello.bytes(), true).await;
    assert_eq!(back, hello.bytes());
    let meta = peek.next_seen().await;
    assert!(meta.get::<Sni>().is_none());
    assert_eq!(meta.get::<PeekedHello>().unwrap().0.sni, None);
    assert_eq!(meta.get::<OfferedAlpn>().unwrap().0, [b"h2".to_vec()]);

    let build = |policy| {
        ServerConfigBuilder::new()
            .cert_for(NAME, ca.server_cert(&[NAME]))
            .default_cert(ca.server_cert(&["127.0.0.1"]))
            .unknown_sni(policy)
            .build()
            .unwrap()
    };
    let mut refusing = Harness::start(terminate(build(UnknownSni::Refuse))).await;
    let err = tls_client(&ca)
        .oneshot(Target::from(refusing.addr()))
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("AccessDenied"), "{err:?}");
    refusing.next_error().await;
    refusing.assert_nothing_reached_inner();

    let mut term = Harness::start(terminate(build(UnknownSni::UseDefault))).await;
    // An IP target: rustls sends no SNI and checks the IP SAN of the default certificate.
    let mut conn = tls_client(&ca)
        .oneshot(Target::from(term.addr()))
        .await
        .unwrap();
    assert_eq!(echo_once(&mut conn, b"no sni").await, b"no sni");
    assert!(term.next_seen().await.get::<Sni>().is_none());
}

/// GREASE (RFC 8701) in suites, versions, groups, key shares and extension types, plus an
/// outer `encrypted_client_hello` extension (0xfe0d): `PeekLayer` records the hello with
/// those types and the outer SNI, and replays it byte for byte; rustls answers with a
/// ServerHello (GREASE ignored, ECH not offered by this server, so ignored too).
#[tokio::test]
async fn grease_and_ech_extensions_are_accepted() {
    let ca = DemoCa::new("example.org");
    let mut hello = Hello::rustls(&ca, Some(NAME), &[b"h2"]);
    hello.suites.insert(0, 0x2a2a);
    let versions = hello.ext(EXT_VERSIONS).unwrap().clone();
    let mut v = vec![versions[0] + 2, 0x7a, 0x7a];
    v.extend(&versions[1..]);
    let groups = hello.ext(EXT_GROUPS).unwrap().clone();
    let glen = u16::from_be_bytes([groups[0], groups[1]]) as usize;
    let mut g = be16(glen + 2).to_vec();
    g.extend([0x4a, 0x4a]);
    g.extend(&groups[2..]);
    let shares = hello.ext(EXT_KEY_SHARE).unwrap().clone();
    let slen = u16::from_be_bytes([shares[0], shares[1]]) as usize;
    let mut k = be16(slen + 5).to_vec();
    k.extend([0x4a, 0x4a, 0, 1, 0]);
    k.extend(&shares[2..]);
    // ECHClientHello, outer: HPKE suite, config id, enc, payload.
    let ech: Vec<u8> = [
        &[0u8, 0, 1, 0, 1, 0x42, 0, 32][..],
        &[7; 32],
        &[0, 128],
        &[9; 128],
    ]
    .concat();
    let mut hello = hello
        .set(EXT_VERSIONS, v)
        .set(EXT_GROUPS, g)
        .set(EXT_KEY_SHARE, k)
        .push(EXT_ECH, ech)
        .push(0xfafa, vec![0]);
    hello.exts.insert(0, (0x0a0a, vec![]));
    let bytes = hello.bytes();

    let mut peek = Harness::start(PeekLayer::new()).await;
    let (back, _) = raw_exchange(peek.addr(), &bytes, true).await;
    assert_eq!(back, bytes);
    let meta = peek.next_seen().await;
    let seen = &meta.get::<PeekedHello>().unwrap().0;
    assert_eq!(seen.sni.as_deref(), Some(NAME));
    assert_eq!(seen.cipher_suites[0], 0x2a2a);
    assert_eq!(seen.supported_versions[0], 0x7a7a);
    assert!(seen.offers_tls13());
    assert_eq!(seen.extensions.first(), Some(&0x0a0a));
    assert!(seen.extensions.ends_with(&[EXT_ECH, 0xfafa]));

    let mut term = Harness::start(terminate(server_config(&ca))).await;
    let (back, _) = raw_exchange(term.addr(), &bytes, true).await;
    assert!(
        is_server_hello(&back),
        "{:02x?}",
        &back[..back.len().min(16)]
    );
    let _ = term.next_error().await; // our raw client cannot finish the handshake
    assert_terminate_serves(&mut term, &ca).await;
}

// ---------------------------------------------------------------------------------------
// Slow, large and versioned hellos from real clients.

/// A TCP stream that writes its first `budget` bytes one per write, a millisecond apart:
/// with `TCP_NODELAY`, one byte per segment.
struct Trickle {
    io: TcpStream,
    budget: usize,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    one_byte_writes: Arc<std::sync::atomic::AtomicUsize>,
}

/// Over a TCP socket, but writes are reshaped: socket options reach it, `splice` must not.
impl proxystack::Io for Trickle {
    fn tcp_socket(&self) -> Option<&TcpStream> {
        Some(&self.io)
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.budget == 0 || buf.is_empty() {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        }
        if let Some(pause) = &mut this.pause {
            std::task::ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }
        let n = std::task::ready!(Pin::new(&mut this.io).poll_write(cx, &buf[..1]))?;
        this.budget -= n;
        this.one_byte_writes
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(1))));
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A TLS backend terminating `NAME` in front of `capture`.
async fn tls_backend(ca: &DemoCa) -> (Running, mpsc::UnboundedReceiver<Meta>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let svc = terminate(server_config(ca)).layer(capture(tx));
    (start(Server::new(), svc).await, rx)
}

/// `PeekLayer` relaying everything to `backend`, reporting each peeked hello.
async fn peek_passthrough(
    backend: SocketAddr,
    layer: PeekLayer,
) -> (
    Running,
    mpsc::UnboundedReceiver<Arc<proxystack::tls::client_hello::ClientHello>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |m: &Metadata| {
        let _ = tx.send(m.get::<PeekedHello>()?.0.clone());
        Some(Target::from(backend))
    });
    (start(Server::new(), layer.layer(relay)).await, rx)
}

/// A ClientHello arriving one byte per TCP segment, a millisecond apart, from a real rustls
/// client: the peek reassembles it and the passthrough handshake completes; so does a
/// terminating server's.
#[tokio::test]
async fn hello_one_byte_per_segment() {
    let ca = DemoCa::new("example.org");
    let (backend, mut backend_seen) = tls_backend(&ca).await;
    let (proxy, mut hellos) = peek_passthrough(backend.addr, PeekLayer::new()).await;
    for (addr, via_peek) in [(proxy.addr, true), (backend.addr, false)] {
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = writes.clone();
        let trickle = service_fn(move |_: Target| {
            let w = w.clone();
            async move {
                let io = TcpStream::connect(addr).await?;
                io.set_nodelay(true)?;
                Ok::<_, std::io::Error>(Conn::new(Trickle {
                    io,
                    budget: 4096,
                    pause: None,
                    one_byte_writes: w,
                }))
            }
        });
        let mut conn = TlsConnector::new(trickle, ca.roots())
            .sni(SniMode::Fixed(NAME.into()))
            .alpn(["h2"])
            .oneshot(Target::from(addr))
            .await
            .unwrap();
        assert_eq!(echo_once(&mut conn, b"trickled").await, b"trickled");
        assert_eq!(conn.get::<Alpn>().unwrap().0, b"h2");
        close_cleanly(&mut conn).await;
        let sent = writes.load(std::sync::atomic::Ordering::SeqCst);
        if via_peek {
            let hello = hellos.recv().await.unwrap();
            assert_eq!(hello.sni.as_deref(), Some(NAME));
            assert!(
                sent > hello.len,
                "{sent} one-byte writes, hello {}",
                hello.len
            );
        }
        assert_eq!(
            backend_seen.recv().await.unwrap().get::<Sni>().unwrap().0,
            NAME
        );
    }
}

/// ALPN protocol names taking exactly `total` bytes of list (length prefixes included),
/// the last one `h2`.
fn many_protocols(total: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut left = total - 3;
    while left > 0 {
        let mut chunk = left.min(256);
        if left - chunk == 1 {
            chunk -= 1; // a name takes at least two bytes
        }
        let mut name = format!("p{:06}", out.len()).into_bytes();
        name.resize(chunk - 1, b'x');
        left -= chunk;
        out.push(name);
    }
    out.push(b"h2".to_vec());
    assert_eq!(out.iter().map(|p| p.len() + 1).sum::<usize>(), total);
    out
}

/// A 20 KiB hello (a long ALPN list, as large post-quantum key shares make them) spans
/// two records; the peek reassembles it, records every protocol, and the passthrough
/// and terminating handshakes both complete with `h2`.
#[tokio::test]
async fn hello_over_16k_across_records() {
    let ca = DemoCa::new("example.org");
    let (backend, _backend_seen) = tls_backend(&ca).await;
    let (proxy, mut hellos) = peek_passthrough(backend.addr, PeekLayer::new()).await;
    let protocols = many_protocols(20_000);
    for addr in [proxy.addr, backend.addr] {
        let mut conn = tls_client(&ca)
            .sni(SniMode::Fixed(NAME.into()))
            .alpn(protocols.clone())
            .oneshot(Target::from(addr))
            .await
            .unwrap();
        assert_eq!(conn.get::<Alpn>().unwrap().0, b"h2");
        assert_eq!(echo_once(&mut conn, b"big").await, b"big");
        close_cleanly(&mut conn).await;
    }
    let hello = hellos.recv().await.unwrap();
    assert!(hello.len > 16384 + 2 * 5, "{}", hello.len);
    assert_eq!(hello.alpn, protocols);
}

/// A hello over 64 KiB (the longest ALPN list a hello can carry) is refused at its
/// handshake header by both layers: `PeekLayer` says `TooLarge`, rustls
/// `HandshakePayloadTooLarge` (no alert). Both stop reading a client still sending, so
/// the client sees a reset; nothing reaches the service, and the next client is served.
#[tokio::test]
async fn hello_over_64k_is_refused() {
    let ca = DemoCa::new("example.org");
    // The extension block is a u16 vector: fill it to the brim with ALPN names.
    let base = Hello::rustls(&ca, Some(NAME), &[b"h2"]);
    let others: usize = base
        .exts
        .iter()
        .filter(|(t, _)| *t != EXT_ALPN)
        .map(|(_, d)| 4 + d.len())
        .sum();
    let protocols = many_protocols(65_535 - others - 4 - 2);
    let refs: Vec<&[u8]> = protocols.iter().map(|p| &p[..]).collect();
    let huge = base.set(EXT_ALPN, alpn_ext(&refs));
    assert!(huge.handshake().len() > 64 * 1024);
    let bytes = huge.bytes();

    let mut peek = Harness::start(PeekLayer::new()).await;
    let mut term = Harness::start(terminate(server_config(&ca))).await;
    for h in [&mut peek, &mut term] {
        assert_eq!(
            raw_exchange(h.addr(), &bytes, false).await,
            (vec![], End::Reset)
        );
        // And from rustls itself, which sends the same kind of hello.
        let err = tls_client(&ca)
            .sni(SniMode::Fixed(NAME.into()))
            .alpn(protocols.clone())
            .oneshot(Target::from(h.addr()))
            .await
            .unwrap_err();
        assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
    }
    for _ in 0..2 {
        assert_eq!(
            peek.next_error().await,
            "ClientHello(TooLarge { limit: 65536 })"
        );
        let err = term.next_error().await;
        assert!(err.contains("HandshakePayloadTooLarge"), "{err}");
    }
    peek.assert_nothing_reached_inner();
    term.assert_nothing_reached_inner();
    assert_peek_serves(&mut peek, &ca).await;
    assert_terminate_serves(&mut term, &ca).await;
}

/// TLS 1.2-only and 1.3-only clients, through the peek to a terminating backend and
/// straight to it: the peek sees whether 1.3 is offered, the backend records the version
/// it negotiated. Then the same with `openssl s_client -tls1_2` / `-tls1_3` through the peek.
#[tokio::test]
async fn tls12_and_tls13_clients_through_peek_and_terminate() {
    let ca = DemoCa::new("example.org");
    let (backend, mut backend_seen) = tls_backend(&ca).await;
    let (proxy, mut hellos) = peek_passthrough(backend.addr, PeekLayer::new()).await;
    for (version, want) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        for addr in [proxy.addr, backend.addr] {
            let config = client_config(&ca, &[version], &[b"h2"]);
            let (echo, got) = tokio::task::spawn_blocking(move || {
                blocking_round_trip(addr, config, NAME, b"versioned")
            })
            .await
            .unwrap()
            .unwrap();
            assert_eq!((echo.as_slice(), got), (&b"versioned"[..], Some(want)));
            let meta = backend_seen.recv().await.unwrap();
            assert_eq!(meta.get::<TlsInfo>().unwrap().version, want);
        }
        let hello = hellos.recv().await.unwrap();
        assert_eq!(hello.offers_tls13(), want == ProtocolVersion::TLSv1_3);
        assert_eq!(hello.legacy_version, 0x0303);
    }

    if !have("openssl") {
        println!("SKIPPED (openssl part): openssl not installed");
        return;
    }
    let ca_file = std::env::temp_dir().join(format!("bad-input-tls-v-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.root_pem()).unwrap();
    for (flag, want) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let out = s_client(
            proxy.addr,
            &[
                flag,
                "-servername",
                NAME,
                "-verify_hostname",
                NAME,
                "-CAfile",
                ca_file.to_str().unwrap(),
            ],
        )
        .await;
        assert!(out.contains(&format!("New, {want}, Cipher is")), "{out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
        let hello = hellos.recv().await.unwrap();
        assert_eq!(hello.offers_tls13(), want == "TLSv1.3");
    }
    let _ = std::fs::remove_file(ca_file);
}

// ---------------------------------------------------------------------------------------
// Mutual TLS.

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::istio(TD, ns, sa).unwrap()
}

/// The mesh server side: client certificate required from `TD`, TLS 1.3 only, ALPN h2.
fn mtls_config(ca: &DemoCa) -> Arc<rustls::ServerConfig> {
    ServerConfigBuilder::new()
        .default_cert(ca.workload_cert("default", "server"))
        .client_auth(ClientAuth::Required(ca.roots()))
        .trust_domains([TD])
        .tls13_only()
        .alpn(["h2"])
        .build()
        .unwrap()
}

fn mesh_client(ca: &DemoCa) -> TlsConnector<tcp::TcpConnector> {
    tls_client(ca)
        .sni(SniMode::None)
        .alpn(["h2"])
        .expect_identities([id("default", "server")])
}

/// A client certificate from `ca` with these URI SANs and validity.
fn client_cert_with(
    ca: &DemoCa,
    uris: &[&str],
    validity: Option<(i32, i32)>,
    eku: rcgen::ExtendedKeyUsagePurpose,
) -> CertKey {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.extended_key_usages = vec![eku];
    if let Some((from, to)) = validity {
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
    ca.issue(params).unwrap()
}

/// Connects as a mesh client presenting `cert`: `Ok` if the server echoes, else the alert
/// the client received (TLS 1.3 servers judge a client certificate after the client's
/// handshake finished, so the alert may arrive on the first read).
async fn mtls_attempt(
    server: SocketAddr,
    connector: TlsConnector<tcp::TcpConnector>,
) -> Result<Meta, Option<AlertDescription>> {
    let mut conn = match connector.oneshot(Target::from(server)).await {
        Ok(conn) => conn,
        Err(e) => return Err(alert_in(&e)),
    };
    let _ = conn.write_all(b"hello").await;
    let _ = conn.flush().await;
    let mut buf = [0u8; 5];
    match tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut buf)).await {
        Ok(Ok(_)) => {
            assert_eq!(&buf, b"hello");
            let meta = conn.metadata().clone();
            close_cleanly(&mut conn).await;
            Ok(meta)
        }
        Ok(Err(e)) => Err(alert_in(&e)),
        Err(_) => panic!("neither echoed nor refused within 10 s"),
    }
}

/// Every wrong client certificate is refused with the alert that names the problem
/// (RFC 8446 §6.2); the service behind never runs; the next good client is served.
/// Includes a certificate carrying two SPIFFE IDs (an SVID has exactly one): before the
/// fix the server accepted it when *any* ID was in its trust domain, and recorded the
/// *first* as the peer's identity — possibly one from a foreign domain.
#[tokio::test]
async fn mtls_refuses_wrong_client_certificates_with_exact_alerts() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth as ClientEku, ServerAuth};
    use AlertDescription::*;
    let ca = DemoCa::new(TD);
    let forged = DemoCa::new(TD);
    let other_ca = DemoCa::new("foreign.example");
    let good_uri = "spiffe://cluster.local/ns/ns1/sa/client";
    let cases: Vec<(&str, Option<CertKey>, AlertDescription)> = vec![
        ("no client certificate", None, CertificateRequired),
        (
            "certificate from a foreign root",
            Some(
                other_ca
                    .spiffe_cert(&SpiffeId::parse(good_uri).unwrap())
                    .unwrap(),
            ),
            UnknownCA,
        ),
        (
            "certificate from a foreign root with our root's name (forged CA)",
            Some(forged.workload_cert("ns1", "client")),
            DecryptError,
        ),
        (
            "right root, wrong trust domain",
            Some(client_cert_with(
                &ca,
                &["spiffe://evil.local/ns/ns1/sa/client"],
                None,
                ClientEku,
            )),
            CertificateUnknown,
        ),
        (
            "expired",
            Some(client_cert_with(
                &ca,
                &[good_uri],
                Some((2019, 2020)),
                ClientEku,
            )),
            CertificateExpired,
        ),
        (
            "not yet valid",
            Some(client_cert_with(
                &ca,
                &[good_uri],
                Some((2090, 2091)),
                ClientEku,
            )),
            CertificateExpired,
        ),
        (
            "URI SAN that is not SPIFFE",
            Some(client_cert_with(
                &ca,
                &["https://cluster.local/ns/ns1/sa/client"],
                None,
                ClientEku,
            )),
            CertificateUnknown,
        ),
        (
            "SPIFFE ID with a trailing slash",
            Some(client_cert_with(
                &ca,
                &["spiffe://cluster.local/ns/ns1/sa/client/"],
                None,
                ClientEku,
            )),
            CertificateUnknown,
        ),
        (
            "SPIFFE ID with an upper-case trust domain",
            Some(client_cert_with(
                &ca,
                &["spiffe://Cluster.Local/ns/ns1/sa/client"],
                None,
                ClientEku,
            )),
            CertificateUnknown,
        ),
        (
            "no URI SAN at all",
            Some(client_cert_with(&ca, &[], None, ClientEku)),
            CertificateUnknown,
        ),
        (
            "two SPIFFE IDs, the foreign one first",
            Some(client_cert_with(
                &ca,
                &["spiffe://evil.local/ns/ns1/sa/client", good_uri],
                None,
                ClientEku,
            )),
            CertificateUnknown,
        ),
        (
            "two SPIFFE IDs in the trust domain",
            Some(client_cert_with(
                &ca,
                &[good_uri, "spiffe://cluster.local/ns/ns1/sa/other"],
                None,
                ClientEku,
            )),
            CertificateUnknown,
        ),
        (
            "server-only extended key usage",
            Some(client_cert_with(&ca, &[good_uri], None, ServerAuth)),
            UnsupportedCertificate,
        ),
    ];
    let mut h = Harness::start(terminate(mtls_config(&ca))).await;
    for (case, cert, alert) in cases {
        let connector = match cert {
            Some(cert) => mesh_client(&ca).client_cert(cert).unwrap(),
            None => mesh_client(&ca),
        };
        let got = mtls_attempt(h.addr(), connector).await;
        assert_eq!(got.err(), Some(Some(alert)), "{case}");
        let err = h.next_error().await;
        assert!(err.starts_with("Handshake("), "{case}: {err}");
        h.assert_nothing_reached_inner();
    }
    let ok = mesh_client(&ca)
        .client_cert(ca.workload_cert("ns1", "client"))
        .unwrap();
    mtls_attempt(h.addr(), ok).await.unwrap();
    let meta = h.next_seen().await;
    assert_eq!(meta.get::<PeerIdentity>().unwrap().0.as_str(), good_uri);
}

/// SPIFFE IDs that are valid but not Istio's `ns/<ns>/sa/<sa>` form are accepted by the
/// trust-domain check (it authorizes no particular identity) and recorded verbatim, so
/// a policy that reads `istio_parts()` fails closed. A non-SPIFFE URI next to the SPIFFE ID
/// is ignored. (ztunnel parses only the Istio form and would refuse these certificates.)
#[tokio::test]
async fn mtls_records_non_istio_spiffe_ids_verbatim() {
    let ca = DemoCa::new(TD);
    let mut h = Harness::start(terminate(mtls_config(&ca))).await;
    for (uris, recorded) in [
        (
            &["spiffe://cluster.local/ns/x/sa"][..],
            "spiffe://cluster.local/ns/x/sa",
        ),
        (
            &["spiffe://cluster.local/ns/x/sa/y/extra"],
            "spiffe://cluster.local/ns/x/sa/y/extra",
        ),
        (
            &[
                "https://example.com/x",
                "spiffe://cluster.local/ns/ns1/sa/client",
            ],
            "spiffe://cluster.local/ns/ns1/sa/client",
        ),
    ] {
        let cert = client_cert_with(&ca, uris, None, rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let connector = mesh_client(&ca).client_cert(cert).unwrap();
        mtls_attempt(h.addr(), connector).await.unwrap();
        let id = h.next_seen().await.get::<PeerIdentity>().unwrap().0.clone();
        assert_eq!(id.as_str(), recorded);
        assert_eq!(id.istio_parts().is_some(), recorded.ends_with("sa/client"));
    }
}

/// A revoked client certificate (CRL from the mesh CA, `ServerConfigBuilder::crls`) is
/// refused with `certificate_revoked`; a sibling certificate from the same CA is served.
/// Revocation applies to new connections: a config built with a newer list replaces the
/// old one the way certificate rotation does.
#[tokio::test]
async fn revoked_client_certificate_is_refused() {
    let ca = DemoCa::new(TD);
    let revoked = ca.workload_cert("ns1", "client");
    let good = ca.workload_cert("ns1", "client");
    let config = ServerConfigBuilder::new()
        .default_cert(ca.workload_cert("default", "server"))
        .client_auth(ClientAuth::Required(ca.roots()))
        .trust_domains([TD])
        .crls([ca.crl(&[&revoked]).unwrap()])
        .tls13_only()
        .alpn(["h2"])
        .build()
        .unwrap();
    let mut h = Harness::start(terminate(config)).await;
    let refused = mtls_attempt(h.addr(), mesh_client(&ca).client_cert(revoked).unwrap()).await;
    assert_eq!(
        refused.unwrap_err(),
        Some(AlertDescription::CertificateRevoked)
    );
    h.assert_nothing_reached_inner();
    mtls_attempt(h.addr(), mesh_client(&ca).client_cert(good).unwrap())
        .await
        .unwrap();
    assert!(h.next_seen().await.get::<PeerIdentity>().is_some());
}

/// The server's certificate does not carry the identity the client pinned: the client
/// aborts with `IdentityMismatch` (naming both) and tells the server `certificate_unknown`;
/// the server's service never runs.
#[tokio::test]
async fn client_aborts_when_the_server_identity_differs() {
    let ca = DemoCa::new(TD);
    let mut h = Harness::start(terminate(mtls_config(&ca))).await;
    let err = tls_client(&ca)
        .sni(SniMode::None)
        .alpn(["h2"])
        .client_cert(ca.workload_cert("ns1", "client"))
        .unwrap()
        .expect_identities([id("default", "someone-else")])
        .oneshot(Target::from(h.addr()))
        .await
        .unwrap_err();
    // Issue 14 item 8: the error reads as a person needs it, in Display and Debug alike.
    assert!(matches!(err, TlsError::IdentityMismatch(_)), "{err:?}");
    let want =
        "server identity mismatch: expected spiffe://cluster.local/ns/default/sa/someone-else, \
                presented spiffe://cluster.local/ns/default/sa/server";
    assert_eq!(err.to_string(), want);
    assert!(format!("{err:?}").contains(want), "{err:?}");
    let server_err = h.next_error().await;
    assert!(
        server_err.contains("AlertReceived(CertificateUnknown)"),
        "{server_err}"
    );
    h.assert_nothing_reached_inner();
    let ok = mesh_client(&ca)
        .client_cert(ca.workload_cert("ns1", "client"))
        .unwrap();
    mtls_attempt(h.addr(), ok).await.unwrap();
    assert!(h.next_seen().await.get::<PeerIdentity>().is_some());
}

/// A server certificate carrying two SPIFFE IDs, the pinned one second: the client
/// refuses it like any other mismatch (an SVID has exactly one ID; with two, the one
/// pinned and the one recorded as the server's identity could differ).
#[tokio::test]
async fn client_refuses_a_server_certificate_with_two_spiffe_ids() {
    let ca = DemoCa::new(TD);
    let two_ids = client_cert_with(
        &ca,
        &[
            "spiffe://cluster.local/ns/default/sa/other",
            "spiffe://cluster.local/ns/default/sa/server",
        ],
        None,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let config = ServerConfigBuilder::new()
        .default_cert(two_ids)
        .client_auth(ClientAuth::Required(ca.roots()))
        .trust_domains([TD])
        .tls13_only()
        .alpn(["h2"])
        .build()
        .unwrap();
    let mut h = Harness::start(terminate(config)).await;
    let err = mesh_client(&ca)
        .client_cert(ca.workload_cert("ns1", "client"))
        .unwrap()
        .oneshot(Target::from(h.addr()))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("presented spiffe://cluster.local/ns/default/sa/other and"),
        "{err}"
    );
    let server_err = h.next_error().await;
    assert!(
        server_err.contains("AlertReceived(CertificateUnknown)"),
        "{server_err}"
    );
    h.assert_nothing_reached_inner();
}

/// A TLS 1.2-only client against a TLS 1.3-only server (HBONE's): `protocol_version`
/// alert, from rustls and from `openssl s_client -tls1_2`.
#[tokio::test]
async fn tls12_client_to_a_tls13_only_server() {
    let ca = DemoCa::new(TD);
    let mut h = Harness::start(terminate(mtls_config(&ca))).await;
    let addr = h.addr();
    let config = client_config(&ca, &[&rustls::version::TLS12], &[b"h2"]);
    let err = tokio::task::spawn_blocking(move || {
        blocking_round_trip(addr, config, "server.example", b"x")
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(
        alert_in(&err),
        Some(AlertDescription::ProtocolVersion),
        "{err}"
    );
    assert!(h.next_error().await.starts_with("Handshake("));
    if have("openssl") {
        let out = s_client(addr, &["-tls1_2"]).await;
        assert!(out.contains("alert protocol version"), "{out}");
        assert!(h.next_error().await.starts_with("Handshake("));
    } else {
        println!("SKIPPED (openssl part): openssl not installed");
    }
    h.assert_nothing_reached_inner();
    let ok = mesh_client(&ca)
        .client_cert(ca.workload_cert("ns1", "client"))
        .unwrap();
    mtls_attempt(addr, ok).await.unwrap();
}

/// An HBONE listener (`hbone::Inbound`, ALPN `h2` only): a client offering only
/// `http/1.1` is refused with `no_application_protocol`; a client offering no ALPN at all
/// completes TLS (rustls, like ztunnel's, only refuses a non-overlapping offer) but then
/// has to speak HTTP/2, and an HTTP/1.1 CONNECT is closed without an answer. Nothing is
/// dialled; a real HBONE client is served afterwards.
#[cfg(feature = "hbone")]
#[tokio::test]
async fn hbone_listener_refuses_alpn_other_than_h2() {
    use proxystack::hbone::{self, HboneTarget, Inbound};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let ca = DemoCa::new(TD);
    let app = echo_server().await;
    let dials = Arc::new(AtomicUsize::new(0));
    let d = dials.clone();
    let relay = tcp::Relay::new(tcp::TcpConnector::new()).upstream(move |_: &Metadata| {
        d.fetch_add(1, Ordering::SeqCst);
        Some(Target::from(app))
    });
    let inbound = Inbound::new(ca.workload_cert("default", "server"), ca.roots())
        .service(relay)
        .unwrap();
    let server = start(Server::new(), inbound).await;
    let client = |alpn: &[&str]| {
        tls_client(&ca)
            .client_cert(ca.workload_cert("default", "client"))
            .unwrap()
            .sni(SniMode::None)
            .alpn(alpn.to_vec())
            .expect_identities([id("default", "server")])
    };

    let err = client(&["http/1.1"])
        .oneshot(Target::from(server.addr))
        .await
        .unwrap_err();
    assert_eq!(
        alert_in(&err),
        Some(AlertDescription::NoApplicationProtocol),
        "{err:?}"
    );

    let mut conn = client(&[])
        .oneshot(Target::from(server.addr))
        .await
        .unwrap();
    assert!(conn.get::<Alpn>().is_none());
    let request = format!(
        "CONNECT 127.0.0.1:{0} HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\n\r\n",
        app.port()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    conn.flush().await.unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got))
        .await
        .expect("closed within 10 s");
    // The server's HTTP/2 preface (SETTINGS) and nothing but connection-level frames, then
    // a close (without close_notify).
    let mut frames = &got[..];
    let mut kinds = Vec::new();
    while frames.len() >= 9 {
        let len = u32::from_be_bytes([0, frames[0], frames[1], frames[2]]) as usize;
        kinds.push(frames[3]);
        frames = &frames[(9 + len).min(frames.len())..];
    }
    assert!(frames.is_empty(), "{got:02x?}");
    assert_eq!(kinds.first(), Some(&4), "{got:02x?}");
    assert!(kinds.iter().all(|k| *k == 4 || *k == 7), "{kinds:?}");
    if let Err(e) = end {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    assert_eq!(dials.load(Ordering::SeqCst), 0);

    let target = HboneTarget::new(
        server.addr,
        proxystack::Authority::from(std::net::SocketAddr::new(server.addr.ip(), app.port())),
        [id("default", "server")],
    )
    .into_target();
    let mut tunnel = hbone::Connector::hbone(ca.workload_cert("default", "client"), ca.roots())
        .unwrap()
        .oneshot(target)
        .await
        .unwrap();
    assert_eq!(echo_once(&mut tunnel, b"h2 only").await, b"h2 only");
    assert_eq!(dials.load(Ordering::SeqCst), 1);
}
