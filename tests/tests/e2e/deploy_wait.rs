//! `sluice deploy|promote|rollback --wait` against a real fleet (three hosts in namespaces, a real
//! ZooKeeper, builds over HTTP) and on one host's daemon (local backend): the exit code, the
//! failing host named with its error, and the plain lines (stdout is a pipe here) listing each
//! host's transitions in order.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_tests::fleet::{Fleet, FleetOptions, light_service, serving};
use sluice_tests::{Out, PATIENCE, fixtures, run_bounded};

const SVC: &str = "lw";
/// What one `--wait` may take on a loaded 2-core machine (fetch, extraction, two batches of
/// restarts on every host, one slot at a time at worst); the CLI's own `--timeout` is below it so
/// that the CLI, not the harness, ends a wait that hangs.
const WAIT_PATIENCE: Duration = Duration::from_secs(240);
const CLI_WAIT_TIMEOUT: &str = "200s";
/// The environment variable the failing build's hook looks for (set on one host only).
const FAIL_HERE: &str = "SLUICE_TEST_FAIL_POST_INSTALL";
const HOOK_MESSAGE: &str = "post_install refuses this build on this host";

/// The light service, with two instances restarted one at a time (two batches), so the lines
/// show a batch `1/2` and `2/2`.
fn service(extra_env: bool) -> String {
    let toml = light_service(SVC)
        .replace("instances = 1", "instances = 2")
        .replace("\"all-at-once\"", "\"rolling\"");
    if extra_env {
        // Top-level keys come before the first table.
        format!("env = {{ {FAIL_HERE} = \"1\" }}\n{toml}")
    } else {
        toml
    }
}

/// `sluice ARGS` on host `h` of the fleet, bounded by [`WAIT_PATIENCE`].
#[track_caller]
fn sluice_wait(fleet: &Fleet, host: usize, args: &[&str]) -> Out {
    let out = run_bounded(fleet.host(host).sluice_command(args), WAIT_PATIENCE)
        .unwrap_or_else(|e| panic!("{e}"));
    println!("{out}");
    out
}

/// The rank of a progress in the order a host goes through a deploy; a slot is asked again before
/// each batch, so `waiting-slot` and `restarting` share theirs.
fn rank(progress: &str) -> u8 {
    match progress {
        "pending" => 0,
        "installing" => 1,
        "waiting-slot" | "restarting" => 2,
        "finishing" => 3,
        "serving" => 4,
        other => panic!("unexpected progress `{other}`"),
    }
}

/// The plain lines of a wait, by host: each host's progress lines (without the time), in order.
/// Asserts every stdout line is a progress line, the verb's own first line, or the final one.
#[track_caller]
fn lines_by_host(out: &Out, first_line: &str) -> BTreeMap<String, Vec<String>> {
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some(first_line), "{out}");
    let mut by_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut last_secs = 0.0f64;
    for line in lines {
        let (secs, rest) = line
            .split_once("s ")
            .unwrap_or_else(|| panic!("not a progress line: `{line}`\n{out}"));
        let secs: f64 = secs
            .parse()
            .unwrap_or_else(|_| panic!("no time in `{line}`\n{out}"));
        assert!(secs >= last_secs, "lines out of order at `{line}`\n{out}");
        last_secs = secs;
        if rest.starts_with("done: ") {
            continue;
        }
        let (host, progress) = rest
            .split_once(' ')
            .unwrap_or_else(|| panic!("no host in `{line}`\n{out}"));
        by_host
            .entry(host.to_owned())
            .or_default()
            .push(progress.to_owned());
    }
    by_host
}

/// Asserts each host's progress goes pending → installing → … → serving in order (a
/// subsequence: quick steps may pass between two reads), ending with `serving`, and that some
/// host showed a restart of its two batches.
#[track_caller]
fn assert_transitions(by_host: &BTreeMap<String, Vec<String>>, hosts: &[&str], out: &Out) {
    let names: Vec<&str> = by_host.keys().map(String::as_str).collect();
    assert_eq!(names, hosts, "the hosts of the lines\n{out}");
    for (host, progress) in by_host {
        let ranks: Vec<u8> = progress
            .iter()
            .map(|p| rank(p.split_whitespace().next().unwrap_or("")))
            .collect();
        assert!(
            ranks.windows(2).all(|w| w[0] <= w[1]),
            "{host}: transitions out of order: {progress:?}\n{out}"
        );
        assert_eq!(
            progress.last().map(String::as_str),
            Some("serving"),
            "{host}\n{out}"
        );
        // Each change is one line: never the same progress twice in a row.
        assert!(
            progress.windows(2).all(|w| w[0] != w[1]),
            "{host}: a line without a change: {progress:?}\n{out}"
        );
    }
}

#[test]
fn deploy_wait_follows_the_fleet_until_every_targeted_host_serves_or_one_fails() {
    let Some(fleet) = Fleet::new(FleetOptions {
        hosts: 3,
        zookeepers: 1,
    }) else {
        return;
    };
    let b = fleet.builds();
    let b1 = b.good(SVC, "b1");
    let b2 = b.good(SVC, "b2");
    // Fails its `post_install` on the host whose service sets FAIL_HERE (h2), works elsewhere.
    let script = format!(
        "#!/bin/sh\nif [ -n \"${FAIL_HERE}\" ]; then echo '{HOOK_MESSAGE}' >&2; exit 1; fi\n"
    );
    let b3 = b.good_with(
        SVC,
        "b3",
        &[("sluice/hooks/post_install", script.as_bytes(), 0o755)],
    );
    let b4 = b.good(SVC, "b4");
    let b5 = b.good(SVC, "b5");
    for (i, h) in fleet.hosts.iter().enumerate() {
        h.service(SVC, &service(i == 1));
    }
    fleet.start_daemons();
    for build in [&b1, &b2, &b3, &b4, &b5] {
        fleet.register(SVC, build);
    }
    // Every host publishes its status before the first wait: the wait follows live hosts only.
    fleet.wait_hosts(SVC, |v| v.len() == 3, PATIENCE * 3);

    // (1) A deploy to every host: exit 0 once all serve it, each host's transitions in order.
    let out = sluice_wait(
        &fleet,
        0,
        &["deploy", SVC, "b1", "--wait", "--timeout", CLI_WAIT_TIMEOUT],
    )
    .success();
    let by_host = lines_by_host(&out, "lw: enabled is now b1");
    assert_transitions(&by_host, &["h1", "h2", "h3"], &out);
    assert!(
        out.stdout
            .lines()
            .last()
            .unwrap_or("")
            .ends_with("done: 3 host(s) serve lw build b1"),
        "{out}"
    );
    // Done means done: every host says so in ZooKeeper now, without waiting.
    let view = fleet.try_hosts_view(SVC).expect("hosts view");
    for h in ["h1", "h2", "h3"] {
        assert_eq!(view[h]["build"], "b1", "{h}: {view:?}");
        assert_eq!(view[h]["state"], "serving", "{h}: {view:?}");
    }

    // (3) A canary deploy waits for the canary host only; the others stay on b1.
    fleet.sluice(&["role", SVC, "h3", "canary"]).success();
    let out = sluice_wait(
        &fleet,
        0,
        &[
            "deploy",
            SVC,
            &b2.id,
            "--canary",
            "--wait",
            "--timeout",
            CLI_WAIT_TIMEOUT,
        ],
    )
    .success();
    let by_host = lines_by_host(&out, "lw: enabled/canary is now b2");
    assert_transitions(&by_host, &["h3"], &out);
    assert!(
        out.stdout
            .lines()
            .last()
            .unwrap_or("")
            .ends_with("done: 1 host(s) serve lw build b2"),
        "{out}"
    );
    let view = fleet.try_hosts_view(SVC).expect("hosts view");
    assert_eq!(view["h3"]["build"], "b2", "{view:?}");
    for h in ["h1", "h2"] {
        assert_eq!(view[h]["build"], "b1", "{h} is no canary: {view:?}");
        assert!(view[h]["deploy"].is_null(), "{h}: {view:?}");
    }

    // Promote: every host targets b2; the canary already serves it (done from its first line).
    let out = sluice_wait(
        &fleet,
        0,
        &["promote", SVC, "--wait", "--timeout", CLI_WAIT_TIMEOUT],
    )
    .success();
    let by_host = lines_by_host(&out, "lw: promoted b2 to every host");
    assert_transitions(&by_host, &["h1", "h2", "h3"], &out);
    assert_eq!(by_host["h3"], ["serving"], "{out}");
    fleet.sluice(&["role", SVC, "h3", "prod"]).success();

    // (2) A build whose hook fails on h2 only: exit 1 naming h2 and the hook's error.
    let out = sluice_wait(
        &fleet,
        0,
        &[
            "deploy",
            SVC,
            &b3.id,
            "--wait",
            "--timeout",
            CLI_WAIT_TIMEOUT,
        ],
    )
    .code(1);
    assert!(
        out.stderr.contains("lw: build b3 failed on 1 host(s):"),
        "{out}"
    );
    let named: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("  h"))
        .collect();
    assert_eq!(named.len(), 1, "only h2 failed: {named:?}\n{out}");
    assert!(named[0].starts_with("  h2: "), "{out}");
    assert!(named[0].contains("post_install"), "{out}");
    assert!(
        named[0].contains(HOOK_MESSAGE),
        "the hook's stderr is quoted\n{out}"
    );
    let h2_lines: Vec<&str> = out.stdout.lines().filter(|l| l.contains(" h2 ")).collect();
    assert!(
        h2_lines.last().is_some_and(|l| l.contains(" h2 failed: ")),
        "{h2_lines:?}\n{out}"
    );
    // h2 keeps serving b2 and says it failed.
    let view = fleet.wait_hosts(SVC, |v| v["h2"]["state"] == "failed", PATIENCE);
    assert_eq!(view["h2"]["build"], "b2", "{view:?}");

    // Roll back: h1 and h3 go back to b2; h2, which never left it, still says `failed` (of b3)
    // and counts as serving b2 from its first line.
    fleet.wait_hosts(
        SVC,
        |v| serving(v, "h1", "b3") && serving(v, "h3", "b3"),
        WAIT_PATIENCE,
    );
    let out = sluice_wait(
        &fleet,
        0,
        &["rollback", SVC, "--wait", "--timeout", CLI_WAIT_TIMEOUT],
    )
    .success();
    let by_host = lines_by_host(&out, "lw: rolled back to b2");
    assert_transitions(&by_host, &["h1", "h2", "h3"], &out);
    assert_eq!(by_host["h2"], ["serving"], "{out}");

    // The stale-status race: h2 still shows the failed state of b3 when the next deploy is
    // written and read (its daemon is stopped, so it cannot take b4 up before the wait's first
    // read); it is pending, not failed, and the wait succeeds once h2 resumes and deploys b4.
    let view = fleet.wait_hosts(
        SVC,
        |v| serving(v, "h1", "b2") && serving(v, "h3", "b2"),
        WAIT_PATIENCE,
    );
    assert_eq!(view["h2"]["state"], "failed", "{view:?}");
    assert!(
        view["h2"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("build b3")),
        "{view:?}"
    );
    let h2_daemon = fleet.host(1).daemon_pid().expect("h2's daemon runs");
    let mut paused = Paused::new(h2_daemon);
    let out = wait_acting(&fleet, &["deploy", SVC, &b4.id], " h2 ", || paused.resume()).success();
    drop(paused);
    let by_host = lines_by_host(&out, "lw: enabled is now b4");
    assert_transitions(&by_host, &["h1", "h2", "h3"], &out);
    assert_eq!(
        by_host["h2"].first().map(String::as_str),
        Some("pending"),
        "h2's old failure is not this deploy's\n{out}"
    );

    // A host that vanishes mid-deploy: h3's daemon is paused (so it shows b4 when the wait
    // begins), then killed; its status node goes when its session expires. The others serve
    // b5, and the wait fails naming h3 as gone.
    let h3_daemon = fleet.host(2).daemon_pid().expect("h3's daemon runs");
    let paused = Paused::new(h3_daemon);
    let out = wait_acting(&fleet, &["deploy", SVC, &b5.id], " h3 ", || {
        fleet.host(2).kill9_daemon()
    })
    .code(1);
    drop(paused);
    assert!(
        out.stderr.contains("lw: build b5 failed on 1 host(s):"),
        "{out}"
    );
    assert!(out.stderr.contains("\n  h3: gone"), "{out}");
    let h3_lines: Vec<&str> = out.stdout.lines().filter(|l| l.contains(" h3 ")).collect();
    assert_eq!(
        h3_lines.last().map(|l| l.ends_with(" h3 gone")),
        Some(true),
        "{out}"
    );
    let view = fleet.try_hosts_view(SVC).expect("hosts view");
    for h in ["h1", "h2"] {
        assert!(serving(&view, h, "b5"), "{h}: {view:?}");
    }
}

/// A daemon stopped with SIGSTOP, continued when dropped (also when the test panics).
struct Paused(Option<i32>);

impl Paused {
    fn new(pid: i32) -> Paused {
        // SAFETY: kill(2) on the daemon this test started.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "SIGSTOP {pid}"
        );
        Paused(Some(pid))
    }

    fn resume(&mut self) {
        if let Some(pid) = self.0.take() {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.resume();
    }
}

/// Runs `sluice ARGS --wait` on h1, calls `act` once, when a stdout line first contains `at`,
/// and returns its output. Bounded by the CLI's own `--timeout`.
#[track_caller]
fn wait_acting(fleet: &Fleet, args: &[&str], at: &str, act: impl FnOnce()) -> Out {
    use std::io::{BufRead as _, Read as _};
    use std::process::Stdio;
    let mut args = args.to_vec();
    args.extend(["--wait", "--timeout", CLI_WAIT_TIMEOUT]);
    let mut cmd = fleet.host(0).sluice_command(&args);
    let what = format!("{cmd:?}");
    let started = std::time::Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning sluice");
    let mut stderr_pipe = child.stderr.take().expect("piped");
    // Read on its own thread, so a chatty stderr never blocks the CLI while stdout is read.
    let stderr_thread = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let mut act = Some(act);
    let mut stdout = String::new();
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.expect("reading the CLI's stdout");
        if line.contains(at)
            && let Some(act) = act.take()
        {
            act();
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait().expect("waiting for sluice");
    let out = Out {
        code: status.code(),
        stdout,
        stderr: stderr_thread.join().unwrap_or_default(),
        elapsed: started.elapsed(),
        what,
    };
    println!("{out}");
    out
}

/// The local backend: `deploy --wait` follows this host's daemon through its control socket.
#[test]
fn local_deploy_wait_follows_this_hosts_daemon() {
    let Some(fleet) = Fleet::new(FleetOptions {
        hosts: 1,
        zookeepers: 0,
    }) else {
        return;
    };
    let h = fleet.host(0);
    fleet.builds().good(SVC, "b1");
    fleet.builds().good(SVC, "b2");
    h.service(SVC, &service(false));
    h.start_daemon();
    for build in ["b1", "b2"] {
        let out = sluice_wait(
            &fleet,
            0,
            &[
                "deploy",
                SVC,
                build,
                "--wait",
                "--timeout",
                CLI_WAIT_TIMEOUT,
            ],
        )
        .success();
        let by_host = lines_by_host(&out, &format!("lw: enabled build is now {build}"));
        assert_transitions(&by_host, &["local"], &out);
        assert!(
            out.stdout
                .lines()
                .last()
                .unwrap_or("")
                .ends_with(&format!("done: 1 host(s) serve lw build {build}")),
            "{out}"
        );
        let status = h.status();
        assert_eq!(status.service(SVC)["build"], build, "{:?}", status.0);
    }
    // On a terminal (a pty from script(1)): the progress display instead of the lines, then the
    // summary line.
    let pty = fixtures::require(
        "script(1) from util-linux (for a pty)",
        std::path::Path::new("/usr/bin/script").is_file(),
    );
    if pty {
        fleet.builds().good(SVC, "b3");
        let cmdline = format!(
            "{} --config {} deploy {SVC} b3 --wait --timeout {CLI_WAIT_TIMEOUT}",
            h.sluice_bin().display(),
            h.host_file().display()
        );
        let mut script = std::process::Command::new("script");
        script
            .args(["-qfec", &cmdline, "/dev/null"])
            .env("TERM", "xterm-256color")
            .env_remove("SLUICE_CONFIG");
        let out = run_bounded(script, WAIT_PATIENCE).unwrap_or_else(|e| panic!("{e}"));
        println!("{out}");
        let out = out.success();
        assert!(
            out.stdout.contains("done: 1 host(s) serve lw build b3"),
            "{out}"
        );
        assert!(
            out.stdout.contains("host(s) done"),
            "the display was drawn\n{out}"
        );
        assert!(
            !out.stdout.contains("s local pending"),
            "no plain lines on a terminal\n{out}"
        );
        assert_eq!(h.status().service(SVC)["build"], "b3");
    }

    // Back to the build before: the same lines.
    let out = sluice_wait(
        &fleet,
        0,
        &["rollback", SVC, "--wait", "--timeout", CLI_WAIT_TIMEOUT],
    )
    .success();
    let before = if pty { "b2" } else { "b1" };
    let by_host = lines_by_host(&out, &format!("lw: rolled back to {before}"));
    assert_transitions(&by_host, &["local"], &out);
    assert_eq!(h.status().service(SVC)["build"], before);

    // A deploy that does not finish within `--timeout`: exit 1 naming the host and where it is.
    let script = b"#!/bin/sh\nsleep 5\n";
    fleet.builds().good_with(
        SVC,
        "slow",
        &[("sluice/hooks/post_install", script.as_slice(), 0o755)],
    );
    let out = sluice_wait(
        &fleet,
        0,
        &["deploy", SVC, "slow", "--wait", "--timeout", "1s"],
    )
    .code(1);
    assert!(
        out.stderr
            .contains("lw: timed out after 1.0s waiting for build slow (the deploy goes on)"),
        "{out}"
    );
    assert!(out.stderr.contains("\n  local: installing"), "{out}");
}
