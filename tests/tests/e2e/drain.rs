//! A drain that waits for what matters: a restart of four Java instances while a keep-alive pool
//! holds connections to every one of them and never closes them. Each drain must end `idle` (no
//! request in flight), not at `drain_timeout_ms`, and no request may fail.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_tests::netns::Netns;
use sluice_tests::{Host, PATIENCE, fixtures, require_root};

const FRONT_PORT: u16 = 9300;
const DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Pool connections per instance, at least: opened through the front port until each has this many.
const PER_INSTANCE: usize = 2;
/// Most connections opened to fill the pool (steering picks the instance at random).
const MAX_POOL_CONNECTS: usize = 64;
/// Pause between two requests on one pool connection.
const REQUEST_PERIOD: Duration = Duration::from_millis(50);
/// Limit of one request, and of the whole load.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const LOAD_LIMIT: Duration = Duration::from_secs(150);
const RESTART_PATIENCE: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// The server closed an idle connection under the client, which reconnected and retried once.
    stale_retries: u64,
    failures: Vec<String>,
}

/// One request on `stream`; the instance that answered, or what went wrong and whether any byte
/// of the answer had come.
fn request(stream: &mut TcpStream) -> Result<String, (String, bool)> {
    stream
        .write_all(b"GET /item HTTP/1.1\r\nHost: test\r\n\r\n")
        .map_err(|e| (format!("send: {e}"), false))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            if !head.starts_with("HTTP/1.1 200") {
                return Err((format!("answer: {head:?}"), true));
            }
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .ok_or_else(|| (format!("no content-length: {head:?}"), true))?;
            while buf.len() < end + 4 + length {
                match stream.read(&mut chunk) {
                    Ok(0) => return Err(("closed in the body".into(), true)),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err((format!("reading body: {e}"), true)),
                }
            }
            // The Java app answers "java INSTANCE HASH".
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).to_string();
            return Ok(body.split_whitespace().nth(1).unwrap_or("?").to_string());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(("closed before an answer".into(), !buf.is_empty())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err((format!("reading: {e}"), !buf.is_empty())),
        }
    }
}

fn connect() -> Result<TcpStream, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], FRONT_PORT));
    let s =
        TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).ok();
    s.set_write_timeout(Some(REQUEST_TIMEOUT)).ok();
    s.set_nodelay(true).ok();
    Ok(s)
}

/// Opens pool connections through the front port until every instance holds `PER_INSTANCE`.
fn fill_pool() -> Vec<TcpStream> {
    let mut pool = Vec::new();
    let mut per: std::collections::BTreeMap<String, usize> = Default::default();
    for _ in 0..MAX_POOL_CONNECTS {
        let mut s = connect().expect("connecting to the front port");
        let instance = request(&mut s).expect("the first request of a pool connection");
        let n = per.entry(instance).or_default();
        if *n < PER_INSTANCE {
            *n += 1;
            pool.push(s);
        }
        if per.len() == 4 && per.values().all(|n| *n >= PER_INSTANCE) {
            return pool;
        }
    }
    panic!(
        "{MAX_POOL_CONNECTS} connections did not reach every instance {PER_INSTANCE} times: {per:?}"
    );
}

#[test]
fn keep_alive_pool_drains_end_idle() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let h = Host::new().in_netns(&ns);
    let Some(classes) = fixtures::java_app(&h.path("classes")) else {
        return;
    };
    h.service(
        "java",
        &format!(
            r#"command = ["{java}", "-Xmx64m", "-XX:+UseSerialGC", "-cp", "{classes}", "WarmApp", "{{port}}"]
instances = 4
port_base = 9310
front_port = {FRONT_PORT}
stop_grace_ms = 5000
env = {{ INSTANCE = "{{instance}}" }}
[restart]
strategy = "drain"
drain_until = "idle"
drain_timeout_ms = {DRAIN_TIMEOUT_MS}
[health]
http = "/health"
start_timeout_ms = 30000
"#,
            java = fixtures::java().display(),
            classes = classes.display(),
        ),
    );
    h.start_daemon();
    let steered = |s: &sluice_tests::Status| {
        let i = s.instances("java");
        i.len() == 4
            && i.iter()
                .all(|i| i["state"] == "running" && i["enabled"] == true)
            && !s.restart_in_progress("java")
    };
    h.wait_until(steered, PATIENCE * 3);

    let pool = ns.run_in(fill_pool);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let deadline = Instant::now() + LOAD_LIMIT;
    let workers: Vec<_> = pool
        .into_iter()
        .map(|stream| {
            let (stop, tally, ns_name) = (stop.clone(), tally.clone(), ns.name.clone());
            std::thread::spawn(move || {
                let ns = Netns { name: ns_name };
                ns.enter_current_thread();
                // This handle must not delete the namespace.
                std::mem::forget(ns);
                let mut stream = stream;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let result = match request(&mut stream) {
                        Ok(_) => Ok(false),
                        // The instance closed the idle connection at its stop: the request was
                        // never seen; reconnect through steering and send it again, once.
                        Err((_, false)) => connect()
                            .map_err(|e| (e, false))
                            .and_then(|s| {
                                stream = s;
                                request(&mut stream)
                            })
                            .map(|_| true)
                            .map_err(|(w, _)| format!("retry: {w}")),
                        Err((what, true)) => Err(what),
                    };
                    let mut t = tally.lock().unwrap();
                    match result {
                        Ok(stale) => {
                            t.ok += 1;
                            t.stale_retries += u64::from(stale);
                        }
                        Err(what) => {
                            t.failed += 1;
                            if t.failures.len() < 20 {
                                t.failures.push(what);
                            }
                        }
                    }
                    drop(t);
                    std::thread::sleep(REQUEST_PERIOD);
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(500));
    let begun = Instant::now();
    let out = h.sluice(&["restart", "java"]);
    assert_eq!(out.code, Some(0), "restart: {out}");
    let status = h.wait_until(steered, RESTART_PATIENCE);
    let restart_ms = begun.elapsed().as_millis();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("pool worker");
    }
    let t = tally.lock().unwrap();
    println!(
        "pool: {} ok, {} failed, {} stale retries; restart {restart_ms} ms",
        t.ok, t.failed, t.stale_retries
    );
    assert_eq!(t.failed, 0, "failed requests: {:#?}", t.failures);
    assert!(t.ok >= 100, "the pool hardly ran: {t:?}");

    let mut waited_ms = 0;
    for i in status.instances("java") {
        let d = &i["last_drain"];
        println!("drain of java@{}: {d}", i["index"]);
        assert_eq!(
            d["ending"], "idle",
            "each drain ends idle, not at the timeout: {i}"
        );
        assert!(
            d["connections_left"].as_u64().unwrap_or(0) >= 1,
            "the pool's kept-alive connections were still open, and not waited for: {i}"
        );
        assert_eq!(d["in_flight_left"], 0, "{i}");
        waited_ms += d["waited_ms"].as_u64().expect("waited_ms in status");
    }
    assert!(
        waited_ms < DRAIN_TIMEOUT_MS,
        "four drains waited {waited_ms} ms in all; a drain to the timeout waits {DRAIN_TIMEOUT_MS} ms each"
    );
    for index in 0..4 {
        let line = format!("java/{index}: drained: idle,");
        assert!(
            out.stderr.contains(&line),
            "`sluice restart` prints each drain's ending ({line}): {out}"
        );
    }
    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap();
    assert!(
        !log.contains("drain timeout"),
        "no drain ran to its timeout"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("drained") && l.contains("ending=\"idle\""))
            .count(),
        4,
        "the log records each drain's ending"
    );
}
