//! `drctl backup --type logical|physical`.

use serde_json::json;

use super::{Ctx, Output};
use crate::backup::logical::{self, LogicalOptions};
use crate::cli::{BackupArgs, BackupType, human_bytes};
use crate::error::Result;
use crate::repo::lock::RepoLock;

pub async fn run(ctx: &Ctx, args: &BackupArgs) -> Result<Output> {
    let repo = ctx.repo().await?;
    let timeout = humantime::parse_duration(&args.lock_timeout).map_err(|e| {
        crate::error::Error::Usage(format!("--lock-timeout {:?}: {e}", args.lock_timeout))
    })?;
    let what = format!(
        "backup --type {}",
        if args.kind == BackupType::Logical {
            "logical"
        } else {
            "physical"
        }
    );
    let lock = tokio::select! {
        l = RepoLock::acquire(&repo, &what, timeout) => l?,
        _ = ctx.cancel.cancelled() => {
            return Err(crate::error::Error::Interrupted(
                "stopped while waiting for the repository lock; nothing was written".into(),
            ));
        }
    };
    let out = run_locked(ctx, args, &repo, &lock).await;
    lock.release().await?;
    out
}

async fn run_locked(
    ctx: &Ctx,
    args: &BackupArgs,
    repo: &crate::repo::Repo,
    lock: &RepoLock,
) -> Result<Output> {
    match args.kind {
        BackupType::Logical => {
            let opts = LogicalOptions {
                databases: args.databases.clone(),
                skip_row_counts: args.no_row_counts,
            };
            let m = logical::run(&ctx.config, repo, lock, &opts, &ctx.cancel).await?;
            let secs = (m.finished_at - m.started_at).num_milliseconds() as f64 / 1000.0;
            Ok(Output::ok(
                json!({
                    "id": m.id,
                    "type": "logical",
                    "databases": m.database_names(),
                    "started_at": m.started_at.to_rfc3339(),
                    "finished_at": m.finished_at.to_rfc3339(),
                    "size": m.raw_size(),
                    "stored_size": m.stored_size(),
                    "duration_seconds": secs,
                }),
                m.id.clone(),
            ))
            .map(|mut o| {
                tracing::info!(
                    "backup {}: {} databases, {} -> {} in {secs:.1}s",
                    m.id,
                    m.databases.len(),
                    human_bytes(m.raw_size()),
                    human_bytes(m.stored_size())
                );
                o.human = m.id;
                o
            })
        }
        BackupType::Physical => {
            let m = crate::backup::physical::run(&ctx.config, repo, lock, args.jobs, &ctx.cancel)
                .await?;
            let p = m.physical.as_ref().expect("physical manifest");
            let secs = (m.finished_at - m.started_at).num_milliseconds() as f64 / 1000.0;
            Ok(Output::ok(
                json!({
                    "id": m.id,
                    "type": "physical",
                    "started_at": m.started_at.to_rfc3339(),
                    "finished_at": m.finished_at.to_rfc3339(),
                    "size": m.raw_size(),
                    "stored_size": m.stored_size(),
                    "duration_seconds": secs,
                    "start_lsn": p.start_lsn,
                    "stop_lsn": p.stop_lsn,
                    "timeline": p.timeline,
                    "start_wal": p.start_wal,
                    "stop_wal": p.stop_wal,
                    "files": p.files.len(),
                }),
                m.id.clone(),
            ))
        }
    }
}
