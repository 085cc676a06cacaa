//! `bench/fleet.sh`: one deploy of a large build across a fleet of hosts in racks, store-only
//! (every host fetches from the store) against through peers (`peers.enabled`), in one run on
//! the same machine: bytes out of the store, time from the deploy to the last host holding the
//! verified build (its release's install marker) and to the whole fleet serving, one host's own
//! fetch from the store alone as the baseline, and the brains' RSS.
//!
//! Usage: `fleet_bench OUT_PREFIX` (writes `OUT_PREFIX.md` and `OUT_PREFIX.json`); root, Debian's
//! ZooKeeper. Env: `BENCH_HOSTS` (24), `BENCH_RACKS` (4), `BENCH_BUILD_MB` (20, incompressible),
//! `BENCH_LINK_BYTES_PER_S` (12500000: the store's uplink and each host's
//! `peers.upload_bytes_per_s`), `BENCH_MAX_UPLOADS` (2: `peers.max_uploads`), `BENCH_TC` (1:
//! links shaped with tc at `BENCH_LINK_BYTES_PER_S` instead of the store's own pacing),
//! `BENCH_DEPLOY_TIMEOUT_S` (1200: the limit of one deploy), `BENCH_MODES` (`store,peers`; `zk`
//! for what ZooKeeper costs per host per deploy; `limit` for
//! a deploy under `max_hosts_restarting = BENCH_LIMIT_PERCENT%`, default 10). `BENCH_ZK_LIMIT`
//! sets `max_hosts_restarting` for the `zk` mode's deploys (default: the node absent, 1);
//! `BENCH_ZK_PEERS=1` has its hosts fetch through their peers (racks of `BENCH_RACKS`).
//!
//! Mode `zk` (`BENCH_MODES=zk`, `BENCH_DEPLOYS` deploys, default 20, of a tiny build): per host
//! and per deploy, the bytes and packets both ways between the host and ZooKeeper (iptables
//! counters in its own namespace; h1, where the bench runs its `sluice` commands, is left out),
//! the requests its sessions sent (the server's `cons`, reset by
//! `crst`), less the heartbeats of an idle window measured first; the watches the fleet holds
//! (`wchs`); each host's status writes (its status node's changes, seen by a watch of the
//! bench's own); and, from the `enabled` write (ZooKeeper's mtime of the node, the same clock as
//! every namespace's), the time to each host acting on it: its `deploy begins` log line, and its
//! first status change after it as the bench's watch sees it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sluice_tests::fleet::{
    Fleet, FleetOptions, HTTP_PORT, HUB_ADDR, LinkShape, http_get_bytes, light_service, noise,
    serving_status,
};
use sluice_tests::netns::run_in_named;
use sluice_tests::zkcost::{ByteMeter, StatusClock, Traffic, parse_cons, parse_wchs};

const SVC: &str = "web";
const BUILD: &str = "b1";
/// Limit of one deploy across the fleet: `BENCH_DEPLOY_TIMEOUT_S`, default 1200 (a store-only
/// deploy of 100 hosts × 200 MiB through a 100 Mbit/s uplink takes ~28 min).
fn deploy_timeout() -> Duration {
    Duration::from_secs(sluice_tests::benchkit::env_u64(
        "BENCH_DEPLOY_TIMEOUT_S",
        1200,
    ))
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: i32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// One `/proc/<pid>/status` field in KiB (or a count, for `Threads`).
fn status_kib(pid: i32, field: &str) -> Option<u64> {
    sluice_tests::procs::status_field(pid, field)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Median over the fleet's brains of each `/proc/<pid>/status` field.
fn brains_median(fleet: &sluice_tests::fleet::Fleet, fields: &[&str]) -> Value {
    let pids: Vec<i32> = fleet.hosts.iter().filter_map(|h| h.daemon_pid()).collect();
    let mut out = serde_json::Map::new();
    for field in fields {
        let values: Vec<f64> = pids
            .iter()
            .filter_map(|p| status_kib(*p, field))
            .map(|v| v as f64)
            .collect();
        out.insert((*field).to_owned(), json!(median(values)));
    }
    Value::Object(out)
}

/// The `n` largest brains by VmRSS, each with its status split and what its log says it did:
/// whether it read the store, how many transfers it took from peers, how many it retried.
fn largest_brains(fleet: &sluice_tests::fleet::Fleet, n: usize) -> Value {
    let mut brains: Vec<(u64, Value)> = fleet
        .hosts
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let pid = h.daemon_pid()?;
            let rss = status_kib(pid, "VmRSS")?;
            let log = h.daemon_log_text();
            Some((
                rss,
                json!({
                    "host": i,
                    "VmRSS": rss,
                    "RssAnon": status_kib(pid, "RssAnon"),
                    "RssFile": status_kib(pid, "RssFile"),
                    "Threads": status_kib(pid, "Threads"),
                    "from_store": log.contains("fetching from the store"),
                    "peer_fetches": log.matches("fetching from a peer").count(),
                    "retries": log.matches("retrying elsewhere").count(),
                }),
            ))
        })
        .collect();
    brains.sort_by_key(|b| std::cmp::Reverse(b.0));
    Value::Array(brains.into_iter().take(n).map(|(_, v)| v).collect())
}

struct Settings {
    hosts: usize,
    racks: usize,
    build_bytes: usize,
    link: u64,
    /// `peers.max_uploads` of every host.
    max_uploads: u64,
    /// Links shaped with tc (`tbf`, every host both ways and the store's uplink at `link`)
    /// instead of the store's own pacing.
    tc: bool,
}

/// The bench's fleet: `s.hosts` hosts, one ZooKeeper server, 10 s sessions, each host's file
/// extended by `extra(i)`.
fn bench_fleet(s: &Settings, extra: &dyn Fn(usize) -> String) -> Fleet {
    Fleet::new_with(
        FleetOptions {
            hosts: s.hosts,
            zookeepers: 1,
        },
        10_000,
        extra,
    )
    .expect("a fleet (root, ZooKeeper)")
}

/// Host `i`'s rack line: racks of `per_rack` hosts, `r1` first.
fn rack_line(i: usize, per_rack: usize) -> String {
    format!("rack = \"r{}\"\n", i / per_rack + 1)
}

/// Host `i`'s host file lines: its rack, and a `[peers]` section when `peers`.
fn host_lines(s: &Settings, i: usize, peers: bool) -> String {
    let mut text = rack_line(i, s.hosts.div_ceil(s.racks));
    if peers {
        text += &format!(
            "[peers]\nenabled = true\nadvertise = \"10.199.0.{}:7480\"\nupload_bytes_per_s = {}\nmax_uploads = {}\n",
            11 + i,
            s.link,
            s.max_uploads
        );
    }
    text
}

fn run(mode: &str, s: &Settings) -> Value {
    let peers = mode == "peers";
    let fleet = bench_fleet(s, &|i| host_lines(s, i, peers));
    if s.tc {
        fleet.shape_links(LinkShape {
            host_rate_bits: s.link * 8,
            host_delay_us: 0,
            store_rate_bits: s.link * 8,
        });
    } else {
        fleet.http().set_uplink(s.link);
    }
    let build = fleet.builds().good_with(
        SVC,
        BUILD,
        &[("noise.bin", &noise(s.build_bytes, 7), 0o644)],
    );
    let size = std::fs::metadata(&build.file).expect("the archive").len();
    fleet.service(SVC, &light_service(SVC));

    // Baseline: one host's own fetch of the archive from the store, alone on its uplink.
    let addr: SocketAddr = format!("{HUB_ADDR}:{HTTP_PORT}").parse().unwrap();
    let t = Instant::now();
    let (status, body) = run_in_named(&fleet.hosts[0].netns, || {
        http_get_bytes(addr, &build.path, deploy_timeout())
    })
    .expect("the baseline fetch");
    assert_eq!((status, body.len() as u64), (200, size), "baseline fetch");
    let one_fetch_ms = t.elapsed().as_secs_f64() * 1000.0;
    let baseline_bytes = fleet.http().bytes(&build.path);

    fleet.start_daemons();
    fleet.register_with_size(SVC, &build);
    let t0 = now_ms();
    fleet.sluice(&["deploy", SVC, BUILD]).success();
    fleet.wait_all_serving(SVC, BUILD, deploy_timeout());
    let serving_ms = now_ms() - t0;
    let verified: Vec<f64> = fleet
        .hosts
        .iter()
        .map(|h| {
            let marker = h.path(&format!("data/{SVC}/releases/{BUILD}/.sluice/installed"));
            let nanos: f64 = std::fs::read_to_string(&marker)
                .expect("an install marker")
                .trim()
                .parse()
                .expect("nanoseconds");
            nanos / 1e6 - t0
        })
        .collect();
    let last_verified_ms = verified.iter().copied().fold(0.0, f64::max);
    let store_bytes = fleet.http().bytes(&build.path) - baseline_bytes;
    let rss: Vec<f64> = fleet
        .hosts
        .iter()
        .filter_map(|h| h.daemon_pid().and_then(rss_kib))
        .map(|k| k as f64)
        .collect();
    // The same brains once the deploy's threads have gone idle and exited (tokio ends an idle
    // blocking thread after 10 s): what a brain holds after a deploy, not during its tail.
    let fields = ["VmRSS", "RssAnon", "RssFile", "Threads"];
    let right_after = brains_median(&fleet, &fields);
    let largest = largest_brains(&fleet, 5);
    std::thread::sleep(Duration::from_secs(sluice_tests::benchkit::env_u64(
        "BENCH_RSS_SETTLE_S",
        15,
    )));
    let settled = brains_median(&fleet, &fields);
    let largest_settled = largest_brains(&fleet, 5);
    let result = json!({
        "mode": mode,
        "brain_status_median_right_after": right_after,
        "brain_status_median_settled": settled,
        "brains_largest_right_after": largest,
        "brains_largest_settled": largest_settled,
        "archive_bytes": size,
        "one_host_fetch_ms": one_fetch_ms,
        "store_bytes": store_bytes,
        "store_copies": store_bytes as f64 / size as f64,
        "deploy_to_last_verified_ms": last_verified_ms,
        "deploy_to_median_verified_ms": median(verified.clone()),
        "last_verified_over_one_fetch": last_verified_ms / one_fetch_ms,
        "deploy_to_all_serving_ms": serving_ms,
        "brain_rss_kib_median": median(rss.clone()),
        "brain_rss_kib_max": rss.iter().copied().fold(0.0, f64::max),
    });
    eprintln!("{mode}: {result}");
    result
}

/// `max_hosts_restarting = P%`: the time from the `enabled` write to the whole fleet serving a
/// new build, against ⌈hosts / limit⌉ × one host's own restart of its instances (`sluice
/// restart` on one host of the same fleet at a limit of 100%, the median of three, measured
/// right before each deploy). `BENCH_LIMIT_REPEAT` deploys (default 3) in one fleet; the result
/// is each deploy's and their median.
fn run_limit(s: &Settings, percent: u64) -> Value {
    let repeat = sluice_tests::benchkit::env_u64("BENCH_LIMIT_REPEAT", 3).max(1) as usize;
    let per_rack = s.hosts.div_ceil(s.racks);
    let extra = move |i: usize| rack_line(i, per_rack);
    let fleet = bench_fleet(s, &extra);
    let builds: Vec<_> = (1..=repeat + 1)
        .map(|k| fleet.builds().good(SVC, &format!("b{k}")))
        .collect();
    fleet.service(SVC, &light_service(SVC));
    fleet.start_daemons();
    for b in &builds {
        fleet.register(SVC, b);
    }
    fleet.sluice(&["limit", SVC, "100%"]).success();
    fleet.sluice(&["deploy", SVC, "b1"]).success();
    fleet.wait_all_serving(SVC, "b1", deploy_timeout());
    let limit = (s.hosts * percent as usize / 100).max(1);
    let batches = s.hosts.div_ceil(limit);
    let zk = fleet.zk();
    let mut deploys = Vec::new();
    for b in &builds[1..] {
        let build = b.id.as_str();
        fleet.sluice(&["limit", SVC, "100%"]).success();
        let restarts: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                fleet.host(1).sluice(&["restart", SVC]).success();
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        let one_restart_ms = median(restarts.clone());
        // The same restart on `limit` hosts at once: what one batch costs when its hosts share
        // this machine's cores (in a data centre each host has its own).
        let batch_restarts: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                std::thread::scope(|scope| {
                    for i in 0..limit {
                        let host = fleet.host(i);
                        scope.spawn(move || host.sluice(&["restart", SVC]).success());
                    }
                });
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        let batch_restart_ms = median(batch_restarts.clone());
        fleet
            .sluice(&["limit", SVC, &format!("{percent}%")])
            .success();
        // Each host's status node, read as it changes: when the last host said it serves the
        // build, without the lag of polling `sluice hosts` (one look reads every status node).
        let clock = StatusClock::start_reading(
            &fleet.hub().name,
            zk.servers_string(),
            format!("/sluice/services/{SVC}/status"),
        );
        let t0 = Instant::now();
        let t0_ms = now_ms();
        fleet.sluice(&["deploy", SVC, build]).success();
        fleet.wait_all_serving(SVC, build, deploy_timeout());
        let polled_ms = t0.elapsed().as_secs_f64() * 1000.0;
        // Serving: the host's deploy and restart are done (every instance passed its health
        // check) on the build. Running: also every instance up for `startup_ms` (1 s), the
        // stricter test `wait_all_serving` polls for.
        let first_serving = clock.first_matching(t0_ms as u64, |v| {
            v["build"] == build
                && v["state"] == "serving"
                && v["instances"].as_array().is_some_and(|i| {
                    !i.is_empty()
                        && i.iter()
                            .all(|i| i["state"] == "running" || i["state"] == "starting")
                })
        });
        let first_running = clock.first_matching(t0_ms as u64, |v| serving_status(v, build));
        drop(clock);
        assert_eq!(
            (first_serving.len(), first_running.len()),
            (s.hosts, s.hosts),
            "the status clock saw every host serve {build}"
        );
        let last = |m: &BTreeMap<String, u64>| m.values().copied().max().unwrap_or(0) as f64;
        let serving_ms = last(&first_serving);
        let deploy = json!({
            "build": build,
            "one_host_restart_ms": one_restart_ms,
            "one_host_restarts_ms": restarts,
            "deploy_to_all_serving_ms": serving_ms,
            "deploy_to_all_serving_polled_ms": polled_ms,
            "deploy_to_all_running_ms": last(&first_running),
            "serving_over_batches_times_restart": serving_ms / (batches as f64 * one_restart_ms),
            "batch_restart_ms": batch_restart_ms,
            "batch_restarts_ms": batch_restarts,
            "serving_over_batches_times_batch_restart":
                serving_ms / (batches as f64 * batch_restart_ms),
            "timeline": limit_timeline(&fleet, build, t0_ms, limit),
        });
        eprintln!("limit deploy: {deploy}");
        deploys.push(deploy);
    }
    let of = |k: &str| -> f64 {
        median(
            deploys
                .iter()
                .map(|d| d[k].as_f64().unwrap_or(f64::NAN))
                .collect(),
        )
    };
    let result = json!({
        "mode": "limit",
        "percent": percent,
        "limit_hosts": limit,
        "batches": batches,
        "one_host_restart_ms": of("one_host_restart_ms"),
        "deploy_to_all_serving_ms": of("deploy_to_all_serving_ms"),
        "deploy_to_all_serving_polled_ms": of("deploy_to_all_serving_polled_ms"),
        "deploy_to_all_running_ms": of("deploy_to_all_running_ms"),
        "serving_over_batches_times_restart": of("serving_over_batches_times_restart"),
        "batch_restart_ms": of("batch_restart_ms"),
        "serving_over_batches_times_batch_restart": of("serving_over_batches_times_batch_restart"),
        "deploys": deploys,
    });
    eprintln!("limit: {result}");
    result
}

/// Where a limited deploy's time went, from each host's own log (ms after `t0_ms`, the
/// `sluice deploy` call): `deploy begins` → `installed` → `holding a restart slot` →
/// `deployed` of `build`. `slot_busy_share` is the hosts' time holding a slot (holding →
/// deployed) over `limit` slots for the span from the first holding to the last deployed: 1.0
/// would be slots never idle between one host's end and the next host's start.
fn limit_timeline(fleet: &Fleet, build: &str, t0_ms: f64, limit: usize) -> Value {
    let mut hosts = Vec::new();
    for h in &fleet.hosts {
        let log = h.daemon_log_text();
        let at = |needle: &str, after: f64| {
            sluice_tests::benchkit::log_ms_after(&log, needle, after).map(|t| t - t0_ms)
        };
        let began = at(
            &format!("deploy begins service={SVC} build=\"{build}\""),
            t0_ms,
        );
        let installed = at(
            &format!("installed; restarting onto it service={SVC} build=\"{build}\""),
            t0_ms,
        );
        let holding = installed.and_then(|i| at("holding a restart slot", t0_ms + i));
        let deployed = at(&format!("deployed service={SVC} build=\"{build}\""), t0_ms);
        if let (Some(b), Some(i), Some(s), Some(d)) = (began, installed, holding, deployed) {
            hosts.push([b, i, s, d]);
        }
    }
    let col = |k: usize| hosts.iter().map(|h| h[k]).collect::<Vec<f64>>();
    let held: Vec<f64> = hosts.iter().map(|h| h[3] - h[2]).collect();
    let waited: Vec<f64> = hosts.iter().map(|h| h[2] - h[1]).collect();
    let first_holding = col(2).into_iter().fold(f64::INFINITY, f64::min);
    let last_deployed = col(3).into_iter().fold(0.0, f64::max);
    let span = last_deployed - first_holding;
    json!({
        "hosts_read": hosts.len(),
        "began_ms_median": median(col(0)),
        "installed_ms_median": median(col(1)),
        "installed_ms_last": col(1).into_iter().fold(0.0, f64::max),
        "first_holding_ms": first_holding,
        "last_deployed_ms": last_deployed,
        "queue_wait_ms_median": median(waited),
        "holding_to_deployed_ms_median": median(held.clone()),
        "holding_to_deployed_ms_max": held.iter().copied().fold(0.0, f64::max),
        "slot_busy_share": held.iter().sum::<f64>() / (limit as f64 * span),
    })
}

/// The `p`th percentile (0–100) of `v`, nearest rank.
fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// How long the idle window lasts, from which the heartbeats per host per second are taken.
const ZK_IDLE_MS: u64 = 10_000;
/// Quiet after each deploy before the counters are read (the last status writes land).
const ZK_SETTLE_MS: u64 = 1_000;

/// ZooKeeper's cost per host per deploy, and `enabled` → every host acting, over many deploys.
fn run_zk(s: &Settings, deploys: usize) -> Value {
    // `BENCH_ZK_PEERS=1`: the hosts fetch through their peers (racks, elections, peer nodes).
    let peers = sluice_tests::benchkit::env_u64("BENCH_ZK_PEERS", 0) == 1;
    let fleet = bench_fleet(s, &|i| {
        if peers {
            host_lines(s, i, true)
        } else {
            String::new()
        }
    });
    fleet.service(SVC, &light_service(SVC));
    let builds: Vec<_> = (0..=deploys)
        .map(|i| fleet.builds().good(SVC, &format!("b{i}")))
        .collect();
    fleet.start_daemons();
    for b in &builds {
        fleet.register_with_size(SVC, b);
    }
    // `BENCH_ZK_LIMIT` (e.g. `100%`): `max_hosts_restarting` for the deploys, so that many deploys
    // of a large fleet fit in a run (the `enabled` → acting latency does not depend on it; the
    // requests of the slot queue do).
    if let Ok(limit) = std::env::var("BENCH_ZK_LIMIT") {
        fleet.sluice(&["limit", SVC, &limit]).success();
    }
    fleet.sluice(&["deploy", SVC, &builds[0].id]).success();
    fleet.wait_all_serving(SVC, &builds[0].id, deploy_timeout());
    std::thread::sleep(Duration::from_millis(ZK_SETTLE_MS));

    let zk = fleet.zk();
    let ports = (zk.port(0), zk.port(zk.len() - 1));
    // h1 is where the bench runs its `sluice` commands (the deploys, and `hosts --json` while it
    // waits): its sessions are the deployer's, not a host's, so only h2… are metered.
    assert!(s.hosts >= 2, "the zk mode needs two hosts or more");
    let metered = &fleet.hosts[1..];
    let meters: Vec<ByteMeter> = metered
        .iter()
        .map(|h| ByteMeter::install(&h.netns, HUB_ADDR, ports))
        .collect();
    let clock = StatusClock::start(
        &fleet.hub().name,
        zk.servers_string(),
        format!("/sluice/services/{SVC}/status"),
    );
    let cons = || -> BTreeMap<String, (u64, u64)> {
        parse_cons(&zk.four_letter(0, "cons").expect("cons answers"))
    };
    let traffic = || -> Vec<Traffic> { meters.iter().map(ByteMeter::read).collect() };
    let requests = |before: &BTreeMap<String, (u64, u64)>, after: &BTreeMap<String, (u64, u64)>| {
        metered
            .iter()
            .map(|h| {
                let a = after.get(&h.addr).map_or(0, |c| c.0);
                let b = before.get(&h.addr).map_or(0, |c| c.0);
                a.saturating_sub(b) as f64
            })
            .collect::<Vec<f64>>()
    };

    // Idle: heartbeats only.
    zk.four_letter(0, "crst").expect("crst answers");
    let (c0, t0, idle_start) = (cons(), traffic(), Instant::now());
    std::thread::sleep(Duration::from_millis(ZK_IDLE_MS));
    let (c1, t1) = (cons(), traffic());
    let idle_s = idle_start.elapsed().as_secs_f64();
    let idle_requests_per_s: Vec<f64> = requests(&c0, &c1).iter().map(|r| r / idle_s).collect();
    let idle_bytes_per_s: Vec<f64> = t1
        .iter()
        .zip(&t0)
        .map(|(a, b)| {
            let d = a.minus(*b);
            (d.bytes_out + d.bytes_in) as f64 / idle_s
        })
        .collect();
    let watches = parse_wchs(&zk.four_letter(0, "wchs").expect("wchs answers"));

    let mut per_deploy = Vec::new();
    let mut acting_all = Vec::new();
    let mut acting_last = Vec::new();
    let mut began_all = Vec::new();
    let mut began_last = Vec::new();
    for b in &builds[1..] {
        let (cb, tb, start) = (cons(), traffic(), Instant::now());
        let written_ms = sluice_tests::nemesis::now_ms();
        fleet.sluice(&["deploy", SVC, &b.id]).success();
        fleet.wait_all_serving(SVC, &b.id, deploy_timeout());
        std::thread::sleep(Duration::from_millis(ZK_SETTLE_MS));
        let (ca, ta) = (cons(), traffic());
        let window_s = start.elapsed().as_secs_f64();
        let reqs: Vec<f64> = requests(&cb, &ca)
            .iter()
            .zip(&idle_requests_per_s)
            .map(|(r, idle)| (r - idle * window_s).max(0.0))
            .collect();
        let bytes: Vec<f64> = ta
            .iter()
            .zip(&tb)
            .zip(&idle_bytes_per_s)
            .map(|((a, b), idle)| {
                let d = a.minus(*b);
                ((d.bytes_out + d.bytes_in) as f64 - idle * window_s).max(0.0)
            })
            .collect();
        let writes = clock.changes_between(written_ms, sluice_tests::nemesis::now_ms());
        let status_writes: Vec<f64> = metered
            .iter()
            .map(|h| writes.get(&h.name).copied().unwrap_or(0) as f64)
            .collect();
        // From ZooKeeper's own time of the `enabled` write (not from the `sluice deploy` call,
        // whose process start and session are the bench's, not the fleet's).
        let enabled_ms = clock
            .mtime_ms(&format!("/sluice/services/{SVC}/enabled"))
            .expect("the enabled node's mtime");
        let acting = clock.first_after(enabled_ms);
        let acted: Vec<f64> = fleet
            .hosts
            .iter()
            .map(|h| acting.get(&h.name).map_or(f64::NAN, |ms| *ms as f64))
            .collect();
        assert!(
            acted.iter().all(|a| a.is_finite()),
            "every host's status changed after the write of {}: {acting:?}",
            b.id
        );
        let needle = format!("deploy begins service={SVC} build=\"{}\"", b.id);
        let began: Vec<f64> = fleet
            .hosts
            .iter()
            .map(|h| {
                sluice_tests::benchkit::log_ms(&h.daemon_log_text(), &needle)
                    .map_or(f64::NAN, |t| t - enabled_ms as f64)
            })
            .collect();
        assert!(
            began.iter().all(|a| a.is_finite()),
            "every host logged `{needle}`: {began:?}"
        );
        acting_last.push(acted.iter().copied().fold(0.0, f64::max));
        acting_all.extend(acted.iter().copied());
        began_last.push(began.iter().copied().fold(0.0, f64::max));
        began_all.extend(began.iter().copied());
        eprintln!(
            "zk: deploy {}: requests/host median {:.1}, bytes/host median {:.0}, last host acting {:.0} ms",
            b.id,
            median(reqs.clone()),
            median(bytes.clone()),
            acting_last.last().copied().unwrap_or(f64::NAN)
        );
        per_deploy.push(json!({
            "build": b.id,
            "window_s": window_s,
            "requests_per_host_median": median(reqs.clone()),
            "requests_per_host_max": reqs.iter().copied().fold(0.0, f64::max),
            "bytes_per_host_median": median(bytes.clone()),
            "bytes_per_host_max": bytes.iter().copied().fold(0.0, f64::max),
            "acting_ms_last_host": acting_last.last(),
            "began_ms_last_host": began_last.last(),
            "status_writes_per_host_median": median(status_writes.clone()),
        }));
    }
    let column =
        |key: &str| -> Vec<f64> { per_deploy.iter().filter_map(|d| d[key].as_f64()).collect() };
    let result = json!({
        "mode": "zk",
        "deploys": deploys,
        "peers": peers,
        "idle_requests_per_host_per_s_median": median(idle_requests_per_s.clone()),
        "idle_bytes_per_host_per_s_median": median(idle_bytes_per_s.clone()),
        "watches": watches.map(|(c, p, t)| json!({"connections": c, "paths": p, "total": t})),
        "requests_per_host_per_deploy_median": median(column("requests_per_host_median")),
        "requests_per_host_per_deploy_max": column("requests_per_host_max").iter().copied().fold(0.0, f64::max),
        "bytes_per_host_per_deploy_median": median(column("bytes_per_host_median")),
        "bytes_per_host_per_deploy_max": column("bytes_per_host_max").iter().copied().fold(0.0, f64::max),
        "status_writes_per_host_per_deploy_median": median(column("status_writes_per_host_median")),
        "acting_ms_every_host_median": median(acting_all.clone()),
        "acting_ms_every_host_p99": percentile(acting_all.clone(), 99.0),
        "acting_ms_last_host_median": median(acting_last.clone()),
        "acting_ms_last_host_p99": percentile(acting_last.clone(), 99.0),
        "began_ms_every_host_median": median(began_all.clone()),
        "began_ms_every_host_p99": percentile(began_all.clone(), 99.0),
        "began_ms_last_host_median": median(began_last.clone()),
        "began_ms_last_host_p99": percentile(began_last.clone(), 99.0),
        "per_deploy": per_deploy,
    });
    eprintln!("zk: {result}");
    result
}

fn main() {
    let out_prefix = std::env::args()
        .nth(1)
        .expect("usage: fleet_bench OUT_PREFIX");
    let settings = Settings {
        hosts: sluice_tests::benchkit::env_u64("BENCH_HOSTS", 24) as usize,
        racks: sluice_tests::benchkit::env_u64("BENCH_RACKS", 4) as usize,
        build_bytes: (sluice_tests::benchkit::env_u64("BENCH_BUILD_MB", 20) << 20) as usize,
        link: sluice_tests::benchkit::env_u64("BENCH_LINK_BYTES_PER_S", 12_500_000),
        max_uploads: sluice_tests::benchkit::env_u64("BENCH_MAX_UPLOADS", 2),
        tc: sluice_tests::benchkit::env_u64("BENCH_TC", 0) == 1,
    };
    let percent = sluice_tests::benchkit::env_u64("BENCH_LIMIT_PERCENT", 10);
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "store,peers".into());
    let machine = sluice_tests::benchkit::machine(&[(
        "zookeeper",
        "dpkg-query -W -f='${Version}' zookeeper 2>/dev/null",
    )]);
    let deploys = sluice_tests::benchkit::env_u64("BENCH_DEPLOYS", 20) as usize;
    let runs: Vec<Value> = modes
        .split(',')
        .map(|m| match m.trim() {
            "zk" => run_zk(&settings, deploys),
            "limit" => run_limit(&settings, percent),
            m => run(m, &settings),
        })
        .collect();
    let report = json!({
        "benchmark": "fleet",
        "machine": machine,
        "hosts": settings.hosts,
        "racks": settings.racks,
        "build_mb_incompressible": settings.build_bytes >> 20,
        "link_bytes_per_s": settings.link,
        "peers_max_uploads": settings.max_uploads,
        "links": if settings.tc {
            "tc tbf at link_bytes_per_s on each host's veth both ways and on the hub's br0 (the store's and ZooKeeper's uplink); each host's uploads also bounded by peers.upload_bytes_per_s = link_bytes_per_s; no added latency (no sch_netem in this kernel)"
        } else {
            "the store's uplink paced by the harness's store to link_bytes_per_s for all responses together; each host's uploads paced by peers.upload_bytes_per_s = link_bytes_per_s; veths otherwise unlimited (no tc)"
        },
        "runs": runs,
        "load_average_after": sluice_tests::benchkit::sh("cut -d' ' -f1-3 /proc/loadavg"),
    });
    std::fs::write(
        format!("{out_prefix}.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .expect("writing the json");
    let mut md = format!(
        "# fleet deploy: {} hosts in {} racks, {} MiB build, link {} B/s, peers.max_uploads {}\n",
        settings.hosts,
        settings.racks,
        settings.build_bytes >> 20,
        settings.link,
        settings.max_uploads
    );
    let fetch_runs = report["runs"].as_array().is_some_and(|runs| {
        runs.iter()
            .any(|r| r["mode"] == "store" || r["mode"] == "peers")
    });
    if fetch_runs {
        md += "\n| mode | store copies | one host's fetch ms | deploy → last verified ms | ÷ one fetch | deploy → all serving ms | brain RSS KiB median / max |\n| --- | --- | --- | --- | --- | --- | --- |\n";
    }
    for r in &report["runs"].as_array().cloned().unwrap_or_default() {
        if r["mode"] == "zk" || r["mode"] == "limit" {
            continue;
        }
        md += &format!(
            "| {} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} / {:.0} |\n",
            r["mode"].as_str().unwrap_or("?"),
            r["store_copies"].as_f64().unwrap_or(f64::NAN),
            r["one_host_fetch_ms"].as_f64().unwrap_or(f64::NAN),
            r["deploy_to_last_verified_ms"].as_f64().unwrap_or(f64::NAN),
            r["last_verified_over_one_fetch"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["deploy_to_all_serving_ms"].as_f64().unwrap_or(f64::NAN),
            r["brain_rss_kib_median"].as_f64().unwrap_or(f64::NAN),
            r["brain_rss_kib_max"].as_f64().unwrap_or(f64::NAN),
        );
    }
    for r in &report["runs"].as_array().cloned().unwrap_or_default() {
        let (after, settled) = (
            &r["brain_status_median_right_after"],
            &r["brain_status_median_settled"],
        );
        if after.is_null() {
            continue;
        }
        let show = |v: &Value| {
            format!(
                "VmRSS {} KiB (anon {}, file {}), {} threads",
                v["VmRSS"], v["RssAnon"], v["RssFile"], v["Threads"]
            )
        };
        md += &format!(
            "\n{}: the brains after the deploy, medians: right after, {}; {} s later, {}.\n",
            r["mode"].as_str().unwrap_or("?"),
            show(after),
            sluice_tests::benchkit::env_u64("BENCH_RSS_SETTLE_S", 15),
            show(settled)
        );
    }
    for r in &report["runs"].as_array().cloned().unwrap_or_default() {
        if r["mode"] != "zk" {
            continue;
        }
        md += &format!(
            "\n## ZooKeeper per host per deploy ({} deploys)\n\n| requests median / max | of them status writes | bytes median / max | idle requests/s, bytes/s | watches (connections, paths, total) | enabled → host's status changed ms median / p99 | → last host's median / p99 |\n| --- | --- | --- | --- | --- | --- | --- |\n| {:.1} / {:.0} | {:.1} | {:.0} / {:.0} | {:.2}, {:.0} | {} | {:.0} / {:.0} | {:.0} / {:.0} |\n\n\
             `enabled` written (ZooKeeper's mtime of the node) → `deploy begins` in each host's own log, ms: every host median {:.0} / p99 {:.0}; \
             last host per deploy median {:.0} / p99 {:.0}. The status columns end when the bench's own watch saw the host's first \
             status write after it.\n",
            r["deploys"],
            r["requests_per_host_per_deploy_median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["requests_per_host_per_deploy_max"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["status_writes_per_host_per_deploy_median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["bytes_per_host_per_deploy_median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["bytes_per_host_per_deploy_max"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["idle_requests_per_host_per_s_median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["idle_bytes_per_host_per_s_median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["watches"],
            r["acting_ms_every_host_median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["acting_ms_every_host_p99"].as_f64().unwrap_or(f64::NAN),
            r["acting_ms_last_host_median"].as_f64().unwrap_or(f64::NAN),
            r["acting_ms_last_host_p99"].as_f64().unwrap_or(f64::NAN),
            r["began_ms_every_host_median"].as_f64().unwrap_or(f64::NAN),
            r["began_ms_every_host_p99"].as_f64().unwrap_or(f64::NAN),
            r["began_ms_last_host_median"].as_f64().unwrap_or(f64::NAN),
            r["began_ms_last_host_p99"].as_f64().unwrap_or(f64::NAN),
        );
    }
    for r in &report["runs"].as_array().cloned().unwrap_or_default() {
        if r["mode"] != "limit" {
            continue;
        }
        let n = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        md += &format!(
            "\n## max_hosts_restarting = {}% ({} hosts at once, {} batches)\n\n| deploy | one host's restart ms (median of 3, right before) | enabled → all serving ms (watched) | all running: watched / polled | ÷ (batches × one restart) | {} hosts' restart at once ms | ÷ (batches × that) |\n| --- | --- | --- | --- | --- | --- | --- |\n",
            r["percent"], r["limit_hosts"], r["batches"], r["limit_hosts"],
        );
        let deploys = r["deploys"].as_array().cloned().unwrap_or_default();
        for d in &deploys {
            md += &format!(
                "| {} | {:.0} | {:.0} | {:.0} / {:.0} | {:.2} | {:.0} | {:.2} |\n",
                d["build"].as_str().unwrap_or("?"),
                n(d, "one_host_restart_ms"),
                n(d, "deploy_to_all_serving_ms"),
                n(d, "deploy_to_all_running_ms"),
                n(d, "deploy_to_all_serving_polled_ms"),
                n(d, "serving_over_batches_times_restart"),
                n(d, "batch_restart_ms"),
                n(d, "serving_over_batches_times_batch_restart"),
            );
        }
        md += &format!(
            "| median | {:.0} | {:.0} | {:.0} / {:.0} | {:.2} | {:.0} | {:.2} |\n",
            n(r, "one_host_restart_ms"),
            n(r, "deploy_to_all_serving_ms"),
            n(r, "deploy_to_all_running_ms"),
            n(r, "deploy_to_all_serving_polled_ms"),
            n(r, "serving_over_batches_times_restart"),
            n(r, "batch_restart_ms"),
            n(r, "serving_over_batches_times_batch_restart"),
        );
        md += "\nAll serving (watched): the last host's first status node saying `serving` the build (its deploy and restart done, every instance past its health check), read by a watch of the bench's own. All running: also every instance up for `startup_ms` (1 s), watched, and as polling `sluice hosts --json` every 100 ms saw it. One host's restart is `sluice restart` returning, which is at the health check too.\n";
        for d in &deploys {
            let t = &d["timeline"];
            let f = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
            md += &format!(
                "\n{} from the hosts' logs ({} hosts), ms after `sluice deploy`: deploy begins (median) {:.0}; installed median {:.0}, last {:.0}; first host holding a slot {:.0}; last host deployed {:.0}. Per host: queue wait (installed → holding) median {:.0}; holding → deployed median {:.0}, max {:.0}; slots busy {:.0} % of the span from the first holding to the last deployed.\n",
                d["build"].as_str().unwrap_or("?"),
                t["hosts_read"],
                f("began_ms_median"),
                f("installed_ms_median"),
                f("installed_ms_last"),
                f("first_holding_ms"),
                f("last_deployed_ms"),
                f("queue_wait_ms_median"),
                f("holding_to_deployed_ms_median"),
                f("holding_to_deployed_ms_max"),
                f("slot_busy_share") * 100.0,
            );
        }
    }
    md += &format!("\nlinks: {}\n", report["links"]);
    md += &format!("\nmachine: {}\n", report["machine"]);
    std::fs::write(format!("{out_prefix}.md"), md).expect("writing the md");
}
