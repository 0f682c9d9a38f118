//! Logical restore: verify the dump completely, then pg_restore it into a new database.
//!
//! Order matters. The dump is downloaded, verified and decompressed into the spool before the
//! target database is even created, so no byte that fails verification ever reaches
//! PostgreSQL, and a corrupt backup leaves the target server untouched. The new database is
//! marked as incomplete (a comment) while pg_restore runs and is dropped if it fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use tokio::io::AsyncWriteExt;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pg::{self, Binaries, Endpoint};
use crate::pipeline;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::repo::manifest::{BackupKind, LogicalDatabase, Manifest};
use crate::storage::StorageError;

#[derive(Debug, Clone)]
pub struct LogicalRestoreOptions {
    /// Backup id, or None / "latest".
    pub backup: Option<String>,
    /// Database inside the backup.
    pub database: String,
    /// New database to create.
    pub target_database: String,
    /// Where to restore; default: the configured server.
    pub target: Endpoint,
    pub jobs: u32,
    /// Drop and recreate the target database if it exists.
    pub clean: bool,
    /// Pass `--no-owner` to pg_restore (roles of the source need not exist on the target).
    pub no_owner: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LogicalRestoreReport {
    pub backup: String,
    pub database: String,
    pub target_database: String,
    pub target: String,
    pub bytes: u64,
    pub fetch_seconds: f64,
    pub restore_seconds: f64,
}

/// Restores under a read lease, so that expire does not delete the dump meanwhile.
pub async fn run(
    cfg: &Config,
    repo: &Repo,
    opts: &LogicalRestoreOptions,
) -> Result<LogicalRestoreReport> {
    let what = format!("restore --logical --database {}", opts.database);
    crate::repo::lock::reading(repo, &what, restore(cfg, repo, opts)).await
}

async fn restore(
    cfg: &Config,
    repo: &Repo,
    opts: &LogicalRestoreOptions,
) -> Result<LogicalRestoreReport> {
    // 1. Find the backup and the database inside it.
    let manifest = repo
        .resolve(opts.backup.as_deref(), |m| {
            m.kind == BackupKind::Logical && m.databases.iter().any(|d| d.name == opts.database)
        })
        .await?;
    let entry = find_database(&manifest, &opts.database)?;

    // 2. Fetch and verify every byte into the spool before touching the target.
    let t0 = Instant::now();
    let spool = spool_dir(cfg)?;
    let staged = tempfile::Builder::new()
        .prefix("drctl-restore-")
        .tempdir_in(&spool)
        .map_err(|e| Error::io(format!("create staging dir in {}", spool.display()), e))?;
    let dump_path = staged.path().join("dump");
    fetch_verified(repo, entry, &dump_path).await?;
    let fetch_seconds = t0.elapsed().as_secs_f64();

    // 3. Create the target database (refusing to overwrite unless --clean).
    let t1 = Instant::now();
    let admin = opts.target.connect(&cfg.postgres.database).await?;
    prepare_target(&admin, opts).await?;

    // 4. pg_restore; on failure drop the half-restored database.
    let bins = Binaries::locate(cfg.postgres.bin_dir.as_deref());
    if let Err(e) = pg_restore(&bins, opts, &dump_path).await {
        let ident = pg::quote_ident(&opts.target_database);
        return match admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)"))
            .await
        {
            Ok(()) => Err(Error::Failed(format!(
                "{e}\nthe partially restored database {:?} was dropped",
                opts.target_database
            ))),
            Err(drop_err) => Err(Error::Failed(format!(
                "{e}\nWARNING: database {:?} is INCOMPLETE and could not be dropped ({drop_err}); drop it by hand",
                opts.target_database
            ))),
        };
    }
    admin
        .batch_execute(&format!(
            "COMMENT ON DATABASE {} IS NULL",
            pg::quote_ident(&opts.target_database)
        ))
        .await
        .map_err(|e| Error::pg("clearing the in-progress marker", e))?;
    Ok(LogicalRestoreReport {
        backup: manifest.id.clone(),
        database: opts.database.clone(),
        target_database: opts.target_database.clone(),
        target: opts.target.describe(),
        bytes: entry.object.raw_size,
        fetch_seconds,
        restore_seconds: t1.elapsed().as_secs_f64(),
    })
}

fn find_database<'a>(m: &'a Manifest, name: &str) -> Result<&'a LogicalDatabase> {
    m.databases.iter().find(|d| d.name == name).ok_or_else(|| {
        Error::NotFound(format!(
            "database {name:?} is not in backup {} (it has: {})",
            m.id,
            m.database_names().join(", ")
        ))
    })
}

pub fn spool_dir(cfg: &Config) -> Result<PathBuf> {
    let dir = cfg.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("create spool dir {}", dir.display()), e))?;
    Ok(dir)
}

/// Downloads one object, verified and decompressed, into `dest`. Verification failures are
/// reported as corruption.
pub async fn fetch_verified(repo: &Repo, entry: &LogicalDatabase, dest: &Path) -> Result<()> {
    let key = repo.key(&entry.object.key);
    let reader = pipeline::open_verified(&**repo.storage(), &key, &entry.object)
        .await
        .map_err(|e| match e {
            StorageError::NotFound(k) => {
                Error::Corruption(format!("object missing from the repository: {k}"))
            }
            other => Error::Storage(other),
        })?;
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| Error::io(format!("create {}", dest.display()), e))?;
    let progress = Progress::bytes(
        &format!("fetch {}", entry.name),
        Some(entry.object.raw_size),
    );
    let mut reader = progress.reader(reader);
    match tokio::io::copy(&mut reader, &mut file).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(Error::Corruption(format!("{e}; nothing was restored")));
        }
        Err(e) => return Err(Error::io(format!("fetching {key}"), e)),
    }
    file.flush()
        .await
        .map_err(|e| Error::io("flush staged dump", e))?;
    Ok(())
}

async fn prepare_target(
    admin: &tokio_postgres::Client,
    opts: &LogicalRestoreOptions,
) -> Result<()> {
    let ident = pg::quote_ident(&opts.target_database);
    let exists = admin
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&opts.target_database],
        )
        .await
        .map_err(|e| Error::pg("checking the target database", e))?
        .is_some();
    if exists {
        if !opts.clean {
            return Err(Error::Conflict(format!(
                "database {:?} already exists on {}; choose another --target-database or pass --clean to replace it",
                opts.target_database,
                opts.target.describe()
            )));
        }
        admin
            .batch_execute(&format!("DROP DATABASE {ident} WITH (FORCE)"))
            .await
            .map_err(|e| Error::pg(format!("dropping {:?} (--clean)", opts.target_database), e))?;
    }
    admin
        .batch_execute(&format!("CREATE DATABASE {ident} TEMPLATE template0"))
        .await
        .map_err(|e| Error::pg(format!("creating database {:?}", opts.target_database), e))?;
    admin
        .batch_execute(&format!(
            "COMMENT ON DATABASE {ident} IS 'drctl: restore in progress - INCOMPLETE, do not use'"
        ))
        .await
        .map_err(|e| Error::pg("marking the database as in progress", e))?;
    Ok(())
}

/// libpq conninfo value quoting.
fn conninfo_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

async fn pg_restore(bins: &Binaries, opts: &LogicalRestoreOptions, dump: &Path) -> Result<()> {
    let t = &opts.target;
    let mut cmd = tokio::process::Command::new(bins.path("pg_restore"));
    cmd.args(["--exit-on-error", "--no-password"])
        .arg(format!("--jobs={}", opts.jobs.max(1)))
        .args([
            "--host",
            &t.host,
            "--port",
            &t.port.to_string(),
            "--username",
            &t.user,
        ])
        .arg(format!(
            "--dbname=dbname={}",
            conninfo_quote(&opts.target_database)
        ));
    if opts.no_owner {
        cmd.arg("--no-owner");
    }
    let out = cmd
        .arg(dump)
        .env("PGAPPNAME", "drctl-pg_restore")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::io(format!("start {}", bins.path("pg_restore").display()), e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(Error::Failed(format!(
            "pg_restore into {:?} failed ({}):\n{}",
            opts.target_database,
            out.status,
            tail.join("\n")
        )));
    }
    Ok(())
}
