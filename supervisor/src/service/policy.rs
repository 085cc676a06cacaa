//! What happens after an instance exits on its own: restart after a delay, stay exited, or give up.
//!
//! A pure function of the configuration, the exit and the history, so a table tests it.

use crate::config::{Autorestart, ServiceConfig};
use sluice_shim::proto::Outcome;

/// The decision after an exit that nobody asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start again after this many milliseconds.
    Restart { delay_ms: u64 },
    /// Leave it down; `exited` in status.
    Exited,
    /// Too many failed starts in a row; `fatal`, never restarted automatically.
    Fatal,
}

/// Decides what to do after an exit. `ran_ms` is how long the instance ran; `failures` the
/// failed starts in a row before this exit. Returns the decision and the new failure count.
pub fn on_exit(
    config: &ServiceConfig,
    outcome: Option<Outcome>,
    ran_ms: u64,
    failures: u32,
) -> (Decision, u32) {
    let success =
        matches!(outcome, Some(Outcome::Code(code)) if config.success_exit_codes.contains(&code));
    match config.autorestart {
        Autorestart::Never => return (Decision::Exited, 0),
        Autorestart::OnFailure if success => return (Decision::Exited, 0),
        _ => {}
    }
    if ran_ms >= config.startup_ms {
        // It had started properly: restart at once, and forget earlier failures.
        return (Decision::Restart { delay_ms: 0 }, 0);
    }
    let failures = failures + 1;
    if failures > config.start_retries {
        return (Decision::Fatal, failures);
    }
    (
        Decision::Restart {
            delay_ms: backoff_ms(config, failures),
        },
        failures,
    )
}

/// Delay before the next start after `failures` failed starts in a row: doubling, capped.
pub fn backoff_ms(config: &ServiceConfig, failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(32);
    config
        .backoff_initial_ms
        .saturating_mul(1u64 << doublings)
        .min(config.backoff_max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(policy: Autorestart) -> ServiceConfig {
        let mut c = ServiceConfig::with_command(vec!["x".into()]);
        c.autorestart = policy;
        c.startup_ms = 1000;
        c.start_retries = 3;
        c.backoff_initial_ms = 100;
        c.backoff_max_ms = 350;
        c
    }

    #[test]
    fn decisions() {
        use Autorestart::*;
        use Decision::*;
        let code = |c| Some(Outcome::Code(c));
        let sig = |s| Some(Outcome::Signal(s));
        #[rustfmt::skip]
        type Case = (Autorestart, Option<Outcome>, u64, u32, Decision, u32);
        let table: &[Case] = &[
            // policy,  exit,     ran_ms, failures -> decision, failures
            (Always, code(0), 5000, 2, Restart { delay_ms: 0 }, 0),
            (Always, sig(9), 5000, 0, Restart { delay_ms: 0 }, 0),
            (Always, code(1), 10, 0, Restart { delay_ms: 100 }, 1),
            (Always, code(1), 10, 1, Restart { delay_ms: 200 }, 2),
            (Always, code(1), 10, 2, Restart { delay_ms: 350 }, 3),
            (Always, code(1), 10, 3, Fatal, 4),
            (Always, None, 5000, 0, Restart { delay_ms: 0 }, 0),
            (OnFailure, code(0), 10, 0, Exited, 0),
            (OnFailure, code(2), 5000, 0, Restart { delay_ms: 0 }, 0),
            (OnFailure, sig(15), 10, 3, Fatal, 4),
            (Never, code(1), 10, 0, Exited, 0),
            (Never, code(0), 5000, 0, Exited, 0),
        ];
        for (policy, outcome, ran, failures, want, want_failures) in table {
            let got = on_exit(&config(*policy), *outcome, *ran, *failures);
            assert_eq!(
                got,
                (*want, *want_failures),
                "{policy:?} {outcome:?} ran {ran} failures {failures}"
            );
        }
    }

    #[test]
    fn backoff_saturates() {
        let c = config(Autorestart::Always);
        assert_eq!(backoff_ms(&c, u32::MAX), 350);
    }
}
