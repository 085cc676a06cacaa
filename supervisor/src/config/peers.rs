//! The host file's `[peers]` table and `rack`: whether this host serves builds to other hosts and
//! fetches them from them (`crate::build::peer` does both), and the bounds of that.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::clip::clip;

/// Default port of the peer server.
pub const DEFAULT_PEER_PORT: u16 = 7480;
/// Default for [`PeerConfig::max_uploads`]. Transfers are cut-through, so every host below the
/// store fetcher receives at about `upload_bytes_per_s / max_uploads`, and the fleet holds a build
/// after about `max_uploads` times one transfer at that rate: 2 (a tree that still doubles at each
/// level) measured 2.33× one host's store fetch at 24 hosts, 4 measured 3.64× (BENCHMARKS.md).
pub const DEFAULT_MAX_UPLOADS: usize = 2;
/// Default for [`PeerConfig::upload_bytes_per_s`]: 62.5 MB/s, half of a 1 Gbit/s link.
pub const DEFAULT_UPLOAD_BYTES_PER_S: u64 = 62_500_000;
/// Default for [`PeerConfig::stall_ms`].
pub const DEFAULT_PEER_STALL_MS: u64 = 5_000;
/// Default for [`PeerConfig::connect_timeout_ms`].
pub const DEFAULT_PEER_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Default for [`PeerConfig::max_attempts`].
pub const DEFAULT_PEER_ATTEMPTS: u32 = 8;
/// Default for [`PeerConfig::rack_wait_ms`].
pub const DEFAULT_RACK_WAIT_MS: u64 = 30_000;
/// The rack of a host whose host file names none.
pub const DEFAULT_RACK: &str = "default";

/// The host file's `[peers]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Whether this host serves builds to peers and fetches them from peers (ZooKeeper only).
    #[serde(default)]
    pub enabled: bool,
    /// `ip:port` the peer server listens on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `ip:port` other hosts reach the peer server at; `listen` when absent (then `listen`
    /// must name an address, not `0.0.0.0`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Uploads served at once; a further request is answered 503 and the asker goes elsewhere.
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
    /// Bytes per second all uploads together may send.
    #[serde(default = "default_upload_bytes_per_s")]
    pub upload_bytes_per_s: u64,
    /// A peer that sends nothing for this long is dropped for this attempt (and an upload whose
    /// receiver acknowledges nothing for this long is cut), in ms.
    #[serde(default = "default_stall_ms")]
    pub stall_ms: u64,
    /// Connecting to a peer, in ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Failed peer transfers one install tries before it fetches from the store itself.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// How long a host waits for its rack's fetcher (and a rack's fetcher for the fleet's
    /// store fetcher) to offer the build before it fetches from the store itself, in ms.
    #[serde(default = "default_rack_wait_ms")]
    pub rack_wait_ms: u64,
    /// A file holding the key all hosts of the fleet share: with it, this host signs its peer
    /// requests and serves only signed ones (`build::peer_auth`).
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
}

fn default_listen() -> String {
    format!("0.0.0.0:{DEFAULT_PEER_PORT}")
}
fn default_max_uploads() -> usize {
    DEFAULT_MAX_UPLOADS
}
fn default_upload_bytes_per_s() -> u64 {
    DEFAULT_UPLOAD_BYTES_PER_S
}
fn default_stall_ms() -> u64 {
    DEFAULT_PEER_STALL_MS
}
fn default_connect_timeout_ms() -> u64 {
    DEFAULT_PEER_CONNECT_TIMEOUT_MS
}
fn default_attempts() -> u32 {
    DEFAULT_PEER_ATTEMPTS
}
fn default_rack_wait_ms() -> u64 {
    DEFAULT_RACK_WAIT_MS
}

impl Default for PeerConfig {
    fn default() -> PeerConfig {
        PeerConfig {
            enabled: false,
            listen: default_listen(),
            advertise: None,
            max_uploads: DEFAULT_MAX_UPLOADS,
            upload_bytes_per_s: DEFAULT_UPLOAD_BYTES_PER_S,
            stall_ms: DEFAULT_PEER_STALL_MS,
            connect_timeout_ms: DEFAULT_PEER_CONNECT_TIMEOUT_MS,
            max_attempts: DEFAULT_PEER_ATTEMPTS,
            rack_wait_ms: DEFAULT_RACK_WAIT_MS,
            secret_file: None,
        }
    }
}

impl PeerConfig {
    /// The listen and advertised addresses, or what is wrong, naming the key.
    pub fn addresses(&self) -> Result<(SocketAddr, SocketAddr), String> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|e| format!("peers.listen `{}`: {e}", clip(&self.listen)))?;
        let advertise = match &self.advertise {
            Some(text) => text
                .parse()
                .map_err(|e| format!("peers.advertise `{}`: {e}", clip(text)))?,
            None => listen,
        };
        if advertise.ip().is_unspecified() || advertise.port() == 0 {
            return Err(format!(
                "peers.advertise: other hosts cannot reach `{advertise}`; set the address they use"
            ));
        }
        let zero = [
            ("peers.max_uploads", self.max_uploads as u64),
            ("peers.upload_bytes_per_s", self.upload_bytes_per_s),
            ("peers.stall_ms", self.stall_ms),
            ("peers.connect_timeout_ms", self.connect_timeout_ms),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key} must be at least 1"));
        }
        Ok((listen, advertise))
    }
}
