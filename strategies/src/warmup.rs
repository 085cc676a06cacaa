//! When a warm-up is done: after a number of requests, after a time, or once latency has stopped
//! improving (the median of the last window within a percentage of the window before), and always
//! within a maximum time. Fed with latencies; knows no clock of its own.

use serde::{Deserialize, Serialize};

/// The stop conditions of a warm-up. At least one of `count`, `duration_ms` and
/// `until_stable_pct` should be set; `max_duration_ms` always bounds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub count: Option<u64>,
    pub duration_ms: Option<u64>,
    pub until_stable_pct: Option<f64>,
    /// Requests per latency window.
    pub window: usize,
    pub max_duration_ms: u64,
    /// Failed requests (transport error or status 5xx) tolerated before the warm-up fails.
    pub max_errors: u64,
}

/// Latency figures of one window, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub requests: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Window {
    fn of(latencies_us: &mut [u64]) -> Window {
        latencies_us.sort_unstable();
        let n = latencies_us.len();
        let at = |q: f64| latencies_us[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
        Window {
            requests: n,
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: latencies_us[n - 1],
        }
    }
}

/// Why a warm-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ending {
    Count,
    Duration,
    Stable,
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
    last_error: Option<String>,
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
            last_error: None,
        }
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
        if elapsed_ms >= self.limits.max_duration_ms {
            return Verdict::Done(Ending::MaxDuration);
        }
        Verdict::Continue
    }

    pub fn summary(&self, ending: Option<Ending>, duration_ms: u64) -> Summary {
        Summary {
            requests: self.requests,
            errors: self.errors,
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
        let w = Window::of(&mut [7]);
        assert_eq!((w.p50_us, w.p99_us, w.max_us), (7, 7, 7));
    }
}
