//! The servers the targets talk to, and their inner services.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use proxystack::conn::{LocalAddr, PeerAddr};
use proxystack::io::BoxIo;
use proxystack::admission::{Admission, Refusal};
use proxystack::connect::TunnelInfo;
use proxystack::hbone::{HboneHeaders, Inbound, ILLEGAL_PORTS};
use proxystack::http::Incoming;
use proxystack::tls::demo::DemoCa;
use proxystack::{BoxError, Conn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::Service;

use crate::hbone::{Inner, LOCAL_IP};

/// The port the policy of [`inbound`] refuses (401).
pub const DENIED_PORT: u16 = 22;

/// The address the harness's connections were accepted on.
pub fn local_addr() -> SocketAddr {
    SocketAddr::from((LOCAL_IP, proxystack::hbone::PORT))
}

/// A connection as an accept loop would hand it over: the server half of a duplex pipe,
/// with `LocalAddr` and `PeerAddr` metadata.
pub fn accepted<I>(io: I) -> Conn<I> {
    let mut conn = Conn::new(io);
    conn.insert(LocalAddr(local_addr()));
    conn.insert(PeerAddr(SocketAddr::from(([127, 0, 0, 2], 40_000))));
    conn
}

thread_local! {
    // Issuing the certificate takes milliseconds: once per process.
    static INBOUND: Inbound = {
        let ca = DemoCa::new("cluster.local");
        Inbound::new(ca.workload_cert("default", "server"), ca.roots())
            .allow(|req| req.authority.port() != DENIED_PORT)
    };
}

/// The HBONE inbound (default checks, plus a policy that refuses [`DENIED_PORT`]).
pub fn inbound() -> Inbound {
    INBOUND.with(Inbound::clone)
}

/// Echoes until EOF or an error, then shuts the stream down.
pub async fn echo(mut io: BoxIo) {
    let mut buf = [0u8; 4096];
    loop {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if io.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = io.shutdown().await;
}

/// What every tunnel the HBONE checks let through must satisfy.
pub fn check_hbone_tunnel(conn: &Conn<BoxIo>) {
    let info = conn
        .get::<TunnelInfo>()
        .expect("a tunnel carries TunnelInfo");
    let port = info.authority.port();
    assert!(
        port != DENIED_PORT && !ILLEGAL_PORTS.contains(&port),
        "tunnel to refused port {port}"
    );
    if let Some(ip) = info.authority.canonical_ip() {
        assert_eq!(ip, local_addr().ip(), "tunnel to an IP that is not ours");
    }
    assert_eq!(info.version, http::Version::HTTP_2);
    assert_eq!(info.depth, 1);
    let headers = conn
        .get::<HboneHeaders>()
        .expect("an HBONE tunnel carries HboneHeaders");
    assert_eq!(headers, &HboneHeaders::parse(&info.headers));
}

/// The inner service of a tunnel terminator: does what `mode` says; with `hbone`, checks
/// [`check_hbone_tunnel`] first.
pub fn tunnel_service(
    mode: Inner,
    hbone: bool,
) -> impl Service<Conn<BoxIo>, Response = (), Error = BoxError, Future: Send> + Clone + Send + Sync
{
    tower::service_fn(move |conn: Conn<BoxIo>| async move {
        if hbone {
            check_hbone_tunnel(&conn);
        }
        let admission = conn
            .get::<Admission>()
            .cloned()
            .expect("a tunnel carries an Admission");
        match mode {
            Inner::Echo => {
                admission.admit();
                echo(conn.into_parts().0).await;
            }
            Inner::Refuse => admission.refuse(Refusal::Refused),
            Inner::Deny => admission.refuse(Refusal::Denied),
            Inner::Drop => {}
            Inner::Fail => return Err("inner service failed".into()),
            Inner::Delay { seconds } => {
                tokio::time::sleep(std::time::Duration::from_secs(seconds.into())).await;
                admission.admit();
                echo(conn.into_parts().0).await;
            }
        }
        Ok::<(), BoxError>(())
    })
}

/// An HTTP service that reads the whole request body and answers 200 with its length.
pub async fn http_ok(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let len = match req.into_body().collect().await {
        Ok(body) => body.to_bytes().len().to_string(),
        Err(_) => "body error".to_owned(),
    };
    Ok(Response::new(Full::new(Bytes::from(len))))
}
