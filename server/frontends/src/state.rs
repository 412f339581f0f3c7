//! What the protocol front ends share: the ingest pipeline (behind the [`Ingest`] trait),
//! the registry, the query engine, metrics and readiness. Front ends hold an
//! `Arc<AppState>` and never see stores.

use std::sync::Arc;

use flight_schema::{RegisterResult, TableSchema};

use sluice_core::error::{Error, Result};
use sluice_core::metrics::Metrics;
use sluice_core::registry::{table_json, Registry};
use sluice_ingest::Ingest;

/// Readiness of the server and its sinks, as JSON for `/readyz`.
pub trait Readiness: Send + Sync {
    /// `(ready, details)`.
    fn readiness(&self) -> (bool, serde_json::Value);
}

pub struct AppState {
    pub ingest: Arc<dyn Ingest>,
    pub registry: Arc<Registry>,
    pub query: Arc<crate::query::QueryService>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<dyn Readiness>,
    /// Largest HTTP write body, received and decompressed (`server.max_body_size`).
    pub max_body_size: usize,
    /// OTLP logs and spans also go to `otel_logs` / `otel_traces` (`otlp.otel_tables`).
    pub otel_tables: bool,
}

impl AppState {
    /// Registers a table from its JSON definition (Flight action and HTTP share this).
    pub async fn register_table(&self, body: &[u8]) -> Result<RegisterResult> {
        let schema = TableSchema::from_json(body, None)?;
        let (t, _) = self.registry.register(schema).await?;
        Ok(RegisterResult {
            name: t.name().to_string(),
            version: t.version,
        })
    }

    /// The JSON form of one registered table.
    pub fn table_json(&self, name: &str) -> Result<serde_json::Value> {
        self.registry
            .get(name)
            .map(|t| table_json(&t))
            .ok_or_else(|| Error::NotFound(format!("table '{name}' is not registered")))
    }

    /// The JSON form of every registered table.
    pub fn tables_json(&self) -> serde_json::Value {
        serde_json::Value::Array(self.registry.list().iter().map(|t| table_json(t)).collect())
    }
}
