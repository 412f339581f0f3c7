//! The PostgreSQL/TimescaleDB store: binary COPY sink, migrations, maintenance and the
//! registry backend.
//!
//! # What flows through it
//! The sink ([`sink`]) reads WAL records for tables routed to `postgres`, coalesces them
//! per table and encodes them straight from Arrow into PostgreSQL's binary COPY format
//! ([`copy`]); each COPY commits in one transaction with the WAL range it holds, so replay
//! after a crash neither loses nor duplicates rows. [`migrate`] applies `migrations/postgres`
//! (TimescaleDB statements only where the extension exists), [`maintenance`] keeps the
//! plain-PostgreSQL fallback's partitions and `metrics_1m`, and [`registry`] keeps the schema
//! registry in `table_registry`.

pub mod copy;
pub mod maintenance;
pub mod migrate;
pub mod registry;
pub mod sink;

/// Opens one connection (no TLS) and drives it on a background task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Quotes an identifier for PostgreSQL (`"name"`, inner quotes doubled), whatever it holds.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
