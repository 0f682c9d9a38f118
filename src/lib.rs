//! drctl: disaster recovery and backup orchestration for PostgreSQL.
//!
//! Layers, top to bottom (dependencies point down only): `cli` (clap definitions, rendering)
//! and `command` (one module per verb), the domain (`backup`, `restore`, `verify`), `repo`
//! (repository layout, manifests), `pipeline` (checksummed, compressed streaming), `storage`
//! (fs and S3 drivers and their decorators), `pg` (PostgreSQL access and cluster control).

pub mod agent;
pub mod backup;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod error;
pub mod pg;
pub mod pipeline;
pub mod progress;
pub mod repo;
pub mod report;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod storage;
pub mod validate;
pub mod verify;
pub mod wal;
