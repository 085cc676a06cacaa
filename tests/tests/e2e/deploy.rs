//! Deploys across a fleet, for real: host namespaces on a bridge, a real ZooKeeper ensemble in the
//! hub, builds fetched over HTTP from the hub, venvs made offline by `stock:python-venv`, drain
//! restarts under a bounded load on every host's front port (see `sluice_tests::fleet`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::fleet::{
    Bad, BuildInfo, Fleet, FleetHost, FleetOptions, py_service, serving, tar_listing, wheel_dir,
};
use sluice_tests::load::Load;
use sluice_tests::{PATIENCE, Status};

/// Requests per second on each host's front port.
const RATE: u32 = 40;
/// Upper bound of any load in these tests.
const LOAD_LIMIT: Duration = Duration::from_secs(300);
/// How long a deploy across three hosts may take on a loaded 2-core machine (fetch, venv + pip
/// on every host, drain restarts).
const DEPLOY_PATIENCE: Duration = Duration::from_secs(180);
const SVC: &str = "py";
const FRONT: u16 = 9000;

/// A fleet of `hosts` hosts with `zookeepers` servers, the `py` service on every host and its
/// build `first` deployed and serving everywhere. `None` when the test must skip.
fn fleet_serving(
    hosts: usize,
    zookeepers: usize,
    builds: &[&str],
) -> Option<(Fleet, Vec<BuildInfo>)> {
    let fleet = Fleet::new(FleetOptions { hosts, zookeepers })?;
    let wheels = wheel_dir()?;
    let builds: Vec<BuildInfo> = builds
        .iter()
        .map(|id| fleet.builds().good(SVC, id))
        .collect();
    fleet.service(SVC, &py_service(&wheels, ""));
    fleet.start_daemons();
    if zookeepers > 0 {
        for b in &builds {
            fleet.register(SVC, b);
        }
    }
    fleet.sluice(&["deploy", SVC, &builds[0].id]).success();
    if zookeepers > 0 {
        fleet.wait_all_serving(SVC, &builds[0].id, DEPLOY_PATIENCE);
    }
    for h in &fleet.hosts {
        h.wait_until(|s| steady(s, &builds[0].id), DEPLOY_PATIENCE);
    }
    Some((fleet, builds))
}

/// The host's own view: `py` runs `build`, both instances running and in steering, no deploy
/// or restart under way.
fn steady(s: &Status, build: &str) -> bool {
    let svc = s.service(SVC);
    let instances = s.instances(SVC);
    svc["build"] == build
        && svc["deploy"].is_null()
        && instances.len() == 2
        && instances
            .iter()
            .all(|i| i["state"] == "running" && i["enabled"] == true)
        && !s.restart_in_progress(SVC)
}

fn loads(fleet: &Fleet) -> Vec<Load> {
    (0..fleet.hosts.len())
        .map(|i| Load::start(fleet.netns(i), FRONT, RATE, LOAD_LIMIT))
        .collect()
}

#[track_caller]
fn finish_loads(fleet: &Fleet, loads: Vec<Load>, what: &str, min_requests: u64) {
    for (h, load) in fleet.hosts.iter().zip(loads) {
        let report = load.finish();
        println!(
            "{what}: {}: {} ok, {} failed, {} stale keep-alive retries, p99 {} us",
            h.name,
            report.ok,
            report.failed,
            report.stale_retries,
            report.percentile_us(0.99)
        );
        sluice_tests::load::assert_no_failures(
            &format!("{what} on {}", h.name),
            &report,
            min_requests,
        );
    }
}

/// The build the front port of `h` answers with (`"<build> <instance>"`).
#[track_caller]
fn front_build(h: &FleetHost) -> String {
    let (status, body) = h
        .get(FRONT, "/")
        .unwrap_or_else(|e| panic!("{}: {e}", h.name));
    assert_eq!(status, 200, "{}: {body}", h.name);
    body.split_whitespace().next().unwrap_or("").to_owned()
}

/// Pids of `py`'s instances on every host, by host name.
fn all_pids(fleet: &Fleet) -> BTreeMap<String, Vec<Option<i32>>> {
    fleet
        .hosts
        .iter()
        .map(|h| (h.name.clone(), h.status().pids(SVC)))
        .collect()
}

/// `restart_started_ms..restart_finished_ms` of each host in a hosts view, if both are set and
/// the start is not before `since_ms`.
fn restart_intervals(
    view: &BTreeMap<String, Value>,
    since_ms: u64,
) -> BTreeMap<String, (u64, u64)> {
    view.iter()
        .filter_map(|(name, h)| {
            let start = h["restart_started_ms"].as_u64()?;
            let end = h["restart_finished_ms"].as_u64()?;
            (start >= since_ms && end >= start).then(|| (name.clone(), (start, end)))
        })
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// The part of the daemon log of `h` written after `from` bytes.
fn log_since(h: &FleetHost, from: usize) -> String {
    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap_or_default();
    log.get(from..).unwrap_or("").to_owned()
}

fn log_len(h: &FleetHost) -> usize {
    std::fs::metadata(h.path("daemon.log")).map_or(0, |m| m.len() as usize)
}

// ------------------------------------------------------------------------------------------------

/// The harness itself: namespaces reach the hub, the build store counts, tarballs hold what they
/// should, the ensemble elects a new leader when its leader stops and serves again after a full
/// stop. No sluice daemon involved.
#[test]
fn fleet_harness_works() {
    let Some(fleet) = Fleet::new(FleetOptions {
        hosts: 2,
        zookeepers: 3,
    }) else {
        return;
    };
    let b = fleet.builds();
    let good = b.good(SVC, "g1");
    let mut names = tar_listing(&good.file);
    names.sort();
    assert_eq!(names, ["BUILD", "app.py", "requirements.txt"]);
    let hook = b.bad(
        SVC,
        "hook",
        &Bad::FailingHook {
            message: "no".into(),
        },
    );
    assert!(tar_listing(&hook.file).contains(&"sluice/hooks/post_install".to_owned()));
    let dotdot = b.bad(
        SVC,
        "dd",
        &Bad::DotDot {
            entry: "../../escaped".into(),
        },
    );
    assert!(tar_listing(&dotdot.file).contains(&"../../escaped".to_owned()));
    let abs = b.bad(
        SVC,
        "abs",
        &Bad::Absolute {
            path: fleet.dir().join("escaped-abs"),
        },
    );
    assert!(
        tar_listing(&abs.file).contains(&fleet.dir().join("escaped-abs").display().to_string())
    );
    let link = b.bad(
        SVC,
        "link",
        &Bad::EscapingSymlink {
            target: "../../../../etc".into(),
        },
    );
    assert!(tar_listing(&link.file).contains(&"escape-link".to_owned()));
    let wrong = b.bad(SVC, "wrong", &Bad::WrongSha256);
    assert_ne!(wrong.sha256, sluice_tests::fleet::sha256_file(&wrong.file));

    // Every host reaches the build store; it counts per path and answers 404s.
    for h in &fleet.hosts {
        let addr = ([10, 199, 0, 1], 8000).into();
        let (status, body) = sluice_tests::netns::run_in_named(&h.netns, || {
            sluice_tests::fleet::http_get(addr, "/py/g1.tar.gz.sha256")
        })
        .unwrap();
        assert_eq!(
            (status, body.split_whitespace().next()),
            (200, Some(good.sha256.as_str()))
        );
        let (status, _) = sluice_tests::netns::run_in_named(&h.netns, || {
            sluice_tests::fleet::http_get(addr, "/py/nope.tar.gz")
        })
        .unwrap();
        assert_eq!(status, 404);
    }
    assert_eq!(fleet.http().count("/py/g1.tar.gz.sha256"), 2);
    assert_eq!(fleet.http().count("/py/nope.tar.gz"), 2);
    assert_eq!(fleet.http().count("/py/g1.tar.gz"), 0);

    // The ensemble: a leader, a new one after it stops, a quorum again after a full stop.
    let zk = fleet.zk();
    let leader = zk.leader();
    let t = Instant::now();
    zk.stop(leader);
    let next = zk.leader();
    println!(
        "leader {leader} stopped; {next} leads after {:?}",
        t.elapsed()
    );
    assert_ne!(next, leader);
    zk.start(leader);
    zk.wait_quorum(PATIENCE * 2);
    zk.stop_all();
    assert!((0..3).all(|i| zk.mode(i).is_none()));
    zk.start_all();
    zk.wait_quorum(PATIENCE * 3);
    let out = zk.cli(&["create", "/harness", "x"]);
    assert_eq!(out.code, Some(0), "{out}");
    let out = zk.cli(&["set", "/nope", "{bad"]);
    assert!(
        out.code == Some(1) && out.stderr.contains("Node does not exist"),
        "{out}"
    );
    let out = zk.cli(&["get", "/harness"]);
    assert!(
        out.code == Some(0) && out.stdout.lines().any(|l| l == "x"),
        "{out}"
    );
}

/// a. A deploy from b1 to b2 on three hosts: each host fetches b2 once, makes its venv, restarts
/// with drain, reports b2 in ZooKeeper, and no request on any front port fails.
#[test]
fn a_deploy_reaches_every_host_once_and_loses_no_request() {
    let Some((fleet, builds)) = fleet_serving(3, 1, &["b1", "b2"]) else {
        return;
    };
    let b2 = &builds[1];
    let before = all_pids(&fleet);
    let logs_from: Vec<usize> = fleet.hosts.iter().map(log_len).collect();
    let loads = loads(&fleet);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        fleet.http().count(&b2.path),
        0,
        "{:?}",
        fleet.http().counts()
    );

    let t = Instant::now();
    fleet.sluice(&["deploy", SVC, "b2"]).success();
    fleet.wait_all_serving(SVC, "b2", DEPLOY_PATIENCE);
    for h in &fleet.hosts {
        h.wait_until(|s| steady(s, "b2"), DEPLOY_PATIENCE);
    }
    println!("deploy of b2 on 3 hosts: {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    finish_loads(&fleet, loads, "deploy b1 -> b2", 100);

    assert_eq!(
        fleet.http().count(&b2.path),
        3,
        "every host fetches b2 exactly once: {:?}",
        fleet.http().counts()
    );
    let after = all_pids(&fleet);
    let view = fleet.try_hosts_view(SVC).expect("sluice hosts");
    for (h, from) in fleet.hosts.iter().zip(logs_from) {
        let release = h.path("data/py/releases/b2");
        assert!(
            release.join(".venv/bin/gunicorn").is_file(),
            "{}: the stock hook made {}/.venv",
            h.name,
            release.display()
        );
        let current = std::fs::read_link(h.path("data/py/current")).expect("current is a link");
        assert!(
            current.ends_with("releases/b2") || current.ends_with("b2"),
            "{current:?}"
        );
        assert_eq!(view[&h.name]["build"], "b2", "{}", view[&h.name]);
        assert_eq!(front_build(h), "b2");
        for (i, (old, new)) in before[&h.name].iter().zip(&after[&h.name]).enumerate() {
            assert!(
                old.is_some() && new.is_some() && old != new,
                "{}: py/{i} restarted",
                h.name
            );
        }
        assert_eq!(
            sluice_tests::stops_after_drain(&log_since(h, from), SVC),
            2,
            "{}: both instances were drained, then stopped",
            h.name
        );
    }
}

/// b. Canary: only the canary host takes a `--canary` deploy; `promote` moves the others.
#[test]
fn b_a_canary_deploy_moves_only_the_canary_until_promoted() {
    let Some((fleet, _builds)) = fleet_serving(3, 1, &["b1", "b3"]) else {
        return;
    };
    fleet.sluice(&["role", SVC, "h2", "canary"]).success();
    let before = all_pids(&fleet);
    fleet.sluice(&["deploy", SVC, "b3", "--canary"]).success();
    let view = fleet.wait_hosts(
        SVC,
        |v| serving(v, "h2", "b3") && serving(v, "h1", "b1") && serving(v, "h3", "b1"),
        DEPLOY_PATIENCE,
    );
    fleet
        .by_name("h2")
        .wait_until(|s| steady(s, "b3"), DEPLOY_PATIENCE);
    // The prod hosts do not move, now or a little later.
    std::thread::sleep(Duration::from_secs(3));
    let later = fleet.try_hosts_view(SVC).expect("sluice hosts");
    for name in ["h1", "h3"] {
        for v in [&view, &later] {
            assert_eq!(v[name]["build"], "b1", "{name}: {}", v[name]);
            assert_eq!(v[name]["target_build"], "b1", "{name}: {}", v[name]);
        }
        let h = fleet.by_name(name);
        assert_eq!(
            h.status().pids(SVC),
            before[name],
            "{name} was not restarted"
        );
        assert_eq!(front_build(h), "b1");
    }
    assert_eq!(front_build(fleet.by_name("h2")), "b3");
    assert_eq!(
        fleet.http().count("/py/b3.tar.gz"),
        1,
        "only the canary fetched b3"
    );
    let canary_pids = fleet.by_name("h2").status().pids(SVC);

    fleet.sluice(&["promote", SVC]).success();
    fleet.wait_all_serving(SVC, "b3", DEPLOY_PATIENCE);
    for h in &fleet.hosts {
        h.wait_until(|s| steady(s, "b3"), DEPLOY_PATIENCE);
        assert_eq!(front_build(h), "b3");
    }
    assert_eq!(
        fleet.by_name("h2").status().pids(SVC),
        canary_pids,
        "the canary is not restarted again by the promotion"
    );
    assert_eq!(fleet.http().count("/py/b3.tar.gz"), 3);
}

/// What a deploy looked like from polling the hosts view.
struct Watched {
    /// The last view (every host serving the build).
    view: BTreeMap<String, Value>,
    /// The most hosts seen in state `restarting` in one view.
    most_restarting: usize,
    /// Per host, the first and last wall-clock ms at which a view showed it `restarting`.
    seen_restarting: BTreeMap<String, (u64, u64)>,
    /// Views in which a host `waiting` for its turn had an instance out of steering.
    drained_while_waiting: Vec<String>,
}

/// Polls the hosts view until every host serves `build`.
fn watch_deploy(fleet: &Fleet, build: &str) -> Watched {
    let mut most_restarting = 0;
    let mut drained_while_waiting = Vec::new();
    let mut seen_restarting: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let names: Vec<String> = fleet.hosts.iter().map(|h| h.name.clone()).collect();
    let view = fleet.wait_hosts(
        SVC,
        |v| {
            let now = now_ms();
            let restarting: Vec<&String> = v
                .iter()
                .filter(|(_, h)| h["state"] == "restarting")
                .map(|(n, _)| n)
                .collect();
            most_restarting = most_restarting.max(restarting.len());
            for (n, h) in v.iter().filter(|(_, h)| h["state"] == "waiting") {
                let out: Vec<&Value> = h["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|i| i["enabled"] != true)
                    .map(|i| &i["index"])
                    .collect();
                if !out.is_empty() && drained_while_waiting.len() < 5 {
                    drained_while_waiting.push(format!("{n} at {now}: instances {out:?}"));
                }
            }
            for n in restarting {
                seen_restarting
                    .entry(n.clone())
                    .and_modify(|w| w.1 = now)
                    .or_insert((now, now));
            }
            names.iter().all(|n| serving(v, n, build))
        },
        DEPLOY_PATIENCE,
    );
    Watched {
        view,
        most_restarting,
        seen_restarting,
        drained_while_waiting,
    }
}

/// Whether some host of the view began restarting at or after `since_ms` (its state says so, or
/// its `restart_started_ms`).
fn restart_began(view: &BTreeMap<String, Value>, since_ms: u64) -> bool {
    view.values().any(|h| {
        h["state"] == "restarting"
            || h["restart_started_ms"]
                .as_u64()
                .is_some_and(|s| s >= since_ms)
    })
}

/// The restart interval of every host for the deploy that began at `since_ms`, from the status
/// nodes; fails saying which host reports none (or a stale one).
#[track_caller]
fn intervals_of_deploy(w: &Watched, since_ms: u64, hosts: usize) -> BTreeMap<String, (u64, u64)> {
    let intervals = restart_intervals(&w.view, since_ms);
    let reported: BTreeMap<&String, (Value, Value)> = w
        .view
        .iter()
        .map(|(n, h)| {
            (
                n,
                (
                    h["restart_started_ms"].clone(),
                    h["restart_finished_ms"].clone(),
                ),
            )
        })
        .collect();
    assert_eq!(
        intervals.len(),
        hosts,
        "every host reports restart_started_ms..restart_finished_ms of this deploy (begun at \
         {since_ms}); reported {reported:?}; seen restarting by polling: {:?}",
        w.seen_restarting
    );
    intervals
}

/// c. `sluice limit`: with 1, no two hosts restart at once; raised to 3 during a deploy, the hosts
/// still waiting restart together.
#[test]
fn c_the_fleet_limit_bounds_concurrent_restarts_and_changes_live() {
    let Some((fleet, _builds)) = fleet_serving(3, 1, &["b1", "b2", "b3"]) else {
        return;
    };
    fleet.sluice(&["limit", SVC, "1"]).success();
    let loads = loads(&fleet);

    let t0 = now_ms();
    fleet.sluice(&["deploy", SVC, "b2"]).success();
    let w = watch_deploy(&fleet, "b2");
    // A host waiting for a slot must not have taken its first batch out of steering yet: with a
    // low limit a host may wait for minutes, at reduced capacity.
    let drained_while_waiting = w.drained_while_waiting.clone();
    println!(
        "limit 1: seen restarting {:?}, at most {} at once",
        w.seen_restarting, w.most_restarting
    );
    assert!(
        w.most_restarting <= 1,
        "{} hosts were seen restarting at once with limit 1",
        w.most_restarting
    );
    let intervals = intervals_of_deploy(&w, t0, 3);
    println!("limit 1: intervals {intervals:?}");
    let list: Vec<_> = intervals.iter().collect();
    for (i, a) in list.iter().enumerate() {
        for b in &list[i + 1..] {
            assert!(
                !overlap(*a.1, *b.1),
                "with limit 1, {} and {} restarted at once: {intervals:?}",
                a.0,
                b.0
            );
        }
    }

    let t1 = now_ms();
    fleet.sluice(&["deploy", SVC, "b3"]).success();
    // As soon as the first host holds the only slot, raise the limit.
    fleet.wait_hosts(SVC, |v| restart_began(v, t1), DEPLOY_PATIENCE);
    fleet.sluice(&["limit", SVC, "3"]).success();
    let w = watch_deploy(&fleet, "b3");
    println!(
        "limit 1 -> 3: seen restarting {:?}, at most {} at once",
        w.seen_restarting, w.most_restarting
    );
    finish_loads(&fleet, loads, "limited deploys", 100);
    // Every remaining check is collected, so one failure does not hide the others.
    let mut problems = Vec::new();
    if !drained_while_waiting.is_empty() {
        problems.push(format!(
            "hosts waiting for a restart slot had instances out of steering: {drained_while_waiting:?}"
        ));
    }
    let intervals = restart_intervals(&w.view, t1);
    println!("limit 1 -> 3: intervals {intervals:?}");
    if intervals.len() != 3 {
        let reported: BTreeMap<&String, (&Value, &Value)> = w
            .view
            .iter()
            .map(|(n, h)| (n, (&h["restart_started_ms"], &h["restart_finished_ms"])))
            .collect();
        problems.push(format!(
            "not every host reports the restart interval of the deploy begun at {t1}: {reported:?}"
        ));
    } else {
        let mut sorted: Vec<(u64, u64)> = intervals.values().copied().collect();
        sorted.sort();
        if !overlap(sorted[1], sorted[2]) {
            problems.push(format!(
                "after `limit 3` the two hosts still waiting did not restart together: {intervals:?}"
            ));
        }
    }
    // What polling saw, independent of the reported intervals: the limit change took effect.
    if w.most_restarting < 2 {
        problems.push(format!(
            "after `limit 3` no two hosts were seen restarting at once: {:?}",
            w.seen_restarting
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Which instances of each host have a pid other than in `base` now; adds them to `changed`.
fn note_changes(
    fleet: &Fleet,
    base: &BTreeMap<String, Vec<Option<i32>>>,
    changed: &mut BTreeMap<String, BTreeSet<usize>>,
) {
    for h in &fleet.hosts {
        let now = h.status().pids(SVC);
        for (i, (old, new)) in base[&h.name].iter().zip(&now).enumerate() {
            if old != new {
                changed.entry(h.name.clone()).or_default().insert(i);
            }
        }
    }
}

/// d. ZooKeeper outages: the leader dies mid-deploy (the deploy completes), the whole ensemble is
/// away for 30 s in steady state (nothing restarts), and away for 30 s mid-deploy (nothing is
/// stopped beyond the batch in flight; the deploy completes once it is back). No request fails.
#[test]
fn d_zookeeper_outages_never_stop_a_serving_instance() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let started = Instant::now();
    let Some((fleet, _builds)) = fleet_serving(3, 3, &["b1", "b2", "b3"]) else {
        return;
    };
    let zk = fleet.zk();
    fleet.sluice(&["limit", SVC, "1"]).success();
    let loads = loads(&fleet);
    println!("fleet up on b1 after {:?}", started.elapsed());

    // 1. The leader goes away mid-deploy.
    let t = now_ms();
    fleet.sluice(&["deploy", SVC, "b2"]).success();
    fleet.wait_hosts(SVC, |v| restart_began(v, t), DEPLOY_PATIENCE);
    let leader = zk.leader();
    zk.stop(leader);
    println!(
        "leader {leader} stopped mid-deploy at {:?}",
        started.elapsed()
    );
    fleet.wait_all_serving(SVC, "b2", DEPLOY_PATIENCE);
    for h in &fleet.hosts {
        h.wait_until(|s| steady(s, "b2"), DEPLOY_PATIENCE);
    }
    zk.start(leader);
    zk.wait_quorum(PATIENCE * 2);
    println!(
        "deploy b2 done, ensemble whole again at {:?}",
        started.elapsed()
    );

    // 2. The whole ensemble away for 30 s in steady state: nothing restarts.
    let before = all_pids(&fleet);
    zk.stop_all();
    let until = Instant::now() + OUTAGE;
    let mut changed = BTreeMap::new();
    while Instant::now() < until {
        note_changes(&fleet, &before, &mut changed);
        std::thread::sleep(Duration::from_millis(300));
    }
    note_changes(&fleet, &before, &mut changed);
    assert!(
        changed.is_empty(),
        "instances restarted while ZooKeeper was away: {changed:?}"
    );
    zk.start_all();
    zk.wait_quorum(PATIENCE * 3);
    // Every host is back in ZooKeeper (its ephemeral status re-created) and still untouched.
    fleet.wait_all_serving(SVC, "b2", PATIENCE * 3);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        all_pids(&fleet),
        before,
        "instances restarted when ZooKeeper came back"
    );
    println!("steady-state outage survived at {:?}", started.elapsed());

    // 3. The whole ensemble away for 30 s mid-deploy.
    let t = now_ms();
    fleet.sluice(&["deploy", SVC, "b3"]).success();
    fleet.wait_hosts(SVC, |v| restart_began(v, t), DEPLOY_PATIENCE);
    // All at once, so the outage lands in the middle of the first host's restart.
    zk.kill_all();
    let gone = all_pids(&fleet);
    let view_before: BTreeMap<String, String> = fleet
        .hosts
        .iter()
        .map(|h| {
            (
                h.name.clone(),
                h.status().service(SVC)["deploy"].to_string(),
            )
        })
        .collect();
    let until = Instant::now() + OUTAGE;
    let mut changed = BTreeMap::new();
    while Instant::now() < until {
        note_changes(&fleet, &gone, &mut changed);
        std::thread::sleep(Duration::from_millis(300));
    }
    note_changes(&fleet, &gone, &mut changed);
    println!("mid-deploy outage: pids {gone:?}, deploys {view_before:?}, changed {changed:?}");
    for (host, set) in &changed {
        assert!(
            set.len() <= 1,
            "{host}: instances {set:?} were stopped while ZooKeeper was away (at most the batch in flight may finish)"
        );
    }
    zk.start_all();
    zk.wait_quorum(PATIENCE * 3);
    fleet.wait_all_serving(SVC, "b3", DEPLOY_PATIENCE);
    for h in &fleet.hosts {
        h.wait_until(|s| steady(s, "b3"), DEPLOY_PATIENCE);
        assert_eq!(front_build(h), "b3");
    }
    std::thread::sleep(Duration::from_millis(500));
    finish_loads(&fleet, loads, "ZooKeeper outages", 300);
    println!("outage test total {:?}", started.elapsed());
}

/// The first deploy onto a fresh host (local backend) brings up instances that could not start
/// before there was a release, even once they have given up (`fatal`) waiting for one.
#[test]
fn the_first_deploy_starts_instances_that_waited_for_a_release() {
    let Some(fleet) = Fleet::new(FleetOptions {
        hosts: 1,
        zookeepers: 0,
    }) else {
        return;
    };
    let Some(wheels) = wheel_dir() else {
        return;
    };
    let h = fleet.host(0);
    fleet.builds().good(SVC, "b1");
    h.service(SVC, &py_service(&wheels, ""));
    h.start_daemon();
    // Without a release the instances cannot start: they wait (or give up, `fatal`). Let them
    // wait past every start retry (start_retries 3, backoff from 500 ms) before the deploy.
    h.wait_until(
        |s| {
            let i = s.instances(SVC);
            i.len() == 2
                && i.iter().all(|i| {
                    i["pid"].is_null() && (i["state"] == "fatal" || i["last_error"].is_string())
                })
        },
        PATIENCE,
    );
    std::thread::sleep(Duration::from_secs(4));
    h.sluice(&["deploy", SVC, "b1"]).success();
    let status = h.wait_until(
        |s| s.service(SVC)["deploy"].is_null() && s.service(SVC)["build"] == "b1",
        DEPLOY_PATIENCE,
    );
    println!("after the deploy: {status}");
    h.wait_until(|s| steady(s, "b1"), PATIENCE);
    assert_eq!(front_build(h), "b1");
}

/// Every file named `name` under `dir` (symlinks not followed).
fn find_named(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if e.file_name() == name {
                found.push(path.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path);
            }
        }
    }
    found
}

/// e. Bad builds, one host on the local backend: each is refused with an error naming the culprit
/// in the host's status, and the old build keeps serving with the same processes.
#[test]
fn e_bad_builds_are_refused_and_the_old_build_keeps_serving() {
    let Some(fleet) = Fleet::new(FleetOptions {
        hosts: 1,
        zookeepers: 0,
    }) else {
        return;
    };
    let Some(wheels) = wheel_dir() else {
        return;
    };
    let h = fleet.host(0);
    let b = fleet.builds();
    b.good(SVC, "b1");
    h.service(SVC, &py_service(&wheels, "max_unpacked_bytes = 1000000"));
    h.start_daemon();
    h.sluice(&["deploy", SVC, "b1"]).success();
    let pids = h.wait_until(|s| steady(s, "b1"), DEPLOY_PATIENCE).pids(SVC);
    assert_eq!(front_build(h), "b1");

    let abs = h.path("escaped-abs");
    let hook_message = "post_install of bad-hook: the migration failed on purpose";
    // (build id, how it is bad, one of these must be in `deploy_error`)
    let cases: Vec<(&str, Option<Bad>, Vec<&str>)> = vec![
        (
            "bad-sha",
            Some(Bad::WrongSha256),
            vec!["checksum", "sha256"],
        ),
        (
            "bad-truncated",
            Some(Bad::Truncated),
            vec!["truncated", "corrupt", "unexpected end"],
        ),
        (
            "bad-dotdot",
            Some(Bad::DotDot {
                entry: "../../../../escaped-dotdot".into(),
            }),
            vec!["../../../../escaped-dotdot"],
        ),
        (
            "bad-abs",
            Some(Bad::Absolute { path: abs.clone() }),
            vec!["escaped-abs"],
        ),
        (
            "bad-link",
            Some(Bad::EscapingSymlink {
                target: "../../../../../../etc".into(),
            }),
            vec!["escape-link", "../../../../../../etc"],
        ),
        (
            "bad-big",
            Some(Bad::Oversized { bytes: 2_000_000 }),
            vec!["max_unpacked_bytes"],
        ),
        ("nosuch", None, vec!["nosuch"]),
        (
            "bad-hook",
            Some(Bad::FailingHook {
                message: hook_message.into(),
            }),
            vec!["post_install"],
        ),
    ];
    let mut previous = String::new();
    let mut report = Vec::new();
    let mut hook_status = None;
    for (id, how, culprits) in &cases {
        if let Some(how) = how {
            b.bad(SVC, id, how);
        }
        let t = Instant::now();
        let out = h.sluice(&["deploy", SVC, id]);
        let status = h.wait_until(
            |s| {
                let svc = s.service(SVC);
                svc["deploy"].is_null()
                    && svc["deploy_error"].as_str().is_some_and(|e| e != previous)
            },
            DEPLOY_PATIENCE,
        );
        let error = status.service(SVC)["deploy_error"]
            .as_str()
            .unwrap()
            .to_owned();
        report.push(format!(
            "{id} ({:?}, cli exit {:?}): {error}",
            t.elapsed(),
            out.code
        ));
        let lower = error.to_lowercase();
        assert!(
            culprits.iter().any(|c| lower.contains(&c.to_lowercase())),
            "{id}: deploy_error names none of {culprits:?}: {error}\n{status}"
        );
        if *id == "bad-hook" {
            // The hooks crate promises the hook's output tail in status (hooks/src/lib.rs);
            // checked after the other cases ran.
            hook_status = Some(status.to_string());
        }
        // The old build keeps serving, from the same processes.
        assert_eq!(status.service(SVC)["build"], "b1", "{id}: {status}");
        assert_eq!(status.pids(SVC), pids, "{id}: instances were restarted");
        assert!(status.all_running(SVC, 2), "{id}: {status}");
        assert_eq!(front_build(h), "b1", "{id}");
        let current = std::fs::read_link(h.path("data/py/current")).expect("current is a link");
        assert!(current.ends_with("b1"), "{id}: current -> {current:?}");
        previous = error;
    }
    println!("{}", report.join("\n"));
    assert!(
        !abs.exists(),
        "the absolute entry was written: {}",
        abs.display()
    );
    let escaped = find_named(h.root(), "escaped-dotdot");
    assert!(
        escaped.is_empty(),
        "the `..` entry was written: {escaped:?}"
    );
    for name in ["escape-link", "big.bin"] {
        let left: Vec<_> = find_named(&h.path("data/py/releases"), name);
        assert!(
            left.is_empty(),
            "a refused release is left behind: {left:?}"
        );
    }
    // Still nothing restarted, a while later.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(h.status().pids(SVC), pids);
    let hook_status = hook_status.expect("the hook case ran");
    assert!(
        hook_status.contains("migration failed on purpose"),
        "the failing hook's own output (its tail) is in the status, as hooks/src/lib.rs promises:\n{hook_status}"
    );
}

/// e. Invalid JSON in `/services/py/config`: the host reports it as `config_error` and changes
/// nothing.
#[test]
fn e_invalid_json_in_the_config_node_changes_nothing() {
    let Some((fleet, _builds)) = fleet_serving(1, 1, &["b1"]) else {
        return;
    };
    let h = fleet.host(0);
    let pids = h.status().pids(SVC);
    let bad = fleet.dir().join("bad.json");
    std::fs::write(&bad, "{bad").unwrap();
    let out = fleet.sluice(&["push-config", SVC, &bad.to_string_lossy()]);
    assert_ne!(
        out.code,
        Some(0),
        "`sluice push-config` accepted invalid JSON: {out}"
    );
    let node = "/sluice/services/py/config";
    let zk = fleet.zk();
    let set = zk.cli(&["set", node, "{bad"]);
    if set.code != Some(0) {
        assert!(set.stderr.contains("Node does not exist"), "{set}");
        zk.cli(&["create", node, "{bad"]).success();
    }
    let get = zk.cli(&["get", node]);
    assert!(get.stdout.lines().any(|l| l == "{bad"), "{get}");
    let status = h.wait_until(|s| s.service(SVC)["config_error"].is_string(), PATIENCE * 2);
    let error = status.service(SVC)["config_error"]
        .as_str()
        .unwrap()
        .to_owned();
    println!("config_error: {error}");
    let lower = error.to_lowercase();
    assert!(
        lower.contains("services/py/config") || lower.contains("json"),
        "config_error names the node or says it is not JSON: {error}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let status = h.status();
    assert_eq!(status.pids(SVC), pids, "instances were restarted: {status}");
    assert!(steady(&status, "b1"), "{status}");
    assert_eq!(front_build(h), "b1");
}

/// A Python service with `user` set, deployed with `stock:python-venv` (issue 8): root makes
/// `.venv` for the user, the hook builds the venv in it as that user, and the instances serve
/// from it as that user; the rest of the release stays root's.
#[test]
fn a_python_service_with_a_user_serves_from_its_venv() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(fleet) = Fleet::new(FleetOptions {
        hosts: 1,
        zookeepers: 0,
    }) else {
        return;
    };
    let Some(wheels) = wheel_dir() else {
        return;
    };
    let h = fleet.host(0);
    // The host's temp dir is 0700: the service user must reach its release under data/.
    std::fs::set_permissions(h.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    fleet.builds().good(SVC, "b1");
    h.service(
        SVC,
        &format!("user = \"nobody\"\n{}", py_service(&wheels, "")),
    );
    h.start_daemon();
    h.sluice(&["deploy", SVC, "b1"]).success();
    let status = h.wait_until(
        |s| s.service(SVC)["build"] == "b1" || s.service(SVC)["deploy_error"].is_string(),
        DEPLOY_PATIENCE,
    );
    assert!(
        status.service(SVC)["deploy_error"].is_null(),
        "the deploy failed: {status}\n{}",
        h.daemon_log_tail()
    );
    let status = h.wait_until(|s| steady(s, "b1"), PATIENCE);
    assert_eq!(front_build(h), "b1");

    let release = h.path("data/py/releases/b1");
    let owner = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().uid();
    assert_eq!(
        owner(&release.join(".venv")),
        65534,
        "the venv is the user's"
    );
    assert_eq!(owner(&release.join(".venv/bin/python")), 65534);
    assert_eq!(owner(&release), 0, "the release stays root's");
    assert_eq!(owner(&release.join("app.py")), 0);
    for pid in status.pids(SVC) {
        let pid = pid.expect("running instances have pids");
        let uid = sluice_tests::procs::status_field(pid, "Uid").unwrap_or_default();
        assert_eq!(uid, "65534 65534 65534 65534", "pid {pid} runs as nobody");
        let cmdline = sluice_tests::procs::get(pid).unwrap().cmdline.join(" ");
        assert!(
            cmdline.contains(&format!("{}/.venv/bin/", release.display())),
            "pid {pid} runs from the venv: {cmdline}"
        );
    }
}
