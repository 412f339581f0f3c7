//! Applies `migrations/clickhouse` to the configured database: what `sluice migrate` (and
//! `clickhouse.migrate_on_start`) runs.
//!
//! # What flows in and out
//! In: a [`ChClient`]. Out: a [`MigrationReport`] saying whether the database uses the
//! tiered storage policy `hot_warm_cold` and which migrations were applied now.
//!
//! # The files
//! The SQL files are compiled into the binary ([`MIGRATIONS`]) and named
//! `NNNN_name[.variant].sql`, applied in order of their 4-digit version:
//! - `NNNN_name.sql` always runs;
//! - `NNNN_name.tiered.sql` runs when the server has the storage policy `hot_warm_cold`
//!   (`deploy/clickhouse/storage.xml`): the seed's tables as written, with
//!   `TTL ... TO VOLUME 'warm'/'cold'` moves and `storage_policy = 'hot_warm_cold'`;
//! - `NNNN_name.plain.sql` runs when it does not: the same columns, partitioning and
//!   order, with the TTL deletes only.
//!
//! A fresh database takes the tiered path when the policy exists. Once a variant has been
//! applied the path is fixed: a database set up without the policy stays plain even if
//! the policy is installed later (tables keep the policy they were created with).
//!
//! # No transactions
//! ClickHouse has no DDL transactions, so every file is idempotent (`IF NOT EXISTS`
//! everywhere) and runs statement by statement ([`split_statements`]: `;` outside
//! quotes and comments); its row in `sluice_schema_migrations` is written after its last
//! statement. A run interrupted half-way simply applies the file again. Two sluice
//! processes migrating at once both succeed: each statement is a no-op for the second,
//! and a version recorded twice is read with `DISTINCT`.
//!
//! The database itself is created (`CREATE DATABASE IF NOT EXISTS`) when it is missing.

use std::fmt;

use super::client::{quote_ident, ChClient, ChError};
use crate::error::SinkError;

type Result<T, E = SinkError> = std::result::Result<T, E>;

/// The storage policy of the seed design's hot/warm/cold tiering.
pub const STORAGE_POLICY: &str = "hot_warm_cold";

/// The volumes the tiered files move data to.
const TIERED_VOLUMES: &[&str] = &["warm", "cold"];

/// Which servers a migration file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `NNNN_name.sql`: every server.
    Always,
    /// `NNNN_name.tiered.sql`: servers with the `hot_warm_cold` storage policy.
    Tiered,
    /// `NNNN_name.plain.sql`: servers without it.
    Plain,
}

impl Variant {
    /// The name recorded in `sluice_schema_migrations.variant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Always => "always",
            Variant::Tiered => "tiered",
            Variant::Plain => "plain",
        }
    }

    fn applies(self, tiered: bool) -> bool {
        match self {
            Variant::Always => true,
            Variant::Tiered => tiered,
            Variant::Plain => !tiered,
        }
    }
}

/// One migration file, compiled in.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub variant: Variant,
    /// The file name under `migrations/clickhouse`.
    pub file: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// `0001_logs_events`: the name reports and `sluice_schema_migrations` use.
    pub fn label(&self) -> String {
        format!("{:04}_{}", self.version, self.name)
    }
}

macro_rules! migration {
    ($version:literal, $name:literal, $variant:ident, $file:literal) => {
        Migration {
            version: $version,
            name: $name,
            variant: Variant::$variant,
            file: $file,
            sql: include_str!(concat!("../../../../migrations/clickhouse/", $file)),
        }
    };
}

/// Every file in `migrations/clickhouse`, in order (a test checks this list against the
/// directory).
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "logs_events", Tiered, "0001_logs_events.tiered.sql"),
    migration!(1, "logs_events", Plain, "0001_logs_events.plain.sql"),
    migration!(2, "spans", Tiered, "0002_spans.tiered.sql"),
    migration!(2, "spans", Plain, "0002_spans.plain.sql"),
    migration!(3, "span_events", Tiered, "0003_span_events.tiered.sql"),
    migration!(3, "span_events", Plain, "0003_span_events.plain.sql"),
    migration!(4, "metrics_1m", Tiered, "0004_metrics_1m.tiered.sql"),
    migration!(4, "metrics_1m", Plain, "0004_metrics_1m.plain.sql"),
    migration!(
        5,
        "metrics_1m_sum_count",
        Always,
        "0005_metrics_1m_sum_count.sql"
    ),
];

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The tables use the `hot_warm_cold` storage policy with TTL moves; otherwise the
    /// default storage with TTL deletes only.
    pub tiered: bool,
    /// Migrations applied by this run, e.g. `["0001_logs_events", "0002_spans"]`.
    pub applied: Vec<String>,
    /// Versions that were applied before this run.
    pub already: usize,
}

impl MigrationReport {
    /// Which path the database is on, in words.
    pub fn path_description(&self) -> &'static str {
        if self.tiered {
            "tiered storage: hot_warm_cold"
        } else {
            "no storage policy hot_warm_cold: TTL deletes only"
        }
    }
}

impl fmt::Display for MigrationReport {
    /// `applied 0001_logs_events, 0002_spans (no storage policy hot_warm_cold: TTL
    /// deletes only)` or `up to date (tiered storage: hot_warm_cold)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::migration::write_report(f, &self.applied, self.path_description())
    }
}

const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS sluice_schema_migrations (
  version    UInt32,
  name       String,
  variant    LowCardinality(String),
  applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY version";

/// A ClickHouse error with what sluice was doing, keeping its classification.
fn ch_error(context: &str, e: ChError) -> SinkError {
    SinkError::clickhouse(context, e)
}

/// Applies every migration the database has not had yet; a no-op when it is up to date.
pub async fn migrate(client: &ChClient) -> Result<MigrationReport> {
    let db = client.database();
    if !client
        .database_exists()
        .await
        .map_err(|e| ch_error(&format!("cannot check that database {db} exists"), e))?
    {
        client
            .execute_server_wide(
                &format!("CREATE DATABASE IF NOT EXISTS {}", quote_ident(db)),
                &[],
            )
            .await
            .map_err(|e| ch_error(&format!("cannot create database {db}"), e))?;
        tracing::info!(database = db, "ClickHouse database created");
    }
    run_statement(client, CREATE_MIGRATIONS_TABLE)
        .await
        .map_err(|e| ch_error("cannot create sluice_schema_migrations", e))?;
    let recorded: Vec<(u32, String)> = client
        .query_json("SELECT DISTINCT version, variant FROM sluice_schema_migrations")
        .await
        .map_err(|e| ch_error("cannot read sluice_schema_migrations", e))?
        .iter()
        .filter_map(|r| {
            Some((
                u32::try_from(r["version"].as_u64()?).ok()?,
                r["variant"].as_str()?.to_string(),
            ))
        })
        .collect();

    let volumes: Vec<String> = client
        .query_json_with_params(
            "SELECT volume_name FROM system.storage_policies WHERE policy_name = {p:String}",
            &[("p", STORAGE_POLICY)],
        )
        .await
        .map_err(|e| ch_error("cannot read system.storage_policies", e))?
        .iter()
        .filter_map(|r| r["volume_name"].as_str().map(str::to_string))
        .collect();
    let available = !volumes.is_empty();
    let decided = recorded.iter().find_map(|(_, v)| match v.as_str() {
        "tiered" => Some(true),
        "plain" => Some(false),
        _ => None,
    });
    let tiered = decided.unwrap_or(available);
    if decided == Some(false) && available {
        tracing::info!(
            "the storage policy {STORAGE_POLICY} exists but database {db} was set up without it; it stays so"
        );
    }
    if tiered {
        if !available {
            return Err(SinkError::Precondition(format!(
                "database {db} was migrated with the storage policy {STORAGE_POLICY}, which the server no longer has (see deploy/clickhouse/storage.xml)"
            )));
        }
        let missing: Vec<&str> = TIERED_VOLUMES
            .iter()
            .copied()
            .filter(|v| !volumes.iter().any(|have| have == v))
            .collect();
        if !missing.is_empty() {
            return Err(SinkError::Precondition(format!(
                "the storage policy {STORAGE_POLICY} has no volume(s) {} that the tiered tables move data to (it has {}); see deploy/clickhouse/storage.xml",
                missing.join(", "),
                volumes.join(", ")
            )));
        }
    }

    let mut report = MigrationReport {
        tiered,
        applied: Vec::new(),
        already: 0,
    };
    let mut versions: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    versions.dedup();
    for version in versions {
        if recorded.iter().any(|(v, _)| *v == version) {
            report.already += 1;
            continue;
        }
        let Some(m) = MIGRATIONS
            .iter()
            .find(|m| m.version == version && m.variant.applies(tiered))
        else {
            continue;
        };
        apply(client, m).await?;
        tracing::info!(migration = %m.label(), variant = m.variant.as_str(), "ClickHouse migration applied");
        report.applied.push(m.label());
    }
    Ok(report)
}

/// The tables the migrations create (they set `non_replicated_deduplication_window`).
pub const SEED_TABLES: [&str; 4] = ["logs_events", "spans", "span_events", "metrics_1m"];

/// Brings the `non_replicated_deduplication_window` of the migrations' tables to
/// `clickhouse.dedup_window` (the migration files say 1000, the default); returns the
/// tables it changed. Replicated tables keep theirs (they deduplicate by
/// `replicated_deduplication_window`).
pub async fn set_dedup_window(client: &ChClient, window: u64) -> Result<Vec<String>> {
    let rows = client
        .query_json_with_params(
            "SELECT name, engine, create_table_query FROM system.tables \
             WHERE database = {db:String} AND has({names:Array(String)}, name)",
            &[
                ("db", client.database()),
                ("names", &format!("{SEED_TABLES:?}").replace('"', "'")),
            ],
        )
        .await
        .map_err(|e| ch_error("cannot read system.tables", e))?;
    let wanted = format!("non_replicated_deduplication_window = {window}");
    let mut changed = Vec::new();
    for r in rows {
        let (Some(name), Some(engine), Some(create)) = (
            r["name"].as_str(),
            r["engine"].as_str(),
            r["create_table_query"].as_str(),
        ) else {
            continue;
        };
        let current: Option<u64> = create
            .split("non_replicated_deduplication_window = ")
            .nth(1)
            .and_then(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            });
        if current == Some(window)
            || !engine.ends_with("MergeTree")
            || engine.starts_with("Replicated")
        {
            continue;
        }
        client
            .execute(&format!(
                "ALTER TABLE {}.{} MODIFY SETTING {wanted}",
                quote_ident(client.database()),
                quote_ident(name)
            ))
            .await
            .map_err(|e| ch_error(&format!("cannot set {wanted} on {name}"), e))?;
        tracing::info!(
            table = name,
            window,
            "deduplication window set from clickhouse.dedup_window"
        );
        changed.push(name.to_string());
    }
    Ok(changed)
}

async fn apply(client: &ChClient, m: &Migration) -> Result<()> {
    let context = format!("migration {}", m.file);
    for statement in split_statements(m.sql) {
        run_statement(client, &statement)
            .await
            .map_err(|e| ch_error(&context, e))?;
    }
    let version = m.version.to_string();
    client
        .execute_with_params(
            "INSERT INTO sluice_schema_migrations (version, name, variant) \
             SELECT {v:UInt32}, {n:String}, {var:String}",
            &[
                ("v", version.as_str()),
                ("n", m.name),
                ("var", m.variant.as_str()),
            ],
        )
        .await
        .map_err(|e| ch_error(&format!("{context}: cannot record it"), e))?;
    Ok(())
}

/// Runs one statement; a `CREATE ... IF NOT EXISTS` that lost a race with another
/// process creating the same object (`TABLE_ALREADY_EXISTS`) counts as done.
async fn run_statement(client: &ChClient, statement: &str) -> Result<(), ChError> {
    match client.execute(statement).await {
        Err(e)
            if e.code == Some(57) && statement.to_ascii_uppercase().contains("IF NOT EXISTS") =>
        {
            Ok(())
        }
        other => other.map(drop),
    }
}

/// Splits SQL into statements at `;` outside string literals (`'...'`, `"..."`,
/// `` `...` ``, with backslash escapes) and comments (`-- ...`, `# ...`, nested
/// `/* ... */`, as ClickHouse's lexer has them). Statements are trimmed, without the
/// `;`; pieces holding only comments and whitespace are dropped.
pub fn split_statements(sql: &str) -> Vec<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Code,
        Quoted(char),
        LineComment,
        BlockComment(usize),
    }
    let mut out = Vec::new();
    let mut current = String::new();
    // Whether `current` holds anything but comments and whitespace.
    let mut has_code = false;
    let mut state = State::Code;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match state {
            State::Code => match c {
                ';' => {
                    if has_code {
                        out.push(current.trim().to_string());
                    }
                    current.clear();
                    has_code = false;
                    continue;
                }
                '\'' | '"' | '`' => {
                    state = State::Quoted(c);
                    has_code = true;
                }
                '-' if chars.peek() == Some(&'-') => state = State::LineComment,
                '#' => state = State::LineComment,
                '/' if chars.peek() == Some(&'*') => {
                    current.push(c);
                    current.push(chars.next().unwrap_or('*'));
                    state = State::BlockComment(1);
                    continue;
                }
                c if !c.is_whitespace() => has_code = true,
                _ => {}
            },
            State::Quoted(q) => {
                if c == '\\' {
                    current.push(c);
                    if let Some(next) = chars.next() {
                        current.push(next);
                    }
                    continue;
                }
                if c == q {
                    state = State::Code;
                }
            }
            State::LineComment => {
                if c == '\n' {
                    state = State::Code;
                }
            }
            State::BlockComment(depth) => {
                if c == '*' && chars.peek() == Some(&'/') {
                    current.push(c);
                    current.push(chars.next().unwrap_or('/'));
                    state = if depth == 1 {
                        State::Code
                    } else {
                        State::BlockComment(depth - 1)
                    };
                    continue;
                }
                if c == '/' && chars.peek() == Some(&'*') {
                    current.push(c);
                    current.push(chars.next().unwrap_or('*'));
                    state = State::BlockComment(depth + 1);
                    continue;
                }
            }
        }
        current.push(c);
    }
    if has_code {
        out.push(current.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::client::{test_client, TestClient};
    use super::*;
    use crate::config::HttpCompression;
    use flight_schema::Classify;
    use sluice_test_support::ch::{shared, TestDb, TestServer};

    #[test]
    fn the_list_matches_the_directory() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/clickhouse");
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
                Variant::Tiered => ".tiered.sql",
                Variant::Plain => ".plain.sql",
            };
            assert_eq!(m.file, format!("{}{suffix}", m.label()));
            // Idempotent, and deduplicating replayed inserts.
            for statement in split_statements(m.sql) {
                assert!(
                    statement.contains("IF NOT EXISTS"),
                    "{}: {statement}",
                    m.file
                );
            }
            if m.sql.contains("CREATE TABLE") {
                assert!(
                    m.sql.contains("non_replicated_deduplication_window = 1000"),
                    "{}",
                    m.file
                );
            }
            // The plain files have no tiering; the tiered ones all of it.
            let tiering = ["TO VOLUME", "storage_policy"];
            match m.variant {
                Variant::Plain => assert!(tiering.iter().all(|t| !m.sql.contains(t)), "{}", m.file),
                Variant::Tiered => assert!(tiering.iter().all(|t| m.sql.contains(t)), "{}", m.file),
                Variant::Always => {}
            }
        }
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version <= w[1].version));
        let mut versions: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
        versions.dedup();
        for v in versions {
            for tiered in [true, false] {
                let n = MIGRATIONS
                    .iter()
                    .filter(|m| m.version == v && m.variant.applies(tiered))
                    .count();
                assert_eq!(n, 1, "version {v}, tiered={tiered}");
            }
        }
    }

    #[test]
    fn tiered_files_keep_the_seed_statements() {
        let all: String = MIGRATIONS
            .iter()
            .filter(|m| m.variant == Variant::Tiered)
            .map(|m| m.sql)
            .collect();
        for text in [
            "TTL\n  timestamp + INTERVAL 7 DAY  TO VOLUME 'warm',\n  timestamp + INTERVAL 30 DAY TO VOLUME 'cold',\n  timestamp + INTERVAL 180 DAY DELETE\nSETTINGS storage_policy = 'hot_warm_cold', index_granularity = 8192",
            "ORDER BY (service, timestamp, trace_id)",
            "start_time + INTERVAL 30 DAY TO VOLUME 'cold',",
            "ORDER BY (trace_id, span_id, ts)",
            "TTL\n  bucket + INTERVAL 30 DAY TO VOLUME 'cold',\n  bucket + INTERVAL 365 DAY DELETE",
        ] {
            assert!(all.contains(text), "missing: {text}");
        }
    }

    #[test]
    fn report_wording() {
        let r = MigrationReport {
            tiered: false,
            applied: vec!["0001_logs_events".into(), "0002_spans".into()],
            already: 0,
        };
        assert_eq!(
            r.to_string(),
            "applied 0001_logs_events, 0002_spans (no storage policy hot_warm_cold: TTL deletes only)"
        );
        let r = MigrationReport {
            tiered: true,
            applied: vec![],
            already: 4,
        };
        assert_eq!(r.to_string(), "up to date (tiered storage: hot_warm_cold)");
    }

    #[test]
    fn statements_split_outside_quotes_and_comments() {
        let s = split_statements(
            "-- head; comment\nCREATE TABLE a (x String DEFAULT 'a;b') ENGINE = Memory;\n\
             /* block; /* nested; */ still; */ SELECT \"q;\", `b;t`, 'it\\'s;', 'x'';y' # hash;\n;\n\
             ;; -- only a comment; here\n  SELECT 3  ",
        );
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(
            s[0],
            "-- head; comment\nCREATE TABLE a (x String DEFAULT 'a;b') ENGINE = Memory"
        );
        assert!(
            s[1].starts_with("/* block; /* nested; */ still; */ SELECT \"q;\""),
            "{}",
            s[1]
        );
        assert!(s[1].contains("'it\\'s;', 'x'';y' # hash;"), "{}", s[1]);
        assert!(s[2].ends_with("SELECT 3"), "{}", s[2]);
        assert!(split_statements("-- nothing\n/* at all; */\n").is_empty());
        for m in MIGRATIONS {
            // The rollup columns and their two views; every other file is one statement.
            let expected = if m.version == 5 { 3 } else { 1 };
            assert_eq!(split_statements(m.sql).len(), expected, "{}", m.file);
        }
    }

    async fn tables(client: &ChClient) -> Vec<(String, String, String)> {
        client
            .query_json_with_params(
                "SELECT name, engine, create_table_query FROM system.tables \
                 WHERE database = {db:String} ORDER BY name",
                &[("db", client.database())],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_string(),
                    r["engine"].as_str().unwrap().to_string(),
                    r["create_table_query"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    async fn all_columns(client: &ChClient) -> Vec<serde_json::Value> {
        client
            .query_json_with_params(
                "SELECT table, name, type, position FROM system.columns \
                 WHERE database = {db:String} ORDER BY table, position",
                &[("db", client.database())],
            )
            .await
            .unwrap()
    }

    fn cols(spec: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            spec.iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
        )
    }

    #[tokio::test]
    async fn the_dedup_window_follows_the_config() {
        let db = TestDb::new().await;
        let c = &db.client();
        migrate(c).await.unwrap();
        // The default is what the files say: nothing to change.
        assert!(set_dedup_window(c, 1000).await.unwrap().is_empty());
        let mut changed = set_dedup_window(c, 5000).await.unwrap();
        changed.sort();
        assert_eq!(
            changed,
            vec!["logs_events", "metrics_1m", "span_events", "spans"]
        );
        for (name, _, create) in tables(c).await {
            if SEED_TABLES.contains(&name.as_str()) {
                assert!(
                    create.contains("non_replicated_deduplication_window = 5000"),
                    "{create}"
                );
            }
        }
        assert!(set_dedup_window(c, 5000).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn plain_path_applies_once() {
        let db = TestDb::new().await;
        let c = &db.client();
        let has_policy = !c
            .query_json("SELECT 1 FROM system.storage_policies WHERE policy_name = 'hot_warm_cold'")
            .await
            .unwrap()
            .is_empty();
        if has_policy {
            eprintln!("skipped: SLUICE_TEST_CH_URL has the storage policy hot_warm_cold");
            return;
        }

        let report = migrate(c).await.unwrap();
        assert_eq!(
            report,
            MigrationReport {
                tiered: false,
                applied: vec![
                    "0001_logs_events".into(),
                    "0002_spans".into(),
                    "0003_span_events".into(),
                    "0004_metrics_1m".into(),
                    "0005_metrics_1m_sum_count".into()
                ],
                already: 0
            }
        );
        let tables_before = tables(c).await;
        let columns_before = all_columns(c).await;

        // Again, and twice at once: nothing changes, nothing fails.
        let again = migrate(c).await.unwrap();
        assert_eq!((again.applied.len(), again.already), (0, 5));
        assert_eq!(
            again.to_string(),
            "up to date (no storage policy hot_warm_cold: TTL deletes only)"
        );
        let other = db.client_with(HttpCompression::None);
        let (a, b) = tokio::join!(migrate(c), migrate(&other));
        assert!(a.unwrap().applied.is_empty() && b.unwrap().applied.is_empty());
        assert_eq!(tables(c).await, tables_before);
        assert_eq!(all_columns(c).await, columns_before);
        let recorded = c
            .query_json(
                "SELECT version, name, variant FROM sluice_schema_migrations ORDER BY version",
            )
            .await
            .unwrap();
        assert_eq!(
            recorded,
            vec![
                serde_json::json!({"version": 1, "name": "logs_events", "variant": "plain"}),
                serde_json::json!({"version": 2, "name": "spans", "variant": "plain"}),
                serde_json::json!({"version": 3, "name": "span_events", "variant": "plain"}),
                serde_json::json!({"version": 4, "name": "metrics_1m", "variant": "plain"}),
                serde_json::json!({"version": 5, "name": "metrics_1m_sum_count", "variant": "always"}),
            ]
        );

        // The seed's tables, columns and engines.
        let names: Vec<(String, String)> = tables_before
            .iter()
            .map(|(n, e, _)| (n.clone(), e.clone()))
            .collect();
        let merge_tree = |n: &str| (n.to_string(), "MergeTree".to_string());
        assert_eq!(
            names,
            vec![
                merge_tree("logs_events"),
                ("metric_range".to_string(), "View".to_string()),
                merge_tree("metrics_1m"),
                ("metrics_1m_merged".to_string(), "View".to_string()),
                merge_tree("sluice_schema_migrations"),
                merge_tree("span_events"),
                merge_tree("spans"),
            ]
        );
        for (name, engine, create) in &tables_before {
            if name != "sluice_schema_migrations" && engine != "View" {
                assert!(
                    create.contains("non_replicated_deduplication_window = 1000"),
                    "{create}"
                );
                assert!(
                    !create.contains("storage_policy") && !create.contains("TO VOLUME"),
                    "{create}"
                );
            }
        }
        let logs = &tables_before[0].2;
        assert!(logs.contains("PARTITION BY toYYYYMM(timestamp)"), "{logs}");
        assert!(
            logs.contains("ORDER BY (service, timestamp, trace_id)"),
            "{logs}"
        );
        assert!(
            logs.contains("TTL timestamp + toIntervalDay(180)"),
            "{logs}"
        );
        assert_eq!(
            c.table_columns("logs_events").await.unwrap(),
            cols(&[
                ("timestamp", "DateTime64(3, 'UTC')"),
                ("service", "LowCardinality(String)"),
                ("host", "LowCardinality(String)"),
                ("level", "LowCardinality(String)"),
                ("trace_id", "String"),
                ("span_id", "String"),
                ("message", "String"),
                ("labels", "Map(String, String)"),
            ])
        );
        assert_eq!(
            c.table_columns("spans").await.unwrap(),
            cols(&[
                ("trace_id", "String"),
                ("span_id", "String"),
                ("parent_span_id", "String"),
                ("service", "LowCardinality(String)"),
                ("name", "LowCardinality(String)"),
                ("start_time", "DateTime64(6, 'UTC')"),
                ("end_time", "DateTime64(6, 'UTC')"),
                ("duration_ns", "UInt64"),
                ("status_code", "LowCardinality(String)"),
                ("status_message", "String"),
                ("attr", "Map(String, String)"),
            ])
        );
        assert_eq!(
            c.table_columns("span_events").await.unwrap(),
            cols(&[
                ("trace_id", "String"),
                ("span_id", "String"),
                ("ts", "DateTime64(6, 'UTC')"),
                ("name", "LowCardinality(String)"),
                ("attr", "Map(String, String)"),
            ])
        );
        assert_eq!(
            c.table_columns("metrics_1m").await.unwrap(),
            cols(&[
                ("bucket", "DateTime('UTC')"),
                ("metric_name", "LowCardinality(String)"),
                ("labels", "String"),
                ("avg_v", "Float64"),
                ("max_v", "Float64"),
                ("min_v", "Float64"),
                ("sum_v", "Float64"),
                ("count_v", "UInt64"),
            ])
        );

        // Rows land (recent ones: TTL deletes old rows at insert time).
        c.execute(
            "INSERT INTO logs_events VALUES (now64(3), 'api', 'h1', 'info', 't', 's', 'hello', {'k': 'v'})",
        )
        .await
        .unwrap();
        let rows = c
            .query_json("SELECT service, labels['k'] AS k FROM logs_events")
            .await
            .unwrap();
        assert_eq!(rows, vec![serde_json::json!({"service": "api", "k": "v"})]);

        // A half-applied file (its table made, the record lost) is simply applied again.
        c.execute("ALTER TABLE sluice_schema_migrations DELETE WHERE version = 4 SETTINGS mutations_sync = 2")
            .await
            .unwrap();
        let r = migrate(c).await.unwrap();
        assert_eq!(
            (r.applied, r.already),
            (vec!["0004_metrics_1m".to_string()], 4)
        );
    }

    #[tokio::test]
    async fn a_missing_database_is_created_and_failures_name_the_file() {
        let server = shared();
        let name = format!("sluice_test_new_{}", uuid::Uuid::new_v4().simple());
        let c = test_client(&server.url, &name, HttpCompression::Lz4);
        let r = migrate(&c).await.unwrap();
        assert_eq!(r.applied.len(), 5);
        assert!(c.database_exists().await.unwrap());
        c.execute_server_wide(&format!("DROP DATABASE {name} SYNC"), &[])
            .await
            .unwrap();

        // A failing step names the file, and the version is not recorded: here
        // sluice_schema_migrations was made by someone else without a `name` column.
        let db = TestDb::new().await;
        db.client()
            .execute("CREATE TABLE sluice_schema_migrations (version UInt32, variant String) ENGINE = Memory")
            .await
            .unwrap();
        let e = migrate(&db.client()).await.unwrap_err();
        // ClickHouse's permanent answer: the set-up is wrong, a failed precondition.
        assert!(matches!(e, SinkError::ClickHouse { .. }), "{e:?}");
        assert_eq!(e.class(), flight_schema::ErrorClass::InvalidInput);
        assert!(
            e.to_string()
                .starts_with("migration 0001_logs_events.plain.sql: cannot record it: Code: 16."),
            "{e}"
        );
        assert!(matches!(
            sluice_core::error::Error::from(e),
            sluice_core::error::Error::FailedPrecondition(_)
        ));
        assert!(db
            .client()
            .query_json("SELECT * FROM sluice_schema_migrations")
            .await
            .unwrap()
            .is_empty());

        let unreachable = crate::config::ClickHouseConfig {
            url: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        let e = migrate(&ChClient::new(&unreachable).unwrap())
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        assert!(
            e.to_string().contains("ClickHouse at http://127.0.0.1:1/")
                && e.to_string().contains("Connection refused"),
            "{e}"
        );
    }

    /// `deploy/clickhouse/storage.xml` as a test server's config: its paths moved into the
    /// server's directory and the S3 endpoint made local (nothing is moved there by tests).
    fn test_storage_config() -> String {
        let xml = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../deploy/clickhouse/storage.xml"),
        )
        .unwrap();
        let start = xml.find("<storage_configuration>").unwrap();
        let end = xml.find("</storage_configuration>").unwrap() + "</storage_configuration>".len();
        xml[start..end]
            .replace("/var/lib/clickhouse/", "{dir}/var/")
            .replace(
                "https://BUCKET.s3.REGION.amazonaws.com/clickhouse/",
                "http://127.0.0.1:9/sluice-test-bucket/",
            )
            .replace(
                "<access_key_id from_env=\"SLUICE_CH_S3_ACCESS_KEY_ID\"/>",
                "<access_key_id>test</access_key_id>",
            )
            .replace(
                "<secret_access_key from_env=\"SLUICE_CH_S3_SECRET_ACCESS_KEY\"/>",
                "<secret_access_key>test</secret_access_key>",
            )
    }

    #[tokio::test]
    async fn tiered_path_with_the_deploy_storage_policy() {
        let server = TestServer::start(&test_storage_config());
        let db = TestDb::on(&server).await;
        let c = &db.client_with(HttpCompression::Zstd);
        let volumes = c
            .query_json(
                "SELECT volume_name AS v, disks FROM system.storage_policies \
                 WHERE policy_name = 'hot_warm_cold' ORDER BY volume_priority",
            )
            .await
            .unwrap();
        assert_eq!(
            volumes,
            vec![
                serde_json::json!({"v": "hot", "disks": ["hot"]}),
                serde_json::json!({"v": "warm", "disks": ["warm"]}),
                serde_json::json!({"v": "cold", "disks": ["s3_cache"]}),
            ]
        );
        let report = migrate(c).await.unwrap();
        assert!(report.tiered);
        assert_eq!(report.applied.len(), 5);
        assert_eq!(
            migrate(c).await.unwrap().to_string(),
            "up to date (tiered storage: hot_warm_cold)"
        );
        let t = tables(c).await;
        for (name, engine, create) in &t {
            if name == "sluice_schema_migrations" || engine == "View" {
                continue;
            }
            assert!(
                create.contains("storage_policy = 'hot_warm_cold'"),
                "{create}"
            );
            assert!(create.contains("TO VOLUME 'cold'"), "{create}");
            assert!(
                create.contains("non_replicated_deduplication_window = 1000"),
                "{create}"
            );
        }
        let spans = &t.iter().find(|(n, _, _)| n == "spans").unwrap().2;
        assert!(
            spans.contains("TTL start_time + toIntervalDay(7) TO VOLUME 'warm', start_time + toIntervalDay(30) TO VOLUME 'cold', start_time + toIntervalDay(180)"),
            "{spans}"
        );
        // Recent rows land on the hot disk.
        c.execute(
            "INSERT INTO spans (trace_id, span_id, start_time, end_time, duration_ns) \
             VALUES ('t', 's', now64(6), now64(6), 5)",
        )
        .await
        .unwrap();
        let parts = c
            .query_json(
                "SELECT disk_name FROM system.parts \
                 WHERE database = currentDatabase() AND table = 'spans' AND active",
            )
            .await
            .unwrap();
        assert_eq!(parts, vec![serde_json::json!({"disk_name": "hot"})]);
    }
}
