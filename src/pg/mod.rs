//! PostgreSQL access: connections (tokio-postgres), locating and running the PostgreSQL
//! binaries. Passwords come from `PGPASSWORD` or the pgpass file, never from argv or config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::PostgresConfig;
use crate::error::{Error, Result};

/// Where to reach a server (the configured one, or a restore target).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub connect_timeout: Duration,
}

impl Endpoint {
    pub fn from_config(cfg: &PostgresConfig) -> Endpoint {
        Endpoint {
            host: cfg.host.clone(),
            port: cfg.port,
            user: cfg.user.clone(),
            connect_timeout: Duration::from_secs(cfg.connect_timeout),
        }
    }

    pub fn describe(&self) -> String {
        if self.host.starts_with('/') {
            format!("socket {}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Arguments for libpq-based tools (pg_dump, pg_restore, psql). No password here.
    pub fn libpq_args(&self, database: &str) -> Vec<String> {
        vec![
            "--host".into(),
            self.host.clone(),
            "--port".into(),
            self.port.to_string(),
            "--username".into(),
            self.user.clone(),
            "--dbname".into(),
            database.into(),
        ]
    }

    /// Connects to `database`, spawning the connection task.
    pub async fn connect(&self, database: &str) -> Result<Client> {
        let mut c = tokio_postgres::Config::new();
        if self.host.starts_with('/') {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        c.port(self.port)
            .user(&self.user)
            .dbname(database)
            .application_name("drctl")
            .connect_timeout(self.connect_timeout);
        if let Some(pw) = password(&self.host, self.port, database, &self.user) {
            c.password(pw);
        }
        let fut = c.connect(NoTls);
        let (client, conn) = match tokio::time::timeout(self.connect_timeout, fut).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                let message = match e.as_db_error() {
                    Some(db) => db.message().to_string(),
                    None => e.to_string(),
                };
                return Err(Error::Connect {
                    target: format!(
                        "{} (database {database}, user {})",
                        self.describe(),
                        self.user
                    ),
                    message,
                });
            }
            Err(_) => {
                return Err(Error::Connect {
                    target: self.describe(),
                    message: format!("timed out after {:?}", self.connect_timeout),
                });
            }
        };
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgres connection closed");
            }
        });
        Ok(client)
    }
}

/// `PGPASSWORD`, else a matching line of the pgpass file (`PGPASSFILE` or `~/.pgpass`).
fn password(host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    if let Ok(pw) = std::env::var("PGPASSWORD") {
        return Some(pw);
    }
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let pg_host = if host.starts_with('/') {
        "localhost"
    } else {
        host
    };
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass(line);
        if fields.len() != 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        if m(&fields[0], pg_host)
            && m(&fields[1], &port.to_string())
            && m(&fields[2], db)
            && m(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().unwrap().push(n);
                }
            }
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

/// Facts about a server that every backup records.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version: String,
    pub version_num: i32,
    pub system_identifier: String,
}

pub async fn server_info(client: &Client) -> Result<ServerInfo> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int, \
             (SELECT system_identifier::text FROM pg_control_system())",
            &[],
        )
        .await
        .map_err(|e| Error::pg("reading server identity", e))?;
    Ok(ServerInfo {
        version: row.get(0),
        version_num: row.get(1),
        system_identifier: row.get(2),
    })
}

/// Quotes an identifier for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Locates PostgreSQL programs: `bin-dir` from config, else `pg_config --bindir`, else PATH.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: Option<PathBuf>,
}

impl Binaries {
    pub fn locate(bin_dir: Option<&Path>) -> Binaries {
        if let Some(d) = bin_dir {
            return Binaries {
                dir: Some(d.to_path_buf()),
            };
        }
        let from_pg_config = std::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .filter(|p| p.join("pg_dump").exists());
        // Debian/Ubuntu layout: the newest /usr/lib/postgresql/<major>/bin.
        let debian = || {
            let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
                .ok()?
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("pg_ctl").exists().then_some((major, bin))
                })
                .collect();
            majors.sort();
            majors.pop().map(|(_, p)| p)
        };
        Binaries {
            dir: from_pg_config.or_else(debian),
        }
    }

    pub fn path(&self, program: &str) -> PathBuf {
        match &self.dir {
            Some(d) => d.join(program),
            None => PathBuf::from(program),
        }
    }

    /// `program --version`, trimmed, or an error naming where we looked.
    pub fn version(&self, program: &str) -> Result<String> {
        let p = self.path(program);
        let out = std::process::Command::new(&p)
            .arg("--version")
            .output()
            .map_err(|e| {
                Error::Failed(format!(
                    "cannot run {}: {e} (set [postgres] bin-dir)",
                    p.display()
                ))
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

pub mod cluster;
