//! When a drained instance may be handed to its graceful stop: as soon as none of its connections
//! has a request in flight (`idle`, the default), or once it has no connection left (`closed`), or
//! at `drain_timeout_ms`.
//!
//! Steering moves only new connections; a client's kept-alive connections stay on the drained
//! instance until the instance itself closes them, which only its graceful stop does. Waiting for
//! them to close therefore buys nothing but the timeout. What is worth waiting for is a request
//! that is being received, processed or answered: the kernel tells that per connection through its
//! queues and `tcp_info`'s "milliseconds since data was last received / sent". The caller reads the
//! connections (sock_diag in the daemon) and the clock; this module only decides.

use serde::{Deserialize, Serialize};

/// What a drain waits for (service key `restart.drain_until`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainUntil {
    /// No connection has a request in flight; kept-alive idle connections do not count.
    #[default]
    Idle,
    /// No connection is established or still completing its handshake.
    Closed,
}

/// The TCP states a drain looks at; the reader asks the kernel for these only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// Still completing the handshake: steered here just before the rule change, its request is
    /// yet to come.
    SynRecv,
    Established,
    /// The client has closed its side; the instance may still be answering its last request.
    CloseWait,
}

/// `tcp_info` of a connection: times are in milliseconds before the kernel's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// `tcpi_last_data_recv`: how long ago data last came in from the client.
    pub last_data_recv_ms_ago: u32,
    /// `tcpi_last_data_sent`: how long ago the instance last sent data.
    pub last_data_sent_ms_ago: u32,
    /// `tcpi_bytes_received` (Linux 4.1 and later): `Some(0)` is a connection that has not yet
    /// carried a request.
    pub bytes_received: Option<u64>,
    /// `tcpi_data_segs_out` (Linux 4.6 and later): `Some(0)` after a request is a connection whose
    /// first request is not answered yet, whatever the times say.
    pub data_segs_out: Option<u32>,
    /// `tcpi_snd_mss`: the largest segment the connection sends, in bytes.
    pub snd_mss: u32,
}

/// One connection of the instance (local port = the instance's port), as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub state: TcpState,
    /// Bytes received and not yet read by the instance.
    pub recv_queue_bytes: u32,
    /// Bytes written by the instance and not yet acknowledged by the client.
    pub send_queue_bytes: u32,
    /// `None` when the kernel gave no `tcp_info` (then the connection counts as busy).
    pub activity: Option<Activity>,
}

/// How long a connection that has received nothing yet counts as busy: a client that just
/// connected is about to send its request. After that it is an idle pre-connection (browsers and
/// pools open them) and no reason to wait.
pub const UNUSED_CONNECTION_GRACE_MS: u32 = 1_000;

impl Connection {
    /// Counts for `closed`: established or still completing its handshake (the instance has not
    /// closed it; a connection in CLOSE_WAIT is the instance's own business to close).
    pub fn is_open(&self) -> bool {
        matches!(self.state, TcpState::SynRecv | TcpState::Established)
    }

    /// A request is in flight: being received, processed or answered.
    pub fn in_flight(&self) -> bool {
        if self.state == TcpState::SynRecv {
            return true;
        }
        if self.recv_queue_bytes > 0 {
            return true;
        }
        let Some(a) = self.activity else {
            return true;
        };
        if a.bytes_received == Some(0) {
            return a.last_data_recv_ms_ago < UNUSED_CONNECTION_GRACE_MS;
        }
        if a.data_segs_out == Some(0) {
            // A request came and nothing went out yet: the times alone would not tell when the
            // request came in the tick the connection was made.
            return true;
        }
        // Data came in more recently than data went out: the instance has read a request and not
        // yet answered it. Equal times (same kernel tick) count as answered: a fast response is
        // sent within the tick of its request, and the rare new request that arrived in the tick
        // of the previous response is finished by the graceful stop, which completes requests in
        // flight.
        if a.last_data_recv_ms_ago < a.last_data_sent_ms_ago {
            return true;
        }
        // Answered: what the client has not acknowledged yet is on its way, and a socket that
        // closes still sends it (with its FIN, at once). At most one segment's worth is the tail
        // Nagle's algorithm holds back until the client's delayed ACK (up to 40 ms): a server
        // without TCP_NODELAY, as the JDK's HttpServer by default, has it after most of its
        // responses, so a busy keep-alive connection to it would almost never look answered.
        // More than one segment is a response still being written.
        self.send_queue_bytes > 0 && (a.snd_mss == 0 || self.send_queue_bytes > a.snd_mss)
    }
}

/// How a drain ended, as the log and status show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ending {
    /// Connections were left, none with a request in flight.
    Idle,
    /// No connection was left.
    Closed,
    /// `drain_timeout_ms` passed first.
    Timeout,
}

impl Ending {
    pub fn name(self) -> &'static str {
        match self {
            Ending::Idle => "idle",
            Ending::Closed => "closed",
            Ending::Timeout => "timeout",
        }
    }
}

/// One look at the instance's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Established or completing the handshake.
    pub open: usize,
    /// With a request in flight.
    pub in_flight: usize,
}

impl Tally {
    pub fn of(connections: &[Connection]) -> Self {
        Self {
            open: connections.iter().filter(|c| c.is_open()).count(),
            in_flight: connections.iter().filter(|c| c.in_flight()).count(),
        }
    }
}

/// The decision after one look: `Some(ending)` to stop now, `None` to look again.
pub fn decide(tally: Tally, until: DrainUntil, waited_ms: u64, timeout_ms: u64) -> Option<Ending> {
    if tally.open == 0 && tally.in_flight == 0 {
        return Some(Ending::Closed);
    }
    if until == DrainUntil::Idle && tally.in_flight == 0 {
        return Some(Ending::Idle);
    }
    (waited_ms >= timeout_ms).then_some(Ending::Timeout)
}

/// What a finished drain recorded: the log line and the instance's `last_drain` in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub ending: Ending,
    pub until: DrainUntil,
    /// Connections still open when the drain ended (kept-alive ones, for `idle`).
    pub connections_left: usize,
    /// Of those, with a request in flight (non-zero only for `timeout`).
    pub in_flight_left: usize,
    pub waited_ms: u64,
    /// Looks at the connections, the last one included.
    pub polls: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Activity = Activity {
        last_data_recv_ms_ago: 120,
        last_data_sent_ms_ago: 118,
        bytes_received: Some(4_000),
        data_segs_out: Some(9),
        snd_mss: 1_448,
    };

    fn conn(state: TcpState, rq: u32, wq: u32, activity: Option<Activity>) -> Connection {
        Connection {
            state,
            recv_queue_bytes: rq,
            send_queue_bytes: wq,
            activity,
        }
    }

    fn est(activity: Activity) -> Connection {
        conn(TcpState::Established, 0, 0, Some(activity))
    }

    fn activity(recv: u32, sent: u32, bytes: Option<u64>) -> Activity {
        Activity {
            last_data_recv_ms_ago: recv,
            last_data_sent_ms_ago: sent,
            bytes_received: bytes,
            data_segs_out: bytes.map(|b| u32::from(b > 0)),
            snd_mss: 1_448,
        }
    }

    #[test]
    fn in_flight_per_connection() {
        use TcpState::*;
        let table: &[(&str, Connection, bool)] = &[
            ("idle keep-alive: answered, queues empty", est(IDLE), false),
            (
                "answered in the same tick as the request",
                est(activity(300, 300, Some(80))),
                false,
            ),
            (
                "request read, not yet answered",
                est(activity(5, 130, Some(800))),
                true,
            ),
            (
                "request waiting in the receive queue",
                conn(Established, 78, 0, Some(IDLE)),
                true,
            ),
            (
                "a response of several segments still being written",
                conn(Established, 0, 1_449, Some(IDLE)),
                true,
            ),
            (
                "answered, its tail held by Nagle until the client's ACK",
                conn(Established, 0, 103, Some(activity(16, 12, Some(16_874)))),
                false,
            ),
            (
                "answered in the tick of its request, tail held by Nagle",
                conn(Established, 0, 103, Some(activity(32, 32, Some(20_296)))),
                false,
            ),
            (
                "a tail queued but a request read since: in flight",
                conn(Established, 0, 103, Some(activity(4, 12, Some(20_296)))),
                true,
            ),
            (
                "data queued and no segment size known: cannot tell",
                conn(Established, 0, 103, Some(Activity { snd_mss: 0, ..IDLE })),
                true,
            ),
            ("handshake not complete", conn(SynRecv, 0, 0, None), true),
            (
                "no tcp_info: cannot tell",
                conn(Established, 0, 0, None),
                true,
            ),
            (
                "just connected, nothing sent yet",
                est(activity(30, 30, Some(0))),
                true,
            ),
            (
                "pre-connection idle past the grace",
                est(activity(
                    UNUSED_CONNECTION_GRACE_MS,
                    UNUSED_CONNECTION_GRACE_MS,
                    Some(0),
                )),
                false,
            ),
            (
                "first request read in the tick of the connect, nothing sent yet",
                est(Activity {
                    data_segs_out: Some(0),
                    ..activity(40, 40, Some(90))
                }),
                true,
            ),
            (
                "old kernel without bytes_received, answered",
                est(activity(40, 39, None)),
                false,
            ),
            (
                "client closed after its answer",
                conn(CloseWait, 0, 0, Some(IDLE)),
                false,
            ),
            (
                "client half-closed with its request unread",
                conn(CloseWait, 90, 0, Some(IDLE)),
                true,
            ),
        ];
        for (name, c, want) in table {
            assert_eq!(c.in_flight(), *want, "{name}: {c:?}");
        }
        assert!(!conn(CloseWait, 0, 0, Some(IDLE)).is_open());
        assert!(conn(SynRecv, 0, 0, None).is_open());
    }

    #[test]
    fn decision_table() {
        use DrainUntil as U;
        use Ending as E;
        let busy_read = est(activity(2, 50, Some(500)));
        let busy_queue = conn(TcpState::Established, 12, 0, Some(IDLE));
        let syn = conn(TcpState::SynRecv, 0, 0, None);
        let closing = conn(TcpState::CloseWait, 0, 0, Some(IDLE));
        // (case, connections, mode, waited_ms, decision with drain_timeout_ms = 10000)
        type Case = (
            &'static str,
            Vec<Connection>,
            DrainUntil,
            u64,
            Option<Ending>,
        );
        let table: &[Case] = &[
            ("no connection", vec![], U::Idle, 0, Some(E::Closed)),
            (
                "no connection, closed mode",
                vec![],
                U::Closed,
                0,
                Some(E::Closed),
            ),
            (
                "only idle keep-alive connections",
                vec![est(IDLE); 12],
                U::Idle,
                50,
                Some(E::Idle),
            ),
            (
                "a request in flight (read, unanswered)",
                vec![est(IDLE), busy_read],
                U::Idle,
                50,
                None,
            ),
            (
                "a request in the receive queue",
                vec![busy_queue, est(IDLE)],
                U::Idle,
                50,
                None,
            ),
            ("a handshake in progress", vec![syn], U::Idle, 50, None),
            (
                "in flight at the timeout",
                vec![est(IDLE), busy_read],
                U::Idle,
                10_000,
                Some(E::Timeout),
            ),
            (
                "closed mode waits for idle keep-alive connections",
                vec![est(IDLE); 3],
                U::Closed,
                50,
                None,
            ),
            (
                "closed mode times out on them",
                vec![est(IDLE); 3],
                U::Closed,
                10_001,
                Some(E::Timeout),
            ),
            (
                "closed mode ignores what the client closed",
                vec![closing],
                U::Closed,
                50,
                Some(E::Closed),
            ),
            (
                "idle mode, only a closing connection answered",
                vec![closing],
                U::Idle,
                50,
                Some(E::Closed),
            ),
            (
                "done wins over timeout",
                vec![est(IDLE)],
                U::Idle,
                20_000,
                Some(E::Idle),
            ),
        ];
        for (name, conns, until, waited_ms, want) in table {
            let got = decide(Tally::of(conns), *until, *waited_ms, 10_000);
            assert_eq!(got, *want, "{name}");
        }
    }

    #[test]
    fn tally_counts_open_and_in_flight() {
        let conns = [
            est(IDLE),
            est(activity(1, 9, Some(10))),
            conn(TcpState::SynRecv, 0, 0, None),
            conn(TcpState::CloseWait, 0, 0, Some(IDLE)),
        ];
        assert_eq!(
            Tally::of(&conns),
            Tally {
                open: 3,
                in_flight: 2
            }
        );
    }

    #[test]
    fn names_match_serde() {
        for e in [Ending::Idle, Ending::Closed, Ending::Timeout] {
            assert_eq!(
                serde_json::to_string(&e).unwrap(),
                format!("\"{}\"", e.name())
            );
        }
        let until: DrainUntil = serde_json::from_str("\"closed\"").unwrap();
        assert_eq!(until, DrainUntil::Closed);
    }
}
