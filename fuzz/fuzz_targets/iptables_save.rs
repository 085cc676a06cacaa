//! Fuzz target: reading our steering out of `iptables-save -t nat` output. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_strategies::steering::{owned_services, parse_save};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for service in owned_services(text) {
        let _ = parse_save(text, &service);
    }
    let _ = parse_save(text, "web");
});
