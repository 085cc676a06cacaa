//! Fuzz target: the service file parser (TOML, then validation). Errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::ServiceConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ServiceConfig::parse(std::path::Path::new("fuzz.toml"), text);
    }
});
