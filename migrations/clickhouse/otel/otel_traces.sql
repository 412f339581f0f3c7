-- otel_traces, its trace-id lookup table and the materialized view that fills it: the span
-- tables of the OpenTelemetry Collector's ClickHouse exporter, with the column names and
-- types that exporter creates (its sql_templates/traces_table.sql,
-- traces_id_ts_lookup_table.sql and traces_id_ts_lookup_mv.sql), so the Grafana ClickHouse
-- plugin's trace views and dashboards built for the exporter read Sluice's rows unchanged.
-- Created by the ClickHouse sink when `[otlp] otel_tables` is on and otel_traces is
-- missing; not a numbered migration.
--
-- `Events` and `Links` are Nested columns: ClickHouse keeps them as the array columns
-- `Events.Timestamp`, `Events.Name`, ..., which is what Sluice inserts. One addition:
-- `non_replicated_deduplication_window` on otel_traces (Sluice puts its `[clickhouse]
-- dedup_window` in place of {dedup_window}), so a replayed insert is dropped by its token.
-- No TTL, as with the exporter's default.
CREATE TABLE IF NOT EXISTS otel_traces (
    Timestamp          DateTime64(9)                       CODEC(Delta, ZSTD(1)),
    TraceId            String                              CODEC(ZSTD(1)),
    SpanId             String                              CODEC(ZSTD(1)),
    ParentSpanId       String                              CODEC(ZSTD(1)),
    TraceState         String                              CODEC(ZSTD(1)),
    SpanName           LowCardinality(String)              CODEC(ZSTD(1)),
    SpanKind           LowCardinality(String)              CODEC(ZSTD(1)),
    ServiceName        LowCardinality(String)              CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName          String                              CODEC(ZSTD(1)),
    ScopeVersion       String                              CODEC(ZSTD(1)),
    SpanAttributes     Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration           UInt64                              CODEC(ZSTD(1)),
    StatusCode         LowCardinality(String)              CODEC(ZSTD(1)),
    StatusMessage      String                              CODEC(ZSTD(1)),
    Events Nested (
        Timestamp  DateTime64(9),
        Name       LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId    String,
        SpanId     String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id        TraceId                       TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key    mapKeys(ResourceAttributes)   TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value  mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key   mapKeys(SpanAttributes)       TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes)     TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration        Duration                      TYPE minmax GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1,
         non_replicated_deduplication_window = {dedup_window};

CREATE TABLE IF NOT EXISTS otel_traces_trace_id_ts (
    TraceId String   CODEC(ZSTD(1)),
    Start   DateTime CODEC(Delta, ZSTD(1)),
    End     DateTime CODEC(Delta, ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toDate(Start)
ORDER BY (TraceId, Start)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel_traces_trace_id_ts_mv
TO otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM otel_traces
WHERE TraceId != ''
GROUP BY TraceId;
