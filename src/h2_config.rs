//! [`H2Config`]: one vocabulary for the HTTP/2 knobs of every component that speaks it.

use std::time::Duration;

/// HTTP/2 settings, shared by [`http::HttpServer`](crate::http::HttpServer),
/// [`connect::ConnectTerminate`](crate::connect::ConnectTerminate) and
/// [`connect::H2ConnectPool`](crate::connect::H2ConnectPool) (and through them HBONE).
///
/// Every setting is optional: what is not set keeps the component's own default (each
/// component documents its defaults; the HBONE ones follow ztunnel). A setting that makes
/// no sense for a side (the reset limits on a client) is ignored there.
///
/// ```
/// use std::time::Duration;
/// use proxystack::H2Config;
/// let h2 = H2Config::new()
///     .stream_window(1 << 20)
///     .connection_window(4 << 20)
///     .max_concurrent_streams(250)
///     .keep_alive_interval(Some(Duration::from_secs(30)))
///     .keep_alive_timeout(Duration::from_secs(10));
/// # let _ = h2;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct H2Config {
    pub(crate) stream_window: Option<u32>,
    pub(crate) connection_window: Option<u32>,
    pub(crate) max_frame_size: Option<u32>,
    pub(crate) max_concurrent_streams: Option<u32>,
    pub(crate) max_header_list_size: Option<u32>,
    pub(crate) max_pending_accept_reset_streams: Option<usize>,
    pub(crate) max_local_error_reset_streams: Option<Option<usize>>,
    pub(crate) keep_alive_interval: Option<Option<Duration>>,
    pub(crate) keep_alive_timeout: Option<Duration>,
}

impl H2Config {
    /// Nothing set: every component keeps its defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Initial flow-control window of each stream (`SETTINGS_INITIAL_WINDOW_SIZE`).
    pub fn stream_window(mut self, bytes: u32) -> Self {
        self.stream_window = Some(bytes);
        self
    }

    /// Initial flow-control window of the connection.
    pub fn connection_window(mut self, bytes: u32) -> Self {
        self.connection_window = Some(bytes);
        self
    }

    /// Largest frame accepted (`SETTINGS_MAX_FRAME_SIZE`, 16 KiB to 16 MiB − 1; clamped).
    pub fn max_frame_size(mut self, bytes: u32) -> Self {
        self.max_frame_size = Some(bytes.clamp(16_384, 16_777_215));
        self
    }

    /// Servers: `SETTINGS_MAX_CONCURRENT_STREAMS`. Clients: most streams opened on one
    /// pooled connection (the peer's setting caps it further).
    pub fn max_concurrent_streams(mut self, n: u32) -> Self {
        self.max_concurrent_streams = Some(n);
        self
    }

    /// Largest header list accepted (`SETTINGS_MAX_HEADER_LIST_SIZE`; also bounds
    /// CONTINUATION floods).
    pub fn max_header_list_size(mut self, bytes: u32) -> Self {
        self.max_header_list_size = Some(bytes);
        self
    }

    /// Servers: streams a client may open and reset before the server saw them; more
    /// closes the connection with `GOAWAY ENHANCE_YOUR_CALM` (rapid reset, CVE-2023-44487).
    pub fn max_pending_accept_reset_streams(mut self, n: usize) -> Self {
        self.max_pending_accept_reset_streams = Some(n);
        self
    }

    /// Servers: streams the server may reset for client errors before it closes the
    /// connection (`None`: no limit).
    pub fn max_local_error_reset_streams(mut self, n: Option<usize>) -> Self {
        self.max_local_error_reset_streams = Some(n);
        self
    }

    /// Send a PING after this long without frames (`None`: never).
    pub fn keep_alive_interval(mut self, interval: Option<Duration>) -> Self {
        self.keep_alive_interval = Some(interval);
        self
    }

    /// Close the connection when a PING is not answered within this long.
    pub fn keep_alive_timeout(mut self, timeout: Duration) -> Self {
        self.keep_alive_timeout = Some(timeout);
        self
    }

    /// The keep-alive (PING interval, answer timeout) that results from applying this
    /// config's keep-alive settings to `current`: what is not set here stays as it was.
    #[cfg_attr(not(feature = "connect"), allow(dead_code))]
    pub(crate) fn keep_alive_over(
        &self,
        current: Option<(Duration, Duration)>,
    ) -> Option<(Duration, Duration)> {
        let interval = match self.keep_alive_interval {
            Some(interval) => interval,
            None => current.map(|(i, _)| i),
        };
        let timeout = self
            .keep_alive_timeout
            .or(current.map(|(_, t)| t))
            .unwrap_or(Duration::from_secs(20));
        interval.map(|i| (i, timeout))
    }

    /// `self`'s settings, falling back to `defaults` for what `self` does not set.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn or(&self, defaults: &H2Config) -> H2Config {
        H2Config {
            stream_window: self.stream_window.or(defaults.stream_window),
            connection_window: self.connection_window.or(defaults.connection_window),
            max_frame_size: self.max_frame_size.or(defaults.max_frame_size),
            max_concurrent_streams: self
                .max_concurrent_streams
                .or(defaults.max_concurrent_streams),
            max_header_list_size: self.max_header_list_size.or(defaults.max_header_list_size),
            max_pending_accept_reset_streams: self
                .max_pending_accept_reset_streams
                .or(defaults.max_pending_accept_reset_streams),
            max_local_error_reset_streams: self
                .max_local_error_reset_streams
                .or(defaults.max_local_error_reset_streams),
            keep_alive_interval: self.keep_alive_interval.or(defaults.keep_alive_interval),
            keep_alive_timeout: self.keep_alive_timeout.or(defaults.keep_alive_timeout),
        }
    }
}
