//! Validation checks: health checks against the protected cluster and the repository, and
//! tests against a restored target. Each check returns pass, fail or warn (a failed check with
//! `required = false`) with a message a person can act on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::SimpleQueryMessage;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pg::{self, Endpoint};
use crate::repo::{BackupKind, Manifest, Repo};
use crate::restore::plan::{Check, CheckKind, Expect, StageKind, parse_duration};
use crate::wal::Segment;
use crate::wal::continuity::Archive;

#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Pass,
    Fail,
    Warn,
    Timeout,
    Skipped,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CheckResult {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: Status,
    pub message: String,
    pub seconds: f64,
}

/// What checks run against.
#[derive(Debug, Clone)]
pub struct CheckCtx {
    pub cfg: Config,
    pub repo: Repo,
    /// The configured (protected) cluster.
    pub source: Endpoint,
    /// The restored cluster, for test stages.
    pub target: Option<Endpoint>,
    /// The backup the target was restored from.
    pub restored: Option<Manifest>,
    pub now: DateTime<Utc>,
    pub rpo: Duration,
}

impl CheckCtx {
    fn endpoint(&self, stage: StageKind) -> Result<&Endpoint> {
        match stage {
            StageKind::Test => self
                .target
                .as_ref()
                .ok_or_else(|| Error::Usage("no restored target to test".into())),
            _ => Ok(&self.source),
        }
    }
}

/// Runs one check; never panics, never returns an error: failures are results.
pub async fn run(check: &Check, stage: StageKind, ctx: &CheckCtx) -> CheckResult {
    let t = Instant::now();
    let outcome = match run_inner(check, stage, ctx).await {
        Ok(Ok(msg)) => (Status::Pass, msg),
        Ok(Err(msg)) => (
            if check.required {
                Status::Fail
            } else {
                Status::Warn
            },
            msg,
        ),
        Err(e) => (
            if check.required {
                Status::Fail
            } else {
                Status::Warn
            },
            e.to_string(),
        ),
    };
    CheckResult {
        name: check.label(),
        kind: check.kind.name().into(),
        status: outcome.0,
        message: outcome.1,
        seconds: t.elapsed().as_secs_f64(),
    }
}

/// Ok(Ok(msg)): passed. Ok(Err(msg)): the check ran and found a problem. Err: could not run.
type Verdict = Result<std::result::Result<String, String>>;

async fn run_inner(c: &Check, stage: StageKind, ctx: &CheckCtx) -> Verdict {
    let db = || {
        c.database
            .clone()
            .unwrap_or_else(|| ctx.cfg.postgres.database.clone())
    };
    match c.kind {
        CheckKind::Connect => {
            let ep = ctx.endpoint(stage)?;
            let client = ep.connect(&db()).await?;
            let v: String = client
                .query_one("SELECT current_setting('server_version')", &[])
                .await
                .map_err(|e| Error::pg("connect check", e))?
                .get(0);
            Ok(Ok(format!(
                "connected to {} (PostgreSQL {v})",
                ep.describe()
            )))
        }
        CheckKind::Connections => {
            let client = ctx.endpoint(stage)?.connect(&db()).await?;
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM pg_stat_activity)::float8, current_setting('max_connections')::float8",
                    &[],
                )
                .await
                .map_err(|e| Error::pg("counting connections", e))?;
            let (used, max): (f64, f64) = (row.get(0), row.get(1));
            let limit = c.max_percent.unwrap_or(80.0);
            let pct = 100.0 * used / max;
            let msg = format!("{used} of {max} connections in use ({pct:.0}%, limit {limit}%)");
            Ok(if pct < limit { Ok(msg) } else { Err(msg) })
        }
        CheckKind::LongRunningQueries => {
            let max = parse_duration(c.max_age.as_deref().unwrap_or("5m"), "max-age")?;
            let client = ctx.endpoint(stage)?.connect(&db()).await?;
            let rows = client
                .query(
                    "SELECT pid, extract(epoch FROM now() - query_start)::float8, left(query, 60) FROM pg_stat_activity \
                     WHERE state <> 'idle' AND pid <> pg_backend_pid() AND query_start < now() - make_interval(secs => $1) \
                     ORDER BY query_start",
                    &[&max.as_secs_f64()],
                )
                .await
                .map_err(|e| Error::pg("reading pg_stat_activity", e))?;
            if rows.is_empty() {
                return Ok(Ok(format!(
                    "no query running longer than {}",
                    humantime::format_duration(max)
                )));
            }
            let list: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "pid {} for {:.0}s: {}",
                        r.get::<_, i32>(0),
                        r.get::<_, f64>(1),
                        r.get::<_, String>(2)
                    )
                })
                .collect();
            Ok(Err(format!(
                "{} queries run longer than {}: {} (consider pg_terminate_backend if safe)",
                rows.len(),
                humantime::format_duration(max),
                list.join("; ")
            )))
        }
        CheckKind::RlsEnabled => rls_enabled(c, ctx.endpoint(stage)?, &db()).await,
        CheckKind::Archiver => archiver(ctx, &db()).await,
        CheckKind::BackupAge => backup_age(c, ctx).await,
        CheckKind::WalContinuity => wal_continuity(ctx).await,
        CheckKind::Repository => repository(ctx).await,
        CheckKind::DiskFree => disk_free(c, ctx),
        CheckKind::Sql => sql(c, ctx.endpoint(stage)?, &db()).await,
        CheckKind::TenantIsolation => tenant_isolation(c, ctx.endpoint(stage)?, &db()).await,
        CheckKind::RowCounts => row_counts(c, ctx, &db()).await,
        CheckKind::Amcheck => amcheck(ctx.endpoint(stage)?, &db()).await,
        CheckKind::Http => http(c).await,
        CheckKind::Command => command(c).await,
    }
}

/// Splits `schema.table` (default schema public).
fn split_table(t: &str) -> (String, String) {
    match t.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => ("public".to_string(), t.to_string()),
    }
}

async fn rls_enabled(c: &Check, ep: &Endpoint, db: &str) -> Verdict {
    let client = ep.connect(db).await?;
    let mut off = Vec::new();
    let mut missing = Vec::new();
    for t in &c.tables {
        let (schema, name) = split_table(t);
        let row = client
            .query_opt(
                "SELECT c.relrowsecurity FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &name],
            )
            .await
            .map_err(|e| Error::pg("reading pg_class", e))?;
        match row {
            None => missing.push(t.clone()),
            Some(r) if !r.get::<_, bool>(0) => off.push(t.clone()),
            Some(_) => {}
        }
    }
    if off.is_empty() && missing.is_empty() {
        return Ok(Ok(format!(
            "row-level security is enabled on {} in {db}",
            c.tables.join(", ")
        )));
    }
    let mut parts = Vec::new();
    if !off.is_empty() {
        parts.push(format!(
            "row-level security is DISABLED on {} (rowsecurity = false); re-apply the RLS migration: ALTER TABLE ... ENABLE ROW LEVEL SECURITY",
            off.join(", ")
        ));
    }
    if !missing.is_empty() {
        parts.push(format!(
            "table(s) {} do not exist in {db}",
            missing.join(", ")
        ));
    }
    Ok(Err(parts.join("; ")))
}

/// Age of the oldest change the archive does not hold yet, at most: zero when the current
/// WAL position is inside the last archived segment, else the time since the last archive.
pub async fn rpo_exposure(ep: &Endpoint, db: &str, now: DateTime<Utc>) -> Result<ArchiverState> {
    let client = ep.connect(db).await?;
    let row = client
        .query_one(
            "SELECT coalesce(last_archived_wal, ''), extract(epoch FROM last_archived_time)::float8, \
             coalesce(last_failed_wal, ''), extract(epoch FROM last_failed_time)::float8, failed_count, \
             pg_walfile_name(pg_current_wal_lsn()), (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8, \
             current_setting('archive_mode'), \
             (SELECT setting::int FROM pg_settings WHERE name = 'archive_timeout') \
             FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(|e| Error::pg("reading pg_stat_archiver", e))?;
    let last_archived: String = row.get(0);
    let last_archived_time: Option<f64> = row.get(1);
    let last_failed: String = row.get(2);
    let last_failed_time: Option<f64> = row.get(3);
    let current: String = row.get(5);
    let lsn: f64 = row.get(6);
    let archive_mode: String = row.get(7);
    let archive_timeout: i32 = row.get(8);
    // pg_walfile_name(current) names the segment being written; its predecessor must be archived.
    let seg_size = 16.0 * 1024.0 * 1024.0_f64;
    let at_segment_start = (lsn % seg_size) < 1.0;
    let current_seg = Segment::parse(&current, seg_size as u64);
    let archived_seg = Segment::parse(last_archived.get(..24).unwrap_or(""), seg_size as u64);
    let behind = match (current_seg, archived_seg) {
        (Some(c), Some(a)) => {
            let need = if at_segment_start {
                c.segno.saturating_sub(1)
            } else {
                c.segno
            };
            // The segment being written is never archived yet: anything in it is exposed.
            a.segno < need || !at_segment_start
        }
        (Some(_), None) => true,
        _ => true,
    };
    let to_time = |e: Option<f64>| {
        e.and_then(|s| DateTime::<Utc>::from_timestamp(s as i64, ((s.fract()) * 1e9) as u32))
    };
    let archived_at = to_time(last_archived_time);
    let exposure = if !behind {
        Duration::ZERO
    } else {
        archived_at
            .map(|t| (now - t).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::MAX)
    };
    Ok(ArchiverState {
        archive_mode,
        archive_timeout: Duration::from_secs(archive_timeout.max(0) as u64),
        last_archived,
        last_archived_at: archived_at,
        last_failed,
        last_failed_at: to_time(last_failed_time),
        failed_count: row.get(4),
        exposure,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchiverState {
    pub archive_mode: String,
    #[serde(with = "humantime_serde_compat")]
    pub archive_timeout: Duration,
    pub last_archived: String,
    pub last_archived_at: Option<DateTime<Utc>>,
    pub last_failed: String,
    pub last_failed_at: Option<DateTime<Utc>>,
    pub failed_count: i64,
    #[serde(with = "humantime_serde_compat")]
    pub exposure: Duration,
}

mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        if *d == std::time::Duration::MAX {
            s.serialize_none()
        } else {
            s.serialize_f64(d.as_secs_f64())
        }
    }
}

async fn archiver(ctx: &CheckCtx, db: &str) -> Verdict {
    let st = rpo_exposure(&ctx.source, db, ctx.now).await?;
    let rpo = ctx.rpo;
    let mut problems = Vec::new();
    if st.archive_mode == "off" {
        problems.push("archive_mode is off: nothing is archived".to_string());
    }
    if st.archive_timeout.is_zero() || st.archive_timeout > rpo {
        problems.push(format!(
            "archive_timeout is {} but the RPO is {}: a quiet database can keep changes unarchived longer than the RPO",
            if st.archive_timeout.is_zero() { "0 (off)".into() } else { humantime::format_duration(st.archive_timeout).to_string() },
            humantime::format_duration(rpo)
        ));
    }
    let failing = match (st.last_failed_at, st.last_archived_at) {
        (Some(f), Some(a)) => f > a,
        (Some(_), None) => true,
        _ => false,
    };
    if failing {
        problems.push(format!(
            "archiving is failing: {} failed at {} ({} failures in all); check archive_command and the repository",
            st.last_failed,
            st.last_failed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            st.failed_count
        ));
    }
    if st.exposure > rpo {
        problems.push(format!(
            "archive lag {} exceeds the RPO {} (last archived {} at {})",
            if st.exposure == Duration::MAX {
                "unknown (nothing archived yet)".into()
            } else {
                format!("{:.0}s", st.exposure.as_secs_f64())
            },
            humantime::format_duration(rpo),
            st.last_archived,
            st.last_archived_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "never".into())
        ));
    }
    if problems.is_empty() {
        Ok(Ok(format!(
            "archiving healthy: last archived {}, lag {:.0}s within RPO {}",
            st.last_archived,
            st.exposure.as_secs_f64(),
            humantime::format_duration(rpo)
        )))
    } else {
        Ok(Err(problems.join("; ")))
    }
}

/// The newest committed backup of each kind.
pub async fn newest_backups(repo: &Repo) -> Result<Vec<Manifest>> {
    let mut out: Vec<Manifest> = Vec::new();
    for e in repo.catalog().await?.into_iter().rev() {
        if let Ok(m) = e.manifest
            && !out.iter().any(|o| o.kind == m.kind)
        {
            out.push(m);
        }
    }
    Ok(out)
}

async fn backup_age(c: &Check, ctx: &CheckCtx) -> Verdict {
    let max = parse_duration(c.max_age.as_deref().unwrap_or("26h"), "max-age")?;
    let newest = newest_backups(&ctx.repo).await?;
    let wanted: Vec<BackupKind> = if c.types.is_empty() {
        newest.iter().map(|m| m.kind).collect()
    } else {
        c.types
            .iter()
            .map(|t| match t.as_str() {
                "logical" => Ok(BackupKind::Logical),
                "physical" => Ok(BackupKind::Physical),
                other => Err(Error::Config(format!(
                    "backup-age: unknown type {other:?} (logical, physical)"
                ))),
            })
            .collect::<Result<_>>()?
    };
    if wanted.is_empty() {
        return Ok(Err("the repository holds no backup at all".into()));
    }
    let mut problems = Vec::new();
    let mut ok = Vec::new();
    for k in wanted {
        match newest.iter().find(|m| m.kind == k) {
            None => problems.push(format!("no {k} backup")),
            Some(m) => {
                let age = (ctx.now - m.finished_at).to_std().unwrap_or(Duration::ZERO);
                let text = format!(
                    "newest {k} backup {} is {} old",
                    m.id,
                    humantime::format_duration(Duration::from_secs(age.as_secs()))
                );
                if age > max {
                    problems.push(format!(
                        "{text} (limit {})",
                        humantime::format_duration(max)
                    ));
                } else {
                    ok.push(text);
                }
            }
        }
    }
    Ok(verdict(ok, problems))
}

async fn wal_continuity(ctx: &CheckCtx) -> Verdict {
    let newest = newest_backups(&ctx.repo).await?;
    let Some(m) = newest.iter().find(|m| m.kind == BackupKind::Physical) else {
        return Ok(Err(
            "no physical backup: there is no WAL chain to check".into()
        ));
    };
    let p = m.physical.as_ref().expect("physical");
    let archive = Archive::load(&ctx.repo, p.wal_segment_size).await?;
    let start = Segment::parse(&p.start_wal, p.wal_segment_size)
        .ok_or_else(|| Error::Corruption("bad start_wal".into()))?;
    let stop = Segment::parse(&p.stop_wal, p.wal_segment_size)
        .ok_or_else(|| Error::Corruption("bad stop_wal".into()))?;
    let chain = archive.chain(start, Some(stop))?;
    if chain.ok() {
        Ok(Ok(format!(
            "WAL from {} to {} is complete (timelines {:?})",
            chain.start,
            chain.last_contiguous.unwrap_or_default(),
            chain.timelines
        )))
    } else {
        Ok(Err(format!(
            "WAL gap after backup {}: missing {}",
            m.id,
            chain
                .gaps
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

async fn repository(ctx: &CheckCtx) -> Verdict {
    let key = ctx.repo.key(&format!(
        "locks/probe-{}-{}",
        crate::backup::logical::hostname(),
        std::process::id()
    ));
    let body = format!("drctl repository probe {}", Utc::now().to_rfc3339());
    let st = ctx.repo.storage();
    crate::storage::put_bytes(
        &**st,
        &key,
        bytes::Bytes::from(body.clone()),
        crate::storage::PutMode::Overwrite,
    )
    .await?;
    let back = crate::storage::get_bytes(&**st, &key).await?;
    st.delete(&key).await?;
    if back != body.as_bytes() {
        return Ok(Err(format!(
            "{}: read back different bytes than written",
            st.describe()
        )));
    }
    Ok(Ok(format!("{} is reachable and writable", st.describe())))
}

fn disk_free(c: &Check, ctx: &CheckCtx) -> Verdict {
    let min = c.min_free_percent.unwrap_or(20.0);
    let mut paths: Vec<PathBuf> = c.paths.clone();
    if paths.is_empty() {
        if let Some(d) = &ctx.cfg.postgres.data_dir {
            paths.push(d.clone());
        }
        paths.push(ctx.cfg.spool_dir.clone().unwrap_or_else(std::env::temp_dir));
    }
    let mut problems = Vec::new();
    let mut ok = Vec::new();
    for p in paths {
        // A path not created yet (a spool before its first use) lives on its nearest ancestor.
        let p = p
            .ancestors()
            .find(|a| a.exists())
            .map(|a| a.to_path_buf())
            .unwrap_or(p);
        let c_path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Usage("bad path".into()))?;
        // SAFETY: statvfs writes into the zeroed struct we own.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c_path.as_ptr(), &mut s) } != 0 {
            problems.push(format!(
                "{}: {}",
                p.display(),
                std::io::Error::last_os_error()
            ));
            continue;
        }
        let free = 100.0 * s.f_bavail as f64 / s.f_blocks.max(1) as f64;
        let text = format!("{}: {free:.0}% free", p.display());
        if free < min {
            problems.push(format!("{text} (minimum {min}%)"));
        } else {
            ok.push(text);
        }
    }
    Ok(verdict(ok, problems))
}

/// Evaluates an expectation against text rows.
pub fn judge(expect: &Expect, rows: &[Vec<Option<String>>]) -> std::result::Result<String, String> {
    let first = rows.first().and_then(|r| r.first()).cloned().flatten();
    if expect.no_rows {
        return if rows.is_empty() {
            Ok("no rows, as expected".into())
        } else {
            Err(format!("expected no rows, got {}", rows.len()))
        };
    }
    if let Some(n) = expect.rows
        && rows.len() as u64 != n
    {
        return Err(format!("expected {n} rows, got {}", rows.len()));
    }
    let num = first.as_deref().and_then(|v| v.trim().parse::<f64>().ok());
    if let Some(min) = expect.min {
        match num {
            Some(v) if v >= min => {}
            Some(v) => return Err(format!("value {v} is below the minimum {min}")),
            None => return Err(format!("expected a number >= {min}, got {first:?}")),
        }
    }
    if let Some(max) = expect.max {
        match num {
            Some(v) if v <= max => {}
            Some(v) => return Err(format!("value {v} is above the maximum {max}")),
            None => return Err(format!("expected a number <= {max}, got {first:?}")),
        }
    }
    if let Some(eq) = &expect.equals {
        let matches = match (eq, first.as_deref()) {
            (toml::Value::String(s), Some(v)) => s == v,
            (toml::Value::Integer(i), Some(v)) => v.trim().parse::<f64>().ok() == Some(*i as f64),
            (toml::Value::Float(f), Some(v)) => v.trim().parse::<f64>().ok() == Some(*f),
            (toml::Value::Boolean(b), Some(v)) => (v == "t" || v == "true") == *b,
            _ => false,
        };
        if !matches {
            return Err(format!(
                "expected {eq}, got {}",
                first.unwrap_or_else(|| "NULL / no row".into())
            ));
        }
    }
    Ok(format!(
        "{} row(s){}",
        rows.len(),
        first
            .map(|v| format!(", first value {v}"))
            .unwrap_or_default()
    ))
}

async fn sql(c: &Check, ep: &Endpoint, db: &str) -> Verdict {
    let client = ep.connect(db).await?;
    let q = c.query.as_deref().unwrap_or_default();
    let msgs = client
        .simple_query(q)
        .await
        .map_err(|e| Error::pg(format!("query {q:?}"), e))?;
    let rows: Vec<Vec<Option<String>>> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect();
    Ok(
        judge(c.expect.as_ref().unwrap_or(&Expect::default()), &rows)
            .map_err(|e| format!("{q}: {e}")),
    )
}

async fn tenant_isolation(c: &Check, ep: &Endpoint, db: &str) -> Verdict {
    let mut client = ep.connect(db).await?;
    let col = c.tenant_column.clone().unwrap_or_default();
    let setting = c.setting.clone().unwrap_or_default();
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::pg("begin", e))?;
    // Tenants: as given, else every distinct value (read before dropping privileges).
    let mut tenants = c.tenants.clone();
    if tenants.is_empty() {
        for t in &c.tables {
            let (s, n) = split_table(t);
            let q = format!(
                "SELECT DISTINCT {col}::text FROM {}.{} WHERE {col} IS NOT NULL LIMIT 20",
                pg::quote_ident(&s),
                pg::quote_ident(&n),
                col = pg::quote_ident(&col)
            );
            for r in tx
                .query(&q, &[])
                .await
                .map_err(|e| Error::pg(format!("reading tenants of {t}"), e))?
            {
                let v: String = r.get(0);
                if !tenants.contains(&v) {
                    tenants.push(v);
                }
            }
        }
        tenants.truncate(20);
    }
    if tenants.is_empty() {
        return Ok(Err(format!(
            "no tenants found in {}: nothing to prove",
            c.tables.join(", ")
        )));
    }
    // A role without BYPASSRLS, created inside this transaction and rolled back with it.
    let role = format!("drctl_tenant_probe_{}", std::process::id());
    let mut setup = format!("CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS;");
    for t in &c.tables {
        let (s, n) = split_table(t);
        setup += &format!(
            "GRANT USAGE ON SCHEMA {s} TO {role}; GRANT SELECT ON {s}.{n} TO {role};",
            s = pg::quote_ident(&s),
            n = pg::quote_ident(&n)
        );
    }
    setup += &format!("SET LOCAL ROLE {role};");
    tx.batch_execute(&setup)
        .await
        .map_err(|e| Error::pg("preparing the probe role", e))?;
    let mut leaks = Vec::new();
    for tenant in &tenants {
        tx.execute("SELECT set_config($1, $2, true)", &[&setting, tenant])
            .await
            .map_err(|e| Error::pg("setting the tenant", e))?;
        for t in &c.tables {
            let (s, n) = split_table(t);
            let q = format!(
                "SELECT count(*) FROM {}.{} WHERE {col}::text IS DISTINCT FROM $1",
                pg::quote_ident(&s),
                pg::quote_ident(&n),
                col = pg::quote_ident(&col)
            );
            let other: i64 = tx
                .query_one(&q, &[tenant])
                .await
                .map_err(|e| Error::pg(format!("probing {t} as tenant {tenant}"), e))?
                .get(0);
            if other > 0 {
                leaks.push(format!(
                    "tenant {tenant} sees {other} rows of other tenants in {t}"
                ));
            }
        }
    }
    let _ = tx.rollback().await;
    if leaks.is_empty() {
        Ok(Ok(format!(
            "{} tenants x {} tables: no row of another tenant visible to a role without BYPASSRLS",
            tenants.len(),
            c.tables.len()
        )))
    } else {
        Ok(Err(format!(
            "TENANT DATA LEAK: {}",
            leaks.into_iter().take(10).collect::<Vec<_>>().join("; ")
        )))
    }
}

async fn row_counts(_c: &Check, ctx: &CheckCtx, db: &str) -> Verdict {
    let Some(m) = &ctx.restored else {
        return Ok(Err("row-counts needs a restored logical backup".into()));
    };
    let Some(entry) = m.databases.iter().find(|d| d.name == db) else {
        return Ok(Err(format!(
            "backup {} ({}) records no row counts for database {db}; row-counts applies to logical backups",
            m.id, m.kind
        )));
    };
    let target = ctx
        .target
        .as_ref()
        .ok_or_else(|| Error::Usage("no restored target".into()))?;
    let client = target.connect(db).await?;
    let mut bad = Vec::new();
    for (table, expected) in &entry.row_counts {
        let (s, n) = split_table(table);
        let q = format!(
            "SELECT count(*) FROM {}.{}",
            pg::quote_ident(&s),
            pg::quote_ident(&n)
        );
        match client.query_one(&q, &[]).await {
            Ok(r) => {
                let got: i64 = r.get(0);
                if got != *expected {
                    bad.push(format!("{table}: {got} rows, backup recorded {expected}"));
                }
            }
            Err(e) => bad.push(format!("{table}: {e}")),
        }
    }
    Ok(if bad.is_empty() {
        Ok(format!(
            "{} tables match the counts recorded in backup {}",
            entry.row_counts.len(),
            m.id
        ))
    } else {
        Err(bad.join("; "))
    })
}

async fn amcheck(ep: &Endpoint, db: &str) -> Verdict {
    let client = ep.connect(db).await?;
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        .await
        .map_err(|e| Error::pg("CREATE EXTENSION amcheck (install postgresql-contrib)", e))?;
    let idx = client
        .query(
            "SELECT c.oid, n.nspname || '.' || c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_am a ON a.oid = c.relam \
             WHERE a.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready",
            &[],
        )
        .await
        .map_err(|e| Error::pg("listing indexes", e))?;
    let mut bad = Vec::new();
    for r in &idx {
        let oid: u32 = r.get(0);
        let name: String = r.get(1);
        if let Err(e) = client
            .execute("SELECT bt_index_check($1::oid::regclass, true)", &[&oid])
            .await
        {
            bad.push(format!(
                "{name}: {}",
                e.as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or(e.to_string())
            ));
        }
    }
    Ok(if bad.is_empty() {
        Ok(format!(
            "{} B-tree indexes verified (bt_index_check with heapallindexed)",
            idx.len()
        ))
    } else {
        Err(format!("corrupt indexes: {}", bad.join("; ")))
    })
}

async fn http(c: &Check) -> Verdict {
    let url = c.url.clone().unwrap_or_default();
    let want = c.status.unwrap_or(200);
    let got = http_get_status(&url).await?;
    let msg = format!("GET {url}: status {got}");
    Ok(if got == want {
        Ok(msg)
    } else {
        Err(format!("{msg}, expected {want}"))
    })
}

/// A plain HTTP/1.1 GET returning the status code (http:// only; for https use a `command`
/// check with curl).
pub async fn http_get_status(url: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        Error::Usage(format!(
            "{url}: only http:// URLs are supported; use a `command` check with curl for https"
        ))
    })?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .map_err(|_| Error::Failed(format!("{url}: connect timed out")))?
    .map_err(|e| Error::io(format!("connect {addr}"), e))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nUser-Agent: drctl\r\n\r\n").as_bytes())
        .await
        .map_err(|e| Error::io("send request", e))?;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .map_err(|_| Error::Failed(format!("{url}: no response in 10s")))?
        .map_err(|e| Error::io("read response", e))?;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::Failed(format!("{url}: not an HTTP response: {line:?}")))
}

async fn command(c: &Check) -> Verdict {
    let want = c.exit_code.unwrap_or(0);
    let out = tokio::process::Command::new(&c.argv[0])
        .args(&c.argv[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::io(format!("run {}", c.argv[0]), e))?;
    let code = out.status.code().unwrap_or(-1);
    let tail = String::from_utf8_lossy(if out.stderr.is_empty() {
        &out.stdout
    } else {
        &out.stderr
    })
    .lines()
    .last()
    .unwrap_or("")
    .to_string();
    let msg = format!(
        "{} exited {code}{}",
        c.argv.join(" "),
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    );
    Ok(if code == want {
        Ok(msg)
    } else {
        Err(format!("{msg} (expected {want})"))
    })
}

/// A check's outcome from its findings: the problems if there are any, else what was fine.
fn verdict(ok: Vec<String>, problems: Vec<String>) -> std::result::Result<String, String> {
    if problems.is_empty() {
        Ok(ok.join("; "))
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[&[&str]]) -> Vec<Vec<Option<String>>> {
        v.iter()
            .map(|r| r.iter().map(|s| Some(s.to_string())).collect())
            .collect()
    }

    #[test]
    fn expectations() {
        let e = Expect {
            min: Some(1.0),
            ..Default::default()
        };
        assert!(judge(&e, &rows(&[&["5"]])).is_ok());
        assert!(judge(&e, &rows(&[&["0"]])).is_err());
        assert!(judge(&e, &rows(&[])).is_err());
        let e = Expect {
            max: Some(3.0),
            ..Default::default()
        };
        assert!(judge(&e, &rows(&[&["4"]])).is_err());
        let e = Expect {
            equals: Some(toml::Value::String("on".into())),
            ..Default::default()
        };
        assert!(judge(&e, &rows(&[&["on"]])).is_ok());
        assert!(judge(&e, &rows(&[&["off"]])).is_err());
        let e = Expect {
            equals: Some(toml::Value::Integer(3)),
            ..Default::default()
        };
        assert!(judge(&e, &rows(&[&["3"]])).is_ok());
        let e = Expect {
            no_rows: true,
            ..Default::default()
        };
        assert!(judge(&e, &rows(&[])).is_ok());
        assert!(judge(&e, &rows(&[&["x"]])).is_err());
        let e = Expect {
            rows: Some(2),
            ..Default::default()
        };
        assert!(judge(&e, &rows(&[&["a"], &["b"]])).is_ok());
        assert!(judge(&e, &rows(&[&["a"]])).is_err());
    }
}
