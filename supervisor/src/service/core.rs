//! The core of one service: it owns the service's state (instances and their phases, the restart
//! machine in progress, steering desired and installed, the deploy and the fleet slot) and answers
//! one question: given this event at this time, what effects? It does no I/O, runs no task and
//! reads no clock (time is an argument); the few things it must know of the host at once come
//! through [`Env`]. The executor (`service/executor.rs`) runs the [`Effect`]s and turns their
//! outcomes into [`Event`]s carrying the instance's generation or the restart's epoch, so that a
//! late outcome of something that has since changed is recognised and dropped.
//!
//! The invariants are assertions here, not log lines: a stop of an instance the chain still
//! steers to (outside the strategies that stop in the chain by definition), a second process for
//! an instance, a restart action before the machine it came from was written, and a batch begun
//! on the fleet backend without a slot are panics ([`Core::assert_may_stop`],
//! [`Core::assert_one_owner`], [`Core::assert_persisted`], [`Core::assert_slot_held`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use sluice_shim::proto::{Outcome, Status};
use sluice_strategies::restart::{Input, Strategy, Version};
use sluice_strategies::steering::Chain;
use sluice_strategies::warmup::Summary;

use super::canary::{CanaryCore, CanaryEvent, CanaryView, CanaryWrite, SampleTarget};
use super::deploy::{Coordination, HookContext, InstallJob, LocalVerb};
use super::env::Env;
use super::restart::RestartWaits;
use super::steer::{DrainFor, Steering};
use super::{Action, targets};
use crate::config::{HostConfig, ServiceConfig, WarmupConfig};
use crate::protocol::{
    CpuWeight, Desired, HostStatus, InstanceState, InstanceStatus, RestartStatus, ServiceStatus,
};
use crate::service::health::Probe;
use crate::service::policy::{self, Decision};
use crate::service::spec::InstanceSpec;
use crate::service::state::ServiceState;

/// Milliseconds on one of the two clocks of [`Now`].
pub type Millis = u64;

/// Callers of one service waiting for an operator verb to take effect (`start`, `stop`, `drain`,
/// `enable` until their goal, `restart` until the restart ends); one more is refused. A client
/// that gave up (its request timed out) still counts until the goal is reached or failed, so
/// this bounds what a loop of timed-out clients can pile up.
pub const WAITERS_MAX: usize = 256;
/// The time of an event on both clocks the core uses. Ages, uptimes and run times (what decides
/// between a crash and a failed start) are differences of `boot_ms`, `CLOCK_BOOTTIME`: it never
/// steps with the wall clock, and the shims report start and exit times on it, so it holds across
/// the shim boundary and across brain restarts. `wall_ms` (unix) is for display and for what other
/// hosts read (deploy times in the status node) only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall_ms: Millis,
    pub boot_ms: Millis,
}

impl Now {
    /// Virtual time, where both clocks read the same (the unit tests and the simulation).
    #[cfg(test)]
    pub fn same(ms: Millis) -> Now {
        Now {
            wall_ms: ms,
            boot_ms: ms,
        }
    }

    /// The boot-clock time of a wall-clock time in the past (`started_wall_ms`), for a shim older
    /// than its boot-clock keys: right unless the wall clock stepped since.
    pub fn boot_of_wall(self, started_wall_ms: Millis) -> Millis {
        self.boot_ms
            .saturating_sub(self.wall_ms.saturating_sub(started_wall_ms))
    }
}

/// Names a caller waiting for an answer; the executor keeps the channel behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplyId(pub u64);

/// Where one instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No process, and none wanted right now.
    Stopped,
    /// A shim is being spawned.
    Spawning,
    /// Running for less than `startup_ms`.
    Starting,
    Running,
    /// Out of steering, waiting for its connections to end before it is stopped.
    Draining,
    /// Asked to stop; waiting for the exit.
    Stopping,
    /// Waiting to be started again after a failed start.
    Backoff,
    /// Exited and, by policy, not restarted.
    Exited,
    /// Failed to start `start_retries` times in a row; only an operator starts it again.
    Fatal,
}

impl Phase {
    pub fn state(self) -> InstanceState {
        match self {
            Phase::Stopped => InstanceState::Stopped,
            Phase::Spawning | Phase::Starting => InstanceState::Starting,
            Phase::Running => InstanceState::Running,
            Phase::Draining => InstanceState::Draining,
            Phase::Stopping => InstanceState::Stopping,
            Phase::Backoff => InstanceState::Backoff,
            Phase::Exited => InstanceState::Exited,
            Phase::Fatal => InstanceState::Fatal,
        }
    }

    /// A shim exists (or is being made) for the instance.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Phase::Spawning | Phase::Starting | Phase::Running | Phase::Draining | Phase::Stopping
        )
    }

    /// The instance's process runs and nobody asked it to go.
    pub fn is_up(self) -> bool {
        matches!(self, Phase::Starting | Phase::Running)
    }
}

/// The shim of a running instance, as it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimInfo {
    pub shim_pid: u32,
    pub pid: u32,
    /// When the instance's process started, unix ms (display).
    pub started_ms: u64,
    /// When it started, `CLOCK_BOOTTIME` ms: its age is measured from here.
    pub started_boot_ms: u64,
    pub tag: String,
}

/// What to do once a stop completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterStop {
    Nothing,
    /// Start it again, with this version of the configuration.
    Start(Version),
    /// It failed its readiness check: count a failed start.
    FailedStart,
    /// The index left the configuration: drop the instance.
    Remove,
}

#[derive(Debug)]
pub(super) struct Instance {
    pub(super) index: u32,
    pub(super) phase: Phase,
    pub(super) shim: Option<ShimInfo>,
    /// Bumped whenever the instance gets a new process or timer; stale events carry an old value.
    pub(super) generation: u64,
    pub(super) failed_starts: u32,
    pub(super) restarts: u32,
    pub(super) after_stop: AfterStop,
    pub(super) last_exit: Option<String>,
    pub(super) last_error: Option<String>,
    pub(super) last_restart_reason: Option<String>,
    /// Passed its readiness check since its last start: only healthy instances get traffic.
    pub(super) healthy: bool,
    pub(super) warmup: Option<Summary>,
    pub(super) last_drain: Option<sluice_strategies::drain::Outcome>,
    /// The cgroup directory its process (or its last one) was placed in; removed when the
    /// instance is gone for good.
    pub(super) cgroup: Option<PathBuf>,
    /// The low weight was written to that cgroup; false when unknown (adopted from an earlier
    /// daemon).
    pub(super) weight_low: bool,
    /// A timer is set for the end of its low phase (`restart.cpu_low_max_ms` after its start).
    pub(super) low_timer: bool,
    /// Why its last start or weight change could not use a cgroup.
    pub(super) cgroup_error: Option<String>,
    /// Its process's drain ended with no connection left (`Ending::Closed`): nothing more can
    /// reach it, so its stop may run at the low weight. Cleared at each start.
    pub(super) drained_closed: bool,
    /// When its current stop was asked for (boot clock); `None` outside a stop.
    pub(super) stop_began_ms: Option<Millis>,
}

impl Instance {
    fn new(index: u32) -> Self {
        Self {
            index,
            phase: Phase::Stopped,
            shim: None,
            generation: 0,
            failed_starts: 0,
            restarts: 0,
            after_stop: AfterStop::Nothing,
            last_exit: None,
            last_error: None,
            last_restart_reason: None,
            healthy: false,
            warmup: None,
            last_drain: None,
            cgroup: None,
            weight_low: false,
            low_timer: false,
            cgroup_error: None,
            drained_closed: false,
            stop_began_ms: None,
        }
    }
}

/// A request from the daemon (the executor keeps the reply channels; the core names them).
#[derive(Debug)]
pub enum Request {
    Control {
        action: Action,
        index: Option<u32>,
        reply: ReplyId,
    },
    Reconfigure {
        config: Box<ServiceConfig>,
        reply: ReplyId,
    },
    /// Answered once every desired instance has either started or failed (for start ordering).
    Settled(ReplyId),
    /// `sluice reload`: in `state_error`, read the state file again.
    RecheckState(ReplyId),
    /// Stops every instance (host shutdown or the service left the configuration), then ends.
    StopAll { forget: bool, reply: ReplyId },
    /// The host is shutting down (its intent is persisted): from now on nothing of the service is
    /// started, whatever its desired state says, until its `StopAll` comes.
    ShuttingDown,
    /// The coordination backend named the build this host should run.
    Desired { build: Option<String> },
    /// ZooKeeper became reachable or not.
    Connection(bool),
    /// The configuration node is bad (`Some`) or good again (`None`).
    ConfigError(Option<String>),
    /// ZooKeeper nodes this service obeys that the world may write (read after each connect).
    WorldWritable(Vec<String>),
    /// The fleet's restart limit is invalid (why, naming the node) or valid again.
    SlotError(Option<String>),
    /// `sluice deploy`, `promote`, `rollback` on the local backend.
    Local { verb: LocalVerb, reply: ReplyId },
    /// ZooKeeper's view of the rollout, for the canary analysis.
    CanaryView(CanaryView),
}

/// What happened to one instance's process, probe or cgroup (tagged with its generation).
#[derive(Debug)]
pub enum InstanceEvent {
    Spawned {
        /// The shim, and whether it was one an earlier daemon left (adopted, not spawned).
        result: Result<(ShimInfo, bool), String>,
        /// The cgroup made for it (`None`: not wanted).
        cgroup: Option<Result<PathBuf, String>>,
    },
    Exited(Result<Status, String>),
    StartupElapsed,
    BackoffElapsed,
    /// The readiness probe after a start outside a restart.
    Ready(Result<(), String>),
    LivenessFailed(String),
    /// The low weight was written to its cgroup, or why not.
    WeightSet(Result<(), String>),
    /// A stopping instance's processes were moved into its low-weight cgroup, or why not.
    Lowered(Result<(), String>),
}

/// An outcome for the restart machine (tagged with the epoch of the action it answers).
#[derive(Debug)]
pub enum RestartEvent {
    Input(Input),
    Warmed {
        index: u32,
        result: Box<Result<Summary, (String, Summary)>>,
    },
}

#[derive(Debug)]
pub enum DeployEvent {
    /// A deploy's download, install hooks and `pre_restart` hooks finished.
    Installed {
        build: String,
        result: Result<(), String>,
    },
    PostRestartDone {
        build: String,
        result: Result<(), String>,
    },
    /// The executor holds a fleet slot now, or why not.
    Slot(Result<(), String>),
}

/// What a timer reports when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Startup {
        index: u32,
        generation: u64,
    },
    Backoff {
        index: u32,
        generation: u64,
    },
    /// Time to try a failed iptables transaction again.
    SteerRetry,
    /// The instance's low CPU phase has reached its bound (`restart.cpu_low_max_ms` from its
    /// start, or half its `stop_grace_ms` from its stop): it leaves its cgroup.
    LowPhaseOver {
        index: u32,
        generation: u64,
    },
    /// A stop has waited `restart.steer_timeout_ms` for the chain to be rewritten without the
    /// instance (set when it began draining).
    UnsteerOver {
        index: u32,
        generation: u64,
    },
    /// A restart's step has waited `restart.steer_timeout_ms` for the chain to be rewritten
    /// without (`Disable`) or with (`Enable`) a member of its batch.
    MachineSteerOver {
        index: u32,
        epoch: u64,
    },
    /// Time to try a failed state write again ([`STATE_WRITE_RETRY_MS`]).
    StateWriteRetry,
    /// Time for the next sample of the canary series `epoch` (see `service/canary.rs`).
    CanarySample {
        epoch: u64,
    },
}

/// Pause between attempts to write a state file whose last write failed (a full disk, a
/// read-only file system): until one succeeds, the restart step, the deploy's `post_restart`
/// and pruning that wait for it stay put, and status shows `state_write_error`. Default 5,000 ms.
pub const STATE_WRITE_RETRY_MS: u64 = 5_000;

/// Everything the core reacts to.
#[derive(Debug)]
pub enum Event {
    Request(Request),
    Instance {
        index: u32,
        generation: u64,
        event: InstanceEvent,
    },
    /// An iptables transaction finished; `Ok` carries the instances now steered to.
    Steered(Result<BTreeSet<u32>, String>),
    /// A drain wait ended (`outcome` is `None` for an instance without a port: nothing to wait
    /// for).
    Drained {
        index: u32,
        waiter: DrainFor,
        outcome: Option<sluice_strategies::drain::Outcome>,
    },
    Restart {
        epoch: u64,
        event: RestartEvent,
    },
    Deploy(DeployEvent),
    Timer(Timer),
    /// A canary sample or a verdict's action came back.
    Canary(CanaryEvent),
}

/// What the core wants done. Data only: the executor runs each one in order.
#[derive(Debug)]
pub enum Effect {
    /// Spawn a shim for the instance (after the release of its previous shim and the removal of
    /// its cgroup), in a low-weight cgroup when `cgroup`; answers `Spawned`.
    Spawn {
        index: u32,
        generation: u64,
        spec: Box<InstanceSpec>,
        cgroup: bool,
    },
    /// Keep a `wait` open on the shim; answers `Exited`.
    Watch {
        index: u32,
        generation: u64,
    },
    /// Ask the shim to stop its instance (signal, grace, SIGKILL to the group); the watch answers.
    Stop {
        index: u32,
        signal: i32,
        grace_ms: u64,
        /// The chain may still steer to it: every instance is being stopped (shutdown, the
        /// service removed) and the chain could not be rewritten within
        /// `restart.steer_timeout_ms`.
        steered_anyway: bool,
    },
    /// The exit is recorded: let the shim go.
    Release {
        index: u32,
    },
    /// An operator's `sluice signal`; the executor answers `reply` once every shim answered.
    Signal {
        indices: Vec<u32>,
        signal: i32,
        reply: ReplyId,
    },
    /// The restart machine's reload signal; answers `Signalled` or `SignalFailed`.
    RestartSignal {
        index: u32,
        signal: i32,
        epoch: u64,
    },
    SetTimer {
        after_ms: u64,
        timer: Timer,
    },
    /// Probe until ready (a start outside a restart); answers `Ready`.
    AwaitReady {
        index: u32,
        generation: u64,
        probe: Box<Probe>,
    },
    /// Probe every `liveness_interval_ms`; answers `LivenessFailed` after too many failures.
    WatchLiveness {
        index: u32,
        generation: u64,
        probe: Box<Probe>,
    },
    /// The restart machine's check; answers `Healthy` or `Unhealthy`.
    Check {
        index: u32,
        epoch: u64,
        probe: Box<Probe>,
    },
    /// A restart batch member's warm-up (its request list loaded from `release`); answers
    /// `Warmed`, or `WarmFailed` when the list cannot be loaded.
    WarmUp {
        index: u32,
        epoch: u64,
        port: u16,
        config: Box<WarmupConfig>,
        release: Option<PathBuf>,
        sibling: crate::service::warmup::SiblingBar,
    },
    /// Write the service's chain in one transaction; answers `Steered`.
    ApplyChain {
        chain: Chain,
        desired: BTreeSet<u32>,
    },
    /// The one drain wait, for an instance already out of the chain; answers `Drained`.
    AwaitDrain {
        index: u32,
        waiter: DrainFor,
        port: Option<u16>,
        until: sluice_strategies::drain::DrainUntil,
        timeout_ms: u64,
    },
    /// Write the low weight to the instance's cgroup; answers `WeightSet`.
    SetLowWeight {
        index: u32,
        generation: u64,
        dir: PathBuf,
    },
    /// Make the instance's cgroup at the low weight and move its running processes (its
    /// tracking cgroup's, else its process and descendants) into it; answers `Lowered`.
    LowerRunning {
        index: u32,
        generation: u64,
        dir: PathBuf,
        pid: u32,
        /// Its shim: the process's parent, checked before its descendants are walked.
        shim_pid: u32,
    },
    /// Move what still runs in the cgroup back to the daemon's and remove it.
    RemoveCgroup {
        index: u32,
        dir: PathBuf,
    },
    /// Fetch, verify, extract and prepare a build; answers `Installed`.
    Install(Box<InstallJob>),
    /// Run `post_restart` and prune releases; answers `PostRestartDone`.
    PostRestart {
        build: String,
        hooks: Box<HookContext>,
        release: Option<PathBuf>,
        keep: usize,
    },
    /// Ask ZooKeeper for a fleet restart slot; answers `Slot`.
    AcquireSlot,
    /// Release the fleet slot once ZooKeeper acknowledged this status of the host (the end of
    /// its restart), published with it: the next host never sees this one still restarting.
    ReleaseSlot(Box<HostStatus>),
    PublishHostStatus(Box<HostStatus>),
    /// Sample the instances (scrape `metrics`, or send probes for `sample_interval_ms`), and
    /// read the other hosts' status nodes when `peers`; answers `Canary(Sampled)`.
    CanarySample {
        epoch: u64,
        targets: Vec<SampleTarget>,
        config: Box<crate::config::CanaryConfig>,
        peers: bool,
    },
    /// Promote the canary build or clear `enabled/canary` (both only while it names `build`);
    /// answers `Canary(Acted)`.
    CanaryWrite {
        build: String,
        write: CanaryWrite,
    },
    /// Write the analysis to `/services/<svc>/canary/<build>/<host>` (persistent).
    CanaryRecord {
        build: String,
        status: Box<crate::protocol::CanaryStatus>,
    },
    Reply {
        to: ReplyId,
        result: Result<String, String>,
    },
}

/// A caller waiting for instances to reach a goal.
struct Waiter {
    indices: Vec<u32>,
    goal: Goal,
    reply: ReplyId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    Up,
    Down,
    /// Out of steering (the drain of its connections is waited for separately).
    Unsteered,
    Steered,
}

/// What a service's core starts from.
pub struct Setup {
    pub name: String,
    pub host: HostConfig,
    /// This host's name in ZooKeeper (`coordination.host`, else the system's host name), resolved
    /// once by the executor.
    pub host_name: String,
    pub config: ServiceConfig,
    pub state: ServiceState,
    /// Why the state file could not be read (`state_error`); `state` is then the default.
    pub state_error: Option<String>,
    /// Whether restarts wait for a fleet slot (the ZooKeeper backend).
    pub fleet: bool,
    /// The instance cgroups' parent, or why there is none.
    pub cgroups: crate::service::cgroup::Detected,
    /// Whether iptables can be written (the daemon runs as root with `iptables-restore`).
    pub steerable: bool,
    /// What a previous daemon installed in the chain (`Ok(None)`: not steered), or why it cannot
    /// be read (or why steering is impossible).
    pub installed: Result<Option<BTreeSet<u32>>, String>,
}

pub struct Core {
    pub(super) name: String,
    pub(super) host: HostConfig,
    pub(super) host_name: String,
    pub(super) config: ServiceConfig,
    /// Desired state; written before it is acted on.
    pub(super) state: ServiceState,
    /// Set while the state file cannot be read (`state_error`): `state` is not what the
    /// operator decided, so instances are watched (exits recorded, shims released) but nothing
    /// is started, stopped, restarted, deployed or written for the service on its own, and
    /// steering may only lose instances that went down. `sluice reload` reads the file again.
    pub(super) state_error: Option<String>,
    pub(super) env: Box<dyn Env>,
    pub(super) fleet: bool,
    pub(super) steerable: bool,
    pub(super) cgroups: crate::service::cgroup::Detected,
    pub(super) instances: BTreeMap<u32, Instance>,
    waiters: Vec<Waiter>,
    settled: Vec<ReplyId>,
    /// Set while every instance is being stopped; the service ends when they all are.
    pub(super) stopping_all: Option<(bool, ReplyId)>,
    /// Instances (with their generation) stopped while the chain may still steer to them,
    /// because every instance is being stopped and the chain could not be rewritten within
    /// `restart.steer_timeout_ms`.
    pub(super) stopped_steered: BTreeSet<(u32, u64)>,
    /// The host is shutting down: nothing is started (see [`Request::ShuttingDown`]).
    pub(super) shutting_down: bool,
    pub(super) steering: Steering,
    /// What the restart in progress waits for (rebuilt from the persisted machine on resume).
    pub(super) restart_waits: RestartWaits,
    /// Callers of `sluice restart` waiting for the restart in progress.
    pub(super) restart_replies: Vec<ReplyId>,
    /// Desired build, deploy in progress, fleet slot, status publishing (not ZooKeeper itself,
    /// which the executor holds).
    pub(super) deploy: Coordination,
    /// Canary sampling and this host's bake (`service/canary.rs`).
    pub(super) canary: CanaryCore,
    /// The time of the event being handled, wall clock (display, status node).
    pub(super) now: Millis,
    /// The time of the event being handled, `CLOCK_BOOTTIME` (ages: see [`Now`]).
    pub(super) boot_now: Millis,
    /// What the event being handled wants done.
    pub(super) effects: Vec<Effect>,
    /// Bumped whenever the restart machine changes; `persisted_revision` is its value at the last
    /// write of the state, and a restart action may only be emitted when the two agree.
    pub(super) machine_revision: u64,
    /// The highest epoch any restart machine of this core reached. A new restart's epochs begin
    /// above it, so a timer or an outcome of an earlier restart (tagged with its epoch) never
    /// matches a step of the next one: two restarts' steps of the same rank would otherwise share
    /// an epoch (each machine counts from 0).
    pub(super) epoch_floor: u64,
    pub(super) persisted_revision: u64,
    /// Actions of a restart step whose write failed: they run once the state is written.
    pub(super) unwritten: Vec<sluice_strategies::restart::Action>,
    /// Why the last state write failed; `None` once a write succeeded.
    pub(super) state_write_error: Option<String>,
    write_retry_scheduled: bool,
}

pub(super) fn describe(outcome: Option<Outcome>) -> String {
    match outcome {
        Some(Outcome::Code(code)) => format!("exit code {code}"),
        Some(Outcome::Signal(signal)) => {
            format!("killed by signal {}", crate::config::Signal(signal))
        }
        None => "shim lost; exit status unknown".into(),
    }
}

impl Core {
    pub fn new(setup: Setup, env: Box<dyn Env>) -> Self {
        let mut steering = Steering::default();
        if setup.config.steers() {
            match setup.installed {
                Ok(installed) => steering.installed = installed,
                Err(e) => steering.error = Some(e),
            }
        }
        Self {
            name: setup.name,
            host: setup.host,
            host_name: setup.host_name,
            config: setup.config,
            state: setup.state,
            state_error: setup.state_error,
            env,
            fleet: setup.fleet,
            steerable: setup.steerable,
            cgroups: setup.cgroups,
            instances: BTreeMap::new(),
            waiters: Vec::new(),
            settled: Vec::new(),
            stopping_all: None,
            stopped_steered: BTreeSet::new(),
            shutting_down: false,
            steering,
            restart_waits: RestartWaits::default(),
            restart_replies: Vec::new(),
            deploy: Coordination::default(),
            canary: CanaryCore::default(),
            now: 0,
            boot_now: 0,
            effects: Vec::new(),
            machine_revision: 0,
            epoch_floor: 0,
            persisted_revision: 0,
            unwritten: Vec::new(),
            state_write_error: None,
            write_retry_scheduled: false,
        }
    }

    /// The first decisions: adopt the shims found (`found`, with what they said), start what is
    /// missing, resume a persisted restart, apply the local backend's desired build.
    #[cfg(test)]
    pub fn startup(&mut self, found: Vec<(u32, Status)>, now: Millis) -> Vec<Effect> {
        self.startup_at(found, Now::same(now))
    }

    /// [`Core::startup`] with the two clocks apart.
    pub fn startup_at(&mut self, found: Vec<(u32, Status)>, now: Now) -> Vec<Effect> {
        self.set_now(now);
        self.adopt(found);
        self.reconcile();
        self.resume_restart();
        self.local_desired_changed();
        self.after_change();
        std::mem::take(&mut self.effects)
    }

    /// The first decisions of a daemon that finishes a host shutdown an earlier daemon began (its
    /// intent was persisted): adopt the shims found and watch them; start nothing, resume no
    /// restart, apply no desired build. The daemon's `StopAll` stops them in their turn.
    pub fn startup_for_shutdown(&mut self, found: Vec<(u32, Status)>, now: Now) -> Vec<Effect> {
        self.set_now(now);
        self.shutting_down = true;
        self.adopt(found);
        self.after_change();
        std::mem::take(&mut self.effects)
    }

    /// Handles one event at `now` (virtual time: both clocks) and returns what to do, in order.
    #[cfg(test)]
    pub fn handle(&mut self, event: Event, now: Millis) -> Vec<Effect> {
        self.handle_at(event, Now::same(now))
    }

    /// The time of the event being handled, on both clocks.
    pub(super) fn clocks(&self) -> Now {
        Now {
            wall_ms: self.now,
            boot_ms: self.boot_now,
        }
    }

    fn set_now(&mut self, now: Now) {
        self.now = now.wall_ms;
        self.boot_now = now.boot_ms;
    }

    /// Handles one event at `now` and returns what to do, in order.
    pub fn handle_at(&mut self, event: Event, now: Now) -> Vec<Effect> {
        self.set_now(now);
        match event {
            Event::Request(request) => self.on_request(request),
            Event::Instance {
                index,
                generation,
                event,
            } => self.on_instance(index, generation, event),
            Event::Timer(Timer::Startup { index, generation }) => {
                self.on_instance(index, generation, InstanceEvent::StartupElapsed)
            }
            Event::Timer(Timer::Backoff { index, generation }) => {
                self.on_instance(index, generation, InstanceEvent::BackoffElapsed)
            }
            Event::Timer(Timer::SteerRetry) => self.steering.retry_scheduled = false,
            Event::Timer(Timer::UnsteerOver { index, generation }) => {
                self.on_unsteer_over(index, generation)
            }
            Event::Timer(Timer::MachineSteerOver { index, epoch }) => {
                self.on_machine_steer_over(index, epoch)
            }
            Event::Timer(Timer::StateWriteRetry) => self.retry_write(),
            Event::Timer(Timer::CanarySample { epoch }) => self.on_canary_timer(epoch),
            Event::Canary(event) => self.on_canary(event),
            // Nothing to do here: `after_change` compares the instance's age with the bound.
            Event::Timer(Timer::LowPhaseOver { index, generation }) => {
                if let Some(instance) = self.instances.get_mut(&index)
                    && instance.generation == generation
                {
                    instance.low_timer = false;
                }
            }
            Event::Steered(result) => self.on_steered(result),
            Event::Drained {
                index,
                waiter,
                outcome,
            } => self.on_drained(index, waiter, outcome),
            Event::Restart { epoch, event } => match event {
                RestartEvent::Input(input) => self.feed(epoch, input),
                RestartEvent::Warmed { index, result } => self.on_warmed(index, epoch, *result),
            },
            Event::Deploy(event) => match event {
                DeployEvent::Installed { build, result } => self.on_installed(build, result),
                DeployEvent::PostRestartDone { build, result } => {
                    self.on_post_restart(build, result)
                }
                DeployEvent::Slot(result) => self.on_slot(result),
            },
        }
        self.after_change();
        std::mem::take(&mut self.effects)
    }

    /// Once every instance is stopped after a `StopAll`: whether to forget the service, and whom
    /// to answer. The executor then finishes the cgroup removals and ends.
    pub fn finished(&mut self) -> Option<(bool, ReplyId)> {
        if self.stopping_all.is_some() && self.instances.values().all(|i| !i.phase.has_process()) {
            return self.stopping_all.take();
        }
        None
    }

    pub(super) fn emit(&mut self, effect: Effect) {
        self.effects.push(effect);
    }

    pub(super) fn reply(&mut self, to: ReplyId, result: Result<String, String>) {
        self.emit(Effect::Reply { to, result });
    }

    pub(super) fn desired_up(&self, index: u32) -> bool {
        self.stopping_all.is_none()
            && !self.shutting_down
            && index < self.config.instances
            && !self.state.stopped.contains(&index)
    }

    /// The configuration a version stands for: `Old` is what instances were last brought to.
    pub(super) fn config_for(&self, version: Version) -> &ServiceConfig {
        match version {
            Version::New => &self.config,
            Version::Old => self.state.applied.as_ref().unwrap_or(&self.config),
        }
    }

    /// The release a version runs from: its build's release directory, else whatever `current`
    /// points to.
    pub(super) fn release_for(&self, version: Version) -> Option<PathBuf> {
        let build = match version {
            Version::New => self
                .state
                .target_build
                .as_ref()
                .or(self.state.build.as_ref()),
            Version::Old => self.state.build.as_ref(),
        };
        self.release_of(build.map(String::as_str))
            .or_else(|| self.env.current_release())
    }

    pub(super) fn spec(&self, index: u32, version: Version) -> Result<InstanceSpec, String> {
        self.env.spec(
            self.config_for(version),
            index,
            self.release_for(version).as_deref(),
        )
    }

    /// Writes the desired state. Only a write that succeeded counts: the restart machine is
    /// written (its actions may run) from here on only then. A failure is logged once per
    /// distinct error, shown in status (`state_write_error`), and the write is tried again every
    /// [`STATE_WRITE_RETRY_MS`] until one succeeds; the caller decides what does not happen
    /// meanwhile (a request is refused, a restart step waits).
    pub(super) fn persist(&mut self) -> Result<(), String> {
        // The file holds the record of the state error, which only the operator replaces.
        if let Some(error) = &self.state_error {
            return Err(format!("{} is in state_error: {error}", self.name));
        }
        match self.env.store(&self.state) {
            Ok(()) => {
                self.persisted_revision = self.machine_revision;
                if let Some(e) = self.state_write_error.take() {
                    tracing::info!(service = %self.name, "state written again (the last write failed: {e})");
                }
                Ok(())
            }
            Err(e) => {
                if self.state_write_error.as_ref() != Some(&e) {
                    tracing::error!(service = %self.name, "{e}");
                }
                self.state_write_error = Some(e.clone());
                if !self.write_retry_scheduled {
                    self.write_retry_scheduled = true;
                    self.emit(Effect::SetTimer {
                        after_ms: STATE_WRITE_RETRY_MS,
                        timer: Timer::StateWriteRetry,
                    });
                }
                Err(e)
            }
        }
    }

    /// Writes the state where nothing waits on the outcome but the retry (`persist` logs and
    /// shows a failure).
    pub(super) fn persist_logged(&mut self) {
        let _ = self.persist();
    }

    /// The retry timer: the last write failed, so the state is written again; what waited for it
    /// runs in `after_change` ([`Core::run_written`]).
    fn retry_write(&mut self) {
        self.write_retry_scheduled = false;
        if self.state_write_error.is_none() && self.machine_revision == self.persisted_revision {
            return;
        }
        if self.persist().is_ok() && self.state.restart.is_none() {
            // A restart of changed instances that could not begin while the state could not be
            // written (a reload, a deploy) begins now.
            self.restart_outdated();
        }
    }

    pub(super) fn probe(&self, index: u32) -> Option<Probe> {
        let config = self.config.health.clone()?;
        let subst = crate::config::Substitutions {
            service: &self.name,
            instance: index,
            port: self.config.port(index),
            release_dir: None,
        };
        let argv = config.exec.as_ref().map(|argv| {
            argv.iter()
                .map(|a| subst.apply(a).unwrap_or_else(|_| a.clone()))
                .collect()
        });
        // The instance's own identity, environment and directory; a spec that cannot be built
        // (an unresolvable user) fails the probe naming why, and runs nothing.
        let exec_as = match config.exec {
            None => Err("not an exec probe".to_owned()),
            Some(_) => self.spec(index, Version::New),
        }
        .map(|spec| {
            let identity = match (spec.uid, spec.gid) {
                (Some(uid), Some(gid)) => Some(sluice_hooks::Identity {
                    uid,
                    gid,
                    groups: spec.groups.unwrap_or_default(),
                }),
                _ => None,
            };
            crate::service::health::ExecContext {
                identity,
                env: spec.env,
                directory: spec.directory,
            }
        });
        Some(Probe {
            config,
            port: self.config.port(index),
            argv,
            exec_as,
        })
    }

    /// Takes over the shims the daemon found: running ones are watched, exited ones are handled
    /// as the exits the previous daemon did not see.
    fn adopt(&mut self, found: Vec<(u32, Status)>) {
        for (index, status) in found {
            let mut instance = Instance::new(index);
            instance.generation = 1;
            instance.cgroup = self.env.existing_cgroup(index);
            match status {
                Status::Running {
                    shim_pid,
                    pid,
                    started_ms,
                    started_boot_ms,
                    tag,
                    stopping,
                } => {
                    let started_boot_ms =
                        started_boot_ms.unwrap_or_else(|| self.clocks().boot_of_wall(started_ms));
                    instance.shim = Some(ShimInfo {
                        shim_pid,
                        pid,
                        started_ms,
                        started_boot_ms,
                        tag,
                    });
                    let age_ms = self.boot_now.saturating_sub(started_boot_ms);
                    instance.phase = if stopping {
                        Phase::Stopping
                    } else if age_ms >= self.config.startup_ms {
                        Phase::Running
                    } else {
                        Phase::Starting
                    };
                    // It was serving when the previous daemon died; a restart of ours must not
                    // take it out of steering.
                    instance.healthy = instance.phase == Phase::Running;
                    tracing::info!(service = %self.name, index, pid, "adopted running instance");
                    let phase = instance.phase;
                    self.instances.insert(index, instance);
                    self.emit(Effect::Watch {
                        index,
                        generation: 1,
                    });
                    if phase == Phase::Starting {
                        self.emit(Effect::SetTimer {
                            after_ms: self.config.startup_ms - age_ms,
                            timer: Timer::Startup {
                                index,
                                generation: 1,
                            },
                        });
                        self.start_readiness(index, 1);
                    } else if phase == Phase::Running {
                        self.start_liveness(index, 1);
                    }
                }
                Status::Exited {
                    shim_pid,
                    pid,
                    started_ms,
                    started_boot_ms,
                    ref tag,
                    ..
                } => {
                    instance.shim = Some(ShimInfo {
                        shim_pid,
                        pid,
                        started_ms,
                        started_boot_ms: started_boot_ms
                            .unwrap_or_else(|| self.clocks().boot_of_wall(started_ms)),
                        tag: tag.clone(),
                    });
                    instance.phase = Phase::Running;
                    self.instances.insert(index, instance);
                    tracing::info!(service = %self.name, index, "adopted an instance that exited while no daemon watched");
                    self.on_exit(index, Ok(status));
                }
            }
        }
    }

    /// Brings instances in line with the configuration and the desired state: starts what should
    /// run, stops what should not.
    pub(super) fn reconcile(&mut self) {
        for index in 0..self.config.instances {
            self.instances
                .entry(index)
                .or_insert_with(|| Instance::new(index));
        }
        if self.state_error.is_some() {
            return;
        }
        let indices: Vec<u32> = self.instances.keys().copied().collect();
        for index in indices {
            if self.in_batch(index) {
                continue;
            }
            let phase = self.instances[&index].phase;
            if index >= self.config.instances {
                if phase.has_process() {
                    self.stop(index, AfterStop::Remove, true);
                } else {
                    self.remove_cgroup(index);
                    self.instances.remove(&index);
                }
            } else if self.desired_up(index) {
                if phase == Phase::Stopped && self.waiting_for_first_build() {
                    let instance = self.instances.get_mut(&index).expect("listed above");
                    instance.last_error = Some("waiting for the first build to be deployed".into());
                } else if phase == Phase::Stopped {
                    self.start(index, Version::New);
                }
            } else if phase.is_up() {
                self.stop(index, AfterStop::Nothing, true);
            }
        }
    }

    /// A service deployed from builds has nothing to run before its first build is installed.
    fn waiting_for_first_build(&self) -> bool {
        self.config.build.is_some() && self.release_for(Version::New).is_none()
    }

    /// Instances running an older configuration than the current one.
    pub(super) fn outdated(&self) -> Vec<u32> {
        self.instances
            .values()
            .filter(|i| i.index < self.config.instances && self.is_outdated(i))
            .map(|i| i.index)
            .collect()
    }

    fn is_outdated(&self, instance: &Instance) -> bool {
        let Some(shim) = &instance.shim else {
            return false;
        };
        if !instance.phase.is_up() {
            return false;
        }
        self.spec(instance.index, Version::New)
            .map(|spec| spec.tag() != shim.tag)
            .unwrap_or(false)
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Control {
                action,
                index,
                reply,
            } => self.control(action, index, reply),
            Request::Reconfigure { config, reply } if self.state_error.is_some() => {
                // Applied once the state file is fixed: what to start or stop for it is unknown.
                self.config = *config;
                self.reconcile();
                let message = format!(
                    "{}: in state_error; the new configuration applies once its state file is fixed and `sluice reload` runs",
                    self.name
                );
                self.reply(reply, Ok(message));
            }
            Request::RecheckState(reply) => {
                let message = self.recheck_state();
                self.reply(reply, Ok(message));
            }
            Request::Reconfigure { config, reply } => {
                let before = self.config.instances;
                let saved = self.state.clone();
                let old = std::mem::replace(&mut self.config, *config);
                // What the running instances were brought to is what a failed batch returns to.
                if self.state.applied.is_none() {
                    self.state.applied = Some(old.clone());
                }
                let instances = self.config.instances;
                self.state.stopped.retain(|i| *i < instances);
                self.state.drained.retain(|i| *i < instances);
                if let Err(e) = self.persist() {
                    // Nothing is acted on that was not written: the old configuration stays.
                    self.config = old;
                    self.state = saved;
                    self.reply(reply, Err(e));
                    return;
                }
                self.reconcile();
                let restarting = self.restart_outdated();
                let message = format!(
                    "{}: {} -> {} instances, {} to restart",
                    self.name, before, self.config.instances, restarting
                );
                self.reply(reply, Ok(message));
            }
            Request::Settled(reply) => self.settled.push(reply),
            Request::Desired { build } => self.set_desired(build),
            Request::CanaryView(view) => self.set_canary_view(view),
            Request::Connection(connected) => self.set_connected(connected),
            Request::ConfigError(error) => self.deploy.config_error = error,
            Request::WorldWritable(nodes) => self.deploy.world_writable = nodes,
            Request::Local { reply, .. } if self.state_error.is_some() => {
                let message = self.state_error_refusal();
                self.reply(reply, Err(message));
            }
            Request::SlotError(error) => self.deploy.slot_error = error,
            Request::Local { verb, reply } => {
                let result = self.local_deploy(verb);
                self.reply(reply, result);
            }
            Request::ShuttingDown => {
                self.shutting_down = true;
                // A restart would start instances; the host is going down instead.
                self.abandon_restart("the host is shutting down");
            }
            Request::StopAll { forget, reply } => {
                self.stopping_all = Some((forget, reply));
                self.abandon_restart("the service is being stopped");
                let indices: Vec<u32> = self.instances.keys().copied().collect();
                for index in indices {
                    let instance = self.instances.get_mut(&index).expect("listed above");
                    match instance.phase {
                        Phase::Starting | Phase::Running | Phase::Draining => {
                            self.stop(index, AfterStop::Nothing, true)
                        }
                        Phase::Stopping => instance.after_stop = AfterStop::Nothing,
                        Phase::Backoff => {
                            instance.phase = Phase::Stopped;
                            instance.generation += 1;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn control(&mut self, action: Action, index: Option<u32>, reply: ReplyId) {
        let indices: Vec<u32> = match index {
            Some(i) if i < self.config.instances => vec![i],
            Some(i) => {
                let message = format!(
                    "{} has no instance {i} (it has {})",
                    self.name, self.config.instances
                );
                self.reply(reply, Err(message));
                return;
            }
            None => (0..self.config.instances).collect(),
        };
        if self.stopping_all.is_some() {
            let message = format!("{} is shutting down", self.name);
            self.reply(reply, Err(message));
            return;
        }
        if self.waiters.len() + self.restart_replies.len() >= WAITERS_MAX {
            let message = format!(
                "{}: {WAITERS_MAX} callers are waiting for earlier verbs already; try again once they are done",
                self.name
            );
            self.reply(reply, Err(message));
            return;
        }
        // Signals change nothing sluice decides; every other verb needs the desired state.
        if self.state_error.is_some() && !matches!(action, Action::Signal(_)) {
            let message = self.state_error_refusal();
            self.reply(reply, Err(message));
            return;
        }
        let busy: Vec<u32> = indices
            .iter()
            .copied()
            .filter(|i| self.in_batch(*i))
            .collect();
        if !busy.is_empty() && matches!(action, Action::Start | Action::Stop) {
            let message = format!(
                "{}/{busy:?} are being restarted; wait for the restart to finish",
                self.name
            );
            self.reply(reply, Err(message));
            return;
        }
        match action {
            Action::Start => {
                let saved = self.state.stopped.clone();
                for i in &indices {
                    self.state.stopped.remove(i);
                }
                if let Err(e) = self.persist() {
                    self.state.stopped = saved;
                    self.reply(reply, Err(e));
                    return;
                }
                for &i in &indices {
                    let instance = self.instances.get_mut(&i).expect("configured index");
                    if matches!(
                        instance.phase,
                        Phase::Fatal | Phase::Exited | Phase::Stopped | Phase::Backoff
                    ) {
                        instance.failed_starts = 0;
                        self.start(i, Version::New);
                    }
                }
                self.waiters.push(Waiter {
                    indices,
                    goal: Goal::Up,
                    reply,
                });
            }
            Action::Stop => {
                let saved = self.state.stopped.clone();
                self.state.stopped.extend(indices.iter().copied());
                if let Err(e) = self.persist() {
                    self.state.stopped = saved;
                    self.reply(reply, Err(e));
                    return;
                }
                for &i in &indices {
                    let instance = self.instances.get_mut(&i).expect("configured index");
                    match instance.phase {
                        Phase::Starting | Phase::Running => self.stop(i, AfterStop::Nothing, true),
                        Phase::Backoff | Phase::Exited | Phase::Fatal => {
                            instance.phase = Phase::Stopped;
                            instance.generation += 1;
                        }
                        Phase::Stopping | Phase::Draining => {
                            instance.after_stop = AfterStop::Nothing;
                        }
                        // A spawn in flight is stopped when it reports back (desired is down now).
                        Phase::Spawning | Phase::Stopped => {}
                    }
                }
                self.waiters.push(Waiter {
                    indices,
                    goal: Goal::Down,
                    reply,
                });
            }
            Action::Restart => {
                let wanted: Vec<u32> = indices
                    .into_iter()
                    .filter(|i| self.desired_up(*i))
                    .collect();
                if self.state.restart.is_some() {
                    // Join the restart in progress: the caller learns how it ends.
                    self.restart_replies.push(reply);
                    return;
                }
                // An operator's restart retries what failed before (unless it cannot begin).
                let failed = self.state.failed.take();
                self.restart_replies.push(reply);
                if !self.begin_restart(wanted) {
                    self.state.failed = failed;
                }
            }
            Action::Signal(signal) => {
                let indices: Vec<u32> = indices
                    .into_iter()
                    .filter(|i| self.instances.get(i).is_some_and(|i| i.phase.is_up()))
                    .collect();
                self.emit(Effect::Signal {
                    indices,
                    signal,
                    reply,
                });
            }
            Action::Drain | Action::Enable => {
                if !self.config.steers() {
                    let message = format!(
                        "{} is not steered by sluice (it needs `front_port` and `steering = \"iptables\"`)",
                        self.name
                    );
                    self.reply(reply, Err(message));
                    return;
                }
                let drain = action == Action::Drain;
                let saved = self.state.drained.clone();
                for &i in &indices {
                    if drain {
                        self.state.drained.insert(i);
                    } else {
                        self.state.drained.remove(&i);
                    }
                }
                if let Err(e) = self.persist() {
                    self.state.drained = saved;
                    self.reply(reply, Err(e));
                    return;
                }
                self.waiters.push(Waiter {
                    indices,
                    goal: if drain {
                        Goal::Unsteered
                    } else {
                        Goal::Steered
                    },
                    reply,
                });
            }
        }
    }

    /// Why a verb is refused in `state_error`, and what clears it.
    fn state_error_refusal(&self) -> String {
        format!(
            "{} is in state_error, refused: {}",
            self.name,
            self.state_error.as_deref().unwrap_or_default()
        )
    }

    /// `sluice reload` of a service in `state_error`: reads the state file again; once it reads,
    /// the service is supervised from it as at start-up (started, stopped, resumed). Answers
    /// what became of it (empty when it was not in `state_error`).
    fn recheck_state(&mut self) -> String {
        if self.state_error.is_none() {
            return String::new();
        }
        let loaded = self.env.load_state();
        if let Some(error) = loaded.error {
            self.state_error = Some(error.clone());
            return format!("{}: still in state_error: {error}", self.name);
        }
        tracing::info!(service = %self.name, "state file read again; supervising the service");
        self.state = loaded.state;
        self.state_error = None;
        // Exits seen meanwhile were recorded without the restart policy: those instances start
        // again like any that is down and wanted up.
        for instance in self.instances.values_mut() {
            if instance.phase == Phase::Exited {
                instance.phase = Phase::Stopped;
            }
        }
        self.reconcile();
        self.resume_restart();
        self.local_desired_changed();
        format!("{}: state file read, supervised again", self.name)
    }

    /// One owner: a shim is spawned only for an instance that has none. A second one would be a
    /// second process for the same index (the shim's lock refuses it, but the core must never ask).
    pub(super) fn assert_one_owner(&self, index: u32) {
        let phase = self.instances.get(&index).map(|i| i.phase);
        assert!(
            !phase.is_some_and(Phase::has_process),
            "{}/{index}: spawning a second shim while it is {phase:?}",
            self.name
        );
    }

    /// Spawns a shim for the instance, or records a failed start when its spec cannot be built.
    pub(super) fn start(&mut self, index: u32, version: Version) {
        self.assert_one_owner(index);
        let spec = self.spec(index, version);
        let instance = self.instances.get_mut(&index).expect("known index");
        instance.generation += 1;
        instance.after_stop = AfterStop::Nothing;
        instance.healthy = false;
        instance.drained_closed = false;
        instance.stop_began_ms = None;
        let generation = instance.generation;
        let spec = match spec {
            Ok(spec) => spec,
            Err(message) => {
                tracing::error!(service = %self.name, index, "{message}");
                instance.last_error = Some(message.clone());
                instance.phase = Phase::Stopped;
                self.on_start_failed(index, message);
                return;
            }
        };
        instance.phase = Phase::Spawning;
        // Only an instance that has a serving sibling to yield to starts in a low-weight cgroup.
        let cgroup = self.cgroups_wanted() && self.sibling_serving(index);
        self.emit(Effect::Spawn {
            index,
            generation,
            spec: Box::new(spec),
            cgroup,
        });
    }

    /// A start did not happen (no spawn) or did not last: the restart policy decides, unless the
    /// instance belongs to a restart batch, whose machine decides.
    fn on_start_failed(&mut self, index: u32, message: String) {
        if self.in_batch(index) {
            self.batch_member_down(index, message);
        } else {
            self.after_unrequested_exit(index, None, 0);
        }
    }

    /// Asks the instance's shim to stop it. With `drain`, a steered instance first leaves steering
    /// and its connections end (or `drain_timeout_ms` passes): an instance is never stopped with
    /// traffic steered to it. Steered means in the chain installed, or in the chain being
    /// written.
    pub(super) fn stop(&mut self, index: u32, after: AfterStop, drain: bool) {
        let steered = self.steering.may_steer_to(index);
        let instance = self.instances.get_mut(&index).expect("known index");
        instance.after_stop = after;
        if matches!(instance.phase, Phase::Stopping | Phase::Draining) {
            return;
        }
        if drain && steered && self.config.steers() {
            tracing::info!(service = %self.name, index, "draining before stop");
            instance.phase = Phase::Draining;
            let generation = instance.generation;
            self.emit(Effect::SetTimer {
                after_ms: self.config.restart.steer_timeout_ms,
                timer: Timer::UnsteerOver { index, generation },
            });
            return;
        }
        self.stop_now(index);
    }

    /// Whether the strategy of the restart in progress stops the instance in the chain by
    /// definition (`rolling`, `all-at-once`: batches are not drained).
    pub(super) fn stops_in_chain(&self, index: u32) -> bool {
        self.state.restart.as_ref().is_some_and(|m| {
            matches!(m.strategy, Strategy::Rolling | Strategy::AllAtOnce)
                && m.in_flight().contains(&index)
        })
    }

    /// Never stop an instance that served with the chain steering to it (installed, or being
    /// written), unless the restart's strategy stops in the chain by definition. An instance
    /// that never passed its readiness check since its start was never put in the chain: a chain
    /// that still names its port is a stale one (a transaction that failed after its previous
    /// process went), and waiting for it would keep a failed start alive.
    pub(super) fn assert_may_stop(&self, index: u32) {
        if !self.config.steers() || self.stops_in_chain(index) {
            return;
        }
        let (phase, healthy, generation) =
            self.instances.get(&index).map_or((None, false, 0), |i| {
                (Some(i.phase), i.healthy, i.generation)
            });
        if self.stopped_steered.contains(&(index, generation)) {
            return;
        }
        let served = healthy || phase == Some(Phase::Draining);
        assert!(
            !served || !self.steering.may_steer_to(index),
            "{}/{index}: stopping an instance the chain steers to ({phase:?}, healthy {healthy}; \
             installed {:?}, being written {:?})",
            self.name,
            self.steering.installed,
            self.steering.inflight,
        );
    }

    pub(super) fn stop_now(&mut self, index: u32) {
        self.assert_may_stop(index);
        let (signal, grace_ms) = (self.config.stop_signal.0, self.config.stop_grace_ms);
        let instance = self.instances.get_mut(&index).expect("known index");
        let steered_anyway = self.stopped_steered.contains(&(index, instance.generation));
        instance.phase = Phase::Stopping;
        instance.healthy = false;
        instance.stop_began_ms = Some(self.boot_now);
        tracing::info!(service = %self.name, index, "stopping");
        // Before the signal, so the whole stop runs at the weight it should.
        self.lower_stopping(index);
        self.emit(Effect::Stop {
            index,
            signal,
            grace_ms,
            steered_anyway,
        });
    }

    /// A stop's drain has waited `restart.steer_timeout_ms` and the chain still steers to the
    /// instance (iptables failing). Under a stop of every instance (shutdown, the service
    /// removed) it is stopped anyway: the host or the service is going away. An operator's stop
    /// fails: the instance is left running and steered, its `stopped` mark undone, and the
    /// caller answered with the error. Other stops (liveness, readiness, a smaller instance
    /// count) have no caller waiting and go on waiting for the chain.
    fn on_unsteer_over(&mut self, index: u32, generation: u64) {
        let Some(instance) = self.instances.get(&index) else {
            return;
        };
        if instance.generation != generation
            || instance.phase != Phase::Draining
            || !self.steering.may_steer_to(index)
        {
            return;
        }
        let why = format!(
            "{}/{index} could not be taken out of steering within restart.steer_timeout_ms ({} ms): {}",
            self.name,
            self.config.restart.steer_timeout_ms,
            self.steering
                .error
                .as_deref()
                .unwrap_or("the chain is still being written")
        );
        if self.stopping_all.is_some() {
            tracing::error!(service = %self.name, index, "{why}; stopping it anyway, every instance is being stopped");
            self.stopped_steered.insert((index, generation));
            self.stop_now(index);
            return;
        }
        let operator_stop = instance.after_stop == AfterStop::Nothing
            && self.state.stopped.contains(&index)
            && !self.in_batch(index);
        if !operator_stop {
            tracing::warn!(service = %self.name, index, "{why}; still waiting for the chain");
            return;
        }
        tracing::error!(service = %self.name, index, "{why}; the stop failed, it keeps running");
        let instance = self.instances.get_mut(&index).expect("found above");
        instance.phase = Phase::Running;
        instance.last_error = Some(format!("stop failed: {why}"));
        self.state.stopped.remove(&index);
        self.persist_logged();
        let mut failed = Vec::new();
        self.waiters.retain(|w| {
            let hit = w.goal == Goal::Down && w.indices.contains(&index);
            if hit {
                failed.push(w.reply);
            }
            !hit
        });
        for to in failed {
            let message = format!("stop failed: {why}; it keeps running and steered");
            self.reply(to, Err(message));
        }
    }

    /// After a start outside a restart: probe until ready; only then does it get traffic.
    fn start_readiness(&mut self, index: u32, generation: u64) {
        let Some(probe) = self.probe(index) else {
            return;
        };
        self.emit(Effect::AwaitReady {
            index,
            generation,
            probe: Box::new(probe),
        });
    }

    /// The periodic liveness probe of a healthy instance, when configured.
    fn start_liveness(&mut self, index: u32, generation: u64) {
        let Some(probe) = self.probe(index) else {
            return;
        };
        if probe.config.liveness_interval_ms == 0 {
            return;
        }
        self.emit(Effect::WatchLiveness {
            index,
            generation,
            probe: Box::new(probe),
        });
    }

    fn on_instance(&mut self, index: u32, generation: u64, event: InstanceEvent) {
        let Some(instance) = self.instances.get_mut(&index) else {
            return;
        };
        if instance.generation != generation {
            return;
        }
        match event {
            InstanceEvent::Spawned { result, cgroup } => self.on_spawned(index, result, cgroup),
            InstanceEvent::Exited(status) => self.on_exit(index, status),
            InstanceEvent::StartupElapsed => {
                if instance.phase == Phase::Starting {
                    instance.phase = Phase::Running;
                    instance.failed_starts = 0;
                    let in_batch = self.in_batch(index);
                    let instance = self.instances.get_mut(&index).expect("known index");
                    if self.config.health.is_none() && !in_batch {
                        instance.healthy = true;
                    }
                    if self.config.health.is_none() {
                        self.start_liveness(index, generation);
                    }
                    self.batch_member_running(index);
                }
            }
            InstanceEvent::BackoffElapsed => {
                if instance.phase == Phase::Backoff && self.desired_up(index) {
                    self.start(index, Version::New);
                }
            }
            InstanceEvent::Ready(result) => {
                if !instance.phase.is_up() {
                    return;
                }
                match result {
                    Ok(()) => {
                        instance.healthy = true;
                        self.start_liveness(index, generation);
                    }
                    Err(reason) if self.state_error.is_some() => {
                        tracing::error!(service = %self.name, index, "{reason}; left running (state_error)");
                        instance.last_error = Some(reason);
                    }
                    Err(reason) => {
                        tracing::error!(service = %self.name, index, "{reason}");
                        instance.last_restart_reason = Some(reason.clone());
                        instance.last_error = Some(reason);
                        // Drained like any stop: a late answer may find it in the chain already
                        // (a restart's check passed it meanwhile).
                        self.stop(index, AfterStop::FailedStart, true);
                    }
                }
            }
            InstanceEvent::LivenessFailed(reason) if self.state_error.is_some() => {
                tracing::error!(service = %self.name, index, "{reason}; left running (state_error)");
                instance.last_error = Some(reason);
                instance.healthy = false;
            }
            InstanceEvent::LivenessFailed(reason) => {
                self.canary.note_liveness_failure();
                let phase = instance.phase;
                if phase.is_up() && !self.in_batch(index) {
                    let instance = self.instances.get_mut(&index).expect("known index");
                    tracing::error!(service = %self.name, index, "{reason}; restarting");
                    instance.last_restart_reason = Some(reason.clone());
                    instance.last_error = Some(reason);
                    instance.healthy = false;
                    self.stop(index, AfterStop::Start(Version::New), true);
                }
            }
            InstanceEvent::Lowered(Ok(())) => instance.cgroup_error = None,
            InstanceEvent::Lowered(Err(e)) => {
                // It stops at the normal weight; whatever was moved goes back, and status says
                // why.
                tracing::warn!(service = %self.name, index, "{e}; stopping at the normal cpu weight");
                instance.cgroup_error = Some(e);
                self.remove_cgroup(index);
            }
            InstanceEvent::WeightSet(result) => match result {
                Ok(()) => {
                    tracing::info!(service = %self.name, index, "cpu weight set to low");
                    instance.cgroup_error = None;
                }
                Err(e) => {
                    // Not retried until the next change: a cgroup that refuses a weight now will
                    // refuse it on a timer too, and status shows why.
                    tracing::warn!(service = %self.name, index, "{e}");
                    instance.cgroup_error = Some(e);
                }
            },
        }
    }

    fn on_spawned(
        &mut self,
        index: u32,
        result: Result<(ShimInfo, bool), String>,
        cgroup: Option<Result<PathBuf, String>>,
    ) {
        let instance = self
            .instances
            .get_mut(&index)
            .expect("checked by the caller");
        let generation = instance.generation;
        instance.weight_low = false;
        // A timer of the previous process carries its generation and is dropped.
        instance.low_timer = false;
        let isolated = matches!(cgroup, Some(Ok(_)));
        match cgroup {
            Some(Ok(dir)) => {
                instance.cgroup = Some(dir);
                instance.weight_low = true;
                instance.cgroup_error = None;
            }
            Some(Err(e)) => {
                tracing::warn!(service = %self.name, index, "{e}; the instance runs without cpu isolation");
                instance.cgroup_error = Some(e);
            }
            None => instance.cgroup_error = None,
        }
        // Started without a cgroup (isolation turned off meanwhile, or making it failed): the
        // directory of its previous process is empty now and goes.
        if !isolated {
            self.remove_cgroup(index);
        }
        let instance = self
            .instances
            .get_mut(&index)
            .expect("checked by the caller");
        match result {
            Ok((info, adopted)) => {
                tracing::info!(service = %self.name, index, pid = info.pid, adopted, "started");
                instance.shim = Some(info);
                instance.phase = Phase::Starting;
                instance.last_error = None;
                self.emit(Effect::Watch { index, generation });
                self.emit(Effect::SetTimer {
                    after_ms: self.config.startup_ms,
                    timer: Timer::Startup { index, generation },
                });
                if self.in_batch(index) {
                    self.batch_member_started(index);
                } else {
                    self.start_readiness(index, generation);
                }
                if !self.desired_up(index) {
                    self.stop(index, AfterStop::Nothing, true);
                }
            }
            Err(e) => {
                tracing::error!(service = %self.name, index, "{e}");
                instance.last_error = Some(e.clone());
                instance.phase = Phase::Stopped;
                self.on_start_failed(index, e);
            }
        }
    }

    /// The instance's process ended, asked to or not.
    fn on_exit(&mut self, index: u32, status: Result<Status, String>) {
        let desired_up = self.desired_up(index);
        let in_batch = self.in_batch(index);
        let boot_now = self.boot_now;
        let instance = self.instances.get_mut(&index).expect("known index");
        // How long it ran decides between a crash and a failed start: measured on the boot
        // clock, so a wall-clock step never turns a long run into a failed start (towards
        // `fatal`) nor a failed start into a long run (skipping the backoff).
        let (outcome, ran_ms) = match &status {
            Ok(Status::Exited {
                outcome,
                started_boot_ms: Some(started_boot),
                exited_boot_ms: Some(exited_boot),
                ..
            }) => (Some(*outcome), exited_boot.saturating_sub(*started_boot)),
            // A shim older than the boot-clock keys: its wall-clock times are all there is.
            Ok(Status::Exited {
                outcome,
                started_ms,
                exited_ms,
                ..
            }) => (Some(*outcome), exited_ms.saturating_sub(*started_ms)),
            // `wait` answers only once the instance exited; a shim that says otherwise lost it.
            Ok(Status::Running { .. }) => (None, 0),
            Err(e) => {
                instance.last_error = Some(e.clone());
                let started = instance
                    .shim
                    .as_ref()
                    .map_or(boot_now, |s| s.started_boot_ms);
                (None, boot_now.saturating_sub(started))
            }
        };
        let exit = describe(outcome);
        instance.last_exit = Some(exit.clone());
        let pid = instance.shim.as_ref().map_or(0, |s| s.pid);
        instance.shim = None;
        instance.healthy = false;
        instance.generation += 1;
        let was = instance.phase;
        let after = instance.after_stop;
        instance.after_stop = AfterStop::Nothing;
        instance.phase = Phase::Stopped;
        // The exit status is ours now: let the shim go.
        self.emit(Effect::Release { index });
        tracing::info!(service = %self.name, index, pid, exit = %exit, ran_ms, "instance exited");
        if self.state_error.is_some() {
            // Recorded and released; not restarted: whether it should run is unknown.
            let instance = self.instances.get_mut(&index).expect("known index");
            if was != Phase::Stopping {
                instance.phase = Phase::Exited;
            }
            return;
        }
        if was == Phase::Stopping {
            match after {
                // The index came back into the configuration while it stopped: it stays, and
                // starts again.
                AfterStop::Remove if index < self.config.instances && desired_up => {
                    self.start(index, Version::New);
                }
                AfterStop::Remove if index < self.config.instances => {}
                AfterStop::Remove => {
                    self.remove_cgroup(index);
                    self.instances.remove(&index);
                }
                AfterStop::Start(version) if desired_up => self.start(index, version),
                AfterStop::FailedStart => self.after_unrequested_exit(index, outcome, 0),
                _ => {}
            }
            if in_batch {
                self.batch_member_exited(index);
            }
            return;
        }
        if in_batch {
            self.batch_member_down(index, format!("exited: {exit}"));
            return;
        }
        if !desired_up {
            return;
        }
        self.instances
            .get_mut(&index)
            .expect("known index")
            .restarts += 1;
        self.canary.note_crash();
        self.after_unrequested_exit(index, outcome, ran_ms);
    }

    /// Applies the restart policy to every exit nobody asked for (a crash, a start that did not
    /// happen or did not last, a failed readiness check).
    pub(super) fn after_unrequested_exit(
        &mut self,
        index: u32,
        outcome: Option<Outcome>,
        ran_ms: u64,
    ) {
        let instance = self.instances.get_mut(&index).expect("known index");
        let (decision, failed_starts) =
            policy::on_exit(&self.config, outcome, ran_ms, instance.failed_starts);
        instance.failed_starts = failed_starts;
        match decision {
            Decision::Restart { delay_ms: 0 } => self.start(index, Version::New),
            Decision::Restart { delay_ms } => {
                instance.phase = Phase::Backoff;
                instance.generation += 1;
                let generation = instance.generation;
                tracing::warn!(service = %self.name, index, delay_ms, failed_starts, "backing off");
                self.emit(Effect::SetTimer {
                    after_ms: delay_ms,
                    timer: Timer::Backoff { index, generation },
                });
            }
            Decision::Exited => instance.phase = Phase::Exited,
            Decision::Fatal => {
                tracing::error!(service = %self.name, index, failed_starts, "fatal: too many failed starts");
                instance.phase = Phase::Fatal;
            }
        }
    }

    /// After every request and event: steering, waiting callers, start-up ordering, deploys, the
    /// host's status in ZooKeeper.
    fn after_change(&mut self) {
        self.run_written();
        self.sync_steering();
        self.sync_cgroups();
        self.maybe_deploy();
        self.canary_reconsider();
        self.publish_status();
        let instances = &self.instances;
        let name = &self.name;
        let steering = &self.steering;
        let steers = self.config.steers();
        let mut answers = Vec::new();
        self.waiters.retain(|w| {
            let mut failure = None;
            let mut done = true;
            for i in &w.indices {
                let Some(instance) = instances.get(i) else {
                    continue;
                };
                let phase = instance.phase;
                match w.goal {
                    Goal::Up => match phase {
                        Phase::Running if instance.healthy || !steers => {}
                        Phase::Fatal | Phase::Exited | Phase::Stopped => {
                            failure = Some(format!(
                                "{name}/{i} is {}{}",
                                phase.state().as_str(),
                                instance
                                    .last_error
                                    .as_ref()
                                    .or(instance.last_exit.as_ref())
                                    .map(|e| format!(": {e}"))
                                    .unwrap_or_default()
                            ));
                        }
                        _ => done = false,
                    },
                    Goal::Down => done &= !phase.has_process(),
                    Goal::Unsteered => done &= !steering.installed_contains(*i),
                    Goal::Steered => {
                        if !phase.is_up() {
                            failure = Some(format!("{name}/{i} is {}", phase.state().as_str()));
                        }
                        done &= steering.installed_contains(*i);
                    }
                }
            }
            if let Some(message) = failure {
                answers.push((w.reply, Err(message)));
                false
            } else if done {
                let what = match w.goal {
                    Goal::Up => "running",
                    Goal::Down => "stopped",
                    Goal::Unsteered => "out of steering",
                    Goal::Steered => "in steering",
                };
                answers.push((
                    w.reply,
                    Ok(format!("{} instance(s) of {name} {what}", w.indices.len())),
                ));
                false
            } else {
                true
            }
        });
        for (to, result) in answers {
            self.reply(to, result);
        }
        let settled = self
            .instances
            .values()
            .all(|i| !matches!(i.phase, Phase::Spawning | Phase::Starting));
        if settled {
            for to in std::mem::take(&mut self.settled) {
                self.reply(to, Ok(String::new()));
            }
        }
    }

    /// The restart in flight as status shows it (also in the host's status node).
    pub(super) fn restart_status(&self) -> Option<RestartStatus> {
        self.state.restart.as_ref().map(|m| RestartStatus {
            strategy: m.strategy,
            step: m.step,
            batch: m.batch.clone(),
            rolling_back: m.version == Version::Old,
            batches_left: m.pending.len(),
            done: m.done.clone(),
        })
    }

    /// The status document of the service at `now`: uptimes from the boot clock.
    pub fn status_at(&self, now: Now) -> ServiceStatus {
        let steers = self.config.steers();
        let instances = self
            .instances
            .values()
            .map(|i| InstanceStatus {
                service: self.name.clone(),
                index: i.index,
                state: i.phase.state(),
                desired: if self.desired_up(i.index) {
                    Desired::Up
                } else {
                    Desired::Down
                },
                pid: i.shim.as_ref().map(|s| s.pid),
                shim_pid: i.shim.as_ref().map(|s| s.shim_pid),
                port: self.config.port(i.index),
                enabled: steers.then(|| self.steering.installed_contains(i.index)),
                healthy: i.healthy,
                started_ms: i.shim.as_ref().map(|s| s.started_ms),
                uptime_ms: i
                    .shim
                    .as_ref()
                    .map(|s| now.boot_ms.saturating_sub(s.started_boot_ms)),
                restarts: i.restarts,
                failed_starts: i.failed_starts,
                last_exit: i.last_exit.clone(),
                last_error: i.last_error.clone(),
                last_restart_reason: i.last_restart_reason.clone(),
                warmup: i.warmup.clone(),
                last_drain: i.last_drain,
                outdated: self.is_outdated(i),
                cgroup: i.cgroup.as_ref().map(|d| d.display().to_string()),
                cpu_weight: (i.cgroup.is_some() && i.weight_low).then_some(CpuWeight::Low),
            })
            .collect();
        ServiceStatus {
            service: self.name.clone(),
            front_port: self.config.front_port,
            strategy: self.config.strategy(),
            instances,
            restart: self.restart_status(),
            last_restart_error: self.state.failed.as_ref().map(|f| f.reason.clone()),
            steering_error: self.steering.error.clone(),
            build: self.state.build.clone(),
            target_build: self.state.target_build.clone(),
            deploy: self.deploy.deploy.clone(),
            deploy_error: self.deploy.last_error.clone(),
            config_error: self.deploy.config_error.clone(),
            slot_error: self.deploy.slot_error.clone(),
            world_writable_nodes: self.deploy.world_writable.clone(),
            cgroups_error: self.cgroups_error(),
            state_error: self.state_error.clone(),
            // The executor's to fill in: tracking cgroups are made where shims are spawned.
            tree_error: None,
            state_write_error: self.state_write_error.clone(),
            canary: self.canary.status.clone(),
        }
    }

    /// The chain the desired set stands for.
    pub(super) fn chain(&self, desired: &BTreeSet<u32>) -> Chain {
        Chain {
            service: self.name.clone(),
            front_port: self
                .config
                .front_port
                .expect("steered services have a front port"),
            targets: targets(&self.config, desired),
        }
    }
}
