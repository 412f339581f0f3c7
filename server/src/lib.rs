//! # Sluice server
//!
//! Takes observability data in columnar form (Arrow) and lands it, without loss, in the
//! stores people query. This crate is the `sluice` binary: it wires the crates under
//! `server/` together, holds the configuration and the allocator. `ARCHITECTURE.md` at the
//! root walks one batch through them.
//!
//! # Crates
//! Dependencies point one way: front ends → ingest → WAL; sinks → WAL; everything may
//! use `sluice-core`; nothing points back up (checked by `scripts/check-deps`).
//! - `sluice-frontends` (`server/frontends`): Flight and HTTP; they hand batches to the
//!   [`pipeline::Ingest`] trait and never see a store.
//! - `sluice-ingest` (`server/ingest`): registry lookup, reshape, memory budget, WAL append.
//! - `sluice-wal` (`server/wal`): group-committed, fsynced Arrow IPC segments; replay;
//!   tailing; sink positions; release.
//! - `sluice-sinks` (`server/sinks`): PostgreSQL/TimescaleDB, ClickHouse, the Parquet
//!   archive, and the runner they share.
//! - `sluice-core` (`server/core`): registry, recent buffer and memory budget, metrics,
//!   the client-facing error.
//!
//! # This crate
//! - [`config`]: the configuration file, its sections and validation.
//! - [`server`]: start-up, WAL replay, serving, graceful shutdown.
//! - [`allocator`]: jemalloc and the purge of freed memory.
//!
//! The other crates' modules are re-exported under their old names so the binary, the
//! end-to-end tests and tools reach them by one path.

pub mod allocator;
pub mod config;
pub mod server;

pub use sluice_core::{buffer, error, metrics, registry};
pub use sluice_frontends::{edge, flight, http, listen, query, state};
pub use sluice_ingest as pipeline;
pub use sluice_sinks::{archive, clickhouse, migration, postgres, runner as sink};
pub use sluice_wal as wal;
pub use sluice_wal::io as wal_io;
