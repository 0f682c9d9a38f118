//! Retention (with an injected clock over made-up backup sets) and repository locking, on
//! both storage drivers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use drctl::backup::physical::PhysicalInfo;
use drctl::config::{CompressionConfig, RetentionConfig};
use drctl::repo::Repo;
use drctl::repo::lock::{ReadLease, RepoLock};
use drctl::repo::manifest::{BackupKind, MANIFEST_FORMAT, Manifest};
use drctl::retention;
use drctl::storage::{self, DynStorage, PutMode};
use drctl::wal::{Lsn, Segment};

const SEG: u64 = 16 * 1024 * 1024;

async fn both<F, Fut>(f: F)
where
    F: Fn(DynStorage) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    f(Arc::new(
        drctl::storage::fs::FsStorage::new(dir.path()).unwrap(),
    ))
    .await;
    let s3 = common::s3server::S3Server::start().await;
    f(Arc::new(s3.storage("ret").await)).await;
}

fn day(d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, d, 2, 0, 0).unwrap()
}

/// Commits a made-up backup finished at `t`; physical ones start at WAL segment `seg`.
async fn fake(repo: &Repo, kind: BackupKind, t: DateTime<Utc>, seg: u64) -> String {
    let id = format!("{}-{}", t.format("%Y%m%dT%H%M%SZ"), kind.suffix());
    storage::put_bytes(
        &**repo.storage(),
        &repo.key(&format!("backups/{id}/data")),
        bytes::Bytes::from_static(b"x"),
        PutMode::Overwrite,
    )
    .await
    .unwrap();
    let physical = (kind == BackupKind::Physical).then(|| PhysicalInfo {
        start_lsn: Lsn(seg * SEG),
        stop_lsn: Lsn(seg * SEG + 100),
        timeline: 1,
        wal_segment_size: SEG,
        start_wal: Segment { tli: 1, segno: seg }.name(SEG),
        stop_wal: Segment { tli: 1, segno: seg }.name(SEG),
        backup_label: String::new(),
        tablespace_map: String::new(),
        dirs: vec![],
        files: vec![],
    });
    let m = Manifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        kind,
        stanza: repo.stanza().into(),
        started_at: t,
        finished_at: t,
        pg_version: "15".into(),
        pg_version_num: 150000,
        system_identifier: "1".into(),
        compression: CompressionConfig::default(),
        host: "h".into(),
        pg_dump_version: None,
        databases: vec![],
        physical,
    };
    repo.commit_manifest(&m).await.unwrap();
    id
}

async fn wal(repo: &Repo, tli: u32, segno: u64) {
    let name = Segment { tli, segno }.name(SEG);
    storage::put_bytes(
        &**repo.storage(),
        &repo.key(&format!("wal/{}/{name}", &name[..16])),
        bytes::Bytes::from_static(b"w"),
        PutMode::Overwrite,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn count_and_age_policies_and_wal_pruning() {
    both(|st| async move {
        let repo = Repo::new(st, "r");
        let f1 = fake(&repo, BackupKind::Physical, day(1), 10).await;
        let f2 = fake(&repo, BackupKind::Physical, day(8), 20).await;
        let f3 = fake(&repo, BackupKind::Physical, day(15), 30).await;
        let l1 = fake(&repo, BackupKind::Logical, day(1), 0).await;
        let l2 = fake(&repo, BackupKind::Logical, day(14), 0).await;
        for s in [9, 10, 15, 19, 20, 25, 30, 31] {
            wal(&repo, 1, s).await;
        }
        wal(&repo, 2, 19).await; // an old branch below the cutoff
        storage::put_bytes(
            &**repo.storage(),
            &repo.key("wal/history/00000002.history"),
            bytes::Bytes::from_static(b"1\t0/13000000\tx\n"),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
        let now = day(16);

        // Count: keep 2 full -> f1 goes, WAL below f2's start (segment 20) goes, history stays.
        let cfg = RetentionConfig {
            full_count: Some(2),
            ..Default::default()
        };
        let p = retention::plan(&repo, &cfg, SEG, now).await.unwrap();
        assert_eq!(p.backups, vec![f1.clone()]);
        assert!(
            p.kept.contains(&f2)
                && p.kept.contains(&f3)
                && p.kept.contains(&l1)
                && p.kept.contains(&l2)
        );
        let names: Vec<String> = p
            .wal
            .iter()
            .map(|k| k.rsplit('/').next().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            vec![
                "000000010000000000000009",
                "00000001000000000000000A",
                "00000001000000000000000F",
                "000000010000000000000013",
                "000000020000000000000013",
            ]
        );

        // Age: younger than 10 days -> f3 and f2 (8 days old); logical: 1 day -> only the newest, kept anyway.
        let cfg = RetentionConfig {
            full_days: Some(10),
            logical_days: Some(1),
            ..Default::default()
        };
        let p = retention::plan(&repo, &cfg, SEG, now).await.unwrap();
        assert_eq!(
            p.backups,
            vec![l1.clone(), f1.clone()]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        // The newest of a type is never deleted, even when every policy says so.
        let cfg = RetentionConfig {
            full_days: Some(1),
            logical_days: Some(1),
            ..Default::default()
        };
        let p = retention::plan(&repo, &cfg, SEG, now).await.unwrap();
        assert!(p.kept.contains(&f3) && p.kept.contains(&l2), "{p:?}");
        assert!(!p.backups.contains(&f3) && !p.backups.contains(&l2));

        // Dry run equals what a real run deletes.
        let cfg = RetentionConfig {
            full_count: Some(2),
            logical_count: Some(1),
            ..Default::default()
        };
        let dry = retention::plan(&repo, &cfg, SEG, now).await.unwrap();
        let lock = RepoLock::acquire(&repo, "test expire", Duration::from_secs(5))
            .await
            .unwrap();
        let before: Vec<_> = repo
            .storage()
            .list("r/")
            .await
            .unwrap()
            .into_iter()
            .filter(|o| !o.key.contains("/locks/"))
            .collect();
        retention::execute(&lock, &dry).await.unwrap();
        lock.release().await.unwrap();
        let after = repo.storage().list("r/").await.unwrap();
        let gone: Vec<String> = before
            .iter()
            .filter(|o| !after.contains(o))
            .map(|o| o.key.strip_prefix("r/").unwrap().to_string())
            .collect();
        let mut expected: Vec<String> = dry.wal.clone();
        for id in &dry.backups {
            expected.push(format!("backups/{id}/data"));
            expected.push(format!("backups/{id}/manifest.json"));
        }
        let mut gone_sorted = gone.clone();
        gone_sorted.sort();
        expected.sort();
        assert_eq!(gone_sorted, expected);
        let ids: Vec<String> = repo
            .catalog()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            ids,
            vec![l2.clone(), f2.clone(), f3.clone()]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert!(after.iter().any(|o| o.key.ends_with("00000002.history")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_and_history_age_out() {
    both(|st| async move {
        let repo = Repo::new(st, "r");
        fake(&repo, BackupKind::Logical, day(2), 0).await;
        // An interrupted backup (no manifest) from day 3 and one from an hour before now.
        for id in ["20261103T020000Z-L", "20261116T010000Z-L"] {
            storage::put_bytes(
                &**repo.storage(),
                &repo.key(&format!("backups/{id}/000-app.pgdump.zst")),
                bytes::Bytes::from_static(b"partial"),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        }
        for name in [
            "20261001T000000.000Z-drill.json",
            "20261115T000000.000Z-drill.json",
        ] {
            storage::put_bytes(
                &**repo.storage(),
                &repo.key(&format!("history/drill/{name}")),
                bytes::Bytes::from_static(b"{}"),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        }
        let cfg = RetentionConfig {
            history_days: Some(30),
            ..Default::default()
        };
        let p = retention::plan(
            &repo,
            &cfg,
            SEG,
            Utc.with_ymd_and_hms(2026, 11, 16, 2, 0, 0).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(
            p.leftovers,
            vec!["backups/20261103T020000Z-L/000-app.pgdump.zst".to_string()]
        );
        assert_eq!(
            p.history,
            vec!["history/drill/20261001T000000.000Z-drill.json".to_string()]
        );
        assert!(p.backups.is_empty());
        assert!(
            p.notes.iter().any(|n| n.contains("20261116T010000Z-L")),
            "{:?}",
            p.notes
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lock_waits_fails_naming_the_holder_and_takes_over_stale_ones() {
    both(|st| async move {
        let repo = Repo::new(st, "r");
        let first = RepoLock::acquire(&repo, "backup --type physical", Duration::from_secs(1)).await.unwrap();
        let t = std::time::Instant::now();
        let err = RepoLock::acquire(&repo, "expire", Duration::from_secs(1)).await.unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(900), "must wait before failing");
        let msg = err.to_string();
        assert!(msg.contains("backup --type physical") && msg.contains(&std::process::id().to_string()), "{msg}");
        assert_eq!(err.exit_code().code(), 12);
        // Released: the next one gets it at once.
        first.release().await.unwrap();
        let second = RepoLock::acquire(&repo, "expire", Duration::from_secs(1)).await.unwrap();
        second.release().await.unwrap();

        // Stale: a dead pid on this host.
        let host = drctl::backup::logical::hostname();
        let dead = serde_json::json!({
            "host": host, "pid": 4_000_000u32, "command": "backup", "token": "x",
            "started_at": Utc::now().to_rfc3339(), "lease_until": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
        });
        storage::put_bytes(&**repo.storage(), &repo.key("locks/repo.lock"), bytes::Bytes::from(dead.to_string()), PutMode::Overwrite).await.unwrap();
        let l = RepoLock::acquire(&repo, "expire", Duration::from_secs(1)).await.expect("dead pid lock taken over");
        l.release().await.unwrap();
        // Stale: an expired lease held by another host.
        let expired = serde_json::json!({
            "host": "elsewhere", "pid": 1u32, "command": "backup", "token": "y",
            "started_at": Utc::now().to_rfc3339(), "lease_until": (Utc::now() - chrono::Duration::minutes(5)).to_rfc3339(),
        });
        storage::put_bytes(&**repo.storage(), &repo.key("locks/repo.lock"), bytes::Bytes::from(expired.to_string()), PutMode::Overwrite).await.unwrap();
        let l = RepoLock::acquire(&repo, "expire", Duration::from_secs(1)).await.expect("expired lease taken over");
        l.release().await.unwrap();
        // Live, other host: respected.
        let live = serde_json::json!({
            "host": "elsewhere", "pid": 1u32, "command": "backup --type logical", "token": "z",
            "started_at": Utc::now().to_rfc3339(), "lease_until": (Utc::now() + chrono::Duration::minutes(5)).to_rfc3339(),
        });
        storage::put_bytes(&**repo.storage(), &repo.key("locks/repo.lock"), bytes::Bytes::from(live.to_string()), PutMode::Overwrite).await.unwrap();
        let err = RepoLock::acquire(&repo, "expire", Duration::from_millis(600)).await.unwrap_err();
        assert!(err.to_string().contains("elsewhere"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_backup_waits_then_fails_naming_the_holder() {
    let tc = common::cluster("");
    let env = common::Env::new(&tc.cluster.endpoint(), common::RepoKind::Fs);
    let repo = Repo::new(env.storage().await, "test");
    let held = RepoLock::acquire(&repo, "backup --type physical", Duration::from_secs(1))
        .await
        .unwrap();
    if let Some(u) = common::owner() {
        drctl::pg::cluster::chown_tree(&env.repo_dir, &u).unwrap();
    }
    let out = env.drctl(&["backup", "--type", "logical", "--lock-timeout", "1s"]);
    assert_eq!(common::code(&out), 12, "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("backup --type physical"),
        "{}",
        common::stderr(&out)
    );
    held.release().await.unwrap();
    env.ok(&["backup", "--type", "logical", "--lock-timeout", "1s"]);
    let v = env.json(&["expire", "--dry-run"]);
    assert_eq!(v["dry_run"], true);
}

/// Regression: an expire running while a verify or restore read the repository deleted what
/// they read, and verify reported the deleted objects as missing (corruption). Readers now
/// hold leases that expire waits for, and they wait for a running expire.
#[tokio::test(flavor = "multi_thread")]
async fn expire_and_readers_exclude_each_other_but_backups_do_not_block_readers() {
    both(|st| async move {
        let repo = Repo::new(st, "rl");
        // A backup holds the lock: readers go on.
        let backup = RepoLock::acquire(&repo, "backup --type logical", Duration::from_secs(1)).await.unwrap();
        let reader = ReadLease::acquire(&repo, "verify", Duration::from_millis(100)).await.expect("a backup does not block readers");
        backup.release().await.unwrap();

        // A live reader: expire waits, then fails naming it, and leaves the lock free.
        let t = std::time::Instant::now();
        let err = RepoLock::acquire_excluding_readers(&repo, "expire", Duration::from_secs(1)).await.unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(900), "must wait before failing");
        assert_eq!(err.exit_code().code(), 12);
        assert!(err.to_string().contains("being read by `verify`"), "{err}");
        let free = RepoLock::acquire(&repo, "backup", Duration::from_millis(100)).await.expect("expire gave the lock back");
        free.release().await.unwrap();

        // The reader finishes while expire waits: expire goes on.
        let waiting = {
            let repo = repo.clone();
            tokio::spawn(async move { RepoLock::acquire_excluding_readers(&repo, "expire", Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!waiting.is_finished(), "expire must wait for the reader");
        reader.release().await;
        let expire = waiting.await.unwrap().expect("expire proceeds once the reader is gone");

        // While expire holds the lock, a new reader waits, then fails naming it.
        let err = ReadLease::acquire(&repo, "restore --pitr", Duration::from_millis(800)).await.unwrap_err();
        assert_eq!(err.exit_code().code(), 12);
        assert!(err.to_string().contains("`expire`"), "{err}");
        let leases = repo.storage().list(&repo.key("locks/readers/")).await.unwrap();
        assert!(leases.is_empty(), "a reader that stepped back leaves no lease: {leases:?}");
        expire.release().await.unwrap();
        let r = ReadLease::acquire(&repo, "restore --pitr", Duration::from_millis(100)).await.unwrap();
        r.release().await;

        // A stale lease (dead pid on this host) does not hold expire up; it is removed.
        let dead = serde_json::json!({
            "host": drctl::backup::logical::hostname(), "pid": 4_000_000u32, "command": "verify", "token": "gone",
            "started_at": Utc::now().to_rfc3339(), "lease_until": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
        });
        let key = repo.key("locks/readers/gone.json");
        storage::put_bytes(&**repo.storage(), &key, bytes::Bytes::from(dead.to_string()), PutMode::Overwrite).await.unwrap();
        let l = RepoLock::acquire_excluding_readers(&repo, "expire", Duration::from_millis(500)).await.expect("stale lease ignored");
        assert!(repo.storage().head(&key).await.unwrap().is_none(), "stale lease removed");
        l.release().await.unwrap();
    })
    .await;
}
