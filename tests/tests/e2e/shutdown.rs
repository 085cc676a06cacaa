//! `sluice shutdown` is a persisted intent run as a task (issue 10): the daemon keeps answering
//! `status` (which shows the shutdown's progress) and pinging the watchdog while instances that
//! ignore TERM are stopped; a brain killed (`kill -9`) at seeded random moments of a shutdown
//! comes back, finishes it and starts nothing; and at host shutdown an instance whose chain
//! cannot be rewritten (`iptables-restore` failing) is stopped anyway after its service's
//! `restart.steer_timeout_ms`.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::netns::Netns;
use sluice_tests::watchdog::Notify;
use sluice_tests::{Host, PATIENCE, Rng, Status, procs, require_root};

/// Longest accepted answer of `sluice status` (a whole CLI process) and longest accepted time
/// without a watchdog ping, on a busy 2-core machine.
const ANSWER_BOUND: Duration = Duration::from_secs(2);
/// The watchdog given to the daemon: it pings every half of it.
const WATCHDOG: Duration = Duration::from_millis(1_000);
/// The intent file a shutdown writes in `data_dir`.
const INTENT: &str = "data/shutdown-intent.json";

/// A service of `instances` instances that ignore TERM (only the SIGKILL after `grace_ms` ends
/// them), each appending `<service>/<index> <pid>` to `starts` when it starts.
fn stubborn(
    starts: &std::path::Path,
    name: &str,
    instances: u32,
    grace_ms: u64,
    after: &str,
) -> String {
    format!(
        r#"command = ["/bin/sh", "-c", "echo \"$SVC/$INSTANCE $$\" >> {starts}; trap '' TERM; sleep 1000 & wait"]
instances = {instances}
stop_grace_ms = {grace_ms}
after = [{after}]
env = {{ PATH = "/usr/bin:/bin", SVC = "{name}", INSTANCE = "{{instance}}" }}
"#,
        starts = starts.display()
    )
}

fn start_lines(starts: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(starts)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `sluice shutdown` in the background, its output kept.
fn spawn_shutdown(h: &Host) -> Child {
    h.sluice_command(&["shutdown"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning `sluice shutdown`")
}

/// Waits (bounded) for a background command and returns its exit code and output.
fn finish(mut child: Child, timeout: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.code(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`sluice shutdown` did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_pids(s: &Status, services: &[&str]) -> Vec<i32> {
    services
        .iter()
        .flat_map(|svc| s.pids(svc))
        .flatten()
        .collect()
}

#[test]
fn status_shows_the_progress_and_the_watchdog_pings_while_instances_ignoring_term_stop() {
    let h = Host::new();
    let starts = h.path("starts");
    let grace_ms = 3_000;
    // `second` starts after `first`, so the shutdown stops `second` first.
    h.service("first", &stubborn(&starts, "first", 1, grace_ms, ""));
    h.service(
        "second",
        &stubborn(&starts, "second", 1, grace_ms, "\"first\""),
    );
    let notify = Notify::bind(&h.path("notify.sock"), WATCHDOG);
    let env = notify.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    h.spawn_daemon(&env);
    h.wait_reachable(PATIENCE);
    let s = h.wait_until(
        |s| s.running("first") == 1 && s.running("second") == 1,
        PATIENCE,
    );
    let pids = all_pids(&s, &["first", "second"]);

    let began = Instant::now();
    let shutdown = spawn_shutdown(&h);
    let mut slowest = Duration::ZERO;
    let mut answers = 0;
    let mut stopping_seen = Vec::<String>::new();
    let mut instances_left_seen = false;
    let mut last_answer = began;
    while h.daemon_exit_status().is_none() {
        assert!(
            began.elapsed() < PATIENCE * 2,
            "the shutdown did not end within {:?}",
            PATIENCE * 2
        );
        let asked = Instant::now();
        match h.try_status() {
            Ok(status) => {
                let took = asked.elapsed();
                slowest = slowest.max(took);
                answers += 1;
                last_answer = Instant::now();
                let progress = &status.0["shutdown"];
                if let Some(name) = progress["stopping"].as_str()
                    && stopping_seen.last().map(String::as_str) != Some(name)
                {
                    stopping_seen.push(name.to_owned());
                }
                if progress["instances_left"].as_array().is_some_and(|l| {
                    l.iter()
                        .any(|i| i.as_str().is_some_and(|t| t.ends_with("stopping")))
                }) {
                    instances_left_seen = true;
                }
            }
            // The daemon may exit between the loop's check and the request.
            Err(e) => {
                std::thread::sleep(Duration::from_millis(100));
                assert!(
                    h.daemon_exit_status().is_some(),
                    "status failed while the daemon ran: {e}"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = began.elapsed();
    let exit = h.wait_daemon_exit(PATIENCE);
    let (code, out) = finish(shutdown, PATIENCE);
    let silence = notify.longest_silence(began, last_answer);
    println!(
        "shutdown took {took:?}; {answers} status answers, slowest {slowest:?}; longest watchdog silence {silence:?}; stopping: {stopping_seen:?}"
    );
    assert_eq!(code, Some(0), "`sluice shutdown`: {out}");
    assert!(out.contains("every instance stopped"), "{out}");
    assert_eq!(exit.code(), Some(10), "the daemon's exit after a shutdown");
    // Two services one after the other, each past its grace: the shutdown outlasts the bounds.
    assert!(
        took > Duration::from_millis(2 * grace_ms),
        "the shutdown took only {took:?}: were the instances not ignoring TERM?"
    );
    assert!(
        answers >= 5,
        "only {answers} status answers during the shutdown"
    );
    assert!(slowest < ANSWER_BOUND, "a status answer took {slowest:?}");
    assert!(
        silence < ANSWER_BOUND,
        "no watchdog ping for {silence:?} during the shutdown"
    );
    assert_eq!(
        stopping_seen,
        ["second", "first"],
        "the services the shutdown's progress named, in order"
    );
    assert!(
        instances_left_seen,
        "status never listed an instance still stopping"
    );
    for pid in pids {
        assert!(!procs::is_live(pid), "instance {pid} survived the shutdown");
    }
    assert!(!h.path(INTENT).exists(), "the intent outlived the shutdown");
}

#[test]
fn a_brain_killed_during_a_shutdown_finishes_it_and_starts_nothing() {
    const ROUNDS: u64 = 3;
    let seed = Rng::seed_from_env();
    println!("seed {seed} (SLUICE_E2E_SEED replays it)");
    let mut rng = Rng::new(seed);
    let h = Host::new();
    let starts = h.path("starts");
    let services = ["a", "b", "c"];
    h.service("a", &stubborn(&starts, "a", 2, 1_500, ""));
    h.service("b", &stubborn(&starts, "b", 2, 1_500, "\"a\""));
    h.service("c", &stubborn(&starts, "c", 2, 1_500, "\"b\""));
    let mut killed_during = 0;
    for round in 0..ROUNDS {
        h.start_daemon();
        let s = h.wait_until(|s| services.iter().all(|svc| s.running(svc) == 2), PATIENCE);
        let pids = all_pids(&s, &services);
        let started = start_lines(&starts);
        assert_eq!(
            started.len() as u64,
            6 * (round + 1),
            "round {round}: starts so far: {started:?}"
        );
        let shutdown = spawn_shutdown(&h);
        // The moments count from the shutdown's visible beginning: its intent on disk, or (a
        // daemon that writes none) the first instance gone. Before that the request may not
        // have arrived, and a kill would only test an ordinary restart.
        let deadline = Instant::now() + PATIENCE;
        while !h.path(INTENT).exists()
            && pids.iter().all(|p| procs::is_live(*p))
            && h.daemon_exit_status().is_none()
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the shutdown never began"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Three services one after the other, each 1.5 s past TERM: at least 3 s of shutdown.
        let moment = Duration::from_millis(rng.range(0, 2_500));
        std::thread::sleep(moment);
        let finished_first = h.daemon_exit_status().is_some();
        if !finished_first {
            killed_during += 1;
        }
        h.kill9_daemon();
        let (code, out) = finish(shutdown, PATIENCE);
        println!(
            "round {round}: killed {moment:?} into the shutdown (finished before: {finished_first}); `sluice shutdown` exit {code:?}: {}",
            out.trim()
        );
        if !finished_first {
            h.spawn_daemon(&[]);
            let exit = h.wait_daemon_exit(PATIENCE * 2);
            assert_eq!(
                exit.code(),
                Some(10),
                "round {round}: the restarted daemon's exit after finishing the shutdown"
            );
        }
        let after = start_lines(&starts);
        assert_eq!(
            after, started,
            "round {round}: an instance was started again during the shutdown"
        );
        for pid in &pids {
            assert!(
                !procs::is_live(*pid),
                "round {round}: instance {pid} survived the shutdown"
            );
        }
        assert!(
            !h.path(INTENT).exists(),
            "round {round}: the intent outlived the shutdown"
        );
    }
    // Else nothing above was tested.
    assert!(
        killed_during > 0,
        "every shutdown ended before its kill: no brain was killed during one"
    );
    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap_or_default();
    println!(
        "{killed_during} of {ROUNDS} brains killed during a shutdown; restarted daemons that finished one: {}",
        log.matches("finishing that shutdown").count()
    );
}

#[test]
fn host_shutdown_stops_an_instance_whose_chain_cannot_be_rewritten_within_its_bound() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let h = Host::new().in_netns(&ns);
    let steer_timeout_ms = 3_000;
    let drain_timeout_ms = 2_000;
    let grace_ms = 2_000;
    // `iptables-restore` (both families) first on the daemon's PATH: the real one until the
    // flag file exists, then a failure.
    let bin = h.path("bin");
    std::fs::create_dir(&bin).unwrap();
    let flag = h.path("fail-iptables");
    for tool in ["iptables-restore", "ip6tables-restore"] {
        let real = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} is not installed"));
        let script = bin.join(tool);
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nif [ -e {flag} ]; then echo 'injected failure' >&2; exit 1; fi\nexec {real} \"$@\"\n",
                flag = flag.display(),
                real = real.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    h.service(
        "web",
        &format!(
            r#"command = ["/usr/bin/python3", "-m", "http.server", "{{port}}", "--bind", "127.0.0.1"]
instances = 2
port_base = 9100
front_port = 9000
stop_grace_ms = {grace_ms}
env = {{ PATH = "/usr/bin:/bin" }}
[restart]
strategy = "drain"
drain_timeout_ms = {drain_timeout_ms}
steer_timeout_ms = {steer_timeout_ms}
[health]
http = "/"
"#
        ),
    );
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bin.display()
    );
    h.spawn_daemon(&[("PATH", &path)]);
    h.wait_reachable(PATIENCE);
    let s = h.wait_until(
        |s| {
            s.instances("web").len() == 2
                && s.instances("web")
                    .iter()
                    .all(|i| i["state"] == "running" && i["enabled"] == true)
        },
        PATIENCE,
    );
    let pids = s.pids("web");
    std::fs::write(&flag, b"").unwrap();

    let began = Instant::now();
    let shutdown = spawn_shutdown(&h);
    let s = h.wait_until(
        |s| {
            s.instances("web").iter().any(|i| i["state"] == "draining")
                && s.service("web")["steering_error"].as_str().is_some()
        },
        PATIENCE,
    );
    println!(
        "during the shutdown: steering error {}",
        s.service("web")["steering_error"]
    );
    let exit = h.wait_daemon_exit(PATIENCE * 2);
    let took = began.elapsed();
    let (code, out) = finish(shutdown, PATIENCE);
    // The documented bound of one instance's stop at shutdown, plus room for a busy machine.
    let bound = Duration::from_millis(steer_timeout_ms + drain_timeout_ms + grace_ms)
        + Duration::from_secs(10);
    println!(
        "shutdown with iptables failing took {took:?} (bound {bound:?}): {}",
        out.trim()
    );
    assert_eq!(
        exit.code(),
        Some(10),
        "the daemon's exit after the shutdown"
    );
    assert_eq!(code, Some(0), "`sluice shutdown`: {out}");
    assert!(
        took < bound,
        "the shutdown took {took:?}, over its bound {bound:?}"
    );
    assert!(
        took >= Duration::from_millis(steer_timeout_ms),
        "the shutdown took only {took:?}: the chain's failure was not waited for"
    );
    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("stopping it anyway"),
        "the daemon did not say it stopped a steered instance anyway"
    );
    for pid in pids.into_iter().flatten() {
        assert!(!procs::is_live(pid), "instance {pid} survived the shutdown");
    }
}
