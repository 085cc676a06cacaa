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
