//! The end-to-end tests of sluice: one binary that runs the real `sluice` daemon, CLI and shims
//! through the harness in `sluice_tests` (build the binaries first: `cargo build --workspace`).
//!
//! Each scenario lives in its own module under `e2e/`; every test has its own temp dir and daemon,
//! so nextest runs them in parallel.

mod e2e {
    mod archive_bombs;
    mod blocking;
    mod canary;
    mod cgroup;
    mod clock;
    mod control;
    mod deploy;
    mod deploy_wait;
    mod disk_full;
    mod drain;
    mod identity;
    mod import;
    mod kill9;
    mod links;
    mod logs;
    mod matrix;
    mod metrics;
    mod nemesis;
    mod notify;
    mod peers;
    mod reload;
    mod restart_policy;
    mod shutdown;
    mod state;
    mod steering;
    mod stop;
    mod store_reader;
    mod symlinks;
    mod systemd_unit;
    mod tree;
    mod warmup;
    mod watch;
    mod zk_authority;
}
