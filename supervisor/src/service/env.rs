//! The core's synchronous view of the host: the few answers it needs while it decides (writing the
//! desired state, building an instance's launch spec, which releases exist, who hooks run as, whether
//! the fleet slot still holds). A trait, so that the unit tests and the simulation give the real core
//! a host made of plain values; [`HostEnv`] is the daemon's.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::build::Releases;
use crate::config::{HostConfig, ServiceConfig};
use crate::coord::Slot;
use crate::service::spec::{Identity, InstanceSpec};
use crate::service::state::{self, ServiceState};

/// What the core asks of the host while it decides. Every answer is immediate (no waiting on the
/// network or on a child): slow work is an [`super::core::Effect`].
pub trait Env: Send {
    /// Writes the desired state (write, fsync, rename, fsync dir) before the core acts on it.
    fn store(&mut self, state: &ServiceState) -> Result<(), String>;
    /// Reads the state file again (`sluice reload` of a service in `state_error`); one that
    /// still cannot be read is set aside again (see [`state::load_or_set_aside`]).
    fn load_state(&mut self) -> state::Loaded;
    /// The launch spec of one instance of `config`, running from `release` (resolves the program
    /// in PATH and the service's user).
    fn spec(
        &self,
        config: &ServiceConfig,
        index: u32,
        release: Option<&std::path::Path>,
    ) -> Result<InstanceSpec, String>;
    /// The release `data_dir/<service>/current` points to, if any.
    fn current_release(&self) -> Option<PathBuf>;
    /// The release directory of `build`, when it is installed.
    fn installed_release(&self, build: &str) -> Option<PathBuf>;
    /// Who the service's hooks run as (see `spec::identity`).
    fn identity(&self, config: &ServiceConfig) -> Result<Identity, String>;
    /// The cgroup an earlier daemon made for `index`, if it is still there.
    fn existing_cgroup(&self, index: u32) -> Option<PathBuf>;
    /// Whether the fleet slot this host holds is still its own (its ZooKeeper session lives).
    fn slot_valid(&self) -> bool;
}

/// The daemon's host: the state file, the real spec and user lookups, the release store, and the
/// slot the executor holds.
pub struct HostEnv {
    pub host: HostConfig,
    pub name: String,
    pub state_path: PathBuf,
    pub cgroups: crate::service::cgroup::Detected,
    /// Shared with the executor, which acquires and releases it.
    pub slot: Arc<Mutex<Option<Slot>>>,
}

impl Env for HostEnv {
    fn store(&mut self, state: &ServiceState) -> Result<(), String> {
        // The core needs the outcome in this step (persist before act), so the service task waits
        // for the fsyncs; `block_in_place` first hands the worker's other tasks (other services,
        // the control API) to another thread, so only this service waits. A current-thread
        // runtime (unit tests) cannot hand them over and writes in place.
        let write = || state::store(&self.state_path, state).map_err(|e| e.to_string());
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(write),
            _ => write(),
        }
    }

    fn load_state(&mut self) -> state::Loaded {
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        state::load_or_set_aside(&self.state_path, &self.name, now_s)
    }

    fn spec(
        &self,
        config: &ServiceConfig,
        index: u32,
        release: Option<&std::path::Path>,
    ) -> Result<InstanceSpec, String> {
        InstanceSpec::build(&self.host, &self.name, config, index, release)
    }

    fn current_release(&self) -> Option<PathBuf> {
        std::fs::canonicalize(self.host.data_dir.join(&self.name).join("current")).ok()
    }

    fn installed_release(&self, build: &str) -> Option<PathBuf> {
        let dir = Releases::new(&self.host.data_dir, &self.name).release_dir(build);
        dir.is_dir().then_some(dir)
    }

    fn identity(&self, config: &ServiceConfig) -> Result<Identity, String> {
        crate::service::spec::identity(&self.host, &self.name, config)
    }

    fn existing_cgroup(&self, index: u32) -> Option<PathBuf> {
        let dir = self.cgroups.cgroups()?.dir(&self.name, index);
        dir.is_dir().then_some(dir)
    }

    fn slot_valid(&self) -> bool {
        self.slot
            .lock()
            .expect("the slot lock is never held across a panic")
            .as_ref()
            .is_some_and(Slot::is_valid)
    }
}
