//! The error type the rooms share, classified by what the caller should do about it; the
//! front ends map it to gRPC statuses and HTTP responses in one place each
//! (`sluice_frontends::edge`).
//!
//! Every error is classified by what the caller should do about it: fix the input
//! (`InvalidArgument`, `NotFound`, `FailedPrecondition`), slow down (`ResourceExhausted`),
//! retry later (`Unavailable`), or report a bug (`Internal`).

use flight_schema::{Classify, ErrorClass};

/// Errors surfaced to clients.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// A query went past one of its limits (`[query]`): INVALID_ARGUMENT over gRPC, 400
    /// over HTTP (the same query fails again; not worth a retry).
    #[error("{0}")]
    LimitExceeded(String),
    /// A query ran out of time (`query.timeout`): DEADLINE_EXCEEDED, 504.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The disk holding the WAL is full: RESOURCE_EXHAUSTED over gRPC, 507 over HTTP.
    #[error("{0}")]
    InsufficientStorage(String),
    /// A request body past its size limit: OUT_OF_RANGE over gRPC (as tonic answers a
    /// message over its limit), 413 over HTTP.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A body in a content type or encoding the route does not take: INVALID_ARGUMENT
    /// over gRPC, 415 over HTTP.
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the caller can succeed by sending the same request again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::ResourceExhausted(_) | Error::InsufficientStorage(_) | Error::Unavailable(_)
        )
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }

    /// The same error with `what` (the table, the step) in front of its message.
    pub fn context(self, what: &str) -> Self {
        let with = |m: String| format!("{what}: {m}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(with(m)),
            Error::NotFound(m) => Error::NotFound(with(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(with(m)),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(with(m)),
            Error::LimitExceeded(m) => Error::LimitExceeded(with(m)),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(with(m)),
            Error::InsufficientStorage(m) => Error::InsufficientStorage(with(m)),
            Error::PayloadTooLarge(m) => Error::PayloadTooLarge(with(m)),
            Error::UnsupportedMediaType(m) => Error::UnsupportedMediaType(with(m)),
            Error::Unavailable(m) => Error::Unavailable(with(m)),
            Error::Internal(m) => Error::Internal(with(m)),
        }
    }

    /// The error a crate's classified error becomes at the edge ([`Classify`]): invalid
    /// input is INVALID_ARGUMENT / 400, unavailable UNAVAILABLE / 503, internal INTERNAL /
    /// 500.
    pub fn classified(e: &(impl Classify + std::fmt::Display)) -> Self {
        let message = e.to_string();
        match e.class() {
            ErrorClass::InvalidInput => Error::InvalidArgument(message),
            ErrorClass::Unavailable => Error::Unavailable(message),
            ErrorClass::Internal => Error::Internal(message),
        }
    }
}

impl From<flight_schema::DecodeError> for Error {
    fn from(e: flight_schema::DecodeError) -> Self {
        Error::classified(&e)
    }
}

/// The message a panic carried (a `&str` or `String` payload), for an INTERNAL answer.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl From<flight_schema::SchemaError> for Error {
    fn from(e: flight_schema::SchemaError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<sluice_sql::reshape::ReshapeError> for Error {
    fn from(e: sluice_sql::reshape::ReshapeError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<sluice_sql::query::QueryError> for Error {
    fn from(e: sluice_sql::query::QueryError) -> Self {
        use sluice_sql::query::QueryError;
        match e {
            QueryError::InvalidArgument(m) => Error::InvalidArgument(m),
            QueryError::ResourcesExhausted(m) => Error::LimitExceeded(m),
            QueryError::Stopped(m) => Error::DeadlineExceeded(m),
            QueryError::Internal(m) => Error::Internal(m),
        }
    }
}

impl From<sluice_wal::WalError> for Error {
    fn from(e: sluice_wal::WalError) -> Self {
        match e {
            sluice_wal::WalError::Closed => {
                Error::Unavailable("the server is shutting down".to_string())
            }
            e if e.is_disk_full() => Error::InsufficientStorage(format!(
                "the disk holding the WAL is full, so the batch was not stored; writes are \
                 taken again as soon as space is freed ({e})"
            )),
            sluice_wal::WalError::Damaged(m) => Error::FailedPrecondition(m),
            other => Error::Internal(other.to_string()),
        }
    }
}
