//! The command line's side of the control API: one HTTP/1.1 request per connection over the
//! control socket, each bounded in time by its kind, its answer decoded into [`super::protocol`]'s
//! types and its errors into [`Error`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::Error;
use super::protocol::{
    ControlRequest, DeployRequest, LogsQuery, Message, StatusDocument, StatusQuery, encode_query,
    route,
};

/// The bound of a request that reads: `status`, `logs` without `--follow`, the progress polls of
/// `restart`, and the answer head of `logs --follow`. A daemon that serves its loop answers these
/// in milliseconds; this leaves room for a loaded host (and is systemctl's bound on its D-Bus
/// calls).
pub const QUICK_TIMEOUT_MS: u64 = 25_000;
/// The bound of a request that acts: `start`, `stop`, `restart`, `drain`, `enable`, `signal`,
/// `reload`, `shutdown`, and `deploy`/`promote`/`rollback` on the local backend. Each is answered
/// when its action is done, after drains, warm-ups and stop graces of every instance it touches.
pub const ACTION_TIMEOUT_MS: u64 = 3_600_000;

/// A response whose body is still arriving.
type Streaming = hyper::Response<hyper::body::Incoming>;

/// A client of one daemon's control socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    /// `--timeout-ms`: replaces every request's own bound.
    timeout_ms: Option<u64>,
}

impl Client {
    pub fn new(socket: PathBuf, timeout_ms: Option<u64>) -> Client {
        Client { socket, timeout_ms }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/status`: every service, or one.
    pub async fn status(&self, service: Option<&str>) -> Result<StatusDocument, Error> {
        let query = StatusQuery {
            service: service.map(str::to_owned),
        };
        self.call(
            "status",
            QUICK_TIMEOUT_MS,
            Method::GET,
            &encode_query(route::STATUS, &query),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/control`; answered when the action is done.
    pub async fn control(&self, request: &ControlRequest) -> Result<Message, Error> {
        self.call(
            request.action.as_str(),
            ACTION_TIMEOUT_MS,
            Method::POST,
            route::CONTROL,
            Some(request),
        )
        .await
    }

    /// `POST /v1/deploy` (the local backend).
    pub async fn deploy(&self, request: &DeployRequest) -> Result<Message, Error> {
        self.call(
            "deploy",
            ACTION_TIMEOUT_MS,
            Method::POST,
            route::DEPLOY,
            Some(request),
        )
        .await
    }

    /// `POST /v1/reload`.
    pub async fn reload(&self) -> Result<Message, Error> {
        self.call(
            "reload",
            ACTION_TIMEOUT_MS,
            Method::POST,
            route::RELOAD,
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/shutdown`; answered once every instance stopped.
    pub async fn shutdown(&self) -> Result<Message, Error> {
        self.call(
            "shutdown",
            ACTION_TIMEOUT_MS,
            Method::POST,
            route::SHUTDOWN,
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/metrics`: sluice's own metrics in the classic Prometheus text format.
    pub async fn metrics(&self) -> Result<String, Error> {
        let bound_ms = self.bound_ms(QUICK_TIMEOUT_MS);
        let deadline = Instant::now() + Duration::from_millis(bound_ms);
        self.bounded("metrics", bound_ms, deadline, async {
            let response = self.exchange(Method::GET, route::METRICS, None).await?;
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.bad_answer(e.to_string()))?
                .to_bytes();
            String::from_utf8(bytes.to_vec())
                .map_err(|_| self.bad_answer("the metrics are not UTF-8".to_owned()))
        })
        .await
    }

    /// `GET /v1/logs`: hands each piece of the log to `out` as it arrives. Without `follow` the
    /// whole answer is bounded; with it only the answer's head is (the body ends when the daemon
    /// or the caller goes).
    pub async fn logs(
        &self,
        query: &LogsQuery,
        mut out: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), Error> {
        let bound_ms = self.bound_ms(QUICK_TIMEOUT_MS);
        let deadline = Instant::now() + Duration::from_millis(bound_ms);
        let path = encode_query(route::LOGS, query);
        let response = self
            .bounded("logs", bound_ms, deadline, async {
                self.exchange(Method::GET, &path, None).await
            })
            .await?;
        let copy = async {
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| self.bad_answer(e.to_string()))?;
                if let Ok(data) = frame.into_data() {
                    out(&data).map_err(|e| Error::Failed(format!("writing the log: {e}")))?;
                }
            }
            Ok(())
        };
        if query.follow {
            copy.await
        } else {
            self.bounded("logs", bound_ms, deadline, copy).await
        }
    }

    fn timeout(&self, what: &'static str, bound_ms: u64) -> Error {
        Error::Timeout {
            socket: self.socket.clone(),
            what,
            bound_ms,
        }
    }

    fn bound_ms(&self, default_ms: u64) -> u64 {
        self.timeout_ms.unwrap_or(default_ms)
    }

    /// One request and its whole JSON answer, within the bound of its kind `what`.
    async fn call<T: DeserializeOwned>(
        &self,
        what: &'static str,
        default_ms: u64,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        let bound_ms = self.bound_ms(default_ms);
        let deadline = Instant::now() + Duration::from_millis(bound_ms);
        let body = body.map(|b| serde_json::to_vec(b).expect("requests serialize"));
        self.bounded(what, bound_ms, deadline, async {
            let response = self.exchange(method, path, body).await?;
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.bad_answer(e.to_string()))?
                .to_bytes();
            serde_json::from_slice(&bytes).map_err(|e| {
                self.bad_answer(format!(
                    "the answer to {path} is not what this sluice reads: {e}"
                ))
            })
        })
        .await
    }

    async fn bounded<T>(
        &self,
        what: &'static str,
        bound_ms: u64,
        deadline: Instant,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| self.timeout(what, bound_ms))?
    }

    fn bad_answer(&self, message: String) -> Error {
        Error::BadAnswer {
            socket: self.socket.clone(),
            message,
        }
    }

    /// Connects, sends, and returns a success answer with its body unread; an error answer is read
    /// and returned as its [`Error`].
    async fn exchange(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Streaming, Error> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| Error::Unreachable {
                    socket: self.socket.clone(),
                    source,
                })?;
        let http = |e: hyper::Error| self.bad_answer(e.to_string());
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(http)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let bytes = body.map_or_else(Bytes::new, Bytes::from);
        let request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", "sluice")
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .map_err(|e| self.bad_answer(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(http)?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        Err(Error::from_answer(status, &body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ErrorKind;

    #[tokio::test]
    async fn no_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(dir.path().join("none.sock"), None);
        let e = client.status(None).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unreachable);
        assert!(e.to_string().contains("none.sock"), "{e}");
    }

    #[tokio::test]
    async fn a_daemon_that_never_answers_times_out_with_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mute.sock");
        // Accepts and holds connections, never answers: a frozen daemon loop.
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                open.push(stream);
            }
        });
        let client = Client::new(path.clone(), Some(200));
        let started = std::time::Instant::now();
        let e = client.status(None).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert_eq!(e.exit_code(), crate::exit::UNREACHABLE);
        assert!(e.to_string().contains("200 ms"), "{e}");
        assert!(e.to_string().contains("mute.sock"), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        let e = client.reload().await.unwrap_err();
        assert!(e.to_string().contains("`reload`"), "{e}");
        held.abort();
    }
}
