//! The `sluice` command line, the top of the crate: one clap definition of every verb, `run` (the
//! daemon), the host verbs that talk to the daemon over its control socket ([`host`]), the
//! deployer's verbs ([`fleet`]), and shell completions and the man page generated from the same
//! definition. Errors are printed on stderr and mapped to the codes of [`crate::exit`].

pub mod fleet;
pub mod host;
pub mod run;
pub mod wait;
pub mod watch;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};

use crate::config::{self, HostConfig};
use crate::control::{self, client::Client};
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
    /// Replace the bound of every control request (default: 25000 ms for reading verbs,
    /// 3600000 ms for verbs that act; `logs -f` bounds only the answer's start).
    #[arg(long, global = true, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

/// Every verb: the daemon's own, the host's, the fleet's, and the generated help.
#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(flatten)]
    Daemon(DaemonVerb),
    #[command(flatten)]
    Host(HostVerb),
    #[command(flatten)]
    Fleet(FleetVerb),
    /// Print a shell's completion script for every verb (`source <(sluice completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write a service file for each program of a supervisord configuration, and report what
    /// could not be carried over (exit 5 when something was not).
    ImportSupervisord(crate::supervisord::ImportArgs),
    /// Print the man page (roff), or write one page per verb into a directory.
    Man {
        /// Write `sluice.1` and `sluice-VERB.1` here instead of printing `sluice.1`.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// The verbs that run on this host without a daemon to talk to.
#[derive(Debug, Subcommand)]
pub enum DaemonVerb {
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
}

/// Worker threads of `sluice run`'s runtime (service tasks, control API, ZooKeeper, peers); the
/// daemon's loop has the main thread to itself.
const DAEMON_WORKER_THREADS: usize = 2;
/// Threads of the blocking pool: extraction, release pruning, syncfs, iptables, file reads.
const MAX_BLOCKING_THREADS: usize = 8;

/// The daemon's own binary, installed next to `sluice`: `sluice run` executes it in its place.
pub const DAEMON_BINARY: &str = "sluiced";

/// The command line of [`DAEMON_BINARY`]: only what the daemon reads.
#[derive(Debug, Parser)]
#[command(
    name = "sluiced",
    version,
    about = "The sluice daemon; started by `sluice run`, which replaces itself with it"
)]
struct DaemonCli {
    /// The host file.
    #[arg(long, env = "SLUICE_CONFIG", default_value = config::DEFAULT_HOST_CONFIG)]
    config: PathBuf,
}

/// Parses the command line, runs it, and returns the process exit code. `sluice run` does not
/// return: it executes [`DAEMON_BINARY`] (see [`exec_daemon`]).
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing();
    // Every verb here is one request (or one terminal view) and needs only one thread; the
    // daemon's runtime is `daemon_main`'s.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    runtime.block_on(dispatch(cli))
}

/// The `main` of [`DAEMON_BINARY`]: the daemon, as `sluice run` was before it executed this.
///
/// A binary of its own so that the daemon's resident text holds only the daemon's code: the
/// deployer's terminal UI and progress bars, the man page and completion generators, the
/// supervisord importer and the clap definition of every other verb are linked into `sluice`
/// alone (issue 7, footprint: the brain's RSS is mostly its binary's text pages, and the kernel's
/// fault-around maps 64 KiB around each page the daemon touches, CLI code in between included).
pub fn daemon_main() -> i32 {
    // The daemon's store fetches run in a child of its own image (`build::reader`).
    if std::env::args_os().nth(1).as_deref() == Some(crate::build::STORE_READER_ARG.as_ref()) {
        return crate::build::store_reader_main();
    }
    // One malloc arena for the whole daemon. glibc gives threads that allocate at the same time
    // arenas of their own, and the two workers' arenas held ~2.2 MiB of the brain's RSS at 100
    // instances (BENCHMARKS.md); the daemon allocates little, and rarely at once.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cli = DaemonCli::parse();
    init_tracing();
    let host = match HostConfig::load(&cli.config) {
        Ok(host) => host,
        Err(e) => {
            eprintln!("sluice: {e}");
            return exit::CONFIG;
        }
    };
    // The daemon's loop runs on this thread (`block_on`), its service tasks and the control API on
    // `DAEMON_WORKER_THREADS` workers, and blocking work (file trees, fsync, extraction, iptables,
    // hooks) on the blocking pool: a service task that waits for its state file's fsync
    // (`block_in_place`) never holds up the loop, the watchdog or `status`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(DAEMON_WORKER_THREADS)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    crate::build::use_store_reader(PathBuf::from("/proc/self/exe"));
    runtime.block_on(run::run(host))
}

/// Logs on stderr, filtered by `SLUICE_LOG`; colours only on a terminal (the journal and log
/// files get plain text).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zookeeper_client=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `sluice run`: replaces this process with [`DAEMON_BINARY`] from `sluice`'s own directory,
/// given the same host file. The process stays the same (its pid, so systemd's `Type=notify`
/// main process, its environment and descriptors); only its image changes. Returns only when the
/// exec failed.
fn exec_daemon(config: &Path) -> i32 {
    use std::os::unix::process::CommandExt as _;
    let daemon = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(DAEMON_BINARY),
        Err(e) => {
            eprintln!("sluice: finding the sluice binary: {e}");
            return exit::FAILED;
        }
    };
    let e = std::process::Command::new(&daemon)
        .arg("--config")
        .arg(config)
        .exec();
    eprintln!(
        "sluice: executing the daemon {} (install it next to sluice): {e}",
        daemon.display()
    );
    exit::FAILED
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
    // The host file, read only by the verbs that need it: completions and the man page do not.
    let host = || HostConfig::load(&cli.config).map_err(|e| eprintln!("sluice: {e}"));
    match cli.command {
        Command::Completions { shell } => {
            report(print_completions(shell, &mut std::io::stdout().lock()))
        }
        Command::Man { out } => report(man(out.as_deref())),
        // Needs no host file: it may run on a machine that has none yet.
        Command::ImportSupervisord(args) => {
            crate::supervisord::exit_code(crate::supervisord::run(&args))
        }
        // The host file is read by the daemon itself.
        Command::Daemon(DaemonVerb::Run) => exec_daemon(&cli.config),
        Command::Daemon(DaemonVerb::Cleanup) => match host() {
            Ok(host) => run::cleanup(&host).await,
            Err(()) => exit::CONFIG,
        },
        Command::Daemon(DaemonVerb::CheckConfig { json }) => match host() {
            Ok(host) => check_config(&cli.config, &host, json),
            Err(()) => exit::CONFIG,
        },
        Command::Host(verb) => {
            let Ok(host) = host() else {
                return exit::CONFIG;
            };
            let client = Client::new(host.control_socket(), cli.timeout_ms);
            report(host::main(&client, verb).await)
        }
        Command::Fleet(verb) => {
            let Ok(host) = host() else {
                return exit::CONFIG;
            };
            report(fleet::main(&host, cli.timeout_ms, verb).await)
        }
    }
}

fn check_config(path: &Path, host: &HostConfig, json: bool) -> i32 {
    match config::load_services(&host.services_dir)
        .map_err(|e| e.to_string())
        .and_then(|services| {
            crate::service::spec::check_identities(host, &services)?;
            if host.peers.enabled
                && let Some(file) = &host.peers.secret_file
            {
                crate::build::peer_auth::PeerKey::load(file)?;
            }
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
    // Rendered whole first: the generator cannot report a failed write (it panics).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "sluice", &mut script);
    write_all(out, &script).context("writing the completions")
}

/// Writes `bytes`; a reader that went away (`sluice man | head`) is not an error.
fn write_all(out: &mut dyn std::io::Write, bytes: &[u8]) -> std::io::Result<()> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// `sluice man`: the page of `sluice` on stdout, or every page into `out`.
fn man(out: Option<&Path>) -> anyhow::Result<()> {
    let command = Cli::command();
    match out {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command)
                .render(&mut page)
                .context("rendering the man page")?;
            write_all(&mut std::io::stdout().lock(), &page).context("writing the man page")
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
        let cli = Cli::try_parse_from(["sluice", "check-config", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Daemon(DaemonVerb::CheckConfig { json: true })
        ));
        assert!(Cli::try_parse_from(["sluice", "--timeout-ms", "0", "status"]).is_err());
    }

    #[test]
    fn the_help_of_timeout_ms_states_the_bounds_in_force() {
        let command = Cli::command();
        let help = command
            .get_arguments()
            .find(|a| a.get_id() == "timeout_ms")
            .and_then(|a| a.get_help())
            .map(|h| h.to_string())
            .unwrap();
        for bound in [
            control::client::QUICK_TIMEOUT_MS,
            control::client::ACTION_TIMEOUT_MS,
        ] {
            assert!(help.contains(&format!("{bound} ms")), "{help}");
        }
    }

    #[test]
    fn a_reader_that_went_away_is_not_an_error() {
        struct Gone;
        impl std::io::Write for Gone {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        print_completions(clap_complete::Shell::Bash, &mut Gone).unwrap();
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
