//! `bench/restart.sh`: what a restart of four instances one by one costs the clients, how long it
//! takes and what CPU the supervisor spends on it — for the Java app (`WarmApp`, with
//! `-Dsun.net.httpserver.nodelay=true` and with the JDK's default) and the Python app (gunicorn,
//! two sync workers), each under sluice with its defaults, with warm-up off, with CPU isolation off,
//! all at once, and under supervisord 4.3 behind nginx restarting one at a time with a /health wait.
//! Each run has fresh instances in a fresh host in the benchmark's network namespace under the
//! same steady load, with the steady state measured in the same run as the baseline.
//!
//! Usage: `restart_bench OUT_PREFIX` (writes `OUT_PREFIX.md` and `OUT_PREFIX.json`). Needs root,
//! a JDK, the test virtualenv's gunicorn, the release binaries (`SLUICE_BIN_DIR=target/release`),
//! nginx and supervisord 4.3 (`BENCH_SUPERVISOR_VENV`, made by `bench/restart.sh`).
//!
//! The load is the harness's client ([`sluice_tests::load`]): keep-alive connections that only the
//! server closes (a pool) and new connections, at a fixed rate, one stale keep-alive retry counted
//! apart; it also keeps when each request was issued and which instance answered it (the apps
//! name their instance in the body), so the restart window and each restarted instance's first
//! requests can be cut out of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::matrix::Nginx;
use sluice_tests::netns::Netns;
use sluice_tests::{Host, PATIENCE, Status, fixtures, require_root, run_bounded};

const SERVICE: &str = "app";
const FRONT_PORT: u16 = 9000;
const PORT_BASE: u16 = 9100;
const INSTANCES: usize = 4;
/// Upper bound of one run's load.
const LOAD_LIMIT: Duration = Duration::from_secs(300);
/// Upper bound of one `sluice restart` (four drains at the default 10 s timeout fit in it).
const RESTART_TIMEOUT: Duration = Duration::from_secs(240);
/// Upper bound of one `supervisorctl` call.
const SUPERVISORCTL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restarted instance may take to answer /health under supervisord.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between /health polls under supervisord (sluice's `health.interval_ms` default).
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
/// The window of a restarted instance's first client requests, seconds.
const FIRST_REQUESTS_S: f64 = 2.0;
/// How long supervisord gets to exit on SIGTERM before it is killed.
const SUPERVISORD_EXIT_GRACE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum App {
    JavaNodelay,
    JavaDefault,
    Python,
}

impl App {
    fn name(self) -> &'static str {
        match self {
            App::JavaNodelay => "java-nodelay",
            App::JavaDefault => "java-default",
            App::Python => "python",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            App::JavaNodelay => "Java `WarmApp`, `-Dsun.net.httpserver.nodelay=true`",
            App::JavaDefault => "Java `WarmApp`, the JDK's default `nodelay` (false)",
            App::Python => "Python `wsgi_app` under gunicorn, 2 sync workers (its default)",
        }
    }

    /// The instance's argv; `PORT` stands for its port.
    fn argv(self, classes: &Path, gunicorn: &Path) -> Vec<String> {
        match self {
            App::JavaNodelay | App::JavaDefault => {
                let mut v = vec![
                    fixtures::java().display().to_string(),
                    "-Xmx64m".into(),
                    "-XX:+UseSerialGC".into(),
                ];
                if self == App::JavaNodelay {
                    v.push("-Dsun.net.httpserver.nodelay=true".into());
                }
                v.extend([
                    "-cp".into(),
                    classes.display().to_string(),
                    "WarmApp".into(),
                    "PORT".into(),
                ]);
                v
            }
            App::Python => vec![
                gunicorn.display().to_string(),
                "--bind".into(),
                "127.0.0.1:PORT".into(),
                "--workers".into(),
                "2".into(),
                "--graceful-timeout".into(),
                "5".into(),
                "--chdir".into(),
                fixtures::dir().display().to_string(),
                "wsgi_app:app".into(),
            ],
        }
    }

    fn start_timeout_ms(self) -> u64 {
        if self == App::Python { 10_000 } else { 30_000 }
    }
}

#[derive(Debug, Clone)]
enum Variant {
    /// sluice with these extra `[restart]` lines and `[warmup]` or not.
    Sluice {
        label: &'static str,
        strategy: Option<&'static str>,
        warmup: bool,
        extra: String,
    },
    Supervisord,
}

impl Variant {
    fn label(&self) -> &'static str {
        match self {
            Variant::Sluice { label, .. } => label,
            Variant::Supervisord => "supervisord + nginx",
        }
    }
}

/// The `[restart]` line that turns CPU isolation of starting instances off
/// (`BENCH_CPU_ISOLATION_OFF`, default `restart.cpu_isolation = false`).
fn cpu_isolation_off() -> String {
    std::env::var("BENCH_CPU_ISOLATION_OFF").unwrap_or_else(|_| "cpu_isolation = false".into())
}

/// The host file's `cgroups` key for every sluice variant (`BENCH_CGROUPS`: `auto` or `off`;
/// default none: the build's default).
fn host_cgroups() -> Option<String> {
    std::env::var("BENCH_CGROUPS")
        .ok()
        .filter(|v| !v.is_empty())
}

/// `[warmup]` lines added to every sluice variant with warm-up (`BENCH_WARMUP_EXTRA`, default none).
fn warmup_extra() -> String {
    std::env::var("BENCH_WARMUP_EXTRA").unwrap_or_default()
}

/// `[health]` lines added to every sluice variant, e.g. `interval_ms = 50` (none by default).
fn health_extra() -> String {
    std::env::var("BENCH_HEALTH_EXTRA").unwrap_or_default()
}

fn variants() -> Vec<Variant> {
    let all = vec![
        Variant::Sluice {
            label: "sluice (defaults)",
            strategy: None,
            warmup: true,
            extra: String::new(),
        },
        Variant::Sluice {
            label: "sluice, warm-up off",
            strategy: None,
            warmup: false,
            extra: String::new(),
        },
        Variant::Sluice {
            label: "sluice, CPU isolation off",
            strategy: None,
            warmup: true,
            extra: cpu_isolation_off(),
        },
        Variant::Sluice {
            label: "sluice all-at-once",
            strategy: Some("all-at-once"),
            warmup: true,
            extra: String::new(),
        },
        Variant::Supervisord,
    ];
    // BENCH_VARIANTS: a comma-separated subset by position (1-5), for quicker partial runs.
    match std::env::var("BENCH_VARIANTS") {
        Ok(list) => list
            .split(',')
            .filter_map(|n| n.trim().parse::<usize>().ok())
            .filter_map(|n| all.get(n.wrapping_sub(1)).cloned())
            .collect(),
        Err(_) => all,
    }
}

fn apps() -> Vec<App> {
    let list =
        std::env::var("BENCH_APPS").unwrap_or_else(|_| "java-nodelay,java-default,python".into());
    list.split(',')
        .filter_map(|a| match a.trim() {
            "java-nodelay" => Some(App::JavaNodelay),
            "java-default" => Some(App::JavaDefault),
            "python" => Some(App::Python),
            _ => None,
        })
        .collect()
}

struct Settings {
    rate: u32,
    warm_in: Duration,
    steady: Duration,
    pool_connections: u32,
    new_connection_threads: u32,
}

fn main() {
    let out_prefix = std::env::args()
        .nth(1)
        .expect("usage: restart_bench OUT_PREFIX");
    if !require_root() {
        std::process::exit(1);
    }
    let env = sluice_tests::benchkit::env_u64;
    let settings = Settings {
        rate: env("BENCH_RATE", 300) as u32,
        warm_in: Duration::from_secs(env("BENCH_WARM_IN_SECONDS", 10)),
        steady: Duration::from_secs(env("BENCH_STEADY_SECONDS", 10)),
        pool_connections: env("BENCH_POOL_CONNECTIONS", 12) as u32,
        new_connection_threads: env("BENCH_NEW_CONNECTION_THREADS", 6) as u32,
    };
    let machine_before = sluice_tests::benchkit::machine(&[
        ("java", "java -version 2>&1 | head -1"),
        ("nginx", "/usr/sbin/nginx -v 2>&1"),
        ("uptime", "uptime"),
    ]);
    let classes_dir = tempfile::Builder::new()
        .prefix("sluice-bench-classes-")
        .tempdir()
        .expect("a temp dir");
    let Some(classes) = fixtures::java_app(classes_dir.path()) else {
        std::process::exit(1);
    };
    let Some(gunicorn) = fixtures::gunicorn() else {
        std::process::exit(1);
    };
    let ns = Netns::new();
    let mut results = Vec::new();
    // BENCH_REPEAT: runs of each cell. One run per cell is noise for the latency ratios (two
    // identical configurations once differed 2.3x); the report gives each run and the median.
    let repeat = env("BENCH_REPEAT", 1).clamp(1, 20);
    for app in apps() {
        for variant in variants() {
            for run in 1..=repeat {
                eprintln!(
                    "== {} / {} (run {run} of {repeat})",
                    app.name(),
                    variant.label()
                );
                let argv = app.argv(&classes, &gunicorn);
                let before = ns.listen_counters();
                let r = match &variant {
                    Variant::Sluice {
                        strategy,
                        warmup,
                        extra,
                        ..
                    } => run_sluice(&ns, app, &argv, *strategy, *warmup, extra, &settings),
                    Variant::Supervisord => run_supervisord(&ns, &argv, &settings),
                };
                let after = ns.listen_counters();
                let mut r = r.unwrap_or_else(|skipped| json!({ "skipped": skipped }));
                r["app"] = json!(app.name());
                r["app_description"] = json!(app.describe());
                r["label"] = json!(variant.label());
                r["run"] = json!(run);
                r["listen_queue_drops"] = json!(
                    after
                        .iter()
                        .map(|(k, v)| (
                            k.clone(),
                            v.saturating_sub(before.get(k).copied().unwrap_or(0))
                        ))
                        .collect::<BTreeMap<_, _>>()
                );
                eprintln!(
                    "{}",
                    serde_json::to_string(&r["summary"]).unwrap_or_default()
                );
                results.push(r);
            }
        }
    }
    let machine_after = sluice_tests::benchkit::machine(&[("uptime", "uptime")]);
    let report = json!({
        "benchmark": "restart",
        "machine": machine_before,
        "load_average_after": machine_after["load_average"],
        "uptime_after": machine_after["uptime"],
        "rate_per_s": settings.rate,
        "pool_connections": settings.pool_connections,
        "new_connection_threads": settings.new_connection_threads,
        "warm_in_s": settings.warm_in.as_secs(),
        "steady_window_s": settings.steady.as_secs(),
        "repeat": repeat,
        "warmup_extra": warmup_extra(),
        "health_extra": health_extra(),
        "host_cgroups": host_cgroups(),
        "runs": results,
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

// ---------------------------------------------------------------- sluice

fn toml_array(argv: &[String], port: &str) -> String {
    argv.iter()
        .map(|a| format!("{:?}", a.replace("PORT", port)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn sluice_service(
    app: App,
    argv: &[String],
    strategy: Option<&str>,
    warmup: bool,
    extra: &str,
) -> String {
    let strategy = strategy.map_or(String::new(), |s| format!("strategy = \"{s}\"\n"));
    // Only the request list: when to stop warming is sluice's default, unless
    // BENCH_WARMUP_EXTRA adds `[warmup]` lines (to compare settings).
    let warmup = if warmup {
        format!(
            "[warmup]\nrequests = [\"GET /item\", \"GET /other/path\"]\n{}\n",
            warmup_extra()
        )
    } else {
        String::new()
    };
    format!(
        r#"command = [{command}]
instances = {INSTANCES}
port_base = {PORT_BASE}
front_port = {FRONT_PORT}
stop_grace_ms = 8000
env = {{ INSTANCE = "{{instance}}" }}
[restart]
{strategy}{extra}
[health]
http = "/health"
start_timeout_ms = {start_timeout_ms}
{health_extra}
{warmup}"#,
        command = toml_array(argv, "{port}"),
        start_timeout_ms = app.start_timeout_ms(),
        health_extra = health_extra(),
    )
}

fn all_enabled(s: &Status) -> bool {
    let instances = s.instances(SERVICE);
    instances.len() == INSTANCES
        && instances
            .iter()
            .all(|i| i["state"] == "running" && i["enabled"] == true)
        && !s.restart_in_progress(SERVICE)
}

/// utime + stime of `pid` in seconds (`/proc/<pid>/stat` fields 14 and 15, at 100 ticks/s).
fn cpu_s(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn run_sluice(
    ns: &Netns,
    app: App,
    argv: &[String],
    strategy: Option<&str>,
    warmup: bool,
    extra: &str,
    settings: &Settings,
) -> Result<Value, String> {
    let h = Host::new().in_netns(ns);
    if let Some(mode) = host_cgroups() {
        h.add_host_keys(&format!("cgroups = \"{mode}\"\n"));
    }
    h.service(SERVICE, &sluice_service(app, argv, strategy, warmup, extra));
    let check = h.sluice(&["check-config"]);
    if check.code != Some(0) {
        return Err(format!(
            "this build refuses the service file: {}",
            check.stderr.trim()
        ));
    }
    h.start_daemon();
    h.wait_until(all_enabled, PATIENCE * 3);
    let load = TimedLoad::start(ns, FRONT_PORT, settings);
    std::thread::sleep(settings.warm_in + settings.steady);
    let daemon = h.daemon_pid().expect("the daemon runs");
    let cpu_before = cpu_s(daemon).unwrap_or(0.0);
    let call = Instant::now();
    let out = run_bounded(h.sluice_command(&["restart", SERVICE]), RESTART_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let returned = Instant::now();
    let daemon_cpu = cpu_s(daemon).unwrap_or(0.0) - cpu_before;
    let after = h.wait_until(all_enabled, PATIENCE * 3);
    // The shims started by the restart: their whole life is the restart and the second after.
    let shims_cpu: f64 = after
        .shim_pids(SERVICE)
        .into_iter()
        .flatten()
        .filter_map(cpu_s)
        .sum();
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap_or_default();
    drop(h);

    let steps = batches(&log);
    let wall = |ms: f64| (ms - samples.epoch_wall_ms) / 1000.0;
    // Each instance is back when its batch went back into service (Enable; for `all-at-once`,
    // the end of the restart).
    let mut back: BTreeMap<usize, f64> = BTreeMap::new();
    for b in &steps {
        if let Some(ms) = b["back_in_service_at_ms"].as_f64() {
            for i in b["indices"].as_array().into_iter().flatten() {
                if let Some(i) = i.as_u64() {
                    back.insert(i as usize, wall(ms));
                }
            }
        }
    }
    let unavoidable_ms: f64 = steps
        .iter()
        .map(|b| {
            b["stop_ms"].as_f64().unwrap_or(0.0)
                + b["start_to_healthy_ms"].as_f64().unwrap_or(0.0)
                + b["warmup_ms"].as_f64().unwrap_or(0.0)
        })
        .sum();
    let sum_of = |key: &str| -> f64 { steps.iter().map(|b| b[key].as_f64().unwrap_or(0.0)).sum() };
    let mut r = analyse(
        &samples,
        samples.rel(call),
        samples.rel(returned),
        &back,
        unavoidable_ms,
        settings,
    );
    r["restart_exit_code"] = json!(out.code);
    r["restart_stderr"] = json!(out.stderr.trim());
    r["supervisor_cpu_s"] = json!({
        "sluice_daemon_during_restart": round3(daemon_cpu),
        "new_shims_whole_life": round3(shims_cpu),
        "total": round3(daemon_cpu + shims_cpu),
    });
    r["breakdown_ms"] = json!({
        "drain": round3(sum_of("drain_ms")),
        "stop": round3(sum_of("stop_ms")),
        "start_to_healthy": round3(sum_of("start_to_healthy_ms")),
        "warmup": round3(sum_of("warmup_ms")),
        "enable_to_next": round3(sum_of("enable_to_next_ms")),
    });
    r["drain_endings"] = json!(sluice_tests::matrix::drain_endings(&log, SERVICE));
    r["batches"] = json!(steps);
    // Every step against the restart's start, to place the slowest requests.
    let call_s = samples.rel(call);
    let timeline: Vec<(f64, String, String)> = self::steps(&log)
        .into_iter()
        .map(|(ts, name, batch)| (wall(ts) - call_s, name, batch))
        .collect();
    r["step_timeline"] = json!(
        timeline
            .iter()
            .map(|(at, name, batch)| format!("{at:+.3} {name} [{batch}]"))
            .collect::<Vec<_>>()
    );
    r["slow_by_step"] = slow_by_step(
        &samples,
        call_s,
        samples.rel(returned),
        &timeline,
        (
            settings.steady.as_secs_f64(),
            r["steady"]["p99_ms"].as_f64(),
        ),
    );
    Ok(r)
}

// ---------------------------------------------------------------- supervisord + nginx

fn run_supervisord(ns: &Netns, argv: &[String], settings: &Settings) -> Result<Value, String> {
    let venv = std::env::var_os("BENCH_SUPERVISOR_VENV")
        .map(PathBuf::from)
        .ok_or("BENCH_SUPERVISOR_VENV is not set (bench/restart.sh sets it)")?;
    let (supervisord, supervisorctl) =
        (venv.join("bin/supervisord"), venv.join("bin/supervisorctl"));
    if !supervisord.exists() {
        return Err(format!("{} is missing", supervisord.display()));
    }
    let dir = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir()
        .expect("a temp dir");
    let d = dir.path();
    // supervisord has no port arithmetic; ports 9100..9103 are "910" followed by the process
    // number (0..3), through a shell that execs the app so supervisord signals the app itself.
    let command = argv
        .iter()
        .map(|a| shell_quote(&a.replace("PORT", "910%(process_num)d")))
        .collect::<Vec<_>>()
        .join(" ");
    let conf = format!(
        r#"[unix_http_server]
file={d}/supervisor.sock
[supervisord]
logfile={d}/supervisord.log
pidfile={d}/supervisord.pid
childlogdir={d}
nodaemon=true
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{d}/supervisor.sock
[program:app]
command=/bin/sh -c "exec {command}"
process_name=%(program_name)s_%(process_num)d
numprocs={INSTANCES}
environment=INSTANCE="%(process_num)d"
stopsignal=TERM
stopwaitsecs=8
stopasgroup=true
killasgroup=true
autorestart=true
stdout_logfile={d}/%(program_name)s_%(process_num)d.out
stderr_logfile={d}/%(program_name)s_%(process_num)d.err
"#,
        d = d.display()
    );
    let conf_path = d.join("supervisord.conf");
    std::fs::write(&conf_path, conf).expect("writing supervisord.conf");
    let mut cmd = ns.command(&supervisord);
    cmd.arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let sv = Supervisord {
        child: Some(cmd.spawn().expect("spawning supervisord")),
    };
    let ports: Vec<u16> = (0..INSTANCES as u16).map(|i| PORT_BASE + i).collect();
    for &port in &ports {
        wait_healthy(ns, port, HEALTH_TIMEOUT)
            .map_err(|e| format!("supervisord's app on {port}: {e}"))?;
    }
    let nginx = Nginx::start(ns, &d.join("nginx"), FRONT_PORT, &ports)
        .ok_or("nginx is missing (nginx-light)")?;
    let load = TimedLoad::start(ns, FRONT_PORT, settings);
    std::thread::sleep(settings.warm_in + settings.steady);
    let ctl = |args: &[&str]| -> Result<(), String> {
        let mut c = Command::new(&supervisorctl);
        c.arg("-c").arg(&conf_path).args(args);
        let out = run_bounded(c, SUPERVISORCTL_TIMEOUT)?;
        if out.code == Some(0) {
            Ok(())
        } else {
            Err(out.to_string())
        }
    };
    let sv_pid = sv.pid();
    let cpu_pids: Vec<i32> = std::iter::once(sv_pid).chain(nginx.pids()).collect();
    let cpu_before: f64 = cpu_pids.iter().filter_map(|p| cpu_s(*p)).sum();
    let call = Instant::now();
    let mut back = BTreeMap::new();
    let mut per_instance = Vec::new();
    let mut unavoidable_ms = 0.0;
    let mut error = None;
    for (i, &port) in ports.iter().enumerate() {
        let name = format!("app:app_{i}");
        let t0 = Instant::now();
        if let Err(e) = ctl(&["stop", &name]) {
            error = Some(e);
            break;
        }
        let t1 = Instant::now();
        if let Err(e) = ctl(&["start", &name]) {
            error = Some(e);
            break;
        }
        if let Err(e) = wait_healthy(ns, port, HEALTH_TIMEOUT) {
            error = Some(format!("{name}: {e}"));
            break;
        }
        let t2 = Instant::now();
        back.insert(i, samples_rel(&load, t2));
        let (stop_ms, start_ms) = (ms_between(t0, t1), ms_between(t1, t2));
        unavoidable_ms += stop_ms + start_ms;
        per_instance.push(json!({ "instance": i, "stop_ms": round3(stop_ms), "start_to_healthy_ms": round3(start_ms) }));
    }
    let returned = Instant::now();
    let cpu_after: f64 = cpu_pids.iter().filter_map(|p| cpu_s(*p)).sum();
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let nginx_log = nginx.log();
    drop(nginx);
    drop(sv);
    let mut r = analyse(
        &samples,
        samples.rel(call),
        samples.rel(returned),
        &back,
        unavoidable_ms,
        settings,
    );
    r["restart_exit_code"] = json!(if error.is_none() { 0 } else { 1 });
    r["restart_stderr"] = json!(error.unwrap_or_default());
    r["supervisor_cpu_s"] = json!({
        "supervisord_and_nginx_during_restart": round3(cpu_after - cpu_before),
        "total": round3(cpu_after - cpu_before),
    });
    r["batches"] = json!(per_instance);
    r["nginx"] = json!({
        "requests": nginx_log.requests,
        "resent_upstream": nginx_log.retried_upstream,
        "not_200": nginx_log.not_ok,
        "samples": nginx_log.samples,
    });
    Ok(r)
}

/// supervisord, stopped (SIGTERM, which stops its programs) and reaped on drop.
struct Supervisord {
    child: Option<Child>,
}

impl Supervisord {
    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + SUPERVISORD_EXIT_GRACE;
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/-_.=:%()".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    b.duration_since(a).as_secs_f64() * 1000.0
}

fn samples_rel(load: &TimedLoad, t: Instant) -> f64 {
    t.duration_since(load.epoch).as_secs_f64()
}

/// Polls `GET /health` on `127.0.0.1:port` inside `ns` until it answers 200.
fn wait_healthy(ns: &Netns, port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let name = ns.name.clone();
    sluice_tests::netns::run_in_named(&name, || {
        loop {
            let last = health_once(port);
            if last.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "/health did not answer 200 within {timeout:?}: {}",
                    last.err().unwrap_or_default()
                ));
            }
            std::thread::sleep(HEALTH_INTERVAL);
        }
    })
}

fn health_once(port: u16) -> Result<(), String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(|e| format!("read: {e}"))?;
    if &head[9..12] == b"200" {
        Ok(())
    } else {
        Err(format!("answer {:?}", String::from_utf8_lossy(&head)))
    }
}

// ---------------------------------------------------------------- analysis

/// The figures of one run from its samples: the steady window (before `call_s`), the restart
/// window (`call_s`..`ret_s`), the first [`FIRST_REQUESTS_S`] of requests answered by each
/// restarted instance after it was `back` (seconds after the load began), and the restart's total
/// against `unavoidable_ms`.
fn analyse(
    samples: &Samples,
    call_s: f64,
    ret_s: f64,
    back: &BTreeMap<usize, f64>,
    unavoidable_ms: f64,
    settings: &Settings,
) -> Value {
    let window = |from: f64, to: f64| -> Vec<&Sample> {
        samples
            .list
            .iter()
            .filter(|s| s.issued_s >= from && s.issued_s <= to)
            .collect()
    };
    let steady_stats = stats(&window(call_s - settings.steady.as_secs_f64(), call_s));
    let restart = window(call_s, ret_s);
    let restart_stats = stats(&restart);
    let after_stats = stats(&window(ret_s, f64::MAX));
    // For each restarted instance: from the first request it answered once back, 2 s of the
    // requests it answered.
    let mut first: Vec<&Sample> = Vec::new();
    for (&i, &b) in back {
        let mine = samples
            .list
            .iter()
            .filter(|s| s.served_by == Some(i) && s.issued_s >= b);
        let Some(t0) = mine.clone().next().map(|s| s.issued_s) else {
            continue;
        };
        first.extend(mine.take_while(|s| s.issued_s < t0 + FIRST_REQUESTS_S));
    }
    let first_stats = stats(&first);
    // The same ratio between the steady window and windows inside it, nothing restarting: how
    // far a window as long as the restart's (and one of 2 s, about as many requests as the
    // first-2 s figure holds) strays from the steady p99 by chance. A restart ratio inside
    // this range is no evidence of the restart.
    let steady_s = settings.steady.as_secs_f64();
    let steady_p99 = steady_stats["p99_ms"].as_f64().filter(|p| *p > 0.0);
    let noise = |len_s: f64| -> Value {
        let Some(whole) = steady_p99 else {
            return Value::Null;
        };
        if len_s <= 0.0 || len_s > steady_s {
            return Value::Null;
        }
        let mut ratios = Vec::new();
        let mut from = call_s - steady_s;
        while from + len_s <= call_s + 1e-9 {
            if let Some(p) = stats(&window(from, from + len_s))["p99_ms"].as_f64() {
                ratios.push(p / whole);
            }
            from += NOISE_STEP_S;
        }
        ratios.sort_by(f64::total_cmp);
        match (ratios.first(), ratios.last()) {
            (Some(lo), Some(hi)) => json!({
                "window_s": round3(len_s),
                "windows": ratios.len(),
                "min": round3(*lo),
                "median": round3(ratios[ratios.len() / 2]),
                "max": round3(*hi),
            }),
            _ => Value::Null,
        }
    };
    let ratio = |a: &Value, b: &Value, key: &str| -> Value {
        match (a[key].as_f64(), b[key].as_f64()) {
            (Some(x), Some(y)) if y > 0.0 => json!(round3(x / y)),
            _ => Value::Null,
        }
    };
    let total_ms = (ret_s - call_s) * 1000.0;
    // Where in the restart each failure happened: the first question about a rare one.
    let failures: Vec<String> = samples
        .list
        .iter()
        .filter_map(|s| {
            s.error.as_deref().map(|e| {
                format!(
                    "issued {:+.3} s after the restart began: {e}",
                    s.issued_s - call_s
                )
            })
        })
        .take(5)
        .collect();
    let all = stats(&samples.list.iter().collect::<Vec<_>>());
    // The tail of the restart window, one by one: which requests make its p99, and whose.
    let mut slowest: Vec<&Sample> = restart
        .iter()
        .copied()
        .filter(|s| s.error.is_none())
        .collect();
    slowest.sort_by_key(|s| std::cmp::Reverse(s.latency_us));
    let slowest: Vec<Value> = slowest
        .iter()
        .take(SLOWEST_LISTED)
        .map(|s| {
            json!({
                "at_s": round3(s.issued_s - call_s),
                "ms": s.latency_us as f64 / 1000.0,
                "over": if s.pool { "pool" } else { "new connection" },
                "stale_retry": s.stale,
                "served_by": s.served_by,
            })
        })
        .collect();
    let no_stale: Vec<&Sample> = restart.iter().copied().filter(|s| !s.stale).collect();
    json!({
        "slowest_in_restart_window": slowest,
        "restart_window_without_stale_retries": stats(&no_stale),
        "steady": steady_stats,
        "restart_window": restart_stats,
        "first_2s_of_each_restarted_instance": first_stats,
        "after_restart": after_stats,
        "whole_run": all,
        "p99_ratio_restart_to_steady": ratio(&restart_stats, &steady_stats, "p99_ms"),
        "p99_ratio_first_2s_to_steady": ratio(&first_stats, &steady_stats, "p99_ms"),
        "steady_noise": {
            "restart_length": noise(ret_s - call_s),
            "first_2s": noise(FIRST_REQUESTS_S),
        },
        "first_failures": failures,
        "total_ms": round3(total_ms),
        "unavoidable_ms": round3(unavoidable_ms),
        "total_to_unavoidable": if unavoidable_ms > 0.0 { json!(round3(total_ms / unavoidable_ms)) } else { Value::Null },
        "summary": {
            "failed": all["failed"],
            "stale_keepalive_retries": all["stale_keepalive_retries"],
            "p99_restart_over_steady": ratio(&restart_stats, &steady_stats, "p99_ms"),
            "p99_first_2s_over_steady": ratio(&first_stats, &steady_stats, "p99_ms"),
            "total_ms": round3(total_ms),
            "total_over_unavoidable": if unavoidable_ms > 0.0 { json!(round3(total_ms / unavoidable_ms)) } else { Value::Null },
        },
    })
}

/// Step between the steady window's sub-windows of the noise figures.
const NOISE_STEP_S: f64 = 0.5;

/// How many of the restart window's slowest requests the report lists.
const SLOWEST_LISTED: usize = 12;

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------- daemon log

/// The `restart step` lines of the service: (ms, action name, batch text).
fn steps(log: &str) -> Vec<(f64, String, String)> {
    let marker = format!("restart step service={SERVICE} action=");
    log.lines()
        .filter_map(|line| {
            let rest = line.split(&marker).nth(1)?;
            let ts = sluice_tests::benchkit::parse_ts(line.split_whitespace().next()?)?;
            let (name, args) = rest.split_once('(').unwrap_or((rest, ""));
            let batch = args.split(']').next().unwrap_or("").trim_start_matches('[');
            Some((ts, name.trim().to_owned(), batch.to_owned()))
        })
        .collect()
}

/// The instances of a `restart step` line's batch (`0,1` of `[0,1]`).
fn batch_indices(batch: &str) -> Vec<usize> {
    batch
        .split(',')
        .filter_map(|i| i.trim().parse().ok())
        .collect()
}

/// How many times the steady p99 a restart-window request must take to count as slow in
/// [`slow_by_step`]: the goal's ratio, so that the restart window meets the goal while under 1 %
/// of its requests are slow.
const SLOW_OVER_STEADY_P99: f64 = 1.2;

/// Every request of the restart window (`call_s`..`ret_s`, seconds after the load began) that
/// answered in over [`SLOW_OVER_STEADY_P99`] × the steady p99, counted by the step it was issued
/// in (the last `restart step` line before it, `timeline` in seconds after `call_s`), beside each
/// step's share of the time and of the requests; `slow_to_batch` counts those answered by an
/// instance of that step's own batch. Not only the slowest few: what the p99 is made of.
fn slow_by_step(
    samples: &Samples,
    call_s: f64,
    ret_s: f64,
    timeline: &[(f64, String, String)],
    (steady_s, steady_p99_ms): (f64, Option<f64>),
) -> Value {
    let Some(p99) = steady_p99_ms.filter(|p| *p > 0.0) else {
        return Value::Null;
    };
    let threshold_us = (p99 * SLOW_OVER_STEADY_P99 * 1000.0) as u64;
    // Spans: (step, batch members, from, to), in seconds after `call_s`; "before the first step"
    // covers the CLI's call until the daemon's first line.
    let end = ret_s - call_s;
    let mut spans: Vec<(String, Vec<usize>, f64, f64)> = Vec::new();
    let mut from = 0.0;
    let mut current = ("before the first step".to_owned(), Vec::new());
    for (at, name, batch) in timeline.iter().filter(|(at, ..)| *at < end) {
        spans.push((current.0.clone(), current.1.clone(), from, at.max(from)));
        current = (name.clone(), batch_indices(batch));
        from = at.max(from);
    }
    spans.push((current.0, current.1, from, end.max(from)));
    let mut by_step: BTreeMap<String, (f64, u64, u64, u64)> = BTreeMap::new();
    let (mut requests, mut slow) = (0u64, 0u64);
    for (name, members, from, to) in &spans {
        let entry = by_step.entry(name.clone()).or_default();
        entry.0 += to - from;
        for s in samples.list.iter().filter(|s| {
            s.error.is_none() && s.issued_s - call_s >= *from && s.issued_s - call_s < *to
        }) {
            entry.1 += 1;
            requests += 1;
            if s.latency_us > threshold_us {
                entry.2 += 1;
                slow += 1;
                if s.served_by.is_some_and(|i| members.contains(&i)) {
                    entry.3 += 1;
                }
            }
        }
    }
    // The same share in the steady window, for scale: by definition 1 % of it is over 1× its p99.
    let steady: Vec<&Sample> = samples
        .list
        .iter()
        .filter(|s| s.error.is_none() && s.issued_s < call_s && s.issued_s >= call_s - steady_s)
        .collect();
    let steady_slow = steady
        .iter()
        .filter(|s| s.latency_us > threshold_us)
        .count();
    json!({
        "threshold_ms": round3(threshold_us as f64 / 1000.0),
        "requests": requests,
        "slow": slow,
        "steady_requests": steady.len(),
        "steady_slow": steady_slow,
        "steps": by_step
            .iter()
            .map(|(step, (time_s, n, k, own))| json!({
                "step": step,
                "time_s": round3(*time_s),
                "requests": n,
                "slow": k,
                "slow_to_batch": own,
            }))
            .collect::<Vec<_>>(),
    })
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
        let indices = batch_indices(batch);
        out.push(json!({
            "batch": format!("[{batch}]"),
            "indices": indices,
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
    json!({
        "requests": list.len(),
        "ok": lat.len(),
        "failed": failed,
        "stale_keepalive_retries": stale,
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
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
    stale: bool,
    /// Sent over one of the pool's keep-alive connections (else over a new connection).
    pool: bool,
    /// The instance that answered (the second word of the apps' bodies).
    served_by: Option<usize>,
    error: Option<String>,
}

struct Samples {
    epoch: Instant,
    /// Wall clock (ms since the Unix epoch) at `epoch`, to place the daemon's log lines.
    epoch_wall_ms: f64,
    list: Vec<Sample>,
}

impl Samples {
    fn rel(&self, t: Instant) -> f64 {
        t.duration_since(self.epoch).as_secs_f64()
    }
}

struct TimedLoad {
    epoch: Instant,
    epoch_wall_ms: f64,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    samples: Arc<Mutex<Vec<Sample>>>,
}

fn served_by(body: &[u8]) -> Option<usize> {
    std::str::from_utf8(body)
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl TimedLoad {
    /// Half the rate over `pool_connections` keep-alive connections that only the server closes,
    /// half over `new_connection_threads` threads opening a connection per request.
    fn start(netns: &Netns, port: u16, settings: &Settings) -> TimedLoad {
        let epoch = Instant::now();
        let epoch_wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let deadline = epoch + LOAD_LIMIT;
        let half = f64::from(settings.rate.max(2)) / 2.0;
        let mut threads = Vec::new();
        let kinds = (0..settings.pool_connections.max(1))
            .map(|n| (true, n, settings.pool_connections.max(1)))
            .chain(
                (0..settings.new_connection_threads.max(1))
                    .map(|n| (false, n, settings.new_connection_threads.max(1))),
            );
        for (keepalive, n, of) in kinds {
            let interval = Duration::from_secs_f64(f64::from(of) / half);
            let ns_name = netns.name.clone();
            let (stop, samples) = (stop.clone(), samples.clone());
            threads.push(std::thread::spawn(move || {
                sluice_tests::netns::enter_named(&ns_name);
                let mut client = sluice_tests::load::Client::never_closing();
                // Spread the threads' phases over one interval.
                let mut next = Instant::now() + interval.mul_f64(f64::from(n) / f64::from(of));
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    let begun = Instant::now();
                    let result = if keepalive {
                        client.keepalive_request_body(port)
                    } else {
                        sluice_tests::load::one_shot_request_body(port).map(|b| (false, b))
                    };
                    let latency_us = begun.elapsed().as_micros() as u64;
                    let sample = match result {
                        Ok((stale, body)) => Sample {
                            issued_s: begun.duration_since(epoch).as_secs_f64(),
                            latency_us,
                            stale,
                            pool: keepalive,
                            served_by: served_by(&body),
                            error: None,
                        },
                        Err(e) => Sample {
                            issued_s: begun.duration_since(epoch).as_secs_f64(),
                            latency_us,
                            stale: false,
                            pool: keepalive,
                            served_by: None,
                            error: Some(e),
                        },
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

/// Outside text in the report (a CLI's stderr) is bounded to this many characters.
const MAX_QUOTED_CHARS: usize = 600;

fn clip(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_QUOTED_CHARS).collect();
    if out.len() < text.len() {
        out += &format!(" … ({} bytes in all)", text.len());
    }
    out
}

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
    s += "# Restart of 4 instances one by one under load (`bench/restart.sh`)\n\n";
    s += &format!(
        "Machine: {} CPUs ({}), {}, Linux {}, {}; {}; {}; {}; commit {} ({} changed files in the tree). \
         Machine use: {}. `uptime` at the start: `{}`; at the end: `{}`. \
         Absolute figures from a busy machine are noisy; the ratios compare figures of the same run.\n\n",
        m["cpus"].as_str().unwrap_or(""),
        m["cpu_model"].as_str().unwrap_or("").trim(),
        m["memory"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["os"].as_str().unwrap_or(""),
        m["date_utc"].as_str().unwrap_or(""),
        m["java"].as_str().unwrap_or(""),
        m["nginx"].as_str().unwrap_or(""),
        m["commit"].as_str().unwrap_or(""),
        m["dirty_tree"].as_str().unwrap_or(""),
        m["shared"].as_str().unwrap_or("not stated"),
        m["uptime"].as_str().unwrap_or("").trim(),
        r["uptime_after"].as_str().unwrap_or("").trim(),
    );
    s += &format!(
        "Each run: fresh instances in a fresh host in the benchmark's network namespace, {} req/s to front port {FRONT_PORT} \
         for the whole run, half over {} keep-alive connections that only the server closes (a pool), half over {} threads \
         opening a new connection per request; {} s of load to warm up, then the steady window ({} s), then the restart of \
         the 4 instances one by one (sluice: `sluice restart app`; supervisord: `supervisorctl stop`/`start` of each \
         instance, then `GET /health` every 200 ms until 200, then the next; nginx in front with `keepalive 32` and the four \
         instance ports as its upstream). Latencies are of requests *issued* in each window. \
         A stale retry is a request whose kept-alive connection was closed under it before any byte of an answer and \
         that the client resent once on a new connection (as nginx, browsers, Go and urllib3 do).\n\n",
        r["rate_per_s"],
        r["pool_connections"],
        r["new_connection_threads"],
        r["warm_in_s"],
        r["steady_window_s"]
    );
    match r["host_cgroups"].as_str() {
        Some(mode) => {
            s += &format!(
                "The sluice variants' host file sets `cgroups = \"{mode}\"` (`BENCH_CGROUPS`).\n\n"
            )
        }
        None => {
            s += "The sluice variants' host file leaves `cgroups` at the build's default (`auto` \
                  since 618d01a; `off` before it, when \"CPU isolation off\" was the defaults' \
                  configuration).\n\n"
        }
    }
    if let Some(extra) = r["warmup_extra"].as_str().filter(|e| !e.trim().is_empty()) {
        s += &format!(
            "The sluice variants with warm-up add to `[warmup]` (`BENCH_WARMUP_EXTRA`): `{}`.\n\n",
            extra.trim().replace('\n', "; ")
        );
    }
    if let Some(extra) = r["health_extra"].as_str().filter(|e| !e.trim().is_empty()) {
        s += &format!(
            "Every sluice variant adds to `[health]` (`BENCH_HEALTH_EXTRA`): `{}`.\n\n",
            extra.trim().replace('\n', "; ")
        );
    }
    s += "| app | variant | failed | stale retries | steady p50 / p99 | restart-window p99 | p99 restart ÷ steady | first 2 s per restarted instance p99 | ÷ steady | restart total | Σ(stop + start→healthy + warm-up) | total ÷ Σ | supervisor CPU |\n";
    s += "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    let repeat = r["repeat"].as_u64().unwrap_or(1);
    let run_label = |v: &Value| -> String {
        let label = v["label"].as_str().unwrap_or("");
        if repeat > 1 {
            format!("{label} #{}", v["run"])
        } else {
            label.to_owned()
        }
    };
    for v in r["runs"].as_array().into_iter().flatten() {
        let label = run_label(v);
        let app = v["app"].as_str().unwrap_or("");
        if let Some(why) = v["skipped"].as_str() {
            s += &format!("| {app} | {label} | not run: {why} |||||||||||\n");
            continue;
        }
        let all = &v["whole_run"];
        let st = &v["steady"];
        let rw = &v["restart_window"];
        let f2 = &v["first_2s_of_each_restarted_instance"];
        let exit = if v["restart_exit_code"] == json!(0) {
            String::new()
        } else {
            format!(" (restart failed, exit {})", v["restart_exit_code"])
        };
        s += &format!(
            "| {app} | {label}{exit} | {} of {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {:.2} s |\n",
            all["failed"],
            all["requests"],
            all["stale_keepalive_retries"],
            ms(&st["p50_ms"]),
            ms(&st["p99_ms"]),
            ms(&rw["p99_ms"]),
            ratio(&v["p99_ratio_restart_to_steady"]),
            ms(&f2["p99_ms"]),
            ratio(&v["p99_ratio_first_2s_to_steady"]),
            ms(&v["total_ms"]),
            ms(&v["unavoidable_ms"]),
            ratio(&v["total_to_unavoidable"]),
            v["supervisor_cpu_s"]["total"].as_f64().unwrap_or(0.0),
        );
    }
    let unreached: Vec<String> = r["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["skipped"].is_null())
        .filter(|v| v["first_2s_of_each_restarted_instance"]["requests"].as_u64() == Some(0))
        .map(|v| format!("{} / {}", v["app"].as_str().unwrap_or(""), run_label(v)))
        .collect();
    if !unreached.is_empty() {
        s += &format!(
            "\nNo first-2 s figure (–) for {}: no client request reached a restarted instance between its return and the end \
             of the load (1 s after the restart). For supervisord + nginx that is nginx's passive check: an upstream \
             that failed a request is left out for `fail_timeout` (10 s by default, `max_fails` 1).\n",
            unreached.join(", ")
        );
    }
    s += "\nThe same p99 ratio with nothing restarting: sub-windows of the steady window (every 0.5 s) against the whole \
          steady window. A restart ratio inside this range is not evidence of the restart.\n\n";
    s += "| app | variant | windows as long as the restart: p99 ÷ steady, median (min–max) | 2 s windows: median (min–max) |\n";
    s += "| --- | --- | ---: | ---: |\n";
    let spread = |n: &Value| -> String {
        match (n["median"].as_f64(), n["min"].as_f64(), n["max"].as_f64()) {
            (Some(m), Some(lo), Some(hi)) => {
                format!("{m:.2}× ({lo:.2}–{hi:.2}, {} windows)", n["windows"])
            }
            _ => "–".into(),
        }
    };
    for v in r["runs"].as_array().into_iter().flatten() {
        if v["skipped"].is_string() {
            continue;
        }
        s += &format!(
            "| {} | {} | {} | {} |\n",
            v["app"].as_str().unwrap_or(""),
            run_label(v),
            spread(&v["steady_noise"]["restart_length"]),
            spread(&v["steady_noise"]["first_2s"]),
        );
    }
    s += "\nWhere sluice's restart time went (sums over batches, from the daemon's `restart step` log lines), and how each drain ended:\n\n";
    s += "| app | variant | drain (Disable→Stop) | stop (Stop→Start) | start→healthy | warm-up | Enable→next batch | drain endings |\n";
    s += "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |\n";
    for v in r["runs"].as_array().into_iter().flatten() {
        let b = &v["breakdown_ms"];
        if b.is_null() {
            continue;
        }
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            v["app"].as_str().unwrap_or(""),
            run_label(v),
            ms(&b["drain"]),
            ms(&b["stop"]),
            ms(&b["start_to_healthy"]),
            ms(&b["warmup"]),
            ms(&b["enable_to_next"]),
            v["drain_endings"]
                .as_array()
                .filter(|e| !e.is_empty())
                .map_or("not recorded by this build".into(), |e| e
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")),
        );
    }
    s += &slow_steps_table(r);
    if repeat > 1 {
        s += &medians(r);
    }
    s += "\nSupervisor CPU: sluice = the daemon's CPU from the `sluice restart` call to its return plus the whole life of the \
          shims the restart started (the old shims' last moments are not counted); supervisord = supervisord's and nginx's \
          CPU over the same span (the `supervisorctl` processes are not counted).\n";
    s += "\nGoals (issue 7, reported, not enforced): 0 failed requests; restart-window p99 ÷ steady p99 ≤ 1.2; \
          first-2 s p99 ÷ steady p99 ≤ 1.2; restart total ÷ Σ(stop + start→healthy + warm-up) ≤ 1.1.\n";
    for v in r["runs"].as_array().into_iter().flatten() {
        let label = format!("{} / {}", v["app"].as_str().unwrap_or(""), run_label(v));
        if let Some(drops) = v["listen_queue_drops"]
            .as_object()
            .filter(|d| d.values().any(|n| n.as_u64() > Some(0)))
        {
            s += &format!(
                "\nListen-queue drops in {label}: {}\n",
                drops
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(list) = v["slowest_in_restart_window"]
            .as_array()
            .filter(|l| !l.is_empty())
        {
            s += &format!(
                "\nSlowest requests of the restart window of {label} (p99 without stale retries {}): {}\n",
                ms(&v["restart_window_without_stale_retries"]["p99_ms"]),
                list.iter()
                    .map(|x| format!(
                        "{:+.3} s {} ms {}{}{}",
                        x["at_s"].as_f64().unwrap_or(0.0),
                        x["ms"],
                        x["over"].as_str().unwrap_or(""),
                        if x["stale_retry"] == json!(true) {
                            " (stale retry)"
                        } else {
                            ""
                        },
                        x["served_by"]
                            .as_u64()
                            .map_or(String::new(), |i| format!(" → {i}")),
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if let Some(t) = v["step_timeline"].as_array() {
                s += &format!(
                    "(its steps: {})\n",
                    t.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        if let Some(f) = v["first_failures"].as_array().filter(|f| !f.is_empty()) {
            s += &format!(
                "\nFirst failures of {label}: {}\n",
                f.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        if !v["restart_exit_code"].is_null() && v["restart_exit_code"] != json!(0) {
            s += &format!(
                "\nThe restart of {label} failed: {}\n",
                clip(v["restart_stderr"].as_str().unwrap_or(""))
            );
        }
    }
    s
}

/// The report's table of [`slow_by_step`], every run of a cell summed: which step's requests
/// make the restart window's tail, against the step's share of the time.
fn slow_steps_table(r: &Value) -> String {
    let runs: Vec<&Value> = r["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["slow_by_step"].is_object())
        .collect();
    if runs.is_empty() {
        return String::new();
    }
    /// One cell's runs summed: per step (time s, requests, slow, slow to the batch), the runs,
    /// and the steady window's (requests, of them slow).
    struct Cell {
        key: (String, String),
        steps: BTreeMap<String, [f64; 4]>,
        runs: usize,
        steady: (f64, f64),
    }
    let mut cells: Vec<Cell> = Vec::new();
    for v in &runs {
        let key = (
            v["app"].as_str().unwrap_or("").to_owned(),
            v["label"].as_str().unwrap_or("").to_owned(),
        );
        let at = match cells.iter().position(|c| c.key == key) {
            Some(at) => at,
            None => {
                cells.push(Cell {
                    key,
                    steps: BTreeMap::new(),
                    runs: 0,
                    steady: (0.0, 0.0),
                });
                cells.len() - 1
            }
        };
        let cell = &mut cells[at];
        let table = &v["slow_by_step"];
        cell.runs += 1;
        cell.steady.0 += table["steady_requests"].as_f64().unwrap_or(0.0);
        cell.steady.1 += table["steady_slow"].as_f64().unwrap_or(0.0);
        for step in table["steps"].as_array().into_iter().flatten() {
            let sum = cell
                .steps
                .entry(step["step"].as_str().unwrap_or("").to_owned())
                .or_default();
            for (slot, key) in ["time_s", "requests", "slow", "slow_to_batch"]
                .iter()
                .enumerate()
            {
                sum[slot] += step[*key].as_f64().unwrap_or(0.0);
            }
        }
    }
    let mut s = format!(
        "\nWhat the restart window's tail is made of: every request issued in it that took over \
         {SLOW_OVER_STEADY_P99}× its run's steady p99, by the step it was issued in (the last \
         `restart step` line before it), all runs of a cell summed; \"to the batch\" counts those \
         answered by an instance of that step's own batch. The restart window meets the p99 goal \
         while under 1 % of its requests are slow; the steady window's share is the same count \
         against the same threshold:\n\n"
    );
    s += "| app | variant | runs | step | share of the time | share of the requests | slow requests | of them to the batch |\n";
    s += "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |\n";
    for cell in &cells {
        let ((app, label), steps, n) = (&cell.key, &cell.steps, cell.runs);
        let time: f64 = steps.values().map(|x| x[0]).sum();
        let requests: f64 = steps.values().map(|x| x[1]).sum();
        let slow: f64 = steps.values().map(|x| x[2]).sum();
        let (steady, steady_slow) = cell.steady;
        s += &format!(
            "| {app} | {label} | {n} | **whole restart window** (steady window) | 100 % | 100 % | \
             {slow:.0} of {requests:.0}, {:.2} % ({steady_slow:.0} of {steady:.0}, {:.2} %) | |\n",
            100.0 * slow / requests.max(1.0),
            100.0 * steady_slow / steady.max(1.0),
        );
        // A step no request was issued in (the instant before the first line, `Finished`) is left out.
        for (step, [t, req, slow, own]) in steps.iter().filter(|(_, x)| x[1] > 0.0) {
            s += &format!(
                "| {app} | {label} | {n} | {step} | {:.0} % | {:.0} % | {slow:.0} | {own:.0} |\n",
                100.0 * t / time.max(f64::MIN_POSITIVE),
                100.0 * req / requests.max(1.0),
            );
        }
    }
    s
}

/// Median, minimum and maximum over the runs of each cell, for the figures the goals are about.
fn medians(r: &Value) -> String {
    let runs: Vec<&Value> = r["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["skipped"].is_null())
        .collect();
    let mut cells: Vec<(String, String)> = Vec::new();
    for v in &runs {
        let cell = (
            v["app"].as_str().unwrap_or("").to_owned(),
            v["label"].as_str().unwrap_or("").to_owned(),
        );
        if !cells.contains(&cell) {
            cells.push(cell);
        }
    }
    let figure = |list: &[&Value], pick: &dyn Fn(&Value) -> Option<f64>| -> String {
        let mut xs: Vec<f64> = list.iter().filter_map(|v| pick(v)).collect();
        if xs.is_empty() {
            return "-".into();
        }
        xs.sort_by(f64::total_cmp);
        let median = if xs.len() % 2 == 1 {
            xs[xs.len() / 2]
        } else {
            (xs[xs.len() / 2 - 1] + xs[xs.len() / 2]) / 2.0
        };
        format!("{median:.2} ({:.2}–{:.2})", xs[0], xs[xs.len() - 1])
    };
    let mut s = format!(
        "\nMedian (min–max) over {} runs of each cell:\n\n",
        r["repeat"]
    );
    s += "| app | variant | failed | p99 restart ÷ steady | first 2 s ÷ steady | total ÷ Σ | restart total s |\n";
    s += "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n";
    for (app, label) in cells {
        let list: Vec<&Value> = runs
            .iter()
            .copied()
            .filter(|v| v["app"] == json!(app) && v["label"] == json!(label))
            .collect();
        s += &format!(
            "| {app} | {label} | {} | {} | {} | {} | {} |\n",
            figure(&list, &|v| v["whole_run"]["failed"].as_f64()),
            figure(&list, &|v| v["p99_ratio_restart_to_steady"].as_f64()),
            figure(&list, &|v| v["p99_ratio_first_2s_to_steady"].as_f64()),
            figure(&list, &|v| v["total_to_unavoidable"].as_f64()),
            figure(&list, &|v| v["total_ms"].as_f64().map(|ms| ms / 1000.0)),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(issued_s: f64, ms: f64, served_by: usize) -> Sample {
        Sample {
            issued_s,
            latency_us: (ms * 1000.0) as u64,
            stale: false,
            pool: false,
            served_by: Some(served_by),
            error: None,
        }
    }

    /// Requests are placed in the step they were issued in, slow ones counted against 1.2× the
    /// steady p99 (1 ms here), those answered by the step's own batch apart; the steady window's
    /// share is counted over the same threshold.
    #[test]
    fn slow_requests_are_counted_by_the_step_they_were_issued_in() {
        let samples = Samples {
            epoch: Instant::now(),
            epoch_wall_ms: 0.0,
            list: vec![
                sample(9.5, 1.3, 0),   // steady, slow
                sample(9.6, 0.5, 1),   // steady
                sample(10.05, 3.0, 2), // Stop [0]: slow, another instance
                sample(10.10, 0.9, 1), // Stop [0]: not over 1.2 ms
                sample(10.30, 2.0, 0), // Enable [0]: slow, its own batch
                sample(10.40, 5.0, 3), // after the restart returned: not counted
            ],
        };
        let timeline = vec![
            (0.0, "Stop".to_owned(), "0".to_owned()),
            (0.2, "Enable".to_owned(), "0".to_owned()),
        ];
        let v = slow_by_step(&samples, 10.0, 10.35, &timeline, (1.0, Some(1.0)));
        assert_eq!(v["threshold_ms"], json!(1.2));
        assert_eq!(
            (v["requests"].as_u64(), v["slow"].as_u64()),
            (Some(3), Some(2))
        );
        assert_eq!(
            (v["steady_requests"].as_u64(), v["steady_slow"].as_u64()),
            (Some(2), Some(1))
        );
        let step = |name: &str| {
            v["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["step"] == json!(name))
                .cloned()
                .unwrap()
        };
        assert_eq!(step("Stop")["requests"], json!(2));
        assert_eq!(step("Stop")["slow"], json!(1));
        assert_eq!(step("Stop")["slow_to_batch"], json!(0));
        assert_eq!(step("Enable")["slow"], json!(1));
        assert_eq!(step("Enable")["slow_to_batch"], json!(1));
        assert_eq!(step("Enable")["time_s"], json!(0.15));
        // No steady p99, no table.
        assert!(slow_by_step(&samples, 10.0, 10.35, &timeline, (1.0, None)).is_null());
    }
}
