//! The executor of one service: the tokio task that owns the service's [`Core`], feeds it the
//! requests from the daemon and the outcomes of its helper tasks, and runs the effects it returns
//! — each in a small task (spawning a shim, waiting for an exit, probes, warm-ups, iptables,
//! drains, timers, downloads and hooks, ZooKeeper) that reports back as an [`Event`] carrying the
//! instance's generation or the restart's epoch. It decides nothing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_hooks::Stage;
use sluice_shim::proto::Status;
use sluice_strategies::restart::Input;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::canary::{CanaryEvent, CanaryWrite};
use super::core::{
    self as core, Core, DeployEvent, Effect, Event, InstanceEvent, Millis, Now, ReplyId,
    RestartEvent, Setup, ShimInfo,
};
use super::deploy::{HookContext, InstallJob};
use super::env::HostEnv;
use super::{Context, Reply, Request, ServiceHandle, make_log_dir};
use crate::build::{self, Releases};
use crate::config::ServiceConfig;
use crate::coord::Slot;
use crate::metrics::RestartReason;
use crate::service::shim::{self, ShimError, ShimPaths};

/// Pause before asking again for a slot after ZooKeeper refused one.
const SLOT_RETRY_MS: u64 = 1_000;
/// Bytes of a failed hook's output that go into status (the log file has all of it).
const OUTPUT_TAIL_IN_STATUS: usize = 600;
/// Longest pause between attempts to read a build's metadata while ZooKeeper is away.
const META_RETRY_MAX_MS: u64 = 10_000;
/// Attempts to reach a shim that another daemon spawned (answered `busy`), 100 ms apart.
const ADOPT_BUSY_ATTEMPTS: u32 = 50;

fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `CLOCK_BOOTTIME` in milliseconds, the clock the shims report start and exit times on.
fn boot_ms() -> Millis {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_BOOTTIME exists on every supported kernel.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(ret, 0, "clock_gettime(CLOCK_BOOTTIME)");
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// Both clocks, read now: what every event is handled at.
fn now() -> Now {
    Now {
        wall_ms: now_ms(),
        boot_ms: boot_ms(),
    }
}

/// A caller waiting for an answer.
enum Pending {
    Text(Reply<String>),
    Done(oneshot::Sender<()>),
}

pub(super) struct Executor {
    ctx: Arc<Context>,
    name: String,
    core: Core,
    events_tx: mpsc::Sender<Event>,
    /// Callers the core named by [`ReplyId`].
    replies: BTreeMap<ReplyId, Pending>,
    next_reply: u64,
    /// The fleet slot, shared with the core's [`HostEnv`] (which asks whether it is still valid).
    slot: Arc<Mutex<Option<Slot>>>,
    /// The release of the slot in progress (it waits for the end-of-restart status to be
    /// acknowledged): the next acquire waits for it, so that a release never deletes the lease
    /// a later acquire returned (a host has one lease per service).
    slot_release: Option<JoinHandle<()>>,
    /// The release of each index's previous shim; the next spawn waits for it (the lock must be
    /// free).
    releasing: BTreeMap<u32, JoinHandle<()>>,
    /// Removals of instance cgroups in progress, by index: a new start of the index waits for its
    /// removal, and the task does not end before they finish.
    cgroup_removals: BTreeMap<u32, JoinHandle<()>>,
    /// Outcomes known at once (a weight written), handled before the next event.
    immediate: VecDeque<Event>,
    /// Why the last spawn of an index got no tracking cgroup (its tree is tracked by session
    /// only), shared with the spawn tasks; for status.
    tree_errors: Arc<Mutex<BTreeMap<u32, String>>>,
}

/// Numbers the service tasks of this daemon, for the log: one `service task started` and one
/// `service task ended` per task, so a second owner of a name would show.
static TASKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Loads the service's persisted state; a state file that cannot be read is set aside and the
/// service is in `state_error` (see [`crate::service::state::load_or_set_aside`]).
pub(super) fn load_state(
    state_dir: &std::path::Path,
    name: &str,
) -> (PathBuf, crate::service::state::Loaded) {
    let state_path = crate::service::state::path(state_dir, name);
    let loaded = crate::service::state::load_or_set_aside(&state_path, name, now_ms() / 1000);
    (state_path, loaded)
}

/// The status of a service whose task waits for its predecessor: nothing of its own yet.
fn waiting_status(name: &str, config: &ServiceConfig) -> crate::service::ServiceStatus {
    crate::service::ServiceStatus {
        service: name.to_owned(),
        front_port: config.front_port,
        strategy: config.strategy(),
        instances: Vec::new(),
        restart: None,
        last_restart_error: None,
        steering_error: None,
        build: None,
        target_build: None,
        deploy: None,
        deploy_error: None,
        config_error: None,
        world_writable_nodes: Vec::new(),
        cgroups_error: None,
        tree_error: None,
        state_write_error: None,
        slot_error: None,
        canary: None,
        state_error: Some(format!(
            "not supervised yet: the previous task of {name} (removed by a reload) is still stopping its instances"
        )),
    }
}

/// Waits until the previous task of the name has ended, answering meanwhile what needs no core
/// (status, refusals) and keeping the latest of each notice for the core. `Err` ends the task:
/// every handle is gone, or a `StopAll` came (answered once the predecessor is gone, so that
/// the end of this task still means the end of every earlier one).
async fn wait_for_predecessor(
    name: &str,
    config: &mut ServiceConfig,
    previous: ServiceHandle,
    requests: &mut mpsc::Receiver<Request>,
) -> Result<Vec<Request>, ()> {
    tracing::info!(service = %name, "waiting for the previous task of the service to end");
    let mut deferred: Vec<Request> = Vec::new();
    let mut stop_all: Option<oneshot::Sender<()>> = None;
    let busy = || {
        Err(format!(
            "{name} is waiting for its previous task (removed by a reload) to stop its instances; try again when `sluice status {name}` lists them"
        ))
    };
    let closed = previous.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            () = &mut closed => break,
            request = requests.recv() => match request {
                None => return Err(()),
                Some(Request::Status(reply)) => {
                    let _ = reply.send(waiting_status(name, config));
                }
                Some(Request::Control { reply, .. } | Request::Local { reply, .. }) => {
                    let _ = reply.send(busy());
                }
                Some(Request::Reconfigure { config: new, reply }) => {
                    *config = *new;
                    let _ = reply.send(Ok(format!(
                        "{name}: applies once its previous task has ended"
                    )));
                }
                Some(Request::RecheckState(reply)) => {
                    let _ = reply.send(Ok(String::new()));
                }
                Some(Request::Settled(reply)) => {
                    let _ = reply.send(());
                }
                Some(Request::StopAll { reply, .. }) => {
                    stop_all = Some(reply);
                }
                Some(notice) => {
                    // Desired build, connection, config node, ACLs: only the latest counts.
                    let kind = std::mem::discriminant(&notice);
                    deferred.retain(|r| std::mem::discriminant(r) != kind);
                    deferred.push(notice);
                }
            },
        }
    }
    tracing::info!(service = %name, "the previous task of the service has ended");
    match stop_all {
        Some(reply) => {
            let _ = reply.send(());
            Err(())
        }
        None => Ok(deferred),
    }
}

/// Reads what a previous daemon installed, so that an unchanged chain is not rewritten.
/// `iptables-save` runs on the blocking pool, never on a runtime thread.
async fn installed_steering(
    ctx: &Context,
    name: &str,
    config: &ServiceConfig,
) -> Result<Option<BTreeSet<u32>>, String> {
    if !config.steers() {
        return Ok(None);
    }
    let Some(iptables) = ctx.iptables.clone() else {
        return Err("steering needs root and iptables-restore".into());
    };
    let service = name.to_owned();
    let families = tokio::task::spawn_blocking(move || iptables.read(&service))
        .await
        .map_err(|e| format!("iptables-save task: {e}"))?
        .map_err(|e| e.to_string())?;
    let ports: Vec<_> = config.instance_ports().collect();
    let first = families.into_iter().next().unwrap_or_default();
    Ok(Some(
        first
            .targets
            .iter()
            .filter(|t| config.port(t.index) == Some(t.port) && ports.contains(&t.port))
            .map(|t| t.index)
            .collect(),
    ))
}

/// The service's task: builds the core, then feeds it until every handle is gone or a `StopAll`
/// has stopped every instance.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    ctx: Arc<Context>,
    name: String,
    mut config: ServiceConfig,
    found: Vec<(u32, Status)>,
    previous: Option<ServiceHandle>,
    startup: super::Startup,
    mut requests: mpsc::Receiver<Request>,
    events_tx: mpsc::Sender<Event>,
    mut events: mpsc::Receiver<Event>,
) {
    let deferred = match previous {
        Some(previous) => {
            match wait_for_predecessor(&name, &mut config, previous, &mut requests).await {
                Ok(deferred) => deferred,
                Err(()) => return,
            }
        }
        None => Vec::new(),
    };
    let task = TASKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    tracing::info!(service = %name, task, "service task started");
    let (state_path, loaded) = load_state(&ctx.host.state_dir(), &name);
    let installed = installed_steering(&ctx, &name, &config).await;
    let slot = Arc::new(Mutex::new(None));
    let env = HostEnv {
        host: ctx.host.clone(),
        name: name.clone(),
        state_path,
        cgroups: ctx.cgroups.clone(),
        slot: slot.clone(),
    };
    let core = Core::new(
        Setup {
            name: name.clone(),
            host: ctx.host.clone(),
            host_name: ctx.host.coordination.host_name(),
            config,
            state: loaded.state,
            state_error: loaded.error,
            fleet: ctx.coord.is_some(),
            cgroups: ctx.cgroups.clone(),
            steerable: ctx.iptables.is_some(),
            installed,
        },
        Box::new(env),
    );
    let mut executor = Executor {
        ctx,
        name,
        core,
        events_tx,
        replies: BTreeMap::new(),
        next_reply: 0,
        slot,
        slot_release: None,
        releasing: BTreeMap::new(),
        cgroup_removals: BTreeMap::new(),
        immediate: VecDeque::new(),
        tree_errors: Arc::new(Mutex::new(BTreeMap::new())),
    };
    let effects = match startup {
        super::Startup::Ordinary => executor.core.startup_at(found, now()),
        super::Startup::ForShutdown => executor.core.startup_for_shutdown(found, now()),
    };
    executor.run_effects(effects);
    for request in deferred {
        executor.on_request(request);
    }
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                Some(request) => executor.on_request(request),
                // Every handle is gone: the daemon is exiting and leaves instances running.
                None => break,
            },
            Some(event) = events.recv() => executor.handle(event),
        }
        if let Some((forget, reply)) = executor.core.finished() {
            executor.finish_cgroup_removals().await;
            // The next owner of the name spawns shims for the same indices: their locks must
            // be free by then.
            executor.finish_releases().await;
            // Every instance stopped, and each shim killed what was left of its tree. Directory
            // work: off the runtime thread.
            if let Some(tree) = executor.ctx.tree.cgroups().cloned() {
                let name = executor.name.clone();
                let _ = tokio::task::spawn_blocking(move || tree.remove_service(&name)).await;
            }
            if forget {
                executor.forget().await;
            }
            executor.answer(reply, Ok(String::new()));
            break;
        }
    }
    tracing::info!(service = %executor.name, task, "service task ended");
}

impl Executor {
    fn paths(&self, index: u32) -> ShimPaths {
        ShimPaths::new(&self.ctx.host.shim_dir(), &self.name, index)
    }

    fn handle(&mut self, event: Event) {
        let effects = self.handle_recorded(event);
        self.run_effects(effects);
    }

    /// Feeds the core one event and records in the metrics what its effects and its state say
    /// happened: restarts by reason, a deploy's end. The core decides; this only counts.
    fn handle_recorded(&mut self, event: Event) -> Vec<Effect> {
        let before = Before::of(&self.core, &event);
        let effects = self.core.handle_at(event, now());
        let recorded = before.after(&self.core, &effects);
        for reason in recorded.restarts {
            self.ctx.metrics.restart(&self.name, reason);
        }
        if let Some((outcome, duration_ms)) = recorded.deploy {
            self.ctx.metrics.deployed(&self.name, outcome, duration_ms);
        }
        effects
    }

    fn register(&mut self, pending: Pending) -> ReplyId {
        self.next_reply += 1;
        let id = ReplyId(self.next_reply);
        self.replies.insert(id, pending);
        id
    }

    fn answer(&mut self, to: ReplyId, result: Result<String, String>) {
        match self.replies.remove(&to) {
            Some(Pending::Text(reply)) => {
                let _ = reply.send(result);
            }
            Some(Pending::Done(reply)) => {
                let _ = reply.send(());
            }
            None => {}
        }
    }

    fn on_request(&mut self, request: Request) {
        let request = match request {
            Request::Status(reply) => {
                let mut status = self.core.status_at(now());
                status.tree_error = self.tree_error();
                let _ = reply.send(status);
                return;
            }
            Request::Control {
                action,
                index,
                reply,
            } => core::Request::Control {
                action,
                index,
                reply: self.register(Pending::Text(reply)),
            },
            Request::Reconfigure { config, reply } => core::Request::Reconfigure {
                config,
                reply: self.register(Pending::Text(reply)),
            },
            Request::Settled(reply) => core::Request::Settled(self.register(Pending::Done(reply))),
            Request::StopAll { forget, reply } => core::Request::StopAll {
                forget,
                reply: self.register(Pending::Done(reply)),
            },
            Request::ShuttingDown => core::Request::ShuttingDown,
            Request::Desired { build } => core::Request::Desired { build },
            Request::CanaryView(view) => core::Request::CanaryView(view),
            Request::Connection(connected) => core::Request::Connection(connected),
            Request::ConfigError(error) => core::Request::ConfigError(error),
            Request::WorldWritable(nodes) => core::Request::WorldWritable(nodes),
            Request::SlotError(error) => core::Request::SlotError(error),
            Request::Local { verb, reply } => core::Request::Local {
                verb,
                reply: self.register(Pending::Text(reply)),
            },
            Request::RecheckState(reply) => {
                core::Request::RecheckState(self.register(Pending::Text(reply)))
            }
        };
        self.handle(Event::Request(request));
    }

    /// Runs the effects in order, then whatever outcomes were known at once.
    fn run_effects(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            self.run_effect(effect);
        }
        while let Some(event) = self.immediate.pop_front() {
            let effects = self.handle_recorded(event);
            for effect in effects {
                self.run_effect(effect);
            }
        }
    }

    /// Spawns a task that sends `event` once `work` is done.
    fn report(&self, work: impl Future<Output = Event> + Send + 'static) {
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let event = work.await;
            let _ = events.send(event).await;
        });
    }

    fn run_effect(&mut self, effect: Effect) {
        match effect {
            Effect::Spawn {
                index,
                generation,
                spec,
                cgroup,
            } => self.spawn_shim(index, generation, *spec, cgroup),
            Effect::Watch { index, generation } => {
                let socket = self.paths(index).socket;
                self.report(async move {
                    let status = match shim::wait(&socket).await {
                        Ok(status @ Status::Exited { .. }) => Ok(status),
                        Ok(status @ Status::Running { .. }) => Err(format!(
                            "{}: the shim answered `wait` with `{status}`",
                            socket.display()
                        )),
                        Err(e) => Err(e.to_string()),
                    };
                    Event::Instance {
                        index,
                        generation,
                        event: InstanceEvent::Exited(status),
                    }
                });
            }
            Effect::Stop {
                index,
                signal,
                grace_ms,
                steered_anyway,
            } => {
                if steered_anyway {
                    tracing::warn!(service = %self.name, index, "stopping it while the chain may still steer to it");
                }
                let socket = self.paths(index).socket;
                let name = self.name.clone();
                tokio::spawn(async move {
                    if let Err(e) = shim::stop(&socket, signal, grace_ms).await {
                        // The watch reports the shim's end; nothing else to do here.
                        tracing::warn!(service = %name, index, "stop: {e}");
                    }
                });
            }
            Effect::Release { index } => {
                let paths = self.paths(index);
                let previous = self.releasing.insert(
                    index,
                    tokio::spawn(async move {
                        shim::release_and_wait(&paths).await;
                    }),
                );
                drop(previous);
            }
            Effect::Signal {
                indices,
                signal,
                reply,
            } => {
                let sockets: Vec<(u32, PathBuf)> =
                    indices.iter().map(|&i| (i, self.paths(i).socket)).collect();
                let name = self.name.clone();
                let reply = self.replies.remove(&reply);
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    for (i, socket) in &sockets {
                        if let Err(e) = shim::signal(socket, signal).await {
                            errors.push(format!("{name}/{i}: {e}"));
                        }
                    }
                    if let Some(Pending::Text(reply)) = reply {
                        let _ = reply.send(if errors.is_empty() {
                            Ok(format!("signalled {} instance(s) of {name}", sockets.len()))
                        } else {
                            Err(errors.join("; "))
                        });
                    }
                });
            }
            Effect::RestartSignal {
                index,
                signal,
                epoch,
            } => {
                let socket = self.paths(index).socket;
                self.report(async move {
                    let input = match shim::signal(&socket, signal).await {
                        Ok(()) => Input::Signalled(index),
                        Err(e) => Input::SignalFailed(index, e.to_string()),
                    };
                    Event::Restart {
                        epoch,
                        event: RestartEvent::Input(input),
                    }
                });
            }
            Effect::SetTimer { after_ms, timer } => self.report(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                Event::Timer(timer)
            }),
            Effect::AwaitReady {
                index,
                generation,
                probe,
            } => self.report(async move {
                Event::Instance {
                    index,
                    generation,
                    event: InstanceEvent::Ready(probe.until_ready().await),
                }
            }),
            Effect::WatchLiveness {
                index,
                generation,
                probe,
            } => self.watch_liveness(index, generation, *probe),
            Effect::Check {
                index,
                epoch,
                probe,
            } => self.report(async move {
                let input = match probe.until_ready().await {
                    Ok(()) => Input::Healthy(index),
                    Err(why) => Input::Unhealthy(index, why),
                };
                Event::Restart {
                    epoch,
                    event: RestartEvent::Input(input),
                }
            }),
            Effect::WarmUp {
                index,
                epoch,
                port,
                config,
                release,
                sibling,
            } => {
                let requests = crate::service::warmup::load_requests(&config, release.as_deref());
                let (metrics, service) = (self.ctx.metrics.clone(), self.name.clone());
                self.report(async move {
                    let event = match requests {
                        Ok(requests) => {
                            let result =
                                crate::service::warmup::run(port, requests, &config, sibling).await;
                            let summary = match &result {
                                Ok(summary) | Err((_, summary)) => summary,
                            };
                            metrics.warmed(&service, summary.duration_ms);
                            RestartEvent::Warmed {
                                index,
                                result: Box::new(result),
                            }
                        }
                        Err(why) => {
                            RestartEvent::Input(Input::WarmFailed(index, format!("warm-up: {why}")))
                        }
                    };
                    Event::Restart { epoch, event }
                });
            }
            Effect::ApplyChain { chain, desired } => {
                let Some(iptables) = self.ctx.iptables.clone() else {
                    self.immediate.push_back(Event::Steered(Err(
                        "steering needs root and iptables-restore".into(),
                    )));
                    return;
                };
                let (metrics, service) = (self.ctx.metrics.clone(), self.name.clone());
                self.report(async move {
                    let applied = tokio::task::spawn_blocking(move || iptables.apply(&chain)).await;
                    metrics.steered(&service, matches!(applied, Ok(Ok(()))));
                    Event::Steered(match applied {
                        Ok(Ok(())) => Ok(desired),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(format!("iptables task: {e}")),
                    })
                });
            }
            Effect::AwaitDrain {
                index,
                waiter,
                port,
                until,
                timeout_ms,
            } => {
                let service = self.name.clone();
                let metrics = self.ctx.metrics.clone();
                self.report(async move {
                    let outcome = match port {
                        Some(port) => Some(
                            crate::service::drain::wait(&service, index, port, until, timeout_ms)
                                .await,
                        ),
                        None => None,
                    };
                    if let Some(outcome) = &outcome {
                        metrics.drained(&service, outcome.waited_ms);
                    }
                    Event::Drained {
                        index,
                        waiter,
                        outcome,
                    }
                });
            }
            Effect::SetLowWeight {
                index,
                generation,
                dir,
            } => {
                let result = match self.ctx.cgroups.cgroups() {
                    Some(cgroups) => cgroups.set_low(&dir),
                    None => Err("cgroups: none found at start-up".into()),
                };
                if result.is_ok() {
                    tracing::info!(service = %self.name, index, cgroup = %dir.display(), "cpu weight set to low");
                }
                self.immediate.push_back(Event::Instance {
                    index,
                    generation,
                    event: InstanceEvent::WeightSet(result),
                });
            }
            Effect::LowerRunning {
                index,
                generation,
                dir,
                pid,
                shim_pid,
            } => {
                // Inline, before the stop's signal goes: a few writes to cgroupfs.
                let result = self.lower_running(index, &dir, pid, shim_pid);
                if let Ok(moved) = &result {
                    tracing::info!(service = %self.name, index, cgroup = %dir.display(), processes = moved, "drained with no connection left: moved to the low cpu weight");
                }
                self.immediate.push_back(Event::Instance {
                    index,
                    generation,
                    event: InstanceEvent::Lowered(result.map(|_| ())),
                });
            }
            Effect::RemoveCgroup { index, dir } => self.remove_cgroup(index, dir),
            Effect::Install(job) => self.install(*job),
            Effect::PostRestart {
                build,
                hooks,
                release,
                keep,
            } => {
                let releases = Releases::new(&self.ctx.host.data_dir, &self.name);
                let in_use: BTreeSet<String> = [build.clone()].into_iter().collect();
                self.report(async move {
                    let result = hooks
                        .run(Stage::PostRestart, &build, None, release.as_deref())
                        .await;
                    // The serving release and the one before stay, whatever `keep` says. A
                    // release tree may hold 100,000s of files: removed on the blocking pool.
                    let pruned =
                        tokio::task::spawn_blocking(move || releases.prune(keep.max(2), &in_use))
                            .await;
                    match pruned {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!("pruning releases: {e}"),
                        Err(e) => tracing::warn!("pruning releases: the task failed: {e}"),
                    }
                    Event::Deploy(DeployEvent::PostRestartDone { build, result })
                });
            }
            Effect::AcquireSlot => {
                let Some(zk) = self.ctx.coord.clone() else {
                    self.immediate
                        .push_back(Event::Deploy(DeployEvent::Slot(Err(
                            "no ZooKeeper to hold a slot in".into(),
                        ))));
                    return;
                };
                let service = self.name.clone();
                let held = self.slot.clone();
                let releasing = self.slot_release.take();
                self.report(async move {
                    if let Some(releasing) = releasing {
                        let _ = releasing.await;
                    }
                    let result = match zk.acquire_slot(&service).await {
                        Ok(slot) => {
                            let old = held
                                .lock()
                                .expect("the slot lock is never held across a panic")
                                .replace(slot);
                            // A handle kept from before is either this very lease (the session
                            // lived on: it must not be deleted) or one lost with its session.
                            if let Some(old) = old {
                                old.disown();
                            }
                            Ok(())
                        }
                        Err(e) => {
                            tokio::time::sleep(Duration::from_millis(SLOT_RETRY_MS)).await;
                            Err(e.to_string())
                        }
                    };
                    Event::Deploy(DeployEvent::Slot(result))
                });
            }
            Effect::ReleaseSlot(host) => {
                let Some(zk) = self.ctx.coord.clone() else {
                    return;
                };
                let value = serde_json::to_value(&*host).expect("status serializes");
                // Published here, in the order of the effects; the release waits for its ack.
                let seq = zk.publish_status(&self.name, value);
                let slot = self
                    .slot
                    .lock()
                    .expect("the slot lock is never held across a panic")
                    .take();
                if let Some(slot) = slot {
                    let service = self.name.clone();
                    let previous = self.slot_release.take();
                    self.slot_release = Some(tokio::spawn(async move {
                        if let Some(previous) = previous {
                            let _ = previous.await;
                        }
                        slot.release_after(&zk, &service, seq).await;
                    }));
                }
            }
            Effect::PublishHostStatus(host) => {
                let Some(zk) = self.ctx.coord.clone() else {
                    return;
                };
                let value = serde_json::to_value(&*host).expect("status serializes");
                // Synchronously, so that statuses reach the writer in the order they were made.
                zk.publish_status(&self.name, value);
            }
            Effect::CanarySample {
                epoch,
                targets,
                config,
                peers,
            } => {
                let zk = self.ctx.coord.clone();
                let service = self.name.clone();
                let config = std::sync::Arc::new(*config);
                self.report(async move {
                    let instances = super::canary_sample::sample(targets, config).await;
                    let peers = match (peers, zk) {
                        (false, _) => None,
                        (true, None) => Some(Err("no zookeeper backend".into())),
                        (true, Some(zk)) => {
                            Some(zk.host_statuses(&service).await.map_err(|e| e.to_string()))
                        }
                    };
                    Event::Canary(CanaryEvent::Sampled {
                        epoch,
                        instances,
                        peers,
                    })
                });
            }
            Effect::CanaryWrite { build, write } => {
                let zk = self.ctx.coord.clone();
                let service = self.name.clone();
                self.report(async move {
                    let result = match zk {
                        None => Err("no zookeeper backend".into()),
                        Some(zk) => match write {
                            CanaryWrite::Promote => zk.promote_canary(&service, &build).await,
                            CanaryWrite::Clear => zk.clear_canary(&service, &build).await,
                        }
                        .map_err(|e| e.to_string()),
                    };
                    Event::Canary(CanaryEvent::Acted { build, result })
                });
            }
            Effect::CanaryRecord { build, status } => {
                let Some(zk) = self.ctx.coord.clone() else {
                    return;
                };
                let service = self.name.clone();
                let data = serde_json::to_vec(&*status).expect("a canary status serializes");
                tokio::spawn(async move {
                    if let Err(e) = zk.record_canary(&service, &build, &data).await {
                        tracing::warn!(service, build, "canary record not written: {e}");
                    }
                });
            }
            Effect::Reply { to, result } => self.answer(to, result),
        }
    }

    fn spawn_shim(
        &mut self,
        index: u32,
        generation: u64,
        spec: crate::service::spec::InstanceSpec,
        cgroup: bool,
    ) {
        let paths = self.paths(index);
        let releasing = self.releasing.remove(&index);
        let shim_binary = self.ctx.shim_binary.clone();
        let cgroups = self.ctx.cgroups.cgroups().filter(|_| cgroup).cloned();
        let tree = self.ctx.tree.cgroups().cloned();
        let tree_errors = self.tree_errors.clone();
        let removal = self.cgroup_removals.remove(&index);
        let service = self.name.clone();
        for log in [&spec.stdout_log, &spec.stderr_log] {
            if let Some(dir) = log.parent()
                && let Err(e) = make_log_dir(dir)
            {
                tracing::warn!(service = %self.name, index, "creating {}: {e}", dir.display());
            }
        }
        self.report(async move {
            if let Some(releasing) = releasing {
                let _ = releasing.await;
            }
            // A removal of the index's cgroup must not race its making: stop it, and wait until it
            // is really gone (a removal stopped half-way leaves the directory, which is reused).
            if let Some(removal) = removal {
                removal.abort();
                let _ = removal.await;
            }
            let cgroup = cgroups.map(|c| c.prepare(&service, index));
            let cgroup_dir = cgroup.as_ref().and_then(|c| c.as_ref().ok());
            let tree_dir = match tree.map(|t| t.prepare(&service, index)) {
                Some(Ok(dir)) => {
                    lock(&tree_errors).remove(&index);
                    Some(dir)
                }
                Some(Err(e)) => {
                    tracing::warn!(service = %service, index, "{e}; its process tree is tracked by its shim's session only");
                    lock(&tree_errors).insert(index, e);
                    None
                }
                None => None,
            };
            let tag = spec.tag();
            let joins = shim::Cgroups {
                tree: tree_dir.as_deref(),
                cpu: cgroup_dir.map(PathBuf::as_path),
            };
            let result = match shim::spawn(&shim_binary, &paths, &spec, joins).await
            {
                Ok((shim_pid, pid)) => Ok((
                    ShimInfo {
                        shim_pid,
                        pid,
                        started_ms: now_ms(),
                        started_boot_ms: boot_ms(),
                        tag,
                    },
                    false,
                )),
                // Another shim holds the instance (a previous daemon died while spawning it):
                // take that one over instead of starting a second process.
                Err(ShimError::Busy { .. }) => adopt_busy(&paths).await,
                Err(e) => Err(e),
            };
            Event::Instance {
                index,
                generation,
                event: InstanceEvent::Spawned {
                    result: result.map_err(|e| e.to_string()),
                    cgroup,
                },
            }
        });
    }

    /// The periodic liveness probe of a healthy instance.
    fn watch_liveness(&self, index: u32, generation: u64, probe: crate::service::health::Probe) {
        let interval = probe.config.liveness_interval_ms;
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
                                .send(Event::Instance {
                                    index,
                                    generation,
                                    event: InstanceEvent::LivenessFailed(reason),
                                })
                                .await;
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Moves a stopping instance's processes into its cgroup at the low weight; how many moved.
    /// Its tracking cgroup lists them; without one, its process (checked to be its shim's child,
    /// so a reused pid is never taken for it) and its descendants.
    fn lower_running(
        &self,
        index: u32,
        dir: &Path,
        pid: u32,
        shim_pid: u32,
    ) -> Result<usize, String> {
        let Some(cgroups) = self.ctx.cgroups.cgroups() else {
            return Err("cgroups: none found at start-up".into());
        };
        // A removal of the index's cgroup still in progress (its last processes moving out)
        // would move these back and remove the directory under them.
        if self
            .cgroup_removals
            .get(&index)
            .is_some_and(|removal| !removal.is_finished())
        {
            return Err(format!("cgroups: {} is still being removed", dir.display()));
        }
        let tracked = self
            .ctx
            .tree
            .cgroups()
            .map(|tree| tree.procs(&self.name, index))
            .and_then(|procs| procs.ok())
            .filter(|procs| !procs.is_empty());
        let pids = match tracked {
            Some(pids) => pids,
            None => {
                let parent = sluice_shim::parent_of(pid as libc::pid_t);
                if parent != Some(shim_pid as libc::pid_t) {
                    return Err(format!(
                        "cgroups: pid {pid} is no longer the child of its shim {shim_pid}"
                    ));
                }
                crate::service::cgroup::descendants(pid)
            }
        };
        cgroups.lower_running(dir, &pids)?;
        Ok(pids.len())
    }

    /// Removes the instance's cgroup in the background (its last processes may still be exiting);
    /// a start of the same index waits for the removal.
    fn remove_cgroup(&mut self, index: u32, dir: PathBuf) {
        let Some(cgroups) = self.ctx.cgroups.cgroups().cloned() else {
            return;
        };
        let service = self.name.clone();
        // Under cgroup v2 the CPU and tracking cgroups share the one hierarchy: the instance's
        // processes go back to its tracking cgroup, so its tree stays whole.
        let home = match self.ctx.tree.cgroups() {
            Some(tree)
                if tree.version == crate::service::cgroup::Version::V2
                    && cgroups.version == crate::service::cgroup::Version::V2 =>
            {
                tree.dir(&service, index)
            }
            _ => cgroups.home.clone(),
        };
        let previous = self.cgroup_removals.remove(&index);
        let handle = tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            match cgroups.remove(&dir, &home).await {
                Ok(()) => {
                    tracing::info!(service = %service, index, cgroup = %dir.display(), "cgroup removed")
                }
                Err(e) => tracing::warn!(service = %service, index, "{e}"),
            }
        });
        self.cgroup_removals.insert(index, handle);
    }

    /// Waits for the shim releases in progress (each bounded by the shim's request timeout and
    /// its lock wait).
    async fn finish_releases(&mut self) {
        for (_, handle) in std::mem::take(&mut self.releasing) {
            let _ = handle.await;
        }
    }

    /// Why instances of the service are tracked by session only: the host has no tracking
    /// cgroups, or making an instance's failed.
    fn tree_error(&self) -> Option<String> {
        self.ctx.tree.error().or_else(|| {
            lock(&self.tree_errors)
                .iter()
                .next()
                .map(|(index, e)| format!("{}/{index}: {e}", self.name))
        })
    }

    /// Waits for the cgroup removals in progress (bounded by their attempts).
    async fn finish_cgroup_removals(&mut self) {
        for (_, handle) in std::mem::take(&mut self.cgroup_removals) {
            let _ = handle.await;
        }
    }

    /// The service left the configuration: its state file and its steering go too.
    async fn forget(&mut self) {
        let state_path = crate::service::state::path(&self.ctx.host.state_dir(), &self.name);
        if let Err(e) = crate::service::state::remove(&state_path) {
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

    /// A deploy's download, install hooks, `current` flip and `pre_restart` hooks.
    fn install(&self, job: InstallJob) {
        let InstallJob {
            build,
            build_config,
            previous,
            hooks,
        } = job;
        let releases = Releases::new(&self.ctx.host.data_dir, &self.name);
        let coord = self.ctx.coord.clone();
        let peers = self.ctx.peers.clone();
        let service = self.name.clone();
        let metrics = self.ctx.metrics.clone();
        self.report(async move {
            let result = async {
                let source = match &coord {
                    Some(zk) => {
                        // ZooKeeper being away delays a deploy; it never fails it.
                        let mut pause_ms = 500;
                        let meta = loop {
                            match zk.build_meta(&service, &build).await {
                                Ok(meta) => break meta,
                                Err(e) => {
                                    tracing::warn!(
                                        service,
                                        build,
                                        "reading /builds/{service}/{build}: {e}; retrying"
                                    );
                                    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                                    pause_ms = (pause_ms * 2).min(META_RETRY_MAX_MS);
                                }
                            }
                        };
                        match meta {
                            Some(meta) => build::Source {
                                url: meta.url,
                                sha256: Some(meta.sha256),
                            },
                            None => build::Source {
                                url: build::source_url(&build_config.source, &service, &build),
                                sha256: None,
                            },
                        }
                    }
                    None => build::Source {
                        url: build::source_url(&build_config.source, &service, &build),
                        sha256: None,
                    },
                };
                if !releases.has(&build) {
                    hooks
                        .run(Stage::PreDownload, &build, previous.as_deref(), None)
                        .await?;
                }
                let limits = build::Limits {
                    max_archive_bytes: build_config.max_archive_bytes,
                    max_unpacked_bytes: build_config.max_unpacked_bytes,
                    max_entries: build_config.max_entries,
                    ..build::Limits::default()
                };
                let fresh = !releases.has(&build);
                let tally = Arc::new(crate::metrics::FetchTally::default());
                let fetch_started = std::time::Instant::now();
                let installed = build::FETCH_TALLY
                    .scope(
                        tally.clone(),
                        build::peer::install(
                            peers.as_ref(),
                            &releases,
                            &service,
                            &build,
                            &source,
                            &limits,
                        ),
                    )
                    .await;
                if fresh {
                    metrics.fetched(&service, &tally, fetch_started.elapsed().as_millis() as u64);
                }
                let dir = installed.map_err(|e| e.to_string())?;
                hooks
                    .run(Stage::PostDownload, &build, previous.as_deref(), Some(&dir))
                    .await?;
                hooks
                    .run(Stage::PostInstall, &build, previous.as_deref(), Some(&dir))
                    .await?;
                // Rename and fsync of the service's directory: on the blocking pool.
                {
                    let (releases, build) = (releases.clone(), build.clone());
                    tokio::task::spawn_blocking(move || releases.set_current(&build))
                        .await
                        .map_err(|e| format!("switching `current`: the task failed: {e}"))?
                        .map_err(|e| e.to_string())?;
                }
                hooks
                    .run(Stage::PreRestart, &build, previous.as_deref(), Some(&dir))
                    .await?;
                Ok(())
            }
            .await;
            Event::Deploy(DeployEvent::Installed { build, result })
        });
    }
}

/// What the metrics need of the core before it handles one event.
struct Before {
    /// The instance whose probe failed in this event, and which probe.
    probe_failed: Option<(u32, RestartReason)>,
    /// That instance was up (running or starting) before.
    probed_was_up: bool,
    /// The sum of the instances' `restarts` (exits nobody asked for).
    exits: u64,
    /// The deploy in flight: its build and start.
    deploy: Option<(String, Millis)>,
}

/// What one event did, for the metrics.
#[derive(Debug, Default, PartialEq)]
struct Recorded {
    restarts: Vec<RestartReason>,
    /// A deploy ended: its outcome and duration.
    deploy: Option<(&'static str, u64)>,
}

impl Before {
    fn of(core: &Core, event: &Event) -> Before {
        let probe_failed = match event {
            Event::Instance {
                index,
                event: InstanceEvent::LivenessFailed(_),
                ..
            } => Some((*index, RestartReason::Liveness)),
            Event::Instance {
                index,
                event: InstanceEvent::Ready(Err(_)),
                ..
            } => Some((*index, RestartReason::Readiness)),
            _ => None,
        };
        Before {
            probe_failed,
            probed_was_up: probe_failed
                .is_some_and(|(index, _)| phase_of(core, index).is_some_and(|p| p.is_up())),
            exits: exits(core),
            deploy: core
                .deploy
                .deploy
                .as_ref()
                .map(|d| (d.build.clone(), d.started_ms)),
        }
    }

    /// An exit nobody asked for shows as the core's `restarts` count going up; a failed probe as
    /// that instance going from up to draining or stopping in answer to it (a drained stop emits
    /// its `Stop` only once the drain is over); a restart batch as the spawn (or reload signal)
    /// of a member of the batch in flight.
    fn after(self, core: &Core, effects: &[Effect]) -> Recorded {
        let mut recorded = Recorded::default();
        for _ in self.exits..exits(core) {
            recorded.restarts.push(RestartReason::Exit);
        }
        if let Some((index, reason)) = self.probe_failed
            && self.probed_was_up
            && matches!(
                phase_of(core, index),
                Some(core::Phase::Draining | core::Phase::Stopping)
            )
        {
            recorded.restarts.push(reason);
        }
        let batch = core.restart_status().map(|r| r.batch);
        for effect in effects {
            if let Effect::Spawn { index, .. } | Effect::RestartSignal { index, .. } = effect
                && batch.as_ref().is_some_and(|b| b.contains(index))
            {
                recorded.restarts.push(if core.deploy.deploy.is_some() {
                    RestartReason::Deploy
                } else {
                    RestartReason::Restart
                });
            }
        }
        let deploy_after = core.deploy.deploy.as_ref().map(|d| &d.build);
        if let Some((build, started_ms)) = self.deploy
            && deploy_after != Some(&build)
        {
            let outcome = if deploy_after.is_some() {
                "superseded"
            } else if core.deploy.last_error.is_some() {
                "failed"
            } else {
                "succeeded"
            };
            recorded.deploy = Some((outcome, core.now.saturating_sub(started_ms)));
        }
        recorded
    }
}

fn phase_of(core: &Core, index: u32) -> Option<core::Phase> {
    core.instances.get(&index).map(|i| i.phase)
}

fn exits(core: &Core) -> u64 {
    core.instances.values().map(|i| u64::from(i.restarts)).sum()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("the tree errors lock is never held across a panic")
}

/// Takes over a shim that another daemon spawned: waits for its socket, then asks its status.
async fn adopt_busy(paths: &ShimPaths) -> Result<(ShimInfo, bool), ShimError> {
    let mut last = None;
    for _ in 0..ADOPT_BUSY_ATTEMPTS {
        match shim::status(&paths.socket).await {
            Ok(Status::Running {
                shim_pid,
                pid,
                started_ms,
                started_boot_ms,
                tag,
                ..
            }) => {
                return Ok((
                    ShimInfo {
                        shim_pid,
                        pid,
                        started_ms,
                        started_boot_ms: started_boot_ms
                            .unwrap_or_else(|| now().boot_of_wall(started_ms)),
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

impl HookContext {
    async fn run(
        &self,
        stage: Stage,
        build: &str,
        previous: Option<&str>,
        release_dir: Option<&std::path::Path>,
    ) -> Result<(), String> {
        let configured = self
            .configured
            .get(stage.as_str())
            .cloned()
            .unwrap_or_default();
        let hooks = sluice_hooks::hooks_for(stage, &configured, release_dir, &self.stock_dir)
            .map_err(|e| e.to_string())?;
        if hooks.is_empty() {
            return Ok(());
        }
        let identity = self
            .identity
            .clone()
            .map_err(|e| format!("{stage} hooks not run: {e}"))?;
        std::fs::create_dir_all(&self.log_dir)
            .map_err(|e| format!("{}: {e}", self.log_dir.display()))?;
        let run = sluice_hooks::Run {
            stage,
            service: &self.service,
            build,
            previous_build: previous,
            release_dir,
            identity,
            extra_env: &self.env,
            timeout_ms: self.timeout_ms,
            log_dir: &self.log_dir,
            stock_dir: &self.stock_dir,
        };
        sluice_hooks::run_stage(&run, &hooks)
            .await
            .map(drop)
            .map_err(|e| match e.output_tail() {
                // The end of its output is what an operator needs to see in status.
                Some(tail) if !tail.trim().is_empty() => {
                    let tail = tail.trim();
                    let start = tail.len().saturating_sub(OUTPUT_TAIL_IN_STATUS);
                    let start = (start..tail.len())
                        .find(|i| tail.is_char_boundary(*i))
                        .unwrap_or(tail.len());
                    format!("{e}; output ends with: {}", &tail[start..])
                }
                _ => e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthConfig, StrategyName};
    use crate::service::testkit::{World, config};

    /// A world of two steered, serving instances with a liveness probe.
    fn serving() -> World {
        let mut service = config(2, true, StrategyName::Drain);
        service.health = Some(
            serde_json::from_value::<HealthConfig>(serde_json::json!({
                "tcp": true,
                "liveness_interval_ms": 1000
            }))
            .unwrap(),
        );
        let mut world = World::new(service, false, 7);
        world.settle(5_000);
        assert_eq!(world.core.instances[&1].phase, core::Phase::Running);
        world
    }

    /// Hands `event` to the core as the executor does, recording; runs its effects.
    fn recorded(world: &mut World, event: Event) -> Recorded {
        let before = Before::of(&world.core, &event);
        let effects = world.core.handle(event, world.now);
        let recorded = before.after(&world.core, &effects);
        world.apply(effects);
        recorded
    }

    #[test]
    fn a_failed_liveness_probe_counts_once_though_its_stop_waits_for_the_drain() {
        let mut world = serving();
        let generation = world.core.instances[&1].generation;
        let failed = || Event::Instance {
            index: 1,
            generation,
            event: InstanceEvent::LivenessFailed("3 liveness probes failed in a row".into()),
        };
        assert_eq!(
            recorded(&mut world, failed()).restarts,
            vec![RestartReason::Liveness]
        );
        // A second report while it drains changes nothing and is not counted again.
        assert_eq!(recorded(&mut world, failed()).restarts, vec![]);
    }

    #[test]
    fn a_crash_counts_once_as_exit() {
        let mut world = serving();
        let generation = world.core.instances[&0].generation;
        let exited = Event::Instance {
            index: 0,
            generation,
            event: InstanceEvent::Exited(Ok(Status::Exited {
                shim_pid: 1,
                pid: 2,
                started_ms: world.now.saturating_sub(5_000),
                started_boot_ms: Some(world.now.saturating_sub(5_000)),
                exited_ms: world.now,
                exited_boot_ms: Some(world.now),
                outcome: sluice_shim::proto::Outcome::Code(1),
                tag: String::new(),
            })),
        };
        assert_eq!(
            recorded(&mut world, exited).restarts,
            vec![RestartReason::Exit]
        );
    }

    #[test]
    fn an_event_that_restarts_nothing_records_nothing() {
        let mut world = serving();
        let recorded = recorded(&mut world, Event::Request(core::Request::Connection(true)));
        assert_eq!(recorded, Recorded::default());
    }
}
