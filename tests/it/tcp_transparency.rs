//! Transparent interception: an iptables `REDIRECT` rule in a network namespace created by
//! the test sends a client's connection to the relay, which recovers the original
//! destination (`SO_ORIGINAL_DST`) and relays there. Needs root and iptables; skips with a
//! printed reason otherwise.
#![cfg(all(feature = "tcp", target_os = "linux"))]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::common::netns::{self, Netns};

use proxystack::conn::Metadata;
use proxystack::conn::OriginalDst;
use proxystack::{drain, tcp, Server, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;

const MARK: u32 = 0x539;
const BACKEND: &str = "10.203.0.1:80";
const RELAY_PORT: u16 = 15001;

#[test]
fn redirected_connection_is_relayed_to_its_original_destination() {
    if !netns::is_root() {
        println!("SKIPPED: transparency test needs root (network namespaces, iptables)");
        return;
    }
    // The pretend remote host lives on the namespace's own loopback device.
    let ns = match Netns::create("test", &["10.203.0.1/32"]) {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIPPED: cannot create a network namespace: {e}");
            return;
        }
    };
    if let Err(e) = ns.redirect("10.203.0.1", Some(80), MARK, RELAY_PORT) {
        println!("SKIPPED: cannot install the iptables REDIRECT rule: {e}");
        return;
    }
    let seen: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let seen2 = seen.clone();
    let handle = std::thread::spawn(move || {
        ns.enter();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            // The "real" destination the client believes it talks to.
            let backend = TcpListener::bind(BACKEND).await.unwrap();
            tokio::spawn(async move {
                let (mut s, _) = backend.accept().await.unwrap();
                let mut req = Vec::new();
                s.read_to_end(&mut req).await.unwrap();
                s.write_all(b"backend got: ").await.unwrap();
                s.write_all(&req).await.unwrap();
            });
            let relay = tcp::Relay::new(tcp::TcpConnector::new().mark(Some(MARK))).upstream(
                move |c: &Metadata| {
                    let dst = c.get::<OriginalDst>()?;
                    *seen2.lock().unwrap() = Some(dst.0);
                    Some(Target::from(dst))
                },
            );
            let svc = ServiceBuilder::new()
                .layer(tcp::OriginalDstLayer::new())
                .service(relay);
            let listener = TcpListener::bind(("127.0.0.1", RELAY_PORT)).await.unwrap();
            let (signal, watch) = drain::channel();
            let server =
                tokio::spawn(async move { Server::new().serve(listener, svc, watch).await });

            let mut client = TcpStream::connect(BACKEND).await.unwrap();
            client.write_all(b"hello through REDIRECT").await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            signal.start();
            server.await.unwrap().unwrap();
            drop(ns);
            answer
        })
    });
    let answer = handle.join().unwrap();
    assert_eq!(answer, b"backend got: hello through REDIRECT");
    assert_eq!(*seen.lock().unwrap(), Some(BACKEND.parse().unwrap()));
}
