//! The shim's wire protocol (handshake line, socket commands, status lines), shared with the brain.
//!
//! Everything here is plain text, one line per message, `\n` terminated, so that an operator can also
//! talk to a shim with `socat - UNIX-CONNECT:PATH`. This module is std only and does no I/O: the brain
//! formats [`Command`]s and parses [`Status`] lines and the handshake with it, the shim does the reverse.
//!
//! Socket protocol: one command per line, exactly one response line per command, in order, several
//! commands per connection allowed. Responses are `ok`, `error <message>` or a status line.
//!
//! | command                      | response                                                         |
//! |------------------------------|------------------------------------------------------------------|
//! | `status`                     | status line                                                      |
//! | `wait`                       | status line once the child has exited (deferred until then)      |
//! | `signal <signum>`            | `ok` after `kill(pid, signum)`; `error exited` once it exited    |
//! | `signal-group <signum>`      | `ok` after `kill(-pgid, signum)`; `error exited` once it exited  |
//! | `stop <signum> <grace_ms>`   | `ok` at once; SIGKILL to the group when the grace has passed     |
//! | `release`                    | `ok` and the shim exits, if the child has exited; else `error running` |
//!
//! Lines longer than [`MAX_LINE_BYTES`] get `error line too long` and the connection is closed.

use std::fmt;
use std::str::FromStr;

/// Longest command line (without its `\n`) the shim accepts; a longer one closes the connection.
pub const MAX_LINE_BYTES: usize = 1024;

/// Most client connections one shim serves at once; further ones are refused.
pub const MAX_CLIENTS: usize = 32;

/// Highest signal number accepted in commands (Linux `SIGRTMAX`).
pub const MAX_SIGNAL: i32 = 64;

/// How a child ended: exactly one of an exit code or a terminating signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `exit(n)`: the `code=` key.
    Code(i32),
    /// Killed by signal n: the `signal=` key.
    Signal(i32),
}

/// One status line, as answered to `status` and `wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `running shim=<pid> pid=<pid> started_ms=<ms>[ started_boot_ms=<ms>] tag=<tag>[ stopping=1]`
    Running {
        /// The shim's own pid, so the brain can check it talks to the shim it thinks it does.
        shim_pid: u32,
        /// The child's pid, which is also its process group id.
        pid: u32,
        /// When the child was spawned, unix milliseconds (for display: the wall clock may step).
        started_ms: u64,
        /// When the child was spawned, `CLOCK_BOOTTIME` milliseconds: what its age is measured
        /// from. `None` from a shim older than the key.
        started_boot_ms: Option<u64>,
        /// The opaque `--tag` the brain gave the shim (for example the build id).
        tag: String,
        /// A `stop` is in progress (the child got its stop signal and has not exited yet).
        stopping: bool,
    },
    /// `exited shim=<pid> pid=<pid> started_ms=<ms>[ started_boot_ms=<ms>] exited_ms=<ms>[
    /// exited_boot_ms=<ms>] code=<n>|signal=<n> tag=<tag>`
    Exited {
        /// The shim's own pid.
        shim_pid: u32,
        /// The (now reaped) child's pid.
        pid: u32,
        /// When the child was spawned, unix milliseconds (display).
        started_ms: u64,
        /// When the child was spawned, `CLOCK_BOOTTIME` milliseconds (`None`: an older shim).
        started_boot_ms: Option<u64>,
        /// When the shim reaped the child, unix milliseconds (display).
        exited_ms: u64,
        /// When the shim reaped the child, `CLOCK_BOOTTIME` milliseconds (`None`: an older shim):
        /// with `started_boot_ms`, how long it ran, whatever the wall clock did meanwhile.
        exited_boot_ms: Option<u64>,
        /// Exit code or signal.
        outcome: Outcome,
        /// The opaque `--tag` the brain gave the shim.
        tag: String,
    },
}

/// A status line that does not parse; names the token at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    /// The offending token, or `<end of line>` when one was missing.
    pub token: String,
    /// What was expected in its place.
    pub expected: String,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad status line: got {:?}, expected {}",
            self.token, self.expected
        )
    }
}

impl std::error::Error for ProtoError {}

impl Status {
    /// The shim's pid, whatever the state.
    pub fn shim_pid(&self) -> u32 {
        match self {
            Status::Running { shim_pid, .. } | Status::Exited { shim_pid, .. } => *shim_pid,
        }
    }

    /// The child's pid, whatever the state.
    pub fn pid(&self) -> u32 {
        match self {
            Status::Running { pid, .. } | Status::Exited { pid, .. } => *pid,
        }
    }

    /// The tag given to the shim on its command line.
    pub fn tag(&self) -> &str {
        match self {
            Status::Running { tag, .. } | Status::Exited { tag, .. } => tag,
        }
    }

    /// Parses one status line (a trailing `\n` or `\r\n` is allowed). Keys must come in the fixed order
    /// that [`Display`](fmt::Display) writes them in; anything else is an error naming the token.
    pub fn parse(line: &str) -> Result<Status, ProtoError> {
        let line = line.trim_end_matches(['\n', '\r']);
        let mut tokens = line.split(' ').peekable();
        let state = tokens.next().unwrap_or("");
        let status = match state {
            "running" => {
                let shim_pid = field(&mut tokens, "shim")?;
                let pid = field(&mut tokens, "pid")?;
                let started_ms = field(&mut tokens, "started_ms")?;
                let started_boot_ms = optional(&mut tokens, "started_boot_ms")?;
                let tag = field(&mut tokens, "tag")?;
                let stopping = match tokens.next() {
                    None => false,
                    Some("stopping=1") => true,
                    Some(other) => return Err(bad(other, "stopping=1 or end of line")),
                };
                Status::Running {
                    shim_pid,
                    pid,
                    started_ms,
                    started_boot_ms,
                    tag,
                    stopping,
                }
            }
            "exited" => {
                let shim_pid = field(&mut tokens, "shim")?;
                let pid = field(&mut tokens, "pid")?;
                let started_ms = field(&mut tokens, "started_ms")?;
                let started_boot_ms = optional(&mut tokens, "started_boot_ms")?;
                let exited_ms = field(&mut tokens, "exited_ms")?;
                let exited_boot_ms = optional(&mut tokens, "exited_boot_ms")?;
                let token = tokens.next().unwrap_or("<end of line>");
                let outcome = if let Some(code) = token.strip_prefix("code=") {
                    Outcome::Code(code.parse().map_err(|_| bad(token, "code=<integer>"))?)
                } else if let Some(signal) = token.strip_prefix("signal=") {
                    Outcome::Signal(signal.parse().map_err(|_| bad(token, "signal=<integer>"))?)
                } else {
                    return Err(bad(token, "code=<n> or signal=<n>"));
                };
                let tag = field(&mut tokens, "tag")?;
                Status::Exited {
                    shim_pid,
                    pid,
                    started_ms,
                    started_boot_ms,
                    exited_ms,
                    exited_boot_ms,
                    outcome,
                    tag,
                }
            }
            other => return Err(bad(other, "running or exited")),
        };
        match tokens.next() {
            None => Ok(status),
            Some(extra) => Err(bad(extra, "end of line")),
        }
    }
}

fn bad(token: &str, expected: &str) -> ProtoError {
    ProtoError {
        token: token.to_owned(),
        expected: expected.to_owned(),
    }
}

/// Takes the next token, which must be `key=<value>` with a value that parses as `T`.
fn field<'a, T: FromStr>(
    tokens: &mut impl Iterator<Item = &'a str>,
    key: &str,
) -> Result<T, ProtoError> {
    let token = tokens.next().unwrap_or("<end of line>");
    token
        .strip_prefix(key)
        .and_then(|rest| rest.strip_prefix('='))
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| bad(token, &format!("{key}=<value>")))
}

/// Takes the next token if it is `key=<value>` (a key newer shims add and older ones lack); a
/// token with that key and a bad value is an error.
fn optional<'a, T: FromStr>(
    tokens: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>,
    key: &str,
) -> Result<Option<T>, ProtoError> {
    let present = tokens
        .peek()
        .is_some_and(|t| t.strip_prefix(key).is_some_and(|r| r.starts_with('=')));
    if present {
        field(tokens, key).map(Some)
    } else {
        Ok(None)
    }
}

impl fmt::Display for Status {
    /// Writes the status line without its trailing `\n`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Running {
                shim_pid,
                pid,
                started_ms,
                started_boot_ms,
                tag,
                stopping,
            } => {
                write!(
                    f,
                    "running shim={shim_pid} pid={pid} started_ms={started_ms}"
                )?;
                if let Some(boot) = started_boot_ms {
                    write!(f, " started_boot_ms={boot}")?;
                }
                write!(f, " tag={tag}")?;
                if *stopping {
                    f.write_str(" stopping=1")?;
                }
                Ok(())
            }
            Status::Exited {
                shim_pid,
                pid,
                started_ms,
                started_boot_ms,
                exited_ms,
                exited_boot_ms,
                outcome,
                tag,
            } => {
                write!(
                    f,
                    "exited shim={shim_pid} pid={pid} started_ms={started_ms}"
                )?;
                if let Some(boot) = started_boot_ms {
                    write!(f, " started_boot_ms={boot}")?;
                }
                write!(f, " exited_ms={exited_ms}")?;
                if let Some(boot) = exited_boot_ms {
                    write!(f, " exited_boot_ms={boot}")?;
                }
                f.write_str(" ")?;
                match outcome {
                    Outcome::Code(code) => write!(f, "code={code}")?,
                    Outcome::Signal(signal) => write!(f, "signal={signal}")?,
                }
                write!(f, " tag={tag}")
            }
        }
    }
}

/// One command on the shim's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `status`
    Status,
    /// `wait`
    Wait,
    /// `signal <signum>`: to the child (the group leader) only.
    Signal(i32),
    /// `signal-group <signum>`: to the child's whole process group.
    SignalGroup(i32),
    /// `stop <signum> <grace_ms>`
    Stop {
        /// Sent to the child (leader only) at once.
        signum: i32,
        /// After this long, SIGKILL goes to the whole group.
        grace_ms: u64,
    },
    /// `release`
    Release,
}

impl Command {
    /// Parses one command line (without its `\n`). The error is the message the shim answers after
    /// `error `.
    pub fn parse(line: &str) -> Result<Command, String> {
        let mut words = line.split(' ');
        let verb = words.next().unwrap_or("");
        let args: Vec<&str> = words.collect();
        let usage = |usage: &str| format!("usage: {usage}");
        let command = match (verb, args.as_slice()) {
            ("status", []) => Command::Status,
            ("wait", []) => Command::Wait,
            ("release", []) => Command::Release,
            ("signal", [signum]) => Command::Signal(parse_signal(signum)?),
            ("signal-group", [signum]) => Command::SignalGroup(parse_signal(signum)?),
            ("stop", [signum, grace_ms]) => Command::Stop {
                signum: parse_signal(signum)?,
                grace_ms: grace_ms
                    .parse()
                    .map_err(|_| format!("bad grace_ms: {grace_ms}"))?,
            },
            ("status" | "wait" | "release", _) => return Err(usage(verb)),
            ("signal", _) => return Err(usage("signal <signum>")),
            ("signal-group", _) => return Err(usage("signal-group <signum>")),
            ("stop", _) => return Err(usage("stop <signum> <grace_ms>")),
            _ => return Err(format!("unknown command: {line}")),
        };
        Ok(command)
    }
}

fn parse_signal(word: &str) -> Result<i32, String> {
    match word.parse::<i32>() {
        Ok(n) if (0..=MAX_SIGNAL).contains(&n) => Ok(n),
        _ => Err(format!("bad signal number: {word}")),
    }
}

impl fmt::Display for Command {
    /// Writes the command line without its trailing `\n`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Status => f.write_str("status"),
            Command::Wait => f.write_str("wait"),
            Command::Release => f.write_str("release"),
            Command::Signal(signum) => write!(f, "signal {signum}"),
            Command::SignalGroup(signum) => write!(f, "signal-group {signum}"),
            Command::Stop { signum, grace_ms } => write!(f, "stop {signum} {grace_ms}"),
        }
    }
}

/// Parses the one line a starting shim writes on its stdout: `ok shim=<pid> pid=<pid>` gives
/// `(shim pid, child pid)`; `error <message>` gives the message. An empty string (the shim closed its
/// stdout without a line) or anything else is an error too.
pub fn parse_handshake(line: &str) -> Result<(u32, u32), String> {
    let line = line.trim_end_matches(['\n', '\r']);
    if line.is_empty() {
        return Err("shim exited without a handshake line".to_owned());
    }
    if let Some(message) = line.strip_prefix("error ") {
        return Err(message.to_owned());
    }
    let parsed = line.strip_prefix("ok shim=").and_then(|rest| {
        let (shim, pid) = rest.split_once(" pid=")?;
        Some((shim.parse().ok()?, pid.parse().ok()?))
    });
    parsed.ok_or_else(|| format!("bad handshake line from shim: {line:?}"))
}

/// Formats the handshake line the shim writes on success (without `\n`).
pub fn format_handshake(shim_pid: u32, pid: u32) -> String {
    format!("ok shim={shim_pid} pid={pid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(stopping: bool) -> Status {
        Status::Running {
            shim_pid: 10,
            pid: 11,
            started_ms: 1_700_000_000_123,
            started_boot_ms: None,
            tag: "build-7".into(),
            stopping,
        }
    }

    fn exited(outcome: Outcome) -> Status {
        Status::Exited {
            shim_pid: 10,
            pid: 11,
            started_ms: 1,
            started_boot_ms: None,
            exited_ms: 2,
            exited_boot_ms: None,
            outcome,
            tag: "-".into(),
        }
    }

    #[test]
    fn status_lines_round_trip() {
        let cases = [
            (
                running(false),
                "running shim=10 pid=11 started_ms=1700000000123 tag=build-7",
            ),
            (
                running(true),
                "running shim=10 pid=11 started_ms=1700000000123 tag=build-7 stopping=1",
            ),
            (
                exited(Outcome::Code(3)),
                "exited shim=10 pid=11 started_ms=1 exited_ms=2 code=3 tag=-",
            ),
            (
                exited(Outcome::Code(-1)),
                "exited shim=10 pid=11 started_ms=1 exited_ms=2 code=-1 tag=-",
            ),
            (
                exited(Outcome::Signal(9)),
                "exited shim=10 pid=11 started_ms=1 exited_ms=2 signal=9 tag=-",
            ),
        ];
        for (status, line) in cases {
            assert_eq!(status.to_string(), line);
            assert_eq!(Status::parse(line), Ok(status.clone()), "{line}");
            assert_eq!(Status::parse(&format!("{line}\n")), Ok(status), "{line}");
        }
    }

    /// Boot-clock times are written by shims since issue 10 and are optional when read, so a
    /// brain adopts shims that were started by an older version.
    #[test]
    fn boot_clock_times_round_trip_and_may_be_missing() {
        let running = Status::Running {
            shim_pid: 10,
            pid: 11,
            started_ms: 5,
            started_boot_ms: Some(7),
            tag: "t".into(),
            stopping: true,
        };
        let line = "running shim=10 pid=11 started_ms=5 started_boot_ms=7 tag=t stopping=1";
        assert_eq!(running.to_string(), line);
        assert_eq!(Status::parse(line), Ok(running));
        let exited = Status::Exited {
            shim_pid: 10,
            pid: 11,
            started_ms: 5,
            started_boot_ms: Some(7),
            exited_ms: 6,
            exited_boot_ms: Some(3_600_007),
            outcome: Outcome::Code(1),
            tag: "t".into(),
        };
        let line = "exited shim=10 pid=11 started_ms=5 started_boot_ms=7 exited_ms=6 exited_boot_ms=3600007 code=1 tag=t";
        assert_eq!(exited.to_string(), line);
        assert_eq!(Status::parse(line), Ok(exited));
        let err = Status::parse("running shim=1 pid=2 started_ms=3 started_boot_ms=x tag=a")
            .expect_err("a bad boot time");
        assert_eq!(err.token, "started_boot_ms=x");
    }

    #[test]
    fn bad_status_lines_name_the_token() {
        let cases = [
            ("", ""),
            ("sleeping shim=1", "sleeping"),
            ("running shim=x pid=2 started_ms=3 tag=a", "shim=x"),
            ("running pid=2 shim=1 started_ms=3 tag=a", "pid=2"),
            ("running shim=1 pid=2 started_ms=3", "<end of line>"),
            (
                "running shim=1 pid=2 started_ms=3 tag=a stopping=0",
                "stopping=0",
            ),
            (
                "running shim=1 pid=2 started_ms=3 tag=a stopping=1 more",
                "more",
            ),
            (
                "exited shim=1 pid=2 started_ms=3 exited_ms=4 tag=a",
                "tag=a",
            ),
            (
                "exited shim=1 pid=2 started_ms=3 exited_ms=4 code=z tag=a",
                "code=z",
            ),
            (
                "exited shim=1 pid=2 started_ms=3 exited_ms=4 code=1 signal=2 tag=a",
                "signal=2",
            ),
        ];
        for (line, token) in cases {
            let err = Status::parse(line).expect_err(line);
            assert_eq!(err.token, token, "{line}: {err}");
        }
    }

    #[test]
    fn commands_round_trip() {
        let cases = [
            (Command::Status, "status"),
            (Command::Wait, "wait"),
            (Command::Release, "release"),
            (Command::Signal(15), "signal 15"),
            (Command::SignalGroup(9), "signal-group 9"),
            (
                Command::Stop {
                    signum: 15,
                    grace_ms: 10_000,
                },
                "stop 15 10000",
            ),
        ];
        for (command, line) in cases {
            assert_eq!(command.to_string(), line);
            assert_eq!(Command::parse(line), Ok(command));
        }
    }

    #[test]
    fn bad_commands_get_a_message() {
        let cases = [
            ("frobnicate", "unknown command: frobnicate"),
            ("", "unknown command: "),
            ("status now", "usage: status"),
            ("signal", "usage: signal <signum>"),
            ("signal 65", "bad signal number: 65"),
            ("signal -1", "bad signal number: -1"),
            ("signal-group TERM", "bad signal number: TERM"),
            ("stop 15", "usage: stop <signum> <grace_ms>"),
            ("stop 15 soon", "bad grace_ms: soon"),
        ];
        for (line, message) in cases {
            assert_eq!(Command::parse(line), Err(message.to_owned()), "{line}");
        }
    }

    #[test]
    fn handshakes() {
        assert_eq!(parse_handshake("ok shim=5 pid=6\n"), Ok((5, 6)));
        assert_eq!(parse_handshake(&format_handshake(7, 8)), Ok((7, 8)));
        assert_eq!(
            parse_handshake("error busy: instance api/0 already has a shim (pid 9)\n"),
            Err("busy: instance api/0 already has a shim (pid 9)".to_owned())
        );
        assert!(parse_handshake("").is_err());
        assert!(parse_handshake("ok shim=5").is_err());
        assert!(parse_handshake("ok shim=5 pid=x").is_err());
    }
}
