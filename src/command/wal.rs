//! `drctl wal push|fetch|prefetch|check`: PostgreSQL's archive_command and restore_command.

use std::path::Path;
use std::process::Stdio;

use serde_json::json;

use super::{Ctx, Output};
use crate::error::{Error, ExitCode, Result};
use crate::wal::archive::{self, FetchError, PushOutcome};
use crate::wal::prefetch::{self, Spool};
use crate::wal::{Segment, WalName};

/// `archive_command = 'drctl --config FILE wal push %p'`: exits 0 only once durable.
pub async fn push(ctx: &Ctx, path: &Path) -> Result<Output> {
    let repo = ctx.repo().await?;
    let seg_size = ctx.config.wal.segment_size();
    let outcome = archive::push(&repo, path, &ctx.config.wal_compression(), seg_size).await?;
    if outcome == PushOutcome::AlreadyArchived {
        tracing::info!(file = %path.display(), "already archived with identical content");
    }
    Ok(Output::ok(
        json!({"file": path.display().to_string(), "outcome": outcome}),
        String::new(),
    ))
}

/// `restore_command = 'drctl --config FILE wal fetch %f %p'`.
/// Exit 0: delivered, verified. Exit 1: not in the archive (normal at its end).
/// Exit 200: anything else; PostgreSQL then aborts recovery instead of promoting early.
pub async fn fetch(ctx: &Ctx, name: &str, dest: &Path) -> Result<Output> {
    let seg_size = ctx.config.wal.segment_size();
    let fail = |msg: String| {
        tracing::error!("wal fetch {name}: {msg}");
        eprintln!("drctl: wal fetch {name} FAILED, recovery must stop: {msg}");
        Ok(Output {
            json: json!({"name": name, "ok": false, "error": msg}),
            human: String::new(),
            exit: ExitCode::WalFetchFailed,
        })
    };
    let wal = match WalName::parse(name, seg_size) {
        Ok(w) => w,
        Err(e) => return fail(e.to_string()),
    };
    let repo = match ctx.repo().await {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    let spool = Spool::new(&crate::restore::logical::spool_dir(&ctx.config)?, &repo);
    if let WalName::Segment(seg) = wal
        && spool.take(name, dest).await
    {
        spawn_prefetch(ctx, seg.next(), seg_size);
        return Ok(Output::ok(
            json!({"name": name, "ok": true, "from": "spool"}),
            String::new(),
        ));
    }
    match archive::read_verified(&repo, &wal, seg_size).await {
        Ok(bytes) => {
            archive::write_atomically(dest, &bytes).await?;
            if let WalName::Segment(seg) = wal {
                spawn_prefetch(ctx, seg.next(), seg_size);
            }
            Ok(Output::ok(
                json!({"name": name, "ok": true, "from": "repository"}),
                String::new(),
            ))
        }
        Err(FetchError::NotFound) => Ok(Output {
            json: json!({"name": name, "ok": false, "found": false}),
            human: String::new(),
            exit: ExitCode::Failure,
        }),
        Err(FetchError::Failed(e)) => fail(e.to_string()),
    }
}

/// Starts a detached `drctl wal prefetch` for the segments after the one just served.
fn spawn_prefetch(ctx: &Ctx, from: Segment, seg_size: u64) {
    if ctx.config.wal.prefetch == 0 {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    if let Some(p) = &ctx.config_path {
        cmd.arg("--config").arg(p);
    }
    cmd.args(["wal", "prefetch", &from.name(seg_size)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Its own session: PostgreSQL must not wait for it, nor signal it with the startup process.
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    if let Err(e) = cmd.spawn() {
        tracing::debug!(error = %e, "could not start prefetcher");
    }
}

/// `drctl wal prefetch FIRST`: fills the spool (started by `wal fetch`).
pub async fn prefetch(ctx: &Ctx, first: &str) -> Result<Output> {
    let seg_size = ctx.config.wal.segment_size();
    let seg = Segment::parse(first, seg_size)
        .ok_or_else(|| Error::Usage(format!("{first:?} is not a WAL segment name")))?;
    let repo = ctx.repo().await?;
    let spool = Spool::new(&crate::restore::logical::spool_dir(&ctx.config)?, &repo);
    let n = prefetch::run(
        &repo,
        &spool,
        seg,
        ctx.config.wal.prefetch,
        ctx.config.wal.prefetch_parallel,
        seg_size,
    )
    .await?;
    Ok(Output::ok(
        json!({"prefetched": n}),
        format!("prefetched {n} segments"),
    ))
}
