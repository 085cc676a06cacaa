//! Markers of hooks that succeeded for a release (`<release_dir>/.sluice/hooks-done/<stage>-<n>`),
//! so that preparing the same release again (a retried deploy, a rollback) skips finished work.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Hook, HookError, Stage, io_error};

/// Where the markers of a release live, relative to it.
pub(crate) const DONE_DIR: &str = ".sluice/hooks-done";

pub(crate) fn marker_path(release_dir: &Path, stage: Stage, index: usize) -> PathBuf {
    release_dir.join(DONE_DIR).join(format!("{stage}-{index}"))
}

/// The sha256 (hex) that identifies what a hook would run: its argv and, when `argv[0]` is a file
/// of the release or of the stock directory, that file's content, so that a changed build hook or a
/// stock hook updated with sluice runs again. System programs (`/usr/bin/make`) are not hashed.
pub(crate) fn digest(
    hook: &Hook,
    release_dir: &Path,
    stock_dir: &Path,
) -> Result<String, HookError> {
    let mut hasher = Sha256::new();
    hasher.update(b"sluice-hooks marker v1\0");
    for arg in &hook.argv {
        hasher.update((arg.len() as u64).to_le_bytes());
        hasher.update(arg.as_bytes());
    }
    let program = Path::new(hook.argv.first().map_or("", String::as_str));
    if program.is_absolute() && (program.starts_with(release_dir) || program.starts_with(stock_dir))
    {
        hasher.update(b"\0file\0");
        let mut file = std::fs::File::open(program).map_err(io_error(program))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(program)(e)),
            }
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the marker at `path` records `digest`. A missing or unreadable marker means "not done":
/// the worst outcome is running a hook again.
pub(crate) fn is_done(path: &Path, digest: &str) -> bool {
    // The release may belong to the service's user: read without following a link or a fifo.
    sluice_safefs::split(path)
        .and_then(|(dir, name)| dir.read(name, MARKER_MAX_BYTES))
        .is_ok_and(|recorded| String::from_utf8_lossy(&recorded).trim() == digest)
}

/// Largest marker read, in bytes (it holds one hex sha256).
const MARKER_MAX_BYTES: u64 = 256;

/// Forgets a marker before its hook runs, so that a hook that fails half-way is never taken for done
/// under an older command that happens to come back.
pub(crate) fn forget(path: &Path) -> Result<(), HookError> {
    let removed = match sluice_safefs::split(path) {
        Ok((dir, name)) => dir.unlink(name),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

/// Records `digest` at `path`, atomically (temp file, then rename).
pub(crate) fn record(path: &Path, digest: &str) -> Result<(), HookError> {
    let dir = path.parent().expect("a marker path has a parent");
    let name = path.file_name().expect("a marker path has a file name");
    // The release may belong to the service's user: `.sluice/hooks-done` is made below the
    // release's descriptor without following a link (nothing is created where one points), and
    // the marker is a new temporary file (never one a link planted under its name points to),
    // then a rename.
    let depth = Path::new(DONE_DIR).components().count();
    let dir = match dir.ancestors().nth(depth) {
        Some(release) => sluice_safefs::Dir::open(release)
            .and_then(|release| release.make_dirs(Path::new(DONE_DIR), 0o755)),
        None => sluice_safefs::Dir::open(dir),
    }
    .map_err(io_error(dir))?;
    dir.write_atomic(name, format!("{digest}\n").as_bytes(), 0o644)
        .map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(argv: &[&str]) -> Hook {
        Hook {
            name: "h".to_owned(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn digest_follows_argv_and_release_files() {
        let dir = tempfile::tempdir().unwrap();
        let (release, stock) = (dir.path().join("release"), dir.path().join("stock"));
        std::fs::create_dir_all(&release).unwrap();
        let d = |argv: &[&str]| digest(&hook(argv), &release, &stock).unwrap();

        assert_eq!(
            d(&["/usr/bin/make", "assets"]),
            d(&["/usr/bin/make", "assets"])
        );
        assert_ne!(
            d(&["/usr/bin/make", "assets"]),
            d(&["/usr/bin/make", "asset", "s"])
        );
        assert_ne!(
            d(&["/usr/bin/make", "a b"]),
            d(&["/usr/bin/make", "a", "b"])
        );

        let script = release.join("hook");
        std::fs::write(&script, "one").unwrap();
        let first = d(&[script.to_str().unwrap()]);
        std::fs::write(&script, "two").unwrap();
        assert_ne!(first, d(&[script.to_str().unwrap()]));
    }

    #[test]
    fn markers_record_and_forget() {
        let dir = tempfile::tempdir().unwrap();
        let path = marker_path(dir.path(), Stage::PostInstall, 2);
        assert!(path.ends_with(".sluice/hooks-done/post_install-2"));
        assert!(!is_done(&path, "abc"));
        record(&path, "abc").unwrap();
        assert!(is_done(&path, "abc"));
        assert!(!is_done(&path, "abd"));
        forget(&path).unwrap();
        forget(&path).unwrap();
        assert!(!is_done(&path, "abc"));
    }
}
