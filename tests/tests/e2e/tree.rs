//! An instance's whole process tree dies with it (issue 10): after a `kill -9` of a shim whose
//! instance left a plain background child and a `setsid` grandchild, the brain's recovery (a new
//! shim) kills every survivor before the new instance starts, so exactly one copy runs.
//! Needs root (tracking cgroups); CI runs it as root.

use std::path::Path;
use std::time::Duration;

use sluice_tests::{Host, PATIENCE, procs, require_root};

/// The instance: records its own pid and those of a background child and of a `setsid`
/// grandchild (one line per start), then sleeps; all three carry `TREE_MARKER` in their
/// environment, which is how the test counts copies.
const INSTANCE_SH: &str = r#"echo $$ >> "$DIR/main.pids"
sh -c 'echo $$ >> "$DIR/bg.pids"; exec sleep 3600' &
setsid sh -c 'echo $$ >> "$DIR/setsid.pids"; exec sleep 3600' &
exec sleep 3600
"#;

/// The pids in one of the instance's pid files, one per start.
fn pids(dir: &Path, name: &str) -> Vec<i32> {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits until each pid file has `starts` lines; returns the pids of the last start.
fn wait_for_start(dir: &Path, starts: usize) -> [i32; 3] {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let all = ["main.pids", "bg.pids", "setsid.pids"].map(|f| pids(dir, f));
        if all.iter().all(|p| p.len() >= starts) {
            return all.map(|p| p[starts - 1]);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "start {starts} of the instance did not record its tree: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live processes of the instance: those whose environment carries the test's marker, except
/// the shims (a shim gets the instance's environment too).
fn marked(marker: &str) -> Vec<procs::Proc> {
    let wanted = format!("TREE_MARKER={marker}");
    procs::all()
        .into_iter()
        .filter(|p| p.live())
        .filter(|p| {
            !p.cmdline
                .first()
                .is_some_and(|a| a.ends_with("sluice-shim"))
        })
        .filter(|p| procs::environ(p.pid).is_some_and(|env| env.contains(&wanted)))
        .collect()
}

#[test]
fn kill9_of_a_shim_leaves_no_survivor_of_its_tree_and_one_copy_runs() {
    if !require_root() {
        return;
    }
    let h = Host::new();
    let dir = h.path("pids");
    std::fs::create_dir_all(&dir).unwrap();
    let script = h.path("instance.sh");
    std::fs::write(&script, INSTANCE_SH).unwrap();
    let marker = format!("tree-{}", std::process::id());
    h.service(
        "tree",
        &format!(
            r#"
command = ["/bin/sh", "{script}"]
startup_ms = 300
stop_grace_ms = 2000
env = {{ PATH = "/usr/bin:/bin", DIR = "{dir}", TREE_MARKER = "{marker}" }}
"#,
            script = script.display(),
            dir = dir.display(),
        ),
    );
    h.start_daemon();
    let s = h.wait_until(|s| s.state("tree", 0) == "running", PATIENCE);
    assert_eq!(
        s.service("tree")["tree_error"],
        serde_json::Value::Null,
        "tracking cgroups work as root: {s}"
    );
    let old = wait_for_start(&dir, 1);
    assert_eq!(Some(old[0]), s.pid("tree", 0), "{s}");
    let old: Vec<procs::Proc> = old
        .iter()
        .map(|&pid| procs::get(pid).unwrap_or_else(|| panic!("process {pid} of start 1 is gone")))
        .collect();
    h.note_pids(&old.iter().map(|p| p.pid).collect::<Vec<_>>());
    assert_eq!(
        marked(&marker).len(),
        3,
        "one copy: instance, child, grandchild"
    );

    let shim = s.shim_pid("tree", 0).expect("a shim pid");
    // SAFETY: kill of the shim this test's daemon reported for its instance.
    unsafe { libc::kill(shim, libc::SIGKILL) };

    // The brain sees its shim gone, and starts the instance again through a new shim.
    let s = h.wait_until(
        |s| {
            s.state("tree", 0) == "running"
                && s.pid("tree", 0).is_some_and(|p| p != old[0].pid)
                && s.shim_pid("tree", 0).is_some_and(|p| p != shim)
        },
        PATIENCE,
    );
    let new = wait_for_start(&dir, 2);
    assert_eq!(Some(new[0]), s.pid("tree", 0), "{s}");
    for p in &old {
        let same = procs::get(p.pid).filter(|now| now.starttime == p.starttime);
        assert!(
            !same.is_some_and(|now| now.live()),
            "process {} of the killed shim's tree ({}) survived beside the new instance",
            p.pid,
            p.cmdline.join(" ")
        );
    }
    let copies: Vec<i32> = marked(&marker).iter().map(|p| p.pid).collect();
    let mut want = new.to_vec();
    want.sort_unstable();
    let mut got = copies.clone();
    got.sort_unstable();
    assert_eq!(got, want, "exactly the new instance's tree runs");
    let instance = s.instance("tree", 0);
    assert_eq!(instance["restarts"], 1, "{s}");
    assert_eq!(instance["failed_starts"], 0, "{s}");

    // A normal stop takes the setsid grandchild with it too.
    h.note_pids(&new);
    h.sluice(&["stop", "tree"]).success();
    let left = marked(&marker);
    assert!(
        left.is_empty(),
        "left after `sluice stop`: {:?}",
        left.iter()
            .map(|p| (p.pid, p.cmdline.join(" ")))
            .collect::<Vec<_>>()
    );
}
