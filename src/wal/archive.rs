//! `wal push` and `wal fetch`: one WAL file in or out of the repository, verified.
//!
//! A WAL object is `<header JSON>\n<compressed bytes>`. The header records the raw and stored
//! sizes and SHA-256, so a fetch needs nothing else to verify, and a second push of the same
//! name can tell an identical retry (success) from a conflicting segment (refused, nothing
//! overwritten). A segment is at most the WAL segment size (16 MiB by default), so both
//! directions work in memory: that keeps `wal push` to one read, one hash, one compression and
//! one durable put.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::WalName;
use crate::config::{Algorithm, CompressionConfig};
use crate::error::{Error, Result};
use crate::pipeline;
use crate::repo::Repo;
use crate::storage::{self, PutMode, StorageError};

pub const WAL_FORMAT: u32 = 1;
/// A header is never longer than this; anything longer is corruption.
const MAX_HEADER: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WalHeader {
    pub format: u32,
    pub name: String,
    pub compression: Algorithm,
    pub raw_size: u64,
    pub raw_sha256: String,
    pub stored_size: u64,
    pub stored_sha256: String,
    pub pushed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PushOutcome {
    Stored,
    /// The same content was already archived (PostgreSQL retrying after a crash).
    AlreadyArchived,
}

/// Compresses a whole segment. zstd goes through the one-shot API on blocking threads (no
/// stream framing overhead, no copy), each half of the segment its own frame on its own
/// thread: the frames concatenate into one valid zstd stream, and with the hash on a third
/// thread the two cores share the work instead of one waiting for the other. Other
/// algorithms go through the streaming pipeline.
async fn compress_all(raw: Arc<WalBytes>, cfg: &CompressionConfig) -> std::io::Result<Vec<u8>> {
    if cfg.algorithm == Algorithm::Zstd {
        let level = cfg.level;
        let len = raw.bytes().len();
        let half = len / 2;
        let part = |range: std::ops::Range<usize>| {
            let raw = raw.clone();
            tokio::task::spawn_blocking(move || zstd::bulk::compress(&raw.bytes()[range], level))
        };
        if half < (1 << 20) {
            return part(0..len).await.map_err(std::io::Error::other)?;
        }
        let (first, second) = (part(0..half), part(half..len));
        let mut out = first.await.map_err(std::io::Error::other)??;
        out.extend_from_slice(&second.await.map_err(std::io::Error::other)??);
        return Ok(out);
    }
    pipeline::compress_bytes(raw.bytes(), cfg).await
}

/// A WAL file's bytes: mapped from the page cache where it can be (a segment that PostgreSQL
/// has just written is there), else read. Reading 16 MiB into a fresh buffer took 7-11 ms of
/// a 30 ms push, most of it faulting in and zeroing the buffer's pages.
enum WalBytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl WalBytes {
    fn load(path: &Path) -> std::io::Result<WalBytes> {
        let file = std::fs::File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(WalBytes::Read(Vec::new()));
        }
        // SAFETY: PostgreSQL hands archive_command a finished segment and neither writes nor
        // truncates it until the command has succeeded, so the mapping stays valid and
        // unchanged while we read it.
        match unsafe { memmap2::MmapOptions::new().populate().map(&file) } {
            Ok(m) => Ok(WalBytes::Mapped(m)),
            Err(_) => std::fs::read(path).map(WalBytes::Read),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            WalBytes::Mapped(m) => m,
            WalBytes::Read(v) => v,
        }
    }
}

async fn decompress_all(stored: &[u8], alg: Algorithm, hint: usize) -> std::io::Result<Vec<u8>> {
    if alg == Algorithm::Zstd {
        // Capacity is the recorded raw size: a larger output is corruption and fails here.
        return zstd::bulk::decompress(stored, hint.max(1));
    }
    let mut dec = pipeline::decompress(std::io::Cursor::new(stored.to_vec()), alg);
    let mut out = Vec::with_capacity(hint);
    dec.read_to_end(&mut out).await?;
    Ok(out)
}

/// Archives the WAL file at `path` (as handed over by PostgreSQL's `%p`).
pub async fn push(
    repo: &Repo,
    path: &Path,
    cfg: &CompressionConfig,
    seg_size: u64,
) -> Result<PushOutcome> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Usage(format!("{} has no file name", path.display())))?;
    let wal = WalName::parse(name, seg_size)?;
    let key = repo.key(&wal.key(seg_size));
    let raw = Arc::new(
        WalBytes::load(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?,
    );
    // Hash and compress at once, on three threads: this is the RPO-critical path.
    let hashing = {
        let raw = raw.clone();
        tokio::task::spawn_blocking(move || hex::encode(Sha256::digest(raw.bytes())))
    };
    let stored = compress_all(raw.clone(), cfg)
        .await
        .map_err(|e| Error::io(format!("compress {name}"), e))?;
    let raw_sha256 = hashing.await.map_err(|e| Error::Failed(e.to_string()))?;
    let header = WalHeader {
        format: WAL_FORMAT,
        name: name.to_string(),
        compression: cfg.algorithm,
        raw_size: raw.bytes().len() as u64,
        raw_sha256,
        stored_size: stored.len() as u64,
        stored_sha256: hex::encode(Sha256::digest(&stored)),
        pushed_at: Utc::now(),
    };
    let mut object = serde_json::to_vec(&header).map_err(|e| Error::Failed(e.to_string()))?;
    object.push(b'\n');
    object.extend_from_slice(&stored);
    drop(stored);
    match storage::put_bytes(
        &**repo.storage(),
        &key,
        Bytes::from(object),
        PutMode::IfAbsent,
    )
    .await
    {
        Ok(_) => Ok(PushOutcome::Stored),
        Err(StorageError::AlreadyExists(_)) => {
            // Same name again: fine if identical, a loud refusal if not.
            let existing = storage::get_bytes(&**repo.storage(), &key).await?;
            let (theirs, _) = split_object(&existing, &key)?;
            if theirs.raw_sha256 == header.raw_sha256 && theirs.raw_size == header.raw_size {
                Ok(PushOutcome::AlreadyArchived)
            } else {
                Err(Error::Conflict(format!(
                    "WAL file {name} is already archived in stanza {} with DIFFERENT content \
                     (archived: {} bytes, sha256 {}; local: {} bytes, sha256 {}). Nothing was overwritten. \
                     Is another cluster archiving into this stanza, or was this cluster restored without a new timeline?",
                    repo.stanza(),
                    theirs.raw_size,
                    theirs.raw_sha256,
                    header.raw_size,
                    header.raw_sha256
                )))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Splits an object into its header and stored payload.
fn split_object<'a>(object: &'a [u8], key: &str) -> Result<(WalHeader, &'a [u8])> {
    let nl = object
        .iter()
        .take(MAX_HEADER)
        .position(|&b| b == b'\n')
        .ok_or_else(|| Error::Corruption(format!("{key}: no WAL object header")))?;
    let header: WalHeader = serde_json::from_slice(&object[..nl])
        .map_err(|e| Error::Corruption(format!("{key}: bad WAL object header: {e}")))?;
    Ok((header, &object[nl + 1..]))
}

/// Reads and fully verifies a WAL object; returns its raw bytes.
pub async fn read_verified(
    repo: &Repo,
    wal: &WalName,
    seg_size: u64,
) -> Result<Vec<u8>, FetchError> {
    let key = repo.key(&wal.key(seg_size));
    let object = match storage::get_bytes(&**repo.storage(), &key).await {
        Ok(o) => o,
        Err(StorageError::NotFound(_)) => return Err(FetchError::NotFound),
        Err(e) => return Err(FetchError::Failed(e.into())),
    };
    let (h, stored) = split_object(&object, &key).map_err(FetchError::Failed)?;
    if stored.len() as u64 != h.stored_size {
        return Err(FetchError::Failed(Error::Corruption(format!(
            "{key}: stored size {} but header says {}",
            stored.len(),
            h.stored_size
        ))));
    }
    let got = hex::encode(Sha256::digest(stored));
    if got != h.stored_sha256 {
        return Err(FetchError::Failed(Error::Corruption(format!(
            "{key}: SHA-256 of stored bytes is {got}, header says {}",
            h.stored_sha256
        ))));
    }
    let raw = decompress_all(stored, h.compression, h.raw_size as usize)
        .await
        .map_err(|e| {
            FetchError::Failed(Error::Corruption(format!("{key}: cannot decompress: {e}")))
        })?;
    let got = hex::encode(Sha256::digest(&raw));
    if raw.len() as u64 != h.raw_size || got != h.raw_sha256 {
        return Err(FetchError::Failed(Error::Corruption(format!(
            "{key}: decompressed bytes do not match the header ({} bytes, sha256 {got})",
            raw.len()
        ))));
    }
    Ok(raw)
}

/// Outcome of a failed fetch: "not found" is normal at the end of the archive; anything else
/// must stop recovery.
#[derive(Debug)]
pub enum FetchError {
    NotFound,
    Failed(Error),
}

/// Writes `bytes` to `dest` via a temp file in the same directory and a rename, so PostgreSQL
/// never sees a partial file.
pub async fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.drctl-tmp-{}",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal"),
        std::process::id()
    ));
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    if let Err(e) = tokio::fs::rename(&tmp, dest).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(Error::io(format!("rename to {}", dest.display()), e));
    }
    Ok(())
}

/// Header of an archived object without fetching the payload twice (used by verify/status).
pub async fn read_header(repo: &Repo, key: &str) -> Result<WalHeader> {
    let mut r = repo.storage().get_range(key, 0, MAX_HEADER as u64).await?;
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)
        .await
        .map_err(|e| Error::io(format!("read {key}"), e))?;
    let (h, _) = split_object(&buf, key)?;
    Ok(h)
}
