//! Configuration: defaults, then a TOML file (`--config`), then environment variables
//! `SLUICE__SECTION__KEY`, then [`Config::validate`].
//!
//! Every key is documented in the checked-in `sluice.example.toml`. An invalid value is
//! refused at start with an error that names the key and, when it came from the
//! environment, the variable.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use sluice_core::ByteSize;
pub use sluice_frontends::query::QueryConfig;
pub use sluice_sinks::config::{
    ArchiveConfig, BufferConfig, ClickHouseConfig, HttpCompression, JobsMode, PostgresConfig,
    RollupConfig, TimescaleMode,
};

/// Environment prefix of config overrides.
pub const ENV_PREFIX: &str = "SLUICE__";

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
    pub otlp: OtlpConfig,
    pub rollup: RollupConfig,
}

/// `[otlp]`: what the OTLP doors write besides the seed tables.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// Also write OTLP logs and spans into `otel_logs` and `otel_traces` (with
    /// `otel_traces_trace_id_ts` and its view), the tables of the OpenTelemetry
    /// Collector's ClickHouse exporter, so the Grafana ClickHouse plugin's OTel views
    /// work on Sluice's data. ClickHouse only: needs `[clickhouse] url`.
    pub otel_tables: bool,
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
    /// Largest HTTP write body (`/write/...`), as received and again once decompressed;
    /// a larger one is refused with 413.
    pub max_body_size: ByteSize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50051".parse().unwrap(),
            http_addr: "127.0.0.1:8080".parse().unwrap(),
            data_dir: PathBuf::from("./sluice-data"),
            max_message_size: ByteSize::mib(64),
            max_body_size: ByteSize::mib(64),
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
        // Keys whose value is text: an environment value for them stays text even when it
        // reads as a TOML number or boolean (a password "123456").
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
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
            let is_text = matches!(
                path[..path.len() - 1]
                    .iter()
                    .try_fold(&defaults, |t, k| t.get(k).and_then(toml::Value::as_table))
                    .and_then(|t| t.get(&path[path.len() - 1])),
                Some(toml::Value::String(_))
            );
            let value = match parse_env_value(&raw) {
                toml::Value::String(v) => toml::Value::String(v),
                _ if is_text => toml::Value::String(raw.clone()),
                other => other,
            };
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
        if self.otlp.otel_tables && self.clickhouse.url.is_none() {
            return err(
                "otlp.otel_tables",
                "the otel_logs and otel_traces tables live in ClickHouse: set [clickhouse] url too"
                    .into(),
            );
        }
        if self.rollup.enabled {
            if let Err(e) = sluice_sinks::rollup::parse_intervals(&self.rollup.intervals) {
                return err("rollup.intervals", e);
            }
            if self.rollup.max_open_buckets == 0 {
                return err("rollup.max_open_buckets", "must be at least 1".into());
            }
        }
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
        if self.server.max_body_size.as_u64() < 1024 {
            return err("server.max_body_size", "must be at least 1KiB".into());
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
            if let Err(e) = sluice_sinks::postgres::check_url(url) {
                return err("postgres.url", e.to_string());
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
    fn text_keys_keep_digits_from_the_environment_as_text() {
        let c = Config::load(
            None,
            env(&[
                ("SLUICE__CLICKHOUSE__PASSWORD", "123456"),
                ("SLUICE__CLICKHOUSE__USER", "true"),
                ("SLUICE__CLICKHOUSE__DATABASE", r#""quoted""#),
                ("SLUICE__CLICKHOUSE__POOL_SIZE", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(c.clickhouse.password, "123456");
        assert_eq!(c.clickhouse.user, "true");
        assert_eq!(c.clickhouse.database, "quoted");
        assert_eq!(c.clickhouse.pool_size, 3);
    }

    #[test]
    fn rollup_intervals_are_checked_at_start() {
        let e = Config::load(
            None,
            env(&[("SLUICE__ROLLUP__INTERVALS", r#"["1m", "1q"]"#)]),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("key 'rollup.intervals'") && e.to_string().contains("'1q'"),
            "{e}"
        );
        let c = Config::load(
            None,
            env(&[("SLUICE__ROLLUP__INTERVALS", r#"["1m", "1h"]"#)]),
        )
        .unwrap();
        assert_eq!(c.rollup.intervals, vec!["1m", "1h"]);
        assert!(Config::default().rollup.enabled, "on by default");
    }

    #[test]
    fn otel_tables_need_clickhouse() {
        let e = Config::load(None, env(&[("SLUICE__OTLP__OTEL_TABLES", "true")])).unwrap_err();
        assert!(
            e.to_string().contains("key 'otlp.otel_tables'")
                && e.to_string().contains("[clickhouse] url"),
            "{e}"
        );
        let c = Config::load(
            None,
            env(&[
                ("SLUICE__OTLP__OTEL_TABLES", "true"),
                ("SLUICE__CLICKHOUSE__URL", "http://127.0.0.1:8123"),
            ]),
        )
        .unwrap();
        assert!(c.otlp.otel_tables);
        assert!(!Config::default().otlp.otel_tables, "off by default");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("64MiB").unwrap(), ByteSize::mib(64));
        assert_eq!(ByteSize::parse("1g").unwrap().as_u64(), 1 << 30);
        assert_eq!(ByteSize::parse("512").unwrap().as_u64(), 512);
        assert!(ByteSize::parse("5 furlongs").is_err());
    }
}
