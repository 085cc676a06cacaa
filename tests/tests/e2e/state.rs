//! Faults around a service's state and its waits (issue 10): a state file that cannot be read
//! costs its one service (`state_error`, instances adopted and left alone, the file set aside);
//! a service removed and added back has one owner at a time; a stop or a restart whose chain
//! cannot be written ends at `restart.steer_timeout_ms`; `logs -f` ends with its client.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use sluice_tests::netns::Netns;
use sluice_tests::{CLI_TIMEOUT, Host, PATIENCE, Rng, Status, procs, require_root, run_bounded};

/// A service of `instances` sleepers on ports from `port_base`.
fn sleeper(instances: u32, port_base: u16) -> String {
    format!(
        "command = [\"/bin/sleep\", \"1000\"]\ninstances = {instances}\nport_base = {port_base}\nstop_grace_ms = 2000\n"
    )
}

/// A one-instance HTTP server that answers `GET /` on `port`.
fn http_server(port: u16) -> String {
    format!(
        "command = [\"/usr/bin/python3\", \"-m\", \"http.server\", \"--bind\", \"127.0.0.1\", \"{port}\", \"--directory\", \"/\"]\ninstances = 1\nport_base = {port}\nstop_grace_ms = 2000\n[health]\nhttp = \"/\"\nstart_timeout_ms = 20000\n"
    )
}

/// `GET /` on loopback `port` answers 200.
fn serves(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.0 200")
}

fn state_file(h: &Host, service: &str) -> std::path::PathBuf {
    h.path(&format!("data/state/{service}.json"))
}

/// The names `<service>.json.bad-*` in the state directory.
fn set_aside(h: &Host, service: &str) -> Vec<String> {
    let prefix = format!("{service}.json.bad-");
    let Ok(entries) = std::fs::read_dir(h.path("data/state")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort();
    names
}

fn state_error(s: &Status, service: &str) -> Option<String> {
    s.service(service)["state_error"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn a_bad_state_file_costs_its_one_service_and_reload_clears_it() {
    let h = Host::new();
    let base = sluice_tests::free_port_base(12);
    let web_port = base;
    // One good service that serves, three whose state file goes bad, one from a newer version.
    let bad = ["corrupt", "truncated", "linked"];
    h.service("web", &http_server(web_port));
    for (n, name) in bad.iter().chain(["newer"].iter()).enumerate() {
        h.service(name, &sleeper(2, base + 2 + 2 * n as u16));
    }
    h.start_daemon();
    let all = ["web", "corrupt", "truncated", "linked", "newer"];
    let before = h.wait_until(
        |s| s.all_running("web", 1) && bad.iter().all(|n| s.all_running(n, 2)),
        PATIENCE,
    );
    // Every service has a state file once an operator verb wrote one.
    for name in all {
        h.sluice(&["start", name]).success();
    }
    let good_state = std::fs::read(state_file(&h, "corrupt")).expect("a state file was written");
    h.kill9_daemon();

    std::fs::write(state_file(&h, "corrupt"), b"{\"stopped\": [1,").unwrap();
    std::fs::write(
        state_file(&h, "truncated"),
        &good_state[..good_state.len() / 2],
    )
    .unwrap();
    let target = h.path("not-a-state-file");
    std::fs::write(&target, b"{}\n").unwrap();
    std::fs::remove_file(state_file(&h, "linked")).unwrap();
    std::os::unix::fs::symlink(&target, state_file(&h, "linked")).unwrap();
    // A newer version's fields are ignored; what this version knows is obeyed.
    std::fs::write(
        state_file(&h, "newer"),
        br#"{"stopped": [], "drained": [], "written_by": "sluice 9", "lanes": {"a": [1, 2]}}"#,
    )
    .unwrap();

    h.start_daemon();
    let after = h.wait_until(
        |s| {
            s.all_running("web", 1)
                && s.all_running("newer", 2)
                && bad.iter().all(|n| state_error(s, n).is_some())
        },
        PATIENCE,
    );
    assert!(serves(web_port), "web does not serve\n{after}");
    assert_eq!(state_error(&after, "web"), None, "{after}");
    assert_eq!(state_error(&after, "newer"), None, "{after}");
    assert_eq!(after.pids("newer"), before.pids("newer"), "{after}");
    for name in bad {
        let error = state_error(&after, name).unwrap();
        let file = state_file(&h, name).display().to_string();
        assert!(error.contains(&file), "{name}: {error}");
        let aside = set_aside(&h, name);
        assert_eq!(aside.len(), 1, "{name}: {aside:?}");
        assert!(error.contains(&aside[0]), "{name}: {error}");
        // Adopted, not restarted: the same processes.
        assert_eq!(after.pids(name), before.pids(name), "{name}\n{after}");
        assert!(after.all_running(name, 2), "{name}\n{after}");
    }
    assert!(
        state_error(&after, "linked")
            .unwrap()
            .contains("a symbolic link"),
        "{after}"
    );
    assert!(
        state_error(&after, "corrupt")
            .unwrap()
            .contains("is corrupt"),
        "{after}"
    );
    // The link was set aside, never followed.
    assert_eq!(std::fs::read(&target).unwrap(), b"{}\n");
    let aside = h.path(&format!("data/state/{}", set_aside(&h, "linked")[0]));
    assert!(
        std::fs::symlink_metadata(&aside)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // The plain status names it too.
    let table = h.sluice(&["status"]).success();
    assert!(
        table.stdout.contains("state_error") || table.stdout.contains("corrupt.json"),
        "{table}"
    );

    // An exit in state_error is seen and recorded, and nothing is started in its place.
    let pid = after.pid("corrupt", 1).unwrap();
    // SAFETY: kill has no memory preconditions; the pid is the instance's, just read.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let exited = h.wait_until(|s| s.state("corrupt", 1) == "exited", PATIENCE);
    std::thread::sleep(Duration::from_secs(2));
    let still = h.status();
    assert_eq!(still.state("corrupt", 1), "exited", "{still}");
    assert_eq!(
        still.pid("corrupt", 0),
        before.pid("corrupt", 0),
        "{exited}"
    );
    // Verbs that need the desired state are refused, naming the state error.
    let out = h.sluice(&["stop", "corrupt"]).code(1);
    assert!(out.stderr.contains("state_error"), "{out}");

    // A new daemon finds the record of the error in place of the file: still state_error, and
    // nothing set aside again.
    h.kill9_daemon();
    h.start_daemon();
    let again = h.wait_until(|s| s.all_running("web", 1), PATIENCE);
    for name in bad {
        assert!(state_error(&again, name).is_some(), "{name}\n{again}");
        assert_eq!(set_aside(&h, name).len(), 1, "{name}");
    }
    assert_eq!(again.pid("corrupt", 0), before.pid("corrupt", 0), "{again}");
    assert_eq!(again.state("corrupt", 1), "stopped", "{again}");

    // The operator removes the file (every instance up, nothing pending) and reloads.
    std::fs::remove_file(state_file(&h, "corrupt")).unwrap();
    let out = h.sluice(&["reload"]).success();
    assert!(out.stdout.contains("corrupt: state file read"), "{out}");
    let cleared = h.wait_until(|s| s.all_running("corrupt", 2), PATIENCE);
    assert_eq!(state_error(&cleared, "corrupt"), None, "{cleared}");
    assert_eq!(
        cleared.pid("corrupt", 0),
        before.pid("corrupt", 0),
        "{cleared}"
    );
    assert!(state_error(&cleared, "truncated").is_some(), "{cleared}");
    h.sluice(&["stop", "corrupt/1"]).success();
}

/// `(task started lines, task ended lines)` of `service` in order, and every pid whose exit the
/// daemon handled, with how often.
fn owners_and_exits(log: &str, service: &str) -> (Vec<(bool, u64)>, BTreeMap<u32, usize>) {
    let mut tasks = Vec::new();
    let mut exits: BTreeMap<u32, usize> = BTreeMap::new();
    let field = |line: &str, key: &str| -> Option<u64> {
        line.split(&format!(" {key}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let named = format!("service={service} ");
    for line in log.lines() {
        if !line.contains(&named) && !line.ends_with(&format!("service={service}")) {
            continue;
        }
        if line.contains("service task started") {
            tasks.push((true, field(line, "task").expect("a task number")));
        } else if line.contains("service task ended") {
            tasks.push((false, field(line, "task").expect("a task number")));
        } else if line.contains("instance exited")
            && let Some(pid) = field(line, "pid")
            && pid != 0
        {
            *exits.entry(pid as u32).or_default() += 1;
        }
    }
    (tasks, exits)
}

#[test]
fn remove_and_re_add_within_the_stop_grace_keeps_one_owner() {
    let seed = Rng::seed_from_env();
    println!("seed {seed} (SLUICE_E2E_SEED={seed} replays it)");
    let mut rng = Rng::new(seed);
    let h = Host::new();
    let base = sluice_tests::free_port_base(2);
    // Ignores TERM for a second: a removal takes that long to stop it.
    let web = format!(
        "command = [\"/bin/sh\", \"-c\", \"trap 'sleep 1; exit 0' TERM; while :; do sleep 0.2; done\"]\ninstances = 2\nport_base = {base}\nstop_grace_ms = 3000\n"
    );
    h.service("keep", &sleeper(1, base + 1000));
    h.service("web", &web);
    h.start_daemon();
    h.wait_until(|s| s.all_running("web", 2), PATIENCE);
    let mut present = true;
    const STEPS: usize = 14;
    for step in 0..STEPS {
        let op = rng.range(0, 5);
        let what = match (op, present) {
            (0 | 1, true) => {
                std::fs::remove_file(h.service_file("web")).unwrap();
                present = false;
                vec!["reload"]
            }
            (0 | 1, false) => {
                h.service("web", &web);
                present = true;
                vec!["reload"]
            }
            (2, _) => vec!["stop", "web/1"],
            (3, _) => vec!["start", "web"],
            _ => vec!["restart", "web"],
        };
        let out = run_bounded(h.sluice_command(&what), CLI_TIMEOUT)
            .unwrap_or_else(|e| panic!("step {step} (seed {seed}): {e}"));
        println!("step {step}: {what:?} -> {:?}", out.code);
        // A reload is never refused; a verb may be (the service is away, or still waiting for
        // its previous task), but never hangs.
        if what == ["reload"] {
            assert_eq!(out.code, Some(0), "step {step} (seed {seed}): {out}");
        }
        std::thread::sleep(Duration::from_millis(rng.range(0, 800)));
    }
    if !present {
        h.service("web", &web);
        h.sluice(&["reload"]).success();
    }
    // A re-added service refuses verbs until its previous task has ended.
    h.wait_until(
        |s| state_error(s, "web").is_none() && !s.instances("web").is_empty(),
        PATIENCE,
    );
    h.sluice(&["start", "web"]).success();
    let last = h.wait_until(
        |s| s.all_running("web", 2) && state_error(s, "web").is_none(),
        PATIENCE,
    );
    // The state file is there and reads.
    h.sluice(&["stop", "web/1"]).success();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_file(&h, "web")).unwrap()).unwrap();
    assert_eq!(state["stopped"], serde_json::json!([1]), "{state}");
    assert!(set_aside(&h, "web").is_empty());

    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap();
    let (tasks, exits) = owners_and_exits(&log, "web");
    // One owner at a time: every task ends before the next one starts.
    let mut live: Option<u64> = None;
    for (started, task) in &tasks {
        if *started {
            assert_eq!(
                live, None,
                "task {task} started while task {live:?} owned web (seed {seed})\n{tasks:?}"
            );
            live = Some(*task);
        } else {
            assert_eq!(live, Some(*task), "seed {seed}\n{tasks:?}");
            live = None;
        }
    }
    assert!(live.is_some(), "{tasks:?}");
    for (pid, n) in &exits {
        assert_eq!(
            *n, 1,
            "the exit of pid {pid} was handled {n} times (seed {seed})"
        );
    }
    // Every instance that ran is gone or is the one in the status.
    let running: Vec<i32> = last.pids("web").into_iter().flatten().collect();
    for pid in exits.keys() {
        assert!(
            !procs::is_live(*pid as i32) || running.contains(&(*pid as i32)),
            "pid {pid} still runs"
        );
    }
}

/// A directory with an `iptables-restore` and an `ip6tables-restore` that always fail.
fn failing_restore(h: &Host) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = h.path("failing-bin");
    std::fs::create_dir_all(&dir).unwrap();
    for tool in ["iptables-restore", "ip6tables-restore"] {
        let path = dir.join(tool);
        std::fs::write(
            &path,
            // Reads its input first, as the real one does: the daemon sees the failure, not a
            // broken pipe.
            "#!/bin/sh\ncat >/dev/null\necho \"$0: injected failure\" >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

#[test]
fn stop_and_restart_end_at_their_bound_while_iptables_fails() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let h = Host::new().in_netns(&ns);
    const STEER_TIMEOUT_MS: u64 = 2_000;
    h.service(
        "web",
        &format!(
            "command = [\"/bin/sleep\", \"1000\"]\ninstances = 2\nport_base = 9300\nfront_port = 9399\nstartup_ms = 300\nstop_grace_ms = 2000\n[restart]\nstrategy = \"drain\"\nsteer_timeout_ms = {STEER_TIMEOUT_MS}\n"
        ),
    );
    h.start_daemon();
    let before = h.wait_until(
        |s| {
            s.instances("web")
                .iter()
                .filter(|i| i["state"] == "running" && i["enabled"] == true)
                .count()
                == 2
        },
        PATIENCE,
    );
    // A daemon whose `iptables-restore` fails: it adopts the instances and reads the chain.
    h.kill9_daemon();
    let bin = failing_restore(&h);
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    h.spawn_daemon(&[("PATH", &path)]);
    h.wait_reachable(PATIENCE);
    h.wait_until(|s| s.all_running("web", 2), PATIENCE);

    // Generous for a busy 2-core machine; the bound itself is 2 s.
    let slack = Duration::from_secs(15);
    let out = h.sluice(&["stop", "web/0"]).code(1);
    assert!(
        out.elapsed >= Duration::from_millis(STEER_TIMEOUT_MS) && out.elapsed < slack,
        "{out}"
    );
    assert!(out.stderr.contains("steer_timeout_ms"), "{out}");
    assert!(out.stderr.contains("injected failure"), "{out}");
    let s = h.status();
    let i0 = s.instance("web", 0);
    assert_eq!(i0["state"], "running", "{s}");
    assert_eq!(i0["enabled"], true, "{s}");
    assert_eq!(s.pid("web", 0), before.pid("web", 0), "{s}");
    assert!(
        i0["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("stop failed"),
        "{s}"
    );
    assert!(s.service("web")["steering_error"].is_string(), "{s}");

    let out = h.sluice(&["restart", "web"]).code(1);
    assert!(
        out.elapsed >= Duration::from_millis(STEER_TIMEOUT_MS) && out.elapsed < slack,
        "{out}"
    );
    assert!(out.stderr.contains("steer_timeout_ms"), "{out}");
    let s = h.wait_until(|s| !s.restart_in_progress("web"), PATIENCE);
    assert_eq!(s.pids("web"), before.pids("web"), "{s}");
    for i in 0..2 {
        assert_eq!(s.instance("web", i)["state"], "running", "{s}");
        assert_eq!(s.instance("web", i)["enabled"], true, "{s}");
    }
    assert!(s.service("web")["last_restart_error"].is_string(), "{s}");
    // The chain really still sends to both.
    let rules = ns.nat_rules(false);
    for port in ["9300", "9301"] {
        assert!(rules.contains(port), "{rules}");
    }

    // `sluice shutdown` stops them anyway once the bound has passed: the host is going down.
    let out = h.sluice(&["shutdown"]).success();
    assert!(out.elapsed < slack, "{out}");
    h.wait_daemon_exit(PATIENCE);
    for pid in s.pids("web").into_iter().flatten() {
        let deadline = Instant::now() + PATIENCE;
        while procs::is_live(pid) {
            assert!(
                Instant::now() < deadline,
                "pid {pid} still runs after shutdown"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap();
    assert!(
        log.contains("stopping it anyway, every instance is being stopped"),
        "{}",
        h.daemon_log_tail()
    );
}

/// How many descriptors of the daemon point to `path`.
fn fds_on(pid: i32, path: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target == path))
        .count()
}

#[test]
fn interrupted_logs_follow_leave_nothing_behind() {
    let h = Host::new();
    let base = sluice_tests::free_port_base(1);
    h.service(
        "tick",
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"echo started; exec sleep 1000\"]\ninstances = 1\nport_base = {base}\n"
        ),
    );
    h.start_daemon();
    h.wait_until(|s| s.all_running("tick", 1), PATIENCE);
    let log = h.log_path("tick", 0);
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("started")) {
        assert!(
            Instant::now() < deadline,
            "no log line in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::canonicalize(&log).unwrap();
    let daemon = h.daemon_pid().expect("the daemon runs");
    let mut followers = Vec::new();
    for _ in 0..5 {
        followers.push(
            h.sluice_command(&["logs", "tick/0", "-f"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawning `sluice logs -f`"),
        );
    }
    let deadline = Instant::now() + PATIENCE;
    while fds_on(daemon, &log) < 5 {
        assert!(
            Instant::now() < deadline,
            "the daemon follows the log {} times, not 5",
            fds_on(daemon, &log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for mut follower in followers {
        follower.kill().unwrap();
        follower.wait().unwrap();
    }
    // The log does not grow: each follower must notice its client is gone on its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds_on(daemon, &log) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} followers are left after their clients went away",
            fds_on(daemon, &log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap();
    assert_eq!(
        log.matches("logs --follow: the client went away").count(),
        5,
        "{}",
        h.daemon_log_tail()
    );
}
