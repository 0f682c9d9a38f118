//! Logical backup, list, verify and restore against real PostgreSQL clusters, on both storage
//! drivers.

mod common;

use bytes::Bytes;
use common::{Env, RepoKind, code, query_i64, sql, stderr};
use drctl::command::demo::{SAMPLE_SCHEMA, sample_data_sql, table_digests};
use drctl::storage::{self, PutMode};

async fn app_cluster(rows: u32) -> drctl::pg::cluster::TempCluster {
    let tc = common::cluster("");
    let ep = tc.cluster.endpoint();
    sql(&ep, "postgres", "CREATE DATABASE app").await;
    sql(&ep, "app", SAMPLE_SCHEMA).await;
    sql(&ep, "app", &sample_data_sql(rows)).await;
    tc
}

async fn round_trip(kind: RepoKind) {
    let tc = app_cluster(3000).await;
    let ep = tc.cluster.endpoint();
    let env = Env::new(&ep, kind);

    // --json may follow the subcommand; the object has at least `id`.
    let out: serde_json::Value =
        serde_json::from_str(&env.ok(&["backup", "--type", "logical", "--json"])).unwrap();
    let id = out["id"].as_str().unwrap().to_string();
    assert!(id.ends_with("-L"), "{id}");

    let list = env.json(&["list"]);
    let arr = list.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    let b = &arr[0];
    assert_eq!(b["id"], id.as_str());
    assert_eq!(b["type"], "logical");
    assert_eq!(b["status"], "ok");
    let dbs: Vec<&str> = b["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(dbs, vec!["app", "postgres"]);
    for k in ["started_at", "finished_at"] {
        chrono::DateTime::parse_from_rfc3339(b[k].as_str().unwrap()).expect(k);
    }
    assert!(b["size"].as_u64().unwrap() > b["stored_size"].as_u64().unwrap());

    env.ok(&["verify"]);
    env.ok(&[
        "restore",
        "--logical",
        "--database",
        "app",
        "--target-database",
        "app_copy",
        "--jobs",
        "2",
    ]);
    let a = table_digests(&ep, "app").await.unwrap();
    let c = table_digests(&ep, "app_copy").await.unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(a, c, "restored contents differ");

    // An existing target is refused without --clean, and replaced with it.
    let again = env.drctl(&[
        "restore",
        "--logical",
        "--database",
        "app",
        "--target-database",
        "app_copy",
    ]);
    assert_eq!(code(&again), 8, "{}", stderr(&again));
    assert!(stderr(&again).contains("--clean"), "{}", stderr(&again));
    sql(&ep, "app_copy", "DELETE FROM audit_bundles").await;
    env.ok(&[
        "restore",
        "--logical",
        "--backup",
        &id,
        "--database",
        "app",
        "--target-database",
        "app_copy",
        "--clean",
    ]);
    assert_eq!(table_digests(&ep, "app_copy").await.unwrap(), a);
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_fs() {
    round_trip(RepoKind::Fs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_s3() {
    round_trip(RepoKind::S3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn row_counts_are_recorded_in_the_dump_snapshot() {
    let tc = app_cluster(1000).await;
    let ep = tc.cluster.endpoint();
    let env = Env::new(&ep, RepoKind::Fs);
    env.ok(&["backup", "--type", "logical", "--database", "app"]);
    let st = env.storage().await;
    let repo = drctl::repo::Repo::new(st, "test");
    let m = repo.resolve(None, |_| true).await.unwrap();
    assert_eq!(m.database_names(), vec!["app"]);
    let counts = &m.databases[0].row_counts;
    assert_eq!(counts["public.workspace_runs"], 1000);
    assert_eq!(counts["public.workspaces"], 100);
    assert_eq!(counts["public.audit_bundles"], 250);
}

/// Damages the one dump object of database `app` with `damage`, then checks that verify
/// names it with exit 6 and restore refuses without creating the target database.
async fn damaged(kind: RepoKind, damage: &str) {
    let tc = app_cluster(2000).await;
    let ep = tc.cluster.endpoint();
    let env = Env::new(&ep, kind);
    let id = env.json(&["backup", "--type", "logical", "--database", "app"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let st = env.storage().await;
    let objs = st.list(&format!("test/backups/{id}/")).await.unwrap();
    let dump = objs
        .iter()
        .find(|o| o.key.contains("-app.pgdump"))
        .expect("dump object")
        .key
        .clone();
    let bytes = storage::get_bytes(&*st, &dump).await.unwrap();
    match damage {
        "flip" => {
            let mut b = bytes.clone();
            let i = b.len() / 2;
            b[i] ^= 0x40;
            storage::put_bytes(&*st, &dump, Bytes::from(b), PutMode::Overwrite)
                .await
                .unwrap();
        }
        "truncate" => {
            storage::put_bytes(
                &*st,
                &dump,
                Bytes::from(bytes[..bytes.len() - 100].to_vec()),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        }
        "delete" => st.delete(&dump).await.unwrap(),
        _ => unreachable!(),
    }
    let out = env.drctl(&["verify"]);
    assert_eq!(
        code(&out),
        6,
        "verify must report corruption: {}",
        stderr(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rel = dump.strip_prefix("test/").unwrap();
    assert!(text.contains(rel), "verify must name {rel}: {text}");
    let expect = match damage {
        "flip" => "ChecksumMismatch",
        "truncate" => "Truncated",
        _ => "Missing",
    };
    assert!(text.contains(expect), "{expect} not in: {text}");
    let json = env.drctl(&["verify", &id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 1);

    let out = env.drctl(&[
        "restore",
        "--logical",
        "--database",
        "app",
        "--target-database",
        "app_bad",
    ]);
    assert_eq!(code(&out), 6, "restore must refuse: {}", stderr(&out));
    let exists = query_i64(
        &ep,
        "postgres",
        "SELECT count(*) FROM pg_database WHERE datname = 'app_bad'",
    )
    .await;
    assert_eq!(
        exists, 0,
        "a refused restore must not leave a database behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn flipped_byte_fs() {
    damaged(RepoKind::Fs, "flip").await;
}
#[tokio::test(flavor = "multi_thread")]
async fn flipped_byte_s3() {
    damaged(RepoKind::S3, "flip").await;
}
#[tokio::test(flavor = "multi_thread")]
async fn truncated_fs() {
    damaged(RepoKind::Fs, "truncate").await;
}
#[tokio::test(flavor = "multi_thread")]
async fn truncated_s3() {
    damaged(RepoKind::S3, "truncate").await;
}
#[tokio::test(flavor = "multi_thread")]
async fn missing_fs() {
    damaged(RepoKind::Fs, "delete").await;
}
#[tokio::test(flavor = "multi_thread")]
async fn missing_s3() {
    damaged(RepoKind::S3, "delete").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_manifest_is_reported() {
    let tc = app_cluster(100).await;
    let env = Env::new(&tc.cluster.endpoint(), RepoKind::Fs);
    let id = env.json(&["backup", "--type", "logical"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = env
        .repo_dir
        .join(format!("test/backups/{id}/manifest.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"app\"", "\"apq\"");
    std::fs::write(&path, text).unwrap();
    let out = env.drctl(&["verify"]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ManifestCorrupt"));
}

/// Kills `drctl backup` after the first database's object is stored and while the second,
/// large one is still streaming; the backup must not be listed and the next must succeed.
async fn interrupted(kind: RepoKind) {
    let tc = common::cluster("");
    let ep = tc.cluster.endpoint();
    sql(&ep, "postgres", "CREATE DATABASE aaa").await;
    sql(&ep, "postgres", "CREATE DATABASE big").await;
    sql(
        &ep,
        "aaa",
        "CREATE TABLE t AS SELECT generate_series(1, 10) i",
    )
    .await;
    // ~60 MB of poorly compressible text so the second dump takes a while.
    sql(&ep, "big", "CREATE TABLE t AS SELECT i, md5(i::text) || md5((i+1)::text) || md5((i+2)::text) AS s FROM generate_series(1, 600000) i").await;
    let env = Env::new(&ep, kind);
    let st = env.storage().await;
    let mut child = env
        .command(&["backup", "--type", "logical"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut killed = false;
    while std::time::Instant::now() < deadline {
        let objs = st.list("test/backups/").await.unwrap_or_default();
        if objs.iter().any(|o| o.key.ends_with("-aaa.pgdump.zst")) {
            child.kill().unwrap();
            killed = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let status = child.wait().unwrap();
    assert!(
        killed && !status.success(),
        "backup was not interrupted mid-upload (status {status})"
    );
    let objs = st.list("test/backups/").await.unwrap();
    assert!(
        !objs.is_empty(),
        "the killed backup left objects, which is expected before cleanup"
    );
    assert!(!objs.iter().any(|o| o.key.ends_with("manifest.json")));
    assert_eq!(
        env.json(&["list"]).as_array().unwrap().len(),
        0,
        "interrupted backup must not be listed"
    );
    env.ok(&["verify"]);
    let id = env.json(&["backup", "--type", "logical"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let list = env.json(&["list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    env.ok(&["verify"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_backup_fs() {
    interrupted(RepoKind::Fs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_backup_s3() {
    interrupted(RepoKind::S3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clear_errors_and_exit_codes() {
    let tc = app_cluster(10).await;
    let ep = tc.cluster.endpoint();
    let env = Env::new(&ep, RepoKind::Fs);

    // Bad config: unknown key names the key and the file.
    let bad = env.dir.path().join("bad.toml");
    std::fs::write(&bad, "[postgres]\nhots = \"x\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drctl"))
        .args(["list", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("hots") && stderr(&out).contains("bad.toml"),
        "{}",
        stderr(&out)
    );
    // Wrong type and impossible value.
    std::fs::write(&bad, "[postgres]\nport = \"five\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drctl"))
        .arg("--config")
        .arg(&bad)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(code(&out), 3);
    assert!(stderr(&out).contains("port"), "{}", stderr(&out));
    std::fs::write(&bad, "[compression]\nlevel = 99\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drctl"))
        .arg("--config")
        .arg(&bad)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(code(&out), 3);
    assert!(
        stderr(&out).contains("compression.level"),
        "{}",
        stderr(&out)
    );
    // Missing config file given explicitly.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drctl"))
        .args(["--config", "/nonexistent/drctl.toml", "list"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 3);

    // Usage error.
    let out = env.drctl(&["backup", "--type", "sideways"]);
    assert_eq!(code(&out), 2);

    // Unreachable database: a port nobody listens on.
    let closed = drctl::pg::cluster::free_port();
    let cfg = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(&format!("port = {}", ep.port), &format!("port = {closed}"))
        .replace(&format!("host = \"{}\"", ep.host), "host = \"127.0.0.1\"");
    let down = env.dir.path().join("down.toml");
    std::fs::write(&down, cfg).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drctl"))
        .arg("--config")
        .arg(&down)
        .args(["backup", "--type", "logical"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("127.0.0.1:{closed}")),
        "{}",
        stderr(&out)
    );

    // Unknown backup id.
    let out = env.drctl(&["verify", "20000101T000000Z-L"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    // Unknown database in the backup.
    env.ok(&["backup", "--type", "logical"]);
    let out = env.drctl(&[
        "restore",
        "--logical",
        "--database",
        "nope",
        "--target-database",
        "x",
    ]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_wrong_credentials_and_missing_bucket() {
    let tc = app_cluster(10).await;
    let ep = tc.cluster.endpoint();
    let env = Env::new(&ep, RepoKind::S3);
    let out = env.drctl_env(
        &["backup", "--type", "logical"],
        &[("AWS_SECRET_ACCESS_KEY", "wrong-secret")],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).to_lowercase().contains("access denied") || stderr(&out).contains("Signature"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("wrong-secret"),
        "secrets must not be logged"
    );

    let cfg = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("bucket = \"", "bucket = \"missing-");
    let nb = env.dir.path().join("nobucket.toml");
    std::fs::write(&nb, cfg).unwrap();
    let mut cmd = env.command(&["list"]);
    cmd.args(["--config"]).arg(&nb);
    let out = cmd.output().unwrap();
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(stderr(&out).contains("missing-"), "{}", stderr(&out));
}

/// Progress is for a person at a terminal: a backup on a pseudo-terminal (script(1)) draws a
/// bar with bytes, rate and ETA; off a terminal, and under --json, stderr carries none.
#[tokio::test(flavor = "multi_thread")]
async fn progress_bar_on_a_terminal_only() {
    let tc = app_cluster(500).await;
    let env = Env::new(&tc.cluster.endpoint(), RepoKind::Fs);

    let out = env.drctl(&["backup", "--type", "logical"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stderr(&out).contains("ETA"), "{}", stderr(&out));

    // Each object put is held 2 s, so the bar is drawn a few times before the backup ends.
    let line = format!(
        "{} --config {} backup --type logical",
        common::drctl_bin().display(),
        env.config_path.display()
    );
    let run_on_pty = |extra: &str| {
        let mut cmd = drctl::pg::cluster::command_as("script", common::owner().as_ref());
        cmd.args(["-q", "-e", "-c", &format!("{line}{extra}"), "/dev/null"])
            .env("HOME", env.dir.path())
            .env("DRCTL_FAULT", "delay-put:/backups/")
            .env("TERM", "xterm")
            .current_dir(env.dir.path())
            .stdin(std::process::Stdio::null());
        cmd.output().expect("script(1) from util-linux")
    };
    let out = run_on_pty("");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 0, "{tty}");
    assert!(
        tty.contains("ETA") && tty.contains("(size estimated)"),
        "{tty}"
    );
    // The bar is cleared at the end: the last thing printed is the result line.
    // The bar is cleared at the end: after the last line erase comes only the new id.
    let tail = tty.rsplit("\x1b[2K").next().unwrap().replace("\x1b[1A", "");
    assert!(
        tail.trim().ends_with("-L") && !tail.contains("ETA"),
        "{tty:?}"
    );

    let out = run_on_pty(" --json");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 0, "{tty}");
    assert!(!tty.contains("ETA"), "--json draws no bar: {tty}");
    assert_eq!(env.json(&["list"]).as_array().unwrap().len(), 3);
}
