//! Physical base backups: the non-exclusive `pg_backup_start` / `pg_backup_stop` API over one
//! connection held for the whole backup, the data directory copied file by file in parallel,
//! each file compressed and checksummed with its own manifest entry.
//!
//! Large files stream to their own object. Small files (under `bundle-limit-kib`) are
//! compressed one by one and packed into bundles of about `bundle-size-mib`, each member
//! addressed by offset, so a cluster's thousand tiny catalog files do not become a thousand
//! tiny S3 objects. Skipped, as pg_basebackup skips them: `postmaster.pid`, `postmaster.opts`,
//! the contents of `pg_wal`, `pg_replslot`, `pg_stat_tmp`, `pg_dynshmem`, `pg_notify`,
//! `pg_serial`, `pg_snapshots`, `pg_subtrans`, temporary files and relations, relcache init
//! files, and the `backup_label`/`tablespace_map` files (the real ones come from
//! `pg_backup_stop`). A file that vanishes during the copy is not an error: WAL replay
//! recreates whatever state it had.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::backup::logical::hostname;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::pg::{self, Endpoint};
use crate::pipeline::{self, ObjectRecord, PipelineError};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::repo::manifest::{BackupKind, MANIFEST_FORMAT, Manifest};
use crate::storage::{self, PutMode};
use crate::wal::{Lsn, Segment, WalName};

/// Directories whose contents are skipped (the directory itself is kept).
const EXCLUDE_DIR_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_replslot",
    "pg_stat_tmp",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files skipped wherever they are.
const EXCLUDE_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "pg_internal.init",
    "backup_label",
    "tablespace_map",
    "backup_label.old",
    "backup_manifest",
    "current_logfiles",
    "postgresql.auto.conf.tmp",
];

/// One file of a physical backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the data directory.
    pub path: String,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Unix permission bits.
    pub mode: u32,
    pub object: ObjectRecord,
}

/// What a physical backup records beyond the common manifest fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PhysicalInfo {
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub timeline: u32,
    pub wal_segment_size: u64,
    /// First and last WAL segment the backup needs.
    pub start_wal: String,
    pub stop_wal: String,
    pub backup_label: String,
    #[serde(default)]
    pub tablespace_map: String,
    /// Directories to create (relative), including those whose contents were skipped.
    pub dirs: Vec<String>,
    pub files: Vec<FileEntry>,
}

#[derive(Debug)]
struct Walked {
    dirs: Vec<String>,
    /// (relative path, size, mtime, mode)
    files: Vec<(String, u64, i64, u32)>,
}

fn is_temp(name: &str) -> bool {
    // pgsql_tmp* files and directories, and temporary relations t<backend>_<relfilenode>.
    if name.starts_with("pgsql_tmp") {
        return true;
    }
    if let Some(rest) = name.strip_prefix('t')
        && let Some((a, b)) = rest.split_once('_')
    {
        return !a.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.split(['.', '_'])
                .next()
                .is_some_and(|x| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit()));
    }
    false
}

/// Walks the data directory, applying the exclusions.
fn walk(root: &Path) -> Result<Walked> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Walked {
        dirs: Vec::new(),
        files: Vec::new(),
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
        };
        for entry in rd {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().to_string();
            let relp = rel.join(&name);
            let rels = relp.to_string_lossy().to_string();
            if is_temp(&name) || EXCLUDE_FILES.contains(&name.as_str()) {
                continue;
            }
            let meta = match std::fs::symlink_metadata(entry.path()) {
                Ok(m) => m,
                Err(_) => continue, // vanished
            };
            if rels.starts_with("pg_tblspc/") {
                return Err(Error::Failed(format!(
                    "tablespaces are not supported: {} (drctl backs up clusters without tablespaces)",
                    rels
                )));
            }
            let ft = meta.file_type();
            let is_dir = ft.is_dir() || (ft.is_symlink() && entry.path().is_dir());
            if is_dir {
                out.dirs.push(rels.clone());
                if rel.as_os_str().is_empty() && EXCLUDE_DIR_CONTENTS.contains(&name.as_str()) {
                    if name == "pg_wal" {
                        out.dirs.push("pg_wal/archive_status".into());
                    }
                    continue;
                }
                stack.push(relp);
            } else if ft.is_file() {
                out.files
                    .push((rels, meta.len(), meta.mtime(), meta.mode() & 0o7777));
            }
        }
    }
    out.dirs.sort();
    out.files.sort();
    Ok(out)
}

/// Units of copy work: one large file, or one bundle of small files.
enum Work {
    Large((String, u64, i64, u32)),
    Bundle(usize, Vec<(String, u64, i64, u32)>),
}

pub async fn run(
    cfg: &Config,
    repo: &Repo,
    lock: &crate::repo::lock::RepoLock,
    jobs: Option<usize>,
    cancel: &CancellationToken,
) -> Result<Manifest> {
    let data_dir = cfg.postgres.data_dir.clone().ok_or_else(|| {
        Error::Config("[postgres] data-dir is required for physical backups".into())
    })?;
    let ep = Endpoint::from_config(&cfg.postgres);
    let conn = ep.connect(&cfg.postgres.database).await?;
    let info = pg::server_info(&conn).await?;
    if info.version_num < 150000 {
        return Err(Error::Failed(format!(
            "physical backups need PostgreSQL 15 or newer (pg_backup_start); the server is {}",
            info.version
        )));
    }
    // 1. Preconditions: this host holds the data directory, WAL goes to this stanza.
    check_preconditions(&conn, &data_dir).await?;
    repo.ensure_stanza(&info.system_identifier, &info.version)
        .await?;
    let seg_size: u64 = conn
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
            &[],
        )
        .await
        .map_err(|e| Error::pg("reading wal_segment_size", e))?
        .get::<_, i64>(0) as u64;

    let started_at = Utc::now();
    let id = repo.new_backup_id(BackupKind::Physical, started_at).await?;
    tracing::info!(backup = %id, "physical backup started");

    // 2. Start the backup; the session stays open until pg_backup_stop.
    let label = format!("drctl {id}");
    let start_lsn: String = conn
        .query_one("SELECT pg_backup_start($1, true)::text", &[&label])
        .await
        .map_err(|e| Error::pg("pg_backup_start", e))?
        .get(0);
    let start_lsn = Lsn::parse(&start_lsn)?;
    let t0 = std::time::Instant::now();
    tracing::debug!(backup = %id, lsn = %start_lsn, seconds = (Utc::now() - started_at).num_milliseconds() as f64 / 1000.0, "pg_backup_start returned");

    // 3. Copy the files; on any failure stop the backup and remove what was written.
    let copied = tokio::select! {
        r = copy_files(cfg, repo, &data_dir, &id, jobs.unwrap_or(cfg.backup.jobs)) => r,
        _ = cancel.cancelled() => Err(interrupted(&id)),
    };
    tracing::debug!(backup = %id, seconds = t0.elapsed().as_secs_f64(), "files copied");
    // pg_backup_stop switches to a new segment either way. Its own wait for the archiver
    // polls once a second (a whole second of every backup, measured); we wait for the stop
    // segment to reach the repository instead, which is what restorability needs anyway.
    let stop = conn
        .query_one(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)",
            &[],
        )
        .await
        .map_err(|e| Error::pg("pg_backup_stop", e));
    let result: Result<Manifest> = async {
        let (dirs, files) = copied?;
        let row = stop?;
        let stop_lsn = Lsn::parse(row.get::<_, &str>(0))?;
        let backup_label: String = row.get(1);
        let tablespace_map: String = row.get::<_, Option<String>>(2).unwrap_or_default();
        let timeline = parse_label_timeline(&backup_label)?;
        let start_seg = Segment::from_lsn(timeline, start_lsn, seg_size);
        let stop_seg = Segment::from_lsn(timeline, Lsn(stop_lsn.0.saturating_sub(1)), seg_size);

        tracing::debug!(backup = %id, seconds = t0.elapsed().as_secs_f64(), "pg_backup_stop returned");
        // 4. The backup is only restorable once its last segment is in the repository.
        tokio::select! {
            r = wait_for_archive(repo, stop_seg, seg_size, cfg.backup.archive_timeout) => r?,
            _ = cancel.cancelled() => return Err(interrupted(&id)),
        }

        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            id: id.clone(),
            kind: BackupKind::Physical,
            stanza: repo.stanza().to_string(),
            started_at,
            finished_at: Utc::now(),
            pg_version: info.version.clone(),
            pg_version_num: info.version_num,
            system_identifier: info.system_identifier.clone(),
            compression: cfg.compression,
            host: hostname(),
            pg_dump_version: None,
            databases: Vec::new(),
            physical: Some(PhysicalInfo {
                start_lsn,
                stop_lsn,
                timeline,
                wal_segment_size: seg_size,
                start_wal: start_seg.name(seg_size),
                stop_wal: stop_seg.name(seg_size),
                backup_label,
                tablespace_map,
                dirs,
                files,
            }),
        };
        // The last moment to stop: once the manifest is being written it is finished whole.
        if cancel.is_cancelled() {
            return Err(interrupted(&id));
        }
        repo.commit_manifest(&manifest).await?;
        Ok(manifest)
    }
    .await;
    if result.is_err() {
        repo.discard_uncommitted(lock, &id).await;
    }
    let m = result?;
    tracing::info!(backup = %m.id, size = m.raw_size(), stored = m.stored_size(), "physical backup committed");
    Ok(m)
}

async fn check_preconditions(conn: &tokio_postgres::Client, data_dir: &Path) -> Result<()> {
    let row = conn
        .query_one(
            "SELECT current_setting('data_directory'), current_setting('archive_mode'), current_setting('archive_command')",
            &[],
        )
        .await
        .map_err(|e| Error::pg("reading settings", e))?;
    let server_dir: String = row.get(0);
    let same = match (
        std::fs::canonicalize(&server_dir),
        std::fs::canonicalize(data_dir),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return Err(Error::Config(format!(
            "[postgres] data-dir is {} but the server's data_directory is {server_dir}; \
             physical backups run on the database host with data-dir set to the server's",
            data_dir.display()
        )));
    }
    let archive_mode: String = row.get(1);
    let archive_command: String = row.get(2);
    if archive_mode == "off" {
        return Err(Error::Failed(
            "archive_mode is off: a physical backup is useless without its WAL. Set archive_mode = on and \
             archive_command = 'drctl --config FILE wal push %p', then restart PostgreSQL"
                .into(),
        ));
    }
    if !archive_command.contains("wal push") {
        tracing::warn!(archive_command = %archive_command, "archive_command does not look like 'drctl wal push'");
    }
    Ok(())
}

fn parse_label_timeline(label: &str) -> Result<u32> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Failed(format!("backup_label has no START TIMELINE: {label}")))
}

/// The error of a backup stopped by a signal or a job timeout.
pub(crate) fn interrupted(id: &str) -> Error {
    Error::Interrupted(format!(
        "backup {id} was stopped before it finished; nothing of it is kept"
    ))
}

async fn wait_for_archive(
    repo: &Repo,
    seg: Segment,
    seg_size: u64,
    timeout_secs: u64,
) -> Result<()> {
    let key = repo.key(&WalName::Segment(seg).key(seg_size));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
    // The archiver usually delivers within tens of milliseconds: look often at first.
    let mut pause = Duration::from_millis(20);
    loop {
        if repo.storage().head(&key).await?.is_some() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Failed(format!(
                "WAL segment {} did not reach the repository within {timeout_secs}s; is archive_command \
                 'drctl wal push %p' with this config and stanza?",
                seg.name(seg_size)
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

type Copied = (Vec<String>, Vec<FileEntry>);

async fn copy_files(
    cfg: &Config,
    repo: &Repo,
    data_dir: &Path,
    id: &str,
    jobs: usize,
) -> Result<Copied> {
    let root = data_dir.to_path_buf();
    let walked = tokio::task::spawn_blocking(move || walk(&root))
        .await
        .map_err(|e| Error::Failed(e.to_string()))??;
    let progress = Progress::bytes(
        &format!("backup {id}"),
        Some(walked.files.iter().map(|f| f.1).sum()),
    );
    let limit = cfg.backup.bundle_limit_kib * 1024;
    let bundle_size = cfg.backup.bundle_size_mib * 1024 * 1024;
    let mut work = Vec::new();
    let mut bundle = Vec::new();
    let mut bundle_bytes = 0;
    let mut nbundle = 0;
    for f in walked.files {
        if f.1 >= limit {
            work.push(Work::Large(f));
            continue;
        }
        bundle_bytes += f.1;
        bundle.push(f);
        if bundle_bytes >= bundle_size {
            work.push(Work::Bundle(nbundle, std::mem::take(&mut bundle)));
            nbundle += 1;
            bundle_bytes = 0;
        }
    }
    if !bundle.is_empty() {
        work.push(Work::Bundle(nbundle, bundle));
    }
    // Largest first keeps both cores busy to the end.
    work.sort_by_key(|w| match w {
        Work::Large(f) => std::cmp::Reverse(f.1),
        Work::Bundle(..) => std::cmp::Reverse(0),
    });

    let sem = Arc::new(Semaphore::new(jobs.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let mut files: Vec<FileEntry> = Vec::new();
    for w in work {
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let repo = repo.clone();
        let cfg = cfg.compression;
        let data_dir = data_dir.to_path_buf();
        let id = id.to_string();
        let progress = progress.clone();
        set.spawn(async move {
            let _permit = permit;
            match w {
                Work::Large(f) => copy_large(&repo, &data_dir, &id, f, &cfg, &progress)
                    .await
                    .map(|e| e.into_iter().collect()),
                Work::Bundle(n, files) => {
                    copy_bundle(&repo, &data_dir, &id, n, files, &cfg, &progress).await
                }
            }
        });
        // Collect finished tasks as we go so an early failure stops the backup early.
        while let Some(done) = set.try_join_next() {
            files.extend(done.map_err(|e| Error::Failed(e.to_string()))??);
        }
    }
    while let Some(done) = set.join_next().await {
        files.extend(done.map_err(|e| Error::Failed(e.to_string()))??);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((walked.dirs, files))
}

fn object_key(id: &str, suffix: &str) -> String {
    format!("{}{suffix}", Repo::backup_prefix(id))
}

async fn copy_large(
    repo: &Repo,
    data_dir: &Path,
    id: &str,
    (path, _size, mtime, mode): (String, u64, i64, u32),
    cfg: &crate::config::CompressionConfig,
    progress: &Progress,
) -> Result<Option<FileEntry>> {
    let file = match std::fs::File::open(data_dir.join(&path)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("open {path}"), e)),
    };
    let rel = object_key(id, &format!("data/{path}{}", cfg.algorithm.suffix()));
    let t = std::time::Instant::now();
    // Read and hashed on a thread of its own while this task compresses.
    let object = pipeline::upload_blocking(
        &**repo.storage(),
        &repo.key(&rel),
        &rel,
        file,
        progress,
        cfg,
        1, // files are already copied `jobs` at a time
        PutMode::Overwrite,
    )
    .await
    .map_err(|e| match e {
        PipelineError::Storage(s) => Error::Storage(s),
        other => Error::Failed(format!("{path}: {other}")),
    })?;
    tracing::debug!(path = %path, raw = object.raw_size, seconds = t.elapsed().as_secs_f64(), "file copied");
    Ok(Some(FileEntry {
        path,
        mtime,
        mode,
        object,
    }))
}

async fn copy_bundle(
    repo: &Repo,
    data_dir: &Path,
    id: &str,
    n: usize,
    files: Vec<(String, u64, i64, u32)>,
    cfg: &crate::config::CompressionConfig,
    progress: &Progress,
) -> Result<Vec<FileEntry>> {
    let rel = object_key(id, &format!("bundle/{n:05}"));
    let mut buf: Vec<u8> = Vec::new();
    let mut entries = Vec::new();
    for (path, _size, mtime, mode) in files {
        let raw = match tokio::fs::read(data_dir.join(&path)).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("read {path}"), e)),
        };
        progress.inc(raw.len() as u64);
        let stored = pipeline::compress_bytes(&raw, cfg)
            .await
            .map_err(|e| Error::io(format!("compress {path}"), e))?;
        let object =
            pipeline::record_for(&rel, &raw, &stored, cfg.algorithm, Some(buf.len() as u64));
        buf.extend_from_slice(&stored);
        entries.push(FileEntry {
            path,
            mtime,
            mode,
            object,
        });
    }
    if !entries.is_empty() {
        storage::put_bytes(
            &**repo.storage(),
            &repo.key(&rel),
            Bytes::from(buf),
            PutMode::Overwrite,
        )
        .await?;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        assert!(is_temp("pgsql_tmp12.3"));
        assert!(is_temp("t3_16384"));
        assert!(is_temp("t3_16384_fsm"));
        assert!(is_temp("t12_99.1"));
        assert!(!is_temp("16384"));
        assert!(!is_temp("tablespace_map2"));
        assert!(!is_temp("t_1"));
    }

    #[test]
    fn walk_skips_what_pg_basebackup_skips() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for dir in [
            "base/1",
            "global",
            "pg_wal/archive_status",
            "pg_replslot/s",
            "pg_stat_tmp",
            "base/pgsql_tmp",
        ] {
            std::fs::create_dir_all(r.join(dir)).unwrap();
        }
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "postmaster.opts",
            "base/1/1259",
            "base/1/t3_5000",
            "base/1/pg_internal.init",
            "global/pg_control",
            "pg_wal/000000010000000000000001",
            "pg_replslot/s/state",
            "pg_stat_tmp/x",
            "base/pgsql_tmp/pgsql_tmp1.0",
        ] {
            std::fs::write(r.join(f), b"x").unwrap();
        }
        let w = walk(r).unwrap();
        let files: Vec<&str> = w.files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            files,
            vec!["PG_VERSION", "base/1/1259", "global/pg_control"]
        );
        assert!(w.dirs.contains(&"pg_wal".to_string()));
        assert!(w.dirs.contains(&"pg_wal/archive_status".to_string()));
        assert!(w.dirs.contains(&"pg_replslot".to_string()));
        assert!(!w.dirs.iter().any(|d| d.contains("pgsql_tmp")));
    }
}
