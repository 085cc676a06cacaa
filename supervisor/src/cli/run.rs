//! `sluice run` (the daemon, holding its lock and its control socket) and `sluice cleanup` (which
//! must not run beside a daemon).

use std::path::Path;

use anyhow::Context as _;

use crate::config::{self, HostConfig};
use crate::daemon::{self, Exit};
use crate::exit;

/// `sluice run`: the daemon, until SIGTERM or `sluice shutdown`.
pub async fn run(host: HostConfig) -> i32 {
    // A panic anywhere (a service's task included) is a broken invariant: the daemon exits at once
    // rather than running on without the task that panicked. systemd restarts it and the new
    // daemon adopts every instance; the shims never noticed.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(exit::PANIC);
    }));
    let services = match config::load_services(&host.services_dir)
        .map_err(|e| e.to_string())
        .and_then(|services| {
            crate::service::spec::check_identities(&host, &services)?;
            Ok(services)
        }) {
        Ok(services) => services,
        Err(e) => {
            eprintln!("sluice: {e}");
            return exit::CONFIG;
        }
    };
    if host.coordination.backend == config::Backend::Zookeeper
        && let Some(path) = &host.coordination.digest_file
        && let Err(e) = crate::daemon::check_digest_file(path)
    {
        eprintln!("sluice: {e}");
        return exit::CONFIG;
    }
    let result = async {
        let shim_binary = match &host.shim_path {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("finding the sluice binary")?
                .with_file_name("sluice-shim"),
        };
        anyhow::ensure!(
            shim_binary.is_file(),
            "the shim binary {} does not exist (set `shim_path` in the host file)",
            shim_binary.display()
        );
        let _lock = lock_daemon(&host.runtime_dir)?;
        let listener = crate::control::server::bind(&host)?;
        daemon::run(
            host,
            services,
            shim_binary,
            listener,
            std::future::pending(),
        )
        .await
    }
    .await;
    match result {
        Ok(Exit::Detached) => exit::OK,
        Ok(Exit::ShutDown) => exit::SHUT_DOWN,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            exit::FAILED
        }
    }
}

/// Removes every chain and jump rule sluice owns, in both address families. Refuses while a
/// daemon runs: it would put its chains back.
pub async fn cleanup(host: &HostConfig) -> i32 {
    if lock_daemon(&host.runtime_dir).is_err() {
        eprintln!("sluice: a sluice daemon is running; stop it first (`systemctl stop sluice`)");
        return exit::FAILED;
    }
    let iptables = sluice_strategies::steering::Iptables::detect(host.iptables.variant());
    let result = tokio::task::spawn_blocking(move || {
        let services = iptables.owned()?;
        for service in &services {
            iptables.remove(service)?;
        }
        Ok::<_, sluice_strategies::steering::SteeringError>(services)
    })
    .await
    .expect("the cleanup task does not panic");
    match result {
        Ok(services) if services.is_empty() => {
            println!("nothing to remove");
            exit::OK
        }
        Ok(services) => {
            println!("removed the steering of: {}", services.join(", "));
            exit::OK
        }
        Err(e) => {
            eprintln!("sluice: cleanup: {e}");
            exit::FAILED
        }
    }
}

/// Holds `runtime_dir/sluice.lock` for the daemon's life: a second daemon on the same host
/// would adopt and fight over the same shims.
///
/// Nobody else may take the lock (a local user holding it would keep the daemon from starting): the
/// file is mode 0600, owned by the daemon's user, in a directory only root (or that user) can
/// change, so nobody else can open it, create it first, or put a link in its place.
fn lock_daemon(runtime_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(runtime_dir)
        .with_context(|| format!("creating {}", runtime_dir.display()))?;
    let dir = sluice_safefs::Dir::open(runtime_dir)
        .with_context(|| format!("opening runtime_dir {}", runtime_dir.display()))?;
    dir.require_trusted()
        .context("runtime_dir must be writable by root alone")?;
    let path = dir.child_path(DAEMON_LOCK_FILE);
    let file = dir
        .open_append(DAEMON_LOCK_FILE, DAEMON_LOCK_MODE)
        .with_context(|| format!("opening {}", path.display()))?;
    let meta = sluice_safefs::fstat(std::os::fd::AsFd::as_fd(&file))?;
    anyhow::ensure!(
        meta.uid == nix::unistd::geteuid().as_raw(),
        "{} is owned by uid {}, not by the daemon's user; remove it",
        path.display(),
        meta.uid
    );
    // A lock left by an older sluice may be 0644.
    file.set_permissions(std::fs::Permissions::from_mode(DAEMON_LOCK_MODE))
        .with_context(|| format!("chmod {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "another sluice daemon holds {}; only one may run per runtime_dir",
            path.display()
        );
    }
    Ok(file)
}

/// The daemon lock's name in `runtime_dir`.
const DAEMON_LOCK_FILE: &str = "sluice.lock";
/// The daemon lock's mode: no one but the daemon's user may open it (and so `flock` it).
const DAEMON_LOCK_MODE: u32 = 0o600;
