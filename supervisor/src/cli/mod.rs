//! The `sluice` command line, the top of the crate: one clap definition of every verb, `run` (the
//! daemon), the host verbs that talk to the daemon over its control socket ([`host`]), the
//! deployer's verbs ([`fleet`]), and shell completions and the man page generated from the same
//! definition. Errors are printed on stderr and mapped to the codes of [`crate::exit`].

pub mod fleet;
pub mod host;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};

use crate::config::{self, HostConfig};
use crate::control::{self, client::Client};
use crate::daemon::{self, Exit};
use crate::exit;

pub use fleet::FleetVerb;
pub use host::HostVerb;

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
    /// Replace the bound of every control request (default: 15000 ms for reading verbs,
    /// 3600000 ms for verbs that act; `logs -f` bounds only the answer's start).
    #[arg(long, global = true, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

/// Every verb: the host's, the fleet's, and those that need no daemon.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (under systemd: `Type=notify`).
    Run,
    /// Check the host file and every service file, then exit (3 when something is wrong).
    CheckConfig {
        /// One JSON document instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// Remove every iptables rule and chain sluice created (the daemon must not be running).
    Cleanup,
    #[command(flatten)]
    Host(HostVerb),
    #[command(flatten)]
    Fleet(FleetVerb),
    /// Print a shell's completion script for every verb (`source <(sluice completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per verb into a directory.
    Man {
        /// Write `sluice.1` and `sluice-VERB.1` here instead of printing `sluice.1`.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
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

/// The exit code of a verb that failed with `e`: a control error's own code, else 1.
fn exit_code_of(e: &anyhow::Error) -> i32 {
    e.downcast_ref::<control::Error>()
        .map_or(exit::FAILED, control::Error::exit_code)
}

fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            exit_code_of(&e)
        }
    }
}

async fn dispatch(cli: Cli) -> i32 {
    // Generated from the clap definition: they need no host file.
    match &cli.command {
        Command::Completions { shell } => {
            return report(print_completions(*shell, &mut std::io::stdout().lock()));
        }
        Command::Man { out } => return report(man(out.as_deref())),
        _ => {}
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
        Command::CheckConfig { json } => check_config(&cli.config, &host, json),
        Command::Fleet(verb) => report(fleet::main(&host, cli.timeout_ms, verb).await),
        Command::Host(verb) => {
            let client = Client::new(host.control_socket(), cli.timeout_ms);
            report(host::main(&client, verb).await)
        }
        Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("answered before the host file is read")
        }
    }
}

fn check_config(path: &Path, host: &HostConfig, json: bool) -> i32 {
    match config::load_services(&host.services_dir)
        .map_err(|e| e.to_string())
        .and_then(|services| {
            crate::spec::check_identities(host, &services)?;
            Ok(services)
        }) {
        Ok(services) => {
            let names: Vec<String> = services.keys().cloned().collect();
            if json {
                let document = serde_json::json!({
                    "config": path,
                    "ok": true,
                    "services": names,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&document).expect("JSON values serialize")
                );
            } else {
                println!(
                    "{}: ok, {} service(s): {}",
                    path.display(),
                    names.len(),
                    names.join(", ")
                );
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("sluice: {e}");
            exit::CONFIG
        }
    }
}

/// The completion script of `shell` for the whole command line.
fn print_completions(
    shell: clap_complete::Shell,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "sluice", out);
    Ok(())
}

/// `sluice man`: the page of `sluice` on stdout, or every page into `out`.
fn man(out: Option<&Path>) -> anyhow::Result<()> {
    let command = Cli::command();
    match out {
        None => {
            let mut stdout = std::io::stdout().lock();
            clap_mangen::Man::new(command)
                .render(&mut stdout)
                .context("writing the man page")
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .with_context(|| format!("writing the man pages into {}", dir.display()))?;
            println!("man pages written to {}", dir.display());
            Ok(())
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every verb's name, subcommands of subcommands included.
    fn verbs() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect()
    }

    #[test]
    fn the_clap_definition_is_consistent() {
        Cli::command().debug_assert();
        let verbs = verbs();
        for verb in [
            "run",
            "check-config",
            "cleanup",
            "status",
            "start",
            "stop",
            "restart",
            "drain",
            "enable",
            "signal",
            "logs",
            "reload",
            "shutdown",
            "deploy",
            "promote",
            "rollback",
            "register",
            "builds",
            "hosts",
            "role",
            "limit",
            "push-config",
            "watch",
            "completions",
            "man",
        ] {
            assert!(
                verbs.iter().any(|v| v == verb),
                "no verb {verb} in {verbs:?}"
            );
        }
    }

    #[test]
    fn completions_offer_every_verb() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            print_completions(shell, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            for verb in verbs() {
                assert!(text.contains(&verb), "{shell:?} completions lack `{verb}`");
            }
        }
    }

    #[test]
    fn the_man_page_names_every_verb() {
        let mut out = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(".TH sluice"), "{text}");
        for verb in verbs() {
            // roff escapes `-` as `\-`.
            let escaped = verb.replace('-', "\\-");
            assert!(
                text.contains(&verb) || text.contains(&escaped),
                "the man page lacks `{verb}`"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        man(Some(dir.path())).unwrap();
        for verb in verbs() {
            let page = dir.path().join(format!("sluice-{verb}.1"));
            assert!(page.is_file(), "no page {}", page.display());
        }
        assert!(dir.path().join("sluice.1").is_file());
    }

    #[test]
    fn host_and_fleet_verbs_are_told_apart() {
        let cli = Cli::try_parse_from(["sluice", "restart", "web/2"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Host(HostVerb::Restart { .. })
        ));
        let cli = Cli::try_parse_from(["sluice", "hosts", "web", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Fleet(FleetVerb::Hosts { json: true, .. })
        ));
        let cli = Cli::try_parse_from(["sluice", "--timeout-ms", "50", "status"]).unwrap();
        assert_eq!(cli.timeout_ms, Some(50));
        assert!(Cli::try_parse_from(["sluice", "--timeout-ms", "0", "status"]).is_err());
    }

    #[test]
    fn control_errors_keep_their_exit_code_through_anyhow() {
        let e = anyhow::Error::new(control::Error::InvalidConfig("x".into()));
        assert_eq!(exit_code_of(&e), exit::CONFIG);
        let e = anyhow::Error::new(control::Error::Timeout {
            socket: "/s".into(),
            what: "status",
            bound_ms: 1,
        })
        .context("reading the status");
        assert_eq!(exit_code_of(&e), exit::UNREACHABLE);
        assert_eq!(exit_code_of(&anyhow::anyhow!("other")), exit::FAILED);
    }
}
