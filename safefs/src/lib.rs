//! `sluice-safefs`: opening, creating, renaming and removing files inside directories that a
//! less-trusted user can write, so that a symbolic link, a fifo, a hard link or a swapped entry
//! placed there never redirects what root does.
//!
//! The rule: a directory is opened once ([`Dir::open`]: no symbolic link on the way unless it sits
//! in a directory only root or we can write), and everything inside it is reached relative to that
//! descriptor, one file name at a time, with `O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK` (a fifo cannot
//! hang the opener), and refused unless it is a regular file with one link. Nothing is truncated or
//! written before that check. Directory trees are removed without following links, to a bounded depth.
//!
//! std and libc only, because the shim uses it.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Most symbolic links [`Dir::open`] follows while walking one path (the kernel's own limit).
pub const MAX_LINKS_FOLLOWED: usize = 40;

/// Depth past which [`Dir::remove_tree`] gives up when no smaller bound is given; release trees
/// are much shallower, and recursion costs a descriptor per level.
pub const DEFAULT_MAX_TREE_DEPTH: usize = 64;

/// Distinguishes the temporary names of [`Dir::write_atomic`] within one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why something was refused: it is not what root may safely open there. Carried inside an
/// `io::Error` (kind `PermissionDenied`); [`is_refused`] tells it apart from ordinary errors.
#[derive(Debug)]
pub struct Refused {
    /// The path as it was asked for.
    pub path: PathBuf,
    /// What it is instead, e.g. "a symbolic link".
    pub reason: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refusing {}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for Refused {}

/// Whether `e` is a refusal of this crate (a link, a fifo, a swapped entry), not an I/O failure.
pub fn is_refused(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Refused>())
}

fn refused(path: &Path, reason: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        Refused {
            path: path.to_owned(),
            reason: reason.into(),
        },
    )
}

/// An OS error with the path it concerns; the kind is kept so callers can still match `NotFound`.
fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))
}

/// What kind of file a directory entry is, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Device,
}

impl Kind {
    fn of(mode: libc::mode_t) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            _ => Kind::Device,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Symlink => "a symbolic link",
            Kind::Fifo => "a fifo",
            Kind::Socket => "a socket",
            Kind::Device => "a device",
        }
    }
}

/// The `lstat` of an entry (or the `fstat` of an open file), the fields sluice decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (`0o7777`).
    pub mode: u32,
    pub nlink: u64,
    pub size: u64,
    pub ino: u64,
    pub dev: u64,
}

impl Meta {
    fn from_stat(st: &libc::stat) -> Meta {
        Meta {
            kind: Kind::of(st.st_mode),
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
            nlink: st.st_nlink,
            size: st.st_size as u64,
            ino: st.st_ino,
            dev: st.st_dev,
        }
    }

    /// Only root or this process's user owns it, and neither its group nor others may write it:
    /// nobody less trusted can add, remove or swap its entries.
    pub fn is_trusted_dir(&self) -> bool {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        self.kind == Kind::Dir && (self.uid == 0 || self.uid == euid) && self.mode & 0o022 == 0
    }
}

/// `fstat` of a descriptor.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Meta> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is valid for the call and `st` is writable.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(Meta::from_stat(&st))
}

fn fstatat_nofollow(dir: RawFd, name: &CStr) -> io::Result<Meta> {
    // SAFETY: as in `fstat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, nul-terminated name, writable `st`.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(Meta::from_stat(&st))
}

fn openat(dir: RawFd, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: valid descriptor and nul-terminated name; the result is a fresh descriptor we own.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags, mode as libc::c_uint) })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn readlinkat(dir: RawFd, name: &CStr) -> io::Result<PathBuf> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the buffer is writable for its whole length.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(OsString::from_vec(buf)))
}

/// How a file inside a [`Dir`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Read,
    /// Append, creating it with this mode when missing.
    Append(u32),
    /// Write; it must not exist yet (`O_EXCL`).
    CreateNew(u32),
    /// Write from the start, creating it when missing; truncated only after the checks.
    Truncate(u32),
}

/// A directory opened once and checked; every other call works relative to its descriptor, so a
/// later swap of the path (or of any directory above it) cannot redirect them.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// As asked for; used in messages only, never to reach the directory again.
    path: PathBuf,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Dir {
    /// Opens the directory at `path`, walking it one component at a time without following
    /// symbolic links, except a link that sits in a directory only root (or we) can write: such a
    /// link was put there by whoever set the host up (`/var/run` → `/run`). A link anywhere else,
    /// or a component that is not a directory, is refused naming `path`.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let start: &[u8] = if path.is_absolute() { b"/" } else { b"." };
        let dir_flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let open_start = || openat(libc::AT_FDCWD, &cstr(start)?, dir_flags, 0);
        let mut fd = open_start().map_err(|e| with_path(path, e))?;
        let mut todo: Vec<OsString> = components(path)?;
        todo.reverse();
        let mut links = 0;
        while let Some(name) = todo.pop() {
            let c_name = cstr(name.as_bytes())?;
            let next = openat(
                fd.as_raw_fd(),
                &c_name,
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0,
            )
            .map_err(|e| with_path(path, e))?;
            let meta = fstat(next.as_fd()).map_err(|e| with_path(path, e))?;
            match meta.kind {
                Kind::Dir => fd = next,
                Kind::Symlink => {
                    let parent = fstat(fd.as_fd()).map_err(|e| with_path(path, e))?;
                    if !parent.is_trusted_dir() {
                        return Err(refused(
                            path,
                            format!(
                                "{} is a symbolic link in a directory others can write",
                                Path::new(&name).display()
                            ),
                        ));
                    }
                    links += 1;
                    if links > MAX_LINKS_FOLLOWED {
                        return Err(refused(path, "too many symbolic links"));
                    }
                    let target =
                        readlinkat(fd.as_raw_fd(), &c_name).map_err(|e| with_path(path, e))?;
                    if target.is_absolute() {
                        fd = openat(libc::AT_FDCWD, &cstr(b"/")?, dir_flags, 0)
                            .map_err(|e| with_path(path, e))?;
                    }
                    let mut more = components(&target)?;
                    more.reverse();
                    todo.extend(more);
                }
                other => {
                    return Err(refused(
                        path,
                        format!(
                            "{} is {}, not a directory",
                            Path::new(&name).display(),
                            other.describe()
                        ),
                    ));
                }
            }
        }
        // The walk used O_PATH descriptors; one that can list and serve as a base for *at calls
        // with every flag is opened from the last of them.
        let fd = openat(
            fd.as_raw_fd(),
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            0,
        )
        .map_err(|e| with_path(path, e))?;
        Ok(Dir {
            fd,
            path: path.to_owned(),
        })
    }

    /// The path this directory was opened as (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`, for messages.
    pub fn child_path(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.path.join(name.as_ref())
    }

    /// The directory's own owner, mode and kind.
    pub fn meta(&self) -> io::Result<Meta> {
        fstat(self.fd.as_fd()).map_err(|e| with_path(&self.path, e))
    }

    /// Refuses the directory unless only root or this process's user can change its entries.
    pub fn require_trusted(&self) -> io::Result<()> {
        let meta = self.meta()?;
        if meta.is_trusted_dir() {
            Ok(())
        } else {
            Err(refused(
                &self.path,
                format!(
                    "the directory is owned by uid {} with mode {:o}; only root may be able to change it",
                    meta.uid, meta.mode
                ),
            ))
        }
    }

    /// Checks that `name` is one plain file name and returns it as a C string.
    fn name(&self, name: &OsStr) -> io::Result<CString> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(refused(
                &self.child_path(name),
                "not a single file name inside the directory",
            ));
        }
        cstr(bytes)
    }

    /// `lstat` of an entry: never follows it.
    pub fn meta_of(&self, name: impl AsRef<OsStr>) -> io::Result<Meta> {
        let name = name.as_ref();
        let c = self.name(name)?;
        fstatat_nofollow(self.fd.as_raw_fd(), &c).map_err(|e| with_path(&self.child_path(name), e))
    }

    fn open_file(&self, name: &OsStr, how: Open) -> io::Result<File> {
        let c = self.name(name)?;
        let path = self.child_path(name);
        // O_NONBLOCK: opening a fifo for reading returns at once, and for writing fails (ENXIO)
        // instead of waiting for a reader; either way the fstat below refuses it.
        let base = libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;
        let (flags, mode) = match how {
            Open::Read => (libc::O_RDONLY, 0),
            Open::Append(mode) => (libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, mode),
            Open::CreateNew(mode) => (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, mode),
            Open::Truncate(mode) => (libc::O_WRONLY | libc::O_CREAT, mode),
        };
        let fd = match openat(self.fd.as_raw_fd(), &c, base | flags, mode) {
            Ok(fd) => fd,
            Err(e) => {
                // ELOOP (a link), ENXIO (a fifo without reader), EEXIST with O_EXCL: say what
                // the entry is when that is the reason.
                if let Ok(meta) = fstatat_nofollow(self.fd.as_raw_fd(), &c)
                    && meta.kind != Kind::File
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::ELOOP | libc::ENXIO | libc::ENODEV | libc::EEXIST)
                    )
                {
                    return Err(refused(&path, meta.kind.describe()));
                }
                return Err(with_path(&path, e));
            }
        };
        let meta = fstat(fd.as_fd()).map_err(|e| with_path(&path, e))?;
        if meta.kind != Kind::File {
            return Err(refused(&path, meta.kind.describe()));
        }
        if meta.nlink != 1 {
            return Err(refused(
                &path,
                format!("a file with {} hard links (one expected)", meta.nlink),
            ));
        }
        // Back to blocking I/O for ordinary use (it makes no difference to a regular file, but
        // callers should not have to know the flag was ever set).
        // SAFETY: fcntl on a descriptor we own.
        let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) })?;
        let file = File::from(fd);
        if matches!(how, Open::Truncate(_)) {
            file.set_len(0).map_err(|e| with_path(&path, e))?;
        }
        Ok(file)
    }

    /// Opens a regular file for reading.
    pub fn open_read(&self, name: impl AsRef<OsStr>) -> io::Result<File> {
        self.open_file(name.as_ref(), Open::Read)
    }

    /// Opens a regular file for appending, creating it with `mode` (less the umask) when missing.
    pub fn open_append(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        self.open_file(name.as_ref(), Open::Append(mode))
    }

    /// Creates a new file with `mode`; fails (`AlreadyExists`, or refused) when anything has the name.
    pub fn create_new(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        self.open_file(name.as_ref(), Open::CreateNew(mode))
    }

    /// Opens a regular file for writing from its start (created with `mode` when missing); it is
    /// truncated only once it was checked to be a regular file with one link.
    pub fn create_truncate(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        self.open_file(name.as_ref(), Open::Truncate(mode))
    }

    /// Reads a whole regular file, refusing one larger than `max_bytes`.
    pub fn read(&self, name: impl AsRef<OsStr>, max_bytes: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let name = name.as_ref();
        let file = self.open_read(name)?;
        let mut buf = Vec::new();
        file.take(max_bytes + 1)
            .read_to_end(&mut buf)
            .map_err(|e| with_path(&self.child_path(name), e))?;
        if buf.len() as u64 > max_bytes {
            return Err(refused(
                &self.child_path(name),
                format!("larger than {max_bytes} bytes"),
            ));
        }
        Ok(buf)
    }

    /// Replaces `name` with `bytes` atomically: a new file under a temporary name (`O_EXCL`, so a
    /// link planted there is never written through), synced, then renamed over `name`.
    pub fn write_atomic(&self, name: impl AsRef<OsStr>, bytes: &[u8], mode: u32) -> io::Result<()> {
        let name = name.as_ref();
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = match self.create_new(&tmp, mode) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists || is_refused(&e) => {
                // Someone planted an entry under our temporary name: remove it (the entry, never
                // what it points to) and try once more.
                self.unlink(&tmp)?;
                self.create_new(&tmp, mode)?
            }
            other => other?,
        };
        let written = file
            .write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| with_path(&self.child_path(&tmp), e));
        if let Err(e) = written.and_then(|()| self.rename(&tmp, name)) {
            let _ = self.unlink(&tmp);
            return Err(e);
        }
        Ok(())
    }

    /// Another handle on the same directory (a duplicated descriptor).
    pub fn try_clone(&self) -> io::Result<Dir> {
        let fd = self.fd.try_clone().map_err(|e| with_path(&self.path, e))?;
        Ok(Dir {
            fd,
            path: self.path.clone(),
        })
    }

    /// For a relative path below this directory (`sluice/warmup.txt`): opens the directories on
    /// the way with [`Dir::open_dir`] (no link, no `..`, nothing absolute) and returns the last
    /// one with the final name, to be opened with the other methods.
    pub fn beneath(&self, relative: &Path) -> io::Result<(Dir, OsString)> {
        let mut names = Vec::new();
        for component in relative.components() {
            match component {
                Component::Normal(name) => names.push(name),
                Component::CurDir => {}
                _ => {
                    return Err(refused(
                        &self.path.join(relative),
                        "the path must stay below the directory (no `..`, not absolute)",
                    ));
                }
            }
        }
        let Some((last, dirs)) = names.split_last() else {
            return Err(refused(&self.path.join(relative), "no file name"));
        };
        let mut dir = self.try_clone()?;
        for name in dirs {
            dir = dir.open_dir(name)?;
        }
        Ok((dir, (*last).to_owned()))
    }

    /// Opens the directory `relative` below this one, creating (with `mode`, less the umask) the
    /// components that are missing; a link or a non-directory on the way is refused, so nothing
    /// is created where a link points.
    pub fn make_dirs(&self, relative: &Path, mode: u32) -> io::Result<Dir> {
        let mut dir = self.try_clone()?;
        for component in relative.components() {
            let name = match component {
                Component::Normal(name) => name,
                Component::CurDir => continue,
                _ => {
                    return Err(refused(
                        &self.path.join(relative),
                        "the path must stay below the directory (no `..`, not absolute)",
                    ));
                }
            };
            match dir.create_dir(name, mode) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            dir = dir.open_dir(name)?;
        }
        Ok(dir)
    }

    /// Opens a subdirectory, refusing a link or anything that is not a directory.
    pub fn open_dir(&self, name: impl AsRef<OsStr>) -> io::Result<Dir> {
        let name = name.as_ref();
        let c = self.name(name)?;
        let path = self.child_path(name);
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        match openat(self.fd.as_raw_fd(), &c, flags, 0) {
            Ok(fd) => Ok(Dir { fd, path }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                let what = fstatat_nofollow(self.fd.as_raw_fd(), &c)
                    .map(|m| m.kind.describe())
                    .unwrap_or("not a directory");
                Err(refused(&path, format!("{what}, not a directory")))
            }
            Err(e) => Err(with_path(&path, e)),
        }
    }

    /// Creates a subdirectory with `mode` (less the umask).
    pub fn create_dir(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<()> {
        let name = name.as_ref();
        let c = self.name(name)?;
        // SAFETY: valid descriptor and nul-terminated name.
        cvt(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) })
            .map(drop)
            .map_err(|e| with_path(&self.child_path(name), e))
    }

    /// Renames an entry within this directory (the entry itself, whatever it is; a link is
    /// renamed, never followed).
    pub fn rename(&self, from: impl AsRef<OsStr>, to: impl AsRef<OsStr>) -> io::Result<()> {
        self.rename_to(from, self, to)
    }

    /// Renames an entry of this directory into `dest` (same file system).
    pub fn rename_to(
        &self,
        from: impl AsRef<OsStr>,
        dest: &Dir,
        to: impl AsRef<OsStr>,
    ) -> io::Result<()> {
        let (from, to) = (from.as_ref(), to.as_ref());
        let (c_from, c_to) = (self.name(from)?, dest.name(to)?);
        // SAFETY: valid descriptors and nul-terminated names.
        cvt(unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                c_from.as_ptr(),
                dest.fd.as_raw_fd(),
                c_to.as_ptr(),
            )
        })
        .map(drop)
        .map_err(|e| with_path(&self.child_path(from), e))
    }

    /// Removes a non-directory entry (a link is removed, not its target).
    pub fn unlink(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        self.unlinkat(name.as_ref(), 0)
    }

    /// Removes an empty subdirectory.
    pub fn remove_dir(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        self.unlinkat(name.as_ref(), libc::AT_REMOVEDIR)
    }

    fn unlinkat(&self, name: &OsStr, flags: libc::c_int) -> io::Result<()> {
        let c = self.name(name)?;
        // SAFETY: valid descriptor and nul-terminated name.
        cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), flags) })
            .map(drop)
            .map_err(|e| with_path(&self.child_path(name), e))
    }

    /// Removes `name` and, when it is a directory, everything below it, never following a link
    /// (a link is removed as an entry). Fails without removing more when the tree is deeper than
    /// `max_depth` directories. A missing `name` is not an error.
    pub fn remove_tree(&self, name: impl AsRef<OsStr>, max_depth: usize) -> io::Result<()> {
        let name = name.as_ref();
        let meta = match self.meta_of(name) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if meta.kind != Kind::Dir {
            return self.unlink(name);
        }
        if max_depth == 0 {
            return Err(refused(
                &self.child_path(name),
                "the tree is deeper than the removal allows",
            ));
        }
        match self.open_dir(name) {
            Ok(child) => {
                for entry in child.entries()? {
                    child.remove_tree(&entry, max_depth - 1)?;
                }
            }
            // Swapped for a link or a file since the lstat: remove that entry instead.
            Err(e) if is_refused(&e) => return self.unlink(name),
            Err(e) => return Err(e),
        }
        self.remove_dir(name)
    }

    /// The names in this directory, without `.` and `..`.
    pub fn entries(&self) -> io::Result<Vec<OsString>> {
        // fdopendir takes the descriptor it is given, so it gets a duplicate.
        // SAFETY: fcntl on a descriptor we own.
        let dup = cvt(unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })
            .map_err(|e| with_path(&self.path, e))?;
        // SAFETY: `dup` is a fresh directory descriptor; on success the DIR owns it.
        let dirp = unsafe { libc::fdopendir(dup) };
        if dirp.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so `dup` is still ours to close.
            unsafe { libc::close(dup) };
            return Err(with_path(&self.path, e));
        }
        // The duplicate shares the file offset with `self.fd`: start from the beginning.
        // SAFETY: `dirp` is a valid DIR.
        unsafe { libc::rewinddir(dirp) };
        let mut names = Vec::new();
        let result = loop {
            // readdir signals errors only through errno, so it is cleared first.
            // SAFETY: errno is thread-local.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: `dirp` is a valid DIR; the entry is valid until the next readdir.
            let entry = unsafe { libc::readdir(dirp) };
            if entry.is_null() {
                let e = io::Error::last_os_error();
                break match e.raw_os_error() {
                    Some(0) | None => Ok(()),
                    Some(_) => Err(with_path(&self.path, e)),
                };
            }
            // SAFETY: d_name is nul-terminated within the entry.
            let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name.to_vec()));
            }
        };
        // SAFETY: `dirp` is valid and closed once; this also closes `dup`.
        unsafe { libc::closedir(dirp) };
        result.map(|()| names)
    }

    /// The target of a symbolic link, without following it.
    pub fn read_link(&self, name: impl AsRef<OsStr>) -> io::Result<PathBuf> {
        let name = name.as_ref();
        let c = self.name(name)?;
        let path = self.child_path(name);
        match readlinkat(self.fd.as_raw_fd(), &c) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let what = self
                    .meta_of(name)
                    .map(|m| m.kind.describe())
                    .unwrap_or("not a link");
                Err(refused(&path, format!("{what}, not a symbolic link")))
            }
            other => other.map_err(|e| with_path(&path, e)),
        }
    }

    /// Creates a symbolic link `name` → `target`.
    pub fn symlink(&self, target: &Path, name: impl AsRef<OsStr>) -> io::Result<()> {
        let name = name.as_ref();
        let c = self.name(name)?;
        let c_target = cstr(target.as_os_str().as_bytes())?;
        // SAFETY: valid descriptor and nul-terminated strings.
        cvt(unsafe { libc::symlinkat(c_target.as_ptr(), self.fd.as_raw_fd(), c.as_ptr()) })
            .map(drop)
            .map_err(|e| with_path(&self.child_path(name), e))
    }

    /// `fsync` of the directory, making renames and creations in it durable.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: fsync on a descriptor we own.
        cvt(unsafe { libc::fsync(self.fd.as_raw_fd()) })
            .map(drop)
            .map_err(|e| with_path(&self.path, e))
    }
}

/// The names a path walks through: `/` and `.` dropped, `..` kept (the walk resolves it
/// physically, as the kernel does).
fn components(path: &Path) -> io::Result<Vec<OsString>> {
    Ok(path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect())
}

/// Opens `path`'s parent directory with [`Dir::open`] and returns it with the file name, for
/// callers that are given whole paths.
pub fn split(path: &Path) -> io::Result<(Dir, OsString)> {
    let name = path
        .file_name()
        .ok_or_else(|| refused(path, "no file name at the end of the path"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((Dir::open(parent)?, name.to_owned()))
}

#[cfg(test)]
mod tests;
