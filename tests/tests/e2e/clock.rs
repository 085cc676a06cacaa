//! Wall-clock steps of an hour, as sluice sees them (issue 10): libfaketime (Debian's `faketime`)
//! is preloaded into the daemon and its shims, with `DONT_FAKE_MONOTONIC=1`, and the test steps
//! the wall time they read through `FAKETIME_TIMESTAMP_FILE` (re-read on every call with
//! `FAKETIME_NO_CACHE=1`); the machine's clock is never touched. The instances themselves run
//! without it (`env -u LD_PRELOAD`). Ages and run times come from `CLOCK_BOOTTIME`, so a step
//! back during a long run is no failed start, and a step forward during a failed start (or
//! during its backoff) does not skip the backoff.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_tests::{Host, PATIENCE, fixtures};

/// Where Debian's `faketime` package puts the library.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const HOUR_S: i64 = 3600;

/// The preload and its settings, for the daemon (its environment) and for the shims (the
/// service's `env`, which is all a shim gets).
fn faketime_env(clock_file: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", LIBFAKETIME.to_owned()),
        ("FAKETIME_TIMESTAMP_FILE", clock_file.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".to_owned()),
        ("DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
}

/// Steps the faked wall clock to `offset_s` seconds from the real one.
fn step(clock_file: &Path, offset_s: i64) {
    let tmp = clock_file.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset_s:+}\n")).unwrap();
    std::fs::rename(&tmp, clock_file).unwrap();
}

/// A host whose daemon runs under libfaketime at offset 0, with the service `name` whose
/// instance runs `script` (sh) without the preload; `None` (after saying why) without libfaketime.
fn faked_host(name: &str, keys: &str, script: &str) -> Option<(Host, PathBuf)> {
    if !fixtures::require(
        "libfaketime (Debian package faketime)",
        Path::new(LIBFAKETIME).exists(),
    ) {
        return None;
    }
    let h = Host::new();
    let clock_file = h.path("faketime.rc");
    step(&clock_file, 0);
    let env = faketime_env(&clock_file);
    let env_toml: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\""))
        .chain([
            "PATH = \"/usr/bin:/bin\"".to_owned(),
            format!("DIR = \"{}\"", h.root().display()),
        ])
        .collect();
    h.service(
        name,
        &format!(
            r#"
command = ["/usr/bin/env", "-u", "LD_PRELOAD", "/bin/sh", "-c", "{script}"]
{keys}
env = {{ {} }}
"#,
            env_toml.join(", ")
        ),
    );
    let daemon_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    h.spawn_daemon(&daemon_env);
    h.wait_reachable(PATIENCE);
    Some((h, clock_file))
}

/// Boot-clock seconds of each start the instance recorded in `DIR/starts` (from `/proc/uptime`,
/// which libfaketime does not fake, and the instance runs without it anyway).
fn starts(h: &Host) -> Vec<f64> {
    std::fs::read_to_string(h.path("starts"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

fn wait_for_starts(h: &Host, n: usize, timeout: Duration) -> Vec<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = starts(h);
        if seen.len() >= n {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} starts within {timeout:?}: {seen:?}\n{}",
            seen.len(),
            h.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A long run, a step back of an hour, then a crash: restarted at once as the crash of a
/// started instance. Before issue 10 the shim's wall-clock exit time came out before its start
/// time, the run counted as 0 ms, a failed start, and with `start_retries = 0` the instance was
/// `fatal`.
#[test]
fn a_wall_clock_step_back_during_a_long_run_is_no_failed_start() {
    let Some((h, clock_file)) = faked_host(
        "long",
        "startup_ms = 1000\nstart_retries = 0\nbackoff_initial_ms = 30000\nbackoff_max_ms = 30000",
        "cat /proc/uptime >> \\\"$DIR/starts\\\"; exec sleep 3600",
    ) else {
        return;
    };
    let s = h.wait_until(|s| s.state("long", 0) == "running", PATIENCE);
    let pid = s.pid("long", 0).expect("a pid");
    h.note_pids(&[pid]);
    wait_for_starts(&h, 1, PATIENCE);
    // Past startup_ms on every clock, then an hour back.
    std::thread::sleep(Duration::from_millis(1500));
    step(&clock_file, -HOUR_S);
    let s = h.status();
    let uptime_ms = s.instance("long", 0)["uptime_ms"].as_u64().unwrap_or(0);
    assert!(
        (1500..HOUR_S as u64 * 1000).contains(&uptime_ms),
        "the uptime ignores the step: {s}"
    );
    // SAFETY: kill of the instance this test's daemon reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let s = h.wait_until(
        |s| s.pid("long", 0).is_some_and(|p| p != pid) || s.state("long", 0) == "fatal",
        PATIENCE,
    );
    let instance = s.instance("long", 0);
    assert_ne!(s.state("long", 0), "fatal", "{s}");
    assert_eq!(instance["failed_starts"], 0, "{s}");
    assert_eq!(instance["restarts"], 1, "{s}");
    if let Some(new) = s.pid("long", 0) {
        h.note_pids(&[new]);
    }
}

/// A crash loop with a 3 s backoff: a step forward of an hour during a failed start, then one
/// back during the backoff that follows, and the next start still waits for the whole backoff.
/// Before issue 10 the forward step made the 1.5 s run look an hour long: a started instance's
/// crash, restarted at once with its failure count reset.
#[test]
fn wall_clock_steps_during_a_crash_loop_keep_its_backoff() {
    const RUN_S: f64 = 1.5;
    const BACKOFF_S: f64 = 3.0;
    // The kill of a crashed instance and the spawn of the next take some time on a busy machine;
    // only the backoff's lower bound is a property of sluice.
    const SLACK_S: f64 = 0.3;
    let Some((h, clock_file)) = faked_host(
        "loop",
        "startup_ms = 5000\nstart_retries = 100\nbackoff_initial_ms = 3000\nbackoff_max_ms = 3000",
        "cat /proc/uptime >> \\\"$DIR/starts\\\"; sleep 1.5; exit 1",
    ) else {
        return;
    };
    let first = wait_for_starts(&h, 1, PATIENCE)[0];
    // During the run.
    step(&clock_file, HOUR_S);
    let s = h.wait_until(|s| s.state("loop", 0) == "backoff", PATIENCE);
    assert_eq!(s.instance("loop", 0)["failed_starts"], 1, "{s}");
    // During the backoff.
    step(&clock_file, -HOUR_S);
    let seen = wait_for_starts(&h, 2, PATIENCE);
    let gap = seen[1] - first;
    assert!(
        gap >= RUN_S + BACKOFF_S - SLACK_S,
        "the second start came {gap:.2} s after the first: the {BACKOFF_S} s backoff after a \
         {RUN_S} s failed start was skipped"
    );
    let s = h.status();
    assert!(
        s.instance("loop", 0)["failed_starts"].as_u64() >= Some(1),
        "{s}"
    );
}
