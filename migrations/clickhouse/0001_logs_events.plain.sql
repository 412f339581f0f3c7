-- logs_events as the seed design writes it, on a server without the hot_warm_cold
-- storage policy: the same columns, partitioning and order, deleted after 180 days, no
-- moves between volumes. non_replicated_deduplication_window lets sluice replay an
-- insert after a crash without duplicating rows (insert_deduplication_token).
CREATE TABLE IF NOT EXISTS logs_events (
  timestamp DateTime64(3, 'UTC'),
  service   LowCardinality(String),
  host      LowCardinality(String),
  level     LowCardinality(String),
  trace_id  String,
  span_id   String,
  message   String,
  labels    Map(String, String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (service, timestamp, trace_id)
TTL
  timestamp + INTERVAL 180 DAY DELETE
SETTINGS index_granularity = 8192, non_replicated_deduplication_window = 1000;
