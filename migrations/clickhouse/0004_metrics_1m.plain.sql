-- metrics_1m (1-minute metric aggregates) as the seed design writes it, without the
-- hot_warm_cold storage policy: deleted after 365 days.
CREATE TABLE IF NOT EXISTS metrics_1m (
  bucket      DateTime('UTC'),
  metric_name LowCardinality(String),
  labels      String,
  avg_v       Float64,
  max_v       Float64,
  min_v       Float64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (metric_name, labels, bucket)
TTL
  bucket + INTERVAL 365 DAY DELETE
SETTINGS non_replicated_deduplication_window = 1000;
