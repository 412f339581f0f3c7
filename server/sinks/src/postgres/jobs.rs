//! TimescaleDB's own jobs, watched and, where the store's scheduler fails, run by Sluice.
//!
//! # What flows in and out
//! In: a connection to a database on the TimescaleDB path, `postgres.timescaledb_jobs`
//! ([`JobsMode`]) and the time. Out: a [`JobsWatch`] that `/readyz` (the jobs, the
//! scheduler's last outcome with the store's error text, Sluice's own runs) and
//! `/metrics` (`sluice_timescaledb_job_failing`, `sluice_timescaledb_job_runs_total`)
//! read, and `CALL run_job(id)` statements on the store.
//!
//! # Why
//! The seed's policies (compression and retention of `metrics_points`, the `metrics_1m`
//! refresh) are TimescaleDB jobs that its background scheduler runs. On some PostgreSQL
//! versions every background run fails (15.20: `cannot drop portal "" while it is being
//! set up`, in `timescaledb_information.job_errors`), while the same job run from a
//! session works. Without a watch nobody would notice that old chunks are never
//! compressed or dropped and the aggregate never refreshed.
//!
//! # What a round does
//! 1. Reads every scheduled job (`timescaledb_information.jobs`, `job_stats`, the newest
//!    `job_errors` row) but telemetry.
//! 2. Notes which ones the store's scheduler last ran with a failure.
//! 3. Runs, with `CALL run_job(id)` (simple protocol: the procedures commit inside), each
//!    job that is due by its own `schedule_interval` since Sluice last ran it (a minute
//!    after a run of Sluice's failed): in `auto`
//!    the jobs whose last scheduled run failed, in `sluice` every job, in `store` none. A
//!    session advisory lock per job keeps several Sluice processes from running one job
//!    at once. A run by Sluice does not change `job_stats` (TimescaleDB records only its
//!    scheduler's runs), so Sluice keeps its own record of when it last ran each job.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use super::migrate::{describe, pg_error};
use crate::config::JobsMode;
use crate::error::SinkError;

type Result<T, E = SinkError> = std::result::Result<T, E>;
use sluice_core::metrics::Metrics;

/// How soon a job Sluice ran and saw fail is run again.
const RETRY_FAILED_RUN: Duration = Duration::from_secs(60);

/// One TimescaleDB job as the last round saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobState {
    pub job_id: i32,
    pub proc_name: String,
    pub hypertable: Option<String>,
    #[serde(with = "humantime_serde")]
    pub schedule_interval: Duration,
    /// `job_stats.last_run_status` of the store's scheduler (`Success`, `Failed`, or none
    /// before its first run).
    pub store_last_run: Option<String>,
    /// The store's newest error text for this job (`job_errors.err_message`, with its
    /// SQLSTATE).
    pub store_error: Option<String>,
    pub store_failures: i64,
    /// When Sluice last ran it, and the error if that run failed.
    pub sluice_last_run: Option<DateTime<Utc>>,
    pub sluice_error: Option<String>,
    pub sluice_runs: u64,
}

impl JobState {
    /// The store's scheduler could not run it the last time it tried.
    pub fn store_failing(&self) -> bool {
        self.store_last_run.as_deref() == Some("Failed")
    }

    /// Failing, and Sluice is not making up for it (not running it, or failing too).
    pub fn unhandled(&self) -> bool {
        (self.store_failing() && self.sluice_last_run.is_none()) || self.sluice_error.is_some()
    }
}

/// What one [`JobsWatch::round`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobsReport {
    /// Jobs the store's scheduler last failed to run.
    pub store_failing: Vec<i32>,
    /// Jobs Sluice ran this round, with the error of those that failed.
    pub ran: Vec<(i32, Option<String>)>,
}

/// The watched jobs of one database (see the module docs).
pub struct JobsWatch {
    mode: JobsMode,
    jobs: Mutex<BTreeMap<i32, JobState>>,
    /// The label values of each job's `sluice_timescaledb_job_failing` series.
    labels: Mutex<BTreeMap<i32, [String; 4]>>,
    metrics: Option<std::sync::Arc<Metrics>>,
}

/// The jobs, their scheduler's last outcome and (`with_errors`) its newest error text.
fn jobs_sql(with_errors: bool) -> String {
    let error = if with_errors {
        "(SELECT e.err_message || ' (' || coalesce(e.sqlerrcode, '?') || ')'
            FROM timescaledb_information.job_errors e
           WHERE e.job_id = j.job_id
           ORDER BY e.finish_time DESC NULLS LAST LIMIT 1)"
    } else {
        "NULL::text"
    };
    format!(
        "SELECT j.job_id, j.proc_name::text, j.hypertable_name::text,
                extract(epoch FROM j.schedule_interval)::float8,
                s.last_run_status::text, coalesce(s.total_failures, 0)::int8, {error}
         FROM timescaledb_information.jobs j
         LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id
         WHERE j.scheduled AND j.proc_name <> 'policy_telemetry'
         ORDER BY j.job_id"
    )
}

/// Whether a database has TimescaleDB's job views.
async fn has_jobs(client: &Client) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT to_regclass('timescaledb_information.jobs') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| pg_error("cannot look for TimescaleDB's jobs", e))?
        .get(0))
}

impl JobsWatch {
    pub fn new(mode: JobsMode, metrics: Option<std::sync::Arc<Metrics>>) -> Self {
        Self {
            mode,
            jobs: Mutex::new(BTreeMap::new()),
            labels: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    /// The jobs as the last round saw them.
    pub fn jobs(&self) -> Vec<JobState> {
        self.jobs.lock().expect("jobs").values().cloned().collect()
    }

    /// Some job fails in the store and Sluice is not making up for it.
    pub fn degraded(&self) -> bool {
        self.jobs
            .lock()
            .expect("jobs")
            .values()
            .any(JobState::unhandled)
    }

    /// JSON for `/readyz`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode,
            "jobs": self.jobs(),
        })
    }

    /// One round at `now` (see the module docs); a no-op without TimescaleDB.
    pub async fn round(&self, client: &Client, now: DateTime<Utc>) -> Result<JobsReport> {
        if !has_jobs(client).await? {
            return Ok(JobsReport::default());
        }
        // job_errors may be closed to this role: then the jobs without the error text.
        let rows = match client.query(&jobs_sql(true), &[]).await {
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                client.query(&jobs_sql(false), &[]).await
            }
            other => other,
        }
        .map_err(|e| pg_error("cannot read TimescaleDB's jobs", e))?;
        let mut report = JobsReport::default();
        let mut due = Vec::new();
        {
            let mut jobs = self.jobs.lock().expect("jobs");
            let mut seen = BTreeMap::new();
            for r in &rows {
                let job_id: i32 = r.get(0);
                let interval = Duration::from_secs_f64(r.get::<_, f64>(3).max(1.0));
                let previous = jobs.remove(&job_id);
                let state = JobState {
                    job_id,
                    proc_name: r.get(1),
                    hypertable: r.get(2),
                    schedule_interval: interval,
                    store_last_run: r.get(4),
                    store_error: r.get(6),
                    store_failures: r.get(5),
                    sluice_last_run: previous.as_ref().and_then(|p| p.sluice_last_run),
                    sluice_error: previous.as_ref().and_then(|p| p.sluice_error.clone()),
                    sluice_runs: previous.as_ref().map_or(0, |p| p.sluice_runs),
                };
                if state.store_failing() {
                    report.store_failing.push(job_id);
                    if previous.as_ref().is_none_or(|p| !p.store_failing()) {
                        tracing::warn!(job_id, proc_name = %state.proc_name,
                            hypertable = ?state.hypertable, error = ?state.store_error,
                            "TimescaleDB's scheduler fails to run this job");
                    }
                }
                let wanted = match self.mode {
                    JobsMode::Store => false,
                    JobsMode::Sluice => true,
                    JobsMode::Auto => state.store_failing(),
                };
                // A run of Sluice's that failed is tried again within a minute, not only
                // after the job's whole interval (a day for retention).
                let wait = if state.sluice_error.is_some() {
                    interval.min(RETRY_FAILED_RUN)
                } else {
                    interval
                };
                let is_due = state.sluice_last_run.is_none_or(|t| {
                    now.signed_duration_since(t).to_std().unwrap_or_default() >= wait
                });
                if wanted && is_due {
                    due.push(job_id);
                }
                seen.insert(job_id, state);
            }
            *jobs = seen;
        }
        for job_id in due {
            if let Some(error) = self.run_job(client, job_id, now).await? {
                report.ran.push((job_id, error));
            }
        }
        self.publish();
        Ok(report)
    }

    /// Runs one job unless another session holds its lock. `Ok(None)`: skipped (someone
    /// else runs it); `Ok(Some(error))`: run, with the job's error if it failed (also kept
    /// in its state). Errors are only the connection's.
    async fn run_job(
        &self,
        client: &Client,
        job_id: i32,
        now: DateTime<Utc>,
    ) -> Result<Option<Option<String>>> {
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('sluice.timescaledb_job'), $1)",
                &[&job_id],
            )
            .await
            .map_err(|e| pg_error("cannot lock a TimescaleDB job", e))?
            .get(0);
        if !locked {
            return Ok(None);
        }
        // job_id is an integer read from the store: safe to write into the statement. The
        // simple protocol: run_job's procedures commit inside.
        let result = client
            .simple_query(&format!("CALL run_job({job_id})"))
            .await;
        let unlocked = client
            .execute(
                "SELECT pg_advisory_unlock(hashtext('sluice.timescaledb_job'), $1)",
                &[&job_id],
            )
            .await;
        if let Err(e) = unlocked {
            return Err(pg_error("cannot unlock a TimescaleDB job", e));
        }
        let error = match result {
            Ok(_) => None,
            Err(e) if e.is_closed() => return Err(pg_error("CALL run_job", e)),
            // The store's scheduler runs it right now (a concurrent refresh, a lock):
            // not a failure; due again next round.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                tracing::debug!(job_id, error = %describe(&e), "TimescaleDB job busy; next round");
                return Ok(None);
            }
            Err(e) => Some(describe(&e)),
        };
        let mut jobs = self.jobs.lock().expect("jobs");
        if let Some(state) = jobs.get_mut(&job_id) {
            let outcome = if error.is_some() { "error" } else { "ok" };
            match &error {
                Some(e) => tracing::warn!(job_id, proc_name = %state.proc_name, error = %e,
                    "running a TimescaleDB job from sluice failed"),
                None => tracing::info!(job_id, proc_name = %state.proc_name,
                    hypertable = ?state.hypertable, "ran a TimescaleDB job from sluice"),
            }
            if let Some(m) = &self.metrics {
                m.timescaledb_job_runs
                    .with_label_values(&[state.proc_name.as_str(), outcome])
                    .inc();
            }
            state.sluice_error = error.clone();
            state.sluice_last_run = Some(now);
            state.sluice_runs += 1;
        }
        Ok(Some(error))
    }

    /// Sets `sluice_timescaledb_job_failing` to the jobs' state, removing series of jobs
    /// that went away or whose error text changed.
    fn publish(&self) {
        let Some(m) = &self.metrics else { return };
        let jobs = self.jobs.lock().expect("jobs");
        let mut labels = self.labels.lock().expect("job labels");
        let stale: Vec<i32> = labels
            .keys()
            .filter(|id| !jobs.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            if let Some(l) = labels.remove(&id) {
                let _ = m
                    .timescaledb_job_failing
                    .remove_label_values(&[&l[0], &l[1], &l[2], &l[3]]);
            }
        }
        for (id, state) in jobs.iter() {
            let now = [
                id.to_string(),
                state.proc_name.clone(),
                state.hypertable.clone().unwrap_or_default(),
                state.store_error.clone().unwrap_or_default(),
            ];
            if let Some(old) = labels.get(id) {
                if *old != now {
                    let _ = m
                        .timescaledb_job_failing
                        .remove_label_values(&[&old[0], &old[1], &old[2], &old[3]]);
                }
            }
            m.timescaledb_job_failing
                .with_label_values(&[&now[0], &now[1], &now[2], &now[3]])
                .set(i64::from(state.store_failing()));
            labels.insert(*id, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::postgres::migrate::migrate;
    use sluice_test_support::pg::{Flavor, TestDb};

    async fn migrated() -> (TestDb, Client) {
        let db = TestDb::on(Flavor::Timescale).await;
        let mut client = db.client().await;
        migrate(&mut client).await.unwrap();
        (db, client)
    }

    /// (bucket, avg, max, min) rows of `sql`.
    async fn buckets(client: &Client, sql: &str) -> Vec<(String, f64, f64, f64)> {
        client
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }

    async fn count(client: &Client, sql: &str) -> i64 {
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Waits until the store's scheduler has tried every job once (its first runs start
    /// right after a job is made), so that a run from the test does not meet one of its.
    async fn scheduler_tried_every_job(client: &Client) {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while count(
            client,
            "SELECT count(*) FROM timescaledb_information.jobs j
             LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id
             WHERE j.scheduled AND j.proc_name <> 'policy_telemetry'
               AND (s.last_run_status IS NULL OR s.job_status = 'Running')",
        )
        .await
            > 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the scheduler did not run the jobs"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[tokio::test]
    #[cfg_attr(not(timescaledb_tests), ignore = "needs ../shared/timescaledb")]
    async fn failing_jobs_are_reported_with_the_stores_error_and_run_by_sluice() {
        let (_db, client) = migrated().await;
        // A job of our own that always fails, and every job due now.
        client
            .batch_execute(
                "CREATE PROCEDURE fail_always(job_id int, config jsonb) LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'fail_always always fails'; END $$;
                 SELECT add_job('fail_always', INTERVAL '1 hour');
                 SELECT alter_job(job_id, next_start => now())
                 FROM timescaledb_information.jobs WHERE proc_name <> 'policy_telemetry';",
            )
            .await
            .unwrap();
        // The store's scheduler tries each (it fails fail_always, and on PostgreSQL 15.20
        // every job).
        scheduler_tried_every_job(&client).await;
        let metrics = Arc::new(Metrics::new());
        let watch = JobsWatch::new(JobsMode::Auto, Some(metrics.clone()));
        let now = Utc::now();
        let report = watch.round(&client, now).await.unwrap();
        let jobs = watch.jobs();
        let mine = jobs.iter().find(|j| j.proc_name == "fail_always").unwrap();
        assert!(mine.store_failing(), "{mine:?}");
        assert!(
            mine.store_error.as_deref().is_some_and(|e| !e.is_empty()),
            "the store's error text: {mine:?}"
        );
        assert!(
            mine.sluice_error
                .as_deref()
                .is_some_and(|e| e.contains("fail_always always fails")),
            "{mine:?}"
        );
        assert!(
            watch.degraded(),
            "a job fails and sluice cannot make up for it"
        );
        // In `auto`, exactly the jobs the scheduler failed were run from sluice; those of
        // the seed that failed only in the scheduler succeeded from sluice.
        for j in &jobs {
            let ran = report.ran.iter().find(|(id, _)| *id == j.job_id);
            assert_eq!(ran.is_some(), j.store_failing(), "{j:?}");
            if j.store_failing() && j.proc_name.starts_with("policy_") {
                assert_eq!(ran.unwrap().1, None, "{j:?}");
            }
        }
        let text = metrics.render();
        assert!(
            text.lines()
                .any(|l| l.starts_with("sluice_timescaledb_job_failing{")
                    && l.contains("proc_name=\"fail_always\"")
                    && l.ends_with(" 1")),
            "{text}"
        );
        assert!(
            text.contains(
                "sluice_timescaledb_job_runs_total{outcome=\"error\",proc_name=\"fail_always\"} 1"
            ),
            "{text}"
        );
        let json = watch.json().to_string();
        assert!(json.contains("fail_always always fails"), "{json}");

        // Not due again at once.
        let again = watch
            .round(&client, now + chrono::Duration::seconds(30))
            .await
            .unwrap();
        assert!(
            !again.ran.iter().any(|(id, _)| *id == mine.job_id),
            "{again:?}"
        );
        // Its run from sluice failed: tried again a minute later, not an hour later.
        let retried = watch
            .round(&client, now + chrono::Duration::seconds(90))
            .await
            .unwrap();
        assert!(
            retried.ran.iter().any(|(id, _)| *id == mine.job_id),
            "{retried:?}"
        );
        let later = watch
            .round(&client, now + chrono::Duration::hours(2))
            .await
            .unwrap();
        assert!(
            later.ran.iter().any(|(id, _)| *id == mine.job_id),
            "{later:?}"
        );

        // `store` only reports.
        let store = JobsWatch::new(JobsMode::Store, None);
        let r = store.round(&client, now).await.unwrap();
        assert!(r.ran.is_empty() && r.store_failing.contains(&mine.job_id));
    }

    #[tokio::test]
    #[cfg_attr(not(timescaledb_tests), ignore = "needs ../shared/timescaledb")]
    async fn the_seed_policies_hold_when_sluice_runs_the_jobs() {
        let (_db, client) = migrated().await;
        // Points 45 days old (past retention), 20 days old (past compress_after) and 30
        // minutes old (in the metrics_1m refresh window).
        client
            .batch_execute(
                "INSERT INTO metric_series (metric_name, labels) VALUES ('cpu', '{\"h\":\"a\"}');
                 INSERT INTO metrics_points
                 SELECT t, 1, v FROM (VALUES
                   (now() - INTERVAL '45 days', 1.0),
                   (now() - INTERVAL '20 days', 2.0),
                   (date_trunc('minute', now()) - INTERVAL '30 minutes', 3.0),
                   (date_trunc('minute', now()) - INTERVAL '30 minutes' + INTERVAL '10 s', 5.0))
                   AS p(t, v);",
            )
            .await
            .unwrap();
        scheduler_tried_every_job(&client).await;
        let watch = JobsWatch::new(JobsMode::Sluice, None);
        let report = watch.round(&client, Utc::now()).await.unwrap();
        assert!(report.ran.iter().all(|(_, e)| e.is_none()), "{report:?}");
        // Retention dropped the oldest chunk; compression compressed the 20-day one.
        assert_eq!(
            count(
                &client,
                "SELECT count(*) FROM metrics_points WHERE time < now() - INTERVAL '30 days'"
            )
            .await,
            0
        );
        assert_eq!(
            count(&client, "SELECT count(*) FROM metrics_points").await,
            3
        );
        assert!(
            count(
                &client,
                "SELECT count(*) FROM timescaledb_information.chunks
                 WHERE hypertable_name = 'metrics_points' AND is_compressed"
            )
            .await
                >= 1
        );
        // metrics_1m matches a direct aggregation over metrics_points in its window.
        let direct = buckets(
            &client,
            "SELECT time_bucket('1 minute', mp.time)::text, avg(mp.value), max(mp.value),
                    min(mp.value)
             FROM metrics_points mp
             WHERE mp.time >= now() - INTERVAL '2 hours'
             GROUP BY 1 ORDER BY 1",
        )
        .await;
        let aggregate = buckets(
            &client,
            "SELECT bucket::text, avg_v, max_v, min_v FROM metrics_1m
             WHERE bucket >= now() - INTERVAL '2 hours' ORDER BY 1",
        )
        .await;
        assert_eq!(direct.len(), 1);
        assert_eq!(aggregate, direct);
        assert!(!watch.degraded());
    }
}
