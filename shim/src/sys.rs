//! Thin safe wrappers over the few libc calls the shim needs that std does not offer.
//!
//! Each wrapper turns `-1`/errno into `io::Error` and keeps the `unsafe` in one place, so the rest of
//! the crate reads like ordinary Rust.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{SystemTime, UNIX_EPOCH};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `fork()`: `Some(child pid)` in the parent, `None` in the child.
///
/// Only sound while the process has one thread, which the shim always does.
pub fn fork() -> io::Result<Option<libc::pid_t>> {
    // SAFETY: the shim is single-threaded, so the child does not inherit locks held by other threads.
    let pid = cvt(unsafe { libc::fork() })?;
    Ok((pid != 0).then_some(pid))
}

/// `setsid()`: a session of our own, so no terminal and no brain's process group reaches us.
pub fn setsid() -> io::Result<()> {
    // SAFETY: no pointers involved.
    cvt(unsafe { libc::setsid() }).map(drop)
}

/// Closes every fd >= `first`: the shim must hold nothing the brain happened to leak to it (a
/// listening socket held by a shim would keep the brain's port busy after the brain died).
pub fn close_fds_from(first: RawFd) {
    // SAFETY: close_range only closes descriptors; nothing else in this process owns them yet.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    if ret == 0 {
        return;
    }
    // Kernels older than 5.9: list first, then close, because the listing itself holds an fd.
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd >= first)
            .collect(),
        Err(_) => (first..1024).collect(),
    };
    for fd in fds {
        // SAFETY: as above; EBADF for the listing's own (already closed) fd is harmless.
        unsafe { libc::close(fd) };
    }
}

/// Sets `signum` to be ignored in this process.
pub fn ignore_signal(signum: libc::c_int) {
    // SAFETY: SIG_IGN is a valid disposition; no handler code runs.
    unsafe { libc::signal(signum, libc::SIG_IGN) };
}

/// Blocks SIGTERM and returns a non-blocking signalfd that becomes readable when one is pending, so
/// the poll loop sees it as an ordinary event instead of running code in a signal handler.
pub fn sigterm_fd() -> io::Result<OwnedFd> {
    // SAFETY: the sigset is initialised by sigemptyset before use; signalfd returns a new fd we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        cvt(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        let fd = cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Reads and discards every pending signal on a signalfd; true if there was at least one.
pub fn drain_signalfd(fd: &OwnedFd) -> bool {
    let mut got = false;
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    // Bounded: there is at most one pending standard signal per signal number.
    for _ in 0..64 {
        // SAFETY: info is a writable buffer of exactly the size passed.
        let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if n <= 0 {
            break;
        }
        got = true;
    }
    got
}

/// `pidfd_open(pid, 0)`: an fd that polls readable once `pid` has exited. Always close-on-exec.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes two integers and returns a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `waitpid(pid, WNOHANG)`: `Some(raw wait status)` once the child has exited.
pub fn waitpid_nohang(pid: libc::pid_t) -> io::Result<Option<libc::c_int>> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    let ret = cvt(unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) })?;
    Ok((ret == pid).then_some(status))
}

/// `waitpid(pid, 0)`, retried on EINTR; used only on start-up failure paths.
pub fn waitpid_blocking(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    while unsafe { libc::waitpid(pid, &mut status, 0) } == -1
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

/// `kill(pid, signum)`; a negative pid addresses a process group.
pub fn kill(pid: libc::pid_t, signum: libc::c_int) -> io::Result<()> {
    // SAFETY: no pointers involved.
    cvt(unsafe { libc::kill(pid, signum) }).map(drop)
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: false if another open file description holds the lock.
pub fn try_lock_exclusive(fd: &impl AsRawFd) -> io::Result<bool> {
    // SAFETY: no pointers involved.
    match cvt(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sets `O_NONBLOCK` on a descriptor (the child's pipes: a single-threaded loop must never block).
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl with F_GETFL/F_SETFL takes and returns integers only.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)).map(drop)
    }
}

/// Sets the process umask, returning the previous one.
pub fn umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) }
}

/// Writes all of `buf` to a raw fd (the handshake goes to fd 1 without std's buffering).
pub fn write_all_fd(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice of the given length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Points fds 0, 1 and (see below) 2 at /dev/null: after the handshake the brain must see EOF on our stdout, and
/// nothing the shim might print later may block on or fail at a pipe nobody reads.
///
/// stderr is kept when it is a file or a socket (the journal under systemd, the daemon's log file in
/// tests): the shim reports refused log files there. A pipe is replaced too, because its reader
/// would wait for every writer, and the shim outlives whoever started the brain.
pub fn stdio_to_dev_null() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite; fd 2 may be closed (EBADF).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable.
    let keep_stderr = unsafe { libc::fstat(2, &mut st) } == 0
        && matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFSOCK);
    let last = if keep_stderr { 1 } else { 2 };
    for target in 0..=last {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        cvt(unsafe { libc::dup2(null.as_raw_fd(), target) })?;
    }
    Ok(())
}

/// `poll(2)`; EINTR counts as "nothing ready" so callers simply go round their loop again.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    // SAFETY: fds is a valid mutable slice of pollfd of the given length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// `CLOCK_BOOTTIME` in milliseconds: the clock ages and run times are measured on. It never steps
/// with the wall clock, counts time suspended, and is the same for every process of the host, so
/// the brain compares it with its own reading across the shim boundary and across brain restarts.
pub fn boot_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_BOOTTIME exists on every kernel the shim runs on.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if ret != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// `pidfd_send_signal(pidfd, signum, NULL, 0)`: signals exactly the process the pidfd names, never a
/// later process that reused its pid.
pub fn pidfd_send_signal(pidfd: &OwnedFd, signum: libc::c_int) -> io::Result<()> {
    // SAFETY: a pidfd we own, a null siginfo and no flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signum,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the process a pidfd names has exited (its pidfd polls readable then).
pub fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    matches!(poll(&mut fds, 0), Ok(n) if n > 0)
}

/// Wall-clock time in unix milliseconds (for display only; ages use [`boot_ms`], deadlines
/// `Instant`).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A buffer of anonymous pages of its own (not the heap's), so that the pages a large read
/// touched can be handed back to the kernel afterwards: a hundred idle shims then do not each keep
/// a 64 KiB buffer resident. The first page stays, so small reads cost no extra system call.
pub struct PageBuffer {
    ptr: *mut u8,
    len: usize,
    page: usize,
}

impl PageBuffer {
    /// Maps `len` bytes (rounded up to whole pages), readable and writable, zero-filled.
    pub fn new(len: usize) -> io::Result<PageBuffer> {
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => 4096,
        };
        let len = len.div_ceil(page).max(1) * page;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(PageBuffer {
            ptr: ptr.cast(),
            len,
            page,
        })
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `len` bytes for as long as `self` lives, and `&mut self` makes this
        // the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// After a read of `used` bytes: the pages past the first that it touched go back to the
    /// kernel (they read as zeros when touched again). Nothing to do for reads within one page.
    pub fn release_after(&mut self, used: usize) {
        if used <= self.page {
            return;
        }
        let end = used.min(self.len).div_ceil(self.page) * self.page;
        // SAFETY: a page-aligned range inside our own mapping; no reference into it is held
        // (callers pass `&mut self`). MADV_DONTNEED cannot fail on a valid private anonymous range,
        // and if it did the pages would merely stay resident.
        unsafe {
            libc::madvise(
                self.ptr.add(self.page).cast(),
                end - self.page,
                libc::MADV_DONTNEED,
            );
        }
    }
}

impl Drop for PageBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}
