//! The input of `h2_frames`: a server to talk to and a sequence of HTTP/2 frames, sent
//! after the client preface.

use libfuzzer_sys::arbitrary::{self, Arbitrary};

use crate::input::{Blob, List};
use crate::wire;
use crate::{encode_enum, encode_struct};

/// Most frames in one input (a `RapidReset` counts its pairs).
pub const MAX_FRAMES: usize = 512;
/// Most bytes written in one input.
pub const MAX_BYTES: usize = 256 * 1024;

/// One connection.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub server: Server,
    /// The client's first SETTINGS (the one the preface requires).
    pub settings: List<Setting, 8>,
    pub frames: List<FrameIn, 48>,
    /// After the last frame has been handled: half-close at once, or wait this many
    /// (virtual) seconds first, reading what the server sends.
    pub linger: Option<u8>,
}

encode_struct!(Sequence {
    server,
    settings,
    frames,
    linger
});

/// Which server gets the frames.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// `http::HttpServer` (hyper, auto HTTP/1 + HTTP/2), whose service reads the body and
    /// answers 200.
    Http,
    /// `connect::ConnectTerminate` with extended CONNECT, tunnels admitted and echoed.
    Connect,
    /// `hbone::Inbound::tunnels` (HTTP/2 only, the HBONE checks), tunnels echoed.
    Hbone,
}

encode_enum!(Server {
    Http,
    Connect,
    Hbone
});

/// One SETTINGS parameter.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub id: SettingId,
    pub value: Value,
}

encode_struct!(Setting { id, value });

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum SettingId {
    HeaderTableSize,
    EnablePush,
    MaxConcurrentStreams,
    InitialWindowSize,
    MaxFrameSize,
    MaxHeaderListSize,
    EnableConnectProtocol,
    Other { id: u16 },
}

encode_enum!(SettingId {
    HeaderTableSize,
    EnablePush,
    MaxConcurrentStreams,
    InitialWindowSize,
    MaxFrameSize,
    MaxHeaderListSize,
    EnableConnectProtocol,
    Other { id },
});

impl SettingId {
    fn code(&self) -> u16 {
        match self {
            SettingId::HeaderTableSize => 1,
            SettingId::EnablePush => 2,
            SettingId::MaxConcurrentStreams => 3,
            SettingId::InitialWindowSize => 4,
            SettingId::MaxFrameSize => 5,
            SettingId::MaxHeaderListSize => 6,
            SettingId::EnableConnectProtocol => 8,
            SettingId::Other { id } => *id,
        }
    }
}

/// A 32-bit value, biased towards the edges.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Zero,
    One,
    /// 2^31 − 1: the largest window, and the largest window increment.
    MaxWindow,
    /// 2^31: one past it.
    PastWindow,
    /// 16 384, the smallest SETTINGS_MAX_FRAME_SIZE.
    MinFrame,
    /// 2^24: one past the largest SETTINGS_MAX_FRAME_SIZE.
    PastFrame,
    Max,
    Any {
        value: u32,
    },
}

encode_enum!(Value {
    Zero,
    One,
    MaxWindow,
    PastWindow,
    MinFrame,
    PastFrame,
    Max,
    Any { value },
});

impl Value {
    pub fn get(&self) -> u32 {
        match self {
            Value::Zero => 0,
            Value::One => 1,
            Value::MaxWindow => 0x7fff_ffff,
            Value::PastWindow => 0x8000_0000,
            Value::MinFrame => 16_384,
            Value::PastFrame => 1 << 24,
            Value::Max => u32::MAX,
            Value::Any { value } => *value,
        }
    }
}

/// A stream identifier, relative to the streams the sequence opened so far.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum StreamRef {
    /// The next client stream (last + 2): opens one.
    New,
    /// The last stream opened (1 before any).
    Current,
    /// An older one (a regression when used to open a stream).
    Previous { back: u8 },
    /// 0, the connection.
    Zero,
    /// An even (server-initiated) id.
    Even,
    /// Any 32-bit value, the reserved bit included.
    Raw { id: u32 },
}

encode_enum!(StreamRef {
    New,
    Current,
    Previous { back },
    Zero,
    Even,
    Raw { id },
});

/// A PRIORITY block (in PRIORITY frames and prioritised HEADERS).
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Prio {
    pub exclusive: bool,
    pub dependency: StreamRef,
    pub weight: u8,
}

encode_struct!(Prio {
    exclusive,
    dependency,
    weight
});

/// A header block fragment.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// A valid `GET https://a/<path>` request.
    Get { path: Blob },
    /// A valid `POST` with `content-length` (which the DATA frames may contradict).
    Post { content_length: Option<u32> },
    /// A valid `CONNECT <authority>`.
    Connect { authority: Blob },
    /// A valid extended CONNECT (`:protocol`), allowed only where the server enabled it.
    ExtendedConnect { protocol: Blob },
    /// Literal fields, any bytes.
    Fields { fields: List<(Blob, Blob), 8> },
    /// Indexed fields (static or dynamic table indices, out of range included).
    Indexed { indices: List<u8, 16> },
    /// A dynamic table size update to `size`, then literal fields with incremental
    /// indexing (they fill the dynamic table, for later `Indexed` blocks).
    Indexing {
        size: u16,
        fields: List<(Blob, Blob), 4>,
    },
    /// `count` filler fields of 64 bytes each (header list size limits).
    Filler { count: u8 },
    /// Any bytes.
    Raw { bytes: Blob },
}

encode_enum!(Block {
    Get { path },
    Post { content_length },
    Connect { authority },
    ExtendedConnect { protocol },
    Fields { fields },
    Indexed { indices },
    Indexing { size, fields },
    Filler { count },
    Raw { bytes },
});

impl Block {
    /// The HPACK bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let lit = wire::hpack_literal;
        match self {
            Block::Get { path } => {
                let mut p = b"/".to_vec();
                p.extend_from_slice(&path.0);
                lit(&mut b, b":method", b"GET");
                lit(&mut b, b":scheme", b"https");
                lit(&mut b, b":authority", b"a");
                lit(&mut b, b":path", &p);
            }
            Block::Post { content_length } => {
                lit(&mut b, b":method", b"POST");
                lit(&mut b, b":scheme", b"http");
                lit(&mut b, b":authority", b"a");
                lit(&mut b, b":path", b"/upload");
                if let Some(n) = content_length {
                    lit(&mut b, b"content-length", n.to_string().as_bytes());
                }
            }
            Block::Connect { authority } => {
                lit(&mut b, b":method", b"CONNECT");
                lit(&mut b, b":authority", &authority.0);
            }
            Block::ExtendedConnect { protocol } => {
                lit(&mut b, b":method", b"CONNECT");
                lit(&mut b, b":protocol", &protocol.0);
                lit(&mut b, b":scheme", b"https");
                lit(&mut b, b":authority", b"a:443");
                lit(&mut b, b":path", b"/chat");
            }
            Block::Fields { fields } => {
                for (name, value) in &fields.0 {
                    lit(&mut b, &name.0, &value.0);
                }
            }
            Block::Indexed { indices } => {
                for &i in &indices.0 {
                    wire::hpack_int(&mut b, 7, 0x80, usize::from(i));
                }
            }
            Block::Indexing { size, fields } => {
                wire::hpack_int(&mut b, 5, 0x20, usize::from(*size));
                for (name, value) in &fields.0 {
                    b.push(0x40);
                    wire::hpack_string(&mut b, &name.0);
                    wire::hpack_string(&mut b, &value.0);
                }
            }
            Block::Filler { count } => {
                for i in 0..*count {
                    lit(&mut b, format!("x-filler-{i:03}").as_bytes(), &[b'f'; 51]);
                }
            }
            Block::Raw { bytes } => b.extend_from_slice(&bytes.0),
        }
        b
    }
}

/// A window increment, biased towards the edges.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Increment {
    Zero,
    One,
    /// 2^31 − 1: overflows any window that is not empty.
    Max,
    /// The reserved bit set on top of 2^31 − 1.
    Reserved,
    Any {
        value: u32,
    },
}

encode_enum!(Increment {
    Zero,
    One,
    Max,
    Reserved,
    Any { value },
});

/// One frame (or a burst of them).
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum FrameIn {
    Settings {
        ack: bool,
        params: List<Setting, 8>,
    },
    Headers {
        stream: StreamRef,
        end_stream: bool,
        end_headers: bool,
        pad: Option<u8>,
        priority: Option<Prio>,
        block: Block,
    },
    Continuation {
        stream: StreamRef,
        end_headers: bool,
        block: Block,
    },
    /// `len` bytes of payload (filler, not from the input).
    Data {
        stream: StreamRef,
        end_stream: bool,
        pad: Option<u8>,
        len: u16,
    },
    RstStream {
        stream: StreamRef,
        code: u32,
    },
    Ping {
        ack: bool,
        data: u64,
    },
    WindowUpdate {
        stream: StreamRef,
        increment: Increment,
    },
    Priority {
        stream: StreamRef,
        priority: Prio,
    },
    GoAway {
        last: StreamRef,
        code: u32,
        debug: Blob,
    },
    PushPromise {
        stream: StreamRef,
        promised: StreamRef,
        block: Block,
    },
    /// A frame of any type, any flags, any payload (types ≥ 10 are extensions and must
    /// be ignored).
    Unknown {
        kind: u8,
        flags: u8,
        stream: StreamRef,
        payload: Blob,
    },
    /// `count` pairs of HEADERS (a GET on a new stream) + RST_STREAM(CANCEL): rapid reset.
    RapidReset {
        count: u8,
    },
}

encode_enum!(FrameIn {
    Settings { ack, params },
    Headers {
        stream,
        end_stream,
        end_headers,
        pad,
        priority,
        block
    },
    Continuation {
        stream,
        end_headers,
        block
    },
    Data {
        stream,
        end_stream,
        pad,
        len
    },
    RstStream { stream, code },
    Ping { ack, data },
    WindowUpdate { stream, increment },
    Priority { stream, priority },
    GoAway { last, code, debug },
    PushPromise {
        stream,
        promised,
        block
    },
    Unknown {
        kind,
        flags,
        stream,
        payload
    },
    RapidReset { count },
});

/// Turns stream references into ids as the sequence is written.
#[derive(Debug, Default)]
struct Streams {
    last: u32,
}

impl Streams {
    fn id(&mut self, r: &StreamRef) -> u32 {
        let current = self.last.max(1);
        match r {
            StreamRef::New => {
                self.last = if self.last == 0 {
                    1
                } else {
                    self.last.saturating_add(2).min(0x7fff_ffff)
                };
                self.last
            }
            StreamRef::Current => current,
            StreamRef::Previous { back } => current.saturating_sub(2 * u32::from(*back)).max(1),
            StreamRef::Zero => 0,
            StreamRef::Even => current.saturating_add(1) & 0x7fff_ffff,
            StreamRef::Raw { id } => *id,
        }
    }
}

fn settings_payload(params: &[Setting]) -> Vec<u8> {
    let mut p = Vec::new();
    for s in params {
        p.extend_from_slice(&s.id.code().to_be_bytes());
        p.extend_from_slice(&s.value.get().to_be_bytes());
    }
    p
}

fn prio_bytes(p: &Prio, streams: &mut Streams) -> [u8; 5] {
    let dep = streams.id(&p.dependency) & 0x7fff_ffff;
    let dep = if p.exclusive { dep | 0x8000_0000 } else { dep };
    let d = dep.to_be_bytes();
    [d[0], d[1], d[2], d[3], p.weight]
}

/// Adds `pad` bytes of padding: the pad length byte first, zeros last.
fn padded(body: &[u8], pad: Option<u8>, prefix: &[u8]) -> (u8, Vec<u8>) {
    let mut p = Vec::new();
    let mut flags = 0;
    if let Some(n) = pad {
        flags |= wire::PADDED;
        p.push(n);
    }
    p.extend_from_slice(prefix);
    p.extend_from_slice(body);
    if let Some(n) = pad {
        p.resize(p.len() + usize::from(n), 0);
    }
    (flags, p)
}

impl Sequence {
    /// Everything the client writes, bounded by [`MAX_FRAMES`] and [`MAX_BYTES`].
    pub fn client_bytes(&self) -> Vec<u8> {
        let mut out = wire::PREFACE.to_vec();
        wire::frame(
            &mut out,
            wire::SETTINGS,
            0,
            0,
            &settings_payload(&self.settings.0),
        );
        let mut streams = Streams::default();
        let mut frames = 0;
        for f in &self.frames.0 {
            if frames >= MAX_FRAMES || out.len() >= MAX_BYTES {
                break;
            }
            frames += 1;
            match f {
                FrameIn::Settings { ack, params } => {
                    let flags = if *ack { wire::ACK } else { 0 };
                    let payload = settings_payload(&params.0);
                    wire::frame(&mut out, wire::SETTINGS, flags, 0, &payload);
                }
                FrameIn::Headers {
                    stream,
                    end_stream,
                    end_headers,
                    pad,
                    priority,
                    block,
                } => {
                    let id = streams.id(stream);
                    let prio = priority
                        .as_ref()
                        .map(|p| prio_bytes(p, &mut streams).to_vec())
                        .unwrap_or_default();
                    let (mut flags, payload) = padded(&block.bytes(), *pad, &prio);
                    if priority.is_some() {
                        flags |= wire::PRIORITY_FLAG;
                    }
                    if *end_stream {
                        flags |= wire::END_STREAM;
                    }
                    if *end_headers {
                        flags |= wire::END_HEADERS;
                    }
                    wire::frame(&mut out, wire::HEADERS, flags, id, &payload);
                }
                FrameIn::Continuation {
                    stream,
                    end_headers,
                    block,
                } => {
                    let flags = if *end_headers { wire::END_HEADERS } else { 0 };
                    let id = streams.id(stream);
                    wire::frame(&mut out, wire::CONTINUATION, flags, id, &block.bytes());
                }
                FrameIn::Data {
                    stream,
                    end_stream,
                    pad,
                    len,
                } => {
                    let id = streams.id(stream);
                    let body = vec![b'd'; usize::from(*len)];
                    let (mut flags, payload) = padded(&body, *pad, &[]);
                    if *end_stream {
                        flags |= wire::END_STREAM;
                    }
                    wire::frame(&mut out, wire::DATA, flags, id, &payload);
                }
                FrameIn::RstStream { stream, code } => {
                    let id = streams.id(stream);
                    wire::frame(&mut out, wire::RST_STREAM, 0, id, &code.to_be_bytes());
                }
                FrameIn::Ping { ack, data } => {
                    let flags = if *ack { wire::ACK } else { 0 };
                    wire::frame(&mut out, wire::PING, flags, 0, &data.to_be_bytes());
                }
                FrameIn::WindowUpdate { stream, increment } => {
                    let id = streams.id(stream);
                    let inc = match increment {
                        Increment::Zero => 0,
                        Increment::One => 1,
                        Increment::Max => 0x7fff_ffff,
                        Increment::Reserved => 0xffff_ffff,
                        Increment::Any { value } => *value,
                    };
                    wire::frame(&mut out, wire::WINDOW_UPDATE, 0, id, &inc.to_be_bytes());
                }
                FrameIn::Priority { stream, priority } => {
                    let id = streams.id(stream);
                    let p = prio_bytes(priority, &mut streams);
                    wire::frame(&mut out, wire::PRIORITY, 0, id, &p);
                }
                FrameIn::GoAway { last, code, debug } => {
                    let mut p = (streams.id(last) & 0x7fff_ffff).to_be_bytes().to_vec();
                    p.extend_from_slice(&code.to_be_bytes());
                    p.extend_from_slice(&debug.0);
                    wire::frame(&mut out, wire::GOAWAY, 0, 0, &p);
                }
                FrameIn::PushPromise {
                    stream,
                    promised,
                    block,
                } => {
                    let id = streams.id(stream);
                    let mut p = (streams.id(promised) & 0x7fff_ffff).to_be_bytes().to_vec();
                    p.extend_from_slice(&block.bytes());
                    wire::frame(&mut out, wire::PUSH_PROMISE, wire::END_HEADERS, id, &p);
                }
                FrameIn::Unknown {
                    kind,
                    flags,
                    stream,
                    payload,
                } => {
                    let id = streams.id(stream);
                    wire::frame(&mut out, *kind, *flags, id, &payload.0);
                }
                FrameIn::RapidReset { count } => {
                    let get = Block::Get {
                        path: Blob::default(),
                    }
                    .bytes();
                    for _ in 0..*count {
                        if frames >= MAX_FRAMES {
                            break;
                        }
                        frames += 1;
                        let id = streams.id(&StreamRef::New);
                        wire::frame(&mut out, wire::HEADERS, wire::END_HEADERS, id, &get);
                        wire::frame(&mut out, wire::RST_STREAM, 0, id, &8u32.to_be_bytes());
                    }
                }
            }
        }
        out
    }
}
