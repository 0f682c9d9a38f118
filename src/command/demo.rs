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

pub async fn run(_ctx: &Ctx, args: &DemoArgs) -> Result<Output> {
    let mut steps: Vec<serde_json::Value> = Vec::new();
    let say = |s: &str| eprintln!("==> {s}");
    let bins = Binaries::locate(None);

    say("creating a throwaway PostgreSQL cluster");
    let t = Instant::now();
    let tc = TempCluster::start(bins.clone(), "fsync = off\n")?;
    let ep = tc.cluster.endpoint();
    let admin = ep.connect("postgres").await?;
    admin
        .batch_execute("CREATE DATABASE app")
        .await
        .map_err(|e| Error::pg("create database app", e))?;
    let app = ep.connect("app").await?;
    app.batch_execute(SAMPLE_SCHEMA)
        .await
        .map_err(|e| Error::pg("sample schema", e))?;
    app.batch_execute(&sample_data_sql(args.rows))
        .await
        .map_err(|e| Error::pg("sample data", e))?;
    steps.push(json!({"step": "cluster", "seconds": t.elapsed().as_secs_f64(), "port": tc.cluster.port}));
    eprintln!("    cluster on port {} (socket {}), database app with {} runs", tc.cluster.port, ep.host, args.rows);

    let repo_dir = tc.path().join("repo");
    let config = Config {
        postgres: crate::config::PostgresConfig {
            host: ep.host.clone(),
            port: ep.port,
            bin_dir: None,
            ..Default::default()
        },
        repository: RepositoryConfig {
            path: repo_dir.clone(),
            ..Default::default()
        },
        spool_dir: Some(tc.path().join("spool")),
        ..Default::default()
    };
    let ctx = Ctx {
        config,
        json: false,
        config_path: None,
    };

    say("drctl backup --type logical");
    let t = Instant::now();
    let out = super::backup::run(
        &ctx,
        &crate::cli::BackupArgs {
            kind: crate::cli::BackupType::Logical,
            databases: vec![],
            no_row_counts: false,
            jobs: None,
        },
    )
    .await?;
    eprintln!("    backup {}", out.human);
    steps.push(json!({"step": "backup", "seconds": t.elapsed().as_secs_f64(), "backup": out.json}));

    say("drctl list");
    let out = super::list::run(&ctx).await?;
    eprintln!("{}", indent(&out.human));

    say("drctl verify");
    let t = Instant::now();
    let out = super::verify::run(&ctx, None).await?;
    eprintln!("{}", indent(&out.human));
    if out.exit != ExitCode::Ok {
        return Err(Error::Corruption("demo: verify failed".into()));
    }
    steps.push(json!({"step": "verify", "seconds": t.elapsed().as_secs_f64()}));

    say("drctl restore --logical --database app --target-database app_restored");
    let t = Instant::now();
    let out = super::restore::run(
        &ctx,
        &crate::cli::RestoreArgs {
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
            archive_mode: crate::cli::ArchiveModeArg::Preserve,
            timeout: "1h".into(),
            jobs: Some(2),
            clean: false,
            no_owner: false,
        },
    )
    .await?;
    eprintln!("    {}", out.human);
    steps.push(json!({"step": "restore", "seconds": t.elapsed().as_secs_f64()}));

    say("comparing every table of app and app_restored");
    let a = table_digests(&ep, "app").await?;
    let b = table_digests(&ep, "app_restored").await?;
    let mut rows = Vec::new();
    for (x, y) in a.iter().zip(b.iter()) {
        rows.push(vec![
            x.0.clone(),
            x.1.to_string(),
            y.1.to_string(),
            if x == y { "identical".into() } else { "DIFFERENT".into() },
        ]);
    }
    eprintln!("{}", indent(&crate::cli::table(&["TABLE", "ROWS (app)", "ROWS (restored)", "CONTENT"], &rows)));
    let identical = a == b && !a.is_empty();
    steps.push(json!({"step": "compare", "identical": identical, "tables": a.len()}));

    if args.keep {
        let kept = tc.keep();
        eprintln!("kept the demo files in {}", kept.display());
    }
    let human = if identical {
        "demo complete: the restored database is identical to the original".to_string()
    } else {
        "demo FAILED: the restored database differs".to_string()
    };
    Ok(Output {
        json: json!({"ok": identical, "steps": steps}),
        human,
        exit: if identical { ExitCode::Ok } else { ExitCode::Failure },
    })
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}
