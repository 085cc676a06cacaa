//! Spawning the supervised child: its own process group, its cgroups, credentials, limits and a
//! death signal.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use sluice_privdrop::{PrivDrop, check};

use crate::args::ShimArgs;

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
pub fn spawn(args: &ShimArgs, shim_pid: libc::pid_t) -> io::Result<Spawned> {
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
    // async-signal-safe calls are allowed, so no allocation and no locks (see `sluice-privdrop`).
    let privdrop = PrivDrop {
        groups: args.groups.clone(),
        gid: args.gid,
        uid: args.uid,
        umask: args.umask,
        nofile: args.nofile,
    }
    .prepare();
    // Opened before the fork (std opens with O_CLOEXEC, so the service never inherits them); the
    // child writes "0" (itself) to each first thing, while still root, so that everything the
    // service ever runs starts inside its cgroups: the tracking one first, then the CPU one (in the
    // same hierarchy the second write moves it there, which the shim's kills cover too). The files
    // stay open in the shim only until spawn returns.
    let open_procs = |dir: &std::path::Path| {
        let path = dir.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("cgroup {}: {e}", path.display())))
    };
    let tree_procs: Option<File> = args.tree_cgroup.as_deref().map(open_procs).transpose()?;
    let cgroup_procs: Option<File> = args.cgroup.as_deref().map(open_procs).transpose()?;
    let join_fds = [
        tree_procs.as_ref().map(AsRawFd::as_raw_fd),
        cgroup_procs.as_ref().map(AsRawFd::as_raw_fd),
    ];

    let pre_exec = move || -> io::Result<()> {
        // SAFETY (whole block): only async-signal-safe libc calls on values prepared before the fork.
        unsafe {
            for fd in join_fds.into_iter().flatten() {
                let me = b"0";
                if libc::write(fd, me.as_ptr().cast(), me.len()) != me.len() as isize {
                    return Err(io::Error::last_os_error());
                }
            }
            // Default signals, the file limit (raised while still privileged), groups, gid, uid,
            // then the umask.
            privdrop.apply()?;
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
    drop((tree_procs, cgroup_procs));
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
