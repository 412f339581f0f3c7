-- span_events as the seed design writes it, without the hot_warm_cold storage policy;
-- see 0001_logs_events.plain.sql.
CREATE TABLE IF NOT EXISTS span_events (
  trace_id String,
  span_id  String,
  ts       DateTime64(6, 'UTC'),
  name     LowCardinality(String),
  attr     Map(String, String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (trace_id, span_id, ts)
TTL
  ts + INTERVAL 180 DAY DELETE
SETTINGS non_replicated_deduplication_window = 1000;
