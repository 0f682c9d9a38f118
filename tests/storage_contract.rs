//! The storage contract (see `drctl::storage::Storage`), checked against every driver: the fs
//! driver in a temp directory and the S3 driver against a real S3 server (s3s) in this process.
//! Each behaviour is one `async fn` taking a [`Ctx`]; `contract!` runs it once per driver.
//! S3-only behaviour (credentials, buckets, key prefixes) is tested at the end.

#[path = "common/s3server.rs"]
mod s3server;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use drctl::storage::fs::FsStorage;
use drctl::storage::s3::S3Storage;
use drctl::storage::{self, BoxRead, ObjectMeta, PutMode, Storage, StorageError};
use futures::StreamExt;
use s3server::{S3Server, Stats};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_util::io::StreamReader;

const MIB: usize = 1024 * 1024;
/// The part size the S3 test config uses (`part-size-mib = 5`).
const PART: usize = 5 * MIB;

/// One driver under test, plus whatever keeps its backing store alive.
struct Ctx {
    name: &'static str,
    storage: Arc<dyn Storage>,
    fs_root: Option<tempfile::TempDir>,
    server: Option<S3Server>,
}

impl Ctx {
    async fn fs() -> Ctx {
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::new(dir.path().join("repo")).unwrap();
        Ctx {
            name: "fs",
            storage: Arc::new(storage),
            fs_root: Some(dir),
            server: None,
        }
    }

    async fn s3() -> Ctx {
        let server = S3Server::start().await;
        // A nested prefix, so every test also checks prefix handling.
        let storage = server.storage("repo/main").await;
        Ctx {
            name: "s3",
            storage: Arc::new(storage),
            fs_root: None,
            server: Some(server),
        }
    }

    /// Requests the S3 server has served; `None` for fs.
    fn stats(&self) -> Option<Stats> {
        self.server.as_ref().map(|s| s.stats())
    }

    fn s(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// What failed writes left behind: fs temp files, or S3 open uploads, parts and temp files.
    fn leftovers(&self) -> Vec<String> {
        if let Some(server) = &self.server {
            return server.leftovers();
        }
        let mut found = Vec::new();
        let mut stack = vec![self.fs_root.as_ref().unwrap().path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type().unwrap().is_dir() {
                    stack.push(entry.path());
                } else if name.starts_with(".tmp-") {
                    found.push(entry.path().display().to_string());
                }
            }
        }
        found
    }

    async fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<u64, StorageError> {
        self.s().put(key, body(data.to_vec()), mode).await
    }

    async fn get(&self, key: &str) -> Vec<u8> {
        storage::get_bytes(self.s(), key)
            .await
            .unwrap_or_else(|e| panic!("[{}] get {key}: {e}", self.name))
    }

    async fn range(&self, key: &str, start: u64, len: u64) -> Vec<u8> {
        let r = self
            .s()
            .get_range(key, start, len)
            .await
            .unwrap_or_else(|e| panic!("[{}] get_range {key} {start}+{len}: {e}", self.name));
        read_all(r).await
    }

    async fn keys(&self, prefix: &str) -> Vec<String> {
        self.s()
            .list(prefix)
            .await
            .unwrap_or_else(|e| panic!("[{}] list {prefix:?}: {e}", self.name))
            .into_iter()
            .map(|m| m.key)
            .collect()
    }
}

/// Runs each named `async fn(&Ctx)` as two tests, `<name>::fs` and `<name>::s3`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn fs() {
                super::$name(&super::Ctx::fs().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn s3() {
                super::$name(&super::Ctx::s3().await).await;
            }
        }
    )*};
}

contract!(
    round_trip_small,
    round_trip_multipart,
    round_trip_exactly_one_part,
    overwrite_replaces,
    put_if_absent_creates_when_absent,
    put_if_absent_existing_small,
    put_if_absent_existing_multipart,
    put_if_absent_race_small,
    put_if_absent_race_multipart,
    put_if_absent_loses_to_writer_that_finished_first,
    get_missing_is_not_found,
    head_reports_size,
    get_range_reads_slices,
    list_by_prefix,
    list_paginates,
    delete_removes,
    failing_body_small_leaves_nothing,
    failing_body_multipart_leaves_nothing,
    invalid_keys_rejected,
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn body(data: Vec<u8>) -> BoxRead {
    Box::pin(io::Cursor::new(data))
}

async fn read_all(mut r: BoxRead) -> Vec<u8> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    out
}

/// Deterministic incompressible-looking bytes (xorshift), different for each seed.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A body that yields `good` and then fails, like a pipeline whose source broke.
fn failing_body(good: Vec<u8>) -> BoxRead {
    let chunks: Vec<io::Result<Bytes>> = good
        .chunks(MIB)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .chain(std::iter::once(Err(io::Error::other("source broke"))))
        .collect();
    Box::pin(StreamReader::new(futures::stream::iter(chunks)))
}

fn assert_already_exists(name: &str, r: Result<u64, StorageError>) {
    match r {
        Err(StorageError::AlreadyExists(_)) => {}
        other => panic!("[{name}] expected AlreadyExists, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Contract, for every driver

async fn round_trip_small(c: &Ctx) {
    assert_eq!(
        c.put("a/b.txt", b"hello", PutMode::Overwrite)
            .await
            .unwrap(),
        5
    );
    assert_eq!(c.get("a/b.txt").await, b"hello");
    // The empty object is a real object, not an absence.
    assert_eq!(c.put("a/empty", b"", PutMode::Overwrite).await.unwrap(), 0);
    assert_eq!(c.get("a/empty").await, b"");
    assert_eq!(
        c.s().head("a/empty").await.unwrap(),
        Some(ObjectMeta {
            key: "a/empty".into(),
            size: 0
        })
    );
}

async fn round_trip_multipart(c: &Ctx) {
    // More than two full parts plus a ragged tail.
    let d = data(2 * PART + 1_234_567, 1);
    let n = c
        .s()
        .put("big/obj", body(d.clone()), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(n, d.len() as u64);
    let got = c.get("big/obj").await;
    assert_eq!(got.len(), d.len(), "[{}] size", c.name);
    assert_eq!(sha(&got), sha(&d), "[{}] content", c.name);
    assert!(c.leftovers().is_empty(), "[{}] {:?}", c.name, c.leftovers());
    if let Some(st) = c.stats() {
        assert_eq!(
            (
                st.put_object,
                st.create_multipart,
                st.upload_part,
                st.complete_multipart
            ),
            (0, 1, 3, 1),
            "{st:?}"
        );
        // The default upload-concurrency is 4.
        assert!(st.max_parts_in_flight <= 4, "{st:?}");
    }
}

async fn round_trip_exactly_one_part(c: &Ctx) {
    // The size at which the S3 driver switches from PutObject to multipart.
    for (key, len) in [
        ("edge/under", PART - 1),
        ("edge/exact", PART),
        ("edge/over", PART + 1),
    ] {
        let d = data(len, len as u64);
        assert_eq!(
            c.put(key, &d, PutMode::Overwrite).await.unwrap(),
            len as u64
        );
        assert_eq!(sha(&c.get(key).await), sha(&d), "[{}] {key}", c.name);
    }
    if let Some(st) = c.stats() {
        // Under one part: PutObject. Exactly one part: a one-part multipart upload.
        assert_eq!(
            (
                st.put_object,
                st.create_multipart,
                st.upload_part,
                st.complete_multipart
            ),
            (1, 2, 3, 2),
            "{st:?}"
        );
    }
}

async fn overwrite_replaces(c: &Ctx) {
    let big = data(PART + 10, 2);
    c.put("k", b"version one", PutMode::Overwrite)
        .await
        .unwrap();
    c.put("k", &big, PutMode::Overwrite).await.unwrap();
    assert_eq!(sha(&c.get("k").await), sha(&big));
    c.put("k", b"v3", PutMode::Overwrite).await.unwrap();
    assert_eq!(c.get("k").await, b"v3");
    assert_eq!(c.keys("").await, vec!["k"]);
}

async fn put_if_absent_creates_when_absent(c: &Ctx) {
    assert_eq!(
        c.put("new/small", b"x", PutMode::IfAbsent).await.unwrap(),
        1
    );
    let big = data(PART + 77, 3);
    assert_eq!(
        c.put("new/big", &big, PutMode::IfAbsent).await.unwrap(),
        big.len() as u64
    );
    assert_eq!(c.get("new/small").await, b"x");
    assert_eq!(sha(&c.get("new/big").await), sha(&big));
}

async fn put_if_absent_existing_small(c: &Ctx) {
    c.put("manifest", b"original", PutMode::Overwrite)
        .await
        .unwrap();
    assert_already_exists(
        c.name,
        c.put("manifest", b"intruder", PutMode::IfAbsent).await,
    );
    assert_eq!(c.get("manifest").await, b"original");
    // A multipart-sized attempt on a small existing object fails the same way.
    let big = data(PART + 1, 4);
    assert_already_exists(c.name, c.put("manifest", &big, PutMode::IfAbsent).await);
    assert_eq!(c.get("manifest").await, b"original");
    assert!(c.leftovers().is_empty(), "[{}] {:?}", c.name, c.leftovers());
}

async fn put_if_absent_existing_multipart(c: &Ctx) {
    let orig = data(2 * PART + 3, 5);
    c.put("data/big", &orig, PutMode::Overwrite).await.unwrap();
    let other = data(2 * PART + 3, 6);
    assert_already_exists(c.name, c.put("data/big", &other, PutMode::IfAbsent).await);
    assert_already_exists(c.name, c.put("data/big", b"small", PutMode::IfAbsent).await);
    assert_eq!(sha(&c.get("data/big").await), sha(&orig));
    assert!(c.leftovers().is_empty(), "[{}] {:?}", c.name, c.leftovers());
}

/// `n` writers race to create `key` with distinct contents: exactly one wins, the others get
/// AlreadyExists, and the stored object is the winner's, whole.
async fn race(c: &Ctx, key: &str, n: u64, len: usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let storage = c.storage.clone();
        let key = key.to_string();
        let d = data(len, 100 + i);
        tasks.push(tokio::spawn(async move {
            let r = storage.put(&key, body(d.clone()), PutMode::IfAbsent).await;
            (d, r)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (d, r) = t.await.unwrap();
        match r {
            Ok(written) => {
                assert_eq!(written, len as u64);
                winners.push(d);
            }
            Err(StorageError::AlreadyExists(_)) => {}
            Err(e) => panic!("[{}] racing put failed: {e}", c.name),
        }
    }
    assert_eq!(winners.len(), 1, "[{}] exactly one writer must win", c.name);
    assert_eq!(sha(&c.get(key).await), sha(&winners[0]), "[{}]", c.name);
    assert!(c.leftovers().is_empty(), "[{}] {:?}", c.name, c.leftovers());
}

async fn put_if_absent_race_small(c: &Ctx) {
    race(c, "lock/small", 8, 1000).await;
}

async fn put_if_absent_race_multipart(c: &Ctx) {
    race(c, "lock/big", 6, PART + MIB).await;
}

/// A put-if-absent that is still streaming when another writer creates the key must fail at
/// publish time, not overwrite (on S3 this is the conditional CompleteMultipartUpload).
async fn put_if_absent_loses_to_writer_that_finished_first(c: &Ctx) {
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let first = Bytes::from(data(PART, 7));
    let rest = Bytes::from(data(MIB, 8));
    let stream = futures::stream::once(async move { Ok::<_, io::Error>(first) }).chain(
        futures::stream::once(async move {
            let _ = reached_tx.send(());
            let _ = release_rx.await;
            Ok(rest)
        }),
    );
    let gated: BoxRead = Box::pin(StreamReader::new(Box::pin(stream)));

    let storage = c.storage.clone();
    let slow = tokio::spawn(async move { storage.put("race/key", gated, PutMode::IfAbsent).await });
    tokio::time::timeout(Duration::from_secs(20), reached_rx)
        .await
        .expect("slow writer reached the middle of its body")
        .unwrap();

    c.put("race/key", b"fast writer", PutMode::IfAbsent)
        .await
        .unwrap();
    release_tx.send(()).unwrap();
    assert_already_exists(c.name, slow.await.unwrap());
    assert_eq!(c.get("race/key").await, b"fast writer");
    assert!(c.leftovers().is_empty(), "[{}] {:?}", c.name, c.leftovers());
    if let Some(st) = c.stats() {
        // Refused at CompleteMultipartUpload, then aborted.
        assert_eq!(
            (
                st.create_multipart,
                st.complete_multipart,
                st.abort_multipart
            ),
            (1, 0, 1),
            "{st:?}"
        );
    }
}

async fn get_missing_is_not_found(c: &Ctx) {
    c.put("present", b"x", PutMode::Overwrite).await.unwrap();
    for key in ["absent", "dir/absent"] {
        match c.s().get(key).await {
            Err(e @ StorageError::NotFound(_)) => {
                assert!(e.is_not_found());
                assert!(!e.is_retryable());
                assert!(e.to_string().contains(key), "[{}] {e}", c.name);
            }
            Err(e) => panic!("[{}] get {key}: expected NotFound, got {e:?}", c.name),
            Ok(_) => panic!("[{}] get {key}: expected NotFound, got a stream", c.name),
        }
        match c.s().get_range(key, 0, 10).await {
            Err(StorageError::NotFound(_)) => {}
            Err(e) => panic!("[{}] get_range {key}: expected NotFound, got {e:?}", c.name),
            Ok(_) => panic!(
                "[{}] get_range {key}: expected NotFound, got a stream",
                c.name
            ),
        }
    }
}

async fn head_reports_size(c: &Ctx) {
    let d = data(PART + 5, 9);
    c.put("h/big", &d, PutMode::Overwrite).await.unwrap();
    c.put("h/small", b"12345", PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(
        c.s().head("h/big").await.unwrap(),
        Some(ObjectMeta {
            key: "h/big".into(),
            size: d.len() as u64
        })
    );
    assert_eq!(
        c.s().head("h/small").await.unwrap(),
        Some(ObjectMeta {
            key: "h/small".into(),
            size: 5
        })
    );
    assert_eq!(c.s().head("h/missing").await.unwrap(), None);
    // A prefix of existing keys is not an object.
    assert_eq!(c.s().head("h").await.unwrap(), None);
}

async fn get_range_reads_slices(c: &Ctx) {
    let d = data(1000, 10);
    c.put("r/obj", &d, PutMode::Overwrite).await.unwrap();
    assert_eq!(c.range("r/obj", 0, 10).await, &d[..10]);
    assert_eq!(c.range("r/obj", 100, 50).await, &d[100..150]);
    assert_eq!(c.range("r/obj", 999, 1).await, &d[999..]);
    // Past the end: truncated, then empty.
    assert_eq!(c.range("r/obj", 990, 100).await, &d[990..]);
    assert_eq!(c.range("r/obj", 1000, 10).await, b"");
    assert_eq!(c.range("r/obj", 5000, 1).await, b"");
    assert_eq!(c.range("r/obj", 10, 0).await, b"");

    // Across a part boundary of a multipart object.
    let big = data(PART + 1000, 11);
    c.put("r/big", &big, PutMode::Overwrite).await.unwrap();
    let (start, len) = (PART - 100, 300);
    assert_eq!(
        c.range("r/big", start as u64, len as u64).await,
        &big[start..start + len]
    );
}

async fn list_by_prefix(c: &Ctx) {
    for (key, body) in [
        ("backups/2/b", &b"22"[..]),
        ("backups/1/a", b"1"),
        ("backups/10/c", b"333"),
        ("backupsx/y", b"y"),
        ("wal/0001", b"w"),
    ] {
        c.put(key, body, PutMode::Overwrite).await.unwrap();
    }
    let listed = c.s().list("backups/").await.unwrap();
    assert_eq!(
        listed,
        vec![
            ObjectMeta {
                key: "backups/1/a".into(),
                size: 1
            },
            ObjectMeta {
                key: "backups/10/c".into(),
                size: 3
            },
            ObjectMeta {
                key: "backups/2/b".into(),
                size: 2
            },
        ],
        "[{}]",
        c.name
    );
    assert_eq!(
        c.keys("backups").await,
        vec!["backups/1/a", "backups/10/c", "backups/2/b", "backupsx/y"]
    );
    assert_eq!(
        c.keys("backups/1").await,
        vec!["backups/1/a", "backups/10/c"]
    );
    assert_eq!(
        c.keys("").await,
        vec![
            "backups/1/a",
            "backups/10/c",
            "backups/2/b",
            "backupsx/y",
            "wal/0001"
        ]
    );
    assert!(c.keys("nothing/").await.is_empty());
}

async fn list_paginates(c: &Ctx) {
    // The test S3 server returns at most a handful of keys per page.
    let mut expected: Vec<String> = (0..23).map(|i| format!("many/{i:03}")).collect();
    for k in &expected {
        c.put(k, k.as_bytes(), PutMode::Overwrite).await.unwrap();
    }
    c.put("other/x", b"x", PutMode::Overwrite).await.unwrap();
    assert_eq!(c.keys("many/").await, expected);
    expected.push("other/x".into());
    assert_eq!(c.keys("").await, expected);
}

async fn delete_removes(c: &Ctx) {
    c.put("d/a", b"a", PutMode::Overwrite).await.unwrap();
    c.put("d/b", b"b", PutMode::Overwrite).await.unwrap();
    c.s().delete("d/a").await.unwrap();
    assert_eq!(c.s().head("d/a").await.unwrap(), None);
    assert!(matches!(
        c.s().get("d/a").await,
        Err(StorageError::NotFound(_))
    ));
    assert_eq!(c.keys("d/").await, vec!["d/b"]);
    // Deleting what is not there succeeds: again, never existed, under a missing "directory".
    c.s().delete("d/a").await.unwrap();
    c.s().delete("d/never").await.unwrap();
    c.s().delete("nowhere/at/all").await.unwrap();
    // The key can be created again, even with put-if-absent.
    c.put("d/a", b"again", PutMode::IfAbsent).await.unwrap();
    assert_eq!(c.get("d/a").await, b"again");
}

async fn failing_body_small_leaves_nothing(c: &Ctx) {
    let r = c
        .s()
        .put("f/small", failing_body(data(100, 12)), PutMode::Overwrite)
        .await;
    match r {
        Err(StorageError::Io { source, .. }) => {
            assert!(source.to_string().contains("source broke"))
        }
        other => panic!("[{}] expected the body's error, got {other:?}", c.name),
    }
    let r = c
        .s()
        .put("f/small", failing_body(Vec::new()), PutMode::IfAbsent)
        .await;
    assert!(
        matches!(r, Err(StorageError::Io { .. })),
        "[{}] {r:?}",
        c.name
    );
    assert_eq!(c.s().head("f/small").await.unwrap(), None);
    assert!(c.keys("").await.is_empty(), "[{}]", c.name);
    assert!(c.leftovers().is_empty(), "[{}] {:?}", c.name, c.leftovers());
    if let Some(st) = c.stats() {
        // The body failed before a whole part was read: not a single write request.
        assert_eq!(st, Stats::default());
    }
}

async fn failing_body_multipart_leaves_nothing(c: &Ctx) {
    // Two full parts have been uploaded (S3) when the source fails.
    let r = c
        .s()
        .put(
            "f/big",
            failing_body(data(2 * PART + MIB, 13)),
            PutMode::Overwrite,
        )
        .await;
    match r {
        Err(StorageError::Io { source, .. }) => {
            assert!(source.to_string().contains("source broke"))
        }
        other => panic!("[{}] expected the body's error, got {other:?}", c.name),
    }
    // An existing object is not damaged by a failed overwrite.
    c.put("f/kept", b"kept", PutMode::Overwrite).await.unwrap();
    let r = c
        .s()
        .put(
            "f/kept",
            failing_body(data(PART + 1, 14)),
            PutMode::Overwrite,
        )
        .await;
    assert!(
        matches!(r, Err(StorageError::Io { .. })),
        "[{}] {r:?}",
        c.name
    );

    assert_eq!(c.s().head("f/big").await.unwrap(), None);
    assert_eq!(c.keys("").await, vec!["f/kept"]);
    assert_eq!(c.get("f/kept").await, b"kept");
    assert!(c.leftovers().is_empty(), "[{}] {:?}", c.name, c.leftovers());
    if let Some(server) = &c.server {
        assert_eq!(
            server.pending_multipart_uploads(),
            0,
            "upload was not aborted"
        );
        assert_eq!(server.stray_parts(), 0);
        let st = server.stats();
        assert_eq!(
            (
                st.create_multipart,
                st.complete_multipart,
                st.abort_multipart
            ),
            (2, 0, 2),
            "{st:?}"
        );
        assert!(st.upload_part >= 3, "{st:?}");
    }
}

async fn invalid_keys_rejected(c: &Ctx) {
    for key in ["", "/abs", "a/../b", "a//b", "./a", "a/"] {
        let r = c.put(key, b"x", PutMode::Overwrite).await;
        match r {
            Err(e) => assert!(!e.is_retryable(), "[{}] {key:?}: {e}", c.name),
            Ok(_) => panic!("[{}] key {key:?} was accepted", c.name),
        }
    }
    assert!(c.keys("").await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// S3 only

#[tokio::test]
async fn s3_wrong_secret_is_denied() {
    let server = S3Server::start().await;
    let s = S3Storage::with_credentials(
        &server.repository_config("p"),
        &server.access_key,
        "not-the-secret",
    )
    .await
    .unwrap();
    let errors = [
        s.put("k", body(b"x".to_vec()), PutMode::Overwrite)
            .await
            .unwrap_err(),
        s.get("k").await.err().unwrap(),
        s.list("").await.unwrap_err(),
        s.delete("k").await.unwrap_err(),
    ];
    for e in errors {
        match &e {
            StorageError::Denied { message, .. } => {
                assert!(message.contains("SignatureDoesNotMatch"), "{message}")
            }
            other => panic!("expected Denied, got {other:?}"),
        }
        assert!(!e.is_retryable());
        let text = e.to_string();
        assert!(
            text.contains("access denied") && text.contains("s3://drctl-test/p/"),
            "{text}"
        );
        assert!(
            !text.contains("not-the-secret"),
            "the secret leaked: {text}"
        );
    }
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[tokio::test]
async fn s3_unknown_access_key_is_denied() {
    let server = S3Server::start().await;
    let s = S3Storage::with_credentials(&server.repository_config(""), "NOBODY", "whatever")
        .await
        .unwrap();
    let e = s.list("").await.unwrap_err();
    assert!(matches!(e, StorageError::Denied { .. }), "{e:?}");
    // A multipart-sized put fails at its first request and leaves nothing.
    let e = s
        .put("big", body(data(PART + 1, 1)), PutMode::Overwrite)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Denied { .. }), "{e:?}");
    assert!(server.leftovers().is_empty());
}

#[derive(Debug)]
struct NoCredentials;

impl aws_sdk_s3::config::ProvideCredentials for NoCredentials {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::ready(Err(
            aws_credential_types::provider::error::CredentialsError::not_loaded(
                "no credentials in the environment",
            ),
        ))
    }
}

#[tokio::test]
async fn s3_missing_credentials_is_denied_with_a_hint() {
    let server = S3Server::start().await;
    let s = S3Storage::with_credentials_provider(&server.repository_config(""), NoCredentials)
        .await
        .unwrap();
    let e = s.get("k").await.err().unwrap();
    match &e {
        StorageError::Denied { message, .. } => {
            assert!(message.contains("AWS_ACCESS_KEY_ID"), "{message}")
        }
        other => panic!("expected Denied, got {other:?}"),
    }
    assert!(!e.is_retryable());
}

#[tokio::test]
async fn s3_missing_bucket() {
    let server = S3Server::start().await;
    let mut cfg = server.repository_config("p");
    cfg.bucket = Some("no-such-bucket".into());
    let s = S3Storage::with_credentials(&cfg, &server.access_key, &server.secret_key)
        .await
        .unwrap();
    let errors = [
        s.put("k", body(b"x".to_vec()), PutMode::Overwrite)
            .await
            .unwrap_err(),
        s.put("k", body(data(PART + 1, 2)), PutMode::Overwrite)
            .await
            .unwrap_err(),
        s.get("k").await.err().unwrap(),
        s.list("").await.unwrap_err(),
        s.delete("k").await.unwrap_err(),
    ];
    for e in errors {
        match &e {
            StorageError::NoSuchBucket(what) => assert!(what.contains("no-such-bucket"), "{what}"),
            other => panic!("expected NoSuchBucket, got {other:?}"),
        }
        assert!(!e.is_retryable());
    }
    assert!(
        !server.root().join("no-such-bucket").exists(),
        "bucket was created"
    );
}

#[tokio::test]
async fn s3_unreachable_endpoint_is_retryable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = drctl::config::RepositoryConfig {
        kind: drctl::config::RepositoryKind::S3,
        bucket: Some("b".into()),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".into()),
        force_path_style: true,
        max_attempts: 1,
        ..Default::default()
    };
    let s = S3Storage::with_credentials(&cfg, "a", "b").await.unwrap();
    let e = s.list("").await.unwrap_err();
    match &e {
        StorageError::Backend {
            message, retryable, ..
        } => {
            assert!(*retryable, "{message}");
            assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        }
        other => panic!("expected a retryable Backend error, got {other:?}"),
    }
}

#[tokio::test]
async fn s3_prefix_layout_and_describe() {
    let server = S3Server::start().await;
    let root = server.storage("").await;
    let nested = server.storage("/team/db/").await;
    let sibling = server.storage("team/db2").await;

    nested
        .put("k", body(b"n".to_vec()), PutMode::Overwrite)
        .await
        .unwrap();
    sibling
        .put("k", body(b"s".to_vec()), PutMode::Overwrite)
        .await
        .unwrap();
    root.put("top", body(b"t".to_vec()), PutMode::Overwrite)
        .await
        .unwrap();

    let all: Vec<String> = root
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(all, vec!["team/db/k", "team/db2/k", "top"]);
    // Each prefix is its own repository; "team/db" does not see "team/db2".
    let mine: Vec<String> = nested
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(mine, vec!["k"]);
    assert!(nested.head("top").await.unwrap().is_none());
    assert!(server.root().join("drctl-test/team/db/k").is_file());

    assert_eq!(
        nested.describe(),
        format!("s3://drctl-test/team/db ({})", server.endpoint)
    );
    assert_eq!(
        root.describe(),
        format!("s3://drctl-test ({})", server.endpoint)
    );
    let debug = format!("{nested:?}");
    assert!(!debug.contains(&server.secret_key), "{debug}");
}

#[tokio::test]
async fn s3_multipart_with_one_upload_at_a_time() {
    let server = S3Server::start().await;
    let mut cfg = server.repository_config("c1");
    cfg.upload_concurrency = 1;
    let s = S3Storage::with_credentials(&cfg, &server.access_key, &server.secret_key)
        .await
        .unwrap();
    let d = data(3 * PART + 17, 21);
    assert_eq!(
        s.put("obj", body(d.clone()), PutMode::IfAbsent)
            .await
            .unwrap(),
        d.len() as u64
    );
    assert_eq!(sha(&storage::get_bytes(&s, "obj").await.unwrap()), sha(&d));
    assert!(server.leftovers().is_empty());
    let st = server.stats();
    assert_eq!((st.upload_part, st.max_parts_in_flight), (4, 1), "{st:?}");
}

#[test]
fn s3_server_works_without_an_async_test_runtime() {
    let server = S3Server::start_blocking();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = server.storage("sync").await;
        storage::put_bytes(&s, "k", Bytes::from_static(b"v"), PutMode::Overwrite)
            .await
            .unwrap();
        assert_eq!(storage::get_bytes(&s, "k").await.unwrap(), b"v");
    });
    drop(rt);
    let env = server.env();
    assert!(
        env.iter()
            .any(|(k, v)| k == "AWS_ACCESS_KEY_ID" && *v == server.access_key)
    );
    assert!(
        env.iter()
            .any(|(k, v)| k == "AWS_SECRET_ACCESS_KEY" && *v == server.secret_key)
    );
}
