//! Writes the seed corpora of `hbone_request`, `h2_frames` and `http1_server`:
//!
//! ```sh
//! cd fuzz && cargo run --release --example seeds
//! ```
//!
//! The structured inputs are built as values and encoded with `proxystack_fuzz::input::Encode`;
//! each seed is decoded again with `arbitrary` and must give back the same value, so a
//! change of `arbitrary`'s format fails here instead of silently producing other inputs.
//! Existing files of the same name are overwritten; others are left alone.

use std::fmt::Debug;
use std::path::Path;

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use proxystack_fuzz::frames::{
    Block, FrameIn, Increment, Prio, Sequence, Server, Setting, SettingId, StreamRef, Value,
};
use proxystack_fuzz::hbone::{AuthorityIn, DataIn, Inner, Method, Request, TraceParentIn};
use proxystack_fuzz::input::{Blob, Encode, List};

fn write_seed<T>(dir: &str, name: &str, value: &T)
where
    T: Encode + for<'a> Arbitrary<'a> + PartialEq + Debug,
{
    let mut bytes = Vec::new();
    value.encode(&mut bytes);
    let back = T::arbitrary_take_rest(Unstructured::new(&bytes)).expect("seed decodes");
    assert_eq!(&back, value, "seed {dir}/{name} does not round-trip");
    write_raw(dir, name, &bytes);
}

fn write_raw(dir: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn blob(s: &str) -> Option<Blob> {
    Some(Blob::from(s))
}

/// A well-formed HBONE CONNECT to `authority`, as ztunnel sends it.
fn connect(authority: AuthorityIn) -> Request {
    Request {
        inner: Inner::Echo,
        method: Some(Method::Connect),
        authority: Some(authority),
        scheme: None,
        path: None,
        protocol: None,
        forwarded: blob("for=\"10.0.0.3:41234\";host=reviews.default.svc.cluster.local"),
        baggage: blob(
            "k8s.namespace.name=default,k8s.deployment.name=reviews,service.name=reviews",
        ),
        traceparent: Some(TraceParentIn::Valid {
            trace_id: 0x0af7651916cd43dd8448eb211c80319c,
            parent_id: 0xb7ad6b7169203331,
            flags: 1,
        }),
        others: List::default(),
        authority_last: false,
        end_stream: false,
        continuation_at: None,
        data: Some(DataIn {
            payload: Blob::from("hello"),
            end_stream: true,
        }),
        reset: None,
    }
}

fn hbone_seeds() {
    let d = "hbone_request";
    let local = |port| AuthorityIn::Local { port };
    write_seed(d, "connect-local-echo", &connect(local(8080)));
    write_seed(
        d,
        "connect-mapped-v6",
        &connect(AuthorityIn::Mapped { port: 8080 }),
    );
    write_seed(
        d,
        "connect-name",
        &connect(AuthorityIn::Name {
            name: Blob::from("reviews.default.svc.cluster.local"),
            port: 9080,
        }),
    );
    write_seed(
        d,
        "connect-other-ip-400",
        &connect(AuthorityIn::OtherIp {
            ip: 0x0a00_0007,
            port: 8080,
        }),
    );
    write_seed(d, "connect-illegal-port-503", &connect(local(15008)));
    write_seed(d, "connect-policy-401", &connect(local(22)));
    write_seed(
        d,
        "connect-raw-authority",
        &connect(AuthorityIn::Raw {
            bytes: Blob::from("user@[fe80::1%25eth0]:80"),
        }),
    );
    write_seed(
        d,
        "get-400",
        &Request {
            method: Some(Method::Get),
            scheme: blob("https"),
            path: blob("/"),
            ..connect(local(8080))
        },
    );
    write_seed(
        d,
        "connect-with-path-reset",
        &Request {
            path: blob("/"),
            ..connect(local(8080))
        },
    );
    write_seed(
        d,
        "connect-protocol",
        &Request {
            protocol: blob("websocket"),
            scheme: blob("https"),
            path: blob("/chat"),
            ..connect(local(8080))
        },
    );
    write_seed(
        d,
        "refused-503",
        &Request {
            inner: Inner::Refuse,
            ..connect(local(8080))
        },
    );
    write_seed(
        d,
        "slow-admission-504",
        &Request {
            inner: Inner::Delay { seconds: 45 },
            ..connect(local(8080))
        },
    );
    write_seed(
        d,
        "inner-drops",
        &Request {
            inner: Inner::Drop,
            ..connect(local(8080))
        },
    );
    write_seed(
        d,
        "authority-after-regular-fields",
        &Request {
            authority_last: true,
            ..connect(local(8080))
        },
    );
    write_seed(
        d,
        "continuation-then-reset",
        &Request {
            continuation_at: Some(40),
            data: None,
            reset: Some(8),
            ..connect(local(8080))
        },
    );
    write_seed(
        d,
        "bad-hbone-headers",
        &Request {
            forwarded: blob("for=unknown;host=\"a b\", for=\"[::1]:80\""),
            baggage: blob("=x, ok=1;prop, bad key=2,,k=v=w"),
            traceparent: Some(TraceParentIn::Raw {
                bytes: Blob::from("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"),
            }),
            ..connect(local(8080))
        },
    );
    write_seed(
        d,
        "malformed-fields",
        &Request {
            others: List(vec![
                (Blob::from("te"), Blob::from("trailers")),
                (Blob::from("connection"), Blob::from("keep-alive")),
                (Blob::from("Upper-Case"), Blob::from("x")),
            ]),
            ..connect(local(8080))
        },
    );
}

fn get(path: &str) -> Block {
    Block::Get {
        path: Blob::from(path),
    }
}

fn headers(stream: StreamRef, block: Block, end_stream: bool) -> FrameIn {
    FrameIn::Headers {
        stream,
        end_stream,
        end_headers: true,
        pad: None,
        priority: None,
        block,
    }
}

fn data(len: u16, end_stream: bool) -> FrameIn {
    FrameIn::Data {
        stream: StreamRef::Current,
        end_stream,
        pad: None,
        len,
    }
}

fn seq(server: Server, frames: Vec<FrameIn>) -> Sequence {
    Sequence {
        server,
        settings: List::default(),
        frames: List(frames),
        linger: None,
    }
}

fn h2_seeds() {
    let d = "h2_frames";
    write_seed(
        d,
        "http-get",
        &seq(
            Server::Http,
            vec![headers(StreamRef::New, get("index.html"), true)],
        ),
    );
    write_seed(
        d,
        "http-post-body",
        &seq(
            Server::Http,
            vec![
                headers(
                    StreamRef::New,
                    Block::Post {
                        content_length: Some(100),
                    },
                    false,
                ),
                data(60, false),
                data(0, false),
                data(40, true),
            ],
        ),
    );
    write_seed(
        d,
        "http-content-length-mismatch",
        &seq(
            Server::Http,
            vec![
                headers(
                    StreamRef::New,
                    Block::Post {
                        content_length: Some(5),
                    },
                    false,
                ),
                data(10, true),
            ],
        ),
    );
    for (name, server) in [
        ("http-rapid-reset", Server::Http),
        ("hbone-rapid-reset", Server::Hbone),
    ] {
        write_seed(
            d,
            name,
            &seq(server, vec![FrameIn::RapidReset { count: 40 }]),
        );
    }
    let continuation_flood = vec![
        FrameIn::Headers {
            stream: StreamRef::New,
            end_stream: true,
            end_headers: false,
            pad: None,
            priority: None,
            block: get(""),
        },
        FrameIn::Continuation {
            stream: StreamRef::Current,
            end_headers: false,
            block: Block::Filler { count: 200 },
        },
        FrameIn::Continuation {
            stream: StreamRef::Current,
            end_headers: false,
            block: Block::Filler { count: 200 },
        },
        FrameIn::Continuation {
            stream: StreamRef::Current,
            end_headers: false,
            block: Block::Filler { count: 200 },
        },
        FrameIn::Continuation {
            stream: StreamRef::Current,
            end_headers: false,
            block: Block::Filler { count: 200 },
        },
        FrameIn::Continuation {
            stream: StreamRef::Current,
            end_headers: true,
            block: Block::Filler { count: 200 },
        },
    ];
    write_seed(
        d,
        "http-continuation-flood",
        &seq(Server::Http, continuation_flood.clone()),
    );
    write_seed(
        d,
        "connect-continuation-flood",
        &seq(Server::Connect, continuation_flood),
    );
    write_seed(
        d,
        "http-continuation-interleaved",
        &seq(
            Server::Http,
            vec![
                FrameIn::Headers {
                    stream: StreamRef::New,
                    end_stream: true,
                    end_headers: false,
                    pad: Some(3),
                    priority: None,
                    block: get("a"),
                },
                FrameIn::Ping {
                    ack: false,
                    data: 7,
                },
                FrameIn::Continuation {
                    stream: StreamRef::Current,
                    end_headers: true,
                    block: Block::Fields {
                        fields: List::default(),
                    },
                },
            ],
        ),
    );
    let authority = Block::Connect {
        authority: Blob::from("127.0.0.1:8080"),
    };
    write_seed(
        d,
        "connect-tunnel-echo",
        &seq(
            Server::Connect,
            vec![
                headers(StreamRef::New, authority.clone(), false),
                data(1000, false),
                FrameIn::WindowUpdate {
                    stream: StreamRef::Current,
                    increment: Increment::Any { value: 65_535 },
                },
                data(0, true),
            ],
        ),
    );
    write_seed(
        d,
        "connect-extended",
        &seq(
            Server::Connect,
            vec![
                FrameIn::Settings {
                    ack: true,
                    params: List::default(),
                },
                headers(
                    StreamRef::New,
                    Block::ExtendedConnect {
                        protocol: Blob::from("websocket"),
                    },
                    false,
                ),
                data(16, false),
                FrameIn::RstStream {
                    stream: StreamRef::Current,
                    code: 8,
                },
            ],
        ),
    );
    write_seed(
        d,
        "hbone-tunnel-linger",
        &Sequence {
            linger: Some(45),
            ..seq(
                Server::Hbone,
                vec![headers(StreamRef::New, authority, false), data(100, false)],
            )
        },
    );
    let setting = |id, value| Setting { id, value };
    write_seed(
        d,
        "http-odd-settings",
        &Sequence {
            settings: List(vec![
                setting(SettingId::HeaderTableSize, Value::Zero),
                setting(SettingId::EnablePush, Value::Any { value: 2 }),
                setting(SettingId::MaxFrameSize, Value::PastFrame),
            ]),
            ..seq(
                Server::Http,
                vec![
                    FrameIn::Settings {
                        ack: false,
                        params: List(vec![
                            setting(SettingId::InitialWindowSize, Value::PastWindow),
                            setting(SettingId::Other { id: 0xff }, Value::Max),
                        ]),
                    },
                    headers(StreamRef::New, get(""), true),
                ],
            )
        },
    );
    write_seed(
        d,
        "http-window-overflow",
        &seq(
            Server::Http,
            vec![
                headers(StreamRef::New, get(""), true),
                FrameIn::WindowUpdate {
                    stream: StreamRef::Current,
                    increment: Increment::Max,
                },
                FrameIn::WindowUpdate {
                    stream: StreamRef::Zero,
                    increment: Increment::Zero,
                },
                FrameIn::WindowUpdate {
                    stream: StreamRef::Zero,
                    increment: Increment::Max,
                },
            ],
        ),
    );
    write_seed(
        d,
        "http-stream-id-regression",
        &seq(
            Server::Http,
            vec![
                headers(StreamRef::New, get("1"), true),
                headers(StreamRef::New, get("2"), true),
                headers(StreamRef::Previous { back: 1 }, get("3"), true),
                headers(StreamRef::Even, get("4"), true),
            ],
        ),
    );
    write_seed(
        d,
        "http-control-frames",
        &seq(
            Server::Http,
            vec![
                FrameIn::Priority {
                    stream: StreamRef::New,
                    priority: Prio {
                        exclusive: true,
                        dependency: StreamRef::Current,
                        weight: 255,
                    },
                },
                FrameIn::Ping { ack: true, data: 1 },
                FrameIn::Unknown {
                    kind: 0xfa,
                    flags: 0xff,
                    stream: StreamRef::Raw { id: 0x8000_0003 },
                    payload: Blob::from("extension"),
                },
                FrameIn::PushPromise {
                    stream: StreamRef::Current,
                    promised: StreamRef::Even,
                    block: get(""),
                },
                FrameIn::GoAway {
                    last: StreamRef::Zero,
                    code: 0,
                    debug: Blob::from("bye"),
                },
            ],
        ),
    );
    write_seed(
        d,
        "http-hpack-table",
        &seq(
            Server::Http,
            vec![
                headers(
                    StreamRef::New,
                    Block::Indexing {
                        size: 4096,
                        fields: List(vec![
                            (Blob::from(":method"), Blob::from("GET")),
                            (Blob::from(":scheme"), Blob::from("http")),
                            (Blob::from(":authority"), Blob::from("a")),
                            (Blob::from(":path"), Blob::from("/x")),
                        ]),
                    },
                    true,
                ),
                headers(
                    StreamRef::New,
                    Block::Indexed {
                        indices: List(vec![65, 64, 63, 62]),
                    },
                    true,
                ),
            ],
        ),
    );
}

/// Control byte of `http1_server`: bit 0 routes through detection; the rest places the
/// first chunk boundary and sets the stride.
const WHOLE: u8 = 127 << 1;
const STRIDE_7: u8 = 6 << 1;

fn http1_seeds() {
    let seeds: &[(&str, u8, &[u8])] = &[
        ("get", WHOLE, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        (
            "pipelined",
            STRIDE_7,
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
              POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
              POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
              GET /z HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ),
        (
            "cl-te",
            WHOLE,
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "te-list",
            STRIDE_7,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "te-tab",
            WHOLE,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "double-host",
            WHOLE,
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        (
            "bare-lf",
            WHOLE | 1,
            b"GET / HTTP/1.1\nHost: a\n\n",
        ),
        (
            "obs-fold",
            WHOLE,
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        ),
        (
            "smuggled-after-good",
            STRIDE_7,
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n\
              POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        ),
        (
            "upgrade-refused-then-request",
            WHOLE,
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
              GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        (
            "connect",
            WHOLE,
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01",
        ),
        (
            "http10",
            WHOLE | 1,
            b"GET / HTTP/1.0\r\n\r\n",
        ),
        (
            "leading-crlf-detect",
            WHOLE | 1,
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        (
            "h2-preface-detect",
            WHOLE | 1,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        ),
        // The guard lost track of these chunked bodies (fixed): the double Host after
        // them went unchecked.
        (
            "chunk-size-leading-zeros",
            STRIDE_7,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              00000000000000005\r\nhello\r\n0\r\n\r\n\
              GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        (
            "chunk-ext-control-byte",
            WHOLE,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;\x01\r\nhello\r\n0\r\n\r\n\
              GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        (
            "trailer-bare-lf",
            STRIDE_7,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              0\r\n\nX: 1\r\nContent-Length: 36\r\n\r\n\
              GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        (
            "short-body",
            WHOLE,
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc",
        ),
        (
            "expect-continue",
            STRIDE_7 | 1,
            b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        ),
    ];
    for (name, control, bytes) in seeds {
        let mut input = vec![*control];
        input.extend_from_slice(bytes);
        write_raw("http1_server", name, &input);
    }
}

fn main() {
    hbone_seeds();
    h2_seeds();
    http1_seeds();
    println!("seeds written");
}
