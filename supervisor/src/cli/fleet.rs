//! The deployer's verbs: `deploy`, `promote`, `rollback`, `register`, `builds`, `hosts`, `role`,
//! `limit`, `push-config`, `watch`. With the ZooKeeper backend they write and read the nodes of
//! DESIGN.md directly; on the local backend `deploy`, `promote` and `rollback` go to this host's
//! daemon and `builds` lists the releases on disk.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Subcommand, ValueEnum};

use super::wait::{self, WaitArgs};
use crate::config::{Backend, HostConfig, ServiceConfig};
use crate::control::client::Client;
use crate::control::protocol::{DeployRequest, DeployVerb, HostStatus, InstanceState};
use crate::coord::{BuildMeta, Fleet, Limit, Role};
use serde::Deserialize as _;

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
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Make the canary build the build of every host.
    Promote {
        service: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Go back to the build before the current one.
    Rollback {
        service: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
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
    /// How many hosts may restart a service at once (ZooKeeper): a count (`3`) or a percentage
    /// of the service's hosts (`10%`, rounded down, at least one).
    Limit {
        service: String,
        /// `N` (1 to 10000) or `P%` (1% to 100%).
        max_hosts_restarting: String,
    },
    /// Publish a service's config node (ZooKeeper): a JSON object of the service-file keys each
    /// host lets it set (`coordination.config_node_keys`), overriding the hosts' local files.
    PushConfig { service: String, file: PathBuf },
    /// A live full-screen view of a service across hosts (ZooKeeper), or of this host's services
    /// (local backend, where SVC is optional and picks one); `q` or Ctrl-C ends it.
    Watch {
        service: Option<String>,
        /// Print one plain-text view and exit (needs no terminal).
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
            wait,
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
            if wait.wait {
                wait::fleet(&fleet, &service, &build, canary, wait.timeout()).await?;
            }
        }
        FleetVerb::Promote { service, wait } => {
            let build = fleet.promote(&service).await?;
            println!("{service}: promoted {build} to every host");
            if wait.wait {
                wait::fleet(&fleet, &service, &build, false, wait.timeout()).await?;
            }
        }
        FleetVerb::Rollback { service, wait } => {
            let build = fleet.rollback(&service).await?;
            println!("{service}: rolled back to {build}");
            if wait.wait {
                wait::fleet(&fleet, &service, &build, false, wait.timeout()).await?;
            }
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
            let Some(limit) = Limit::parse(&max_hosts_restarting) else {
                bail!(
                    "max_hosts_restarting must be a whole number from 1 to {max} or a percentage \
                     from 1% to 100%, not `{}`",
                    crate::clip::clip(&max_hosts_restarting)
                );
            };
            fleet.set_max_hosts_restarting(&service, limit).await?;
            match limit {
                Limit::Hosts(n) => println!("{service}: at most {n} host(s) restart at once"),
                Limit::Percent(p) => println!(
                    "{service}: at most {p}% of the hosts (rounded down, at least one) restart at once"
                ),
            }
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
        FleetVerb::Watch { service, once } => {
            let service = service.context(
                "with the zookeeper backend `watch` needs a service: `sluice watch SVC`",
            )?;
            if once {
                print!("{}", render(&service, &fleet.hosts(&service).await?));
            } else {
                super::watch::fleet(&fleet, &service).await?;
            }
        }
    }
    Ok(())
}

/// The local backend: deploys go to this host's daemon; the ZooKeeper-only verbs say so.
async fn local(host: &HostConfig, timeout_ms: Option<u64>, verb: FleetVerb) -> anyhow::Result<()> {
    let (request, wait) = match verb {
        FleetVerb::Deploy {
            service,
            build,
            canary,
            wait,
        } => (
            DeployRequest {
                service,
                verb: DeployVerb::Deploy,
                build: Some(build),
                canary,
            },
            wait,
        ),
        FleetVerb::Promote { service, wait } => (
            DeployRequest {
                service,
                verb: DeployVerb::Promote,
                build: None,
                canary: false,
            },
            wait,
        ),
        FleetVerb::Rollback { service, wait } => (
            DeployRequest {
                service,
                verb: DeployVerb::Rollback,
                build: None,
                canary: false,
            },
            wait,
        ),
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
        FleetVerb::Watch { service, once } => {
            let client = Client::new(host.control_socket(), timeout_ms);
            return super::watch::local(&client, service.as_deref(), once).await;
        }
        _ => bail!(
            "this verb needs the zookeeper backend (`[coordination] backend = \"zookeeper\"`)"
        ),
    };
    let client = Client::new(host.control_socket(), timeout_ms);
    let message = client.deploy(&request).await?.message;
    println!("{message}");
    if !wait.wait {
        return Ok(());
    }
    // This host takes canary builds only when its host file says so: a canary deploy elsewhere
    // changes nothing here.
    if request.canary && !host.coordination.canary {
        println!(
            "{}: this host is not a canary (`coordination.canary`): nothing to wait for",
            request.service
        );
        return Ok(());
    }
    let build = match &request.build {
        Some(build) => build.clone(),
        None => wait::build_in_answer(&message)
            .with_context(|| format!("the daemon's answer names no build: `{message}`"))?
            .to_owned(),
    };
    let name = host.coordination.host.as_deref().unwrap_or("local");
    wait::local(&client, name, &request.service, &build, wait.timeout()).await
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
