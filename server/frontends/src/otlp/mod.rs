//! OTLP logs: the OpenTelemetry protocol's `LogsService` over gRPC (on the Flight port,
//! gzip accepted) and `POST /v1/logs` over HTTP (protobuf or JSON, gzip or zstd). Traces
//! are in [`traces`], metrics in [`metrics`], the OTLP/JSON decoder in [`json`]; what
//! every OTLP door shares (the HTTP body handling, the error answers, the value-to-text
//! rules) is here.
//!
//! # What flows through it
//! An `ExportLogsServiceRequest` (the official protobufs, `opentelemetry-proto`) is turned
//! column by column into Arrow arrays of the `logs_events` seed table ([`logs_batch`]):
//!
//! | column | from |
//! |---|---|
//! | `timestamp` | `time_unix_nano`, or `observed_time_unix_nano` when it is 0, or the time of receipt when both are |
//! | `service` | resource attribute `service.name` (`unknown_service` without one, as the OpenTelemetry SDKs say) |
//! | `host` | resource attribute `host.name` ("" without one) |
//! | `level` | `severity_text`, or from `severity_number` when the text is empty: 1–4 `trace`, 5–8 `debug`, 9–12 `info`, 13–16 `warn`, 17–20 `error`, 21–24 `fatal` ("" for 0) |
//! | `trace_id`, `span_id` | lowercase hex ("" when absent) |
//! | `message` | the body: a string as it is, any other value as JSON ("" without a body) |
//! | `labels` | the record's attributes as they are, the resource's under `resource.`, the scope's under `scope.`, plus `scope.name` and `scope.version` when set; string values as they are, others as JSON (bytes as base64) |
//!
//! The batch goes through [`Ingest::submit`](sluice_ingest::Ingest::submit) like any other
//! (registry, reshape, WAL, sinks), cut into batches of at most
//! [`BATCH_ROWS`](crate::write::BATCH_ROWS) rows; the answer comes once every row is
//! durable. A record that cannot be stored (a time past what a signed 64-bit nanosecond
//! count holds) is counted in `partial_success.rejected_log_records` with a message, and
//! the rest are stored. A full memory budget or WAL disk budget is UNAVAILABLE over gRPC
//! and 503 with `Retry-After` over HTTP, which OTLP exporters retry.
//!
//! OTLP/HTTP bodies are protobuf (`application/x-protobuf`) or the spec's JSON
//! (`application/json`, decoded by [`json`]); the answer, success or error, comes in the
//! request's own form.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    TimestampNanosecondBuilder,
};
use arrow::datatypes::{Field, Schema};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message;
use tonic::codec::CompressionEncoding;
use tracing::Instrument;

use crate::edge::status;
use crate::state::AppState;
use crate::write::{read_body, submit_all, BATCH_ROWS};

pub mod json;
pub mod metrics;
pub mod otel;
pub mod traces;
use sluice_core::error::{Error, Result};

/// The seed table OTLP logs land in.
pub const LOGS_TABLE: &str = "logs_events";
/// Media type of OTLP/HTTP protobuf bodies.
pub const PROTOBUF: &str = "application/x-protobuf";

/// The gRPC `LogsService`, gzip accepted and answered, messages up to `max_message`.
pub fn logs_service(state: Arc<AppState>, max_message: usize) -> LogsServiceServer<OtlpLogs> {
    LogsServiceServer::new(OtlpLogs { state })
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max_message)
}

/// The gRPC logs door.
pub struct OtlpLogs {
    state: Arc<AppState>,
}

#[tonic::async_trait]
impl LogsService for OtlpLogs {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> std::result::Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let span = tracing::info_span!("otlp_logs", protocol = "otlp_grpc");
        export_logs(&self.state, request.into_inner(), "otlp_grpc")
            .instrument(span)
            .await
            .map(tonic::Response::new)
            .map_err(grpc_status)
    }
}

/// OTLP's retry rule: a write refused for lack of room is UNAVAILABLE (which exporters
/// retry), not RESOURCE_EXHAUSTED (which they retry only with RetryInfo), and carries a
/// `RetryInfo` with the delay; the rest as on every door.
pub(crate) fn grpc_status(e: Error) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    if e.is_retryable() {
        tonic::Status::with_error_details(
            tonic::Code::Unavailable,
            e.to_string(),
            ErrorDetails::with_retry_info(Some(crate::edge::RETRY_AFTER)),
        )
    } else {
        status(e)
    }
}

/// Stores the request's log records (those that can be) and says what it could not.
pub async fn export_logs(
    state: &AppState,
    request: ExportLogsServiceRequest,
    protocol: &str,
) -> Result<ExportLogsServiceResponse> {
    let now = now_ns();
    let otel = state.otel_tables;
    let (logs, otel_rows) = off_workers(move || {
        let logs = logs_batch(&request, now)?;
        let otel_rows = otel
            .then(|| otel::otel_logs_batch(&request, now))
            .transpose()?;
        Ok((logs, otel_rows))
    })
    .await?;
    let mut batches = cut(LOGS_TABLE, &logs.batch);
    let seed_batches = batches.len();
    if let Some(rows) = &otel_rows {
        batches.extend(cut(otel::OTEL_LOGS, rows));
    }
    submit_all(state, batches, protocol, |i| {
        match i.checked_sub(seed_batches) {
            None => format!(
                "log record {} (counting the ones taken)",
                i * BATCH_ROWS + 1
            ),
            Some(j) => format!("{} row {}", otel::OTEL_LOGS, j * BATCH_ROWS + 1),
        }
    })
    .await?;
    Ok(ExportLogsServiceResponse {
        partial_success: (logs.rejected > 0).then(|| ExportLogsPartialSuccess {
            rejected_log_records: logs.rejected as i64,
            error_message: logs.errors.join("; "),
        }),
    })
}

/// Runs `f` (mapping a request to Arrow: milliseconds of CPU for a large one) on the
/// blocking pool, off the async workers.
pub(crate) async fn off_workers<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(Error::internal)?
}

/// The time of receipt, in nanoseconds since the epoch.
pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// `batch` for `table` in slices of at most [`BATCH_ROWS`] rows (none when empty).
pub(crate) fn cut<'a>(table: &'a str, batch: &RecordBatch) -> Vec<(&'a str, RecordBatch)> {
    let rows = batch.num_rows();
    (0..rows)
        .step_by(BATCH_ROWS)
        .map(|from| (table, batch.slice(from, BATCH_ROWS.min(rows - from))))
        .collect()
}

/// The `logs_events` rows of a request, and the records that could not be taken.
pub struct LogRows {
    pub batch: RecordBatch,
    pub rejected: usize,
    /// The first few reasons (at most [`MAX_ERRORS`]).
    pub errors: Vec<String>,
}

/// Reasons kept for a partial success message.
pub const MAX_ERRORS: usize = 5;

/// Most text one request's rows may add up to. Resource and scope attributes (and for
/// metrics, every label of a point on each of its bucket rows) are repeated on every row
/// they apply to, so a small request can ask for a great deal of memory; past this it is
/// refused as a whole (400) before anything is stored.
pub const MAX_EXPANDED_BYTES: usize = 256 << 20;

/// Fails once `used` bytes of row text pass [`MAX_EXPANDED_BYTES`].
pub(crate) fn check_expansion(used: usize, what: &str) -> Result<()> {
    if used > MAX_EXPANDED_BYTES {
        return Err(Error::InvalidArgument(format!(
            "the request's {what} expand to more than {} MiB of rows (resource, scope and point attributes are repeated on every row they apply to): send fewer {what} per request",
            MAX_EXPANDED_BYTES >> 20
        )));
    }
    Ok(())
}

/// Bytes of text in a map column being built.
pub(crate) fn map_bytes(map: &mut Labels) -> usize {
    map.keys().values_slice().len() + map.values().values_slice().len()
}

/// The Arrow batch (the columns of `logs_events`, names and order as registered) of every
/// log record of `request`; `now_ns` is the time of receipt. See the module doc.
pub fn logs_batch(request: &ExportLogsServiceRequest, now_ns: i64) -> Result<LogRows> {
    // Count first: refuse an over-expanding request before allocating, and size every
    // builder once (growing them was a third of the mapping's time).
    let (mut names, mut contexts) = (Vec::new(), Vec::new());
    let mut size = RowSizes::default();
    for resource_logs in &request.resource_logs {
        let resource_attrs: &[KeyValue] = resource_logs
            .resource
            .as_ref()
            .map_or(&[], |r| &r.attributes);
        let service_name = service_name(resource_attrs);
        let host_name = attribute(resource_attrs, "host.name").unwrap_or_default();
        let repeated = service_name.len() + host_name.len();
        names.push((service_name, host_name));
        for scope_logs in &resource_logs.scope_logs {
            let context = context_entries(resource_attrs, scope_logs.scope.as_ref());
            for record in &scope_logs.log_records {
                size.row(repeated, &record.attributes, &context);
                size.text += any_len(record.body.as_ref());
            }
            contexts.push(context);
        }
    }
    check_expansion(size.repeated + size.keys + size.values, "log records")?;
    let n = size.rows;
    let mut timestamp = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let (mut service, mut host, mut level) = (
        StringBuilder::with_capacity(n, size.repeated),
        StringBuilder::with_capacity(n, size.repeated),
        StringBuilder::with_capacity(n, n * 5),
    );
    let (mut trace_id, mut span_id, mut message) = (
        StringBuilder::with_capacity(n, n * 32),
        StringBuilder::with_capacity(n, n * 16),
        StringBuilder::with_capacity(n, size.text),
    );
    let mut labels = size.labels_builder();
    let (mut rejected, mut errors) = (0usize, Vec::new());
    let mut index = 0usize;
    let mut contexts = contexts.into_iter();
    for (resource_logs, (service_name, host_name)) in request.resource_logs.iter().zip(names) {
        for scope_logs in &resource_logs.scope_logs {
            let context = contexts.next().unwrap_or_default();
            for record in &scope_logs.log_records {
                index += 1;
                let nanos = [record.time_unix_nano, record.observed_time_unix_nano]
                    .into_iter()
                    .find(|t| *t != 0)
                    .map_or(Ok(now_ns), i64::try_from);
                let Ok(nanos) = nanos else {
                    rejected += 1;
                    if errors.len() < MAX_ERRORS {
                        errors.push(format!(
                            "log record {index}: time_unix_nano {} is past what a signed 64-bit nanosecond count holds",
                            record.time_unix_nano
                        ));
                    }
                    continue;
                };
                timestamp.append_value(nanos);
                service.append_value(&service_name);
                host.append_value(&host_name);
                level.append_value(level_of(&record.severity_text, record.severity_number));
                append_hex(&mut trace_id, &record.trace_id);
                append_hex(&mut span_id, &record.span_id);
                append_any(&mut message, record.body.as_ref());
                put_all(&mut labels, &record.attributes);
                put_entries(&mut labels, &context);
                labels.append(true).map_err(Error::internal)?;
                check_expansion(
                    map_bytes(&mut labels)
                        + service.values_slice().len()
                        + host.values_slice().len(),
                    "log records",
                )?;
            }
        }
    }
    let batch = batch_of(vec![
        ("timestamp", Arc::new(timestamp.finish())),
        ("service", Arc::new(service.finish())),
        ("host", Arc::new(host.finish())),
        ("level", Arc::new(level.finish())),
        ("trace_id", Arc::new(trace_id.finish())),
        ("span_id", Arc::new(span_id.finish())),
        ("message", Arc::new(message.finish())),
        ("labels", Arc::new(labels.finish())),
    ])?;
    Ok(LogRows {
        batch,
        rejected,
        errors,
    })
}

/// Key-value builder of a `labels`/`attr` column (map names as registered tables have them).
pub(crate) type Labels = MapBuilder<StringBuilder, StringBuilder>;

fn map_names() -> MapFieldNames {
    MapFieldNames {
        entry: "entries".into(),
        key: "key".into(),
        value: "value".into(),
    }
}

/// What a request's rows will take, counted before they are built: to refuse one that
/// expands too far before allocating, and to size the builders once.
#[derive(Default)]
pub(crate) struct RowSizes {
    pub rows: usize,
    /// Bytes of text repeated on every row from the resource (service, host names).
    pub repeated: usize,
    /// Bytes of other text (message bodies).
    pub text: usize,
    /// Map entries, and the bytes of their keys and values.
    pub entries: usize,
    pub keys: usize,
    pub values: usize,
}

impl RowSizes {
    /// One row with `attributes` and the `context` entries.
    pub fn row(&mut self, repeated: usize, attributes: &[KeyValue], context: &[(String, String)]) {
        self.rows += 1;
        self.repeated += repeated;
        self.entries += attributes.len() + context.len();
        for kv in attributes {
            self.keys += kv.key.len();
            self.values += any_len(kv.value.as_ref());
        }
        for (k, v) in context {
            self.keys += k.len();
            self.values += v.len();
        }
    }

    /// A map builder with room for the counted entries.
    pub fn labels_builder(&self) -> Labels {
        MapBuilder::with_capacity(
            Some(map_names()),
            StringBuilder::with_capacity(self.entries, self.keys),
            StringBuilder::with_capacity(self.entries, self.values),
            self.rows,
        )
    }
}

/// About the bytes a value takes as text (strings exactly, others a guess).
pub(crate) fn any_len(v: Option<&AnyValue>) -> usize {
    match v.and_then(|v| v.value.as_ref()) {
        None => 0,
        Some(any_value::Value::StringValue(s)) => s.len(),
        Some(_) => 16,
    }
}

/// One entry of the current row's map.
pub(crate) fn put(map: &mut Labels, key: &str, value: &str) {
    map.keys().append_value(key);
    map.values().append_value(value);
}

/// Attributes as entries of the current row, values as [`label_value`] (written straight
/// into the builders: no string per value).
pub(crate) fn put_all(map: &mut Labels, attrs: &[KeyValue]) {
    for kv in attrs {
        map.keys().append_value(&kv.key);
        append_any(map.values(), kv.value.as_ref());
    }
}

/// Where a record came from, as label entries made once per scope and put on each of its
/// records: the resource's attributes as `resource.<key>`, the scope's as `scope.<key>`,
/// and `scope.name` / `scope.version` when set.
pub(crate) fn context_entries(
    resource_attrs: &[KeyValue],
    scope: Option<&opentelemetry_proto::tonic::common::v1::InstrumentationScope>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = resource_attrs
        .iter()
        .map(|kv| (format!("resource.{}", kv.key), value_text(kv)))
        .collect();
    if let Some(scope) = scope {
        for (key, value) in [
            ("scope.name", &scope.name),
            ("scope.version", &scope.version),
        ] {
            if !value.is_empty() {
                out.push((key.to_string(), value.clone()));
            }
        }
        out.extend(
            scope
                .attributes
                .iter()
                .map(|kv| (format!("scope.{}", kv.key), value_text(kv))),
        );
    }
    out
}

/// Entries made by [`context_entries`] on the current row.
pub(crate) fn put_entries(map: &mut Labels, entries: &[(String, String)]) {
    for (k, v) in entries {
        put(map, k, v);
    }
}

/// A value as [`label_value`] writes it, appended to `b` (a string without a copy).
pub(crate) fn append_any(b: &mut StringBuilder, v: Option<&AnyValue>) {
    match v.and_then(|v| v.value.as_ref().map(|inner| (v, inner))) {
        None => b.append_value(""),
        Some((_, any_value::Value::StringValue(s))) => b.append_value(s),
        Some((v, _)) => b.append_value(any_json(v).to_string()),
    }
}

/// Lowercase hex of an id appended to `b` ("" for none), without a string per id.
pub(crate) fn append_hex(b: &mut StringBuilder, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 64];
    if bytes.len() * 2 > buf.len() {
        return b.append_value(hex(bytes));
    }
    for (i, byte) in bytes.iter().enumerate() {
        buf[2 * i] = DIGITS[(byte >> 4) as usize];
        buf[2 * i + 1] = DIGITS[(byte & 15) as usize];
    }
    b.append_value(std::str::from_utf8(&buf[..bytes.len() * 2]).expect("hex digits are ASCII"));
}

/// An attribute's value as text ([`label_value`]), if the attributes have `key`.
pub(crate) fn attribute(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).map(value_text)
}

/// An attribute's value as [`label_value`] writes it ("" without one).
pub(crate) fn value_text(kv: &KeyValue) -> String {
    kv.value.as_ref().map(label_value).unwrap_or_default()
}

/// The resource's `service.name`, or `unknown_service` as the OpenTelemetry SDKs say.
pub(crate) fn service_name(resource_attrs: &[KeyValue]) -> String {
    attribute(resource_attrs, "service.name").unwrap_or_else(|| "unknown_service".to_string())
}

/// A batch of `columns` (name, array), every field non-nullable and typed as its array.
pub(crate) fn batch_of(columns: Vec<(&str, ArrayRef)>) -> Result<RecordBatch> {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, a)| Field::new(*name, a.data_type().clone(), false))
        .collect();
    let arrays = columns.into_iter().map(|(_, a)| a).collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(Error::internal)
}

/// The level word of a record (see the module doc).
fn level_of(text: &str, number: i32) -> &str {
    if !text.is_empty() {
        return text;
    }
    match number {
        1..=4 => "trace",
        5..=8 => "debug",
        9..=12 => "info",
        13..=16 => "warn",
        17..=20 => "error",
        21..=24 => "fatal",
        _ => "",
    }
}

/// Lowercase hex of an id ("" for none).
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A value as a label or message: a string as it is, anything else as JSON text.
pub(crate) fn label_value(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        None => String::new(),
        Some(_) => any_json(v).to_string(),
    }
}

/// An OTLP value as JSON: numbers as numbers (NaN and infinities as the strings protobuf's
/// JSON mapping uses), bytes as base64, arrays and key-value lists nested.
pub(crate) fn any_json(v: &AnyValue) -> serde_json::Value {
    use serde_json::Value as J;
    match &v.value {
        None => J::Null,
        Some(any_value::Value::StringValue(s)) => J::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => J::Bool(*b),
        Some(any_value::Value::IntValue(i)) => J::from(*i),
        Some(any_value::Value::DoubleValue(d)) => serde_json::Number::from_f64(*d)
            .map(J::Number)
            .unwrap_or_else(|| {
                J::String(if d.is_nan() {
                    "NaN".into()
                } else if *d > 0.0 {
                    "Infinity".into()
                } else {
                    "-Infinity".into()
                })
            }),
        Some(any_value::Value::BytesValue(b)) => {
            J::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        Some(any_value::Value::ArrayValue(a)) => J::Array(a.values.iter().map(any_json).collect()),
        Some(any_value::Value::KvlistValue(l)) => J::Object(
            l.values
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(J::Null, any_json)))
                .collect(),
        ),
    }
}

/// `POST /v1/logs`: OTLP/HTTP with a protobuf body (gzip or zstd allowed); the answer is
/// an `ExportLogsServiceResponse` in protobuf, or on failure a `google.rpc.Status`.
pub async fn http_logs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::info_span!("otlp_logs", protocol = "otlp_http");
    http_export(
        state,
        headers,
        body,
        "ExportLogsServiceRequest",
        |state, r| async move { export_logs(&state, r, "otlp_http").await },
    )
    .instrument(span)
    .await
}

/// One OTLP/HTTP request: the body checked (protobuf or JSON, size, encoding) and decoded
/// as `Req` (named `what` in errors), handed to `export`, its answer encoded in the
/// request's own content type.
pub(crate) async fn http_export<Req, Resp, F, Fut>(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    what: &str,
    export: F,
) -> Response
where
    Req: Message + Default + json::FromOtlpJson + Send + 'static,
    Resp: Message + json::ToOtlpJson,
    F: FnOnce(Arc<AppState>, Req) -> Fut,
    Fut: std::future::Future<Output = Result<Resp>>,
{
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let encoding = match media.as_str() {
        PROTOBUF => Encoding::Protobuf,
        json::JSON => Encoding::Json,
        _ => {
            return http_error(
                Error::UnsupportedMediaType(format!(
                    "OTLP/HTTP takes {PROTOBUF} or {} bodies (got '{media}')",
                    json::JSON
                )),
                Encoding::Protobuf,
            )
        }
    };
    let bytes = match read_body(body, &headers, state.max_body_size).await {
        Ok(b) => b,
        Err(e) => return http_error(e, encoding),
    };
    // Decoding a large body is milliseconds of CPU: off the async workers.
    let what = what.to_string();
    let decoded = tokio::task::spawn_blocking(move || match encoding {
        Encoding::Protobuf => {
            Req::decode(&bytes[..]).map_err(|e| format!("the body is not an OTLP {what}: {e}"))
        }
        Encoding::Json => serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| format!("the body is not JSON: {e}"))
            .and_then(|v| {
                Req::from_otlp_json(&v)
                    .map_err(|e| format!("the body is not an OTLP/JSON {what}: {e}"))
            }),
    })
    .await;
    let request = match decoded {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return http_error(Error::InvalidArgument(e), encoding),
        Err(e) => return http_error(Error::internal(e), encoding),
    };
    match export(state, request).await {
        Ok(resp) => match encoding {
            Encoding::Protobuf => {
                ([(header::CONTENT_TYPE, PROTOBUF)], resp.encode_to_vec()).into_response()
            }
            Encoding::Json => (
                [(header::CONTENT_TYPE, json::JSON)],
                resp.to_otlp_json().to_string(),
            )
                .into_response(),
        },
        Err(e) => http_error(e, encoding),
    }
}

/// The two OTLP/HTTP body forms; an answer uses the request's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

/// `google.rpc.Status`, the body of an OTLP/HTTP error.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// An OTLP/HTTP error: the status code of the one HTTP mapping, except that a write
/// refused for lack of room is 503 (which exporters retry) with `Retry-After`; the body
/// is a `google.rpc.Status`, in protobuf or (for a JSON request) in JSON.
pub fn http_error(e: Error, encoding: Encoding) -> Response {
    let retryable = e.is_retryable();
    let status_code = if retryable {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        crate::edge::http_status(&e)
    };
    let message = e.to_string();
    let code = status(e).code() as i32;
    let mut out = match encoding {
        Encoding::Protobuf => (
            status_code,
            [(header::CONTENT_TYPE, PROTOBUF)],
            RpcStatus { code, message }.encode_to_vec(),
        )
            .into_response(),
        Encoding::Json => (
            status_code,
            [(header::CONTENT_TYPE, json::JSON)],
            serde_json::json!({"code": code, "message": message}).to_string(),
        )
            .into_response(),
    };
    if retryable {
        crate::edge::set_retry_after(&mut out);
    }
    out
}

/// Attribute builders for the tests of every OTLP module.
#[cfg(test)]
pub(crate) mod test_values {
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};

    pub fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
        }
    }

    pub fn s(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.into())
    }

    /// A string attribute.
    pub fn kvs(key: &str, value: &str) -> KeyValue {
        kv(key, s(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, InstrumentationScope, KeyValueList};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;

    use super::test_values::{kv, s};

    pub fn request() -> ExportLogsServiceRequest {
        let record = |time: u64, observed: u64, text: &str, number: i32, body| LogRecord {
            time_unix_nano: time,
            observed_time_unix_nano: observed,
            severity_text: text.into(),
            severity_number: number,
            body,
            attributes: vec![kv("user", s("u1")), kv("n", any_value::Value::IntValue(7))],
            trace_id: (1..=16).collect(),
            span_id: vec![0xab; 8],
            ..Default::default()
        };
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s("api")), kv("host.name", s("h1"))],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "lib".into(),
                        version: "1.2".into(),
                        attributes: vec![kv("k", any_value::Value::BoolValue(true))],
                        ..Default::default()
                    }),
                    log_records: vec![
                        record(
                            1_796_119_200_000_000_001,
                            5,
                            "",
                            17,
                            Some(AnyValue {
                                value: Some(s("hello")),
                            }),
                        ),
                        record(
                            0,
                            1_796_119_200_000_000_002,
                            "Warning",
                            13,
                            Some(AnyValue {
                                value: Some(any_value::Value::KvlistValue(KeyValueList {
                                    values: vec![kv(
                                        "a",
                                        any_value::Value::ArrayValue(ArrayValue {
                                            values: vec![
                                                AnyValue {
                                                    value: Some(any_value::Value::DoubleValue(
                                                        f64::NAN,
                                                    )),
                                                },
                                                AnyValue {
                                                    value: Some(any_value::Value::BytesValue(
                                                        vec![0, 255],
                                                    )),
                                                },
                                            ],
                                        }),
                                    )],
                                })),
                            }),
                        ),
                        record(u64::MAX, 0, "", 9, None),
                        record(0, 0, "", 0, None),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn log_records_map_column_by_column() {
        let rows = logs_batch(&request(), 42).unwrap();
        assert_eq!(rows.rejected, 1);
        assert!(rows.errors[0].contains("log record 3"), "{:?}", rows.errors);
        let b = &rows.batch;
        assert_eq!(b.num_rows(), 3);
        let ts = b
            .column(0)
            .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        assert_eq!(
            ts.values().to_vec(),
            vec![1_796_119_200_000_000_001, 1_796_119_200_000_000_002, 42]
        );
        let text = |c: usize| -> Vec<String> {
            b.column(c)
                .as_string::<i32>()
                .iter()
                .map(|v| v.unwrap().to_string())
                .collect()
        };
        assert_eq!(text(1), vec!["api"; 3]);
        assert_eq!(text(2), vec!["h1"; 3]);
        assert_eq!(text(3), vec!["error", "Warning", ""]);
        assert_eq!(text(4)[0], "0102030405060708090a0b0c0d0e0f10");
        assert_eq!(text(5)[0], "abababababababab");
        assert_eq!(
            text(6),
            vec![
                "hello".to_string(),
                r#"{"a":["NaN","AP8="]}"#.to_string(),
                String::new(),
            ]
        );
        let labels = b.column(7).as_map();
        let first = labels.value(0);
        let pairs: Vec<(String, String)> = (0..first.len())
            .map(|i| {
                (
                    first.column(0).as_string::<i32>().value(i).to_string(),
                    first.column(1).as_string::<i32>().value(i).to_string(),
                )
            })
            .collect();
        let expected: Vec<(String, String)> = [
            ("user", "u1"),
            ("n", "7"),
            ("resource.service.name", "api"),
            ("resource.host.name", "h1"),
            ("scope.name", "lib"),
            ("scope.version", "1.2"),
            ("scope.k", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(pairs, expected);
    }

    #[test]
    fn a_request_that_expands_past_the_limit_is_refused_whole() {
        // One 1 MiB resource attribute on 300 records: 300 MiB of rows from 1 MiB sent.
        let mut req = request();
        let rl = &mut req.resource_logs[0];
        rl.resource.as_mut().unwrap().attributes[0] = kv("big", s(&"x".repeat(1 << 20)));
        rl.scope_logs[0].log_records = vec![LogRecord::default(); 300];
        let e = logs_batch(&req, 1).err().expect("refused");
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("more than 256 MiB")),
            "{e}"
        );
    }

    #[test]
    fn a_full_budget_is_unavailable_with_a_retry_delay() {
        use tonic_types::StatusExt;
        let s = grpc_status(Error::ResourceExhausted("memory budget full".into()));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let delay = s.get_details_retry_info().and_then(|r| r.retry_delay);
        assert_eq!(delay, Some(crate::edge::RETRY_AFTER));
        let s = grpc_status(Error::InvalidArgument("bad".into()));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.get_details_retry_info().is_none());
    }

    #[test]
    fn the_batch_fits_the_seed_table() {
        let table = flight_schema::seeds::seed_tables()
            .into_iter()
            .find(|t| t.name == LOGS_TABLE)
            .unwrap()
            .validate(1)
            .unwrap();
        let rows = logs_batch(&request(), 42).unwrap();
        let b = sluice_sql::reshape::reshape(&table, &rows.batch).unwrap();
        assert_eq!(b.num_rows(), 3);
        assert_eq!(b.column(0).len(), 3);
    }
}
