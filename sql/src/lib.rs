//! # sluice-sql
//!
//! The DataFusion layer of Sluice. Two things flow through it:
//! - **Incoming batches** ([`reshape`]): each batch a client sends is brought to its
//!   table's registered Arrow schema (reorder, fill missing columns, safe value-checked
//!   casts, JSON/Map/Struct into `jsonb`), or refused with an error naming the table,
//!   column and first bad row.
//! - **Queries** ([`query`]): read-only SQL over one table per registered table, each the
//!   union of the recent in-memory buffer and the archived Parquet files, taken from one
//!   consistent snapshot so no row is counted twice. Every query runs within [`limits`]:
//!   its size and nesting, its memory, and the size of any one value it computes.

pub mod limits;
pub mod query;
pub mod reshape;

pub use limits::QueryLimits;
pub use query::{ArchivedFile, QueryEngine, QueryError, SnapshotSource, TableSnapshot};
pub use reshape::{reshape, ReshapeError};
