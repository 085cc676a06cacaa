//! The shim's start-up: detach from the brain, take the instance lock, kill what a previous shim
//! of the instance left running, bind the socket, spawn the child, and report the outcome as one
//! handshake line on stdout.
//!
//! Architecture Invariant: the process the brain spawned exits at once; the shim proper is its child,
//! in a session of its own, so it is never the brain's child and outlives any brain crash.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::args::{self, ShimArgs};
use crate::event_loop::{Child, Shim};
use crate::logfile::LogFile;
use crate::{child, proto, sys, tree};

/// Exit code for a bad command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit code of the shim when start-up failed (after an `error ...` handshake line).
pub const EXIT_STARTUP: i32 = 1;

/// Runs the whole shim; never returns.
pub fn main() -> ! {
    let args = match ShimArgs::parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("sluice-shim: {message}\n{}", args::USAGE);
            std::process::exit(EXIT_USAGE);
        }
    };
    match sys::fork() {
        // The brain reaps this process at once and then only reads the handshake from the pipe.
        Ok(Some(_)) => std::process::exit(0),
        Ok(None) => {}
        Err(e) => fail(&format!("fork: {e}")),
    }
    if let Err(e) = sys::setsid() {
        fail(&format!("setsid: {e}"));
    }
    sys::close_fds_from(3);
    // A client that hangs up makes a write fail with EPIPE instead of killing the shim; the shim has no
    // terminal, but a stray HUP or INT must not take the child's supervisor away either.
    for signum in [libc::SIGPIPE, libc::SIGHUP, libc::SIGINT] {
        sys::ignore_signal(signum);
    }
    let shim = start(args);
    shim.run()
}

/// Everything from the lock to the handshake; on failure writes `error ...` and exits 1.
fn start(args: ShimArgs) -> Shim {
    let shim_pid = std::process::id() as libc::pid_t;
    let (lock, predecessor) = take_lock(&args, shim_pid);
    let stdout_log = open_log(&args.stdout_log, &args);
    let stderr_log = open_log(&args.stderr_log, &args);
    let signals = sys::sigterm_fd().unwrap_or_else(|e| fail(&format!("signalfd: {e}")));
    let listener = bind(&args.socket);
    if let Err(message) = kill_predecessor(&args, predecessor) {
        let _ = std::fs::remove_file(&args.socket);
        fail(&message);
    }

    let spawned = match child::spawn(&args, shim_pid) {
        Ok(spawned) => spawned,
        Err(e) => {
            let _ = std::fs::remove_file(&args.socket);
            fail(&format!("spawn {}: {e}", args.program.to_string_lossy()));
        }
    };
    let started_ms = sys::now_ms();
    let started_boot_ms = sys::boot_ms();
    let pidfd = match sys::pidfd_open(spawned.pid) {
        Ok(fd) => fd,
        Err(e) => {
            // Without a pidfd the loop cannot learn of the exit; do not leave an unsupervised child.
            let _ = sys::kill(-spawned.pid, libc::SIGKILL);
            sys::waitpid_blocking(spawned.pid);
            let _ = std::fs::remove_file(&args.socket);
            fail(&format!("pidfd_open {}: {e}", spawned.pid));
        }
    };
    for pipe in [&spawned.stdout, &spawned.stderr] {
        // Cannot fail on a pipe we own; if it somehow did, a blocking read would only delay the loop.
        let _ = sys::set_nonblocking(pipe);
    }

    let line = proto::format_handshake(shim_pid as u32, spawned.pid as u32) + "\n";
    // If the brain is gone already there is nobody to tell; the shim carries on regardless.
    let _ = sys::write_all_fd(1, line.as_bytes());
    let _ = sys::stdio_to_dev_null();

    Shim::new(
        args,
        shim_pid,
        lock,
        listener,
        signals,
        Child {
            pid: spawned.pid,
            started_ms,
            started_boot_ms,
            pidfd: Some(pidfd),
        },
        [(spawned.stdout, stdout_log), (spawned.stderr, stderr_log)],
    )
}

/// The previous shim of an instance, as its lock file names it: pid and start time (clock ticks
/// after boot; absent in files written before issue 10).
type Predecessor = (libc::pid_t, Option<u64>);

/// Takes the instance lock, or reports who holds it, and returns the previous shim the file names
/// (`None`: the first shim of the instance). The file holds `<pid> <start time>`. It is never
/// unlinked: unlinking would let a second shim lock a fresh inode while the first still holds the
/// old one.
fn take_lock(args: &ShimArgs, shim_pid: libc::pid_t) -> (File, Option<Predecessor>) {
    let path = &args.lock;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        // Not truncated on open: a loser of the lock race must still read the holder's pid.
        .truncate(false)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| fail(&format!("lock {}: {e}", path.display())));
    match sys::try_lock_exclusive(&file) {
        Ok(true) => {}
        Ok(false) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.split_whitespace().next().unwrap_or("?");
            fail(&format!(
                "busy: instance {} already has a shim (pid {holder})",
                args.id
            ));
        }
        Err(e) => fail(&format!("lock {}: {e}", path.display())),
    }
    // Read before it is overwritten: the session of that shim is where its survivors are found
    // when there is no tracking cgroup.
    let mut previous = String::new();
    let _ = file.read_to_string(&mut previous);
    let mut words = previous.split_whitespace();
    let predecessor = words
        .next()
        .and_then(|pid| pid.parse().ok())
        .filter(|&pid: &libc::pid_t| pid > 1 && pid != shim_pid)
        .map(|pid| (pid, words.next().and_then(|t| t.parse().ok())));
    let record = match tree::starttime(shim_pid) {
        Some(start) => format!("{shim_pid} {start}\n"),
        None => format!("{shim_pid}\n"),
    };
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(record.as_bytes()));
    if let Err(e) = written {
        fail(&format!("lock {}: {e}", path.display()));
    }
    (file, predecessor)
}

/// Kills whatever the instance's previous shim left running (it was killed itself, so its
/// child's descendants lost their supervisor): every process in the tracking cgroup (and the CPU
/// cgroup) of the instance, and every process of the previous shim's session. We hold the lock,
/// so no other shim of the instance is alive: nothing there is anyone's to keep. Refuses to start
/// (the brain retries after its backoff) while any of them survives, so a new instance never runs
/// beside an old one.
fn kill_predecessor(args: &ShimArgs, predecessor: Option<Predecessor>) -> Result<(), String> {
    let timeout = std::time::Duration::from_millis(tree::PREDECESSOR_KILL_TIMEOUT_MS);
    let me = std::process::id() as libc::pid_t;
    for dir in [&args.tree_cgroup, &args.cgroup].into_iter().flatten() {
        let left = tree::kill_cgroup(dir, timeout)
            .map_err(|e| format!("cgroup {}: {e}", dir.display()))?;
        if !left.is_empty() {
            return Err(format!(
                "cgroup {}: {} process(es) of the previous instance still alive after {} ms: {left:?}",
                dir.display(),
                left.len(),
                tree::PREDECESSOR_KILL_TIMEOUT_MS
            ));
        }
    }
    if let Some((sid, start)) = predecessor {
        let left = tree::kill_session(sid, me, Some(start), timeout);
        if !left.is_empty() {
            return Err(format!(
                "session {sid} of the previous shim: {} process(es) still alive after {} ms: {left:?}",
                left.len(),
                tree::PREDECESSOR_KILL_TIMEOUT_MS
            ));
        }
    }
    Ok(())
}

fn open_log(path: &Path, args: &ShimArgs) -> LogFile {
    LogFile::open(path, args.log_max_bytes, args.log_backups)
        .unwrap_or_else(|e| fail(&format!("log {}: {e}", path.display())))
}

/// Binds the control socket with mode 0600. A leftover socket file is stale: we hold the instance
/// lock, so no other live shim can be serving it.
fn bind(path: &Path) -> UnixListener {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            fail(&format!("socket {}: {e}", path.display()))
        }
        _ => {}
    }
    // The umask, not a chmod after bind, so there is no moment where others could connect.
    let old = sys::umask(0o177);
    let bound = UnixListener::bind(path);
    sys::umask(old);
    let listener = bound.unwrap_or_else(|e| fail(&format!("socket {}: {e}", path.display())));
    if let Err(e) = listener.set_nonblocking(true) {
        let _ = std::fs::remove_file(path);
        fail(&format!("socket {}: {e}", path.display()));
    }
    debug_assert!(listener.as_raw_fd() > 2);
    listener
}

/// Writes the `error <message>` handshake line and exits with [`EXIT_STARTUP`].
fn fail(message: &str) -> ! {
    let _ = sys::write_all_fd(1, format!("error {message}\n").as_bytes());
    std::process::exit(EXIT_STARTUP)
}
