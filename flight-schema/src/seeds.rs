//! The seed tables of the design documents, pre-registered on every fresh registry.
//!
//! Column names and types follow the seed SQL (`migrations/`): `metrics_events` for
//! PostgreSQL; `logs_events`, `spans`, `span_events` for ClickHouse; and `metrics`, the
//! write shape (`time, metric_name, labels, value`) that the PostgreSQL sink splits into
//! `metric_series` and `metrics_points`.

use crate::table::{ColumnDef, Role, SinkKind, TableSchema};
use crate::types::ColumnType;
use arrow::datatypes::TimeUnit;

fn col(name: &str, ty: ColumnType, role: Option<Role>, nullable: Option<bool>) -> ColumnDef {
    ColumnDef {
        name: name.to_string(),
        column_type: ty,
        nullable,
        default: None,
        role,
    }
}

fn table(name: &str, time_column: &str, columns: Vec<ColumnDef>) -> TableSchema {
    TableSchema {
        name: name.to_string(),
        columns,
        time_column: Some(time_column.to_string()),
        sinks: None,
        extra_columns: Default::default(),
        order_by: None,
        partition_by: None,
        ttl: None,
        retention: None,
    }
}

/// The seed tables, in registration order.
pub fn seed_tables() -> Vec<TableSchema> {
    use ColumnType as T;
    let ts_us = T::Timestamp(TimeUnit::Microsecond);
    let ts_ms = T::Timestamp(TimeUnit::Millisecond);
    let tag = Some(Role::Tag);
    let not_null = Some(false);

    let metrics_events = table(
        "metrics_events",
        "time",
        vec![
            col("time", ts_us, Some(Role::Time), None),
            col("app", T::String, tag, None),
            col("host", T::String, tag, None),
            col("labels", T::Jsonb, None, None),
            col("value", T::Double, Some(Role::Field), None),
            col("trace_id", T::String, None, None),
            col("level", T::String, tag, None),
        ],
    );

    let mut logs_events = table(
        "logs_events",
        "timestamp",
        vec![
            col("timestamp", ts_ms, Some(Role::Time), None),
            col("service", T::String, tag, None),
            col("host", T::String, tag, None),
            col("level", T::String, tag, None),
            col("trace_id", T::String, None, None),
            col("span_id", T::String, None, None),
            col("message", T::String, Some(Role::Message), None),
            col("labels", T::Map, None, None),
        ],
    );
    logs_events.order_by = Some("(service, timestamp, trace_id)".into());
    logs_events.partition_by = Some("toYYYYMM(timestamp)".into());
    logs_events.ttl = Some("timestamp + INTERVAL 180 DAY DELETE".into());

    let mut spans = table(
        "spans",
        "start_time",
        vec![
            col("trace_id", T::String, tag, None),
            col("span_id", T::String, None, None),
            col("parent_span_id", T::String, None, None),
            col("service", T::String, tag, None),
            col("name", T::String, tag, None),
            col("start_time", ts_us, Some(Role::Time), None),
            col("end_time", ts_us, None, None),
            col("duration_ns", T::Int64, Some(Role::Field), None),
            col("status_code", T::String, tag, None),
            col("status_message", T::String, None, None),
            col("attr", T::Map, None, None),
        ],
    );
    spans.order_by = Some("(trace_id, start_time)".into());
    spans.partition_by = Some("toYYYYMM(start_time)".into());
    spans.ttl = Some("start_time + INTERVAL 180 DAY DELETE".into());

    let mut span_events = table(
        "span_events",
        "ts",
        vec![
            col("trace_id", T::String, tag, None),
            col("span_id", T::String, None, None),
            col("ts", ts_us, Some(Role::Time), None),
            col("name", T::String, tag, None),
            col("attr", T::Map, None, None),
        ],
    );
    span_events.order_by = Some("(trace_id, span_id, ts)".into());
    span_events.partition_by = Some("toYYYYMM(ts)".into());
    span_events.ttl = Some("ts + INTERVAL 180 DAY DELETE".into());

    let metrics = table(
        "metrics",
        "time",
        vec![
            col("time", ts_us, Some(Role::Time), None),
            col("metric_name", T::String, tag, not_null),
            col("labels", T::Jsonb, None, None),
            col("value", T::Double, Some(Role::Field), not_null),
        ],
    );

    vec![metrics_events, logs_events, spans, span_events, metrics]
}

/// The OpenTelemetry Collector ClickHouse exporter's log table.
pub const OTEL_LOGS: &str = "otel_logs";
/// The OpenTelemetry Collector ClickHouse exporter's span table.
pub const OTEL_TRACES: &str = "otel_traces";

/// `otel_logs` and `otel_traces` as the OpenTelemetry Collector's ClickHouse exporter
/// names them, registered when `[otlp] otel_tables` is on (OTLP logs and spans then land
/// there too). ClickHouse only: the same records are in `logs_events` and `spans`
/// (and so in the archive) already. ClickHouse creates them from the exporter's own DDL
/// (`migrations/clickhouse/otel/`), whose column types these fit: `int32` fills `UInt8`,
/// `int64` fills `UInt64`, `string` fills `LowCardinality(String)`; `Events.*` and `Links.*`
/// are the subcolumns of the exporter's `Nested` columns.
pub fn otel_tables() -> Vec<TableSchema> {
    use ColumnType as T;
    let ts_ns = T::Timestamp(TimeUnit::Nanosecond);
    let tag = Some(Role::Tag);
    let not_null = Some(false);
    let s = |name: &str| col(name, T::String, None, not_null);
    let tag_s = |name: &str| col(name, T::String, tag, not_null);
    let map = |name: &str| col(name, T::Map, None, not_null);
    let only_clickhouse = |mut t: TableSchema| {
        t.sinks = Some(vec![SinkKind::Clickhouse]);
        t
    };
    let logs = table(
        OTEL_LOGS,
        "Timestamp",
        vec![
            col("Timestamp", ts_ns, Some(Role::Time), None),
            s("TraceId"),
            s("SpanId"),
            col("TraceFlags", T::Int32, None, not_null),
            tag_s("SeverityText"),
            col("SeverityNumber", T::Int32, None, not_null),
            tag_s("ServiceName"),
            col("Body", T::String, Some(Role::Message), not_null),
            s("ResourceSchemaUrl"),
            map("ResourceAttributes"),
            s("ScopeSchemaUrl"),
            s("ScopeName"),
            s("ScopeVersion"),
            map("ScopeAttributes"),
            map("LogAttributes"),
        ],
    );
    let traces = table(
        OTEL_TRACES,
        "Timestamp",
        vec![
            col("Timestamp", ts_ns, Some(Role::Time), None),
            s("TraceId"),
            s("SpanId"),
            s("ParentSpanId"),
            s("TraceState"),
            tag_s("SpanName"),
            tag_s("SpanKind"),
            tag_s("ServiceName"),
            map("ResourceAttributes"),
            s("ScopeName"),
            s("ScopeVersion"),
            map("SpanAttributes"),
            col("Duration", T::Int64, Some(Role::Field), not_null),
            tag_s("StatusCode"),
            s("StatusMessage"),
            col("Events.Timestamp", T::TimestampNsArray, None, not_null),
            col("Events.Name", T::StringArray, None, not_null),
            col("Events.Attributes", T::MapArray, None, not_null),
            col("Links.TraceId", T::StringArray, None, not_null),
            col("Links.SpanId", T::StringArray, None, not_null),
            col("Links.TraceState", T::StringArray, None, not_null),
            col("Links.Attributes", T::MapArray, None, not_null),
        ],
    );
    vec![only_clickhouse(logs), only_clickhouse(traces)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_table_validates() {
        for t in seed_tables() {
            let r = t.validate(1).unwrap_or_else(|e| panic!("{}: {e}", t.name));
            assert!(!r.is_nullable(r.column(&r.time_column).unwrap()));
        }
    }

    #[test]
    fn the_otel_tables_validate_and_go_to_clickhouse_only() {
        for t in otel_tables() {
            let r = t.validate(1).unwrap_or_else(|e| panic!("{}: {e}", t.name));
            assert_eq!(r.time_column, "Timestamp");
            assert_eq!(t.sinks, Some(vec![SinkKind::Clickhouse]));
        }
    }
}
