//! The OpenTelemetry Collector ClickHouse exporter's rows: `otel_logs` and `otel_traces`,
//! written besides the seed tables when `[otlp] otel_tables` is on, so the Grafana
//! ClickHouse plugin's OTel log and trace views (and every dashboard built for that
//! exporter) work on Sluice's data unmodified.
//!
//! # What flows through it
//! The same decoded OTLP request the seed mapping reads, turned column by column into one
//! more Arrow batch per request, with the exporter's column names and values:
//!
//! | `otel_logs` column | from the log record |
//! |---|---|
//! | `Timestamp` | as `logs_events.timestamp` (time, else observed time, else receipt) |
//! | `TraceId`, `SpanId` | lowercase hex, "" when absent |
//! | `TraceFlags` | the low 8 bits of `flags` |
//! | `SeverityText`, `SeverityNumber` | as sent (no level derived: the exporter's rule) |
//! | `ServiceName` | resource `service.name`, "" without one |
//! | `Body` | a string body as it is, any other value as JSON |
//! | `ResourceSchemaUrl`, `ScopeSchemaUrl`, `ScopeName`, `ScopeVersion` | as sent |
//! | `ResourceAttributes`, `ScopeAttributes`, `LogAttributes` | maps; non-string values as JSON |
//!
//! | `otel_traces` column | from the span |
//! |---|---|
//! | `Timestamp` | start time |
//! | `TraceId`, `SpanId`, `ParentSpanId`, `TraceState`, `SpanName` | as sent (ids in hex) |
//! | `SpanKind` | `SPAN_KIND_UNSPECIFIED`, `SPAN_KIND_INTERNAL`, `SPAN_KIND_SERVER`, `SPAN_KIND_CLIENT`, `SPAN_KIND_PRODUCER`, `SPAN_KIND_CONSUMER` |
//! | `ServiceName`, `ResourceAttributes`, `ScopeName`, `ScopeVersion`, `SpanAttributes` | as for logs |
//! | `Duration` | end − start in nanoseconds (0 when the end is before the start) |
//! | `StatusCode`, `StatusMessage` | `STATUS_CODE_UNSET`, `STATUS_CODE_OK`, `STATUS_CODE_ERROR`; the message |
//! | `Events.Timestamp`, `Events.Name`, `Events.Attributes` | one element per event |
//! | `Links.TraceId`, `Links.SpanId`, `Links.TraceState`, `Links.Attributes` | one element per link |
//!
//! The records a seed mapping rejects (times past a signed 64-bit nanosecond count) are
//! left out here too, so both families hold the same records.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder,
    TimestampNanosecondBuilder,
};
use arrow::datatypes::Field;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;

use super::traces::{kind_of, status_of};
use super::{
    append_any, append_hex, attribute, batch_of, check_expansion, map_bytes, put_all, Labels,
    RowSizes,
};
use sluice_core::error::{Error, Result};

pub use flight_schema::seeds::{OTEL_LOGS, OTEL_TRACES};

/// Text repeated on every row of a resource or scope, counted for the expansion limit.
fn context_len(attrs: &[&[KeyValue]]) -> usize {
    attrs
        .iter()
        .flat_map(|a| a.iter())
        .map(|kv| kv.key.len() + super::any_len(kv.value.as_ref()))
        .sum()
}

/// A map column's builder sized for `rows` rows.
fn maps(rows: usize) -> Labels {
    RowSizes {
        rows,
        ..Default::default()
    }
    .labels_builder()
}

/// One map row from `attrs`.
fn append_map(map: &mut Labels, attrs: &[KeyValue]) -> Result<()> {
    put_all(map, attrs);
    map.append(true).map_err(Error::internal)
}

/// The `otel_logs` rows of `request`: one per log record the seed mapping keeps (the ones
/// whose time fits; `now_ns` stands in for a record with neither time).
pub fn otel_logs_batch(request: &ExportLogsServiceRequest, now_ns: i64) -> Result<RecordBatch> {
    let mut timestamp = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let (mut trace_id, mut span_id) = (StringBuilder::new(), StringBuilder::new());
    let (mut flags, mut severity_number) = (Int32Builder::new(), Int32Builder::new());
    let (mut severity_text, mut service, mut body) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut resource_schema, mut scope_schema, mut scope_name, mut scope_version) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut resource_map, mut scope_map, mut log_map) = (maps(0), maps(0), maps(0));
    let mut repeated = 0usize;
    for resource_logs in &request.resource_logs {
        let resource_attrs: &[KeyValue] = resource_logs
            .resource
            .as_ref()
            .map_or(&[], |r| &r.attributes);
        let service_name = attribute(resource_attrs, "service.name").unwrap_or_default();
        for scope_logs in &resource_logs.scope_logs {
            let scope = scope_logs.scope.clone().unwrap_or_default();
            let per_row = context_len(&[resource_attrs, &scope.attributes])
                + service_name.len()
                + scope.name.len()
                + scope.version.len()
                + resource_logs.schema_url.len()
                + scope_logs.schema_url.len();
            for record in &scope_logs.log_records {
                let nanos = [record.time_unix_nano, record.observed_time_unix_nano]
                    .into_iter()
                    .find(|t| *t != 0)
                    .map_or(Ok(now_ns), i64::try_from);
                let Ok(nanos) = nanos else { continue };
                timestamp.append_value(nanos);
                append_hex(&mut trace_id, &record.trace_id);
                append_hex(&mut span_id, &record.span_id);
                flags.append_value((record.flags & 0xff) as i32);
                severity_text.append_value(&record.severity_text);
                severity_number.append_value(record.severity_number.clamp(0, 255));
                service.append_value(&service_name);
                append_any(&mut body, record.body.as_ref());
                resource_schema.append_value(&resource_logs.schema_url);
                scope_schema.append_value(&scope_logs.schema_url);
                scope_name.append_value(&scope.name);
                scope_version.append_value(&scope.version);
                append_map(&mut resource_map, resource_attrs)?;
                append_map(&mut scope_map, &scope.attributes)?;
                append_map(&mut log_map, &record.attributes)?;
                repeated += per_row;
                check_expansion(
                    repeated + map_bytes(&mut log_map) + body.values_slice().len(),
                    "log records",
                )?;
            }
        }
    }
    batch_of(vec![
        ("Timestamp", Arc::new(timestamp.finish())),
        ("TraceId", Arc::new(trace_id.finish())),
        ("SpanId", Arc::new(span_id.finish())),
        ("TraceFlags", Arc::new(flags.finish())),
        ("SeverityText", Arc::new(severity_text.finish())),
        ("SeverityNumber", Arc::new(severity_number.finish())),
        ("ServiceName", Arc::new(service.finish())),
        ("Body", Arc::new(body.finish())),
        ("ResourceSchemaUrl", Arc::new(resource_schema.finish())),
        ("ResourceAttributes", Arc::new(resource_map.finish())),
        ("ScopeSchemaUrl", Arc::new(scope_schema.finish())),
        ("ScopeName", Arc::new(scope_name.finish())),
        ("ScopeVersion", Arc::new(scope_version.finish())),
        ("ScopeAttributes", Arc::new(scope_map.finish())),
        ("LogAttributes", Arc::new(log_map.finish())),
    ])
}

/// A list-of-strings column builder.
fn strings() -> ListBuilder<StringBuilder> {
    ListBuilder::new(StringBuilder::new())
}

/// A list-of-maps column builder, items named as the registered `map[]` type has them.
fn map_lists() -> ListBuilder<Labels> {
    ListBuilder::new(maps(0)).with_field(Arc::new(Field::new(
        "item",
        flight_schema::types::map_type(),
        true,
    )))
}

/// The exporter's names of span kinds (the protobuf enum's own names).
const KIND_NAMES: [&str; 6] = [
    "SPAN_KIND_UNSPECIFIED",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_SERVER",
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_PRODUCER",
    "SPAN_KIND_CONSUMER",
];

/// The `otel_traces` rows of `request`: one per span the seed mapping keeps.
pub fn otel_traces_batch(request: &ExportTraceServiceRequest) -> Result<RecordBatch> {
    let mut timestamp = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let (mut trace_id, mut span_id, mut parent, mut trace_state) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut span_name, mut span_kind, mut service) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut scope_name, mut scope_version) = (StringBuilder::new(), StringBuilder::new());
    let (mut resource_map, mut span_map) = (maps(0), maps(0));
    let mut duration = Int64Builder::new();
    let (mut status_code, mut status_message) = (StringBuilder::new(), StringBuilder::new());
    let mut ev_ts = ListBuilder::new(TimestampNanosecondBuilder::new().with_timezone("UTC"))
        .with_field(Arc::new(Field::new(
            "item",
            flight_schema::ColumnType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond).to_arrow(),
            true,
        )));
    let (mut ev_name, mut ev_attrs) = (strings(), map_lists());
    let (mut link_trace, mut link_span, mut link_state, mut link_attrs) =
        (strings(), strings(), strings(), map_lists());
    let mut repeated = 0usize;
    for resource_spans in &request.resource_spans {
        let resource_attrs: &[KeyValue] = resource_spans
            .resource
            .as_ref()
            .map_or(&[], |r| &r.attributes);
        let service_name = attribute(resource_attrs, "service.name").unwrap_or_default();
        for scope_spans in &resource_spans.scope_spans {
            let scope = scope_spans.scope.clone().unwrap_or_default();
            let per_row = context_len(&[resource_attrs])
                + service_name.len()
                + scope.name.len()
                + scope.version.len();
            for span in &scope_spans.spans {
                let (Ok(start), Ok(end)) = (
                    i64::try_from(span.start_time_unix_nano),
                    i64::try_from(span.end_time_unix_nano),
                ) else {
                    continue;
                };
                timestamp.append_value(start);
                append_hex(&mut trace_id, &span.trace_id);
                append_hex(&mut span_id, &span.span_id);
                append_hex(&mut parent, &span.parent_span_id);
                trace_state.append_value(&span.trace_state);
                span_name.append_value(&span.name);
                span_kind.append_value(kind_of(span.kind, KIND_NAMES));
                service.append_value(&service_name);
                append_map(&mut resource_map, resource_attrs)?;
                scope_name.append_value(&scope.name);
                scope_version.append_value(&scope.version);
                append_map(&mut span_map, &span.attributes)?;
                duration.append_value(end.saturating_sub(start).max(0));
                let (code, message) = status_of(
                    span,
                    ["STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR"],
                );
                status_code.append_value(code);
                status_message.append_value(message);
                for event in &span.events {
                    // As in span_events: an event time past i64 nanoseconds is the start.
                    ev_ts
                        .values()
                        .append_value(i64::try_from(event.time_unix_nano).unwrap_or(start));
                    ev_name.values().append_value(&event.name);
                    append_map(ev_attrs.values(), &event.attributes)?;
                }
                ev_ts.append(true);
                ev_name.append(true);
                ev_attrs.append(true);
                for link in &span.links {
                    append_hex(link_trace.values(), &link.trace_id);
                    append_hex(link_span.values(), &link.span_id);
                    link_state.values().append_value(&link.trace_state);
                    append_map(link_attrs.values(), &link.attributes)?;
                }
                link_trace.append(true);
                link_span.append(true);
                link_state.append(true);
                link_attrs.append(true);
                repeated += per_row;
                check_expansion(
                    repeated
                        + map_bytes(&mut span_map)
                        + map_bytes(ev_attrs.values())
                        + map_bytes(link_attrs.values()),
                    "spans",
                )?;
            }
        }
    }
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("Timestamp", Arc::new(timestamp.finish())),
        ("TraceId", Arc::new(trace_id.finish())),
        ("SpanId", Arc::new(span_id.finish())),
        ("ParentSpanId", Arc::new(parent.finish())),
        ("TraceState", Arc::new(trace_state.finish())),
        ("SpanName", Arc::new(span_name.finish())),
        ("SpanKind", Arc::new(span_kind.finish())),
        ("ServiceName", Arc::new(service.finish())),
        ("ResourceAttributes", Arc::new(resource_map.finish())),
        ("ScopeName", Arc::new(scope_name.finish())),
        ("ScopeVersion", Arc::new(scope_version.finish())),
        ("SpanAttributes", Arc::new(span_map.finish())),
        ("Duration", Arc::new(duration.finish())),
        ("StatusCode", Arc::new(status_code.finish())),
        ("StatusMessage", Arc::new(status_message.finish())),
        ("Events.Timestamp", Arc::new(ev_ts.finish())),
        ("Events.Name", Arc::new(ev_name.finish())),
        ("Events.Attributes", Arc::new(ev_attrs.finish())),
        ("Links.TraceId", Arc::new(link_trace.finish())),
        ("Links.SpanId", Arc::new(link_span.finish())),
        ("Links.TraceState", Arc::new(link_state.finish())),
        ("Links.Attributes", Arc::new(link_attrs.finish())),
    ];
    batch_of(columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray, ListArray, MapArray};
    use arrow::datatypes::{Int32Type, Int64Type, TimestampNanosecondType};

    /// A map row as sorted `key=value` pairs.
    fn entries(map: &MapArray, row: usize) -> Vec<String> {
        let m = map.value(row);
        let (k, v) = (
            m.column(0).as_string::<i32>(),
            m.column(1).as_string::<i32>(),
        );
        let mut out: Vec<String> = (0..m.len())
            .map(|i| format!("{}={}", k.value(i), v.value(i)))
            .collect();
        out.sort();
        out
    }

    fn text<'a>(b: &'a RecordBatch, column: &str, row: usize) -> &'a str {
        b.column_by_name(column)
            .unwrap()
            .as_string::<i32>()
            .value(row)
    }

    /// The registered schema takes the batch as it is: names, order, types.
    fn fits_registration(batch: &RecordBatch, table: &str) {
        let def = flight_schema::seeds::otel_tables()
            .into_iter()
            .find(|t| t.name == table)
            .unwrap()
            .validate(1)
            .unwrap();
        let want: Vec<_> = def
            .arrow_schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        let got: Vec<_> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn log_records_become_the_exporters_columns() {
        let req = super::super::tests::request();
        let b = otel_logs_batch(&req, 99).unwrap();
        fits_registration(&b, OTEL_LOGS);
        let plain = super::super::logs_batch(&req, 99).unwrap();
        assert_eq!(b.num_rows(), plain.batch.num_rows(), "the same records");
        let ts = b.column(0).as_primitive::<TimestampNanosecondType>();
        assert_eq!(ts.value(0), 1_796_119_200_000_000_001);
        assert_eq!(ts.value(1), 1_796_119_200_000_000_002, "observed time");
        assert_eq!(text(&b, "TraceId", 0), "0102030405060708090a0b0c0d0e0f10");
        assert_eq!(text(&b, "SpanId", 0), "abababababababab");
        // The exporter keeps the text as sent; no level is derived from the number.
        assert_eq!(text(&b, "SeverityText", 0), "");
        assert_eq!(text(&b, "SeverityText", 1), "Warning");
        let number = b
            .column_by_name("SeverityNumber")
            .unwrap()
            .as_primitive::<Int32Type>();
        assert_eq!((number.value(0), number.value(1)), (17, 13));
        assert_eq!(text(&b, "ServiceName", 0), "api");
        assert_eq!(text(&b, "Body", 0), "hello");
        assert!(
            text(&b, "Body", 1).starts_with("{\"a\":["),
            "{}",
            text(&b, "Body", 1)
        );
        assert_eq!(text(&b, "ScopeName", 0), "lib");
        assert_eq!(text(&b, "ScopeVersion", 0), "1.2");
        let map = |c: &str| b.column_by_name(c).unwrap().as_map().clone();
        assert_eq!(
            entries(&map("ResourceAttributes"), 0),
            ["host.name=h1", "service.name=api"]
        );
        assert_eq!(entries(&map("ScopeAttributes"), 0), ["k=true"]);
        assert_eq!(entries(&map("LogAttributes"), 1), ["n=7", "user=u1"]);
    }

    #[test]
    fn spans_become_the_exporters_columns_with_events_and_links_as_nested_arrays() {
        let req = super::super::traces::tests::request();
        let b = otel_traces_batch(&req).unwrap();
        fits_registration(&b, OTEL_TRACES);
        assert_eq!(b.num_rows(), 1, "the span past i64 nanoseconds is left out");
        assert_eq!(text(&b, "TraceId", 0), "11".repeat(16));
        assert_eq!(text(&b, "ParentSpanId", 0), "33".repeat(8));
        assert_eq!(text(&b, "SpanKind", 0), "SPAN_KIND_SERVER");
        assert_eq!(text(&b, "StatusCode", 0), "STATUS_CODE_ERROR");
        assert_eq!(text(&b, "StatusMessage", 0), "failed");
        assert_eq!(text(&b, "ServiceName", 0), "api");
        let duration = b
            .column_by_name("Duration")
            .unwrap()
            .as_primitive::<Int64Type>();
        assert_eq!(duration.value(0), 250_000_000);
        let list = |c: &str| -> ListArray { b.column_by_name(c).unwrap().as_list::<i32>().clone() };
        let ev_ts = list("Events.Timestamp");
        assert_eq!(
            ev_ts
                .value(0)
                .as_primitive::<TimestampNanosecondType>()
                .values()
                .to_vec(),
            [1_796_119_200_100_000_000]
        );
        assert_eq!(
            list("Events.Name").value(0).as_string::<i32>().value(0),
            "exception"
        );
        assert_eq!(
            entries(list("Events.Attributes").value(0).as_map(), 0),
            ["exception.message=boom"]
        );
        assert_eq!(
            list("Links.TraceId").value(0).as_string::<i32>().value(0),
            "44".repeat(16)
        );
        assert_eq!(
            list("Links.SpanId").value(0).as_string::<i32>().value(0),
            "55".repeat(8)
        );
        assert_eq!(list("Links.TraceState").value(0).len(), 1);
        assert_eq!(
            entries(list("Links.Attributes").value(0).as_map(), 0),
            ["why=retry"]
        );
    }

    #[test]
    fn an_end_before_the_start_is_a_zero_duration_not_a_wrapped_one() {
        let mut req = super::super::traces::tests::request();
        let span = &mut req.resource_spans[0].scope_spans[0].spans[0];
        span.end_time_unix_nano = span.start_time_unix_nano - 5;
        let b = otel_traces_batch(&req).unwrap();
        let duration = b
            .column_by_name("Duration")
            .unwrap()
            .as_primitive::<Int64Type>();
        assert_eq!(duration.value(0), 0);
    }

    #[test]
    fn over_expanding_requests_are_refused_here_too() {
        use opentelemetry_proto::tonic::trace::v1::Span;
        let mut req = super::super::traces::tests::request();
        let rs = &mut req.resource_spans[0];
        rs.resource.as_mut().unwrap().attributes =
            vec![super::super::test_values::kvs("big", &"x".repeat(1 << 20))];
        rs.scope_spans[0].spans = vec![Span::default(); 300];
        let e = otel_traces_batch(&req).expect_err("refused");
        assert!(e.to_string().contains("expand to more than"), "{e}");
    }
}
