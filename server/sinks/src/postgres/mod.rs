//! The PostgreSQL/TimescaleDB store: binary COPY sink, migrations, maintenance and the
//! registry backend. Connections are encrypted as libpq's `sslmode` in `postgres.url` asks
//! ([`tls`]).
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
pub mod jobs;
pub mod maintenance;
pub mod migrate;
pub mod registry;
pub mod sink;
pub mod tls;

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection string's TLS settings (`sslmode`, `sslrootcert`) are wrong.
    #[error("postgres.url: {0}")]
    Options(#[from] tls::OptionsError),
    /// PostgreSQL, the network or the TLS handshake refused.
    #[error("{}", migrate::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

/// Opens one connection, encrypted as the URL's `sslmode` asks, and drives it on a
/// background task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, ConnectError> {
    let options = tls::ConnOptions::parse(url)?;
    Ok(if options.mode == tls::SslMode::Disable {
        open(&options.rest, tokio_postgres::NoTls).await?
    } else {
        let connector = options.connector()?;
        open(&options.rest, connector).await?
    })
}

/// Connects with `tls` and drives the connection on a background task.
async fn open<T>(conn: &str, tls: T) -> Result<tokio_postgres::Client, tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = tokio_postgres::connect(conn, tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Checks `url` without connecting: its syntax and TLS settings (the CA file is read).
pub fn check_url(url: &str) -> Result<(), tls::OptionsError> {
    let options = tls::ConnOptions::parse(url)?;
    options
        .rest
        .parse::<tokio_postgres::Config>()
        .map_err(tls::OptionsError::NotPostgres)?;
    if options.mode != tls::SslMode::Disable {
        options.connector()?;
    }
    Ok(())
}

/// Quotes an identifier for PostgreSQL (`"name"`, inner quotes doubled), whatever it holds.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
