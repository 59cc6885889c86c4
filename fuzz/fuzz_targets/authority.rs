//! `Target`/CONNECT authority parsing: never panics, and whatever parses prints back to
//! text that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxystack::{Authority, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(authority) = Authority::parse(text) {
        let printed = authority.to_string();
        assert_eq!(Authority::parse(&printed).as_ref(), Ok(&authority), "{printed}");
        assert!(printed.len() <= proxystack::addr::MAX_AUTHORITY_LEN + 2);
    }
    let _ = Target::parse(text);
});
