//! sluice: a host daemon that supervises several instances of each service through per-instance
//! shims, so the daemon itself can crash and restart without any instance noticing.
//!
//! The `sluice` binary only parses arguments and calls [`cli::main`].

pub mod api;
pub mod build;
pub mod cgroup;
pub mod cli;
pub mod client;
pub mod clip;
pub mod config;
pub mod coord;
pub mod daemon;
pub mod drain;
pub mod fleet_cli;
pub mod health;
pub mod notify;
pub mod policy;
pub mod protocol;
pub mod service;
pub mod shim;
pub mod spec;
pub mod state;
pub mod supervisord;
pub mod warmup;

/// Exit codes of the `sluice` command, documented in the README.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The operation failed (the daemon said why).
    pub const FAILED: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// The configuration is invalid; nothing was started or changed.
    pub const CONFIG: i32 = 3;
    /// The daemon could not be reached on its control socket.
    pub const UNREACHABLE: i32 = 4;
    /// The daemon stopped every instance on `sluice shutdown` and exited; systemd must not
    /// restart it (`RestartPreventExitStatus=`).
    pub const SHUT_DOWN: i32 = 10;
    /// The daemon panicked (a broken invariant) and exited; systemd restarts it.
    pub const PANIC: i32 = 101;
}
