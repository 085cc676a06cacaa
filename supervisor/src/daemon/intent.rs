//! The persisted shutdown intent, `data_dir/shutdown-intent.json`: written (through the state
//! files' atomic write: temp file, fsync, rename, fsync dir) before a host shutdown stops
//! anything, removed once every instance has stopped and just before the daemon exits. A daemon
//! that starts and finds it finishes that shutdown — it stops what still runs, starts nothing —
//! instead of bringing every instance back.
//!
//! The intent names the boot it was written in (`/proc/sys/kernel/random/boot_id`): an intent
//! left by a host that went down mid-shutdown belongs to an earlier boot, so the next boot
//! starts ordinarily instead of finishing a shutdown that the reboot already finished.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The intent's file name in `data_dir`, beside the services' directories `data_dir/<service>`;
/// a service name has no `.`, so none can be called this.
pub const INTENT_FILE: &str = "shutdown-intent.json";
/// Where the kernel names the current boot.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// Largest intent file read, bytes (it holds two short fields).
const INTENT_MAX_BYTES: u64 = 4_096;

/// What is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The boot the shutdown was asked in.
    pub boot_id: String,
    /// When, milliseconds since the Unix epoch (wall time, for display).
    pub requested_ms: u64,
}

/// The intent file of a host.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(INTENT_FILE)
}

/// The id of the running boot; empty where the kernel does not say.
pub fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID_PATH)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Writes the intent durably; the shutdown begins only once this returned `Ok`.
pub fn write(path: &Path, intent: &Intent) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(intent).expect("the intent serializes");
    crate::service::state::write_atomically(path, &bytes)
        .map_err(|e| format!("cannot write the shutdown intent {}: {e}", path.display()))
}

/// What start-up found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// No intent: an ordinary start.
    None,
    /// A shutdown of this boot that an earlier daemon did not finish.
    Pending(Intent),
    /// An intent of an earlier boot (or one that cannot be read), set aside under `aside`: the
    /// start is ordinary.
    Stale { why: String, aside: PathBuf },
}

/// Reads the intent at start-up. Only an intent of the running boot is pending; anything else is
/// renamed to `<file>.stale` (kept for a post-mortem, never read again) and reported.
pub fn read(path: &Path, boot_id: &str) -> Found {
    use std::io::Read as _;
    let mut text = String::new();
    let read = std::fs::File::open(path)
        .and_then(|f| f.take(INTENT_MAX_BYTES).read_to_string(&mut text).map(drop));
    let why = match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Found::None,
        Err(e) => format!("cannot be read: {e}"),
        Ok(()) => match serde_json::from_str::<Intent>(&text) {
            Ok(intent) if !boot_id.is_empty() && intent.boot_id == boot_id => {
                return Found::Pending(intent);
            }
            Ok(intent) => format!(
                "it was written in boot {}, this is boot {}",
                crate::clip::clip(&intent.boot_id),
                if boot_id.is_empty() {
                    "unknown"
                } else {
                    boot_id
                }
            ),
            Err(e) => format!("it is not a shutdown intent: {e}"),
        },
    };
    let aside = path.with_extension("json.stale");
    if let Err(e) = std::fs::rename(path, &aside) {
        // It could not be set aside: removing it is the only way not to read it again.
        tracing::warn!(path = %path.display(), "setting the stale intent aside: {e}");
        let _ = std::fs::remove_file(path);
    }
    Found::Stale { why, aside }
}

/// Removes the intent once the shutdown is complete, durably (the directory is synced), so that
/// the next start is ordinary.
pub fn clear(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("syncing {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_intent_of_this_boot_is_pending_and_others_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert_eq!(read(&p, "b1"), Found::None);
        let intent = Intent {
            boot_id: "b1".into(),
            requested_ms: 7,
        };
        write(&p, &intent).unwrap();
        assert_eq!(read(&p, "b1"), Found::Pending(intent.clone()));
        // Read again: a pending intent stays until cleared.
        assert_eq!(read(&p, "b1"), Found::Pending(intent));
        match read(&p, "b2") {
            Found::Stale { why, aside } => {
                assert!(why.contains("boot b1, this is boot b2"), "{why}");
                assert!(aside.exists(), "set aside");
            }
            other => panic!("{other:?}"),
        }
        assert!(!p.exists(), "a stale intent is not read again");
        std::fs::write(&p, b"{\"boot").unwrap();
        assert!(
            matches!(read(&p, "b1"), Found::Stale { why, .. } if why.contains("not a shutdown intent"))
        );
        write(
            &p,
            &Intent {
                boot_id: "b1".into(),
                requested_ms: 1,
            },
        )
        .unwrap();
        clear(&p).unwrap();
        assert_eq!(read(&p, "b1"), Found::None);
        clear(&p).unwrap();
    }
}
