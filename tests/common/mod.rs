//! Test harness: throwaway PostgreSQL clusters (initdb in temp dirs, free ports, sockets in
//! the temp dir, as `postgres` when run as root), a real S3 server, and a runner for the
//! `drctl` binary with a generated config.
#![allow(dead_code)]

pub mod s3server;

use std::path::{Path, PathBuf};
use std::process::Output;

use drctl::pg::cluster::TempCluster;
use drctl::pg::{Binaries, Endpoint};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A directory every user can read, holding copies of what the cluster owner must run or read
/// when the tests run as root from a checkout it cannot enter (CI clones anywhere).
fn shared_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        // Keyed by the build, so that repeated runs reuse one copy instead of piling them up.
        let stamp = std::fs::metadata(env!("CARGO_BIN_EXE_drctl"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let d = std::env::temp_dir().join(format!("drctl-test-shared-{stamp:x}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    })
}

/// A copy of a file of the checkout (or the drctl binary) readable and executable by anyone.
pub fn shared_copy(src: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if owner().is_none() {
        return src.to_path_buf();
    }
    let dest = shared_dir().join(src.file_name().unwrap());
    // Shipped files may change without a rebuild: compare contents, not just presence.
    if dest.exists()
        && std::fs::read(&dest).ok() != std::fs::read(src).ok()
        && src.extension().is_some()
    {
        let _ = std::fs::remove_file(&dest);
    }
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap();
    if !dest.exists() {
        let tmp = dest.with_extension("tmp");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &dest).unwrap();
    }
    dest
}

/// The drctl binary, runnable by the cluster owner.
pub fn drctl_bin() -> PathBuf {
    shared_copy(Path::new(env!("CARGO_BIN_EXE_drctl")))
}

/// A shipped file of the checkout (plan, script), readable by the cluster owner.
pub fn shipped(rel: &str) -> PathBuf {
    shared_copy(&Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
}

pub fn bins() -> Binaries {
    let dir = std::env::var("DRCTL_TEST_PG_BIN").unwrap_or_else(|_| PG_BIN.to_string());
    Binaries::locate(Some(Path::new(&dir)))
}

/// A cluster for one test, with `fsync = off` for speed and WAL archiving optional.
pub fn cluster(extra_conf: &str) -> TempCluster {
    cluster_env(extra_conf, Vec::new())
}

/// A cluster whose server process (and so archive_command) gets `env`.
pub fn cluster_env(extra_conf: &str, env: Vec<(String, String)>) -> TempCluster {
    TempCluster::start_with_env(
        bins(),
        &format!("fsync = off\nmax_connections = 40\n{extra_conf}"),
        env,
    )
    .expect("start test cluster")
}

/// A cluster plus an env for it; for S3 the server starts first so that archive_command
/// inherits its credentials.
pub fn cluster_and_env(extra_conf: &str, kind: RepoKind) -> (TempCluster, Env) {
    match kind {
        RepoKind::Fs => {
            let tc = cluster(extra_conf);
            let env = Env::for_cluster(&tc, RepoKind::Fs);
            (tc, env)
        }
        RepoKind::S3 => {
            let s3 = s3server::S3Server::start_blocking();
            let tc = cluster_env(extra_conf, s3.env());
            let env = Env::build_with(
                &tc.cluster.endpoint(),
                Some(&tc.cluster.data_dir),
                Some(s3),
                "",
            );
            (tc, env)
        }
    }
}

pub async fn sql(ep: &Endpoint, db: &str, q: &str) {
    let c = ep.connect(db).await.expect("connect");
    c.batch_execute(q)
        .await
        .unwrap_or_else(|e| panic!("{q}: {e:?}"));
}

pub async fn query_i64(ep: &Endpoint, db: &str, q: &str) -> i64 {
    let c = ep.connect(db).await.expect("connect");
    c.query_one(q, &[])
        .await
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get(0)
}

/// Where a test's repository lives.
pub enum RepoKind {
    Fs,
    S3,
}

/// A test environment: a config file pointing at `cluster` and a repository.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub repo_dir: PathBuf,
    pub s3: Option<s3server::S3Server>,
    pub extra_env: Vec<(String, String)>,
}

impl Env {
    pub fn new(ep: &Endpoint, kind: RepoKind) -> Env {
        Self::with_extra(ep, kind, "")
    }

    pub fn with_extra(ep: &Endpoint, kind: RepoKind, extra_toml: &str) -> Env {
        Self::build(ep, None, kind, extra_toml)
    }

    /// An env whose config also names the cluster's data directory (physical backups).
    pub fn for_cluster(tc: &TempCluster, kind: RepoKind) -> Env {
        Self::build(&tc.cluster.endpoint(), Some(&tc.cluster.data_dir), kind, "")
    }

    fn build(ep: &Endpoint, data_dir: Option<&Path>, kind: RepoKind, extra_toml: &str) -> Env {
        let s3 = match kind {
            RepoKind::Fs => None,
            RepoKind::S3 => Some(s3server::S3Server::start_blocking()),
        };
        Self::build_with(ep, data_dir, s3, extra_toml)
    }

    fn build_with(
        ep: &Endpoint,
        data_dir: Option<&Path>,
        s3: Option<s3server::S3Server>,
        extra_toml: &str,
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        // drctl runs as the cluster owner (as archive_command does): let it use this dir.
        if let Some(u) = owner() {
            drctl::pg::cluster::chown_tree(dir.path(), &u).unwrap();
        }
        let repo_dir = dir.path().join("repo");
        let (repo_toml, s3, extra_env) = match s3 {
            None => (
                format!(
                    "[repository]\nkind = \"fs\"\npath = \"{}\"\n",
                    repo_dir.display()
                ),
                None,
                vec![],
            ),
            Some(s) => {
                let toml = format!(
                    "[repository]\nkind = \"s3\"\nbucket = \"{}\"\nprefix = \"pfx\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nforce-path-style = true\npart-size-mib = 5\nmax-attempts = 2\n",
                    s.bucket, s.endpoint
                );
                let env = s.env();
                (toml, Some(s), env)
            }
        };
        let text = format!(
            "stanza = \"test\"\nspool-dir = \"{spool}\"\n[postgres]\nhost = \"{host}\"\nport = {port}\nuser = \"postgres\"\nbin-dir = \"{bin}\"\n{data_dir}{repo_toml}\n[compression]\nalgorithm = \"zstd\"\nlevel = 3\n{extra_toml}",
            spool = dir.path().join("spool").display(),
            host = ep.host,
            port = ep.port,
            bin = std::env::var("DRCTL_TEST_PG_BIN").unwrap_or_else(|_| PG_BIN.to_string()),
            data_dir = data_dir
                .map(|d| format!("data-dir = \"{}\"\n", d.display()))
                .unwrap_or_default(),
        );
        let config_path = dir.path().join("drctl.toml");
        std::fs::write(&config_path, text).unwrap();
        // Created here, owned by the test owner, so that a root-run check cannot take it.
        std::fs::create_dir_all(&repo_dir).unwrap();
        if let Some(u) = owner() {
            drctl::pg::cluster::chown_tree(dir.path(), &u).unwrap();
        }
        Env {
            dir,
            config_path,
            repo_dir,
            s3,
            extra_env,
        }
    }

    /// Runs the drctl binary with this env's config.
    pub fn drctl(&self, args: &[&str]) -> Output {
        self.drctl_env(args, &[])
    }

    pub fn drctl_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run drctl")
    }

    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = match owner() {
            Some(u) => drctl::pg::cluster::command_as(drctl_bin(), Some(&u)),
            None => std::process::Command::new(drctl_bin()),
        };
        cmd.arg("--config").arg(&self.config_path).args(args);
        cmd.env("HOME", self.dir.path())
            .current_dir(self.dir.path());
        cmd.env_remove("DRCTL_CONFIG").env_remove("DRCTL_FAULT");
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs drctl, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.drctl(args);
        assert!(
            out.status.success(),
            "drctl {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("json output")
    }

    /// Opens the repository as the library sees it.
    pub async fn storage(&self) -> drctl::storage::DynStorage {
        match &self.s3 {
            None => {
                std::sync::Arc::new(drctl::storage::fs::FsStorage::new(&self.repo_dir).unwrap())
            }
            Some(s) => std::sync::Arc::new(
                drctl::storage::s3::S3Storage::with_credentials(
                    &s.repository_config("pfx"),
                    &s.access_key,
                    &s.secret_key,
                )
                .await
                .unwrap(),
            ),
        }
    }
}

/// The OS user drctl and PostgreSQL run as in tests (postgres when the tests run as root).
pub fn owner() -> Option<drctl::pg::cluster::OsUser> {
    drctl::pg::cluster::process_owner(None, None).unwrap()
}

impl Env {
    /// Points the cluster's archive_command at `drctl wal push` with this env's config.
    pub async fn enable_archiving(&self, ep: &Endpoint) {
        let cmd = format!(
            "{} --config {} wal push %p",
            drctl_bin().display(),
            self.config_path.display()
        );
        sql(
            ep,
            "postgres",
            &format!("ALTER SYSTEM SET archive_command = '{cmd}'"),
        )
        .await;
        sql(ep, "postgres", "SELECT pg_reload_conf()").await;
    }

    /// A path inside this env's directory, owned by the test owner.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Switches WAL and waits until the finished segment is archived.
pub async fn switch_and_wait_archived(ep: &Endpoint) {
    let c = ep.connect("postgres").await.unwrap();
    let seg: String = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..600 {
        let row = c
            .query_one("SELECT coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '') FROM pg_stat_archiver", &[])
            .await
            .unwrap();
        let last: String = row.get(0);
        if last.len() >= 24 && last[..24] >= seg[..] {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("segment {seg} was not archived in 30s");
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}
