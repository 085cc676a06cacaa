//! The instance's whole process tree: every process it forks, `setsid` or not, is found through
//! its tracking cgroup and killed with it; without a cgroup, through the session the shim made.
//!
//! A pid alone is never killed: a member is opened as a pidfd first, its membership is read again
//! while the pidfd shows it still alive, and the signal goes through the pidfd. So a process that
//! exited meanwhile and whose pid a stranger reused is never hit.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::sys;

/// How long a new shim waits for the processes its predecessor left to die before it refuses to
/// start (the brain then counts a failed start and tries again after its backoff).
pub const PREDECESSOR_KILL_TIMEOUT_MS: u64 = 5_000;
/// How long a shim whose child exited goes on killing what is left of the tree (a member forking
/// while it is killed shows up in the next round).
pub const EXIT_KILL_TIMEOUT_MS: u64 = 1_000;
/// Pause between two rounds of a kill.
const KILL_ROUND_PAUSE_MS: u64 = 5;

/// One process as `/proc/<pid>/stat` shows it.
struct Stat {
    state: u8,
    ppid: libc::pid_t,
    session: libc::pid_t,
    /// Clock ticks after boot when it started (field 22): tells a process from a later one that
    /// reused its pid.
    starttime: u64,
}

fn stat(pid: libc::pid_t) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain spaces and ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.bytes().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let _pgrp = fields.next()?;
    let session = fields.next()?.parse().ok()?;
    // Fields 7 to 21, then the start time.
    let starttime = fields.nth(15)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        session,
        starttime,
    })
}

/// The parent of process `pid`; `None` once it has gone.
pub fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    stat(pid).map(|s| s.ppid)
}

/// The start time (clock ticks after boot) of process `pid`, to record beside its pid.
pub fn starttime(pid: libc::pid_t) -> Option<u64> {
    stat(pid).map(|s| s.starttime)
}

/// Live (not zombie) processes listed in `dir/cgroup.procs`; a cgroup that is gone has none.
fn members(dir: &Path) -> io::Result<Vec<libc::pid_t>> {
    let text = match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&pid| stat(pid).is_some_and(|s| s.state != b'Z'))
        .collect())
}

/// SIGKILLs each of `pids` that `still_member` confirms while its pidfd shows it alive.
fn kill_confirmed(pids: &[libc::pid_t], still_members: impl Fn() -> Vec<libc::pid_t>) {
    let opened: Vec<(libc::pid_t, std::os::fd::OwnedFd)> = pids
        .iter()
        .filter_map(|&pid| sys::pidfd_open(pid).ok().map(|fd| (pid, fd)))
        .collect();
    // Read after the pidfds were opened: a pid listed now and whose pidfd is not yet readable
    // below is the very process the pidfd names (a pid has one owner at a time).
    let confirmed = still_members();
    for (pid, fd) in opened {
        if confirmed.contains(&pid) && !sys::pidfd_exited(&fd) {
            // ESRCH: it exited in between, which is what we wanted.
            let _ = sys::pidfd_send_signal(&fd, libc::SIGKILL);
        }
    }
}

/// Kills every process in the cgroup `dir` and waits until none is left, at most `timeout`;
/// returns the pids still alive then (empty: the tree is gone). Where the kernel has
/// `cgroup.kill` (cgroup v2, Linux 5.14) one write kills the whole cgroup, forks in flight
/// included; elsewhere each member is killed through its pidfd, round after round.
pub fn kill_cgroup(dir: &Path, timeout: Duration) -> io::Result<Vec<libc::pid_t>> {
    let kill_file = dir.join("cgroup.kill");
    let has_kill_file = kill_file.exists();
    let deadline = Instant::now() + timeout;
    loop {
        let pids = members(dir)?;
        if pids.is_empty() {
            return Ok(pids);
        }
        if Instant::now() >= deadline {
            return Ok(pids);
        }
        if has_kill_file {
            std::fs::write(&kill_file, "1")?;
        } else {
            kill_confirmed(&pids, || members(dir).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(KILL_ROUND_PAUSE_MS));
    }
}

/// Live processes of session `sid`, except `except` (a shim scanning its own session).
fn session_members(sid: libc::pid_t, except: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|&pid| pid != except)
        .filter(|&pid| stat(pid).is_some_and(|s| s.session == sid && s.state != b'Z'))
        .collect()
}

/// The fallback without a cgroup: kills every process of the session `sid` (a shim's: the shim
/// calls `setsid`, so its child and every descendant that did not `setsid` away share it), except
/// `except`, and waits until none is left, at most `timeout`; returns the pids still alive.
///
/// `leader_dead` is set when the session's leader (the shim whose pid is `sid`) is known to be dead
/// (a new shim holds its lock), with the start time its lock file recorded, if any. A process with
/// that pid and another start time is then a stranger that reused it, and the kernel hands out a
/// pid only when no process uses it as a session id: so whatever has session `sid` now is the
/// stranger's, and nothing is killed. The leader itself may linger as a zombie nobody reaps;
/// without a recorded start time only a zombie is taken for it.
pub fn kill_session(
    sid: libc::pid_t,
    except: libc::pid_t,
    leader_dead: Option<Option<u64>>,
    timeout: Duration,
) -> Vec<libc::pid_t> {
    let stranger = match leader_dead {
        None => false,
        Some(Some(start)) => stat(sid).is_some_and(|s| s.starttime != start),
        Some(None) => stat(sid).is_some_and(|s| s.state != b'Z'),
    };
    if sid <= 1 || stranger {
        return Vec::new();
    }
    let deadline = Instant::now() + timeout;
    loop {
        let pids = session_members(sid, except);
        if pids.is_empty() || Instant::now() >= deadline {
            return pids;
        }
        kill_confirmed(&pids, || session_members(sid, except));
        std::thread::sleep(Duration::from_millis(KILL_ROUND_PAUSE_MS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_session() {
        let me = std::process::id() as libc::pid_t;
        let own = stat(me).expect("our own stat");
        assert_ne!(own.state, b'Z');
        assert_eq!(starttime(me), Some(own.starttime));
        assert_eq!(
            parent_of(me),
            Some(std::os::unix::process::parent_id() as libc::pid_t)
        );
        assert!(own.starttime > 0);
        // SAFETY: getsid(0) has no preconditions.
        assert_eq!(own.session, unsafe { libc::getsid(0) });
        assert!(session_members(own.session, -1).contains(&me));
        assert!(!session_members(own.session, me).contains(&me));
    }

    #[test]
    fn a_missing_cgroup_has_no_members() {
        let dir = Path::new("/nonexistent/sluice-tree-test");
        assert_eq!(kill_cgroup(dir, Duration::ZERO).unwrap(), Vec::<i32>::new());
    }
}
