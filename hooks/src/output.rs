//! A hook's output: one pipe read to its end, written to the log file (up to a cap) and kept as a
//! bounded tail in memory for the error message.

use std::collections::VecDeque;
use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

use crate::{LOG_MAX_BYTES, OUTPUT_DRAIN_MS, OUTPUT_TAIL_BYTES};

/// Mode of a hook's log file (less the umask).
const LOG_FILE_MODE: u32 = 0o640;

/// Creates (or empties) the hook's log file `name` in `dir` without following a link or opening a
/// fifo put there (`sluice-safefs`): it is written as root.
pub(crate) fn create_log(dir: &std::path::Path, name: &str) -> io::Result<tokio::fs::File> {
    let file = sluice_safefs::Dir::open(dir)?.create_truncate(name, LOG_FILE_MODE)?;
    Ok(tokio::fs::File::from_std(file))
}

/// The last `OUTPUT_TAIL_BYTES` bytes seen.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    bytes: VecDeque<u8>,
}

impl Tail {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(OUTPUT_TAIL_BYTES)..];
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(OUTPUT_TAIL_BYTES);
        self.bytes.drain(..overflow);
        self.bytes.extend(chunk);
    }

    /// As text; bytes that are not UTF-8 (or a character cut by the bound) become U+FFFD.
    pub(crate) fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }
}

/// What the reader of a hook's output ends with.
#[derive(Default)]
pub(crate) struct Captured {
    pub(crate) tail: Tail,
    /// A failure to write the log file; the hook still ran, but its log is incomplete.
    pub(crate) log_error: Option<io::Error>,
}

/// Reads `pipe` until end of file into `log` and the tail. Once `exited` fires (the hook's process
/// group is gone), reading goes on for at most `OUTPUT_DRAIN_MS`: only a process that left the group
/// can still hold the pipe open, and it must not hold up the deploy.
pub(crate) async fn pump(
    mut pipe: pipe::Receiver,
    mut log: tokio::fs::File,
    mut exited: oneshot::Receiver<()>,
) -> Captured {
    let mut tail = Tail::default();
    let mut log_error = None;
    let mut logged_bytes: u64 = 0;
    let mut drain_deadline: Option<Instant> = None;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = pipe.read(&mut buf) => match read {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tail.push(format!("\n[sluice: reading the hook's output failed: {e}]\n").as_bytes());
                    break;
                }
            },
            // A dropped sender means the same: the hook is over.
            _ = &mut exited, if drain_deadline.is_none() => {
                drain_deadline = Some(Instant::now() + Duration::from_millis(OUTPUT_DRAIN_MS));
                continue;
            }
            () = tokio::time::sleep_until(drain_deadline.unwrap_or_else(Instant::now)),
                if drain_deadline.is_some() =>
            {
                let note = "\n[sluice: a process that left the hook's group still holds its output open; stopped reading]\n";
                tail.push(note.as_bytes());
                break;
            }
        };
        let chunk = &buf[..n];
        tail.push(chunk);
        if log_error.is_none() && logged_bytes < LOG_MAX_BYTES {
            let room = usize::try_from(LOG_MAX_BYTES - logged_bytes).unwrap_or(usize::MAX);
            let part = &chunk[..chunk.len().min(room)];
            logged_bytes += part.len() as u64;
            let mut result = log.write_all(part).await;
            if result.is_ok() && logged_bytes >= LOG_MAX_BYTES {
                let note = format!("\n[sluice: log cut at {LOG_MAX_BYTES} bytes]\n");
                result = log.write_all(note.as_bytes()).await;
            }
            log_error = result.err();
        }
    }
    if log_error.is_none() {
        log_error = log.flush().await.err();
    }
    Captured { tail, log_error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut tail = Tail::default();
        tail.push(b"hello ");
        tail.push(b"world");
        assert_eq!(tail.text(), "hello world");

        let big: Vec<u8> = (0..OUTPUT_TAIL_BYTES + 10)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        tail.push(&big);
        assert_eq!(tail.text().as_bytes(), &big[10..]);
        tail.push(b"!");
        assert_eq!(tail.text().len(), OUTPUT_TAIL_BYTES);
        assert!(tail.text().ends_with("!"));
    }
}
