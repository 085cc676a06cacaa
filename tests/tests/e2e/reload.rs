//! `sluice reload`: scaling a service up and down touches only the instances that come or go, a bad
//! file changes nothing (exit 3, naming file, line and key), a changed service restarts one instance
//! at a time; and `sluice run` refuses a bad configuration.

use std::time::{Duration, Instant};

use sluice_tests::{Host, PATIENCE, Status, procs, run_bounded};

/// The `web` service file, `extra` appended; every line number below counts from this layout.
fn web(instances: u32, port_base: u16, extra: &str) -> String {
    format!(
        "command = [\"/bin/sleep\", \"1000\"]\ninstances = {instances}\nport_base = {port_base}\nstop_grace_ms = 2000\n{extra}"
    )
}

#[track_caller]
fn assert_same_instances(before: &Status, after: &Status, indices: std::ops::Range<u32>) {
    for i in indices {
        assert_eq!(after.state("web", i), "running", "web/{i}\n{after}");
        assert_eq!(
            after.pid("web", i),
            before.pid("web", i),
            "web/{i}\n{after}"
        );
        assert_eq!(
            after.shim_pid("web", i),
            before.shim_pid("web", i),
            "web/{i}'s shim\n{after}"
        );
    }
}

#[test]
fn reload_scales_up_refuses_bad_files_and_scales_down() {
    let h = Host::new();
    let base = sluice_tests::free_port_base(6);
    h.service("web", &web(4, base, ""));
    h.start_daemon();
    let four = h.wait_until(|s| s.all_running("web", 4), PATIENCE);

    // 4 → 6: two more instances; the four that run are not touched.
    h.service("web", &web(6, base, ""));
    h.sluice(&["reload"]).success();
    let six = h.wait_until(|s| s.all_running("web", 6), PATIENCE);
    assert_same_instances(&four, &six, 0..4);
    for i in 0..6u16 {
        assert_eq!(six.instance("web", u32::from(i))["port"], base + i, "{six}");
    }

    // An unknown key on line 5, then a wrong type on line 2: refused with exit 3, naming the file
    // and the line, and nothing changes. (That the key is named is checked on its own below.)
    let file_name = h.service_file("web").to_string_lossy().into_owned();
    for (text, line, _) in bad_web_files(base) {
        h.service("web", &text);
        let out = h.sluice(&["reload"]).code(3);
        assert!(out.stderr.contains(&file_name), "no file name: {out}");
        assert!(
            names_line(&out.stderr, &file_name, line),
            "no line {line}: {out}"
        );
        let now = h.status();
        assert!(now.all_running("web", 6), "{now}");
        assert_same_instances(&six, &now, 0..6);
    }

    // 6 → 4: the two extra instances stop and leave the status; the first four are untouched.
    h.service("web", &web(4, base, ""));
    h.sluice(&["reload"]).success();
    let back = h.wait_until(|s| s.all_running("web", 4), PATIENCE);
    assert_same_instances(&four, &back, 0..4);
    for i in 4..6 {
        let pid = six.pid("web", i).unwrap();
        let deadline = Instant::now() + PATIENCE;
        while procs::is_live(pid) {
            assert!(Instant::now() < deadline, "web/{i} (pid {pid}) still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `web` files with an unknown key (line 5) and a wrong type (line 2): (text, line, key).
fn bad_web_files(base: u16) -> [(String, usize, &'static str); 2] {
    [
        (web(6, base, "bogus = 1\n"), 5, "bogus"),
        (
            web(6, base, "").replace("instances = 6", "instances = \"six\""),
            2,
            "instances",
        ),
    ]
}

/// Whether an error message points at `line` of `file` (`file:5` or `line 5`).
fn names_line(message: &str, file: &str, line: usize) -> bool {
    message.contains(&format!("{file}:{line}")) || message.contains(&format!("line {line}"))
}

#[test]
fn refused_reload_names_file_line_and_key() {
    let h = Host::new();
    let base = sluice_tests::free_port_base(6);
    h.service("web", &web(4, base, ""));
    h.start_daemon();
    let four = h.wait_until(|s| s.all_running("web", 4), PATIENCE);
    let file_name = h.service_file("web").to_string_lossy().into_owned();
    for (text, line, key) in bad_web_files(base) {
        h.service("web", &text);
        let out = h.sluice(&["reload"]).code(3);
        assert!(out.stderr.contains(&file_name), "no file name: {out}");
        assert!(
            names_line(&out.stderr, &file_name, line),
            "no line {line}: {out}"
        );
        // docs/config.md: "Unknown keys and wrong types are errors naming the file, the line and
        // the key".
        assert!(
            out.stderr.contains(&format!("`{key}`")),
            "no key `{key}`: {out}"
        );
        let out = h.sluice(&["check-config"]).code(3);
        assert!(
            out.stderr.contains(&format!("`{key}`")),
            "no key `{key}`: {out}"
        );
    }
    let now = h.status();
    assert_same_instances(&four, &now, 0..4);
}

#[test]
fn changed_service_restarts_one_instance_at_a_time() {
    let h = Host::new();
    let file = |v: &str| {
        format!(
            r#"
command = ["/bin/sleep", "1000"]
instances = 3
startup_ms = 300
stop_grace_ms = 2000
env = {{ V = "{v}" }}
"#
        )
    };
    h.service("roll", &file("1"));
    h.start_daemon();
    let before = h.wait_until(|s| s.all_running("roll", 3), PATIENCE);

    h.service("roll", &file("2"));
    h.sluice(&["reload"]).success();
    // Sample as fast as the CLI allows: never more than one instance may be down at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut samples = 0;
    let after = loop {
        let s = h.status();
        samples += 1;
        let instances = s.instances("roll");
        assert_eq!(instances.len(), 3, "{s}");
        let down = instances.iter().filter(|i| i["state"] != "running").count();
        assert!(down <= 1, "{down} instances not running at once:\n{s}");
        let done = (0..3).all(|i| s.pid("roll", i) != before.pid("roll", i))
            && s.all_running("roll", 3)
            && !s.restart_in_progress("roll");
        if done {
            break s;
        }
        assert!(Instant::now() < deadline, "restart not done:\n{s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("{samples} status samples during the rolling restart");
    for i in 0..3 {
        let pid = after.pid("roll", i).unwrap();
        let env = procs::environ(pid).unwrap_or_default();
        assert_eq!(env, ["V=2"], "environment of roll/{i}");
        assert!(
            !procs::is_live(before.pid("roll", i).unwrap()),
            "the old roll/{i} still runs"
        );
    }
}

#[test]
fn run_refuses_a_bad_config_with_exit_3_naming_the_file() {
    let h = Host::new();
    h.service("good", "command = [\"/bin/sleep\", \"1000\"]\n");
    h.service(
        "broken",
        "command = [\"/bin/sleep\", \"1000\"]\nbogus = 1\n",
    );
    let file = h.service_file("broken").to_string_lossy().into_owned();

    let out = h.sluice(&["check-config"]).code(3);
    assert!(out.stderr.contains(&file), "{out}");

    // Bounded well below the CLI timeout: a daemon that starts anyway would never return.
    let out = run_bounded(h.sluice_command(&["run"]), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"))
        .code(3);
    assert!(out.stderr.contains(&file), "{out}");
    assert!(out.stderr.contains("bogus"), "{out}");
    // Refused before anything started: no control socket, no instance of the good service.
    assert!(!h.path("run/sluice.sock").exists());
    assert!(!h.log_path("good", 0).exists());
    let root = h.root().to_string_lossy().into_owned();
    let strays: Vec<_> = procs::all()
        .into_iter()
        .filter(|p| p.live() && p.cmdline.iter().any(|a| a.contains(&root)))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
    h.sluice(&["status"]).code(4);
}
