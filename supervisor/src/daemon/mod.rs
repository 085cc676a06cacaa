//! `sluice run`: finds the shims a previous daemon left, starts one task per service, serves the
//! control API, and runs the daemon's one loop (requests, signals, watchdog, the end of a host
//! shutdown) until told to go. A host shutdown is a persisted intent ([`intent`]) and a task of
//! its own, so the loop keeps answering while instances stop; a daemon that finds the intent
//! finishes that shutdown instead of starting anything.

pub mod intent;
pub mod notify;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_shim::proto::Status;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{self, HostConfig, ServiceConfig, Services};
use crate::control::protocol::{LocalVerb, Order, ShutdownStatus, StatusDocument};
use crate::control::queue::Request;
use crate::control::{self, server};
use crate::service::shim::{self, ShimPaths};
use crate::service::{self, Action, Context, ServiceHandle};

/// Bound of the queue between the control API and the daemon loop.
const REQUEST_QUEUE: usize = 64;
/// How long start-up waits for a service that others start `after`.
const SETTLE_TIMEOUT_MS: u64 = 60_000;
/// Grace given to instances of services no longer configured, found at start-up.
const ORPHAN_STOP_GRACE_MS: u64 = 10_000;
/// Callers of `sluice shutdown` that may wait for one shutdown at once; more are refused.
const SHUTDOWN_WAITERS_MAX: usize = 16;

/// How the daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Told to stop (SIGTERM, SIGINT): instances were left running for the next daemon.
    Detached,
    /// `sluice shutdown`: every instance was stopped.
    ShutDown,
}

struct Entry {
    /// The configuration in force: the service file with the config node's granted keys applied.
    config: ServiceConfig,
    /// The service file as last loaded: the base that a config node overrides.
    file: ServiceConfig,
    /// The text of ZooKeeper's config node, while one exists; applied again after each reload.
    node: Option<String>,
    handle: ServiceHandle,
}

struct Daemon {
    ctx: Arc<Context>,
    services: BTreeMap<String, Entry>,
    /// Tasks of services a reload removed, until they have stopped their instances and ended:
    /// a service added back under the same name waits for its predecessor (one owner per name).
    retiring: BTreeMap<String, ServiceHandle>,
    /// The host shutdown in progress: a task of its own, so the loop keeps answering and pinging.
    shutdown: Option<Shutdown>,
}

/// A host shutdown in progress, as the loop sees it.
struct Shutdown {
    /// What status shows; sent by the shutdown's task as it goes.
    progress: watch::Receiver<ShutdownStatus>,
    /// Callers of `sluice shutdown` waiting for its end (at most [`SHUTDOWN_WAITERS_MAX`]).
    waiters: Vec<control::queue::Reply<String>>,
    /// The task's end: `Ok` once every service stopped, `Err` when the intent could not be
    /// written (then nothing was stopped).
    done: oneshot::Receiver<Result<(), String>>,
}

/// How the shutdown's task ended, as the loop learns it.
enum ShutdownEnd {
    Stopped,
    NotBegun(String),
}

/// Runs the daemon until `shutdown` resolves, a SIGTERM/SIGINT arrives, or `sluice shutdown`.
/// The caller binds the control socket, so tests can run the daemon in-process.
pub async fn run(
    host: HostConfig,
    services: Services,
    shim_binary: PathBuf,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Exit> {
    use anyhow::Context as _;
    for dir in [host.state_dir(), host.shim_dir()] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // runtime_dir is traversable by everyone (0711 in the unit) so `control_group` can reach the
    // control socket; the shims' sockets and locks are root's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let shims = host.shim_dir();
        std::fs::set_permissions(&shims, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", shims.display()))?;
    }
    // Steering writes nat rules: only root can, and only where iptables is installed.
    let variant = host.iptables.variant();
    let iptables = nix::unistd::geteuid()
        .is_root()
        .then(|| sluice_strategies::steering::Iptables::detect(variant));
    let (coord, mut coord_events) = match host.coordination.backend {
        config::Backend::Local => (None, None),
        config::Backend::Zookeeper => {
            let digest = match &host.coordination.digest_file {
                Some(path) => Some(read_digest(path)?),
                None => {
                    tracing::warn!(
                        "no `coordination.digest_file`: the fleet's zookeeper nodes (configs, enabled builds, roles) are writable by anyone who reaches zookeeper"
                    );
                    None
                }
            };
            let zk_config = crate::coord::ZkConfig {
                connect: host
                    .coordination
                    .connect
                    .clone()
                    .expect("validated with the host file"),
                host: host.coordination.host_name(),
                digest,
                session_timeout_ms: host.coordination.session_timeout_ms,
            };
            let (zk, events) =
                crate::coord::Zk::start(zk_config, services.keys().cloned().collect());
            (Some(zk), Some(events))
        }
    };
    // Before any shim is spawned: under cgroup v2 the daemon moves to a leaf of its own cgroup,
    // and the shims it spawns must start there too.
    let cgroups = crate::service::cgroup::detect(&host);
    // After the CPU cgroups: under cgroup v2 the tracking parent goes beside the daemon's leaf.
    let tree = crate::service::tree::detect(&host);
    let peers = match (&coord, host.peers.enabled) {
        (Some(zk), true) => Some(
            crate::build::peer::Peers::start(
                &host.peers,
                host.rack.as_deref(),
                &host.data_dir,
                zk.clone(),
                services.keys().cloned().collect(),
            )
            .await
            .map_err(anyhow::Error::msg)?,
        ),
        (None, true) => {
            tracing::warn!(
                "`peers.enabled` needs the zookeeper backend: builds come from the store"
            );
            None
        }
        _ => None,
    };
    let metrics = Arc::new(crate::metrics::Metrics::new(coord.is_some()));
    // Bound before any service starts, so that a port in use is a start-up error naming the key.
    let metrics_listener = match host.metrics.listen_addr() {
        Ok(Some(listen)) => Some(crate::metrics::bind(listen).await?),
        Ok(None) => None,
        Err(message) => anyhow::bail!("{message}"),
    };
    let ctx = Arc::new(Context {
        metrics,
        host,
        shim_binary,
        iptables,
        coord,
        peers,
        cgroups,
        tree,
    });
    let mut found = scan_shims(&ctx.host.shim_dir()).await;
    let mut daemon = Daemon {
        ctx: ctx.clone(),
        services: BTreeMap::new(),
        retiring: BTreeMap::new(),
        shutdown: None,
    };
    // A shutdown an earlier daemon of this boot began and did not finish is finished, not undone.
    let intent_path = intent::path(&ctx.host.data_dir);
    let pending = {
        let path = intent_path.clone();
        let found = tokio::task::spawn_blocking(move || intent::read(&path, &intent::boot_id()))
            .await
            .expect("reading the intent does not panic");
        match found {
            intent::Found::None => None,
            intent::Found::Pending(intent) => {
                tracing::warn!(
                    path = %intent_path.display(),
                    "an earlier daemon was shutting the host down: finishing that shutdown (stopping what runs, starting nothing), then exiting"
                );
                Some(intent)
            }
            intent::Found::Stale { why, aside } => {
                tracing::warn!(
                    path = %intent_path.display(),
                    aside = %aside.display(),
                    "ignoring a shutdown intent ({why}); starting ordinarily"
                );
                None
            }
        }
    };
    let startup = if pending.is_some() {
        service::Startup::ForShutdown
    } else {
        service::Startup::Ordinary
    };

    // Shims of services that are no longer configured are stopped; the rest are adopted.
    let orphans: Vec<String> = found
        .keys()
        .filter(|name| !services.contains_key(*name))
        .cloned()
        .collect();
    for name in orphans {
        let shims = found.remove(&name).expect("listed above");
        for (index, _) in shims {
            let paths = ShimPaths::new(&ctx.host.shim_dir(), &name, index);
            tracing::warn!(service = %name, index, "stopping an instance of a service that is no longer configured");
            tokio::spawn(stop_orphan(paths));
        }
    }
    let order = config::start_order(&services)
        .map_err(|cycle| anyhow::anyhow!("`after` forms a cycle through {}", cycle.join(", ")))?;
    for name in order {
        let config = services[&name].clone();
        // Finishing a shutdown starts nothing, so nothing is waited for.
        let waited_for = startup == service::Startup::Ordinary
            && services.values().any(|s| s.after.contains(&name));
        let handle = service::spawn_with(
            ctx.clone(),
            name.clone(),
            config.clone(),
            found.remove(&name).unwrap_or_default(),
            None,
            startup,
        );
        if waited_for {
            let settled =
                tokio::time::timeout(Duration::from_millis(SETTLE_TIMEOUT_MS), handle.settled());
            if settled.await.is_err() {
                tracing::warn!(service = %name, "still starting after {SETTLE_TIMEOUT_MS} ms; starting the services after it anyway");
            }
        }
        daemon.services.insert(
            name,
            Entry {
                file: config.clone(),
                config,
                node: None,
                handle,
            },
        );
    }

    let (requests_tx, mut requests) = mpsc::channel(REQUEST_QUEUE);
    let (stop_api, api_stopped) = oneshot::channel::<()>();
    let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
    let metrics_server = metrics_listener.map(|listener| {
        tracing::info!(listen = ?listener.local_addr().ok(), "metrics listener up");
        tokio::spawn(crate::metrics::serve_tcp(
            listener,
            requests_tx.clone(),
            async {
                let _ = metrics_stopped.await;
            },
        ))
    });
    let server = tokio::spawn(server::serve(listener, requests_tx, async {
        let _ = api_stopped.await;
    }));
    let mut signals = Signals::new()?;
    let watchdog = notify::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    match &pending {
        None => {
            notify::ready(&format!("supervising {} service(s)", daemon.services.len()));
            tracing::info!(services = daemon.services.len(), "sluice is running");
        }
        Some(intent) => {
            notify::ready("finishing a shutdown an earlier daemon began");
            daemon.begin_shutdown(intent.requested_ms, None);
        }
    }
    tokio::pin!(shutdown);

    let exit = loop {
        tokio::select! {
            Some(request) = requests.recv() => {
                if let Some(exit) = daemon.on_request(request).await {
                    break exit;
                }
            }
            signal = signals.next() => match signal {
                SignalKind::Stop => break Exit::Detached,
                SignalKind::Reload if daemon.shutdown.is_some() => {
                    tracing::warn!("SIGHUP ignored: the host is shutting down");
                }
                SignalKind::Reload => match daemon.reload().await {
                    Ok(summary) => tracing::info!("reloaded on SIGHUP: {summary}"),
                    Err(e) => tracing::error!("reload on SIGHUP refused: {e}"),
                },
            },
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify::watchdog(),
            Some(event) = next_coord_event(&mut coord_events) => daemon.on_coord(event).await,
            end = shutdown_end(&mut daemon.shutdown) => {
                if let Some(exit) = daemon.on_shutdown_end(end, &intent_path).await {
                    break exit;
                }
            }
            () = &mut shutdown => break Exit::Detached,
        }
    };
    if exit == Exit::Detached && daemon.shutdown.is_some() {
        tracing::warn!(
            path = %intent_path.display(),
            "exiting in the middle of a shutdown: its intent stays, and the next daemon finishes it"
        );
    }
    notify::stopping();
    let _ = stop_api.send(());
    let _ = stop_metrics.send(());
    let _ = server.await;
    if let Some(metrics_server) = metrics_server {
        let _ = metrics_server.await;
    }
    match exit {
        Exit::Detached => tracing::info!("exiting; instances keep running"),
        Exit::ShutDown => tracing::info!("every instance stopped; exiting"),
    }
    Ok(exit)
}

impl Daemon {
    /// Handles one request; returns how the daemon ends when the request ends it.
    async fn on_request(&mut self, request: Request) -> Option<Exit> {
        match request {
            Request::Status { service, reply } => {
                let handles: Vec<(String, ServiceHandle)> = match &service {
                    Some(name) => match self.services.get(name) {
                        Some(entry) => vec![(name.clone(), entry.handle.clone())],
                        None => {
                            let _ = reply.send(Err(self.unknown(name)));
                            return None;
                        }
                    },
                    None => self
                        .services
                        .iter()
                        .map(|(n, e)| (n.clone(), e.handle.clone()))
                        .collect(),
                };
                let shutdown = self.shutdown.as_ref().map(|s| s.progress.clone());
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    for (name, handle) in handles {
                        match handle.status().await {
                            Some(status) => all.push(status),
                            // During a shutdown a stopped service's task has ended: its progress
                            // says so.
                            None if shutdown.is_some() => {}
                            None => {
                                let _ = reply.send(Err(control::Error::Failed(format!(
                                    "service {name} is gone"
                                ))));
                                return;
                            }
                        }
                    }
                    let shutdown = shutdown.map(|progress| {
                        let mut progress = progress.borrow().clone();
                        progress.instances_left = all
                            .iter()
                            .flat_map(|s| &s.instances)
                            .filter(|i| i.pid.is_some())
                            .map(|i| format!("{}/{} {}", i.service, i.index, i.state.as_str()))
                            .collect();
                        progress
                    });
                    let _ = reply.send(Ok(StatusDocument {
                        services: all,
                        shutdown,
                    }));
                });
            }
            Request::Control { reply, .. } if self.shutdown.is_some() => {
                let _ = reply.send(Err(Self::shutting_down()));
            }
            Request::Reload { reply } if self.shutdown.is_some() => {
                let _ = reply.send(Err(Self::shutting_down()));
            }
            Request::Local { reply, .. } if self.shutdown.is_some() => {
                let _ = reply.send(Err(Self::shutting_down()));
            }
            Request::Control {
                service,
                index,
                order,
                reply,
            } => match self.services.get(&service) {
                Some(entry) => {
                    let handle = entry.handle.clone();
                    let action = action_of(order);
                    tokio::spawn(async move {
                        // The service task refuses in its current state: a conflict.
                        let answer = handle.control(action, index).await;
                        let _ = reply.send(answer.map_err(control::Error::Conflict));
                    });
                }
                None => {
                    let _ = reply.send(Err(self.unknown(&service)));
                }
            },
            Request::Reload { reply } => {
                let _ = reply.send(self.reload().await);
            }
            Request::Local {
                service,
                verb,
                reply,
            } => match self.services.get(&service) {
                Some(entry) => {
                    let handle = entry.handle.clone();
                    let verb = local_verb_of(verb);
                    tokio::spawn(async move {
                        let answer = handle.local(verb).await;
                        let _ = reply.send(answer.map_err(control::Error::Conflict));
                    });
                }
                None => {
                    let _ = reply.send(Err(self.unknown(&service)));
                }
            },
            Request::LogPath {
                service,
                index,
                stderr,
                reply,
            } => {
                let _ = reply.send(self.log_path(&service, index, stderr));
            }
            Request::Metrics { openmetrics, reply } => {
                // The gauges come from the status every service answers, gathered as for
                // `GET /v1/status`.
                let (tx, rx) = oneshot::channel();
                Box::pin(self.on_request(Request::Status {
                    service: None,
                    reply: tx,
                }))
                .await;
                let metrics = self.ctx.metrics.clone();
                tokio::spawn(async move {
                    let answer = match rx.await {
                        Ok(Ok(status)) => Ok(metrics.encode(&status, openmetrics)),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(control::Error::Failed(
                            "the status of the services did not come".to_owned(),
                        )),
                    };
                    let _ = reply.send(answer);
                });
            }
            Request::Shutdown { reply } => match &mut self.shutdown {
                // One shutdown at a time; a second caller waits for the same end.
                Some(shutdown) if shutdown.waiters.len() >= SHUTDOWN_WAITERS_MAX => {
                    let _ = reply.send(Err(control::Error::Conflict(format!(
                        "{SHUTDOWN_WAITERS_MAX} callers already wait for the shutdown in progress"
                    ))));
                }
                Some(shutdown) => shutdown.waiters.push(reply),
                None => {
                    let intent = intent::Intent {
                        boot_id: intent::boot_id(),
                        requested_ms: wall_ms(),
                    };
                    self.begin_shutdown(intent.requested_ms, Some(intent));
                    if let Some(shutdown) = &mut self.shutdown {
                        shutdown.waiters.push(reply);
                    }
                }
            },
        }
        None
    }

    fn shutting_down() -> control::Error {
        control::Error::Conflict(
            "the host is shutting down (`sluice status` shows its progress)".into(),
        )
    }

    /// Begins the host shutdown as a task: it writes `intent` (when given; a daemon finishing an
    /// earlier daemon's shutdown finds it written) and only then tells every service that nothing
    /// starts any more, and stops them, in the reverse of start order, each completely before the
    /// next. The loop goes on answering status (with the progress) and pinging the watchdog.
    fn begin_shutdown(&mut self, requested_ms: u64, intent: Option<intent::Intent>) {
        let services: Services = self
            .services
            .iter()
            .map(|(n, e)| (n.clone(), e.config.clone()))
            .collect();
        let mut order =
            config::start_order(&services).unwrap_or_else(|_| services.keys().cloned().collect());
        order.reverse();
        let handles: Vec<(String, ServiceHandle)> = order
            .iter()
            .filter_map(|name| Some((name.clone(), self.services.get(name)?.handle.clone())))
            .collect();
        // Services a reload removed are stopping on their own; every instance is stopped only
        // once they have ended too.
        let retiring: Vec<ServiceHandle> =
            std::mem::take(&mut self.retiring).into_values().collect();
        let (progress_tx, progress) = watch::channel(ShutdownStatus {
            requested_ms,
            resumed: intent.is_none(),
            pending: order,
            ..ShutdownStatus::default()
        });
        let (done_tx, done) = oneshot::channel();
        let path = intent::path(&self.ctx.host.data_dir);
        notify::status("shutting down: stopping every instance");
        tracing::info!("host shutdown: stopping every instance");
        tokio::spawn(async move {
            if let Some(intent) = intent {
                // Persist before act: nothing is stopped unless the intent is on disk.
                let written = tokio::task::spawn_blocking(move || intent::write(&path, &intent))
                    .await
                    .unwrap_or_else(|e| Err(format!("writing the shutdown intent: {e}")));
                if let Err(e) = written {
                    let _ = done_tx.send(Err(e));
                    return;
                }
            }
            for (_, handle) in &handles {
                handle.shutting_down().await;
            }
            for (name, handle) in handles {
                progress_tx.send_modify(|p| {
                    p.pending.retain(|n| *n != name);
                    p.stopping = Some(name.clone());
                });
                notify::status(&format!("shutting down: stopping {name}"));
                tracing::info!(service = %name, "stopping every instance");
                handle.stop_all(false).await;
                progress_tx.send_modify(|p| {
                    p.stopping = None;
                    p.stopped.push(name.clone());
                });
            }
            for handle in retiring {
                handle.closed().await;
            }
            let _ = done_tx.send(Ok(()));
        });
        self.shutdown = Some(Shutdown {
            progress,
            waiters: Vec::new(),
            done,
        });
    }

    /// The shutdown's task ended: once every service stopped, the intent is cleared (so the next
    /// start is ordinary), the callers are answered, and the daemon exits; when the intent could
    /// not be written, nothing was stopped and the daemon goes on as before.
    async fn on_shutdown_end(&mut self, end: ShutdownEnd, path: &Path) -> Option<Exit> {
        let shutdown = self.shutdown.take()?;
        match end {
            ShutdownEnd::NotBegun(e) => {
                tracing::error!("shutdown refused, nothing was stopped: {e}");
                notify::status(&format!("supervising {} service(s)", self.services.len()));
                for reply in shutdown.waiters {
                    let _ = reply.send(Err(control::Error::Failed(format!(
                        "nothing was stopped: {e}"
                    ))));
                }
                // The services were never told: the intent's write comes first.
                None
            }
            ShutdownEnd::Stopped => {
                let path = path.to_owned();
                let cleared = tokio::task::spawn_blocking(move || intent::clear(&path))
                    .await
                    .unwrap_or_else(|e| Err(format!("clearing the shutdown intent: {e}")));
                if let Err(e) = &cleared {
                    tracing::error!("{e}");
                }
                for reply in shutdown.waiters {
                    let _ = reply.send(match &cleared {
                        Ok(()) => Ok("every instance stopped".to_owned()),
                        Err(e) => Err(control::Error::Failed(format!(
                            "every instance stopped, but {e}: remove it before the next start, which would otherwise finish this shutdown again"
                        ))),
                    });
                }
                Some(Exit::ShutDown)
            }
        }
    }

    fn unknown(&self, name: &str) -> control::Error {
        control::Error::NoSuchService {
            name: name.to_owned(),
            known: self.services.keys().cloned().collect(),
        }
    }

    fn log_path(&self, service: &str, index: u32, stderr: bool) -> Result<PathBuf, control::Error> {
        let entry = self
            .services
            .get(service)
            .ok_or_else(|| self.unknown(service))?;
        if index >= entry.config.instances {
            return Err(control::Error::NoSuchInstance {
                service: service.to_owned(),
                index,
                count: entry.config.instances,
            });
        }
        let dir = entry
            .config
            .log
            .dir
            .clone()
            .unwrap_or_else(|| self.ctx.host.data_dir.join("logs"));
        let stream = if stderr { "stderr" } else { "stdout" };
        Ok(dir.join(format!("{service}-{index}.{stream}.log")))
    }

    /// Re-reads the service files and applies only the difference. A bad file changes nothing.
    async fn reload(&mut self) -> Result<String, control::Error> {
        let services = config::load_services(&self.ctx.host.services_dir)
            .map_err(|e| control::Error::InvalidConfig(e.to_string()))?;
        crate::service::spec::check_identities(&self.ctx.host, &services)
            .map_err(control::Error::InvalidConfig)?;
        let mut summary = Vec::new();
        let removed: Vec<String> = self
            .services
            .keys()
            .filter(|name| !services.contains_key(*name))
            .cloned()
            .collect();
        self.retiring.retain(|_, handle| !handle.is_closed());
        for name in removed {
            let entry = self.services.remove(&name).expect("listed above");
            summary.push(format!("{name}: removed"));
            // Kept until it has ended; a task added back under the name waits for it (and a
            // predecessor it waits for itself is waited for through it).
            self.retiring.insert(name, entry.handle.clone());
            tokio::spawn(async move { entry.handle.stop_all(true).await });
        }
        for (name, file_config) in services {
            match self.services.get_mut(&name) {
                Some(entry) => {
                    // The config node's keys are applied again onto the new file. Should they no
                    // longer fit it, the file is what the local operator just asked for.
                    entry.file = file_config.clone();
                    let config = match &entry.node {
                        None => file_config,
                        Some(node) => {
                            match Self::apply_node_to(&self.ctx.host, &name, &file_config, node) {
                                Ok(config) => {
                                    entry.handle.config_error(None).await;
                                    config
                                }
                                Err(message) => {
                                    tracing::error!("{message}");
                                    entry.handle.config_error(Some(message)).await;
                                    file_config
                                }
                            }
                        }
                    };
                    if let Some(message) = entry.handle.recheck_state().await {
                        summary.push(message);
                    }
                    if entry.config != config {
                        entry.config = config.clone();
                        let changed = entry.handle.reconfigure(config).await;
                        summary.push(changed.map_err(control::Error::Conflict)?);
                    }
                }
                None => {
                    let previous = self.retiring.remove(&name);
                    let waits = previous.is_some();
                    let handle = service::spawn(
                        self.ctx.clone(),
                        name.clone(),
                        file_config.clone(),
                        Vec::new(),
                        previous,
                    );
                    summary.push(if waits {
                        format!("{name}: added (starts once its removed predecessor has stopped)")
                    } else {
                        format!("{name}: added")
                    });
                    self.services.insert(
                        name,
                        Entry {
                            file: file_config.clone(),
                            config: file_config,
                            node: None,
                            handle,
                        },
                    );
                }
            }
        }
        if let Some(zk) = &self.ctx.coord {
            zk.set_services(self.services.keys().cloned().collect())
                .await;
        }
        if let Some(peers) = &self.ctx.peers {
            peers.set_services(self.services.keys().cloned().collect());
        }
        if summary.is_empty() {
            summary.push("nothing changed".into());
        }
        notify::status(&format!("supervising {} service(s)", self.services.len()));
        Ok(summary.join("; "))
    }

    /// What ZooKeeper said: a service's desired build, role, configuration node; the session.
    async fn on_coord(&mut self, event: crate::coord::CoordEvent) {
        use crate::coord::CoordEvent;
        match event {
            // A shutting-down host takes no new configuration or build.
            CoordEvent::Service { .. } if self.shutdown.is_some() => {}
            CoordEvent::Service { name, view } => {
                let Some(entry) = self.services.get_mut(&name) else {
                    return;
                };
                let node = view.config.clone();
                let config = match &node {
                    None => Ok(entry.file.clone()),
                    Some(text) => Self::apply_node_to(&self.ctx.host, &name, &entry.file, text),
                };
                match config {
                    Ok(config) => {
                        entry.handle.config_error(None).await;
                        entry.node = node;
                        if entry.config != config {
                            entry.config = config.clone();
                            match entry.handle.reconfigure(config).await {
                                Ok(summary) => tracing::info!("config node of {name}: {summary}"),
                                Err(e) => tracing::error!("config node of {name}: {e}"),
                            }
                        }
                    }
                    Err(message) => {
                        // Refused whole: the last good configuration (and the node it came
                        // from, for the next reload) stays.
                        tracing::error!("{message}");
                        entry.handle.config_error(Some(message)).await;
                    }
                }
                entry
                    .handle
                    .slot_error(view.max_hosts_restarting.clone().err())
                    .await;
                entry
                    .handle
                    .canary_view(
                        view.enabled.clone(),
                        view.canary.clone(),
                        view.role == crate::coord::Role::Canary,
                    )
                    .await;
                entry
                    .handle
                    .desired(view.desired_build().map(str::to_owned))
                    .await;
            }
            CoordEvent::Connected => {
                self.ctx
                    .metrics
                    .session(crate::metrics::SessionState::Connected);
                tracing::info!("zookeeper session is up");
                for entry in self.services.values() {
                    entry.handle.connection(true).await;
                }
                self.check_acls();
            }
            CoordEvent::Disconnected | CoordEvent::Expired => {
                self.ctx
                    .metrics
                    .session(crate::metrics::SessionState::Disconnected);
                if event == CoordEvent::Expired {
                    self.ctx.metrics.session_expired();
                }
                tracing::warn!("zookeeper is away; serving instances are left alone");
                for entry in self.services.values() {
                    entry.handle.connection(false).await;
                }
            }
        }
    }

    /// With a digest, every (re)connect reads the ACLs of the nodes each service obeys and
    /// reports in its status the ones that anyone may write. Without one they all are, which
    /// `run` says once at start-up.
    fn check_acls(&self) {
        let Some(zk) = self.ctx.coord.clone() else {
            return;
        };
        if self.ctx.host.coordination.digest_file.is_none() {
            return;
        }
        for (name, entry) in &self.services {
            let (zk, name, handle) = (zk.clone(), name.clone(), entry.handle.clone());
            tokio::spawn(async move {
                match zk.world_writable(&name).await {
                    Ok(nodes) => {
                        if !nodes.is_empty() {
                            tracing::warn!(
                                service = %name,
                                "zookeeper nodes that anyone may write steer this service: {}",
                                nodes.join(", ")
                            );
                        }
                        handle.world_writable(nodes).await;
                    }
                    Err(e) => tracing::warn!(service = %name, "reading zookeeper acls: {e}"),
                }
            });
        }
    }

    /// The service file with a config node applied, checked like a file (identity included); the
    /// error names the node and says that the last good configuration keeps running.
    fn apply_node_to(
        host: &HostConfig,
        name: &str,
        file: &ServiceConfig,
        node: &str,
    ) -> Result<ServiceConfig, String> {
        file.with_config_node(node, &host.coordination.config_node_keys)
            .and_then(|config| {
                crate::service::spec::identity(host, name, &config)?;
                Ok(config)
            })
            .map_err(|e| {
                format!(
                    "/services/{name}/config is refused, the last good configuration keeps running: {e}"
                )
            })
    }
}

/// The end of the shutdown in progress, or never without one.
async fn shutdown_end(shutdown: &mut Option<Shutdown>) -> ShutdownEnd {
    let Some(shutdown) = shutdown else {
        return std::future::pending().await;
    };
    match (&mut shutdown.done).await {
        Ok(Ok(())) => ShutdownEnd::Stopped,
        Ok(Err(e)) => ShutdownEnd::NotBegun(e),
        Err(_) => panic!("the shutdown's task ended without saying how"),
    }
}

/// Wall time, milliseconds since the Unix epoch: for display only.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The next coordination event, or never without a coordination backend.
async fn next_coord_event(
    events: &mut Option<mpsc::Receiver<crate::coord::CoordEvent>>,
) -> Option<crate::coord::CoordEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The service task's action for a control order.
fn action_of(order: Order) -> Action {
    match order {
        Order::Start => Action::Start,
        Order::Stop => Action::Stop,
        Order::Restart => Action::Restart,
        Order::Drain => Action::Drain,
        Order::Enable => Action::Enable,
        Order::Signal(signal) => Action::Signal(signal),
    }
}

/// The service task's deploy verb for a local deploy request.
fn local_verb_of(verb: LocalVerb) -> service::LocalVerb {
    match verb {
        LocalVerb::Deploy { build, canary } => service::LocalVerb::Deploy { build, canary },
        LocalVerb::Promote => service::LocalVerb::Promote,
        LocalVerb::Rollback => service::LocalVerb::Rollback,
    }
}

/// Reads `user:password` for ZooKeeper's digest authentication.
/// Refuses a digest file that anyone but its owner may read, or that the daemon's user does not
/// own (root, under systemd): the password in it is write access to the whole fleet.
pub fn check_digest_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("the digest file {}: {e}", path.display()))?;
    let owner = nix::unistd::geteuid().as_raw();
    if meta.uid() != owner {
        return Err(format!(
            "the digest file {} is owned by uid {}, not by uid {owner} that runs sluice: it would let that user write the fleet's zookeeper nodes",
            path.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "the digest file {} has mode {mode:04o}: others may read its password; make it 0600 (`chmod 600 {}`)",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

pub fn read_digest(path: &Path) -> anyhow::Result<(String, String)> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the digest file {}", path.display()))?;
    let (user, password) = text
        .trim()
        .split_once(':')
        .with_context(|| format!("{}: expected `user:password`", path.display()))?;
    Ok((user.to_owned(), password.to_owned()))
}

/// Finds every shim socket left in `dir` and asks it how its instance is, by service.
/// A socket whose shim is gone is removed.
async fn scan_shims(dir: &Path) -> BTreeMap<String, Vec<(u32, Status)>> {
    let mut found: BTreeMap<String, Vec<(u32, Status)>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((service, index)) = name.to_str().and_then(ShimPaths::parse_socket_name) else {
            continue;
        };
        let paths = ShimPaths::new(dir, &service, index);
        match shim::status(&paths.socket).await {
            Ok(status) => found.entry(service).or_default().push((index, status)),
            Err(e) => {
                if shim::lock_is_free(&paths.lock) {
                    tracing::info!(socket = %paths.socket.display(), "removing the socket of a shim that is gone");
                    let _ = std::fs::remove_file(&paths.socket);
                } else {
                    // Alive but not answering: a start-up in progress. The service task
                    // meets it again when it spawns (the shim answers `busy`) and adopts it.
                    tracing::warn!(socket = %paths.socket.display(), "shim not answering: {e}");
                }
            }
        }
    }
    found
}

/// Stops the instance of a service that left the configuration while no daemon ran.
async fn stop_orphan(paths: ShimPaths) {
    if let Err(e) = shim::stop(&paths.socket, libc::SIGTERM, ORPHAN_STOP_GRACE_MS).await {
        tracing::warn!(socket = %paths.socket.display(), "stop: {e}");
    }
    if shim::wait(&paths.socket).await.is_ok() {
        let _ = shim::release(&paths.socket).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum SignalKind {
    Stop,
    Reload,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind as K, signal};
        Ok(Self {
            term: signal(K::terminate())?,
            int: signal(K::interrupt())?,
            hup: signal(K::hangup())?,
        })
    }

    async fn next(&mut self) -> SignalKind {
        tokio::select! {
            _ = self.term.recv() => SignalKind::Stop,
            _ = self.int.recv() => SignalKind::Stop,
            _ = self.hup.recv() => SignalKind::Reload,
        }
    }
}
