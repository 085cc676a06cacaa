//! The CLI's side of the control API: one HTTP/1.1 request per connection over the control socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not there (no socket, nobody listening, or no permission).
    #[error("cannot reach the sluice daemon at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {message}")]
    Http { path: PathBuf, message: String },
    /// The daemon answered with an error.
    #[error("{message}")]
    Refused { status: StatusCode, message: String },
}

/// A response whose body is still arriving (for `logs --follow`).
pub type Streaming = hyper::Response<hyper::body::Incoming>;

/// Sends one request and returns the response with its body unread.
pub async fn send(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    body: Option<serde_json::Value>,
) -> Result<Streaming, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Unreachable {
            path: socket.to_owned(),
            source,
        })?;
    let http = |e: hyper::Error| ClientError::Http {
        path: socket.to_owned(),
        message: e.to_string(),
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(http)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let request = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("host", "sluice")
        .header("content-type", "application/json")
        .body(Full::new(bytes))
        .map_err(|e| ClientError::Http {
            path: socket.to_owned(),
            message: e.to_string(),
        })?;
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
    let message = serde_json::from_slice::<crate::api::ErrorBody>(&body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
    Err(ClientError::Refused { status, message })
}

/// Sends one request and parses the whole JSON answer.
pub async fn call(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let response = send(socket, method, path_and_query, body).await?;
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http {
            path: socket.to_owned(),
            message: e.to_string(),
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Http {
        path: socket.to_owned(),
        message: format!("answer is not JSON: {e}"),
    })
}
