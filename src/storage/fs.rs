//! Local-directory storage driver.
//!
//! Durability protocol for every put: write a temp file in the destination directory, fsync
//! it, then publish it (rename, or `link` for put-if-absent, which fails atomically if the name
//! exists), then fsync the directory. Readers never see a temp file: their names start with
//! `.tmp-` and `list` skips them.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{BoxRead, ObjectMeta, PutMode, Storage, StorageError, StorageResult};

const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
    /// When drctl runs as root in a repository another user owns, what it creates is given to
    /// that owner, so a root run never leaves files the usual user (postgres) cannot replace.
    owner: Option<(u32, u32)>,
}

impl FsStorage {
    /// Opens (creating if needed) a repository rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> StorageResult<FsStorage> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| StorageError::Io {
            op: "create repository directory",
            key: root.display().to_string(),
            source: e,
        })?;
        let owner = std::fs::metadata(&root).ok().and_then(|m| {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            (euid == 0 && m.uid() != 0).then_some((m.uid(), m.gid()))
        });
        Ok(FsStorage { root, owner })
    }

    /// Gives `path` to the repository's owner (no-op unless running as root, see `owner`).
    fn adopt(&self, path: &Path) -> std::io::Result<()> {
        match self.owner {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// `mkdir -p dir`, with each directory it creates given to the repository's owner.
    async fn make_dirs(&self, dir: &Path) -> std::io::Result<()> {
        if self.owner.is_none() {
            return tokio::fs::create_dir_all(dir).await;
        }
        let mut missing = Vec::new();
        let mut d = dir;
        while !tokio::fs::try_exists(d).await.unwrap_or(false) {
            missing.push(d.to_path_buf());
            match d.parent() {
                Some(p) if p.starts_with(&self.root) => d = p,
                _ => break,
            }
        }
        for m in missing.iter().rev() {
            match tokio::fs::create_dir(m).await {
                Ok(()) => self.adopt(m)?,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> StorageResult<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c == ".." || c == "." || c.is_empty())
        {
            return Err(StorageError::Backend {
                op: "resolve",
                key: key.into(),
                message: "invalid object key".into(),
                retryable: false,
            });
        }
        Ok(self.root.join(key))
    }
}

fn io_err(op: &'static str, key: &str, e: std::io::Error) -> StorageError {
    // A path running through an existing object ("a/b" where "a" is a file) is absent too.
    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) {
        StorageError::NotFound(key.to_string())
    } else {
        StorageError::Io {
            op,
            key: key.to_string(),
            source: e,
        }
    }
}

async fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(std::io::Error::other)?
}

#[async_trait]
impl Storage for FsStorage {
    async fn put(&self, key: &str, mut body: BoxRead, mode: PutMode) -> StorageResult<u64> {
        let dest = self.path(key)?;
        let dir = dest.parent().expect("key has a parent").to_path_buf();
        self.make_dirs(&dir)
            .await
            .map_err(|e| io_err("mkdir", key, e))?;
        if mode == PutMode::IfAbsent && tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            return Err(StorageError::AlreadyExists(key.into()));
        }
        let name = dest.file_name().unwrap().to_string_lossy().to_string();
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{name}.{}.{}",
            std::process::id(),
            rand_suffix()
        ));
        // Remove the temp file on any early return.
        let guard = TmpGuard(Some(tmp.clone()));
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_err("create", key, e))?;
        self.adopt(&tmp).map_err(|e| io_err("chown", key, e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            let n = body
                .read(&mut buf)
                .await
                .map_err(|e| io_err("read source for", key, e))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .await
                .map_err(|e| io_err("write", key, e))?;
            written += n as u64;
        }
        file.flush().await.map_err(|e| io_err("flush", key, e))?;
        file.sync_all().await.map_err(|e| io_err("fsync", key, e))?;
        drop(file);
        match mode {
            PutMode::Overwrite => tokio::fs::rename(&tmp, &dest)
                .await
                .map_err(|e| io_err("rename", key, e))?,
            PutMode::IfAbsent => {
                // link(2) fails with EEXIST if the destination exists: atomic put-if-absent.
                match tokio::fs::hard_link(&tmp, &dest).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                        return Err(StorageError::AlreadyExists(key.into()));
                    }
                    Err(e) => return Err(io_err("link", key, e)),
                }
                let _ = tokio::fs::remove_file(&tmp).await;
            }
        }
        std::mem::forget(guard);
        fsync_dir(&dir)
            .await
            .map_err(|e| io_err("fsync dir", key, e))?;
        Ok(written)
    }

    async fn get(&self, key: &str) -> StorageResult<BoxRead> {
        let file = tokio::fs::File::open(self.path(key)?)
            .await
            .map_err(|e| io_err("open", key, e))?;
        Ok(Box::pin(file))
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> StorageResult<BoxRead> {
        let mut file = tokio::fs::File::open(self.path(key)?)
            .await
            .map_err(|e| io_err("open", key, e))?;
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| io_err("seek", key, e))?;
        Ok(Box::pin(file.take(len)))
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        match tokio::fs::metadata(self.path(key)?).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.into(),
                size: m.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                Ok(None)
            }
            Err(e) => Err(io_err("stat", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || list_blocking(&root, &prefix))
            .await
            .map_err(|e| StorageError::Backend {
                op: "list",
                key: String::new(),
                message: e.to_string(),
                retryable: false,
            })?
    }

    async fn delete(&self, key: &str) -> StorageResult<()> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => Ok(()),
            Err(e) => Err(io_err("delete", key, e)),
        }
    }

    fn describe(&self) -> String {
        format!("fs:{}", self.root.display())
    }
}

/// Walks only the directory that can hold keys with `prefix`.
fn list_blocking(root: &Path, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
    let start_rel = match prefix.rfind('/') {
        Some(i) => &prefix[..i],
        None => "",
    };
    let start = if start_rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(start_rel)
    };
    let mut out = Vec::new();
    let mut stack = vec![start];
    while let Some(dir) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                continue;
            }
            Err(e) => return Err(io_err("list", &dir.display().to_string(), e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| io_err("list", &dir.display().to_string(), e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(TMP_PREFIX) {
                continue;
            }
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let ft = entry.file_type().map_err(|e| io_err("list", &rel, e))?;
            if ft.is_dir() {
                if prefix.starts_with(&format!("{rel}/"))
                    || rel.starts_with(prefix)
                    || prefix.starts_with(&rel)
                {
                    stack.push(path);
                }
            } else if ft.is_file() && rel.starts_with(prefix) {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(ObjectMeta { key: rel, size });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

struct TmpGuard(Option<PathBuf>);
impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:x}{:x}", N.fetch_add(1, Ordering::Relaxed))
}
