//! Privilege drop and environment: an instance runs as the configured user, group and supplementary
//! groups, with the configured umask and exactly the configured environment, nothing inherited.

use sluice_tests::{Host, PATIENCE, procs, require_root};

/// `nobody` and `nogroup` on Debian.
const NOBODY: &str = "65534";

#[test]
fn instance_runs_as_configured_user_with_exactly_the_configured_env() {
    if !require_root() {
        return;
    }
    let h = Host::new();
    let identity = r#"
user = "nobody"
group = "nogroup"
umask = "027"
env = { FOO = "bar", PATH = "/usr/bin:/bin" }
"#;
    // Prints what it runs as, then becomes a long-running process that /proc can be asked about.
    h.service(
        "ident",
        &format!(
            r#"command = ["/bin/sh", "-c", "id -u; id -g; id -G; umask; exec sleep 1000"]
{identity}"#
        ),
    );
    // `env` exec'd directly: a shell would add PWD, SHLVL or `_` of its own.
    h.service(
        "envdump",
        &format!(
            r#"command = ["/usr/bin/env"]
autorestart = "never"
{identity}"#
        ),
    );
    h.start_daemon();

    let s = h.wait_until(
        |s| s.running("ident") == 1 && s.state("envdump", 0) == "exited",
        PATIENCE,
    );
    let log = h.wait_for_log("ident", 0, |t| t.lines().count() >= 4, PATIENCE);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines,
        [NOBODY, NOBODY, NOBODY, "0027"],
        "id -u, id -g, id -G, umask"
    );

    let pid = s.pid("ident", 0).unwrap();
    let field = |key| procs::status_field(pid, key).unwrap_or_default();
    let all_nobody = [NOBODY; 4].join(" ");
    assert_eq!(field("Uid"), all_nobody, "real, effective, saved, fs uid");
    assert_eq!(field("Gid"), all_nobody, "real, effective, saved, fs gid");
    assert_eq!(field("Groups"), NOBODY, "supplementary groups");
    assert_eq!(field("Umask"), "0027");
    // Not its /proc environ: the shell that exec'd `sleep` exported PWD of its own. `envdump`
    // below shows the environment the shim gives.

    let env = h.wait_for_log("envdump", 0, |t| t.lines().count() >= 2, PATIENCE);
    let mut env: Vec<&str> = env.lines().collect();
    env.sort();
    assert_eq!(
        env,
        ["FOO=bar", "PATH=/usr/bin:/bin"],
        "the whole environment"
    );
    let exit = s.instance("envdump", 0)["last_exit"].clone();
    assert_eq!(exit, "exit code 0", "{s}");
}
