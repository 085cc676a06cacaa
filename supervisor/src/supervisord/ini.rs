//! A reader of supervisord's configuration files: Python's `configparser.RawConfigParser` the way
//! supervisord 4 sets it up (`inline_comment_prefixes = (";", "#")`, `strict = False`, keys lower
//! case), and supervisord's one level of `[include] files =`.
//!
//! It follows configparser line by line rather than a generic INI crate, because the details decide
//! what a program's command is: a `;` or `#` starts a comment only at the start of a line or after
//! whitespace (`a;b` is a value), a line indented deeper than its option continues the value, a
//! blank line inside a value is kept, `key: value` is the same as `key = value`, a section given twice
//! merges (the later key wins), and `[DEFAULT]` gives every section its keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::ImportError;

/// Largest supervisord file read: real ones are a few KiB; this keeps a wrong path (a log, a
/// device) from being read into memory.
pub const INI_FILE_MAX_BYTES: u64 = 1024 * 1024;
/// Most files that `[include] files =` may bring in.
pub const INCLUDE_FILES_MAX: usize = 1024;

/// One option's value with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// The value, continuation lines joined with `\n`, trailing whitespace removed.
    pub text: String,
    /// Index into [`Ini::files`] of the file the option line is in (its directory is `%(here)s`).
    pub file: usize,
    /// 1-based line of the option.
    pub line: usize,
}

/// One `[section]` with every option given to it, in any file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The name between the brackets, as written (`program:web`).
    pub name: String,
    /// Where the section was first opened.
    pub file: usize,
    pub line: usize,
    /// Options by lower-case key; a key given again replaces the value (configparser, not strict).
    pub options: BTreeMap<String, Value>,
}

/// Everything read from a supervisord configuration and its includes.
#[derive(Debug, Default)]
pub struct Ini {
    /// The files read, the main one first, absolute.
    pub files: Vec<PathBuf>,
    /// Sections in the order they first appeared (`[DEFAULT]` is not one of them).
    pub sections: Vec<Section>,
    /// `[DEFAULT]`'s options: every section falls back to them.
    pub defaults: BTreeMap<String, Value>,
    /// `[include]` headers found in included files: supervisord reads the files of the main file's
    /// `[include]` only, so these are not followed (file index, line).
    pub nested_includes: Vec<(usize, usize)>,
    /// Patterns of `[include] files` that matched no file (supervisord warns and goes on).
    pub unmatched_includes: Vec<String>,
}

impl Ini {
    /// Reads `path` and the files its `[include]` section names, as supervisord does.
    pub fn load(
        path: &Path,
        expand_include: impl Fn(&Value, &Path) -> Result<String, String>,
    ) -> Result<Ini, ImportError> {
        let main = std::path::absolute(path).map_err(|source| ImportError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut ini = Ini::default();
        ini.read_file(&main, false)?;
        let Some(include) = ini.section("include").cloned() else {
            return Ok(ini);
        };
        let files = include
            .options
            .get("files")
            .ok_or_else(|| ImportError::Config {
                path: ini.files[include.file].clone(),
                line: include.line,
                message: "[include] has no `files` setting".into(),
            })?;
        let files = expand_include(files, &main).map_err(|message| ImportError::Config {
            path: ini.files[files.file].clone(),
            line: files.line,
            message: format!("[include] files: {message}"),
        })?;
        let base = main.parent().unwrap_or(Path::new("/")).to_owned();
        // Python's glob: `*` stays within one path component and skips names starting with `.`.
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        let mut count = 0;
        for pattern in files.split_whitespace() {
            let joined = base.join(pattern);
            let text = joined.to_string_lossy().into_owned();
            let paths = glob::glob_with(&text, options).map_err(|e| ImportError::Config {
                path: main.clone(),
                line: include.options["files"].line,
                message: format!(
                    "[include] files: bad pattern {}: {e}",
                    crate::clip::clip(pattern)
                ),
            })?;
            let mut matched: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
            // supervisord sorts each pattern's matches by name.
            matched.sort();
            if matched.is_empty() {
                ini.unmatched_includes.push(text);
                continue;
            }
            for file in matched {
                count += 1;
                if count > INCLUDE_FILES_MAX {
                    return Err(ImportError::Config {
                        path: main.clone(),
                        line: include.options["files"].line,
                        message: format!(
                            "[include] files matches more than {INCLUDE_FILES_MAX} files"
                        ),
                    });
                }
                ini.read_file(&file, true)?;
            }
        }
        Ok(ini)
    }

    /// A section by its exact name.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// An option of a section, else of `[DEFAULT]`.
    pub fn get<'a>(&'a self, section: &'a Section, key: &str) -> Option<&'a Value> {
        section.options.get(key).or_else(|| self.defaults.get(key))
    }

    fn read_file(&mut self, path: &Path, included: bool) -> Result<(), ImportError> {
        let read = |source| ImportError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(ImportError::Config {
                path: path.to_owned(),
                line: 0,
                message: "not a regular file".into(),
            });
        }
        let mut bytes = Vec::new();
        use std::io::Read as _;
        file.take(INI_FILE_MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() as u64 > INI_FILE_MAX_BYTES {
            return Err(ImportError::Config {
                path: path.to_owned(),
                line: 0,
                message: format!("larger than {INI_FILE_MAX_BYTES} bytes"),
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| ImportError::Config {
            path: path.to_owned(),
            line: 0,
            message: format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        })?;
        let index = self.files.len();
        self.files.push(path.to_owned());
        self.parse(index, &text, included)
    }

    /// configparser's `_read`, line by line.
    pub fn parse(&mut self, file: usize, text: &str, included: bool) -> Result<(), ImportError> {
        let error = |line: usize, message: String| ImportError::Config {
            path: self.files.get(file).cloned().unwrap_or_default(),
            line,
            message,
        };
        // Where the option being read lives: a section index or `[DEFAULT]`, and its key. Values
        // are collected as lines and joined at the end, like configparser.
        #[derive(Clone, Copy, PartialEq)]
        enum Target {
            Section(usize),
            Defaults,
        }
        let mut current: Option<Target> = None;
        let mut option: Option<(String, usize)> = None;
        let mut lines_of: Vec<(Target, String, usize, Vec<String>)> = Vec::new();
        let mut indent_level = 0usize;
        // Python's universal newlines: `\r\n` and `\r` end lines too.
        let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
        for (number, line) in normalized.split('\n').enumerate() {
            let number = number + 1;
            let comment_start = comment_start(line);
            let value = match comment_start {
                Some(at) => &line[..at],
                None => line,
            }
            .trim();
            if value.is_empty() {
                // A blank line (not a comment) inside a value is part of it.
                if comment_start.is_none()
                    && let Some(last) = lines_of.last_mut()
                    && option.is_some()
                {
                    last.3.push(String::new());
                }
                continue;
            }
            let indent = line.len() - line.trim_start().len();
            if current.is_some() && option.is_some() && indent > indent_level {
                lines_of
                    .last_mut()
                    .expect("an option is being read")
                    .3
                    .push(value.to_owned());
                continue;
            }
            indent_level = indent;
            if let Some(header) = section_header(value) {
                option = None;
                if header == "DEFAULT" {
                    current = Some(Target::Defaults);
                    continue;
                }
                if header == "include" && included {
                    self.nested_includes.push((file, number));
                }
                let index = match self.sections.iter().position(|s| s.name == header) {
                    Some(i) => i,
                    None => {
                        self.sections.push(Section {
                            name: header.to_owned(),
                            file,
                            line: number,
                            options: BTreeMap::new(),
                        });
                        self.sections.len() - 1
                    }
                };
                current = Some(Target::Section(index));
                continue;
            }
            let Some(target) = current else {
                return Err(error(
                    number,
                    format!(
                        "a line before any [section] header: {}",
                        crate::clip::clip(value)
                    ),
                ));
            };
            // OPTCRE: the key is everything before the first `=` or `:`.
            let Some(at) = value.find(['=', ':']) else {
                return Err(error(
                    number,
                    format!(
                        "neither `key = value` nor `key: value` nor a [section]: {}",
                        crate::clip::clip(value)
                    ),
                ));
            };
            let key = value[..at].trim_end();
            if key.is_empty() {
                return Err(error(
                    number,
                    format!("an option without a name: {}", crate::clip::clip(value)),
                ));
            }
            let key = key.to_lowercase();
            let first = value[at + 1..].trim_start().to_owned();
            option = Some((key.clone(), number));
            lines_of.push((target, key, number, vec![first]));
        }
        for (target, key, line, lines) in lines_of {
            let text = lines.join("\n").trim_end().to_owned();
            let value = Value { text, file, line };
            match target {
                Target::Section(i) => {
                    self.sections[i].options.insert(key, value);
                }
                Target::Defaults => {
                    self.defaults.insert(key, value);
                }
            }
        }
        Ok(())
    }
}

/// Where a comment starts on a line: a full-line comment (`;` or `#` after only whitespace), or an
/// inline one (`;` or `#` at the start or after a whitespace character), as configparser decides.
fn comment_start(line: &str) -> Option<usize> {
    let trimmed = line.trim_start();
    if trimmed.starts_with(';') || trimmed.starts_with('#') {
        return Some(0);
    }
    let mut previous: Option<char> = None;
    for (at, c) in line.char_indices() {
        if (c == ';' || c == '#') && previous.is_none_or(char::is_whitespace) {
            return Some(at);
        }
        previous = Some(c);
    }
    None
}

/// SECTCRE (`\[(?P<header>.+)\]`, matched at the start): the name runs to the last `]`.
fn section_header(value: &str) -> Option<&str> {
    let rest = value.strip_prefix('[')?;
    let end = rest.rfind(']')?;
    (end > 0).then(|| &rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Ini {
        let mut ini = Ini {
            files: vec![PathBuf::from("/etc/supervisord.conf")],
            ..Ini::default()
        };
        ini.parse(0, text, false).expect("parses");
        ini
    }

    fn value<'a>(ini: &'a Ini, section: &str, key: &str) -> Option<&'a str> {
        let s = ini.section(section)?;
        ini.get(s, key).map(|v| v.text.as_str())
    }

    #[test]
    fn comments_delimiters_and_continuations_follow_configparser() {
        let ini = parse(
            "; a comment\n\
             # another\n\
             [program:web]\n\
             command = /bin/app --opt=a;b  ; inline comment\n\
             Directory: /srv/app # inline too\n\
             environment = A=1,\n    B=\"x;y\",\n\n    C=3\n\
             \x20  ; an indented full-line comment\n\
             url = http://h/#frag\n\
             semi=a ;\n\
             empty =\n\
             [program:web]\n\
             user = nobody\n\
             [other]  trailing text\n\
             k = v\n",
        );
        assert_eq!(
            value(&ini, "program:web", "command"),
            Some("/bin/app --opt=a;b")
        );
        assert_eq!(value(&ini, "program:web", "directory"), Some("/srv/app"));
        assert_eq!(
            value(&ini, "program:web", "environment"),
            Some("A=1,\nB=\"x;y\",\n\nC=3")
        );
        assert_eq!(value(&ini, "program:web", "url"), Some("http://h/#frag"));
        assert_eq!(value(&ini, "program:web", "semi"), Some("a"));
        assert_eq!(value(&ini, "program:web", "empty"), Some(""));
        // A section given twice merges.
        assert_eq!(value(&ini, "program:web", "user"), Some("nobody"));
        assert_eq!(ini.sections.len(), 2);
        assert_eq!(value(&ini, "other", "k"), Some("v"));
        let command = &ini.section("program:web").unwrap().options["command"];
        assert_eq!(command.line, 4);
    }

    #[test]
    fn defaults_apply_to_every_section_and_later_keys_win() {
        let ini = parse("[DEFAULT]\nuser = app\n[a]\nx = 1\nx = 2\n[b]\nuser = root\n");
        assert_eq!(value(&ini, "a", "user"), Some("app"));
        assert_eq!(value(&ini, "a", "x"), Some("2"));
        assert_eq!(value(&ini, "b", "user"), Some("root"));
        assert!(ini.section("DEFAULT").is_none());
    }

    #[test]
    fn errors_name_the_line() {
        let mut ini = Ini {
            files: vec![PathBuf::from("/x.conf")],
            ..Ini::default()
        };
        let table: &[(&str, usize, &str)] = &[
            ("key = v\n", 1, "before any [section]"),
            ("[a]\nno delimiter here\n", 2, "neither"),
            ("[a]\n = v\n", 2, "without a name"),
        ];
        for (text, line, words) in table {
            let e = ini.parse(0, text, false).unwrap_err().to_string();
            assert!(e.starts_with(&format!("/x.conf:{line}: ")), "{e}");
            assert!(e.contains(words), "{e}");
        }
    }

    #[test]
    fn comment_starts() {
        let table: &[(&str, Option<usize>)] = &[
            ("a = b", None),
            ("a = b;c", None),
            ("a = b ;c", Some(6)),
            ("a = b\t#c", Some(6)),
            ("  # c", Some(0)),
            ("a=#b", None),
            ("a= #b", Some(3)),
        ];
        for (line, want) in table {
            assert_eq!(comment_start(line), *want, "{line}");
        }
    }
}
