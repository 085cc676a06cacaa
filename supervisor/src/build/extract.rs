//! Safe extraction of a build archive, run on a blocking thread fed by the download.
//!
//! The tar crate only parses here; every entry is checked and written by this module, because
//! `unpack_in` lets links, devices and sizes through. Architecture Invariant: nothing is ever
//! written outside the destination directory, whatever the archive holds. Three rules give it:
//! entry paths are relative without `..`; no entry is written through a symlink (a path whose
//! parent is a symlink is refused); and symlink targets are `..`s followed only by names, with
//! no more `..`s than the link's depth. The last rule is stricter than a lexical check on
//! purpose: a lexical check is fooled by `a -> d/b/..` when `d/b` is itself a link to `..`.
//!
//! Hostile archives cost a bounded amount: [`guard::HeaderGuard`] sits under the tar parser and
//! refuses a metadata header (pax, GNU long name/link) over [`guard::META_HEADER_MAX_BYTES`], or any
//! header that takes the totals over the limits, before the parser buffers it; entry paths
//! are capped in bytes and components; zstd frames may not ask for a window over
//! [`ZSTD_WINDOW_LOG_MAX`]. Modes are fixed (`0755`/`0644`, never set-uid, set-gid or sticky)
//! and ownership is never taken from the archive: everything belongs to the daemon's user.
//! Every name quoted in an error is clipped ([`crate::clip`]).

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use bytes::{Buf, Bytes};
use tar::EntryType;
use tokio::sync::mpsc;

use super::{BuildError, Limits, META_DIR};
use crate::clip::{clip, clip_bytes};

pub(super) mod guard;

/// Longest accepted entry path (and hard link target), in bytes: Linux's `PATH_MAX`, which no
/// release could use anyway once it is under the data directory.
pub const ENTRY_PATH_MAX_BYTES: usize = 4096;
/// Most components in an accepted entry path: deep enough for any real tree (`node_modules`
/// nests a few dozen), and a bound on the per-component checks each entry costs.
pub const ENTRY_PATH_MAX_COMPONENTS: usize = 256;
/// Largest zstd window a frame may ask for, as a base-2 logarithm (23 = 8 MiB, what `zstd -19`
/// uses): the decoder allocates the window, so the default limit (27, 128 MiB) would let a tiny
/// archive cost the brain 128 MiB. Archives made with `--long` or `--ultra` are refused.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Decompressed bytes accepted after the tar end marker, in bytes. Tar pads archives to a
/// 10 KiB record; anything much longer is not padding and could be a decompression bomb.
const TRAILER_MAX_BYTES: u64 = 1 << 20;
/// Mode of every extracted directory, and of files: instances run as other users and only read.
const DIR_MODE: u32 = 0o755;
const FILE_MODE: u32 = 0o644;
/// Mode of files the archive marks executable (any execute bit).
const EXEC_MODE: u32 = 0o755;

/// What the download sends to the extractor.
pub(super) enum Chunk {
    Data(Bytes),
    /// The download read every byte; without it, a closed channel means the download failed.
    End,
}

/// A blocking `Read` over the download's chunks.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    buf: Bytes,
    ended: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(bytes)) => self.buf = bytes,
                Some(Chunk::End) => self.ended = true,
                None => return Err(io::Error::other("download interrupted")),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf.advance(n);
        Ok(n)
    }
}

/// Extracts the archive arriving on `rx` into `dest` (an existing empty directory), then reads
/// the download to its end so its hash covers every byte.
pub(super) fn extract(
    rx: mpsc::Receiver<Chunk>,
    dest: &Path,
    url: &str,
    limits: &Limits,
) -> Result<(), BuildError> {
    let mut raw = ChannelReader {
        rx,
        buf: Bytes::new(),
        ended: false,
    };
    // Every error below quotes the url; one from ZooKeeper's build metadata is outside text.
    let clipped_url = clip(url);
    let url: &str = &clipped_url;
    let archive_err = |e: io::Error| BuildError::Archive {
        url: url.to_owned(),
        message: clip(&e.to_string()).into_owned(),
    };
    {
        let mut magic = Vec::with_capacity(4);
        (&mut raw)
            .take(4)
            .read_to_end(&mut magic)
            .map_err(archive_err)?;
        let input = Read::chain(io::Cursor::new(magic.clone()), &mut raw);
        let mut decoded: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(input))
        } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
            let mut decoder = zstd::stream::read::Decoder::new(input).map_err(archive_err)?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(archive_err)?;
            Box::new(decoder)
        } else {
            Box::new(input)
        };
        let mut unpacker = Unpacker {
            dest,
            url,
            limits,
            entries: 0,
            unpacked_bytes: 0,
            files: BTreeSet::new(),
        };
        {
            let mut guarded = guard::HeaderGuard::new(&mut decoded, url, limits);
            let unpacked = (|| -> Result<(), BuildError> {
                let mut archive = tar::Archive::new(&mut guarded);
                for entry in archive.entries().map_err(archive_err)? {
                    let entry = entry.map_err(archive_err)?;
                    unpacker.unpack(entry)?;
                }
                Ok(())
            })();
            // The tar crate wraps the guard's error in its own text; the guard's is the reason.
            if let Some(refusal) = guarded.take_refusal() {
                return Err(refusal);
            }
            unpacked?;
        }
        // Reading the decompressed tail to its end also checks the gzip CRC or zstd checksum.
        let tail = io::copy(
            &mut (&mut decoded).take(TRAILER_MAX_BYTES + 1),
            &mut io::sink(),
        )
        .map_err(archive_err)?;
        if tail > TRAILER_MAX_BYTES {
            return Err(BuildError::Archive {
                url: url.to_owned(),
                message: format!("more than {TRAILER_MAX_BYTES} bytes after the tar end marker"),
            });
        }
    }
    // Whatever follows the compressed stream is still part of the file the sha256 covers.
    io::copy(&mut raw, &mut io::sink()).map_err(archive_err)?;
    Ok(())
}

/// Checks and writes entries one by one, keeping the running totals the limits apply to.
struct Unpacker<'a> {
    dest: &'a Path,
    url: &'a str,
    limits: &'a Limits,
    entries: u64,
    unpacked_bytes: u64,
    /// Regular files extracted so far (relative paths): the only valid hard link targets.
    files: BTreeSet<PathBuf>,
}

impl Unpacker<'_> {
    fn unpack<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), BuildError> {
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            // Pax global headers carry metadata for all entries, none of which is used here.
            return Ok(());
        }
        let path_bytes = entry.path_bytes();
        let name = clip_bytes(&path_bytes);
        let unsafe_entry = |reason: &str| BuildError::UnsafeEntry {
            entry: name.clone(),
            reason: reason.to_owned(),
        };
        check_path_bounds(&path_bytes).map_err(|reason| unsafe_entry(&reason))?;
        drop(path_bytes);
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(self.too_large("max_entries", self.limits.max_entries));
        }
        let size = entry.size();
        self.unpacked_bytes = self.unpacked_bytes.saturating_add(size);
        if self.unpacked_bytes > self.limits.max_unpacked_bytes {
            return Err(self.too_large("max_unpacked_bytes", self.limits.max_unpacked_bytes));
        }
        let path = entry.path().map_err(|e| unsafe_entry(&e.to_string()))?;
        let rel = relative(&path).map_err(&unsafe_entry)?;
        if rel.as_os_str().is_empty() {
            // `./` itself: the release directory already exists.
            return Ok(());
        }
        if rel.starts_with(META_DIR) {
            return Err(unsafe_entry("`.sluice/` is reserved for sluice"));
        }
        self.make_parents(&rel, &name)?;
        let target = self.dest.join(&rel);
        match kind {
            EntryType::Directory => match std::fs::symlink_metadata(&target) {
                Ok(meta) if meta.is_dir() => Ok(()),
                Ok(_) => Err(unsafe_entry("a directory replaces a file or link")),
                Err(_) => make_dir(&target),
            },
            EntryType::Regular | EntryType::Continuous => {
                self.clear(&rel, &name)?;
                let mode = match entry.header().mode() {
                    Ok(mode) if mode & 0o111 != 0 => EXEC_MODE,
                    _ => FILE_MODE,
                };
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(|e| write_error(&name, e))?;
                let written = copy_entry(&mut entry, &mut file, &name, self.url)?;
                if written != size {
                    return Err(BuildError::Archive {
                        url: self.url.to_owned(),
                        message: format!("entry `{name}` is truncated"),
                    });
                }
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| write_error(&name, e))?;
                self.files.insert(rel);
                Ok(())
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| unsafe_entry(&e.to_string()))?
                    .ok_or_else(|| unsafe_entry("symlink without a target"))?
                    .into_owned();
                check_path_bounds(link.as_os_str().as_encoded_bytes())
                    .map_err(|reason| unsafe_entry(&format!("symlink target: {reason}")))?;
                check_symlink_target(&rel, &link).map_err(|reason| unsafe_entry(&reason))?;
                self.clear(&rel, &name)?;
                std::os::unix::fs::symlink(&link, &target).map_err(|e| write_error(&name, e))
            }
            EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| unsafe_entry(&e.to_string()))?
                    .ok_or_else(|| unsafe_entry("hard link without a target"))?
                    .into_owned();
                let shown = clip_bytes(link.as_os_str().as_encoded_bytes());
                let link_rel = relative(&link).map_err(|reason| {
                    unsafe_entry(&format!("hard link target `{shown}`: {reason}"))
                })?;
                if !self.files.contains(&link_rel) {
                    return Err(unsafe_entry(&format!(
                        "hard link target `{shown}` is not an already extracted file"
                    )));
                }
                if link_rel == rel {
                    return Err(unsafe_entry("hard link to itself"));
                }
                self.clear(&rel, &name)?;
                std::fs::hard_link(self.dest.join(&link_rel), &target)
                    .map_err(|e| write_error(&name, e))?;
                self.files.insert(rel);
                Ok(())
            }
            EntryType::Char | EntryType::Block => Err(unsafe_entry("device files are refused")),
            EntryType::Fifo => Err(unsafe_entry("fifos are refused")),
            other => Err(unsafe_entry(&format!("unsupported entry type {other:?}"))),
        }
    }

    fn too_large(&self, limit_name: &'static str, limit: u64) -> BuildError {
        BuildError::TooLarge {
            url: self.url.to_owned(),
            limit_name,
            limit,
            at: String::new(),
        }
    }

    /// Creates the missing parents of `rel`, refusing to go through anything but a real
    /// directory: writing through a symlink could leave the release.
    fn make_parents(&self, rel: &Path, name: &str) -> Result<(), BuildError> {
        let mut dir = self.dest.to_path_buf();
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        for part in parent.components() {
            dir.push(part);
            match std::fs::symlink_metadata(&dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(BuildError::UnsafeEntry {
                        entry: name.to_owned(),
                        reason: "its parent is a symlink or a file".into(),
                    });
                }
                Err(_) => make_dir(&dir)?,
            }
        }
        Ok(())
    }

    /// Removes an earlier entry at `rel` (a later duplicate wins, as with `tar x`), but never
    /// a directory.
    fn clear(&mut self, rel: &Path, name: &str) -> Result<(), BuildError> {
        let target = self.dest.join(rel);
        match std::fs::symlink_metadata(&target) {
            Err(_) => Ok(()),
            Ok(meta) if meta.is_dir() => Err(BuildError::UnsafeEntry {
                entry: name.to_owned(),
                reason: "replaces a directory".into(),
            }),
            Ok(_) => {
                self.files.remove(rel);
                std::fs::remove_file(&target).map_err(|e| BuildError::io(&target, e))
            }
        }
    }
}

/// Bytes of an entry's data read and written at a time (on the stack, as `io::copy` does).
const COPY_BUF_BYTES: usize = 8 << 10;

/// Copies an entry's data into its file. Unlike `io::copy`, tells a bad archive (reading the
/// entry failed) from a failed write (a full disk: [`write_error`], which the install reports as
/// ENOSPC naming the releases directory).
fn copy_entry(
    entry: &mut impl Read,
    file: &mut std::fs::File,
    name: &str,
    url: &str,
) -> Result<u64, BuildError> {
    let mut buf = [0u8; COPY_BUF_BYTES];
    let mut total = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(BuildError::Archive {
                    url: url.to_owned(),
                    message: format!("entry `{name}`: {}", clip(&e.to_string())),
                });
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| write_error(name, e))?;
        total += n as u64;
    }
}

/// An I/O error writing an entry, naming the entry (already clipped) rather than the path under
/// the release, whose length the archive chose.
fn write_error(name: &str, source: io::Error) -> BuildError {
    BuildError::Write {
        entry: name.to_owned(),
        source,
    }
}

/// Refuses a path (an entry's, or a link's target) over [`ENTRY_PATH_MAX_BYTES`] or
/// [`ENTRY_PATH_MAX_COMPONENTS`].
fn check_path_bounds(path: &[u8]) -> Result<(), String> {
    if path.len() > ENTRY_PATH_MAX_BYTES {
        return Err(format!(
            "path of {} bytes is over the {ENTRY_PATH_MAX_BYTES}-byte cap",
            path.len()
        ));
    }
    let components = path.split(|b| *b == b'/').filter(|c| !c.is_empty()).count();
    if components > ENTRY_PATH_MAX_COMPONENTS {
        return Err(format!(
            "path of {components} components is over the {ENTRY_PATH_MAX_COMPONENTS}-component cap"
        ));
    }
    Ok(())
}

fn make_dir(path: &Path) -> Result<(), BuildError> {
    std::fs::create_dir(path).map_err(|e| BuildError::io(path, e))?;
    // Explicit, because the daemon's umask must not decide what instances can read.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))
        .map_err(|e| BuildError::io(path, e))
}

/// An archive path made relative to the release: no root, no `..`; `.` components dropped.
fn relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("escapes the release (`..`)"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

/// Accepts a symlink target only if it stays in the release when followed for real (see the
/// module doc): relative, `..`s first, then names, with no more `..`s than the link's depth.
pub(super) fn check_symlink_target(link: &Path, target: &Path) -> Result<(), String> {
    let shown = clip_bytes(target.as_os_str().as_encoded_bytes());
    if target.as_os_str().is_empty() {
        return Err("empty symlink target".into());
    }
    let mut ups = 0usize;
    let mut names = 0usize;
    for part in target.components() {
        match part {
            Component::ParentDir if names == 0 => ups += 1,
            Component::ParentDir => {
                return Err(format!("symlink target `{shown}` has `..` after a name"));
            }
            Component::Normal(_) => names += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("symlink target `{shown}` is absolute"));
            }
        }
    }
    let depth = link.components().count() - 1;
    if ups > depth {
        return Err(format!("symlink target `{shown}` escapes the release"));
    }
    Ok(())
}
