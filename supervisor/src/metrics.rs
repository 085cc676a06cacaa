//! sluice's own Prometheus metrics: the counters and histograms the daemon records as outcomes
//! arrive (restarts, drains, warm-ups, deploys, fetches, steering, the ZooKeeper session), the
//! gauges computed at scrape time from the status document the daemon already answers
//! (instances by state, warm-up windows, deploy phase), their text exposition, and the optional
//! TCP listener (`[metrics] listen`) that serves nothing but `GET /metrics`.
//!
//! One [`Metrics`] is made by `daemon::run` and shared (an `Arc`) with the service tasks through
//! their context; nothing here is global. Counters live as long as the daemon: a new daemon starts
//! them at zero, which Prometheus reads as a counter reset.
//!
//! Gauges are not kept up to date by the code that changes the state: each scrape builds them
//! from a [`StatusDocument`], so there is one bookkeeping of the state (the service cores') and a
//! gauge can never drift from what `sluice status` says.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};

use crate::control::protocol::{DeployPhase, InstanceState, StatusDocument};
use crate::control::queue::{self, Requests};

/// The content type of the classic Prometheus text format (version 0.0.4), served unless the
/// scraper asks for OpenMetrics.
pub const CONTENT_TYPE_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The content type of the OpenMetrics text format, served when the scraper's `Accept` names it
/// (Prometheus does).
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of the drain, warm-up and fetch histograms: 10 ms to 5 min.
const SHORT_BUCKETS_S: [f64; 15] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets of the deploy histogram: a deploy includes downloads, hooks and every batch, so it
/// runs from seconds to an hour.
const DEPLOY_BUCKETS_S: [f64; 12] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 2700.0, 3600.0,
];

/// Every instance state, so that a state with no instance is a 0 and not a missing series.
const INSTANCE_STATES: [InstanceState; 8] = [
    InstanceState::Stopped,
    InstanceState::Starting,
    InstanceState::Running,
    InstanceState::Draining,
    InstanceState::Stopping,
    InstanceState::Backoff,
    InstanceState::Exited,
    InstanceState::Fatal,
];

/// Every deploy phase, with its wire name.
const DEPLOY_PHASES: [(DeployPhase, &str); 5] = [
    (DeployPhase::Installing, "installing"),
    (DeployPhase::PreRestart, "pre-restart"),
    (DeployPhase::WaitingSlot, "waiting-slot"),
    (DeployPhase::Restarting, "restarting"),
    (DeployPhase::PostRestart, "post-restart"),
];

/// Why an instance got a new process, the `reason` of `sluice_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// It exited (crashed) while it should have been running.
    Exit,
    /// Its liveness probe failed too often.
    Liveness,
    /// It started but did not pass its readiness check.
    Readiness,
    /// A batch of a restart the operator asked for (`sluice restart`, a changed configuration).
    Restart,
    /// A batch of a deploy's restart (or of its rollback).
    Deploy,
}

impl RestartReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Exit => "exit",
            RestartReason::Liveness => "liveness",
            RestartReason::Readiness => "readiness",
            RestartReason::Restart => "restart",
            RestartReason::Deploy => "deploy",
        }
    }
}

/// Where a build's bytes came from, the `source` of `sluice_fetch_bytes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchSource {
    Store,
    Peer,
}

impl FetchSource {
    fn as_str(self) -> &'static str {
        match self {
            FetchSource::Store => "store",
            FetchSource::Peer => "peer",
        }
    }
}

/// The ZooKeeper session as the daemon last heard of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Connected,
    /// Not connected: never yet, away, or expired and not yet replaced.
    Disconnected,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    service: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    service: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    service: String,
    source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    service: String,
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WindowLabels {
    service: String,
    instance: String,
    window: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn short_histogram() -> Histogram {
    Histogram::new(SHORT_BUCKETS_S)
}

fn deploy_histogram() -> Histogram {
    Histogram::new(DEPLOY_BUCKETS_S)
}

/// The daemon's metrics: the registry of what is recorded as it happens, and its families.
pub struct Metrics {
    /// Counters, histograms and the session gauge: encoded first at each scrape.
    registry: Registry,
    restarts: Family<RestartLabels, Counter>,
    drain_seconds: HistogramFamily<ServiceLabels>,
    warmup_seconds: HistogramFamily<ServiceLabels>,
    deploy_seconds: HistogramFamily<OutcomeLabels>,
    fetch_bytes: Family<SourceLabels, Counter>,
    fetch_seconds: HistogramFamily<ServiceLabels>,
    steering_transactions: Family<ServiceLabels, Counter>,
    steering_failures: Family<ServiceLabels, Counter>,
    /// Registered only with the zookeeper backend: a host without ZooKeeper has no session.
    zk_session: Family<SessionLabels, Gauge>,
    zk_expirations: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The families, registered; `zookeeper` adds the session's.
    pub fn new(zookeeper: bool) -> Metrics {
        let mut registry = Registry::default();
        let restarts = Family::<RestartLabels, Counter>::default();
        registry.register(
            "sluice_restarts",
            "New processes of instances by why: exit (crashed while it should run), liveness, readiness, restart (an operator's or a configuration's restart batch), deploy (a deploy's or rollback's batch)",
            restarts.clone(),
        );
        let drain_seconds: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(short_histogram);
        registry.register_with_unit(
            "sluice_drain_duration",
            "How long drains waited for an instance's connections to end",
            Unit::Seconds,
            drain_seconds.clone(),
        );
        let warmup_seconds: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(short_histogram);
        registry.register_with_unit(
            "sluice_warmup_duration",
            "How long the warm-ups of restarted instances took, passed or failed",
            Unit::Seconds,
            warmup_seconds.clone(),
        );
        let deploy_seconds: HistogramFamily<OutcomeLabels> =
            Family::new_with_constructor(deploy_histogram);
        registry.register_with_unit(
            "sluice_deploy_duration",
            "How long deploys took on this host, from their start to their end (outcome succeeded, failed or superseded)",
            Unit::Seconds,
            deploy_seconds.clone(),
        );
        let fetch_bytes = Family::<SourceLabels, Counter>::default();
        registry.register_with_unit(
            "sluice_fetch",
            "Archive bytes of builds received, by source (store or peer)",
            Unit::Bytes,
            fetch_bytes.clone(),
        );
        let fetch_seconds: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(short_histogram);
        registry.register_with_unit(
            "sluice_fetch_duration",
            "How long fetching, verifying and extracting a build took (builds already installed are not counted)",
            Unit::Seconds,
            fetch_seconds.clone(),
        );
        let steering_transactions = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "sluice_steering_transactions",
            "Runs of iptables-restore that rewrote a service's steering chain",
            steering_transactions.clone(),
        );
        let steering_failures = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "sluice_steering_failures",
            "Runs of iptables-restore for a service that failed (the chain stayed as it was)",
            steering_failures.clone(),
        );
        let zk_session = Family::<SessionLabels, Gauge>::default();
        let zk_expirations = Counter::default();
        if zookeeper {
            registry.register(
                "sluice_zookeeper_session_state",
                "1 for the state the ZooKeeper session is in (connected or disconnected), 0 for the other",
                zk_session.clone(),
            );
            registry.register(
                "sluice_zookeeper_session_expirations",
                "ZooKeeper sessions of this daemon that expired",
                zk_expirations.clone(),
            );
        }
        let metrics = Metrics {
            registry,
            restarts,
            drain_seconds,
            warmup_seconds,
            deploy_seconds,
            fetch_bytes,
            fetch_seconds,
            steering_transactions,
            steering_failures,
            zk_session,
            zk_expirations,
        };
        if zookeeper {
            metrics.session(SessionState::Disconnected);
        }
        metrics
    }

    pub fn restart(&self, service: &str, reason: RestartReason) {
        self.restarts
            .get_or_create(&RestartLabels {
                service: service.to_owned(),
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn drained(&self, service: &str, waited_ms: u64) {
        observe_ms(&self.drain_seconds, service, waited_ms);
    }

    pub fn warmed(&self, service: &str, duration_ms: u64) {
        observe_ms(&self.warmup_seconds, service, duration_ms);
    }

    /// A deploy ended: `succeeded`, `failed` or `superseded` (another build took its place).
    pub fn deployed(&self, service: &str, outcome: &'static str, duration_ms: u64) {
        self.deploy_seconds
            .get_or_create(&OutcomeLabels {
                service: service.to_owned(),
                outcome,
            })
            .observe(duration_ms as f64 / 1000.0);
    }

    /// A fetch of a build ended (verified or not) after `duration_ms`, with the bytes each source
    /// sent.
    pub fn fetched(&self, service: &str, tally: &FetchTally, duration_ms: u64) {
        for (source, bytes) in [
            (FetchSource::Store, &tally.store_bytes),
            (FetchSource::Peer, &tally.peer_bytes),
        ] {
            let bytes = bytes.load(std::sync::atomic::Ordering::Relaxed);
            if bytes > 0 {
                self.fetch_bytes
                    .get_or_create(&SourceLabels {
                        service: service.to_owned(),
                        source: source.as_str(),
                    })
                    .inc_by(bytes);
            }
        }
        observe_ms(&self.fetch_seconds, service, duration_ms);
    }

    /// One run of iptables-restore for `service`, and whether it worked.
    pub fn steered(&self, service: &str, ok: bool) {
        let labels = ServiceLabels {
            service: service.to_owned(),
        };
        self.steering_transactions.get_or_create(&labels).inc();
        if !ok {
            self.steering_failures.get_or_create(&labels).inc();
        }
    }

    pub fn session(&self, state: SessionState) {
        let connected = state == SessionState::Connected;
        for (name, on) in [("connected", connected), ("disconnected", !connected)] {
            self.zk_session
                .get_or_create(&SessionLabels { state: name })
                .set(i64::from(on));
        }
    }

    pub fn session_expired(&self) {
        self.zk_expirations.inc();
    }

    /// The exposition: what was recorded, then the gauges of `status`, in the classic text
    /// format or (`openmetrics`) in OpenMetrics'.
    pub fn encode(&self, status: &StatusDocument, openmetrics: bool) -> String {
        let snapshot = snapshot_registry(status);
        let mut out = String::new();
        let written = if openmetrics {
            use prometheus_client::encoding::text;
            text::encode_registry(&mut out, &self.registry)
                .and_then(|()| text::encode_registry(&mut out, &snapshot))
                .and_then(|()| text::encode_eof(&mut out))
        } else {
            use prometheus_client::encoding::prometheus_text;
            prometheus_text::encode(&mut out, &self.registry)
                .and_then(|()| prometheus_text::encode(&mut out, &snapshot))
        };
        written.expect("writing to a String does not fail");
        out
    }
}

fn observe_ms(family: &HistogramFamily<ServiceLabels>, service: &str, ms: u64) {
    family
        .get_or_create(&ServiceLabels {
            service: service.to_owned(),
        })
        .observe(ms as f64 / 1000.0);
}

/// The gauges of one scrape, from the daemon's status: a registry made for the scrape and dropped
/// after it.
fn snapshot_registry(status: &StatusDocument) -> Registry {
    let mut registry = Registry::default();
    let build_info = Family::<VersionLabels, Gauge>::default();
    build_info
        .get_or_create(&VersionLabels {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    registry.register(
        "sluice_build_info",
        "Always 1; the version label is the sluice that answers",
        build_info,
    );
    let instances = Family::<StateLabels, Gauge>::default();
    let windows = Family::<WindowLabels, Gauge<f64, AtomicU64>>::default();
    let phases = Family::<PhaseLabels, Gauge>::default();
    for service in &status.services {
        for state in INSTANCE_STATES {
            let count = service
                .instances
                .iter()
                .filter(|i| i.state == state)
                .count();
            instances
                .get_or_create(&StateLabels {
                    service: service.service.clone(),
                    state: state.as_str(),
                })
                .set(count as i64);
        }
        for instance in &service.instances {
            let Some(summary) = &instance.warmup else {
                continue;
            };
            for (window, figures) in [
                ("first", &summary.first_window),
                ("last", &summary.last_window),
            ] {
                if let Some(figures) = figures {
                    windows
                        .get_or_create(&WindowLabels {
                            service: service.service.clone(),
                            instance: instance.index.to_string(),
                            window,
                        })
                        .set(figures.p99_us as f64 / 1_000_000.0);
                }
            }
        }
        if let Some(deploy) = &service.deploy {
            for (phase, name) in DEPLOY_PHASES {
                phases
                    .get_or_create(&PhaseLabels {
                        service: service.service.clone(),
                        phase: name,
                    })
                    .set(i64::from(deploy.phase == phase));
            }
        }
    }
    registry.register(
        "sluice_instances",
        "Instances of each service by state",
        instances,
    );
    registry.register_with_unit(
        "sluice_warmup_window_p99",
        "The p99 latency of the first and of the last window of each instance's last warm-up",
        Unit::Seconds,
        windows,
    );
    registry.register(
        "sluice_deploy_phase",
        "1 for the phase of the deploy in flight, 0 for the others; absent when none is",
        phases,
    );
    registry
}

/// Bytes of one install by source, counted as the archive streams in (see
/// [`crate::build::FETCH_TALLY`]).
#[derive(Debug, Default)]
pub struct FetchTally {
    pub store_bytes: AtomicU64,
    pub peer_bytes: AtomicU64,
}

impl FetchTally {
    pub fn add(&self, source: FetchSource, bytes: u64) {
        let counter = match source {
            FetchSource::Store => &self.store_bytes,
            FetchSource::Peer => &self.peer_bytes,
        };
        counter.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether a request's `Accept` asks for OpenMetrics.
pub fn wants_openmetrics<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// A response carrying the exposition.
pub fn response(text: String, openmetrics: bool) -> Response<Full<Bytes>> {
    let content_type = if openmetrics {
        CONTENT_TYPE_OPENMETRICS
    } else {
        CONTENT_TYPE_TEXT
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(text)))
        .expect("static response parts are valid")
}

/// Connections the TCP listener serves at once; more are closed at once.
pub const TCP_CONNECTIONS_MAX: usize = 4;
/// How long a client of the TCP listener has to send its request's head.
pub const TCP_HEADER_TIMEOUT_MS: u64 = 5_000;
/// How long one connection to the TCP listener may last, whatever it does.
pub const TCP_CONNECTION_MAX_MS: u64 = 15_000;
/// The request head's size bound (hyper's smallest read buffer): a larger head is answered
/// `431` and the connection closed.
pub const TCP_HEAD_MAX_BYTES: usize = 8 * 1024;
/// How long a scrape waits for the daemon's status.
const SCRAPE_TIMEOUT_MS: u64 = 10_000;

/// Asks the daemon loop for the exposition.
pub async fn scrape(daemon: &Requests, openmetrics: bool) -> Result<String, crate::control::Error> {
    use crate::control::Error;
    let (tx, rx) = oneshot::channel();
    daemon
        .send(queue::Request::Metrics {
            openmetrics,
            reply: tx,
        })
        .await
        .map_err(|_| Error::Failed("the daemon is exiting".to_owned()))?;
    match tokio::time::timeout(Duration::from_millis(SCRAPE_TIMEOUT_MS), rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(Error::Failed("the daemon dropped the request".to_owned())),
        Err(_) => Err(Error::Failed(format!(
            "the daemon did not answer within {SCRAPE_TIMEOUT_MS} ms"
        ))),
    }
}

/// Binds the TCP listener of `[metrics] listen`; the error names the key and the address.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen {listen}: cannot listen: {e}"))
}

/// Serves `GET /metrics` on `listener` until `stop` resolves: anything else is `404`, one request
/// per connection, at most [`TCP_CONNECTIONS_MAX`] connections, each bounded in head size and
/// time. The port is reachable from the network, so nothing but the exposition is ever sent.
pub async fn serve_tcp(listener: TcpListener, daemon: Requests, stop: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(TCP_CONNECTIONS_MAX));
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: wait instead of spinning.
                    tracing::warn!("metrics listener accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics listener: too many connections, closing one");
            drop(stream);
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let daemon = daemon.clone();
                    async move { Ok::<_, Infallible>(answer_tcp(&request, &daemon).await) }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_millis(TCP_HEADER_TIMEOUT_MS))
                .max_buf_size(TCP_HEAD_MAX_BYTES)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(Duration::from_millis(TCP_CONNECTION_MAX_MS), connection)
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, "metrics connection: {e}"),
                Err(_) => {
                    tracing::debug!(%peer, "metrics connection: cut after {TCP_CONNECTION_MAX_MS} ms")
                }
            }
        });
    }
}

async fn answer_tcp<B>(request: &Request<B>, daemon: &Requests) -> Response<Full<Bytes>> {
    if request.method() != Method::GET || request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: only GET /metrics is served here\n",
        );
    }
    let openmetrics = wants_openmetrics(request);
    match scrape(daemon, openmetrics).await {
        Ok(text) => response(text, openmetrics),
        // The error names nothing of the daemon's inside: the port is public.
        Err(e) => {
            tracing::warn!("metrics scrape: {e}");
            plain(StatusCode::SERVICE_UNAVAILABLE, "metrics unavailable\n")
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests;
