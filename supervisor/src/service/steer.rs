//! Steering of one service: which instances its iptables chain sends new connections to. The
//! desired set is derived from the instances (up, healthy, not drained by hand, not out for a
//! restart batch); one transaction at a time is in flight, and a change that arrives meanwhile is
//! applied after it. The one drain wait ([`Core::begin_drain`]) serves both a stop of a steered
//! instance and the restart machine's drains.

use std::collections::BTreeSet;

use sluice_strategies::drain::{Ending, Outcome};
use sluice_strategies::restart::Input;

use super::core::{Core, Effect, Phase, Timer};

/// Pause before retrying a failed iptables transaction.
pub const STEER_RETRY_MS: u64 = 1_000;

#[derive(Debug, Default)]
pub(super) struct Steering {
    /// What iptables steers to now; `None` until known (or when the service is not steered).
    pub(super) installed: Option<BTreeSet<u32>>,
    /// The set of the transaction running, if one is.
    pub(super) inflight: Option<BTreeSet<u32>>,
    pub(super) retry_scheduled: bool,
    /// Instances (with their generation) whose drain-before-stop wait has begun.
    drain_watches: BTreeSet<(u32, u64)>,
    pub(super) error: Option<String>,
}

/// Who waits for a drain: a stop of a steered instance (the instance's generation), or the restart
/// machine's `Drained` input (the action's epoch). Both go through [`Core::begin_drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainFor {
    Stop { generation: u64 },
    Machine { epoch: u64 },
}

impl Steering {
    pub(super) fn installed_contains(&self, index: u32) -> bool {
        self.installed.as_ref().is_some_and(|s| s.contains(&index))
    }

    /// Whether the chain may send the instance new connections: it is installed, or in the
    /// transaction being written (which may already have committed).
    pub(super) fn may_steer_to(&self, index: u32) -> bool {
        self.installed_contains(index) || self.inflight.as_ref().is_some_and(|s| s.contains(&index))
    }
}

impl Core {
    /// The instances new connections should go to.
    pub(super) fn desired_steering(&self) -> BTreeSet<u32> {
        // A batch held at its start (no fleet slot yet) keeps serving until it may begin. Off the
        // fleet, the enable of a batch also takes the next one out, in one transaction.
        let out = match &self.state.restart {
            Some(machine) if !self.batch_held() && self.fleet => machine.disabled(),
            Some(machine) if !self.batch_held() => machine.disabled_with_next(),
            _ => BTreeSet::new(),
        };
        // In `state_error` the operator's drains are unknown: an instance may leave the chain
        // (it went down), never join it.
        let known = self.state_error.is_none();
        self.instances
            .values()
            .filter(|i| {
                i.index < self.config.instances
                    && i.phase.is_up()
                    && i.healthy
                    && !self.state.drained.contains(&i.index)
                    && !out.contains(&i.index)
                    && (known || self.steering.installed_contains(i.index))
            })
            .map(|i| i.index)
            .collect()
    }

    /// Starts a transaction when the chain differs from what it should be. What waited for the
    /// chain may change what it should be (an enable done lets the next batch drain), hence the
    /// loop, bounded because every pass moves a restart forward by one step.
    pub(super) fn sync_steering(&mut self) {
        const PASSES: usize = 16;
        if !self.config.steers() {
            return;
        }
        for _ in 0..PASSES {
            if self.steering.inflight.is_some() || self.steering.retry_scheduled {
                return;
            }
            let desired = self.desired_steering();
            if self.steering.installed.as_ref() != Some(&desired) {
                self.apply_steering(desired);
                return;
            }
            // What the chain let go on may move the restart on without changing the chain (the
            // next batch, already out since its predecessor's enable, now waits for its drain):
            // then look again, for what waits on the chain as it is.
            let epoch = self.state.restart.as_ref().map(|m| m.epoch);
            self.after_steering();
            let moved = self.state.restart.as_ref().map(|m| m.epoch) != epoch;
            if !moved && self.desired_steering() == desired {
                return;
            }
        }
    }

    fn apply_steering(&mut self, desired: BTreeSet<u32>) {
        // Without iptables (not root) the error was recorded at start-up; nothing can be written.
        if !self.steerable {
            return;
        }
        let chain = self.chain(&desired);
        self.steering.inflight = Some(desired.clone());
        self.emit(Effect::ApplyChain { chain, desired });
    }

    pub(super) fn on_steered(&mut self, result: Result<BTreeSet<u32>, String>) {
        self.steering.inflight = None;
        match result {
            Ok(set) => {
                tracing::info!(service = %self.name, enabled = ?set, "steering updated");
                self.steering.installed = Some(set);
                self.steering.error = None;
            }
            Err(e) => {
                tracing::error!(service = %self.name, "steering: {e}");
                self.steering.error = Some(e);
                self.steering.retry_scheduled = true;
                self.emit(Effect::SetTimer {
                    after_ms: STEER_RETRY_MS,
                    timer: Timer::SteerRetry,
                });
            }
        }
    }

    /// The one drain wait, for an instance already out of the chain: reads its connections until
    /// the drain decision says it may be stopped, then reports to `waiter`.
    pub(super) fn begin_drain(&mut self, index: u32, waiter: DrainFor) {
        assert!(
            !self.steering.may_steer_to(index),
            "{}/{index}: a drain wait begun while the chain still steers to it",
            self.name
        );
        // Whatever an earlier drain found says nothing of this one.
        if let Some(instance) = self.instances.get_mut(&index) {
            instance.drained_closed = false;
        }
        self.emit(Effect::AwaitDrain {
            index,
            waiter,
            port: self.config.port(index),
            until: self.config.restart.drain_until,
            timeout_ms: self.config.restart.drain_timeout_ms,
        });
    }

    /// A drain ended: record how, then let its waiter go on.
    pub(super) fn on_drained(&mut self, index: u32, waiter: DrainFor, outcome: Option<Outcome>) {
        if let Some(o) = outcome {
            let (ending, left, in_flight, waited_ms) = (
                o.ending.name(),
                o.connections_left,
                o.in_flight_left,
                o.waited_ms,
            );
            if o.ending == Ending::Timeout {
                tracing::warn!(service = %self.name, index, ending, left, in_flight, waited_ms, "drain timeout: stopping with connections left");
            } else {
                tracing::info!(service = %self.name, index, ending, left, in_flight, waited_ms, "drained");
            }
            // Only the drain of the process that is there now, for the stop or restart still
            // waiting on it, may let that process stop at the low weight.
            let current = match waiter {
                DrainFor::Stop { generation } => self
                    .instances
                    .get(&index)
                    .is_some_and(|i| i.generation == generation),
                DrainFor::Machine { epoch } => self
                    .state
                    .restart
                    .as_ref()
                    .is_some_and(|m| m.epoch == epoch),
            };
            if let Some(instance) = self.instances.get_mut(&index) {
                instance.drained_closed = current && o.ending == Ending::Closed;
                instance.last_drain = Some(o);
            }
        }
        match waiter {
            DrainFor::Stop { generation } => {
                let draining = self
                    .instances
                    .get(&index)
                    .is_some_and(|i| i.generation == generation && i.phase == Phase::Draining);
                if draining {
                    self.stop_now(index);
                }
            }
            DrainFor::Machine { epoch } => self.feed(epoch, Input::Drained(index)),
        }
    }

    /// Whatever waited for the chain: drains before a stop, and the restart's drains and enables.
    fn after_steering(&mut self) {
        let ready: Vec<(u32, u64)> = self
            .instances
            .values()
            .filter(|i| i.phase == Phase::Draining && !self.steering.installed_contains(i.index))
            .filter(|i| {
                !self
                    .steering
                    .drain_watches
                    .contains(&(i.index, i.generation))
            })
            .map(|i| (i.index, i.generation))
            .collect();
        for (index, generation) in ready {
            self.steering.drain_watches.insert((index, generation));
            self.begin_drain(index, DrainFor::Stop { generation });
        }
        // Forget the watches of instances that have moved on.
        let instances = &self.instances;
        self.steering.drain_watches.retain(|(index, generation)| {
            instances
                .get(index)
                .is_some_and(|i| i.generation == *generation && i.phase == Phase::Draining)
        });
        self.restart_after_steering();
    }
}
