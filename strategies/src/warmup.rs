//! When a warm-up is done: after a number of requests, after a time, once latency has stopped
//! improving (the median of the last window within a percentage of the window before), or once the
//! new instance answers as fast as an already-warm sibling (a percentile of its last window within a
//! ratio of the same percentile of a sample taken from a serving sibling), and always within a
//! maximum time. Fed with latencies; knows no clock of its own.

use serde::{Deserialize, Serialize};

/// The stop conditions of a warm-up. At least one of `count`, `duration_ms` and
/// `until_stable_pct` should be set; `max_duration_ms` always bounds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub count: Option<u64>,
    pub duration_ms: Option<u64>,
    pub until_stable_pct: Option<f64>,
    /// End once the new instance is as fast as a serving sibling; needs a reference
    /// ([`Convergence::set_reference`]), without which it never holds (see [`Limits::without_sibling`]).
    #[serde(default)]
    pub until_sibling: Option<SiblingRule>,
    /// Requests per latency window.
    pub window: usize,
    pub max_duration_ms: u64,
    /// Failed requests (transport error or status 5xx) tolerated before the warm-up fails.
    pub max_errors: u64,
}

/// The median used when nothing else is set, and when a sibling criterion has no sibling.
pub const DEFAULT_STABLE_PCT: f64 = 10.0;

impl Limits {
    /// These limits for an instance that has no serving sibling to compare with: the sibling
    /// criterion goes, and when nothing else would end the warm-up early, the median criterion of
    /// [`DEFAULT_STABLE_PCT`] takes its place (the default before siblings were compared).
    pub fn without_sibling(mut self) -> Limits {
        if self.until_sibling.take().is_some()
            && self.count.is_none()
            && self.duration_ms.is_none()
            && self.until_stable_pct.is_none()
        {
            self.until_stable_pct = Some(DEFAULT_STABLE_PCT);
        }
        self
    }
}

/// Which latency percentile of a window is compared with the sibling's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Percentile {
    P50,
    P90,
    P99,
}

impl Percentile {
    /// The percentile named by its number (`50`, `90`, `99`).
    pub fn from_number(n: u32) -> Option<Percentile> {
        match n {
            50 => Some(Percentile::P50),
            90 => Some(Percentile::P90),
            99 => Some(Percentile::P99),
            _ => None,
        }
    }
}

/// "As fast as a warm sibling": the new instance's `percentile` of its last window is at most
/// `ratio` times the sibling's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SiblingRule {
    pub ratio: f64,
    pub percentile: Percentile,
}

impl SiblingRule {
    /// Whether `last` (the new instance's last complete window) is within the ratio of `reference`
    /// (the sibling's sample). A sibling slow for a reason of its own (the JDK's 40 ms delayed-ACK
    /// floor on keep-alive responses) slows the bar with it: the new instance has the same floor.
    pub fn holds(&self, reference: &Window, last: &Window) -> bool {
        let bar = self.ratio * reference.percentile_us(self.percentile).max(1) as f64;
        last.percentile_us(self.percentile) as f64 <= bar
    }
}

/// Latency figures of one window, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub requests: usize,
    pub p50_us: u64,
    /// Absent in summaries written before it existed.
    #[serde(default)]
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Window {
    /// The figures of a non-empty set of latencies.
    pub fn of(latencies_us: &mut [u64]) -> Window {
        assert!(
            !latencies_us.is_empty(),
            "a window holds at least one request"
        );
        latencies_us.sort_unstable();
        let n = latencies_us.len();
        let at = |q: f64| latencies_us[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
        Window {
            requests: n,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: latencies_us[n - 1],
        }
    }

    pub fn percentile_us(&self, p: Percentile) -> u64 {
        match p {
            Percentile::P50 => self.p50_us,
            Percentile::P90 => self.p90_us,
            Percentile::P99 => self.p99_us,
        }
    }
}

/// The serving sibling a warm-up was compared with, as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiblingReference {
    pub index: u32,
    /// The sample of warm-up requests sent to the sibling.
    pub window: Window,
    pub ratio: f64,
    pub percentile: Percentile,
    /// How old the sample was when this warm-up began: 0 when it was taken for this warm-up, more
    /// when an earlier batch's sample of the same restart was reused (see [`SiblingSample`]).
    #[serde(default)]
    pub age_ms: u64,
}

/// A serving sibling's sample, kept so that the later batches of a restart compare with it
/// instead of each sending its own sample to an instance that serves clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiblingSample {
    pub index: u32,
    pub window: Window,
    /// When it was taken, in milliseconds of a monotonic clock.
    pub taken_at_ms: u64,
}

impl SiblingSample {
    /// Whether both are the same sample (each warm-up's report of it dates it to within a
    /// millisecond or so, so the time is not compared).
    fn same(&self, other: &SiblingSample) -> bool {
        (self.index, self.window) == (other.index, other.window)
    }
}

/// The sibling samples of one restart's warm-ups: the one the next batch reuses, and those an
/// instance did not meet, which are never reused again in this restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiblingSamples {
    kept: Option<SiblingSample>,
    unmet: Vec<SiblingSample>,
}

impl SiblingSamples {
    /// A warm-up compared with `used` ended with `ending` (`None`: it failed). A sample is kept
    /// once an instance met it, and dropped for good once one did not: an instance that ran to
    /// `max_duration_ms` (a new build slower than the sibling measured, or a sample taken in a
    /// lull) makes the next batch measure what serves then, which may be the new build.
    pub fn ended(&mut self, used: Option<SiblingSample>, ending: Option<Ending>) {
        let Some(used) = used else { return };
        if ending == Some(Ending::Sibling) {
            if !self.unmet.iter().any(|u| u.same(&used)) {
                self.kept = Some(used);
            }
        } else {
            if self.kept.is_some_and(|k| k.same(&used)) {
                self.kept = None;
            }
            self.unmet.push(used);
        }
    }

    /// The sample the next warm-up compares with at `now_ms`, when samples are reused for
    /// `reuse_ms` (0: never); `None`: it measures a serving sibling.
    pub fn reusable(&self, now_ms: u64, reuse_ms: u64) -> Option<SiblingSample> {
        self.kept
            .filter(|k| reuse_ms > 0 && now_ms.saturating_sub(k.taken_at_ms) <= reuse_ms)
    }
}

/// Why a warm-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ending {
    Count,
    Duration,
    Stable,
    /// As fast as the serving sibling.
    Sibling,
    /// `max_duration_ms` ran out before any other condition held.
    MaxDuration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Continue,
    Done(Ending),
    Failed(String),
}

/// What a warm-up did, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    /// Requests that failed on a reused connection (closed by the server while idle) and were sent
    /// again on a new one; not errors.
    #[serde(default)]
    pub retries: u64,
    /// The sibling compared with, when the sibling criterion was in force.
    #[serde(default)]
    pub sibling: Option<SiblingReference>,
    /// Why the sibling criterion, wanted, was not used (no serving sibling, its sample failed).
    #[serde(default)]
    pub sibling_fallback: Option<String>,
    pub first_window: Option<Window>,
    pub last_window: Option<Window>,
    pub ending: Option<Ending>,
    pub duration_ms: u64,
}

/// Tracks one instance's warm-up.
#[derive(Debug, Clone)]
pub struct Convergence {
    limits: Limits,
    current: Vec<u64>,
    windows: Vec<Window>,
    requests: u64,
    errors: u64,
    retries: u64,
    last_error: Option<String>,
    reference: Option<SiblingReference>,
    fallback: Option<String>,
}

impl Convergence {
    pub fn new(limits: Limits) -> Self {
        assert!(limits.window >= 1, "a window holds at least one request");
        Self {
            current: Vec::with_capacity(limits.window),
            limits,
            windows: Vec::new(),
            requests: 0,
            errors: 0,
            retries: 0,
            last_error: None,
            reference: None,
            fallback: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The sibling's sample, taken `age_ms` before the warm-up began, against which
    /// `until_sibling` is judged.
    pub fn set_reference(&mut self, index: u32, window: Window, age_ms: u64) {
        if let Some(rule) = self.limits.until_sibling {
            self.reference = Some(SiblingReference {
                index,
                window,
                ratio: rule.ratio,
                percentile: rule.percentile,
                age_ms,
            });
        }
    }

    /// Records why the sibling criterion could not be used (shown in status).
    pub fn set_fallback(&mut self, why: String) {
        self.fallback = Some(why);
    }

    /// A request failed on a reused connection and is being sent again on a new one.
    pub fn record_retry(&mut self) {
        self.retries += 1;
    }

    pub fn record(&mut self, latency_us: u64) {
        self.requests += 1;
        self.current.push(latency_us);
        if self.current.len() == self.limits.window {
            let window = Window::of(&mut self.current);
            self.current.clear();
            self.windows.push(window);
        }
    }

    pub fn record_error(&mut self, error: String) {
        self.requests += 1;
        self.errors += 1;
        self.last_error = Some(error);
    }

    /// Whether to go on, `elapsed_ms` after the warm-up began.
    pub fn verdict(&self, elapsed_ms: u64) -> Verdict {
        if self.errors > self.limits.max_errors {
            return Verdict::Failed(format!(
                "{} of {} warm-up requests failed (at most {} allowed); last: {}",
                self.errors,
                self.requests,
                self.limits.max_errors,
                self.last_error.as_deref().unwrap_or("?")
            ));
        }
        if self.limits.count.is_some_and(|c| self.requests >= c) {
            return Verdict::Done(Ending::Count);
        }
        if self.limits.duration_ms.is_some_and(|d| elapsed_ms >= d) {
            return Verdict::Done(Ending::Duration);
        }
        if let Some(pct) = self.limits.until_stable_pct
            && let [.., before, last] = self.windows.as_slice()
        {
            let change = last.p50_us.abs_diff(before.p50_us) as f64 * 100.0;
            if change <= pct * before.p50_us.max(1) as f64 {
                return Verdict::Done(Ending::Stable);
            }
        }
        if let (Some(rule), Some(reference), Some(last)) = (
            self.limits.until_sibling,
            &self.reference,
            self.windows.last(),
        ) && rule.holds(&reference.window, last)
        {
            return Verdict::Done(Ending::Sibling);
        }
        if elapsed_ms >= self.limits.max_duration_ms {
            return Verdict::Done(Ending::MaxDuration);
        }
        Verdict::Continue
    }

    pub fn summary(&self, ending: Option<Ending>, duration_ms: u64) -> Summary {
        Summary {
            requests: self.requests,
            errors: self.errors,
            retries: self.retries,
            sibling: self.reference.clone(),
            sibling_fallback: self.fallback.clone(),
            first_window: self.windows.first().copied(),
            last_window: self.windows.last().copied(),
            ending,
            duration_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            count: None,
            duration_ms: None,
            until_stable_pct: Some(10.0),
            until_sibling: None,
            window: 4,
            max_duration_ms: 30_000,
            max_errors: 0,
        }
    }

    #[test]
    fn stabilises_once_the_median_stops_moving() {
        let mut c = Convergence::new(limits());
        // A cold start: slow, then faster, then flat.
        let latencies = [
            9000, 8000, 7000, 9500, 3000, 2500, 2800, 2600, 1000, 1050, 980, 1020, 1010, 990, 1000,
            1040,
        ];
        let mut done_at = None;
        for (i, l) in latencies.iter().enumerate() {
            c.record(*l);
            if done_at.is_none() && c.verdict(100) == Verdict::Done(Ending::Stable) {
                done_at = Some(i + 1);
            }
        }
        assert_eq!(done_at, Some(16), "windows 3 and 4 are within 10%");
        let s = c.summary(Some(Ending::Stable), 100);
        assert_eq!(s.first_window.unwrap().p50_us, 8000);
        assert_eq!(s.last_window.unwrap().p50_us, 1000);
        assert_eq!(s.requests, 16);
    }

    #[test]
    fn other_endings() {
        let mut l = limits();
        l.until_stable_pct = None;
        l.count = Some(3);
        let mut c = Convergence::new(l.clone());
        c.record(1);
        c.record(1);
        assert_eq!(c.verdict(0), Verdict::Continue);
        c.record(1);
        assert_eq!(c.verdict(0), Verdict::Done(Ending::Count));

        l.count = None;
        l.duration_ms = Some(500);
        let c = Convergence::new(l.clone());
        assert_eq!(c.verdict(499), Verdict::Continue);
        assert_eq!(c.verdict(500), Verdict::Done(Ending::Duration));

        l.duration_ms = None;
        let c = Convergence::new(l);
        assert_eq!(c.verdict(30_000), Verdict::Done(Ending::MaxDuration));
    }

    #[test]
    fn errors_fail_it() {
        let mut l = limits();
        l.max_errors = 1;
        let mut c = Convergence::new(l);
        c.record_error("status 500".into());
        assert_eq!(c.verdict(0), Verdict::Continue);
        c.record_error("connection refused".into());
        match c.verdict(0) {
            Verdict::Failed(m) => assert!(
                m.contains("2 of 2") && m.contains("connection refused"),
                "{m}"
            ),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn percentiles() {
        let w = Window::of(&mut (1..=100).rev().collect::<Vec<u64>>());
        assert_eq!(
            (w.p50_us, w.p99_us, w.max_us, w.requests),
            (50, 99, 100, 100)
        );
        assert_eq!(w.p90_us, 90);
        let w = Window::of(&mut [7]);
        assert_eq!((w.p50_us, w.p90_us, w.p99_us, w.max_us), (7, 7, 7, 7));
    }

    fn window(latencies_us: &[u64]) -> Window {
        Window::of(&mut latencies_us.to_vec())
    }

    /// Twenty latencies: seventeen at `body_us`, then `tail_us` three times (the p90 and above).
    fn tailed(body_us: u64, tail_us: u64) -> Vec<u64> {
        let mut v = vec![body_us; 17];
        v.extend([tail_us; 3]);
        v
    }

    /// What, reference latencies, the new instance's last window, ratio, percentile, holds.
    type RuleCase = (&'static str, Vec<u64>, Vec<u64>, f64, Percentile, bool);

    #[test]
    fn sibling_rule_table() {
        use Percentile::*;
        // (what, reference latencies, new instance's last window, ratio, percentile, holds)
        let cases: &[RuleCase] = &[
            (
                "as fast",
                tailed(1000, 2000),
                tailed(1000, 2000),
                1.2,
                P90,
                true,
            ),
            (
                "within the ratio",
                tailed(1000, 2000),
                tailed(1100, 2400),
                1.2,
                P90,
                true,
            ),
            (
                "just past the ratio",
                tailed(1000, 2000),
                tailed(1000, 2401),
                1.2,
                P90,
                false,
            ),
            (
                "cold tail, warm median",
                tailed(1000, 2000),
                tailed(1000, 9000),
                1.2,
                P90,
                false,
            ),
            (
                "the median alone would pass it",
                tailed(1000, 2000),
                tailed(1000, 9000),
                1.2,
                P50,
                true,
            ),
            (
                "faster than the sibling",
                tailed(3000, 6000),
                tailed(500, 800),
                1.2,
                P99,
                true,
            ),
            (
                "a sibling of 0 us still gives a bar",
                vec![0; 20],
                vec![1; 20],
                1.0,
                P90,
                true,
            ),
            (
                "and 2 us is past it",
                vec![0; 20],
                vec![2; 20],
                1.0,
                P90,
                false,
            ),
            // The JDK HttpServer with `sun.net.httpserver.nodelay=false`: every keep-alive
            // response waits on a 40 ms delayed ACK, in the sibling as in the new instance.
            (
                "jdk delayed-ack floor",
                tailed(43_000, 44_000),
                tailed(43_500, 44_600),
                1.2,
                P99,
                true,
            ),
            (
                "jdk floor, still cold",
                tailed(43_000, 44_000),
                tailed(43_500, 61_000),
                1.2,
                P99,
                false,
            ),
        ];
        for (what, reference, last, ratio, percentile, want) in cases {
            let rule = SiblingRule {
                ratio: *ratio,
                percentile: *percentile,
            };
            assert_eq!(
                rule.holds(&window(reference), &window(last)),
                *want,
                "{what}"
            );
        }
    }

    fn sibling_limits(percentile: Percentile) -> Limits {
        Limits {
            until_stable_pct: None,
            until_sibling: Some(SiblingRule {
                ratio: 1.2,
                percentile,
            }),
            ..limits()
        }
    }

    /// Feeds `windows` (each a window of four latencies) and returns the window after which the
    /// warm-up ended, with its ending.
    fn ends_after(
        c: &mut Convergence,
        windows: &[[u64; 4]],
        elapsed_ms: u64,
    ) -> Option<(usize, Verdict)> {
        for (n, w) in windows.iter().enumerate() {
            for l in w {
                c.record(*l);
            }
            let v = c.verdict(elapsed_ms);
            if v != Verdict::Continue {
                return Some((n + 1, v));
            }
        }
        None
    }

    /// What, percentile, the sibling's sample, the new instance's windows, elapsed time, and the
    /// window after which it ended with its verdict.
    type ConvergenceCase<'a> = (
        &'static str,
        Percentile,
        Option<Window>,
        &'a [[u64; 4]],
        u64,
        Option<(usize, Verdict)>,
    );

    #[test]
    fn sibling_convergence_table() {
        use Percentile::*;
        let cold_then_warm = [
            [9000, 8000, 9000, 12_000],
            [3000, 2500, 2800, 7000],
            [1000, 1100, 1050, 2600],
            [1000, 1050, 980, 1100],
        ];
        // The median settles at window 3, but the tail of window 3 is still cold.
        let reference = window(&[950, 1000, 1020, 1100]);
        // (what, percentile, reference, windows, elapsed, want)
        let cases: &[ConvergenceCase] = &[
            (
                "p90 waits for the tail",
                P90,
                Some(reference),
                &cold_then_warm,
                100,
                Some((4, Verdict::Done(Ending::Sibling))),
            ),
            (
                "p50 ends on the median",
                P50,
                Some(reference),
                &cold_then_warm,
                100,
                Some((3, Verdict::Done(Ending::Sibling))),
            ),
            (
                "without a reference it never holds",
                P90,
                None,
                &cold_then_warm,
                100,
                None,
            ),
            (
                "max_duration_ms bounds it",
                P90,
                Some(reference),
                &cold_then_warm,
                30_000,
                Some((1, Verdict::Done(Ending::MaxDuration))),
            ),
            (
                "warm from the start",
                P90,
                Some(reference),
                &[[1000, 1000, 1000, 1000]],
                100,
                Some((1, Verdict::Done(Ending::Sibling))),
            ),
            (
                "jdk sibling with a 44 ms p99 floor",
                P99,
                Some(window(&[43_100, 43_800, 43_900, 44_100])),
                &[
                    [80_000, 60_000, 52_000, 90_000],
                    [43_900, 44_000, 43_700, 44_300],
                ],
                100,
                Some((2, Verdict::Done(Ending::Sibling))),
            ),
        ];
        for (what, percentile, reference, windows, elapsed, want) in cases {
            let mut c = Convergence::new(sibling_limits(*percentile));
            if let Some(r) = reference {
                c.set_reference(3, *r, 0);
            }
            assert_eq!(&ends_after(&mut c, windows, *elapsed), want, "{what}");
        }
        // Status shows the reference, and the first and last window.
        let mut c = Convergence::new(sibling_limits(P90));
        c.set_reference(3, reference, 0);
        ends_after(&mut c, &cold_then_warm, 100);
        let s = c.summary(Some(Ending::Sibling), 100);
        let sibling = s.sibling.expect("a reference");
        assert_eq!(
            (sibling.index, sibling.window, sibling.percentile),
            (3, reference, P90)
        );
        assert_eq!(s.first_window.unwrap().p90_us, 12_000);
        assert_eq!(s.last_window.unwrap().p90_us, 1100);
    }

    #[test]
    fn errors_fail_a_sibling_warm_up_too() {
        let mut c = Convergence::new(sibling_limits(Percentile::P90));
        c.set_reference(1, window(&[1000; 4]), 0);
        for l in [1000; 3] {
            c.record(l);
        }
        c.record_error("GET /: status 500".into());
        assert!(matches!(c.verdict(10), Verdict::Failed(_)));
    }

    #[test]
    fn retries_are_not_errors() {
        let mut c = Convergence::new(limits());
        c.record_retry();
        c.record(5);
        assert_eq!(c.verdict(0), Verdict::Continue);
        let s = c.summary(None, 0);
        assert_eq!((s.requests, s.errors, s.retries), (1, 0, 1));
    }

    #[test]
    fn without_a_sibling_table() {
        let rule = Some(SiblingRule {
            ratio: 1.2,
            percentile: Percentile::P90,
        });
        let base = Limits {
            until_stable_pct: None,
            until_sibling: rule,
            ..limits()
        };
        // (what, limits, the stable criterion after the fallback)
        let cases = [
            (
                "sibling alone falls back to the default median",
                base.clone(),
                Some(DEFAULT_STABLE_PCT),
            ),
            (
                "a count still ends it",
                Limits {
                    count: Some(50),
                    ..base.clone()
                },
                None,
            ),
            (
                "a duration still ends it",
                Limits {
                    duration_ms: Some(500),
                    ..base.clone()
                },
                None,
            ),
            (
                "a median of its own is kept",
                Limits {
                    until_stable_pct: Some(25.0),
                    ..base.clone()
                },
                Some(25.0),
            ),
            (
                "no sibling rule: unchanged",
                Limits {
                    until_sibling: None,
                    ..base.clone()
                },
                None,
            ),
        ];
        for (what, limits, want) in cases {
            let after = limits.without_sibling();
            assert_eq!(after.until_sibling, None, "{what}");
            assert_eq!(after.until_stable_pct, want, "{what}");
        }
    }

    /// Which sample the next batch of a restart reuses: one an instance met and none failed to
    /// meet, while it is younger than the reuse bound.
    #[test]
    fn sample_reuse_table() {
        use Ending::*;
        let sample = |index, p: u64, taken_at_ms| SiblingSample {
            index,
            window: window(&[p; 4]),
            taken_at_ms,
        };
        let (a, b) = (sample(2, 1000, 10_000), sample(1, 3000, 20_000));
        // The same sample as `a`, as another warm-up of its batch dates it.
        let a_again = sample(2, 1000, 10_001);
        // (what, the warm-ups that ended: sample used and ending, now, reuse bound, reused)
        type Ended = (Option<SiblingSample>, Option<Ending>);
        type Case<'a> = (&'a str, &'a [Ended], u64, u64, Option<SiblingSample>);
        let cases: &[Case] = &[
            (
                "met, young",
                &[(Some(a), Some(Sibling))],
                12_000,
                60_000,
                Some(a),
            ),
            (
                "met, at the bound",
                &[(Some(a), Some(Sibling))],
                70_000,
                60_000,
                Some(a),
            ),
            (
                "met, past the bound",
                &[(Some(a), Some(Sibling))],
                70_001,
                60_000,
                None,
            ),
            (
                "met, reuse off",
                &[(Some(a), Some(Sibling))],
                10_000,
                0,
                None,
            ),
            (
                "ran to max_duration_ms",
                &[(Some(a), Some(MaxDuration))],
                12_000,
                60_000,
                None,
            ),
            (
                "ended by a count",
                &[(Some(a), Some(Count))],
                12_000,
                60_000,
                None,
            ),
            (
                "the warm-up failed",
                &[(Some(a), None)],
                12_000,
                60_000,
                None,
            ),
            (
                "no sample used",
                &[(None, Some(Sibling))],
                12_000,
                60_000,
                None,
            ),
            (
                "met, then not met by the next batch",
                &[(Some(a), Some(Sibling)), (Some(a), Some(MaxDuration))],
                12_000,
                60_000,
                None,
            ),
            (
                "not met by one of a batch, met by the other: dropped for good",
                &[(Some(a), Some(MaxDuration)), (Some(a_again), Some(Sibling))],
                12_000,
                60_000,
                None,
            ),
            (
                "a new sample after one that was not met",
                &[(Some(a), Some(MaxDuration)), (Some(b), Some(Sibling))],
                22_000,
                60_000,
                Some(b),
            ),
            (
                "a warm-up without a sample leaves the kept one",
                &[(Some(a), Some(Sibling)), (None, Some(Stable))],
                12_000,
                60_000,
                Some(a),
            ),
            (
                "an older sample not met does not drop a newer one",
                &[(Some(b), Some(Sibling)), (Some(a), Some(MaxDuration))],
                22_000,
                60_000,
                Some(b),
            ),
        ];
        for &(what, ended, now, reuse, want) in cases {
            let mut samples = SiblingSamples::default();
            for &(used, ending) in ended {
                samples.ended(used, ending);
            }
            assert_eq!(samples.reusable(now, reuse), want, "{what}");
        }
    }
}
