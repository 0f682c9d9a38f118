//! Point-in-time restore: base backup + archived WAL into a new data directory.
//!
//! The steps, each timed: pick the newest physical backup that can reach the target; check the
//! WAL chain from its start to the archive's end has no gap; fetch, verify and decompress all
//! files in parallel; write `backup_label`, `recovery.signal` and the recovery settings
//! (restore_command pointing back at drctl); start PostgreSQL as the data directory's owner;
//! wait for promotion. A failed restore is made unstartable (`global/pg_control` renamed, a
//! `DRCTL_RESTORE_FAILED` file written) so it can never be mistaken for a usable cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::backup::physical::FileEntry;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::pg::Binaries;
use crate::pg::cluster::{OsUser, chown_tree, command_as, process_owner};
use crate::pipeline;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::repo::manifest::{BackupKind, Manifest};
use crate::storage::StorageError;
use crate::wal::continuity::Archive;
use crate::wal::{Lsn, Segment};

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Latest,
    Time(DateTime<Utc>),
    Lsn(Lsn),
    Xid(String),
    Name(String),
}

impl Target {
    pub fn describe(&self) -> String {
        match self {
            Target::Latest => "latest".into(),
            Target::Time(t) => t.to_rfc3339(),
            Target::Lsn(l) => format!("lsn {l}"),
            Target::Xid(x) => format!("xid {x}"),
            Target::Name(n) => format!("restore point {n:?}"),
        }
    }

    /// Parses `--pitr` values: `latest` or an RFC 3339 time.
    pub fn parse_time(s: &str) -> Result<Target> {
        if s == "latest" {
            return Ok(Target::Latest);
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| Target::Time(t.with_timezone(&Utc)))
            .map_err(|e| Error::Usage(format!("--pitr {s:?}: expected `latest` or an RFC 3339 time such as 2026-12-03T18:05:00Z ({e})")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArchiveMode {
    /// Keep the archive settings: the restored cluster archives its new timeline.
    Preserve,
    /// `archive_mode = off`: for a copy beside a primary that still runs.
    Off,
}

#[derive(Debug, Clone)]
pub struct PitrOptions {
    pub target: Target,
    pub target_dir: PathBuf,
    pub port: Option<u16>,
    pub socket_dir: Option<PathBuf>,
    pub backup: Option<String>,
    pub no_start: bool,
    pub archive_mode: ArchiveMode,
    pub jobs: usize,
    /// Longest wait for recovery to finish.
    pub timeout: Duration,
    /// Config file the restore_command hands to `drctl wal fetch`.
    pub config_path: PathBuf,
    /// Extra lines for postgresql.auto.conf (drills: fsync off, ...).
    pub extra_conf: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PitrReport {
    pub backup: String,
    pub target: String,
    pub target_dir: String,
    pub port: Option<u16>,
    pub socket_dir: Option<String>,
    pub started: bool,
    pub timeline: Option<u32>,
    pub bytes: u64,
    pub files: usize,
    pub stages: Vec<Stage>,
    pub total_seconds: f64,
}

/// Picks the newest physical backup that can reach `target`.
pub async fn choose_backup(
    repo: &Repo,
    target: &Target,
    explicit: Option<&str>,
) -> Result<Manifest> {
    if let Some(id) = explicit.filter(|id| *id != "latest") {
        let m = repo.load_manifest(id).await?;
        if m.kind != BackupKind::Physical {
            return Err(Error::Usage(format!(
                "backup {id} is {}, PITR needs a physical backup",
                m.kind
            )));
        }
        return Ok(m);
    }
    let physical: Vec<Manifest> = repo
        .catalog()
        .await?
        .into_iter()
        .filter_map(|e| e.manifest.ok())
        .filter(|m| m.kind == BackupKind::Physical && m.physical.is_some())
        .collect();
    let oldest = physical.first().ok_or_else(|| {
        Error::NotFound(format!(
            "no physical backup in stanza {}; run `drctl backup --type physical`",
            repo.stanza()
        ))
    })?;
    let fits = |m: &Manifest| match target {
        Target::Time(t) => m.finished_at <= *t,
        Target::Lsn(l) => m.physical.as_ref().is_some_and(|p| p.stop_lsn <= *l),
        _ => true,
    };
    physical.iter().rev().find(|m| fits(m)).cloned().ok_or_else(|| {
        Error::NotFound(format!(
            "target {} is before the oldest physical backup {} (consistent from {}); nothing can reach it",
            target.describe(),
            oldest.id,
            match target {
                Target::Lsn(_) => oldest.physical.as_ref().map(|p| p.stop_lsn.to_string()).unwrap_or_default(),
                _ => oldest.finished_at.to_rfc3339(),
            }
        ))
    })
}

/// Restores under a read lease: expire leaves the backup and its WAL alone meanwhile, also
/// while the cluster replays WAL through `wal fetch` before it promotes.
pub async fn run(cfg: &Config, repo: &Repo, opts: &PitrOptions) -> Result<PitrReport> {
    let what = format!("restore --pitr to {}", opts.target.describe());
    crate::repo::lock::reading(repo, &what, restore(cfg, repo, opts)).await
}

async fn restore(cfg: &Config, repo: &Repo, opts: &PitrOptions) -> Result<PitrReport> {
    let t_all = Instant::now();
    let mut stages = Vec::new();
    let mut stage = |name: &str, t: Instant| {
        stages.push(Stage {
            name: name.into(),
            seconds: t.elapsed().as_secs_f64(),
        })
    };

    // 1. Choose the backup; the target directory must be empty or absent.
    let t = Instant::now();
    check_empty(&opts.target_dir)?;
    let manifest = choose_backup(repo, &opts.target, opts.backup.as_deref()).await?;
    let p = manifest.physical.as_ref().expect("physical");
    stage("choose-backup", t);

    // 2. The WAL chain from the backup's start to the archive's end must have no gap.
    let t = Instant::now();
    let seg_size = p.wal_segment_size;
    let archive = Archive::load(repo, seg_size).await?;
    let start = Segment::parse(&p.start_wal, seg_size)
        .ok_or_else(|| Error::Corruption("bad start_wal".into()))?;
    let stop_seg = Segment::parse(&p.stop_wal, seg_size)
        .ok_or_else(|| Error::Corruption("bad stop_wal".into()))?;
    let chain = archive.chain(start, Some(stop_seg))?;
    if !chain.ok() {
        return Err(Error::Failed(format!(
            "WAL gap: backup {} needs WAL from {} on, but segment(s) {} are missing from the archive; \
             recovery past that point is impossible",
            manifest.id,
            p.start_wal,
            chain
                .gaps
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if let Target::Lsn(l) = &opts.target {
        let need = l.0 / seg_size;
        if chain.last_segment.map(|s| s.segno < need).unwrap_or(true) {
            return Err(Error::Failed(format!(
                "target {l} is beyond the archived WAL (newest contiguous segment: {})",
                chain.last_contiguous.clone().unwrap_or_default()
            )));
        }
    }
    stage("check-wal", t);

    // 3. Fetch, verify and decompress every file.
    let t = Instant::now();
    let owner = process_owner(None, cfg.postgres.os_user.as_deref())?;
    let restored = restore_files(repo, &manifest, &opts.target_dir, opts.jobs).await;
    if let Err(e) = restored {
        mark_failed(&opts.target_dir, &e.to_string());
        return Err(e);
    }
    stage("fetch-files", t);

    // 4. Recovery settings.
    let t = Instant::now();
    write_recovery(&opts.target_dir, &manifest, opts)?;
    if let Some(u) = &owner {
        chown_tree(&opts.target_dir, u)?;
    }
    stage("configure", t);

    let mut report = PitrReport {
        backup: manifest.id.clone(),
        target: opts.target.describe(),
        target_dir: opts.target_dir.display().to_string(),
        port: opts.port,
        socket_dir: opts.socket_dir.as_ref().map(|p| p.display().to_string()),
        started: false,
        timeline: None,
        bytes: manifest.raw_size(),
        files: p.files.len(),
        stages: Vec::new(),
        total_seconds: 0.0,
    };
    if opts.no_start {
        report.stages = stages;
        report.total_seconds = t_all.elapsed().as_secs_f64();
        return Ok(report);
    }

    // 5. Start as the owner and wait for recovery to end with a promotion.
    let t = Instant::now();
    let bins = Binaries::locate(cfg.postgres.bin_dir.as_deref());
    match start_and_wait(&bins, owner.as_ref(), opts).await {
        Ok(tli) => {
            report.timeline = tli;
            report.started = true;
        }
        Err(e) => {
            let _ = stop(&bins, owner.as_ref(), &opts.target_dir, "immediate");
            mark_failed(&opts.target_dir, &e.to_string());
            return Err(e);
        }
    }
    stage("recover-and-promote", t);
    report.stages = stages;
    report.total_seconds = t_all.elapsed().as_secs_f64();
    Ok(report)
}

fn check_empty(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(Error::Conflict(format!(
                    "target directory {} is not empty; restore only into an empty or absent directory",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("read {}", dir.display()), e)),
    }
}

async fn restore_files(repo: &Repo, m: &Manifest, dir: &Path, jobs: usize) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let p = m.physical.as_ref().expect("physical");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| Error::io("chmod target dir", e))?;
    for d in &p.dirs {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(d))
            .map_err(|e| Error::io(format!("create {d}"), e))?;
    }
    // Group by stored object: bundles are fetched once.
    let mut groups: std::collections::BTreeMap<String, Vec<FileEntry>> = Default::default();
    for f in &p.files {
        groups
            .entry(f.object.key.clone())
            .or_default()
            .push(f.clone());
    }
    let progress = Progress::bytes(
        &format!("restore {}", m.id),
        Some(p.files.iter().map(|f| f.object.raw_size).sum()),
    );
    let sem = Arc::new(Semaphore::new(jobs.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for (key, files) in groups {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let repo = repo.clone();
        let dir = dir.to_path_buf();
        let progress = progress.clone();
        set.spawn(async move {
            let _permit = permit;
            restore_group(&repo, &key, &files, &dir, &progress).await
        });
        while let Some(r) = set.try_join_next() {
            r.map_err(|e| Error::Failed(e.to_string()))??;
        }
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| Error::Failed(e.to_string()))??;
    }
    Ok(())
}

async fn restore_group(
    repo: &Repo,
    rel: &str,
    files: &[FileEntry],
    dir: &Path,
    progress: &Progress,
) -> Result<()> {
    let key = repo.key(rel);
    if files.len() == 1 && files[0].object.offset.is_none() {
        let f = &files[0];
        let r = pipeline::open_verified(&**repo.storage(), &key, &f.object)
            .await
            .map_err(missing_is_corruption)?;
        let path = dir.join(&f.path);
        let out = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        // Large buffers: every tokio file write is a trip to the blocking pool.
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, out);
        let mut r = tokio::io::BufReader::with_capacity(1 << 20, progress.reader(r));
        tokio::io::copy_buf(&mut r, &mut out).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                Error::Corruption(e.to_string())
            } else {
                Error::io(format!("restore {}", f.path), e)
            }
        })?;
        out.flush().await.map_err(|e| Error::io("flush", e))?;
        set_mode(&path, f.mode)?;
        return Ok(());
    }
    let bundle = crate::storage::get_bytes(&**repo.storage(), &key)
        .await
        .map_err(missing_is_corruption)?;
    for f in files {
        let raw = pipeline::unpack_member(&bundle, rel, &f.object)
            .await
            .map_err(Error::Corruption)?;
        let path = dir.join(&f.path);
        tokio::fs::write(&path, &raw)
            .await
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        set_mode(&path, f.mode)?;
        progress.inc(raw.len() as u64);
    }
    Ok(())
}

fn missing_is_corruption(e: StorageError) -> Error {
    match e {
        StorageError::NotFound(k) => {
            Error::Corruption(format!("object missing from the repository: {k}"))
        }
        other => Error::Storage(other),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if mode == 0 { 0o600 } else { mode & 0o700 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("chmod", e))
}

/// SQL string literal for postgresql.conf.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn write_recovery(dir: &Path, m: &Manifest, opts: &PitrOptions) -> Result<()> {
    let p = m.physical.as_ref().expect("physical");
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| Error::io(format!("write {name}"), e))
    };
    write("backup_label", &p.backup_label)?;
    if !p.tablespace_map.is_empty() {
        write("tablespace_map", &p.tablespace_map)?;
    }
    let _ = std::fs::remove_file(dir.join("standby.signal"));
    write("recovery.signal", "")?;
    // Debian keeps postgresql.conf and pg_hba.conf outside the data directory.
    if !dir.join("postgresql.conf").exists() {
        write(
            "postgresql.conf",
            "# created by drctl restore: the backed-up cluster kept its config elsewhere\n",
        )?;
    }
    if !dir.join("pg_hba.conf").exists() {
        write(
            "pg_hba.conf",
            "# created by drctl restore\nlocal all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )?;
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("locate drctl", e))?;
    let restore_command = format!(
        "{} --config {} wal fetch %f %p",
        shell_quote(&exe.display().to_string()),
        shell_quote(&opts.config_path.display().to_string())
    );
    let mut conf = format!(
        "\n# drctl restore of backup {} to {} at {}\nrestore_command = {}\nrecovery_target_action = 'promote'\nrecovery_target_timeline = 'latest'\n",
        m.id,
        opts.target.describe(),
        Utc::now().to_rfc3339(),
        conf_quote(&restore_command)
    );
    match &opts.target {
        Target::Latest => {}
        Target::Time(t) => {
            conf += &format!(
                "recovery_target_time = {}\n",
                conf_quote(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
            )
        }
        Target::Lsn(l) => conf += &format!("recovery_target_lsn = '{l}'\n"),
        Target::Xid(x) => conf += &format!("recovery_target_xid = {}\n", conf_quote(x)),
        Target::Name(n) => conf += &format!("recovery_target_name = {}\n", conf_quote(n)),
    }
    if opts.archive_mode == ArchiveMode::Off {
        conf += "archive_mode = off\n";
    }
    if let Some(port) = opts.port {
        conf += &format!("port = {port}\n");
    }
    if let Some(s) = &opts.socket_dir {
        conf += &format!(
            "unix_socket_directories = {}\n",
            conf_quote(&s.display().to_string())
        );
    }
    conf += &opts.extra_conf;
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("postgresql.auto.conf"))
        .map_err(|e| Error::io("open postgresql.auto.conf", e))?;
    f.write_all(conf.as_bytes())
        .map_err(|e| Error::io("write postgresql.auto.conf", e))?;
    Ok(())
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("drctl-restore.log")
}

fn log_tail(dir: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log_path(dir)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn pg_ctl(
    bins: &Binaries,
    owner: Option<&OsUser>,
    dir: &Path,
    args: &[&str],
) -> Result<std::process::Output> {
    command_as(bins.path("pg_ctl"), owner)
        .arg("-D")
        .arg(dir)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io("run pg_ctl", e))
}

pub fn stop(bins: &Binaries, owner: Option<&OsUser>, dir: &Path, mode: &str) -> Result<()> {
    if dir.join("postmaster.pid").exists() {
        pg_ctl(bins, owner, dir, &["-m", mode, "-w", "-t", "60", "stop"])?;
    }
    Ok(())
}

/// `Database cluster state` and timeline from pg_controldata.
pub fn control_state(bins: &Binaries, dir: &Path) -> Option<(String, Option<u32>)> {
    let out = std::process::Command::new(bins.path("pg_controldata"))
        .arg("-D")
        .arg(dir)
        .env("LC_ALL", "C")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let state = text
        .lines()
        .find_map(|l| l.strip_prefix("Database cluster state:"))?
        .trim()
        .to_string();
    let tli = text
        .lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint's TimeLineID:"))
        .and_then(|v| v.trim().parse().ok());
    Some((state, tli))
}

async fn start_and_wait(
    bins: &Binaries,
    owner: Option<&OsUser>,
    opts: &PitrOptions,
) -> Result<Option<u32>> {
    let dir = &opts.target_dir;
    let log = log_path(dir);
    std::fs::write(&log, "").map_err(|e| Error::io("create restore log", e))?;
    if let Some(u) = owner {
        let _ = std::os::unix::fs::chown(&log, Some(u.uid), Some(u.gid));
    }
    let log_s = log.display().to_string();
    let out = pg_ctl(bins, owner, dir, &["-l", &log_s, "-W", "start"])?;
    if !out.status.success() {
        return Err(Error::Failed(format!(
            "PostgreSQL did not start: {}\n--- tail of {} ---\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            log.display(),
            log_tail(dir, 30)
        )));
    }
    let deadline = Instant::now() + opts.timeout;
    // Give the postmaster a moment to write its pid file.
    tokio::time::sleep(Duration::from_millis(300)).await;
    loop {
        if let Some((state, tli)) = control_state(bins, dir)
            && state == "in production"
            && !dir.join("recovery.signal").exists()
        {
            return Ok(tli);
        }
        let status = pg_ctl(bins, owner, dir, &["status"])?;
        if status.status.code() == Some(3) {
            return Err(Error::Failed(format!(
                "recovery failed: PostgreSQL stopped before promoting\n--- tail of {} ---\n{}",
                log.display(),
                log_tail(dir, 30)
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Failed(format!(
                "recovery did not finish within {:?}\n--- tail of {} ---\n{}",
                opts.timeout,
                log.display(),
                log_tail(dir, 30)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Makes a failed restore unstartable and says why, in the directory itself.
fn mark_failed(dir: &Path, why: &str) {
    let control = dir.join("global/pg_control");
    if control.exists() {
        let _ = std::fs::rename(&control, dir.join("global/pg_control.drctl-failed"));
    }
    let _ = std::fs::write(
        dir.join("DRCTL_RESTORE_FAILED"),
        format!(
            "This directory holds a FAILED drctl restore ({}). It is not a usable cluster: \
             global/pg_control was renamed so PostgreSQL will not start it.\n\n{why}\n",
            Utc::now().to_rfc3339()
        ),
    );
}
