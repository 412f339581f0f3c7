-- The rollup (sluice's [rollup], see the README) writes metrics_1m from the WAL. A bucket
-- gets one row per write: usually one, and one more for each point that comes after the
-- bucket was written. sum_v and count_v let those rows merge exactly: the bucket's avg is
-- sum(sum_v) / sum(count_v), its min min(min_v), its max max(max_v). metrics_1m_merged
-- does that per bucket and series. Rows written before this migration count as one point
-- each (count_v 1, sum_v = avg_v). The views qualify the columns: aliases named like them
-- (`sum(sum_v) AS sum_v`) would otherwise nest one aggregate in another.
ALTER TABLE metrics_1m
  ADD COLUMN IF NOT EXISTS sum_v Float64 DEFAULT avg_v,
  ADD COLUMN IF NOT EXISTS count_v UInt64 DEFAULT 1;

CREATE VIEW IF NOT EXISTS metrics_1m_merged AS
SELECT bucket, metric_name, labels,
       sum(metrics_1m.sum_v) / sum(metrics_1m.count_v) AS avg_v,
       max(metrics_1m.max_v) AS max_v,
       min(metrics_1m.min_v) AS min_v,
       sum(metrics_1m.sum_v) AS sum_v,
       sum(metrics_1m.count_v) AS count_v
FROM metrics_1m
GROUP BY bucket, metric_name, labels;

-- One series over a time range, one row per minute (ClickHouse holds no raw points; they
-- are in PostgreSQL and the archive):
--   SELECT * FROM metric_range(metric_name = 'cpu', labels = '{"host": "a"}',
--                              t_from = '2026-12-01 00:00:00', t_to = '2026-12-02 00:00:00')
CREATE VIEW IF NOT EXISTS metric_range AS
SELECT bucket AS time,
       sum(metrics_1m.sum_v) / sum(metrics_1m.count_v) AS avg_v,
       min(metrics_1m.min_v) AS min_v,
       max(metrics_1m.max_v) AS max_v,
       sum(metrics_1m.count_v) AS count_v
FROM metrics_1m
WHERE metric_name = {metric_name:String} AND labels = {labels:String}
  AND bucket >= {t_from:DateTime} AND bucket < {t_to:DateTime}
GROUP BY bucket
ORDER BY bucket;
