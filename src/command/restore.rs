//! `drctl restore --logical ...`.

use super::{Ctx, Output};
use crate::cli::RestoreArgs;
use crate::error::Result;
use crate::pg::Endpoint;
use crate::restore::logical::{self, LogicalRestoreOptions};

pub async fn run(ctx: &Ctx, args: &RestoreArgs) -> Result<Output> {
    let repo = ctx.repo().await?;
    let mut target = Endpoint::from_config(&ctx.config.postgres);
    if let Some(h) = &args.target_host {
        target.host = h.clone();
    }
    if let Some(p) = args.target_port {
        target.port = p;
    }
    let opts = LogicalRestoreOptions {
        backup: Some(args.backup.clone()),
        database: args.database.clone(),
        target_database: args.target_database.clone(),
        target,
        jobs: args.jobs,
        clean: args.clean,
        no_owner: args.no_owner,
    };
    let r = logical::run(&ctx.config, &repo, &opts).await?;
    let human = format!(
        "restored {} from backup {} into database {:?} on {} (fetch+verify {:.1}s, pg_restore {:.1}s)",
        r.database, r.backup, r.target_database, r.target, r.fetch_seconds, r.restore_seconds
    );
    Ok(Output::ok(serde_json::to_value(&r).unwrap_or_default(), human))
}
