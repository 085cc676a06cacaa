//! What serde cannot check in a service file: ranges, placeholders, octal strings, keys that need
//! one another. One function per part of the file, each returning the first key at fault.

use super::placeholders::check_placeholders;
use super::{
    BuildConfig, CANARY_PROBE_RATE_MAX, CANARY_SAMPLE_INTERVAL_MAX_MS,
    CANARY_SAMPLE_INTERVAL_MIN_MS, CanaryConfig, HealthConfig, HooksConfig, INSTANCES_MAX,
    SIBLING_SAMPLE_MAX, ServiceConfig, SteeringKind, StrategyName, WarmupConfig, parse_request,
    parse_umask,
};

/// The key at fault and what is wrong with it.
type Fault = (String, String);

fn bad(key: &str, message: String) -> Result<(), Fault> {
    Err((key.to_owned(), message))
}

impl ServiceConfig {
    /// Checks what serde cannot: ranges, placeholders, octal strings. Returns the key at fault.
    /// The parts are checked in a fixed order, so a file with several faults always names the
    /// same one first.
    pub(super) fn validate(&self) -> Result<(), Fault> {
        self.validate_command()?;
        self.validate_ports()?;
        self.validate_process()?;
        self.validate_steering()?;
        if let Some(health) = &self.health {
            self.validate_health(health)?;
        }
        if let Some(build) = &self.build {
            validate_build(build)?;
        }
        validate_hooks(&self.hooks)?;
        if let Some(warmup) = &self.warmup {
            self.validate_warmup(warmup)?;
        }
        if let Some(canary) = &self.canary {
            self.validate_canary(canary)?;
        }
        Ok(())
    }

    /// `command`, `directory` and `env`: names a program, and placeholders that exist here.
    fn validate_command(&self) -> Result<(), Fault> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return bad("command", "must name a program".into());
        }
        let has_ports = self.port_base.is_some();
        for arg in &self.command {
            if let Err(message) = check_placeholders(arg, has_ports) {
                return bad("command", message);
            }
        }
        if let Some(dir) = &self.directory
            && let Err(message) = check_placeholders(dir, has_ports)
        {
            return bad("directory", message);
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return bad("env", format!("invalid variable name `{name}`"));
            }
            if let Err(message) = check_placeholders(value, has_ports) {
                return bad("env", format!("{name}: {message}"));
            }
        }
        Ok(())
    }

    /// `instances`, `port_base` and `front_port`: in range, and the front port apart from the
    /// instance ports.
    fn validate_ports(&self) -> Result<(), Fault> {
        if self.instances == 0 || self.instances > INSTANCES_MAX {
            return bad(
                "instances",
                format!("must be between 1 and {INSTANCES_MAX}"),
            );
        }
        if let Some(base) = self.port_base {
            if base == 0 {
                return bad("port_base", "must not be 0".into());
            }
            if u32::from(base) + self.instances - 1 > u32::from(u16::MAX) {
                return bad(
                    "port_base",
                    format!(
                        "port_base + instances - 1 = {} is past 65535",
                        u32::from(base) + self.instances - 1
                    ),
                );
            }
        }
        if let Some(front) = self.front_port {
            if front == 0 {
                return bad("front_port", "must not be 0".into());
            }
            if self.instance_ports().any(|p| p == front) {
                return bad(
                    "front_port",
                    format!("{front} is also an instance port (port_base + i)"),
                );
            }
        }
        Ok(())
    }

    /// What the instance process gets: `umask`, `nofile`, the restart backoff, and `group` /
    /// `groups`, which need `user`.
    fn validate_process(&self) -> Result<(), Fault> {
        if let Some(umask) = &self.umask
            && parse_umask(umask).is_none()
        {
            return bad(
                "umask",
                format!("`{umask}` is not an octal mode between 000 and 777"),
            );
        }
        if self.nofile == Some(0) {
            return bad("nofile", "must be at least 1".into());
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return bad(
                "backoff_max_ms",
                "backoff_initial_ms must be at least 1 and backoff_max_ms at least backoff_initial_ms"
                    .into(),
            );
        }
        if self.group.is_some() && self.user.is_none() {
            return bad("group", "needs `user` as well".into());
        }
        if self.groups.is_some() && self.user.is_none() {
            return bad("groups", "needs `user` as well".into());
        }
        Ok(())
    }

    /// The `drain` strategy needs a front port to steer, and a front port needs instance ports.
    fn validate_steering(&self) -> Result<(), Fault> {
        if self.strategy() == StrategyName::Drain
            && self.steering == SteeringKind::Iptables
            && self.front_port.is_none()
        {
            return bad(
                "restart.strategy",
                "`drain` steers the front port: set `front_port` (and `port_base`), or `steering = \"none\"`".into(),
            );
        }
        if self.front_port.is_some() && self.port_base.is_none() {
            return bad(
                "front_port",
                "needs `port_base` (the instance ports)".into(),
            );
        }
        Ok(())
    }

    /// `[health]`: exactly one kind of probe, which the service's ports allow.
    fn validate_health(&self, health: &HealthConfig) -> Result<(), Fault> {
        let kinds = [
            health.http.is_some(),
            health.tcp == Some(true),
            health.exec.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return bad(
                "health",
                "set exactly one of `http`, `tcp = true`, `exec`".into(),
            );
        }
        if (health.http.is_some() || health.tcp.is_some()) && self.port_base.is_none() {
            return bad("health", "`http` and `tcp` checks need `port_base`".into());
        }
        if let Some(path) = &health.http
            && !path.starts_with('/')
        {
            return bad("health.http", format!("`{path}` must start with `/`"));
        }
        if let Some(argv) = &health.exec {
            if argv.is_empty() {
                return bad("health.exec", "must name a program".into());
            }
            for arg in argv {
                if let Err(message) = check_placeholders(arg, self.port_base.is_some()) {
                    return bad("health.exec", message);
                }
            }
        }
        if health.timeout_ms == 0 || health.interval_ms == 0 {
            return bad(
                "health",
                "`timeout_ms` and `interval_ms` must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// `[warmup]`: requests that parse, sent to instance ports, with limits that mean something.
    fn validate_warmup(&self, warmup: &WarmupConfig) -> Result<(), Fault> {
        if self.port_base.is_none() {
            return bad(
                "warmup",
                "needs `port_base`: requests go to the instance port".into(),
            );
        }
        if warmup.requests.is_empty() && warmup.file.is_none() {
            return bad("warmup", "set `requests` or `file`".into());
        }
        for line in &warmup.requests {
            if let Err(message) = parse_request(line) {
                return bad("warmup.requests", message);
            }
        }
        if warmup.window == 0 || warmup.concurrency == 0 {
            return bad(
                "warmup",
                "`window` and `concurrency` must be at least 1".into(),
            );
        }
        if warmup
            .until_stable_pct
            .is_some_and(|p| !(p >= 0.0 && p.is_finite()))
        {
            return bad(
                "warmup.until_stable_pct",
                "must be a percentage of 0 or more".into(),
            );
        }
        if !(warmup.sibling_ratio >= 1.0 && warmup.sibling_ratio.is_finite()) {
            return bad(
                "warmup.sibling_ratio",
                "must be a finite number of 1 or more".into(),
            );
        }
        if sluice_strategies::warmup::Percentile::from_number(warmup.sibling_percentile).is_none() {
            return bad("warmup.sibling_percentile", "must be 50, 90 or 99".into());
        }
        if !(1..=SIBLING_SAMPLE_MAX).contains(&warmup.sibling_sample) {
            return bad(
                "warmup.sibling_sample",
                format!("must be 1 to {SIBLING_SAMPLE_MAX}"),
            );
        }
        Ok(())
    }
}

/// `[build]`: a source template that names the build, and at least one release kept.
impl ServiceConfig {
    /// `[canary]`: thresholds that mean something, and one source of request figures that can
    /// be reached (the instance port) and named (Prometheus names, request lines that parse).
    fn validate_canary(&self, canary: &CanaryConfig) -> Result<(), Fault> {
        if self.port_base.is_none() {
            return bad(
                "canary",
                "needs `port_base`: instances are sampled on their own port".into(),
            );
        }
        if canary.bake_ms == 0 {
            return bad("canary.bake_ms", "must be at least 1".into());
        }
        if !(canary.max_error_ratio >= 0.0 && canary.max_error_ratio <= 1.0) {
            return bad(
                "canary.max_error_ratio",
                "must be a ratio from 0 to 1".into(),
            );
        }
        if !(canary.max_p99_ratio >= 1.0 && canary.max_p99_ratio.is_finite()) {
            return bad(
                "canary.max_p99_ratio",
                "must be a finite number of 1 or more".into(),
            );
        }
        let interval = CANARY_SAMPLE_INTERVAL_MIN_MS..=CANARY_SAMPLE_INTERVAL_MAX_MS;
        if !interval.contains(&canary.sample_interval_ms) {
            return bad(
                "canary.sample_interval_ms",
                format!(
                    "must be from {CANARY_SAMPLE_INTERVAL_MIN_MS} to {CANARY_SAMPLE_INTERVAL_MAX_MS} ms"
                ),
            );
        }
        if canary.timeout_ms == 0 {
            return bad("canary.timeout_ms", "must be at least 1".into());
        }
        match &canary.metrics {
            Some(path) => {
                if let Err(message) = parse_request(&format!("GET {path}")) {
                    return bad("canary.metrics", message);
                }
                for (key, name, label) in [
                    ("canary.requests_metric", &canary.requests_metric, false),
                    ("canary.latency_metric", &canary.latency_metric, false),
                    ("canary.status_label", &canary.status_label, true),
                ] {
                    if !super::canary::prometheus_name(name, label) {
                        return bad(key, format!("`{name}` is not a prometheus name"));
                    }
                }
                if !canary.requests.is_empty() {
                    return bad(
                        "canary.requests",
                        "set either `metrics` or `requests`, not both".into(),
                    );
                }
            }
            None => {
                if canary.requests.is_empty() {
                    return bad(
                        "canary",
                        "set `metrics` (the instances' Prometheus path) or probe `requests`".into(),
                    );
                }
                for line in &canary.requests {
                    if let Err(message) = parse_request(line) {
                        return bad("canary.requests", message);
                    }
                }
                if !(1..=CANARY_PROBE_RATE_MAX).contains(&canary.probe_rate_per_s) {
                    return bad(
                        "canary.probe_rate_per_s",
                        format!("must be from 1 to {CANARY_PROBE_RATE_MAX}"),
                    );
                }
            }
        }
        Ok(())
    }
}

fn validate_build(build: &BuildConfig) -> Result<(), Fault> {
    if !build.source.contains("{build}") {
        return bad(
            "build.source",
            format!("`{}` must contain `{{build}}`", build.source),
        );
    }
    if build.keep_releases == 0 {
        return bad("build.keep_releases", "must be at least 1".into());
    }
    Ok(())
}

/// `[hooks]`: every hook names a program, and runs for at least a millisecond.
fn validate_hooks(hooks: &HooksConfig) -> Result<(), Fault> {
    for (stage, commands) in [
        ("hooks.pre_download", &hooks.pre_download),
        ("hooks.post_download", &hooks.post_download),
        ("hooks.post_install", &hooks.post_install),
        ("hooks.pre_restart", &hooks.pre_restart),
        ("hooks.post_restart", &hooks.post_restart),
    ] {
        if commands
            .iter()
            .any(|argv| argv.is_empty() || argv[0].is_empty())
        {
            return bad(stage, "every hook must name a program".into());
        }
    }
    if hooks.timeout_ms == 0 {
        return bad("hooks.timeout_ms", "must be at least 1".into());
    }
    Ok(())
}
