//! Staged restore plans, drills, health/backup/test-only modes and RTO/RPO status, against
//! real clusters.

mod common;

use std::path::Path;

use common::{Env, RepoKind, code, sql, stderr, switch_and_wait_archived};
use drctl::command::demo::{SAMPLE_SCHEMA, sample_data_sql};
use drctl::restore::plan::Plan;

const ARCHIVING: &str =
    "wal_level = replica\narchive_mode = on\narchive_command = ''\narchive_timeout = 30\n";

#[test]
fn shipped_plans_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("restore-plans");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) == Some("toml") {
            let plan = Plan::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(!plan.stages.is_empty());
            n += 1;
        }
    }
    assert!(n >= 3, "expected pitr, drill and logical plans");
    Plan::parse(
        drctl::command::plan::DEFAULT_DRILL_PLAN,
        Path::new("builtin"),
    )
    .unwrap();
}

#[test]
fn bad_plans_name_the_file_and_key() {
    let base =
        "name = \"x\"\n[restore]\npitr = \"latest\"\n[[stage]]\nname = \"s\"\nkind = \"health\"\n";
    let cases = [
        (format!("{base}  [[stage.check]]\n  type = \"bogus-check\"\n"), "bogus-check"),
        (format!("{base}  [[stage.check]]\n  type = \"rls-enabled\"\n  database = \"app\"\n"), "tables"),
        (format!("{base}timeout = \"five minutes\"\n"), "timeout"),
        (format!("{base}on-failure = \"explode\"\n"), "explode"),
        (format!("{base}colour = \"red\"\n"), "colour"),
        ("name = \"x\"\n[restore]\npitr = \"yesterday\"\n[[stage]]\nname = \"s\"\nkind = \"backup\"\n".to_string(), "restore.pitr"),
        (format!("{}  [[stage.check]]\n  type = \"tenant-isolation\"\n  database = \"app\"\n  tables = [\"t\"]\n", base.replace("\"health\"", "\"test\"")), "tenant-column"),
        (format!("{base}  [[stage.check]]\n  type = \"amcheck\"\n  database = \"app\"\n"), "cannot run in a health stage"),
    ];
    for (text, key) in cases {
        let err = Plan::parse(&text, Path::new("/plans/bad.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/plans/bad.toml"), "{err}");
        assert!(err.contains(key), "expected {key:?} in: {err}");
    }
}

async fn app_cluster(kind: RepoKind) -> (drctl::pg::cluster::TempCluster, Env) {
    let (tc, env) = common::cluster_and_env(ARCHIVING, kind);
    let ep = tc.cluster.endpoint();
    env.enable_archiving(&ep).await;
    sql(&ep, "postgres", "CREATE DATABASE app").await;
    sql(&ep, "app", SAMPLE_SCHEMA).await;
    sql(&ep, "app", &sample_data_sql(2000)).await;
    (tc, env)
}

fn wal_objects(env: &Env) -> Vec<String> {
    let mut out = Vec::new();
    let root = env.repo_dir.join("test/wal");
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                let bytes = std::fs::read(e.path()).unwrap();
                out.push(format!(
                    "{} {}",
                    e.path().strip_prefix(&root).unwrap().display(),
                    bytes.len()
                ));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn drill_end_to_end_records_rto_and_leaves_wal_alone() {
    let (tc, env) = app_cluster(RepoKind::Fs).await;
    let ep = tc.cluster.endpoint();
    env.ok(&["backup", "--type", "physical"]);
    sql(
        &ep,
        "app",
        "INSERT INTO workspaces (tenant_id, name) VALUES ('t1', 'after backup')",
    )
    .await;
    switch_and_wait_archived(&ep).await;
    // Before any drill the RTO is unproven.
    let out = env.drctl(&["status"]);
    assert_eq!(code(&out), 11, "{}", String::from_utf8_lossy(&out.stdout));

    let before = wal_objects(&env);
    let plan = common::shipped("restore-plans/drill.toml");
    let report = env.path("drill.html");
    let out = env.drctl(&[
        "drill",
        "--plan",
        plan.to_str().unwrap(),
        "--json",
        "--report",
        report.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "drill failed: {v}\n{}", stderr(&out));
    assert_eq!(v["ok"], true);
    let rto = v["rto_seconds"].as_f64().expect("rto_seconds");
    assert!(rto > 0.0 && rto < 900.0, "{rto}");
    assert_eq!(v["rto_met"], true);
    let stages: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(stages, vec!["pass", "pass", "pass"], "{v}");
    let checks = &v["stages"][2]["checks"];
    assert!(checks.as_array().unwrap().len() >= 6);
    assert!(
        checks
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] == "pass"),
        "{checks}"
    );
    // The history record is in the repository.
    let hist: Vec<_> = std::fs::read_dir(env.repo_dir.join("test/history/drill"))
        .unwrap()
        .collect();
    assert_eq!(hist.len(), 1);
    // The report carries the chart.
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(
        html.contains("<svg") && html.contains("RTO target"),
        "{html}"
    );
    // The drill left the stanza's WAL and timelines exactly as it found them.
    assert_eq!(
        wal_objects(&env),
        before,
        "a drill must not archive into the stanza"
    );
    // The scratch target is gone.
    let spool = env.path("spool");
    let leftovers: Vec<_> = std::fs::read_dir(&spool)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("drctl-scratch-")
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "scratch target not torn down: {leftovers:?}"
    );

    // status shows the drill's RTO; objectives hold.
    let out = env.drctl(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(code(&out), 0, "{s}");
    assert!((s["rto_seconds"].as_f64().unwrap() - rto).abs() < 0.01);
    assert_eq!(s["rto"], "met");
    assert_eq!(s["rpo"], "met");
    let prom = env.ok(&["status", "--prometheus"]);
    for name in [
        "drctl_rpo_seconds",
        "drctl_rto_last_drill_seconds",
        "drctl_drill_last_success_timestamp_seconds",
        "drctl_objective_violated{objective=\"rto\"} 0",
        "drctl_backup_last_success_timestamp_seconds{type=\"physical\"}",
    ] {
        assert!(prom.contains(name), "{name} missing:\n{prom}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_exit_codes_with_an_injected_clock() {
    let (tc, env) = app_cluster(RepoKind::Fs).await;
    let ep = tc.cluster.endpoint();
    env.ok(&["backup", "--type", "physical"]);
    switch_and_wait_archived(&ep).await;
    env.ok(&["drill"]);
    let base = std::fs::read_to_string(&env.config_path).unwrap();
    let write = |name: &str, objectives: &str| {
        let p = env.path(name);
        std::fs::write(&p, format!("{base}\n[objectives]\n{objectives}\n")).unwrap();
        if let Some(u) = common::owner() {
            drctl::pg::cluster::chown_tree(&p, &u).unwrap();
        }
        p
    };
    let lenient = write("lenient.toml", "rpo = \"1000days\"\nrto = \"15m\"");
    let strict_rto = write("strict.toml", "rpo = \"1000days\"\nrto = \"1ms\"");
    let status = |cfg: &Path, now: Option<String>| {
        let mut cmd = env.command(&["status", "--json"]);
        cmd.arg("--config").arg(cfg);
        if let Some(n) = now {
            cmd.env("DRCTL_NOW", n);
        }
        cmd.output().unwrap()
    };
    // Met.
    let out = status(&lenient, None);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    // Violated: the drill's RTO exceeds a 1 ms objective.
    let out = status(&strict_rto, None);
    assert_eq!(code(&out), 10, "{}", String::from_utf8_lossy(&out.stdout));
    // Unproven: 40 days later the drill is too old.
    let later = (chrono::Utc::now() + chrono::Duration::days(40)).to_rfc3339();
    let out = status(&lenient, Some(later.clone()));
    assert_eq!(code(&out), 11, "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rto"], "unproven");
    // RPO violated: with the default 1m RPO, two hours after the last archive.
    let two_h = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    sql(
        &ep,
        "app",
        "INSERT INTO workspaces (tenant_id, name) VALUES ('t1', 'unarchived')",
    )
    .await;
    let out = status(&env.config_path, Some(two_h));
    assert_eq!(code(&out), 10, "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rpo"], "violated");
    // With the server down, the RPO comes from the repository alone.
    tc.cluster.stop("immediate").unwrap();
    let out = status(&lenient, None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rpo_source"], "repository", "{v}");
    assert!(v["rpo_seconds"].as_f64().is_some());
}

fn write_plan(env: &Env, name: &str, text: &str) -> String {
    let p = env.path(name);
    std::fs::write(&p, text).unwrap();
    if let Some(u) = common::owner() {
        drctl::pg::cluster::chown_tree(&p, &u).unwrap();
    }
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_only_names_the_table_without_rls() {
    let (tc, env) = app_cluster(RepoKind::Fs).await;
    let ep = tc.cluster.endpoint();
    let plan = write_plan(
        &env,
        "health.toml",
        r#"name = "health"
[restore]
pitr = "latest"
[[stage]]
name = "assessment"
kind = "health"
  [[stage.check]]
  type = "connect"
  [[stage.check]]
  type = "connections"
  [[stage.check]]
  type = "long-running-queries"
  [[stage.check]]
  type = "rls-enabled"
  database = "app"
  tables = ["workspaces", "workspace_runs", "audit_bundles"]
  [[stage.check]]
  type = "repository"
  [[stage.check]]
  type = "disk-free"
  min-free-percent = 1
[[stage]]
name = "database-recovery"
kind = "backup"
"#,
    );
    let wrapper = common::shipped("scripts/disaster-recovery.sh");
    let run = || {
        let mut cmd = match common::owner() {
            Some(u) => drctl::pg::cluster::command_as(&wrapper, Some(&u)),
            None => std::process::Command::new(&wrapper),
        };
        cmd.args(["--health-only", "--plan", &plan, "--json"])
            .env("DRCTL", common::drctl_bin())
            .env("DRCTL_CONFIG", &env.config_path)
            .env("HOME", env.dir.path())
            .current_dir(env.dir.path())
            .output()
            .unwrap()
    };
    let out = run();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "{v}\n{}", stderr(&out));
    assert_eq!(
        v["stages"].as_array().unwrap().len(),
        1,
        "--health-only runs only health stages"
    );
    assert_eq!(v["mode"], "health-only");

    sql(
        &ep,
        "app",
        "ALTER TABLE workspace_runs DISABLE ROW LEVEL SECURITY",
    )
    .await;
    let out = run();
    assert_eq!(code(&out), 9, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rls = v["stages"][0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "rls-enabled")
        .unwrap()
        .clone();
    assert_eq!(rls["status"], "fail");
    let msg = rls["message"].as_str().unwrap();
    assert!(
        msg.contains("workspace_runs") && !msg.contains("workspaces,"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_only_catches_a_permissive_policy() {
    let (tc, env) = app_cluster(RepoKind::Fs).await;
    let ep = tc.cluster.endpoint();
    env.ok(&["backup", "--type", "physical"]);
    switch_and_wait_archived(&ep).await;
    let port = drctl::pg::cluster::free_port();
    let data = env.path("restored");
    let sock = env.path("");
    let plan = write_plan(
        &env,
        "incident.toml",
        &format!(
            r#"name = "incident"
[target]
kind = "data-dir"
path = "{}"
port = {port}
socket-dir = "{}"
archive-mode = "off"
[restore]
pitr = "latest"
[[stage]]
name = "database-recovery"
kind = "backup"
[[stage]]
name = "validation"
kind = "test"
  [[stage.check]]
  type = "tenant-isolation"
  database = "app"
  tables = ["workspaces", "workspace_runs", "audit_bundles"]
  tenant-column = "tenant_id"
  setting = "app.current_tenant_id"
"#,
            data.display(),
            sock.display()
        ),
    );
    // A scratch plan cannot be tested alone.
    let scratch = write_plan(
        &env,
        "scratch.toml",
        &std::fs::read_to_string(&plan)
            .unwrap()
            .replace("kind = \"data-dir\"", "kind = \"scratch\""),
    );
    let out = env.drctl(&["plan", "run", &scratch, "--test-only"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("scratch"), "{}", stderr(&out));

    let v = env.json(&["plan", "run", &plan, "--backup-only"]);
    assert_eq!(v["stages"].as_array().unwrap().len(), 1);
    let v = env.json(&["plan", "run", &plan, "--test-only"]);
    assert_eq!(v["ok"], true, "{v}");

    let target = drctl::pg::Endpoint {
        host: sock.display().to_string(),
        port,
        user: "postgres".into(),
        connect_timeout: std::time::Duration::from_secs(10),
    };
    sql(
        &target,
        "app",
        "CREATE POLICY oops ON workspace_runs USING (true)",
    )
    .await;
    let out = env.drctl(&["plan", "run", &plan, "--test-only", "--json"]);
    assert_eq!(code(&out), 9, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = v["stages"][0]["checks"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("TENANT DATA LEAK") && msg.contains("workspace_runs"),
        "{msg}"
    );
    let _ = drctl::restore::physical::stop(
        &common::bins(),
        common::owner().as_ref(),
        &data,
        "immediate",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_past_its_timeout_is_reported_as_timeout() {
    let tc = common::cluster("");
    let env = Env::new(&tc.cluster.endpoint(), RepoKind::Fs);
    let plan = write_plan(
        &env,
        "slow.toml",
        r#"name = "slow"
[[stage]]
name = "slow-health"
kind = "health"
timeout = "1s"
  [[stage.check]]
  type = "command"
  argv = ["sleep", "10"]
[[stage]]
name = "after"
kind = "health"
  [[stage.check]]
  type = "connect"
"#,
    );
    let t = std::time::Instant::now();
    let out = env.drctl(&["plan", "run", &plan, "--json"]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(8),
        "the timeout did not stop the stage"
    );
    assert_eq!(code(&out), 9, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stages"][0]["status"], "timeout", "{v}");
    assert!(
        v["stages"][0]["message"]
            .as_str()
            .unwrap()
            .contains("timeout of 1s")
    );
    assert_eq!(
        v["stages"][1]["status"], "skipped",
        "on-failure = abort skips the rest"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logical_drill_checks_row_counts() {
    let (tc, env) = app_cluster(RepoKind::Fs).await;
    let _ = &tc;
    env.ok(&["backup", "--type", "logical", "--database", "app"]);
    let plan = common::shipped("restore-plans/logical.toml");
    let v = env.json(&["drill", "--plan", plan.to_str().unwrap()]);
    assert_eq!(v["ok"], true, "{v}");
    let checks = v["stages"][2]["checks"].as_array().unwrap();
    let rc = checks.iter().find(|c| c["type"] == "row-counts").unwrap();
    assert!(
        rc["message"].as_str().unwrap().contains("3 tables match"),
        "{rc}"
    );
}
