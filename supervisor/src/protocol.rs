//! The documents the daemon and its clients exchange: control requests, answers, the status of a
//! service and of its instances, and the host status a service publishes to ZooKeeper. One
//! definition serves both ends (serde both ways), so the CLI reads fields, not JSON paths.
//!
//! Readers accept documents from other versions: fields this version does not know are ignored,
//! fields it misses take their defaults. Requests are strict (`deny_unknown_fields`): a typo in a
//! request is an error, not an action silently not taken.

use serde::{Deserialize, Serialize};
use sluice_strategies::restart::{Step, Strategy};
use sluice_strategies::warmup::Summary;

use crate::config::StrategyName;

/// A control request as the CLI sends it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub service: String,
    #[serde(default)]
    pub index: Option<u32>,
    pub action: String,
    #[serde(default)]
    pub signal: Option<String>,
}

/// `sluice deploy`, `promote`, `rollback` on the local backend.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub service: String,
    pub verb: String,
    #[serde(default)]
    pub build: Option<String>,
    #[serde(default)]
    pub canary: bool,
}

/// A successful answer that is not a status.
#[derive(Debug, Serialize, Deserialize)]
pub struct Message {
    pub message: String,
}

/// An error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusDocument {
    pub services: Vec<ServiceStatus>,
}

/// Where an instance is in its life, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Stopped,
    Starting,
    Running,
    Draining,
    Stopping,
    Backoff,
    Exited,
    Fatal,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Stopped => "stopped",
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Draining => "draining",
            InstanceState::Stopping => "stopping",
            InstanceState::Backoff => "backoff",
            InstanceState::Exited => "exited",
            InstanceState::Fatal => "fatal",
        }
    }
}

/// Whether the operator (or the configuration) wants an instance running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Up,
    Down,
}

/// The CPU weight of an instance that runs in one of sluice's cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuWeight {
    /// Starting and warming up beside a serving sibling.
    Low,
}

/// Status of one instance as `sluice status --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub service: String,
    pub index: u32,
    pub state: InstanceState,
    pub desired: Desired,
    pub pid: Option<u32>,
    pub shim_pid: Option<u32>,
    pub port: Option<u16>,
    /// Whether steering sends new connections to it; `null` for services without steering.
    pub enabled: Option<bool>,
    pub healthy: bool,
    pub started_ms: Option<u64>,
    pub uptime_ms: Option<u64>,
    pub restarts: u32,
    pub failed_starts: u32,
    pub last_exit: Option<String>,
    pub last_error: Option<String>,
    /// Why sluice last restarted it on its own (a failed liveness probe, a failed readiness check).
    pub last_restart_reason: Option<String>,
    /// The last warm-up: requests, errors, first and last latency windows.
    pub warmup: Option<Summary>,
    /// How its last drain ended (`idle`, `closed`, `timeout`), with the connections left and the
    /// wait.
    pub last_drain: Option<sluice_strategies::drain::Outcome>,
    /// The instance runs with an older configuration than the current one.
    pub outdated: bool,
    /// The cgroup directory the instance runs in; `null` without CPU isolation.
    pub cgroup: Option<String>,
    /// `low` while it starts and warms up beside a serving sibling; `null` otherwise (it then runs
    /// outside sluice's cgroups, at the weight of any other process).
    pub cpu_weight: Option<CpuWeight>,
}

/// A restart in progress, as status shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestartStatus {
    pub strategy: Strategy,
    pub step: Option<Step>,
    pub batch: Vec<u32>,
    pub rolling_back: bool,
    pub batches_left: usize,
    pub done: Vec<u32>,
}

/// Where a deploy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployPhase {
    /// Hooks, download, verification, extraction.
    Installing,
    PreRestart,
    /// Waiting for one of the fleet's restart slots.
    WaitingSlot,
    Restarting,
    PostRestart,
}

/// A deploy in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployStatus {
    pub build: String,
    pub phase: DeployPhase,
    pub started_ms: u64,
}

/// Status of one service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub front_port: Option<u16>,
    pub strategy: StrategyName,
    pub instances: Vec<InstanceStatus>,
    pub restart: Option<RestartStatus>,
    /// Why the last restart failed (its failed batch was rolled back).
    pub last_restart_error: Option<String>,
    pub steering_error: Option<String>,
    /// The build the instances run (`null` without builds).
    pub build: Option<String>,
    /// The build a deploy is bringing them to.
    pub target_build: Option<String>,
    pub deploy: Option<DeployStatus>,
    /// The last deploy failure (hook, download, verification, restart).
    pub deploy_error: Option<String>,
    /// A bad configuration node in ZooKeeper; the last good configuration runs.
    pub config_error: Option<String>,
    /// ZooKeeper nodes this service obeys whose ACL lets anyone write them (checked with a
    /// `digest_file`, after each connect): whoever reaches ZooKeeper can steer this service.
    #[serde(default)]
    pub world_writable_nodes: Vec<String>,
    /// Why instances of a service with `restart.cpu_isolation` run without a cgroup (the host has
    /// none for sluice, or making one failed).
    pub cgroups_error: Option<String>,
}

/// A host's state in a fleet deploy, as its status node says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    Installing,
    /// Waiting for a restart slot.
    Waiting,
    Restarting,
    Finishing,
    Failed,
    Serving,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Installing => "installing",
            HostState::Waiting => "waiting",
            HostState::Restarting => "restarting",
            HostState::Finishing => "finishing",
            HostState::Failed => "failed",
            HostState::Serving => "serving",
        }
    }
}

/// One instance in a host's status node (smaller than [`InstanceStatus`]: it is written to
/// ZooKeeper after every change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInstance {
    pub index: u32,
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub enabled: Option<bool>,
    pub healthy: bool,
    pub warmup: Option<Summary>,
    pub last_error: Option<String>,
}

/// A host's status as ZooKeeper's `status/<host>` holds it (one per service).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub build: Option<String>,
    pub target_build: Option<String>,
    pub state: HostState,
    #[serde(default)]
    pub instances: Vec<HostInstance>,
    pub last_error: Option<String>,
    pub restart_started_ms: Option<u64>,
    pub restart_finished_ms: Option<u64>,
    /// When the host wrote it (wall clock, for display); `None` when comparing two statuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_names_stay_what_clients_read() {
        let host = HostStatus {
            host: "h1".into(),
            build: Some("b1".into()),
            target_build: None,
            state: HostState::Waiting,
            instances: vec![HostInstance {
                index: 0,
                state: InstanceState::Backoff,
                pid: None,
                enabled: Some(false),
                healthy: false,
                warmup: None,
                last_error: None,
            }],
            last_error: None,
            restart_started_ms: None,
            restart_finished_ms: None,
            updated_ms: None,
        };
        let value = serde_json::to_value(&host).unwrap();
        assert_eq!(value["state"], "waiting");
        assert_eq!(value["instances"][0]["state"], "backoff");
        assert!(value.get("updated_ms").is_none());
        let back: HostStatus = serde_json::from_value(value).unwrap();
        assert_eq!(back, host);
        assert_eq!(
            serde_json::to_value(DeployPhase::WaitingSlot).unwrap(),
            "waiting-slot"
        );
        assert_eq!(serde_json::to_value(Desired::Up).unwrap(), "up");
        assert_eq!(serde_json::to_value(CpuWeight::Low).unwrap(), "low");
    }

    #[test]
    fn readers_ignore_what_a_newer_daemon_adds() {
        let text = r#"{"host": "h", "build": null, "target_build": null, "state": "serving",
            "last_error": null, "restart_started_ms": null, "restart_finished_ms": null,
            "updated_ms": 5, "canary": {"verdict": "pass"}}"#;
        let host: HostStatus = serde_json::from_str(text).unwrap();
        assert_eq!(host.state, HostState::Serving);
        assert!(host.instances.is_empty());
        assert_eq!(host.updated_ms, Some(5));
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let err = serde_json::from_str::<ControlRequest>(
            r#"{"service": "web", "action": "stop", "force": true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("force"), "{err}");
    }
}
