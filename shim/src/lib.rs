//! `sluice-shim`: the per-instance parent process of one supervised service instance.
//!
//! The shim outlives the brain (the `sluice` daemon): it holds the child's log pipes and writes
//! size-rotated log files, reaps the child, keeps its exit status until the brain collects it, and
//! answers on a unix socket. Model: containerd-shim, conmon, s6-supervise.
//!
//! Codemap:
//! - [`proto`]: the wire protocol (handshake, commands, status lines); std only, used by the brain too.
//! - [`args`]: the command line ([`args::ShimArgs`]), built by the brain and parsed here.
//! - `startup`: fork away from the brain, take the instance lock, bind the socket, spawn, handshake.
//! - `child`: spawning the child (process group, cgroup, parent-death signal; the signal reset,
//!   limits and credentials are `sluice-privdrop`'s, shared with the hooks).
//! - `event_loop`: the single-threaded `poll` loop that owns all state after start-up.
//! - `logfile`: append with size-based rotation, through `sluice-safefs` (the log directory may be
//!   the service user's).
//! - `tree`: the instance's whole process tree, found through its tracking cgroup (or the shim's
//!   session) and killed through pidfds.
//! - `sys`: the few libc wrappers std lacks.
//!
//! Architecture Invariant: std and libc only (plus `sluice-safefs`, itself std and libc only), one thread, no async runtime — a hundred shims must cost
//! little memory and must not depend on anything the brain depends on.

pub mod args;
pub mod proto;

mod child;
mod event_loop;
mod logfile;
#[doc(hidden)]
pub mod startup;
mod sys;
mod tree;

/// The parent of a process, from the shim's own `/proc/<pid>/stat` reader (the brain checks
/// that a pid is still its shim's child before it walks the pid's descendants).
pub use tree::parent_of;
