//! Fuzz target: the parsers of ZooKeeper node data (build metadata, `enabled`, `restarting`,
//! `roles`) and of the JSON status nodes other hosts write. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sluice::coord::parse_node_data_for_fuzzing(data);
    let _ = serde_json::from_slice::<serde_json::Value>(data);
});
