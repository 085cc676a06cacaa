//! Warm-up: real requests sent straight to a healthy instance's port before it gets traffic, over
//! `concurrency` connections kept alive as long as the server keeps them (HTTP/1.1 as servers
//! speak it: `Connection: close`, HTTP/1.0, idle connections closed by the server), until the
//! convergence rules of `sluice_strategies::warmup` say it is done — by default, once it answers
//! as fast as a serving sibling measured with a small sample of the same requests.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sluice_strategies::warmup::{
    Convergence, DEFAULT_STABLE_PCT, Ending, Limits, Percentile, SiblingRule, Summary, Verdict,
    Window,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::{WarmupConfig, WarmupUntil};
// Request lines are configuration: parsed in `config`, which never depends on this runner.
pub use crate::config::{WarmRequest, parse_request};

/// Most requests a warm-up file may hold.
const REQUESTS_MAX: usize = 10_000;

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

/// The convergence limits a warm-up config stands for. The sibling criterion is on when asked
/// for (`until = "sibling"`) or when nothing else is set; without a serving sibling the runner
/// replaces it with [`Limits::without_sibling`].
pub fn limits(config: &WarmupConfig) -> Limits {
    let explicit =
        config.count.is_some() || config.duration_ms.is_some() || config.until_stable_pct.is_some();
    let sibling = match config.until {
        Some(WarmupUntil::Sibling) => true,
        Some(WarmupUntil::Stable) => false,
        None => !explicit,
    };
    let until_stable_pct = match config.until {
        Some(WarmupUntil::Stable) => Some(config.until_stable_pct.unwrap_or(DEFAULT_STABLE_PCT)),
        _ => config.until_stable_pct,
    };
    Limits {
        count: config.count,
        duration_ms: config.duration_ms,
        until_stable_pct,
        until_sibling: sibling.then(|| SiblingRule {
            ratio: config.sibling_ratio,
            percentile: Percentile::from_number(config.sibling_percentile)
                .expect("validated with the config"),
        }),
        window: config.window as usize,
        max_duration_ms: config.max_duration_ms,
        max_errors: config.max_errors,
    }
}

/// A serving sibling of the instance being warmed: its index and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sibling {
    pub index: u32,
    pub port: u16,
}

/// What a warm-up with the sibling criterion compares with.
#[derive(Debug, Clone, PartialEq)]
pub enum SiblingBar {
    /// This serving sibling, measured first with `sibling_sample` of the warm-up's requests.
    Measure(Sibling),
    /// A sample taken `age_ms` ago for an earlier batch of the same restart, which that batch's
    /// instance met (see `sluice_strategies::warmup::SiblingSample`).
    Reuse {
        index: u32,
        window: Window,
        age_ms: u64,
    },
    /// Why there is none; the median rule takes the sibling's place.
    Missing(String),
}

/// What one request came to.
#[derive(Debug)]
enum Outcome {
    /// Answered below 500, in this many microseconds.
    Answered(u64),
    /// A status 5xx, or a transport failure on a fresh connection.
    Failed(String),
    /// It failed on a reused connection and is being sent again on a new one.
    Retried,
}

/// Warms the instance on `127.0.0.1:port`. With the sibling criterion it compares with `bar`:
/// a sibling to measure first (`max_duration_ms` bounds the sample and the warm-up together), a
/// sample reused, or why there is none. `Err` when too many requests failed.
pub async fn run(
    port: u16,
    requests: Vec<WarmRequest>,
    config: &WarmupConfig,
    bar: SiblingBar,
) -> Result<Summary, (String, Summary)> {
    let started = Instant::now();
    let requests = Arc::new(requests);
    let mut limits = limits(config);
    let mut reference = Err(String::new());
    if limits.until_sibling.is_some() {
        reference = match bar {
            SiblingBar::Measure(sibling) => sample(sibling.port, &requests, config, started)
                .await
                .map(|window| (sibling.index, window, 0))
                .map_err(|why| format!("the sample of sibling {} failed: {why}", sibling.index)),
            SiblingBar::Reuse {
                index,
                window,
                age_ms,
            } => Ok((index, window, age_ms)),
            SiblingBar::Missing(why) => Err(why),
        };
        if reference.is_err() {
            limits = limits.without_sibling();
        }
    }
    let mut convergence = Convergence::new(limits);
    match reference {
        Ok((index, window, age_ms)) => convergence.set_reference(index, window, age_ms),
        Err(why) if !why.is_empty() => convergence.set_fallback(why),
        Err(_) => {}
    }
    let (verdict, convergence) = drive(port, &requests, config, convergence, started).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match verdict {
        Verdict::Done(ending) => Ok(convergence.summary(Some(ending), duration_ms)),
        Verdict::Failed(why) => Err((why, convergence.summary(None, duration_ms))),
        Verdict::Continue => unreachable!("the loop ends only on a verdict"),
    }
}

/// The latency of a serving sibling: `sibling_sample` warm-up requests, as one window.
async fn sample(
    port: u16,
    requests: &Arc<Vec<WarmRequest>>,
    config: &WarmupConfig,
    started: Instant,
) -> Result<Window, String> {
    let n = u64::from(config.sibling_sample);
    let limits = Limits {
        count: Some(n),
        duration_ms: None,
        until_stable_pct: None,
        until_sibling: None,
        window: config.sibling_sample as usize,
        max_duration_ms: config.max_duration_ms,
        max_errors: 0,
    };
    let (verdict, convergence) =
        drive(port, requests, config, Convergence::new(limits), started).await;
    let summary = convergence.summary(None, 0);
    match (verdict, summary.first_window) {
        (Verdict::Done(Ending::Count), Some(window)) => Ok(window),
        (Verdict::Failed(why), _) => Err(why),
        _ => Err(format!(
            "{} of {n} requests answered within max_duration_ms ({} ms)",
            summary.requests, config.max_duration_ms
        )),
    }
}

/// Sends `requests` round-robin over `concurrency` connections to `port` until `convergence`
/// gives its verdict; `started` is when the warm-up began, which its time limits count from.
async fn drive(
    port: u16,
    requests: &Arc<Vec<WarmRequest>>,
    config: &WarmupConfig,
    mut convergence: Convergence,
    started: Instant,
) -> (Verdict, Convergence) {
    let next = Arc::new(AtomicUsize::new(0));
    // With a count, no more requests are sent than it asks for: a sibling that serves clients
    // gets exactly its sample.
    let budget = convergence
        .limits()
        .count
        .map_or(usize::MAX, |c| usize::try_from(c).unwrap_or(usize::MAX));
    let (tx, mut rx) = mpsc::channel::<Outcome>(1024);
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency {
        workers.spawn(worker(
            port,
            requests.clone(),
            (next.clone(), budget),
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
            Ok(Some(Outcome::Answered(latency_us))) => convergence.record(latency_us),
            Ok(Some(Outcome::Failed(error))) => convergence.record_error(error),
            Ok(Some(Outcome::Retried)) => convergence.record_retry(),
            Ok(None) => break Verdict::Failed("every warm-up connection gave up".into()),
            Err(_) => {}
        }
    };
    workers.shutdown().await;
    (verdict, convergence)
}

/// Pause after a failed connect, so that a refused port is not hammered.
const CONNECT_RETRY_MS: u64 = 50;

/// A connection to the instance, and whether a request went over it already.
struct Connection {
    sender: Sender,
    reused: bool,
}

/// One connection's worth of requests, taking the next request from `next` until `budget` have
/// been taken; ends then, or when the receiver goes. The connection is kept only
/// while the server keeps it: after `Connection: close`, an HTTP/1.0 answer without keep-alive, or
/// a close seen while idle, the next request goes on a new one. A request that fails on a reused
/// connection (the server closed it as the request went out) is sent again, once, on a new one;
/// only a failure on a fresh connection is an error.
async fn worker(
    port: u16,
    requests: Arc<Vec<WarmRequest>>,
    (next, budget): (Arc<AtomicUsize>, usize),
    results: mpsc::Sender<Outcome>,
    timeout: Duration,
) {
    let mut connection: Option<Connection> = None;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= budget {
            return;
        }
        let request = &requests[n % requests.len()];
        let mut retried = false;
        let mut refused = false;
        let outcome = loop {
            if connection.as_ref().is_some_and(|c| c.sender.is_closed()) {
                connection = None;
            }
            let c = match connection.as_mut() {
                Some(c) => c,
                None => match tokio::time::timeout(timeout, connect(port)).await {
                    Ok(Ok(sender)) => connection.insert(Connection {
                        sender,
                        reused: false,
                    }),
                    Ok(Err(e)) => {
                        refused = true;
                        break Outcome::Failed(format!("connect: {e}"));
                    }
                    Err(_) => break Outcome::Failed("connect: timed out".into()),
                },
            };
            let reused = c.reused;
            let begun = Instant::now();
            let why = match tokio::time::timeout(timeout, send(&mut c.sender, port, request)).await
            {
                Ok(Ok(answer)) => {
                    let latency_us = begun.elapsed().as_micros() as u64;
                    if answer.keep_alive {
                        c.reused = true;
                    } else {
                        connection = None;
                    }
                    break if answer.status >= 500 {
                        Outcome::Failed(format!(
                            "{} {}: status {}",
                            request.method, request.path, answer.status
                        ))
                    } else {
                        Outcome::Answered(latency_us)
                    };
                }
                Ok(Err(e)) => e,
                Err(_) => "timed out".to_owned(),
            };
            connection = None;
            if reused && !retried {
                retried = true;
                if results.send(Outcome::Retried).await.is_err() {
                    return;
                }
                continue;
            }
            break Outcome::Failed(format!("{} {}: {why}", request.method, request.path));
        };
        if results.send(outcome).await.is_err() {
            return;
        }
        if refused {
            tokio::time::sleep(Duration::from_millis(CONNECT_RETRY_MS)).await;
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

/// A response, read to its end.
struct Answer {
    status: u16,
    /// The server keeps the connection for another request.
    keep_alive: bool,
}

/// Whether a response leaves its connection open: HTTP/1.1 unless `Connection: close`, HTTP/1.0
/// only with `Connection: keep-alive` (RFC 9112, section 9.3).
fn keeps_alive(version: hyper::Version, headers: &hyper::HeaderMap) -> bool {
    let mut close = false;
    let mut keep_alive = false;
    for value in headers.get_all(hyper::header::CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',') {
            let token = token.trim();
            close |= token.eq_ignore_ascii_case("close");
            keep_alive |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    if close {
        return false;
    }
    match version {
        hyper::Version::HTTP_09 => false,
        hyper::Version::HTTP_10 => keep_alive,
        _ => true,
    }
}

async fn send(sender: &mut Sender, port: u16, request: &WarmRequest) -> Result<Answer, String> {
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
    let answer = Answer {
        status: response.status().as_u16(),
        keep_alive: keeps_alive(response.version(), response.headers()),
    };
    // Read the body to its end: the connection is reused only after that.
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

/// One request on a new connection, for a canary's probes: its status and latency, within
/// `timeout_ms` (a timeout is an error like a transport failure).
pub async fn probe_once(
    port: u16,
    request: &WarmRequest,
    timeout_ms: u64,
) -> Result<(u16, Duration), String> {
    let started = Instant::now();
    let exchange = async {
        let mut sender = connect(port).await?;
        send(&mut sender, port, request).await
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), exchange).await {
        Err(_) => Err(format!("no answer within {timeout_ms} ms")),
        Ok(Err(e)) => Err(e),
        Ok(Ok(answer)) => Ok((answer.status, started.elapsed())),
    }
}

/// `GET path` on a new connection, the body read up to `max_bytes` (more is an error), within
/// `timeout_ms`: a canary's scrape of an instance's `/metrics`.
pub async fn get_bounded(
    port: u16,
    path: &str,
    max_bytes: usize,
    timeout_ms: u64,
) -> Result<(u16, Bytes), String> {
    let exchange = async {
        let mut sender = connect(port).await?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let request = hyper::Request::builder()
            .method(hyper::Method::GET)
            .uri(path)
            .header("host", format!("127.0.0.1:{port}"))
            .header("user-agent", "sluice-canary")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("body over {max_bytes} bytes")
                } else {
                    e.to_string()
                }
            })?;
        Ok((status, body.to_bytes()))
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), exchange).await {
        Err(_) => Err(format!("no answer within {timeout_ms} ms")),
        Ok(result) => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_by_default() {
        let config: WarmupConfig = toml::from_str("requests = [\"GET /\"]").unwrap();
        let l = limits(&config);
        assert_eq!(
            l.until_sibling,
            Some(SiblingRule {
                ratio: 1.2,
                percentile: Percentile::P90
            })
        );
        assert_eq!(l.until_stable_pct, None);
        assert_eq!(l.without_sibling().until_stable_pct, Some(10.0));
        let config: WarmupConfig = toml::from_str("requests = [\"GET /\"]\ncount = 5").unwrap();
        assert_eq!(limits(&config).until_stable_pct, None);
        assert_eq!(limits(&config).until_sibling, None);
        let config: WarmupConfig =
            toml::from_str("requests = [\"GET /\"]\nuntil = \"stable\"").unwrap();
        assert_eq!(limits(&config).until_stable_pct, Some(10.0));
        assert_eq!(limits(&config).until_sibling, None);
        let config: WarmupConfig = toml::from_str(
            "requests = [\"GET /\"]\ncount = 500\nuntil = \"sibling\"\nsibling_percentile = 99",
        )
        .unwrap();
        assert_eq!(
            limits(&config).until_sibling.map(|r| r.percentile),
            Some(Percentile::P99)
        );
    }

    /// How a test server answers.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Server {
        /// HTTP/1.1 with `Connection: close`, then closes (gunicorn's sync worker).
        CloseAfterEach,
        /// HTTP/1.0 without keep-alive and without `Content-Length`: the body ends at the close.
        Http10,
        /// HTTP/1.1 keep-alive, but reads the second request of each connection and closes it
        /// without an answer: an idle timeout that strikes as a request goes out.
        ClosesIdle,
        /// Keep-alive, status 500 for every request.
        Fails,
        /// Keep-alive, every request answered.
        KeepAlive,
        /// Accepts and closes every connection without an answer.
        Hangs,
    }

    /// What a test server saw.
    #[derive(Debug, Default)]
    struct Seen {
        connections: AtomicUsize,
        requests: AtomicUsize,
    }

    /// A real server on a free loopback port, answering as `kind` until the test ends.
    async fn server(kind: Server) -> (u16, Arc<Seen>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let counts = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counts.connections.fetch_add(1, Ordering::Relaxed);
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut served = 0;
                    loop {
                        // One request: the tests send no bodies, so it ends at the blank line.
                        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buffer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buffer.drain(..end);
                        counts.requests.fetch_add(1, Ordering::Relaxed);
                        served += 1;
                        let response: &[u8] = match kind {
                            Server::CloseAfterEach => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                            Server::Http10 => b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nok\n",
                            Server::ClosesIdle if served == 2 => return,
                            Server::ClosesIdle | Server::KeepAlive => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n",
                            Server::Fails => b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nbad\n",
                            Server::Hangs => return,
                        };
                        if stream.write_all(response).await.is_err() {
                            return;
                        }
                        if matches!(kind, Server::CloseAfterEach | Server::Http10) {
                            return;
                        }
                    }
                });
            }
        });
        (port, seen)
    }

    fn count_config(count: u64, concurrency: u32) -> WarmupConfig {
        toml::from_str(&format!(
            "requests = [\"GET /a\", \"GET /b\"]\ncount = {count}\nconcurrency = {concurrency}\n\
             window = 10\nmax_duration_ms = 20000\ntimeout_ms = 5000"
        ))
        .unwrap()
    }

    async fn warm(
        kind: Server,
        config: &WarmupConfig,
    ) -> (Result<Summary, (String, Summary)>, Arc<Seen>) {
        let (port, seen) = server(kind).await;
        let requests = load_requests(config, None).unwrap();
        let result = run(
            port,
            requests,
            config,
            SiblingBar::Missing("no sibling in this test".into()),
        )
        .await;
        (result, seen)
    }

    #[tokio::test]
    async fn servers_that_close_get_a_new_connection_per_request() {
        for kind in [Server::CloseAfterEach, Server::Http10] {
            let (result, seen) = warm(kind, &count_config(30, 2)).await;
            let summary = result.unwrap_or_else(|(why, _)| panic!("{kind:?}: {why}"));
            assert_eq!(
                (summary.errors, summary.retries),
                (0, 0),
                "{kind:?}: {summary:?}"
            );
            assert!(summary.requests >= 30, "{kind:?}: {summary:?}");
            assert_eq!(summary.ending, Some(Ending::Count), "{kind:?}");
            // Nothing was sent on a connection the server had closed: one connection each.
            assert_eq!(
                seen.connections.load(Ordering::Relaxed),
                seen.requests.load(Ordering::Relaxed),
                "{kind:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_request_cut_on_a_reused_connection_is_retried_on_a_new_one() {
        let (result, seen) = warm(Server::ClosesIdle, &count_config(20, 1)).await;
        let summary = result.unwrap_or_else(|(why, _)| panic!("{why}"));
        assert_eq!(summary.errors, 0, "{summary:?}");
        // Every second request on a connection is cut: the first of each pair is answered,
        // the second retried once on a new connection.
        assert!(summary.retries >= 9, "{summary:?}");
        assert!(seen.connections.load(Ordering::Relaxed) >= 10);
    }

    #[tokio::test]
    async fn keep_alive_reuses_its_connections() {
        let (result, seen) = warm(Server::KeepAlive, &count_config(40, 2)).await;
        let summary = result.unwrap_or_else(|(why, _)| panic!("{why}"));
        assert_eq!((summary.errors, summary.retries), (0, 0));
        assert_eq!(
            seen.connections.load(Ordering::Relaxed),
            2,
            "one per worker"
        );
    }

    #[tokio::test]
    async fn status_500_and_failures_on_fresh_connections_are_errors() {
        let (result, _) = warm(Server::Fails, &count_config(10, 1)).await;
        let (why, summary) = result.expect_err("status 500 fails the warm-up");
        assert_eq!(
            why,
            "1 of 1 warm-up requests failed (at most 0 allowed); last: GET /a: status 500"
        );
        assert_eq!(summary.retries, 0);
        let (result, _) = warm(Server::Hangs, &count_config(10, 1)).await;
        let (why, summary) = result.expect_err("no answer on a fresh connection fails it");
        assert!(why.starts_with("1 of 1 warm-up requests failed"), "{why}");
        assert!(why.contains("GET /a: "), "{why}");
        assert_eq!(summary.retries, 0, "a fresh connection is not retried");
    }

    #[tokio::test]
    async fn a_sibling_sets_the_bar() {
        let (sibling, sibling_seen) = server(Server::KeepAlive).await;
        let (port, _) = server(Server::CloseAfterEach).await;
        let config: WarmupConfig = toml::from_str(
            "requests = [\"GET /a\"]\nwindow = 10\nsibling_sample = 15\nsibling_ratio = 1000\n\
             concurrency = 1\nmax_duration_ms = 20000",
        )
        .unwrap();
        let requests = load_requests(&config, None).unwrap();
        let summary = run(
            port,
            requests.clone(),
            &config,
            SiblingBar::Measure(Sibling {
                index: 3,
                port: sibling,
            }),
        )
        .await
        .unwrap_or_else(|(why, _)| panic!("{why}"));
        // Both are equally fast tiny servers: a ratio of 1000 holds after the first window.
        assert_eq!(summary.ending, Some(Ending::Sibling), "{summary:?}");
        assert_eq!(summary.requests, 10, "{summary:?}");
        let reference = summary.sibling.expect("the sibling is shown");
        assert_eq!(
            (reference.index, reference.window.requests, reference.age_ms),
            (3, 15, 0)
        );
        assert_eq!(
            sibling_seen.requests.load(Ordering::Relaxed),
            15,
            "a bounded sample"
        );
        assert_eq!(summary.sibling_fallback, None);

        // A sample reused from an earlier batch: the sibling gets no request, status shows its age.
        let summary = run(
            port,
            requests.clone(),
            &config,
            SiblingBar::Reuse {
                index: 3,
                window: reference.window,
                age_ms: 4_000,
            },
        )
        .await
        .unwrap_or_else(|(why, _)| panic!("{why}"));
        assert_eq!(summary.ending, Some(Ending::Sibling), "{summary:?}");
        let reused = summary.sibling.expect("the reused sample is shown");
        assert_eq!(
            (reused.index, reused.window, reused.age_ms),
            (3, reference.window, 4_000)
        );
        assert_eq!(
            sibling_seen.requests.load(Ordering::Relaxed),
            15,
            "nothing more sent to the sibling"
        );

        // Without a serving sibling: the median rule, and status says why.
        let summary = run(
            port,
            requests.clone(),
            &config,
            SiblingBar::Missing("no serving sibling: x".into()),
        )
        .await
        .unwrap_or_else(|(why, _)| panic!("{why}"));
        assert_eq!(summary.sibling, None);
        assert_eq!(
            summary.sibling_fallback.as_deref(),
            Some("no serving sibling: x")
        );
        assert!(
            matches!(summary.ending, Some(Ending::Stable | Ending::MaxDuration)),
            "{summary:?}"
        );

        // A sibling whose sample fails: the same fallback, naming the sibling.
        let (broken, _) = server(Server::Fails).await;
        let summary = run(
            port,
            requests,
            &config,
            SiblingBar::Measure(Sibling {
                index: 1,
                port: broken,
            }),
        )
        .await
        .unwrap_or_else(|(why, _)| panic!("{why}"));
        let why = summary.sibling_fallback.expect("a fallback");
        assert!(why.starts_with("the sample of sibling 1 failed: "), "{why}");
        assert!(why.contains("status 500"), "{why}");
    }

    #[test]
    fn keep_alive_by_version_and_header() {
        use hyper::Version;
        let headers = |v: &str| {
            let mut h = hyper::HeaderMap::new();
            if !v.is_empty() {
                h.insert(hyper::header::CONNECTION, v.parse().unwrap());
            }
            h
        };
        let cases = [
            (Version::HTTP_11, "", true),
            (Version::HTTP_11, "close", false),
            (Version::HTTP_11, "Keep-Alive, Close", false),
            (Version::HTTP_10, "", false),
            (Version::HTTP_10, "keep-alive", true),
            (Version::HTTP_10, "close", false),
        ];
        for (version, header, want) in cases {
            assert_eq!(
                keeps_alive(version, &headers(header)),
                want,
                "{version:?} {header}"
            );
        }
    }
}
