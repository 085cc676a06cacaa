//! Unit tests of the primitives: every refusal is checked against a real link, fifo, hard link or
//! swapped directory, and the target is checked untouched.

use super::*;
use std::os::unix::fs::{PermissionsExt, symlink};

/// A directory of its own per test, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("sluice-safefs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: nul-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

fn assert_refused(result: io::Result<impl fmt::Debug>, what: &str) {
    match result {
        Err(e) if is_refused(&e) => {
            assert!(e.to_string().contains(what), "{e} should say {what}");
        }
        other => panic!("expected a refusal ({what}), got {other:?}"),
    }
}

#[test]
fn files_that_are_links_fifos_or_hard_links_are_refused() {
    let t = TempDir::new("files");
    let secret = t.join("secret");
    std::fs::write(&secret, "top secret\n").unwrap();
    let logs = t.join("logs");
    std::fs::create_dir(&logs).unwrap();
    symlink(&secret, logs.join("link.log")).unwrap();
    mkfifo(&logs.join("fifo.log"));
    std::fs::hard_link(&secret, logs.join("hard.log")).unwrap();
    let before = std::fs::metadata(&secret).unwrap();

    let dir = Dir::open(&logs).unwrap();
    assert_refused(dir.open_read("link.log"), "a symbolic link");
    assert_refused(dir.open_append("link.log", 0o640), "a symbolic link");
    assert_refused(dir.create_truncate("link.log", 0o640), "a symbolic link");
    assert_refused(dir.create_new("link.log", 0o640), "a symbolic link");
    // A fifo neither hangs the opener (no writer, no reader) nor is accepted.
    assert_refused(dir.open_read("fifo.log"), "a fifo");
    assert_refused(dir.open_append("fifo.log", 0o640), "a fifo");
    assert_refused(dir.create_truncate("fifo.log", 0o640), "a fifo");
    // Truncation happens after the check: a hard link to another file is left whole.
    assert_refused(dir.create_truncate("hard.log", 0o640), "2 hard links");
    assert_refused(dir.open_read("hard.log"), "2 hard links");
    assert_refused(dir.read_link("hard.log"), "not a symbolic link");

    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "top secret\n");
    let after = std::fs::metadata(&secret).unwrap();
    assert_eq!(
        (before.len(), before.modified().unwrap()),
        (after.len(), after.modified().unwrap())
    );
    assert_eq!(dir.read_link("link.log").unwrap(), secret);
    // Errors name the path.
    let e = dir.open_read("link.log").unwrap_err();
    assert!(
        e.to_string()
            .contains(&logs.join("link.log").display().to_string()),
        "{e}"
    );
}

#[test]
fn regular_files_open_create_append_and_replace() {
    let t = TempDir::new("regular");
    let dir = Dir::open(&t.0).unwrap();
    let mut f = dir.open_append("a.log", 0o640).unwrap();
    f.write_all(b"one\n").unwrap();
    let mut f = dir.open_append("a.log", 0o640).unwrap();
    f.write_all(b"two\n").unwrap();
    assert_eq!(dir.read("a.log", 100).unwrap(), b"one\ntwo\n");
    assert_refused(dir.read("a.log", 3), "larger than 3 bytes");
    assert_eq!(
        dir.create_new("a.log", 0o600).unwrap_err().kind(),
        io::ErrorKind::AlreadyExists
    );
    dir.create_truncate("a.log", 0o640)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert_eq!(dir.read("a.log", 100).unwrap(), b"x");
    dir.write_atomic("marker", b"42\n", 0o644).unwrap();
    assert_eq!(std::fs::read_to_string(t.join("marker")).unwrap(), "42\n");
    assert_eq!(dir.entries().unwrap().len(), 2, "no temporary file is left");
    dir.rename("a.log", "a.log.1").unwrap();
    assert!(t.join("a.log.1").is_file());
    dir.unlink("a.log.1").unwrap();
    assert_eq!(
        dir.open_read("a.log.1").unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
}

#[test]
fn write_atomic_never_writes_through_a_planted_temporary_name() {
    let t = TempDir::new("atomic");
    let secret = t.join("secret");
    std::fs::write(&secret, "keep").unwrap();
    let d = t.join("d");
    std::fs::create_dir(&d).unwrap();
    // The next temporary name this process will use, planted as a link.
    let n = TMP_COUNTER.load(Ordering::Relaxed);
    for k in n..n + 4 {
        let _ = symlink(
            &secret,
            d.join(format!(".m.tmp-{}-{k}", std::process::id())),
        );
    }
    let dir = Dir::open(&d).unwrap();
    dir.write_atomic("m", b"new", 0o644).unwrap();
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "keep");
    assert_eq!(std::fs::read_to_string(d.join("m")).unwrap(), "new");
}

#[test]
fn names_must_stay_inside_the_directory() {
    let t = TempDir::new("names");
    std::fs::create_dir(t.join("d")).unwrap();
    std::fs::write(t.join("outside"), "x").unwrap();
    let dir = Dir::open(&t.join("d")).unwrap();
    for name in ["..", ".", "", "../outside", "a/b", "/etc/passwd"] {
        assert_refused(dir.open_read(name), "not a single file name");
        assert_refused(dir.remove_tree(name, 4), "not a single file name");
    }
    assert!(t.join("outside").exists());
}

#[test]
fn a_directory_path_through_a_link_in_an_untrusted_directory_is_refused() {
    let t = TempDir::new("dirlink");
    let real = t.join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("f"), "x").unwrap();
    let open = t.join("open");
    std::fs::create_dir(&open).unwrap();
    // A directory everyone may write, as a service user's log directory is to that user.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    symlink(&real, open.join("logs")).unwrap();
    assert_refused(
        Dir::open(&open.join("logs")),
        "symbolic link in a directory others can write",
    );
    // A link in a component before the last is caught too.
    std::fs::create_dir(real.join("sub")).unwrap();
    assert_refused(Dir::open(&open.join("logs/sub")), "symbolic link");
    // The same link in a directory only we can write is the host's own set-up and is followed.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = Dir::open(&open.join("logs")).unwrap();
    assert_eq!(dir.read("f", 10).unwrap(), b"x");
    // `..` resolves physically.
    let dir = Dir::open(&real.join("sub/..")).unwrap();
    assert_eq!(dir.read("f", 10).unwrap(), b"x");
    // A file where a directory is expected.
    assert_refused(Dir::open(&real.join("f")), "not a directory");
}

#[test]
fn an_open_directory_is_not_redirected_by_a_swap_of_its_path() {
    let t = TempDir::new("swap");
    let logs = t.join("logs");
    std::fs::create_dir(&logs).unwrap();
    let secret_dir = t.join("secret");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("a.log"), "secret").unwrap();
    let dir = Dir::open(&logs).unwrap();
    // The directory is moved away and a link to another directory put in its place.
    std::fs::rename(&logs, t.join("moved")).unwrap();
    symlink(&secret_dir, &logs).unwrap();
    dir.open_append("a.log", 0o640)
        .unwrap()
        .write_all(b"mine")
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(secret_dir.join("a.log")).unwrap(),
        "secret"
    );
    assert_eq!(
        std::fs::read_to_string(t.join("moved/a.log")).unwrap(),
        "mine"
    );
    // And a subdirectory swapped for a link is refused by open_dir.
    symlink(&secret_dir, t.join("moved/sub")).unwrap();
    assert_refused(dir.open_dir("sub"), "a symbolic link, not a directory");
}

#[test]
fn remove_tree_removes_links_not_their_targets_and_bounds_depth() {
    let t = TempDir::new("tree");
    let keep = t.join("keep");
    std::fs::create_dir_all(keep.join("inner")).unwrap();
    std::fs::write(keep.join("inner/file"), "keep").unwrap();
    std::fs::write(t.join("keep-file"), "keep").unwrap();
    let doomed = t.join("releases/old");
    std::fs::create_dir_all(doomed.join("a/b")).unwrap();
    std::fs::write(doomed.join("a/b/f"), "x").unwrap();
    symlink(&keep, doomed.join("a/dirlink")).unwrap();
    symlink(t.join("keep-file"), doomed.join("filelink")).unwrap();
    mkfifo(&doomed.join("a/fifo"));

    let releases = Dir::open(&t.join("releases")).unwrap();
    // Too deep for a bound of 2 (old/a/b): refused, and what was left can still be removed.
    assert_refused(releases.remove_tree("old", 2), "deeper");
    releases.remove_tree("old", 8).unwrap();
    assert!(!doomed.exists());
    assert_eq!(
        std::fs::read_to_string(keep.join("inner/file")).unwrap(),
        "keep"
    );
    assert_eq!(
        std::fs::read_to_string(t.join("keep-file")).unwrap(),
        "keep"
    );
    // Missing is fine; a link given as the top is removed as a link.
    releases.remove_tree("old", 8).unwrap();
    symlink(&keep, t.join("releases/top")).unwrap();
    releases.remove_tree("top", 8).unwrap();
    assert!(keep.join("inner/file").exists());
    assert!(releases.entries().unwrap().is_empty());
}

#[test]
fn symlink_and_read_link_make_an_atomic_current() {
    let t = TempDir::new("current");
    let dir = Dir::open(&t.0).unwrap();
    dir.create_dir("releases", 0o755).unwrap();
    dir.symlink(Path::new("releases/b1"), ".current.tmp")
        .unwrap();
    dir.rename(".current.tmp", "current").unwrap();
    assert_eq!(dir.read_link("current").unwrap(), Path::new("releases/b1"));
    assert_eq!(dir.meta_of("current").unwrap().kind, Kind::Symlink);
    assert_eq!(dir.meta_of("releases").unwrap().kind, Kind::Dir);
    let sub = dir.open_dir("releases").unwrap();
    assert!(sub.entries().unwrap().is_empty());
    dir.sync().unwrap();
}

#[test]
fn beneath_walks_down_without_links_or_dotdot() {
    let t = TempDir::new("beneath");
    std::fs::create_dir_all(t.join("rel/sluice")).unwrap();
    std::fs::write(t.join("rel/sluice/warmup.txt"), "GET /\n").unwrap();
    std::fs::create_dir(t.join("secret")).unwrap();
    std::fs::write(t.join("secret/warmup.txt"), "secret").unwrap();
    symlink(t.join("secret"), t.join("rel/linked")).unwrap();
    let rel = Dir::open(&t.join("rel")).unwrap();
    let (dir, name) = rel.beneath(Path::new("sluice/warmup.txt")).unwrap();
    assert_eq!(dir.read(&name, 100).unwrap(), b"GET /\n");
    let (dir, name) = rel.beneath(Path::new("./sluice/./warmup.txt")).unwrap();
    assert_eq!(dir.read(&name, 100).unwrap(), b"GET /\n");
    assert_refused(
        rel.beneath(Path::new("linked/warmup.txt")),
        "a symbolic link",
    );
    assert_refused(rel.beneath(Path::new("../secret/warmup.txt")), "stay below");
    assert_refused(rel.beneath(Path::new("/etc/passwd")), "stay below");
    assert_refused(rel.beneath(Path::new("")), "no file name");
}

#[test]
fn make_dirs_creates_below_and_never_through_a_link() {
    let t = TempDir::new("makedirs");
    std::fs::create_dir(t.join("rel")).unwrap();
    std::fs::create_dir(t.join("elsewhere")).unwrap();
    let rel = Dir::open(&t.join("rel")).unwrap();
    let made = rel
        .make_dirs(Path::new(".sluice/hooks-done"), 0o755)
        .unwrap();
    made.write_atomic("m", b"x", 0o644).unwrap();
    assert!(t.join("rel/.sluice/hooks-done/m").is_file());
    // Again: existing directories are fine.
    rel.make_dirs(Path::new(".sluice/hooks-done"), 0o755)
        .unwrap();
    symlink(t.join("elsewhere"), t.join("rel/linked")).unwrap();
    assert_refused(
        rel.make_dirs(Path::new("linked/new"), 0o755),
        "a symbolic link",
    );
    assert!(!t.join("elsewhere/new").exists());
    assert_refused(rel.make_dirs(Path::new("../x"), 0o755), "stay below");
}
