//! `sluice-privdrop`: what a child of sluice becomes between fork and exec — default signal
//! dispositions and an empty signal mask, its file limit, its supplementary groups, gid and uid,
//! and its umask — written once for the shim's instances and for hooks and `exec` probes.
//!
//! The work is split in two because of where it runs. [`PrivDrop::prepare`] runs in the parent,
//! before the fork: everything the child side needs (the group list, `SIGRTMAX`) is computed and
//! allocated there. [`Prepared::apply`] runs in the forked child, from a `pre_exec` closure: after a
//! fork of a multi-threaded process only async-signal-safe calls are allowed, so it makes only
//! such libc calls, on values prepared before the fork, and allocates nothing.
//!
//! Architecture Invariant: std and libc only (the shim depends on it), and nothing after the fork
//! allocates or takes a lock.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// What a child is to become; `None` leaves that attribute as the child inherited it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrivDrop {
    /// Supplementary groups, set as given (the primary gid is not added).
    pub groups: Option<Vec<libc::gid_t>>,
    /// Primary group.
    pub gid: Option<libc::gid_t>,
    /// User.
    pub uid: Option<libc::uid_t>,
    /// File mode creation mask.
    pub umask: Option<libc::mode_t>,
    /// `RLIMIT_NOFILE`, soft and hard.
    pub nofile: Option<libc::rlim_t>,
}

impl PrivDrop {
    /// Computes, before the fork, everything [`Prepared::apply`] needs in the child.
    pub fn prepare(self) -> Prepared {
        Prepared {
            // Read before the fork: glibc computes it, and the child must not call into the C
            // library's internals.
            sigrtmax: libc::SIGRTMAX(),
            want: self,
        }
    }
}

/// A [`PrivDrop`] ready to be applied in a forked child.
#[derive(Debug, Clone)]
pub struct Prepared {
    want: PrivDrop,
    sigrtmax: libc::c_int,
}

impl Prepared {
    /// Applies the signal reset, limit, credentials and umask to the calling process. Meant for
    /// the forked child, from a `pre_exec` closure: it makes only async-signal-safe libc calls on
    /// values prepared before the fork and allocates nothing (an error is an OS error code).
    pub fn apply(&self) -> io::Result<()> {
        let want = &self.want;
        // SAFETY (whole block): plain libc calls on values owned by `self`; sigaction and
        // sigprocmask get pointers to initialised locals, setgroups a pointer and length of a live
        // vector.
        unsafe {
            // The parent may ignore signals (the shim ignores SIGPIPE/SIGHUP/SIGINT and blocks
            // SIGTERM); ignored dispositions and the mask survive exec, and a child must start with
            // the defaults.
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            for signum in 1..=self.sigrtmax {
                if signum != libc::SIGKILL && signum != libc::SIGSTOP {
                    // EINVAL for the signals glibc reserves is expected and harmless.
                    libc::sigaction(signum, &default, std::ptr::null_mut());
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            check(libc::sigprocmask(
                libc::SIG_SETMASK,
                &empty,
                std::ptr::null_mut(),
            ))?;

            // Raised first, while still privileged: after setuid a raise above the hard limit fails.
            if let Some(n) = want.nofile {
                let limit = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                check(libc::setrlimit(libc::RLIMIT_NOFILE, &limit))?;
            }
            // Groups, then gid, then uid: each step needs the privilege the next one drops. Done
            // here rather than with std's uid()/gid(), which would drop the supplementary groups
            // instead of setting them, and would run before the caller's own pre-exec steps (the
            // shim arms its death signal after the uid change, which would otherwise clear it).
            if let Some(groups) = &want.groups {
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            }
            if let Some(gid) = want.gid {
                check(libc::setgid(gid))?;
            }
            if let Some(uid) = want.uid {
                check(libc::setuid(uid))?;
            }
            if let Some(mask) = want.umask {
                libc::umask(mask);
            }
        }
        Ok(())
    }
}

/// Makes `command` start in a new process group led by itself (so that a kill of the group
/// reaches everything it starts and nothing else), with `want` applied between fork and exec.
pub fn confine(command: &mut Command, want: PrivDrop) {
    command.process_group(0);
    let prepared = want.prepare();
    // SAFETY: the closure only calls `Prepared::apply`, which is async-signal-safe and does not
    // allocate.
    unsafe { command.pre_exec(move || prepared.apply()) };
}

/// A libc return code as a result: -1 is the OS error in `errno`. Allocates nothing, so it may be
/// used between fork and exec.
pub fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    /// Runs `program args` confined as `want`, with SIGUSR1 ignored in this (the parent)
    /// process meanwhile; returns its output and pid.
    fn run_confined(program: &str, args: &[&str], want: PrivDrop) -> (String, u32) {
        let mut command = Command::new(program);
        command.args(args).stdout(Stdio::piped());
        confine(&mut command, want);
        // SAFETY: ignoring SIGUSR1 in this test process; nothing here relies on it.
        unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
        let child = command.spawn().expect("spawn");
        // SAFETY: restoring the default disposition.
        unsafe { libc::signal(libc::SIGUSR1, libc::SIG_DFL) };
        let pid = child.id();
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{program}: {out:?}");
        (String::from_utf8(out.stdout).expect("utf-8"), pid)
    }

    /// A child confined without credentials starts with default dispositions and an empty mask
    /// although its parent ignores signals (Rust ignores SIGPIPE in every program, and the test
    /// ignores SIGUSR1), with the umask and file limit asked for, in a process group of its own.
    #[test]
    fn child_starts_clean() {
        let want = PrivDrop {
            umask: Some(0o027),
            nofile: Some(512),
            ..PrivDrop::default()
        };
        let (text, _) = run_confined(
            "grep",
            &[
                "-h",
                "-E",
                "^(Umask|SigBlk|SigIgn):|^Max open files",
                "/proc/self/status",
                "/proc/self/limits",
            ],
            want.clone(),
        );
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let mask = |line: &[&str]| u64::from_str_radix(line[1], 16).expect("a hex signal mask");
        // glibc keeps the signals from the kernel's 32 to its own SIGRTMIN for itself: sigaction
        // refuses them (EINVAL), so whatever the parent had there stays.
        let reserved: u64 = (32..libc::SIGRTMIN()).map(|s| 1u64 << (s - 1)).sum();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], ["Umask:", "0027"]);
        assert_eq!(lines[1][0], "SigBlk:");
        assert_eq!(mask(&lines[1]), 0, "no blocked signal");
        assert_eq!(lines[2][0], "SigIgn:");
        assert_eq!(mask(&lines[2]) & !reserved, 0, "no ignored signal");
        assert_eq!(lines[3], ["Max", "open", "files", "512", "512", "files"]);
        let (text, pid) = run_confined("cut", &["-d", " ", "-f", "5", "/proc/self/stat"], want);
        assert_eq!(text.trim(), pid.to_string(), "leads its own process group");
    }

    /// As root, a child takes exactly the groups, gid and uid asked for. Outside CI a test run
    /// that is not root skips (CI runs as root and never skips).
    #[test]
    fn credentials_are_dropped() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI must run this as root"
            );
            eprintln!("skipping: not root");
            return;
        }
        let want = PrivDrop {
            groups: Some(vec![65_533, 65_532]),
            gid: Some(65_534),
            uid: Some(65_534),
            ..PrivDrop::default()
        };
        let (text, _) = run_confined(
            "grep",
            &["-E", "^(Uid|Gid|Groups):", "/proc/self/status"],
            want,
        );
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines,
            [
                vec!["Uid:", "65534", "65534", "65534", "65534"],
                vec!["Gid:", "65534", "65534", "65534", "65534"],
                vec!["Groups:", "65532", "65533"],
            ]
        );
    }
}
