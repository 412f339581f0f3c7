-- metrics_1m on plain PostgreSQL: a table with the continuous aggregate's columns that
-- sluice's maintenance task refreshes (buckets in [now - 2 hours, now - 1 minute), the
-- TimescaleDB path's refresh policy) from metrics_points joined with metric_series.

CREATE TABLE IF NOT EXISTS metrics_1m (
  bucket      TIMESTAMPTZ NOT NULL,
  metric_name TEXT NOT NULL,
  labels      JSONB NOT NULL,
  avg_v       DOUBLE PRECISION,
  max_v       DOUBLE PRECISION,
  min_v       DOUBLE PRECISION,
  PRIMARY KEY (bucket, metric_name, labels)
);
