//! One module per verb. Each `run` reads like a runbook and returns what to print.

pub mod backup;
pub mod demo;
pub mod expire;
pub mod list;
pub mod plan;
pub mod restore;
pub mod status;
pub mod verify;
pub mod wal;

use crate::config::Config;
use crate::error::Result;
use crate::repo::Repo;
use crate::storage;

/// What every command gets: the loaded config and output preferences.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub config: Config,
    pub json: bool,
    /// The `--config` path given on the command line, handed on to child drctl processes
    /// (prefetcher, restore_command).
    pub config_path: Option<std::path::PathBuf>,
}

impl Ctx {
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
