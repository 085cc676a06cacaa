//! Small pieces the benchmark binaries share: settings from the environment, a shell one-liner,
//! the description of the machine a run was made on, and the daemon log's timestamps.

use serde_json::{Value, json};

/// A numeric setting from the environment, or its default.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The trimmed stdout of `sh -c cmd` (empty when it fails).
pub fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine, the tree and the load of a run; `extra` adds `(key, shell command)` pairs (tool
/// versions). `BENCH_MACHINE_NOTE` says whether the machine was shared.
pub fn machine(extra: &[(&str, &str)]) -> Value {
    let mut m = json!({
        "cpus": sh("nproc"),
        "cpu_model": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-"),
        "memory": sh("grep MemTotal /proc/meminfo | awk '{printf \"%.0f GiB\", $2/1048576}'"),
        "kernel": sh("uname -r"),
        "os": sh(". /etc/os-release && echo \"$PRETTY_NAME\""),
        "date_utc": sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "commit": sh("git rev-parse --short HEAD 2>/dev/null"),
        "dirty_tree": sh("git status --porcelain 2>/dev/null | wc -l"),
        "load_average": sh("cut -d' ' -f1-3 /proc/loadavg"),
        "shared": std::env::var("BENCH_MACHINE_NOTE").unwrap_or_else(|_| "not stated".into()),
    });
    for (key, cmd) in extra {
        m[*key] = sh(cmd).into();
    }
    m
}

/// The time of the first line of `log` that contains `needle`, in ms since the epoch.
pub fn log_ms(log: &str, needle: &str) -> Option<f64> {
    log.lines()
        .find(|l| l.contains(needle))
        .and_then(|l| parse_ts(l.split_whitespace().next()?))
}

/// The time of the first line of `log` that holds `needle` and is stamped at or after
/// `after_ms`, in milliseconds since the Unix epoch.
pub fn log_ms_after(log: &str, needle: &str, after_ms: f64) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| parse_ts(l.split_whitespace().next()?))
        .find(|t| *t >= after_ms)
}

/// `2026-11-26T09:04:45.055Z` (the daemon log's timestamps) → milliseconds since the Unix epoch.
pub fn parse_ts(text: &str) -> Option<f64> {
    let (date, time) = text.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let ss: f64 = t.next()?.parse().ok()?;
    // Days since the epoch (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3_600 + mm * 60) as f64 + ss) * 1000.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps() {
        assert_eq!(super::parse_ts("1970-01-01T00:00:01.5Z"), Some(1500.0));
        assert_eq!(
            super::parse_ts("2026-11-26T09:04:45.055Z"),
            Some(1_795_683_885_055.0)
        );
    }
}
