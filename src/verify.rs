//! Verification: re-read every object of every (or one) backup and check size and SHA-256
//! against its manifest. Problems are collected, never short-circuited, so one run names every
//! bad, missing or truncated object.

use serde::Serialize;

use crate::error::Result;
use crate::pipeline;
use crate::progress::Progress;
use crate::repo::Manifest;
use crate::repo::Repo;
use crate::wal::continuity::Archive;
use crate::wal::{Segment, WalName};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    Missing,
    Truncated,
    ChecksumMismatch,
    ManifestCorrupt,
    Unreadable,
    /// A WAL segment a physical backup needs is missing from the archive.
    WalGap,
}

/// WAL coverage of one physical backup.
#[derive(Debug, Clone, Serialize)]
pub struct WalVerdict {
    pub start_wal: String,
    pub stop_wal: String,
    pub timelines: Vec<u32>,
    pub last_contiguous: Option<String>,
    pub gaps: Vec<String>,
    /// Earliest time a PITR from this backup can stop at (the backup's consistency point).
    pub recoverable_from: chrono::DateTime<chrono::Utc>,
    /// Latest: when the newest contiguous WAL segment was archived.
    pub recoverable_to: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObjectProblem {
    pub backup: String,
    pub key: String,
    pub problem: Problem,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupVerdict {
    pub id: String,
    pub objects: usize,
    pub bytes: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalVerdict>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub backups: Vec<BackupVerdict>,
    pub problems: Vec<ObjectProblem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Classifies a failed read by its message (the verifier's wording is ours, see pipeline).
fn classify(err: &str) -> Problem {
    if err.contains("truncated")
        || err.contains("wrong size")
        || err.contains("larger than recorded")
    {
        Problem::Truncated
    } else {
        Problem::ChecksumMismatch
    }
}

/// Verifies under a read lease: an expire running meanwhile would make deleted objects look
/// missing.
pub async fn verify(repo: &Repo, only: Option<&str>) -> Result<VerifyReport> {
    crate::repo::lock::reading(repo, "verify", verify_all(repo, only)).await
}

async fn verify_all(repo: &Repo, only: Option<&str>) -> Result<VerifyReport> {
    let mut report = VerifyReport {
        backups: Vec::new(),
        problems: Vec::new(),
    };
    let entries = match only {
        Some(id) => {
            // A named backup must exist; a corrupt manifest is a finding, not an error.
            match repo.load_manifest(id).await {
                Ok(m) => vec![crate::repo::CatalogEntry {
                    id: id.to_string(),
                    manifest: Ok(m),
                }],
                Err(crate::error::Error::Corruption(msg)) => vec![crate::repo::CatalogEntry {
                    id: id.to_string(),
                    manifest: Err(msg),
                }],
                Err(e) => return Err(e),
            }
        }
        None => repo.catalog().await?,
    };
    let total = entries
        .iter()
        .filter_map(|e| e.manifest.as_ref().ok())
        .flat_map(|m| m.objects())
        .map(|o| o.raw_size)
        .sum();
    let progress = Progress::bytes("verify", Some(total));
    let mut archive: Option<Archive> = None;
    for entry in entries {
        let manifest = match entry.manifest {
            Ok(m) => m,
            Err(msg) => {
                report.problems.push(ObjectProblem {
                    backup: entry.id.clone(),
                    key: Repo::manifest_key(&entry.id),
                    problem: Problem::ManifestCorrupt,
                    detail: msg,
                });
                report.backups.push(BackupVerdict {
                    id: entry.id,
                    objects: 0,
                    bytes: 0,
                    ok: false,
                    wal: None,
                });
                continue;
            }
        };
        let before = report.problems.len();
        let objects = manifest.objects();
        let bytes = objects.iter().map(|o| o.stored_size).sum();
        // Group by stored object: a bundle is read once and all its members checked in memory.
        let mut groups: std::collections::BTreeMap<&str, Vec<&crate::pipeline::ObjectRecord>> =
            Default::default();
        for o in &objects {
            groups.entry(o.key.as_str()).or_default().push(o);
        }
        for (rel, members) in groups {
            let key = repo.key(rel);
            let mut push = |problem: Problem, detail: String| {
                report.problems.push(ObjectProblem {
                    backup: manifest.id.clone(),
                    key: rel.to_string(),
                    problem,
                    detail,
                })
            };
            if members.len() == 1 && members[0].offset.is_none() {
                let obj = members[0];
                match repo.storage().head(&key).await {
                    Ok(None) => push(Problem::Missing, "object does not exist".into()),
                    Err(e) => push(Problem::Unreadable, e.to_string()),
                    Ok(Some(meta)) if meta.size < obj.stored_size => push(
                        Problem::Truncated,
                        format!("stored size {} < recorded {}", meta.size, obj.stored_size),
                    ),
                    Ok(Some(meta)) if meta.size > obj.stored_size => push(
                        Problem::ChecksumMismatch,
                        format!("stored size {} > recorded {}", meta.size, obj.stored_size),
                    ),
                    Ok(Some(_)) => {
                        if let Err(msg) =
                            pipeline::check(&**repo.storage(), &key, obj, &progress).await
                        {
                            push(classify(&msg), msg);
                        }
                    }
                }
                continue;
            }
            match crate::storage::get_bytes(&**repo.storage(), &key).await {
                Err(crate::storage::StorageError::NotFound(_)) => push(
                    Problem::Missing,
                    format!("bundle of {} files does not exist", members.len()),
                ),
                Err(e) => push(Problem::Unreadable, e.to_string()),
                Ok(bundle) => {
                    for m in members {
                        if let Err(msg) = pipeline::unpack_member(&bundle, rel, m).await {
                            push(classify(&msg), msg);
                        }
                        progress.inc(m.raw_size);
                    }
                }
            }
        }
        let wal = match &manifest.physical {
            Some(p) => {
                if archive.is_none() {
                    archive = Some(Archive::load(repo, p.wal_segment_size).await?);
                }
                let v = wal_verdict(repo, archive.as_ref().unwrap(), &manifest).await?;
                for g in &v.gaps {
                    report.problems.push(ObjectProblem {
                        backup: manifest.id.clone(),
                        key: format!("wal/{}/{g}", &g[..16.min(g.len())]),
                        problem: Problem::WalGap,
                        detail: format!("WAL segment {g} is missing: point-in-time recovery from this backup cannot pass it"),
                    });
                }
                Some(v)
            }
            None => None,
        };
        report.backups.push(BackupVerdict {
            id: manifest.id.clone(),
            objects: objects.len(),
            bytes,
            ok: report.problems.len() == before,
            wal,
        });
    }
    Ok(report)
}

/// Checks the WAL chain of a physical backup and its recoverable window.
async fn wal_verdict(repo: &Repo, archive: &Archive, m: &Manifest) -> Result<WalVerdict> {
    let p = m.physical.as_ref().expect("physical");
    let seg_size = p.wal_segment_size;
    let start = Segment::parse(&p.start_wal, seg_size)
        .ok_or_else(|| crate::error::Error::Corruption(format!("{}: bad start_wal", m.id)))?;
    let stop = Segment::parse(&p.stop_wal, seg_size)
        .ok_or_else(|| crate::error::Error::Corruption(format!("{}: bad stop_wal", m.id)))?;
    let chain = archive.chain(start, Some(stop))?;
    let recoverable_to = match (chain.ok(), chain.last_segment) {
        (true, Some(last)) => {
            let key = repo.key(&WalName::Segment(last).key(seg_size));
            crate::wal::archive::read_header(repo, &key)
                .await
                .ok()
                .map(|h| h.pushed_at)
        }
        _ => None,
    };
    Ok(WalVerdict {
        start_wal: p.start_wal.clone(),
        stop_wal: p.stop_wal.clone(),
        timelines: chain.timelines.clone(),
        last_contiguous: chain.last_contiguous.clone(),
        gaps: chain.gaps.clone(),
        recoverable_from: m.finished_at,
        recoverable_to,
    })
}
