//! `bench/fleet.sh`: one deploy of a large build across a fleet of hosts in racks, store-only
//! (every host fetches from the store) against through peers (`peers.enabled`), in one run on
//! the same machine: bytes out of the store, time from the deploy to the last host holding the
//! verified build (its release's install marker) and to the whole fleet serving, one host's own
//! fetch from the store alone as the baseline, and the brains' RSS.
//!
//! Usage: `fleet_bench OUT_PREFIX` (writes `OUT_PREFIX.md` and `OUT_PREFIX.json`); root, Debian's
//! ZooKeeper. Env: `BENCH_HOSTS` (24), `BENCH_RACKS` (4), `BENCH_BUILD_MB` (20, incompressible),
//! `BENCH_LINK_BYTES_PER_S` (12500000: the store's uplink and each host's
//! `peers.upload_bytes_per_s`), `BENCH_MAX_UPLOADS` (4: `peers.max_uploads`), `BENCH_MODES`
//! (`store,peers`).

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sluice_tests::fleet::{
    Fleet, FleetOptions, HTTP_PORT, HUB_ADDR, http_get_bytes, light_service, noise,
};
use sluice_tests::netns::run_in_named;

const SVC: &str = "web";
const BUILD: &str = "b1";
/// Limit of one deploy across the fleet.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(1200);

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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

struct Settings {
    hosts: usize,
    racks: usize,
    build_bytes: usize,
    link: u64,
    /// `peers.max_uploads` of every host.
    max_uploads: u64,
}

fn run(mode: &str, s: &Settings) -> Value {
    let per_rack = s.hosts.div_ceil(s.racks);
    let peers = mode == "peers";
    let link = s.link;
    let max_uploads = s.max_uploads;
    let extra = move |i: usize| {
        let mut text = format!("rack = \"r{}\"\n", i / per_rack + 1);
        if peers {
            text += &format!(
                "[peers]\nenabled = true\nadvertise = \"10.199.0.{}:7480\"\nupload_bytes_per_s = {link}\nmax_uploads = {max_uploads}\n",
                11 + i
            );
        }
        text
    };
    let fleet = Fleet::new_with(
        FleetOptions {
            hosts: s.hosts,
            zookeepers: 1,
        },
        10_000,
        &extra,
    )
    .expect("a fleet (root, ZooKeeper)");
    fleet.http().set_uplink(s.link);
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
        http_get_bytes(addr, &build.path, DEPLOY_TIMEOUT)
    })
    .expect("the baseline fetch");
    assert_eq!((status, body.len() as u64), (200, size), "baseline fetch");
    let one_fetch_ms = t.elapsed().as_secs_f64() * 1000.0;
    let baseline_bytes = fleet.http().bytes(&build.path);

    fleet.start_daemons();
    fleet.register_with_size(SVC, &build);
    let t0 = now_ms();
    fleet.sluice(&["deploy", SVC, BUILD]).success();
    fleet.wait_all_serving(SVC, BUILD, DEPLOY_TIMEOUT);
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
    let result = json!({
        "mode": mode,
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

fn main() {
    let out_prefix = std::env::args()
        .nth(1)
        .expect("usage: fleet_bench OUT_PREFIX");
    let settings = Settings {
        hosts: sluice_tests::benchkit::env_u64("BENCH_HOSTS", 24) as usize,
        racks: sluice_tests::benchkit::env_u64("BENCH_RACKS", 4) as usize,
        build_bytes: (sluice_tests::benchkit::env_u64("BENCH_BUILD_MB", 20) << 20) as usize,
        link: sluice_tests::benchkit::env_u64("BENCH_LINK_BYTES_PER_S", 12_500_000),
        max_uploads: sluice_tests::benchkit::env_u64("BENCH_MAX_UPLOADS", 4),
    };
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "store,peers".into());
    let machine = sluice_tests::benchkit::machine(&[(
        "zookeeper",
        "dpkg-query -W -f='${Version}' zookeeper 2>/dev/null",
    )]);
    let runs: Vec<Value> = modes.split(',').map(|m| run(m.trim(), &settings)).collect();
    let report = json!({
        "benchmark": "fleet",
        "machine": machine,
        "hosts": settings.hosts,
        "racks": settings.racks,
        "build_mb_incompressible": settings.build_bytes >> 20,
        "link_bytes_per_s": settings.link,
        "peers_max_uploads": settings.max_uploads,
        "links": "the store's uplink paced by the harness's store to link_bytes_per_s for all responses together; each host's uploads paced by peers.upload_bytes_per_s = link_bytes_per_s; veths otherwise unlimited (no tc)",
        "runs": runs,
        "load_average_after": sluice_tests::benchkit::sh("cut -d' ' -f1-3 /proc/loadavg"),
    });
    std::fs::write(
        format!("{out_prefix}.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .expect("writing the json");
    let mut md = format!(
        "# fleet deploy: {} hosts in {} racks, {} MiB build, link {} B/s, peers.max_uploads {}\n\n| mode | store copies | one host's fetch ms | deploy → last verified ms | ÷ one fetch | deploy → all serving ms | brain RSS KiB median / max |\n| --- | --- | --- | --- | --- | --- | --- |\n",
        settings.hosts,
        settings.racks,
        settings.build_bytes >> 20,
        settings.link,
        settings.max_uploads
    );
    for r in &report["runs"].as_array().cloned().unwrap_or_default() {
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
    md += &format!("\nmachine: {}\n", report["machine"]);
    std::fs::write(format!("{out_prefix}.md"), md).expect("writing the md");
}
