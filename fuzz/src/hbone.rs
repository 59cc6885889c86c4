//! The input of `hbone_request`: one HBONE CONNECT request, as the client would write it.

use libfuzzer_sys::arbitrary::{self, Arbitrary};

use crate::input::{Blob, List};
use crate::wire;
use crate::{encode_enum, encode_struct};

/// One HTTP/2 request on stream 1 of a fresh HBONE connection.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What the tunnel's inner service does.
    pub inner: Inner,
    /// `:method`; `None` leaves it out.
    pub method: Option<Method>,
    /// `:authority`; `None` leaves it out.
    pub authority: Option<AuthorityIn>,
    /// `:scheme`.
    pub scheme: Option<Blob>,
    /// `:path`.
    pub path: Option<Blob>,
    /// `:protocol` (extended CONNECT, not enabled on HBONE).
    pub protocol: Option<Blob>,
    /// `forwarded`.
    pub forwarded: Option<Blob>,
    /// `baggage`.
    pub baggage: Option<Blob>,
    /// `traceparent`.
    pub traceparent: Option<TraceParentIn>,
    /// More fields, any bytes (uppercase or connection-specific names are malformed in
    /// HTTP/2).
    pub others: List<(Blob, Blob), 8>,
    /// Where `:authority` goes: `false` with the pseudo-headers, `true` after the regular
    /// fields (malformed).
    pub authority_last: bool,
    /// `END_STREAM` on the HEADERS frame.
    pub end_stream: bool,
    /// Split the header block into HEADERS + CONTINUATION at this offset (modulo its
    /// length + 1).
    pub continuation_at: Option<u16>,
    /// A DATA frame on the stream after the HEADERS.
    pub data: Option<DataIn>,
    /// A RST_STREAM with this error code after everything else.
    pub reset: Option<u32>,
}

encode_struct!(Request {
    inner,
    method,
    authority,
    scheme,
    path,
    protocol,
    forwarded,
    baggage,
    traceparent,
    others,
    authority_last,
    end_stream,
    continuation_at,
    data,
    reset,
});

/// What the tunnel's inner service does with the tunnel.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// Admits it and echoes until EOF.
    Echo,
    /// Refuses it (`Refusal::Refused`: 503).
    Refuse,
    /// Refuses it as denied (`Refusal::Denied`: 401/403).
    Deny,
    /// Returns without deciding (the terminator sees the admission dropped).
    Drop,
    /// Fails with an error.
    Fail,
    /// Waits this many (virtual) seconds, then admits and echoes; past 30 s the
    /// terminator has answered 504 already.
    Delay { seconds: u8 },
}

encode_enum!(Inner {
    Echo,
    Refuse,
    Deny,
    Drop,
    Fail,
    Delay { seconds },
});

/// `:method`.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Connect,
    Get,
    Post,
    Other { name: Blob },
}

encode_enum!(Method {
    Connect,
    Get,
    Post,
    Other { name },
});

impl Method {
    /// The bytes sent.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Method::Connect => b"CONNECT",
            Method::Get => b"GET",
            Method::Post => b"POST",
            Method::Other { name } => &name.0,
        }
    }
}

/// `:authority`: mostly plausible shapes, so that the policy is reached.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum AuthorityIn {
    /// The address the connection was accepted on ([`LOCAL_IP`]), this port.
    Local { port: u16 },
    /// The same address, IPv4-mapped IPv6 (`[::ffff:127.0.0.1]:port`).
    Mapped { port: u16 },
    /// Another IPv4 address.
    OtherIp { ip: u32, port: u16 },
    /// A host name.
    Name { name: Blob, port: u16 },
    /// Any bytes.
    Raw { bytes: Blob },
}

encode_enum!(AuthorityIn {
    Local { port },
    Mapped { port },
    OtherIp { ip, port },
    Name { name, port },
    Raw { bytes },
});

/// The IP the harness's connection was accepted on (its `LocalAddr`).
pub const LOCAL_IP: [u8; 4] = [127, 0, 0, 1];

impl AuthorityIn {
    /// The bytes sent.
    pub fn bytes(&self) -> Vec<u8> {
        let [a, b, c, d] = LOCAL_IP;
        match self {
            AuthorityIn::Local { port } => format!("{a}.{b}.{c}.{d}:{port}").into_bytes(),
            AuthorityIn::Mapped { port } => format!("[::ffff:{a}.{b}.{c}.{d}]:{port}").into_bytes(),
            AuthorityIn::OtherIp { ip, port } => {
                format!("{}:{port}", std::net::Ipv4Addr::from(*ip)).into_bytes()
            }
            AuthorityIn::Name { name, port } => {
                let mut v = name.0.clone();
                v.extend_from_slice(format!(":{port}").as_bytes());
                v
            }
            AuthorityIn::Raw { bytes } => bytes.0.clone(),
        }
    }
}

/// `traceparent`.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum TraceParentIn {
    /// A well-formed value with these fields.
    Valid {
        trace_id: u128,
        parent_id: u64,
        flags: u8,
    },
    /// Any bytes.
    Raw { bytes: Blob },
}

encode_enum!(TraceParentIn {
    Valid {
        trace_id,
        parent_id,
        flags
    },
    Raw { bytes },
});

impl TraceParentIn {
    /// The bytes sent.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            TraceParentIn::Valid {
                trace_id,
                parent_id,
                flags,
            } => format!("00-{trace_id:032x}-{parent_id:016x}-{flags:02x}").into_bytes(),
            TraceParentIn::Raw { bytes } => bytes.0.clone(),
        }
    }
}

/// A DATA frame after the HEADERS.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    pub payload: Blob,
    pub end_stream: bool,
}

encode_struct!(DataIn {
    payload,
    end_stream
});

impl Request {
    /// The regular (non-pseudo) header fields, in the order sent.
    pub fn regular_fields(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut fields = Vec::new();
        if let Some(v) = &self.forwarded {
            fields.push((b"forwarded".to_vec(), v.0.clone()));
        }
        if let Some(v) = &self.baggage {
            fields.push((b"baggage".to_vec(), v.0.clone()));
        }
        if let Some(v) = &self.traceparent {
            fields.push((b"traceparent".to_vec(), v.bytes()));
        }
        for (name, value) in &self.others.0 {
            fields.push((name.0.clone(), value.0.clone()));
        }
        fields
    }

    /// The HPACK header block.
    pub fn header_block(&self) -> Vec<u8> {
        let mut block = Vec::new();
        let pseudo = |block: &mut Vec<u8>, name: &[u8], value: Option<&[u8]>| {
            if let Some(value) = value {
                wire::hpack_literal(block, name, value);
            }
        };
        let authority = self.authority.as_ref().map(AuthorityIn::bytes);
        pseudo(
            &mut block,
            b":method",
            self.method.as_ref().map(Method::bytes),
        );
        pseudo(
            &mut block,
            b":scheme",
            self.scheme.as_ref().map(|b| &b.0[..]),
        );
        if !self.authority_last {
            pseudo(&mut block, b":authority", authority.as_deref());
        }
        pseudo(&mut block, b":path", self.path.as_ref().map(|b| &b.0[..]));
        pseudo(
            &mut block,
            b":protocol",
            self.protocol.as_ref().map(|b| &b.0[..]),
        );
        for (name, value) in self.regular_fields() {
            wire::hpack_literal(&mut block, &name, &value);
        }
        if self.authority_last {
            pseudo(&mut block, b":authority", authority.as_deref());
        }
        block
    }

    /// Everything the client writes: preface, empty SETTINGS, the request's frames.
    pub fn client_bytes(&self) -> Vec<u8> {
        let mut out = wire::PREFACE.to_vec();
        wire::frame(&mut out, wire::SETTINGS, 0, 0, &[]);
        let block = self.header_block();
        let end_stream = if self.end_stream { wire::END_STREAM } else { 0 };
        match self.continuation_at {
            Some(at) => {
                let at = usize::from(at) % (block.len() + 1);
                wire::frame(&mut out, wire::HEADERS, end_stream, 1, &block[..at]);
                wire::frame(
                    &mut out,
                    wire::CONTINUATION,
                    wire::END_HEADERS,
                    1,
                    &block[at..],
                );
            }
            None => wire::frame(
                &mut out,
                wire::HEADERS,
                end_stream | wire::END_HEADERS,
                1,
                &block,
            ),
        }
        if let Some(data) = &self.data {
            let flags = if data.end_stream { wire::END_STREAM } else { 0 };
            wire::frame(&mut out, wire::DATA, flags, 1, &data.payload.0);
        }
        if let Some(code) = self.reset {
            wire::frame(&mut out, wire::RST_STREAM, 0, 1, &code.to_be_bytes());
        }
        out
    }
}
