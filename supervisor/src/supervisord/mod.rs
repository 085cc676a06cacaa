//! `sluice import-supervisord FILE --out DIR`: reads a supervisord configuration (with its
//! includes) and writes one sluice service file per program, and a report of everything it could
//! not carry over. `docs/from-supervisord.md` is the mapping, key by key.
//!
//! Exit codes (documented there): 0 every program's settings were carried over; 5 the files were
//! written, but the report lists settings not carried over; 3 the supervisord configuration is
//! wrong (file and line said), nothing written; 1 the files could not be written (an existing one
//! without `--force`, an I/O error).

pub mod convert;
pub mod expand;
pub mod ini;
pub mod report;

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Exit code of an import that wrote its files but could not carry everything over.
pub const EXIT_INCOMPLETE: i32 = 5;

/// Mode of the service files written: root writes them, the daemon (root) reads them, and nothing
/// in them is secret that the supervisord file did not already show.
const SERVICE_FILE_MODE: u32 = 0o644;

/// The command line of `sluice import-supervisord`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The supervisord configuration (e.g. /etc/supervisor/supervisord.conf); its `[include]`
    /// files are read too.
    pub file: PathBuf,
    /// Directory to write the service files into (created if missing), e.g. /etc/sluice/services.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace service files that already exist.
    #[arg(long)]
    pub force: bool,
    /// Also write the report into this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The supervisord configuration is wrong; `line` 0 is the whole file.
    #[error("{}{}: {message}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Config {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exist(s) in {}: nothing was written (`--force` replaces them)", names.join(", "), dir.display())]
    Exists { dir: PathBuf, names: Vec<String> },
}

impl ImportError {
    /// The exit code of `sluice import-supervisord` for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ImportError::Read { .. } | ImportError::Config { .. } => crate::exit::CONFIG,
            ImportError::Write { .. } | ImportError::Exists { .. } => crate::exit::FAILED,
        }
    }
}

/// Reads, converts and writes; returns the report. Nothing is written when the configuration
/// cannot be read or converted, or when a file exists and `force` is off.
pub fn import(args: &ImportArgs, ctx: &convert::Context) -> Result<report::Report, ImportError> {
    let ini = ini::Ini::load(&args.file, |v, file| convert::expand_include(ctx, v, file))?;
    let converted = convert::convert(&ini, ctx)?;
    write_all(&args.out, &converted.services, args.force)?;
    Ok(converted.report)
}

/// The CLI verb: prints the report (and writes `--report`), returns the exit code.
pub fn run(args: &ImportArgs) -> Result<i32, ImportError> {
    let report = import(args, &convert::Context::current())?;
    let text = report.render(
        &args.file.display().to_string(),
        &args.out.display().to_string(),
    );
    print!("{text}");
    if let Some(path) = &args.report {
        std::fs::write(path, &text).map_err(|source| ImportError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(if report.complete() {
        crate::exit::OK
    } else {
        EXIT_INCOMPLETE
    })
}

/// The exit code of [`run`]'s result, printing an error on stderr.
pub fn exit_code(result: Result<i32, ImportError>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: import-supervisord: {e}");
            e.exit_code()
        }
    }
}

/// Writes every file through a temporary file and a rename, after checking that none exists
/// (unless `force`), so an import either writes all its files or, short of an I/O error midway,
/// none.
fn write_all(dir: &Path, files: &[convert::ServiceFile], force: bool) -> Result<(), ImportError> {
    std::fs::create_dir_all(dir).map_err(|source| ImportError::Write {
        path: dir.to_owned(),
        source,
    })?;
    if !force {
        let existing: Vec<String> = files
            .iter()
            .map(|f| format!("{}.toml", f.name))
            .filter(|name| std::fs::symlink_metadata(dir.join(name)).is_ok())
            .collect();
        if !existing.is_empty() {
            return Err(ImportError::Exists {
                dir: dir.to_owned(),
                names: existing,
            });
        }
    }
    for file in files {
        write_one(dir, &format!("{}.toml", file.name), &file.toml)?;
    }
    Ok(())
}

/// One file: created new (never through a link someone left), written, synced, mode 0644, renamed
/// over the target.
fn write_one(dir: &Path, name: &str, text: &str) -> Result<(), ImportError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |source| ImportError::Write { path, source }
    };
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(SERVICE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(fail(&tmp))?;
    let result = (|| {
        file.write_all(text.as_bytes())?;
        // The umask may have taken bits away from the mode given at creation.
        file.set_permissions(std::fs::Permissions::from_mode(SERVICE_FILE_MODE))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &target)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImportError::Write {
            path: target,
            source,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::convert::{Context, Converted, convert};
    use super::ini::Ini;
    use super::report::Kind;
    use super::*;
    use crate::config::{Autorestart, ServiceConfig, Signal};

    fn ctx() -> Context {
        Context {
            host_node_name: "box1".into(),
            environ: vec![("HOME".into(), "/home/op".into())],
        }
    }

    fn converted(text: &str) -> Result<Converted, ImportError> {
        let mut ini = Ini {
            files: vec![PathBuf::from("/etc/supervisor/supervisord.conf")],
            ..Ini::default()
        };
        ini.parse(0, text, false)?;
        convert(&ini, &ctx())
    }

    /// The services of `text`, each parsed with the loader `check-config` uses.
    fn services(text: &str) -> (Vec<(String, ServiceConfig)>, Converted) {
        let c = converted(text).unwrap_or_else(|e| panic!("{e}"));
        let parsed = c
            .services
            .iter()
            .map(|f| {
                let config = ServiceConfig::parse(Path::new("x.toml"), &f.toml)
                    .unwrap_or_else(|e| panic!("{e}\n{}", f.toml));
                (f.name.clone(), config)
            })
            .collect();
        (parsed, c)
    }

    fn one(text: &str) -> ServiceConfig {
        let (mut s, _) = services(text);
        assert_eq!(s.len(), 1, "{s:?}");
        s.remove(0).1
    }

    fn kinds(c: &Converted, key: &str) -> Vec<Kind> {
        c.report
            .items
            .iter()
            .filter(|i| i.key.as_deref() == Some(key) || (i.key.is_none() && i.section == key))
            .map(|i| i.kind)
            .collect()
    }

    #[test]
    fn supervisord_defaults_become_explicit_sluice_keys() {
        let s = one("[program:a]\ncommand = /bin/true\n");
        assert_eq!(s.command, ["/bin/true"]);
        assert_eq!(s.instances, 1);
        assert_eq!(s.autorestart, Autorestart::OnFailure);
        assert_eq!(s.success_exit_codes, [0]);
        assert_eq!(s.startup_ms, 1000);
        assert_eq!(s.start_retries, 3);
        assert_eq!((s.backoff_initial_ms, s.backoff_max_ms), (1000, 3000));
        assert_eq!(s.stop_signal, Signal(libc::SIGTERM));
        assert_eq!(s.stop_grace_ms, 10_000);
        assert_eq!(s.priority, 999);
        assert_eq!(s.env["PATH"], convert::DEFAULT_PATH);
        assert_eq!(s.env.len(), 1);
        assert_eq!((s.log.max_bytes, s.log.backups), (50 << 20, 10));
        assert_eq!(s.log.dir, None);
        assert_eq!(
            (
                s.user.as_deref(),
                s.umask.as_deref(),
                s.directory.as_deref()
            ),
            (None, None, None)
        );
    }

    #[test]
    fn program_keys_map_one_by_one() {
        type Check = fn(&ServiceConfig) -> bool;
        let table: &[(&str, Check)] = &[
            ("autorestart = true", |s| {
                s.autorestart == Autorestart::Always
            }),
            ("autorestart = false", |s| {
                s.autorestart == Autorestart::Never
            }),
            ("autorestart = unexpected\nexitcodes = 0,2", |s| {
                s.autorestart == Autorestart::OnFailure && s.success_exit_codes == [0, 2]
            }),
            ("startsecs = 5", |s| s.startup_ms == 5000),
            ("startsecs = 0", |s| s.startup_ms == 0),
            ("startretries = 1", |s| {
                s.start_retries == 1 && s.backoff_max_ms == 1000
            }),
            ("startretries = 6", |s| {
                s.start_retries == 6 && s.backoff_max_ms == 6000
            }),
            ("stopsignal = QUIT", |s| {
                s.stop_signal == Signal(libc::SIGQUIT)
            }),
            ("stopsignal = SIGABRT", |s| {
                s.stop_signal == Signal(libc::SIGABRT)
            }),
            ("stopsignal = 10", |s| s.stop_signal == Signal(10)),
            ("stopwaitsecs = 30", |s| s.stop_grace_ms == 30_000),
            ("user = nobody", |s| s.user.as_deref() == Some("nobody")),
            ("umask = 027", |s| s.umask.as_deref() == Some("027")),
            ("umask = 2", |s| s.umask.as_deref() == Some("002")),
            ("directory = /srv/%(program_name)s", |s| {
                s.directory.as_deref() == Some("/srv/a")
            }),
            ("directory = %(here)s/app", |s| {
                s.directory.as_deref() == Some("/etc/supervisor/app")
            }),
            ("priority = 10", |s| s.priority == 10),
            ("priority = -5", |s| s.priority == -5),
            (r#"environment = KEY="val,ue",B=2"#, |s| {
                s.env["KEY"] == "val,ue" && s.env["B"] == "2" && s.env.contains_key("PATH")
            }),
            ("environment = PATH=/opt/bin", |s| {
                s.env["PATH"] == "/opt/bin"
            }),
            (
                "environment = H=%(ENV_HOME)s,N=%(host_node_name)s,G=%(group_name)s",
                |s| s.env["H"] == "/home/op" && s.env["N"] == "box1" && s.env["G"] == "a",
            ),
            ("environment = A=1\ndirectory = /d/%(ENV_A)s", |s| {
                s.directory.as_deref() == Some("/d/1")
            }),
            (
                "stdout_logfile = /var/log/a/out.log\nstdout_logfile_maxbytes = 1MB\nstdout_logfile_backups = 3",
                |s| {
                    s.log.dir.as_deref() == Some(Path::new("/var/log/a"))
                        && s.log.max_bytes == 1 << 20
                        && s.log.backups == 3
                },
            ),
            (
                "stdout_logfile = NONE\nstderr_logfile = /l/err.log\nstderr_logfile_maxbytes = 2KB",
                |s| s.log.dir.as_deref() == Some(Path::new("/l")) && s.log.max_bytes == 2048,
            ),
            ("stdout_logfile_maxbytes = 0", |s| s.log.max_bytes == 0),
            (
                "stdout_logfile = /a/o.log\nstderr_logfile = /b/e.log",
                |s| s.log.dir.as_deref() == Some(Path::new("/a")),
            ),
            ("command = /bin/echo {x} 100%% 'a b'", |s| {
                s.command == ["/bin/echo", "{{x}}", "100%", "a b"]
            }),
        ];
        for (lines, check) in table {
            let text = format!("[program:a]\ncommand = /bin/true\n{lines}\n");
            let s = one(&text);
            assert!(check(&s), "{lines}: {s:#?}");
        }
    }

    #[test]
    fn supervisord_section_gives_programs_its_environment_user_and_umask() {
        let text = "[supervisord]\nenvironment = A=1,B=2\nuser = app\numask = 077\nminfds = 65536\nlogfile = /x\n\
                    [program:a]\ncommand = /bin/true\nenvironment = B=3\n\
                    [program:b]\ncommand = /bin/true\nuser = other\numask = 022\n";
        let (s, c) = services(text);
        let (a, b) = (&s[0].1, &s[1].1);
        assert_eq!((a.env["A"].as_str(), a.env["B"].as_str()), ("1", "3"));
        assert_eq!(
            (a.user.as_deref(), a.umask.as_deref(), a.nofile),
            (Some("app"), Some("077"), Some(65536))
        );
        assert_eq!(
            (b.user.as_deref(), b.umask.as_deref()),
            (Some("other"), Some("022"))
        );
        assert_eq!(kinds(&c, "logfile"), [Kind::Supervisord]);
        assert_eq!(kinds(&c, "minfds"), [Kind::Changed]);
        assert!(c.report.complete(), "{:?}", c.report.items);
        // The usual minfds = 1024 writes no `nofile`.
        let s = one("[supervisord]\nminfds = 1024\n[program:a]\ncommand = /bin/true\n");
        assert_eq!(s.nofile, None);
    }

    #[test]
    fn numprocs_become_instances_with_ports_derived_from_process_num() {
        let table: &[(&str, &[&str], Option<u16>)] = &[
            (
                "command = /app --port=80%(process_num)02d",
                &["/app", "--port={port}"],
                Some(8000),
            ),
            (
                "command = /app --port %(process_num)d\nnumprocs_start = 9100",
                &["/app", "--port", "{port}"],
                Some(9100),
            ),
            (
                "command = /app --bind 127.0.0.1:70%(process_num)02d --name w%(process_num)d",
                &[
                    "/app",
                    "--bind",
                    "127.0.0.1:{port}",
                    "--name",
                    "w{instance}",
                ],
                Some(7000),
            ),
            (
                "command = /app --worker %(process_num)d",
                &["/app", "--worker", "{instance}"],
                None,
            ),
            ("command = /app --same", &["/app", "--same"], None),
        ];
        for (lines, argv, port_base) in table {
            let text = format!(
                "[program:web]\nprocess_name = %(program_name)s_%(process_num)02d\nnumprocs = 4\n{lines}\n"
            );
            let s = one(&text);
            assert_eq!(s.command, *argv, "{lines}");
            assert_eq!(s.instances, 4, "{lines}");
            assert_eq!(s.port_base, *port_base, "{lines}");
        }
        let s = one(
            "[program:web]\nprocess_name = %(process_num)s\nnumprocs = 2\ncommand = /app\n\
                     environment = PORT=60%(process_num)02d,NAME=\"web-%(process_num)d\"\n",
        );
        assert_eq!(
            (s.port_base, s.env["PORT"].as_str(), s.env["NAME"].as_str()),
            (Some(6000), "{port}", "web-{instance}")
        );
    }

    #[test]
    fn copies_that_placeholders_cannot_reproduce_become_services_of_their_own() {
        let text = "[program:Worker]\nprocess_name = %(program_name)s-%(process_num)02d\nnumprocs = 2\n\
                    numprocs_start = 1\ncommand = /app --id %(process_num)d\n";
        let (s, c) = services(text);
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["worker-01", "worker-02"]);
        assert_eq!(s[0].1.command, ["/app", "--id", "1"]);
        assert_eq!(s[1].1.command, ["/app", "--id", "2"]);
        assert_eq!(kinds(&c, "numprocs"), [Kind::Changed]);
    }

    #[test]
    fn what_sluice_cannot_do_is_reported_never_dropped() {
        let text = "[program:a]\ncommand = /bin/true\nautostart = false\nstopasgroup = true\nserverurl = http://x\n\
                    stdout_events_enabled = true\nstdout_capture_maxbytes = 1MB\nstderr_syslog = true\n\
                    stdout_logfile = syslog\nstderr_logfile = /l/e.log\nstderr_logfile_backups = 2\nbogus = 1\n\
                    [eventlistener:m]\ncommand = memmon\nevents = TICK_60\n\
                    [fcgi-program:f]\ncommand = /f\nsocket = tcp://localhost:9000\n\
                    [inet_http_server]\nport = 9001\n[ctlplugin:x]\nk = v\n[somethingelse]\nk = v\n\
                    [include]\nfiles = none/*.conf\nextra = 1\n";
        let (_, c) = services(text);
        for key in [
            "autostart",
            "stopasgroup",
            "serverurl",
            "stdout_events_enabled",
            "stdout_capture_maxbytes",
            "stderr_syslog",
            "stdout_logfile",
            "eventlistener:m",
            "fcgi-program:f",
        ] {
            assert!(
                kinds(&c, key).contains(&Kind::NotCarried),
                "{key}: {:#?}",
                c.report.items
            );
        }
        let (_, split) = services(
            "[program:a]\ncommand = /x\nstdout_logfile = /a/o.log\nstderr_logfile = /b/e.log\n",
        );
        assert_eq!(
            kinds(&split, "stderr_logfile"),
            [Kind::Changed, Kind::NotCarried]
        );
        for key in [
            "bogus",
            "inet_http_server",
            "ctlplugin:x",
            "somethingelse",
            "extra",
        ] {
            assert_eq!(kinds(&c, key), [Kind::Supervisord], "{key}");
        }
        assert!(!c.report.complete());
        let place = &c
            .report
            .items
            .iter()
            .find(|i| i.key.as_deref() == Some("autostart"))
            .unwrap()
            .place;
        assert_eq!(place, "/etc/supervisor/supervisord.conf:3");
    }

    #[test]
    fn groups_name_their_programs_and_are_checked() {
        let (s, c) = services(
            "[group:front]\nprograms = web,api\npriority = 1\n[program:web]\ncommand = /w %(group_name)s\n[program:api]\ncommand = /a\n",
        );
        assert_eq!(s[0].1.command, ["/w", "front"]);
        assert_eq!(s.len(), 2);
        assert_eq!(kinds(&c, "group:front"), [Kind::Changed]);
        assert_eq!(kinds(&c, "priority"), [Kind::NotCarried]);
    }

    #[test]
    fn wrong_configurations_are_errors_naming_file_line_and_key() {
        let table: &[(&str, &str)] = &[
            (
                "[program:a]\nnumprocs = 2\ncommand = /x\n",
                "supervisord.conf:1: [program:a] process_name: %(process_num) must be present",
            ),
            (
                "[program:a]\ncommand = /x\nautostart = maybe\n",
                "supervisord.conf:3: [program:a] autostart: not a valid boolean",
            ),
            (
                "[program:a]\ncommand = /x\nstopasgroup = true\nkillasgroup = false\n",
                "supervisord.conf:4: [program:a] killasgroup: cannot set",
            ),
            (
                "[program:a]\nuser = x\n",
                "supervisord.conf:1: [program:a] does not specify a command",
            ),
            (
                "[program:a]\ncommand = /x %(nope)s\n",
                "supervisord.conf:2: [program:a] command: `%(nope)` cannot be expanded",
            ),
            (
                "[program:a]\ncommand = /x 'open\n",
                "supervisord.conf:2: [program:a] command: cannot be split",
            ),
            (
                "[program:a]\ncommand = /x\nenvironment = A\n",
                "supervisord.conf:3: [program:a] environment: unexpected end",
            ),
            (
                "[program:a]\ncommand = /x\nnumprocs = 300\nprocess_name = %(process_num)s\n",
                "more than the 256 instances",
            ),
            (
                "[program:a]\ncommand = /x\numask = 1777\n",
                "[program:a] umask: 1777 is more than 777",
            ),
            (
                "[group:g]\nprograms = nope\n",
                "supervisord.conf:2: [group:g] programs: names unknown program nope",
            ),
            ("[program:a b]\ncommand = /x\n", "invalid name"),
            (
                "[program:Web]\ncommand = /x\n[program:web]\ncommand = /y\n",
                "would be written as web.toml, like [program:Web]",
            ),
        ];
        for (text, words) in table {
            let e = converted(text)
                .err()
                .unwrap_or_else(|| panic!("{text}: no error"))
                .to_string();
            assert!(e.contains(words), "{text}: {e}");
            assert!(e.starts_with("/etc/supervisor/supervisord.conf"), "{e}");
        }
    }

    #[test]
    fn includes_are_globs_relative_to_the_main_file_and_one_level_deep() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("conf.d")).unwrap();
        std::fs::write(
            root.join("main.conf"),
            "[supervisord]\n[include]\nfiles = conf.d/*.conf missing/*.conf\n",
        )
        .unwrap();
        std::fs::write(
            root.join("conf.d/b.conf"),
            "[program:b]\ncommand = /b %(here)s\n",
        )
        .unwrap();
        std::fs::write(
            root.join("conf.d/a.conf"),
            "[program:a]\ncommand = /a\n[include]\nfiles = ../never/*.conf\n",
        )
        .unwrap();
        // Python's glob skips hidden files.
        std::fs::write(
            root.join("conf.d/.hidden.conf"),
            "[program:h]\ncommand = /h\n",
        )
        .unwrap();
        let c = &ctx();
        let ini = Ini::load(&root.join("main.conf"), |v, f| {
            convert::expand_include(c, v, f)
        })
        .unwrap();
        assert_eq!(ini.files.len(), 3, "{:?}", ini.files);
        assert!(ini.files[1].ends_with("conf.d/a.conf"));
        assert_eq!(ini.nested_includes, [(1, 3)]);
        assert_eq!(ini.unmatched_includes.len(), 1);
        let out = convert(&ini, c).unwrap();
        let b = &out.services.iter().find(|s| s.name == "b").unwrap().toml;
        assert!(
            b.contains(&format!("\"{}\"", root.join("conf.d").display())),
            "{b}"
        );
        assert!(out.services.iter().all(|s| s.name != "h"));
        assert!(
            out.report
                .items
                .iter()
                .any(|i| i.kind == Kind::Supervisord && i.section == "include" && i.key.is_none())
        );
    }

    /// Seeded mutations of the test fixtures: every one is an import or an error, never a panic
    /// (slicing, arithmetic on numbers from the file, widths).
    #[test]
    fn mangled_configurations_are_errors_or_imports_never_panics() {
        const FIXTURES: &[&str] = &[
            include_str!("../../../tests/fixtures/supervisord/basic/supervisord.conf"),
            include_str!("../../../tests/fixtures/supervisord/basic/conf.d/web.conf"),
            include_str!("../../../tests/fixtures/supervisord/basic/conf.d/jobs.conf"),
            include_str!("../../../tests/fixtures/supervisord/quoting/supervisord.conf"),
            include_str!("../../../tests/fixtures/supervisord/unsupported/supervisord.conf"),
        ];
        const ALPHABET: &[u8] = b"[]=:;#%()sdx029 \n\t\"'\\,{}/-_";
        const ROUNDS: usize = 1000;
        // SplitMix64: replayable without a dependency.
        let mut state: u64 = 0x5eed_1e55;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        for round in 0..ROUNDS {
            let mut text = FIXTURES[round % FIXTURES.len()].as_bytes().to_vec();
            for _ in 0..1 + next() % 8 {
                let at = (next() as usize) % (text.len() + 1);
                match next() % 3 {
                    0 => text.insert(at, ALPHABET[(next() as usize) % ALPHABET.len()]),
                    1 if at < text.len() => {
                        text.remove(at);
                    }
                    _ => {
                        let len = (next() as usize % 40).min(text.len() - at);
                        let copy = text[at..at + len].to_vec();
                        text.splice(at..at, copy);
                    }
                }
            }
            let text = String::from_utf8_lossy(&text);
            let result = std::panic::catch_unwind(|| converted(&text).map(|c| c.services.len()));
            assert!(result.is_ok(), "round {round} panicked on:\n{text}");
        }
    }

    #[test]
    fn the_verb_parses() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from([
            "sluice",
            "import-supervisord",
            "/etc/supervisord.conf",
            "--out",
            "/tmp/s",
            "--force",
            "--report",
            "/tmp/r.txt",
        ])
        .unwrap();
        let crate::cli::Command::ImportSupervisord(args) = cli.command else {
            panic!("{cli:?}");
        };
        assert_eq!(args.file, Path::new("/etc/supervisord.conf"));
        assert_eq!(args.out, Path::new("/tmp/s"));
        assert!(args.force);
        assert_eq!(args.report.as_deref(), Some(Path::new("/tmp/r.txt")));
        assert!(crate::cli::Cli::try_parse_from(["sluice", "import-supervisord", "f"]).is_err());
    }

    #[test]
    fn files_are_written_whole_and_never_over_existing_ones_without_force() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("s.conf");
        std::fs::write(
            &conf,
            "[supervisord]\n[program:a]\ncommand = /bin/true\n[program:b]\ncommand = /bin/true\n",
        )
        .unwrap();
        let out = dir.path().join("out");
        let args = ImportArgs {
            file: conf,
            out: out.clone(),
            force: false,
            report: None,
        };
        let report = import(&args, &ctx()).unwrap();
        assert!(report.complete());
        let mode = std::fs::metadata(out.join("a.toml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644);
        std::fs::write(out.join("b.toml"), "mine").unwrap();
        let e = import(&args, &ctx()).unwrap_err();
        assert!(matches!(e, ImportError::Exists { .. }), "{e}");
        assert_eq!(e.exit_code(), crate::exit::FAILED);
        assert_eq!(std::fs::read_to_string(out.join("b.toml")).unwrap(), "mine");
        import(
            &ImportArgs {
                force: true,
                ..args
            },
            &ctx(),
        )
        .unwrap();
        assert!(
            std::fs::read_to_string(out.join("b.toml"))
                .unwrap()
                .contains("command")
        );
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
    }
}
