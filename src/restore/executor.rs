//! The stage executor: runs a plan's stages in order (or only those of one kind), each under
//! its timeout, and measures the RTO: from the start to the moment every test check has passed
//! on an open, promoted database.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::plan::{OnFailure, Plan, StageKind, TargetKind};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::pg::cluster::{TempCluster, chown_tree, process_owner};
use crate::pg::{Binaries, Endpoint};
use crate::repo::{Manifest, Repo};
use crate::restore::physical::{self, ArchiveMode, PitrOptions, Target};
use crate::validate::{self, CheckCtx, CheckResult, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    All,
    HealthOnly,
    BackupOnly,
    TestOnly,
}

impl Mode {
    fn runs(self, kind: StageKind) -> bool {
        match self {
            Mode::All => true,
            Mode::HealthOnly => kind == StageKind::Health,
            Mode::BackupOnly => kind == StageKind::Backup,
            Mode::TestOnly => kind == StageKind::Test,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageReport {
    pub name: String,
    pub kind: String,
    pub status: Status,
    pub seconds: f64,
    pub message: String,
    pub checks: Vec<CheckResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanReport {
    pub plan: String,
    pub mode: Mode,
    pub drill: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub ok: bool,
    pub target: String,
    pub backup: Option<String>,
    pub restored_to: Option<String>,
    pub stages: Vec<StageReport>,
    /// Start to every test check passed on the open, promoted database.
    pub rto_seconds: Option<f64>,
    pub rto_target_seconds: f64,
    pub rto_met: Option<bool>,
}

/// The restored cluster a plan's tests run against.
struct LiveTarget {
    endpoint: Endpoint,
    describe: String,
    /// Scratch: torn down on drop.
    /// Held only so that a scratch target is torn down when the run ends.
    _scratch: Option<Scratch>,
    restored: Option<Manifest>,
}

struct Scratch {
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    cluster: Option<TempCluster>,
    bins: Binaries,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let owner = process_owner(None, None).ok().flatten();
        let _ = physical::stop(&self.bins, owner.as_ref(), &self.data_dir, "immediate");
        drop(self.cluster.take());
        let _ = &self.dir;
    }
}

pub struct RunOptions {
    pub mode: Mode,
    /// Force a scratch target and record the run as a drill.
    pub drill: bool,
    pub config_path: PathBuf,
}

pub async fn run(cfg: &Config, repo: &Repo, plan: &Plan, opts: &RunOptions) -> Result<PlanReport> {
    let started = Instant::now();
    let started_at = crate::clock::now();
    let target_kind = if opts.drill {
        TargetKind::Scratch
    } else {
        plan.target.kind
    };
    if opts.mode == Mode::TestOnly && target_kind == TargetKind::Scratch {
        return Err(Error::Usage(format!(
            "plan {:?}: --test-only needs a restored target, but the target is `scratch` (torn down after each run); \
             use a `data-dir` target, or run the whole plan",
            plan.name
        )));
    }
    let rto_target = plan
        .rto
        .as_deref()
        .and_then(|r| humantime::parse_duration(r).ok())
        .unwrap_or_else(|| cfg.objectives.rto());

    let mut live: Option<LiveTarget> = None;
    if opts.mode == Mode::TestOnly {
        live = Some(existing_target(plan)?);
    }
    let mut reports: Vec<StageReport> = Vec::new();
    let mut aborted = false;
    let mut last_test_end: Option<Duration> = None;
    let mut backup_end: Option<Duration> = None;
    for stage in &plan.stages {
        if !opts.mode.runs(stage.kind) {
            continue;
        }
        if aborted {
            reports.push(StageReport {
                name: stage.name.clone(),
                kind: stage.kind.to_string(),
                status: Status::Skipped,
                seconds: 0.0,
                message: "skipped: an earlier stage failed with on-failure = abort".into(),
                checks: vec![],
            });
            continue;
        }
        let timeout = Plan::stage_timeout(stage);
        let t = Instant::now();
        eprintln!("--> stage {} ({})", stage.name, stage.kind);
        let fut = async {
            match stage.kind {
                StageKind::Backup => {
                    let lt = restore_into_target(cfg, repo, plan, target_kind, &opts.config_path)
                        .await?;
                    let msg = format!("restored into {}", lt.describe);
                    live = Some(lt);
                    Ok::<_, Error>((Status::Pass, msg, Vec::new()))
                }
                StageKind::Health | StageKind::Test => {
                    let ctx = CheckCtx {
                        cfg: cfg.clone(),
                        repo: repo.clone(),
                        source: Endpoint::from_config(&cfg.postgres),
                        target: live.as_ref().map(|l| l.endpoint.clone()),
                        restored: live.as_ref().and_then(|l| l.restored.clone()),
                        now: crate::clock::now(),
                        rpo: cfg.objectives.rpo(),
                    };
                    if stage.kind == StageKind::Test && ctx.target.is_none() {
                        return Ok((
                            Status::Fail,
                            "no restored target: run the backup stage first (or use a data-dir target with --test-only)".into(),
                            Vec::new(),
                        ));
                    }
                    let mut results = Vec::new();
                    for c in &stage.checks {
                        let r = validate::run(c, stage.kind, &ctx).await;
                        eprintln!(
                            "    {:<8} {}: {}",
                            format!("{:?}", r.status).to_lowercase(),
                            r.name,
                            r.message
                        );
                        results.push(r);
                    }
                    let failed = results.iter().filter(|r| r.status == Status::Fail).count();
                    let status = if failed == 0 {
                        Status::Pass
                    } else {
                        Status::Fail
                    };
                    let msg = format!("{} checks, {failed} failed", results.len());
                    Ok((status, msg, results))
                }
            }
        };
        let (status, message, checks) = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => (Status::Fail, e.to_string(), Vec::new()),
            Err(_) => (
                Status::Timeout,
                format!(
                    "stage ran past its timeout of {}",
                    humantime::format_duration(timeout)
                ),
                Vec::new(),
            ),
        };
        eprintln!(
            "    stage {}: {:?} in {:.2}s",
            stage.name,
            status,
            t.elapsed().as_secs_f64()
        );
        if status == Status::Pass {
            match stage.kind {
                StageKind::Test => last_test_end = Some(started.elapsed()),
                StageKind::Backup => backup_end = Some(started.elapsed()),
                StageKind::Health => {}
            }
        }
        if status != Status::Pass && stage.on_failure == OnFailure::Abort {
            aborted = true;
        }
        reports.push(StageReport {
            name: stage.name.clone(),
            kind: stage.kind.to_string(),
            status,
            seconds: t.elapsed().as_secs_f64(),
            message,
            checks,
        });
    }
    let ok = reports.iter().all(|r| {
        matches!(r.status, Status::Pass | Status::Skipped)
            && !r.checks.iter().any(|c| c.status == Status::Fail)
    }) && !aborted;
    // The RTO needs a restore in this run and every test passed after it.
    let restored = backup_end.is_some();
    let tests_ran = reports.iter().any(|r| r.kind == "test");
    let rto = if restored && ok {
        if tests_ran { last_test_end } else { backup_end }
    } else {
        None
    };
    let rto_seconds = rto.map(|d| d.as_secs_f64());
    let report = PlanReport {
        plan: plan.name.clone(),
        mode: opts.mode,
        drill: opts.drill,
        started_at,
        finished_at: crate::clock::now(),
        ok,
        target: live
            .as_ref()
            .map(|l| l.describe.clone())
            .unwrap_or_else(|| format!("{target_kind:?}").to_lowercase()),
        backup: live
            .as_ref()
            .and_then(|l| l.restored.as_ref().map(|m| m.id.clone())),
        restored_to: plan
            .restore
            .pitr
            .clone()
            .or(plan.restore.logical.clone())
            .filter(|_| restored),
        stages: reports,
        rto_seconds,
        rto_target_seconds: rto_target.as_secs_f64(),
        rto_met: rto_seconds.map(|r| r <= rto_target.as_secs_f64()),
    };
    // Tear down a scratch target (drop), after the tests.
    drop(live);
    Ok(report)
}

fn existing_target(plan: &Plan) -> Result<LiveTarget> {
    let port = plan
        .target
        .port
        .ok_or_else(|| Error::Config("target.port is required".into()))?;
    let host = plan
        .target
        .host
        .clone()
        .or_else(|| {
            plan.target
                .socket_dir
                .as_ref()
                .map(|s| s.display().to_string())
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    let ep = Endpoint {
        host,
        port,
        user: "postgres".into(),
        connect_timeout: Duration::from_secs(10),
    };
    Ok(LiveTarget {
        describe: format!(
            "{} ({})",
            plan.target
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ep.describe()
        ),
        endpoint: ep,
        _scratch: None,
        restored: None,
    })
}

async fn restore_into_target(
    cfg: &Config,
    repo: &Repo,
    plan: &Plan,
    kind: TargetKind,
    config_path: &std::path::Path,
) -> Result<LiveTarget> {
    let bins = Binaries::locate(cfg.postgres.bin_dir.as_deref());
    let owner = process_owner(None, cfg.postgres.os_user.as_deref())?;
    let scratch_dir = || -> Result<tempfile::TempDir> {
        let spool = crate::restore::logical::spool_dir(cfg)?;
        let d = tempfile::Builder::new()
            .prefix("drctl-scratch-")
            .tempdir_in(&spool)
            .map_err(|e| Error::io("create scratch dir", e))?;
        if let Some(u) = &owner {
            chown_tree(d.path(), u)?;
        }
        Ok(d)
    };
    if let Some(spec) = &plan.restore.logical {
        // Logical: into a scratch cluster of its own, or the data-dir target's running server.
        let database = plan.restore.database.clone().unwrap_or_default();
        let (endpoint, scratch, describe) = match kind {
            TargetKind::Scratch => {
                let tc = TempCluster::start(bins.clone(), "fsync = off\n")?;
                let ep = tc.cluster.endpoint();
                let data_dir = tc.cluster.data_dir.clone();
                let describe = format!("scratch cluster {}", ep.describe());
                let dir = scratch_dir()?;
                (
                    ep,
                    Some(Scratch {
                        dir,
                        data_dir,
                        cluster: Some(tc),
                        bins: bins.clone(),
                    }),
                    describe,
                )
            }
            TargetKind::DataDir => {
                let t = existing_target(plan)?;
                (t.endpoint.clone(), None, t.describe)
            }
        };
        let opts = crate::restore::logical::LogicalRestoreOptions {
            backup: Some(spec.clone()),
            database: database.clone(),
            target_database: database,
            target: endpoint.clone(),
            jobs: 2,
            clean: false,
            no_owner: true,
        };
        let r = crate::restore::logical::run(cfg, repo, &opts).await?;
        let manifest = repo.load_manifest(&r.backup).await?;
        return Ok(LiveTarget {
            endpoint,
            describe,
            _scratch: scratch,
            restored: Some(manifest),
        });
    }
    // Physical PITR.
    let pitr = plan.restore.pitr.clone().unwrap_or_else(|| "latest".into());
    let target = Target::parse_time(&pitr)?;
    let (target_dir, port, socket_dir, scratch_holder) = match kind {
        TargetKind::Scratch => {
            let dir = scratch_dir()?;
            let data = dir.path().join("data");
            let sock = dir.path().to_path_buf();
            (data, crate::pg::cluster::free_port(), Some(sock), Some(dir))
        }
        TargetKind::DataDir => (
            plan.target.path.clone().expect("validated"),
            plan.target.port.expect("validated"),
            plan.target.socket_dir.clone(),
            None,
        ),
    };
    let archive_mode = match (plan.target.archive_mode.as_deref(), kind) {
        (Some("preserve"), _) => ArchiveMode::Preserve,
        (Some(_), _) | (None, TargetKind::Scratch) => ArchiveMode::Off,
        (None, TargetKind::DataDir) => ArchiveMode::Preserve,
    };
    let opts = PitrOptions {
        target,
        target_dir: target_dir.clone(),
        port: Some(port),
        socket_dir: socket_dir.clone(),
        backup: plan.restore.backup.clone(),
        no_start: false,
        archive_mode,
        jobs: cfg.backup.jobs,
        timeout: Duration::from_secs(3600),
        config_path: config_path.to_path_buf(),
        // A scratch copy never archives, and needs no durability.
        extra_conf: if kind == TargetKind::Scratch {
            "fsync = off\narchive_mode = off\n".into()
        } else {
            String::new()
        },
    };
    let r = physical::run(cfg, repo, &opts).await?;
    let manifest = repo.load_manifest(&r.backup).await?;
    let host = socket_dir
        .as_ref()
        .map(|s| s.display().to_string())
        .or_else(|| plan.target.host.clone())
        .unwrap_or_else(|| "127.0.0.1".into());
    let endpoint = Endpoint {
        host,
        port,
        user: "postgres".into(),
        connect_timeout: Duration::from_secs(10),
    };
    let describe = format!(
        "{} {} ({})",
        if kind == TargetKind::Scratch {
            "scratch"
        } else {
            "data-dir"
        },
        target_dir.display(),
        endpoint.describe()
    );
    Ok(LiveTarget {
        endpoint,
        describe,
        _scratch: scratch_holder.map(|dir| Scratch {
            dir,
            data_dir: target_dir,
            cluster: None,
            bins,
        }),
        restored: Some(manifest),
    })
}
