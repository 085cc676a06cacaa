//! systemd notify: under `Type=notify` the daemon sends READY=1 with a STATUS, pings the watchdog at
//! half of WATCHDOG_USEC, and STOPPING=1 on `sluice shutdown` (then exits 10). Instances never see
//! NOTIFY_SOCKET or WATCHDOG_*.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use sluice_tests::{Host, PATIENCE, procs};

/// Receives datagrams until one satisfies `want`; returns it and how many earlier ones satisfied
/// `count`. Fails after `timeout`, listing what came.
#[track_caller]
fn receive_until(
    socket: &UnixDatagram,
    timeout: Duration,
    what: &str,
    want: impl Fn(&str) -> bool,
    count: impl Fn(&str) -> bool,
) -> (String, usize) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut counted = 0;
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        let Ok(n) = socket.recv(&mut buffer) else {
            continue; // the read timeout: look at the deadline again
        };
        let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
        if want(&text) {
            return (text, counted);
        }
        if count(&text) {
            counted += 1;
        }
        seen.push(text);
    }
    panic!("no {what} within {timeout:?}; received: {seen:?}");
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[test]
fn daemon_notifies_ready_watchdog_and_stopping_and_hides_the_socket_from_instances() {
    let h = Host::new();
    h.service(
        "quiet",
        r#"
command = ["/bin/sleep", "1000"]
stop_grace_ms = 2000
env = { PATH = "/usr/bin:/bin" }
"#,
    );
    h.service(
        "envdump",
        r#"
command = ["/usr/bin/env"]
autorestart = "never"
env = { ONLY = "this" }
"#,
    );
    let path = h.path("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // WATCHDOG_PID is left unset (the harness removes it): the watchdog is meant for this daemon.
    h.spawn_daemon(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);

    let (ready, _) = receive_until(
        &socket,
        PATIENCE,
        "READY=1",
        |t| has_line(t, "READY=1"),
        |_| false,
    );
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=")),
        "READY without STATUS: {ready:?}"
    );
    // Pings every 200 ms; two within 2 s leaves room for a loaded machine.
    let watchdog_start = Instant::now();
    let mut pings = 0;
    let mut buffer = [0u8; 4096];
    while pings < 2 {
        assert!(
            watchdog_start.elapsed() < Duration::from_secs(2),
            "only {pings} WATCHDOG=1 within 2 s"
        );
        if let Ok(n) = socket.recv(&mut buffer)
            && has_line(&String::from_utf8_lossy(&buffer[..n]), "WATCHDOG=1")
        {
            pings += 1;
        }
    }

    let s = h.wait_until(
        |s| s.running("quiet") == 1 && s.state("envdump", 0) == "exited",
        PATIENCE,
    );
    let pid = s.pid("quiet", 0).unwrap();
    let shim_pid = s.shim_pid("quiet", 0).unwrap();
    assert_eq!(
        procs::environ(pid).unwrap_or_default(),
        ["PATH=/usr/bin:/bin"],
        "environment of the instance"
    );
    let shim_env = procs::environ(shim_pid).unwrap_or_default();
    assert!(
        !shim_env
            .iter()
            .any(|v| v.starts_with("NOTIFY_SOCKET=") || v.starts_with("WATCHDOG_")),
        "the shim sees {shim_env:?}"
    );
    let env = h.wait_for_log("envdump", 0, |t| !t.is_empty(), PATIENCE);
    assert_eq!(env, "ONLY=this\n", "what `env` printed");

    h.sluice(&["shutdown"]).success();
    receive_until(
        &socket,
        PATIENCE,
        "STOPPING=1",
        |t| has_line(t, "STOPPING=1"),
        |_| false,
    );
    let status = h.wait_daemon_exit(PATIENCE);
    assert_eq!(
        status.code(),
        Some(10),
        "exit status after `sluice shutdown`"
    );
    assert!(!procs::is_live(pid), "shutdown left the instance running");
}
