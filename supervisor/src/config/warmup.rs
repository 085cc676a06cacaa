//! The `[warmup]` section of a service file, and the warm-up request lines it (or a file in the
//! release) holds. The request syntax is configuration: the warm-up runner (`crate::service::warmup`) takes
//! requests parsed here, and this module never depends on the runner.

use bytes::Bytes;
use hyper::Method;
use serde::{Deserialize, Serialize};

/// Real requests sent straight to a started, healthy instance before it gets traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    /// Requests as `"METHOD /path"`, or JSON `{"method", "path", "headers", "body"}`.
    #[serde(default)]
    pub requests: Vec<String>,
    /// A file of such requests, one per line, relative to the release directory.
    #[serde(default)]
    pub file: Option<String>,
    /// Stop after this many requests.
    #[serde(default)]
    pub count: Option<u64>,
    /// Stop after this long.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// Stop once the median latency of a window is within this percentage of the window before;
    /// 10 when none of `count`, `duration_ms` and `until_stable_pct` is set.
    #[serde(default)]
    pub until_stable_pct: Option<f64>,
    /// Requests per latency window.
    #[serde(default = "default_warmup_window")]
    pub window: u32,
    /// Upper bound of a warm-up, whatever else is set.
    #[serde(default = "default_warmup_max_duration_ms")]
    pub max_duration_ms: u64,
    /// Connections used at once (one request in flight on each).
    #[serde(default = "default_warmup_concurrency")]
    pub concurrency: u32,
    /// Limit of one request.
    #[serde(default = "default_warmup_timeout_ms")]
    pub timeout_ms: u64,
    /// Failed requests (transport error or 5xx) tolerated before the warm-up fails.
    #[serde(default)]
    pub max_errors: u64,
    /// What ends the warm-up early: `sibling` (as fast as a serving sibling) or `stable` (the
    /// median stopped improving); unset, `sibling` when none of `count`, `duration_ms` and
    /// `until_stable_pct` is set.
    #[serde(default)]
    pub until: Option<WarmupUntil>,
    /// The new instance's latency percentile may be at most this many times the sibling's.
    #[serde(default = "default_warmup_sibling_ratio")]
    pub sibling_ratio: f64,
    /// Which percentile is compared: 50, 90 or 99.
    #[serde(default = "default_warmup_sibling_percentile")]
    pub sibling_percentile: u32,
    /// Warm-up requests sent to the sibling to measure it (at most [`SIBLING_SAMPLE_MAX`]).
    #[serde(default = "default_warmup_sibling_sample")]
    pub sibling_sample: u32,
    /// For this long after a sibling's sample, the later batches of the same restart compare with
    /// it instead of measuring a sibling again, while the instances warmed against it meet it; 0:
    /// every warm-up measures a sibling.
    #[serde(default = "default_warmup_sibling_reuse_ms")]
    pub sibling_reuse_ms: u64,
}

/// The criterion that ends a warm-up before `max_duration_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupUntil {
    Sibling,
    Stable,
}

/// Most requests a sibling's sample may hold: the sibling serves clients meanwhile.
pub const SIBLING_SAMPLE_MAX: u32 = 1_000;

fn default_warmup_sibling_ratio() -> f64 {
    1.2
}
fn default_warmup_sibling_percentile() -> u32 {
    90
}
fn default_warmup_sibling_sample() -> u32 {
    20
}
fn default_warmup_sibling_reuse_ms() -> u64 {
    60_000
}
fn default_warmup_window() -> u32 {
    20
}
fn default_warmup_max_duration_ms() -> u64 {
    30_000
}
fn default_warmup_concurrency() -> u32 {
    4
}
fn default_warmup_timeout_ms() -> u64 {
    5_000
}

/// One warm-up request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmRequest {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    method: String,
    path: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: String,
}

/// Parses `"GET /path"` or `{"method": "POST", "path": "/x", "headers": {..}, "body": ".."}`.
pub fn parse_request(line: &str) -> Result<WarmRequest, String> {
    let line = line.trim();
    let (method, path, headers, body) = if line.starts_with('{') {
        let r: JsonRequest =
            serde_json::from_str(line).map_err(|e| format!("bad request `{line}`: {e}"))?;
        (r.method, r.path, r.headers.into_iter().collect(), r.body)
    } else {
        let mut parts = line.split_whitespace();
        let (Some(method), Some(path), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "bad request `{line}`: write `METHOD /path` or a JSON object"
            ));
        };
        (
            method.to_owned(),
            path.to_owned(),
            Vec::new(),
            String::new(),
        )
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("bad request `{line}`: unknown method `{method}`"))?;
    if !path.starts_with('/') {
        return Err(format!(
            "bad request `{line}`: the path must start with `/`"
        ));
    }
    path.parse::<hyper::Uri>()
        .map_err(|e| format!("bad request `{line}`: {e}"))?;
    Ok(WarmRequest {
        method,
        path,
        headers,
        body: Bytes::from(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r = parse_request("GET /items?id=7").unwrap();
        assert_eq!((r.method, r.path.as_str()), (Method::GET, "/items?id=7"));
        let r = parse_request(r#"{"method": "POST", "path": "/x", "headers": {"content-type": "application/json"}, "body": "{}"}"#).unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(
            r.headers,
            [("content-type".into(), "application/json".into())]
        );
        assert_eq!(r.body, Bytes::from("{}"));
        for bad in ["GET", "GET items", "GET /a b", "G@T /", r#"{"path": "/"}"#] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }
}
