//! Rollups: one-minute (and any other configured interval's) aggregates of every metric
//! series, written to ClickHouse's `metrics_1m` (`metrics_<interval>`) from the points the
//! WAL made durable. It works the same with or without PostgreSQL, since it reads the
//! WAL, not a store.
//!
//! # What flows through it
//! [`Rollup::run`] tails the WAL from its own position (like a sink) and adds every point
//! of the `metrics` table to its series' open bucket per interval ([`state`]). A bucket
//! whose last point arrived `delay` ago (wall clock) is due; due buckets are written as
//! one INSERT per interval table, each row carrying the bucket's `avg_v`, `min_v`, `max_v`
//! and the `sum_v` and `count_v` that let rows of one bucket be merged exactly. A point
//! that comes for a bucket already written makes one more row for it; the view
//! `metrics_1m_merged` (`metrics_<interval>_merged`) sums them into one per bucket.
//!
//! # Written exactly once
//! Before a flush's INSERTs the state after the last record read, with the flush's rows,
//! is saved to the checkpoint file (`<data_dir>/rollup/checkpoint`: fsynced, replaced by
//! rename) and the rollup's WAL position moves to that record. Each INSERT carries the
//! deduplication token `sluice-rollup:<wal id>:<flush id>:<table>`. After a crash the
//! checkpoint's flush is sent again (ClickHouse drops what it already has), its open
//! buckets are restored and the WAL is read again from its position: every point is in
//! exactly one written row. Between flushes the checkpoint is saved every
//! `checkpoint_every` so the WAL can release its segments.
//!
//! While ClickHouse is down the rollup retries its flush and reads no further; the WAL
//! keeps what it has not read, like for any sink.

pub mod labels;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampSecondArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use bytes::Bytes;
use sluice_core::metrics::Metrics;
use sluice_core::registry::Registry;
use sluice_wal::Wal;
use tokio::sync::watch;

use crate::clickhouse::client::{quote_ident, ChClient};
use crate::clickhouse::native::{encode_block, ChType};
use crate::config::RollupConfig;
use crate::runner::{backoff, SinkStatus, TailReader};
use crate::SinkError;
pub use state::{Checkpoint, Flush, FlushRow, Interval, RollupState};

/// The rollup's name: its WAL position key and its `/readyz` entry.
pub const ROLLUP_SINK: &str = "rollup";

/// The table whose points are rolled up (the seed's `metrics`).
pub const SOURCE_TABLE: &str = "metrics";

/// The table the migrations create; other intervals' tables are made like it.
const BASE_TABLE: &str = "metrics_1m";

/// A rollup table's columns ([`COLUMNS`]) with their ClickHouse types.
type TableColumns = Vec<(String, ChType)>;

/// The columns every rollup table gets, in this order.
const COLUMNS: [&str; 8] = [
    "bucket",
    "metric_name",
    "labels",
    "avg_v",
    "max_v",
    "min_v",
    "sum_v",
    "count_v",
];

/// Parses `[rollup] intervals`: each `<n><s|m|h|d>`, from 1 second to 7 days, no repeats.
pub fn parse_intervals(names: &[String]) -> Result<Vec<Interval>, String> {
    if names.is_empty() {
        return Err(
            "rollup.intervals is empty (leave it out for [\"1m\"], or set rollup.enabled = false)"
                .into(),
        );
    }
    let mut out: Vec<Interval> = Vec::new();
    for name in names {
        let bad =
            || format!("rollup.intervals: '{name}' is not <number><s|m|h|d> (e.g. \"1m\", \"1h\")");
        let unit = name.chars().last().ok_or_else(bad)?;
        let digits = &name[..name.len() - unit.len_utf8()];
        if digits.is_empty()
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        let per = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let secs = n
            .checked_mul(per)
            .filter(|s| *s <= 7 * 86400)
            .ok_or_else(|| format!("rollup.intervals: '{name}' is longer than 7 days"))?;
        if let Some(same) = out.iter().find(|i| i.secs == secs) {
            return Err(format!(
                "rollup.intervals: '{name}' is the same width as '{}'",
                same.name
            ));
        }
        out.push(Interval {
            name: name.clone(),
            secs,
        });
    }
    Ok(out)
}

/// The checkpoint file in `dir` (`<data_dir>/rollup`).
fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint")
}

/// Reads the checkpoint, if there is one. A damaged one is an error: starting without it
/// would count points twice or miss them.
pub fn load_checkpoint(dir: &Path) -> Result<Option<Checkpoint>, SinkError> {
    let path = checkpoint_path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SinkError::Precondition(format!(
                "cannot read the rollup checkpoint {}: {e}",
                path.display()
            )))
        }
    };
    Checkpoint::decode(&bytes).map(Some).map_err(|e| {
        SinkError::Precondition(format!(
            "the rollup checkpoint {} cannot be read: {e}. Without it the rollup cannot know \
             which points it wrote; move the file away to start the rollup afresh from the \
             WAL's oldest record (buckets may then be counted twice or missed)",
            path.display()
        ))
    })
}

/// Writes the checkpoint: to a temporary file, fsynced, renamed over the old one, and the
/// directory fsynced.
fn save_checkpoint(dir: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("checkpoint.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&cp.encode())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, checkpoint_path(dir))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Where the rollup starts reading the WAL: after the checkpoint's record when the
/// checkpoint belongs to this WAL and its records are still there, else after the WAL's
/// oldest record (with a warning when records were missed).
pub fn start_seq(checkpoint: Option<&Checkpoint>, wal: &Wal) -> u64 {
    let oldest = wal.first_seq().saturating_sub(1);
    match checkpoint {
        None => oldest,
        Some(cp) if cp.wal_id != wal.id() => {
            tracing::warn!(
                checkpoint_wal = %cp.wal_id, wal = wal.id(),
                "the rollup checkpoint is from another WAL: its open buckets are kept, reading starts at the WAL's oldest record"
            );
            oldest
        }
        Some(cp) if cp.seq < oldest => {
            tracing::warn!(
                from = cp.seq + 1,
                to = oldest,
                "WAL records the rollup had not read are gone (rollups were off meanwhile?): their points are not in the rollup tables"
            );
            oldest
        }
        Some(cp) => cp.seq.min(wal.last_seq()),
    }
}

/// The rollup task; see the module doc.
pub struct Rollup {
    client: ChClient,
    wal: Wal,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    cfg: RollupConfig,
    intervals: Vec<Interval>,
    dir: PathBuf,
    status: Arc<SinkStatus>,
    retry_initial: Duration,
    retry_max: Duration,
}

impl Rollup {
    pub fn new(
        client: ChClient,
        wal: Wal,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        cfg: RollupConfig,
        data_dir: &Path,
        retry: (Duration, Duration),
    ) -> Result<Self, SinkError> {
        let intervals = parse_intervals(&cfg.intervals).map_err(SinkError::Precondition)?;
        Ok(Self {
            client,
            wal,
            registry,
            metrics,
            cfg,
            intervals,
            dir: data_dir.join("rollup"),
            status: Arc::new(SinkStatus::new(ROLLUP_SINK)),
            retry_initial: retry.0,
            retry_max: retry.1,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The rollup's state, for `/readyz` and `/metrics`.
    pub fn status(&self) -> Arc<SinkStatus> {
        self.status.clone()
    }

    /// Makes sure every interval's table and merged view exist with the rollup's columns.
    async fn ensure_tables(&self) -> Result<Vec<TableColumns>, SinkError> {
        let ch = |ctx: String| move |e| SinkError::clickhouse(ctx, e);
        let db = quote_ident(self.client.database());
        let mut types = Vec::with_capacity(self.intervals.len());
        for iv in &self.intervals {
            let table = iv.table();
            if table != BASE_TABLE {
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS {db}.{} AS {db}.{}",
                    quote_ident(&table),
                    quote_ident(BASE_TABLE)
                );
                self.client
                    .execute(&sql)
                    .await
                    .map_err(ch(format!("cannot create {table} like {BASE_TABLE}")))?;
            }
            let cols = self
                .client
                .table_columns(&table)
                .await
                .map_err(ch(format!("cannot read the columns of {table}")))?
                .ok_or_else(|| {
                    SinkError::Precondition(format!(
                        "ClickHouse has no {table} table: run `sluice migrate` (or set clickhouse.migrate_on_start)"
                    ))
                })?;
            let missing: Vec<&str> = COLUMNS
                .iter()
                .copied()
                .filter(|c| !cols.iter().any(|(n, _)| n == c))
                .collect();
            if !missing.is_empty() {
                return Err(SinkError::Precondition(format!(
                    "ClickHouse table {table} has no column(s) {}: run `sluice migrate`",
                    missing.join(", ")
                )));
            }
            let view = format!(
                "CREATE VIEW IF NOT EXISTS {db}.{} AS {}",
                quote_ident(&format!("{table}_merged")),
                merged_view_select(&format!("{db}.{}", quote_ident(&table)))
            );
            self.client
                .execute(&view)
                .await
                .map_err(ch(format!("cannot create the view {table}_merged")))?;
            let table_types = COLUMNS
                .iter()
                .map(|c| {
                    let (_, t) = cols.iter().find(|(n, _)| n == c).expect("checked above");
                    let ty = ChType::parse(t).map_err(|e| {
                        SinkError::Precondition(format!("{table}.{c}: type {t}: {e}"))
                    })?;
                    Ok((c.to_string(), ty))
                })
                .collect::<Result<_, SinkError>>()?;
            types.push(table_types);
        }
        Ok(types)
    }

    /// Sends a flush's rows, one INSERT per interval table, each under its token; `types`
    /// are the tables' column types as [`Rollup::ensure_tables`] read them.
    async fn insert(&self, flush: &Flush, types: &[TableColumns]) -> Result<(), SinkError> {
        for ((i, iv), types) in self.intervals.iter().enumerate().zip(types) {
            let rows: Vec<&FlushRow> = flush
                .rows
                .iter()
                .filter(|r| r.interval as usize == i)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let table = iv.table();
            let batch = rows_batch(&rows);
            let mut body = Vec::new();
            encode_block(&batch, types, &mut body).map_err(|e| {
                SinkError::Precondition(format!("encoding rollup rows for {table}: {e}"))
            })?;
            let token = format!("sluice-rollup:{}:{}:{table}", self.wal.id(), flush.id);
            let columns: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
            let body = futures::stream::once(async move { Ok(Bytes::from(body)) });
            self.client
                .insert_native(&table, &columns, &token, body)
                .await
                .map_err(|e| SinkError::clickhouse(format!("INSERT INTO {table}"), e))?;
            self.metrics
                .rollup
                .rows
                .with_label_values(&[&iv.name])
                .inc_by(rows.len() as u64);
        }
        self.metrics.rollup.flushes.inc();
        Ok(())
    }

    /// Retries `attempt` with backoff until it succeeds; false on shutdown.
    async fn retry<T, F, Fut>(
        &self,
        what: &str,
        shutdown: &mut watch::Receiver<bool>,
        attempt: F,
    ) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, SinkError>>,
    {
        let mut delay = self.retry_initial;
        loop {
            match attempt().await {
                Ok(v) => {
                    self.status.set_up(&self.metrics);
                    return Some(v);
                }
                Err(e) => {
                    let msg = format!("{what}: {e}");
                    if self.status.set_retrying(&self.metrics, &msg) {
                        tracing::warn!(sink = ROLLUP_SINK, error = %msg, "rollup cannot write to ClickHouse; retrying");
                    }
                    if !backoff(&mut delay, self.retry_max, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn save(&self, cp: Checkpoint, shutdown: &mut watch::Receiver<bool>) -> bool {
        let cp = Arc::new(cp);
        self.retry("saving the rollup checkpoint", shutdown, || {
            let (dir, cp) = (self.dir.clone(), cp.clone());
            async move {
                tokio::task::spawn_blocking(move || save_checkpoint(&dir, &cp))
                    .await
                    .map_err(|e| SinkError::Precondition(e.to_string()))?
                    .map_err(|e| {
                        SinkError::Precondition(format!("writing the rollup checkpoint: {e}"))
                    })
            }
        })
        .await
        .is_some()
    }

    /// Publishes the WAL position and the gauges; `writing` is the rows of a flush being
    /// written, still counted as open until ClickHouse has them.
    fn publish(&self, position: u64, state: &RollupState, writing: usize) {
        self.wal.set_sink_position(ROLLUP_SINK, position);
        self.status.set_position(position, None);
        let m = &self.metrics;
        m.sink_lag_records
            .with_label_values(&[ROLLUP_SINK])
            .set(self.wal.last_seq().saturating_sub(position) as i64);
        m.rollup
            .open_buckets
            .set((state.open_buckets() + writing) as i64);
        for (iv, w) in self.intervals.iter().zip(state.watermarks()) {
            if let Some(w) = w {
                m.rollup
                    .watermark_seconds
                    .with_label_values(&[&iv.name])
                    .set(w);
            }
        }
    }

    /// Runs until `shutdown`, from `checkpoint` (what [`load_checkpoint`] read) and after
    /// WAL record `start` (what [`start_seq`] said, registered for [`ROLLUP_SINK`]).
    pub async fn run(
        self: Arc<Self>,
        checkpoint: Option<Checkpoint>,
        start: u64,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let clock = Instant::now();
        let now_ms = move || clock.elapsed().as_millis() as u64;
        let mut state =
            RollupState::new(self.intervals.clone(), self.cfg.lateness.as_secs() as i64);
        let mut next_flush_id = checkpoint.as_ref().map_or(1, |c| c.next_flush_id);
        let mut inflight = None;
        if let Some(mut cp) = checkpoint {
            let gone = cp.restore_into(&mut state, now_ms());
            if !gone.is_empty() {
                tracing::warn!(
                    buckets = gone.len(),
                    "rollup rows (open buckets, the flush to resend) of intervals no longer configured are not written"
                );
            }
            inflight = cp.inflight.take();
        }
        let Some(types) = self
            .retry("preparing the rollup tables", &mut shutdown, || {
                self.ensure_tables()
            })
            .await
        else {
            return;
        };
        if let Some(f) = &inflight {
            tracing::info!(
                flush = f.id,
                rows = f.rows.len(),
                "writing the rollup flush the last run may not have finished"
            );
            if self
                .retry("writing rollup rows", &mut shutdown, || {
                    self.insert(f, &types)
                })
                .await
                .is_none()
            {
                return;
            }
        }
        tracing::info!(
            sink = ROLLUP_SINK,
            from_seq = start + 1,
            open = state.open_buckets(),
            "rollup started"
        );
        let mut tail = TailReader::new(self.wal.clone(), start);
        let (mut read_upto, mut saved_seq) = (start, start);
        let mut saved_at = Instant::now();
        let mut inflight_saved = inflight.is_some();
        let delay_ms = self.cfg.delay.as_millis() as u64;
        let tick =
            (self.cfg.delay / 4).clamp(Duration::from_millis(20), Duration::from_millis(500));
        let mut last_forget = Instant::now();
        self.publish(saved_seq, &state, 0);
        loop {
            if *shutdown.borrow() {
                break;
            }
            let records = match tail.read().await {
                Ok(r) => r,
                Err(e) => {
                    let _ = self
                        .status
                        .set_retrying(&self.metrics, &format!("reading the WAL: {e}"));
                    tracing::error!(sink = ROLLUP_SINK, error = %e, "rollup cannot read the WAL; retrying");
                    let mut d = self.retry_max;
                    if !backoff(&mut d, self.retry_max, &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let idle = records.is_empty();
            let now = now_ms();
            for rec in records {
                read_upto = rec.seq;
                if rec.table != SOURCE_TABLE {
                    continue;
                }
                let batch = self
                    .registry
                    .get_version(&rec.table, rec.version)
                    .ok_or_else(|| {
                        format!(
                            "table {} version {} is not registered",
                            rec.table, rec.version
                        )
                    })
                    .and_then(|t| {
                        rec.decode(t.arrow_schema.clone())
                            .map_err(|e| e.to_string())
                    });
                match batch {
                    Ok(b) => self.count(state.add_batch(&b, now)),
                    Err(e) => {
                        tracing::error!(sink = ROLLUP_SINK, seq = rec.seq, error = %e, "cannot decode a metrics record: its points are not rolled up");
                        self.metrics
                            .rollup
                            .refused_points
                            .with_label_values(&["undecodable"])
                            .inc();
                        let _ = self
                            .status
                            .set_retrying(&self.metrics, &format!("record {}: {e}", rec.seq));
                    }
                }
            }
            let over = state.open_buckets() > self.cfg.max_open_buckets;
            let due = state.take_due(now_ms(), delay_ms, over);
            if !due.is_empty() {
                let flush = Flush {
                    id: next_flush_id,
                    rows: due,
                };
                next_flush_id += 1;
                let cp = Checkpoint::of(
                    &state,
                    self.wal.id(),
                    read_upto,
                    next_flush_id,
                    Some(flush.clone()),
                );
                if !self.save(cp, &mut shutdown).await {
                    break;
                }
                (saved_seq, saved_at, inflight_saved) = (read_upto, Instant::now(), true);
                self.publish(saved_seq, &state, flush.rows.len());
                if self
                    .retry("writing rollup rows", &mut shutdown, || {
                        self.insert(&flush, &types)
                    })
                    .await
                    .is_none()
                {
                    break;
                }
            } else if (read_upto > saved_seq || inflight_saved)
                && saved_at.elapsed() >= self.cfg.checkpoint_every
            {
                let cp = Checkpoint::of(&state, self.wal.id(), read_upto, next_flush_id, None);
                if !self.save(cp, &mut shutdown).await {
                    break;
                }
                (saved_seq, saved_at, inflight_saved) = (read_upto, Instant::now(), false);
            }
            if last_forget.elapsed() >= Duration::from_secs(60) {
                last_forget = Instant::now();
                state.forget_idle_series();
            }
            self.publish(saved_seq, &state, 0);
            if idle {
                tail.wait(tick, &mut shutdown).await;
            }
        }
    }

    fn count(&self, added: state::Added) {
        let m = &self.metrics.rollup;
        m.points.inc_by(added.points);
        for (iv, n) in self.intervals.iter().zip(&added.late) {
            if *n > 0 {
                m.late_points.with_label_values(&[&iv.name]).inc_by(*n);
            }
        }
        for (reason, n, first) in added.refused {
            m.refused_points.with_label_values(&[reason]).inc_by(n);
            tracing::warn!(sink = ROLLUP_SINK, reason, points = n, first = %first, "metric points not rolled up");
        }
    }
}

/// The SELECT of a rollup table's `_merged` view: one row per bucket and series, the rows
/// a bucket got (one per write) summed exactly.
pub fn merged_view_select(table: &str) -> String {
    // The columns are qualified: `sum(sum_v) AS sum_v` would otherwise make `sum_v` in
    // `sum(sum_v) / sum(count_v)` the alias, an aggregate inside an aggregate.
    format!(
        "SELECT bucket, metric_name, labels, sum({table}.sum_v) / sum({table}.count_v) AS avg_v, \
         max({table}.max_v) AS max_v, min({table}.min_v) AS min_v, sum({table}.sum_v) AS sum_v, \
         sum({table}.count_v) AS count_v FROM {table} GROUP BY bucket, metric_name, labels"
    )
}

/// The rows of one interval as a batch of [`COLUMNS`].
fn rows_batch(rows: &[&FlushRow]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("bucket", DataType::Timestamp(TimeUnit::Second, None), false),
        Field::new("metric_name", DataType::Utf8, false),
        Field::new("labels", DataType::Utf8, false),
        Field::new("avg_v", DataType::Float64, false),
        Field::new("max_v", DataType::Float64, false),
        Field::new("min_v", DataType::Float64, false),
        Field::new("sum_v", DataType::Float64, false),
        Field::new("count_v", DataType::UInt64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampSecondArray::from_iter_values(
                rows.iter().map(|r| r.bucket),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &*r.metric_name),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &*r.labels),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.agg.avg()),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.agg.max),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.agg.min),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.agg.sum),
            )),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|r| r.agg.count),
            )),
        ],
    )
    .expect("rollup columns match their schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_with_clear_errors() {
        let p = |v: &[&str]| parse_intervals(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let ok = p(&["1m", "1h", "30s", "1d"]).unwrap();
        assert_eq!(
            ok.iter().map(|i| i.secs).collect::<Vec<_>>(),
            vec![60, 3600, 30, 86400]
        );
        assert_eq!(ok[1].table(), "metrics_1h");
        for (bad, says) in [
            (vec!["1x"], "is not <number>"),
            (vec!["m"], "is not <number>"),
            (vec!["01m"], "is not <number>"),
            (vec!["-1m"], "is not <number>"),
            (vec!["8d"], "longer than 7 days"),
            (vec!["1m", "60s"], "same width as '1m'"),
            (vec![], "is empty"),
        ] {
            let e = p(&bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
