//! A real S3 server inside the test process: s3s with the s3s-fs backend, SigV4 authentication
//! on, served over HTTP/1.1 on 127.0.0.1 with an ephemeral port.
//!
//! The server runs on its own thread with its own tokio runtime so it outlives any one test
//! runtime and serves child processes (the `drctl` binary) as well as in-process clients, from
//! `#[tokio::test]` and plain `#[test]` alike. It stops when the [`S3Server`] is dropped.
//!
//! s3s-fs is wrapped (see [`TestS3`]) to behave like S3 where the tests depend on it:
//! conditional writes are atomic, object operations on a missing bucket fail with
//! `NoSuchBucket`, directories are never mistaken for objects, and listings are paginated in
//! small pages so clients' pagination is exercised.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};

/// Fixed test credentials. Not secret: the server only listens on loopback.
pub const ACCESS_KEY: &str = "DRCTLTESTACCESSKEY";
pub const SECRET_KEY: &str = "drctl-test-secret-key-0123456789abcdef";
pub const BUCKET: &str = "drctl-test";
pub const REGION: &str = "us-east-1";
/// Page size the server imposes on ListObjectsV2, so listing a few dozen keys needs several
/// requests.
pub const LIST_PAGE_CAP: i32 = 7;

pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// The s3s-fs root: one directory per bucket, plus its bookkeeping files.
    root: PathBuf,
    counters: Arc<Counters>,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl S3Server {
    /// Starts a server with an empty bucket [`BUCKET`].
    pub async fn start() -> S3Server {
        Self::start_blocking()
    }

    /// [`S3Server::start`] for tests without an async runtime. It never blocks for long: the
    /// socket is bound here, before the server thread starts.
    pub fn start_blocking() -> S3Server {
        let dir = tempfile::tempdir().expect("create s3 server tempdir");
        // s3s-fs canonicalizes its root; use the same path for our own checks.
        let root = dir.path().canonicalize().expect("canonicalize tempdir");
        std::fs::create_dir(root.join(BUCKET)).expect("create test bucket");

        let fs = s3s_fs::FileSystem::new(&root).expect("open s3s-fs root");
        let counters = Arc::new(Counters::default());
        let wrapped = TestS3 {
            inner: fs,
            root: root.clone(),
            conditional: tokio::sync::Mutex::new(()),
            counters: counters.clone(),
        };
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(wrapped);
            b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind s3 server");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();

        let thread = std::thread::Builder::new()
            .name(format!("s3-test-server-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("s3 server runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            accepted = listener.accept() => {
                                let Ok((socket, _)) = accepted else { continue };
                                let service = service.clone();
                                tokio::spawn(async move {
                                    let io = hyper_util::rt::TokioIo::new(socket);
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(io, service)
                                        .await;
                                });
                            }
                        }
                    }
                });
                // Connections kept alive by clients' pools would otherwise hold the runtime.
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .expect("spawn s3 server thread");

        S3Server {
            endpoint: format!("http://{addr}"),
            bucket: BUCKET.to_string(),
            access_key: ACCESS_KEY.to_string(),
            secret_key: SECRET_KEY.to_string(),
            root,
            counters,
            _dir: dir,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// A repository config pointing at this server's bucket under `prefix`.
    pub fn repository_config(&self, prefix: &str) -> drctl::config::RepositoryConfig {
        drctl::config::RepositoryConfig {
            kind: drctl::config::RepositoryKind::S3,
            bucket: Some(self.bucket.clone()),
            prefix: prefix.to_string(),
            endpoint: Some(self.endpoint.clone()),
            region: Some(REGION.to_string()),
            force_path_style: true,
            part_size_mib: 5,
            max_attempts: 3,
            ..Default::default()
        }
    }

    /// An S3 driver for this server with its credentials passed explicitly (tests share one
    /// process, so credentials must not go through process-wide environment variables).
    pub async fn storage(&self, prefix: &str) -> drctl::storage::s3::S3Storage {
        drctl::storage::s3::S3Storage::with_credentials(
            &self.repository_config(prefix),
            &self.access_key,
            &self.secret_key,
        )
        .await
        .expect("build S3 storage for the test server")
    }

    /// Environment for a child `drctl` process, which gets credentials from the AWS chain.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), REGION.into()),
            // Never let the chain probe the EC2 metadata service from a test.
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// Creates another (empty) bucket.
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).expect("create bucket");
    }

    /// Where s3s-fs keeps its data (a directory per bucket).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Multipart uploads started but neither completed nor aborted.
    pub fn pending_multipart_uploads(&self) -> usize {
        // s3s-fs records each open upload as `.upload-<uuid>.json` in its root.
        self.root_entries()
            .filter(|n| n.starts_with(".upload-") && n.ends_with(".json"))
            .count()
    }

    /// Uploaded parts still on disk (they are deleted by complete and abort).
    pub fn stray_parts(&self) -> usize {
        self.root_entries()
            .filter(|n| n.starts_with(".upload_id-"))
            .count()
    }

    /// Everything a failed or aborted write may leave behind: open uploads, parts, and
    /// s3s-fs temporary files.
    pub fn leftovers(&self) -> Vec<String> {
        self.root_entries()
            .filter(|n| {
                (n.starts_with(".upload-") && n.ends_with(".json"))
                    || n.starts_with(".upload_id-")
                    || n.starts_with(".tmp.")
            })
            .collect()
    }

    /// How many requests of each kind the server has answered successfully so far.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicUsize| a.load(Ordering::SeqCst);
        Stats {
            put_object: get(&c.put_object),
            create_multipart: get(&c.create_multipart),
            upload_part: get(&c.upload_part),
            complete_multipart: get(&c.complete_multipart),
            abort_multipart: get(&c.abort_multipart),
            max_parts_in_flight: get(&c.max_parts_in_flight),
        }
    }

    fn root_entries(&self) -> impl Iterator<Item = String> {
        std::fs::read_dir(&self.root)
            .expect("read s3s-fs root")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Successful requests by kind, and the most UploadPart requests ever in progress at once
/// (to check a client's upload concurrency bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub put_object: usize,
    pub create_multipart: usize,
    pub upload_part: usize,
    pub complete_multipart: usize,
    pub abort_multipart: usize,
    pub max_parts_in_flight: usize,
}

#[derive(Default)]
struct Counters {
    put_object: AtomicUsize,
    create_multipart: AtomicUsize,
    upload_part: AtomicUsize,
    complete_multipart: AtomicUsize,
    abort_multipart: AtomicUsize,
    parts_in_flight: AtomicUsize,
    max_parts_in_flight: AtomicUsize,
}

/// Counts `counter` if the request succeeded.
fn count<T>(counter: &AtomicUsize, result: S3Result<T>) -> S3Result<T> {
    if result.is_ok() {
        counter.fetch_add(1, Ordering::SeqCst);
    }
    result
}

/// s3s-fs with the S3 semantics the storage contract relies on.
///
/// s3s-fs 0.14.1 does check `If-None-Match: *` on PutObject and CompleteMultipartUpload, but
/// it tests for the file before streaming the body and renames the result into place
/// afterwards, so two concurrent conditional writes can both pass the check and the later
/// rename silently replaces the earlier object. Conditional writes are therefore serialized
/// here, with the existence check made under the lock.
struct TestS3 {
    inner: s3s_fs::FileSystem,
    root: PathBuf,
    conditional: tokio::sync::Mutex<()>,
    counters: Arc<Counters>,
}

impl TestS3 {
    /// s3s-fs creates a missing bucket directory on PutObject and answers GetObject on a
    /// missing bucket with NoSuchKey; S3 says NoSuchBucket.
    fn require_bucket(&self, bucket: &str) -> S3Result<()> {
        if self.root.join(bucket).is_dir() {
            Ok(())
        } else {
            Err(s3_error!(
                NoSuchBucket,
                "The specified bucket does not exist"
            ))
        }
    }

    /// Keys map to files; a "directory" (a prefix of other keys) is not an object, although
    /// s3s-fs would open or stat it.
    fn is_object(&self, bucket: &str, key: &str) -> bool {
        self.root.join(bucket).join(key).is_file()
    }

    fn require_object(&self, bucket: &str, key: &str) -> S3Result<()> {
        self.require_bucket(bucket)?;
        if self.is_object(bucket, key) {
            Ok(())
        } else {
            Err(s3_error!(NoSuchKey, "The specified key does not exist."))
        }
    }
}

fn precondition_failed() -> s3s::S3Error {
    s3_error!(
        PreconditionFailed,
        "At least one of the pre-conditions you specified did not hold"
    )
}

fn wants_absent(cond: Option<&IfNoneMatch>) -> bool {
    cond.is_some_and(|c| c.is_any())
}

#[async_trait::async_trait]
impl S3 for TestS3 {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.inner.create_bucket(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.inner.list_buckets(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.require_bucket(&req.input.bucket)?;
        let counter = &self.counters.put_object;
        if !wants_absent(req.input.if_none_match.as_ref()) {
            return count(counter, self.inner.put_object(req).await);
        }
        // Held while the body streams in: the check and the publish must be one step.
        let _guard = self.conditional.lock().await;
        if self.is_object(&req.input.bucket, &req.input.key) {
            return Err(precondition_failed());
        }
        count(counter, self.inner.put_object(req).await)
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.require_object(&req.input.bucket, &req.input.key)?;
        self.inner.get_object(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.require_object(&req.input.bucket, &req.input.key)?;
        self.inner.head_object(req).await
    }

    async fn list_objects_v2(
        &self,
        mut req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.require_bucket(&req.input.bucket)?;
        let asked = req.input.max_keys.unwrap_or(1000);
        req.input.max_keys = Some(asked.clamp(0, LIST_PAGE_CAP));
        self.inner.list_objects_v2(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.require_bucket(&req.input.bucket)?;
        if !self.is_object(&req.input.bucket, &req.input.key) {
            // Like S3: deleting an absent key succeeds.
            return Ok(S3Response::new(DeleteObjectOutput::default()));
        }
        self.inner.delete_object(req).await
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.require_bucket(&req.input.bucket)?;
        self.inner.delete_objects(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.require_bucket(&req.input.bucket)?;
        count(
            &self.counters.create_multipart,
            self.inner.create_multipart_upload(req).await,
        )
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.require_bucket(&req.input.bucket)?;
        let c = &self.counters;
        let now = c.parts_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_parts_in_flight.fetch_max(now, Ordering::SeqCst);
        let result = self.inner.upload_part(req).await;
        c.parts_in_flight.fetch_sub(1, Ordering::SeqCst);
        count(&c.upload_part, result)
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.inner.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.require_bucket(&req.input.bucket)?;
        let counter = &self.counters.complete_multipart;
        if !wants_absent(req.input.if_none_match.as_ref()) {
            return count(counter, self.inner.complete_multipart_upload(req).await);
        }
        // s3s-fs assembles the object before returning (its output future is already
        // resolved), so holding the lock across the call covers the whole publish.
        let _guard = self.conditional.lock().await;
        if self.is_object(&req.input.bucket, &req.input.key) {
            // As on S3, the upload stays open: the client is expected to abort it.
            return Err(precondition_failed());
        }
        count(counter, self.inner.complete_multipart_upload(req).await)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        count(
            &self.counters.abort_multipart,
            self.inner.abort_multipart_upload(req).await,
        )
    }
}
