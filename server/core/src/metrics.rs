//! Prometheus metrics of the server, named `sluice_<area>_<what>_<unit>`.
//!
//! Counted per batch, never per row. Rendered in text form at `GET /metrics`.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All metrics, registered once in their own registry.
pub struct Metrics {
    registry: Registry,
    pub ingest_rows: IntCounterVec,
    pub ingest_bytes: IntCounterVec,
    pub refused_rows: IntCounterVec,
    pub refused_bytes: IntCounterVec,
    pub refused_batches: IntCounterVec,
    pub wal: sluice_wal::WalMetrics,
    pub memory_used_bytes: IntGauge,
    pub memory_budget_bytes: IntGauge,
    pub buffer_bytes: IntGaugeVec,
    pub buffer_rows: IntGaugeVec,
    pub archive_lag_seconds: IntGaugeVec,
    pub archive_files: IntCounterVec,
    pub archive_bytes: IntCounterVec,
    pub archive_rows: IntCounterVec,
    pub archive_errors: IntCounter,
    pub archive_compacted_files: IntCounterVec,
    pub archive_compactions: IntCounterVec,
    pub archive_expired_files: IntCounterVec,
    pub archive_job_errors: IntCounterVec,
    pub sink_rows: IntCounterVec,
    pub sink_bytes: IntCounterVec,
    pub sink_commits: IntCounterVec,
    pub sink_retries: IntCounterVec,
    pub sink_up: IntGaugeVec,
    pub sink_lag_records: IntGaugeVec,
    pub sink_lag_seconds: IntGaugeVec,
    pub sink_dead_letter_rows: IntCounterVec,
    pub sink_failed_tables: IntGaugeVec,
    pub timescaledb_job_failing: IntGaugeVec,
    pub timescaledb_job_runs: IntCounterVec,
    pub rollup: RollupMetrics,
}

/// The rollup's metrics (`sluice_rollup_*`).
#[derive(Clone)]
pub struct RollupMetrics {
    pub points: IntCounter,
    pub rows: IntCounterVec,
    pub flushes: IntCounter,
    pub late_points: IntCounterVec,
    pub refused_points: IntCounterVec,
    pub open_buckets: IntGauge,
    pub watermark_seconds: IntGaugeVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        Self {
            ingest_rows: counter_vec(
                &r,
                "sluice_ingest_rows_total",
                "Rows accepted (durable in the WAL)",
                &["table", "protocol"],
            ),
            ingest_bytes: counter_vec(
                &r,
                "sluice_ingest_bytes_total",
                "Arrow bytes accepted",
                &["table", "protocol"],
            ),
            refused_rows: counter_vec(
                &r,
                "sluice_ingest_refused_rows_total",
                "Rows of refused batches",
                &["table", "reason"],
            ),
            refused_bytes: counter_vec(
                &r,
                "sluice_ingest_refused_bytes_total",
                "Arrow bytes of refused batches",
                &["table", "reason"],
            ),
            refused_batches: counter_vec(
                &r,
                "sluice_ingest_refused_batches_total",
                "Refused batches",
                &["table", "reason"],
            ),
            wal: sluice_wal::WalMetrics::register(&r).expect("unique metric"),
            memory_used_bytes: gauge(
                &r,
                "sluice_memory_used_bytes",
                "In-flight and buffered bytes charged to the memory budget",
            ),
            memory_budget_bytes: gauge(
                &r,
                "sluice_memory_budget_bytes",
                "The configured memory budget",
            ),
            buffer_bytes: gauge_vec(
                &r,
                "sluice_buffer_bytes",
                "Bytes in the recent buffer",
                &["table"],
            ),
            buffer_rows: gauge_vec(
                &r,
                "sluice_buffer_rows",
                "Rows in the recent buffer",
                &["table"],
            ),
            archive_lag_seconds: gauge_vec(
                &r,
                "sluice_archive_lag_seconds",
                "Age of the oldest row not yet archived",
                &["table"],
            ),
            archive_files: counter_vec(
                &r,
                "sluice_archive_files_total",
                "Parquet files written",
                &["table"],
            ),
            archive_bytes: counter_vec(
                &r,
                "sluice_archive_bytes_total",
                "Parquet bytes written",
                &["table"],
            ),
            archive_rows: counter_vec(
                &r,
                "sluice_archive_rows_total",
                "Rows written to Parquet",
                &["table"],
            ),
            archive_errors: counter(
                &r,
                "sluice_archive_errors_total",
                "Failed archive flushes (retried)",
            ),
            archive_compacted_files: counter_vec(
                &r,
                "sluice_archive_compacted_files_total",
                "Small archive files merged into larger ones (and deleted once no query can read them)",
                &["table"],
            ),
            archive_compactions: counter_vec(
                &r,
                "sluice_archive_compactions_total",
                "Files compaction wrote, each the merge of a partition's small files",
                &["table"],
            ),
            archive_expired_files: counter_vec(
                &r,
                "sluice_archive_expired_files_total",
                "Archive files deleted because their hour is older than archive.retention",
                &["table"],
            ),
            archive_job_errors: counter_vec(
                &r,
                "sluice_archive_job_errors_total",
                "Failed runs of the archive's compaction and retention jobs (retried next round)",
                &["job"],
            ),
            sink_rows: counter_vec(
                &r,
                "sluice_sink_rows_total",
                "Rows a sink made durable in its store",
                &["sink", "table"],
            ),
            sink_bytes: counter_vec(
                &r,
                "sluice_sink_bytes_total",
                "Encoded bytes a sink sent to its store",
                &["sink", "table"],
            ),
            sink_commits: counter_vec(
                &r,
                "sluice_sink_commits_total",
                "Transactions (COPY or INSERT) a sink committed",
                &["sink", "table"],
            ),
            sink_retries: counter_vec(
                &r,
                "sluice_sink_retries_total",
                "Failed attempts a sink will retry (store down, connection lost, ...)",
                &["sink"],
            ),
            sink_up: gauge_vec(
                &r,
                "sluice_sink_up",
                "1 while the sink's last attempt succeeded, 0 while it retries",
                &["sink"],
            ),
            sink_lag_records: gauge_vec(
                &r,
                "sluice_sink_lag_records",
                "WAL records accepted but not yet durable in the sink's store",
                &["sink"],
            ),
            sink_lag_seconds: gauge_vec(
                &r,
                "sluice_sink_lag_seconds",
                "Age of the oldest WAL record not yet durable in the sink's store",
                &["sink"],
            ),
            sink_dead_letter_rows: counter_vec(
                &r,
                "sluice_sink_dead_letter_rows_total",
                "Rows the store refused permanently, written to the dead-letter Parquet files",
                &["sink", "table"],
            ),
            sink_failed_tables: gauge_vec(
                &r,
                "sluice_sink_failed_tables",
                "Tables the store refuses for good (their table cannot be created or altered); \
                 their rows go to the dead-letter files",
                &["sink"],
            ),
            timescaledb_job_failing: gauge_vec(
                &r,
                "sluice_timescaledb_job_failing",
                "1 for a TimescaleDB job whose last run by the store's scheduler failed, with \
                 the store's error text",
                &["job_id", "proc_name", "hypertable", "error"],
            ),
            timescaledb_job_runs: counter_vec(
                &r,
                "sluice_timescaledb_job_runs_total",
                "TimescaleDB jobs Sluice ran itself (CALL run_job), by outcome",
                &["proc_name", "outcome"],
            ),
            rollup: RollupMetrics {
                points: counter(
                    &r,
                    "sluice_rollup_points_total",
                    "Metric points added to the rollup's buckets",
                ),
                rows: counter_vec(
                    &r,
                    "sluice_rollup_rows_total",
                    "Bucket rows the rollup wrote to ClickHouse, per interval",
                    &["interval"],
                ),
                flushes: counter(
                    &r,
                    "sluice_rollup_flushes_total",
                    "Writes of due buckets to ClickHouse (one INSERT per interval each)",
                ),
                late_points: counter_vec(
                    &r,
                    "sluice_rollup_late_points_total",
                    "Points for a bucket already behind the watermark (rolled up all the same, as one more row for it)",
                    &["interval"],
                ),
                refused_points: counter_vec(
                    &r,
                    "sluice_rollup_refused_points_total",
                    "Points the rollup cannot aggregate, by reason (null, time_range, labels, columns, undecodable)",
                    &["reason"],
                ),
                open_buckets: gauge(
                    &r,
                    "sluice_rollup_open_buckets",
                    "Buckets with points not yet written to ClickHouse",
                ),
                watermark_seconds: gauge_vec(
                    &r,
                    "sluice_rollup_watermark_seconds",
                    "Per interval, the start (Unix seconds) of the first bucket that may still change: every earlier bucket is complete in ClickHouse",
                    &["interval"],
                ),
            },
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
