//! CPU isolation of starting instances: a cgroup per starting instance under a parent sluice owns
//! at the lowest weight, found at start-up on cgroup v2 (the `cpu` controller delegated to the
//! daemon, `Delegate=yes`) or v1 (the `cpu` controller's own hierarchy).
//!
//! Layout: `<cpu hierarchy><daemon's cgroup>/<cgroup_parent>/<service>@<index>`. An instance is in
//! its directory only while it starts beside a serving sibling; once enabled its processes move
//! back to the daemon's cgroup (`Cgroups::home`; under cgroup v2, where there is one hierarchy,
//! to the instance's tracking cgroup) and the directory is removed. So this cgroup is not a handle
//! on an instance's whole life: its tracking cgroup (`service::tree`) is.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clip::clip;
use crate::config::{CgroupsMode, HostConfig};

/// v1 `cpu.shares` of a starting instance: the kernel's minimum.
pub const V1_LOW_SHARES: u32 = 2;
/// v2 `cpu.weight` of a starting instance: the minimum.
pub const V2_LOW_WEIGHT: u32 = 1;
/// Pause between attempts to remove an instance's cgroup whose last processes are still exiting.
pub const REMOVE_RETRY_MS: u64 = 50;
/// Attempts to remove an instance's cgroup before giving up (about 2 s at `REMOVE_RETRY_MS`).
pub const REMOVE_ATTEMPTS: u32 = 40;

/// Which cgroup version the host runs the `cpu` controller under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The low weight written to `cpu.shares` (v1) or `cpu.weight` (v2). It is the only weight
    /// sluice writes: an enabled instance leaves its cgroup (its processes move back to the
    /// daemon's), so it never needs a "normal" one.
    pub fn low_weight(self) -> u32 {
        match self {
            Version::V1 => V1_LOW_SHARES,
            Version::V2 => V2_LOW_WEIGHT,
        }
    }
}

/// What start-up found: cgroups to use, cgroups turned off, or why there are none.
#[derive(Debug, Clone)]
pub enum Detected {
    Ready(Cgroups),
    Off,
    Unavailable(String),
}

impl Detected {
    pub fn cgroups(&self) -> Option<&Cgroups> {
        match self {
            Detected::Ready(c) => Some(c),
            _ => None,
        }
    }

    /// Why instances run without a cgroup, for status; `None` when they have one or it is off.
    pub fn error(&self) -> Option<String> {
        match self {
            Detected::Unavailable(reason) => Some(reason.clone()),
            _ => None,
        }
    }
}

/// The parent cgroup sluice owns, ready for instance cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    pub version: Version,
    /// `<cpu hierarchy><daemon's cgroup>/<cgroup_parent>`: itself at the lowest weight, so that
    /// everything inside it together takes only CPU the rest of the host leaves idle.
    pub root: PathBuf,
    /// Where the daemon and its shims run (v1: the daemon's own cgroup; v2: its leaf), and where an
    /// instance's processes go back to once it is enabled.
    pub home: PathBuf,
}

/// Finds the `cpu` controller and makes the parent cgroup; never fails the daemon.
pub fn detect(host: &HostConfig) -> Detected {
    if host.cgroups == CgroupsMode::Off {
        return Detected::Off;
    }
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|e| format!("cgroups: cannot read {path}: {e}"))
    };
    let found = read("/proc/self/mountinfo").and_then(|mountinfo| {
        let own = read("/proc/self/cgroup")?;
        let mounts = parse_mountinfo(&mountinfo);
        setup(&mounts, &own, &host.cgroup_parent)
    });
    match found {
        Ok(cgroups) => {
            tracing::info!(root = %cgroups.root.display(), version = ?cgroups.version, "cgroups for starting instances");
            Detected::Ready(cgroups)
        }
        Err(reason) => {
            tracing::warn!("{reason}; instances run without cpu isolation");
            Detected::Unavailable(reason)
        }
    }
}

/// The cgroup mounts of interest: (mount point, root of the mount inside the hierarchy).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    pub v1_cpu: Option<(PathBuf, String)>,
    /// The v1 `pids` controller: where instances' tracking cgroups go without cgroup v2.
    pub v1_pids: Option<(PathBuf, String)>,
    pub v2: Option<(PathBuf, String)>,
}

/// Reads `/proc/self/mountinfo`: a cgroup v1 mount whose options name the `cpu` controller, and the
/// cgroup2 mount. Octal escapes in mount points (`\040` for a space) are decoded.
pub fn parse_mountinfo(text: &str) -> Mounts {
    let mut mounts = Mounts::default();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (fields.get(3), fields.get(4), right.first())
        else {
            continue;
        };
        let entry = (PathBuf::from(unescape(point)), unescape(root));
        match *fstype {
            "cgroup2" if mounts.v2.is_none() => mounts.v2 = Some(entry),
            "cgroup"
                if mounts.v1_cpu.is_none()
                    && right
                        .get(2)
                        .is_some_and(|o| o.split(',').any(|opt| opt == "cpu")) =>
            {
                mounts.v1_cpu = Some(entry)
            }
            "cgroup"
                if mounts.v1_pids.is_none()
                    && right
                        .get(2)
                        .is_some_and(|o| o.split(',').any(|opt| opt == "pids")) =>
            {
                mounts.v1_pids = Some(entry)
            }
            _ => {}
        }
    }
    mounts
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let code = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(code) = u8::try_from(code) {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The daemon's cgroup path in the v1 `cpu` hierarchy, or in the v2 one, from `/proc/self/cgroup`.
pub fn own_path(proc_cgroup: &str, version: Version) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "cpu"),
        };
        wanted.then(|| path.to_owned())
    })
}

/// The daemon's cgroup path in the v1 hierarchy of `controller`, from `/proc/self/cgroup`.
pub fn own_path_of(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_owned())
    })
}

/// The directory of cgroup `path` (as `/proc/self/cgroup` names it) under a mount whose root in
/// the hierarchy is `mount_root`.
pub fn under_mount(point: &Path, mount_root: &str, path: &str) -> Option<PathBuf> {
    let rel = if mount_root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount_root)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    Some(point.join(rel.trim_start_matches('/')))
}

/// The name of the v2 leaf the daemon and its shims move to.
pub fn daemon_leaf(parent: &str) -> String {
    format!("{parent}-daemon")
}

fn setup(mounts: &Mounts, proc_cgroup: &str, parent: &str) -> Result<Cgroups, String> {
    let mut v2_reason = None;
    if let Some((point, mount_root)) = &mounts.v2 {
        match setup_v2(point, mount_root, proc_cgroup, parent) {
            Ok(c) => return Ok(c),
            Err(e) => v2_reason = Some(e),
        }
    }
    if let Some((point, mount_root)) = &mounts.v1_cpu {
        let own = own_path(proc_cgroup, Version::V1)
            .ok_or("cgroups: /proc/self/cgroup names no cgroup of the v1 cpu controller")?;
        let own_dir = under_mount(point, mount_root, &own).ok_or_else(|| {
            format!(
                "cgroups: the daemon's cgroup {} is outside the cpu mount {}",
                clip(&own),
                point.display()
            )
        })?;
        let root = own_dir.join(parent);
        make_dir(&root)?;
        let cgroups = Cgroups {
            version: Version::V1,
            root,
            home: own_dir,
        };
        cgroups.set_low(&cgroups.root)?;
        return Ok(cgroups);
    }
    Err(v2_reason.unwrap_or_else(|| "cgroups: no cgroup hierarchy with the cpu controller".into()))
}

fn setup_v2(
    point: &Path,
    mount_root: &str,
    proc_cgroup: &str,
    parent: &str,
) -> Result<Cgroups, String> {
    let own = own_path(proc_cgroup, Version::V2)
        .ok_or("cgroups: /proc/self/cgroup names no cgroup2 path")?;
    let mut own_dir = under_mount(point, mount_root, &own).ok_or_else(|| {
        format!(
            "cgroups: the daemon's cgroup {} is outside the cgroup2 mount {}",
            clip(&own),
            point.display()
        )
    })?;
    // A daemon started inside its own leaf (by hand, from a shell that was moved) owns its parent.
    let leaf = daemon_leaf(parent);
    if own_dir.file_name().is_some_and(|n| n == leaf.as_str()) {
        own_dir.pop();
    }
    let controllers = read_file(&own_dir.join("cgroup.controllers"))?;
    if !controllers.split_whitespace().any(|c| c == "cpu") {
        return Err(format!(
            "cgroups: the cpu controller is not delegated to {} (cgroup v2 needs Delegate=yes in sluice.service)",
            own_dir.display()
        ));
    }
    // A cgroup with processes cannot hand controllers to its children ("no internal processes"),
    // so everything in the daemon's cgroup (itself, shims of an earlier daemon) moves to a leaf.
    // The root cgroup is exempt, and its processes are not ours to move.
    let home = if own_dir != point {
        own_dir.join(&leaf)
    } else {
        own_dir.clone()
    };
    if own_dir != point {
        let leaf_dir = own_dir.join(&leaf);
        make_dir(&leaf_dir)?;
        let procs = read_file(&own_dir.join("cgroup.procs"))?;
        for pid in procs.split_whitespace() {
            match std::fs::write(leaf_dir.join("cgroup.procs"), pid) {
                // Gone meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    return Err(format!(
                        "cgroups: cannot move pid {pid} to {}: {e}",
                        leaf_dir.display()
                    ));
                }
                Ok(()) => {}
            }
        }
    }
    enable_cpu(&own_dir)?;
    let root = own_dir.join(parent);
    make_dir(&root)?;
    enable_cpu(&root)?;
    let cgroups = Cgroups {
        version: Version::V2,
        root,
        home,
    };
    cgroups.set_low(&cgroups.root)?;
    Ok(cgroups)
}

fn enable_cpu(dir: &Path) -> Result<(), String> {
    let path = dir.join("cgroup.subtree_control");
    if read_file(&path)?.split_whitespace().any(|c| c == "cpu") {
        return Ok(());
    }
    std::fs::write(&path, "+cpu")
        .map_err(|e| format!("cgroups: writing +cpu to {}: {e}", path.display()))
}

fn make_dir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => {
            Err(format!("cgroups: cannot make {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn read_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cgroups: cannot read {}: {e}", path.display()))
}

impl Cgroups {
    /// The directory of one instance's cgroup.
    pub fn dir(&self, service: &str, index: u32) -> PathBuf {
        self.root.join(format!("{service}@{index}"))
    }

    /// Makes the instance's cgroup (kept if it exists) at the low weight, and returns its
    /// directory, which the shim's child joins before it execs.
    pub fn prepare(&self, service: &str, index: u32) -> Result<PathBuf, String> {
        let dir = self.dir(service, index);
        make_dir(&dir)?;
        self.set_low(&dir)?;
        Ok(dir)
    }

    /// Sets the cgroup `dir` to the low weight, then idle where the kernel has `cpu.idle`: the
    /// kernel refuses a weight on an idle group, so an idle group is left as it is.
    pub fn set_low(&self, dir: &Path) -> Result<(), String> {
        let idle = dir.join("cpu.idle");
        let has_idle = idle.exists();
        let file = match self.version {
            Version::V1 => "cpu.shares",
            Version::V2 => "cpu.weight",
        };
        let current = read_file(&dir.join(file))?;
        // An idle group reports its internal weight and refuses writes; it is already as low as it
        // gets.
        let idle_now = has_idle && read_file(&idle)?.trim() == "1";
        let low = self.version.low_weight().to_string();
        if !idle_now && current.trim() != low {
            write(&dir.join(file), &low)?;
        }
        if has_idle && !idle_now {
            write(&idle, "1")?;
        }
        Ok(())
    }

    /// Makes the instance's cgroup at the low weight (kept if it exists) and moves the running
    /// processes `pids` into it: a stopping instance's, which left the cgroup it started in once
    /// it was enabled. A process that exits meanwhile is fine; one forked after `pids` was read
    /// stays where it is (a stopping server does not fork). v1 only: under v2 a process would
    /// leave its tracking cgroup.
    pub fn lower_running(&self, dir: &Path, pids: &[u32]) -> Result<(), String> {
        if self.version != Version::V1 {
            return Err("cgroups: a running process is moved only under cgroup v1".into());
        }
        make_dir(dir)?;
        self.set_low(dir)?;
        move_into(dir, pids.iter().map(u32::to_string))
    }

    /// Removes the instance's cgroup: whatever still runs in it (an instance just enabled, or the
    /// last processes of one that is exiting) moves back to `home` ([`Cgroups::home`], or the
    /// instance's tracking cgroup when that is in the same hierarchy, cgroup v2), then the
    /// directory goes, retried while processes are still moving or forking. A cgroup that was
    /// never made is fine.
    pub async fn remove(&self, dir: &Path, home: &Path) -> Result<(), String> {
        let mut last = None;
        for attempt in 0..REMOVE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(REMOVE_RETRY_MS)).await;
            }
            if let Err(e) = move_procs(dir, home) {
                last = Some(std::io::Error::other(e));
                continue;
            }
            match std::fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        Err(format!(
            "cgroups: cannot remove {} after {REMOVE_ATTEMPTS} attempts ({}); processes left: {}",
            dir.display(),
            last.map_or_else(String::new, |e| e.to_string()),
            clip(&pids.split_whitespace().collect::<Vec<_>>().join(" "))
        ))
    }
}

/// Most processes [`descendants`] lists: a bound on what one instance's tree can make the
/// daemon read.
pub const DESCENDANTS_MAX: usize = 4096;

/// `pid` and its descendants, from `/proc/<pid>/task/<tid>/children` (breadth first, at most
/// [`DESCENDANTS_MAX`]): the tree of an instance without a tracking cgroup. A process that
/// exits meanwhile is skipped; a kernel without the `children` file gives `pid` alone.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() && found.len() < DESCENDANTS_MAX {
        let parent = found[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            // A process tree has no cycles; a pid listed twice (reparented mid-walk) is only
            // written twice.
            let room = DESCENDANTS_MAX - found.len();
            found.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok())
                    .take(room),
            );
        }
    }
    found
}

/// Moves every process of the cgroup `dir` to `home`; one that exits meanwhile is fine. A
/// process forked during the move may be left behind: the caller retries.
fn move_procs(dir: &Path, home: &Path) -> Result<(), String> {
    let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => procs,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cgroups: cannot read {}: {e}", dir.display())),
    };
    move_into(home, procs.split_whitespace().map(str::to_owned))
}

/// Writes each pid to `dir`'s `cgroup.procs`; a process that has exited meanwhile is fine.
fn move_into(dir: &Path, pids: impl IntoIterator<Item = String>) -> Result<(), String> {
    let target = dir.join("cgroup.procs");
    for pid in pids {
        match std::fs::write(&target, &pid) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => {
                return Err(format!(
                    "cgroups: cannot move pid {pid} to {}: {e}",
                    dir.display()
                ));
            }
            Ok(()) => {}
        }
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cgroups: writing {value} to {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_cpu_hierarchies() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(
            mounts.v1_cpu,
            Some((PathBuf::from("/sys/fs/cgroup/cpu"), "/".into()))
        );
        assert_eq!(
            mounts.v2,
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".into()))
        );
        // Debian 12: unified only; cpu,cpuacct co-mounted on older hosts.
        let unified = "25 20 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let mounts = parse_mountinfo(unified);
        assert_eq!(mounts.v1_cpu, None);
        assert_eq!(mounts.v2.unwrap().0, PathBuf::from("/sys/fs/cgroup"));
        let comounted =
            "32 31 0:29 /ctr /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpuacct,cpu\n";
        assert_eq!(
            parse_mountinfo(comounted).v1_cpu,
            Some((PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"), "/ctr".into()))
        );
        let cpuset_only = "34 31 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n";
        assert_eq!(parse_mountinfo(cpuset_only).v1_cpu, None);
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }

    #[test]
    fn finds_the_daemons_own_cgroup() {
        let text = "9:name=systemd:/system.slice/sluice.service\n2:cpuacct,cpu:/system.slice/sluice.service\n0::/system.slice/sluice.service\n";
        assert_eq!(
            own_path(text, Version::V1).as_deref(),
            Some("/system.slice/sluice.service")
        );
        assert_eq!(
            own_path(text, Version::V2).as_deref(),
            Some("/system.slice/sluice.service")
        );
        assert_eq!(own_path("2:cpuacct:/\n0::/x\n", Version::V1), None);
        let point = Path::new("/sys/fs/cgroup/cpu");
        assert_eq!(
            under_mount(point, "/", "/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu/a/b"))
        );
        assert_eq!(under_mount(point, "/", "/"), Some(point.to_path_buf()));
        assert_eq!(
            under_mount(point, "/ctr", "/ctr/a"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu/a"))
        );
        assert_eq!(under_mount(point, "/ctr", "/ctrl/a"), None);
    }

    #[test]
    fn weights() {
        assert_eq!(Version::V1.low_weight(), 2);
        assert_eq!(Version::V2.low_weight(), 1);
    }
}
