//! Upkeep of the plain-PostgreSQL fallback: what TimescaleDB's policies do on the other
//! path (where [`super::jobs`] watches the policies' jobs instead).
//!
//! # What flows in and out
//! In: a connection, [`PostgresConfig`] and the current time. Out: DDL and a refresh on
//! the database, and a [`MaintenanceReport`] of what changed. On the TimescaleDB path
//! (`metrics_points` is a hypertable, not a partitioned table) everything here is a no-op:
//! the extension's own policies do the work.
//!
//! # What it keeps
//! - **Partitions.** `metrics_points` is range-partitioned by UTC day into
//!   `metrics_points_pYYYYMMDD` (`[day 00:00Z, day+1 00:00Z)`). [`run_once`] creates today's
//!   and the next `partition_days_ahead` days'; the sink calls [`ensure_partitions`] (or
//!   [`ensure_partitions_for_days`]) before copying rows for other days, since a row
//!   without a partition is refused.
//! - **Retention.** Partitions whose upper bound is at or before `now - retention` are
//!   dropped (the seed's `add_retention_policy(.., INTERVAL '30 days')`). Only partitions
//!   named as above are touched; a partition someone added by hand is left alone.
//! - **`metrics_1m`.** Buckets in `[now - 2 hours, now - 1 minute)` (rounded down to the
//!   minute) are recomputed from `metrics_points` joined with `metric_series`, in one
//!   transaction, like the seed's continuous aggregate policy (`start_offset => 2 hours`,
//!   `end_offset => 1 minute`); older buckets stay as they are.
//!
//! DDL and the refresh each take a transaction-scoped advisory lock, so several sluice
//! processes (or the maintenance task and a sink) can run them against one database at
//! once. Every statement is sent with `simple_query`, which runs a multi-statement string
//! in one implicit transaction, so a shared `&Client` is enough: no explicit transaction
//! is left open on it.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::migrate::{describe, pg_error};
use super::quote_ident;
use crate::config::PostgresConfig;
use crate::error::SinkError;
use flight_schema::Classify;

type Result<T, E = SinkError> = std::result::Result<T, E>;

/// Prefix of the daily partitions; the rest of the name is the day, `YYYYMMDD`.
pub const PARTITION_PREFIX: &str = "metrics_points_p";

/// Most days one [`ensure_partitions`] range may span; wider ranges usually mean a stray
/// timestamp, and would otherwise create thousands of partitions.
pub const MAX_RANGE_DAYS: i64 = 400;

/// The refresh window of `metrics_1m`, as the seed's continuous aggregate policy has it.
const REFRESH_START_OFFSET: Duration = Duration::from_secs(2 * 3600);
const REFRESH_END_OFFSET: Duration = Duration::from_secs(60);

/// Advisory lock keys (`hashtext('sluice')`, n); 1 is the migration lock.
const PARTITION_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('sluice'), 2);\n";
const REFRESH_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('sluice'), 3);\n";

/// What one [`run_once`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// The database is on the TimescaleDB path (or `metrics_points` is not partitioned):
    /// nothing was done.
    pub skipped: bool,
    /// Partitions that did not exist before this run.
    pub created: Vec<String>,
    /// Partitions dropped for retention.
    pub dropped: Vec<String>,
    /// Rows written to `metrics_1m` by the refresh.
    pub metrics_1m_rows: u64,
}

/// The name of the partition holding `day`.
pub fn partition_name(day: NaiveDate) -> String {
    format!("{PARTITION_PREFIX}{}", day.format("%Y%m%d"))
}

/// The day a partition named by [`partition_name`] holds; `None` for any other name.
pub fn partition_day(name: &str) -> Option<NaiveDate> {
    let digits = name.strip_prefix(PARTITION_PREFIX)?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    NaiveDate::parse_from_str(digits, "%Y%m%d").ok()
}

/// What the database holds under `metrics_points`.
struct Layout {
    schema: String,
    partitioned: bool,
    partitions: BTreeSet<String>,
    /// `metrics_1m` is a plain table this module refreshes (not a continuous aggregate).
    metrics_1m_table: bool,
}

impl Layout {
    fn qualified(&self, name: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(name))
    }
}

async fn layout(client: &Client) -> Result<Layout> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relkind = 'p',
                    COALESCE((SELECT array_agg(k.relname::text)
                              FROM pg_inherits i JOIN pg_class k ON k.oid = i.inhrelid
                              WHERE i.inhparent = c.oid), '{}'),
                    EXISTS (SELECT 1 FROM pg_class m
                            WHERE m.relname = 'metrics_1m' AND m.relnamespace = c.relnamespace
                              AND m.relkind = 'r')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass('metrics_points')",
            &[],
        )
        .await
        .map_err(|e| pg_error("cannot inspect metrics_points", e))?;
    let Some(row) = rows.first() else {
        return Err(SinkError::Precondition(
            "PostgreSQL has no metrics_points table: run `sluice migrate` against this database"
                .into(),
        ));
    };
    Ok(Layout {
        schema: row.get(0),
        partitioned: row.get(1),
        partitions: row.get::<_, Vec<String>>(2).into_iter().collect(),
        metrics_1m_table: row.get(3),
    })
}

/// A UTC instant as a timezone-independent SQL literal.
fn ts_literal(t: DateTime<Utc>) -> String {
    format!("'{}'::timestamptz", t.format("%Y-%m-%d %H:%M:%S%.6f+00"))
}

fn day_literal(day: NaiveDate) -> String {
    format!("'{} 00:00:00+00'", day.format("%Y-%m-%d"))
}

fn create_sql(layout: &Layout, day: NaiveDate) -> String {
    let next = day.succ_opt().unwrap_or(NaiveDate::MAX);
    format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({});\n",
        layout.qualified(&partition_name(day)),
        layout.qualified("metrics_points"),
        day_literal(day),
        day_literal(next),
    )
}

/// Another process created it first, or a hand-made partition already covers the day.
fn already_covered(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::DUPLICATE_TABLE
            || *c == SqlState::INVALID_OBJECT_DEFINITION
            || *c == SqlState::UNIQUE_VIOLATION
    )
}

/// Creates the partitions of `days` that do not exist; returns the names created.
async fn create_partitions(
    client: &Client,
    layout: &Layout,
    days: impl IntoIterator<Item = NaiveDate>,
) -> Result<Vec<String>> {
    if !layout.partitioned {
        return Ok(Vec::new());
    }
    let missing: BTreeSet<NaiveDate> = days
        .into_iter()
        .filter(|d| !layout.partitions.contains(&partition_name(*d)))
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = PARTITION_LOCK.to_string();
    for day in &missing {
        sql.push_str(&create_sql(layout, *day));
    }
    let mut created = Vec::new();
    match client.simple_query(&sql).await {
        Ok(_) => created.extend(missing.iter().map(|d| partition_name(*d))),
        Err(e) if already_covered(&e) => {
            // One of them is in the way: create the others one by one.
            for day in &missing {
                let one = format!("{PARTITION_LOCK}{}", create_sql(layout, *day));
                match client.simple_query(&one).await {
                    Ok(_) => created.push(partition_name(*day)),
                    Err(e) if already_covered(&e) => {
                        tracing::debug!(day = %day, error = %describe(&e), "metrics_points partition already covered");
                    }
                    Err(e) => {
                        return Err(pg_error(
                            &format!("cannot create partition {}", partition_name(*day)),
                            e,
                        ))
                    }
                }
            }
        }
        Err(e) => return Err(pg_error("cannot create metrics_points partitions", e)),
    }
    if !created.is_empty() {
        tracing::info!(partitions = ?created, "metrics_points partitions created");
    }
    Ok(created)
}

/// Makes sure every UTC day from `from` to `to` (both included) has a `metrics_points`
/// partition. Idempotent, safe from several connections at once, and a no-op on the
/// TimescaleDB path. Ranges over [`MAX_RANGE_DAYS`] are refused; pass the days
/// themselves to [`ensure_partitions_for_days`] instead. Call it outside a transaction
/// that has written to `metrics_points`: creating a partition waits for such
/// transactions on other connections.
pub async fn ensure_partitions(
    client: &Client,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<()> {
    let (from, to) = if from <= to { (from, to) } else { (to, from) };
    let (first, last) = (from.date_naive(), to.date_naive());
    let span = (last - first).num_days();
    if span >= MAX_RANGE_DAYS {
        return Err(SinkError::PartitionSpan {
            days: span,
            first,
            last,
        });
    }
    ensure_partitions_for_days(client, first.iter_days().take(span as usize + 1)).await
}

/// Makes sure each of `days` has a `metrics_points` partition (see [`ensure_partitions`]).
pub async fn ensure_partitions_for_days(
    client: &Client,
    days: impl IntoIterator<Item = NaiveDate>,
) -> Result<()> {
    let layout = layout(client).await?;
    create_partitions(client, &layout, days).await?;
    Ok(())
}

/// One round of maintenance at `now` (see the module docs). A no-op, reported as
/// `skipped`, on the TimescaleDB path.
pub async fn run_once(
    client: &Client,
    cfg: &PostgresConfig,
    now: DateTime<Utc>,
) -> Result<MaintenanceReport> {
    let layout = layout(client).await?;
    if !layout.partitioned {
        return Ok(MaintenanceReport {
            skipped: true,
            ..Default::default()
        });
    }
    let today = now.date_naive();
    let created = create_partitions(
        client,
        &layout,
        today
            .iter_days()
            .take(cfg.partition_days_ahead as usize + 1),
    )
    .await?;

    let dropped = drop_expired(client, &layout, cfg, now).await?;

    let metrics_1m_rows = if layout.metrics_1m_table {
        refresh_metrics_1m(client, &layout, now).await?
    } else {
        0
    };
    Ok(MaintenanceReport {
        skipped: false,
        created,
        dropped,
        metrics_1m_rows,
    })
}

async fn drop_expired(
    client: &Client,
    layout: &Layout,
    cfg: &PostgresConfig,
    now: DateTime<Utc>,
) -> Result<Vec<String>> {
    let retention = chrono::Duration::from_std(cfg.retention).map_err(|_| SinkError::Config {
        key: "postgres.retention",
        reason: "is too large".into(),
    })?;
    let Some(cutoff) = now.checked_sub_signed(retention) else {
        return Ok(Vec::new());
    };
    let expired: Vec<String> = layout
        .partitions
        .iter()
        .filter(|name| {
            partition_day(name)
                .and_then(|d| d.succ_opt())
                .and_then(|upper| upper.and_hms_opt(0, 0, 0))
                .is_some_and(|upper| upper.and_utc() <= cutoff)
        })
        .cloned()
        .collect();
    if expired.is_empty() {
        return Ok(expired);
    }
    let mut sql = PARTITION_LOCK.to_string();
    for name in &expired {
        sql.push_str(&format!(
            "DROP TABLE IF EXISTS {};\n",
            layout.qualified(name)
        ));
    }
    client
        .simple_query(&sql)
        .await
        .map_err(|e| pg_error("cannot drop expired metrics_points partitions", e))?;
    tracing::info!(partitions = ?expired, retention = %humantime::format_duration(cfg.retention), "expired metrics_points partitions dropped");
    Ok(expired)
}

/// `t` rounded down to the minute.
fn floor_minute(t: DateTime<Utc>) -> DateTime<Utc> {
    let s = t.timestamp();
    DateTime::from_timestamp(s - s.rem_euclid(60), 0).unwrap_or(t)
}

/// Recomputes the `metrics_1m` buckets of the refresh window; returns the rows written.
async fn refresh_metrics_1m(client: &Client, layout: &Layout, now: DateTime<Utc>) -> Result<u64> {
    let start = floor_minute(now - REFRESH_START_OFFSET);
    let end = floor_minute(now - REFRESH_END_OFFSET);
    let (start, end) = (ts_literal(start), ts_literal(end));
    let m1m = layout.qualified("metrics_1m");
    let sql = format!(
        "{REFRESH_LOCK}\
         DELETE FROM {m1m} WHERE bucket >= {start} AND bucket < {end};
         INSERT INTO {m1m} (bucket, metric_name, labels, avg_v, max_v, min_v)
         SELECT date_bin('1 minute', mp.time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
                ms.metric_name,
                ms.labels,
                avg(mp.value),
                max(mp.value),
                min(mp.value)
         FROM {points} mp
         JOIN {series} ms ON ms.series_id = mp.series_id
         WHERE mp.time >= {start} AND mp.time < {end}
         GROUP BY 1, 2, 3;",
        points = layout.qualified("metrics_points"),
        series = layout.qualified("metric_series"),
    );
    let messages = client
        .simple_query(&sql)
        .await
        .map_err(|e| pg_error("cannot refresh metrics_1m", e))?;
    // The last command is the INSERT.
    Ok(messages
        .iter()
        .rev()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0))
}

/// The maintenance task: [`run_once`] now and then every `cfg.maintenance_interval` until
/// `shutdown` turns `true` (or its sender goes away). Connection trouble is logged and the
/// connection remade on the next round; it never returns an error or panics.
pub async fn run(
    url: String,
    cfg: PostgresConfig,
    jobs: std::sync::Arc<super::jobs::JobsWatch>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut interval =
        tokio::time::interval(cfg.maintenance_interval.max(Duration::from_millis(10)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<Client> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            _ = interval.tick() => {}
            changed = shutdown.changed() => {
                if changed.is_err() { break; }
                continue;
            }
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match super::connect(&url).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL maintenance cannot connect; retrying next round");
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let round = tokio::select! {
            r = run_once(c, &cfg, Utc::now()) => r,
            _ = shutdown.changed() => break,
        };
        if matches!(&round, Ok(r) if r.skipped) {
            // TimescaleDB's path: its jobs keep the policies; watch them.
            let watched = tokio::select! {
                r = jobs.round(c, Utc::now()) => r,
                _ = shutdown.changed() => break,
            };
            if let Err(e) = watched {
                tracing::warn!(error = %e, "watching TimescaleDB's jobs failed; retrying next round");
                if e.is_retryable() {
                    client = None;
                }
            }
        }
        match round {
            Ok(r) if r.skipped => {}
            Ok(r) => tracing::debug!(
                created = r.created.len(),
                dropped = r.dropped.len(),
                metrics_1m_rows = r.metrics_1m_rows,
                "PostgreSQL maintenance done"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL maintenance failed; retrying next round");
                if e.is_retryable() {
                    client = None;
                }
            }
        }
    }
    tracing::debug!("PostgreSQL maintenance stopped");
}

#[cfg(test)]
mod tests {
    use super::super::migrate::migrate;
    use super::*;
    use sluice_test_support::pg::TestDb;

    fn watch() -> std::sync::Arc<super::super::jobs::JobsWatch> {
        std::sync::Arc::new(super::super::jobs::JobsWatch::new(
            crate::config::JobsMode::Auto,
            None,
        ))
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    async fn partitions(client: &Client) -> Vec<String> {
        let mut v: Vec<String> = layout(client)
            .await
            .unwrap()
            .partitions
            .into_iter()
            .collect();
        v.sort();
        v
    }

    /// A session in a far-off time zone: nothing may depend on it.
    async fn migrated(db: &TestDb) -> Client {
        let mut client = db.client().await;
        client
            .batch_execute("SET TimeZone = 'Asia/Kathmandu'")
            .await
            .unwrap();
        migrate(&mut client).await.unwrap();
        client
    }

    #[test]
    fn names_and_days() {
        assert_eq!(
            partition_name(day("2024-03-09")),
            "metrics_points_p20240309"
        );
        assert_eq!(
            partition_day("metrics_points_p20240309"),
            Some(day("2024-03-09"))
        );
        assert_eq!(partition_day("metrics_points_p2024030"), None);
        assert_eq!(partition_day("metrics_points_custom"), None);
        assert_eq!(
            floor_minute(at("2024-03-09T10:00:59.9Z")),
            at("2024-03-09T10:00:00Z")
        );
        assert_eq!(
            ts_literal(at("2024-03-09T10:00:00.5Z")),
            "'2024-03-09 10:00:00.500000+00'::timestamptz"
        );
    }

    #[tokio::test]
    async fn partitions_are_created_ahead_and_dropped_after_retention() {
        let db = TestDb::new().await;
        let client = migrated(&db).await;
        let cfg = PostgresConfig {
            partition_days_ahead: 2,
            retention: Duration::from_secs(30 * 86400),
            ..Default::default()
        };
        let now = at("2024-03-10T12:00:00Z");
        // Old days, as rows from the past would have made them.
        ensure_partitions(
            &client,
            at("2024-02-07T23:00:00Z"),
            at("2024-02-09T01:00:00Z"),
        )
        .await
        .unwrap();
        let r = run_once(&client, &cfg, now).await.unwrap();
        assert!(!r.skipped);
        assert_eq!(
            r.created,
            [
                "metrics_points_p20240310",
                "metrics_points_p20240311",
                "metrics_points_p20240312"
            ]
        );
        // now - 30 days = 2024-02-09 12:00: the 7th and 8th end by then, the 9th does not.
        assert_eq!(
            r.dropped,
            ["metrics_points_p20240207", "metrics_points_p20240208"]
        );
        let mut expected = vec!["metrics_points_p20240209".to_string()];
        expected.extend(r.created.iter().cloned());
        // migrate() made today's and tomorrow's partitions of the real today too.
        let real_today = partition_name(Utc::now().date_naive());
        let got: Vec<String> = partitions(&client)
            .await
            .into_iter()
            .filter(|p| {
                p.starts_with("metrics_points_p202402") || p.starts_with("metrics_points_p202403")
            })
            .collect();
        assert_eq!(got, expected);
        assert!(partitions(&client).await.contains(&real_today));

        // Bounds are whole UTC days.
        let bounds: String = client
            .query_one(
                "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c
                 WHERE c.relname = 'metrics_points_p20240310'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
        let utc_bounds: String = client
            .query_one(
                "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c
                 WHERE c.relname = 'metrics_points_p20240310'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            utc_bounds, "FOR VALUES FROM ('2024-03-10 00:00:00+00') TO ('2024-03-11 00:00:00+00')",
            "(in Asia/Kathmandu: {bounds})"
        );

        // A second round changes nothing.
        let again = run_once(&client, &cfg, now).await.unwrap();
        assert!(again.created.is_empty() && again.dropped.is_empty());

        // Rows land in their day, and a day without a partition refuses them until
        // ensure_partitions made it.
        client
            .batch_execute("INSERT INTO metric_series (metric_name, labels) VALUES ('m', '{}')")
            .await
            .unwrap();
        let insert = "INSERT INTO metrics_points SELECT '2024-03-20T23:59:59.999999Z'::timestamptz, series_id, 1 FROM metric_series";
        assert!(client.batch_execute(insert).await.is_err());
        ensure_partitions(
            &client,
            at("2024-03-20T23:59:59Z"),
            at("2024-03-20T23:59:59Z"),
        )
        .await
        .unwrap();
        client.batch_execute(insert).await.unwrap();
        let part: String = client
            .query_one(
                "SELECT tableoid::regclass::text FROM metrics_points WHERE value = 1",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(part, "metrics_points_p20240320");

        // A stray timestamp does not create years of partitions.
        let e = ensure_partitions(&client, at("1970-01-01T00:00:00Z"), now)
            .await
            .unwrap_err();
        assert!(matches!(e, SinkError::PartitionSpan { .. }), "{e}");
        assert_eq!(e.class(), flight_schema::ErrorClass::InvalidInput);
        ensure_partitions_for_days(&client, [day("1970-01-01"), day("2024-03-21")])
            .await
            .unwrap();
        assert!(partitions(&client)
            .await
            .contains(&"metrics_points_p19700101".to_string()));
    }

    #[tokio::test]
    async fn ensure_partitions_races_and_respects_hand_made_partitions() {
        let db = TestDb::new().await;
        let client = migrated(&db).await;
        let other = db.client().await;
        // Someone covered 2024-05-02 with a partition of their own.
        client
            .batch_execute(
                "CREATE TABLE metrics_points_custom PARTITION OF metrics_points
                 FOR VALUES FROM ('2024-05-02 00:00:00+00') TO ('2024-05-03 00:00:00+00')",
            )
            .await
            .unwrap();
        for round in 0..5 {
            let from = at("2024-05-01T00:00:00Z") + chrono::Duration::days(round * 3);
            let to = from + chrono::Duration::days(3);
            let (a, b) = tokio::join!(
                ensure_partitions(&client, from, to),
                ensure_partitions(&other, from, to)
            );
            a.unwrap();
            b.unwrap();
        }
        let got: Vec<String> = partitions(&client)
            .await
            .into_iter()
            .filter(|p| p.contains("202405"))
            .collect();
        let mut want: Vec<String> = (1..=16)
            .filter(|d| *d != 2)
            .map(|d| format!("metrics_points_p202405{d:02}"))
            .collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn metrics_1m_refreshes_its_window() {
        let db = TestDb::new().await;
        let client = migrated(&db).await;
        let cfg = PostgresConfig::default();
        let now = at("2024-06-01T12:00:30Z");
        ensure_partitions(&client, now - chrono::Duration::days(1), now)
            .await
            .unwrap();
        client
            .batch_execute(
                r#"INSERT INTO metric_series (metric_name, labels) VALUES
                     ('cpu', '{"host": "a"}'), ('cpu', '{"host": "b"}');
                   INSERT INTO metrics_points (time, series_id, value)
                   SELECT t::timestamptz, s.series_id, v FROM (VALUES
                     ('2024-06-01T11:50:01Z', 'a', 1.0),
                     ('2024-06-01T11:50:59.999Z', 'a', 3.0),
                     ('2024-06-01T11:50:30Z', 'b', 10.0),
                     ('2024-06-01T11:58:59Z', 'a', 7.0),
                     ('2024-06-01T11:59:10Z', 'a', 100.0),
                     ('2024-06-01T09:59:00Z', 'a', 50.0),
                     ('2024-06-01T10:00:00Z', 'b', 20.0)
                   ) AS p(t, host, v)
                   JOIN metric_series s ON s.labels->>'host' = p.host;
                   INSERT INTO metrics_1m VALUES
                     ('2024-06-01T11:30:00Z', 'stale', '{}', 0, 0, 0),
                     ('2024-06-01T09:00:00Z', 'old', '{}', 0, 0, 0);"#,
            )
            .await
            .unwrap();
        let r = run_once(&client, &cfg, now).await.unwrap();
        // Window [10:00, 11:59): the 11:59 point is too recent, the 09:59 one too old.
        assert_eq!(r.metrics_1m_rows, 4);
        let rows: Vec<(String, String, String, f64, f64, f64)> = client
            .query(
                "SELECT to_char(bucket AT TIME ZONE 'UTC', 'HH24:MI'), metric_name, labels::text,
                        avg_v, max_v, min_v
                 FROM metrics_1m ORDER BY bucket, labels::text",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect();
        let row = |b: &str, m: &str, l: &str, a: f64, x: f64, n: f64| {
            (b.to_string(), m.to_string(), l.to_string(), a, x, n)
        };
        assert_eq!(
            rows,
            vec![
                row("09:00", "old", "{}", 0.0, 0.0, 0.0),
                row("10:00", "cpu", r#"{"host": "b"}"#, 20.0, 20.0, 20.0),
                row("11:50", "cpu", r#"{"host": "a"}"#, 2.0, 3.0, 1.0),
                row("11:50", "cpu", r#"{"host": "b"}"#, 10.0, 10.0, 10.0),
                row("11:58", "cpu", r#"{"host": "a"}"#, 7.0, 7.0, 7.0),
            ]
        );
        // A minute later the 11:59 bucket is complete and the window starts at 10:01:
        // the 10:00 bucket stays as it was.
        let r = run_once(&client, &cfg, now + chrono::Duration::minutes(1))
            .await
            .unwrap();
        assert_eq!(r.metrics_1m_rows, 4);
        let n: Vec<(i64, i64)> = client
            .query(
                "SELECT count(*), count(*) FILTER (WHERE max_v = 100 OR bucket < '2024-06-01T10:01Z')
                 FROM metrics_1m",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(n, vec![(6, 3)]);
    }

    #[tokio::test]
    async fn the_task_runs_until_shutdown_and_survives_a_bad_url() {
        let db = TestDb::new().await;
        let client = migrated(&db).await;
        client
            .batch_execute(&format!(
                "DROP TABLE {}",
                partition_name(Utc::now().date_naive() + chrono::Duration::days(1))
            ))
            .await
            .unwrap();
        let cfg = PostgresConfig {
            maintenance_interval: Duration::from_millis(50),
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(db.url.clone(), cfg.clone(), watch(), rx));
        let ahead = partition_name(Utc::now().date_naive() + chrono::Duration::days(3));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !partitions(&client).await.contains(&ahead) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no partitions were made"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task stops on shutdown")
            .unwrap();

        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(
            "postgresql://postgres@127.0.0.1:1/x".into(),
            cfg,
            watch(),
            rx,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!task.is_finished());
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task stops when the sender goes away")
            .unwrap();
    }
}
