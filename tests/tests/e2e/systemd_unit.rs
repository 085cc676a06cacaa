//! The shipped systemd unit passes `systemd-analyze verify` (with ExecStart pointed at the binary
//! just built, since verify checks that the executable exists).

use std::path::Path;
use std::time::Duration;

use sluice_tests::{Host, run_bounded};

/// Where the unit names the installed binary.
const INSTALLED_BIN: &str = "/usr/local/bin/sluice";

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let systemd_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let unit = systemd_dir.join("sluice.service");
    // A missing unit is a failure, not a skip: the unit is part of what we ship.
    let text = std::fs::read_to_string(&unit)
        .unwrap_or_else(|e| panic!("reading {}: {e}", unit.display()));
    assert!(
        text.contains(INSTALLED_BIN),
        "the unit should run {INSTALLED_BIN}:\n{text}"
    );
    let h = Host::new();
    let built = h.sluice_bin().to_string_lossy().into_owned();
    // Copy the unit's siblings too: verify loads units it refers to from the unit's directory.
    let dir = h.path("systemd");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&systemd_dir).unwrap().flatten() {
        if let Ok(sibling) = std::fs::read_to_string(entry.path()) {
            std::fs::write(
                dir.join(entry.file_name()),
                sibling.replace(INSTALLED_BIN, &built),
            )
            .unwrap();
        }
    }
    let mut cmd = std::process::Command::new("systemd-analyze");
    cmd.arg("verify")
        .arg(dir.join("sluice.service"))
        .arg(dir.join("sluice-shutdown.service"));
    let out = run_bounded(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.code, Some(0), "{out}");
    // Verify also reports on unrelated units of this machine; only lines about ours count.
    let complaints: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.to_lowercase().contains("sluice"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}\n{out}");
}
