//! The deployer's verbs: `deploy`, `promote`, `rollback`, `register`, `builds`, `hosts`, `role`,
//! `limit`, `push-config`, `watch`. With the ZooKeeper backend they write and read the nodes of
//! DESIGN.md directly; on the local backend `deploy`, `promote` and `rollback` go to this host's
//! daemon and `builds` lists the releases on disk.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context as _, bail};
use hyper::Method;

use crate::cli::Command;
use crate::client;
use crate::config::{Backend, HostConfig, ServiceConfig};
use crate::coord::{BuildMeta, Fleet, Role};

/// How often `watch` redraws.
const WATCH_INTERVAL_MS: u64 = 500;

pub async fn main(host: &HostConfig, verb: Command) -> anyhow::Result<()> {
    if host.coordination.backend == Backend::Local {
        return local(host, verb).await;
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
        Command::Deploy {
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
        Command::Promote { service } => {
            let build = fleet.promote(&service).await?;
            println!("{service}: promoted {build} to every host");
        }
        Command::Rollback { service } => {
            let build = fleet.rollback(&service).await?;
            println!("{service}: rolled back to {build}");
        }
        Command::Register {
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
        Command::Builds { service } => {
            for (build, meta) in fleet.builds(&service).await? {
                println!("{build:<24} {} sha256:{}", meta.url, meta.sha256);
            }
        }
        Command::Hosts { service, json } => {
            let hosts = fleet.hosts(&service).await?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> = hosts.into_iter().collect();
                println!("{}", serde_json::to_string_pretty(&map)?);
            } else {
                print!("{}", render(&service, &hosts));
            }
        }
        Command::Role {
            service,
            host,
            role,
        } => {
            let role = match role.as_str() {
                "canary" => Role::Canary,
                "prod" => Role::Prod,
                other => bail!("role must be `canary` or `prod`, not `{other}`"),
            };
            let name = format!("{role:?}").to_lowercase();
            fleet.set_role(&service, &host, role).await?;
            println!("{service}: {host} is now {name}");
        }
        Command::Limit {
            service,
            max_hosts_restarting,
        } => {
            if max_hosts_restarting == 0 {
                bail!("max_hosts_restarting must be at least 1");
            }
            fleet
                .set_max_hosts_restarting(&service, max_hosts_restarting)
                .await?;
            println!("{service}: at most {max_hosts_restarting} host(s) restart at once");
        }
        Command::PushConfig { service, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Refuse here what every host would refuse: the fleet keeps its configuration.
            // Checked against this host file's `config_node_keys`; every host checks against its own.
            ServiceConfig::check_config_node(&text, &host.coordination.config_node_keys)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            fleet.set_config(&service, &text).await?;
            println!("{service}: configuration published");
        }
        Command::Watch { service, once } => loop {
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
        _ => unreachable!("only fleet verbs come here"),
    }
    Ok(())
}

/// The local backend: deploys go to this host's daemon; the ZooKeeper-only verbs say so.
async fn local(host: &HostConfig, verb: Command) -> anyhow::Result<()> {
    let (service, verb, build, canary) = match verb {
        Command::Deploy {
            service,
            build,
            canary,
        } => (service, "deploy", Some(build), canary),
        Command::Promote { service } => (service, "promote", None, false),
        Command::Rollback { service } => (service, "rollback", None, false),
        Command::Builds { service } => {
            let releases = crate::build::Releases::new(&host.data_dir, &service);
            let current = releases.current();
            for build in releases.list() {
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
    let body = serde_json::json!({
        "service": service, "verb": verb, "build": build, "canary": canary,
    });
    let answer = client::call(
        &host.control_socket(),
        Method::POST,
        "/v1/deploy",
        Some(body),
    )
    .await?;
    if let Some(message) = answer.get("message").and_then(|m| m.as_str()) {
        println!("{message}");
    }
    Ok(())
}

/// The hosts of a service as a table: host, state, build, instances in steering, last error.
fn render(service: &str, hosts: &[(String, serde_json::Value)]) -> String {
    let mut out = format!(
        "{service}: {} host(s)\n{:<16} {:<11} {:<16} {:<16} {:<10} {}\n",
        hosts.len(),
        "HOST",
        "STATE",
        "BUILD",
        "TARGET",
        "UP",
        "LAST ERROR"
    );
    for (host, status) in hosts {
        let instances = status["instances"].as_array().cloned().unwrap_or_default();
        let enabled = instances.iter().filter(|i| i["enabled"] == true).count();
        let running = instances.iter().filter(|i| i["state"] == "running").count();
        // Without steering, `enabled` is null: show how many run instead.
        let steered = instances.iter().any(|i| !i["enabled"].is_null());
        let shown = if steered { enabled } else { running };
        out.push_str(&format!(
            "{:<16} {:<11} {:<16} {:<16} {:<10} {}\n",
            host,
            status["state"].as_str().unwrap_or("?"),
            status["build"].as_str().unwrap_or("-"),
            status["target_build"].as_str().unwrap_or("-"),
            format!("{shown}/{}", instances.len()),
            status["last_error"].as_str().unwrap_or(""),
        ));
    }
    out
}
