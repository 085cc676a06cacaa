//! One instance's launch specification, derived from its service's configuration: argv, environment,
//! identity, limits and log files, and the tag (a hash) that tells whether a running instance still
//! matches its configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{HostConfig, ServiceConfig, Substitutions, parse_umask};

/// Everything the shim needs to start one instance. Serialized only to compute the tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceSpec {
    pub service: String,
    pub index: u32,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub directory: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: Option<Vec<u32>>,
    pub umask: Option<u32>,
    pub nofile: Option<u64>,
    pub stdout_log: PathBuf,
    pub stderr_log: PathBuf,
    pub log_max_bytes: u64,
    pub log_backups: u32,
}

impl InstanceSpec {
    /// Builds the spec of instance `index`. Fails, naming the service, when a user or group does
    /// not exist or a placeholder cannot be filled.
    pub fn build(
        host: &HostConfig,
        service: &str,
        config: &ServiceConfig,
        index: u32,
        release_dir: Option<&Path>,
    ) -> Result<InstanceSpec, String> {
        let subst = Substitutions {
            service,
            instance: index,
            port: config.port(index),
            release_dir,
        };
        let mut argv = config
            .command
            .iter()
            .map(|a| subst.apply(a))
            .collect::<Result<Vec<_>, _>>()?;
        let env = config
            .env
            .iter()
            .map(|(k, v)| Ok((k.clone(), subst.apply(v)?)))
            .collect::<Result<BTreeMap<_, _>, String>>()?;
        argv[0] = resolve_program(&argv[0], env.get("PATH").map(String::as_str))
            .ok_or_else(|| format!("service {service}: program `{}` not found in PATH", argv[0]))?;
        // Without a configured directory the instance starts in `/`, never in whatever directory
        // the daemon happened to be started from.
        let directory = match config.directory.as_deref() {
            Some(d) => PathBuf::from(subst.apply(d)?),
            None => PathBuf::from("/"),
        };
        let (uid, gid, groups) = identity(service, config)?;
        let log_dir = config
            .log
            .dir
            .clone()
            .unwrap_or_else(|| host.data_dir.join("logs"));
        Ok(InstanceSpec {
            service: service.to_owned(),
            index,
            argv,
            env,
            directory,
            uid,
            gid,
            groups,
            umask: config.umask.as_deref().and_then(parse_umask),
            nofile: config.nofile,
            stdout_log: log_dir.join(format!("{service}-{index}.stdout.log")),
            stderr_log: log_dir.join(format!("{service}-{index}.stderr.log")),
            log_max_bytes: config.log.max_bytes,
            log_backups: config.log.backups,
        })
    }

    /// A short hash of everything that shapes the running process; equal tags mean an instance
    /// needs no restart after a reload.
    pub fn tag(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("spec serializes");
        let digest = Sha256::digest(&bytes);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Resolves a program name the way a shell would, in the instance's PATH, or the daemon's own PATH
/// when the instance has none (supervisord does the same). Names with a `/` are taken as given.
fn resolve_program(program: &str, path: Option<&str>) -> Option<String> {
    if program.contains('/') {
        return Some(program.to_owned());
    }
    let daemon_path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
    let search = path.unwrap_or(&daemon_path);
    search
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|candidate| is_executable(candidate))
        .map(|p| p.to_string_lossy().into_owned())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub type Identity = (Option<u32>, Option<u32>, Option<Vec<u32>>);

/// uid, gid and supplementary groups for the configured user; all `None` when no user is set.
pub fn identity(service: &str, config: &ServiceConfig) -> Result<Identity, String> {
    use nix::unistd::{Group, User};
    let Some(user_name) = &config.user else {
        return Ok((None, None, None));
    };
    let user = User::from_name(user_name)
        .map_err(|e| format!("service {service}: cannot look up user `{user_name}`: {e}"))?
        .ok_or_else(|| format!("service {service}: no user named `{user_name}`"))?;
    let group_id = |name: &str| -> Result<u32, String> {
        Group::from_name(name)
            .map_err(|e| format!("service {service}: cannot look up group `{name}`: {e}"))?
            .map(|g| g.gid.as_raw())
            .ok_or_else(|| format!("service {service}: no group named `{name}`"))
    };
    let gid = match &config.group {
        Some(name) => group_id(name)?,
        None => user.gid.as_raw(),
    };
    let groups = match &config.groups {
        Some(names) => names
            .iter()
            .map(|n| group_id(n))
            .collect::<Result<Vec<_>, _>>()?,
        None => {
            let cname = std::ffi::CString::new(user_name.as_str())
                .map_err(|_| format!("service {service}: user name contains a NUL byte"))?;
            nix::unistd::getgrouplist(&cname, nix::unistd::Gid::from_raw(gid))
                .map_err(|e| {
                    format!("service {service}: cannot list groups of `{user_name}`: {e}")
                })?
                .into_iter()
                .map(|g| g.as_raw())
                .collect()
        }
    };
    Ok((Some(user.uid.as_raw()), Some(gid), Some(groups)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_argv_env_and_logs() {
        let host = HostConfig {
            data_dir: "/var/lib/sluice".into(),
            ..HostConfig::default()
        };
        let mut c =
            ServiceConfig::with_command(vec!["sh".into(), "-c".into(), "serve {port}".into()]);
        c.port_base = Some(9100);
        c.instances = 3;
        c.env.insert("NAME".into(), "{service}-{instance}".into());
        let spec = InstanceSpec::build(&host, "web", &c, 2, None).unwrap();
        assert!(spec.argv[0].ends_with("/sh"), "{:?}", spec.argv);
        assert_eq!(spec.argv[2], "serve 9102");
        assert_eq!(spec.env["NAME"], "web-2");
        assert_eq!(
            spec.stdout_log,
            Path::new("/var/lib/sluice/logs/web-2.stdout.log")
        );
        let other = InstanceSpec::build(&host, "web", &c, 1, None).unwrap();
        assert_ne!(spec.tag(), other.tag());
        assert_eq!(
            spec.tag(),
            InstanceSpec::build(&host, "web", &c, 2, None)
                .unwrap()
                .tag()
        );
        c.command[0] = "no-such-program-anywhere".into();
        let err = InstanceSpec::build(&host, "web", &c, 0, None).unwrap_err();
        assert!(
            err.contains("`no-such-program-anywhere` not found"),
            "{err}"
        );
        c.command[0] = "sh".into();
        c.user = Some("no-such-user-here".into());
        let err = InstanceSpec::build(&host, "web", &c, 0, None).unwrap_err();
        assert!(err.contains("no user named `no-such-user-here`"), "{err}");
    }
}
