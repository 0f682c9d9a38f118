//! The repository lock: one writer at a time for backup and expire.
//!
//! The lock is an object `<stanza>/locks/repo.lock` created with put-if-absent, holding who
//! took it (host, pid, command), since when, and a lease that a heartbeat extends. A lock whose
//! holder is a dead pid on this host, or whose lease ran out, is stale: it is taken over and
//! the takeover is logged. A live lock makes the caller wait up to its timeout, then fail
//! naming the holder. Destructive operations take a `&RepoLock`, so they cannot be called
//! without holding it. `wal push` never locks: put-if-absent already makes it safe.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::Repo;
use crate::error::{Error, Result};
use crate::storage::{self, PutMode, StorageError};

pub const LOCK_KEY: &str = "locks/repo.lock";
/// How long a lease lasts without a heartbeat.
pub const LEASE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub command: String,
    pub token: String,
    pub started_at: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
}

impl Holder {
    fn describe(&self) -> String {
        format!(
            "`{}` (pid {} on {}, since {}, lease until {})",
            self.command,
            self.pid,
            self.host,
            self.started_at.to_rfc3339(),
            self.lease_until.to_rfc3339()
        )
    }

    /// Stale: its lease ran out, or it is a dead process on this very host.
    fn is_stale(&self, now: DateTime<Utc>) -> bool {
        if self.lease_until < now {
            return true;
        }
        if self.host == crate::backup::logical::hostname() {
            // SAFETY: kill with signal 0 only checks for existence.
            let alive = unsafe { libc::kill(self.pid as i32, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            return !alive;
        }
        false
    }
}

/// Proof that this process holds the repository lock. Dropping it stops the heartbeat; call
/// [`RepoLock::release`] to remove the lock object.
#[derive(Debug)]
pub struct RepoLock {
    repo: Repo,
    holder: Holder,
    heartbeat: Option<JoinHandle<()>>,
}

impl RepoLock {
    /// Takes the lock, waiting up to `timeout` for a live holder to finish.
    pub async fn acquire(repo: &Repo, command: &str, timeout: Duration) -> Result<RepoLock> {
        let key = repo.key(LOCK_KEY);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut announced = false;
        loop {
            let now = Utc::now();
            let holder = Holder {
                host: crate::backup::logical::hostname(),
                pid: std::process::id(),
                command: command.to_string(),
                token: format!(
                    "{}-{}-{}",
                    std::process::id(),
                    now.timestamp_nanos_opt().unwrap_or(0),
                    rand_u32()
                ),
                started_at: now,
                lease_until: now + chrono::Duration::from_std(LEASE).unwrap_or_default(),
            };
            let body =
                serde_json::to_vec_pretty(&holder).map_err(|e| Error::Failed(e.to_string()))?;
            match storage::put_bytes(
                &**repo.storage(),
                &key,
                Bytes::from(body),
                PutMode::IfAbsent,
            )
            .await
            {
                Ok(_) => {
                    let heartbeat = Some(spawn_heartbeat(repo.clone(), holder.clone()));
                    return Ok(RepoLock {
                        repo: repo.clone(),
                        holder,
                        heartbeat,
                    });
                }
                Err(StorageError::AlreadyExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
            // Someone holds it: stale or live?
            let current = match storage::get_bytes(&**repo.storage(), &key).await {
                Ok(b) => serde_json::from_slice::<Holder>(&b).ok(),
                Err(StorageError::NotFound(_)) => continue, // released meanwhile
                Err(e) => return Err(e.into()),
            };
            match current {
                Some(h) if !h.is_stale(Utc::now()) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Locked(format!(
                            "the repository (stanza {}) is locked by {}; waited {}",
                            repo.stanza(),
                            h.describe(),
                            humantime::format_duration(timeout)
                        )));
                    }
                    if !announced {
                        tracing::warn!(
                            "repository locked by {}; waiting up to {}",
                            h.describe(),
                            humantime::format_duration(timeout)
                        );
                        announced = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                stale => {
                    let who = stale
                        .map(|h| h.describe())
                        .unwrap_or_else(|| "an unreadable lock".into());
                    tracing::warn!("taking over a stale repository lock held by {who}");
                    repo.storage().delete(&key).await?;
                }
            }
        }
    }

    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// Removes the lock object if it is still ours.
    pub async fn release(mut self) -> Result<()> {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let key = self.repo.key(LOCK_KEY);
        if let Ok(b) = storage::get_bytes(&**self.repo.storage(), &key).await
            && serde_json::from_slice::<Holder>(&b).is_ok_and(|h| h.token == self.holder.token)
        {
            self.repo.storage().delete(&key).await?;
        }
        Ok(())
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

fn spawn_heartbeat(repo: Repo, mut holder: Holder) -> JoinHandle<()> {
    tokio::spawn(async move {
        let key = repo.key(LOCK_KEY);
        loop {
            tokio::time::sleep(LEASE / 3).await;
            holder.lease_until = Utc::now() + chrono::Duration::from_std(LEASE).unwrap_or_default();
            let Ok(body) = serde_json::to_vec_pretty(&holder) else {
                continue;
            };
            // Only extend a lock that is still ours.
            match storage::get_bytes(&**repo.storage(), &key).await {
                Ok(b)
                    if serde_json::from_slice::<Holder>(&b)
                        .is_ok_and(|h| h.token == holder.token) =>
                {
                    if let Err(e) = storage::put_bytes(
                        &**repo.storage(),
                        &key,
                        Bytes::from(body),
                        PutMode::Overwrite,
                    )
                    .await
                    {
                        tracing::warn!(error = %e, "could not extend the repository lock lease");
                    }
                }
                _ => {
                    tracing::error!("the repository lock was taken from this process");
                    return;
                }
            }
        }
    })
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into b.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    u32::from_le_bytes(b)
}
