//! Restarts proven against the servers and clients users run (issue 7): for each real server
//! (gunicorn `sync`, gunicorn `gthread`, uvicorn, the JDK HttpServer with its default `nodelay`),
//! a drain restart of 4 instances with warm-up on, under three real clients at once, each a cell
//! of the matrix: an aiohttp keep-alive pool that never closes an idle connection, aiohttp opening
//! a new connection per request, and Debian's nginx proxying with upstream keep-alive (driven by
//! an aiohttp pool). Every cell must lose no request; the restart must succeed and leave all 4 in
//! steering; and no drain may run to `drain_timeout_ms`: each ends because no request was in
//! flight (`idle`, with keep-alive connections left) or no connection was left (`closed`), as the
//! daemon's log records it. The four servers are four tests, run in parallel, each in its own
//! namespace.

use std::time::{Duration, Instant};

use sluice_tests::matrix::{ClientLimits, ClientMode, ClientReport, HttpClient, Nginx, Server};
use sluice_tests::netns::Netns;
use sluice_tests::{Host, PATIENCE, Status, require_root, run_bounded};

const SERVICE: &str = "app";
const INSTANCES: u32 = 4;
/// Inside the test's own namespace, so every test can use the same ports.
const PORT_BASE: u16 = 9100;
const FRONT_PORT: u16 = 9000;
const NGINX_PORT: u16 = 8080;
/// Far above what an idle drain takes, so a drain that ends at the timeout cannot pass for one
/// that ended because nothing was in flight.
const DRAIN_TIMEOUT_MS: u64 = 8000;
/// Requests per second of each client (three clients per server, four servers at once).
const CLIENT_RATE_PER_S: u32 = 30;
/// Upper bound of each client's run, seconds (the client stops itself after it).
const CLIENT_MAX_SECONDS: u64 = 180;
/// How long the clients run before the restart, so the pools hold connections to every instance.
const LOAD_BEFORE_RESTART: Duration = Duration::from_secs(2);
/// How long the clients go on after every instance is back in steering.
const LOAD_AFTER_RESTART: Duration = Duration::from_secs(1);
/// Upper bound of the restart of 4 instances on a loaded 2-core machine (even with every drain
/// running to its timeout it ends well within this).
const RESTART_TIMEOUT: Duration = Duration::from_secs(150);
/// A cell whose client sent fewer requests than this did not run.
const MIN_REQUESTS_PER_CELL: u64 = 60;

/// Every instance runs and is in steering, and no restart is in progress.
fn all_enabled(s: &Status) -> bool {
    let instances = s.instances(SERVICE);
    instances.len() == INSTANCES as usize
        && instances
            .iter()
            .all(|i| i["state"] == "running" && i["enabled"] == true)
        && !s.restart_in_progress(SERVICE)
}

#[test]
fn gunicorn_sync_under_every_client() {
    restart_matrix(Server::GunicornSync);
}

#[test]
fn gunicorn_gthread_under_every_client() {
    restart_matrix(Server::GunicornGthread);
}

#[test]
fn uvicorn_under_every_client() {
    restart_matrix(Server::Uvicorn);
}

#[test]
fn java_httpserver_default_nodelay_under_every_client() {
    restart_matrix(Server::JavaDefault);
}

fn restart_matrix(server: Server) {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let h = Host::new().in_netns(&ns);
    let Some(command) = server.command(h.root()) else {
        return;
    };
    h.service(
        SERVICE,
        &server.service_toml(&command, INSTANCES, PORT_BASE, FRONT_PORT, DRAIN_TIMEOUT_MS),
    );
    h.start_daemon();
    let before = h.wait_until(all_enabled, PATIENCE * 3);
    let Some(nginx) = Nginx::start(&ns, &h.path("nginx"), NGINX_PORT, &[FRONT_PORT]) else {
        return;
    };
    let limits = ClientLimits {
        rate_per_s: CLIENT_RATE_PER_S,
        max_seconds: CLIENT_MAX_SECONDS,
        max_requests: u64::from(CLIENT_RATE_PER_S) * CLIENT_MAX_SECONDS,
    };
    let front = format!("http://127.0.0.1:{FRONT_PORT}/item");
    let via_nginx = format!("http://127.0.0.1:{NGINX_PORT}/item");
    let cells = [
        ("keep-alive pool", ClientMode::Pool, &front),
        (
            "new connection per request",
            ClientMode::NewConnections,
            &front,
        ),
        ("nginx upstream keep-alive", ClientMode::Pool, &via_nginx),
    ];
    let mut clients = Vec::new();
    for (name, mode, url) in cells {
        let Some(client) = HttpClient::start(&ns, name, mode, url, limits) else {
            return;
        };
        clients.push(client);
    }
    std::thread::sleep(LOAD_BEFORE_RESTART);

    let listen_before = ns.listen_counters();
    let begun = Instant::now();
    let restart = run_bounded(h.sluice_command(&["restart", SERVICE]), RESTART_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", server.name(), h.daemon_log_tail()));
    let restart_took = begun.elapsed();
    // Whatever the restart's outcome, let the clients see the end of it before judging.
    let after = h.wait_until(all_enabled, PATIENCE * 3);
    std::thread::sleep(LOAD_AFTER_RESTART);
    let reports: Vec<ClientReport> = clients.into_iter().map(HttpClient::finish).collect();
    let nginx_log = nginx.log();
    let listen_after = ns.listen_counters();

    let log = std::fs::read_to_string(h.path("daemon.log")).unwrap_or_default();
    let endings = sluice_tests::matrix::drain_endings(&log, SERVICE);
    for r in &reports {
        println!(
            "{} × {}: {} ok, {} retried (idle connection closed under it), {} failed; latency {}",
            server.name(),
            r.name,
            r.ok,
            r.retried,
            r.failed,
            r.latencies_ms
        );
    }
    println!(
        "{}: restart {restart_took:?}, exit {:?}; drains ended {endings:?}; listen drops {listen_before:?} -> {listen_after:?}; nginx: {} requests, {} resent upstream, {} not 200",
        server.name(),
        restart.code,
        nginx_log.requests,
        nginx_log.retried_upstream,
        nginx_log.not_ok
    );

    assert_eq!(
        restart.code,
        Some(0),
        "{}: the restart must succeed: {restart}",
        server.name()
    );
    for r in &reports {
        assert_eq!(
            r.failed,
            0,
            "{} × {}: {} of {} requests failed: {:#?}\nthe restart as the daemon logged it:\n{}",
            server.name(),
            r.name,
            r.failed,
            r.total(),
            r.failures,
            sluice_tests::matrix::restart_timeline(&log, SERVICE)
        );
        assert!(
            r.total() >= MIN_REQUESTS_PER_CELL,
            "{} × {}: only {} requests were sent; the client did not run",
            server.name(),
            r.name,
            r.total()
        );
    }
    assert_eq!(
        nginx_log.not_ok,
        0,
        "{}: nginx answered requests with errors: {:#?}\n{}",
        server.name(),
        nginx_log.samples,
        nginx.error_log()
    );
    assert!(
        nginx_log.requests >= MIN_REQUESTS_PER_CELL,
        "{}: nginx proxied only {} requests",
        server.name(),
        nginx_log.requests
    );
    // Every instance was restarted (a new process) and is back in steering.
    for i in 0..INSTANCES {
        assert_ne!(
            after.pid(SERVICE, i),
            before.pid(SERVICE, i),
            "{}: {SERVICE}/{i} was not restarted:\n{after}",
            server.name()
        );
    }
    assert!(
        after.service(SERVICE)["last_restart_error"].is_null(),
        "{after}"
    );
    assert_eq!(
        sluice_tests::stops_after_drain(&log, SERVICE),
        INSTANCES as usize,
        "{}: one stop per instance, each after its drain",
        server.name()
    );
    assert_eq!(
        endings.len(),
        INSTANCES as usize,
        "{}: the daemon's log records how each of the 4 drains ended: {endings:?}\n{}",
        server.name(),
        h.daemon_log_tail()
    );
    // `idle`: connections were left but none had a request in flight; `closed`: none was left at
    // all. Either way the drain ended on its own, never at `drain_timeout_ms`.
    assert!(
        endings.iter().all(|e| e == "idle" || e == "closed"),
        "{}: every drain ends because no request was in flight, not at drain_timeout_ms: {endings:?}\nwhat the kernel told of the connections counted busy:\n{}",
        server.name(),
        log.lines()
            .filter(|l| l.contains("drain timed out with a request in flight"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    if server.keeps_alive() {
        // The pools keep connections to the instances: the idle rule, not an empty instance, is
        // what ended the drains.
        assert!(
            endings.iter().any(|e| e == "idle"),
            "{}: with keep-alive pools, drains end with connections left and idle: {endings:?}",
            server.name()
        );
    }
}
