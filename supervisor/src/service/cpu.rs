//! CPU isolation of one service's instances: which weight each instance's cgroup should have,
//! derived from the instance's state (so a restarted daemon re-applies it), and the removal of a
//! cgroup once its instance is gone for good. Two phases run low: a start beside a serving
//! sibling, and a stop with nothing left to serve.

use sluice_strategies::restart::Step;

use super::cgroup::Version;
use super::core::{AfterStop, Core, Effect, Instance, Phase, Timer};

impl Core {
    /// Whether the host has cgroups and this service wants its instances isolated.
    pub(super) fn cgroups_wanted(&self) -> bool {
        self.config.restart.cpu_isolation && self.cgroups.cgroups().is_some()
    }

    /// Why instances of this service run without a cgroup, for status.
    pub(super) fn cgroups_error(&self) -> Option<String> {
        if !self.config.restart.cpu_isolation {
            return None;
        }
        self.cgroups.error().or_else(|| {
            self.instances.values().find_map(|i| {
                i.cgroup_error
                    .as_ref()
                    .map(|e| format!("{}/{}: {e}", self.name, i.index))
            })
        })
    }

    /// Whether another instance of the service serves (in steering, or running and healthy for a
    /// service without steering): only then is there anyone for a starting instance to yield to.
    /// A first start of the whole service, or a restart of all at once, runs at the normal weight,
    /// so a busy host cannot starve a service that has nothing else serving.
    pub(super) fn sibling_serving(&self, index: u32) -> bool {
        self.instances.values().any(|other| {
            other.index != index
                && other.phase.is_up()
                && other.healthy
                && (!self.config.steers() || self.steering.installed_contains(other.index))
        })
    }

    /// Whether the instance should take only CPU that the serving instances leave idle: it is
    /// starting or warming up and not yet enabled ([`Core::wants_low_starting`]), or it is
    /// stopping with nothing left to serve ([`Core::wants_low_stopping`]). An instance that
    /// serves, that is being drained (it still answers the requests in flight), or that stops
    /// with connections still open runs at the normal weight, outside any cgroup of sluice's.
    fn wants_low(&self, instance: &Instance) -> bool {
        self.wants_low_starting(instance) || self.wants_low_stopping(instance)
    }

    /// Starting or warming up, not yet enabled, while a sibling serves.
    fn wants_low_starting(&self, instance: &Instance) -> bool {
        if !self.cgroups_wanted()
            || !instance.phase.is_up()
            || !self.sibling_serving(instance.index)
        {
            return false;
        }
        if self.config.steers() && self.steering.installed_contains(instance.index) {
            return false;
        }
        let warming = self.state.restart.as_ref().is_some_and(|m| {
            !m.finished
                && m.batch.contains(&instance.index)
                && matches!(
                    m.step,
                    Some(Step::Starting | Step::Checking | Step::Warming | Step::Enabling)
                )
        });
        // Bounded: on a host whose CPU is saturated the lowest weight gets nothing, and an
        // instance that never starts fails its batch; past the bound it runs like any process.
        (!instance.healthy || warming) && self.age_ms(instance) < self.config.restart.cpu_low_max_ms
    }

    /// Stopping after a drain that ended with no connection left, while a sibling serves: no
    /// steered client can reach it any more (out of steering, nothing open), so its graceful stop (an
    /// interpreter's teardown, a JVM's exit: ~100 ms of CPU for a 2-worker gunicorn) takes only
    /// idle CPU instead of the serving instances'. A stop that follows a drain ending `idle` or
    /// at its timeout keeps the normal weight: the server may still answer on the connections
    /// left (the JDK's HttpServer does, until its quiet time). Bounded by
    /// [`Core::stop_low_max_ms`] from the stop, so a saturated host cannot starve the stop into
    /// its kill. Only where the `cpu` hierarchy is not the one of the tracking cgroups (cgroup
    /// v1): under v2 the processes would have to leave their tracking cgroup.
    fn wants_low_stopping(&self, instance: &Instance) -> bool {
        let lowers_running = self
            .cgroups
            .cgroups()
            .is_some_and(|c| c.version == Version::V1);
        self.cgroups_wanted()
            && lowers_running
            && self.config.steers()
            && instance.phase == Phase::Stopping
            && instance.drained_closed
            && !self.steering.may_steer_to(instance.index)
            && self.sibling_serving(instance.index)
            && instance
                .stop_began_ms
                .is_some_and(|began| self.boot_now.saturating_sub(began) < self.stop_low_max_ms())
    }

    /// The longest a stop runs at the low weight: `restart.cpu_low_max_ms`, and at most half of
    /// `stop_grace_ms`, so that a stop starved at the low weight still has half its grace at the
    /// normal weight before the kill.
    pub(super) fn stop_low_max_ms(&self) -> u64 {
        self.config
            .restart
            .cpu_low_max_ms
            .min(self.config.stop_grace_ms / 2)
    }

    /// How long the instance may stay low from now on, for the timer that ends its low phase.
    fn low_left_ms(&self, instance: &Instance) -> u64 {
        match (instance.phase, instance.stop_began_ms) {
            (Phase::Stopping, Some(began)) => self
                .stop_low_max_ms()
                .saturating_sub(self.boot_now.saturating_sub(began)),
            _ => self
                .config
                .restart
                .cpu_low_max_ms
                .saturating_sub(self.age_ms(instance)),
        }
    }

    /// Moves a stopping instance that wants the low weight and has no cgroup (it left the one it
    /// started in once enabled) into a new one at the low weight. Called by the stop before its
    /// signal; the bound's timer is [`Core::sync_cgroups`]'s.
    pub(super) fn lower_stopping(&mut self, index: u32) {
        let Some(instance) = self.instances.get(&index) else {
            return;
        };
        if instance.cgroup.is_some() || !self.wants_low_stopping(instance) {
            return;
        }
        let (Some(cgroups), Some(shim)) = (self.cgroups.cgroups(), instance.shim.as_ref()) else {
            return;
        };
        let (pid, shim_pid) = (shim.pid, shim.shim_pid);
        let dir = cgroups.dir(&self.name, index);
        let instance = self.instances.get_mut(&index).expect("found above");
        instance.cgroup = Some(dir.clone());
        // As `SetLowWeight`: asked for once, and a refusal is kept in status.
        instance.weight_low = true;
        let generation = instance.generation;
        self.emit(Effect::LowerRunning {
            index,
            generation,
            dir,
            pid,
            shim_pid,
        });
    }

    /// How long the instance's process has run (its shim's start time on the boot clock: the
    /// same for a new brain, and blind to wall-clock steps).
    fn age_ms(&self, instance: &Instance) -> u64 {
        instance
            .shim
            .as_ref()
            .map_or(0, |s| self.boot_now.saturating_sub(s.started_boot_ms))
    }

    /// Keeps every starting instance's cgroup at the low weight, moves an instance that no longer
    /// wants it (enabled, or nothing else serving) out of its cgroup and removes the cgroup, and
    /// removes the cgroups of instances that are gone for good. Called after every change; writes
    /// only differences.
    pub(super) fn sync_cgroups(&mut self) {
        if self.cgroups.cgroups().is_none() {
            return;
        }
        // An instance being spawned is left to its spawn: the spawn makes (or keeps) the cgroup
        // and its child joins it, and `on_spawned` removes it if the child was not put there. A
        // removal now (a batch member keeps its cgroup from its low stop to its start) would race
        // the child's join.
        let (low, released): (Vec<u32>, Vec<u32>) = self
            .instances
            .values()
            .filter(|i| i.cgroup.is_some() && i.phase.has_process() && i.phase != Phase::Spawning)
            .map(|i| i.index)
            .partition(|index| self.wants_low(&self.instances[index]));
        for index in released {
            self.remove_cgroup(index);
        }
        // A timer for the end of each low phase, so the bound holds without another event.
        for &index in &low {
            let instance = &self.instances[&index];
            if instance.low_timer {
                continue;
            }
            let after_ms = self.low_left_ms(instance).max(1);
            let instance = self.instances.get_mut(&index).expect("listed above");
            instance.low_timer = true;
            let generation = instance.generation;
            self.emit(Effect::SetTimer {
                after_ms,
                timer: Timer::LowPhaseOver { index, generation },
            });
        }
        let wanted: Vec<u32> = low
            .into_iter()
            .filter(|index| !self.instances[index].weight_low)
            .collect();
        for index in wanted {
            let instance = self.instances.get_mut(&index).expect("listed above");
            let dir = instance.cgroup.clone().expect("filtered on a cgroup");
            // Counted as written at once, as the weight is asked for once per change: the
            // executor reports a refusal (kept in status), which is not retried until then.
            instance.weight_low = true;
            let generation = instance.generation;
            self.emit(Effect::SetLowWeight {
                index,
                generation,
                dir,
            });
        }
        let gone: Vec<u32> = self
            .instances
            .values()
            .filter(|i| i.cgroup.is_some() && self.gone_for_good(i))
            .map(|i| i.index)
            .collect();
        for index in gone {
            self.remove_cgroup(index);
        }
    }

    /// No process, and none coming soon: stopped (and not about to start again), exited by policy,
    /// or fatal. A batch member between its stop and its start keeps its cgroup.
    fn gone_for_good(&self, instance: &Instance) -> bool {
        match instance.phase {
            Phase::Exited | Phase::Fatal => true,
            Phase::Stopped => {
                !self.in_batch(instance.index) && instance.after_stop == AfterStop::Nothing
            }
            _ => false,
        }
    }

    /// Removes the instance's cgroup in the background (its last processes may still be exiting);
    /// a start of the same index waits for the removal (the executor sees to that).
    pub(super) fn remove_cgroup(&mut self, index: u32) {
        let Some(instance) = self.instances.get_mut(&index) else {
            return;
        };
        let Some(dir) = instance.cgroup.take() else {
            return;
        };
        instance.weight_low = false;
        instance.low_timer = false;
        if self.cgroups.cgroups().is_none() {
            return;
        }
        self.emit(Effect::RemoveCgroup { index, dir });
    }
}
