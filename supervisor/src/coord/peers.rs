//! Peers of a build in ZooKeeper: which hosts hold (or are fetching) a build and where they
//! serve it, and the elections of the hosts that fetch it from the store: one per rack, and among
//! those one for the whole fleet, so that the store serves one copy while the others stream it.
//!
//! | node | meaning |
//! | --- | --- |
//! | `/builds/<svc>/<build>/peers/<rack>/<host>` | ephemeral: [`PeerNode`] (address; complete, or still fetching and from which origin) |
//! | `/builds/<svc>/<build>/rack-fetcher/<rack>/n-<seq>` | ephemeral sequential, data the host name: the lowest is the host of the rack that fetches what no peer offers |
//! | `/builds/<svc>/<build>/store-fetcher/n-<seq>` | ephemeral sequential, data `<rack>/<host>`: the lowest is the one rack fetcher of the fleet that fetches from the store |
//!
//! An election is a directory of sequential candidates, not one node, so that opening it for
//! a holder that cannot be reached deletes that holder's node by its own name, which
//! ZooKeeper never gives again. (A single lock node made again has the same path and version
//! 0 again: two hosts opening the same election at once could each delete the other's new
//! hold, and both fetch from the store.)
//!
//! Registrations are desired state kept by a writer task per connection (like the status
//! writer): the daemon says what it serves, the writer makes ZooKeeper agree, again after every
//! reconnect or new session. A rack level (persistent) keeps a host's look-up to its own rack a
//! single `get_children`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use zookeeper_client::{Client, CreateMode};

use super::{AclSet, CoordError, RETRY_MAX_MS, Zk, backoff, build_path, check_name};

/// Most peer nodes whose data one [`Zk::peers_of`] reads, whatever the fleet's size: a host
/// needs a few sources, not the whole swarm.
pub const PEER_READS_MAX: usize = 24;
/// Largest peer node accepted, in bytes (an address and a flag).
const PEER_NODE_MAX_BYTES: usize = 512;
/// First delay before retrying a failed registration write.
const RETRY_MIN_MS: u64 = 100;

/// What a host publishes about one build it serves to peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    /// `ip:port` of its peer server.
    pub addr: String,
    /// Whether it holds the whole verified archive; `false` while it is still fetching (it
    /// serves what it has and ends the stream only once its own copy is verified).
    pub complete: bool,
    /// While still fetching: the host whose complete archive the bytes come from (directly or
    /// through other hosts still fetching); absent when they come from the store. A host that
    /// dropped that origin skips its relays, which would only pass the same bytes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// A peer as another host found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSeen {
    pub host: String,
    pub rack: String,
    pub node: PeerNode,
}

/// Key of a registration: (service, build).
pub(super) type PeerKey = (String, String);
/// Desired registrations: (service, build) → (rack, node).
pub(super) type PeerMap = BTreeMap<PeerKey, (String, PeerNode)>;

fn peers_path(service: &str, build: &str) -> String {
    format!("{}/peers", build_path(service, build))
}

fn peer_path(service: &str, build: &str, rack: &str, host: &str) -> String {
    format!("{}/{rack}/{host}", peers_path(service, build))
}

/// Prefix of an election's candidate nodes; ZooKeeper appends the sequence.
const CANDIDATE_PREFIX: &str = "n-";
/// Most candidates of one election read, whatever ZooKeeper holds.
const CANDIDATES_MAX: usize = 64;

fn fetching_path(service: &str, build: &str, rack: &str) -> String {
    format!("{}/rack-fetcher/{rack}", build_path(service, build))
}

pub(super) fn store_fetcher_path(service: &str, build: &str) -> String {
    format!("{}/store-fetcher", build_path(service, build))
}

/// The candidate nodes among an election's children, lowest sequence first, at most
/// [`CANDIDATES_MAX`].
fn candidates(children: &[String]) -> Vec<&str> {
    let mut ranked: Vec<(i64, &str)> = children
        .iter()
        .filter(|c| c.starts_with(CANDIDATE_PREFIX))
        .filter_map(|c| super::slot::sequence_of(c).map(|s| (s, c.as_str())))
        .collect();
    ranked.sort_unstable();
    ranked.truncate(CANDIDATES_MAX);
    ranked.into_iter().map(|(_, c)| c).collect()
}

/// An election's holder: its candidate node's path, data and owning session.
pub(super) struct Holder {
    path: String,
    data: Vec<u8>,
    owner: i64,
}

/// Who holds the fleet's store-fetcher election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreFetcher {
    /// This session: fetch from the store.
    Me,
    /// Another host, which registers as a peer of its rack as soon as its fetch begins.
    Other { rack: String, host: String },
    /// Another session holds it, but its node does not name a valid rack and host.
    Unnamed,
}

/// Who holds a rack's fetcher election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RackFetcher {
    /// This session.
    Me,
    /// Another session, holding the host its node names (`None`: not a valid host name).
    Other(Option<String>),
}

/// Checks the names that make up the paths of a build's peers and elections.
fn check_rack_names(service: &str, build: &str, rack: &str) -> Result<(), CoordError> {
    check_name("service", service)?;
    check_name("build", build)?;
    check_name("rack", rack)
}

/// Parses the store fetcher's node, `<rack>/<host>`, both valid names.
fn parse_store_fetcher(data: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(data).ok()?;
    let (rack, host) = text.split_once('/')?;
    check_name("rack", rack).ok()?;
    check_name("host", host).ok()?;
    Some((rack.to_owned(), host.to_owned()))
}

impl Zk {
    fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.shared.config.session_timeout_ms.max(1))
    }

    pub(super) fn client(&self) -> Result<Client, CoordError> {
        self.session
            .borrow()
            .as_ref()
            .map(|s| s.client.clone())
            .ok_or(CoordError::NotConnected)
    }

    async fn bounded<T>(
        &self,
        path: &str,
        op: impl std::future::Future<Output = T>,
    ) -> Result<T, CoordError> {
        let timeout = self.op_timeout();
        tokio::time::timeout(timeout, op)
            .await
            .map_err(|_| CoordError::Timeout {
                path: path.to_owned(),
                timeout_ms: timeout.as_millis() as u64,
            })
    }

    /// Publishes (`Some`) or withdraws (`None`) this host as a peer of `build` of `service` in
    /// `rack`. Returns at once; the owner's writer keeps ZooKeeper in step.
    pub fn set_peer(&self, service: &str, build: &str, rack: &str, node: Option<PeerNode>) {
        if let Err(e) = check_rack_names(service, build, rack) {
            tracing::warn!("not publishing a peer: {e}");
            return;
        }
        let key = (service.to_owned(), build.to_owned());
        self.peers.send_if_modified(|peers| match node {
            Some(node) => {
                let value = (rack.to_owned(), node);
                if peers.get(&key) == Some(&value) {
                    return false;
                }
                peers.insert(key, value);
                true
            }
            None => peers.remove(&key).is_some(),
        });
    }

    /// The peers of `build`, this host excluded: every registered peer of `rack` first, then
    /// those of the other racks, at most [`PEER_READS_MAX`] in all (racks and hosts in
    /// ZooKeeper's order, which callers shuffle). Nodes that do not parse are skipped.
    pub async fn peers_of(
        &self,
        service: &str,
        build: &str,
        rack: &str,
    ) -> Result<Vec<PeerSeen>, CoordError> {
        check_rack_names(service, build, rack)?;
        let client = self.client()?;
        let me = &self.shared.config.host;
        let base = peers_path(service, build);
        let racks = match self.bounded(&base, client.get_children(&base)).await? {
            Ok((racks, _)) => racks,
            Err(zookeeper_client::Error::NoNode) => return Ok(Vec::new()),
            Err(e) => return Err(CoordError::zk("list", &base, e)),
        };
        let mut ordered: Vec<&String> = racks.iter().filter(|r| *r == rack).collect();
        ordered.extend(racks.iter().filter(|r| *r != rack));
        let mut found = Vec::new();
        for r in ordered {
            if check_name("rack", r).is_err() {
                continue;
            }
            let dir = format!("{base}/{r}");
            let hosts = match self.bounded(&dir, client.get_children(&dir)).await? {
                Ok((hosts, _)) => hosts,
                Err(zookeeper_client::Error::NoNode) => continue,
                Err(e) => return Err(CoordError::zk("list", &dir, e)),
            };
            for host in hosts {
                if found.len() >= PEER_READS_MAX {
                    return Ok(found);
                }
                if &host == me || check_name("host", &host).is_err() {
                    continue;
                }
                let path = format!("{dir}/{host}");
                let data = match self.bounded(&path, client.get_data(&path)).await? {
                    Ok((data, _)) => data,
                    Err(zookeeper_client::Error::NoNode) => continue,
                    Err(e) => return Err(CoordError::zk("read", &path, e)),
                };
                if data.len() > PEER_NODE_MAX_BYTES {
                    continue;
                }
                let Ok(node) = serde_json::from_slice::<PeerNode>(&data) else {
                    continue;
                };
                // An origin that cannot be a host's name is a node that lies.
                if node
                    .origin
                    .as_deref()
                    .is_none_or(|o| check_name("host", o).is_ok())
                {
                    found.push(PeerSeen {
                        host,
                        rack: r.clone(),
                        node,
                    });
                }
            }
        }
        Ok(found)
    }

    /// Tries to become the host of `rack` that fetches what no peer offers (the election
    /// `rack-fetcher/<rack>`). [`RackFetcher::Me`] when this session holds it (won now or
    /// earlier), else the host its holder's node names.
    pub async fn try_fetch_lock(
        &self,
        service: &str,
        build: &str,
        rack: &str,
    ) -> Result<RackFetcher, CoordError> {
        check_rack_names(service, build, rack)?;
        let path = fetching_path(service, build, rack);
        let me = self.shared.config.host.clone();
        Ok(match self.try_lock(&path, me.as_bytes()).await? {
            None => RackFetcher::Me,
            Some(data) => RackFetcher::Other(
                std::str::from_utf8(&data)
                    .ok()
                    .filter(|h| check_name("host", h).is_ok())
                    .map(str::to_owned),
            ),
        })
    }

    /// Ends `host`'s hold on `rack`'s fetcher election when that host cannot be reached (its
    /// session may outlive it by `session_timeout_ms`): deletes the holder's node of
    /// `rack-fetcher/<rack>` if it names `host` and another session owns it. `Ok(true)` when
    /// the election is open now.
    pub async fn take_over_fetch_lock(
        &self,
        service: &str,
        build: &str,
        rack: &str,
        host: &str,
    ) -> Result<bool, CoordError> {
        check_rack_names(service, build, rack)?;
        check_name("host", host)?;
        self.take_over(&fetching_path(service, build, rack), host.as_bytes())
            .await
    }

    /// As [`Zk::take_over_fetch_lock`], for the fleet's `store-fetcher` held by `host` of `rack`.
    pub async fn take_over_store_fetcher(
        &self,
        service: &str,
        build: &str,
        rack: &str,
        host: &str,
    ) -> Result<bool, CoordError> {
        check_rack_names(service, build, rack)?;
        check_name("host", host)?;
        let holder = format!("{rack}/{host}");
        self.take_over(&store_fetcher_path(service, build), holder.as_bytes())
            .await
    }

    /// Deletes the holder's node of the election `dir` if its data is exactly `holder` and it
    /// is another session's. Its path is its own (sequential), so a hold won since by someone
    /// else is never touched.
    async fn take_over(&self, dir: &str, holder: &[u8]) -> Result<bool, CoordError> {
        let client = self.client()?;
        match self.holder(&client, dir).await? {
            Some(held) if held.data == holder && held.owner != client.session_id().0 => {
                self.unseat(&client, &held).await
            }
            Some(_) => Ok(false),
            None => Ok(true),
        }
    }

    /// Deletes the node `held` was read from: that hold ends, and no later one is touched.
    pub(super) async fn unseat(&self, client: &Client, held: &Holder) -> Result<bool, CoordError> {
        use zookeeper_client::Error as E;
        match self
            .bounded(&held.path, client.delete(&held.path, None))
            .await?
        {
            Ok(()) => {
                tracing::warn!(
                    path = held.path,
                    holder = %String::from_utf8_lossy(&held.data),
                    "opened an election held by a host that cannot be reached"
                );
                Ok(true)
            }
            Err(E::NoNode) => Ok(true),
            Err(e) => Err(CoordError::zk("delete", &held.path, e)),
        }
    }

    /// The holder of the election `dir`: its lowest candidate (`None`: no candidate, or
    /// holders came and went faster than three looks). A candidate deleted while we look is
    /// passed over.
    pub(super) async fn holder(
        &self,
        client: &Client,
        dir: &str,
    ) -> Result<Option<Holder>, CoordError> {
        use zookeeper_client::Error as E;
        for _ in 0..3 {
            let children = match self.bounded(dir, client.get_children(dir)).await? {
                Ok((children, _)) => children,
                Err(E::NoNode) => return Ok(None),
                Err(e) => return Err(CoordError::zk("list", dir, e)),
            };
            let Some(lowest) = candidates(&children).first().copied() else {
                return Ok(None);
            };
            let path = format!("{dir}/{lowest}");
            match self.bounded(&path, client.get_data(&path)).await? {
                Ok((mut data, stat)) => {
                    data.truncate(PEER_NODE_MAX_BYTES);
                    return Ok(Some(Holder {
                        path,
                        data,
                        owner: stat.ephemeral_owner,
                    }));
                }
                Err(E::NoNode) => continue,
                Err(e) => return Err(CoordError::zk("read", &path, e)),
            }
        }
        Ok(None)
    }

    /// Tries to become the one host of the fleet that fetches `build` from the store (what a
    /// rack's fetcher does before it goes to the store): creates the ephemeral `store-fetcher`
    /// node naming this host and its `rack`.
    pub async fn try_store_fetcher(
        &self,
        service: &str,
        build: &str,
        rack: &str,
    ) -> Result<StoreFetcher, CoordError> {
        check_rack_names(service, build, rack)?;
        let path = store_fetcher_path(service, build);
        let me = format!("{rack}/{}", self.shared.config.host);
        Ok(match self.try_lock(&path, me.as_bytes()).await? {
            None => StoreFetcher::Me,
            Some(data) => match parse_store_fetcher(&data) {
                Some((rack, host)) => StoreFetcher::Other { rack, host },
                None => StoreFetcher::Unnamed,
            },
        })
    }

    /// Stands in the election `dir` with `data` (making the directory when missing): wins
    /// when no one holds it, and withdraws at once when an earlier candidate is found to hold
    /// it. `Ok(None)` when this session holds it, `Ok(Some(data))` when another session does
    /// (its data, at most [`PEER_NODE_MAX_BYTES`]; empty when holders came and went while we
    /// looked).
    async fn try_lock(&self, dir: &str, data: &[u8]) -> Result<Option<Vec<u8>>, CoordError> {
        use zookeeper_client::Error as E;
        let client = self.client()?;
        let me = client.session_id().0;
        for _ in 0..3 {
            match self.holder(&client, dir).await? {
                Some(held) if held.owner == me => return Ok(None),
                Some(held) => return Ok(Some(held.data)),
                None => {}
            }
            let prefix = format!("{dir}/{CANDIDATE_PREFIX}");
            let options = self.shared.acl.options(CreateMode::EphemeralSequential);
            let mine = match self
                .bounded(dir, client.create(&prefix, data, &options))
                .await?
            {
                Ok((_, sequence)) => format!("{prefix}{sequence}"),
                Err(E::NoNode) => {
                    let persistent = self.shared.acl.options(CreateMode::Persistent);
                    match self.bounded(dir, client.mkdir(dir, &persistent)).await? {
                        Ok(()) | Err(E::NodeExists) => continue,
                        Err(e) => return Err(CoordError::zk("create", dir, e)),
                    }
                }
                Err(e) => return Err(CoordError::zk("create", &prefix, e)),
            };
            match self.holder(&client, dir).await? {
                Some(held) if held.owner == me => return Ok(None),
                other => {
                    // Another candidate came first: withdraw.
                    let _ = self.bounded(&mine, client.delete(&mine, None)).await;
                    if let Some(held) = other {
                        return Ok(Some(held.data));
                    }
                }
            }
        }
        Ok(Some(Vec::new()))
    }

    /// Waits, at most `timeout`, until a source of `build` may have appeared or gone: the peers
    /// of `rack` change, its fetcher lets go, the fleet's store fetcher lets go, or (when
    /// `store_fetcher` names it) that host registers as a peer. What a host does while no
    /// source has anything to offer yet, so that waiting costs a few watches, not a read loop.
    pub async fn wait_source_change(
        &self,
        service: &str,
        build: &str,
        rack: &str,
        store_fetcher: Option<(&str, &str)>,
        timeout: Duration,
    ) {
        let Ok(client) = self.client() else {
            tokio::time::sleep(timeout).await;
            return;
        };
        // The children of `path` change, or `path` is made.
        let children_changed = |path: String| {
            let client = client.clone();
            async move {
                match client.get_and_watch_children(&path).await {
                    Ok((_, _, watcher)) => {
                        watcher.changed().await;
                    }
                    Err(zookeeper_client::Error::NoNode) => {
                        if let Ok((None, watcher)) = client.check_and_watch_stat(&path).await {
                            watcher.changed().await;
                        }
                    }
                    // The session is gone or refuses: wait out the timeout, never spin.
                    Err(_) => std::future::pending::<()>().await,
                }
            }
        };
        let peers_changed = children_changed(format!("{}/{rack}", peers_path(service, build)));
        let stat_changed = |path: String| {
            let client = client.clone();
            async move {
                match client.check_and_watch_stat(&path).await {
                    Ok((_, watcher)) => {
                        watcher.changed().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            }
        };
        let fetcher_changed = children_changed(fetching_path(service, build, rack));
        let store_fetcher_changed = children_changed(store_fetcher_path(service, build));
        let holder_registered = async {
            match store_fetcher {
                Some((r, h)) => stat_changed(peer_path(service, build, r, h)).await,
                None => std::future::pending::<()>().await,
            }
        };
        let _ = tokio::time::timeout(timeout, async {
            tokio::select! {
                () = peers_changed => {}
                () = fetcher_changed => {}
                () = store_fetcher_changed => {}
                () = holder_registered => {}
            }
        })
        .await;
    }

    /// Lets go of `rack-fetcher/<rack>` if this session holds it. Best effort: the node is
    /// ephemeral and goes with the session anyway.
    pub async fn release_fetch_lock(&self, service: &str, build: &str, rack: &str) {
        if check_name("rack", rack).is_ok() {
            self.release_lock(&fetching_path(service, build, rack))
                .await;
        }
    }

    /// Lets go of the fleet's `store-fetcher` node if this session holds it (best effort).
    pub async fn release_store_fetcher(&self, service: &str, build: &str) {
        self.release_lock(&store_fetcher_path(service, build)).await;
    }

    /// Deletes this session's candidates of the election `dir`.
    async fn release_lock(&self, dir: &str) {
        let Ok(client) = self.client() else { return };
        let Ok(Ok((children, _))) = self.bounded(dir, client.get_children(dir)).await else {
            return;
        };
        for name in candidates(&children) {
            let path = format!("{dir}/{name}");
            if let Ok(Ok((_, stat))) = self.bounded(&path, client.get_data(&path)).await
                && stat.ephemeral_owner == client.session_id().0
            {
                let _ = self.bounded(&path, client.delete(&path, None)).await;
            }
        }
    }
}

/// Keeps this host's peer registrations in ZooKeeper for one connection: writes what differs
/// from what it wrote, deletes what was withdrawn, retries failures with backoff.
pub(super) struct PeerWriter {
    pub(super) client: Client,
    pub(super) host: String,
    pub(super) acl: AclSet,
}

impl PeerWriter {
    pub(super) async fn run(self, mut desired: watch::Receiver<PeerMap>) {
        let mut written: HashMap<PeerKey, (String, PeerNode)> = HashMap::new();
        let mut attempt: u32 = 0;
        loop {
            let snapshot = desired.borrow_and_update().clone();
            let mut failed = false;
            let gone: Vec<PeerKey> = written
                .keys()
                .filter(|k| !snapshot.contains_key(*k))
                .cloned()
                .collect();
            for key in gone {
                let (rack, _) = &written[&key];
                let path = peer_path(&key.0, &key.1, rack, &self.host);
                match self.client.delete(&path, None).await {
                    Ok(()) | Err(zookeeper_client::Error::NoNode) => {
                        written.remove(&key);
                    }
                    Err(e) => {
                        tracing::warn!("withdrawing peer node {path}: {e}");
                        failed = true;
                    }
                }
            }
            for (key, value) in snapshot {
                if written.get(&key) == Some(&value) {
                    continue;
                }
                // A rack change moves the node.
                if let Some((old_rack, _)) = written.get(&key)
                    && *old_rack != value.0
                {
                    let old = peer_path(&key.0, &key.1, old_rack, &self.host);
                    let _ = self.client.delete(&old, None).await;
                }
                match self.write(&key, &value).await {
                    Ok(()) => {
                        written.insert(key, value);
                    }
                    Err(e) => {
                        tracing::warn!("publishing a peer node: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                tokio::time::sleep(backoff(attempt, RETRY_MIN_MS, RETRY_MAX_MS)).await;
                attempt = attempt.saturating_add(1);
            } else {
                attempt = 0;
                if desired.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    /// Writes one registration as an ephemeral node of this session, replacing one left by an
    /// earlier session of this host. Only under a registered build: a build node that does not
    /// exist is not created.
    async fn write(
        &self,
        (service, build): &PeerKey,
        (rack, node): &(String, PeerNode),
    ) -> Result<(), CoordError> {
        use zookeeper_client::Error as E;
        let registration = build_path(service, build);
        match self.client.check_stat(&registration).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(CoordError::UnknownBuild {
                    service: service.clone(),
                    build: build.clone(),
                });
            }
            Err(e) => return Err(CoordError::zk("read", &registration, e)),
        }
        let path = peer_path(service, build, rack, &self.host);
        let data = serde_json::to_vec(node).expect("a peer node serialises");
        let session = self.client.session_id().0;
        for _ in 0..4 {
            match self.client.set_data(&path, &data, None).await {
                Ok(stat) if stat.ephemeral_owner == session => return Ok(()),
                Ok(stat) => match self.client.delete(&path, Some(stat.version)).await {
                    Ok(()) | Err(E::NoNode | E::BadVersion) => continue,
                    Err(e) => return Err(CoordError::zk("delete", &path, e)),
                },
                Err(E::NoNode) => {}
                Err(e) => return Err(CoordError::zk("write", &path, e)),
            }
            let options = self.acl.options(CreateMode::Ephemeral);
            match self.client.create(&path, &data, &options).await {
                Ok(_) => return Ok(()),
                Err(E::NodeExists) => {}
                Err(E::NoNode) => {
                    let parent = &path[..path.rfind('/').expect("absolute path")];
                    let persistent = self.acl.options(CreateMode::Persistent);
                    match self.client.mkdir(parent, &persistent).await {
                        Ok(()) | Err(E::NodeExists) => {}
                        Err(e) => return Err(CoordError::zk("create", parent, e)),
                    }
                }
                Err(e) => return Err(CoordError::zk("create", &path, e)),
            }
        }
        Err(CoordError::zk("write", &path, E::NodeExists))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_store_fetcher;

    #[test]
    fn the_store_fetchers_node_names_a_rack_and_a_host_or_nothing() {
        let ok = |r: &str, h: &str| Some((r.to_owned(), h.to_owned()));
        assert_eq!(parse_store_fetcher(b"r1/h1"), ok("r1", "h1"));
        for bad in [
            &b""[..],
            b"r1",
            b"/h1",
            b"r1/",
            b"r1/h1/x",
            b"../h1",
            b"r1/\xff",
        ] {
            assert_eq!(parse_store_fetcher(bad), None, "{bad:?}");
        }
    }
}
