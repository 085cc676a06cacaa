//! The deployer's verbs: `deploy`, `promote`, `rollback`, `register`, `builds`, `hosts`, `role`,
//! `limit`, `push-config`, `watch`. With the ZooKeeper backend they write and read the nodes of
//! DESIGN.md directly; on the local backend `deploy`, `promote` and `rollback` go to this host's
//! daemon and `builds` lists the releases on disk.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Subcommand, ValueEnum};

use crate::config::{Backend, HostConfig, ServiceConfig};
use crate::control::client::Client;
use crate::control::protocol::{DeployRequest, DeployVerb, HostStatus, InstanceState};
use crate::coord::{BuildMeta, Fleet, Role};
use serde::Deserialize as _;

/// How often `watch` redraws.
const WATCH_INTERVAL_MS: u64 = 500;

/// The deployer's verbs.
#[derive(Debug, Subcommand)]
pub enum FleetVerb {
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
    Builds {
        service: String,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Every host's status for a service (ZooKeeper).
    Hosts {
        service: String,
        /// The status nodes as one JSON object, by host.
        #[arg(long)]
        json: bool,
    },
    /// Set a host's role for a service (ZooKeeper).
    Role {
        service: String,
        host: String,
        #[arg(value_enum)]
        role: RoleArg,
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
}

/// A host's role as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Takes `enabled/canary` builds first.
    Canary,
    /// Takes the fleet's `enabled` build.
    Prod,
}

pub async fn main(
    host: &HostConfig,
    timeout_ms: Option<u64>,
    verb: FleetVerb,
) -> anyhow::Result<()> {
    if host.coordination.backend == Backend::Local {
        return local(host, timeout_ms, verb).await;
    }
    let connect = host
        .coordination
        .connect
        .as_deref()
        .context("the zookeeper backend needs `coordination.connect`")?;
    let digest = match &host.coordination.digest_file {
        Some(path) => Some(crate::daemon::read_digest(path)?),
        None => None,
    };
    let fleet = Fleet::connect(connect, digest)
        .await
        .with_context(|| format!("connecting to zookeeper at {connect}"))?;
    match verb {
        FleetVerb::Deploy {
            service,
            build,
            canary,
        } => {
            crate::build::check_build_id(&build).map_err(anyhow::Error::msg)?;
            if !fleet.is_registered(&service, &build).await? {
                eprintln!(
                    "sluice: note: {build} is not registered in /builds/{service}; hosts fetch it from their `[build] source`"
                );
            }
            fleet.deploy(&service, &build, canary).await?;
            let which = if canary { "enabled/canary" } else { "enabled" };
            println!("{service}: {which} is now {build}");
        }
        FleetVerb::Promote { service } => {
            let build = fleet.promote(&service).await?;
            println!("{service}: promoted {build} to every host");
        }
        FleetVerb::Rollback { service } => {
            let build = fleet.rollback(&service).await?;
            println!("{service}: rolled back to {build}");
        }
        FleetVerb::Register {
            service,
            build,
            url,
            sha256,
        } => {
            crate::build::check_build_id(&build).map_err(anyhow::Error::msg)?;
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("--sha256 must be 64 hex digits, not `{sha256}`");
            }
            let meta = BuildMeta {
                url,
                sha256: sha256.to_ascii_lowercase(),
                size: None,
                created: None,
            };
            fleet.register_build(&service, &build, &meta).await?;
            println!("{service}: registered build {build}");
        }
        FleetVerb::Builds { service, json } => {
            let builds = fleet.builds(&service).await?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> = builds
                    .into_iter()
                    .map(|(build, meta)| {
                        let meta = serde_json::to_value(meta).expect("build metadata serializes");
                        (build, meta)
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&map)?);
            } else {
                for (build, meta) in builds {
                    println!("{build:<24} {} sha256:{}", meta.url, meta.sha256);
                }
            }
        }
        FleetVerb::Hosts { service, json } => {
            let hosts = fleet.hosts(&service).await?;
            if json {
                // The status nodes as ZooKeeper holds them, fields of newer hosts included.
                let map: serde_json::Map<String, serde_json::Value> = hosts.into_iter().collect();
                println!("{}", serde_json::to_string_pretty(&map)?);
            } else {
                print!("{}", render(&service, &hosts));
            }
        }
        FleetVerb::Role {
            service,
            host,
            role,
        } => {
            let (role, name) = match role {
                RoleArg::Canary => (Role::Canary, "canary"),
                RoleArg::Prod => (Role::Prod, "prod"),
            };
            fleet.set_role(&service, &host, role).await?;
            println!("{service}: {host} is now {name}");
        }
        FleetVerb::Limit {
            service,
            max_hosts_restarting,
        } => {
            let max = crate::coord::MAX_HOSTS_RESTARTING_MAX;
            if max_hosts_restarting == 0 || max_hosts_restarting > max {
                bail!("max_hosts_restarting must be a whole number from 1 to {max}");
            }
            fleet
                .set_max_hosts_restarting(&service, max_hosts_restarting)
                .await?;
            println!("{service}: at most {max_hosts_restarting} host(s) restart at once");
        }
        FleetVerb::PushConfig { service, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Refuse here what every host would refuse: the fleet keeps its configuration.
            // Checked against this host file's `config_node_keys`; every host checks against its own.
            ServiceConfig::check_config_node(&text, &host.coordination.config_node_keys)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            fleet.set_config(&service, &text).await?;
            println!("{service}: configuration published");
        }
        FleetVerb::Watch { service, once } => loop {
            let hosts = fleet.hosts(&service).await?;
            let mut out = std::io::stdout().lock();
            if !once {
                // Clear the screen and go home: a live view, like `watch(1)`.
                write!(out, "\x1b[2J\x1b[H")?;
            }
            write!(out, "{}", render(&service, &hosts))?;
            out.flush()?;
            if once {
                break;
            }
            tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS)).await;
        },
    }
    Ok(())
}

/// The local backend: deploys go to this host's daemon; the ZooKeeper-only verbs say so.
async fn local(host: &HostConfig, timeout_ms: Option<u64>, verb: FleetVerb) -> anyhow::Result<()> {
    let request = match verb {
        FleetVerb::Deploy {
            service,
            build,
            canary,
        } => DeployRequest {
            service,
            verb: DeployVerb::Deploy,
            build: Some(build),
            canary,
        },
        FleetVerb::Promote { service } => DeployRequest {
            service,
            verb: DeployVerb::Promote,
            build: None,
            canary: false,
        },
        FleetVerb::Rollback { service } => DeployRequest {
            service,
            verb: DeployVerb::Rollback,
            build: None,
            canary: false,
        },
        FleetVerb::Builds { service, json } => {
            let releases = crate::build::Releases::new(&host.data_dir, &service);
            let current = releases.current();
            let builds = releases.list();
            if json {
                let document = serde_json::json!({ "builds": builds, "current": current });
                println!("{}", serde_json::to_string_pretty(&document)?);
                return Ok(());
            }
            for build in builds {
                let mark = if Some(&build) == current.as_ref() {
                    " (current)"
                } else {
                    ""
                };
                println!("{build}{mark}");
            }
            return Ok(());
        }
        _ => bail!(
            "this verb needs the zookeeper backend (`[coordination] backend = \"zookeeper\"`)"
        ),
    };
    let client = Client::new(host.control_socket(), timeout_ms);
    println!("{}", client.deploy(&request).await?.message);
    Ok(())
}

/// The hosts of a service as a table: host, state, build, instances in steering, last error. A
/// status node this version cannot read is a line saying so, not a failed command.
fn render(service: &str, hosts: &[(String, serde_json::Value)]) -> String {
    let mut out = format!(
        "{service}: {} host(s)\n{:<16} {:<11} {:<16} {:<16} {:<10} {:<20} {}\n",
        hosts.len(),
        "HOST",
        "STATE",
        "BUILD",
        "TARGET",
        "UP",
        "CANARY",
        "LAST ERROR"
    );
    for (host, value) in hosts {
        let status = match HostStatus::deserialize(value) {
            Ok(status) => status,
            Err(e) => {
                out.push_str(&format!(
                    "{host:<16} {:<11} unreadable status node: {}\n",
                    "?",
                    crate::clip::clip(&e.to_string())
                ));
                continue;
            }
        };
        let instances = &status.instances;
        let enabled = instances.iter().filter(|i| i.enabled == Some(true)).count();
        let running = instances
            .iter()
            .filter(|i| i.state == InstanceState::Running)
            .count();
        // Without steering, `enabled` is null: show how many run instead.
        let steered = instances.iter().any(|i| i.enabled.is_some());
        let shown = if steered { enabled } else { running };
        out.push_str(&format!(
            "{:<16} {:<11} {:<16} {:<16} {:<10} {:<20} {}\n",
            host,
            status.state.as_str(),
            status.build.as_deref().unwrap_or("-"),
            status.target_build.as_deref().unwrap_or("-"),
            format!("{shown}/{}", instances.len()),
            status
                .canary
                .as_ref()
                .map_or_else(|| "-".to_owned(), |c| c.short()),
            status.last_error.as_deref().unwrap_or(""),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_render_from_typed_status_and_survive_a_bad_node() {
        let good = serde_json::json!({
            "host": "h1", "build": "b2", "target_build": null, "state": "serving",
            "instances": [
                {"index": 0, "state": "running", "pid": 10, "enabled": true, "healthy": true,
                 "warmup": null, "last_error": null},
                {"index": 1, "state": "draining", "pid": 11, "enabled": false, "healthy": true,
                 "warmup": null, "last_error": null}
            ],
            "last_error": null, "restart_started_ms": null, "restart_finished_ms": null,
            "canary": {"build": "b2", "outcome": "fail", "reasons": [], "action": "rolled-back"}
        });
        let bad = serde_json::json!({"host": "h2", "state": "dancing"});
        let text = render("web", &[("h1".into(), good), ("h2".into(), bad)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "web: 2 host(s)");
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["h1", "serving", "b2", "-", "1/2", "fail/rolled-back"]
        );
        assert!(lines[3].starts_with("h2"), "{}", lines[3]);
        assert!(lines[3].contains("unreadable status node"), "{}", lines[3]);
    }
}
