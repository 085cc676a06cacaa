//! The task that owns the ZooKeeper session of the daemon: connects and reconnects, keeps one
//! watcher task per service and one status writer per connection, and tells the daemon what
//! changed.
//!
//! Watches are one-shot and re-armed after every event (zookeeper-client 0.11.2 does not re-arm
//! persistent watches after a reconnect). ZooKeeper drops events that happen while a client is
//! disconnected, so after every (re)connect the watcher tasks and the status writer are replaced:
//! everything is read again and every status written again. A session expiry is terminal for a
//! client: the owner publishes no session, builds a new client, and re-sends every view.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use zookeeper_client::{Client, CreateMode, EventType, OneshotWatcher, SessionState};

use super::{
    AclSet, CoordError, CoordEvent, Published, RECONNECT_MAX_MS, RECONNECT_MIN_MS, RETRY_MAX_MS,
    ServiceView, Session, Shared, backoff, build_id, check_name, parse_limit, parse_role,
    service_path, status_path,
};

/// Bound of the queue of messages from the owner's helper tasks.
const INTERNAL_QUEUE: usize = 256;
/// How many session events (connected, disconnected, expired) wait for a busy daemon; older ones
/// are dropped first (the latest state is what matters).
const OUTBOX_SESSION_EVENTS_MAX: usize = 16;
/// First delay before retrying a failed read or write while the session is up.
const RETRY_MIN_MS: u64 = 100;
/// How many times one status write goes round (stale node of an old session, concurrent
/// delete, missing parent) before it is retried later.
const STATUS_WRITE_ATTEMPTS: usize = 4;
/// How many times one watched read goes round when the node appears or vanishes meanwhile.
const READ_ATTEMPTS: usize = 4;

/// What the [`super::Zk`] handle asks of the owner.
pub(super) enum Request {
    SetServices {
        services: Vec<String>,
        reply: oneshot::Sender<()>,
    },
}

/// What the owner's helper tasks report. Each carries the epoch of the session it ran in, so a
/// late message from a replaced task is recognised and dropped.
enum Internal {
    View {
        epoch: u64,
        service: String,
        view: ServiceView,
    },
    State {
        epoch: u64,
        state: SessionState,
    },
}

/// A spawned helper task that ends when its guard is dropped.
struct TaskGuard(JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Events for the daemon that it has not taken yet. Views are coalesced per service (only the
/// latest matters), session events are capped, so the owner never blocks on a slow daemon.
#[derive(Default)]
struct Outbox {
    queue: VecDeque<CoordEvent>,
}

impl Outbox {
    fn push(&mut self, event: CoordEvent) {
        match &event {
            CoordEvent::Service { name, .. } => {
                self.queue
                    .retain(|e| !matches!(e, CoordEvent::Service { name: n, .. } if n == name));
            }
            _ => {
                let sessions = self
                    .queue
                    .iter()
                    .filter(|e| !matches!(e, CoordEvent::Service { .. }))
                    .count();
                if sessions >= OUTBOX_SESSION_EVENTS_MAX
                    && let Some(i) = self
                        .queue
                        .iter()
                        .position(|e| !matches!(e, CoordEvent::Service { .. }))
                {
                    self.queue.remove(i);
                }
            }
        }
        self.queue.push_back(event);
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<Client, CoordError>> + Send>>;

/// The owner's state. Helper tasks hold clones of the session's client; the owner holds the
/// only long-lived one.
pub(super) struct Owner {
    shared: Arc<Shared>,
    services: BTreeSet<String>,
    /// The last view sent per service, to send only changes.
    sent: HashMap<String, ServiceView>,
    outbox: Outbox,
    events: mpsc::Sender<CoordEvent>,
    /// Set once the daemon dropped its receiver: events are then discarded.
    events_closed: bool,
    session: watch::Sender<Option<Session>>,
    statuses: watch::Receiver<BTreeMap<String, Published>>,
    /// Where the status writers record what ZooKeeper acknowledged.
    acked: Arc<watch::Sender<BTreeMap<String, u64>>>,
    /// Builds this host serves to peers (see `peers`).
    peers: watch::Receiver<super::peers::PeerMap>,
    internal_tx: mpsc::Sender<Internal>,
    /// Taken by `run`, which selects on it while handlers borrow the owner.
    internal_rx: Option<mpsc::Receiver<Internal>>,
    epoch: u64,
    /// The current session's client, `None` while connecting.
    client: Option<Client>,
    /// Whether the current session is connected (not suspended).
    connected: bool,
    watchers: HashMap<String, TaskGuard>,
    status_writer: Option<TaskGuard>,
    peer_writer: Option<TaskGuard>,
    state_forwarder: Option<TaskGuard>,
}

impl Owner {
    pub(super) fn new(
        shared: Arc<Shared>,
        services: Vec<String>,
        events: mpsc::Sender<CoordEvent>,
        session: watch::Sender<Option<Session>>,
        statuses: watch::Receiver<BTreeMap<String, Published>>,
        acked: Arc<watch::Sender<BTreeMap<String, u64>>>,
        peers: watch::Receiver<super::peers::PeerMap>,
    ) -> Self {
        let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
        Owner {
            shared,
            services: valid_services(services),
            sent: HashMap::new(),
            outbox: Outbox::default(),
            events,
            events_closed: false,
            session,
            statuses,
            acked,
            peers,
            internal_tx,
            internal_rx: Some(internal_rx),
            epoch: 0,
            client: None,
            connected: false,
            watchers: HashMap::new(),
            status_writer: None,
            peer_writer: None,
            state_forwarder: None,
        }
    }

    /// Runs until every [`super::Zk`] handle is dropped, then closes the session.
    pub(super) async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut internal = self.internal_rx.take().expect("run once");
        let events = self.events.clone();
        let mut attempt: u32 = 0;
        let mut connecting: Option<Connecting> = Some(self.connect());
        let mut retry: Option<Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    None => break,
                    Some(request) => self.on_request(request),
                },
                Some(message) = internal.recv() => {
                    if let Some(lost) = self.on_internal(message) {
                        // The session is gone: reconnect after a jittered pause, so a fleet
                        // that lost it together does not come back at once.
                        tracing::warn!("zookeeper session lost ({lost}): making a new one");
                        retry = Some(Box::pin(tokio::time::sleep(backoff(0, RECONNECT_MIN_MS, RECONNECT_MAX_MS))));
                    }
                },
                result = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                    connecting = None;
                    match result {
                        Ok(client) => {
                            attempt = 0;
                            self.on_session(client);
                        }
                        Err(e) => {
                            let delay = backoff(attempt, RECONNECT_MIN_MS, RECONNECT_MAX_MS);
                            tracing::warn!("zookeeper: {e}; retrying in {} ms", delay.as_millis());
                            attempt = attempt.saturating_add(1);
                            retry = Some(Box::pin(tokio::time::sleep(delay)));
                        }
                    }
                },
                () = async { retry.as_mut().expect("guarded").await }, if retry.is_some() => {
                    retry = None;
                    connecting = Some(self.connect());
                },
                permit = events.reserve(), if !self.outbox.queue.is_empty() && !self.events_closed => match permit {
                    Ok(permit) => permit.send(self.outbox.queue.pop_front().expect("guarded")),
                    Err(_) => {
                        self.events_closed = true;
                        self.outbox.queue.clear();
                    }
                },
            }
        }
        // Drop every clone of the client, including the published one, so the session closes
        // now and its ephemerals (status, leases) go with it.
        self.drop_session();
    }

    fn connect(&self) -> Connecting {
        let shared = self.shared.clone();
        Box::pin(async move {
            let timeout = Duration::from_millis(shared.config.session_timeout_ms.max(1));
            super::open(
                &shared.config.connect,
                shared.config.digest.as_ref(),
                &shared.acl,
                timeout,
            )
            .await
        })
    }

    fn push(&mut self, event: CoordEvent) {
        if !self.events_closed {
            self.outbox.push(event);
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::SetServices { services, reply } => {
                self.services = valid_services(services);
                self.watchers.retain(|s, _| self.services.contains(s));
                self.sent.retain(|s, _| self.services.contains(s));
                if self.connected {
                    self.spawn_watchers();
                }
                let _ = reply.send(());
            }
        }
    }

    /// Handles a helper's report; returns why the session is lost when it is.
    fn on_internal(&mut self, message: Internal) -> Option<SessionState> {
        match message {
            Internal::View {
                epoch,
                service,
                view,
            } => {
                if epoch != self.epoch || !self.services.contains(&service) {
                    return None;
                }
                if self.sent.get(&service) != Some(&view) {
                    self.sent.insert(service.clone(), view.clone());
                    self.push(CoordEvent::Service {
                        name: service,
                        view,
                    });
                }
                None
            }
            Internal::State { epoch, state } => {
                if epoch != self.epoch || self.client.is_none() {
                    return None;
                }
                match state {
                    SessionState::Disconnected => {
                        tracing::info!("zookeeper connection lost: keeping the session");
                        self.connected = false;
                        self.push(CoordEvent::Disconnected);
                        None
                    }
                    SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                        tracing::info!("zookeeper connection back");
                        self.on_connected();
                        None
                    }
                    lost => {
                        self.drop_session();
                        // Views are re-sent after a new session even when unchanged: the daemon
                        // may have acted on the outage.
                        self.sent.clear();
                        self.push(CoordEvent::Expired);
                        Some(lost)
                    }
                }
            }
        }
    }

    /// A new session is up: publish it and start its helpers.
    fn on_session(&mut self, client: Client) {
        self.epoch += 1;
        tracing::info!(
            session = %client.session_id(),
            "zookeeper session established"
        );
        let state = client.state_watcher();
        let tx = self.internal_tx.clone();
        let epoch = self.epoch;
        self.state_forwarder = Some(TaskGuard(tokio::spawn(forward_states(epoch, state, tx))));
        self.session.send_replace(Some(Session {
            client: client.clone(),
            epoch,
        }));
        self.client = Some(client);
        self.on_connected();
    }

    /// The session is (again) connected: re-read everything, re-write every status.
    fn on_connected(&mut self) {
        self.connected = true;
        self.push(CoordEvent::Connected);
        self.watchers.clear();
        self.spawn_watchers();
        let Some(client) = self.client.clone() else {
            return;
        };
        let peers = super::peers::PeerWriter {
            client: client.clone(),
            host: self.shared.config.host.clone(),
            acl: self.shared.acl.clone(),
        };
        self.peer_writer = Some(TaskGuard(tokio::spawn(peers.run(self.peers.clone()))));
        let writer = StatusWriter {
            client,
            host: self.shared.config.host.clone(),
            acl: self.shared.acl.clone(),
            acked: self.acked.clone(),
        };
        self.status_writer = Some(TaskGuard(tokio::spawn(writer.run(self.statuses.clone()))));
    }

    /// Starts a watcher task for every service that has none.
    fn spawn_watchers(&mut self) {
        let Some(client) = &self.client else { return };
        for service in &self.services {
            if self.watchers.contains_key(service) {
                continue;
            }
            let watcher = ServiceWatcher {
                client: client.clone(),
                host: self.shared.config.host.clone(),
                service: service.clone(),
                epoch: self.epoch,
                tx: self.internal_tx.clone(),
            };
            self.watchers
                .insert(service.clone(), TaskGuard(tokio::spawn(watcher.run())));
        }
    }

    fn drop_session(&mut self) {
        self.connected = false;
        self.watchers.clear();
        self.status_writer = None;
        self.peer_writer = None;
        self.state_forwarder = None;
        self.client = None;
        self.session.send_replace(None);
    }
}

fn valid_services(services: Vec<String>) -> BTreeSet<String> {
    services
        .into_iter()
        .filter(|s| match check_name("service", s) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("not watching: {e}");
                false
            }
        })
        .collect()
}

/// Forwards the session's state changes to the owner until a terminal one.
async fn forward_states(
    epoch: u64,
    mut state: zookeeper_client::StateWatcher,
    tx: mpsc::Sender<Internal>,
) {
    // A change between the connect and the watcher's creation would otherwise go unseen.
    let now = state.peek_state();
    let suspended = now != SessionState::SyncConnected && now != SessionState::ConnectedReadOnly;
    if suspended
        && (tx
            .send(Internal::State { epoch, state: now })
            .await
            .is_err()
            || now.is_terminated())
    {
        return;
    }
    loop {
        let changed = state.changed().await;
        if tx
            .send(Internal::State {
                epoch,
                state: changed,
            })
            .await
            .is_err()
        {
            return;
        }
        // `changed` never returns after a terminal state: stop here.
        if changed.is_terminated() {
            return;
        }
    }
}

/// The nodes a service's view is made of, relative to `/services/<svc>`.
const VIEW_NODES: usize = 5;

/// Watches one service's view for one connection: reads the five nodes with one-shot watches,
/// and re-reads (and so re-arms) only the node whose watch fired.
struct ServiceWatcher {
    client: Client,
    host: String,
    service: String,
    epoch: u64,
    tx: mpsc::Sender<Internal>,
}

type Fired = Pin<Box<dyn Future<Output = (usize, zookeeper_client::WatchedEvent)> + Send>>;

impl ServiceWatcher {
    fn paths(&self) -> [String; VIEW_NODES] {
        let base = service_path(&self.service);
        [
            format!("{base}/enabled"),
            format!("{base}/enabled/canary"),
            format!("{base}/roles/{}", self.host),
            format!("{base}/config"),
            format!("{base}/restarting"),
        ]
    }

    async fn run(self) {
        let paths = self.paths();
        let mut data: [Option<Vec<u8>>; VIEW_NODES] = Default::default();
        let mut fired: FuturesUnordered<Fired> = FuturesUnordered::new();
        let mut stale: Vec<usize> = (0..VIEW_NODES).collect();
        let mut attempt: u32 = 0;
        loop {
            // Read (and watch) every stale node; the requests are pipelined.
            let reads = stale.iter().map(|&i| {
                let client = &self.client;
                let path = paths[i].as_str();
                async move { (i, read_watched(client, path).await) }
            });
            let results = futures_util::future::join_all(reads).await;
            let mut failed = Vec::new();
            for (i, result) in results {
                match result {
                    Ok((value, watcher)) => {
                        data[i] = value;
                        fired.push(Box::pin(async move { (i, watcher.changed().await) }));
                    }
                    Err(e) => {
                        tracing::warn!(service = %self.service, "reading {}: {e}", paths[i]);
                        failed.push(i);
                    }
                }
            }
            if failed.is_empty() {
                attempt = 0;
                let view = ServiceView {
                    enabled: build_id(data[0].clone()),
                    canary: build_id(data[1].clone()),
                    role: parse_role(data[2].as_deref()),
                    config: data[3]
                        .as_deref()
                        .map(|d| String::from_utf8_lossy(d).into_owned()),
                    max_hosts_restarting: parse_limit(&paths[4], data[4].as_deref()),
                };
                let message = Internal::View {
                    epoch: self.epoch,
                    service: self.service.clone(),
                    view,
                };
                if self.tx.send(message).await.is_err() {
                    return;
                }
                stale.clear();
            } else {
                // The owner replaces this task on reconnect; while the session is up, a failed
                // read (e.g. no read permission) is retried with backoff.
                tokio::time::sleep(backoff(attempt, RETRY_MIN_MS, RETRY_MAX_MS)).await;
                attempt = attempt.saturating_add(1);
                stale = failed;
                continue;
            }
            let Some((i, event)) = fired.next().await else {
                return;
            };
            if event.event_type == EventType::Session {
                // A terminal session state: the owner makes a new session and new watchers.
                return;
            }
            stale.push(i);
            // Take every other watch that fired meanwhile, so one view covers them all.
            while let Some(Some((j, event))) = futures_util::FutureExt::now_or_never(fired.next()) {
                if event.event_type == EventType::Session {
                    return;
                }
                stale.push(j);
            }
        }
    }
}

/// Reads a node and leaves a one-shot watch on it: a data watch when it exists, an existence
/// watch when it does not.
async fn read_watched(
    client: &Client,
    path: &str,
) -> Result<(Option<Vec<u8>>, OneshotWatcher), zookeeper_client::Error> {
    let mut last = zookeeper_client::Error::NoNode;
    for _ in 0..READ_ATTEMPTS {
        match client.get_and_watch_data(path).await {
            Ok((data, _, watcher)) => return Ok((Some(data), watcher)),
            Err(zookeeper_client::Error::NoNode) => {}
            Err(e) => return Err(e),
        }
        match client.check_and_watch_stat(path).await {
            Ok((None, watcher)) => return Ok((None, watcher)),
            // Created between the two reads: read it again.
            Ok((Some(_), _)) => last = zookeeper_client::Error::NodeExists,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Keeps this host's statuses in ZooKeeper for one connection: writes each status that differs
/// from what it last wrote, retries failed writes with backoff, and records the sequence number
/// of each status ZooKeeper acknowledged (one written, or equal to one written).
struct StatusWriter {
    client: Client,
    host: String,
    acl: AclSet,
    acked: Arc<watch::Sender<BTreeMap<String, u64>>>,
}

impl StatusWriter {
    async fn run(self, mut statuses: watch::Receiver<BTreeMap<String, Published>>) {
        let mut written: HashMap<String, serde_json::Value> = HashMap::new();
        let mut attempt: u32 = 0;
        loop {
            let snapshot = statuses.borrow_and_update().clone();
            let mut failed = false;
            for (service, Published { seq, value: status }) in snapshot {
                if written.get(&service) == Some(&status) {
                    self.ack(&service, seq);
                    continue;
                }
                match self.write(&service, &status).await {
                    Ok(()) => {
                        self.ack(&service, seq);
                        written.insert(service, status);
                    }
                    Err(e) => {
                        tracing::warn!(service = %service, "publishing the status: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                tokio::time::sleep(backoff(attempt, RETRY_MIN_MS, RETRY_MAX_MS)).await;
                attempt = attempt.saturating_add(1);
            } else {
                attempt = 0;
                if statuses.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    fn ack(&self, service: &str, seq: u64) {
        self.acked.send_if_modified(|acked| {
            let entry = acked.entry(service.to_owned()).or_insert(0);
            let newer = seq > *entry;
            *entry = (*entry).max(seq);
            newer
        });
    }

    /// Writes one status as an ephemeral node of this session. A node left by an expired
    /// session of this host (the server keeps it up to one session timeout) is replaced, not
    /// updated: updated, it would still vanish with the old session.
    async fn write(&self, service: &str, status: &serde_json::Value) -> Result<(), CoordError> {
        use zookeeper_client::Error as E;
        let path = status_path(service, &self.host);
        let data = serde_json::to_vec(status).expect("a json value serialises");
        let session = self.client.session_id().0;
        let mut last = E::NodeExists;
        for _ in 0..STATUS_WRITE_ATTEMPTS {
            match self.client.set_data(&path, &data, None).await {
                Ok(stat) if stat.ephemeral_owner == session => return Ok(()),
                Ok(stat) => {
                    tracing::info!(
                        "replacing {path}, left by session {:#x}",
                        stat.ephemeral_owner
                    );
                    match self.client.delete(&path, Some(stat.version)).await {
                        Ok(()) | Err(E::NoNode | E::BadVersion) => continue,
                        Err(e) => return Err(CoordError::zk("delete", &path, e)),
                    }
                }
                Err(E::NoNode) => {}
                Err(e) => return Err(CoordError::zk("write", &path, e)),
            }
            let options = self.acl.options(CreateMode::Ephemeral);
            match self.client.create(&path, &data, &options).await {
                Ok(_) => return Ok(()),
                Err(E::NodeExists) => last = E::NodeExists,
                Err(E::NoNode) => {
                    let parent = &path[..path.rfind('/').expect("absolute path")];
                    let options = self.acl.options(CreateMode::Persistent);
                    if let Err(e) = self.client.mkdir(parent, &options).await {
                        return Err(CoordError::zk("create", parent, e));
                    }
                }
                Err(e) => return Err(CoordError::zk("create", &path, e)),
            }
        }
        Err(CoordError::zk("write", &path, last))
    }
}

#[cfg(test)]
mod unit {
    use super::super::Role;
    use super::*;

    fn view(limit: u32) -> ServiceView {
        ServiceView {
            enabled: None,
            canary: None,
            role: Role::Prod,
            config: None,
            max_hosts_restarting: Ok(super::super::Limit::Hosts(limit)),
        }
    }

    #[test]
    fn outbox_coalesces_views_and_caps_session_events() {
        let mut outbox = Outbox::default();
        let service = |name: &str, limit| CoordEvent::Service {
            name: name.into(),
            view: view(limit),
        };
        outbox.push(service("a", 1));
        outbox.push(service("b", 1));
        outbox.push(service("a", 2));
        assert_eq!(
            outbox.queue.iter().cloned().collect::<Vec<_>>(),
            vec![service("b", 1), service("a", 2)]
        );
        for _ in 0..100 {
            outbox.push(CoordEvent::Disconnected);
            outbox.push(CoordEvent::Connected);
        }
        assert_eq!(outbox.queue.len(), 2 + OUTBOX_SESSION_EVENTS_MAX);
        assert_eq!(outbox.queue.back(), Some(&CoordEvent::Connected));
    }
}
