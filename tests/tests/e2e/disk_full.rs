//! A full disk under a running daemon: `data_dir` on a small tmpfs that only the daemon (and its
//! shims and instances) see, in a mount namespace of their own (`Host::with_data_on_tmpfs`). A
//! deploy larger than the free space fails naming ENOSPC and the releases directory, leaves no
//! half release and the old build serving; a state write that cannot be made refuses a restart,
//! and holds the next step of a restart under way, without stopping anything, until space is
//! freed; then the same restart runs to its end.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sluice_tests::fleet::{http_get, sha256_file};
use sluice_tests::{Host, PATIENCE, Status, free_port_base, require_root};

/// The tmpfs of the deploy test: room for the small build, not for the big one.
const DEPLOY_TMPFS_BYTES: u64 = 8 << 20;
/// The one file of the big build: more than the whole tmpfs.
const BIG_FILE_BYTES: usize = 12 << 20;
/// The tmpfs of the state-write test (filled up by the test).
const STATE_TMPFS_BYTES: u64 = 4 << 20;
/// `startup_ms` of the state-write test's service: the window, in a restart's check step, in
/// which the test fills the disk.
const STARTUP_MS: u64 = 5_000;
/// The daemon's pause between attempts of a failed state write (`STATE_WRITE_RETRY_MS`).
const STATE_WRITE_RETRY: Duration = Duration::from_millis(5_000);
/// How long one deploy or restart may take on a loaded 2-core machine.
const ACTION_PATIENCE: Duration = Duration::from_secs(120);
const SVC: &str = "disk";

/// An uncompressed tar of `files`, then its end marker.
fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(&sluice_tests::tar_header(name, data.len() as u64));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Writes `<id>.tar` and its `.sha256` sidecar into the store.
fn publish(store: &Path, id: &str, bytes: &[u8]) {
    let file = store.join(format!("{id}.tar"));
    std::fs::write(&file, bytes).expect("writing a build");
    let sha = sha256_file(&file);
    std::fs::write(
        store.join(format!("{id}.tar.sha256")),
        format!("{sha}  {id}.tar\n"),
    )
    .expect("writing a sidecar");
}

/// `n` bytes that no file system compresses.
fn random_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = vec![0; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes
}

/// What `GET path` on the instance at `port` answers (`Err` when it does not).
fn get(port: u16, path: &str) -> Result<String, String> {
    match http_get(([127, 0, 0, 1], port).into(), path)? {
        (200, body) => Ok(body),
        (status, body) => Err(format!("{status}: {body}")),
    }
}

/// Waits until the instance at `port` answers.
fn wait_serving(port: u16, path: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match get(port, path) {
            Ok(body) => return body,
            Err(e) => assert!(Instant::now() < deadline, "port {port} never answered: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Free bytes of the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `statvfs` writes only into the zeroed struct it is given.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(c.as_ptr(), &mut st) },
        0,
        "statvfs {path:?}"
    );
    st.f_bavail * st.f_frsize
}

/// Fills the file system of `file` with it until a write fails with ENOSPC; returns the bytes
/// written.
fn fill(file: &Path) -> u64 {
    let mut f = std::fs::File::create(file).unwrap_or_else(|e| panic!("creating {file:?}: {e}"));
    let block = vec![0xa5u8; 64 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => panic!("writing {file:?}: wrote nothing"),
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("writing {file:?}: {e}"),
        }
    }
    // Small writes too, so that not even a partial page is left.
    while let Ok(n) = f.write(&[0u8; 512]) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    written
}

#[track_caller]
fn assert_alive(h: &Host) {
    assert!(
        h.daemon_exit_status().is_none(),
        "the daemon exited\n{}",
        h.daemon_log_tail()
    );
}

#[test]
fn a_deploy_that_fills_the_disk_fails_naming_enospc_and_the_old_build_keeps_serving() {
    if !require_root() {
        return;
    }
    let h = Host::new().with_data_on_tmpfs(DEPLOY_TMPFS_BYTES);
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
source = "file://{store}/{{build}}.tar"
"#,
            store = store.display()
        ),
    );
    publish(&store, "b1", &tar(&[("BUILD", b"b1")]));
    let big = random_bytes(BIG_FILE_BYTES);
    publish(&store, "b2", &tar(&[("BUILD", b"b2"), ("big.bin", &big)]));
    drop(big);

    h.start_daemon();
    h.sluice(&["deploy", SVC, "b1"]).success();
    let status = h.wait_until(
        |s| {
            s.service(SVC)["build"] == "b1"
                && s.service(SVC)["deploy"].is_null()
                && s.running(SVC) == 1
        },
        ACTION_PATIENCE,
    );
    let pids = status.pids(SVC);
    assert_eq!(wait_serving(port, "/BUILD"), "b1");
    let data = h.daemon_data_path("");
    let free_before = free_bytes(&data);
    println!("tmpfs of {DEPLOY_TMPFS_BYTES} bytes: {free_before} free serving b1");

    h.sluice(&["deploy", SVC, "b2"]).success();
    let status = h.wait_until(
        |s| s.service(SVC)["deploy"].is_null() && s.service(SVC)["deploy_error"].is_string(),
        ACTION_PATIENCE,
    );
    let error = status.service(SVC)["deploy_error"]
        .as_str()
        .unwrap()
        .to_owned();
    println!("deploy of b2: {error}");
    let releases = h.root().join("data").join(SVC).join("releases");
    for want in [
        "ENOSPC",
        "no space left on device",
        &releases.display().to_string(),
        "b2",
    ] {
        assert!(error.contains(want), "`{error}` lacks `{want}`");
    }
    assert_alive(&h);
    assert_eq!(status.service(SVC)["build"], "b1", "{status}");
    assert_eq!(status.pids(SVC), pids, "the instance was restarted");
    assert_eq!(get(port, "/BUILD").as_deref(), Ok("b1"));
    let text = h.sluice(&["status"]).success();
    assert!(
        text.stdout.contains("ENOSPC"),
        "status does not show it: {text}"
    );
    // No half release: only b1 is left, no `.tmp-*`, and its space is back.
    let left: Vec<String> = std::fs::read_dir(h.daemon_data_path(&format!("{SVC}/releases")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["b1"], "the failed deploy left releases behind");
    let free_after = free_bytes(&data);
    println!("{free_after} bytes free after the failed deploy");
    assert!(
        free_after + (256 << 10) >= free_before,
        "the partial release still holds space: {free_after} free, {free_before} before"
    );
    // The daemon goes on as before: a restart (which writes the state) works, onto b1.
    h.sluice(&["restart", SVC]).success();
    let status = h.wait_until(|s| s.running(SVC) == 1, PATIENCE);
    assert_ne!(status.pids(SVC), pids, "the restart restarted nothing");
    assert_eq!(wait_serving(port, "/BUILD"), "b1");
}

#[test]
fn a_state_write_on_a_full_disk_refuses_a_restart_and_holds_one_under_way_until_space_is_freed() {
    if !require_root() {
        return;
    }
    let h = Host::new().with_data_on_tmpfs(STATE_TMPFS_BYTES);
    let port = free_port_base(2);
    h.service(
        SVC,
        &format!(
            r#"command = ["/usr/bin/python3", "-m", "http.server", "{{port}}", "--bind", "127.0.0.1", "--directory", "/"]
instances = 2
port_base = {port}
startup_ms = {STARTUP_MS}
[restart]
strategy = "rolling"
batch_size = 1
"#
        ),
    );
    h.start_daemon();
    let status = h.wait_until(|s| s.all_running(SVC, 2), PATIENCE);
    let pids = status.pids(SVC);
    for i in 0..2 {
        wait_serving(port + i, "/");
    }
    let state_file = h.root().join("data/state").join(format!("{SVC}.json"));
    let filler = h.daemon_data_path("filler");

    // 1. The disk is full before a restart: refused, naming the state file; nothing stops.
    let filled = fill(&filler);
    println!("filled the tmpfs with {filled} bytes");
    let out = h.sluice(&["restart", SVC]);
    println!("restart on a full disk: {out}");
    assert_ne!(out.code, Some(0), "a restart was accepted unwritten: {out}");
    for want in [
        state_file.display().to_string(),
        "No space left on device".into(),
    ] {
        assert!(
            out.stderr.contains(&want),
            "the refusal lacks `{want}`: {out}"
        );
    }
    let status = h.status();
    let shown = status.service(SVC)["state_write_error"]
        .as_str()
        .unwrap_or("");
    assert!(
        shown.contains(&state_file.display().to_string()),
        "status shows `{shown}`: {status}"
    );
    assert!(!status.restart_in_progress(SVC), "{status}");
    assert_eq!(status.pids(SVC), pids, "an instance was restarted");
    for i in 0..2 {
        get(port + i, "/").unwrap_or_else(|e| panic!("instance {i}: {e}"));
    }
    assert_alive(&h);

    // Space again: the retry writes the state, the error goes, the same restart works.
    std::fs::remove_file(&filler).unwrap();
    h.wait_until(
        |s| s.service(SVC)["state_write_error"].is_null(),
        STATE_WRITE_RETRY + PATIENCE,
    );
    h.sluice(&["restart", SVC]).success();
    let status = h.wait_until(|s| s.all_running(SVC, 2), PATIENCE);
    let pids = status.pids(SVC);
    assert!(pids.iter().all(Option::is_some), "{status}");

    // 2. The disk fills during a restart, while its first batch is being checked: the next
    // step is not written, so instance 1 is not touched until space is freed.
    let mut restart = h.sluice_command(&["restart", SVC]);
    restart.stdout(Stdio::piped()).stderr(Stdio::piped());
    let restart = restart.spawn().expect("running `sluice restart`");
    let checking = |s: &Status| {
        s.service(SVC)["restart"]["step"] == "checking"
            && s.service(SVC)["restart"]["batch"] == serde_json::json!([0])
            && s.pid(SVC, 0).is_some()
            && s.pid(SVC, 0) != pids[0]
    };
    h.wait_until(checking, ACTION_PATIENCE);
    let filled = fill(&filler);
    println!("filled the tmpfs with {filled} bytes while batch [0] is checked");
    // Its check passes after `startup_ms`; the step after it cannot be written.
    let status = h.wait_until(
        |s| s.service(SVC)["state_write_error"].is_string(),
        Duration::from_millis(STARTUP_MS) + PATIENCE,
    );
    println!("held: {}", status.service(SVC));
    let held_since = Instant::now();
    while held_since.elapsed() < 2 * STATE_WRITE_RETRY {
        let status = h.status();
        assert_eq!(
            status.pid(SVC, 1),
            pids[1],
            "instance 1 was touched unwritten: {status}"
        );
        assert!(
            status.restart_in_progress(SVC),
            "the restart ended unwritten: {status}"
        );
        assert!(
            status.service(SVC)["state_write_error"].is_string(),
            "the error went while the disk is full: {status}"
        );
        for i in 0..2 {
            get(port + i, "/").unwrap_or_else(|e| panic!("instance {i} while held: {e}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_alive(&h);
    std::fs::remove_file(&filler).unwrap();
    let status = h.wait_until(
        |s| !s.restart_in_progress(SVC) && s.all_running(SVC, 2),
        STATE_WRITE_RETRY + ACTION_PATIENCE,
    );
    assert_ne!(
        status.pid(SVC, 1),
        pids[1],
        "instance 1 was never restarted: {status}"
    );
    assert!(
        status.service(SVC)["state_write_error"].is_null(),
        "{status}"
    );
    // Answered when the restart ended, which it did.
    let mut restart = restart;
    let deadline = Instant::now() + PATIENCE;
    let exit = loop {
        if let Some(exit) = restart.try_wait().expect("waiting for `sluice restart`") {
            break exit;
        }
        if Instant::now() >= deadline {
            let _ = restart.kill();
            let _ = restart.wait();
            panic!("`sluice restart` did not end within {PATIENCE:?} of its restart");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = restart
        .wait_with_output()
        .expect("the output of `sluice restart`");
    assert!(
        exit.success(),
        "the held restart failed ({exit}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..2 {
        wait_serving(port + i, "/");
    }
}
