//! The `sluice` command line: `run` (the daemon) and the host verbs, which talk to the daemon over
//! its control socket. Errors are printed on stderr and mapped to the codes of [`crate::exit`].

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use http_body_util::BodyExt;
use hyper::Method;

use crate::client::{self, ClientError};
use crate::config::{self, HostConfig};
use crate::daemon::{self, Exit};
use crate::exit;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Supervises services and restarts them without clients noticing"
)]
pub struct Cli {
    /// The host file.
    #[arg(long, global = true, env = "SLUICE_CONFIG", default_value = config::DEFAULT_HOST_CONFIG)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (under systemd: `Type=notify`).
    Run,
    /// Check the host file and every service file, then exit (3 when something is wrong).
    CheckConfig,
    /// Show instances: all services, or one.
    Status {
        service: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a service's instances (`web`) or one instance (`web/2`); also clears `fatal`.
    Start { target: String },
    /// Stop instances gracefully; they stay stopped across daemon restarts until started.
    Stop { target: String },
    /// Restart instances one at a time; waits until done.
    Restart { target: String },
    /// Take instances out of steering and wait for their connections to end; they stay out until
    /// `enable`.
    Drain { target: String },
    /// Put drained instances back into steering.
    Enable { target: String },
    /// Remove every iptables rule and chain sluice created (the daemon must not be running).
    Cleanup,
    /// Send a signal (`HUP`, `USR1`, a number) to instances.
    Signal { signal: String, target: String },
    /// Print an instance's log.
    Logs {
        target: String,
        /// Keep printing what is appended, across rotations.
        #[arg(short, long)]
        follow: bool,
        /// The stderr log instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// How many lines of the end to print first.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
    },
    /// Re-read the service files and apply only what changed; a bad file changes nothing.
    Reload,
    /// Stop every instance gracefully, then the daemon.
    Shutdown,
    /// Deploy a build: with ZooKeeper, writes `enabled` (or `enabled/canary`) for the whole fleet;
    /// on the local backend, tells this host's daemon.
    Deploy {
        service: String,
        build: String,
        /// Only hosts with the canary role take it.
        #[arg(long)]
        canary: bool,
    },
    /// Make the canary build the build of every host.
    Promote { service: String },
    /// Go back to the build before the current one.
    Rollback { service: String },
    /// Register where a build is and its sha256 (ZooKeeper `/builds/<svc>/<build>`).
    Register {
        service: String,
        build: String,
        #[arg(long)]
        url: String,
        #[arg(long)]
        sha256: String,
    },
    /// List builds: registered in ZooKeeper, or installed on this host.
    Builds { service: String },
    /// Every host's status for a service (ZooKeeper).
    Hosts {
        service: String,
        #[arg(long)]
        json: bool,
    },
    /// Set a host's role for a service: `canary` or `prod` (ZooKeeper).
    Role {
        service: String,
        host: String,
        role: String,
    },
    /// How many hosts may restart a service at once (ZooKeeper).
    Limit {
        service: String,
        max_hosts_restarting: u32,
    },
    /// Publish a service's config node (ZooKeeper): a JSON object of the service-file keys each
    /// host lets it set (`coordination.config_node_keys`), overriding the hosts' local files.
    PushConfig { service: String, file: PathBuf },
    /// A live view of a service across hosts (ZooKeeper); Ctrl-C ends it.
    Watch {
        service: String,
        /// Print one view and exit.
        #[arg(long)]
        once: bool,
    },
    /// Write a service file for each program of a supervisord configuration, and report what
    /// could not be carried over (exit 5 when something was not).
    ImportSupervisord(crate::supervisord::ImportArgs),
}

impl Command {
    /// The deployer's verbs, handled by [`crate::fleet_cli`].
    pub fn is_fleet(&self) -> bool {
        matches!(
            self,
            Command::Deploy { .. }
                | Command::Promote { .. }
                | Command::Rollback { .. }
                | Command::Register { .. }
                | Command::Builds { .. }
                | Command::Hosts { .. }
                | Command::Role { .. }
                | Command::Limit { .. }
                | Command::PushConfig { .. }
                | Command::Watch { .. }
        )
    }
}

/// Parses the command line, runs it, and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zookeeper_client=warn"));
    // Colours only on a terminal: the journal and log files get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One thread runs the daemon; a few more serve blocking work (iptables, file reads).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> i32 {
    // Needs no host file: it may run on a machine that has none yet.
    if let Command::ImportSupervisord(args) = &cli.command {
        return crate::supervisord::exit_code(crate::supervisord::run(args));
    }
    let host = match HostConfig::load(&cli.config) {
        Ok(host) => host,
        Err(e) => {
            eprintln!("sluice: {e}");
            return exit::CONFIG;
        }
    };
    match cli.command {
        Command::Run => run(host).await,
        Command::Cleanup => cleanup(&host).await,
        verb if verb.is_fleet() => match crate::fleet_cli::main(&host, verb).await {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("sluice: {e:#}");
                match e.downcast_ref::<ClientError>() {
                    Some(ClientError::Unreachable { .. }) => exit::UNREACHABLE,
                    _ => exit::FAILED,
                }
            }
        },
        Command::CheckConfig => match config::load_services(&host.services_dir)
            .map_err(|e| e.to_string())
            .and_then(|services| {
                crate::spec::check_identities(&host, &services)?;
                Ok(services)
            }) {
            Ok(services) => {
                println!(
                    "{}: ok, {} service(s): {}",
                    cli.config.display(),
                    services.len(),
                    services.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                exit::OK
            }
            Err(e) => {
                eprintln!("sluice: {e}");
                exit::CONFIG
            }
        },
        verb => match verb_main(&host.control_socket(), verb).await {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("sluice: {e:#}");
                match e.downcast_ref::<ClientError>() {
                    Some(ClientError::Unreachable { .. }) => exit::UNREACHABLE,
                    Some(ClientError::Refused { status, .. })
                        if *status == hyper::StatusCode::UNPROCESSABLE_ENTITY =>
                    {
                        exit::CONFIG
                    }
                    _ => exit::FAILED,
                }
            }
        },
    }
}

async fn run(host: HostConfig) -> i32 {
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
            crate::spec::check_identities(&host, &services)?;
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
        let listener = bind_control_socket(&host)?;
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
async fn cleanup(host: &HostConfig) -> i32 {
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
/// The control socket's mode: root and `control_group` (connecting needs write permission).
const CONTROL_SOCKET_MODE: u32 = 0o660;

/// Binds the control socket, mode 0660, group `control_group` (else the daemon's group). Its
/// directory must be writable by root alone, or someone else could replace the socket and answer
/// the operators' commands.
fn bind_control_socket(host: &HostConfig) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = host.control_socket();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("control_socket {}: no file name", path.display()))?;
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let dir = sluice_safefs::Dir::open(&parent).with_context(|| {
        format!(
            "opening the control socket's directory {}",
            parent.display()
        )
    })?;
    dir.require_trusted()
        .context("the control socket's directory must be writable by root alone")?;
    // We hold the daemon lock, so a socket file left here belongs to a dead daemon. unlinkat
    // removes the entry whatever it is, never what a link points to.
    match dir.unlink(name) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context("removing the old control socket");
        }
        _ => {}
    }
    // Until the chmod below the socket has the umask's mode (0755 under the unit's UMask=0022):
    // nobody but its owner can connect (connecting needs write permission) in that moment.
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    if let Some(group) = &host.control_group {
        let gid = nix::unistd::Group::from_name(group)
            .with_context(|| format!("looking up control_group `{group}`"))?
            .with_context(|| format!("control_group: no group named `{group}`"))?
            .gid;
        nix::unistd::chown(&path, None, Some(gid))
            .with_context(|| format!("chown {} to group {group}", path.display()))?;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(CONTROL_SOCKET_MODE))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// `web` → (`web`, None); `web/2` → (`web`, Some(2)).
fn parse_target(target: &str) -> anyhow::Result<(String, Option<u32>)> {
    match target.split_once('/') {
        None => Ok((target.to_owned(), None)),
        Some((service, index)) => {
            let index = index
                .parse()
                .with_context(|| format!("`{target}`: the instance after `/` must be a number"))?;
            Ok((service.to_owned(), Some(index)))
        }
    }
}

async fn verb_main(socket: &Path, verb: Command) -> anyhow::Result<()> {
    let control = |action: &str, target: &str, signal: Option<String>| {
        let (service, index) = parse_target(target)?;
        Ok::<_, anyhow::Error>(serde_json::json!({
            "service": service, "index": index, "action": action, "signal": signal,
        }))
    };
    let body = match verb {
        Command::Status { service, json } => {
            let query = service.map(|s| format!("?service={s}")).unwrap_or_default();
            let answer =
                client::call(socket, Method::GET, &format!("/v1/status{query}"), None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print_status(&answer);
            }
            return Ok(());
        }
        Command::Logs {
            target,
            follow,
            stderr,
            lines,
        } => {
            let (service, index) = parse_target(&target)?;
            let index = index.context("`logs` needs one instance, as `service/index`")?;
            let stream = if stderr { "stderr" } else { "stdout" };
            let query = format!(
                "/v1/logs?service={service}&index={index}&stream={stream}&lines={lines}&follow={}",
                u8::from(follow)
            );
            let response = client::send(socket, Method::GET, &query, None).await?;
            let mut body = response.into_body();
            let mut out = std::io::stdout().lock();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    out.write_all(&data)?;
                    out.flush()?;
                }
            }
            return Ok(());
        }
        Command::Start { target } => ("/v1/control", Some(control("start", &target, None)?)),
        Command::Stop { target } => ("/v1/control", Some(control("stop", &target, None)?)),
        Command::Restart { target } => ("/v1/control", Some(control("restart", &target, None)?)),
        Command::Drain { target } => ("/v1/control", Some(control("drain", &target, None)?)),
        Command::Enable { target } => ("/v1/control", Some(control("enable", &target, None)?)),
        Command::Signal { signal, target } => (
            "/v1/control",
            Some(control("signal", &target, Some(signal))?),
        ),
        Command::Reload => ("/v1/reload", None),
        Command::Shutdown => ("/v1/shutdown", None),
        // Run, check-config, cleanup and the fleet verbs never reach here.
        _ => unreachable!("handled by dispatch"),
    };
    let progress_of = match &body.1 {
        Some(request) if request["action"] == "restart" => {
            request["service"].as_str().map(str::to_owned)
        }
        _ => None,
    };
    let call = client::call(socket, Method::POST, body.0, body.1);
    let answer = match progress_of {
        // A restart can take minutes: show its steps as they happen.
        Some(service) => {
            // Drains that ended before this restart are not its own: known before it begins.
            let before = last_drains(socket, &service).await;
            let progress = print_restart_progress(socket, &service, before);
            tokio::pin!(call);
            tokio::select! {
                answer = &mut call => answer?,
                () = progress => unreachable!("progress runs until the restart ends"),
            }
        }
        None => call.await?,
    };
    if let Some(message) = answer.get("message").and_then(|m| m.as_str()) {
        println!("{message}");
    }
    Ok(())
}

/// Each instance's `last_drain` (`null` before its first drain), by index.
type LastDrains = std::collections::BTreeMap<u64, serde_json::Value>;

fn drains_in(status: &serde_json::Value) -> LastDrains {
    let empty = Vec::new();
    status["services"][0]["instances"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter_map(|i| Some((i["index"].as_u64()?, i["last_drain"].clone())))
        .collect()
}

/// The drains of `service` so far; empty when status cannot be read (then every drain seen is
/// printed).
async fn last_drains(socket: &Path, service: &str) -> LastDrains {
    let query = format!("/v1/status?service={service}");
    client::call(socket, Method::GET, &query, None)
        .await
        .map(|s| drains_in(&s))
        .unwrap_or_default()
}

/// Prints a line whenever the restart of `service` moves to another batch or step; never returns.
async fn print_restart_progress(socket: &Path, service: &str, mut seen: LastDrains) {
    const POLL_MS: u64 = 250;
    let mut last = String::new();
    loop {
        let query = format!("/v1/status?service={service}");
        if let Ok(status) = client::call(socket, Method::GET, &query, None).await {
            // Each drain once, when an instance's `last_drain` changes.
            let now = drains_in(&status);
            for (index, d) in &now {
                if !d.is_null() && seen.get(index) != Some(d) {
                    eprintln!(
                        "{service}/{index}: drained: {}, {} connection(s) left, {} in flight, {} ms",
                        d["ending"].as_str().unwrap_or("?"),
                        d["connections_left"],
                        d["in_flight_left"],
                        d["waited_ms"]
                    );
                }
            }
            seen = now;
            let restart = &status["services"][0]["restart"];
            if !restart.is_null() {
                let line = format!(
                    "{service}: batch {} {}{}, {} batch(es) left",
                    restart["batch"],
                    restart["step"].as_str().unwrap_or("starting"),
                    match (restart["rolling_back"] == true, restart["step"].as_str()) {
                        // The old version goes back into steering whatever its warm-up says.
                        (true, Some("warming")) =>
                            " (rolling back; the old version's warm-up is best effort)",
                        (true, _) => " (rolling back)",
                        (false, _) => "",
                    },
                    restart["batches_left"]
                );
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(POLL_MS)).await;
    }
}

fn print_status(answer: &serde_json::Value) {
    let empty = Vec::new();
    let services = answer["services"].as_array().unwrap_or(&empty);
    for service in services {
        let mut facts = Vec::new();
        if let Some(build) = service["build"].as_str() {
            facts.push(format!("build {build}"));
        }
        if let Some(deploy) = service["deploy"].as_object() {
            facts.push(format!(
                "deploying {} ({})",
                deploy["build"].as_str().unwrap_or("?"),
                deploy["phase"].as_str().unwrap_or("?")
            ));
        }
        if let Some(restart) = service["restart"].as_object() {
            facts.push(format!(
                "restarting: batch {} {}",
                restart["batch"],
                restart["step"].as_str().unwrap_or("")
            ));
        }
        for key in [
            "deploy_error",
            "last_restart_error",
            "config_error",
            "steering_error",
        ] {
            if let Some(error) = service[key].as_str() {
                facts.push(error.to_owned());
            }
        }
        if !facts.is_empty() {
            println!(
                "{}: {}",
                service["service"].as_str().unwrap_or("?"),
                facts.join("; ")
            );
        }
        for i in service["instances"].as_array().unwrap_or(&empty) {
            let name = format!("{}/{}", i["service"].as_str().unwrap_or("?"), i["index"]);
            let mut details = Vec::new();
            if let Some(pid) = i["pid"].as_u64() {
                details.push(format!("pid {pid}"));
            }
            if let Some(port) = i["port"].as_u64() {
                details.push(format!("port {port}"));
            }
            if let Some(up) = i["uptime_ms"].as_u64() {
                details.push(format!("uptime {}", human_duration(up)));
            }
            if i["enabled"] == false && i["pid"].is_u64() {
                details.push("out of steering".into());
            }
            if i["outdated"].as_bool() == Some(true) {
                details.push("outdated config".into());
            }
            if let Some(exit) = i["last_exit"].as_str()
                && i["pid"].is_null()
            {
                details.push(format!("last exit: {exit}"));
            }
            if let Some(error) = i["last_error"].as_str() {
                details.push(format!("error: {error}"));
            }
            println!(
                "{name:<24} {:<9} {}",
                i["state"].as_str().unwrap_or("?"),
                details.join(", ")
            );
        }
    }
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("web").unwrap(), ("web".into(), None));
        assert_eq!(parse_target("web/3").unwrap(), ("web".into(), Some(3)));
        assert!(parse_target("web/x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(59_999), "59s");
        assert_eq!(human_duration(61_000), "1m01s");
        assert_eq!(human_duration(3_660_000), "1h01m");
    }
}
