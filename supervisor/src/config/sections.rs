//! The sections of a service file besides warm-up: `[build]`, `[hooks]`, `[restart]` (with the
//! strategy, steering and batch size) and `[health]`, each with its defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_strategies::plan::BatchSize;

use super::Signal;

fn default_true() -> bool {
    true
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
    /// Longest wait for the chain to be rewritten around an instance (out before a stop or a
    /// restart batch's drain, back in after the batch) while `iptables-restore` fails; then the
    /// stop or the restart fails with an error and the instance keeps running.
    #[serde(default = "default_steer_timeout_ms")]
    pub steer_timeout_ms: u64,
    /// The signal of the `signal` strategy.
    #[serde(default = "default_reload_signal")]
    pub reload_signal: Signal,
    /// An instance that starts runs at a low CPU weight in a cgroup of its own until it is enabled,
    /// so its start-up (a JVM's JIT and GC threads) takes only CPU the serving instances leave idle.
    #[serde(default = "default_true")]
    pub cpu_isolation: bool,
    /// The longest an instance stays at the low weight after its start, in ms; then it leaves
    /// its cgroup even if it is not enabled yet, so a saturated host cannot starve its start.
    #[serde(default = "default_cpu_low_max_ms")]
    pub cpu_low_max_ms: u64,
}

fn default_batch_size() -> BatchSpec {
    BatchSpec(BatchSize::Count(1))
}
fn default_cpu_low_max_ms() -> u64 {
    10_000
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}
fn default_steer_timeout_ms() -> u64 {
    30_000
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
            steer_timeout_ms: default_steer_timeout_ms(),
            reload_signal: default_reload_signal(),
            cpu_isolation: true,
            cpu_low_max_ms: default_cpu_low_max_ms(),
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
