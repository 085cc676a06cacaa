//! Tracking cgroups: one per instance, for its whole life, so that every process it ever runs
//! (`setsid` descendants included) can be found and killed with it, whatever the host key
//! `cgroups` says about CPU weights.
//!
//! Layout: `<hierarchy><daemon's cgroup>/<cgroup_parent>-tree/<service>@<index>`, in the cgroup
//! v2 hierarchy where one is mounted (hybrid or unified hosts; no controller is enabled there, so
//! processes may live at every level), else in the v1 `pids` hierarchy (a controller that limits
//! nothing unless `pids.max` is set). The shim's child joins it before it execs; the shim kills
//! what is in it before it starts the child (the survivors of a predecessor that was killed) and
//! after the child exits. Where neither can be made, the shim falls back to its session (which
//! `setsid` descendants leave) and status says so (`tree_error`).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::clip::clip;
use crate::config::HostConfig;
use crate::service::cgroup::{self, Version};

/// The suffix of the tracking cgroups' parent after `cgroup_parent`.
pub const TREE_SUFFIX: &str = "-tree";

/// Where instances' tracking cgroups live, or why there are none.
#[derive(Debug, Clone)]
pub enum Tree {
    Ready(TreeCgroups),
    Unavailable(String),
}

/// The parent of the instances' tracking cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeCgroups {
    /// v2 (the hierarchy the CPU cgroups share on a unified host) or v1 (`pids`).
    pub version: Version,
    /// `<hierarchy><daemon's cgroup>/<cgroup_parent>-tree`.
    pub root: PathBuf,
}

impl Tree {
    pub fn cgroups(&self) -> Option<&TreeCgroups> {
        match self {
            Tree::Ready(t) => Some(t),
            Tree::Unavailable(_) => None,
        }
    }

    /// Why instances' trees are tracked by session only, for status.
    pub fn error(&self) -> Option<String> {
        match self {
            Tree::Ready(_) => None,
            Tree::Unavailable(reason) => Some(reason.clone()),
        }
    }
}

impl TreeCgroups {
    /// The tracking cgroup of one instance.
    pub fn dir(&self, service: &str, index: u32) -> PathBuf {
        self.root.join(format!("{service}@{index}"))
    }

    /// Makes the instance's tracking cgroup (kept if it exists: survivors of a killed shim may
    /// still be in it, for the next shim to kill) and returns it.
    pub fn prepare(&self, service: &str, index: u32) -> Result<PathBuf, String> {
        let dir = self.dir(service, index);
        make_dir(&dir)?;
        Ok(dir)
    }

    /// The processes in the instance's tracking cgroup: its process and every descendant.
    pub fn procs(&self, service: &str, index: u32) -> Result<Vec<u32>, String> {
        let path = self.dir(service, index).join("cgroup.procs");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("tracking cgroups: cannot read {}: {e}", path.display()))?;
        Ok(text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Removes the tracking cgroups of a service that is gone (they are empty once its instances
    /// stopped: their shims killed what was left). One that still has processes stays, and is
    /// reported.
    pub fn remove_service(&self, service: &str) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let prefix = format!("{service}@");
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            if rest.parse::<u32>().is_err() {
                continue;
            }
            match std::fs::remove_dir(entry.path()) {
                Err(e) if e.kind() != ErrorKind::NotFound => tracing::warn!(
                    service,
                    "cannot remove tracking cgroup {}: {e}",
                    entry.path().display()
                ),
                _ => {}
            }
        }
    }
}

/// Finds a hierarchy for tracking cgroups and makes their parent; never fails the daemon. Called
/// after the CPU isolation's detection: under cgroup v2 the daemon may then run in a leaf of its
/// cgroup, and the tracking parent goes beside that leaf.
pub fn detect(host: &HostConfig) -> Tree {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map_err(|e| format!("tracking cgroups: cannot read {path}: {e}"))
    };
    let found = read("/proc/self/mountinfo").and_then(|mountinfo| {
        let own = read("/proc/self/cgroup")?;
        setup(
            &cgroup::parse_mountinfo(&mountinfo),
            &own,
            &host.cgroup_parent,
        )
    });
    match found {
        Ok(tree) => {
            tracing::info!(root = %tree.root.display(), version = ?tree.version, "tracking cgroups for instances");
            Tree::Ready(tree)
        }
        Err(reason) => {
            tracing::warn!(
                "{reason}; an instance's processes are tracked by its shim's session, which \
                 setsid descendants leave"
            );
            Tree::Unavailable(reason)
        }
    }
}

fn setup(mounts: &cgroup::Mounts, proc_cgroup: &str, parent: &str) -> Result<TreeCgroups, String> {
    let name = format!("{parent}{TREE_SUFFIX}");
    let mut reasons = Vec::new();
    if let Some((point, mount_root)) = &mounts.v2 {
        match cgroup::own_path(proc_cgroup, Version::V2)
            .and_then(|own| cgroup::under_mount(point, mount_root, &own))
        {
            Some(mut own_dir) => {
                // The daemon's own leaf under CPU isolation: the tracking parent goes beside it.
                if own_dir
                    .file_name()
                    .is_some_and(|n| n == cgroup::daemon_leaf(parent).as_str())
                {
                    own_dir.pop();
                }
                let root = own_dir.join(&name);
                match make_dir(&root) {
                    Ok(()) => {
                        return Ok(TreeCgroups {
                            version: Version::V2,
                            root,
                        });
                    }
                    Err(e) => reasons.push(e),
                }
            }
            None => reasons.push(format!(
                "tracking cgroups: the daemon's cgroup2 path is outside {}",
                point.display()
            )),
        }
    }
    if let Some((point, mount_root)) = &mounts.v1_pids {
        match cgroup::own_path_of(proc_cgroup, "pids")
            .and_then(|own| cgroup::under_mount(point, mount_root, &own))
        {
            Some(own_dir) => {
                let root = own_dir.join(&name);
                match make_dir(&root) {
                    Ok(()) => {
                        return Ok(TreeCgroups {
                            version: Version::V1,
                            root,
                        });
                    }
                    Err(e) => reasons.push(e),
                }
            }
            None => reasons.push(format!(
                "tracking cgroups: the daemon's pids cgroup is outside {}",
                point.display()
            )),
        }
    }
    if reasons.is_empty() {
        return Err(
            "tracking cgroups: neither cgroup2 nor the v1 pids controller is mounted".into(),
        );
    }
    Err(reasons.join("; "))
}

fn make_dir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(format!(
            "tracking cgroups: cannot make {}: {e}",
            clip(&dir.display().to_string())
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_hierarchies_for_tracking() {
        let mounts = cgroup::parse_mountinfo(HYBRID);
        assert_eq!(
            mounts.v1_pids,
            Some((PathBuf::from("/sys/fs/cgroup/pids"), "/".into()))
        );
        let proc_cgroup =
            "8:pids:/system.slice/sluice.service\n0::/system.slice/sluice.service/sluice-daemon\n";
        assert_eq!(
            cgroup::own_path_of(proc_cgroup, "pids").as_deref(),
            Some("/system.slice/sluice.service")
        );
        // A setup that cannot make its directory says where it tried, for both hierarchies.
        let missing = cgroup::Mounts {
            v2: Some((PathBuf::from("/nonexistent/unified"), "/".into())),
            v1_pids: Some((PathBuf::from("/nonexistent/pids"), "/".into())),
            ..cgroup::Mounts::default()
        };
        let err = setup(&missing, proc_cgroup, "sluice").unwrap_err();
        assert!(
            err.contains("/nonexistent/unified/system.slice/sluice.service/sluice-tree")
                && err.contains("/nonexistent/pids/system.slice/sluice.service/sluice-tree"),
            "{err}"
        );
        let none = setup(&cgroup::Mounts::default(), proc_cgroup, "sluice").unwrap_err();
        assert!(none.contains("neither cgroup2 nor"), "{none}");
    }

    #[test]
    fn instance_dirs() {
        let tree = TreeCgroups {
            version: Version::V2,
            root: "/sys/fs/cgroup/unified/sluice-tree".into(),
        };
        assert_eq!(
            tree.dir("web", 3),
            Path::new("/sys/fs/cgroup/unified/sluice-tree/web@3")
        );
    }
}
