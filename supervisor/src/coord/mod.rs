//! The ZooKeeper coordination backend: this host's view of each service, its published status,
//! the fleet's restart slots (for the daemon) and the fleet verbs (for the `sluice` command).
//!
//! Layout under the chroot (default `/sluice`), a contract shared with every host and the CLI:
//!
//! | node | meaning |
//! | --- | --- |
//! | `/services/<svc>/config` | service configuration (JSON text) |
//! | `/services/<svc>/enabled` | build id every host should run (empty: none) |
//! | `/services/<svc>/enabled/canary` | build id canary hosts should run (empty: none) |
//! | `/services/<svc>/roles/<host>` | `canary` or `prod` (absent: prod) |
//! | `/services/<svc>/status/<host>` | ephemeral: the host's status (JSON) |
//! | `/services/<svc>/restarting` | data: `max_hosts_restarting`, `N` or `P%` of the hosts (absent/empty: 1); children: leases |
//! | `/services/<svc>/history` | JSON list of the builds `enabled` held, oldest first (last 20) |
//! | `/services/<svc>/canary/<build>/<host>` | persistent: a canary host's analysis of the build (JSON, as `canary` in its status) |
//! | `/builds/<svc>/<build>` | build metadata (JSON `{"url", "sha256", "size", "created"}`) |
//!
//! One task owns the ZooKeeper client ([`owner`]); [`Zk`] is a cheap handle that sends it
//! messages or borrows the current session from it. The restart-slot recipe is in [`slot`], the
//! CLI's short-lived client in [`fleet`].

mod canary;
mod fleet;
mod owner;
mod peers;
mod slot;
#[cfg(test)]
mod tests;
mod view;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha1::{Digest as _, Sha1};
use tokio::sync::{mpsc, oneshot, watch};
use zookeeper_client::{Acl, Acls, AuthId, Client, CreateMode, CreateOptions, Permission};

pub use fleet::Fleet;
pub use peers::{PEER_READS_MAX, PeerNode, PeerSeen, RackFetcher, StoreFetcher};
pub use slot::Slot;
pub use view::{FleetView, ViewWatch};

/// Chroot used when the connect string names none.
pub const DEFAULT_CHROOT: &str = "/sluice";
/// Default ZooKeeper session timeout; the server clamps it to its own bounds.
pub const DEFAULT_SESSION_TIMEOUT_MS: u64 = 10_000;
/// Bound of the queue of requests to the owner task: callers wait when it is full.
const REQUEST_QUEUE: usize = 64;
/// Bound of the channel of [`CoordEvent`]s to the daemon. The owner never blocks on it: pending
/// views are coalesced per service while the daemon is busy (see `owner::Outbox`).
const EVENT_QUEUE: usize = 64;
/// First delay before reconnecting after a failed connect or an expired session.
const RECONNECT_MIN_MS: u64 = 200;
/// Cap of the reconnect delay (capped exponential backoff with jitter).
const RECONNECT_MAX_MS: u64 = 10_000;
/// Cap of the delay between retries of a failed read or write while the session is up.
const RETRY_MAX_MS: u64 = 5_000;
/// How many builds `/services/<svc>/history` keeps.
const HISTORY_MAX: usize = 20;

/// How to reach ZooKeeper, and who this host is.
#[derive(Clone, Debug)]
pub struct ZkConfig {
    /// `host:port[,host:port...][/chroot]`; the chroot defaults to [`DEFAULT_CHROOT`].
    pub connect: String,
    /// This host's name in `roles/<host>`, `status/<host>` and lease names.
    pub host: String,
    /// Digest credentials (user, password): when set, every node sluice creates is writable only
    /// by this identity (and readable by anyone).
    pub digest: Option<(String, String)>,
    /// Requested session timeout; also bounds single operations of [`Zk::build_meta`].
    pub session_timeout_ms: u64,
}

/// A host's role in a service's rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Prod,
    Canary,
}

/// What ZooKeeper says about one service, for this host.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceView {
    /// Build every host should run (`enabled`; empty counts as unset).
    pub enabled: Option<String>,
    /// Build canary hosts should run (`enabled/canary`; empty counts as unset).
    pub canary: Option<String>,
    /// This host's role (`roles/<host>`; anything but `canary` is prod).
    pub role: Role,
    /// Raw JSON text of the `config` node, unvalidated: the daemon validates and reports.
    pub config: Option<String>,
    /// The data of `restarting` (absent or empty: 1), or why it is invalid (the node's path
    /// and its value, clipped): then no host is granted a slot.
    pub max_hosts_restarting: Result<Limit, String>,
}

impl ServiceView {
    /// The build this host should run: canary hosts take `canary` when set, else `enabled`.
    pub fn desired_build(&self) -> Option<&str> {
        match (&self.role, &self.canary) {
            (Role::Canary, Some(canary)) => Some(canary),
            _ => self.enabled.as_deref(),
        }
    }
}

/// What the owner task tells the daemon.
#[derive(Clone, Debug, PartialEq)]
pub enum CoordEvent {
    /// The view of a watched service changed (or was re-read after a new session).
    Service { name: String, view: ServiceView },
    /// A session is up (first connect, reconnect, or a new session after expiry).
    Connected,
    /// The connection is lost but the session may come back: keep serving.
    Disconnected,
    /// The session is lost; a new one is being made. Restart slots held are lost.
    Expired,
}

/// Metadata of one build, as stored in `/builds/<svc>/<build>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildMeta {
    pub url: String,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// Errors of ZooKeeper operations. Outages are not errors of the daemon's side: they become
/// [`CoordEvent`]s.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("zookeeper {op} of node {path} failed: {source}")]
    Zk {
        op: &'static str,
        path: String,
        #[source]
        source: zookeeper_client::Error,
    },
    #[error("cannot connect to zookeeper at {connect}: {source}")]
    Connect {
        connect: String,
        #[source]
        source: zookeeper_client::Error,
    },
    #[error("invalid zookeeper connect string {0:?}")]
    BadConnect(String),
    #[error("not connected to zookeeper")]
    NotConnected,
    #[error("zookeeper did not answer within {timeout_ms} ms on node {path}")]
    Timeout { path: String, timeout_ms: u64 },
    #[error("invalid {what} name {name:?}: must be non-empty, without '/' or control characters")]
    BadName { what: &'static str, name: String },
    #[error("build {build} of service {service} is not registered in /builds/{service}")]
    UnknownBuild { service: String, build: String },
    #[error("build {build} of service {service} is already registered with other metadata")]
    BuildExists { service: String, build: String },
    #[error("service {service} has no canary build in /services/{service}/enabled/canary")]
    NoCanary { service: String },
    #[error("service {service} has no earlier build in /services/{service}/history")]
    NoHistory { service: String },
    #[error("node {path} holds invalid data: {reason}")]
    BadData { path: String, reason: String },
    #[error("the zookeeper session ended ({state})")]
    SessionEnded { state: String },
}

impl CoordError {
    fn zk(op: &'static str, path: &str, source: zookeeper_client::Error) -> Self {
        CoordError::Zk {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// The daemon's handle; a task owns the client. Cheap to clone. The owner task ends (and closes
/// the session) when the last handle is dropped.
#[derive(Clone)]
pub struct Zk {
    requests: mpsc::Sender<owner::Request>,
    /// The current session, published by the owner (`None` while connecting).
    session: watch::Receiver<Option<Session>>,
    /// Statuses to publish, per service: the owner's status writer keeps them in ZooKeeper.
    statuses: Arc<watch::Sender<BTreeMap<String, Published>>>,
    /// Per service, the sequence number of the newest status ZooKeeper acknowledged (in any
    /// session): what a slot's release waits for.
    acked: Arc<watch::Sender<BTreeMap<String, u64>>>,
    /// Sequence numbers of published statuses: later publications get higher ones.
    next_status: Arc<std::sync::atomic::AtomicU64>,
    /// Builds this host serves to peers: the owner's peer writer keeps them in ZooKeeper.
    peers: Arc<watch::Sender<peers::PeerMap>>,
    shared: Arc<Shared>,
}

/// One status to publish, numbered so that an acknowledgement of a later one covers it.
#[derive(Clone, Debug, PartialEq)]
struct Published {
    seq: u64,
    value: serde_json::Value,
}

/// What never changes while a [`Zk`] lives.
struct Shared {
    config: ZkConfig,
    acl: AclSet,
}

/// One ZooKeeper session as published by the owner task.
#[derive(Clone)]
struct Session {
    /// Chrooted client of this session.
    client: Client,
    /// Counts sessions made by this owner, so a lease can tell whether its session is current.
    epoch: u64,
}

impl Zk {
    /// Starts the owner task: connects (retrying with capped exponential backoff and jitter,
    /// forever), reads the views of `services`, keeps them watched (one-shot watches re-armed
    /// after each event, a full re-read after every (re)connect), and sends a
    /// [`CoordEvent::Service`] whenever a view changes. Never blocks the caller; must be called
    /// within a tokio runtime.
    pub fn start(config: ZkConfig, services: Vec<String>) -> (Zk, mpsc::Receiver<CoordEvent>) {
        let (requests_tx, requests_rx) = mpsc::channel(REQUEST_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (session_tx, session_rx) = watch::channel(None);
        let (statuses_tx, _) = watch::channel(BTreeMap::new());
        let statuses = Arc::new(statuses_tx);
        let (acked_tx, _) = watch::channel(BTreeMap::new());
        let acked = Arc::new(acked_tx);
        let (peers_tx, _) = watch::channel(BTreeMap::new());
        let peers = Arc::new(peers_tx);
        let shared = Arc::new(Shared {
            acl: AclSet::new(config.digest.as_ref()),
            config,
        });
        let owner = owner::Owner::new(
            shared.clone(),
            services,
            events_tx,
            session_tx,
            statuses.subscribe(),
            acked.clone(),
            peers.subscribe(),
        );
        tokio::spawn(owner.run(requests_rx));
        let zk = Zk {
            requests: requests_tx,
            session: session_rx,
            statuses,
            acked,
            next_status: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            peers,
            shared,
        };
        (zk, events_rx)
    }

    /// Changes the watched set of services (after a reload). Services that stay keep their
    /// watches; new ones are read and sent at once.
    pub async fn set_services(&self, services: Vec<String>) {
        let (reply, done) = oneshot::channel();
        let request = owner::Request::SetServices { services, reply };
        if self.requests.send(request).await.is_ok() {
            let _ = done.await;
        }
    }

    /// This host's name in ZooKeeper.
    pub fn host(&self) -> &str {
        &self.shared.config.host
    }

    /// Publishes this host's status of `service` (ephemeral node). Returns at once: the owner's
    /// writer keeps the latest value in ZooKeeper, re-creating it after a session expiry.
    pub async fn set_status(&self, service: &str, status: serde_json::Value) {
        self.publish_status(service, status);
    }

    /// [`Zk::set_status`] without an await, so that statuses published one after the other reach
    /// the writer in that order. Returns the status's sequence number (0 for a service name that
    /// cannot be a node), which [`Slot::release_after`] waits for.
    pub fn publish_status(&self, service: &str, status: serde_json::Value) -> u64 {
        if let Err(e) = check_name("service", service) {
            tracing::warn!("not publishing a status: {e}");
            return 0;
        }
        let seq = self
            .next_status
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.statuses.send_modify(|statuses| {
            statuses.insert(service.to_owned(), Published { seq, value: status });
        });
        seq
    }

    /// Reads `/builds/<service>/<build>`; `None` when it does not exist.
    pub async fn build_meta(
        &self,
        service: &str,
        build: &str,
    ) -> Result<Option<BuildMeta>, CoordError> {
        check_name("service", service)?;
        check_name("build", build)?;
        let Some(session) = self.session.borrow().clone() else {
            return Err(CoordError::NotConnected);
        };
        let path = build_path(service, build);
        let timeout_ms = self.shared.config.session_timeout_ms.max(1);
        let read = session.client.get_data(&path);
        let data = match tokio::time::timeout(Duration::from_millis(timeout_ms), read).await {
            Err(_) => return Err(CoordError::Timeout { path, timeout_ms }),
            Ok(Err(zookeeper_client::Error::NoNode)) => return Ok(None),
            Ok(Err(e)) => return Err(CoordError::zk("read", &path, e)),
            Ok(Ok((data, _))) => data,
        };
        parse_build_meta(&path, &data).map(Some)
    }

    /// The nodes this host obeys for `service` (the service node, `config`, `enabled`,
    /// `enabled/canary`, `roles` and this host's role, `restarting`, `/builds` and
    /// `/builds/<service>`) whose ACL lets anyone write them, or create or delete their children,
    /// each with the permissions the world has. Nodes that do not exist are skipped.
    pub async fn world_writable(&self, service: &str) -> Result<Vec<String>, CoordError> {
        check_name("service", service)?;
        let Some(session) = self.session.borrow().clone() else {
            return Err(CoordError::NotConnected);
        };
        let base = service_path(service);
        let host = &self.shared.config.host;
        let paths = [
            base.clone(),
            format!("{base}/config"),
            format!("{base}/enabled"),
            format!("{base}/enabled/canary"),
            format!("{base}/roles"),
            format!("{base}/roles/{host}"),
            format!("{base}/restarting"),
            "/builds".to_owned(),
            format!("/builds/{service}"),
        ];
        let timeout_ms = self.shared.config.session_timeout_ms.max(1);
        let mut open = Vec::new();
        for path in paths {
            let read = session.client.get_acl(&path);
            let acls = match tokio::time::timeout(Duration::from_millis(timeout_ms), read).await {
                Err(_) => return Err(CoordError::Timeout { path, timeout_ms }),
                Ok(Err(zookeeper_client::Error::NoNode)) => continue,
                Ok(Err(e)) => return Err(CoordError::zk("read the acl", &path, e)),
                Ok(Ok((acls, _))) => acls,
            };
            let unsafe_perms = Permission::WRITE | Permission::CREATE | Permission::DELETE;
            let world = acls
                .iter()
                .filter(|a| a.scheme() == "world" && a.id() == "anyone")
                .map(|a| a.permission())
                .find(|p| (*p & unsafe_perms) != Permission::NONE);
            if let Some(perms) = world {
                open.push(format!("{path} (world: {perms})"));
            }
        }
        Ok(open)
    }

    /// Waits until this host holds one of the `max_hosts_restarting` restart slots of
    /// `service`. Cancel-safe: a lease made by a cancelled call is deleted. A host holds at
    /// most one lease per service: calling again while holding a slot returns another handle to
    /// the same lease (releasing either frees it). Waits while no session is up; a waiting lease
    /// lost with an expired session is made again in the new one.
    pub async fn acquire_slot(&self, service: &str) -> Result<Slot, CoordError> {
        slot::acquire(self, service).await
    }
}

/// The ACL sluice gives every node it creates.
#[derive(Clone, Debug)]
struct AclSet {
    /// Empty: open ACL (anyone may do anything).
    acls: Vec<Acl>,
}

impl AclSet {
    fn new(digest: Option<&(String, String)>) -> Self {
        let acls = match digest {
            None => Vec::new(),
            Some((user, password)) => vec![
                Acl::new(
                    Permission::ALL,
                    AuthId::new("digest", &digest_id(user, password)),
                ),
                Acl::new(Permission::READ, AuthId::anyone()),
            ],
        };
        AclSet { acls }
    }

    fn options(&self, mode: CreateMode) -> CreateOptions<'_> {
        if self.acls.is_empty() {
            mode.with_acls(Acls::anyone_all())
        } else {
            mode.with_acls(Acls::new(&self.acls))
        }
    }
}

/// ZooKeeper's digest id: `user:base64(sha1("user:password"))` (the client has no helper).
fn digest_id(user: &str, password: &str) -> String {
    let hash = Sha1::digest(format!("{user}:{password}").as_bytes());
    let encoded = base64::engine::general_purpose::STANDARD.encode(hash);
    format!("{user}:{encoded}")
}

/// A connect string split into the servers and the chroot (`None`: the root).
#[derive(Debug, PartialEq)]
struct ConnectString {
    servers: String,
    chroot: Option<String>,
}

fn parse_connect(connect: &str) -> Result<ConnectString, CoordError> {
    let connect = connect.trim();
    let (servers, chroot) = match connect.find('/') {
        None => (connect, DEFAULT_CHROOT),
        Some(i) => (&connect[..i], &connect[i..]),
    };
    let chroot = chroot.trim_end_matches('/');
    if servers.is_empty() || chroot.contains("//") {
        return Err(CoordError::BadConnect(connect.to_owned()));
    }
    Ok(ConnectString {
        servers: servers.to_owned(),
        chroot: (!chroot.is_empty()).then(|| chroot.to_owned()),
    })
}

/// Opens a session, authenticates, creates the chroot if it is missing and returns the client
/// rooted there.
async fn open(
    connect: &str,
    digest: Option<&(String, String)>,
    acl: &AclSet,
    session_timeout: Duration,
) -> Result<Client, CoordError> {
    let parsed = parse_connect(connect)?;
    // Fail eagerly: our own loop retries with backoff and jitter, so a fleet does not hammer a
    // recovering ensemble in lockstep.
    let mut connector = Client::connector()
        .with_session_timeout(session_timeout)
        .with_fail_eagerly();
    if let Some((user, password)) = digest {
        // Given to the connector, the auth is also replayed on every reconnect of the session.
        connector = connector.with_auth("digest", format!("{user}:{password}").as_bytes());
    }
    // The library gives up after about one session timeout; this bound is only a backstop.
    let bound = session_timeout * 2 + Duration::from_secs(1);
    let client = match tokio::time::timeout(bound, connector.connect(&parsed.servers)).await {
        Err(_) => {
            return Err(CoordError::Connect {
                connect: connect.to_owned(),
                source: zookeeper_client::Error::Timeout,
            });
        }
        Ok(Err(source)) => {
            return Err(CoordError::Connect {
                connect: connect.to_owned(),
                source,
            });
        }
        Ok(Ok(client)) => client,
    };
    let Some(chroot) = parsed.chroot else {
        return Ok(client);
    };
    client
        .mkdir(&chroot, &acl.options(CreateMode::Persistent))
        .await
        .map_err(|e| CoordError::zk("create", &chroot, e))?;
    client
        .chroot(chroot)
        .map_err(|_| CoordError::BadConnect(connect.to_owned()))
}

/// Refuses names that would escape their node (`/`), confuse ZooKeeper (`.`, `..`, control
/// characters) or be empty.
fn check_name(what: &'static str, name: &str) -> Result<(), CoordError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.chars().any(char::is_control);
    if bad {
        return Err(CoordError::BadName {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn service_path(service: &str) -> String {
    format!("/services/{service}")
}

fn build_path(service: &str, build: &str) -> String {
    format!("/builds/{service}/{build}")
}

fn status_path(service: &str, host: &str) -> String {
    format!("/services/{service}/status/{host}")
}

fn restarting_path(service: &str) -> String {
    format!("/services/{service}/restarting")
}

/// Runs every parser of ZooKeeper node data on `data`, as the fuzz targets (`fuzz/`) do: the
/// build metadata of `/builds/<svc>/<build>`, the build id of `enabled` and `enabled/canary`,
/// the limit of `restarting`, the role of `roles/<host>`, and a peer's status node read for its
/// `canary_sample` (with the Prometheus text reader of a canary's scrapes). Each must return,
/// never panic, whatever a ZooKeeper writer stored.
#[doc(hidden)]
pub fn parse_node_data_for_fuzzing(data: &[u8]) {
    crate::service::parse_canary_data_for_fuzzing(data);
    let _ = parse_build_meta("/builds/fuzz/b1", data);
    let _ = build_id(Some(data.to_vec()));
    let _ = parse_limit("/services/fuzz/restarting", Some(data));
    let _ = parse_role(Some(data));
}

fn parse_build_meta(path: &str, data: &[u8]) -> Result<BuildMeta, CoordError> {
    serde_json::from_slice(data).map_err(|e| CoordError::BadData {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Text of a node holding a build id: bytes that are not UTF-8 are passed through lossily, so
/// the daemon sees (and reports) an id that matches no build; empty means unset.
/// The history after `build` became `enabled`, from the history node's data: `build` appended
/// unless it is already last, the oldest dropped past [`HISTORY_MAX`]. A history that is not a
/// JSON list (hand-edited) starts over. Shared by `Fleet` (deploy, promote, rollback) and the
/// canary host's promotion.
fn next_history(mut history: Vec<String>, build: &str) -> Vec<u8> {
    if history.last().map(String::as_str) != Some(build) {
        history.push(build.to_owned());
    }
    let excess = history.len().saturating_sub(HISTORY_MAX);
    history.drain(..excess);
    serde_json::to_vec(&history).expect("a list of strings serialises")
}

/// The builds a history node holds; not a JSON list of strings (hand-edited): none.
fn parse_history(data: &[u8]) -> Vec<String> {
    serde_json::from_slice(data).unwrap_or_default()
}

fn build_id(data: Option<Vec<u8>>) -> Option<String> {
    data.filter(|d| !d.is_empty())
        .map(|d| String::from_utf8_lossy(&d).into_owned())
}

/// Largest `max_hosts_restarting` taken as meant: anything above is taken for a typing error
/// (a fleet never has this many hosts restarting on purpose).
pub const MAX_HOSTS_RESTARTING_MAX: u32 = 10_000;

/// How many hosts of a service may restart at once, as `restarting` holds it: a count (`3`) or a
/// percentage of the service's hosts (`10%`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Hosts(u32),
    /// Percent (1 to 100) of the hosts that publish a status node for the service, rounded down,
    /// at least one.
    Percent(u32),
}

impl Limit {
    /// The number of slots with `hosts` hosts in the fleet.
    pub fn slots(self, hosts: usize) -> u32 {
        match self {
            Limit::Hosts(n) => n,
            Limit::Percent(p) => {
                let slots = (hosts as u64).saturating_mul(u64::from(p)) / 100;
                slots.clamp(1, u64::from(MAX_HOSTS_RESTARTING_MAX)) as u32
            }
        }
    }

    /// Parses what `sluice limit` and the `restarting` node hold (surrounding space allowed).
    pub fn parse(text: &str) -> Option<Limit> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            return match percent.parse::<u64>() {
                Ok(p) if (1..=100).contains(&p) => Some(Limit::Percent(p as u32)),
                _ => None,
            };
        }
        match text.parse::<u64>() {
            Ok(n) if (1..=u64::from(MAX_HOSTS_RESTARTING_MAX)).contains(&n) => {
                Some(Limit::Hosts(n as u32))
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Hosts(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The restart limit from the data of `restarting`: absent or empty is 1; anything but a whole
/// number from 1 to [`MAX_HOSTS_RESTARTING_MAX`] or a percentage from 1% to 100% is an error
/// naming the value (clipped). No slot is granted while the limit is invalid: sluice does not
/// guess what was meant.
fn parse_limit(path: &str, data: Option<&[u8]>) -> Result<Limit, String> {
    let Some(data) = data else {
        return Ok(Limit::Hosts(1));
    };
    let text = String::from_utf8_lossy(data);
    let text = text.trim();
    if text.is_empty() {
        return Ok(Limit::Hosts(1));
    }
    Limit::parse(text).ok_or_else(|| {
        format!(
            "node {path} holds {:?}: max_hosts_restarting must be a whole number from 1 to \
             {MAX_HOSTS_RESTARTING_MAX} or a percentage of the hosts from 1% to 100%; no host \
             begins a restart until it is fixed (`sluice limit <svc> N|P%`)",
            crate::clip::clip(text)
        )
    })
}

fn parse_role(data: Option<&[u8]>) -> Role {
    match data.map(|d| String::from_utf8_lossy(d).trim().to_ascii_lowercase()) {
        Some(role) if role == "canary" => Role::Canary,
        _ => Role::Prod,
    }
}

/// Capped exponential backoff with "equal jitter": half the delay fixed, half random, so hosts
/// that lost ZooKeeper together do not come back in lockstep (its accept backlog is 50).
fn backoff(attempt: u32, min_ms: u64, max_ms: u64) -> Duration {
    let base_ms = min_ms.saturating_mul(1u64 << attempt.min(20)).min(max_ms);
    Duration::from_millis(base_ms / 2 + jitter_ms(base_ms / 2))
}

/// A random number in `0..=max_ms` (from `rand`'s thread-local generator, seeded by the OS), so
/// that it differs between hosts and attempts.
fn jitter_ms(max_ms: u64) -> u64 {
    rand::random_range(0..=max_ms)
}

/// Errors after which an operation may succeed once the session is back (or replaced).
fn is_transient(e: &zookeeper_client::Error) -> bool {
    use zookeeper_client::Error as E;
    matches!(
        e,
        E::ConnectionLoss | E::SessionExpired | E::ClientClosed | E::Timeout | E::SessionMoved
    )
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn connect_strings() {
        let cases = [
            ("h:1", "h:1", Some("/sluice")),
            ("h:1,g:2/x/y", "h:1,g:2", Some("/x/y")),
            ("h:1/x/", "h:1", Some("/x")),
            ("h:1/", "h:1", None),
        ];
        for (input, servers, chroot) in cases {
            let parsed = parse_connect(input).unwrap();
            assert_eq!(parsed.servers, servers, "{input}");
            assert_eq!(parsed.chroot.as_deref(), chroot, "{input}");
        }
        assert!(parse_connect("/x").is_err());
        assert!(parse_connect("h:1/a//b").is_err());
    }

    #[test]
    fn desired_build_follows_the_role() {
        let mut view = ServiceView {
            enabled: Some("b1".into()),
            canary: Some("b2".into()),
            role: Role::Prod,
            config: None,
            max_hosts_restarting: Ok(Limit::Hosts(1)),
        };
        assert_eq!(view.desired_build(), Some("b1"));
        view.role = Role::Canary;
        assert_eq!(view.desired_build(), Some("b2"));
        view.canary = None;
        assert_eq!(view.desired_build(), Some("b1"));
    }

    #[test]
    fn limits_roles_and_names() {
        let limit = |data| parse_limit("/services/web/restarting", data);
        assert_eq!(limit(None), Ok(Limit::Hosts(1)));
        assert_eq!(limit(Some(b"")), Ok(Limit::Hosts(1)));
        assert_eq!(limit(Some(b" 3\n")), Ok(Limit::Hosts(3)));
        assert_eq!(limit(Some(b"10000")), Ok(Limit::Hosts(10_000)));
        assert_eq!(limit(Some(b"10%")), Ok(Limit::Percent(10)));
        assert_eq!(limit(Some(b" 100% ")), Ok(Limit::Percent(100)));
        let bad: [&[u8]; 12] = [
            b"0",
            b"x",
            b"-1",
            b"1.5",
            b"10001",
            b"99999999999999999999999",
            b"\xff",
            b"0%",
            b"101%",
            b"%",
            b"10 %",
            b"2.5%",
        ];
        for data in bad {
            let e = limit(Some(data)).unwrap_err();
            assert!(
                e.contains("must be a whole number from 1 to 10000 or a percentage"),
                "{e}"
            );
        }
        assert!(
            limit(Some(b"0"))
                .unwrap_err()
                .starts_with("node /services/web/restarting holds \"0\":")
        );
        let long = vec![b'7'; 5000];
        assert!(limit(Some(&long)).unwrap_err().len() < 600, "clipped");
        // A percentage rounds down, and never to no slot at all.
        for (p, hosts, slots) in [
            (10, 100, 10),
            (10, 99, 9),
            (10, 5, 1),
            (10, 0, 1),
            (100, 7, 7),
        ] {
            assert_eq!(Limit::Percent(p).slots(hosts), slots, "{p}% of {hosts}");
        }
        assert_eq!(Limit::Hosts(3).slots(100), 3);
        assert_eq!(Limit::Percent(25).to_string(), "25%");
        assert_eq!(parse_role(Some(b"canary")), Role::Canary);
        assert_eq!(parse_role(Some(b"prod")), Role::Prod);
        assert_eq!(parse_role(None), Role::Prod);
        assert!(check_name("host", "h1").is_ok());
        assert!(check_name("host", "a/b").is_err());
        assert!(check_name("host", "").is_err());
        assert!(check_name("host", "..").is_err());
    }

    #[test]
    fn digest_ids_match_zookeeper() {
        // From ZooKeeper's DigestAuthenticationProvider: super:test.
        assert_eq!(
            digest_id("super", "test"),
            "super:D/InIHSb7yEEbrWz8b9l71RjZJU="
        );
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        for attempt in 0..40 {
            let d = backoff(attempt, RECONNECT_MIN_MS, RECONNECT_MAX_MS);
            assert!(d <= Duration::from_millis(RECONNECT_MAX_MS));
        }
        assert!(backoff(0, 200, 10_000) >= Duration::from_millis(100));
    }
}
