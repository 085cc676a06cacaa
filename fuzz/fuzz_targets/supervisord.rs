//! Fuzz target: `sluice import-supervisord`'s reader and converter on one supervisord file (the
//! configparser dialect, `%()` expansions, command and environment splitting, the mapping and the
//! check of every generated service file). Errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::supervisord::convert::{Context, convert};
use sluice::supervisord::ini::Ini;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut ini = Ini {
        files: vec!["/etc/supervisor/supervisord.conf".into()],
        ..Ini::default()
    };
    if ini.parse(0, text, false).is_ok() {
        let ctx = Context {
            host_node_name: "fuzz".into(),
            environ: vec![("HOME".into(), "/root".into())],
        };
        let _ = convert(&ini, &ctx);
    }
});
