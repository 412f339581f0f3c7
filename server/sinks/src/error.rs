//! What goes wrong on the way to a store, typed by where it happened, with the cause kept
//! as its `source()`.
//!
//! A sink retries every [`SinkError`] a write returns (rows a store refuses for good do
//! not come back as errors: they go to the dead-letter files). What an error tells the
//! runner is whether to drop the connection first ([`SinkError::reconnect`]); what it
//! tells an operator is its class ([`Classify`]) and its message, shown in `/readyz`.

use std::path::PathBuf;

use flight_schema::{Classify, ErrorClass};

use crate::clickhouse::client::ChError;

/// A failure on a sink's path: reading the WAL, preparing rows, talking to the store,
/// writing dead letters or the plan journal.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// PostgreSQL refused a statement, or the connection failed under it.
    #[error("{context}: {}", pg_detail(.source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No connection to PostgreSQL could be opened.
    #[error("connecting to PostgreSQL: {0}")]
    PgConnect(#[from] crate::postgres::ConnectError),
    /// ClickHouse answered with an error, or could not be reached.
    #[error("{context}: {source}")]
    ClickHouse {
        context: String,
        #[source]
        source: ChError,
    },
    /// A table in the store has a shape Sluice cannot write its registered rows into
    /// (a column of another type, an option that does not parse). The rows stay in the
    /// WAL until the table or the registration is fixed.
    #[error("table '{table}': {reason}")]
    TableShape { table: String, reason: String },
    /// A registered ClickHouse option (`order_by`, `partition_by`, `ttl`) that does not
    /// parse (registered before the check existed).
    #[error(transparent)]
    TableOption(#[from] crate::clickhouse::sink::OptionError),
    /// arrow refused to build what the store is sent (a cast, a batch).
    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// Writing a dead-letter Parquet file failed.
    #[error("{context}: {source}")]
    Parquet {
        context: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// The object store (dead letters, archive) refused a write.
    #[error("{context}: {source}")]
    ObjectStore {
        context: String,
        #[source]
        source: object_store::Error,
    },
    /// A file of the sink's own (the plan journal) cannot be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line of the plan journal that is not a plan or a done range (not the torn last
    /// line a crash leaves, which is ignored).
    #[error("{} line {line}: {source}", .path.display())]
    Journal {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    /// A configuration value the store cannot use (`archive.url`, ...).
    #[error("{key}: {reason}")]
    Config { key: &'static str, reason: String },
    /// An archive manifest that does not parse.
    #[error("archive manifest {path} is unreadable: {source}")]
    Manifest {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// The WAL could not be read, or a record in it does not decode.
    #[error(transparent)]
    Wal(#[from] sluice_wal::WalError),
    /// A record names a table version the registry does not have.
    #[error("version {version} of table '{table}' is not registered")]
    UnknownVersion { table: String, version: u64 },
    /// A record does not fit its table's current schema.
    #[error("record of '{table}' does not fit the table's current schema: {source}")]
    Adapt {
        table: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// The store answered something that cannot be (an id missing right after its
    /// upsert): a bug or a store changed under Sluice.
    #[error("{0}")]
    Unexpected(String),
}

/// Short form of a PostgreSQL error: the server's message and SQLSTATE, or the client's
/// own error text.
fn pg_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

impl SinkError {
    pub fn postgres(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        SinkError::Postgres {
            context: context.into(),
            source,
        }
    }

    pub fn clickhouse(context: impl Into<String>, source: ChError) -> Self {
        SinkError::ClickHouse {
            context: context.into(),
            source,
        }
    }

    pub fn arrow(context: impl Into<String>, source: arrow::error::ArrowError) -> Self {
        SinkError::Arrow {
            context: context.into(),
            source,
        }
    }

    /// Whether the runner drops the connection and opens a new one before retrying: the
    /// connection broke, or no server answer came at all (its state is unknown).
    pub fn reconnect(&self) -> bool {
        match self {
            SinkError::Postgres { source, .. } => source.is_closed() || source.code().is_none(),
            SinkError::PgConnect(_) => true,
            _ => false,
        }
    }
}

impl Classify for SinkError {
    fn class(&self) -> ErrorClass {
        match self {
            SinkError::Postgres { source, .. } => {
                if source.code().is_none_or(|c| {
                    ["08", "40", "53", "57", "58"]
                        .iter()
                        .any(|class| c.code().starts_with(class))
                }) {
                    ErrorClass::Unavailable
                } else {
                    ErrorClass::Internal
                }
            }
            SinkError::PgConnect(crate::postgres::ConnectError::Options(_)) => {
                ErrorClass::InvalidInput
            }
            SinkError::PgConnect(_) => ErrorClass::Unavailable,
            SinkError::ClickHouse { source, .. } if source.transient => ErrorClass::Unavailable,
            // Permanent answers: the statement, the data or the set-up (credentials, the
            // database) is wrong, as the client's own classification says.
            SinkError::ClickHouse { .. } => ErrorClass::InvalidInput,
            SinkError::ObjectStore { .. } => ErrorClass::Unavailable,
            SinkError::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                ErrorClass::Unavailable
            }
            SinkError::Wal(e) => e.class(),
            SinkError::TableShape { .. } | SinkError::TableOption(_) | SinkError::Config { .. } => {
                ErrorClass::InvalidInput
            }
            _ => ErrorClass::Internal,
        }
    }
}

impl From<SinkError> for sluice_core::error::Error {
    fn from(e: SinkError) -> Self {
        use sluice_core::error::Error;
        let message = e.to_string();
        match e.class() {
            ErrorClass::InvalidInput => Error::FailedPrecondition(message),
            ErrorClass::Unavailable => Error::Unavailable(message),
            ErrorClass::Internal => Error::Internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_keeps_its_cause_and_class() {
        use std::error::Error as _;
        let io = SinkError::Io {
            path: "/x/journal".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert_eq!(io.class(), ErrorClass::Unavailable);
        assert!(io.source().is_some(), "the io error is kept as the source");
        assert!(io.to_string().starts_with("/x/journal: "), "{io}");
        assert!(!io.reconnect());

        let ch = SinkError::clickhouse(
            "inserting into logs",
            ChError::from_code(252, "Too many parts"),
        );
        assert_eq!(ch.class(), ErrorClass::Unavailable);
        assert_eq!(ch.to_string(), "inserting into logs: Too many parts");
        // Permanent: the statement, the data or the set-up is wrong.
        let ch = SinkError::clickhouse("x", ChError::from_code(516, "Authentication failed"));
        assert_eq!(ch.class(), ErrorClass::InvalidInput);

        let shape = SinkError::TableShape {
            table: "t".into(),
            reason: "column 'a' has type Date".into(),
        };
        assert_eq!(shape.class(), ErrorClass::InvalidInput);
        let core: sluice_core::error::Error = shape.into();
        assert!(
            matches!(core, sluice_core::error::Error::FailedPrecondition(ref m) if m.contains("column 'a'")),
            "{core:?}"
        );
    }
}
