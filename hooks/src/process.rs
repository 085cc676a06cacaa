//! Children that sluice runs for a service outside its shim (hooks, `exec` health probes): as the
//! service's user, in a process group of their own, and killed as a group, so that nothing they
//! start outlives them or keeps the daemon's privileges.

use std::io;
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex, PoisonError};

use sluice_privdrop::PrivDrop;

use crate::Identity;

/// Makes `command` start with default signal dispositions and an empty signal mask, in a new
/// process group led by itself, as `identity` (supplementary groups, gid, then uid) when given.
/// `None` runs it as the daemon's own user: the caller decides when that is allowed. The work
/// between fork and exec is `sluice-privdrop`'s, shared with the shim.
pub fn confine(command: &mut Command, identity: Option<&Identity>) {
    let want = match identity {
        Some(id) => PrivDrop {
            groups: Some(id.groups.clone()),
            gid: Some(id.gid),
            uid: Some(id.uid),
            ..PrivDrop::default()
        },
        None => PrivDrop::default(),
    };
    sluice_privdrop::confine(command, want);
}

/// A spawned child leading its own process group (see [`confine`]). Dropping it before it was
/// reaped kills the whole group; [`GroupChild::wait`] also kills whatever the leader left in its
/// group when it exits.
pub struct GroupChild {
    group: Arc<Group>,
    waiter: tokio::task::JoinHandle<io::Result<ExitStatus>>,
    _kill_on_drop: KillOnDrop,
}

impl GroupChild {
    /// Spawns a command prepared with [`confine`]. The leader is waited for on tokio's blocking
    /// pool, without reaping it until its group is killed, so its pid (the group id) is never
    /// reused while a kill may still be sent to it.
    pub fn spawn(command: &mut Command) -> io::Result<GroupChild> {
        let child = command.spawn()?;
        let group = Arc::new(Group {
            pgid: child.id() as libc::pid_t,
            reaped: Mutex::new(false),
        });
        let waiter = tokio::task::spawn_blocking({
            let group = Arc::clone(&group);
            move || wait_and_reap(child, &group)
        });
        Ok(GroupChild {
            _kill_on_drop: KillOnDrop(Arc::clone(&group)),
            group,
            waiter,
        })
    }

    /// The process group id (the leader's pid).
    pub fn pgid(&self) -> libc::pid_t {
        self.group.pgid
    }

    /// SIGKILL to the whole group, unless the leader was already reaped.
    pub fn kill(&self) {
        self.group.kill();
    }

    /// Waits for the leader to exit; its group is killed before it is reaped.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        (&mut self.waiter)
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    }
}

/// The process group of a running child; its id is the leader's pid.
struct Group {
    pgid: libc::pid_t,
    /// Set once the leader is reaped. Until then its pid, and so the group id, cannot be reused, which
    /// is what makes `kill(-pgid)` safe; the lock keeps a kill and the reaping apart.
    reaped: Mutex<bool>,
}

impl Group {
    /// SIGKILL to every process of the group, unless the leader was already reaped.
    fn kill(&self) {
        let reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        if !*reaped {
            // SAFETY: plain syscall. ESRCH (nothing left in the group) is fine.
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        }
    }
}

struct KillOnDrop(Arc<Group>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill();
    }
}

/// Waits for the leader to exit without reaping it, kills what it left in its group, then reaps it.
/// Blocking: runs on tokio's blocking pool.
fn wait_and_reap(mut child: std::process::Child, group: &Group) -> io::Result<ExitStatus> {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on our own child.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                group.pgid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            // Someone else reaped it (ECHILD): the id may be reused, so never kill it again.
            *group.reaped.lock().unwrap_or_else(PoisonError::into_inner) = true;
            return Err(error);
        }
    }
    group.kill();
    let mut reaped = group.reaped.lock().unwrap_or_else(PoisonError::into_inner);
    let status = child.wait();
    *reaped = true;
    status
}
