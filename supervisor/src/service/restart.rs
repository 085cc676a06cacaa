//! The core's side of a restart: turns the actions of the restart machine
//! (`sluice_strategies::restart`) into stops, starts, probes, warm-ups and steering changes (as
//! effects), and feeds back what happened. The machine is persisted before its actions run
//! ([`Core::assert_persisted`]): a step whose write fails keeps its actions in
//! `Core::unwritten`, and they run only once a later write (the retry every
//! `STATE_WRITE_RETRY_MS`) succeeds. After a crash of the daemon, `resume` repeats the current
//! step's actions, which are all idempotent here.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sluice_strategies::plan;
use sluice_strategies::restart::{Action, Input, Restart, Step, Strategy, Version};
use sluice_strategies::warmup::{SiblingSample, SiblingSamples, Summary};

use super::core::{AfterStop, Core, Effect, Phase, Timer};
use super::steer::DrainFor;
use super::warmup::{Sibling, SiblingBar};
use crate::config::StrategyName;
use crate::service::state::FailedRestart;

/// What the restart in progress waits for; rebuilt by `resume` after a crash.
#[derive(Debug, Default)]
pub(super) struct RestartWaits {
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
    /// The serving siblings' samples of this restart's warm-ups of one version: the one the next
    /// batches compare with (within `warmup.sibling_reuse_ms`) instead of measuring again.
    samples: Option<(Version, SiblingSamples)>,
}

impl Core {
    /// Whether the instance belongs to the batch being restarted; the restart policy leaves those
    /// to the machine. A batch held at its start (waiting for a fleet slot) has not begun: its
    /// members serve, and an exit of one is the restart policy's, not an input that would move
    /// the machine past its gate without a slot.
    pub(super) fn in_batch(&self, index: u32) -> bool {
        !self.batch_held()
            && !self.batch_unwritten()
            && self
                .state
                .restart
                .as_ref()
                .is_some_and(|m| !m.finished && m.in_flight().contains(&index))
    }

    /// Persist before act: a restart action runs only once the machine it came from was written.
    fn assert_persisted(&self, action: &Action) {
        assert!(
            self.persisted_revision == self.machine_revision,
            "{}: restart action {action:?} before the machine was persisted (revision {}, written {})",
            self.name,
            self.machine_revision,
            self.persisted_revision
        );
    }

    /// Slot before batch: on the fleet backend, a batch's first drain or stop runs only while
    /// this host holds a valid fleet slot and ZooKeeper is reachable.
    fn assert_slot_held(&self, action: &Action) {
        let at_start = self
            .state
            .restart
            .as_ref()
            .is_some_and(|m| m.at_batch_start());
        if !self.fleet || !at_start {
            return;
        }
        assert!(
            self.slot_holding(),
            "{}: restart action {action:?} begins a batch without a fleet slot",
            self.name
        );
    }

    /// The restart machine changed: it must be written before its actions run.
    pub(super) fn machine_changed(&mut self) {
        self.machine_revision += 1;
        if let Some(m) = &self.state.restart {
            self.epoch_floor = self.epoch_floor.max(m.epoch);
        }
    }

    /// The machine in memory is the one last written.
    fn machine_written(&self) -> bool {
        self.machine_revision == self.persisted_revision
    }

    /// Whether actions of a restart step wait for their step to be written.
    pub(super) fn holds_unwritten(&self) -> bool {
        !self.unwritten.is_empty()
    }

    /// A batch whose first step is not written has not begun, like one held for a slot: its
    /// members serve and follow the restart policy.
    pub(super) fn batch_unwritten(&self) -> bool {
        self.holds_unwritten()
            && self
                .state
                .restart
                .as_ref()
                .is_some_and(|m| m.at_batch_start())
    }

    /// After every event: once the state is written again, the step (and a deploy's
    /// `post_restart`) that waited for it goes ahead.
    pub(super) fn run_written(&mut self) {
        if self.holds_unwritten() && self.machine_written() {
            tracing::info!(service = %self.name, "the restart step is written; its actions run");
            let held = std::mem::take(&mut self.unwritten);
            self.execute(held);
            self.drive();
        }
        self.post_restart_if_written();
    }

    fn epoch(&self) -> u64 {
        self.state.restart.as_ref().map_or(0, |m| m.epoch)
    }

    /// Begins a restart of `indices` with the service's strategy. False when its state could not
    /// be written: nothing was done, and the callers waiting in `restart_replies` got the error.
    pub(super) fn begin_restart(&mut self, indices: Vec<u32>) -> bool {
        if indices.is_empty() {
            let message = format!("{}: nothing to restart", self.name);
            for to in std::mem::take(&mut self.restart_replies) {
                self.reply(to, Ok(message.clone()));
            }
            return true;
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
        let applied = self.state.applied.clone();
        if self.state.applied.is_none() {
            self.state.applied = Some(self.config.clone());
        }
        self.restart_begins();
        let mut machine = Restart::new(strategy, warm, batches);
        // Its epochs continue after every earlier restart's: a late timer of one (e.g. a steering
        // bound set 30 s before) cannot fail a step of this one.
        machine.epoch = self.epoch_floor;
        // The first batch's first step is entered before the write, so that what is written is
        // the machine its actions come from.
        let actions = machine.resume();
        self.state.restart = Some(machine);
        self.machine_changed();
        if let Err(e) = self.persist() {
            // Nothing of it was written, so nothing of it happens: the state is as before.
            self.state.restart = None;
            self.state.applied = applied;
            let message = format!("restart of {} not begun: {e}", self.name);
            for to in std::mem::take(&mut self.restart_replies) {
                self.reply(to, Err(message.clone()));
            }
            return false;
        }
        self.restart_waits = RestartWaits::default();
        self.unwritten.clear();
        self.execute(actions);
        self.drive();
        true
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
        let before = machine.epoch;
        let actions = machine.resume();
        if machine.epoch != before {
            // A machine written before its first step (by an earlier version) enters it now; if
            // that cannot be written, its actions wait for the retry (`execute`).
            self.machine_changed();
            self.persist_logged();
        }
        self.restart_waits = RestartWaits::default();
        self.execute(actions);
        self.drive();
    }

    /// Drops the restart in progress (the service is being stopped).
    pub(super) fn abandon_restart(&mut self, why: &str) {
        if let Some(machine) = self.state.restart.take() {
            self.epoch_floor = self.epoch_floor.max(machine.epoch);
            // The service is being stopped whatever the write says (a failed write leaves the
            // machine on disk, and a restarted daemon resumes it with whatever then runs).
            self.machine_changed();
            self.persist_logged();
        }
        self.unwritten.clear();
        self.restart_waits = RestartWaits::default();
        for to in std::mem::take(&mut self.restart_replies) {
            self.reply(to, Err(why.to_owned()));
        }
    }

    pub(super) fn feed(&mut self, epoch: u64, input: Input) {
        self.restart_waits.inputs.push_back((epoch, input));
        self.drive();
    }

    /// Feeds queued inputs to the machine, persisting it before its actions run (a step that
    /// cannot be written keeps its actions; see [`Core::execute`]).
    pub(super) fn drive(&mut self) {
        while let Some((epoch, input)) = self.restart_waits.inputs.pop_front() {
            let Some(machine) = self.state.restart.as_mut() else {
                self.restart_waits.inputs.clear();
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
            self.machine_changed();
            self.persist_logged();
            self.execute(actions);
        }
    }

    /// Runs the machine's actions that may run now (see [`Core::gate`]). While the machine in
    /// memory is not the one last written (its write failed), they are kept, after any kept
    /// before, and run in order once a write succeeds ([`Core::run_written`]).
    pub(super) fn execute(&mut self, actions: Vec<Action>) {
        if !self.machine_written() {
            if !actions.is_empty() {
                tracing::warn!(service = %self.name, ?actions, "restart step not written; its actions wait for the state to be written");
            }
            self.unwritten.extend(actions);
            return;
        }
        let mut actions = actions;
        if self.holds_unwritten() {
            let mut held = std::mem::take(&mut self.unwritten);
            held.append(&mut actions);
            actions = held;
        }
        let actions = self.gate(actions);
        self.carry_out(actions);
    }

    /// Turns actions that passed the gate into effects.
    pub(super) fn carry_out(&mut self, actions: Vec<Action>) {
        let epoch = self.epoch();
        let steers = self.config.steers();
        for action in actions {
            self.assert_persisted(&action);
            self.assert_slot_held(&action);
            tracing::info!(service = %self.name, ?action, "restart step");
            match action {
                Action::Disable(members) => {
                    for i in members {
                        if steers {
                            self.restart_waits.drain.insert(i, epoch);
                            self.emit(Effect::SetTimer {
                                after_ms: self.config.restart.steer_timeout_ms,
                                timer: Timer::MachineSteerOver { index: i, epoch },
                            });
                        } else {
                            self.restart_waits
                                .inputs
                                .push_back((epoch, Input::Drained(i)));
                        }
                    }
                }
                Action::Stop(members) => {
                    // A drain strategy has drained the batch already (Disable came first); the
                    // other strategies do not drain at all.
                    for i in members {
                        let Some(instance) = self.instances.get_mut(&i) else {
                            self.restart_waits
                                .inputs
                                .push_back((epoch, Input::Exited(i)));
                            continue;
                        };
                        // A member the chain may still steer to (its removal failed before a
                        // crash of the daemon, which resumed here) is drained first, like any
                        // stop; only `rolling` and `all-at-once` stop in the chain.
                        let phase = instance.phase;
                        let drain = !self.stops_in_chain(i);
                        let steered = self.steering.may_steer_to(i);
                        match phase {
                            Phase::Starting | Phase::Running | Phase::Spawning => {
                                self.restart_waits.exit.insert(i, epoch);
                                if phase != Phase::Spawning {
                                    self.stop(i, AfterStop::Nothing, drain);
                                }
                            }
                            Phase::Draining | Phase::Stopping => {
                                let instance = self.instances.get_mut(&i).expect("just found");
                                instance.after_stop = AfterStop::Nothing;
                                self.restart_waits.exit.insert(i, epoch);
                                if phase == Phase::Draining && !(drain && steered) {
                                    self.stop_now(i);
                                }
                            }
                            _ => self
                                .restart_waits
                                .inputs
                                .push_back((epoch, Input::Exited(i))),
                        }
                    }
                }
                Action::Start(members, version) => {
                    for i in members {
                        self.execute_start(i, version, epoch);
                    }
                }
                Action::Check(members) => {
                    for i in members {
                        self.execute_check(i, epoch);
                    }
                }
                Action::WarmUp(members) => {
                    for i in members {
                        self.execute_warmup(i, epoch);
                    }
                }
                Action::Signal(members) => {
                    let signal = self.config.restart.reload_signal.0;
                    for index in members {
                        self.emit(Effect::RestartSignal {
                            index,
                            signal,
                            epoch,
                        });
                    }
                }
                Action::Enable(members) => {
                    for i in members {
                        if steers {
                            self.restart_waits.enable.insert(i, epoch);
                            self.emit(Effect::SetTimer {
                                after_ms: self.config.restart.steer_timeout_ms,
                                timer: Timer::MachineSteerOver { index: i, epoch },
                            });
                        } else {
                            self.restart_waits
                                .inputs
                                .push_back((epoch, Input::Enabled(i)));
                        }
                    }
                }
                Action::Finished(result) => self.finish_restart(result),
            }
        }
    }

    fn execute_start(&mut self, index: u32, version: Version, epoch: u64) {
        if !self.desired_up(index) {
            self.restart_waits.inputs.push_back((
                epoch,
                Input::StartFailed(index, "stopped by an operator".into()),
            ));
            return;
        }
        let want_tag = self.spec(index, version).map(|s| s.tag()).ok();
        let drain = !self.stops_in_chain(index);
        let steered = self.steering.may_steer_to(index);
        let instance = self.instances.get_mut(&index).expect("batch members exist");
        let running_tag = instance.shim.as_ref().map(|s| s.tag.clone());
        match instance.phase {
            Phase::Starting | Phase::Running
                if running_tag.is_some() && running_tag == want_tag =>
            {
                self.restart_waits
                    .inputs
                    .push_back((epoch, Input::Started(index)));
            }
            Phase::Starting | Phase::Running => {
                self.restart_waits.start.insert(index, epoch);
                self.stop(index, AfterStop::Start(version), drain);
            }
            Phase::Spawning => {
                self.restart_waits.start.insert(index, epoch);
            }
            Phase::Draining | Phase::Stopping => {
                instance.after_stop = AfterStop::Start(version);
                self.restart_waits.start.insert(index, epoch);
                if instance.phase == Phase::Draining && !(drain && steered) {
                    self.stop_now(index);
                }
            }
            Phase::Stopped | Phase::Backoff | Phase::Exited | Phase::Fatal => {
                instance.failed_starts = 0;
                self.restart_waits.start.insert(index, epoch);
                self.start(index, version);
            }
        }
    }

    fn execute_check(&mut self, index: u32, epoch: u64) {
        let Some(instance) = self.instances.get(&index) else {
            self.restart_waits
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
            self.restart_waits
                .inputs
                .push_back((epoch, Input::Unhealthy(index, why)));
            return;
        }
        match self.probe(index) {
            Some(probe) => self.emit(Effect::Check {
                index,
                epoch,
                probe: Box::new(probe),
            }),
            // Without a probe, having run `startup_ms` is healthy.
            None if instance.phase == Phase::Running => {
                self.restart_waits
                    .inputs
                    .push_back((epoch, Input::Healthy(index)));
            }
            None => {
                self.restart_waits.check.insert(index, epoch);
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
            self.restart_waits
                .inputs
                .push_back((epoch, Input::Warmed(index)));
            return;
        };
        // The request list is read by the executor: a list that cannot be read answers
        // `WarmFailed`.
        let release = self.release_for(version);
        let reused = match &self.restart_waits.samples {
            Some((v, samples)) if *v == version => {
                samples.reusable(self.boot_now, warmup.sibling_reuse_ms)
            }
            _ => None,
        };
        // A reused sample spares the search for a serving sibling, as well as its sample.
        let sibling = match reused {
            Some(sample) => SiblingBar::Reuse {
                index: sample.index,
                window: sample.window,
                age_ms: self.boot_now.saturating_sub(sample.taken_at_ms),
            },
            None => match self.serving_sibling(index) {
                Ok(sibling) => SiblingBar::Measure(sibling),
                Err(why) => SiblingBar::Missing(why),
            },
        };
        self.emit(Effect::WarmUp {
            index,
            epoch,
            port,
            config: Box::new(warmup),
            release,
            sibling,
        });
    }

    /// An instance of this service that serves clients now (running, healthy, not in the batch,
    /// and in steering when the service steers), to measure how fast a warm instance answers;
    /// `Err` says why there is none.
    fn serving_sibling(&self, index: u32) -> Result<Sibling, String> {
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
                self.config.port(i.index).map(|port| Sibling {
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
        let current = self.epoch() == epoch;
        let rolling_back = current && self.batch_version() == Version::Old;
        if current {
            // The sample this warm-up compared with, kept for the next batch only if it was met.
            let (Ok(summary) | Err((_, summary))) = &result;
            let ending = result.as_ref().ok().and_then(|s| s.ending);
            let began = self.boot_now.saturating_sub(summary.duration_ms);
            let used = summary.sibling.as_ref().map(|r| SiblingSample {
                index: r.index,
                window: r.window,
                taken_at_ms: began.saturating_sub(r.age_ms),
            });
            let version = self.batch_version();
            let samples = match &mut self.restart_waits.samples {
                Some((v, samples)) if *v == version => samples,
                slot => &mut slot.insert((version, SiblingSamples::default())).1,
            };
            samples.ended(used, ending);
        }
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
        self.epoch_floor = self.epoch_floor.max(machine.epoch);
        let (applied, failed) = (self.state.applied.clone(), self.state.failed.clone());
        self.machine_changed();
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
        if self.persist().is_err() {
            // Its end is not written: nothing follows from it yet (no reply, no deploy record,
            // no `post_restart`, no slot release, no next restart). The finished machine stays,
            // as written, and the end is carried out again once a write succeeds.
            self.state.restart = Some(machine);
            self.state.applied = applied;
            self.state.failed = failed;
            self.unwritten.push(Action::Finished(result));
            return;
        }
        self.restart_waits = RestartWaits::default();
        self.deploy_after_restart(&result);
        let answer = match &result {
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
        };
        for to in std::mem::take(&mut self.restart_replies) {
            self.reply(to, answer.clone());
        }
        if result.is_ok() {
            // The configuration may have changed while this restart ran.
            self.restart_outdated();
        }
    }

    /// A batch member's shim is up.
    pub(super) fn batch_member_started(&mut self, index: u32) {
        if let Some(epoch) = self.restart_waits.exit.get(&index).copied()
            && epoch == self.epoch()
        {
            // A stop was asked while it was being spawned.
            self.stop(index, AfterStop::Nothing, false);
            return;
        }
        if let Some(epoch) = self.restart_waits.start.remove(&index) {
            self.feed(epoch, Input::Started(index));
        }
    }

    /// A batch member has run `startup_ms`.
    pub(super) fn batch_member_running(&mut self, index: u32) {
        if let Some(epoch) = self.restart_waits.check.remove(&index) {
            self.feed(epoch, Input::Healthy(index));
        }
    }

    /// A batch member exited after a stop.
    pub(super) fn batch_member_exited(&mut self, index: u32) {
        if let Some(epoch) = self.restart_waits.exit.remove(&index) {
            self.feed(epoch, Input::Exited(index));
        }
    }

    /// A batch member went down unasked, or could not be started.
    pub(super) fn batch_member_down(&mut self, index: u32, why: String) {
        let epoch = self.epoch();
        let step = self.state.restart.as_ref().and_then(|m| m.step);
        let input = match step {
            Some(Step::Draining) => Input::Drained(index),
            Some(Step::Stopping) => Input::Exited(index),
            Some(Step::Starting) => Input::StartFailed(index, why),
            Some(Step::Checking) => Input::Unhealthy(index, why),
            // Not a failed warm-up, which a rollback may shrug off: the process is gone.
            Some(Step::Warming) => Input::WentDown(index, why),
            Some(Step::Signalling) => Input::SignalFailed(index, why),
            Some(Step::Enabling) => {
                // It was done; let the machine move on, then the restart policy brings it back.
                self.restart_waits.enable.remove(&index);
                self.feed(epoch, Input::Enabled(index));
                self.after_unrequested_exit(index, None, 0);
                return;
            }
            None => return,
        };
        self.restart_waits.exit.remove(&index);
        self.restart_waits.start.remove(&index);
        self.restart_waits.check.remove(&index);
        self.feed(epoch, input);
    }

    /// Steering changed (or is as it should be): drains can begin, enables are done.
    /// A restart step has waited `restart.steer_timeout_ms` for the chain around a batch member
    /// (iptables failing): the restart fails naming it. Its instances keep running; steering
    /// goes on retrying the chain they should have.
    pub(super) fn on_machine_steer_over(&mut self, index: u32, epoch: u64) {
        if self.state.restart.as_ref().is_none_or(|m| m.epoch != epoch) {
            return;
        }
        let what = if self.restart_waits.drain.get(&index) == Some(&epoch) {
            "taken out of steering"
        } else if self.restart_waits.enable.get(&index) == Some(&epoch) {
            "put back into steering"
        } else {
            return;
        };
        let why = format!(
            "{}/{index} could not be {what} within restart.steer_timeout_ms ({} ms): {}",
            self.name,
            self.config.restart.steer_timeout_ms,
            self.steering
                .error
                .as_deref()
                .unwrap_or("the chain is still being written")
        );
        self.finish_restart(Err(why));
    }

    pub(super) fn restart_after_steering(&mut self) {
        let out: Vec<(u32, u64)> = self
            .restart_waits
            .drain
            .iter()
            .filter(|(i, _)| !self.steering.installed_contains(**i))
            .map(|(i, e)| (*i, *e))
            .collect();
        for (index, epoch) in out {
            self.restart_waits.drain.remove(&index);
            self.begin_drain(index, DrainFor::Machine { epoch });
        }
        // An instance an operator drained meanwhile (or that left the configuration) never
        // enters the chain: its enable is done as far as it can be, or the restart would wait
        // for it forever.
        let enabled: Vec<(u32, u64)> = self
            .restart_waits
            .enable
            .iter()
            .filter(|(i, _)| {
                self.steering.installed_contains(**i)
                    || self.state.drained.contains(*i)
                    || **i >= self.config.instances
            })
            .map(|(i, e)| (*i, *e))
            .collect();
        let mut set = BTreeSet::new();
        for (index, epoch) in enabled {
            self.restart_waits.enable.remove(&index);
            set.insert(index);
            self.restart_waits
                .inputs
                .push_back((epoch, Input::Enabled(index)));
        }
        if !set.is_empty() {
            self.drive();
        }
    }
}
