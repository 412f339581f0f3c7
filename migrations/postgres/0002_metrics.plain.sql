-- Metric points and events on plain PostgreSQL (no TimescaleDB).
-- metrics_points is range-partitioned by day on time: sluice's maintenance task creates the
-- partitions metrics_points_pYYYYMMDD ahead (postgres.partition_days_ahead), the sink
-- creates any missing one before it copies rows into it, and partitions wholly older than
-- postgres.retention are dropped (the TimescaleDB path's retention policy).

CREATE TABLE IF NOT EXISTS metrics_points (
  time      TIMESTAMPTZ NOT NULL,
  series_id BIGINT NOT NULL REFERENCES metric_series(series_id),
  value     DOUBLE PRECISION NOT NULL
) PARTITION BY RANGE (time);

CREATE INDEX IF NOT EXISTS idx_mp_series_time ON metrics_points (series_id, time DESC);

-- Real-time events: a plain table with the index create_hypertable would have made.
CREATE TABLE IF NOT EXISTS metrics_events (
  time        TIMESTAMPTZ NOT NULL,
  app         TEXT,
  host        TEXT,
  labels      JSONB,
  value       DOUBLE PRECISION,
  trace_id    TEXT,
  level       TEXT
);
CREATE INDEX IF NOT EXISTS metrics_events_time_idx ON metrics_events (time DESC);
