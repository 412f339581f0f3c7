-- Metric points and events on TimescaleDB (the seed schema's statements).
-- Runs in one transaction with its schema_migrations row.

-- Atomic metric points
CREATE TABLE IF NOT EXISTS metrics_points (
  time      TIMESTAMPTZ NOT NULL,
  series_id BIGINT NOT NULL REFERENCES metric_series(series_id),
  value     DOUBLE PRECISION NOT NULL
);
SELECT create_hypertable('metrics_points', 'time', if_not_exists => TRUE);

CREATE INDEX IF NOT EXISTS idx_mp_series_time ON metrics_points (series_id, time DESC);
ALTER TABLE metrics_points SET (timescaledb.compress);
SELECT add_compression_policy('metrics_points', INTERVAL '7 days');
SELECT add_retention_policy('metrics_points', INTERVAL '30 days');

-- Real-time events
CREATE TABLE IF NOT EXISTS metrics_events (
  time        TIMESTAMPTZ NOT NULL,
  app         TEXT,
  host        TEXT,
  labels      JSONB,
  value       DOUBLE PRECISION,
  trace_id    TEXT,
  level       TEXT
);
SELECT create_hypertable('metrics_events', 'time');
