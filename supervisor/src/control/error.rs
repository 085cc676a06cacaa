//! The control API's one error type. Its kind decides the HTTP status the server answers with and
//! the exit code `sluice` ends with, so neither is chosen by reading a message; the kind crosses the
//! wire beside the message (`{"error": "...", "kind": "no-such-service"}`).

use std::path::PathBuf;

use hyper::StatusCode;

use super::protocol::ErrorBody;
pub use super::protocol::ErrorKind;
use crate::exit;

/// Starts the message of a reload refused for a bad configuration.
pub const INVALID_CONFIG: &str = "invalid configuration, nothing changed";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no service named `{name}` (known: {})", known.join(", "))]
    NoSuchService { name: String, known: Vec<String> },
    #[error("{service} has no instance {index} (it has {count})")]
    NoSuchInstance {
        service: String,
        index: u32,
        count: u32,
    },
    #[error("no such route: {method} {path}")]
    NoSuchRoute { method: String, path: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{INVALID_CONFIG}: {0}")]
    InvalidConfig(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
    /// An error answer as the client read it off the wire.
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
    #[error("cannot reach the sluice daemon at {}: {source}", socket.display())]
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no answer from the sluice daemon at {} within {bound_ms} ms (the bound of `{what}`; `--timeout-ms` changes it)",
        socket.display()
    )]
    Timeout {
        socket: PathBuf,
        /// The request kind whose bound ran out (`status`, `restart`, ...).
        what: &'static str,
        bound_ms: u64,
    },
    #[error("control socket {}: {message}", socket.display())]
    BadAnswer { socket: PathBuf, message: String },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoSuchService { .. } => ErrorKind::NoSuchService,
            Error::NoSuchInstance { .. } => ErrorKind::NoSuchInstance,
            Error::NoSuchRoute { .. } => ErrorKind::NoSuchRoute,
            Error::BadRequest(_) => ErrorKind::BadRequest,
            Error::Forbidden(_) => ErrorKind::Forbidden,
            Error::InvalidConfig(_) => ErrorKind::InvalidConfig,
            Error::Conflict(_) => ErrorKind::Conflict,
            Error::Failed(_) => ErrorKind::Failed,
            Error::Refused { kind, .. } => *kind,
            Error::Unreachable { .. } => ErrorKind::Unreachable,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::BadAnswer { .. } => ErrorKind::BadAnswer,
        }
    }

    /// The HTTP status the server answers this error with.
    pub fn http_status(&self) -> StatusCode {
        self.kind().http_status()
    }

    /// The exit code of `sluice` when a verb ends with this error.
    pub fn exit_code(&self) -> i32 {
        self.kind().exit_code()
    }

    /// The error answer's body.
    pub fn to_body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            kind: Some(self.kind()),
        }
    }

    /// The error an answer with a non-success `status` and `body` carries. A body that is not an
    /// [`ErrorBody`] (a proxy, a daemon of another kind) is quoted bounded.
    pub fn from_answer(status: StatusCode, body: &[u8]) -> Error {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(answer) => Error::Refused {
                kind: answer
                    .kind
                    .unwrap_or_else(|| ErrorKind::from_http_status(status)),
                message: answer.error,
            },
            Err(_) => Error::Refused {
                kind: ErrorKind::from_http_status(status),
                message: format!(
                    "the daemon answered {status}: {}",
                    crate::clip::clip_bytes(body)
                ),
            },
        }
    }
}

impl ErrorKind {
    /// Every kind, for tables and tests.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::NoSuchService,
        ErrorKind::NoSuchInstance,
        ErrorKind::NoSuchRoute,
        ErrorKind::BadRequest,
        ErrorKind::Forbidden,
        ErrorKind::InvalidConfig,
        ErrorKind::Conflict,
        ErrorKind::Failed,
        ErrorKind::Unreachable,
        ErrorKind::Timeout,
        ErrorKind::BadAnswer,
    ];

    pub fn http_status(self) -> StatusCode {
        match self {
            ErrorKind::NoSuchService | ErrorKind::NoSuchInstance | ErrorKind::NoSuchRoute => {
                StatusCode::NOT_FOUND
            }
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::InvalidConfig => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            // Made by the client, never answered; the statuses a gateway would give.
            ErrorKind::Unreachable | ErrorKind::BadAnswer => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The exit code (documented in the README): 3 for a configuration refused, 4 when the daemon
    /// cannot be reached or does not answer in time, 1 for every other failure.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::InvalidConfig => exit::CONFIG,
            ErrorKind::Unreachable | ErrorKind::Timeout => exit::UNREACHABLE,
            ErrorKind::NoSuchService
            | ErrorKind::NoSuchInstance
            | ErrorKind::NoSuchRoute
            | ErrorKind::BadRequest
            | ErrorKind::Forbidden
            | ErrorKind::Conflict
            | ErrorKind::Failed
            | ErrorKind::BadAnswer => exit::FAILED,
        }
    }

    /// The kind of an error answer without a `kind` (a daemon older than the field), by the
    /// status such a daemon chose.
    pub fn from_http_status(status: StatusCode) -> ErrorKind {
        match status {
            StatusCode::NOT_FOUND => ErrorKind::NoSuchService,
            StatusCode::BAD_REQUEST => ErrorKind::BadRequest,
            StatusCode::FORBIDDEN => ErrorKind::Forbidden,
            StatusCode::UNPROCESSABLE_ENTITY => ErrorKind::InvalidConfig,
            StatusCode::CONFLICT => ErrorKind::Conflict,
            _ => ErrorKind::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_status_and_exit_code() {
        let table = [
            (ErrorKind::NoSuchService, 404, exit::FAILED),
            (ErrorKind::NoSuchInstance, 404, exit::FAILED),
            (ErrorKind::NoSuchRoute, 404, exit::FAILED),
            (ErrorKind::BadRequest, 400, exit::FAILED),
            (ErrorKind::Forbidden, 403, exit::FAILED),
            (ErrorKind::InvalidConfig, 422, exit::CONFIG),
            (ErrorKind::Conflict, 409, exit::FAILED),
            (ErrorKind::Failed, 500, exit::FAILED),
            (ErrorKind::Unreachable, 502, exit::UNREACHABLE),
            (ErrorKind::Timeout, 504, exit::UNREACHABLE),
            (ErrorKind::BadAnswer, 502, exit::FAILED),
        ];
        assert_eq!(table.len(), ErrorKind::ALL.len());
        for (kind, status, code) in table {
            assert_eq!(kind.http_status().as_u16(), status, "{kind:?}");
            assert_eq!(kind.exit_code(), code, "{kind:?}");
        }
    }

    #[test]
    fn an_error_crosses_the_wire_with_its_kind_and_message() {
        let sent = Error::NoSuchService {
            name: "api".into(),
            known: vec!["web".into(), "worker".into()],
        };
        let body = serde_json::to_vec(&sent.to_body()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["kind"], "no-such-service");
        assert_eq!(
            value["error"],
            "no service named `api` (known: web, worker)"
        );
        let read = Error::from_answer(sent.http_status(), &body);
        assert_eq!(read.kind(), ErrorKind::NoSuchService);
        assert_eq!(read.to_string(), sent.to_string());
        assert_eq!(read.exit_code(), exit::FAILED);
        // Every kind the server can send comes back as itself.
        for kind in ErrorKind::ALL {
            let body = serde_json::to_vec(&ErrorBody {
                error: "x".into(),
                kind: Some(kind),
            })
            .unwrap();
            assert_eq!(
                Error::from_answer(StatusCode::IM_A_TEAPOT, &body).kind(),
                kind
            );
        }
    }

    #[test]
    fn a_refused_reload_exits_3() {
        let e = Error::InvalidConfig("web.toml: key `x`: unknown".into());
        assert_eq!(e.http_status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.exit_code(), exit::CONFIG);
        assert!(e.to_string().starts_with(INVALID_CONFIG), "{e}");
    }

    #[test]
    fn answers_of_older_daemons_go_by_their_status() {
        let old = br#"{"error": "invalid configuration, nothing changed: web.toml"}"#;
        let e = Error::from_answer(StatusCode::UNPROCESSABLE_ENTITY, old);
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert_eq!(e.exit_code(), exit::CONFIG);
        assert_eq!(
            e.to_string(),
            "invalid configuration, nothing changed: web.toml"
        );
        let e = Error::from_answer(StatusCode::CONFLICT, br#"{"error": "busy"}"#);
        assert_eq!(e.kind(), ErrorKind::Conflict);
        // A kind this version does not know reads as absent.
        let newer = br#"{"error": "later", "kind": "quota-exceeded"}"#;
        assert_eq!(
            Error::from_answer(StatusCode::CONFLICT, newer).kind(),
            ErrorKind::Conflict
        );
        // Not JSON at all: the status decides, the text is quoted bounded.
        let e = Error::from_answer(StatusCode::BAD_GATEWAY, &[b'x'; 10_000]);
        assert_eq!(e.kind(), ErrorKind::Failed);
        assert!(e.to_string().len() < 1_000, "{}", e.to_string().len());
    }

    #[test]
    fn a_timeout_names_the_socket_and_the_bound() {
        let e = Error::Timeout {
            socket: "/run/sluice/sluice.sock".into(),
            what: "status",
            bound_ms: 15_000,
        };
        let text = e.to_string();
        assert!(text.contains("/run/sluice/sluice.sock"), "{text}");
        assert!(text.contains("15000 ms"), "{text}");
        assert!(text.contains("`status`"), "{text}");
        assert_eq!(e.exit_code(), exit::UNREACHABLE);
    }
}
