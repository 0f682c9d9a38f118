//! WAL prefetch for `restore_command`: replay is latency-bound when every segment costs a
//! process start plus a GET, so after serving segment N, `wal fetch` starts one detached
//! prefetcher that downloads and verifies the next segments in parallel into a spool
//! directory. Later fetches are served from the spool after re-checking the SHA-256 recorded
//! beside each spooled file, so a spooled file is never trusted blindly.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::archive::{self, FetchError};
use super::{Segment, WalName};
use crate::error::{Error, Result};
use crate::repo::Repo;

/// The spool for one repository + stanza.
#[derive(Debug, Clone)]
pub struct Spool {
    pub dir: PathBuf,
}

impl Spool {
    pub fn new(spool_root: &Path, repo: &Repo) -> Spool {
        let tag = hex::encode(&Sha256::digest(repo.storage().describe().as_bytes())[..6]);
        Spool {
            dir: spool_root.join(format!("wal-{}-{tag}", repo.stanza())),
        }
    }

    fn data(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn sum(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sha256"))
    }

    /// Moves a spooled segment to `dest` if present and intact. Returns false on a miss.
    pub async fn take(&self, name: &str, dest: &Path) -> bool {
        let (Ok(expect), Ok(bytes)) = (
            tokio::fs::read_to_string(self.sum(name)).await,
            tokio::fs::read(self.data(name)).await,
        ) else {
            return false;
        };
        let ok = hex::encode(Sha256::digest(&bytes)) == expect.trim();
        let _ = tokio::fs::remove_file(self.sum(name)).await;
        if !ok {
            tracing::warn!(
                segment = name,
                "spooled WAL failed its checksum; fetching again"
            );
            let _ = tokio::fs::remove_file(self.data(name)).await;
            return false;
        }
        // Same filesystem: a rename; else write a copy.
        if tokio::fs::rename(self.data(name), dest).await.is_ok() {
            return true;
        }
        let done = archive::write_atomically(dest, &bytes).await.is_ok();
        let _ = tokio::fs::remove_file(self.data(name)).await;
        done
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        tokio::fs::write(self.sum(name), hex::encode(Sha256::digest(bytes)))
            .await
            .map_err(|e| Error::io("write spool checksum", e))?;
        tokio::fs::rename(&tmp, self.data(name))
            .await
            .map_err(|e| Error::io("rename into spool", e))?;
        Ok(())
    }

    fn has(&self, name: &str) -> bool {
        self.data(name).exists() && self.sum(name).exists()
    }

    /// Removes spooled segments older than `keep_from` (already replayed).
    fn prune(&self, keep_from: Segment, seg_size: u64) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            let base = n.trim_end_matches(".sha256");
            if let Some(s) = Segment::parse(base, seg_size)
                && (s.tli != keep_from.tli || s.segno < keep_from.segno)
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Takes the prefetcher lock; None if a live prefetcher holds it.
    fn lock(&self) -> Option<LockGuard> {
        let path = self.dir.join("prefetch.lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    let _ = write!(f, "{}", std::process::id());
                    return Some(LockGuard(path));
                }
                Err(_) => {
                    let pid: i32 = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(0);
                    // SAFETY: kill with signal 0 only checks for existence.
                    let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
                    if alive {
                        return None;
                    }
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        None
    }
}

struct LockGuard(PathBuf);
impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Downloads segments `first`, `first+1`, ... (up to `count`) into the spool, `parallel` at a
/// time, stopping at the end of the archive or at the first error (the foreground fetch will
/// meet that error itself and report it).
pub async fn run(
    repo: &Repo,
    spool: &Spool,
    first: Segment,
    count: u32,
    parallel: usize,
    seg_size: u64,
) -> Result<u32> {
    std::fs::create_dir_all(&spool.dir)
        .map_err(|e| Error::io(format!("create {}", spool.dir.display()), e))?;
    let Some(_lock) = spool.lock() else {
        return Ok(0);
    };
    spool.prune(first, seg_size);
    let mut fetched = 0;
    let mut next = first;
    let end = first.segno + count as u64;
    while next.segno < end {
        // One batch of up to `parallel` segments not yet spooled.
        let mut batch = Vec::new();
        while batch.len() < parallel && next.segno < end {
            let name = next.name(seg_size);
            if !spool.has(&name) {
                batch.push(next);
            }
            next = next.next();
        }
        if batch.is_empty() {
            continue;
        }
        let futs = batch.iter().map(|s| async move {
            let wal = WalName::Segment(*s);
            (
                s.name(seg_size),
                archive::read_verified(repo, &wal, seg_size).await,
            )
        });
        let results = futures::future::join_all(futs).await;
        for (name, r) in results {
            match r {
                Ok(bytes) => {
                    spool.put(&name, &bytes).await?;
                    fetched += 1;
                }
                Err(FetchError::NotFound) => return Ok(fetched),
                Err(FetchError::Failed(e)) => {
                    tracing::warn!(segment = %name, error = %e, "prefetch stopped");
                    return Ok(fetched);
                }
            }
        }
    }
    Ok(fetched)
}
