//! Deploys of a service: the build this host should run (from ZooKeeper, or from `sluice deploy` on
//! the local backend) is fetched once, verified, extracted and prepared by the hooks, `current` is
//! flipped, and the instances are restarted onto it with the service's strategy, holding one of the
//! fleet's restart slots. Progress and errors are published as this host's status.
//!
//! A failure at any step leaves the serving build serving and is reported; the same build is not
//! tried again by itself (a new build, or an operator's `sluice restart`, is needed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use sluice_hooks::Stage;
use sluice_strategies::restart::Action as Step;

use super::{Event, Service, now_ms};
use crate::build::{self, Releases};
use crate::coord::Slot;
use crate::protocol::{DeployPhase as Phase, DeployStatus, HostInstance, HostState, HostStatus};
use crate::state::FailedRestart;

/// Longest history of local deploys kept for `rollback`.
const HISTORY_MAX: usize = 20;
/// Pause before asking again for a slot after ZooKeeper refused one.
const SLOT_RETRY_MS: u64 = 1_000;
/// Bytes of a failed hook's output that go into status (the log file has all of it).
const OUTPUT_TAIL_IN_STATUS: usize = 600;
/// Longest pause between attempts to read a build's metadata while ZooKeeper is away.
const META_RETRY_MAX_MS: u64 = 10_000;

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
    slot: Option<Slot>,
    slot_pending: bool,
    /// Actions of a restart held at a batch's start until a slot is held.
    held: Vec<Step>,
    restart_started_ms: Option<u64>,
    restart_finished_ms: Option<u64>,
    last_published: Option<HostStatus>,
}

impl Service {
    fn releases(&self) -> Releases {
        Releases::new(&self.ctx.host.data_dir, &self.name)
    }

    /// The release directory of a build of this service.
    pub(super) fn release_of(&self, build: Option<&str>) -> Option<PathBuf> {
        let build = build?;
        self.config.build.as_ref()?;
        let dir = self.releases().release_dir(build);
        dir.is_dir().then_some(dir)
    }

    /// Whether restarts wait for a fleet slot (the ZooKeeper backend).
    fn fleet(&self) -> bool {
        self.ctx.coord.is_some()
    }

    /// Whether a batch is held at its start, waiting for a slot: it is not out of steering yet.
    pub(super) fn batch_held(&self) -> bool {
        !self.coord.held.is_empty()
    }

    /// A new restart begins: its interval in the host's status starts at its first batch.
    pub(super) fn restart_begins(&mut self) {
        self.coord.restart_started_ms = None;
        self.coord.restart_finished_ms = None;
    }

    pub(super) fn set_connected(&mut self, connected: bool) {
        self.coord.connected = connected;
        if connected {
            self.request_slot_if_needed();
        }
    }

    /// The coordination backend named the build this host should run.
    /// (The fleet's restart limit is ZooKeeper's business: the lease recipe reads it.)
    pub(super) fn set_desired(&mut self, build: Option<String>) {
        self.coord.desired = build;
        self.maybe_deploy();
    }

    /// Starts a deploy when the desired build is neither served nor being deployed, nor failed.
    pub(super) fn maybe_deploy(&mut self) {
        let Some(build) = self.coord.desired.clone() else {
            return;
        };
        if self.coord.deploy.is_some() || self.stopping_all.is_some() {
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
        self.coord.deploy = Some(DeployStatus {
            build: build.clone(),
            phase: Phase::Installing,
            started_ms: now_ms(),
        });
        let releases = self.releases();
        let coord = self.ctx.coord.clone();
        let service = self.name.clone();
        let previous = self.state.build.clone();
        let hooks = self.hook_context(&build);
        let events = self.events_tx.clone();
        let peers = self.ctx.peers.clone();
        tokio::spawn(async move {
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
                let dir = build::peer::install(
                    peers.as_ref(),
                    &releases,
                    &service,
                    &build,
                    &source,
                    &limits,
                )
                .await
                .map_err(|e| e.to_string())?;
                hooks
                    .run(Stage::PostDownload, &build, previous.as_deref(), Some(&dir))
                    .await?;
                hooks
                    .run(Stage::PostInstall, &build, previous.as_deref(), Some(&dir))
                    .await?;
                releases.set_current(&build).map_err(|e| e.to_string())?;
                hooks
                    .run(Stage::PreRestart, &build, previous.as_deref(), Some(&dir))
                    .await?;
                Ok(())
            }
            .await;
            let _ = events.send(Event::Installed { build, result }).await;
        });
    }

    /// The download, install hooks and `pre_restart` hooks of a deploy finished.
    pub(super) fn on_installed(&mut self, build: String, result: Result<(), String>) {
        if self.coord.deploy.as_ref().map(|d| &d.build) != Some(&build) {
            return;
        }
        if let Err(why) = result {
            self.deploy_failed(&build, why);
            return;
        }
        tracing::info!(service = %self.name, build, "installed; restarting onto it");
        self.state.target_build = Some(build.clone());
        if let Err(e) = self.persist() {
            self.deploy_failed(&build, e);
            return;
        }
        self.set_phase(Phase::Restarting);
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
        } else {
            self.begin_restart(targets);
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some(deploy) = &mut self.coord.deploy {
            deploy.phase = phase;
        }
    }

    fn deploy_failed(&mut self, build: &str, why: String) {
        let message = format!("deploy of {} build {build} failed: {why}", self.name);
        tracing::error!("{message}");
        self.coord.last_error = Some(message.clone());
        self.coord.deploy = None;
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
        self.coord.restart_finished_ms = Some(now_ms());
        let target = self.state.target_build.clone();
        match (result, target) {
            (Ok(()), Some(build)) if self.state.build.as_ref() != Some(&build) => {
                self.state.build = Some(build.clone());
                self.coord.last_error = None;
                self.persist_logged();
                tracing::info!(service = %self.name, build, "deployed");
                self.set_phase(Phase::PostRestart);
                let hooks = self.hook_context(&build);
                let dir = self.release_of(Some(&build));
                let keep = self.config.build.as_ref().map_or(5, |b| b.keep_releases);
                let in_use: BTreeSet<String> =
                    [Some(build.clone())].into_iter().flatten().collect();
                let releases = self.releases();
                let events = self.events_tx.clone();
                tokio::spawn(async move {
                    let result = hooks
                        .run(Stage::PostRestart, &build, None, dir.as_deref())
                        .await;
                    // The serving release and the one before stay, whatever `keep` says.
                    if let Err(e) = releases.prune(keep.max(2), &in_use) {
                        tracing::warn!("pruning releases: {e}");
                    }
                    let _ = events.send(Event::PostRestartDone { build, result }).await;
                });
            }
            (Err(why), Some(build)) if self.coord.deploy.is_some() => {
                // The failed batch is back on the old build; the batches before it stay on the new
                // one, and nothing moves until a new build or a rollback is asked for.
                self.coord.last_error = Some(why.clone());
                self.coord.deploy = None;
                self.state.failed = Some(FailedRestart {
                    config: self.config.clone(),
                    build: Some(build),
                    reason: why.clone(),
                });
                self.persist_logged();
            }
            _ => {}
        }
        // Publish the end of the restart before the slot goes: another host may take it at once.
        self.publish_status();
        self.release_slot();
    }

    pub(super) fn on_post_restart(&mut self, build: String, result: Result<(), String>) {
        if let Err(why) = result {
            self.coord.last_error = Some(format!("deployed {build}, but {why}"));
        }
        if self.coord.deploy.as_ref().is_some_and(|d| d.build == build) {
            self.coord.deploy = None;
        }
        self.maybe_deploy();
    }

    /// Holds the actions of a restart at the start of a batch until a fleet slot is held and
    /// ZooKeeper is reachable: no instance is stopped while ZooKeeper is away, and never more
    /// hosts restart than the fleet allows. Returns what may run now.
    pub(super) fn gate(&mut self, actions: Vec<Step>) -> Vec<Step> {
        if !self.fleet() {
            return actions;
        }
        let at_start = self
            .state
            .restart
            .as_ref()
            .is_some_and(|m| m.at_batch_start());
        let holding = self.coord.connected && self.coord.slot.as_ref().is_some_and(Slot::is_valid);
        if !at_start || holding {
            if at_start && self.coord.restart_started_ms.is_none() {
                self.coord.restart_started_ms = Some(now_ms());
                self.coord.restart_finished_ms = None;
            }
            return actions;
        }
        if self.coord.deploy.is_some() {
            self.set_phase(Phase::WaitingSlot);
        }
        tracing::info!(service = %self.name, "waiting for a restart slot before the next batch");
        self.coord.held.extend(actions);
        self.request_slot_if_needed();
        Vec::new()
    }

    fn request_slot_if_needed(&mut self) {
        if self.coord.held.is_empty() || self.coord.slot_pending || !self.coord.connected {
            return;
        }
        let Some(zk) = self.ctx.coord.clone() else {
            return;
        };
        self.coord.slot_pending = true;
        let service = self.name.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = zk.acquire_slot(&service).await.map_err(|e| e.to_string());
            if result.is_err() {
                tokio::time::sleep(Duration::from_millis(SLOT_RETRY_MS)).await;
            }
            let _ = events.send(Event::Slot { result }).await;
        });
    }

    pub(super) fn on_slot(&mut self, result: Result<Slot, String>) {
        self.coord.slot_pending = false;
        match result {
            Ok(slot) => {
                tracing::info!(service = %self.name, "holding a restart slot");
                if let Some(old) = self.coord.slot.replace(slot) {
                    tokio::spawn(old.release());
                }
                if self.state.restart.is_none() {
                    self.release_slot();
                    return;
                }
                if self.coord.deploy.is_some() {
                    self.set_phase(Phase::Restarting);
                }
                let held = std::mem::take(&mut self.coord.held);
                self.execute(held);
                self.drive();
            }
            Err(why) => {
                tracing::warn!(service = %self.name, "restart slot: {why}");
                self.request_slot_if_needed();
            }
        }
    }

    fn release_slot(&mut self) {
        self.coord.held.clear();
        if let Some(slot) = self.coord.slot.take() {
            tokio::spawn(slot.release());
        }
    }

    /// Local backend: `sluice deploy`, `promote` and `rollback` change what this host runs.
    pub(super) fn local_deploy(&mut self, verb: LocalVerb) -> Result<String, String> {
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
        self.state.failed = None;
        self.persist()?;
        self.local_desired_changed();
        Ok(message)
    }

    /// Applies the local backend's desired build.
    pub(super) fn local_desired_changed(&mut self) {
        if self.fleet() {
            return;
        }
        self.coord.connected = true;
        let local = &self.state.local;
        let build = if self.ctx.host.coordination.canary {
            local.canary.clone().or_else(|| local.enabled.clone())
        } else {
            local.enabled.clone()
        };
        self.set_desired(build);
    }

    /// Publishes this host's status to ZooKeeper when it changed.
    pub(super) fn publish_status(&mut self) {
        let Some(zk) = self.ctx.coord.clone() else {
            return;
        };
        let state = match (&self.coord.deploy, &self.state.restart) {
            (Some(d), _) => match d.phase {
                Phase::Installing | Phase::PreRestart => HostState::Installing,
                Phase::WaitingSlot => HostState::Waiting,
                Phase::Restarting => HostState::Restarting,
                Phase::PostRestart => HostState::Finishing,
            },
            (None, Some(_)) if self.coord.held.is_empty() => HostState::Restarting,
            (None, Some(_)) => HostState::Waiting,
            (None, None) if self.coord.last_error.is_some() => HostState::Failed,
            (None, None) => HostState::Serving,
        };
        let host = HostStatus {
            host: self.ctx.host.coordination.host_name(),
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
                .coord
                .config_error
                .clone()
                .or_else(|| self.coord.last_error.clone())
                .or_else(|| self.state.failed.as_ref().map(|f| f.reason.clone())),
            restart_started_ms: self.coord.restart_started_ms,
            restart_finished_ms: self.coord.restart_finished_ms,
            updated_ms: None,
        };
        if self.coord.last_published.as_ref() == Some(&host) {
            return;
        }
        self.coord.last_published = Some(host.clone());
        let mut host = host;
        host.updated_ms = Some(now_ms());
        let value = serde_json::to_value(&host).expect("status serializes");
        let service = self.name.clone();
        tokio::spawn(async move { zk.set_status(&service, value).await });
    }

    /// What the hooks of this service's deploys need.
    fn hook_context(&self, build: &str) -> HookContext {
        // Resolved now, reported when a stage has a hook to run: an unresolvable user fails that
        // stage naming the user, and no hook ever runs as root in its place.
        let identity = crate::spec::identity(&self.ctx.host, &self.name, &self.config);
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
                .ctx
                .host
                .data_dir
                .join("logs")
                .join("hooks")
                .join(&self.name),
            stock_dir: self.ctx.host.data_dir.join("stock-hooks"),
            _build: build.to_owned(),
        }
    }
}

/// The local backend's verbs.
pub enum LocalVerb {
    Deploy { build: String, canary: bool },
    Promote,
    Rollback,
}

/// Everything a hook run needs, owned, so it can move into a task.
struct HookContext {
    service: String,
    configured: BTreeMap<String, Vec<Vec<String>>>,
    /// Who the hooks run as (`None`: as the daemon), or why the service's user cannot be resolved.
    identity: Result<crate::spec::Identity, String>,
    env: BTreeMap<String, String>,
    timeout_ms: u64,
    log_dir: PathBuf,
    stock_dir: PathBuf,
    _build: String,
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
