//! The core's side of canary analysis (`[canary]`): while a canary is in flight
//! (`enabled/canary` names a build other than `enabled`) every host samples its own instances
//! and publishes the cumulative figures (`canary_sample` in its status node); a canary host that
//! restarted onto the canary build takes the prod hosts' samples and its own at the start of its
//! bake and at each sample after, judges with `sluice_strategies::canary::decide`, and asks the
//! executor to promote or to clear the canary. The executor runs the scrapes, the probes and the
//! ZooKeeper writes; outcomes come back tagged with the series' epoch, so a late one is dropped.
//!
//! Also here, pure: the reading of a Prometheus text exposition and of a peer's sample.

use std::collections::BTreeMap;

use sluice_strategies::canary::{self, Decision, Le, Outcome, SAMPLE_BUCKETS_MAX, Sample};

use super::core::{Core, Effect, Timer};
use crate::config::{CanaryConfig, OnFail, OnPass};
use crate::protocol::{CanaryAction, CanaryOutcome, CanaryStatus};

/// Largest `/metrics` body read from an instance.
pub const METRICS_MAX_BYTES: usize = 1 << 20;
/// Largest status node of a peer read for its sample.
pub const PEER_NODE_MAX_BYTES: usize = 1 << 20;
/// Most peers whose samples make a baseline (a fleet's status nodes are read each sample).
pub const PEERS_MAX: usize = 1_000;
/// Latency bounds (seconds) of the histogram of sluice's own probe requests.
pub const PROBE_BUCKETS_S: [f64; 14] = [
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    f64::INFINITY,
];

/// What ZooKeeper says of the service's rollout, for the canary analysis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CanaryView {
    pub enabled: Option<String>,
    pub canary: Option<String>,
    /// This host's role is `canary`.
    pub canary_role: bool,
}

impl CanaryView {
    /// The canary build in flight: set and not yet `enabled`.
    fn in_flight(&self) -> Option<&str> {
        self.canary
            .as_deref()
            .filter(|c| self.enabled.as_deref() != Some(*c))
    }
}

/// Request figures of one instance from one sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub requests: u64,
    pub errors: u64,
    /// Cumulative buckets `(le seconds, count)`, ascending.
    pub buckets: Vec<(f64, u64)>,
}

/// One instance's answer to a sample.
#[derive(Debug)]
pub struct InstanceFigures {
    pub index: u32,
    /// The process sampled (a new one counts from zero).
    pub pid: Option<u32>,
    /// From `/metrics`: cumulative since the process started. From probes: what this sample's
    /// probes saw.
    pub result: Result<Figures, String>,
}

/// An instance to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleTarget {
    pub index: u32,
    pub port: u16,
    pub pid: Option<u32>,
}

/// The other hosts' status nodes, raw, by host name, or why they could not be read.
pub type PeerNodes = Result<Vec<(String, Vec<u8>)>, String>;

/// A sample line's labels, in order.
type Labels<'a> = Vec<(&'a str, String)>;

/// What the executor reports back about canaries.
#[derive(Debug)]
pub enum CanaryEvent {
    /// A sample of the series `epoch`; `peers` (each host's status node, raw) when asked for.
    Sampled {
        epoch: u64,
        instances: Vec<InstanceFigures>,
        peers: Option<PeerNodes>,
    },
    /// The verdict's action on `build` was carried out, or why not.
    Acted {
        build: String,
        result: Result<CanaryAction, String>,
    },
}

/// The action a verdict asks of ZooKeeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryWrite {
    /// `enabled := build` with the history, if `enabled/canary` still names it.
    Promote,
    /// Clear `enabled/canary` if it still names the build.
    Clear,
}

/// The series of samples in progress on this host.
#[derive(Debug)]
struct Series {
    epoch: u64,
    /// The build this host's instances ran when the series began.
    build: String,
    since_ms: u64,
    crashes_at_start: u64,
    liveness_at_start: u64,
    requests: u64,
    errors: u64,
    buckets: BTreeMap<u64, (f64, u64)>,
    /// Each instance's last cumulative `/metrics` figures, with its process.
    last: BTreeMap<u32, (Option<u32>, Figures)>,
    /// A sample has come back: later ones count what grew.
    primed: bool,
}

/// A canary host's bake of one build.
#[derive(Debug)]
struct Bake {
    build: String,
    /// Its own sample and the baseline hosts' at the start of the bake.
    start: Option<(Sample, BTreeMap<String, Sample>, u64)>,
    judged: bool,
}

/// The canary state of a service (not persisted: a restarted daemon begins a new series, and a
/// canary host a new bake).
#[derive(Debug, Default)]
pub(super) struct CanaryCore {
    view: CanaryView,
    next_epoch: u64,
    series: Option<Series>,
    bake: Option<Bake>,
    /// The last analysis, shown until another build is baked.
    pub(super) status: Option<CanaryStatus>,
    /// Unrequested exits and liveness failures of this service's instances since the daemon
    /// started; a series counts from its start.
    crashes: u64,
    liveness_failures: u64,
}

impl CanaryCore {
    pub(super) fn note_crash(&mut self) {
        self.crashes += 1;
    }

    pub(super) fn note_liveness_failure(&mut self) {
        self.liveness_failures += 1;
    }
}

impl Core {
    /// ZooKeeper's view of the rollout changed.
    pub(super) fn set_canary_view(&mut self, view: CanaryView) {
        self.canary.view = view;
        self.canary_reconsider();
    }

    /// Starts or stops the series of samples and the bake as the rollout and this host stand.
    /// Called after every event.
    pub(super) fn canary_reconsider(&mut self) {
        let Some(config) = self.config.canary.clone() else {
            self.canary.series = None;
            self.canary.bake = None;
            return;
        };
        let Some(in_flight) = self.canary.view.in_flight().map(str::to_owned) else {
            if self.canary.series.take().is_some() {
                tracing::info!(service = %self.name, "no canary in flight: sampling stops");
            }
            self.canary.bake = None;
            // A bake cut short (promoted by another canary host, cleared by the deployer) has
            // no verdict of this host to show; a verdict stays.
            if self
                .canary
                .status
                .as_ref()
                .is_some_and(|s| s.outcome == CanaryOutcome::Baking)
            {
                self.canary.status = None;
            }
            return;
        };
        let build = self.state.build.clone().unwrap_or_default();
        let series_stale = self.canary.series.as_ref().is_none_or(|s| s.build != build);
        if series_stale {
            self.canary.next_epoch += 1;
            let epoch = self.canary.next_epoch;
            tracing::info!(service = %self.name, build, canary = in_flight, "canary in flight: sampling this host's instances");
            self.canary.series = Some(Series {
                epoch,
                build: build.clone(),
                since_ms: self.now,
                crashes_at_start: self.canary.crashes,
                liveness_at_start: self.canary.liveness_failures,
                requests: 0,
                errors: 0,
                buckets: BTreeMap::new(),
                last: BTreeMap::new(),
                primed: false,
            });
            self.emit(Effect::SetTimer {
                after_ms: 0,
                timer: Timer::CanarySample { epoch },
            });
        }
        // A canary host bakes once it serves the canary build, nothing of a deploy left.
        let settled = self.deploy.deploy.is_none()
            && self.state.restart.is_none()
            && self.state.target_build.as_ref().is_none_or(|t| *t == build);
        if self.canary.view.canary_role && settled && build == in_flight {
            if self.canary.bake.as_ref().is_none_or(|b| b.build != build) {
                tracing::info!(service = %self.name, build, bake_ms = config.bake_ms, "canary bake begins");
                self.canary.bake = Some(Bake {
                    build: build.clone(),
                    start: None,
                    judged: false,
                });
                self.canary.status = Some(CanaryStatus {
                    build,
                    outcome: CanaryOutcome::Baking,
                    reasons: vec![
                        "waiting for the first sample of this host and the prod hosts".into(),
                    ],
                    canary: None,
                    baseline: None,
                    baseline_hosts: Vec::new(),
                    started_ms: Some(self.now),
                    judged_ms: None,
                    action: None,
                    action_error: None,
                });
            }
        } else if self.canary.bake.as_ref().is_some_and(|b| !b.judged) {
            // Left the build before it was judged (a new canary, a failed restart).
            self.canary.bake = None;
            self.canary.status = None;
        }
    }

    /// Time for the next sample of the series `epoch`.
    pub(super) fn on_canary_timer(&mut self, epoch: u64) {
        let Some(config) = self.config.canary.clone() else {
            return;
        };
        if self.canary.series.as_ref().is_none_or(|s| s.epoch != epoch) {
            return;
        }
        let targets = self
            .instances
            .values()
            .filter(|i| i.phase.is_up())
            .filter_map(|i| {
                Some(SampleTarget {
                    index: i.index,
                    port: self.config.port(i.index)?,
                    pid: i.shim.as_ref().map(|s| s.pid),
                })
            })
            .collect();
        let peers = self.canary.bake.as_ref().is_some_and(|b| !b.judged);
        self.emit(Effect::CanarySample {
            epoch,
            targets,
            config: Box::new(config),
            peers,
        });
    }

    pub(super) fn on_canary(&mut self, event: CanaryEvent) {
        match event {
            CanaryEvent::Sampled {
                epoch,
                instances,
                peers,
            } => self.on_sampled(epoch, instances, peers),
            CanaryEvent::Acted { build, result } => self.on_acted(build, result),
        }
    }

    fn on_sampled(
        &mut self,
        epoch: u64,
        instances: Vec<InstanceFigures>,
        peers: Option<PeerNodes>,
    ) {
        let Some(config) = self.config.canary.clone() else {
            return;
        };
        let name = self.name.clone();
        let Some(series) = self.canary.series.as_mut().filter(|s| s.epoch == epoch) else {
            return;
        };
        let cumulative = config.metrics.is_some();
        // Probes take the interval themselves, unless there was nothing to probe.
        let probed = !cumulative && !instances.is_empty();
        for figures in instances {
            let f = match figures.result {
                Ok(f) => f,
                Err(why) => {
                    tracing::warn!(service = %name, instance = figures.index, "canary sample: {why}");
                    continue;
                }
            };
            let grown = if cumulative {
                let before = series.last.insert(figures.index, (figures.pid, f.clone()));
                match before {
                    // The first sample of the series is where it starts from.
                    _ if !series.primed => None,
                    Some((pid, before)) if pid == figures.pid => Some(growth(&before, &f)),
                    // A new process (or one not seen before) counts from zero.
                    _ => Some(f),
                }
            } else {
                Some(f)
            };
            if let Some(g) = grown {
                series.requests = series.requests.saturating_add(g.requests);
                series.errors = series.errors.saturating_add(g.errors.min(g.requests));
                for (le, count) in g.buckets {
                    if series.buckets.len() >= SAMPLE_BUCKETS_MAX
                        && !series.buckets.contains_key(&le.to_bits())
                    {
                        continue;
                    }
                    let entry = series.buckets.entry(le.to_bits()).or_insert((le, 0));
                    entry.1 = entry.1.saturating_add(count);
                }
            }
        }
        series.primed = true;
        let after_ms = if probed { 1 } else { config.sample_interval_ms };
        self.emit(Effect::SetTimer {
            after_ms,
            timer: Timer::CanarySample { epoch },
        });
        if let Some(peers) = peers {
            self.judge(&config, peers);
        }
    }

    /// This host's sample now, as published.
    pub(super) fn canary_sample(&self) -> Option<Sample> {
        let series = self.canary.series.as_ref()?;
        let mut buckets: Vec<(Le, u64)> = series
            .buckets
            .values()
            .map(|&(le, c)| (Le(le), c))
            .collect();
        buckets.sort_by(|a, b| a.0.0.total_cmp(&b.0.0));
        Some(Sample {
            build: series.build.clone(),
            since_ms: series.since_ms,
            instances: self.config.instances,
            crashes: self.canary.crashes - series.crashes_at_start,
            liveness_failures: self.canary.liveness_failures - series.liveness_at_start,
            requests: series.requests,
            errors: series.errors,
            latency_buckets: buckets,
        })
    }

    /// A canary host's look at its figures and the prod hosts': the start of the bake, or a
    /// verdict (baking, or judged and acted on).
    fn judge(&mut self, config: &CanaryConfig, peers: PeerNodes) {
        let Some(own) = self.canary_sample() else {
            return;
        };
        let Some(bake) = self.canary.bake.as_mut().filter(|b| !b.judged) else {
            return;
        };
        let build = bake.build.clone();
        let mut reasons = Vec::new();
        let mut baseline = BTreeMap::new();
        match peers {
            Err(why) => reasons.push(format!("the prod hosts' samples could not be read: {why}")),
            Ok(peers) => {
                for (host, data) in peers.into_iter().take(PEERS_MAX) {
                    if host == self.host_name {
                        continue;
                    }
                    match peer_sample(&data) {
                        Ok(Some(s))
                            if Some(&s.build) == self.canary.view.enabled.as_ref()
                                && s.build != build =>
                        {
                            baseline.insert(host, s);
                        }
                        Ok(_) => {}
                        Err(why) => reasons.push(format!("host {host}'s sample is skipped: {why}")),
                    }
                }
            }
        }
        let Some((own_start, base_start, started_ms)) = &bake.start else {
            bake.start = Some((own, baseline, self.now));
            if let Some(status) = self.canary.status.as_mut() {
                status.started_ms = Some(self.now);
                status.reasons = vec![format!("baking for {} ms", config.bake_ms)];
            }
            return;
        };
        let started_ms = *started_ms;
        let canary_delta = match own.delta(own_start) {
            Ok(d) => d,
            Err(why) => {
                // This host began a new series: the bake starts over from it.
                tracing::warn!(service = %self.name, "canary bake starts over: this host {why}");
                bake.start = Some((own, baseline, self.now));
                return;
            }
        };
        let mut deltas = Vec::new();
        let mut hosts = Vec::new();
        for (host, now) in &baseline {
            match base_start.get(host).map(|start| now.delta(start)) {
                Some(Ok(d)) => {
                    deltas.push(d);
                    hosts.push(host.clone());
                }
                Some(Err(why)) => reasons.push(format!("host {host} is left out: {why}")),
                None => {}
            }
        }
        if hosts.is_empty() {
            reasons.push(format!(
                "no prod host on build {} published a sample both at the start and now",
                self.canary.view.enabled.as_deref().unwrap_or("(none)")
            ));
        }
        let base = canary::merge(&deltas).observed();
        let mine = canary_delta.observed();
        let elapsed_ms = self.now.saturating_sub(started_ms);
        let decision = canary::decide(&config.thresholds(), elapsed_ms, &mine, &base);
        let mut status = CanaryStatus {
            build: build.clone(),
            outcome: CanaryOutcome::Baking,
            reasons: Vec::new(),
            canary: Some(mine),
            baseline: Some(base),
            baseline_hosts: hosts,
            started_ms: Some(started_ms),
            judged_ms: None,
            action: None,
            action_error: None,
        };
        match decision {
            Decision::Baking { remaining_ms } => {
                status.reasons = reasons;
                status
                    .reasons
                    .push(format!("baking: {remaining_ms} ms left"));
                self.canary.status = Some(status);
            }
            Decision::Judged(verdict) => {
                bake.judged = true;
                status.outcome = match verdict.outcome {
                    Outcome::Pass => CanaryOutcome::Pass,
                    Outcome::Fail => CanaryOutcome::Fail,
                    Outcome::Inconclusive => CanaryOutcome::Inconclusive,
                };
                status.reasons = verdict.reasons;
                status.reasons.extend(reasons);
                status.judged_ms = Some(self.now);
                let write = match (verdict.outcome, config.on_pass, config.on_fail) {
                    (Outcome::Pass, OnPass::Promote, _) => Some(CanaryWrite::Promote),
                    (Outcome::Pass, OnPass::Wait, _) => {
                        status.action = Some(CanaryAction::Waiting);
                        None
                    }
                    (Outcome::Fail, _, OnFail::Rollback) => Some(CanaryWrite::Clear),
                    (Outcome::Fail, _, OnFail::Hold) | (Outcome::Inconclusive, _, _) => {
                        status.action = Some(CanaryAction::Held);
                        None
                    }
                };
                tracing::warn!(
                    service = %self.name,
                    build,
                    outcome = status.outcome.as_str(),
                    action = ?write.map_or(status.action, |_| None),
                    reasons = ?status.reasons,
                    "canary judged"
                );
                self.canary.status = Some(status.clone());
                // Recorded once its action is known (one write, so no older record lands last).
                match write {
                    Some(write) => self.emit(Effect::CanaryWrite { build, write }),
                    None => self.emit(Effect::CanaryRecord {
                        build,
                        status: Box::new(status),
                    }),
                }
            }
        }
    }

    fn on_acted(&mut self, build: String, result: Result<CanaryAction, String>) {
        let Some(status) = self.canary.status.as_mut().filter(|s| s.build == build) else {
            return;
        };
        match result {
            Ok(action) => {
                tracing::warn!(service = %self.name, build, ?action, "canary verdict acted on");
                status.action = Some(action);
            }
            Err(why) => {
                tracing::error!(service = %self.name, build, "canary verdict not acted on: {why}");
                status.action_error = Some(why);
            }
        }
        let status = status.clone();
        self.emit(Effect::CanaryRecord {
            build,
            status: Box::new(status),
        });
    }
}

/// What a cumulative figure grew by since the last sample (a value that went down is a
/// restarted process: all of the new value counts).
fn growth(before: &Figures, after: &Figures) -> Figures {
    let g = |b: u64, a: u64| if a >= b { a - b } else { a };
    Figures {
        requests: g(before.requests, after.requests),
        errors: g(before.errors, after.errors),
        buckets: after
            .buckets
            .iter()
            .map(|&(le, count)| {
                let b = before.buckets.iter().find(|x| x.0 == le).map_or(0, |x| x.1);
                (le, g(b, count))
            })
            .collect(),
    }
}

/// The `canary_sample` of a peer's status node: `None` when it has none; an error (for the
/// reasons) when the node or the sample is malformed or out of bounds.
pub fn peer_sample(data: &[u8]) -> Result<Option<Sample>, String> {
    if data.len() > PEER_NODE_MAX_BYTES {
        return Err(format!(
            "its status node is over {PEER_NODE_MAX_BYTES} bytes"
        ));
    }
    let value: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| format!("its status node is not JSON: {e}"))?;
    let Some(sample) = value.get("canary_sample").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let sample: Sample = serde_json::from_value(sample.clone())
        .map_err(|e| format!("malformed canary_sample: {e}"))?;
    sample.check().map_err(|e| format!("canary_sample: {e}"))?;
    Ok(Some(sample))
}

/// Reads a Prometheus text exposition: the sum of `requests_metric` over its series (those
/// whose `status_label` starts with `5` are errors) and the buckets of `latency_metric`
/// (`<name>_bucket`, summed over labels by `le`). Bounded: at most [`SAMPLE_BUCKETS_MAX`] bounds.
pub fn parse_metrics(text: &str, config: &CanaryConfig) -> Result<Figures, String> {
    let bucket_name = format!("{}_bucket", config.latency_metric);
    let mut figures = Figures::default();
    let mut buckets: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
    let mut seen_requests = false;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, value) =
            parse_line(line).map_err(|why| format!("line {}: {why}", n + 1))?;
        if name == config.requests_metric {
            seen_requests = true;
            let count = as_count(value);
            figures.requests = figures.requests.saturating_add(count);
            if labels
                .iter()
                .any(|(k, v)| *k == config.status_label && v.starts_with('5'))
            {
                figures.errors = figures.errors.saturating_add(count);
            }
        } else if name == bucket_name {
            let Some((_, le)) = labels.iter().find(|(k, _)| *k == "le") else {
                return Err(format!("line {}: a bucket without `le`", n + 1));
            };
            let le: f64 =
                parse_float(le).ok_or_else(|| format!("line {}: bad `le` {le:?}", n + 1))?;
            if le.is_nan() || le < 0.0 {
                return Err(format!("line {}: bad `le` {le}", n + 1));
            }
            if buckets.len() >= SAMPLE_BUCKETS_MAX && !buckets.contains_key(&le.to_bits()) {
                return Err(format!(
                    "{bucket_name} has more than {SAMPLE_BUCKETS_MAX} bucket bounds"
                ));
            }
            let entry = buckets.entry(le.to_bits()).or_insert((le, 0));
            entry.1 = entry.1.saturating_add(as_count(value));
        }
    }
    if !seen_requests {
        return Err(format!("no `{}` in the metrics", config.requests_metric));
    }
    let mut b: Vec<(f64, u64)> = buckets.into_values().collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    figures.buckets = b;
    Ok(figures)
}

fn as_count(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value.min(u64::MAX as f64) as u64
    } else {
        0
    }
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// One sample line: `name{label="value",...} value [timestamp]`.
fn parse_line(line: &str) -> Result<(&str, Labels<'_>, f64), String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("a name without a value")?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, end) = parse_labels(inner)?;
        labels = parsed;
        rest = &inner[end..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("a sample without a value")?;
    let value = parse_float(value).ok_or_else(|| format!("bad value {value:?}"))?;
    Ok((name, labels, value))
}

/// The labels after a `{`, and where the text after the closing `}` begins.
fn parse_labels(inner: &str) -> Result<(Labels<'_>, usize), String> {
    let mut labels = Vec::new();
    let mut at = 0;
    loop {
        let rest = &inner[at..];
        let skipped = rest.len() - rest.trim_start_matches([',', ' ', '\t']).len();
        at += skipped;
        let rest = &inner[at..];
        if rest.starts_with('}') {
            return Ok((labels, at + 1));
        }
        if rest.is_empty() {
            return Err("unterminated labels".into());
        }
        let eq = rest.find('=').ok_or("a label without `=`")?;
        let key = rest[..eq].trim();
        let after_eq = &rest[eq + 1..];
        let Some(quoted) = after_eq.strip_prefix('"') else {
            return Err(format!("label {key} without a quoted value"));
        };
        let mut value = String::new();
        let mut close = None;
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => {
                    close = Some(i);
                    break;
                }
                other => value.push(other),
            }
        }
        let Some(close) = close else {
            return Err(format!("label {key} has an unterminated value"));
        };
        labels.push((key, value));
        // Past `key="value"`: the key, `=`, the opening quote, the value and the closing quote.
        at += eq + 2 + close + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CanaryConfig {
        toml::from_str("metrics = \"/metrics\"").unwrap()
    }

    /// What real exporters write, not only the text this project wrote: the exposition of
    /// `prometheus-client` (the Rust client, classic text and OpenMetrics) and of Prometheus's
    /// own Python client (`prometheus_client.generate_latest`, copied verbatim: float counts,
    /// `_created` series, `le` first, `+Inf`).
    #[test]
    fn metrics_from_real_clients_are_read() {
        use prometheus_client::encoding::text::{encode, encode_registry};
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::histogram::Histogram;
        use prometheus_client::registry::Registry;
        let mut registry = Registry::default();
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        registry.register("http_requests", "Requests", requests.clone());
        let latency = Family::<Vec<(String, String)>, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.05, 0.5])
        });
        registry.register("http_request_duration_seconds", "Latency", latency.clone());
        for (code, path, n) in [("200", "/a", 60), ("200", "/b", 30), ("503", "/a", 10)] {
            let labels = vec![
                ("code".to_owned(), code.to_owned()),
                ("path".to_owned(), path.to_owned()),
            ];
            requests.get_or_create(&labels).inc_by(n);
        }
        for (path, seconds) in [("/a", 0.001), ("/a", 0.02), ("/b", 0.2), ("/b", 3.0)] {
            latency
                .get_or_create(&vec![("path".to_owned(), path.to_owned())])
                .observe(seconds);
        }
        let expected = [(0.005, 1), (0.05, 2), (0.5, 3), (f64::INFINITY, 4)];
        let mut openmetrics = String::new();
        encode(&mut openmetrics, &registry).unwrap();
        let mut classic = String::new();
        encode_registry(&mut classic, &registry).unwrap();
        for text in [&openmetrics, &classic] {
            let f = parse_metrics(text, &config()).unwrap_or_else(|e| panic!("{e}:\n{text}"));
            assert_eq!((f.requests, f.errors), (100, 10), "{text}");
            assert_eq!(f.buckets, expected, "{text}");
        }

        let python = r#"# HELP http_requests_total reqs
# TYPE http_requests_total counter
http_requests_total{code="200",method="GET"} 90.0
http_requests_total{code="503",method="GET"} 10.0
# HELP http_requests_created reqs
# TYPE http_requests_created gauge
http_requests_created{code="200",method="GET"} 1.7961987585680528e+09
http_requests_created{code="503",method="GET"} 1.79619875856807e+09
# HELP http_request_duration_seconds lat
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.005",method="GET"} 1.0
http_request_duration_seconds_bucket{le="0.025",method="GET"} 2.0
http_request_duration_seconds_bucket{le="0.25",method="GET"} 3.0
http_request_duration_seconds_bucket{le="+Inf",method="GET"} 3.0
http_request_duration_seconds_count{method="GET"} 3.0
http_request_duration_seconds_sum{method="GET"} 0.223
# HELP http_request_duration_seconds_created lat
# TYPE http_request_duration_seconds_created gauge
http_request_duration_seconds_created{method="GET"} 1.7961987585680873e+09
"#;
        let f = parse_metrics(python, &config()).unwrap();
        assert_eq!((f.requests, f.errors), (100, 10));
        assert_eq!(
            f.buckets,
            [(0.005, 1), (0.025, 2), (0.25, 3), (f64::INFINITY, 3)]
        );
    }

    #[test]
    fn metrics_are_read_by_name_and_status() {
        let text = r#"# HELP http_requests_total Requests.
# TYPE http_requests_total counter
http_requests_total{code="200",path="/a"} 90
http_requests_total{path="/b, \"x\"",code="503"} 7
http_requests_total{code="500"} 3 1700000000000
other_total{code="500"} 1000
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.01",path="/a"} 50
http_request_duration_seconds_bucket{le="0.01",path="/b"} 10
http_request_duration_seconds_bucket{le="0.1"} 90
http_request_duration_seconds_bucket{le="+Inf"} 100
http_request_duration_seconds_sum 3.5
http_request_duration_seconds_count 100
"#;
        let f = parse_metrics(text, &config()).unwrap();
        assert_eq!((f.requests, f.errors), (100, 10));
        assert_eq!(f.buckets, [(0.01, 60), (0.1, 90), (f64::INFINITY, 100)]);
        assert!(
            parse_metrics("x 1\n", &config())
                .unwrap_err()
                .contains("http_requests_total")
        );
        assert!(parse_metrics("http_requests_total{code=\"200 1\n", &config()).is_err());
        assert!(parse_metrics("http_requests_total{code=200} 1\n", &config()).is_err());
        let many: String = (0..40)
            .map(|i| format!("http_request_duration_seconds_bucket{{le=\"{i}\"}} 1\n"))
            .collect();
        let e = parse_metrics(&format!("http_requests_total 1\n{many}"), &config()).unwrap_err();
        assert!(e.contains("more than 32"), "{e}");
    }

    #[test]
    fn peers_samples_are_read_defensively() {
        assert_eq!(peer_sample(br#"{"host": "h"}"#), Ok(None));
        assert!(peer_sample(b"\xff").unwrap_err().contains("not JSON"));
        let bad = br#"{"canary_sample": {"build": "b", "since_ms": 1, "instances": 1, "crashes": 0, "liveness_failures": 0, "requests": 1, "errors": 5}}"#;
        assert!(peer_sample(bad).unwrap_err().contains("errors"));
        let good = br#"{"canary_sample": {"build": "b", "since_ms": 1, "instances": 1, "crashes": 0, "liveness_failures": 0, "requests": 9, "errors": 1, "latency_buckets": [[0.1, 9], ["+Inf", 9]]}}"#;
        assert_eq!(peer_sample(good).unwrap().unwrap().requests, 9);
        let huge = vec![b' '; PEER_NODE_MAX_BYTES + 1];
        assert!(peer_sample(&huge).is_err());
    }

    /// Whatever a peer or an instance wrote, the readers return.
    #[test]
    fn junk_never_panics() {
        let junk: [&[u8]; 9] = [
            b"",
            b"{",
            b"a{",
            b"a{b=\"",
            b"a{b=\"\\",
            b"a{b=\"c\"} ",
            b"http_requests_total{code=\"5\xff\"} 1e400",
            b"{\"canary_sample\": {\"latency_buckets\": [[\"+Inf\", -1]]}}",
            b"\xff\xfe",
        ];
        for data in junk {
            crate::coord::parse_node_data_for_fuzzing(data);
        }
    }

    #[test]
    fn cumulative_figures_grow_and_restart() {
        let a = Figures {
            requests: 10,
            errors: 2,
            buckets: vec![(0.1, 10)],
        };
        let b = Figures {
            requests: 15,
            errors: 2,
            buckets: vec![(0.1, 15)],
        };
        assert_eq!(growth(&a, &b).requests, 5);
        assert_eq!(
            growth(&b, &a).requests,
            10,
            "a restarted counter counts whole"
        );
    }
}
