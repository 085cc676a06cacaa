//! `sluice import-supervisord`: supervisord configurations of our own (includes by glob, groups,
//! `numprocs` with ports, environment quoting, continuation lines, comments, sections sluice has
//! no equivalent for) become service files that `sluice check-config` accepts, that run the same
//! processes as supervisord itself makes of the files (supervisord's own parser, from the test
//! virtualenv, is the judge), and a converted `numprocs = 4` program runs as 4 instances on the
//! ports its command had.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_tests::{Host, Out, PATIENCE, fixtures, run_bounded};

/// The supervisord configurations under `tests/fixtures/supervisord/`.
fn fixture(name: &str) -> PathBuf {
    fixtures::dir()
        .join("supervisord")
        .join(name)
        .join("supervisord.conf")
}

fn import(h: &Host, conf: &Path, extra: &[&str]) -> Out {
    let out = h.path("services");
    let mut args = vec![
        "import-supervisord",
        conf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    h.sluice(&args)
}

/// supervisord's own reading of `conf` against the service files: `None` (after saying so) when
/// supervisord is not installed outside CI.
fn supervisord_agrees(h: &Host, conf: &Path) -> Option<Out> {
    let python = fixtures::venv_bin("python")?;
    let has_supervisor = std::process::Command::new(&python)
        .args(["-P", "-c", "import supervisor.supervisord"])
        .status()
        .is_ok_and(|s| s.success());
    if !fixtures::require("supervisor (PyPI) in the test virtualenv", has_supervisor) {
        return None;
    }
    let mut cmd = std::process::Command::new(python);
    cmd.arg(fixtures::dir().join("supervisord_compare.py"))
        .arg(conf)
        .arg(h.path("services"));
    Some(run_bounded(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn every_fixture_imports_into_files_check_config_accepts_and_supervisord_agrees() {
    // Fixture, exit code, the services it must write, words its report must hold.
    type Case = (
        &'static str,
        i32,
        &'static [&'static str],
        &'static [&'static str],
    );
    let table: &[Case] = &[
        (
            "basic",
            0,
            &["cleaner", "mailer", "web"],
            &[
                "web.toml: [program:web], 4 instances, port_base 8000 (ports 8000-8003)",
                "[group:jobs]: sluice has no groups",
                "[program:web] redirect_stderr: sluice keeps stderr apart",
                "[supervisord] pidfile: systemd tracks the daemon",
                "[unix_http_server]: supervisord's control socket",
                "complete: every program's settings were carried over",
            ],
        ),
        (
            "quoting",
            0,
            &["api", "quoted", "tabbed", "worker_01", "worker_02"],
            &[
                "api.toml: [program:api], 3 instances, port_base 9200",
                "[program:worker] numprocs: the 2 processes differ",
                "[DEFAULT]: its keys were read as defaults",
                "complete: every program's settings were carried over",
            ],
        ),
        (
            "unsupported",
            5,
            &["legacy"],
            &[
                "[eventlistener:memmon]: event listeners",
                "[fcgi-program:php]: FastCGI programs",
                "[program:legacy] autostart:",
                "[program:legacy] stopasgroup:",
                "[program:legacy] serverurl:",
                "[program:legacy] stdout_events_enabled:",
                "[program:legacy] stderr_logfile: syslog",
                "[program:legacy] sluice_never_heard_of_it: not a [program:x] key",
                "[inet_http_server]:",
                "incomplete: 8 setting(s) not carried over",
            ],
        ),
    ];
    for (name, code, services, words) in table {
        let h = Host::new();
        let conf = fixture(name);
        let report = h.path("report.txt");
        let out = import(&h, &conf, &["--report", report.to_str().unwrap()]).code(*code);
        for w in *words {
            assert!(
                out.stdout.contains(w),
                "{name}: no `{w}` in the report:\n{out}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(&report).unwrap(),
            out.stdout,
            "{name}: --report"
        );
        let mut written: Vec<String> = std::fs::read_dir(h.path("services"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        written.sort();
        let want: Vec<String> = services.iter().map(|s| format!("{s}.toml")).collect();
        assert_eq!(written, want, "{name}: files written\n{out}");
        let check = h.sluice(&["check-config"]).success();
        assert!(
            check.stdout.contains(&format!(
                "ok, {} service(s): {}",
                services.len(),
                services.join(", ")
            )),
            "{name}: {check}"
        );
        if let Some(judge) = supervisord_agrees(&h, &conf) {
            assert_eq!(
                judge.code,
                Some(0),
                "{name}: supervisord runs something else:\n{judge}"
            );
        }
    }
}

#[test]
fn existing_files_are_kept_unless_forced_and_a_wrong_file_writes_nothing() {
    let h = Host::new();
    let conf = fixture("basic");
    import(&h, &conf, &[]).success();
    std::fs::write(h.service_file("web"), "command = [\"/bin/true\"]\n").unwrap();
    let out = import(&h, &conf, &[]).code(1);
    assert!(out.stderr.contains("web.toml already exist(s)"), "{out}");
    assert!(out.stderr.contains("`--force` replaces them"), "{out}");
    assert_eq!(
        std::fs::read_to_string(h.service_file("web")).unwrap(),
        "command = [\"/bin/true\"]\n"
    );
    import(&h, &conf, &["--force"]).success();
    assert!(
        std::fs::read_to_string(h.service_file("web"))
            .unwrap()
            .contains("instances = 4")
    );

    let bad = h.path("bad.conf");
    std::fs::write(
        &bad,
        "[supervisord]\n[program:x]\ncommand = /bin/sleep 1\nnumprocs = 2\n",
    )
    .unwrap();
    let fresh = Host::new();
    let out = import(&fresh, &bad, &[]).code(3);
    assert!(
        out.stderr.contains(&format!(
            "{}:2: [program:x] process_name: %(process_num) must be present",
            bad.display()
        )),
        "{out}"
    );
    assert!(!fresh.service_file("x").exists());
}

/// `n` ports from a multiple of 100, free now: a command written `--port=NNN%(process_num)02d`.
fn free_hundred(n: u16) -> u16 {
    for hundred in (20_000u16..60_000)
        .step_by(100)
        .skip(usize::from(std::process::id() as u16 % 300))
    {
        let held: Vec<_> = (hundred..hundred + n)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return hundred;
        }
    }
    panic!("no {n} free ports from a multiple of 100");
}

fn get(port: u16) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    Ok(answer)
}

#[test]
fn a_numprocs_4_program_runs_as_4_instances_on_the_ports_of_its_command() {
    let h = Host::new();
    let base = free_hundred(4);
    let prefix = base / 100;
    let dir = h.path("supervisor");
    std::fs::create_dir_all(dir.join("conf.d")).unwrap();
    std::fs::write(
        dir.join("supervisord.conf"),
        "[supervisord]\nnodaemon = true\n\n[include]\nfiles = conf.d/*.conf\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("conf.d/web.conf"),
        format!(
            "[program:web]\n\
             command = /usr/bin/python3 {app}\n\
             \x20   --port={prefix}%(process_num)02d   ; the port of each copy\n\
             process_name = %(program_name)s_%(process_num)02d\n\
             numprocs = 4\n\
             environment = NAME=\"web-%(process_num)d\"\n\
             stopwaitsecs = 2\n",
            app = fixtures::dir().join("port_app.py").display()
        ),
    )
    .unwrap();
    let out = import(&h, &dir.join("supervisord.conf"), &[]).success();
    assert!(
        out.stdout
            .contains(&format!("port_base {base} (ports {base}-{})", base + 3)),
        "{out}"
    );
    let toml = std::fs::read_to_string(h.service_file("web")).unwrap();
    assert!(toml.contains("\"--port={port}\""), "{toml}");
    h.sluice(&["check-config"]).success();

    h.start_daemon();
    let s = h.wait_until(|s| s.running("web") == 4, PATIENCE);
    for i in 0..4u16 {
        assert_eq!(s.instance("web", u32::from(i))["port"], base + i, "{s}");
    }
    for i in 0..4u16 {
        let port = base + i;
        let deadline = Instant::now() + PATIENCE;
        let answer = loop {
            match get(port) {
                Ok(answer) if answer.starts_with("HTTP/1.0 200") => break answer,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "port {port}: {other:?}\n{}",
                        h.daemon_log_tail()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        assert!(
            answer.ends_with(&format!("port={port} name=web-{i}\n")),
            "port {port}: {answer}"
        );
    }
}
