//! Desired state of each service, persisted atomically (write, fsync, rename) before it is acted on.
//!
//! Only what an operator or a running operation decided is kept here: which instances were stopped
//! by hand, and which instances an interrupted restart still has to restart. Current state (pids,
//! phases) is never persisted; the shims are the truth for it.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_strategies::restart::Restart;

use crate::config::ServiceConfig;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedRestart {
    pub config: ServiceConfig,
    #[serde(default)]
    pub build: Option<String>,
    pub reason: String,
}

/// What `sluice deploy` wrote on a host without ZooKeeper: the same three facts as ZooKeeper's
/// `enabled`, `enabled/canary` and the deploy history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
pub fn load(path: &Path) -> Result<ServiceState, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ServiceState::default()),
        Err(source) => Err(StateError::Read {
            path: path.to_owned(),
            source,
        }),
    }
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
}
