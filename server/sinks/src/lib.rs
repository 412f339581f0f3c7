//! # sluice-sinks
//!
//! The stores: everything that takes durable records from the WAL and lands them
//! somewhere, and nothing a client talks to.
//! - [`runner`]: what every store sink shares, as stages: tail the WAL, route and chunk,
//!   encode and send behind the [`runner::StoreWriter`] trait (retries, dead letters),
//!   publish the position.
//! - [`error`]: [`SinkError`], what goes wrong on the way to a store.
//! - [`postgres`]: PostgreSQL/TimescaleDB: binary COPY, migrations, maintenance, job
//!   watch, and the PostgreSQL registry store.
//! - [`clickhouse`]: ClickHouse: Native format over HTTP, migrations.
//! - [`archive`]: the Parquet archive on object storage, one more [`runner::StoreWriter`]
//!   whose commits move rows from the recent buffer into Parquet files.
//! - [`rollup`]: per-interval aggregates of every metric series from the WAL into
//!   ClickHouse's `metrics_1m` (exactly once, through a checkpoint and deduplication
//!   tokens).
//! - [`migration`]: what the stores' migration runners share.
//! - [`config`]: the stores' configuration sections.
//!
//! Depends on the WAL (what it reads) and `sluice-core` (registry, buffer, metrics);
//! never on a front end or the pipeline.

pub mod archive;
pub mod clickhouse;
pub mod config;
pub mod error;
pub mod migration;
pub mod postgres;
pub mod rollup;
pub mod runner;

pub use error::SinkError;
