//! Configuration errors, and where in a TOML text they are: the line of a byte offset, the dotted
//! key that covers it, the line where a key is defined.

use std::path::{Path, PathBuf};

/// A configuration problem, always naming the file and, where one is at fault, the key and its line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Service { path: PathBuf, message: String },
}

pub(super) fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim_end().to_owned();
        let message = match e.span() {
            Some(span) => {
                let line = line_at(text, span.start);
                match key_at(text, span.start) {
                    // serde names unknown fields itself; for the rest, say which key is at fault.
                    Some(key) if !message.contains(&format!("`{key}`")) => {
                        format!("line {line}: key `{key}`: {message}")
                    }
                    _ => format!("line {line}: {message}"),
                }
            }
            None => message,
        };
        ConfigError::Parse {
            path: path.to_owned(),
            message,
        }
    })
}

/// The dotted key whose value (or key) covers byte `offset`, if the text parses as TOML.
fn key_at(text: &str, offset: usize) -> Option<String> {
    fn search(table: &toml::de::DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
        for (key, value) in table.iter() {
            path.push(key.get_ref().to_string());
            // A table's span may cover only its `[header]`: look inside every table.
            let found = match value.get_ref() {
                toml::de::DeValue::Table(inner) => {
                    key.span().contains(&offset) || search(inner, offset, path)
                }
                _ => key.span().contains(&offset) || value.span().contains(&offset),
            };
            if found {
                return true;
            }
            path.pop();
        }
        false
    }
    let table = toml::de::DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    search(table.get_ref(), offset, &mut path).then(|| path.join("."))
}

/// The 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The 1-based line where a top-level (or `table.key`) key is defined; 1 when not found.
pub(super) fn line_of_key(text: &str, key: &str) -> usize {
    let Ok(table) = toml::de::DeTable::parse(text) else {
        return 1;
    };
    let mut parts = key.split('.');
    let first = parts.next().unwrap_or_default();
    let mut span = None;
    let mut current = table.get_ref();
    let mut want = Some(first);
    while let Some(name) = want {
        let Some((k, v)) = current.iter().find(|(k, _)| k.get_ref() == name) else {
            break;
        };
        span = Some(k.span());
        want = parts.next();
        match v.get_ref() {
            toml::de::DeValue::Table(t) => current = t,
            _ => break,
        }
    }
    span.map_or(1, |s| line_at(text, s.start))
}
