//! Verification: re-read every object of every (or one) backup and check size and SHA-256
//! against its manifest. Problems are collected, never short-circuited, so one run names every
//! bad, missing or truncated object.

use serde::Serialize;

use crate::error::Result;
use crate::pipeline;
use crate::repo::Repo;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    Missing,
    Truncated,
    ChecksumMismatch,
    ManifestCorrupt,
    Unreadable,
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
    if err.contains("truncated") || err.contains("wrong size") || err.contains("larger than recorded") {
        Problem::Truncated
    } else {
        Problem::ChecksumMismatch
    }
}

pub async fn verify(repo: &Repo, only: Option<&str>) -> Result<VerifyReport> {
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
                });
                continue;
            }
        };
        let before = report.problems.len();
        let mut bytes = 0;
        let objects = manifest.objects();
        for obj in &objects {
            let key = repo.key(&obj.key);
            bytes += obj.stored_size;
            let res = match repo.storage().head(&key).await {
                Ok(None) => Err((Problem::Missing, "object does not exist".to_string())),
                Err(e) => Err((Problem::Unreadable, e.to_string())),
                Ok(Some(meta)) if meta.size < obj.stored_size => Err((
                    Problem::Truncated,
                    format!("stored size {} < recorded {}", meta.size, obj.stored_size),
                )),
                Ok(Some(meta)) if meta.size > obj.stored_size => Err((
                    Problem::ChecksumMismatch,
                    format!("stored size {} > recorded {}", meta.size, obj.stored_size),
                )),
                Ok(Some(_)) => match pipeline::check(&**repo.storage(), &key, obj).await {
                    Ok(()) => Ok(()),
                    Err(msg) => Err((classify(&msg), msg)),
                },
            };
            if let Err((problem, detail)) = res {
                report.problems.push(ObjectProblem {
                    backup: manifest.id.clone(),
                    key: obj.key.clone(),
                    problem,
                    detail,
                });
            }
        }
        report.backups.push(BackupVerdict {
            id: manifest.id.clone(),
            objects: objects.len(),
            bytes,
            ok: report.problems.len() == before,
        });
    }
    Ok(report)
}

