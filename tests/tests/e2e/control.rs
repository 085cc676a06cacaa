//! The control protocol as the `sluice` command meets it: typed errors that pick the exit code,
//! a bound on every request (exit 4 naming the socket and the bound), and completions and man
//! page generated from the one clap definition.

use std::os::unix::net::UnixListener;
use std::time::Duration;

use sluice_tests::{Host, PATIENCE};

#[test]
fn a_daemon_that_never_answers_makes_each_verb_exit_4_naming_the_socket_and_its_bound() {
    let h = Host::new();
    // A listener that accepts and never answers: a daemon whose loop is frozen.
    std::fs::create_dir_all(h.path("run")).unwrap();
    let socket = h.path("run/sluice.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    for (args, what) in [
        (&["status"][..], "`status`"),
        (&["restart", "web"][..], "`restart`"),
        (&["stop", "web/1"][..], "`stop`"),
        (&["logs", "web/0"][..], "`logs`"),
        (&["reload"][..], "`reload`"),
    ] {
        let mut all = vec!["--timeout-ms", "300"];
        all.extend_from_slice(args);
        let out = h.sluice(&all).code(4);
        assert!(
            out.stderr.contains(&socket.display().to_string()),
            "names the socket: {out}"
        );
        assert!(out.stderr.contains("300 ms"), "names the bound: {out}");
        assert!(out.stderr.contains(what), "names the request: {out}");
        assert!(
            out.elapsed < Duration::from_secs(30),
            "the bound ended it: {out}"
        );
    }
}

#[test]
fn the_daemons_refusals_reach_the_command_typed() {
    let h = Host::new();
    h.service(
        "web",
        r#"
command = ["/bin/sleep", "1000"]
instances = 2
stop_grace_ms = 2000
"#,
    );
    h.start_daemon();
    h.wait_until(|s| s.state("web", 1) == "running", PATIENCE);

    let out = h.sluice(&["status", "nope"]).code(1);
    assert!(
        out.stderr.contains("no service named `nope` (known: web)"),
        "{out}"
    );
    let out = h.sluice(&["restart", "nope"]).code(1);
    assert!(out.stderr.contains("no service named `nope`"), "{out}");
    let out = h.sluice(&["signal", "BOGUS", "web"]).code(1);
    assert!(out.stderr.contains("unknown signal `BOGUS`"), "{out}");
    let out = h.sluice(&["logs", "web/7"]).code(1);
    assert!(
        out.stderr.contains("web has no instance 7 (it has 2)"),
        "{out}"
    );
    // A bad service file refuses the reload with the configuration's code.
    h.service("broken", "command = 5\n");
    let out = h.sluice(&["reload"]).code(3);
    assert!(
        out.stderr
            .contains("invalid configuration, nothing changed"),
        "{out}"
    );

    // The table has supervisorctl's columns first.
    let text = h.sluice(&["status"]).success().stdout;
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[..4], ["NAME", "STATE", "PID", "UPTIME"], "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("web/1"))
        .unwrap_or_else(|| panic!("no web/1 line in:\n{text}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(columns[1], "running", "{line}");
    assert!(columns[2].parse::<u32>().is_ok(), "the pid column: {line}");
    // And the same as JSON.
    let json = h.sluice(&["status", "web", "--json"]).success().stdout;
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["services"][0]["instances"][1]["state"], "running");
}

#[test]
fn completions_and_the_man_page_need_no_host_file_and_name_every_verb() {
    let h = Host::new();
    std::fs::remove_file(h.host_file()).unwrap();
    let verbs = [
        "run",
        "check-config",
        "cleanup",
        "status",
        "start",
        "stop",
        "restart",
        "drain",
        "enable",
        "signal",
        "logs",
        "reload",
        "shutdown",
        "deploy",
        "promote",
        "rollback",
        "register",
        "builds",
        "hosts",
        "role",
        "limit",
        "push-config",
        "watch",
        "completions",
        "man",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let out = h.sluice(&["completions", shell]).success();
        for verb in verbs {
            assert!(out.stdout.contains(verb), "{shell} lacks {verb}");
        }
    }
    let out = h.sluice(&["man"]).success();
    assert!(
        out.stdout.starts_with(".ie") || out.stdout.contains(".TH sluice"),
        "{out}"
    );
    let dir = h.path("man");
    h.sluice(&["man", "--out", dir.to_str().unwrap()]).success();
    for verb in verbs {
        let page = dir.join(format!("sluice-{verb}.1"));
        assert!(page.is_file(), "no {}", page.display());
    }
}

/// `sluice run` becomes the daemon's own binary, `sluiced` (issue 7, footprint: the brain's text
/// pages hold no CLI code): the same process (the pid systemd's `Type=notify` knows, the one the
/// harness spawned), its image replaced, and a daemon that serves and supervises.
#[test]
fn sluice_run_replaces_itself_with_the_daemon_binary() {
    let h = Host::new();
    h.service(
        "quiet",
        r#"
command = ["/bin/sleep", "1000"]
env = { PATH = "/usr/bin:/bin" }
"#,
    );
    h.start_daemon();
    h.wait_until(|s| s.all_running("quiet", 1), PATIENCE);
    let pid = h.daemon_pid().expect("a running daemon");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe.file_name().and_then(|n| n.to_str()),
        Some("sluiced"),
        "the process `sluice run` started runs {}",
        exe.display()
    );
    assert_eq!(
        exe.parent(),
        h.sluice_bin().canonicalize().unwrap().parent(),
        "sluiced comes from sluice's own directory"
    );
    // Its text: the daemon's binary alone, no mapping of the CLI's.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        !maps.lines().any(|l| l.ends_with("/sluice")),
        "the daemon still maps the CLI binary:\n{maps}"
    );
}
