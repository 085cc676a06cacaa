//! Reaching a build store through `object_store`: URL to (store, path), credentials from the
//! environment, and the streaming fetch that hashes, counts and feeds the extractor.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as StorePath;
use object_store::signer::Url;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::extract::{self, Chunk};
use super::{BuildError, Limits};
use crate::clip::clip;

/// Largest `.sha256` sidecar accepted, in bytes: `sha256sum` writes 64 hex digits, two spaces
/// and a file name.
const SIDECAR_MAX_BYTES: usize = 4096;
/// Chunks queued between the download and the extracting thread. Bounded so a slow disk
/// applies back-pressure to the download instead of buffering the archive in memory.
const CHUNK_QUEUE_LEN: usize = 16;
/// Whole-request deadline handed to the HTTP client, in seconds. `object_store` defaults to 30 s
/// for the whole body, which would cut multi-gigabyte downloads; stalls are caught by
/// [`Limits::fetch_stall_ms`] instead, so this only bounds a trickle that never stalls.
const REQUEST_TIMEOUT_S: u64 = 6 * 3600;

/// How the store is reached: where its variables are read from (the process environment, or a
/// fixed map), and the store reader to run the fetch in, if any (`super::reader`).
pub(super) struct StoreEnv<'a> {
    vars: Option<&'a BTreeMap<String, String>>,
    reader: Option<&'a Path>,
}

impl<'a> StoreEnv<'a> {
    pub(super) fn new(
        vars: Option<&'a BTreeMap<String, String>>,
        reader: Option<&'a Path>,
    ) -> StoreEnv<'a> {
        StoreEnv { vars, reader }
    }

    /// The fixed variables, when they replace the process environment.
    pub(super) fn vars(&self) -> Option<&'a BTreeMap<String, String>> {
        self.vars
    }

    fn get(&self, name: &str) -> Option<String> {
        match self.vars {
            Some(vars) => vars.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
        .filter(|v| !v.is_empty())
    }
}

/// Variables passed through unchanged to the S3 client, lowercased into `object_store` keys.
const AWS_PASSTHROUGH: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
];
/// Variables passed through unchanged to the GCS client.
const GOOGLE_PASSTHROUGH: &[&str] = &[
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
];

/// Maps a URL to its store and the object's path in it.
fn open_store(
    url: &str,
    env: &StoreEnv<'_>,
    limits: &Limits,
) -> Result<(Box<dyn ObjectStore>, StorePath), BuildError> {
    let bad = |message: String| BuildError::BadUrl {
        url: clip(url).into_owned(),
        message: clip(&message).into_owned(),
    };
    let parsed = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let (scheme, _) = ObjectStoreScheme::parse(&parsed).map_err(|e| bad(e.to_string()))?;
    let mut options: Vec<(String, String)> = Vec::new();
    let mut client = true;
    match scheme {
        ObjectStoreScheme::Local => client = false,
        ObjectStoreScheme::Http => options.push(("allow_http".into(), "true".into())),
        ObjectStoreScheme::AmazonS3 => {
            for name in AWS_PASSTHROUGH {
                if let Some(value) = env.get(name) {
                    options.push((name.to_ascii_lowercase(), value));
                }
            }
            let region = env
                .get("AWS_REGION")
                .or_else(|| env.get("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into());
            options.push(("aws_region".into(), region));
            if let Some(endpoint) = env
                .get("AWS_ENDPOINT_URL")
                .or_else(|| env.get("AWS_ENDPOINT"))
            {
                if endpoint.starts_with("http://") {
                    options.push(("aws_allow_http".into(), "true".into()));
                }
                options.push(("aws_endpoint".into(), endpoint));
            }
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            for name in GOOGLE_PASSTHROUGH {
                if let Some(value) = env.get(name) {
                    options.push((name.to_ascii_lowercase(), value));
                }
            }
        }
        _ => {
            return Err(bad(
                "unsupported scheme (use file, http, https, s3 or gs)".into()
            ));
        }
    }
    if client {
        options.push(("timeout".into(), format!("{REQUEST_TIMEOUT_S}s")));
        options.push((
            "connect_timeout".into(),
            format!("{}ms", limits.fetch_stall_ms),
        ));
    }
    object_store::parse_url_opts(&parsed, options).map_err(|e| bad(e.to_string()))
}

/// Starts a download, mapping a missing object to [`BuildError::NotFound`]: in a store reader
/// process when `env` names one, else here.
async fn open_stream(
    url: &str,
    env: &StoreEnv<'_>,
    limits: &Limits,
) -> Result<ByteStream, BuildError> {
    match env.reader {
        Some(exe) => super::reader::open(exe, url, env, limits).await,
        None => open_here(url, env, limits).await,
    }
}

/// [`open_stream`] in this process: what the store reader runs.
pub(super) async fn open_here(
    url: &str,
    env: &StoreEnv<'_>,
    limits: &Limits,
) -> Result<ByteStream, BuildError> {
    let (store, path) = open_store(url, env, limits)?;
    let get = tokio::time::timeout(stall(limits), store.get(&path))
        .await
        .map_err(|_| stalled(url, limits))?;
    match get {
        Ok(result) => {
            let url = url.to_owned();
            Ok(result
                .into_stream()
                .map(move |chunk| chunk.map_err(|e| fetch_error(&url, e)))
                .boxed())
        }
        Err(object_store::Error::NotFound { .. }) => Err(BuildError::NotFound {
            url: clip(url).into_owned(),
        }),
        Err(e) => Err(fetch_error(url, e)),
    }
}

fn stall(limits: &Limits) -> Duration {
    Duration::from_millis(limits.fetch_stall_ms)
}

fn stalled(url: &str, limits: &Limits) -> BuildError {
    BuildError::Stalled {
        url: clip(url).into_owned(),
        stall_ms: limits.fetch_stall_ms,
    }
}

fn fetch_error(url: &str, e: object_store::Error) -> BuildError {
    BuildError::Fetch {
        url: clip(url).into_owned(),
        message: clip(&e.to_string()).into_owned(),
    }
}

/// Checks and lowercases a sha256 given in hex.
pub(super) fn parse_sha256(url: &str, value: &str) -> Result<String, BuildError> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(BuildError::BadSha256 {
            url: clip(url).into_owned(),
            value: clip(value).into_owned(),
        })
    }
}

/// Fetches `<url>.sha256` and returns its first whitespace-separated token.
pub(super) async fn fetch_sidecar_sha256(
    url: &str,
    env: &StoreEnv<'_>,
    limits: &Limits,
) -> Result<String, BuildError> {
    let sidecar = format!("{url}.sha256");
    let mut stream = open_stream(&sidecar, env, limits).await?;
    let mut text = Vec::new();
    while let Some(chunk) = tokio::time::timeout(stall(limits), stream.next())
        .await
        .map_err(|_| stalled(&sidecar, limits))?
    {
        text.extend_from_slice(&chunk?);
        if text.len() > SIDECAR_MAX_BYTES {
            return Err(BuildError::TooLarge {
                url: clip(&sidecar).into_owned(),
                limit_name: "SIDECAR_MAX_BYTES",
                limit: SIDECAR_MAX_BYTES as u64,
                at: String::new(),
            });
        }
    }
    let text = String::from_utf8_lossy(&text);
    let token = text.split_whitespace().next().unwrap_or("");
    parse_sha256(&sidecar, token)
}

/// How the download loop ended.
enum Pumped {
    /// Every byte was read; the sha256 of the whole archive.
    Complete(String),
    /// The extractor stopped reading (it failed and says why).
    ExtractorGone,
}

/// A stream of archive bytes from wherever they come: the store, or a peer.
pub(super) type ByteStream = futures_util::stream::BoxStream<'static, Result<Bytes, BuildError>>;

/// Where a copy of the archive's bytes goes as they stream (the file a host serves to peers).
/// Called on the download's task: writes land in the page cache, so they cost microseconds.
pub(super) trait Tee: Send {
    fn write(&mut self, chunk: &[u8]) -> Result<(), BuildError>;
}

/// Opens the download of `url` from its store as a [`ByteStream`].
pub(super) async fn store_stream(
    url: &str,
    env: &StoreEnv<'_>,
    limits: &Limits,
) -> Result<ByteStream, BuildError> {
    let stream = open_stream(url, env, limits).await?;
    Ok(super::tallied(stream, crate::metrics::FetchSource::Store))
}

/// Extracts the bytes of `stream` (labelled `url` in errors) into `dest`, copying them into
/// `tee` when given, and returns the sha256 of every byte read.
pub(super) async fn stream_and_extract(
    stream: ByteStream,
    url: &str,
    limits: &Limits,
    dest: &Path,
    tee: Option<&mut dyn Tee>,
) -> Result<String, BuildError> {
    let (tx, rx) = mpsc::channel(CHUNK_QUEUE_LEN);
    let extractor = {
        let (url, limits, dest) = (url.to_owned(), limits.clone(), dest.to_owned());
        tokio::task::spawn_blocking(move || {
            let result = extract::extract(rx, &dest, &url, &limits);
            // The caller removes the directory too, but if its install was cancelled it may
            // have done so while this thread was still writing.
            if result.is_err() {
                let _ = std::fs::remove_dir_all(&dest);
            }
            result
        })
    };
    let (pumped, extracted) = tokio::join!(pump(stream, tx, url, limits, tee), extractor);
    let extracted = match extracted {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    // A download failure explains the extractor's failure ("download interrupted"), not the
    // other way round, so it is reported first.
    match (pumped?, extracted) {
        (_, Err(e)) => Err(e),
        (Pumped::Complete(sha), Ok(())) => Ok(sha),
        (Pumped::ExtractorGone, Ok(())) => unreachable!("the extractor reads until the end"),
    }
}

async fn pump(
    mut stream: ByteStream,
    tx: mpsc::Sender<Chunk>,
    url: &str,
    limits: &Limits,
    mut tee: Option<&mut dyn Tee>,
) -> Result<Pumped, BuildError> {
    let mut hasher = Sha256::new();
    let mut read_bytes: u64 = 0;
    loop {
        // Watching the channel too means a failed extraction is reported at once, not after
        // the next chunk arrives (or the download stalls).
        let next = tokio::select! {
            next = tokio::time::timeout(stall(limits), stream.next()) => {
                next.map_err(|_| stalled(url, limits))?
            }
            () = tx.closed() => return Ok(Pumped::ExtractorGone),
        };
        let Some(chunk) = next else { break };
        let chunk = chunk?;
        read_bytes += chunk.len() as u64;
        if read_bytes > limits.max_archive_bytes {
            return Err(BuildError::TooLarge {
                url: clip(url).into_owned(),
                limit_name: "max_archive_bytes",
                limit: limits.max_archive_bytes,
                at: String::new(),
            });
        }
        hasher.update(&chunk);
        if let Some(tee) = tee.as_deref_mut() {
            tee.write(&chunk)?;
        }
        if tx.send(Chunk::Data(chunk)).await.is_err() {
            return Ok(Pumped::ExtractorGone);
        }
    }
    // Without this marker the extractor treats the closed channel as an interrupted download.
    if tx.send(Chunk::End).await.is_err() {
        return Ok(Pumped::ExtractorGone);
    }
    Ok(Pumped::Complete(hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
