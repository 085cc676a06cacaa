//! Archive bombs deployed to a running daemon (local backend, one host, a `file://` store): pax
//! and GNU long-name headers of hundreds of MiB, an entry-count bomb and a deep path, each a
//! tiny gzip file made here. Each deploy fails naming the entry, the serving build keeps
//! serving, `status --json` stays small and the daemon's peak RSS stays under 64 MiB.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::fleet::{http_get, sha256_file};
use sluice_tests::{Host, PATIENCE, free_port_base, procs, tar_header_of};

/// Peak resident memory (`VmHWM`) the daemon may reach while it refuses every bomb.
const PEAK_RSS_MAX_KIB: u64 = 64 << 10;
/// Decompressed size of the pax and long-name values, in bytes.
const BOMB_BYTES: u64 = 300 << 20;
/// Largest `sluice status --json` accepted after the bombs, in bytes.
const STATUS_MAX_BYTES: usize = 64 << 10;
/// How long one refused deploy may take on a loaded 2-core machine.
const DEPLOY_PATIENCE: Duration = Duration::from_secs(120);
const SVC: &str = "bombs";
/// The service's `build.max_entries`: small, so the debug daemon reaches it in seconds (the
/// default, 1 000 000, is the same code path at 512 MB of headers).
const MAX_ENTRIES: u64 = 20_000;

/// `bytes` as one gzip member (the `gzip` tool: the tests crate has no compression crate).
fn gzip_member(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .args(["-c", "-1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running gzip");
    let mut stdin = child.stdin.take().unwrap();
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("gzip output");
    writer.join().unwrap().expect("feeding gzip");
    assert!(out.status.success(), "gzip failed");
    out.stdout
}

/// A gzip stream (concatenated members, as `MultiGzDecoder` and `gzip -d` read it) of `head`,
/// then `times` copies of `block`, then `tail`: hundreds of MiB decompressed, a few KiB stored.
fn gzip_stream(head: &[u8], block: &[u8], times: u64, tail: &[u8]) -> Vec<u8> {
    let block = gzip_member(block);
    let mut out = gzip_member(head);
    for _ in 0..times {
        out.extend_from_slice(&block);
    }
    out.extend_from_slice(&gzip_member(tail));
    out
}

/// The length a pax record `"<len> <key>=<value>\n"` declares, counting its own digits.
fn pax_record_len(key: &str, value_bytes: u64) -> u64 {
    let fixed = key.len() as u64 + 3 + value_bytes;
    let mut len = fixed;
    while len != fixed + len.to_string().len() as u64 {
        len = fixed + len.to_string().len() as u64;
    }
    len
}

fn zeros(n: u64) -> Vec<u8> {
    vec![0; n as usize]
}

/// A value of `BOMB_BYTES` made of 1 MiB blocks of `fill`, behind a metadata header `meta`
/// (whose data begins with `prefix`), then a small file and the end marker.
fn value_bomb(meta: [u8; 512], prefix: &[u8], fill: u8, suffix: &[u8], data_len: u64) -> Vec<u8> {
    const MIB: u64 = 1 << 20;
    let mut head = meta.to_vec();
    head.extend_from_slice(prefix);
    let mut tail = suffix.to_vec();
    tail.extend(zeros((512 - data_len % 512) % 512));
    tail.extend_from_slice(&tar_header_of("bomb", b'0', 0, false));
    tail.extend(zeros(1024));
    gzip_stream(&head, &vec![fill; MIB as usize], BOMB_BYTES / MIB, &tail)
}

/// The bombs: (build id, gzip bytes, text the deploy error must hold).
fn bombs() -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    let pax_len = pax_record_len("path", BOMB_BYTES);
    let pax = value_bomb(
        tar_header_of("PaxHeaders/bomb", b'x', pax_len, false),
        format!("{pax_len} path=").as_bytes(),
        b'0',
        b"\n",
        pax_len,
    );
    let long_name = value_bomb(
        tar_header_of("././@LongLink", b'L', BOMB_BYTES, true),
        b"",
        b'a',
        b"",
        BOMB_BYTES,
    );
    // 1.1 M pax global headers (over 500 MiB): far over MAX_ENTRIES without a file written.
    let global = tar_header_of("PaxHeaders/global", b'g', 0, false);
    let block: Vec<u8> = global.iter().copied().cycle().take(512 * 2048).collect();
    let count = gzip_stream(&[], &block, 550, &zeros(1024));
    let deep_path = format!("{}f", "d/".repeat(300));
    let deep_len = pax_record_len("path", deep_path.len() as u64);
    let mut deep = tar_header_of("PaxHeaders/deep", b'x', deep_len, false).to_vec();
    deep.extend_from_slice(format!("{deep_len} path={deep_path}\n").as_bytes());
    deep.extend(zeros((512 - deep_len % 512) % 512));
    deep.extend_from_slice(&tar_header_of("deep", b'0', 0, false));
    deep.extend(zeros(1024));
    vec![
        (
            "pax-path",
            pax,
            vec!["PaxHeaders/bomb", "pax extended header", "65536"],
        ),
        (
            "gnu-long-name",
            long_name,
            vec!["gnu long name", "aaaaaaaa", "(314572800 bytes)"],
        ),
        (
            "entry-count",
            count,
            vec!["max_entries (20000)", "PaxHeaders/global"],
        ),
        (
            "deep-path",
            gzip_member(&deep),
            vec!["d/d/d/d", "301 components"],
        ),
    ]
}

/// A good build: `BUILD` says its id (served by `python3 -m http.server` from the release).
fn good_build(store: &Path, id: &str) {
    let mut tar = tar_header_of("BUILD", b'0', id.len() as u64, false).to_vec();
    tar.extend_from_slice(id.as_bytes());
    tar.extend(zeros(512 - id.len() as u64));
    tar.extend(zeros(1024));
    publish(store, id, &gzip_member(&tar));
}

/// Writes `<id>.tar.gz` and its `.sha256` sidecar into the store.
fn publish(store: &Path, id: &str, bytes: &[u8]) -> PathBuf {
    let file = store.join(format!("{id}.tar.gz"));
    std::fs::write(&file, bytes).expect("writing a build");
    let sha = sha256_file(&file);
    std::fs::write(
        store.join(format!("{id}.tar.gz.sha256")),
        format!("{sha}  {id}.tar.gz\n"),
    )
    .expect("writing a sidecar");
    file
}

fn served_build(port: u16) -> String {
    let (status, body) = http_get(([127, 0, 0, 1], port).into(), "/BUILD")
        .unwrap_or_else(|e| panic!("GET /BUILD: {e}"));
    assert_eq!(status, 200, "{body}");
    body
}

fn vm_hwm_kib(pid: i32) -> u64 {
    let value = procs::status_field(pid, "VmHWM").expect("VmHWM of the daemon");
    value
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("VmHWM: {value}"))
}

#[test]
fn archive_bombs_are_refused_naming_the_entry_and_cost_the_daemon_little() {
    let h = Host::new();
    let store = h.path("store");
    std::fs::create_dir(&store).unwrap();
    let port = free_port_base(1);
    h.service(
        SVC,
        &format!(
            r#"command = ["/usr/bin/python3", "-m", "http.server", "{{port}}", "--bind", "127.0.0.1", "--directory", "{{release_dir}}"]
instances = 1
port_base = {port}
[build]
source = "file://{store}/{{build}}.tar.gz"
max_entries = {MAX_ENTRIES}
"#,
            store = store.display()
        ),
    );
    good_build(&store, "b1");
    let made = Instant::now();
    let bombs = bombs();
    for (id, bytes, _) in &bombs {
        let file = publish(&store, id, bytes);
        println!(
            "{id}: {} bytes stored",
            std::fs::metadata(file).unwrap().len()
        );
    }
    println!("bombs made in {:?}", made.elapsed());

    h.start_daemon();
    h.sluice(&["deploy", SVC, "b1"]).success();
    let status = h.wait_until(
        |s| {
            s.service(SVC)["build"] == "b1"
                && s.service(SVC)["deploy"].is_null()
                && s.running(SVC) == 1
        },
        DEPLOY_PATIENCE,
    );
    let pids = status.pids(SVC);
    let deadline = Instant::now() + PATIENCE;
    while http_get(([127, 0, 0, 1], port).into(), "/BUILD").is_err() {
        assert!(Instant::now() < deadline, "the instance never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(served_build(port), "b1");
    let daemon = h.daemon_pid().expect("the daemon's pid");
    let baseline_kib = vm_hwm_kib(daemon);

    let mut previous = String::new();
    for (id, _, culprits) in &bombs {
        let started = Instant::now();
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
        println!(
            "{id}: refused in {:?} (cli exit {:?}), {} bytes: {error}",
            started.elapsed(),
            out.code,
            error.len()
        );
        for culprit in culprits {
            assert!(error.contains(culprit), "{id}: `{error}` lacks `{culprit}`");
        }
        assert!(error.len() < 2048, "{id}: a {} byte error", error.len());
        assert_eq!(status.service(SVC)["build"], "b1", "{id}: {status}");
        assert_eq!(status.pids(SVC), pids, "{id}: the instance was restarted");
        assert_eq!(served_build(port), "b1", "{id}");
        let json = h.sluice(&["status", "--json"]).success();
        assert!(
            json.stdout.len() < STATUS_MAX_BYTES,
            "{id}: status --json is {} bytes",
            json.stdout.len()
        );
        previous = error;
    }
    let peak_kib = vm_hwm_kib(daemon);
    println!("daemon VmHWM: {baseline_kib} KiB serving b1, {peak_kib} KiB after every bomb");
    assert!(
        peak_kib < PEAK_RSS_MAX_KIB,
        "the daemon's peak RSS reached {peak_kib} KiB (limit {PEAK_RSS_MAX_KIB} KiB)"
    );
    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap_or_default();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(
        longest < 8192,
        "the daemon logged a line of {longest} bytes"
    );
    let releases: Vec<_> = std::fs::read_dir(h.path(&format!("data/{SVC}/releases")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(releases, ["b1"], "refused builds left releases behind");
}
