//! Health probes of one instance: `http` (a GET on the instance port answering the expected
//! status), `tcp` (the port accepts a connection) or `exec` (a command exits 0), each bounded by
//! `timeout_ms`; and the readiness wait that repeats a probe until it passes or time runs out.

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
}

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
                exec(argv).await
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

async fn exec(argv: &[String]) -> Result<(), String> {
    let output = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: String = stderr
        .trim()
        .chars()
        .rev()
        .take(200)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!(
        "{} exited with {}: {tail}",
        argv.join(" "),
        output.status
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(toml: &str, port: Option<u16>) -> Probe {
        let config: HealthConfig = toml::from_str(toml).unwrap();
        let argv = config.exec.clone();
        Probe { config, port, argv }
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
