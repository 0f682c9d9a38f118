//! `drctl plan run FILE [--health-only|--backup-only|--test-only]` and `drctl drill`.

use std::path::Path;

use serde_json::json;

use super::{Ctx, Output};
use crate::cli::table;
use crate::error::{ExitCode, Result};
use crate::repo::history;
use crate::restore::executor::{self, Mode, PlanReport, RunOptions};
use crate::restore::plan::Plan;

/// The plan a drill runs when none is given: PITR latest into scratch, then prove it opens.
pub const DEFAULT_DRILL_PLAN: &str = r#"
name = "default-drill"
[target]
kind = "scratch"
[restore]
pitr = "latest"
[[stage]]
name = "assessment"
kind = "health"
timeout = "5m"
  [[stage.check]]
  type = "repository"
  [[stage.check]]
  type = "wal-continuity"
[[stage]]
name = "database-recovery"
kind = "backup"
timeout = "1h"
[[stage]]
name = "validation"
kind = "test"
timeout = "15m"
  [[stage.check]]
  type = "connect"
  [[stage.check]]
  type = "sql"
  database = "postgres"
  query = "SELECT pg_is_in_recovery()"
  expect = { equals = false }
"#;

pub async fn run(ctx: &Ctx, file: &Path, mode: Mode) -> Result<Output> {
    let plan = Plan::load(file)?;
    let repo = ctx.repo().await?;
    let opts = RunOptions {
        mode,
        drill: false,
        config_path: super::restore::config_path_for_children(ctx),
    };
    let report = executor::run(&ctx.config, &repo, &plan, &opts).await?;
    if let Err(e) = history::record(&repo, "plan", report.started_at, &plan.name, &report).await {
        tracing::warn!(error = %e, "could not record the plan run in history");
    }
    Ok(render(&report))
}

pub async fn drill(ctx: &Ctx, file: Option<&Path>, report_path: Option<&Path>) -> Result<Output> {
    let plan = match file {
        Some(f) => Plan::load(f)?,
        None => Plan::parse(DEFAULT_DRILL_PLAN, Path::new("(built-in drill plan)"))?,
    };
    drill_plan(ctx, &plan, report_path).await
}

/// Runs `plan` as a drill: scratch target, history record, optional report.
pub async fn drill_plan(ctx: &Ctx, plan: &Plan, report_path: Option<&Path>) -> Result<Output> {
    let plan = plan.clone();
    let repo = ctx.repo().await?;
    let opts = RunOptions {
        mode: Mode::All,
        drill: true,
        config_path: super::restore::config_path_for_children(ctx),
    };
    let report = executor::run(&ctx.config, &repo, &plan, &opts).await?;
    let key = history::record(&repo, "drill", report.started_at, &plan.name, &report).await?;
    tracing::info!(history = %key, "drill recorded");
    if let Some(p) = report_path {
        let past: Vec<PlanReport> = history::load(&repo, "drill", 24).await.unwrap_or_default();
        crate::report::write(p, &report, &past)?;
    }
    Ok(render(&report))
}

fn render(r: &PlanReport) -> Output {
    let mut rows = Vec::new();
    for s in &r.stages {
        rows.push(vec![
            s.name.clone(),
            s.kind.clone(),
            format!("{:?}", s.status).to_lowercase(),
            format!("{:.2}s", s.seconds),
            s.message.clone(),
        ]);
        for c in &s.checks {
            rows.push(vec![
                format!("  {}", c.name),
                c.kind.clone(),
                format!("{:?}", c.status).to_lowercase(),
                format!("{:.2}s", c.seconds),
                c.message.chars().take(110).collect(),
            ]);
        }
    }
    let mut text = vec![
        format!(
            "plan {} ({}) against {}",
            r.plan,
            serde_json::to_value(r.mode)
                .unwrap_or_default()
                .as_str()
                .unwrap_or(""),
            r.target
        ),
        table(
            &["STAGE / CHECK", "KIND", "STATUS", "TIME", "DETAIL"],
            &rows,
        ),
    ];
    if let Some(b) = &r.backup {
        text.push(format!(
            "backup used: {b}; restored to: {}",
            r.restored_to.clone().unwrap_or_default()
        ));
    }
    match r.rto_seconds {
        Some(rto) => text.push(format!(
            "RTO measured: {rto:.1}s against a target of {:.0}s: {}",
            r.rto_target_seconds,
            if r.rto_met == Some(true) {
                "MET"
            } else {
                "VIOLATED"
            }
        )),
        None if r.drill || r.mode == Mode::All => text
            .push("RTO: not measured (the plan did not reach a validated, open database)".into()),
        None => {}
    }
    text.push(if r.ok {
        "result: PASSED".into()
    } else {
        "result: FAILED".into()
    });
    let mut json = serde_json::to_value(r).unwrap_or_default();
    json["rto_seconds"] = json!(r.rto_seconds);
    Output {
        json,
        human: text.join("\n"),
        exit: if r.ok {
            ExitCode::Ok
        } else {
            ExitCode::CheckFailed
        },
    }
}
