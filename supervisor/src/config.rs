//! Host and service configuration: parsing, defaults, validation, and errors that name file, line and key.
//!
//! The host file (`sluice.toml`) says where things live; one file per service in `services_dir`
//! says what to run. Every key is documented once, with unit and default, in `docs/config.md`; a
//! test checks that the page and these structs agree.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_strategies::plan::BatchSize;

/// Default path of the host file when neither `--config` nor `SLUICE_CONFIG` is given.
pub const DEFAULT_HOST_CONFIG: &str = "/etc/sluice/sluice.toml";

/// Longest service name: iptables chain names are at most 28 bytes and ours are `SLUICE-<service>`.
pub const SERVICE_NAME_MAX_LEN: usize = 21;

/// A configuration problem, always naming the file and, where one is at fault, the key and its line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Service { path: PathBuf, message: String },
}

/// The host file: where sluice keeps its state, sockets and service files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Persistent state (desired state per service, logs by default); survives reboots.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Shim sockets and the control socket; a tmpfs under systemd, so a reboot starts clean.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// The control socket; `runtime_dir/sluice.sock` when absent.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Group given access to the control socket (mode 0660); root only when absent.
    #[serde(default)]
    pub control_group: Option<String>,
    /// One `<service>.toml` per service.
    #[serde(default = "default_services_dir")]
    pub services_dir: PathBuf,
    /// The `sluice-shim` binary; next to the `sluice` binary when absent.
    #[serde(default)]
    pub shim_path: Option<PathBuf>,
    /// Which iptables implementation steers: `auto` (the system's `iptables-restore`), `nft`, `legacy`.
    #[serde(default)]
    pub iptables: IptablesVariant,
    /// Whether anything (instance, hook, `exec` probe) may run as root: a service that sets no
    /// `user`, or `user = "root"`, is a configuration error naming it unless this is true.
    #[serde(default)]
    pub allow_root: bool,
    /// Whether starting instances get a cgroup of their own with a low CPU weight: `auto` (where
    /// the host lets sluice make one) or `off` (the default).
    #[serde(default)]
    pub cgroups: CgroupsMode,
    /// Name of the cgroup sluice owns, made under the daemon's own cgroup; one child per instance.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
    #[serde(default)]
    pub coordination: CoordinationConfig,
    /// This host's rack (or zone): builds travel between hosts of one rack first.
    #[serde(default)]
    pub rack: Option<String>,
    /// Serving builds to other hosts and fetching them from them (`crate::build::peer`).
    #[serde(default)]
    pub peers: crate::build::peer::PeerConfig,
}

fn default_cgroup_parent() -> String {
    "sluice".into()
}

fn default_true() -> bool {
    true
}

/// Whether sluice puts instances into cgroups of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupsMode {
    /// Starting instances that have a serving sibling run in a low-weight cgroup where the host
    /// lets sluice make one; everything else runs as it would without.
    Auto,
    /// The default for now: on a saturated host a starting instance at the lowest weight gets no
    /// CPU, its health deadline runs out and the batch is rolled back (see docs/config.md).
    #[default]
    Off,
}

/// The iptables implementation sluice drives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesVariant {
    #[default]
    Auto,
    Nft,
    Legacy,
}

impl IptablesVariant {
    pub fn variant(self) -> sluice_strategies::steering::Variant {
        use sluice_strategies::steering::Variant;
        match self {
            IptablesVariant::Auto => Variant::Auto,
            IptablesVariant::Nft => Variant::Nft,
            IptablesVariant::Legacy => Variant::Legacy,
        }
    }
}

/// Which coordination backend tells this host what to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationConfig {
    #[serde(default)]
    pub backend: Backend,
    /// ZooKeeper servers, then the chroot: `h1:2181,h2:2181/sluice`.
    #[serde(default)]
    pub connect: Option<String>,
    /// This host's name in ZooKeeper (`roles/<host>`, `status/<host>`); the hostname when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// A file holding `user:password` for ZooKeeper digest authentication; nodes sluice creates
    /// are then writable by that user only (readable by all).
    #[serde(default)]
    pub digest_file: Option<PathBuf>,
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// With the `local` backend: whether this host takes `deploy --canary` builds.
    #[serde(default)]
    pub canary: bool,
    /// The service-file keys a ZooKeeper config node may set on this host (dotted, e.g.
    /// `health.timeout_ms`; a table such as `restart` grants every key under it). A node that sets
    /// any other key is refused whole.
    #[serde(default = "default_config_node_keys")]
    pub config_node_keys: Vec<String>,
}

/// What a ZooKeeper config node may set by default: the operational keys (instance count,
/// restart, drain and health timings, warm-up), never what decides which program runs, as whom,
/// with which environment, or which files root touches for it.
pub const DEFAULT_CONFIG_NODE_KEYS: &[&str] = &[
    "instances",
    "stop_grace_ms",
    "startup_ms",
    "start_retries",
    "backoff_initial_ms",
    "backoff_max_ms",
    "restart",
    "health.expect_status",
    "health.timeout_ms",
    "health.interval_ms",
    "health.start_timeout_ms",
    "health.liveness_interval_ms",
    "health.liveness_failures",
    "warmup.requests",
    "warmup.count",
    "warmup.duration_ms",
    "warmup.until_stable_pct",
    "warmup.window",
    "warmup.max_duration_ms",
    "warmup.concurrency",
    "warmup.timeout_ms",
    "warmup.max_errors",
];

fn default_config_node_keys() -> Vec<String> {
    DEFAULT_CONFIG_NODE_KEYS
        .iter()
        .map(|k| (*k).to_owned())
        .collect()
}

fn default_session_timeout_ms() -> u64 {
    10_000
}

impl Default for CoordinationConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Local,
            connect: None,
            host: None,
            digest_file: None,
            session_timeout_ms: default_session_timeout_ms(),
            canary: false,
            config_node_keys: default_config_node_keys(),
        }
    }
}

impl CoordinationConfig {
    /// This host's name: configured, else the kernel's hostname.
    pub fn host_name(&self) -> String {
        self.host.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }
}

/// Coordination backends: `local` (the state files and the control socket, one host) or
/// `zookeeper` (a fleet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Local,
    Zookeeper,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/sluice")
}
fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/sluice")
}
fn default_services_dir() -> PathBuf {
    PathBuf::from("/etc/sluice/services")
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            runtime_dir: default_runtime_dir(),
            control_socket: None,
            control_group: None,
            services_dir: default_services_dir(),
            shim_path: None,
            iptables: IptablesVariant::default(),
            allow_root: false,
            cgroups: CgroupsMode::default(),
            cgroup_parent: default_cgroup_parent(),
            coordination: CoordinationConfig::default(),
            rack: None,
            peers: crate::build::peer::PeerConfig::default(),
        }
    }
}

impl HostConfig {
    /// Reads a host file; relative paths in it are taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<HostConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: HostConfig = parse_toml(path, &text)?;
        // Absolute, so that nothing depends on the working directory of whoever uses a path
        // (hooks run in their release directory).
        let absolute = std::path::absolute(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        for dir in [
            &mut config.data_dir,
            &mut config.runtime_dir,
            &mut config.services_dir,
        ] {
            *dir = base.join(&*dir);
        }
        for dir in [
            &mut config.control_socket,
            &mut config.shim_path,
            &mut config.coordination.digest_file,
        ]
        .into_iter()
        .flatten()
        {
            *dir = base.join(&*dir);
        }
        let parent = &config.cgroup_parent;
        let parent_ok = !parent.is_empty()
            && parent.len() <= 64
            && !parent.starts_with('.')
            && parent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !parent_ok {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of_key(&text, "cgroup_parent"),
                key: "cgroup_parent".into(),
                message: format!(
                    "must be one directory name of at most 64 letters, digits, `-`, `_` or `.`, not starting with `.`: {}",
                    crate::clip::clip(parent)
                ),
            });
        }
        if config.coordination.backend == Backend::Zookeeper
            && config.coordination.connect.is_none()
        {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of_key(&text, "coordination"),
                key: "coordination.connect".into(),
                message: "the zookeeper backend needs `connect` (servers, then the chroot)".into(),
            });
        }
        Ok(config)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.runtime_dir.join("sluice.sock"))
    }

    /// Where shims keep their sockets and lock files.
    pub fn shim_dir(&self) -> PathBuf {
        self.runtime_dir.join("shims")
    }

    /// Where each service's desired state is persisted.
    pub fn state_dir(&self) -> PathBuf {
        self.data_dir.join("state")
    }
}

/// Restart policy after an instance exits on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Autorestart {
    /// Restart whatever the exit status.
    #[default]
    Always,
    /// Restart unless the exit code is one of `success_exit_codes`.
    OnFailure,
    /// Leave it exited.
    Never,
}

/// A signal given by name (`TERM`, `SIGTERM`, `hup`) or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub i32);

impl Signal {
    pub fn parse(text: &str) -> Option<Signal> {
        if let Ok(n) = text.parse::<i32>() {
            return (1..=64).contains(&n).then_some(Signal(n));
        }
        let upper = text.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        let n = match name {
            "HUP" => libc::SIGHUP,
            "INT" => libc::SIGINT,
            "QUIT" => libc::SIGQUIT,
            "KILL" => libc::SIGKILL,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            "TERM" => libc::SIGTERM,
            "CONT" => libc::SIGCONT,
            "STOP" => libc::SIGSTOP,
            "WINCH" => libc::SIGWINCH,
            _ => return None,
        };
        Some(Signal(n))
    }

    pub fn name(self) -> String {
        match self.0 {
            libc::SIGHUP => "HUP".into(),
            libc::SIGINT => "INT".into(),
            libc::SIGQUIT => "QUIT".into(),
            libc::SIGKILL => "KILL".into(),
            libc::SIGUSR1 => "USR1".into(),
            libc::SIGUSR2 => "USR2".into(),
            libc::SIGTERM => "TERM".into(),
            libc::SIGCONT => "CONT".into(),
            libc::SIGSTOP => "STOP".into(),
            libc::SIGWINCH => "WINCH".into(),
            n => n.to_string(),
        }
    }
}

impl Serialize for Signal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Signal::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown signal `{text}` (use a name such as TERM, HUP, INT, QUIT, USR1, or a number)"
            ))
        })
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Log files of one instance, written by its shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Directory of the log files; `data_dir/logs` when absent.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// A log file is rotated before it would grow past this size; 0 never rotates.
    #[serde(default = "default_log_max_bytes")]
    pub max_bytes: u64,
    /// How many rotated files are kept (`.1` is the newest).
    #[serde(default = "default_log_backups")]
    pub backups: u32,
}

fn default_log_max_bytes() -> u64 {
    50 * 1024 * 1024
}
fn default_log_backups() -> u32 {
    10
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: default_log_max_bytes(),
            backups: default_log_backups(),
        }
    }
}

/// One service file. The service is named after the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Program and arguments; `{port}`, `{instance}`, `{service}`, `{release_dir}` are substituted.
    pub command: Vec<String>,
    #[serde(default = "default_instances")]
    pub instances: u32,
    /// Instance i listens on `port_base + i`.
    #[serde(default)]
    pub port_base: Option<u16>,
    /// The port clients use; steered over the instance ports by the restart strategies.
    #[serde(default)]
    pub front_port: Option<u16>,
    /// The instance's whole environment: nothing is inherited from the daemon.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the instance (placeholders allowed); the shim's when absent.
    #[serde(default)]
    pub directory: Option<String>,
    /// User to run as; its primary group and supplementary groups are used unless given.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    /// Supplementary groups; the user's own groups (as `initgroups` finds them) when absent.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    /// File mode creation mask, in octal (`"022"`).
    #[serde(default)]
    pub umask: Option<String>,
    /// RLIMIT_NOFILE (soft and hard) of the instance.
    #[serde(default)]
    pub nofile: Option<u64>,
    #[serde(default = "default_stop_signal")]
    pub stop_signal: Signal,
    /// Time between the stop signal and SIGKILL to the instance's whole process group.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u64,
    #[serde(default)]
    pub autorestart: Autorestart,
    /// Exit codes that count as success for `autorestart = "on-failure"`.
    #[serde(default = "default_success_exit_codes")]
    pub success_exit_codes: Vec<i32>,
    /// An instance counts as started once it has stayed up this long; an earlier exit is a failed start.
    #[serde(default = "default_startup_ms")]
    pub startup_ms: u64,
    /// Failed starts in a row after which the instance is `fatal` and not restarted automatically.
    #[serde(default = "default_start_retries")]
    pub start_retries: u32,
    /// First delay before restarting after a failed start; doubles each time.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Cap of the doubling delay.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Start order: lower first (then by name); stop order is the reverse.
    #[serde(default = "default_priority")]
    pub priority: i32,
    /// Services whose instances must be running before this one starts.
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub log: LogConfig,
    /// How the front port reaches the instances: `iptables` (sluice's chain) or `none`.
    #[serde(default)]
    pub steering: SteeringKind,
    #[serde(default)]
    pub restart: RestartConfig,
    #[serde(default)]
    pub health: Option<HealthConfig>,
    #[serde(default)]
    pub warmup: Option<WarmupConfig>,
    /// Where builds come from; a service without it runs what its command names.
    #[serde(default)]
    pub build: Option<BuildConfig>,
    #[serde(default)]
    pub hooks: HooksConfig,
}

/// Builds of a service: a tarball per build id in a store, with its sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildConfig {
    /// URL template with `{build}` (and `{service}`): `file://`, `http(s)://`, `s3://`, `gs://`.
    /// ZooKeeper's `/builds/<svc>/<build>` overrides it; the sha256 comes from there or from the
    /// sidecar `<url>.sha256`.
    pub source: String,
    /// Releases kept on disk (the serving one and the one before always are).
    #[serde(default = "default_keep_releases")]
    pub keep_releases: usize,
    /// Largest archive accepted (compressed bytes).
    #[serde(default = "default_max_archive_bytes")]
    pub max_archive_bytes: u64,
    /// Largest release accepted (sum of its files' sizes).
    #[serde(default = "default_max_unpacked_bytes")]
    pub max_unpacked_bytes: u64,
    /// Most tar headers accepted (entries, and the pax / GNU long-name headers describing them).
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
}

fn default_keep_releases() -> usize {
    5
}
fn default_max_archive_bytes() -> u64 {
    4 << 30
}
fn default_max_unpacked_bytes() -> u64 {
    16 << 30
}
fn default_max_entries() -> u64 {
    crate::build::DEFAULT_MAX_ENTRIES
}

/// Commands run at the stages of a deploy, as the service's user, in the release directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    #[serde(default)]
    pub pre_download: Vec<Vec<String>>,
    #[serde(default)]
    pub post_download: Vec<Vec<String>>,
    /// E.g. `[["stock:python-venv"]]`: a virtualenv with requirements.txt installed.
    #[serde(default)]
    pub post_install: Vec<Vec<String>>,
    #[serde(default)]
    pub pre_restart: Vec<Vec<String>>,
    #[serde(default)]
    pub post_restart: Vec<Vec<String>>,
    /// Limit of one hook run.
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: u64,
    /// Variables added to the hooks' environment (e.g. `SLUICE_WHEEL_DIR` for offline installs).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_hook_timeout_ms() -> u64 {
    600_000
}

impl HooksConfig {
    /// The configured commands of a stage.
    pub fn of(&self, stage: sluice_hooks::Stage) -> &[Vec<String>] {
        use sluice_hooks::Stage;
        match stage {
            Stage::PreDownload => &self.pre_download,
            Stage::PostDownload => &self.post_download,
            Stage::PostInstall => &self.post_install,
            Stage::PreRestart => &self.pre_restart,
            Stage::PostRestart => &self.post_restart,
        }
    }
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            pre_download: Vec::new(),
            post_download: Vec::new(),
            post_install: Vec::new(),
            pre_restart: Vec::new(),
            post_restart: Vec::new(),
            timeout_ms: default_hook_timeout_ms(),
            env: BTreeMap::new(),
        }
    }
}

/// Who steers the front port over the instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteeringKind {
    /// sluice's own nat chain (needs `front_port`).
    #[default]
    Iptables,
    /// An external balancer; sluice writes no rule.
    None,
}

/// Restart strategies by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    Drain,
    Rolling,
    AllAtOnce,
    Signal,
}

/// A batch size as written: a count (`2`) or a percentage (`"25%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSpec(pub BatchSize);

impl Serialize for BatchSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            BatchSize::Count(n) => s.serialize_u32(n),
            BatchSize::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl<'de> Deserialize<'de> for BatchSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(i64),
            Text(String),
        }
        let parsed = match Raw::deserialize(d)? {
            Raw::Count(n) => u32::try_from(n)
                .ok()
                .and_then(|n| BatchSize::parse(&n.to_string())),
            Raw::Text(t) => BatchSize::parse(&t),
        };
        parsed.map(BatchSpec).ok_or_else(|| {
            serde::de::Error::custom(
                "batch_size must be a count of at least 1 or a percentage such as \"25%\"",
            )
        })
    }
}

/// How a service is restarted (`sluice restart`, a reload that changes it, a deploy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartConfig {
    /// `drain` when the service has a `front_port`, else `rolling`.
    #[serde(default)]
    pub strategy: Option<StrategyName>,
    #[serde(default = "default_batch_size")]
    pub batch_size: BatchSpec,
    /// What a drain waits for: no request in flight (`idle`), or no connection (`closed`).
    #[serde(default)]
    pub drain_until: sluice_strategies::drain::DrainUntil,
    /// Longest drain wait before a drained instance is stopped with what is left.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// The signal of the `signal` strategy.
    #[serde(default = "default_reload_signal")]
    pub reload_signal: Signal,
    /// An instance that starts runs at a low CPU weight in a cgroup of its own until it is enabled,
    /// so its start-up (a JVM's JIT and GC threads) takes only CPU the serving instances leave idle.
    #[serde(default = "default_true")]
    pub cpu_isolation: bool,
}

fn default_batch_size() -> BatchSpec {
    BatchSpec(BatchSize::Count(1))
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}
fn default_reload_signal() -> Signal {
    Signal(libc::SIGHUP)
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            strategy: None,
            batch_size: default_batch_size(),
            drain_until: Default::default(),
            drain_timeout_ms: default_drain_timeout_ms(),
            reload_signal: default_reload_signal(),
            cpu_isolation: true,
        }
    }
}

/// How to tell an instance is healthy: after a start (readiness) and, optionally, periodically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `GET` this path on the instance port; healthy on `expect_status`.
    #[serde(default)]
    pub http: Option<String>,
    /// Healthy once the instance port accepts a connection.
    #[serde(default)]
    pub tcp: Option<bool>,
    /// Healthy when this command exits 0 (placeholders allowed).
    #[serde(default)]
    pub exec: Option<Vec<String>>,
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// Limit of one probe.
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u64,
    /// Pause between probes while waiting for readiness.
    #[serde(default = "default_health_interval_ms")]
    pub interval_ms: u64,
    /// A started instance must be healthy within this, or its start failed.
    #[serde(default = "default_start_timeout_ms")]
    pub start_timeout_ms: u64,
    /// Period of the liveness probe of running instances; 0 disables it.
    #[serde(default)]
    pub liveness_interval_ms: u64,
    /// Failed liveness probes in a row after which the instance is restarted.
    #[serde(default = "default_liveness_failures")]
    pub liveness_failures: u32,
}

fn default_expect_status() -> u16 {
    200
}
fn default_health_timeout_ms() -> u64 {
    1_000
}
fn default_health_interval_ms() -> u64 {
    200
}
fn default_start_timeout_ms() -> u64 {
    30_000
}
fn default_liveness_failures() -> u32 {
    3
}

/// Real requests sent straight to a started, healthy instance before it gets traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    /// Requests as `"METHOD /path"`, or JSON `{"method", "path", "headers", "body"}`.
    #[serde(default)]
    pub requests: Vec<String>,
    /// A file of such requests, one per line, relative to the release directory.
    #[serde(default)]
    pub file: Option<String>,
    /// Stop after this many requests.
    #[serde(default)]
    pub count: Option<u64>,
    /// Stop after this long.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// Stop once the median latency of a window is within this percentage of the window before;
    /// 10 when none of `count`, `duration_ms` and `until_stable_pct` is set.
    #[serde(default)]
    pub until_stable_pct: Option<f64>,
    /// Requests per latency window.
    #[serde(default = "default_warmup_window")]
    pub window: u32,
    /// Upper bound of a warm-up, whatever else is set.
    #[serde(default = "default_warmup_max_duration_ms")]
    pub max_duration_ms: u64,
    /// Connections used at once (one request in flight on each).
    #[serde(default = "default_warmup_concurrency")]
    pub concurrency: u32,
    /// Limit of one request.
    #[serde(default = "default_warmup_timeout_ms")]
    pub timeout_ms: u64,
    /// Failed requests (transport error or 5xx) tolerated before the warm-up fails.
    #[serde(default)]
    pub max_errors: u64,
    /// What ends the warm-up early: `sibling` (as fast as a serving sibling) or `stable` (the
    /// median stopped improving); unset, `sibling` when none of `count`, `duration_ms` and
    /// `until_stable_pct` is set.
    #[serde(default)]
    pub until: Option<WarmupUntil>,
    /// The new instance's latency percentile may be at most this many times the sibling's.
    #[serde(default = "default_warmup_sibling_ratio")]
    pub sibling_ratio: f64,
    /// Which percentile is compared: 50, 90 or 99.
    #[serde(default = "default_warmup_sibling_percentile")]
    pub sibling_percentile: u32,
    /// Warm-up requests sent to the sibling to measure it (at most [`SIBLING_SAMPLE_MAX`]).
    #[serde(default = "default_warmup_sibling_sample")]
    pub sibling_sample: u32,
}

/// The criterion that ends a warm-up before `max_duration_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupUntil {
    Sibling,
    Stable,
}

/// Most requests a sibling's sample may hold: the sibling serves clients meanwhile.
pub const SIBLING_SAMPLE_MAX: u32 = 1_000;

fn default_warmup_sibling_ratio() -> f64 {
    1.2
}
fn default_warmup_sibling_percentile() -> u32 {
    90
}
fn default_warmup_sibling_sample() -> u32 {
    20
}
fn default_warmup_window() -> u32 {
    20
}
fn default_warmup_max_duration_ms() -> u64 {
    30_000
}
fn default_warmup_concurrency() -> u32 {
    4
}
fn default_warmup_timeout_ms() -> u64 {
    5_000
}

fn default_instances() -> u32 {
    1
}
fn default_stop_signal() -> Signal {
    Signal(libc::SIGTERM)
}
fn default_stop_grace_ms() -> u64 {
    10_000
}
fn default_success_exit_codes() -> Vec<i32> {
    vec![0]
}
fn default_startup_ms() -> u64 {
    1_000
}
fn default_start_retries() -> u32 {
    3
}
fn default_backoff_initial_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_priority() -> i32 {
    100
}

/// Upper bound of `instances`: a typo of 1000 should not fork a thousand processes.
pub const INSTANCES_MAX: u32 = 256;

impl ServiceConfig {
    /// A service running `command` with every other key at its default.
    pub fn with_command(command: Vec<String>) -> Self {
        Self {
            command,
            instances: default_instances(),
            port_base: None,
            front_port: None,
            env: BTreeMap::new(),
            directory: None,
            user: None,
            group: None,
            groups: None,
            umask: None,
            nofile: None,
            stop_signal: default_stop_signal(),
            stop_grace_ms: default_stop_grace_ms(),
            autorestart: Autorestart::default(),
            success_exit_codes: default_success_exit_codes(),
            startup_ms: default_startup_ms(),
            start_retries: default_start_retries(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            priority: default_priority(),
            after: Vec::new(),
            log: LogConfig::default(),
            steering: SteeringKind::default(),
            restart: RestartConfig::default(),
            health: None,
            warmup: None,
            build: None,
            hooks: HooksConfig::default(),
        }
    }

    /// Parses and validates one service file's text.
    pub fn parse(path: &Path, text: &str) -> Result<ServiceConfig, ConfigError> {
        let config: ServiceConfig = parse_toml(path, text)?;
        if let Err((key, message)) = config.validate() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of_key(text, &key),
                key,
                message,
            });
        }
        Ok(config)
    }

    /// Applies a ZooKeeper config node to this service file (the base): the node is a JSON object
    /// of service-file keys that override the file's. Every key it sets must be one of `granted`
    /// (the host file's `coordination.config_node_keys`), else the whole node is refused naming
    /// the first key that is not; a granted table (`restart`) grants every key under it. Nested
    /// objects merge key by key, so `{"health": {"timeout_ms": 500}}` keeps the file's other
    /// health keys. The result is validated like a file.
    pub fn with_config_node(
        &self,
        node: &str,
        granted: &[String],
    ) -> Result<ServiceConfig, String> {
        let merged = self.merge_config_node(node, granted)?;
        // serde and the checks quote values, and these came from ZooKeeper: bounded.
        let config: ServiceConfig = serde_json::from_value(merged)
            .map_err(|e| crate::clip::clip(&e.to_string()).into_owned())?;
        config
            .validate()
            .map_err(|(key, message)| format!("key `{key}`: {}", crate::clip::clip(&message)))?;
        Ok(config)
    }

    /// The base as JSON with the node's keys merged in, after checking that each is granted.
    fn merge_config_node(
        &self,
        node: &str,
        granted: &[String],
    ) -> Result<serde_json::Value, String> {
        let overrides: serde_json::Value = serde_json::from_str(node)
            .map_err(|e| format!("not JSON: {}", crate::clip::clip(&e.to_string())))?;
        let serde_json::Value::Object(overrides) = overrides else {
            return Err("must be a JSON object of service-file keys".into());
        };
        check_granted("", &overrides, granted)?;
        let mut base = serde_json::to_value(self).expect("a service configuration serializes");
        merge_json(&mut base, serde_json::Value::Object(overrides));
        Ok(base)
    }

    /// What `sluice push-config` can check without a host's service file: the node is a JSON
    /// object, sets only keys `granted` allows, and its values have the right types.
    pub fn check_config_node(node: &str, granted: &[String]) -> Result<(), String> {
        let base = ServiceConfig::with_command(vec!["true".into()]);
        let merged = base.merge_config_node(node, granted)?;
        serde_json::from_value::<ServiceConfig>(merged)
            .map(drop)
            .map_err(|e| crate::clip::clip(&e.to_string()).into_owned())
    }

    /// Checks what serde cannot: ranges, placeholders, octal strings. Returns the key at fault.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_owned(), message));
        if self.command.is_empty() || self.command[0].is_empty() {
            return bad("command", "must name a program".into());
        }
        for arg in &self.command {
            if let Err(message) = check_placeholders(arg, self.port_base.is_some()) {
                return bad("command", message);
            }
        }
        if let Some(dir) = &self.directory
            && let Err(message) = check_placeholders(dir, self.port_base.is_some())
        {
            return bad("directory", message);
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return bad("env", format!("invalid variable name `{name}`"));
            }
            if let Err(message) = check_placeholders(value, self.port_base.is_some()) {
                return bad("env", format!("{name}: {message}"));
            }
        }
        if self.instances == 0 || self.instances > INSTANCES_MAX {
            return bad(
                "instances",
                format!("must be between 1 and {INSTANCES_MAX}"),
            );
        }
        if let Some(base) = self.port_base {
            if base == 0 {
                return bad("port_base", "must not be 0".into());
            }
            if u32::from(base) + self.instances - 1 > u32::from(u16::MAX) {
                return bad(
                    "port_base",
                    format!(
                        "port_base + instances - 1 = {} is past 65535",
                        u32::from(base) + self.instances - 1
                    ),
                );
            }
        }
        if let Some(front) = self.front_port {
            if front == 0 {
                return bad("front_port", "must not be 0".into());
            }
            if self.instance_ports().any(|p| p == front) {
                return bad(
                    "front_port",
                    format!("{front} is also an instance port (port_base + i)"),
                );
            }
        }
        if let Some(umask) = &self.umask
            && parse_umask(umask).is_none()
        {
            return bad(
                "umask",
                format!("`{umask}` is not an octal mode between 000 and 777"),
            );
        }
        if self.nofile == Some(0) {
            return bad("nofile", "must be at least 1".into());
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return bad(
                "backoff_max_ms",
                "backoff_initial_ms must be at least 1 and backoff_max_ms at least backoff_initial_ms"
                    .into(),
            );
        }
        if self.group.is_some() && self.user.is_none() {
            return bad("group", "needs `user` as well".into());
        }
        if self.groups.is_some() && self.user.is_none() {
            return bad("groups", "needs `user` as well".into());
        }
        if self.strategy() == StrategyName::Drain
            && self.steering == SteeringKind::Iptables
            && self.front_port.is_none()
        {
            return bad(
                "restart.strategy",
                "`drain` steers the front port: set `front_port` (and `port_base`), or `steering = \"none\"`".into(),
            );
        }
        if self.front_port.is_some() && self.port_base.is_none() {
            return bad(
                "front_port",
                "needs `port_base` (the instance ports)".into(),
            );
        }
        if let Some(health) = &self.health {
            let kinds = [
                health.http.is_some(),
                health.tcp == Some(true),
                health.exec.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return bad(
                    "health",
                    "set exactly one of `http`, `tcp = true`, `exec`".into(),
                );
            }
            if (health.http.is_some() || health.tcp.is_some()) && self.port_base.is_none() {
                return bad("health", "`http` and `tcp` checks need `port_base`".into());
            }
            if let Some(path) = &health.http
                && !path.starts_with('/')
            {
                return bad("health.http", format!("`{path}` must start with `/`"));
            }
            if let Some(argv) = &health.exec {
                if argv.is_empty() {
                    return bad("health.exec", "must name a program".into());
                }
                for arg in argv {
                    if let Err(message) = check_placeholders(arg, self.port_base.is_some()) {
                        return bad("health.exec", message);
                    }
                }
            }
            if health.timeout_ms == 0 || health.interval_ms == 0 {
                return bad(
                    "health",
                    "`timeout_ms` and `interval_ms` must be at least 1".into(),
                );
            }
        }
        if let Some(build) = &self.build {
            if !build.source.contains("{build}") {
                return bad(
                    "build.source",
                    format!("`{}` must contain `{{build}}`", build.source),
                );
            }
            if build.keep_releases == 0 {
                return bad("build.keep_releases", "must be at least 1".into());
            }
        }
        for (stage, commands) in [
            ("hooks.pre_download", &self.hooks.pre_download),
            ("hooks.post_download", &self.hooks.post_download),
            ("hooks.post_install", &self.hooks.post_install),
            ("hooks.pre_restart", &self.hooks.pre_restart),
            ("hooks.post_restart", &self.hooks.post_restart),
        ] {
            if commands
                .iter()
                .any(|argv| argv.is_empty() || argv[0].is_empty())
            {
                return bad(stage, "every hook must name a program".into());
            }
        }
        if self.hooks.timeout_ms == 0 {
            return bad("hooks.timeout_ms", "must be at least 1".into());
        }
        if let Some(warmup) = &self.warmup {
            if self.port_base.is_none() {
                return bad(
                    "warmup",
                    "needs `port_base`: requests go to the instance port".into(),
                );
            }
            if warmup.requests.is_empty() && warmup.file.is_none() {
                return bad("warmup", "set `requests` or `file`".into());
            }
            for line in &warmup.requests {
                if let Err(message) = crate::warmup::parse_request(line) {
                    return bad("warmup.requests", message);
                }
            }
            if warmup.window == 0 || warmup.concurrency == 0 {
                return bad(
                    "warmup",
                    "`window` and `concurrency` must be at least 1".into(),
                );
            }
            if warmup
                .until_stable_pct
                .is_some_and(|p| !(p >= 0.0 && p.is_finite()))
            {
                return bad(
                    "warmup.until_stable_pct",
                    "must be a percentage of 0 or more".into(),
                );
            }
            if !(warmup.sibling_ratio >= 1.0 && warmup.sibling_ratio.is_finite()) {
                return bad(
                    "warmup.sibling_ratio",
                    "must be a finite number of 1 or more".into(),
                );
            }
            if sluice_strategies::warmup::Percentile::from_number(warmup.sibling_percentile)
                .is_none()
            {
                return bad("warmup.sibling_percentile", "must be 50, 90 or 99".into());
            }
            if !(1..=SIBLING_SAMPLE_MAX).contains(&warmup.sibling_sample) {
                return bad(
                    "warmup.sibling_sample",
                    format!("must be 1 to {SIBLING_SAMPLE_MAX}"),
                );
            }
        }
        Ok(())
    }

    /// The restart strategy in force: configured, else `drain` with a front port, else `rolling`.
    pub fn strategy(&self) -> StrategyName {
        self.restart
            .strategy
            .unwrap_or(if self.front_port.is_some() {
                StrategyName::Drain
            } else {
                StrategyName::Rolling
            })
    }

    /// Whether sluice writes iptables rules for this service: it has a front port and no external
    /// balancer. Whatever the strategy: only `drain` takes batches out of steering before a stop.
    pub fn steers(&self) -> bool {
        self.steering == SteeringKind::Iptables && self.front_port.is_some()
    }

    /// Instance ports in index order (empty without `port_base`).
    pub fn instance_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.port_base
            .into_iter()
            .flat_map(move |base| (0..self.instances).map(move |i| base + i as u16))
    }

    pub fn port(&self, index: u32) -> Option<u16> {
        self.port_base.map(|base| base + index as u16)
    }
}

/// Refuses the first key of a config node that no granted key covers. A key is covered when it
/// is granted or lies under a granted table; an object is looked into only when some granted key
/// lies under it, so `env` is named whole rather than by one of its variables.
fn check_granted(
    prefix: &str,
    node: &serde_json::Map<String, serde_json::Value>,
    granted: &[String],
) -> Result<(), String> {
    for (name, value) in node {
        let key = format!("{prefix}{name}");
        let covered = granted
            .iter()
            .any(|g| *g == key || key.starts_with(&format!("{g}.")));
        if covered {
            continue;
        }
        let inner = format!("{key}.");
        if let serde_json::Value::Object(map) = value
            && granted.iter().any(|g| g.starts_with(&inner))
        {
            check_granted(&inner, map, granted)?;
            continue;
        }
        return Err(format!(
            "key `{}` may not be set by a config node on this host (the host file's `coordination.config_node_keys` does not grant it)",
            crate::clip::clip(&key)
        ));
    }
    Ok(())
}

/// Merges `overrides` into `base`: objects key by key, anything else replaced.
fn merge_json(base: &mut serde_json::Value, overrides: serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(&key) {
                    Some(slot) => merge_json(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

/// Parses a umask in octal.
pub fn parse_umask(text: &str) -> Option<u32> {
    u32::from_str_radix(text, 8).ok().filter(|m| *m <= 0o777)
}

fn check_placeholders(text: &str, has_ports: bool) -> Result<(), String> {
    let subst = Substitutions {
        service: "",
        instance: 0,
        port: has_ports.then_some(1),
        release_dir: Some(Path::new("/")),
    };
    subst.apply(text).map(drop)
}

/// Values substituted into one instance's command, directory and environment.
pub struct Substitutions<'a> {
    pub service: &'a str,
    pub instance: u32,
    pub port: Option<u16>,
    pub release_dir: Option<&'a Path>,
}

impl Substitutions<'_> {
    /// Replaces placeholders; `{{` and `}}` stand for literal braces. An unknown placeholder, or
    /// `{release_dir}` without a release, is an error naming it.
    pub fn apply(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(pos) = rest.find(['{', '}']) {
            out.push_str(&rest[..pos]);
            let tail = &rest[pos..];
            if let Some(after) = tail.strip_prefix("{{") {
                out.push('{');
                rest = after;
                continue;
            }
            if let Some(after) = tail.strip_prefix("}}") {
                out.push('}');
                rest = after;
                continue;
            }
            if tail.starts_with('}') {
                return Err(format!(
                    "lone `}}` in `{text}` (write `}}}}` for a literal brace)"
                ));
            }
            let after = &tail[1..];
            let end = after.find('}').ok_or_else(|| {
                format!("unclosed `{{` in `{text}` (write `{{{{` for a literal brace)")
            })?;
            match &after[..end] {
                "port" => out.push_str(
                    &self
                        .port
                        .ok_or_else(|| format!("`{{port}}` in `{text}` needs `port_base`"))?
                        .to_string(),
                ),
                "instance" => out.push_str(&self.instance.to_string()),
                "service" => out.push_str(self.service),
                "release_dir" => {
                    let dir = self.release_dir.ok_or_else(|| {
                        format!(
                            "service {} uses `{{release_dir}}` but has no installed release",
                            self.service
                        )
                    })?;
                    out.push_str(&dir.to_string_lossy());
                }
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` in `{text}` (known: {{port}}, {{instance}}, {{service}}, {{release_dir}}; write `{{{{` for a literal brace)"
                    ));
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Checks that a service name can be used in file names and iptables chain names.
pub fn check_service_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    let starts_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok_chars || !starts_ok || name.len() > SERVICE_NAME_MAX_LEN {
        return Err(format!(
            "service name `{name}` must be 1 to {SERVICE_NAME_MAX_LEN} characters of a-z, 0-9, `-` and `_`, starting with a letter or digit"
        ));
    }
    Ok(())
}

/// All service files of a host, keyed by service name.
pub type Services = BTreeMap<String, ServiceConfig>;

/// Reads every `*.toml` in `dir`; any bad file fails the whole load, so nothing half-applies.
pub fn load_services(dir: &Path) -> Result<Services, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ConfigError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut services = Services::new();
    for path in paths {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        check_service_name(&name).map_err(|message| ConfigError::Service {
            path: path.clone(),
            message,
        })?;
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        services.insert(name, ServiceConfig::parse(&path, &text)?);
    }
    check_dependencies(dir, &services)?;
    Ok(services)
}

/// `after` must name existing services and must not form a cycle.
fn check_dependencies(dir: &Path, services: &Services) -> Result<(), ConfigError> {
    for (name, config) in services {
        for dep in &config.after {
            if !services.contains_key(dep) {
                return Err(ConfigError::Service {
                    path: dir.join(format!("{name}.toml")),
                    message: format!("key `after`: no service named `{dep}`"),
                });
            }
        }
    }
    start_order(services)
        .map(|_| ())
        .map_err(|cycle| ConfigError::Service {
            path: dir.to_owned(),
            message: format!("`after` forms a cycle through {}", cycle.join(", ")),
        })
}

/// Services in start order: every service after those it names in `after`, then by priority and name.
/// Errors with the services left in a cycle.
pub fn start_order(services: &Services) -> Result<Vec<String>, Vec<String>> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(services.len());
    while order.len() < services.len() {
        let next = services
            .iter()
            .filter(|(name, _)| !done.contains(name.as_str()))
            .filter(|(_, config)| config.after.iter().all(|d| done.contains(d.as_str())))
            .min_by_key(|(name, config)| (config.priority, name.as_str()));
        match next {
            Some((name, _)) => {
                done.insert(name);
                order.push(name.clone());
            }
            None => {
                return Err(services
                    .keys()
                    .filter(|n| !done.contains(n.as_str()))
                    .cloned()
                    .collect());
            }
        }
    }
    Ok(order)
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim_end().to_owned();
        let message = match e.span() {
            Some(span) => {
                let line = line_at(text, span.start);
                match key_at(text, span.start) {
                    // serde names unknown fields itself; for the rest, say which key is at fault.
                    Some(key) if !message.contains(&format!("`{key}`")) => {
                        format!("line {line}: key `{key}`: {message}")
                    }
                    _ => format!("line {line}: {message}"),
                }
            }
            None => message,
        };
        ConfigError::Parse {
            path: path.to_owned(),
            message,
        }
    })
}

/// The dotted key whose value (or key) covers byte `offset`, if the text parses as TOML.
fn key_at(text: &str, offset: usize) -> Option<String> {
    fn search(table: &toml::de::DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
        for (key, value) in table.iter() {
            path.push(key.get_ref().to_string());
            // A table's span may cover only its `[header]`: look inside every table.
            let found = match value.get_ref() {
                toml::de::DeValue::Table(inner) => {
                    key.span().contains(&offset) || search(inner, offset, path)
                }
                _ => key.span().contains(&offset) || value.span().contains(&offset),
            };
            if found {
                return true;
            }
            path.pop();
        }
        false
    }
    let table = toml::de::DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    search(table.get_ref(), offset, &mut path).then(|| path.join("."))
}

/// The 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The 1-based line where a top-level (or `table.key`) key is defined; 1 when not found.
fn line_of_key(text: &str, key: &str) -> usize {
    let Ok(table) = toml::de::DeTable::parse(text) else {
        return 1;
    };
    let mut parts = key.split('.');
    let first = parts.next().unwrap_or_default();
    let mut span = None;
    let mut current = table.get_ref();
    let mut want = Some(first);
    while let Some(name) = want {
        let Some((k, v)) = current.iter().find(|(k, _)| k.get_ref() == name) else {
            break;
        };
        span = Some(k.span());
        want = parts.next();
        match v.get_ref() {
            toml::de::DeValue::Table(t) => current = t,
            _ => break,
        }
    }
    span.map_or(1, |s| line_at(text, s.start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServiceConfig, ConfigError> {
        ServiceConfig::parse(Path::new("/etc/sluice/services/web.toml"), text)
    }

    #[test]
    fn the_issue_example_parses() {
        let c = parse(
            r#"
command = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
instances = 3
port_base = 9100
autorestart = "always"
stop_signal = "TERM"
stop_grace_ms = 5000
"#,
        )
        .unwrap();
        assert_eq!(c.instances, 3);
        assert_eq!(c.port(2), Some(9102));
        assert_eq!(c.stop_signal, Signal(libc::SIGTERM));
        assert_eq!(c.stop_grace_ms, 5000);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let cases: &[(&str, &str)] = &[
            (
                "command = [\"x\"]\nbogus = 1\n",
                "web.toml: line 2: unknown field `bogus`",
            ),
            (
                "command = [\"x\"]\ninstances = \"three\"\n",
                "web.toml: line 2: key `instances`: invalid type: string \"three\", expected u32",
            ),
            (
                "command = [\"x\"]\n[log]\nbackups = \"many\"\n",
                "web.toml: line 3: key `log.backups`: invalid type",
            ),
            (
                "command = [\"x\"]\n\ninstances = 0\n",
                "web.toml:3: key `instances`: must be between 1 and 256",
            ),
            (
                "command = [\"x\", \"{port}\"]\n",
                "web.toml:1: key `command`: `{port}` in `{port}` needs `port_base`",
            ),
            (
                "command = [\"x\", \"{nope}\"]\n",
                "key `command`: unknown placeholder `{nope}`",
            ),
            (
                "command = [\"x\"]\numask = \"999\"\n",
                "web.toml:2: key `umask`: `999` is not an octal mode",
            ),
            (
                "command = [\"x\"]\nstop_signal = \"BOGUS\"\n",
                "line 2: key `stop_signal`: unknown signal `BOGUS`",
            ),
            (
                "command = [\"x\"]\nport_base = 9000\ninstances = 3\nfront_port = 9001\n",
                "web.toml:4: key `front_port`: 9001 is also an instance port",
            ),
            (
                "command = [\"x\"]\n[log]\nmax_bytes = -1\n",
                "line 3: key `log.max_bytes`: invalid value: integer `-1`",
            ),
            ("instances = 2\n", "missing field `command`"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "for {text:?}\n got: {err}\nwant: {want}"
            );
        }
    }

    #[test]
    fn substitution() {
        let s = Substitutions {
            service: "web",
            instance: 2,
            port: Some(9102),
            release_dir: None,
        };
        assert_eq!(
            s.apply("--port={port} {service}-{instance}").unwrap(),
            "--port=9102 web-2"
        );
        assert_eq!(s.apply("{{\"a\": {port}}}").unwrap(), "{\"a\": 9102}");
        assert!(s.apply("x}y").is_err());
        assert!(s.apply("{port").is_err());
        assert!(
            s.apply("{release_dir}/bin")
                .unwrap_err()
                .contains("no installed release")
        );
    }

    #[test]
    fn start_order_respects_after_then_priority() {
        let mut services = Services::new();
        let mut db = ServiceConfig::with_command(vec!["db".into()]);
        db.priority = 500;
        let mut web = ServiceConfig::with_command(vec!["web".into()]);
        web.after = vec!["db".into()];
        web.priority = 1;
        let mut cache = ServiceConfig::with_command(vec!["cache".into()]);
        cache.priority = 1;
        services.insert("db".into(), db);
        services.insert("web".into(), web);
        services.insert("cache".into(), cache);
        assert_eq!(start_order(&services).unwrap(), ["cache", "db", "web"]);
        services.get_mut("db").unwrap().after = vec!["web".into()];
        assert_eq!(start_order(&services).unwrap_err(), ["db", "web"]);
    }

    #[test]
    fn service_names() {
        assert!(check_service_name("web-api_2").is_ok());
        for bad in ["", "Web", "-x", "a.b", "a/b", "abcdefghijklmnopqrstuv"] {
            assert!(check_service_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals() {
        assert_eq!(Signal::parse("hup"), Some(Signal(libc::SIGHUP)));
        assert_eq!(Signal::parse("SIGUSR2"), Some(Signal(libc::SIGUSR2)));
        assert_eq!(Signal::parse("9"), Some(Signal(9)));
        assert_eq!(Signal::parse("0"), None);
        assert_eq!(Signal::parse("NOPE"), None);
    }

    /// A config node overrides only granted keys of the local file; anything else refuses the
    /// whole node, naming the key (clipped).
    #[test]
    fn config_nodes_set_only_granted_keys() {
        let base = parse(
            "command = [\"/bin/web\"]\nuser = \"web\"\nport_base = 9100\n[health]\nhttp = \"/h\"\ntimeout_ms = 900\n",
        )
        .unwrap();
        let granted = default_config_node_keys();
        let applied = base
            .with_config_node(
                r#"{"instances": 3, "health": {"timeout_ms": 500}, "restart": {"drain_timeout_ms": 1}}"#,
                &granted,
            )
            .unwrap();
        assert_eq!(applied.instances, 3);
        assert_eq!(applied.restart.drain_timeout_ms, 1);
        let health = applied.health.as_ref().unwrap();
        assert_eq!(health.timeout_ms, 500);
        assert_eq!(
            health.http.as_deref(),
            Some("/h"),
            "the file's other keys stay"
        );
        assert_eq!(applied.command, base.command);
        assert_eq!(applied.user, base.user);

        for (node, key) in [
            (r#"{"command": ["/bin/sh"]}"#, "command"),
            (r#"{"instances": 2, "user": "root"}"#, "user"),
            (r#"{"user": null}"#, "user"),
            (r#"{"group": "root"}"#, "group"),
            (r#"{"env": {"LD_PRELOAD": "/tmp/x.so"}}"#, "env"),
            (r#"{"directory": "/"}"#, "directory"),
            (r#"{"hooks": {"pre_restart": [["/bin/sh"]]}}"#, "hooks"),
            (r#"{"health": {"exec": ["/bin/sh"]}}"#, "health.exec"),
            (r#"{"health": null}"#, "health"),
            (r#"{"log": {"dir": "/etc"}}"#, "log"),
            (r#"{"build": {"source": "file:///x/{build}"}}"#, "build"),
            (r#"{"warmup": {"file": "/etc/shadow"}}"#, "warmup.file"),
        ] {
            let err = base.with_config_node(node, &granted).unwrap_err();
            assert!(
                err.starts_with(&format!("key `{key}` may not be set by a config node")),
                "{node}: {err}"
            );
        }
        let long = format!(r#"{{"{}": 1}}"#, "k".repeat(10_000));
        let err = base.with_config_node(&long, &granted).unwrap_err();
        assert!(err.len() < 500, "the key is clipped: {} bytes", err.len());
        let long = format!(r#"{{"instances": "{}"}}"#, "v".repeat(10_000));
        let err = base.with_config_node(&long, &granted).unwrap_err();
        assert!(err.len() < 500, "the value is clipped: {} bytes", err.len());
        assert!(base.with_config_node("[1]", &granted).is_err());
        assert!(
            base.with_config_node("{bad", &granted)
                .unwrap_err()
                .starts_with("not JSON")
        );
        let err = base
            .with_config_node(r#"{"instances": 0}"#, &granted)
            .unwrap_err();
        assert!(err.contains("key `instances`"), "{err}");
        // A host may grant more, down to one variable.
        let mut more = granted.clone();
        more.push("env.LANG".into());
        let applied = base
            .with_config_node(r#"{"env": {"LANG": "C.UTF-8"}}"#, &more)
            .unwrap();
        assert_eq!(applied.env["LANG"], "C.UTF-8");
        assert!(ServiceConfig::check_config_node(r#"{"instances": "x"}"#, &granted).is_err());
        assert!(ServiceConfig::check_config_node(r#"{"instances": 2}"#, &granted).is_ok());
    }

    /// Every key of the host and service files is documented in docs/config.md, and nothing more.
    #[test]
    fn reference_page_documents_every_key() {
        let page = include_str!("../../docs/config.md");
        let mut keys = BTreeSet::new();
        let mut service = ServiceConfig::with_command(vec!["x".into()]);
        service.health = Some(toml::from_str("").unwrap());
        service.warmup = Some(toml::from_str("").unwrap());
        service.build = Some(toml::from_str("source = \"x\"").unwrap());
        collect_keys("", &serde_json::to_value(&service).unwrap(), &mut keys);
        collect_keys(
            "",
            &serde_json::to_value(HostConfig::default()).unwrap(),
            &mut keys,
        );
        let documented: BTreeSet<String> = page
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_owned)
            .collect();
        let missing: Vec<_> = keys.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&keys).collect();
        assert!(missing.is_empty(), "undocumented keys: {missing:?}");
        assert!(
            extra.is_empty(),
            "documented keys that do not exist: {extra:?}"
        );
    }

    fn collect_keys(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
        let serde_json::Value::Object(map) = value else {
            return;
        };
        for (k, v) in map {
            let key = format!("{prefix}{k}");
            if v.is_object() && k != "env" {
                collect_keys(&format!("{key}."), v, out);
            } else {
                out.insert(key);
            }
        }
    }
}
