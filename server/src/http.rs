//! The HTTP front end: schema API, SQL API, health and metrics.
//!
//! | route | what |
//! |---|---|
//! | POST `/schema/register` | register a table (JSON with `name`) → `{"name","version"}` |
//! | GET `/schema`, `/schema/{table}` | registered schemas |
//! | POST `/query` `{"sql"}` | JSON rows, or an Arrow IPC stream with `Accept: application/vnd.apache.arrow.stream` |
//! | GET `/healthz`, `/readyz`, `/metrics` | liveness, readiness with sink state, Prometheus text |

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::TryStreamExt;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::state::AppState;

/// Media type of an Arrow IPC stream.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/schema/register", post(register))
        .route("/schema", get(list_schemas))
        .route("/schema/{table}", get(get_schema))
        .route("/query", post(query))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (ready, details) = state.readiness.readiness();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(details)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn register(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<flight_schema::RegisterResult>> {
    let span = tracing::info_span!("register", protocol = "http");
    state.register_table(&body).instrument(span).await.map(Json)
}

async fn list_schemas(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(state.tables_json())
}

async fn get_schema(
    State(state): State<Arc<AppState>>,
    Path(table): Path<String>,
) -> Result<Json<serde_json::Value>> {
    state.table_json(&table).map(Json)
}

#[derive(serde::Deserialize)]
struct QueryBody {
    sql: String,
}

async fn query(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let q: QueryBody = serde_json::from_slice(&body)
        .map_err(|e| Error::InvalidArgument(format!("body must be {{\"sql\": \"...\"}}: {e}")))?;
    let span = tracing::info_span!("query", protocol = "http", sql = %q.sql);
    let (schema, stream) = state.query.sql(&q.sql).instrument(span).await?;
    let batches: Vec<arrow::record_batch::RecordBatch> = stream
        .try_collect()
        .await
        .map_err(|e| Error::InvalidArgument(format!("query failed: {e}")))?;
    let wants_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(ARROW_STREAM));
    if wants_arrow {
        let mut buf = Vec::new();
        {
            let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &schema)
                .map_err(Error::internal)?;
            for b in &batches {
                w.write(b).map_err(Error::internal)?;
            }
            w.finish().map_err(Error::internal)?;
        }
        return Ok(([(header::CONTENT_TYPE, ARROW_STREAM)], buf).into_response());
    }
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::ArrayWriter::new(&mut buf);
        let refs: Vec<&arrow::record_batch::RecordBatch> = batches.iter().collect();
        w.write_batches(&refs).map_err(Error::internal)?;
        w.finish().map_err(Error::internal)?;
    }
    if buf.is_empty() {
        buf.extend_from_slice(b"[]");
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], buf).into_response())
}
