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
    /// PostgreSQL refused a statement, or the connection failed under it. The message
    /// has the server's text, SQLSTATE, detail and hint; a missing Sluice table says to
    /// run `sluice migrate`.
    #[error("{context}: {}", pg_message(.source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No connection to PostgreSQL could be opened (or its URL's TLS settings are wrong).
    #[error("{context}: {source}")]
    PgConnect {
        context: String,
        #[source]
        source: crate::postgres::ConnectError,
    },
    /// The store is not in the state Sluice needs and will not be by itself: not
    /// migrated, on another path than configured (TimescaleDB or not), an extension
    /// missing, a table Sluice owns changed by hand.
    #[error("{0}")]
    Precondition(String),
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
    /// `metrics_points` rows that span more days than partitions are made for at once
    /// (a stray timestamp must not create years of partitions).
    #[error("metrics_points rows span {days} days ({first} to {last}); partitions are created for at most {} days at once", crate::postgres::maintenance::MAX_RANGE_DAYS)]
    PartitionSpan {
        days: i64,
        first: chrono::NaiveDate,
        last: chrono::NaiveDate,
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

/// A PostgreSQL error in words (see [`crate::postgres::migrate::describe`]), with what to
/// do where Sluice knows it.
fn pg_message(e: &tokio_postgres::Error) -> String {
    let text = crate::postgres::migrate::describe(e);
    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
        format!("{text} (run `sluice migrate` against this database)")
    } else if pg_transport(e) {
        format!("PostgreSQL unavailable: {text}")
    } else {
        text
    }
}

/// Whether a PostgreSQL error without a server answer is about reaching the server (the
/// connection, a timeout, authentication) rather than a bug of the client's.
fn pg_transport(e: &tokio_postgres::Error) -> bool {
    if e.code().is_some() {
        return false;
    }
    let text = e.to_string();
    e.is_closed()
        || std::error::Error::source(e).is_some_and(|c| c.is::<std::io::Error>())
        || [
            "error communicating",
            "error connecting",
            "timeout",
            "authentication",
        ]
        .iter()
        .any(|p| text.starts_with(p))
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
            SinkError::PgConnect { .. } => true,
            _ => false,
        }
    }
}

impl Classify for SinkError {
    fn class(&self) -> ErrorClass {
        match self {
            // 08 connection exception, 40 rollback (serialization, deadlock), 53
            // resources, 57 operator intervention (shutdown), 58 system (I/O).
            SinkError::Postgres { source, .. } => match source.code() {
                Some(c) if *c == tokio_postgres::error::SqlState::UNDEFINED_TABLE => {
                    ErrorClass::InvalidInput
                }
                Some(c)
                    if ["08", "40", "53", "57", "58"]
                        .iter()
                        .any(|class| c.code().starts_with(class)) =>
                {
                    ErrorClass::Unavailable
                }
                Some(_) => ErrorClass::Internal,
                // No server answer: the way to the server, or a connection in an unknown
                // state; retrying on a new one is what helps.
                None => ErrorClass::Unavailable,
            },
            SinkError::PgConnect {
                source: crate::postgres::ConnectError::Options(_),
                ..
            } => ErrorClass::InvalidInput,
            SinkError::PgConnect { .. } => ErrorClass::Unavailable,
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
            SinkError::TableShape { .. }
            | SinkError::TableOption(_)
            | SinkError::Config { .. }
            | SinkError::Precondition(_)
            | SinkError::PartitionSpan { .. } => ErrorClass::InvalidInput,
            _ => ErrorClass::Internal,
        }
    }
}

impl From<crate::postgres::ConnectError> for SinkError {
    fn from(source: crate::postgres::ConnectError) -> Self {
        SinkError::PgConnect {
            context: "connecting to PostgreSQL".into(),
            source,
        }
    }
}

/// What a sink's failure is to a client or an operator: a wrong setting is an invalid
/// argument; a store in the wrong state, or refusing for good, a failed precondition;
/// the rest by its class.
impl From<SinkError> for sluice_core::error::Error {
    fn from(e: SinkError) -> Self {
        use sluice_core::error::Error;
        let message = e.to_string();
        match (&e, e.class()) {
            (SinkError::Config { .. }, _)
            | (
                SinkError::PgConnect {
                    source: crate::postgres::ConnectError::Options(_),
                    ..
                },
                _,
            ) => Error::InvalidArgument(message),
            (_, ErrorClass::InvalidInput) => Error::FailedPrecondition(message),
            (_, ErrorClass::Unavailable) => Error::Unavailable(message),
            (_, ErrorClass::Internal) => Error::Internal(message),
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
