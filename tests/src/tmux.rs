//! A terminal for tests of full-screen verbs (`sluice watch`): a detached tmux session of a given
//! size on a tmux server of its own (`tmux -L <unique>`), keys sent with `send-keys`, the screen
//! read with `capture-pane -p`; the server is killed on drop.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{Out, fixtures, run_bounded};

/// How long one tmux command may take.
const TMUX_TIMEOUT: Duration = Duration::from_secs(20);
/// Interval of [`Tmux::wait_screen`] polls.
const SCREEN_POLL: Duration = Duration::from_millis(200);

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// One tmux server with one session running a command.
pub struct Tmux {
    /// The server's socket name (`tmux -L`), unique to this test process and session.
    socket: String,
}

impl Tmux {
    /// Starts `command` (a shell command line) in a detached `width`×`height` session. `None` when
    /// tmux is missing outside CI.
    #[track_caller]
    pub fn start(width: u16, height: u16, command: &str) -> Option<Tmux> {
        if !fixtures::require("tmux", tmux_binary().is_some()) {
            return None;
        }
        let socket = format!(
            "sluice-test-{}-{}",
            std::process::id(),
            SESSIONS.fetch_add(1, Ordering::Relaxed)
        );
        let tmux = Tmux { socket };
        let (w, h) = (width.to_string(), height.to_string());
        tmux.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            &w,
            "-y",
            &h,
            command,
        ])
        .success();
        Some(tmux)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(tmux_binary().expect("checked when started"));
        cmd.arg("-L").arg(&self.socket).args(args);
        // The session's programs see a terminal tmux describes, whatever the test runs under.
        cmd.env("TERM", "xterm-256color");
        cmd.env_remove("TMUX");
        cmd
    }

    /// Runs `tmux -L <socket> args…`.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Out {
        run_bounded(self.command(args), TMUX_TIMEOUT).unwrap_or_else(|e| panic!("tmux: {e}"))
    }

    /// `send-keys` to the session: tmux key names (`Enter`, `Escape`, `Down`, `q`, `C-c`).
    #[track_caller]
    pub fn send_keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "0"];
        args.extend_from_slice(keys);
        self.run(&args).success();
    }

    /// The screen's text now, one string per line.
    #[track_caller]
    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "0"])
            .success()
            .stdout
    }

    /// A tmux format of the pane (`#{alternate_on}`, `#{cursor_flag}`).
    #[track_caller]
    pub fn pane_format(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "0", format])
            .success()
            .stdout
            .trim()
            .to_owned()
    }

    /// Polls the screen until `cond` holds and returns it; fails with the last screen after
    /// `timeout`.
    #[track_caller]
    pub fn wait_screen(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if cond(&screen) {
                return screen;
            }
            if Instant::now() >= deadline {
                panic!("the screen never showed {what} within {timeout:?}; last screen:\n{screen}");
            }
            std::thread::sleep(SCREEN_POLL);
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = run_bounded(self.command(&["kill-server"]), TMUX_TIMEOUT);
    }
}

fn tmux_binary() -> Option<PathBuf> {
    ["/usr/bin/tmux", "/usr/local/bin/tmux", "/bin/tmux"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The cell under column `header` of the line of `row` (the first line whose first word, after a
/// selection mark, is `row`), cut at the next space; `None` when the screen has no such column or
/// row.
pub fn cell<'a>(screen: &'a str, header: &str, row: &str) -> Option<&'a str> {
    let head = screen.lines().find(|l| {
        l.contains(header) && l.trim_start().starts_with(|c: char| c.is_ascii_uppercase())
    })?;
    let at = head.find(header)?;
    let line = screen
        .lines()
        .find(|l| l.trim_start_matches(['>', ' ']).split_whitespace().next() == Some(row))?;
    let rest = line.get(at..)?;
    rest.split_whitespace().next()
}
