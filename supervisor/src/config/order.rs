//! A host's service files as a whole: loading every file of the services directory, checking the
//! `after` dependencies between them, and the start order they give.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::{ConfigError, ServiceConfig, check_service_name};

/// All service files of a host, keyed by service name.
pub type Services = BTreeMap<String, ServiceConfig>;

/// Reads every `*.toml` in `dir`; any bad file fails the whole load, so nothing half-applies.
pub fn load_services(dir: &Path) -> Result<Services, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ConfigError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut services = Services::new();
    for path in paths {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        check_service_name(&name).map_err(|message| ConfigError::Service {
            path: path.clone(),
            message,
        })?;
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        services.insert(name, ServiceConfig::parse(&path, &text)?);
    }
    check_dependencies(dir, &services)?;
    Ok(services)
}

/// `after` must name existing services and must not form a cycle.
fn check_dependencies(dir: &Path, services: &Services) -> Result<(), ConfigError> {
    for (name, config) in services {
        for dep in &config.after {
            if !services.contains_key(dep) {
                return Err(ConfigError::Service {
                    path: dir.join(format!("{name}.toml")),
                    message: format!("key `after`: no service named `{dep}`"),
                });
            }
        }
    }
    start_order(services)
        .map(|_| ())
        .map_err(|cycle| ConfigError::Service {
            path: dir.to_owned(),
            message: format!("`after` forms a cycle through {}", cycle.join(", ")),
        })
}

/// Services in start order: every service after those it names in `after`, then by priority and name.
/// Errors with the services left in a cycle.
pub fn start_order(services: &Services) -> Result<Vec<String>, Vec<String>> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(services.len());
    while order.len() < services.len() {
        let next = services
            .iter()
            .filter(|(name, _)| !done.contains(name.as_str()))
            .filter(|(_, config)| config.after.iter().all(|d| done.contains(d.as_str())))
            .min_by_key(|(name, config)| (config.priority, name.as_str()));
        match next {
            Some((name, _)) => {
                done.insert(name);
                order.push(name.clone());
            }
            None => {
                return Err(services
                    .keys()
                    .filter(|n| !done.contains(n.as_str()))
                    .cloned()
                    .collect());
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_order_respects_after_then_priority() {
        let mut services = Services::new();
        let mut db = ServiceConfig::with_command(vec!["db".into()]);
        db.priority = 500;
        let mut web = ServiceConfig::with_command(vec!["web".into()]);
        web.after = vec!["db".into()];
        web.priority = 1;
        let mut cache = ServiceConfig::with_command(vec!["cache".into()]);
        cache.priority = 1;
        services.insert("db".into(), db);
        services.insert("web".into(), web);
        services.insert("cache".into(), cache);
        assert_eq!(start_order(&services).unwrap(), ["cache", "db", "web"]);
        services.get_mut("db").unwrap().after = vec!["web".into()];
        assert_eq!(start_order(&services).unwrap_err(), ["db", "web"]);
    }
}
