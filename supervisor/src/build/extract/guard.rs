//! A `Read` adapter under the tar parser that follows the tar stream's own block structure and
//! refuses an archive as soon as a header declares more than the caps allow.
//!
//! Why under the parser: the tar crate reads pax extended headers (`x`) and GNU long names and
//! long links (`L`, `K`) whole into memory before it returns the entry they describe, so any
//! check on the entries it returns comes after the allocation (a 538 KB gzip of a 512 MiB pax
//! path took the brain to 4.6 GiB). This guard sees every 512-byte header block first, reads its
//! type and size with the tar crate's own functions (so both sides read the same numbers, octal
//! or base-256), and fails the read that would complete a header whose data is over
//! [`META_HEADER_MAX_BYTES`], or that would take the running totals (every header, metadata
//! headers included, and every declared byte, metadata included) over `max_entries` or
//! `max_unpacked_bytes`.
//!
//! Architecture Invariant: the guard and the tar crate agree on where every header starts. The
//! guard keeps in step by doing what the parser does: a pax `size` record overrides the size
//! of the entry it describes (the records of a pax header, at most [`META_HEADER_MAX_BYTES`],
//! are kept to read it), a pending pax header is forgotten once the parser returns an entry,
//! GNU sparse headers (whose extension blocks would need more parsing) are refused, and the
//! first all-zero block ends the archive for both.

use std::io::{self, Read};

use crate::clip::{MAX_QUOTED_BYTES, clip, clip_bytes};

use super::super::{BuildError, Limits};

/// Largest data of any one metadata header (pax `x`/`g`, GNU long name `L` / long link `K`), in
/// bytes. Real ones hold a path or two and a few times, well under 1 KiB; the cap bounds what
/// the tar crate buffers for one entry.
pub const META_HEADER_MAX_BYTES: u64 = 64 << 10;
/// Tar's block size: headers are one block, data is padded to whole blocks.
const BLOCK_BYTES: u64 = 512;

/// Where the guard is in the tar stream.
enum State {
    /// Inside a header block; `filled` of its 512 bytes seen so far.
    Header {
        block: Box<[u8; BLOCK_BYTES as usize]>,
        filled: usize,
    },
    /// Inside an entry's data and padding, passed on unread.
    Data { remaining: u64 },
    /// Inside a pax extended header's records, kept (at most [`META_HEADER_MAX_BYTES`]) to read
    /// its `size` record, followed by `padding` bytes.
    Pax {
        records: Vec<u8>,
        size: u64,
        padding: u64,
    },
    /// After the end marker (the first all-zero block): the parser reads no more headers, and
    /// what follows is passed on for the trailer check and the hash.
    End,
}

impl State {
    fn header() -> State {
        State::Header {
            block: Box::new([0; BLOCK_BYTES as usize]),
            filled: 0,
        }
    }
}

/// The guard itself: wraps the decompressed stream, hands the bytes on unchanged, and fails
/// (with [`HeaderGuard::take_refusal`] telling why) when a header breaks a cap.
pub struct HeaderGuard<R> {
    inner: R,
    url: String,
    max_entries: u64,
    max_unpacked_bytes: u64,
    state: State,
    /// Header blocks seen, metadata headers included.
    headers: u64,
    /// Sum of the declared data sizes of every header, metadata headers included.
    declared_bytes: u64,
    /// The `size` record of the pax header that describes the next entry, as the tar crate
    /// reads it (`None` when absent or malformed, where the tar crate ignores it too).
    pax_size: Option<u64>,
    /// Why the archive was refused; every later read fails with it.
    refusal: Option<BuildError>,
}

impl<R: Read> HeaderGuard<R> {
    pub fn new(inner: R, url: &str, limits: &Limits) -> HeaderGuard<R> {
        HeaderGuard {
            inner,
            url: url.to_owned(),
            max_entries: limits.max_entries,
            max_unpacked_bytes: limits.max_unpacked_bytes,
            state: State::header(),
            headers: 0,
            declared_bytes: 0,
            pax_size: None,
            refusal: None,
        }
    }

    /// The reason the guard failed a read, if it did. The tar crate wraps I/O errors in its own
    /// text, so the caller takes the typed error from here.
    pub fn take_refusal(&mut self) -> Option<BuildError> {
        self.refusal.take()
    }

    /// Whether the guard saw the end marker.
    #[cfg(test)]
    pub fn ended(&self) -> bool {
        matches!(self.state, State::End)
    }

    /// Follows `bytes` (just read from the stream) through the block structure. `bytes` may end
    /// anywhere: in a header, in data, in padding.
    fn follow(&mut self, mut bytes: &[u8]) -> Result<(), BuildError> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::End => return Ok(()),
                State::Data { remaining } => {
                    let k = (*remaining).min(bytes.len() as u64);
                    *remaining -= k;
                    bytes = &bytes[k as usize..];
                    if *remaining == 0 {
                        self.state = State::header();
                    }
                }
                State::Pax {
                    records,
                    size,
                    padding,
                } => {
                    let want = *size - records.len() as u64;
                    let k = want.min(bytes.len() as u64) as usize;
                    records.extend_from_slice(&bytes[..k]);
                    bytes = &bytes[k..];
                    if records.len() as u64 == *size {
                        let padding = *padding;
                        self.pax_size = pax_size(records);
                        self.state = after_data(padding);
                    }
                }
                State::Header { block, filled } => {
                    let k = (BLOCK_BYTES as usize - *filled).min(bytes.len());
                    block[*filled..*filled + k].copy_from_slice(&bytes[..k]);
                    *filled += k;
                    bytes = &bytes[k..];
                    if *filled == BLOCK_BYTES as usize {
                        let block = std::mem::replace(block, Box::new([0; BLOCK_BYTES as usize]));
                        self.on_header(&block, bytes)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks one complete header block; `rest` is what the same read returned after it.
    fn on_header(
        &mut self,
        block: &[u8; BLOCK_BYTES as usize],
        rest: &[u8],
    ) -> Result<(), BuildError> {
        if block.iter().all(|b| *b == 0) {
            self.state = State::End;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(block);
        let name = clip_bytes(&header.path_bytes());
        let kind = header.entry_type();
        self.headers += 1;
        if self.headers > self.max_entries {
            return Err(self.too_large("max_entries", self.max_entries, &name));
        }
        if kind.is_gnu_sparse() {
            return Err(BuildError::UnsafeEntry {
                entry: name,
                reason: "gnu sparse files are refused".into(),
            });
        }
        let header_size = header.entry_size().map_err(|e| BuildError::Archive {
            url: self.url.clone(),
            message: format!("header of entry `{name}`: {}", clip(&e.to_string())),
        })?;
        let is_metadata = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        // The tar crate consumes these itself and goes on to the entry they describe; every other
        // header it returns as an entry, and a pending pax header goes with it.
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let consumed = recognized
            && (kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions());
        let size = if consumed {
            header_size
        } else {
            let pax = self.pax_size.take();
            if is_metadata {
                header_size
            } else {
                pax.unwrap_or(header_size)
            }
        };
        if is_metadata && size > META_HEADER_MAX_BYTES {
            return Err(self.oversized_metadata(&name, kind, size, rest));
        }
        self.declared_bytes = self.declared_bytes.saturating_add(size);
        if self.declared_bytes > self.max_unpacked_bytes {
            return Err(self.too_large("max_unpacked_bytes", self.max_unpacked_bytes, &name));
        }
        let padded = size
            .checked_add(BLOCK_BYTES - 1)
            .map(|s| s & !(BLOCK_BYTES - 1))
            .ok_or_else(|| BuildError::Archive {
                url: self.url.clone(),
                message: format!("entry `{name}`: size {size} overflows"),
            })?;
        self.state = if recognized && kind.is_pax_local_extensions() {
            if size == 0 {
                self.pax_size = pax_size(&[]);
                after_data(padded)
            } else {
                State::Pax {
                    // Bounded by META_HEADER_MAX_BYTES above.
                    records: Vec::with_capacity(size as usize),
                    size,
                    padding: padded - size,
                }
            }
        } else {
            after_data(padded)
        };
        Ok(())
    }

    fn too_large(&self, limit_name: &'static str, limit: u64, name: &str) -> BuildError {
        BuildError::TooLarge {
            url: self.url.clone(),
            limit_name,
            limit,
            at: format!(" at entry `{name}`"),
        }
    }

    /// The refusal of a metadata header over its cap, naming the entry by the first bytes of
    /// the header's data (the long name itself, or the pax records), which it reads from
    /// `rest` and then from the stream, at most [`MAX_QUOTED_BYTES`].
    fn oversized_metadata(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        size: u64,
        rest: &[u8],
    ) -> BuildError {
        let want = (MAX_QUOTED_BYTES as u64).min(size) as usize;
        let mut prefix = rest[..rest.len().min(want)].to_vec();
        let mut more = [0u8; MAX_QUOTED_BYTES];
        while prefix.len() < want {
            match self.inner.read(&mut more[..want - prefix.len()]) {
                Ok(0) | Err(_) => break,
                Ok(n) => prefix.extend_from_slice(&more[..n]),
            }
        }
        let begins = String::from_utf8_lossy(&prefix);
        let what = if kind.is_gnu_longname() {
            "gnu long name"
        } else if kind.is_gnu_longlink() {
            "gnu long link name"
        } else if kind.is_pax_local_extensions() {
            "pax extended header"
        } else {
            "pax global header"
        };
        let (entry, shown) = if kind.is_gnu_longname() || kind.is_gnu_longlink() {
            (format!("{begins}…({size} bytes)"), String::new())
        } else {
            (name.to_owned(), format!(", its records begin `{begins}…`"))
        };
        BuildError::UnsafeEntry {
            entry,
            reason: format!(
                "{what} of {size} bytes is over the {META_HEADER_MAX_BYTES}-byte cap for one \
                 metadata header{shown}"
            ),
        }
    }
}

/// The state after a header whose data and padding take `padded` bytes.
fn after_data(padded: u64) -> State {
    if padded == 0 {
        State::header()
    } else {
        State::Data { remaining: padded }
    }
}

/// The pax `size` record exactly as the tar crate reads it (`pax_extensions_value`): the first
/// `size` record wins, and a malformed record before it, or a value that is not a `u64`, means
/// no override.
fn pax_size(records: &[u8]) -> Option<u64> {
    for record in tar::PaxExtensions::new(records) {
        let record = record.ok()?;
        if record.key() != Ok("size") {
            continue;
        }
        return record.value().ok()?.parse::<u64>().ok();
    }
    None
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(refusal) = &self.refusal {
            return Err(io::Error::other(refusal.to_string()));
        }
        if matches!(self.state, State::End) {
            return self.inner.read(out);
        }
        let n = self.inner.read(out)?;
        if let Err(refusal) = self.follow(&out[..n]) {
            let err = io::Error::other(refusal.to_string());
            self.refusal = Some(refusal);
            return Err(err);
        }
        Ok(n)
    }
}
