//! HTTP/2 PING keepalive and setting bounds shared by the terminator and the pool.

use std::time::Duration;

/// Why a keepalive gave up on its connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeepaliveError {
    /// No PONG within the timeout: the peer (or the path to it) is gone.
    #[error("no answer to an HTTP/2 PING within {0:?}")]
    Timeout(Duration),
    /// The PING could not be sent: the connection already failed.
    #[error("HTTP/2 PING failed")]
    Ping(#[source] h2::Error),
}

/// Sends a PING every `interval` (the first one after `interval`) and completes when one
/// is not answered within `timeout`. It makes progress only while the connection itself is
/// polled, so it is polled next to it; its owner then drops the connection.
pub(crate) async fn keepalive(
    mut ping_pong: h2::PingPong,
    interval: Duration,
    timeout: Duration,
) -> KeepaliveError {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return KeepaliveError::Ping(e),
            Err(_) => return KeepaliveError::Timeout(timeout),
        }
    }
}

/// The keepalive of a connection, or a future that never completes when it has none.
pub(crate) async fn maybe_keepalive(
    ping_pong: Option<h2::PingPong>,
    settings: Option<(Duration, Duration)>,
) -> KeepaliveError {
    match (ping_pong, settings) {
        (Some(p), Some((interval, timeout))) => keepalive(p, interval, timeout).await,
        _ => std::future::pending().await,
    }
}

/// Largest flow-control window HTTP/2 allows (RFC 9113 §6.9.1); h2 panics above it.
pub(crate) fn window(size: u32) -> u32 {
    size.min((1 << 31) - 1)
}

/// A legal SETTINGS_MAX_FRAME_SIZE (RFC 9113 §6.5.2); h2 panics outside the range.
pub(crate) fn frame_size(size: u32) -> u32 {
    size.clamp(1 << 14, (1 << 24) - 1)
}
