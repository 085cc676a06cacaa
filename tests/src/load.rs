//! A bounded HTTP load on one port inside a test's namespace: half of the requests on new
//! connections, half on keep-alive connections, at a fixed rate, counting every failure.
//!
//! A keep-alive client that finds its idle connection closed by the server before any byte of the
//! answer arrived reconnects and sends the request again, once: every mature HTTP client does this
//! (the request was never processed), and it is counted apart as a stale retry, not hidden.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// Limit of one request (connect, send, full answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A keep-alive connection is closed by the client after this long, as real clients' pools do.
const KEEPALIVE_LIFETIME: Duration = Duration::from_millis(1000);

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub ok: u64,
    pub failed: u64,
    pub stale_retries: u64,
    /// The first failures, with what went wrong.
    pub failures: Vec<String>,
    pub latencies_us: Vec<u64>,
}

impl Report {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }

    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// The latency below which `q` of the requests finished.
    pub fn percentile_us(&self, q: f64) -> u64 {
        let mut l = self.latencies_us.clone();
        if l.is_empty() {
            return 0;
        }
        l.sort_unstable();
        l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1]
    }
}

/// Load running in background threads until [`Load::finish`] (or its time limit).
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    report: Arc<Mutex<Report>>,
}

impl Load {
    /// `rate` requests per second in all, half on new connections, half on keep-alive ones, to
    /// `127.0.0.1:port` inside `netns`, for at most `limit`.
    pub fn start(netns: &Netns, port: u16, rate: u32, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let deadline = Instant::now() + limit;
        let per_thread = f64::from(rate.max(4)) / 4.0;
        let interval = Duration::from_secs_f64(1.0 / per_thread);
        let mut threads = Vec::new();
        for n in 0..4 {
            let keepalive = n % 2 == 1;
            let ns_name = netns.name.clone();
            let (stop, report) = (stop.clone(), report.clone());
            threads.push(std::thread::spawn(move || {
                let ns = Netns { name: ns_name };
                ns.enter_current_thread();
                // This handle must not delete the namespace: forget it.
                std::mem::forget(ns);
                let mut client = Client::default();
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let begun = Instant::now();
                    let result = if keepalive {
                        client.keepalive_request(port)
                    } else {
                        one_shot_request(port)
                    };
                    let mut r = report.lock().unwrap();
                    match result {
                        Ok(stale) => {
                            r.ok += 1;
                            r.stale_retries += u64::from(stale);
                            r.latencies_us.push(begun.elapsed().as_micros() as u64);
                        }
                        Err(what) => r.fail(what),
                    }
                    drop(r);
                    next += interval;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            }));
        }
        Load {
            stop,
            threads,
            report,
        }
    }

    /// Requests so far.
    pub fn snapshot(&self) -> Report {
        self.report.lock().unwrap().clone()
    }

    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread");
        }
        self.report.lock().unwrap().clone()
    }
}

fn connect(port: u16) -> Result<TcpStream, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stream =
        TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).ok();
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).ok();
    stream.set_nodelay(true).ok();
    Ok(stream)
}

/// One answer: its status, its body, and whether the server will close the connection after it
/// (`Connection: close`, or HTTP/1.0 without `Connection: keep-alive`).
struct Response {
    status: u16,
    body: Vec<u8>,
    closes: bool,
}

/// Reads one HTTP/1.1 response with a Content-Length, or how it went wrong and whether any byte
/// had arrived.
fn read_response(stream: &mut TcpStream) -> Result<Response, (String, bool)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| (format!("bad status line: {head:?}"), true))?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .ok_or_else(|| (format!("no content-length: {head:?}"), true))?;
            let connection = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("connection")
                    .then(|| v.trim().to_ascii_lowercase())
            });
            let closes = match connection.as_deref() {
                Some("close") => true,
                Some("keep-alive") => false,
                _ => head.starts_with("HTTP/1.0"),
            };
            while buf.len() < end + 4 + length {
                let n = stream
                    .read(&mut chunk)
                    .map_err(|e| (format!("reading body: {e}"), true))?;
                if n == 0 {
                    return Err(("connection closed in the body".into(), true));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(Response {
                status,
                body: buf[end + 4..end + 4 + length].to_vec(),
                closes,
            });
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(("connection closed before an answer".into(), !buf.is_empty())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err((format!("reading: {e}"), !buf.is_empty())),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One request on a new connection; `Ok(false)` (never a stale retry) on a 200.
pub fn one_shot_request(port: u16) -> Result<bool, String> {
    one_shot_request_body(port).map(|_| false)
}

/// One request on a new connection; the body of its 200 answer.
pub fn one_shot_request_body(port: u16) -> Result<Vec<u8>, String> {
    let mut stream = connect(port)?;
    stream
        .write_all(b"GET /item HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("new connection: send: {e}"))?;
    match read_response(&mut stream) {
        Ok(Response {
            status: 200, body, ..
        }) => Ok(body),
        Ok(r) => Err(format!("new connection: status {}", r.status)),
        Err((what, _)) => Err(format!("new connection: {what}")),
    }
}

/// A keep-alive client that reconnects after [`KEEPALIVE_LIFETIME`] (or never, as a pool that
/// keeps its connections: [`Client::never_closing`]) and retries once on a stale connection (see
/// the module doc).
pub struct Client {
    stream: Option<(TcpStream, Instant)>,
    /// `None`: the client never closes its connection; only the server does.
    lifetime: Option<Duration>,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            stream: None,
            lifetime: Some(KEEPALIVE_LIFETIME),
        }
    }
}

impl Client {
    /// A client that keeps its connection for as long as the server does, as the connection
    /// pools of HTTP client libraries and nginx's upstream keep-alive do.
    pub fn never_closing() -> Client {
        Client {
            stream: None,
            lifetime: None,
        }
    }

    /// One request on the kept connection; `Ok(true)` when it had to be retried on a new one.
    pub fn keepalive_request(&mut self, port: u16) -> Result<bool, String> {
        self.keepalive_request_body(port).map(|(stale, _)| stale)
    }

    /// The same, with the body of the 200 answer.
    pub fn keepalive_request_body(&mut self, port: u16) -> Result<(bool, Vec<u8>), String> {
        if let (Some((_, since)), Some(lifetime)) = (&self.stream, self.lifetime)
            && since.elapsed() > lifetime
        {
            self.stream = None;
        }
        let reused = self.stream.is_some();
        match self.try_once(port) {
            Ok(body) => Ok((false, body)),
            Err((what, any_byte)) => {
                self.stream = None;
                if reused && !any_byte {
                    // The server closed the idle connection: the request was never seen.
                    self.try_once(port)
                        .map(|body| (true, body))
                        .map_err(|(w, _)| format!("keep-alive retry: {w}"))
                } else {
                    Err(format!("keep-alive: {what}"))
                }
            }
        }
    }

    fn try_once(&mut self, port: u16) -> Result<Vec<u8>, (String, bool)> {
        if self.stream.is_none() {
            let stream = connect(port).map_err(|e| (e, false))?;
            self.stream = Some((stream, Instant::now()));
        }
        let (stream, _) = self.stream.as_mut().expect("connected above");
        stream
            .write_all(b"GET /item HTTP/1.1\r\nHost: test\r\n\r\n")
            .map_err(|e| (format!("send: {e}"), false))?;
        let response = read_response(stream)?;
        if response.closes {
            // The server closes this connection after the answer: the next request needs a new
            // one, as every HTTP client knows (no stale retry, nothing was lost).
            self.stream = None;
        }
        match response.status {
            200 => Ok(response.body),
            status => Err((format!("status {status}"), true)),
        }
    }
}

/// Fails the test when any request of `report` failed, or when the load hardly ran (fewer than
/// `min_requests`): a load that sent nothing proves nothing.
#[track_caller]
pub fn assert_no_failures(what: &str, report: &Report, min_requests: u64) {
    assert_eq!(
        report.failed,
        0,
        "{what}: {} of {} requests failed: {:#?}",
        report.failed,
        report.total(),
        report.failures
    );
    assert!(
        report.total() >= min_requests,
        "{what}: only {} requests were sent; the load did not run",
        report.total()
    );
}
