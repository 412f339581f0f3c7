//! # flight-schema
//!
//! The registered-table model of Sluice and the conventions every front end shares.
//!
//! What flows through it: a table schema in JSON (the seed design's form, see
//! `CONTRACT.md`) comes in, is checked by [`TableSchema::validate`] and becomes a
//! [`ResolvedTable`]: the same definition plus its Arrow schema, its time column and the
//! version the registry gave it. Everything downstream (reshape in `sluice-sql`, the WAL,
//! the sinks) works from the Arrow schema produced here, so the type mapping lives in one
//! place ([`ColumnType::to_arrow`]).
//!
//! # Layout
//! - [`types`]: the type names of the contract (`double`, `timestamp_ms`, `decimal(p,s)`,
//!   `string[]`, ...) and their Arrow types.
//! - [`table`]: table and column definitions, validation, schema evolution rules.
//! - [`seeds`]: the seed tables that ship pre-registered.
//! - [`flight`]: Flight descriptor, action and ack-metadata conventions.
//! - [`decode`]: the IPC messages of a DoPut stream into batches, never panicking.
//! - [`class`]: the classification (invalid input / unavailable / internal) every crate's
//!   error type answers.

pub mod class;
pub mod decode;
pub mod flight;
pub mod seeds;
pub mod table;
pub mod types;

pub use class::{Classify, ErrorClass};
pub use decode::DecodeError;
pub use flight::{actions, PutAck, RegisterResult};
pub use table::{
    check_evolution, reserved_name, ColumnDef, ExtraColumns, ResolvedTable, Role, SinkKind,
    TableSchema,
};
pub use types::ColumnType;

/// Bytes of data a batch holds: the lengths (not capacities) of its buffers, validity
/// bitmaps and children included, so a batch whose arrays slice one shared message is not
/// counted once per column; plus a small fixed overhead. The one measure of a batch's size that the memory budget, the
/// recent buffer, the WAL's in-memory feed and the sinks' chunk targets share.
pub fn data_size(batch: &arrow::record_batch::RecordBatch) -> usize {
    fn of(d: &arrow::array::ArrayData) -> usize {
        d.buffers().iter().map(|b| b.len()).sum::<usize>()
            + d.nulls().map_or(0, |n| n.buffer().len())
            + d.child_data().iter().map(of).sum::<usize>()
    }
    batch
        .columns()
        .iter()
        .map(|c| of(&c.to_data()))
        .sum::<usize>()
        + 64
}

/// Errors in a table definition or in a proposed schema change.
///
/// Every variant is a user error (the definition is wrong); none is retryable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemaError {
    /// A table or column name that is not a plain identifier.
    #[error("invalid {what} name '{name}': {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: String,
    },
    /// A type name the contract does not know.
    #[error("column '{column}': unknown type '{type_name}' (known: bool, int32, int64, float, double, string, timestamp, timestamp_ms, timestamp_ns, date, uuid, decimal(p,s), jsonb, map, string[], double[], timestamp_ns[], map[])")]
    UnknownType { column: String, type_name: String },
    /// Anything else wrong in a definition.
    #[error("table '{table}': {reason}")]
    Invalid { table: String, reason: String },
    /// A definition that cannot be read at all (not JSON, no name, wrong shape).
    #[error("the table schema cannot be read: {reason}")]
    Unreadable { reason: String },
    /// A new version that is not a compatible evolution of the current one.
    #[error("table '{table}': incompatible change: {reason}")]
    Incompatible { table: String, reason: String },
    /// A table routed (`sinks`) to stores this server has no URL for.
    #[error("table '{table}' routes to {}, which this server has no URL for (set {})", .missing.join(", "), .missing.iter().map(|m| format!("{m}.url")).collect::<Vec<_>>().join(", "))]
    Unrouted { table: String, missing: Vec<String> },
}

impl Classify for SchemaError {
    fn class(&self) -> ErrorClass {
        ErrorClass::InvalidInput
    }
}
