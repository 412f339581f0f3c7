//! # sluice-core
//!
//! What the rooms of the server share, and nothing that talks to a store or a client:
//! - [`registry`]: registered tables and their versions, behind the [`registry::RegistryStore`]
//!   trait (the embedded file store lives here; the PostgreSQL one in `sluice-sinks`), with
//!   the checks stores add to registration ([`registry::TableCheck`]).
//! - [`buffer`]: the recent in-memory buffer per table, which SQL reads and the archive
//!   drains, and the memory budget every accepted batch is charged to.
//! - [`metrics`]: the Prometheus metrics (`sluice_*`), rendered at `/metrics`.
//! - [`error`]: the error the front ends see, classified by what the caller should do.
//!
//! Depends on the WAL crate only for its error and metrics types; nothing here depends on
//! a front end, the pipeline or a sink.

pub mod buffer;
mod bytesize;
pub mod error;
pub mod metrics;
pub mod registry;

pub use bytesize::ByteSize;
