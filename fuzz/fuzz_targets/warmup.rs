//! Fuzz target: the warm-up file parser, line by line as `load_requests` reads a release's
//! file (plain `METHOD /path` or a JSON object). Errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        let _ = sluice::service::warmup::parse_request(line);
    }
});
