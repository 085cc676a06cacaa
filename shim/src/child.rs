//! Spawning the supervised child: its own process group, credentials, limits and a death signal.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::args::Args;

/// The spawned child, as the poll loop needs it.
pub struct Spawned {
    /// Its pid, which is also its process group id (`process_group(0)`).
    pub pid: libc::pid_t,
    /// Read end of its stdout pipe.
    pub stdout: File,
    /// Read end of its stderr pipe.
    pub stderr: File,
}

/// Spawns the child described by `args`. `shim_pid` is this process's pid, checked by the child after
/// it arms its death signal.
pub fn spawn(args: &Args, shim_pid: libc::pid_t) -> io::Result<Spawned> {
    let mut command = Command::new(&args.program);
    command
        .args(&args.program_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so `kill(-pid)` reaches everything the service forks and nothing else.
        .process_group(0);
    if let Some(cwd) = &args.cwd {
        command.current_dir(cwd);
    }

    // Everything the closure touches is computed here, before the fork: between fork and exec only
    // async-signal-safe calls are allowed, so no allocation and no locks.
    let groups: Option<Vec<libc::gid_t>> = args.groups.clone();
    let gid = args.gid;
    let uid = args.uid;
    let umask = args.umask;
    let nofile = args.nofile;
    let sigrtmax = libc::SIGRTMAX();
    // Opened before the fork (std opens with O_CLOEXEC, so the service never inherits it); the
    // child writes "0" (itself) to it first thing, while still root, so that everything the service
    // ever runs starts inside its cgroup. The file stays open in the shim only until spawn returns.
    let cgroup_procs = match &args.cgroup {
        Some(dir) => {
            let path = dir.join("cgroup.procs");
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("cgroup {}: {e}", path.display())))?;
            Some(file)
        }
        None => None,
    };
    let cgroup_fd = cgroup_procs.as_ref().map(AsRawFd::as_raw_fd);

    let pre_exec = move || -> io::Result<()> {
        let check = |ret: libc::c_int| {
            if ret == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY (whole block): only async-signal-safe libc calls on values prepared before the fork.
        unsafe {
            if let Some(fd) = cgroup_fd {
                let me = b"0";
                if libc::write(fd, me.as_ptr().cast(), me.len()) != me.len() as isize {
                    return Err(io::Error::last_os_error());
                }
            }
            // The shim ignores SIGPIPE/SIGHUP/SIGINT and blocks SIGTERM; ignored dispositions and the
            // mask survive exec, and a service must start with the defaults.
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            for signum in 1..=sigrtmax {
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
            if let Some(n) = nofile {
                let limit = libc::rlimit {
                    rlim_cur: n as libc::rlim_t,
                    rlim_max: n as libc::rlim_t,
                };
                check(libc::setrlimit(libc::RLIMIT_NOFILE, &limit))?;
            }
            // Groups, then gid, then uid: each step needs the privilege the next one drops. Done here
            // rather than with std's uid()/gid(), which would drop supplementary groups and run before
            // this closure, i.e. before the death signal below could be armed after the uid change.
            if let Some(groups) = &groups {
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            }
            if let Some(gid) = gid {
                check(libc::setgid(gid))?;
            }
            if let Some(uid) = uid {
                check(libc::setuid(uid))?;
            }
            if let Some(mask) = umask {
                libc::umask(mask as libc::mode_t);
            }
            // After setuid, because a credential change clears the parent-death signal. If the shim
            // dies (even by SIGKILL) the child dies too, rather than running on unsupervised.
            check(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ))?;
            // The shim may have died before the prctl took effect; then nobody would ever kill us.
            if libc::getppid() != shim_pid {
                libc::_exit(127);
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe calls and does not allocate.
    unsafe { command.pre_exec(pre_exec) };

    let spawned = command.spawn();
    // Closed now: the child has joined (or failed to, which fails the spawn) and exec closed its copy.
    drop(cgroup_procs);
    let mut child = spawned?;
    let pid = child.id() as libc::pid_t;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("stdout and stderr were set to piped");
    };
    // The std Child is dropped without waiting: the poll loop reaps the pid itself through a pidfd.
    Ok(Spawned {
        pid,
        stdout: File::from(std::os::fd::OwnedFd::from(stdout)),
        stderr: File::from(std::os::fd::OwnedFd::from(stderr)),
    })
}
