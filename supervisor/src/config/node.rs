//! ZooKeeper config nodes: JSON objects of service-file keys that override a host's service file,
//! limited to the keys the host file grants.

use super::ServiceConfig;

impl ServiceConfig {
    /// Applies a ZooKeeper config node to this service file (the base): the node is a JSON object
    /// of service-file keys that override the file's. Every key it sets must be one of `granted`
    /// (the host file's `coordination.config_node_keys`), else the whole node is refused naming
    /// the first key that is not; a granted table (`restart`) grants every key under it. Nested
    /// objects merge key by key, so `{"health": {"timeout_ms": 500}}` keeps the file's other
    /// health keys. The result is validated like a file.
    pub fn with_config_node(
        &self,
        node: &str,
        granted: &[String],
    ) -> Result<ServiceConfig, String> {
        let merged = self.merge_config_node(node, granted)?;
        // serde and the checks quote values, and these came from ZooKeeper: bounded.
        let config: ServiceConfig = serde_json::from_value(merged)
            .map_err(|e| crate::clip::clip(&e.to_string()).into_owned())?;
        config
            .validate()
            .map_err(|(key, message)| format!("key `{key}`: {}", crate::clip::clip(&message)))?;
        Ok(config)
    }

    /// The base as JSON with the node's keys merged in, after checking that each is granted.
    fn merge_config_node(
        &self,
        node: &str,
        granted: &[String],
    ) -> Result<serde_json::Value, String> {
        let overrides: serde_json::Value = serde_json::from_str(node)
            .map_err(|e| format!("not JSON: {}", crate::clip::clip(&e.to_string())))?;
        let serde_json::Value::Object(overrides) = overrides else {
            return Err("must be a JSON object of service-file keys".into());
        };
        check_granted("", &overrides, granted)?;
        let mut base = serde_json::to_value(self).expect("a service configuration serializes");
        merge_json(&mut base, serde_json::Value::Object(overrides));
        Ok(base)
    }

    /// What `sluice push-config` can check without a host's service file: the node is a JSON
    /// object, sets only keys `granted` allows, and its values have the right types.
    pub fn check_config_node(node: &str, granted: &[String]) -> Result<(), String> {
        let base = ServiceConfig::with_command(vec!["true".into()]);
        let merged = base.merge_config_node(node, granted)?;
        serde_json::from_value::<ServiceConfig>(merged)
            .map(drop)
            .map_err(|e| crate::clip::clip(&e.to_string()).into_owned())
    }
}

/// Refuses the first key of a config node that no granted key covers. A key is covered when it
/// is granted or lies under a granted table; an object is looked into only when some granted key
/// lies under it, so `env` is named whole rather than by one of its variables.
fn check_granted(
    prefix: &str,
    node: &serde_json::Map<String, serde_json::Value>,
    granted: &[String],
) -> Result<(), String> {
    for (name, value) in node {
        let key = format!("{prefix}{name}");
        let covered = granted
            .iter()
            .any(|g| *g == key || key.starts_with(&format!("{g}.")));
        if covered {
            continue;
        }
        let inner = format!("{key}.");
        if let serde_json::Value::Object(map) = value
            && granted.iter().any(|g| g.starts_with(&inner))
        {
            check_granted(&inner, map, granted)?;
            continue;
        }
        return Err(format!(
            "key `{}` may not be set by a config node on this host (the host file's `coordination.config_node_keys` does not grant it)",
            crate::clip::clip(&key)
        ));
    }
    Ok(())
}

/// Merges `overrides` into `base`: objects key by key, anything else replaced.
fn merge_json(base: &mut serde_json::Value, overrides: serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(&key) {
                    Some(slot) => merge_json(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{ConfigError, DEFAULT_CONFIG_NODE_KEYS};

    fn parse(text: &str) -> Result<ServiceConfig, ConfigError> {
        ServiceConfig::parse(Path::new("/etc/sluice/services/web.toml"), text)
    }

    /// A config node overrides only granted keys of the local file; anything else refuses the
    /// whole node, naming the key (clipped).
    #[test]
    fn config_nodes_set_only_granted_keys() {
        let base = parse(
            "command = [\"/bin/web\"]\nuser = \"web\"\nport_base = 9100\n[health]\nhttp = \"/h\"\ntimeout_ms = 900\n",
        )
        .unwrap();
        let granted: Vec<String> = DEFAULT_CONFIG_NODE_KEYS
            .iter()
            .map(|k| (*k).to_owned())
            .collect();
        let applied = base
            .with_config_node(
                r#"{"instances": 3, "health": {"timeout_ms": 500}, "restart": {"drain_timeout_ms": 1}}"#,
                &granted,
            )
            .unwrap();
        assert_eq!(applied.instances, 3);
        assert_eq!(applied.restart.drain_timeout_ms, 1);
        let health = applied.health.as_ref().unwrap();
        assert_eq!(health.timeout_ms, 500);
        assert_eq!(
            health.http.as_deref(),
            Some("/h"),
            "the file's other keys stay"
        );
        assert_eq!(applied.command, base.command);
        assert_eq!(applied.user, base.user);

        for (node, key) in [
            (r#"{"command": ["/bin/sh"]}"#, "command"),
            (r#"{"instances": 2, "user": "root"}"#, "user"),
            (r#"{"user": null}"#, "user"),
            (r#"{"group": "root"}"#, "group"),
            (r#"{"env": {"LD_PRELOAD": "/tmp/x.so"}}"#, "env"),
            (r#"{"directory": "/"}"#, "directory"),
            (r#"{"hooks": {"pre_restart": [["/bin/sh"]]}}"#, "hooks"),
            (r#"{"health": {"exec": ["/bin/sh"]}}"#, "health.exec"),
            (r#"{"health": null}"#, "health"),
            (r#"{"log": {"dir": "/etc"}}"#, "log"),
            (r#"{"build": {"source": "file:///x/{build}"}}"#, "build"),
            (r#"{"warmup": {"file": "/etc/shadow"}}"#, "warmup.file"),
        ] {
            let err = base.with_config_node(node, &granted).unwrap_err();
            assert!(
                err.starts_with(&format!("key `{key}` may not be set by a config node")),
                "{node}: {err}"
            );
        }
        let long = format!(r#"{{"{}": 1}}"#, "k".repeat(10_000));
        let err = base.with_config_node(&long, &granted).unwrap_err();
        assert!(err.len() < 500, "the key is clipped: {} bytes", err.len());
        let long = format!(r#"{{"instances": "{}"}}"#, "v".repeat(10_000));
        let err = base.with_config_node(&long, &granted).unwrap_err();
        assert!(err.len() < 500, "the value is clipped: {} bytes", err.len());
        assert!(base.with_config_node("[1]", &granted).is_err());
        assert!(
            base.with_config_node("{bad", &granted)
                .unwrap_err()
                .starts_with("not JSON")
        );
        let err = base
            .with_config_node(r#"{"instances": 0}"#, &granted)
            .unwrap_err();
        assert!(err.contains("key `instances`"), "{err}");
        // A host may grant more, down to one variable.
        let mut more = granted.clone();
        more.push("env.LANG".into());
        let applied = base
            .with_config_node(r#"{"env": {"LANG": "C.UTF-8"}}"#, &more)
            .unwrap();
        assert_eq!(applied.env["LANG"], "C.UTF-8");
        assert!(ServiceConfig::check_config_node(r#"{"instances": "x"}"#, &granted).is_err());
        assert!(ServiceConfig::check_config_node(r#"{"instances": 2}"#, &granted).is_ok());
    }
}
