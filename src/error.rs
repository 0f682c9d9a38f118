//! Errors and exit codes.
//!
//! Policy: library code returns [`Error`]; each variant maps to one fixed exit code (listed in
//! the README and in [`ExitCode`]), carries a message that says what went wrong and, where we
//! know it, what to do. `anyhow` is not used below the binary.

use crate::storage::StorageError;

/// Fixed process exit codes. Scripts rely on these; never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    Ok = 0,
    /// Anything not covered below (a failed pg_dump, an I/O error on local disk...).
    Failure = 1,
    /// Bad command-line usage.
    Usage = 2,
    /// Bad or unreadable configuration.
    Config = 3,
    /// PostgreSQL could not be reached or refused the connection.
    Connection = 4,
    /// The repository's storage could not be reached, refused access, or has no bucket.
    Storage = 5,
    /// Verification found corrupt, truncated or missing objects.
    Corruption = 6,
    /// The requested backup (or other named thing) does not exist.
    NotFound = 7,
    /// The target already exists (use --clean) or another precondition failed.
    Conflict = 8,
    /// A plan, drill or health check ran and a required check failed (or a stage timed out).
    CheckFailed = 9,
    /// `status`: an objective (RPO, RTO) is violated.
    ObjectiveViolated = 10,
    /// `status`: an objective is unproven (no successful drill recently enough).
    ObjectiveUnproven = 11,
    /// Another drctl process holds the repository lock.
    Locked = 12,
    /// Stopped by a signal or a job timeout; what it had written was cleaned up.
    Interrupted = 13,
    /// `wal fetch` could not deliver a segment that may exist (storage error after retries,
    /// checksum mismatch). Above 125, so PostgreSQL aborts recovery instead of promoting early.
    WalFetchFailed = 200,
}

impl ExitCode {
    pub fn code(self) -> i32 {
        self as i32
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("config: {0}")]
    Config(String),
    #[error("cannot connect to PostgreSQL at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("PostgreSQL: {context}: {}", pg_message(source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("repository: {0}")]
    Storage(#[from] StorageError),
    #[error("corruption: {0}")]
    Corruption(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Locked(String),
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) => ExitCode::Usage,
            Error::Config(_) => ExitCode::Config,
            Error::Connect { .. } => ExitCode::Connection,
            Error::Postgres { source, .. } if source.is_closed() || source.code().is_none() => {
                ExitCode::Connection
            }
            Error::Postgres { .. } => ExitCode::Failure,
            Error::Storage(StorageError::NotFound(_)) => ExitCode::NotFound,
            Error::Storage(_) => ExitCode::Storage,
            Error::Corruption(_) => ExitCode::Corruption,
            Error::NotFound(_) => ExitCode::NotFound,
            Error::Conflict(_) => ExitCode::Conflict,
            Error::Io { .. } | Error::Failed(_) => ExitCode::Failure,
            Error::Locked(_) => ExitCode::Locked,
            Error::Interrupted(_) => ExitCode::Interrupted,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn pg(context: impl Into<String>, source: tokio_postgres::Error) -> Error {
        Error::Postgres {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The server's own message for database errors (tokio-postgres displays only "db error").
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                m += &format!(" ({d})");
            }
            if let Some(h) = db.hint() {
                m += &format!(" hint: {h}");
            }
            m
        }
        None => e.to_string(),
    }
}
