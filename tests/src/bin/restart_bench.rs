//! `bench/restart.sh`: what a full restart of four Java instances costs the clients and how long it
//! takes, three ways (`drain` with warm-up, `drain` without, `all-at-once`), each on fresh JVMs in a
//! fresh network namespace under the same steady load, with the steady state measured in the same
//! run as the baseline.
//!
//! Usage: `restart_bench OUT_PREFIX` (writes `OUT_PREFIX.md` and `OUT_PREFIX.json`). Needs root,
//! a JDK, and the release binaries (`SLUICE_BIN_DIR=target/release`).
//!
//! The load is a copy of the harness's [`sluice_tests::load`] (half new connections, half
//! keep-alive, a fixed rate, one stale keep-alive retry counted apart) that also keeps when each
//! request was issued, so the restart window can be cut out of it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::netns::Netns;
use sluice_tests::{Host, PATIENCE, Status, fixtures, require_root};

const FRONT_PORT: u16 = 9000;
const PORT_BASE: u16 = 9100;
const INSTANCES: usize = 4;
/// Upper bound of one variant's load.
const LOAD_LIMIT: Duration = Duration::from_secs(240);

fn main() {
    let out_prefix = std::env::args()
        .nth(1)
        .expect("usage: restart_bench OUT_PREFIX");
    if !require_root() {
        std::process::exit(1);
    }
    let rate = sluice_tests::benchkit::env_u64("BENCH_RATE", 150) as u32;
    let warm_in = Duration::from_secs(sluice_tests::benchkit::env_u64("BENCH_WARM_IN_SECONDS", 10));
    let steady = Duration::from_secs(sluice_tests::benchkit::env_u64("BENCH_STEADY_SECONDS", 10));
    let machine_before =
        sluice_tests::benchkit::machine(&[("java", "java -version 2>&1 | head -1")]);

    let classes_dir = tempfile::Builder::new()
        .prefix("sluice-bench-classes-")
        .tempdir()
        .expect("a temp dir");
    let Some(classes) = fixtures::java_app(classes_dir.path()) else {
        std::process::exit(1);
    };
    let ns = Netns::new();
    let variants = [
        ("drain + warm-up", "drain", true),
        ("drain, no warm-up", "drain", false),
        ("all-at-once", "all-at-once", true),
    ];
    let mut results = Vec::new();
    for (label, strategy, warm) in variants {
        eprintln!("== {label}");
        let r = run_variant(&ns, &classes, strategy, warm, rate, warm_in, steady);
        eprintln!("{}", serde_json::to_string(&r).unwrap_or_default());
        results.push((label, strategy, warm, r));
    }
    let machine_after =
        sluice_tests::benchkit::machine(&[("java", "java -version 2>&1 | head -1")]);
    let report = json!({
        "benchmark": "restart",
        "machine": machine_before,
        "load_average_after": machine_after["load_average"],
        "rate_per_s": rate,
        "java_tcp_nodelay": nodelay(),
        "warm_in_s": warm_in.as_secs(),
        "steady_window_s": steady.as_secs(),
        "variants": results.iter().map(|(label, strategy, warm, r)| {
            let mut v = r.clone();
            v["label"] = json!(label);
            v["strategy"] = json!(strategy);
            v["warmup"] = json!(warm);
            v
        }).collect::<Vec<_>>(),
    });
    std::fs::write(
        format!("{out_prefix}.json"),
        serde_json::to_string_pretty(&report).expect("json") + "\n",
    )
    .expect("writing the JSON report");
    let md = markdown(&report);
    std::fs::write(format!("{out_prefix}.md"), &md).expect("writing the markdown report");
    println!("{md}");
}

fn java_service(classes: &Path, strategy: &str, warm: bool) -> String {
    // BENCH_WARMUP_COUNT=N warms with a fixed number of requests instead of "until stable".
    let stop_rule = match std::env::var("BENCH_WARMUP_COUNT") {
        Ok(n) => format!("count = {n}"),
        Err(_) => "until_stable_pct = 25\nwindow = 20".to_owned(),
    };
    let warmup = if warm {
        format!(
            "[warmup]\nrequests = [\"GET /item\", \"GET /other/path\"]\n{stop_rule}\nmax_duration_ms = 10000\nconcurrency = 2\n"
        )
    } else {
        String::new()
    };
    format!(
        r#"command = ["{java}", "-Xmx64m", "-XX:+UseSerialGC", "-Dsun.net.httpserver.nodelay={nodelay}", "-cp", "{classes}", "WarmApp", "{{port}}"]
instances = {INSTANCES}
port_base = {PORT_BASE}
front_port = {FRONT_PORT}
stop_grace_ms = 5000
env = {{ INSTANCE = "{{instance}}" }}
[restart]
strategy = "{strategy}"
drain_timeout_ms = 3000
[health]
http = "/health"
start_timeout_ms = 30000
{warmup}"#,
        java = fixtures::java().display(),
        classes = classes.display(),
        nodelay = nodelay(),
    )
}

/// `TCP_NODELAY` on the JDK HttpServer's sockets (`BENCH_JAVA_NODELAY`, default on). Off (the JDK's
/// default), it writes the response headers and body as two segments, and on a keep-alive
/// connection the body then waits for the client's delayed ACK (~40 ms): most keep-alive requests
/// take 40+ ms in the steady state, which hides everything a restart does to p90 and p99.
fn nodelay() -> bool {
    sluice_tests::benchkit::env_u64("BENCH_JAVA_NODELAY", 1) == 1
}

fn all_enabled(s: &Status) -> bool {
    let instances = s.instances("java");
    instances.len() == INSTANCES
        && instances
            .iter()
            .all(|i| i["state"] == "running" && i["enabled"] == true)
        && !s.restart_in_progress("java")
}

fn run_variant(
    ns: &Netns,
    classes: &Path,
    strategy: &str,
    warm: bool,
    rate: u32,
    warm_in: Duration,
    steady: Duration,
) -> Value {
    let h = Host::new().in_netns(ns);
    h.service("java", &java_service(classes, strategy, warm));
    h.start_daemon();
    h.wait_until(all_enabled, PATIENCE * 3);
    let load = TimedLoad::start(ns, FRONT_PORT, rate, LOAD_LIMIT);
    std::thread::sleep(warm_in + steady);
    let call = Instant::now();
    let out = h.sluice(&["restart", "java"]);
    let returned = Instant::now();
    h.wait_until(all_enabled, PATIENCE * 3);
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap_or_default();
    drop(h);

    let rel = |t: Instant| t.duration_since(samples.epoch).as_secs_f64();
    let (call_s, ret_s) = (rel(call), rel(returned));
    let steady_from = call_s - steady.as_secs_f64();
    let window = |from: f64, to: f64| -> Vec<&Sample> {
        samples
            .list
            .iter()
            .filter(|s| s.issued_s >= from && s.issued_s <= to)
            .collect()
    };
    let steady_stats = stats(&window(steady_from, call_s));
    let restart_stats = stats(&window(call_s, ret_s));
    let after_stats = stats(&window(ret_s, f64::MAX));
    let total_stats = stats(&samples.list.iter().collect::<Vec<_>>());
    let ratio = |a: &Value, b: &Value, key: &str| -> Value {
        match (a[key].as_f64(), b[key].as_f64()) {
            (Some(x), Some(y)) if y > 0.0 => json!(round3(x / y)),
            _ => Value::Null,
        }
    };
    let steps = batches(&log);
    // Requests issued in the first 2 s after each batch went back into service (Enable; for
    // `all-at-once`, the end of the restart): what a cold or warmed JVM gives the first clients.
    let back: Vec<f64> = steps
        .iter()
        .filter_map(|b| b["back_in_service_at_ms"].as_f64())
        .map(|ms| (ms - samples.epoch_wall_ms) / 1000.0)
        .collect();
    let after_back = |s: &Sample| {
        back.iter()
            .any(|b| s.issued_s >= *b && s.issued_s < b + 2.0)
    };
    let first_2s: Vec<&Sample> = samples.list.iter().filter(|s| after_back(s)).collect();
    let rest: Vec<&Sample> = window(call_s, ret_s)
        .into_iter()
        .filter(|s| !after_back(s))
        .collect();
    let first_2s_stats = stats(&first_2s);
    let rest_stats = stats(&rest);
    let total_ms = (ret_s - call_s) * 1000.0;
    let unavoidable_ms: f64 = steps
        .iter()
        .map(|b| {
            b["start_to_healthy_ms"].as_f64().unwrap_or(0.0)
                + b["warmup_ms"].as_f64().unwrap_or(0.0)
        })
        .sum();
    let sum_of = |key: &str| -> f64 { steps.iter().map(|b| b[key].as_f64().unwrap_or(0.0)).sum() };
    let failures: Vec<&str> = samples
        .list
        .iter()
        .filter_map(|s| s.error.as_deref())
        .take(5)
        .collect();
    json!({
        "restart_exit_code": out.code,
        "restart_stdout": out.stdout.trim(),
        "restart_stderr": out.stderr.trim(),
        "steady": steady_stats,
        "restart_window": restart_stats,
        "first_2s_after_back_in_service": first_2s_stats,
        "restart_window_other_requests": rest_stats,
        "after_restart": after_stats,
        "whole_run": total_stats,
        "p99_ratio_restart_to_steady": ratio(&restart_stats, &steady_stats, "p99_ms"),
        "p50_ratio_restart_to_steady": ratio(&restart_stats, &steady_stats, "p50_ms"),
        "p90_ratio_restart_to_steady": ratio(&restart_stats, &steady_stats, "p90_ms"),
        "first_failures": failures,
        "total_ms": round3(total_ms),
        "unavoidable_ms": round3(unavoidable_ms),
        "total_to_unavoidable": if unavoidable_ms > 0.0 { json!(round3(total_ms / unavoidable_ms)) } else { Value::Null },
        "breakdown_ms": {
            "drain": round3(sum_of("drain_ms")),
            "stop": round3(sum_of("stop_ms")),
            "start_to_healthy": round3(sum_of("start_to_healthy_ms")),
            "warmup": round3(sum_of("warmup_ms")),
            "enable_to_next": round3(sum_of("enable_to_next_ms")),
        },
        "batches": steps,
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------- daemon log

/// The `restart step` lines of service `java`: (ms, action name, batch text).
fn steps(log: &str) -> Vec<(f64, String, String)> {
    let marker = "restart step service=java action=";
    log.lines()
        .filter_map(|line| {
            let rest = line.split(marker).nth(1)?;
            let ts = sluice_tests::benchkit::parse_ts(line.split_whitespace().next()?)?;
            let (name, args) = rest.split_once('(').unwrap_or((rest, ""));
            let batch = args.split(']').next().unwrap_or("").trim_start_matches('[');
            Some((ts, name.trim().to_owned(), batch.to_owned()))
        })
        .collect()
}

/// Per batch: drain (Disable → Stop), stop (Stop → Start), start-to-healthy (Start → WarmUp, or
/// → Enable without warm-up), warm-up (WarmUp → Enable), and Enable → the next batch's first
/// step (or Finished).
fn batches(log: &str) -> Vec<Value> {
    let steps = steps(log);
    let mut out: Vec<Value> = Vec::new();
    let mut current: BTreeMap<&str, f64> = BTreeMap::new();
    let mut batch = String::new();
    let flush = |current: &mut BTreeMap<&str, f64>,
                 batch: &str,
                 next: Option<f64>,
                 out: &mut Vec<Value>| {
        if current.is_empty() {
            return;
        }
        let get = |k: &str| current.get(k).copied();
        let span = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => json!(round3(b - a)),
            _ => Value::Null,
        };
        // `all-at-once` does not steer: no Enable step; the batch ends with the restart.
        let end = get("Enable").or(next);
        let healthy_at = get("WarmUp").or(get("Enable")).or(next);
        out.push(json!({
            "batch": format!("[{batch}]"),
            "drain_ms": span(get("Disable"), get("Stop")),
            "stop_ms": span(get("Stop"), get("Start")),
            "start_to_healthy_ms": span(get("Start"), healthy_at),
            "warmup_ms": if get("WarmUp").is_some() { span(get("WarmUp"), end) } else { json!(0.0) },
            "back_in_service_at_ms": end,
            "enable_to_next_ms": if get("Enable").is_some() { span(get("Enable"), next) } else { json!(0.0) },
        }));
        current.clear();
    };
    for (ts, name, args) in &steps {
        let begins_batch = matches!(name.as_str(), "Disable")
            || (name == "Stop" && !current.contains_key("Disable"))
            || name == "Finished";
        if begins_batch && !current.is_empty() {
            flush(&mut current, &batch, Some(*ts), &mut out);
        }
        if name == "Finished" {
            break;
        }
        if current.is_empty() {
            batch = args.clone();
        }
        let key: &str = match name.as_str() {
            "Disable" => "Disable",
            "Stop" => "Stop",
            "Start" => "Start",
            "Check" => "Check",
            "WarmUp" => "WarmUp",
            "Enable" => "Enable",
            _ => continue,
        };
        current.entry(key).or_insert(*ts);
    }
    flush(&mut current, &batch, None, &mut out);
    out
}

// ---------------------------------------------------------------- statistics

fn stats(list: &[&Sample]) -> Value {
    let mut lat: Vec<u64> = list
        .iter()
        .filter(|s| s.error.is_none())
        .map(|s| s.latency_us)
        .collect();
    lat.sort_unstable();
    let failed = list.iter().filter(|s| s.error.is_some()).count();
    let stale: u64 = list.iter().map(|s| u64::from(s.stale)).sum();
    let pct = |q: f64| -> Value {
        if lat.is_empty() {
            return Value::Null;
        }
        let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
        json!(lat[i] as f64 / 1000.0)
    };
    let slow = |keepalive: bool| {
        list.iter()
            .filter(|s| s.error.is_none() && s.keepalive == keepalive && s.latency_us >= 40_000)
            .count()
    };
    json!({
        "requests": list.len(),
        "ok": lat.len(),
        "failed": failed,
        "stale_keepalive_retries": stale,
        "at_least_40ms_new_connection": slow(false),
        "at_least_40ms_keepalive": slow(true),
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": lat.last().map(|m| *m as f64 / 1000.0),
    })
}

// ---------------------------------------------------------------- load with timestamps

#[derive(Debug, Clone)]
struct Sample {
    /// Seconds after the load began.
    issued_s: f64,
    latency_us: u64,
    keepalive: bool,
    stale: bool,
    error: Option<String>,
}

struct Samples {
    epoch: Instant,
    /// Wall clock (ms since the Unix epoch) at `epoch`, to place the daemon's log lines.
    epoch_wall_ms: f64,
    list: Vec<Sample>,
}

struct TimedLoad {
    epoch: Instant,
    epoch_wall_ms: f64,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    samples: Arc<Mutex<Vec<Sample>>>,
}

impl TimedLoad {
    fn start(netns: &Netns, port: u16, rate: u32, limit: Duration) -> TimedLoad {
        let epoch = Instant::now();
        let epoch_wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let deadline = epoch + limit;
        let per_thread = f64::from(rate.max(4)) / 4.0;
        let interval = Duration::from_secs_f64(1.0 / per_thread);
        let mut threads = Vec::new();
        for n in 0..4 {
            let keepalive = n % 2 == 1;
            let ns_name = netns.name.clone();
            let (stop, samples) = (stop.clone(), samples.clone());
            threads.push(std::thread::spawn(move || {
                sluice_tests::netns::enter_named(&ns_name);
                let mut client = sluice_tests::load::Client::default();
                // Spread the threads' phases over one interval.
                let mut next = Instant::now() + interval.mul_f64(f64::from(n) / 4.0);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    let begun = Instant::now();
                    let result = if keepalive {
                        client.keepalive_request(port)
                    } else {
                        sluice_tests::load::one_shot_request(port)
                            .map(drop)
                            .map(|()| false)
                    };
                    let latency_us = begun.elapsed().as_micros() as u64;
                    let sample = Sample {
                        issued_s: begun.duration_since(epoch).as_secs_f64(),
                        latency_us,
                        keepalive,
                        stale: *result.as_ref().unwrap_or(&false),
                        error: result.err(),
                    };
                    samples.lock().unwrap().push(sample);
                    next += interval;
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    }
                }
            }));
        }
        TimedLoad {
            epoch,
            epoch_wall_ms,
            stop,
            threads,
            samples,
        }
    }

    fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread");
        }
        let mut list = self.samples.lock().unwrap().clone();
        list.sort_by(|a, b| a.issued_s.total_cmp(&b.issued_s));
        Samples {
            epoch: self.epoch,
            epoch_wall_ms: self.epoch_wall_ms,
            list,
        }
    }
}

// ---------------------------------------------------------------- report

fn ms(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 1000.0 => format!("{:.2} s", x / 1000.0),
        Some(x) => format!("{x:.1} ms"),
        None => "–".into(),
    }
}

fn ratio(v: &Value) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.2}×"))
}

fn markdown(r: &Value) -> String {
    let m = &r["machine"];
    let mut s = String::new();
    s += "# Restart of 4 Java instances under load (`bench/restart.sh`)\n\n";
    s += &format!(
        "Machine: {} CPUs ({}), {}, Linux {}, {}; {}; {}; commit {} ({} changed files in the tree). \
         Machine use: {} (load average {} at the start, {} at the end), \
         so absolute figures are noisy; the ratios compare figures of the same run.\n\n",
        m["cpus"].as_str().unwrap_or(""),
        m["cpu_model"].as_str().unwrap_or("").trim(),
        m["memory"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["os"].as_str().unwrap_or(""),
        m["date_utc"].as_str().unwrap_or(""),
        m["java"].as_str().unwrap_or(""),
        m["commit"].as_str().unwrap_or(""),
        m["dirty_tree"].as_str().unwrap_or(""),
        m["shared"].as_str().unwrap_or("not stated"),
        m["load_average"].as_str().unwrap_or(""),
        r["load_average_after"].as_str().unwrap_or(""),
    );
    s += &format!(
        "Each variant: a fresh network namespace host, 4 × `WarmApp` (`-Xmx64m -XX:+UseSerialGC -Dsun.net.httpserver.nodelay={}`) behind front port {FRONT_PORT}, \
         {} req/s (half new connections, half keep-alive) for the whole run; {} s of load to warm the JVMs, \
         then the steady window ({} s), then `sluice restart java`; latencies are of requests *issued* in each window.\n\n",
        r["java_tcp_nodelay"], r["rate_per_s"], r["warm_in_s"], r["steady_window_s"]
    );
    s += "| variant | steady p50 / p90 / p99 | restart-window requests | failed | restart p50 / p90 / p99 / max | p90 restart/steady | p99 restart/steady | restart total | unavoidable waits | total/unavoidable |\n";
    s += "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    for v in r["variants"].as_array().into_iter().flatten() {
        let st = &v["steady"];
        let rw = &v["restart_window"];
        s += &format!(
            "| {} | {} / {} / {} | {} | {} (+{} after) | {} / {} / {} / {} | {} | {} | {} | {} | {} |\n",
            v["label"].as_str().unwrap_or(""),
            ms(&st["p50_ms"]),
            ms(&st["p90_ms"]),
            ms(&st["p99_ms"]),
            rw["requests"],
            rw["failed"],
            v["after_restart"]["failed"],
            ms(&rw["p50_ms"]),
            ms(&rw["p90_ms"]),
            ms(&rw["p99_ms"]),
            ms(&rw["max_ms"]),
            ratio(&v["p90_ratio_restart_to_steady"]),
            ratio(&v["p99_ratio_restart_to_steady"]),
            ms(&v["total_ms"]),
            ms(&v["unavoidable_ms"]),
            ratio(&v["total_to_unavoidable"]),
        );
    }
    s += "\nRequests of ≥ 40 ms (new connection / keep-alive), steady window → restart window: ";
    let slow: Vec<String> = r["variants"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            format!(
                "{}: {}/{} of {} → {}/{} of {}",
                v["label"].as_str().unwrap_or(""),
                v["steady"]["at_least_40ms_new_connection"],
                v["steady"]["at_least_40ms_keepalive"],
                v["steady"]["requests"],
                v["restart_window"]["at_least_40ms_new_connection"],
                v["restart_window"]["at_least_40ms_keepalive"],
                v["restart_window"]["requests"],
            )
        })
        .collect();
    s += &slow.join("; ");
    s += ".\n";
    s += "\nRequests issued in the first 2 s after each batch went back into service (`Enable`; for all-at-once, the end of the restart) \
          against the other requests of the restart window (p50 / p90 / p99 / max, failed):\n\n";
    s += "| variant | first 2 s after back in service | rest of the restart window |\n| --- | ---: | ---: |\n";
    for v in r["variants"].as_array().into_iter().flatten() {
        let f = |x: &Value| {
            format!(
                "{} req: {} / {} / {} / {}, {} failed",
                x["requests"],
                ms(&x["p50_ms"]),
                ms(&x["p90_ms"]),
                ms(&x["p99_ms"]),
                ms(&x["max_ms"]),
                x["failed"]
            )
        };
        s += &format!(
            "| {} | {} | {} |\n",
            v["label"].as_str().unwrap_or(""),
            f(&v["first_2s_after_back_in_service"]),
            f(&v["restart_window_other_requests"])
        );
    }
    s += "\nWhere the restart time went (sums over batches, from the daemon's `restart step` log lines):\n\n";
    s += "| variant | batches | drain (Disable→Stop) | stop (Stop→Start) | start→healthy | warm-up | Enable→next batch |\n";
    s += "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    for v in r["variants"].as_array().into_iter().flatten() {
        let b = &v["breakdown_ms"];
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            v["label"].as_str().unwrap_or(""),
            v["batches"].as_array().map_or(0, Vec::len),
            ms(&b["drain"]),
            ms(&b["stop"]),
            ms(&b["start_to_healthy"]),
            ms(&b["warmup"]),
            ms(&b["enable_to_next"]),
        );
    }
    s += "\nGoals (reported, not enforced): zero failed requests; restart-window p99 within 1.5× steady p99 with warm-up; \
          total time within 1.1× the unavoidable waits (start-to-healthy + warm-up per batch).\n";
    for v in r["variants"].as_array().into_iter().flatten() {
        if let Some(f) = v["first_failures"].as_array().filter(|f| !f.is_empty()) {
            s += &format!(
                "\nFirst failures of {}: {}\n",
                v["label"].as_str().unwrap_or(""),
                f.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        if v["restart_exit_code"] != json!(0) {
            s += &format!(
                "\n`sluice restart` of {} exited {}: {}\n",
                v["label"].as_str().unwrap_or(""),
                v["restart_exit_code"],
                v["restart_stderr"].as_str().unwrap_or("")
            );
        }
    }
    s
}
