//! The shim's one-threaded `poll` loop: copies the child's output to its logs, reaps it, enforces stop
//! deadlines and answers the control socket.
//!
//! Architecture Invariant: one thread, no blocking call except `poll` itself; every descriptor is
//! non-blocking, so a stuck client can never stall the logs or the reaping of the child.
//! Architecture Invariant: the child's pid is never signalled after it has been reaped (it could belong
//! to another process by then); only its still-unreaped zombie pins the pid and the process group id.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use crate::args::ShimArgs;
use crate::logfile::LogFile;
use crate::proto::{Command, MAX_CLIENTS, MAX_LINE_BYTES, Outcome, Status};
use crate::{sys, tree};

/// Largest read from the child's pipes in one go (also the pipe's default capacity): a read takes
/// the whole pipe, so a chunk holds whole lines when the service writes whole lines, and rotation
/// never splits one. The buffer's pages beyond the first go back to the kernel after every read
/// that touched them ([`sys::PageBuffer`]), so an idle shim keeps 4 KiB of it, not 64.
const READ_CHUNK_BYTES: usize = 64 * 1024;
// Client command lines are read through the same buffer.
const _: () = assert!(MAX_LINE_BYTES < READ_CHUNK_BYTES);
/// After the child exited, how long to keep reading its pipes for output still in flight. Bounded
/// because a grandchild that escaped the process group with setsid could hold them open forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);
/// Grace given to the child when the shim itself gets SIGTERM (as `stop 15 10000`).
const SIGTERM_STOP_GRACE_MS: u64 = 10_000;
/// Stop reading a client's commands while this many response bytes wait to be sent to it.
const CLIENT_OUTPUT_HIGH_BYTES: usize = 4096;
/// Connections accepted per wake-up, so a connection storm cannot starve the pipes.
const MAX_ACCEPTS_PER_WAKE: usize = 64;

/// The child as the loop tracks it.
pub struct Child {
    /// Pid and process group id.
    pub pid: libc::pid_t,
    /// When it was spawned, unix ms (for display).
    pub started_ms: u64,
    /// When it was spawned, `CLOCK_BOOTTIME` ms (for its age: the wall clock may step).
    pub started_boot_ms: u64,
    /// Readable once the child exited; `None` after it has been reaped.
    pub pidfd: Option<OwnedFd>,
}

/// One of the child's output streams.
struct Stream {
    /// Read end of the pipe; `None` at EOF or when the post-exit drain gave up.
    pipe: Option<File>,
    /// Where the output goes.
    log: LogFile,
}

/// One control connection.
struct Client {
    stream: UnixStream,
    /// Bytes received but not yet consumed as complete lines.
    input: Vec<u8>,
    /// Responses not yet accepted by the socket.
    output: Vec<u8>,
    /// A `wait` is pending: the client gets no further answers (and sends are not read) until the
    /// child has exited, so responses stay in command order.
    waiting: bool,
    /// The peer shut down its writing side.
    eof: bool,
    /// Close once `output` has been sent (after `error line too long`).
    closing: bool,
    /// Remove at the end of this loop turn (indices stay stable while the turn runs).
    dead: bool,
}

/// What a command asks of the connection it came on.
enum Reply {
    Line(String),
    Wait,
    Release,
}

/// Which descriptor a `pollfd` entry stands for.
#[derive(Clone, Copy)]
enum Source {
    Listener,
    Signals,
    Pidfd,
    Pipe(usize),
    Client(usize),
}

/// The whole state of a running shim; owned by the loop alone.
pub struct Shim {
    /// Kept for `tag` and the socket path.
    args: ShimArgs,
    /// Our own pid, reported in status lines.
    shim_pid: libc::pid_t,
    /// Held (never read) for the shim's lifetime: its flock is what makes the shim unique.
    _lock: File,
    listener: UnixListener,
    /// SIGTERM arrives here as an ordinary readable event.
    signals: OwnedFd,
    child: Child,
    /// The child's stdout and stderr, in that order.
    streams: [Stream; 2],
    clients: Vec<Client>,
    /// Set once the child is reaped (exit time in unix ms, and in `CLOCK_BOOTTIME` ms).
    outcome: Option<(Outcome, u64, u64)>,
    /// Reaped and its output drained: status lines say `exited`, `wait` answers, `release` works.
    finished: bool,
    /// A stop is in progress (reported as `stopping=1`).
    stopping: bool,
    /// When the stop's grace runs out and SIGKILL goes to the group.
    stop_deadline: Option<Instant>,
    /// When the post-exit drain of the pipes gives up.
    drain_deadline: Option<Instant>,
    /// Reused read buffer, so the steady state allocates nothing; resident only while in use.
    buffer: sys::PageBuffer,
    /// Reused poll set and what each entry stands for.
    pollfds: Vec<libc::pollfd>,
    sources: Vec<Source>,
}

impl Shim {
    /// Assembles the state; `streams` pairs each pipe with its log (stdout first).
    pub fn new(
        args: ShimArgs,
        shim_pid: libc::pid_t,
        lock: File,
        listener: UnixListener,
        signals: OwnedFd,
        child: Child,
        streams: [(File, LogFile); 2],
    ) -> Shim {
        let [(out_pipe, out_log), (err_pipe, err_log)] = streams;
        Shim {
            args,
            shim_pid,
            _lock: lock,
            listener,
            signals,
            child,
            streams: [
                Stream {
                    pipe: Some(out_pipe),
                    log: out_log,
                },
                Stream {
                    pipe: Some(err_pipe),
                    log: err_log,
                },
            ],
            clients: Vec::new(),
            outcome: None,
            finished: false,
            stopping: false,
            stop_deadline: None,
            drain_deadline: None,
            // Out of memory here is what a failed Vec allocation would be: an abort.
            buffer: sys::PageBuffer::new(READ_CHUNK_BYTES).expect("mapping the read buffer"),
            pollfds: Vec::with_capacity(5 + MAX_CLIENTS),
            sources: Vec::with_capacity(5 + MAX_CLIENTS),
        }
    }

    /// Runs until `release`; never returns.
    pub fn run(mut self) -> ! {
        loop {
            self.fill_poll_set();
            let timeout_ms = self.poll_timeout_ms();
            if sys::poll(&mut self.pollfds, timeout_ms).is_err() {
                // Only EFAULT/EINVAL/ENOMEM are possible: back off rather than spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            self.on_deadlines();
            for k in 0..self.pollfds.len() {
                let revents = self.pollfds[k].revents;
                if revents == 0 {
                    continue;
                }
                match self.sources[k] {
                    // Pipes come before the pidfd in the set, so output written just before exit is
                    // logged before the exit is handled.
                    Source::Pipe(i) => self.on_pipe(i),
                    Source::Pidfd => self.on_child_exit(),
                    Source::Signals => {
                        if sys::drain_signalfd(&self.signals) {
                            self.stop(libc::SIGTERM, SIGTERM_STOP_GRACE_MS);
                        }
                    }
                    Source::Listener => self.on_listener(),
                    Source::Client(i) => self.on_client(i, revents),
                }
            }
            self.maybe_finish();
            self.clients.retain(|c| !c.dead);
        }
    }

    fn fill_poll_set(&mut self) {
        self.pollfds.clear();
        self.sources.clear();
        let mut add = |fd: RawFd, events: libc::c_short, source: Source| {
            self.pollfds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            self.sources.push(source);
        };
        for (i, stream) in self.streams.iter().enumerate() {
            if let Some(pipe) = &stream.pipe {
                add(pipe.as_raw_fd(), libc::POLLIN, Source::Pipe(i));
            }
        }
        if let Some(pidfd) = &self.child.pidfd {
            add(pidfd.as_raw_fd(), libc::POLLIN, Source::Pidfd);
        }
        add(self.signals.as_raw_fd(), libc::POLLIN, Source::Signals);
        add(self.listener.as_raw_fd(), libc::POLLIN, Source::Listener);
        for (i, client) in self.clients.iter().enumerate() {
            // A waiting client polls for nothing: POLLHUP/POLLERR are always reported, which is how a
            // brain that died while waiting frees its slot.
            let mut events = 0;
            if !client.waiting
                && !client.eof
                && !client.closing
                && client.output.len() < CLIENT_OUTPUT_HIGH_BYTES
            {
                events |= libc::POLLIN;
            }
            if !client.output.is_empty() {
                events |= libc::POLLOUT;
            }
            add(client.stream.as_raw_fd(), events, Source::Client(i));
        }
    }

    fn poll_timeout_ms(&self) -> libc::c_int {
        let next = match (self.stop_deadline, self.drain_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match next {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Round up, so the loop does not wake a hair early and spin until the deadline.
                let ms = left.as_micros().div_ceil(1000);
                ms.min(libc::c_int::MAX as u128) as libc::c_int
            }
        }
    }

    fn on_deadlines(&mut self) {
        let now = Instant::now();
        if self.stop_deadline.is_some_and(|d| d <= now) {
            self.stop_deadline = None;
            if self.outcome.is_none() {
                // ESRCH cannot happen while the zombie pins the group; nothing useful to do otherwise.
                let _ = sys::kill(-self.child.pid, libc::SIGKILL);
            }
        }
        if self.drain_deadline.is_some_and(|d| d <= now) {
            self.drain_deadline = None;
            for stream in &mut self.streams {
                stream.pipe = None;
            }
        }
    }

    fn on_pipe(&mut self, i: usize) {
        let stream = &mut self.streams[i];
        let Some(pipe) = &mut stream.pipe else { return };
        // One read per wake-up keeps stdout and stderr (and the clients) fairly served.
        let buffer = self.buffer.as_mut_slice();
        match pipe.read(buffer) {
            Ok(0) => stream.pipe = None,
            Ok(n) => {
                stream.log.append(&buffer[..n]);
                self.buffer.release_after(n);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => stream.pipe = None,
        }
    }

    fn on_child_exit(&mut self) {
        let pid = self.child.pid;
        // Kill the group while the zombie still pins its id: no grandchild may outlive the service.
        // ESRCH (nobody left in the group) is the good case; nothing else can be done about others.
        let _ = sys::kill(-pid, libc::SIGKILL);
        let outcome = match sys::waitpid_nohang(pid) {
            Ok(Some(status)) => {
                if libc::WIFSIGNALED(status) {
                    Outcome::Signal(libc::WTERMSIG(status))
                } else {
                    Outcome::Code(libc::WEXITSTATUS(status))
                }
            }
            // A readable pidfd means the child exited, so this is not expected; poll again.
            Ok(None) => return,
            // ECHILD: someone else reaped our child, which the shim never allows. Record an
            // impossible code rather than spin on a pidfd that stays readable.
            Err(_) => Outcome::Code(-1),
        };
        self.outcome = Some((outcome, sys::now_ms(), sys::boot_ms()));
        self.child.pidfd = None;
        self.kill_tree();
        self.stop_deadline = None;
        self.drain_deadline = Some(Instant::now() + DRAIN_AFTER_EXIT);
    }

    /// After the child's exit: whatever of its tree is left dies too, `setsid` descendants
    /// included (bounded by `EXIT_KILL_TIMEOUT_MS`; a kill is immediate, so this blocks the loop
    /// only while a member keeps forking). Without a tracking cgroup, the shim's own session.
    fn kill_tree(&self) {
        let timeout = Duration::from_millis(tree::EXIT_KILL_TIMEOUT_MS);
        let mut left = Vec::new();
        for dir in [&self.args.tree_cgroup, &self.args.cgroup]
            .into_iter()
            .flatten()
        {
            match tree::kill_cgroup(dir, timeout) {
                Ok(pids) => left.extend(pids),
                Err(e) => eprintln!(
                    "sluice-shim {}: cgroup {}: {e}",
                    self.args.id,
                    dir.display()
                ),
            }
        }
        left.extend(tree::kill_session(
            self.shim_pid,
            self.shim_pid,
            None,
            timeout,
        ));
        if !left.is_empty() {
            // The next shim of the instance kills them before it starts (or refuses to start).
            eprintln!(
                "sluice-shim {}: {} process(es) of the instance still alive after its exit: {left:?}",
                self.args.id,
                left.len()
            );
        }
    }

    /// Marks the child finished once it is reaped and its output drained, and answers the waiters.
    fn maybe_finish(&mut self) {
        if self.finished || self.outcome.is_none() || self.streams.iter().any(|s| s.pipe.is_some())
        {
            return;
        }
        self.finished = true;
        self.stopping = false;
        self.drain_deadline = None;
        let line = format!("{}\n", self.status());
        let mut answered = Vec::new();
        for (i, client) in self.clients.iter_mut().enumerate() {
            if client.waiting && !client.dead {
                client.waiting = false;
                client.output.extend_from_slice(line.as_bytes());
                flush(client);
                answered.push(i);
            }
        }
        // Commands sent after a `wait` on the same connection were held back until now. They run only
        // once every waiter has its answer, because one of them may be a `release` that exits.
        for i in answered {
            self.process_lines(i);
            flush(&mut self.clients[i]);
        }
    }

    fn on_listener(&mut self) {
        for _ in 0..MAX_ACCEPTS_PER_WAKE {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                // WouldBlock ends the batch; other errors (EMFILE, ECONNABORTED) are transient.
                Err(_) => return,
            };
            let live = self.clients.iter().filter(|c| !c.dead).count();
            if live >= MAX_CLIENTS || stream.set_nonblocking(true).is_err() {
                // Refused: tell the peer why if its buffer takes it, then close.
                let _ = stream.set_nonblocking(true);
                let _ = (&stream).write(b"error too many connections\n");
                continue;
            }
            self.clients.push(Client {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                waiting: false,
                eof: false,
                closing: false,
                dead: false,
            });
        }
    }

    fn on_client(&mut self, i: usize, revents: libc::c_short) {
        let client = &mut self.clients[i];
        if client.dead {
            return;
        }
        if revents & libc::POLLERR != 0 || (client.waiting && revents & libc::POLLHUP != 0) {
            client.dead = true;
            return;
        }
        if revents & libc::POLLOUT != 0 {
            flush(client);
        }
        let readable = revents & (libc::POLLIN | libc::POLLHUP) != 0;
        if readable && !client.waiting && !client.eof && !client.closing && !client.dead {
            // Never more than one line's worth at a time: input stays bounded.
            // Within the buffer's first page, which stays resident: nothing to release after.
            let room = &mut self.buffer.as_mut_slice()[..MAX_LINE_BYTES + 1];
            match client.stream.read(room) {
                Ok(0) => client.eof = true,
                Ok(n) => client.input.extend_from_slice(&room[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => client.dead = true,
            }
            self.process_lines(i);
        }
        let client = &mut self.clients[i];
        flush(client);
        if client.output.is_empty() && !client.waiting && (client.eof || client.closing) {
            client.dead = true;
        }
    }

    /// Answers every complete line a client has sent, stopping at a pending `wait`.
    fn process_lines(&mut self, i: usize) {
        loop {
            let client = &mut self.clients[i];
            if client.dead || client.waiting || client.closing {
                return;
            }
            let line: Vec<u8> = match client.input.iter().position(|&b| b == b'\n') {
                Some(end) if end <= MAX_LINE_BYTES => {
                    let mut line: Vec<u8> = client.input.drain(..=end).collect();
                    line.pop();
                    line
                }
                None if client.input.len() <= MAX_LINE_BYTES => {
                    if !client.eof || client.input.is_empty() {
                        return;
                    }
                    // A last command without its newline before EOF (e.g. `printf status | socat`).
                    std::mem::take(&mut client.input)
                }
                _ => {
                    client.input.clear();
                    client.output.extend_from_slice(b"error line too long\n");
                    client.closing = true;
                    return;
                }
            };
            let text = String::from_utf8_lossy(&line);
            let reply = self.respond(text.trim_end_matches('\r'));
            let client = &mut self.clients[i];
            match reply {
                Reply::Line(mut line) => {
                    line.push('\n');
                    client.output.extend_from_slice(line.as_bytes());
                }
                Reply::Wait if self.finished => {
                    let line = format!("{}\n", self.status());
                    self.clients[i].output.extend_from_slice(line.as_bytes());
                }
                Reply::Wait => client.waiting = true,
                Reply::Release => self.release(i),
            }
        }
    }

    fn respond(&mut self, line: &str) -> Reply {
        let command = match Command::parse(line) {
            Ok(command) => command,
            Err(message) => return Reply::Line(format!("error {message}")),
        };
        let reaped = self.outcome.is_some();
        let line = match command {
            Command::Status => self.status().to_string(),
            Command::Wait => return Reply::Wait,
            Command::Signal(_) | Command::SignalGroup(_) if reaped => "error exited".to_owned(),
            Command::Signal(signum) => {
                ok_or_error(sys::kill(self.child.pid, signum), self.child.pid)
            }
            Command::SignalGroup(signum) => {
                ok_or_error(sys::kill(-self.child.pid, signum), -self.child.pid)
            }
            Command::Stop { signum, grace_ms } => self.stop(signum, grace_ms),
            Command::Release if self.finished => return Reply::Release,
            Command::Release => "error running".to_owned(),
        };
        Reply::Line(line)
    }

    /// Sends `signum` to the child (leader only) and arms SIGKILL to the group after the grace; a
    /// second stop keeps the earlier deadline. Once the child has exited there is nothing to stop.
    fn stop(&mut self, signum: libc::c_int, grace_ms: u64) -> String {
        if self.outcome.is_some() {
            return "ok".to_owned();
        }
        let deadline = Instant::now() + Duration::from_millis(grace_ms);
        self.stop_deadline = Some(self.stop_deadline.map_or(deadline, |d| d.min(deadline)));
        self.stopping = true;
        ok_or_error(sys::kill(self.child.pid, signum), self.child.pid)
    }

    fn status(&self) -> Status {
        let shim_pid = self.shim_pid as u32;
        let pid = self.child.pid as u32;
        let started_ms = self.child.started_ms;
        let started_boot_ms = Some(self.child.started_boot_ms);
        let tag = self.args.tag.clone();
        match self.outcome {
            Some((outcome, exited_ms, exited_boot_ms)) if self.finished => Status::Exited {
                shim_pid,
                pid,
                started_ms,
                started_boot_ms,
                exited_ms,
                exited_boot_ms: Some(exited_boot_ms),
                outcome,
                tag,
            },
            _ => Status::Running {
                shim_pid,
                pid,
                started_ms,
                started_boot_ms,
                tag,
                stopping: self.stopping,
            },
        }
    }

    /// Answers `ok`, removes the socket and exits. The lock file stays: see `startup::take_lock`.
    fn release(&mut self, i: usize) -> ! {
        let client = &mut self.clients[i];
        client.output.extend_from_slice(b"ok\n");
        // The answer is tiny and the socket buffer nearly empty; a short blocking send is enough, and
        // bounded so a peer that stopped reading cannot keep us alive.
        let _ = client.stream.set_nonblocking(false);
        let _ = client
            .stream
            .set_write_timeout(Some(Duration::from_millis(500)));
        let _ = client.stream.write_all(&client.output);
        let _ = std::fs::remove_file(&self.args.socket);
        std::process::exit(0)
    }
}

fn ok_or_error(result: io::Result<()>, target: libc::pid_t) -> String {
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("error kill {target}: {e}"),
    }
}

/// Sends what the socket accepts now; a broken connection marks the client dead.
fn flush(client: &mut Client) {
    while !client.output.is_empty() && !client.dead {
        match client.stream.write(&client.output) {
            Ok(0) => client.dead = true,
            Ok(n) => {
                client.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => client.dead = true,
        }
    }
}
