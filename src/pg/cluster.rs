//! Cluster control: initdb, start, stop, as the data directory's owner.
//!
//! When drctl runs as root, every PostgreSQL process runs as the owning OS user (the data
//! directory's owner, `[postgres] os-user`, or `postgres`): PostgreSQL refuses to run as root,
//! and files it creates must belong to the cluster's owner.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::pg::{Binaries, Endpoint};

/// An OS account that PostgreSQL processes run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    pub fn by_name(name: &str) -> Result<OsUser> {
        let c = CString::new(name).map_err(|_| Error::Config(format!("bad user name {name:?}")))?;
        // SAFETY: getpwnam returns a pointer to static storage or null; we copy out at once.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if pw.is_null() {
            return Err(Error::Config(format!("OS user {name:?} does not exist")));
        }
        // SAFETY: pw is non-null and points to a valid passwd entry.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Ok(OsUser {
            name: name.to_string(),
            uid,
            gid,
        })
    }

    pub fn by_uid(uid: u32) -> Option<OsUser> {
        // SAFETY: as in by_name.
        let pw = unsafe { libc::getpwuid(uid) };
        if pw.is_null() {
            return None;
        }
        // SAFETY: pw is non-null; pw_name is a NUL-terminated string.
        let (name, gid) = unsafe {
            (
                std::ffi::CStr::from_ptr((*pw).pw_name)
                    .to_string_lossy()
                    .to_string(),
                (*pw).pw_gid,
            )
        };
        Some(OsUser { name, uid, gid })
    }
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whom PostgreSQL processes for `data_dir` must run as: `None` means "as we are" (not root).
/// As root: `os_user` if configured, else the owner of `data_dir` if it exists and is not
/// root, else `postgres`.
pub fn process_owner(data_dir: Option<&Path>, os_user: Option<&str>) -> Result<Option<OsUser>> {
    if !running_as_root() {
        return Ok(None);
    }
    if let Some(name) = os_user {
        return OsUser::by_name(name).map(Some);
    }
    if let Some(dir) = data_dir
        && let Ok(meta) = std::fs::metadata(dir)
    {
        use std::os::unix::fs::MetadataExt;
        if meta.uid() != 0
            && let Some(u) = OsUser::by_uid(meta.uid())
        {
            return Ok(Some(u));
        }
    }
    OsUser::by_name("postgres").map(Some)
}

/// A command that runs as `owner` when one is given.
pub fn command_as(program: impl AsRef<std::ffi::OsStr>, owner: Option<&OsUser>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(u) = owner {
        // std drops root's supplementary groups (setgroups(0)) before setuid.
        cmd.uid(u.uid).gid(u.gid);
    }
    cmd
}

/// Gives `path` (recursively) to `owner`.
pub fn chown_tree(path: &Path, owner: &OsUser) -> Result<()> {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
        .map_err(|e| Error::io(format!("chown {}", path.display()), e))?;
    if path.is_dir() {
        for entry in
            std::fs::read_dir(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?
        {
            let entry = entry.map_err(|e| Error::io("read dir", e))?;
            chown_tree(&entry.path(), owner)?;
        }
    }
    Ok(())
}

/// A PostgreSQL cluster on this host that drctl controls (a restore target, a drill's scratch
/// cluster, the demo, the test harness).
#[derive(Debug, Clone)]
pub struct Cluster {
    pub data_dir: PathBuf,
    pub port: u16,
    /// Directory of the unix socket.
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
    pub bins: Binaries,
    pub owner: Option<OsUser>,
    pub user: String,
    /// Extra environment for the server (and so for archive_command / restore_command).
    pub env: Vec<(String, String)>,
}

impl Cluster {
    /// Runs initdb into `data_dir` (which must be absent or empty) for superuser `postgres`.
    pub fn init(
        bins: Binaries,
        data_dir: &Path,
        socket_dir: &Path,
        port: u16,
        owner: Option<OsUser>,
    ) -> Result<Cluster> {
        for d in [data_dir, socket_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::io(format!("create {}", d.display()), e))?;
            if let Some(u) = &owner {
                chown_tree(d, u)?;
            }
        }
        let out = command_as(bins.path("initdb"), owner.as_ref())
            .arg("-D")
            .arg(data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .current_dir(data_dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io(format!("run {}", bins.path("initdb").display()), e))?;
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let log_file = data_dir
            .parent()
            .unwrap_or(data_dir)
            .join(format!("postgres-{port}.log"));
        Ok(Cluster {
            data_dir: data_dir.to_path_buf(),
            port,
            socket_dir: socket_dir.to_path_buf(),
            log_file,
            bins,
            owner,
            user: "postgres".into(),
            env: Vec::new(),
        })
    }

    /// Appends settings to postgresql.auto.conf-style include (postgresql.conf tail).
    pub fn append_conf(&self, lines: &str) -> Result<()> {
        use std::io::Write;
        let path = self.data_dir.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        writeln!(f, "\n# added by drctl\n{lines}")
            .map_err(|e| Error::io("write postgresql.conf", e))?;
        Ok(())
    }

    /// Starts the server and waits until it accepts connections (or, in recovery, until
    /// pg_ctl's own wait ends).
    pub fn start(&self, wait_secs: u32) -> Result<()> {
        if let Some(parent) = self.log_file.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        // The log must be writable by the owner.
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file);
        if let Some(u) = &self.owner {
            let _ = std::os::unix::fs::chown(&self.log_file, Some(u.uid), Some(u.gid));
        }
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.socket_dir.display()
        );
        let out = command_as(self.bins.path("pg_ctl"), self.owner.as_ref())
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-o", &opts, "-w", "-t", &wait_secs.to_string(), "start"])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io("run pg_ctl start", e))?;
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "PostgreSQL did not start on port {}: {}\n--- tail of {} ---\n{}",
                self.port,
                String::from_utf8_lossy(&out.stdout).trim(),
                self.log_file.display(),
                self.log_tail(30)
            )));
        }
        Ok(())
    }

    /// Stops the server (`fast` or `immediate`). Absent or stopped servers are fine.
    pub fn stop(&self, mode: &str) -> Result<()> {
        if !self.data_dir.join("postmaster.pid").exists() {
            return Ok(());
        }
        let out = command_as(self.bins.path("pg_ctl"), self.owner.as_ref())
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io("run pg_ctl stop", e))?;
        if !out.status.success() && self.data_dir.join("postmaster.pid").exists() {
            return Err(Error::Failed(format!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Connection endpoint over the unix socket.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: self.socket_dir.display().to_string(),
            port: self.port,
            user: self.user.clone(),
            connect_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// A free TCP port on 127.0.0.1 (racy by nature; callers retry on a start failure).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(54329)
}

/// A throwaway cluster in a temp dir, stopped (immediately) and removed on drop.
#[derive(Debug)]
pub struct TempCluster {
    pub cluster: Cluster,
    dir: Option<tempfile::TempDir>,
}

impl TempCluster {
    /// initdb + start, with `extra_conf` appended to postgresql.conf. Retries on a port race.
    pub fn start(bins: Binaries, extra_conf: &str) -> Result<TempCluster> {
        Self::start_with_env(bins, extra_conf, Vec::new())
    }

    /// Like [`TempCluster::start`], with extra environment for the server process.
    pub fn start_with_env(
        bins: Binaries,
        extra_conf: &str,
        env: Vec<(String, String)>,
    ) -> Result<TempCluster> {
        let dir = tempfile::Builder::new()
            .prefix("drctl-pg-")
            .tempdir()
            .map_err(|e| Error::io("create temp dir", e))?;
        let owner = process_owner(None, None)?;
        if let Some(u) = &owner {
            chown_tree(dir.path(), u)?;
        }
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        let mut cluster = Cluster::init(bins, &data, &sock, free_port(), owner)?;
        cluster.env = env;
        cluster.append_conf(extra_conf)?;
        let mut last = None;
        for _ in 0..3 {
            match cluster.start(60) {
                Ok(()) => {
                    return Ok(TempCluster {
                        cluster,
                        dir: Some(dir),
                    });
                }
                Err(e) => {
                    last = Some(e);
                    cluster.port = free_port();
                }
            }
        }
        Err(last.unwrap())
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Keeps the files after drop (for debugging).
    pub fn keep(mut self) -> PathBuf {
        let _ = self.cluster.stop("fast");
        self.dir.take().unwrap().keep()
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if self.dir.is_some() {
            let _ = self.cluster.stop("immediate");
        }
    }
}
