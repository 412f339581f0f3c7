//! stub

pub mod query;
pub mod reshape;

pub use query::{ArchivedFile, QueryEngine, QueryError, SnapshotSource, TableSnapshot};
pub use reshape::{reshape, ReshapeError};
