//! Configuration: serde data with defaults, validated once at load.
//!
//! Precedence is CLI > environment (`DRCTL_*`) > file. The file is `--config`, else
//! `DRCTL_CONFIG`, else `/etc/drctl/drctl.toml`. Unknown keys, wrong types and impossible values
//! are errors that name the key and the file. Secrets never live here: S3 credentials come from
//! the AWS chain, PostgreSQL passwords from `PGPASSWORD` / `.pgpass`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/drctl/drctl.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// This cluster's name inside the repository.
    #[serde(default = "default_stanza")]
    pub stanza: String,
    /// Local scratch space (restore staging, WAL prefetch). Default: the system temp dir.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    #[serde(default)]
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub repository: RepositoryConfig,
    #[serde(default)]
    pub compression: CompressionConfig,
    #[serde(default)]
    pub wal: WalConfig,
    #[serde(default)]
    pub backup: BackupConfig,
    #[serde(default)]
    pub objectives: Objectives,
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Jobs for `drctl agent`, the same `[[job]]` tables as `schedules/*.toml`.
    #[serde(default, rename = "job", skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<crate::schedule::Job>,
}

/// `[retention]`: what `drctl expire` keeps. A type with neither a count nor an age is kept
/// whole. The newest valid backup of each type is never deleted.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep this many full physical backups...
    #[serde(default)]
    pub full_count: Option<u32>,
    /// ...and/or those younger than this many days.
    #[serde(default)]
    pub full_days: Option<u32>,
    #[serde(default)]
    pub logical_count: Option<u32>,
    #[serde(default)]
    pub logical_days: Option<u32>,
    /// Keep history records (drills, plan runs) this many days.
    #[serde(default)]
    pub history_days: Option<u32>,
    /// Objects of a backup without a manifest are removed once older than this (an
    /// interrupted backup's leftovers). Default 6h.
    #[serde(default)]
    pub leftover_grace: Option<String>,
}

/// `[objectives]`: the recovery objectives `status` judges (defaults: the runbook's database row).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Objectives {
    /// Recovery point objective: the most data (as time) a loss may cost.
    #[serde(default = "default_rpo")]
    pub rpo: String,
    /// Recovery time objective: the longest a restore to an open database may take.
    #[serde(default = "default_rto")]
    pub rto: String,
    /// A drill older than this leaves the RTO unproven.
    #[serde(default = "default_drill_max_age")]
    pub drill_max_age: String,
}

fn default_rpo() -> String {
    "1m".into()
}
fn default_rto() -> String {
    "15m".into()
}
fn default_drill_max_age() -> String {
    "35days".into()
}

impl Default for Objectives {
    fn default() -> Self {
        Objectives {
            rpo: default_rpo(),
            rto: default_rto(),
            drill_max_age: default_drill_max_age(),
        }
    }
}

impl Objectives {
    pub fn rpo(&self) -> std::time::Duration {
        humantime::parse_duration(&self.rpo).unwrap_or(std::time::Duration::from_secs(60))
    }
    pub fn rto(&self) -> std::time::Duration {
        humantime::parse_duration(&self.rto).unwrap_or(std::time::Duration::from_secs(900))
    }
    pub fn drill_max_age(&self) -> std::time::Duration {
        humantime::parse_duration(&self.drill_max_age)
            .unwrap_or(std::time::Duration::from_secs(35 * 86400))
    }
}

/// `[wal]`: archiving and retrieval.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WalConfig {
    /// WAL segment size in MiB (as initdb --wal-segsize; 16 unless changed).
    #[serde(default = "default_wal_seg_mib")]
    pub segment_size_mib: u64,
    /// Compression level for WAL. Default: 1 for zstd, else `[compression] level`. Archiving
    /// is on the RPO path; a low level keeps `wal push` fast.
    #[serde(default)]
    pub level: Option<i32>,
    /// Segments `wal fetch` prefetches ahead of replay (0 disables prefetch).
    #[serde(default = "default_prefetch")]
    pub prefetch: u32,
    /// Parallel downloads of the prefetcher.
    #[serde(default = "default_prefetch_parallel")]
    pub prefetch_parallel: usize,
}

fn default_wal_seg_mib() -> u64 {
    16
}
fn default_prefetch() -> u32 {
    16
}
fn default_prefetch_parallel() -> usize {
    4
}
fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
fn default_bundle_size_mib() -> u64 {
    8
}
fn default_bundle_limit_kib() -> u64 {
    1024
}
fn default_archive_timeout() -> u64 {
    120
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_size_mib: default_wal_seg_mib(),
            level: None,
            prefetch: default_prefetch(),
            prefetch_parallel: default_prefetch_parallel(),
        }
    }
}

impl WalConfig {
    pub fn segment_size(&self) -> u64 {
        self.segment_size_mib * 1024 * 1024
    }
}

/// `[backup]`: physical base backups.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BackupConfig {
    /// Files copied at once (default: number of cores).
    #[serde(default = "default_jobs")]
    pub jobs: usize,
    /// Small files are bundled into objects of about this size.
    #[serde(default = "default_bundle_size_mib")]
    pub bundle_size_mib: u64,
    /// Files smaller than this go into bundles.
    #[serde(default = "default_bundle_limit_kib")]
    pub bundle_limit_kib: u64,
    /// Seconds to wait for the backup's last WAL segment to reach the repository.
    #[serde(default = "default_archive_timeout")]
    pub archive_timeout: u64,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            jobs: default_jobs(),
            bundle_size_mib: default_bundle_size_mib(),
            bundle_limit_kib: default_bundle_limit_kib(),
            archive_timeout: default_archive_timeout(),
        }
    }
}

fn default_stanza() -> String {
    "main".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stanza: default_stanza(),
            spool_dir: None,
            postgres: PostgresConfig::default(),
            repository: RepositoryConfig::default(),
            compression: CompressionConfig::default(),
            wal: WalConfig::default(),
            backup: BackupConfig::default(),
            objectives: Objectives::default(),
            retention: RetentionConfig::default(),
            jobs: Vec::new(),
        }
    }
}

impl Config {
    /// Compression settings for WAL objects.
    pub fn wal_compression(&self) -> CompressionConfig {
        let mut c = self.compression;
        match self.wal.level {
            Some(l) => c.level = l,
            None if c.algorithm == Algorithm::Zstd => c.level = 1,
            None => {}
        }
        c
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PostgresConfig {
    /// Host name, IP address, or a unix-socket directory (starts with `/`).
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    /// Database for control queries.
    #[serde(default = "default_database")]
    pub database: String,
    /// The cluster's data directory (physical backup and restore).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Where pg_dump, pg_restore, pg_ctl... live. Else `pg_config --bindir`, else PATH.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// OS user that owns and runs PostgreSQL when drctl runs as root. Default: the data
    /// directory's owner, else `postgres`.
    #[serde(default)]
    pub os_user: Option<String>,
    /// Seconds to wait for a connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "postgres".into()
}
fn default_database() -> String {
    "postgres".into()
}
fn default_connect_timeout() -> u64 {
    10
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            host: default_host(),
            port: default_port(),
            user: default_user(),
            database: default_database(),
            data_dir: None,
            bin_dir: None,
            os_user: None,
            connect_timeout: default_connect_timeout(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RepositoryKind {
    #[default]
    Fs,
    S3,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepositoryConfig {
    #[serde(default)]
    pub kind: RepositoryKind,
    /// fs: the repository root directory.
    #[serde(default = "default_repo_path")]
    pub path: PathBuf,
    /// s3: bucket name.
    #[serde(default)]
    pub bucket: Option<String>,
    /// s3: key prefix inside the bucket.
    #[serde(default)]
    pub prefix: String,
    /// s3: endpoint URL for S3-compatible stores (e.g. `http://127.0.0.1:9000`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// s3: region. Default: from the AWS chain, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// s3: path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible stores.
    #[serde(default)]
    pub force_path_style: bool,
    /// s3: multipart part size in MiB (5..=5120).
    #[serde(default = "default_part_size_mib")]
    pub part_size_mib: u64,
    /// s3: parts uploaded at once per object.
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
    /// Attempts for retryable storage errors (throttling, 5xx, connection resets).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_repo_path() -> PathBuf {
    PathBuf::from("/var/lib/drctl/repo")
}
fn default_part_size_mib() -> u64 {
    8
}
fn default_upload_concurrency() -> usize {
    4
}
fn default_max_attempts() -> u32 {
    5
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        RepositoryConfig {
            kind: RepositoryKind::Fs,
            path: default_repo_path(),
            bucket: None,
            prefix: String::new(),
            endpoint: None,
            region: None,
            force_path_style: false,
            part_size_mib: default_part_size_mib(),
            upload_concurrency: default_upload_concurrency(),
            max_attempts: default_max_attempts(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    Zstd,
    Gzip,
    Lz4,
    None,
}

impl Algorithm {
    /// File-name suffix of objects compressed with this algorithm.
    pub fn suffix(self) -> &'static str {
        match self {
            Algorithm::Zstd => ".zst",
            Algorithm::Gzip => ".gz",
            Algorithm::Lz4 => ".lz4",
            Algorithm::None => "",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CompressionConfig {
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default = "default_level")]
    pub level: i32,
    /// zstd only: worker threads (0 = compress on the calling thread).
    #[serde(default)]
    pub threads: u32,
}

fn default_level() -> i32 {
    3
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            algorithm: Algorithm::Zstd,
            level: default_level(),
            threads: 0,
        }
    }
}

impl Config {
    /// Resolves which file to read: explicit path, else `DRCTL_CONFIG`, else the default path.
    /// The default path may be absent (then defaults apply); an explicit one must exist.
    pub fn load(explicit: Option<&Path>) -> Result<Config, Error> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => match std::env::var_os("DRCTL_CONFIG") {
                Some(p) if !p.is_empty() => (PathBuf::from(p), true),
                _ => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
            },
        };
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Config::default(),
            Err(e) => {
                return Err(Error::Config(format!(
                    "cannot read config file {}: {e}",
                    path.display()
                )));
            }
        };
        cfg.apply_env()?;
        cfg.validate(&path)?;
        Ok(cfg)
    }

    /// Parses TOML text; errors name the file, the key and the line.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        toml::from_str(text)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.to_string().trim_end())))
    }

    /// `DRCTL_*` environment overrides for the commonly scripted keys.
    fn apply_env(&mut self) -> Result<(), Error> {
        fn var(name: &str) -> Option<String> {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        }
        if let Some(v) = var("DRCTL_STANZA") {
            self.stanza = v;
        }
        if let Some(v) = var("DRCTL_PG_HOST") {
            self.postgres.host = v;
        }
        if let Some(v) = var("DRCTL_PG_PORT") {
            self.postgres.port = v
                .parse()
                .map_err(|_| Error::Config(format!("DRCTL_PG_PORT: not a port number: {v}")))?;
        }
        if let Some(v) = var("DRCTL_PG_USER") {
            self.postgres.user = v;
        }
        if let Some(v) = var("DRCTL_REPO_PATH") {
            self.repository.path = PathBuf::from(v);
        }
        Ok(())
    }

    /// Checks values a type cannot express. Errors name the key and the file.
    pub fn validate(&self, path: &Path) -> Result<(), Error> {
        let bad = |key: &str, why: String| {
            Err(Error::Config(format!(
                "{}: key `{key}`: {why}",
                path.display()
            )))
        };
        if self.stanza.is_empty()
            || !self
                .stanza
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return bad(
                "stanza",
                format!(
                    "{:?} must be non-empty and use only letters, digits, '-', '_', '.'",
                    self.stanza
                ),
            );
        }
        if self.postgres.port == 0 {
            return bad("postgres.port", "must be 1..65535".into());
        }
        let c = &self.compression;
        let range = match c.algorithm {
            Algorithm::Zstd => 1..=19,
            Algorithm::Gzip => 1..=9,
            Algorithm::Lz4 => 0..=12,
            Algorithm::None => 0..=0,
        };
        if c.algorithm != Algorithm::None && !range.contains(&c.level) {
            return bad(
                "compression.level",
                format!(
                    "{} is out of range {range:?} for {:?}",
                    c.level, c.algorithm
                ),
            );
        }
        if c.threads > 64 {
            return bad("compression.threads", "at most 64".into());
        }
        let r = &self.repository;
        if r.kind == RepositoryKind::S3 {
            match &r.bucket {
                None => return bad("repository.bucket", "required when kind = \"s3\"".into()),
                Some(b) if b.is_empty() => {
                    return bad("repository.bucket", "must not be empty".into());
                }
                _ => {}
            }
            if !(5..=5120).contains(&r.part_size_mib) {
                return bad("repository.part-size-mib", "must be 5..=5120".into());
            }
            if r.upload_concurrency == 0 || r.upload_concurrency > 64 {
                return bad("repository.upload-concurrency", "must be 1..=64".into());
            }
        } else if !r.path.is_absolute() {
            return bad(
                "repository.path",
                format!("{} must be an absolute path", r.path.display()),
            );
        }
        if !self.wal.segment_size_mib.is_power_of_two() || self.wal.segment_size_mib > 1024 {
            return bad(
                "wal.segment-size-mib",
                "must be a power of two, 1..=1024".into(),
            );
        }
        if let Some(l) = self.wal.level
            && c.algorithm != Algorithm::None
            && !range.contains(&l)
        {
            return bad(
                "wal.level",
                format!("{l} is out of range {range:?} for {:?}", c.algorithm),
            );
        }
        if self.wal.prefetch_parallel == 0 || self.wal.prefetch_parallel > 32 {
            return bad("wal.prefetch-parallel", "must be 1..=32".into());
        }
        if self.backup.jobs == 0 || self.backup.jobs > 64 {
            return bad("backup.jobs", "must be 1..=64".into());
        }
        if self.backup.bundle_size_mib == 0 || self.backup.bundle_size_mib > 1024 {
            return bad("backup.bundle-size-mib", "must be 1..=1024".into());
        }
        for (key, v) in [
            ("objectives.rpo", &self.objectives.rpo),
            ("objectives.rto", &self.objectives.rto),
            ("objectives.drill-max-age", &self.objectives.drill_max_age),
        ] {
            if let Err(e) = humantime::parse_duration(v) {
                return bad(
                    key,
                    format!("{v:?} is not a duration ({e}); use e.g. \"1m\", \"15m\", \"35days\""),
                );
            }
        }
        if let Some(g) = &self.retention.leftover_grace
            && humantime::parse_duration(g).is_err()
        {
            return bad(
                "retention.leftover-grace",
                format!("{g:?} is not a duration"),
            );
        }
        if self.retention.full_count == Some(0) || self.retention.logical_count == Some(0) {
            return bad(
                "retention",
                "a count of 0 would delete every backup; use at least 1".into(),
            );
        }
        if r.max_attempts == 0 {
            return bad("repository.max-attempts", "must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[postgres]\nhots = \"x\"\n", Path::new("/x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/x.toml") && msg.contains("hots"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("[postgres]\nport = \"abc\"\n", Path::new("/x.toml")).unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
    }

    #[test]
    fn impossible_value_is_named() {
        let cfg = Config::parse(
            "[compression]\nalgorithm = \"gzip\"\nlevel = 42\n",
            Path::new("/c.toml"),
        )
        .unwrap();
        let err = cfg.validate(Path::new("/c.toml")).unwrap_err();
        assert!(err.to_string().contains("compression.level"), "{err}");
        let cfg = Config::parse("[repository]\nkind = \"s3\"\n", Path::new("/c.toml")).unwrap();
        let err = cfg.validate(Path::new("/c.toml")).unwrap_err();
        assert!(err.to_string().contains("repository.bucket"), "{err}");
    }

    #[test]
    fn issue_example_parses() {
        let text = r#"
stanza = "main"
[postgres]
host = "127.0.0.1"
port = 5432
user = "postgres"
database = "postgres"
data-dir = "/var/lib/postgresql/15/main"
bin-dir = "/usr/lib/postgresql/15/bin"
[repository]
kind = "fs"
path = "/var/lib/drctl/repo"
[compression]
algorithm = "zstd"
level = 3
"#;
        let cfg = Config::parse(text, Path::new("/c.toml")).unwrap();
        cfg.validate(Path::new("/c.toml")).unwrap();
        assert_eq!(cfg.postgres.port, 5432);
    }
}
