//! Placeholders (`{port}`, `{instance}`, `{service}`, `{release_dir}`) in commands, directories
//! and environments, and their substitution for one instance.

use std::path::Path;

pub(super) fn check_placeholders(text: &str, has_ports: bool) -> Result<(), String> {
    let subst = Substitutions {
        service: "",
        instance: 0,
        port: has_ports.then_some(1),
        release_dir: Some(Path::new("/")),
    };
    subst.apply(text).map(drop)
}

/// Values substituted into one instance's command, directory and environment.
pub struct Substitutions<'a> {
    pub service: &'a str,
    pub instance: u32,
    pub port: Option<u16>,
    pub release_dir: Option<&'a Path>,
}

impl Substitutions<'_> {
    /// Replaces placeholders; `{{` and `}}` stand for literal braces. An unknown placeholder, or
    /// `{release_dir}` without a release, is an error naming it.
    pub fn apply(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(pos) = rest.find(['{', '}']) {
            out.push_str(&rest[..pos]);
            let tail = &rest[pos..];
            if let Some(after) = tail.strip_prefix("{{") {
                out.push('{');
                rest = after;
                continue;
            }
            if let Some(after) = tail.strip_prefix("}}") {
                out.push('}');
                rest = after;
                continue;
            }
            if tail.starts_with('}') {
                return Err(format!(
                    "lone `}}` in `{text}` (write `}}}}` for a literal brace)"
                ));
            }
            let after = &tail[1..];
            let end = after.find('}').ok_or_else(|| {
                format!("unclosed `{{` in `{text}` (write `{{{{` for a literal brace)")
            })?;
            match &after[..end] {
                "port" => out.push_str(
                    &self
                        .port
                        .ok_or_else(|| format!("`{{port}}` in `{text}` needs `port_base`"))?
                        .to_string(),
                ),
                "instance" => out.push_str(&self.instance.to_string()),
                "service" => out.push_str(self.service),
                "release_dir" => {
                    let dir = self.release_dir.ok_or_else(|| {
                        format!(
                            "service {} uses `{{release_dir}}` but has no installed release",
                            self.service
                        )
                    })?;
                    out.push_str(&dir.to_string_lossy());
                }
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` in `{text}` (known: {{port}}, {{instance}}, {{service}}, {{release_dir}}; write `{{{{` for a literal brace)"
                    ));
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution() {
        let s = Substitutions {
            service: "web",
            instance: 2,
            port: Some(9102),
            release_dir: None,
        };
        assert_eq!(
            s.apply("--port={port} {service}-{instance}").unwrap(),
            "--port=9102 web-2"
        );
        assert_eq!(s.apply("{{\"a\": {port}}}").unwrap(), "{\"a\": 9102}");
        assert!(s.apply("x}y").is_err());
        assert!(s.apply("{port").is_err());
        assert!(
            s.apply("{release_dir}/bin")
                .unwrap_err()
                .contains("no installed release")
        );
    }
}
