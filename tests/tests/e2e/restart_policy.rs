//! Restart policy: a crash loop backs off and ends `fatal`, `sluice start` clears `fatal`, and an
//! instance that crashes after its start-up time is restarted at once and never becomes `fatal`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sluice_tests::{Host, PATIENCE};

#[test]
fn crash_loop_backs_off_then_ends_fatal_and_start_clears_it() {
    let h = Host::new();
    // With start_retries = 2 the third failed start in a row is fatal; backoffs are 100 then 200 ms.
    h.service(
        "crash",
        r#"
command = ["/bin/sh", "-c", "exit 1"]
startup_ms = 500
start_retries = 2
backoff_initial_ms = 100
backoff_max_ms = 1000
"#,
    );
    h.start_daemon();

    let s = h.wait_until(|s| s.state("crash", 0) == "fatal", PATIENCE);
    let i = s.instance("crash", 0);
    assert_eq!(i["failed_starts"], 3, "{s}");
    assert_eq!(i["restarts"], 3, "{s}");
    assert_eq!(i["pid"], serde_json::Value::Null, "{s}");
    assert!(
        i["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("exit code 1"),
        "{s}"
    );
    // The table view says it too, for operators.
    let text = h.sluice(&["status"]).success().stdout;
    let line = text
        .lines()
        .find(|l| l.starts_with("crash/0"))
        .unwrap_or_else(|| panic!("no crash/0 line in:\n{text}"));
    assert!(line.contains("fatal"), "{line}");

    // `sluice start` clears it: the instance goes through the backoffs again and ends fatal again.
    // The states it passes through are sampled while the start runs, for the record.
    let mut start = h
        .sluice_command(&["start", "crash"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning `sluice start`");
    let mut states = BTreeSet::new();
    let deadline = Instant::now() + PATIENCE;
    let code = loop {
        if let Some(status) = start.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "`sluice start crash` hangs");
        states.insert(h.status().state("crash", 0).to_owned());
        std::thread::sleep(Duration::from_millis(10));
    };
    // It cannot succeed: the instance never starts. The command fails rather than lying.
    assert_eq!(code, Some(1), "`sluice start crash` of a crash loop");
    // Three more failed starts (restarts 3 → 6) prove it went through the backoffs again; the
    // sampled states are only printed, since a slow sample can miss the short backoff windows.
    println!("states seen during `sluice start`: {states:?}");
    let s = h.wait_until(
        |s| s.state("crash", 0) == "fatal" && s.instance("crash", 0)["restarts"] == 6,
        PATIENCE,
    );
    assert_eq!(s.instance("crash", 0)["failed_starts"], 3, "{s}");
}

#[test]
fn instance_that_ran_past_startup_is_restarted_and_never_fatal() {
    let h = Host::new();
    // Runs 1 s, longer than startup_ms, then fails: each exit is a crash of a started instance,
    // restarted at once, never counted as a failed start.
    h.service(
        "flaky",
        r#"
command = ["/bin/sh", "-c", "sleep 1; exit 1"]
startup_ms = 300
start_retries = 2
backoff_initial_ms = 100
env = { PATH = "/usr/bin:/bin" }
"#,
    );
    h.start_daemon();
    let first = h.wait_until(|s| s.running("flaky") == 1, PATIENCE);
    let first_pid = first.pid("flaky", 0).unwrap();

    let mut pids = BTreeSet::from([first_pid]);
    let watch_until = Instant::now() + Duration::from_secs(4);
    let mut last = first;
    while Instant::now() < watch_until {
        let s = h.status();
        let i = s.instance("flaky", 0);
        assert_ne!(i["state"], "fatal", "{s}");
        assert_ne!(
            i["state"], "backoff",
            "a started instance was backed off: {s}"
        );
        assert_eq!(i["failed_starts"], 0, "{s}");
        if let Some(pid) = s.pid("flaky", 0) {
            pids.insert(pid);
        }
        last = s;
        std::thread::sleep(Duration::from_millis(50));
    }
    // About 4 runs of 1 s; allow a loaded machine to be slow.
    assert!(pids.len() >= 3, "pids seen over 4 s: {pids:?}\n{last}");
    let restarts = last.instance("flaky", 0)["restarts"].as_u64().unwrap();
    assert!(restarts >= 2, "restarts: {restarts}\n{last}");
    assert!(
        last.instance("flaky", 0)["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("exit code 1"),
        "{last}"
    );
}

/// A periodic liveness probe that fails `liveness_failures` times in a row restarts the instance;
/// the other instance is left alone.
#[test]
fn failing_liveness_probes_restart_only_that_instance() {
    let h = Host::new();
    let sick = h.path("sick");
    h.service(
        "live",
        &format!(
            r#"
command = ["/bin/sleep", "1000"]
instances = 2
startup_ms = 200
[health]
exec = ["/bin/sh", "-c", "! test -e {sick}-{{instance}}"]
interval_ms = 50
liveness_interval_ms = 100
liveness_failures = 3
"#,
            sick = sick.display()
        ),
    );
    h.start_daemon();
    let before = h.wait_until(
        |s| s.all_running("live", 2) && s.instances("live").iter().all(|i| i["healthy"] == true),
        PATIENCE,
    );
    std::fs::write(format!("{}-0", sick.display()), "").unwrap();
    let after = h.wait_until(
        |s| s.pid("live", 0).is_some() && s.pid("live", 0) != before.pid("live", 0),
        PATIENCE,
    );
    std::fs::remove_file(format!("{}-0", sick.display())).unwrap();
    assert!(
        after.instance("live", 0)["last_restart_reason"]
            .as_str()
            .unwrap_or("")
            .contains("liveness probes failed in a row"),
        "{after}"
    );
    let settled = h.wait_until(
        |s| s.all_running("live", 2) && s.instance("live", 0)["healthy"] == true,
        PATIENCE,
    );
    assert_eq!(
        settled.pid("live", 1),
        before.pid("live", 1),
        "the healthy instance was left alone"
    );
}

/// The `signal` strategy sends the reload signal and checks health; processes stay.
#[test]
fn signal_strategy_reloads_in_place() {
    let h = Host::new();
    h.service(
        "hup",
        r#"
command = ["python3", "-u", "-c", "import signal, time\nsignal.signal(signal.SIGHUP, lambda *a: print('reloaded', flush=True))\nprint('up', flush=True)\nwhile True: time.sleep(1)"]
instances = 2
startup_ms = 200
[restart]
strategy = "signal"
[health]
exec = ["/bin/true"]
"#,
    );
    h.start_daemon();
    let before = h.wait_until(|s| s.all_running("hup", 2), PATIENCE);
    for i in 0..2 {
        h.wait_for_log("hup", i, |log| log.contains("up"), PATIENCE);
    }
    h.sluice(&["restart", "hup"]).success();
    for i in 0..2 {
        h.wait_for_log("hup", i, |log| log.contains("reloaded"), PATIENCE);
    }
    let after = h.status();
    assert_eq!(
        after.pids("hup"),
        before.pids("hup"),
        "a reload keeps the processes"
    );
}
