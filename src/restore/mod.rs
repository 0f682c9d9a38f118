//! Restoring: logical (pg_restore into a new database) and, later, physical PITR.

pub mod logical;
pub mod physical;
pub mod plan;
pub mod executor;
