//! `drctl list`: the backups in the repository.

use serde_json::json;

use super::{Ctx, Output};
use crate::cli::{human_bytes, table};
use crate::error::Result;

pub async fn run(ctx: &Ctx) -> Result<Output> {
    let repo = ctx.repo().await?;
    let catalog = repo.catalog().await?;
    let mut items = Vec::new();
    let mut rows = Vec::new();
    for e in &catalog {
        match &e.manifest {
            Ok(m) => {
                let physical = m.physical.as_ref().map(|p| {
                    json!({
                        "start_lsn": p.start_lsn,
                        "stop_lsn": p.stop_lsn,
                        "timeline": p.timeline,
                        "start_wal": p.start_wal,
                        "stop_wal": p.stop_wal,
                        "wal_segment_size": p.wal_segment_size,
                        "files": p.files.len(),
                    })
                });
                items.push(json!({
                    "physical": physical,
                    "id": m.id,
                    "type": m.kind.to_string(),
                    "databases": m.database_names(),
                    "started_at": m.started_at.to_rfc3339(),
                    "finished_at": m.finished_at.to_rfc3339(),
                    "size": m.raw_size(),
                    "stored_size": m.stored_size(),
                    "status": "ok",
                    "pg_version": m.pg_version,
                    "system_identifier": m.system_identifier,
                    "compression": m.compression.algorithm,
                }));
                rows.push(vec![
                    m.id.clone(),
                    m.kind.to_string(),
                    m.finished_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    human_bytes(m.raw_size()),
                    human_bytes(m.stored_size()),
                    match &m.physical {
                        Some(p) => format!("tl {} {}..{}", p.timeline, p.start_lsn, p.stop_lsn),
                        None => m.database_names().join(","),
                    },
                    "ok".into(),
                ]);
            }
            Err(err) => {
                items.push(json!({
                    "id": e.id, "type": null, "databases": [], "started_at": null,
                    "finished_at": null, "size": 0, "stored_size": 0,
                    "status": "manifest-corrupt", "error": err,
                }));
                rows.push(vec![
                    e.id.clone(),
                    "?".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "MANIFEST CORRUPT".into(),
                ]);
            }
        }
    }
    let human = if rows.is_empty() {
        format!(
            "no backups in stanza {} ({})",
            repo.stanza(),
            repo.storage().describe()
        )
    } else {
        table(
            &[
                "ID",
                "TYPE",
                "FINISHED (UTC)",
                "SIZE",
                "STORED",
                "DATABASES / WAL",
                "STATUS",
            ],
            &rows,
        )
    };
    Ok(Output::ok(serde_json::Value::Array(items), human))
}
