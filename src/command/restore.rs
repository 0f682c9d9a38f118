//! `drctl restore --logical ...` and `drctl restore --pitr ...`.

use super::{Ctx, Output};
use crate::cli::{ArchiveModeArg, RestoreArgs};
use crate::error::{Error, Result};
use crate::pg::Endpoint;
use crate::restore::logical::{self, LogicalRestoreOptions};
use crate::restore::physical::{self, ArchiveMode, PitrOptions, Target};
use crate::wal::Lsn;

pub async fn run(ctx: &Ctx, args: &RestoreArgs) -> Result<Output> {
    if args.logical {
        return run_logical(ctx, args).await;
    }
    run_pitr(ctx, args).await
}

async fn run_logical(ctx: &Ctx, args: &RestoreArgs) -> Result<Output> {
    let need = |v: &Option<String>, flag: &str| {
        v.clone()
            .ok_or_else(|| Error::Usage(format!("restore --logical needs {flag}")))
    };
    let database = need(&args.database, "--database NAME")?;
    let target_database = need(&args.target_database, "--target-database NEW")?;
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
        database,
        target_database,
        target,
        jobs: args.jobs.unwrap_or(1),
        clean: args.clean,
        no_owner: args.no_owner,
    };
    let r = logical::run(&ctx.config, &repo, &opts).await?;
    let human = format!(
        "restored {} from backup {} into database {:?} on {} (fetch+verify {:.1}s, pg_restore {:.1}s)",
        r.database, r.backup, r.target_database, r.target, r.fetch_seconds, r.restore_seconds
    );
    Ok(Output::ok(
        serde_json::to_value(&r).unwrap_or_default(),
        human,
    ))
}

/// The config file that restore_command should name.
pub fn config_path_for_children(ctx: &Ctx) -> std::path::PathBuf {
    ctx.config_path
        .clone()
        .or_else(|| std::env::var_os("DRCTL_CONFIG").map(std::path::PathBuf::from))
        .unwrap_or_else(|| crate::config::DEFAULT_CONFIG_PATH.into())
}

async fn run_pitr(ctx: &Ctx, args: &RestoreArgs) -> Result<Output> {
    let target = match (
        &args.pitr,
        &args.target_lsn,
        &args.target_xid,
        &args.target_name,
    ) {
        (Some(t), None, None, None) => Target::parse_time(t)?,
        (None, Some(l), None, None) => Target::Lsn(Lsn::parse(l)?),
        (None, None, Some(x), None) => Target::Xid(x.clone()),
        (None, None, None, Some(n)) => Target::Name(n.clone()),
        _ => {
            return Err(Error::Usage(
                "give exactly one of --pitr, --target-lsn, --target-xid, --target-name".into(),
            ));
        }
    };
    let target_dir = args
        .target_dir
        .clone()
        .ok_or_else(|| Error::Usage("point-in-time restore needs --target-dir DIR".into()))?;
    let target_dir =
        std::path::absolute(&target_dir).map_err(|e| Error::io("resolve --target-dir", e))?;
    let timeout = humantime::parse_duration(&args.timeout)
        .map_err(|e| Error::Usage(format!("--timeout {:?}: {e}", args.timeout)))?;
    let repo = ctx.repo().await?;
    let opts = PitrOptions {
        target,
        target_dir,
        port: args.target_port,
        socket_dir: args.socket_dir.clone(),
        backup: Some(args.backup.clone()),
        no_start: args.no_start,
        archive_mode: match args.archive_mode {
            ArchiveModeArg::Preserve => ArchiveMode::Preserve,
            ArchiveModeArg::Off => ArchiveMode::Off,
        },
        jobs: args
            .jobs
            .map(|j| j as usize)
            .unwrap_or(ctx.config.backup.jobs),
        timeout,
        config_path: config_path_for_children(ctx),
        extra_conf: String::new(),
    };
    let r = physical::run(&ctx.config, &repo, &opts).await?;
    let mut lines = vec![format!(
        "restored backup {} to {} into {}",
        r.backup, r.target, r.target_dir
    )];
    if r.started {
        lines.push(format!(
            "PostgreSQL is promoted and open{}{} (timeline {})",
            r.port.map(|p| format!(" on port {p}")).unwrap_or_default(),
            r.socket_dir
                .as_ref()
                .map(|s| format!(", socket {s}"))
                .unwrap_or_default(),
            r.timeline
                .map(|t| t.to_string())
                .unwrap_or_else(|| "?".into())
        ));
    } else {
        lines.push(
            "not started (--no-start): start it with pg_ctl as the data directory's owner".into(),
        );
    }
    let rows: Vec<Vec<String>> = r
        .stages
        .iter()
        .map(|s| vec![s.name.clone(), format!("{:.2}s", s.seconds)])
        .collect();
    lines.push(crate::cli::table(&["STAGE", "TIME"], &rows));
    lines.push(format!("total {:.2}s", r.total_seconds));
    Ok(Output::ok(
        serde_json::to_value(&r).unwrap_or_default(),
        lines.join("\n"),
    ))
}
