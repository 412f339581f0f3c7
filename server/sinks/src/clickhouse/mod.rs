//! The ClickHouse store: Native-format sink over HTTP, migrations and the HTTP client.
//!
//! # What flows through it
//! The sink ([`sink`]) reads WAL records for tables routed to `clickhouse`, coalesces
//! them per table, encodes them straight from Arrow into ClickHouse Native blocks
//! ([`native`]) and streams them as `INSERT INTO db.t (cols) FORMAT Native` bodies
//! ([`client`]), each carrying an `insert_deduplication_token` derived from its WAL range
//! so that a replay after a crash does not duplicate rows. [`migrate`] applies
//! `migrations/clickhouse`. A registration's table options are parsed and checked by
//! [`expr`], never pasted into DDL.

pub mod client;
pub mod expr;
pub mod migrate;
pub mod native;
pub mod sink;
