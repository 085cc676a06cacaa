//! One service: its instances, their phases, restart policy, steering, restarts, reloads and
//! deploys.
//!
//! Everything that changes a service goes through [`ServiceHandle`] as a message. The service is
//! two halves: `service/core.rs` decides (it owns the state, takes an event and the time, and
//! returns effects, with no I/O of its own), and `service/executor.rs` acts (the tokio task that
//! runs each effect in a small helper task and turns its outcome into the core's next event).
//! The core's restart side is in `service/restart.rs`, steering and the one drain wait in
//! `service/steer.rs`, CPU isolation in `service/cpu.rs`, deploys in `service/deploy.rs`; every instance's
//! tracking cgroup (its whole process tree) is `service/tree.rs`.

mod canary;
mod canary_sample;
#[cfg(test)]
mod canary_tests;
pub mod cgroup;
mod core;
mod cpu;
mod deploy;
pub mod drain;
mod env;
mod executor;
pub mod health;
pub mod policy;
mod restart;
pub mod shim;
#[cfg(test)]
mod sim;
pub mod spec;
pub mod state;
mod steer;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
pub mod tree;
pub mod warmup;

pub use crate::protocol::{DeployStatus, InstanceStatus, RestartStatus, ServiceStatus};

/// A peer's status node as a canary host reads it for its `canary_sample`, and the same bytes
/// as a `/metrics` body (see `coord::parse_node_data_for_fuzzing`).
#[doc(hidden)]
pub fn parse_canary_data_for_fuzzing(data: &[u8]) {
    let _ = canary::peer_sample(data);
    let config: crate::config::CanaryConfig =
        toml::from_str("metrics = \"/metrics\"").expect("a literal config parses");
    let _ = canary::parse_metrics(&String::from_utf8_lossy(data), &config);
}
pub use deploy::LocalVerb;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_shim::proto::Status;
use sluice_strategies::steering::{Iptables, Target};
use tokio::sync::{mpsc, oneshot};

use crate::config::{HostConfig, ServiceConfig};

/// Bound of a service's request queue: callers wait when it is full.
const REQUEST_QUEUE: usize = 64;
/// Bound of the queue of events from the service's helper tasks.
const EVENT_QUEUE: usize = 256;

/// What an operator can ask of a service (or of one of its instances when `index` is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    Signal(i32),
    /// Take out of steering (and wait for connections to end).
    Drain,
    /// Put back into steering.
    Enable,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

/// A request as it travels to the service's task, with its reply channel.
enum Request {
    Status(oneshot::Sender<ServiceStatus>),
    Control {
        action: Action,
        index: Option<u32>,
        reply: Reply<String>,
    },
    Reconfigure {
        config: Box<ServiceConfig>,
        reply: Reply<String>,
    },
    /// Resolves once every desired instance has either started or failed (for start ordering).
    Settled(oneshot::Sender<()>),
    /// Stops every instance (host shutdown or the service left the configuration), then ends.
    StopAll {
        forget: bool,
        reply: oneshot::Sender<()>,
    },
    /// The host is shutting down: nothing of the service starts any more.
    ShuttingDown,
    /// The coordination backend named the build this host should run.
    Desired {
        build: Option<String>,
    },
    /// ZooKeeper's view of the rollout, for the canary analysis.
    CanaryView(canary::CanaryView),
    /// ZooKeeper became reachable or not.
    Connection(bool),
    /// The configuration node is bad (`Some`) or good again (`None`).
    ConfigError(Option<String>),
    /// ZooKeeper nodes this service obeys that the world may write (read after each connect).
    WorldWritable(Vec<String>),
    /// The fleet's restart limit is invalid (`Some`: why, naming the node) or valid again.
    SlotError(Option<String>),
    /// `sluice deploy`, `promote`, `rollback` on the local backend.
    Local {
        verb: LocalVerb,
        reply: Reply<String>,
    },
    /// `sluice reload`: a service in `state_error` reads its state file again (answers what
    /// became of it; nothing for a service that is not in `state_error`).
    RecheckState(Reply<String>),
}

/// The handle through which everything else talks to a service's task.
#[derive(Clone)]
pub struct ServiceHandle {
    tx: mpsc::Sender<Request>,
}

impl ServiceHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    pub async fn status(&self) -> Option<ServiceStatus> {
        self.ask(Request::Status).await
    }

    pub async fn control(&self, action: Action, index: Option<u32>) -> Result<String, String> {
        self.ask(|reply| Request::Control {
            action,
            index,
            reply,
        })
        .await
        .unwrap_or_else(|| Err("the service's task has ended".into()))
    }

    pub async fn reconfigure(&self, config: ServiceConfig) -> Result<String, String> {
        self.ask(|reply| Request::Reconfigure {
            config: Box::new(config),
            reply,
        })
        .await
        .unwrap_or_else(|| Err("the service's task has ended".into()))
    }

    pub async fn settled(&self) {
        self.ask(Request::Settled).await;
    }

    pub async fn desired(&self, build: Option<String>) {
        let _ = self.tx.send(Request::Desired { build }).await;
    }

    /// ZooKeeper's `enabled`, `enabled/canary` and this host's role, for the canary analysis.
    pub async fn canary_view(
        &self,
        enabled: Option<String>,
        canary: Option<String>,
        canary_role: bool,
    ) {
        let view = canary::CanaryView {
            enabled,
            canary,
            canary_role,
        };
        let _ = self.tx.send(Request::CanaryView(view)).await;
    }

    pub async fn connection(&self, connected: bool) {
        let _ = self.tx.send(Request::Connection(connected)).await;
    }

    pub async fn config_error(&self, error: Option<String>) {
        let _ = self.tx.send(Request::ConfigError(error)).await;
    }

    pub async fn world_writable(&self, nodes: Vec<String>) {
        let _ = self.tx.send(Request::WorldWritable(nodes)).await;
    }

    pub async fn slot_error(&self, error: Option<String>) {
        let _ = self.tx.send(Request::SlotError(error)).await;
    }

    pub async fn local(&self, verb: LocalVerb) -> Result<String, String> {
        self.ask(|reply| Request::Local { verb, reply })
            .await
            .unwrap_or_else(|| Err("the service's task has ended".into()))
    }

    /// The host is shutting down (its intent is persisted): nothing of the service starts any
    /// more; its instances are stopped by its `stop_all` in its turn.
    pub async fn shutting_down(&self) {
        let _ = self.tx.send(Request::ShuttingDown).await;
    }

    /// Stops every instance and ends the task; `forget` also removes the persisted state and the
    /// service's steering.
    pub async fn stop_all(&self, forget: bool) {
        self.ask(|reply| Request::StopAll { forget, reply }).await;
    }

    /// For `sluice reload`: a service in `state_error` reads its state file again. `Some` says
    /// what became of it.
    pub async fn recheck_state(&self) -> Option<String> {
        match self.ask(Request::RecheckState).await {
            Some(Ok(message)) if !message.is_empty() => Some(message),
            Some(Err(message)) => Some(message),
            _ => None,
        }
    }

    /// Whether the service's task has ended (it owns nothing any more).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves once the service's task has ended: its instances are stopped or left to the next
    /// daemon, its shims released, its cleanup done.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// What is shared by every service task and never changes while the daemon runs.
pub struct Context {
    /// sluice's own metrics, recorded as outcomes arrive.
    pub metrics: Arc<crate::metrics::Metrics>,
    pub host: HostConfig,
    pub shim_binary: PathBuf,
    /// The iptables backend; `None` where steering is impossible (not root), which services
    /// that need it report as their steering error.
    pub iptables: Option<Iptables>,
    /// ZooKeeper, with the `zookeeper` backend.
    pub coord: Option<crate::coord::Zk>,
    /// Builds served to and fetched from other hosts, with `peers.enabled` and ZooKeeper.
    pub peers: Option<crate::build::peer::Peers>,
    /// The parent cgroup of starting instances, or why there is none.
    pub cgroups: crate::service::cgroup::Detected,
    /// The parent of every instance's tracking cgroup, or why there is none.
    pub tree: crate::service::tree::Tree,
}

/// Starts the task of service `name` and returns its handle. `found` are the shims the daemon
/// found for this service at start-up, with what they said. `previous` is the task that owned
/// the name before (removed by a reload and not finished yet): the new task reads the state
/// file and touches instances only once that one has ended, so a name has one owner at a time.
/// A state file that cannot be read puts the service in `state_error`; it never fails the
/// daemon.
pub fn spawn(
    ctx: Arc<Context>,
    name: String,
    config: ServiceConfig,
    found: Vec<(u32, Status)>,
    previous: Option<ServiceHandle>,
) -> ServiceHandle {
    spawn_with(ctx, name, config, found, previous, Startup::Ordinary)
}

/// How a service task begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// Adopt what runs, start what is missing, resume a restart, deploy the desired build.
    Ordinary,
    /// The daemon finishes a persisted host shutdown: adopt what runs and start nothing.
    ForShutdown,
}

/// [`spawn`], beginning as `startup` says.
pub fn spawn_with(
    ctx: Arc<Context>,
    name: String,
    config: ServiceConfig,
    found: Vec<(u32, Status)>,
    previous: Option<ServiceHandle>,
    startup: Startup,
) -> ServiceHandle {
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    tokio::spawn(executor::run(
        ctx, name, config, found, previous, startup, rx, events_tx, events,
    ));
    ServiceHandle { tx }
}

/// Where the steering chain should send new connections.
fn targets(config: &ServiceConfig, enabled: &BTreeSet<u32>) -> Vec<Target> {
    enabled
        .iter()
        .filter_map(|&index| config.port(index).map(|port| Target { index, port }))
        .collect()
}

/// Makes an instance's log directory, which may lie below a directory its service user can write
/// (`log.dir = "/var/log/web"`): the part that exists is opened without following a link planted
/// there, and the missing part is made below it with `mkdirat`, so nothing is created where a link
/// points (see `sluice-safefs`).
fn make_log_dir(dir: &Path) -> std::io::Result<()> {
    let mut existing = dir;
    let mut missing = Vec::new();
    while std::fs::symlink_metadata(existing).is_err() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
            break;
        };
        missing.push(name);
        existing = parent;
    }
    let missing: PathBuf = missing.iter().rev().collect();
    sluice_safefs::Dir::open(existing)?
        .make_dirs(&missing, 0o755)
        .map(drop)
}
