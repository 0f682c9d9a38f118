//! `drctl expire [--dry-run]`: apply the `[retention]` policy under the repository lock.

use serde_json::json;

use super::{Ctx, Output};
use crate::error::{Error, Result};
use crate::repo::lock::RepoLock;
use crate::retention;

pub async fn run(ctx: &Ctx, args: &crate::cli::ExpireArgs) -> Result<Output> {
    let repo = ctx.repo().await?;
    let timeout = humantime::parse_duration(&args.lock_timeout)
        .map_err(|e| Error::Usage(format!("--lock-timeout {:?}: {e}", args.lock_timeout)))?;
    // The plan is made under the lock too, so a dry run shows what a real run would do now.
    // A real run deletes, so it also waits for readers (restores, verify) to finish.
    let lock = if args.dry_run {
        RepoLock::acquire(&repo, "expire --dry-run", timeout).await?
    } else {
        RepoLock::acquire_excluding_readers(&repo, "expire", timeout).await?
    };
    let result = async {
        let plan = retention::plan(
            &repo,
            &ctx.config.retention,
            ctx.config.wal.segment_size(),
            crate::clock::now(),
        )
        .await?;
        let deleted = if args.dry_run {
            0
        } else {
            retention::execute(&lock, &plan).await?
        };
        Ok::<_, Error>((plan, deleted))
    }
    .await;
    lock.release().await?;
    let (plan, deleted) = result?;
    let mut lines = Vec::new();
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    for id in &plan.backups {
        lines.push(format!("{verb} backup {id}"));
    }
    lines.push(format!(
        "{verb} {} WAL objects, {} leftover objects, {} history records",
        plan.wal.len(),
        plan.leftovers.len(),
        plan.history.len()
    ));
    lines.push(format!(
        "kept {} backups: {}",
        plan.kept.len(),
        plan.kept.join(", ")
    ));
    for n in &plan.notes {
        lines.push(format!("note: {n}"));
    }
    Ok(Output::ok(
        json!({"dry_run": args.dry_run, "plan": plan, "deleted_objects": deleted}),
        lines.join("\n"),
    ))
}
