//! Logical backups: one `pg_dump -Fc -Z0` per database, streamed through the pipeline.
//!
//! Each database is dumped inside a snapshot that drctl exports and holds
//! (`pg_export_snapshot` + `pg_dump --snapshot`), so the exact row counts it records in the
//! manifest describe precisely the rows in the dump: a restore can then be checked row for row.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use chrono::Utc;
use tokio::io::AsyncReadExt;
use tokio_postgres::Client;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pg::{self, Binaries, Endpoint};
use crate::pipeline::{self, PipelineError};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::repo::manifest::{BackupKind, LogicalDatabase, MANIFEST_FORMAT, Manifest};
use crate::storage::PutMode;

#[derive(Debug, Clone, Default)]
pub struct LogicalOptions {
    /// Databases to dump; empty means every database that accepts connections, no templates.
    pub databases: Vec<String>,
    /// Skip the exact per-table row counts (they cost one scan of each table).
    pub skip_row_counts: bool,
}

/// Takes a logical backup and commits its manifest. On failure no manifest is written and
/// the objects already uploaded are removed.
pub async fn run(
    cfg: &Config,
    repo: &Repo,
    lock: &crate::repo::lock::RepoLock,
    opts: &LogicalOptions,
    cancel: &CancellationToken,
) -> Result<Manifest> {
    let ep = Endpoint::from_config(&cfg.postgres);
    let control = ep.connect(&cfg.postgres.database).await?;
    let info = pg::server_info(&control).await?;
    repo.ensure_stanza(&info.system_identifier, &info.version)
        .await?;

    let databases = choose_databases(&control, &opts.databases).await?;
    let bins = Binaries::locate(cfg.postgres.bin_dir.as_deref());
    let pg_dump_version = bins.version("pg_dump")?;

    let started_at = Utc::now();
    let id = repo.new_backup_id(BackupKind::Logical, started_at).await?;
    tracing::info!(backup = %id, databases = ?databases, "logical backup started");
    let progress = Progress::bytes(
        &format!("backup {id} (size estimated)"),
        estimated_size(&control, &databases).await,
    );

    let mut entries = Vec::new();
    for (i, db) in databases.iter().enumerate() {
        let dumped = tokio::select! {
            r = dump_one(cfg, repo, &ep, &bins, &id, i, db, opts, &progress) => r,
            _ = cancel.cancelled() => Err(crate::backup::physical::interrupted(&id)),
        };
        match dumped {
            Ok(entry) => entries.push(entry),
            Err(e) => {
                repo.discard_uncommitted(lock, &id).await;
                return Err(e);
            }
        }
    }

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        kind: BackupKind::Logical,
        stanza: repo.stanza().to_string(),
        started_at,
        finished_at: Utc::now(),
        pg_version: info.version,
        pg_version_num: info.version_num,
        system_identifier: info.system_identifier,
        compression: cfg.compression,
        host: hostname(),
        pg_dump_version: Some(pg_dump_version),
        databases: entries,
        physical: None,
    };
    if cancel.is_cancelled() {
        repo.discard_uncommitted(lock, &id).await;
        return Err(crate::backup::physical::interrupted(&id));
    }
    if let Err(e) = repo.commit_manifest(&manifest).await {
        repo.discard_uncommitted(lock, &id).await;
        return Err(e);
    }
    tracing::info!(backup = %id, size = manifest.raw_size(), stored = manifest.stored_size(), "logical backup committed");
    Ok(manifest)
}

/// Lets pg_dump run up to 1 MiB ahead of us instead of the default 64 KiB. Best effort: the
/// system limit (/proc/sys/fs/pipe-max-size) may refuse it, which only costs speed.
fn grow_pipe(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}

/// What the dumps will weigh, ahead of them: each database's size on disk beyond an empty
/// one's (template0: the catalogs a dump barely touches). A dump leaves out indexes and free
/// space, so this errs high; only the progress bar uses it.
async fn estimated_size(control: &Client, databases: &[String]) -> Option<u64> {
    let row = control
        .query_one(
            "SELECT sum(greatest(pg_database_size(datname) - pg_database_size('template0'), 0))::bigint \
             FROM pg_database WHERE datname = ANY($1)",
            &[&databases],
        )
        .await
        .ok()?;
    row.get::<_, Option<i64>>(0).map(|n| n.max(0) as u64)
}

async fn choose_databases(control: &Client, wanted: &[String]) -> Result<Vec<String>> {
    let rows = control
        .query(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname",
            &[],
        )
        .await
        .map_err(|e| Error::pg("listing databases", e))?;
    let all: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    if wanted.is_empty() {
        return Ok(all);
    }
    for w in wanted {
        if !all.contains(w) {
            return Err(Error::NotFound(format!(
                "database {w:?} does not exist or does not accept connections (have: {})",
                all.join(", ")
            )));
        }
    }
    Ok(wanted.to_vec())
}

/// Object name for a database: position plus a file-name-safe form of the name.
fn object_name(index: usize, db: &str, suffix: &str) -> String {
    let safe: String = db
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{index:03}-{safe}.pgdump{suffix}")
}

#[allow(clippy::too_many_arguments)]
async fn dump_one(
    cfg: &Config,
    repo: &Repo,
    ep: &Endpoint,
    bins: &Binaries,
    id: &str,
    index: usize,
    db: &str,
    opts: &LogicalOptions,
    progress: &Progress,
) -> Result<LogicalDatabase> {
    // 1. Open a repeatable-read transaction and export its snapshot; pg_dump joins it.
    let conn = Arc::new(ep.connect(db).await?);
    conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(|e| Error::pg(format!("{db}: begin snapshot transaction"), e))?;
    let snapshot: String = conn
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| Error::pg(format!("{db}: export snapshot"), e))?
        .get(0);

    // 2. Start pg_dump: custom format, no compression of its own (we compress once, better).
    let mut child = tokio::process::Command::new(bins.path("pg_dump"))
        .args(["--format=custom", "--compress=0", "--no-sync"])
        .arg(format!("--snapshot={snapshot}"))
        .args([
            "--host",
            &ep.host,
            "--port",
            &ep.port.to_string(),
            "--username",
            &ep.user,
        ])
        .env("PGDATABASE", db)
        .env("PGAPPNAME", "drctl-pg_dump")
        .env(
            "PGCONNECT_TIMEOUT",
            ep.connect_timeout.as_secs().max(1).to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::io(format!("start {}", bins.path("pg_dump").display()), e))?;
    // The dump is read (and hashed) on a thread of its own, in large chunks.
    let stdout = child
        .stdout
        .take()
        .expect("piped")
        .into_owned_fd()
        .map_err(|e| Error::io("pg_dump's output pipe", e))?;
    grow_pipe(&stdout);
    let mut stderr = child.stderr.take().expect("piped");
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut buf).await;
        // Drain the rest so pg_dump never blocks on a full pipe.
        let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
        String::from_utf8_lossy(&buf).to_string()
    });

    // 3. Stream it into the repository while counting rows in the same snapshot.
    let rel = format!(
        "{}{}",
        Repo::backup_prefix(id),
        object_name(index, db, cfg.compression.algorithm.suffix())
    );
    let key = repo.key(&rel);
    let storage = repo.storage().clone();
    let compression = cfg.compression;
    let upload = pipeline::upload_blocking(
        &*storage,
        &key,
        &rel,
        std::fs::File::from(stdout),
        progress,
        &compression,
        // One dump at a time: let it compress on every core (pg_dump and the server get
        // their share from the scheduler; the frames are small).
        std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        PutMode::IfAbsent,
    );
    let counts = async {
        if opts.skip_row_counts {
            Ok(BTreeMap::new())
        } else {
            row_counts(&conn).await
        }
    };
    let (uploaded, counts) = tokio::join!(upload, counts);
    let status = child
        .wait()
        .await
        .map_err(|e| Error::io("wait for pg_dump", e))?;
    let stderr_text = stderr_task.await.unwrap_or_default();
    if !status.success() {
        return Err(Error::Failed(format!(
            "pg_dump of database {db:?} failed ({status}): {}",
            stderr_text.trim()
        )));
    }
    let object = uploaded.map_err(|e| match e {
        PipelineError::Storage(s) => Error::Storage(s),
        other => Error::Failed(format!("dump of {db:?}: {other}")),
    })?;
    let row_counts = counts?;
    let _ = conn.batch_execute("COMMIT").await;
    tracing::info!(
        database = db,
        raw = object.raw_size,
        stored = object.stored_size,
        "database dumped"
    );
    Ok(LogicalDatabase {
        name: db.to_string(),
        object,
        row_counts,
    })
}

/// Exact row counts of every user table, in the current transaction's snapshot.
async fn row_counts(conn: &Client) -> Result<BTreeMap<String, i64>> {
    let tables = conn
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| Error::pg("listing tables", e))?;
    let mut out = BTreeMap::new();
    for t in tables {
        let (schema, table): (String, String) = (t.get(0), t.get(1));
        let q = format!(
            "SELECT count(*) FROM {}.{}",
            pg::quote_ident(&schema),
            pg::quote_ident(&table)
        );
        let n: i64 = conn
            .query_one(&q, &[])
            .await
            .map_err(|e| Error::pg(format!("counting rows of {schema}.{table}"), e))?
            .get(0);
        out.insert(format!("{schema}.{table}"), n);
    }
    Ok(out)
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).to_string()
}
