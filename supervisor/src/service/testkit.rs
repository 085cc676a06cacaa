//! A world for the service core in tests: a host made of plain values ([`FakeEnv`]) and a model of
//! the shims, iptables, probes, drains and ZooKeeper that answers the core's effects in virtual
//! time, faults optional. It checks the invariants as each effect goes out, independently of the
//! core's own assertions: no stop (and no drain wait) of an instance the chain steers to, one
//! process per instance, the restart machine written before its actions, and no batch begun on
//! the fleet backend without a slot.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_shim::proto::{Outcome, Status};
use sluice_strategies::restart::{Input, Strategy};

use super::Action;
use super::core::{
    Core, DeployEvent, Effect, Event, InstanceEvent, Millis, ReplyId, Request, RestartEvent, Setup,
    ShimInfo,
};
use super::env::Env;
use crate::config::{HostConfig, ServiceConfig, StrategyName};
use crate::service::spec::InstanceSpec;
use crate::service::state::ServiceState;

/// What the fake host records and how it misbehaves.
#[derive(Debug, Default)]
pub struct FakeHost {
    /// The last state the core asked to write (written or not).
    pub last_store: Option<ServiceState>,
    /// The last state written: what a restarted daemon finds.
    pub written: Option<ServiceState>,
    pub stores: usize,
    /// Writes fail (a full disk).
    pub fail_store: bool,
    /// The fleet slot the executor would hold is still valid.
    pub slot_valid: bool,
    pub installed_builds: BTreeSet<String>,
}

pub struct FakeEnv(pub Arc<Mutex<FakeHost>>);

impl Env for FakeEnv {
    fn store(&mut self, state: &ServiceState) -> Result<(), String> {
        let mut host = self.0.lock().unwrap();
        host.stores += 1;
        host.last_store = Some(state.clone());
        if host.fail_store {
            return Err("writing /var/lib/sluice/state/web.json: no space left on device".into());
        }
        host.written = Some(state.clone());
        Ok(())
    }

    fn load_state(&mut self) -> crate::service::state::Loaded {
        let host = self.0.lock().unwrap();
        let state = host.written.clone().unwrap_or_default();
        crate::service::state::Loaded {
            error: state.state_error.clone(),
            state,
        }
    }

    fn spec(
        &self,
        config: &ServiceConfig,
        index: u32,
        release: Option<&std::path::Path>,
    ) -> Result<InstanceSpec, String> {
        Ok(InstanceSpec {
            service: "web".into(),
            index,
            argv: config.command.clone(),
            env: config.env.clone(),
            directory: release.map_or_else(|| PathBuf::from("/"), PathBuf::from),
            uid: None,
            gid: None,
            groups: None,
            umask: None,
            nofile: None,
            stdout_log: PathBuf::from("/nonexistent/web.out"),
            stderr_log: PathBuf::from("/nonexistent/web.err"),
            log_max_bytes: 0,
            log_backups: 0,
        })
    }

    fn current_release(&self) -> Option<PathBuf> {
        None
    }

    fn installed_release(&self, build: &str) -> Option<PathBuf> {
        let host = self.0.lock().unwrap();
        host.installed_builds
            .contains(build)
            .then(|| PathBuf::from(format!("/nonexistent/releases/{build}")))
    }

    fn identity(&self, _config: &ServiceConfig) -> Result<crate::service::spec::Identity, String> {
        Ok(None)
    }

    fn existing_cgroup(&self, _index: u32) -> Option<PathBuf> {
        None
    }

    fn slot_valid(&self) -> bool {
        self.0.lock().unwrap().slot_valid
    }
}

/// A service of `instances` instances on ports 9000.., steered from 8000 when `steered`.
pub fn config(instances: u32, steered: bool, strategy: StrategyName) -> ServiceConfig {
    let mut config = ServiceConfig::with_command(vec!["/usr/bin/web".into()]);
    config.instances = instances;
    config.port_base = Some(9000);
    config.front_port = steered.then_some(8000);
    config.restart.strategy = Some(strategy);
    config.startup_ms = 1_000;
    config.start_retries = 3;
    config.backoff_initial_ms = 500;
    config.backoff_max_ms = 4_000;
    config
}

/// How often things go wrong, each a probability per occasion.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub spawn_fails: f64,
    pub probe_fails: f64,
    pub liveness_fails: f64,
    pub iptables_fails: f64,
    pub slot_refused: f64,
}

/// The core and the world around it.
pub struct World {
    pub core: Core,
    pub host: Arc<Mutex<FakeHost>>,
    pub now: Millis,
    seq: u64,
    /// Outcomes to deliver, by (time, order).
    queue: BTreeMap<(Millis, u64), Event>,
    /// Every effect the core emitted, with its time.
    pub journal: Vec<(Millis, Effect)>,
    pub replies: BTreeMap<ReplyId, Result<String, String>>,
    next_reply: u64,
    /// Open `wait`s: index → generation.
    watches: BTreeMap<u32, u64>,
    /// Instances with a process (spawn asked, exit not yet delivered): index → generation.
    pub alive: BTreeMap<u32, u64>,
    /// Instances whose current process was in a chain iptables took (it served).
    pub served: BTreeSet<u32>,
    /// Members of failed restart batches, which may stay without a process.
    pub left_down: BTreeSet<u32>,
    /// The tag of each instance's last spawned process.
    pub tags: BTreeMap<u32, String>,
    /// What iptables holds, and the transactions in flight.
    pub chain: BTreeSet<u32>,
    /// With the process generations alive when each was asked for.
    chain_pending: Vec<(BTreeSet<u32>, BTreeMap<u32, u64>)>,
    /// What the core was last told of ZooKeeper.
    pub connected: bool,
    /// Batches (done so far, members) whose first drain or stop went out.
    pub begun: BTreeSet<(usize, Vec<u32>)>,
    pub faults: Faults,
    pub rng: SmallRng,
    pub violations: Vec<String>,
    /// Print every event and effect (replaying one seed).
    pub trace: bool,
    /// The shims the daemon finds when it boots.
    found: Vec<(u32, Status)>,
    /// How every drain ends (`idle` unless a test says otherwise).
    pub drain_ending: sluice_strategies::drain::Ending,
    /// How long a process takes to exit once asked to stop (`None`: a random short delay).
    pub stop_ms: Option<u64>,
    /// How the next warm-ups end, in order, each answered with the summary the runner would give
    /// for the sibling bar it was sent (a measured sample's window has a p90 of 1 ms); empty: a
    /// bare `Warmed`, or `WarmFailed` as the faults say.
    pub warm_endings: VecDeque<Option<sluice_strategies::warmup::Ending>>,
    /// Spawns asked for whose outcome the core has not had yet.
    spawning: BTreeSet<u32>,
}

impl World {
    pub fn new(config: ServiceConfig, fleet: bool, seed: u64) -> Self {
        Self::with_state(
            config,
            fleet,
            seed,
            ServiceState::default(),
            Vec::new(),
            BTreeSet::new(),
            1_000_000,
        )
        .boot()
    }

    /// A daemon that starts at `now` with `state` on disk, the shims `found` and `chain` in
    /// iptables.
    pub fn with_state(
        config: ServiceConfig,
        fleet: bool,
        seed: u64,
        state: ServiceState,
        found: Vec<(u32, Status)>,
        chain: BTreeSet<u32>,
        now: Millis,
    ) -> Self {
        let host = Arc::new(Mutex::new(FakeHost {
            last_store: Some(state.clone()),
            written: Some(state.clone()),
            ..FakeHost::default()
        }));
        let steers = config.steers();
        let core = Core::new(
            Setup {
                name: "web".into(),
                host: HostConfig::default(),
                host_name: "host-a".into(),
                config,
                state_error: state.state_error.clone(),
                state,
                fleet,
                cgroups: crate::service::cgroup::Detected::Off,
                steerable: true,
                installed: Ok(steers.then(|| chain.clone())),
            },
            Box::new(FakeEnv(host.clone())),
        );
        let mut world = Self {
            core,
            host,
            now,
            seq: 0,
            queue: BTreeMap::new(),
            journal: Vec::new(),
            replies: BTreeMap::new(),
            next_reply: 0,
            watches: BTreeMap::new(),
            alive: BTreeMap::new(),
            tags: BTreeMap::new(),
            left_down: BTreeSet::new(),
            served: chain.clone(),
            chain,
            chain_pending: Vec::new(),
            connected: !fleet,
            begun: BTreeSet::new(),
            faults: Faults::default(),
            rng: SmallRng::seed_from_u64(seed),
            violations: Vec::new(),
            trace: false,
            found: Vec::new(),
            drain_ending: sluice_strategies::drain::Ending::Idle,
            warm_endings: VecDeque::new(),
            stop_ms: None,
            spawning: BTreeSet::new(),
        };
        world.found = found;
        world
    }

    /// The daemon starts: adopts the shims found, resumes what was written.
    pub fn boot(self) -> Self {
        self.boot_as(false)
    }

    /// The daemon starts to finish a persisted host shutdown: adopts, starts nothing.
    pub fn boot_for_shutdown(self) -> Self {
        self.boot_as(true)
    }

    fn boot_as(mut self, for_shutdown: bool) -> Self {
        let found = std::mem::take(&mut self.found);
        for (index, status) in &found {
            if let Status::Running { tag, .. } = status {
                self.alive.insert(*index, 1);
                self.tags.insert(*index, tag.clone());
            }
        }
        if self.trace {
            println!("{} <- boot with {found:?}", self.now);
        }
        let effects = if for_shutdown {
            self.core
                .startup_for_shutdown(found, crate::service::core::Now::same(self.now))
        } else {
            self.core.startup(found, self.now)
        };
        if self.trace {
            for effect in &effects {
                println!("{}    -> {effect:?}", self.now);
            }
        }
        self.apply(effects);
        self
    }

    /// Hands one event to the core and runs what it wants done.
    pub fn handle(&mut self, event: Event) {
        if let Event::Instance {
            index,
            event: InstanceEvent::Spawned { .. },
            ..
        } = &event
        {
            self.spawning.remove(index);
        }
        if let Event::Instance {
            index,
            generation,
            event: InstanceEvent::Exited(_),
        } = &event
            && self.alive.get(index) == Some(generation)
        {
            self.alive.remove(index);
        }
        if let Event::Request(Request::Connection(connected)) = &event {
            self.connected = *connected;
        }
        // iptables-restore is one transaction: the chain is the new one, or the old one.
        if let Event::Steered(result) = &event
            && !self.chain_pending.is_empty()
        {
            let (written, asked_alive) = self.chain_pending.remove(0);
            if result.is_ok() {
                // Served: the process the chain was written for still runs.
                let alive = &self.alive;
                self.served.extend(
                    written
                        .iter()
                        .filter(|i| alive.get(i).is_some_and(|g| asked_alive.get(i) == Some(g))),
                );
                self.chain = written;
            }
        }
        if self.trace {
            println!("{} <- {event:?}", self.now);
        }
        let held = self.host.lock().unwrap().slot_valid && self.connected;
        let writes_fail = self.host.lock().unwrap().fail_store;
        // A machine that finished (its end waiting for a write) keeps its failed batch there.
        let batch = self.core.state.restart.as_ref().map(|m| {
            if m.finished {
                m.failed_batch.clone()
            } else {
                m.batch.clone()
            }
        });
        let failed = self.core.state.failed.as_ref().map(|f| f.reason.clone());
        let effects = self.core.handle(event, self.now);
        // A failed restart leaves its batch as it is (reported in `last_restart_error`): a member
        // it left without a process is not started again until an operator asks.
        if let Some(batch) = batch
            && self.core.state.restart.is_none()
            && self.core.state.failed.as_ref().map(|f| &f.reason) != failed.as_ref()
            && self.core.state.failed.is_some()
        {
            self.left_down.extend(batch);
        }
        if self.trace {
            for effect in &effects {
                println!("{}    -> {effect:?}", self.now);
            }
        }
        if writes_fail {
            self.check_nothing_unwritten_runs(&effects);
        }
        self.apply(effects);
        self.check_persisted();
        self.check_slot(held);
    }

    /// Sends a request; its answer lands in `replies`.
    pub fn request(&mut self, make: impl FnOnce(ReplyId) -> Request) -> ReplyId {
        self.next_reply += 1;
        let id = ReplyId(self.next_reply);
        self.handle(Event::Request(make(id)));
        id
    }

    pub fn control(&mut self, action: Action, index: Option<u32>) -> ReplyId {
        self.request(|reply| Request::Control {
            action,
            index,
            reply,
        })
    }

    /// Delivers the next outcome; false when none is left.
    pub fn step(&mut self) -> bool {
        let Some((&(at, seq), _)) = self.queue.iter().next() else {
            return false;
        };
        let event = self.queue.remove(&(at, seq)).expect("just seen");
        self.now = self.now.max(at);
        self.handle(event);
        true
    }

    /// Delivers outcomes until none is left (or `max` were delivered; liveness probes and timers
    /// end, so this settles).
    pub fn settle(&mut self, max: usize) {
        for _ in 0..max {
            if !self.step() {
                return;
            }
        }
    }

    fn later(&mut self, delay_ms: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + delay_ms, self.seq), event);
    }

    fn delay(&mut self) -> u64 {
        self.rng.random_range(1..200)
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p.min(1.0))
    }

    fn violation(&mut self, what: String) {
        self.violations.push(format!("at {} ms: {what}", self.now));
    }

    fn may_steer_to(&self, index: u32) -> bool {
        self.chain.contains(&index) || self.chain_pending.iter().any(|(s, _)| s.contains(&index))
    }

    /// The strategy of the restart in progress stops this batch member in the chain by
    /// definition.
    fn stops_in_chain(&self, index: u32) -> bool {
        self.core.state.restart.as_ref().is_some_and(|m| {
            matches!(m.strategy, Strategy::Rolling | Strategy::AllAtOnce)
                && m.batch.contains(&index)
        })
    }

    /// Slot before batch: a batch passes its gate (and may drain or stop anything) only while
    /// the slot holds and ZooKeeper is reachable (`held` is what held before the event).
    fn check_slot(&mut self, held: bool) {
        // A batch held for a slot, or whose first step is not written yet, has not begun.
        if !self.core.fleet || self.core.batch_held() || self.core.batch_unwritten() {
            return;
        }
        let Some(m) = self.core.state.restart.as_ref() else {
            return;
        };
        if m.finished || m.batch.is_empty() {
            return;
        }
        let key = (m.done.len(), m.batch.clone());
        if self.begun.insert(key.clone()) && !held {
            self.violation(format!("batch {:?} began without a fleet slot", key.1));
        }
    }

    /// Persist before act: while a restart runs, the machine last written (successfully) is the
    /// one whose step is being carried out, or the core holds that step's actions until it is.
    fn check_persisted(&mut self) {
        let Some(m) = self.core.state.restart.as_ref() else {
            return;
        };
        let written = self
            .host
            .lock()
            .unwrap()
            .written
            .as_ref()
            .and_then(|s| s.restart.as_ref())
            .map(|w| (w.epoch, w.step, w.batch.clone(), w.version));
        if written != Some((m.epoch, m.step, m.batch.clone(), m.version))
            && !self.core.holds_unwritten()
        {
            self.violation(format!(
                "restart step {:?} of batch {:?} (epoch {}) runs unwritten (written: {written:?})",
                m.step, m.batch, m.epoch
            ));
        }
    }

    /// Persist before act, from the effects: during an event in which every write fails, no
    /// effect of a restart step carries an epoch other than the one last written (the step
    /// being carried out is the written one; a newer step waits).
    fn check_nothing_unwritten_runs(&mut self, effects: &[Effect]) {
        let written = self
            .host
            .lock()
            .unwrap()
            .written
            .as_ref()
            .and_then(|s| s.restart.as_ref())
            .map(|w| w.epoch);
        for effect in effects {
            let epoch = match effect {
                Effect::Check { epoch, .. }
                | Effect::WarmUp { epoch, .. }
                | Effect::RestartSignal { epoch, .. } => *epoch,
                _ => continue,
            };
            if written != Some(epoch) {
                self.violation(format!(
                    "{effect:?} of epoch {epoch} went out while no write succeeded (written: {written:?})"
                ));
            }
        }
    }

    /// A crash of instance `index`, if it runs and is watched.
    pub fn crash(&mut self, index: u32) {
        if let Some(generation) = self.watches.remove(&index) {
            let status = self.exited(Outcome::Code(1));
            self.later(1, exited(index, generation, status));
        }
    }

    fn exited(&self, outcome: Outcome) -> Status {
        Status::Exited {
            shim_pid: 1,
            pid: 2,
            started_ms: self.now.saturating_sub(5_000),
            started_boot_ms: Some(self.now.saturating_sub(5_000)),
            exited_ms: self.now,
            exited_boot_ms: Some(self.now),
            outcome,
            tag: String::new(),
        }
    }

    pub fn apply(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            self.answer(&effect);
            self.journal.push((self.now, effect));
        }
    }

    fn answer(&mut self, effect: &Effect) {
        let steers = self.core.config.steers();
        match effect {
            Effect::Spawn {
                index,
                generation,
                spec,
                ..
            } => {
                if let Some(other) = self.alive.get(index) {
                    self.violation(format!(
                        "second process for {index} (generation {generation}, live {other})"
                    ));
                }
                self.alive.insert(*index, *generation);
                self.spawning.insert(*index);
                self.served.remove(index);
                self.left_down.remove(index);
                self.tags.insert(*index, spec.tag());
                let result = if self.chance(self.faults.spawn_fails) {
                    self.alive.remove(index);
                    Err(format!("spawning web@{index}: handshake timed out"))
                } else {
                    Ok((
                        ShimInfo {
                            shim_pid: 100 + index,
                            pid: 200 + index,
                            started_ms: self.now,
                            started_boot_ms: self.now,
                            tag: spec.tag(),
                        },
                        false,
                    ))
                };
                let delay = self.delay();
                self.later(
                    delay,
                    Event::Instance {
                        index: *index,
                        generation: *generation,
                        event: InstanceEvent::Spawned {
                            result,
                            cgroup: None,
                        },
                    },
                );
            }
            Effect::Watch { index, generation } => {
                self.watches.insert(*index, *generation);
            }
            Effect::Stop {
                index,
                steered_anyway,
                ..
            } => {
                if steers
                    && !steered_anyway
                    && self.served.contains(index)
                    && self.may_steer_to(*index)
                    && !self.stops_in_chain(*index)
                {
                    self.violation(format!("stop of {index} while the chain steers to it"));
                }
                if let Some(generation) = self.watches.remove(index) {
                    let status = self.exited(Outcome::Signal(libc::SIGTERM));
                    let delay = self.stop_ms.unwrap_or_else(|| self.delay());
                    self.later(delay, exited(*index, generation, status));
                }
            }
            // The spawn in progress makes the cgroup and its child joins it: a removal now would
            // race the join (the child's `cgroup.procs` gone under it).
            Effect::RemoveCgroup { index, .. } if self.spawning.contains(index) => {
                self.violation(format!(
                    "removal of {index}'s cgroup while its spawn prepares it"
                ));
            }
            Effect::Release { .. }
            | Effect::RemoveCgroup { .. }
            | Effect::PublishHostStatus(_)
            | Effect::SetLowWeight { .. }
            | Effect::LowerRunning { .. } => {}
            // Canary tests answer these themselves (`canary_tests.rs`).
            Effect::CanarySample { .. }
            | Effect::CanaryWrite { .. }
            | Effect::CanaryRecord { .. } => {}
            Effect::Signal { reply, .. } => {
                self.replies.insert(*reply, Ok("signalled".into()));
            }
            Effect::RestartSignal { index, epoch, .. } => {
                let delay = self.delay();
                self.later(
                    delay,
                    Event::Restart {
                        epoch: *epoch,
                        event: RestartEvent::Input(Input::Signalled(*index)),
                    },
                );
            }
            Effect::SetTimer { after_ms, timer } => {
                self.later(*after_ms, Event::Timer(*timer));
            }
            Effect::AwaitReady {
                index, generation, ..
            } => {
                let result = if self.chance(self.faults.probe_fails) {
                    Err(format!("web/{index}: not ready: connection refused"))
                } else {
                    Ok(())
                };
                let delay = self.delay();
                self.later(
                    delay,
                    Event::Instance {
                        index: *index,
                        generation: *generation,
                        event: InstanceEvent::Ready(result),
                    },
                );
            }
            Effect::WatchLiveness {
                index, generation, ..
            } => {
                if self.chance(self.faults.liveness_fails) {
                    let delay = self.delay() * 10;
                    self.later(
                        delay,
                        Event::Instance {
                            index: *index,
                            generation: *generation,
                            event: InstanceEvent::LivenessFailed(
                                "3 liveness probes failed in a row: timed out".into(),
                            ),
                        },
                    );
                }
            }
            Effect::Check { index, epoch, .. } => {
                let input = if self.chance(self.faults.probe_fails) {
                    Input::Unhealthy(*index, "connection refused".into())
                } else {
                    Input::Healthy(*index)
                };
                let delay = self.delay();
                self.later(
                    delay,
                    Event::Restart {
                        epoch: *epoch,
                        event: RestartEvent::Input(input),
                    },
                );
            }
            Effect::WarmUp {
                index,
                epoch,
                sibling,
                ..
            } if !self.warm_endings.is_empty() => {
                let ending = self.warm_endings.pop_front().expect("not empty");
                let delay = self.delay();
                let result = warmed(sibling, ending, delay);
                self.later(
                    delay,
                    Event::Restart {
                        epoch: *epoch,
                        event: RestartEvent::Warmed {
                            index: *index,
                            result,
                        },
                    },
                );
            }
            Effect::WarmUp { index, epoch, .. } => {
                let input = if self.chance(self.faults.probe_fails) {
                    Input::WarmFailed(*index, "warm-up: 5 errors".into())
                } else {
                    Input::Warmed(*index)
                };
                let delay = self.delay();
                self.later(
                    delay,
                    Event::Restart {
                        epoch: *epoch,
                        event: RestartEvent::Input(input),
                    },
                );
            }
            Effect::ApplyChain { desired, .. } => {
                self.chain_pending
                    .push((desired.clone(), self.alive.clone()));
                let fails = self.chance(self.faults.iptables_fails);
                let delay = self.delay();
                let result = if fails {
                    Err("iptables-restore: exit status 4: resource temporarily unavailable".into())
                } else {
                    Ok(desired.clone())
                };
                self.later(delay, Event::Steered(result));
            }
            Effect::AwaitDrain {
                index,
                waiter,
                until,
                ..
            } => {
                if steers && self.may_steer_to(*index) {
                    self.violation(format!(
                        "drain wait of {index} while the chain steers to it"
                    ));
                }
                let outcome = sluice_strategies::drain::Outcome {
                    ending: self.drain_ending,
                    until: *until,
                    connections_left: 0,
                    in_flight_left: 0,
                    waited_ms: 50,
                    polls: 1,
                };
                let delay = self.delay();
                self.later(
                    delay,
                    Event::Drained {
                        index: *index,
                        waiter: *waiter,
                        outcome: Some(outcome),
                    },
                );
            }
            Effect::Install(job) => {
                self.host
                    .lock()
                    .unwrap()
                    .installed_builds
                    .insert(job.build.clone());
                let delay = self.delay();
                self.later(
                    delay,
                    Event::Deploy(DeployEvent::Installed {
                        build: job.build.clone(),
                        result: Ok(()),
                    }),
                );
            }
            Effect::PostRestart { build, .. } => {
                let delay = self.delay();
                self.later(
                    delay,
                    Event::Deploy(DeployEvent::PostRestartDone {
                        build: build.clone(),
                        result: Ok(()),
                    }),
                );
            }
            Effect::AcquireSlot => {
                let granted = self.connected && !self.chance(self.faults.slot_refused);
                let delay = self.delay();
                let result = if granted {
                    self.host.lock().unwrap().slot_valid = true;
                    Ok(())
                } else {
                    Err("acquiring /services/web/restarting: connection loss".into())
                };
                self.later(delay, Event::Deploy(DeployEvent::Slot(result)));
            }
            Effect::ReleaseSlot(host) => {
                // The status released with the slot is the one the next host sees: it must
                // say that this host's restart ended.
                // (A restart that follows at once, e.g. after a reconfigure, waits for a new
                // slot: the released status is about the one that ended.)
                if matches!(
                    host.state,
                    crate::protocol::HostState::Restarting | crate::protocol::HostState::Waiting
                ) || host.restart_finished_ms.is_none() && host.restart_started_ms.is_some()
                {
                    self.violation(format!(
                        "slot released with a status that says {:?} (restart {:?}..{:?})",
                        host.state, host.restart_started_ms, host.restart_finished_ms
                    ));
                }
                self.host.lock().unwrap().slot_valid = false;
            }
            Effect::Reply { to, result } => {
                self.replies.insert(*to, result.clone());
            }
        }
    }

    /// Where the effects of instance `index` stand in the journal, as short names in order.
    pub fn trail(&self, index: u32) -> Vec<String> {
        self.journal
            .iter()
            .filter_map(|(_, effect)| match effect {
                Effect::Spawn { index: i, .. } if *i == index => Some("spawn".to_owned()),
                Effect::Stop { index: i, .. } if *i == index => Some("stop".to_owned()),
                Effect::AwaitDrain { index: i, .. } if *i == index => Some("drain".to_owned()),
                Effect::ApplyChain { desired, .. } => Some(if desired.contains(&index) {
                    "chain+".to_owned()
                } else {
                    "chain-".to_owned()
                }),
                _ => None,
            })
            .collect()
    }

    pub fn spawns(&self, index: u32) -> usize {
        self.journal
            .iter()
            .filter(|(_, e)| matches!(e, Effect::Spawn { index: i, .. } if *i == index))
            .count()
    }
}

fn exited(index: u32, generation: u64, status: Status) -> Event {
    Event::Instance {
        index,
        generation,
        event: InstanceEvent::Exited(Ok(status)),
    }
}

/// What the warm-up runner answers for `bar` when the warm-up ends with `ending` (`None`: it
/// failed) after `duration_ms`, with the sibling criterion at its defaults.
fn warmed(
    bar: &crate::service::warmup::SiblingBar,
    ending: Option<sluice_strategies::warmup::Ending>,
    duration_ms: u64,
) -> Box<Result<sluice_strategies::warmup::Summary, (String, sluice_strategies::warmup::Summary)>> {
    use crate::service::warmup::SiblingBar;
    use sluice_strategies::warmup::{Percentile, SiblingReference, Summary, Window};
    let reference = |index, window, age_ms| SiblingReference {
        index,
        window,
        ratio: 1.2,
        percentile: Percentile::P90,
        age_ms,
    };
    let (sibling, sibling_fallback) = match bar {
        SiblingBar::Measure(s) => (
            Some(reference(s.index, Window::of(&mut [1_000; 20]), 0)),
            None,
        ),
        SiblingBar::Reuse {
            index,
            window,
            age_ms,
        } => (Some(reference(*index, *window, *age_ms)), None),
        SiblingBar::Missing(why) => (None, Some(why.clone())),
    };
    let summary = Summary {
        requests: 40,
        errors: u64::from(ending.is_none()),
        retries: 0,
        sibling,
        sibling_fallback,
        first_window: None,
        last_window: None,
        ending,
        duration_ms,
    };
    Box::new(match ending {
        Some(_) => Ok(summary),
        None => Err(("1 of 40 warm-up requests failed".into(), summary)),
    })
}
