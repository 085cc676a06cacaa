//! The import's report: every service file written, and every section or key that was not carried
//! over, or carried over with a different meaning, each with its file, line and why.

use std::fmt::Write as _;

/// How far a section or key made it into the service files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// What a program did under supervisord that its service will not do under sluice. Any of
    /// these makes the import incomplete (exit code [`super::EXIT_INCOMPLETE`]).
    NotCarried,
    /// Carried over, with a difference the operator should know (a log file's name, the whole
    /// environment, a rename).
    Changed,
    /// A setting of supervisord itself (its own log, pid file, control server): nothing of a
    /// program, and sluice's host file has its own where there is an equivalent.
    Supervisord,
}

impl Kind {
    fn heading(self) -> &'static str {
        match self {
            Kind::NotCarried => "not carried over (the service will not do this)",
            Kind::Changed => "carried over differently",
            Kind::Supervisord => {
                "supervisord's own settings (not about a program; nothing to carry)"
            }
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub kind: Kind,
    /// `file:line` of the section or key.
    pub place: String,
    /// The section's name, as written (`program:web`).
    pub section: String,
    /// The key, or `None` for the whole section.
    pub key: Option<String>,
    pub why: String,
}

/// A service file the import wrote (or would write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub service: String,
    /// What it came from and what it holds, in a few words.
    pub summary: String,
}

/// Everything the operator should read after an import.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub items: Vec<Item>,
    pub written: Vec<Written>,
}

impl Report {
    pub fn add(
        &mut self,
        kind: Kind,
        place: String,
        section: &str,
        key: Option<&str>,
        why: impl Into<String>,
    ) {
        self.items.push(Item {
            kind,
            place,
            section: section.to_owned(),
            key: key.map(str::to_owned),
            why: why.into(),
        });
    }

    /// Whether every program's behaviour was carried over (notes of the other kinds allowed).
    pub fn complete(&self) -> bool {
        !self.items.iter().any(|i| i.kind == Kind::NotCarried)
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.items.iter().filter(|i| i.kind == kind).count()
    }

    /// The report as text: the services written, then the items by kind, then the verdict.
    pub fn render(&self, source: &str, out_dir: &str) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "sluice import-supervisord {source}: {} service file(s) in {out_dir}",
            self.written.len()
        );
        for w in &self.written {
            let _ = writeln!(text, "  {}.toml: {}", w.service, w.summary);
        }
        for kind in [Kind::NotCarried, Kind::Changed, Kind::Supervisord] {
            let items: Vec<&Item> = self.items.iter().filter(|i| i.kind == kind).collect();
            if items.is_empty() {
                continue;
            }
            let _ = writeln!(text, "{} ({}):", kind.heading(), items.len());
            for i in items {
                let what = match &i.key {
                    Some(key) => format!("[{}] {key}", i.section),
                    None => format!("[{}]", i.section),
                };
                let _ = writeln!(text, "  {}: {what}: {}", i.place, i.why);
            }
        }
        if self.complete() {
            let _ = writeln!(text, "complete: every program's settings were carried over");
        } else {
            let _ = writeln!(
                text,
                "incomplete: {} setting(s) not carried over (see above)",
                self.count(Kind::NotCarried)
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_complete_unless_something_was_not_carried() {
        let mut r = Report::default();
        r.written.push(Written {
            service: "web".into(),
            summary: "4 instances".into(),
        });
        r.add(
            Kind::Changed,
            "a.conf:3".into(),
            "program:web",
            Some("redirect_stderr"),
            "kept apart",
        );
        r.add(
            Kind::Supervisord,
            "a.conf:1".into(),
            "supervisord",
            Some("pidfile"),
            "systemd",
        );
        assert!(r.complete());
        let text = r.render("a.conf", "out");
        assert!(text.contains("  web.toml: 4 instances"), "{text}");
        assert!(
            text.contains("  a.conf:3: [program:web] redirect_stderr: kept apart"),
            "{text}"
        );
        assert!(
            text.ends_with("complete: every program's settings were carried over\n"),
            "{text}"
        );
        r.add(
            Kind::NotCarried,
            "a.conf:9".into(),
            "eventlistener:x",
            None,
            "no events",
        );
        assert!(!r.complete());
        let text = r.render("a.conf", "out");
        assert!(
            text.contains("  a.conf:9: [eventlistener:x]: no events"),
            "{text}"
        );
        assert!(
            text.ends_with("incomplete: 1 setting(s) not carried over (see above)\n"),
            "{text}"
        );
    }
}
