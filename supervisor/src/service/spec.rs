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
        let identity = identity(host, service, config)?;
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
            uid: identity.as_ref().map(|i| i.uid),
            gid: identity.as_ref().map(|i| i.gid),
            groups: identity.map(|i| i.groups),
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

/// Who an instance, a hook or an `exec` probe of a service runs as; `None`: as the daemon itself
/// (a daemon that is not root, or a root daemon whose host allows root for a service without
/// `user`).
pub type Identity = Option<sluice_hooks::Identity>;

/// Resolves the service's `user` (and `group`, `groups`) and applies the host's `allow_root`. A
/// user or group that does not exist is an error naming it; nothing ever falls back to root.
/// Without `user`, a root daemon runs the service as root only when the host allows root; a
/// daemon that is not root runs it as itself.
pub fn identity(
    host: &HostConfig,
    service: &str,
    config: &ServiceConfig,
) -> Result<Identity, String> {
    let daemon_uid = nix::unistd::geteuid().as_raw();
    resolve_identity(host.allow_root, daemon_uid, service, config)
}

fn resolve_identity(
    allow_root: bool,
    daemon_uid: u32,
    service: &str,
    config: &ServiceConfig,
) -> Result<Identity, String> {
    use nix::unistd::{Group, User};
    let Some(user_name) = &config.user else {
        if daemon_uid != 0 {
            return Ok(None);
        }
        if !allow_root {
            return Err(format!(
                "service {service} sets no `user`, so it would run as root, and the host file does not set `allow_root = true`"
            ));
        }
        // As the daemon, root: the same launch spec (and tag) as before `allow_root` existed,
        // so hosts that allow root restart nothing when they upgrade.
        return Ok(None);
    };
    let user = User::from_name(user_name)
        .map_err(|e| format!("service {service}: cannot look up user `{user_name}`: {e}"))?
        .ok_or_else(|| format!("service {service}: no user named `{user_name}`"))?;
    if user.uid.is_root() && !allow_root {
        return Err(format!(
            "service {service}: user `{user_name}` is root, and the host file does not set `allow_root = true`"
        ));
    }
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
    Ok(Some(sluice_hooks::Identity {
        uid: user.uid.as_raw(),
        gid,
        groups,
    }))
}

/// Checks every service's identity, so that `sluice run`, `sluice reload` and `check-config`
/// refuse a service that cannot run as configured before anything starts.
pub fn check_identities(
    host: &HostConfig,
    services: &crate::config::Services,
) -> Result<(), String> {
    for (name, config) in services {
        identity(host, name, config)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_argv_env_and_logs() {
        let host = HostConfig {
            data_dir: "/var/lib/sluice".into(),
            allow_root: true,
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

    /// The identity matrix without processes: {no user, unknown, nobody, root} × root allowed or
    /// not × a root daemon or not. Nothing unresolvable or disallowed becomes root.
    #[test]
    fn identity_follows_user_and_allow_root() {
        let with_user = |user: Option<&str>| {
            let mut c = ServiceConfig::with_command(vec!["x".into()]);
            c.user = user.map(str::to_owned);
            c
        };
        let uid_of = |r: Result<Identity, String>| r.map(|i| i.map(|i| i.uid));
        for allow_root in [false, true] {
            // A daemon that is not root runs a service without `user` as itself.
            assert_eq!(
                uid_of(resolve_identity(allow_root, 1000, "web", &with_user(None))),
                Ok(None)
            );
            let err = resolve_identity(allow_root, 0, "web", &with_user(Some("no-such-user-x")))
                .unwrap_err();
            assert_eq!(err, "service web: no user named `no-such-user-x`");
            assert_eq!(
                uid_of(resolve_identity(
                    allow_root,
                    0,
                    "web",
                    &with_user(Some("nobody"))
                )),
                Ok(Some(65534))
            );
        }
        // Root, as the daemon or by name, only when the host allows it.
        assert_eq!(
            uid_of(resolve_identity(true, 0, "web", &with_user(None))),
            Ok(None)
        );
        assert_eq!(
            uid_of(resolve_identity(true, 0, "web", &with_user(Some("root")))),
            Ok(Some(0))
        );
        let err = resolve_identity(false, 0, "web", &with_user(None)).unwrap_err();
        assert!(
            err.starts_with("service web sets no `user`") && err.contains("allow_root = true"),
            "{err}"
        );
        let err = resolve_identity(false, 0, "web", &with_user(Some("root"))).unwrap_err();
        assert!(
            err.starts_with("service web: user `root` is root") && err.contains("allow_root"),
            "{err}"
        );
    }
}
