//! Warm-up: real requests sent straight to a healthy instance's port before it gets traffic, over
//! `concurrency` keep-alive connections (one `SendRequest` each, so every request reuses its
//! connection), until the convergence rules of `sluice_strategies::warmup` say it is done.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use serde::Deserialize;
use sluice_strategies::warmup::{Convergence, Limits, Summary, Verdict};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::WarmupConfig;

/// Most requests a warm-up file may hold.
const REQUESTS_MAX: usize = 10_000;

/// One warm-up request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmRequest {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    method: String,
    path: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: String,
}

/// Parses `"GET /path"` or `{"method": "POST", "path": "/x", "headers": {..}, "body": ".."}`.
pub fn parse_request(line: &str) -> Result<WarmRequest, String> {
    let line = line.trim();
    let (method, path, headers, body) = if line.starts_with('{') {
        let r: JsonRequest =
            serde_json::from_str(line).map_err(|e| format!("bad request `{line}`: {e}"))?;
        (r.method, r.path, r.headers.into_iter().collect(), r.body)
    } else {
        let mut parts = line.split_whitespace();
        let (Some(method), Some(path), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "bad request `{line}`: write `METHOD /path` or a JSON object"
            ));
        };
        (
            method.to_owned(),
            path.to_owned(),
            Vec::new(),
            String::new(),
        )
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("bad request `{line}`: unknown method `{method}`"))?;
    if !path.starts_with('/') {
        return Err(format!(
            "bad request `{line}`: the path must start with `/`"
        ));
    }
    path.parse::<hyper::Uri>()
        .map_err(|e| format!("bad request `{line}`: {e}"))?;
    Ok(WarmRequest {
        method,
        path,
        headers,
        body: Bytes::from(body),
    })
}

/// The requests of a warm-up: from the config, then from `file` in the release directory.
pub fn load_requests(
    config: &WarmupConfig,
    release_dir: Option<&Path>,
) -> Result<Vec<WarmRequest>, String> {
    let mut requests = config
        .requests
        .iter()
        .map(|l| parse_request(l))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(file) = &config.file {
        let dir = release_dir.ok_or_else(|| {
            format!("warm-up file `{file}` is relative to the release, and there is no release")
        })?;
        let path = dir.join(file);
        let text = read_release_file(dir, Path::new(file))
            .map_err(|e| format!("warm-up file: {}", crate::clip::clip(&e.to_string())))?;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let request =
                parse_request(line).map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
            requests.push(request);
            if requests.len() > REQUESTS_MAX {
                return Err(format!(
                    "warm-up file {} has more than {REQUESTS_MAX} requests",
                    path.display()
                ));
            }
        }
    }
    if requests.is_empty() {
        return Err("the warm-up has no requests".into());
    }
    Ok(requests)
}

/// Largest warm-up file read, in bytes; [`REQUESTS_MAX`] lines fit with room to spare.
const WARMUP_FILE_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Reads `relative` below the release, which its service user may own: no link, fifo or `..` on
/// the way is followed (see `sluice-safefs`).
fn read_release_file(release: &Path, relative: &Path) -> std::io::Result<String> {
    let (dir, name) = sluice_safefs::Dir::open(release)?.beneath(relative)?;
    let bytes = dir.read(&name, WARMUP_FILE_MAX_BYTES)?;
    String::from_utf8(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: not UTF-8", dir.child_path(&name).display()),
        )
    })
}

/// The convergence limits a warm-up config stands for.
pub fn limits(config: &WarmupConfig) -> Limits {
    let none_set =
        config.count.is_none() && config.duration_ms.is_none() && config.until_stable_pct.is_none();
    Limits {
        count: config.count,
        duration_ms: config.duration_ms,
        until_stable_pct: if none_set {
            Some(10.0)
        } else {
            config.until_stable_pct
        },
        window: config.window as usize,
        max_duration_ms: config.max_duration_ms,
        max_errors: config.max_errors,
    }
}

type Outcome = Result<u64, String>;

/// Warms the instance on `127.0.0.1:port`. `Err` when too many requests failed.
pub async fn run(
    port: u16,
    requests: Vec<WarmRequest>,
    config: &WarmupConfig,
) -> Result<Summary, (String, Summary)> {
    let started = Instant::now();
    let mut convergence = Convergence::new(limits(config));
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::channel::<Outcome>(1024);
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency {
        workers.spawn(worker(
            port,
            requests.clone(),
            next.clone(),
            tx.clone(),
            timeout,
        ));
    }
    drop(tx);
    let max = Duration::from_millis(config.max_duration_ms);
    let verdict = loop {
        let elapsed = started.elapsed();
        let verdict = convergence.verdict(elapsed.as_millis() as u64);
        if verdict != Verdict::Continue {
            break verdict;
        }
        // Wake at the latest when a time limit may have passed.
        let wake = config
            .duration_ms
            .map(Duration::from_millis)
            .unwrap_or(max)
            .min(max)
            .saturating_sub(elapsed)
            .max(Duration::from_millis(1));
        match tokio::time::timeout(wake, rx.recv()).await {
            Ok(Some(Ok(latency_us))) => convergence.record(latency_us),
            Ok(Some(Err(error))) => convergence.record_error(error),
            Ok(None) => break Verdict::Failed("every warm-up connection gave up".into()),
            Err(_) => {}
        }
    };
    workers.shutdown().await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match verdict {
        Verdict::Done(ending) => Ok(convergence.summary(Some(ending), duration_ms)),
        Verdict::Failed(why) => Err((why, convergence.summary(None, duration_ms))),
        Verdict::Continue => unreachable!("the loop ends only on a verdict"),
    }
}

/// One connection's worth of requests, reconnecting after a failure; ends when the receiver goes.
async fn worker(
    port: u16,
    requests: Arc<Vec<WarmRequest>>,
    next: Arc<AtomicUsize>,
    results: mpsc::Sender<Outcome>,
    timeout: Duration,
) {
    let mut sender = None;
    loop {
        if sender.is_none() {
            match tokio::time::timeout(timeout, connect(port)).await {
                Ok(Ok(s)) => sender = Some(s),
                Ok(Err(e)) => {
                    if results.send(Err(format!("connect: {e}"))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) => {
                    if results
                        .send(Err("connect: timed out".into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
            }
        }
        let request = &requests[next.fetch_add(1, Ordering::Relaxed) % requests.len()];
        let s = sender.as_mut().expect("connected above");
        let begun = Instant::now();
        let outcome = match tokio::time::timeout(timeout, send(s, port, request)).await {
            Ok(Ok(status)) if status >= 500 => Err(format!(
                "{} {}: status {status}",
                request.method, request.path
            )),
            Ok(Ok(_)) => Ok(begun.elapsed().as_micros() as u64),
            Ok(Err(e)) => Err(format!("{} {}: {e}", request.method, request.path)),
            Err(_) => Err(format!("{} {}: timed out", request.method, request.path)),
        };
        if outcome.is_err() {
            sender = None;
        }
        if results.send(outcome).await.is_err() {
            return;
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16) -> Result<Sender, String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn send(sender: &mut Sender, port: u16, request: &WarmRequest) -> Result<u16, String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let mut builder = hyper::Request::builder()
        .method(request.method.clone())
        .uri(request.path.as_str())
        .header("host", format!("127.0.0.1:{port}"))
        .header("user-agent", "sluice-warmup");
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let request = builder
        .body(Full::new(request.body.clone()))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    // Read the body to its end: the connection is reused only after that.
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r = parse_request("GET /items?id=7").unwrap();
        assert_eq!((r.method, r.path.as_str()), (Method::GET, "/items?id=7"));
        let r = parse_request(r#"{"method": "POST", "path": "/x", "headers": {"content-type": "application/json"}, "body": "{}"}"#).unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(
            r.headers,
            [("content-type".into(), "application/json".into())]
        );
        assert_eq!(r.body, Bytes::from("{}"));
        for bad in ["GET", "GET items", "GET /a b", "G@T /", r#"{"path": "/"}"#] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stable_by_default() {
        let config: WarmupConfig = toml::from_str("requests = [\"GET /\"]").unwrap();
        assert_eq!(limits(&config).until_stable_pct, Some(10.0));
        let config: WarmupConfig = toml::from_str("requests = [\"GET /\"]\ncount = 5").unwrap();
        assert_eq!(limits(&config).until_stable_pct, None);
    }
}
