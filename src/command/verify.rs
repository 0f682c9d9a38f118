//! `drctl verify [BACKUP_ID]`: exits 0 only if every object matches its manifest.

use super::{Ctx, Output};
use crate::cli::{human_bytes, table};
use crate::error::{ExitCode, Result};
use crate::verify;

/// One verify run, as kept in `history/verify/`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VerifyRecord {
    pub at: chrono::DateTime<chrono::Utc>,
    pub ok: bool,
    pub backup: Option<String>,
    pub backups: usize,
    pub problems: usize,
}

pub async fn run(ctx: &Ctx, backup: Option<&str>) -> Result<Output> {
    let repo = ctx.repo().await?;
    let report = verify::verify(&repo, backup).await?;
    let mut lines = Vec::new();
    let rows: Vec<Vec<String>> = report
        .backups
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.objects.to_string(),
                human_bytes(b.bytes),
                if b.ok { "ok".into() } else { "FAILED".into() },
            ]
        })
        .collect();
    if rows.is_empty() {
        lines.push("no backups to verify".to_string());
    } else {
        lines.push(table(&["BACKUP", "OBJECTS", "STORED", "RESULT"], &rows));
    }
    for b in &report.backups {
        if let Some(w) = &b.wal {
            lines.push(format!(
                "{}: WAL {} .. {} on timeline(s) {:?}; recoverable from {} to {}",
                b.id,
                w.start_wal,
                w.last_contiguous.clone().unwrap_or_else(|| "(none)".into()),
                w.timelines,
                w.recoverable_from.to_rfc3339(),
                w.recoverable_to
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "(unknown)".into())
            ));
        }
    }
    for p in &report.problems {
        lines.push(format!(
            "{}: {} {:?}: {}",
            p.backup, p.key, p.problem, p.detail
        ));
    }
    let ok = report.ok();
    // The record feeds `drctl status` and drctl_verify_failures_total; losing it must not
    // hide the verdict, so a failure to write it is only a warning.
    let rec = VerifyRecord {
        at: crate::clock::now(),
        ok,
        backup: backup.map(str::to_string),
        backups: report.backups.len(),
        problems: report.problems.len(),
    };
    if let Err(e) = crate::repo::history::record(&repo, "verify", rec.at, "verify", &rec).await {
        tracing::warn!(error = %e, "could not record the verify run in the history");
    }
    Ok(Output {
        json: serde_json::json!({ "ok": ok, "backups": report.backups, "problems": report.problems }),
        human: lines.join("\n"),
        exit: if ok {
            ExitCode::Ok
        } else {
            ExitCode::Corruption
        },
    })
}
