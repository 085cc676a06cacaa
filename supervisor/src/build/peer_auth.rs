//! Peer requests signed with a key every host of the fleet shares (`peers.secret_file`), so that
//! only the fleet's own hosts can download its builds from a peer port.
//!
//! A request carries `Authorization: Sluice-Peer <unix seconds>.<hex HMAC-SHA256>`, the HMAC
//! keyed by the shared key over a fixed label, the request's path and those seconds. A server
//! with a key answers 401 to a request without a valid one, and to one whose time is more than
//! [`MAX_SKEW_S`] from its own clock, before it looks at the path: an outsider learns nothing of
//! what the host serves. The signature authenticates the asker; it does not hide the bytes (plain
//! HTTP), and a request seen on the wire can be replayed within the skew for the same build,
//! whose bytes that observer saw already. Integrity does not rest on it: every byte is checked
//! against the registered sha256 whoever served it.

use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use hmac::{KeyInit as _, Mac as _};

/// The scheme of the `Authorization` header.
const SCHEME: &str = "Sluice-Peer";
/// What the HMAC covers before the path: names the protocol and its version.
const LABEL: &[u8] = b"sluice-peer-v1\n";
/// Largest difference between the asker's clock and the server's accepted, in seconds.
pub const MAX_SKEW_S: u64 = 300;
/// Shortest key accepted, in bytes: 256 bits.
pub const KEY_MIN_BYTES: usize = 32;
/// Largest key file read, in bytes.
const KEY_MAX_BYTES: u64 = 4096;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The fleet's shared key.
pub struct PeerKey(Vec<u8>);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

impl PeerKey {
    /// Reads the key from `path`: a regular file (not a link) owned by this process's user and
    /// readable by it alone, whose content, without surrounding whitespace, is at least
    /// [`KEY_MIN_BYTES`] bytes (e.g. `openssl rand -hex 32`).
    pub fn load(path: &Path) -> Result<PeerKey, String> {
        let named = |what: String| format!("peers.secret_file {}: {what}", path.display());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| named(e.to_string()))?;
        let meta = file.metadata().map_err(|e| named(e.to_string()))?;
        if !meta.file_type().is_file() {
            return Err(named("not a regular file".into()));
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != euid {
            return Err(named(format!(
                "owned by uid {}, not by the daemon's user (uid {euid})",
                meta.uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(named(format!(
                "mode {:04o}: group and others must have no access (chmod 600)",
                meta.mode() & 0o7777
            )));
        }
        let mut bytes = Vec::new();
        file.take(KEY_MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| named(e.to_string()))?;
        if bytes.len() as u64 > KEY_MAX_BYTES {
            return Err(named(format!("longer than {KEY_MAX_BYTES} bytes")));
        }
        PeerKey::from_bytes(bytes.trim_ascii()).map_err(named)
    }

    /// A key of `bytes`, at least [`KEY_MIN_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Result<PeerKey, String> {
        if bytes.len() < KEY_MIN_BYTES {
            return Err(format!(
                "{} bytes: a key has at least {KEY_MIN_BYTES}",
                bytes.len()
            ));
        }
        Ok(PeerKey(bytes.to_vec()))
    }

    fn mac(&self, path: &str, seconds: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(LABEL);
        mac.update(path.as_bytes());
        mac.update(b"\n");
        mac.update(seconds.to_string().as_bytes());
        mac
    }

    /// The `Authorization` value of a request for `path` sent at `seconds` (Unix time).
    pub fn authorization(&self, path: &str, seconds: u64) -> String {
        let tag = self.mac(path, seconds).finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        format!("{SCHEME} {seconds}.{hex}")
    }

    /// Checks a request's `Authorization` value for `path` at the server's time `now`; `Err`
    /// says what was wrong (for the server's log, never sent back).
    pub fn verify(&self, path: &str, header: Option<&[u8]>, now: u64) -> Result<(), &'static str> {
        let header = header.ok_or("no Authorization header")?;
        let header = std::str::from_utf8(header).map_err(|_| "a header that is not text")?;
        let rest = header
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or("not the Sluice-Peer scheme")?;
        let (seconds, hex) = rest.split_once('.').ok_or("no signature")?;
        let seconds: u64 = seconds.parse().map_err(|_| "a time that is not a number")?;
        if seconds.abs_diff(now) > MAX_SKEW_S {
            return Err("a time more than 300 s from this host's clock");
        }
        let tag = decode_hex(hex).ok_or("a signature that is not 64 hex digits")?;
        self.mac(path, seconds)
            .verify_slice(&tag)
            .map_err(|_| "a signature made with another key")
    }
}

fn decode_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// Unix time in seconds.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn key(fill: u8) -> PeerKey {
        PeerKey::from_bytes(&[fill; 32]).unwrap()
    }

    #[test]
    fn a_signature_verifies_for_its_path_and_key_only_and_within_the_skew() {
        let path = "/v1/builds/web/b1";
        let header = key(1).authorization(path, 1_000_000);
        let check = |k: &PeerKey, p: &str, h: &str, now: u64| k.verify(p, Some(h.as_bytes()), now);
        assert_eq!(check(&key(1), path, &header, 1_000_000), Ok(()));
        assert_eq!(check(&key(1), path, &header, 1_000_300), Ok(()));
        assert_eq!(check(&key(1), path, &header, 999_700), Ok(()));
        assert!(check(&key(1), path, &header, 1_000_301).is_err());
        assert!(check(&key(1), path, &header, 999_699).is_err());
        assert_eq!(
            check(&key(2), path, &header, 1_000_000),
            Err("a signature made with another key")
        );
        assert!(check(&key(1), "/v1/builds/web/b2", &header, 1_000_000).is_err());
        // The time is covered too: moving it forward breaks the signature.
        let moved = header.replace("1000000.", "1000001.");
        assert!(check(&key(1), path, &moved, 1_000_000).is_err());
        for bad in [
            "",
            "Sluice-Peer",
            "Basic abc",
            "Sluice-Peer 1000000",
            "Sluice-Peer x.00",
            "Sluice-Peer 1000000.zz",
            &header[..header.len() - 2],
        ] {
            assert!(check(&key(1), path, bad, 1_000_000).is_err(), "{bad:?}");
        }
        assert_eq!(
            key(1).verify(path, None, 1_000_000),
            Err("no Authorization header")
        );
        assert!(key(1).verify(path, Some(&[0xff, 0xfe]), 1_000_000).is_err());
    }

    #[test]
    fn a_key_file_must_be_private_long_enough_and_not_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("peer.key");
        let write = |text: &str, mode: u32| {
            std::fs::write(&file, text).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write(&format!("{}\n", "ab".repeat(32)), 0o600);
        let loaded = PeerKey::load(&file).unwrap();
        // Surrounding whitespace is not part of the key.
        let header = loaded.authorization("/p", 7);
        assert_eq!(
            PeerKey::from_bytes("ab".repeat(32).as_bytes())
                .unwrap()
                .verify("/p", Some(header.as_bytes()), 7),
            Ok(())
        );
        write(&"ab".repeat(32), 0o640);
        let e = PeerKey::load(&file).unwrap_err();
        assert!(e.contains("mode 0640") && e.contains("peer.key"), "{e}");
        write("short\n", 0o600);
        let e = PeerKey::load(&file).unwrap_err();
        assert!(e.contains("5 bytes"), "{e}");
        let link = tmp.path().join("link.key");
        write(&"ab".repeat(32), 0o600);
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(PeerKey::load(&link).is_err());
        let e = PeerKey::load(tmp.path()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        write(&"x".repeat(5000), 0o600);
        assert!(
            PeerKey::load(&file)
                .unwrap_err()
                .contains("longer than 4096")
        );
    }
}
