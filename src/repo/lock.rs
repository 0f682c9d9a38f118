//! The repository lock: one writer at a time for backup and expire, and read leases that keep
//! expire away from what a restore or verify is reading.
//!
//! The lock is an object `<stanza>/locks/repo.lock` created with put-if-absent, holding who
//! took it (host, pid, command), since when, and a lease that a heartbeat extends. A lock whose
//! holder is a dead pid on this host, or whose lease ran out, is stale: it is taken over and
//! the takeover is logged. A live lock makes the caller wait up to its timeout, then fail
//! naming the holder. Destructive operations take a `&RepoLock`, so they cannot be called
//! without holding it. `wal push` never locks: put-if-absent already makes it safe.
//!
//! Readers (restore, verify, drills) do not exclude each other or a backup, which only adds.
//! Each writes its own lease `locks/readers/<token>.json`, with the same heartbeat and the same
//! staleness rules. Expire takes the lock with [`RepoLock::acquire_excluding_readers`]: it
//! then waits until no live reader is left. A reader announces itself first and looks at the
//! lock second; expire takes the lock first and lists the readers second. So whichever comes
//! second sees the other: a reader that finds expire holding the lock withdraws its lease
//! and waits, and an expire that finds a reader waits for it.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::Repo;
use crate::error::{Error, Result};
use crate::storage::{self, PutMode, StorageError};

pub const LOCK_KEY: &str = "locks/repo.lock";
/// Where read leases live, one object each.
pub const READERS_PREFIX: &str = "locks/readers/";
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
    /// Set by expire: readers must not start while it holds the lock.
    #[serde(default)]
    pub excludes_readers: bool,
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

    fn new(command: &str, excludes_readers: bool) -> Holder {
        let now = Utc::now();
        Holder {
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
            excludes_readers,
        }
    }

    fn body(&self) -> Result<Bytes> {
        serde_json::to_vec_pretty(self)
            .map(Bytes::from)
            .map_err(|e| Error::Failed(e.to_string()))
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
    /// Takes the lock, waiting up to `timeout` for a live holder to finish. Readers go on.
    pub async fn acquire(repo: &Repo, command: &str, timeout: Duration) -> Result<RepoLock> {
        Self::take(repo, command, false, &mut Patience::new(timeout)).await
    }

    /// Takes the lock, then waits (within the same `timeout`) until no live reader is left;
    /// new readers wait while it is held. For expire, which deletes what readers read.
    pub async fn acquire_excluding_readers(
        repo: &Repo,
        command: &str,
        timeout: Duration,
    ) -> Result<RepoLock> {
        let mut patience = Patience::new(timeout);
        let lock = Self::take(repo, command, true, &mut patience).await?;
        loop {
            let readers = live_readers(repo).await?;
            if readers.is_empty() {
                return Ok(lock);
            }
            let who = readers
                .iter()
                .map(Holder::describe)
                .collect::<Vec<_>>()
                .join(", ");
            let why = format!(
                "the repository (stanza {}) is being read by {who}",
                repo.stanza()
            );
            if let Err(e) = patience.wait(why).await {
                lock.release().await?;
                return Err(e);
            }
        }
    }

    async fn take(
        repo: &Repo,
        command: &str,
        excludes_readers: bool,
        patience: &mut Patience,
    ) -> Result<RepoLock> {
        let key = repo.key(LOCK_KEY);
        loop {
            let holder = Holder::new(command, excludes_readers);
            match storage::put_bytes(&**repo.storage(), &key, holder.body()?, PutMode::IfAbsent)
                .await
            {
                Ok(_) => {
                    let heartbeat = Some(spawn_heartbeat(repo.clone(), key, holder.clone()));
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
            let Some(h) = live_holder(repo).await? else {
                continue; // released or taken over meanwhile
            };
            patience
                .wait(format!(
                    "the repository (stanza {}) is locked by {}",
                    repo.stanza(),
                    h.describe()
                ))
                .await?;
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

/// How often a waiter looks again.
const POLL: Duration = Duration::from_millis(500);

/// A wait with a deadline: one warning when it starts, a [`Error::Locked`] when it runs out.
struct Patience {
    deadline: tokio::time::Instant,
    timeout: Duration,
    announced: bool,
}

impl Patience {
    fn new(timeout: Duration) -> Patience {
        Patience {
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
            announced: false,
        }
    }

    /// Sleeps one poll interval if time is left (saying `why` the first time), else fails
    /// with `why`.
    async fn wait(&mut self, why: String) -> Result<()> {
        let limit = humantime::format_duration(self.timeout);
        if tokio::time::Instant::now() >= self.deadline {
            return Err(Error::Locked(format!("{why}; waited {limit}")));
        }
        if !self.announced {
            tracing::warn!("{why}; waiting up to {limit}");
            self.announced = true;
        }
        tokio::time::sleep(POLL).await;
        Ok(())
    }
}

/// The live holder of the lock, if any; a stale lock is deleted (and the takeover logged).
async fn live_holder(repo: &Repo) -> Result<Option<Holder>> {
    let key = repo.key(LOCK_KEY);
    let current = match storage::get_bytes(&**repo.storage(), &key).await {
        Ok(b) => serde_json::from_slice::<Holder>(&b).ok(),
        Err(StorageError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match current {
        Some(h) if !h.is_stale(Utc::now()) => Ok(Some(h)),
        stale => {
            let who = stale
                .map(|h| h.describe())
                .unwrap_or_else(|| "an unreadable lock".into());
            tracing::warn!("taking over a stale repository lock held by {who}");
            repo.storage().delete(&key).await?;
            Ok(None)
        }
    }
}

/// The live read leases; stale ones (dead pid here, lease run out) are deleted and logged.
async fn live_readers(repo: &Repo) -> Result<Vec<Holder>> {
    let mut live = Vec::new();
    for o in repo.storage().list(&repo.key(READERS_PREFIX)).await? {
        let holder = match storage::get_bytes(&**repo.storage(), &o.key).await {
            Ok(b) => serde_json::from_slice::<Holder>(&b).ok(),
            Err(StorageError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        match holder {
            Some(h) if !h.is_stale(Utc::now()) => live.push(h),
            stale => {
                let who = stale
                    .map(|h| h.describe())
                    .unwrap_or_else(|| "an unreadable lease".into());
                tracing::warn!("removing the stale read lease of {who}");
                repo.storage().delete(&o.key).await?;
            }
        }
    }
    Ok(live)
}

/// Proof that this process is reading the repository: expire does not run while it lives.
/// Call [`ReadLease::release`] when done; a lease that is only dropped goes stale within
/// [`LEASE`] (at once for a dead process on the same host).
#[derive(Debug)]
pub struct ReadLease {
    repo: Repo,
    key: String,
    heartbeat: Option<JoinHandle<()>>,
}

impl ReadLease {
    /// Announces a reader, waiting up to `timeout` while an expire holds the lock.
    pub async fn acquire(repo: &Repo, command: &str, timeout: Duration) -> Result<ReadLease> {
        let mut patience = Patience::new(timeout);
        loop {
            let holder = Holder::new(command, false);
            let key = repo.key(&format!("{READERS_PREFIX}{}.json", holder.token));
            storage::put_bytes(&**repo.storage(), &key, holder.body()?, PutMode::IfAbsent).await?;
            // Announced first, looked second: an expire that took the lock before our lease
            // was written may not have seen it, so step back and let it finish.
            let expire = match live_holder(repo).await {
                Ok(h) => h.filter(|h| h.excludes_readers),
                Err(e) => {
                    let _ = repo.storage().delete(&key).await;
                    return Err(e);
                }
            };
            let Some(h) = expire else {
                let heartbeat = Some(spawn_heartbeat(repo.clone(), key.clone(), holder));
                return Ok(ReadLease {
                    repo: repo.clone(),
                    key,
                    heartbeat,
                });
            };
            repo.storage().delete(&key).await?;
            patience
                .wait(format!(
                    "the repository (stanza {}) is locked by {}, which deletes what a reader needs",
                    repo.stanza(),
                    h.describe()
                ))
                .await?;
        }
    }

    /// Removes the lease. A failure is only logged: the lease goes stale by itself.
    pub async fn release(mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if let Err(e) = self.repo.storage().delete(&self.key).await {
            tracing::warn!(key = %self.key, error = %e, "could not remove the read lease");
        }
    }
}

/// How long a reader waits for an expire that holds the lock.
pub const READ_WAIT: Duration = Duration::from_secs(600);

/// Runs `work` holding a read lease named `command`, so that expire does not delete what it
/// reads; waits up to [`READ_WAIT`] for a running expire first.
pub async fn reading<T>(
    repo: &Repo,
    command: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let lease = ReadLease::acquire(repo, command, READ_WAIT).await?;
    let r = work.await;
    lease.release().await;
    r
}

impl Drop for ReadLease {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

/// Extends the lease at `key` while it is still ours (same token).
fn spawn_heartbeat(repo: Repo, key: String, mut holder: Holder) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEASE / 3).await;
            holder.lease_until = Utc::now() + chrono::Duration::from_std(LEASE).unwrap_or_default();
            let Ok(body) = holder.body() else {
                continue;
            };
            // Only extend a lock that is still ours.
            match storage::get_bytes(&**repo.storage(), &key).await {
                Ok(b)
                    if serde_json::from_slice::<Holder>(&b)
                        .is_ok_and(|h| h.token == holder.token) =>
                {
                    if let Err(e) =
                        storage::put_bytes(&**repo.storage(), &key, body, PutMode::Overwrite).await
                    {
                        tracing::warn!(error = %e, "could not extend the repository lock lease");
                    }
                }
                _ => {
                    tracing::error!(key = %key, "the repository lock or lease was taken from this process");
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
