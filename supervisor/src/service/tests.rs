//! Unit tests of the service core: the invariants as tables, driven with plain times.

use std::os::unix::fs::PermissionsExt;

use super::make_log_dir;

/// A link that a less-trusted user planted on the way to a log directory is not followed:
/// nothing is made where it points (issue 8).
#[test]
fn a_log_dir_is_never_made_through_a_planted_link() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("root-only");
    std::fs::create_dir(&target).unwrap();
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    // Writable by anyone: the user who owns it could have planted the link.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::symlink(&target, shared.join("app")).unwrap();
    let err = make_log_dir(&shared.join("app/logs")).unwrap_err();
    assert!(sluice_safefs::is_refused(&err), "{err}");
    assert!(!target.join("logs").exists(), "made through the link");
    make_log_dir(&shared.join("web/logs")).unwrap();
    assert!(shared.join("web/logs").is_dir());
    make_log_dir(&shared.join("web/logs")).unwrap();
}
