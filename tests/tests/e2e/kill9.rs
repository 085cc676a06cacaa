//! The kill -9 test: the daemon is SIGKILLed and restarted 20 times at random moments, while one
//! service is being restarted. Afterwards every instance runs exactly once, under exactly one shim;
//! instances nobody asked to restart kept their process and lost no line of output.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sluice_tests::{CLI_TIMEOUT, Host, PATIENCE, Rng, Status, procs, run_bounded};

const SERVICES: [&str; 3] = ["a", "b", "c"];
const INSTANCES: u32 = 4;
const ROUNDS: usize = 20;

/// Prints 0, 1, 2, … one line every 20 ms, flushing each, so a gap or a repeat in the log shows a
/// lost or restarted process. `{service}` and `{instance}` are arguments only so that the process
/// can be found in /proc.
const COUNTER_PY: &str = r#"import sys, time
i = 0
while True:
    sys.stdout.write("%d\n" % i)
    sys.stdout.flush()
    i += 1
    time.sleep(0.02)
"#;

/// Sets the flag when dropped, so the background restarter stops even when the test panics
/// (otherwise the thread scope would wait for it forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn kill9_of_the_daemon_during_a_restart_loses_and_duplicates_nothing() {
    let h = Host::new();
    let counter = h.path("counter.py");
    std::fs::write(&counter, COUNTER_PY).unwrap();
    let counter = counter.to_string_lossy().into_owned();
    for name in SERVICES {
        h.service(
            name,
            &r#"
command = ["/usr/bin/python3", "COUNTER", "{service}", "{instance}"]
instances = 4
startup_ms = 200
stop_grace_ms = 3000
"#
            .replace("COUNTER", &counter),
        );
    }
    h.start_daemon();
    let before = h.wait_until(|s| SERVICES.iter().all(|n| s.all_running(n, 4)), PATIENCE);

    let seed = Rng::seed_from_env();
    println!("seed {seed} (replay with SLUICE_E2E_SEED={seed})");
    let mut rng = Rng::new(seed);
    let stop = AtomicBool::new(false);
    let restarts = std::thread::scope(|scope| {
        let _stop_restarter = StopOnDrop(&stop);
        // `sluice restart b` over and over: most runs are cut short by a kill of the daemon and
        // fail, which is expected; the restart itself is persisted and resumed by the next daemon.
        let restarter = scope.spawn(|| {
            let mut codes = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let out = run_bounded(h.sluice_command(&["restart", "b"]), CLI_TIMEOUT)
                    .unwrap_or_else(|e| panic!("{e}"));
                if out.code != Some(0) {
                    // Daemon down or starting: do not spin.
                    std::thread::sleep(Duration::from_millis(20));
                }
                codes.push(out.code);
            }
            codes
        });
        for round in 0..ROUNDS {
            let delay_ms = rng.range(50, 400);
            std::thread::sleep(Duration::from_millis(delay_ms));
            if let Some(status) = h.daemon_exit_status() {
                panic!(
                    "round {round}: the daemon exited on its own ({status})\n{}",
                    h.daemon_log_tail()
                );
            }
            h.kill9_daemon();
            h.spawn_daemon(&[]);
        }
        h.wait_reachable(PATIENCE);
        stop.store(true, Ordering::SeqCst);
        restarter.join().expect("the restarter thread")
    });
    println!("`sluice restart b` exit codes during the loop: {restarts:?}");

    // Let the last daemon finish the restart the loop left (it resumes it), then restart once
    // more, to completion.
    let settled =
        |s: &Status| SERVICES.iter().all(|n| s.all_running(n, 4)) && !s.restart_in_progress("b");
    h.wait_until(settled, PATIENCE);
    h.sluice(&["restart", "b"]).success();
    let after = h.wait_until(settled, PATIENCE);

    // Exactly one live instance process and one live shim per configured instance, found in /proc.
    let all = procs::all();
    let mut instances: BTreeMap<(String, u32), Vec<i32>> = BTreeMap::new();
    for p in all
        .iter()
        .filter(|p| p.live() && p.cmdline.get(1) == Some(&counter))
    {
        let key = (p.cmdline[2].clone(), p.cmdline[3].parse().unwrap());
        instances.entry(key).or_default().push(p.pid);
    }
    let root = h.root().to_string_lossy().into_owned();
    let mut shims: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for p in all.iter().filter(|p| {
        p.live()
            && p.cmdline
                .first()
                .is_some_and(|c| c.ends_with("sluice-shim"))
            && p.cmdline.iter().any(|a| a.contains(&root))
    }) {
        let id = p
            .cmdline
            .iter()
            .skip_while(|a| *a != "--id")
            .nth(1)
            .expect("a shim has --id")
            .clone();
        shims.entry(id).or_default().push(p.pid);
    }
    let procs_by_pid: BTreeMap<i32, &procs::Proc> = all.iter().map(|p| (p.pid, p)).collect();
    assert_eq!(
        instances.len(),
        SERVICES.len() * INSTANCES as usize,
        "instance processes: {instances:?}"
    );
    assert_eq!(
        shims.len(),
        SERVICES.len() * INSTANCES as usize,
        "shims: {shims:?}"
    );
    for name in SERVICES {
        for i in 0..INSTANCES {
            let found = &instances[&(name.to_owned(), i)];
            assert_eq!(
                found.len(),
                1,
                "{name}/{i} runs {} times: {found:?}",
                found.len()
            );
            let shim = &shims[&format!("{name}/{i}")];
            assert_eq!(
                shim.len(),
                1,
                "{name}/{i} has {} shims: {shim:?}",
                shim.len()
            );
            let (pid, shim_pid) = (found[0], shim[0]);
            assert_eq!(
                procs_by_pid[&pid].ppid, shim_pid,
                "{name}/{i}: the instance's parent is not its shim"
            );
            assert_eq!(
                after.pid(name, i),
                Some(pid),
                "{name}/{i} in status\n{after}"
            );
            assert_eq!(
                after.shim_pid(name, i),
                Some(shim_pid),
                "{name}/{i}\n{after}"
            );
        }
    }
    // Nobody asked to restart a and c: same processes as before the loop. b was restarted.
    for name in ["a", "c"] {
        assert_eq!(after.pids(name), before.pids(name), "{name} was restarted");
        assert_eq!(
            after.shim_pids(name),
            before.shim_pids(name),
            "{name}'s shims"
        );
    }
    for i in 0..INSTANCES {
        assert_ne!(
            after.pid("b", i),
            before.pid("b", i),
            "b/{i} was not restarted"
        );
    }

    // No line of a and c was lost or repeated, and the shims still write new lines.
    for name in ["a", "c"] {
        for i in 0..INSTANCES {
            let lines = assert_counter_log(&h, name, i);
            h.wait_for_log(name, i, |t| t.lines().count() > lines + 5, PATIENCE);
            assert_counter_log(&h, name, i);
        }
    }
}

/// Checks that the complete lines of the log are exactly 0, 1, 2, …; returns how many there are.
#[track_caller]
fn assert_counter_log(h: &Host, service: &str, index: u32) -> usize {
    let text = h.read_log(service, index);
    // The last line may be half written while we read.
    let complete = &text[..text.rfind('\n').map_or(0, |n| n + 1)];
    let lines: Vec<&str> = complete.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        if *line != n.to_string() {
            let from = n.saturating_sub(3);
            panic!(
                "{service}/{index}: line {n} is {line:?}, expected {n}; around it: {:?}",
                &lines[from..(n + 3).min(lines.len())]
            );
        }
    }
    // The loop alone lasts seconds, at 50 lines a second.
    assert!(
        lines.len() > 100,
        "{service}/{index}: only {} lines",
        lines.len()
    );
    lines.len()
}
