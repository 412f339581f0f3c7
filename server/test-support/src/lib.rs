//! # sluice-test-support
//!
//! What Sluice's tests and benches share (a dev-dependency only, never in the binary):
//! - [`batches`]: Arrow batches of a registered table's schema, with plausible values.
//! - [`pg`]: throwaway PostgreSQL (and TimescaleDB) clusters, a database per test, and the
//!   [`pg_test!`] macro that runs a test on both flavors.
//! - [`ch`]: throwaway ClickHouse servers (chdb), a database per test.
//!
//! It depends on no Sluice crate but `flight-schema` (sluice-sinks uses it as a
//! dev-dependency): PostgreSQL is reached with `tokio-postgres` without TLS, ClickHouse
//! over HTTP with `reqwest`.

pub mod batches;
pub mod ch;
pub mod pg;
