//! Applies `migrations/postgres` to a database: what `sluice migrate` (and
//! `postgres.migrate_on_start`) runs.
//!
//! # What flows in and out
//! In: a connection. Out: a [`MigrationReport`] saying which path the database is on
//! (TimescaleDB or plain PostgreSQL) and which migrations were applied now.
//!
//! # The files
//! The SQL files are compiled into the binary ([`MIGRATIONS`]) and named
//! `NNNN_name[.variant].sql`, applied in order of their 4-digit version:
//! - `NNNN_name.sql` always runs;
//! - `NNNN_name.timescale.sql` runs when the database is on the TimescaleDB path;
//! - `NNNN_name.plain.sql` runs when it is on the plain PostgreSQL path.
//!
//! A fresh database takes the TimescaleDB path when the extension can really be used:
//! already created in the database, or installed (`pg_available_extensions`) and loaded
//! by `shared_preload_libraries` (being installed is not enough: `CREATE EXTENSION`
//! fails otherwise, which would stop a migration half-way). `postgres.timescaledb`
//! ([`TimescaleMode`]) says what happens when it cannot: `auto` takes plain PostgreSQL
//! when the extension is not installed and stops with a message naming
//! `shared_preload_libraries` when it is installed but not preloaded (the operator
//! meant to use it), `require` always stops, `off` takes plain PostgreSQL whatever is
//! installed. `CREATE EXTENSION IF NOT EXISTS timescaledb` runs first on that path.
//! Once a variant has been applied the path is fixed: a database set up on plain
//! PostgreSQL stays on it even if TimescaleDB is installed later, because the later
//! files of either path expect the tables the earlier ones of the same path made.
//!
//! Each version runs in its own transaction together with its `schema_migrations` row, so
//! it is applied entirely or not at all. A file whose first line is
//! `-- sluice:no-transaction` (statements that PostgreSQL or TimescaleDB refuse inside a
//! transaction block) runs statement by statement instead, statements ending with `;` at
//! the end of a line; each of its statements must be idempotent on its own. The whole run
//! holds a session advisory lock, so two sluice processes migrating one database at once
//! take turns, and the second finds nothing left to do.

use std::fmt;

pub use crate::config::TimescaleMode;

use tokio_postgres::Client;

use crate::error::SinkError;

type Result<T, E = SinkError> = std::result::Result<T, E>;

/// Which databases a migration file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `NNNN_name.sql`: every database.
    Always,
    /// `NNNN_name.timescale.sql`: databases with TimescaleDB.
    Timescale,
    /// `NNNN_name.plain.sql`: databases without it.
    Plain,
}

impl Variant {
    /// The name recorded in `schema_migrations.variant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Always => "always",
            Variant::Timescale => "timescale",
            Variant::Plain => "plain",
        }
    }

    fn applies(self, timescaledb: bool) -> bool {
        match self {
            Variant::Always => true,
            Variant::Timescale => timescaledb,
            Variant::Plain => !timescaledb,
        }
    }
}

/// One migration file, compiled in.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub variant: Variant,
    /// The file name under `migrations/postgres`.
    pub file: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// `0002_metrics`: the name reports and `schema_migrations` use.
    pub fn label(&self) -> String {
        format!("{:04}_{}", self.version, self.name)
    }

    fn no_transaction(&self) -> bool {
        self.sql
            .lines()
            .next()
            .is_some_and(|l| l.trim() == "-- sluice:no-transaction")
    }
}

macro_rules! migration {
    ($version:literal, $name:literal, $variant:ident, $file:literal) => {
        Migration {
            version: $version,
            name: $name,
            variant: Variant::$variant,
            file: $file,
            sql: include_str!(concat!("../../../../migrations/postgres/", $file)),
        }
    };
}

/// Every file in `migrations/postgres`, in order (a test checks this list against the
/// directory).
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "core", Always, "0001_core.sql"),
    migration!(2, "metrics", Timescale, "0002_metrics.timescale.sql"),
    migration!(2, "metrics", Plain, "0002_metrics.plain.sql"),
    migration!(3, "metrics_1m", Timescale, "0003_metrics_1m.timescale.sql"),
    migration!(3, "metrics_1m", Plain, "0003_metrics_1m.plain.sql"),
    migration!(
        4,
        "metrics_1m_policy",
        Timescale,
        "0004_metrics_1m_policy.timescale.sql"
    ),
    migration!(
        4,
        "metrics_1m_policy",
        Plain,
        "0004_metrics_1m_policy.plain.sql"
    ),
    migration!(5, "sluice_schema", Always, "0005_sluice_schema.sql"),
    migration!(6, "metric_range", Always, "0006_metric_range.sql"),
];

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The database is on the TimescaleDB path (hypertables, continuous aggregate);
    /// otherwise on plain PostgreSQL (daily partitions and `metrics_1m` kept by sluice).
    pub timescaledb: bool,
    /// Migrations applied by this run, e.g. `["0001_core", "0002_metrics"]`.
    pub applied: Vec<String>,
    /// Versions that were applied before this run.
    pub already: usize,
}

impl MigrationReport {
    /// Which path the database is on, in words.
    pub fn path_description(&self) -> &'static str {
        if self.timescaledb {
            "TimescaleDB"
        } else {
            "plain PostgreSQL: metrics_points partitioned by day, metrics_1m kept by sluice"
        }
    }
}

impl fmt::Display for MigrationReport {
    /// `applied 0001_core, 0002_metrics (TimescaleDB)` or `up to date (TimescaleDB)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::migration::write_report(f, &self.applied, self.path_description())
    }
}

/// Session advisory lock key (two int4 halves) held while migrating. Notices ("already
/// exists, skipping") are silenced meanwhile: re-running idempotent DDL is the point.
const LOCK_SQL: &str =
    "SET client_min_messages = warning; SELECT pg_advisory_lock(hashtext('sluice'), 1)";
const UNLOCK_SQL: &str =
    "SELECT pg_advisory_unlock(hashtext('sluice'), 1); RESET client_min_messages";

/// Applies every migration the database has not had yet; a no-op when it is up to date.
///
/// On the plain PostgreSQL path this also creates the `metrics_points` partitions for
/// today and tomorrow so rows can land right away; the maintenance task
/// ([`super::maintenance::run_once`]) creates the rest ahead.
pub async fn migrate(client: &mut Client) -> Result<MigrationReport> {
    migrate_with(client, TimescaleMode::Auto).await
}

/// [`migrate`] with the choice of `postgres.timescaledb`.
pub async fn migrate_with(client: &mut Client, mode: TimescaleMode) -> Result<MigrationReport> {
    client
        .batch_execute(LOCK_SQL)
        .await
        .map_err(|e| pg_error("cannot take the migration lock", e))?;
    let result = migrate_locked(client, mode).await;
    let unlocked = client.batch_execute(UNLOCK_SQL).await;
    let report = result?;
    // A failed unlock after a successful run only matters if the connection is kept, and
    // then the lock goes away with it anyway.
    if let Err(e) = unlocked {
        tracing::warn!(error = %describe(&e), "cannot release the migration lock");
    }
    Ok(report)
}

async fn migrate_locked(client: &mut Client, mode: TimescaleMode) -> Result<MigrationReport> {
    // The bookkeeping of migrations lives in the `sluice` schema (0005_sluice_schema.sql
    // moves the rest); one made in the current schema by an earlier sluice moves there,
    // one of another tool's (Rails, golang-migrate name theirs the same) stays.
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS sluice;
             DO $$
             BEGIN
               IF to_regclass('sluice.schema_migrations') IS NULL AND EXISTS (
                    SELECT 1 FROM information_schema.columns
                    WHERE table_schema = current_schema() AND table_name = 'schema_migrations'
                      AND column_name = 'variant') THEN
                 EXECUTE format('ALTER TABLE %I.schema_migrations SET SCHEMA sluice',
                                current_schema());
               END IF;
             END
             $$",
        )
        .await
        .map_err(|e| pg_error("cannot create the sluice schema", e))?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS sluice.schema_migrations (
               version    INT PRIMARY KEY,
               name       TEXT NOT NULL,
               variant    TEXT NOT NULL,
               applied_at TIMESTAMPTZ DEFAULT now()
             )",
        )
        .await
        .map_err(|e| pg_error("cannot create schema_migrations", e))?;
    let rows = client
        .query("SELECT version, variant FROM sluice.schema_migrations", &[])
        .await
        .map_err(|e| pg_error("cannot read schema_migrations", e))?;
    let applied: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();

    let decided = applied.iter().find_map(|(_, v)| match v.as_str() {
        "timescale" => Some(true),
        "plain" => Some(false),
        _ => None,
    });
    let usable = timescaledb_usability(client).await?;
    let timescaledb = match (decided, mode) {
        (Some(true), TimescaleMode::Off) => {
            return Err(SinkError::Precondition(
                "this database was set up on TimescaleDB (a database keeps its path), but \
                 postgres.timescaledb is \"off\": set it to \"auto\""
                    .into(),
            ))
        }
        (Some(false), TimescaleMode::Require) => {
            return Err(SinkError::Precondition(
                "this database was set up on plain PostgreSQL (a database keeps its path), \
                 but postgres.timescaledb is \"require\": migrate a new database, or set it \
                 to \"auto\""
                    .into(),
            ))
        }
        (Some(d), _) => d,
        (None, TimescaleMode::Off) => false,
        (None, TimescaleMode::Auto) if usable == Usability::NotInstalled => false,
        (None, _) => true,
    };
    if decided == Some(false) && usable == Usability::Usable {
        tracing::info!(
            "TimescaleDB is available but this database was set up on plain PostgreSQL; it stays there"
        );
    }
    if timescaledb {
        match usable {
            Usability::Usable => {}
            Usability::NotInstalled => {
                return Err(SinkError::Precondition(if decided == Some(true) {
                    "this database was migrated with TimescaleDB, but the timescaledb \
                     extension is no longer available on the server"
                        .into()
                } else {
                    "postgres.timescaledb is \"require\" but the timescaledb extension is \
                     not installed on the server (pg_available_extensions)"
                        .into()
                }))
            }
            Usability::NotPreloaded => {
                return Err(SinkError::Precondition(
                    "the timescaledb extension is installed but not loaded: add timescaledb \
                     to shared_preload_libraries in postgresql.conf and restart PostgreSQL, \
                     or set postgres.timescaledb = \"off\" to use plain PostgreSQL"
                        .into(),
                ))
            }
        }
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            .await
            .map_err(|e| {
                SinkError::Precondition(format!(
                    "CREATE EXTENSION timescaledb failed: {}",
                    describe(&e)
                ))
            })?;
    }

    let mut report = MigrationReport {
        timescaledb,
        applied: Vec::new(),
        already: 0,
    };
    let mut versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    versions.dedup();
    for version in versions {
        if applied.iter().any(|(v, _)| *v == version) {
            report.already += 1;
            continue;
        }
        let Some(m) = MIGRATIONS
            .iter()
            .find(|m| m.version == version && m.variant.applies(timescaledb))
        else {
            continue;
        };
        apply(client, m).await?;
        tracing::info!(migration = %m.label(), variant = m.variant.as_str(), "migration applied");
        report.applied.push(m.label());
    }

    if !timescaledb {
        let today = chrono::Utc::now();
        super::maintenance::ensure_partitions(client, today, today + chrono::Duration::days(1))
            .await?;
    }
    Ok(report)
}

async fn apply(client: &mut Client, m: &Migration) -> Result<()> {
    let what = |e| pg_error(&format!("migration {}", m.file), e);
    let record =
        "INSERT INTO sluice.schema_migrations (version, name, variant) VALUES ($1, $2, $3)";
    if m.no_transaction() {
        for statement in split_statements(m.sql) {
            client.batch_execute(&statement).await.map_err(what)?;
        }
        client
            .execute(record, &[&m.version, &m.name, &m.variant.as_str()])
            .await
            .map_err(what)?;
        return Ok(());
    }
    let tx = client.transaction().await.map_err(what)?;
    tx.batch_execute(m.sql).await.map_err(what)?;
    tx.execute(record, &[&m.version, &m.name, &m.variant.as_str()])
        .await
        .map_err(what)?;
    tx.commit().await.map_err(what)
}

/// Splits a no-transaction file into statements: a statement ends with `;` at the end of
/// a line. Comment-only pieces are dropped.
fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        current.push_str(line);
        current.push('\n');
        if line.trim_end().ends_with(';') {
            out.push(std::mem::take(&mut current));
        }
    }
    out.push(current);
    out.retain(|s| {
        s.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
    });
    out
}

/// Whether TimescaleDB can be used in a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usability {
    /// Created in the database, or installed and preloaded.
    Usable,
    /// Not in `pg_available_extensions`.
    NotInstalled,
    /// Installed, but not in `shared_preload_libraries`.
    NotPreloaded,
}

/// Finds out whether TimescaleDB can be used here: `SHOW shared_preload_libraries`, or,
/// where this role may not read it, a `CREATE EXTENSION` tried in a transaction that is
/// rolled back.
pub async fn timescaledb_usability(client: &mut Client) -> Result<Usability> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
                    EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
            &[],
        )
        .await
        .map_err(|e| pg_error("cannot list available extensions", e))?;
    let (available, created): (bool, bool) = (row.get(0), row.get(1));
    if !available && !created {
        return Ok(Usability::NotInstalled);
    }
    match client
        .query_one("SELECT current_setting('shared_preload_libraries')", &[])
        .await
    {
        Ok(row) => {
            let libs: String = row.get(0);
            let preloaded = libs.split(',').any(|l| {
                let l = l.trim().trim_matches('"');
                l.rsplit('/').next() == Some("timescaledb")
            });
            Ok(if preloaded {
                Usability::Usable
            } else {
                Usability::NotPreloaded
            })
        }
        Err(_) if created => Ok(Usability::Usable),
        Err(_) => {
            let tx = client
                .transaction()
                .await
                .map_err(|e| pg_error("begin", e))?;
            let tried = tx
                .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                .await;
            let _ = tx.rollback().await;
            Ok(match tried {
                Ok(()) => Usability::Usable,
                Err(_) => Usability::NotPreloaded,
            })
        }
    }
}

/// Whether the timescaledb extension is installed in this database (`pg_extension`).
pub async fn timescaledb_enabled(client: &Client) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
            &[],
        )
        .await
        .map_err(|e| pg_error("cannot read pg_extension", e))?
        .get(0))
}

/// A PostgreSQL error in words: the server's message, SQLSTATE, detail and hint, or the
/// client-side error with its cause (`tokio_postgres::Error`'s own text is only "db error").
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A failed connect, with what it was for.
pub(crate) fn connect_error(context: &str, source: super::ConnectError) -> SinkError {
    SinkError::PgConnect {
        context: context.to_string(),
        source,
    }
}

/// A PostgreSQL error with what Sluice was doing; [`SinkError`] classifies it.
pub(crate) fn pg_error(context: &str, e: tokio_postgres::Error) -> SinkError {
    SinkError::postgres(context, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flight_schema::Classify;
    use sluice_test_support::pg::{Flavor, TestDb};
    use sluice_test_support::pg_test;
    use tokio_postgres::error::SqlState;

    #[test]
    fn the_list_matches_the_directory() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/postgres");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = MIGRATIONS.iter().map(|m| m.file.to_string()).collect();
        listed.sort();
        assert_eq!(
            listed, on_disk,
            "MIGRATIONS must list every file in {dir:?}"
        );
        for m in MIGRATIONS {
            let suffix = match m.variant {
                Variant::Always => ".sql",
                Variant::Timescale => ".timescale.sql",
                Variant::Plain => ".plain.sql",
            };
            assert_eq!(m.file, format!("{}{suffix}", m.label()));
        }
        // In order, and every version covers both paths exactly once.
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version <= w[1].version));
        let mut versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        versions.dedup();
        for v in versions {
            for timescale in [true, false] {
                let n = MIGRATIONS
                    .iter()
                    .filter(|m| m.version == v && m.variant.applies(timescale))
                    .count();
                assert_eq!(n, 1, "version {v}, timescale={timescale}");
            }
        }
    }

    #[test]
    fn timescale_files_keep_the_seed_statements() {
        let all: String = MIGRATIONS
            .iter()
            .filter(|m| m.variant == Variant::Timescale)
            .map(|m| m.sql)
            .collect();
        for stmt in [
            "SELECT create_hypertable('metrics_points', 'time', if_not_exists => TRUE);",
            "ALTER TABLE metrics_points SET (timescaledb.compress);",
            "SELECT add_compression_policy('metrics_points', INTERVAL '7 days');",
            "SELECT add_retention_policy('metrics_points', INTERVAL '30 days');",
            "WITH (timescaledb.continuous) AS\nSELECT time_bucket('1 minute', mp.time) AS bucket,",
            "start_offset => INTERVAL '2 hours',",
            "end_offset   => INTERVAL '1 minute',",
            "schedule_interval => INTERVAL '1 minute');",
            "SELECT create_hypertable('metrics_events', 'time');",
        ] {
            assert!(all.contains(stmt), "missing: {stmt}");
        }
        let cagg = MIGRATIONS
            .iter()
            .find(|m| m.file == "0003_metrics_1m.timescale.sql")
            .unwrap();
        assert!(cagg.no_transaction());
        let stmts = split_statements(cagg.sql);
        assert_eq!(stmts.len(), 1, "{stmts:?}");
        assert!(stmts[0].contains("GROUP BY bucket, ms.metric_name, ms.labels;"));
    }

    #[test]
    fn report_wording() {
        let r = MigrationReport {
            timescaledb: false,
            applied: vec!["0001_core".into(), "0002_metrics".into()],
            already: 0,
        };
        assert_eq!(
            r.to_string(),
            "applied 0001_core, 0002_metrics (plain PostgreSQL: metrics_points partitioned by day, metrics_1m kept by sluice)"
        );
        let r = MigrationReport {
            timescaledb: true,
            applied: vec![],
            already: 4,
        };
        assert_eq!(r.to_string(), "up to date (TimescaleDB)");
    }

    async fn columns(client: &Client, table: &str) -> Vec<(String, String, bool)> {
        client
            .query(
                "SELECT column_name::text, data_type::text, is_nullable = 'YES'
                 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1
                 ORDER BY ordinal_position",
                &[&table],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    fn cols(spec: &[(&str, &str, bool)]) -> Vec<(String, String, bool)> {
        spec.iter()
            .map(|(n, t, null)| (n.to_string(), t.to_string(), *null))
            .collect()
    }

    pg_test! {
    #[tokio::test]
    async fn each_path_applies_once_and_rows_land(flavor) {
        let db = TestDb::on(flavor).await;
        let ts = flavor == Flavor::Timescale;
        let variant = if ts { "timescale" } else { "plain" };
        let mut client = db.client().await;
        let available = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0);
        assert_eq!(available, ts, "TimescaleDB is installed only in its flavor");

        let report = migrate(&mut client).await.unwrap();
        assert_eq!(
            report,
            MigrationReport {
                timescaledb: ts,
                applied: vec![
                    "0001_core".into(),
                    "0002_metrics".into(),
                    "0003_metrics_1m".into(),
                    "0004_metrics_1m_policy".into(),
                    "0005_sluice_schema".into(),
                    "0006_metric_range".into()
                ],
                already: 0
            }
        );
        assert_eq!(timescaledb_enabled(&client).await.unwrap(), ts);

        // A second run (and a concurrent pair) changes nothing.
        let again = migrate(&mut client).await.unwrap();
        assert_eq!((again.applied.len(), again.already), (0, 6));
        assert_eq!(
            again.to_string(),
            format!("up to date ({})", again.path_description())
        );
        let mut c2 = db.client().await;
        let mut c3 = db.client().await;
        let (a, b) = tokio::join!(migrate(&mut c2), migrate(&mut c3));
        assert!(a.unwrap().applied.is_empty() && b.unwrap().applied.is_empty());
        let recorded: Vec<(i32, String, String)> = client
            .query(
                "SELECT version, name, variant FROM sluice.schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            recorded,
            vec![
                (1, "core".into(), "always".into()),
                (2, "metrics".into(), variant.into()),
                (3, "metrics_1m".into(), variant.into()),
                (4, "metrics_1m_policy".into(), variant.into()),
                (5, "sluice_schema".into(), "always".into()),
                (6, "metric_range".into(), "always".into()),
            ]
        );

        // The seed's columns.
        assert_eq!(
            columns(&client, "metric_series").await,
            cols(&[
                ("series_id", "bigint", false),
                ("metric_name", "text", false),
                ("labels", "jsonb", false),
                ("created_at", "timestamp with time zone", true),
            ])
        );
        assert_eq!(
            columns(&client, "metrics_points").await,
            cols(&[
                ("time", "timestamp with time zone", false),
                ("series_id", "bigint", false),
                ("value", "double precision", false),
            ])
        );
        assert_eq!(
            columns(&client, "metrics_events").await,
            cols(&[
                ("time", "timestamp with time zone", false),
                ("app", "text", true),
                ("host", "text", true),
                ("labels", "jsonb", true),
                ("value", "double precision", true),
                ("trace_id", "text", true),
                ("level", "text", true),
            ])
        );
        let m1m: Vec<String> = columns(&client, "metrics_1m")
            .await
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(
            m1m,
            ["bucket", "metric_name", "labels", "avg_v", "max_v", "min_v"]
        );
        let reg: Vec<String> = columns(&client, "table_registry")
            .await
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(
            reg,
            [
                "table_name",
                "schema",
                "created_at",
                "version",
                "updated_at"
            ]
        );
        // Sluice's own tables are in the sluice schema, none in the current one.
        for (table, n) in [
            ("sluice_sink_offsets", 6),
            ("table_registry_versions", 4),
            ("schema_migrations", 4),
        ] {
            assert!(columns(&client, table).await.is_empty(), "{table}");
            let in_sluice: i64 = client
                .query_one(
                    "SELECT count(*) FROM information_schema.columns
                     WHERE table_schema = 'sluice' AND table_name = $1",
                    &[&table],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(in_sluice, n, "{table}");
        }
        let kind: String = client
            .query_one(
                "SELECT relkind::text FROM pg_class WHERE oid = 'metrics_points'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if ts {
            assert_eq!(kind, "r", "metrics_points is a hypertable");
            let hypertables: Vec<String> = client
                .query(
                    "SELECT hypertable_name::text FROM timescaledb_information.hypertables
                     ORDER BY 1",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(hypertables, ["metrics_events", "metrics_points"]);
            let policies: Vec<(String, String)> = client
                .query(
                    "SELECT proc_name::text, coalesce(hypertable_name::text, '')
                     FROM timescaledb_information.jobs WHERE proc_name LIKE 'policy_%'
                       AND proc_name NOT IN ('policy_job_stat_history_retention', 'policy_telemetry')
                     ORDER BY 1",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let names: Vec<&str> = policies.iter().map(|p| p.0.as_str()).collect();
            assert_eq!(
                names,
                ["policy_compression", "policy_refresh_continuous_aggregate", "policy_retention"],
                "{policies:?}"
            );
            let cagg: i64 = client
                .query_one(
                    "SELECT count(*) FROM timescaledb_information.continuous_aggregates
                     WHERE view_name = 'metrics_1m'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(cagg, 1, "metrics_1m is a continuous aggregate");
        } else {
            assert_eq!(kind, "p", "metrics_points is range-partitioned");
        }

        // Today's partition exists, so a point lands right after migrating; the label
        // set's uniqueness holds.
        client
            .batch_execute(
                "INSERT INTO metric_series (metric_name, labels) VALUES ('cpu', '{\"host\":\"a\"}');
                 INSERT INTO metrics_points SELECT now(), series_id, 1.5 FROM metric_series;
                 INSERT INTO metrics_events (time, app, value) VALUES (now(), 'api', 2);",
            )
            .await
            .unwrap();
        let dup = client
            .batch_execute(
                "INSERT INTO metric_series (metric_name, labels) VALUES ('cpu', '{\"host\": \"a\"}')",
            )
            .await
            .unwrap_err();
        assert_eq!(dup.code(), Some(&SqlState::UNIQUE_VIOLATION));
        let fk = client
            .batch_execute("INSERT INTO metrics_points VALUES (now(), 999, 1)")
            .await
            .unwrap_err();
        assert_eq!(fk.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION));
    }
    }

    pg_test! {
    #[tokio::test]
    async fn an_earlier_sluices_tables_move_into_the_sluice_schema_with_their_rows(flavor) {
        // A database set up before the sluice schema existed: its bookkeeping tables are
        // in the current schema, with rows; another tool's schema_migrations would stay.
        let db = TestDb::on(flavor).await;
        let mut client = db.client().await;
        let core = MIGRATIONS.iter().find(|m| m.version == 1).unwrap();
        client
            .batch_execute(&format!(
                "{}
                 CREATE TABLE schema_migrations (version INT PRIMARY KEY, name TEXT NOT NULL,
                   variant TEXT NOT NULL, applied_at TIMESTAMPTZ DEFAULT now());
                 INSERT INTO schema_migrations VALUES (1, 'core', 'always', now());
                 INSERT INTO sluice_sink_offsets VALUES ('w', 't', 1, 5, 50, now());
                 INSERT INTO table_registry_versions VALUES ('t', 1, '{{}}', now());",
                core.sql
            ))
            .await
            .unwrap();
        migrate(&mut client).await.unwrap();
        let count = |sql: &'static str| {
            let c = &client;
            async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        assert_eq!(
            count("SELECT count(*) FROM sluice.sluice_sink_offsets").await,
            1
        );
        assert_eq!(
            count("SELECT count(*) FROM sluice.table_registry_versions").await,
            1
        );
        // 0001 is not applied again: the moved bookkeeping remembered it.
        assert!(count("SELECT count(*) FROM sluice.schema_migrations").await >= 2);
        assert_eq!(
            count(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()
                 AND table_name IN ('sluice_sink_offsets', 'table_registry_versions', 'schema_migrations')"
            )
            .await,
            0
        );
    }
    }

    pg_test! {
    #[tokio::test]
    async fn another_tools_schema_migrations_is_left_alone(flavor) {
        let db = TestDb::on(flavor).await;
        let mut client = db.client().await;
        client
            .batch_execute(
                "CREATE TABLE schema_migrations (version VARCHAR PRIMARY KEY);
                 INSERT INTO schema_migrations VALUES ('20240101000000');",
            )
            .await
            .unwrap();
        migrate(&mut client).await.unwrap();
        let theirs: String = client
            .query_one("SELECT version FROM public.schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(theirs, "20240101000000");
    }
    }

    pg_test! {
    #[tokio::test]
    async fn a_failing_migration_leaves_nothing_behind_and_errors_are_classified(flavor) {
        let db = TestDb::on(flavor).await;
        let mut client = db.client().await;
        // A table in the way with the wrong shape: 0002's index on series_id fails, so
        // version 2 must not be recorded and nothing of it may remain.
        client
            .batch_execute("CREATE TABLE metrics_points (time timestamptz)")
            .await
            .unwrap();
        let e = migrate(&mut client).await.unwrap_err();
        let file = if flavor == Flavor::Timescale {
            "migration 0002_metrics.timescale.sql"
        } else {
            "migration 0002_metrics.plain.sql"
        };
        assert!(e.to_string().contains(file), "{e}");
        let versions: Vec<i32> = client
            .query("SELECT version FROM sluice.schema_migrations", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(versions, vec![1]);
        let events: Option<String> = client
            .query_one("SELECT to_regclass('metrics_events')::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(events, None, "0002 rolled back as a whole");
        // The lock was released: another connection can migrate once the obstacle is gone.
        client
            .batch_execute("DROP TABLE metrics_points")
            .await
            .unwrap();
        let mut other = db.client().await;
        let r = tokio::time::timeout(std::time::Duration::from_secs(30), migrate(&mut other))
            .await
            .expect("the migration lock was left held")
            .unwrap();
        assert_eq!((r.already, r.applied.len()), (1, 5));

        let missing = client
            .query("SELECT * FROM no_such_table", &[])
            .await
            .unwrap_err();
        let e = pg_error("x", missing);
        assert_eq!(e.class(), flight_schema::ErrorClass::InvalidInput);
        let m = sluice_core::error::Error::from(e);
        assert!(matches!(
            m,
            sluice_core::error::Error::FailedPrecondition(ref m)
                if m.contains("no_such_table") && m.contains("sluice migrate")
        ), "{m:?}");
        drop(other);
        drop(client);
        let closed = crate::postgres::connect("postgresql://postgres@127.0.0.1:1/postgres")
            .await
            .unwrap_err();
        assert!(matches!(
            sluice_core::error::Error::from(connect_error("x", closed)),
            sluice_core::error::Error::Unavailable(_)
        ));
    }
    }

    /// Migrates a fresh database of `flavor` with `mode`: the path taken, or the error.
    async fn path_with(flavor: Flavor, mode: TimescaleMode) -> std::result::Result<bool, String> {
        let db = TestDb::on(flavor).await;
        let mut client = db.client().await;
        migrate_with(&mut client, mode)
            .await
            .map(|r| r.timescaledb)
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn postgres_timescaledb_decides_the_path_on_plain_postgres() {
        assert_eq!(
            path_with(Flavor::Postgres, TimescaleMode::Auto).await,
            Ok(false)
        );
        assert_eq!(
            path_with(Flavor::Postgres, TimescaleMode::Off).await,
            Ok(false)
        );
        let e = path_with(Flavor::Postgres, TimescaleMode::Require)
            .await
            .unwrap_err();
        assert!(
            e.contains("\"require\"") && e.contains("not installed"),
            "{e}"
        );
    }

    #[tokio::test]
    #[cfg_attr(not(timescaledb_tests), ignore = "needs ../shared/timescaledb")]
    async fn postgres_timescaledb_decides_the_path_on_timescaledb() {
        assert_eq!(
            path_with(Flavor::Timescale, TimescaleMode::Auto).await,
            Ok(true)
        );
        assert_eq!(
            path_with(Flavor::Timescale, TimescaleMode::Require).await,
            Ok(true)
        );
        assert_eq!(
            path_with(Flavor::Timescale, TimescaleMode::Off).await,
            Ok(false)
        );
        // A database keeps its path: `off` does not pull one off TimescaleDB.
        let db = TestDb::on(Flavor::Timescale).await;
        let mut client = db.client().await;
        migrate_with(&mut client, TimescaleMode::Auto)
            .await
            .unwrap();
        let e = migrate_with(&mut client, TimescaleMode::Off)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("set up on TimescaleDB"), "{e}");
    }

    #[tokio::test]
    #[cfg_attr(not(timescaledb_tests), ignore = "needs ../shared/timescaledb")]
    async fn installed_but_not_preloaded_timescaledb_is_named_not_half_migrated() {
        // Issue 11: choosing the path from pg_available_extensions alone failed in the
        // middle of a migration.
        for mode in [TimescaleMode::Auto, TimescaleMode::Require] {
            let e = path_with(Flavor::TimescaleNotPreloaded, mode)
                .await
                .unwrap_err();
            assert!(
                e.contains("shared_preload_libraries") && e.contains("postgres.timescaledb"),
                "{mode:?}: {e}"
            );
        }
        let db = TestDb::on(Flavor::TimescaleNotPreloaded).await;
        let mut client = db.client().await;
        let _ = migrate_with(&mut client, TimescaleMode::Auto).await;
        let versions: i64 = client
            .query_one("SELECT count(*) FROM sluice.schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(versions, 0, "nothing was applied before the refusal");
        // The operator allows plain PostgreSQL.
        let report = migrate_with(&mut client, TimescaleMode::Off).await.unwrap();
        assert!(!report.timescaledb);
        assert_eq!(report.applied.len(), 6);
    }

    #[test]
    fn statements_split_at_line_ends() {
        let s = split_statements(
            "-- sluice:no-transaction\n-- c\nSELECT 'a;b';\nSELECT\n  2;\n-- trailing\n",
        );
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].contains("SELECT 'a;b';"));
        assert!(s[1].contains("  2;"));
    }
}
