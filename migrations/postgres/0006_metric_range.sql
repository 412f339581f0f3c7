-- One series over a time range from the finest tier that still holds it: raw points from
-- metrics_points from the series' first minute that still has all its raw points on, and
-- the metrics_1m buckets before it (raw points are dropped after postgres.retention;
-- metrics_1m stays). No bucket is read from both tiers and none is skipped.
--
--   SELECT * FROM sluice_metric_range('cpu', '{"host": "a"}', now() - interval '90 days', now());
--
-- Each row: the point's time (the bucket's start for rollup rows), its value (the
-- bucket's avg), min and max (the value itself for raw points), the points behind it and
-- the tier it came from ('raw' or '1m').
CREATE OR REPLACE FUNCTION sluice_metric_range(
  p_metric_name TEXT,
  p_labels      JSONB,
  p_from        TIMESTAMPTZ,
  p_to          TIMESTAMPTZ)
RETURNS TABLE ("time" TIMESTAMPTZ, value DOUBLE PRECISION, min_v DOUBLE PRECISION,
               max_v DOUBLE PRECISION, points BIGINT, tier TEXT)
LANGUAGE sql STABLE AS $$
  WITH s AS (
    SELECT ms.series_id FROM metric_series ms
    WHERE ms.metric_name = p_metric_name AND ms.labels = p_labels
  ), cut AS (
    -- The first minute boundary at or after the series' oldest raw point.
    SELECT date_trunc('minute', min(mp.time) + interval '1 minute' - interval '1 microsecond') AS t
    FROM metrics_points mp JOIN s ON s.series_id = mp.series_id
  )
  SELECT r."time", r.value, r.min_v, r.max_v, r.points, r.tier FROM (
    SELECT mp."time", mp.value, mp.value AS min_v, mp.value AS max_v, 1::bigint AS points,
           'raw'::text AS tier
    FROM metrics_points mp JOIN s ON s.series_id = mp.series_id, cut
    WHERE mp.time >= p_from AND mp.time < p_to AND mp.time >= cut.t
    UNION ALL
    SELECT m.bucket, m.avg_v, m.min_v, m.max_v, NULL::bigint, '1m'
    FROM metrics_1m m, cut
    WHERE m.metric_name = p_metric_name AND m.labels = p_labels
      AND m.bucket >= p_from AND m.bucket < p_to
      AND (cut.t IS NULL OR m.bucket < cut.t)
  ) r
  ORDER BY r."time"
$$;
