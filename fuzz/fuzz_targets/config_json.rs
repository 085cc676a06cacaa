//! Fuzz target: the JSON of a ZooKeeper config node (`/services/<svc>/config`), parsed and
//! validated like a service file. Errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::ServiceConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ServiceConfig::from_json(text);
    }
});
