-- sluice:no-transaction
-- A continuous aggregate created WITH DATA (the default) cannot run inside a transaction
-- block, so this file runs statement by statement; each statement is idempotent.

-- Continuous aggregate for 1m downsampling
CREATE MATERIALIZED VIEW IF NOT EXISTS metrics_1m
WITH (timescaledb.continuous) AS
SELECT time_bucket('1 minute', mp.time) AS bucket,
       ms.metric_name,
       ms.labels,
       avg(mp.value) AS avg_v,
       max(mp.value) AS max_v,
       min(mp.value) AS min_v
FROM metrics_points mp
JOIN metric_series ms ON ms.series_id = mp.series_id
GROUP BY bucket, ms.metric_name, ms.labels;
