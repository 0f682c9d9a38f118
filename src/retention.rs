//! Retention: which backups, WAL, leftovers and history records `drctl expire` removes.
//!
//! The plan is computed first and is exactly what a run deletes, so `--dry-run` can print it.
//! Rules: a backup is kept if it is among the newest `count` of its type or younger than `days`
//! (either keeps it); a type with neither setting is kept whole; the newest valid backup of a
//! type is never deleted. WAL is deleted only below the start segment of the oldest retained
//! physical backup (on every timeline), and never when no physical backup is retained; history
//! files are kept. Objects of a backup that has no manifest are removed once older than the
//! grace period. Deleting requires the repository lock.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;

use crate::config::RetentionConfig;
use crate::error::Result;
use crate::repo::lock::RepoLock;
use crate::repo::{BackupKind, Manifest, Repo};
use crate::wal::{Segment, WalName};

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ExpirePlan {
    /// Backup ids to delete (all their objects, manifest last).
    pub backups: Vec<String>,
    /// Backup ids kept.
    pub kept: Vec<String>,
    /// WAL object keys to delete (relative to the stanza).
    pub wal: Vec<String>,
    /// Leftover objects of uncommitted backups.
    pub leftovers: Vec<String>,
    /// History records to delete.
    pub history: Vec<String>,
    pub notes: Vec<String>,
}

/// Parses the time of a backup id or history record name (`20261203T180501Z...`,
/// `20261203T180501.123Z-...`).
pub fn time_of(name: &str) -> Option<DateTime<Utc>> {
    let stamp = name.get(..15)?;
    NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S")
        .ok()
        .map(|t| t.and_utc())
}

fn keep_set(
    all: &[&Manifest],
    count: Option<u32>,
    days: Option<u32>,
    now: DateTime<Utc>,
) -> BTreeSet<String> {
    let mut keep = BTreeSet::new();
    if count.is_none() && days.is_none() {
        keep.extend(all.iter().map(|m| m.id.clone()));
        return keep;
    }
    // Newest first.
    let mut sorted: Vec<&&Manifest> = all.iter().collect();
    sorted.sort_by(|a, b| b.id.cmp(&a.id));
    for (i, m) in sorted.iter().enumerate() {
        let by_count = count.is_some_and(|c| (i as u32) < c);
        let by_age = days.is_some_and(|d| now - m.finished_at < chrono::Duration::days(d as i64));
        if by_count || by_age || i == 0 {
            keep.insert(m.id.clone());
        }
    }
    keep
}

/// Computes what expire would delete now.
pub async fn plan(
    repo: &Repo,
    cfg: &RetentionConfig,
    seg_size_default: u64,
    now: DateTime<Utc>,
) -> Result<ExpirePlan> {
    let mut out = ExpirePlan::default();
    let catalog = repo.catalog().await?;
    let valid: Vec<Manifest> = catalog
        .iter()
        .filter_map(|e| e.manifest.as_ref().ok().cloned())
        .collect();
    let of = |k: BackupKind| valid.iter().filter(|m| m.kind == k).collect::<Vec<_>>();
    let (phys, logi) = (of(BackupKind::Physical), of(BackupKind::Logical));
    let mut keep = keep_set(&phys, cfg.full_count, cfg.full_days, now);
    keep.extend(keep_set(&logi, cfg.logical_count, cfg.logical_days, now));
    if cfg.full_count.is_none() && cfg.full_days.is_none() && !phys.is_empty() {
        out.notes
            .push("no retention for physical backups (full-count / full-days): keeping all".into());
    }
    if cfg.logical_count.is_none() && cfg.logical_days.is_none() && !logi.is_empty() {
        out.notes.push(
            "no retention for logical backups (logical-count / logical-days): keeping all".into(),
        );
    }
    for m in &valid {
        if keep.contains(&m.id) {
            out.kept.push(m.id.clone());
        } else {
            out.backups.push(m.id.clone());
        }
    }

    // WAL below the oldest retained physical backup's start segment.
    let retained_phys: Vec<&Manifest> = phys
        .iter()
        .filter(|m| keep.contains(&m.id))
        .copied()
        .collect();
    let cutoff = retained_phys
        .iter()
        .filter_map(|m| m.physical.as_ref())
        .filter_map(|p| {
            Segment::parse(&p.start_wal, p.wal_segment_size).map(|s| (s.segno, p.wal_segment_size))
        })
        .min();
    match cutoff {
        None => out
            .notes
            .push("no physical backup retained: WAL is kept".into()),
        Some((cut, seg_size)) => {
            for o in repo.storage().list(&repo.key("wal/")).await? {
                let name = o.key.rsplit('/').next().unwrap_or("");
                let seg = match WalName::parse(name, seg_size) {
                    Ok(WalName::Segment(s)) => s,
                    Ok(WalName::Other { seg, .. }) => seg,
                    _ => continue, // history files stay
                };
                if seg.segno < cut {
                    out.wal.push(
                        o.key
                            .strip_prefix(&format!("{}/", repo.stanza()))
                            .unwrap_or(&o.key)
                            .to_string(),
                    );
                }
            }
        }
    }
    let _ = seg_size_default;

    // Leftovers of backups that never committed.
    let grace = cfg
        .leftover_grace
        .as_deref()
        .and_then(|g| humantime::parse_duration(g).ok())
        .unwrap_or(Duration::from_secs(6 * 3600));
    let committed: BTreeSet<&str> = catalog.iter().map(|e| e.id.as_str()).collect();
    for id in repo.backup_ids_with_objects().await? {
        if committed.contains(id.as_str()) {
            continue;
        }
        let old = time_of(&id).is_some_and(|t| (now - t).to_std().unwrap_or_default() > grace);
        if old {
            for o in repo
                .storage()
                .list(&repo.key(&Repo::backup_prefix(&id)))
                .await?
            {
                out.leftovers.push(
                    o.key
                        .strip_prefix(&format!("{}/", repo.stanza()))
                        .unwrap_or(&o.key)
                        .to_string(),
                );
            }
        } else {
            out.notes.push(format!(
                "backup {id} has no manifest but is younger than the grace period: left alone"
            ));
        }
    }

    // History older than history-days.
    if let Some(days) = cfg.history_days {
        for o in repo.storage().list(&repo.key("history/")).await? {
            let name = o.key.rsplit('/').next().unwrap_or("");
            if time_of(name).is_some_and(|t| now - t > chrono::Duration::days(days as i64)) {
                out.history.push(
                    o.key
                        .strip_prefix(&format!("{}/", repo.stanza()))
                        .unwrap_or(&o.key)
                        .to_string(),
                );
            }
        }
    }
    out.wal.sort();
    Ok(out)
}

/// Carries out a plan. Needs the lock. A backup's manifest goes first (so a half-deleted
/// backup is never listed as valid), then its objects.
pub async fn execute(lock: &RepoLock, p: &ExpirePlan) -> Result<usize> {
    let repo = lock.repo();
    let st = repo.storage();
    let mut n = 0;
    for id in &p.backups {
        st.delete(&repo.key(&Repo::manifest_key(id))).await?;
        for o in st.list(&repo.key(&Repo::backup_prefix(id))).await? {
            st.delete(&o.key).await?;
            n += 1;
        }
        n += 1;
    }
    for k in p.wal.iter().chain(&p.leftovers).chain(&p.history) {
        st.delete(&repo.key(k)).await?;
        n += 1;
    }
    Ok(n)
}
