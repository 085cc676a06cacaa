//! Lifecycle hooks of sluice deploys: which hooks a stage has, running them as the service's user
//! under a timeout with a documented environment, and the stock hooks shipped with sluice.
//!
//! A deploy runs hooks at five stages ([`Stage`]). A stage's hooks are the configured ones (a command
//! per entry; `stock:NAME` names a stock hook) followed by the build's own executable
//! `<release_dir>/sluice/hooks/<stage>`, if the build has one ([`hooks_for`]). [`run_stage`] runs them
//! in order and stops at the first failure; the caller then stops that host's deploy, keeps the old
//! build serving and puts the hook's name and output tail ([`HookError::output_tail`]) in status.
//!
//! # The environment of a hook
//!
//! A hook inherits nothing from the daemon. It gets exactly these variables, plus the service's
//! environment (`extra_env`), which may set `PATH` and `HOME` but never the `SLUICE_*` ones below:
//!
//! | variable | value |
//! | --- | --- |
//! | `SLUICE_SERVICE` | the service name |
//! | `SLUICE_BUILD` | the build being deployed |
//! | `SLUICE_PREVIOUS_BUILD` | the build serving before this deploy; empty if none |
//! | `SLUICE_RELEASE_DIR` | the release directory of the build; absent for `pre_download` |
//! | `SLUICE_STAGE` | the stage: `pre_download`, `post_download`, `post_install`, `pre_restart`, `post_restart` |
//! | `HOME` | the home directory of the user the hook runs as (from the passwd database), else `/` |
//! | `PATH` | from the service's environment, else `/usr/local/bin:/usr/bin:/bin` |
//!
//! Stock hooks read a few more, which come from the service's environment: `SLUICE_PYTHON` and
//! `SLUICE_WHEEL_DIR` (`python-venv`), `SLUICE_JAR` (`java-jar`).
//!
//! # How a hook runs
//!
//! - As the service's user: supplementary groups, gid, then uid are set in the child before exec
//!   ([`process::confine`]). The caller resolves the user; an unresolvable one is its error, never
//!   a reason to run as root.
//! - A stock hook that writes into the release (`python-venv` writes `.venv`, see
//!   [`STOCK_WRITES`]) gets that one directory made for the user by root; the rest of the release
//!   stays root's, and the user is given no path that root follows later.
//! - In the release directory if there is one, else in `/`; stdin is `/dev/null`.
//! - stdout and stderr share one pipe, so the log keeps their order. The whole output goes to
//!   `<log_dir>/<build>-<stage>-<n>.log` (replaced on each run, capped at [`LOG_MAX_BYTES`]); the last
//!   [`OUTPUT_TAIL_BYTES`] are kept in memory for the error.
//! - In its own process group. After `timeout_ms` the whole group is killed with SIGKILL. When the hook
//!   itself exits, whatever it left running in its group is killed too: a hook leaves no processes
//!   behind (one that escapes with `setsid` is not tracked).
//! - `post_download` and `post_install` hooks that succeeded for a release leave a marker in
//!   `<release_dir>/.sluice/hooks-done/`; running the stage again for the same release skips them
//!   while the command (and, for build and stock hooks, the hook file) is unchanged. Restart stages
//!   always run.
//!
//! The timeout uses tokio's clock: under a paused test clock it fires as soon as the runtime is idle.

mod done;
mod output;
pub mod process;
mod runner;
mod stock;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use runner::{Run, run_stage};
pub use stock::{STOCK_HOOKS, STOCK_WRITES, stock_hook};

/// Bytes of a hook's output kept in memory for the error: the tail, which usually says what failed.
pub const OUTPUT_TAIL_BYTES: usize = 4 * 1024;
/// Bytes of a hook's output written to its log file; past this the rest is read and dropped, so a
/// runaway hook cannot fill the disk.
pub const LOG_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// How long output is still read after the hook's process group is gone; only a process that escaped
/// the group (with `setsid`) can hold the pipe open that long.
pub const OUTPUT_DRAIN_MS: u64 = 1_000;
/// The `PATH` of a hook whose service sets none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The prefix of a configured command that names a stock hook: `stock:python-venv`.
pub const STOCK_PREFIX: &str = "stock:";

/// A point in a deploy where hooks run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Before the build is fetched; there is no release directory yet.
    PreDownload,
    /// The build is extracted into its release directory.
    PostDownload,
    /// After `post_download`, to prepare the release (virtualenv, assets).
    PostInstall,
    /// Before the instances are restarted on the new build.
    PreRestart,
    /// After the restart.
    PostRestart,
}

impl Stage {
    /// Every stage, in the order a deploy reaches them.
    pub const ALL: [Stage; 5] = [
        Stage::PreDownload,
        Stage::PostDownload,
        Stage::PostInstall,
        Stage::PreRestart,
        Stage::PostRestart,
    ];

    /// The name used in config, in `SLUICE_STAGE`, in file names and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::PreDownload => "pre_download",
            Stage::PostDownload => "post_download",
            Stage::PostInstall => "post_install",
            Stage::PreRestart => "pre_restart",
            Stage::PostRestart => "post_restart",
        }
    }

    /// Whether a hook that succeeded for a release is skipped when the stage runs again for it.
    /// Only the stages that prepare the release: their work stays done, whereas a restart is new.
    pub fn skips_when_done(self) -> bool {
        matches!(self, Stage::PostDownload | Stage::PostInstall)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stage name that is not one of [`Stage::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown hook stage `{0}` (expected pre_download, post_download, post_install, pre_restart or post_restart)"
)]
pub struct UnknownStage(pub String);

impl FromStr for Stage {
    type Err = UnknownStage;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.as_str() == s)
            .ok_or_else(|| UnknownStage(s.to_owned()))
    }
}

/// One command to run at a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// Shown in errors and status: `post_install[0] stock:python-venv`,
    /// `build:sluice/hooks/post_install`.
    pub name: String,
    /// The command; `argv[0]` is a path (stock names are already resolved) or a name looked up in
    /// the hook's `PATH`.
    pub argv: Vec<String>,
}

/// The user a hook runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, set as given (the primary gid is not added).
    pub groups: Vec<u32>,
}

/// What happened to one hook of a stage that succeeded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub name: String,
    /// It had already succeeded for this release with the same command, so it did not run.
    pub skipped: bool,
    /// Wall time of the run; 0 when skipped.
    pub duration_ms: u64,
}

/// Why a stage's hooks did not all succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{stage} hook `{name}` failed with {status}")]
    Failed {
        stage: Stage,
        name: String,
        /// `exit code 3` or `killed by signal 9`.
        status: String,
        output_tail: String,
    },
    #[error("{stage} hook `{name}` did not finish within {timeout_ms} ms and was killed")]
    Timeout {
        stage: Stage,
        name: String,
        timeout_ms: u64,
        output_tail: String,
    },
    #[error("{stage} hook `{name}` could not be started: {message}")]
    Spawn {
        stage: Stage,
        name: String,
        message: String,
    },
    #[error("unknown stock hook `{name}` (known: {known})", known = STOCK_HOOKS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))]
    Stock { name: String },
    #[error("hook file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl HookError {
    /// The last [`OUTPUT_TAIL_BYTES`] of the hook's output, for a failure or a timeout.
    pub fn output_tail(&self) -> Option<&str> {
        match self {
            HookError::Failed { output_tail, .. } | HookError::Timeout { output_tail, .. } => {
                Some(output_tail)
            }
            _ => None,
        }
    }

    /// The hook at fault, when one is.
    pub fn hook_name(&self) -> Option<&str> {
        match self {
            HookError::Failed { name, .. }
            | HookError::Timeout { name, .. }
            | HookError::Spawn { name, .. }
            | HookError::Stock { name } => Some(name),
            HookError::Io { .. } => None,
        }
    }
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(io::Error) -> HookError + '_ {
    move |source| HookError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The hooks of a stage: the configured ones, in order, with stock names resolved (which writes the
/// stock hooks into `stock_dir`), then the build's own `<release_dir>/sluice/hooks/<stage>` if it
/// exists. A build without that file is not an error; one that is not an executable file is.
pub fn hooks_for(
    stage: Stage,
    configured: &[Vec<String>],
    release_dir: Option<&Path>,
    stock_dir: &Path,
) -> Result<Vec<Hook>, HookError> {
    let mut hooks = Vec::with_capacity(configured.len() + 1);
    for (index, argv) in configured.iter().enumerate() {
        let name = format!("{stage}[{index}] {}", argv.join(" "));
        let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
            return Err(HookError::Spawn {
                stage,
                name,
                message: "empty command".to_owned(),
            });
        };
        let mut argv = argv.clone();
        if let Some(stock) = program.strip_prefix(STOCK_PREFIX) {
            argv[0] = stock_hook(stock_dir, stock)?.to_string_lossy().into_owned();
        }
        hooks.push(Hook { name, argv });
    }
    if let Some(release_dir) = release_dir {
        let relative = format!("sluice/hooks/{stage}");
        let path = release_dir.join(&relative);
        let name = format!("build:{relative}");
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path)(e)),
            Ok(meta) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode();
                if !meta.is_file() || mode & 0o111 == 0 {
                    return Err(HookError::Spawn {
                        stage,
                        name,
                        message: format!(
                            "{} is not an executable file (mode {:o})",
                            path.display(),
                            mode & 0o7777
                        ),
                    });
                }
                hooks.push(Hook {
                    name,
                    argv: vec![path.to_string_lossy().into_owned()],
                });
            }
        }
    }
    Ok(hooks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_round_trip() {
        for stage in Stage::ALL {
            assert_eq!(stage.as_str().parse::<Stage>(), Ok(stage));
            assert_eq!(stage.to_string(), stage.as_str());
        }
        assert!("post-install".parse::<Stage>().is_err());
    }

    #[test]
    fn only_preparing_stages_skip_when_done() {
        let skipping: Vec<_> = Stage::ALL
            .into_iter()
            .filter(|s| s.skips_when_done())
            .collect();
        assert_eq!(skipping, [Stage::PostDownload, Stage::PostInstall]);
    }

    #[test]
    fn configured_hooks_come_first_and_stock_names_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let stock = dir.path().join("stock");
        let configured = vec![
            vec!["stock:python-venv".to_owned()],
            vec!["/usr/bin/make".to_owned(), "assets".to_owned()],
        ];
        let hooks = hooks_for(Stage::PostInstall, &configured, None, &stock).unwrap();
        assert_eq!(hooks[0].name, "post_install[0] stock:python-venv");
        assert_eq!(hooks[0].argv, [stock.join("python-venv").to_str().unwrap()]);
        assert_eq!(hooks[1].name, "post_install[1] /usr/bin/make assets");
        assert_eq!(hooks[1].argv, ["/usr/bin/make", "assets"]);
    }

    #[test]
    fn bad_configured_hooks_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let unknown = vec![vec!["stock:nope".to_owned()]];
        assert!(matches!(
            hooks_for(Stage::PostInstall, &unknown, None, dir.path()),
            Err(HookError::Stock { name }) if name == "nope"
        ));
        let empty = vec![vec![]];
        assert!(matches!(
            hooks_for(Stage::PostInstall, &empty, None, dir.path()),
            Err(HookError::Spawn { .. })
        ));
    }

    #[test]
    fn a_build_hook_that_is_not_executable_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = dir.path().join("sluice/hooks");
        std::fs::create_dir_all(&hooks).unwrap();
        std::fs::write(hooks.join("pre_restart"), "#!/bin/sh\n").unwrap();
        let err = hooks_for(Stage::PreRestart, &[], Some(dir.path()), dir.path()).unwrap_err();
        assert!(err.to_string().contains("not an executable file"), "{err}");
    }
}
