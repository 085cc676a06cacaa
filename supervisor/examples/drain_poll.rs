//! Benchmark (not a test): CPU of one look at a drained instance's connections, and of a whole
//! drain that runs to its timeout, through sock_diag (`sluice::service::drain`) against the reading of
//! `/proc/net/tcp{,6}` it replaced, in the same run, in a fresh network namespace with no other
//! socket and with `UNRELATED` sockets of another port open.
//!
//! Usage (root, for the namespace): `cargo run --release -p sluice --example drain_poll -- [POLLS]
//! [DRAIN_MS]`; defaults 500 polls and a 2000 ms drain. Prints one Markdown table.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use sluice::service::drain::{DRAIN_POLL_INTERVAL_MS, SockDiag, wait};
use sluice_strategies::drain::DrainUntil;

/// Established sockets of another port (both ends of `UNRELATED / 2` loopback connections).
const UNRELATED: usize = 1_000;
/// Kept-alive idle connections on the instance's port, as a client pool holds.
const POOL: usize = 10;

/// The reader sluice had before sock_diag: every socket of the namespace, parsed as text.
fn proc_count(port: u16) -> usize {
    let want = format!("{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    let mut f = line.split_whitespace();
                    let local = f.nth(1).unwrap_or_default();
                    let state = f.nth(1).unwrap_or_default();
                    local.rsplit_once(':').is_some_and(|(_, p)| p == want)
                        && ["01", "03"].contains(&state)
                })
                .count()
        })
        .sum()
}

/// CPU time of the whole process (all threads), in microseconds.
fn process_cpu_us() -> u64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// CPU time of this thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn per_poll_us(polls: u32, mut f: impl FnMut() -> usize) -> (f64, usize) {
    let mut seen = 0;
    let begun = thread_cpu_ns();
    for _ in 0..polls {
        seen = std::hint::black_box(f());
    }
    (
        (thread_cpu_ns() - begun) as f64 / 1000.0 / f64::from(polls),
        seen,
    )
}

/// The old drain loop: one /proc read on the blocking pool every poll interval until the timeout.
async fn proc_drain(port: u16, drain_ms: u64) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(drain_ms);
    loop {
        let left = tokio::task::spawn_blocking(move || proc_count(port))
            .await
            .unwrap_or(0);
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_INTERVAL_MS)).await;
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let polls: u32 = args.next().map_or(500, |a| a.parse().expect("POLLS"));
    let drain_ms: u64 = args.next().map_or(2_000, |a| a.parse().expect("DRAIN_MS"));
    // SAFETY: unshare of this (still single-threaded) process into a new network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "drain_poll: unshare(CLONE_NEWNET): {} (run as root)",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("running ip");
    assert!(up.success(), "ip link set lo up failed");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let instance = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = instance.local_addr().unwrap().port();
    let mut pool = Vec::new();
    for _ in 0..POOL {
        let c = TcpStream::connect(instance.local_addr().unwrap()).unwrap();
        let (s, _) = instance.accept().unwrap();
        pool.push((c, s));
    }
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut unrelated = Vec::new();

    println!(
        "| sockets of other ports | reader | CPU per poll (µs) | connections seen | CPU of a {drain_ms} ms drain to its timeout (ms) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for scenario in [0, UNRELATED] {
        while unrelated.len() < scenario {
            let c = TcpStream::connect(other.local_addr().unwrap()).unwrap();
            let (s, _) = other.accept().unwrap();
            unrelated.push(c);
            unrelated.push(s);
        }
        let mut diag = SockDiag::open().expect("sock_diag socket");
        let (diag_us, diag_seen) = per_poll_us(polls, || diag.connections(port).unwrap().len());
        let mut per_family = SockDiag::open().expect("sock_diag socket").per_family();
        let (fam_us, fam_seen) = per_poll_us(polls, || per_family.connections(port).unwrap().len());
        let (proc_us, proc_seen) = per_poll_us(polls, || proc_count(port));

        let cpu = process_cpu_us();
        let outcome = rt.block_on(wait("bench", 0, port, DrainUntil::Closed, drain_ms));
        let diag_drain_ms = (process_cpu_us() - cpu) as f64 / 1000.0;
        assert_eq!(outcome.connections_left, POOL, "{outcome:?}");
        let cpu = process_cpu_us();
        let left = rt.block_on(proc_drain(port, drain_ms));
        let proc_drain_ms = (process_cpu_us() - cpu) as f64 / 1000.0;
        assert_eq!(left, POOL);

        println!(
            "| {scenario} | sock_diag, one walk (TCPDIAG_GETSOCK) | {diag_us:.1} | {diag_seen} | {diag_drain_ms:.2} ({} polls) |",
            outcome.polls
        );
        println!(
            "| {scenario} | sock_diag, per family (SOCK_DIAG_BY_FAMILY ×2) | {fam_us:.1} | {fam_seen} | |"
        );
        println!(
            "| {scenario} | /proc/net/tcp{{,6}} | {proc_us:.1} | {proc_seen} | {proc_drain_ms:.2} |"
        );
    }
    drop((pool, unrelated));
}
