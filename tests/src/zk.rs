//! The one ZooKeeper test-server harness: real servers of Debian's package (`zkServer.sh`), each
//! with its own `zoo.cfg`, data dir and ports, started, stopped, crashed and killed on drop. Used by
//! the fleet tests (an ensemble inside the hub namespace), the `sluice` crate's coordination tests
//! (one standalone server on loopback) and the deploy benchmark.
//!
//! ```no_run
//! # use sluice_tests::zk::Zookeeper;
//! let Some(zk) = Zookeeper::loopback() else { return }; // skips outside CI when not installed
//! let connect = zk.connect_string(); // 127.0.0.1:PORT/sluice
//! zk.stop(0); // an outage, keeping the data
//! zk.start(0);
//! zk.wait_serving(std::time::Duration::from_secs(30));
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::run_in_named;
use crate::{Out, PATIENCE, free_port_base, procs, run_bounded};

/// Where Debian's package puts `zkServer.sh` and `zkCli.sh`.
pub const ZK_BIN: &str = "/usr/share/zookeeper/bin";
/// ZooKeeper's chroot for sluice.
pub const ZK_CHROOT: &str = "/sluice";
/// Small JVMs: three servers and the tests share two cores.
pub const TEST_SERVER_JVMFLAGS: &str = "-Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1";
/// The client JVM of `zkCli.sh`.
const CLIENT_JVMFLAGS: &str = "-Xmx64m -XX:+UseSerialGC -XX:TieredStopAtLevel=1";
/// Limit of one `zkServer.sh`/`zkCli.sh` run.
const ZK_SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit of connecting to a server for a four-letter word.
const FOUR_LETTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Limit of reading a four-letter word's answer.
const FOUR_LETTER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`Zookeeper::loopback`] waits for its server to serve.
const LOOPBACK_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether ZooKeeper is installed here.
pub fn installed() -> bool {
    Path::new(ZK_BIN).join("zkServer.sh").is_file()
}

/// Where the servers listen.
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    /// This process's network namespace, on 127.0.0.1, on ports free when the servers are made.
    Loopback,
    /// Inside the network namespace `name`, on `addr`: server `i` has client port
    /// `first_port + i`, peer port `2888 + i` and election port `3888 + i`.
    Netns {
        name: &'a str,
        addr: &'a str,
        first_port: u16,
    },
}

/// Peer (quorum) port of server `i` inside a namespace is this plus `i`.
const NETNS_PEER_PORT: u16 = 2888;
/// Leader election port of server `i` inside a namespace is this plus `i`.
const NETNS_ELECTION_PORT: u16 = 3888;

/// One server of the ensemble.
struct Server {
    cfg: PathBuf,
    data: PathBuf,
    port: u16,
}

/// A standalone ZooKeeper server or an ensemble, killed when dropped.
pub struct Zookeeper {
    /// The namespace the servers run in; `None`: this process's.
    netns: Option<String>,
    addr: String,
    servers: Vec<Server>,
    server_jvmflags: String,
    /// Where the servers log (`ZOO_LOG_DIR`, at INFO into rolling files); the package's default
    /// place at WARN when `None`.
    log_dir: Option<PathBuf>,
    /// The temporary directory of a [`Zookeeper::loopback`] server, removed after the servers
    /// are killed.
    _temp: Option<tempfile::TempDir>,
}

impl Zookeeper {
    /// Writes each server's `zoo.cfg`, `myid` and data dir under `dir`; starts nothing.
    pub fn new(place: Place<'_>, dir: &Path, n: usize) -> Zookeeper {
        assert!(n > 0, "a ZooKeeper of no server");
        let count = u16::try_from(n).expect("a handful of servers");
        let (netns, addr, client, peer, election) = match place {
            Place::Loopback => {
                let base = free_port_base(3 * count);
                (None, "127.0.0.1", base, base + count, base + 2 * count)
            }
            Place::Netns {
                name,
                addr,
                first_port,
            } => (
                Some(name.to_owned()),
                addr,
                first_port,
                NETNS_PEER_PORT,
                NETNS_ELECTION_PORT,
            ),
        };
        let servers = (0..count)
            .map(|i| {
                let home = dir.join(format!("zk{}", i + 1));
                let data = home.join("data");
                std::fs::create_dir_all(&data).expect("creating a ZooKeeper data dir");
                std::fs::write(data.join("myid"), format!("{}\n", i + 1)).expect("myid");
                let port = client + i;
                let mut cfg = format!(
                    "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\nclientPortAddress={addr}\nadmin.enableServer=false\n4lw.commands.whitelist=srvr,ruok,cons,crst,wchs,mntr\nmaxClientCnxns=0\nmaxSessionTimeout=30000\n",
                    data.display()
                );
                if n > 1 {
                    for j in 0..count {
                        cfg += &format!(
                            "server.{}={addr}:{}:{}\n",
                            j + 1,
                            peer + j,
                            election + j
                        );
                    }
                }
                let cfg_path = home.join("zoo.cfg");
                std::fs::write(&cfg_path, cfg).expect("writing zoo.cfg");
                Server {
                    cfg: cfg_path,
                    data,
                    port,
                }
            })
            .collect();
        Zookeeper {
            netns,
            addr: addr.to_owned(),
            servers,
            server_jvmflags: TEST_SERVER_JVMFLAGS.to_owned(),
            log_dir: None,
            _temp: None,
        }
    }

    /// One standalone server on loopback in a temporary directory, started and serving. `None`
    /// (after saying so) when ZooKeeper is not installed; under `CI=true` that is a failure.
    #[track_caller]
    pub fn loopback() -> Option<Zookeeper> {
        if !installed() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "zookeeper missing: {ZK_BIN}/zkServer.sh (install the Debian package `zookeeper`)"
            );
            eprintln!("skipping: zookeeper missing ({ZK_BIN}/zkServer.sh)");
            return None;
        }
        let temp = tempfile::tempdir().expect("a temporary directory");
        let mut zk = Zookeeper::new(Place::Loopback, temp.path(), 1);
        zk._temp = Some(temp);
        zk.start(0);
        zk.wait_serving(LOOPBACK_UP_TIMEOUT);
        Some(zk)
    }

    /// The servers' JVM flags from the next start on (default [`TEST_SERVER_JVMFLAGS`]).
    pub fn set_server_jvmflags(&mut self, flags: &str) {
        flags.clone_into(&mut self.server_jvmflags);
    }

    /// Logs the servers at INFO into rolling files in `dir` from the next start on.
    pub fn set_log_dir(&mut self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("creating the ZooKeeper log dir");
        self.log_dir = Some(dir.to_owned());
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Server `i`'s data directory (`myid`, `version-2/` with snapshots and transaction logs).
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.servers[i].data
    }

    /// Server `i`'s client port.
    pub fn port(&self, i: usize) -> u16 {
        self.servers[i].port
    }

    /// `ADDR:PORT,…/sluice`: every server, then the chroot.
    pub fn connect_string(&self) -> String {
        format!("{}{ZK_CHROOT}", self.servers_string())
    }

    /// `ADDR:PORT,…`: every server, no chroot.
    pub fn servers_string(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("{}:{}", self.addr, s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn script(&self, script: &str, args: &[&str]) -> Out {
        let program = Path::new(ZK_BIN).join(script);
        let mut cmd = match &self.netns {
            Some(name) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", name]).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .env("SERVER_JVMFLAGS", &self.server_jvmflags)
            .env("CLIENT_JVMFLAGS", CLIENT_JVMFLAGS)
            .env("JMXDISABLE", "true");
        match &self.log_dir {
            Some(dir) => cmd
                .env("ZOO_LOG_DIR", dir)
                .env("ZOO_LOG4J_PROP", "INFO,ROLLINGFILE"),
            None => cmd.env("ZOO_LOG4J_PROP", "WARN,CONSOLE"),
        };
        run_bounded(cmd, ZK_SCRIPT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The pid of server `i` from its pid file, if it is alive.
    pub fn pid(&self, i: usize) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.servers[i].data.join("zookeeper_server.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        procs::is_live(pid).then_some(pid)
    }

    /// `zkServer.sh start` of server `i` (0-based); returns once the JVM runs.
    #[track_caller]
    pub fn start(&self, i: usize) {
        let cfg = self.servers[i].cfg.to_string_lossy().into_owned();
        let out = self.script("zkServer.sh", &["start", &cfg]);
        assert!(
            out.code == Some(0) && self.pid(i).is_some(),
            "starting ZooKeeper server {i}: {out}"
        );
    }

    /// `zkServer.sh stop` of server `i` (an outage that keeps the data), then waits until its
    /// JVM is gone, so that a start can bind its ports again.
    #[track_caller]
    pub fn stop(&self, i: usize) {
        let pid = self.pid(i);
        let cfg = self.servers[i].cfg.to_string_lossy().into_owned();
        let out = self.script("zkServer.sh", &["stop", &cfg]);
        assert_eq!(out.code, Some(0), "stopping ZooKeeper server {i}: {out}");
        if let Some(pid) = pid {
            let deadline = Instant::now() + PATIENCE;
            while procs::is_live(pid) {
                assert!(
                    Instant::now() < deadline,
                    "ZooKeeper server {i} (pid {pid}) did not stop"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILLs server `i` (a crash rather than a stop).
    pub fn kill(&self, i: usize) {
        if let Some(pid) = self.pid(i) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our server's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            while procs::is_live(pid) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_file(self.servers[i].data.join("zookeeper_server.pid"));
    }

    /// SIGKILLs every server at once: the ensemble is gone in an instant.
    pub fn kill_all(&self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }

    pub fn start_all(&self) {
        for i in 0..self.servers.len() {
            self.start(i);
        }
    }

    pub fn stop_all(&self) {
        for i in 0..self.servers.len() {
            self.stop(i);
        }
    }

    /// A four-letter word (`srvr`, `ruok`) to server `i`, from inside its namespace; `None` when
    /// it does not answer.
    pub fn four_letter(&self, i: usize, word: &str) -> Option<String> {
        let addr: SocketAddr = format!("{}:{}", self.addr, self.servers[i].port)
            .parse()
            .expect("an address");
        let ask = || {
            let mut s = TcpStream::connect_timeout(&addr, FOUR_LETTER_CONNECT_TIMEOUT).ok()?;
            s.set_read_timeout(Some(FOUR_LETTER_READ_TIMEOUT)).ok();
            s.write_all(word.as_bytes()).ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text)
        };
        match &self.netns {
            Some(name) => run_in_named(name, ask),
            None => ask(),
        }
    }

    /// Server `i`'s mode (`leader`, `follower`, `standalone`), `None` when it is down or not
    /// serving (no quorum). What `zkServer.sh status` prints as `Mode:`, without starting a JVM.
    pub fn mode(&self, i: usize) -> Option<String> {
        let text = self.four_letter(i, "srvr")?;
        text.lines()
            .find_map(|l| l.strip_prefix("Mode:"))
            .map(|m| m.trim().to_owned())
    }

    /// The index of the leader (or the standalone server); waits for an election, bounded.
    #[track_caller]
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            for i in 0..self.servers.len() {
                if matches!(self.mode(i).as_deref(), Some("leader" | "standalone")) {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no ZooKeeper leader within {:?}",
                PATIENCE * 2
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a majority serves: a leader (or the standalone server) and enough followers.
    #[track_caller]
    pub fn wait_serving(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let majority = self.servers.len() / 2 + 1;
        loop {
            let modes: Vec<Option<String>> =
                (0..self.servers.len()).map(|i| self.mode(i)).collect();
            let serving = modes.iter().flatten().count();
            let leader = modes
                .iter()
                .flatten()
                .any(|m| m == "leader" || m == "standalone");
            if leader && serving >= majority {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ZooKeeper has no quorum within {timeout:?}: modes {modes:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Zookeeper::wait_serving`], then checks with `zkCli.sh ls /` that a client gets answers.
    #[track_caller]
    pub fn wait_quorum(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.wait_serving(timeout);
        // Retried: a server that just joined may still be syncing.
        loop {
            let out = self.cli(&["ls", "/"]);
            if out.code == Some(0) && out.stdout.contains("zookeeper") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ZooKeeper quorum does not answer `zkCli.sh ls /` within {timeout:?}: {out}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `zkCli.sh -server <all servers> args…` inside the namespace (paths are absolute: no
    /// chroot).
    pub fn cli(&self, args: &[&str]) -> Out {
        let servers = self.servers_string();
        let mut all = vec!["-server", servers.as_str()];
        all.extend_from_slice(args);
        self.script("zkCli.sh", &all)
    }
}

impl Drop for Zookeeper {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}
