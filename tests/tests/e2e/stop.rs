//! Stopping an instance that ignores SIGTERM: after `stop_grace_ms` its whole process group is
//! SIGKILLed, grandchildren included, and `sluice stop` returns.

use std::time::Duration;

use sluice_tests::{Host, PATIENCE, procs};

#[test]
fn stop_kills_the_whole_group_of_an_instance_that_ignores_term() {
    let h = Host::new();
    // The shell ignores TERM, and so do its two background sleeps (an ignored signal stays
    // ignored across fork and exec): only the SIGKILL to the group can end them.
    h.service(
        "stubborn",
        r#"
command = ["/bin/sh", "-c", "trap '' TERM; sleep 1000 & sleep 1000 & wait"]
stop_grace_ms = 500
env = { PATH = "/usr/bin:/bin" }
"#,
    );
    h.start_daemon();
    let s = h.wait_until(|s| s.running("stubborn") == 1, PATIENCE);
    let pid = s.pid("stubborn", 0).unwrap();
    assert_eq!(
        procs::get(pid).unwrap().pgid,
        pid,
        "the instance leads its group"
    );

    // Wait for the grandchildren to exist before stopping, or there is nothing to prove.
    let deadline = std::time::Instant::now() + PATIENCE;
    let group = loop {
        let group = procs::live_in_group(pid);
        if group.len() >= 3 {
            break group;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "group {pid}: {group:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    h.note_pids(&group.iter().map(|p| p.pid).collect::<Vec<_>>());

    let out = h.sluice(&["stop", "stubborn"]).success();
    // The grace is 0.5 s; "a few seconds" leaves room for a loaded machine.
    assert!(out.elapsed < Duration::from_secs(5), "{out}");
    assert!(
        out.elapsed >= Duration::from_millis(400),
        "stop returned before the grace ran out, so TERM was not ignored? {out}"
    );
    let left = procs::live_in_group(pid);
    assert!(left.is_empty(), "still alive in group {pid}: {left:?}");

    let s = h.status();
    let i = s.instance("stubborn", 0);
    assert_eq!(i["state"], "stopped", "{s}");
    assert_eq!(i["desired"], "down", "{s}");
    assert_eq!(i["pid"], serde_json::Value::Null, "{s}");
    let last_exit = i["last_exit"].as_str().unwrap_or("");
    assert!(last_exit.contains("KILL"), "last_exit: {last_exit:?}\n{s}");
}
