//! Deploys of a service: the build this host should run (from ZooKeeper, or from `sluice deploy` on
//! the local backend) is fetched once, verified, extracted and prepared by the hooks, `current` is
//! flipped, and the instances are restarted onto it with the service's strategy, holding one of the
//! fleet's restart slots. Progress and errors are published as this host's status.
//!
//! A failure at any step leaves the serving build serving and is reported; the same build is not
//! tried again by itself (a new build, or an operator's `sluice restart`, is needed).

use std::collections::BTreeMap;
use std::path::PathBuf;

use sluice_hooks::Stage;
use sluice_strategies::restart::Action;

use super::core::{Core, Effect};
use crate::build;
use crate::config::BuildConfig;
use crate::protocol::{DeployPhase, DeployStatus, HostInstance, HostState, HostStatus};
use crate::service::state::FailedRestart;

/// Longest history of local deploys kept for `rollback`.
const HISTORY_MAX: usize = 20;

/// This service's side of coordination. Not persisted: a restarted daemon learns it again.
#[derive(Default)]
pub(super) struct Coordination {
    /// The build this host should run, when one is named.
    desired: Option<String>,
    /// Whether the coordination backend is reachable (always, for `local`).
    connected: bool,
    pub(super) deploy: Option<DeployStatus>,
    /// The last deploy error (hook, download, restart), shown until the next deploy succeeds.
    pub(super) last_error: Option<String>,
    /// A bad configuration node: the last good configuration keeps running.
    pub(super) config_error: Option<String>,
    /// Nodes this service obeys that the world may write (see `Zk::world_writable`).
    pub(super) world_writable: Vec<String>,
    /// The fleet's restart limit holds invalid data (`restarting`): no slot is granted to any
    /// host, so this host's next batch waits; shown in status and in the host's status node.
    pub(super) slot_error: Option<String>,
    /// The executor holds a fleet slot for this service (whether it is still valid is asked of
    /// [`super::env::Env::slot_valid`]).
    slot: bool,
    /// ZooKeeper answered an acquire of the slot since the last batch began: one batch may
    /// begin on it. The next batch asks again (the same lease comes back at once while the
    /// session lives), so a batch never begins on a lease that a session cut off from
    /// ZooKeeper may have lost before the client noticed.
    slot_fresh: bool,
    slot_pending: bool,
    /// Actions of a restart held at a batch's start until a slot is held.
    held: Vec<Action>,
    /// A deploy whose restart finished but whose build could not be recorded: its
    /// `post_restart` and pruning wait until the state is written.
    post_restart_unwritten: Option<String>,
    restart_started_ms: Option<u64>,
    restart_finished_ms: Option<u64>,
    last_published: Option<HostStatus>,
}

/// A deploy's download and preparation, for the executor to run.
#[derive(Debug)]
pub struct InstallJob {
    pub build: String,
    pub build_config: BuildConfig,
    /// The build serving now (the hooks' `previous_build`).
    pub previous: Option<String>,
    pub hooks: HookContext,
}

impl Core {
    /// The release directory of a build of this service.
    pub(super) fn release_of(&self, build: Option<&str>) -> Option<PathBuf> {
        let build = build?;
        self.config.build.as_ref()?;
        self.env.installed_release(build)
    }

    /// Whether a batch is held at its start, waiting for a slot: it is not out of steering yet.
    pub(super) fn batch_held(&self) -> bool {
        !self.deploy.held.is_empty()
    }

    /// Whether this host may begin a batch on the fleet backend: ZooKeeper is reachable and the
    /// slot held is still this host's.
    pub(super) fn slot_holding(&self) -> bool {
        self.deploy.connected && self.deploy.slot && self.env.slot_valid()
    }

    /// A new restart begins: its interval in the host's status starts at its first batch.
    pub(super) fn restart_begins(&mut self) {
        self.deploy.restart_started_ms = None;
        self.deploy.restart_finished_ms = None;
    }

    pub(super) fn set_connected(&mut self, connected: bool) {
        self.deploy.connected = connected;
        if connected {
            self.request_slot_if_needed();
        }
    }

    /// The coordination backend named the build this host should run.
    /// (The fleet's restart limit is ZooKeeper's business: the lease recipe reads it.)
    pub(super) fn set_desired(&mut self, build: Option<String>) {
        self.deploy.desired = build;
        self.maybe_deploy();
    }

    /// Starts a deploy when the desired build is neither served nor being deployed, nor failed.
    pub(super) fn maybe_deploy(&mut self) {
        let Some(build) = self.deploy.desired.clone() else {
            return;
        };
        // In `state_error` the build the instances run is unknown: nothing is deployed.
        if self.deploy.deploy.is_some()
            || self.stopping_all.is_some()
            || self.state_error.is_some()
            || self.shutting_down
        {
            return;
        }
        let target_is_it = self.state.target_build.as_ref().is_none_or(|t| *t == build);
        if self.state.build.as_deref() == Some(&build)
            && target_is_it
            && self.state.restart.is_none()
        {
            return;
        }
        if self
            .state
            .failed
            .as_ref()
            .is_some_and(|f| f.build.as_deref() == Some(&build) && f.config == self.config)
        {
            return;
        }
        if self.state.restart.is_some() {
            // A restart runs (a resumed deploy, or an operator's); the deploy follows it.
            return;
        }
        self.begin_deploy(build);
    }

    fn begin_deploy(&mut self, build: String) {
        if let Err(why) = build::check_build_id(&build) {
            self.deploy_failed(&build, format!("build id `{build}`: {why}"));
            return;
        }
        let Some(build_config) = self.config.build.clone() else {
            self.deploy_failed(
                &build,
                format!(
                    "{} has no `[build] source`: cannot deploy `{build}`",
                    self.name
                ),
            );
            return;
        };
        tracing::info!(service = %self.name, build, "deploy begins");
        self.deploy.deploy = Some(DeployStatus {
            build: build.clone(),
            phase: DeployPhase::Installing,
            started_ms: self.now,
        });
        let hooks = self.hook_context();
        self.emit(Effect::Install(Box::new(InstallJob {
            build,
            build_config,
            previous: self.state.build.clone(),
            hooks,
        })));
    }

    /// The download, install hooks and `pre_restart` hooks of a deploy finished.
    pub(super) fn on_installed(&mut self, build: String, result: Result<(), String>) {
        if self.deploy.deploy.as_ref().map(|d| &d.build) != Some(&build) {
            return;
        }
        if let Err(why) = result {
            self.deploy_failed(&build, why);
            return;
        }
        // A host going down restarts nothing; the deploy is dropped, not failed, so the next
        // start (the release now installed) takes it up again.
        if self.shutting_down || self.stopping_all.is_some() {
            tracing::info!(service = %self.name, build, "installed, but the host is shutting down: not restarting onto it");
            self.deploy.deploy = None;
            self.release_slot();
            return;
        }
        tracing::info!(service = %self.name, build, "installed; restarting onto it");
        self.state.target_build = Some(build.clone());
        if let Err(e) = self.persist() {
            self.deploy_failed(&build, e);
            return;
        }
        self.set_phase(DeployPhase::Restarting);
        // Instances that waited for a first build start now.
        self.reconcile();
        // Only instances not yet on the build restart (a rollback after a failed deploy moves just
        // the instances that went ahead).
        let targets: Vec<u32> = self
            .outdated()
            .into_iter()
            .filter(|i| self.desired_up(*i))
            .collect();
        if targets.is_empty() {
            self.deploy_after_restart(&Ok(()));
        } else if !self.begin_restart(targets) {
            let why = self
                .state_write_error
                .clone()
                .unwrap_or_else(|| "its restart could not be written".into());
            self.deploy_failed(&build, why);
        }
    }

    fn set_phase(&mut self, phase: DeployPhase) {
        if let Some(deploy) = &mut self.deploy.deploy {
            deploy.phase = phase;
        }
    }

    fn deploy_failed(&mut self, build: &str, why: String) {
        let message = format!("deploy of {} build {build} failed: {why}", self.name);
        tracing::error!("{message}");
        self.deploy.last_error = Some(message.clone());
        self.deploy.deploy = None;
        self.state.target_build = self.state.build.clone();
        self.state.failed = Some(FailedRestart {
            config: self.config.clone(),
            build: Some(build.to_owned()),
            reason: message,
        });
        self.persist_logged();
        self.release_slot();
    }

    /// A restart finished: a deploy records its build, runs `post_restart`, and cleans up.
    pub(super) fn deploy_after_restart(&mut self, result: &Result<(), String>) {
        self.deploy.restart_finished_ms = Some(self.now);
        let target = self.state.target_build.clone();
        match (result, target) {
            (Ok(()), Some(build)) if self.state.build.as_ref() != Some(&build) => {
                // The instances run the build now, written or not; what depends on the record
                // (`post_restart`, which prunes releases by it) waits for it to be written.
                self.state.build = Some(build.clone());
                self.deploy.last_error = None;
                self.set_phase(DeployPhase::PostRestart);
                if let Err(e) = self.persist() {
                    self.deploy.last_error = Some(format!(
                        "deploy of {} build {build}: the instances run it, but it is not recorded \
                         yet ({e}); post_restart and pruning wait until it is",
                        self.name
                    ));
                    self.deploy.post_restart_unwritten = Some(build);
                } else {
                    tracing::info!(service = %self.name, build, "deployed");
                    self.post_restart(build);
                }
            }
            (Err(why), Some(build)) if self.deploy.deploy.is_some() => {
                // The failed batch is back on the old build; the batches before it stay on the new
                // one, and nothing moves until a new build or a rollback is asked for.
                self.deploy.last_error = Some(why.clone());
                self.deploy.deploy = None;
                self.state.failed = Some(FailedRestart {
                    config: self.config.clone(),
                    build: Some(build),
                    reason: why.clone(),
                });
                self.persist_logged();
            }
            _ => {}
        }
        // The end of the restart is published with the release, which waits until ZooKeeper
        // acknowledged it before it deletes the lease: another host may take the slot at once.
        self.release_slot();
    }

    /// Runs `post_restart` and the pruning of releases for a deploy whose build is recorded.
    fn post_restart(&mut self, build: String) {
        let hooks = self.hook_context();
        let release = self.release_of(Some(&build));
        let keep = self.config.build.as_ref().map_or(5, |b| b.keep_releases);
        self.emit(Effect::PostRestart {
            build,
            hooks: Box::new(hooks),
            release,
            keep,
        });
    }

    /// A deploy's build that could not be recorded is, once a write succeeded: its
    /// `post_restart` runs now.
    pub(super) fn post_restart_if_written(&mut self) {
        if self.state_write_error.is_some() {
            return;
        }
        let Some(build) = self.deploy.post_restart_unwritten.take() else {
            return;
        };
        if self.state.build.as_deref() != Some(&build) {
            return;
        }
        tracing::info!(service = %self.name, build, "deployed (recorded after a failed write)");
        self.deploy.last_error = None;
        self.post_restart(build);
    }

    pub(super) fn on_post_restart(&mut self, build: String, result: Result<(), String>) {
        if let Err(why) = result {
            self.deploy.last_error = Some(format!("deployed {build}, but {why}"));
        }
        if self
            .deploy
            .deploy
            .as_ref()
            .is_some_and(|d| d.build == build)
        {
            self.deploy.deploy = None;
        }
        self.maybe_deploy();
    }

    /// Holds the actions of a restart at the start of a batch until a fleet slot is held, just
    /// confirmed by ZooKeeper, and ZooKeeper is reachable: no instance is stopped while
    /// ZooKeeper is away, and never more hosts restart than the fleet allows (beyond the batches
    /// in flight of hosts whose sessions expired). Returns what may run now.
    pub(super) fn gate(&mut self, actions: Vec<Action>) -> Vec<Action> {
        if !self.fleet {
            return actions;
        }
        let at_start = self
            .state
            .restart
            .as_ref()
            .is_some_and(|m| m.at_batch_start());
        let holding = self.slot_holding();
        if !at_start || holding && self.deploy.slot_fresh {
            if at_start {
                // Spent: the next batch has the lease confirmed again.
                self.deploy.slot_fresh = false;
                if self.deploy.restart_started_ms.is_none() {
                    self.deploy.restart_started_ms = Some(self.now);
                    self.deploy.restart_finished_ms = None;
                }
            }
            return actions;
        }
        if self.deploy.deploy.is_some() {
            self.set_phase(DeployPhase::WaitingSlot);
        }
        if holding {
            tracing::info!(service = %self.name, "confirming the restart slot before the next batch");
        } else {
            tracing::info!(service = %self.name, "waiting for a restart slot before the next batch");
        }
        self.deploy.held.extend(actions);
        self.request_slot_if_needed();
        Vec::new()
    }

    fn request_slot_if_needed(&mut self) {
        if self.deploy.held.is_empty() || self.deploy.slot_pending || !self.deploy.connected {
            return;
        }
        if !self.fleet {
            return;
        }
        self.deploy.slot_pending = true;
        self.emit(Effect::AcquireSlot);
    }

    pub(super) fn on_slot(&mut self, result: Result<(), String>) {
        self.deploy.slot_pending = false;
        match result {
            Ok(()) => {
                tracing::info!(service = %self.name, "holding a restart slot");
                // The executor released the slot it held before, if any.
                self.deploy.slot = true;
                self.deploy.slot_fresh = true;
                if self.state.restart.is_none() {
                    self.release_slot();
                    return;
                }
                if self.deploy.deploy.is_some() {
                    self.set_phase(DeployPhase::Restarting);
                }
                let held = std::mem::take(&mut self.deploy.held);
                self.execute(held);
                self.drive();
            }
            Err(why) => {
                tracing::warn!(service = %self.name, "restart slot: {why}");
                self.request_slot_if_needed();
            }
        }
    }

    /// Gives the slot back. The effect carries this host's status as it is now (the restart
    /// ended, or never began): the executor publishes it and deletes the lease only once
    /// ZooKeeper acknowledged it, so the order is not left to two tasks.
    fn release_slot(&mut self) {
        self.deploy.held.clear();
        self.deploy.slot_fresh = false;
        if std::mem::take(&mut self.deploy.slot) {
            let host = self.host_status();
            self.deploy.last_published = Some(host.clone());
            let mut host = host;
            host.updated_ms = Some(self.now);
            self.emit(Effect::ReleaseSlot(Box::new(host)));
        }
    }

    /// Local backend: `sluice deploy`, `promote` and `rollback` change what this host runs.
    pub(super) fn local_deploy(&mut self, verb: LocalVerb) -> Result<String, String> {
        let saved = self.state.local.clone();
        let local = &mut self.state.local;
        let message = match verb {
            LocalVerb::Deploy { build, canary } => {
                build::check_build_id(&build).map_err(|e| format!("build id `{build}`: {e}"))?;
                if canary {
                    local.canary = Some(build.clone());
                    format!("{}: canary build is now {build}", self.name)
                } else {
                    local.enabled = Some(build.clone());
                    local.history.push(build.clone());
                    format!("{}: enabled build is now {build}", self.name)
                }
            }
            LocalVerb::Promote => {
                let build = local
                    .canary
                    .take()
                    .ok_or_else(|| format!("{} has no canary build to promote", self.name))?;
                local.enabled = Some(build.clone());
                local.history.push(build.clone());
                format!("{}: promoted {build}", self.name)
            }
            LocalVerb::Rollback => {
                if local.history.len() < 2 {
                    return Err(format!(
                        "{} has no earlier build to roll back to",
                        self.name
                    ));
                }
                local.history.pop();
                let build = local.history.last().cloned().expect("checked above");
                local.enabled = Some(build.clone());
                local.canary = None;
                format!("{}: rolled back to {build}", self.name)
            }
        };
        let excess = local.history.len().saturating_sub(HISTORY_MAX);
        local.history.drain(..excess);
        // An operator's choice clears an earlier failure.
        let failed = self.state.failed.take();
        if let Err(e) = self.persist() {
            // Not written, so not done: the desired builds stay as they were.
            self.state.local = saved;
            self.state.failed = failed;
            return Err(e);
        }
        self.local_desired_changed();
        Ok(message)
    }

    /// Applies the local backend's desired build.
    pub(super) fn local_desired_changed(&mut self) {
        if self.fleet {
            return;
        }
        self.deploy.connected = true;
        let local = &self.state.local;
        let build = if self.host.coordination.canary {
            local.canary.clone().or_else(|| local.enabled.clone())
        } else {
            local.enabled.clone()
        };
        self.set_desired(build);
    }

    /// Publishes this host's status to ZooKeeper when it changed.
    pub(super) fn publish_status(&mut self) {
        if !self.fleet {
            return;
        }
        let host = self.host_status();
        if self.deploy.last_published.as_ref() == Some(&host) {
            return;
        }
        self.deploy.last_published = Some(host.clone());
        let mut host = host;
        host.updated_ms = Some(self.now);
        self.emit(Effect::PublishHostStatus(Box::new(host)));
    }

    /// This host's status node as the core stands now (`updated_ms` unset, for comparing).
    fn host_status(&self) -> HostStatus {
        let state = match (&self.deploy.deploy, &self.state.restart) {
            (Some(d), _) => match d.phase {
                DeployPhase::Installing | DeployPhase::PreRestart => HostState::Installing,
                DeployPhase::WaitingSlot => HostState::Waiting,
                DeployPhase::Restarting => HostState::Restarting,
                DeployPhase::PostRestart => HostState::Finishing,
            },
            (None, Some(_)) if self.deploy.held.is_empty() => HostState::Restarting,
            (None, Some(_)) => HostState::Waiting,
            (None, None) if self.deploy.last_error.is_some() => HostState::Failed,
            (None, None) => HostState::Serving,
        };
        HostStatus {
            host: self.host_name.clone(),
            build: self.state.build.clone(),
            target_build: self.state.target_build.clone(),
            state,
            // Built here rather than from `status()`, which also compares every instance's
            // configuration (a spec and a hash each): this runs after every event.
            instances: self
                .instances
                .values()
                .map(|i| HostInstance {
                    index: i.index,
                    state: i.phase.state(),
                    pid: i.shim.as_ref().map(|s| s.pid),
                    enabled: self
                        .config
                        .steers()
                        .then(|| self.steering.installed_contains(i.index)),
                    healthy: i.healthy,
                    warmup: i.warmup.clone(),
                    last_error: i.last_error.clone(),
                })
                .collect(),
            last_error: self
                .deploy
                .config_error
                .clone()
                .or_else(|| self.deploy.slot_error.clone())
                .or_else(|| self.deploy.last_error.clone())
                .or_else(|| self.state.failed.as_ref().map(|f| f.reason.clone())),
            restart_started_ms: self.deploy.restart_started_ms,
            restart_finished_ms: self.deploy.restart_finished_ms,
            restart: self.restart_status(),
            deploy: self.deploy.deploy.clone(),
            canary: self.canary.status.clone(),
            canary_sample: self.canary_sample(),
            updated_ms: None,
        }
    }

    /// What the hooks of this service's deploys need.
    fn hook_context(&self) -> HookContext {
        // Resolved now, reported when a stage has a hook to run: an unresolvable user fails that
        // stage naming the user, and no hook ever runs as root in its place.
        let identity = self.env.identity(&self.config);
        let mut env = self.config.env.clone();
        env.extend(self.config.hooks.env.clone());
        HookContext {
            service: self.name.clone(),
            configured: [
                Stage::PreDownload,
                Stage::PostDownload,
                Stage::PostInstall,
                Stage::PreRestart,
                Stage::PostRestart,
            ]
            .into_iter()
            .map(|s| (s.as_str().to_owned(), self.config.hooks.of(s).to_vec()))
            .collect(),
            identity,
            env,
            timeout_ms: self.config.hooks.timeout_ms,
            log_dir: self
                .host
                .data_dir
                .join("logs")
                .join("hooks")
                .join(&self.name),
            stock_dir: self.host.data_dir.join("stock-hooks"),
        }
    }
}

/// The local backend's verbs.
#[derive(Debug)]
pub enum LocalVerb {
    Deploy { build: String, canary: bool },
    Promote,
    Rollback,
}

/// Everything a hook run needs, owned, so it can move into a task (the executor runs it).
#[derive(Debug)]
pub struct HookContext {
    pub(super) service: String,
    pub(super) configured: BTreeMap<String, Vec<Vec<String>>>,
    /// Who the hooks run as (`None`: as the daemon), or why the service's user cannot be resolved.
    pub(super) identity: Result<crate::service::spec::Identity, String>,
    pub(super) env: BTreeMap<String, String>,
    pub(super) timeout_ms: u64,
    pub(super) log_dir: PathBuf,
    pub(super) stock_dir: PathBuf,
}
