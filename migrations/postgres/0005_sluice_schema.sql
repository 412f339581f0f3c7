-- Sluice's own bookkeeping lives in its own schema, `sluice`, out of reach of the tables
-- clients register (a registered table named like one of these was written to by the
-- sinks: forged offsets made the PostgreSQL sink skip rows, a forged registry row made
-- every start fail). Tables made by earlier versions in the current schema move there.
-- The seed's tables (metric_series, metrics_points, metrics_1m, metrics_events,
-- table_registry) stay where the seed puts them; their names are refused at
-- registration.
CREATE SCHEMA IF NOT EXISTS sluice;

DO $$
BEGIN
  IF to_regclass(format('%I.sluice_sink_offsets', current_schema())) IS NOT NULL
     AND to_regclass('sluice.sluice_sink_offsets') IS NULL THEN
    EXECUTE format('ALTER TABLE %I.sluice_sink_offsets SET SCHEMA sluice', current_schema());
  END IF;
  IF to_regclass(format('%I.table_registry_versions', current_schema())) IS NOT NULL
     AND to_regclass('sluice.table_registry_versions') IS NULL THEN
    EXECUTE format('ALTER TABLE %I.table_registry_versions SET SCHEMA sluice', current_schema());
  END IF;
END
$$;

CREATE TABLE IF NOT EXISTS sluice.table_registry_versions (
  table_name    TEXT NOT NULL,
  version       BIGINT NOT NULL,
  schema        JSONB NOT NULL,
  registered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (table_name, version)
);

CREATE TABLE IF NOT EXISTS sluice.sluice_sink_offsets (
  wal_id       TEXT NOT NULL,
  table_name   TEXT NOT NULL,
  first_seq    BIGINT NOT NULL,
  last_seq     BIGINT NOT NULL,
  rows         BIGINT NOT NULL,
  committed_at TIMESTAMPTZ DEFAULT now(),
  PRIMARY KEY (wal_id, table_name, first_seq)
);
