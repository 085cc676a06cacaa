//! The store reader: the build store's client (`object_store`, with its HTTP, TLS and XML stacks)
//! runs in a process of its own, `sluiced __store-reader`, not in the daemon.
//!
//! Two reasons. The daemon's resident memory is mostly the pages of its binary that it has run,
//! and the store's client is the largest code a deploy runs (~1 MiB of text and its heap, see
//! BENCHMARKS.md): in a child those pages are the child's and go with it. And the store's
//! responses are parsed by that code: the daemon aborts on a panic, so a store that trips one
//! would take the daemon down, where it now fails one fetch.
//!
//! The protocol, between the daemon and the child it spawned from its own image
//! (`/proc/self/exe`, so both are the same version even after a package upgrade replaced the
//! file):
//!
//! - stdin: one JSON [`Request`] (the URL, the store variables when they are not the process
//!   environment, the stall limit), then end of file. Credentials never appear on a command line.
//! - stdout: `+` once the store has answered the request, then the object's bytes as they
//!   arrive. The daemon hashes, counts, bounds and extracts them as it did its own download.
//! - exit status 0 after the last byte; otherwise the child writes one JSON [`Failure`] on
//!   stderr and exits 1. A child that ended in any other way (a signal, a panic's abort) fails
//!   the fetch with its status and the end of its stderr.
//!
//! The child lives only as long as the daemon reads it: it is killed when the daemon drops the
//! stream (a cancelled install, a limit crossed), it exits on the first write after the daemon
//! is gone (`EPIPE`), and a store that sends nothing ends it after `fetch_stall_ms`.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::store::{ByteStream, StoreEnv};
use super::{BuildError, Limits};
use crate::clip::clip;

/// The first argument that makes `sluiced` a store reader instead of the daemon.
pub const STORE_READER_ARG: &str = "__store-reader";
/// Largest request the child reads from stdin, in bytes (a URL and a few credentials).
const REQUEST_MAX_BYTES: u64 = 64 * 1024;
/// How much of the child's stderr the daemon keeps, in bytes: its failure, or a panic's message.
const STDERR_MAX_BYTES: u64 = 8 * 1024;
/// Bytes read from the child's stdout at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// The pipe's capacity asked for (the kernel's default is 64 KiB): fewer wake-ups per MiB.
const PIPE_BYTES: libc::c_int = 1 << 20;
/// The byte the child writes once the store has answered.
const ANSWERED: u8 = b'+';

/// The executable run as the store reader; unset, the store is read in this process.
static READER: OnceLock<PathBuf> = OnceLock::new();

/// Makes the store fetches of every [`super::Releases`] made after this call run in a child
/// executing `exe` with [`STORE_READER_ARG`]: the daemon calls it once, at its start, with
/// `/proc/self/exe`. Without it (tests of this crate, the CLI), fetches run in the calling
/// process unless a `Releases` is given a reader of its own.
pub fn use_store_reader(exe: PathBuf) {
    let _ = READER.set(exe);
}

/// The reader set by [`use_store_reader`].
pub(super) fn default_reader() -> Option<PathBuf> {
    READER.get().cloned()
}

/// What the daemon asks of the child.
#[derive(Serialize, Deserialize)]
struct Request {
    url: String,
    /// The store variables, when the daemon was given them instead of its environment; `None`:
    /// the child's environment, which is the daemon's.
    vars: Option<BTreeMap<String, String>>,
    fetch_stall_ms: u64,
}

/// Why the child's fetch failed: the errors a store's read can have.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Failure {
    BadUrl {
        message: String,
    },
    NotFound,
    Fetch {
        message: String,
    },
    Stalled,
    /// The request on stdin was unreadable: a daemon and a reader of different versions.
    Request {
        message: String,
    },
}

impl Failure {
    fn of(e: BuildError) -> Failure {
        match e {
            BuildError::BadUrl { message, .. } => Failure::BadUrl { message },
            BuildError::NotFound { .. } => Failure::NotFound,
            BuildError::Stalled { .. } => Failure::Stalled,
            BuildError::Fetch { message, .. } => Failure::Fetch { message },
            other => Failure::Fetch {
                message: other.to_string(),
            },
        }
    }

    fn into_error(self, url: &str, limits: &Limits) -> BuildError {
        let url = clip(url).into_owned();
        match self {
            Failure::BadUrl { message } => BuildError::BadUrl { url, message },
            Failure::NotFound => BuildError::NotFound { url },
            Failure::Fetch { message } => BuildError::Fetch { url, message },
            Failure::Stalled => BuildError::Stalled {
                url,
                stall_ms: limits.fetch_stall_ms,
            },
            Failure::Request { message } => BuildError::Fetch {
                url,
                message: format!("the store reader refused its request: {message}"),
            },
        }
    }
}

/// The `main` of `sluiced __store-reader`: one fetch, as the module doc says. Returns the exit
/// code.
pub fn main() -> i32 {
    let fail = |failure: Failure| {
        let line = serde_json::to_string(&failure).unwrap_or_default();
        let _ = writeln!(std::io::stderr(), "{line}");
        1
    };
    let mut text = String::new();
    if let Err(e) = std::io::stdin()
        .take(REQUEST_MAX_BYTES)
        .read_to_string(&mut text)
    {
        return fail(Failure::Request {
            message: e.to_string(),
        });
    }
    let request: Request = match serde_json::from_str(&text) {
        Ok(request) => request,
        Err(e) => {
            return fail(Failure::Request {
                message: e.to_string(),
            });
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return fail(Failure::Fetch {
                message: format!("cannot start a runtime: {e}"),
            });
        }
    };
    match runtime.block_on(copy_out(request)) {
        Ok(()) => 0,
        // The daemon stopped reading: it has its reason and needs no word from here.
        Err(None) => 1,
        Err(Some(failure)) => fail(failure),
    }
}

/// Reads the object and writes it to stdout. `Err(None)`: stdout is gone.
async fn copy_out(request: Request) -> Result<(), Option<Failure>> {
    let limits = Limits {
        fetch_stall_ms: request.fetch_stall_ms,
        ..Limits::default()
    };
    let mut out = stdout_pipe().map_err(|e| {
        Some(Failure::Request {
            message: format!("stdout must be a pipe: {e}"),
        })
    })?;
    let env = StoreEnv::new(request.vars.as_ref(), None);
    let mut stream = super::store::open_here(&request.url, &env, &limits)
        .await
        .map_err(|e| Some(Failure::of(e)))?;
    out.write_all(&[ANSWERED]).await.map_err(|_| None)?;
    let stall = std::time::Duration::from_millis(limits.fetch_stall_ms);
    loop {
        let next = tokio::time::timeout(stall, stream.next())
            .await
            .map_err(|_| Some(Failure::Stalled))?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| Some(Failure::of(e)))?;
        out.write_all(&chunk).await.map_err(|_| None)?;
    }
    out.flush().await.map_err(|_| None)
}

/// This process's stdout, which the daemon made a pipe, written without blocking the runtime.
fn stdout_pipe() -> std::io::Result<tokio::net::unix::pipe::Sender> {
    use std::os::fd::AsFd as _;
    let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
    tokio::net::unix::pipe::Sender::from_owned_fd(fd)
}

/// Starts a child reading `url` and returns its bytes once the store answered, or the child's
/// failure when it did not.
pub(super) async fn open(
    exe: &Path,
    url: &str,
    env: &StoreEnv<'_>,
    limits: &Limits,
) -> Result<ByteStream, BuildError> {
    let failed = |message: String| BuildError::Fetch {
        url: clip(url).into_owned(),
        message,
    };
    let request = serde_json::to_vec(&Request {
        url: url.to_owned(),
        vars: env.vars().cloned(),
        fetch_stall_ms: limits.fetch_stall_ms,
    })
    .map_err(|e| failed(format!("cannot write the store reader's request: {e}")))?;
    let mut child = tokio::process::Command::new(exe)
        // `ps` shows `sluiced __store-reader`, not `/proc/self/exe …`.
        .arg0(crate::cli::DAEMON_BINARY)
        .arg(STORE_READER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            failed(format!(
                "cannot start the store reader {}: {e}",
                exe.display()
            ))
        })?;
    let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        unreachable!("all three were piped");
    };
    widen_pipe(&stdout);
    // The request is far smaller than a pipe: this write does not wait for the child.
    let sent = stdin.write_all(&request).await;
    drop(stdin);
    let mut reader = Reader {
        pid: child.id(),
        child,
        stderr,
        url: url.to_owned(),
        limits: limits.clone(),
    };
    let stall = std::time::Duration::from_millis(limits.fetch_stall_ms);
    if let Err(e) = sent {
        // A reader that exited before it read its request says why in its status.
        let ended = tokio::time::timeout(stall, reader.ended()).await;
        return Err(match ended {
            Ok(Err(why)) => why,
            _ => failed(format!("cannot send the store reader its request: {e}")),
        });
    }
    let mut first = [0u8; 1];
    let read = tokio::time::timeout(stall, stdout.read(&mut first))
        .await
        .map_err(|_| BuildError::Stalled {
            url: clip(url).into_owned(),
            stall_ms: limits.fetch_stall_ms,
        })?;
    match read {
        Ok(1) if first[0] == ANSWERED => {}
        Ok(1) => return Err(failed("the store reader sent an unknown first byte".into())),
        Ok(_) => {
            return Err(reader
                .ended()
                .await
                .err()
                .unwrap_or_else(|| failed("the store reader exited without an answer".into())));
        }
        Err(e) => return Err(failed(format!("reading the store reader: {e}"))),
    }
    let chunks = tokio_util::io::ReaderStream::with_capacity(stdout, READ_CHUNK_BYTES);
    let stream = futures_util::stream::unfold(Some((chunks, reader)), |state| async move {
        let (mut chunks, mut reader) = state?;
        match chunks.next().await {
            Some(Ok(bytes)) => Some((Ok(bytes), Some((chunks, reader)))),
            Some(Err(e)) => {
                let message = format!("reading the store reader: {e}");
                Some((Err(reader.failed(message)), None))
            }
            // End of file: the child's exit says whether that was the object's end.
            None => match reader.ended().await {
                Ok(()) => None,
                Err(e) => Some((Err(e), None)),
            },
        }
    });
    Ok(stream.boxed())
}

/// The daemon's side of a running child, once its stdout is taken.
struct Reader {
    /// The child's pid, for messages (`Child::id` forgets it once the child is reaped).
    pid: Option<u32>,
    child: tokio::process::Child,
    stderr: tokio::process::ChildStderr,
    url: String,
    limits: Limits,
}

impl Reader {
    fn failed(&self, message: String) -> BuildError {
        BuildError::Fetch {
            url: clip(&self.url).into_owned(),
            message,
        }
    }

    /// After the child's stdout ended: `Ok` when it exited 0, else what failed.
    async fn ended(&mut self) -> Result<(), BuildError> {
        let mut tail = Vec::new();
        // The child has closed stdout, so it is exiting; its stderr ends with it.
        let _ = (&mut self.stderr)
            .take(STDERR_MAX_BYTES)
            .read_to_end(&mut tail)
            .await;
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| self.failed(format!("waiting for the store reader: {e}")))?;
        if status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&tail);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        if status.code() == Some(1)
            && let Ok(failure) = serde_json::from_str::<Failure>(last)
        {
            return Err(failure.into_error(&self.url, &self.limits));
        }
        let pid = self.pid.map_or_else(|| "unknown".into(), |p| p.to_string());
        let said = match text.trim() {
            "" => String::new(),
            said => format!(": {}", clip(said)),
        };
        Err(self.failed(format!(
            "the store reader (pid {pid}) ended with {status}{said}"
        )))
    }
}

/// Asks for a larger pipe from the child; the default size works too, so a refusal is ignored.
fn widen_pipe(stdout: &tokio::process::ChildStdout) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: F_SETPIPE_SZ on a descriptor this process owns; it changes only the pipe's size.
    unsafe {
        libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES);
    }
}
