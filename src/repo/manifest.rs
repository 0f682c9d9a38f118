//! Manifests: versioned JSON, sealed with their own SHA-256.
//!
//! On storage every metadata document is an envelope
//! `{"format":1,"sha256":"<hex>","body":{...}}` where the hash covers the exact bytes of
//! `body`. Readers check the hash before trusting a single field, so a flipped byte in a
//! manifest is caught like one in a data object.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::config::CompressionConfig;
use crate::error::{Error, Result};
use crate::pipeline::ObjectRecord;

pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    format: u32,
    sha256: String,
    body: &'a RawValue,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    format: u32,
    sha256: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// Serializes `value` into a sealed envelope.
pub fn seal<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let body = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Failed(format!("serialize: {e}")))?;
    let raw = RawValue::from_string(body).map_err(|e| Error::Failed(format!("serialize: {e}")))?;
    let sha = hex::encode(Sha256::digest(raw.get().as_bytes()));
    let env = EnvelopeOut {
        format: MANIFEST_FORMAT,
        sha256: sha,
        body: &raw,
    };
    serde_json::to_vec_pretty(&env).map_err(|e| Error::Failed(format!("serialize: {e}")))
}

/// Parses and verifies a sealed envelope.
pub fn open_envelope<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    let env: EnvelopeIn = serde_json::from_slice(bytes)
        .map_err(|e| Error::Corruption(format!("{what}: not a valid metadata document: {e}")))?;
    if env.format > MANIFEST_FORMAT {
        return Err(Error::Failed(format!(
            "{what}: format {} is newer than this drctl understands ({MANIFEST_FORMAT}); upgrade drctl",
            env.format
        )));
    }
    let got = hex::encode(Sha256::digest(env.body.get().as_bytes()));
    if got != env.sha256 {
        return Err(Error::Corruption(format!(
            "{what}: checksum mismatch (recorded {}, computed {got})",
            env.sha256
        )));
    }
    serde_json::from_str(env.body.get()).map_err(|e| Error::Corruption(format!("{what}: {e}")))
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackupKind {
    Logical,
    Physical,
}

impl BackupKind {
    pub fn suffix(self) -> &'static str {
        match self {
            BackupKind::Logical => "L",
            BackupKind::Physical => "F",
        }
    }
}

impl fmt::Display for BackupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackupKind::Logical => "logical",
            BackupKind::Physical => "physical",
        })
    }
}

/// One database in a logical backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub struct LogicalDatabase {
    pub name: String,
    /// The dump object (pg_dump custom format, compressed).
    pub object: ObjectRecord,
    /// Exact row count per table (`schema.table`), taken in the dump's own snapshot.
    #[serde(default)]
    pub row_counts: BTreeMap<String, i64>,
}

/// The manifest of one backup: the commit record listing every object it consists of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub kind: BackupKind,
    pub stanza: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// `server_version` of the source, e.g. "15.18".
    pub pg_version: String,
    pub pg_version_num: i32,
    pub system_identifier: String,
    pub compression: CompressionConfig,
    /// Host that took the backup.
    #[serde(default)]
    pub host: String,
    /// Logical backups: `pg_dump --version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_dump_version: Option<String>,
    /// Logical backups: one entry per database.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<LogicalDatabase>,
    /// Physical backups: LSNs, timeline, WAL range, label, and one entry per file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical: Option<crate::backup::physical::PhysicalInfo>,
}

impl Manifest {
    /// Every data object of the backup.
    pub fn objects(&self) -> Vec<&ObjectRecord> {
        let mut out: Vec<&ObjectRecord> = self.databases.iter().map(|d| &d.object).collect();
        if let Some(p) = &self.physical {
            out.extend(p.files.iter().map(|f| &f.object));
        }
        out
    }

    pub fn raw_size(&self) -> u64 {
        self.objects().iter().map(|o| o.raw_size).sum()
    }

    pub fn stored_size(&self) -> u64 {
        self.objects().iter().map(|o| o.stored_size).sum()
    }

    pub fn database_names(&self) -> Vec<String> {
        self.databases.iter().map(|d| d.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper() {
        let v = serde_json::json!({"a": 1, "b": "x"});
        let sealed = seal(&v).unwrap();
        let back: serde_json::Value = open_envelope(&sealed, "t").unwrap();
        assert_eq!(back, v);
        let text = String::from_utf8(sealed).unwrap().replace("\"x\"", "\"y\"");
        let err = open_envelope::<serde_json::Value>(text.as_bytes(), "t").unwrap_err();
        assert!(matches!(err, Error::Corruption(_)), "{err}");
    }
}
