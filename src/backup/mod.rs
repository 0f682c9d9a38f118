//! Taking backups: logical (pg_dump) and, later, physical (base backups).

pub mod logical;
pub mod physical;
