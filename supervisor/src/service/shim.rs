//! The brain's side of the shim: spawning one, and its line protocol over the shim's unix socket.
//!
//! Every request has a timeout except `wait`, which is meant to stay open until the instance exits.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sluice_shim::args::ShimArgs;
use sluice_shim::proto::{self, Status};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::service::spec::InstanceSpec;

/// How long a shim may take to answer a request (it answers from a poll loop, at once).
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// How long spawning a shim may take until its handshake line.
pub const SPAWN_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("cannot start shim for {instance}: {message}")]
    Spawn { instance: String, message: String },
    /// The shim refused because another shim already holds the instance's lock.
    #[error("instance {instance} already has a shim: {message}")]
    Busy { instance: String, message: String },
    #[error("shim socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shim socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
    #[error("shim socket {path}: no answer within {timeout_ms} ms")]
    Timeout { path: PathBuf, timeout_ms: u64 },
}

/// Where one instance's shim keeps its socket and lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimPaths {
    pub socket: PathBuf,
    pub lock: PathBuf,
}

impl ShimPaths {
    pub fn new(shim_dir: &Path, service: &str, index: u32) -> Self {
        Self {
            socket: shim_dir.join(format!("{service}@{index}.sock")),
            lock: shim_dir.join(format!("{service}@{index}.lock")),
        }
    }

    /// The inverse of [`ShimPaths::new`] for a socket file name: `(service, index)`.
    pub fn parse_socket_name(name: &str) -> Option<(String, u32)> {
        let stem = name.strip_suffix(".sock")?;
        let (service, index) = stem.rsplit_once('@')?;
        Some((service.to_owned(), index.parse().ok()?))
    }
}

/// The command line of the shim of `spec`, as the shim parses it (`sluice_shim::args`).
fn shim_args(
    paths: &ShimPaths,
    spec: &InstanceSpec,
    cgroups: Cgroups<'_>,
) -> Result<ShimArgs, String> {
    // Validated non-empty with the service file; a spec built otherwise is refused, not run.
    let Some((program, program_args)) = spec.argv.split_first() else {
        return Err("the command is empty".into());
    };
    Ok(ShimArgs {
        id: format!("{}/{}", spec.service, spec.index),
        socket: paths.socket.clone(),
        lock: paths.lock.clone(),
        stdout_log: spec.stdout_log.clone(),
        stderr_log: spec.stderr_log.clone(),
        log_max_bytes: spec.log_max_bytes,
        log_backups: spec.log_backups,
        tag: spec.tag(),
        cwd: Some(spec.directory.clone()),
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
        umask: spec.umask,
        nofile: spec.nofile,
        tree_cgroup: cgroups.tree.map(Path::to_owned),
        cgroup: cgroups.cpu.map(Path::to_owned),
        program: program.into(),
        program_args: program_args.iter().map(Into::into).collect(),
    })
}

/// The cgroups an instance's process joins before it execs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cgroups<'a> {
    /// Its tracking cgroup (`service::tree`): the shim kills what is left in it before it starts
    /// the instance and after the instance exits. `None`: tracked by the shim's session only.
    pub tree: Option<&'a Path>,
    /// Its low-weight CPU cgroup while it starts beside a serving sibling.
    pub cpu: Option<&'a Path>,
}

/// Spawns a shim for `spec` and returns `(shim pid, instance pid)` once the instance runs.
pub async fn spawn(
    shim_binary: &Path,
    paths: &ShimPaths,
    spec: &InstanceSpec,
    cgroups: Cgroups<'_>,
) -> Result<(u32, u32), ShimError> {
    let instance = format!("{}/{}", spec.service, spec.index);
    let spawn_err = |message: String| ShimError::Spawn {
        instance: instance.clone(),
        message,
    };
    let args = shim_args(paths, spec, cgroups).map_err(spawn_err)?;
    let mut cmd = tokio::process::Command::new(shim_binary);
    cmd.args(args.to_args());
    cmd.env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(false);
    let mut child = cmd
        .spawn()
        .map_err(|e| spawn_err(format!("{}: {e}", shim_binary.display())))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let handshake = async {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await?;
        // The first process exits at once after forking the real shim; reap it.
        child.wait().await?;
        Ok::<_, std::io::Error>(line)
    };
    let line = tokio::time::timeout(Duration::from_millis(SPAWN_TIMEOUT_MS), handshake)
        .await
        .map_err(|_| spawn_err(format!("no handshake within {SPAWN_TIMEOUT_MS} ms")))?
        .map_err(|e| spawn_err(format!("reading the handshake: {e}")))?;
    match proto::parse_handshake(line.trim_end()) {
        Ok(pids) => Ok(pids),
        Err(message) if message.starts_with("busy") => Err(ShimError::Busy { instance, message }),
        Err(message) if message.is_empty() => {
            Err(spawn_err("the shim exited without a handshake".into()))
        }
        Err(message) => Err(spawn_err(message)),
    }
}

/// One request, one answer line, with a timeout.
pub async fn request(socket: &Path, line: &str) -> Result<String, ShimError> {
    let exchange = async {
        let stream = UnixStream::connect(socket).await?;
        let (read, mut write) = stream.into_split();
        write.write_all(format!("{line}\n").as_bytes()).await?;
        let mut answer = String::new();
        BufReader::new(read).read_line(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), exchange)
        .await
        .map_err(|_| ShimError::Timeout {
            path: socket.to_owned(),
            timeout_ms: REQUEST_TIMEOUT_MS,
        })?
        .map_err(|source| ShimError::Io {
            path: socket.to_owned(),
            source,
        })?;
    let answer = answer.trim_end().to_owned();
    if answer.is_empty() {
        return Err(ShimError::Protocol {
            path: socket.to_owned(),
            message: format!("closed without answering `{line}`"),
        });
    }
    if let Some(message) = answer.strip_prefix("error ") {
        return Err(ShimError::Protocol {
            path: socket.to_owned(),
            message: format!("`{line}`: {message}"),
        });
    }
    Ok(answer)
}

fn parse_status(socket: &Path, line: &str) -> Result<Status, ShimError> {
    Status::parse(line).map_err(|e| ShimError::Protocol {
        path: socket.to_owned(),
        message: e.to_string(),
    })
}

pub async fn status(socket: &Path) -> Result<Status, ShimError> {
    let line = request(socket, "status").await?;
    parse_status(socket, &line)
}

pub async fn stop(socket: &Path, signal: i32, grace_ms: u64) -> Result<(), ShimError> {
    request(socket, &format!("stop {signal} {grace_ms}"))
        .await
        .map(drop)
}

pub async fn signal(socket: &Path, signal: i32) -> Result<(), ShimError> {
    request(socket, &format!("signal {signal}")).await.map(drop)
}

pub async fn release(socket: &Path) -> Result<(), ShimError> {
    request(socket, "release").await.map(drop)
}

/// How long to wait for a released shim to exit and free its lock.
const RELEASE_WAIT_MS: u64 = 2_000;

/// Whether no shim holds an instance's lock file.
pub fn lock_is_free(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(path) else {
        return true;
    };
    // SAFETY: flock on a descriptor we own; the lock goes with the file at the end of the scope.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    rc == 0
}

/// Lets the shim of an exited instance go, and waits until it is gone (its lock is free), so the
/// next shim of the instance can take the lock instead of answering `busy`.
pub async fn release_and_wait(paths: &ShimPaths) {
    if let Err(e) = release(&paths.socket).await {
        tracing::debug!("release: {e}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(RELEASE_WAIT_MS);
    while !lock_is_free(&paths.lock) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits, without a timeout, until the instance exits, and returns its exit status.
pub async fn wait(socket: &Path) -> Result<Status, ShimError> {
    let io = |source| ShimError::Io {
        path: socket.to_owned(),
        source,
    };
    let stream = UnixStream::connect(socket).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    write.write_all(b"wait\n").await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ShimError::Protocol {
            path: socket.to_owned(),
            message: "the shim went away while waiting".into(),
        });
    }
    parse_status(socket, answer.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_round_trip() {
        let p = ShimPaths::new(Path::new("/run/sluice/shims"), "web-api", 12);
        assert_eq!(p.socket, Path::new("/run/sluice/shims/web-api@12.sock"));
        let name = p.socket.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            ShimPaths::parse_socket_name(name),
            Some(("web-api".into(), 12))
        );
        assert_eq!(ShimPaths::parse_socket_name("web.lock"), None);
        assert_eq!(ShimPaths::parse_socket_name("web@x.sock"), None);
    }

    /// The shim reads back exactly what the brain means: the spec's command, identity, limits,
    /// logs and tag, the instance's socket and lock, and its cgroup.
    #[test]
    fn shim_reads_back_the_spec() {
        let spec = InstanceSpec {
            service: "api".into(),
            index: 2,
            argv: vec!["/usr/bin/python3".into(), "-m".into(), "http.server".into()],
            env: [("PORT".to_owned(), "9102".to_owned())].into(),
            directory: "/srv/api/current".into(),
            uid: Some(1000),
            gid: Some(1000),
            groups: Some(vec![27]),
            umask: Some(0o027),
            nofile: Some(4096),
            stdout_log: "/var/lib/sluice/logs/api@2.out".into(),
            stderr_log: "/var/lib/sluice/logs/api@2.err".into(),
            log_max_bytes: 1 << 20,
            log_backups: 3,
        };
        let paths = ShimPaths::new(Path::new("/run/sluice/shims"), "api", 2);
        let cgroup = Path::new("/sys/fs/cgroup/cpu/sluice/api@2");
        let tree = Path::new("/sys/fs/cgroup/unified/sluice-tree/api@2");
        let cgroups = Cgroups {
            tree: Some(tree),
            cpu: Some(cgroup),
        };
        let args = shim_args(&paths, &spec, cgroups).unwrap();
        let parsed = ShimArgs::parse(args.to_args()).unwrap();
        assert_eq!(parsed, args);
        assert_eq!(parsed.id, "api/2");
        assert_eq!((&parsed.socket, &parsed.lock), (&paths.socket, &paths.lock));
        assert_eq!(parsed.tag, spec.tag());
        assert_eq!(parsed.cwd.as_deref(), Some(Path::new("/srv/api/current")));
        assert_eq!((parsed.uid, parsed.gid), (Some(1000), Some(1000)));
        assert_eq!(parsed.groups, Some(vec![27]));
        assert_eq!((parsed.umask, parsed.nofile), (Some(0o027), Some(4096)));
        assert_eq!(parsed.cgroup.as_deref(), Some(cgroup));
        assert_eq!(parsed.tree_cgroup.as_deref(), Some(tree));
        assert_eq!(parsed.program, "/usr/bin/python3");
        assert_eq!(parsed.program_args, ["-m", "http.server"]);

        let empty = InstanceSpec {
            argv: Vec::new(),
            ..spec
        };
        assert_eq!(
            shim_args(&paths, &empty, Cgroups::default()).unwrap_err(),
            "the command is empty"
        );
    }
}
