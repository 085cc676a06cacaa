//! The exposition of every family (names, HELP and TYPE lines, labels, both formats) and the
//! bounds of the TCP listener, against a fake daemon loop.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::*;

/// A status with one service, one instance warming up done and one draining, and a deploy.
fn status() -> StatusDocument {
    let instance = |index: u32, state: &str, warmup: serde_json::Value| {
        serde_json::json!({
            "service": "web", "index": index, "state": state, "desired": "up",
            "healthy": true, "restarts": 0, "failed_starts": 0, "outdated": false,
            "warmup": warmup,
        })
    };
    let warm = serde_json::json!({
        "requests": 40, "errors": 0, "duration_ms": 1200,
        "first_window": {"requests": 10, "p50_us": 900, "p90_us": 2000, "p99_us": 25_000, "max_us": 30_000},
        "last_window": {"requests": 10, "p50_us": 500, "p90_us": 800, "p99_us": 1_500, "max_us": 2_000},
    });
    serde_json::from_value(serde_json::json!({
        "services": [{
            "service": "web", "strategy": "drain",
            "instances": [instance(0, "running", warm), instance(1, "draining", serde_json::Value::Null)],
            "deploy": {"build": "b2", "phase": "restarting", "started_ms": 1},
        }]
    }))
    .expect("a status document")
}

fn recorded() -> Metrics {
    let metrics = Metrics::new(true);
    metrics.restart("web", RestartReason::Deploy);
    metrics.restart("web", RestartReason::Exit);
    metrics.restart("web", RestartReason::Exit);
    metrics.drained("web", 250);
    metrics.warmed("web", 1_200);
    metrics.deployed("web", "succeeded", 42_000);
    let tally = FetchTally::default();
    tally.add(FetchSource::Store, 1_000);
    tally.add(FetchSource::Peer, 24);
    metrics.fetched("web", &tally, 300);
    metrics.steered("web", true);
    metrics.steered("web", false);
    metrics.session(SessionState::Connected);
    metrics.session_expired();
    metrics
}

/// The `# TYPE` of each family, in the classic format.
const FAMILIES: [(&str, &str); 14] = [
    ("sluice_restarts_total", "counter"),
    ("sluice_drain_duration_seconds", "histogram"),
    ("sluice_warmup_duration_seconds", "histogram"),
    ("sluice_deploy_duration_seconds", "histogram"),
    ("sluice_fetch_bytes_total", "counter"),
    ("sluice_fetch_duration_seconds", "histogram"),
    ("sluice_steering_transactions_total", "counter"),
    ("sluice_steering_failures_total", "counter"),
    ("sluice_zookeeper_session_state", "gauge"),
    ("sluice_zookeeper_session_expirations_total", "counter"),
    ("sluice_build_info", "gauge"),
    ("sluice_instances", "gauge"),
    ("sluice_warmup_window_p99_seconds", "gauge"),
    ("sluice_deploy_phase", "gauge"),
];

#[test]
fn every_family_has_help_type_and_its_samples_in_the_classic_format() {
    let text = recorded().encode(&status(), false);
    for (name, kind) in FAMILIES {
        assert!(
            text.contains(&format!("\n# TYPE {name} {kind}\n")),
            "no TYPE {kind} for {name}:\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{text}"
        );
    }
    for sample in [
        r#"sluice_restarts_total{service="web",reason="exit"} 2"#,
        r#"sluice_restarts_total{service="web",reason="deploy"} 1"#,
        r#"sluice_drain_duration_seconds_count{service="web"} 1"#,
        r#"sluice_drain_duration_seconds_bucket{service="web",le="0.25"} 1"#,
        r#"sluice_drain_duration_seconds_bucket{service="web",le="0.1"} 0"#,
        r#"sluice_warmup_duration_seconds_sum{service="web"} 1.2"#,
        r#"sluice_deploy_duration_seconds_count{service="web",outcome="succeeded"} 1"#,
        r#"sluice_fetch_bytes_total{service="web",source="store"} 1000"#,
        r#"sluice_fetch_bytes_total{service="web",source="peer"} 24"#,
        r#"sluice_steering_transactions_total{service="web"} 2"#,
        r#"sluice_steering_failures_total{service="web"} 1"#,
        r#"sluice_zookeeper_session_state{state="connected"} 1"#,
        r#"sluice_zookeeper_session_state{state="disconnected"} 0"#,
        "sluice_zookeeper_session_expirations_total 1",
        r#"sluice_instances{service="web",state="running"} 1"#,
        r#"sluice_instances{service="web",state="draining"} 1"#,
        r#"sluice_instances{service="web",state="backoff"} 0"#,
        r#"sluice_warmup_window_p99_seconds{service="web",instance="0",window="first"} 0.025"#,
        r#"sluice_warmup_window_p99_seconds{service="web",instance="0",window="last"} 0.0015"#,
        r#"sluice_deploy_phase{service="web",phase="restarting"} 1"#,
        r#"sluice_deploy_phase{service="web",phase="installing"} 0"#,
    ] {
        assert!(
            text.lines().any(|l| l == sample),
            "no line `{sample}`:\n{text}"
        );
    }
    assert!(
        text.contains(&format!(
            "sluice_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    // An instance without a warm-up has no window gauge.
    assert!(!text.contains(r#"instance="1",window"#), "{text}");
    assert!(
        !text.contains("# EOF"),
        "the classic format has no EOF:\n{text}"
    );
}

#[test]
fn openmetrics_has_units_and_one_eof_at_the_end() {
    let text = recorded().encode(&status(), true);
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    assert!(
        text.contains("# TYPE sluice_restarts counter\n"),
        "OpenMetrics names the counter family without _total:\n{text}"
    );
    assert!(
        text.contains("# UNIT sluice_drain_duration_seconds seconds\n"),
        "{text}"
    );
    assert!(
        text.contains(r#"sluice_restarts_total{service="web",reason="exit"} 2"#),
        "{text}"
    );
}

#[test]
fn the_local_backend_has_no_session_families_and_nothing_recorded_shows_no_series() {
    let text = Metrics::new(false).encode(&StatusDocument::default(), false);
    assert!(!text.contains("zookeeper"), "{text}");
    // A family without a series is left out whole (prometheus-client writes no HELP for it).
    assert!(!text.contains("sluice_restarts_total"), "{text}");
    assert!(text.contains("sluice_build_info{"), "{text}");
    assert!(!text.contains("sluice_deploy_phase{"), "{text}");
}

/// A daemon loop that answers every metrics request with `EXPOSITION`, and panics on anything
/// else: the listener may ask for nothing but the metrics.
const EXPOSITION: &str = "fake_metric_total 7\n";

async fn listener() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            match request {
                queue::Request::Metrics { reply, .. } => {
                    let _ = reply.send(Ok(EXPOSITION.to_owned()));
                }
                _ => panic!("the metrics listener asked the daemon for something else"),
            }
        }
    });
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_tcp(listener, tx, std::future::pending()));
    (addr, server)
}

/// Sends `request` and reads the whole answer (the listener closes after one), bounded.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // A refused write (the server closed first) is an answer too: the read below says what came.
    let _ = stream.write_all(request).await;
    read_all(&mut stream).await
}

async fn read_all(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer));
    match read.await {
        Ok(_) => String::from_utf8_lossy(&answer).into_owned(),
        Err(_) => panic!(
            "no end of the answer within 30 s: {:?}",
            String::from_utf8_lossy(&answer)
        ),
    }
}

#[tokio::test]
async fn the_listener_serves_get_metrics_and_404_for_everything_else() {
    let (addr, server) = listener().await;
    let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains(CONTENT_TYPE_TEXT), "{ok}");
    assert!(ok.ends_with(EXPOSITION), "{ok}");
    let open = exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    )
    .await;
    assert!(open.contains("application/openmetrics-text"), "{open}");
    for request in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics/../v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let answer = exchange(addr, request).await;
        assert!(
            answer.starts_with("HTTP/1.1 404"),
            "{}: {answer}",
            String::from_utf8_lossy(request)
        );
        assert!(!answer.contains("fake_metric"), "{answer}");
    }
    // Not HTTP at all: an error status or a closed connection, never the metrics.
    let garbage = exchange(addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
    assert!(!garbage.contains("fake_metric"), "{garbage}");
    assert!(!garbage.starts_with("HTTP/1.1 200"), "{garbage}");
    server.abort();
}

#[tokio::test]
async fn an_oversized_request_head_is_refused_and_serves_nothing() {
    let (addr, server) = listener().await;
    let mut request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 4 * TCP_HEAD_MAX_BYTES));
    request.extend_from_slice(b"\r\n\r\n");
    let answer = exchange(addr, &request).await;
    assert!(!answer.contains("fake_metric"), "{answer}");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "refused with 431 or closed: {answer}"
    );
    // The listener still serves after it.
    let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(ok.ends_with(EXPOSITION), "{ok}");
    server.abort();
}

#[tokio::test]
async fn connections_beyond_the_bound_are_closed_and_a_silent_one_is_cut() {
    let (addr, server) = listener().await;
    // Hold every slot with connections that send half a head and then nothing.
    let mut held = Vec::new();
    for _ in 0..TCP_CONNECTIONS_MAX {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /metr").await.unwrap();
        held.push(stream);
    }
    // Let the listener accept them all before the next one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        refused.is_empty(),
        "a connection beyond {TCP_CONNECTIONS_MAX} is closed unanswered: {refused}"
    );
    // Each silent connection is cut once its head is late (TCP_HEADER_TIMEOUT_MS), 408 or closed.
    for stream in &mut held {
        let answer = read_all(stream).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
    drop(held);
    // Their slots are free again: bounded retries while the tasks end.
    let mut served = String::new();
    for _ in 0..50 {
        served = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if !served.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served.ends_with(EXPOSITION), "{served}");
    server.abort();
}

#[tokio::test]
async fn a_port_in_use_is_an_error_naming_the_key_and_the_address() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let e = bind(addr).await.unwrap_err().to_string();
    assert!(e.starts_with(&format!("metrics.listen {addr}: ")), "{e}");
}
