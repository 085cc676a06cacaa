//! `bench/fetch.sh`: the build store's fetch + verify + extract against `curl | sha256sum` and
//! `curl | tar xz` of the same archive from the same local HTTP server (part A), and the time from
//! the `enabled` write in ZooKeeper to the daemon acting on it (part B).
//!
//! Usage: `deploy_bench OUT_PREFIX` (writes `OUT_PREFIX.md` and `OUT_PREFIX.json`). Every file and
//! process of the run lives under `TMPDIR` (the script makes a fresh one); needs the release
//! binaries (`SLUICE_BIN_DIR=target/release`), `curl`, `tar`, `python3` and, for part B, Debian's
//! ZooKeeper.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sluice_tests::benchkit::log_ms;
use sluice_tests::zk::{Place, Zookeeper};
use sluice_tests::{Host, PATIENCE, Rng, run_bounded};

const SERVICE: &str = "svc";
/// Limit of one timed operation (a fetch of the archive, a deploy).
const OP_TIMEOUT: Duration = Duration::from_secs(300);

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn main() {
    let out_prefix = std::env::args()
        .nth(1)
        .expect("usage: deploy_bench OUT_PREFIX");
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "AB".into());
    let work = tempfile::Builder::new()
        .prefix("deploy-bench-")
        .tempdir()
        .expect("a temp dir");
    let machine_before = sluice_tests::benchkit::machine(&[
        (
            "filesystem",
            "df -T \"${TMPDIR:-/tmp}\" | awk 'NR==2 {print $2}'",
        ),
        ("curl", "curl --version | head -1 | cut -d' ' -f1-2"),
        ("tar", "tar --version | head -1"),
        (
            "zookeeper",
            "dpkg-query -W -f='${Version}' zookeeper 2>/dev/null",
        ),
    ]);
    let mut report = json!({ "benchmark": "fetch", "machine": machine_before });
    if parts.contains('A') {
        report["fetch"] = part_a(work.path());
    }
    if parts.contains('B') {
        report["zookeeper"] = part_b(work.path());
    }
    report["load_average_after"] =
        json!(sluice_tests::benchkit::sh("cut -d' ' -f1-3 /proc/loadavg"));
    std::fs::write(
        format!("{out_prefix}.json"),
        serde_json::to_string_pretty(&report).expect("json") + "\n",
    )
    .expect("writing the JSON report");
    let md = markdown(&report);
    std::fs::write(format!("{out_prefix}.md"), &md).expect("writing the markdown report");
    println!("{md}");
}

// ---------------------------------------------------------------- part A: fetch + verify + extract

const WORDS: &[&str] = &[
    "fn",
    "let",
    "mut",
    "self",
    "return",
    "match",
    "impl",
    "struct",
    "pub",
    "use",
    "crate",
    "if",
    "else",
    "for",
    "while",
    "loop",
    "break",
    "String",
    "Vec",
    "Option",
    "Some",
    "None",
    "Ok",
    "Err",
    "Result",
    "config",
    "service",
    "instance",
    "restart",
    "health",
    "build",
    "release",
    "steering",
    "warmup",
    "request",
    "response",
    "latency",
    "timeout",
    "error",
    "value",
    "index",
    "=",
    "==",
    "{",
    "}",
    "(",
    ")",
    ";",
    "->",
    "&",
    "0",
    "1",
    "42",
    "\"text\"",
    "//",
    "#[derive]",
];

/// `files` files adding up to about `total` bytes under `dir`, in 40 directories: sizes
/// log-uniform between 1 KiB and 256 KiB (scaled to the total), even ones text-like and
/// compressible, odd ones random bytes. Returns the bytes written.
fn make_build(dir: &Path, files: usize, total: u64) -> u64 {
    // A fixed seed, so every run builds the same archive.
    let mut rng = Rng::new(0x5eed_1234_abcd_ef01);
    let raw: Vec<f64> = (0..files)
        .map(|_| (1024f64.ln() + rng.unit() * (256.0f64 * 1024.0 / 1024.0).ln()).exp())
        .collect();
    let scale = total as f64 / raw.iter().sum::<f64>();
    let mut written = 0;
    for (i, size) in raw.iter().enumerate() {
        let size = ((size * scale) as usize).max(1);
        let sub = dir.join(format!("d{:02}", i % 40));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let mut data = Vec::with_capacity(size + 32);
        if i % 2 == 0 {
            while data.len() < size {
                let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize];
                data.extend_from_slice(w.as_bytes());
                data.push(if rng.next_u64().is_multiple_of(9) {
                    b'\n'
                } else {
                    b' '
                });
            }
            data.truncate(size);
        } else {
            while data.len() < size {
                data.extend_from_slice(&rng.next_u64().to_le_bytes());
            }
            data.truncate(size);
        }
        let ext = if i % 2 == 0 { "txt" } else { "bin" };
        std::fs::write(sub.join(format!("f{i:05}.{ext}")), &data).expect("writing a build file");
        written += size as u64;
    }
    written
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_owned()
}

/// Writes `<name>` from the directory `src` as a gzip tarball in `dest_dir`, plus its `.sha256`.
fn tarball(src: &Path, dest_dir: &Path, name: &str) -> (PathBuf, u64) {
    let path = dest_dir.join(name);
    let status = Command::new("tar")
        .arg("-C")
        .arg(src)
        .arg("-czf")
        .arg(&path)
        .arg(".")
        .status()
        .expect("tar runs");
    assert!(status.success(), "tar czf failed");
    let hash = sha256_hex(&path);
    std::fs::write(
        dest_dir.join(format!("{name}.sha256")),
        format!("{hash}  {name}\n"),
    )
    .expect("writing the sidecar");
    let size = std::fs::metadata(&path).expect("the archive").len();
    (path, size)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `python3 -m http.server` on 127.0.0.1 serving `dir`; killed on drop.
struct HttpServer {
    child: Child,
    port: u16,
}

impl HttpServer {
    fn start(dir: &Path) -> HttpServer {
        let port = free_port();
        let python = if Path::new("/usr/bin/python3").is_file() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let child = Command::new(python)
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server runs");
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the HTTP server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        HttpServer { child, port }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a shell pipeline (bash, pipefail) and returns its wall time in ms.
fn timed_shell(script: &str) -> f64 {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("set -euo pipefail; {script}")]);
    let out = run_bounded(cmd, OP_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.code, Some(0), "{out}");
    out.elapsed.as_secs_f64() * 1000.0
}

fn count_files(dir: &Path) -> u64 {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let ft = entry.file_type().expect("file type");
        if ft.is_dir() {
            if entry.file_name() != ".sluice" {
                n += count_files(&entry.path());
            }
        } else {
            n += 1;
        }
    }
    n
}

/// One first deploy of `b1` on a fresh host: from the `sluice deploy` call until `sluice status
/// --json` shows `build == "b1"`. Returns (total ms, breakdown from the daemon's log).
fn sluice_deploy(port: u16, files: u64) -> (f64, Value) {
    let h = Host::new();
    h.service(
        SERVICE,
        &format!(
            "command = [\"/bin/sleep\", \"infinity\"]\ninstances = 1\n[build]\nsource = \"http://127.0.0.1:{port}/{{build}}.tar.gz\"\n"
        ),
    );
    h.start_daemon();
    let begun = Instant::now();
    let out = h.sluice(&["deploy", SERVICE, "b1"]);
    assert_eq!(out.code, Some(0), "{out}");
    let log_path = h.path("daemon.log");
    let deployed = format!("deployed service={SERVICE} build=\"b1\"");
    let deadline = Instant::now() + OP_TIMEOUT;
    // Watch the log (cheap) rather than spawning a status CLI every few ms, then confirm with status.
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains(&deployed) || log.contains("deploy of svc build b1 failed") {
            break;
        }
        assert!(Instant::now() < deadline, "no deploy within {OP_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = h.wait_until(
        |s| s.service(SERVICE)["build"] == "b1" || !s.service(SERVICE)["deploy_error"].is_null(),
        PATIENCE,
    );
    let total_ms = begun.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(
        status.service(SERVICE)["build"],
        "b1",
        "the deploy failed: {status}"
    );
    let release = h.path(&format!("data/{SERVICE}/releases/b1"));
    let extracted = count_files(&release);
    assert_eq!(extracted, files, "files in {}", release.display());
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let begins = log_ms(&log, "deploy begins service=svc build=\"b1\"");
    let installed = log_ms(
        &log,
        "installed; restarting onto it service=svc build=\"b1\"",
    )
    .or_else(|| log_ms(&log, "installed; restarting onto it"));
    let done = log_ms(&log, &deployed);
    let span = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => json!(round1(b - a)),
        _ => Value::Null,
    };
    (
        total_ms,
        json!({
            "deploy_begins_to_installed_ms": span(begins, installed),
            "installed_to_deployed_ms": span(installed, done),
        }),
    )
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn part_a(work: &Path) -> Value {
    let files = sluice_tests::benchkit::env_u64("BENCH_FILES", 4000) as usize;
    let total = sluice_tests::benchkit::env_u64("BENCH_BUILD_MB", 200) << 20;
    let runs = sluice_tests::benchkit::env_u64("BENCH_RUNS", 3) as usize;
    eprintln!(
        "== part A: making a build of {files} files, {} MiB",
        total >> 20
    );
    let src = work.join("build-src");
    let www = work.join("www");
    std::fs::create_dir_all(&www).expect("mkdir www");
    let unpacked = make_build(&src, files, total);
    let (archive, archive_bytes) = tarball(&src, &www, "b1.tar.gz");
    std::fs::remove_dir_all(&src).expect("removing the build source");
    let server = HttpServer::start(&www);
    let url = format!("http://127.0.0.1:{}/b1.tar.gz", server.port);
    let extract_dir = work.join("extract");
    let tar_into = |sync: bool| -> f64 {
        let _ = std::fs::remove_dir_all(&extract_dir);
        std::fs::create_dir_all(&extract_dir).expect("mkdir extract");
        let dir = extract_dir.display();
        let sync = if sync {
            format!("; sync -f {dir}")
        } else {
            String::new()
        };
        let ms = timed_shell(&format!("curl -sf {url} | tar xz -C {dir}{sync}"));
        assert_eq!(
            count_files(&extract_dir),
            files as u64,
            "files extracted by tar"
        );
        std::fs::remove_dir_all(&extract_dir).expect("rm extract");
        ms
    };
    let sha = || timed_shell(&format!("curl -sf {url} | sha256sum >/dev/null"));
    let sluice = || sluice_deploy(server.port, files as u64);

    // Untimed first run of each: warms the server's page cache and every binary.
    eprintln!("== part A: untimed warm-up runs");
    let _ = sha();
    let _ = tar_into(false);
    let _ = tar_into(true);
    let _ = sluice();
    let mut sha_ms = Vec::new();
    let mut tar_ms = Vec::new();
    let mut tar_sync_ms = Vec::new();
    let mut sluice_ms = Vec::new();
    let mut sluice_breakdown = Vec::new();
    // Interleaved rounds, so a burst of load from the other tests on the machine hits all alike.
    for round in 0..runs {
        eprintln!("== part A: round {}", round + 1);
        sha_ms.push(round1(sha()));
        tar_ms.push(round1(tar_into(false)));
        tar_sync_ms.push(round1(tar_into(true)));
        let (ms, breakdown) = sluice();
        sluice_ms.push(round1(ms));
        sluice_breakdown.push(breakdown);
    }
    drop(server);
    let _ = std::fs::remove_file(&archive);
    let (s, t, ts, h) = (
        median(&sluice_ms),
        median(&tar_ms),
        median(&tar_sync_ms),
        median(&sha_ms),
    );
    json!({
        "files": files,
        "unpacked_bytes": unpacked,
        "archive_bytes": archive_bytes,
        "runs": runs,
        "curl_sha256sum_ms": sha_ms,
        "curl_tar_xz_ms": tar_ms,
        "curl_tar_xz_sync_ms": tar_sync_ms,
        "sluice_deploy_ms": sluice_ms,
        "sluice_breakdown": sluice_breakdown,
        "median_ms": {
            "curl_sha256sum": h,
            "curl_tar_xz": t,
            "curl_tar_xz_sync": ts,
            "sluice_deploy": s,
        },
        "ratio_sluice_to_curl_tar_xz": round3(s / t),
        "ratio_sluice_to_curl_tar_xz_sync": round3(s / ts),
        "ratio_sluice_to_curl_sha256sum": round3(s / h),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------- part B: ZooKeeper to host

/// A standalone ZooKeeper on 127.0.0.1 (the shared test harness), with the full JIT (a benchmark),
/// its logs at INFO under `dir/log`, started and serving.
fn start_zookeeper(dir: &Path) -> Zookeeper {
    let mut zk = Zookeeper::new(Place::Loopback, dir, 1);
    zk.set_server_jvmflags("-Xmx128m -XX:+UseSerialGC");
    zk.set_log_dir(&dir.join("log"));
    zk.start(0);
    zk.wait_serving(PATIENCE * 2);
    zk
}

/// Every transaction in the transaction logs of `zk`'s server: (ZooKeeper's time in ms, the raw
/// record).
fn transactions(zk: &Zookeeper) -> Vec<(f64, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(zk.data_dir(0).join("version-2"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("log."))
        })
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| parse_txn_log(&std::fs::read(f).unwrap_or_default()))
        .collect()
}

/// ZooKeeper's transaction log format: a header (magic `ZKLG`, version, dbid), then records of
/// (crc: i64, length: i32, bytes, `B`), where the bytes begin with the TxnHeader (clientId: i64,
/// cxid: i32, zxid: i64, time: i64, type: i32), big-endian. The file is preallocated with zeros:
/// a zero length ends it.
fn parse_txn_log(bytes: &[u8]) -> Vec<(f64, Vec<u8>)> {
    let mut out = Vec::new();
    if bytes.len() < 16 || &bytes[..4] != b"ZKLG" {
        return out;
    }
    let mut at = 16;
    while at + 12 <= bytes.len() {
        let len = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if len <= 0 {
            break;
        }
        let start = at + 12;
        let end = start + len as usize;
        if end > bytes.len() || len < 32 {
            break;
        }
        let record = &bytes[start..end];
        let time = i64::from_be_bytes(record[20..28].try_into().expect("8 bytes"));
        out.push((time as f64, record.to_vec()));
        at = end + 1;
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn part_b(work: &Path) -> Value {
    let rounds = sluice_tests::benchkit::env_u64("BENCH_ZK_ROUNDS", 20) as usize;
    if !sluice_tests::zk::installed() {
        eprintln!("part B skipped: ZooKeeper (Debian package `zookeeper`) is not installed");
        return json!({ "skipped": "ZooKeeper is not installed" });
    }
    eprintln!("== part B: ZooKeeper, {rounds} rounds");
    let builds = work.join("zk-builds");
    let content = work.join("zk-build-src");
    std::fs::create_dir_all(&builds).expect("mkdir");
    std::fs::create_dir_all(&content).expect("mkdir");
    std::fs::write(content.join("hello.txt"), "hello\n").expect("write");
    let (first, _) = tarball(&content, &builds, "w00.tar.gz");
    let ids: Vec<String> = (1..=rounds).map(|r| format!("r{r:02}")).collect();
    for id in &ids {
        std::fs::copy(&first, builds.join(format!("{id}.tar.gz"))).expect("copy");
        std::fs::copy(
            builds.join("w00.tar.gz.sha256"),
            builds.join(format!("{id}.tar.gz.sha256")),
        )
        .expect("copy");
    }
    let zk = start_zookeeper(&work.join("zk"));
    let h = Host::new();
    std::fs::write(
        h.host_file(),
        format!(
            "data_dir = \"data\"\nruntime_dir = \"run\"\nservices_dir = \"services\"\nallow_root = true\n[coordination]\nbackend = \"zookeeper\"\nconnect = \"127.0.0.1:{}/sluice\"\nhost = \"h1\"\n",
            zk.port(0)
        ),
    )
    .expect("writing the host file");
    h.service(
        SERVICE,
        &format!(
            "command = [\"/bin/sleep\", \"infinity\"]\ninstances = 1\n[build]\nsource = \"file://{}/{{build}}.tar.gz\"\n",
            builds.display()
        ),
    );
    h.start_daemon();
    let log_path = h.path("daemon.log");
    let wait_deployed = |id: &str| {
        h.wait_until(
            |s| {
                s.service(SERVICE)["build"] == id
                    && s.service(SERVICE)["deploy"].is_null()
                    && s.running(SERVICE) == 1
            },
            PATIENCE * 2,
        );
    };
    // Untimed: the first deploy creates the nodes and warms every path.
    let out = h.sluice(&["deploy", SERVICE, "w00"]);
    assert_eq!(out.code, Some(0), "deploy w00: {out}");
    wait_deployed("w00");
    let mut rows = Vec::new();
    for id in &ids {
        std::thread::sleep(Duration::from_millis(300));
        let before = now_ms();
        let out = h.sluice(&["deploy", SERVICE, id]);
        let cli_returned = now_ms();
        assert_eq!(out.code, Some(0), "deploy {id}: {out}");
        let needle = format!("deploy begins service={SERVICE} build=\"{id}\"");
        let deadline = Instant::now() + PATIENCE;
        let begins = loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(ms) = log_ms(&log, &needle) {
                break ms;
            }
            assert!(Instant::now() < deadline, "no `{needle}` in the daemon log");
            std::thread::sleep(Duration::from_millis(5));
        };
        wait_deployed(id);
        rows.push((id.clone(), before, cli_returned, begins));
    }
    let txns = transactions(&zk);
    let results: Vec<Value> = rows
        .iter()
        .map(|(id, before, cli_returned, begins)| {
            // The deploy's write is the first transaction that carries the build id (a multi
            // that sets `enabled` and appends to `history`).
            let write = txns
                .iter()
                .find(|(t, rec)| *t >= before - 1000.0 && contains(rec, id.as_bytes()))
                .map(|(t, _)| *t);
            json!({
                "build": id,
                "cli_spawn_ms": before,
                "zk_write_ms": write,
                "cli_returned_ms": cli_returned,
                "deploy_begins_ms": begins,
                "write_to_begins_ms": write.map(|w| begins - w),
                "cli_spawn_to_begins_ms": begins - before,
                "cli_duration_ms": cli_returned - before,
            })
        })
        .collect();
    drop(h);
    drop(zk);
    let col = |key: &str| -> Vec<f64> { results.iter().filter_map(|r| r[key].as_f64()).collect() };
    let summary = |v: Vec<f64>| -> Value {
        let mut s = v.clone();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            return Value::Null;
        }
        let p90 = s[((s.len() as f64 * 0.9).ceil() as usize).clamp(1, s.len()) - 1];
        json!({ "n": s.len(), "median": median(&s), "p90": p90, "min": s[0], "max": s[s.len() - 1] })
    };
    json!({
        "rounds": rounds,
        "write_to_begins_ms": summary(col("write_to_begins_ms")),
        "cli_spawn_to_begins_ms": summary(col("cli_spawn_to_begins_ms")),
        "cli_duration_ms": summary(col("cli_duration_ms")),
        "per_round": results,
    })
}

// ---------------------------------------------------------------- report

fn secs(v: &Value) -> String {
    v.as_f64()
        .map_or("–".into(), |x| format!("{:.2} s", x / 1000.0))
}

fn list_secs(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .map(secs)
        .collect::<Vec<_>>()
        .join(", ")
}

fn markdown(r: &Value) -> String {
    let m = &r["machine"];
    let mut s = String::new();
    s += "# Build fetch and ZooKeeper reaction (`bench/fetch.sh`)\n\n";
    s += &format!(
        "Machine: {} CPUs ({}), {}, Linux {}, {}, {} temp dir; {}; commit {} ({} changed files in the tree); {}, {}, ZooKeeper {}. \
         Machine use: {} (load average {} at the start, {} at the end); \
         the ratios compare figures of the same run.\n\n",
        m["cpus"].as_str().unwrap_or(""),
        m["cpu_model"].as_str().unwrap_or("").trim(),
        m["memory"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["os"].as_str().unwrap_or(""),
        m["filesystem"].as_str().unwrap_or(""),
        m["date_utc"].as_str().unwrap_or(""),
        m["commit"].as_str().unwrap_or(""),
        m["dirty_tree"].as_str().unwrap_or(""),
        m["curl"].as_str().unwrap_or(""),
        m["tar"].as_str().unwrap_or(""),
        m["zookeeper"].as_str().unwrap_or(""),
        m["shared"].as_str().unwrap_or("not stated"),
        m["load_average"].as_str().unwrap_or(""),
        r["load_average_after"].as_str().unwrap_or(""),
    );
    let a = &r["fetch"];
    if !a.is_null() {
        s += &format!(
            "## A. fetch + verify + extract\n\n{} files, {:.0} MiB unpacked (even files text-like, odd files random bytes; 1–256 KiB log-uniform, scaled), \
             {:.0} MiB as `.tar.gz` (GNU tar + gzip -6), served by `python3 -m http.server` on 127.0.0.1. \
             Each method ran once untimed first (warms the server's page cache and the binaries; the page cache is never dropped), \
             then {} interleaved rounds; the figure is the median. `sluice deploy` is timed on a fresh host each round \
             (local backend, service `instances = 1` of `sleep infinity`), from the call until `sluice status --json` shows `build == \"b1\"`: \
             fetch of the `.sha256` sidecar and the archive, sha256 while streaming, gunzip + extraction on a blocking thread, `syncfs`, rename, start of the instance.\n\n",
            a["files"],
            a["unpacked_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            a["archive_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            a["runs"],
        );
        s += "| method | median | runs | sluice / this |\n| --- | ---: | --- | ---: |\n";
        let md = &a["median_ms"];
        let sl = md["sluice_deploy"].as_f64().unwrap_or(f64::NAN);
        for (label, key, runs) in [
            (
                "`curl -s URL \\| sha256sum`",
                "curl_sha256sum",
                "curl_sha256sum_ms",
            ),
            (
                "`curl -s URL \\| tar xz -C DIR`",
                "curl_tar_xz",
                "curl_tar_xz_ms",
            ),
            (
                "`curl -s URL \\| tar xz -C DIR; sync -f DIR`",
                "curl_tar_xz_sync",
                "curl_tar_xz_sync_ms",
            ),
            (
                "`sluice deploy svc b1` until status shows b1",
                "sluice_deploy",
                "sluice_deploy_ms",
            ),
        ] {
            let v = md[key].as_f64().unwrap_or(f64::NAN);
            s += &format!(
                "| {label} | {} | {} | {:.2}× |\n",
                secs(&md[key]),
                list_secs(&a[runs]),
                sl / v
            );
        }
        let bd: Vec<String> = a["sluice_breakdown"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                format!(
                    "{} + {}",
                    secs(&b["deploy_begins_to_installed_ms"]),
                    secs(&b["installed_to_deployed_ms"])
                )
            })
            .collect();
        s += &format!(
            "\nsluice per round, from its log: `deploy begins` → `installed` + `installed` → `deployed`: {}. \
             Goal: sluice within 1.1× `curl | tar xz` (ratio {:.2}×).\n\n",
            bd.join("; "),
            a["ratio_sluice_to_curl_tar_xz"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
    }
    let b = &r["zookeeper"];
    if !b.is_null() {
        s += "## B. `enabled` written in ZooKeeper → the host acts on it\n\n";
        if let Some(why) = b["skipped"].as_str() {
            s += &format!("Skipped: {why}.\n");
            return s;
        }
        s += &format!(
            "One standalone ZooKeeper on 127.0.0.1 (own `zoo.cfg`, `tickTime=500`, default `forceSync`), one sluice daemon on the zookeeper backend (`host = \"h1\"`), \
             a service with a `file://` build source (+ `.sha256` sidecars). {} rounds of `sluice deploy svc rNN`, each after the previous deploy finished. \
             **write → deploy begins**: ZooKeeper's own timestamp of the transaction that set `enabled` (the `time` field of its TxnHeader, read from the \
             transaction log afterwards) to the daemon's `deploy begins service=svc build=\"rNN\"` log line; same clock, both millisecond resolution. \
             **CLI spawn → deploy begins** also counts the CLI's start-up, session and reads before the write.\n\n",
            b["rounds"]
        );
        s += "| measure | median | p90 | min | max |\n| --- | ---: | ---: | ---: | ---: |\n";
        for (label, key) in [
            ("write → deploy begins", "write_to_begins_ms"),
            ("CLI spawn → deploy begins", "cli_spawn_to_begins_ms"),
            ("`sluice deploy` CLI run time", "cli_duration_ms"),
        ] {
            let v = &b[key];
            let f = |k: &str| v[k].as_f64().map_or("–".into(), |x| format!("{x:.0} ms"));
            s += &format!(
                "| {label} | {} | {} | {} | {} |\n",
                f("median"),
                f("p90"),
                f("min"),
                f("max")
            );
        }
        s += "\nGoal: under 100 ms median (write → deploy begins).\n";
    }
    s
}
