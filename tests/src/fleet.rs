//! A fleet of sluice hosts for the deploy tests: network namespaces joined by a bridge, a real
//! ZooKeeper ensemble, a static HTTP build store that counts what it serves, build tarballs (good
//! and malicious ones), and one [`Host`] per namespace.
//!
//! ```text
//!   hub netns: br0 10.199.0.1/24, ZooKeeper :2181.. (peers :2888.., :3888..), builds on :8000
//!     ├─ veth ── h1 netns: eth0 10.199.0.11/24, sluice daemon, instances, iptables
//!     ├─ veth ── h2 netns: eth0 10.199.0.12/24
//!     └─ ...
//! ```
//!
//! Only namespaces the test made get these addresses; everything (servers, namespaces, files)
//! goes when the [`Fleet`] is dropped.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::{Netns, run_in_named};
use crate::zk::Place;
pub use crate::zk::{ZK_CHROOT, Zookeeper};
use crate::{Host, Out, PATIENCE, fixtures, require_root, run_bounded};

/// The hub's address on the bridge: ZooKeeper and the build store listen here.
pub const HUB_ADDR: &str = "10.199.0.1";
/// Port of the build store.
pub const HTTP_PORT: u16 = 8000;
/// Client port of ZooKeeper server `i` is this plus `i`.
pub const ZK_CLIENT_PORT: u16 = 2181;
/// Session timeout written into every host file (unless [`Fleet::new_with`] names another).
pub const SESSION_TIMEOUT_MS: u64 = 4000;
/// Limit of one request to or from the hub made by the harness itself.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What kind of fleet a test needs.
#[derive(Debug, Clone, Copy)]
pub struct FleetOptions {
    /// Host namespaces, named `h1`…`hN`.
    pub hosts: usize,
    /// ZooKeeper servers: 0 (hosts use the `local` backend), 1 (standalone) or 3 (an ensemble).
    pub zookeepers: usize,
}

/// Link rates and latency set with `tc` on the fleet's own veths ([`Fleet::shape_links`]).
#[derive(Debug, Clone, Copy)]
pub struct LinkShape {
    /// Each host's rate in bits per second, both directions (upload and download).
    pub host_rate_bits: u64,
    /// Each host's one-way added delay in microseconds, both directions.
    pub host_delay_us: u64,
    /// The store's (hub's) uplink in bits per second: everything the hub itself sends on `br0`
    /// (build store and ZooKeeper), not what the bridge forwards between hosts.
    pub store_rate_bits: u64,
}

/// The offline wheel directory for `stock:python-venv` (`SLUICE_WHEEL_DIR`): `SLUICE_TEST_WHEELS`,
/// else `target/test-wheels` (`scripts/test-all.sh` fills it with `pip download`). `None` (after
/// saying so, or failing in CI) when it is missing.
pub fn wheel_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("SLUICE_TEST_WHEELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-wheels"));
    let has_gunicorn = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("gunicorn-"));
    let what = format!(
        "gunicorn wheels in {} (`target/test-venv/bin/pip download -d target/test-wheels 'gunicorn==27.*'`)",
        dir.display()
    );
    if !fixtures::require(&what, has_gunicorn) {
        return None;
    }
    Some(dir.canonicalize().unwrap_or(dir))
}

/// The service file of a build-deployed WSGI service `py` (2 instances on 9100.., front 9000,
/// `drain`, http health, `stock:python-venv` offline). `build_extra` goes into `[build]`.
pub fn py_service(wheels: &Path, build_extra: &str) -> String {
    format!(
        r#"command = ["{{release_dir}}/.venv/bin/gunicorn", "--bind", "127.0.0.1:{{port}}", "--workers", "1", "--worker-class", "gthread", "--threads", "4", "--keep-alive", "5", "--graceful-timeout", "5", "--chdir", "{{release_dir}}", "app:app"]
instances = 2
port_base = 9100
front_port = 9000
stop_grace_ms = 6000
env = {{ INSTANCE = "{{instance}}" }}
[build]
source = "http://{HUB_ADDR}:{HTTP_PORT}/py/{{build}}.tar.gz"
keep_releases = 3
{build_extra}
[hooks]
post_install = [["stock:python-venv"]]
env = {{ SLUICE_WHEEL_DIR = "{wheels}", SLUICE_PYTHON = "{python}" }}
[restart]
strategy = "drain"
drain_timeout_ms = 3000
[health]
http = "/health"
start_timeout_ms = 20000
"#,
        wheels = wheels.display(),
        python = system_python().display(),
    )
}

/// The service file of a light build-deployed service `svc` for fleets of many hosts: one
/// instance of Python's own file server over the release (port 9100, no hooks, no steering),
/// healthy once it serves the build's `BUILD` file; restarted all at once.
pub fn light_service(svc: &str) -> String {
    format!(
        r#"command = ["{python}", "-m", "http.server", "{{port}}", "--bind", "127.0.0.1", "--directory", "{{release_dir}}"]
instances = 1
port_base = 9100
stop_grace_ms = 2000
[build]
source = "http://{HUB_ADDR}:{HTTP_PORT}/{svc}/{{build}}.tar.gz"
keep_releases = 3
[restart]
strategy = "all-at-once"
[health]
http = "/BUILD"
start_timeout_ms = 20000
"#,
        python = system_python().display(),
    )
}

/// The interpreter the venvs are made with: Debian's, else `python3` on `PATH`.
pub fn system_python() -> PathBuf {
    let debian = Path::new("/usr/bin/python3");
    if debian.is_file() {
        debian.to_owned()
    } else {
        PathBuf::from("python3")
    }
}

/// One sluice host of the fleet: a [`Host`] whose daemon and CLI run in the host's namespace.
pub struct FleetHost {
    /// `h1`, `h2`, …: the name in ZooKeeper (`coordination.host`).
    pub name: String,
    /// Its address on the bridge.
    pub addr: String,
    pub host: Host,
    /// Name of its namespace (owned by the [`Fleet`]).
    pub netns: String,
}

impl std::ops::Deref for FleetHost {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
    }
}

impl FleetHost {
    /// `GET path` on `port` of this host's loopback, from inside its namespace.
    pub fn get(&self, port: u16, path: &str) -> Result<(u16, String), String> {
        run_in_named(&self.netns, || {
            http_get(([127, 0, 0, 1], port).into(), path)
        })
    }
}

/// The whole fleet. Fields drop in declaration order: hosts (daemons, instances) first, then
/// ZooKeeper, the build store, the namespaces, and the files.
pub struct Fleet {
    pub hosts: Vec<FleetHost>,
    zk: Option<Zookeeper>,
    http: FileServer,
    host_ns: Vec<Netns>,
    hub: Netns,
    builds: Builds,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Builds the network, starts ZooKeeper (and waits for its quorum) and the build store, and
    /// writes each host's host file; no daemon runs yet. `None` when the test must skip (not root,
    /// or Java/ZooKeeper/wheels missing outside CI).
    pub fn new(opts: FleetOptions) -> Option<Fleet> {
        Fleet::new_with(opts, SESSION_TIMEOUT_MS, &|_| String::new())
    }

    /// [`Fleet::new`] with each host's `coordination.session_timeout_ms`, and with
    /// `host_extra(i)` (0-based) added to host `i`'s host file before its `[coordination]`
    /// table: top-level keys first (`rack = …`), then tables (`[peers]`).
    pub fn new_with(
        opts: FleetOptions,
        session_timeout_ms: u64,
        host_extra: &dyn Fn(usize) -> String,
    ) -> Option<Fleet> {
        assert!(opts.hosts >= 1 && opts.hosts <= 200);
        assert!(
            matches!(opts.zookeepers, 0 | 1 | 3),
            "1 or 3 ZooKeeper servers"
        );
        if !require_root() {
            return None;
        }
        if opts.zookeepers > 0 {
            let zk = crate::zk::installed();
            if !fixtures::require("ZooKeeper (Debian's zookeeper package)", zk) {
                return None;
            }
            if !fixtures::require("java", Path::new("/usr/bin/java").is_file()) {
                return None;
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("sluice-fleet-")
            .tempdir()
            .expect("creating a temp dir");
        let hub = Netns::new();
        hub.run("ip", &["link", "add", "br0", "type", "bridge"]);
        hub.run(
            "ip",
            &["addr", "add", &format!("{HUB_ADDR}/24"), "dev", "br0"],
        );
        hub.run("ip", &["link", "set", "br0", "up"]);
        let mut host_ns = Vec::new();
        for i in 1..=opts.hosts {
            let ns = Netns::new();
            let hub_end = format!("v{i}");
            hub.run(
                "ip",
                &[
                    "link", "add", &hub_end, "type", "veth", "peer", "name", "eth0", "netns",
                    &ns.name,
                ],
            );
            hub.run("ip", &["link", "set", &hub_end, "master", "br0"]);
            hub.run("ip", &["link", "set", &hub_end, "up"]);
            ns.run(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("10.199.0.{}/24", 10 + i),
                    "dev",
                    "eth0",
                ],
            );
            ns.run("ip", &["link", "set", "eth0", "up"]);
            host_ns.push(ns);
        }
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www).expect("creating the build store");
        let http = FileServer::start(&hub, ([10, 199, 0, 1], HTTP_PORT).into(), &www);
        let zk = (opts.zookeepers > 0).then(|| {
            let place = Place::Netns {
                name: &hub.name,
                addr: HUB_ADDR,
                first_port: ZK_CLIENT_PORT,
            };
            let zk = Zookeeper::new(place, &dir.path().join("zk"), opts.zookeepers);
            zk.start_all();
            zk.wait_quorum(PATIENCE * 3);
            zk
        });
        let hosts = host_ns
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let name = format!("h{}", i + 1);
                let host = Host::new().in_netns(ns);
                // A cgroup parent of its own, like every default host file: hosts of one test
                // run the same services, and instances' tracking cgroups are named after it.
                let mut file = format!(
                    "data_dir = \"data\"\nruntime_dir = \"run\"\nservices_dir = \"services\"\nallow_root = true\ncgroup_parent = \"{}\"\n",
                    host.cgroup_parent()
                );
                file += &host_extra(i);
                if let Some(zk) = &zk {
                    file += &format!(
                        "[coordination]\nbackend = \"zookeeper\"\nconnect = \"{}\"\nhost = \"{name}\"\nsession_timeout_ms = {session_timeout_ms}\n",
                        zk.connect_string()
                    );
                }
                host.write_host_file(&file);
                FleetHost {
                    addr: format!("10.199.0.{}", 11 + i),
                    name,
                    host,
                    netns: ns.name.clone(),
                }
            })
            .collect();
        let builds = Builds {
            www,
            stage: dir.path().join("stage"),
        };
        Some(Fleet {
            hosts,
            zk,
            http,
            host_ns,
            hub,
            builds,
            dir,
        })
    }

    /// Shapes the fleet's links with `tc` (`tbf` for the rate, `netem` under it for the delay,
    /// which needs the kernel's `sch_netem`: leave `host_delay_us` 0 without it), only on the veths and bridge
    /// this fleet made in its own namespaces: the host end `eth0` inside each host namespace
    /// (egress = the host's upload), the bridge end `v{i}` in the hub (egress = the host's
    /// download) and the hub's `br0` (egress = the store's uplink). The harness's own pacing of
    /// the store ([`FileServer::set_uplink`]) is switched off: tc carries the store's rate.
    pub fn shape_links(&self, shape: LinkShape) {
        // The rate: a token bucket whose burst holds a GSO packet of the veths (64 KiB) and
        // 10 ms at the rate; packets queue at most 50 ms.
        let tbf = |ns: &Netns, dev: &str, rate_bits: u64| {
            let burst = (rate_bits / 8 / 100).max(128 << 10).to_string();
            let rate = format!("{rate_bits}bit");
            ns.run(
                "tc",
                &[
                    "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf", "rate", &rate,
                    "burst", &burst, "latency", "50ms",
                ],
            );
        };
        // The delay: netem under the token bucket (needs the kernel's sch_netem).
        let delay = |ns: &Netns, dev: &str, delay_us: u64| {
            if delay_us > 0 {
                let delay = format!("{delay_us}us");
                ns.run(
                    "tc",
                    &[
                        "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
                        "delay", &delay, "limit", "10000",
                    ],
                );
            }
        };
        for (i, ns) in self.host_ns.iter().enumerate() {
            let hub_end = format!("v{}", i + 1);
            tbf(ns, "eth0", shape.host_rate_bits);
            delay(ns, "eth0", shape.host_delay_us);
            tbf(&self.hub, &hub_end, shape.host_rate_bits);
            delay(&self.hub, &hub_end, shape.host_delay_us);
        }
        tbf(&self.hub, "br0", shape.store_rate_bits);
        self.http.set_uplink(0);
    }

    /// Bytes per second of one fetch of `path` from the build store by host `i` (0-based), from
    /// inside its namespace: a check that [`Fleet::shape_links`] shapes for real.
    pub fn measure_fetch(&self, i: usize, path: &str) -> Result<f64, String> {
        let addr: SocketAddr = ([10, 199, 0, 1], HTTP_PORT).into();
        let path = path.to_owned();
        run_in_named(&self.host_ns[i].name, move || {
            let start = Instant::now();
            let (code, body) = http_get_bytes(addr, &path, PATIENCE)?;
            if code != 200 {
                return Err(format!("GET {path}: {code}"));
            }
            Ok(body.len() as f64 / start.elapsed().as_secs_f64())
        })
    }

    /// The hub namespace (ZooKeeper, build store, bridge).
    pub fn hub(&self) -> &Netns {
        &self.hub
    }

    /// Host `i` (0-based: `host(0)` is `h1`).
    pub fn host(&self, i: usize) -> &FleetHost {
        &self.hosts[i]
    }

    /// The host called `name` (`h1`…).
    pub fn by_name(&self, name: &str) -> &FleetHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// The namespace of host `i` (0-based), e.g. for a [`crate::load::Load`].
    pub fn netns(&self, i: usize) -> &Netns {
        &self.host_ns[i]
    }

    /// The ZooKeeper ensemble; panics when the fleet has none.
    pub fn zk(&self) -> &Zookeeper {
        self.zk.as_ref().expect("this fleet runs no ZooKeeper")
    }

    /// The build store.
    pub fn http(&self) -> &FileServer {
        &self.http
    }

    pub fn builds(&self) -> &Builds {
        &self.builds
    }

    /// The fleet's temp dir (build store, ZooKeeper data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the same service file on every host.
    pub fn service(&self, name: &str, toml: &str) {
        for h in &self.hosts {
            h.service(name, toml);
        }
    }

    /// Starts every host's daemon and waits until each answers.
    pub fn start_daemons(&self) {
        for h in &self.hosts {
            h.spawn_daemon(&[]);
        }
        for h in &self.hosts {
            h.wait_reachable(PATIENCE);
        }
    }

    /// A fleet verb (`deploy`, `hosts`, …) run on `h1` (its host file names ZooKeeper).
    #[track_caller]
    pub fn sluice(&self, args: &[&str]) -> Out {
        self.hosts[0].sluice(args)
    }

    /// `sluice register <svc> <build> --url --sha256`, asserting success.
    #[track_caller]
    pub fn register(&self, service: &str, build: &BuildInfo) {
        self.sluice(&[
            "register",
            service,
            &build.id,
            "--url",
            &build.url,
            "--sha256",
            &build.sha256,
        ])
        .success();
    }

    /// Registers `build` like [`Fleet::register`], then rewrites its node with the archive's
    /// `size` (which `sluice register` does not set), the bound every peer's bytes are held to.
    #[track_caller]
    pub fn register_with_size(&self, service: &str, build: &BuildInfo) {
        self.register(service, build);
        let size = std::fs::metadata(&build.file).expect("the archive").len();
        let node = format!("{ZK_CHROOT}/builds/{service}/{}", build.id);
        let meta = format!(
            r#"{{"url":"{}","sha256":"{}","size":{size}}}"#,
            build.url, build.sha256
        );
        self.zk().cli(&["set", &node, &meta]).success();
    }

    /// Serves a corrupted copy of `build` (same size, bytes flipped in its second half) as a
    /// peer would (`GET /v1/builds/<svc>/<build>`) on `HUB_ADDR:port`, and registers it as a
    /// complete peer `name` of `rack` (a persistent node: it never goes away by itself).
    #[track_caller]
    pub fn corrupt_peer(
        &self,
        service: &str,
        build: &BuildInfo,
        rack: &str,
        name: &str,
        port: u16,
    ) -> FileServer {
        let root = self.dir.path().join(format!("corrupt-{name}"));
        let dir = root.join("v1/builds").join(service);
        std::fs::create_dir_all(&dir).expect("creating the corrupt peer's dir");
        let mut bytes = std::fs::read(&build.file).expect("reading the archive");
        let len = bytes.len();
        for b in &mut bytes[len / 2..len / 2 + (len / 8).max(1)] {
            *b ^= 0x5a;
        }
        std::fs::write(dir.join(&build.id), &bytes).expect("writing the corrupt copy");
        let server = FileServer::start(&self.hub, ([10, 199, 0, 1], port).into(), &root);
        let base = format!("{ZK_CHROOT}/builds/{service}/{}/peers", build.id);
        for node in [base.clone(), format!("{base}/{rack}")] {
            // Already there when a host registered first.
            let _ = self.zk().cli(&["create", &node]);
        }
        let data = format!(r#"{{"addr":"{HUB_ADDR}:{port}","complete":true}}"#);
        self.zk()
            .cli(&["create", &format!("{base}/{rack}/{name}"), &data])
            .success();
        server
    }

    /// `sluice hosts <svc> --json`, by host name; an error when the CLI fails (e.g. while ZooKeeper
    /// elects a leader).
    pub fn try_hosts_view(&self, service: &str) -> Result<BTreeMap<String, Value>, String> {
        let out = run_bounded(
            self.hosts[0].sluice_command(&["hosts", service, "--json"]),
            crate::CLI_TIMEOUT,
        )?;
        if out.code != Some(0) {
            return Err(out.to_string());
        }
        let value: Value = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("`sluice hosts --json` is not JSON ({e}): {out}"))?;
        Ok(hosts_by_name(&value))
    }

    /// Polls `sluice hosts <svc> --json` until `cond` holds; fails with the last view (or error)
    /// and each host's daemon log after `timeout`.
    #[track_caller]
    pub fn wait_hosts(
        &self,
        service: &str,
        mut cond: impl FnMut(&BTreeMap<String, Value>) -> bool,
        timeout: Duration,
    ) -> BTreeMap<String, Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_hosts_view(service) {
                Ok(view) if cond(&view) => return view,
                Ok(view) => serde_json::to_string_pretty(&view).unwrap_or_default(),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let logs: String = self
                    .hosts
                    .iter()
                    .map(|h| format!("=== {}\n{}\n", h.name, h.daemon_log_tail()))
                    .collect();
                panic!(
                    "fleet condition not met within {timeout:?}; last hosts view:\n{last}\n{logs}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every host reports `build` and `serving` in ZooKeeper.
    #[track_caller]
    pub fn wait_all_serving(&self, service: &str, build: &str, timeout: Duration) {
        let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        self.wait_hosts(
            service,
            |view| names.iter().all(|n| serving(view, n, build)),
            timeout,
        );
    }
}

/// A fleet with ZooKeeper whose hosts run `service` ([`py_service`]) from the first of `builds`
/// (all made and registered): deployed, every host serving it in ZooKeeper and idle in its own
/// status (no deploy or restart under way, every instance running). `None` when the test must
/// skip.
pub fn py_fleet_serving(
    opts: FleetOptions,
    service: &str,
    builds: &[&str],
    timeout: Duration,
) -> Option<(Fleet, Vec<BuildInfo>)> {
    assert!(opts.zookeepers > 0 && !builds.is_empty());
    let fleet = Fleet::new(opts)?;
    let wheels = wheel_dir()?;
    let builds: Vec<BuildInfo> = builds
        .iter()
        .map(|id| fleet.builds().good(service, id))
        .collect();
    fleet.service(service, &py_service(&wheels, ""));
    fleet.start_daemons();
    for b in &builds {
        fleet.register(service, b);
    }
    fleet.sluice(&["deploy", service, &builds[0].id]).success();
    fleet.wait_all_serving(service, &builds[0].id, timeout);
    for h in &fleet.hosts {
        h.wait_until(
            |s| {
                s.service(service)["build"] == builds[0].id.as_str()
                    && s.service(service)["deploy"].is_null()
                    && !s.restart_in_progress(service)
                    && s.running(service) > 0
                    && s.all_running(service, s.instances(service).len())
            },
            timeout,
        );
    }
    Some((fleet, builds))
}

/// Whether host `name` of a hosts view serves `build` (state `serving`, every instance running
/// and in steering).
pub fn serving(view: &BTreeMap<String, Value>, name: &str, build: &str) -> bool {
    view.get(name).is_some_and(|h| serving_status(h, build))
}

/// Whether one host's status (its status node, or its entry in `sluice hosts --json`) says it
/// serves `build` with every instance running.
pub fn serving_status(h: &Value, build: &str) -> bool {
    h["build"] == build
        && h["state"] == "serving"
        && h["instances"]
            .as_array()
            .is_some_and(|i| !i.is_empty() && i.iter().all(|i| i["state"] == "running"))
}

/// `sluice hosts --json` as a map by host name, whichever of the plausible shapes it has: an
/// object keyed by host, an array of statuses with `host`, or `{"hosts": …}` of either.
pub fn hosts_by_name(value: &Value) -> BTreeMap<String, Value> {
    let value = match value.get("hosts") {
        Some(inner) if !inner.is_null() => inner,
        _ => value,
    };
    match value {
        Value::Array(items) => items
            .iter()
            .map(|s| (s["host"].as_str().unwrap_or("?").to_owned(), s.clone()))
            .collect(),
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => BTreeMap::new(),
    }
}

/// `GET path` from the calling thread's namespace to `addr`, answer read to the end (the request
/// says `Connection: close`). Returns the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
    stream.set_write_timeout(Some(IO_TIMEOUT)).ok();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer from {addr}: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line from {addr}: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// `GET path` from the calling thread's namespace to `addr`: the status and the body's bytes
/// (`Content-Length` or chunked), read to the end within `timeout`.
pub fn http_get_bytes(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    http_get_bytes_with(addr, path, &[], timeout)
}

/// [`http_get_bytes`] with extra request headers (`(name, value)`).
pub fn http_get_bytes_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(IO_TIMEOUT)).ok();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer from {addr}"))?;
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    let mut body = answer[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line from {addr}: {head:?}"))?;
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body).ok_or_else(|| format!("bad chunked body from {addr}"))?;
    }
    Ok((status, body))
}

/// The data of a chunked body; `None` when it is cut or malformed.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if raw.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// `bytes` of incompressible noise from `seed` (xorshift), for archives that take time to move.
pub fn noise(bytes: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// The build store

/// A static file server on a thread inside the hub namespace: GET only, `Content-Length`, 404 for
/// anything missing, one request per connection; counts requests and body bytes sent per path,
/// and sends at most [`FileServer::set_uplink`] bytes per second over all responses together
/// when set (the store's uplink).
pub struct FileServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    sent: Arc<Mutex<BTreeMap<String, u64>>>,
    /// The uplink: bytes per second of all responses together (0: as fast as it goes), and
    /// when the bytes sent so far are due.
    uplink: Arc<Uplink>,
    root: PathBuf,
}

impl FileServer {
    /// Serves `root` on `addr` from inside `ns`; returns once it listens.
    pub fn start(ns: &Netns, addr: SocketAddr, root: &Path) -> FileServer {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let sent = Arc::new(Mutex::new(BTreeMap::new()));
        let uplink = Arc::new(Uplink::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, counts, sent, uplink, root, ns) = (
                stop.clone(),
                counts.clone(),
                sent.clone(),
                uplink.clone(),
                root.to_owned(),
                ns.name.clone(),
            );
            std::thread::spawn(move || {
                crate::netns::enter_named(&ns);
                let listener = match TcpListener::bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("bind {addr} in {ns}: {e}")));
                        return;
                    }
                };
                listener
                    .set_nonblocking(true)
                    .expect("non-blocking listener");
                let _ = ready_tx.send(Ok(()));
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (counts, sent, root, uplink) =
                                (counts.clone(), sent.clone(), root.clone(), uplink.clone());
                            std::thread::spawn(move || {
                                serve_one(stream, &root, &counts, &sent, &uplink);
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        ready_rx
            .recv()
            .expect("the file server thread reports")
            .unwrap_or_else(|e| panic!("{e}"));
        FileServer {
            stop,
            thread: Some(thread),
            counts,
            sent,
            uplink,
            root: root.to_owned(),
        }
    }

    /// Limits all responses together to `bytes_per_s` (0: no limit): the store's uplink, so
    /// that the store's bandwidth matters as in a data centre, and a transfer lasts long enough
    /// to be watched.
    pub fn set_uplink(&self, bytes_per_s: u64) {
        self.uplink
            .bytes_per_s
            .store(bytes_per_s, Ordering::Relaxed);
    }

    /// Body bytes sent for `path` so far (cut transfers count what went out).
    pub fn bytes(&self, path: &str) -> u64 {
        self.sent.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// The directory served.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Requests for `path` (e.g. `/py/b2.tar.gz`) so far, whatever their answer.
    pub fn count(&self, path: &str) -> u64 {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Every path requested so far, with its count.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().unwrap().clone()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The store's uplink: chunks of every response reserve their share of time one after another.
#[derive(Default)]
struct Uplink {
    bytes_per_s: std::sync::atomic::AtomicU64,
    next: Mutex<Option<Instant>>,
}

impl Uplink {
    /// Waits until `bytes` more have had their time on the uplink.
    fn pace(&self, bytes: u64) {
        let rate = self.bytes_per_s.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let due = {
            let mut next = self.next.lock().unwrap();
            let now = Instant::now();
            let start = next.filter(|t| *t > now).unwrap_or(now);
            *next = Some(start + cost);
            start + cost
        };
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

fn serve_one(
    mut stream: TcpStream,
    root: &Path,
    counts: &Mutex<BTreeMap<String, u64>>,
    sent: &Mutex<BTreeMap<String, u64>>,
    uplink: &Uplink,
) {
    let _ = stream.set_nonblocking(false);
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
    stream.set_write_timeout(Some(Duration::from_secs(30))).ok();
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&byte[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("").to_owned();
    *counts.lock().unwrap().entry(path.clone()).or_default() += 1;
    let respond = |stream: &mut TcpStream, status: &str, body: &[u8]| {
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(body);
    };
    if method != "GET" {
        return respond(&mut stream, "405 Method Not Allowed", b"GET only\n");
    }
    let relative = Path::new(path.trim_start_matches('/'));
    let safe = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    let file = root.join(relative);
    match std::fs::File::open(&file) {
        Ok(mut f) if safe && file.is_file() => {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
            );
            // In pieces, so the bytes count as they go and the uplink's rate holds.
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
                *sent.lock().unwrap().entry(path.clone()).or_default() += n as u64;
                uplink.pace(n as u64);
            }
        }
        _ => respond(&mut stream, "404 Not Found", b"not found\n"),
    }
}

// ------------------------------------------------------------------------------------------------
// Build tarballs

/// One build in the store.
#[derive(Debug, Clone)]
pub struct BuildInfo {
    pub id: String,
    /// `http://10.199.0.1:8000/<svc>/<id>.tar.gz`.
    pub url: String,
    /// The path the build store counts: `/<svc>/<id>.tar.gz`.
    pub path: String,
    /// What the sidecar says (wrong on purpose for [`Bad::WrongSha256`]).
    pub sha256: String,
    /// The archive on disk.
    pub file: PathBuf,
}

/// Ways a build can be bad.
#[derive(Debug, Clone)]
pub enum Bad {
    /// The sidecar (and the returned `sha256`) names another digest.
    WrongSha256,
    /// The archive is cut in the middle of a file; the sidecar matches the cut bytes.
    Truncated,
    /// An entry named `entry` (e.g. `../../escaped`).
    DotDot { entry: String },
    /// An entry at an absolute path.
    Absolute { path: PathBuf },
    /// A symlink `escape-link` pointing at `target` (e.g. `../../../../etc`).
    EscapingSymlink { target: String },
    /// A `big.bin` of `bytes` zeros: over a small `max_unpacked_bytes`.
    Oversized { bytes: usize },
    /// `sluice/hooks/post_install` prints `message` on stderr and exits 1.
    FailingHook { message: String },
}

/// Writes build tarballs of the deploy test app into the build store.
pub struct Builds {
    www: PathBuf,
    stage: PathBuf,
}

impl Builds {
    /// A good build `id` of service `svc`: `app.py`, `requirements.txt` (`gunicorn`), `BUILD`.
    pub fn good(&self, svc: &str, id: &str) -> BuildInfo {
        let stage = self.stage_app(id, &[]);
        self.pack_with_tar(svc, id, &stage)
    }

    /// A good build with extra files (path, bytes, mode), e.g. incompressible noise that makes
    /// the archive large.
    pub fn good_with(&self, svc: &str, id: &str, extra: &[(&str, &[u8], u32)]) -> BuildInfo {
        let stage = self.stage_app(id, extra);
        self.pack_with_tar(svc, id, &stage)
    }

    /// A bad build (see [`Bad`]).
    pub fn bad(&self, svc: &str, id: &str, how: &Bad) -> BuildInfo {
        match how {
            Bad::WrongSha256 => {
                let mut info = self.good(svc, id);
                let wrong = if info.sha256.starts_with('0') {
                    "1".repeat(64)
                } else {
                    "0".repeat(64)
                };
                info.sha256 = wrong;
                write_sidecar(&info);
                info
            }
            Bad::Truncated => {
                // Incompressible bytes, so the cut lands in the middle of a file's data.
                let mut x: u64 = 0x2545_F491_4F6C_DD1D;
                let noise: Vec<u8> = (0..256 * 1024)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let stage = self.stage_app(id, &[("noise.bin", &noise, 0o644)]);
                let mut info = self.pack_with_tar(svc, id, &stage);
                let bytes = std::fs::read(&info.file).expect("reading the archive");
                std::fs::write(&info.file, &bytes[..bytes.len() / 2]).expect("truncating");
                info.sha256 = sha256_file(&info.file);
                write_sidecar(&info);
                info
            }
            Bad::DotDot { entry } => self.pack_evil(svc, id, "dotdot", entry),
            Bad::Absolute { path } => self.pack_evil(svc, id, "absolute", &path.to_string_lossy()),
            Bad::EscapingSymlink { target } => self.pack_evil(svc, id, "symlink", target),
            Bad::Oversized { bytes } => {
                let zeros = vec![0u8; *bytes];
                let stage = self.stage_app(id, &[("big.bin", &zeros, 0o644)]);
                self.pack_with_tar(svc, id, &stage)
            }
            Bad::FailingHook { message } => {
                let script = format!("#!/bin/sh\necho '{message}' >&2\nexit 1\n");
                let stage = self.stage_app(
                    id,
                    &[("sluice/hooks/post_install", script.as_bytes(), 0o755)],
                );
                self.pack_with_tar(svc, id, &stage)
            }
        }
    }

    /// The files of build `id` in a fresh staging directory, plus `extra` (path, bytes, mode).
    fn stage_app(&self, id: &str, extra: &[(&str, &[u8], u32)]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let stage = self.stage.join(id);
        let _ = std::fs::remove_dir_all(&stage);
        std::fs::create_dir_all(&stage).expect("creating a staging dir");
        std::fs::copy(fixtures::dir().join("deploy_app.py"), stage.join("app.py"))
            .expect("copying the app");
        std::fs::write(stage.join("requirements.txt"), "gunicorn\n").expect("requirements");
        std::fs::write(stage.join("BUILD"), format!("{id}\n")).expect("BUILD");
        for (path, bytes, mode) in extra {
            let file = stage.join(path);
            std::fs::create_dir_all(file.parent().expect("a parent")).expect("mkdir -p");
            std::fs::write(&file, bytes).expect("an extra file");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode)).expect("chmod");
        }
        stage
    }

    fn archive(&self, svc: &str, id: &str) -> (PathBuf, BuildInfo) {
        let dir = self.www.join(svc);
        std::fs::create_dir_all(&dir).expect("creating the store dir");
        let file = dir.join(format!("{id}.tar.gz"));
        let info = BuildInfo {
            id: id.to_owned(),
            url: format!("http://{HUB_ADDR}:{HTTP_PORT}/{svc}/{id}.tar.gz"),
            path: format!("/{svc}/{id}.tar.gz"),
            sha256: String::new(),
            file: file.clone(),
        };
        (file, info)
    }

    /// GNU tar + gzip: entries named relative to the staging dir (no `./`), owned by root.
    fn pack_with_tar(&self, svc: &str, id: &str, stage: &Path) -> BuildInfo {
        let (file, mut info) = self.archive(svc, id);
        let mut names: Vec<String> = std::fs::read_dir(stage)
            .expect("reading the staging dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut cmd = Command::new("tar");
        cmd.arg("--owner=0")
            .arg("--group=0")
            .arg("--numeric-owner")
            .arg("-czf")
            .arg(&file)
            .arg("-C")
            .arg(stage)
            .args(&names);
        check(cmd);
        info.sha256 = sha256_file(&file);
        write_sidecar(&info);
        info
    }

    /// Python's tarfile, for entries GNU tar refuses to write (`fixtures/evil_tar.py`).
    fn pack_evil(&self, svc: &str, id: &str, kind: &str, arg: &str) -> BuildInfo {
        let stage = self.stage_app(id, &[]);
        let (file, mut info) = self.archive(svc, id);
        let mut cmd = Command::new(system_python());
        cmd.arg(fixtures::dir().join("evil_tar.py"))
            .arg(&file)
            .arg(&stage)
            .arg(kind)
            .arg(arg);
        check(cmd);
        info.sha256 = sha256_file(&file);
        write_sidecar(&info);
        info
    }
}

/// Names in a `.tar.gz`, as GNU tar lists them (leading `/` kept).
pub fn tar_listing(file: &Path) -> Vec<String> {
    let mut cmd = Command::new("tar");
    cmd.arg("--list")
        .arg("--absolute-names")
        .arg("-zf")
        .arg(file);
    let out = run_bounded(cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    out.stdout.lines().map(str::to_owned).collect()
}

fn write_sidecar(info: &BuildInfo) {
    let mut sidecar = info.file.clone().into_os_string();
    sidecar.push(".sha256");
    let name = info
        .file
        .file_name()
        .expect("a file name")
        .to_string_lossy();
    std::fs::write(sidecar, format!("{}  {name}\n", info.sha256)).expect("writing a sidecar");
}

/// The sha256 of a file, in hex (`sha256sum`: the tests crate has no hashing dependency).
pub fn sha256_file(file: &Path) -> String {
    let mut cmd = Command::new("sha256sum");
    cmd.arg(file);
    let out = check(cmd);
    let hex = out
        .stdout
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    assert_eq!(hex.len(), 64, "sha256sum output: {out}");
    hex
}

#[track_caller]
fn check(cmd: Command) -> Out {
    let out = run_bounded(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.code, Some(0), "{out}");
    out
}
