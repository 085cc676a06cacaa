//! sluice: a host daemon that supervises several instances of each service through per-instance
//! shims, so the daemon itself can crash and restart without any instance noticing.
//!
//! The `sluice` binary only calls [`cli::main`], which parses arguments and runs the verb; `sluice
//! run` executes the `sluiced` binary, which only calls [`cli::daemon_main`] (the daemon alone).
//!
//! Layers, each using only those below it: [`cli`] (the command line) → [`daemon`] (the loop) →
//! [`service`] (one task per service) → [`control`]'s protocol and the adapters; the control
//! server ([`control::server`]) asks the daemon loop through [`control::queue`] and never names it.

pub mod build;
pub mod cli;
pub mod clip;
pub mod config;
pub mod control;
pub mod coord;
pub mod daemon;
pub mod metrics;
pub mod service;
pub mod supervisord;

/// The documents of the control API, also what services publish: [`control::protocol`].
pub use control::protocol;

/// Exit codes of the `sluice` command, documented in the README. A control request's error picks
/// its code by kind ([`control::ErrorKind::exit_code`]).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The operation failed (the daemon said why).
    pub const FAILED: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// The configuration is invalid; nothing was started or changed.
    pub const CONFIG: i32 = 3;
    /// The daemon could not be reached on its control socket, or did not answer within the
    /// request's bound (`--timeout-ms`).
    pub const UNREACHABLE: i32 = 4;
    /// The daemon stopped every instance on `sluice shutdown` and exited; systemd must not
    /// restart it (`RestartPreventExitStatus=`).
    pub const SHUT_DOWN: i32 = 10;
    /// The daemon panicked (a broken invariant) and exited; systemd restarts it.
    pub const PANIC: i32 = 101;
}
