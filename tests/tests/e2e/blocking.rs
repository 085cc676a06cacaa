//! Nothing slow runs on the daemon's runtime threads: while a deploy extracts (and syncs) a
//! 200 MiB build and then prunes a release of 100,000 files, `sluice status` keeps answering and
//! the watchdog keeps pinging, each within a bound far below the work's own duration (issue 10:
//! before, a prune on the runtime thread held `status` for up to 9.75 s).

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_tests::watchdog::Notify;
use sluice_tests::{Host, PATIENCE};

/// Files in the release the deploy prunes.
const PRUNED_FILES: usize = 100_000;
/// Directories they are spread over.
const PRUNED_DIRS: usize = 100;
/// Size of the deployed build: incompressible files, a plain tar.
const BUILD_BYTES: u64 = 200 << 20;
/// Size of each file in the build.
const BUILD_FILE_BYTES: u64 = 4 << 20;
/// Longest accepted answer of `sluice status` (a whole CLI process) and longest accepted time
/// without a watchdog ping, on a busy 2-core machine.
const ANSWER_BOUND: Duration = Duration::from_secs(2);
/// The watchdog the daemon is given: it pings every half of it.
const WATCHDOG: Duration = Duration::from_millis(1_000);
/// How long the deploy (fetch, extraction, syncfs, restart, prune) may take.
const DEPLOY_PATIENCE: Duration = Duration::from_secs(300);
const SVC: &str = "big";

/// Writes `store/<id>.tar` (files of random bytes from /dev/urandom, so no layer can compress
/// them away) and its `.sha256` sidecar.
fn random_build(store: &Path, id: &str) {
    let path = store.join(format!("{id}.tar"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).expect("the build"));
    let mut random = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    let mut chunk = vec![0u8; BUILD_FILE_BYTES as usize];
    for i in 0..BUILD_BYTES / BUILD_FILE_BYTES {
        random.read_exact(&mut chunk).expect("random bytes");
        out.write_all(&sluice_tests::tar_header(
            &format!("data/file-{i:03}"),
            BUILD_FILE_BYTES,
        ))
        .unwrap();
        out.write_all(&chunk).unwrap();
    }
    out.write_all(&[0u8; 1024]).unwrap();
    out.flush().unwrap();
    drop(out);
    let sha = sluice_tests::fleet::sha256_file(&path);
    std::fs::write(
        store.join(format!("{id}.tar.sha256")),
        format!("{sha}  {id}.tar\n"),
    )
    .unwrap();
}

/// A release an earlier deploy left: `files` empty files and the install marker sluice writes
/// (`.sluice/installed`, nanoseconds), which orders releases for pruning.
fn old_release(releases: &Path, build: &str, files: usize, installed_ns: u64) {
    let dir = releases.join(build);
    std::fs::create_dir_all(dir.join(".sluice")).unwrap();
    std::fs::write(dir.join(".sluice/installed"), format!("{installed_ns}\n")).unwrap();
    let per_dir = files.div_ceil(PRUNED_DIRS);
    for d in 0..PRUNED_DIRS.min(files) {
        let sub = dir.join(format!("d{d:03}"));
        std::fs::create_dir(&sub).unwrap();
        for f in 0..per_dir.min(files - d * per_dir) {
            std::fs::File::create(sub.join(format!("f{f:04}"))).unwrap();
        }
    }
}

#[test]
fn status_and_the_watchdog_answer_while_a_build_is_extracted_and_a_release_is_pruned() {
    let h = Host::new();
    let store = h.path("store");
    std::fs::create_dir(&store).unwrap();
    h.service(
        SVC,
        &format!(
            r#"command = ["/bin/sleep", "1000"]
instances = 1
stop_grace_ms = 1000
[build]
source = "file://{store}/{{build}}.tar"
keep_releases = 2
"#,
            store = store.display()
        ),
    );
    let made = Instant::now();
    let releases = h.path(&format!("data/{SVC}/releases"));
    old_release(&releases, "old1", PRUNED_FILES, 1);
    old_release(&releases, "old2", 10, 2);
    random_build(&store, "b1");
    println!("releases and build made in {:?}", made.elapsed());

    let notify = Notify::bind(&h.path("notify.sock"), WATCHDOG);
    let env = notify.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    h.spawn_daemon(&env);
    h.wait_reachable(PATIENCE);

    let began = Instant::now();
    h.sluice(&["deploy", SVC, "b1"]).success();
    let mut answers = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());
    let done = loop {
        assert!(
            began.elapsed() < DEPLOY_PATIENCE,
            "the deploy did not finish within {DEPLOY_PATIENCE:?}"
        );
        let asked = Instant::now();
        let status = h.try_status();
        let took = asked.elapsed();
        let status = status.unwrap_or_else(|e| panic!("status failed during the deploy: {e}"));
        answers.push(took);
        if took > slowest.0 {
            slowest = (took, status.to_string());
        }
        let svc = status.service(SVC);
        if svc["build"] == "b1" && svc["deploy"].is_null() && !releases.join("old1").exists() {
            break Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let work = done - began;
    let silence = notify.longest_silence(began, done);
    println!(
        "deploy with extraction and prune: {work:?}; {} status answers, slowest {:?}; longest watchdog silence {silence:?}",
        answers.len(),
        slowest.0
    );
    // Without this the bounds below prove nothing: the work must outlast them.
    assert!(
        work > ANSWER_BOUND * 2,
        "the work took only {work:?}: too short to show anything"
    );
    assert!(
        slowest.0 < ANSWER_BOUND,
        "`sluice status` took {:?} during the work (bound {ANSWER_BOUND:?}); that answer: {}",
        slowest.0,
        slowest.1
    );
    assert!(
        silence < ANSWER_BOUND,
        "no watchdog ping for {silence:?} during the work (bound {ANSWER_BOUND:?})"
    );
    let left: Vec<String> = std::fs::read_dir(&releases)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut left_sorted = left.clone();
    left_sorted.sort();
    assert_eq!(left_sorted, ["b1", "old2"], "releases after the prune");
    let extracted: u64 = std::fs::read_dir(releases.join("b1/data"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(extracted, BUILD_BYTES, "bytes extracted");
}
