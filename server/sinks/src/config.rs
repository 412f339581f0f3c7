//! The store sinks' configuration sections: `[buffer]` and `[archive]` (the Parquet
//! archive), `[postgres]`, `[clickhouse]`. The binary's `Config` holds them; every key is
//! documented in `sluice.example.toml`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_core::ByteSize;

/// `[buffer]`: the recent in-memory buffer per table, flushed to the archive when any
/// bound is reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BufferConfig {
    /// Rows kept per table before a flush.
    pub max_rows: u64,
    /// Bytes (Arrow memory) kept per table before a flush; about the size of an archive file
    /// before compression.
    pub max_bytes: ByteSize,
    /// Age of the oldest buffered row that forces a flush.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_rows: 4_000_000,
            max_bytes: ByteSize::mib(256),
            max_age: Duration::from_secs(300),
        }
    }
}

/// `[archive]`: Parquet files on object storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// An object_store URL (`file:///abs/path`, `s3://bucket/prefix`, ...); default: the
    /// `archive` folder in the data directory. S3 credentials come from the usual
    /// `AWS_*` environment variables.
    pub url: Option<String>,
    /// zstd level of the Parquet files.
    pub zstd_level: i32,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// Testing aid: slow archive writes down to this many bytes per second.
    pub throttle_bytes_per_sec: Option<ByteSize>,
    /// How often the archive's jobs run: compaction of small files and retention.
    /// "0s" turns both off.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// A partition (table, hour) with at least this many files under half of
    /// `compact_target_size` has them merged into one file.
    pub compact_min_files: usize,
    /// Largest file compaction writes (sum of the merged files' sizes).
    pub compact_target_size: ByteSize,
    /// Files whose hour ended longer ago than this are deleted. "0s": kept for ever.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            url: None,
            zstd_level: 3,
            row_group_rows: 1_048_576,
            throttle_bytes_per_sec: None,
            maintenance_interval: Duration::from_secs(300),
            compact_min_files: 8,
            compact_target_size: ByteSize::mib(128),
            retention: Duration::ZERO,
        }
    }
}

/// `[postgres]`: the PostgreSQL/TimescaleDB sink and registry (used when `url` is set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgresql://user:pass@host:port/db`. When set, tables routed to `postgres` are
    /// written there and the schema registry lives in its `table_registry` table.
    pub url: Option<String>,
    /// Connections to keep; each runs one COPY at a time, so this is also the number of
    /// COPY streams in parallel.
    pub pool_size: usize,
    /// A table's rows are coalesced into one COPY of about this many rows...
    pub batch_rows: usize,
    /// ...or this many bytes of Arrow data, whichever comes first...
    pub batch_bytes: ByteSize,
    /// ...or whatever has arrived after this long.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Label sets whose `metric_series` id is cached in memory.
    pub series_cache_size: usize,
    /// Apply `migrations/postgres` on start (what `sluice migrate` does).
    pub migrate_on_start: bool,
    /// First wait after a failed COPY; doubles per failure up to `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Plain PostgreSQL (no TimescaleDB): daily partitions of `metrics_points` are created
    /// this many days ahead.
    pub partition_days_ahead: u32,
    /// Plain PostgreSQL: partitions wholly older than this are dropped (the seed's
    /// retention policy).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the maintenance task runs (partitions, retention, `metrics_1m`; on
    /// TimescaleDB, watching the store's jobs).
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// Whether a fresh database is set up on TimescaleDB: `auto` when the extension is
    /// usable (created, or installed and in `shared_preload_libraries`), plain PostgreSQL
    /// when it is not installed, and an error when it is installed but not preloaded;
    /// `require` refuses to go on without it; `off` always takes plain PostgreSQL.
    pub timescaledb: TimescaleMode,
    /// Who runs TimescaleDB's policy jobs (compression, retention, continuous aggregate
    /// refresh): `auto` lets the store's scheduler run them and runs a job itself, on the
    /// job's schedule, while the scheduler's runs of it fail; `sluice` always runs them
    /// itself; `store` never does (failures are still reported).
    pub timescaledb_jobs: JobsMode,
}

/// `postgres.timescaledb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimescaleMode {
    #[default]
    Auto,
    Require,
    Off,
}

/// `postgres.timescaledb_jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobsMode {
    #[default]
    Auto,
    Sluice,
    Store,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: None,
            pool_size: 4,
            batch_rows: 200_000,
            batch_bytes: ByteSize::mib(16),
            linger: Duration::from_millis(200),
            series_cache_size: 100_000,
            migrate_on_start: true,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            partition_days_ahead: 3,
            retention: Duration::from_secs(30 * 86400),
            maintenance_interval: Duration::from_secs(60),
            timescaledb: TimescaleMode::Auto,
            timescaledb_jobs: JobsMode::Auto,
        }
    }
}

/// `[clickhouse]`: the ClickHouse sink (used when `url` is set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP endpoint, e.g. `http://localhost:8123`. When set, tables routed to
    /// `clickhouse` are inserted there in Native format.
    pub url: Option<String>,
    pub database: String,
    pub user: String,
    pub password: String,
    /// Inserts in flight at once (each on its own HTTP connection).
    pub pool_size: usize,
    /// A table's rows are coalesced into one INSERT of about this many rows...
    pub batch_rows: usize,
    /// ...or this many bytes of Arrow data, whichever comes first...
    pub batch_bytes: ByteSize,
    /// ...or whatever has arrived after this long. An insert is streamed while its rows
    /// arrive, so waiting costs no throughput; an insert that is part of a burst (it holds
    /// a quarter of the targets, or the previous one filled up) is also finished once no
    /// rows came for a fifth of this.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Compression of INSERT bodies: `none`, `lz4` or `zstd`. `none` is the cheapest on a
    /// fast local network; compression pays off across slower links.
    pub compression: HttpCompression,
    /// Apply `migrations/clickhouse` on start (what `sluice migrate` does).
    pub migrate_on_start: bool,
    /// `non_replicated_deduplication_window` of tables sluice creates: how many recent
    /// inserts ClickHouse remembers to drop a replayed one.
    pub dedup_window: u64,
    /// First wait after a failed INSERT; doubles per failure up to `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Timeout of one HTTP request (an INSERT of one chunk, a DDL statement).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// For an `https://` url: a PEM file of CA certificates to trust besides the
    /// system's (a private CA or a self-signed server certificate).
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// Compression of HTTP request bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpCompression {
    None,
    Lz4,
    Zstd,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: None,
            database: "default".into(),
            user: "default".into(),
            password: String::new(),
            pool_size: 4,
            batch_rows: 500_000,
            batch_bytes: ByteSize::mib(64),
            linger: Duration::from_millis(500),
            compression: HttpCompression::Lz4,
            migrate_on_start: true,
            dedup_window: 1000,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(300),
            tls_ca_file: None,
        }
    }
}

/// `[rollup]`: aggregates of every metric series per interval, written to ClickHouse
/// (`metrics_1m`, and `metrics_<interval>` for other intervals) from the points the WAL
/// holds. Runs when ClickHouse is configured (`[clickhouse] url`) and `enabled`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RollupConfig {
    pub enabled: bool,
    /// Bucket widths, each `<n><s|m|h|d>`: `"1m"` writes `metrics_1m`, `"1h"`
    /// `metrics_1h` (created like `metrics_1m` when missing).
    pub intervals: Vec<String>,
    /// A bucket is written this long (wall clock) after its last point arrived, whatever
    /// the points' own times.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// How far behind the newest point time points are still expected: the watermark
    /// (`sluice_rollup_watermark_seconds`) trails the newest point by this much. Later
    /// points are rolled up too (one more row for their bucket) and counted in
    /// `sluice_rollup_late_points_total`.
    #[serde(with = "humantime_serde")]
    pub lateness: Duration,
    /// Most buckets held open at once (a backfill spanning months opens many): past it,
    /// every open bucket is written at once.
    pub max_open_buckets: usize,
    /// How often the state is saved when no bucket is due (each write saves it too).
    #[serde(with = "humantime_serde")]
    pub checkpoint_every: Duration,
}

impl Default for RollupConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            intervals: vec!["1m".into()],
            delay: Duration::from_secs(5),
            lateness: Duration::from_secs(600),
            max_open_buckets: 1_000_000,
            checkpoint_every: Duration::from_secs(10),
        }
    }
}
