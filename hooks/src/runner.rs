//! Running a stage's hooks: one child process per hook, as the service's user, in its own process
//! group, under a timeout, with its output in a log file and a tail kept for the error.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::done;
use crate::output::{self, Captured};
use crate::process::{self, GroupChild};
use crate::{DEFAULT_PATH, Hook, HookError, Identity, Outcome, Stage, io_error};

/// Everything about one stage of one deploy that its hooks need.
#[derive(Debug, Clone)]
pub struct Run<'a> {
    pub stage: Stage,
    pub service: &'a str,
    /// The build being deployed.
    pub build: &'a str,
    /// The build serving before this deploy, if any; hooks may migrate from it.
    pub previous_build: Option<&'a str>,
    /// The release directory of `build`; `None` for `pre_download`, when there is none yet.
    pub release_dir: Option<&'a Path>,
    /// Who the hooks run as; `None`: the daemon's own user.
    pub identity: Option<Identity>,
    /// The service's environment (`PATH` and the like), added to the documented `SLUICE_*` variables.
    pub extra_env: &'a BTreeMap<String, String>,
    /// Limit of each hook's run, after which its process group is killed.
    pub timeout_ms: u64,
    /// Where the full output of each run is kept: `<log_dir>/<build>-<stage>-<n>.log`.
    pub log_dir: &'a Path,
    /// Where stock hooks are materialized; their content counts in the skip-when-done markers.
    pub stock_dir: &'a Path,
}

/// Runs `hooks` in order and stops at the first failure. For stages that skip finished work, a hook
/// already done for this release with the same command is skipped (see the crate doc).
pub async fn run_stage(run: &Run<'_>, hooks: &[Hook]) -> Result<Vec<Outcome>, HookError> {
    let mut outcomes = Vec::with_capacity(hooks.len());
    for (index, hook) in hooks.iter().enumerate() {
        let marker = match run.release_dir {
            Some(release_dir) if run.stage.skips_when_done() => Some((
                done::marker_path(release_dir, run.stage, index),
                done::digest(hook, release_dir, run.stock_dir)?,
            )),
            _ => None,
        };
        if let Some((path, digest)) = &marker {
            if done::is_done(path, digest) {
                outcomes.push(Outcome {
                    name: hook.name.clone(),
                    skipped: true,
                    duration_ms: 0,
                });
                continue;
            }
            done::forget(path)?;
        }
        let started = Instant::now();
        run_one(run, hook, index).await?;
        if let Some((path, digest)) = &marker {
            done::record(path, digest)?;
        }
        outcomes.push(Outcome {
            name: hook.name.clone(),
            skipped: false,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
    Ok(outcomes)
}

async fn run_one(run: &Run<'_>, hook: &Hook, index: usize) -> Result<(), HookError> {
    let stage = run.stage;
    let spawn_error = |message: String| HookError::Spawn {
        stage,
        name: hook.name.clone(),
        message,
    };
    let Some(program) = hook.argv.first() else {
        return Err(spawn_error("empty command".to_owned()));
    };

    std::fs::create_dir_all(run.log_dir).map_err(io_error(run.log_dir))?;
    let log_path = run
        .log_dir
        .join(format!("{}-{stage}-{index}.log", file_name_safe(run.build)));
    let log = output::create_log(
        run.log_dir,
        &format!("{}-{stage}-{index}.log", file_name_safe(run.build)),
    )
    .map_err(io_error(&log_path))?;

    // One pipe for both streams, so the log keeps the order in which the hook wrote them.
    let (reader, writer) =
        io::pipe().map_err(|e| spawn_error(format!("create the output pipe: {e}")))?;
    let writer_for_stderr = writer
        .try_clone()
        .map_err(|e| spawn_error(format!("create the output pipe: {e}")))?;
    // Before the spawn, so that nothing can fail between the spawn and the reaping.
    let pipe = pipe::Receiver::from_owned_fd(reader.into())
        .map_err(|e| spawn_error(format!("read the output pipe: {e}")))?;
    let uid = run.identity.as_ref().map_or_else(
        // SAFETY: geteuid cannot fail and touches no memory.
        || unsafe { libc::geteuid() },
        |id| id.uid,
    );
    let env = environment(run, home_of(uid));

    if let (Some(identity), Some(release_dir)) = (&run.identity, run.release_dir) {
        crate::stock::prepare(Path::new(program), run.stock_dir, release_dir, identity)?;
    }
    let mut command = std::process::Command::new(program);
    command
        .args(&hook.argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(run.release_dir.unwrap_or(Path::new("/")))
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_for_stderr);
    process::confine(&mut command, run.identity.as_ref());
    let spawned = GroupChild::spawn(&mut command);
    // The command holds the parent's copies of the pipe's write end; the output only reaches end of
    // file once they are closed.
    drop(command);
    // If this future is dropped (the deploy was cancelled), the hook must not run on: dropping
    // the child kills its group.
    let mut child = spawned.map_err(|e| spawn_error(format!("{program}: {e}")))?;
    let pgid = child.pgid();

    let (exited, exited_rx) = oneshot::channel();
    let output = tokio::spawn(output::pump(pipe, log, exited_rx));
    let timeout = Duration::from_millis(run.timeout_ms);
    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (status, false),
        Err(_) => {
            child.kill();
            (child.wait().await, true)
        }
    };
    let _ = exited.send(());
    let Captured { tail, log_error } = output.await.unwrap_or_default();
    let output_tail = tail.text();

    if timed_out {
        return Err(HookError::Timeout {
            stage,
            name: hook.name.clone(),
            timeout_ms: run.timeout_ms,
            output_tail,
        });
    }
    let status = status.map_err(|e| spawn_error(format!("wait for pid {pgid}: {e}")))?;
    if !status.success() {
        return Err(HookError::Failed {
            stage,
            name: hook.name.clone(),
            status: describe(status),
            output_tail,
        });
    }
    match log_error {
        Some(source) => Err(HookError::Io {
            path: log_path,
            source,
        }),
        None => Ok(()),
    }
}

/// The environment of a hook, documented in the crate doc: defaults, then the service's
/// environment, then the `SLUICE_*` variables, which the service cannot override.
fn environment(run: &Run<'_>, home: String) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("HOME".to_owned(), home),
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
    ]);
    env.extend(run.extra_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut set = |key: &str, value: &str| env.insert(key.to_owned(), value.to_owned());
    set("SLUICE_SERVICE", run.service);
    set("SLUICE_BUILD", run.build);
    set("SLUICE_PREVIOUS_BUILD", run.previous_build.unwrap_or(""));
    set("SLUICE_STAGE", run.stage.as_str());
    match run.release_dir {
        Some(dir) => set("SLUICE_RELEASE_DIR", &dir.to_string_lossy()),
        None => env.remove("SLUICE_RELEASE_DIR"),
    };
    env
}

/// The home directory of `uid` in the passwd database, or `/` when it has none.
fn home_of(uid: u32) -> String {
    // Large enough for any sane passwd entry; a larger one (ERANGE) falls back to `/`.
    const PASSWD_BUF_BYTES: usize = 16 * 1024;
    let mut buf = vec![0 as libc::c_char; PASSWD_BUF_BYTES];
    // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r fills it with pointers into
    // `buf`, which outlives every use of them below.
    unsafe {
        let mut entry: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || entry.pw_dir.is_null() {
            return "/".to_owned();
        }
        let dir = CStr::from_ptr(entry.pw_dir).to_string_lossy().into_owned();
        if dir.is_empty() { "/".to_owned() } else { dir }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// A build id as a file name component: anything but `[A-Za-z0-9._+-]` becomes `_`, so an id with a
/// slash cannot put a log outside `log_dir`.
fn file_name_safe(build: &str) -> String {
    let safe: String = build
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match safe.as_str() {
        "" | "." | ".." => "_".to_owned(),
        _ => safe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_become_safe_file_names() {
        assert_eq!(file_name_safe("2024-05-01.3+g1a2b"), "2024-05-01.3+g1a2b");
        assert_eq!(file_name_safe("../../etc/x"), ".._.._etc_x");
        assert_eq!(file_name_safe(".."), "_");
        assert_eq!(file_name_safe(""), "_");
    }

    #[test]
    fn sluice_variables_win_over_the_service_environment() {
        let extra = BTreeMap::from([
            ("SLUICE_BUILD".to_owned(), "forged".to_owned()),
            ("HOME".to_owned(), "/srv/app".to_owned()),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ]);
        let run = Run {
            stage: Stage::PreDownload,
            service: "web",
            build: "b2",
            previous_build: None,
            release_dir: None,
            identity: None,
            extra_env: &extra,
            timeout_ms: 1_000,
            log_dir: Path::new("/nonexistent"),
            stock_dir: Path::new("/nonexistent"),
        };
        let env = environment(&run, "/home/web".to_owned());
        let expected: BTreeMap<String, String> = [
            ("HOME", "/srv/app"),
            ("LANG", "C.UTF-8"),
            ("PATH", DEFAULT_PATH),
            ("SLUICE_BUILD", "b2"),
            ("SLUICE_PREVIOUS_BUILD", ""),
            ("SLUICE_SERVICE", "web"),
            ("SLUICE_STAGE", "pre_download"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, expected);
    }

    #[test]
    fn home_falls_back_to_root() {
        assert_eq!(home_of(0), "/root");
        assert_eq!(home_of(4_000_000_000), "/");
    }
}
