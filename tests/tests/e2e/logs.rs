//! `sluice logs`: the last N lines of an instance's stdout or stderr, and `-f` following what is
//! appended afterwards.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sluice_tests::{Host, PATIENCE};

#[test]
fn logs_prints_the_last_lines_and_follows_new_ones() {
    let h = Host::new();
    h.service(
        "talk",
        r#"
command = ["/bin/sh", "-c", "for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2; exec sleep 1000"]
stop_grace_ms = 2000
env = { PATH = "/usr/bin:/bin" }
"#,
    );
    h.service(
        "tick",
        r#"
command = ["/bin/sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"]
stop_grace_ms = 2000
env = { PATH = "/usr/bin:/bin" }
"#,
    );
    h.start_daemon();
    h.wait_until(
        |s| s.running("talk") == 1 && s.running("tick") == 1,
        PATIENCE,
    );
    h.wait_for_log("talk", 0, |t| t.lines().count() >= 5, PATIENCE);

    let out = h.sluice(&["logs", "talk/0", "-n", "3"]).success();
    assert_eq!(out.stdout, "line 3\nline 4\nline 5\n", "{out}");
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(h.stderr_log_path("talk", 0)).is_ok_and(|t| !t.is_empty()) {
        assert!(Instant::now() < deadline, "nothing in talk/0's stderr log");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = h
        .sluice(&["logs", "talk/0", "--stderr", "-n", "1"])
        .success();
    assert_eq!(out.stdout, "oops\n", "{out}");

    // Follow: the first line is the newest at the time of the call; the following lines were
    // appended later and must come in order, none missing.
    let mut follow = h
        .sluice_command(&["logs", "tick/0", "-f", "-n", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning `sluice logs -f`");
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let number = |line: &str| -> u64 {
        line.strip_prefix("tick ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"))
    };
    let deadline = Instant::now() + PATIENCE;
    let next = || {
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("`logs -f` stopped printing")
    };
    let first = number(&next());
    let mut last = first;
    while last < first + 5 {
        let n = number(&next());
        assert_eq!(n, last + 1, "`logs -f` skipped or repeated a line");
        last = n;
    }
    let _ = follow.kill();
    let _ = follow.wait();
}
