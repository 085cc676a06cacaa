//! The documents the daemon and its clients exchange: every route's request and answer, the typed
//! error answer, the status of a service and of its instances, and the host status a service
//! publishes to ZooKeeper. One definition serves both ends (serde both ways), so the CLI reads
//! fields, not JSON paths.
//!
//! Readers accept documents from other versions: fields this version does not know are ignored,
//! fields it misses take their defaults. Requests are strict (`deny_unknown_fields`): a typo in a
//! request is an error, not an action silently not taken.

use serde::{Deserialize, Serialize};
use sluice_strategies::restart::{Step, Strategy};
use sluice_strategies::warmup::Summary;

use crate::config::StrategyName;

/// The routes of the control API, under `/v1`.
pub mod route {
    /// `GET` with a [`super::StatusQuery`] → [`super::StatusDocument`].
    pub const STATUS: &str = "/v1/status";
    /// `POST` a [`super::ControlRequest`] → [`super::Message`].
    pub const CONTROL: &str = "/v1/control";
    /// `POST` a [`super::DeployRequest`] → [`super::Message`] (the local backend's deploys).
    pub const DEPLOY: &str = "/v1/deploy";
    /// `POST`, no body → [`super::Message`].
    pub const RELOAD: &str = "/v1/reload";
    /// `POST`, no body → [`super::Message`] once every instance stopped.
    pub const SHUTDOWN: &str = "/v1/shutdown";
    /// `GET` with a [`super::LogsQuery`] → the log as text, streamed while `follow` is set.
    pub const LOGS: &str = "/v1/logs";
    /// `GET` → sluice's own metrics as Prometheus text (OpenMetrics when `Accept` asks for it).
    pub const METRICS: &str = "/v1/metrics";
}

/// What `POST /v1/control` does to a service's instances (wire names as `sluice` spells the verbs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlAction {
    Start,
    Stop,
    Restart,
    /// Take out of steering and wait for connections to end.
    Drain,
    /// Put back into steering.
    Enable,
    /// Send the request's `signal`.
    Signal,
}

impl ControlAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlAction::Start => "start",
            ControlAction::Stop => "stop",
            ControlAction::Restart => "restart",
            ControlAction::Drain => "drain",
            ControlAction::Enable => "enable",
            ControlAction::Signal => "signal",
        }
    }
}

/// `POST /v1/control`: an action on a service (`index` absent) or on one of its instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub service: String,
    #[serde(default)]
    pub index: Option<u32>,
    pub action: ControlAction,
    /// The signal of `signal`: a name (`HUP`, `SIGUSR1`) or a number.
    #[serde(default)]
    pub signal: Option<String>,
}

/// A control request as the server checked it, for the daemon loop: the signal resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Start,
    Stop,
    Restart,
    Drain,
    Enable,
    Signal(i32),
}

/// What `POST /v1/deploy` asks of the local backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeployVerb {
    Deploy,
    Promote,
    Rollback,
}

/// `sluice deploy`, `promote`, `rollback` on the local backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub service: String,
    pub verb: DeployVerb,
    /// The build of `deploy`.
    #[serde(default)]
    pub build: Option<String>,
    #[serde(default)]
    pub canary: bool,
}

/// A deploy request as the server checked it, for the daemon loop (`deploy` has its build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalVerb {
    Deploy { build: String, canary: bool },
    Promote,
    Rollback,
}

/// The query of `GET /v1/status`: every service, or one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// Which of an instance's two logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    #[default]
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// Lines of the end of a log that `logs` prints when the request does not say.
pub const LOG_LINES_DEFAULT: usize = 100;

/// The query of `GET /v1/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsQuery {
    pub service: String,
    pub index: u32,
    #[serde(default)]
    pub stream: LogStream,
    /// How many lines of the end to send first.
    #[serde(default = "log_lines_default")]
    pub lines: usize,
    /// Keep sending what is appended. On the wire `1` or `0` (`true`/`false` are accepted too).
    #[serde(default, with = "flag")]
    pub follow: bool,
}

fn log_lines_default() -> usize {
    LOG_LINES_DEFAULT
}

/// A query-string flag: written `1`/`0`, read from `1`, `0`, `true`, `false` (or empty: set).
mod flag {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if *value { "1" } else { "0" })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "1" | "true" | "" => Ok(true),
            "0" | "false" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "expected 1 or 0, not `{}`",
                crate::clip::clip(other)
            ))),
        }
    }
}

/// Encodes a query for a route (`?a=b&c=d`, or nothing for an empty query).
pub fn encode_query<T: Serialize>(route: &str, query: &T) -> String {
    let text = serde_urlencoded::to_string(query).expect("queries are flat structs of scalars");
    if text.is_empty() {
        route.to_owned()
    } else {
        format!("{route}?{text}")
    }
}

/// A successful answer that is not a status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub message: String,
}

/// What kind of error an answer carries: decides the HTTP status on the server and the exit code
/// of `sluice` (see [`super::Error`]). The last three never cross the wire: the client makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request names a service the daemon does not have.
    NoSuchService,
    /// The request names an instance index the service does not have.
    NoSuchInstance,
    /// No route for the method and path.
    NoSuchRoute,
    /// The request is malformed (bad JSON, unknown field, missing value, unknown signal).
    BadRequest,
    /// The peer may not use the control API.
    Forbidden,
    /// A reload found the configuration invalid; nothing changed.
    InvalidConfig,
    /// The daemon refused in its current state (a restart already running, a deploy without
    /// builds, an instance that would not start).
    Conflict,
    /// The daemon tried and failed, or is going away.
    Failed,
    /// The control socket cannot be reached (no socket, nobody listening, no permission).
    Unreachable,
    /// No answer within the request's bound.
    Timeout,
    /// The answer broke the protocol (not HTTP, not the expected JSON).
    BadAnswer,
}

/// An error answer: `{"error": "...", "kind": "no-such-service"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// Absent from the answers of daemons older than this field (and unknown kinds of newer
    /// ones read as absent): the client then goes by the HTTP status.
    #[serde(default, deserialize_with = "lenient_kind")]
    pub kind: Option<ErrorKind>,
}

fn lenient_kind<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<ErrorKind>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusDocument {
    pub services: Vec<ServiceStatus>,
    /// The host shutdown in progress, if one is (absent otherwise, and from older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<ShutdownStatus>,
}

/// Where a host shutdown (`sluice shutdown`, persisted as an intent in `data_dir`) is. Services
/// are stopped one at a time, in the reverse of start order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownStatus {
    /// When the shutdown was asked for, milliseconds since the Unix epoch (wall time, display).
    pub requested_ms: u64,
    /// Whether this daemon found the intent of an earlier one at start-up and finishes its
    /// shutdown (the earlier daemon died during it).
    pub resumed: bool,
    /// Services whose instances have all stopped.
    #[serde(default)]
    pub stopped: Vec<String>,
    /// The service being stopped now.
    #[serde(default)]
    pub stopping: Option<String>,
    /// Services still to stop, in the order they will be.
    #[serde(default)]
    pub pending: Vec<String>,
    /// Instances that still have a process (`service/index state`), of every service not stopped.
    #[serde(default)]
    pub instances_left: Vec<String>,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The fleet's restart limit (`/services/<svc>/restarting`) holds invalid data: no host is
    /// granted a restart slot until it is fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_error: Option<String>,
    /// ZooKeeper nodes this service obeys whose ACL lets anyone write them (checked with a
    /// `digest_file`, after each connect): whoever reaches ZooKeeper can steer this service.
    #[serde(default)]
    pub world_writable_nodes: Vec<String>,
    /// Why instances of a service with `restart.cpu_isolation` run without a cgroup (the host has
    /// none for sluice, or making one failed).
    pub cgroups_error: Option<String>,
    /// The service's state file could not be read (it was set aside, the message names both
    /// files): its instances are watched but nothing is started or stopped for it until the
    /// file is fixed or removed and `sluice reload` runs. Also set while a re-added service
    /// waits for its previous task to end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
    /// Why instances' process trees are tracked by their shims' sessions only (no tracking cgroup
    /// could be made): a descendant that calls `setsid` can then outlive a killed shim.
    #[serde(default)]
    pub tree_error: Option<String>,
    /// Why the service's state file could not be written (naming the file and the OS error),
    /// until a write succeeds; meanwhile nothing that depends on it is done (see
    /// `docs/cli.md`, "When the state cannot be written"). Absent from older daemons' answers.
    #[serde(default)]
    pub state_write_error: Option<String>,
    /// This host's canary analysis of the build in flight (canary hosts of a service with
    /// `[canary]`), as in its status node.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub canary: Option<CanaryStatus>,
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
    /// The restart in flight: its batch, step, what is done and what is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartStatus>,
    /// The deploy in flight: its build, phase and start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployStatus>,
    /// The canary analysis of this host (a canary host judging itself): absent otherwise, and
    /// read as absent when it is not what this version understands.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub canary: Option<CanaryStatus>,
    /// What this host's instances did since it began sampling them for the canary in flight
    /// (every host of a service with `[canary]`, prod and canary).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub canary_sample: Option<sluice_strategies::canary::Sample>,
    /// When the host wrote it (wall clock, for display); `None` when comparing two statuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_ms: Option<u64>,
}

/// A field another version may write differently: what does not parse reads as absent, so one
/// odd field never hides the rest of a host's status.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

/// Where a canary's analysis is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CanaryOutcome {
    Baking,
    Pass,
    Fail,
    Inconclusive,
}

impl CanaryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CanaryOutcome::Baking => "baking",
            CanaryOutcome::Pass => "pass",
            CanaryOutcome::Fail => "fail",
            CanaryOutcome::Inconclusive => "inconclusive",
        }
    }
}

/// What the canary host did with its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CanaryAction {
    /// `enabled := enabled/canary` (or `enabled` already named the build).
    Promoted,
    /// `enabled/canary` cleared (or it no longer named the build).
    RolledBack,
    /// Left as it is: `on_fail = "hold"`, or an inconclusive verdict.
    Held,
    /// A pass left to the deployer (`on_pass = "wait"`).
    Waiting,
}

impl CanaryStatus {
    /// `fail/rolled-back`, `baking`, `pass/waiting`: the verdict and what was done, short.
    pub fn short(&self) -> String {
        match (self.action, &self.action_error) {
            (_, Some(_)) => format!("{}/action-failed", self.outcome.as_str()),
            (Some(action), None) => {
                let action = serde_json::to_value(action).expect("actions serialize");
                format!(
                    "{}/{}",
                    self.outcome.as_str(),
                    action.as_str().unwrap_or("?")
                )
            }
            (None, None) => self.outcome.as_str().to_owned(),
        }
    }
}

/// A canary host's analysis of a build, in its status node, the service status and
/// `/services/<svc>/canary/<build>/<host>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryStatus {
    pub build: String,
    pub outcome: CanaryOutcome,
    /// Why (each failed check, or what was missing; for `baking`, what is being waited for).
    #[serde(default)]
    pub reasons: Vec<String>,
    /// The canary's figures over the bake so far.
    #[serde(default)]
    pub canary: Option<sluice_strategies::canary::Observed>,
    /// The prod hosts' figures over the same time, added up.
    #[serde(default)]
    pub baseline: Option<sluice_strategies::canary::Observed>,
    /// Prod hosts in the baseline.
    #[serde(default)]
    pub baseline_hosts: Vec<String>,
    /// When the bake began (unix ms).
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// When it was judged (unix ms); `None` while baking.
    #[serde(default)]
    pub judged_ms: Option<u64>,
    /// What was done with the verdict; `None` while baking or while the action is under way.
    #[serde(default)]
    pub action: Option<CanaryAction>,
    /// Why the action failed (ZooKeeper refused or was away).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_error: Option<String>,
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
            restart: None,
            deploy: None,
            canary: None,
            canary_sample: None,
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
        // An unknown shape of a known field reads as absent, the rest of the status stays.
        assert_eq!(host.canary, None);
        let text = r#"{"host": "h", "build": null, "target_build": null, "state": "serving",
            "last_error": null, "restart_started_ms": null, "restart_finished_ms": null,
            "canary": {"build": "b2", "outcome": "fail", "reasons": ["x"], "action": "rolled-back", "more": 1},
            "canary_sample": {"build": "b2", "since_ms": 1}}"#;
        let host: HostStatus = serde_json::from_str(text).unwrap();
        let canary = host.canary.unwrap();
        assert_eq!(canary.outcome, CanaryOutcome::Fail);
        assert_eq!(canary.action, Some(CanaryAction::RolledBack));
        assert_eq!(host.canary_sample, None);
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let err = serde_json::from_str::<ControlRequest>(
            r#"{"service": "web", "action": "stop", "force": true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("force"), "{err}");
    }

    #[test]
    fn requests_keep_the_wire_form_older_clients_send() {
        // What the CLI sent before the protocol was typed, `"signal": null` included.
        let old = r#"{"service": "web", "index": 2, "action": "restart", "signal": null}"#;
        let request: ControlRequest = serde_json::from_str(old).unwrap();
        assert_eq!(
            request,
            ControlRequest {
                service: "web".into(),
                index: Some(2),
                action: ControlAction::Restart,
                signal: None,
            }
        );
        let signal = ControlRequest {
            service: "web".into(),
            index: None,
            action: ControlAction::Signal,
            signal: Some("HUP".into()),
        };
        let value = serde_json::to_value(&signal).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"service": "web", "index": null, "action": "signal", "signal": "HUP"})
        );
        assert_eq!(
            serde_json::from_value::<ControlRequest>(value).unwrap(),
            signal
        );
        for action in [
            ControlAction::Start,
            ControlAction::Stop,
            ControlAction::Restart,
            ControlAction::Drain,
            ControlAction::Enable,
            ControlAction::Signal,
        ] {
            assert_eq!(serde_json::to_value(action).unwrap(), action.as_str());
        }
        let err =
            serde_json::from_str::<ControlRequest>(r#"{"service": "web", "action": "explode"}"#)
                .unwrap_err();
        assert!(err.to_string().contains("explode"), "{err}");

        let old = r#"{"service": "web", "verb": "deploy", "build": "b3", "canary": true}"#;
        let deploy: DeployRequest = serde_json::from_str(old).unwrap();
        assert_eq!(deploy.verb, DeployVerb::Deploy);
        assert_eq!(
            serde_json::to_value(&deploy).unwrap(),
            serde_json::from_str::<serde_json::Value>(old).unwrap()
        );
        let promote: DeployRequest = serde_json::from_str(
            r#"{"service": "web", "verb": "promote", "build": null, "canary": false}"#,
        )
        .unwrap();
        assert_eq!(promote.verb, DeployVerb::Promote);
    }

    #[test]
    fn queries_round_trip_and_read_what_older_clients_send() {
        let logs = LogsQuery {
            service: "web".into(),
            index: 3,
            stream: LogStream::Stderr,
            lines: 20,
            follow: true,
        };
        let path = encode_query(route::LOGS, &logs);
        assert_eq!(
            path,
            "/v1/logs?service=web&index=3&stream=stderr&lines=20&follow=1"
        );
        let (_, query) = path.split_once('?').unwrap();
        assert_eq!(
            serde_urlencoded::from_str::<LogsQuery>(query).unwrap(),
            logs
        );
        // Defaults for what a request leaves out; `follow=true` as well as `1`.
        let short: LogsQuery =
            serde_urlencoded::from_str("service=web&index=0&follow=true").unwrap();
        assert_eq!(short.stream, LogStream::Stdout);
        assert_eq!(short.lines, LOG_LINES_DEFAULT);
        assert!(short.follow);
        let off: LogsQuery = serde_urlencoded::from_str("service=web&index=0&follow=0").unwrap();
        assert!(!off.follow);
        assert!(serde_urlencoded::from_str::<LogsQuery>("service=web&index=x").is_err());
        assert!(
            serde_urlencoded::from_str::<LogsQuery>("service=web&index=0&follow=maybe").is_err()
        );

        assert_eq!(
            encode_query(route::STATUS, &StatusQuery::default()),
            "/v1/status"
        );
        let one = StatusQuery {
            service: Some("web".into()),
        };
        assert_eq!(encode_query(route::STATUS, &one), "/v1/status?service=web");
        assert_eq!(
            serde_urlencoded::from_str::<StatusQuery>("service=web").unwrap(),
            one
        );
    }

    #[test]
    fn the_status_document_round_trips() {
        let text = r#"{"services": [{"service": "web", "front_port": 8080, "strategy": "drain",
            "instances": [{"service": "web", "index": 0, "state": "running", "desired": "up",
              "pid": 7, "shim_pid": 6, "port": 9000, "enabled": true, "healthy": true,
              "started_ms": 1, "uptime_ms": 2, "restarts": 0, "failed_starts": 0,
              "last_exit": null, "last_error": null, "last_restart_reason": null,
              "warmup": null, "last_drain": null, "outdated": false, "cgroup": null,
              "cpu_weight": "low"}],
            "restart": {"strategy": "drain", "step": "warming", "batch": [0], "rolling_back": true,
              "batches_left": 1, "done": []},
            "last_restart_error": null, "steering_error": null, "build": "b1",
            "target_build": "b2", "deploy": {"build": "b2", "phase": "waiting-slot", "started_ms": 3},
            "deploy_error": null, "config_error": null, "cgroups_error": null,
            "tree_error": null}]}"#;
        let status: StatusDocument = serde_json::from_str(text).unwrap();
        let service = &status.services[0];
        assert_eq!(service.instances[0].state, InstanceState::Running);
        assert_eq!(service.instances[0].cpu_weight, Some(CpuWeight::Low));
        assert_eq!(service.restart.as_ref().unwrap().step, Some(Step::Warming));
        assert_eq!(
            service.deploy.as_ref().unwrap().phase,
            DeployPhase::WaitingSlot
        );
        let again: serde_json::Value = serde_json::to_value(&status).unwrap();
        let original: serde_json::Value = serde_json::from_str(text).unwrap();
        // `world_writable_nodes` and `state_write_error` are the fields written that older
        // daemons left out.
        let mut again = again;
        let service = again["services"][0].as_object_mut().unwrap();
        service.remove("world_writable_nodes");
        assert_eq!(
            service.remove("state_write_error"),
            Some(serde_json::Value::Null)
        );
        assert_eq!(again, original);
    }

    #[test]
    fn error_answers_carry_their_kind_in_kebab_case() {
        let body = ErrorBody {
            error: "no service named `x` (known: web)".into(),
            kind: Some(ErrorKind::NoSuchService),
        };
        let value = serde_json::to_value(&body).unwrap();
        assert_eq!(value["kind"], "no-such-service");
        assert_eq!(serde_json::from_value::<ErrorBody>(value).unwrap(), body);
        assert_eq!(
            serde_json::to_value(ErrorKind::InvalidConfig).unwrap(),
            "invalid-config"
        );
    }
}
