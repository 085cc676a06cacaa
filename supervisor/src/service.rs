//! The owner task of one service: its instances, their phases, restart policy, steering, restarts
//! and reloads.
//!
//! Everything that changes a service goes through [`ServiceHandle`] as a message; the task answers
//! when the change took effect. Slow work (spawning a shim, waiting for an exit, probes, warm-ups,
//! iptables, timers) runs in small tasks that report back as [`Event`]s carrying the instance's
//! generation (or the restart's epoch), so a late event about something that has since changed is
//! recognised and dropped. The restart executor is in `service/restart.rs`, steering in
//! `service/steer.rs`.

mod cpu;
mod deploy;
mod restart;
mod steer;

pub use crate::protocol::{DeployStatus, InstanceStatus, RestartStatus, ServiceStatus};
pub use deploy::LocalVerb;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_shim::proto::{Outcome, Status};
use sluice_strategies::restart::{Input, Version};
use sluice_strategies::steering::{Iptables, Target};
use sluice_strategies::warmup::Summary;
use tokio::sync::{mpsc, oneshot};

use crate::config::{HostConfig, ServiceConfig};
use crate::health::Probe;
use crate::policy::{self, Decision};
use crate::protocol::{CpuWeight, Desired, InstanceState};
use crate::shim::{self, ShimError, ShimPaths};
use crate::spec::InstanceSpec;
use crate::state::{self, ServiceState};

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
    /// The coordination backend named the build this host should run.
    Desired {
        build: Option<String>,
    },
    /// ZooKeeper became reachable or not.
    Connection(bool),
    /// The configuration node is bad (`Some`) or good again (`None`).
    ConfigError(Option<String>),
    /// ZooKeeper nodes this service obeys that the world may write (read after each connect).
    WorldWritable(Vec<String>),
    /// `sluice deploy`, `promote`, `rollback` on the local backend.
    Local {
        verb: LocalVerb,
        reply: Reply<String>,
    },
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

    pub async fn connection(&self, connected: bool) {
        let _ = self.tx.send(Request::Connection(connected)).await;
    }

    pub async fn config_error(&self, error: Option<String>) {
        let _ = self.tx.send(Request::ConfigError(error)).await;
    }

    pub async fn world_writable(&self, nodes: Vec<String>) {
        let _ = self.tx.send(Request::WorldWritable(nodes)).await;
    }

    pub async fn local(&self, verb: LocalVerb) -> Result<String, String> {
        self.ask(|reply| Request::Local { verb, reply })
            .await
            .unwrap_or_else(|| Err("the service's task has ended".into()))
    }

    /// Stops every instance and ends the task; `forget` also removes the persisted state and the
    /// service's steering.
    pub async fn stop_all(&self, forget: bool) {
        self.ask(|reply| Request::StopAll { forget, reply }).await;
    }
}

/// What is shared by every service task and never changes while the daemon runs.
pub struct Context {
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
    pub cgroups: crate::cgroup::Detected,
}

/// Where one instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No process, and none wanted right now.
    Stopped,
    /// A shim is being spawned.
    Spawning,
    /// Running for less than `startup_ms`.
    Starting,
    Running,
    /// Out of steering, waiting for its connections to end before it is stopped.
    Draining,
    /// Asked to stop; waiting for the exit.
    Stopping,
    /// Waiting to be started again after a failed start.
    Backoff,
    /// Exited and, by policy, not restarted.
    Exited,
    /// Failed to start `start_retries` times in a row; only an operator starts it again.
    Fatal,
}

impl Phase {
    fn state(self) -> InstanceState {
        match self {
            Phase::Stopped => InstanceState::Stopped,
            Phase::Spawning | Phase::Starting => InstanceState::Starting,
            Phase::Running => InstanceState::Running,
            Phase::Draining => InstanceState::Draining,
            Phase::Stopping => InstanceState::Stopping,
            Phase::Backoff => InstanceState::Backoff,
            Phase::Exited => InstanceState::Exited,
            Phase::Fatal => InstanceState::Fatal,
        }
    }

    /// A shim exists (or is being made) for the instance.
    fn has_process(self) -> bool {
        matches!(
            self,
            Phase::Spawning | Phase::Starting | Phase::Running | Phase::Draining | Phase::Stopping
        )
    }

    /// The instance's process runs and nobody asked it to go.
    fn is_up(self) -> bool {
        matches!(self, Phase::Starting | Phase::Running)
    }
}

#[derive(Debug, Clone)]
struct ShimInfo {
    shim_pid: u32,
    pid: u32,
    started_ms: u64,
    tag: String,
}

/// What to do once a stop completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    Nothing,
    /// Start it again, with this version of the configuration.
    Start(Version),
    /// It failed its readiness check: count a failed start.
    FailedStart,
    /// The index left the configuration: drop the instance.
    Remove,
}

#[derive(Debug)]
struct Instance {
    index: u32,
    phase: Phase,
    shim: Option<ShimInfo>,
    /// Bumped whenever the instance gets a new process or timer; stale events carry an old value.
    generation: u64,
    failed_starts: u32,
    restarts: u32,
    after_stop: AfterStop,
    last_exit: Option<String>,
    last_error: Option<String>,
    last_restart_reason: Option<String>,
    /// The release of the previous shim; the next spawn waits for it (the lock must be free).
    releasing: Option<tokio::task::JoinHandle<()>>,
    /// Passed its readiness check since its last start: only healthy instances get traffic.
    healthy: bool,
    warmup: Option<Summary>,
    last_drain: Option<sluice_strategies::drain::Outcome>,
    /// The cgroup directory its process (or its last one) was placed in; removed when the
    /// instance is gone for good.
    cgroup: Option<PathBuf>,
    /// The weight last written to that cgroup; `None` when unknown (adopted from an earlier daemon).
    cpu_weight: Option<crate::cgroup::Weight>,
    /// Why its last start or weight change could not use a cgroup.
    cgroup_error: Option<String>,
}

impl Instance {
    fn new(index: u32) -> Self {
        Self {
            index,
            phase: Phase::Stopped,
            shim: None,
            generation: 0,
            failed_starts: 0,
            restarts: 0,
            after_stop: AfterStop::Nothing,
            last_exit: None,
            last_error: None,
            last_restart_reason: None,
            releasing: None,
            healthy: false,
            warmup: None,
            last_drain: None,
            cgroup: None,
            cpu_weight: None,
            cgroup_error: None,
        }
    }
}

enum Event {
    Spawned {
        index: u32,
        generation: u64,
        result: Result<(ShimInfo, bool), ShimError>,
        /// The cgroup made for it (`None`: not wanted).
        cgroup: Option<Result<PathBuf, String>>,
    },
    Exited {
        index: u32,
        generation: u64,
        status: Result<Status, ShimError>,
    },
    StartupElapsed {
        index: u32,
        generation: u64,
    },
    BackoffElapsed {
        index: u32,
        generation: u64,
    },
    /// The readiness probe after a start outside a restart.
    Ready {
        index: u32,
        generation: u64,
        result: Result<(), String>,
    },
    LivenessFailed {
        index: u32,
        generation: u64,
        reason: String,
    },
    /// A drain wait ended (`outcome` is `None` for an instance without a port: nothing to wait
    /// for).
    Drained {
        index: u32,
        waiter: steer::DrainFor,
        outcome: Option<sluice_strategies::drain::Outcome>,
    },
    /// An iptables transaction finished; `Ok` carries the instances now steered to.
    Steered {
        result: Result<BTreeSet<u32>, String>,
    },
    SteerRetry,
    /// An answer to an action of the restart machine.
    Machine {
        epoch: u64,
        input: Input,
    },
    /// A warm-up of the restart ended.
    Warmed {
        index: u32,
        epoch: u64,
        result: Result<Summary, (String, Summary)>,
    },
    /// A deploy's download, install hooks and `pre_restart` hooks finished.
    Installed {
        build: String,
        result: Result<(), String>,
    },
    PostRestartDone {
        build: String,
        result: Result<(), String>,
    },
    Slot {
        result: Result<crate::coord::Slot, String>,
    },
}

/// A caller waiting for instances to reach a goal.
struct Waiter {
    indices: Vec<u32>,
    goal: Goal,
    reply: Reply<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    Up,
    Down,
    /// Out of steering (the drain of its connections is waited for separately).
    Unsteered,
    Steered,
}

/// Starts the task of service `name` and returns its handle. `found` are the shims the daemon
/// found for this service at start-up, with what they said.
pub fn spawn(
    ctx: Arc<Context>,
    name: String,
    config: ServiceConfig,
    found: Vec<(u32, Status)>,
) -> Result<ServiceHandle, String> {
    let state_path = state::path(&ctx.host.state_dir(), &name);
    let state = state::load(&state_path).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let mut service = Service {
        ctx,
        name,
        config,
        state,
        state_path,
        instances: BTreeMap::new(),
        events_tx,
        waiters: Vec::new(),
        settled: Vec::new(),
        stopping_all: None,
        steering: steer::Steering::default(),
        exec: restart::Executor::default(),
        restart_replies: Vec::new(),
        coord: deploy::Coordination::default(),
        cgroup_removals: BTreeMap::new(),
    };
    service.adopt(found);
    tokio::spawn(service.run(rx, events));
    Ok(ServiceHandle { tx })
}

struct Service {
    ctx: Arc<Context>,
    name: String,
    config: ServiceConfig,
    /// Desired state; persisted before it is acted on.
    state: ServiceState,
    state_path: PathBuf,
    instances: BTreeMap<u32, Instance>,
    events_tx: mpsc::Sender<Event>,
    waiters: Vec<Waiter>,
    settled: Vec<oneshot::Sender<()>>,
    /// Set while every instance is being stopped; the task ends when they all are.
    stopping_all: Option<(bool, oneshot::Sender<()>)>,
    steering: steer::Steering,
    /// What the restart in progress waits for (rebuilt from the persisted machine on resume).
    exec: restart::Executor,
    /// Callers of `sluice restart` waiting for the restart in progress.
    restart_replies: Vec<Reply<String>>,
    /// Desired build, deploy in progress, fleet slot, status publishing.
    coord: deploy::Coordination,
    /// Removals of instance cgroups in progress, by index: a new start of the index waits for its
    /// removal, and the task does not end before they finish.
    cgroup_removals: BTreeMap<u32, tokio::task::JoinHandle<()>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn describe(outcome: Option<Outcome>) -> String {
    match outcome {
        Some(Outcome::Code(code)) => format!("exit code {code}"),
        Some(Outcome::Signal(signal)) => {
            format!("killed by signal {}", crate::config::Signal(signal))
        }
        None => "shim lost; exit status unknown".into(),
    }
}

impl Service {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut events: mpsc::Receiver<Event>,
    ) {
        self.steering_startup();
        self.reconcile();
        self.resume_restart();
        self.local_desired_changed();
        self.after_change();
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    Some(request) => self.on_request(request),
                    // Every handle is gone: the daemon is exiting and leaves instances running.
                    None => return,
                },
                Some(event) = events.recv() => self.on_event(event),
            }
            self.after_change();
            if self.stopping_all.is_some()
                && self.instances.values().all(|i| !i.phase.has_process())
            {
                let (forget, reply) = self.stopping_all.take().expect("checked above");
                self.finish_cgroup_removals().await;
                if forget {
                    self.forget().await;
                }
                let _ = reply.send(());
                return;
            }
        }
    }

    /// The service left the configuration: its state file and its steering go too.
    async fn forget(&mut self) {
        if let Err(e) = state::remove(&self.state_path) {
            tracing::error!(service = %self.name, "{e}");
        }
        if let Some(iptables) = self.ctx.iptables.clone() {
            let name = self.name.clone();
            let removed = tokio::task::spawn_blocking(move || iptables.remove(&name)).await;
            if let Ok(Err(e)) = removed {
                tracing::error!(service = %self.name, "removing steering: {e}");
            }
        }
    }

    fn paths(&self, index: u32) -> ShimPaths {
        ShimPaths::new(&self.ctx.host.shim_dir(), &self.name, index)
    }

    fn desired_up(&self, index: u32) -> bool {
        self.stopping_all.is_none()
            && index < self.config.instances
            && !self.state.stopped.contains(&index)
    }

    /// The release the service runs from: the target of `data_dir/<service>/current`, if any.
    fn release_dir(&self) -> Option<PathBuf> {
        std::fs::canonicalize(self.ctx.host.data_dir.join(&self.name).join("current")).ok()
    }

    /// The configuration a version stands for: `Old` is what instances were last brought to.
    fn config_for(&self, version: Version) -> &ServiceConfig {
        match version {
            Version::New => &self.config,
            Version::Old => self.state.applied.as_ref().unwrap_or(&self.config),
        }
    }

    /// The release a version runs from: its build's release directory, else whatever `current`
    /// points to.
    fn release_for(&self, version: Version) -> Option<PathBuf> {
        let build = match version {
            Version::New => self
                .state
                .target_build
                .as_ref()
                .or(self.state.build.as_ref()),
            Version::Old => self.state.build.as_ref(),
        };
        self.release_of(build.map(String::as_str))
            .or_else(|| self.release_dir())
    }

    fn spec(&self, index: u32, version: Version) -> Result<InstanceSpec, String> {
        InstanceSpec::build(
            &self.ctx.host,
            &self.name,
            self.config_for(version),
            index,
            self.release_for(version).as_deref(),
        )
    }

    fn persist(&self) -> Result<(), String> {
        state::store(&self.state_path, &self.state).map_err(|e| e.to_string())
    }

    fn persist_logged(&self) {
        if let Err(e) = self.persist() {
            tracing::error!(service = %self.name, "{e}");
        }
    }

    fn probe(&self, index: u32) -> Option<Probe> {
        let config = self.config.health.clone()?;
        let subst = crate::config::Substitutions {
            service: &self.name,
            instance: index,
            port: self.config.port(index),
            release_dir: None,
        };
        let argv = config.exec.as_ref().map(|argv| {
            argv.iter()
                .map(|a| subst.apply(a).unwrap_or_else(|_| a.clone()))
                .collect()
        });
        // The instance's own identity, environment and directory; a spec that cannot be built
        // (an unresolvable user) fails the probe naming why, and runs nothing.
        let exec_as = match config.exec {
            None => Err("not an exec probe".to_owned()),
            Some(_) => self.spec(index, Version::New),
        }
        .map(|spec| {
            let identity = match (spec.uid, spec.gid) {
                (Some(uid), Some(gid)) => Some(sluice_hooks::Identity {
                    uid,
                    gid,
                    groups: spec.groups.unwrap_or_default(),
                }),
                _ => None,
            };
            crate::health::ExecContext {
                identity,
                env: spec.env,
                directory: spec.directory,
            }
        });
        Some(Probe {
            config,
            port: self.config.port(index),
            argv,
            exec_as,
        })
    }

    /// Takes over the shims the daemon found: running ones are watched, exited ones are handled
    /// as the exits the previous daemon did not see.
    fn adopt(&mut self, found: Vec<(u32, Status)>) {
        for (index, status) in found {
            let mut instance = Instance::new(index);
            instance.generation = 1;
            instance.cgroup = self.existing_cgroup(index);
            match status {
                Status::Running {
                    shim_pid,
                    pid,
                    started_ms,
                    tag,
                    stopping,
                } => {
                    instance.shim = Some(ShimInfo {
                        shim_pid,
                        pid,
                        started_ms,
                        tag,
                    });
                    let age_ms = now_ms().saturating_sub(started_ms);
                    instance.phase = if stopping {
                        Phase::Stopping
                    } else if age_ms >= self.config.startup_ms {
                        Phase::Running
                    } else {
                        Phase::Starting
                    };
                    // It was serving when the previous daemon died; a restart of ours must not
                    // take it out of steering.
                    instance.healthy = instance.phase == Phase::Running;
                    tracing::info!(service = %self.name, index, pid, "adopted running instance");
                    let phase = instance.phase;
                    self.instances.insert(index, instance);
                    self.watch(index, 1);
                    if phase == Phase::Starting {
                        self.timer(index, 1, self.config.startup_ms - age_ms, true);
                        self.start_readiness(index, 1);
                    } else if phase == Phase::Running {
                        self.start_liveness(index, 1);
                    }
                }
                Status::Exited {
                    shim_pid,
                    pid,
                    started_ms,
                    ref tag,
                    ..
                } => {
                    instance.shim = Some(ShimInfo {
                        shim_pid,
                        pid,
                        started_ms,
                        tag: tag.clone(),
                    });
                    instance.phase = Phase::Running;
                    self.instances.insert(index, instance);
                    tracing::info!(service = %self.name, index, "adopted an instance that exited while no daemon watched");
                    self.on_exit(index, Ok(status));
                }
            }
        }
    }

    /// Brings instances in line with the configuration and the desired state: starts what should
    /// run, stops what should not.
    fn reconcile(&mut self) {
        for index in 0..self.config.instances {
            self.instances
                .entry(index)
                .or_insert_with(|| Instance::new(index));
        }
        let indices: Vec<u32> = self.instances.keys().copied().collect();
        for index in indices {
            if self.exec.in_batch(&self.state, index) {
                continue;
            }
            let phase = self.instances[&index].phase;
            if index >= self.config.instances {
                if phase.has_process() {
                    self.stop(index, AfterStop::Remove, true);
                } else {
                    self.remove_cgroup(index);
                    self.instances.remove(&index);
                }
            } else if self.desired_up(index) {
                if phase == Phase::Stopped && self.waiting_for_first_build() {
                    let instance = self.instances.get_mut(&index).expect("listed above");
                    instance.last_error = Some("waiting for the first build to be deployed".into());
                } else if phase == Phase::Stopped {
                    self.start(index, Version::New);
                }
            } else if phase.is_up() {
                self.stop(index, AfterStop::Nothing, true);
            }
        }
    }

    /// A service deployed from builds has nothing to run before its first build is installed.
    fn waiting_for_first_build(&self) -> bool {
        self.config.build.is_some() && self.release_for(Version::New).is_none()
    }

    /// Instances running an older configuration than the current one.
    fn outdated(&self) -> Vec<u32> {
        self.instances
            .values()
            .filter(|i| i.index < self.config.instances && self.is_outdated(i))
            .map(|i| i.index)
            .collect()
    }

    fn is_outdated(&self, instance: &Instance) -> bool {
        let Some(shim) = &instance.shim else {
            return false;
        };
        if !instance.phase.is_up() {
            return false;
        }
        self.spec(instance.index, Version::New)
            .map(|spec| spec.tag() != shim.tag)
            .unwrap_or(false)
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Request::Control {
                action,
                index,
                reply,
            } => self.control(action, index, reply),
            Request::Reconfigure { config, reply } => {
                let before = self.config.instances;
                let old = std::mem::replace(&mut self.config, *config);
                // What the running instances were brought to is what a failed batch returns to.
                if self.state.applied.is_none() {
                    self.state.applied = Some(old);
                }
                let instances = self.config.instances;
                self.state.stopped.retain(|i| *i < instances);
                self.state.drained.retain(|i| *i < instances);
                if let Err(e) = self.persist() {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.reconcile();
                let restarting = self.restart_outdated();
                let _ = reply.send(Ok(format!(
                    "{}: {} -> {} instances, {} to restart",
                    self.name, before, self.config.instances, restarting
                )));
            }
            Request::Settled(reply) => self.settled.push(reply),
            Request::Desired { build } => self.set_desired(build),
            Request::Connection(connected) => self.set_connected(connected),
            Request::ConfigError(error) => self.coord.config_error = error,
            Request::WorldWritable(nodes) => self.coord.world_writable = nodes,
            Request::Local { verb, reply } => {
                let _ = reply.send(self.local_deploy(verb));
            }
            Request::StopAll { forget, reply } => {
                self.stopping_all = Some((forget, reply));
                self.abandon_restart("the service is being stopped");
                let indices: Vec<u32> = self.instances.keys().copied().collect();
                for index in indices {
                    let instance = self.instances.get_mut(&index).expect("listed above");
                    match instance.phase {
                        Phase::Starting | Phase::Running | Phase::Draining => {
                            self.stop(index, AfterStop::Nothing, true)
                        }
                        Phase::Stopping => instance.after_stop = AfterStop::Nothing,
                        Phase::Backoff => {
                            instance.phase = Phase::Stopped;
                            instance.generation += 1;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn control(&mut self, action: Action, index: Option<u32>, reply: Reply<String>) {
        let indices: Vec<u32> = match index {
            Some(i) if i < self.config.instances => vec![i],
            Some(i) => {
                let _ = reply.send(Err(format!(
                    "{} has no instance {i} (it has {})",
                    self.name, self.config.instances
                )));
                return;
            }
            None => (0..self.config.instances).collect(),
        };
        if self.stopping_all.is_some() {
            let _ = reply.send(Err(format!("{} is shutting down", self.name)));
            return;
        }
        let busy: Vec<u32> = indices
            .iter()
            .copied()
            .filter(|i| self.exec.in_batch(&self.state, *i))
            .collect();
        if !busy.is_empty() && matches!(action, Action::Start | Action::Stop) {
            let _ = reply.send(Err(format!(
                "{}/{busy:?} are being restarted; wait for the restart to finish",
                self.name
            )));
            return;
        }
        match action {
            Action::Start => {
                for i in &indices {
                    self.state.stopped.remove(i);
                }
                if let Err(e) = self.persist() {
                    let _ = reply.send(Err(e));
                    return;
                }
                for &i in &indices {
                    let instance = self.instances.get_mut(&i).expect("configured index");
                    if matches!(
                        instance.phase,
                        Phase::Fatal | Phase::Exited | Phase::Stopped | Phase::Backoff
                    ) {
                        instance.failed_starts = 0;
                        self.start(i, Version::New);
                    }
                }
                self.waiters.push(Waiter {
                    indices,
                    goal: Goal::Up,
                    reply,
                });
            }
            Action::Stop => {
                self.state.stopped.extend(indices.iter().copied());
                if let Err(e) = self.persist() {
                    let _ = reply.send(Err(e));
                    return;
                }
                for &i in &indices {
                    let instance = self.instances.get_mut(&i).expect("configured index");
                    match instance.phase {
                        Phase::Starting | Phase::Running => self.stop(i, AfterStop::Nothing, true),
                        Phase::Backoff | Phase::Exited | Phase::Fatal => {
                            instance.phase = Phase::Stopped;
                            instance.generation += 1;
                        }
                        Phase::Stopping | Phase::Draining => {
                            instance.after_stop = AfterStop::Nothing;
                        }
                        // A spawn in flight is stopped when it reports back (desired is down now).
                        Phase::Spawning | Phase::Stopped => {}
                    }
                }
                self.waiters.push(Waiter {
                    indices,
                    goal: Goal::Down,
                    reply,
                });
            }
            Action::Restart => {
                let wanted: Vec<u32> = indices
                    .into_iter()
                    .filter(|i| self.desired_up(*i))
                    .collect();
                if self.state.restart.is_some() {
                    // Join the restart in progress: the caller learns how it ends.
                    self.restart_replies.push(reply);
                    return;
                }
                // An operator's restart retries what failed before.
                self.state.failed = None;
                self.restart_replies.push(reply);
                self.begin_restart(wanted);
            }
            Action::Signal(signal) => {
                let sockets: Vec<(u32, PathBuf)> = indices
                    .iter()
                    .filter(|i| self.instances[i].phase.is_up())
                    .map(|&i| (i, self.paths(i).socket))
                    .collect();
                let name = self.name.clone();
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    for (i, socket) in &sockets {
                        if let Err(e) = shim::signal(socket, signal).await {
                            errors.push(format!("{name}/{i}: {e}"));
                        }
                    }
                    let _ = reply.send(if errors.is_empty() {
                        Ok(format!("signalled {} instance(s) of {name}", sockets.len()))
                    } else {
                        Err(errors.join("; "))
                    });
                });
            }
            Action::Drain | Action::Enable => {
                if !self.config.steers() {
                    let _ = reply.send(Err(format!(
                        "{} is not steered by sluice (it needs `front_port` and `steering = \"iptables\"`)",
                        self.name
                    )));
                    return;
                }
                let drain = action == Action::Drain;
                for &i in &indices {
                    if drain {
                        self.state.drained.insert(i);
                    } else {
                        self.state.drained.remove(&i);
                    }
                }
                if let Err(e) = self.persist() {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.waiters.push(Waiter {
                    indices,
                    goal: if drain {
                        Goal::Unsteered
                    } else {
                        Goal::Steered
                    },
                    reply,
                });
            }
        }
    }

    /// Spawns a shim for the instance, or records a failed start when its spec cannot be built.
    fn start(&mut self, index: u32, version: Version) {
        let spec = self.spec(index, version);
        let paths = self.paths(index);
        let instance = self.instances.get_mut(&index).expect("known index");
        instance.generation += 1;
        instance.after_stop = AfterStop::Nothing;
        instance.healthy = false;
        let generation = instance.generation;
        let spec = match spec {
            Ok(spec) => spec,
            Err(message) => {
                tracing::error!(service = %self.name, index, "{message}");
                instance.last_error = Some(message.clone());
                instance.phase = Phase::Stopped;
                self.on_start_failed(index, message);
                return;
            }
        };
        instance.phase = Phase::Spawning;
        let releasing = instance.releasing.take();
        let shim_binary = self.ctx.shim_binary.clone();
        let events = self.events_tx.clone();
        // Only an instance that has a serving sibling to yield to starts in a low-weight cgroup.
        let cgroups = self
            .cgroups_wanted()
            .filter(|_| self.sibling_serving(index))
            .cloned();
        let removal = self.cgroup_removals.remove(&index);
        let service = self.name.clone();
        for log in [&spec.stdout_log, &spec.stderr_log] {
            if let Some(dir) = log.parent()
                && let Err(e) = make_log_dir(dir)
            {
                tracing::warn!(service = %self.name, index, "creating {}: {e}", dir.display());
            }
        }
        tokio::spawn(async move {
            if let Some(releasing) = releasing {
                let _ = releasing.await;
            }
            // A removal of the index's cgroup must not race its making: stop it, and wait until it
            // is really gone (a removal stopped half-way leaves the directory, which is reused).
            if let Some(removal) = removal {
                removal.abort();
                let _ = removal.await;
            }
            let cgroup = cgroups.map(|c| c.prepare(&service, index, crate::cgroup::Weight::Low));
            let cgroup_dir = cgroup.as_ref().and_then(|c| c.as_ref().ok());
            let tag = spec.tag();
            let result = match shim::spawn(
                &shim_binary,
                &paths,
                &spec,
                cgroup_dir.map(PathBuf::as_path),
            )
            .await
            {
                Ok((shim_pid, pid)) => Ok((
                    ShimInfo {
                        shim_pid,
                        pid,
                        started_ms: now_ms(),
                        tag,
                    },
                    false,
                )),
                // Another shim holds the instance (a previous daemon died while spawning it):
                // take that one over instead of starting a second process.
                Err(ShimError::Busy { .. }) => adopt_busy(&paths).await,
                Err(e) => Err(e),
            };
            let _ = events
                .send(Event::Spawned {
                    index,
                    generation,
                    result,
                    cgroup,
                })
                .await;
        });
    }

    /// A start did not happen (no spawn) or did not last: the restart policy decides, unless the
    /// instance belongs to a restart batch, whose machine decides.
    fn on_start_failed(&mut self, index: u32, message: String) {
        if self.exec.in_batch(&self.state, index) {
            self.batch_member_down(index, message);
        } else {
            self.after_failed_start(index, None, 0);
        }
    }

    /// Asks the instance's shim to stop it. With `drain`, a steered instance first leaves steering
    /// and its connections end (or `drain_timeout_ms` passes): an instance is never stopped with
    /// traffic steered to it.
    fn stop(&mut self, index: u32, after: AfterStop, drain: bool) {
        let steered = self.steering.installed_contains(index);
        let instance = self.instances.get_mut(&index).expect("known index");
        instance.after_stop = after;
        if matches!(instance.phase, Phase::Stopping | Phase::Draining) {
            return;
        }
        if drain && steered && self.config.steers() {
            tracing::info!(service = %self.name, index, "draining before stop");
            instance.phase = Phase::Draining;
            return;
        }
        self.stop_now(index);
    }

    fn stop_now(&mut self, index: u32) {
        let socket = self.paths(index).socket;
        let (signal, grace_ms) = (self.config.stop_signal.0, self.config.stop_grace_ms);
        let instance = self.instances.get_mut(&index).expect("known index");
        instance.phase = Phase::Stopping;
        instance.healthy = false;
        tracing::info!(service = %self.name, index, "stopping");
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = shim::stop(&socket, signal, grace_ms).await {
                // The watch reports the shim's end; nothing else to do here.
                tracing::warn!(service = %name, index, "stop: {e}");
            }
        });
    }

    /// Watches the instance's shim until the instance exits.
    fn watch(&self, index: u32, generation: u64) {
        let socket = self.paths(index).socket;
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let status = shim::wait(&socket).await;
            let _ = events
                .send(Event::Exited {
                    index,
                    generation,
                    status,
                })
                .await;
        });
    }

    fn timer(&self, index: u32, generation: u64, delay_ms: u64, startup: bool) {
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let event = if startup {
                Event::StartupElapsed { index, generation }
            } else {
                Event::BackoffElapsed { index, generation }
            };
            let _ = events.send(event).await;
        });
    }

    /// After a start outside a restart: probe until ready; only then does it get traffic.
    fn start_readiness(&self, index: u32, generation: u64) {
        let Some(probe) = self.probe(index) else {
            return;
        };
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = probe.until_ready().await;
            let _ = events
                .send(Event::Ready {
                    index,
                    generation,
                    result,
                })
                .await;
        });
    }

    /// The periodic liveness probe of a healthy instance, when configured.
    fn start_liveness(&self, index: u32, generation: u64) {
        let Some(probe) = self.probe(index) else {
            return;
        };
        let interval = probe.config.liveness_interval_ms;
        if interval == 0 {
            return;
        }
        let limit = probe.config.liveness_failures.max(1);
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(interval)).await;
                if events.is_closed() {
                    return;
                }
                match probe.once().await {
                    Ok(()) => failures = 0,
                    Err(reason) => {
                        failures += 1;
                        if failures >= limit {
                            let reason =
                                format!("{failures} liveness probes failed in a row: {reason}");
                            let _ = events
                                .send(Event::LivenessFailed {
                                    index,
                                    generation,
                                    reason,
                                })
                                .await;
                            return;
                        }
                    }
                }
            }
        });
    }

    fn on_event(&mut self, event: Event) {
        let (index, generation) = match &event {
            Event::Spawned {
                index, generation, ..
            }
            | Event::Exited {
                index, generation, ..
            }
            | Event::Ready {
                index, generation, ..
            }
            | Event::LivenessFailed {
                index, generation, ..
            }
            | Event::StartupElapsed { index, generation }
            | Event::BackoffElapsed { index, generation } => (*index, *generation),
            Event::Steered { .. } | Event::SteerRetry => return self.on_steering_event(event),
            Event::Drained {
                index,
                waiter,
                outcome,
            } => return self.on_drained(*index, *waiter, *outcome),
            Event::Machine { epoch, input } => return self.feed(*epoch, input.clone()),
            Event::Warmed {
                index,
                epoch,
                result,
            } => return self.on_warmed(*index, *epoch, result.clone()),
            Event::Installed { .. } | Event::PostRestartDone { .. } | Event::Slot { .. } => {
                return self.on_deploy_event(event);
            }
        };
        let Some(instance) = self.instances.get_mut(&index) else {
            return;
        };
        if instance.generation != generation {
            return;
        }
        if let Event::Spawned { cgroup, .. } = &event {
            instance.cpu_weight = None;
            match cgroup {
                Some(Ok(dir)) => {
                    instance.cgroup = Some(dir.clone());
                    instance.cpu_weight = Some(crate::cgroup::Weight::Low);
                    instance.cgroup_error = None;
                }
                Some(Err(e)) => {
                    tracing::warn!(service = %self.name, index, "{e}; the instance runs without cpu isolation");
                    instance.cgroup_error = Some(e.clone());
                }
                None => instance.cgroup_error = None,
            }
        }
        // Started without a cgroup (isolation turned off meanwhile, or making it failed): the
        // directory of its previous process is empty now and goes.
        if matches!(&event, Event::Spawned { cgroup, .. } if !matches!(cgroup, Some(Ok(_)))) {
            self.remove_cgroup(index);
        }
        let Some(instance) = self.instances.get_mut(&index) else {
            return;
        };
        match event {
            Event::Spawned { result, .. } => match result {
                Ok((info, adopted)) => {
                    tracing::info!(service = %self.name, index, pid = info.pid, adopted, "started");
                    instance.shim = Some(info);
                    instance.phase = Phase::Starting;
                    instance.last_error = None;
                    self.watch(index, generation);
                    self.timer(index, generation, self.config.startup_ms, true);
                    if self.exec.in_batch(&self.state, index) {
                        self.batch_member_started(index);
                    } else {
                        self.start_readiness(index, generation);
                    }
                    if !self.desired_up(index) {
                        self.stop(index, AfterStop::Nothing, true);
                    }
                }
                Err(e) => {
                    tracing::error!(service = %self.name, index, "{e}");
                    instance.last_error = Some(e.to_string());
                    instance.phase = Phase::Stopped;
                    self.on_start_failed(index, e.to_string());
                }
            },
            Event::Exited { status, .. } => self.on_exit(index, status),
            Event::StartupElapsed { .. } => {
                if instance.phase == Phase::Starting {
                    instance.phase = Phase::Running;
                    instance.failed_starts = 0;
                    if self.config.health.is_none() && !self.exec.in_batch(&self.state, index) {
                        instance.healthy = true;
                    }
                    if self.config.health.is_none() {
                        self.start_liveness(index, generation);
                    }
                    self.batch_member_running(index);
                }
            }
            Event::BackoffElapsed { .. } => {
                if instance.phase == Phase::Backoff && self.desired_up(index) {
                    self.start(index, Version::New);
                }
            }
            Event::Ready { result, .. } => {
                if !instance.phase.is_up() {
                    return;
                }
                match result {
                    Ok(()) => {
                        instance.healthy = true;
                        self.start_liveness(index, generation);
                    }
                    Err(reason) => {
                        tracing::error!(service = %self.name, index, "{reason}");
                        instance.last_restart_reason = Some(reason.clone());
                        instance.last_error = Some(reason);
                        self.stop(index, AfterStop::FailedStart, false);
                    }
                }
            }
            Event::LivenessFailed { reason, .. } => {
                if instance.phase.is_up() && !self.exec.in_batch(&self.state, index) {
                    tracing::error!(service = %self.name, index, "{reason}; restarting");
                    instance.last_restart_reason = Some(reason.clone());
                    instance.last_error = Some(reason);
                    instance.healthy = false;
                    self.stop(index, AfterStop::Start(Version::New), true);
                }
            }
            Event::Drained { .. }
            | Event::Steered { .. }
            | Event::SteerRetry
            | Event::Machine { .. }
            | Event::Warmed { .. }
            | Event::Installed { .. }
            | Event::PostRestartDone { .. }
            | Event::Slot { .. } => unreachable!("handled above"),
        }
    }

    /// The instance's process ended, asked to or not.
    fn on_exit(&mut self, index: u32, status: Result<Status, ShimError>) {
        let paths = self.paths(index);
        let desired_up = self.desired_up(index);
        let in_batch = self.exec.in_batch(&self.state, index);
        let instance = self.instances.get_mut(&index).expect("known index");
        let (outcome, ran_ms) = match &status {
            Ok(Status::Exited {
                outcome,
                started_ms,
                exited_ms,
                ..
            }) => (Some(*outcome), exited_ms.saturating_sub(*started_ms)),
            Ok(Status::Running { .. }) => {
                unreachable!("wait answers only once the instance exited")
            }
            Err(e) => {
                instance.last_error = Some(e.to_string());
                let started = instance.shim.as_ref().map_or(0, |s| s.started_ms);
                (None, now_ms().saturating_sub(started))
            }
        };
        let exit = describe(outcome);
        instance.last_exit = Some(exit.clone());
        instance.shim = None;
        instance.healthy = false;
        instance.generation += 1;
        // The exit status is ours now: let the shim go.
        instance.releasing = Some(tokio::spawn(async move {
            shim::release_and_wait(&paths).await;
        }));
        let was = instance.phase;
        let after = instance.after_stop;
        instance.after_stop = AfterStop::Nothing;
        tracing::info!(service = %self.name, index, exit = %exit, ran_ms, "instance exited");
        instance.phase = Phase::Stopped;
        if was == Phase::Stopping {
            match after {
                AfterStop::Remove => {
                    self.remove_cgroup(index);
                    self.instances.remove(&index);
                }
                AfterStop::Start(version) if desired_up => self.start(index, version),
                AfterStop::FailedStart => self.after_failed_start(index, outcome, 0),
                _ => {}
            }
            if in_batch {
                self.batch_member_exited(index);
            }
            return;
        }
        if in_batch {
            self.batch_member_down(index, format!("exited: {exit}"));
            return;
        }
        if !desired_up {
            return;
        }
        self.instances
            .get_mut(&index)
            .expect("known index")
            .restarts += 1;
        self.after_failed_start(index, outcome, ran_ms);
    }

    /// Applies the restart policy to an exit nobody asked for (or a start that did not happen).
    fn after_failed_start(&mut self, index: u32, outcome: Option<Outcome>, ran_ms: u64) {
        let instance = self.instances.get_mut(&index).expect("known index");
        let (decision, failed_starts) =
            policy::on_exit(&self.config, outcome, ran_ms, instance.failed_starts);
        instance.failed_starts = failed_starts;
        match decision {
            Decision::Restart { delay_ms: 0 } => self.start(index, Version::New),
            Decision::Restart { delay_ms } => {
                instance.phase = Phase::Backoff;
                instance.generation += 1;
                let generation = instance.generation;
                tracing::warn!(service = %self.name, index, delay_ms, failed_starts, "backing off");
                self.timer(index, generation, delay_ms, false);
            }
            Decision::Exited => instance.phase = Phase::Exited,
            Decision::Fatal => {
                tracing::error!(service = %self.name, index, failed_starts, "fatal: too many failed starts");
                instance.phase = Phase::Fatal;
            }
        }
    }

    fn on_deploy_event(&mut self, event: Event) {
        match event {
            Event::Installed { build, result } => self.on_installed(build, result),
            Event::PostRestartDone { build, result } => self.on_post_restart(build, result),
            Event::Slot { result } => self.on_slot(result),
            _ => unreachable!("only deploy events come here"),
        }
    }

    /// After every request and event: steering, waiting callers, start-up ordering, deploys, the
    /// host's status in ZooKeeper.
    fn after_change(&mut self) {
        self.sync_steering();
        self.sync_cgroups();
        self.maybe_deploy();
        self.publish_status();
        let instances = &self.instances;
        let name = &self.name;
        let steering = &self.steering;
        let steers = self.config.steers();
        self.waiters.retain_mut(|w| {
            let mut failure = None;
            let mut done = true;
            for i in &w.indices {
                let Some(instance) = instances.get(i) else {
                    continue;
                };
                let phase = instance.phase;
                match w.goal {
                    Goal::Up => match phase {
                        Phase::Running if instance.healthy || !steers => {}
                        Phase::Fatal | Phase::Exited | Phase::Stopped => {
                            failure = Some(format!(
                                "{name}/{i} is {}{}",
                                phase.state().as_str(),
                                instance
                                    .last_error
                                    .as_ref()
                                    .or(instance.last_exit.as_ref())
                                    .map(|e| format!(": {e}"))
                                    .unwrap_or_default()
                            ));
                        }
                        _ => done = false,
                    },
                    Goal::Down => done &= !phase.has_process(),
                    Goal::Unsteered => done &= !steering.installed_contains(*i),
                    Goal::Steered => {
                        if !phase.is_up() {
                            failure = Some(format!("{name}/{i} is {}", phase.state().as_str()));
                        }
                        done &= steering.installed_contains(*i);
                    }
                }
            }
            let (tx, _) = oneshot::channel();
            if let Some(message) = failure {
                let _ = std::mem::replace(&mut w.reply, tx).send(Err(message));
                false
            } else if done {
                let what = match w.goal {
                    Goal::Up => "running",
                    Goal::Down => "stopped",
                    Goal::Unsteered => "out of steering",
                    Goal::Steered => "in steering",
                };
                let _ = std::mem::replace(&mut w.reply, tx).send(Ok(format!(
                    "{} instance(s) of {name} {what}",
                    w.indices.len()
                )));
                false
            } else {
                true
            }
        });
        let settled = self
            .instances
            .values()
            .all(|i| !matches!(i.phase, Phase::Spawning | Phase::Starting));
        if settled {
            for reply in self.settled.drain(..) {
                let _ = reply.send(());
            }
        }
    }

    fn status(&self) -> ServiceStatus {
        let now = now_ms();
        let steers = self.config.steers();
        let instances = self
            .instances
            .values()
            .map(|i| InstanceStatus {
                service: self.name.clone(),
                index: i.index,
                state: i.phase.state(),
                desired: if self.desired_up(i.index) {
                    Desired::Up
                } else {
                    Desired::Down
                },
                pid: i.shim.as_ref().map(|s| s.pid),
                shim_pid: i.shim.as_ref().map(|s| s.shim_pid),
                port: self.config.port(i.index),
                enabled: steers.then(|| self.steering.installed_contains(i.index)),
                healthy: i.healthy,
                started_ms: i.shim.as_ref().map(|s| s.started_ms),
                uptime_ms: i.shim.as_ref().map(|s| now.saturating_sub(s.started_ms)),
                restarts: i.restarts,
                failed_starts: i.failed_starts,
                last_exit: i.last_exit.clone(),
                last_error: i.last_error.clone(),
                last_restart_reason: i.last_restart_reason.clone(),
                warmup: i.warmup.clone(),
                last_drain: i.last_drain,
                outdated: self.is_outdated(i),
                cgroup: i.cgroup.as_ref().map(|d| d.display().to_string()),
                cpu_weight: i.cgroup.as_ref().and(i.cpu_weight).map(|w| match w {
                    crate::cgroup::Weight::Low => CpuWeight::Low,
                }),
            })
            .collect();
        ServiceStatus {
            service: self.name.clone(),
            front_port: self.config.front_port,
            strategy: self.config.strategy(),
            instances,
            restart: self.state.restart.as_ref().map(|m| RestartStatus {
                strategy: m.strategy,
                step: m.step,
                batch: m.batch.clone(),
                rolling_back: m.version == Version::Old,
                batches_left: m.pending.len(),
                done: m.done.clone(),
            }),
            last_restart_error: self.state.failed.as_ref().map(|f| f.reason.clone()),
            steering_error: self.steering.error.clone(),
            build: self.state.build.clone(),
            target_build: self.state.target_build.clone(),
            deploy: self.coord.deploy.clone(),
            deploy_error: self.coord.last_error.clone(),
            config_error: self.coord.config_error.clone(),
            world_writable_nodes: self.coord.world_writable.clone(),
            cgroups_error: self.cgroups_error(),
        }
    }
}

/// Takes over a shim that another daemon spawned: waits for its socket, then asks its status.
async fn adopt_busy(paths: &ShimPaths) -> Result<(ShimInfo, bool), ShimError> {
    let mut last = None;
    for _ in 0..50 {
        match shim::status(&paths.socket).await {
            Ok(Status::Running {
                shim_pid,
                pid,
                started_ms,
                tag,
                ..
            }) => {
                return Ok((
                    ShimInfo {
                        shim_pid,
                        pid,
                        started_ms,
                        tag,
                    },
                    true,
                ));
            }
            Ok(status @ Status::Exited { .. }) => {
                // It already ended: collect it and report a start that did not last.
                shim::release_and_wait(paths).await;
                return Err(ShimError::Protocol {
                    path: paths.socket.clone(),
                    message: format!("the instance of an earlier daemon exited: {status}"),
                });
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.expect("at least one attempt"))
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::make_log_dir;

    /// A link that a less-trusted user planted on the way to a log directory is not followed:
    /// nothing is made where it points (issue 8).
    #[test]
    fn a_log_dir_is_never_made_through_a_planted_link() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("root-only");
        std::fs::create_dir(&target).unwrap();
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        // Writable by anyone: the user who owns it could have planted the link.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::symlink(&target, shared.join("app")).unwrap();
        let err = make_log_dir(&shared.join("app/logs")).unwrap_err();
        assert!(sluice_safefs::is_refused(&err), "{err}");
        assert!(!target.join("logs").exists(), "made through the link");
        make_log_dir(&shared.join("web/logs")).unwrap();
        assert!(shared.join("web/logs").is_dir());
        make_log_dir(&shared.join("web/logs")).unwrap();
    }
}
