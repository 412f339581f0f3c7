-- Sluice core tables, the same on plain PostgreSQL and TimescaleDB.
-- Every statement is idempotent: a database that already holds these tables is left as is.

-- Metric series normalize label sets (the seed schema).
CREATE TABLE IF NOT EXISTS metric_series (
  series_id   BIGSERIAL PRIMARY KEY,
  metric_name TEXT NOT NULL,
  labels      JSONB NOT NULL,
  created_at  TIMESTAMPTZ DEFAULT now(),
  UNIQUE (metric_name, labels)
);

-- The schema registry: the seed's table_registry holds the current definition of each
-- table; sluice adds its version number and keeps every version in
-- table_registry_versions (schema = the registered definition as JSON).
CREATE TABLE IF NOT EXISTS table_registry (
  table_name TEXT PRIMARY KEY,
  schema     JSONB,
  created_at TIMESTAMPTZ DEFAULT now(),
  version    BIGINT NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- A table_registry created by hand from the seed lacks sluice's columns.
ALTER TABLE table_registry ADD COLUMN IF NOT EXISTS version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE table_registry ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ NOT NULL DEFAULT now();

CREATE TABLE IF NOT EXISTS table_registry_versions (
  table_name    TEXT NOT NULL,
  version       BIGINT NOT NULL,
  schema        JSONB NOT NULL,
  registered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (table_name, version)
);

-- WAL ranges the PostgreSQL sink has committed, written in the same transaction as the
-- rows they hold: replay after a crash skips what is already here (exactly once).
CREATE TABLE IF NOT EXISTS sluice_sink_offsets (
  wal_id       TEXT NOT NULL,
  table_name   TEXT NOT NULL,
  first_seq    BIGINT NOT NULL,
  last_seq     BIGINT NOT NULL,
  rows         BIGINT NOT NULL,
  committed_at TIMESTAMPTZ DEFAULT now(),
  PRIMARY KEY (wal_id, table_name, first_seq)
);
