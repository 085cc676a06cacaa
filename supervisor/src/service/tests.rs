//! Unit tests of the service core: the invariants as tables, driven in virtual time through
//! [`World`] (no root, network namespace or ZooKeeper), and the log directory's link refusal.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;

use sluice_strategies::restart::{self, Restart, Strategy};

use super::core::{Event, InstanceEvent, Phase, Request};
use super::testkit::{World, config};
use super::{Action, make_log_dir};
use crate::config::{HealthConfig, ServiceConfig, StrategyName};

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
/// is a panic.
#[test]
#[should_panic(expected = "before the machine was persisted")]
fn a_restart_action_before_its_write_panics() {
    let mut world = serving(config(2, false, StrategyName::Rolling), false);
    let mut machine = Restart::new(Strategy::Rolling, false, vec![vec![0]]);
    let actions = machine.resume();
    world.core.state.restart = Some(machine);
    world.core.machine_changed();
    world.core.execute(actions);
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
        world.core.status(world.now).slot_error.as_deref(),
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
    assert_eq!(world.core.status(world.now).slot_error, None);
}
