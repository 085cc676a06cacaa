//! Tests of the build store against real files, a loopback HTTP server and a moto S3 server,
//! with archives built here (including hostile ones the tar crate's own builder refuses).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;

// ---------------------------------------------------------------------------------------------
// Archives

/// A tar archive built entry by entry with raw names, so hostile paths can be written.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(1);
        header
    }

    fn append(&mut self, mut header: tar::Header, data: &[u8]) {
        header.set_cksum();
        self.0.append(&header, data).unwrap();
    }

    fn file(mut self, path: &str, data: &[u8], mode: u32) -> Tar {
        let header = Tar::header(path, tar::EntryType::Regular, data.len() as u64, mode);
        self.append(header, data);
        self
    }

    fn dir(mut self, path: &str) -> Tar {
        let header = Tar::header(path, tar::EntryType::Directory, 0, 0o755);
        self.append(header, &[]);
        self
    }

    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Tar {
        let mut header = Tar::header(path, kind, 0, 0o777);
        header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        self.append(header, &[]);
        self
    }

    fn symlink(self, path: &str, target: &str) -> Tar {
        self.link(tar::EntryType::Symlink, path, target)
    }

    fn hardlink(self, path: &str, target: &str) -> Tar {
        self.link(tar::EntryType::Link, path, target)
    }

    fn char_device(mut self, path: &str) -> Tar {
        let mut header = Tar::header(path, tar::EntryType::Char, 0, 0o666);
        header.set_device_major(1).unwrap();
        header.set_device_minor(3).unwrap();
        self.append(header, &[]);
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(tar).unwrap();
    encoder.finish().unwrap()
}

fn zstd(tar: &[u8]) -> Vec<u8> {
    zstd::encode_all(tar, 3).unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A small release: a directory, an executable, a config file and a safe relative symlink.
fn good_tar(marker: &str) -> Vec<u8> {
    Tar::new()
        .dir("bin/")
        .file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
        .file("etc/conf.txt", marker.as_bytes(), 0o644)
        .symlink("bin/conf", "../etc/conf.txt")
        .finish()
}

/// Writes `bytes` under `dir` and returns a `file://` source for it.
fn file_source(dir: &Path, name: &str, bytes: &[u8]) -> Source {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    Source {
        url: format!("file://{}", path.display()),
        sha256: Some(sha256(bytes)),
    }
}

/// Asserts that a failed install left neither the release nor a temporary directory behind.
fn assert_clean(releases: &Releases, build: &str) {
    assert!(!releases.has(build));
    assert!(!releases.release_dir(build).exists());
    let dir = releases.release_dir(build).parent().unwrap().to_owned();
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "leftovers: {leftovers:?}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---------------------------------------------------------------------------------------------
// A loopback HTTP server

enum Route {
    Body(Vec<u8>),
    /// Announces the whole body, sends half of it, then goes silent.
    Stall(Vec<u8>),
    /// Sends the body 16 KiB every 10 ms: a store with a slow uplink.
    Paced(Vec<u8>),
}

/// A one-request-per-connection HTTP/1.1 server on a std thread, counting requests per path.
struct HttpServer {
    addr: SocketAddr,
    hits: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl HttpServer {
    fn start(routes: BTreeMap<String, Route>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(BTreeMap::new()));
        let routes = Arc::new(routes);
        let counted = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (routes, hits) = (routes.clone(), counted.clone());
                std::thread::spawn(move || serve_one(stream, &routes, &hits));
            }
        });
        HttpServer { addr, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn serve_one(
    mut stream: TcpStream,
    routes: &BTreeMap<String, Route>,
    hits: &Mutex<BTreeMap<String, usize>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let head = |status: &str, len: usize| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    let _ = match routes.get(&path) {
        Some(Route::Body(body)) => stream
            .write_all(head("200 OK", body.len()).as_bytes())
            .and_then(|()| stream.write_all(body)),
        Some(Route::Stall(body)) => {
            let sent = stream
                .write_all(head("200 OK", body.len()).as_bytes())
                .and_then(|()| stream.write_all(&body[..body.len() / 2]))
                .and_then(|()| stream.flush());
            std::thread::sleep(Duration::from_secs(10));
            sent
        }
        Some(Route::Paced(body)) => (|| {
            stream.write_all(head("200 OK", body.len()).as_bytes())?;
            for chunk in body.chunks(16 * 1024) {
                stream.write_all(chunk)?;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })(),
        None => stream.write_all(head("404 Not Found", 0).as_bytes()),
    };
}

// ---------------------------------------------------------------------------------------------
// Pure functions

#[test]
fn build_ids() {
    for good in ["1", "v1.2.3", "app_2024-01-01", &"a".repeat(128)] {
        assert_eq!(check_build_id(good), Ok(()), "{good}");
    }
    for bad in [
        "",
        ".",
        "..",
        ".hidden",
        "a/b",
        "a b",
        "é",
        &"a".repeat(129),
    ] {
        assert!(check_build_id(bad).is_err(), "{bad}");
    }
    assert_eq!(
        source_url("s3://b/{service}/{build}.tar.gz", "web", "v7"),
        "s3://b/web/v7.tar.gz"
    );
}

#[test]
fn symlink_targets() {
    let ok = |link: &str, target: &str| {
        extract_check(link, target).unwrap_or_else(|e| panic!("{link} -> {target}: {e}"))
    };
    ok("a", "b");
    ok("bin/conf", "../etc/conf.txt");
    ok("d/b", "..");
    ok("a", ".");
    for (link, target) in [
        ("link", "../../outside"),
        ("link", ".."),
        ("a/b", "../../x"),
        ("a", "/etc/passwd"),
        // Lexically `d`, but really the parent of the release when `d/b -> ..`.
        ("a", "d/b/.."),
        ("a", ""),
    ] {
        assert!(extract_check(link, target).is_err(), "{link} -> {target}");
    }
}

fn extract_check(link: &str, target: &str) -> Result<(), String> {
    extract::check_symlink_target(Path::new(link), Path::new(target))
}

// ---------------------------------------------------------------------------------------------
// file://

#[tokio::test]
async fn file_installs_switch_list_and_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let releases = Releases::new(&tmp.path().join("data"), "web");
    let limits = Limits::default();

    let gz = file_source(&store, "b1.tar.gz", &gzip(&good_tar("one")));
    let zst = file_source(&store, "b2.tar.zst", &zstd(&good_tar("two")));
    assert!(!releases.has("b1"));
    let dir1 = releases.install("b1", &gz, &limits).await.unwrap();
    let dir2 = releases.install("b2", &zst, &limits).await.unwrap();
    assert_eq!(dir1, tmp.path().join("data/web/releases/b1"));
    for (dir, marker) in [(&dir1, "one"), (&dir2, "two")] {
        assert!(dir.join("bin").is_dir());
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/conf.txt")).unwrap(),
            marker
        );
        assert_eq!(mode(&dir.join("bin/tool")), 0o755);
        assert_eq!(mode(&dir.join("etc/conf.txt")), 0o644);
        assert_eq!(
            std::fs::read_link(dir.join("bin/conf")).unwrap(),
            Path::new("../etc/conf.txt")
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("bin/conf")).unwrap(),
            marker
        );
    }
    assert!(releases.has("b1") && releases.has("b2"));

    assert_eq!(releases.current(), None);
    assert!(matches!(
        releases.set_current("b9"),
        Err(BuildError::NotInstalled { .. })
    ));
    releases.set_current("b1").unwrap();
    assert_eq!(releases.current().as_deref(), Some("b1"));
    let current = tmp.path().join("data/web/current");
    assert_eq!(
        std::fs::read_to_string(current.join("etc/conf.txt")).unwrap(),
        "one"
    );
    releases.set_current("b2").unwrap();
    assert_eq!(releases.current().as_deref(), Some("b2"));
    assert_eq!(
        std::fs::read_to_string(current.join("etc/conf.txt")).unwrap(),
        "two"
    );
    // The old release is untouched, and the flip left no temporary link behind.
    assert_eq!(
        std::fs::read_to_string(dir1.join("etc/conf.txt")).unwrap(),
        "one"
    );
    let names: Vec<_> = std::fs::read_dir(tmp.path().join("data/web"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(".tmp-")), "{names:?}");

    for build in ["b3", "b4", "b5"] {
        let source = file_source(&store, &format!("{build}.tar.gz"), &gzip(&good_tar(build)));
        releases.install(build, &source, &limits).await.unwrap();
    }
    assert_eq!(releases.list(), ["b1", "b2", "b3", "b4", "b5"]);
    // Keep the newest two; b1 is in use and b2 is current, so only b3 goes.
    let in_use = BTreeSet::from(["b1".to_owned()]);
    assert_eq!(releases.prune(2, &in_use).unwrap(), ["b3"]);
    assert_eq!(releases.list(), ["b1", "b2", "b4", "b5"]);
    assert_eq!(releases.prune(2, &in_use).unwrap(), Vec::<String>::new());
    assert_eq!(
        releases.prune(0, &BTreeSet::new()).unwrap(),
        ["b1", "b4", "b5"]
    );
    assert_eq!(releases.list(), ["b2"]);
    assert_clean(&releases, "b3");
}

#[tokio::test]
async fn install_removes_leftovers_of_dead_processes_only() {
    let tmp = tempfile::tempdir().unwrap();
    let releases = Releases::new(tmp.path(), "web");
    let dir = tmp.path().join("web/releases");
    // Pid 0x7fff_fff0 is far above pid_max, so it cannot be alive.
    let dead = dir.join(".tmp-b0-2147483632-0");
    let ours = dir.join(format!(".tmp-b0-{}-999999", std::process::id()));
    std::fs::create_dir_all(dead.join("bin")).unwrap();
    std::fs::create_dir_all(&ours).unwrap();
    let source = file_source(tmp.path(), "b1.tar", &good_tar("one"));
    releases
        .install("b1", &source, &Limits::default())
        .await
        .unwrap();
    assert!(!dead.exists());
    assert!(ours.exists());
    assert!(releases.has("b1"), "plain tar installs too");
}

#[tokio::test]
async fn missing_file_is_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let releases = Releases::new(tmp.path(), "web");
    let url = format!("file://{}/nope.tar.gz", tmp.path().display());
    let source = Source {
        url: url.clone(),
        sha256: Some("0".repeat(64)),
    };
    let err = releases
        .install("b1", &source, &Limits::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::NotFound { url: u } if *u == url),
        "{err}"
    );
    assert_eq!(err.to_string(), format!("no build at {url}"));
    assert!(!releases.has("b1"));
}

// ---------------------------------------------------------------------------------------------
// Hostile and broken archives

#[tokio::test]
async fn bad_archives_are_refused_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let releases = Releases::new(&tmp.path().join("data"), "web");
    let good = gzip(&good_tar("one"));
    let small = Limits {
        max_unpacked_bytes: 10,
        ..Limits::default()
    };
    let few = Limits {
        max_entries: 2,
        ..Limits::default()
    };
    let tiny_download = Limits {
        max_archive_bytes: 64,
        ..Limits::default()
    };

    /// Build id, archive, sha256 override, limits, expected error, text the message must hold.
    type Case = (
        &'static str,
        Vec<u8>,
        Option<String>,
        Limits,
        Check,
        &'static str,
    );
    type Check = fn(&BuildError) -> bool;
    let cases: Vec<Case> = vec![
        (
            "wrong-sha",
            good.clone(),
            Some("ab".repeat(32)),
            Limits::default(),
            |e| matches!(e, BuildError::Checksum { expected, .. } if *expected == "ab".repeat(32)),
            "wrong-sha.tar.gz",
        ),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            None,
            Limits::default(),
            |e| matches!(e, BuildError::Archive { .. }),
            "truncated.tar.gz",
        ),
        (
            "dotdot",
            gzip(&Tar::new().file("../evil", b"x", 0o644).finish()),
            None,
            Limits::default(),
            |e| matches!(e, BuildError::UnsafeEntry { entry, .. } if entry == "../evil"),
            "escapes the release",
        ),
        (
            "absolute",
            gzip(&Tar::new().file("/etc/evil", b"x", 0o644).finish()),
            None,
            Limits::default(),
            |e| matches!(e, BuildError::UnsafeEntry { entry, .. } if entry == "/etc/evil"),
            "absolute path",
        ),
        (
            "symlink-escape",
            gzip(&Tar::new().symlink("link", "../../outside").finish()),
            None,
            Limits::default(),
            |e| matches!(e, BuildError::UnsafeEntry { entry, .. } if entry == "link"),
            "../../outside",
        ),
        (
            "symlink-parent",
            zstd(
                &Tar::new()
                    .symlink("up", ".")
                    .file("up/x", b"x", 0o644)
                    .finish(),
            ),
            None,
            Limits::default(),
            |e| matches!(e, BuildError::UnsafeEntry { entry, .. } if entry == "up/x"),
            "parent is a symlink",
        ),
        (
            "hardlink-escape",
            gzip(&Tar::new().hardlink("hl", "../../etc/passwd").finish()),
            None,
            Limits::default(),
            |e| matches!(e, BuildError::UnsafeEntry { entry, .. } if entry == "hl"),
            "../../etc/passwd",
        ),
        (
            "hardlink-absent",
            gzip(&Tar::new().hardlink("hl", "etc/passwd").finish()),
            None,
            Limits::default(),
            |e| matches!(e, BuildError::UnsafeEntry { entry, .. } if entry == "hl"),
            "not an already extracted file",
        ),
        (
            "char-device",
            gzip(&Tar::new().char_device("dev/null").finish()),
            None,
            Limits::default(),
            |e| matches!(e, BuildError::UnsafeEntry { entry, .. } if entry == "dev/null"),
            "device",
        ),
        (
            "reserved",
            gzip(&Tar::new().file(".sluice/installed", b"0", 0o644).finish()),
            None,
            Limits::default(),
            |e| matches!(e, BuildError::UnsafeEntry { .. }),
            "reserved",
        ),
        (
            "oversized",
            good.clone(),
            None,
            small,
            |e| {
                matches!(
                    e,
                    BuildError::TooLarge {
                        limit_name: "max_unpacked_bytes",
                        limit: 10,
                        ..
                    }
                )
            },
            "max_unpacked_bytes",
        ),
        (
            "too-many",
            good.clone(),
            None,
            few,
            |e| {
                matches!(
                    e,
                    BuildError::TooLarge {
                        limit_name: "max_entries",
                        ..
                    }
                )
            },
            "max_entries",
        ),
        (
            "big-download",
            good.clone(),
            None,
            tiny_download,
            |e| {
                matches!(
                    e,
                    BuildError::TooLarge {
                        limit_name: "max_archive_bytes",
                        ..
                    }
                )
            },
            "max_archive_bytes",
        ),
    ];
    for (build, bytes, sha, limits, check, needle) in cases {
        let mut source = file_source(&store, &format!("{build}.tar.gz"), &bytes);
        if let Some(sha) = sha {
            source.sha256 = Some(sha);
        }
        let err = releases.install(build, &source, &limits).await.unwrap_err();
        let message = err.to_string();
        assert!(check(&err), "{build}: unexpected error {message}");
        assert!(
            message.contains(needle),
            "{build}: `{message}` lacks `{needle}`"
        );
        let names_url = matches!(
            err,
            BuildError::Checksum { .. } | BuildError::Archive { .. } | BuildError::TooLarge { .. }
        );
        if names_url {
            assert!(
                message.contains(&source.url),
                "{build}: `{message}` lacks the url"
            );
        }
        assert_clean(&releases, build);
    }
    assert!(!tmp.path().join("outside").exists());
    assert!(!tmp.path().join("evil").exists());
    assert_eq!(releases.list(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// http://

#[tokio::test]
async fn http_install_with_sidecar_downloads_once() {
    let archive = gzip(&good_tar("http"));
    let sidecar = format!("{}  app-7.tar.gz\n", sha256(&archive));
    let server = HttpServer::start(BTreeMap::from([
        ("/web/app-7.tar.gz".to_owned(), Route::Body(archive.clone())),
        (
            "/web/app-7.tar.gz.sha256".to_owned(),
            Route::Body(sidecar.into_bytes()),
        ),
        (
            "/web/stall.tar.gz".to_owned(),
            Route::Stall(archive.clone()),
        ),
    ]));
    let tmp = tempfile::tempdir().unwrap();
    let releases = Releases::new(tmp.path(), "web");
    let template = server.url("/{service}/app-{build}.tar.gz");
    let source = Source {
        url: source_url(&template, "web", "7"),
        sha256: None,
    };
    let limits = Limits::default();
    for _ in 0..2 {
        let dir = releases.install("7", &source, &limits).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/conf.txt")).unwrap(),
            "http"
        );
    }
    assert_eq!(server.hits("/web/app-7.tar.gz"), 1);
    assert_eq!(server.hits("/web/app-7.tar.gz.sha256"), 1);

    // A build that does not exist: the archive 404s, or its sidecar does.
    let missing = server.url("/web/app-8.tar.gz");
    let err = releases
        .install(
            "8",
            &Source {
                url: missing.clone(),
                sha256: Some(sha256(&archive)),
            },
            &limits,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::NotFound { url } if *url == missing),
        "{err}"
    );
    let err = releases
        .install(
            "8",
            &Source {
                url: missing.clone(),
                sha256: None,
            },
            &limits,
        )
        .await
        .unwrap_err();
    let sidecar_url = format!("{missing}.sha256");
    assert!(
        matches!(&err, BuildError::NotFound { url } if *url == sidecar_url),
        "{err}"
    );
    assert_clean(&releases, "8");

    // A server that goes silent mid-body.
    let stall_url = server.url("/web/stall.tar.gz");
    let quick = Limits {
        fetch_stall_ms: 300,
        ..Limits::default()
    };
    let source = Source {
        url: stall_url.clone(),
        sha256: Some(sha256(&archive)),
    };
    let started = std::time::Instant::now();
    let err = releases.install("9", &source, &quick).await.unwrap_err();
    assert!(
        matches!(&err, BuildError::Stalled { url, .. } if *url == stall_url),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_clean(&releases, "9");
}

// ---------------------------------------------------------------------------------------------
// s3:// against moto

/// A moto S3 server on a free loopback port, killed on drop.
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts moto from the test venv, the machine's python3, or `moto_server` on the PATH.
fn start_moto() -> Option<Moto> {
    let venv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/test-venv/bin/moto_server"
    );
    let candidates: [(&str, &[&str]); 3] = [
        (venv, &[]),
        ("python3", &["-m", "moto.server"]),
        ("moto_server", &[]),
    ];
    for (program, args) in candidates {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let Ok(child) = std::process::Command::new(program)
            .args(args)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        else {
            continue;
        };
        let mut moto = Moto { child, port };
        for _ in 0..150 {
            if let Ok(Some(_)) = moto.child.try_wait() {
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(moto);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    None
}

/// Sends one bodiless request and returns the status line.
fn raw_request(port: u16, method: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

#[tokio::test]
async fn s3_install_from_moto() {
    let Some(moto) = start_moto() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("moto server cannot be started (pip install 'moto[server]')");
        }
        eprintln!("skipping: moto missing");
        return;
    };
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    let status = raw_request(moto.port, "PUT", "/builds");
    assert!(status.contains(" 200 "), "create bucket: {status}");

    let archive = zstd(&good_tar("s3"));
    let bucket = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("builds")
        .with_region("us-east-1")
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    use object_store::ObjectStoreExt;
    let put = |name: &str, bytes: Vec<u8>| {
        let path = object_store::path::Path::from(name);
        let bucket = &bucket;
        async move { bucket.put(&path, bytes.into()).await.unwrap() }
    };
    put("web/b1.tar.zst", archive.clone()).await;
    put("web/b1.tar.zst.sha256", sha256(&archive).into_bytes()).await;

    let tmp = tempfile::tempdir().unwrap();
    let env = BTreeMap::from([
        ("AWS_ACCESS_KEY_ID".to_owned(), "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), "test".to_owned()),
        ("AWS_ENDPOINT_URL".to_owned(), endpoint),
    ]);
    let releases = Releases::new(tmp.path(), "web").with_store_env(env);
    let template = "s3://builds/{service}/{build}.tar.zst";
    let source = Source {
        url: source_url(template, "web", "b1"),
        sha256: None,
    };
    let dir = releases
        .install("b1", &source, &Limits::default())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("etc/conf.txt")).unwrap(),
        "s3"
    );
    assert_eq!(mode(&dir.join("bin/tool")), 0o755);

    let missing = source_url(template, "web", "b2");
    let source = Source {
        url: missing.clone(),
        sha256: Some(sha256(&archive)),
    };
    let err = releases
        .install("b2", &source, &Limits::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::NotFound { url } if *url == missing),
        "{err}"
    );
    assert_clean(&releases, "b2");
    drop(moto);
}

// ---------------------------------------------------------------------------------------------
// Archive bombs, generated as streams: only the headers exist in memory, the hundreds of MiB
// behind them are produced as the extractor reads (and never, once it refused).

/// One piece of a generated archive.
enum Part {
    Bytes(Vec<u8>),
    /// `count` copies of one byte.
    Fill(u8, u64),
    /// The same bytes again and again, `times` times.
    Repeat(Vec<u8>, u64),
    /// `count` headers of empty files `<prefix><n>`.
    Files(&'static str, u64),
}

/// A `Read` over [`Part`]s.
struct Stream {
    parts: std::collections::VecDeque<Part>,
    pending: Vec<u8>,
    files_made: u64,
}

impl Stream {
    fn new(parts: Vec<Part>) -> Stream {
        Stream {
            parts: parts.into(),
            pending: Vec::new(),
            files_made: 0,
        }
    }
}

impl std::io::Read for Stream {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if !self.pending.is_empty() {
                let n = out.len().min(self.pending.len());
                out[..n].copy_from_slice(&self.pending[..n]);
                self.pending.drain(..n);
                return Ok(n);
            }
            match self.parts.front_mut() {
                None => return Ok(0),
                Some(Part::Bytes(bytes)) => {
                    self.pending = std::mem::take(bytes);
                    self.parts.pop_front();
                }
                Some(Part::Fill(byte, count)) => {
                    if *count == 0 {
                        self.parts.pop_front();
                        continue;
                    }
                    let n = (out.len() as u64).min(*count) as usize;
                    out[..n].fill(*byte);
                    *count -= n as u64;
                    return Ok(n);
                }
                Some(Part::Repeat(bytes, times)) => {
                    if *times == 0 {
                        self.parts.pop_front();
                        continue;
                    }
                    *times -= 1;
                    self.pending = bytes.clone();
                }
                Some(Part::Files(prefix, count)) => {
                    if *count == 0 {
                        self.parts.pop_front();
                        continue;
                    }
                    *count -= 1;
                    let name = format!("{prefix}{}", self.files_made);
                    self.files_made += 1;
                    self.pending = header_block(&name, tar::EntryType::Regular, 0, true).to_vec();
                }
            }
        }
    }
}

/// One header block: ustar (`gnu = false`) or GNU magic, checksummed.
fn header_block(name: &str, kind: tar::EntryType, size: u64, gnu: bool) -> [u8; 512] {
    let mut header = if gnu {
        tar::Header::new_gnu()
    } else {
        tar::Header::new_ustar()
    };
    let field = &mut header.as_old_mut().name;
    field[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(1);
    header.set_cksum();
    *header.as_bytes()
}

fn padding(size: u64) -> Part {
    Part::Fill(0, (512 - size % 512) % 512)
}

/// A pax extended header whose `key` record holds `value_bytes` copies of `fill`, describing
/// a small file, then the end marker.
fn pax_bomb(key: &str, fill: u8, value_bytes: u64) -> Vec<Part> {
    // "<len> <key>=<value>\n", where <len> counts itself.
    let fixed = key.len() as u64 + 3;
    let mut len = fixed + value_bytes;
    while len != fixed + value_bytes + len.to_string().len() as u64 {
        len = fixed + value_bytes + len.to_string().len() as u64;
    }
    vec![
        Part::Bytes(header_block("PaxHeaders/bomb", tar::EntryType::XHeader, len, false).to_vec()),
        Part::Bytes(format!("{len} {key}=").into_bytes()),
        Part::Fill(fill, value_bytes),
        Part::Bytes(b"\n".to_vec()),
        padding(len),
        Part::Bytes(header_block("bomb", tar::EntryType::Regular, 0, false).to_vec()),
        Part::Fill(0, 1024),
    ]
}

/// A GNU long name (`L`) of `bytes` copies of `a`, naming a small file, then the end marker.
fn long_name_bomb(kind: tar::EntryType, bytes: u64) -> Vec<Part> {
    vec![
        Part::Bytes(header_block("././@LongLink", kind, bytes, true).to_vec()),
        Part::Fill(b'a', bytes),
        padding(bytes),
        Part::Bytes(header_block("bomb", tar::EntryType::Regular, 0, true).to_vec()),
        Part::Fill(0, 1024),
    ]
}

/// Extracts `stream` (gzipped on the fly when `gz`) into a fresh directory, feeding the
/// extractor from a thread as the download would, and returns its result and how many bytes
/// the feeder produced before the extractor stopped reading.
fn extract_stream(stream: Stream, gz: bool, limits: &Limits) -> (Result<(), BuildError>, u64) {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let feeder = std::thread::spawn(move || {
        let mut stream = stream;
        let mut encoder =
            gz.then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut produced = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = stream.read(&mut buf).unwrap();
            produced += n as u64;
            let chunk = match &mut encoder {
                Some(enc) if n == 0 => {
                    let enc = std::mem::replace(
                        enc,
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
                    );
                    enc.finish().unwrap()
                }
                Some(enc) => {
                    enc.write_all(&buf[..n]).unwrap();
                    std::mem::take(enc.get_mut())
                }
                None => buf[..n].to_vec(),
            };
            if !chunk.is_empty()
                && tx
                    .blocking_send(extract::Chunk::Data(bytes::Bytes::from(chunk)))
                    .is_err()
            {
                return produced;
            }
            if n == 0 {
                let _ = tx.blocking_send(extract::Chunk::End);
                return produced;
            }
        }
    });
    let result = extract::extract(rx, tmp.path(), "file:///store/bomb.tar", limits);
    let produced = feeder.join().unwrap();
    (result, produced)
}

/// Asserts a bomb was refused early with a short message holding every `needle`.
#[track_caller]
fn assert_refused(result: Result<(), BuildError>, produced: u64, total: u64, needles: &[&str]) {
    let err = result.expect_err("the bomb was accepted");
    let message = err.to_string();
    for needle in needles {
        assert!(message.contains(needle), "`{message}` lacks `{needle}`");
    }
    assert!(message.len() < 1024, "{} bytes: {message}", message.len());
    assert!(
        produced < total / 4,
        "the extractor read {produced} of {total} bytes before refusing"
    );
}

const BOMB_BYTES: u64 = 512 << 20;

#[test]
fn a_pax_path_of_hundreds_of_mib_is_refused_before_it_is_buffered() {
    let (result, produced) = extract_stream(
        Stream::new(pax_bomb("path", b'0', BOMB_BYTES)),
        false,
        &Limits::default(),
    );
    assert_refused(
        result,
        produced,
        BOMB_BYTES,
        &[
            "PaxHeaders/bomb",
            "pax extended header",
            "65536",
            "path=000",
        ],
    );
}

#[test]
fn a_pax_header_inside_a_gzip_stream_is_refused_too() {
    let (result, produced) = extract_stream(
        Stream::new(pax_bomb("linkpath", b'0', BOMB_BYTES)),
        true,
        &Limits::default(),
    );
    assert_refused(
        result,
        produced,
        BOMB_BYTES,
        &["PaxHeaders/bomb", "pax extended header", "linkpath=000"],
    );
}

#[test]
fn gnu_long_names_and_links_of_hundreds_of_mib_are_refused() {
    for kind in [tar::EntryType::GNULongName, tar::EntryType::GNULongLink] {
        let (result, produced) = extract_stream(
            Stream::new(long_name_bomb(kind, BOMB_BYTES)),
            false,
            &Limits::default(),
        );
        let size = format!("…({BOMB_BYTES} bytes)");
        assert_refused(
            result,
            produced,
            BOMB_BYTES,
            &["gnu long", "aaaaaaaa", &size],
        );
    }
}

#[test]
fn metadata_bytes_count_against_max_unpacked_bytes() {
    // A pax header under its own cap, but over a small archive cap.
    let limits = Limits {
        max_unpacked_bytes: 1000,
        ..Limits::default()
    };
    let (result, _) = extract_stream(Stream::new(pax_bomb("comment", b'x', 2000)), false, &limits);
    let err = result.unwrap_err();
    assert!(
        matches!(
            &err,
            BuildError::TooLarge {
                limit_name: "max_unpacked_bytes",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("at entry `PaxHeaders/bomb`"),
        "{err}"
    );
}

#[test]
fn entry_count_bombs_are_refused_at_max_entries() {
    let limits = Limits {
        max_entries: 1000,
        ..Limits::default()
    };
    // Empty files, and pax global headers the unpacker skips: both are headers, both count.
    let global = header_block("PaxHeaders/global", tar::EntryType::XGlobalHeader, 0, false);
    for (what, stream, culprit) in [
        (
            "files",
            Stream::new(vec![Part::Files("f", 10_000_000)]),
            "f1000",
        ),
        (
            "pax global headers",
            Stream::new(vec![Part::Repeat(global.to_vec(), 10_000_000)]),
            "PaxHeaders/global",
        ),
    ] {
        let (result, produced) = extract_stream(stream, true, &limits);
        let err = result.unwrap_err();
        assert!(
            matches!(
                &err,
                BuildError::TooLarge {
                    limit_name: "max_entries",
                    limit: 1000,
                    ..
                }
            ),
            "{what}: {err}"
        );
        assert!(
            err.to_string().contains(&format!("at entry `{culprit}`")),
            "{what}: {err}"
        );
        assert!(produced < 100 << 20, "{what}: {produced} bytes read");
    }
}

#[test]
fn deep_and_long_paths_are_refused() {
    let deep = format!("{}f", "d/".repeat(300));
    let long = format!("{}/f", "x".repeat(5000));
    for (path, needle) in [(&deep, "301 components"), (&long, "5002 bytes")] {
        let mut parts = vec![];
        let record_len = {
            let fixed = "path=".len() as u64 + 2 + path.len() as u64;
            let mut len = fixed;
            while len != fixed + len.to_string().len() as u64 {
                len = fixed + len.to_string().len() as u64;
            }
            len
        };
        parts.push(Part::Bytes(
            header_block(
                "PaxHeaders/deep",
                tar::EntryType::XHeader,
                record_len,
                false,
            )
            .to_vec(),
        ));
        parts.push(Part::Bytes(
            format!("{record_len} path={path}\n").into_bytes(),
        ));
        parts.push(padding(record_len));
        parts.push(Part::Bytes(
            header_block("deep", tar::EntryType::Regular, 0, false).to_vec(),
        ));
        parts.push(Part::Fill(0, 1024));
        let (result, _) = extract_stream(Stream::new(parts), false, &Limits::default());
        let err = result.unwrap_err();
        assert!(matches!(&err, BuildError::UnsafeEntry { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(needle), "{message}");
        assert!(message.contains("…("), "the entry is clipped: {message}");
        assert!(message.len() < 1024, "{message}");
    }
}

#[test]
fn a_pax_size_record_is_followed_like_the_tar_crate_does() {
    // The header says 0 bytes, the pax record says 5: the guard must skip 5 (padded) bytes, or
    // it would read the file's data as a header.
    let record = "12 size=512\n";
    let data = [b'z'; 512];
    let parts = vec![
        Part::Bytes(header_block("PaxHeaders/f", tar::EntryType::XHeader, 12, false).to_vec()),
        Part::Bytes(record.as_bytes().to_vec()),
        padding(12),
        Part::Bytes(header_block("f", tar::EntryType::Regular, 0, false).to_vec()),
        Part::Bytes(data.to_vec()),
        Part::Bytes(header_block("g", tar::EntryType::Regular, 0, false).to_vec()),
        Part::Fill(0, 1024),
    ];
    let mut guard =
        extract::guard::HeaderGuard::new(Stream::new(parts), "file:///t", &Limits::default());
    let mut archive = tar::Archive::new(&mut guard);
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        names.push((entry.path().unwrap().display().to_string(), entry.size()));
        std::io::copy(&mut entry, &mut std::io::sink()).unwrap();
    }
    assert_eq!(names, [("f".to_owned(), 512), ("g".to_owned(), 0)]);
    assert!(guard.ended(), "the guard saw the end marker where tar did");
}

#[tokio::test]
async fn set_id_bits_and_ownership_from_the_archive_are_never_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let releases = Releases::new(&tmp.path().join("data"), "web");
    let mut tar = Tar::new();
    let mut dir = Tar::header("shared/", tar::EntryType::Directory, 0, 0o7777);
    dir.set_uid(4242);
    dir.set_gid(4242);
    tar.append(dir, &[]);
    for (path, mode) in [
        ("shared/suid", 0o4755),
        ("shared/sgid", 0o2711),
        ("shared/sticky", 0o1644),
    ] {
        let mut header = Tar::header(path, tar::EntryType::Regular, 2, mode);
        header.set_uid(4242);
        header.set_gid(4343);
        tar.append(header, b"x\n");
    }
    let source = file_source(tmp.path(), "ids.tar.gz", &gzip(&tar.finish()));
    let dir = releases
        .install("ids", &source, &Limits::default())
        .await
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    for (path, want) in [
        ("shared", 0o755),
        ("shared/suid", 0o755),
        ("shared/sgid", 0o755),
        ("shared/sticky", 0o644),
    ] {
        let meta = std::fs::metadata(dir.join(path)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, want, "{path}");
        assert_eq!(
            (meta.uid(), meta.gid()),
            (uid, gid),
            "{path}: ownership came from the archive"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Through peers, against a real ZooKeeper

/// A build registered in a real ZooKeeper with its archive on a paced loopback store, and the
/// hosts' sessions and peer sides (issue 12's tests below).
struct PeerFleet {
    /// Keeps the ZooKeeper server running.
    _server: sluice_tests::zk::Zookeeper,
    connect: String,
    store: HttpServer,
    source: Source,
    tmp: tempfile::TempDir,
}

impl PeerFleet {
    async fn start() -> Option<PeerFleet> {
        use crate::coord::{BuildMeta, Fleet};
        let server = tokio::task::block_in_place(sluice_tests::zk::Zookeeper::loopback)?;
        let noise: Vec<u8> = (0..512 * 1024).map(|_| rand::random::<u8>()).collect();
        let tar = Tar::new()
            .file("etc/conf.txt", b"fleet", 0o644)
            .file("noise", &noise, 0o644)
            .finish();
        let archive = gzip(&tar);
        let digest = sha256(&archive);
        let store = HttpServer::start(BTreeMap::from([(
            "/web/b1.tar.gz".to_owned(),
            Route::Paced(archive.clone()),
        )]));
        let url = store.url("/web/b1.tar.gz");
        let connect = server.connect_string();
        let fleet = Fleet::connect(&connect, None).await.unwrap();
        let meta = BuildMeta {
            url: url.clone(),
            sha256: digest.clone(),
            size: Some(archive.len() as u64),
            created: None,
        };
        fleet.register_build("web", "b1", &meta).await.unwrap();
        Some(PeerFleet {
            _server: server,
            connect,
            store,
            source: Source {
                url,
                sha256: Some(digest),
            },
            tmp: tempfile::tempdir().unwrap(),
        })
    }

    /// A connected session of `host`, with its event stream (which must stay alive).
    async fn session(
        &self,
        host: &str,
    ) -> (
        crate::coord::Zk,
        tokio::sync::mpsc::Receiver<crate::coord::CoordEvent>,
    ) {
        use crate::coord::{CoordEvent, Zk, ZkConfig};
        let config = ZkConfig {
            connect: self.connect.clone(),
            host: host.to_owned(),
            digest: None,
            session_timeout_ms: 10_000,
        };
        let (zk, mut events) = Zk::start(config, vec![]);
        assert_eq!(events.recv().await, Some(CoordEvent::Connected));
        (zk, events)
    }

    /// `host` of `rack` with its peer server on a free loopback port and its releases.
    async fn host(
        &self,
        host: &str,
        rack: &str,
    ) -> (
        peer::Peers,
        Releases,
        tokio::sync::mpsc::Receiver<crate::coord::CoordEvent>,
    ) {
        self.host_with(host, rack, None, free_port()).await
    }

    /// [`PeerFleet::host`] with `peers.secret_file` and the peer port given.
    async fn host_with(
        &self,
        host: &str,
        rack: &str,
        secret_file: Option<&Path>,
        port: u16,
    ) -> (
        peer::Peers,
        Releases,
        tokio::sync::mpsc::Receiver<crate::coord::CoordEvent>,
    ) {
        let (zk, events) = self.session(host).await;
        let config = peer::PeerConfig {
            enabled: true,
            listen: format!("127.0.0.1:{port}"),
            secret_file: secret_file.map(Path::to_owned),
            ..peer::PeerConfig::default()
        };
        let dir = self.tmp.path().join(host);
        let peers = peer::Peers::start(&config, Some(rack), &dir, zk, vec!["web".into()])
            .await
            .unwrap();
        (peers, Releases::new(&dir, "web"), events)
    }

    /// Installs b1 on every host at once; each must arrive verified.
    async fn install_all(
        &self,
        hosts: &[(
            peer::Peers,
            Releases,
            tokio::sync::mpsc::Receiver<crate::coord::CoordEvent>,
        )],
    ) {
        let limits = Limits::default();
        let installs = hosts.iter().map(|(peers, releases, _)| {
            peer::install(Some(peers), releases, "web", "b1", &self.source, &limits)
        });
        for dir in futures_util::future::join_all(installs).await {
            let dir = dir.unwrap();
            assert_eq!(
                std::fs::read_to_string(dir.join("etc/conf.txt")).unwrap(),
                "fleet"
            );
        }
    }
}

/// A loopback port nothing listens on (bound, then let go).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The racks' fetchers of one build, all starting at once, elect one store fetcher: the store
/// serves one copy, and the other racks stream it from that host as it arrives (issue 12).
/// Without the fleet-wide election each rack's fetcher found no peer yet and went to the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racks_fetching_at_once_take_one_copy_from_the_store() {
    let Some(fleet) = PeerFleet::start().await else {
        return;
    };
    let mut hosts = Vec::new();
    for i in 1..=3 {
        hosts.push(fleet.host(&format!("h{i}"), &format!("r{i}")).await);
    }
    fleet.install_all(&hosts).await;
    assert_eq!(
        fleet.store.hits("/web/b1.tar.gz"),
        1,
        "three racks' fetchers took more than one copy from the store"
    );
}

/// A host that died while it held both its rack's fetcher election and the fleet's store
/// fetcher (its session still alive, as it stays for `session_timeout_ms` after a `kill -9`,
/// its peer node naming a port nothing listens on): the hosts that need the build find it
/// unreachable, open its elections, elect a new store fetcher among themselves and take one
/// copy from the store. Without the take-over each spent its attempts on the dead host and
/// went to the store on its own (one copy each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_held_by_an_unreachable_host_are_taken_over() {
    use crate::coord::{PeerNode, RackFetcher, StoreFetcher};
    let Some(fleet) = PeerFleet::start().await else {
        return;
    };
    let (ghost, _ghost_events) = fleet.session("h9").await;
    assert_eq!(
        ghost.try_fetch_lock("web", "b1", "r1").await.unwrap(),
        RackFetcher::Me
    );
    assert_eq!(
        ghost.try_store_fetcher("web", "b1", "r1").await.unwrap(),
        StoreFetcher::Me
    );
    let dead = PeerNode {
        addr: format!("127.0.0.1:{}", free_port()),
        complete: false,
        origin: None,
    };
    ghost.set_peer("web", "b1", "r1", Some(dead));
    let (onlooker, _onlooker_events) = fleet.session("h8").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while onlooker
        .peers_of("web", "b1", "r2")
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead host's peer node never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hosts = vec![fleet.host("h1", "r1").await, fleet.host("h2", "r2").await];
    fleet.install_all(&hosts).await;
    assert_eq!(
        fleet.store.hits("/web/b1.tar.gz"),
        1,
        "hosts whose store fetcher died took more than one copy from the store"
    );
}

/// With `peers.secret_file`, peers serve only requests signed with the fleet's key. Two hosts of
/// one key take one copy from the store and stream it from each other; a host with another key
/// is refused by both (401) and takes its build from the store; an unsigned request is refused
/// before its path is looked at, so it cannot even tell which builds are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_a_shared_key_serve_only_requests_signed_with_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(fleet) = PeerFleet::start().await else {
        return;
    };
    let key_file = |name: &str, fill: &str| {
        let path = fleet.tmp.path().join(name);
        std::fs::write(&path, format!("{}\n", fill.repeat(64))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let (ours, theirs) = (key_file("ours.key", "a"), key_file("theirs.key", "b"));
    let port = free_port();
    let hosts = vec![
        fleet.host_with("h1", "r1", Some(&ours), port).await,
        fleet.host_with("h2", "r2", Some(&ours), free_port()).await,
    ];
    fleet.install_all(&hosts).await;
    assert_eq!(
        fleet.store.hits("/web/b1.tar.gz"),
        1,
        "the keyed hosts did not share"
    );
    for path in ["/v1/builds/web/b1", "/v1/builds/web/nope", "/elsewhere"] {
        let answer = tokio::task::block_in_place(|| raw_request(port, "GET", path));
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
    }
    let other = vec![
        fleet
            .host_with("h3", "r3", Some(&theirs), free_port())
            .await,
    ];
    fleet.install_all(&other).await;
    assert_eq!(
        fleet.store.hits("/web/b1.tar.gz"),
        2,
        "the host with another key was served by a peer"
    );
}
