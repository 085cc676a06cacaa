//! Steering of one service: which instances its iptables chain sends new connections to. The
//! desired set is derived from the instances (up, healthy, not drained by hand, not out for a
//! restart batch); one transaction at a time is in flight, and a change that arrives meanwhile is
//! applied after it.

use std::collections::BTreeSet;
use std::time::Duration;

use sluice_strategies::drain::{Ending, Outcome};
use sluice_strategies::restart::Input;
use sluice_strategies::steering::Chain;

use super::{Event, Phase, Service, targets};
use crate::drain;

/// Pause before retrying a failed iptables transaction.
const RETRY_MS: u64 = 1_000;

#[derive(Debug, Default)]
pub(super) struct Steering {
    /// What iptables steers to now; `None` until known (or when the service is not steered).
    installed: Option<BTreeSet<u32>>,
    /// A transaction is running.
    inflight: bool,
    retry_scheduled: bool,
    /// Instances (with their generation) whose drain-before-stop wait has begun.
    drain_watches: BTreeSet<(u32, u64)>,
    pub(super) error: Option<String>,
}

/// Who waits for a drain: a stop of a steered instance (the instance's generation), or the restart
/// machine's `Drained` input (the action's epoch). Both go through [`Service::begin_drain`].
#[derive(Debug, Clone, Copy)]
pub(super) enum DrainFor {
    Stop { generation: u64 },
    Machine { epoch: u64 },
}

impl Steering {
    pub(super) fn installed_contains(&self, index: u32) -> bool {
        self.installed.as_ref().is_some_and(|s| s.contains(&index))
    }
}

impl Service {
    /// Reads what a previous daemon installed, so that an unchanged chain is not rewritten.
    pub(super) fn steering_startup(&mut self) {
        if !self.config.steers() {
            return;
        }
        let Some(iptables) = &self.ctx.iptables else {
            self.steering.error = Some("steering needs root and iptables-restore".into());
            return;
        };
        match iptables.read(&self.name) {
            Ok(families) => {
                let ports: Vec<_> = self.config.instance_ports().collect();
                let first = families.into_iter().next().unwrap_or_default();
                let installed = first
                    .targets
                    .iter()
                    .filter(|t| {
                        self.config.port(t.index) == Some(t.port) && ports.contains(&t.port)
                    })
                    .map(|t| t.index)
                    .collect();
                self.steering.installed = Some(installed);
            }
            Err(e) => self.steering.error = Some(e.to_string()),
        }
    }

    /// The instances new connections should go to.
    pub(super) fn desired_steering(&self) -> BTreeSet<u32> {
        // A batch held at its start (no fleet slot yet) keeps serving until it may begin.
        let out = match &self.state.restart {
            Some(machine) if !self.batch_held() => machine.disabled(),
            _ => BTreeSet::new(),
        };
        self.instances
            .values()
            .filter(|i| {
                i.index < self.config.instances
                    && i.phase.is_up()
                    && i.healthy
                    && !self.state.drained.contains(&i.index)
                    && !out.contains(&i.index)
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
            if self.steering.inflight || self.steering.retry_scheduled {
                return;
            }
            let desired = self.desired_steering();
            if self.steering.installed.as_ref() != Some(&desired) {
                self.apply_steering(desired);
                return;
            }
            self.after_steering();
            if self.desired_steering() == desired {
                return;
            }
        }
    }

    fn apply_steering(&mut self, desired: BTreeSet<u32>) {
        let Some(iptables) = self.ctx.iptables.clone() else {
            return;
        };
        let chain = Chain {
            service: self.name.clone(),
            front_port: self
                .config
                .front_port
                .expect("steered services have a front port"),
            targets: targets(&self.config, &desired),
        };
        self.steering.inflight = true;
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let applied = tokio::task::spawn_blocking(move || iptables.apply(&chain)).await;
            let result = match applied {
                Ok(Ok(())) => Ok(desired),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("iptables task: {e}")),
            };
            let _ = events.send(Event::Steered { result }).await;
        });
    }

    pub(super) fn on_steering_event(&mut self, event: Event) {
        match event {
            Event::Steered { result } => {
                self.steering.inflight = false;
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
                        let events = self.events_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(RETRY_MS)).await;
                            let _ = events.send(Event::SteerRetry).await;
                        });
                    }
                }
            }
            Event::SteerRetry => self.steering.retry_scheduled = false,
            _ => unreachable!("only steering events come here"),
        }
    }

    /// The one drain wait, for an instance already out of the chain: reads its connections until
    /// the drain decision says it may be stopped, then reports to `waiter`.
    pub(super) fn begin_drain(&self, index: u32, waiter: DrainFor) {
        let port = self.config.port(index);
        let until = self.config.restart.drain_until;
        let timeout_ms = self.config.restart.drain_timeout_ms;
        let service = self.name.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let outcome = match port {
                Some(port) => Some(drain::wait(&service, index, port, until, timeout_ms).await),
                None => None,
            };
            let _ = events
                .send(Event::Drained {
                    index,
                    waiter,
                    outcome,
                })
                .await;
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
            if let Some(instance) = self.instances.get_mut(&index) {
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
