//! Why a connection failed, as a small closed set of label values.

use std::error::Error as StdError;
use std::io;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::admission::{Refusal, UpstreamRefusal};

/// Why a connection (or an upstream connect) failed: the `reason` label.
///
/// A closed set, so that the label cannot grow with what peers send. [`classify`] derives
/// it from an error's `source()` chain.
///
/// [`classify`]: FailureReason::classify
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureReason {
    /// The upstream refused the connection (TCP RST to SYN, `503` to a CONNECT).
    Refused,
    /// A connect, handshake, idle or total timeout.
    Timeout,
    /// A peer reset or abandoned an established connection.
    Reset,
    /// Policy denied it (an authorization rule, an address filter, an untrusted PROXY
    /// header sender, `401`/`403` to a CONNECT).
    Policy,
    /// The upstream could not be reached (no route to host, name did not resolve, `502`).
    Unreachable,
    /// Nothing to send it to: the router or upstream function returned none.
    NoRoute,
    /// The TLS handshake failed (see `proxystack_tls_handshake_failures_total` for the
    /// alert).
    TlsHandshake,
    /// The peer broke the protocol (a malformed PROXY header, HTTP or TLS record…).
    Protocol,
    /// The connection was cut by the proxy (the drain deadline passed, the task was
    /// aborted) before its service finished.
    Aborted,
    /// Anything else.
    Other,
}

impl FailureReason {
    /// Every reason, in label order.
    pub const ALL: [FailureReason; 10] = [
        FailureReason::Refused,
        FailureReason::Timeout,
        FailureReason::Reset,
        FailureReason::Policy,
        FailureReason::Unreachable,
        FailureReason::NoRoute,
        FailureReason::TlsHandshake,
        FailureReason::Protocol,
        FailureReason::Aborted,
        FailureReason::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Refused => "refused",
            FailureReason::Timeout => "timeout",
            FailureReason::Reset => "reset",
            FailureReason::Policy => "policy",
            FailureReason::Unreachable => "unreachable",
            FailureReason::NoRoute => "no_route",
            FailureReason::TlsHandshake => "tls_handshake",
            FailureReason::Protocol => "protocol",
            FailureReason::Aborted => "aborted",
            FailureReason::Other => "other",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Classifies an error by walking its `source()` chain, outermost first, until one
    /// error says what happened: an `io::Error` kind (`ConnectionRefused`, `TimedOut`,
    /// `ConnectionReset`…), a `tls::TlsError`, a `tcp::ConnectError` or `RelayError`, a
    /// `connect::TunnelError`, an [`UpstreamRefusal`], a PROXY protocol or router error.
    /// An error that says nothing known is [`Other`](Self::Other).
    ///
    /// ```
    /// use proxystack::metrics::FailureReason;
    /// let e = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    /// assert_eq!(FailureReason::classify(&e), FailureReason::Reset);
    /// ```
    pub fn classify(error: &(dyn StdError + 'static)) -> Self {
        // Bounded: a source chain longer than this is not walked further (a cycle cannot
        // hang the connection's last moments).
        const MAX_DEPTH: usize = 32;
        let mut cur = Some(error);
        for _ in 0..MAX_DEPTH {
            let Some(err) = cur else { break };
            if let Some(reason) = classify_one(err) {
                return reason;
            }
            cur = next(err);
        }
        FailureReason::Other
    }

    /// The Istio `response_flags` value for a connection that ended this way (`-` for a
    /// clean end): `DENY` for policy, `CONNECT` for an upstream that could not be
    /// connected, as ztunnel reports them.
    pub(crate) fn istio_flags(reason: Option<Self>) -> &'static str {
        match reason {
            Some(FailureReason::Policy) => "DENY",
            Some(FailureReason::Refused | FailureReason::Unreachable | FailureReason::NoRoute) => {
                "CONNECT"
            }
            _ => "-",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for FailureReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The next error to look at. `#[error(transparent)]` wrappers around a `BoxError` pass
/// `source()` through to the boxed error's source, skipping the boxed error itself, so
/// they are opened here.
fn next<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    #[cfg(feature = "detect")]
    {
        if let Some(crate::detect::RouterError::Route(inner)) = err.downcast_ref() {
            return Some(&**inner);
        }
        if let Some(crate::detect::DetectError::Inner(inner)) = err.downcast_ref() {
            return Some(&**inner);
        }
    }
    if let Some(io) = err.downcast_ref::<io::Error>() {
        // `io::Error::source` skips the custom error it carries; look at it.
        if let Some(inner) = io.get_ref() {
            return Some(inner as &(dyn StdError + 'static));
        }
    }
    err.source()
}

/// What this one error says, if anything.
fn classify_one(err: &(dyn StdError + 'static)) -> Option<FailureReason> {
    if let Some(r) = err.downcast_ref::<UpstreamRefusal>() {
        return Some(from_refusal(r.0));
    }
    if let Some(c) = err.downcast_ref::<crate::tcp::ConnectError>() {
        use crate::tcp::ConnectErrorKind as K;
        return Some(match c.kind() {
            K::Refused => FailureReason::Refused,
            K::TimedOut => FailureReason::Timeout,
            K::Forbidden => FailureReason::Policy,
            K::Resolve | K::Unreachable => FailureReason::Unreachable,
            _ => FailureReason::Other,
        });
    }
    if let Some(e) = err.downcast_ref::<crate::tcp::RelayServiceError>() {
        if matches!(e, crate::tcp::RelayServiceError::NoUpstream) {
            return Some(FailureReason::NoRoute);
        }
        return None;
    }
    if let Some(e) = err.downcast_ref::<crate::tcp::RelayError>() {
        return match e {
            crate::tcp::RelayError::IdleTimeout(_) | crate::tcp::RelayError::TotalTimeout(_) => {
                Some(FailureReason::Timeout)
            }
            _ => None,
        };
    }
    if let Some(io) = err.downcast_ref::<io::Error>() {
        return classify_io(io);
    }
    #[cfg(feature = "tls")]
    if let Some(r) = classify_tls(err) {
        return Some(r);
    }
    #[cfg(feature = "connect")]
    if let Some(e) = err.downcast_ref::<crate::connect::TunnelError>() {
        use crate::connect::TunnelError as T;
        return match e {
            T::Timeout(_) => Some(FailureReason::Timeout),
            T::Refused { refusal, .. } => Some(from_refusal(refusal.0)),
            T::PeerClosed(_) => Some(FailureReason::Reset),
            _ => None,
        };
    }
    #[cfg(feature = "proxy-protocol")]
    if let Some(e) = err.downcast_ref::<crate::proxy_protocol::AcceptError>() {
        use crate::proxy_protocol::AcceptError as A;
        return match e {
            A::Untrusted { .. } => Some(FailureReason::Policy),
            A::Missing | A::Malformed(_) => Some(FailureReason::Protocol),
            A::Closed { .. } => Some(FailureReason::Reset),
            A::Timeout(_) => Some(FailureReason::Timeout),
            _ => None,
        };
    }
    #[cfg(feature = "detect")]
    if let Some(e) = err.downcast_ref::<crate::detect::RouterError>() {
        use crate::detect::RouterError as R;
        return match e {
            R::NoRoute(_) | R::Undetected => Some(FailureReason::NoRoute),
            R::Undecided(_) => Some(FailureReason::Protocol),
            _ => None,
        };
    }
    #[cfg(feature = "connect")]
    if let Some(e) = err.downcast_ref::<h2::Error>() {
        if e.is_io() {
            return None; // the io::Error below says more
        }
        return Some(if e.is_reset() || e.is_go_away() {
            FailureReason::Reset
        } else {
            FailureReason::Protocol
        });
    }
    #[cfg(any(feature = "http", feature = "connect"))]
    if let Some(e) = err.downcast_ref::<hyper::Error>() {
        if e.is_timeout() {
            return Some(FailureReason::Timeout);
        }
        if e.is_parse() || e.is_parse_status() {
            return Some(FailureReason::Protocol);
        }
        if e.is_incomplete_message() {
            return Some(FailureReason::Reset);
        }
        return None;
    }
    None
}

fn from_refusal(r: Refusal) -> FailureReason {
    match r {
        Refusal::Denied => FailureReason::Policy,
        Refusal::Refused => FailureReason::Refused,
        Refusal::TimedOut => FailureReason::Timeout,
        _ => FailureReason::Unreachable,
    }
}

fn classify_io(e: &io::Error) -> Option<FailureReason> {
    use io::ErrorKind as K;
    Some(match e.kind() {
        K::ConnectionRefused => FailureReason::Refused,
        K::TimedOut => FailureReason::Timeout,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            FailureReason::Reset
        }
        K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
            FailureReason::Unreachable
        }
        K::InvalidData => FailureReason::Protocol,
        // An error carrying a more specific one (TLS, HTTP/2) is looked at further.
        _ if e.get_ref().is_some() => return None,
        _ => FailureReason::Other,
    })
}

#[cfg(feature = "tls")]
fn classify_tls(err: &(dyn StdError + 'static)) -> Option<FailureReason> {
    use crate::tls::TlsError;
    if let Some(e) = err.downcast_ref::<TlsError>() {
        return match e {
            TlsError::Handshake(_) | TlsError::IdentityMismatch(_) => {
                Some(FailureReason::TlsHandshake)
            }
            TlsError::HandshakeTimeout(_) | TlsError::PeekTimeout(_) => {
                Some(FailureReason::Timeout)
            }
            TlsError::ClientHello(_) => Some(FailureReason::Protocol),
            _ => None,
        };
    }
    if err.downcast_ref::<rustls::Error>().is_some() {
        return Some(FailureReason::TlsHandshake);
    }
    None
}

/// Who sent the TLS alert that ended a handshake.
#[cfg(feature = "tls")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AlertSender {
    /// This proxy rejected the peer (and sent the alert).
    Local,
    /// The peer rejected us.
    Peer,
    /// No alert: the peer closed or reset during the handshake, or it timed out.
    None,
}

#[cfg(feature = "tls")]
impl AlertSender {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AlertSender::Local => "local",
            AlertSender::Peer => "peer",
            AlertSender::None => "none",
        }
    }
}

/// The alert behind a failed TLS handshake anywhere in the chain: who sent it and its
/// RFC 8446 §6 name (`bad_certificate`, `unknown_ca`…), `none` when the handshake ended
/// without one. `None` when the chain has no TLS handshake failure.
#[cfg(feature = "tls")]
pub(crate) fn tls_alert(error: &(dyn StdError + 'static)) -> Option<(AlertSender, &'static str)> {
    use crate::tls::TlsError;
    let mut cur = Some(error);
    let mut in_handshake = false;
    for _ in 0..32 {
        let Some(err) = cur else { break };
        if let Some(e) = err.downcast_ref::<TlsError>() {
            match e {
                TlsError::Handshake(_) => in_handshake = true,
                TlsError::IdentityMismatch(_) => {
                    return Some((AlertSender::Local, "bad_certificate"))
                }
                _ => {}
            }
        }
        if let Some(e) = err.downcast_ref::<rustls::Error>() {
            return Some(alert_of(e));
        }
        cur = next(err);
    }
    in_handshake.then_some((AlertSender::None, "none"))
}

/// The alert rustls sent or received for this error.
#[cfg(feature = "tls")]
fn alert_of(e: &rustls::Error) -> (AlertSender, &'static str) {
    use rustls::AlertDescription as A;
    use rustls::Error as E;
    let (sender, alert) = match e {
        E::AlertReceived(a) => (AlertSender::Peer, *a),
        E::InvalidCertificate(c) => (AlertSender::Local, A::from(c.clone())),
        E::NoCertificatesPresented => (AlertSender::Local, A::CertificateRequired),
        E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            (AlertSender::Local, A::UnexpectedMessage)
        }
        E::InvalidMessage(_) => (AlertSender::Local, A::DecodeError),
        E::DecryptError => (AlertSender::Local, A::BadRecordMac),
        E::PeerIncompatible(_) => (AlertSender::Local, A::HandshakeFailure),
        E::PeerMisbehaved(_) => (AlertSender::Local, A::IllegalParameter),
        E::NoApplicationProtocol => (AlertSender::Local, A::NoApplicationProtocol),
        E::PeerSentOversizedRecord => (AlertSender::Local, A::RecordOverflow),
        _ => return (AlertSender::Local, "internal_error"),
    };
    (sender, alert_name(alert))
}

/// RFC 8446 §6 (and RFC 5246 §7.2) alert names; codes nobody registered are `unknown`,
/// so the label stays bounded whatever a peer sends.
#[cfg(feature = "tls")]
fn alert_name(alert: rustls::AlertDescription) -> &'static str {
    match u8::from(alert) {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        21 => "decryption_failed",
        22 => "record_overflow",
        30 => "decompression_failure",
        40 => "handshake_failure",
        41 => "no_certificate",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        60 => "export_restriction",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        100 => "no_renegotiation",
        109 => "missing_extension",
        110 => "unsupported_extension",
        111 => "certificate_unobtainable",
        112 => "unrecognized_name",
        113 => "bad_certificate_status_response",
        114 => "bad_certificate_hash_value",
        115 => "unknown_psk_identity",
        116 => "certificate_required",
        120 => "no_application_protocol",
        121 => "ech_required",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::{RelayError, RelayServiceError, Side};
    use std::time::Duration;

    #[test]
    fn io_kinds() {
        for (kind, want) in [
            (io::ErrorKind::ConnectionRefused, FailureReason::Refused),
            (io::ErrorKind::TimedOut, FailureReason::Timeout),
            (io::ErrorKind::ConnectionReset, FailureReason::Reset),
            (io::ErrorKind::BrokenPipe, FailureReason::Reset),
            (io::ErrorKind::InvalidData, FailureReason::Protocol),
            (io::ErrorKind::Other, FailureReason::Other),
        ] {
            assert_eq!(
                FailureReason::classify(&io::Error::from(kind)),
                want,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn relay_errors() {
        let e = RelayServiceError::Relay {
            target: "x:1".into(),
            source: RelayError::Io {
                side: Side::Upstream,
                source: io::ErrorKind::ConnectionReset.into(),
            },
        };
        assert_eq!(FailureReason::classify(&e), FailureReason::Reset);
        let e = RelayServiceError::Relay {
            target: "x:1".into(),
            source: RelayError::IdleTimeout(Duration::from_secs(1)),
        };
        assert_eq!(FailureReason::classify(&e), FailureReason::Timeout);
        assert_eq!(
            FailureReason::classify(&RelayServiceError::NoUpstream),
            FailureReason::NoRoute
        );
        let e = RelayServiceError::Connect {
            target: "x:1".into(),
            source: Box::new(UpstreamRefusal(Refusal::Denied)),
        };
        assert_eq!(FailureReason::classify(&e), FailureReason::Policy);
    }

    #[test]
    fn a_boxed_error_inside_an_io_error_is_opened() {
        let e = io::Error::other(UpstreamRefusal(Refusal::Refused));
        assert_eq!(FailureReason::classify(&e), FailureReason::Refused);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_alerts() {
        use crate::tls::TlsError;
        let received = TlsError::Handshake(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
        ));
        assert_eq!(
            FailureReason::classify(&received),
            FailureReason::TlsHandshake
        );
        assert_eq!(
            tls_alert(&received),
            Some((AlertSender::Peer, "unknown_ca"))
        );
        let sent = TlsError::Handshake(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::NoCertificatesPresented,
        ));
        assert_eq!(
            tls_alert(&sent),
            Some((AlertSender::Local, "certificate_required"))
        );
        let eof = TlsError::Handshake(io::ErrorKind::UnexpectedEof.into());
        assert_eq!(FailureReason::classify(&eof), FailureReason::TlsHandshake);
        assert_eq!(tls_alert(&eof), Some((AlertSender::None, "none")));
        let odd = rustls::Error::AlertReceived(rustls::AlertDescription::from(250u8));
        assert_eq!(tls_alert(&odd), Some((AlertSender::Peer, "unknown")));
    }
}
