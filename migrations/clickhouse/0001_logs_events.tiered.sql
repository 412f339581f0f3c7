-- logs_events as the seed design writes it, on the hot_warm_cold storage policy
-- (deploy/clickhouse/storage.xml): 7 days hot, then warm, then cold (S3) after 30 days,
-- deleted after 180 days. non_replicated_deduplication_window lets sluice replay an
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
  timestamp + INTERVAL 7 DAY  TO VOLUME 'warm',
  timestamp + INTERVAL 30 DAY TO VOLUME 'cold',
  timestamp + INTERVAL 180 DAY DELETE
SETTINGS storage_policy = 'hot_warm_cold', index_granularity = 8192, non_replicated_deduplication_window = 1000;
