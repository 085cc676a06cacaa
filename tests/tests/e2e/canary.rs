//! Canaries that judge themselves, for real: the 3-host fleet (ZooKeeper, builds over HTTP,
//! venvs by `stock:python-venv`), h1 with role canary, bounded load on every host's front port.
//! A build answering 500 on 20 % of requests is failed and rolled back on h1 while h2 and h3
//! never fetch it; with no traffic the verdict is inconclusive and the canary held; a good build
//! passes and is promoted (`on_pass = "promote"`) to every host. Request figures from the
//! instances' `/metrics` (the app's hand-written Prometheus text), and from sluice's own probe
//! requests (the 5xx build and a good one; probes always make traffic, so no idle case there).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::fleet::{BuildInfo, Fleet, FleetOptions, py_service, serving, wheel_dir};
use sluice_tests::load::Load;

const SVC: &str = "py";
const FRONT: u16 = 9000;
/// Requests per second on each host's front port.
const RATE: u32 = 40;
/// Upper bound of any load in these tests.
const LOAD_LIMIT: Duration = Duration::from_secs(300);
/// A deploy across three hosts on a loaded 2-core machine (fetch, venv + pip, drain restarts).
const DEPLOY_PATIENCE: Duration = Duration::from_secs(240);
/// A bake of a few seconds, judged and acted on, on a loaded machine.
const VERDICT_PATIENCE: Duration = Duration::from_secs(120);
const CANARY_HOST: &str = "h1";
const PROD_HOSTS: [&str; 2] = ["h2", "h3"];

/// `[canary]` with a short bake. p99 is allowed 20 times the baseline's: on a machine loaded
/// five times over, latency is noise; the error ratio is what these builds differ in.
fn canary_section(source: &str) -> String {
    format!(
        "\n[canary]\nbake_ms = 6000\nsample_interval_ms = 1000\nmin_requests = 60\nmax_error_ratio = 0.05\nmax_p99_ratio = 20.0\non_pass = \"promote\"\non_fail = \"rollback\"\n{source}\n"
    )
}

const METRICS: &str = "metrics = \"/metrics\"";
const PROBES: &str = "requests = [\"GET /probe\"]\nprobe_rate_per_s = 20";

/// A build of the app with `CANARY.json` (error share, whether it serves `/metrics`).
fn build(fleet: &Fleet, id: &str, error_pct: u32, metrics: bool) -> BuildInfo {
    let canary = format!("{{\"error_pct\": {error_pct}, \"metrics\": {metrics}}}");
    fleet
        .builds()
        .good_with(SVC, id, &[("CANARY.json", canary.as_bytes(), 0o644)])
}

/// The fleet serving `first` everywhere with `[canary]` from `source`, h1 a canary host.
fn fleet_with_canary(source: &str, builds: &[(&str, u32)], metrics: bool) -> Option<Fleet> {
    let fleet = Fleet::new(FleetOptions {
        hosts: 3,
        zookeepers: 1,
    })?;
    let wheels = wheel_dir()?;
    let mut service = py_service(&wheels, "");
    service.push_str(&canary_section(source));
    fleet.service(SVC, &service);
    fleet.start_daemons();
    for (id, error_pct) in builds {
        let b = build(&fleet, id, *error_pct, metrics);
        fleet.register(SVC, &b);
    }
    fleet.sluice(&["deploy", SVC, builds[0].0]).success();
    fleet.wait_all_serving(SVC, builds[0].0, DEPLOY_PATIENCE);
    fleet
        .sluice(&["role", SVC, CANARY_HOST, "canary"])
        .success();
    Some(fleet)
}

fn loads(fleet: &Fleet) -> Vec<Load> {
    (0..fleet.hosts.len())
        .map(|i| Load::start(fleet.netns(i), FRONT, RATE, LOAD_LIMIT))
        .collect()
}

fn finish(loads: Vec<Load>, what: &str) {
    for load in loads {
        let report = load.finish();
        println!(
            "{what}: {} ok, {} failed, p99 {} us",
            report.ok,
            report.failed,
            report.percentile_us(0.99)
        );
    }
}

/// Waits until the canary host's status node has a verdict on `build` with an action.
#[track_caller]
fn wait_verdict(fleet: &Fleet, build: &str) -> Value {
    let view = fleet.wait_hosts(
        SVC,
        |v| {
            let c = &v[CANARY_HOST]["canary"];
            c["build"] == build && !c["judged_ms"].is_null() && !c["action"].is_null()
        },
        VERDICT_PATIENCE,
    );
    let canary = view[CANARY_HOST]["canary"].clone();
    println!("verdict on {build}: {canary}");
    canary
}

/// The prod hosts never took `build`: no release of it on disk, and their status nodes on
/// `enabled` throughout (`seen` holds every view polled).
#[track_caller]
fn prod_never_ran(fleet: &Fleet, build: &str, seen: &[BTreeMap<String, Value>]) {
    for name in PROD_HOSTS {
        let h = fleet.by_name(name);
        let release = h.path(&format!("data/{SVC}/releases/{build}"));
        assert!(!release.exists(), "{name} has a release of {build}");
        for view in seen {
            assert_ne!(view[name]["build"], build, "{name}: {}", view[name]);
            assert_ne!(view[name]["target_build"], build, "{name}: {}", view[name]);
        }
    }
}

/// The persistent record of the canary host's analysis.
fn record(fleet: &Fleet, build: &str) -> String {
    let path = format!("/sluice/services/{SVC}/canary/{build}/{CANARY_HOST}");
    let out = fleet.zk().cli(&["get", &path]);
    out.stdout
}

/// Polls the hosts view until `cond`, keeping every view seen.
#[track_caller]
fn follow(
    fleet: &Fleet,
    mut cond: impl FnMut(&BTreeMap<String, Value>) -> bool,
) -> Vec<BTreeMap<String, Value>> {
    let mut seen = Vec::new();
    fleet.wait_hosts(
        SVC,
        |v| {
            seen.push(v.clone());
            cond(v)
        },
        VERDICT_PATIENCE + DEPLOY_PATIENCE,
    );
    seen
}

#[test]
fn metrics_fail_and_roll_back_hold_when_idle_and_promote_a_good_build() {
    let builds = [("b1", 0), ("b2", 20), ("b3", 0), ("b4", 0)];
    let Some(fleet) = fleet_with_canary(METRICS, &builds, true) else {
        return;
    };

    // (1) 20 % of 5xx under load: failed, rolled back on h1; h2 and h3 never ran it.
    let load = loads(&fleet);
    fleet.sluice(&["deploy", SVC, "b2", "--canary"]).success();
    let seen = follow(&fleet, |v| {
        let c = &v[CANARY_HOST]["canary"];
        c["build"] == "b2" && c["action"] == "rolled-back" && serving(v, CANARY_HOST, "b1")
    });
    let verdict = wait_verdict(&fleet, "b2");
    finish(load, "b2 canary");
    assert_eq!(verdict["outcome"], "fail", "{verdict}");
    assert_eq!(verdict["action"], "rolled-back", "{verdict}");
    assert!(
        verdict["reasons"].to_string().contains("error ratio"),
        "{verdict}"
    );
    let hosts = verdict["baseline_hosts"].to_string();
    assert!(hosts.contains("h2") && hosts.contains("h3"), "{verdict}");
    assert!(
        verdict["canary"]["errors"].as_u64().unwrap() > 0,
        "{verdict}"
    );
    assert_eq!(verdict["baseline"]["errors"], 0, "{verdict}");
    prod_never_ran(&fleet, "b2", &seen);
    assert_eq!(fleet.http().count("/py/b2.tar.gz"), 1, "only h1 fetched b2");
    let node = record(&fleet, "b2");
    assert!(node.contains("\"outcome\":\"fail\""), "{node}");
    assert!(node.contains("\"action\":\"rolled-back\""), "{node}");
    let text = fleet.sluice(&["hosts", SVC]).success().stdout;
    assert!(text.contains("fail/rolled-back"), "{text}");

    // (3) No traffic: inconclusive, held — h1 stays on the canary, enabled stays b1.
    fleet.sluice(&["deploy", SVC, "b3", "--canary"]).success();
    let verdict = wait_verdict(&fleet, "b3");
    assert_eq!(verdict["outcome"], "inconclusive", "{verdict}");
    assert_eq!(verdict["action"], "held", "{verdict}");
    assert!(
        verdict["reasons"].to_string().contains("min_requests"),
        "{verdict}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let view = fleet.try_hosts_view(SVC).expect("sluice hosts");
    assert!(serving(&view, CANARY_HOST, "b3"), "{view:?}");
    for name in PROD_HOSTS {
        assert!(serving(&view, name, "b1"), "{name}: {}", view[name]);
    }
    let status = fleet
        .by_name(CANARY_HOST)
        .sluice(&["status", SVC])
        .success()
        .stdout;
    assert!(status.contains("canary b3: inconclusive/held"), "{status}");

    // (2) A good build under load: passes and is promoted; every host ends on it.
    let load = loads(&fleet);
    fleet.sluice(&["deploy", SVC, "b4", "--canary"]).success();
    let verdict = wait_verdict(&fleet, "b4");
    assert_eq!(verdict["outcome"], "pass", "{verdict}");
    assert_eq!(verdict["action"], "promoted", "{verdict}");
    fleet.wait_all_serving(SVC, "b4", DEPLOY_PATIENCE);
    finish(load, "b4 canary and promotion");
    let history = fleet
        .zk()
        .cli(&["get", &format!("/sluice/services/{SVC}/history")])
        .stdout;
    assert!(history.contains("\"b4\""), "{history}");
    let enabled = fleet
        .zk()
        .cli(&["get", &format!("/sluice/services/{SVC}/enabled")])
        .stdout;
    assert!(enabled.lines().any(|l| l.trim() == "b4"), "{enabled}");
}

#[test]
fn probes_fail_and_roll_back_a_build_with_5xx_and_promote_a_good_one() {
    let builds = [("b1", 0), ("b2", 20), ("b3", 0)];
    let Some(fleet) = fleet_with_canary(PROBES, &builds, false) else {
        return;
    };
    let load = loads(&fleet);
    fleet.sluice(&["deploy", SVC, "b2", "--canary"]).success();
    let seen = follow(&fleet, |v| {
        let c = &v[CANARY_HOST]["canary"];
        c["build"] == "b2" && c["action"] == "rolled-back" && serving(v, CANARY_HOST, "b1")
    });
    let verdict = wait_verdict(&fleet, "b2");
    finish(load, "b2 canary (probes)");
    assert_eq!(verdict["outcome"], "fail", "{verdict}");
    assert!(
        verdict["reasons"].to_string().contains("error ratio"),
        "{verdict}"
    );
    // Probes, not the load: at most 20/s on each of h1's two instances over the bake.
    let requests = verdict["canary"]["requests"].as_u64().unwrap();
    assert!(requests >= 60, "{verdict}");
    prod_never_ran(&fleet, "b2", &seen);

    // A good build judged on probes alone (no load): passes, promoted to every host.
    fleet.sluice(&["deploy", SVC, "b3", "--canary"]).success();
    let verdict = wait_verdict(&fleet, "b3");
    assert_eq!(verdict["outcome"], "pass", "{verdict}");
    assert_eq!(verdict["action"], "promoted", "{verdict}");
    assert_eq!(verdict["canary"]["errors"], 0, "{verdict}");
    fleet.wait_all_serving(SVC, "b3", DEPLOY_PATIENCE);
}
