//! What ZooKeeper costs each host of a fleet, measured from outside the daemons: bytes and packets
//! both ways counted by iptables rules in each host's own namespace (`ByteMeter`), requests per
//! session from the server's `cons` and watches from `wchs` (`parse_cons`, `parse_wchs`), and the
//! moment each host's status node changes, seen by a watch of the bench's own, and a node's
//! `mtime` read by the same client (`StatusClock`).
//! Used by `fleet_bench`'s `zk` mode (`bench/fleet.sh`, issue 12).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::nemesis::now_ms;

/// The comment that marks the meter's rules, so reading and deleting them finds only those.
const COMMENT: &str = "sluice-zkcost";
/// Session timeout of the clock's own client.
const CLOCK_SESSION_TIMEOUT_MS: u64 = 10_000;
/// How often the clock looks whether it should stop.
const CLOCK_POLL_MS: u64 = 100;

/// Counters of one host's traffic with ZooKeeper, both ways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub packets_in: u64,
}

impl Traffic {
    pub fn minus(self, before: Traffic) -> Traffic {
        Traffic {
            bytes_out: self.bytes_out.saturating_sub(before.bytes_out),
            bytes_in: self.bytes_in.saturating_sub(before.bytes_in),
            packets_out: self.packets_out.saturating_sub(before.packets_out),
            packets_in: self.packets_in.saturating_sub(before.packets_in),
        }
    }
}

/// Two counting rules (no target: they count and let the packet go on) in the filter table of a
/// host's namespace: to the ensemble's client ports and from them. Removed on drop.
pub struct ByteMeter {
    netns: String,
    rules: [Vec<String>; 2],
}

impl ByteMeter {
    pub fn install(netns: &str, zk_addr: &str, ports: (u16, u16)) -> ByteMeter {
        let range = format!("{}:{}", ports.0, ports.1);
        let rule = |chain: &str, dir: &str, addr_flag: &str, port_flag: &str| {
            [
                chain,
                "-p",
                "tcp",
                addr_flag,
                zk_addr,
                port_flag,
                &range,
                "-m",
                "comment",
                "--comment",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([format!("{COMMENT}-{dir}")])
            .collect::<Vec<String>>()
        };
        let rules = [
            rule("OUTPUT", "out", "-d", "--dport"),
            rule("INPUT", "in", "-s", "--sport"),
        ];
        for r in &rules {
            iptables(netns, &["-w", "-I"], r);
        }
        ByteMeter {
            netns: netns.to_owned(),
            rules,
        }
    }

    /// The counters now.
    pub fn read(&self) -> Traffic {
        let (packets_out, bytes_out) = counters(&self.netns, "OUTPUT", &format!("{COMMENT}-out"));
        let (packets_in, bytes_in) = counters(&self.netns, "INPUT", &format!("{COMMENT}-in"));
        Traffic {
            bytes_out,
            bytes_in,
            packets_out,
            packets_in,
        }
    }
}

impl Drop for ByteMeter {
    fn drop(&mut self) {
        for r in &self.rules {
            let _ = Command::new("ip")
                .args(["netns", "exec", &self.netns, "iptables", "-w", "-D"])
                .args(r)
                .output();
        }
    }
}

fn iptables(netns: &str, op: &[&str], rule: &[String]) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "iptables"])
        .args(op)
        .args(rule)
        .output()
        .expect("running iptables");
    assert!(
        out.status.success(),
        "iptables {op:?} {rule:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (packets, bytes) of the rule of `chain` whose comment is `comment`.
fn counters(netns: &str, chain: &str, comment: &str) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "iptables", "-w", "-L", chain])
        .args(["-v", "-x", "-n"])
        .output()
        .expect("running iptables -L");
    let text = String::from_utf8_lossy(&out.stdout);
    parse_counters(&text, comment)
        .unwrap_or_else(|| panic!("no rule {comment} in {chain} of {netns}:\n{text}"))
}

/// From `iptables -L CHAIN -v -x -n`: the packets and bytes of the line carrying `/* comment */`.
pub fn parse_counters(text: &str, comment: &str) -> Option<(u64, u64)> {
    let marker = format!("/* {comment} */");
    let line = text.lines().find(|l| l.contains(&marker))?;
    let mut fields = line.split_whitespace();
    let packets = fields.next()?.parse().ok()?;
    let bytes = fields.next()?.parse().ok()?;
    Some((packets, bytes))
}

/// From the server's `cons`: requests received and answers sent, summed by client address.
pub fn parse_cons(text: &str) -> BTreeMap<String, (u64, u64)> {
    let mut by_addr: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix('/') else {
            continue;
        };
        let Some((addr, _)) = rest.split_once(':') else {
            continue;
        };
        let field = |name: &str| {
            let start = line.find(&format!("{name}="))? + name.len() + 1;
            let end = line[start..]
                .find([',', ')'])
                .map_or(line.len(), |e| start + e);
            line[start..end].parse::<u64>().ok()
        };
        let (Some(recved), Some(sent)) = (field("recved"), field("sent")) else {
            continue;
        };
        let entry = by_addr.entry(addr.to_owned()).or_default();
        entry.0 += recved;
        entry.1 += sent;
    }
    by_addr
}

/// From the server's `wchs`: (connections watching, paths watched, watches in all).
pub fn parse_wchs(text: &str) -> Option<(u64, u64, u64)> {
    let mut words = text.split_whitespace();
    let connections = words.next()?.parse().ok()?;
    let paths = words.nth(2)?.parse().ok()?;
    let total = text
        .lines()
        .find_map(|l| l.strip_prefix("Total watches:"))?
        .trim()
        .parse()
        .ok()?;
    Some((connections, paths, total))
}

/// When each host's status node changed, as a client of the bench's own sees it: a persistent
/// recursive watch on the service's `status` node, from inside the hub's namespace.
pub struct StatusClock {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(String, u64)>>>,
    /// With [`StatusClock::start_reading`]: each change's node read right after it, as
    /// (host, ms since the epoch when the read answered, the status JSON).
    values: Arc<Mutex<Vec<(String, u64, serde_json::Value)>>>,
    thread: Option<JoinHandle<()>>,
    /// Paths whose `mtime` the clock's thread reads with its client, and where it answers.
    stats: tokio::sync::mpsc::UnboundedSender<(String, std::sync::mpsc::Sender<Option<u64>>)>,
}

impl StatusClock {
    /// `servers`: `addr:port,…`; `status_dir`: with the chroot, e.g. `/sluice/services/web/status`.
    pub fn start(hub_netns: &str, servers: String, status_dir: String) -> StatusClock {
        Self::start_with(hub_netns, servers, status_dir, false)
    }

    /// [`StatusClock::start`] that also reads each changed node (one `getData` per change, so
    /// not for a bench that counts the ensemble's requests): see [`StatusClock::first_matching`].
    pub fn start_reading(hub_netns: &str, servers: String, status_dir: String) -> StatusClock {
        Self::start_with(hub_netns, servers, status_dir, true)
    }

    fn start_with(hub_netns: &str, servers: String, status_dir: String, read: bool) -> StatusClock {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let values = Arc::new(Mutex::new(Vec::new()));
        let (flag, log, read_log) = (stop.clone(), seen.clone(), values.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let hub = hub_netns.to_owned();
        let (stats, mut stat_rx) =
            tokio::sync::mpsc::unbounded_channel::<(String, std::sync::mpsc::Sender<Option<u64>>)>(
            );
        let thread = std::thread::spawn(move || {
            crate::netns::enter_named(&hub);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the status clock");
            runtime.block_on(async move {
                let client = zookeeper_client::Client::connector()
                    .with_session_timeout(Duration::from_millis(CLOCK_SESSION_TIMEOUT_MS))
                    .connect(&servers)
                    .await
                    .expect("the status clock connects");
                let mut watcher = client
                    .watch(
                        &status_dir,
                        zookeeper_client::AddWatchMode::PersistentRecursive,
                    )
                    .await
                    .expect("the status clock's watch");
                ready_tx.send(()).expect("the bench waits");
                let prefix = format!("{status_dir}/");
                while !flag.load(Ordering::Relaxed) {
                    let wait = Duration::from_millis(CLOCK_POLL_MS);
                    let event = tokio::select! {
                        event = tokio::time::timeout(wait, watcher.changed()) => match event {
                            Ok(event) => event,
                            Err(_) => continue,
                        },
                        Some((path, reply)) = stat_rx.recv() => {
                            let mtime = client.get_data(&path).await.ok().map(|(_, stat)| stat.mtime);
                            let _ = reply.send(mtime.and_then(|m| u64::try_from(m).ok()));
                            continue;
                        }
                    };
                    if event.session_state.is_terminated() {
                        break;
                    }
                    if let Some(host) = event.path.strip_prefix(&prefix) {
                        log.lock().unwrap().push((host.to_owned(), now_ms()));
                        if read {
                            let value = client
                                .get_data(&event.path)
                                .await
                                .ok()
                                .and_then(|(data, _)| serde_json::from_slice(&data).ok());
                            if let Some(value) = value {
                                read_log.lock().unwrap().push((host.to_owned(), now_ms(), value));
                            }
                        }
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the status clock is watching");
        StatusClock {
            stop,
            seen,
            values,
            thread: Some(thread),
            stats,
        }
    }

    /// The `mtime` of `path` (with the chroot), in ms since the epoch: the server's own time of
    /// the transaction that last wrote it, on the clock every namespace of this machine shares.
    pub fn mtime_ms(&self, path: &str) -> Option<u64> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.stats.send((path.to_owned(), reply)).ok()?;
        answer.recv_timeout(Duration::from_secs(30)).ok().flatten()
    }

    /// How many times each host's status node changed from `t0_ms` to `t1_ms`: its status
    /// writes (each a ZooKeeper write, through the leader and a quorum).
    pub fn changes_between(&self, t0_ms: u64, t1_ms: u64) -> BTreeMap<String, u64> {
        let mut count = BTreeMap::new();
        for (host, t) in self.seen.lock().unwrap().iter() {
            if (t0_ms..t1_ms).contains(t) {
                *count.entry(host.clone()).or_insert(0) += 1;
            }
        }
        count
    }

    /// Each host's first status read at or after `t0_ms` for which `cond` holds, in ms after
    /// `t0_ms` (when the read answered: at most that late). Empty without
    /// [`StatusClock::start_reading`].
    pub fn first_matching(
        &self,
        t0_ms: u64,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> BTreeMap<String, u64> {
        let mut first = BTreeMap::new();
        for (host, t, value) in self.values.lock().unwrap().iter() {
            if *t >= t0_ms && cond(value) {
                first.entry(host.clone()).or_insert(t - t0_ms);
            }
        }
        first
    }

    /// Each host's first status change at or after `t0_ms`, in ms after it.
    pub fn first_after(&self, t0_ms: u64) -> BTreeMap<String, u64> {
        let mut first = BTreeMap::new();
        for (host, t) in self.seen.lock().unwrap().iter() {
            if *t >= t0_ms {
                first.entry(host.clone()).or_insert(t - t0_ms);
            }
        }
        first
    }
}

impl Drop for StatusClock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_and_iptables_texts_parse() {
        let cons = " /10.199.0.11:39842[1](queued=0,recved=35,sent=36,sid=0x100,lop=PING,est=1,to=4000)\n /10.199.0.11:39850[1](queued=0,recved=5,sent=5,sid=0x101)\n /10.199.0.12:40000[1](queued=0,recved=7,sent=7)\n /127.0.0.1:1[0](queued=0,recved=0,sent=0)\n\n";
        let by = parse_cons(cons);
        assert_eq!(by["10.199.0.11"], (40, 41));
        assert_eq!(by["10.199.0.12"], (7, 7));
        assert_eq!(
            parse_wchs("21 connections watching 64 paths\nTotal watches:105\n"),
            Some((21, 64, 105))
        );
        let ipt = "Chain OUTPUT (policy ACCEPT 0 packets, 0 bytes)\n    pkts      bytes target     prot opt in     out     source               destination\n     120    13456            6    --  *      *       0.0.0.0/0            10.199.0.1           tcp dpts:2181:2183 /* sluice-zkcost-out */\n";
        assert_eq!(parse_counters(ipt, "sluice-zkcost-out"), Some((120, 13456)));
        assert_eq!(parse_counters(ipt, "sluice-zkcost-in"), None);
    }
}
