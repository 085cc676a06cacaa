//! The hook runner against real processes: failures, timeouts, users and environment, markers, build
//! hooks and the stock hooks. Each test works in its own temp dir.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_hooks::{Hook, HookError, Identity, Outcome, Run, Stage, hooks_for, run_stage};

/// A temp dir with a release, a log dir and a stock dir, and the service environment of the runs.
struct Fixture {
    dir: tempfile::TempDir,
    release: PathBuf,
    logs: PathBuf,
    stock: PathBuf,
    env: BTreeMap<String, String>,
    timeout_ms: u64,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let release = dir.path().join("releases/b2");
        std::fs::create_dir_all(&release).unwrap();
        Fixture {
            release,
            logs: dir.path().join("logs"),
            stock: dir.path().join("stock"),
            dir,
            env: BTreeMap::new(),
            timeout_ms: 60_000,
        }
    }

    fn run(&self, stage: Stage, identity: Option<Identity>) -> Run<'_> {
        Run {
            stage,
            service: "web",
            build: "b2",
            previous_build: Some("b1"),
            release_dir: (stage != Stage::PreDownload).then_some(self.release.as_path()),
            identity,
            extra_env: &self.env,
            timeout_ms: self.timeout_ms,
            log_dir: &self.logs,
            stock_dir: &self.stock,
        }
    }

    async fn stage(&self, stage: Stage, hooks: &[Hook]) -> Result<Vec<Outcome>, HookError> {
        run_stage(&self.run(stage, None), hooks).await
    }

    fn configured(&self, stage: Stage, configured: &[&[&str]]) -> Vec<Hook> {
        let configured: Vec<Vec<String>> = configured
            .iter()
            .map(|argv| argv.iter().map(|s| s.to_string()).collect())
            .collect();
        let release = (stage != Stage::PreDownload).then_some(self.release.as_path());
        hooks_for(stage, &configured, release, &self.stock).unwrap()
    }

    fn log(&self, stage: Stage, index: usize) -> String {
        std::fs::read_to_string(self.logs.join(format!("b2-{stage}-{index}.log"))).unwrap()
    }
}

fn sh(name: &str, script: &str) -> Hook {
    Hook {
        name: name.to_owned(),
        argv: vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()],
    }
}

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Prints why a test cannot run here and returns; in CI such a test must run, so it panics.
fn skip(why: &str) {
    assert!(!in_ci(), "CI=true, but {why}");
    println!("skipping: {why}");
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test]
async fn a_failing_hook_reports_its_status_and_output_tail_and_logs_everything() {
    let f = Fixture::new();
    let noisy = "echo first-line; echo on-stderr >&2; i=0; \
                 while [ $i -lt 2000 ]; do echo filler-$i; i=$((i+1)); done; \
                 echo last-words >&2; exit 3";
    let after = sh("after", "touch \"$SLUICE_RELEASE_DIR/after-ran\"");
    let err = f
        .stage(Stage::PostInstall, &[sh("noisy", noisy), after])
        .await
        .unwrap_err();
    let HookError::Failed {
        stage,
        name,
        status,
        output_tail,
    } = &err
    else {
        panic!("expected Failed, got {err:?}");
    };
    assert_eq!(
        (*stage, name.as_str(), status.as_str()),
        (Stage::PostInstall, "noisy", "exit code 3")
    );
    assert!(
        output_tail.ends_with("filler-1999\nlast-words\n"),
        "{output_tail}"
    );
    assert!(output_tail.len() <= sluice_hooks::OUTPUT_TAIL_BYTES);
    assert!(!output_tail.contains("first-line"));
    assert_eq!(
        err.to_string(),
        "post_install hook `noisy` failed with exit code 3"
    );

    let log = f.log(Stage::PostInstall, 0);
    assert!(
        log.starts_with("first-line\non-stderr\nfiller-0\n"),
        "stdout and stderr in order"
    );
    assert!(log.ends_with("filler-1999\nlast-words\n"));
    assert!(
        !f.release.join("after-ran").exists(),
        "the stage stops at the first failure"
    );
    assert!(!f.release.join(".sluice/hooks-done/post_install-0").exists());
}

#[tokio::test]
async fn a_hook_that_cannot_start_is_a_spawn_error() {
    let f = Fixture::new();
    let missing = Hook {
        name: "missing".to_owned(),
        argv: vec!["/nonexistent/hook".to_owned()],
    };
    let err = f.stage(Stage::PreRestart, &[missing]).await.unwrap_err();
    assert!(matches!(err, HookError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/hook"), "{err}");
}

/// Processes (not zombies) whose process group is `pgid`, from field 5 of /proc/*/stat.
fn group_members(pgid: u32) -> Vec<String> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            members.push(stat);
        }
    }
    members
}

#[tokio::test]
async fn a_hook_past_its_timeout_is_killed_with_its_whole_group() {
    let mut f = Fixture::new();
    f.timeout_ms = 500;
    // The grandchild outlives its parent's wait and keeps the output pipe open.
    let hook = sh(
        "sleepy",
        "echo pgid=$$; sh -c 'sleep 300' & echo grandchild=$!; sleep 300",
    );
    let started = Instant::now();
    let err = f.stage(Stage::PreRestart, &[hook]).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let HookError::Timeout {
        timeout_ms,
        output_tail,
        ..
    } = &err
    else {
        panic!("expected Timeout, got {err:?}");
    };
    assert_eq!(*timeout_ms, 500);
    assert!(output_tail.contains("grandchild="), "{output_tail}");
    let pgid: u32 = output_tail
        .lines()
        .find_map(|l| l.strip_prefix("pgid="))
        .unwrap()
        .parse()
        .unwrap();

    // SIGKILL is sent before run_stage returns, but dying takes the kernel a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let members = group_members(pgid);
        if members.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "survivors of group {pgid}: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_hook_runs_as_the_service_user_with_exactly_the_documented_environment() {
    if !is_root() {
        skip("needs root");
        return;
    }
    let mut f = Fixture::new();
    // The temp dir is 0700 and the hook's cwd is the release, so let the service user in.
    for dir in [f.dir.path(), &f.dir.path().join("releases"), &f.release] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    f.env = BTreeMap::from([
        ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
        ("GREETING".to_owned(), "hello world".to_owned()),
    ]);
    let nobody = Identity {
        uid: 65534,
        gid: 65534,
        groups: vec![65534],
    };
    // env straight from the runner, not through a shell, which would add PWD and the like.
    let env = Hook {
        name: "env".to_owned(),
        argv: vec!["/usr/bin/env".to_owned()],
    };
    let hooks = [sh("whoami", "id -u; id -G"), env];
    run_stage(&f.run(Stage::PreRestart, Some(nobody)), &hooks)
        .await
        .unwrap();

    let ids = f.log(Stage::PreRestart, 0);
    assert_eq!(
        ids, "65534\n65534\n",
        "uid, then gid and groups: root's group 0 is gone"
    );
    let log = f.log(Stage::PreRestart, 1);
    let env: BTreeMap<&str, &str> = log.lines().map(|l| l.split_once('=').unwrap()).collect();
    let release = f.release.to_str().unwrap();
    let home = nobody_home();
    let expected = BTreeMap::from([
        ("GREETING", "hello world"),
        ("HOME", home.as_str()),
        ("PATH", "/usr/bin:/bin"),
        ("SLUICE_BUILD", "b2"),
        ("SLUICE_PREVIOUS_BUILD", "b1"),
        ("SLUICE_RELEASE_DIR", release),
        ("SLUICE_SERVICE", "web"),
        ("SLUICE_STAGE", "pre_restart"),
    ]);
    assert_eq!(env, expected);
}

/// uid 65534's home in /etc/passwd, or `/`.
fn nobody_home() -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[2] == "65534")
        .map_or("/".to_owned(), |f| f[5].to_owned())
}

#[tokio::test]
async fn pre_download_has_no_release_dir_and_runs_in_root() {
    let f = Fixture::new();
    let out = f.dir.path().join("out");
    let script = format!(
        "{{ pwd; echo \"[${{SLUICE_RELEASE_DIR-unset}}]\"; }} > {}",
        out.display()
    );
    f.stage(Stage::PreDownload, &[sh("where", &script)])
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(out).unwrap(), "/\n[unset]\n");
}

#[tokio::test]
async fn post_install_hooks_that_succeeded_are_skipped_but_restart_hooks_always_run() {
    let f = Fixture::new();
    let counter = f.release.join("count");
    let count = || {
        std::fs::read_to_string(&counter)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let hooks = [sh("count", "echo run >> \"$SLUICE_RELEASE_DIR/count\"")];

    let first = f.stage(Stage::PostInstall, &hooks).await.unwrap();
    assert!(!first[0].skipped);
    assert!(
        f.release
            .join(".sluice/hooks-done/post_install-0")
            .is_file()
    );
    let second = f.stage(Stage::PostInstall, &hooks).await.unwrap();
    assert_eq!(
        second,
        [Outcome {
            name: "count".to_owned(),
            skipped: true,
            duration_ms: 0
        }]
    );
    assert_eq!(count(), 1);

    // A changed command is new work.
    let changed = [sh(
        "count",
        "echo run >> \"$SLUICE_RELEASE_DIR/count\"; true",
    )];
    assert!(!f.stage(Stage::PostInstall, &changed).await.unwrap()[0].skipped);
    assert_eq!(count(), 2);

    for _ in 0..2 {
        assert!(!f.stage(Stage::PreRestart, &hooks).await.unwrap()[0].skipped);
    }
    assert_eq!(count(), 4);
    assert!(!f.release.join(".sluice/hooks-done/pre_restart-0").exists());
}

#[tokio::test]
async fn the_build_hook_runs_after_the_configured_ones_and_may_be_absent() {
    let f = Fixture::new();
    let hooks_dir = f.release.join("sluice/hooks");
    std::fs::create_dir_all(&hooks_dir).unwrap();
    let build_hook = hooks_dir.join("post_install");
    let write_build_hook = |marker: &str| {
        let script = format!("#!/bin/sh\necho \"{marker} $PWD $SLUICE_STAGE\" >> build-hook.out\n");
        std::fs::write(&build_hook, script).unwrap();
        std::fs::set_permissions(&build_hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_build_hook("v1");

    let hooks = f.configured(Stage::PostInstall, &[&["/bin/true"]]);
    let names: Vec<&str> = hooks.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "post_install[0] /bin/true",
            "build:sluice/hooks/post_install"
        ]
    );
    let outcomes = f.stage(Stage::PostInstall, &hooks).await.unwrap();
    assert_eq!(outcomes.len(), 2);
    let out = f.release.join("build-hook.out");
    let expected = format!("v1 {} post_install\n", f.release.display());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), expected);

    // Its marker covers its content: a changed hook file runs again.
    assert!(f.stage(Stage::PostInstall, &hooks).await.unwrap()[1].skipped);
    write_build_hook("v2");
    assert!(!f.stage(Stage::PostInstall, &hooks).await.unwrap()[1].skipped);
    let expected = format!("{expected}v2 {} post_install\n", f.release.display());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), expected);

    // No build hook for this stage, and no release at all before the download.
    assert_eq!(f.configured(Stage::PreRestart, &[]), []);
    assert_eq!(f.configured(Stage::PreDownload, &[]), []);
}

/// A python that can create a venv, or `None` after saying why not.
fn python_with_venv(scratch: &Path) -> Option<&'static str> {
    // The system python: its venv bundles pip and setuptools, and it usually has `wheel` too.
    let python = "/usr/bin/python3";
    let probe = Command::new(python)
        .args(["-m", "venv"])
        .arg(scratch.join("probe-venv"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output();
    match probe {
        Ok(out) if out.status.success() => Some(python),
        Ok(out) => {
            skip(&format!(
                "{python} -m venv failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            None
        }
        Err(e) => {
            skip(&format!("{python}: {e}"));
            None
        }
    }
}

/// Builds the wheel of a one-module package `thepkg` into `wheels`, without network: with
/// `pip wheel`, or, when that python lacks the `wheel` package, by writing the zip by hand.
fn build_wheel(python: &str, scratch: &Path, wheels: &Path) {
    let pkg = scratch.join("pkg");
    std::fs::create_dir_all(pkg.join("thepkg")).unwrap();
    std::fs::write(pkg.join("thepkg/__init__.py"), "VALUE = 42\n").unwrap();
    std::fs::write(
        pkg.join("pyproject.toml"),
        "[build-system]\nrequires = [\"setuptools\"]\nbuild-backend = \"setuptools.build_meta\"\n\n\
         [project]\nname = \"thepkg\"\nversion = \"0.1\"\n",
    )
    .unwrap();
    let built = Command::new(python)
        .args([
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
        ])
        .arg(wheels)
        .arg(&pkg)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", scratch)
        .output()
        .unwrap();
    if built.status.success() {
        return;
    }
    println!(
        "pip wheel failed, writing the wheel by hand: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let by_hand = r#"
import base64, hashlib, os, sys, zipfile
files = {
    "thepkg/__init__.py": "VALUE = 42\n",
    "thepkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: thepkg\nVersion: 0.1\n",
    "thepkg-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: sluice-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(os.path.join(sys.argv[1], "thepkg-0.1-py3-none-any.whl"), "w") as z:
    for name, text in files.items():
        data = text.encode()
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("thepkg-0.1.dist-info/RECORD,,")
    z.writestr("thepkg-0.1.dist-info/RECORD", "\n".join(record) + "\n")
"#;
    let status = Command::new(python)
        .args(["-c", by_hand])
        .arg(wheels)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn stock_python_venv_installs_requirements_offline_and_then_has_nothing_to_do() {
    let mut f = Fixture::new();
    let scratch = f.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let Some(python) = python_with_venv(&scratch) else {
        return;
    };
    let wheels = f.dir.path().join("wheels");
    build_wheel(python, &scratch, &wheels);
    std::fs::write(f.release.join("requirements.txt"), "thepkg==0.1\n").unwrap();
    f.env = BTreeMap::from([
        ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
        ("SLUICE_PYTHON".to_owned(), python.to_owned()),
        (
            "SLUICE_WHEEL_DIR".to_owned(),
            wheels.to_str().unwrap().to_owned(),
        ),
    ]);

    let hooks = f.configured(Stage::PostInstall, &[&["stock:python-venv"]]);
    assert_eq!(hooks[0].name, "post_install[0] stock:python-venv");
    let first = f.stage(Stage::PostInstall, &hooks).await.unwrap();
    assert!(!first[0].skipped);
    let import = Command::new(f.release.join(".venv/bin/python"))
        .args(["-c", "import thepkg; assert thepkg.VALUE == 42"])
        .status()
        .unwrap();
    assert!(import.success(), "thepkg is importable from the venv");

    // The same release again: the runner's marker skips the hook.
    assert!(f.stage(Stage::PostInstall, &hooks).await.unwrap()[0].skipped);

    // Without the runner's marker, the hook's own marker makes it a no-op.
    std::fs::remove_dir_all(f.release.join(".sluice")).unwrap();
    let again = f.stage(Stage::PostInstall, &hooks).await.unwrap();
    assert!(!again[0].skipped);
    assert!(again[0].duration_ms < 2_000, "{again:?}");
    assert!(f.log(Stage::PostInstall, 0).contains("is up to date"));
}

#[tokio::test]
async fn stock_python_venv_fails_clearly_offline_without_the_wheel() {
    let mut f = Fixture::new();
    let scratch = f.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let Some(python) = python_with_venv(&scratch) else {
        return;
    };
    std::fs::write(
        f.release.join("requirements.txt"),
        "not-a-real-package==1\n",
    )
    .unwrap();
    f.env = BTreeMap::from([
        ("SLUICE_PYTHON".to_owned(), python.to_owned()),
        (
            "SLUICE_WHEEL_DIR".to_owned(),
            scratch.to_str().unwrap().to_owned(),
        ),
    ]);
    let hooks = f.configured(Stage::PostInstall, &[&["stock:python-venv"]]);
    let err = f.stage(Stage::PostInstall, &hooks).await.unwrap_err();
    let tail = err.output_tail().unwrap();
    assert!(tail.contains("python-venv: pip install -r"), "{tail}");
    assert!(!f.release.join(".venv/.sluice-requirements.sha256").exists());
}

#[tokio::test]
async fn stock_java_jar_finds_the_jar_or_names_what_is_missing() {
    let mut f = Fixture::new();
    let hooks = f.configured(Stage::PostInstall, &[&["stock:java-jar"]]);

    let err = f.stage(Stage::PostInstall, &hooks).await.unwrap_err();
    assert!(matches!(err, HookError::Failed { .. }), "{err:?}");
    let tail = err.output_tail().unwrap();
    assert!(tail.contains("no *.jar file at the top level of"), "{tail}");

    std::fs::write(f.release.join("app.jar"), b"PK\x03\x04").unwrap();
    f.stage(Stage::PostInstall, &hooks).await.unwrap();
    let expected = format!("{}/app.jar\n", f.release.display());
    assert_eq!(f.log(Stage::PostInstall, 0), expected);

    std::fs::write(f.release.join("other.jar"), b"PK\x03\x04").unwrap();
    std::fs::remove_dir_all(f.release.join(".sluice")).unwrap();
    let err = f.stage(Stage::PostInstall, &hooks).await.unwrap_err();
    assert!(
        err.output_tail().unwrap().contains("2 *.jar files"),
        "{err:?}"
    );

    f.env
        .insert("SLUICE_JAR".to_owned(), "lib/service.jar".to_owned());
    let err = f.stage(Stage::PostInstall, &hooks).await.unwrap_err();
    let tail = err.output_tail().unwrap();
    assert!(
        tail.contains("SLUICE_JAR=lib/service.jar") && tail.contains("missing"),
        "{tail}"
    );

    let names: BTreeSet<_> = sluice_hooks::STOCK_HOOKS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, BTreeSet::from(["java-jar", "python-venv"]));
}
