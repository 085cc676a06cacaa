//! Zero-downtime restarts, for real: each test makes its own network namespace with its own
//! iptables, runs the daemon there with real Java and Python services behind a front port, puts a
//! bounded load on the front port (half new connections, half keep-alive), and restarts.

use std::time::Duration;

use sluice_tests::load::{Load, Report};
use sluice_tests::netns::Netns;
use sluice_tests::{Host, PATIENCE, Status, fixtures, require_root};

/// Requests per second on each front port (two services: about 200 in all).
const RATE: u32 = 100;
/// Upper bound of any load in these tests.
const LOAD_LIMIT: Duration = Duration::from_secs(180);
/// How long a restart of four instances of a JVM may take on a loaded 2-core machine.
const RESTART_PATIENCE: Duration = Duration::from_secs(120);

fn java_service(classes: &std::path::Path, port_base: u16, front: u16, extra: &str) -> String {
    format!(
        r#"command = ["{java}", "-Xmx64m", "-XX:+UseSerialGC", "-cp", "{classes}", "WarmApp", "{{port}}"]
instances = 4
port_base = {port_base}
front_port = {front}
stop_grace_ms = 5000
env = {{ INSTANCE = "{{instance}}"{extra} }}
[restart]
strategy = "drain"
drain_timeout_ms = 3000
[health]
http = "/health"
start_timeout_ms = 30000
[warmup]
requests = ["GET /item", "GET /other/path"]
until_stable_pct = 25
window = 20
max_duration_ms = 5000
concurrency = 2
"#,
        java = fixtures::java().display(),
        classes = classes.display(),
    )
}

fn python_service(
    gunicorn: &std::path::Path,
    port_base: u16,
    front: u16,
    strategy: &str,
    extra: &str,
) -> String {
    format!(
        r#"command = ["{gunicorn}", "--bind", "127.0.0.1:{{port}}", "--workers", "1", "--worker-class", "gthread", "--threads", "4", "--keep-alive", "5", "--graceful-timeout", "5", "--chdir", "{fixtures}", "wsgi_app:app"]
instances = 4
port_base = {port_base}
front_port = {front}
stop_grace_ms = 6000
env = {{ INSTANCE = "{{instance}}"{extra} }}
[restart]
strategy = "{strategy}"
drain_timeout_ms = 3000
[health]
http = "/health"
start_timeout_ms = 3000
[warmup]
requests = ["GET /item"]
count = 20
"#,
        gunicorn = gunicorn.display(),
        fixtures = fixtures::dir().display(),
    )
}

/// Every instance of `service` runs, is healthy and gets traffic, and no restart is in progress.
fn all_enabled(s: &Status, service: &str) -> bool {
    let instances = s.instances(service);
    instances.len() == 4
        && instances
            .iter()
            .all(|i| i["state"] == "running" && i["enabled"] == true)
        && !s.restart_in_progress(service)
}

#[test]
fn drain_restarts_of_java_and_python_lose_no_request() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let h = Host::new().in_netns(&ns);
    let Some(classes) = fixtures::java_app(&h.path("classes")) else {
        return;
    };
    let Some(gunicorn) = fixtures::gunicorn() else {
        return;
    };
    h.service("java", &java_service(&classes, 9100, 9000, ""));
    h.service("py", &python_service(&gunicorn, 9200, 9001, "drain", ""));
    h.start_daemon();
    h.wait_until(
        |s| all_enabled(s, "java") && all_enabled(s, "py"),
        PATIENCE * 3,
    );

    let java_load = Load::start(&ns, 9000, RATE, LOAD_LIMIT);
    let py_load = Load::start(&ns, 9001, RATE, LOAD_LIMIT);
    std::thread::sleep(Duration::from_millis(500));
    std::thread::scope(|scope| {
        for service in ["java", "py"] {
            let h = &h;
            scope.spawn(move || {
                for round in 0..2 {
                    let out = h.sluice(&["restart", service]);
                    assert_eq!(out.code, Some(0), "restart {round} of {service}: {out}");
                }
            });
        }
    });
    let status = h.wait_until(|s| all_enabled(s, "java") && all_enabled(s, "py"), PATIENCE);
    std::thread::sleep(Duration::from_millis(500));
    let java = java_load.finish();
    let py = py_load.finish();
    println!(
        "java: {} ok, {} stale keep-alive retries, p50 {} us, p99 {} us; py: {} ok, {} stale retries",
        java.ok,
        java.stale_retries,
        java.percentile_us(0.5),
        java.percentile_us(0.99),
        py.ok,
        py.stale_retries
    );
    sluice_tests::load::assert_no_failures("java", &java, 200);
    sluice_tests::load::assert_no_failures("py", &py, 200);

    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap();
    assert_eq!(
        sluice_tests::stops_after_drain(&log, "java"),
        8,
        "4 instances, restarted twice"
    );
    assert_eq!(
        sluice_tests::stops_after_drain(&log, "py"),
        8,
        "4 instances, restarted twice"
    );
    for i in status.instances("java") {
        let warmup = &i["warmup"];
        assert!(
            warmup["requests"].as_u64().unwrap_or(0) > 0,
            "warm-up figures in status: {i}"
        );
        assert!(warmup["first_window"]["p50_us"].as_u64().is_some(), "{i}");
        assert!(warmup["last_window"]["p50_us"].as_u64().is_some(), "{i}");
    }
}

/// A host in its own namespace serving the Python app (4 instances, front port 9001) with
/// `strategy`, every instance in steering, and a load running on the front port. Fields drop in
/// order: the load, the host (its daemon and instances), then the namespace.
struct PyHost {
    load: Option<Load>,
    h: Host,
    ns: Netns,
    gunicorn: std::path::PathBuf,
    /// The status once every instance was in steering, before the load began.
    before: Status,
}

impl PyHost {
    /// `None` when the test must skip (not root, no gunicorn, outside CI).
    fn start(strategy: &str) -> Option<PyHost> {
        if !require_root() {
            return None;
        }
        let ns = Netns::new();
        let h = Host::new().in_netns(&ns);
        let gunicorn = fixtures::gunicorn()?;
        h.service("py", &python_service(&gunicorn, 9200, 9001, strategy, ""));
        h.start_daemon();
        let before = h.wait_until(|s| all_enabled(s, "py"), PATIENCE * 2);
        let load = Load::start(&ns, 9001, RATE, LOAD_LIMIT);
        std::thread::sleep(Duration::from_millis(500));
        Some(PyHost {
            load: Some(load),
            h,
            ns,
            gunicorn,
            before,
        })
    }

    /// Waits until every instance is back in steering, then ends the load and returns its report.
    fn finish_load(&mut self, patience: Duration) -> (Status, Report) {
        let status = self.h.wait_until(|s| all_enabled(s, "py"), patience);
        std::thread::sleep(Duration::from_millis(300));
        let report = self.load.take().expect("the load runs").finish();
        (status, report)
    }
}

#[test]
fn all_at_once_shows_the_failures_the_load_would_see() {
    let Some(mut py) = PyHost::start("all-at-once") else {
        return;
    };
    py.h.sluice(&["restart", "py"]).success();
    let (_, report) = py.finish_load(PATIENCE);
    println!(
        "all-at-once: {} ok, {} failed: {:?}",
        report.ok,
        report.failed,
        report.failures.first()
    );
    assert!(
        report.failed > 0,
        "stopping every instance at once must fail requests; {} succeeded",
        report.ok
    );
}

#[test]
fn a_batch_that_fails_its_health_check_is_rolled_back() {
    let Some(mut py) = PyHost::start("drain") else {
        return;
    };
    // A new "build" whose health check fails: the reload restarts with it, batch by batch.
    let broken = python_service(&py.gunicorn, 9200, 9001, "drain", ", BROKEN = \"1\"");
    py.h.service("py", &broken);
    py.h.sluice(&["reload"]).success();
    py.h.wait_until(
        |s| !s.service("py")["last_restart_error"].is_null(),
        RESTART_PATIENCE,
    );
    let (after, report) = py.finish_load(PATIENCE);
    sluice_tests::load::assert_no_failures("rollback", &report, 100);
    let before = &py.before;

    let error = after.service("py")["last_restart_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("instance 0")
            && error.contains("status 500")
            && error.contains("rolled back"),
        "the status says which instance failed and why: {error}"
    );
    // The first batch went and came back; the others were never stopped.
    assert_ne!(after.pid("py", 0), before.pid("py", 0));
    for i in 1..4 {
        assert_eq!(
            after.pid("py", i),
            before.pid("py", i),
            "py/{i} was never stopped"
        );
    }
    // The rolled-back instance runs the previous configuration: it answers its health check.
    assert_eq!(after.instance("py", 0)["healthy"], true);
}

#[test]
fn a_restart_interrupted_by_kill_9_finishes_with_every_instance_enabled() {
    let Some(mut py) = PyHost::start("drain") else {
        return;
    };
    let h = &py.h;
    let mut restart = h.sluice_command(&["restart", "py"]);
    restart
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut restart = restart.spawn().expect("sluice restart runs");
    // In the middle of a batch: the second batch is out of steering.
    h.wait_until(
        |s| {
            let r = &s.service("py")["restart"];
            r["batch"] == serde_json::json!([1]) && r["step"] != "draining"
        },
        RESTART_PATIENCE,
    );
    h.kill9_daemon();
    let _ = restart.wait();
    h.start_daemon();
    let (after, report) = py.finish_load(RESTART_PATIENCE);
    sluice_tests::load::assert_no_failures("kill -9 mid-batch", &report, 100);
    let before = &py.before;
    assert!(
        after.service("py")["last_restart_error"].is_null(),
        "{after}"
    );
    for i in 0..4 {
        assert_ne!(
            after.pid("py", i),
            before.pid("py", i),
            "py/{i} was restarted"
        );
    }
    let rules = py.ns.nat_rules(false);
    assert_eq!(
        rules.matches("-j REDIRECT").count(),
        4,
        "every instance is back in the chain:\n{rules}"
    );
}

#[test]
fn rules_of_other_owners_are_never_touched_nft() {
    rules_of_other_owners_are_never_touched("nft");
}

#[test]
fn rules_of_other_owners_are_never_touched_legacy() {
    rules_of_other_owners_are_never_touched("legacy");
}

/// Another owner's chain and jump rules (IPv4 and IPv6) are byte-identical while sluice steers and
/// restarts a service, and after `sluice cleanup`, with the `variant` iptables implementation; the
/// chain is rewritten by every restart step without duplicating a rule.
fn rules_of_other_owners_are_never_touched(variant: &str) {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let foreign: [&[&str]; 4] = [
        &["-t", "nat", "-N", "OTHER"],
        &["-t", "nat", "-A", "OTHER", "-p", "tcp", "-j", "RETURN"],
        &[
            "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "8080", "-j", "OTHER",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "8081",
            "-j",
            "OTHER",
        ],
    ];
    for family in ["iptables", "ip6tables"] {
        for rule in foreign {
            ns.run(&format!("{family}-{variant}"), rule);
        }
    }
    let save = |v6: bool| ns.nat_rules_with(variant, v6);
    let before = (save(false), save(true));
    let h = Host::new().in_netns(&ns);
    let host_file = std::fs::read_to_string(h.host_file()).unwrap();
    h.write_host_file(&format!("{host_file}iptables = \"{variant}\"\n"));
    h.service(
        "web",
        r#"command = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
instances = 2
port_base = 9300
front_port = 9003
[health]
tcp = true
"#,
    );
    h.start_daemon();
    h.wait_until(
        |s| s.instances("web").iter().all(|i| i["enabled"] == true),
        PATIENCE,
    );
    h.sluice(&["restart", "web"]).success();
    h.wait_until(
        |s| s.instances("web").iter().all(|i| i["enabled"] == true),
        PATIENCE,
    );
    let others = |rules: &str| -> String {
        rules
            .lines()
            .filter(|l| !l.contains("SLUICE") && !l.contains("sluice"))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let during = (save(false), save(true));
    for (family, rules) in [("IPv4", &during.0), ("IPv6", &during.1)] {
        assert!(
            rules.contains(":SLUICE-web"),
            "{family} is steered:\n{rules}"
        );
        assert_eq!(
            rules.matches("-j REDIRECT").count(),
            2,
            "{family}: one rule per instance after rewrites:\n{rules}"
        );
    }
    assert_eq!(others(&during.0), before.0, "IPv4 rules of others changed");
    assert_eq!(others(&during.1), before.1, "IPv6 rules of others changed");
    h.sluice(&["shutdown"]).success();
    h.wait_daemon_exit(PATIENCE);
    h.sluice(&["cleanup"]).success();
    assert_eq!(
        save(false),
        before.0,
        "after cleanup, IPv4 is byte-identical"
    );
    assert_eq!(
        save(true),
        before.1,
        "after cleanup, IPv6 is byte-identical"
    );
}
