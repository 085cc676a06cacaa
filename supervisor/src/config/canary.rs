//! `[canary]` of a service file: how a canary host judges a new build against the prod hosts
//! (bake time, thresholds, what to do with the verdict) and where the request figures come from
//! (each instance's Prometheus `/metrics`, or sluice's own probe requests).

use serde::{Deserialize, Serialize};

/// A service's canary analysis. Present: every host of the service samples its own instances
/// while a canary is in flight, and canary hosts judge themselves after they restarted onto it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// How long the canary runs on the new build before it is judged.
    #[serde(default = "default_bake_ms")]
    pub bake_ms: u64,
    /// How much higher than the baseline's the canary's error ratio may be (0.01: one point).
    #[serde(default = "default_max_error_ratio")]
    pub max_error_ratio: f64,
    /// How many times the baseline's p99 latency the canary's may be.
    #[serde(default = "default_max_p99_ratio")]
    pub max_p99_ratio: f64,
    /// Requests each side must have answered during the bake for a pass or a fail on errors and
    /// latency; fewer is `inconclusive`.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    #[serde(default)]
    pub on_pass: OnPass,
    #[serde(default)]
    pub on_fail: OnFail,
    /// How often a host samples its own instances while a canary is in flight.
    #[serde(default = "default_sample_interval_ms")]
    pub sample_interval_ms: u64,
    /// Path of the instances' Prometheus text exposition on their own port; without it, sluice
    /// sends its own probe `requests`.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Counter of requests, labelled by status (`status_label`).
    #[serde(default = "default_requests_metric")]
    pub requests_metric: String,
    /// The label of `requests_metric` holding the HTTP status (5xx is an error).
    #[serde(default = "default_status_label")]
    pub status_label: String,
    /// Histogram of request latency in seconds (its `_bucket` series).
    #[serde(default = "default_latency_metric")]
    pub latency_metric: String,
    /// Without `metrics`: probe requests in the warm-up's request-line syntax, sent in turn.
    #[serde(default)]
    pub requests: Vec<String>,
    /// Without `metrics`: probe requests sent to each instance per second.
    #[serde(default = "default_probe_rate_per_s")]
    pub probe_rate_per_s: u32,
    /// Limit of one scrape or probe request.
    #[serde(default = "default_canary_timeout_ms")]
    pub timeout_ms: u64,
}

/// What a canary host does when its canary passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPass {
    /// `enabled := enabled/canary`, as `sluice promote` does.
    Promote,
    /// Leave it to the deployer.
    #[default]
    Wait,
}

/// What a canary host does when its canary failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFail {
    /// Clear `enabled/canary` (if it still names the build): canary hosts go back to `enabled`.
    #[default]
    Rollback,
    /// Leave it to the deployer.
    Hold,
}

/// Longest and shortest sampling interval: below, scrapes load the instances; above, a bake
/// sees too few samples to fail early.
pub const CANARY_SAMPLE_INTERVAL_MIN_MS: u64 = 100;
pub const CANARY_SAMPLE_INTERVAL_MAX_MS: u64 = 600_000;
/// Most probe requests per second per instance.
pub const CANARY_PROBE_RATE_MAX: u32 = 1_000;

fn default_bake_ms() -> u64 {
    300_000
}
fn default_max_error_ratio() -> f64 {
    0.01
}
fn default_max_p99_ratio() -> f64 {
    1.5
}
fn default_min_requests() -> u64 {
    100
}
fn default_sample_interval_ms() -> u64 {
    2_000
}
fn default_requests_metric() -> String {
    "http_requests_total".into()
}
fn default_status_label() -> String {
    "code".into()
}
fn default_latency_metric() -> String {
    "http_request_duration_seconds".into()
}
fn default_probe_rate_per_s() -> u32 {
    10
}
fn default_canary_timeout_ms() -> u64 {
    2_000
}

impl CanaryConfig {
    /// The thresholds `sluice_strategies::canary::decide` judges with.
    pub fn thresholds(&self) -> sluice_strategies::canary::Thresholds {
        sluice_strategies::canary::Thresholds {
            bake_ms: self.bake_ms,
            max_error_ratio: self.max_error_ratio,
            max_p99_ratio: self.max_p99_ratio,
            min_requests: self.min_requests,
        }
    }
}

/// A Prometheus metric or label name: `[a-zA-Z_:][a-zA-Z0-9_:]*` (labels without `:`).
pub(super) fn prometheus_name(name: &str, label: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic()
            || c == '_'
            || (c == ':' && !label)
            || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{ConfigError, ServiceConfig};

    fn parse(canary: &str) -> Result<ServiceConfig, ConfigError> {
        let text =
            format!("command = [\"app\", \"{{port}}\"]\nport_base = 9100\n[canary]\n{canary}\n");
        ServiceConfig::parse(Path::new("/etc/sluice/services/web.toml"), &text)
    }

    fn fault(canary: &str) -> String {
        parse(canary).unwrap_err().to_string()
    }

    #[test]
    fn canary_sections_parse_with_defaults() {
        let c = parse("metrics = \"/metrics\"").unwrap().canary.unwrap();
        assert_eq!(c.bake_ms, 300_000);
        assert_eq!((c.on_pass, c.on_fail), (OnPass::Wait, OnFail::Rollback));
        assert_eq!(c.requests_metric, "http_requests_total");
        assert_eq!(c.thresholds().min_requests, 100);
        let c = parse(
            "bake_ms = 5000\nmin_requests = 10\non_pass = \"promote\"\non_fail = \"hold\"\nrequests = [\"GET /\"]\nprobe_rate_per_s = 20",
        )
        .unwrap()
        .canary
        .unwrap();
        assert_eq!((c.on_pass, c.on_fail), (OnPass::Promote, OnFail::Hold));
        assert_eq!((c.bake_ms, c.probe_rate_per_s), (5000, 20));
    }

    #[test]
    fn canary_faults_name_their_key() {
        let cases = [
            ("", "canary"),
            ("metrics = \"/m\"\nbake_ms = 0", "canary.bake_ms"),
            (
                "metrics = \"/m\"\nmax_error_ratio = 2.0",
                "canary.max_error_ratio",
            ),
            (
                "metrics = \"/m\"\nmax_p99_ratio = 0.5",
                "canary.max_p99_ratio",
            ),
            (
                "metrics = \"/m\"\nsample_interval_ms = 5",
                "canary.sample_interval_ms",
            ),
            ("metrics = \"m\"", "canary.metrics"),
            (
                "metrics = \"/m\"\nrequests_metric = \"a-b\"",
                "canary.requests_metric",
            ),
            (
                "metrics = \"/m\"\nstatus_label = \"a:b\"",
                "canary.status_label",
            ),
            (
                "metrics = \"/m\"\nrequests = [\"GET /\"]",
                "canary.requests",
            ),
            ("requests = [\"GET\"]", "canary.requests"),
            (
                "requests = [\"GET /\"]\nprobe_rate_per_s = 0",
                "canary.probe_rate_per_s",
            ),
            ("metrics = \"/m\"\non_pass = \"ship\"", "on_pass"),
            ("metrics = \"/m\"\nbake = 1", "bake"),
        ];
        for (text, key) in cases {
            let e = fault(text);
            assert!(e.contains(key), "{text:?}: {e}");
        }
        let text = "command = [\"app\"]\n[canary]\nmetrics = \"/m\"\n";
        let e = ServiceConfig::parse(Path::new("web.toml"), text).unwrap_err();
        assert!(e.to_string().contains("port_base"), "{e}");
        assert!(prometheus_name("http_requests_total", false));
        assert!(prometheus_name("a:b", false) && !prometheus_name("a:b", true));
        assert!(!prometheus_name("9a", false) && !prometheus_name("", true));
    }
}
