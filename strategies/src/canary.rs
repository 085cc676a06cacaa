//! Whether a canary is good: after the canary instances have run the new build for the bake time,
//! compare them with a baseline that still runs the old build (prod hosts of the same service, or,
//! on one host, the instances not yet restarted). Fed with counts and latency buckets taken at the
//! start and the end of the bake; knows no clock of its own.
//!
//! A verdict is `fail` as soon as the evidence says so (a canary crashed, failed its liveness
//! probe, answered with more errors or slower than the baseline beyond the thresholds), `pass`
//! when there was enough traffic on both sides to compare and nothing failed, and `inconclusive`
//! when there was not (too few requests on either side): a canary that nobody used is not a good
//! canary, only an untested one. Every verdict carries the figures it was made from.

use serde::{Deserialize, Serialize};

/// What a canary must meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// How long the canary runs before it is judged, in milliseconds.
    pub bake_ms: u64,
    /// How much higher than the baseline's the canary's error ratio (errors ÷ requests) may be:
    /// `0.01` allows one percentage point more.
    pub max_error_ratio: f64,
    /// How many times the baseline's p99 latency the canary's may be.
    pub max_p99_ratio: f64,
    /// Requests each side must have answered during the bake for errors and latency to be compared.
    pub min_requests: u64,
}

/// What one side (canary or baseline) did during the bake.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// Instances on this side (crashes are compared per instance).
    pub instances: u32,
    /// Exits nobody asked for, and restarts sluice made on its own.
    pub crashes: u32,
    /// Failed liveness probes.
    pub liveness_failures: u32,
    /// Requests answered (or failed) during the bake.
    pub requests: u64,
    /// Of those, errors (status 5xx, or a transport failure for sluice's own requests).
    pub errors: u64,
    /// The 99th percentile of the latency during the bake, in milliseconds, when it is known.
    pub p99_ms: Option<f64>,
}

impl Observed {
    pub fn error_ratio(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    fn crashes_per_instance(&self) -> f64 {
        f64::from(self.crashes) / f64::from(self.instances.max(1))
    }

    fn liveness_per_instance(&self) -> f64 {
        f64::from(self.liveness_failures) / f64::from(self.instances.max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Inconclusive,
}

/// A judged canary, with the figures behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub outcome: Outcome,
    /// Why, one sentence per reason (every failed check when it failed; what was missing when
    /// inconclusive).
    pub reasons: Vec<String>,
    pub canary: Observed,
    pub baseline: Observed,
}

/// Where a canary analysis is.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Still baking; nothing has failed yet. Judge again once `remaining_ms` have passed.
    Baking {
        remaining_ms: u64,
    },
    Judged(Verdict),
}

/// Judges a canary `elapsed_ms` into its bake. Crashes and liveness failures fail it at once;
/// errors and latency are compared only once the bake is over (a ratio of a few early requests is
/// noise).
pub fn decide(t: &Thresholds, elapsed_ms: u64, canary: &Observed, baseline: &Observed) -> Decision {
    let mut failed = Vec::new();
    if canary.crashes > 0 && canary.crashes_per_instance() > baseline.crashes_per_instance() {
        failed.push(format!(
            "{} crash(es) on {} canary instance(s) against {} on {} baseline instance(s)",
            canary.crashes, canary.instances, baseline.crashes, baseline.instances
        ));
    }
    if canary.liveness_failures > 0
        && canary.liveness_per_instance() > baseline.liveness_per_instance()
    {
        failed.push(format!(
            "{} failed liveness probe(s) on the canary against {} on the baseline",
            canary.liveness_failures, baseline.liveness_failures
        ));
    }
    let baking = elapsed_ms < t.bake_ms;
    if baking && failed.is_empty() {
        return Decision::Baking {
            remaining_ms: t.bake_ms - elapsed_ms,
        };
    }
    let judged = |outcome, reasons| {
        Decision::Judged(Verdict {
            outcome,
            reasons,
            canary: canary.clone(),
            baseline: baseline.clone(),
        })
    };
    if baking {
        return judged(Outcome::Fail, failed);
    }

    let mut missing = Vec::new();
    for (side, o) in [("canary", canary), ("baseline", baseline)] {
        if o.requests < t.min_requests {
            missing.push(format!(
                "the {side} answered {} request(s) during the bake, fewer than min_requests = {}",
                o.requests, t.min_requests
            ));
        }
    }
    if missing.is_empty() {
        if let (Some(c), Some(b)) = (canary.error_ratio(), baseline.error_ratio())
            && c > b + t.max_error_ratio
        {
            failed.push(format!(
                "error ratio {:.4} on the canary against {:.4} on the baseline (at most {:.4} more allowed)",
                c, b, t.max_error_ratio
            ));
        }
        match (canary.p99_ms, baseline.p99_ms) {
            (Some(c), Some(b)) if c > b * t.max_p99_ratio => failed.push(format!(
                "p99 {c:.1} ms on the canary against {b:.1} ms on the baseline (at most {}x allowed)",
                t.max_p99_ratio
            )),
            (Some(_), Some(_)) => {}
            _ => missing.push("no latency figures on one side to compare".into()),
        }
    }
    if !failed.is_empty() {
        judged(Outcome::Fail, failed)
    } else if !missing.is_empty() {
        judged(Outcome::Inconclusive, missing)
    } else {
        judged(Outcome::Pass, Vec::new())
    }
}

/// The `q` quantile (0 < q < 1) of a Prometheus histogram from its cumulative buckets
/// `(le, count)`, as PromQL's `histogram_quantile` estimates it: linear within the bucket the rank
/// falls in, the lower bound of the first bucket taken as 0, and the `+Inf` bucket answered with
/// the highest finite bound. `None` without observations or without a finite bucket.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut sorted: Vec<(f64, f64)> = buckets.iter().copied().filter(|b| !b.0.is_nan()).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = sorted.last()?.1;
    if total <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &sorted {
        if count >= rank {
            if le.is_infinite() {
                return (lower.0 > 0.0).then_some(lower.0);
            }
            let in_bucket = count - lower.1;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(lower.0 + (le - lower.0) * (rank - lower.1) / in_bucket);
        }
        lower = (le, count);
    }
    sorted.iter().rev().find(|b| b.0.is_finite()).map(|b| b.0)
}

/// What a counter or a histogram bucket grew by between two scrapes. A value that went down is a
/// restarted process (counters restart at 0), and all of the new value counts.
pub fn growth(before: f64, after: f64) -> f64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

/// Most latency buckets a sample carries: a histogram with more is refused (a status node is
/// small, and a peer's sample is less trusted data).
pub const SAMPLE_BUCKETS_MAX: usize = 32;

/// A bucket's upper bound in seconds: `+Inf` crosses JSON as the string `"+Inf"` (JSON has no
/// infinity).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Le(pub f64);

impl Serialize for Le {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            s.serialize_f64(self.0)
        } else {
            s.serialize_str("+Inf")
        }
    }
}

impl<'de> Deserialize<'de> for Le {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(Le(n)),
            Raw::Text(t) if t == "+Inf" => Ok(Le(f64::INFINITY)),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "bucket bound {t:?} is neither a number nor \"+Inf\""
            ))),
        }
    }
}

/// What one host's instances did since the host began sampling them for a canary in flight:
/// cumulative figures, published in the host's status node as `canary_sample`. The canary host
/// subtracts the sample it took at the start of its bake from the one at the end
/// ([`Sample::delta`]) and adds up the prod hosts' deltas ([`merge`]) as its baseline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The build the host's instances ran while it sampled.
    pub build: String,
    /// When the host began sampling (unix ms): a sample with another start is another series.
    pub since_ms: u64,
    pub instances: u32,
    pub crashes: u64,
    pub liveness_failures: u64,
    pub requests: u64,
    pub errors: u64,
    /// Cumulative latency buckets `(le seconds, count)`, ascending, at most
    /// [`SAMPLE_BUCKETS_MAX`].
    #[serde(default)]
    pub latency_buckets: Vec<(Le, u64)>,
}

impl Sample {
    /// Checks what serde cannot: the bounds of a sample read from another host's node.
    pub fn check(&self) -> Result<(), String> {
        if self.latency_buckets.len() > SAMPLE_BUCKETS_MAX {
            return Err(format!(
                "{} latency buckets, more than {SAMPLE_BUCKETS_MAX}",
                self.latency_buckets.len()
            ));
        }
        if self.errors > self.requests {
            return Err(format!(
                "{} errors out of {} requests",
                self.errors, self.requests
            ));
        }
        let mut last = f64::NEG_INFINITY;
        for (le, _) in &self.latency_buckets {
            if le.0.is_nan() || le.0 < 0.0 || le.0 <= last {
                return Err("latency bucket bounds are not ascending non-negative numbers".into());
            }
            last = le.0;
        }
        Ok(())
    }

    /// What happened between `start` (taken at the start of the bake) and `self`: both must be
    /// of the same series (build and `since_ms`), else the host began sampling again in between
    /// and its figures cannot be compared.
    pub fn delta(&self, start: &Sample) -> Result<Sample, String> {
        if self.build != start.build || self.since_ms != start.since_ms {
            return Err(format!(
                "its sample restarted during the bake (build {} since {} ms, then build {} since {} ms)",
                start.build, start.since_ms, self.build, self.since_ms
            ));
        }
        let buckets = self
            .latency_buckets
            .iter()
            .map(|&(le, count)| {
                let before = start
                    .latency_buckets
                    .iter()
                    .find(|(l, _)| l.0 == le.0)
                    .map_or(0, |b| b.1);
                (le, count.saturating_sub(before))
            })
            .collect();
        Ok(Sample {
            build: self.build.clone(),
            since_ms: self.since_ms,
            instances: self.instances,
            crashes: self.crashes.saturating_sub(start.crashes),
            liveness_failures: self
                .liveness_failures
                .saturating_sub(start.liveness_failures),
            requests: self.requests.saturating_sub(start.requests),
            errors: self.errors.saturating_sub(start.errors),
            latency_buckets: buckets,
        })
    }

    /// The figures `decide` compares; p99 from the cumulative buckets.
    pub fn observed(&self) -> Observed {
        let buckets: Vec<(f64, f64)> = self
            .latency_buckets
            .iter()
            .map(|&(le, count)| (le.0, count as f64))
            .collect();
        Observed {
            instances: self.instances,
            crashes: u32::try_from(self.crashes).unwrap_or(u32::MAX),
            liveness_failures: u32::try_from(self.liveness_failures).unwrap_or(u32::MAX),
            requests: self.requests,
            errors: self.errors.min(self.requests),
            p99_ms: histogram_quantile(0.99, &buckets).map(|s| s * 1000.0),
        }
    }
}

/// Adds up samples (the prod hosts' deltas, as one baseline). Buckets are summed by bound; a
/// bound missing from one sample counts the next higher bound of that sample (cumulative
/// buckets), so hosts whose histograms differ still merge into a valid histogram.
pub fn merge<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Sample {
    let samples: Vec<&Sample> = samples.into_iter().collect();
    let mut bounds: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.latency_buckets.iter().map(|b| b.0.0))
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    bounds.truncate(SAMPLE_BUCKETS_MAX);
    let mut merged = Sample::default();
    for s in &samples {
        merged.instances = merged.instances.saturating_add(s.instances);
        merged.crashes = merged.crashes.saturating_add(s.crashes);
        merged.liveness_failures = merged.liveness_failures.saturating_add(s.liveness_failures);
        merged.requests = merged.requests.saturating_add(s.requests);
        merged.errors = merged.errors.saturating_add(s.errors);
    }
    merged.latency_buckets = bounds
        .iter()
        .map(|&le| {
            let count = samples
                .iter()
                .map(|s| {
                    s.latency_buckets
                        .iter()
                        .find(|b| b.0.0 >= le)
                        .or(s.latency_buckets.last())
                        .map_or(0, |b| b.1)
                })
                .fold(0u64, u64::saturating_add);
            (Le(le), count)
        })
        .collect();
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(build: &str, requests: u64, errors: u64, buckets: &[(f64, u64)]) -> Sample {
        Sample {
            build: build.into(),
            since_ms: 7,
            instances: 2,
            requests,
            errors,
            latency_buckets: buckets.iter().map(|&(le, c)| (Le(le), c)).collect(),
            ..Sample::default()
        }
    }

    #[test]
    fn samples_subtract_merge_and_judge() {
        let inf = f64::INFINITY;
        let start = sample("b1", 100, 1, &[(0.01, 50), (0.1, 90), (inf, 100)]);
        let end = Sample {
            crashes: 1,
            ..sample("b1", 300, 5, &[(0.01, 150), (0.1, 280), (inf, 300)])
        };
        let d = end.delta(&start).unwrap();
        assert_eq!((d.requests, d.errors, d.crashes), (200, 4, 1));
        assert_eq!(d.latency_buckets[1], (Le(0.1), 190));
        // Another series (the host began sampling again) is not subtracted.
        let again = Sample {
            since_ms: 9,
            ..end.clone()
        };
        assert!(again.delta(&start).unwrap_err().contains("restarted"));
        // Two hosts with different bounds merge into one cumulative histogram.
        let other = sample("b1", 10, 0, &[(0.05, 10), (inf, 10)]);
        let m = merge([&d, &other]);
        assert_eq!((m.instances, m.requests, m.errors), (4, 210, 4));
        let bounds: Vec<f64> = m.latency_buckets.iter().map(|b| b.0.0).collect();
        assert_eq!(bounds, [0.01, 0.05, 0.1, inf]);
        assert_eq!(m.latency_buckets[1].1, 190 + 10);
        assert_eq!(m.latency_buckets[3].1, 210);
        let o = m.observed();
        assert_eq!((o.requests, o.errors, o.crashes), (210, 4, 1));
        assert!(
            o.p99_ms.unwrap() > 10.0 && o.p99_ms.unwrap() <= 100.0,
            "{o:?}"
        );
        assert_eq!(merge([]).observed().p99_ms, None);
    }

    #[test]
    fn samples_cross_json_and_are_checked() {
        let s = sample("b1", 3, 1, &[(0.5, 2), (f64::INFINITY, 3)]);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#"[0.5,2],["+Inf",3]"#), "{json}");
        let back: Sample = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(back.check().is_ok());
        let many = sample("b1", 1, 0, &[(0.1, 1); 40]);
        assert!(many.check().unwrap_err().contains("more than 32"));
        let unordered = sample("b1", 1, 0, &[(0.5, 1), (0.1, 1)]);
        assert!(unordered.check().is_err());
        assert!(sample("b1", 1, 2, &[]).check().is_err());
        assert!(serde_json::from_str::<Sample>(r#"{"build":"b","since_ms":1,"instances":1,"crashes":0,"liveness_failures":0,"requests":1,"errors":0,"latency_buckets":[["inf",1]]}"#).is_err());
    }

    fn t() -> Thresholds {
        Thresholds {
            bake_ms: 60_000,
            max_error_ratio: 0.01,
            max_p99_ratio: 1.5,
            min_requests: 100,
        }
    }

    fn side(instances: u32, requests: u64, errors: u64, p99: Option<f64>) -> Observed {
        Observed {
            instances,
            requests,
            errors,
            p99_ms: p99,
            ..Observed::default()
        }
    }

    fn outcome(d: &Decision) -> Option<Outcome> {
        match d {
            Decision::Judged(v) => Some(v.outcome),
            Decision::Baking { .. } => None,
        }
    }

    #[test]
    fn decision_table() {
        let crashed = Observed {
            crashes: 1,
            ..side(1, 500, 0, Some(10.0))
        };
        let unlive = Observed {
            liveness_failures: 2,
            ..side(1, 500, 0, Some(10.0))
        };
        let base = side(3, 1500, 3, Some(10.0));
        let base_crashy = Observed {
            crashes: 3,
            ..side(3, 1500, 3, Some(10.0))
        };
        #[rustfmt::skip]
        let table: Vec<(&str, u64, Observed, Observed, Option<Outcome>)> = vec![
            ("early, healthy: still baking", 10_000, side(1, 50, 0, Some(10.0)), base.clone(), None),
            ("early, 20 % errors: errors wait for the bake", 10_000, side(1, 100, 20, Some(10.0)), base.clone(), None),
            ("a crash fails at once", 10_000, crashed.clone(), base.clone(), Some(Outcome::Fail)),
            ("a crash no worse than the baseline's is not the build's", 60_000, crashed, base_crashy, Some(Outcome::Pass)),
            ("liveness failures fail at once", 1_000, unlive, base.clone(), Some(Outcome::Fail)),
            ("good build passes", 60_000, side(1, 500, 1, Some(12.0)), base.clone(), Some(Outcome::Pass)),
            ("20 % 5xx fails", 60_000, side(1, 500, 100, Some(10.0)), base.clone(), Some(Outcome::Fail)),
            ("slower beyond the ratio fails", 60_000, side(1, 500, 0, Some(16.0)), base.clone(), Some(Outcome::Fail)),
            ("exactly at the ratio passes", 60_000, side(1, 500, 0, Some(15.0)), base.clone(), Some(Outcome::Pass)),
            ("too little canary traffic is inconclusive", 60_000, side(1, 20, 0, Some(10.0)), base.clone(), Some(Outcome::Inconclusive)),
            ("too little baseline traffic is inconclusive", 60_000, side(1, 500, 0, Some(10.0)), side(3, 10, 0, Some(9.0)), Some(Outcome::Inconclusive)),
            ("bad errors are not hidden by low latency data", 60_000, side(1, 500, 100, None), base.clone(), Some(Outcome::Fail)),
            ("no latency figures: inconclusive", 60_000, side(1, 500, 0, None), base, Some(Outcome::Inconclusive)),
        ];
        for (name, elapsed, canary, baseline, want) in table {
            let d = decide(&t(), elapsed, &canary, &baseline);
            assert_eq!(outcome(&d), want, "{name}: {d:?}");
            if let Decision::Judged(v) = &d {
                assert_eq!(
                    v.canary, canary,
                    "{name}: the figures travel with the verdict"
                );
                if v.outcome != Outcome::Pass {
                    assert!(!v.reasons.is_empty(), "{name}: a verdict says why");
                }
            }
        }
    }

    #[test]
    fn baking_says_how_long_is_left() {
        let base = side(3, 0, 0, None);
        assert_eq!(
            decide(&t(), 45_000, &side(1, 0, 0, None), &base),
            Decision::Baking {
                remaining_ms: 15_000
            }
        );
    }

    #[test]
    fn reasons_name_the_figures() {
        let Decision::Judged(v) = decide(
            &t(),
            60_000,
            &side(1, 500, 100, Some(10.0)),
            &side(3, 1500, 3, Some(10.0)),
        ) else {
            panic!("judged")
        };
        assert_eq!(v.reasons.len(), 1, "{:?}", v.reasons);
        assert!(v.reasons[0].contains("0.2000"), "{}", v.reasons[0]);
        assert!(v.reasons[0].contains("0.0020"), "{}", v.reasons[0]);
    }

    #[test]
    fn quantiles_of_histograms() {
        let inf = f64::INFINITY;
        // 100 observations: 50 under 10 ms, 40 in (10, 50], 10 in (50, 100].
        let b = [(0.01, 50.0), (0.05, 90.0), (0.1, 100.0), (inf, 100.0)];
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(close(histogram_quantile(0.5, &b), 0.01));
        assert!(close(histogram_quantile(0.25, &b), 0.005));
        assert!(close(histogram_quantile(0.7, &b), 0.03));
        assert!(close(histogram_quantile(0.99, &b), 0.095));
        // Ranks in +Inf: the highest finite bound.
        let tail = [(0.01, 50.0), (0.05, 90.0), (inf, 100.0)];
        assert!(close(histogram_quantile(0.99, &tail), 0.05));
        // Unsorted input, empty histogram, no finite bucket, bad q.
        let unsorted = [(inf, 100.0), (0.1, 100.0), (0.01, 50.0), (0.05, 90.0)];
        assert!(close(histogram_quantile(0.5, &unsorted), 0.01));
        assert_eq!(histogram_quantile(0.5, &[(0.1, 0.0), (inf, 0.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[(inf, 10.0)]), None);
        assert_eq!(histogram_quantile(1.5, &b), None);
        assert_eq!(histogram_quantile(0.5, &[]), None);
    }

    #[test]
    fn counters_that_restart_count_from_zero() {
        assert_eq!(growth(100.0, 150.0), 50.0);
        assert_eq!(growth(100.0, 30.0), 30.0);
        assert_eq!(growth(0.0, 0.0), 0.0);
    }
}
