//! The executor of a service's restart: turns the actions of the restart machine
//! (`sluice_strategies::restart`) into stops, starts, probes, warm-ups and steering changes, and
//! feeds back what happened. The machine is persisted before its actions run; after a crash of the
//! daemon, `resume` repeats the current step's actions, which are all idempotent here.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sluice_strategies::plan;
use sluice_strategies::restart::{
    Action as Step, Input, Restart, Step as Phase_, Strategy, Version,
};
use sluice_strategies::warmup::Summary;

use super::steer::DrainFor;
use super::{AfterStop, Event, Phase, Service};
use crate::config::StrategyName;
use crate::state::{FailedRestart, ServiceState};

/// What the restart in progress waits for; rebuilt by `resume` after a crash.
#[derive(Debug, Default)]
pub(super) struct Executor {
    /// Stop issued: `Exited` expected.
    exit: BTreeMap<u32, u64>,
    /// Start issued: `Started` expected.
    start: BTreeMap<u32, u64>,
    /// Disable issued: once out of steering, wait for the connections, then `Drained`.
    drain: BTreeMap<u32, u64>,
    /// Check issued for a service without a probe: `Healthy` once it has run `startup_ms`.
    check: BTreeMap<u32, u64>,
    /// Enable issued: `Enabled` once in steering.
    enable: BTreeMap<u32, u64>,
    /// Inputs produced while executing, fed to the machine in order.
    inputs: VecDeque<(u64, Input)>,
}

impl Executor {
    /// Whether the instance belongs to the batch being restarted; the restart policy leaves those
    /// to the machine.
    pub(super) fn in_batch(&self, state: &ServiceState, index: u32) -> bool {
        state
            .restart
            .as_ref()
            .is_some_and(|m| !m.finished && m.in_flight().contains(&index))
    }
}

impl Service {
    fn epoch(&self) -> u64 {
        self.state.restart.as_ref().map_or(0, |m| m.epoch)
    }

    /// Begins a restart of `indices` with the service's strategy.
    pub(super) fn begin_restart(&mut self, indices: Vec<u32>) {
        if indices.is_empty() {
            for reply in self.restart_replies.drain(..) {
                let _ = reply.send(Ok(format!("{}: nothing to restart", self.name)));
            }
            return;
        }
        let strategy = match self.config.strategy() {
            StrategyName::Drain => Strategy::Drain,
            StrategyName::Rolling => Strategy::Rolling,
            StrategyName::AllAtOnce => Strategy::AllAtOnce,
            StrategyName::Signal => Strategy::Signal,
        };
        let batches = if strategy == Strategy::AllAtOnce {
            vec![indices]
        } else {
            plan::batches(&indices, self.config.restart.batch_size.0)
        };
        let warm = self.config.warmup.is_some();
        tracing::info!(service = %self.name, ?strategy, ?batches, warm, "restart begins");
        if self.state.applied.is_none() {
            self.state.applied = Some(self.config.clone());
        }
        self.restart_begins();
        self.state.restart = Some(Restart::new(strategy, warm, batches));
        if let Err(e) = self.persist() {
            self.state.restart = None;
            for reply in self.restart_replies.drain(..) {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
        self.exec = Executor::default();
        let actions = self.state.restart.as_mut().expect("just set").resume();
        self.execute(actions);
        self.drive();
    }

    /// Restarts instances whose configuration changed, unless that configuration failed before.
    /// Returns how many.
    pub(super) fn restart_outdated(&mut self) -> usize {
        if self.state.restart.is_some() || self.stopping_all.is_some() {
            return 0;
        }
        if self
            .state
            .failed
            .as_ref()
            .is_some_and(|f| f.config == self.config && f.build == self.state.target_build)
        {
            return 0;
        }
        let outdated: Vec<u32> = self
            .outdated()
            .into_iter()
            .filter(|i| self.desired_up(*i))
            .collect();
        let n = outdated.len();
        if n > 0 {
            self.begin_restart(outdated);
        }
        n
    }

    /// Continues a persisted restart (after a crash of the daemon), or restarts what is outdated.
    pub(super) fn resume_restart(&mut self) {
        let Some(machine) = self.state.restart.as_mut() else {
            self.restart_outdated();
            return;
        };
        if machine.finished {
            self.state.restart = None;
            self.persist_logged();
            return;
        }
        tracing::info!(service = %self.name, step = ?machine.step, batch = ?machine.batch, "resuming the restart");
        let actions = machine.resume();
        self.exec = Executor::default();
        self.execute(actions);
        self.drive();
    }

    /// Drops the restart in progress (the service is being stopped).
    pub(super) fn abandon_restart(&mut self, why: &str) {
        if self.state.restart.take().is_some() {
            self.persist_logged();
        }
        self.exec = Executor::default();
        for reply in self.restart_replies.drain(..) {
            let _ = reply.send(Err(why.to_owned()));
        }
    }

    pub(super) fn feed(&mut self, epoch: u64, input: Input) {
        self.exec.inputs.push_back((epoch, input));
        self.drive();
    }

    /// Feeds queued inputs to the machine, persisting it before its actions run.
    pub(super) fn drive(&mut self) {
        while let Some((epoch, input)) = self.exec.inputs.pop_front() {
            let Some(machine) = self.state.restart.as_mut() else {
                self.exec.inputs.clear();
                return;
            };
            if epoch == machine.epoch
                && let Input::Healthy(index) = input
                && let Some(instance) = self.instances.get_mut(&index)
                && instance.phase.is_up()
            {
                instance.healthy = true;
            }
            let actions = machine.on(epoch, input);
            if actions.is_empty() {
                continue;
            }
            self.persist_logged();
            self.execute(actions);
        }
    }

    pub(super) fn execute(&mut self, actions: Vec<Step>) {
        let actions = self.gate(actions);
        let epoch = self.epoch();
        let steers = self.config.steers();
        for action in actions {
            tracing::info!(service = %self.name, ?action, "restart step");
            match action {
                Step::Disable(members) => {
                    for i in members {
                        if steers {
                            self.exec.drain.insert(i, epoch);
                        } else {
                            self.exec.inputs.push_back((epoch, Input::Drained(i)));
                        }
                    }
                }
                Step::Stop(members) => {
                    // A drain strategy has drained the batch already (Disable came first); the
                    // other strategies do not drain at all.
                    for i in members {
                        let Some(instance) = self.instances.get_mut(&i) else {
                            self.exec.inputs.push_back((epoch, Input::Exited(i)));
                            continue;
                        };
                        match instance.phase {
                            Phase::Starting | Phase::Running | Phase::Spawning => {
                                self.exec.exit.insert(i, epoch);
                                if instance.phase != Phase::Spawning {
                                    self.stop(i, AfterStop::Nothing, false);
                                }
                            }
                            Phase::Draining | Phase::Stopping => {
                                instance.after_stop = AfterStop::Nothing;
                                self.exec.exit.insert(i, epoch);
                                if instance.phase == Phase::Draining {
                                    self.stop_now(i);
                                }
                            }
                            _ => self.exec.inputs.push_back((epoch, Input::Exited(i))),
                        }
                    }
                }
                Step::Start(members, version) => {
                    for i in members {
                        self.execute_start(i, version, epoch);
                    }
                }
                Step::Check(members) => {
                    for i in members {
                        self.execute_check(i, epoch);
                    }
                }
                Step::WarmUp(members) => {
                    for i in members {
                        self.execute_warmup(i, epoch);
                    }
                }
                Step::Signal(members) => {
                    let signal = self.config.restart.reload_signal.0;
                    for i in members {
                        let socket = self.paths(i).socket;
                        let events = self.events_tx.clone();
                        tokio::spawn(async move {
                            let input = match crate::shim::signal(&socket, signal).await {
                                Ok(()) => Input::Signalled(i),
                                Err(e) => Input::SignalFailed(i, e.to_string()),
                            };
                            let _ = events.send(Event::Machine { epoch, input }).await;
                        });
                    }
                }
                Step::Enable(members) => {
                    for i in members {
                        if steers {
                            self.exec.enable.insert(i, epoch);
                        } else {
                            self.exec.inputs.push_back((epoch, Input::Enabled(i)));
                        }
                    }
                }
                Step::Finished(result) => self.finish_restart(result),
            }
        }
    }

    fn execute_start(&mut self, index: u32, version: Version, epoch: u64) {
        if !self.desired_up(index) {
            self.exec.inputs.push_back((
                epoch,
                Input::StartFailed(index, "stopped by an operator".into()),
            ));
            return;
        }
        let want_tag = self.spec(index, version).map(|s| s.tag()).ok();
        let instance = self.instances.get_mut(&index).expect("batch members exist");
        let running_tag = instance.shim.as_ref().map(|s| s.tag.clone());
        match instance.phase {
            Phase::Starting | Phase::Running
                if running_tag.is_some() && running_tag == want_tag =>
            {
                self.exec.inputs.push_back((epoch, Input::Started(index)));
            }
            Phase::Starting | Phase::Running => {
                self.exec.start.insert(index, epoch);
                self.stop(index, AfterStop::Start(version), false);
            }
            Phase::Spawning => {
                self.exec.start.insert(index, epoch);
            }
            Phase::Draining | Phase::Stopping => {
                instance.after_stop = AfterStop::Start(version);
                self.exec.start.insert(index, epoch);
                if instance.phase == Phase::Draining {
                    self.stop_now(index);
                }
            }
            Phase::Stopped | Phase::Backoff | Phase::Exited | Phase::Fatal => {
                instance.failed_starts = 0;
                self.exec.start.insert(index, epoch);
                self.start(index, version);
            }
        }
    }

    fn execute_check(&mut self, index: u32, epoch: u64) {
        let Some(instance) = self.instances.get(&index) else {
            self.exec
                .inputs
                .push_back((epoch, Input::Unhealthy(index, "not configured".into())));
            return;
        };
        if !instance.phase.is_up() {
            let why = format!(
                "not running ({})",
                instance.last_exit.clone().unwrap_or_else(|| instance
                    .phase
                    .state()
                    .as_str()
                    .into())
            );
            self.exec
                .inputs
                .push_back((epoch, Input::Unhealthy(index, why)));
            return;
        }
        match self.probe(index) {
            Some(probe) => {
                let events = self.events_tx.clone();
                tokio::spawn(async move {
                    let input = match probe.until_ready().await {
                        Ok(()) => Input::Healthy(index),
                        Err(why) => Input::Unhealthy(index, why),
                    };
                    let _ = events.send(Event::Machine { epoch, input }).await;
                });
            }
            // Without a probe, having run `startup_ms` is healthy.
            None if instance.phase == Phase::Running => {
                self.exec.inputs.push_back((epoch, Input::Healthy(index)));
            }
            None => {
                self.exec.check.insert(index, epoch);
            }
        }
    }

    /// The version the restart in progress starts its batch with.
    fn batch_version(&self) -> Version {
        self.state
            .restart
            .as_ref()
            .map_or(Version::New, |m| m.version)
    }

    fn execute_warmup(&mut self, index: u32, epoch: u64) {
        // Each version is warmed with its own requests: a rollback judges the old version by
        // the list it was deployed with, not by the new build's.
        let version = self.batch_version();
        let config = self.config_for(version);
        let (Some(warmup), Some(port)) = (config.warmup.clone(), config.port(index)) else {
            self.exec.inputs.push_back((epoch, Input::Warmed(index)));
            return;
        };
        let requests =
            match crate::warmup::load_requests(&warmup, self.release_for(version).as_deref()) {
                Ok(r) => r,
                Err(why) => {
                    self.exec
                        .inputs
                        .push_back((epoch, Input::WarmFailed(index, format!("warm-up: {why}"))));
                    return;
                }
            };
        let sibling = self.serving_sibling(index);
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = crate::warmup::run(port, requests, &warmup, sibling).await;
            let _ = events
                .send(Event::Warmed {
                    index,
                    epoch,
                    result,
                })
                .await;
        });
    }

    /// An instance of this service that serves clients now (running, healthy, not in the batch,
    /// and in steering when the service steers), to measure how fast a warm instance answers;
    /// `Err` says why there is none.
    fn serving_sibling(&self, index: u32) -> Result<crate::warmup::Sibling, String> {
        if self.config.instances < 2 {
            return Err("no sibling: the service has one instance".into());
        }
        let batch = self
            .state
            .restart
            .as_ref()
            .map(|m| m.in_flight().to_vec())
            .unwrap_or_default();
        let steers = self.config.steers();
        self.instances
            .values()
            .filter(|i| i.index != index && i.index < self.config.instances)
            .filter(|i| !batch.contains(&i.index))
            .filter(|i| i.phase == Phase::Running && i.healthy)
            .filter(|i| !steers || self.steering.installed_contains(i.index))
            .find_map(|i| {
                self.config
                    .port(i.index)
                    .map(|port| crate::warmup::Sibling {
                        index: i.index,
                        port,
                    })
            })
            .ok_or_else(|| {
                format!(
                    "no serving sibling: no other instance of {} is running{}",
                    self.name,
                    if steers {
                        " and in steering"
                    } else {
                        " and healthy"
                    }
                )
            })
    }

    pub(super) fn on_warmed(
        &mut self,
        index: u32,
        epoch: u64,
        result: Result<Summary, (String, Summary)>,
    ) {
        let rolling_back = self.epoch() == epoch && self.batch_version() == Version::Old;
        let input = match result {
            Ok(summary) => {
                tracing::info!(service = %self.name, index, ?summary, "warmed up");
                if let Some(instance) = self.instances.get_mut(&index) {
                    instance.warmup = Some(summary);
                }
                Input::Warmed(index)
            }
            Err((why, summary)) => {
                let error = if rolling_back {
                    // The machine puts a known-good old version back into steering anyway.
                    format!(
                        "warm-up of the old version failed (best effort in a rollback; it goes \
                         back into steering): {why}"
                    )
                } else {
                    format!("warm-up: {why}")
                };
                tracing::warn!(service = %self.name, index, rolling_back, "{error}");
                if let Some(instance) = self.instances.get_mut(&index) {
                    instance.warmup = Some(summary);
                    instance.last_error = Some(error);
                }
                Input::WarmFailed(index, format!("warm-up: {why}"))
            }
        };
        self.feed(epoch, input);
    }

    /// What each member of a failed batch was left as, in words: whether it runs and which
    /// version, and whether steering sends it clients once the restart is over.
    fn left_as(&self, members: &[u32]) -> String {
        let steering = self.desired_steering();
        let steers = self.config.steers();
        let tag_of = |version: Version, i: u32| self.spec(i, version).map(|s| s.tag()).ok();
        members
            .iter()
            .map(|&i| {
                let Some(instance) = self.instances.get(&i) else {
                    return format!("instance {i} is no longer configured");
                };
                let running = instance.shim.as_ref().map(|s| s.tag.clone());
                let what = if instance.phase.is_up() {
                    let version = if running.is_some() && running == tag_of(Version::Old, i) {
                        " the old version"
                    } else if running.is_some() && running == tag_of(Version::New, i) {
                        " the new version"
                    } else {
                        ""
                    };
                    let health = if instance.healthy {
                        ""
                    } else {
                        ", not healthy"
                    };
                    format!("runs{version}{health}")
                } else {
                    let exit = instance
                        .last_exit
                        .as_ref()
                        .map(|e| format!(", {e}"))
                        .unwrap_or_default();
                    format!("is not running ({}{exit})", instance.phase.state().as_str())
                };
                let steered = match (steers, steering.contains(&i)) {
                    (false, _) => "",
                    (true, true) => " and is in steering",
                    (true, false) => " and is out of steering",
                };
                format!("instance {i} {what}{steered}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn finish_restart(&mut self, result: Result<(), String>) {
        let Some(machine) = self.state.restart.take() else {
            return;
        };
        self.exec = Executor::default();
        match &result {
            Ok(()) => {
                tracing::info!(service = %self.name, restarted = ?machine.done, "restart finished");
                self.state.applied = Some(self.config.clone());
                self.state.failed = None;
            }
            Err(reason) => {
                // The machine knows what it asked for; what each instance was left as (running
                // or not, in steering or not) is known here, and is what an operator needs.
                let left = self.left_as(&machine.failed_batch);
                let reason = if left.is_empty() {
                    format!("restart of {} failed: {reason}", self.name)
                } else {
                    format!("restart of {} failed: {reason}; now {left}", self.name)
                };
                tracing::error!("{reason}");
                self.state.failed = Some(FailedRestart {
                    config: self.config.clone(),
                    build: self.state.target_build.clone(),
                    reason,
                });
            }
        }
        self.persist_logged();
        self.deploy_after_restart(&result);
        for reply in self.restart_replies.drain(..) {
            let _ = reply.send(match &result {
                Ok(()) => Ok(format!(
                    "restarted {}: {} instance(s)",
                    self.name,
                    machine.done.len()
                )),
                Err(_) => Err(self
                    .state
                    .failed
                    .as_ref()
                    .map(|f| f.reason.clone())
                    .unwrap_or_default()),
            });
        }
        if result.is_ok() {
            // The configuration may have changed while this restart ran.
            self.restart_outdated();
        }
    }

    /// A batch member's shim is up.
    pub(super) fn batch_member_started(&mut self, index: u32) {
        if let Some(epoch) = self.exec.exit.get(&index).copied()
            && epoch == self.epoch()
        {
            // A stop was asked while it was being spawned.
            self.stop(index, AfterStop::Nothing, false);
            return;
        }
        if let Some(epoch) = self.exec.start.remove(&index) {
            self.feed(epoch, Input::Started(index));
        }
    }

    /// A batch member has run `startup_ms`.
    pub(super) fn batch_member_running(&mut self, index: u32) {
        if let Some(epoch) = self.exec.check.remove(&index) {
            self.feed(epoch, Input::Healthy(index));
        }
    }

    /// A batch member exited after a stop.
    pub(super) fn batch_member_exited(&mut self, index: u32) {
        if let Some(epoch) = self.exec.exit.remove(&index) {
            self.feed(epoch, Input::Exited(index));
        }
    }

    /// A batch member went down unasked, or could not be started.
    pub(super) fn batch_member_down(&mut self, index: u32, why: String) {
        let epoch = self.epoch();
        let step = self.state.restart.as_ref().and_then(|m| m.step);
        let input = match step {
            Some(Phase_::Draining) => Input::Drained(index),
            Some(Phase_::Stopping) => Input::Exited(index),
            Some(Phase_::Starting) => Input::StartFailed(index, why),
            Some(Phase_::Checking) => Input::Unhealthy(index, why),
            // Not a failed warm-up, which a rollback may shrug off: the process is gone.
            Some(Phase_::Warming) => Input::WentDown(index, why),
            Some(Phase_::Signalling) => Input::SignalFailed(index, why),
            Some(Phase_::Enabling) => {
                // It was done; let the machine move on, then the restart policy brings it back.
                self.exec.enable.remove(&index);
                self.feed(epoch, Input::Enabled(index));
                self.after_failed_start(index, None, 0);
                return;
            }
            None => return,
        };
        self.exec.exit.remove(&index);
        self.exec.start.remove(&index);
        self.exec.check.remove(&index);
        self.feed(epoch, input);
    }

    /// Steering changed (or is as it should be): drains can begin, enables are done.
    pub(super) fn restart_after_steering(&mut self) {
        let out: Vec<(u32, u64)> = self
            .exec
            .drain
            .iter()
            .filter(|(i, _)| !self.steering.installed_contains(**i))
            .map(|(i, e)| (*i, *e))
            .collect();
        for (index, epoch) in out {
            self.exec.drain.remove(&index);
            self.begin_drain(index, DrainFor::Machine { epoch });
        }
        let enabled: Vec<(u32, u64)> = self
            .exec
            .enable
            .iter()
            .filter(|(i, _)| self.steering.installed_contains(**i))
            .map(|(i, e)| (*i, *e))
            .collect();
        let mut set = BTreeSet::new();
        for (index, epoch) in enabled {
            self.exec.enable.remove(&index);
            set.insert(index);
            self.exec.inputs.push_back((epoch, Input::Enabled(index)));
        }
        if !set.is_empty() {
            self.drive();
        }
    }
}
