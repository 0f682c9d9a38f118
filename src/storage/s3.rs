//! S3 storage driver (AWS S3 and S3-compatible stores such as MinIO or Ceph RGW).
//!
//! This module owns everything S3-specific: building the SDK client (credentials only from the
//! standard AWS chain, region, endpoint, retries, TLS), mapping repository keys to object keys
//! under the configured prefix, streaming uploads (one `PutObject`, or a multipart upload with a
//! bounded number of parts in flight), streaming downloads, and translating SDK errors into
//! [`StorageError`] variants an operator can act on.
//!
//! Atomicity comes from S3 itself: an object appears only when `PutObject` or
//! `CompleteMultipartUpload` succeeds, so a failed upload is aborted and never visible.
//! Put-if-absent relies on the conditional-write header `If-None-Match: *`.

use std::error::Error as StdError;
use std::fmt;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, ProvideCredentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls;
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use super::{BoxRead, ObjectMeta, PutMode, Storage, StorageError, StorageResult};
use crate::config::RepositoryConfig;

const MIB: u64 = 1024 * 1024;
/// S3's limits on part size and count.
const MIN_PART_SIZE: u64 = 5 * MIB;
const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
const MAX_PARTS: i32 = 10_000;
/// The part size doubles after this many parts. A backup stream has no known length, and a
/// fixed part size would cap objects at 10 000 parts (80 GB with the default 8 MiB parts).
const PARTS_PER_SIZE_STEP: i32 = 1_000;
const DEFAULT_REGION: &str = "us-east-1";

/// A repository stored in an S3 bucket, under an optional key prefix.
#[derive(Clone)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    /// Trimmed of slashes; empty means keys sit at the bucket root.
    prefix: String,
    endpoint: Option<String>,
    region: String,
    part_size: u64,
    concurrency: usize,
}

impl fmt::Debug for S3Storage {
    // Hand-written so the SDK client (and anything credential-related it holds) is never
    // printed in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("location", &self.describe())
            .field("part_size", &self.part_size)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl S3Storage {
    /// Opens the bucket described by `cfg`, with credentials from the standard AWS chain
    /// (environment, shared config/credentials files, web identity, ECS, EC2 instance role).
    /// No S3 request is made here (only the chain may look up a region); problems with the
    /// bucket or credentials surface on the first operation.
    pub async fn new(cfg: &RepositoryConfig) -> StorageResult<S3Storage> {
        Self::build(cfg, None).await
    }

    /// Like [`S3Storage::new`] but with fixed credentials instead of the AWS chain.
    ///
    /// For tests and for embedding drctl in a program that manages credentials itself; the
    /// `drctl` binary always uses the chain so secrets never live in its configuration.
    pub async fn with_credentials(
        cfg: &RepositoryConfig,
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
    ) -> StorageResult<S3Storage> {
        let creds = Credentials::new(access_key, secret_key, None, None, "drctl-explicit");
        Self::with_credentials_provider(cfg, creds).await
    }

    /// Like [`S3Storage::new`] but with a caller-supplied credentials provider (tests,
    /// embedding).
    pub async fn with_credentials_provider(
        cfg: &RepositoryConfig,
        provider: impl ProvideCredentials + 'static,
    ) -> StorageResult<S3Storage> {
        Self::build(
            cfg,
            Some(aws_sdk_s3::config::SharedCredentialsProvider::new(provider)),
        )
        .await
    }

    async fn build(
        cfg: &RepositoryConfig,
        credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
    ) -> StorageResult<S3Storage> {
        let bucket = cfg
            .bucket
            .as_deref()
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .ok_or_else(|| StorageError::Backend {
                op: "configure",
                key: "repository.bucket".into(),
                message: "an S3 repository needs a bucket name (repository.bucket)".into(),
                retryable: false,
            })?
            .to_string();

        // aws-config is built without its default HTTPS client (that one pulls in aws-lc), so
        // we supply rustls with ring. This connector also speaks plain http://, which local
        // S3-compatible endpoints use.
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();

        // Standard mode retries throttling, 5xx and transient connection errors with
        // exponential backoff and jitter; each multipart part is retried on its own.
        let retry = RetryConfig::standard().with_max_attempts(cfg.max_attempts.max(1));

        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .retry_config(retry);
        if let Some(region) = cfg.region.as_deref().filter(|r| !r.is_empty()) {
            loader = loader.region(Region::new(region.to_string()));
        }
        if let Some(provider) = credentials {
            loader = loader.credentials_provider(provider);
        }
        let sdk_config = loader.load().await;

        let region = sdk_config
            .region()
            .map(|r| r.as_ref().to_string())
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let endpoint = cfg
            .endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string);

        let mut s3_config = aws_sdk_s3::config::Builder::from(&sdk_config)
            .region(Region::new(region.clone()))
            .force_path_style(cfg.force_path_style)
            // The SDK's default since 2025 adds CRC checksums (with aws-chunked bodies) to every
            // upload, which many S3-compatible stores reject. SigV4 already signs the payload
            // hash and the pipeline checksums its own data, so send checksums only when an
            // operation requires them.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        if let Some(endpoint) = &endpoint {
            s3_config = s3_config.endpoint_url(endpoint.clone());
        }

        // Config validation enforces S3's bounds; clamping keeps a hand-built config from
        // producing uploads S3 rejects only after gigabytes have been sent.
        let part_size = cfg
            .part_size_mib
            .saturating_mul(MIB)
            .clamp(MIN_PART_SIZE, MAX_PART_SIZE);

        Ok(S3Storage {
            client: Client::from_conf(s3_config.build()),
            bucket,
            prefix: cfg.prefix.trim_matches('/').to_string(),
            endpoint,
            region,
            part_size,
            concurrency: cfg.upload_concurrency.max(1),
        })
    }

    /// The object key for a repository key, after the same validation as the fs driver so a
    /// repository behaves identically on both.
    fn object_key(&self, key: &str) -> StorageResult<String> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c == ".." || c == "." || c.is_empty())
        {
            return Err(StorageError::Backend {
                op: "resolve",
                key: key.into(),
                message: "invalid object key".into(),
                retryable: false,
            });
        }
        Ok(self.with_prefix(key))
    }

    fn with_prefix(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// `s3://bucket/object-key`, the form an operator can paste into `aws s3`.
    fn url(&self, object_key: &str) -> String {
        format!("s3://{}/{object_key}", self.bucket)
    }

    fn location(&self) -> String {
        match &self.endpoint {
            Some(endpoint) => format!("s3://{} at {endpoint}", self.bucket),
            None => format!("s3://{}", self.bucket),
        }
    }

    /// Size of part `n` (1-based): the configured size, doubling every
    /// [`PARTS_PER_SIZE_STEP`] parts, capped at S3's maximum.
    fn part_size_for(&self, part_number: i32) -> u64 {
        let step = ((part_number - 1) / PARTS_PER_SIZE_STEP) as u32;
        self.part_size
            .checked_shl(step)
            .unwrap_or(MAX_PART_SIZE)
            .min(MAX_PART_SIZE)
    }

    /// Translates an SDK error. `key` is the repository key (kept for `NotFound`, which callers
    /// match on); messages name the full `s3://bucket/key` and the service's code and message.
    fn map_err<E>(&self, op: &'static str, key: &str, err: SdkError<E>) -> StorageError
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        let url = self.url(&self.with_prefix(key));
        let backend = |message: String, retryable: bool| StorageError::Backend {
            op,
            key: url.clone(),
            message,
            retryable,
        };
        match &err {
            SdkError::ServiceError(ctx) => {
                let status = ctx.raw().status().as_u16();
                let code = ctx.err().code().unwrap_or("");
                let detail = describe_service_error(code, ctx.err().message(), status);
                match code {
                    "NoSuchKey" => return StorageError::NotFound(key.to_string()),
                    "NoSuchBucket" => return StorageError::NoSuchBucket(self.location()),
                    // Checked before the 403 rule: the SDK corrects its clock from the
                    // response, so another attempt can succeed.
                    "RequestTimeTooSkewed" => {
                        return backend(format!("{detail}; check this host's clock"), true);
                    }
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "NotSignedUp"
                    | "AllAccessDisabled"
                    | "AccountProblem"
                    | "InvalidToken"
                    | "ExpiredToken"
                    | "TokenRefreshRequired"
                    | "InvalidSecurity" => {
                        return StorageError::Denied {
                            op,
                            key: url,
                            message: detail,
                        };
                    }
                    "PermanentRedirect" | "AuthorizationHeaderMalformed" => {
                        return backend(
                            format!(
                                "{detail}; the bucket is probably in another region than \
                                 {}: set repository.region",
                                self.region
                            ),
                            false,
                        );
                    }
                    "NoSuchUpload" => {
                        return backend(
                            format!(
                                "{detail}; the multipart upload was aborted while in progress \
                                 (a bucket lifecycle rule or another process?)"
                            ),
                            false,
                        );
                    }
                    "SlowDown"
                    | "Throttling"
                    | "ThrottlingException"
                    | "RequestTimeout"
                    | "RequestLimitExceeded"
                    | "TooManyRequestsException"
                    | "InternalError"
                    | "ServiceUnavailable" => return backend(detail, true),
                    _ => {}
                }
                match status {
                    403 => StorageError::Denied {
                        op,
                        key: url,
                        message: detail,
                    },
                    404 => StorageError::NotFound(key.to_string()),
                    429 | 500..=599 => backend(detail, true),
                    _ => backend(detail, false),
                }
            }
            SdkError::TimeoutError(_) => backend(format!("timed out: {}", error_chain(&err)), true),
            SdkError::DispatchFailure(failure) => {
                if let Some(cred) = find_source::<CredentialsError>(&err) {
                    return credentials_error(op, url, cred);
                }
                let reach = self.endpoint.as_deref().unwrap_or("the S3 endpoint");
                backend(
                    format!("could not reach {reach}: {}", error_chain(&err)),
                    !failure.is_user(),
                )
            }
            // The response was cut off or garbled: usually a dropped connection.
            SdkError::ResponseError(_) => backend(
                format!("bad response from the service: {}", error_chain(&err)),
                true,
            ),
            _ => {
                if let Some(cred) = find_source::<CredentialsError>(&err) {
                    return credentials_error(op, url, cred);
                }
                backend(error_chain(&err), false)
            }
        }
    }

    /// Like [`S3Storage::map_err`] for the writes that carry `If-None-Match: *`, where a failed
    /// precondition means another writer got there first.
    fn map_conditional_err<E>(&self, op: &'static str, key: &str, err: SdkError<E>) -> StorageError
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        if let SdkError::ServiceError(ctx) = &err {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code().unwrap_or("");
            // 409 ConditionalRequestConflict: a concurrent conditional write to the same key
            // is in flight; S3 lets at most one of them win, so report ours as the loser.
            if status == 412 || code == "PreconditionFailed" || code == "ConditionalRequestConflict"
            {
                return StorageError::AlreadyExists(key.to_string());
            }
        }
        self.map_err(op, key, err)
    }

    async fn put_single(
        &self,
        key: &str,
        object_key: &str,
        data: Bytes,
        mode: PutMode,
    ) -> StorageResult<u64> {
        let len = data.len() as u64;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(object_key)
            .content_length(len as i64)
            .body(ByteStream::from(data));
        if mode == PutMode::IfAbsent {
            req = req.if_none_match("*");
        }
        req.send()
            .await
            .map_err(|e| self.map_conditional_err("put", key, e))?;
        Ok(len)
    }

    async fn put_multipart(
        &self,
        key: &str,
        object_key: &str,
        first: Bytes,
        body: &mut BoxRead,
        mode: PutMode,
    ) -> StorageResult<u64> {
        // Fail before uploading gigabytes that could never be published. The conditional
        // complete below remains the authoritative check.
        if mode == PutMode::IfAbsent && self.head(key).await?.is_some() {
            return Err(StorageError::AlreadyExists(key.to_string()));
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .send()
            .await
            .map_err(|e| self.map_err("start multipart upload", key, e))?;
        let upload_id = created
            .upload_id()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| StorageError::Backend {
                op: "start multipart upload",
                key: self.url(object_key),
                message: "the service returned no upload id".into(),
                retryable: false,
            })?
            .to_string();

        let mut guard = AbortOnDrop {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            object_key: object_key.to_string(),
            upload_id: Some(upload_id.clone()),
        };
        let mut tasks = JoinSet::new();
        let result = async {
            let (parts, total) = self
                .upload_parts(key, object_key, &upload_id, first, body, &mut tasks)
                .await?;
            let mut req = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(object_key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                );
            if mode == PutMode::IfAbsent {
                // If the first attempt succeeds but its response is lost, the SDK's retry
                // sees our own object and reports AlreadyExists: an unavoidable ambiguity of
                // conditional writes over an unreliable network.
                req = req.if_none_match("*");
            }
            req.send()
                .await
                .map_err(|e| self.map_conditional_err("complete multipart upload", key, e))?;
            Ok(total)
        }
        .await;

        match result {
            Ok(total) => {
                guard.upload_id = None;
                Ok(total)
            }
            Err(e) => {
                // A part still uploading could be stored after the abort and stay billed
                // (S3 advises aborting only once part uploads have finished), so let them
                // finish first.
                while tasks.join_next().await.is_some() {}
                let aborted = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(object_key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                // Disarmed only now: if this put is cancelled during the abort, the guard
                // still tries.
                guard.upload_id = None;
                if let Err(abort_err) = aborted {
                    tracing::warn!(
                        key = %self.url(object_key),
                        upload_id = %upload_id,
                        error = %error_chain(&abort_err),
                        "could not abort a failed multipart upload; its parts stay billed until \
                         a lifecycle rule (AbortIncompleteMultipartUpload) removes them"
                    );
                }
                Err(e)
            }
        }
    }

    /// Uploads `first` and the rest of `body` as parts, at most `self.concurrency` at a time.
    /// A part is read only when a slot is free, so memory stays within part size × concurrency.
    async fn upload_parts(
        &self,
        key: &str,
        object_key: &str,
        upload_id: &str,
        first: Bytes,
        body: &mut BoxRead,
        tasks: &mut JoinSet<StorageResult<CompletedPart>>,
    ) -> StorageResult<(Vec<CompletedPart>, u64)> {
        let mut parts = Vec::new();
        let mut total = 0u64;
        let mut part_number = 1;
        let mut chunk = first;
        loop {
            total += chunk.len() as u64;
            let last = (chunk.len() as u64) < self.part_size_for(part_number);
            tasks.spawn(upload_part(
                self.clone(),
                key.to_string(),
                object_key.to_string(),
                upload_id.to_string(),
                part_number,
                chunk,
            ));
            if last {
                break;
            }
            while tasks.len() >= self.concurrency {
                parts.push(join_part(tasks.join_next().await, key)?);
            }
            part_number += 1;
            chunk = read_chunk(body, self.part_size_for(part_number), key).await?;
            if chunk.is_empty() {
                break;
            }
            if part_number > MAX_PARTS {
                return Err(StorageError::Backend {
                    op: "put",
                    key: self.url(object_key),
                    message: format!(
                        "object exceeds S3's limit of {MAX_PARTS} parts; raise \
                         repository.part-size-mib"
                    ),
                    retryable: false,
                });
            }
        }
        while let Some(joined) = tasks.join_next().await {
            parts.push(join_part(Some(joined), key)?);
        }
        parts.sort_by_key(|p| p.part_number());
        Ok((parts, total))
    }
}

async fn upload_part(
    s3: S3Storage,
    key: String,
    object_key: String,
    upload_id: String,
    part_number: i32,
    data: Bytes,
) -> StorageResult<CompletedPart> {
    let len = data.len() as i64;
    let out = s3
        .client
        .upload_part()
        .bucket(&s3.bucket)
        .key(&object_key)
        .upload_id(&upload_id)
        .part_number(part_number)
        .content_length(len)
        .body(ByteStream::from(data))
        .send()
        .await
        .map_err(|e| s3.map_err("upload part of", &key, e))?;
    Ok(CompletedPart::builder()
        .part_number(part_number)
        .set_e_tag(out.e_tag().map(str::to_string))
        .build())
}

fn join_part(
    joined: Option<Result<StorageResult<CompletedPart>, tokio::task::JoinError>>,
    key: &str,
) -> StorageResult<CompletedPart> {
    match joined {
        Some(Ok(part)) => part,
        Some(Err(e)) => Err(StorageError::Backend {
            op: "upload part of",
            key: key.to_string(),
            message: format!("part upload task failed: {e}"),
            retryable: false,
        }),
        None => Err(StorageError::Backend {
            op: "upload part of",
            key: key.to_string(),
            message: "internal error: no part upload in flight".into(),
            retryable: false,
        }),
    }
}

/// Reads up to `size` bytes; fewer only at end of stream. Reads into a buffer of exactly that
/// size because `read_to_end` may double its allocation, which would break the memory bound.
async fn read_chunk(body: &mut BoxRead, size: u64, key: &str) -> StorageResult<Bytes> {
    let mut buf = vec![0u8; size as usize];
    let mut filled = 0;
    while filled < buf.len() {
        let n = body
            .read(&mut buf[filled..])
            .await
            .map_err(|e| StorageError::Io {
                op: "read source for",
                key: key.to_string(),
                source: e,
            })?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(Bytes::from(buf))
}

/// Aborts a multipart upload when a put is cancelled mid-way (its future dropped), so the
/// parts do not linger. Error paths abort explicitly and disarm this.
struct AbortOnDrop {
    client: Client,
    bucket: String,
    object_key: String,
    upload_id: Option<String>,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let req = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.object_key)
            .upload_id(upload_id);
        rt.spawn(async move {
            let _ = req.send().await;
        });
    }
}

fn describe_service_error(code: &str, message: Option<&str>, status: u16) -> String {
    let reason = http_reason(status);
    match (code.is_empty(), message.filter(|m| !m.is_empty())) {
        (false, Some(m)) => format!("{code}: {m} (HTTP {status}{reason})"),
        (false, None) => format!("{code} (HTTP {status}{reason})"),
        (true, Some(m)) => format!("{m} (HTTP {status}{reason})"),
        (true, None) => format!("HTTP {status}{reason}"),
    }
}

fn http_reason(status: u16) -> String {
    http_canonical_reason(status)
        .map(|r| format!(" {r}"))
        .unwrap_or_default()
}

fn http_canonical_reason(status: u16) -> Option<&'static str> {
    // Only the statuses S3 uses; HEAD errors carry no body, so this is all an operator gets.
    Some(match status {
        301 => "Moved Permanently",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        412 => "Precondition Failed",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => return None,
    })
}

/// The error and its sources, `: `-separated. The SDK's own `DisplayErrorContext` appends a
/// Debug dump, too noisy for an operator; sources that only repeat their parent are skipped.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}

fn find_source<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

fn credentials_error(op: &'static str, url: String, err: &CredentialsError) -> StorageError {
    let detail = error_chain(err);
    match err {
        CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_) => {
            StorageError::Denied {
                op,
                key: url,
                message: format!(
                    "no usable AWS credentials ({detail}); set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance/task role"
                ),
            }
        }
        // A credentials endpoint (IMDS, ECS, STS) timed out or failed: worth another try.
        _ => StorageError::Backend {
            op,
            key: url,
            message: format!("could not load AWS credentials: {detail}"),
            retryable: true,
        },
    }
}

#[async_trait]
impl Storage for S3Storage {
    async fn put(&self, key: &str, mut body: BoxRead, mode: PutMode) -> StorageResult<u64> {
        let object_key = self.object_key(key)?;
        // The whole first part is read before any request: a body that fails before then
        // leaves no trace, and a body that fits is sent as a single PutObject.
        let first = read_chunk(&mut body, self.part_size_for(1), key).await?;
        if (first.len() as u64) < self.part_size_for(1) {
            return self.put_single(key, &object_key, first, mode).await;
        }
        self.put_multipart(key, &object_key, first, &mut body, mode)
            .await
    }

    async fn get(&self, key: &str) -> StorageResult<BoxRead> {
        let object_key = self.object_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
            .map_err(|e| self.map_err("get", key, e))?;
        Ok(Box::pin(out.body.into_async_read()))
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> StorageResult<BoxRead> {
        let object_key = self.object_key(key)?;
        if len == 0 {
            // An empty range cannot be expressed in a Range header; still report a missing
            // object like the fs driver does.
            return match self.head(key).await? {
                Some(_) => Ok(Box::pin(tokio::io::empty())),
                None => Err(StorageError::NotFound(key.to_string())),
            };
        }
        let end = start.saturating_add(len - 1);
        let result = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .range(format!("bytes={start}-{end}"))
            .send()
            .await;
        match result {
            Ok(out) => Ok(Box::pin(out.body.into_async_read())),
            // 416: the range starts at or past the end. The object exists (else 404), and the
            // fs driver returns an empty stream there, so do the same.
            Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 416 => {
                Ok(Box::pin(tokio::io::empty()))
            }
            Err(e) => Err(self.map_err("get range of", key, e)),
        }
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        let object_key = self.object_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
            })),
            // HEAD responses have no body, so a missing bucket is indistinguishable from a
            // missing key here; other operations report it.
            Err(e) => match self.map_err("head", key, e) {
                StorageError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        let root = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let full_prefix = format!("{root}{prefix}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.map_err("list", prefix, e))?;
            for obj in page.contents() {
                let Some(rel) = obj.key().and_then(|k| k.strip_prefix(&root)) else {
                    continue;
                };
                // Zero-byte "directory" markers made by consoles are not repository objects.
                if rel.is_empty() || rel.ends_with('/') {
                    continue;
                }
                out.push(ObjectMeta {
                    key: rel.to_string(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                });
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated().unwrap_or(false) => {
                    token = Some(next.to_string());
                }
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> StorageResult<()> {
        let object_key = self.object_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.map_err("delete", key, e) {
                StorageError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    fn describe(&self) -> String {
        let location = if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        };
        match &self.endpoint {
            Some(endpoint) => format!("{location} ({endpoint})"),
            None => format!("{location} (AWS, {})", self.region),
        }
    }
}
