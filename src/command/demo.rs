//! `drctl demo`: the guided tour on an embedded default. It creates a throwaway PostgreSQL
//! cluster with sample data shaped like the runbook's (tenants, row-level security), a
//! local-directory repository, then takes a backup, lists and verifies it, restores it into a
//! new database and compares every table with the original.

use std::time::Instant;

use serde_json::json;

use super::{Ctx, Output};
use crate::cli::DemoArgs;
use crate::config::{Config, RepositoryConfig};
use crate::error::{Error, ExitCode, Result};
use crate::pg::cluster::TempCluster;
use crate::pg::{Binaries, Endpoint};

/// The shipped monthly drill plan, built in so the demo runs from anywhere.
pub const DRILL_PLAN: &str = include_str!("../../restore-plans/drill.toml");

pub const SAMPLE_SCHEMA: &str = r#"
CREATE TABLE workspaces (id bigserial PRIMARY KEY, tenant_id text NOT NULL, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE workspace_runs (id bigserial PRIMARY KEY, tenant_id text NOT NULL, workspace_id bigint REFERENCES workspaces(id), status text NOT NULL, payload text);
CREATE TABLE audit_bundles (id bigserial PRIMARY KEY, tenant_id text NOT NULL, bundle bytea NOT NULL);
CREATE INDEX ON workspace_runs (tenant_id);
ALTER TABLE workspaces ENABLE ROW LEVEL SECURITY;
ALTER TABLE workspace_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_bundles ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON workspaces USING (tenant_id = current_setting('app.current_tenant_id', true));
CREATE POLICY tenant_isolation ON workspace_runs USING (tenant_id = current_setting('app.current_tenant_id', true));
CREATE POLICY tenant_isolation ON audit_bundles USING (tenant_id = current_setting('app.current_tenant_id', true));
"#;

/// Inserts `rows` rows of sample data (tenants t0..t9) into the sample schema.
pub fn sample_data_sql(rows: u32) -> String {
    format!(
        "INSERT INTO workspaces (tenant_id, name) SELECT 't' || (i % 10), 'workspace ' || i FROM generate_series(1, {w}) i;
         INSERT INTO workspace_runs (tenant_id, workspace_id, status, payload)
           SELECT 't' || (i % 10), 1 + (i % {w}), (ARRAY['ok','failed','running'])[1 + i % 3], md5(i::text) || md5((i * 7)::text)
           FROM generate_series(1, {rows}) i;
         INSERT INTO audit_bundles (tenant_id, bundle) SELECT 't' || (i % 10), decode(md5(i::text), 'hex') FROM generate_series(1, {a}) i;",
        w = (rows / 10).max(1),
        a = (rows / 4).max(1),
    )
}

/// A digest of every user table's content, for comparing two databases.
pub const TABLE_DIGEST_SQL: &str = "SELECT string_agg(t, ',' ORDER BY t) FROM (
    SELECT format('%s.%s', schemaname, relname) AS t FROM pg_stat_user_tables) s";

pub async fn table_digests(ep: &Endpoint, db: &str) -> Result<Vec<(String, i64, String)>> {
    let c = ep.connect(db).await?;
    let tables = c
        .query(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(relname) FROM pg_stat_user_tables ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| Error::pg("listing tables", e))?;
    let mut out = Vec::new();
    for t in tables {
        let name: String = t.get(0);
        let row = c
            .query_one(
                &format!("SELECT count(*), coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') FROM {name} x"),
                &[],
            )
            .await
            .map_err(|e| Error::pg(format!("digesting {name}"), e))?;
        out.push((name, row.get(0), row.get(1)));
    }
    Ok(out)
}

/// When run as root, the demo re-runs itself as the `postgres` user, so that the cluster, its
/// archive_command and every drctl step share one owner, as in production.
fn reexec_as_owner(args: &DemoArgs) -> Result<Option<Output>> {
    let Some(owner) = crate::pg::cluster::process_owner(None, None)? else {
        return Ok(None);
    };
    let exe = std::env::current_exe().map_err(|e| Error::io("locate drctl", e))?;
    // The build directory may be unreadable for the owner: run a copy from a temp dir.
    let dir = tempfile::Builder::new()
        .prefix("drctl-demo-bin-")
        .tempdir()
        .map_err(|e| Error::io("create temp dir", e))?;
    let copy = dir.path().join("drctl");
    std::fs::copy(&exe, &copy).map_err(|e| Error::io("copy drctl", e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io("chmod", e))?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io("chmod", e))?;
    eprintln!(
        "==> running as root: the demo runs as the {} user",
        owner.name
    );
    let mut cmd = crate::pg::cluster::command_as(&copy, Some(&owner));
    cmd.arg("demo")
        .arg("--rows")
        .arg(args.rows.to_string())
        .current_dir("/tmp")
        .env("HOME", "/tmp");
    if args.keep {
        cmd.arg("--keep");
    }
    let status = cmd
        .status()
        .map_err(|e| Error::io("run demo as postgres", e))?;
    Ok(Some(Output {
        json: json!({"ok": status.success()}),
        human: String::new(),
        exit: if status.success() {
            ExitCode::Ok
        } else {
            ExitCode::Failure
        },
    }))
}

pub async fn run(_ctx: &Ctx, args: &DemoArgs) -> Result<Output> {
    if let Some(out) = reexec_as_owner(args)? {
        return Ok(out);
    }
    let t_demo = Instant::now();
    let mut steps: Vec<serde_json::Value> = Vec::new();
    let say = |s: &str| eprintln!("\n==> {s}");
    let bins = Binaries::locate(None);

    say("creating a throwaway PostgreSQL cluster that archives its WAL through drctl");
    let t = Instant::now();
    let tc = TempCluster::start(
        bins.clone(),
        "fsync = off\nwal_level = replica\narchive_mode = on\narchive_command = ''\narchive_timeout = 60\n",
    )?;
    let ep = tc.cluster.endpoint();
    let repo_dir = tc.path().join("repo");
    let config = Config {
        stanza: "demo".into(),
        postgres: crate::config::PostgresConfig {
            host: ep.host.clone(),
            port: ep.port,
            data_dir: Some(tc.cluster.data_dir.clone()),
            bin_dir: Some(bins.path("")),
            ..Default::default()
        },
        repository: RepositoryConfig {
            path: repo_dir.clone(),
            ..Default::default()
        },
        spool_dir: Some(tc.path().join("spool")),
        ..Default::default()
    };
    let config_path = tc.path().join("drctl.toml");
    let text = toml::to_string(&config).map_err(|e| Error::Failed(e.to_string()))?;
    std::fs::write(&config_path, text).map_err(|e| Error::io("write demo config", e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("locate drctl", e))?;
    let admin = ep.connect("postgres").await?;
    for q in [
        format!(
            "ALTER SYSTEM SET archive_command = '{} --config {} wal push %p'",
            exe.display(),
            config_path.display()
        ),
        "SELECT pg_reload_conf()".into(),
        "CREATE DATABASE app".into(),
    ] {
        admin
            .batch_execute(&q)
            .await
            .map_err(|e| Error::pg("configure archiving", e))?;
    }
    let app = ep.connect("app").await?;
    app.batch_execute(SAMPLE_SCHEMA)
        .await
        .map_err(|e| Error::pg("sample schema", e))?;
    app.batch_execute(&sample_data_sql(args.rows))
        .await
        .map_err(|e| Error::pg("sample data", e))?;
    steps.push(
        json!({"step": "cluster", "seconds": t.elapsed().as_secs_f64(), "port": tc.cluster.port}),
    );
    eprintln!(
        "    cluster on port {} (socket {}), database app with {} runs",
        tc.cluster.port, ep.host, args.rows
    );
    eprintln!(
        "    config {} ; archive_command = drctl wal push",
        config_path.display()
    );

    let ctx = Ctx {
        cancel: Default::default(),
        config,
        json: false,
        config_path: Some(config_path.clone()),
    };
    let backup = |kind| crate::cli::BackupArgs {
        kind,
        databases: vec![],
        no_row_counts: false,
        jobs: None,
        lock_timeout: "10m".into(),
    };

    say("drctl backup --type logical");
    let t = Instant::now();
    let out = super::backup::run(&ctx, &backup(crate::cli::BackupType::Logical)).await?;
    eprintln!(
        "    backup {} in {:.2}s",
        out.human,
        t.elapsed().as_secs_f64()
    );
    steps.push(
        json!({"step": "backup-logical", "seconds": t.elapsed().as_secs_f64(), "backup": out.json}),
    );

    say("drctl backup --type physical");
    let t = Instant::now();
    let out = super::backup::run(&ctx, &backup(crate::cli::BackupType::Physical)).await?;
    eprintln!(
        "    backup {} in {:.2}s ({} files)",
        out.human,
        t.elapsed().as_secs_f64(),
        out.json["files"]
    );
    steps.push(json!({"step": "backup-physical", "seconds": t.elapsed().as_secs_f64(), "backup": out.json}));

    say("the incident: more work is committed, then someone deletes every audit bundle");
    app.batch_execute("INSERT INTO workspaces (tenant_id, name) SELECT 't' || (i % 10), 'late workspace ' || i FROM generate_series(1, 50) i")
        .await
        .map_err(|e| Error::pg("late writes", e))?;
    let before: String = app
        .query_one("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')", &[])
        .await
        .map_err(|e| Error::pg("clock", e))?
        .get(0);
    let expected = table_digests(&ep, "app").await?;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    app.batch_execute("DELETE FROM audit_bundles")
        .await
        .map_err(|e| Error::pg("the mistake", e))?;
    admin
        .batch_execute("SELECT pg_switch_wal()")
        .await
        .map_err(|e| Error::pg("switch wal", e))?;
    wait_archived(&admin).await?;
    eprintln!("    last good moment: {before}; audit_bundles is now empty");

    say("drctl list");
    let out = super::list::run(&ctx).await?;
    eprintln!("{}", indent(&out.human));

    say("drctl verify (every object, and the WAL chain of the physical backup)");
    let t = Instant::now();
    let out = super::verify::run(&ctx, None).await?;
    eprintln!("{}", indent(&out.human));
    if out.exit != ExitCode::Ok {
        return Err(Error::Corruption("demo: verify failed".into()));
    }
    steps.push(json!({"step": "verify", "seconds": t.elapsed().as_secs_f64()}));

    say("drctl restore --logical --database app --target-database app_restored");
    let t = Instant::now();
    let mut rargs = crate::cli::RestoreArgs {
        logical: true,
        pitr: None,
        target_lsn: None,
        target_xid: None,
        target_name: None,
        backup: "latest".into(),
        database: Some("app".into()),
        target_database: Some("app_restored".into()),
        target_host: None,
        target_port: None,
        target_dir: None,
        socket_dir: None,
        no_start: false,
        archive_mode: crate::cli::ArchiveModeArg::Off,
        timeout: "10m".into(),
        jobs: Some(2),
        clean: false,
        no_owner: false,
    };
    let out = super::restore::run(&ctx, &rargs).await?;
    eprintln!("    {}", out.human);
    steps.push(json!({"step": "restore-logical", "seconds": t.elapsed().as_secs_f64()}));

    let port = crate::pg::cluster::free_port();
    say(&format!(
        "drctl restore --pitr {before} --target-dir ... --target-port {port} (undo the delete)"
    ));
    let t = Instant::now();
    let target_dir = tc.path().join("pitr");
    rargs.logical = false;
    rargs.pitr = Some(before.clone());
    rargs.target_dir = Some(target_dir.clone());
    rargs.target_port = Some(port);
    rargs.socket_dir = Some(tc.cluster.socket_dir.clone());
    let out = super::restore::run(&ctx, &rargs).await?;
    eprintln!("{}", indent(&out.human));
    let rto = t.elapsed().as_secs_f64();
    steps.push(json!({"step": "restore-pitr", "seconds": rto, "report": out.json}));

    say("comparing app at the last good moment with the PITR copy, and app with app_restored");
    let restored_ep = crate::pg::Endpoint { port, ..ep.clone() };
    let pitr = table_digests(&restored_ep, "app").await?;
    let logical_a = table_digests(&ep, "app_restored").await?;
    let mut rows = Vec::new();
    for (x, y) in expected.iter().zip(pitr.iter()) {
        rows.push(vec![
            x.0.clone(),
            x.1.to_string(),
            y.1.to_string(),
            if x == y {
                "identical".into()
            } else {
                "DIFFERENT".into()
            },
        ]);
    }
    eprintln!(
        "{}",
        indent(&crate::cli::table(
            &["TABLE", "ROWS (good moment)", "ROWS (PITR copy)", "CONTENT"],
            &rows
        ))
    );
    let pitr_ok = expected == pitr && !pitr.is_empty();
    let logical_ok = logical_a.len() == 3 && logical_a.iter().all(|t| t.1 > 0);
    let _ = crate::restore::physical::stop(&bins, None, &target_dir, "fast");
    steps.push(
        json!({"step": "compare", "pitr_identical": pitr_ok, "logical_restored": logical_ok}),
    );

    say(
        "drctl drill --plan restore-plans/drill.toml --report drill.html (scratch cluster, runbook checks, RTO)",
    );
    let plan = crate::restore::plan::Plan::parse(
        DRILL_PLAN,
        std::path::Path::new("restore-plans/drill.toml"),
    )?;
    let report_path = tc.path().join("drill.html");
    let out = super::plan::drill_plan(&ctx, &plan, Some(&report_path)).await?;
    eprintln!("{}", indent(&out.human));
    let drill_ok = out.exit == ExitCode::Ok;
    steps.push(json!({"step": "drill", "ok": drill_ok, "rto_seconds": out.json["rto_seconds"], "pitr_seconds": rto}));

    say("drctl status (recovery objectives: RPO from the archiver, RTO from the drill)");
    let out = super::status::run(&ctx, false).await?;
    eprintln!("{}", indent(&out.human));
    steps.push(json!({"step": "status", "status": out.json}));

    if args.keep {
        let kept = tc.keep();
        eprintln!("kept the demo files in {}", kept.display());
    }
    let ok = pitr_ok && logical_ok && drill_ok;
    let human = if ok {
        format!(
            "demo complete in {:.1}s: the logical restore matches, PITR brought back every deleted row, and the drill proved the RTO",
            t_demo.elapsed().as_secs_f64()
        )
    } else {
        "demo FAILED: a restored database differs".to_string()
    };
    Ok(Output {
        json: json!({"ok": ok, "steps": steps}),
        human,
        exit: if ok { ExitCode::Ok } else { ExitCode::Failure },
    })
}

async fn wait_archived(admin: &tokio_postgres::Client) -> Result<()> {
    for _ in 0..300 {
        let row = admin
            .query_one(
                "SELECT coalesce(last_archived_wal, '') >= pg_walfile_name(pg_current_wal_lsn() - 1), failed_count FROM pg_stat_archiver",
                &[],
            )
            .await
            .map_err(|e| Error::pg("pg_stat_archiver", e))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(Error::Failed(
        "WAL was not archived within 30s; see the cluster log".into(),
    ))
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
