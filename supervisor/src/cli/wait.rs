//! `deploy|promote|rollback --wait`: after the node is written, follow the targeted hosts until
//! each serves the build or one fails. A pure part ([`Tracker`], [`classify`]) turns status nodes
//! into each host's [`Progress`] and the overall [`Verdict`]; the display part prints one plain
//! line per change off a terminal, or draws an indicatif display on one.
//!
//! The fleet is followed with [`crate::coord::ViewWatch`] (one persistent watch, no polling of
//! ZooKeeper); the local backend has no watch on its control socket, so its service status is
//! read every [`super::host::PROGRESS_POLL_MS`], as `sluice restart` does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize as _;
use sluice_strategies::restart::Step;
use tokio::time::Instant;

use crate::control::client::Client;
use crate::control::protocol::{
    DeployPhase, HostInstance, HostState, HostStatus, RestartStatus, ServiceStatus,
};
use crate::coord::{Fleet, FleetView, Role};

/// How long `--wait` follows a deploy without `--timeout`: a fleet restarting a few hosts at a
/// time, each draining and warming its instances in batches, takes minutes, not hours.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(30 * 60);
/// The longest `--timeout` taken (a week): beyond that it is a typo.
const TIMEOUT_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// At most this many per-host lines in the terminal display (the rest are counted), so a fleet
/// of hundreds still fits a screen.
const DISPLAY_HOSTS_MAX: usize = 20;
/// At most this many instance errors are quoted for one failed host.
const INSTANCE_ERRORS_MAX: usize = 4;
/// How often the terminal display's elapsed time and spinner move.
const TICK_MS: u64 = 200;

/// `--wait` and `--timeout`, shared by `deploy`, `promote` and `rollback`.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Follow the targeted hosts until each serves the build (exit 0) or one fails (exit 1).
    #[arg(long)]
    pub wait: bool,
    /// With `--wait`: give up after this long (`90s`, `30m`, `2h`, `500ms`; a bare number is
    /// seconds; default 30m). The deploy itself goes on.
    #[arg(long, requires = "wait", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

impl WaitArgs {
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(TIMEOUT_DEFAULT)
    }
}

/// Parses `90s`, `30m`, `2h`, `500ms`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. `90s`, `30m`, `2h`)"))?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60 * 1000,
        "h" => 3600 * 1000,
        _ => return Err(format!("`{text}`: the unit must be ms, s, m or h")),
    };
    let duration = Duration::from_millis(number.saturating_mul(ms_per_unit));
    if duration.is_zero() || duration > TIMEOUT_MAX {
        return Err(format!("`{text}`: a timeout is from 1ms to 168h"));
    }
    Ok(duration)
}

// ------------------------------------------------------------------------------------------------
// The pure part

/// Where one targeted host is on the way to the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Its status is from before this deploy: it has not taken it up yet.
    Pending,
    /// Download, verification, extraction, install and `pre_restart` hooks.
    Installing,
    /// Installed; waiting for one of the fleet's restart slots.
    WaitingSlot,
    /// Restarting its instances onto the build.
    Restarting {
        /// The batch in flight, from 1.
        batch: usize,
        /// Batches in all (this one, those done, those left).
        batches: usize,
        instances: Vec<u32>,
        step: Option<Step>,
        rolling_back: bool,
    },
    /// Restarted; `post_restart` hooks and pruning.
    Finishing,
    /// Serves the build.
    Serving,
    /// This deploy failed on the host (its error, and its instances' errors).
    Failed(String),
    /// Its status node vanished (daemon stopped, or its ZooKeeper session expired).
    Gone,
    /// Its status node cannot be read by this version (kept waiting: a newer daemon may write
    /// fields or states this one does not know).
    Unreadable(String),
}

impl Progress {
    /// Whether the host is at work on the deploy now (the terminal display has a line for it).
    fn is_active(&self) -> bool {
        matches!(
            self,
            Progress::Installing
                | Progress::WaitingSlot
                | Progress::Restarting { .. }
                | Progress::Finishing
        )
    }
}

fn step_name(step: Step) -> &'static str {
    super::host::step_name(step)
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Progress::Pending => f.write_str("pending"),
            Progress::Installing => f.write_str("installing"),
            Progress::WaitingSlot => f.write_str("waiting-slot"),
            Progress::Restarting {
                batch,
                batches,
                instances,
                step,
                rolling_back,
            } => {
                let list: Vec<String> = instances.iter().map(u32::to_string).collect();
                write!(f, "restarting batch {batch}/{batches} [{}]", list.join(","))?;
                if let Some(step) = step {
                    write!(f, " {}", step_name(*step))?;
                }
                if *rolling_back {
                    f.write_str(" (rolling back)")?;
                }
                Ok(())
            }
            Progress::Finishing => f.write_str("finishing"),
            Progress::Serving => f.write_str("serving"),
            Progress::Failed(why) => write!(f, "failed: {why}"),
            Progress::Gone => f.write_str("gone"),
            Progress::Unreadable(why) => write!(f, "unreadable status node: {why}"),
        }
    }
}

/// How a wait ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every targeted host serves the build.
    Done,
    /// These hosts failed (host, error): at the first failure, every host failed by then; or,
    /// once every other host serves the build, the hosts that are gone.
    Failed(Vec<(String, String)>),
}

/// The hosts a deploy of `build` targets, among the hosts with a status node (the live fleet):
/// with `canary`, the canary hosts; otherwise the hosts whose target ([`FleetView::target_of`]) is
/// the build.
pub fn targeted(view: &FleetView, build: &str, canary: bool) -> BTreeSet<String> {
    view.hosts
        .keys()
        .filter(|host| {
            if canary {
                view.role(host) == Role::Canary
            } else {
                view.target_of(host) == Some(build)
            }
        })
        .cloned()
        .collect()
}

/// What is known of one targeted host.
#[derive(Debug, Clone)]
struct Track {
    progress: Progress,
    /// It has been seen at work on this deploy (a deploy of the build in flight, or the build as
    /// its target): a failure after that is this deploy's.
    seen: bool,
}

/// Each targeted host's progress towards one build, from the views it is shown.
#[derive(Debug, Clone)]
pub struct Tracker {
    build: String,
    hosts: BTreeMap<String, Track>,
}

impl Tracker {
    /// Follows `hosts` (fixed here: hosts that join later are not waited for) towards `build`.
    pub fn new(build: &str, hosts: impl IntoIterator<Item = String>) -> Tracker {
        Tracker {
            build: build.to_owned(),
            hosts: hosts
                .into_iter()
                .map(|h| {
                    let track = Track {
                        progress: Progress::Pending,
                        seen: false,
                    };
                    (h, track)
                })
                .collect(),
        }
    }

    pub fn build(&self) -> &str {
        &self.build
    }

    /// Takes a fleet view in; returns the hosts whose progress changed, in host order.
    pub fn observe(&mut self, view: &FleetView) -> Vec<(String, Progress)> {
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        names
            .into_iter()
            .filter_map(|host| {
                let status = view.hosts.get(&host).map(|value| {
                    HostStatus::deserialize(value)
                        .map_err(|e| crate::clip::clip(&e.to_string()).into_owned())
                });
                // Someone deployed another build since: this host is not going to this one.
                let target = view.target_of(&host).map(str::to_owned);
                self.observe_host(&host, status, target.as_deref())
                    .map(|p| (host, p))
            })
            .collect()
    }

    /// Takes one host's status in (`None`: no status node; `Err`: one that cannot be read) and
    /// what its target now is; returns its progress if it changed.
    pub fn observe_host(
        &mut self,
        host: &str,
        status: Option<Result<HostStatus, String>>,
        target: Option<&str>,
    ) -> Option<Progress> {
        let build = self.build.clone();
        let track = self.hosts.get_mut(host)?;
        let progress = match status {
            None => Progress::Gone,
            Some(Err(why)) => Progress::Unreadable(why),
            Some(Ok(status)) => {
                let progress = classify(&status, &build, &mut track.seen);
                match target {
                    Some(target) if target != build && progress != Progress::Serving => {
                        Progress::Failed(format!(
                            "superseded: its build is now {target}, not {build}"
                        ))
                    }
                    _ => progress,
                }
            }
        };
        if progress == track.progress {
            return None;
        }
        track.progress = progress.clone();
        Some(progress)
    }

    /// Each host's progress, in host order.
    pub fn progress(&self) -> impl Iterator<Item = (&str, &Progress)> {
        self.hosts.iter().map(|(h, t)| (h.as_str(), &t.progress))
    }

    /// How many hosts are followed.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The end of the wait, once known: a failed host ends it at once; gone hosts end it once
    /// every other host serves the build (one that comes back before is followed again).
    pub fn verdict(&self) -> Option<Verdict> {
        let failed: Vec<(String, String)> = self
            .progress()
            .filter_map(|(h, p)| match p {
                Progress::Failed(why) => Some((h.to_owned(), why.clone())),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            return Some(Verdict::Failed(failed));
        }
        if !self
            .progress()
            .all(|(_, p)| matches!(p, Progress::Serving | Progress::Gone))
        {
            return None;
        }
        let gone: Vec<(String, String)> = self
            .progress()
            .filter(|(_, p)| **p == Progress::Gone)
            .map(|(h, _)| {
                let why = "gone: its status node vanished (daemon stopped or its zookeeper \
                           session expired) before it served the build";
                (h.to_owned(), why.to_owned())
            })
            .collect();
        Some(if gone.is_empty() {
            Verdict::Done
        } else {
            Verdict::Failed(gone)
        })
    }
}

/// One host's progress towards `build` from its status node. `seen` is whether the host was seen
/// at work on this deploy before; it is set when it is now.
///
/// A status written before the deploy must count neither as done nor as failed: a host that
/// failed an earlier build still shows `failed` until it takes this one up (or, when it serves
/// this build already, for good: that host is done). A `failed` host's error that names a build
/// (`service::deploy`'s messages do) decides: this build, failed; another, pending or serving.
/// An error that names none (a failed restart, or a config error shown first) is this deploy's
/// when the host was seen at work on it or the build is its target (a failed restart leaves it
/// there). A failed install resets the target, and may come and go between two reads: its error
/// names the build.
pub fn classify(status: &HostStatus, build: &str, seen: &mut bool) -> Progress {
    let targets_it = status.target_build.as_deref() == Some(build);
    if let Some(deploy) = &status.deploy {
        if deploy.build != build {
            // Busy with another build (an earlier deploy still finishing): this one comes after.
            return Progress::Pending;
        }
        *seen = true;
        return match deploy.phase {
            DeployPhase::Installing | DeployPhase::PreRestart => Progress::Installing,
            DeployPhase::WaitingSlot => Progress::WaitingSlot,
            DeployPhase::Restarting if status.state == HostState::Waiting => Progress::WaitingSlot,
            DeployPhase::Restarting => restarting(status.restart.as_ref()),
            DeployPhase::PostRestart => Progress::Finishing,
        };
    }
    if targets_it {
        *seen = true;
    }
    match status.state {
        HostState::Serving if status.build.as_deref() == Some(build) => Progress::Serving,
        HostState::Failed => {
            // A host keeps saying `failed` (and the error) until a deploy succeeds, also once it
            // serves the build again: a rollback after a failed deploy changes nothing on it.
            let serves_it = status.build.as_deref() == Some(build)
                && status.target_build.as_deref().is_none_or(|t| t == build);
            match status.last_error.as_deref().and_then(named_build) {
                Some(named) if named == build => Progress::Failed(failure_of(status)),
                // Another build's failure: this one serves, or is not taken up yet.
                Some(_) if serves_it => Progress::Serving,
                Some(_) => Progress::Pending,
                None if serves_it => Progress::Serving,
                None if *seen || targets_it => Progress::Failed(failure_of(status)),
                None => Progress::Pending,
            }
        }
        // A restart without a deploy in flight: a deploy resumed by a restarted daemon is this
        // deploy's when the build is its target; otherwise an operator's restart, before it.
        HostState::Restarting if targets_it => restarting(status.restart.as_ref()),
        HostState::Waiting if targets_it => Progress::WaitingSlot,
        _ => Progress::Pending,
    }
}

/// The build a deploy error names, when it is one of `service::deploy`'s: `deploy of <svc> build
/// <build> failed: …`, `deploy of <svc> build <build>: …`, or `deployed <build>, but …`.
fn named_build(error: &str) -> Option<&str> {
    if let Some(rest) = error.strip_prefix("deployed ") {
        return rest.split_once(", but").map(|(build, _)| build);
    }
    let (_, after) = error.strip_prefix("deploy of ")?.split_once(" build ")?;
    let (build, _) = after.split_once([' ', ':'])?;
    Some(build)
}

fn restarting(restart: Option<&RestartStatus>) -> Progress {
    let Some(r) = restart else {
        return Progress::Restarting {
            batch: 1,
            batches: 1,
            instances: Vec::new(),
            step: None,
            rolling_back: false,
        };
    };
    // Batches of one restart have the same size but the last; those done are counted by their
    // instances.
    let size = r.batch.len().max(1);
    let batch = r.done.len().div_ceil(size) + 1;
    Progress::Restarting {
        batch,
        batches: batch + r.batches_left,
        instances: r.batch.clone(),
        step: r.step,
        rolling_back: r.rolling_back,
    }
}

/// A failed host's error: its own, and those of its instances (bounded).
fn failure_of(status: &HostStatus) -> String {
    let mut why = status
        .last_error
        .clone()
        .unwrap_or_else(|| "failed (no error given)".to_owned());
    for i in status
        .instances
        .iter()
        .filter(|i| i.last_error.is_some())
        .take(INSTANCE_ERRORS_MAX)
    {
        let error = i.last_error.as_deref().unwrap_or_default();
        why.push_str(&format!("; instance {}: {error}", i.index));
    }
    crate::clip::clip(&why).into_owned()
}

/// A service's status on this host as the status node of a fleet host would say it, so the local
/// backend's wait is classified the same way (the states as `service::deploy` derives them).
pub fn host_status_of(host: &str, service: &ServiceStatus) -> HostStatus {
    let state = match (&service.deploy, &service.restart) {
        (Some(d), _) => match d.phase {
            DeployPhase::Installing | DeployPhase::PreRestart => HostState::Installing,
            DeployPhase::WaitingSlot => HostState::Waiting,
            DeployPhase::Restarting => HostState::Restarting,
            DeployPhase::PostRestart => HostState::Finishing,
        },
        (None, Some(_)) => HostState::Restarting,
        (None, None) if service.deploy_error.is_some() => HostState::Failed,
        (None, None) => HostState::Serving,
    };
    HostStatus {
        host: host.to_owned(),
        build: service.build.clone(),
        target_build: service.target_build.clone(),
        state,
        instances: service
            .instances
            .iter()
            .map(|i| HostInstance {
                index: i.index,
                state: i.state,
                pid: i.pid,
                enabled: i.enabled,
                healthy: i.healthy,
                warmup: None,
                last_error: i.last_error.clone(),
            })
            .collect(),
        last_error: service
            .config_error
            .clone()
            .or_else(|| service.slot_error.clone())
            .or_else(|| service.deploy_error.clone())
            .or_else(|| service.last_restart_error.clone()),
        restart_started_ms: None,
        restart_finished_ms: None,
        restart: service.restart.clone(),
        deploy: service.deploy.clone(),
        canary: service.canary.clone(),
        canary_sample: None,
        updated_ms: None,
    }
}

/// The build a local `promote` or `rollback` answer names (`<svc>: promoted <build>`,
/// `<svc>: rolled back to <build>`): its last word (build ids hold no spaces).
pub fn build_in_answer(message: &str) -> Option<&str> {
    let last = message.split_whitespace().next_back()?;
    crate::build::check_build_id(last).ok().map(|()| last)
}

// ------------------------------------------------------------------------------------------------
// The display

/// Where the progress goes: one plain line per change when stdout is not a terminal, an indicatif
/// display on stdout when it is.
enum Display {
    Plain,
    Bars(Bars),
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    /// A line per host at work now (at most [`DISPLAY_HOSTS_MAX`]).
    hosts: BTreeMap<String, ProgressBar>,
    /// A line saying how many hosts at work are not shown.
    more: Option<ProgressBar>,
}

impl Display {
    fn new(hosts: usize) -> Display {
        if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            return Display::Plain;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let overall = multi.add(ProgressBar::new(hosts as u64));
        overall.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} {bar:16} {pos}/{len} host(s) done · {msg}",
            )
            .expect("the template is valid"),
        );
        overall.enable_steady_tick(Duration::from_millis(TICK_MS));
        Display::Bars(Bars {
            multi,
            overall,
            hosts: BTreeMap::new(),
            more: None,
        })
    }

    /// Shows the changes of one view.
    fn show(&mut self, elapsed: Duration, changes: &[(String, Progress)], tracker: &Tracker) {
        match self {
            Display::Plain => {
                let mut out = std::io::stdout().lock();
                for (host, progress) in changes {
                    let _ = writeln!(out, "{}", plain_line(elapsed, host, progress));
                }
                let _ = out.flush();
            }
            Display::Bars(bars) => bars.show(changes, tracker),
        }
    }

    /// Clears the display (the summary follows on stdout, errors on stderr).
    fn finish(self) {
        if let Display::Bars(bars) = self {
            for bar in bars.hosts.values() {
                bar.finish_and_clear();
            }
            if let Some(more) = &bars.more {
                more.finish_and_clear();
            }
            bars.overall.finish_and_clear();
        }
    }
}

impl Bars {
    fn show(&mut self, changes: &[(String, Progress)], tracker: &Tracker) {
        for (host, progress) in changes {
            if let Progress::Failed(why) = progress {
                let _ = self.multi.println(format!("{host} failed: {why}"));
            }
            if progress.is_active() && self.hosts.len() < DISPLAY_HOSTS_MAX
                || self.hosts.contains_key(host)
            {
                let bar = self.hosts.entry(host.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("  {msg}").expect("the template is valid"),
                    );
                    bar
                });
                if progress.is_active() {
                    bar.set_message(format!("{host} {progress}"));
                } else {
                    bar.finish_and_clear();
                    self.multi.remove(bar);
                    self.hosts.remove(host);
                }
            }
        }
        // Kept under 80 columns with the bar: the per-host lines say the rest.
        let (mut done, mut restarting, mut waiting, mut failed) = (0u64, 0, 0, 0);
        for (_, p) in tracker.progress() {
            match p {
                Progress::Serving => done += 1,
                Progress::Restarting { .. } | Progress::Finishing => restarting += 1,
                Progress::WaitingSlot => waiting += 1,
                Progress::Failed(_) | Progress::Gone => failed += 1,
                _ => {}
            }
        }
        self.overall.set_position(done);
        self.overall.set_message(format!(
            "{restarting} restarting · {waiting} waiting-slot · {failed} failed"
        ));
        let active = tracker.progress().filter(|(_, p)| p.is_active()).count();
        let hidden = active.saturating_sub(self.hosts.len());
        match (&self.more, hidden) {
            (Some(more), 0) => {
                more.finish_and_clear();
                self.multi.remove(more);
                self.more = None;
            }
            (Some(more), n) => more.set_message(format!("… and {n} more at work")),
            (None, 0) => {}
            (None, n) => {
                let more = self.multi.add(ProgressBar::new_spinner());
                more.set_style(
                    ProgressStyle::with_template("  {msg}").expect("the template is valid"),
                );
                more.set_message(format!("… and {n} more at work"));
                self.more = Some(more);
            }
        }
    }
}

/// One plain line: `12.3s h2 restarting batch 1/2 [0] draining`.
pub fn plain_line(elapsed: Duration, host: &str, progress: &Progress) -> String {
    format!("{:.1}s {host} {progress}", elapsed.as_secs_f64())
}

/// The error of a wait that ended in failure, naming each host and its error.
fn failed_error(service: &str, build: &str, failed: &[(String, String)]) -> anyhow::Error {
    let mut message = format!(
        "{service}: build {build} failed on {} host(s):",
        failed.len()
    );
    for (host, why) in failed {
        message.push_str(&format!("\n  {host}: {why}"));
    }
    anyhow::anyhow!(message)
}

/// The error of a wait that ran out of time, naming each host not done and its progress.
fn timeout_error(service: &str, timeout: Duration, tracker: &Tracker) -> anyhow::Error {
    let mut message = format!(
        "{service}: timed out after {:.1}s waiting for build {} (the deploy goes on); not done:",
        timeout.as_secs_f64(),
        tracker.build()
    );
    for (host, progress) in tracker.progress() {
        if *progress != Progress::Serving {
            message.push_str(&format!("\n  {host}: {progress}"));
        }
    }
    anyhow::anyhow!(message)
}

/// Shows a tracker's changes until its verdict; ends the display; returns the outcome.
fn conclude(
    display: Display,
    service: &str,
    started: Instant,
    tracker: &Tracker,
    verdict: Verdict,
) -> anyhow::Result<()> {
    display.finish();
    match verdict {
        Verdict::Done => {
            println!(
                "{:.1}s done: {} host(s) serve {service} build {}",
                started.elapsed().as_secs_f64(),
                tracker.len(),
                tracker.build()
            );
            Ok(())
        }
        Verdict::Failed(failed) => Err(failed_error(service, tracker.build(), &failed)),
    }
}

/// Follows a fleet deploy of `build` (already written) until it is done, fails or times out.
pub async fn fleet(
    fleet: &Fleet,
    service: &str,
    build: &str,
    canary: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut watch = fleet
        .watch_view(service)
        .await
        .with_context(|| format!("following /services/{service}"))?;
    let hosts = targeted(watch.view(), build, canary);
    if hosts.is_empty() {
        let which = if canary {
            "no canary host has a status node"
        } else {
            "no host with a status node targets it"
        };
        bail!("{service}: nothing to wait for: {which} (build {build})");
    }
    let mut tracker = Tracker::new(build, hosts);
    let mut display = Display::new(tracker.len());
    // The first view shows every host once, pending included, so each host's lines begin there.
    let first: Vec<(String, Progress)> = {
        tracker.observe(watch.view());
        tracker
            .progress()
            .map(|(h, p)| (h.to_owned(), p.clone()))
            .collect()
    };
    display.show(started.elapsed(), &first, &tracker);
    loop {
        if let Some(verdict) = tracker.verdict() {
            return conclude(display, service, started, &tracker, verdict);
        }
        let view = match tokio::time::timeout_at(deadline, watch.changed()).await {
            Ok(Ok(view)) => view,
            Ok(Err(e)) => {
                display.finish();
                return Err(anyhow::Error::new(e).context(format!(
                    "following /services/{service} (the deploy goes on)"
                )));
            }
            Err(_) => {
                display.finish();
                return Err(timeout_error(service, timeout, &tracker));
            }
        };
        let changes = tracker.observe(view);
        display.show(started.elapsed(), &changes, &tracker);
    }
}

/// Follows a deploy of `build` on this host's daemon (already asked for) until the service
/// serves it, its deploy fails, or the wait times out. `host` names the host in the lines.
pub async fn local(
    client: &Client,
    host: &str,
    service: &str,
    build: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut tracker = Tracker::new(build, [host.to_owned()]);
    let mut display = Display::new(1);
    display.show(
        started.elapsed(),
        &[(host.to_owned(), Progress::Pending)],
        &tracker,
    );
    loop {
        // A daemon that does not answer now and then (busy, restarting) is asked again until the
        // deadline; one that says the service is unknown ends the wait.
        match client.status(Some(service)).await {
            Ok(document) => {
                let status = document
                    .services
                    .iter()
                    .find(|s| s.service == service)
                    .map(|s| Ok(host_status_of(host, s)));
                if let Some(progress) = tracker.observe_host(host, status, None) {
                    display.show(started.elapsed(), &[(host.to_owned(), progress)], &tracker);
                }
                if let Some(verdict) = tracker.verdict() {
                    return conclude(display, service, started, &tracker, verdict);
                }
            }
            Err(e) if e.exit_code() != crate::exit::UNREACHABLE => {
                display.finish();
                return Err(anyhow::Error::new(e).context(format!("following {service}")));
            }
            Err(_) => {}
        }
        // The status is looked at once more at the deadline itself, then the wait gives up.
        let now = Instant::now();
        if now >= deadline {
            display.finish();
            return Err(timeout_error(service, timeout, &tracker));
        }
        let next = now + Duration::from_millis(super::host::PROGRESS_POLL_MS);
        tokio::time::sleep_until(next.min(deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{DeployStatus, InstanceState};
    use serde_json::json;
    use sluice_strategies::restart::Strategy;

    /// A status node: `build`, `target`, `state`, the deploy in flight (build, phase), the
    /// restart in flight, the error.
    fn node(
        build: &str,
        target: &str,
        state: HostState,
        deploy: Option<(&str, DeployPhase)>,
        restart: Option<RestartStatus>,
        error: Option<&str>,
    ) -> HostStatus {
        HostStatus {
            host: "h".into(),
            build: Some(build.into()),
            target_build: Some(target.into()),
            state,
            instances: vec![HostInstance {
                index: 0,
                state: InstanceState::Running,
                pid: Some(10),
                enabled: Some(true),
                healthy: true,
                warmup: None,
                last_error: None,
            }],
            last_error: error.map(str::to_owned),
            restart_started_ms: None,
            restart_finished_ms: None,
            restart,
            deploy: deploy.map(|(b, phase)| DeployStatus {
                build: b.into(),
                phase,
                started_ms: 1,
            }),
            canary: None,
            canary_sample: None,
            updated_ms: None,
        }
    }

    fn restart(batch: &[u32], done: &[u32], left: usize, step: Step) -> RestartStatus {
        RestartStatus {
            strategy: Strategy::Rolling,
            step: Some(step),
            batch: batch.to_vec(),
            rolling_back: false,
            batches_left: left,
            done: done.to_vec(),
        }
    }

    use DeployPhase as P;
    use HostState as S;

    #[test]
    fn each_status_node_classifies_against_the_build_and_what_was_seen() {
        let old_failure = "deploy of py build b9 failed: post_install exited 1";
        let this_failure = "deploy of py build b2 failed: checksum mismatch";
        // (status, seen before, progress, seen after)
        let cases: Vec<(HostStatus, bool, Progress, bool)> = vec![
            // Before the host takes the deploy up: its old build, serving.
            (
                node("b1", "b1", S::Serving, None, None, None),
                false,
                Progress::Pending,
                false,
            ),
            // The stale-status race: an earlier build's failure is not this deploy's.
            (
                node("b1", "b1", S::Failed, None, None, Some(old_failure)),
                false,
                Progress::Pending,
                false,
            ),
            // A failed restart of an earlier build leaves that build as the target: not ours.
            (
                node(
                    "b1",
                    "b9",
                    S::Failed,
                    None,
                    None,
                    Some("batch [0] failed: unhealthy"),
                ),
                false,
                Progress::Pending,
                false,
            ),
            // Busy deploying another build first.
            (
                node(
                    "b1",
                    "b1",
                    S::Installing,
                    Some(("b9", P::Installing)),
                    None,
                    None,
                ),
                false,
                Progress::Pending,
                false,
            ),
            (
                node(
                    "b1",
                    "b1",
                    S::Installing,
                    Some(("b2", P::Installing)),
                    None,
                    None,
                ),
                false,
                Progress::Installing,
                true,
            ),
            (
                node(
                    "b1",
                    "b1",
                    S::Installing,
                    Some(("b2", P::PreRestart)),
                    None,
                    None,
                ),
                true,
                Progress::Installing,
                true,
            ),
            (
                node(
                    "b1",
                    "b2",
                    S::Waiting,
                    Some(("b2", P::WaitingSlot)),
                    None,
                    None,
                ),
                true,
                Progress::WaitingSlot,
                true,
            ),
            // The restart is held at its first batch until a slot is held.
            (
                node(
                    "b1",
                    "b2",
                    S::Waiting,
                    Some(("b2", P::Restarting)),
                    Some(restart(&[0], &[], 1, Step::Draining)),
                    None,
                ),
                true,
                Progress::WaitingSlot,
                true,
            ),
            (
                node(
                    "b1",
                    "b2",
                    S::Restarting,
                    Some(("b2", P::Restarting)),
                    Some(restart(&[1], &[0], 0, Step::Warming)),
                    None,
                ),
                false,
                Progress::Restarting {
                    batch: 2,
                    batches: 2,
                    instances: vec![1],
                    step: Some(Step::Warming),
                    rolling_back: false,
                },
                true,
            ),
            (
                node(
                    "b2",
                    "b2",
                    S::Finishing,
                    Some(("b2", P::PostRestart)),
                    None,
                    None,
                ),
                true,
                Progress::Finishing,
                true,
            ),
            (
                node("b2", "b2", S::Serving, None, None, None),
                true,
                Progress::Serving,
                true,
            ),
            // Already on the build before the deploy: done at once.
            (
                node("b2", "b2", S::Serving, None, None, None),
                false,
                Progress::Serving,
                true,
            ),
            // A failure after it was seen at work on the build, whatever the error says.
            (
                node("b1", "b1", S::Failed, None, None, Some("hook timed out")),
                true,
                Progress::Failed("hook timed out".into()),
                true,
            ),
            // A failed install seen only after the fact: its error names the build.
            (
                node("b1", "b1", S::Failed, None, None, Some(this_failure)),
                false,
                Progress::Failed(this_failure.into()),
                false,
            ),
            // A failed restart of this build leaves it as the target.
            (
                node("b1", "b2", S::Failed, None, None, Some("batch [0] failed")),
                false,
                Progress::Failed("batch [0] failed".into()),
                true,
            ),
            // Deployed, but `post_restart` failed: the host says failed, so does the wait.
            (
                node(
                    "b2",
                    "b2",
                    S::Failed,
                    None,
                    None,
                    Some("deployed b2, but post_restart exited 1"),
                ),
                false,
                Progress::Failed("deployed b2, but post_restart exited 1".into()),
                true,
            ),
            // Rolled back after a failed deploy of b9: it serves b2 and still says failed.
            (
                node("b2", "b2", S::Failed, None, None, Some(old_failure)),
                false,
                Progress::Serving,
                true,
            ),
            // An error naming no build, on a host that serves the build: done.
            (
                node(
                    "b2",
                    "b2",
                    S::Failed,
                    None,
                    None,
                    Some("config node: bad json"),
                ),
                false,
                Progress::Serving,
                true,
            ),
            // An error naming another build is not this deploy's, whatever was seen before.
            (
                node("b1", "b1", S::Failed, None, None, Some(old_failure)),
                true,
                Progress::Pending,
                true,
            ),
            // A restarted daemon resuming this deploy's restart.
            (
                node(
                    "b1",
                    "b2",
                    S::Restarting,
                    None,
                    Some(restart(&[0], &[], 0, Step::Starting)),
                    None,
                ),
                false,
                Progress::Restarting {
                    batch: 1,
                    batches: 1,
                    instances: vec![0],
                    step: Some(Step::Starting),
                    rolling_back: false,
                },
                true,
            ),
            // An operator's restart on the old build: before this deploy.
            (
                node(
                    "b1",
                    "b1",
                    S::Restarting,
                    None,
                    Some(restart(&[0], &[], 0, Step::Starting)),
                    None,
                ),
                false,
                Progress::Pending,
                false,
            ),
        ];
        for (i, (status, seen_before, want, seen_after)) in cases.into_iter().enumerate() {
            let mut seen = seen_before;
            let got = classify(&status, "b2", &mut seen);
            assert_eq!(got, want, "case {i}: {status:?}");
            assert_eq!(seen, seen_after, "case {i}: seen");
        }
    }

    #[test]
    fn deploy_errors_name_their_build() {
        let cases = [
            (
                "deploy of py build b3 failed: post_install exited 1",
                Some("b3"),
            ),
            (
                "deploy of py build b3: the instances run it, but …",
                Some("b3"),
            ),
            ("deployed b3, but post_restart exited 1", Some("b3")),
            ("batch [0] failed: unhealthy", None),
            ("deploy of py", None),
            ("", None),
        ];
        for (error, want) in cases {
            assert_eq!(named_build(error), want, "{error}");
        }
    }

    #[test]
    fn a_failed_host_names_its_instances_errors() {
        let mut status = node("b1", "b2", S::Failed, None, None, Some("batch [0] failed"));
        status.instances[0].last_error = Some("health check failed: 503".into());
        let mut seen = true;
        assert_eq!(
            classify(&status, "b2", &mut seen),
            Progress::Failed("batch [0] failed; instance 0: health check failed: 503".into())
        );
    }

    fn view(hosts: &[(&str, Option<Role>, serde_json::Value)]) -> FleetView {
        let mut view = FleetView {
            enabled: Some("b2".into()),
            ..FleetView::default()
        };
        for (host, role, status) in hosts {
            if let Some(role) = role {
                view.roles.insert((*host).into(), *role);
            }
            view.hosts.insert((*host).into(), status.clone());
        }
        view
    }

    fn value(status: &HostStatus) -> serde_json::Value {
        serde_json::to_value(status).unwrap()
    }

    #[test]
    fn canary_deploys_target_the_canary_hosts_and_prod_deploys_the_hosts_whose_target_it_is() {
        let serving = value(&node("b1", "b1", S::Serving, None, None, None));
        let mut v = view(&[
            ("c1", Some(Role::Canary), serving.clone()),
            ("p1", None, serving.clone()),
            ("p2", Some(Role::Prod), serving.clone()),
        ]);
        v.enabled = Some("b1".into());
        v.canary = Some("b2".into());
        let set = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        assert_eq!(targeted(&v, "b2", true), set(&["c1"]));
        // A prod deploy leaves the canary on its canary build.
        v.enabled = Some("b3".into());
        assert_eq!(targeted(&v, "b3", false), set(&["p1", "p2"]));
        // Promoted: the canary build is everyone's.
        v.enabled = Some("b2".into());
        assert_eq!(targeted(&v, "b2", false), set(&["c1", "p1", "p2"]));
        // A canary host with no status node is not live: not waited for.
        v.roles.insert("c2".into(), Role::Canary);
        assert_eq!(targeted(&v, "b2", true), set(&["c1"]));
    }

    #[test]
    fn the_wait_ends_at_the_first_failure_and_only_when_every_host_serves_or_is_gone() {
        let serving_old = value(&node("b1", "b1", S::Serving, None, None, None));
        let stale_failed = value(&node(
            "b1",
            "b1",
            S::Failed,
            None,
            None,
            Some("deploy of py build b0 failed: bad"),
        ));
        let mut v = view(&[
            ("h1", None, serving_old.clone()),
            ("h2", None, stale_failed.clone()),
            ("h3", None, serving_old.clone()),
        ]);
        let mut t = Tracker::new("b2", targeted(&v, "b2", false));
        assert_eq!(t.len(), 3);
        // Every host starts pending, the stale failure included: nothing changed, no verdict.
        assert_eq!(t.observe(&v), vec![]);
        assert_eq!(t.verdict(), None);

        let installing = value(&node(
            "b1",
            "b1",
            S::Installing,
            Some(("b2", P::Installing)),
            None,
            None,
        ));
        v.hosts.insert("h1".into(), installing.clone());
        v.hosts.insert("h2".into(), installing);
        assert_eq!(
            t.observe(&v),
            vec![
                ("h1".to_owned(), Progress::Installing),
                ("h2".to_owned(), Progress::Installing)
            ]
        );
        // h2 fails with an error that does not name the build: it was seen at work on it.
        let failed = value(&node(
            "b1",
            "b1",
            S::Failed,
            None,
            None,
            Some("post_install exited 1"),
        ));
        v.hosts.insert("h2".into(), failed);
        let serving_new = value(&node("b2", "b2", S::Serving, None, None, None));
        v.hosts.insert("h1".into(), serving_new.clone());
        t.observe(&v);
        assert_eq!(
            t.verdict(),
            Some(Verdict::Failed(vec![(
                "h2".to_owned(),
                "post_install exited 1".to_owned()
            )]))
        );

        // Another wait: h3 vanishes mid-deploy, comes back, vanishes again.
        let mut v = view(&[
            ("h1", None, serving_old.clone()),
            ("h2", None, serving_old.clone()),
            ("h3", None, serving_old),
        ]);
        let mut t = Tracker::new("b2", targeted(&v, "b2", false));
        t.observe(&v);
        v.hosts.remove("h3");
        assert_eq!(t.observe(&v), vec![("h3".to_owned(), Progress::Gone)]);
        assert_eq!(t.verdict(), None, "the others are not done yet");
        v.hosts.insert("h3".into(), serving_new.clone());
        v.hosts.insert("h1".into(), serving_new.clone());
        t.observe(&v);
        v.hosts.remove("h3");
        t.observe(&v);
        assert_eq!(t.verdict(), None, "h2 is not done yet");
        v.hosts.insert("h2".into(), serving_new.clone());
        t.observe(&v);
        match t.verdict() {
            Some(Verdict::Failed(failed)) => {
                assert_eq!(failed.len(), 1);
                assert_eq!(failed[0].0, "h3");
                assert!(failed[0].1.starts_with("gone"), "{}", failed[0].1);
            }
            other => panic!("{other:?}"),
        }
        v.hosts.insert("h3".into(), serving_new);
        t.observe(&v);
        assert_eq!(t.verdict(), Some(Verdict::Done));
    }

    #[test]
    fn a_host_whose_build_changed_since_is_superseded_and_an_unreadable_node_waits() {
        let serving_old = value(&node("b1", "b1", S::Serving, None, None, None));
        let mut v = view(&[("h1", None, serving_old.clone()), ("h2", None, serving_old)]);
        let mut t = Tracker::new("b2", targeted(&v, "b2", false));
        v.hosts
            .insert("h2".into(), json!({"host": "h2", "state": "dancing"}));
        let changes = t.observe(&v);
        assert_eq!(changes.len(), 1);
        assert!(
            matches!(changes[0].1, Progress::Unreadable(_)),
            "{changes:?}"
        );
        assert_eq!(t.verdict(), None);
        v.enabled = Some("b3".into());
        t.observe(&v);
        match t.verdict() {
            Some(Verdict::Failed(failed)) => {
                assert_eq!(failed[0].0, "h1");
                assert!(failed[0].1.contains("now b3"), "{}", failed[0].1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plain_lines_are_stable() {
        let restarting = Progress::Restarting {
            batch: 1,
            batches: 2,
            instances: vec![0],
            step: Some(Step::Draining),
            rolling_back: false,
        };
        assert_eq!(
            plain_line(Duration::from_millis(12_340), "h2", &restarting),
            "12.3s h2 restarting batch 1/2 [0] draining"
        );
        assert_eq!(
            plain_line(Duration::ZERO, "h1", &Progress::WaitingSlot),
            "0.0s h1 waiting-slot"
        );
        assert_eq!(
            plain_line(
                Duration::from_secs(3),
                "h1",
                &Progress::Failed("bad".into())
            ),
            "3.0s h1 failed: bad"
        );
    }

    #[test]
    fn durations_parse_with_their_units_and_bounds() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "0s", "1d", "m", "-5s", "1000h", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_answers_name_their_build() {
        assert_eq!(build_in_answer("py: promoted b2"), Some("b2"));
        assert_eq!(build_in_answer("py: rolled back to b1"), Some("b1"));
        assert_eq!(build_in_answer(""), None);
    }
}
