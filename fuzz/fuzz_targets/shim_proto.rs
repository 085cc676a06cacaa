//! Fuzz target: the shim's line protocol (status lines, commands, the handshake). Never
//! panics, and whatever parses prints back to a line that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_shim::proto::{Command, Status, format_handshake, parse_handshake};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.split('\n') {
        if let Ok(status) = Status::parse(line) {
            let again = Status::parse(&status.to_string());
            assert_eq!(
                again.as_ref(),
                Ok(&status),
                "status `{line}` does not round-trip"
            );
        }
        if let Ok(command) = Command::parse(line) {
            let again = Command::parse(&command.to_string());
            assert_eq!(again, Ok(command), "command `{line}` does not round-trip");
        }
        if let Ok((shim_pid, pid)) = parse_handshake(line) {
            let again = parse_handshake(&format_handshake(shim_pid, pid));
            assert_eq!(
                again,
                Ok((shim_pid, pid)),
                "handshake `{line}` does not round-trip"
            );
        }
    }
});
