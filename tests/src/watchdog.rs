//! A stand-in for systemd's notify socket: binds a datagram socket, hands the daemon
//! `NOTIFY_SOCKET` and `WATCHDOG_USEC`, and records every datagram with the time it came, so a
//! test can bound the gaps between `WATCHDOG=1` pings while the daemon is busy.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one `recv` waits before the collector looks at its stop flag again.
const RECV_TIMEOUT: Duration = Duration::from_millis(50);

/// One datagram and when it arrived.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub at: Instant,
    pub text: String,
}

/// The socket and its collector thread; stops collecting on drop.
pub struct Notify {
    path: PathBuf,
    /// `WATCHDOG_USEC` handed to the daemon.
    watchdog_usec: u64,
    received: Arc<Mutex<Vec<Datagram>>>,
    stop: Arc<AtomicBool>,
    collector: Option<JoinHandle<()>>,
}

impl Notify {
    /// Binds `path` and starts collecting. The daemon pings every `watchdog / 2`.
    pub fn bind(path: &Path, watchdog: Duration) -> Notify {
        let socket = UnixDatagram::bind(path).expect("binding the notify socket");
        socket
            .set_read_timeout(Some(RECV_TIMEOUT))
            .expect("a read timeout");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let collector = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buffer) {
                        let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                        received.lock().unwrap().push(Datagram {
                            at: Instant::now(),
                            text,
                        });
                    }
                }
            })
        };
        Notify {
            path: path.to_owned(),
            watchdog_usec: watchdog.as_micros() as u64,
            received,
            stop,
            collector: Some(collector),
        }
    }

    /// The variables that make the daemon notify this socket and ping its watchdog.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NOTIFY_SOCKET".into(), self.path.display().to_string()),
            ("WATCHDOG_USEC".into(), self.watchdog_usec.to_string()),
        ]
    }

    /// Every datagram so far.
    pub fn received(&self) -> Vec<Datagram> {
        self.received.lock().unwrap().clone()
    }

    /// Whether some datagram so far has the line `line`.
    pub fn has_line(&self, line: &str) -> bool {
        self.received()
            .iter()
            .any(|d| d.text.lines().any(|l| l == line))
    }

    /// The times of the `WATCHDOG=1` pings so far.
    pub fn pings(&self) -> Vec<Instant> {
        self.received()
            .into_iter()
            .filter(|d| d.text.lines().any(|l| l == "WATCHDOG=1"))
            .map(|d| d.at)
            .collect()
    }

    /// The longest time without a ping between `from` and `to`, counting the stretches from
    /// `from` to the first ping and from the last ping to `to`.
    pub fn longest_silence(&self, from: Instant, to: Instant) -> Duration {
        let mut last = from;
        let mut longest = Duration::ZERO;
        for at in self
            .pings()
            .into_iter()
            .filter(|at| *at > from && *at <= to)
        {
            longest = longest.max(at - last);
            last = at;
        }
        longest.max(to.saturating_duration_since(last))
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(collector) = self.collector.take() {
            let _ = collector.join();
        }
    }
}
