//! WAL archiving through drctl, physical base backups and point-in-time restore, against real
//! clusters: the restored cluster holds exactly the transactions committed up to its target.

mod common;

use std::time::Duration;

use common::{Env, RepoKind, code, query_i64, sql, stderr, switch_and_wait_archived};
use drctl::pg::Endpoint;

const ARCHIVING: &str = "wal_level = replica\narchive_mode = on\narchive_command = ''\n";

async fn markers(ep: &Endpoint) -> Vec<i32> {
    let c = ep.connect("postgres").await.unwrap();
    c.query("SELECT i FROM marks ORDER BY i", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Commits marker `i` and returns the server time right after the commit.
async fn mark(ep: &Endpoint, i: i32) -> String {
    let c = ep.connect("postgres").await.unwrap();
    c.execute("INSERT INTO marks VALUES ($1)", &[&i])
        .await
        .unwrap();
    c.query_one(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

fn endpoint(dir: &std::path::Path, port: u16) -> Endpoint {
    Endpoint {
        host: dir.display().to_string(),
        port,
        user: "postgres".into(),
        connect_timeout: Duration::from_secs(10),
    }
}

/// Restores into a fresh dir with the given target flags; returns (endpoint, dir).
fn restore(
    env: &Env,
    name: &str,
    flags: &[&str],
    extra: &[&str],
) -> (Endpoint, std::path::PathBuf) {
    let dir = env.path(&format!("restore-{name}"));
    let sock = env.path(&format!("sock-{name}"));
    std::fs::create_dir_all(&sock).unwrap();
    if let Some(u) = common::owner() {
        drctl::pg::cluster::chown_tree(&sock, &u).unwrap();
    }
    let port = drctl::pg::cluster::free_port();
    let port_s = port.to_string();
    let mut args = vec!["restore"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[
        "--target-dir",
        dir.to_str().unwrap(),
        "--target-port",
        &port_s,
        "--socket-dir",
        sock.to_str().unwrap(),
        "--timeout",
        "120s",
    ]);
    args.extend_from_slice(extra);
    env.ok(&args);
    (endpoint(&sock, port), dir)
}

fn stop(dir: &std::path::Path) {
    let bins = common::bins();
    let _ = drctl::restore::physical::stop(&bins, common::owner().as_ref(), dir, "immediate");
}

async fn exactness(kind: RepoKind, all_targets: bool) {
    let (tc, env) = common::cluster_and_env(ARCHIVING, kind);
    let ep = tc.cluster.endpoint();
    env.enable_archiving(&ep).await;
    sql(&ep, "postgres", "CREATE TABLE marks (i int PRIMARY KEY)").await;
    sql(
        &ep,
        "postgres",
        "CREATE TABLE filler AS SELECT g, md5(g::text) s FROM generate_series(1, 20000) g",
    )
    .await;

    let b = env.json(&["backup", "--type", "physical"]);
    assert_eq!(b["type"], "physical");
    assert!(b["files"].as_u64().unwrap() > 100, "{b}");

    mark(&ep, 1).await;
    sql(&ep, "postgres", "SELECT pg_create_restore_point('after-1')").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t2 = mark(&ep, 2).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mark(&ep, 3).await;
    let lsn3: String = ep
        .connect("postgres")
        .await
        .unwrap()
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mark(&ep, 4).await;
    switch_and_wait_archived(&ep).await;

    let list = env.json(&["list"]);
    let phys = &list.as_array().unwrap()[0];
    assert_eq!(phys["type"], "physical");
    env.ok(&["verify"]);

    let mut cases: Vec<(&str, Vec<&str>, Vec<i32>)> = vec![
        ("time", vec!["--pitr", &t2], vec![1, 2]),
        ("latest", vec!["--pitr", "latest"], vec![1, 2, 3, 4]),
    ];
    if all_targets {
        cases.push(("lsn", vec!["--target-lsn", &lsn3], vec![1, 2, 3]));
        cases.push(("name", vec!["--target-name", "after-1"], vec![1]));
    }
    for (name, flags, expect) in cases {
        let (rep, dir) = restore(&env, name, &flags, &["--archive-mode", "off"]);
        assert_eq!(markers(&rep).await, expect, "target {name} {flags:?}");
        // Promoted and writable.
        sql(&rep, "postgres", "INSERT INTO marks VALUES (100)").await;
        assert_eq!(
            query_i64(&rep, "postgres", "SELECT count(*) FROM filler").await,
            20000
        );
        stop(&dir);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pitr_exactness_fs() {
    exactness(RepoKind::Fs, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pitr_exactness_s3() {
    exactness(RepoKind::S3, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn target_before_oldest_backup_is_refused() {
    let tc = common::cluster(ARCHIVING);
    let ep = tc.cluster.endpoint();
    let env = Env::for_cluster(&tc, RepoKind::Fs);
    env.enable_archiving(&ep).await;
    env.ok(&["backup", "--type", "physical"]);
    let dir = env.path("early");
    let out = env.drctl(&[
        "restore",
        "--pitr",
        "2001-01-01T00:00:00Z",
        "--target-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("before the oldest physical backup"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("PG_VERSION").exists());
    // A non-empty target directory is refused.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("x"), "x").unwrap();
    let out = env.drctl(&[
        "restore",
        "--pitr",
        "latest",
        "--target-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn timeline_switch_is_followed() {
    let tc = common::cluster(ARCHIVING);
    let ep = tc.cluster.endpoint();
    let env = Env::for_cluster(&tc, RepoKind::Fs);
    env.enable_archiving(&ep).await;
    sql(&ep, "postgres", "CREATE TABLE marks (i int PRIMARY KEY)").await;
    env.ok(&["backup", "--type", "physical"]);
    mark(&ep, 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t1 = mark(&ep, 2).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mark(&ep, 3).await;
    switch_and_wait_archived(&ep).await;
    // The incident: the primary is gone; restore to t1 as the new primary (archiving on).
    tc.cluster.stop("immediate").unwrap();
    let (rep, dir) = restore(&env, "tl2", &["--pitr", &t1], &[]);
    assert_eq!(markers(&rep).await, vec![1, 2]);
    let tli = query_i64(
        &rep,
        "postgres",
        "SELECT timeline_id::bigint FROM pg_control_checkpoint()",
    )
    .await;
    sql(&rep, "postgres", "CHECKPOINT").await;
    let tli2 = query_i64(
        &rep,
        "postgres",
        "SELECT timeline_id::bigint FROM pg_control_checkpoint()",
    )
    .await;
    assert!(
        tli >= 1 && tli2 == 2,
        "restored cluster must run on timeline 2, got {tli2}"
    );
    mark(&rep, 20).await;
    mark(&rep, 21).await;
    switch_and_wait_archived(&rep).await;
    stop(&dir);
    // The archive now holds timeline 2's history; verify follows it.
    let v = env.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    // Restoring `latest` again from the timeline-1 backup follows the history to timeline 2.
    let (rep2, dir2) = restore(
        &env,
        "again",
        &["--pitr", "latest"],
        &["--archive-mode", "off"],
    );
    assert_eq!(markers(&rep2).await, vec![1, 2, 20, 21]);
    stop(&dir2);
}

#[tokio::test(flavor = "multi_thread")]
async fn push_semantics() {
    let tc = common::cluster(ARCHIVING);
    let ep = tc.cluster.endpoint();
    let env = Env::for_cluster(&tc, RepoKind::Fs);
    let seg = env.path("000000010000000000000042");
    let data: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&seg, &data).unwrap();
    if let Some(u) = common::owner() {
        drctl::pg::cluster::chown_tree(&seg, &u).unwrap();
    }
    let seg_s = seg.to_str().unwrap();
    env.ok(&["wal", "push", seg_s]);
    env.ok(&["wal", "push", seg_s]); // identical re-push: success
    let mut other = data.clone();
    other[1000] ^= 1;
    let conflict = env.path("conflict");
    std::fs::create_dir_all(&conflict).unwrap();
    let seg2 = conflict.join("000000010000000000000042");
    std::fs::write(&seg2, &other).unwrap();
    if let Some(u) = common::owner() {
        drctl::pg::cluster::chown_tree(&conflict, &u).unwrap();
    }
    let out = env.drctl(&["wal", "push", seg2.to_str().unwrap()]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("DIFFERENT content"),
        "{}",
        stderr(&out)
    );
    // Nothing was overwritten: a fetch returns the original bytes.
    let dest = env.path("fetched");
    env.ok(&[
        "wal",
        "fetch",
        "000000010000000000000042",
        dest.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&dest).unwrap() == data,
        "fetched bytes differ from the first push"
    );

    // A push killed mid-write leaves nothing a fetch would accept; the retry succeeds.
    for (n, delay_ms) in [(0x50u32, 2u64), (0x51, 10), (0x52, 25), (0x53, 60)] {
        let name = format!("0000000100000000000000{n:02X}");
        let p = env.path(&name);
        std::fs::write(&p, &data).unwrap();
        if let Some(u) = common::owner() {
            drctl::pg::cluster::chown_tree(&p, &u).unwrap();
        }
        let mut child = env
            .command(&["wal", "push", p.to_str().unwrap()])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let d = env.path(&format!("{name}.fetched"));
        let out = env.drctl(&["wal", "fetch", &name, d.to_str().unwrap()]);
        match code(&out) {
            0 => assert!(
                std::fs::read(&d).unwrap() == data,
                "a killed push left wrong bytes"
            ),
            1 => assert!(!d.exists(), "a miss must not create the destination"),
            c => panic!("unexpected fetch exit {c}: {}", stderr(&out)),
        }
        env.ok(&["wal", "push", p.to_str().unwrap()]);
        env.ok(&["wal", "fetch", &name, d.to_str().unwrap()]);
        assert!(std::fs::read(&d).unwrap() == data);
    }
    // Missing segment: exit 1, quietly.
    let out = env.drctl(&[
        "wal",
        "fetch",
        "0000000100000000000000FF",
        env.path("nope").to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).is_empty(),
        "a miss must be quiet: {}",
        stderr(&out)
    );
    drop(ep);
}

/// Sets up a cluster, a backup, markers in later segments; returns the name of a segment
/// holding markers 2..3 that recovery must read.
async fn faulty_setup(env: &Env, ep: &Endpoint) -> String {
    env.enable_archiving(ep).await;
    sql(ep, "postgres", "CREATE TABLE marks (i int PRIMARY KEY)").await;
    env.ok(&["backup", "--type", "physical"]);
    mark(ep, 1).await;
    switch_and_wait_archived(ep).await;
    let c = ep.connect("postgres").await.unwrap();
    let seg: String = c
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .unwrap()
        .get(0);
    mark(ep, 2).await;
    mark(ep, 3).await;
    switch_and_wait_archived(ep).await;
    mark(ep, 4).await;
    switch_and_wait_archived(ep).await;
    seg
}

fn assert_failed_restore(_env: &Env, out: &std::process::Output, dir: &std::path::Path) {
    assert!(
        !out.status.success(),
        "restore must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = stderr(out);
    assert!(
        err.contains("recovery failed") || err.contains("recovery"),
        "{err}"
    );
    assert!(dir.join("DRCTL_RESTORE_FAILED").exists());
    assert!(
        !dir.join("global/pg_control").exists(),
        "a failed restore must not be startable"
    );
    // The server log shows the abort, not a promotion.
    let log = std::fs::read_to_string(dir.join("drctl-restore.log")).unwrap_or_default();
    assert!(
        !log.contains("selected new timeline ID"),
        "recovery must not promote: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_outage_aborts_recovery() {
    let tc = common::cluster(ARCHIVING);
    let ep = tc.cluster.endpoint();
    let env = Env::for_cluster(&tc, RepoKind::Fs);
    let seg = faulty_setup(&env, &ep).await;
    // Direct fetch under the outage: exit above 125.
    let out = env.drctl_env(
        &["wal", "fetch", &seg, env.path("x").to_str().unwrap()],
        &[("DRCTL_FAULT", &format!("get:{seg}"))],
    );
    assert_eq!(code(&out), 200, "{}", stderr(&out));
    let dir = env.path("outage");
    let out = env.drctl_env(
        &[
            "restore",
            "--pitr",
            "latest",
            "--archive-mode",
            "off",
            "--target-dir",
            dir.to_str().unwrap(),
            "--target-port",
            &drctl::pg::cluster::free_port().to_string(),
            "--socket-dir",
            env.path("").to_str().unwrap(),
            "--timeout",
            "120s",
        ],
        &[("DRCTL_FAULT", &format!("get:{seg}"))],
    );
    assert_failed_restore(&env, &out, &dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_wal_object_aborts_recovery() {
    let tc = common::cluster(ARCHIVING);
    let ep = tc.cluster.endpoint();
    let env = Env::for_cluster(&tc, RepoKind::Fs);
    let seg = faulty_setup(&env, &ep).await;
    let path = env.repo_dir.join(format!("test/wal/{}/{seg}", &seg[..16]));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let out = env.drctl(&["wal", "fetch", &seg, env.path("x").to_str().unwrap()]);
    assert_eq!(code(&out), 200, "{}", stderr(&out));
    assert!(!env.path("x").exists());
    let v = env.drctl(&["verify"]);
    drop(v);
    let dir = env.path("corrupt");
    let out = env.drctl(&[
        "restore",
        "--pitr",
        "latest",
        "--archive-mode",
        "off",
        "--target-dir",
        dir.to_str().unwrap(),
        "--target-port",
        &drctl::pg::cluster::free_port().to_string(),
        "--socket-dir",
        env.path("").to_str().unwrap(),
        "--timeout",
        "120s",
    ]);
    assert_failed_restore(&env, &out, &dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_reports_window_and_wal_gaps() {
    let tc = common::cluster(ARCHIVING);
    let ep = tc.cluster.endpoint();
    let env = Env::for_cluster(&tc, RepoKind::Fs);
    env.enable_archiving(&ep).await;
    sql(&ep, "postgres", "CREATE TABLE marks (i int PRIMARY KEY)").await;
    let id = env.json(&["backup", "--type", "physical"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..=3 {
        mark(&ep, i).await;
        switch_and_wait_archived(&ep).await;
    }
    let v = env.json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    let w = &v["backups"][0]["wal"];
    assert!(w["recoverable_to"].is_string(), "{v}");
    assert!(w["gaps"].as_array().unwrap().is_empty());
    let last = w["last_contiguous"].as_str().unwrap().to_string();

    // Delete a segment between the backup's stop and the newest one.
    let stop = v["backups"][0]["wal"]["stop_wal"]
        .as_str()
        .unwrap()
        .to_string();
    let stop_n = u64::from_str_radix(&stop[16..], 16).unwrap();
    let last_n = u64::from_str_radix(&last[16..], 16).unwrap();
    assert!(
        last_n >= stop_n + 2,
        "need segments after the stop: {stop} .. {last}"
    );
    let victim = format!("{}{:08X}", &stop[..16], stop_n + 1);
    std::fs::remove_file(
        env.repo_dir
            .join(format!("test/wal/{}/{victim}", &victim[..16])),
    )
    .unwrap();
    let out = env.drctl(&["verify", &id]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&victim) && text.contains("WalGap"), "{text}");
    // A PITR restore refuses before fetching anything.
    let dir = env.path("gap");
    let out = env.drctl(&[
        "restore",
        "--pitr",
        "latest",
        "--target-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("WAL gap") && stderr(&out).contains(&victim),
        "{}",
        stderr(&out)
    );
    assert!(
        !dir.exists(),
        "nothing may be fetched when the chain has a gap"
    );
}

/// Invariant 6: when drctl runs as root, PostgreSQL runs as the data directory's owner.
#[tokio::test(flavor = "multi_thread")]
async fn restore_as_root_runs_postgres_as_owner() {
    let Some(owner) = common::owner() else {
        eprintln!("not root: nothing to check here (the harness runs drctl as the current user)");
        return;
    };
    let tc = common::cluster(ARCHIVING);
    let ep = tc.cluster.endpoint();
    let env = Env::for_cluster(&tc, RepoKind::Fs);
    env.enable_archiving(&ep).await;
    sql(&ep, "postgres", "CREATE TABLE marks (i int PRIMARY KEY)").await;
    env.ok(&["backup", "--type", "physical"]);
    mark(&ep, 7).await;
    switch_and_wait_archived(&ep).await;
    // Run drctl itself as root (not through env.command, which drops to the owner).
    let dir = env.path("as-root");
    let port = drctl::pg::cluster::free_port();
    let out = std::process::Command::new(common::drctl_bin())
        .args([
            "--config",
            env.config_path.to_str().unwrap(),
            "restore",
            "--pitr",
            "latest",
            "--archive-mode",
            "off",
        ])
        .args([
            "--target-dir",
            dir.to_str().unwrap(),
            "--target-port",
            &port.to_string(),
        ])
        .args([
            "--socket-dir",
            env.path("").to_str().unwrap(),
            "--timeout",
            "120s",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(dir.join("PG_VERSION")).unwrap().uid(),
        owner.uid
    );
    assert_eq!(
        std::fs::metadata(dir.join("global/pg_control"))
            .unwrap()
            .uid(),
        owner.uid
    );
    let pid: u32 = std::fs::read_to_string(dir.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().nth(1) == Some(&owner.uid.to_string()),
        "postmaster runs as {uid_line}"
    );
    assert_eq!(markers(&endpoint(&env.path(""), port)).await, vec![7]);
    stop(&dir);
}
