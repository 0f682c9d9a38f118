//! Command-line definitions (clap derive) and output rendering. No logic lives here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "drctl",
    version,
    about = "Disaster recovery and backup orchestration for PostgreSQL"
)]
pub struct Cli {
    /// Config file (else DRCTL_CONFIG, else /etc/drctl/drctl.toml).
    #[arg(long, global = true, env = "DRCTL_CONFIG_FILE")]
    pub config: Option<PathBuf>,
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take a backup.
    Backup(BackupArgs),
    /// List the backups in the repository.
    List,
    /// Re-read every object of every backup (or one) and check size and SHA-256.
    Verify(VerifyArgs),
    /// Restore a backup.
    Restore(Box<RestoreArgs>),
    /// Run the guided demo on a throwaway cluster and a local repository.
    Demo(DemoArgs),
    /// WAL archiving: PostgreSQL's archive_command and restore_command.
    #[command(subcommand)]
    Wal(WalCommand),
    /// Staged restore plans.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Run a whole plan against a scratch target, record the RTO, tear the target down.
    Drill(DrillArgs),
    /// Do the recovery objectives (RPO, RTO) hold right now?
    Status(StatusArgs),
    /// Delete what the [retention] policy no longer keeps (backups, WAL, leftovers, history).
    Expire(ExpireArgs),
    /// Run the scheduled jobs ([[job]] in the config and schedules/*.toml) until stopped.
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A directory of schedule files (*.toml, each a list of [[job]]), added to the config's.
    #[arg(long)]
    pub schedules: Option<PathBuf>,
    /// Serve /metrics (Prometheus) and /health on this address, e.g. 127.0.0.1:9187.
    #[arg(long)]
    pub listen: Option<String>,
    /// On SIGTERM/SIGINT, how long a running job may go on before it is aborted (cleanly).
    #[arg(long, default_value = "5m")]
    pub stop_timeout: String,
    /// Load and check the schedules, print when each job runs next, and exit.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct ExpireArgs {
    /// List exactly what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for a backup holding the repository lock.
    #[arg(long, default_value = "10m")]
    pub lock_timeout: String,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Run a plan: all stages in order, or only those of one kind.
    Run(PlanRunArgs),
    /// Parse and validate a plan without running it.
    Check { file: PathBuf },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("only").args(["health_only", "backup_only", "test_only"])))]
pub struct PlanRunArgs {
    pub file: PathBuf,
    /// Only the health stages (assessment of the running cluster and repository).
    #[arg(long)]
    pub health_only: bool,
    /// Only the backup stages (the restore).
    #[arg(long)]
    pub backup_only: bool,
    /// Only the test stages, against the plan's data-dir target.
    #[arg(long)]
    pub test_only: bool,
}

#[derive(Debug, Args)]
pub struct DrillArgs {
    /// The plan (default: a built-in PITR-latest drill).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Write a report for auditors: FILE.md or FILE.html (with a chart of recent drills).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Prometheus text format (node_exporter textfile collector).
    #[arg(long)]
    pub prometheus: bool,
}

#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Archive one WAL file (archive_command = 'drctl --config FILE wal push %p').
    Push {
        /// Path of the WAL file (%p).
        path: PathBuf,
    },
    /// Fetch one WAL file (restore_command = 'drctl --config FILE wal fetch %f %p').
    /// Exit 1: not archived. Exit 200: storage or checksum failure (recovery must stop).
    Fetch {
        /// WAL file name (%f).
        name: String,
        /// Destination path (%p).
        dest: PathBuf,
    },
    /// Download the segments from FIRST on into the spool (started by `wal fetch`).
    Prefetch { first: String },
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BackupType {
    Logical,
    Physical,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Backup type.
    #[arg(long = "type", value_enum)]
    pub kind: BackupType,
    /// Database to dump (repeatable). Default: every database that accepts connections.
    #[arg(long = "database", short = 'd')]
    pub databases: Vec<String>,
    /// Do not record exact per-table row counts.
    #[arg(long)]
    pub no_row_counts: bool,
    /// Physical: files copied in parallel (default: `[backup] jobs`, the number of cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// How long to wait for another backup or expire holding the repository lock.
    #[arg(long, default_value = "10m")]
    pub lock_timeout: String,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Verify only this backup.
    pub backup_id: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["logical", "pitr", "target_lsn", "target_xid", "target_name"])))]
pub struct RestoreArgs {
    /// Restore a logical backup into a new database.
    #[arg(long)]
    pub logical: bool,
    /// Point-in-time restore of a physical backup plus WAL: `latest` or an RFC 3339 time.
    #[arg(long, value_name = "TIME|latest")]
    pub pitr: Option<String>,
    /// Point-in-time restore up to this LSN (e.g. 0/3000060).
    #[arg(long, value_name = "LSN")]
    pub target_lsn: Option<String>,
    /// Point-in-time restore up to this transaction id.
    #[arg(long, value_name = "XID")]
    pub target_xid: Option<String>,
    /// Point-in-time restore up to this named restore point (pg_create_restore_point).
    #[arg(long, value_name = "NAME")]
    pub target_name: Option<String>,
    /// Backup id, or `latest` (PITR: the newest backup that can reach the target).
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// Logical: database inside the backup.
    #[arg(long)]
    pub database: Option<String>,
    /// Logical: name of the database to create.
    #[arg(long)]
    pub target_database: Option<String>,
    /// Logical: restore to another server (default: the configured one).
    #[arg(long)]
    pub target_host: Option<String>,
    /// Logical: port of the target server. PITR: port the restored cluster listens on.
    #[arg(long)]
    pub target_port: Option<u16>,
    /// PITR: the new data directory (must be empty or absent).
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
    /// PITR: unix socket directory of the restored cluster.
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// PITR: prepare the data directory but do not start PostgreSQL.
    #[arg(long)]
    pub no_start: bool,
    /// PITR: `preserve` keeps archiving on (the restored cluster is the new primary); `off` for
    /// a copy beside a primary that still runs.
    #[arg(long, value_enum, default_value_t = ArchiveModeArg::Preserve)]
    pub archive_mode: ArchiveModeArg,
    /// PITR: longest wait for recovery, e.g. `30m`.
    #[arg(long, default_value = "1h")]
    pub timeout: String,
    /// Parallel jobs (logical: pg_restore --jobs, default 1; PITR: file downloads, default: cores).
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Logical: replace the target database if it exists.
    #[arg(long)]
    pub clean: bool,
    /// Logical: do not restore object ownership (for targets without the source's roles).
    #[arg(long)]
    pub no_owner: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ArchiveModeArg {
    Preserve,
    Off,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's cluster and repository (prints where).
    #[arg(long)]
    pub keep: bool,
    /// Rows of sample data.
    #[arg(long, default_value_t = 20000)]
    pub rows: u32,
}

/// Formats a byte count for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Renders rows as an aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|s| s.to_string()).collect())];
    for r in rows {
        out.push(line(r.clone()));
    }
    out.join("\n")
}
