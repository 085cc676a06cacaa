//! `sluice watch` in a real terminal (tmux): the fleet view of the 3-host fleet follows a deploy
//! live, expands a host, filters, and quits with the terminal restored; the local backend shows
//! this host's services.

use std::time::Duration;

use sluice_tests::fleet::{FleetOptions, light_service, py_fleet_serving};
use sluice_tests::tmux::{Tmux, cell};
use sluice_tests::{Host, PATIENCE};

/// How long a deploy across three hosts may take on a loaded 2-core machine (fetch, venv + pip
/// on every host, drain restarts).
const DEPLOY_PATIENCE: Duration = Duration::from_secs(180);
const SVC: &str = "py";
/// The marker the shell prints after `sluice watch` returns, with its exit code.
const EXITED: &str = "WATCH-EXITED";

/// A shell command line for tmux: `inner` (already quoted for `sh`), then the marker, then a
/// bounded wait so the pane (and what the terminal shows after the exit) stays to be read.
fn then_mark(inner: &str) -> String {
    format!("sh -c '{inner}; echo {EXITED} $?; sleep 600'")
}

fn the_view_is_gone_and_the_terminal_restored(tmux: &Tmux, header: &str) {
    let screen = tmux.wait_screen("the exit marker with status 0", PATIENCE, |s| {
        s.contains(&format!("{EXITED} 0"))
    });
    assert!(
        !screen.contains(header),
        "the full-screen view is still shown after the exit:\n{screen}"
    );
    assert_eq!(
        tmux.pane_format("#{alternate_on}"),
        "0",
        "still on the alternate screen"
    );
    assert_eq!(
        tmux.pane_format("#{cursor_flag}"),
        "1",
        "the cursor is still hidden"
    );
    // Raw mode off: the line discipline echoes and takes lines again.
    let stty = tmux.pane_format("#{pane_tty}");
    let out = std::process::Command::new("stty")
        .args(["-F", &stty, "-a"])
        .output()
        .expect("stty runs");
    let modes = String::from_utf8_lossy(&out.stdout);
    assert!(
        modes.split_whitespace().any(|m| m == "icanon")
            && modes.split_whitespace().any(|m| m == "echo"),
        "the pane's terminal is still raw: {modes}"
    );
}

#[test]
fn fleet_watch_follows_a_deploy_expands_filters_and_quits_restored() {
    let Some((fleet, builds)) = py_fleet_serving(
        FleetOptions {
            hosts: 3,
            zookeepers: 1,
        },
        SVC,
        &["w1", "w2"],
        DEPLOY_PATIENCE,
    ) else {
        return;
    };
    let h1 = fleet.host(0);
    let watch = format!(
        "ip netns exec {} {} --config {} watch {SVC}",
        h1.netns,
        h1.sluice_bin().display(),
        h1.host_file().display()
    );
    let Some(tmux) = Tmux::start(100, 30, &then_mark(&watch)) else {
        return;
    };
    let names: Vec<String> = fleet.hosts.iter().map(|h| h.name.clone()).collect();
    let (old, new) = (&builds[0].id, &builds[1].id);
    let screen = tmux.wait_screen("every host on the first build", PATIENCE, |s| {
        names.iter().all(|n| {
            cell(s, "BUILD", n) == Some(old.as_str()) && cell(s, "STATE", n) == Some("serving")
        })
    });
    assert!(
        screen.contains(&format!("{SVC}  enabled {old}")) && screen.contains("filter: all"),
        "{screen}"
    );
    assert!(
        screen.contains("3 host(s)") && screen.contains("q quit"),
        "{screen}"
    );

    // A deploy, followed live by the same view: every host's line goes from the old build to the
    // new, through a state other than serving.
    fleet.sluice(&["deploy", SVC, new]).success();
    let mut busy_seen = Vec::new();
    let screen = tmux.wait_screen("every host on the second build", DEPLOY_PATIENCE, |s| {
        for n in &names {
            if let Some(state) = cell(s, "STATE", n)
                && state != "serving"
                && !busy_seen.contains(&format!("{n} {state}"))
            {
                busy_seen.push(format!("{n} {state}"));
            }
        }
        names.iter().all(|n| {
            cell(s, "BUILD", n) == Some(new.as_str()) && cell(s, "STATE", n) == Some("serving")
        })
    });
    println!("states seen during the deploy: {busy_seen:?}");
    assert!(
        !busy_seen.is_empty(),
        "the view never showed a host in the middle of the deploy:\n{screen}"
    );
    assert!(screen.contains(&format!("enabled {new}")), "{screen}");

    // Enter expands the selected host (the first) into its instances; Esc collapses.
    tmux.send_keys(&["Enter"]);
    tmux.wait_screen("h1's instances", PATIENCE, |s| {
        s.contains("INST") && s.contains("#0") && s.contains("#1")
    });
    tmux.send_keys(&["Escape"]);
    tmux.wait_screen("the instances folded away", PATIENCE, |s| !s.contains("#0"));
    // Down then Enter expands the second host.
    tmux.send_keys(&["j", "Enter"]);
    let screen = tmux.wait_screen("h2's instances", PATIENCE, |s| s.contains("#0"));
    let lines: Vec<&str> = screen.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("> h2"))
        .expect("h2 selected");
    assert!(lines[at + 1].contains("INST"), "{screen}");
    tmux.send_keys(&["Enter"]);

    // `f` filters: nothing has failed, so no row; three more presses reach `serving`, all rows.
    tmux.send_keys(&["f"]);
    let screen = tmux.wait_screen("the failed filter", PATIENCE, |s| {
        s.contains("filter: failed")
    });
    assert!(screen.contains("no row matches"), "{screen}");
    assert!(
        names.iter().all(|n| cell(&screen, "BUILD", n).is_none()),
        "{screen}"
    );
    tmux.send_keys(&["f", "f", "f"]);
    let screen = tmux.wait_screen("the serving filter", PATIENCE, |s| {
        s.contains("filter: serving")
    });
    assert!(
        names
            .iter()
            .all(|n| cell(&screen, "BUILD", n) == Some(new.as_str())),
        "{screen}"
    );

    tmux.send_keys(&["q"]);
    the_view_is_gone_and_the_terminal_restored(&tmux, "filter:");
}

#[test]
fn local_watch_shows_this_hosts_services_and_quits_restored() {
    if !sluice_tests::require_root() {
        return;
    }
    let h = Host::new();
    // Not build-deployed: the light service's command, without `[build]` (no release to wait for).
    let toml: String = light_service("files")
        .lines()
        .take_while(|l| !l.starts_with("[build]"))
        .map(|l| l.replace("{release_dir}", "/tmp") + "\n")
        .collect();
    h.service("files", &toml);
    h.start_daemon();
    h.wait_until(|s| s.running("files") == 1, PATIENCE);
    let watch = format!(
        "{} --config {} watch",
        h.sluice_bin().display(),
        h.host_file().display()
    );
    let Some(tmux) = Tmux::start(80, 24, &then_mark(&watch)) else {
        return;
    };
    let screen = tmux.wait_screen("the service serving", PATIENCE, |s| {
        cell(s, "STATE", "files") == Some("serving")
    });
    assert!(screen.contains("this host: every service"), "{screen}");
    assert_eq!(cell(&screen, "UP", "files"), Some("1/1"), "{screen}");
    tmux.send_keys(&["Enter"]);
    tmux.wait_screen("its instance", PATIENCE, |s| {
        s.contains("#0") && s.contains("running")
    });
    // A resize redraws at the new size: the help line moves to the new last line.
    tmux.run(&["resize-window", "-t", "0", "-x", "100", "-y", "30"])
        .success();
    tmux.wait_screen("the help on line 30 after a resize", PATIENCE, |s| {
        s.lines().nth(29).is_some_and(|l| l.contains("q quit"))
            && s.lines().nth(23).is_some_and(|l| !l.contains("q quit"))
    });
    // A daemon that stops answering is an error line, and the view keeps trying until it answers
    // again (the instances live on in their shims).
    h.kill9_daemon();
    tmux.wait_screen("an error line", PATIENCE, |s| {
        s.lines().any(|l| l.starts_with("error: "))
    });
    h.start_daemon();
    tmux.wait_screen("the error line gone", PATIENCE, |s| {
        !s.contains("error: ") && cell(s, "STATE", "files") == Some("serving")
    });
    // Ctrl-C quits like `q` (raw mode: a key, not a signal).
    tmux.send_keys(&["C-c"]);
    the_view_is_gone_and_the_terminal_restored(&tmux, "filter:");
    // `--once` needs no terminal and prints the same row.
    let out = h.sluice(&["watch", "--once"]).success();
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("files") && l.contains("serving")),
        "{out}"
    );
    // Without --once and off a terminal, a clear refusal.
    let out = h.sluice(&["watch"]).code(1);
    assert!(out.stderr.contains("--once"), "{out}");
}
