//! What a caller should do about a failure, the one classification every Sluice crate's
//! error type answers: fix the input, try again later, or report a bug.
//!
//! Each crate keeps its own typed error (`SchemaError`, `DecodeError`, `WalError`,
//! `SinkError`, ...) and says which class each variant is in ([`Classify`]); the front
//! ends map the class to a gRPC status and an HTTP status in one place each, so the same
//! failure is answered alike through every door.

/// The class of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The request (a batch, a schema, a query, a config value) is wrong: sending it again
    /// fails the same way.
    InvalidInput,
    /// Something the request needs is missing or busy for now (a store, a connection, the
    /// disk, memory): the same request can succeed later.
    Unavailable,
    /// A bug or damaged state on the server's side.
    Internal,
}

/// An error that knows its [`ErrorClass`].
pub trait Classify {
    fn class(&self) -> ErrorClass;

    /// Whether sending the same request again later can succeed.
    fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Unavailable
    }
}
