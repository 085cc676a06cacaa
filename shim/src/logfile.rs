//! An append-only log file with size-based rotation (`path`, `path.1` newest … `path.N` oldest).
//!
//! Architecture Invariant: a chunk read from the child's pipe is written whole, either before or after a
//! rotation, never split; so concatenating `path.N … path.1 path` gives back exactly the child's output.
//! Write errors (disk full, file removed under us) are counted and never stop the shim.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_safefs::Dir;

/// After a refused or failed open, how long until the next attempt: a service user who keeps a
/// link in place must not cost the shim an `openat` and a report per chunk.
pub const REOPEN_RETRY_MS: u64 = 1_000;

/// Mode of a log file the shim creates (less the umask).
const LOG_FILE_MODE: u32 = 0o640;

/// One rotated log file.
///
/// Architecture Invariant: the log directory may belong to the service's user, so every file in it
/// is reached relative to the directory's descriptor, opened once at start-up, and through
/// `sluice-safefs`: a link, a fifo or a hard link put in place of a log file is refused (the shim
/// then writes nowhere for that file, reports it on its stderr and tries again later), never
/// followed; rotation renames and removes entries, never what they point to.
pub struct LogFile {
    /// The current file's path; backups are `path.1` … `path.<backups>`. For messages.
    path: PathBuf,
    /// The log directory, opened once; `None` when it was refused (nothing is written then).
    dir: Option<Dir>,
    /// The current file's name in `dir`.
    name: OsString,
    /// The open current file; `None` after a failed or refused reopen, retried later.
    file: Option<File>,
    /// Bytes in the current file, tracked so rotation costs no `stat` per write.
    size_bytes: u64,
    /// Rotate before the file would grow past this; 0 never rotates.
    max_bytes: u64,
    /// Rotated files kept; 0 truncates instead of renaming.
    backups: u32,
    /// No reopen before this instant (see [`REOPEN_RETRY_MS`]).
    retry_at: Option<Instant>,
    /// The last refusal was reported and nothing has been opened since: report the next only
    /// after a success, so a link left in place is reported once, not once a second.
    reported: bool,
    /// Failed writes, renames and reopens; kept so the count can be reported, never fatal.
    pub errors: u64,
}

impl LogFile {
    /// Opens (creating, mode 0640) `path` for appending. Its directory must exist: the brain creates
    /// it. A missing directory is an error; a refused directory or file is reported and leaves the
    /// log writing nowhere (the instance still starts).
    pub fn open(path: &Path, max_bytes: u64, backups: u32) -> io::Result<LogFile> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
            .to_owned();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut log = LogFile {
            path: path.to_owned(),
            dir: None,
            name,
            file: None,
            size_bytes: 0,
            max_bytes,
            backups,
            retry_at: None,
            reported: false,
            errors: 0,
        };
        match Dir::open(parent) {
            Ok(dir) => log.dir = Some(dir),
            Err(e) if sluice_safefs::is_refused(&e) => {
                log.report(&e);
                return Ok(log);
            }
            Err(e) => return Err(e),
        }
        match log.open_current() {
            Ok((size_bytes, file)) => {
                log.size_bytes = size_bytes;
                log.file = Some(file);
            }
            Err(e) if sluice_safefs::is_refused(&e) => log.refused(&e),
            Err(e) => return Err(e),
        }
        Ok(log)
    }

    /// Appends one chunk whole, rotating first if it would push a non-empty file past the limit. A
    /// chunk larger than the limit still goes in one piece, into a fresh file.
    pub fn append(&mut self, chunk: &[u8]) {
        let len = chunk.len() as u64;
        if self.max_bytes > 0 && self.size_bytes > 0 && self.size_bytes + len > self.max_bytes {
            self.rotate();
        }
        if self.file.is_none() && self.retry_at.is_none_or(|at| Instant::now() >= at) {
            self.reopen();
        }
        let Some(file) = &mut self.file else {
            // Reopen failed (or was refused) and was counted; the chunk is lost rather than the shim.
            self.errors += 1;
            return;
        };
        match file.write_all(chunk) {
            Ok(()) => self.size_bytes += len,
            Err(_) => {
                self.errors += 1;
                // Part of the chunk may have landed; re-read the size so rotation stays accurate.
                self.size_bytes = file.metadata().map(|m| m.len()).unwrap_or(self.size_bytes);
            }
        }
    }

    /// `name.<k>`.
    fn backup(&self, k: u32) -> OsString {
        let mut name = self.name.clone();
        name.push(format!(".{k}"));
        name
    }

    fn rotate(&mut self) {
        self.file = None;
        self.size_bytes = 0;
        let Some(dir) = &self.dir else { return };
        let mut results = Vec::new();
        if self.backups == 0 {
            results.push(dir.unlink(&self.name));
        } else {
            results.push(dir.unlink(self.backup(self.backups)));
            for k in (1..self.backups).rev() {
                results.push(dir.rename(self.backup(k), self.backup(k + 1)));
            }
            results.push(dir.rename(&self.name, self.backup(1)));
        }
        for result in results {
            self.count(ignore_missing(result));
        }
        self.retry_at = None;
        self.reopen();
    }

    fn open_current(&self) -> io::Result<(u64, File)> {
        let Some(dir) = &self.dir else {
            return Err(io::Error::other("the log directory was refused"));
        };
        let file = dir.open_append(&self.name, LOG_FILE_MODE)?;
        Ok((file.metadata()?.len(), file))
    }

    fn reopen(&mut self) {
        if self.dir.is_none() {
            return;
        }
        match self.open_current() {
            Ok((size_bytes, file)) => {
                self.size_bytes = size_bytes;
                self.file = Some(file);
                self.retry_at = None;
                self.reported = false;
            }
            Err(e) => {
                self.errors += 1;
                if sluice_safefs::is_refused(&e) {
                    self.refused(&e);
                } else {
                    self.retry_at = Some(Instant::now() + Duration::from_millis(REOPEN_RETRY_MS));
                }
            }
        }
    }

    fn refused(&mut self, e: &io::Error) {
        self.retry_at = Some(Instant::now() + Duration::from_millis(REOPEN_RETRY_MS));
        if !self.reported {
            self.report(e);
        }
    }

    /// One line on the shim's stderr (the daemon's journal, or its log file in tests).
    fn report(&mut self, e: &io::Error) {
        self.reported = true;
        eprintln!(
            "sluice-shim: log {}: {e}; writing nowhere for this file until it is a regular file again",
            self.path.display()
        );
    }

    fn count(&mut self, result: io::Result<()>) {
        if result.is_err() {
            self.errors += 1;
        }
    }
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("sluice-shim-unit-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn rotates_whole_chunks_and_keeps_the_newest_backups() {
        let dir = TempDir::new("rotate");
        let path = dir.0.join("out.log");
        let mut log = LogFile::open(&path, 10, 2).unwrap();
        for chunk in ["aaaa", "bbbb", "cccc", "dddddddddddddddd", "ee", "ff"] {
            log.append(chunk.as_bytes());
        }
        // aaaa+bbbb fit in 10; cccc would not → rotate; the 16-byte chunk goes whole into a fresh file.
        assert_eq!(read(path.clone()), "eeff");
        assert_eq!(read(dir.0.join("out.log.1")), "dddddddddddddddd");
        assert_eq!(read(dir.0.join("out.log.2")), "cccc");
        assert!(!dir.0.join("out.log.3").exists());
        assert_eq!(log.errors, 0);
    }

    #[test]
    fn zero_backups_truncates_and_zero_max_never_rotates() {
        let dir = TempDir::new("truncate");
        let path = dir.0.join("out.log");
        let mut log = LogFile::open(&path, 4, 0).unwrap();
        log.append(b"abc");
        log.append(b"de");
        assert_eq!(read(path.clone()), "de");
        assert!(!dir.0.join("out.log.1").exists());

        let path = dir.0.join("big.log");
        let mut log = LogFile::open(&path, 0, 3).unwrap();
        for _ in 0..100 {
            log.append(b"0123456789");
        }
        assert_eq!(read(path).len(), 1000);
        assert!(!dir.0.join("big.log.1").exists());
    }

    #[test]
    fn appends_to_an_existing_file_and_counts_its_size() {
        let dir = TempDir::new("existing");
        let path = dir.0.join("out.log");
        std::fs::write(&path, "12345678").unwrap();
        let mut log = LogFile::open(&path, 10, 1).unwrap();
        log.append(b"xyz");
        assert_eq!(read(path), "xyz");
        assert_eq!(read(dir.0.join("out.log.1")), "12345678");
    }

    #[test]
    fn missing_directory_is_an_error_at_open() {
        let dir = TempDir::new("missing");
        assert!(LogFile::open(&dir.0.join("nope/out.log"), 10, 1).is_err());
    }

    #[test]
    fn a_link_or_fifo_in_place_of_the_log_is_refused_and_never_written_through() {
        use std::os::unix::fs::symlink;
        let dir = TempDir::new("refuse");
        let secret = dir.0.join("secret");
        std::fs::write(&secret, "root only\n").unwrap();
        let logs = dir.0.join("logs");
        std::fs::create_dir(&logs).unwrap();
        let path = logs.join("out.log");
        symlink(&secret, &path).unwrap();
        // Refused at open: the shim starts, writing nowhere.
        let mut log = LogFile::open(&path, 10, 2).unwrap();
        log.append(b"lost");
        assert_eq!(read(secret.clone()), "root only\n");
        assert!(log.errors > 0);
        // Once the link is replaced by a regular file, writing resumes after the retry delay.
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(Duration::from_millis(REOPEN_RETRY_MS + 50));
        log.append(b"aaaa");
        assert_eq!(read(path.clone()), "aaaa");
        // Rotation moves links planted as backups (never follows them) and refuses a link that
        // appears as the new current file.
        symlink(&secret, logs.join("out.log.1")).unwrap();
        log.append(b"bbbbbbbb");
        assert_eq!(read(path.clone()), "bbbbbbbb");
        assert_eq!(std::fs::read_link(logs.join("out.log.2")).unwrap(), secret);
        assert_eq!(read(logs.join("out.log.1")), "aaaa");
        std::fs::remove_file(&path).unwrap();
        let fifo = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: nul-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
        log.append(b"cccccccc");
        // The fifo was refused without blocking, the chunk dropped.
        assert_eq!(read(secret), "root only\n");
    }
}
