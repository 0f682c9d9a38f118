//! `drctl status [--json] [--prometheus]`: do the recovery objectives hold right now?
//!
//! RPO exposure comes from the server and the repository (or the repository alone when the
//! server is down); the RTO comes from the last successful drill. Exit 0: every objective met;
//! 10: one is violated; 11: one is unproven (no successful drill within `drill-max-age`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use super::{Ctx, Output};
use crate::cli::{human_bytes, table};
use crate::error::{ExitCode, Result};
use crate::pg::Endpoint;
use crate::repo::history;
use crate::restore::executor::PlanReport;
use crate::validate::{self, newest_backups};
use crate::wal::WalName;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Met,
    Violated,
    Unproven,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub now: DateTime<Utc>,
    pub rpo_target_seconds: f64,
    /// Age of the oldest change not yet in the repository (upper bound); None if unknown.
    pub rpo_seconds: Option<f64>,
    pub rpo_source: String,
    pub rpo: Verdict,
    pub rto_target_seconds: f64,
    pub rto_seconds: Option<f64>,
    pub last_drill_at: Option<DateTime<Utc>>,
    pub last_drill_age_seconds: Option<f64>,
    pub rto: Verdict,
    pub backups: Vec<serde_json::Value>,
    /// Verify runs that found a problem, among those the history keeps.
    pub verify_failures: u64,
    pub last_verify_at: Option<DateTime<Utc>>,
    pub last_verify_ok: Option<bool>,
    pub notes: Vec<String>,
}

pub async fn compute(ctx: &Ctx) -> Result<Status> {
    let now = crate::clock::now();
    let obj = &ctx.config.objectives;
    let repo = ctx.repo().await?;
    let mut notes = Vec::new();

    // RPO: from the server when it answers, else from the newest archived segment.
    let ep = Endpoint::from_config(&ctx.config.postgres);
    let (rpo_seconds, rpo_source) =
        match validate::rpo_exposure(&ep, &ctx.config.postgres.database, now).await {
            Ok(st) if st.archive_mode != "off" => {
                if st
                    .last_failed_at
                    .is_some_and(|f| st.last_archived_at.is_none_or(|a| f > a))
                {
                    notes.push(format!(
                        "archiving is failing: last failure on {}",
                        st.last_failed
                    ));
                }
                (
                    if st.exposure == Duration::MAX {
                        None
                    } else {
                        Some(st.exposure.as_secs_f64())
                    },
                    "server".to_string(),
                )
            }
            Ok(_) => {
                notes.push("archive_mode is off on the server: nothing is archived".into());
                (None, "server".into())
            }
            Err(e) => {
                notes.push(format!(
                    "server unreachable ({e}); RPO from the repository alone"
                ));
                (
                    newest_wal_age(&repo, &ctx.config, now).await?,
                    "repository".into(),
                )
            }
        };
    let rpo_target = obj.rpo();
    let rpo = match rpo_seconds {
        Some(s) if s <= rpo_target.as_secs_f64() => Verdict::Met,
        _ => Verdict::Violated,
    };

    // RTO: the last successful drill.
    let drills: Vec<PlanReport> = history::load(&repo, "drill", 50).await?;
    let last_ok = drills.iter().find(|d| d.ok && d.rto_seconds.is_some());
    let rto_target = obj.rto();
    let (rto_seconds, last_drill_at) = match last_ok {
        Some(d) => (d.rto_seconds, Some(d.finished_at)),
        None => (None, None),
    };
    let age = last_drill_at.map(|t| (now - t).num_milliseconds() as f64 / 1000.0);
    let rto = match (rto_seconds, age) {
        (Some(r), Some(a)) if a <= obj.drill_max_age().as_secs_f64() => {
            if r <= rto_target.as_secs_f64() {
                Verdict::Met
            } else {
                Verdict::Violated
            }
        }
        _ => {
            notes.push(format!(
                "no successful drill within {}: the RTO is unproven (run `drctl drill`)",
                obj.drill_max_age
            ));
            Verdict::Unproven
        }
    };

    let backups = newest_backups(&repo)
        .await?
        .iter()
        .map(|m| {
            json!({
                "type": m.kind.to_string(),
                "id": m.id,
                "finished_at": m.finished_at.to_rfc3339(),
                "age_seconds": (now - m.finished_at).num_seconds(),
                "size": m.raw_size(),
                "stored_size": m.stored_size(),
                "duration_seconds": (m.finished_at - m.started_at).num_milliseconds() as f64 / 1000.0,
            })
        })
        .collect();
    let verifies: Vec<super::verify::VerifyRecord> = history::load(&repo, "verify", 10_000).await?;
    let verify_failures = verifies.iter().filter(|v| !v.ok).count() as u64;
    if let Some(v) = verifies.first().filter(|v| !v.ok) {
        notes.push(format!(
            "the last verify ({}) found {} problem(s): run `drctl verify` and read what it names",
            v.at.to_rfc3339(),
            v.problems
        ));
    }
    Ok(Status {
        now,
        rpo_target_seconds: rpo_target.as_secs_f64(),
        rpo_seconds,
        rpo_source,
        rpo,
        rto_target_seconds: rto_target.as_secs_f64(),
        rto_seconds,
        last_drill_at,
        last_drill_age_seconds: age,
        rto,
        backups,
        verify_failures,
        last_verify_at: verifies.first().map(|v| v.at),
        last_verify_ok: verifies.first().map(|v| v.ok),
        notes,
    })
}

/// Upper bound of the RPO exposure when the server is unreachable: time since the newest
/// archived segment was pushed.
async fn newest_wal_age(
    repo: &crate::repo::Repo,
    cfg: &crate::config::Config,
    now: DateTime<Utc>,
) -> Result<Option<f64>> {
    let seg_size = cfg.wal.segment_size();
    let objs = repo.storage().list(&repo.key("wal/")).await?;
    let newest = objs
        .iter()
        .filter(|o| {
            matches!(
                WalName::parse(o.key.rsplit('/').next().unwrap_or(""), seg_size),
                Ok(WalName::Segment(_))
            )
        })
        .max_by(|a, b| a.key.rsplit('/').next().cmp(&b.key.rsplit('/').next()));
    let Some(o) = newest else { return Ok(None) };
    let h = crate::wal::archive::read_header(repo, &o.key).await?;
    Ok(Some((now - h.pushed_at).num_milliseconds() as f64 / 1000.0))
}

pub async fn run(ctx: &Ctx, prometheus: bool) -> Result<Output> {
    let st = compute(ctx).await?;
    let exit = if st.rpo == Verdict::Violated || st.rto == Verdict::Violated {
        ExitCode::ObjectiveViolated
    } else if st.rpo == Verdict::Unproven || st.rto == Verdict::Unproven {
        ExitCode::ObjectiveUnproven
    } else {
        ExitCode::Ok
    };
    let human = if prometheus {
        prometheus_text(&st)
    } else {
        human(&st)
    };
    Ok(Output {
        json: serde_json::to_value(&st).unwrap_or_default(),
        human,
        exit,
    })
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.1}s"))
        .unwrap_or_else(|| "unknown".into())
}

fn human(st: &Status) -> String {
    let v = |x: Verdict| format!("{x:?}").to_uppercase();
    let mut out = vec![table(
        &["OBJECTIVE", "TARGET", "CURRENT", "VERDICT", "SOURCE"],
        &[
            vec![
                "RPO".into(),
                format!("{:.0}s", st.rpo_target_seconds),
                secs(st.rpo_seconds),
                v(st.rpo),
                st.rpo_source.clone(),
            ],
            vec![
                "RTO".into(),
                format!("{:.0}s", st.rto_target_seconds),
                secs(st.rto_seconds),
                v(st.rto),
                st.last_drill_at
                    .map(|t| format!("drill {}", t.to_rfc3339()))
                    .unwrap_or_else(|| "no drill".into()),
            ],
        ],
    )];
    let rows: Vec<Vec<String>> = st
        .backups
        .iter()
        .map(|b| {
            vec![
                b["type"].as_str().unwrap_or("").into(),
                b["id"].as_str().unwrap_or("").into(),
                format!("{}s ago", b["age_seconds"]),
                human_bytes(b["size"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push(table(&["NEWEST BACKUP", "ID", "AGE", "SIZE"], &rows));
    }
    for n in &st.notes {
        out.push(format!("note: {n}"));
    }
    out.join("\n\n")
}

/// The same figures in Prometheus text format (for node_exporter's textfile collector).
pub fn prometheus_text(st: &Status) -> String {
    let mut o = String::new();
    let mut g = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        o += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n");
        for (labels, v) in samples {
            o += &format!("{name}{labels} {v}\n");
        }
    };
    // Families are always announced; a sample appears only when its value is known (no
    // drill yet, server unreachable), so alerts can tell "absent" from "zero".
    let known = |v: Option<f64>| {
        v.map(|x| (String::new(), x))
            .into_iter()
            .collect::<Vec<_>>()
    };
    g(
        "drctl_rpo_seconds",
        "Age of the oldest change not yet archived (upper bound).",
        known(st.rpo_seconds),
    );
    g(
        "drctl_wal_archive_lag_seconds",
        "WAL archive lag.",
        known(st.rpo_seconds),
    );
    g(
        "drctl_rpo_target_seconds",
        "RPO objective.",
        vec![(String::new(), st.rpo_target_seconds)],
    );
    g(
        "drctl_rto_target_seconds",
        "RTO objective.",
        vec![(String::new(), st.rto_target_seconds)],
    );
    g(
        "drctl_rto_last_drill_seconds",
        "RTO measured by the last successful drill.",
        known(st.rto_seconds),
    );
    g(
        "drctl_drill_last_success_timestamp_seconds",
        "When the last successful drill finished.",
        known(st.last_drill_at.map(|t| t.timestamp() as f64)),
    );
    let b = |x: Verdict| if x == Verdict::Met { 0.0 } else { 1.0 };
    g(
        "drctl_objective_violated",
        "1 if the objective is violated or unproven.",
        vec![
            ("{objective=\"rpo\"}".into(), b(st.rpo)),
            ("{objective=\"rto\"}".into(), b(st.rto)),
        ],
    );
    let mut ts = Vec::new();
    let mut dur = Vec::new();
    let mut size = Vec::new();
    for bk in &st.backups {
        let l = format!("{{type=\"{}\"}}", bk["type"].as_str().unwrap_or(""));
        if let Some(t) = bk["finished_at"]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        {
            ts.push((l.clone(), t.timestamp() as f64));
        }
        dur.push((l.clone(), bk["duration_seconds"].as_f64().unwrap_or(0.0)));
        size.push((l, bk["size"].as_u64().unwrap_or(0) as f64));
    }
    o += "# HELP drctl_verify_failures_total Verify runs that found corrupt, missing or truncated objects (kept history).\n# TYPE drctl_verify_failures_total counter\n";
    o += &format!("drctl_verify_failures_total {}\n", st.verify_failures);
    if let Some(t) = st.last_verify_at {
        o += "# HELP drctl_verify_last_run_timestamp_seconds When verify last ran.\n# TYPE drctl_verify_last_run_timestamp_seconds gauge\n";
        o += &format!(
            "drctl_verify_last_run_timestamp_seconds {}\n",
            t.timestamp()
        );
    }
    let mut g = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        o += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n");
        for (labels, v) in samples {
            o += &format!("{name}{labels} {v}\n");
        }
    };
    g(
        "drctl_backup_last_success_timestamp_seconds",
        "When the newest backup of each type finished.",
        ts,
    );
    g(
        "drctl_backup_duration_seconds",
        "Duration of the newest backup of each type.",
        dur,
    );
    g(
        "drctl_backup_size_bytes",
        "Raw size of the newest backup of each type.",
        size,
    );
    o
}
