//! The repository: key layout, repo.json, manifests and the catalog of backups.
//!
//! ```text
//! <stanza>/repo.json
//! <stanza>/backups/<id>/...            data objects of one backup
//! <stanza>/backups/<id>/manifest.json  written LAST: a backup exists iff its manifest exists
//! <stanza>/wal/<timeline+log>/<segment>
//! <stanza>/history/<kind>/<time>-<id>.json
//! ```

pub mod history;
pub mod lock;
pub mod manifest;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::{self, DynStorage, PutMode, StorageError};
pub use manifest::{BackupKind, Manifest};

pub const REPO_FORMAT: u32 = 1;

/// `repo.json`: what this stanza is. Never holds keys or secrets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoInfo {
    pub format: u32,
    pub stanza: String,
    /// PostgreSQL system identifier of the cluster this stanza protects.
    pub system_identifier: String,
    pub pg_version: String,
    pub created_at: DateTime<Utc>,
}

/// A repository: a storage plus a stanza.
#[derive(Debug, Clone)]
pub struct Repo {
    storage: DynStorage,
    stanza: String,
}

impl Repo {
    pub fn new(storage: DynStorage, stanza: &str) -> Repo {
        Repo {
            storage,
            stanza: stanza.to_string(),
        }
    }

    pub fn storage(&self) -> &DynStorage {
        &self.storage
    }

    pub fn stanza(&self) -> &str {
        &self.stanza
    }

    /// Full storage key for a key relative to the stanza.
    pub fn key(&self, rel: &str) -> String {
        format!("{}/{}", self.stanza, rel)
    }

    pub fn backup_prefix(id: &str) -> String {
        format!("backups/{id}/")
    }

    pub fn manifest_key(id: &str) -> String {
        format!("backups/{id}/manifest.json")
    }

    /// Reads `repo.json`, if the stanza has been created.
    pub async fn info(&self) -> Result<Option<RepoInfo>> {
        match storage::get_bytes(&*self.storage, &self.key("repo.json")).await {
            Ok(b) => {
                let info = manifest::open_envelope::<RepoInfo>(&b, "repo.json")?;
                Ok(Some(info))
            }
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the stanza on first use, or checks that it belongs to this cluster. Refusing a
    /// different system identifier stops two clusters from mixing WAL in one stanza.
    pub async fn ensure_stanza(
        &self,
        system_identifier: &str,
        pg_version: &str,
    ) -> Result<RepoInfo> {
        if let Some(info) = self.info().await? {
            return check_identity(&info, system_identifier);
        }
        let info = RepoInfo {
            format: REPO_FORMAT,
            stanza: self.stanza.clone(),
            system_identifier: system_identifier.to_string(),
            pg_version: pg_version.to_string(),
            created_at: Utc::now(),
        };
        let body = manifest::seal(&info)?;
        match storage::put_bytes(
            &*self.storage,
            &self.key("repo.json"),
            Bytes::from(body),
            PutMode::IfAbsent,
        )
        .await
        {
            Ok(_) => Ok(info),
            // Someone created it concurrently: theirs wins, check it.
            Err(StorageError::AlreadyExists(_)) => {
                let existing = self
                    .info()
                    .await?
                    .ok_or_else(|| Error::Failed("repo.json vanished".into()))?;
                check_identity(&existing, system_identifier)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every backup id that has any object, with or without manifest.
    pub async fn backup_ids_with_objects(&self) -> Result<Vec<String>> {
        let objs = self.storage.list(&self.key("backups/")).await?;
        let mut ids: Vec<String> = objs
            .iter()
            .filter_map(|o| {
                let rel = o.key.strip_prefix(&format!("{}/backups/", self.stanza))?;
                rel.split('/').next().map(str::to_string)
            })
            .collect();
        ids.dedup();
        Ok(ids)
    }

    /// Loads every committed backup (those with a manifest), oldest first. A manifest that
    /// fails its own checksum is reported as an error entry, not skipped silently.
    pub async fn catalog(&self) -> Result<Vec<CatalogEntry>> {
        let objs = self.storage.list(&self.key("backups/")).await?;
        let mut out = Vec::new();
        for o in objs {
            let Some(rel) = o.key.strip_prefix(&format!("{}/", self.stanza)) else {
                continue;
            };
            let parts: Vec<&str> = rel.split('/').collect();
            if parts.len() == 3 && parts[2] == "manifest.json" {
                let id = parts[1].to_string();
                match self.load_manifest(&id).await {
                    Ok(m) => out.push(CatalogEntry {
                        id,
                        manifest: Ok(m),
                    }),
                    Err(e) => out.push(CatalogEntry {
                        id,
                        manifest: Err(e.to_string()),
                    }),
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub async fn load_manifest(&self, id: &str) -> Result<Manifest> {
        let key = self.key(&Self::manifest_key(id));
        let bytes = match storage::get_bytes(&*self.storage, &key).await {
            Ok(b) => b,
            Err(StorageError::NotFound(_)) => {
                return Err(Error::NotFound(format!(
                    "backup {id} (no manifest in {})",
                    self.storage.describe()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        manifest::open_envelope::<Manifest>(&bytes, &key)
    }

    /// Writes the manifest: the commit point of a backup. Never overwrites.
    pub async fn commit_manifest(&self, m: &Manifest) -> Result<()> {
        let body = manifest::seal(m)?;
        storage::put_bytes(
            &*self.storage,
            &self.key(&Self::manifest_key(&m.id)),
            Bytes::from(body),
            PutMode::IfAbsent,
        )
        .await?;
        Ok(())
    }

    /// Deletes every object of a backup that was never committed (best effort, logged).
    /// Destructive: only the holder of the repository lock may call it.
    pub async fn discard_uncommitted(&self, _lock: &lock::RepoLock, id: &str) {
        match self.storage.list(&self.key(&Self::backup_prefix(id))).await {
            Ok(objs) => {
                for o in objs {
                    if o.key.ends_with("/manifest.json") {
                        continue;
                    }
                    if let Err(e) = self.storage.delete(&o.key).await {
                        tracing::warn!(key = %o.key, error = %e, "could not remove object of failed backup");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(backup = id, error = %e, "could not list objects of failed backup")
            }
        }
    }

    /// Picks a fresh backup id for `kind` at `now`, bumping the second if it is taken.
    pub async fn new_backup_id(&self, kind: BackupKind, now: DateTime<Utc>) -> Result<String> {
        let mut t = now;
        for _ in 0..120 {
            let id = format!("{}-{}", t.format("%Y%m%dT%H%M%SZ"), kind.suffix());
            if self
                .storage
                .list(&self.key(&Self::backup_prefix(&id)))
                .await?
                .is_empty()
            {
                return Ok(id);
            }
            t += chrono::Duration::seconds(1);
        }
        Err(Error::Failed("could not find a free backup id".into()))
    }

    /// Resolves `latest` (newest committed backup matching `filter`) or checks an explicit id.
    pub async fn resolve(
        &self,
        id: Option<&str>,
        filter: impl Fn(&Manifest) -> bool,
    ) -> Result<Manifest> {
        match id {
            Some(id) if id != "latest" => {
                let m = self.load_manifest(id).await?;
                if !filter(&m) {
                    return Err(Error::Usage(format!(
                        "backup {id} is not of the kind this command needs ({})",
                        m.kind
                    )));
                }
                Ok(m)
            }
            _ => {
                let cat = self.catalog().await?;
                cat.into_iter()
                    .rev()
                    .filter_map(|e| e.manifest.ok())
                    .find(|m| filter(m))
                    .ok_or_else(|| {
                        Error::NotFound(format!("no matching backup in stanza {}", self.stanza))
                    })
            }
        }
    }
}

fn check_identity(info: &RepoInfo, system_identifier: &str) -> Result<RepoInfo> {
    if info.system_identifier != system_identifier {
        return Err(Error::Conflict(format!(
            "stanza {} belongs to the cluster with system identifier {}, but this cluster's is {}; \
             use another stanza name for this cluster",
            info.stanza, info.system_identifier, system_identifier
        )));
    }
    Ok(info.clone())
}

/// One backup in the catalog.
#[derive(Debug)]
pub struct CatalogEntry {
    pub id: String,
    pub manifest: std::result::Result<Manifest, String>,
}
