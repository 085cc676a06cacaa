//! Host and service configuration: parsing, defaults, validation, and errors that name file, line and key.
//!
//! The host file (`sluice.toml`) says where things live; one file per service in `services_dir`
//! says what to run. Every key is documented once, with unit and default, in `docs/config.md`; a
//! test checks that the page and these structs agree.
//!
//! - `host`: the host file.
//! - `service`: one service file's top-level keys; `sections`: its `[build]`, `[hooks]`,
//!   `[restart]` and `[health]`; `warmup`: its `[warmup]` and the request lines; `canary`: its
//!   `[canary]`.
//! - `signal`: signals by name or number.
//! - `validate`: what serde cannot check, one function per part of a service file.
//! - `placeholders`: `{port}` and the others, checked and substituted.
//! - `node`: ZooKeeper config nodes over a service file, limited to granted keys.
//! - `order`: loading a services directory, `after` dependencies, start order.
//! - `errors`: [`ConfigError`] and where in a TOML text a fault is.
//!
//! Everything public is re-exported here: callers name `crate::config::X`, never a submodule.

mod canary;
mod errors;
mod host;
mod node;
mod order;
mod peers;
mod placeholders;
mod sections;
mod service;
mod signal;
mod validate;
mod warmup;

pub use canary::{
    CANARY_PROBE_RATE_MAX, CANARY_SAMPLE_INTERVAL_MAX_MS, CANARY_SAMPLE_INTERVAL_MIN_MS,
    CanaryConfig, OnFail, OnPass,
};
pub use errors::ConfigError;
pub use host::{
    Backend, CgroupsMode, CoordinationConfig, DEFAULT_CONFIG_NODE_KEYS, DEFAULT_HOST_CONFIG,
    HostConfig, IptablesVariant, MetricsConfig,
};
pub use order::{Services, load_services, start_order};
pub use peers::{DEFAULT_PEER_PORT, DEFAULT_RACK, PeerConfig};
pub use placeholders::Substitutions;
pub use sections::{
    BatchSpec, BuildConfig, HealthConfig, HooksConfig, RestartConfig, SteeringKind, StrategyName,
};
pub use service::{
    Autorestart, INSTANCES_MAX, LogConfig, SERVICE_NAME_MAX_LEN, ServiceConfig, check_service_name,
    parse_umask,
};
pub use signal::Signal;
pub use warmup::{SIBLING_SAMPLE_MAX, WarmRequest, WarmupConfig, WarmupUntil, parse_request};

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every key of the host and service files is documented in docs/config.md, and nothing more.
    #[test]
    fn reference_page_documents_every_key() {
        let page = include_str!("../../../docs/config.md");
        let mut keys = BTreeSet::new();
        let mut service = ServiceConfig::with_command(vec!["x".into()]);
        service.health = Some(toml::from_str("").unwrap());
        service.warmup = Some(toml::from_str("").unwrap());
        service.build = Some(toml::from_str("source = \"x\"").unwrap());
        service.canary = Some(toml::from_str("metrics = \"/metrics\"").unwrap());
        collect_keys("", &serde_json::to_value(&service).unwrap(), &mut keys);
        collect_keys(
            "",
            &serde_json::to_value(HostConfig::default()).unwrap(),
            &mut keys,
        );
        let documented: BTreeSet<String> = page
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_owned)
            .collect();
        let missing: Vec<_> = keys.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&keys).collect();
        assert!(missing.is_empty(), "undocumented keys: {missing:?}");
        assert!(
            extra.is_empty(),
            "documented keys that do not exist: {extra:?}"
        );
    }

    fn collect_keys(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
        let serde_json::Value::Object(map) = value else {
            return;
        };
        for (k, v) in map {
            let key = format!("{prefix}{k}");
            if v.is_object() && k != "env" {
                collect_keys(&format!("{key}."), v, out);
            } else {
                out.insert(key);
            }
        }
    }

    /// `config` is a leaf of the crate: it names no other module but `clip` (bounded quoting) and
    /// `build` (one default), so nothing it depends on can depend on it back (the warm-up runner
    /// imports its request type from here, never the reverse). Reads the code before the tests of
    /// every file of this folder, so a new file is checked too.
    #[test]
    fn config_depends_on_no_other_module() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
        let allowed = [
            "crate::config",
            "crate::clip::",
            "crate::build::DEFAULT_MAX_ENTRIES",
        ];
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            files += 1;
            for (n, line) in code.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                for (at, _) in code.match_indices("crate::") {
                    assert!(
                        allowed.iter().any(|a| code[at..].starts_with(a)),
                        "{}:{}: `config` uses another module: {line}",
                        path.display(),
                        n + 1
                    );
                }
            }
        }
        assert!(files >= 10, "read only {files} files of {}", dir.display());
    }
}
