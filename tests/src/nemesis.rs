//! A ZooKeeper nemesis for a [`crate::fleet::Fleet`]: faults from a seed (a host cut off from the
//! ensemble by iptables DROP inside its own namespace, long enough or not to expire its session;
//! SIGSTOP/SIGCONT of one ZooKeeper server), recorders of what happened (each host's own status,
//! polled over its control socket; the leases and status nodes as ZooKeeper holds them, read from
//! the hub), and a checker over those histories.
//!
//! The bound the checker holds the fleet to (ARCHITECTURE.md): at any moment, the hosts with a
//! restart batch in flight are at most `max_hosts_restarting` plus the hosts among them whose
//! lease (the one they held when their batch began) was lost with its session. And a lease a
//! host released (its session still alive) went only after the host's status node said its
//! restart had ended.
//!
//! The histories are read conservatively, so that polling lag never makes a violation up: a host
//! counts as in a batch only from the answer of its first poll that saw one to the request of
//! its last one (a batch seen by one poll alone counts for nothing), and a lease counts as gone
//! from the last observation that still had it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::Netns;

/// Pause between two observations of the leases and status nodes.
const LEASE_POLL_MS: u64 = 50;
/// Session timeout of the recorder's own ZooKeeper client.
const RECORDER_SESSION_TIMEOUT_MS: u64 = 10_000;
/// Bound of one recorder read; a slow one leaves a gap in the history, nothing more.
const RECORDER_READ_TIMEOUT_MS: u64 = 2_000;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// One poll of a host's own status: when it was asked, when it answered, and whether a restart
/// batch was in flight (an instance of the service out of steering or not running while a
/// restart is under way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    pub sent_ms: u64,
    pub recv_ms: u64,
    pub in_batch: bool,
}

/// A lease node of `/services/<svc>/restarting`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub host: String,
    /// The session that owns the ephemeral node.
    pub owner: i64,
}

/// A host's status node as one observation read it.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusNode {
    pub owner: i64,
    pub state: String,
}

/// One observation of the leases (in sequence order) and then of the status nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseObs {
    pub t_ms: u64,
    pub leases: Vec<Lease>,
    pub statuses: BTreeMap<String, StatusNode>,
}

/// What the checker concluded.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    /// The most hosts seen with a batch in flight at one moment.
    pub max_concurrent: usize,
    /// Moments where more hosts were in a batch than the limit, each allowed by a lost lease.
    pub allowed_oversubscriptions: usize,
    /// Leases that vanished with their session.
    pub lost_leases: usize,
    /// Leases released by a live session, each checked against its host's status node.
    pub releases_checked: usize,
    pub violations: Vec<String>,
}

/// A host's batch intervals, read conservatively from its polls (see the module doc).
pub fn batch_intervals(polls: &[Poll]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    for p in polls {
        match (&mut run, p.in_batch) {
            (None, true) => run = Some((p.recv_ms, p.sent_ms)),
            (Some(r), true) => r.1 = p.sent_ms,
            (Some(r), false) => {
                if r.1 > r.0 {
                    out.push(*r);
                }
                run = None;
            }
            (None, false) => {}
        }
    }
    if let Some(r) = run
        && r.1 > r.0
    {
        out.push(r);
    }
    out
}

/// How a lease left, and when (after `after_ms`, the last observation that had it).
#[derive(Debug, Clone)]
struct Gone {
    lease: Lease,
    after_ms: u64,
    /// Lost with its session (the host's status node was gone or another session's).
    lost: bool,
}

fn leases_gone(obs: &[LeaseObs], v: &mut Verdict) -> Vec<Gone> {
    let mut gone = Vec::new();
    for pair in obs.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        for lease in &before.leases {
            if after.leases.iter().any(|l| l.name == lease.name) {
                continue;
            }
            let status = after.statuses.get(&lease.host);
            let lost = status.is_none_or(|s| s.owner != lease.owner);
            if lost {
                v.lost_leases += 1;
            } else {
                v.releases_checked += 1;
                let state = &status.expect("not lost").state;
                if state == "restarting" {
                    v.violations.push(format!(
                        "{} released lease {} (between {} and {} ms) while its status node still \
                         said `restarting`",
                        lease.host, lease.name, before.t_ms, after.t_ms
                    ));
                }
            }
            gone.push(Gone {
                lease: lease.clone(),
                after_ms: before.t_ms,
                lost,
            });
        }
    }
    gone
}

/// The lease `host` held when its batch began at `start_ms`: in the last observation at or
/// before it, else the first after it that shows one.
fn lease_at(obs: &[LeaseObs], host: &str, start_ms: u64) -> Option<String> {
    let of = |o: &LeaseObs| {
        o.leases
            .iter()
            .find(|l| l.host == host)
            .map(|l| l.name.clone())
    };
    obs.iter()
        .rev()
        .filter(|o| o.t_ms <= start_ms)
        .find_map(of)
        .or_else(|| obs.iter().filter(|o| o.t_ms > start_ms).find_map(of))
}

/// Checks the histories against the bound (see the module doc).
pub fn check(limit: usize, polls: &BTreeMap<String, Vec<Poll>>, obs: &[LeaseObs]) -> Verdict {
    let mut v = Verdict::default();
    let gone = leases_gone(obs, &mut v);
    let intervals: BTreeMap<&String, Vec<(u64, u64)>> =
        polls.iter().map(|(h, p)| (h, batch_intervals(p))).collect();
    // The count changes only where an interval begins: check at every start.
    let starts: BTreeSet<u64> = intervals.values().flatten().map(|i| i.0).collect();
    for t in starts {
        let mut inside = Vec::new();
        let mut exempt = 0;
        for (host, list) in &intervals {
            let Some(&(s, _)) = list.iter().find(|(s, e)| *s <= t && t <= *e) else {
                continue;
            };
            inside.push(host.as_str());
            let lease = lease_at(obs, host, s);
            let lost = gone
                .iter()
                .any(|g| g.lost && Some(&g.lease.name) == lease.as_ref() && g.after_ms < t);
            if lost {
                exempt += 1;
            }
        }
        v.max_concurrent = v.max_concurrent.max(inside.len());
        if inside.len() > limit {
            if inside.len() > limit + exempt {
                v.violations.push(format!(
                    "at {t} ms hosts {inside:?} were in a batch at once: limit {limit}, only \
                     {exempt} of them had lost their lease with its session"
                ));
            } else {
                v.allowed_oversubscriptions += 1;
            }
        }
    }
    v
}

/// Records the leases and status nodes of a service from a namespace that reaches the ensemble
/// (the hub), until [`Recorder::finish`].
pub struct Recorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<LeaseObs>>>,
}

impl Recorder {
    /// `servers`: `addr:port,…` (no chroot); `base`: the service's node with the chroot,
    /// e.g. `/sluice/services/py`.
    pub fn start(ns: &Netns, servers: String, base: String) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ns = ns.name.clone();
        let thread = std::thread::spawn(move || {
            crate::netns::enter_named(&ns);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the recorder");
            runtime.block_on(record(servers, base, flag))
        });
        Recorder {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Vec<LeaseObs> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("the recorder panicked")
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn record(servers: String, base: String, stop: Arc<AtomicBool>) -> Vec<LeaseObs> {
    let mut out = Vec::new();
    let mut client: Option<zookeeper_client::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            let connect = zookeeper_client::Client::connector()
                .with_session_timeout(Duration::from_millis(RECORDER_SESSION_TIMEOUT_MS))
                .connect(&servers);
            let bound = Duration::from_millis(RECORDER_SESSION_TIMEOUT_MS);
            client = tokio::time::timeout(bound, connect)
                .await
                .ok()
                .and_then(Result::ok);
        }
        if let Some(c) = &client {
            let bound = Duration::from_millis(RECORDER_READ_TIMEOUT_MS);
            match tokio::time::timeout(bound, observe(c, &base)).await {
                Ok(Ok(o)) => out.push(o),
                Ok(Err(
                    zookeeper_client::Error::SessionExpired | zookeeper_client::Error::ClientClosed,
                )) => {
                    client = None;
                }
                // A server stopped or electing: a gap in the history.
                Ok(Err(_)) | Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(LEASE_POLL_MS)).await;
    }
    out
}

async fn observe(
    c: &zookeeper_client::Client,
    base: &str,
) -> Result<LeaseObs, zookeeper_client::Error> {
    use zookeeper_client::Error as E;
    let dir = format!("{base}/restarting");
    let names = match c.list_children(&dir).await {
        Ok(n) => n,
        Err(E::NoNode) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut leases = Vec::new();
    for name in names {
        // lease-<host>-<seq>
        let Some(rest) = name.strip_prefix("lease-") else {
            continue;
        };
        let Some((host, seq)) = rest.rsplit_once('-') else {
            continue;
        };
        match c.check_stat(&format!("{dir}/{name}")).await? {
            Some(stat) => leases.push((
                seq.parse::<i64>().unwrap_or(i64::MAX),
                Lease {
                    name: name.clone(),
                    host: host.to_owned(),
                    owner: stat.ephemeral_owner,
                },
            )),
            None => continue,
        }
    }
    leases.sort_by_key(|(seq, _)| *seq);
    let status_dir = format!("{base}/status");
    let hosts = match c.list_children(&status_dir).await {
        Ok(n) => n,
        Err(E::NoNode) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut statuses = BTreeMap::new();
    for host in hosts {
        match c.get_data(&format!("{status_dir}/{host}")).await {
            Ok((data, stat)) => {
                let value: Value = serde_json::from_slice(&data).unwrap_or(Value::Null);
                let state = value["state"].as_str().unwrap_or("?").to_owned();
                statuses.insert(
                    host,
                    StatusNode {
                        owner: stat.ephemeral_owner,
                        state,
                    },
                );
            }
            Err(E::NoNode) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(LeaseObs {
        t_ms: now_ms(),
        leases: leases.into_iter().map(|(_, l)| l).collect(),
        statuses,
    })
}

/// A host cut off from the ensemble: DROP rules for the ZooKeeper client ports both ways, in the
/// filter table of the host's own namespace (sluice owns only its nat chains there). Healed on
/// drop.
pub struct Partition {
    netns: String,
    rules: Vec<Vec<String>>,
}

impl Partition {
    pub fn cut(netns: &str, hub_addr: &str, ports: (u16, u16)) -> Partition {
        let range = format!("{}:{}", ports.0, ports.1);
        let rules: Vec<Vec<String>> = [
            ["OUTPUT", "-d", hub_addr, "--dport", &range],
            ["INPUT", "-s", hub_addr, "--sport", &range],
        ]
        .iter()
        .map(|r| {
            vec![
                r[0].to_owned(),
                "-p".into(),
                "tcp".into(),
                r[1].to_owned(),
                r[2].to_owned(),
                r[3].to_owned(),
                r[4].to_owned(),
                "-j".into(),
                "DROP".into(),
            ]
        })
        .collect();
        for rule in &rules {
            iptables(netns, "-I", rule);
        }
        Partition {
            netns: netns.to_owned(),
            rules,
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in &self.rules {
            iptables(&self.netns, "-D", rule);
        }
    }
}

fn iptables(netns: &str, op: &str, rule: &[String]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "iptables", "-w", op])
        .args(rule)
        .output()
        .expect("running iptables");
    assert!(
        out.status.success(),
        "iptables {op} {rule:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A ZooKeeper server frozen with SIGSTOP; SIGCONT on drop.
pub struct Frozen(i32);

impl Frozen {
    pub fn stop(pid: i32) -> Frozen {
        // SAFETY: plain kill(2) on a pid the harness started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The seeds to run: `SLUICE_NEMESIS_SEEDS` is a comma-separated list of seeds or `N` random
/// ones written `random:N`; else `default` random seeds. Each is printed by the test.
pub fn seeds(default: usize) -> Vec<u64> {
    match std::env::var("SLUICE_NEMESIS_SEEDS") {
        Ok(text) if text.starts_with("random:") => {
            let n: usize = text["random:".len()..]
                .parse()
                .expect("SLUICE_NEMESIS_SEEDS=random:N takes a count");
            (0..n).map(|_| rand::random::<u32>().into()).collect()
        }
        Ok(text) => text
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("SLUICE_NEMESIS_SEEDS: seeds are u64")
            })
            .collect(),
        Err(_) => (0..default).map(|_| rand::random::<u32>().into()).collect(),
    }
}

/// Tracks how long something took, for the summary.
pub fn ms_since(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polls(spec: &[(u64, bool)]) -> Vec<Poll> {
        spec.iter()
            .map(|&(t, in_batch)| Poll {
                sent_ms: t,
                recv_ms: t + 10,
                in_batch,
            })
            .collect()
    }

    fn obs(t: u64, leases: &[(&str, &str, i64)], statuses: &[(&str, i64, &str)]) -> LeaseObs {
        LeaseObs {
            t_ms: t,
            leases: leases
                .iter()
                .map(|(n, h, o)| Lease {
                    name: (*n).into(),
                    host: (*h).into(),
                    owner: *o,
                })
                .collect(),
            statuses: statuses
                .iter()
                .map(|(h, o, s)| {
                    (
                        (*h).to_owned(),
                        StatusNode {
                            owner: *o,
                            state: (*s).into(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn intervals_are_read_conservatively() {
        let p = polls(&[
            (0, false),
            (100, true),
            (200, true),
            (300, false),
            (400, true),
            (500, false),
        ]);
        // The lone poll at 400 proves no interval; the first run is 110..200.
        assert_eq!(batch_intervals(&p), vec![(110, 200)]);
    }

    #[test]
    fn two_hosts_in_a_batch_with_live_leases_is_a_violation() {
        let mut p = BTreeMap::new();
        p.insert(
            "h1".to_owned(),
            polls(&[(100, true), (500, true), (600, false)]),
        );
        p.insert(
            "h2".to_owned(),
            polls(&[(200, true), (400, true), (700, false)]),
        );
        let o = vec![
            obs(
                50,
                &[("lease-h1-1", "h1", 1), ("lease-h2-2", "h2", 2)],
                &[("h1", 1, "restarting"), ("h2", 2, "waiting")],
            ),
            obs(800, &[], &[("h1", 1, "serving"), ("h2", 2, "serving")]),
        ];
        let v = check(1, &p, &o);
        assert_eq!(v.max_concurrent, 2);
        assert_eq!(v.violations.len(), 1, "{v:?}");
    }

    #[test]
    fn a_lease_lost_with_its_session_allows_one_more() {
        let mut p = BTreeMap::new();
        p.insert(
            "h1".to_owned(),
            polls(&[(100, true), (900, true), (1000, false)]),
        );
        p.insert(
            "h2".to_owned(),
            polls(&[(500, true), (800, true), (1100, false)]),
        );
        let o = vec![
            obs(
                50,
                &[("lease-h1-1", "h1", 1), ("lease-h2-2", "h2", 2)],
                &[("h1", 1, "restarting"), ("h2", 2, "waiting")],
            ),
            // h1's session expired: its lease and status went together.
            obs(300, &[("lease-h2-2", "h2", 2)], &[("h2", 2, "waiting")]),
            obs(1200, &[], &[("h1", 3, "serving"), ("h2", 2, "serving")]),
        ];
        let v = check(1, &p, &o);
        assert!(v.violations.is_empty(), "{v:?}");
        assert_eq!(
            (v.max_concurrent, v.allowed_oversubscriptions, v.lost_leases),
            (2, 1, 1)
        );
    }

    #[test]
    fn a_release_before_the_end_status_is_a_violation() {
        let p = BTreeMap::new();
        let o = vec![
            obs(50, &[("lease-h1-1", "h1", 1)], &[("h1", 1, "restarting")]),
            obs(100, &[], &[("h1", 1, "restarting")]),
        ];
        let v = check(1, &p, &o);
        assert_eq!(v.releases_checked, 1);
        assert_eq!(v.violations.len(), 1, "{v:?}");
        let o = vec![
            obs(50, &[("lease-h1-1", "h1", 1)], &[("h1", 1, "restarting")]),
            obs(100, &[], &[("h1", 1, "finishing")]),
        ];
        assert!(check(1, &p, &o).violations.is_empty());
    }
}
