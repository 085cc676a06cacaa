//! The stock hooks shipped with sluice (POSIX sh scripts under `hooks/stock/`, compiled in) and
//! their materialization as executable files, so that configs can name them as `stock:NAME`.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{HookError, io_error};

/// Name and script of every stock hook.
pub const STOCK_HOOKS: &[(&str, &str)] = &[
    ("python-venv", include_str!("../stock/python-venv")),
    ("java-jar", include_str!("../stock/java-jar")),
];

/// Mode of a materialized stock hook: the service users that run it are not its owner.
const STOCK_MODE: u32 = 0o755;

/// The one directory of a release that a stock hook writes, by hook. The release itself is
/// root's and stays so; root creates this directory for the service's user before the hook runs
/// as that user, and never reads or follows anything inside it afterwards (only removes it with
/// its release, which does not follow links).
pub const STOCK_WRITES: &[(&str, &str)] = &[("python-venv", ".venv")];

/// Mode of a directory made for a stock hook: the user writes it, everyone may read and run it.
const STOCK_DIR_MODE: libc::mode_t = 0o755;

/// Before stock hook `program` (a path in `stock_dir`) runs as `identity` in `release_dir`, makes
/// the directory it writes, owned by that user. An existing directory (a rerun, or one the build
/// ships) is left as it is, and a link or other non-directory in its place is refused. Works
/// relative to the opened release directory, so no path is followed twice.
pub fn prepare(
    program: &Path,
    stock_dir: &Path,
    release_dir: &Path,
    identity: &crate::Identity,
) -> Result<(), HookError> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let Some((_, dir_name)) = STOCK_WRITES
        .iter()
        .find(|(name, _)| program == stock_dir.join(name))
    else {
        return Ok(());
    };
    let path = release_dir.join(dir_name);
    let c_release = CString::new(release_dir.as_os_str().as_bytes())
        .map_err(|_| io_error(release_dir)(io::ErrorKind::InvalidInput.into()))?;
    let c_name = CString::new(*dir_name).expect("a constant without NUL");
    // SAFETY: plain syscalls on NUL-terminated strings; each fd is owned right after it is made.
    unsafe {
        let fd = libc::open(
            c_release.as_ptr(),
            libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
        );
        if fd < 0 {
            return Err(io_error(release_dir)(io::Error::last_os_error()));
        }
        let release = OwnedFd::from_raw_fd(fd);
        if libc::mkdirat(release.as_raw_fd(), c_name.as_ptr(), STOCK_DIR_MODE) == 0 {
            let fd = libc::openat(
                release.as_raw_fd(),
                c_name.as_ptr(),
                libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
            );
            if fd < 0 {
                return Err(io_error(&path)(io::Error::last_os_error()));
            }
            let made = OwnedFd::from_raw_fd(fd);
            if libc::fchown(made.as_raw_fd(), identity.uid, identity.gid) != 0
                || libc::fchmod(made.as_raw_fd(), STOCK_DIR_MODE) != 0
            {
                return Err(io_error(&path)(io::Error::last_os_error()));
            }
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::AlreadyExists {
            return Err(io_error(&path)(error));
        }
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstatat(
            release.as_raw_fd(),
            c_name.as_ptr(),
            &mut stat,
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            return Err(io_error(&path)(io::Error::last_os_error()));
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io_error(&path)(io::Error::other(
                "is not a directory (a link or a file is never followed as root)",
            )));
        }
    }
    Ok(())
}

/// Writes every stock hook into `dir` with mode 0755, leaving files that are already right untouched,
/// and returns the path of the one called `name`.
pub fn stock_hook(dir: &Path, name: &str) -> Result<PathBuf, HookError> {
    if !STOCK_HOOKS.iter().any(|(n, _)| *n == name) {
        return Err(HookError::Stock {
            name: name.to_owned(),
        });
    }
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    for (stock, script) in STOCK_HOOKS {
        materialize(&dir.join(stock), script)?;
    }
    Ok(dir.join(name))
}

/// One stock hook, written through a temp file and a rename so that a hook running concurrently (or
/// another deploy materializing the same directory) never sees a half-written script.
fn materialize(path: &Path, script: &str) -> Result<(), HookError> {
    let current = std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file() && m.permissions().mode() & 0o7777 == STOCK_MODE);
    if current.is_some() {
        match std::fs::read(path) {
            Ok(bytes) if bytes == script.as_bytes() => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(path)(e)),
        }
    }
    // Unique per process and call, so concurrent writers never share a temp file.
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let temp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> io::Result<()> {
        std::fs::write(&temp, script)?;
        // Set explicitly: the daemon's umask must not decide whether service users can run it.
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(STOCK_MODE))?;
        std::fs::rename(&temp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io_error(path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materializes_all_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let path = stock_hook(dir.path(), "java-jar").unwrap();
        assert_eq!(path, dir.path().join("java-jar"));
        for (name, script) in STOCK_HOOKS {
            let file = dir.path().join(name);
            assert_eq!(std::fs::read_to_string(&file).unwrap(), *script);
            assert_eq!(
                std::fs::metadata(&file).unwrap().permissions().mode() & 0o7777,
                0o755
            );
            assert!(
                script.starts_with("#!/bin/sh\n"),
                "{name} is a POSIX sh script"
            );
        }

        // A tampered copy is put right; a correct one is left alone.
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        stock_hook(dir.path(), "python-venv").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), STOCK_HOOKS[1].1);
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        stock_hook(dir.path(), "java-jar").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, STOCK_HOOKS.len(), "no temp files left");
    }

    /// Root makes `.venv` for the service user before `python-venv` runs; a link in its place is
    /// refused and not followed; other stock hooks get nothing.
    #[test]
    fn python_venv_gets_its_directory_and_nothing_else() {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI runs this as root"
            );
            println!("skipping: needs root to give a directory away");
            return;
        }
        let nobody = crate::Identity {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let dir = tempfile::tempdir().unwrap();
        let stock = dir.path().join("stock");
        let release = dir.path().join("release");
        std::fs::create_dir_all(&release).unwrap();
        let venv_hook = stock_hook(&stock, "python-venv").unwrap();
        let jar_hook = stock_hook(&stock, "java-jar").unwrap();
        prepare(&jar_hook, &stock, &release, &nobody).unwrap();
        assert!(!release.join(".venv").exists(), "java-jar writes nothing");
        prepare(&venv_hook, &stock, &release, &nobody).unwrap();
        let meta = std::fs::symlink_metadata(release.join(".venv")).unwrap();
        assert!(meta.is_dir());
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (65534, 65534, 0o755)
        );
        // Again: left as it is.
        prepare(&venv_hook, &stock, &release, &nobody).unwrap();

        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::remove_dir(release.join(".venv")).unwrap();
        std::os::unix::fs::symlink(&other, release.join(".venv")).unwrap();
        let err = prepare(&venv_hook, &stock, &release, &nobody).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        assert_eq!(
            std::fs::metadata(&other).unwrap().uid(),
            0,
            "the link was not followed"
        );
    }

    #[test]
    fn unknown_names_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = stock_hook(dir.path(), "ruby-bundle").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown stock hook `ruby-bundle` (known: python-venv, java-jar)"
        );
    }
}
