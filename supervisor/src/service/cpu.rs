//! CPU isolation of one service's instances: which weight each instance's cgroup should have,
//! derived from the instance's state (so a restarted daemon re-applies it), and the removal of a
//! cgroup once its instance is gone for good.

use std::path::PathBuf;

use sluice_strategies::restart::Step;

use super::{Instance, Phase, Service};
use crate::cgroup::{Cgroups, Weight};

impl Service {
    /// The host's cgroups, when this service wants its instances isolated.
    pub(super) fn cgroups_wanted(&self) -> Option<&Cgroups> {
        if !self.config.restart.cpu_isolation {
            return None;
        }
        self.ctx.cgroups.cgroups()
    }

    /// The cgroup an earlier daemon made for `index`, if it is still there.
    pub(super) fn existing_cgroup(&self, index: u32) -> Option<PathBuf> {
        let dir = self.ctx.cgroups.cgroups()?.dir(&self.name, index);
        dir.is_dir().then_some(dir)
    }

    /// Why instances of this service run without a cgroup, for status.
    pub(super) fn cgroups_error(&self) -> Option<String> {
        if !self.config.restart.cpu_isolation {
            return None;
        }
        self.ctx.cgroups.error().or_else(|| {
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

    /// Whether the instance is starting or warming up and not yet enabled while a sibling serves:
    /// it then takes only CPU that the serving instances leave idle. An instance that serves, or
    /// that leaves steering to be drained (it still answers the requests in flight), runs at the
    /// normal weight, outside any cgroup of sluice's.
    fn wants_low(&self, instance: &Instance) -> bool {
        if self.cgroups_wanted().is_none()
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
        !instance.healthy || warming
    }

    /// Keeps every starting instance's cgroup at the low weight, moves an instance that no longer
    /// wants it (enabled, or nothing else serving) out of its cgroup and removes the cgroup, and
    /// removes the cgroups of instances that are gone for good. Called after every change; writes
    /// only differences.
    pub(super) fn sync_cgroups(&mut self) {
        let Some(cgroups) = self.ctx.cgroups.cgroups().cloned() else {
            return;
        };
        let (low, released): (Vec<u32>, Vec<u32>) = self
            .instances
            .values()
            .filter(|i| i.cgroup.is_some() && i.phase.has_process())
            .map(|i| i.index)
            .partition(|index| self.wants_low(&self.instances[index]));
        for index in released {
            self.remove_cgroup(index);
        }
        let wanted: Vec<(u32, Weight)> = low
            .into_iter()
            .filter(|index| self.instances[index].cpu_weight != Some(Weight::Low))
            .map(|index| (index, Weight::Low))
            .collect();
        for (index, weight) in wanted {
            let instance = self.instances.get_mut(&index).expect("listed above");
            let dir = instance.cgroup.clone().expect("filtered on a cgroup");
            match cgroups.set_weight(&dir, weight) {
                Ok(()) => {
                    tracing::info!(service = %self.name, index, ?weight, cgroup = %dir.display(), "cpu weight set");
                    instance.cpu_weight = Some(weight);
                    instance.cgroup_error = None;
                }
                Err(e) => {
                    // Not retried until the next change: a cgroup that refuses a weight now will
                    // refuse it on a timer too, and status shows why.
                    tracing::warn!(service = %self.name, index, "{e}");
                    instance.cpu_weight = Some(weight);
                    instance.cgroup_error = Some(e);
                }
            }
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
                !self.exec.in_batch(&self.state, instance.index)
                    && instance.after_stop == super::AfterStop::Nothing
            }
            _ => false,
        }
    }

    /// Removes the instance's cgroup in the background (its last processes may still be exiting);
    /// a start of the same index waits for the removal.
    pub(super) fn remove_cgroup(&mut self, index: u32) {
        let Some(instance) = self.instances.get_mut(&index) else {
            return;
        };
        let Some(dir) = instance.cgroup.take() else {
            return;
        };
        instance.cpu_weight = None;
        let Some(cgroups) = self.ctx.cgroups.cgroups().cloned() else {
            return;
        };
        let service = self.name.clone();
        let previous = self.cgroup_removals.remove(&index);
        let handle = tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            match cgroups.remove(&dir).await {
                Ok(()) => {
                    tracing::info!(service = %service, index, cgroup = %dir.display(), "cgroup removed")
                }
                Err(e) => tracing::warn!(service = %service, index, "{e}"),
            }
        });
        self.cgroup_removals.insert(index, handle);
    }

    /// Waits for the cgroup removals in progress (bounded by their attempts).
    pub(super) async fn finish_cgroup_removals(&mut self) {
        for (_, handle) in std::mem::take(&mut self.cgroup_removals) {
            let _ = handle.await;
        }
    }
}
