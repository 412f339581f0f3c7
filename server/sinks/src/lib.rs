//! # sluice-sinks
//!
//! The stores: everything that takes durable records from the WAL and lands them
//! somewhere, and nothing a client talks to.
//! - [`runner`]: what every store sink shares: tailing the WAL, chunks per table,
//!   parallel writers behind the [`runner::StoreWriter`] trait, retries, dead letters,
//!   positions.
//! - [`postgres`]: PostgreSQL/TimescaleDB: binary COPY, migrations, maintenance, job
//!   watch, and the PostgreSQL registry store.
//! - [`clickhouse`]: ClickHouse: Native format over HTTP, migrations.
//! - [`archive`]: the Parquet archive on object storage, drained from the recent buffer.
//! - [`migration`]: what the stores' migration runners share.
//! - [`config`]: the stores' configuration sections.
//!
//! Depends on the WAL (what it reads) and `sluice-core` (registry, buffer, metrics);
//! never on a front end or the pipeline.

pub mod archive;
pub mod clickhouse;
pub mod config;
pub mod migration;
pub mod postgres;
pub mod runner;
