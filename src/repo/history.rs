//! History records: what ran and what it measured (drills with their RTO, plan runs), kept in
//! the repository so the record survives the host. `history/<kind>/<time>-<name>.json`, sealed
//! like manifests.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Repo, manifest};
use crate::error::Result;
use crate::storage::{self, PutMode};

/// Writes one record; returns its key.
pub async fn record<T: Serialize>(
    repo: &Repo,
    kind: &str,
    at: DateTime<Utc>,
    name: &str,
    value: &T,
) -> Result<String> {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let rel = format!(
        "history/{kind}/{}-{safe}.json",
        at.format("%Y%m%dT%H%M%S%.3fZ")
    );
    let body = manifest::seal(value)?;
    storage::put_bytes(
        &**repo.storage(),
        &repo.key(&rel),
        Bytes::from(body),
        PutMode::Overwrite,
    )
    .await?;
    Ok(rel)
}

/// Loads the newest `limit` records of a kind, newest first. Unreadable records are skipped
/// with a warning.
pub async fn load<T: DeserializeOwned>(repo: &Repo, kind: &str, limit: usize) -> Result<Vec<T>> {
    let mut objs = repo
        .storage()
        .list(&repo.key(&format!("history/{kind}/")))
        .await?;
    objs.sort_by(|a, b| b.key.cmp(&a.key));
    let mut out = Vec::new();
    for o in objs.into_iter().take(limit) {
        match storage::get_bytes(&**repo.storage(), &o.key).await {
            Ok(b) => match manifest::open_envelope::<T>(&b, &o.key) {
                Ok(v) => out.push(v),
                Err(e) => {
                    tracing::warn!(key = %o.key, error = %e, "skipping unreadable history record")
                }
            },
            Err(e) => {
                tracing::warn!(key = %o.key, error = %e, "skipping unreadable history record")
            }
        }
    }
    Ok(out)
}
