//! Warm-ups against servers as users run them, in a network namespace of the test's own under a
//! bounded load: gunicorn's sync worker (`Connection: close` on every response) restarted with the
//! default sibling warm-up, and a rollback whose warm-up of the old version fails too, which must
//! still put the healthy old version back into steering.

use std::time::Duration;

use sluice_tests::load::Load;
use sluice_tests::netns::Netns;
use sluice_tests::{Host, PATIENCE, Status, fixtures, require_root};

/// Requests per second on the front port.
const RATE: u32 = 100;
/// Upper bound of any load in these tests.
const LOAD_LIMIT: Duration = Duration::from_secs(180);
/// How long a restart of four gunicorn instances may take on a loaded 2-core machine.
const RESTART_PATIENCE: Duration = Duration::from_secs(120);

/// The WSGI fixture under gunicorn with `worker_args`, 4 instances behind front port 9001, a drain
/// restart, and `warmup` as the `[warmup]` table.
fn python_service(
    gunicorn: &std::path::Path,
    worker_args: &str,
    extra_env: &str,
    warmup: &str,
) -> String {
    format!(
        r#"command = ["{gunicorn}", "--bind", "127.0.0.1:{{port}}", {worker_args}, "--graceful-timeout", "5", "--chdir", "{fixtures}", "wsgi_app:app"]
instances = 4
port_base = 9200
front_port = 9001
stop_grace_ms = 6000
env = {{ INSTANCE = "{{instance}}"{extra_env} }}
[restart]
strategy = "drain"
drain_timeout_ms = 3000
[health]
http = "/health"
start_timeout_ms = 5000
[warmup]
{warmup}
"#,
        gunicorn = gunicorn.display(),
        fixtures = fixtures::dir().display(),
    )
}

/// Every instance of `py` runs, is healthy and in steering, and no restart is in progress.
fn all_enabled(s: &Status) -> bool {
    let instances = s.instances("py");
    instances.len() == 4
        && instances
            .iter()
            .all(|i| i["state"] == "running" && i["enabled"] == true && i["healthy"] == true)
        && !s.restart_in_progress("py")
}

/// The chain of `py` steers to all four instance ports.
fn assert_chain_of_four(ns: &Netns) {
    let rules = ns.nat_rules(false);
    assert_eq!(
        rules.matches("-j REDIRECT").count(),
        4,
        "every instance is in the chain:\n{rules}"
    );
}

/// Regression test for issue 7: gunicorn's sync worker answers every request with
/// `Connection: close`; the warm-up used to send its second request on the closed connection and
/// fail the restart. With the default warm-up (as fast as a serving sibling) a drain restart of
/// all four succeeds and leaves them in steering, losing no request.
#[test]
fn gunicorn_sync_workers_restart_with_warm_up() {
    if !require_root() {
        return;
    }
    let Some(gunicorn) = fixtures::gunicorn() else {
        return;
    };
    let ns = Netns::new();
    let h = Host::new().in_netns(&ns);
    h.service(
        "py",
        &python_service(
            &gunicorn,
            r#""--workers", "2", "--worker-class", "sync""#,
            "",
            "requests = [\"GET /item\", \"GET /other\"]\nmax_duration_ms = 10000",
        ),
    );
    h.start_daemon();
    let before = h.wait_until(all_enabled, PATIENCE * 2);
    let load = Load::start(&ns, 9001, RATE, LOAD_LIMIT);
    std::thread::sleep(Duration::from_millis(500));
    let out = h.sluice(&["restart", "py"]);
    assert_eq!(out.code, Some(0), "the restart succeeds: {out}");
    println!("restart of 4 gunicorn sync instances: {:?}", out.elapsed);
    let after = h.wait_until(all_enabled, PATIENCE);
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    sluice_tests::load::assert_no_failures("gunicorn sync", &report, 100);
    assert_chain_of_four(&ns);
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
        let warmup = &after.instance("py", i)["warmup"];
        println!(
            "py/{i}: warm-up {} requests in {} ms, ended by {}; p90 sibling {} us, first window {} \
             us, last window {} us",
            warmup["requests"],
            warmup["duration_ms"],
            warmup["ending"],
            warmup["sibling"]["window"]["p90_us"],
            warmup["first_window"]["p90_us"],
            warmup["last_window"]["p90_us"]
        );
        assert_eq!(warmup["errors"], 0, "py/{i}: {warmup}");
        assert!(
            warmup["requests"].as_u64().unwrap_or(0) > 0,
            "py/{i}: {warmup}"
        );
        // Batches of one: three siblings serve while each instance warms. The first measures
        // one; a later batch reuses the sample its predecessor met (taken from a process that
        // may since have been restarted, itself included), or measures again when it was not met.
        let sibling = warmup["sibling"]["index"].as_u64();
        let age_ms = warmup["sibling"]["age_ms"].as_u64();
        let previous = (i > 0).then(|| &after.instance("py", i - 1)["warmup"]);
        match previous {
            Some(previous) if previous["ending"] == "sibling" => {
                assert!(
                    age_ms.is_some_and(|a| a > 0),
                    "py/{i} reused the sample py/{} met: {warmup}",
                    i - 1
                );
                assert_eq!(
                    (&warmup["sibling"]["index"], &warmup["sibling"]["window"]),
                    (
                        &previous["sibling"]["index"],
                        &previous["sibling"]["window"]
                    ),
                    "py/{i}: the same sample as py/{}",
                    i - 1
                );
            }
            _ => assert!(
                age_ms == Some(0) && sibling.is_some_and(|s| s != u64::from(i)),
                "py/{i} measured a serving sibling: {warmup}"
            ),
        }
        assert!(
            warmup["sibling"]["window"]["p90_us"].as_u64().is_some(),
            "{warmup}"
        );
        assert!(
            warmup["first_window"]["p90_us"].as_u64().is_some(),
            "{warmup}"
        );
        assert!(
            warmup["last_window"]["p90_us"].as_u64().is_some(),
            "{warmup}"
        );
        assert!(
            warmup["ending"] == "sibling" || warmup["ending"] == "max-duration",
            "py/{i}: {warmup}"
        );
    }
}

/// The new version fails its warm-up, and so does the old version's during the rollback (the
/// warm-up touches a dependency that is down for every version): the old version, healthy and
/// known good, is back in steering and serving, all four instances are in the chain, the restart
/// fails with a message that says exactly that, and no client request fails.
#[test]
fn a_rollback_whose_warm_up_fails_puts_the_healthy_old_version_back() {
    if !require_root() {
        return;
    }
    let Some(gunicorn) = fixtures::gunicorn() else {
        return;
    };
    let ns = Netns::new();
    let h = Host::new().in_netns(&ns);
    let flag = h.path("dependency-down");
    let service = |version: &str| {
        python_service(
            &gunicorn,
            r#""--workers", "1", "--worker-class", "gthread", "--threads", "4", "--keep-alive", "5""#,
            &format!(
                ", WARM_FAIL_FILE = \"{}\", VERSION = \"{version}\"",
                flag.display()
            ),
            // One connection, no error allowed: the first 500 ends the warm-up, so the message
            // is exact.
            "requests = [\"GET /warm\"]\nconcurrency = 1\nmax_duration_ms = 10000",
        )
    };
    h.service("py", &service("1"));
    h.start_daemon();
    let before = h.wait_until(all_enabled, PATIENCE * 2);
    let load = Load::start(&ns, 9001, RATE, LOAD_LIMIT);
    std::thread::sleep(Duration::from_millis(500));

    std::fs::write(&flag, "down\n").unwrap();
    h.service("py", &service("2"));
    h.sluice(&["reload"]).success();
    h.wait_until(
        |s| !s.service("py")["last_restart_error"].is_null() && !s.restart_in_progress("py"),
        RESTART_PATIENCE,
    );
    let failed = "instance 0: warm-up: 1 of 1 warm-up requests failed (at most 0 allowed); \
                  last: GET /warm: status 500";
    let want = format!(
        "restart of py failed: {failed}; the batch was rolled back; the old version's warm-up \
         failed too ({failed}), and the old version went back into steering anyway: it is known \
         good; now instance 0 runs the old version and is in steering"
    );
    let after = h.wait_until(all_enabled, PATIENCE);
    assert_eq!(
        after.service("py")["last_restart_error"],
        want.as_str(),
        "{after}"
    );
    assert_chain_of_four(&ns);
    // Instance 0 went to the new version and came back; the others were never stopped.
    assert_ne!(after.pid("py", 0), before.pid("py", 0));
    for i in 1..4 {
        assert_eq!(
            after.pid("py", i),
            before.pid("py", i),
            "py/{i} was never stopped"
        );
    }
    let zero = after.instance("py", 0);
    let error = zero["last_error"].as_str().unwrap_or("");
    assert!(
        error.starts_with("warm-up of the old version failed (best effort"),
        "status says what happened to the old version's warm-up: {zero}"
    );
    assert_eq!(zero["warmup"]["errors"], 1, "{zero}");

    // `sluice restart` tries the failed configuration again, and reports the same outcome.
    let out = h.sluice(&["restart", "py"]);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains(&want),
        "the CLI prints exactly what happened: {out}"
    );
    let after = h.wait_until(all_enabled, PATIENCE);
    assert_chain_of_four(&ns);
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    sluice_tests::load::assert_no_failures("rollback with a failing warm-up", &report, 100);
    assert_eq!(
        after.instance("py", 0)["enabled"],
        true,
        "the old version serves: {after}"
    );
}
