//! How many connections an instance still has: established (or half-open) TCP sockets whose local
//! port is the instance's, read from /proc/net/tcp and /proc/net/tcp6 of the daemon's network
//! namespace (the instances share it).

use std::time::Duration;

/// Kernel TCP states that count as traffic: ESTABLISHED (01) and SYN_RECV (03), the latter being
/// connections steered here just before the rule change that are still completing their handshake.
const BUSY_STATES: [&str; 2] = ["01", "03"];

/// Counts busy sockets on `port` in the text of a /proc/net/tcp{,6} file.
pub fn count_in(table: &str, port: u16) -> usize {
    let want = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1).unwrap_or_default();
            let state = fields.nth(1).unwrap_or_default();
            local.rsplit_once(':').is_some_and(|(_, p)| p == want) && BUSY_STATES.contains(&state)
        })
        .count()
}

/// Busy connections on `port`, IPv4 and IPv6.
pub fn count(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| count_in(&table, port))
        .sum()
}

/// Waits until `port` has no busy connection, or `timeout_ms`; returns the connections left.
pub async fn wait(port: u16, timeout_ms: u64) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        let left = tokio::task::spawn_blocking(move || count(port))
            .await
            .unwrap_or(0);
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_established_sockets_of_the_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:238C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:238C 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:A1B2 0100007F:238C 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:238C 0100007F:A1B3 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
   4: 0100007F:238C 0100007F:A1B4 03 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(
            count_in(table, 0x238C),
            2,
            "established + syn-recv, not listen/time-wait/the client side"
        );
        assert_eq!(count_in(table, 9101), 0);
    }

    #[test]
    fn counts_a_real_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(count(port), 0);
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(count(port), 1);
        drop((client, server));
    }
}
