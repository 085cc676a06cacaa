//! Privilege drop and environment: an instance runs as the configured user, group and supplementary
//! groups, with the configured umask and exactly the configured environment, nothing inherited;
//! hooks of every stage and `exec` probes run as that user too, and nothing runs as root unless
//! the host file allows it (issue 8's privilege matrix).

use sluice_tests::{Host, PATIENCE, procs, require_root};

/// `nobody` and `nogroup` on Debian.
const NOBODY: &str = "65534";

#[test]
fn instance_runs_as_configured_user_with_exactly_the_configured_env() {
    if !require_root() {
        return;
    }
    let h = Host::new();
    let identity = r#"
user = "nobody"
group = "nogroup"
umask = "027"
env = { FOO = "bar", PATH = "/usr/bin:/bin" }
"#;
    // Prints what it runs as, then becomes a long-running process that /proc can be asked about.
    h.service(
        "ident",
        &format!(
            r#"command = ["/bin/sh", "-c", "id -u; id -g; id -G; umask; exec sleep 1000"]
{identity}"#
        ),
    );
    // `env` exec'd directly: a shell would add PWD, SHLVL or `_` of its own.
    h.service(
        "envdump",
        &format!(
            r#"command = ["/usr/bin/env"]
autorestart = "never"
{identity}"#
        ),
    );
    h.start_daemon();

    let s = h.wait_until(
        |s| s.running("ident") == 1 && s.state("envdump", 0) == "exited",
        PATIENCE,
    );
    let log = h.wait_for_log("ident", 0, |t| t.lines().count() >= 4, PATIENCE);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines,
        [NOBODY, NOBODY, NOBODY, "0027"],
        "id -u, id -g, id -G, umask"
    );

    let pid = s.pid("ident", 0).unwrap();
    let field = |key| procs::status_field(pid, key).unwrap_or_default();
    let all_nobody = [NOBODY; 4].join(" ");
    assert_eq!(field("Uid"), all_nobody, "real, effective, saved, fs uid");
    assert_eq!(field("Gid"), all_nobody, "real, effective, saved, fs gid");
    assert_eq!(field("Groups"), NOBODY, "supplementary groups");
    assert_eq!(field("Umask"), "0027");
    // Not its /proc environ: the shell that exec'd `sleep` exported PWD of its own. `envdump`
    // below shows the environment the shim gives.

    let env = h.wait_for_log("envdump", 0, |t| t.lines().count() >= 2, PATIENCE);
    let mut env: Vec<&str> = env.lines().collect();
    env.sort();
    assert_eq!(
        env,
        ["FOO=bar", "PATH=/usr/bin:/bin"],
        "the whole environment"
    );
    let exit = s.instance("envdump", 0)["last_exit"].clone();
    assert_eq!(exit, "exit code 0", "{s}");
}

// ------------------------------------------------------------------------------------------------
// The privilege matrix (issue 8): instance, every hook stage and the `exec` probe × {no `user`,
// unknown user, `nobody`, `root` allowed, `root` not allowed}.

/// Where each child of a matrix service writes `id -u`, one file per kind.
const KINDS: [&str; 7] = [
    "instance",
    "pre_download",
    "post_download",
    "post_install",
    "pre_restart",
    "post_restart",
    "probe",
];

/// A variable only the daemon's environment has: no probe, hook or instance may see it.
const DAEMON_ONLY: &str = "SLUICE_TEST_DAEMON_SECRET";

/// Makes the host's temp dir reachable by service users (it is 0700) and returns a directory
/// anyone may write, for the children's reports.
fn shared_dir(h: &Host, name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(h.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = h.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

/// A one-file build `b1` in a `file://` store under the host, with its sidecar sha256.
fn file_store(h: &Host) -> std::path::PathBuf {
    let store = h.path("store");
    let stage = h.path("stage");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::write(stage.join("BUILD"), "b1\n").unwrap();
    let archive = store.join("b1.tar.gz");
    let status = std::process::Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-czf"])
        .arg(&archive)
        .arg("-C")
        .arg(&stage)
        .arg("BUILD")
        .status()
        .unwrap();
    assert!(status.success(), "tar failed");
    let out = std::process::Command::new("sha256sum")
        .arg(&archive)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let sha = text.split_whitespace().next().unwrap();
    std::fs::write(store.join("b1.tar.gz.sha256"), format!("{sha}\n")).unwrap();
    store
}

/// A service whose instance, hooks (every stage) and `exec` probe each write `id -u` into
/// `out/<kind>`; the probe also writes its environment and working directory.
fn matrix_service(user_line: &str, out: &std::path::Path, store: &std::path::Path) -> String {
    let out = out.display();
    let hook = |stage: &str| format!(r#"[["/bin/sh", "-c", "id -u > {out}/{stage}"]]"#);
    format!(
        r#"command = ["/bin/sh", "-c", "id -u > {out}/instance; exec sleep 1000"]
{user_line}
env = {{ SERVICE_ONLY = "yes", PATH = "/usr/bin:/bin" }}
directory = "{out}"
[build]
source = "file://{store}/{{build}}.tar.gz"
[hooks]
pre_download = {pre_download}
post_download = {post_download}
post_install = {post_install}
pre_restart = {pre_restart}
post_restart = {post_restart}
[health]
exec = ["/bin/sh", "-c", "env > {out}/.e && mv {out}/.e {out}/probe.env && pwd > {out}/.p && mv {out}/.p {out}/probe.pwd && id -u > {out}/.u && mv {out}/.u {out}/probe"]
interval_ms = 100
"#,
        store = store.display(),
        pre_download = hook("pre_download"),
        post_download = hook("post_download"),
        post_install = hook("post_install"),
        pre_restart = hook("pre_restart"),
        post_restart = hook("post_restart"),
    )
}

/// `nobody`, `root` by name and no `user` on a host that allows root: every child of each
/// service ran as the uid its configuration says; the probe saw the service's environment and
/// directory, never the daemon's.
#[test]
fn privilege_matrix_every_child_runs_as_the_service_user() {
    if !require_root() {
        return;
    }
    let h = Host::new();
    let store = file_store(&h);
    let cells = [
        ("nobody", r#"user = "nobody""#, NOBODY),
        ("rootnamed", r#"user = "root""#, "0"),
        ("nouser", "", "0"),
    ];
    for (name, user_line, _) in cells {
        let out = shared_dir(&h, &format!("out-{name}"));
        h.service(name, &matrix_service(user_line, &out, &store));
    }
    h.spawn_daemon(&[(DAEMON_ONLY, "must-not-leak")]);
    h.wait_reachable(PATIENCE);
    for (name, _, _) in cells {
        h.sluice(&["deploy", name, "b1"]).success();
    }
    let deadline = std::time::Instant::now() + PATIENCE * 3;
    for (name, _, uid) in cells {
        let out = h.path(&format!("out-{name}"));
        for kind in KINDS {
            let file = out.join(kind);
            let got = loop {
                match std::fs::read_to_string(&file) {
                    Ok(text) if text.ends_with('\n') => break text.trim().to_owned(),
                    _ => {}
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name}: {kind} never wrote {}\n{}\n{}",
                    file.display(),
                    h.status(),
                    h.daemon_log_tail()
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            };
            assert_eq!(got, uid, "{name}: the uid {kind} ran as");
        }
        let env = std::fs::read_to_string(out.join("probe.env")).unwrap();
        assert!(
            env.lines().any(|l| l == "SERVICE_ONLY=yes"),
            "{name}: the probe has the service's environment:\n{env}"
        );
        assert!(
            !env.contains(DAEMON_ONLY),
            "{name}: the daemon's environment reached the probe:\n{env}"
        );
        let pwd = std::fs::read_to_string(out.join("probe.pwd")).unwrap();
        assert_eq!(
            pwd.trim(),
            out.to_str().unwrap(),
            "{name}: the probe runs in the instance's directory, not the daemon's"
        );
    }
    h.wait_until(
        |s| {
            cells
                .iter()
                .all(|(name, _, _)| s.service(name)["build"] == "b1")
        },
        PATIENCE,
    );
}

/// Unknown user, root by name or by default on a host that does not allow root: `sluice run`
/// and `check-config` exit 3 naming the service and the user, and nothing ran at all; a reload
/// that brings such a service in is refused and changes nothing.
#[test]
fn privilege_matrix_refuses_what_would_run_as_root_or_as_nobody_known() {
    if !require_root() {
        return;
    }
    let cases = [
        (
            r#"user = "sluice-no-such-user""#,
            true,
            "service svc: no user named `sluice-no-such-user`",
        ),
        (
            r#"user = "root""#,
            false,
            "service svc: user `root` is root, and the host file does not set `allow_root = true`",
        ),
        (
            "",
            false,
            "service svc sets no `user`, so it would run as root, and the host file does not set `allow_root = true`",
        ),
    ];
    for (user_line, allow_root, want) in cases {
        let h = Host::new();
        let store = file_store(&h);
        let out = shared_dir(&h, "out");
        h.write_host_file(&format!(
            "data_dir = \"data\"\nruntime_dir = \"run\"\nservices_dir = \"services\"\nallow_root = {allow_root}\n"
        ));
        h.service("svc", &matrix_service(user_line, &out, &store));
        for verb in ["check-config", "run"] {
            let result = h.sluice(&[verb]).code(3);
            assert!(
                result.stderr.contains(want),
                "`sluice {verb}` with {user_line:?}, allow_root = {allow_root}: {result}"
            );
        }
        let ran: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().collect();
        assert!(ran.is_empty(), "something ran: {ran:?}");

        // The same service arriving by reload is refused; the running one is untouched.
        std::fs::remove_file(h.service_file("svc")).unwrap();
        h.service(
            "ok",
            "command = [\"/bin/sleep\", \"1000\"]\nuser = \"nobody\"\n",
        );
        h.start_daemon();
        let pids = h.wait_until(|s| s.running("ok") == 1, PATIENCE).pids("ok");
        h.service("svc", &matrix_service(user_line, &out, &store));
        let result = h.sluice(&["reload"]).code(3);
        assert!(result.stderr.contains(want), "reload: {result}");
        let s = h.status();
        assert_eq!(s.pids("ok"), pids, "{s}");
        assert!(s.service("svc").is_null(), "{s}");
    }
}

/// A user that disappears after start-up (deleted from the passwd database): the next deploy's
/// hooks fail naming the user, and nothing runs as root in their place (hooks used to drop that
/// error and run as root).
#[test]
fn a_user_that_vanishes_fails_the_deploy_hooks_naming_it() {
    if !require_root() {
        return;
    }
    let user = format!("sluicevanish{}", std::process::id() % 100_000);
    let add = std::process::Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            &user,
        ])
        .status();
    if !add.is_ok_and(|s| s.success()) {
        panic!("useradd {user} failed: the privilege matrix needs a throw-away user");
    }
    struct DelUser(String);
    impl Drop for DelUser {
        fn drop(&mut self) {
            // Usually gone already: the test deletes it on purpose.
            let _ = std::process::Command::new("userdel")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    let deluser = DelUser(user.clone());
    let h = Host::new();
    let store = file_store(&h);
    let out = shared_dir(&h, "out");
    h.service(
        "svc",
        &matrix_service(&format!("user = \"{user}\""), &out, &store),
    );
    h.start_daemon();
    let status = std::process::Command::new("userdel")
        .arg(&user)
        .status()
        .unwrap();
    assert!(status.success(), "userdel {user}");
    drop(deluser);
    h.sluice(&["deploy", "svc", "b1"]).success();
    let want = format!("no user named `{user}`");
    let s = h.wait_until(
        |s| {
            s.service("svc")["deploy_error"]
                .as_str()
                .is_some_and(|e| e.contains(&want))
        },
        PATIENCE,
    );
    let error = s.service("svc")["deploy_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("pre_download hooks not run"), "{error}");
    let ran: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().collect();
    assert!(ran.is_empty(), "something ran without its user: {ran:?}");
}

/// A probe that outlives `timeout_ms` (its grandchild `sleep` too) is killed with its whole
/// process group: no grandchild of a timed-out probe survives.
#[test]
fn a_timed_out_probe_leaves_no_process_behind() {
    if !require_root() {
        return;
    }
    let h = Host::new();
    let out = shared_dir(&h, "out");
    let pids = out.join("grandchildren");
    // 7391 s: a sleep no other test starts, so /proc tells ours apart.
    h.service(
        "slowprobe",
        &format!(
            r#"command = ["/bin/sleep", "1000"]
user = "nobody"
[health]
exec = ["/bin/sh", "-c", "sleep 7391 & echo $! >> {pids}; wait"]
timeout_ms = 300
interval_ms = 100
start_timeout_ms = 120000
"#,
            pids = pids.display()
        ),
    );
    h.start_daemon();
    let deadline = std::time::Instant::now() + PATIENCE;
    let started = loop {
        let text = std::fs::read_to_string(&pids).unwrap_or_default();
        let list: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if list.len() >= 4 {
            break list;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "probes did not run: {list:?}\n{}",
            h.daemon_log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Every probe but the one that may still run has timed out: its grandchild must be gone.
    for pid in &started[..started.len() - 1] {
        let gone_by = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let alive = procs::get(*pid).is_some_and(|p| {
                p.live()
                    && p.cmdline.first().is_some_and(|c| c.ends_with("sleep"))
                    && p.cmdline.get(1).map(String::as_str) == Some("7391")
            });
            if !alive {
                break;
            }
            assert!(
                std::time::Instant::now() < gone_by,
                "the grandchild {pid} of a timed-out probe is still running"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}
