//! sluice's own metrics, scraped while a drain restart runs under load: every scrape (of the
//! control socket through `sluice metrics`, and once of the `[metrics] listen` TCP port) is
//! parsed by Prometheus's own Python text parser, and the counters, histograms and gauges must
//! move as the restart goes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_tests::load::Load;
use sluice_tests::netns::Netns;
use sluice_tests::{Host, PATIENCE, Status, fixtures, require_root, run_bounded};

const FRONT_PORT: u16 = 9401;
const PORT_BASE: u16 = 9410;
/// The TCP listener, inside the test's network namespace.
const METRICS_PORT: u16 = 9490;
/// Requests per second on the front port.
const RATE: u32 = 50;
/// Upper bound of the load.
const LOAD_LIMIT: Duration = Duration::from_secs(180);
/// How long the restart of two gunicorn instances may take on a loaded machine.
const RESTART_PATIENCE: Duration = Duration::from_secs(120);
/// Most scrapes taken while the restart runs (one per `SCRAPE_PERIOD` at most).
const SCRAPES_MAX: usize = 600;
const SCRAPE_PERIOD: Duration = Duration::from_millis(100);

/// Prometheus's text parser (`prometheus_client.parser`), printing every sample as JSON.
const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1]).read()
out = []
for family in text_string_to_metric_families(text):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

#[derive(Debug, Clone)]
struct Sample {
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    /// One sample of the parser's JSON; panics naming what is missing.
    fn of(v: &serde_json::Value) -> Sample {
        let text = |key: &str| {
            v[key]
                .as_str()
                .unwrap_or_else(|| panic!("no {key} in {v}"))
                .to_owned()
        };
        let labels = v["labels"]
            .as_object()
            .unwrap_or_else(|| panic!("no labels in {v}"))
            .iter()
            .map(|(k, l)| (k.clone(), l.as_str().unwrap_or_default().to_owned()))
            .collect();
        Sample {
            kind: text("type"),
            name: text("name"),
            labels,
            value: v["value"]
                .as_f64()
                .unwrap_or_else(|| panic!("no value in {v}")),
        }
    }
}

/// One parsed scrape.
#[derive(Debug, Clone)]
struct Scrape(Vec<Sample>);

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`; `None` when absent.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// The value, 0 when the series does not exist yet (a counter nobody incremented).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    fn type_of(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.kind.as_str())
    }
}

/// Parses `text` with the Python parser; panics with the text when it refuses it.
fn parse(python: &std::path::Path, dir: &std::path::Path, text: &str) -> Scrape {
    let file = dir.join("scrape.txt");
    std::fs::write(&file, text).expect("writing the scrape");
    let mut cmd = Command::new(python);
    cmd.arg("-P").arg("-c").arg(PARSER).arg(&file);
    let out = run_bounded(cmd, PATIENCE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.code,
        Some(0),
        "the Prometheus parser refused the exposition: {out}\n--- exposition\n{text}"
    );
    let parsed: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("the parser's output: {e}: {}", out.stdout));
    let families = parsed.as_array().expect("a list of samples");
    assert!(
        families.iter().all(|s| s["family"]
            .as_str()
            .is_some_and(|f| f.starts_with("sluice_"))),
        "only sluice's own families: {parsed}"
    );
    Scrape(families.iter().map(Sample::of).collect())
}

fn scrape(h: &Host, python: &std::path::Path) -> Scrape {
    let out = h.sluice(&["metrics"]);
    assert_eq!(out.code, Some(0), "{out}");
    parse(python, h.root(), &out.stdout)
}

/// One HTTP/1.1 request to the metrics listener; the status line and the body.
fn tcp_get(path: &str) -> (String, String) {
    let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    let mut stream =
        TcpStream::connect_timeout(&addr, PATIENCE).expect("connecting to the metrics listener");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("the listener closes after one answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {answer:?}"));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

fn both_enabled(s: &Status) -> bool {
    let instances = s.instances("py");
    instances.len() == 2
        && instances
            .iter()
            .all(|i| i["state"] == "running" && i["enabled"] == true && i["healthy"] == true)
        && !s.restart_in_progress("py")
}

#[test]
fn scrapes_during_a_drain_restart_under_load_show_it_happen() {
    if !require_root() {
        return;
    }
    let Some(gunicorn) = fixtures::gunicorn() else {
        return;
    };
    let Some(python) = fixtures::venv_bin("python") else {
        return;
    };
    let ns = Netns::new();
    let h = Host::new().in_netns(&ns);
    let host_file = std::fs::read_to_string(h.host_file()).expect("reading the host file");
    h.write_host_file(&format!(
        "{host_file}[metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n"
    ));
    h.service(
        "py",
        &format!(
            r#"command = ["{gunicorn}", "--bind", "127.0.0.1:{{port}}", "--workers", "1", "--graceful-timeout", "5", "--chdir", "{fixtures}", "wsgi_app:app"]
instances = 2
port_base = {PORT_BASE}
front_port = {FRONT_PORT}
stop_grace_ms = 6000
env = {{ INSTANCE = "{{instance}}" }}
[restart]
strategy = "drain"
drain_timeout_ms = 3000
[health]
http = "/health"
start_timeout_ms = 10000
[warmup]
requests = ["GET /item"]
max_duration_ms = 5000
"#,
            gunicorn = gunicorn.display(),
            fixtures = fixtures::dir().display(),
        ),
    );
    h.start_daemon();
    h.wait_until(both_enabled, PATIENCE * 3);

    let before = scrape(&h, &python);
    assert_eq!(
        before.type_of("sluice_restarts_total"),
        None,
        "no restart yet: {before:?}"
    );
    assert_eq!(before.type_of("sluice_instances"), Some("gauge"));
    assert_eq!(
        before.value(
            "sluice_instances",
            &[("service", "py"), ("state", "running")]
        ),
        Some(2.0)
    );
    assert_eq!(
        before.value("sluice_build_info", &[]),
        Some(1.0),
        "{before:?}"
    );
    let steered_before = before.count("sluice_steering_transactions_total", &[("service", "py")]);
    assert!(
        steered_before >= 1.0,
        "the chain was written at start-up: {before:?}"
    );

    let load = Load::start(&ns, FRONT_PORT, RATE, LOAD_LIMIT);
    std::thread::sleep(Duration::from_millis(500));
    let mut restart = h
        .sluice_command(&["restart", "py"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawning sluice restart");
    let started = Instant::now();
    let mut during = Vec::new();
    let exit = loop {
        during.push(scrape(&h, &python));
        if let Some(exit) = restart.try_wait().expect("waiting for sluice restart") {
            break exit;
        }
        if started.elapsed() > RESTART_PATIENCE || during.len() >= SCRAPES_MAX {
            let _ = restart.kill();
            let _ = restart.wait();
            panic!(
                "the restart did not end within {RESTART_PATIENCE:?} ({} scrapes)\n{}",
                during.len(),
                h.daemon_log_tail()
            );
        }
        std::thread::sleep(SCRAPE_PERIOD);
    };
    assert!(
        exit.success(),
        "sluice restart: {exit}\n{}",
        h.daemon_log_tail()
    );
    h.wait_until(both_enabled, PATIENCE);
    let after = scrape(&h, &python);
    let report = load.finish();
    let rss = h
        .daemon_pid()
        .and_then(|pid| sluice_tests::procs::status_field(pid, "VmRSS"));
    println!(
        "daemon VmRSS after the restart and {} scrapes: {rss:?}",
        during.len() + 2
    );
    println!(
        "{} scrapes during the restart ({:?}); load: {} ok, {} failed",
        during.len(),
        started.elapsed(),
        report.ok,
        report.failed
    );

    // Counters only go up, scrape after scrape.
    let restarts = |s: &Scrape| {
        s.count(
            "sluice_restarts_total",
            &[("service", "py"), ("reason", "restart")],
        )
    };
    let steered = |s: &Scrape| s.count("sluice_steering_transactions_total", &[("service", "py")]);
    let mut last = (restarts(&before), steered(&before));
    for s in during.iter().chain([&after]) {
        let now = (restarts(s), steered(s));
        assert!(
            now.0 >= last.0 && now.1 >= last.1,
            "counters went back: {last:?} then {now:?}"
        );
        last = now;
    }
    assert_eq!(after.type_of("sluice_restarts_total"), Some("counter"));
    assert_eq!(
        restarts(&after),
        2.0,
        "both instances restarted once: {after:?}"
    );
    assert!(
        steered(&after) >= steered_before + 2.0,
        "each instance was steered out and back in: {} then {}",
        steered_before,
        steered(&after)
    );
    assert_eq!(
        after.count("sluice_steering_failures_total", &[("service", "py")]),
        0.0
    );
    // Some scrape saw the restart at work.
    let busy = during.iter().any(|s| {
        ["draining", "starting", "stopping"]
            .iter()
            .any(|state| s.count("sluice_instances", &[("service", "py"), ("state", state)]) > 0.0)
    });
    assert!(
        busy,
        "no scrape of {} saw an instance draining, stopping or starting",
        during.len()
    );
    println!(
        "restarts_total by scrape: {:?}",
        during.iter().map(restarts).collect::<Vec<_>>()
    );
    // Histograms got an observation per drain and per warm-up.
    assert_eq!(
        after.type_of("sluice_drain_duration_seconds_count"),
        Some("histogram")
    );
    assert!(
        after.count("sluice_drain_duration_seconds_count", &[("service", "py")]) >= 2.0,
        "{after:?}"
    );
    assert_eq!(
        after.count(
            "sluice_drain_duration_seconds_bucket",
            &[("service", "py"), ("le", "+Inf")]
        ),
        after.count("sluice_drain_duration_seconds_count", &[("service", "py")])
    );
    assert!(
        after.count("sluice_warmup_duration_seconds_count", &[("service", "py")]) >= 2.0,
        "{after:?}"
    );
    assert!(after.count("sluice_warmup_duration_seconds_sum", &[("service", "py")]) > 0.0);
    // The warm-up window gauges of each instance.
    for instance in ["0", "1"] {
        for window in ["first", "last"] {
            let p99 = after.value(
                "sluice_warmup_window_p99_seconds",
                &[
                    ("service", "py"),
                    ("instance", instance),
                    ("window", window),
                ],
            );
            assert!(
                p99.is_some_and(|v| v > 0.0),
                "py/{instance} {window} window: {p99:?} in {after:?}"
            );
        }
    }
    assert_eq!(
        after.value(
            "sluice_instances",
            &[("service", "py"), ("state", "running")]
        ),
        Some(2.0)
    );

    // The TCP listener serves the same exposition, and nothing else.
    let (status, body) = ns.run_in(|| tcp_get("/metrics"));
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let tcp = parse(&python, h.root(), &body);
    assert_eq!(restarts(&tcp), 2.0, "{tcp:?}");
    let (status, body) = ns.run_in(|| tcp_get("/v1/status"));
    assert_eq!(status, "HTTP/1.1 404 Not Found", "{body}");
    assert!(!body.contains("sluice_"), "{body}");
}
