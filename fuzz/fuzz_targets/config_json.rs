//! Fuzz target: the JSON of a ZooKeeper config node (`/services/<svc>/config`): checked against
//! the default grants and applied over a service file, as a host does. Errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::{CoordinationConfig, ServiceConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let granted = CoordinationConfig::default().config_node_keys;
        let _ = ServiceConfig::check_config_node(text, &granted);
        let base = ServiceConfig::with_command(vec!["true".into()]);
        let _ = base.with_config_node(text, &granted);
    }
});
