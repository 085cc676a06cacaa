//! CPU isolation of starting and stopping instances (issue 7): during a drain restart the new
//! process runs in its instance's cgroup, inside sluice's low-weight parent, while it starts and
//! warms up; once it is enabled it moves back beside the daemon and its cgroup goes. A first start
//! (no sibling to yield to) gets no cgroup. An old process whose drain left no connection moves
//! into that cgroup, its whole tree, for the first half of its stop's grace.
//! Needs root and the cgroup v1 `cpu` controller (CI has both); each test owns a cgroup parent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_tests::netns::Netns;
use sluice_tests::{Host, PATIENCE, Status, fixtures, procs, require_root};

/// Where the v1 `cpu` controller is mounted on the test machines.
const CPU_MOUNT: &str = "/sys/fs/cgroup/cpu";
/// How long the service sleeps before it listens: long enough to see it starting.
const START_DELAY_S: &str = "2";
/// The same for the test that restarts the daemon while instances start: room for a daemon start.
const SLOW_START_DELAY_S: &str = "6";
/// How long each warm-up request takes; the warm-up is 8 of them, one at a time.
const REQUEST_DELAY_S: &str = "0.25";
/// Longest wait for one restart of one slow-starting instance on a loaded machine.
const RESTART_PATIENCE: Duration = Duration::from_secs(90);

/// The cgroup parent one test owns, removed (children first) when the test ends, pass or fail.
struct CgroupParent {
    name: String,
    dir: PathBuf,
}

impl CgroupParent {
    /// `None` (after saying why) when the machine has no writable v1 `cpu` controller outside CI.
    fn new(tag: &str) -> Option<CgroupParent> {
        let present = Path::new(CPU_MOUNT).join("cpu.shares").exists();
        if !fixtures::require(
            "the cgroup v1 cpu controller at /sys/fs/cgroup/cpu",
            present,
        ) {
            return None;
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup");
        let own = own
            .lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == "cpu")
                    .then(|| path.to_owned())
            })
            .expect("a cpu line in /proc/self/cgroup");
        let name = format!("sluice-test-{tag}-{}", std::process::id());
        let dir = Path::new(CPU_MOUNT)
            .join(own.trim_start_matches('/'))
            .join(&name);
        Some(CgroupParent { name, dir })
    }

    fn instance(&self, service: &str, index: u32) -> PathBuf {
        self.dir.join(format!("{service}@{index}"))
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        // The instances' tracking cgroups (issue 10), named after the same parent, at the root
        // of the cgroup v2 hierarchy where the test machines run the tests.
        let tree = Path::new("/sys/fs/cgroup/unified").join(format!("{}-tree", self.name));
        if let Ok(entries) = std::fs::read_dir(&tree) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&tree);
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The cgroup of `pid` in the `cpu` hierarchy, as `/proc/<pid>/cgroup` names it.
fn cpu_cgroup_of(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "cpu")
            .then(|| path.to_owned())
    })
}

/// Whether `pid` runs inside the test's cgroup parent.
fn in_parent(pid: i32, parent: &CgroupParent) -> bool {
    cpu_cgroup_of(pid).is_some_and(|p| p.contains(&format!("/{}/", parent.name)))
}

/// `cpu.shares` of a cgroup, and whether it is idle (`cpu.idle` 1; absent on older kernels).
fn weight_of(dir: &Path) -> (u32, bool) {
    let shares = read(&dir.join("cpu.shares"))
        .parse()
        .expect("cpu.shares is a number");
    let idle = dir.join("cpu.idle");
    (shares, idle.exists() && read(&idle) == "1")
}

/// The lowest weight: shares at the minimum (an idle group reads as 3, the kernel's idle weight).
fn is_low(dir: &Path) -> bool {
    let (shares, idle) = weight_of(dir);
    shares <= 3 && (idle || !dir.join("cpu.idle").exists())
}

/// The low phase's bound of the tests that watch an instance stay low until it is enabled: longer
/// than any start here, so what they see is the enable, not the bound.
const LOW_MAX_MS: u64 = 120_000;

fn service(port_base: u16, front: u16, start_delay_s: &str, low_max_ms: u64) -> String {
    service_with_env(port_base, front, start_delay_s, low_max_ms, "")
}

/// [`service`] with more variables for the app (`, NAME = "value"` each).
fn service_with_env(
    port_base: u16,
    front: u16,
    start_delay_s: &str,
    low_max_ms: u64,
    more_env: &str,
) -> String {
    format!(
        r#"command = ["python3", "{app}", "{{port}}"]
instances = 2
port_base = {port_base}
front_port = {front}
startup_ms = 500
stop_grace_ms = 3000
env = {{ START_DELAY_S = "{start_delay_s}", REQUEST_DELAY_S = "{REQUEST_DELAY_S}"{more_env} }}
[restart]
strategy = "drain"
drain_timeout_ms = 1000
cpu_low_max_ms = {low_max_ms}
[health]
http = "/health"
start_timeout_ms = 30000
[warmup]
requests = ["GET /work"]
count = 8
concurrency = 1
"#,
        app = fixtures::dir().join("slow_start_app.py").display(),
    )
}

fn both_enabled(s: &Status) -> bool {
    let instances = s.instances("slow");
    instances.len() == 2
        && instances
            .iter()
            .all(|i| i["state"] == "running" && i["enabled"] == true)
        && !s.restart_in_progress("slow")
}

/// A host in `ns` with CPU isolation on, under the test's own cgroup parent.
fn host_with_cgroups(ns: &Netns, parent: &CgroupParent) -> Host {
    let h = Host::new().in_netns(ns);
    h.write_host_file(&format!(
        "data_dir = \"data\"\nruntime_dir = \"run\"\nservices_dir = \"services\"\nallow_root = true\ncgroups = \"auto\"\ncgroup_parent = \"{}\"\n",
        parent.name
    ));
    h
}

/// `sluice restart slow` in the background, its output dropped.
fn spawn_restart(h: &Host) -> std::process::Child {
    let mut cmd = h.sluice_command(&["restart", "slow"]);
    cmd.stdout(std::process::Stdio::null());
    cmd.stderr(std::process::Stdio::null());
    cmd.spawn().expect("spawning `sluice restart`")
}

#[track_caller]
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_starting_instance_runs_at_the_lowest_cpu_weight_until_it_is_enabled() {
    if !require_root() {
        return;
    }
    let Some(parent) = CgroupParent::new("drain") else {
        return;
    };
    let ns = Netns::new();
    let h = host_with_cgroups(&ns, &parent);
    h.service("slow", &service(9100, 9000, START_DELAY_S, LOW_MAX_MS));
    h.start_daemon();
    let before = h.wait_until(both_enabled, PATIENCE * 3);
    assert!(
        is_low(&parent.dir),
        "the parent: {:?}",
        weight_of(&parent.dir)
    );
    for i in 0..2 {
        let pid = before.pid("slow", i).expect("a pid");
        h.note_pids(&[pid]);
        assert!(
            !in_parent(pid, &parent),
            "a first start has no sibling to yield to: instance {i} (pid {pid}) runs outside: {:?}",
            cpu_cgroup_of(pid)
        );
        assert!(!parent.instance("slow", i).exists());
        assert!(
            before.instance("slow", i)["cgroup"].is_null(),
            "{}",
            before.instance("slow", i)
        );
    }
    assert!(
        before.service("slow")["cgroups_error"].is_null(),
        "{before}"
    );

    // A drain restart: each new process must be seen low while it starts (no listener yet) and
    // while it warms up, and normal once enabled.
    let restart = spawn_restart(&h);
    let mut restart = Guard(restart);
    let old: Vec<i32> = before.pids("slow").into_iter().flatten().collect();
    let mut seen_starting = [false; 2];
    let mut seen_warming = [false; 2];
    let deadline = Instant::now() + RESTART_PATIENCE * 2;
    loop {
        let s = h.status();
        for i in 0..2u32 {
            let inst = s.instance("slow", i);
            let Some(pid) = s.pid("slow", i) else {
                continue;
            };
            if old.contains(&pid) || inst["enabled"] == true {
                continue;
            }
            h.note_pids(&[pid]);
            let dir = parent.instance("slow", i);
            let Some(cgroup) = cpu_cgroup_of(pid) else {
                continue;
            };
            // Re-read the status after the cgroup and the weight: an enable (which moves the
            // instance out) may land between the reads.
            let low = dir.exists() && is_low(&dir);
            let again = h.status();
            if again.pid("slow", i) != Some(pid) || again.instance("slow", i)["enabled"] == true {
                continue;
            }
            assert!(
                cgroup.ends_with(&format!("/{}/slow@{i}", parent.name)),
                "new instance {i} (pid {pid}) runs in its cgroup from its first instruction: {cgroup}"
            );
            assert!(
                low,
                "starting/warming instance {i}: {:?}\n{s}",
                weight_of(&dir)
            );
            assert_eq!(again.instance("slow", i)["cpu_weight"], "low", "{again}");
            match again.service("slow")["restart"]["step"].as_str() {
                Some("warming") => seen_warming[i as usize] = true,
                Some("starting" | "checking") => seen_starting[i as usize] = true,
                _ => {}
            }
        }
        if both_enabled(&s) && s.pids("slow").iter().flatten().all(|p| !old.contains(p)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restart not done in time\n{s}\n{}",
            h.daemon_log_tail()
        );
        std::thread::sleep(Duration::from_millis(40));
    }
    let code = restart.0.wait().expect("waiting for `sluice restart`");
    assert!(code.success(), "sluice restart: {code}");
    assert_eq!(
        seen_starting,
        [true, true],
        "each new instance was seen starting at low weight"
    );
    assert_eq!(
        seen_warming,
        [true, true],
        "each new instance was seen warming at low weight"
    );

    // Enabled: back beside the daemon, and the instance cgroups are gone.
    let after = h.status();
    for i in 0..2 {
        let dir = parent.instance("slow", i);
        wait_for(
            &format!("{} removed once enabled", dir.display()),
            PATIENCE,
            || !dir.exists(),
        );
        let pid = after.pid("slow", i).expect("a pid");
        assert!(
            !in_parent(pid, &parent),
            "enabled instance {i} (pid {pid}) left sluice's cgroups: {:?}",
            cpu_cgroup_of(pid)
        );
    }
    h.sluice(&["stop", "slow"]).success();
}

/// A brain killed while a restarted instance starts re-applies the low weight from the instance's
/// state, and moves it out once it is enabled.
#[test]
fn a_restarted_daemon_reapplies_the_weight_from_the_instance_state() {
    if !require_root() {
        return;
    }
    let Some(parent) = CgroupParent::new("kill9") else {
        return;
    };
    let ns = Netns::new();
    let h = host_with_cgroups(&ns, &parent);
    h.service("slow", &service(9100, 9000, SLOW_START_DELAY_S, LOW_MAX_MS));
    h.start_daemon();
    let before = h.wait_until(both_enabled, PATIENCE * 4);
    let old: Vec<i32> = before.pids("slow").into_iter().flatten().collect();
    let restart = spawn_restart(&h);
    let _restart = Guard(restart);
    // The first batch's new process starts slowly: kill the brain while it does, and lift the
    // weight behind its back, as a stale value a new brain must not trust.
    let dir = parent.instance("slow", 0);
    wait_for(
        "instance 0 restarted into its cgroup",
        RESTART_PATIENCE,
        || {
            h.status()
                .pid("slow", 0)
                .is_some_and(|pid| !old.contains(&pid) && in_parent(pid, &parent))
                && dir.exists()
                && is_low(&dir)
        },
    );
    h.kill9_daemon();
    let _ = std::fs::write(dir.join("cpu.idle"), "0");
    std::fs::write(dir.join("cpu.shares"), "1024").expect("writing cpu.shares");
    h.start_daemon();
    wait_for("the new daemon lowers the weight again", PATIENCE, || {
        !dir.exists() || is_low(&dir)
    });
    let after = h.wait_until(
        |s| both_enabled(s) && s.pids("slow").iter().flatten().all(|p| !old.contains(p)),
        RESTART_PATIENCE * 2,
    );
    for i in 0..2 {
        let dir = parent.instance("slow", i);
        wait_for("cgroup removed once enabled", PATIENCE, || !dir.exists());
        let pid = after.pid("slow", i).expect("a pid");
        h.note_pids(&[pid]);
        assert!(!in_parent(pid, &parent), "{:?}", cpu_cgroup_of(pid));
    }
    h.sluice(&["stop", "slow"]).success();
}

/// Kills and reaps the `sluice restart` child if the test fails before it finishes.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The low phase is bounded (`restart.cpu_low_max_ms`): an instance that is still starting when
/// the bound passes leaves its cgroup and runs at the weight of any other process, so a saturated
/// host cannot starve its start into a failed batch.
#[test]
fn the_low_phase_ends_at_its_bound_even_before_the_instance_is_enabled() {
    const LOW_MAX_MS: u64 = 3_000;
    if !require_root() {
        return;
    }
    let Some(parent) = CgroupParent::new("bound") else {
        return;
    };
    let ns = Netns::new();
    let h = host_with_cgroups(&ns, &parent);
    h.service("slow", &service(9100, 9000, SLOW_START_DELAY_S, LOW_MAX_MS));
    h.start_daemon();
    let before = h.wait_until(both_enabled, PATIENCE * 4);
    let old: Vec<i32> = before.pids("slow").into_iter().flatten().collect();
    let restart = spawn_restart(&h);
    let mut restart = Guard(restart);
    // The first batch's new process starts in its cgroup, at the low weight...
    let dir = parent.instance("slow", 0);
    let mut new_pid = None;
    wait_for(
        "instance 0 restarted into its cgroup",
        RESTART_PATIENCE,
        || {
            new_pid = h
                .status()
                .pid("slow", 0)
                .filter(|pid| !old.contains(pid) && in_parent(*pid, &parent));
            new_pid.is_some()
        },
    );
    let pid = new_pid.expect("seen above");
    h.note_pids(&[pid]);
    // ...and leaves it once the bound has passed, while it still sleeps before it listens (6 s).
    wait_for(
        "instance 0 out of its cgroup after the bound",
        Duration::from_millis(LOW_MAX_MS) + PATIENCE,
        || !in_parent(pid, &parent) && !dir.exists(),
    );
    let s = h.status();
    assert_eq!(s.pid("slow", 0), Some(pid), "the same process\n{s}");
    assert_ne!(
        s.instance("slow", 0)["enabled"],
        true,
        "it left at the bound, before it was enabled (the start sleeps {SLOW_START_DELAY_S} s)\n{s}"
    );
    assert!(s.instance("slow", 0)["cpu_weight"].is_null(), "{s}");
    // The restart completes as usual.
    let code = restart.0.wait().expect("waiting for `sluice restart`");
    assert!(
        code.success(),
        "sluice restart: {code}\n{}",
        h.daemon_log_tail()
    );
    h.wait_until(both_enabled, PATIENCE * 2);
    h.sluice(&["stop", "slow"]).success();
}

/// A drained instance with no connection left stops at the lowest weight, its child with it, for
/// the first half of `stop_grace_ms` (3 s here); past that its stop (2.5 s) ends at the normal
/// weight, and the restart goes on as usual.
#[test]
fn a_stop_with_nothing_left_to_serve_runs_at_the_lowest_weight_for_half_its_grace() {
    if !require_root() {
        return;
    }
    let Some(parent) = CgroupParent::new("stop") else {
        return;
    };
    let ns = Netns::new();
    let h = host_with_cgroups(&ns, &parent);
    h.service(
        "slow",
        &service_with_env(
            9100,
            9000,
            "0",
            LOW_MAX_MS,
            r#", STOP_DELAY_S = "2.5", CHILD = "1""#,
        ),
    );
    h.start_daemon();
    let before = h.wait_until(both_enabled, PATIENCE * 3);
    let old = before.pid("slow", 0).expect("a pid");
    let tree = descendants(old);
    assert_eq!(tree.len(), 2, "the app and its child: {tree:?}");
    h.note_pids(&tree);
    assert!(tree.iter().all(|p| !in_parent(*p, &parent)));
    let dir = parent.instance("slow", 0);

    let restart = spawn_restart(&h);
    let mut restart = Guard(restart);
    // Low while it stops: the app and its child in the instance's cgroup, and status says so.
    wait_for(
        "instance 0's old tree in its cgroup at the low weight while it stops",
        RESTART_PATIENCE,
        || {
            let s = h.status();
            s.pid("slow", 0) == Some(old)
                && s.instance("slow", 0)["state"] == "stopping"
                && s.instance("slow", 0)["cpu_weight"] == "low"
                && tree.iter().all(|p| in_parent(*p, &parent))
                && dir.exists()
                && is_low(&dir)
        },
    );
    let s = h.status();
    assert_eq!(
        s.instance("slow", 0)["last_drain"]["ending"],
        "closed",
        "{s}"
    );
    // Past half the grace, still stopping (the exit takes 2.5 s), out of the cgroup.
    wait_for(
        "instance 0's old tree back at the normal weight before its stop ends",
        Duration::from_secs(3) + PATIENCE,
        || {
            // A process that has exited is in no cgroup either: out and still alive.
            let alive = std::fs::metadata(format!("/proc/{old}")).is_ok();
            alive && cpu_cgroup_of(old).is_some() && !in_parent(old, &parent)
        },
    );
    let s = h.status();
    if s.pid("slow", 0) == Some(old) {
        assert!(s.instance("slow", 0)["cpu_weight"].is_null(), "{s}");
    }
    let code = restart.0.wait().expect("waiting for `sluice restart`");
    assert!(
        code.success(),
        "sluice restart: {code}\n{}",
        h.daemon_log_tail()
    );
    let after = h.wait_until(both_enabled, PATIENCE * 2);
    for i in 0..2 {
        let dir = parent.instance("slow", i);
        wait_for("cgroup removed once enabled", PATIENCE, || !dir.exists());
        let pid = after.pid("slow", i).expect("a pid");
        assert!(!tree.contains(&pid), "a new process");
        h.note_pids(&[pid]);
        assert!(!in_parent(pid, &parent), "{:?}", cpu_cgroup_of(pid));
    }
    h.sluice(&["stop", "slow"]).success();
}

/// A daemon killed while an instance stops at the low weight: the next daemon adopts the stop,
/// which it did not lower (it saw no drain), and moves the stopping tree back to the normal weight
/// at once. Nothing is left starved by a daemon that is no longer there to end the low phase. The
/// stop here (6 s) outlasts its half grace (5 s): a tree left low would stay low until it exits.
#[test]
fn a_stop_lowered_by_a_daemon_that_died_is_raised_by_the_next() {
    if !require_root() {
        return;
    }
    let Some(parent) = CgroupParent::new("stopkill") else {
        return;
    };
    let ns = Netns::new();
    let h = host_with_cgroups(&ns, &parent);
    let service = service_with_env(
        9100,
        9000,
        "0",
        LOW_MAX_MS,
        r#", STOP_DELAY_S = "6", CHILD = "1""#,
    )
    .replace("stop_grace_ms = 3000", "stop_grace_ms = 10000");
    h.service("slow", &service);
    h.start_daemon();
    let before = h.wait_until(both_enabled, PATIENCE * 3);
    let old = before.pid("slow", 0).expect("a pid");
    let tree = descendants(old);
    assert_eq!(tree.len(), 2, "the app and its child: {tree:?}");
    h.note_pids(&tree);
    let dir = parent.instance("slow", 0);

    let restart = Guard(spawn_restart(&h));
    wait_for(
        "instance 0's old tree at the low weight while it stops",
        RESTART_PATIENCE,
        || {
            let s = h.status();
            s.pid("slow", 0) == Some(old)
                && s.instance("slow", 0)["state"] == "stopping"
                && s.instance("slow", 0)["cpu_weight"] == "low"
                && tree.iter().all(|p| in_parent(*p, &parent))
                && is_low(&dir)
        },
    );
    h.kill9_daemon();
    drop(restart);
    assert!(
        tree.iter().all(|p| in_parent(*p, &parent)),
        "still low once the daemon is gone"
    );
    h.start_daemon();
    wait_for(
        "the adopted stop's tree back at the normal weight while it still stops",
        PATIENCE,
        || {
            let alive: Vec<i32> = tree
                .iter()
                .copied()
                .filter(|p| procs::is_live(*p))
                .collect();
            !alive.is_empty()
                && alive.len() == tree.len()
                && alive
                    .iter()
                    .all(|p| cpu_cgroup_of(*p).is_some() && !in_parent(*p, &parent))
        },
    );
    let s = h.status();
    if s.pid("slow", 0) == Some(old) {
        assert!(s.instance("slow", 0)["cpu_weight"].is_null(), "{s}");
    }
    // The restart the first daemon began is carried on to its end.
    let after = h.wait_until(both_enabled, RESTART_PATIENCE);
    for i in 0..2 {
        let dir = parent.instance("slow", i);
        wait_for("cgroup removed once enabled", PATIENCE, || !dir.exists());
        let pid = after.pid("slow", i).expect("a pid");
        assert!(!tree.contains(&pid), "a new process");
        h.note_pids(&[pid]);
    }
    h.sluice(&["stop", "slow"]).success();
}

/// `pid` and its live descendants, by their parents in one scan of `/proc`.
fn descendants(pid: i32) -> Vec<i32> {
    let all = procs::all();
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        next += 1;
        found.extend(
            all.iter()
                .filter(|p| p.ppid == parent && p.live())
                .map(|p| p.pid),
        );
    }
    found
}
