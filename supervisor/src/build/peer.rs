//! Builds that travel host to host: a host that holds a verified build serves its archive to the
//! other hosts of the fleet, and a host that needs a build takes it from a peer — its own rack
//! first — and from the store only when no peer has it.
//!
//! The engine is a tree of whole-archive HTTP/1.1 transfers (hyper), cut-through: a host serves
//! the archive while it is still receiving it, so a chain of hosts costs one transfer time plus
//! a little latency per hop, not one transfer per hop. Peers are found in ZooKeeper
//! (`/builds/<svc>/<build>/peers/<rack>/<host>`, see `coord::peers`); in each rack one host,
//! elected in `rack-fetcher/<rack>`, fetches what no peer offers, and the others of its rack
//! stream from it as its file grows. Among the racks' fetchers one, elected in
//! `store-fetcher`, fetches from the store; the others stream from it or from
//! one another (a full peer answers 503 and the asker goes to the next), so the transfers form
//! a tree whose root alone reads the store. The store therefore serves one copy per deploy,
//! and at most one per rack when the fleet's election is out of reach or its fetcher offers
//! nothing within `peers.rack_wait_ms`. A host that holds an election and cannot be reached
//! (killed, cut off: its session outlives it by `session_timeout_ms`) has it opened by the hosts
//! that wait on it (`Zk::take_over_fetch_lock`, `Zk::take_over_store_fetcher`), which elect
//! another among themselves instead of each going to the store.
//!
//! Trust: peers are less trusted than root and than the store's registration. Every byte,
//! whoever served it, goes through the same hashing, extraction and checks as a store download,
//! against the sha256 of `/builds/<svc>/<build>`, bounded by its `size`; a peer that claimed a
//! complete archive and served bytes that do not verify (checksum, corrupt archive, unsafe
//! entry, too large) is dropped for the life of the process and reported (log, and the deploy's
//! error when every source failed). A peer that is still fetching relays its own source's bytes
//! and ends its stream only once its copy verified (an abort otherwise), so it is not blamed for
//! bytes it relayed: its failures cost a retry. Its node names the origin of what it relays (the
//! complete peer it streams from, directly or through other relays; none for the store), and a
//! host that dropped that origin does not ask its relays: when a bad peer is found, every host
//! that was streaming from it is still relaying it, and asking them one after another would use
//! up `peers.max_attempts` and send each host to the store. Peer addresses are parsed as
//! `ip:port` (never resolved, never used as a path); the peer server serves only
//! `GET /v1/builds/<svc>/<build>` for a configured service and a valid build id
//! (`check_build_id`) that is verified on disk or being fetched here; with `peers.secret_file`,
//! only to a request signed with the fleet's shared key (`super::peer_auth`), checked before
//! anything else. Uploads are bounded in
//! count (`peers.max_uploads`) and in bytes per second for all of them together
//! (`peers.upload_bytes_per_s`), so serving never takes the host's whole link from its instances.
//!
//! On disk: `<data_dir>/<svc>/archives/<build>` holds the verified archive of each kept release
//! (mode 0700 directory, files opened without following links); `archives/.partial-<build>-*`
//! the archive being fetched. Archives whose release was pruned are removed by the rescan.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;

use tokio::io::AsyncReadExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::{BuildError, Limits, Releases, Source, check_build_id, store};
use crate::clip::clip;
pub use crate::config::{DEFAULT_RACK, PeerConfig};
use crate::coord::{PeerNode, PeerSeen, RackFetcher, StoreFetcher, Zk};

/// Directory of kept archives under `<data_dir>/<svc>`.
const ARCHIVES_DIR: &str = "archives";
/// Prefix of archives being fetched; never a valid build id.
const PARTIAL_PREFIX: &str = ".partial-";
/// Bytes read from disk and sent per frame of an upload.
const UPLOAD_CHUNK_BYTES: usize = 64 * 1024;
/// A peer connection that has not sent its request head within this long is closed, in ms.
const HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// How often the served archives are compared with the releases on disk, in ms.
const RESCAN_MS: u64 = 10_000;
/// Longest wait for a change of the rack's peers before looking again, in ms: a look also
/// finds peers of other racks, and busy peers that became free.
const WAIT_MAX_MS: u64 = 1_000;
/// Shortest pause between two looks for a source, in ms.
const WAIT_MIN_MS: u64 = 50;
/// Pause after a failed ZooKeeper request of an install, in ms.
const ZK_RETRY_MS: u64 = 500;
/// Path prefix of the one resource the peer server has.
const URL_PREFIX: &str = "/v1/builds/";
/// Longest request target the peer server reads, in bytes (a service and a build id).
const TARGET_MAX_BYTES: usize = 256;

/// How far a file being fetched has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Progress {
    /// Bytes written to the partial file so far.
    written: u64,
    end: End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Growing,
    /// Every byte is written and the archive verified: the stream may end.
    Verified,
    /// The fetch failed: every upload of it is aborted, never ended cleanly.
    Failed,
}

/// An archive being fetched here, served as it grows.
#[derive(Clone)]
struct Partial {
    path: PathBuf,
    progress: watch::Receiver<Progress>,
}

/// The host's peer side: server, registrations and fetching. Cheap to clone.
#[derive(Clone)]
pub struct Peers(Arc<Inner>);

struct Inner {
    config: PeerConfig,
    /// Where other hosts reach this host's peer server.
    advertise: SocketAddr,
    rack: String,
    data_dir: PathBuf,
    zk: Zk,
    /// The services this host runs: the only ones it serves.
    services: Mutex<BTreeSet<String>>,
    /// Archives being fetched here, by (service, build).
    partials: Mutex<HashMap<(String, String), Partial>>,
    /// Complete archives published in ZooKeeper, by (service, build).
    published: Mutex<HashSet<(String, String)>>,
    /// Hosts that served bytes that did not verify: never asked again by this process.
    dropped: Mutex<HashSet<String>>,
    uploads: Arc<Semaphore>,
    pacer: Arc<Pacer>,
    /// The fleet's shared key: requests are signed with it and only signed ones are served.
    key: Option<super::peer_auth::PeerKey>,
    /// When a refused request was last logged (Unix seconds): one line per 10 s at most, so a
    /// scanner cannot flood the log.
    refusal_logged_s: AtomicU64,
}

/// Spaces out the bytes of every upload together so they stay under a rate: each chunk
/// reserves its share of time after the previous one, and waits for its turn.
struct Pacer {
    bytes_per_s: u64,
    next: Mutex<tokio::time::Instant>,
}

impl Pacer {
    fn new(bytes_per_s: u64) -> Pacer {
        Pacer {
            bytes_per_s: bytes_per_s.max(1),
            next: Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// The instant `bytes` more may be sent, reserving them.
    fn reserve(&self, bytes: u64, now: tokio::time::Instant) -> tokio::time::Instant {
        let cost = Duration::from_nanos(
            (u128::from(bytes) * 1_000_000_000 / u128::from(self.bytes_per_s)) as u64,
        );
        let mut next = self.next.lock().expect("pacer lock");
        let start = (*next).max(now);
        *next = start + cost;
        start
    }

    async fn take(&self, bytes: u64) {
        let at = self.reserve(bytes, tokio::time::Instant::now());
        tokio::time::sleep_until(at).await;
    }
}

/// Why a transfer from a peer failed.
enum PeerFailure {
    /// Its bytes do not verify.
    Bad(BuildError),
    /// It answered that all its upload slots are taken: try another, no failure counted.
    Busy(String),
    /// It could not serve (stalled, cut, not holding it): try another.
    Unavailable(String),
    /// No connection could be made (refused, or none within `peers.connect_timeout_ms`): the
    /// host is gone or cut off, and is not asked again by this install.
    Unreachable(String),
    /// This host failed (disk): no other source helps.
    Local(BuildError),
}

fn classify(e: BuildError) -> PeerFailure {
    match e {
        BuildError::Checksum { .. }
        | BuildError::Archive { .. }
        | BuildError::UnsafeEntry { .. }
        | BuildError::TooLarge { .. } => PeerFailure::Bad(e),
        BuildError::Fetch { .. } | BuildError::Stalled { .. } | BuildError::NotFound { .. } => {
            PeerFailure::Unavailable(e.to_string())
        }
        _ => PeerFailure::Local(e),
    }
}

/// Installs `build` of `service`: through the peers when they are on and the build is
/// registered (its sha256 known), else straight from the store ([`Releases::install`]).
pub async fn install(
    peers: Option<&Peers>,
    releases: &Releases,
    service: &str,
    build: &str,
    source: &Source,
    limits: &Limits,
) -> Result<PathBuf, BuildError> {
    let _transfer = super::Transfer::begin();
    match (peers, &source.sha256) {
        (Some(peers), Some(sha256)) => {
            peers
                .install(releases, service, build, sha256, source, limits)
                .await
        }
        _ => releases.install(build, source, limits).await,
    }
}

impl Peers {
    /// Checks the configuration, binds the peer server and starts it and the rescan of served
    /// archives. Must be called within a tokio runtime.
    pub async fn start(
        config: &PeerConfig,
        rack: Option<&str>,
        data_dir: &Path,
        zk: Zk,
        services: Vec<String>,
    ) -> Result<Peers, String> {
        let (listen, advertise) = config.addresses()?;
        let rack = rack.unwrap_or(DEFAULT_RACK).to_owned();
        // The rack names a ZooKeeper node.
        if rack.is_empty()
            || rack == "."
            || rack == ".."
            || rack.contains('/')
            || rack.chars().any(char::is_control)
        {
            return Err(format!(
                "rack `{}`: must be non-empty, without `/` or control characters, not `.` or `..`",
                clip(&rack)
            ));
        }
        let key = config
            .secret_file
            .as_deref()
            .map(super::peer_auth::PeerKey::load)
            .transpose()?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("peers.listen {listen}: {e}"))?;
        let peers = Peers(Arc::new(Inner {
            advertise,
            rack,
            data_dir: data_dir.to_owned(),
            zk,
            services: Mutex::new(services.into_iter().collect()),
            partials: Mutex::new(HashMap::new()),
            published: Mutex::new(HashSet::new()),
            dropped: Mutex::new(HashSet::new()),
            uploads: Arc::new(Semaphore::new(config.max_uploads)),
            pacer: Arc::new(Pacer::new(config.upload_bytes_per_s)),
            key,
            refusal_logged_s: AtomicU64::new(0),
            config: config.clone(),
        }));
        tracing::info!(%listen, %advertise, rack = %peers.0.rack, signed = peers.0.key.is_some(), "peer server listening");
        if peers.0.key.is_none() {
            tracing::warn!(
                %listen,
                "peers.secret_file is not set: whoever reaches the peer port can download the builds this host serves"
            );
        }
        tokio::spawn(peers.clone().serve(listener));
        tokio::spawn(peers.clone().rescan_forever());
        Ok(peers)
    }

    /// Changes the services served (after a reload).
    pub fn set_services(&self, services: Vec<String>) {
        *self.0.services.lock().expect("services lock") = services.into_iter().collect();
        self.rescan();
    }

    fn archives_dir(&self, service: &str) -> PathBuf {
        self.0.data_dir.join(service).join(ARCHIVES_DIR)
    }

    /// This host's node: complete (`origin` unused), or still fetching from `origin`.
    fn node(&self, complete: bool, origin: Option<&str>) -> PeerNode {
        PeerNode {
            addr: self.0.advertise.to_string(),
            complete,
            origin: origin.filter(|_| !complete).map(str::to_owned),
        }
    }

    async fn rescan_forever(self) {
        loop {
            self.rescan();
            tokio::time::sleep(Duration::from_millis(RESCAN_MS)).await;
        }
    }

    /// Makes the published complete archives equal to the verified archives of kept releases
    /// on disk; removes archives whose release is gone and partial files no fetch owns.
    fn rescan(&self) {
        let services = self.0.services.lock().expect("services lock").clone();
        let mut found = HashSet::new();
        for service in &services {
            let dir = self.archives_dir(service);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let releases = Releases::new(&self.0.data_dir, service);
            let fetching: HashSet<PathBuf> = self
                .0
                .partials
                .lock()
                .expect("partials lock")
                .values()
                .map(|p| p.path.clone())
                .collect();
            for entry in entries.flatten() {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if name.starts_with(PARTIAL_PREFIX) {
                    // Only leftovers of an earlier process: one of ours may be between its
                    // creation and its entry in `partials`.
                    let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                    let ours = pid == Some(std::process::id());
                    if !ours && !fetching.contains(&entry.path()) {
                        let _ = std::fs::remove_file(entry.path());
                    }
                    continue;
                }
                if check_build_id(&name).is_err() {
                    continue;
                }
                if releases.has(&name) {
                    found.insert((service.clone(), name));
                } else if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(service, build = %clip(&name), "removing a pruned archive: {e}");
                }
            }
        }
        let mut published = self.0.published.lock().expect("published lock");
        let fetching: HashSet<(String, String)> = self
            .0
            .partials
            .lock()
            .expect("partials lock")
            .keys()
            .cloned()
            .collect();
        for gone in published.difference(&found) {
            if !fetching.contains(gone) {
                self.0.zk.set_peer(&gone.0, &gone.1, &self.0.rack, None);
            }
        }
        for (service, build) in &found {
            self.0
                .zk
                .set_peer(service, build, &self.0.rack, Some(self.node(true, None)));
        }
        *published = found;
    }

    /// The install of one build through the peers (see the module doc).
    async fn install(
        &self,
        releases: &Releases,
        service: &str,
        build: &str,
        sha256: &str,
        source: &Source,
        limits: &Limits,
    ) -> Result<PathBuf, BuildError> {
        check_build_id(build).map_err(super::bad_id(build))?;
        if releases.has(build) {
            return Ok(releases.release_dir(build));
        }
        let expected = store::parse_sha256(&source.url, sha256)?;
        let zk = &self.0.zk;
        let config = &self.0.config;
        let rack = self.0.rack.clone();
        // The registration's size bounds what any source may send.
        let size = match zk.build_meta(service, build).await {
            Ok(Some(meta)) => meta.size,
            _ => None,
        };
        let mut limits = limits.clone();
        if let Some(size) = size {
            limits.max_archive_bytes = limits.max_archive_bytes.min(size);
        }
        let peer_limits = Limits {
            fetch_stall_ms: config.stall_ms,
            ..limits.clone()
        };
        let started = Instant::now();
        let mut failures: u32 = 0;
        let mut skipped: HashSet<String> = HashSet::new();
        // Hosts no connection reached: left out for the rest of this install, and their
        // elections opened (their sessions may outlive them by `session_timeout_ms`).
        let mut unreachable: HashSet<String> = HashSet::new();
        let mut leader = false;
        let mut rack_fetcher: Option<String> = None;
        let mut relisted = false;
        let mut store_fetcher: Option<StoreFetcher> = None;
        let mut reports: Vec<String> = Vec::new();
        let result = loop {
            if failures < config.max_attempts {
                let found = match zk.peers_of(service, build, &rack).await {
                    Ok(found) => found,
                    Err(e) => {
                        // ZooKeeper away delays the install (up to `rack_wait_ms`), and the
                        // pause keeps this loop from spinning on a session that is gone.
                        tracing::warn!(service, build, "looking for peers: {e}");
                        tokio::time::sleep(Duration::from_millis(ZK_RETRY_MS)).await;
                        Vec::new()
                    }
                };
                let dropped = self.0.dropped.lock().expect("dropped lock").clone();
                let candidates = order(found, &rack, &dropped, &skipped);
                if let Some(peer) = candidates.first() {
                    match self
                        .fetch_peer(releases, service, build, &expected, &peer_limits, peer)
                        .await
                    {
                        Ok(dir) => break Ok(dir),
                        Err(PeerFailure::Bad(e)) if peer.node.complete => {
                            let report = format!(
                                "dropped peer {} ({}): {}",
                                clip(&peer.host),
                                clip(&peer.node.addr),
                                clip(&e.to_string())
                            );
                            tracing::warn!(service, build, "{report}");
                            reports.push(report);
                            self.0
                                .dropped
                                .lock()
                                .expect("dropped lock")
                                .insert(peer.host.clone());
                            failures += 1;
                            continue;
                        }
                        Err(PeerFailure::Bad(e)) => {
                            // A peer still fetching relays its source's bytes: not its fault.
                            tracing::warn!(service, build, peer = %clip(&peer.host), "retrying elsewhere: {e}");
                            skipped.insert(peer.host.clone());
                            failures += 1;
                            continue;
                        }
                        Err(PeerFailure::Busy(why)) => {
                            tracing::info!(service, build, peer = %clip(&peer.host), "{why}");
                            skipped.insert(peer.host.clone());
                            continue;
                        }
                        Err(PeerFailure::Unavailable(why)) => {
                            tracing::info!(service, build, peer = %clip(&peer.host), "retrying elsewhere: {why}");
                            skipped.insert(peer.host.clone());
                            failures += 1;
                            continue;
                        }
                        Err(PeerFailure::Unreachable(why)) => {
                            tracing::info!(service, build, peer = %clip(&peer.host), "retrying elsewhere, not asking again: {why}");
                            skipped.insert(peer.host.clone());
                            unreachable.insert(peer.host.clone());
                            failures += 1;
                            continue;
                        }
                        Err(PeerFailure::Local(e)) => break Err(e),
                    }
                }
            }
            if !leader {
                if let Some(holder) = rack_fetcher.take_if(|h| unreachable.contains(h.as_str())) {
                    self.take_over(zk.take_over_fetch_lock(service, build, &rack, &holder))
                        .await;
                }
                leader = match zk.try_fetch_lock(service, build, &rack).await {
                    Ok(RackFetcher::Me) => true,
                    Ok(RackFetcher::Other(holder)) => {
                        rack_fetcher = holder;
                        false
                    }
                    Err(e) => {
                        tracing::warn!(service, build, "electing the rack's fetcher: {e}");
                        tokio::time::sleep(Duration::from_millis(ZK_RETRY_MS)).await;
                        false
                    }
                };
            }
            if leader && !relisted {
                // A peer may have finished between the look and the election.
                relisted = true;
                continue;
            }
            // The rack's fetcher found no source: before the store, the one store fetcher of
            // the whole fleet is elected, and every other rack's fetcher streams from it (or
            // from another that streams from it) instead of sharing the store's uplink.
            if leader && store_fetcher != Some(StoreFetcher::Me) {
                let before = store_fetcher.take();
                if let Some(StoreFetcher::Other { rack: r, host: h }) = &before
                    && unreachable.contains(h)
                {
                    self.take_over(zk.take_over_store_fetcher(service, build, r, h))
                        .await;
                }
                store_fetcher = Some(match zk.try_store_fetcher(service, build, &rack).await {
                    Ok(held) => held,
                    Err(e) => {
                        // Without the election this rack fetches on its own, as when every
                        // rack had its own store copy: a slower deploy, never a stuck one.
                        tracing::warn!(service, build, "electing the fleet's store fetcher: {e}");
                        StoreFetcher::Me
                    }
                });
                if store_fetcher == Some(StoreFetcher::Me) && before.is_some() {
                    // The fleet's fetcher let go (done or failed) since the last look: look
                    // again before the store, it may have left a complete copy.
                    continue;
                }
            }
            let waited = started.elapsed() >= Duration::from_millis(config.rack_wait_ms);
            let fleet_fetcher = leader && store_fetcher == Some(StoreFetcher::Me);
            if fleet_fetcher || failures >= config.max_attempts || waited {
                if !fleet_fetcher {
                    tracing::warn!(
                        service,
                        build,
                        failures,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "no peer could serve: fetching from the store"
                    );
                }
                break self
                    .fetch_store(releases, service, build, &expected, &limits, source)
                    .await;
            }
            // Another host fetches (this rack's, or the fleet's store fetcher): wait until it
            // serves or lets go. Busy peers may be free by then.
            skipped.clone_from(&unreachable);
            let holder = match &store_fetcher {
                Some(StoreFetcher::Other { rack, host }) => Some((rack.as_str(), host.as_str())),
                _ => None,
            };
            zk.wait_source_change(
                service,
                build,
                &rack,
                holder,
                Duration::from_millis(WAIT_MAX_MS),
            )
            .await;
            // At most one look per WAIT_MIN_MS, however often the sources change.
            tokio::time::sleep(Duration::from_millis(WAIT_MIN_MS)).await;
        };
        if store_fetcher == Some(StoreFetcher::Me) {
            zk.release_store_fetcher(service, build).await;
        }
        if leader {
            zk.release_fetch_lock(service, build, &rack).await;
        }
        match result {
            Ok(dir) => {
                tracing::info!(
                    service,
                    build,
                    failures,
                    ms = started.elapsed().as_millis() as u64,
                    "build arrived verified"
                );
                Ok(dir)
            }
            Err(e) if reports.is_empty() => Err(e),
            Err(e) => Err(BuildError::Fetch {
                url: clip(&source.url).into_owned(),
                message: format!("{e}; {}", reports.join("; ")),
            }),
        }
    }

    /// Opens an election held by a host this install could not reach, logging a ZooKeeper
    /// error (then the install goes on waiting, bounded by `peers.rack_wait_ms`).
    async fn take_over(
        &self,
        opened: impl Future<Output = Result<bool, crate::coord::CoordError>>,
    ) {
        if let Err(e) = opened.await {
            tracing::warn!("opening an election held by an unreachable host: {e}");
        }
    }

    async fn fetch_peer(
        &self,
        releases: &Releases,
        service: &str,
        build: &str,
        expected: &str,
        limits: &Limits,
        peer: &PeerSeen,
    ) -> Result<PathBuf, PeerFailure> {
        let label = format!(
            "peer {} http://{}{URL_PREFIX}{service}/{build}",
            clip(&peer.host),
            clip(&peer.node.addr)
        );
        let Ok(addr) = peer.node.addr.parse::<SocketAddr>() else {
            return Err(PeerFailure::Unavailable(format!("{label}: not an ip:port")));
        };
        let stream = self.open_peer(addr, service, build, &label).await?;
        tracing::info!(service, build, from = %label, complete = peer.node.complete, "fetching from a peer");
        let origin = if peer.node.complete {
            Some(peer.host.as_str())
        } else {
            peer.node.origin.as_deref()
        };
        let from = FetchFrom {
            label: &label,
            origin,
            stream,
        };
        self.fetch(releases, service, build, expected, limits, from)
            .await
            .map_err(classify)
    }

    /// Connects to a peer and asks for the build; the body as a byte stream once it answers 200.
    async fn open_peer(
        &self,
        addr: SocketAddr,
        service: &str,
        build: &str,
        label: &str,
    ) -> Result<store::ByteStream, PeerFailure> {
        let config = &self.0.config;
        let down = PeerFailure::Unavailable;
        let connect = tokio::net::TcpStream::connect(addr);
        let tcp = tokio::time::timeout(Duration::from_millis(config.connect_timeout_ms), connect)
            .await
            .map_err(|_| {
                PeerFailure::Unreachable(format!(
                    "{label}: no connection within {} ms",
                    config.connect_timeout_ms
                ))
            })?
            .map_err(|e| PeerFailure::Unreachable(format!("{label}: {e}")))?;
        let stall = Duration::from_millis(config.stall_ms);
        let (mut send, connection) = tokio::time::timeout(
            stall,
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(
                tcp,
            )),
        )
        .await
        .map_err(|_| {
            down(format!(
                "{label}: no handshake within {} ms",
                config.stall_ms
            ))
        })?
        .map_err(|e| down(format!("{label}: {e}")))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let path = format!("{URL_PREFIX}{service}/{build}");
        let mut request = hyper::Request::get(&path).header(hyper::header::HOST, addr.to_string());
        if let Some(key) = &self.0.key {
            let signed = key.authorization(&path, super::peer_auth::now_s());
            request = request.header(hyper::header::AUTHORIZATION, signed);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| down(format!("{label}: {e}")))?;
        let response = tokio::time::timeout(stall, send.send_request(request))
            .await
            .map_err(|_| down(format!("{label}: no answer within {} ms", config.stall_ms)))?
            .map_err(|e| down(format!("{label}: {e}")))?;
        match response.status() {
            hyper::StatusCode::OK => {}
            hyper::StatusCode::SERVICE_UNAVAILABLE => {
                return Err(PeerFailure::Busy(format!("{label}: busy")));
            }
            hyper::StatusCode::UNAUTHORIZED => {
                let why = if self.0.key.is_some() {
                    "refused this host's signature (another peers.secret_file key, or clocks more than 300 s apart)"
                } else {
                    "asks for signed requests (peers.secret_file), and this host has no key"
                };
                return Err(down(format!("{label}: answered 401: {why}")));
            }
            status => return Err(down(format!("{label}: answered {status}"))),
        }
        let label = label.to_owned();
        let body = response.into_body().into_data_stream().map(move |chunk| {
            chunk.map_err(|e| BuildError::Fetch {
                url: label.clone(),
                message: clip(&e.to_string()).into_owned(),
            })
        });
        Ok(super::tallied(
            body.boxed(),
            crate::metrics::FetchSource::Peer,
        ))
    }

    async fn fetch_store(
        &self,
        releases: &Releases,
        service: &str,
        build: &str,
        expected: &str,
        limits: &Limits,
        source: &Source,
    ) -> Result<PathBuf, BuildError> {
        let env = store::StoreEnv::new(
            releases.store_env.as_ref(),
            releases.store_reader.as_deref(),
        );
        let stream = store::store_stream(&source.url, &env, limits).await?;
        tracing::info!(service, build, url = %clip(&source.url), "fetching from the store");
        let from = FetchFrom {
            label: &source.url,
            origin: None,
            stream,
        };
        self.fetch(releases, service, build, expected, limits, from)
            .await
    }

    /// Installs from `stream` while keeping its bytes in a partial archive that peers may read
    /// as it grows; the archive is kept (and published complete) once the release verified.
    async fn fetch(
        &self,
        releases: &Releases,
        service: &str,
        build: &str,
        expected: &str,
        limits: &Limits,
        from: FetchFrom<'_>,
    ) -> Result<PathBuf, BuildError> {
        let dir = self.archives_dir(service);
        std::fs::create_dir_all(&dir).map_err(|e| BuildError::io(&dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| BuildError::io(&dir, e))?;
        let path = dir.join(format!("{PARTIAL_PREFIX}{build}-{}", super::tmp_suffix()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| BuildError::io(&path, e))?;
        let (tx, rx) = watch::channel(Progress {
            written: 0,
            end: End::Growing,
        });
        let key = (service.to_owned(), build.to_owned());
        self.0.partials.lock().expect("partials lock").insert(
            key.clone(),
            Partial {
                path: path.clone(),
                progress: rx,
            },
        );
        self.0.zk.set_peer(
            service,
            build,
            &self.0.rack,
            Some(self.node(false, from.origin)),
        );
        let mut tee = PartialTee {
            file,
            path: path.clone(),
            written: 0,
            progress: &tx,
        };
        let result = releases
            .install_stream(
                build,
                expected,
                limits,
                from.label,
                from.stream,
                Some(&mut tee),
            )
            .await;
        let PartialTee { file, .. } = tee;
        let kept = match &result {
            Err(_) => Err(()),
            // The fsync of a whole archive (hundreds of MiB) runs on the blocking pool.
            Ok(_) => {
                let (from, to) = (path.clone(), dir.join(build));
                let synced = tokio::task::spawn_blocking(move || {
                    file.sync_all().and_then(|()| std::fs::rename(&from, &to))
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                synced.map_err(|e| {
                    tracing::warn!(service, build, "keeping the archive for peers: {e}");
                })
            }
        };
        self.0.partials.lock().expect("partials lock").remove(&key);
        match kept {
            Ok(()) => {
                tx.send_modify(|p| p.end = End::Verified);
                self.0.published.lock().expect("published lock").insert(key);
                self.0
                    .zk
                    .set_peer(service, build, &self.0.rack, Some(self.node(true, None)));
            }
            Err(()) => {
                tx.send_modify(|p| p.end = End::Failed);
                let _ = std::fs::remove_file(&path);
                self.0.zk.set_peer(service, build, &self.0.rack, None);
            }
        }
        result
    }

    // --------------------------------------------------------------------------------------
    // The server

    async fn serve(self, listener: tokio::net::TcpListener) {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("peer server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            set_user_timeout(&stream, self.0.config.stall_ms);
            let peers = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let peers = peers.clone();
                    async move { Ok::<_, std::convert::Infallible>(peers.answer(&request, remote)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS))
                    .keep_alive(false)
                    .serve_connection(io, service);
                let _ = connection.await;
            });
        }
    }

    fn answer<B>(&self, request: &hyper::Request<B>, remote: SocketAddr) -> hyper::Response<Body> {
        if request.method() != hyper::Method::GET {
            return plain(hyper::StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        let target = request.uri().path();
        // Before the path is looked at: an unsigned asker learns nothing of what is served.
        if let Some(key) = &self.0.key {
            let header = request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            let now = super::peer_auth::now_s();
            if let Err(why) = key.verify(target, header, now) {
                let last = self.0.refusal_logged_s.load(Ordering::Relaxed);
                if now >= last + 10
                    && self
                        .0
                        .refusal_logged_s
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(%remote, target = %clip(target), "peer server: refused a request: {why} (one line per 10 s at most)");
                }
                return plain(hyper::StatusCode::UNAUTHORIZED, "unauthorized\n");
            }
        }
        let Some((service, build)) = parse_target(target) else {
            return plain(hyper::StatusCode::NOT_FOUND, "not found\n");
        };
        if !self
            .0
            .services
            .lock()
            .expect("services lock")
            .contains(service)
        {
            return plain(hyper::StatusCode::NOT_FOUND, "not found\n");
        }
        let partial = self
            .0
            .partials
            .lock()
            .expect("partials lock")
            .get(&(service.to_owned(), build.to_owned()))
            .cloned();
        let releases = Releases::new(&self.0.data_dir, service);
        let complete = self.archives_dir(service).join(build);
        if partial.is_none() && !(releases.has(build) && complete.is_file()) {
            return plain(hyper::StatusCode::NOT_FOUND, "not found\n");
        }
        let Ok(permit) = self.0.uploads.clone().try_acquire_owned() else {
            return plain(hyper::StatusCode::SERVICE_UNAVAILABLE, "busy\n");
        };
        let (path, progress) = match partial {
            Some(p) => (p.path, Some(p.progress)),
            None => (complete.clone(), None),
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .or_else(|e| {
                // The fetch finished meanwhile and renamed its file.
                if progress.is_some() && e.kind() == std::io::ErrorKind::NotFound {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&complete)
                } else {
                    Err(e)
                }
            });
        let file = match file {
            Ok(file) => tokio::fs::File::from_std(file),
            Err(_) => return plain(hyper::StatusCode::NOT_FOUND, "not found\n"),
        };
        tracing::info!(
            service,
            build,
            growing = progress.is_some(),
            "serving a peer"
        );
        let upload = Upload {
            pacer: self.0.pacer.clone(),
            stall: Duration::from_millis(self.0.config.stall_ms),
            file,
            sent: 0,
            progress,
            _permit: Some(permit),
            _transfer: super::Transfer::begin(),
            buf: vec![0; UPLOAD_CHUNK_BYTES],
        };
        let frames = futures_util::stream::unfold(upload, |mut upload| async move {
            match upload.next_chunk().await {
                Ok(Some(bytes)) => Some((Ok(Frame::data(bytes)), upload)),
                Ok(None) => None,
                Err(e) => Some((Err(e), upload)),
            }
        });
        hyper::Response::builder()
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .expect("a valid response")
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn plain(status: hyper::StatusCode, text: &'static str) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "text/plain")
        .body(
            Full::new(Bytes::from_static(text.as_bytes()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("a valid response")
}

/// `/v1/builds/<svc>/<build>` → (svc, build), the build id checked; nothing else is a resource.
fn parse_target(target: &str) -> Option<(&str, &str)> {
    if target.len() > TARGET_MAX_BYTES {
        return None;
    }
    let rest = target.strip_prefix(URL_PREFIX)?;
    let (service, build) = rest.split_once('/')?;
    let service_ok = !service.is_empty()
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (service_ok && check_build_id(build).is_ok()).then_some((service, build))
}

/// One upload: reads the archive (following a growing one until it verified) and paces it.
struct Upload {
    /// The host's pacer, shared by every upload.
    pacer: Arc<Pacer>,
    /// `peers.stall_ms`: how long a growing archive may stay the same.
    stall: Duration,
    file: tokio::fs::File,
    sent: u64,
    /// The fetch's progress when the archive is still growing.
    progress: Option<watch::Receiver<Progress>>,
    /// Held for the upload's life: one of `peers.max_uploads` (`None` only in unit tests).
    _permit: Option<OwnedSemaphorePermit>,
    _transfer: super::Transfer,
    buf: Vec<u8>,
}

impl Upload {
    /// The next chunk; `None` at the verified end; an error aborts the response (the fetch
    /// failed, or made no progress within `peers.stall_ms`).
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, std::io::Error> {
        let stall = self.stall;
        loop {
            let available = match &mut self.progress {
                None => u64::MAX,
                Some(progress) => {
                    let now = *progress.borrow_and_update();
                    match now.end {
                        End::Failed => {
                            return Err(std::io::Error::other("the fetch of this build failed"));
                        }
                        End::Verified if self.sent >= now.written => return Ok(None),
                        _ if self.sent < now.written => now.written - self.sent,
                        _ => {
                            // Nothing new yet: wait for the fetch to write more.
                            match tokio::time::timeout(stall, progress.changed()).await {
                                Ok(Ok(())) => continue,
                                Ok(Err(_)) => {
                                    // The fetch is gone; its last word decides.
                                    let last = *progress.borrow();
                                    if last.end == End::Verified && self.sent >= last.written {
                                        return Ok(None);
                                    }
                                    if last.end == End::Verified {
                                        continue;
                                    }
                                    return Err(std::io::Error::other("the fetch ended"));
                                }
                                Err(_) => {
                                    return Err(std::io::Error::other(
                                        "the fetch made no progress",
                                    ));
                                }
                            }
                        }
                    }
                }
            };
            let want = self
                .buf
                .len()
                .min(usize::try_from(available).unwrap_or(usize::MAX));
            let n = self.file.read(&mut self.buf[..want]).await?;
            if n == 0 {
                if self.progress.is_none() {
                    return Ok(None);
                }
                // Written but not yet visible through this descriptor: look again shortly.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            self.pacer.take(n as u64).await;
            self.sent += n as u64;
            return Ok(Some(Bytes::copy_from_slice(&self.buf[..n])));
        }
    }
}

/// Sets `TCP_USER_TIMEOUT`, so an upload to a receiver that stopped acknowledging is cut by
/// the kernel after `ms` instead of holding its upload slot forever.
fn set_user_timeout(stream: &tokio::net::TcpStream, ms: u64) {
    use std::os::fd::AsRawFd as _;
    let value: libc::c_uint = ms.min(u64::from(libc::c_uint::MAX)) as libc::c_uint;
    // SAFETY: a valid socket descriptor owned by `stream`, and a pointer to a c_uint of the
    // size given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("TCP_USER_TIMEOUT: {}", std::io::Error::last_os_error());
    }
}

/// The bytes of a fetch and where they come from.
struct FetchFrom<'a> {
    /// The source as logs and errors name it (a peer's label, the store's URL).
    label: &'a str,
    /// The host whose complete archive they are, directly or relayed; `None` for the store.
    origin: Option<&'a str>,
    stream: store::ByteStream,
}

/// The copy of a fetch's bytes that peers read while it grows.
struct PartialTee<'a> {
    file: std::fs::File,
    path: PathBuf,
    written: u64,
    progress: &'a watch::Sender<Progress>,
}

impl store::Tee for PartialTee<'_> {
    fn write(&mut self, chunk: &[u8]) -> Result<(), BuildError> {
        self.file
            .write_all(chunk)
            .map_err(|e| BuildError::io(&self.path, e))?;
        self.written += chunk.len() as u64;
        let written = self.written;
        self.progress.send_modify(|p| p.written = written);
        Ok(())
    }
}

/// The sources to try, best first: complete peers of this rack, peers of this rack still
/// fetching, complete peers of other racks, then the others; shuffled within each group so
/// the hosts of a rack spread over its sources. Dropped and skipped hosts are left out, and so
/// are hosts still fetching from a dropped host: they relay the bytes that failed here.
fn order(
    found: Vec<PeerSeen>,
    rack: &str,
    dropped: &HashSet<String>,
    skipped: &HashSet<String>,
) -> Vec<PeerSeen> {
    let mut found: Vec<(u8, u64, PeerSeen)> = found
        .into_iter()
        .filter(|p| !dropped.contains(&p.host) && !skipped.contains(&p.host))
        .filter(|p| p.node.complete || p.node.origin.as_ref().is_none_or(|o| !dropped.contains(o)))
        .map(|p| {
            let group = match (p.rack == rack, p.node.complete) {
                (true, true) => 0,
                (true, false) => 1,
                (false, true) => 2,
                (false, false) => 3,
            };
            (group, rand::random::<u64>(), p)
        })
        .collect();
    found.sort_by_key(|(group, shuffle, _)| (*group, *shuffle));
    found.into_iter().map(|(_, _, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(host: &str, rack: &str, complete: bool) -> PeerSeen {
        PeerSeen {
            host: host.into(),
            rack: rack.into(),
            node: PeerNode {
                addr: "10.0.0.1:7480".into(),
                complete,
                origin: None,
            },
        }
    }

    fn relay(host: &str, rack: &str, origin: &str) -> PeerSeen {
        let mut p = seen(host, rack, false);
        p.node.origin = Some(origin.into());
        p
    }

    #[test]
    fn sources_are_ordered_own_rack_first_and_dropped_ones_left_out() {
        let found = vec![
            seen("far-partial", "r2", false),
            seen("far-complete", "r2", true),
            seen("near-partial", "r1", false),
            seen("near-complete", "r1", true),
            seen("bad", "r1", true),
            seen("busy", "r1", true),
            // Still fetching from the dropped host: it can only pass its bytes on.
            relay("bad-relay", "r1", "bad"),
        ];
        let dropped: HashSet<String> = ["bad".to_owned()].into();
        let skipped: HashSet<String> = ["busy".to_owned()].into();
        let hosts: Vec<String> = order(found, "r1", &dropped, &skipped)
            .into_iter()
            .map(|p| p.host)
            .collect();
        assert_eq!(
            hosts,
            [
                "near-complete",
                "near-partial",
                "far-complete",
                "far-partial"
            ]
        );
        // Relays of hosts not dropped here are sources like any other.
        let relays = vec![
            relay("good-relay", "r1", "far-complete"),
            relay("bad-relay", "r1", "bad"),
        ];
        let hosts: Vec<String> = order(relays, "r1", &dropped, &HashSet::new())
            .into_iter()
            .map(|p| p.host)
            .collect();
        assert_eq!(hosts, ["good-relay"]);
    }

    #[test]
    fn only_build_resources_are_served() {
        assert_eq!(parse_target("/v1/builds/py/b1"), Some(("py", "b1")));
        for bad in [
            "/v1/builds/py/../etc",
            "/v1/builds/py/.hidden",
            "/v1/builds/../b1",
            "/v1/builds/py/b1/x",
            "/v1/builds/py",
            "/v1/builds//b1",
            "/etc/passwd",
            "/v1/builds/p%2fy/b1",
        ] {
            assert_eq!(parse_target(bad), None, "{bad}");
        }
        let long = format!("/v1/builds/py/{}", "b".repeat(300));
        assert_eq!(parse_target(&long), None);
    }

    #[test]
    fn the_pacer_spaces_bytes_at_the_rate() {
        let pacer = Pacer::new(1_000_000);
        let t0 = tokio::time::Instant::now();
        assert_eq!(pacer.reserve(500_000, t0), t0);
        assert_eq!(pacer.reserve(500_000, t0), t0 + Duration::from_millis(500));
        assert_eq!(pacer.reserve(1, t0), t0 + Duration::from_millis(1000));
        // Idle time is not saved up into a burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(pacer.reserve(1, later), later);
    }

    fn upload_of(path: &Path, progress: Option<watch::Receiver<Progress>>) -> Upload {
        Upload {
            pacer: Arc::new(Pacer::new(u64::MAX)),
            stall: Duration::from_millis(200),
            file: tokio::fs::File::from_std(std::fs::File::open(path).unwrap()),
            sent: 0,
            progress,
            _permit: None,
            _transfer: crate::build::Transfer::begin(),
            buf: vec![0; 4],
        }
    }

    /// A growing archive is served as it grows, and its stream ends only once the fetch
    /// verified it: a failed fetch, or one that stops making progress, aborts the stream
    /// instead, so a receiver never takes a relayed prefix for the whole archive.
    #[tokio::test]
    async fn a_growing_archive_ends_only_once_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partial");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(b"abcdef").unwrap();
        let (tx, rx) = watch::channel(Progress {
            written: 6,
            end: End::Growing,
        });
        let mut upload = upload_of(&path, Some(rx.clone()));
        assert_eq!(upload.next_chunk().await.unwrap().unwrap(), "abcd");
        assert_eq!(upload.next_chunk().await.unwrap().unwrap(), "ef");
        // Nothing new: the stream waits for the fetch, then ends once it verified.
        let grow = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            file.write_all(b"gh").unwrap();
            tx.send_modify(|p| p.written = 8);
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send_modify(|p| p.end = End::Verified);
        };
        let (chunk, ()) = tokio::join!(upload.next_chunk(), grow);
        assert_eq!(chunk.unwrap().unwrap(), "gh");
        assert!(upload.next_chunk().await.unwrap().is_none());

        // The same file, but the fetch failed: the stream is cut, not ended.
        tx.send_modify(|p| p.end = End::Failed);
        let mut failed = upload_of(&path, Some(rx.clone()));
        assert!(failed.next_chunk().await.is_err());

        // A fetch that makes no progress within the stall time cuts the stream too.
        let (_stuck_tx, stuck_rx) = watch::channel(Progress {
            written: 8,
            end: End::Growing,
        });
        let mut stuck = upload_of(&path, Some(stuck_rx));
        assert_eq!(stuck.next_chunk().await.unwrap().unwrap(), "abcd");
        assert_eq!(stuck.next_chunk().await.unwrap().unwrap(), "efgh");
        assert!(stuck.next_chunk().await.is_err());

        // A complete archive ends at its end of file.
        let mut complete = upload_of(&path, None);
        assert_eq!(complete.next_chunk().await.unwrap().unwrap(), "abcd");
        assert_eq!(complete.next_chunk().await.unwrap().unwrap(), "efgh");
        assert!(complete.next_chunk().await.unwrap().is_none());
    }

    #[test]
    fn addresses_need_a_reachable_advertise() {
        let mut config = PeerConfig::default();
        assert!(config.addresses().is_err(), "0.0.0.0 is not reachable");
        config.advertise = Some("10.1.2.3:7480".into());
        let (listen, advertise) = config.addresses().unwrap();
        assert_eq!(listen.port(), crate::config::DEFAULT_PEER_PORT);
        assert_eq!(advertise.to_string(), "10.1.2.3:7480");
        config.max_uploads = 0;
        assert!(
            config
                .addresses()
                .unwrap_err()
                .contains("peers.max_uploads")
        );
        config.max_uploads = 1;
        config.advertise = Some("host.example:7480".into());
        assert!(config.addresses().is_err(), "names are never resolved");
    }
}
