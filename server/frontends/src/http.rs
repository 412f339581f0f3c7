//! The HTTP front end: schema API, SQL API, health and metrics.
//!
//! | route | what |
//! |---|---|
//! | POST `/schema/register` | register a table (JSON with `name`) → `{"name","version"}` |
//! | GET `/schema`, `/schema/{table}` | registered schemas |
//! | POST `/write/{table}`, `/write/metrics`, `/write/logs` | JSON array or NDJSON rows (gzip/zstd) → `{"rows"}` once durable ([`crate::write`]) |
//! | POST `/v1/logs`, `/v1/traces`, `/v1/metrics` | OTLP/HTTP logs, traces and metrics ([`crate::otlp`]) |
//! | POST `/query` `{"sql"}` | JSON rows, or an Arrow IPC stream with `Accept: application/vnd.apache.arrow.stream` |
//! | GET `/healthz`, `/readyz`, `/metrics` | liveness, readiness with sink state, Prometheus text |

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use tracing::Instrument;

use crate::edge::HttpError;
use crate::state::AppState;
use sluice_core::error::{Error, Result};

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
        .route("/write/{table}", post(crate::write::write))
        .route("/v1/logs", post(crate::otlp::http_logs))
        .route("/v1/traces", post(crate::otlp::traces::http_traces))
        .route("/v1/metrics", post(crate::otlp::metrics::http_metrics))
        .layer(axum::middleware::from_fn(same_site_json))
        .layer(crate::edge::http_catch_panic())
        .with_state(state)
}

/// Media types a POST body may have: JSON (and NDJSON for writes).
const JSON_TYPES: &[&str] = &["application/json", "application/x-ndjson"];

/// POSTs change state or read data, and there is no auth yet: a web page must not be able
/// to send them from a browser. A request a browser marks cross-site (`Sec-Fetch-Site`), or
/// whose `Origin` is not this server, is refused (403); a body that is not JSON is refused
/// (415), which also keeps out the form posts a page can send without asking (a JSON
/// content type makes the browser ask first, and Sluice answers no CORS).
async fn same_site_json(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req.method() != axum::http::Method::POST {
        return next.run(req).await;
    }
    let h = req.headers();
    let refuse = |status: StatusCode, message: String| {
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    };
    if h.get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site" || v.as_bytes() == b"same-site")
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "cross-site requests from a browser are refused".into(),
        );
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("");
        let host = h
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if authority.is_empty() || authority != host {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("requests from another origin ({origin}) are refused"),
            );
        }
    }
    let content_type = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    // OTLP/HTTP's protobuf bodies: a browser cannot send them cross-site without asking
    // first either.
    let otlp =
        req.uri().path().starts_with("/v1/") && media.eq_ignore_ascii_case(crate::otlp::PROTOBUF);
    if !otlp && !JSON_TYPES.iter().any(|t| media.eq_ignore_ascii_case(t)) {
        if req.uri().path().starts_with("/v1/") {
            // An OTLP exporter reads a google.rpc.Status, not our JSON error.
            return crate::otlp::http_error(
                sluice_core::error::Error::UnsupportedMediaType(format!(
                    "OTLP/HTTP takes {} or application/json bodies (got '{media}')",
                    crate::otlp::PROTOBUF
                )),
                crate::otlp::Encoding::Protobuf,
            );
        }
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the body must be JSON: send Content-Type: application/json (got {})",
                if content_type.is_empty() {
                    "none"
                } else {
                    content_type
                }
            ),
        );
    }
    next.run(req).await
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
) -> Result<Json<flight_schema::RegisterResult>, HttpError> {
    let span = tracing::info_span!("register", protocol = "http");
    state
        .register_table(&body)
        .instrument(span)
        .await
        .map(Json)
        .map_err(HttpError)
}

async fn list_schemas(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(state.tables_json())
}

async fn get_schema(
    State(state): State<Arc<AppState>>,
    Path(table): Path<String>,
) -> Result<Json<serde_json::Value>, HttpError> {
    state.table_json(&table).map(Json).map_err(HttpError)
}

#[derive(serde::Deserialize)]
struct QueryBody {
    sql: String,
}

async fn query(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let q: QueryBody = serde_json::from_slice(&body)
        .map_err(|e| Error::InvalidArgument(format!("body must be {{\"sql\": \"...\"}}: {e}")))?;
    let span = tracing::info_span!("query", protocol = "http", sql = %q.sql);
    let mut stream = state.query.run(q.sql).instrument(span).await?;
    let schema = stream.schema();
    // The first batch before the status line: a query that fails at once is a 4xx/5xx,
    // not a 200 with an error inside. A failure after it cuts the body off, so a
    // complete body always means a complete answer.
    let first = stream.next().await.transpose()?;
    let batches = futures::stream::iter(first.map(Ok)).chain(stream);
    let wants_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(ARROW_STREAM));
    let body = if wants_arrow {
        Body::from_stream(arrow_stream_body(schema, batches))
    } else {
        Body::from_stream(json_array_body(batches))
    };
    let content_type = if wants_arrow {
        ARROW_STREAM
    } else {
        "application/json"
    };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

type BodyResult = std::result::Result<Bytes, Error>;

/// An Arrow IPC stream, one message per batch, written as the batches come.
fn arrow_stream_body(
    schema: arrow::datatypes::SchemaRef,
    batches: impl futures::Stream<Item = Result<arrow::record_batch::RecordBatch>> + Send + 'static,
) -> impl futures::Stream<Item = BodyResult> + Send + 'static {
    let writer =
        arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &schema).map_err(Error::internal);
    futures::stream::unfold(
        (Some(batches.boxed()), writer.map(Some)),
        |(batches, writer)| async move {
            let mut writer = match writer {
                Ok(Some(w)) => w,
                Ok(None) => return None,
                Err(e) => return Some((Err(e), (None, Ok(None)))),
            };
            let mut batches = batches?;
            let chunk = match batches.next().await {
                Some(Ok(b)) => writer.write(&b).map_err(Error::internal),
                Some(Err(e)) => Err(e),
                None => {
                    let end = writer.finish().map_err(Error::internal);
                    let bytes = std::mem::take(writer.get_mut());
                    return Some((end.map(|_| Bytes::from(bytes)), (None, Ok(None))));
                }
            };
            let bytes = Bytes::from(std::mem::take(writer.get_mut()));
            match chunk {
                Ok(()) => Some((Ok(bytes), (Some(batches), Ok(Some(writer))))),
                Err(e) => Some((Err(e), (None, Ok(None)))),
            }
        },
    )
}

/// A JSON array of row objects, written batch by batch as the batches come.
fn json_array_body(
    batches: impl futures::Stream<Item = Result<arrow::record_batch::RecordBatch>> + Send + 'static,
) -> impl futures::Stream<Item = BodyResult> + Send + 'static {
    let writer = arrow::json::WriterBuilder::new()
        .with_encoder_factory(Arc::new(FloatsAsJson))
        .build::<_, arrow::json::writer::JsonArray>(Vec::new());
    futures::stream::unfold(
        (Some(batches.boxed()), Some(writer), false),
        |(batches, writer, wrote)| async move {
            let mut writer = writer?;
            let mut batches = batches?;
            match batches.next().await {
                Some(Ok(b)) => {
                    let done = writer.write(&b).map_err(Error::internal);
                    let bytes = Bytes::from(std::mem::take(writer.get_mut()));
                    Some(match done {
                        Ok(()) => (
                            Ok(bytes),
                            (Some(batches), Some(writer), wrote || b.num_rows() > 0),
                        ),
                        Err(e) => (Err(e), (None, None, wrote)),
                    })
                }
                Some(Err(e)) => Some((Err(e), (None, None, wrote))),
                None => {
                    let end = writer.finish().map_err(Error::internal);
                    let mut bytes = std::mem::take(writer.get_mut());
                    if !wrote {
                        bytes = b"[]".to_vec();
                    }
                    Some((end.map(|_| Bytes::from(bytes)), (None, None, wrote)))
                }
            }
        },
    )
}

/// JSON has no NaN or infinities: they are written as the strings `"NaN"`, `"Infinity"`
/// and `"-Infinity"` (as protobuf's JSON mapping does), not as null, so they stay told
/// apart from missing values. Finite numbers are written as arrow-json would.
#[derive(Debug)]
struct FloatsAsJson;

struct FloatEncoder<'a>(&'a dyn arrow::array::Array);

impl arrow::json::writer::Encoder for FloatEncoder<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        use arrow::array::AsArray;
        use arrow::datatypes::{Float16Type, Float32Type, Float64Type};
        let v: f64 = match self.0.data_type() {
            arrow::datatypes::DataType::Float16 => {
                self.0.as_primitive::<Float16Type>().value(idx).to_f64()
            }
            arrow::datatypes::DataType::Float32 => {
                let v = self.0.as_primitive::<Float32Type>().value(idx);
                if v.is_finite() {
                    out.extend_from_slice(format!("{v:?}").as_bytes());
                    return;
                }
                f64::from(v)
            }
            _ => self.0.as_primitive::<Float64Type>().value(idx),
        };
        if v.is_nan() {
            out.extend_from_slice(b"\"NaN\"");
        } else if v == f64::INFINITY {
            out.extend_from_slice(b"\"Infinity\"");
        } else if v == f64::NEG_INFINITY {
            out.extend_from_slice(b"\"-Infinity\"");
        } else {
            out.extend_from_slice(format!("{v:?}").as_bytes());
        }
    }
}

impl arrow::json::writer::EncoderFactory for FloatsAsJson {
    fn make_default_encoder<'a>(
        &self,
        _field: &'a arrow::datatypes::FieldRef,
        array: &'a dyn arrow::array::Array,
        _options: &'a arrow::json::writer::EncoderOptions,
    ) -> std::result::Result<
        Option<arrow::json::writer::NullableEncoder<'a>>,
        arrow::error::ArrowError,
    > {
        use arrow::datatypes::DataType;
        if !matches!(
            array.data_type(),
            DataType::Float16 | DataType::Float32 | DataType::Float64
        ) {
            return Ok(None);
        }
        Ok(Some(arrow::json::writer::NullableEncoder::new(
            Box::new(FloatEncoder(array)),
            array.logical_nulls(),
        )))
    }
}
