//! Flight conventions shared by the server and clients.
//!
//! - DoPut: descriptor PATH `["<table>"]`; each durable batch is acked with a PutResult
//!   whose `app_metadata` is a JSON [`PutAck`].
//! - DoAction: the names in [`actions`]; `register_table` answers a [`RegisterResult`].
//! - DoGet: the ticket's bytes are a UTF-8 SQL query.

use serde::{Deserialize, Serialize};

/// DoAction names.
pub mod actions {
    /// Body: schema JSON with `name`. Result: [`super::RegisterResult`] JSON.
    pub const REGISTER_TABLE: &str = "register_table";
    /// Body: `{"name": "<table>"}`. Result: the registered schema JSON.
    pub const GET_TABLE: &str = "get_table";
    /// No body. Result: a JSON array of registered schemas.
    pub const LIST_TABLES: &str = "list_tables";
}

/// The `app_metadata` of a DoPut PutResult, sent once the batch is durable in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutAck {
    /// 1-based index of the batch within its DoPut call.
    pub request_id: u64,
    /// Rows of that batch now durable.
    pub rows: u64,
    /// WAL sequence number the batch was written at.
    pub wal_seq: u64,
}

/// The answer to `register_table` (action and HTTP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResult {
    pub name: String,
    pub version: u64,
}
