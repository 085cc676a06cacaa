//! The control API: HTTP/1.1 with JSON over the control socket, open to root, the daemon's own
//! user, and members of the socket's group (checked with the peer's credentials).
//!
//! Routes:
//! - `GET  /v1/status[?service=NAME]` → `{"services": [ServiceStatus...]}`
//! - `POST /v1/control` with `{"service", "index"?, "action": "start|stop|restart|signal", "signal"?}`
//! - `POST /v1/deploy` with `{"service", "verb": "deploy|promote|rollback", "build"?, "canary"?}`
//!   (the local backend's deploys)
//! - `POST /v1/reload`, `POST /v1/shutdown`
//! - `GET  /v1/logs?service=NAME&index=I[&stream=stderr][&lines=N][&follow=1]` → text, streamed
//!   while `follow` is set

use std::convert::Infallible;
use std::future::Future;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use crate::config::Signal;
use crate::daemon::{self, Requests};
use crate::service::Action;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Largest request body accepted.
const BODY_MAX_BYTES: usize = 64 * 1024;
/// How often `logs --follow` looks for new lines.
const FOLLOW_POLL_MS: u64 = 200;
/// Upper bound of `lines` for `logs`.
const LOG_LINES_MAX: usize = 100_000;

/// A control request as the CLI sends it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub service: String,
    #[serde(default)]
    pub index: Option<u32>,
    pub action: String,
    #[serde(default)]
    pub signal: Option<String>,
}

/// `sluice deploy`, `promote`, `rollback` on the local backend.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub service: String,
    pub verb: String,
    #[serde(default)]
    pub build: Option<String>,
    #[serde(default)]
    pub canary: bool,
}

/// A successful answer that is not a status.
#[derive(Debug, Serialize, Deserialize)]
pub struct Message {
    pub message: String,
}

/// An error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

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
        let allowed = stream
            .peer_cred()
            .map(|cred| peer_allowed(cred.uid(), cred.gid(), cred.pid(), socket_gid))
            .unwrap_or(false);
        let daemon = daemon.clone();
        let service = hyper::service::service_fn(move |request| {
            let daemon = daemon.clone();
            async move {
                let response = if allowed {
                    route(request, daemon).await
                } else {
                    error(
                        StatusCode::FORBIDDEN,
                        "not allowed: the control socket is for root and its group",
                    )
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

/// Root, the daemon's own user, and members of the socket's group may use the API.
fn peer_allowed(uid: u32, gid: u32, pid: Option<i32>, socket_gid: Option<u32>) -> bool {
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return true;
    }
    let Some(socket_gid) = socket_gid else {
        return false;
    };
    if gid == socket_gid {
        return true;
    }
    // Supplementary groups of the peer process, as the kernel has them.
    let Some(pid) = pid else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|groups| {
                    groups
                        .split_whitespace()
                        .any(|g| g.parse::<u32>() == Ok(socket_gid))
                })
        })
        .unwrap_or(false)
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

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: message.into(),
        },
    )
}

fn answer(result: Result<String, String>) -> Response<Body> {
    match result {
        Ok(message) => json(StatusCode::OK, &Message { message }),
        Err(message) if message.starts_with("no service named") => {
            error(StatusCode::NOT_FOUND, message)
        }
        Err(message) if message.starts_with(daemon::INVALID_CONFIG) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, message)
        }
        Err(message) => error(StatusCode::CONFLICT, message),
    }
}

/// Sends a request to the daemon loop and waits for its answer.
async fn ask<T>(
    daemon: &Requests,
    make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> daemon::Request,
) -> Result<T, String> {
    let (tx, rx) = oneshot::channel();
    daemon
        .send(make(tx))
        .await
        .map_err(|_| "the daemon is exiting".to_owned())?;
    rx.await
        .map_err(|_| "the daemon dropped the request".to_owned())?
}

fn query(request: &Request<Incoming>) -> Vec<(String, String)> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

async fn route(request: Request<Incoming>, daemon: Requests) -> Response<Body> {
    let params = query(&request);
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    match (request.method().clone(), request.uri().path()) {
        (Method::GET, "/v1/status") => {
            match ask(&daemon, |reply| daemon::Request::Status {
                service: param("service"),
                reply,
            })
            .await
            {
                Ok(services) => json(StatusCode::OK, &serde_json::json!({ "services": services })),
                Err(e) => answer(Err(e)),
            }
        }
        (Method::POST, "/v1/control") => {
            let body = match read_body(request).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let control: ControlRequest = match serde_json::from_slice(&body) {
                Ok(c) => c,
                Err(e) => {
                    return error(StatusCode::BAD_REQUEST, format!("bad control request: {e}"));
                }
            };
            let action = match (control.action.as_str(), &control.signal) {
                ("start", _) => Action::Start,
                ("stop", _) => Action::Stop,
                ("restart", _) => Action::Restart,
                ("drain", _) => Action::Drain,
                ("enable", _) => Action::Enable,
                ("signal", Some(name)) => match Signal::parse(name) {
                    Some(signal) => Action::Signal(signal.0),
                    None => {
                        return error(StatusCode::BAD_REQUEST, format!("unknown signal `{name}`"));
                    }
                },
                ("signal", None) => {
                    return error(StatusCode::BAD_REQUEST, "`signal` needs a signal");
                }
                (other, _) => {
                    return error(StatusCode::BAD_REQUEST, format!("unknown action `{other}`"));
                }
            };
            answer(
                ask(&daemon, |reply| daemon::Request::Control {
                    service: control.service,
                    index: control.index,
                    action,
                    reply,
                })
                .await,
            )
        }
        (Method::POST, "/v1/deploy") => {
            let body = match read_body(request).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let deploy: DeployRequest = match serde_json::from_slice(&body) {
                Ok(d) => d,
                Err(e) => {
                    return error(StatusCode::BAD_REQUEST, format!("bad deploy request: {e}"));
                }
            };
            let verb = match deploy.verb.as_str() {
                "deploy" => match deploy.build {
                    Some(build) => crate::service::LocalVerb::Deploy {
                        build,
                        canary: deploy.canary,
                    },
                    None => return error(StatusCode::BAD_REQUEST, "`deploy` needs a build"),
                },
                "promote" => crate::service::LocalVerb::Promote,
                "rollback" => crate::service::LocalVerb::Rollback,
                other => return error(StatusCode::BAD_REQUEST, format!("unknown verb `{other}`")),
            };
            answer(
                ask(&daemon, |reply| daemon::Request::Local {
                    service: deploy.service,
                    verb,
                    reply,
                })
                .await,
            )
        }
        (Method::POST, "/v1/reload") => {
            answer(ask(&daemon, |reply| daemon::Request::Reload { reply }).await)
        }
        (Method::POST, "/v1/shutdown") => {
            answer(ask(&daemon, |reply| daemon::Request::Shutdown { reply }).await)
        }
        (Method::GET, "/v1/logs") => {
            let Some(service) = param("service") else {
                return error(StatusCode::BAD_REQUEST, "`logs` needs `service`");
            };
            let Some(index) = param("index").and_then(|i| i.parse().ok()) else {
                return error(StatusCode::BAD_REQUEST, "`logs` needs a numeric `index`");
            };
            let stderr = param("stream").as_deref() == Some("stderr");
            let lines = param("lines")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(100)
                .min(LOG_LINES_MAX);
            let follow = param("follow").is_some_and(|f| f == "1" || f == "true");
            let path = match ask(&daemon, |reply| daemon::Request::LogPath {
                service,
                index,
                stderr,
                reply,
            })
            .await
            {
                Ok(path) => path,
                Err(e) => return answer(Err(e)),
            };
            logs(path, lines, follow).await
        }
        (_, path) => error(StatusCode::NOT_FOUND, format!("no such route: {path}")),
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let limited = http_body_util::Limited::new(request.into_body(), BODY_MAX_BYTES);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("reading the request: {e}"),
        )),
    }
}

/// The last `lines` lines of a log file, then (with `follow`) whatever is appended, across rotations.
async fn logs(path: PathBuf, lines: usize, follow: bool) -> Response<Body> {
    let (tail, offset) = match tail(&path, lines).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", path.display()),
            );
        }
    };
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(8);
    tokio::spawn(async move {
        if !tail.is_empty() && tx.send(Frame::data(Bytes::from(tail))).await.is_err() {
            return;
        }
        if follow {
            // Ends when the client goes away (the send fails).
            let _ = follow_file(&path, offset, &mut tx).await;
        }
    });
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(body.boxed())
        .expect("static response parts are valid")
}

/// Reads the last `lines` lines (looking at most at the last 4 MiB) and the file's length.
async fn tail(path: &Path, lines: usize) -> std::io::Result<(Vec<u8>, u64)> {
    const WINDOW: u64 = 4 * 1024 * 1024;
    let mut file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    let start = len.saturating_sub(WINDOW);
    file.seek(SeekFrom::Start(start)).await?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    (&mut file).take(len - start).read_to_end(&mut buf).await?;
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

async fn follow_file(
    path: &Path,
    mut offset: u64,
    tx: &mut http_body_util::channel::Sender<Bytes, std::io::Error>,
) -> Result<(), ()> {
    use std::os::unix::fs::MetadataExt;
    let mut inode = tokio::fs::metadata(path).await.map(|m| m.ino()).ok();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Ok(mut file) = tokio::fs::File::open(path).await {
            let meta = file.metadata().await.map_err(drop)?;
            if Some(meta.ino()) != inode || meta.len() < offset {
                // Rotated (or truncated): the new file is read from its start.
                inode = Some(meta.ino());
                offset = 0;
            }
            file.seek(SeekFrom::Start(offset)).await.map_err(drop)?;
            loop {
                let n = file.read(&mut buf).await.map_err(drop)?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                tx.send(Frame::data(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .map_err(drop)?;
            }
        }
        tokio::time::sleep(Duration::from_millis(FOLLOW_POLL_MS)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tail_takes_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&path, 2).await.unwrap(), (b"c\nd\n".to_vec(), 8));
        assert_eq!(tail(&path, 10).await.unwrap().0, b"a\nb\nc\nd\n");
        std::fs::write(&path, "a\nb\npartial").unwrap();
        assert_eq!(tail(&path, 1).await.unwrap().0, b"partial");
        assert_eq!(tail(&path, 0).await.unwrap().0, b"");
    }

    #[test]
    fn peers() {
        assert!(peer_allowed(0, 0, None, None));
        assert!(peer_allowed(1234, 4242, None, Some(4242)));
        assert!(!peer_allowed(1234, 1234, None, Some(4242)));
        assert!(!peer_allowed(1234, 1234, None, None));
    }
}
