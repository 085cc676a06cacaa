//! ZooKeeper's authority is what the host file grants (issue 8): a config node may set only the
//! keys `coordination.config_node_keys` grants; with a digest, nodes anyone may write are
//! reported; a digest file others may read stops `sluice run` with exit code 3.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use sluice_tests::fleet::{Fleet, FleetOptions};
use sluice_tests::{Host, PATIENCE};

/// Against the real ZooKeeper of the tests: refused nodes change nothing (same pids) and name
/// the key; a node that changes `instances` and a timing is applied; a node the world may write
/// is listed in status.
#[test]
fn config_nodes_set_only_granted_keys_and_open_nodes_are_reported() {
    let Some(fleet) = Fleet::new(FleetOptions {
        hosts: 1,
        zookeepers: 1,
    }) else {
        return;
    };
    let h = fleet.host(0);
    let zk = fleet.zk();
    // zkCli creates nodes with `world:anyone:cdrwa`: these are open to anyone who reaches ZooKeeper.
    for node in [
        "/sluice",
        "/sluice/services",
        "/sluice/services/web",
        "/sluice/services/web/roles",
    ] {
        let out = zk.cli(&["create", node]);
        assert!(
            out.code == Some(0)
                || out.stderr.contains("already exists")
                || out.stdout.contains("already exists"),
            "{out}"
        );
    }
    let digest = h.path("digest");
    std::fs::write(&digest, "sluice:secret\n").unwrap();
    std::fs::set_permissions(&digest, std::fs::Permissions::from_mode(0o600)).unwrap();
    let host_file = std::fs::read_to_string(h.host_file()).unwrap();
    assert!(
        host_file.trim_end().contains("[coordination]"),
        "{host_file}"
    );
    h.write_host_file(&format!("{host_file}digest_file = \"digest\"\n"));
    h.service(
        "web",
        "command = [\"/bin/sleep\", \"1000\"]\ninstances = 2\nuser = \"nobody\"\n",
    );
    h.start_daemon();
    let s = h.wait_until(
        |s| {
            s.running("web") == 2
                && s.service("web")["world_writable_nodes"]
                    .as_array()
                    .is_some_and(|n| {
                        n.iter().any(|n| {
                            n.as_str()
                                .is_some_and(|n| n.starts_with("/services/web/roles "))
                        })
                    })
        },
        PATIENCE * 2,
    );
    println!("open nodes: {}", s.service("web")["world_writable_nodes"]);
    assert!(
        !h.daemon_log_tail()
            .contains("writable by anyone who reaches zookeeper"),
        "with a digest there is no warning about an open fleet"
    );
    let pids = s.pids("web");

    // `push-config` refuses what the hosts would refuse, before it writes anything.
    let file = h.path("bad.json");
    std::fs::write(&file, r#"{"command": ["/bin/sh", "-c", "id"]}"#).unwrap();
    let out = fleet.sluice(&["push-config", "web", &file.to_string_lossy()]);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("key `command`"), "{out}");

    let node = "/sluice/services/web/config";
    let mut created = false;
    let mut put = |json: &str| {
        let verb = if created { "set" } else { "create" };
        zk.cli(&[verb, node, json]).success();
        created = true;
    };
    for (json, key) in [
        (
            r#"{"command":["/bin/sh","-c","id>/tmp/sluice-pwned"]}"#,
            "command",
        ),
        (r#"{"instances":3,"user":"root"}"#, "user"),
        (
            r#"{"hooks":{"pre_restart":[["/bin/sh","-c","id"]]}}"#,
            "hooks",
        ),
        (
            r#"{"health":{"exec":["/bin/sh","-c","id"]}}"#,
            "health.exec",
        ),
    ] {
        put(json);
        let want = format!("key `{key}` may not be set by a config node");
        let s = h.wait_until(
            |s| {
                s.service("web")["config_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(&want))
            },
            PATIENCE,
        );
        println!("{key}: {}", s.service("web")["config_error"]);
        // Nothing changed, a moment later too.
        std::thread::sleep(Duration::from_millis(500));
        let s = h.status();
        assert_eq!(s.pids("web"), pids, "{json} changed the instances: {s}");
        assert_eq!(s.running("web"), 2, "{s}");
    }

    put(r#"{"instances":3,"stop_grace_ms":2500,"restart":{"drain_timeout_ms":1500}}"#);
    let s = h.wait_until(
        |s| s.running("web") == 3 && s.service("web")["config_error"].is_null(),
        PATIENCE,
    );
    assert_eq!(
        &s.pids("web")[..2],
        &pids[..],
        "the first two instances were left alone"
    );

    // Deleting the node goes back to the local file.
    zk.cli(&["delete", node]).success();
    h.wait_until(
        |s| s.running("web") == 2 && s.instances("web").len() == 2,
        PATIENCE,
    );
}

/// A digest file that others may read is refused at start-up with exit code 3; without a digest
/// file the daemon says once, loudly, that the fleet's nodes are open.
#[test]
fn a_digest_file_others_may_read_stops_sluice_run() {
    let h = Host::new();
    let digest = h.path("digest");
    std::fs::write(&digest, "sluice:secret\n").unwrap();
    std::fs::set_permissions(&digest, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Nothing listens on port 9: the daemon never gets as far as connecting.
    let zk_section = "[coordination]\nbackend = \"zookeeper\"\nconnect = \"127.0.0.1:9/sluice\"\nhost = \"h1\"\n";
    let base = "data_dir = \"data\"\nruntime_dir = \"run\"\nservices_dir = \"services\"\nallow_root = true\n";
    h.write_host_file(&format!("{base}{zk_section}digest_file = \"digest\"\n"));
    h.service("web", "command = [\"/bin/sleep\", \"1000\"]\n");
    let out = h.sluice(&["run"]).code(3);
    assert!(
        out.stderr
            .contains(&format!("the digest file {}", digest.display()))
            && out.stderr.contains("mode 0644"),
        "{out}"
    );

    h.write_host_file(&format!("{base}{zk_section}"));
    h.start_daemon();
    let log = h.daemon_log_tail();
    assert_eq!(
        log.matches("writable by anyone who reaches zookeeper")
            .count(),
        1,
        "{log}"
    );
}
