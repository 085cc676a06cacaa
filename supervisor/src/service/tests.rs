//! Unit tests of the service core: the invariants as tables, driven in virtual time through
//! [`World`] (no root, network namespace or ZooKeeper), and the log directory's link refusal.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;

use sluice_strategies::restart::{self, Restart, Strategy};

use super::core::{Effect, Event, InstanceEvent, Phase, Request};
use super::testkit::{World, config};
use super::{Action, make_log_dir};
use crate::config::{HealthConfig, ServiceConfig, StrategyName};
use sluice_shim::proto::Status;

/// Events enough for any of these scenarios to settle.
const SETTLE: usize = 5_000;

fn with_liveness(mut config: ServiceConfig) -> ServiceConfig {
    config.health = Some(
        serde_json::from_value::<HealthConfig>(serde_json::json!({
            "tcp": true,
            "liveness_interval_ms": 1000
        }))
        .unwrap(),
    );
    config
}

/// A world whose instances all run, healthy and (when steered) in the chain.
fn serving(config: ServiceConfig, fleet: bool) -> World {
    let instances = config.instances;
    let steers = config.steers();
    let mut world = World::new(config, fleet, 7);
    if fleet {
        world.handle(Event::Request(Request::Connection(true)));
    }
    world.settle(SETTLE);
    for i in 0..instances {
        let instance = &world.core.instances[&i];
        assert_eq!(instance.phase, Phase::Running, "instance {i}");
        assert!(instance.healthy, "instance {i}");
    }
    if steers {
        assert_eq!(world.chain, (0..instances).collect::<BTreeSet<_>>());
    }
    world
}

/// A changed configuration: every instance is outdated.
fn changed(mut config: ServiceConfig) -> ServiceConfig {
    config.env.insert("RELEASE".into(), "2".into());
    config
}

fn generation(world: &World, index: u32) -> u64 {
    world.core.instances[&index].generation
}

/// Drain before stop: whatever asks for the stop of a steered instance, its stop comes after a
/// chain without it and a drain wait; only `rolling` and `all-at-once` stop in the chain (by
/// definition).
#[test]
fn drain_before_stop_table() {
    type Cause = fn(&mut World);
    let rows: &[(&str, StrategyName, Cause, u32, bool)] = &[
        (
            "operator stop",
            StrategyName::Drain,
            |w| {
                w.control(Action::Stop, Some(1));
            },
            1,
            true,
        ),
        (
            "operator stop, rolling service",
            StrategyName::Rolling,
            |w| {
                w.control(Action::Stop, Some(1));
            },
            1,
            true,
        ),
        (
            "liveness failure",
            StrategyName::Drain,
            |w| {
                let generation = generation(w, 1);
                w.handle(Event::Instance {
                    index: 1,
                    generation,
                    event: InstanceEvent::LivenessFailed(
                        "3 liveness probes failed in a row".into(),
                    ),
                });
            },
            1,
            true,
        ),
        (
            "stop all",
            StrategyName::Drain,
            |w| {
                w.request(|reply| Request::StopAll {
                    forget: false,
                    reply,
                });
            },
            0,
            true,
        ),
        (
            "drain restart",
            StrategyName::Drain,
            |w| {
                w.control(Action::Restart, None);
            },
            2,
            true,
        ),
        (
            "reload that drops an instance",
            StrategyName::Drain,
            |w| {
                let mut config = w.core.config.clone();
                config.instances = 2;
                w.request(|reply| Request::Reconfigure {
                    config: Box::new(config),
                    reply,
                });
            },
            2,
            true,
        ),
        (
            "reload that changes the command",
            StrategyName::Drain,
            |w| {
                let config = changed(w.core.config.clone());
                w.request(|reply| Request::Reconfigure {
                    config: Box::new(config),
                    reply,
                });
            },
            0,
            true,
        ),
        (
            "rolling restart",
            StrategyName::Rolling,
            |w| {
                w.control(Action::Restart, None);
            },
            1,
            false,
        ),
        (
            "all-at-once restart",
            StrategyName::AllAtOnce,
            |w| {
                w.control(Action::Restart, None);
            },
            2,
            false,
        ),
    ];
    for &(name, strategy, cause, index, drained) in rows {
        let mut world = serving(with_liveness(config(3, true, strategy)), false);
        let before = world.journal.len();
        world.now += 60_000;
        cause(&mut world);
        world.settle(SETTLE);
        assert!(
            world.violations.is_empty(),
            "{name}: {:?}",
            world.violations
        );
        let trail: Vec<String> = {
            let mut w = World::new(config(1, false, strategy), false, 0);
            w.journal = world.journal.split_off(before);
            w.trail(index)
        };
        let stop = trail
            .iter()
            .position(|e| e == "stop")
            .unwrap_or_else(|| panic!("{name}: instance {index} never stopped: {trail:?}"));
        let last_chain = trail[..stop].iter().rposition(|e| e.starts_with("chain"));
        let drain = trail[..stop].iter().rposition(|e| e == "drain");
        if drained {
            let last_chain =
                last_chain.unwrap_or_else(|| panic!("{name}: no chain before the stop: {trail:?}"));
            assert_eq!(trail[last_chain], "chain-", "{name}: {trail:?}");
            assert!(
                drain.is_some_and(|d| d > last_chain),
                "{name}: no drain wait between leaving the chain and the stop: {trail:?}"
            );
        } else {
            assert!(
                drain.is_none(),
                "{name}: stopped in the chain by definition: {trail:?}"
            );
        }
    }
}

/// The core's own assertion: a stop of an instance the chain steers to is a panic, not a log
/// line.
#[test]
#[should_panic(expected = "web/1: stopping an instance the chain steers to")]
fn a_stop_of_a_steered_instance_panics() {
    let mut world = serving(config(3, true, StrategyName::Drain), false);
    world.core.stop_now(1);
}

/// One owner: an instance never gets a second process, whatever arrives late or twice.
#[test]
fn one_owner_table() {
    type Cause = fn(&mut World);
    let rows: &[(&str, Cause, usize)] = &[
        (
            "start of a running instance",
            |w| {
                w.control(Action::Start, Some(0));
            },
            0,
        ),
        (
            "an exit of an earlier generation",
            |w| {
                let generation = generation(w, 0) - 1;
                w.handle(Event::Instance {
                    index: 0,
                    generation,
                    event: InstanceEvent::Exited(Err("shim lost".into())),
                });
            },
            0,
        ),
        (
            "a spawn answer of an earlier generation",
            |w| {
                let generation = generation(w, 0) - 1;
                w.handle(Event::Instance {
                    index: 0,
                    generation,
                    event: InstanceEvent::Spawned {
                        result: Err("late".into()),
                        cgroup: None,
                    },
                });
            },
            0,
        ),
        (
            "a stale backoff timer",
            |w| {
                let generation = generation(w, 0) - 1;
                w.handle(Event::Instance {
                    index: 0,
                    generation,
                    event: InstanceEvent::BackoffElapsed,
                });
            },
            0,
        ),
        ("a crash", |w| w.crash(0), 1),
        (
            "two crashes, one reported twice",
            |w| {
                w.crash(0);
                w.settle(SETTLE);
                let generation = generation(w, 0) - 2;
                w.handle(Event::Instance {
                    index: 0,
                    generation,
                    event: InstanceEvent::Exited(Err("shim lost".into())),
                });
                w.crash(0);
            },
            2,
        ),
        (
            "two restarts asked at once",
            |w| {
                w.control(Action::Restart, Some(0));
                w.control(Action::Restart, Some(0));
            },
            1,
        ),
        (
            "a crash in the middle of a restart",
            |w| {
                w.control(Action::Restart, None);
                for _ in 0..10 {
                    w.step();
                }
                w.crash(0);
                w.crash(1);
            },
            1,
        ),
    ];
    for &(name, cause, more) in rows {
        let mut world = serving(config(2, true, StrategyName::Drain), false);
        let before = world.spawns(0);
        world.now += 60_000;
        cause(&mut world);
        world.settle(SETTLE);
        assert!(
            world.violations.is_empty(),
            "{name}: {:?}",
            world.violations
        );
        let spawns = world.spawns(0) - before;
        if name == "a crash in the middle of a restart" {
            // Restarted once by the batch, and maybe once more after the crash.
            assert!((1..=2).contains(&spawns), "{name}: {spawns} spawns");
        } else {
            assert_eq!(spawns, more, "{name}");
        }
        assert_eq!(world.core.instances[&0].phase, Phase::Running, "{name}");
    }
}

#[test]
#[should_panic(expected = "web/0: spawning a second shim")]
fn a_second_shim_panics() {
    let mut world = serving(config(2, false, StrategyName::Rolling), false);
    world
        .core
        .start(0, sluice_strategies::restart::Version::New);
}

/// Persist before act: a request whose state cannot be written is refused and nothing is done;
/// one that is written is acted on only after the write, and a restart's step is written before
/// its actions go out.
#[test]
fn persist_before_act_table() {
    type Ask = fn(&mut World) -> super::core::ReplyId;
    let rows: &[(&str, Ask)] = &[
        ("start", |w| w.control(Action::Start, Some(1))),
        ("stop", |w| w.control(Action::Stop, Some(1))),
        ("drain", |w| w.control(Action::Drain, Some(1))),
        ("enable", |w| w.control(Action::Enable, Some(1))),
        ("restart", |w| w.control(Action::Restart, None)),
        ("reload", |w| {
            let config = changed(w.core.config.clone());
            w.request(|reply| Request::Reconfigure {
                config: Box::new(config),
                reply,
            })
        }),
    ];
    for &(name, ask) in rows {
        for fail in [true, false] {
            let mut world = serving(config(3, true, StrategyName::Drain), false);
            if name == "start" {
                world.control(Action::Stop, Some(1));
                world.settle(SETTLE);
            }
            world.host.lock().unwrap().fail_store = fail;
            let stores = world.host.lock().unwrap().stores;
            let before = world.journal.len();
            let reply = ask(&mut world);
            let acted = world.journal[before..].iter().any(|(_, e)| {
                matches!(
                    e,
                    super::core::Effect::Spawn { .. }
                        | super::core::Effect::Stop { .. }
                        | super::core::Effect::ApplyChain { .. }
                )
            });
            assert!(
                world.host.lock().unwrap().stores > stores,
                "{name}: nothing written"
            );
            if fail {
                let answer = world.replies.get(&reply).cloned();
                assert!(
                    matches!(&answer, Some(Err(e)) if e.contains("no space left on device")),
                    "{name}: {answer:?}"
                );
                assert!(!acted, "{name}: acted on a state that was not written");
                assert!(
                    world.core.state.restart.is_none(),
                    "{name}: a restart began unwritten"
                );
            } else {
                world.settle(SETTLE);
                assert!(
                    world.violations.is_empty(),
                    "{name}: {:?}",
                    world.violations
                );
                let answer = world.replies.get(&reply).cloned();
                assert!(matches!(answer, Some(Ok(_))), "{name}: {answer:?}");
            }
        }
    }
}

/// The core's own assertion: a restart action of a machine that changed after its last write
/// is a panic (`execute` keeps such actions; carrying one out directly is the bug it catches).
#[test]
#[should_panic(expected = "before the machine was persisted")]
fn a_restart_action_before_its_write_panics() {
    let mut world = serving(config(2, false, StrategyName::Rolling), false);
    let mut machine = Restart::new(Strategy::Rolling, false, vec![vec![0]]);
    let actions = machine.resume();
    world.core.state.restart = Some(machine);
    world.core.machine_changed();
    world.core.carry_out(actions);
}

/// Slot before batch: on the fleet backend no batch drains or stops anything before the host
/// holds a slot with ZooKeeper reachable; a batch begun finishes when the slot is lost, and the
/// next batch waits for a new one.
#[test]
fn slot_before_batch_table() {
    type Setup = fn(&mut World);
    let rows: &[(&str, Setup)] = &[
        ("ZooKeeper away", |w| {
            w.handle(Event::Request(Request::Connection(false)));
        }),
        ("slot refused", |w| w.faults.slot_refused = 1.0),
        ("both", |w| {
            w.handle(Event::Request(Request::Connection(false)));
            w.faults.slot_refused = 1.0;
        }),
    ];
    for &(name, setup) in rows {
        let mut world = serving(config(3, true, StrategyName::Drain), true);
        setup(&mut world);
        let reply = world.control(Action::Restart, None);
        for _ in 0..200 {
            world.now += 1_000;
            world.step();
        }
        assert!(
            world.violations.is_empty(),
            "{name}: {:?}",
            world.violations
        );
        let stops = world
            .journal
            .iter()
            .filter(|(_, e)| matches!(e, super::core::Effect::Stop { .. }))
            .count();
        assert_eq!(stops, 0, "{name}: stopped without a slot");
        assert_eq!(
            world.chain,
            BTreeSet::from([0, 1, 2]),
            "{name}: a held batch keeps serving"
        );
        assert!(
            !world.replies.contains_key(&reply),
            "{name}: the restart ended without a slot"
        );
        // ZooKeeper back, slots granted: the restart goes through.
        world.faults.slot_refused = 0.0;
        world.handle(Event::Request(Request::Connection(true)));
        world.settle(SETTLE);
        assert!(
            world.violations.is_empty(),
            "{name}: {:?}",
            world.violations
        );
        assert!(
            matches!(world.replies.get(&reply), Some(Ok(_))),
            "{name}: {:?}",
            world.replies.get(&reply)
        );
        assert!(
            !world.host.lock().unwrap().slot_valid,
            "{name}: the slot was kept"
        );
    }
    // A slot lost in the middle of a batch: the batch finishes, the next one waits.
    let mut world = serving(config(2, true, StrategyName::Drain), true);
    let reply = world.control(Action::Restart, None);
    while world
        .journal
        .iter()
        .all(|(_, e)| !matches!(e, super::core::Effect::Stop { .. }))
    {
        assert!(world.step(), "the first batch never stopped its member");
    }
    world.host.lock().unwrap().slot_valid = false;
    world.faults.slot_refused = 1.0;
    for _ in 0..300 {
        world.now += 1_000;
        world.step();
    }
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    let machine = world
        .core
        .state
        .restart
        .as_ref()
        .expect("waiting for a slot");
    assert_eq!(machine.done, vec![0], "the first batch finished");
    assert!(world.core.batch_held(), "the second batch waits for a slot");
    world.faults.slot_refused = 0.0;
    world.settle(SETTLE);
    assert!(
        matches!(world.replies.get(&reply), Some(Ok(_))),
        "{:?}",
        world.replies.get(&reply)
    );
}

/// A session lost while holding a slot (issue 10): ZooKeeper goes away mid-batch and the lease
/// dies with the session. The batch in flight finishes; no further batch begins until a slot is
/// held again, asked for and granted after the new session is up; the restart then completes and
/// releases the new slot with a status saying it ended.
#[test]
fn a_session_lost_mid_batch_finishes_the_batch_and_waits_for_a_new_slot() {
    let mut world = serving(config(3, true, StrategyName::Drain), true);
    let reply = world.control(Action::Restart, None);
    while world
        .journal
        .iter()
        .all(|(_, e)| !matches!(e, super::core::Effect::Stop { .. }))
    {
        assert!(world.step(), "the first batch never stopped its member");
    }
    // The session expires: the core hears the connection is gone, and the slot is no more.
    world.handle(Event::Request(Request::Connection(false)));
    world.host.lock().unwrap().slot_valid = false;
    for _ in 0..300 {
        world.now += 1_000;
        world.step();
    }
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    let machine = world
        .core
        .state
        .restart
        .as_ref()
        .expect("the restart waits");
    assert_eq!(machine.done, vec![0], "the batch in flight finished");
    assert!(world.core.batch_held(), "the next batch waits for a slot");
    let stops = |w: &World| {
        w.journal
            .iter()
            .filter(|(_, e)| matches!(e, super::core::Effect::Stop { .. }))
            .count()
    };
    assert_eq!(stops(&world), 1, "nothing else was stopped");
    let asked_before = world
        .journal
        .iter()
        .filter(|(_, e)| matches!(e, super::core::Effect::AcquireSlot))
        .count();
    // The new session is up: a slot is asked for in it, and only then does the next batch go.
    let reconnected_at = world.journal.len();
    world.handle(Event::Request(Request::Connection(true)));
    world.settle(SETTLE);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    let after = &world.journal[reconnected_at..];
    let acquire = after
        .iter()
        .position(|(_, e)| matches!(e, super::core::Effect::AcquireSlot))
        .expect("a slot is asked for in the new session");
    let next_stop = after
        .iter()
        .position(|(_, e)| matches!(e, super::core::Effect::Stop { .. }))
        .expect("the next batch ran");
    assert!(
        acquire < next_stop,
        "a batch began before a new slot was asked for"
    );
    assert!(
        asked_before <= 1,
        "no slot was asked for while ZooKeeper was away"
    );
    assert!(
        matches!(world.replies.get(&reply), Some(Ok(_))),
        "{:?}",
        world.replies.get(&reply)
    );
    assert!(
        world
            .journal
            .iter()
            .any(|(_, e)| matches!(e, super::core::Effect::ReleaseSlot(_))),
        "the new slot was released at the end"
    );
}

/// The core's own assertion: a batch begun without a slot is a panic.
#[test]
#[should_panic(expected = "begins a batch without a fleet slot")]
fn a_batch_without_a_slot_panics() {
    let mut world = serving(config(2, true, StrategyName::Drain), true);
    let mut machine = Restart::new(Strategy::Drain, false, vec![vec![0]]);
    let actions = machine.resume();
    assert!(matches!(actions[..], [restart::Action::Disable(_)]));
    world.core.state.restart = Some(machine);
    world.core.machine_changed();
    world.core.persist_logged();
    // `execute` would hold them at the gate; the assertion guards the step behind it.
    world.core.carry_out(actions);
}

/// A link that a less-trusted user planted on the way to a log directory is not followed:
/// nothing is made where it points (issue 8).
#[test]
fn a_log_dir_is_never_made_through_a_planted_link() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("root-only");
    std::fs::create_dir(&target).unwrap();
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    // Writable by anyone: the user who owns it could have planted the link.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::symlink(&target, shared.join("app")).unwrap();
    let err = make_log_dir(&shared.join("app/logs")).unwrap_err();
    assert!(sluice_safefs::is_refused(&err), "{err}");
    assert!(!target.join("logs").exists(), "made through the link");
    make_log_dir(&shared.join("web/logs")).unwrap();
    assert!(shared.join("web/logs").is_dir());
    make_log_dir(&shared.join("web/logs")).unwrap();
}

/// The shims of `old`'s live instances as a new daemon finds them, running for a minute.
fn found_of(old: &World) -> Vec<(u32, sluice_shim::proto::Status)> {
    old.alive
        .keys()
        .map(|&index| {
            (
                index,
                sluice_shim::proto::Status::Running {
                    shim_pid: 100 + index,
                    pid: 200 + index,
                    started_ms: old.now.saturating_sub(60_000),
                    started_boot_ms: Some(old.now.saturating_sub(60_000)),
                    tag: old.tags.get(&index).cloned().unwrap_or_default(),
                    stopping: false,
                },
            )
        })
        .collect()
}

fn spawns_in(world: &World) -> usize {
    world
        .journal
        .iter()
        .filter(|(_, e)| matches!(e, super::core::Effect::Spawn { .. }))
        .count()
}

/// In `state_error` the instances found are adopted and watched, an exit is recorded and not
/// restarted, verbs that need the desired state are refused, nothing is written; a reload that
/// finds the file readable again supervises the service from it.
#[test]
fn a_service_in_state_error_starts_stops_and_writes_nothing_until_its_file_reads() {
    for steered in [false, true] {
        let strategy = if steered {
            StrategyName::Drain
        } else {
            StrategyName::Rolling
        };
        let old = serving(config(3, steered, strategy), false);
        let marker = crate::service::state::ServiceState {
            state_error: Some("state file web.json is corrupt; kept as web.json.bad-1".into()),
            ..Default::default()
        };
        let mut world = World::with_state(
            old.core.config.clone(),
            false,
            7,
            marker,
            found_of(&old),
            old.chain.clone(),
            old.now + 1_000,
        )
        .boot();
        world.settle(SETTLE);
        let stores = world.host.lock().unwrap().stores;
        for i in 0..3 {
            assert_eq!(world.core.instances[&i].phase, Phase::Running, "{i}");
        }
        assert!(
            world
                .core
                .status_at(super::core::Now::same(world.now))
                .state_error
                .is_some()
        );
        world.crash(1);
        world.settle(SETTLE);
        assert_eq!(world.core.instances[&1].phase, Phase::Exited);
        assert_eq!(spawns_in(&world), 0, "started in state_error");
        if steered {
            // Gone from the chain, nobody added.
            assert_eq!(world.chain, [0, 2].into());
        }
        for action in [Action::Stop, Action::Start, Action::Restart, Action::Drain] {
            let reply = world.control(action, None);
            world.settle(SETTLE);
            let answer = world.replies[&reply].clone();
            assert!(
                answer.as_ref().is_err_and(|e| e.contains("state_error")),
                "{action:?}: {answer:?}"
            );
        }
        assert_eq!(spawns_in(&world), 0);
        assert_eq!(
            world.host.lock().unwrap().stores,
            stores,
            "written in state_error"
        );
        assert!(world.violations.is_empty(), "{:?}", world.violations);

        // Still the marker: still in state_error.
        let reply = world.request(Request::RecheckState);
        assert!(
            world.replies[&reply]
                .as_ref()
                .unwrap()
                .contains("still in state_error")
        );
        // The operator removed it: the default state, every instance up.
        world.host.lock().unwrap().written = None;
        let reply = world.request(Request::RecheckState);
        world.settle(SETTLE);
        assert!(
            world.replies[&reply]
                .as_ref()
                .unwrap()
                .contains("supervised again")
        );
        assert!(
            world
                .core
                .status_at(super::core::Now::same(world.now))
                .state_error
                .is_none()
        );
        for i in 0..3 {
            assert_eq!(world.core.instances[&i].phase, Phase::Running, "{i}");
        }
        assert_eq!(spawns_in(&world), 1);
        if steered {
            assert_eq!(world.chain, [0, 1, 2].into());
        }
        assert!(world.violations.is_empty(), "{:?}", world.violations);
    }
}

/// While iptables fails, an operator `stop` of a steered instance fails after
/// `restart.steer_timeout_ms` and leaves it running and steered (its `stopped` mark undone); a
/// `restart` fails at its first drain the same way; nothing is stopped.
#[test]
fn stop_and_restart_fail_at_the_steer_bound_while_iptables_fails() {
    let mut world = serving(config(2, true, StrategyName::Drain), false);
    world.faults.iptables_fails = 1.0;
    let start = world.now;
    let reply = world.control(Action::Stop, Some(1));
    world.settle(SETTLE);
    let answer = world.replies[&reply].clone();
    assert!(
        answer
            .as_ref()
            .is_err_and(|e| e.contains("steer_timeout_ms") && e.contains("keeps running")),
        "{answer:?}"
    );
    let bound = world.core.config.restart.steer_timeout_ms;
    assert!(world.now - start >= bound, "answered before the bound");
    let instance = &world.core.instances[&1];
    assert_eq!(instance.phase, Phase::Running);
    assert!(
        instance
            .last_error
            .as_ref()
            .unwrap()
            .contains("stop failed")
    );
    assert!(world.core.state.stopped.is_empty());
    assert_eq!(world.chain, [0, 1].into());

    let reply = world.control(Action::Restart, None);
    world.settle(SETTLE);
    let answer = world.replies[&reply].clone();
    assert!(
        answer
            .as_ref()
            .is_err_and(|e| e.contains("steer_timeout_ms")),
        "{answer:?}"
    );
    assert!(world.core.state.restart.is_none());
    for i in 0..2 {
        assert_eq!(world.core.instances[&i].phase, Phase::Running, "{i}");
    }
    assert_eq!(world.chain, [0, 1].into());
    let stops = world
        .journal
        .iter()
        .filter(|(_, e)| matches!(e, super::core::Effect::Stop { .. }))
        .count();
    assert_eq!(stops, 0);
    assert!(world.violations.is_empty(), "{:?}", world.violations);

    // Every instance being stopped (shutdown, removal): stopped anyway after the bound.
    let reply = world.request(|reply| Request::StopAll {
        forget: false,
        reply,
    });
    world.settle(SETTLE);
    assert!(world.core.finished().is_some_and(|(_, to)| to == reply));
    assert!(world.alive.is_empty());
}

/// Issue 10: how long an instance ran is measured on the boot clock the shim reports, whatever
/// its wall-clock times say. A wall clock stepped back an hour during a long run is no failed
/// start (which would count towards `fatal`); one stepped forward an hour during a failed start
/// does not make it a long run (which would skip the backoff).
#[test]
fn run_times_come_from_the_boot_clock_table() {
    use sluice_shim::proto::{Outcome, Status};
    const HOUR_MS: u64 = 3_600_000;
    // (what happened, wall-clock run, boot-clock run, phase right after, failed starts)
    let table: [(&str, i64, u64, Phase, u32); 4] = [
        (
            "long run, wall clock stepped back",
            10_000 - HOUR_MS as i64,
            10_000,
            Phase::Spawning,
            0,
        ),
        (
            "failed start, wall clock stepped forward",
            HOUR_MS as i64 + 100,
            100,
            Phase::Fatal,
            1,
        ),
        ("long run, no step", 10_000, 10_000, Phase::Spawning, 0),
        ("failed start, no step", 100, 100, Phase::Fatal, 1),
    ];
    for (what, wall_ran, boot_ran, phase, failed_starts) in table {
        let mut config = config(1, false, StrategyName::AllAtOnce);
        config.startup_ms = 1_000;
        // One failed start is fatal: a failed start counted where there was none shows at once.
        config.start_retries = 0;
        let mut world = serving(config, false);
        let started_wall = 1_700_000_000_000u64;
        let started_boot = 5_000_000u64;
        let status = Status::Exited {
            shim_pid: 1,
            pid: 2,
            started_ms: started_wall,
            started_boot_ms: Some(started_boot),
            exited_ms: started_wall.saturating_add_signed(wall_ran),
            exited_boot_ms: Some(started_boot + boot_ran),
            outcome: Outcome::Code(1),
            tag: String::new(),
        };
        let generation = generation(&world, 0);
        world.handle(Event::Instance {
            index: 0,
            generation,
            event: InstanceEvent::Exited(Ok(status)),
        });
        let instance = &world.core.instances[&0];
        assert_eq!(instance.phase, phase, "{what}");
        assert_eq!(instance.failed_starts, failed_starts, "{what}");
    }
}

/// A shim started before the boot-clock keys existed (an upgrade) reports wall-clock times
/// only: its run is measured on them, and an adopted one's start on the boot clock is derived
/// from its wall-clock age.
#[test]
fn shims_without_boot_clock_times_fall_back_to_the_wall_clock() {
    use super::core::Now;
    use sluice_shim::proto::{Outcome, Status};
    let now = Now {
        wall_ms: 1_700_000_010_000,
        boot_ms: 50_000,
    };
    assert_eq!(now.boot_of_wall(1_700_000_000_000), 40_000);
    assert_eq!(now.boot_of_wall(0), 0, "saturates at boot");
    for (what, ran_ms, phase, failed_starts) in [
        ("long run", 10_000, Phase::Spawning, 0),
        ("failed start", 100, Phase::Fatal, 1),
    ] {
        let mut config = config(1, false, StrategyName::AllAtOnce);
        config.startup_ms = 1_000;
        config.start_retries = 0;
        let mut world = serving(config, false);
        let generation = generation(&world, 0);
        world.handle(Event::Instance {
            index: 0,
            generation,
            event: InstanceEvent::Exited(Ok(Status::Exited {
                shim_pid: 1,
                pid: 2,
                started_ms: 1_700_000_000_000,
                started_boot_ms: None,
                exited_ms: 1_700_000_000_000 + ran_ms,
                exited_boot_ms: None,
                outcome: Outcome::Code(1),
                tag: String::new(),
            })),
        });
        let instance = &world.core.instances[&0];
        assert_eq!(instance.phase, phase, "{what}");
        assert_eq!(instance.failed_starts, failed_starts, "{what}");
    }
}

/// A host shutdown: once the daemon says the host is going down nothing starts again (a crash is
/// not restarted); a daemon that finishes an earlier daemon's shutdown adopts and starts nothing;
/// and an instance whose chain cannot be rewritten is stopped anyway once
/// `restart.steer_timeout_ms` has passed (`Effect::Stop.steered_anyway`, the one stop of a steered
/// instance outside `rolling`/`all-at-once`).
#[test]
fn a_host_shutdown_starts_nothing_and_ends_when_iptables_fails() {
    // Nothing restarts after the daemon said the host is going down.
    let mut world = serving(config(3, true, StrategyName::Drain), false);
    let spawns: usize = (0..3).map(|i| world.spawns(i)).sum();
    world.handle(Event::Request(Request::ShuttingDown));
    world.crash(1);
    world.settle(SETTLE);
    assert_eq!(
        (0..3).map(|i| world.spawns(i)).sum::<usize>(),
        spawns,
        "a spawn after ShuttingDown"
    );
    assert_eq!(
        world.core.instances[&1].phase,
        Phase::Stopped,
        "the crashed instance"
    );

    // A daemon finishing a shutdown adopts the two instances found and starts the third not.
    let found: Vec<(u32, Status)> = (0..2)
        .map(|index| {
            (
                index,
                Status::Running {
                    shim_pid: 100 + index,
                    pid: 200 + index,
                    started_ms: 1_000,
                    started_boot_ms: Some(1_000),
                    tag: String::new(),
                    stopping: false,
                },
            )
        })
        .collect();
    let mut world = World::with_state(
        config(3, true, StrategyName::Drain),
        false,
        7,
        Default::default(),
        found,
        [0, 1].into(),
        1_000_000,
    )
    .boot_for_shutdown();
    world.settle(SETTLE);
    assert_eq!(
        (0..3).map(|i| world.spawns(i)).sum::<usize>(),
        0,
        "spawned while finishing a shutdown"
    );
    world.request(|reply| Request::StopAll {
        forget: false,
        reply,
    });
    world.settle(SETTLE);
    assert!(world.alive.is_empty(), "left running: {:?}", world.alive);
    assert!(world.core.finished().is_some(), "the service did not end");
    assert!(world.violations.is_empty(), "{:?}", world.violations);

    // iptables fails for good: the stops come at the bound, and only then.
    let mut world = serving(config(2, true, StrategyName::Drain), false);
    world.faults.iptables_fails = 1.0;
    let began = world.now;
    world.request(|reply| Request::StopAll {
        forget: false,
        reply,
    });
    world.settle(SETTLE);
    assert!(world.alive.is_empty(), "left running: {:?}", world.alive);
    let bound = world.core.config.restart.steer_timeout_ms;
    let stops: Vec<u64> = world
        .journal
        .iter()
        .filter(|(at, e)| *at >= began && matches!(e, Effect::Stop { .. }))
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(stops.len(), 2, "stops: {stops:?}");
    assert!(
        stops.iter().all(|at| *at >= began + bound),
        "a stop before the bound: {stops:?} (began {began}, bound {bound})"
    );
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    assert!(world.core.finished().is_some(), "the service did not end");
}

/// Events delivered while the disk is full in the persist-before-act tables (retry timers and
/// outcomes of what was already under way; nothing new may begin).
const WHILE_FULL: usize = 300;

/// Persist before act, for a restart under way: from whichever event on the state cannot be
/// written, nothing of a step that was not written goes out (the world checks every effect's
/// epoch and the machine against what was written), no instance outside the written batch is
/// stopped or started, status shows the write error, the caller is not answered unless the
/// restart's end was written; once writes succeed again the retry (after
/// `STATE_WRITE_RETRY_MS`) lets the same restart finish.
#[test]
fn a_restart_step_runs_only_after_its_write_table() {
    for strategy in [
        StrategyName::Drain,
        StrategyName::Rolling,
        StrategyName::AllAtOnce,
        StrategyName::Signal,
    ] {
        // Up to 60 events in: every step of the three batches, and past the end.
        for k in 0..60 {
            let mut world = serving(config(3, true, strategy), false);
            let reply = world.control(Action::Restart, None);
            for _ in 0..k {
                world.step();
            }
            let written = world
                .host
                .lock()
                .unwrap()
                .written
                .clone()
                .unwrap_or_default();
            let answered_before = world.replies.contains_key(&reply);
            world.host.lock().unwrap().fail_store = true;
            let from = world.journal.len();
            world.step();
            let blocked = world.core.holds_unwritten();
            world.settle(WHILE_FULL);
            let row = format!("{strategy:?} after {k} events");
            assert!(world.violations.is_empty(), "{row}: {:?}", world.violations);
            let batch: BTreeSet<u32> = written
                .restart
                .as_ref()
                .filter(|m| !m.finished)
                .map(|m| m.in_flight().iter().copied().collect())
                .unwrap_or_default();
            for (_, effect) in &world.journal[from..] {
                let index = match effect {
                    super::core::Effect::Stop { index, .. }
                    | super::core::Effect::Spawn { index, .. }
                    | super::core::Effect::RestartSignal { index, .. } => *index,
                    _ => continue,
                };
                assert!(
                    batch.contains(&index),
                    "{row}: {effect:?} outside the written batch {batch:?}"
                );
            }
            if written.restart.is_some() && !answered_before {
                assert!(
                    !world.replies.contains_key(&reply),
                    "{row}: answered {:?} while its end could not be written",
                    world.replies.get(&reply)
                );
            }
            if blocked || world.core.holds_unwritten() {
                let status = world.core.status_at(super::core::Now::same(world.now));
                assert!(
                    status
                        .state_write_error
                        .as_deref()
                        .is_some_and(|e| e.contains("web.json")),
                    "{row}: status shows {:?}",
                    status.state_write_error
                );
            }
            // Space again: the retry writes the state and the restart goes on to its end.
            world.host.lock().unwrap().fail_store = false;
            world.settle(SETTLE);
            assert!(world.violations.is_empty(), "{row}: {:?}", world.violations);
            assert!(
                world.core.state.restart.is_none(),
                "{row}: a restart is left"
            );
            assert!(
                matches!(world.replies.get(&reply), Some(Ok(_))),
                "{row}: {:?}",
                world.replies.get(&reply)
            );
            assert_eq!(
                world
                    .core
                    .status_at(super::core::Now::same(world.now))
                    .state_write_error,
                None,
                "{row}"
            );
            assert_eq!(
                world
                    .host
                    .lock()
                    .unwrap()
                    .written
                    .as_ref()
                    .map(|s| s.restart.is_none()),
                Some(true),
                "{row}: the end is not written"
            );
        }
    }
}

/// Persist before act, for a deploy: `post_restart` (which prunes releases by the recorded
/// build) goes out only once the build the instances now run is written; a deploy whose restart
/// cannot be written fails naming the state file and nothing is restarted.
#[test]
fn a_deploy_records_its_build_before_post_restart_table() {
    let build_config = |mut config: ServiceConfig| {
        config.build = Some(
            serde_json::from_value(serde_json::json!({"source": "file:///builds/{build}.tar.gz"}))
                .unwrap(),
        );
        config
    };
    let post_restarts = |world: &World, from: usize, build: &str| {
        world.journal[from..]
            .iter()
            .filter(|(_, e)| {
                matches!(e, super::core::Effect::PostRestart { build: b, .. } if b == build)
            })
            .count()
    };
    for k in 0..40 {
        let mut world = World::new(build_config(config(2, true, StrategyName::Drain)), false, 7);
        world.handle(Event::Request(Request::Desired {
            build: Some("b1".into()),
        }));
        world.settle(SETTLE);
        assert_eq!(world.core.state.build.as_deref(), Some("b1"));
        let from = world.journal.len();
        world.handle(Event::Request(Request::Desired {
            build: Some("b2".into()),
        }));
        for _ in 0..k {
            world.step();
        }
        world.host.lock().unwrap().fail_store = true;
        let recorded = |world: &World| {
            world
                .host
                .lock()
                .unwrap()
                .written
                .as_ref()
                .and_then(|s| s.build.clone())
                == Some("b2".into())
        };
        let recorded_before = recorded(&world);
        let full_from = world.journal.len();
        world.settle(WHILE_FULL);
        let row = format!("b2 after {k} events");
        assert!(world.violations.is_empty(), "{row}: {:?}", world.violations);
        if !recorded_before {
            assert_eq!(
                post_restarts(&world, full_from, "b2"),
                0,
                "{row}: post_restart ran for a build not recorded"
            );
        }
        world.host.lock().unwrap().fail_store = false;
        world.settle(SETTLE);
        assert!(world.violations.is_empty(), "{row}: {:?}", world.violations);
        let status = world.core.status_at(super::core::Now::same(world.now));
        assert_eq!(status.state_write_error, None, "{row}");
        if world.core.state.failed.is_some() {
            // The disk filled before its restart was written: the deploy failed, naming the
            // file, and b1 still serves.
            let error = status.deploy_error.unwrap_or_default();
            assert!(error.contains("web.json"), "{row}: {error}");
            assert_eq!(world.core.state.build.as_deref(), Some("b1"), "{row}");
            assert_eq!(post_restarts(&world, from, "b2"), 0, "{row}");
        } else {
            assert!(recorded(&world), "{row}: b2 never recorded");
            assert_eq!(post_restarts(&world, from, "b2"), 1, "{row}");
            assert_eq!(status.deploy_error, None, "{row}");
        }
    }
}

/// A refused local deploy (its state cannot be written) changes nothing: the desired builds
/// stay as they were, also once later writes succeed.
#[test]
fn a_local_deploy_that_cannot_be_written_is_forgotten() {
    let mut world = serving(config(1, false, StrategyName::Rolling), false);
    world.host.lock().unwrap().fail_store = true;
    let reply = world.request(|reply| Request::Local {
        verb: super::LocalVerb::Deploy {
            build: "b9".into(),
            canary: false,
        },
        reply,
    });
    assert!(
        matches!(world.replies.get(&reply), Some(Err(e)) if e.contains("no space left on device")),
        "{:?}",
        world.replies.get(&reply)
    );
    assert_eq!(world.core.state.local.enabled, None);
    world.host.lock().unwrap().fail_store = false;
    world.settle(SETTLE);
    let written = world.host.lock().unwrap().written.clone().unwrap();
    assert_eq!(
        written.local.enabled, None,
        "the refused deploy was written later"
    );
    assert_eq!(
        world
            .core
            .status_at(super::core::Now::same(world.now))
            .state_write_error,
        None
    );
}

/// An invalid fleet limit reaches `status` (`slot_error`) and the host's status node
/// (`last_error`), naming the node, while the restart waits for a slot (issue 10).
#[test]
fn an_invalid_fleet_limit_is_shown_in_status_and_in_the_host_status() {
    let mut world = serving(config(2, true, StrategyName::Drain), true);
    world.faults.slot_refused = 1.0;
    let error = "node /services/web/restarting holds \"0\": max_hosts_restarting must be a whole \
                 number from 1 to 10000";
    world.handle(Event::Request(Request::SlotError(Some(error.into()))));
    let _reply = world.control(Action::Restart, None);
    for _ in 0..50 {
        world.now += 1_000;
        world.step();
    }
    assert_eq!(
        world
            .core
            .status_at(super::core::Now::same(world.now))
            .slot_error
            .as_deref(),
        Some(error)
    );
    let published = world
        .journal
        .iter()
        .rev()
        .find_map(|(_, e)| match e {
            super::core::Effect::PublishHostStatus(h) => Some(h.clone()),
            _ => None,
        })
        .expect("a host status was published");
    assert_eq!(published.last_error.as_deref(), Some(error));
    assert_eq!(published.state, crate::protocol::HostState::Waiting);
    world.handle(Event::Request(Request::SlotError(None)));
    assert_eq!(
        world
            .core
            .status_at(super::core::Now::same(world.now))
            .slot_error,
        None
    );
}

/// A restart's epochs continue after the previous restart's: each machine counts its steps from
/// its start, so without that the second restart's steps had the first's epochs, and a steering
/// bound the first set (`MachineSteerOver`, 30 s) could fire during the second's step of the same
/// rank and fail it (seen once in the nemesis, seed 2165655047: "web/0 could not be put back into
/// steering within restart.steer_timeout_ms (30000 ms)" 35 ms after the enable began).
#[test]
fn a_restart_never_reuses_an_earlier_restarts_epochs() {
    use super::core::Timer;
    let mut world = serving(config(2, true, StrategyName::Drain), false);
    let epochs = |world: &World, from: usize| -> Vec<u64> {
        world.journal[from..]
            .iter()
            .filter_map(|(_, e)| match e {
                Effect::SetTimer {
                    timer: Timer::MachineSteerOver { epoch, .. },
                    ..
                } => Some(*epoch),
                _ => None,
            })
            .collect()
    };
    let mut seen: Vec<Vec<u64>> = Vec::new();
    for _ in 0..2 {
        let from = world.journal.len();
        let reply = world.control(Action::Restart, None);
        world.settle(SETTLE);
        assert!(world.replies[&reply].is_ok(), "{:?}", world.replies[&reply]);
        let these = epochs(&world, from);
        assert!(!these.is_empty(), "a steered restart sets steering bounds");
        seen.push(these);
    }
    let first_max = seen[0].iter().max().unwrap();
    assert!(
        seen[1].iter().all(|e| e > first_max),
        "the second restart reused an epoch of the first: {seen:?}"
    );
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

/// Off the fleet, the enable of a drain batch takes the next batch out in the same transaction:
/// a restart of 3 instances one by one writes the chain 4 times, not 6, and no chain written
/// ever leaves out more than one instance. On the fleet backend the next batch waits for its
/// slot, so each batch keeps its own two transactions.
#[test]
fn the_enable_of_a_batch_takes_the_next_one_out_in_one_transaction() {
    for (fleet, want) in [(false, 4), (true, 6)] {
        let mut world = serving(changed(config(3, true, StrategyName::Drain)), fleet);
        let from = world.journal.len();
        let spawned: Vec<usize> = (0..3).map(|i| world.spawns(i)).collect();
        let reply = world.control(Action::Restart, None);
        world.settle(SETTLE);
        assert!(world.replies[&reply].is_ok(), "{:?}", world.replies[&reply]);
        let chains: Vec<BTreeSet<u32>> = world.journal[from..]
            .iter()
            .filter_map(|(_, e)| match e {
                Effect::ApplyChain { desired, .. } => Some(desired.clone()),
                _ => None,
            })
            .collect();
        let sets = |v: &[&[u32]]| -> Vec<BTreeSet<u32>> {
            v.iter().map(|s| s.iter().copied().collect()).collect()
        };
        let expected = if fleet {
            sets(&[
                &[1, 2],
                &[0, 1, 2],
                &[0, 2],
                &[0, 1, 2],
                &[0, 1],
                &[0, 1, 2],
            ])
        } else {
            sets(&[&[1, 2], &[0, 2], &[0, 1], &[0, 1, 2]])
        };
        assert_eq!(chains.len(), want, "fleet {fleet}: {chains:?}");
        assert_eq!(chains, expected, "fleet {fleet}");
        for (i, before) in spawned.iter().enumerate() {
            assert_eq!(
                world.spawns(i as u32),
                before + 1,
                "instance {i} restarted once"
            );
        }
        // Each batch's drain wait begins as soon as the chain without it is in (and its step
        // written), not at some later event: the world answers an effect within 200 ms.
        for i in 0..3u32 {
            let journal = &world.journal[from..];
            let out_at = journal
                .iter()
                .find_map(|(t, e)| match e {
                    Effect::ApplyChain { desired, .. } if !desired.contains(&i) => Some(*t),
                    _ => None,
                })
                .expect("a chain without the instance");
            let drain_at = journal
                .iter()
                .find_map(|(t, e)| match e {
                    Effect::AwaitDrain { index, .. } if *index == i => Some(*t),
                    _ => None,
                })
                .expect("a drain wait");
            assert!(
                drain_at - out_at < 1_000,
                "fleet {fleet}: instance {i} out of the chain at {out_at} ms, its drain began at {drain_at} ms"
            );
        }
        assert!(world.violations.is_empty(), "{:?}", world.violations);
    }
}

/// The host's cgroups as the core sees them (it never touches them: the executor does).
fn cgroups(version: super::cgroup::Version) -> super::cgroup::Detected {
    super::cgroup::Detected::Ready(super::cgroup::Cgroups {
        version,
        root: "/sys/fs/cgroup/cpu/sluice".into(),
        home: "/sys/fs/cgroup/cpu".into(),
    })
}

/// Positions in the journal of the first `LowerRunning` and `Stop` of `index` after `from`.
fn lower_and_stop(world: &World, index: u32, from: usize) -> (Option<usize>, Option<usize>) {
    let find = |want: fn(&Effect, u32) -> bool| {
        world.journal[from..]
            .iter()
            .position(|(_, e)| want(e, index))
            .map(|p| p + from)
    };
    (
        find(|e, i| matches!(e, Effect::LowerRunning { index, .. } if *index == i)),
        find(|e, i| matches!(e, Effect::Stop { index, .. } if *index == i)),
    )
}

/// A drain restart's stop runs at the low weight only when no steered client can reach the
/// instance any more (its drain ended with no connection left) and a sibling serves; the move comes before the
/// stop's signal, names the process, and only cgroup v1 moves running processes.
#[test]
fn a_stop_runs_low_only_after_a_drain_that_left_no_connection() {
    use super::cgroup::Version;
    use sluice_strategies::drain::Ending;
    let rows: &[(&str, u32, Ending, Version, bool, bool)] = &[
        (
            "closed, a sibling serves",
            3,
            Ending::Closed,
            Version::V1,
            true,
            true,
        ),
        (
            "idle: kept-alive connections left",
            3,
            Ending::Idle,
            Version::V1,
            true,
            false,
        ),
        (
            "timeout: requests maybe in flight",
            3,
            Ending::Timeout,
            Version::V1,
            true,
            false,
        ),
        (
            "closed, but nothing else serves",
            1,
            Ending::Closed,
            Version::V1,
            true,
            false,
        ),
        (
            "closed, cgroup v2",
            3,
            Ending::Closed,
            Version::V2,
            true,
            false,
        ),
        (
            "closed, cpu isolation off",
            3,
            Ending::Closed,
            Version::V1,
            false,
            false,
        ),
    ];
    for &(name, instances, ending, version, isolation, low) in rows {
        let mut config = config(instances, true, StrategyName::Drain);
        config.restart.cpu_isolation = isolation;
        let mut world = serving(config, false);
        world.core.cgroups = cgroups(version);
        world.drain_ending = ending;
        let from = world.journal.len();
        world.control(Action::Restart, None);
        world.settle(SETTLE);
        for i in 0..instances {
            let (lower, stop) = lower_and_stop(&world, i, from);
            let stop = stop.unwrap_or_else(|| panic!("{name}: instance {i} stopped"));
            match lower {
                Some(lower) => {
                    assert!(low, "{name}: instance {i} moved to the low weight");
                    assert!(
                        lower < stop,
                        "{name}: instance {i}: the move before the signal"
                    );
                    let Effect::LowerRunning { dir, pid, .. } = &world.journal[lower].1 else {
                        unreachable!("found as LowerRunning");
                    };
                    assert_eq!(
                        dir,
                        &std::path::PathBuf::from(format!("/sys/fs/cgroup/cpu/sluice/web@{i}"))
                    );
                    assert_eq!(*pid, 200 + i, "{name}: the old process");
                }
                None => assert!(!low, "{name}: instance {i} not moved to the low weight"),
            }
        }
        assert!(
            world.violations.is_empty(),
            "{name}: {:?}",
            world.violations
        );
        assert!(
            world
                .core
                .instances
                .values()
                .all(|i| i.phase == Phase::Running && i.healthy),
            "{name}: the restart completes"
        );
    }
}

/// The low phase of a stop is bounded by half of `stop_grace_ms` (and `cpu_low_max_ms`): a stop
/// that has not ended by then leaves its cgroup and finishes at the normal weight before its kill.
#[test]
fn a_stop_leaves_the_low_weight_at_half_its_grace() {
    let mut config = config(2, true, StrategyName::Drain);
    config.stop_grace_ms = 4_000;
    let mut world = serving(config, false);
    world.core.cgroups = cgroups(super::cgroup::Version::V1);
    world.drain_ending = sluice_strategies::drain::Ending::Closed;
    world.stop_ms = Some(3_000);
    let from = world.journal.len();
    world.control(Action::Restart, None);
    world.settle(SETTLE);
    let (lower, stop) = lower_and_stop(&world, 0, from);
    let (lower, stop) = (lower.expect("moved low"), stop.expect("stopped"));
    let stopped_at = world.journal[stop].0;
    let removed = world.journal[lower..]
        .iter()
        .find(|(_, e)| matches!(e, Effect::RemoveCgroup { index: 0, .. }))
        .map(|(at, _)| *at)
        .expect("the cgroup is left while the stop goes on");
    assert_eq!(
        removed - stopped_at,
        2_000,
        "half of stop_grace_ms after the stop"
    );
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

/// The later batches of a restart compare with the sibling sample an earlier batch met, instead
/// of each sending a sample to an instance that serves clients: within `sibling_reuse_ms`, for the
/// same version, and only while the instances warmed against it meet it.
#[test]
fn a_met_sibling_sample_is_reused_by_the_next_batches_table() {
    use super::warmup::SiblingBar;
    use sluice_strategies::warmup::Ending::{MaxDuration, Sibling};
    /// What a warm-up was sent: a sibling to measure (its index), or a sample reused (its index).
    #[derive(Debug, PartialEq)]
    enum Bar {
        Measure(u32),
        Reuse(u32),
    }
    use Bar::{Measure, Reuse};
    let rows: &[(&str, u64, &[Option<_>], &[Bar])] = &[
        (
            "each met: the first batch's sample serves the rest",
            60_000,
            &[Some(Sibling); 4],
            &[Measure(1), Reuse(1), Reuse(1), Reuse(1)],
        ),
        (
            "one ran to max_duration_ms: the next batch measures again",
            60_000,
            &[
                Some(Sibling),
                Some(MaxDuration),
                Some(Sibling),
                Some(Sibling),
            ],
            &[Measure(1), Reuse(1), Measure(0), Reuse(0)],
        ),
        (
            "reuse off",
            0,
            &[Some(Sibling); 4],
            &[Measure(1), Measure(0), Measure(0), Measure(0)],
        ),
        (
            "older than the bound",
            1,
            &[Some(Sibling); 4],
            &[Measure(1), Measure(0), Measure(0), Measure(0)],
        ),
        (
            "a failed warm-up: the rollback measures the old version anew",
            60_000,
            &[Some(Sibling), None, Some(Sibling)],
            &[Measure(1), Reuse(1), Measure(0)],
        ),
    ];
    for &(name, reuse_ms, endings, want) in rows {
        let mut config = config(4, true, StrategyName::Drain);
        config.warmup = Some(
            toml::from_str(&format!(
                "requests = [\"GET /\"]\nsibling_reuse_ms = {reuse_ms}"
            ))
            .unwrap(),
        );
        let mut world = serving(config.clone(), false);
        world.warm_endings = endings.iter().copied().collect();
        world.core.config = changed(config);
        let from = world.journal.len();
        world.control(Action::Restart, None);
        world.settle(SETTLE);
        let bars: Vec<_> = world.journal[from..]
            .iter()
            .filter_map(|(at, e)| match e {
                Effect::WarmUp { sibling, .. } => Some((*at, sibling.clone())),
                _ => None,
            })
            .collect();
        let got: Vec<Bar> = bars
            .iter()
            .map(|(_, bar)| match bar {
                SiblingBar::Measure(s) => Measure(s.index),
                SiblingBar::Reuse { index, .. } => Reuse(*index),
                SiblingBar::Missing(why) => panic!("{name}: no sibling: {why}"),
            })
            .collect();
        assert_eq!(got, want, "{name}");
        // A reused sample's age is the time since the warm-up that measured it began.
        let mut measured_at = None;
        for (at, bar) in &bars {
            match bar {
                SiblingBar::Measure(_) => measured_at = Some(*at),
                SiblingBar::Reuse { age_ms, .. } => {
                    let measured_at = measured_at.expect("a sample before its reuse");
                    assert_eq!(*age_ms, at - measured_at, "{name}");
                    assert!(*age_ms <= reuse_ms, "{name}");
                }
                SiblingBar::Missing(_) => {}
            }
        }
        assert!(world.warm_endings.is_empty(), "{name}: every ending used");
        assert!(
            world.violations.is_empty(),
            "{name}: {:?}",
            world.violations
        );
    }
}
