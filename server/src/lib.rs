//! # Sluice server
//!
//! Takes observability data in columnar form (Arrow) and lands it, without loss, in the
//! stores people query. This crate is the `sluice` binary's library: listeners, the
//! ingest pipeline, the WAL, sinks and config.
//!
//! # Layout
//! Dependencies point one way: protocol front ends → the [`pipeline::Ingest`] trait →
//! WAL, buffer and sinks.
//! - [`flight`], [`http`]: protocol front ends. They translate requests and call
//!   [`state::AppState`]; they never talk to a store.
//! - [`pipeline`]: registry lookup, reshape (`sluice-sql`), memory budget, WAL append.
//! - [`wal`]: group-committed, fsynced Arrow IPC segments; replay; release.
//! - [`buffer`]: the recent buffer per table and the memory budget.
//! - [`archive`]: the Parquet archive sink (object_store).
//! - [`postgres`]: the PostgreSQL/TimescaleDB sink (binary COPY), migrations, maintenance
//!   and the PostgreSQL registry store.
//! - [`clickhouse`]: the ClickHouse sink (Native format over HTTP) and migrations.
//! - [`migration`]: what the stores' migration runners share.
//! - [`sink`]: what store sinks share: WAL tailing, chunks, workers, retries, positions.
//! - [`query`]: where SQL runs: its own runtime, limits, results streamed.
//! - [`registry`]: registered tables and versions, behind a store trait.
//! - [`config`], [`metrics`], [`error`]: configuration, Prometheus metrics, errors.
//! - [`listen`]: accepting connections, with a shared limit and idle/header/body timeouts.
//! - [`edge`]: what every request passes first: panics caught, decode errors classified.
//! - [`server`]: start-up, WAL replay, serving, graceful shutdown.

pub mod allocator;
pub mod archive;
pub mod buffer;
pub mod clickhouse;
pub mod config;
pub mod edge;
pub mod error;
pub mod flight;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod migration;
pub mod pipeline;
pub mod postgres;
pub mod query;
pub mod registry;
pub mod server;
pub mod sink;
pub mod state;
pub mod wal;
pub mod wal_io;
