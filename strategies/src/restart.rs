//! The restart of a service as a state machine: batch by batch, each through
//! drain → stop → start → healthy → warm → enable, and a failed batch put back on the old version.
//!
//! The machine does no I/O and reads no clock: [`Restart::on`] takes what happened ([`Input`]) and
//! returns what to do ([`Action`]). It is serializable, so the daemon persists it before acting and
//! a restarted daemon continues with [`Restart::resume`], which repeats the current step's actions
//! for the members still waited for; the executor must make every action idempotent.
//!
//! Architecture Invariant: with a steering strategy, `Stop` names only instances that an earlier
//! `Disable` took out of steering and that are not `Enable`d again since.

use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Batches taken out of iptables steering, drained, restarted, warmed, put back.
    Drain,
    /// Batches restarted and warmed, without steering (an external balancer copes).
    Rolling,
    /// One batch of everything, without steering.
    AllAtOnce,
    /// Batches sent the reload signal and checked; the processes stay.
    Signal,
}

impl Strategy {
    pub fn steers(self) -> bool {
        self == Strategy::Drain
    }
}

/// Which configuration (or build) an instance is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    New,
    Old,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Draining,
    Stopping,
    Starting,
    Checking,
    Warming,
    Signalling,
    Enabling,
}

/// What happened to a member of the current batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Out of steering and without established connections (or the drain timeout passed).
    Drained(u32),
    Exited(u32),
    Started(u32),
    StartFailed(u32, String),
    Healthy(u32),
    Unhealthy(u32, String),
    Warmed(u32),
    WarmFailed(u32, String),
    Signalled(u32),
    SignalFailed(u32, String),
    /// Back in steering.
    Enabled(u32),
    /// The member went down unasked during a warm-up: a failure even where a failed warm-up is
    /// not (the old version's, in a rollback), since a process that is gone cannot go back in.
    WentDown(u32, String),
}

/// What the executor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Take these out of steering, then report `Drained` for each once it has no connections.
    Disable(Vec<u32>),
    Stop(Vec<u32>),
    Start(Vec<u32>, Version),
    Check(Vec<u32>),
    WarmUp(Vec<u32>),
    Signal(Vec<u32>),
    /// Put these back into steering, then report `Enabled` for each.
    Enable(Vec<u32>),
    /// The restart is over. `Err` names the instance that failed and why; the failed batch was
    /// rolled back (or says that the rollback failed too).
    Finished(Result<(), String>),
}

/// A restart in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    pub strategy: Strategy,
    /// Whether batches are warmed up after they are healthy.
    pub warm: bool,
    /// Batches not begun yet.
    pub pending: VecDeque<Vec<u32>>,
    /// The batch in progress (empty before the first and after the last).
    pub batch: Vec<u32>,
    pub step: Option<Step>,
    /// Members of the batch the current step still waits for.
    pub waiting: BTreeSet<u32>,
    pub version: Version,
    /// Why the current batch is being rolled back.
    pub failure: Option<String>,
    /// Warm-ups of the old version that failed during the rollback of the current batch. The old
    /// version is known good, so its warm-up is best effort: it goes back into steering anyway, and
    /// the final message says so.
    #[serde(default)]
    pub rollback_warmup_failures: Vec<String>,
    /// The batch a failed restart ended on (its members' final state is for the executor to
    /// report); empty while running and after a restart that succeeded.
    #[serde(default)]
    pub failed_batch: Vec<u32>,
    /// Instances restarted onto the new version.
    pub done: Vec<u32>,
    pub finished: bool,
    /// Bumped on every step; inputs carry the epoch of the action they answer, so an answer to an
    /// earlier step (a health check of the new version arriving during the rollback) is dropped.
    pub epoch: u64,
}

impl Restart {
    /// A restart of `batches` in order; call [`Restart::resume`] to get the first actions.
    pub fn new(strategy: Strategy, warm: bool, batches: Vec<Vec<u32>>) -> Self {
        Self {
            strategy,
            warm,
            pending: batches.into_iter().filter(|b| !b.is_empty()).collect(),
            batch: Vec::new(),
            step: None,
            waiting: BTreeSet::new(),
            version: Version::New,
            failure: None,
            rollback_warmup_failures: Vec::new(),
            failed_batch: Vec::new(),
            done: Vec::new(),
            finished: false,
            epoch: 0,
        }
    }

    /// The actions of the current step for the members still waited for; the first batch's first
    /// step when nothing has begun.
    pub fn resume(&mut self) -> Vec<Action> {
        if self.finished {
            return Vec::new();
        }
        match self.step {
            None => self.next_batch(),
            Some(step) => self.actions_of(step),
        }
    }

    fn waiting(&self) -> Vec<u32> {
        self.waiting.iter().copied().collect()
    }

    fn actions_of(&self, step: Step) -> Vec<Action> {
        let members = self.waiting();
        vec![match step {
            Step::Draining => Action::Disable(members),
            Step::Stopping => Action::Stop(members),
            Step::Starting => Action::Start(members, self.version),
            Step::Checking => Action::Check(members),
            Step::Warming => Action::WarmUp(members),
            Step::Signalling => Action::Signal(members),
            Step::Enabling => Action::Enable(members),
        }]
    }

    fn enter(&mut self, step: Step) -> Vec<Action> {
        self.epoch += 1;
        self.step = Some(step);
        self.waiting = self.batch.iter().copied().collect();
        self.actions_of(step)
    }

    fn next_batch(&mut self) -> Vec<Action> {
        let Some(batch) = self.pending.pop_front() else {
            return self.finish(Ok(()));
        };
        self.batch = batch;
        self.version = Version::New;
        self.failure = None;
        self.rollback_warmup_failures.clear();
        let first = match self.strategy {
            Strategy::Drain => Step::Draining,
            Strategy::Rolling | Strategy::AllAtOnce => Step::Stopping,
            Strategy::Signal => Step::Signalling,
        };
        self.enter(first)
    }

    fn finish(&mut self, result: Result<(), String>) -> Vec<Action> {
        if result.is_err() {
            self.failed_batch = self.batch.clone();
        }
        self.finished = true;
        self.step = None;
        self.waiting.clear();
        self.batch.clear();
        vec![Action::Finished(result)]
    }

    /// The step after `step` once every member got through it.
    fn after(&self, step: Step) -> Option<Step> {
        match step {
            Step::Draining => Some(Step::Stopping),
            Step::Stopping => Some(Step::Starting),
            Step::Starting => Some(Step::Checking),
            Step::Signalling => Some(Step::Checking),
            Step::Checking if self.warm => Some(Step::Warming),
            Step::Checking | Step::Warming if self.strategy.steers() => Some(Step::Enabling),
            Step::Checking | Step::Warming | Step::Enabling => None,
        }
    }

    /// A member failed the current step.
    fn fail(&mut self, index: u32, why: String) -> Vec<Action> {
        let message = format!("instance {index}: {why}");
        if self.strategy == Strategy::Signal {
            return self.finish(Err(message));
        }
        match self.version {
            Version::New => {
                self.failure = Some(message);
                self.version = Version::Old;
                // Every member goes back, including those that were fine: a batch moves as one.
                self.enter(Step::Stopping)
            }
            Version::Old => {
                let first = self.failure.take().unwrap_or_default();
                // What each member was left as (running or not, in steering or not) is known
                // only to the executor, which adds it to the message.
                self.finish(Err(format!("{first}; rolling back failed too, {message}")))
            }
        }
    }

    /// Applies what happened in answer to an action of `epoch`; returns what to do next. Inputs of
    /// another epoch, or about instances the current step does not wait for, are ignored (they are
    /// late or repeated).
    pub fn on(&mut self, epoch: u64, input: Input) -> Vec<Action> {
        let Some(step) = self.step else {
            return Vec::new();
        };
        if epoch != self.epoch {
            return Vec::new();
        }
        let went_down = matches!(input, Input::WentDown(..));
        let (index, expected, failure) = match input {
            Input::Drained(i) => (i, Step::Draining, None),
            Input::Exited(i) => (i, Step::Stopping, None),
            Input::Started(i) => (i, Step::Starting, None),
            Input::StartFailed(i, why) => (i, Step::Starting, Some(why)),
            Input::Healthy(i) => (i, Step::Checking, None),
            Input::Unhealthy(i, why) => (i, Step::Checking, Some(why)),
            Input::Warmed(i) => (i, Step::Warming, None),
            Input::WarmFailed(i, why) => (i, Step::Warming, Some(why)),
            Input::Signalled(i) => (i, Step::Signalling, None),
            Input::SignalFailed(i, why) => (i, Step::Signalling, Some(why)),
            Input::Enabled(i) => (i, Step::Enabling, None),
            Input::WentDown(i, why) => (i, Step::Warming, Some(format!("went down: {why}"))),
        };
        if step != expected || !self.waiting.contains(&index) {
            return Vec::new();
        }
        if let Some(why) = failure {
            if step == Step::Warming && self.version == Version::Old && !went_down {
                // The old version ran before this restart and is healthy again: a warm-up that
                // goes wrong (a request list of the new build, a cold dependency) must not keep
                // it out of steering, which would leave the service short of an instance.
                self.rollback_warmup_failures
                    .push(format!("instance {index}: {why}"));
            } else {
                return self.fail(index, why);
            }
        }
        self.waiting.remove(&index);
        if !self.waiting.is_empty() {
            return Vec::new();
        }
        match self.after(step) {
            Some(next) => self.enter(next),
            None => self.batch_done(),
        }
    }

    fn batch_done(&mut self) -> Vec<Action> {
        if let Some(failure) = self.failure.take() {
            let mut message = format!("{failure}; the batch was rolled back");
            if !self.rollback_warmup_failures.is_empty() {
                message.push_str(&format!(
                    "; the old version's warm-up failed too ({}), and the old version went back \
                     into steering anyway: it is known good",
                    self.rollback_warmup_failures.join("; ")
                ));
            }
            return self.finish(Err(message));
        }
        self.done.extend(self.batch.iter().copied());
        self.next_batch()
    }

    /// Instances this restart keeps out of steering: the batch, from its drain until its enable
    /// step begins (then the executor puts them back and reports `Enabled`).
    pub fn disabled(&self) -> BTreeSet<u32> {
        match self.step {
            Some(
                Step::Draining | Step::Stopping | Step::Starting | Step::Checking | Step::Warming,
            ) if self.strategy.steers() => self.batch.iter().copied().collect(),
            _ => BTreeSet::new(),
        }
    }

    /// [`Restart::disabled`], and while a drain batch of the new version is being enabled, the
    /// next batch too: its drain is the step that follows the enable at once, so one steering
    /// transaction can put the batch back and take the next one out (one iptables transaction
    /// per batch instead of two; never fewer instances in steering than during a batch). Only
    /// where nothing stands between two batches: not on the fleet backend, whose next batch waits
    /// for its slot, and not in a rollback, after which the restart ends.
    pub fn disabled_with_next(&self) -> BTreeSet<u32> {
        let mut out = self.disabled();
        if self.strategy == Strategy::Drain
            && self.step == Some(Step::Enabling)
            && self.version == Version::New
            && self.failure.is_none()
            && let Some(next) = self.pending.front()
        {
            out.extend(next.iter().copied());
        }
        out
    }

    /// Whether the machine has just begun a batch (its first step, new version): the moment a
    /// fleet-wide restart slot must be held before anything is stopped.
    pub fn at_batch_start(&self) -> bool {
        let first = match self.strategy {
            Strategy::Drain => Step::Draining,
            Strategy::Rolling | Strategy::AllAtOnce => Step::Stopping,
            Strategy::Signal => Step::Signalling,
        };
        !self.finished
            && self.version == Version::New
            && self.step == Some(first)
            && self.waiting.len() == self.batch.len()
    }

    /// The instances of the current batch, when they are mid-restart (not to be restarted by the
    /// ordinary restart policy, which would race the batch).
    pub fn in_flight(&self) -> &[u32] {
        &self.batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    fn run_happy(strategy: Strategy, warm: bool) -> Vec<Action> {
        let mut r = Restart::new(strategy, warm, vec![vec![0, 1], vec![2]]);
        let mut log = Vec::new();
        let mut queue: VecDeque<Action> = r.resume().into();
        while let Some(action) = queue.pop_front() {
            log.push(action.clone());
            let inputs: Vec<Input> = match action {
                Action::Disable(m) => m.into_iter().map(Input::Drained).collect(),
                Action::Stop(m) => m.into_iter().map(Input::Exited).collect(),
                Action::Start(m, _) => m.into_iter().map(Input::Started).collect(),
                Action::Check(m) => m.into_iter().map(Input::Healthy).collect(),
                Action::WarmUp(m) => m.into_iter().map(Input::Warmed).collect(),
                Action::Signal(m) => m.into_iter().map(Input::Signalled).collect(),
                Action::Enable(m) => m.into_iter().map(Input::Enabled).collect(),
                Action::Finished(_) => vec![],
            };
            for input in inputs {
                let epoch = r.epoch;
                queue.extend(r.on(epoch, input));
            }
        }
        log
    }

    #[test]
    fn drain_goes_through_every_step_in_order() {
        use Action::*;
        let want = vec![
            Disable(vec![0, 1]),
            Stop(vec![0, 1]),
            Start(vec![0, 1], Version::New),
            Check(vec![0, 1]),
            WarmUp(vec![0, 1]),
            Enable(vec![0, 1]),
            Disable(vec![2]),
            Stop(vec![2]),
            Start(vec![2], Version::New),
            Check(vec![2]),
            WarmUp(vec![2]),
            Enable(vec![2]),
            Finished(Ok(())),
        ];
        assert_eq!(run_happy(Strategy::Drain, true), want);
    }

    #[test]
    fn the_next_drain_batch_leaves_steering_as_the_batch_before_it_returns() {
        use Input::*;
        let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        let mut r = Restart::new(Strategy::Drain, false, vec![vec![0], vec![1], vec![2]]);
        r.resume();
        let e = r.epoch;
        r.on(e, Drained(0));
        let e = r.epoch;
        r.on(e, Exited(0));
        let e = r.epoch;
        r.on(e, Started(0));
        assert_eq!(r.disabled_with_next(), set(&[0]), "before its enable");
        let e = r.epoch;
        r.on(e, Healthy(0));
        assert_eq!(r.step, Some(Step::Enabling));
        assert_eq!(r.disabled(), set(&[]));
        assert_eq!(r.disabled_with_next(), set(&[1]), "enabling 0 takes 1 out");
        // The last batch has no next; a rollback's enable takes nothing out (the restart ends).
        let mut last = Restart::new(Strategy::Drain, false, vec![vec![0]]);
        last.resume();
        for input in [Drained(0), Exited(0), Started(0), Healthy(0)] {
            let e = last.epoch;
            last.on(e, input);
        }
        assert_eq!(last.disabled_with_next(), set(&[]));
        let mut rollback = Restart::new(Strategy::Drain, false, vec![vec![0], vec![1]]);
        rollback.resume();
        for input in [
            Drained(0),
            Exited(0),
            Started(0),
            Unhealthy(0, "no".into()),
            Exited(0),
            Started(0),
            Healthy(0),
        ] {
            let e = rollback.epoch;
            rollback.on(e, input);
        }
        assert_eq!(
            (rollback.step, rollback.version),
            (Some(Step::Enabling), Version::Old)
        );
        assert_eq!(rollback.disabled_with_next(), set(&[]));
        // Rolling restarts do not steer.
        let rolling = Restart::new(Strategy::Rolling, false, vec![vec![0], vec![1]]);
        assert_eq!(rolling.disabled_with_next(), set(&[]));
    }

    #[test]
    fn other_strategies_skip_what_they_do_not_do() {
        use Action::*;
        assert_eq!(
            run_happy(Strategy::Rolling, false),
            vec![
                Stop(vec![0, 1]),
                Start(vec![0, 1], Version::New),
                Check(vec![0, 1]),
                Stop(vec![2]),
                Start(vec![2], Version::New),
                Check(vec![2]),
                Finished(Ok(())),
            ]
        );
        assert_eq!(
            run_happy(Strategy::Signal, false),
            vec![
                Signal(vec![0, 1]),
                Check(vec![0, 1]),
                Signal(vec![2]),
                Check(vec![2]),
                Finished(Ok(())),
            ]
        );
    }

    #[test]
    fn a_failed_check_rolls_the_batch_back_and_stops() {
        let mut r = Restart::new(Strategy::Drain, false, vec![vec![0, 1], vec![2]]);
        r.resume();
        r.on(r.epoch, Input::Drained(0));
        r.on(r.epoch, Input::Drained(1));
        r.on(r.epoch, Input::Exited(0));
        r.on(r.epoch, Input::Exited(1));
        r.on(r.epoch, Input::Started(0));
        r.on(r.epoch, Input::Started(1));
        r.on(r.epoch, Input::Healthy(0));
        let actions = r.on(
            r.epoch,
            Input::Unhealthy(1, "GET /health: status 500".into()),
        );
        assert_eq!(actions, vec![Action::Stop(vec![0, 1])]);
        r.on(r.epoch, Input::Exited(0));
        assert_eq!(
            r.on(r.epoch, Input::Exited(1)),
            vec![Action::Start(vec![0, 1], Version::Old)]
        );
        r.on(r.epoch, Input::Started(0));
        r.on(r.epoch, Input::Started(1));
        r.on(r.epoch, Input::Healthy(0));
        assert_eq!(
            r.on(r.epoch, Input::Healthy(1)),
            vec![Action::Enable(vec![0, 1])]
        );
        r.on(r.epoch, Input::Enabled(0));
        let end = r.on(r.epoch, Input::Enabled(1));
        let [Action::Finished(Err(message))] = end.as_slice() else {
            panic!("{end:?}");
        };
        assert_eq!(
            message,
            "instance 1: GET /health: status 500; the batch was rolled back"
        );
        assert!(r.done.is_empty(), "batch 2 never began");
    }

    /// Drives a drain restart of one batch `[0, 1]` with warm-up through `script`, one input at a
    /// time (each answering the current epoch), and returns the actions of the last input.
    fn drive_batch(r: &mut Restart, script: &[Input]) -> Vec<Action> {
        let mut last = Vec::new();
        for input in script {
            last = r.on(r.epoch, input.clone());
        }
        last
    }

    /// The new version of batch `[0, 1]` is started and healthy, and instance 1's warm-up fails;
    /// the old version is started again and is healthy.
    fn to_rollback_warmup() -> (Restart, Vec<Action>) {
        use Input::*;
        let mut r = Restart::new(Strategy::Drain, true, vec![vec![0, 1], vec![2]]);
        r.resume();
        let actions = drive_batch(
            &mut r,
            &[
                Drained(0),
                Drained(1),
                Exited(0),
                Exited(1),
                Started(0),
                Started(1),
                Healthy(0),
                Healthy(1),
                Warmed(0),
                WarmFailed(1, "warm-up: GET /: status 500".into()),
                Exited(0),
                Exited(1),
                Started(0),
                Started(1),
                Healthy(0),
                Healthy(1),
            ],
        );
        (r, actions)
    }

    /// What a case is, the inputs from the old version's warm-up on, the actions of the last
    /// input, and the restart's final message (`None`: not finished).
    type RollbackCase = (&'static str, Vec<Input>, Vec<Action>, Option<String>);

    #[test]
    fn rollback_table() {
        use Input::*;
        let (r, actions) = to_rollback_warmup();
        assert_eq!(
            actions,
            vec![Action::WarmUp(vec![0, 1])],
            "the old version is warmed too"
        );
        assert_eq!(r.version, Version::Old);
        let first = "instance 1: warm-up: GET /: status 500; the batch was rolled back";
        // (what, inputs from the old version's warm-up on, the actions of the last, the end)
        let cases: Vec<RollbackCase> = vec![
            (
                "its warm-up goes well",
                vec![Warmed(0), Warmed(1)],
                vec![Action::Enable(vec![0, 1])],
                Some(first.to_owned()),
            ),
            (
                "one warm-up of the old version fails: it goes back into steering anyway",
                vec![
                    Warmed(0),
                    WarmFailed(1, "warm-up: GET /: status 500".into()),
                ],
                vec![Action::Enable(vec![0, 1])],
                Some(format!(
                    "{first}; the old version's warm-up failed too (instance 1: warm-up: GET /: \
                     status 500), and the old version went back into steering anyway: it is known good"
                )),
            ),
            (
                "both fail",
                vec![
                    WarmFailed(1, "warm-up: connect: connection refused".into()),
                    WarmFailed(0, "warm-up: GET /: timed out".into()),
                ],
                vec![Action::Enable(vec![0, 1])],
                Some(format!(
                    "{first}; the old version's warm-up failed too (instance 1: warm-up: connect: \
                     connection refused; instance 0: warm-up: GET /: timed out), and the old \
                     version went back into steering anyway: it is known good"
                )),
            ),
            (
                "a repeated failure of the same member is dropped",
                vec![WarmFailed(1, "a".into()), WarmFailed(1, "b".into())],
                vec![],
                None,
            ),
        ];
        for (what, inputs, want, end) in cases {
            let mut r = r.clone();
            assert_eq!(drive_batch(&mut r, &inputs), want, "{what}");
            let Some(end) = end else {
                assert_eq!(r.step, Some(Step::Warming), "{what}: still waits for 0");
                continue;
            };
            assert_eq!(r.disabled(), BTreeSet::new(), "{what}: back in steering");
            let finished = drive_batch(&mut r, &[Enabled(0), Enabled(1)]);
            assert_eq!(finished, vec![Action::Finished(Err(end))], "{what}");
            assert_eq!(r.failed_batch, vec![0, 1], "{what}");
            assert!(r.done.is_empty(), "{what}: batch 2 never began");
            // Survives a crash of the daemon in the middle.
            assert_eq!(persisted(&r), r, "{what}");
        }
    }

    #[test]
    fn an_old_version_that_goes_down_while_warming_fails_the_rollback() {
        let (mut r, _) = to_rollback_warmup();
        r.on(r.epoch, Input::Warmed(1));
        let end = r.on(r.epoch, Input::WentDown(0, "exited with code 1".into()));
        assert_eq!(
            end,
            vec![Action::Finished(Err(
                "instance 1: warm-up: GET /: status 500; rolling back failed too, instance 0: \
                 went down: exited with code 1"
                    .into()
            ))]
        );
        assert_eq!(r.failed_batch, vec![0, 1]);
    }

    #[test]
    fn a_rollback_that_fails_its_check_names_both_failures() {
        let (mut r, _) = to_rollback_warmup();
        // Back to where the old version is being checked: a fresh rollback of the same kind.
        let mut r2 = Restart::new(Strategy::Drain, true, vec![vec![0, 1]]);
        r2.resume();
        use Input::*;
        let end = drive_batch(
            &mut r2,
            &[
                Drained(0),
                Drained(1),
                Exited(0),
                Exited(1),
                Started(0),
                Started(1),
                Unhealthy(0, "GET /health: status 500".into()),
                Exited(0),
                Exited(1),
                Started(0),
                Started(1),
                Healthy(1),
                Unhealthy(0, "GET /health: status 503".into()),
            ],
        );
        assert_eq!(
            end,
            vec![Action::Finished(Err(
                "instance 0: GET /health: status 500; rolling back failed too, instance 0: \
                 GET /health: status 503"
                    .into()
            ))]
        );
        assert_eq!(r2.failed_batch, vec![0, 1]);
        assert!(r2.finished);
        // The warm-up failure of the old version is not a failure of the rollback.
        let end = drive_batch(
            &mut r,
            &[WarmFailed(0, "x".into()), WarmFailed(1, "y".into())],
        );
        assert_eq!(end, vec![Action::Enable(vec![0, 1])]);
    }

    #[test]
    fn late_and_repeated_inputs_are_ignored() {
        let mut r = Restart::new(Strategy::Drain, false, vec![vec![0]]);
        r.resume();
        assert!(
            r.on(r.epoch, Input::Exited(0)).is_empty(),
            "not stopping yet"
        );
        assert!(r.on(r.epoch, Input::Drained(7)).is_empty(), "not a member");
        assert_eq!(
            r.on(r.epoch, Input::Drained(0)),
            vec![Action::Stop(vec![0])]
        );
        assert!(r.on(r.epoch, Input::Drained(0)).is_empty(), "repeated");
    }

    /// The simulated host: what each instance runs, and what steering sends to it.
    #[derive(Debug, Default)]
    struct Host {
        running: BTreeMap<u32, Version>,
        enabled: BTreeSet<u32>,
        drained: BTreeSet<u32>,
    }

    /// Drives restarts through random interleavings, bad builds, flapping health checks and
    /// random crashes of the daemon (the machine is serialized and resumed), checking the
    /// invariants after every step.
    #[test]
    fn simulation_keeps_the_invariants() {
        let seed: u64 = std::env::var("SLUICE_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        println!("simulation seed {seed} (rerun with SLUICE_SIM_SEED={seed})");
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 0..500 {
            simulate(&mut rng, round);
        }
    }

    fn simulate(rng: &mut StdRng, round: usize) {
        let strategy =
            [Strategy::Drain, Strategy::Rolling, Strategy::AllAtOnce][rng.random_range(0..3)];
        let n: u32 = rng.random_range(1..7);
        let all: Vec<u32> = (0..n).collect();
        let per = if strategy == Strategy::AllAtOnce {
            n as usize
        } else {
            rng.random_range(1..=n as usize)
        };
        let batches: Vec<Vec<u32>> = all.chunks(per).map(<[u32]>::to_vec).collect();
        let bad_build = rng.random_bool(0.3);
        let bad_old = bad_build && rng.random_bool(0.2);
        // Health that flaps: a good version sometimes fails a check anyway (never the old one,
        // so that a rollback it causes succeeds and the outcome stays predictable).
        let flapping = !bad_build && rng.random_bool(0.2);
        let mut flapped = false;
        // The old version's warm-up fails now and then (a cold dependency): best effort, it must
        // not change the outcome of a rollback.
        let old_warm_flaky = rng.random_bool(0.3);
        let mut host = Host::default();
        for &i in &all {
            host.running.insert(i, Version::Old);
            if strategy.steers() {
                host.enabled.insert(i);
            }
        }
        let mut machine = Restart::new(strategy, rng.random_bool(0.5), batches);
        let mut pending: Vec<(u64, Input)> = Vec::new();
        let mut actions: Vec<Action> = machine.resume();
        let mut result = None;
        for _ in 0..10_000 {
            let epoch = machine.epoch;
            let mut answers = Vec::new();
            for action in actions.drain(..) {
                let ctx = format!("round {round}, {strategy:?}, action {action:?}, host {host:?}");
                match action {
                    Action::Disable(m) => {
                        for i in m {
                            host.enabled.remove(&i);
                            host.drained.insert(i);
                            answers.push(Input::Drained(i));
                        }
                    }
                    Action::Stop(m) => {
                        for i in m {
                            assert!(
                                !strategy.steers() || !host.enabled.contains(&i),
                                "stopped an instance with traffic steered to it: {ctx}"
                            );
                            host.running.remove(&i);
                            answers.push(Input::Exited(i));
                        }
                    }
                    Action::Start(m, version) => {
                        for i in m {
                            // Idempotent, as the executor must be: a start of a running
                            // instance of that version just reports it.
                            host.running.insert(i, version);
                            answers.push(Input::Started(i));
                        }
                    }
                    Action::Check(m) | Action::WarmUp(m) => {
                        for i in m {
                            let version = host.running.get(&i).copied();
                            let flap = flapping && rng.random_bool(0.1);
                            flapped |= flap && version == Some(Version::New);
                            let broken = match version {
                                Some(Version::New) => bad_build || flap,
                                Some(Version::Old) => bad_old,
                                None => true,
                            };
                            answers.push(if broken {
                                Input::Unhealthy(i, "broken".into())
                            } else {
                                Input::Healthy(i)
                            });
                            // A warm-up answers like a check in this model, but the old
                            // version's warm-up may fail where its check passed.
                            if let Some(Step::Warming) = machine.step {
                                let old_warm_fails = old_warm_flaky
                                    && version == Some(Version::Old)
                                    && rng.random_bool(0.5);
                                let last = answers.pop().expect("just pushed");
                                answers.push(match last {
                                    Input::Healthy(i) if old_warm_fails => {
                                        Input::WarmFailed(i, "cold".into())
                                    }
                                    Input::Healthy(i) => Input::Warmed(i),
                                    Input::Unhealthy(i, w) => Input::WarmFailed(i, w),
                                    other => other,
                                });
                            }
                        }
                    }
                    Action::Signal(_) => unreachable!("signal is not simulated"),
                    Action::Enable(m) => {
                        for i in m {
                            assert!(
                                host.running.contains_key(&i),
                                "enabled a stopped instance: {ctx}"
                            );
                            host.enabled.insert(i);
                            host.drained.remove(&i);
                            answers.push(Input::Enabled(i));
                        }
                    }
                    Action::Finished(r) => result = Some(r),
                }
            }
            pending.extend(answers.into_iter().map(|a| (epoch, a)));
            if result.is_some() {
                break;
            }
            // Out of steering at any moment: at most one batch.
            if strategy.steers() {
                assert!(
                    host.drained.len() <= per,
                    "round {round}: more than a batch drained: {host:?}"
                );
            }
            if rng.random_bool(0.05) {
                // The daemon crashes: in-flight inputs are lost, the persisted machine resumes.
                machine = persisted(&machine);
                pending.clear();
                actions = machine.resume();
                continue;
            }
            if pending.is_empty() {
                panic!("round {round}: stuck with nothing pending: {machine:?}");
            }
            let (epoch, input) = pending.remove(rng.random_range(0..pending.len()));
            actions = machine.on(epoch, input);
        }
        let result = result.unwrap_or_else(|| panic!("round {round}: never finished"));
        if flapped && result.as_ref().is_err() {
            // A flap failed a batch of a good version: that batch went back to the old version
            // and the restart stopped there; batches before it stay on the new one.
            let m = result.as_ref().unwrap_err();
            assert!(
                m.contains("the batch was rolled back"),
                "round {round}: {m}"
            );
            assert_eq!(host.running.len(), n as usize, "round {round}: {host:?}");
            let on_new: BTreeSet<u32> = host
                .running
                .iter()
                .filter(|(_, v)| **v == Version::New)
                .map(|(i, _)| *i)
                .collect();
            assert_eq!(
                on_new,
                machine.done.iter().copied().collect(),
                "round {round}: {host:?}"
            );
            if strategy.steers() {
                assert_eq!(host.enabled.len(), n as usize, "round {round}: {host:?}");
            }
            return;
        }
        match (&result, bad_build, bad_old) {
            (Ok(()), false, _) => {
                assert!(
                    host.running.values().all(|v| *v == Version::New),
                    "round {round}: {host:?}"
                );
                assert_eq!(machine.done.len(), n as usize);
            }
            (Err(m), true, false) => {
                assert!(
                    m.contains("the batch was rolled back"),
                    "round {round}: {m}"
                );
                assert!(
                    !m.contains("rolling back failed"),
                    "round {round}: a failed warm-up of the old version is no failed rollback: {m}"
                );
                assert!(!machine.failed_batch.is_empty(), "round {round}");
                assert_eq!(host.running.len(), n as usize, "round {round}: {host:?}");
                assert!(
                    host.running.values().all(|v| *v == Version::Old),
                    "round {round}: {host:?}"
                );
            }
            (Err(m), true, true) => {
                assert!(m.contains("rolling back failed too"), "round {round}: {m}")
            }
            other => panic!("round {round}: unexpected {other:?}"),
        }
        if strategy.steers() && !bad_old {
            assert_eq!(
                host.enabled.len(),
                n as usize,
                "round {round}: every instance enabled at the end: {host:?}"
            );
        }
    }

    /// A crash loses everything but the persisted machine: round-trip it through JSON.
    fn persisted(machine: &Restart) -> Restart {
        let text = serde_json::to_string(machine).expect("serializes");
        serde_json::from_str(&text).expect("deserializes")
    }
}
