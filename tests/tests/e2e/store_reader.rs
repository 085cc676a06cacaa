//! The daemon reads the build store in a child of its own image (`sluiced __store-reader`). A
//! reader killed in the middle of a download fails that deploy with a message naming it; the
//! daemon and the build it serves go on, and the next deploy of the same build succeeds.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_tests::{Host, PATIENCE, procs};

const SVC: &str = "reader";
/// How long one deploy may take on a loaded 2-core machine.
const ACTION_PATIENCE: Duration = Duration::from_secs(120);
/// The build's one file: big enough that half of it is a download under way.
const FILE_BYTES: usize = 4 << 20;

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

/// The sha256 of `bytes`, in hex (written to `dir` to hash it).
fn sha256(dir: &Path, bytes: &[u8]) -> String {
    let file = dir.join("hashed");
    std::fs::write(&file, bytes).unwrap();
    sluice_tests::fleet::sha256_file(&file)
}

/// A store over HTTP holding `b1` and `b2` with their sidecars. While `hold` is set, a download
/// of `b2.tar` sends half of the archive, sets `holding` and then sends nothing more (for at
/// most a minute).
fn store(
    dir: &Path,
    b1: Vec<u8>,
    b2: Vec<u8>,
    hold: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let routes = Arc::new([
        (
            "/b1.tar.sha256".to_owned(),
            format!("{}  b1.tar\n", sha256(dir, &b1)).into_bytes(),
        ),
        (
            "/b2.tar.sha256".to_owned(),
            format!("{}  b2.tar\n", sha256(dir, &b2)).into_bytes(),
        ),
        ("/b1.tar".to_owned(), b1),
        ("/b2.tar".to_owned(), b2),
    ]);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (routes, hold, holding) = (routes.clone(), hold.clone(), holding.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut stream = stream;
                let Some((_, body)) = routes.iter().find(|(p, _)| *p == path) else {
                    let _ =
                        stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    return;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if path == "/b2.tar" && hold.load(Ordering::SeqCst) {
                    let _ = stream
                        .write_all(head.as_bytes())
                        .and_then(|()| stream.write_all(&body[..body.len() / 2]));
                    holding.store(true, Ordering::SeqCst);
                    let until = Instant::now() + Duration::from_secs(60);
                    while hold.load(Ordering::SeqCst) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    return;
                }
                let _ = stream
                    .write_all(head.as_bytes())
                    .and_then(|()| stream.write_all(body));
            });
        }
    });
    port
}

#[test]
fn a_store_reader_killed_mid_download_fails_that_deploy_and_nothing_else() {
    let h = Host::new();
    let hold = Arc::new(AtomicBool::new(true));
    let holding = Arc::new(AtomicBool::new(false));
    let big = sluice_tests::fleet::noise(FILE_BYTES, 11);
    let port = store(
        h.root(),
        tar(&[("BUILD", b"b1")]),
        tar(&[("BUILD", b"b2"), ("big.bin", &big)]),
        hold.clone(),
        holding.clone(),
    );
    h.service(
        SVC,
        &format!(
            r#"command = ["/bin/sleep", "1000"]
instances = 1
stop_grace_ms = 1000
[build]
source = "http://127.0.0.1:{port}/{{build}}.tar"
"#
        ),
    );
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
    let daemon = h.daemon_pid().expect("the daemon runs");
    let daemon_exe = std::fs::read_link(format!("/proc/{daemon}/exe")).unwrap();

    h.sluice(&["deploy", SVC, "b2"]).success();
    let deadline = Instant::now() + PATIENCE;
    // The sidecar's reader has come and gone; the archive's has half of it.
    while !holding.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "b2.tar was never asked for\n{}",
            h.daemon_log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let reader = loop {
        let found = procs::all().into_iter().find(|p| {
            p.ppid == daemon && p.live() && p.cmdline.iter().any(|a| a == "__store-reader")
        });
        if let Some(reader) = found {
            break reader;
        }
        assert!(
            Instant::now() < deadline,
            "no store reader under the daemon {daemon} while b2 downloads\n{}",
            h.daemon_log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("store reader: {reader:?}");
    assert_eq!(reader.cmdline, ["sluiced", "__store-reader"]);
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", reader.pid)).unwrap(),
        daemon_exe,
        "the reader is not the daemon's own image"
    );
    // Credentials and the URL go on stdin, never on the command line.
    assert!(!reader.cmdline.iter().any(|a| a.contains("127.0.0.1")));
    // SAFETY: kill(2) on a pid this test found as the daemon's live child.
    assert_eq!(unsafe { libc::kill(reader.pid, libc::SIGKILL) }, 0);

    let status = h.wait_until(
        |s| s.service(SVC)["deploy"].is_null() && s.service(SVC)["deploy_error"].is_string(),
        ACTION_PATIENCE,
    );
    let error = status.service(SVC)["deploy_error"]
        .as_str()
        .unwrap()
        .to_owned();
    println!("deploy of b2: {error}");
    for want in [
        "store reader",
        &format!("pid {}", reader.pid),
        "signal: 9",
        &format!("http://127.0.0.1:{port}/b2.tar: the store reader"),
    ] {
        assert!(error.contains(want), "`{error}` lacks `{want}`");
    }
    assert!(
        h.daemon_exit_status().is_none(),
        "the daemon exited\n{}",
        h.daemon_log_tail()
    );
    assert_eq!(status.service(SVC)["build"], "b1", "{status}");
    assert_eq!(status.pids(SVC), pids, "the serving instance was restarted");
    let releases = h.daemon_data_path(&format!("{SVC}/releases"));
    let left: Vec<String> = std::fs::read_dir(&releases)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["b1"], "the killed download left something behind");

    // The store answers in full now; the same build deploys.
    hold.store(false, Ordering::SeqCst);
    h.sluice(&["deploy", SVC, "b2"]).success();
    let status = h.wait_until(
        |s| {
            s.service(SVC)["build"] == "b2"
                && s.service(SVC)["deploy"].is_null()
                && s.running(SVC) == 1
        },
        ACTION_PATIENCE,
    );
    assert!(status.service(SVC)["deploy_error"].is_null(), "{status}");
    let big_file = h.daemon_data_path(&format!("{SVC}/releases/b2/big.bin"));
    assert_eq!(std::fs::read(big_file).unwrap(), big);
}
