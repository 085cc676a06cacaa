//! Network namespaces as test hosts: each test gets its own loopback and its own iptables, so
//! tests run in parallel and never touch the host's rules. Deleted on drop.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    pub name: String,
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Netns {
    /// The namespace's counters of connections its listeners dropped (`/proc/net/netstat` read from
    /// inside it): a SYN dropped on a full accept queue is retransmitted a second later to the same
    /// instance (conntrack keeps its first destination), which may have stopped by then.
    pub fn listen_counters(&self) -> std::collections::BTreeMap<String, u64> {
        const WANTED: [&str; 3] = ["ListenOverflows", "ListenDrops", "TCPReqQFullDrop"];
        let text = self
            .command("cat")
            .arg("/proc/net/netstat")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut out = std::collections::BTreeMap::new();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            if !names.starts_with("TcpExt:") {
                continue;
            }
            for (name, value) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                if WANTED.contains(&name) {
                    out.insert(name.to_owned(), value.parse().unwrap_or(0));
                }
            }
        }
        out
    }

    /// Creates a namespace with its loopback up. Needs root.
    pub fn new() -> Netns {
        let name = format!(
            "sl{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        run(
            "ip",
            &["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"],
        );
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Moves the calling thread into the namespace (only this thread: namespaces are per thread).
    pub fn enter_current_thread(&self) {
        let file = std::fs::File::open(format!("/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("open /run/netns/{}: {e}", self.name));
        // SAFETY: setns on a descriptor we own; it changes only the calling thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// Runs `f` on a new thread inside the namespace and returns its result (the calling thread
    /// stays where it is).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in_named(&self.name, f)
    }

    /// `iptables-save -t nat` (or ip6tables) inside the namespace, without its comment lines
    /// (they carry timestamps).
    pub fn nat_rules(&self, v6: bool) -> String {
        self.nat_rules_with("", v6)
    }

    /// The same with an explicit implementation: `nft`, `legacy`, or `""` for the system default.
    pub fn nat_rules_with(&self, variant: &str, v6: bool) -> String {
        let family = if v6 { "ip6tables" } else { "iptables" };
        let tool = if variant.is_empty() {
            format!("{family}-save")
        } else {
            format!("{family}-{variant}-save")
        };
        let tool = tool.as_str();
        let out = self
            .command(tool)
            .args(["-t", "nat"])
            .output()
            .expect("iptables-save runs");
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// Runs a command inside the namespace and asserts it succeeds.
    pub fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .expect("command runs");
        assert!(
            out.status.success(),
            "{program} {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `f` on a new thread inside the namespace called `name` (which someone else owns).
pub fn run_in_named<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_named(name);
                f()
            })
            .join()
            .expect("the thread inside the namespace panicked")
    })
}

/// Moves the calling thread into the namespace called `name` (which someone else owns).
pub fn enter_named(name: &str) {
    let file = std::fs::File::open(format!("/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("open /run/netns/{name}: {e}"));
    // SAFETY: setns on a descriptor we own; it changes only the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {name}: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("command runs");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
