//! The executor's side of a canary sample: scrape each instance's `/metrics` (bounded in bytes
//! and time) or send it sluice's own probe requests for one sampling interval, at the configured
//! rate, each on a new connection. The figures go back to the core (`service/canary.rs`).

use std::sync::Arc;
use std::time::Duration;

use super::canary::{
    Figures, InstanceFigures, METRICS_MAX_BYTES, PROBE_BUCKETS_S, SampleTarget, parse_metrics,
};
use super::warmup::{get_bounded, parse_request, probe_once};
use crate::config::CanaryConfig;

/// Samples every target at once (one task each, each bounded in time on its own).
pub async fn sample(targets: Vec<SampleTarget>, config: Arc<CanaryConfig>) -> Vec<InstanceFigures> {
    let mut set = tokio::task::JoinSet::new();
    for t in targets {
        let config = config.clone();
        set.spawn(async move {
            let result = match &config.metrics {
                Some(path) => scrape(t.port, path, &config).await,
                None => probe(t.port, &config).await,
            };
            InstanceFigures {
                index: t.index,
                pid: t.pid,
                result: result
                    .map_err(|why| format!("instance {} (port {}): {why}", t.index, t.port)),
            }
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(figures) = joined {
            out.push(figures);
        }
    }
    out.sort_by_key(|f| f.index);
    out
}

async fn scrape(port: u16, path: &str, config: &CanaryConfig) -> Result<Figures, String> {
    let (status, body) = get_bounded(port, path, METRICS_MAX_BYTES, config.timeout_ms).await?;
    if status != 200 {
        return Err(format!("{path} answered status {status}"));
    }
    let text = std::str::from_utf8(&body).map_err(|_| format!("{path} is not UTF-8 text"))?;
    parse_metrics(text, config).map_err(|why| format!("{path}: {why}"))
}

/// Probe requests for one sampling interval at `probe_rate_per_s`, in turn from `requests`.
async fn probe(port: u16, config: &CanaryConfig) -> Result<Figures, String> {
    let requests = config
        .requests
        .iter()
        .map(|line| parse_request(line))
        .collect::<Result<Vec<_>, _>>()?;
    if requests.is_empty() {
        return Err("no probe requests".into());
    }
    let count = (u64::from(config.probe_rate_per_s) * config.sample_interval_ms / 1000).max(1);
    let period = Duration::from_millis(config.sample_interval_ms) / count as u32;
    let started = tokio::time::Instant::now();
    // Never longer than the interval and one request's timeout, however slow the answers.
    let deadline = started + Duration::from_millis(config.sample_interval_ms + config.timeout_ms);
    let mut figures = Figures {
        buckets: PROBE_BUCKETS_S.iter().map(|&le| (le, 0)).collect(),
        ..Figures::default()
    };
    for k in 0..count {
        tokio::time::sleep_until(started + period * k as u32).await;
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let request = &requests[(k as usize) % requests.len()];
        figures.requests += 1;
        match probe_once(port, request, config.timeout_ms).await {
            Ok((status, latency)) => {
                if status >= 500 {
                    figures.errors += 1;
                }
                let seconds = latency.as_secs_f64();
                for (le, n) in &mut figures.buckets {
                    if seconds <= *le {
                        *n += 1;
                    }
                }
            }
            Err(_) => figures.errors += 1,
        }
    }
    Ok(figures)
}
