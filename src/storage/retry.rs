//! Retry decorator: repeats retryable failures of operations that can be repeated safely.
//!
//! A `put` consumes its stream, so it is not retried here (drivers retry their own requests,
//! e.g. each S3 part); every other operation is retried with exponential backoff.

use std::time::Duration;

use async_trait::async_trait;

use super::{BoxRead, DynStorage, ObjectMeta, PutMode, Storage, StorageResult};

#[derive(Debug)]
pub struct Retry {
    inner: DynStorage,
    attempts: u32,
    base_delay: Duration,
}

impl Retry {
    pub fn new(inner: DynStorage, attempts: u32) -> Retry {
        Retry {
            inner,
            attempts: attempts.max(1),
            base_delay: Duration::from_millis(100),
        }
    }

    pub fn with_base_delay(mut self, d: Duration) -> Retry {
        self.base_delay = d;
        self
    }

    async fn run<T, F, Fut>(&self, op: &str, key: &str, f: F) -> StorageResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = StorageResult<T>>,
    {
        let mut attempt = 1;
        loop {
            match f().await {
                Err(e) if e.is_retryable() && attempt < self.attempts => {
                    let delay = self.base_delay * 2u32.pow(attempt - 1);
                    tracing::warn!(op, key, attempt, error = %e, "storage operation failed, retrying in {delay:?}");
                    tokio::time::sleep(delay.min(Duration::from_secs(10))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl Storage for Retry {
    async fn put(&self, key: &str, body: BoxRead, mode: PutMode) -> StorageResult<u64> {
        self.inner.put(key, body, mode).await
    }
    async fn get(&self, key: &str) -> StorageResult<BoxRead> {
        self.run("get", key, || self.inner.get(key)).await
    }
    async fn get_range(&self, key: &str, start: u64, len: u64) -> StorageResult<BoxRead> {
        self.run("get_range", key, || self.inner.get_range(key, start, len))
            .await
    }
    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        self.run("head", key, || self.inner.head(key)).await
    }
    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        self.run("list", prefix, || self.inner.list(prefix)).await
    }
    async fn delete(&self, key: &str) -> StorageResult<()> {
        self.run("delete", key, || self.inner.delete(key)).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}
