//! The store reader (`sluiced __store-reader`, `build::reader`): the daemon's store fetches run in
//! a child process, and everything the child sends is checked by the caller as a download of its
//! own was. These tests run the real `sluiced` binary as the reader, and scripts standing in for
//! a reader that dies, lies or stalls.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use sluice::build::{BuildError, Limits, Releases, Source};

fn sluiced() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluiced"))
}

/// A tar archive holding `marker` with `text`.
fn archive(text: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, "marker", text.as_bytes())
        .unwrap();
    tar.into_inner().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn limits(stall_ms: u64) -> Limits {
    Limits {
        fetch_stall_ms: stall_ms,
        ..Limits::default()
    }
}

/// A store holding `bytes` at `dir/name` and its `sha256sum` sidecar.
fn file_store(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    std::fs::write(
        dir.join(format!("{name}.sha256")),
        format!("{}  {name}\n", sha256(bytes)),
    )
    .unwrap();
    format!("file://{}", path.display())
}

/// A reader standing in for `sluiced`: a shell script of `body`.
fn script(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("reader.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Asserts that a failed install left neither the release nor a temporary directory behind.
fn assert_clean(releases: &Releases, build: &str) {
    assert!(!releases.has(build));
    let dir = releases.release_dir(build).parent().unwrap().to_owned();
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "left in {}: {leftovers:?}",
        dir.display()
    );
}

/// Serves `body` once per connection; with `cut`, sends only that many bytes of it and closes.
fn http_server(body: Vec<u8>, cut: Option<usize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut stream = stream;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let sent = &body[..cut.unwrap_or(body.len())];
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|()| stream.write_all(sent));
        }
    });
    format!("http://{addr}/build.tar")
}

#[tokio::test]
async fn a_build_read_by_the_store_reader_installs_and_its_sidecar_is_read_by_it_too() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = archive("from the reader");
    let url = file_store(tmp.path(), "b1.tar", &bytes);
    let releases =
        Releases::new(&tmp.path().join("data"), "web").with_store_reader(Some(sluiced()));
    let source = Source { url, sha256: None };
    let dir = releases
        .install("b1", &source, &limits(5_000))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("marker")).unwrap(),
        "from the reader"
    );

    // Over HTTP, with the checksum given.
    let bytes = archive("over http");
    let source = Source {
        url: http_server(bytes.clone(), None),
        sha256: Some(sha256(&bytes)),
    };
    let dir = releases
        .install("b2", &source, &limits(5_000))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("marker")).unwrap(),
        "over http"
    );
}

#[tokio::test]
async fn what_the_store_reader_cannot_read_keeps_its_own_error() {
    let tmp = tempfile::tempdir().unwrap();
    let releases =
        Releases::new(&tmp.path().join("data"), "web").with_store_reader(Some(sluiced()));
    let missing = Source {
        url: format!("file://{}/nope.tar", tmp.path().display()),
        sha256: Some("0".repeat(64)),
    };
    match releases.install("b1", &missing, &limits(5_000)).await {
        Err(BuildError::NotFound { url }) => assert!(url.ends_with("nope.tar"), "{url}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    let bad = Source {
        url: "ftp://store/b1.tar".into(),
        sha256: Some("0".repeat(64)),
    };
    match releases.install("b1", &bad, &limits(5_000)).await {
        Err(BuildError::BadUrl { url, message }) => {
            assert_eq!(url, "ftp://store/b1.tar");
            assert!(message.contains("ftp://store/b1.tar"), "{message}");
        }
        other => panic!("expected BadUrl, got {other:?}"),
    }
    // A store that closes the connection half-way: the reader's failure, not a short archive.
    let bytes = archive(&"x".repeat(100_000));
    let cut = Source {
        url: http_server(bytes.clone(), Some(bytes.len() / 2)),
        sha256: Some(sha256(&bytes)),
    };
    match releases.install("b1", &cut, &limits(5_000)).await {
        Err(BuildError::Fetch { url, message }) => {
            assert!(url.ends_with("/build.tar"), "{url}");
            // The store client's own words, once: not wrapped by the reader's transport.
            assert!(!message.contains("store reader"), "{message}");
            assert!(!message.contains("cannot fetch"), "{message}");
        }
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert_clean(&releases, "b1");
}

#[tokio::test]
async fn a_reader_that_dies_mid_stream_fails_the_install_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = archive(&"y".repeat(200_000));
    let path = tmp.path().join("b1.tar");
    std::fs::write(&path, &bytes).unwrap();
    let reader = script(
        tmp.path(),
        &format!(
            "printf +; head -c 50000 {}; echo 'about to die' >&2; kill -9 $$",
            path.display()
        ),
    );
    let releases = Releases::new(&tmp.path().join("data"), "web").with_store_reader(Some(reader));
    let source = Source {
        url: "http://store.invalid/b1.tar".into(),
        sha256: Some(sha256(&bytes)),
    };
    match releases.install("b1", &source, &limits(5_000)).await {
        Err(BuildError::Fetch { message, .. }) => {
            assert!(message.contains("store reader"), "{message}");
            assert!(message.contains("signal: 9"), "{message}");
            assert!(message.contains("about to die"), "{message}");
        }
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert_clean(&releases, "b1");
}

#[tokio::test]
async fn bytes_a_reader_made_up_fail_the_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let real = archive("real");
    let forged = tmp.path().join("forged.tar");
    std::fs::write(&forged, archive("forged")).unwrap();
    let reader = script(tmp.path(), &format!("printf +; cat {}", forged.display()));
    let releases = Releases::new(&tmp.path().join("data"), "web").with_store_reader(Some(reader));
    let source = Source {
        url: "http://store.invalid/b1.tar".into(),
        sha256: Some(sha256(&real)),
    };
    match releases.install("b1", &source, &limits(5_000)).await {
        Err(BuildError::Checksum {
            expected, actual, ..
        }) => {
            assert_eq!(expected, sha256(&real));
            assert_ne!(actual, expected);
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    assert_clean(&releases, "b1");
}

#[tokio::test]
async fn a_reader_that_stalls_is_stopped_and_killed_at_fetch_stall_ms() {
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("pid");
    // `exec` keeps the pid: the process killed is the one that wrote it.
    let reader = script(
        tmp.path(),
        &format!("echo $$ > {}; printf +; exec sleep 60", pid_file.display()),
    );
    let releases = Releases::new(&tmp.path().join("data"), "web").with_store_reader(Some(reader));
    let source = Source {
        url: "http://store.invalid/b1.tar".into(),
        sha256: Some("0".repeat(64)),
    };
    let started = Instant::now();
    match releases.install("b1", &source, &limits(300)).await {
        Err(BuildError::Stalled { stall_ms, .. }) => assert_eq!(stall_ms, 300),
        other => panic!("expected a stall, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = PathBuf::from(format!("/proc/{}/stat", pid.trim()));
    // Killed when the install dropped it: gone, or a zombie until the runtime reaps it.
    let running = || {
        std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while running() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!running(), "the stalled reader {} still runs", pid.trim());
    assert_clean(&releases, "b1");
}

#[tokio::test]
async fn a_reader_that_answers_nothing_fails_with_its_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let reader = script(tmp.path(), "echo 'no such thing' >&2; exit 3");
    let releases = Releases::new(&tmp.path().join("data"), "web").with_store_reader(Some(reader));
    let source = Source {
        url: "http://store.invalid/b1.tar".into(),
        sha256: Some("0".repeat(64)),
    };
    match releases.install("b1", &source, &limits(5_000)).await {
        Err(BuildError::Fetch { message, .. }) => {
            assert!(message.contains("exit status: 3"), "{message}");
            assert!(message.contains("no such thing"), "{message}");
        }
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert_clean(&releases, "b1");
}
