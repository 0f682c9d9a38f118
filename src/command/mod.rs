//! One module per verb. Each `run` reads like a runbook and returns what to print.

pub mod agent;
pub mod backup;
pub mod demo;
pub mod expire;
pub mod list;
pub mod plan;
pub mod restore;
pub mod status;
pub mod verify;
pub mod wal;

use tokio_util::sync::CancellationToken;

use crate::cli::{Command, PlanCommand, WalCommand};
use crate::config::Config;
use crate::error::Result;
use crate::repo::Repo;
use crate::restore::executor::Mode;
use crate::storage;

/// What every command gets: the loaded config and output preferences.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub config: Config,
    pub json: bool,
    /// The `--config` path given on the command line, handed on to child drctl processes
    /// (prefetcher, restore_command).
    pub config_path: Option<std::path::PathBuf>,
    /// Cancelled on SIGTERM/SIGINT or a job timeout. Commands that write to the repository
    /// (backup) watch it and stop cleanly: no manifest, their objects removed.
    pub cancel: CancellationToken,
}

impl Ctx {
    pub fn new(config: Config, json: bool, config_path: Option<std::path::PathBuf>) -> Ctx {
        Ctx {
            config,
            json,
            config_path,
            cancel: CancellationToken::new(),
        }
    }

    pub async fn repo(&self) -> Result<Repo> {
        let st = storage::open(&self.config.repository).await?;
        Ok(Repo::new(st, &self.config.stanza))
    }
}

/// What a command produced: a JSON value for `--json`, text for people, and its exit code.
#[derive(Debug)]
pub struct Output {
    pub json: serde_json::Value,
    pub human: String,
    pub exit: crate::error::ExitCode,
}

impl Output {
    pub fn ok(json: serde_json::Value, human: String) -> Output {
        Output {
            json,
            human,
            exit: crate::error::ExitCode::Ok,
        }
    }
}

/// Runs one parsed command. The binary and the agent's jobs both come through here.
pub async fn dispatch(ctx: &Ctx, command: &Command) -> Result<Output> {
    match command {
        Command::Backup(a) => backup::run(ctx, a).await,
        Command::List => list::run(ctx).await,
        Command::Verify(a) => verify::run(ctx, a.backup_id.as_deref()).await,
        Command::Restore(a) => restore::run(ctx, a).await,
        Command::Demo(a) => demo::run(ctx, a).await,
        Command::Wal(WalCommand::Push { path }) => wal::push(ctx, path).await,
        Command::Wal(WalCommand::Fetch { name, dest }) => wal::fetch(ctx, name, dest).await,
        Command::Wal(WalCommand::Prefetch { first }) => wal::prefetch(ctx, first).await,
        Command::Plan(PlanCommand::Run(a)) => {
            let mode = if a.health_only {
                Mode::HealthOnly
            } else if a.backup_only {
                Mode::BackupOnly
            } else if a.test_only {
                Mode::TestOnly
            } else {
                Mode::All
            };
            plan::run(ctx, &a.file, mode).await
        }
        Command::Plan(PlanCommand::Check { file }) => {
            let p = crate::restore::plan::Plan::load(file)?;
            Ok(Output::ok(
                serde_json::json!({"ok": true, "plan": p.name, "stages": p.stages.len()}),
                format!(
                    "{}: plan {:?} is valid ({} stages)",
                    file.display(),
                    p.name,
                    p.stages.len()
                ),
            ))
        }
        Command::Drill(a) => plan::drill(ctx, a.plan.as_deref(), a.report.as_deref()).await,
        Command::Status(a) => status::run(ctx, a.prometheus).await,
        Command::Expire(a) => expire::run(ctx, a).await,
        Command::Agent(a) => agent::run(ctx, a).await,
    }
}
