//! Object storage: the one contract every repository backend implements.
//!
//! A [`Storage`] stores opaque objects under `/`-separated keys. Drivers (`fs`, `s3`) only move
//! bytes; everything else (retries, fault injection for tests) is a decorator that wraps any
//! driver. Writes are atomic: an object is either absent or complete, never partial, which is
//! what lets the repository treat "manifest exists" as the commit point of a backup.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

pub mod fault;
pub mod fs;
pub mod retry;
pub mod s3;

/// A boxed byte stream, the unit of transfer between the pipeline and storage.
pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;

/// Metadata of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the storage root.
    pub key: String,
    pub size: u64,
}

/// How a put treats an object that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PutMode {
    /// Replace any existing object atomically.
    #[default]
    Overwrite,
    /// Fail with [`StorageError::AlreadyExists`] if the key exists; never overwrite.
    IfAbsent,
}

/// Errors of the storage layer. Each says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object not found: {0}")]
    NotFound(String),
    #[error("object already exists: {0}")]
    AlreadyExists(String),
    #[error("{op} {key}: {source}")]
    Io {
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    /// The store refused our credentials or permissions; retrying will not help.
    #[error(
        "{op} {key}: access denied: {message} (check the AWS credentials and the bucket policy)"
    )]
    Denied {
        op: &'static str,
        key: String,
        message: String,
    },
    /// The bucket (or fs repository root) does not exist.
    #[error("repository location does not exist: {0}")]
    NoSuchBucket(String),
    /// Any other backend failure. `retryable` is true for throttling, 5xx and connection errors.
    #[error("{op} {key}: {message}")]
    Backend {
        op: &'static str,
        key: String,
        message: String,
        retryable: bool,
    },
    /// Raised by the fault-injection decorator in tests.
    #[error("injected fault: {0}")]
    Injected(String),
}

impl StorageError {
    /// Whether another attempt of the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Backend { retryable, .. } => *retryable,
            StorageError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ),
            StorageError::Injected(_) => true,
            _ => false,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound(_))
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

/// The storage contract.
///
/// * `put` consumes the whole reader and makes the object visible only when it is durable
///   and complete. If the reader fails, nothing becomes visible.
/// * `get` returns a stream of the whole object, or [`StorageError::NotFound`].
/// * `list` returns every object whose key starts with `prefix`, sorted by key.
/// * `delete` of an absent key succeeds.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    async fn put(&self, key: &str, body: BoxRead, mode: PutMode) -> StorageResult<u64>;
    async fn get(&self, key: &str) -> StorageResult<BoxRead>;
    async fn get_range(&self, key: &str, start: u64, len: u64) -> StorageResult<BoxRead>;
    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>>;
    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>>;
    async fn delete(&self, key: &str) -> StorageResult<()>;
    /// A human description of where objects go (no secrets).
    fn describe(&self) -> String;
}

/// Conveniences for small objects (manifests, metadata, locks).
pub async fn put_bytes(
    storage: &dyn Storage,
    key: &str,
    bytes: Bytes,
    mode: PutMode,
) -> StorageResult<u64> {
    storage
        .put(key, Box::pin(std::io::Cursor::new(bytes)), mode)
        .await
}

/// Reads a whole (small) object into memory.
pub async fn get_bytes(storage: &dyn Storage, key: &str) -> StorageResult<Vec<u8>> {
    let mut r = storage.get(key).await?;
    let mut out = Vec::new();
    r.read_to_end(&mut out)
        .await
        .map_err(|e| StorageError::Io {
            op: "read",
            key: key.to_string(),
            source: e,
        })?;
    Ok(out)
}

pub type DynStorage = Arc<dyn Storage>;

/// Opens the configured storage with its decorators: retries (fs; the S3 SDK retries its own
/// requests), then (tests only, from `DRCTL_FAULT`) fault injection.
pub async fn open(cfg: &crate::config::RepositoryConfig) -> StorageResult<DynStorage> {
    // The S3 SDK retries each request itself (throttling, 5xx, resets) up to max-attempts;
    // wrapping it again would multiply the attempts.
    let mut storage: DynStorage = match cfg.kind {
        crate::config::RepositoryKind::Fs => Arc::new(retry::Retry::new(
            Arc::new(fs::FsStorage::new(&cfg.path)?),
            cfg.max_attempts,
        )),
        crate::config::RepositoryKind::S3 => Arc::new(s3::S3Storage::new(cfg).await?),
    };
    if let Ok(spec) = std::env::var("DRCTL_FAULT")
        && !spec.is_empty()
    {
        storage = Arc::new(fault::Fault::new(storage, &spec));
    }
    Ok(storage)
}
