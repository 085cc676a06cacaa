//! End-to-end harness for sluice: a throw-away host (host file, service files, data and runtime dirs
//! in a temp dir), the real `sluice` daemon and CLI, status polling, `/proc` scans, and a teardown that
//! leaves no daemon, shim or instance behind.
//!
//! Tests read like the scenario they check:
//!
//! ```no_run
//! # use sluice_tests::*;
//! let h = Host::new();
//! h.service("web", r#"command = ["/bin/sleep", "1000"]
//! instances = 4"#);
//! h.start_daemon();
//! h.wait_until(|s| s.running("web") == 4, PATIENCE);
//! h.sluice(&["restart", "web"]).success();
//! ```
//!
//! Every wait is bounded and polls; no fixed sleep stands in for an assertion.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod benchkit;
pub mod fixtures;
pub mod fleet;
pub mod load;
pub mod matrix;
pub mod nemesis;
pub mod netns;
pub mod tmux;
pub mod watchdog;
pub mod zk;
pub mod zkcost;

/// Upper bound for anything that should happen "soon" on a loaded 2-core machine running tests in
/// parallel; generous because a timeout only costs time when the test fails anyway.
pub const PATIENCE: Duration = Duration::from_secs(20);
/// How long one CLI call may take before the harness kills it and fails the test.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval of `wait_until` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long teardown lets `sluice shutdown` stop everything before it kills what is left.
const TEARDOWN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the daemon's log a failing test prints.
const DAEMON_LOG_TAIL_LINES: usize = 200;

/// The directory holding `sluice`, `sluiced` (which `sluice run` executes) and `sluice-shim`: `SLUICE_BIN_DIR`, else `target/<profile>`,
/// two levels up from this test binary (`target/<profile>/deps/e2e-…`).
pub fn bin_dir() -> PathBuf {
    let dir = match std::env::var_os("SLUICE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("the test binary knows its path");
            exe.parent()
                .and_then(Path::parent)
                .expect("the test binary lives in target/<profile>/deps")
                .to_owned()
        }
    };
    for name in ["sluice", "sluiced", "sluice-shim"] {
        assert!(
            dir.join(name).is_file(),
            "{} does not exist: run `cargo build --workspace` first (or set SLUICE_BIN_DIR)",
            dir.join(name).display()
        );
    }
    dir
}

/// Whether the tests run as root (privilege drop needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A test that needs root calls this first: returns false (after saying so) when it must skip.
/// CI runs as root and must never skip, so with `CI=true` a missing privilege is a failure.
pub fn require_root() -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("this test needs root, and CI must never skip it");
    }
    println!("skipping: needs root");
    false
}

/// What a finished CLI call left: exit code, stdout, stderr and how long it took.
#[derive(Debug, Clone)]
pub struct Out {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// The command line, for messages.
    pub what: String,
}

impl Out {
    /// Asserts exit code 0 and returns `self` for further checks.
    #[track_caller]
    pub fn success(self) -> Self {
        self.code(0)
    }

    /// Asserts the exit code and returns `self` for further checks.
    #[track_caller]
    pub fn code(self, want: i32) -> Self {
        assert_eq!(self.code, Some(want), "unexpected exit code of {self}");
        self
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}`: exit {:?} after {:?}\n--- stdout\n{}--- stderr\n{}---",
            self.what, self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with piped output, killing it after `timeout`. Never panics, so
/// teardown can use it while a test is already panicking.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Out, String> {
    let what = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {what}: {e}"))?;
    // Reader threads, so a chatty command cannot block on a full pipe while we wait for it.
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = reader(Box::new(child.stdout.take().expect("piped")));
    let stderr = reader(Box::new(child.stderr.take().expect("piped")));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for {what}: {e}")),
        }
    };
    Ok(Out {
        code: status.code(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        what,
    })
}

/// `sluice status --json`, with accessors for what tests ask about.
#[derive(Debug, Clone)]
pub struct Status(pub Value);

impl Status {
    /// The instances of `service`, in index order; empty when the service is unknown.
    pub fn instances(&self, service: &str) -> Vec<&Value> {
        self.0["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["service"] == service)
            .flat_map(|s| s["instances"].as_array().into_iter().flatten())
            .collect()
    }

    /// One instance's JSON object; `Value::Null` when it is not listed.
    pub fn instance(&self, service: &str, index: u32) -> &Value {
        static NULL: Value = Value::Null;
        self.instances(service)
            .into_iter()
            .find(|i| i["index"] == index)
            .unwrap_or(&NULL)
    }

    /// The service's own object (front port, restart_pending); `Value::Null` when unknown.
    pub fn service(&self, service: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.0["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == service)
            .unwrap_or(&NULL)
    }

    /// Whether a restart of `service` is under way. The status has shown this two ways: a
    /// `restart_pending` list of instances, and later a `restart` object (null when idle); either
    /// one counts, so the tests check behaviour rather than the field's shape.
    pub fn restart_in_progress(&self, service: &str) -> bool {
        let s = self.service(service);
        let pending = s["restart_pending"]
            .as_array()
            .is_some_and(|p| !p.is_empty());
        pending || !s["restart"].is_null()
    }

    /// The state of `service/index`, `""` when it is not listed.
    pub fn state(&self, service: &str, index: u32) -> &str {
        self.instance(service, index)["state"]
            .as_str()
            .unwrap_or("")
    }

    /// How many instances of `service` are `running`.
    pub fn running(&self, service: &str) -> usize {
        self.instances(service)
            .iter()
            .filter(|i| i["state"] == "running")
            .count()
    }

    /// Whether `service` lists exactly `n` instances and all are `running`.
    pub fn all_running(&self, service: &str, n: usize) -> bool {
        self.instances(service).len() == n && self.running(service) == n
    }

    pub fn pid(&self, service: &str, index: u32) -> Option<i32> {
        as_pid(&self.instance(service, index)["pid"])
    }

    pub fn shim_pid(&self, service: &str, index: u32) -> Option<i32> {
        as_pid(&self.instance(service, index)["shim_pid"])
    }

    /// Instance pids of `service` in index order (`None` for an instance without a process).
    pub fn pids(&self, service: &str) -> Vec<Option<i32>> {
        self.instances(service)
            .iter()
            .map(|i| as_pid(&i["pid"]))
            .collect()
    }

    /// Shim pids of `service` in index order.
    pub fn shim_pids(&self, service: &str) -> Vec<Option<i32>> {
        self.instances(service)
            .iter()
            .map(|i| as_pid(&i["shim_pid"]))
            .collect()
    }

    /// Every pid (instance and shim) the status mentions.
    fn all_pids(&self) -> Vec<i32> {
        self.0["services"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["instances"].as_array().into_iter().flatten())
            .flat_map(|i| [as_pid(&i["pid"]), as_pid(&i["shim_pid"])])
            .flatten()
            .collect()
    }
}

fn as_pid(value: &Value) -> Option<i32> {
    value.as_i64().map(|p| p as i32)
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string_pretty(&self.0).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// One throw-away sluice host: a temp dir with `sluice.toml`, `services/`, `data/`, `run/`, and at
/// most one daemon at a time. Dropping it stops and kills everything the test started.
pub struct Host {
    /// Owns the directory; removed after teardown.
    dir: tempfile::TempDir,
    /// The temp dir's path; every shim's command line mentions it (its socket), which is how
    /// teardown finds shims no status ever showed.
    root: PathBuf,
    host_file: PathBuf,
    bin_dir: PathBuf,
    /// The running `sluice run`, our child, so we reap it.
    daemon: Mutex<Option<Child>>,
    /// stdout and stderr of every daemon this host started, appended; printed when a test fails.
    daemon_log: PathBuf,
    /// Instance and shim pids the test saw, with their start time (field 22 of `/proc/<pid>/stat`),
    /// so teardown kills them and never a later process that reused the pid.
    seen: Mutex<BTreeMap<i32, u64>>,
    /// The network namespace the daemon and the CLI run in, when the test made one.
    netns: Option<fs::File>,
    /// Size in bytes of the tmpfs each daemon of this host mounts over `data/` in a mount
    /// namespace of its own (see [`Host::with_data_on_tmpfs`]).
    data_tmpfs_bytes: Option<u64>,
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

impl Host {
    /// A fresh host with the host file written and no service yet.
    pub fn new() -> Host {
        let bin_dir = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("sluice-e2e-")
            .tempdir()
            .expect("creating a temp dir");
        let root = dir.path().to_owned();
        fs::create_dir_all(root.join("services")).expect("creating services/");
        let host_file = root.join("sluice.toml");
        // Relative paths are relative to the host file, which keeps the file short and the paths
        // (unix socket paths are limited to 107 bytes) short.
        // As root, instances get cgroups: under a parent named after this host's temp dir, so that
        // hosts of parallel tests with the same service names never share one; teardown removes it.
        fs::write(
            &host_file,
            format!(
                "data_dir = \"data\"\nruntime_dir = \"run\"\nservices_dir = \"services\"\nallow_root = true\ncgroup_parent = \"{}\"\n",
                cgroup_parent_of(&root)
            ),
        )
        .expect("writing the host file");
        Host {
            daemon_log: root.join("daemon.log"),
            dir,
            root,
            host_file,
            bin_dir,
            daemon: Mutex::new(None),
            seen: Mutex::new(BTreeMap::new()),
            netns: None,
            data_tmpfs_bytes: None,
        }
    }

    /// Runs this host's daemon and CLI inside `ns` (declare the namespace before the host, so the
    /// host's teardown runs first).
    pub fn in_netns(mut self, ns: &netns::Netns) -> Host {
        let path = format!("/run/netns/{}", ns.name);
        self.netns = Some(fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}")));
        self
    }

    /// Gives each daemon of this host (and the shims and instances it starts, which inherit it) a
    /// private mount namespace with a tmpfs of `bytes` over `data/`: a small disk to fill. The
    /// mount propagates nowhere and goes when the last process in the namespace exits, so nothing
    /// is left mounted on the machine. Needs root; the test reaches the daemon's `data/` through
    /// [`Host::daemon_data_path`].
    pub fn with_data_on_tmpfs(mut self, bytes: u64) -> Host {
        fs::create_dir_all(self.root.join("data")).expect("creating data/");
        self.data_tmpfs_bytes = Some(bytes);
        self
    }

    /// `data/<relative>` as the running daemon sees it (`/proc/<pid>/root/...`, through its mount
    /// namespace): on a host [`Host::with_data_on_tmpfs`], the files on its tmpfs.
    #[track_caller]
    pub fn daemon_data_path(&self, relative: &str) -> PathBuf {
        let pid = self.daemon_pid().expect("a running daemon");
        let data = self.root.join("data").join(relative);
        Path::new(&format!("/proc/{pid}/root"))
            .join(data.strip_prefix("/").expect("an absolute temp dir"))
    }

    /// Rewrites the host file (e.g. with a `[coordination]` section), aside and renamed like a
    /// service file. Relative paths in it stay relative to the host's temp dir.
    pub fn write_host_file(&self, toml: &str) {
        let tmp = self.host_file.with_extension("toml.tmp");
        fs::write(&tmp, toml).expect("writing the host file");
        fs::rename(&tmp, &self.host_file).expect("renaming the host file");
    }

    /// Appends keys to the host file (before the daemon starts, or before a `reload`).
    pub fn add_host_keys(&self, toml: &str) {
        let text = fs::read_to_string(&self.host_file).expect("reading the host file");
        self.write_host_file(&format!("{text}{toml}"));
    }

    /// The temp dir every file of this host lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A path inside the temp dir.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    pub fn host_file(&self) -> &Path {
        &self.host_file
    }

    /// The built `sluice` binary.
    pub fn sluice_bin(&self) -> PathBuf {
        self.bin_dir.join("sluice")
    }

    /// Path of `services/<name>.toml`.
    pub fn service_file(&self, name: &str) -> PathBuf {
        self.root.join("services").join(format!("{name}.toml"))
    }

    /// Writes (or rewrites) `services/<name>.toml`. Written aside and renamed, so a reload never
    /// reads half a file.
    pub fn service(&self, name: &str, toml: &str) {
        let path = self.service_file(name);
        let tmp = path.with_extension("toml.tmp");
        fs::write(&tmp, toml).expect("writing a service file");
        fs::rename(&tmp, &path).expect("renaming a service file");
    }

    /// A `sluice --config <host file> args…` command, for callers that run it themselves (in the
    /// background, or with their own timeout). The environment is scrubbed of variables that would
    /// change what the CLI or daemon does.
    pub fn sluice_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.sluice_bin());
        cmd.arg("--config").arg(&self.host_file).args(args);
        for var in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "SLUICE_CONFIG",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("SLUICE_LOG", "info");
        if let Some(ns) = &self.netns {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = ns.as_raw_fd();
            // SAFETY: setns is async-signal-safe and touches only the child being set up.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Runs `sluice args…` to completion (at most [`CLI_TIMEOUT`]).
    #[track_caller]
    pub fn sluice(&self, args: &[&str]) -> Out {
        run_bounded(self.sluice_command(args), CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `sluice run` and waits until it answers on its control socket.
    #[track_caller]
    pub fn start_daemon(&self) {
        self.spawn_daemon(&[]);
        self.wait_reachable(PATIENCE);
    }

    /// Starts `sluice run` with extra environment variables and returns at once. Its output goes to
    /// the daemon log, which a failing test prints.
    #[track_caller]
    pub fn spawn_daemon(&self, env: &[(&str, &str)]) {
        use std::io::Write;
        let mut daemon = self.daemon.lock().unwrap();
        if let Some(child) = daemon.as_mut() {
            assert!(
                child.try_wait().ok().flatten().is_some(),
                "a daemon is already running"
            );
        }
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon_log)
            .expect("opening the daemon log");
        let _ = writeln!(log, "=== harness: starting `sluice run`");
        let mut cmd = self.sluice_command(&["run"]);
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup of the daemon log"))
            .stderr(log);
        if let Some(bytes) = self.data_tmpfs_bytes {
            private_tmpfs_over(&mut cmd, &self.root.join("data"), bytes);
        }
        *daemon = Some(cmd.spawn().expect("spawning `sluice run`"));
    }

    /// Waits until `sluice status` answers; fails at once if the daemon exited.
    #[track_caller]
    pub fn wait_reachable(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.daemon_exit_status() {
                panic!(
                    "the daemon exited ({status}) before it answered\n{}",
                    self.daemon_log_tail()
                );
            }
            let last = match self.try_status() {
                Ok(_) => return,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer within {timeout:?}: {last}\n{}",
                self.daemon_log_tail()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The daemon's exit status if it has exited (reaping it), `None` while it runs or when there
    /// is none.
    pub fn daemon_exit_status(&self) -> Option<ExitStatus> {
        let mut daemon = self.daemon.lock().unwrap();
        daemon.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// The running daemon's pid.
    pub fn daemon_pid(&self) -> Option<i32> {
        let daemon = self.daemon.lock().unwrap();
        daemon.as_ref().map(|c| c.id() as i32)
    }

    /// Waits for the daemon to exit on its own and returns its status.
    #[track_caller]
    pub fn wait_daemon_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.daemon_exit_status() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {timeout:?}\n{}",
                self.daemon_log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the daemon and reaps it. Shims and instances are not the daemon's children and
    /// must survive this.
    pub fn kill9_daemon(&self) {
        let mut daemon = self.daemon.lock().unwrap();
        if let Some(mut child) = daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `sluice status --json`, or why it failed.
    pub fn try_status(&self) -> Result<Status, String> {
        let out = run_bounded(self.sluice_command(&["status", "--json"]), CLI_TIMEOUT)?;
        if out.code != Some(0) {
            return Err(out.to_string());
        }
        let value: Value = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("status is not JSON ({e}): {out}"))?;
        let status = Status(value);
        self.note_pids(&status.all_pids());
        Ok(status)
    }

    /// `sluice status --json`; fails the test when the daemon does not answer.
    #[track_caller]
    pub fn status(&self) -> Status {
        self.try_status().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls the status until `cond` holds and returns that status; fails with the last status (or
    /// error) after `timeout`.
    #[track_caller]
    pub fn wait_until(&self, mut cond: impl FnMut(&Status) -> bool, timeout: Duration) -> Status {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_status() {
                Ok(status) if cond(&status) => return status,
                Ok(status) => status.to_string(),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "condition not met within {timeout:?}; last status:\n{last}\n{}",
                    self.daemon_log_tail()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Remembers pids the test saw (instances, shims, children found in `/proc`), so teardown kills
    /// them if they are still the same processes.
    pub fn note_pids(&self, pids: &[i32]) {
        let mut seen = self.seen.lock().unwrap();
        for &pid in pids {
            if let Some(p) = procs::get(pid) {
                seen.entry(pid).or_insert(p.starttime);
            }
        }
    }

    /// The stdout log of `service/index` (the current file, not rotations).
    pub fn log_path(&self, service: &str, index: u32) -> PathBuf {
        self.path(&format!("data/logs/{service}-{index}.stdout.log"))
    }

    /// The stderr log of `service/index`.
    pub fn stderr_log_path(&self, service: &str, index: u32) -> PathBuf {
        self.path(&format!("data/logs/{service}-{index}.stderr.log"))
    }

    /// The whole stdout of `service/index`: rotated files oldest first (`.N` … `.1`), then the
    /// current one. Missing files read as empty.
    pub fn read_log(&self, service: &str, index: u32) -> String {
        let current = self.log_path(service, index);
        let mut rotated: Vec<(u32, PathBuf)> = fs::read_dir(self.path("data/logs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let prefix = format!("{service}-{index}.stdout.log.");
                let n = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((n, entry.path()))
            })
            .collect();
        rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
        let mut text = String::new();
        for path in rotated.iter().map(|(_, p)| p).chain([&current]) {
            text.push_str(&fs::read_to_string(path).unwrap_or_default());
        }
        text
    }

    /// Waits until the stdout log of `service/index` satisfies `cond` and returns it.
    #[track_caller]
    pub fn wait_for_log(
        &self,
        service: &str,
        index: u32,
        mut cond: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.read_log(service, index);
            if cond(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "log of {service}/{index} not as expected within {timeout:?}:\n{text}\n{}",
                self.daemon_log_tail()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The daemon's whole log so far.
    pub fn daemon_log_text(&self) -> String {
        fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }

    /// The last lines of the daemon log, framed for a failure message.
    pub fn daemon_log_tail(&self) -> String {
        let text = self.daemon_log_text();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(DAEMON_LOG_TAIL_LINES);
        format!(
            "--- daemon log ({}), last {} lines\n{}\n---",
            self.daemon_log.display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    /// Live processes that belong to this host: anything whose command line mentions the temp dir
    /// (shims name their socket in it) and every seen pid that is still the same process.
    fn leftovers(&self) -> Vec<procs::Proc> {
        let root = self.root.to_string_lossy().into_owned();
        let seen = self.seen.lock().unwrap().clone();
        procs::all()
            .into_iter()
            .filter(|p| p.live())
            .filter(|p| {
                seen.get(&p.pid) == Some(&p.starttime)
                    || p.cmdline.iter().any(|arg| arg.contains(&root))
            })
            .collect()
    }

    fn teardown(&self) {
        self.kill_everything();
        remove_cgroup_parent(&cgroup_parent_of(&self.root));
        remove_tree_cgroups(&cgroup_parent_of(&self.root));
    }

    /// The `cgroup_parent` of this host's default host file (unique to the host).
    pub fn cgroup_parent(&self) -> String {
        cgroup_parent_of(&self.root)
    }

    fn kill_everything(&self) {
        let daemon_alive = {
            let mut daemon = self.daemon.lock().unwrap();
            daemon
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_none())
        };
        if daemon_alive {
            // The graceful way first: it is what the daemon is for, and it leaves nothing behind.
            let _ = run_bounded(
                self.sluice_command(&["shutdown"]),
                TEARDOWN_SHUTDOWN_TIMEOUT,
            );
        }
        self.kill9_daemon();
        // Seen instances first, by process group, so grandchildren go too: once a shim is dead,
        // nobody else would kill the group. Then shims and anything else that names the temp dir.
        for _ in 0..20 {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            for p in &left {
                let target = if p.pgid == p.pid { -p.pid } else { p.pid };
                // SAFETY: kill has no memory-safety preconditions; the pid was checked above to
                // be a process of this test (start time or command line).
                unsafe { libc::kill(target, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "teardown: processes still alive: {:?}",
            self.leftovers()
                .iter()
                .map(|p| (p.pid, p.cmdline.join(" ")))
                .collect::<Vec<_>>()
        );
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.teardown();
        if std::thread::panicking() {
            eprintln!("{}", self.daemon_log_tail());
            // On request, keep the directory of a failed test (logs, state files) for a post-mortem;
            // by default it goes, so failures do not litter the machine.
            if std::env::var_os("SLUICE_E2E_KEEP").is_some() {
                let dir =
                    std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("a temp dir"));
                eprintln!("kept the test's directory: {}", dir.keep().display());
            }
        }
    }
}

/// Makes `cmd` start in a mount namespace of its own, every mount in it private (so nothing
/// propagates back to the machine's), with a tmpfs of `bytes` mounted over `dir`.
fn private_tmpfs_over(cmd: &mut Command, dir: &Path, bytes: u64) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let target = CString::new(dir.as_os_str().as_bytes()).expect("a path without NUL");
    let options = CString::new(format!("size={bytes},mode=0755")).expect("no NUL");
    let root = c"/";
    let tmpfs = c"tmpfs";
    // SAFETY: unshare and mount are async-signal-safe system calls on strings made before the
    // fork; they touch only the child being set up.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let private = libc::MS_REC | libc::MS_PRIVATE;
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                private,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let flags = libc::MS_NOSUID | libc::MS_NODEV;
            if libc::mount(
                tmpfs.as_ptr(),
                target.as_ptr(),
                tmpfs.as_ptr(),
                flags,
                options.as_ptr().cast(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The `cgroup_parent` of a host's default host file: its temp dir's name.
fn cgroup_parent_of(root: &Path) -> String {
    root.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .expect("a temp dir has a name")
}

/// Removes a host's cgroup parent (its instance cgroups first) from the v1 `cpu` hierarchy at
/// the test process's own cgroup, where the daemon made it. Best effort: teardown never panics.
fn remove_cgroup_parent(name: &str) {
    let Ok(own) = fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    let Some(own) = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "cpu")
            .then(|| path.to_owned())
    }) else {
        return;
    };
    let dir = Path::new("/sys/fs/cgroup/cpu")
        .join(own.trim_start_matches('/'))
        .join(name);
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                let _ = fs::remove_dir(entry.path());
            }
        }
    }
    let _ = fs::remove_dir(&dir);
}

/// Removes a host's tracking cgroups (`<cgroup_parent>-tree` and its instance cgroups, empty once
/// the instances are gone) from the cgroup v2 hierarchy, or the v1 `pids` one, at the test
/// process's own cgroup, where the daemon made them. Best effort: teardown never panics.
fn remove_tree_cgroups(parent: &str) {
    let Ok(own) = fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    let mut dirs = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            for mount in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
                dirs.push(Path::new(mount).join(path));
            }
        } else if controllers.split(',').any(|c| c == "pids") {
            dirs.push(Path::new("/sys/fs/cgroup/pids").join(path));
        }
    }
    for own_dir in dirs {
        let dir = own_dir.join(format!("{parent}-tree"));
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
        let _ = fs::remove_dir(&dir);
    }
}

/// `/proc` scans: pids, parents, process groups, states and command lines.
pub mod procs {
    use std::fs;

    /// One process as `/proc/<pid>/stat` and `/proc/<pid>/cmdline` describe it.
    #[derive(Debug, Clone)]
    pub struct Proc {
        pub pid: i32,
        pub ppid: i32,
        /// Process group (field 5 of stat).
        pub pgid: i32,
        /// `R`, `S`, `D`, `Z`, …
        pub state: char,
        /// Clock ticks after boot (field 22): tells a process from a later one with the same pid.
        pub starttime: u64,
        pub cmdline: Vec<String>,
    }

    impl Proc {
        /// Not a zombie. PID 1 of the test machine may not reap orphans, so exited shims and
        /// instances can linger as zombies; they are not running.
        pub fn live(&self) -> bool {
            !matches!(self.state, 'Z' | 'X' | 'x')
        }
    }

    /// The process `pid`, if it exists (zombies included).
    pub fn get(pid: i32) -> Option<Proc> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses; the fields follow the last `)`.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some(Proc {
            pid,
            state: fields.first()?.chars().next()?,
            ppid: fields.get(1)?.parse().ok()?,
            pgid: fields.get(2)?.parse().ok()?,
            starttime: fields.get(19)?.parse().ok()?,
            cmdline,
        })
    }

    /// Every process, zombies included.
    pub fn all() -> Vec<Proc> {
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(get)
            .collect()
    }

    /// Whether `pid` exists and is not a zombie.
    pub fn is_live(pid: i32) -> bool {
        get(pid).is_some_and(|p| p.live())
    }

    /// Live processes in process group `pgid`.
    pub fn live_in_group(pgid: i32) -> Vec<Proc> {
        all()
            .into_iter()
            .filter(|p| p.pgid == pgid && p.live())
            .collect()
    }

    /// The environment of `pid`, as `KEY=value` strings.
    pub fn environ(pid: i32) -> Option<Vec<String>> {
        let bytes = fs::read(format!("/proc/{pid}/environ")).ok()?;
        Some(
            bytes
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
        )
    }

    /// The value of a `Key:` line of `/proc/<pid>/status`, whitespace-normalised.
    pub fn status_field(pid: i32, key: &str) -> Option<String> {
        let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        text.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix(':')?;
            Some(value.split_whitespace().collect::<Vec<_>>().join(" "))
        })
    }
}

/// A free TCP port on 127.0.0.1 such that `n` consecutive ports from it can be bound now. Tests
/// run in parallel, so each takes its own ports rather than a fixed number.
pub fn free_port_base(n: u16) -> u16 {
    for _ in 0..100 {
        let Ok(probe) = std::net::TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = probe.local_addr() else {
            continue;
        };
        let base = addr.port();
        drop(probe);
        if base.checked_add(n).is_none() {
            continue;
        }
        let held: Vec<_> = (base..base + n)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports found");
}

/// A seeded generator for randomized scenarios that must be replayable from the printed seed
/// (`rand`'s `StdRng`, the same one the restart simulation uses).
#[derive(Debug, Clone)]
pub struct Rng(rand::rngs::StdRng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(rand::SeedableRng::seed_from_u64(seed))
    }

    /// The seed from `SLUICE_E2E_SEED` when set (to replay a failure), else a random one.
    pub fn seed_from_env() -> u64 {
        match std::env::var("SLUICE_E2E_SEED") {
            Ok(text) => text.parse().expect("SLUICE_E2E_SEED must be a u64"),
            Err(_) => rand::random(),
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.0)
    }

    /// Uniform in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high);
        rand::Rng::random_range(&mut self.0, low..=high)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        rand::Rng::random(&mut self.0)
    }
}

/// Checks, in a daemon's log, that every stop of an instance of `service` came after a steering
/// update without it (an instance is never stopped with traffic steered to it), and returns how
/// many stops there were. Panics naming the line otherwise.
pub fn stops_after_drain(log: &str, service: &str) -> usize {
    let mut enabled: Option<std::collections::BTreeSet<u32>> = None;
    let mut stops = 0;
    let steering = format!("steering updated service={service} enabled={{");
    let stopping = format!("stopping service={service} index=");
    for line in log.lines() {
        if let Some(rest) = line.split(&steering).nth(1) {
            let set = rest.split('}').next().unwrap_or_default();
            enabled = Some(
                set.split(',')
                    .filter_map(|n| n.trim().parse().ok())
                    .collect(),
            );
        } else if let Some(rest) = line.split(&stopping).nth(1) {
            let index: u32 = rest
                .split_whitespace()
                .next()
                .and_then(|i| i.parse().ok())
                .expect("an index after `index=`");
            let set = enabled
                .as_ref()
                .unwrap_or_else(|| panic!("a stop before any steering update:\n{line}"));
            assert!(
                !set.contains(&index),
                "{service}/{index} was stopped while steering still sent it traffic ({set:?}):\n{line}"
            );
            stops += 1;
        }
    }
    stops
}

/// A ustar header block for a regular file `name` (under 100 bytes) of `size` bytes, for tests
/// that write large archives without holding them in memory.
pub fn tar_header(name: &str, size: u64) -> [u8; 512] {
    tar_header_of(name, b'0', size, false)
}

/// A tar header block of type `kind` (`b'0'` file, `b'x'` pax, `b'L'` GNU long name, …), ustar
/// or GNU when `gnu`, checksummed; `name` under 100 bytes.
pub fn tar_header_of(name: &str, kind: u8, size: u64, gnu: bool) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000001\0");
    h[156] = kind;
    if gnu {
        h[257..265].copy_from_slice(b"ustar  \0");
    } else {
        h[257..265].copy_from_slice(b"ustar\x0000");
    }
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}
