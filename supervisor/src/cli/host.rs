//! The host verbs: `status`, `start`, `stop`, `restart`, `drain`, `enable`, `signal`, `logs`,
//! `reload`, `shutdown`. Each is one typed request to this host's daemon over its control socket
//! ([`Client`]); answers are read as [`crate::control::protocol`]'s types.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Context as _;
use clap::Subcommand;
use sluice_strategies::drain::Outcome;
use sluice_strategies::restart::Step;

use crate::control::client::Client;
use crate::control::protocol::{
    ControlAction, ControlRequest, InstanceStatus, LOG_LINES_DEFAULT, LogStream, LogsQuery,
    ServiceStatus, StatusDocument,
};

/// How often `restart` looks at the status to print its progress.
pub(super) const PROGRESS_POLL_MS: u64 = 250;

/// The verbs answered by this host's daemon.
#[derive(Debug, Subcommand)]
pub enum HostVerb {
    /// Show instances: all services, or one.
    Status {
        service: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a service's instances (`web`) or one instance (`web/2`); also clears `fatal`.
    Start { target: String },
    /// Stop instances gracefully; they stay stopped across daemon restarts until started.
    Stop { target: String },
    /// Restart instances one at a time; waits until done.
    Restart { target: String },
    /// Take instances out of steering and wait for their connections to end; they stay out until
    /// `enable`.
    Drain { target: String },
    /// Put drained instances back into steering.
    Enable { target: String },
    /// Send a signal (`HUP`, `USR1`, a number) to instances.
    Signal { signal: String, target: String },
    /// Print an instance's log.
    Logs {
        target: String,
        /// Keep printing what is appended, across rotations.
        #[arg(short, long)]
        follow: bool,
        /// The stderr log instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// How many lines of the end to print first.
        #[arg(short = 'n', long, default_value_t = LOG_LINES_DEFAULT)]
        lines: usize,
    },
    /// Re-read the service files and apply only what changed; a bad file changes nothing.
    Reload,
    /// Stop every instance gracefully, then the daemon.
    Shutdown,
    /// Print sluice's own metrics (Prometheus text format, as `GET /v1/metrics` answers).
    Metrics,
}

/// `web` → (`web`, None); `web/2` → (`web`, Some(2)).
fn parse_target(target: &str) -> anyhow::Result<(String, Option<u32>)> {
    match target.split_once('/') {
        None => Ok((target.to_owned(), None)),
        Some((service, index)) => {
            let index = index
                .parse()
                .with_context(|| format!("`{target}`: the instance after `/` must be a number"))?;
            Ok((service.to_owned(), Some(index)))
        }
    }
}

fn control(
    action: ControlAction,
    target: &str,
    signal: Option<String>,
) -> anyhow::Result<ControlRequest> {
    let (service, index) = parse_target(target)?;
    Ok(ControlRequest {
        service,
        index,
        action,
        signal,
    })
}

pub async fn main(client: &Client, verb: HostVerb) -> anyhow::Result<()> {
    let request = match verb {
        HostVerb::Status { service, json } => {
            let status = client.status(service.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(&status));
            }
            return Ok(());
        }
        HostVerb::Logs {
            target,
            follow,
            stderr,
            lines,
        } => {
            let (service, index) = parse_target(&target)?;
            let index = index.context("`logs` needs one instance, as `service/index`")?;
            let query = LogsQuery {
                service,
                index,
                stream: if stderr {
                    LogStream::Stderr
                } else {
                    LogStream::Stdout
                },
                lines,
                follow,
            };
            let mut out = std::io::stdout().lock();
            client
                .logs(&query, |data| {
                    out.write_all(data)?;
                    out.flush()
                })
                .await?;
            return Ok(());
        }
        HostVerb::Reload => {
            println!("{}", client.reload().await?.message);
            return Ok(());
        }
        HostVerb::Shutdown => {
            println!("{}", client.shutdown().await?.message);
            return Ok(());
        }
        HostVerb::Metrics => {
            print!("{}", client.metrics().await?);
            return Ok(());
        }
        HostVerb::Start { target } => control(ControlAction::Start, &target, None)?,
        HostVerb::Stop { target } => control(ControlAction::Stop, &target, None)?,
        HostVerb::Restart { target } => control(ControlAction::Restart, &target, None)?,
        HostVerb::Drain { target } => control(ControlAction::Drain, &target, None)?,
        HostVerb::Enable { target } => control(ControlAction::Enable, &target, None)?,
        HostVerb::Signal { signal, target } => {
            control(ControlAction::Signal, &target, Some(signal))?
        }
    };
    let call = client.control(&request);
    let answer = if request.action == ControlAction::Restart {
        // A restart can take minutes: show its steps as they happen. Drains that ended before
        // this restart are not its own: known before it begins.
        let before = last_drains(client, &request.service).await;
        let progress = print_restart_progress(client, &request.service, before);
        tokio::pin!(call);
        tokio::select! {
            answer = &mut call => answer?,
            never = progress => match never {},
        }
    } else {
        call.await?
    };
    println!("{}", answer.message);
    Ok(())
}

/// Each instance's `last_drain` (`None` before its first drain), by index.
type LastDrains = BTreeMap<u32, Option<Outcome>>;

fn drains_in(status: &StatusDocument) -> LastDrains {
    status
        .services
        .first()
        .map(|s| {
            s.instances
                .iter()
                .map(|i| (i.index, i.last_drain))
                .collect()
        })
        .unwrap_or_default()
}

/// The drains of `service` so far; empty when status cannot be read (then every drain seen is
/// printed).
async fn last_drains(client: &Client, service: &str) -> LastDrains {
    client
        .status(Some(service))
        .await
        .map(|s| drains_in(&s))
        .unwrap_or_default()
}

pub(super) fn step_name(step: Step) -> &'static str {
    match step {
        Step::Draining => "draining",
        Step::Stopping => "stopping",
        Step::Starting => "starting",
        Step::Checking => "checking",
        Step::Warming => "warming",
        Step::Signalling => "signalling",
        Step::Enabling => "enabling",
    }
}

/// The lines a status shows about a restart's progress: each new drain once, and the batch and
/// step when they differ from `last`.
fn progress_lines(
    service: &str,
    status: &StatusDocument,
    seen: &LastDrains,
    last: &str,
) -> (Vec<String>, Option<String>) {
    let mut lines = Vec::new();
    for (index, drain) in drains_in(status) {
        if let Some(d) = drain
            && seen.get(&index) != Some(&Some(d))
        {
            lines.push(format!(
                "{service}/{index}: drained: {}, {} connection(s) left, {} in flight, {} ms",
                d.ending.name(),
                d.connections_left,
                d.in_flight_left,
                d.waited_ms
            ));
        }
    }
    let mut now = None;
    if let Some(restart) = status.services.first().and_then(|s| s.restart.as_ref()) {
        let step = restart.step.map_or("starting", step_name);
        let line = format!(
            "{service}: batch {} {step}{}, {} batch(es) left",
            serde_json::to_string(&restart.batch).expect("a list of numbers serializes"),
            match (restart.rolling_back, restart.step) {
                // The old version goes back into steering whatever its warm-up says.
                (true, Some(Step::Warming)) =>
                    " (rolling back; the old version's warm-up is best effort)",
                (true, _) => " (rolling back)",
                (false, _) => "",
            },
            restart.batches_left
        );
        if line != last {
            lines.push(line.clone());
            now = Some(line);
        }
    }
    (lines, now)
}

/// Prints a line whenever the restart of `service` moves to another batch or step; never returns.
async fn print_restart_progress(
    client: &Client,
    service: &str,
    mut seen: LastDrains,
) -> std::convert::Infallible {
    let mut last = String::new();
    loop {
        if let Ok(status) = client.status(Some(service)).await {
            let (lines, now) = progress_lines(service, &status, &seen, &last);
            for line in lines {
                eprintln!("{line}");
            }
            if let Some(now) = now {
                last = now;
            }
            seen = drains_in(&status);
        }
        tokio::time::sleep(std::time::Duration::from_millis(PROGRESS_POLL_MS)).await;
    }
}

/// The service's own line: its build, deploy, restart and errors; `None` when it has none.
fn service_line(service: &ServiceStatus) -> Option<String> {
    let mut facts = Vec::new();
    if let Some(build) = &service.build {
        facts.push(format!("build {build}"));
    }
    if let Some(deploy) = &service.deploy {
        let phase = serde_json::to_value(deploy.phase).expect("phases serialize");
        facts.push(format!(
            "deploying {} ({})",
            deploy.build,
            phase.as_str().unwrap_or("?")
        ));
    }
    if let Some(restart) = &service.restart {
        facts.push(format!(
            "restarting: batch {} {}",
            serde_json::to_string(&restart.batch).expect("a list of numbers serializes"),
            restart.step.map_or("", step_name)
        ));
    }
    if let Some(canary) = &service.canary {
        let mut fact = format!("canary {}: {}", canary.build, canary.short());
        if let Some(reason) = canary.reasons.first() {
            fact.push_str(&format!(" ({reason})"));
        }
        facts.push(fact);
    }
    for error in [
        &service.state_error,
        &service.deploy_error,
        &service.last_restart_error,
        &service.config_error,
        &service.slot_error,
        &service.steering_error,
        &service.tree_error,
        &service.cgroups_error,
        &service.state_write_error,
    ]
    .into_iter()
    .flatten()
    {
        facts.push(error.clone());
    }
    (!facts.is_empty()).then(|| format!("{}: {}", service.service, facts.join("; ")))
}

/// The notes column of an instance: what the other columns do not say.
fn notes(i: &InstanceStatus) -> String {
    let mut notes = Vec::new();
    if i.outdated {
        notes.push("outdated config".to_owned());
    }
    if let Some(exit) = &i.last_exit
        && i.pid.is_none()
    {
        notes.push(format!("last exit: {exit}"));
    }
    if let Some(error) = &i.last_error {
        notes.push(format!("error: {error}"));
    }
    notes.join(", ")
}

/// `sluice status` as a table, columns as `supervisorctl status` has them (name, state, pid,
/// uptime), then sluice's own: the port, whether steering sends it traffic, and notes.
fn render_status(status: &StatusDocument) -> String {
    let mut out = format!(
        "{:<24} {:<9} {:>7} {:>8} {:>5} {:<7} {}\n",
        "NAME", "STATE", "PID", "UPTIME", "PORT", "STEERED", "NOTES"
    );
    let dash = || "-".to_owned();
    for service in &status.services {
        if let Some(line) = service_line(service) {
            out.push_str(&line);
            out.push('\n');
        }
        for i in &service.instances {
            let steered = match (i.enabled, i.pid) {
                (None, _) => "-",
                (Some(true), _) => "yes",
                // Out of steering matters only while it runs.
                (Some(false), Some(_)) => "no",
                (Some(false), None) => "-",
            };
            let line = format!(
                "{:<24} {:<9} {:>7} {:>8} {:>5} {:<7} {}",
                format!("{}/{}", i.service, i.index),
                i.state.as_str(),
                i.pid.map_or_else(dash, |p| p.to_string()),
                i.uptime_ms.map_or_else(dash, human_duration),
                i.port.map_or_else(dash, |p| p.to_string()),
                steered,
                notes(i)
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    if let Some(shutdown) = &status.shutdown {
        out.push_str(&shutdown_line(shutdown));
        out.push('\n');
    }
    out
}

/// `shutting down: stopping web (web/0 stopping); stopped: db; pending: cache`.
fn shutdown_line(s: &crate::control::protocol::ShutdownStatus) -> String {
    let mut line = String::from(if s.resumed {
        "shutting down (finishing an earlier daemon's shutdown):"
    } else {
        "shutting down:"
    });
    match &s.stopping {
        Some(name) => line.push_str(&format!(" stopping {name}")),
        None => line.push_str(" stopping"),
    }
    if !s.instances_left.is_empty() {
        line.push_str(&format!(" ({})", s.instances_left.join(", ")));
    }
    if !s.stopped.is_empty() {
        line.push_str(&format!("; stopped: {}", s.stopped.join(", ")));
    }
    if !s.pending.is_empty() {
        line.push_str(&format!("; pending: {}", s.pending.join(", ")));
    }
    line
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{Desired, InstanceState, RestartStatus};

    #[test]
    fn targets() {
        assert_eq!(parse_target("web").unwrap(), ("web".into(), None));
        assert_eq!(parse_target("web/3").unwrap(), ("web".into(), Some(3)));
        assert!(parse_target("web/x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(59_999), "59s");
        assert_eq!(human_duration(61_000), "1m01s");
        assert_eq!(human_duration(3_660_000), "1h01m");
    }

    fn instance(index: u32, state: InstanceState, pid: Option<u32>) -> InstanceStatus {
        InstanceStatus {
            service: "web".into(),
            index,
            state,
            desired: Desired::Up,
            pid,
            shim_pid: None,
            port: Some(8080 + index as u16),
            enabled: Some(pid.is_some()),
            healthy: true,
            started_ms: None,
            uptime_ms: pid.map(|_| 61_000),
            restarts: 0,
            failed_starts: 0,
            last_exit: Some("exit code 1".into()),
            last_error: None,
            last_restart_reason: None,
            warmup: None,
            last_drain: None,
            outdated: false,
            cgroup: None,
            cpu_weight: None,
        }
    }

    fn service(instances: Vec<InstanceStatus>) -> StatusDocument {
        let text = r#"{"services": [{"service": "web", "front_port": 80, "strategy": "drain",
            "instances": [], "restart": null, "last_restart_error": null, "steering_error": null,
            "build": "b7", "target_build": null, "deploy": null, "deploy_error": null,
            "config_error": null, "cgroups_error": null}]}"#;
        let mut status: StatusDocument = serde_json::from_str(text).unwrap();
        status.services[0].instances = instances;
        status
    }

    #[test]
    fn a_shutdown_in_progress_ends_the_table_with_its_progress() {
        let mut status = service(vec![instance(0, InstanceState::Stopping, Some(4242))]);
        status.shutdown = Some(crate::control::protocol::ShutdownStatus {
            requested_ms: 1,
            resumed: false,
            stopped: vec!["db".into()],
            stopping: Some("web".into()),
            pending: vec!["cache".into()],
            instances_left: vec!["web/0 stopping".into()],
        });
        let text = render_status(&status);
        assert_eq!(
            text.lines().last(),
            Some("shutting down: stopping web (web/0 stopping); stopped: db; pending: cache")
        );
        status.shutdown.as_mut().unwrap().resumed = true;
        assert!(
            render_status(&status)
                .contains("shutting down (finishing an earlier daemon's shutdown): stopping web")
        );
    }

    #[test]
    fn the_table_has_supervisorctls_columns_then_sluices() {
        let status = service(vec![
            instance(0, InstanceState::Running, Some(4242)),
            instance(1, InstanceState::Fatal, None),
        ]);
        let text = render_status(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["NAME", "STATE", "PID", "UPTIME", "PORT", "STEERED", "NOTES"]
        );
        assert_eq!(lines[1], "web: build b7");
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["web/0", "running", "4242", "1m01s", "8080", "yes"]
        );
        let fatal: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(fatal[..6], ["web/1", "fatal", "-", "-", "8081", "-"]);
        assert!(lines[3].ends_with("last exit: exit code 1"), "{}", lines[3]);
    }

    /// Why instances run without CPU isolation is in the service's line, as the other errors are.
    #[test]
    fn the_service_line_says_why_instances_have_no_cgroup() {
        let mut status = service(vec![instance(0, InstanceState::Running, Some(4242))]);
        status.services[0].cgroups_error =
            Some("cgroups: cannot make /sys/fs/cgroup/cpu/sluice: Permission denied".into());
        let text = render_status(&status);
        assert_eq!(
            text.lines().nth(1),
            Some(
                "web: build b7; cgroups: cannot make /sys/fs/cgroup/cpu/sluice: Permission denied"
            )
        );
    }

    #[test]
    fn restart_progress_prints_each_drain_once_and_each_step_change() {
        let mut status = service(vec![instance(0, InstanceState::Draining, Some(1))]);
        status.services[0].restart = Some(RestartStatus {
            strategy: sluice_strategies::restart::Strategy::Drain,
            step: Some(Step::Draining),
            batch: vec![0],
            rolling_back: false,
            batches_left: 2,
            done: vec![],
        });
        let seen = drains_in(&status);
        let (lines, now) = progress_lines("web", &status, &seen, "");
        assert_eq!(lines, ["web: batch [0] draining, 2 batch(es) left"]);
        let last = now.unwrap();
        let (lines, now) = progress_lines("web", &status, &seen, &last);
        assert!(lines.is_empty() && now.is_none(), "{lines:?}");
        // The drain ends: its line once, with the numbers status carries.
        let drain = Outcome {
            ending: sluice_strategies::drain::Ending::Idle,
            until: sluice_strategies::drain::DrainUntil::Idle,
            connections_left: 3,
            in_flight_left: 0,
            waited_ms: 120,
            polls: 4,
        };
        status.services[0].instances[0].last_drain = Some(drain);
        let (lines, _) = progress_lines("web", &status, &seen, &last);
        assert_eq!(
            lines,
            ["web/0: drained: idle, 3 connection(s) left, 0 in flight, 120 ms"]
        );
        let seen = drains_in(&status);
        let (lines, _) = progress_lines("web", &status, &seen, &last);
        assert!(lines.is_empty(), "{lines:?}");
    }
}
