//! One service file: the top-level keys (command, instances, ports, user, stop and restart timing,
//! logs) with their defaults, the sections it holds, and what can be asked of a parsed one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::errors::{ConfigError, line_of_key, parse_toml};
use super::{
    BuildConfig, CanaryConfig, HealthConfig, HooksConfig, RestartConfig, Signal, SteeringKind,
    StrategyName, WarmupConfig,
};

/// Longest service name: iptables chain names are at most 28 bytes and ours are `SLUICE-<service>`.
pub const SERVICE_NAME_MAX_LEN: usize = 21;

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
    /// Canary analysis of new builds on canary hosts (absent: a canary waits for the deployer).
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
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
            canary: None,
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

/// Parses a umask in octal.
pub fn parse_umask(text: &str) -> Option<u32> {
    u32::from_str_radix(text, 8).ok().filter(|m| *m <= 0o777)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

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
    fn service_names() {
        assert!(check_service_name("web-api_2").is_ok());
        for bad in ["", "Web", "-x", "a.b", "a/b", "abcdefghijklmnopqrstuv"] {
            assert!(check_service_name(bad).is_err(), "{bad}");
        }
    }
}
