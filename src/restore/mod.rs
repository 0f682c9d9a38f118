//! Restoring: logical (pg_restore into a new database) and, later, physical PITR.

pub mod executor;
pub mod logical;
pub mod physical;
pub mod plan;
