//! The host file (`sluice.toml`): where sluice keeps its state, sockets and service files, which
//! iptables and cgroups it uses, and which coordination backend tells it what to run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::errors::{ConfigError, line_of_key, parse_toml};

/// Default path of the host file when neither `--config` nor `SLUICE_CONFIG` is given.
pub const DEFAULT_HOST_CONFIG: &str = "/etc/sluice/sluice.toml";

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
    pub peers: super::PeerConfig,
    /// sluice's own Prometheus metrics on a TCP port (`crate::metrics`).
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: where sluice serves its own metrics besides the control socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `ip:port` of a listener that serves `GET /metrics` and nothing else; none when absent.
    #[serde(default)]
    pub listen: Option<String>,
}

impl MetricsConfig {
    /// The listener's address, none without `listen`, or what is wrong, naming the key.
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let Some(listen) = &self.listen else {
            return Ok(None);
        };
        listen.parse().map(Some).map_err(|e| {
            format!(
                "metrics.listen `{}`: {e} (an ip:port, never a name)",
                crate::clip::clip(listen)
            )
        })
    }
}

fn default_cgroup_parent() -> String {
    "sluice".into()
}

/// Whether sluice puts instances into cgroups of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupsMode {
    /// The default: starting instances that have a serving sibling, and stopping ones with
    /// nothing left to serve, run in a low-weight cgroup where the host lets sluice make one;
    /// everything else runs as it would without (docs/config.md). Each low phase is bounded, so a
    /// saturated host cannot starve a start past its health deadline nor a stop into its kill.
    #[default]
    Auto,
    /// No cgroups of sluice's for CPU weights.
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
            peers: super::PeerConfig::default(),
            metrics: MetricsConfig::default(),
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
        // Checked here so that `check-config` and `run` refuse them with exit 3, naming the key.
        if let Some(rack) = &config.rack {
            let bad = rack.is_empty()
                || rack.len() > 64
                || rack == "."
                || rack == ".."
                || rack.contains('/')
                || rack.chars().any(char::is_control);
            if bad {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    line: line_of_key(&text, "rack"),
                    key: "rack".into(),
                    message: format!(
                        "must be a name of 1 to 64 bytes without `/` or control characters (a ZooKeeper node): {}",
                        crate::clip::clip(rack)
                    ),
                });
            }
        }
        if config.peers.enabled
            && let Err(message) = config.peers.addresses()
        {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of_key(&text, "peers"),
                key: "peers".into(),
                message,
            });
        }
        if let Err(message) = config.metrics.listen_addr() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of_key(&text, "metrics.listen"),
                key: "metrics.listen".into(),
                message,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<HostConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, text).unwrap();
        HostConfig::load(&path)
    }

    #[test]
    fn metrics_listen_is_off_by_default_and_an_ip_port_when_set() {
        assert_eq!(load("").unwrap().metrics.listen_addr(), Ok(None));
        let config = load("[metrics]\nlisten = \"127.0.0.1:9310\"\n").unwrap();
        assert_eq!(
            config.metrics.listen_addr(),
            Ok(Some("127.0.0.1:9310".parse().unwrap()))
        );
    }

    #[test]
    fn a_bad_metrics_listen_is_refused_naming_the_key_and_line() {
        for bad in ["localhost:9310", "127.0.0.1", "127.0.0.1:99999", ""] {
            let text = format!("rack = \"r1\"\n[metrics]\nlisten = \"{bad}\"\n");
            match load(&text) {
                Err(ConfigError::Invalid {
                    key, line, message, ..
                }) => {
                    assert_eq!(key, "metrics.listen", "{bad}");
                    assert_eq!(line, 3, "{bad}");
                    assert!(message.contains("metrics.listen"), "{message}");
                }
                other => panic!("`{bad}` accepted: {other:?}"),
            }
        }
        assert!(matches!(
            load("[metrics]\nport = 1\n"),
            Err(ConfigError::Parse { .. }) | Err(ConfigError::Invalid { .. })
        ));
    }
}
