//! OTLP traces: the `TraceService` over gRPC and `POST /v1/traces` over HTTP (protobuf),
//! into the seed tables `spans` and `span_events`.
//!
//! | `spans` column | from the OTLP span |
//! |---|---|
//! | `trace_id`, `span_id`, `parent_span_id` | lowercase hex ("" when absent) |
//! | `service` | resource attribute `service.name` (`unknown_service` without one) |
//! | `name` | `name` |
//! | `start_time`, `end_time` | `start_time_unix_nano`, `end_time_unix_nano` |
//! | `duration_ns` | end − start |
//! | `status_code` | `Unset`, `Ok` or `Error` |
//! | `status_message` | the status message |
//! | `attr` | the span's attributes, the resource's as `resource.<key>`, the scope's as `scope.<key>` plus `scope.name`/`scope.version`, `span.kind` (`Internal`, `Server`, `Client`, `Producer`, `Consumer`, or `Unspecified`), `trace_state` when set, and `links`: the span's links as a JSON array of `{"trace_id", "span_id", "trace_state", "attributes"}` |
//!
//! Every span event is a `span_events` row: the span's `trace_id` and `span_id`, `ts` from
//! the event's time, `name`, and `attr` from its attributes. A request's spans and events
//! are acknowledged once both tables' records are durable. A span whose start or end time
//! does not fit a signed 64-bit nanosecond count is rejected (counted in
//! `partial_success.rejected_spans`, with its events), the rest stored.

use std::sync::Arc;

use arrow::array::{Int64Builder, RecordBatch, StringBuilder, TimestampNanosecondBuilder};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::codec::CompressionEncoding;
use tracing::Instrument;

use super::{
    append_hex, batch_of, check_expansion, context_entries, cut, grpc_status, hex, http_export,
    map_bytes, put, put_all, put_entries, service_name, RowSizes, MAX_ERRORS,
};
use crate::state::AppState;
use crate::write::submit_all;
use sluice_core::error::{Error, Result};

/// The seed tables traces land in.
pub const SPANS_TABLE: &str = "spans";
pub const SPAN_EVENTS_TABLE: &str = "span_events";

/// The gRPC `TraceService`, gzip accepted and answered, messages up to `max_message`.
pub fn trace_service(state: Arc<AppState>, max_message: usize) -> TraceServiceServer<OtlpTraces> {
    TraceServiceServer::new(OtlpTraces { state })
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max_message)
}

/// The gRPC traces door.
pub struct OtlpTraces {
    state: Arc<AppState>,
}

#[tonic::async_trait]
impl TraceService for OtlpTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> std::result::Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let span = tracing::info_span!("otlp_traces", protocol = "otlp_grpc");
        export_traces(&self.state, request.into_inner(), "otlp_grpc")
            .instrument(span)
            .await
            .map(tonic::Response::new)
            .map_err(grpc_status)
    }
}

/// `POST /v1/traces` (see [`super::http_export`]).
pub async fn http_traces(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::info_span!("otlp_traces", protocol = "otlp_http");
    http_export(
        state,
        headers,
        body,
        "ExportTraceServiceRequest",
        |state, r| async move { export_traces(&state, r, "otlp_http").await },
    )
    .instrument(span)
    .await
}

/// Stores the request's spans and their events (those that can be) and says what it could
/// not.
pub async fn export_traces(
    state: &AppState,
    request: ExportTraceServiceRequest,
    protocol: &str,
) -> Result<ExportTraceServiceResponse> {
    let otel = state.otel_tables;
    let (rows, otel_rows) = super::off_workers(move || {
        let rows = trace_batches(&request)?;
        let otel_rows = otel
            .then(|| super::otel::otel_traces_batch(&request))
            .transpose()?;
        Ok((rows, otel_rows))
    })
    .await?;
    let mut batches = cut(SPANS_TABLE, &rows.spans);
    batches.extend(cut(SPAN_EVENTS_TABLE, &rows.events));
    if let Some(otel_rows) = &otel_rows {
        batches.extend(cut(super::otel::OTEL_TRACES, otel_rows));
    }
    submit_all(state, batches, protocol, |i| format!("batch {}", i + 1)).await?;
    Ok(ExportTraceServiceResponse {
        partial_success: (rows.rejected > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: rows.rejected as i64,
            error_message: rows.errors.join("; "),
        }),
    })
}

/// The `spans` and `span_events` rows of a request, and the spans that could not be taken.
pub struct TraceRows {
    pub spans: RecordBatch,
    pub events: RecordBatch,
    pub rejected: usize,
    pub errors: Vec<String>,
}

/// The Arrow batches of `spans` and `span_events` for `request` (see the module doc).
pub fn trace_batches(request: &ExportTraceServiceRequest) -> Result<TraceRows> {
    // Count first (as for logs): refuse an over-expanding request before allocating, and
    // size the attribute maps once.
    let (mut services, mut contexts) = (Vec::new(), Vec::new());
    let (mut spans, mut events) = (RowSizes::default(), RowSizes::default());
    for resource_spans in &request.resource_spans {
        let resource_attrs: &[KeyValue] = resource_spans
            .resource
            .as_ref()
            .map_or(&[], |r| &r.attributes);
        let service_name = service_name(resource_attrs);
        let repeated = service_name.len();
        services.push(service_name);
        for scope_spans in &resource_spans.scope_spans {
            let context = context_entries(resource_attrs, scope_spans.scope.as_ref());
            for span in &scope_spans.spans {
                spans.row(repeated, &span.attributes, &context);
                for event in &span.events {
                    events.row(0, &event.attributes, &[]);
                }
            }
            contexts.push(context);
        }
    }
    check_expansion(
        spans.repeated + spans.keys + spans.values + events.keys + events.values,
        "spans",
    )?;
    let n = spans.rows;
    let (mut trace_id, mut span_id, mut parent) = (
        StringBuilder::with_capacity(n, n * 32),
        StringBuilder::with_capacity(n, n * 16),
        StringBuilder::with_capacity(n, n * 16),
    );
    let (mut service, mut name) = (
        StringBuilder::with_capacity(n, spans.repeated),
        StringBuilder::new(),
    );
    let mut start = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut end = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut duration = Int64Builder::with_capacity(n);
    let (mut status_code, mut status_message) = (StringBuilder::new(), StringBuilder::new());
    let mut attr = spans.labels_builder();
    let (mut ev_trace, mut ev_span, mut ev_name) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let mut ev_ts = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut ev_attr = events.labels_builder();
    let (mut rejected, mut errors) = (0usize, Vec::new());
    let mut index = 0usize;
    let mut contexts = contexts.into_iter();
    for (resource_spans, service_name) in request.resource_spans.iter().zip(services) {
        for scope_spans in &resource_spans.scope_spans {
            let context = contexts.next().unwrap_or_default();
            for span in &scope_spans.spans {
                index += 1;
                let times = (
                    i64::try_from(span.start_time_unix_nano),
                    i64::try_from(span.end_time_unix_nano),
                );
                let (Ok(s), Ok(e)) = times else {
                    rejected += 1;
                    if errors.len() < MAX_ERRORS {
                        errors.push(format!(
                            "span {index}: a start or end time past what a signed 64-bit nanosecond count holds"
                        ));
                    }
                    continue;
                };
                let (tid, sid) = (hex(&span.trace_id), hex(&span.span_id));
                trace_id.append_value(&tid);
                span_id.append_value(&sid);
                append_hex(&mut parent, &span.parent_span_id);
                service.append_value(&service_name);
                name.append_value(&span.name);
                start.append_value(s);
                end.append_value(e);
                duration.append_value(e.saturating_sub(s));
                let (code, message) = status_of(span, ["Unset", "Ok", "Error"]);
                status_code.append_value(code);
                status_message.append_value(message);
                put_all(&mut attr, &span.attributes);
                put_entries(&mut attr, &context);
                let kind = kind_of(
                    span.kind,
                    [
                        "Unspecified",
                        "Internal",
                        "Server",
                        "Client",
                        "Producer",
                        "Consumer",
                    ],
                );
                put(&mut attr, "span.kind", kind);
                if !span.trace_state.is_empty() {
                    put(&mut attr, "trace_state", &span.trace_state);
                }
                if !span.links.is_empty() {
                    let links: Vec<serde_json::Value> = span
                        .links
                        .iter()
                        .map(|l| {
                            let attributes: serde_json::Map<String, serde_json::Value> = l
                                .attributes
                                .iter()
                                .map(|kv| {
                                    (
                                        kv.key.clone(),
                                        kv.value
                                            .as_ref()
                                            .map_or(serde_json::Value::Null, super::any_json),
                                    )
                                })
                                .collect();
                            serde_json::json!({
                                "trace_id": hex(&l.trace_id),
                                "span_id": hex(&l.span_id),
                                "trace_state": l.trace_state,
                                "attributes": attributes,
                            })
                        })
                        .collect();
                    put(
                        &mut attr,
                        "links",
                        &serde_json::Value::Array(links).to_string(),
                    );
                }
                attr.append(true).map_err(Error::internal)?;
                for event in &span.events {
                    // An event's time past i64 nanoseconds: the span's start instead.
                    let ts = i64::try_from(event.time_unix_nano).unwrap_or(s);
                    ev_trace.append_value(&tid);
                    ev_span.append_value(&sid);
                    ev_ts.append_value(ts);
                    ev_name.append_value(&event.name);
                    put_all(&mut ev_attr, &event.attributes);
                    ev_attr.append(true).map_err(Error::internal)?;
                }
                check_expansion(
                    map_bytes(&mut attr) + map_bytes(&mut ev_attr) + service.values_slice().len(),
                    "spans",
                )?;
            }
        }
    }
    let spans = batch_of(vec![
        ("trace_id", Arc::new(trace_id.finish())),
        ("span_id", Arc::new(span_id.finish())),
        ("parent_span_id", Arc::new(parent.finish())),
        ("service", Arc::new(service.finish())),
        ("name", Arc::new(name.finish())),
        ("start_time", Arc::new(start.finish())),
        ("end_time", Arc::new(end.finish())),
        ("duration_ns", Arc::new(duration.finish())),
        ("status_code", Arc::new(status_code.finish())),
        ("status_message", Arc::new(status_message.finish())),
        ("attr", Arc::new(attr.finish())),
    ])?;
    let events = batch_of(vec![
        ("trace_id", Arc::new(ev_trace.finish())),
        ("span_id", Arc::new(ev_span.finish())),
        ("ts", Arc::new(ev_ts.finish())),
        ("name", Arc::new(ev_name.finish())),
        ("attr", Arc::new(ev_attr.finish())),
    ])?;
    Ok(TraceRows {
        spans,
        events,
        rejected,
        errors,
    })
}

/// A span's status code as one of `names` (`[unset, ok, error]`), and its message.
pub(super) fn status_of<'a>(span: &'a Span, names: [&'static str; 3]) -> (&'static str, &'a str) {
    let status = span.status.as_ref();
    let code = match status.map_or(0, |st| st.code) {
        c if c == StatusCode::Ok as i32 => names[1],
        c if c == StatusCode::Error as i32 => names[2],
        _ => names[0],
    };
    (code, status.map_or("", |st| st.message.as_str()))
}

/// A span kind as one of `names` (`[unspecified, internal, server, client, producer,
/// consumer]`, the protobuf enum's order); an unknown number is unspecified.
pub(super) fn kind_of(kind: i32, names: [&'static str; 6]) -> &'static str {
    match SpanKind::try_from(kind) {
        Ok(k) => names[k as usize],
        Err(_) => names[0],
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

    use super::super::test_values::kvs as kv;

    pub fn request() -> ExportTraceServiceRequest {
        let span = Span {
            trace_id: vec![0x11; 16],
            span_id: vec![0x22; 8],
            parent_span_id: vec![0x33; 8],
            name: "GET /".into(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: 1_796_119_200_000_000_000,
            end_time_unix_nano: 1_796_119_200_250_000_000,
            attributes: vec![kv("http.method", "GET")],
            events: vec![Event {
                time_unix_nano: 1_796_119_200_100_000_000,
                name: "exception".into(),
                attributes: vec![kv("exception.message", "boom")],
                ..Default::default()
            }],
            links: vec![Link {
                trace_id: vec![0x44; 16],
                span_id: vec![0x55; 8],
                attributes: vec![kv("why", "retry")],
                ..Default::default()
            }],
            status: Some(Status {
                code: StatusCode::Error as i32,
                message: "failed".into(),
            }),
            ..Default::default()
        };
        let bad = Span {
            start_time_unix_nano: u64::MAX,
            events: vec![Event::default()],
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "api")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span, bad],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn spans_that_expand_past_the_limit_are_refused_before_building() {
        // A 1 MiB resource attribute on 300 spans: 300 MiB of attributes from 1 MiB sent.
        let mut req = request();
        let rs = &mut req.resource_spans[0];
        rs.resource.as_mut().unwrap().attributes = vec![kv("big", &"x".repeat(1 << 20))];
        rs.scope_spans[0].spans = vec![Span::default(); 300];
        let e = trace_batches(&req).err().expect("refused");
        assert!(e.to_string().contains("more than 256 MiB"), "{e}");
    }

    #[test]
    fn spans_and_events_map_column_by_column() {
        let rows = trace_batches(&request()).unwrap();
        assert_eq!(
            (rows.rejected, rows.spans.num_rows(), rows.events.num_rows()),
            (1, 1, 1)
        );
        assert!(rows.errors[0].contains("span 2"), "{:?}", rows.errors);
        let s = &rows.spans;
        let text = |c: &str| {
            s.column_by_name(c)
                .unwrap()
                .as_string::<i32>()
                .value(0)
                .to_string()
        };
        assert_eq!(text("trace_id"), "11".repeat(16));
        assert_eq!(text("parent_span_id"), "33".repeat(8));
        assert_eq!(text("service"), "api");
        assert_eq!(text("status_code"), "Error");
        assert_eq!(text("status_message"), "failed");
        let d = s
            .column_by_name("duration_ns")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(d.value(0), 250_000_000);
        let attr = s.column_by_name("attr").unwrap().as_map().value(0);
        let get = |k: &str| {
            (0..attr.len())
                .find(|&i| attr.column(0).as_string::<i32>().value(i) == k)
                .map(|i| attr.column(1).as_string::<i32>().value(i).to_string())
        };
        assert_eq!(get("http.method").as_deref(), Some("GET"));
        assert_eq!(get("resource.service.name").as_deref(), Some("api"));
        assert_eq!(get("span.kind").as_deref(), Some("Server"));
        let links: serde_json::Value = serde_json::from_str(&get("links").unwrap()).unwrap();
        assert_eq!(
            links,
            serde_json::json!([{"trace_id": "44".repeat(16), "span_id": "55".repeat(8),
                "trace_state": "", "attributes": {"why": "retry"}}])
        );
        let e = &rows.events;
        assert_eq!(
            e.column_by_name("span_id")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "22".repeat(8)
        );
        assert_eq!(
            e.column_by_name("name")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "exception"
        );
        // Both fit their seed tables.
        for (table, batch) in [(SPANS_TABLE, s), (SPAN_EVENTS_TABLE, e)] {
            let t = flight_schema::seeds::seed_tables()
                .into_iter()
                .find(|t| t.name == table)
                .unwrap()
                .validate(1)
                .unwrap();
            sluice_sql::reshape::reshape(&t, batch).unwrap();
        }
    }
}
