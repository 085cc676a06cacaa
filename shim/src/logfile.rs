//! An append-only log file with size-based rotation (`path`, `path.1` newest … `path.N` oldest).
//!
//! Architecture Invariant: a chunk read from the child's pipe is written whole, either before or after a
//! rotation, never split; so concatenating `path.N … path.1 path` gives back exactly the child's output.
//! Write errors (disk full, file removed under us) are counted and never stop the shim.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// One rotated log file.
pub struct LogFile {
    /// The current file's path; backups are `path.1` … `path.<backups>`.
    path: PathBuf,
    /// The open current file; `None` after a failed reopen, retried on the next write.
    file: Option<File>,
    /// Bytes in the current file, tracked so rotation costs no `stat` per write.
    size_bytes: u64,
    /// Rotate before the file would grow past this; 0 never rotates.
    max_bytes: u64,
    /// Rotated files kept; 0 truncates instead of renaming.
    backups: u32,
    /// Failed writes, renames and reopens; kept so the count can be reported, never fatal.
    pub errors: u64,
}

impl LogFile {
    /// Opens (creating, mode 0640) `path` for appending. Its directory must exist: the brain creates it.
    pub fn open(path: &Path, max_bytes: u64, backups: u32) -> io::Result<LogFile> {
        let file = open_append(path)?;
        let size_bytes = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_owned(),
            file: Some(file),
            size_bytes,
            max_bytes,
            backups,
            errors: 0,
        })
    }

    /// Appends one chunk whole, rotating first if it would push a non-empty file past the limit. A
    /// chunk larger than the limit still goes in one piece, into a fresh file.
    pub fn append(&mut self, chunk: &[u8]) {
        let len = chunk.len() as u64;
        if self.max_bytes > 0 && self.size_bytes > 0 && self.size_bytes + len > self.max_bytes {
            self.rotate();
        }
        if self.file.is_none() {
            self.reopen();
        }
        let Some(file) = &mut self.file else {
            // Reopen failed and was counted; the chunk is lost rather than the shim.
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

    /// `path.<k>`.
    fn backup(&self, k: u32) -> PathBuf {
        let mut name = OsString::from(self.path.as_os_str());
        name.push(format!(".{k}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) {
        self.file = None;
        if self.backups == 0 {
            self.count(ignore_missing(std::fs::remove_file(&self.path)));
        } else {
            self.count(ignore_missing(std::fs::remove_file(
                self.backup(self.backups),
            )));
            for k in (1..self.backups).rev() {
                self.count(ignore_missing(std::fs::rename(
                    self.backup(k),
                    self.backup(k + 1),
                )));
            }
            self.count(ignore_missing(std::fs::rename(&self.path, self.backup(1))));
        }
        self.reopen();
    }

    fn reopen(&mut self) {
        match open_append(&self.path).and_then(|f| Ok((f.metadata()?.len(), f))) {
            Ok((size_bytes, file)) => {
                self.size_bytes = size_bytes;
                self.file = Some(file);
            }
            Err(_) => self.errors += 1,
        }
    }

    fn count(&mut self, result: io::Result<()>) {
        if result.is_err() {
            self.errors += 1;
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    // std opens with O_CLOEXEC, so the child never inherits the log file itself, only its pipe.
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
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
}
