//! Files under someone else's control: the service's user (`nobody`) owns its log directory, and
//! between every pair of sluice operations it swaps its log files for links to root-only files and
//! for fifos. Root-only targets stay byte-identical, nothing is read through a link, sluice reports
//! the refused file and keeps supervising. Also the control plane: lock and socket modes, and who
//! may use the socket.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sluice_tests::{Host, PATIENCE, require_root, run_bounded};

/// `nobody` on Debian.
const NOBODY_UID: u32 = 65534;
/// How long `logs -f` is watched while the user swaps files under it.
const FOLLOW_WATCH: Duration = Duration::from_secs(5);

/// A root-only file the service user points its links at, and what it must still be at the end.
struct Target {
    path: PathBuf,
    content: Vec<u8>,
    meta: (u32, u32, u32, i64, i64),
}

impl Target {
    fn new(path: PathBuf, text: &str) -> Target {
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        Target {
            content: text.as_bytes().to_vec(),
            meta: (m.mode(), m.uid(), m.gid(), m.mtime(), m.mtime_nsec()),
            path,
        }
    }

    /// The secret as text, to look for in everything sluice printed.
    fn secret(&self) -> String {
        String::from_utf8_lossy(&self.content).trim().to_owned()
    }

    #[track_caller]
    fn assert_untouched(&self, when: &str) {
        let m = std::fs::symlink_metadata(&self.path).unwrap();
        assert_eq!(
            std::fs::read(&self.path).unwrap(),
            self.content,
            "{when}: {} was written",
            self.path.display()
        );
        assert_eq!(
            (m.mode(), m.uid(), m.gid(), m.mtime(), m.mtime_nsec()),
            self.meta,
            "{when}: {} changed mode, owner or mtime",
            self.path.display()
        );
    }
}

/// Runs a shell command as `nobody` (what the service's user can do to its own directory).
#[track_caller]
fn as_nobody(script: &str) {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "/bin/sh",
        "-c",
        script,
    ]);
    let out = run_bounded(cmd, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.code, Some(0), "as nobody: {script}\n{out}");
}

fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// Waits until `cond` holds, failing with `what` after [`PATIENCE`].
#[track_caller]
fn wait(h: &Host, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "not within {PATIENCE:?}: {what}\n{}",
            h.daemon_log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_link(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

fn is_regular(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

#[test]
fn service_user_swaps_its_log_files_for_links_and_fifos_and_nothing_follows_them() {
    if !require_root() {
        return;
    }
    let h = Host::new();
    // nobody must be able to reach its own log directory inside the test's temp dir.
    std::fs::set_permissions(h.root(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let logs = h.path("svclogs");
    std::fs::create_dir(&logs).unwrap();
    std::os::unix::fs::chown(&logs, Some(NOBODY_UID), Some(NOBODY_UID)).unwrap();
    let secret = Target::new(h.path("secret"), "ROOT-ONLY-SECRET-a1b2c3\n");
    let shadow = Target::new(
        h.path("shadow"),
        "root:$6$SHADOW-LIKE-HASH:19000:0:99999:7:::\n",
    );
    let targets = [&secret, &shadow];
    let out_log = logs.join("web-0.stdout.log");
    let err_log = logs.join("web-0.stderr.log");
    let q = |p: &Path| sh_quote(p);

    // Before start: the stdout log is a link to the secret, the stderr log a fifo.
    as_nobody(&format!(
        "ln -s {} {} && mkfifo {}",
        q(&secret.path),
        q(&out_log),
        q(&err_log)
    ));
    h.service(
        "web",
        &format!(
            r#"
command = ["/bin/sh", "-c", "i=0; while :; do echo tick $i @PAD@; echo err $i >&2; i=$((i+1)); sleep 0.02; done"]
user = "nobody"
stop_grace_ms = 2000
env = {{ PATH = "/usr/bin:/bin" }}
[log]
dir = "{}"
max_bytes = 2000
backups = 2
"#,
            logs.display()
        )
        .replace("@PAD@", &"x".repeat(40)),
    );
    h.start_daemon();
    let s = h.wait_until(|s| s.running("web") == 1, PATIENCE);
    let pid = s.pid("web", 0).expect("web/0 has a pid");
    let shim = s.shim_pid("web", 0).expect("web/0 has a shim");
    for t in targets {
        t.assert_untouched("after start");
    }
    assert!(is_link(&out_log), "the link is left as it is");
    wait(&h, "the shim reports the refused log files", || {
        let log = h.daemon_log_tail();
        log.contains("web-0.stdout.log: refusing") && log.contains("a fifo")
    });

    // `logs` on a link: refused naming the file, the target never printed.
    let out = h.sluice(&["logs", "web/0", "-n", "5"]);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("web-0.stdout.log"), "{out}");
    assert!(!format!("{out}").contains(&secret.secret()), "{out}");
    let out = h.sluice(&["logs", "web/0", "--stderr", "-n", "5"]);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("a fifo"), "{out}");

    // The user gives up: regular files come back and logging resumes, rotating.
    as_nobody(&format!("rm -f {} {}", q(&out_log), q(&err_log)));
    wait(&h, "logging resumes and rotates", || {
        is_regular(&logs.join("web-0.stdout.log.1"))
    });
    let out = h.sluice(&["logs", "web/0", "-n", "3"]).success();
    assert!(out.stdout.contains("tick "), "{out}");

    // Rotation: backups swapped for links are renamed and removed as links, never followed.
    let backup1 = logs.join("web-0.stdout.log.1");
    let backup2 = logs.join("web-0.stdout.log.2");
    as_nobody(&format!(
        "ln -sfn {} {} && ln -sfn {} {}",
        q(&secret.path),
        q(&backup2),
        q(&shadow.path),
        q(&backup1)
    ));
    wait(&h, "two rotations moved the planted links away", || {
        is_regular(&backup1) && is_regular(&backup2)
    });
    for t in targets {
        t.assert_untouched("after rotations over planted backups");
    }

    // The current log swapped for a link between rotations: the shim's next file is refused or
    // fresh, `logs` refuses the link, nothing reaches the target.
    as_nobody(&format!("ln -sfn {} {}", q(&shadow.path), q(&out_log)));
    let out = h.sluice(&["logs", "web/0", "-n", "50"]);
    if out.code == Some(0) {
        // A rotation may have moved the link away already; then a regular file was read.
        assert!(!out.stdout.contains("SHADOW-LIKE-HASH"), "{out}");
    } else {
        assert!(out.stderr.contains("refusing"), "{out}");
    }
    assert!(!format!("{out}").contains("SHADOW-LIKE-HASH"), "{out}");
    wait(&h, "rotation renamed the link away", || {
        is_regular(&out_log)
    });

    // `logs -f` across rotations while the user keeps swapping the current file.
    let mut follow = h
        .sluice_command(&["logs", "web/0", "-f", "-n", "1"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(h.path("follow.stderr")).unwrap())
        .spawn()
        .expect("spawning `sluice logs -f`");
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Swapping starts once the follower has read the regular file.
    let first = rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
        panic!(
            "`logs -f` printed nothing\n{}",
            std::fs::read_to_string(h.path("follow.stderr")).unwrap_or_default()
        )
    });
    let started = Instant::now();
    let mut swaps = 0;
    while started.elapsed() < FOLLOW_WATCH {
        // A link or a fifo in place of the current file, then a pause in which a rotation (about
        // every 0.8 s at this rate) moves it away and the shim starts a fresh file to follow.
        if swaps % 2 == 0 {
            as_nobody(&format!("ln -sfn {} {}", q(&secret.path), q(&out_log)));
        } else {
            as_nobody(&format!("rm -f {0} && mkfifo {0}", q(&out_log)));
        }
        swaps += 1;
        std::thread::sleep(Duration::from_millis(800));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let followed: Vec<String> = std::iter::once(first).chain(rx.try_iter()).collect();
    let lines = followed.iter().filter(|l| l.starts_with("tick ")).count();
    let followed = followed.join("\n");
    assert!(
        lines >= 10,
        "`logs -f` followed the log across rotations ({lines} lines):\n{followed}\n--- its stderr\n{}",
        std::fs::read_to_string(h.path("follow.stderr")).unwrap_or_default()
    );
    assert!(
        !followed.contains(&secret.secret()) && !followed.contains("SHADOW-LIKE-HASH"),
        "`logs -f` printed a target:\n{followed}"
    );
    for t in targets {
        t.assert_untouched("after logs -f");
    }

    // Supervision went on all along: the same instance, the same shim, status answers.
    let s = h.status();
    assert_eq!(s.pid("web", 0), Some(pid), "{s}");
    assert_eq!(s.shim_pid("web", 0), Some(shim), "{s}");
    assert_eq!(s.state("web", 0), "running", "{s}");

    // Restart with both logs planted as links: the new instance runs, nothing follows.
    as_nobody(&format!(
        "ln -sfn {} {} && ln -sfn {} {}",
        q(&secret.path),
        q(&out_log),
        q(&shadow.path),
        q(&err_log)
    ));
    h.sluice(&["restart", "web"]).success();
    let s = h.wait_until(
        |s| s.running("web") == 1 && s.pid("web", 0).is_some_and(|p| p != pid),
        PATIENCE,
    );
    assert_eq!(s.state("web", 0), "running", "{s}");
    as_nobody(&format!("rm -f {} {}", q(&out_log), q(&err_log)));
    wait(&h, "logging resumes after the restart", || {
        std::fs::metadata(&out_log).is_ok_and(|m| m.is_file() && m.len() > 0)
    });
    for t in targets {
        t.assert_untouched("at the end");
    }
}

/// A group and two users made for one test, removed at the end.
struct Accounts {
    group: String,
    users: Vec<String>,
}

impl Accounts {
    fn new(tag: &str) -> Accounts {
        let group = format!("slc{tag}");
        let accounts = Accounts {
            group: group.clone(),
            users: vec![format!("slc{tag}m"), format!("slc{tag}n")],
        };
        accounts.remove();
        let run = |args: &[&str]| {
            let mut cmd = Command::new(args[0]);
            cmd.args(&args[1..]);
            let out = run_bounded(cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(out.code, Some(0), "{out}");
        };
        run(&["groupadd", &group]);
        // The member is in the group as a supplementary group, in the group database only.
        run(&[
            "useradd",
            "-M",
            "-N",
            "-s",
            "/bin/sh",
            "-G",
            &group,
            &accounts.users[0],
        ]);
        run(&["useradd", "-M", "-N", "-s", "/bin/sh", &accounts.users[1]]);
        accounts
    }

    fn remove(&self) {
        for user in &self.users {
            let _ = Command::new("userdel")
                .arg(user)
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("groupdel")
            .arg(&self.group)
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        self.remove();
    }
}

#[test]
fn control_socket_is_for_control_group_members_only_and_the_lock_is_private() {
    if !require_root() {
        return;
    }
    let h = Host::new();
    let accounts = Accounts::new(&format!("{}", std::process::id() % 100_000));
    std::fs::set_permissions(h.root(), std::fs::Permissions::from_mode(0o711)).unwrap();
    for file in ["sluice.toml", "services"] {
        std::fs::set_permissions(h.path(file), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    h.write_host_file(&format!(
        "data_dir = \"data\"\nruntime_dir = \"run\"\nservices_dir = \"services\"\ncontrol_group = \"{}\"\n",
        accounts.group
    ));
    std::fs::set_permissions(h.host_file(), std::fs::Permissions::from_mode(0o644)).unwrap();
    h.start_daemon();

    let gid = nix_gid(&accounts.group);
    let lock = std::fs::metadata(h.path("run/sluice.lock")).unwrap();
    assert_eq!(lock.mode() & 0o7777, 0o600, "daemon lock mode");
    assert_eq!(lock.uid(), 0);
    let socket = std::fs::metadata(h.path("run/sluice.sock")).unwrap();
    assert_eq!(socket.mode() & 0o7777, 0o660, "control socket mode");
    assert_eq!(
        (socket.uid(), socket.gid()),
        (0, gid),
        "control socket owner"
    );
    let shims = std::fs::metadata(h.path("run/shims")).unwrap();
    assert_eq!(shims.mode() & 0o7777, 0o700, "shims directory mode");
    let run = std::fs::metadata(h.path("run")).unwrap();
    assert_eq!(
        run.mode() & 0o022,
        0,
        "runtime_dir is writable by root alone"
    );

    // `useradd -N` gives no group of the user's name: the primary group is `users` (100); the
    // control group comes from the group database only (`--init-groups`).
    let as_user = |user: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            format!("--reuid={user}"),
            "--regid=100".to_owned(),
            "--init-groups".to_owned(),
        ]);
        cmd.arg(h.sluice_bin())
            .arg("--config")
            .arg(h.host_file())
            .arg("status");
        run_bounded(cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"))
    };
    let member = as_user(&accounts.users[0]);
    assert_eq!(
        member.code,
        Some(0),
        "a control_group member runs status\n{member}"
    );
    let other = as_user(&accounts.users[1]);
    assert_eq!(
        other.code,
        Some(4),
        "a non-member cannot reach the socket\n{other}"
    );
    // Nobody else can take the daemon lock to keep sluice from starting.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "flock",
        "-n",
    ])
    .arg(h.path("run/sluice.lock"))
    .arg("true");
    let out = run_bounded(cmd, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(out.code, Some(0), "nobody opened the daemon lock\n{out}");
}

/// The gid of a group, from the group database.
fn nix_gid(group: &str) -> u32 {
    let mut cmd = Command::new("getent");
    cmd.args(["group", group]);
    let out = run_bounded(cmd, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    out.stdout
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or_else(|| panic!("no gid for {group}: {out}"))
}

/// Packs `build` (one file, `hello`) as `store/<build>.tar.gz` with its `.sha256` sidecar.
fn pack(h: &Host, build: &str) {
    let stage = h.path(&format!("stage-{build}"));
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::write(stage.join("hello"), format!("this is {build}\n")).unwrap();
    let archive = h.path(&format!("store/{build}.tar.gz"));
    std::fs::create_dir_all(archive.parent().unwrap()).unwrap();
    let mut cmd = Command::new("tar");
    cmd.arg("-czf").arg(&archive).arg("-C").arg(&stage).arg(".");
    let out = run_bounded(cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.code, Some(0), "{out}");
    let mut cmd = Command::new("sha256sum");
    cmd.arg(&archive);
    let out = run_bounded(cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    let mut sidecar = archive.into_os_string();
    sidecar.push(".sha256");
    std::fs::write(sidecar, out.stdout).unwrap();
}

#[test]
fn service_user_plants_links_and_fifos_in_its_releases_and_deploy_and_prune_never_follow_them() {
    if !require_root() {
        return;
    }
    let h = Host::new();
    std::fs::set_permissions(h.root(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let secret = Target::new(h.path("secret"), "ROOT-ONLY-RELEASE-SECRET\n");
    // A root-only directory with a file: pruning must not descend into it through a link.
    let vault = h.path("vault");
    std::fs::create_dir(&vault).unwrap();
    std::fs::set_permissions(&vault, std::fs::Permissions::from_mode(0o700)).unwrap();
    let kept = Target::new(vault.join("kept"), "VAULT-CONTENT\n");
    for build in ["b1", "b2", "b3"] {
        pack(&h, build);
    }
    h.service(
        "web",
        &format!(
            r#"
command = ["/bin/sh", "-c", "cat {{release_dir}}/hello; exec sleep 1000"]
user = "nobody"
stop_grace_ms = 2000
env = {{ PATH = "/usr/bin:/bin" }}
[build]
source = "file://{}/{{build}}.tar.gz"
keep_releases = 1
"#,
            h.path("store").display()
        ),
    );
    h.start_daemon();
    let releases = h.path("data/web/releases");
    let q = |p: &Path| sh_quote(p);
    // The release handed to the service's user (as a hook running as that user would own what it
    // made), who then fills it with links to root-only files, a link to a root-only directory,
    // fifos, and links where sluice's own files are.
    let plant = |build: &str| {
        let dir = releases.join(build);
        let mut cmd = Command::new("chown");
        cmd.args(["-R", "--no-dereference", "65534:65534"])
            .arg(&dir);
        let out = run_bounded(cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.code, Some(0), "{out}");
        as_nobody(&format!(
            "cd {dir} && ln -sfn {secret} hello && ln -s {vault} vaultlink && mkfifo pipe \
             && mkdir -p deep/a/b && ln -s {secret} deep/a/b/f && ln -s {vault} deep/a/v \
             && mkfifo deep/a/pipe",
            dir = q(&dir),
            secret = q(&secret.path),
            vault = q(&vault),
        ));
    };
    let mut last_pid = None;
    for (n, build) in ["b1", "b2", "b3"].into_iter().enumerate() {
        h.sluice(&["deploy", "web", build]).success();
        let s = h.wait_until(
            |s| {
                s.service("web")["build"] == build
                    && s.service("web")["deploy"].is_null()
                    && s.running("web") == 1
                    && s.pid("web", 0) != last_pid
            },
            PATIENCE,
        );
        last_pid = s.pid("web", 0);
        plant(build);
        for t in [&secret, &kept] {
            t.assert_untouched(&format!("after deploy {}", n + 1));
        }
    }
    // keep_releases 1 keeps the serving release and the one before: b1 goes.
    wait(&h, "b1 is pruned", || !releases.join("b1").exists());
    assert!(releases.join("b2").is_dir() && releases.join("b3").is_dir());
    for t in [&secret, &kept] {
        t.assert_untouched("after pruning");
    }
    assert!(
        vault.join("kept").is_file(),
        "the linked directory was not emptied"
    );
    // Supervision goes on: the instance is the one b3 started, the status answers.
    let s = h.status();
    assert_eq!(s.pid("web", 0), last_pid, "{s}");
    assert_eq!(s.state("web", 0), "running", "{s}");
}
