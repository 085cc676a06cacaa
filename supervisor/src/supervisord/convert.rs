//! supervisord's programs → sluice service files: the values supervisord would compute for each
//! process (its own defaults, expansions and parsers), then one service whose instances reproduce
//! them, and a report item for everything that does not carry over.
//!
//! `numprocs` copies become the instances of one service when every difference between the
//! copies' commands, directories and environments is a number that `{port}` (`port_base + i`) or
//! `{instance}` (`i`) renders exactly; otherwise each copy becomes a service of its own (named after
//! its `process_name`), so nothing changes meaning silently.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::ImportError;
use super::expand::{self, Arg, Expansions};
use super::ini::{Ini, Section, Value};
use super::report::{Kind, Report, Written};
use crate::config::{INSTANCES_MAX, SERVICE_NAME_MAX_LEN};

/// The `PATH` a service gets when its supervisord environment sets none: sluice passes an
/// instance only its `env`, where supervisord passed its own environment on.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A `[supervisord] minfds` up to this is what systemd's default soft RLIMIT_NOFILE gives anyway:
/// writing `nofile` for it would only lower the hard limit.
const MINFDS_SATISFIED: u64 = 1024;

/// Every key of a `[program:x]` section in supervisord 4.
const PROGRAM_KEYS: &[&str] = &[
    "command",
    "process_name",
    "numprocs",
    "numprocs_start",
    "priority",
    "autostart",
    "startsecs",
    "startretries",
    "autorestart",
    "exitcodes",
    "stopsignal",
    "stopwaitsecs",
    "stopasgroup",
    "killasgroup",
    "user",
    "redirect_stderr",
    "stdout_logfile",
    "stdout_logfile_maxbytes",
    "stdout_logfile_backups",
    "stdout_capture_maxbytes",
    "stdout_events_enabled",
    "stdout_syslog",
    "stderr_logfile",
    "stderr_logfile_maxbytes",
    "stderr_logfile_backups",
    "stderr_capture_maxbytes",
    "stderr_events_enabled",
    "stderr_syslog",
    "environment",
    "directory",
    "umask",
    "serverurl",
];

/// What the import learns from the machine it runs on: supervisord expands `%(ENV_X)s` and
/// `%(host_node_name)s` where it runs, so the import does it here and says so.
#[derive(Debug, Clone)]
pub struct Context {
    pub host_node_name: String,
    /// The importing process's environment, for `%(ENV_X)s`.
    pub environ: Vec<(String, String)>,
}

impl Context {
    /// The running process's host name and environment.
    pub fn current() -> Context {
        Context {
            host_node_name: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            environ: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }
}

/// Expands `[include] files` as supervisord does: `%(here)s` (the main file's directory),
/// `%(host_node_name)s` and `%(ENV_X)s` of the importing environment.
pub fn expand_include(ctx: &Context, value: &Value, file: &Path) -> Result<String, String> {
    let mut e: Expansions = ctx
        .environ
        .iter()
        .map(|(k, v)| (format!("ENV_{k}"), Arg::Str(v.clone())))
        .collect();
    e.insert(
        "host_node_name".into(),
        Arg::Str(ctx.host_node_name.clone()),
    );
    let here = file.parent().unwrap_or(Path::new("/"));
    e.insert("here".into(), Arg::Str(here.to_string_lossy().into_owned()));
    expand::expand(&value.text, &e)
}

/// One service file to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFile {
    pub name: String,
    pub toml: String,
    /// What it came from and holds, for the report.
    pub summary: String,
}

/// The result of a conversion.
#[derive(Debug, Default)]
pub struct Converted {
    pub services: Vec<ServiceFile>,
    pub report: Report,
}

/// Defaults a program inherits from `[supervisord]`.
#[derive(Debug, Default)]
struct Daemon {
    environment: Vec<(String, String)>,
    user: Option<String>,
    umask: Option<u32>,
    directory: Option<String>,
    minfds: Option<u64>,
}

/// Where one stream of a process logs, after supervisord's `logfile_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LogTarget {
    Auto,
    Off,
    Syslog,
    File(String),
}

/// What supervisord computes for one process of a program.
#[derive(Debug, Clone)]
struct Process {
    /// `process_num`.
    num: i64,
    /// `process_name`, expanded.
    name: String,
    argv: Vec<String>,
    directory: Option<String>,
    /// `[supervisord] environment` overlaid with the program's, in order.
    env: Vec<(String, String)>,
    stdout: LogTarget,
    stderr: LogTarget,
}

/// Turns every program of `ini` into service files, reporting what does not carry over.
pub fn convert(ini: &Ini, ctx: &Context) -> Result<Converted, ImportError> {
    let mut out = Converted::default();
    let report = &mut out.report;
    let base: Expansions = ctx
        .environ
        .iter()
        .map(|(k, v)| (format!("ENV_{k}"), Arg::Str(v.clone())))
        .chain([(
            "host_node_name".to_owned(),
            Arg::Str(ctx.host_node_name.clone()),
        )])
        .collect();
    let conv = Converter { ini, base };
    let daemon = conv.daemon(report)?;
    let mut base = conv.base.clone();
    for (k, v) in &daemon.environment {
        base.insert(format!("ENV_{k}"), Arg::Str(v.clone()));
    }
    let conv = Converter { ini, base };
    let groups = conv.groups(report)?;
    for &(file, line) in &ini.nested_includes {
        report.add(
            Kind::Supervisord,
            format!("{}:{line}", ini.files[file].display()),
            "include",
            None,
            "an [include] inside an included file: supervisord reads only the main file's [include] and ignores this one, so its files were not read here either",
        );
    }
    if let Some(include) = ini.section("include") {
        for (key, v) in &include.options {
            if key != "files" {
                report.add(
                    Kind::Supervisord,
                    conv.place(v.file, v.line),
                    "include",
                    Some(key),
                    "not an [include] key supervisord knows (it ignores it too)",
                );
            }
        }
    }
    for pattern in &ini.unmatched_includes {
        report.add(
            Kind::Supervisord,
            conv.place_of_section("include"),
            "include",
            Some("files"),
            format!(
                "no file matches {} (supervisord warns and goes on)",
                crate::clip::clip(pattern)
            ),
        );
    }
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for section in &ini.sections {
        let name = section.name.as_str();
        let place = conv.place(section.file, section.line);
        if let Some(program) = name.strip_prefix("program:") {
            let program = process_or_group_name(program).map_err(|m| {
                conv.error(
                    section.file,
                    section.line,
                    format!("[{}]: {m}", crate::clip::clip(name)),
                )
            })?;
            let group = groups.get(&program).cloned();
            for file in conv.program(section, &program, group.as_deref(), &daemon, report)? {
                if let Some(other) = names.insert(file.name.clone(), name.to_owned()) {
                    return Err(conv.error(
                        section.file,
                        section.line,
                        format!(
                            "[{}] would be written as {}.toml, like [{}]: rename one of them",
                            crate::clip::clip(name),
                            file.name,
                            crate::clip::clip(&other)
                        ),
                    ));
                }
                report.written.push(Written {
                    service: file.name.clone(),
                    summary: file.summary.clone(),
                });
                out.services.push(file);
            }
            continue;
        }
        let (kind, why): (Kind, String) = match name {
            "supervisord" | "include" => continue,
            _ if name.starts_with("group:") => continue,
            _ if name.starts_with("eventlistener:") => (
                Kind::NotCarried,
                "event listeners: sluice has no event protocol (PROCESS_STATE and other events); its status (`sluice status --json`) and logs are what a monitor reads".into(),
            ),
            _ if name.starts_with("fcgi-program:") => (
                Kind::NotCarried,
                "FastCGI programs: sluice does not open a socket for its instances to inherit; run the program with its own listener as a [program:x]".into(),
            ),
            "unix_http_server" => (
                Kind::Supervisord,
                "supervisord's control socket: sluice's is `control_socket` (mode 0660) and `control_group` in the host file".into(),
            ),
            "inet_http_server" => (
                Kind::Supervisord,
                "supervisord's TCP control server: sluice's control API is on its unix socket only".into(),
            ),
            "supervisorctl" => (
                Kind::Supervisord,
                "supervisorctl's settings: the `sluice` command reads the host file (`--config`)".into(),
            ),
            _ if name.starts_with("rpcinterface:") => (
                Kind::Supervisord,
                "XML-RPC interface: sluice's control API is HTTP and JSON on the control socket".into(),
            ),
            _ if name.starts_with("ctlplugin:") => (
                Kind::Supervisord,
                "supervisorctl plugin: the `sluice` command has no plugins".into(),
            ),
            _ => (
                Kind::Supervisord,
                "not a section supervisord knows (it ignores it too)".into(),
            ),
        };
        report.add(kind, place, name, None, why);
    }
    if !ini.defaults.is_empty() {
        let first = ini.defaults.values().min_by_key(|v| (v.file, v.line));
        if let Some(v) = first {
            report.add(
                Kind::Changed,
                conv.place(v.file, v.line),
                "DEFAULT",
                None,
                "its keys were read as defaults of every section, as configparser does",
            );
        }
    }
    Ok(out)
}

/// Reads sections with supervisord's expansions and parsers; errors name file and line.
struct Converter<'a> {
    ini: &'a Ini,
    /// `ENV_*` and `host_node_name`.
    base: Expansions,
}

impl Converter<'_> {
    fn place(&self, file: usize, line: usize) -> String {
        format!("{}:{line}", self.ini.files[file].display())
    }

    fn place_of_section(&self, name: &str) -> String {
        match self.ini.section(name) {
            Some(s) => self.place(s.file, s.line),
            None => self.ini.files[0].display().to_string(),
        }
    }

    fn place_of(&self, section: &Section, key: &str) -> String {
        match self.ini.get(section, key) {
            Some(v) => self.place(v.file, v.line),
            None => self.place(section.file, section.line),
        }
    }

    fn error(&self, file: usize, line: usize, message: String) -> ImportError {
        ImportError::Config {
            path: self.ini.files[file].clone(),
            line,
            message,
        }
    }

    fn value_error(&self, section: &Section, key: &str, v: &Value, message: String) -> ImportError {
        self.error(
            v.file,
            v.line,
            format!("[{}] {key}: {message}", crate::clip::clip(&section.name)),
        )
    }

    /// `%(here)s` is the directory of the file the value was written in.
    fn expand(
        &self,
        section: &Section,
        key: &str,
        v: &Value,
        extra: &Expansions,
    ) -> Result<String, ImportError> {
        let mut e = self.base.clone();
        e.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        let here = self.ini.files[v.file]
            .parent()
            .unwrap_or(Path::new("/"))
            .to_string_lossy()
            .into_owned();
        e.insert("here".into(), Arg::Str(here));
        expand::expand(&v.text, &e).map_err(|m| self.value_error(section, key, v, m))
    }

    /// An expanded value, or `None` when the key is not set.
    fn get<'s>(
        &'s self,
        section: &'s Section,
        key: &str,
        extra: &Expansions,
    ) -> Result<Option<(String, &'s Value)>, ImportError> {
        match self.ini.get(section, key) {
            None => Ok(None),
            Some(v) => Ok(Some((self.expand(section, key, v, extra)?, v))),
        }
    }

    /// A typed value with supervisord's default.
    fn typed<T>(
        &self,
        section: &Section,
        key: &str,
        extra: &Expansions,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ImportError> {
        match self.get(section, key, extra)? {
            None => Ok(default),
            Some((text, v)) => parse(&text).map_err(|m| self.value_error(section, key, v, m)),
        }
    }

    fn is_set(&self, section: &Section, key: &str) -> bool {
        self.ini.get(section, key).is_some()
    }

    /// `[supervisord]`: what programs inherit, and a report item for each of its own settings.
    fn daemon(&self, report: &mut Report) -> Result<Daemon, ImportError> {
        let mut daemon = Daemon::default();
        let Some(section) = self.ini.section("supervisord") else {
            report.add(
                Kind::Supervisord,
                self.ini.files[0].display().to_string(),
                "supervisord",
                None,
                "missing (supervisord refuses a configuration without it; read here as an included file)",
            );
            return Ok(daemon);
        };
        let none = Expansions::new();
        if let Some((text, v)) = self.get(section, "environment", &none)? {
            daemon.environment = expand::key_value_pairs(&text)
                .map_err(|m| self.value_error(section, "environment", v, m))?;
        }
        daemon.user = self.get(section, "user", &none)?.map(|(t, _)| t);
        if self.is_set(section, "umask") {
            daemon.umask = Some(self.typed(section, "umask", &none, 0o22, octal)?);
        }
        if self.is_set(section, "minfds") {
            daemon.minfds = Some(self.typed(section, "minfds", &none, 1024, |t| {
                integer(t).and_then(|n| u64::try_from(n).map_err(|_| "must be 0 or more".into()))
            })?);
        }
        let nodaemon = self.typed(section, "nodaemon", &none, false, boolean)?;
        if !nodaemon {
            daemon.directory = self.get(section, "directory", &none)?.map(|(t, _)| t);
        }
        for (key, v) in &section.options {
            let place = self.place(v.file, v.line);
            let (kind, why): (Kind, &str) = match key.as_str() {
                "environment" => (
                    Kind::Changed,
                    "merged into every program's `env` (the program's own variables win), as supervisord passes it to its children",
                ),
                "user" => (
                    Kind::Changed,
                    "supervisord ran as this user, and so did its programs: programs without their own `user` got it",
                ),
                "umask" => (
                    Kind::Changed,
                    "programs inherited supervisord's umask: programs without their own `umask` got it",
                ),
                "minfds" if daemon.minfds.is_some_and(|n| n > MINFDS_SATISFIED) => (
                    Kind::Changed,
                    "supervisord raised its soft RLIMIT_NOFILE to at least this and its programs inherited it: every service got `nofile` of this value, which sets the hard limit too",
                ),
                "minfds" => (
                    Kind::Supervisord,
                    "at most 1024, which systemd's default soft RLIMIT_NOFILE already gives: no `nofile` written (it would set the hard limit too)",
                ),
                "directory" if !nodaemon => (
                    Kind::Changed,
                    "supervisord changed into it when it daemonized and its programs inherited it: programs without their own `directory` got it",
                ),
                "directory" | "nodaemon" => (
                    Kind::Supervisord,
                    "sluice runs in the foreground under systemd (`Type=notify`), in `/`",
                ),
                "logfile" | "logfile_maxbytes" | "logfile_backups" | "loglevel" | "silent" => (
                    Kind::Supervisord,
                    "supervisord's own log: sluice logs to stderr (the journal), its level from `SLUICE_LOG`",
                ),
                "pidfile" => (
                    Kind::Supervisord,
                    "systemd tracks the daemon; sluice keeps a lock in `runtime_dir`",
                ),
                "childlogdir" => (
                    Kind::Supervisord,
                    "where AUTO logs went: sluice writes each service's logs in its `log.dir` (default `data_dir/logs`)",
                ),
                "minprocs" => (
                    Kind::Supervisord,
                    "sluice sets no RLIMIT_NPROC: instances get the daemon's (set `LimitNPROC=` in the unit)",
                ),
                "identifier" => (
                    Kind::Supervisord,
                    "an XML-RPC identifier: sluice has no XML-RPC",
                ),
                "nocleanup" => (
                    Kind::Supervisord,
                    "AUTO child logs are not used: nothing to clean",
                ),
                "strip_ansi" => (
                    Kind::Supervisord,
                    "sluice writes what instances print, as it is",
                ),
                _ => (
                    Kind::Supervisord,
                    "not a [supervisord] key supervisord knows (it ignores it too)",
                ),
            };
            report.add(kind, place, "supervisord", Some(key), why);
        }
        Ok(daemon)
    }

    /// `[group:x] programs=`: the group of each program, checked like supervisord checks it.
    fn groups(&self, report: &mut Report) -> Result<BTreeMap<String, String>, ImportError> {
        let mut of: BTreeMap<String, String> = BTreeMap::new();
        let none = Expansions::new();
        for section in &self.ini.sections {
            let Some(group) = section.name.strip_prefix("group:") else {
                continue;
            };
            let group = process_or_group_name(group).map_err(|m| {
                self.error(
                    section.file,
                    section.line,
                    format!("[{}]: {m}", crate::clip::clip(&section.name)),
                )
            })?;
            let (programs, v) = self.get(section, "programs", &none)?.ok_or_else(|| {
                self.error(
                    section.file,
                    section.line,
                    format!("[{}] has no `programs`", crate::clip::clip(&section.name)),
                )
            })?;
            let programs: Vec<String> = programs
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect();
            for program in &programs {
                let known = self.ini.section(&format!("program:{program}")).is_some()
                    || self
                        .ini
                        .section(&format!("fcgi-program:{program}"))
                        .is_some();
                if !known {
                    return Err(self.value_error(
                        section,
                        "programs",
                        v,
                        format!("names unknown program {}", crate::clip::clip(program)),
                    ));
                }
                if let Some(other) = of.insert(program.clone(), group.clone()) {
                    return Err(self.value_error(
                        section,
                        "programs",
                        v,
                        format!(
                            "program {program} is in groups {other} and {group}: supervisord runs it once in each, a service runs once"
                        ),
                    ));
                }
            }
            report.add(
                Kind::Changed,
                self.place(section.file, section.line),
                &section.name,
                None,
                format!(
                    "sluice has no groups: its programs ({}) became services of their own (`supervisorctl start {group}:*` is one `sluice start` per service); `%(group_name)s` in them is {group}",
                    programs.join(", ")
                ),
            );
            for (key, v) in &section.options {
                let (kind, why) = match key.as_str() {
                    "programs" => continue,
                    "priority" => (
                        Kind::NotCarried,
                        "a group's start order: sluice orders services by their own `priority`, which each program's priority became",
                    ),
                    _ => (
                        Kind::Supervisord,
                        "not a [group:x] key supervisord knows (it ignores it too)",
                    ),
                };
                report.add(
                    kind,
                    self.place(v.file, v.line),
                    &section.name,
                    Some(key),
                    why,
                );
            }
        }
        Ok(of)
    }

    /// One `[program:x]`: its processes as supervisord computes them, then its service file(s).
    fn program(
        &self,
        section: &Section,
        program: &str,
        group: Option<&str>,
        daemon: &Daemon,
        report: &mut Report,
    ) -> Result<Vec<ServiceFile>, ImportError> {
        // Section names come from the file: bounded wherever they are quoted.
        let clipped = crate::clip::clip(&section.name);
        let sname: &str = &clipped;
        let mut common = Expansions::new();
        common.insert("program_name".into(), Arg::Str(program.to_owned()));
        common.insert(
            "group_name".into(),
            Arg::Str(group.unwrap_or(program).to_owned()),
        );
        let int = |key: &str, default: i64| self.typed(section, key, &common, default, integer);
        let priority = int("priority", 999)?;
        let autostart = self.typed(section, "autostart", &common, true, boolean)?;
        let autorestart = self.typed(section, "autorestart", &common, "on-failure", |t| match t
            .to_lowercase()
            .as_str()
        {
            "yes" | "true" | "on" | "1" => Ok("always"),
            "no" | "false" | "off" | "0" => Ok("never"),
            "unexpected" => Ok("on-failure"),
            _ => Err(format!(
                "invalid autorestart value {}",
                crate::clip::clip(t)
            )),
        })?;
        let startsecs = int("startsecs", 1)?;
        let startretries = int("startretries", 3)?;
        let stopsignal =
            self.typed(section, "stopsignal", &common, libc::SIGTERM, signal_number)?;
        let stopwaitsecs = int("stopwaitsecs", 10)?;
        let stopasgroup = self.typed(section, "stopasgroup", &common, false, boolean)?;
        let killasgroup = self.typed(section, "killasgroup", &common, stopasgroup, boolean)?;
        let exitcodes = self.typed(section, "exitcodes", &common, vec![0], exit_codes)?;
        let redirect_stderr = self.typed(section, "redirect_stderr", &common, false, boolean)?;
        let numprocs = int("numprocs", 1)?;
        let numprocs_start = int("numprocs_start", 0)?;
        let user = self.get(section, "user", &common)?.map(|(t, _)| t);
        let umask = match self.is_set(section, "umask") {
            true => Some(self.typed(section, "umask", &common, 0, octal)?),
            false => None,
        };
        let serverurl = self.get(section, "serverurl", &common)?.map(|(t, _)| t);
        let mut streams = BTreeMap::new();
        for stream in ["stdout", "stderr"] {
            let k = |s: &str| format!("{stream}_{s}");
            let maxbytes = self.typed(
                section,
                &k("logfile_maxbytes"),
                &common,
                50 << 20,
                byte_size,
            )?;
            let backups = int(&k("logfile_backups"), 10)?;
            let capture = self.typed(section, &k("capture_maxbytes"), &common, 0, byte_size)?;
            let events = self.typed(section, &k("events_enabled"), &common, false, boolean)?;
            let syslog = self.typed(section, &k("syslog"), &common, false, boolean)?;
            streams.insert(stream, (maxbytes, backups, capture, events, syslog));
        }
        for (name, value, low, high) in [
            ("startsecs", startsecs, 0, i64::from(u32::MAX)),
            ("startretries", startretries, 0, i64::from(u32::MAX)),
            ("stopwaitsecs", stopwaitsecs, 0, i64::from(u32::MAX)),
            (
                "priority",
                priority,
                i64::from(i32::MIN),
                i64::from(i32::MAX),
            ),
            ("numprocs_start", numprocs_start, 0, i64::from(u16::MAX)),
        ] {
            if !(low..=high).contains(&value) {
                let v = self
                    .ini
                    .get(section, name)
                    .expect("only set keys are out of range");
                return Err(self.value_error(
                    section,
                    name,
                    v,
                    format!("{value} is out of range ({low} to {high})"),
                ));
            }
        }
        let process_name_value = self.ini.get(section, "process_name");
        let process_name_text = process_name_value.map_or("%(program_name)s", |v| v.text.as_str());
        process_or_group_name(process_name_text).map_err(|m| {
            let v = process_name_value.expect("the default is a valid name");
            self.value_error(section, "process_name", v, m)
        })?;
        if numprocs > 1 && !process_name_text.contains("%(process_num)") {
            let line = process_name_value.map_or(section.line, |v| v.line);
            let file = process_name_value.map_or(section.file, |v| v.file);
            return Err(self.error(
                file,
                line,
                format!("[{sname}] process_name: %(process_num) must be present within process_name when numprocs > 1"),
            ));
        }
        if stopasgroup && !killasgroup {
            let v = self
                .ini
                .get(section, "killasgroup")
                .expect("killasgroup was set");
            return Err(self.value_error(
                section,
                "killasgroup",
                v,
                "cannot set stopasgroup=true and killasgroup=false".into(),
            ));
        }
        if numprocs < 1 {
            report.add(
                Kind::NotCarried,
                self.place_of(section, "numprocs"),
                sname,
                Some("numprocs"),
                "0: supervisord runs no process of this program; no service was written",
            );
            return Ok(Vec::new());
        }
        if numprocs > i64::from(INSTANCES_MAX) {
            let v = self.ini.get(section, "numprocs").expect("numprocs was set");
            return Err(self.value_error(section, "numprocs", v, format!("{numprocs} is more than the {INSTANCES_MAX} instances a sluice service may have")));
        }
        let Some(command_value) = self.ini.get(section, "command") else {
            return Err(self.error(
                section.file,
                section.line,
                format!("[{sname}] does not specify a command"),
            ));
        };
        let environment_value = self.ini.get(section, "environment");

        // Each process as supervisord computes it.
        let mut processes = Vec::new();
        for num in numprocs_start..numprocs_start + numprocs {
            let mut e = common.clone();
            e.insert("process_num".into(), Arg::Int(num));
            e.insert("numprocs".into(), Arg::Int(numprocs));
            let own_env = match environment_value {
                Some(v) => {
                    let text = self.expand(section, "environment", v, &e)?;
                    expand::key_value_pairs(&text)
                        .map_err(|m| self.value_error(section, "environment", v, m))?
                }
                None => Vec::new(),
            };
            // Later keys see the program's own variables as `%(ENV_X)s`.
            for (k, v) in &own_env {
                e.insert(format!("ENV_{k}"), Arg::Str(v.clone()));
            }
            let mut env = daemon.environment.clone();
            for (k, v) in own_env {
                env.retain(|(key, _)| *key != k);
                env.push((k, v));
            }
            let directory = self.get(section, "directory", &e)?.map(|(t, _)| t);
            let log = |stream: &str| -> Result<LogTarget, ImportError> {
                let key = format!("{stream}_logfile");
                Ok(match self.get(section, &key, &e)? {
                    None => LogTarget::Auto,
                    Some((t, _)) => match t.to_lowercase().as_str() {
                        "none" | "off" => LogTarget::Off,
                        "auto" => LogTarget::Auto,
                        "syslog" => LogTarget::Syslog,
                        _ => LogTarget::File(t),
                    },
                })
            };
            let stdout = log("stdout")?;
            let mut stderr = log("stderr")?;
            if redirect_stderr {
                stderr = LogTarget::Off;
            }
            let command = self.expand(section, "command", command_value, &e)?;
            let argv = expand::shlex_split(&command).map_err(|m| {
                self.value_error(
                    section,
                    "command",
                    command_value,
                    format!("cannot be split like supervisord splits it: {m}"),
                )
            })?;
            if argv.is_empty() {
                return Err(self.value_error(section, "command", command_value, "is empty".into()));
            }
            let name = match process_name_value {
                Some(v) => self.expand(section, "process_name", v, &e)?,
                None => program.to_owned(),
            };
            processes.push(Process {
                num,
                name,
                argv,
                directory: directory.or_else(|| daemon.directory.clone()),
                env,
                stdout,
                stderr,
            });
        }

        // The settings every process shares.
        let mut shared = Vec::<(String, String)>::new();
        let tv = |s: &str| toml::Value::String(s.to_owned()).to_string();
        if let Some(user) = user.as_ref().or(daemon.user.as_ref()) {
            shared.push(("user".into(), tv(user)));
        }
        if let Some(mask) = umask.or(daemon.umask) {
            if mask > 0o777 {
                let v = self.ini.get(section, "umask").or_else(|| {
                    self.ini
                        .section("supervisord")
                        .and_then(|s| s.options.get("umask"))
                });
                let v = v.expect("a umask was set");
                return Err(self.value_error(
                    section,
                    "umask",
                    v,
                    format!("{mask:o} is more than 777"),
                ));
            }
            shared.push(("umask".into(), tv(&format!("{mask:03o}"))));
        }
        if let Some(nofile) = daemon.minfds
            && nofile > MINFDS_SATISFIED
        {
            shared.push(("nofile".into(), nofile.to_string()));
        }
        shared.push(("priority".into(), priority.to_string()));
        shared.push(("autorestart".into(), tv(autorestart)));
        if autorestart == "on-failure" {
            let codes: Vec<String> = exitcodes.iter().map(i64::to_string).collect();
            shared.push((
                "success_exit_codes".into(),
                format!("[{}]", codes.join(", ")),
            ));
        }
        shared.push(("startup_ms".into(), (startsecs * 1000).to_string()));
        shared.push(("start_retries".into(), startretries.to_string()));
        // supervisord waits 1 s, 2 s, 3 s… between attempts; sluice doubles from 1 s up to a cap,
        // which up to 3 retries gives the same waits.
        shared.push(("backoff_initial_ms".into(), "1000".into()));
        shared.push((
            "backoff_max_ms".into(),
            (startretries.max(1) * 1000).to_string(),
        ));
        shared.push((
            "stop_signal".into(),
            tv(&crate::config::Signal(stopsignal).name()),
        ));
        shared.push(("stop_grace_ms".into(), (stopwaitsecs * 1000).to_string()));

        // Report what changes meaning, once per program.
        let mut note = |kind: Kind, key: &str, why: String| {
            report.add(kind, self.place_of(section, key), sname, Some(key), why);
        };
        for key in section.options.keys() {
            if !PROGRAM_KEYS.contains(&key.as_str()) {
                note(
                    Kind::Supervisord,
                    key,
                    "not a [program:x] key of supervisord 4 (it ignores it too)".into(),
                );
            }
        }
        if !autostart {
            note(Kind::NotCarried, "autostart", "sluice starts every service with the daemon; run `sluice stop SERVICE` once after the first start to keep it stopped (that survives daemon restarts)".into());
        }
        if autorestart == "never" {
            note(Kind::Changed, "autorestart", "false → `never`: supervisord still retried a start that failed (an exit before startsecs) up to startretries times; sluice leaves it exited".into());
        }
        if startretries > 3 {
            note(
                Kind::Changed,
                "startretries",
                format!(
                    "supervisord waited 1 s, 2 s, 3 s… between attempts; sluice doubles the wait from 1 s up to {startretries} s"
                ),
            );
        }
        if stopasgroup {
            note(Kind::NotCarried, "stopasgroup", "sluice sends `stop_signal` to the main process only; the rest of its process group gets SIGKILL after `stop_grace_ms` or once the main process has exited".into());
        } else if self.is_set(section, "killasgroup") && !killasgroup {
            note(Kind::Changed, "killasgroup", "false: sluice always SIGKILLs the whole process group after `stop_grace_ms`, and what is left of it when the main process exits".into());
        }
        if let Some(url) = &serverurl
            && !url.trim().eq_ignore_ascii_case("auto")
        {
            note(
                Kind::NotCarried,
                "serverurl",
                "sluice has no XML-RPC server for programs to call (`SUPERVISOR_SERVER_URL`)"
                    .into(),
            );
        }
        for stream in ["stdout", "stderr"] {
            let (_, _, capture, events, syslog) = streams[stream];
            if capture > 0 {
                note(
                    Kind::NotCarried,
                    &format!("{stream}_capture_maxbytes"),
                    "capture mode feeds event listeners, which sluice does not have".into(),
                );
            }
            if events {
                note(
                    Kind::NotCarried,
                    &format!("{stream}_events_enabled"),
                    "sluice has no event listeners to send log events to".into(),
                );
            }
            if syslog {
                note(
                    Kind::NotCarried,
                    &format!("{stream}_syslog"),
                    "sluice writes log files only, no syslog".into(),
                );
            }
        }
        if redirect_stderr {
            note(
                Kind::Changed,
                "redirect_stderr",
                "sluice keeps stderr apart: `<service>-<i>.stderr.log` beside the stdout log"
                    .into(),
            );
        }
        let env_keys: BTreeSet<&str> = processes[0].env.iter().map(|(k, _)| k.as_str()).collect();
        let path_note = if env_keys.contains("PATH") {
            String::new()
        } else {
            format!("; PATH was set to {DEFAULT_PATH}")
        };
        note(
            Kind::Changed,
            if environment_value.is_some() {
                "environment"
            } else {
                "command"
            },
            format!(
                "an instance gets only its `env`: supervisord passed its own environment on as well (and SUPERVISOR_ENABLED, SUPERVISOR_PROCESS_NAME, SUPERVISOR_GROUP_NAME){path_note}"
            ),
        );
        for key in [
            "command",
            "directory",
            "environment",
            "stdout_logfile",
            "stderr_logfile",
            "process_name",
            "user",
        ] {
            if let Some(v) = self.ini.get(section, key) {
                if v.text.contains("%(host_node_name)") {
                    note(Kind::Changed, key, "%(host_node_name)s was expanded to this machine's name; supervisord expands it on the host it runs on".into());
                }
                if v.text.contains("%(ENV_") {
                    note(Kind::Changed, key, "%(ENV_…)s was expanded from the importing environment (and supervisord's `environment`); supervisord expands it where it starts".into());
                }
            }
        }

        // Logs: one directory per service, one size and count for both streams.
        let first = &processes[0];
        let log_keys = self.logs(section, first, &streams, redirect_stderr, &mut note);
        check_stream_dirs(first, &mut note);

        // One service with instances, when sluice's placeholders reproduce every process.
        let folded = if numprocs > 1 { fold(&processes) } else { None };
        let mut files = Vec::new();
        let header = format!(
            "# Imported by `sluice import-supervisord` from [{sname}] ({}).\n",
            printable(&self.place(section.file, section.line))
        );
        match folded {
            Some(template) => {
                let service = service_name(program).map_err(|m| {
                    self.error(section.file, section.line, format!("[{sname}]: {m}"))
                })?;
                if service != program {
                    note(
                        Kind::Changed,
                        "command",
                        format!(
                            "the service is named {service} (sluice's names are a-z, 0-9, `-`, `_`, at most {SERVICE_NAME_MAX_LEN})"
                        ),
                    );
                }
                let log_dir = common_log_dir(&processes, &mut note);
                if numprocs_start != 0 || self.is_set(section, "process_name") {
                    note(
                        Kind::Changed,
                        "process_name",
                        format!(
                            "the {numprocs} processes ({} … {}) are instances {service}/0 … {service}/{} (`supervisorctl start {}:{}` is `sluice start {service}/0`)",
                            first.name,
                            processes[processes.len() - 1].name,
                            numprocs - 1,
                            group.unwrap_or(program),
                            first.name
                        ),
                    );
                }
                let toml = render(
                    &header,
                    &template.argv,
                    Some(numprocs as u32),
                    template.port_base,
                    template.directory.as_deref(),
                    &template.env,
                    &shared,
                    log_dir.as_deref(),
                    &log_keys,
                );
                let mut summary = format!("[{sname}], {numprocs} instances");
                if let Some(base) = template.port_base {
                    summary.push_str(&format!(
                        ", port_base {base} (ports {base}-{})",
                        u32::from(base) + numprocs as u32 - 1
                    ));
                }
                files.push(self.checked(section, service, toml, summary)?);
            }
            None => {
                if numprocs > 1 {
                    note(
                        Kind::Changed,
                        "numprocs",
                        format!(
                            "the {numprocs} processes differ in ways `{{port}}` and `{{instance}}` cannot reproduce: each became a service of its own, named after its process_name"
                        ),
                    );
                }
                for p in &processes {
                    let base_name = if numprocs > 1 {
                        p.name.as_str()
                    } else {
                        program
                    };
                    let service = service_name(base_name).map_err(|m| {
                        self.error(section.file, section.line, format!("[{sname}]: {m}"))
                    })?;
                    if numprocs == 1 && service != program {
                        note(
                            Kind::Changed,
                            "command",
                            format!(
                                "the service is named {service} (sluice's names are a-z, 0-9, `-`, `_`, at most {SERVICE_NAME_MAX_LEN})"
                            ),
                        );
                    }
                    let argv: Vec<String> = p.argv.iter().map(|a| escape(a)).collect();
                    let env: Vec<(String, String)> =
                        p.env.iter().map(|(k, v)| (k.clone(), escape(v))).collect();
                    let dir = p.directory.as_deref().map(escape);
                    let log_dir = log_dir_of(p);
                    let toml = render(
                        &header,
                        &argv,
                        None,
                        None,
                        dir.as_deref(),
                        &env,
                        &shared,
                        log_dir.as_deref(),
                        &log_keys,
                    );
                    let summary = if numprocs > 1 {
                        format!("[{sname}] process {} (process_num {})", p.name, p.num)
                    } else {
                        format!("[{sname}]")
                    };
                    files.push(self.checked(section, service, toml, summary)?);
                }
            }
        }
        Ok(files)
    }

    /// `log.max_bytes` and `log.backups` from the stream that logs (stdout first), with notes on
    /// what sluice does differently.
    fn logs(
        &self,
        section: &Section,
        first: &Process,
        streams: &BTreeMap<&str, (u64, i64, u64, bool, bool)>,
        redirect_stderr: bool,
        note: &mut impl FnMut(Kind, &str, String),
    ) -> Vec<(String, String)> {
        for (stream, target) in [("stdout", &first.stdout), ("stderr", &first.stderr)] {
            let key = format!("{stream}_logfile");
            if stream == "stderr" && redirect_stderr {
                continue;
            }
            match target {
                LogTarget::Off => note(
                    Kind::Changed,
                    &key,
                    format!(
                        "NONE: sluice always keeps an instance's {stream}, in `log.dir`, rotated by `log.max_bytes`"
                    ),
                ),
                LogTarget::Syslog => note(
                    Kind::NotCarried,
                    &key,
                    "syslog: sluice writes log files only".into(),
                ),
                LogTarget::Auto if self.is_set(section, &key) => note(
                    Kind::Changed,
                    &key,
                    format!(
                        "AUTO: the file is `<service>-<i>.{stream}.log` in `log.dir` (default `data_dir/logs`)"
                    ),
                ),
                LogTarget::Auto => {}
                LogTarget::File(path) => {
                    if !Path::new(path).is_absolute() {
                        note(
                            Kind::NotCarried,
                            &key,
                            format!(
                                "{}: a relative path was relative to supervisord's working directory; sluice's `log.dir` is used",
                                crate::clip::clip(path)
                            ),
                        );
                    } else {
                        note(
                            Kind::Changed,
                            &key,
                            format!(
                                "the file is `<service>-<i>.{stream}.log` in its directory, not {}",
                                crate::clip::clip(path)
                            ),
                        );
                    }
                }
            }
        }
        // The size and count come from the first stream that writes a file.
        let writes = |t: &LogTarget| matches!(t, LogTarget::Auto | LogTarget::File(_));
        let chosen = if writes(&first.stdout) || !writes(&first.stderr) {
            "stdout"
        } else {
            "stderr"
        };
        let other = if chosen == "stdout" {
            "stderr"
        } else {
            "stdout"
        };
        let (max_bytes, backups, ..) = streams[chosen];
        let other_target = if other == "stderr" {
            &first.stderr
        } else {
            &first.stdout
        };
        if writes(other_target) {
            let (o_max, o_backups, ..) = streams[other];
            if o_max != max_bytes {
                note(
                    Kind::NotCarried,
                    &format!("{other}_logfile_maxbytes"),
                    format!(
                        "sluice has one `log.max_bytes` for both streams: {chosen}'s {max_bytes} was used"
                    ),
                );
            }
            if o_backups != backups {
                note(
                    Kind::NotCarried,
                    &format!("{other}_logfile_backups"),
                    format!(
                        "sluice has one `log.backups` for both streams: {chosen}'s {backups} was used"
                    ),
                );
            }
        }
        vec![
            ("max_bytes".into(), max_bytes.to_string()),
            ("backups".into(), backups.max(0).to_string()),
        ]
    }

    /// Parses the generated file with the loader `check-config` uses: a file the import writes must
    /// load. A failure is a defect of the import, reported against the program.
    fn checked(
        &self,
        section: &Section,
        service: String,
        toml: String,
        summary: String,
    ) -> Result<ServiceFile, ImportError> {
        let path = PathBuf::from(format!("{service}.toml"));
        crate::config::ServiceConfig::parse(&path, &toml).map_err(|e| {
            self.error(
                section.file,
                section.line,
                format!(
                    "[{}]: the service file made of it does not load ({e}); nothing was written",
                    crate::clip::clip(&section.name)
                ),
            )
        })?;
        Ok(ServiceFile {
            name: service,
            toml,
            summary,
        })
    }
}

/// The log directory of one process: that of its stdout file, else its stderr file.
fn log_dir_of(p: &Process) -> Option<String> {
    [&p.stdout, &p.stderr].into_iter().find_map(|t| match t {
        LogTarget::File(path) if Path::new(path).is_absolute() => Path::new(path)
            .parent()
            .map(|d| escape(&d.to_string_lossy())),
        _ => None,
    })
}

/// Reports stdout and stderr logged to different directories: a service has one `log.dir`.
fn check_stream_dirs(first: &Process, note: &mut impl FnMut(Kind, &str, String)) {
    if let (LogTarget::File(a), LogTarget::File(b)) = (&first.stdout, &first.stderr)
        && Path::new(a).parent() != Path::new(b).parent()
    {
        note(Kind::NotCarried, "stderr_logfile", "in another directory than stdout_logfile: sluice keeps both logs of an instance in one `log.dir` (stdout's)".into());
    }
}

/// The one log directory of folded processes; reported when they differ.
fn common_log_dir(
    processes: &[Process],
    note: &mut impl FnMut(Kind, &str, String),
) -> Option<String> {
    let dirs: BTreeSet<Option<String>> = processes.iter().map(log_dir_of).collect();
    if dirs.len() > 1 {
        note(Kind::NotCarried, "stdout_logfile", "each process logged to another directory: sluice has one `log.dir` per service (its instances' files are named apart), and `data_dir/logs` was kept".into());
        return None;
    }
    dirs.into_iter().next().flatten()
}

/// The folded form of a program's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    argv: Vec<String>,
    directory: Option<String>,
    env: Vec<(String, String)>,
    port_base: Option<u16>,
}

/// Folds processes into one set of values with `{port}` and `{instance}`, or `None` when some
/// difference between them is not one of those.
fn fold(processes: &[Process]) -> Option<Template> {
    let mut port_base: Option<u16> = None;
    let first = &processes[0];
    let mut field = |values: Vec<&str>, context: &str| -> Option<String> {
        fold_values(&values, context, &mut port_base)
    };
    if processes.iter().any(|p| p.argv.len() != first.argv.len()) {
        return None;
    }
    let mut argv = Vec::new();
    for j in 0..first.argv.len() {
        let context = format!(
            "{} {}",
            if j > 0 {
                first.argv[j - 1].as_str()
            } else {
                ""
            },
            first.argv[j]
        );
        argv.push(field(
            processes.iter().map(|p| p.argv[j].as_str()).collect(),
            &context,
        )?);
    }
    let directory = match &first.directory {
        None => {
            if processes.iter().any(|p| p.directory.is_some()) {
                return None;
            }
            None
        }
        Some(_) => {
            let values: Option<Vec<&str>> =
                processes.iter().map(|p| p.directory.as_deref()).collect();
            Some(field(values?, "directory")?)
        }
    };
    let keys: Vec<&str> = first.env.iter().map(|(k, _)| k.as_str()).collect();
    let mut env = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let mut values = Vec::new();
        for p in processes {
            let (k, v) = p.env.get(i)?;
            if k != key {
                return None;
            }
            values.push(v.as_str());
        }
        env.push(((*key).to_owned(), field(values, key)?));
    }
    if processes.iter().any(|p| p.env.len() != keys.len()) {
        return None;
    }
    Some(Template {
        argv,
        directory,
        env,
        port_base,
    })
}

/// One field across processes: the same text (escaped for sluice's placeholders), or one run of
/// digits that counts up by one from process to process: `{port}` when it is a port (it is 1024
/// or more, or its context says "port"; every port field must agree on `port_base`), `{instance}`
/// when it counts from 0.
fn fold_values(values: &[&str], context: &str, port_base: &mut Option<u16>) -> Option<String> {
    if values.iter().all(|v| *v == values[0]) {
        return Some(escape(values[0]));
    }
    let chars: Vec<Vec<char>> = values.iter().map(|v| v.chars().collect()).collect();
    let shortest = chars.iter().map(Vec::len).min()?;
    let mut prefix = (0..shortest)
        .take_while(|&i| chars.iter().all(|c| c[i] == chars[0][i]))
        .count();
    let mut suffix = (0..shortest - prefix)
        .take_while(|&i| {
            chars
                .iter()
                .all(|c| c[c.len() - 1 - i] == chars[0][chars[0].len() - 1 - i])
        })
        .count();
    // The varying part is a whole number: widen it over the digits around it.
    while prefix > 0 && chars[0][prefix - 1].is_ascii_digit() {
        prefix -= 1;
    }
    while suffix > 0 && chars[0][chars[0].len() - suffix].is_ascii_digit() {
        suffix -= 1;
    }
    let mut numbers = Vec::new();
    for c in &chars {
        let middle: String = c[prefix..c.len() - suffix].iter().collect();
        if middle.is_empty()
            || !middle.bytes().all(|b| b.is_ascii_digit())
            || (middle.len() > 1 && middle.starts_with('0'))
        {
            return None;
        }
        numbers.push(middle.parse::<u64>().ok()?);
    }
    let start = numbers[0];
    if numbers
        .iter()
        .enumerate()
        .any(|(i, n)| Some(*n) != start.checked_add(i as u64))
    {
        return None;
    }
    let head: String = chars[0][..prefix].iter().collect();
    let tail: String = chars[0][chars[0].len() - suffix..].iter().collect();
    let last = start.checked_add(values.len() as u64 - 1)?;
    let port_like = start >= 1024 || context.to_ascii_lowercase().contains("port");
    let placeholder = if start >= 1 && last <= u64::from(u16::MAX) && port_like {
        let base = start as u16;
        if port_base.is_some_and(|b| b != base) {
            return None;
        }
        *port_base = Some(base);
        "{port}"
    } else if start == 0 {
        "{instance}"
    } else {
        return None;
    };
    Some(format!("{}{placeholder}{}", escape(&head), escape(&tail)))
}

/// Literal text in a sluice value: `{` and `}` doubled.
fn escape(text: &str) -> String {
    text.replace('{', "{{").replace('}', "}}")
}

/// A name sluice accepts, made from a program or process name: lower case, other characters as
/// `-`, at most [`SERVICE_NAME_MAX_LEN`].
pub fn service_name(name: &str) -> Result<String, String> {
    let mapped: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_start_matches(['-', '_']);
    let cut: String = trimmed.chars().take(SERVICE_NAME_MAX_LEN).collect();
    crate::config::check_service_name(&cut)
        .map(|()| cut)
        .map_err(|_| {
            format!(
                "{} cannot be made a service name (a-z, 0-9, `-`, `_`)",
                crate::clip::clip(name)
            )
        })
}

/// Text for a TOML comment: one line.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A TOML key: bare when it can be.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_owned()
    } else {
        toml::Value::String(key.to_owned()).to_string()
    }
}

/// The service file's text, keys in the order of config.md.
#[allow(clippy::too_many_arguments)]
fn render(
    header: &str,
    argv: &[String],
    instances: Option<u32>,
    port_base: Option<u16>,
    directory: Option<&str>,
    env: &[(String, String)],
    shared: &[(String, String)],
    log_dir: Option<&str>,
    log: &[(String, String)],
) -> String {
    let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
    let mut out = String::from(header);
    let args: Vec<String> = argv.iter().map(|a| s(a)).collect();
    out.push_str(&format!("command = [{}]\n", args.join(", ")));
    if let Some(n) = instances {
        out.push_str(&format!("instances = {n}\n"));
    }
    if let Some(base) = port_base {
        out.push_str(&format!("port_base = {base}\n"));
    }
    if let Some(dir) = directory {
        out.push_str(&format!("directory = {}\n", s(dir)));
    }
    for (k, v) in shared {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out.push_str("\n[env]\n");
    let mut has_path = false;
    for (k, v) in env {
        has_path |= k == "PATH";
        out.push_str(&format!("{} = {}\n", toml_key(k), s(v)));
    }
    if !has_path {
        out.push_str(&format!("PATH = {}\n", s(DEFAULT_PATH)));
    }
    out.push_str("\n[log]\n");
    if let Some(dir) = log_dir {
        out.push_str(&format!("dir = {}\n", s(dir)));
    }
    for (k, v) in log {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out
}

/// supervisord's `process_or_group_name`: no space, `:` or `/`.
fn process_or_group_name(name: &str) -> Result<String, String> {
    let s = name.trim();
    for c in [' ', ':', '/'] {
        if s.contains(c) {
            return Err(format!(
                "invalid name {} because of character {c:?}",
                crate::clip::clip(name)
            ));
        }
    }
    Ok(s.to_owned())
}

/// Python's `int()`: surrounding whitespace, a sign, `_` between digits.
fn integer(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let cleaned: String = t.chars().filter(|c| *c != '_').collect();
    if t.starts_with('_') || t.ends_with('_') || t.contains("__") {
        return Err(format!("{} is not an integer", crate::clip::clip(text)));
    }
    cleaned
        .parse::<i64>()
        .map_err(|_| format!("{} is not an integer", crate::clip::clip(text)))
}

/// supervisord's `boolean`.
fn boolean(text: &str) -> Result<bool, String> {
    match text.to_lowercase().as_str() {
        "yes" | "true" | "on" | "1" => Ok(true),
        "no" | "false" | "off" | "0" => Ok(false),
        _ => Err(format!(
            "not a valid boolean value: {}",
            crate::clip::clip(text)
        )),
    }
}

/// supervisord's `byte_size`: a number with an optional `KB`, `MB` or `GB` (powers of 1024).
fn byte_size(text: &str) -> Result<u64, String> {
    let lower = text.to_lowercase();
    let (number, multiplier) = if let Some(n) = lower.strip_suffix("kb") {
        (n, 1u64 << 10)
    } else if let Some(n) = lower.strip_suffix("mb") {
        (n, 1 << 20)
    } else if let Some(n) = lower.strip_suffix("gb") {
        (n, 1 << 30)
    } else {
        (lower.as_str(), 1)
    };
    let n = integer(number)?;
    u64::try_from(n)
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("{} is not a size in bytes", crate::clip::clip(text)))
}

/// supervisord's `octal_type` (Python's `int(text, 8)`).
fn octal(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0o")
        .or_else(|| t.strip_prefix("0O"))
        .unwrap_or(t);
    u32::from_str_radix(digits, 8).map_err(|_| {
        format!(
            "{} can not be converted to an octal type",
            crate::clip::clip(text)
        )
    })
}

/// supervisord's `list_of_exitcodes`.
fn exit_codes(text: &str) -> Result<Vec<i64>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|c| integer(c).ok().filter(|n| (0..=255).contains(n)))
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| {
            format!(
                "not a valid list of exit codes: {}",
                crate::clip::clip(text)
            )
        })
}

/// supervisord's `signal_number`: a number, or a name with or without `SIG`.
fn signal_number(text: &str) -> Result<i32, String> {
    if let Ok(n) = integer(text) {
        return i32::try_from(n)
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| {
                format!(
                    "value {} is not a valid signal number",
                    crate::clip::clip(text)
                )
            });
    }
    let upper = text.trim().to_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| {
            format!(
                "value {} is not a valid signal name",
                crate::clip::clip(text)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_parsers_follow_supervisord() {
        assert_eq!(integer(" 4 "), Ok(4));
        assert_eq!(integer("1_000"), Ok(1000));
        assert!(integer("4x").is_err());
        assert_eq!(boolean("Yes"), Ok(true));
        assert_eq!(boolean("off"), Ok(false));
        assert!(boolean("maybe").is_err());
        assert_eq!(byte_size("50MB"), Ok(50 << 20));
        assert_eq!(byte_size("1kb"), Ok(1024));
        assert_eq!(byte_size("2GB"), Ok(2 << 30));
        assert_eq!(byte_size("0"), Ok(0));
        assert!(byte_size("lots").is_err());
        // Found by the fuzz target: a two-byte character before the suffix.
        assert!(byte_size("\u{175}B").is_err());
        assert_eq!(octal("022"), Ok(0o22));
        assert_eq!(octal("0o27"), Ok(0o27));
        assert!(octal("8").is_err());
        assert_eq!(exit_codes("0,2"), Ok(vec![0, 2]));
        assert_eq!(exit_codes(""), Ok(vec![]));
        assert!(exit_codes("256").is_err());
        assert_eq!(signal_number("TERM"), Ok(libc::SIGTERM));
        assert_eq!(signal_number("sigquit"), Ok(libc::SIGQUIT));
        assert_eq!(signal_number("ABRT"), Ok(libc::SIGABRT));
        assert_eq!(signal_number("9"), Ok(9));
        assert!(signal_number("NOPE").is_err());
        assert!(signal_number("0").is_err());
    }

    #[test]
    fn service_names() {
        assert_eq!(service_name("web").unwrap(), "web");
        assert_eq!(service_name("Web.API").unwrap(), "web-api");
        assert_eq!(service_name("web_00").unwrap(), "web_00");
        assert_eq!(service_name("_x").unwrap(), "x");
        assert_eq!(
            service_name("a-very-long-program-name-indeed").unwrap(),
            "a-very-long-program-n"
        );
        assert!(service_name("...").is_err());
    }

    #[test]
    fn folds_ports_instances_and_refuses_the_rest() {
        type Case = (
            &'static [&'static str],
            &'static str,
            Option<(&'static str, Option<u16>)>,
        );
        let table: &[Case] = &[
            (&["a", "a"], "", Some(("a", None))),
            (&["x{y}", "x{y}"], "", Some(("x{{y}}", None))),
            (
                &["--port=8000", "--port=8001", "--port=8002"],
                "--port=8000",
                Some(("--port={port}", Some(8000))),
            ),
            (
                &["127.0.0.1:8100", "127.0.0.1:8101"],
                "--bind",
                Some(("127.0.0.1:{port}", Some(8100))),
            ),
            (
                &["9000", "9001"],
                "--listen 9000",
                Some(("{port}", Some(9000))),
            ),
            (&["w0", "w1", "w2"], "", Some(("w{instance}", None))),
            (&["80", "81"], "--port 80", Some(("{port}", Some(80)))),
            // Counting from 1 with no sign of a port: no placeholder renders it.
            (&["w1", "w2"], "", None),
            // Zero-padded instance numbers do not render as `{instance}`.
            (&["w00", "w01"], "", None),
            (&["a", "b"], "", None),
            (&["8000", "8002"], "", None),
            (&["18446744073709551615", "18446744073709551616"], "", None),
        ];
        for (values, context, want) in table {
            let mut base = None;
            let got = fold_values(values, context, &mut base);
            assert_eq!(
                got.as_deref().zip(Some(base)),
                want.map(|(t, b)| (t, b)),
                "{values:?}"
            );
        }
        let mut base = Some(7000);
        assert_eq!(
            fold_values(&["8000", "8001"], "", &mut base),
            None,
            "ports must agree on port_base"
        );
    }
}
