//! Protocol detection: any bytes, delivered in any chunks, never panic the classifier and
//! always reach the same verdict as the whole input (see `detect::fuzz_one`, which the
//! unit tests run on the seed corpus too).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = proxystack::detect::fuzz_one(data) {
        panic!("{violation}: {data:?}");
    }
});
