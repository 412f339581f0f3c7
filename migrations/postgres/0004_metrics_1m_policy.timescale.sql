-- The continuous aggregate's refresh policy (the seed schema's statement).
-- Runs in one transaction with its schema_migrations row.

SELECT add_continuous_aggregate_policy('metrics_1m',
  start_offset => INTERVAL '2 hours',
  end_offset   => INTERVAL '1 minute',
  schedule_interval => INTERVAL '1 minute');
