//! Configuration: defaults, then a TOML file (`--config`), then environment variables
//! `SLUICE__SECTION__KEY`, then [`Config::validate`].
//!
//! Every key is documented in the checked-in `sluice.example.toml`. An invalid value is
//! refused at start with an error that names the key and, when it came from the
//! environment, the variable.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment prefix of config overrides.
pub const ENV_PREFIX: &str = "SLUICE__";

/// A byte size: an integer, or a string such as `"64MiB"`, `"1GB"`, `"512k"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }
    pub const fn gib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024 * 1024)
    }
    pub fn as_u64(self) -> u64 {
        self.0
    }
    pub fn as_usize(self) -> usize {
        self.0 as usize
    }

    /// Parses `123`, `64MiB`, `64MB`, `1g`, `512 KiB` (binary units for k/m/g/t).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a size (examples: 1048576, \"64MiB\", \"1GiB\")"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            u => {
                return Err(format!(
                    "unknown size unit '{u}' in '{s}' (use B, KiB, MiB, GiB, TiB)"
                ))
            }
        };
        Ok(ByteSize((num * mult as f64) as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", b >> 30)
        } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes or a string like \"64MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub wal: WalConfig,
    pub memory: MemoryConfig,
    pub buffer: BufferConfig,
    pub archive: ArchiveConfig,
    pub postgres: PostgresConfig,
    pub clickhouse: ClickHouseConfig,
    pub query: QueryConfig,
}

/// `[query]`: where SQL runs (threads of its own, apart from ingest) and what one query
/// may take.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// Worker threads that plan and run queries, apart from ingest's. 0: half the cores,
    /// at least 1.
    pub threads: usize,
    /// Stack of each query thread: planning recurses once per level of nesting.
    pub stack_size: ByteSize,
    /// CPU priority of the query threads, as `nice` (0 to 19): the higher, the more CPU
    /// goes to ingest while a query runs.
    pub nice: i32,
    /// A query still running after this is stopped (planning included).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Queries that run at once; more wait for a slot (up to `timeout`).
    pub max_concurrent: usize,
    /// Most memory one query's sorts, joins and aggregates may hold, and the largest value
    /// one function may compute; past it the query ends with a message naming this key
    /// (sorts spill to disk first).
    pub memory_limit: ByteSize,
    /// Most memory all running queries may hold together.
    pub total_memory: ByteSize,
    /// Longest SQL text accepted.
    pub max_sql_bytes: ByteSize,
    /// Deepest nesting of expressions, subqueries and `UNION`s accepted (`a + b + c`
    /// nests one level per term).
    pub max_depth: usize,
    /// Most expression nodes in one statement.
    pub max_nodes: usize,
    /// Most spill files of all queries together on the local disk (sorts and aggregates
    /// past their memory limit), in the system's temporary directory.
    pub max_spill: ByteSize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            stack_size: ByteSize::mib(64),
            nice: 10,
            timeout: Duration::from_secs(60),
            max_concurrent: 4,
            memory_limit: ByteSize::mib(256),
            total_memory: ByteSize::mib(512),
            max_sql_bytes: ByteSize(256 * 1024),
            max_depth: 128,
            max_nodes: 100_000,
            max_spill: ByteSize::gib(1),
        }
    }
}

impl QueryConfig {
    /// Worker threads: `threads`, or half the cores (at least 1).
    pub fn worker_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
    }
}

/// `[server]`: listeners and data directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listener: Arrow Flight (and later Flight SQL, OTLP).
    pub grpc_addr: SocketAddr,
    /// HTTP listener: schema API, SQL API, health and metrics.
    pub http_addr: SocketAddr,
    /// WAL, embedded registry and the default local archive live here.
    pub data_dir: PathBuf,
    /// Largest single gRPC message (one Flight batch) accepted.
    pub max_message_size: ByteSize,
    /// How long shutdown waits for in-flight requests before it cuts them off.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Most connections open at once, HTTP and gRPC together; more wait to be accepted.
    /// 0: the open-file limit (raised to its hard limit at start) less 512 kept for the
    /// WAL, the archive and the stores, at most 4096.
    pub max_connections: usize,
    /// A connection with no byte read or written for this long is closed (idle
    /// keep-alives, clients that never send a request).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time an HTTP client has to send a request's line and headers.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time an HTTP client has to send a request's body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50051".parse().unwrap(),
            http_addr: "127.0.0.1:8080".parse().unwrap(),
            data_dir: PathBuf::from("./sluice-data"),
            max_message_size: ByteSize::mib(64),
            shutdown_timeout: Duration::from_secs(30),
            max_connections: 0,
            idle_timeout: Duration::from_secs(120),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// `[wal]`: the write-ahead log every accepted batch goes through before its ack.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    /// fsync before acknowledging (group commit shares one fsync among many batches).
    /// Turning it off keeps acked data safe from a process crash but not from power loss.
    pub fsync: bool,
    /// A new segment file is started once the current one reaches this size.
    pub segment_size: ByteSize,
    /// Most bytes written per group commit before an fsync.
    pub max_group_bytes: ByteSize,
    /// Compression of WAL records (Arrow IPC body compression): `none`, `lz4` or `zstd`.
    /// Compression trades CPU for disk bandwidth per fsync; it pays off only where the
    /// disk is slower than a core compresses (on the 2-core test machine it did not:
    /// LZ4 cut logs ingest from 1.26 to 0.86 M rows/s).
    pub compression: WalCompression,
    /// Most disk the WAL may hold. Segments stay until every sink has their records, so
    /// while a store is down the WAL grows; past this size writes are refused with
    /// RESOURCE_EXHAUSTED until the sinks catch up.
    pub disk_budget: ByteSize,
    /// Most bytes of recent durable batches kept decoded in memory for the store sinks:
    /// a sink that keeps up takes records from here instead of reading and decoding the
    /// WAL again. Records every sink has taken are dropped at once, so this is extra
    /// memory (beyond `memory.budget`) only while a sink lags; one that lags further reads
    /// the WAL from disk. 0 turns it off.
    pub feed_bytes: ByteSize,
    /// Write segments with direct I/O (`O_DIRECT`, Linux), bypassing the page cache: the
    /// page cache's copy and write-back cost more CPU than the disk write itself. Falls back
    /// to buffered writes by itself where the file system refuses it (tmpfs).
    pub direct_io: bool,
}

/// Compression of WAL records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalCompression {
    None,
    Lz4,
    Zstd,
}

impl WalCompression {
    /// The Arrow IPC compression this stands for.
    pub fn ipc(self) -> Option<arrow::ipc::CompressionType> {
        match self {
            WalCompression::None => None,
            WalCompression::Lz4 => Some(arrow::ipc::CompressionType::LZ4_FRAME),
            WalCompression::Zstd => Some(arrow::ipc::CompressionType::ZSTD),
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            fsync: true,
            segment_size: ByteSize::mib(128),
            max_group_bytes: ByteSize::mib(64),
            compression: WalCompression::None,
            disk_budget: ByteSize::gib(20),
            feed_bytes: ByteSize::mib(256),
            direct_io: true,
        }
    }
}

/// `[memory]`: the global budget for in-flight and buffered data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// In-flight plus buffered (not yet archived) batches never exceed this; when it is
    /// full, writers are slowed through flow control instead of memory growing.
    pub budget: ByteSize,
    /// Freed memory kept for reuse before it is given back to the system (default: an
    /// eighth of `budget`). Batch-sized buffers carved from kept pages cost no page faults:
    /// that halved sluice's CPU per row in `bench/run.sh ch`. Everything is given back
    /// once ingest pauses for 10 s.
    pub keep_freed: Option<ByteSize>,
}

impl MemoryConfig {
    /// `keep_freed`, or its default.
    pub fn keep_freed(&self) -> u64 {
        self.keep_freed
            .map_or(self.budget.as_u64() / 8, |b| b.as_u64())
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            budget: ByteSize::mib(1024),
            keep_freed: None,
        }
    }
}

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
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            url: None,
            zstd_level: 3,
            row_group_rows: 1_048_576,
            throttle_bytes_per_sec: None,
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

/// A configuration error, naming the key (and the variable or file it came from).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Loads defaults, then `file` (if any), then `SLUICE__*` from `env`, then validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut root = toml::Table::new();
        let source = file.map(|p| p.display().to_string());
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            root = toml::from_str(&text)
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        }
        let mut from_env = BTreeSet::new();
        for (key, raw) in env {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(ConfigError(format!(
                    "environment variable {key}: expected SLUICE__SECTION__KEY"
                )));
            }
            let value = parse_env_value(&raw);
            let mut table = &mut root;
            for section in &path[..path.len() - 1] {
                let entry = table
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = entry.as_table_mut().ok_or_else(|| {
                    ConfigError(format!(
                        "environment variable {key}: '{section}' is not a section"
                    ))
                })?;
            }
            table.insert(path[path.len() - 1].clone(), value);
            from_env.insert((path.join("."), key));
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(root)).map_err(|e| {
                let key = e.path().to_string();
                let origin = from_env
                    .iter()
                    .find(|(p, _)| *p == key || key.starts_with(&format!("{p}.")))
                    .map(|(_, var)| format!(" (from environment variable {var})"))
                    .or_else(|| source.as_ref().map(|s| format!(" (in {s})")))
                    .unwrap_or_default();
                ConfigError(format!("key '{key}'{origin}: {}", e.inner()))
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, msg: String| Err(ConfigError(format!("key '{key}': {msg}")));
        let budget = self.memory.budget.as_u64();
        if budget < ByteSize::mib(16).as_u64() {
            return err(
                "memory.budget",
                format!("{} is too small; at least 16MiB", self.memory.budget),
            );
        }
        if self.server.max_message_size.as_u64() > budget / 2 {
            return err(
                "server.max_message_size",
                format!(
                    "{} is more than half of memory.budget ({}); one message must fit the budget twice",
                    self.server.max_message_size, self.memory.budget
                ),
            );
        }
        if self.server.max_message_size.as_u64() < 1024 {
            return err("server.max_message_size", "must be at least 1KiB".into());
        }
        if self.buffer.max_bytes.as_u64() > budget / 2 {
            return err(
                "buffer.max_bytes",
                format!(
                    "{} is more than half of memory.budget ({}); a flush must be able to start before the budget is full",
                    self.buffer.max_bytes, self.memory.budget
                ),
            );
        }
        if self.buffer.max_rows == 0 {
            return err("buffer.max_rows", "must be at least 1".into());
        }
        if self.buffer.max_age.is_zero() {
            return err("buffer.max_age", "must be more than 0s".into());
        }
        if self.wal.segment_size.as_u64() < ByteSize::mib(1).as_u64() {
            return err("wal.segment_size", "must be at least 1MiB".into());
        }
        if self.wal.disk_budget.as_u64() < 2 * self.wal.segment_size.as_u64() {
            return err(
                "wal.disk_budget",
                format!(
                    "{} is less than twice wal.segment_size ({}); the WAL needs room for a full segment and the one being written",
                    self.wal.disk_budget, self.wal.segment_size
                ),
            );
        }
        if self.wal.max_group_bytes.as_u64() == 0 {
            return err("wal.max_group_bytes", "must be more than 0".into());
        }
        if !(1..=22).contains(&self.archive.zstd_level) {
            return err(
                "archive.zstd_level",
                format!("{} is not a zstd level (1..=22)", self.archive.zstd_level),
            );
        }
        if self.archive.row_group_rows == 0 {
            return err("archive.row_group_rows", "must be at least 1".into());
        }
        if let Some(t) = self.archive.throttle_bytes_per_sec {
            if t.as_u64() == 0 {
                return err(
                    "archive.throttle_bytes_per_sec",
                    "must be more than 0 (or unset)".into(),
                );
            }
        }
        if let Some(url) = &self.archive.url {
            if url::Url::parse(url).is_err() {
                return err("archive.url", format!("'{url}' is not a URL (examples: file:///var/lib/sluice/archive, s3://bucket/prefix)"));
            }
        }
        if let Some(url) = &self.postgres.url {
            if let Err(message) = crate::postgres::check_url(url) {
                return err("postgres.url", message);
            }
        }
        if self.postgres.pool_size == 0 || self.postgres.pool_size > 64 {
            return err("postgres.pool_size", "must be between 1 and 64".into());
        }
        if self.postgres.batch_rows == 0 {
            return err("postgres.batch_rows", "must be at least 1".into());
        }
        if self.postgres.series_cache_size == 0 {
            return err("postgres.series_cache_size", "must be at least 1".into());
        }
        if self.postgres.retry_initial.is_zero()
            || self.postgres.retry_max < self.postgres.retry_initial
        {
            return err(
                "postgres.retry_max",
                "retry_initial must be more than 0s and retry_max at least retry_initial".into(),
            );
        }
        for (key, t) in [
            ("server.idle_timeout", self.server.idle_timeout),
            ("server.header_timeout", self.server.header_timeout),
            ("server.body_timeout", self.server.body_timeout),
        ] {
            if t.is_zero() {
                return err(key, "must be more than 0s".into());
            }
        }
        if !(0..=19).contains(&self.query.nice) {
            return err(
                "query.nice",
                format!("{} is not a nice value (0..=19)", self.query.nice),
            );
        }
        if self.query.stack_size.as_u64() < ByteSize::mib(8).as_u64() {
            return err("query.stack_size", "must be at least 8MiB".into());
        }
        if self.query.timeout.is_zero() {
            return err("query.timeout", "must be more than 0s".into());
        }
        if self.query.max_concurrent == 0 {
            return err("query.max_concurrent", "must be at least 1".into());
        }
        if self.query.memory_limit.as_u64() < ByteSize::mib(1).as_u64() {
            return err("query.memory_limit", "must be at least 1MiB".into());
        }
        if self.query.total_memory < self.query.memory_limit {
            return err(
                "query.total_memory",
                format!(
                    "{} is less than query.memory_limit ({})",
                    self.query.total_memory, self.query.memory_limit
                ),
            );
        }
        if self.query.max_depth < 8 || self.query.max_depth > 1000 {
            return err(
                "query.max_depth",
                "must be between 8 and 1000 (deeper plans need query.stack_size to grow too)"
                    .into(),
            );
        }
        if self.query.max_nodes == 0 || self.query.max_sql_bytes.as_u64() < 1024 {
            return err(
                "query.max_nodes",
                "query.max_nodes must be at least 1 and query.max_sql_bytes at least 1KiB".into(),
            );
        }
        if let Some(url) = &self.clickhouse.url {
            match url::Url::parse(url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => {
                    return err(
                        "clickhouse.url",
                        format!("'{url}' is not an http(s) URL of ClickHouse's HTTP interface (e.g. http://localhost:8123)"),
                    )
                }
            }
        }
        if self.clickhouse.pool_size == 0 || self.clickhouse.pool_size > 64 {
            return err("clickhouse.pool_size", "must be between 1 and 64".into());
        }
        if self.clickhouse.batch_rows == 0 {
            return err("clickhouse.batch_rows", "must be at least 1".into());
        }
        if self.clickhouse.retry_initial.is_zero()
            || self.clickhouse.retry_max < self.clickhouse.retry_initial
        {
            return err(
                "clickhouse.retry_max",
                "retry_initial must be more than 0s and retry_max at least retry_initial".into(),
            );
        }
        Ok(())
    }
}

/// An env value is read as a TOML literal when it is one (`true`, `42`, `"x"`, `[1, 2]`),
/// otherwise as a plain string (`127.0.0.1:0`, `64MiB`).
fn parse_env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.server.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.server.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.data_dir, PathBuf::from("./sluice-data"));
        assert!(c.wal.fsync);
    }

    #[test]
    fn env_overrides_file_and_names_bad_keys() {
        let c = Config::load(
            None,
            env(&[
                ("SLUICE__SERVER__GRPC_ADDR", "127.0.0.1:0"),
                ("SLUICE__WAL__FSYNC", "false"),
                ("SLUICE__MEMORY__BUDGET", "64MiB"),
                ("SLUICE__BUFFER__MAX_BYTES", "16MiB"),
                ("SLUICE__SERVER__MAX_MESSAGE_SIZE", "8MiB"),
                ("SLUICE__BUFFER__MAX_AGE", "5s"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.grpc_addr.port(), 0);
        assert!(!c.wal.fsync);
        assert_eq!(c.memory.budget, ByteSize::mib(64));
        assert_eq!(c.buffer.max_age, Duration::from_secs(5));

        let e = Config::load(None, env(&[("SLUICE__SERVER__GRPC_ADDR", "nowhere")])).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("server.grpc_addr") && m.contains("SLUICE__SERVER__GRPC_ADDR"),
            "{m}"
        );

        let e = Config::load(None, env(&[("SLUICE__SERVER__GPRC_ADDR", "x")])).unwrap_err();
        assert!(e.to_string().contains("unknown field `gprc_addr`"), "{e}");

        let e = Config::load(None, env(&[("SLUICE__MEMORY__BUDGET", "12 parsecs")])).unwrap_err();
        assert!(e.to_string().contains("memory.budget"), "{e}");

        let e = Config::load(None, env(&[("SLUICE__MEMORY__BUDGET", "1MiB")])).unwrap_err();
        assert!(
            e.to_string()
                .contains("key 'memory.budget': 1MiB is too small"),
            "{e}"
        );
    }

    #[test]
    fn example_file_loads_and_documents_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice.example.toml");
        let c = Config::load(Some(&path), env(&[])).unwrap();
        assert_eq!(c.server.grpc_addr.to_string(), "127.0.0.1:50051");
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (section, keys) in defaults {
            assert!(
                text.contains(&format!("[{section}]")),
                "example lacks [{section}]"
            );
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    text.contains(&format!("{key} =")),
                    "example lacks {section}.{key}"
                );
            }
        }
        for key in ["url", "throttle_bytes_per_sec"] {
            assert!(text.contains(&format!("{key} =")), "example lacks {key}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("64MiB").unwrap(), ByteSize::mib(64));
        assert_eq!(ByteSize::parse("1g").unwrap().as_u64(), 1 << 30);
        assert_eq!(ByteSize::parse("512").unwrap().as_u64(), 512);
        assert!(ByteSize::parse("5 furlongs").is_err());
    }
}
