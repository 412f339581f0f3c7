//! # sluice-frontends
//!
//! The doors: protocols in, Arrow batches out to the pipeline's [`sluice_ingest::Ingest`]
//! trait, answers back. A front end never talks to a store.
//! - [`flight`]: Arrow Flight (DoPut, DoGet, actions).
//! - [`http`]: the HTTP API (schema, SQL, health, metrics).
//! - [`otlp`]: OTLP logs and traces over gRPC (`LogsService`, `TraceService`) and HTTP
//!   (`POST /v1/logs`, `/v1/traces`).
//! - [`write`]: REST JSON writes (`POST /write/{table}`), JSON to Arrow column by column.
//! - [`state`]: what the doors share ([`state::AppState`]).
//! - [`query`]: where SQL runs: its own runtime, limits, results streamed.
//! - [`edge`]: what every request passes first (panics caught, decode errors
//!   classified), and the one mapping of errors to gRPC statuses and HTTP responses.
//! - [`listen`]: accepting connections, with a shared limit and idle/header/body timeouts.
//!
//! Depends on `sluice-ingest` and `sluice-core`; never on a sink.

pub mod edge;
pub mod flight;
pub mod http;
pub mod listen;
pub mod otlp;
pub mod query;
pub mod state;
pub mod write;
