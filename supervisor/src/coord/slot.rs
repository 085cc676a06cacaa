//! The fleet's restart slots: a counting semaphore over ZooKeeper, without a herd.
//!
//! A holder has one EPHEMERAL_SEQUENTIAL child `lease-<host>-<seq>` of
//! `/services/<svc>/restarting`; `limit` is the data of `restarting`. A host that wants a slot
//! queues first: an EPHEMERAL_SEQUENTIAL `restarting/queue/q-<host>-<seq>`. Only the head of
//! the queue looks at the leases (and the limit): while fewer leases than the limit exist it
//! makes its lease, then leaves the queue, and the next host becomes head. Every other host
//! watches only the queue node just before its own, so a lease coming or going wakes one host,
//! not the whole fleet: what a host reads per deploy does not grow with the number of hosts
//! waiting (the ZooKeeper lock recipe in front of the leases, as Curator's semaphore does).
//! Leases are made only by the one head, after counting: at most `limit` exist at once.
//!
//! Leases and queue nodes are ephemeral: a host whose session ends frees its slot and its place,
//! and a lease lost with a session is lost for good ([`Slot::is_valid`] turns false); it is never
//! re-created behind the holder's back.
//!
//! A lease is deleted only by [`Slot::release_after`], which first waits until ZooKeeper
//! acknowledged the host's status that says its restart ended: a host that takes the slot next
//! never sees this host still `restarting` in its status node. A limit that is not a valid
//! number grants no slot (the daemon reports it in status; see `parse_limit`). A limit of `P%`
//! is that share of the hosts with a status node of the service when the head counts, at least
//! one.

use std::time::Duration;

use tokio::sync::watch;
use zookeeper_client::{Client, CreateMode, StateWatcher};

use super::{
    CoordError, Limit, RETRY_MAX_MS, Session, Zk, backoff, check_name, is_transient, parse_limit,
    restarting_path,
};

/// Bound of the delete that releases a lease.
const RELEASE_TIMEOUT_MS: u64 = 5_000;
/// How many session timeouts a release waits for the end-of-restart status to be acknowledged.
/// Past that many, a session cut off from ZooKeeper has expired (its lease went with it); a
/// session still connected whose status write keeps failing (e.g. an ACL) releases anyway,
/// logging an error, rather than holding the fleet's slot for ever.
const END_STATUS_WAIT_SESSION_TIMEOUTS: u32 = 3;
/// How often a release waiting for its status looks whether the lease's session ended.
const END_STATUS_POLL_MS: u64 = 100;
/// The child of `restarting` that holds the queue of hosts waiting for a slot.
pub(super) const QUEUE: &str = "queue";
/// First delay before retrying after a connection loss while acquiring.
const RETRY_MIN_MS: u64 = 100;

/// One of the fleet's restart slots of a service, held by this host until released (or dropped,
/// which releases it in the background).
pub struct Slot {
    /// Where the current session is published, to release through it.
    sessions: watch::Receiver<Option<Session>>,
    /// State of the session that made the lease.
    state: StateWatcher,
    /// Epoch of the session that made the lease.
    epoch: u64,
    /// Path of the lease node.
    path: String,
    released: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("path", &self.path)
            .field("valid", &self.is_valid())
            .finish()
    }
}

impl Slot {
    /// False once the session that made the lease is gone: the slot may already be someone
    /// else's.
    pub fn is_valid(&self) -> bool {
        !self.state.peek_state().is_terminated() && self.current().is_some()
    }

    /// Releases the slot once this host's status of `service` numbered `status_seq` (from
    /// [`Zk::publish_status`]: the status saying the restart ended), or a later one, is
    /// acknowledged by ZooKeeper; then deletes the lease, letting the next host in. When the
    /// lease's session ends first, the lease is gone with it and nothing is deleted. Waits at
    /// most [`END_STATUS_WAIT_SESSION_TIMEOUTS`] session timeouts for the status.
    pub async fn release_after(self, zk: &Zk, service: &str, status_seq: u64) {
        let session_timeout_ms = zk.shared.config.session_timeout_ms.max(1);
        let bound_ms = session_timeout_ms * u64::from(END_STATUS_WAIT_SESSION_TIMEOUTS);
        let mut acked = zk.acked.subscribe();
        let wait = async {
            loop {
                let done = acked
                    .borrow_and_update()
                    .get(service)
                    .is_some_and(|seq| *seq >= status_seq);
                if done {
                    return true;
                }
                if !self.is_valid() {
                    return false;
                }
                tokio::select! {
                    _ = acked.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(END_STATUS_POLL_MS)) => {}
                }
            }
        };
        match tokio::time::timeout(Duration::from_millis(bound_ms), wait).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    "restart slot {}: its session ended before the end of the restart was \
                     published; the lease went with the session",
                    self.path
                );
            }
            Err(_) => tracing::error!(
                "restart slot {}: the status of {service} saying its restart ended was not \
                 acknowledged within {bound_ms} ms; releasing the slot anyway",
                self.path
            ),
        }
        self.release().await;
    }

    /// Deletes the lease (if its session still lives).
    pub(super) async fn release(mut self) {
        self.released = true;
        if let Some(client) = self.current() {
            delete_lease(client, self.path.clone()).await;
        }
    }

    /// Whether `other` is a handle to the same lease in the same session (a host holds one
    /// lease per service: acquiring again while holding returns it).
    pub fn same_lease(&self, other: &Slot) -> bool {
        self.epoch == other.epoch && self.path == other.path
    }

    /// Drops this handle without deleting the lease: another handle to the same lease
    /// ([`Slot::same_lease`]) now owns it.
    pub fn disown(mut self) {
        self.released = true;
    }

    /// The client of the lease's session, if that session is still the owner's current one.
    fn current(&self) -> Option<Client> {
        self.sessions
            .borrow()
            .as_ref()
            .filter(|s| s.epoch == self.epoch)
            .map(|s| s.client.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let (Some(client), Ok(runtime)) = (self.current(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(delete_lease(client, std::mem::take(&mut self.path)));
        }
    }
}

async fn delete_lease(client: Client, path: String) {
    let delete = client.delete(&path, None);
    match tokio::time::timeout(Duration::from_millis(RELEASE_TIMEOUT_MS), delete).await {
        Ok(Ok(()) | Err(zookeeper_client::Error::NoNode)) => {}
        Ok(Err(e)) => tracing::warn!("releasing the restart slot {path}: {e}"),
        Err(_) => tracing::warn!(
            "releasing the restart slot {path}: no answer within {RELEASE_TIMEOUT_MS} ms"
        ),
    }
}

/// The queue node and the lease made by an `acquire` in progress: deleted if the call is
/// cancelled (the lease once it is handed over as a [`Slot`] is the slot's).
struct Pending {
    queue: Option<(Session, String)>,
    lease: Option<(Session, String)>,
}

impl Pending {
    fn queue_name_in(&self, epoch: u64) -> Option<&str> {
        match &self.queue {
            Some((session, path)) if session.epoch == epoch => path.rsplit('/').next(),
            _ => None,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (session, path) in [self.queue.take(), self.lease.take()].into_iter().flatten() {
            runtime.spawn(delete_lease(session.client, path));
        }
    }
}

/// What one look at the semaphore found.
enum Step {
    Held(String),
    /// Wait for the first watch to fire: the queue node before ours, or (at the head) the
    /// leases and the limit.
    Wait(
        zookeeper_client::OneshotWatcher,
        Option<zookeeper_client::OneshotWatcher>,
    ),
    /// Something changed under us (our queue node made or gone, a lease made): look again.
    Again,
}

/// A failed ZooKeeper operation: what, on which node.
type Failure = (&'static str, String, zookeeper_client::Error);

pub(super) async fn acquire(zk: &Zk, service: &str) -> Result<Slot, CoordError> {
    check_name("service", service)?;
    let host = &zk.shared.config.host;
    check_name("host", host)?;
    let dir = restarting_path(service);
    let prefix = format!("lease-{host}-");
    let mut sessions = zk.session.clone();
    let mut pending = Pending {
        queue: None,
        lease: None,
    };
    let mut attempt: u32 = 0;
    loop {
        let session = loop {
            if let Some(session) = sessions.borrow_and_update().clone() {
                break session;
            }
            if sessions.changed().await.is_err() {
                return Err(CoordError::NotConnected);
            }
        };
        match look(zk, &session, &dir, &prefix, &mut pending).await {
            Ok(Step::Held(path)) => {
                pending.lease = None;
                return Ok(Slot {
                    sessions: zk.session.clone(),
                    state: session.client.state_watcher(),
                    epoch: session.epoch,
                    path,
                    released: false,
                });
            }
            Ok(Step::Again) => {}
            Ok(Step::Wait(first, second)) => {
                attempt = 0;
                let second = async {
                    match second {
                        Some(watch) => drop(watch.changed().await),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = first.changed() => {}
                    () = second => {}
                    _ = sessions.changed() => {}
                }
            }
            Err((_, _, e)) if is_transient(&e) => {
                // The session is suspended or gone: the owner reconnects or makes a new one.
                let delay = backoff(attempt, RETRY_MIN_MS, RETRY_MAX_MS);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = sessions.changed() => {}
                }
            }
            Err((op, path, e)) => return Err(CoordError::zk(op, &path, e)),
        }
    }
}

/// One step towards a slot: finds this session's lease (a create whose answer was lost), else
/// makes or finds its queue node and, at the head of the queue, makes a lease if one is free.
async fn look(
    zk: &Zk,
    session: &Session,
    dir: &str,
    prefix: &str,
    pending: &mut Pending,
) -> Result<Step, Failure> {
    use zookeeper_client::Error as E;
    let client = &session.client;
    let acl = &zk.shared.acl;
    let queue_dir = format!("{dir}/{QUEUE}");
    // The queue's node is made when a read finds it missing, not before every look: a create of
    // a node that exists is still a write through the leader.
    let make_queue = || async {
        client
            .mkdir(&queue_dir, &acl.options(CreateMode::Persistent))
            .await
            .map_err(|e| ("create", queue_dir.clone(), e))
            .map(|()| Step::Again)
    };

    // A lease of this session already: it holds the slot (once out of the queue).
    let children = match client.list_children(dir).await {
        Ok(children) => children,
        Err(E::NoNode) => return make_queue().await,
        Err(e) => return Err(("list", dir.to_owned(), e)),
    };
    if let Some(lease) = adopt(client, dir, prefix, &children).await? {
        let path = format!("{dir}/{lease}");
        pending.lease = Some((session.clone(), path.clone()));
        leave_queue(
            client,
            &queue_dir,
            &format!("q-{}", &prefix["lease-".len()..]),
            pending,
        )
        .await?;
        pending.lease = None;
        return Ok(Step::Held(path));
    }

    let queue = match client.list_children(&queue_dir).await {
        Ok(queue) => queue,
        Err(E::NoNode) => return make_queue().await,
        Err(e) => return Err(("list", queue_dir.clone(), e)),
    };
    let queue_prefix = format!("q-{}", &prefix["lease-".len()..]);
    let known = pending
        .queue_name_in(session.epoch)
        .filter(|name| queue.iter().any(|c| c == name))
        .map(str::to_owned);
    let ours = match known {
        Some(name) => name,
        None => match adopt(client, &queue_dir, &queue_prefix, &queue).await? {
            Some(name) => name,
            None => {
                let path = format!("{queue_dir}/{queue_prefix}");
                let options = acl.options(CreateMode::EphemeralSequential);
                let (_, sequence) = match client.create(&path, &[], &options).await {
                    Ok(made) => made,
                    Err(E::NoNode) => return make_queue().await,
                    Err(e) => return Err(("create", path.clone(), e)),
                };
                pending.queue = Some((session.clone(), format!("{path}{sequence}")));
                return Ok(Step::Again);
            }
        },
    };
    pending.queue = Some((session.clone(), format!("{queue_dir}/{ours}")));

    let mut ranked: Vec<(i64, &str)> = queue
        .iter()
        .filter_map(|c| sequence_of(c).map(|s| (s, c.as_str())))
        .collect();
    ranked.sort_unstable();
    match ranked.iter().position(|(_, c)| *c == ours) {
        None => return Ok(Step::Again),
        Some(0) => {}
        Some(rank) => {
            // Not the head: wake up only when the host just before us leaves the queue.
            let before = format!("{queue_dir}/{}", ranked[rank - 1].1);
            let (stat, watch) = client
                .check_and_watch_stat(&before)
                .await
                .map_err(|e| ("stat", before.clone(), e))?;
            return Ok(match stat {
                Some(_) => Step::Wait(watch, None),
                None => Step::Again,
            });
        }
    }

    // The head: count the leases against the limit, watching both.
    let (children, _, children_watch) = client
        .get_and_watch_children(dir)
        .await
        .map_err(|e| ("list", dir.to_owned(), e))?;
    let (limit, _, limit_watch) = match client.get_and_watch_data(dir).await {
        Ok(read) => read,
        Err(E::NoNode) => return Ok(Step::Again),
        Err(e) => return Err(("read", dir.to_owned(), e)),
    };
    // An invalid limit grants no slot: waiting is safe, guessing is not. The daemon shows the
    // error (from its view of the same node) in `status` and in its status node.
    let limit = match parse_limit(dir, Some(&limit)) {
        Ok(Limit::Hosts(n)) => n,
        // A share of the hosts that publish a status node now (this one among them).
        // The count from the node's stat, not a listing: a few bytes whatever the fleet's size.
        Ok(limit @ Limit::Percent(_)) => {
            let status = format!("{}/status", dir.trim_end_matches("/restarting"));
            let hosts = match client.check_stat(&status).await {
                Ok(stat) => stat.map_or(0, |s| s.num_children.max(0) as usize),
                Err(e) => return Err(("stat", status, e)),
            };
            limit.slots(hosts)
        }
        Err(_) => 0,
    };
    let leases = children.iter().filter(|c| c.starts_with("lease-")).count();
    if leases >= limit as usize {
        return Ok(Step::Wait(children_watch, Some(limit_watch)));
    }
    let path = format!("{dir}/{prefix}");
    let options = acl.options(CreateMode::EphemeralSequential);
    let (_, sequence) = client
        .create(&path, &[], &options)
        .await
        .map_err(|e| ("create", path.clone(), e))?;
    let lease = format!("{path}{sequence}");
    pending.lease = Some((session.clone(), lease.clone()));
    // Held once out of the queue. The queue node is the one just ranked: a look adopts a node of
    // this session before making one, so there is no other. (Failing here, the next look finds
    // the lease and leaves the queue the long way.)
    let head = format!("{queue_dir}/{ours}");
    match client.delete(&head, None).await {
        Ok(()) | Err(E::NoNode) => {}
        Err(e) => return Err(("delete", head, e)),
    }
    pending.queue = None;
    pending.lease = None;
    Ok(Step::Held(lease))
}

/// Deletes this session's queue node (the one `pending` knows, and any other of this host made
/// by this session), letting the next host become head.
async fn leave_queue(
    client: &Client,
    queue_dir: &str,
    queue_prefix: &str,
    pending: &mut Pending,
) -> Result<(), Failure> {
    let queue = client
        .list_children(queue_dir)
        .await
        .map_err(|e| ("list", queue_dir.to_owned(), e))?;
    if let Some(name) = adopt(client, queue_dir, queue_prefix, &queue).await? {
        let path = format!("{queue_dir}/{name}");
        match client.delete(&path, None).await {
            Ok(()) | Err(zookeeper_client::Error::NoNode) => {}
            Err(e) => return Err(("delete", path, e)),
        }
    }
    pending.queue = None;
    Ok(())
}

/// Finds a lease of this host made by this session (a create whose answer was lost, or a
/// cancelled call's lease not deleted yet): the host keeps one lease per service. Extra ones
/// are deleted.
async fn adopt(
    client: &Client,
    dir: &str,
    prefix: &str,
    children: &[String],
) -> Result<Option<String>, Failure> {
    let session = client.session_id().0;
    let mut mine: Vec<(i64, &str)> = Vec::new();
    for child in children.iter().filter(|c| c.starts_with(prefix)) {
        let path = format!("{dir}/{child}");
        match client.check_stat(&path).await {
            Ok(Some(stat)) if stat.ephemeral_owner == session => {
                if let Some(sequence) = sequence_of(child) {
                    mine.push((sequence, child));
                }
            }
            Ok(_) => {}
            Err(e) => return Err(("stat", path, e)),
        }
    }
    mine.sort_unstable();
    for (_, extra) in mine.iter().skip(1) {
        let path = format!("{dir}/{extra}");
        match client.delete(&path, None).await {
            Ok(()) | Err(zookeeper_client::Error::NoNode) => {}
            Err(e) => return Err(("delete", path, e)),
        }
    }
    Ok(mine.first().map(|(_, name)| (*name).to_owned()))
}

/// The sequence number ZooKeeper appended to a lease name.
pub(super) fn sequence_of(name: &str) -> Option<i64> {
    name.rsplit('-').next()?.parse().ok()
}

#[cfg(test)]
mod unit {
    use super::sequence_of;

    #[test]
    fn sequences() {
        assert_eq!(sequence_of("lease-h1-0000000003"), Some(3));
        assert_eq!(sequence_of("lease-my-host-0000000010"), Some(10));
        assert_eq!(sequence_of("junk"), None);
    }
}
