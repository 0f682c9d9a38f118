//! Restore plans: the staged recovery an operator writes down (`restore-plans/*.toml`).
//!
//! A plan names a target (a throwaway `scratch` cluster, or a `data-dir` with its port), what
//! to restore (`pitr = "latest"` or a time, or `logical = "latest"` + `database`), and a list of
//! stages. Each stage has a kind (`health`: checks against the configured cluster; `backup`:
//! restore into the target; `test`: checks against the target), a timeout, what failure does
//! (`abort` or `continue`), and its checks. The format is a contract: keys are kebab-case and
//! unknown keys are errors naming the file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub target: TargetSpec,
    #[serde(default)]
    pub restore: RestoreSpec,
    /// RTO target for this plan (default: `[objectives] rto`).
    #[serde(default)]
    pub rto: Option<String>,
    #[serde(default, rename = "stage")]
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// A temp dir and a free port, torn down after a drill.
    #[default]
    Scratch,
    /// A given data directory and port (an incident restore).
    DataDir,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TargetSpec {
    #[serde(default)]
    pub kind: TargetKind,
    /// data-dir: the data directory to restore into (must be empty or absent).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// data-dir: the port it listens on.
    #[serde(default)]
    pub port: Option<u16>,
    /// Unix socket directory of the target (default: a temp dir for scratch, else the
    /// cluster's own setting).
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
    /// Host to connect to for tests (default: the socket dir, else 127.0.0.1).
    #[serde(default)]
    pub host: Option<String>,
    /// `preserve` or `off` (default: `off` for scratch, `preserve` for data-dir).
    #[serde(default)]
    pub archive_mode: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RestoreSpec {
    /// `latest` or an RFC 3339 time: a physical restore with WAL replay.
    #[serde(default)]
    pub pitr: Option<String>,
    /// `latest` or a backup id: a logical restore of `database`.
    #[serde(default)]
    pub logical: Option<String>,
    /// Logical: the database inside the backup (restored under the same name).
    #[serde(default)]
    pub database: Option<String>,
    /// Physical: a specific backup id (default: the newest that reaches the target).
    #[serde(default)]
    pub backup: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StageKind {
    Health,
    Backup,
    Test,
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StageKind::Health => "health",
            StageKind::Backup => "backup",
            StageKind::Test => "test",
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    #[default]
    Abort,
    Continue,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    pub kind: StageKind,
    /// e.g. "5m", "90s" (default 30m).
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub on_failure: OnFailure,
    #[serde(default, rename = "check")]
    pub checks: Vec<Check>,
}

/// Expectation on the result of a `sql` check.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Expect {
    /// The first column of the first row is a number at least this.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// The first column of the first row, as text, equals this.
    #[serde(default)]
    pub equals: Option<toml::Value>,
    /// Exactly this many rows.
    #[serde(default)]
    pub rows: Option<u64>,
    /// No rows at all.
    #[serde(default)]
    pub no_rows: bool,
}

fn default_true() -> bool {
    true
}

/// One check. `required = false` turns a failure into a warning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Check {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// A label for reports (default: the type).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub expect: Option<Expect>,
    /// tenant-isolation: the column holding the tenant.
    #[serde(default)]
    pub tenant_column: Option<String>,
    /// tenant-isolation: the setting the policies read (e.g. app.current_tenant_id).
    #[serde(default)]
    pub setting: Option<String>,
    /// tenant-isolation: the tenants to try (default: every distinct value, up to 20).
    #[serde(default)]
    pub tenants: Vec<String>,
    /// connections / disk-free: the limit in percent.
    #[serde(default)]
    pub max_percent: Option<f64>,
    #[serde(default)]
    pub min_free_percent: Option<f64>,
    /// disk-free: paths to check (default: the data dir and the spool).
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// long-running-queries: the longest allowed (default 5m). backup-age: the oldest
    /// allowed newest backup (default 26h).
    #[serde(default)]
    pub max_age: Option<String>,
    /// backup-age: which types must be recent (default: logical and physical that exist).
    #[serde(default)]
    pub types: Vec<String>,
    /// http: the URL and expected status (default 200).
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    /// command: argv and expected exit code (default 0).
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    Connect,
    Connections,
    LongRunningQueries,
    RlsEnabled,
    Archiver,
    BackupAge,
    WalContinuity,
    Repository,
    DiskFree,
    Sql,
    TenantIsolation,
    RowCounts,
    Amcheck,
    Http,
    Command,
}

impl CheckKind {
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Connect => "connect",
            CheckKind::Connections => "connections",
            CheckKind::LongRunningQueries => "long-running-queries",
            CheckKind::RlsEnabled => "rls-enabled",
            CheckKind::Archiver => "archiver",
            CheckKind::BackupAge => "backup-age",
            CheckKind::WalContinuity => "wal-continuity",
            CheckKind::Repository => "repository",
            CheckKind::DiskFree => "disk-free",
            CheckKind::Sql => "sql",
            CheckKind::TenantIsolation => "tenant-isolation",
            CheckKind::RowCounts => "row-counts",
            CheckKind::Amcheck => "amcheck",
            CheckKind::Http => "http",
            CheckKind::Command => "command",
        }
    }

    /// Which stage kinds may hold this check.
    fn allowed_in(self, stage: StageKind) -> bool {
        use CheckKind::*;
        match self {
            Connect | RlsEnabled | Sql | Http | Command => stage != StageKind::Backup,
            Connections | LongRunningQueries | Archiver | BackupAge | WalContinuity
            | Repository | DiskFree => stage == StageKind::Health,
            TenantIsolation | RowCounts | Amcheck => stage == StageKind::Test,
        }
    }
}

impl Check {
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.kind.name().to_string())
    }
}

/// Parses "5m", "90s", "1h30m".
pub fn parse_duration(s: &str, what: &str) -> Result<Duration> {
    humantime::parse_duration(s).map_err(|e| {
        Error::Config(format!(
            "{what}: {s:?} is not a duration ({e}); use e.g. \"90s\", \"5m\", \"1h\""
        ))
    })
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read plan {}: {e}", path.display())))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Plan> {
        let plan: Plan = toml::from_str(text).map_err(|e| {
            Error::Config(format!("{}: {}", path.display(), e.to_string().trim_end()))
        })?;
        plan.validate(path)?;
        Ok(plan)
    }

    /// Checks what types cannot: durations parse, each check has what it needs, stage kinds
    /// hold only checks that make sense there.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: String, why: String| {
            Err(Error::Config(format!(
                "{}: key `{key}`: {why}",
                path.display()
            )))
        };
        if self.name.is_empty() {
            return bad("name".into(), "must not be empty".into());
        }
        if let Some(r) = &self.rto {
            parse_duration(r, &format!("{}: key `rto`", path.display()))?;
        }
        match (&self.restore.pitr, &self.restore.logical) {
            (Some(_), Some(_)) => {
                return bad(
                    "restore".into(),
                    "give either `pitr` or `logical`, not both".into(),
                );
            }
            (None, Some(_)) if self.restore.database.is_none() => {
                return bad(
                    "restore.database".into(),
                    "a logical restore needs `database`".into(),
                );
            }
            (Some(p), None)
                if p != "latest" && chrono::DateTime::parse_from_rfc3339(p).is_err() =>
            {
                return bad(
                    "restore.pitr".into(),
                    format!("{p:?} is neither `latest` nor an RFC 3339 time"),
                );
            }
            _ => {}
        }
        if self.target.kind == TargetKind::DataDir
            && (self.target.path.is_none() || self.target.port.is_none())
        {
            return bad(
                "target".into(),
                "kind = \"data-dir\" needs `path` and `port`".into(),
            );
        }
        if let Some(m) = &self.target.archive_mode
            && m != "preserve"
            && m != "off"
        {
            return bad(
                "target.archive-mode".into(),
                format!("{m:?}: use \"preserve\" or \"off\""),
            );
        }
        if self.stages.is_empty() {
            return bad("stage".into(), "a plan needs at least one [[stage]]".into());
        }
        for (i, st) in self.stages.iter().enumerate() {
            let at = format!("stage[{i}] ({})", st.name);
            if let Some(t) = &st.timeout {
                parse_duration(t, &format!("{}: key `{at}.timeout`", path.display()))?;
            }
            if st.kind == StageKind::Backup
                && self.restore.pitr.is_none()
                && self.restore.logical.is_none()
            {
                return bad(
                    format!("{at}.kind"),
                    "a backup stage needs [restore] pitr or logical".into(),
                );
            }
            for (j, c) in st.checks.iter().enumerate() {
                let ck = format!("{at}.check[{j}]");
                if !c.kind.allowed_in(st.kind) {
                    return bad(
                        format!("{ck}.type"),
                        format!(
                            "a `{}` check cannot run in a {} stage",
                            c.kind.name(),
                            st.kind
                        ),
                    );
                }
                let need = |field: &str, ok: bool| -> Result<()> {
                    if ok {
                        Ok(())
                    } else {
                        Err(Error::Config(format!(
                            "{}: key `{ck}.{field}`: required by a `{}` check",
                            path.display(),
                            c.kind.name()
                        )))
                    }
                };
                match c.kind {
                    CheckKind::RlsEnabled => {
                        need("database", c.database.is_some())?;
                        need("tables", !c.tables.is_empty())?;
                    }
                    CheckKind::TenantIsolation => {
                        need("database", c.database.is_some())?;
                        need("tables", !c.tables.is_empty())?;
                        need("tenant-column", c.tenant_column.is_some())?;
                        need("setting", c.setting.is_some())?;
                    }
                    CheckKind::Sql => {
                        need("database", c.database.is_some())?;
                        need("query", c.query.is_some())?;
                        need("expect", c.expect.is_some())?;
                    }
                    CheckKind::RowCounts | CheckKind::Amcheck => {
                        need("database", c.database.is_some())?
                    }
                    CheckKind::Http => need("url", c.url.is_some())?,
                    CheckKind::Command => need("argv", !c.argv.is_empty())?,
                    _ => {}
                }
                if let Some(a) = &c.max_age {
                    parse_duration(a, &format!("{}: key `{ck}.max-age`", path.display()))?;
                }
            }
        }
        Ok(())
    }

    pub fn stage_timeout(stage: &Stage) -> Duration {
        stage
            .timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(30 * 60))
    }
}
