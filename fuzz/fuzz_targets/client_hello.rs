//! Differential fuzzing of the incremental ClientHello parser: the input,
//! chunked as the first byte says, must get exactly the verdict that the
//! one-shot `parse` gives the whole of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxystack::tls::client_hello::{
    parse, ClientHelloError, ClientHelloParser, Status, DEFAULT_MAX_HELLO_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    // The first split point is scaled to the input so that it can land
    // anywhere; the rest is cut in strides of 1 to 13 bytes, which puts
    // boundaries inside record and handshake headers.
    let first = usize::from(control) * input.len() / 255;
    let stride = usize::from(control % 13) + 1;
    let (head, tail) = input.split_at(first);

    let mut parser = ClientHelloParser::with_limit(DEFAULT_MAX_HELLO_LEN);
    let mut chunked = Ok(None);
    for chunk in std::iter::once(head).chain(tail.chunks(stride)) {
        match parser.push(chunk) {
            Ok(Status::NeedMore) => {}
            Ok(Status::Done(hello)) => {
                chunked = Ok(Some(hello));
                break;
            }
            Err(err) => {
                chunked = Err(err);
                break;
            }
        }
    }

    let whole = parse(input);
    assert_eq!(chunked, whole);
    match &whole {
        Ok(Some(hello)) => {
            assert!(hello.len <= input.len());
            assert_eq!(parser.consumed(), hello.len);
        }
        Ok(None) => assert!(matches!(
            parser.finish(),
            ClientHelloError::Truncated | ClientHelloError::NotTls { sslv2: false }
        )),
        Err(err) => assert_eq!(&parser.finish(), err),
    }
});
