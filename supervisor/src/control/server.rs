//! The control API's server: HTTP/1.1 with JSON over the control socket, open to root, the
//! daemon's own user, and members of the socket's group (checked with the peer's credentials).
//!
//! Each route decodes its request into [`super::protocol`]'s types, asks the daemon loop through
//! [`super::queue`], and answers with a protocol type or an [`Error`], whose kind picks the status:
//! - `GET  /v1/status[?service=NAME]` → [`StatusDocument`]
//! - `POST /v1/control` with a [`ControlRequest`] → [`Message`]
//! - `POST /v1/deploy` with a [`DeployRequest`] → [`Message`] (the local backend's deploys)
//! - `POST /v1/reload`, `POST /v1/shutdown` → [`Message`]
//! - `GET  /v1/logs` with a [`LogsQuery`] → text, streamed while `follow` is set
//! - `GET  /v1/metrics` → sluice's own metrics as Prometheus text ([`crate::metrics`])
//!
//! [`bind`] makes the socket (mode 0660, group `control_group`); [`serve`] answers on it.

use std::convert::Infallible;
use std::future::Future;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use super::Error;
use super::protocol::{
    ControlAction, ControlRequest, DeployRequest, DeployVerb, LocalVerb, LogStream, LogsQuery,
    Message, Order, StatusDocument, StatusQuery, route,
};
use super::queue::{self, Requests};
use crate::config::{HostConfig, Signal};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Largest request body accepted.
const BODY_MAX_BYTES: usize = 64 * 1024;
/// How often `logs --follow` looks for new lines.
const FOLLOW_POLL_MS: u64 = 200;
/// Upper bound of `lines` for `logs`.
const LOG_LINES_MAX: usize = 100_000;

/// How long answers in flight may take to finish once the daemon exits (a `logs -f` never does).
const DRAIN_MS: u64 = 2_000;

/// Serves the control API on `listener` until `stop` resolves, then lets the answers in flight
/// finish (for at most [`DRAIN_MS`]): `sluice shutdown` gets its answer before the daemon exits.
pub async fn serve(listener: UnixListener, daemon: Requests, stop: impl Future<Output = ()>) {
    let socket_gid = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned))
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait instead of spinning.
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // SO_PEERCRED: the credentials the peer had when it connected. Membership of the socket's
        // group is then looked up in the group database by uid, never in /proc/<pid> (the pid may
        // already belong to another process).
        let cred = stream.peer_cred().ok().map(|c| (c.uid(), c.gid()));
        let allowed = match cred {
            Some((uid, gid)) => {
                tokio::task::spawn_blocking(move || peer_allowed(uid, gid, socket_gid))
                    .await
                    .unwrap_or(false)
            }
            None => false,
        };
        let daemon = daemon.clone();
        let service = hyper::service::service_fn(move |request| {
            let daemon = daemon.clone();
            async move {
                let response = if allowed {
                    route(request, daemon).await
                } else {
                    error(&Error::Forbidden(
                        "not allowed: the control socket is for root and its group".to_owned(),
                    ))
                };
                Ok::<_, Infallible>(response)
            }
        });
        let io = hyper_util::rt::TokioIo::new(stream);
        let connection = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_millis(DRAIN_MS), graceful.shutdown()).await;
}

/// The control socket's mode: root and `control_group` (connecting needs write permission).
const CONTROL_SOCKET_MODE: u32 = 0o660;

/// Binds the control socket, mode 0660, group `control_group` (else the daemon's group). Its
/// directory must be writable by root alone, or someone else could replace the socket and answer
/// the operators' commands.
pub fn bind(host: &HostConfig) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = host.control_socket();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("control_socket {}: no file name", path.display()))?;
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let dir = sluice_safefs::Dir::open(&parent).with_context(|| {
        format!(
            "opening the control socket's directory {}",
            parent.display()
        )
    })?;
    dir.require_trusted()
        .context("the control socket's directory must be writable by root alone")?;
    // We hold the daemon lock, so a socket file left here belongs to a dead daemon. unlinkat
    // removes the entry whatever it is, never what a link points to.
    match dir.unlink(name) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context("removing the old control socket");
        }
        _ => {}
    }
    // Until the chmod below the socket has the umask's mode (0755 under the unit's UMask=0022):
    // nobody but its owner can connect (connecting needs write permission) in that moment.
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    if let Some(group) = &host.control_group {
        let gid = nix::unistd::Group::from_name(group)
            .with_context(|| format!("looking up control_group `{group}`"))?
            .with_context(|| format!("control_group: no group named `{group}`"))?
            .gid;
        nix::unistd::chown(&path, None, Some(gid))
            .with_context(|| format!("chown {} to group {group}", path.display()))?;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(CONTROL_SOCKET_MODE))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Root, the daemon's own user, and members of the socket's group may use the API: the peer's
/// gid at connect, or the group database's groups of its uid (`getgrouplist`).
fn peer_allowed(uid: u32, gid: u32, socket_gid: Option<u32>) -> bool {
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return true;
    }
    let Some(socket_gid) = socket_gid else {
        return false;
    };
    gid == socket_gid || member_of(uid, socket_gid)
}

/// Whether the group database makes user `uid` a member of group `gid` (as primary or
/// supplementary group). An unknown uid is a member of nothing.
fn member_of(uid: u32, gid: u32) -> bool {
    use nix::unistd::{Gid, Uid, User};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .is_ok_and(|groups| groups.contains(&Gid::from_raw(gid)))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("responses serialize");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(bytes))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("static response parts are valid")
}

fn error(e: &Error) -> Response<Body> {
    json(e.http_status(), &e.to_body())
}

fn answer<T: Serialize>(result: Result<T, Error>) -> Response<Body> {
    match result {
        Ok(value) => json(StatusCode::OK, &value),
        Err(e) => error(&e),
    }
}

fn message(result: Result<String, Error>) -> Response<Body> {
    answer(result.map(|message| Message { message }))
}

/// Sends a request to the daemon loop and waits for its answer.
async fn ask<T>(
    daemon: &Requests,
    make: impl FnOnce(queue::Reply<T>) -> queue::Request,
) -> Result<T, Error> {
    let (tx, rx) = oneshot::channel();
    daemon
        .send(make(tx))
        .await
        .map_err(|_| Error::Failed("the daemon is exiting".to_owned()))?;
    rx.await
        .map_err(|_| Error::Failed("the daemon dropped the request".to_owned()))?
}

/// The request's query, decoded into a protocol type.
fn query<T: DeserializeOwned>(request: &Request<Incoming>) -> Result<T, Error> {
    serde_urlencoded::from_str(request.uri().query().unwrap_or_default()).map_err(|e| {
        Error::BadRequest(format!(
            "bad query for {}: {}",
            request.uri().path(),
            crate::clip::clip(&e.to_string())
        ))
    })
}

/// The request's body, decoded into a protocol type.
async fn body<T: DeserializeOwned>(request: Request<Incoming>, what: &str) -> Result<T, Error> {
    let bytes = read_body(request).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::BadRequest(format!(
            "bad {what} request: {}",
            crate::clip::clip(&e.to_string())
        ))
    })
}

/// What the daemon loop is to do for a control request: the signal of `signal` resolved.
pub fn order(request: &ControlRequest) -> Result<Order, Error> {
    Ok(match (request.action, &request.signal) {
        (ControlAction::Start, _) => Order::Start,
        (ControlAction::Stop, _) => Order::Stop,
        (ControlAction::Restart, _) => Order::Restart,
        (ControlAction::Drain, _) => Order::Drain,
        (ControlAction::Enable, _) => Order::Enable,
        (ControlAction::Signal, Some(name)) => match Signal::parse(name) {
            Some(signal) => Order::Signal(signal.0),
            None => {
                return Err(Error::BadRequest(format!(
                    "unknown signal `{}`",
                    crate::clip::clip(name)
                )));
            }
        },
        (ControlAction::Signal, None) => {
            return Err(Error::BadRequest("`signal` needs a signal".to_owned()));
        }
    })
}

/// What the daemon loop is to do for a deploy request (`deploy` must name its build).
pub fn local_verb(request: &DeployRequest) -> Result<LocalVerb, Error> {
    Ok(match (request.verb, &request.build) {
        (DeployVerb::Deploy, Some(build)) => LocalVerb::Deploy {
            build: build.clone(),
            canary: request.canary,
        },
        (DeployVerb::Deploy, None) => {
            return Err(Error::BadRequest("`deploy` needs a build".to_owned()));
        }
        (DeployVerb::Promote, _) => LocalVerb::Promote,
        (DeployVerb::Rollback, _) => LocalVerb::Rollback,
    })
}

async fn route(request: Request<Incoming>, daemon: Requests) -> Response<Body> {
    match (request.method().clone(), request.uri().path()) {
        (Method::GET, route::STATUS) => answer(status(&request, &daemon).await),
        (Method::POST, route::CONTROL) => message(control(request, &daemon).await),
        (Method::POST, route::DEPLOY) => message(deploy(request, &daemon).await),
        (Method::POST, route::RELOAD) => {
            message(ask(&daemon, |reply| queue::Request::Reload { reply }).await)
        }
        (Method::POST, route::SHUTDOWN) => {
            message(ask(&daemon, |reply| queue::Request::Shutdown { reply }).await)
        }
        (Method::GET, route::LOGS) => match log_path(&request, &daemon).await {
            Ok((path, query)) => logs(path, query.lines.min(LOG_LINES_MAX), query.follow).await,
            Err(e) => error(&e),
        },
        (Method::GET, route::METRICS) => {
            let openmetrics = crate::metrics::wants_openmetrics(&request);
            match crate::metrics::scrape(&daemon, openmetrics).await {
                Ok(text) => crate::metrics::response(text, openmetrics)
                    .map(|body| body.map_err(|e| match e {}).boxed()),
                Err(e) => error(&e),
            }
        }
        (method, path) => error(&Error::NoSuchRoute {
            method: method.to_string(),
            path: crate::clip::clip(path).into_owned(),
        }),
    }
}

async fn status(request: &Request<Incoming>, daemon: &Requests) -> Result<StatusDocument, Error> {
    let query: StatusQuery = query(request)?;
    ask(daemon, |reply| queue::Request::Status {
        service: query.service,
        reply,
    })
    .await
}

async fn control(request: Request<Incoming>, daemon: &Requests) -> Result<String, Error> {
    let control: ControlRequest = body(request, "control").await?;
    let order = order(&control)?;
    ask(daemon, |reply| queue::Request::Control {
        service: control.service,
        index: control.index,
        order,
        reply,
    })
    .await
}

async fn deploy(request: Request<Incoming>, daemon: &Requests) -> Result<String, Error> {
    let deploy: DeployRequest = body(request, "deploy").await?;
    let verb = local_verb(&deploy)?;
    ask(daemon, |reply| queue::Request::Local {
        service: deploy.service,
        verb,
        reply,
    })
    .await
}

async fn log_path(
    request: &Request<Incoming>,
    daemon: &Requests,
) -> Result<(PathBuf, LogsQuery), Error> {
    let query: LogsQuery = query(request)?;
    let path = ask(daemon, |reply| queue::Request::LogPath {
        service: query.service.clone(),
        index: query.index,
        stderr: query.stream == LogStream::Stderr,
        reply,
    })
    .await?;
    Ok((path, query))
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Error> {
    let limited = http_body_util::Limited::new(request.into_body(), BODY_MAX_BYTES);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(Error::BadRequest(format!("reading the request: {e}"))),
    }
}

/// The last `lines` lines of a log file, then (with `follow`) whatever is appended, across rotations.
///
/// The log directory may belong to the service's user, who can put a link to any file in place of
/// the log: the directory is opened once and the file through `sluice-safefs`, so a link, fifo or
/// hard link is refused (an error naming the file, or with `follow` a note in the daemon's log
/// while it stays refused), and nothing is ever read through it.
async fn logs(path: PathBuf, lines: usize, follow: bool) -> Response<Body> {
    let opened = tokio::task::spawn_blocking(move || open_log(&path, lines))
        .await
        .expect("opening a log does not panic");
    let (log, tail, offset) = match opened {
        Ok(t) => t,
        Err(e) => {
            // The error names the file; a name the service user chose is quoted bounded.
            let text = crate::clip::clip(&e.to_string()).into_owned();
            return error(&if sluice_safefs::is_refused(&e) {
                Error::Forbidden(text)
            } else {
                Error::Failed(text)
            });
        }
    };
    // The body is a stream over a channel whose receiver hyper drops when the client goes away
    // (hyper reads the connection's end while it waits on the body): the follower sees the
    // channel closed within one poll, even when the file never grows, and ends.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        if !tail.is_empty() && tx.send(Bytes::from(tail)).await.is_err() {
            return;
        }
        if follow && let Some(log) = log {
            FOLLOWERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = follow_file(log, offset, &tx).await;
            FOLLOWERS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok::<_, std::io::Error>(Frame::data(data)), rx))
    });
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(http_body_util::StreamBody::new(frames).boxed())
        .expect("static response parts are valid")
}

/// `logs --follow` answers streaming now (each holds its log file open while it runs); logged
/// when one ends, so a follower left behind by a client that went away would show.
static FOLLOWERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A log file reached through its directory's descriptor.
struct LogRef {
    dir: sluice_safefs::Dir,
    name: std::ffi::OsString,
}

/// Opens the log's directory and reads the tail of the file: (the directory, unless it does not
/// exist yet; the tail; the file's length). A missing file is an empty log.
fn open_log(path: &Path, lines: usize) -> std::io::Result<(Option<LogRef>, Vec<u8>, u64)> {
    let (dir, name) = match sluice_safefs::split(path) {
        Ok(found) => found,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let (tail, offset) = match dir.open_read(&name) {
        Ok(mut file) => tail(&mut file, lines)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
        Err(e) => return Err(e),
    };
    Ok((Some(LogRef { dir, name }), tail, offset))
}

/// Reads the last `lines` lines (looking at most at the last 4 MiB) and the file's length.
fn tail(file: &mut std::fs::File, lines: usize) -> std::io::Result<(Vec<u8>, u64)> {
    use std::io::{Read, Seek};
    const WINDOW: u64 = 4 * 1024 * 1024;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(WINDOW);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    file.take(len - start).read_to_end(&mut buf)?;
    let mut cut = buf.len();
    let mut seen = 0;
    // A trailing newline ends the last line; it does not start another.
    let search_end = if buf.last() == Some(&b'\n') {
        buf.len() - 1
    } else {
        buf.len()
    };
    for (i, b) in buf[..search_end].iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == lines {
                cut = i + 1;
                break;
            }
        }
    }
    if seen < lines {
        cut = 0;
    }
    if lines == 0 {
        cut = buf.len();
    }
    Ok((buf.split_off(cut), len))
}

/// Sends what is appended to the log from `offset` on, following it across rotations, until the
/// client goes away. The file stays open between polls (reopened by name only when the name
/// points elsewhere: rotated, or refused), so a follower holds exactly one descriptor on it.
async fn follow_file(
    log: LogRef,
    mut offset: u64,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) -> Result<(), ()> {
    let log = std::sync::Arc::new(log);
    let mut inode = log.dir.meta_of(&log.name).map(|m| m.ino).ok();
    let mut file: Option<tokio::fs::File> = None;
    let mut buf = vec![0u8; 64 * 1024];
    // Reported once per stretch of refusals, not once per poll.
    let mut reported = false;
    loop {
        // First what was appended to the file held open (also the end of a file just rotated
        // away), then whether the name points to another file now.
        if let Some(open) = file.as_mut() {
            let len = open.metadata().await.map_err(drop)?.len();
            if len < offset {
                // Truncated in place: read it again from its start.
                offset = 0;
            }
            open.seek(SeekFrom::Start(offset)).await.map_err(drop)?;
            loop {
                let n = open.read(&mut buf).await.map_err(drop)?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                tx.send(Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .map_err(drop)?;
            }
        }
        let named = log.dir.meta_of(&log.name).map(|m| m.ino).ok();
        if file.is_none() || (named.is_some() && named != inode) {
            let opened = {
                let log = std::sync::Arc::clone(&log);
                tokio::task::spawn_blocking(move || log.dir.open_read(&log.name))
                    .await
                    .expect("opening a log does not panic")
            };
            match opened {
                Ok(opened) => {
                    reported = false;
                    let opened = tokio::fs::File::from_std(opened);
                    let meta = opened.metadata().await.map_err(drop)?;
                    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
                    if Some(ino) != inode {
                        // Rotated: the new file is read from its start.
                        inode = Some(ino);
                        offset = 0;
                    }
                    file = Some(opened);
                    continue;
                }
                Err(e) if sluice_safefs::is_refused(&e) && !reported => {
                    reported = true;
                    file = None;
                    tracing::warn!("logs --follow: {}", crate::clip::clip(&e.to_string()));
                }
                // Missing between a rotation's renames, or still refused: look again later.
                Err(_) => file = None,
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(FOLLOW_POLL_MS)) => {}
            () = tx.closed() => {
                tracing::info!(
                    followers_left = FOLLOWERS.load(std::sync::atomic::Ordering::Relaxed) - 1,
                    "logs --follow: the client went away"
                );
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_takes_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        assert_eq!(open_log(&path, 2).unwrap().1, b"c\nd\n".to_vec());
        assert_eq!(open_log(&path, 2).unwrap().2, 8);
        assert_eq!(open_log(&path, 10).unwrap().1, b"a\nb\nc\nd\n");
        std::fs::write(&path, "a\nb\npartial").unwrap();
        assert_eq!(open_log(&path, 1).unwrap().1, b"partial");
        assert_eq!(open_log(&path, 0).unwrap().1, b"");
        assert!(
            open_log(&dir.path().join("missing"), 5)
                .unwrap()
                .1
                .is_empty()
        );
    }

    #[test]
    fn a_log_replaced_by_a_link_or_fifo_is_refused_and_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root:secret-hash:19000::::::\n").unwrap();
        let path = dir.path().join("web-0.stdout.log");
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        let e = open_log(&path, 10).err().expect("a link is refused");
        assert!(sluice_safefs::is_refused(&e), "{e}");
        assert!(e.to_string().contains("web-0.stdout.log"), "{e}");
        assert!(!e.to_string().contains("secret-hash"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: nul-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        let e = open_log(&path, 10)
            .err()
            .expect("a fifo is refused, without blocking");
        assert!(e.to_string().contains("a fifo"), "{e}");
    }

    #[test]
    fn peers() {
        assert!(peer_allowed(0, 0, None));
        assert!(peer_allowed(1234, 4242, Some(4242)));
        assert!(!peer_allowed(1234, 1234, Some(4242)));
        assert!(!peer_allowed(1234, 1234, None));
        // The group database: root's primary group is 0 on every Linux system.
        assert!(member_of(0, 0));
        // A uid nobody has is a member of nothing.
        assert!(!member_of(3_999_999_999, 0));
    }

    /// The real server and the real client over a socket, with a stand-in for the daemon loop
    /// that answers each request the way the daemon does.
    #[tokio::test]
    async fn errors_cross_the_socket_typed_and_pick_status_and_exit_code() {
        use super::super::client::Client;
        use super::super::queue::Request;
        use super::super::{ErrorKind, queue};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<queue::Request>(4);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, tx, async {
            let _ = stopped.await;
        }));
        let seen = tokio::spawn(async move {
            let mut orders = Vec::new();
            while let Some(request) = rx.recv().await {
                match request {
                    Request::Status { service, reply } => {
                        let answer: Result<StatusDocument, Error> = match service {
                            None => Ok(StatusDocument::default()),
                            Some(name) => Err(Error::NoSuchService {
                                name,
                                known: vec!["web".into()],
                            }),
                        };
                        let _ = reply.send(answer);
                    }
                    Request::Control {
                        service,
                        index,
                        order,
                        reply,
                    } => {
                        orders.push((service.clone(), index, order));
                        let _ = reply.send(Ok(format!("{service}: done")));
                    }
                    Request::Reload { reply } => {
                        let _ = reply.send(Err(Error::InvalidConfig("web.toml: bad".into())));
                    }
                    Request::Shutdown { reply } => {
                        let _ = reply.send(Err(Error::Conflict("already stopping".into())));
                    }
                    Request::Local { reply, .. } => {
                        let _ = reply.send(Err(Error::Failed("no builds".into())));
                    }
                    Request::LogPath {
                        service,
                        index,
                        reply,
                        ..
                    } => {
                        let _ = reply.send(Err(Error::NoSuchInstance {
                            service,
                            index,
                            count: 2,
                        }));
                    }
                    Request::Metrics { reply, .. } => {
                        let _ = reply.send(Ok("sluice_up 1\n".into()));
                    }
                }
            }
            orders
        });
        let client = Client::new(path.clone(), Some(10_000));

        assert!(client.status(None).await.unwrap().services.is_empty());
        let e = client.status(Some("api")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSuchService);
        assert_eq!(e.exit_code(), crate::exit::FAILED);
        assert_eq!(e.to_string(), "no service named `api` (known: web)");

        let restart = ControlRequest {
            service: "web".into(),
            index: Some(1),
            action: ControlAction::Restart,
            signal: None,
        };
        assert_eq!(client.control(&restart).await.unwrap().message, "web: done");
        let hup = ControlRequest {
            action: ControlAction::Signal,
            signal: Some("hup".into()),
            index: None,
            ..restart.clone()
        };
        client.control(&hup).await.unwrap();
        // Refused by the server itself: the daemon loop never sees it.
        let bad = ControlRequest {
            signal: Some("SIGNOPE".into()),
            ..hup.clone()
        };
        let e = client.control(&bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BadRequest);
        assert!(e.to_string().contains("unknown signal `SIGNOPE`"), "{e}");
        let none = ControlRequest {
            signal: None,
            ..hup.clone()
        };
        assert_eq!(
            client.control(&none).await.unwrap_err().kind(),
            ErrorKind::BadRequest
        );

        let e = client.reload().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert_eq!(e.exit_code(), crate::exit::CONFIG);
        assert!(
            e.to_string()
                .starts_with(super::super::error::INVALID_CONFIG)
        );
        assert_eq!(
            client.shutdown().await.unwrap_err().kind(),
            ErrorKind::Conflict
        );
        let deploy = DeployRequest {
            service: "web".into(),
            verb: DeployVerb::Deploy,
            build: None,
            canary: false,
        };
        let e = client.deploy(&deploy).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BadRequest, "{e}");
        let deploy = DeployRequest {
            build: Some("b1".into()),
            ..deploy
        };
        assert_eq!(
            client.deploy(&deploy).await.unwrap_err().kind(),
            ErrorKind::Failed
        );
        let logs = LogsQuery {
            service: "web".into(),
            index: 5,
            stream: LogStream::Stdout,
            lines: 10,
            follow: false,
        };
        let e = client.logs(&logs, |_| Ok(())).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSuchInstance);
        assert_eq!(e.to_string(), "web has no instance 5 (it has 2)");

        let _ = stop.send(());
        server.await.unwrap();
        let orders = seen.await.unwrap();
        assert_eq!(
            orders,
            [
                ("web".to_owned(), Some(1), Order::Restart),
                ("web".to_owned(), None, Order::Signal(libc::SIGHUP)),
            ]
        );
    }

    #[test]
    fn control_requests_become_orders() {
        let request = |action, signal: Option<&str>| ControlRequest {
            service: "web".into(),
            index: None,
            action,
            signal: signal.map(str::to_owned),
        };
        for (action, want) in [
            (ControlAction::Start, Order::Start),
            (ControlAction::Stop, Order::Stop),
            (ControlAction::Restart, Order::Restart),
            (ControlAction::Drain, Order::Drain),
            (ControlAction::Enable, Order::Enable),
        ] {
            assert_eq!(order(&request(action, None)).unwrap(), want);
        }
        assert_eq!(
            order(&request(ControlAction::Signal, Some("USR1"))).unwrap(),
            Order::Signal(libc::SIGUSR1)
        );
        assert_eq!(
            order(&request(ControlAction::Signal, Some("15"))).unwrap(),
            Order::Signal(15)
        );
        assert!(matches!(
            order(&request(ControlAction::Signal, None)),
            Err(Error::BadRequest(_))
        ));
    }
}
