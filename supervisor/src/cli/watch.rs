//! `sluice watch`: a full-screen terminal view of a service across the fleet (ZooKeeper) or of
//! this host's services (local backend). A pure [`Model`] (rows, selection, filter, the expanded
//! row, key → [`Action`]) and a pure [`draw`] are driven by a small loop that redraws when the
//! view changes (a ZooKeeper watch, or a changed status document on the local backend), on a key
//! and on a resize — never on a timer, except the elapsed time of a deploy in flight, which ticks
//! at most once a second while one is shown.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use ratatui::Frame;
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use serde::Deserialize as _;
use sluice_strategies::warmup::Summary;

use crate::control::client::Client;
use crate::control::protocol::{
    DeployPhase, DeployStatus, HostStatus, InstanceState, RestartStatus, ServiceStatus,
    StatusDocument,
};
use crate::coord::{Fleet, FleetView, Role};

/// How often the local backend reads the daemon's status (the control socket has no watch); the
/// screen is redrawn only when the answer differs from the last.
pub const LOCAL_POLL_MS: u64 = 1000;
/// The one ticking element, a deploy's elapsed time, redraws at most this often.
const TICK_MS: u64 = 1000;
/// Terminal events waiting for the loop; the reader thread blocks when it is full.
const EVENT_QUEUE: usize = 64;
/// How long the reader thread waits for an event before checking whether the loop still wants
/// events.
const EVENT_POLL_MS: u64 = 250;
/// How long the error line of an ended ZooKeeper session stays on screen (or until a key).
const SESSION_END_SHOW_MS: u64 = 3000;
/// The longest text kept of any one field from a status node, before it is fitted to a column.
const MAX_FIELD_CHARS: usize = 512;
/// The key help line.
const HELP: &str = "↑↓/jk select  PgUp/PgDn page  Enter expand  Esc collapse  f filter  q quit";

// ------------------------------------------------------------------------------------------------
// The model.

/// Which rows are shown, cycled by `f`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Filter {
    #[default]
    All,
    /// `failed`, and status nodes that cannot be read.
    Failed,
    /// `restarting` or `waiting` (for a restart slot).
    Busy,
    Installing,
    Serving,
}

impl Filter {
    pub fn as_str(self) -> &'static str {
        match self {
            Filter::All => "all",
            Filter::Failed => "failed",
            Filter::Busy => "restarting/waiting",
            Filter::Installing => "installing",
            Filter::Serving => "serving",
        }
    }

    fn next(self) -> Filter {
        match self {
            Filter::All => Filter::Failed,
            Filter::Failed => Filter::Busy,
            Filter::Busy => Filter::Installing,
            Filter::Installing => Filter::Serving,
            Filter::Serving => Filter::All,
        }
    }

    fn admits(self, row: &Row) -> bool {
        let Ok(status) = &row.status else {
            return matches!(self, Filter::All | Filter::Failed);
        };
        let state = status.state.as_str();
        match self {
            Filter::All => true,
            Filter::Failed => state == "failed",
            Filter::Busy => state == "restarting" || state == "waiting",
            Filter::Installing => state == "installing",
            Filter::Serving => state == "serving",
        }
    }
}

/// What the header says about the whole view.
#[derive(Debug, Clone, PartialEq)]
pub enum Title {
    /// One service across the fleet.
    Fleet {
        service: String,
        enabled: Option<String>,
        canary: Option<String>,
        leases: usize,
    },
    /// This host's services (or one).
    Local { service: Option<String> },
}

/// One instance, as an expanded row lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    pub index: u32,
    pub state: &'static str,
    pub pid: Option<u32>,
    pub enabled: Option<bool>,
    pub healthy: bool,
    pub warmup: Option<String>,
    pub last_error: Option<String>,
}

/// What one readable row shows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RowStatus {
    pub build: Option<String>,
    pub target: Option<String>,
    /// `installing`, `waiting`, `restarting`, `finishing`, `failed`, `serving` (and, on the local
    /// backend, `stopped`).
    pub state: String,
    /// The deploy in flight: its phase and its start (wall clock, ms).
    pub deploy: Option<(&'static str, u64)>,
    pub running: usize,
    /// Instances in steering; `None` without steering.
    pub enabled: Option<usize>,
    pub total: usize,
    /// The restart batch in flight.
    pub batch: Option<String>,
    /// First → last window p99 of the instances' last warm-ups (the worst instance's).
    pub warmup: Option<String>,
    /// The canary verdict, `None` when the node carries none.
    pub canary: Option<String>,
    pub last_error: Option<String>,
    pub instances: Vec<InstanceRow>,
}

/// One host (fleet) or service (local).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    /// `canary` or `prod` on the fleet; `None` on the local backend.
    pub role: Option<&'static str>,
    /// Why its status cannot be read, when it cannot.
    pub status: Result<RowStatus, String>,
}

/// What a key asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    /// Enter: expand the selected row, or collapse it when it is the expanded one.
    Toggle,
    /// Esc.
    Collapse,
    Filter,
    Quit,
    None,
}

/// The action of a key press.
pub fn action_of(key: KeyEvent) -> Action {
    if key.kind != KeyEventKind::Press {
        return Action::None;
    }
    match key.code {
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Action::Quit,
        KeyCode::Char('q') => Action::Quit,
        KeyCode::Up | KeyCode::Char('k') => Action::Up,
        KeyCode::Down | KeyCode::Char('j') => Action::Down,
        KeyCode::PageUp => Action::PageUp,
        KeyCode::PageDown => Action::PageDown,
        KeyCode::Home | KeyCode::Char('g') => Action::Home,
        KeyCode::End | KeyCode::Char('G') => Action::End,
        KeyCode::Enter => Action::Toggle,
        KeyCode::Esc => Action::Collapse,
        KeyCode::Char('f') => Action::Filter,
        _ => Action::None,
    }
}

/// Everything the screen shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub title: Title,
    rows: Vec<Row>,
    filter: Filter,
    /// Index of the selected row among the shown ones.
    selected: usize,
    /// Name of the expanded row.
    expanded: Option<String>,
    /// A line of trouble (the daemon cannot be reached, the session ended).
    pub error: Option<String>,
    /// Wall clock (ms) the elapsed times are measured to.
    pub now_ms: u64,
}

impl Model {
    pub fn new(title: Title, rows: Vec<Row>, now_ms: u64) -> Model {
        Model {
            title,
            rows,
            filter: Filter::All,
            selected: 0,
            expanded: None,
            error: None,
            now_ms,
        }
    }

    /// The rows the filter lets through.
    pub fn shown(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| self.filter.admits(r)).collect()
    }

    pub fn filter(&self) -> Filter {
        self.filter
    }

    pub fn selected(&self) -> Option<&Row> {
        self.shown().get(self.selected).copied()
    }

    pub fn expanded(&self) -> Option<&str> {
        self.expanded.as_deref()
    }

    /// Replaces the rows, keeping the same row selected when it is still shown.
    pub fn set_rows(&mut self, title: Title, rows: Vec<Row>) {
        let selected = self.selected().map(|r| r.name.clone());
        self.title = title;
        self.rows = rows;
        self.reselect(selected.as_deref());
    }

    fn reselect(&mut self, name: Option<&str>) {
        let shown = self.shown();
        let found = name.and_then(|n| shown.iter().position(|r| r.name == n));
        let len = shown.len();
        self.selected = found.unwrap_or(self.selected.min(len.saturating_sub(1)));
    }

    /// Whether something on screen changes with time alone (a deploy's elapsed time).
    pub fn ticking(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.status.as_ref().is_ok_and(|s| s.deploy.is_some()))
    }

    /// Applies a key's action; `page_rows` is how many rows a page holds. True when it quits.
    pub fn apply(&mut self, action: Action, page_rows: usize) -> bool {
        let len = self.shown().len();
        let last = len.saturating_sub(1);
        let page = page_rows.max(1);
        match action {
            Action::Quit => return true,
            Action::Up => self.selected = self.selected.saturating_sub(1),
            Action::Down => self.selected = (self.selected + 1).min(last),
            Action::PageUp => self.selected = self.selected.saturating_sub(page),
            Action::PageDown => self.selected = (self.selected + page).min(last),
            Action::Home => self.selected = 0,
            Action::End => self.selected = last,
            Action::Toggle => {
                let name = self.selected().map(|r| r.name.clone());
                self.expanded = if self.expanded == name { None } else { name };
            }
            Action::Collapse => self.expanded = None,
            Action::Filter => {
                let selected = self.selected().map(|r| r.name.clone());
                self.filter = self.filter.next();
                self.reselect(selected.as_deref());
            }
            Action::None => {}
        }
        false
    }
}

/// Text from a status node made safe to print: control characters (escape sequences a node could
/// smuggle into the terminal) become spaces, and it is bounded.
fn clean(text: &str) -> String {
    text.chars()
        .take(MAX_FIELD_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn clean_opt(text: Option<&str>) -> Option<String> {
    text.map(clean)
}

/// A latency for a narrow column: `850us`, `12.3ms`, `1.2s`.
pub fn latency(us: u64) -> String {
    if us < 1000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.1}s", us as f64 / 1_000_000.0)
    }
}

/// `first → last` window p99 of one warm-up.
fn warmup_of(summary: &Summary) -> Option<String> {
    let first = summary.first_window.as_ref()?;
    let last = summary.last_window.as_ref().unwrap_or(first);
    Some(format!(
        "{}→{}",
        latency(first.p99_us),
        latency(last.p99_us)
    ))
}

/// The worst (highest first-window p99) of the instances' last warm-ups.
fn worst_warmup<'a>(summaries: impl Iterator<Item = &'a Summary>) -> Option<String> {
    summaries
        .filter(|s| s.first_window.is_some())
        .max_by_key(|s| s.first_window.as_ref().map_or(0, |w| w.p99_us))
        .and_then(warmup_of)
}

/// A value's serde name (`warming`, `drain`).
fn word<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

fn batch_of(restart: &RestartStatus) -> String {
    let members: Vec<String> = restart.batch.iter().map(u32::to_string).collect();
    let step = restart.step.as_ref().map_or_else(|| "-".into(), word);
    format!(
        "{}[{}] {step} {}/{}",
        if restart.rolling_back {
            "rollback "
        } else {
            ""
        },
        members.join(","),
        restart.done.len(),
        restart.batches_left
    )
}

fn phase_of(deploy: &DeployStatus) -> (&'static str, u64) {
    let phase = match deploy.phase {
        DeployPhase::Installing => "installing",
        DeployPhase::PreRestart => "pre-restart",
        DeployPhase::WaitingSlot => "waiting-slot",
        DeployPhase::Restarting => "restarting",
        DeployPhase::PostRestart => "post-restart",
    };
    (phase, deploy.started_ms)
}

/// The canary verdict of the agreed contract (`{"build", "outcome", "action", …}`), read
/// defensively: absent or not an object is `None`; unknown fields are ignored.
fn canary_of(node: &serde_json::Value) -> Option<String> {
    let canary = node.get("canary")?.as_object()?;
    let outcome = canary.get("outcome").and_then(|v| v.as_str())?;
    let mut text = clean(outcome);
    if let Some(action) = canary.get("action").and_then(|v| v.as_str()) {
        text.push(' ');
        text.push_str(&clean(action));
    }
    Some(text)
}

/// The rows of a fleet view: one per host with a status node or a role, by name.
pub fn rows_of_view(view: &FleetView) -> (Title, Vec<Row>) {
    let mut names: Vec<&String> = view.hosts.keys().chain(view.roles.keys()).collect();
    names.sort();
    names.dedup();
    let rows = names
        .into_iter()
        .map(|name| {
            let role = match view.role(name) {
                Role::Canary => "canary",
                Role::Prod => "prod",
            };
            let status = match view.hosts.get(name) {
                None => Err("no status node yet".to_owned()),
                Some(node) => host_row(node),
            };
            Row {
                name: clean(name),
                role: Some(role),
                status,
            }
        })
        .collect();
    let title = Title::Fleet {
        service: String::new(),
        enabled: clean_opt(view.enabled.as_deref()),
        canary: clean_opt(view.canary.as_deref()),
        leases: view.leases,
    };
    (title, rows)
}

/// One host's status node as a row; a node this version cannot read is the reason why.
fn host_row(node: &serde_json::Value) -> Result<RowStatus, String> {
    let status = HostStatus::deserialize(node)
        .map_err(|e| format!("unreadable status node: {}", clean(&e.to_string())))?;
    let instances: Vec<InstanceRow> = status
        .instances
        .iter()
        .map(|i| InstanceRow {
            index: i.index,
            state: i.state.as_str(),
            pid: i.pid,
            enabled: i.enabled,
            healthy: i.healthy,
            warmup: i.warmup.as_ref().and_then(warmup_of),
            last_error: clean_opt(i.last_error.as_deref()),
        })
        .collect();
    Ok(RowStatus {
        build: clean_opt(status.build.as_deref()),
        target: clean_opt(status.target_build.as_deref()),
        state: status.state.as_str().to_owned(),
        deploy: status.deploy.as_ref().map(phase_of),
        running: count_running(instances.iter().map(|i| i.state)),
        enabled: count_enabled(instances.iter().map(|i| i.enabled)),
        total: instances.len(),
        batch: status.restart.as_ref().map(batch_of),
        warmup: worst_warmup(status.instances.iter().filter_map(|i| i.warmup.as_ref())),
        canary: canary_of(node),
        last_error: clean_opt(status.last_error.as_deref()),
        instances,
    })
}

fn count_running(states: impl Iterator<Item = &'static str>) -> usize {
    states
        .filter(|s| *s == InstanceState::Running.as_str())
        .count()
}

/// Instances in steering, `None` when no instance is steered (a service without steering).
fn count_enabled(enabled: impl Iterator<Item = Option<bool>>) -> Option<usize> {
    let mut any = false;
    let mut count = 0;
    for e in enabled {
        any |= e.is_some();
        count += usize::from(e == Some(true));
    }
    any.then_some(count)
}

/// The rows of this host's status document: one per service.
pub fn rows_of_document(document: &serde_json::Value) -> Vec<Row> {
    let services = document
        .get("services")
        .and_then(|s| s.as_array())
        .map_or(&[][..], Vec::as_slice);
    let mut rows: Vec<Row> = services
        .iter()
        .map(|node| {
            let name = node
                .get("service")
                .and_then(|s| s.as_str())
                .map_or_else(|| "?".to_owned(), clean);
            Row {
                name,
                role: None,
                status: service_row(node),
            }
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

/// One service of a status document as a row. Its state is the host state it would publish:
/// the deploy phase while one is in flight, `restarting` during a restart, `failed` after a
/// failed deploy or restart or with an instance that gave up, `stopped` when nothing runs, else
/// `serving`.
fn service_row(node: &serde_json::Value) -> Result<RowStatus, String> {
    let status = ServiceStatus::deserialize(node)
        .map_err(|e| format!("unreadable service status: {}", clean(&e.to_string())))?;
    let instances: Vec<InstanceRow> = status
        .instances
        .iter()
        .map(|i| InstanceRow {
            index: i.index,
            state: i.state.as_str(),
            pid: i.pid,
            enabled: i.enabled,
            healthy: i.healthy,
            warmup: i.warmup.as_ref().and_then(warmup_of),
            last_error: clean_opt(i.last_error.as_deref()),
        })
        .collect();
    let running = count_running(instances.iter().map(|i| i.state));
    let error = status
        .deploy_error
        .as_deref()
        .or(status.last_restart_error.as_deref())
        .or(status.state_error.as_deref())
        .or(status.state_write_error.as_deref())
        .or(status.config_error.as_deref())
        .or(status.steering_error.as_deref())
        .or_else(|| {
            status
                .instances
                .iter()
                .find_map(|i| i.last_error.as_deref())
        });
    let gave_up = status
        .instances
        .iter()
        .any(|i| i.state == InstanceState::Fatal);
    let state = match (&status.deploy, &status.restart) {
        (Some(d), _) => match d.phase {
            DeployPhase::Installing | DeployPhase::PreRestart => "installing",
            DeployPhase::WaitingSlot => "waiting",
            DeployPhase::Restarting => "restarting",
            DeployPhase::PostRestart => "finishing",
        },
        (None, Some(_)) => "restarting",
        (None, None)
            if gave_up || status.deploy_error.is_some() || status.last_restart_error.is_some() =>
        {
            "failed"
        }
        (None, None) if running == 0 => "stopped",
        (None, None) => "serving",
    };
    Ok(RowStatus {
        build: clean_opt(status.build.as_deref()),
        target: clean_opt(status.target_build.as_deref()),
        state: state.to_owned(),
        deploy: status.deploy.as_ref().map(phase_of),
        running,
        enabled: count_enabled(instances.iter().map(|i| i.enabled)),
        total: instances.len(),
        batch: status.restart.as_ref().map(batch_of),
        warmup: worst_warmup(status.instances.iter().filter_map(|i| i.warmup.as_ref())),
        canary: canary_of(node),
        last_error: clean_opt(error),
        instances,
    })
}

// ------------------------------------------------------------------------------------------------
// The view.

/// A column of the host table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Name,
    Role,
    Build,
    Target,
    State,
    Phase,
    Up,
    Enabled,
    Batch,
    Warmup,
    Canary,
    Error,
}

/// Columns in the order they are shown.
const COLUMNS: [Col; 12] = [
    Col::Name,
    Col::Role,
    Col::Build,
    Col::Target,
    Col::State,
    Col::Phase,
    Col::Up,
    Col::Enabled,
    Col::Batch,
    Col::Warmup,
    Col::Canary,
    Col::Error,
];

/// Columns dropped, first to last, when the screen is too narrow; name, build, state and up
/// always stay.
const DROP_ORDER: [Col; 8] = [
    Col::Role,
    Col::Enabled,
    Col::Warmup,
    Col::Canary,
    Col::Target,
    Col::Batch,
    Col::Phase,
    Col::Error,
];

/// The last error gets what is left of the line, but is dropped rather than shown narrower.
const MIN_ERROR_WIDTH: usize = 20;

impl Col {
    fn header(self, title: &Title) -> &'static str {
        match self {
            Col::Name => match title {
                Title::Fleet { .. } => "HOST",
                Title::Local { .. } => "SERVICE",
            },
            Col::Role => "ROLE",
            Col::Build => "BUILD",
            Col::Target => "TARGET",
            Col::State => "STATE",
            Col::Phase => "DEPLOY",
            Col::Up => "UP",
            Col::Enabled => "EN",
            Col::Batch => "BATCH done/left",
            Col::Warmup => "WARM-UP p99",
            Col::Canary => "CANARY",
            Col::Error => "LAST ERROR",
        }
    }

    /// The widest this column is drawn (the error takes the rest of the line).
    fn cap(self) -> usize {
        match self {
            Col::Name => 20,
            Col::Role => 6,
            Col::Build | Col::Target => 16,
            Col::State => 10,
            Col::Phase => 20,
            Col::Up => 5,
            Col::Enabled => 3,
            Col::Batch => 28,
            Col::Warmup => 16,
            Col::Canary => 20,
            Col::Error => usize::MAX,
        }
    }

    fn text(self, row: &Row, now_ms: u64) -> String {
        let status = match &row.status {
            Ok(s) => s,
            Err(why) => {
                return match self {
                    Col::Name => row.name.clone(),
                    Col::Role => row.role.unwrap_or("").to_owned(),
                    Col::State => "unreadable".into(),
                    Col::Error => why.clone(),
                    _ => String::new(),
                };
            }
        };
        let or_dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
        match self {
            Col::Name => row.name.clone(),
            Col::Role => row.role.unwrap_or("").to_owned(),
            Col::Build => or_dash(&status.build),
            Col::Target => or_dash(&status.target),
            Col::State => status.state.clone(),
            Col::Phase => match status.deploy {
                Some((phase, started_ms)) => {
                    format!("{phase} {}", elapsed(now_ms.saturating_sub(started_ms)))
                }
                None => "-".into(),
            },
            Col::Up => format!("{}/{}", status.running, status.total),
            Col::Enabled => status.enabled.map_or_else(|| "-".into(), |e| e.to_string()),
            Col::Batch => or_dash(&status.batch),
            Col::Warmup => or_dash(&status.warmup),
            Col::Canary => or_dash(&status.canary),
            Col::Error => status.last_error.clone().unwrap_or_default(),
        }
    }
}

/// An elapsed time for a narrow column: `42s`, `3m05s`, `2h10m`.
fn elapsed(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// Display width of `text` (wide characters count two).
fn width(text: &str) -> usize {
    Span::raw(text).width()
}

/// `text` cut to `max` columns (ending in `…` when cut) and padded to exactly `max`.
fn fit(text: &str, max: usize) -> String {
    let mut out = String::new();
    if width(text) <= max {
        out.push_str(text);
    } else if max > 0 {
        let mut used = 0;
        let mut buf = [0u8; 4];
        for c in text.chars() {
            let w = width(c.encode_utf8(&mut buf));
            if used + w > max - 1 {
                break;
            }
            out.push(c);
            used += w;
        }
        out.push('…');
    }
    let pad = max.saturating_sub(width(&out));
    out.extend(std::iter::repeat_n(' ', pad));
    out
}

/// The columns shown at `screen_width` and their widths: each as wide as its widest cell (within
/// its cap), dropped in [`DROP_ORDER`] until the line fits. The error column, when kept, takes
/// the rest; it is left out when no row has an error.
fn layout(title: &Title, rows: &[&Row], now_ms: u64, screen_width: usize) -> Vec<(Col, usize)> {
    let any_error = rows.iter().any(|r| !Col::Error.text(r, now_ms).is_empty());
    let mut cols: Vec<(Col, usize)> = COLUMNS
        .iter()
        .filter(|c| **c != Col::Error || any_error)
        .map(|&c| {
            let widest = rows
                .iter()
                .map(|r| width(&c.text(r, now_ms)))
                .max()
                .unwrap_or(0)
                .max(width(c.header(title)));
            (c, widest.min(c.cap()))
        })
        .collect();
    // A gutter of two (the selection mark) and one space between columns.
    let needed = |cols: &[(Col, usize)]| {
        2 + cols
            .iter()
            .map(|(c, w)| if *c == Col::Error { MIN_ERROR_WIDTH } else { *w } + 1)
            .sum::<usize>()
    };
    let mut drop = DROP_ORDER.iter();
    while needed(&cols) > screen_width {
        let Some(victim) = drop.next() else { break };
        cols.retain(|(c, _)| c != victim);
    }
    if let Some(pos) = cols.iter().position(|(c, _)| *c == Col::Error) {
        let others: usize = cols
            .iter()
            .filter(|(c, _)| *c != Col::Error)
            .map(|(_, w)| w + 1)
            .sum();
        cols[pos].1 = screen_width.saturating_sub(2 + others);
    }
    cols
}

fn line_of(cells: impl Iterator<Item = String>, mark: &str) -> String {
    let mut line = mark.to_owned();
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            line.push(' ');
        }
        line.push_str(&cell);
    }
    line
}

/// The header lines: what the view is, the counts by state, and the filter.
fn header(model: &Model) -> (String, String) {
    let first = match &model.title {
        Title::Fleet {
            service,
            enabled,
            canary,
            leases,
        } => format!(
            "{service}  enabled {}  enabled/canary {}  leases {leases}  filter: {}",
            enabled.as_deref().unwrap_or("-"),
            canary.as_deref().unwrap_or("-"),
            model.filter.as_str()
        ),
        Title::Local { service } => format!(
            "this host: {}  filter: {}",
            service.as_deref().unwrap_or("every service"),
            model.filter.as_str()
        ),
    };
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &model.rows {
        let state = row
            .status
            .as_ref()
            .map_or("unreadable", |s| s.state.as_str());
        *counts.entry(state).or_default() += 1;
    }
    let what = match model.title {
        Title::Fleet { .. } => "host(s)",
        Title::Local { .. } => "service(s)",
    };
    let mut second = format!("{} {what}", model.rows.len());
    for (state, n) in counts {
        second.push_str(&format!("  {state} {n}"));
    }
    let shown = model.shown().len();
    if shown != model.rows.len() {
        second.push_str(&format!("  ({shown} shown)"));
    }
    (first, second)
}

/// The lines of an expanded row: its instances.
fn instance_lines(row: &Row, screen_width: usize) -> Vec<String> {
    let Ok(status) = &row.status else {
        return vec![fit(
            "    (status unreadable: no instances to show)",
            screen_width,
        )];
    };
    if status.instances.is_empty() {
        return vec![fit("    (no instances)", screen_width)];
    }
    let mut lines = vec![fit(
        &format!(
            "    {:<5} {:<9} {:<8} {:<7} {:<7} {:<16} LAST ERROR",
            "INST", "STATE", "PID", "ENABLED", "HEALTHY", "WARM-UP p99"
        ),
        screen_width,
    )];
    for i in &status.instances {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let text = format!(
            "    {:<5} {:<9} {:<8} {:<7} {:<7} {:<16} {}",
            format!("#{}", i.index),
            i.state,
            i.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            i.enabled.map_or("-", yes_no),
            yes_no(i.healthy),
            i.warmup.as_deref().unwrap_or("-"),
            i.last_error.as_deref().unwrap_or(""),
        );
        lines.push(fit(&text, screen_width));
    }
    lines
}

/// Draws the whole screen. Nothing wraps: every line is cut to the width, columns are dropped
/// on narrow screens, rows scroll to keep the selection (and its expansion) in view.
pub fn draw(frame: &mut Frame, model: &Model) {
    let area = frame.area();
    let w = usize::from(area.width);
    let h = usize::from(area.height);
    if w == 0 || h == 0 {
        return;
    }
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut put = |y: usize, text: &str, style: Style| {
        if y < h {
            let rect = Rect::new(area.x, area.y + y as u16, area.width, 1);
            let line = Line::from(Span::styled(fit(text, w), style));
            frame.render_widget(line, rect);
        }
    };
    let (first, second) = header(model);
    put(0, &first, bold);
    put(1, &second, Style::default());
    // Rows between the column header (line 2) and the help line (last), less the error line.
    let error_lines = usize::from(model.error.is_some());
    let body_top = 3;
    let body_rows = h.saturating_sub(body_top + 1 + error_lines);
    if let Some(error) = &model.error
        && h >= 2
    {
        put(h - 2, &format!("error: {error}"), bold);
    }
    put(h - 1, HELP, Style::default());
    if h < body_top + 1 {
        return;
    }
    let shown = model.shown();
    let cols = layout(&model.title, &shown, model.now_ms, w);
    let head = line_of(
        cols.iter().map(|(c, cw)| fit(c.header(&model.title), *cw)),
        "  ",
    );
    put(2, &head, bold);
    if shown.is_empty() {
        put(
            body_top,
            &format!("  (no row matches the filter {})", model.filter.as_str()),
            Style::default(),
        );
        return;
    }
    // Every body line with the row it belongs to, then scrolled so that the selected row and as
    // much of its expansion as fits are on screen.
    let mut lines: Vec<(String, bool)> = Vec::new();
    let mut selected_at = (0, 0);
    for (i, row) in shown.iter().enumerate() {
        let is_selected = i == model.selected;
        let mark = if is_selected { "> " } else { "  " };
        let start = lines.len();
        lines.push((
            line_of(
                cols.iter()
                    .map(|(c, cw)| fit(&c.text(row, model.now_ms), *cw)),
                mark,
            ),
            is_selected,
        ));
        if model.expanded.as_deref() == Some(row.name.as_str()) {
            lines.extend(instance_lines(row, w).into_iter().map(|l| (l, false)));
        }
        if is_selected {
            selected_at = (start, lines.len());
        }
    }
    let (sel_start, sel_end) = selected_at;
    let mut offset = 0;
    if sel_end > offset + body_rows {
        offset = sel_end - body_rows.min(sel_end);
    }
    if sel_start < offset {
        offset = sel_start;
    }
    let reversed = Style::default().add_modifier(Modifier::REVERSED);
    for (n, (text, is_selected)) in lines.iter().skip(offset).take(body_rows).enumerate() {
        let style = if *is_selected {
            reversed
        } else {
            Style::default()
        };
        put(body_top + n, text, style);
    }
}

/// The same rows as plain text (`--once` on the local backend): every column, nothing cut but the
/// errors (to [`crate::clip`]'s bound).
pub fn plain(model: &Model) -> String {
    let (first, second) = header(model);
    let shown = model.shown();
    let cols = layout(&model.title, &shown, model.now_ms, usize::MAX / 2);
    let mut out = format!("{first}\n{second}\n");
    let line = |cells: Vec<String>| line_of(cells.into_iter(), "").trim_end().to_owned() + "\n";
    out.push_str(&line(
        cols.iter()
            .map(|(c, w)| {
                let text = c.header(&model.title);
                if *c == Col::Error {
                    text.to_owned()
                } else {
                    fit(text, *w)
                }
            })
            .collect(),
    ));
    for row in shown {
        out.push_str(&line(
            cols.iter()
                .map(|(c, w)| {
                    let text = c.text(row, model.now_ms);
                    if *c == Col::Error {
                        crate::clip::clip(&text).into_owned()
                    } else {
                        fit(&text, *w)
                    }
                })
                .collect(),
        ));
    }
    out
}

// ------------------------------------------------------------------------------------------------
// The terminal.

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Term = ratatui::Terminal<ratatui::backend::CrosstermBackend<std::io::Stdout>>;

/// Puts the terminal back as it was: raw mode off, the alternate screen left, the cursor shown.
/// Best effort: called on the way out, on errors and from the panic hook.
fn restore_terminal() {
    use ratatui::crossterm::{cursor, execute, terminal};
    let _ = terminal::disable_raw_mode();
    let _ = execute!(
        std::io::stdout(),
        terminal::LeaveAlternateScreen,
        cursor::Show
    );
}

/// Refuses to draw a full screen anywhere but on a terminal.
fn need_terminal() -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        bail!(
            "`sluice watch` draws a full-screen view and needs a terminal; off a terminal use `sluice watch --once`"
        );
    }
    Ok(())
}

/// The terminal in full-screen mode for as long as it lives; dropping it (a return, an error, an
/// unwinding panic) restores it, and the panic hook restores it before the message is printed.
struct Screen {
    terminal: Term,
}

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        use ratatui::crossterm::{execute, terminal};
        need_terminal()?;
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            hook(info);
        }));
        // The screen first: from here on, a failure restores the terminal on the way out.
        let mut screen = Screen {
            terminal: ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(
                std::io::stdout(),
            ))
            .context("opening the terminal")?,
        };
        terminal::enable_raw_mode().context("putting the terminal in raw mode")?;
        execute!(std::io::stdout(), terminal::EnterAlternateScreen)
            .context("entering the alternate screen")?;
        screen.terminal.clear().context("clearing the screen")?;
        Ok(screen)
    }

    fn draw(&mut self, model: &Model) -> anyhow::Result<()> {
        self.terminal
            .draw(|frame| draw(frame, model))
            .context("drawing the screen")?;
        Ok(())
    }

    /// Rows a page holds: the screen less the header, column header, error and help lines.
    fn page_rows(&self) -> usize {
        self.terminal
            .size()
            .map_or(10, |s| usize::from(s.height).saturating_sub(5))
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Terminal events, read on a thread of their own (ratatui's crossterm is built without its
/// async event stream) into a bounded queue. The thread ends once the queue's reader is gone.
fn terminal_events() -> tokio::sync::mpsc::Receiver<std::io::Result<Event>> {
    let (tx, rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    std::thread::spawn(move || {
        use ratatui::crossterm::event;
        while !tx.is_closed() {
            let next = match event::poll(Duration::from_millis(EVENT_POLL_MS)) {
                Ok(false) => continue,
                Ok(true) => event::read(),
                Err(e) => Err(e),
            };
            let failed = next.is_err();
            if tx.blocking_send(next).is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// What woke the loop.
enum Wake {
    Event(Option<std::io::Result<Event>>),
    Signal,
    Tick,
}

/// Signals that end the view with the terminal restored (in raw mode Ctrl-C is a key; these come
/// from elsewhere: `kill`, a closed ssh session).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("handling SIGINT")?,
            term: signal(SignalKind::terminate()).context("handling SIGTERM")?,
            hup: signal(SignalKind::hangup()).context("handling SIGHUP")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}

/// Waits for a terminal event, a signal, or (when something on screen ticks) the next second.
async fn wake(
    events: &mut tokio::sync::mpsc::Receiver<std::io::Result<Event>>,
    signals: &mut Signals,
    ticking: bool,
) -> Wake {
    let tick = async {
        if ticking {
            tokio::time::sleep(Duration::from_millis(TICK_MS)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        event = events.recv() => Wake::Event(event),
        () = signals.next() => Wake::Signal,
        () = tick => Wake::Tick,
    }
}

/// What the loop does after a wake.
enum Next {
    Quit,
    Redraw,
}

fn on_wake(wake: Wake, model: &mut Model, page_rows: usize) -> anyhow::Result<Next> {
    match wake {
        Wake::Event(None) => bail!("the terminal's event reader ended"),
        Wake::Event(Some(Err(e))) => Err(e).context("reading the terminal"),
        Wake::Event(Some(Ok(Event::Key(key)))) => {
            if model.apply(action_of(key), page_rows) {
                return Ok(Next::Quit);
            }
            Ok(Next::Redraw)
        }
        // A resize redraws at the new size (ratatui resizes its buffers on draw).
        Wake::Event(Some(Ok(_))) => Ok(Next::Redraw),
        Wake::Signal => Ok(Next::Quit),
        Wake::Tick => {
            model.now_ms = now_ms();
            Ok(Next::Redraw)
        }
    }
}

/// `sluice watch SVC` on the ZooKeeper backend: follows the service's [`FleetView`] until `q`,
/// Ctrl-C, a signal, or the end of the ZooKeeper session (an error, after the terminal is
/// restored).
pub async fn fleet(fleet: &Fleet, service: &str) -> anyhow::Result<()> {
    need_terminal()?;
    let mut signals = Signals::new()?;
    let mut watch = fleet
        .watch_view(service)
        .await
        .with_context(|| format!("watching /services/{service}"))?;
    let titled = |view: &FleetView| {
        let (mut title, rows) = rows_of_view(view);
        if let Title::Fleet { service: s, .. } = &mut title {
            *s = service.to_owned();
        }
        (title, rows)
    };
    let (title, rows) = titled(watch.view());
    let mut model = Model::new(title, rows, now_ms());
    let mut screen = Screen::enter()?;
    let mut events = terminal_events();
    loop {
        // One wait for the view's next change per change: the future is kept across keys and
        // resizes, so a change being read when a key comes is not lost.
        let changed = watch.changed();
        tokio::pin!(changed);
        let ended = loop {
            model.now_ms = now_ms();
            screen.draw(&model)?;
            let ticking = model.ticking();
            let page_rows = screen.page_rows();
            tokio::select! {
                result = &mut changed => break result.map(&titled),
                wake = wake(&mut events, &mut signals, ticking) => {
                    if let Next::Quit = on_wake(wake, &mut model, page_rows)? {
                        return Ok(());
                    }
                }
            }
        };
        match ended {
            Ok((title, rows)) => model.set_rows(title, rows),
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!("watching /services/{service}"));
                model.error = Some(format!("{e:#}"));
                screen.draw(&model)?;
                // Shown for a moment (or until a key), then the terminal is restored and the
                // error printed.
                let _ =
                    tokio::time::timeout(Duration::from_millis(SESSION_END_SHOW_MS), events.recv())
                        .await;
                return Err(e);
            }
        }
    }
}

/// Reads this host's status document, as JSON (the form the rows are read from, shared with
/// the status nodes' defensive reading).
async fn local_document(
    client: &Client,
    service: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let document: StatusDocument = client.status(service).await?;
    Ok(serde_json::to_value(&document)?)
}

/// `sluice watch [SVC]` on the local backend: this host's services (or one), read every
/// [`LOCAL_POLL_MS`] from the control socket and redrawn when what is shown changed. A daemon that does not
/// answer is an error line, and the view keeps trying.
pub async fn local(client: &Client, service: Option<&str>, once: bool) -> anyhow::Result<()> {
    let title = Title::Local {
        service: service.map(clean),
    };
    if once {
        let document = local_document(client, service).await?;
        let model = Model::new(title, rows_of_document(&document), now_ms());
        print!("{}", plain(&model));
        return Ok(());
    }
    need_terminal()?;
    let mut signals = Signals::new()?;
    // The first read before the screen: a daemon that is not there is a plain error.
    let first = local_document(client, service).await?;
    let mut model = Model::new(title.clone(), rows_of_document(&first), now_ms());
    let mut screen = Screen::enter()?;
    let mut events = terminal_events();
    let mut next_poll = tokio::time::Instant::now() + Duration::from_millis(LOCAL_POLL_MS);
    let mut dirty = true;
    loop {
        if dirty {
            model.now_ms = now_ms();
            screen.draw(&model)?;
        }
        let ticking = model.ticking();
        let page_rows = screen.page_rows();
        tokio::select! {
            () = tokio::time::sleep_until(next_poll) => {
                next_poll = tokio::time::Instant::now() + Duration::from_millis(LOCAL_POLL_MS);
                match local_document(client, service).await {
                    Ok(document) => {
                        // Compared as shown, not as answered: uptimes change at every read.
                        let rows = rows_of_document(&document);
                        dirty = rows != model.rows || model.error.is_some();
                        model.error = None;
                        if dirty {
                            model.set_rows(title.clone(), rows);
                        }
                    }
                    Err(e) => {
                        let error = format!("{e:#}");
                        dirty = model.error.as_ref() != Some(&error);
                        model.error = Some(error);
                    }
                }
            }
            wake = wake(&mut events, &mut signals, ticking) => {
                if let Next::Quit = on_wake(wake, &mut model, page_rows)? {
                    return Ok(());
                }
                dirty = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use serde_json::json;

    fn instance(
        index: u32,
        state: &str,
        enabled: bool,
        p99: Option<(u64, u64)>,
    ) -> serde_json::Value {
        let warmup = p99.map(|(first, last)| {
            json!({
                "requests": 100, "errors": 0, "duration_ms": 900, "ending": null,
                "first_window": {"requests": 10, "p50_us": 1, "p99_us": first, "max_us": first},
                "last_window": {"requests": 10, "p50_us": 1, "p99_us": last, "max_us": last},
            })
        });
        json!({"index": index, "state": state, "pid": 4000 + index, "enabled": enabled,
               "healthy": true, "warmup": warmup, "last_error": null})
    }

    fn host(name: &str, build: &str, state: &str) -> serde_json::Value {
        json!({
            "host": name, "build": build, "target_build": null, "state": state,
            "instances": [instance(0, "running", true, Some((12_300, 800))),
                          instance(1, "running", true, None)],
            "last_error": null, "restart_started_ms": null, "restart_finished_ms": null
        })
    }

    /// A fleet of `n` hosts: h1 is a canary restarting onto b2 with a canary verdict, h2 failed
    /// with a long error, h3 has a status node this version cannot read, the rest serve b1.
    fn view(n: usize) -> FleetView {
        let mut view = FleetView {
            enabled: Some("b1".into()),
            canary: Some("b2".into()),
            leases: 1,
            ..FleetView::default()
        };
        view.roles.insert("h1".into(), Role::Canary);
        let mut h1 = host("h1", "b1", "restarting");
        h1["target_build"] = json!("b2");
        h1["deploy"] = json!({"build": "b2", "phase": "restarting", "started_ms": 1_000});
        h1["restart"] = json!({"strategy": "drain", "step": "warming", "batch": [1],
                               "rolling_back": false, "batches_left": 0, "done": [0]});
        h1["canary"] = json!({"build": "b2", "outcome": "baking", "reasons": [], "action": null,
                              "extra": {"p99_ratio": 1.1}});
        view.hosts.insert("h1".into(), h1);
        let mut h2 = host("h2", "b1", "failed");
        h2["last_error"] = json!(format!(
            "post_install hook failed\x1b[2J: {} END-OF-ERROR",
            "x".repeat(300)
        ));
        view.hosts.insert("h2".into(), h2);
        view.hosts
            .insert("h3".into(), json!({"host": "h3", "state": "dancing"}));
        for i in 4..=n {
            let name = format!("h{i}");
            view.hosts
                .insert(name.clone(), host(&name, "b1", "serving"));
        }
        view
    }

    fn model(n: usize) -> Model {
        let (title, rows) = rows_of_view(&view(n));
        let title = match title {
            Title::Fleet {
                enabled,
                canary,
                leases,
                ..
            } => Title::Fleet {
                service: "py".into(),
                enabled,
                canary,
                leases,
            },
            other => other,
        };
        // 12 s after h1's deploy began.
        Model::new(title, rows, 13_000)
    }

    /// The screen's text, one string per line.
    fn screen(model: &Model, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, model)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| {
                let mut line = String::new();
                for x in 0..width {
                    line.push_str(buffer[(x, y)].symbol());
                }
                line
            })
            .collect()
    }

    fn line_of_host<'a>(lines: &'a [String], host: &str) -> &'a str {
        lines
            .iter()
            .find(|l| {
                l.get(2..)
                    .is_some_and(|l| l.starts_with(&format!("{host} ")))
            })
            .unwrap_or_else(|| panic!("no line for {host} in\n{}", lines.join("\n")))
    }

    #[test]
    fn every_host_shows_with_its_build_state_batch_warmup_and_canary_at_100x30() {
        let lines = screen(&model(5), 100, 30);
        let text = lines.join("\n");
        assert!(
            lines[0].starts_with("py  enabled b1  enabled/canary b2  leases 1  filter: all"),
            "{text}"
        );
        assert!(lines[1].contains("5 host(s)"), "{text}");
        assert!(
            lines[1].contains("serving 2") && lines[1].contains("unreadable 1"),
            "{text}"
        );
        assert!(lines[29].contains("q quit"), "{text}");
        let h1 = line_of_host(&lines, "h1");
        for want in [
            "b1",
            "b2",
            "restarting",
            "12s",
            "2/2",
            "[1] warming 1/0",
            "baking",
        ] {
            assert!(h1.contains(want), "h1 lacks {want}: {h1}\n{text}");
        }
        assert!(line_of_host(&lines, "h1").starts_with("> "), "{text}");
        // The worst instance's warm-up, first → last window p99, on a wider screen.
        let wide = screen(&model(5), 130, 30);
        assert!(
            line_of_host(&wide, "h1").contains("12.3ms→800us"),
            "{}",
            wide.join("\n")
        );
        let h4 = line_of_host(&lines, "h4");
        assert!(
            h4.contains("serving") && h4.contains("b1") && h4.contains(" - "),
            "{h4}"
        );
        let h3 = line_of_host(&lines, "h3");
        assert!(h3.contains("unreadable status node"), "{h3}");
        for line in &lines {
            assert_eq!(width(line), 100, "{line}");
        }
    }

    #[test]
    fn a_long_error_is_clipped_and_escapes_are_neutralized_at_80x24() {
        let lines = screen(&model(5), 80, 24);
        let text = lines.join("\n");
        let h2 = line_of_host(&lines, "h2");
        assert!(h2.contains("post_install hook"), "{text}");
        assert!(h2.ends_with('…'), "{h2}");
        assert!(
            !text.contains("END-OF-ERROR") && !text.contains('\x1b'),
            "{text}"
        );
        // The narrow screen drops columns rather than wrapping: name, build, state, up stay.
        let head = &lines[2];
        for want in ["HOST", "BUILD", "STATE", "UP"] {
            assert!(head.contains(want), "{head}");
        }
        assert!(!head.contains("ROLE"), "{head}");
        assert!(lines[23].contains("q quit"), "{text}");
    }

    #[test]
    fn enter_expands_the_selected_host_into_its_instances_and_esc_collapses() {
        let mut m = model(5);
        assert!(!m.apply(Action::Toggle, 10));
        assert_eq!(m.expanded(), Some("h1"));
        let lines = screen(&m, 100, 30);
        let text = lines.join("\n");
        let at = lines.iter().position(|l| l.starts_with("> h1")).unwrap();
        assert!(
            lines[at + 1].contains("INST") && lines[at + 1].contains("HEALTHY"),
            "{text}"
        );
        assert!(
            lines[at + 2].contains("#0") && lines[at + 2].contains("4000"),
            "{text}"
        );
        assert!(lines[at + 2].contains("12.3ms→800us"), "{text}");
        assert!(
            lines[at + 3].contains("#1") && lines[at + 3].contains("running"),
            "{text}"
        );
        assert!(lines[at + 4].starts_with("  h2"), "{text}");
        m.apply(Action::Collapse, 10);
        assert_eq!(m.expanded(), None);
        m.apply(Action::Down, 10);
        m.apply(Action::Toggle, 10);
        assert_eq!(m.expanded(), Some("h2"));
        m.apply(Action::Toggle, 10);
        assert_eq!(m.expanded(), None);
        // An unreadable node expands into a line saying so.
        m.apply(Action::Down, 10);
        m.apply(Action::Toggle, 10);
        let text = screen(&m, 80, 24).join("\n");
        assert!(text.contains("status unreadable"), "{text}");
    }

    #[test]
    fn f_cycles_the_filter_which_the_header_shows() {
        let mut m = model(5);
        let names = |m: &Model| m.shown().iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&m), ["h1", "h2", "h3", "h4", "h5"]);
        m.apply(Action::Filter, 10);
        assert_eq!(m.filter(), Filter::Failed);
        assert_eq!(names(&m), ["h2", "h3"]);
        let lines = screen(&m, 100, 30);
        assert!(lines[0].contains("filter: failed"), "{}", lines[0]);
        assert!(lines[1].contains("(2 shown)"), "{}", lines[1]);
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with("  h1") || l.starts_with("> h1"))
        );
        m.apply(Action::Filter, 10);
        assert_eq!(names(&m), ["h1"]);
        m.apply(Action::Filter, 10);
        assert!(names(&m).is_empty());
        let text = screen(&m, 80, 24).join("\n");
        assert!(
            text.contains("filter: installing") && text.contains("no row matches"),
            "{text}"
        );
        m.apply(Action::Filter, 10);
        assert_eq!(names(&m), ["h4", "h5"]);
        m.apply(Action::Filter, 10);
        assert_eq!(m.filter(), Filter::All);
    }

    #[test]
    fn keys_scroll_a_long_fleet_and_the_selection_stays_on_screen() {
        let mut m = model(60);
        assert_eq!(action_of(KeyEvent::from(KeyCode::Char('j'))), Action::Down);
        assert_eq!(action_of(KeyEvent::from(KeyCode::Up)), Action::Up);
        assert_eq!(action_of(KeyEvent::from(KeyCode::Char('q'))), Action::Quit);
        assert_eq!(
            action_of(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
        m.apply(Action::PageDown, 19);
        m.apply(Action::PageDown, 19);
        m.apply(Action::Down, 19);
        let selected = m.selected().unwrap().name.clone();
        let lines = screen(&m, 80, 24);
        let text = lines.join("\n");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("> {selected} "))),
            "{selected}\n{text}"
        );
        assert!(!text.contains("> h1 "), "{text}");
        m.apply(Action::End, 19);
        assert_eq!(m.selected().unwrap().name, "h9");
        m.apply(Action::Home, 19);
        assert_eq!(m.selected().unwrap().name, "h1");
        assert!(m.apply(Action::Quit, 19));
    }

    #[test]
    fn the_selection_follows_its_host_through_an_update() {
        let mut m = model(5);
        m.apply(Action::Down, 10);
        m.apply(Action::Down, 10);
        assert_eq!(m.selected().unwrap().name, "h3");
        let mut v = view(5);
        v.hosts.remove("h2");
        v.hosts.insert("h3".into(), host("h3", "b2", "serving"));
        let (title, rows) = rows_of_view(&v);
        m.set_rows(title, rows);
        assert_eq!(m.selected().unwrap().name, "h3");
        let h3 = line_of_host(&screen(&m, 100, 30), "h3").to_owned();
        assert!(h3.contains("b2") && h3.contains("serving"), "{h3}");
        assert!(m.ticking());
    }

    #[test]
    fn a_status_node_that_is_not_json_or_a_missing_one_is_a_line_not_a_crash() {
        let mut v = view(3);
        v.hosts.insert(
            "h9".into(),
            serde_json::Value::String("\u{1b}]0;pwned\u{7}garbage".into()),
        );
        v.roles.insert("h8".into(), Role::Canary);
        let (title, rows) = rows_of_view(&v);
        let m = Model::new(title, rows, 0);
        let lines = screen(&m, 100, 30);
        let text = lines.join("\n");
        let h9 = line_of_host(&lines, "h9");
        assert!(h9.contains("unreadable"), "{text}");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text}"
        );
        assert!(
            line_of_host(&lines, "h8").contains("no status node yet"),
            "{text}"
        );
    }

    #[test]
    fn an_error_line_sits_above_the_help() {
        let mut m = model(3);
        m.error = Some("zookeeper session ended: Expired".into());
        let lines = screen(&m, 80, 24);
        assert!(
            lines[22].starts_with("error: zookeeper session ended"),
            "{}",
            lines[22]
        );
        // Tiny screens draw what fits and do not panic.
        for (w, h) in [(1, 1), (10, 2), (20, 4), (80, 3)] {
            screen(&m, w, h);
        }
    }

    #[test]
    fn local_services_render_with_their_derived_state() {
        let svc = |name: &str, deploy: serde_json::Value| {
            json!({
                "service": name, "front_port": 9000, "strategy": "drain",
                "instances": [{
                    "service": name, "index": 0, "state": "running", "desired": "up",
                    "pid": 77, "shim_pid": 76, "port": 9001, "enabled": true, "healthy": true,
                    "started_ms": 1, "uptime_ms": 5, "restarts": 0, "failed_starts": 0,
                    "last_exit": null, "last_error": null, "last_restart_reason": null,
                    "warmup": null, "last_drain": null, "outdated": false, "cgroup": null,
                    "cpu_weight": null
                }],
                "restart": null, "last_restart_error": null, "steering_error": null,
                "build": "b1", "target_build": null, "deploy": deploy, "deploy_error": null,
                "config_error": null, "cgroups_error": null
            })
        };
        let document = json!({"services": [
            svc("web", serde_json::Value::Null),
            svc("api", json!({"build": "b2", "phase": "waiting-slot", "started_ms": 0})),
            {"service": "odd", "instances": "no"},
        ]});
        let rows = rows_of_document(&document);
        let m = Model::new(Title::Local { service: None }, rows, 61_000);
        let lines = screen(&m, 80, 24);
        let text = lines.join("\n");
        assert!(lines[0].contains("this host: every service"), "{text}");
        assert!(lines[2].starts_with("  SERVICE"), "{text}");
        let api = line_of_host(&lines, "api");
        assert!(api.contains("waiting") && api.contains("1m01s"), "{api}");
        let web = line_of_host(&lines, "web");
        assert!(web.contains("serving") && web.contains("1/1"), "{web}");
        assert!(line_of_host(&lines, "odd").contains("unreadable"), "{text}");
        let once = plain(&m);
        assert!(
            once.lines()
                .any(|l| l.starts_with("web") && l.contains("serving")),
            "{once}"
        );
    }
}
