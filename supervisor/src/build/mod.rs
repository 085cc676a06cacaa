//! The build store: fetches a build's tarball, verifies its sha256 and extracts it into
//! `<data_dir>/<service>/releases/<build>/`, then flips `current` and prunes old releases.
//!
//! A build id names a tarball in a store reached through `object_store`: `file://`,
//! `http(s)://`, `s3://` and `gs://` URLs. The archive is streamed once: the bytes are hashed
//! and counted as they arrive, decompressed (gzip, zstd or plain tar, told apart by their magic
//! bytes) and extracted on a blocking thread in the same pass. Extraction happens in a temporary
//! directory `releases/.tmp-<build>-<pid>-<n>/`, which becomes `releases/<build>` by one rename
//! only after the whole stream was read and its sha256 matched: a partial or unverified download
//! never becomes a release, and every failure removes the temporary directory.
//!
//! Credentials come from the environment (or from [`Releases::with_store_env`]):
//!
//! - `s3://`: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; `AWS_REGION`
//!   (else `AWS_DEFAULT_REGION`, else `us-east-1`); `AWS_ENDPOINT_URL` (else `AWS_ENDPOINT`) for
//!   an S3-compatible server, which is also allowed plain HTTP when the endpoint is `http://`;
//!   `AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`, `AWS_ROLE_SESSION_NAME` for web identity.
//!   Without keys, `object_store` falls back to the instance metadata service.
//! - `gs://`: `GOOGLE_SERVICE_ACCOUNT` (a key file path), `GOOGLE_SERVICE_ACCOUNT_KEY` (the key
//!   itself), `GOOGLE_APPLICATION_CREDENTIALS`; otherwise the metadata server.
//! - `http(s)://` and `file://` need nothing.

mod extract;
pub mod peer;
pub mod peer_auth;
mod reader;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use reader::{STORE_READER_ARG, main as store_reader_main, use_store_reader};

tokio::task_local! {
    /// The archive bytes of the install running on this task, by source, for
    /// `sluice_fetch_bytes_total`: the executor scopes each install in one, and the store's and
    /// peers' streams add what they deliver. Outside a scope nothing is counted.
    pub static FETCH_TALLY: std::sync::Arc<crate::metrics::FetchTally>;
}

/// Transfers of build bytes (installs, uploads to peers) under way in this process.
static TRANSFERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Held for the life of a transfer. When the last one ends, the heap the transfers freed goes
/// back to the kernel (`malloc_trim`): their buffers (chunks queued to the extractor, hyper's
/// per-connection buffers, upload frames) are freed between live allocations, where glibc does
/// not return them by itself, and a brain that relayed a build to its peers kept 1.5–2 MiB more
/// heap than one that did not (BENCHMARKS.md, 100 hosts).
pub(crate) struct Transfer(());

impl Transfer {
    pub(crate) fn begin() -> Transfer {
        TRANSFERS.fetch_add(1, Ordering::SeqCst);
        Transfer(())
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if TRANSFERS.fetch_sub(1, Ordering::SeqCst) == 1 {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only returns free memory of the allocator's arenas to the
            // kernel; it takes the allocator's own locks.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// `stream`, with every chunk it delivers added to the task's [`FETCH_TALLY`] under `source`
/// (the stream is polled on the install's task, the extractor only gets the chunks).
fn tallied(stream: store::ByteStream, source: crate::metrics::FetchSource) -> store::ByteStream {
    use futures_util::StreamExt as _;
    stream
        .map(move |chunk| {
            if let Ok(bytes) = &chunk {
                let _ = FETCH_TALLY.try_with(|tally| tally.add(source, bytes.len() as u64));
            }
            chunk
        })
        .boxed()
}

/// Default for [`Limits::max_archive_bytes`]: 4 GiB of compressed bytes read.
pub const DEFAULT_MAX_ARCHIVE_BYTES: u64 = 4 << 30;
/// Default for [`Limits::max_unpacked_bytes`]: 16 GiB, the sum of the archive's entry sizes.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 16 << 30;
/// Default for [`Limits::max_entries`].
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// Default for [`Limits::fetch_stall_ms`]: a fetch that receives nothing for this long fails.
pub const FETCH_STALL_MS: u64 = 30_000;
/// Longest accepted build id, in bytes.
pub const BUILD_ID_MAX_BYTES: usize = 128;

/// The directory inside a release that sluice itself writes; archive entries may not touch it.
const META_DIR: &str = ".sluice";
/// The file in [`META_DIR`] holding the install time (nanoseconds since the Unix epoch), which
/// orders releases: extraction may set arbitrary mtimes, so directory times cannot be trusted.
const INSTALLED_FILE: &str = "installed";
/// Prefix of temporary directories and links under the service root; never a valid build id.
const TMP_PREFIX: &str = ".tmp-";
/// The `current` link's name in `<data_dir>/<service>`.
const CURRENT_LINK: &str = "current";
/// Largest install marker read, in bytes (it holds one number).
const INSTALLED_FILE_MAX_BYTES: u64 = 64;
/// Deepest release tree that pruning removes, in directories; a deeper one (which no archive
/// extraction makes) is left as a `.tmp-*` leftover and reported.
const RELEASE_MAX_DEPTH: usize = 128;

/// Where a build comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The archive's URL (`file://`, `http(s)://`, `s3://`, `gs://`).
    pub url: String,
    /// The archive's sha256 in hex. When `None`, the sidecar `<url>.sha256` is fetched and its
    /// first whitespace-separated token is used (the format `sha256sum` writes).
    pub sha256: Option<String>,
}

/// Bounds on one fetch, so a hostile or broken store cannot fill the disk or hang an install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Compressed bytes read from the store, counted as they stream; default 4 GiB.
    pub max_archive_bytes: u64,
    /// Sum of the archive's entry sizes once unpacked; default 16 GiB.
    pub max_unpacked_bytes: u64,
    /// Number of tar headers: entries (files, directories, links) and the metadata headers
    /// (pax, GNU long names) that describe them; default 1 000 000.
    pub max_entries: u64,
    /// A fetch that receives no byte for this long fails; default [`FETCH_STALL_MS`].
    pub fetch_stall_ms: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_archive_bytes: DEFAULT_MAX_ARCHIVE_BYTES,
            max_unpacked_bytes: DEFAULT_MAX_UNPACKED_BYTES,
            max_entries: DEFAULT_MAX_ENTRIES,
            fetch_stall_ms: FETCH_STALL_MS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid build id `{id}`: {reason}")]
    BadId { id: String, reason: String },
    #[error("invalid build store url `{url}`: {message}")]
    BadUrl { url: String, message: String },
    #[error("invalid sha256 `{value}` for {url}: expected 64 hex digits")]
    BadSha256 { url: String, value: String },
    #[error("cannot fetch {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("no build at {url}")]
    NotFound { url: String },
    #[error("fetch of {url} made no progress for {stall_ms} ms")]
    Stalled { url: String, stall_ms: u64 },
    #[error("checksum mismatch for {url}: expected sha256 {expected}, got {actual}")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("archive entry `{entry}`: {reason}")]
    UnsafeEntry { entry: String, reason: String },
    #[error("{url} is over {limit_name} ({limit}){at}")]
    TooLarge {
        url: String,
        limit_name: &'static str,
        limit: u64,
        /// Where in the archive the limit was crossed (` at entry `name``, the name clipped), or
        /// empty when the download itself was too large.
        at: String,
    },
    #[error("corrupt or truncated archive {url}: {message}")]
    Archive { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write archive entry `{entry}`: {source}")]
    Write {
        /// The entry's name, clipped.
        entry: String,
        source: std::io::Error,
    },
    #[error("build `{build}` is not installed")]
    NotInstalled { build: String },
    /// The file system of the releases ran out of space (or quota) during an install; the
    /// partial release was removed and the serving build is untouched.
    #[error(
        "{releases}: {what} while installing build `{build}` ({detail}); the partial release was removed"
    )]
    NoSpace {
        releases: PathBuf,
        build: String,
        /// `no space left on device (ENOSPC)` or `disk quota exceeded (EDQUOT)`.
        what: &'static str,
        /// The failed operation, as the inner error says it.
        detail: String,
    },
}

impl BuildError {
    fn io(path: &Path, source: std::io::Error) -> BuildError {
        BuildError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// What a write that ran out of room says, when that is why this error happened.
    fn out_of_space(&self) -> Option<&'static str> {
        let source = match self {
            BuildError::Io { source, .. } | BuildError::Write { source, .. } => source,
            _ => return None,
        };
        match source.raw_os_error() {
            Some(libc::ENOSPC) => Some("no space left on device (ENOSPC)"),
            Some(libc::EDQUOT) => Some("disk quota exceeded (EDQUOT)"),
            _ => None,
        }
    }
}

/// Extracts an archive held in memory into `dest` (an existing empty directory) with the same
/// checks as an install, without a store or a checksum: the entry point of the archive fuzz
/// target (`fuzz/`).
#[doc(hidden)]
pub fn extract_bytes_for_fuzzing(
    bytes: &[u8],
    dest: &Path,
    limits: &Limits,
) -> Result<(), BuildError> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    // Both fit in the channel, so nothing blocks before the extractor reads.
    let sent = tx
        .try_send(extract::Chunk::Data(bytes::Bytes::copy_from_slice(bytes)))
        .and_then(|()| tx.try_send(extract::Chunk::End));
    assert!(sent.is_ok(), "a channel of 2 holds 2 chunks");
    extract::extract(rx, dest, "memory:///fuzz", limits)
}

/// Checks a build id: `[A-Za-z0-9._-]{1,128}`, not starting with `.`. Ids become directory
/// names, so anything that could name another directory (`..`, `/`) or a hidden file is refused.
pub fn check_build_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty".into());
    }
    if id.len() > BUILD_ID_MAX_BYTES {
        return Err(format!("longer than {BUILD_ID_MAX_BYTES} bytes"));
    }
    if id.starts_with('.') {
        return Err("starts with `.`".into());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("contains {c:?} (allowed: A-Z a-z 0-9 . _ -)"));
    }
    Ok(())
}

/// Substitutes `{build}` and `{service}` in a source URL template.
pub fn source_url(template: &str, service: &str, build: &str) -> String {
    template
        .replace("{service}", service)
        .replace("{build}", build)
}

fn bad_id(id: &str) -> impl FnOnce(String) -> BuildError + '_ {
    move |reason| BuildError::BadId {
        id: crate::clip::clip(id).into_owned(),
        reason,
    }
}

/// Distinguishes the temporary names made by one process (a counter, not a clock, so two
/// installs in the same instant cannot collide).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn tmp_suffix() -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// The releases of one service: `<data_dir>/<service>/`, holding `releases/<build>/` and the
/// `current` symlink.
#[derive(Debug, Clone)]
pub struct Releases {
    /// `<data_dir>/<service>`.
    root: PathBuf,
    /// Store credentials used instead of the process environment when set: the environment is
    /// process-global, and tests (or configuration) need per-store values.
    store_env: Option<BTreeMap<String, String>>,
    /// The executable store fetches run in (`reader`), or `None` for this process.
    store_reader: Option<PathBuf>,
}

impl Releases {
    pub fn new(data_dir: &Path, service: &str) -> Releases {
        Releases {
            root: data_dir.join(service),
            store_env: None,
            store_reader: reader::default_reader(),
        }
    }

    /// Runs this releases' store fetches in a child executing `exe` (a `sluiced`, which the
    /// argument [`STORE_READER_ARG`] makes a store reader), or in this process when `None`,
    /// instead of what [`use_store_reader`] chose.
    pub fn with_store_reader(mut self, exe: Option<PathBuf>) -> Releases {
        self.store_reader = exe;
        self
    }

    /// Reads the store variables (see the module doc) from `vars` instead of the process
    /// environment.
    pub fn with_store_env(mut self, vars: BTreeMap<String, String>) -> Releases {
        self.store_env = Some(vars);
        self
    }

    fn releases_dir(&self) -> PathBuf {
        self.root.join("releases")
    }

    fn current_link(&self) -> PathBuf {
        self.root.join(CURRENT_LINK)
    }

    /// `<root>/releases/<build>`, whether or not it exists.
    pub fn release_dir(&self, build: &str) -> PathBuf {
        self.releases_dir().join(build)
    }

    /// Whether a complete release of `build` exists. Releases appear by rename after
    /// verification, and the install marker is written before that rename, so a directory with
    /// the marker is complete.
    pub fn has(&self, build: &str) -> bool {
        check_build_id(build).is_ok()
            && sluice_safefs::Dir::open(&self.releases_dir())
                .is_ok_and(|releases| read_install_marker(&releases, build).is_ok())
    }

    /// Installs `build` from `source` unless a complete release already exists, in which case
    /// nothing is downloaded (a build is downloaded once per host). Returns the release dir.
    pub async fn install(
        &self,
        build: &str,
        source: &Source,
        limits: &Limits,
    ) -> Result<PathBuf, BuildError> {
        check_build_id(build).map_err(bad_id(build))?;
        let dest = self.release_dir(build);
        if self.has(build) {
            return Ok(dest);
        }
        let env = store::StoreEnv::new(self.store_env.as_ref(), self.store_reader.as_deref());
        let expected = match &source.sha256 {
            Some(sha) => store::parse_sha256(&source.url, sha)?,
            None => store::fetch_sidecar_sha256(&source.url, &env, limits).await?,
        };
        let stream = store::store_stream(&source.url, &env, limits).await?;
        self.install_stream(build, &expected, limits, &source.url, stream, None)
            .await
    }

    /// Installs `build` from the archive bytes of `stream` (named `label` in errors), which must
    /// hash to `expected` (lowercase hex), copying every byte into `tee` when given. The same
    /// checks and the same rename as [`Releases::install`], whoever sends the bytes.
    async fn install_stream(
        &self,
        build: &str,
        expected: &str,
        limits: &Limits,
        label: &str,
        stream: store::ByteStream,
        tee: Option<&mut dyn store::Tee>,
    ) -> Result<PathBuf, BuildError> {
        // By the time an error comes back here the temporary directory is gone (its guard
        // dropped), so the message can say so.
        let result = self
            .install_stream_once(build, expected, limits, label, stream, tee)
            .await;
        result.map_err(|e| match e.out_of_space() {
            Some(what) => BuildError::NoSpace {
                releases: self.releases_dir(),
                build: build.to_owned(),
                what,
                detail: e.to_string(),
            },
            None => e,
        })
    }

    async fn install_stream_once(
        &self,
        build: &str,
        expected: &str,
        limits: &Limits,
        label: &str,
        stream: store::ByteStream,
        tee: Option<&mut dyn store::Tee>,
    ) -> Result<PathBuf, BuildError> {
        check_build_id(build).map_err(bad_id(build))?;
        let dest = self.release_dir(build);
        let releases = self.releases_dir();
        let tmp = releases.join(format!("{TMP_PREFIX}{build}-{}", tmp_suffix()));
        // Leftovers of a crashed install may be whole release trees: removed, like everything
        // that walks or syncs a tree here, on the blocking pool, never on a runtime thread.
        let guard = {
            let (this, releases, tmp) = (self.clone(), releases.clone(), tmp.clone());
            blocking(move || {
                std::fs::create_dir_all(&releases).map_err(|e| BuildError::io(&releases, e))?;
                this.remove_stale_tmp();
                std::fs::create_dir(&tmp).map_err(|e| BuildError::io(&tmp, e))?;
                Ok(TmpDir(Some(tmp)))
            })
            .await?
        };
        let actual = match store::stream_and_extract(stream, label, limits, &tmp, tee).await {
            Ok(actual) => actual,
            Err(e) => {
                guard.remove().await;
                return Err(e);
            }
        };
        if actual != expected {
            guard.remove().await;
            return Err(BuildError::Checksum {
                url: crate::clip::clip(label).into_owned(),
                expected: expected.to_owned(),
                actual,
            });
        }
        let this = self.clone();
        let build_id = build.to_owned();
        let published = blocking(move || {
            let publish = || {
                write_install_marker(&tmp)?;
                sync_filesystem(&tmp)?;
                let releases_fd = sluice_safefs::Dir::open(&releases)
                    .map_err(|e| BuildError::io(&releases, e))?;
                let tmp_name = tmp.file_name().expect("a temporary name");
                match releases_fd.rename(tmp_name, &build_id) {
                    Ok(()) => {}
                    // Another install of the same build won the race; its release is as good
                    // as ours.
                    Err(_) if this.has(&build_id) => return Ok(false),
                    Err(e) => return Err(BuildError::io(&this.release_dir(&build_id), e)),
                }
                Ok(true)
            };
            match publish() {
                Ok(true) => {
                    guard.disarm();
                    fsync_dir(&releases)?;
                    Ok(true)
                }
                other => {
                    guard.remove_now();
                    other
                }
            }
        })
        .await?;
        if published {
            tracing::info!(build, from = %crate::clip::clip(label), "installed release");
        }
        Ok(dest)
    }

    /// Removes `.tmp-*` leftovers of processes that are gone (a crash mid-install or
    /// mid-prune). Directories of live processes, including ours, may be in use and are kept.
    fn remove_stale_tmp(&self) {
        let Ok(releases) = sluice_safefs::Dir::open(&self.releases_dir()) else {
            return;
        };
        let Ok(entries) = releases.entries() else {
            return;
        };
        for name in entries {
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
                continue;
            };
            let Some(pid) = rest.rsplit('-').nth(1) else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Err(e) = releases.remove_tree(name, RELEASE_MAX_DEPTH) {
                tracing::warn!(error = %crate::clip::clip(&e.to_string()), "cannot remove leftover");
            }
        }
    }

    /// The build `current` points to, if any.
    pub fn current(&self) -> Option<String> {
        let target = sluice_safefs::Dir::open(&self.root)
            .ok()?
            .read_link(CURRENT_LINK)
            .ok()?;
        let build = target.file_name()?.to_str()?.to_owned();
        check_build_id(&build).ok()?;
        Some(build)
    }

    /// Points `current` at an installed build atomically: a symlink is made under a temporary
    /// name and renamed over `current`, so readers see the old or the new target, never none.
    /// The old release directory is left untouched.
    pub fn set_current(&self, build: &str) -> Result<(), BuildError> {
        check_build_id(build).map_err(bad_id(build))?;
        if !self.has(build) {
            return Err(BuildError::NotInstalled {
                build: build.to_owned(),
            });
        }
        // Relative, so the data directory can be moved or bind-mounted elsewhere.
        let target = Path::new("releases").join(build);
        let root =
            sluice_safefs::Dir::open(&self.root).map_err(|e| BuildError::io(&self.root, e))?;
        let tmp = format!("{TMP_PREFIX}current-{}", tmp_suffix());
        root.symlink(&target, &tmp)
            .map_err(|e| BuildError::io(&root.child_path(&tmp), e))?;
        if let Err(e) = root.rename(&tmp, CURRENT_LINK) {
            let _ = root.unlink(&tmp);
            return Err(BuildError::io(&self.current_link(), e));
        }
        root.sync().map_err(|e| BuildError::io(&self.root, e))
    }

    /// Installed builds, oldest install first.
    pub fn list(&self) -> Vec<String> {
        let Ok(releases) = sluice_safefs::Dir::open(&self.releases_dir()) else {
            return Vec::new();
        };
        let Ok(entries) = releases.entries() else {
            return Vec::new();
        };
        let mut found: Vec<(u128, String)> = entries
            .into_iter()
            .filter_map(|name| {
                let name = name.into_string().ok()?;
                check_build_id(&name).ok()?;
                let installed = read_install_marker(&releases, &name).ok()?;
                Some((installed, name))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, name)| name).collect()
    }

    /// Removes all but the newest `keep` releases, never the current one nor one in `in_use`.
    /// Returns the removed build ids, oldest first.
    pub fn prune(&self, keep: usize, in_use: &BTreeSet<String>) -> Result<Vec<String>, BuildError> {
        let all = self.list();
        let current = self.current();
        let old = all.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for build in &all[..old] {
            if in_use.contains(build) || current.as_deref() == Some(build.as_str()) {
                continue;
            }
            // Renamed first so a crash mid-removal leaves a `.tmp-*` leftover (cleaned by the
            // next install), never a half-deleted directory that looks like a release.
            // Relative to the releases directory's descriptor, and without following a link the
            // service user may have put anywhere in the release.
            let dir = self.release_dir(build);
            let releases = sluice_safefs::Dir::open(&self.releases_dir())
                .map_err(|e| BuildError::io(&self.releases_dir(), e))?;
            let doomed = format!("{TMP_PREFIX}{build}-{}", tmp_suffix());
            releases
                .rename(build, &doomed)
                .map_err(|e| BuildError::io(&dir, e))?;
            releases
                .remove_tree(&doomed, RELEASE_MAX_DEPTH)
                .map_err(|e| BuildError::io(&releases.child_path(&doomed), e))?;
            tracing::info!(build, "pruned release");
            removed.push(build.clone());
        }
        Ok(removed)
    }
}

/// Removes a temporary directory on drop, so every early return (and a cancelled install)
/// cleans up after itself. The tree may be large: the async paths call [`TmpDir::remove`], and a
/// drop inside the runtime (a cancelled install) hands the removal to the blocking pool.
struct TmpDir(Option<PathBuf>);

impl TmpDir {
    /// The directory became a release: nothing to remove.
    fn disarm(mut self) {
        self.0 = None;
    }

    /// Removes the directory here; for callers already on the blocking pool.
    fn remove_now(mut self) {
        if let Some(path) = self.0.take() {
            remove_tmp_dir(&path);
        }
    }

    /// Removes the directory on the blocking pool and waits for it.
    async fn remove(mut self) {
        if let Some(path) = self.0.take() {
            let _ = tokio::task::spawn_blocking(move || remove_tmp_dir(&path)).await;
        }
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let Some(path) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || remove_tmp_dir(&path))),
            Err(_) => remove_tmp_dir(&path),
        }
    }
}

fn remove_tmp_dir(path: &Path) {
    let removed = sluice_safefs::split(path)
        .and_then(|(parent, name)| parent.remove_tree(name, RELEASE_MAX_DEPTH));
    if let Err(e) = removed
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove temporary directory");
    }
}

/// Runs `work` on the blocking pool and returns its result (a panic there is re-raised here).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, BuildError> + Send + 'static,
) -> Result<T, BuildError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Reads `releases/<build>/.sluice/installed` without following a link anywhere on the way (the
/// release may belong to the service's user): the install time, nanoseconds.
fn read_install_marker(releases: &sluice_safefs::Dir, build: &str) -> std::io::Result<u128> {
    let text = releases
        .open_dir(build)?
        .open_dir(META_DIR)?
        .read(INSTALLED_FILE, INSTALLED_FILE_MAX_BYTES)?;
    Ok(String::from_utf8_lossy(&text).trim().parse().unwrap_or(0))
}

fn write_install_marker(release: &Path) -> Result<(), BuildError> {
    let meta = release.join(META_DIR);
    std::fs::create_dir(&meta).map_err(|e| BuildError::io(&meta, e))?;
    let path = meta.join(INSTALLED_FILE);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut file = std::fs::File::create(&path).map_err(|e| BuildError::io(&path, e))?;
    writeln!(file, "{nanos}").map_err(|e| BuildError::io(&path, e))
}

/// Flushes the extracted files to disk before the rename publishes them: after a power loss,
/// a release directory must not exist with empty files. One `syncfs` is much cheaper than an
/// `fsync` per file for archives with many entries.
fn sync_filesystem(dir: &Path) -> Result<(), BuildError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(dir).map_err(|e| BuildError::io(dir, e))?;
    // SAFETY: the descriptor is valid for the duration of the call, owned by `file`.
    let rc = unsafe { libc::syncfs(file.as_raw_fd()) };
    if rc != 0 {
        return Err(BuildError::io(dir, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes a rename in `dir` durable.
fn fsync_dir(dir: &Path) -> Result<(), BuildError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BuildError::io(dir, e))
}
