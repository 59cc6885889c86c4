//! `Target`/CONNECT authority parsing: never panics, whatever parses prints back to text
//! that parses to the same value, and `Target::parse` / `FromStr` agree with
//! `Authority::parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxystack::{Authority, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = Authority::parse(text);
    // `Target` parsing is `Authority` parsing plus empty metadata, and prints the same.
    match (Target::parse(text), &parsed) {
        (Ok(target), Ok(authority)) => {
            assert_eq!(target.authority(), authority);
            assert_eq!(target.to_string(), authority.to_string());
            assert_eq!(
                text.parse::<Target>().map(|t| t.to_string()),
                Ok(target.to_string())
            );
        }
        (Err(e), Err(f)) => assert_eq!(&e, f),
        (target, _) => panic!("Target::parse {target:?} vs Authority::parse {parsed:?}"),
    }
    if let Ok(authority) = parsed {
        let printed = authority.to_string();
        assert_eq!(
            Authority::parse(&printed).as_ref(),
            Ok(&authority),
            "{printed}"
        );
        assert!(printed.len() <= proxystack::addr::MAX_AUTHORITY_LEN + 2);
    }
});
