//! The owner task of one service: its instances, their phases, restart policy, restarts and reloads.
//!
//! Everything that changes a service goes through [`ServiceHandle`] as a message; the task answers
//! when the change took effect. Slow work (spawning a shim, waiting for an exit, timers) runs in
//! small tasks that report back as [`Event`]s carrying the instance's generation, so a late event
//! about an instance that has since been restarted is recognised and dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sluice_shim::proto::{Outcome, Status};
use tokio::sync::{mpsc, oneshot};

use crate::config::{HostConfig, ServiceConfig};
use crate::policy::{self, Decision};
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

    /// Stops every instance and ends the task; `forget` also removes the persisted state.
    pub async fn stop_all(&self, forget: bool) {
        self.ask(|reply| Request::StopAll { forget, reply }).await;
    }
}

/// What is shared by every service task and never changes while the daemon runs.
#[derive(Debug)]
pub struct Context {
    pub host: HostConfig,
    pub shim_binary: PathBuf,
}

/// Status of one instance as `sluice status --json` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    pub service: String,
    pub index: u32,
    pub state: &'static str,
    pub desired: &'static str,
    pub pid: Option<u32>,
    pub shim_pid: Option<u32>,
    pub port: Option<u16>,
    pub started_ms: Option<u64>,
    pub uptime_ms: Option<u64>,
    pub restarts: u32,
    pub failed_starts: u32,
    pub last_exit: Option<String>,
    pub last_error: Option<String>,
    /// The instance runs with an older configuration than the current one.
    pub outdated: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub service: String,
    pub front_port: Option<u16>,
    pub instances: Vec<InstanceStatus>,
    /// Instances a running restart has yet to restart, in order.
    pub restart_pending: Vec<u32>,
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
    fn name(self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Spawning | Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Backoff => "backoff",
            Phase::Exited => "exited",
            Phase::Fatal => "fatal",
        }
    }

    /// A shim exists (or is being made) for the instance.
    fn has_process(self) -> bool {
        matches!(
            self,
            Phase::Spawning | Phase::Starting | Phase::Running | Phase::Stopping
        )
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
    Start,
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
    /// The release of the previous shim; the next spawn waits for it (the lock must be free).
    releasing: Option<tokio::task::JoinHandle<()>>,
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
            releasing: None,
        }
    }
}

enum Event {
    Spawned {
        index: u32,
        generation: u64,
        result: Result<(ShimInfo, bool), ShimError>,
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
}

/// A restart in progress: instances one at a time, stop then start, each waited for.
struct RestartRun {
    /// The instance being restarted now, and the generation its new process must exceed.
    current: Option<(u32, u64)>,
    replies: Vec<Reply<String>>,
}

/// A caller waiting for instances to reach a goal.
struct Waiter {
    indices: Vec<u32>,
    up: bool,
    reply: Reply<String>,
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
        restart: None,
        waiters: Vec::new(),
        settled: Vec::new(),
        stopping_all: None,
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
    restart: Option<RestartRun>,
    waiters: Vec<Waiter>,
    settled: Vec<oneshot::Sender<()>>,
    /// Set while every instance is being stopped; the task ends when they all are.
    stopping_all: Option<(bool, oneshot::Sender<()>)>,
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
        self.reconcile();
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
                if forget && let Err(e) = state::remove(&self.state_path) {
                    tracing::error!(service = %self.name, "{e}");
                }
                let _ = reply.send(());
                return;
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

    fn spec(&self, index: u32) -> Result<InstanceSpec, String> {
        InstanceSpec::build(
            &self.ctx.host,
            &self.name,
            &self.config,
            index,
            self.release_dir().as_deref(),
        )
    }

    fn persist(&self) -> Result<(), String> {
        state::store(&self.state_path, &self.state).map_err(|e| e.to_string())
    }

    /// Takes over the shims the daemon found: running ones are watched, exited ones are handled
    /// as the exits the previous daemon did not see.
    fn adopt(&mut self, found: Vec<(u32, Status)>) {
        for (index, status) in found {
            let mut instance = Instance::new(index);
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
                    instance.generation = 1;
                    tracing::info!(service = %self.name, index, pid, "adopted running instance");
                    self.instances.insert(index, instance);
                    self.watch(index, 1);
                    if self.instances[&index].phase == Phase::Starting {
                        let remaining = self.config.startup_ms - age_ms;
                        self.timer(index, 1, remaining, true);
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
                    instance.generation = 1;
                    self.instances.insert(index, instance);
                    tracing::info!(service = %self.name, index, "adopted an instance that exited while no daemon watched");
                    self.on_exit(index, Ok(status));
                }
            }
        }
    }

    /// Brings instances in line with the configuration and the desired state: starts what should
    /// run, stops what should not, and resumes or begins restarts of outdated instances.
    fn reconcile(&mut self) {
        for index in 0..self.config.instances {
            self.instances
                .entry(index)
                .or_insert_with(|| Instance::new(index));
        }
        let indices: Vec<u32> = self.instances.keys().copied().collect();
        for index in indices {
            let phase = self.instances[&index].phase;
            if index >= self.config.instances {
                if phase.has_process() {
                    self.stop(index, AfterStop::Remove);
                } else {
                    self.instances.remove(&index);
                }
            } else if self.desired_up(index) {
                if phase == Phase::Stopped {
                    self.start(index);
                }
            } else if matches!(phase, Phase::Starting | Phase::Running) {
                self.stop(index, AfterStop::Nothing);
            }
        }
        let outdated: Vec<u32> = self
            .instances
            .values()
            .filter(|i| i.index < self.config.instances && self.is_outdated(i))
            .map(|i| i.index)
            .collect();
        let mut changed = false;
        for index in outdated {
            if !self.state.restart_pending.contains(&index) {
                self.state.restart_pending.push(index);
                changed = true;
            }
        }
        if changed && let Err(e) = self.persist() {
            tracing::error!(service = %self.name, "{e}");
        }
        if !self.state.restart_pending.is_empty() && self.restart.is_none() {
            tracing::info!(service = %self.name, pending = ?self.state.restart_pending, "restarting instances");
            self.restart = Some(RestartRun {
                current: None,
                replies: Vec::new(),
            });
        }
    }

    fn is_outdated(&self, instance: &Instance) -> bool {
        let Some(shim) = &instance.shim else {
            return false;
        };
        if !matches!(instance.phase, Phase::Starting | Phase::Running) {
            return false;
        }
        self.spec(instance.index)
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
                self.config = *config;
                // Indices that left the configuration are no longer stopped by hand.
                let instances = self.config.instances;
                self.state.stopped.retain(|i| *i < instances);
                self.state.restart_pending.retain(|i| *i < instances);
                if let Err(e) = self.persist() {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.reconcile();
                let _ = reply.send(Ok(format!(
                    "{}: {} -> {} instances, {} to restart",
                    self.name,
                    before,
                    self.config.instances,
                    self.state.restart_pending.len()
                )));
            }
            Request::Settled(reply) => self.settled.push(reply),
            Request::StopAll { forget, reply } => {
                self.stopping_all = Some((forget, reply));
                if let Some(run) = self.restart.take() {
                    for r in run.replies {
                        let _ = r.send(Err("the service is being stopped".into()));
                    }
                }
                let indices: Vec<u32> = self.instances.keys().copied().collect();
                for index in indices {
                    match self.instances[&index].phase {
                        Phase::Starting | Phase::Running => self.stop(index, AfterStop::Nothing),
                        Phase::Backoff => {
                            self.instances.get_mut(&index).unwrap().phase = Phase::Stopped
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
                        self.start(i);
                    }
                }
                self.waiters.push(Waiter {
                    indices,
                    up: true,
                    reply,
                });
            }
            Action::Stop => {
                self.state.stopped.extend(indices.iter().copied());
                self.state.restart_pending.retain(|i| !indices.contains(i));
                if let Err(e) = self.persist() {
                    let _ = reply.send(Err(e));
                    return;
                }
                for &i in &indices {
                    match self.instances[&i].phase {
                        Phase::Starting | Phase::Running => self.stop(i, AfterStop::Nothing),
                        Phase::Backoff | Phase::Exited | Phase::Fatal => {
                            let instance = self.instances.get_mut(&i).unwrap();
                            instance.phase = Phase::Stopped;
                            instance.generation += 1;
                        }
                        Phase::Stopping => {
                            self.instances.get_mut(&i).unwrap().after_stop = AfterStop::Nothing;
                        }
                        // A spawn in flight is stopped when it reports back (desired is down now).
                        Phase::Spawning | Phase::Stopped => {}
                    }
                }
                self.waiters.push(Waiter {
                    indices,
                    up: false,
                    reply,
                });
            }
            Action::Restart => {
                let wanted: Vec<u32> = indices
                    .into_iter()
                    .filter(|i| !self.state.stopped.contains(i))
                    .collect();
                for i in wanted {
                    if !self.state.restart_pending.contains(&i) {
                        self.state.restart_pending.push(i);
                    }
                }
                if let Err(e) = self.persist() {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.restart
                    .get_or_insert_with(|| RestartRun {
                        current: None,
                        replies: Vec::new(),
                    })
                    .replies
                    .push(reply);
            }
            Action::Signal(signal) => {
                let sockets: Vec<(u32, PathBuf)> = indices
                    .iter()
                    .filter(|i| matches!(self.instances[i].phase, Phase::Starting | Phase::Running))
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
        }
    }

    /// Spawns a shim for the instance, or records a failed start when its spec cannot be built.
    fn start(&mut self, index: u32) {
        let spec = self.spec(index);
        let paths = self.paths(index);
        let instance = self.instances.get_mut(&index).expect("known index");
        instance.generation += 1;
        instance.after_stop = AfterStop::Nothing;
        let generation = instance.generation;
        let spec = match spec {
            Ok(spec) => spec,
            Err(message) => {
                tracing::error!(service = %self.name, index, "{message}");
                instance.last_error = Some(message);
                instance.phase = Phase::Spawning;
                self.after_failed_start(index, None, 0);
                return;
            }
        };
        instance.phase = Phase::Spawning;
        let releasing = instance.releasing.take();
        let shim_binary = self.ctx.shim_binary.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            if let Some(releasing) = releasing {
                let _ = releasing.await;
            }
            for log in [&spec.stdout_log, &spec.stderr_log] {
                if let Some(dir) = log.parent() {
                    let _ = tokio::fs::create_dir_all(dir).await;
                }
            }
            let tag = spec.tag();
            let result = match shim::spawn(&shim_binary, &paths, &spec).await {
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
                })
                .await;
        });
    }

    /// Asks the instance's shim to stop it; the exit arrives through the instance's watch.
    fn stop(&mut self, index: u32, after: AfterStop) {
        let socket = self.paths(index).socket;
        let (signal, grace_ms) = (self.config.stop_signal.0, self.config.stop_grace_ms);
        let instance = self.instances.get_mut(&index).expect("known index");
        instance.after_stop = after;
        if instance.phase == Phase::Stopping {
            return;
        }
        instance.phase = Phase::Stopping;
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

    fn on_event(&mut self, event: Event) {
        let (index, generation) = match &event {
            Event::Spawned {
                index, generation, ..
            }
            | Event::Exited {
                index, generation, ..
            }
            | Event::StartupElapsed { index, generation }
            | Event::BackoffElapsed { index, generation } => (*index, *generation),
        };
        let Some(instance) = self.instances.get_mut(&index) else {
            return;
        };
        if instance.generation != generation {
            return;
        }
        match event {
            Event::Spawned { result, .. } => match result {
                Ok((info, adopted)) => {
                    tracing::info!(service = %self.name, index, pid = info.pid, adopted, "started");
                    instance.shim = Some(info);
                    instance.phase = Phase::Starting;
                    instance.last_error = None;
                    self.watch(index, generation);
                    self.timer(index, generation, self.config.startup_ms, true);
                    if !self.desired_up(index) {
                        self.stop(index, AfterStop::Nothing);
                    }
                }
                Err(e) => {
                    tracing::error!(service = %self.name, index, "{e}");
                    instance.last_error = Some(e.to_string());
                    self.after_failed_start(index, None, 0);
                }
            },
            Event::Exited { status, .. } => self.on_exit(index, status),
            Event::StartupElapsed { .. } => {
                if instance.phase == Phase::Starting {
                    instance.phase = Phase::Running;
                    instance.failed_starts = 0;
                }
            }
            Event::BackoffElapsed { .. } => {
                if instance.phase == Phase::Backoff && self.desired_up(index) {
                    self.start(index);
                }
            }
        }
    }

    /// The instance's process ended, asked to or not.
    fn on_exit(&mut self, index: u32, status: Result<Status, ShimError>) {
        let paths = self.paths(index);
        let desired_up = self.desired_up(index);
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
        instance.last_exit = Some(describe(outcome));
        instance.shim = None;
        instance.generation += 1;
        // The exit status is ours now: let the shim go.
        instance.releasing = Some(tokio::spawn(async move {
            shim::release_and_wait(&paths).await;
        }));
        let was = instance.phase;
        tracing::info!(service = %self.name, index, exit = %describe(outcome), ran_ms, "instance exited");
        if was == Phase::Stopping {
            instance.phase = Phase::Stopped;
            match instance.after_stop {
                AfterStop::Remove => {
                    self.instances.remove(&index);
                }
                AfterStop::Start if desired_up => self.start(index),
                _ => {}
            }
            return;
        }
        if !desired_up {
            instance.phase = Phase::Stopped;
            return;
        }
        instance.restarts += 1;
        self.after_failed_start(index, outcome, ran_ms);
    }

    /// Applies the restart policy to an exit nobody asked for (or a start that did not happen).
    fn after_failed_start(&mut self, index: u32, outcome: Option<Outcome>, ran_ms: u64) {
        let instance = self.instances.get_mut(&index).expect("known index");
        let (decision, failed_starts) =
            policy::on_exit(&self.config, outcome, ran_ms, instance.failed_starts);
        instance.failed_starts = failed_starts;
        match decision {
            Decision::Restart { delay_ms: 0 } => self.start(index),
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

    /// After every request and event: move the restart along, answer callers whose goal is met.
    fn after_change(&mut self) {
        self.advance_restart();
        let instances = &self.instances;
        let name = &self.name;
        self.waiters.retain_mut(|w| {
            let mut failure = None;
            let mut done = true;
            for i in &w.indices {
                let Some(instance) = instances.get(i) else {
                    continue;
                };
                let phase = instance.phase;
                if w.up {
                    match phase {
                        Phase::Running => {}
                        Phase::Fatal | Phase::Exited | Phase::Stopped => {
                            failure = Some(format!(
                                "{name}/{i} is {}{}",
                                phase.name(),
                                instance
                                    .last_error
                                    .as_ref()
                                    .or(instance.last_exit.as_ref())
                                    .map(|e| format!(": {e}"))
                                    .unwrap_or_default()
                            ));
                        }
                        _ => done = false,
                    }
                } else if phase.has_process() {
                    done = false;
                }
            }
            let (tx, _) = oneshot::channel();
            if let Some(message) = failure {
                let _ = std::mem::replace(&mut w.reply, tx).send(Err(message));
                false
            } else if done {
                let what = if w.up { "running" } else { "stopped" };
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

    fn advance_restart(&mut self) {
        let Some(run) = &mut self.restart else {
            return;
        };
        if let Some((index, generation)) = run.current {
            let Some(instance) = self.instances.get(&index) else {
                run.current = None;
                return self.advance_restart();
            };
            match instance.phase {
                Phase::Running if instance.generation > generation => {}
                Phase::Fatal | Phase::Exited | Phase::Backoff
                    if instance.generation > generation =>
                {
                    let message = format!(
                        "restart of {} stopped: {}/{index} did not start again: {}",
                        self.name,
                        self.name,
                        instance
                            .last_error
                            .clone()
                            .or(instance.last_exit.clone())
                            .unwrap_or_default()
                    );
                    tracing::error!("{message}");
                    let run = self.restart.take().expect("checked above");
                    for reply in run.replies {
                        let _ = reply.send(Err(message.clone()));
                    }
                    self.state.restart_pending.clear();
                    if let Err(e) = self.persist() {
                        tracing::error!(service = %self.name, "{e}");
                    }
                    return;
                }
                _ => return,
            }
            // This instance is done.
            run.current = None;
            self.state.restart_pending.retain(|i| *i != index);
            if let Err(e) = self.persist() {
                tracing::error!(service = %self.name, "{e}");
            }
        }
        let Some(&index) = self.state.restart_pending.first() else {
            let run = self.restart.take().expect("checked above");
            for reply in run.replies {
                let _ = reply.send(Ok(format!("restarted {}", self.name)));
            }
            return;
        };
        let Some(instance) = self.instances.get(&index) else {
            self.state.restart_pending.remove(0);
            return self.advance_restart();
        };
        if !self.desired_up(index) {
            self.state.restart_pending.remove(0);
            return self.advance_restart();
        }
        let generation = instance.generation;
        tracing::info!(service = %self.name, index, "restarting");
        let run = self.restart.as_mut().expect("checked above");
        run.current = Some((index, generation));
        match instance.phase {
            Phase::Starting | Phase::Running => self.stop(index, AfterStop::Start),
            Phase::Stopping => {
                self.instances.get_mut(&index).unwrap().after_stop = AfterStop::Start;
            }
            Phase::Spawning => {}
            Phase::Stopped | Phase::Backoff | Phase::Exited | Phase::Fatal => {
                self.instances.get_mut(&index).unwrap().failed_starts = 0;
                self.start(index);
            }
        }
    }

    fn status(&self) -> ServiceStatus {
        let now = now_ms();
        let instances = self
            .instances
            .values()
            .map(|i| InstanceStatus {
                service: self.name.clone(),
                index: i.index,
                state: i.phase.name(),
                desired: if self.desired_up(i.index) {
                    "up"
                } else {
                    "down"
                },
                pid: i.shim.as_ref().map(|s| s.pid),
                shim_pid: i.shim.as_ref().map(|s| s.shim_pid),
                port: self.config.port(i.index),
                started_ms: i.shim.as_ref().map(|s| s.started_ms),
                uptime_ms: i.shim.as_ref().map(|s| now.saturating_sub(s.started_ms)),
                restarts: i.restarts,
                failed_starts: i.failed_starts,
                last_exit: i.last_exit.clone(),
                last_error: i.last_error.clone(),
                outdated: self.is_outdated(i),
            })
            .collect();
        ServiceStatus {
            service: self.name.clone(),
            front_port: self.config.front_port,
            instances,
            restart_pending: self.state.restart_pending.clone(),
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
                let _ = shim::release(&paths.socket).await;
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
