//! `drctl agent [--schedules DIR] [--listen ADDR] [--stop-timeout D] [--check]`.

use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Ctx, Output};
use crate::agent::{Agent, clock_from_env};
use crate::cli::{AgentArgs, table};
use crate::error::{Error, Result};
use crate::schedule::{self, Planner};

/// Cancels `token` on the first SIGTERM or SIGINT; a second one ends the process at once.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot install signal handlers; signals end drctl at once");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!("{name} received: stopping cleanly (send it again to quit at once)");
        token.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        eprintln!(
            "drctl: second signal: quitting now; a backup in progress is left for `drctl expire` to clean"
        );
        std::process::exit(crate::error::ExitCode::Interrupted.code());
    });
}

pub async fn run(ctx: &Ctx, args: &AgentArgs) -> Result<Output> {
    let config_path = ctx
        .config_path
        .clone()
        .or_else(|| std::env::var_os("DRCTL_CONFIG").map(Into::into))
        .unwrap_or_else(|| crate::config::DEFAULT_CONFIG_PATH.into());
    let jobs = schedule::load(&ctx.config.jobs, &config_path, args.schedules.as_deref())?;
    if jobs.is_empty() {
        return Err(Error::Config(format!(
            "no jobs to run: add [[job]] tables to {} or pass --schedules DIR",
            config_path.display()
        )));
    }
    let stop_timeout = humantime::parse_duration(&args.stop_timeout)
        .map_err(|e| Error::Usage(format!("--stop-timeout {:?}: {e}", args.stop_timeout)))?;
    let clock = clock_from_env();

    if args.check {
        let planner = Planner::new(&jobs, clock.now());
        let rows: Vec<Vec<String>> = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| {
                vec![
                    j.name().to_string(),
                    j.job.cron.clone(),
                    j.job.run.join(" "),
                    planner
                        .next_start(i)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_else(|| "never".into()),
                ]
            })
            .collect();
        let list: Vec<serde_json::Value> = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| {
                json!({
                    "name": j.name(),
                    "cron": j.job.cron,
                    "run": j.job.run,
                    "timeout_seconds": j.timeout.as_secs_f64(),
                    "jitter_seconds": j.jitter.as_secs_f64(),
                    "catch_up": j.job.catch_up,
                    "source": j.source,
                    "next_run": planner.next_start(i).map(|t| t.to_rfc3339()),
                })
            })
            .collect();
        return Ok(Output::ok(
            json!({"ok": true, "jobs": list}),
            table(&["JOB", "CRON (UTC)", "RUN", "NEXT"], &rows),
        ));
    }

    // Bind before anything runs, so a taken port is an error now, not a silent gap in metrics.
    let listener = match &args.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Usage(format!("--listen {addr}: cannot listen there: {e}")))?,
        ),
        None => None,
    };
    if let Some(l) = &listener {
        tracing::info!(address = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics and /health");
    }
    let repo = ctx.repo().await?;
    let agent = Arc::new(Agent::new(
        jobs,
        ctx.config.clone(),
        ctx.config_path.clone(),
        repo,
        clock,
    ));
    let summary = agent
        .run(ctx.cancel.clone(), stop_timeout, listener)
        .await?;
    let total: u64 = summary.runs.values().flat_map(|m| m.values()).sum();
    Ok(Output::ok(
        serde_json::to_value(&summary).unwrap_or_default(),
        format!("agent stopped after {total} run(s)"),
    ))
}
