//! The real services the restart tests run: a Java `com.sun.net.httpserver` app compiled by the
//! test, a WSGI app under gunicorn and an ASGI app under uvicorn from the test virtualenv
//! (`scripts/test-all.sh` makes it), and the virtualenv's Python for the real HTTP clients.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixture sources, in `tests/fixtures`.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Where a missing tool is reported: a skip outside CI, a failure in CI (which must run everything).
/// Returns false when the caller should skip.
pub fn require(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is missing, and CI never skips (scripts/test-all.sh installs it)"
    );
    eprintln!("skipping: {what} is missing (scripts/test-all.sh installs it)");
    false
}

/// Compiles `WarmApp.java` into `out` and returns the class directory; `None` without a JDK.
pub fn java_app(out: &Path) -> Option<PathBuf> {
    let javac = which("javac");
    if !require("javac (a JDK)", javac.is_some()) {
        return None;
    }
    std::fs::create_dir_all(out).expect("creating the class directory");
    let status = Command::new(javac.expect("checked"))
        .arg("-d")
        .arg(out)
        .arg(dir().join("WarmApp.java"))
        .status()
        .expect("javac runs");
    assert!(status.success(), "javac failed");
    Some(out.to_owned())
}

/// The absolute path of `java`.
pub fn java() -> PathBuf {
    which("java").expect("a JDK has java")
}

/// The test virtualenv: `SLUICE_TEST_VENV`, else `target/test-venv` (`scripts/test-all.sh` makes it).
pub fn venv() -> PathBuf {
    std::env::var_os("SLUICE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv"))
}

/// A program of the test virtualenv (`gunicorn`, `uvicorn`, `python`); `None` (after saying so)
/// when it is missing.
pub fn venv_bin(name: &str) -> Option<PathBuf> {
    let path = venv().join("bin").join(name);
    require(&format!("{name} ({})", path.display()), path.exists()).then_some(path)
}

/// gunicorn from the test virtualenv.
pub fn gunicorn() -> Option<PathBuf> {
    venv_bin("gunicorn")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}
