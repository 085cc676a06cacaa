//! Forgets the connection-tracking entries that steering's REDIRECT left pointing at an instance
//! port, over ctnetlink (`NETLINK_NETFILTER`, `IPCTNL_MSG_CT_GET` dump, `IPCTNL_MSG_CT_DELETE`
//! by original tuple).
//!
//! Why: a connection's conntrack entry outlives it (`TIME_WAIT` 120 s, `CLOSE` 10 s), and a new
//! SYN from the same client port to the front port is NATed afresh only when the kernel reopens
//! the entry, which it does after a FIN or a reset from the client. After a reset from the server
//! (an instance closing with unread data, a listener closing on its backlog), the new connection
//! takes the old entry and its NAT to the old instance port, whatever the chain now says: a
//! client port that comes back within 10 s (on loopback, after about 3,000 connections) is
//! refused by an instance that left steering and stopped (`scripts/stale-nat.sh` shows it).
//! So: when an instance out of steering is signalled to stop, its ended entries go; once its
//! process has exited, all of them go.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_HDR_BYTES: usize = 16;
const NFGENMSG_BYTES: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// Attribute type bits that are flags, not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_PROTOINFO: u16 = 4;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const TCP_CONNTRACK_TIME_WAIT: u8 = 7;
const TCP_CONNTRACK_CLOSE: u8 = 8;
const RECV_TIMEOUT_MS: u64 = 1_000;
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Most entries one call deletes; a host holds far fewer to one instance port.
const MAX_DELETES: usize = 65_536;

/// Which of an instance port's entries to forget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Connections that ended (`TIME_WAIT`, `CLOSE`): safe while the instance still runs.
    Ended,
    /// Every entry: only once no process serves the port.
    All,
}

/// One entry of a dump, as far as the choice needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `CTA_TUPLE_ORIG`, attribute header included: sent back as is to delete the entry.
    orig: Vec<u8>,
    zone: Option<Vec<u8>>,
    proto: u8,
    orig_dst_port: u16,
    reply_src_port: u16,
    tcp_state: Option<u8>,
}

impl Entry {
    /// A TCP connection to `front` that steering redirected to `port`, of the kind asked for.
    fn chosen(&self, front: u16, port: u16, which: Which) -> bool {
        self.proto == libc::IPPROTO_TCP as u8
            && self.orig_dst_port == front
            && self.reply_src_port == port
            && (which == Which::All
                || matches!(
                    self.tcp_state,
                    Some(TCP_CONNTRACK_TIME_WAIT | TCP_CONNTRACK_CLOSE)
                ))
    }
}

/// Deletes the entries of connections to `front` that were redirected to `port` (IPv4 and
/// IPv6); the number deleted. An entry gone between the dump and its delete is not an error.
pub fn forget(front: u16, port: u16, which: Which) -> io::Result<usize> {
    let socket = Socket::open()?;
    let mut deleted = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let entries = socket.dump(family)?;
        for entry in entries.iter().filter(|e| e.chosen(front, port, which)) {
            if deleted >= MAX_DELETES {
                return Ok(deleted);
            }
            if socket.delete(family, entry)? {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

struct Socket {
    fd: OwnedFd,
}

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: (RECV_TIMEOUT_MS / 1000) as libc::time_t,
            tv_usec: ((RECV_TIMEOUT_MS % 1000) * 1000) as libc::suseconds_t,
        };
        // SAFETY: setsockopt with a pointer to a live timeval and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) of a live buffer with its length.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv<'a>(&self, buf: &'a mut [u8]) -> io::Result<&'a [u8]> {
        // SAFETY: recv(2) into a live buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n > buf.len() {
            return Err(malformed("message larger than the receive buffer"));
        }
        Ok(&buf[..n])
    }

    fn dump(&self, family: u8) -> io::Result<Vec<Entry>> {
        self.send(&message(
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            &[],
        ))?;
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        let mut entries = Vec::new();
        loop {
            let datagram = self.recv(&mut buf)?;
            if parse_dump(datagram, &mut entries)? {
                return Ok(entries);
            }
        }
    }

    /// Deletes one entry; false when it was gone already.
    fn delete(&self, family: u8, entry: &Entry) -> io::Result<bool> {
        let mut attrs = entry.orig.clone();
        attrs.resize(align4(attrs.len()), 0);
        if let Some(zone) = &entry.zone {
            attrs.extend_from_slice(zone);
            attrs.resize(align4(attrs.len()), 0);
        }
        self.send(&message(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            family,
            &attrs,
        ))?;
        let mut buf = vec![0u8; 4096];
        let answer = self.recv(&mut buf)?;
        match ack(answer)? {
            0 => Ok(true),
            errno if errno == libc::ENOENT => Ok(false),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("ctnetlink answer: {what}"),
    )
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// `nlmsghdr` + `nfgenmsg` + `attrs`, for the ctnetlink message `kind`.
fn message(kind: u16, flags: u16, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR_BYTES + NFGENMSG_BYTES + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq: one request at a time on this socket
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(0); // NFNETLINK_V0
    m.extend_from_slice(&0u16.to_be_bytes()); // res_id
    m.extend_from_slice(attrs);
    m
}

/// The netlink messages of one datagram: (type, payload).
fn messages(mut buf: &[u8]) -> io::Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR_BYTES {
        let len = u32_ne(buf, 0).ok_or_else(|| malformed("short header"))? as usize;
        let kind = u16_ne(buf, 4).ok_or_else(|| malformed("short header"))?;
        if len < NLMSG_HDR_BYTES || len > buf.len() {
            return Err(malformed("message length out of bounds"));
        }
        out.push((kind, &buf[NLMSG_HDR_BYTES..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// The errno of an `NLMSG_ERROR` answer (0: done).
fn ack(datagram: &[u8]) -> io::Result<i32> {
    for (kind, payload) in messages(datagram)? {
        if kind == NLMSG_ERROR {
            let errno = u32_ne(payload, 0).ok_or_else(|| malformed("short error"))? as i32;
            return Ok(-errno);
        }
    }
    Err(malformed("no acknowledgement"))
}

/// Adds the entries of one datagram of a dump; `Ok(true)` once `NLMSG_DONE` came.
fn parse_dump(datagram: &[u8], out: &mut Vec<Entry>) -> io::Result<bool> {
    for (kind, payload) in messages(datagram)? {
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_ne(payload, 0).ok_or_else(|| malformed("short error"))? as i32;
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            _ if kind >> 8 == NFNL_SUBSYS_CTNETLINK => {
                let attrs = payload
                    .get(NFGENMSG_BYTES..)
                    .ok_or_else(|| malformed("short nfgenmsg"))?;
                if let Some(entry) = parse_entry(attrs) {
                    out.push(entry);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// The attributes of `buf`: (type without flags, the whole attribute, its payload).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_ne(buf, 0)?);
        let kind = u16_ne(buf, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let (whole, payload) = (&buf[..len], &buf[4..len]);
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, whole, payload))
    })
}

fn find(buf: &[u8], kind: u16) -> Option<(&[u8], &[u8])> {
    attributes(buf)
        .find(|(k, _, _)| *k == kind)
        .map(|(_, whole, payload)| (whole, payload))
}

/// (protocol, source port, destination port) of a tuple's payload.
fn tuple_ports(tuple: &[u8]) -> Option<(u8, u16, u16)> {
    let (_, proto) = find(tuple, CTA_TUPLE_PROTO)?;
    let num = *find(proto, CTA_PROTO_NUM)?.1.first()?;
    let port = |kind| {
        find(proto, kind).and_then(|(_, p)| Some(u16::from_be_bytes(p.get(..2)?.try_into().ok()?)))
    };
    Some((num, port(CTA_PROTO_SRC_PORT)?, port(CTA_PROTO_DST_PORT)?))
}

/// One conntrack entry's attributes; `None` for one without ports (not TCP or UDP) or malformed.
fn parse_entry(attrs: &[u8]) -> Option<Entry> {
    let (orig, orig_payload) = find(attrs, CTA_TUPLE_ORIG)?;
    let (_, reply) = find(attrs, CTA_TUPLE_REPLY)?;
    let (proto, _, orig_dst_port) = tuple_ports(orig_payload)?;
    let (_, reply_src_port, _) = tuple_ports(reply)?;
    let tcp_state = find(attrs, CTA_PROTOINFO)
        .and_then(|(_, info)| find(info, CTA_PROTOINFO_TCP))
        .and_then(|(_, tcp)| find(tcp, CTA_PROTOINFO_TCP_STATE))
        .and_then(|(_, state)| state.first().copied());
    Some(Entry {
        orig: orig.to_vec(),
        zone: find(attrs, CTA_ZONE).map(|(whole, _)| whole.to_vec()),
        proto,
        orig_dst_port,
        reply_src_port,
        tcp_state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(align4(a.len()), 0);
        a
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn tuple(kind: u16, src: u16, dst: u16) -> Vec<u8> {
        nested(
            kind,
            &[
                nested(1, &[attr(1, &[127, 0, 0, 1]), attr(2, &[127, 0, 0, 1])]),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[6]),
                        attr(CTA_PROTO_SRC_PORT, &src.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dst.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    fn entry(client: u16, front: u16, instance: u16, state: u8) -> Vec<u8> {
        [
            tuple(CTA_TUPLE_ORIG, client, front),
            tuple(CTA_TUPLE_REPLY, instance, client),
            nested(
                CTA_PROTOINFO,
                &[nested(
                    CTA_PROTOINFO_TCP,
                    &[attr(CTA_PROTOINFO_TCP_STATE, &[state])],
                )],
            ),
        ]
        .concat()
    }

    fn datagram(entries: &[Vec<u8>], done: bool) -> Vec<u8> {
        let mut d = Vec::new();
        for e in entries {
            d.extend(message(0, 2, 2, e));
        }
        if done {
            let mut m = message(0, 2, 0, &[]);
            m[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
            d.extend(m);
        }
        d
    }

    /// Which entries a call forgets: TCP to the front port, redirected to the instance port,
    /// of the kind asked for.
    #[test]
    fn chooses_the_instance_ports_entries_table() {
        const CLOSE: u8 = TCP_CONNTRACK_CLOSE;
        const ESTABLISHED: u8 = 3;
        let rows: &[(&str, Vec<u8>, Which, bool)] = &[
            (
                "ended by a reset",
                entry(40_000, 9000, 9101, CLOSE),
                Which::Ended,
                true,
            ),
            (
                "in TIME_WAIT",
                entry(40_000, 9000, 9101, TCP_CONNTRACK_TIME_WAIT),
                Which::Ended,
                true,
            ),
            (
                "established: kept while the instance runs",
                entry(40_000, 9000, 9101, ESTABLISHED),
                Which::Ended,
                false,
            ),
            (
                "established, the process gone",
                entry(40_000, 9000, 9101, ESTABLISHED),
                Which::All,
                true,
            ),
            (
                "another instance",
                entry(40_000, 9000, 9102, CLOSE),
                Which::All,
                false,
            ),
            (
                "another front port",
                entry(40_000, 9001, 9101, CLOSE),
                Which::All,
                false,
            ),
            (
                "a direct connection to the instance port",
                entry(40_000, 9101, 9101, CLOSE),
                Which::All,
                false,
            ),
        ];
        for (name, attrs, which, want) in rows {
            let mut out = Vec::new();
            assert!(parse_dump(&datagram(std::slice::from_ref(attrs), true), &mut out).unwrap());
            assert_eq!(out.len(), 1, "{name}");
            assert_eq!(out[0].chosen(9000, 9101, *which), *want, "{name}");
            // The delete names the entry by its original tuple, as the dump gave it.
            assert_eq!(out[0].orig, attrs[..out[0].orig.len()], "{name}");
            assert_eq!(
                out[0].orig.len(),
                tuple(CTA_TUPLE_ORIG, 1, 1).len(),
                "{name}"
            );
        }
    }

    #[test]
    fn a_dump_spans_datagrams_and_bad_lengths_are_errors() {
        let mut out = Vec::new();
        let first = datagram(&[entry(1, 9000, 9101, 8), entry(2, 9000, 9101, 8)], false);
        assert!(!parse_dump(&first, &mut out).unwrap());
        assert!(parse_dump(&datagram(&[], true), &mut out).unwrap());
        assert_eq!(out.len(), 2);
        let mut bad = datagram(&[entry(1, 9000, 9101, 8)], true);
        bad[0..4].copy_from_slice(&10_000u32.to_ne_bytes());
        assert!(parse_dump(&bad, &mut out).is_err());
        // An attribute that runs past its message ends the entry's parse, not the process.
        let mut cut = entry(1, 9000, 9101, 8);
        cut[0..2].copy_from_slice(&4_000u16.to_ne_bytes());
        let mut out = Vec::new();
        assert!(parse_dump(&datagram(&[cut], true), &mut out).unwrap());
        assert!(out.is_empty());
    }

    /// The real kernel, in a network namespace of the test's own: a connection the server reset
    /// leaves an entry whose NAT sends a new connection from the same client port to the port
    /// that left the chain, until `forget` deletes it.
    #[test]
    fn a_reset_connections_entry_is_forgotten_in_a_real_namespace() {
        if unsafe { libc::geteuid() } != 0 {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "this test needs root, and CI must never skip it"
            );
            eprintln!("skipping: needs root (a network namespace and iptables in it)");
            return;
        }
        // unshare(2) moves only the calling thread (and what it spawns) into the new namespace.
        let outcomes = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            run(&["ip", "link", "set", "lo", "up"]);
            [false, true]
                .map(|forgotten| stale_then_reconnect(40_100 + u16::from(forgotten), forgotten))
        })
        .join()
        .expect("the namespace thread");
        assert_eq!(
            outcomes[0].as_ref().map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionRefused),
            "without forget, the stale entry refuses the new connection (the kernel behaviour \
             this module exists for)"
        );
        assert!(outcomes[1].is_ok(), "after forget: {:?}", outcomes[1]);
    }

    fn run(argv: &[&str]) {
        let status = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .status()
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        assert!(status.success(), "{argv:?}: {status}");
    }

    fn redirect_to(port: u16) {
        run(&["iptables", "-t", "nat", "-F", "OUTPUT"]);
        run(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "127.0.0.1",
            "--dport",
            "9000",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port.to_string(),
        ]);
    }

    fn bound(port: u16) -> socket2::Socket {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        s
    }

    /// Front 9000 → 9101; a connection from `client` that the server resets; the chain moves to
    /// 9102 and 9101 stops listening; (`forget` when asked); a new connection from `client`.
    fn stale_then_reconnect(client: u16, forgotten: bool) -> io::Result<()> {
        let (a, b) = (bound(9101), bound(9102));
        a.listen(8).unwrap();
        b.listen(8).unwrap();
        redirect_to(9101);
        let c = bound(client);
        c.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], 9000)).into())
            .unwrap();
        let (served, _) = a.accept().unwrap();
        served.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(served); // a reset from the server side
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(c);
        redirect_to(9102);
        drop(a);
        if forgotten {
            let n = forget(9000, 9101, Which::Ended).expect("forget");
            assert!(n >= 1, "the reset connection's entry was deleted");
        }
        let c = bound(client);
        let result = c.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], 9000)).into());
        drop(b);
        result
    }
}
