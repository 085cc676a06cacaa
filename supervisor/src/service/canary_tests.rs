//! The core's canary flow in virtual time: a canary host restarts onto the canary build, bakes
//! against a prod host's published samples and judges — fail and roll back, pass and promote,
//! too little traffic and hold, a crash that fails at once — with the samples answered here.

use super::canary::{CanaryEvent, CanaryView, CanaryWrite, Figures, InstanceFigures};
use super::core::{Effect, Event, Phase, Request};
use super::testkit::{World, config};
use crate::config::{CanaryConfig, ServiceConfig, StrategyName};
use crate::protocol::{CanaryAction, CanaryOutcome};

const SETTLE: usize = 5_000;
const BAKE_MS: u64 = 10_000;
const INTERVAL_MS: u64 = 1_000;

/// Requests per second on each side, and the share of them that fail.
#[derive(Clone, Copy)]
struct Traffic {
    rate_per_s: u64,
    error_pct: u64,
    /// Seconds of latency every request takes.
    latency_s: f64,
}

fn canary_config(on_pass: &str) -> ServiceConfig {
    let mut c = config(2, true, StrategyName::Drain);
    c.build = Some(
        serde_json::from_value(serde_json::json!({"source": "file:///builds/{build}.tar.gz"}))
            .unwrap(),
    );
    let canary: CanaryConfig = toml::from_str(&format!(
        "metrics = \"/metrics\"\nbake_ms = {BAKE_MS}\nsample_interval_ms = {INTERVAL_MS}\nmin_requests = 50\non_pass = \"{on_pass}\""
    ))
    .unwrap();
    c.canary = Some(canary);
    c
}

/// Cumulative `/metrics` figures of one instance after `seconds` of `traffic`.
fn figures(traffic: Traffic, seconds: u64) -> Figures {
    let requests = traffic.rate_per_s * seconds;
    let buckets = [0.01, 0.1, 1.0, f64::INFINITY]
        .iter()
        .map(|&le| (le, if traffic.latency_s <= le { requests } else { 0 }))
        .collect();
    Figures {
        requests,
        errors: requests * traffic.error_pct / 100,
        buckets,
    }
}

/// The prod host's status node with its sample after `seconds` of `traffic` on 2 instances.
fn prod_node(traffic: Traffic, seconds: u64) -> Vec<u8> {
    let f = figures(traffic, seconds);
    let buckets: Vec<serde_json::Value> = f
        .buckets
        .iter()
        .map(|&(le, c)| {
            let le = if le.is_finite() {
                serde_json::json!(le)
            } else {
                serde_json::json!("+Inf")
            };
            serde_json::json!([le, c * 2])
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "host": "host-b", "state": "serving", "build": "b1",
        "canary_sample": {"build": "b1", "since_ms": 5, "instances": 2, "crashes": 0,
            "liveness_failures": 0, "requests": f.requests * 2, "errors": f.errors * 2,
            "latency_buckets": buckets}
    }))
    .unwrap()
}

/// A canary host serving b1 whose canary b2 is in flight: it deploys b2, then its samples are
/// answered (with `canary` traffic for itself, `prod` for host-b) until it judges or `rounds`
/// samples went by. `crash_at` crashes instance 0 at that sample of the bake.
fn bake(on_pass: &str, canary: Traffic, prod: Traffic, crash_at: Option<usize>) -> World {
    let mut world = World::new(canary_config(on_pass), true, 7);
    world.handle(Event::Request(Request::Connection(true)));
    world.handle(Event::Request(Request::Desired {
        build: Some("b1".into()),
    }));
    world.settle(SETTLE);
    assert_eq!(world.core.state.build.as_deref(), Some("b1"));
    world.handle(Event::Request(Request::CanaryView(CanaryView {
        enabled: Some("b1".into()),
        canary: Some("b2".into()),
        canary_role: true,
    })));
    world.handle(Event::Request(Request::Desired {
        build: Some("b2".into()),
    }));
    let mut answered = 0;
    let mut bake_samples = 0usize;
    for _ in 0..200 {
        world.settle(SETTLE);
        // The newest sample asked for: an older one of a series that ended would be dropped.
        let Some((epoch, peers)) = world
            .journal
            .iter()
            .skip(answered)
            .rev()
            .find_map(|(_, e)| match e {
                Effect::CanarySample { epoch, peers, .. } => Some((*epoch, *peers)),
                _ => None,
            })
        else {
            break;
        };
        answered = world.journal.len();
        let judged = world
            .core
            .canary
            .status
            .as_ref()
            .is_some_and(|s| s.judged_ms.is_some());
        if judged {
            break;
        }
        let seconds = bake_samples as u64;
        if peers {
            bake_samples += 1;
            if crash_at == Some(bake_samples) {
                world.crash(0);
                world.settle(SETTLE);
            }
        }
        let instances = world
            .core
            .instances
            .values()
            .filter(|i| i.phase == Phase::Running)
            .map(|i| InstanceFigures {
                index: i.index,
                pid: i.shim.as_ref().map(|s| s.pid),
                result: Ok(figures(canary, seconds + 1)),
            })
            .collect();
        let peers = peers.then(|| Ok(vec![("host-b".to_owned(), prod_node(prod, seconds + 1))]));
        world.handle(Event::Canary(CanaryEvent::Sampled {
            epoch,
            instances,
            peers,
        }));
    }
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    world
}

fn writes(world: &World) -> Vec<(String, CanaryWrite)> {
    world
        .journal
        .iter()
        .filter_map(|(_, e)| match e {
            Effect::CanaryWrite { build, write } => Some((build.clone(), *write)),
            _ => None,
        })
        .collect()
}

const GOOD: Traffic = Traffic {
    rate_per_s: 20,
    error_pct: 0,
    latency_s: 0.005,
};

#[test]
fn a_canary_host_judges_itself_table() {
    let bad = Traffic {
        error_pct: 20,
        ..GOOD
    };
    let slow = Traffic {
        latency_s: 0.5,
        ..GOOD
    };
    let idle = Traffic {
        rate_per_s: 1,
        ..GOOD
    };
    let cases = [
        (
            "5xx",
            "promote",
            bad,
            GOOD,
            None,
            CanaryOutcome::Fail,
            Some(CanaryWrite::Clear),
            None,
        ),
        (
            "slow",
            "promote",
            slow,
            GOOD,
            None,
            CanaryOutcome::Fail,
            Some(CanaryWrite::Clear),
            None,
        ),
        (
            "good",
            "promote",
            GOOD,
            GOOD,
            None,
            CanaryOutcome::Pass,
            Some(CanaryWrite::Promote),
            None,
        ),
        (
            "good, wait",
            "wait",
            GOOD,
            GOOD,
            None,
            CanaryOutcome::Pass,
            None,
            Some(CanaryAction::Waiting),
        ),
        (
            "idle",
            "promote",
            idle,
            idle,
            None,
            CanaryOutcome::Inconclusive,
            None,
            Some(CanaryAction::Held),
        ),
        (
            "crash",
            "promote",
            GOOD,
            GOOD,
            Some(2),
            CanaryOutcome::Fail,
            Some(CanaryWrite::Clear),
            None,
        ),
    ];
    for (row, on_pass, canary, prod, crash_at, outcome, write, action) in cases {
        let world = bake(on_pass, canary, prod, crash_at);
        let status = world
            .core
            .canary
            .status
            .clone()
            .unwrap_or_else(|| panic!("{row}: no verdict"));
        assert_eq!(status.outcome, outcome, "{row}: {status:?}");
        assert_eq!(status.build, "b2", "{row}");
        assert_eq!(status.baseline_hosts, ["host-b"], "{row}: {status:?}");
        let judged_after = status.judged_ms.unwrap() - status.started_ms.unwrap();
        if crash_at.is_some() {
            assert!(
                judged_after < BAKE_MS,
                "{row}: a crash fails before the bake ends"
            );
        } else {
            assert!(
                judged_after >= BAKE_MS,
                "{row}: judged after {judged_after} ms"
            );
        }
        assert_eq!(
            writes(&world),
            write
                .map(|w| ("b2".to_owned(), w))
                .into_iter()
                .collect::<Vec<_>>(),
            "{row}"
        );
        assert_eq!(status.action, action, "{row}");
        assert!(
            !status.reasons.is_empty() || outcome == CanaryOutcome::Pass,
            "{row}"
        );
        // The host status node and the service status carry it.
        let published = world.core.status_at(super::core::Now::same(world.now));
        assert_eq!(
            published.canary.as_ref().map(|c| c.outcome),
            Some(outcome),
            "{row}"
        );
    }
}

#[test]
fn actions_are_recorded_and_late_samples_dropped() {
    let bad = Traffic {
        error_pct: 20,
        ..GOOD
    };
    let mut world = bake("promote", bad, GOOD, None);
    let records = |world: &World| {
        world
            .journal
            .iter()
            .filter(|(_, e)| matches!(e, Effect::CanaryRecord { .. }))
            .count()
    };
    assert_eq!(records(&world), 0, "recorded once the action is known");
    world.handle(Event::Canary(CanaryEvent::Acted {
        build: "b2".into(),
        result: Ok(CanaryAction::RolledBack),
    }));
    let status = world.core.canary.status.clone().unwrap();
    assert_eq!(status.action, Some(CanaryAction::RolledBack));
    assert_eq!(records(&world), 1);
    // The canary is cleared: every host stops sampling; a late sample is dropped.
    world.handle(Event::Request(Request::CanaryView(CanaryView {
        enabled: Some("b1".into()),
        canary: None,
        canary_role: true,
    })));
    assert!(world.core.canary_sample().is_none());
    let from = world.journal.len();
    world.handle(Event::Canary(CanaryEvent::Sampled {
        epoch: 1,
        instances: Vec::new(),
        peers: None,
    }));
    assert!(
        !world.journal[from..].iter().any(|(_, e)| matches!(
            e,
            Effect::SetTimer {
                timer: super::core::Timer::CanarySample { .. },
                ..
            }
        )),
        "a late sample arms no timer"
    );
    // The verdict stays shown.
    assert_eq!(
        world.core.canary.status.as_ref().map(|s| s.outcome),
        Some(CanaryOutcome::Fail)
    );
}

/// Another canary host promoted the build mid-bake: this host's unfinished bake shows nothing.
#[test]
fn a_bake_cut_short_shows_no_verdict() {
    let mut world = World::new(canary_config("promote"), true, 7);
    world.handle(Event::Request(Request::Connection(true)));
    world.handle(Event::Request(Request::Desired {
        build: Some("b2".into()),
    }));
    world.settle(SETTLE);
    world.handle(Event::Request(Request::CanaryView(CanaryView {
        enabled: Some("b1".into()),
        canary: Some("b2".into()),
        canary_role: true,
    })));
    world.settle(SETTLE);
    assert_eq!(
        world.core.canary.status.as_ref().map(|s| s.outcome),
        Some(CanaryOutcome::Baking)
    );
    world.handle(Event::Request(Request::CanaryView(CanaryView {
        enabled: Some("b2".into()),
        canary: Some("b2".into()),
        canary_role: true,
    })));
    assert!(world.core.canary.status.is_none());
    assert!(world.core.canary_sample().is_none(), "nothing in flight");
}

#[test]
fn prod_hosts_sample_and_publish_while_a_canary_is_in_flight() {
    let mut world = World::new(canary_config("wait"), true, 7);
    world.handle(Event::Request(Request::Connection(true)));
    world.handle(Event::Request(Request::Desired {
        build: Some("b1".into()),
    }));
    world.settle(SETTLE);
    assert!(world.core.canary_sample().is_none(), "no canary in flight");
    world.handle(Event::Request(Request::CanaryView(CanaryView {
        enabled: Some("b1".into()),
        canary: Some("b2".into()),
        canary_role: false,
    })));
    world.settle(SETTLE);
    let epoch = world
        .journal
        .iter()
        .find_map(|(_, e)| match e {
            Effect::CanarySample { epoch, peers, .. } => {
                assert!(!peers, "a prod host reads no peers");
                Some(*epoch)
            }
            _ => None,
        })
        .expect("a prod host samples");
    for seconds in [1, 3] {
        let instances = (0..2)
            .map(|index| InstanceFigures {
                index,
                pid: Some(200 + index),
                result: Ok(figures(GOOD, seconds)),
            })
            .collect();
        world.handle(Event::Canary(CanaryEvent::Sampled {
            epoch,
            instances,
            peers: None,
        }));
    }
    let sample = world.core.canary_sample().unwrap();
    assert_eq!(sample.build, "b1");
    // The first sample is the start: only the growth since counts.
    assert_eq!(sample.requests, 2 * GOOD.rate_per_s * 2);
    let published = world
        .journal
        .iter()
        .rev()
        .find_map(|(_, e)| match e {
            Effect::PublishHostStatus(h) => Some(h.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(published.canary_sample.unwrap().requests, sample.requests);
    assert!(published.canary.is_none(), "a prod host judges nothing");
}
