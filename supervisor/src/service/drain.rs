//! The drain wait: reads a drained instance's connections through sock_diag (netlink
//! `NETLINK_SOCK_DIAG`, `inet_diag_req_v2` with a port filter in bytecode and `tcp_info`) until
//! [`sluice_strategies::drain::decide`] says it may be stopped.
//!
//! One small module over libc rather than `netlink-packet-sock-diag` + `netlink-sys`: the crate
//! cannot send the `INET_DIAG_REQ_BYTECODE` filter, so the kernel would hand back every socket in
//! the states asked for and the daemon would filter them, O(all sockets) again; what is needed here
//! is one request shape and three fields of the answer, which is less code than the adapter to the
//! crate's types. The reader runs in the daemon's network namespace, which the instances share.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use sluice_strategies::drain::{
    Activity, Connection, DrainUntil, Ending, Outcome, Tally, TcpState, decide,
};

/// Time between two looks at a drained instance's connections.
pub const DRAIN_POLL_INTERVAL_MS: u64 = 50;

/// Longest wait for the kernel's answer to one dump request (it answers at once; this bounds a
/// kernel that does not).
const DIAG_RECV_TIMEOUT_MS: u64 = 1_000;

/// Receive buffer of one `recv`: the kernel fills a dump message up to 32 KiB.
const DIAG_RECV_BUFFER_BYTES: usize = 64 * 1024;

/// Most connections one poll reads for one port; past it the poll is an error (the drain then
/// runs to its timeout) instead of an unbounded read.
const DIAG_MAX_CONNECTIONS: usize = 65_536;

// Kernel ABI (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h, linux/tcp.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The older request (`inet_diag_req`), which dumps both address families in one walk.
const TCPDIAG_GETSOCK: u16 = 18;
const INET_DIAG_REQ_V1_BYTES: usize = 60;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDR_BYTES: usize = 16;
const INET_DIAG_REQ_V2_BYTES: usize = 56;
const INET_DIAG_MSG_BYTES: usize = 72;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;
const TCP_ESTABLISHED: u8 = 1;
const TCP_SYN_RECV: u8 = 3;
const TCP_CLOSE_WAIT: u8 = 8;
/// `struct tcp_info` offsets of the fields read.
const TCPI_SND_MSS: usize = 16;
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_BYTES_RECEIVED: usize = 128;
const TCPI_DATA_SEGS_OUT: usize = 156;

/// A sock_diag request failed.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("sock_diag: {what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("sock_diag: kernel refused the dump of port {port}: {source}")]
    Refused { port: u16, source: io::Error },
    #[error("sock_diag: malformed answer for port {port}: {what}")]
    Malformed { port: u16, what: &'static str },
    #[error("sock_diag: more than {DIAG_MAX_CONNECTIONS} connections on port {port}")]
    TooMany { port: u16 },
}

/// A netlink socket for sock_diag requests.
///
/// The kernel answers a dump by walking the host's whole established-socket hash table (IPv4 and
/// IPv6 share it; 262,144 buckets on a 24 GiB host, whatever the namespace holds), once per
/// request: that walk, not the answer, is the cost of a poll. `SOCK_DIAG_BY_FAMILY` takes one
/// family per request, so two walks; the older `TCPDIAG_GETSOCK` request dumps both families in
/// one walk with the same filter and attributes, and is used while the kernel accepts it.
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
    /// One `TCPDIAG_GETSOCK` walk for both families; false after the kernel refused it (then one
    /// `SOCK_DIAG_BY_FAMILY` request per family).
    one_walk: bool,
}

impl SockDiag {
    pub fn open() -> Result<Self, DiagError> {
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(DiagError::Io {
                what: "socket",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: (DIAG_RECV_TIMEOUT_MS / 1000) as libc::time_t,
            tv_usec: ((DIAG_RECV_TIMEOUT_MS % 1000) * 1000) as libc::suseconds_t,
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
            return Err(DiagError::Io {
                what: "setsockopt SO_RCVTIMEO",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            fd,
            seq: 0,
            one_walk: true,
        })
    }

    /// Uses one `SOCK_DIAG_BY_FAMILY` request per family instead of the one-walk request (for
    /// the benchmark that compares them).
    pub fn per_family(mut self) -> Self {
        self.one_walk = false;
        self
    }

    /// The TCP connections whose local port is `port` (IPv4 and IPv6) in the states a drain
    /// looks at, each with its queues and `tcp_info`.
    pub fn connections(&mut self, port: u16) -> Result<Vec<Connection>, DiagError> {
        let mut out = Vec::new();
        if self.one_walk {
            match self.dump(Shape::BothFamilies, port, &mut out) {
                Err(DiagError::Refused { .. }) => {
                    self.one_walk = false;
                    out.clear();
                }
                result => return result.map(|()| out),
            }
        }
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            self.dump(Shape::Family(family), port, &mut out)?;
        }
        Ok(out)
    }

    fn dump(
        &mut self,
        shape: Shape,
        port: u16,
        out: &mut Vec<Connection>,
    ) -> Result<(), DiagError> {
        {
            self.seq = self.seq.wrapping_add(1);
            let request = request(shape, port, self.seq);
            // SAFETY: send(2) of a live buffer with its length.
            let sent = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    request.as_ptr().cast(),
                    request.len(),
                    0,
                )
            };
            if sent < 0 {
                return Err(DiagError::Io {
                    what: "send",
                    source: io::Error::last_os_error(),
                });
            }
            self.read_dump(port, self.seq, out)
        }
    }

    fn read_dump(&self, port: u16, seq: u32, out: &mut Vec<Connection>) -> Result<(), DiagError> {
        let mut buf = vec![0u8; DIAG_RECV_BUFFER_BYTES];
        loop {
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
                return Err(DiagError::Io {
                    what: "recv",
                    source: io::Error::last_os_error(),
                });
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(DiagError::Malformed {
                    port,
                    what: "message larger than the receive buffer",
                });
            }
            if parse_messages(&buf[..n], port, seq, out)? {
                return Ok(());
            }
        }
    }
}

/// Which request a dump sends.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// `TCPDIAG_GETSOCK` with `inet_diag_req`: IPv4 and IPv6 in one walk.
    BothFamilies,
    /// `SOCK_DIAG_BY_FAMILY` with `inet_diag_req_v2` for this family.
    Family(u8),
}

/// `nlmsghdr` + the request + the bytecode attribute "local port >= port and <= port".
fn request(shape: Shape, port: u16, seq: u32) -> Vec<u8> {
    let states: u32 = (1 << TCP_ESTABLISHED) | (1 << TCP_SYN_RECV) | (1 << TCP_CLOSE_WAIT);
    // Two comparisons of two ops (4 bytes each) each. `yes` goes to the next comparison; `no`
    // jumps 4 bytes past the end, which the kernel takes as "reject".
    let bytecode_len: u16 = 16;
    let mut bytecode = Vec::with_capacity(bytecode_len as usize);
    bytecode.extend_from_slice(&[INET_DIAG_BC_S_GE, 8]);
    bytecode.extend_from_slice(&(bytecode_len + 4).to_ne_bytes());
    bytecode.extend_from_slice(&[0, 0]);
    bytecode.extend_from_slice(&port.to_ne_bytes());
    bytecode.extend_from_slice(&[INET_DIAG_BC_S_LE, 8]);
    bytecode.extend_from_slice(&(8u16 + 4).to_ne_bytes());
    bytecode.extend_from_slice(&[0, 0]);
    bytecode.extend_from_slice(&port.to_ne_bytes());

    let attr_len = 4 + bytecode.len();
    let (kind, body) = match shape {
        Shape::BothFamilies => (TCPDIAG_GETSOCK, INET_DIAG_REQ_V1_BYTES),
        Shape::Family(_) => (SOCK_DIAG_BY_FAMILY, INET_DIAG_REQ_V2_BYTES),
    };
    let total = NLMSG_HDR_BYTES + body + attr_len;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    let ext = 1 << (INET_DIAG_INFO - 1);
    match shape {
        Shape::BothFamilies => {
            // inet_diag_req: family (ignored: both), src_len, dst_len, ext, sockid, states, dbs.
            m.extend_from_slice(&[0, 0, 0, ext]);
            m.extend_from_slice(&[0u8; 48]);
            m.extend_from_slice(&states.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
        }
        Shape::Family(family) => {
            // inet_diag_req_v2: family, protocol, ext (bit INET_DIAG_INFO - 1), pad, states,
            // sockid.
            m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, ext, 0]);
            m.extend_from_slice(&states.to_ne_bytes());
            m.extend_from_slice(&[0u8; 48]);
        }
    }
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    m.extend_from_slice(&bytecode);
    debug_assert_eq!(m.len(), total);
    m
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Parses one datagram of a dump; `Ok(true)` once `NLMSG_DONE` came.
fn parse_messages(
    mut buf: &[u8],
    port: u16,
    seq: u32,
    out: &mut Vec<Connection>,
) -> Result<bool, DiagError> {
    let malformed = |what| DiagError::Malformed { port, what };
    while buf.len() >= NLMSG_HDR_BYTES {
        let len = u32_at(buf, 0).ok_or(malformed("short header"))? as usize;
        let kind = u16_at(buf, 4).ok_or(malformed("short header"))?;
        let msg_seq = u32_at(buf, 8).ok_or(malformed("short header"))?;
        if len < NLMSG_HDR_BYTES || len > buf.len() {
            return Err(malformed("message length out of bounds"));
        }
        let payload = &buf[NLMSG_HDR_BYTES..len];
        buf = &buf[align4(len).min(buf.len())..];
        if msg_seq != seq {
            // An answer to an earlier request that timed out; not ours.
            continue;
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(payload, 0).ok_or(malformed("short error"))? as i32;
                if errno == 0 {
                    continue;
                }
                return Err(DiagError::Refused {
                    port,
                    source: io::Error::from_raw_os_error(-errno),
                });
            }
            SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => {
                if let Some(c) =
                    parse_connection(payload).ok_or(malformed("short inet_diag_msg"))?
                {
                    if out.len() >= DIAG_MAX_CONNECTIONS {
                        return Err(DiagError::TooMany { port });
                    }
                    out.push(c);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// One `inet_diag_msg` and its attributes; `Some(None)` for a state the drain does not look at.
fn parse_connection(msg: &[u8]) -> Option<Option<Connection>> {
    if msg.len() < INET_DIAG_MSG_BYTES {
        return None;
    }
    let state = match msg[1] {
        TCP_ESTABLISHED => TcpState::Established,
        TCP_SYN_RECV => TcpState::SynRecv,
        TCP_CLOSE_WAIT => TcpState::CloseWait,
        _ => return Some(None),
    };
    // inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue, wqueue, ...
    let recv_queue_bytes = u32_at(msg, 56)?;
    let send_queue_bytes = u32_at(msg, 60)?;
    let mut activity = None;
    let mut attrs = &msg[INET_DIAG_MSG_BYTES..];
    while attrs.len() >= 4 {
        let len = u16_at(attrs, 0)? as usize;
        let kind = u16_at(attrs, 2)?;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == INET_DIAG_INFO {
            let info = &attrs[4..len];
            activity = Some(Activity {
                last_data_sent_ms_ago: u32_at(info, TCPI_LAST_DATA_SENT)?,
                last_data_recv_ms_ago: u32_at(info, TCPI_LAST_DATA_RECV)?,
                bytes_received: u64_at(info, TCPI_BYTES_RECEIVED),
                data_segs_out: u32_at(info, TCPI_DATA_SEGS_OUT),
                snd_mss: u32_at(info, TCPI_SND_MSS)?,
            });
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    Some(Some(Connection {
        state,
        recv_queue_bytes,
        send_queue_bytes,
        activity,
    }))
}

/// Waits until the instance on `port` may be stopped (see [`DrainUntil`]) or `timeout_ms` has
/// passed. The one drain wait: stops of a steered instance and the restart's drain batches both
/// come here. A poll that fails is logged and counts as "not done", so a drain whose connections
/// cannot be read runs to its timeout rather than stopping an instance that may be busy.
pub async fn wait(
    service: &str,
    index: u32,
    port: u16,
    until: DrainUntil,
    timeout_ms: u64,
) -> Outcome {
    let started = tokio::time::Instant::now();
    let mut diag: Option<SockDiag> = None;
    let mut polls = 0u32;
    let mut tally = Tally::default();
    let mut logged_error = false;
    loop {
        polls += 1;
        let taken = diag.take();
        let (back, result) = tokio::task::spawn_blocking(move || {
            let mut d = match taken {
                Some(d) => d,
                None => match SockDiag::open() {
                    Ok(d) => d,
                    Err(e) => return (None, Err(e)),
                },
            };
            let r = d.connections(port);
            (Some(d), r)
        })
        .await
        .expect("the sock_diag poll does not panic");
        diag = back;
        let waited_ms = started.elapsed().as_millis() as u64;
        let ending = match result {
            Ok(conns) => {
                tally = Tally::of(&conns);
                let ending = decide(tally, until, waited_ms, timeout_ms);
                if ending == Some(Ending::Timeout) {
                    // What kept the drain waiting, as the kernel told it: an operator (and the
                    // matrix tests) can tell a slow request from a connection misjudged busy.
                    for c in conns.iter().filter(|c| c.in_flight()).take(8) {
                        tracing::info!(service, index, port, connection = ?c, "drain timed out with a request in flight");
                    }
                }
                ending
            }
            Err(e) => {
                if !logged_error {
                    tracing::warn!(
                        service,
                        index,
                        port,
                        "drain: {e}; waiting until drain_timeout_ms"
                    );
                    logged_error = true;
                }
                // A socket that failed once is not trusted for the next poll.
                diag = None;
                (waited_ms >= timeout_ms).then_some(Ending::Timeout)
            }
        };
        if let Some(ending) = ending {
            return Outcome {
                ending,
                until,
                connections_left: tally.open,
                in_flight_left: tally.in_flight,
                waited_ms,
                polls,
            };
        }
        let left_ms = timeout_ms.saturating_sub(waited_ms);
        tokio::time::sleep(Duration::from_millis(
            DRAIN_POLL_INTERVAL_MS.min(left_ms.max(1)),
        ))
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn diag(one_walk: bool) -> SockDiag {
        let d = SockDiag::open().expect("sock_diag socket");
        if one_walk { d } else { d.per_family() }
    }

    fn wait_for(
        one_walk: bool,
        port: u16,
        what: &str,
        ok: impl Fn(&[Connection]) -> bool,
    ) -> Vec<Connection> {
        let mut diag = diag(one_walk);
        // Bounded: the kernel updates queues as segments arrive, within milliseconds on loopback.
        for _ in 0..200 {
            let conns = diag.connections(port).expect("sock_diag dump");
            assert_eq!(
                diag.one_walk, one_walk,
                "the kernel took the request asked for"
            );
            if ok(&conns) {
                return conns;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{what}: {:?}", diag.connections(port));
    }

    /// A listener, one client that got its answer and keeps the connection, one whose request was
    /// sent and not answered (unread, then read): the reader tells each apart. Filtering is by port:
    /// the client side of each connection (another local port) and the listener do not show.
    #[test]
    fn reads_idle_and_busy_connections() {
        for (one_walk, addr) in [
            (true, "127.0.0.1:0"),
            (true, "[::1]:0"),
            (false, "127.0.0.1:0"),
            (false, "[::1]:0"),
        ] {
            let Ok(listener) = TcpListener::bind(addr) else {
                eprintln!("skipping {addr}: no such loopback address here");
                continue;
            };
            let port = listener.local_addr().unwrap().port();
            assert!(diag(one_walk).connections(port).unwrap().is_empty());

            // Keep-alive client: a request, its answer, then nothing.
            let mut idle = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut idle_srv, _) = listener.accept().unwrap();
            idle.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let mut req = [0u8; 18];
            idle_srv.read_exact(&mut req).unwrap();
            idle_srv.set_nodelay(true).unwrap();
            idle_srv
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            let mut resp = [0u8; 38];
            idle.read_exact(&mut resp).unwrap();
            let conns = wait_for(one_walk, port, "one idle connection", |c| {
                c.len() == 1 && !c[0].in_flight()
            });
            assert_eq!(conns[0].state, TcpState::Established);
            let a = conns[0].activity.expect("tcp_info requested");
            // Loopback's segment size is its MTU's (65,536) less the headers.
            assert!(a.snd_mss >= 1_000, "tcpi_snd_mss read: {conns:?}");

            // Busy client: a request the server has not read.
            let mut busy = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut busy_srv, _) = listener.accept().unwrap();
            busy.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
            let conns = wait_for(one_walk, port, "the unread request", |c| {
                c.iter().any(|c| c.recv_queue_bytes == 22)
            });
            assert_eq!(conns.len(), 2, "{conns:?}");
            let tally = Tally::of(&conns);
            assert_eq!((tally.open, tally.in_flight), (2, 1), "{conns:?}");
            assert_eq!(decide(tally, DrainUntil::Idle, 0, 10_000), None);

            // Read but not answered: still in flight (data came in after the last data went out).
            let mut req = [0u8; 22];
            busy_srv.read_exact(&mut req).unwrap();
            std::thread::sleep(Duration::from_millis(30));
            let conns = wait_for(one_walk, port, "the request read", |c| {
                c.iter().all(|c| c.recv_queue_bytes == 0)
            });
            assert_eq!(Tally::of(&conns).in_flight, 1, "{conns:?}");

            // Answered: only kept-alive connections are left, the drain is done as `idle`.
            std::thread::sleep(Duration::from_millis(30));
            busy_srv.set_nodelay(true).unwrap();
            busy_srv
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            let mut resp = [0u8; 38];
            busy.read_exact(&mut resp).unwrap();
            let conns = wait_for(one_walk, port, "both idle", |c| Tally::of(c).in_flight == 0);
            let tally = Tally::of(&conns);
            // Two, not four: the clients' ends (other local ports) are filtered out by the kernel.
            assert_eq!(tally.open, 2, "{conns:?}");
            assert_eq!(
                decide(tally, DrainUntil::Idle, 0, 10_000),
                Some(Ending::Idle)
            );
            assert_eq!(decide(tally, DrainUntil::Closed, 0, 10_000), None);

            drop((idle, idle_srv, busy, busy_srv));
            let conns = wait_for(one_walk, port, "all closed", |c| {
                c.iter().all(|c| !c.is_open())
            });
            assert_eq!(
                decide(Tally::of(&conns), DrainUntil::Closed, 0, 10_000),
                Some(Ending::Closed)
            );
        }
    }

    /// A client that connected and has sent nothing yet is about to send its request.
    #[test]
    fn a_fresh_connection_counts_as_busy() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let conns = wait_for(true, port, "one connection", |c| c.len() == 1);
        let a = conns[0].activity.expect("tcp_info");
        if a.bytes_received.is_none() {
            eprintln!("skipping: this kernel's tcp_info has no bytes_received");
            return;
        }
        assert_eq!(a.bytes_received, Some(0));
        assert!(conns[0].in_flight(), "{conns:?}");
    }

    #[tokio::test]
    async fn wait_ends_idle_with_a_kept_alive_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        server.read_exact(&mut b).unwrap();
        server.set_nodelay(true).unwrap();
        server.write_all(b"pong").unwrap();
        client.read_exact(&mut b).unwrap();
        let out = wait("test", 0, port, DrainUntil::Idle, 5_000).await;
        assert_eq!(out.ending, Ending::Idle, "{out:?}");
        assert_eq!(out.connections_left, 1);
        let out = wait("test", 0, port, DrainUntil::Closed, 200).await;
        assert_eq!(out.ending, Ending::Timeout, "{out:?}");
        assert_eq!((out.connections_left, out.in_flight_left), (1, 0));
        assert!(out.waited_ms >= 200 && out.polls >= 2, "{out:?}");
        drop((client, server));
        let out = wait("test", 0, port, DrainUntil::Closed, 5_000).await;
        assert_eq!(out.ending, Ending::Closed, "{out:?}");
    }

    #[test]
    fn request_is_well_formed() {
        let r = request(Shape::BothFamilies, 0x1234, 7);
        assert_eq!(r.len(), 16 + 60 + 4 + 16);
        assert_eq!(u16_at(&r, 4), Some(TCPDIAG_GETSOCK));
        assert_eq!(u16_at(&r, 16 + 60 + 4 + 6), Some(0x1234));
        let r = request(Shape::Family(libc::AF_INET as u8), 0x1234, 7);
        assert_eq!(r.len(), 16 + 56 + 4 + 16);
        assert_eq!(u32_at(&r, 0), Some(r.len() as u32));
        assert_eq!(u16_at(&r, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!(u16_at(&r, 16 + 56 + 4 + 6), Some(0x1234));
    }

    #[test]
    fn truncated_answers_are_errors() {
        let mut out = Vec::new();
        let mut msg = vec![0u8; 16];
        msg[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(matches!(
            parse_messages(&msg, 80, 0, &mut out),
            Err(DiagError::Malformed { .. })
        ));
        assert!(parse_connection(&[0u8; 10]).is_none());
    }
}
