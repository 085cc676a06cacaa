//! How sluice restarts a service without clients noticing: which instances go together
//! ([`plan`]), the order of steps of a batch and what to do when one fails ([`restart`]), when a
//! warm-up has done its job ([`warmup`]), when a drained instance may be stopped ([`drain`]), and the iptables chain that steers a service's front port
//! over its enabled instances ([`steering`]), and whether a canary is good ([`canary`]).
//!
//! Architecture Invariant: everything here but [`steering::Iptables`] is free of I/O and of clocks:
//! decisions take events and return actions, so tables and a seeded simulation test them.
//! Architecture Invariant: only this crate writes iptables rules.

pub mod canary;
pub mod drain;
pub mod plan;
pub mod restart;
pub mod steering;
pub mod warmup;
