//! Desired state of each service, persisted atomically (write, fsync, rename) before it is acted on.
//!
//! Only what an operator or a running operation decided is kept here: which instances were stopped
//! by hand, and which instances an interrupted restart still has to restart. Current state (pids,
//! phases) is never persisted; the shims are the truth for it.
//!
//! A state file that cannot be read costs its one service, never the daemon: [`load_or_set_aside`]
//! moves it aside (`<file>.bad-<unix seconds>`, never over an existing file) and leaves in its
//! place a state whose [`ServiceState::state_error`] says why, so that the service stays in
//! `state_error` (instances adopted, nothing started or stopped for it) across restarts of the
//! daemon until an operator fixes or removes the file and runs `sluice reload`. Fields this version
//! does not know (written by a newer one) are ignored, not an error.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_strategies::restart::Restart;

use crate::config::ServiceConfig;

/// Largest state file read: a real one is a few KiB (a restart machine and two configurations).
pub const STATE_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Names tried for a bad state file set aside, `<file>.bad-<unix seconds>[-N]`, before giving up.
const ASIDE_NAMES_MAX: u32 = 100;

// Unknown fields are ignored on every struct here (no `deny_unknown_fields`): a newer version
// may add some, and a downgrade must still read what it knows. Configurations kept inside
// (`applied`, `failed.config`) stay strict like service files: a key this version does not know
// would also make the service file itself refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    /// Instances stopped by an operator: they stay down across daemon restarts and reloads.
    #[serde(default)]
    pub stopped: BTreeSet<u32>,
    /// Instances taken out of steering by an operator (`sluice drain`).
    #[serde(default)]
    pub drained: BTreeSet<u32>,
    /// The restart in progress; a restarted daemon resumes it.
    #[serde(default)]
    pub restart: Option<Restart>,
    /// The configuration every instance was last brought to: what a failed batch goes back to.
    #[serde(default)]
    pub applied: Option<ServiceConfig>,
    /// The last restart that failed, and the configuration and build it tried: instances are not
    /// moved there again automatically (a new configuration, a new build or `sluice restart` is
    /// needed).
    #[serde(default)]
    pub failed: Option<FailedRestart>,
    /// The build the instances were brought to (`None`: no build deployed).
    #[serde(default)]
    pub build: Option<String>,
    /// The build a deploy is restarting instances onto; equal to `build` once it is done.
    #[serde(default)]
    pub target_build: Option<String>,
    /// With the `local` backend: the builds `sluice deploy` asked for.
    #[serde(default)]
    pub local: LocalDesired,
    /// Set in place of a state file that could not be read (which was moved aside): why, naming
    /// both files. While it is set the service is in `state_error` and nothing is started or
    /// stopped for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedRestart {
    pub config: ServiceConfig,
    #[serde(default)]
    pub build: Option<String>,
    pub reason: String,
}

/// What `sluice deploy` wrote on a host without ZooKeeper: the same three facts as ZooKeeper's
/// `enabled`, `enabled/canary` and the deploy history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDesired {
    #[serde(default)]
    pub enabled: Option<String>,
    #[serde(default)]
    pub canary: Option<String>,
    /// Builds `enabled` named, oldest first (bounded): what `rollback` goes back to.
    #[serde(default)]
    pub history: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("state file {path} is not a state file: {what}")]
    NotAFile { path: PathBuf, what: String },
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The state file of one service.
pub fn path(state_dir: &Path, service: &str) -> PathBuf {
    state_dir.join(format!("{service}.json"))
}

/// Reads a service's state; a missing file is the default state (everything up, nothing pending).
///
/// The file is opened without following a link and must be a regular file of at most
/// [`STATE_MAX_BYTES`]: the daemon runs as root, and a link in place of a state file is an attack,
/// not a state.
pub fn load(path: &Path) -> Result<ServiceState, StateError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ServiceState::default()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(StateError::NotAFile {
                path: path.to_owned(),
                what: "a symbolic link".into(),
            });
        }
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let read_err = |source| StateError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(read_err)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a fifo"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(StateError::NotAFile {
            path: path.to_owned(),
            what: what.into(),
        });
    }
    if meta.len() > STATE_MAX_BYTES {
        return Err(StateError::NotAFile {
            path: path.to_owned(),
            what: format!("{} bytes, more than {STATE_MAX_BYTES}", meta.len()),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(STATE_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
        path: path.to_owned(),
        source,
    })
}

/// A service's state as [`load_or_set_aside`] found it.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub state: ServiceState,
    /// Why the service is in `state_error` (the file could not be read now, or was set aside
    /// earlier and not fixed since); `None`: supervise it from `state`.
    pub error: Option<String>,
}

/// Reads a service's state; a file that cannot be read is moved aside to
/// `<file>.bad-<now_s>` (or `-1`, `-2`, ... after it: an earlier one is never overwritten) and
/// replaced by a state that records why, so the service stays in `state_error` until the operator
/// fixes or removes the file and runs `sluice reload`, across restarts of the daemon too.
pub fn load_or_set_aside(path: &Path, service: &str, now_s: u64) -> Loaded {
    let why = match load(path) {
        Ok(state) => {
            let error = state.state_error.clone();
            return Loaded { state, error };
        }
        Err(e) => e,
    };
    // A serde message may quote the file's text: bounded.
    let why = crate::clip::clip(&why.to_string()).into_owned();
    let kept = match set_aside(path, now_s) {
        Ok(aside) => format!("kept as {}", aside.display()),
        Err(e) => format!("it could not be moved aside: {e}"),
    };
    let error = format!(
        "{why}; {kept}; nothing is started or stopped for {service} until {} is fixed or removed and `sluice reload` runs",
        path.display()
    );
    tracing::error!(service, "{error}");
    let marker = ServiceState {
        state_error: Some(error.clone()),
        ..ServiceState::default()
    };
    if let Err(e) = store(path, &marker) {
        // Without the marker a restarted daemon would find no file and start every instance;
        // the status still says what happened.
        tracing::error!(service, "recording the state error: {e}");
    }
    Loaded {
        state: ServiceState::default(),
        error: Some(error),
    }
}

/// Renames `path` (whatever it is: file, link, fifo, directory; a link is renamed, never
/// followed) to the first free `<path>.bad-<now_s>[-N]`; never replaces an existing name.
fn set_aside(path: &Path, now_s: u64) -> std::io::Result<PathBuf> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let from = CString::new(path.as_os_str().as_bytes())?;
    for n in 0..ASIDE_NAMES_MAX {
        let mut name = path.as_os_str().to_owned();
        name.push(if n == 0 {
            format!(".bad-{now_s}")
        } else {
            format!(".bad-{now_s}-{n}")
        });
        let to_path = PathBuf::from(name);
        let to = CString::new(to_path.as_os_str().as_bytes())?;
        // SAFETY: both are valid NUL-terminated paths; renameat2 only reads them.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(to_path);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("{ASIDE_NAMES_MAX} names `.bad-{now_s}*` are taken"),
    ))
}

/// Writes the state so that a crash at any point leaves either the old or the new file.
pub fn store(path: &Path, state: &ServiceState) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
    write_atomically(path, &bytes).map_err(err)
}

/// Write to a temporary sibling, fsync it, rename it over `path`, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let written = std::fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(e) = written {
        // A half-written sibling (a full disk) would hold space the next try needs.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes a service's state file (the service left the configuration).
pub fn remove(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StateError::Write {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "web");
        assert_eq!(load(&p).unwrap(), ServiceState::default());
        let state = ServiceState {
            stopped: [2].into(),
            drained: [1].into(),
            ..ServiceState::default()
        };
        store(&p, &state).unwrap();
        assert_eq!(load(&p).unwrap(), state);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(
            load(&p)
                .unwrap_err()
                .to_string()
                .contains("web.json is corrupt")
        );
    }

    /// The names set aside next to `p`, sorted.
    fn aside(p: &Path) -> Vec<String> {
        let prefix = format!("{}.bad-", p.file_name().unwrap().to_string_lossy());
        let mut names: Vec<String> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn fields_of_a_newer_version_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "web");
        std::fs::write(
            &p,
            br#"{"stopped": [1], "drained": [], "priority_lanes": {"a": 1},
                 "local": {"enabled": "b7", "pinned": true}}"#,
        )
        .unwrap();
        let loaded = load_or_set_aside(&p, "web", 1_000);
        assert_eq!(loaded.error, None);
        assert_eq!(loaded.state.stopped, [1].into());
        assert_eq!(loaded.state.local.enabled.as_deref(), Some("b7"));
        assert!(aside(&p).is_empty());
    }

    #[test]
    fn unreadable_state_files_are_set_aside_never_over_another_and_the_error_stays() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "web");
        let target = dir.path().join("secret");
        std::fs::write(&target, b"{}").unwrap();
        let full = serde_json::to_vec(&ServiceState {
            stopped: [0, 1, 2].into(),
            ..ServiceState::default()
        })
        .unwrap();
        /// Puts something in place of the file.
        type Make<'a> = Box<dyn Fn() + 'a>;
        // (what is in place of the file, what the error says)
        let cases: Vec<(Make, &str)> = vec![
            (
                Box::new(|| std::fs::write(&p, b"{\"stopped\": [1,").unwrap()),
                "is corrupt",
            ),
            (
                Box::new(|| std::fs::write(&p, &full[..full.len() / 2]).unwrap()),
                "is corrupt",
            ),
            (
                Box::new(|| std::fs::write(&p, br#"{"stopped": "all"}"#).unwrap()),
                "is corrupt",
            ),
            (
                Box::new(|| std::os::unix::fs::symlink(&target, &p).unwrap()),
                "a symbolic link",
            ),
            (
                Box::new(|| nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap()),
                "a fifo",
            ),
            (Box::new(|| std::fs::create_dir(&p).unwrap()), "a directory"),
        ];
        for (n, (make, what)) in cases.iter().enumerate() {
            make();
            let loaded = load_or_set_aside(&p, "web", 1_000);
            let error = loaded.error.expect("a state error");
            assert!(error.contains(what), "{error}");
            assert!(error.contains(&p.display().to_string()), "{error}");
            let names = aside(&p);
            assert_eq!(names.len(), n + 1, "{names:?}");
            let newest = if n == 0 {
                "web.json.bad-1000".to_owned()
            } else {
                format!("web.json.bad-1000-{n}")
            };
            assert!(names.contains(&newest), "{names:?}");
            assert!(error.contains(&newest), "{error}");
            assert_eq!(loaded.state, ServiceState::default());
            // The record of the error stays in place of the file, for the next daemon.
            let again = load_or_set_aside(&p, "web", 2_000);
            assert_eq!(again.error.as_deref(), Some(error.as_str()));
            assert_eq!(aside(&p).len(), n + 1);
            std::fs::remove_file(&p).unwrap();
        }
        // The link was renamed, never followed: its target is untouched.
        assert_eq!(std::fs::read(&target).unwrap(), b"{}");
        // Removed by the operator: the default state.
        assert_eq!(
            load_or_set_aside(&p, "web", 3_000),
            Loaded {
                state: ServiceState::default(),
                error: None
            }
        );
    }
}
