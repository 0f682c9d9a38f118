//! Fault-injection decorator for tests: makes chosen operations fail, or corrupts reads,
//! around any real driver. Enabled from the environment (`DRCTL_FAULT`) so that tests can
//! inject faults into a drctl process that PostgreSQL itself spawns (e.g. `restore_command`).
//!
//! `DRCTL_FAULT` is a comma-separated list of `op:substring` rules; an operation (`get`, `put`,
//! `head`, `list`, `delete`) whose key contains the substring fails with an injected,
//! retryable error. `op:*` matches every key. `delay-put:substring` does not fail: it holds a
//! matching put for two seconds first, which makes a backup slow enough to interrupt.

use async_trait::async_trait;

use super::{BoxRead, DynStorage, ObjectMeta, PutMode, Storage, StorageError, StorageResult};

#[derive(Debug)]
pub struct Fault {
    inner: DynStorage,
    rules: Vec<(String, String)>,
}

impl Fault {
    pub fn new(inner: DynStorage, spec: &str) -> Fault {
        let rules = spec
            .split(',')
            .filter_map(|r| {
                let (op, pat) = r.trim().split_once(':')?;
                Some((op.to_string(), pat.to_string()))
            })
            .collect();
        Fault { inner, rules }
    }

    fn check(&self, op: &str, key: &str) -> StorageResult<()> {
        for (o, pat) in &self.rules {
            if o == op && matches(pat, key) {
                return Err(StorageError::Injected(format!("{op} {key}")));
            }
        }
        Ok(())
    }
}

fn matches(pat: &str, key: &str) -> bool {
    pat == "*" || key.contains(pat)
}

#[async_trait]
impl Storage for Fault {
    async fn put(&self, key: &str, body: BoxRead, mode: PutMode) -> StorageResult<u64> {
        self.check("put", key)?;
        if self
            .rules
            .iter()
            .any(|(o, pat)| o == "delay-put" && matches(pat, key))
        {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
        self.inner.put(key, body, mode).await
    }
    async fn get(&self, key: &str) -> StorageResult<BoxRead> {
        self.check("get", key)?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, start: u64, len: u64) -> StorageResult<BoxRead> {
        self.check("get", key)?;
        self.inner.get_range(key, start, len).await
    }
    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        self.check("head", key)?;
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        self.check("list", prefix)?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> StorageResult<()> {
        self.check("delete", key)?;
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}
