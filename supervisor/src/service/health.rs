//! Health probes of one instance: `http` (a GET on the instance port answering the expected
//! status), `tcp` (the port accepts a connection) or `exec` (a command exits 0), each bounded by
//! `timeout_ms`; and the readiness wait that repeats a probe until it passes or time runs out.
//!
//! An `exec` probe runs like its instance: as the service's user, with the instance's environment
//! (plus `PATH` `/usr/local/bin:/usr/bin:/bin` when that sets none) and in its working directory,
//! never with the daemon's environment or directory. It leads a process group of its own, and
//! the whole group is killed when the probe times out or exits, so nothing it started runs on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::net::TcpStream;

use crate::config::HealthConfig;

/// What to probe for one instance, with placeholders already filled in.
#[derive(Debug, Clone)]
pub struct Probe {
    pub config: HealthConfig,
    pub port: Option<u16>,
    /// The `exec` command after substitution.
    pub argv: Option<Vec<String>>,
    /// Who and where an `exec` probe runs, or why that cannot be worked out (an unresolvable
    /// user, for one): then the probe fails with that reason and runs nothing.
    pub exec_as: Result<ExecContext, String>,
}

/// The identity, environment and working directory of an `exec` probe: its instance's.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// `None`: as the daemon (only when the daemon is not root, or root is allowed).
    pub identity: Option<sluice_hooks::Identity>,
    pub env: BTreeMap<String, String>,
    pub directory: PathBuf,
}

/// Bytes of an `exec` probe's stderr kept for its error message.
const EXEC_STDERR_TAIL_BYTES: usize = 200;

impl Probe {
    /// One probe; `Err` says what failed.
    pub async fn once(&self) -> Result<(), String> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let probe = async {
            if let Some(path) = &self.config.http {
                http(
                    self.port.expect("validated: http needs a port"),
                    path,
                    self.config.expect_status,
                )
                .await
            } else if self.config.tcp == Some(true) {
                let port = self.port.expect("validated: tcp needs a port");
                TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map(drop)
                    .map_err(|e| format!("connect to port {port}: {e}"))
            } else if let Some(argv) = &self.argv {
                let context = self.exec_as.as_ref().map_err(Clone::clone)?;
                exec(argv, context).await
            } else {
                Ok(())
            }
        };
        tokio::time::timeout(timeout, probe)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", self.config.timeout_ms)))
    }

    /// Probes every `interval_ms` until one passes, or `start_timeout_ms` has passed.
    pub async fn until_ready(&self) -> Result<(), String> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.start_timeout_ms);
        loop {
            let last = match self.once().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "not healthy within {} ms: {last}",
                    self.config.start_timeout_ms
                ));
            }
            tokio::time::sleep(Duration::from_millis(self.config.interval_ms)).await;
        }
    }
}

async fn http(port: u16, path: &str, expect: u16) -> Result<(), String> {
    let what = format!("GET {path} on port {port}");
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{what}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get(path)
        .header("host", format!("127.0.0.1:{port}"))
        .header("user-agent", "sluice-health")
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{what}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    if status == expect {
        Ok(())
    } else {
        Err(format!("{what}: status {status}, expected {expect}"))
    }
}

/// Runs an `exec` probe to its end. When the caller's timeout drops this future, dropping the
/// child kills its whole process group.
async fn exec(argv: &[String], context: &ExecContext) -> Result<(), String> {
    use tokio::io::AsyncReadExt as _;
    let mut env = context.env.clone();
    env.entry("PATH".to_owned())
        .or_insert_with(|| sluice_hooks::DEFAULT_PATH.to_owned());
    let (reader, writer) = std::io::pipe().map_err(|e| format!("{}: stderr pipe: {e}", argv[0]))?;
    let mut stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into())
        .map_err(|e| format!("{}: stderr pipe: {e}", argv[0]))?;
    let mut command = std::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&context.directory)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(writer);
    sluice_hooks::process::confine(&mut command, context.identity.as_ref());
    let spawned = sluice_hooks::process::GroupChild::spawn(&mut command);
    // The write end must be closed here, or the pipe never reaches end of file.
    drop(command);
    let mut child = spawned.map_err(|e| format!("{}: {e}", argv[0]))?;
    let read_tail = async {
        let mut tail = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    let excess = tail.len().saturating_sub(EXEC_STDERR_TAIL_BYTES);
                    tail.drain(..excess);
                }
            }
        }
        tail
    };
    let (status, tail) = tokio::join!(child.wait(), read_tail);
    let status = status.map_err(|e| format!("{}: {e}", argv[0]))?;
    if status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&tail);
    Err(format!(
        "{} exited with {status}: {}",
        crate::clip::clip(&argv.join(" ")),
        stderr.trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(toml: &str, port: Option<u16>) -> Probe {
        let config: HealthConfig = toml::from_str(toml).unwrap();
        let argv = config.exec.clone();
        Probe {
            config,
            port,
            argv,
            exec_as: Ok(ExecContext {
                identity: None,
                env: BTreeMap::new(),
                directory: "/".into(),
            }),
        }
    }

    #[tokio::test]
    async fn tcp_and_exec() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(probe("tcp = true", Some(port)).once().await.is_ok());
        drop(listener);
        let err = probe("tcp = true", Some(port)).once().await.unwrap_err();
        assert!(err.contains(&format!("port {port}")), "{err}");
        assert!(probe("exec = [\"true\"]", None).once().await.is_ok());
        let err = probe("exec = [\"sh\", \"-c\", \"echo nope >&2; exit 3\"]", None)
            .once()
            .await
            .unwrap_err();
        assert!(err.contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn http_status_and_readiness_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for (n, stream) in listener.incoming().enumerate() {
                let mut stream = stream.unwrap();
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let status = if n == 0 {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        let p = probe("http = \"/health\"\ninterval_ms = 10", Some(port));
        let err = p.once().await.unwrap_err();
        assert!(err.contains("status 503, expected 200"), "{err}");
        assert!(p.until_ready().await.is_ok());
        let p = probe(
            "exec = [\"false\"]\ninterval_ms = 10\nstart_timeout_ms = 50",
            None,
        );
        let err = p.until_ready().await.unwrap_err();
        assert!(err.starts_with("not healthy within 50 ms"), "{err}");
    }
}
