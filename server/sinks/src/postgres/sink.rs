//! The PostgreSQL side of the sink: exactly-once binary COPY of coalesced chunks.
//!
//! # What flows through it
//! [`crate::runner::SinkRunner`] hands a [`Chunk`] (consecutive WAL records of one table) to
//! [`PgWriter::write`], which, on its worker's connection:
//! 1. makes sure the table exists and has every registered column (created lazily from
//!    the registered schema, identifiers quoted; a hypertable where TimescaleDB is on);
//! 2. for the `metrics` table, resolves each row's `(metric_name, labels)` to a
//!    `metric_series` id (upserted; ids cached in a bounded in-memory cache) and turns the
//!    rows into `metrics_points` rows (daily partitions ensured on plain PostgreSQL);
//! 3. in one transaction: claims the chunk's WAL range in `sluice_sink_offsets` (a range
//!    already there was committed before a crash: nothing is written again), COPYs the
//!    rows in binary format encoded straight from Arrow ([`super::copy`]), and commits.
//!
//! Rows PostgreSQL refuses for good (a data or constraint error) are found by bisecting the
//! chunk under savepoints; they go to the dead-letter Parquet files with the server's
//! message before the transaction commits, and the rest of the chunk is committed. Errors
//! that may pass (connection lost, server restarting, deadlock) are returned to the runner,
//! which retries.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use flight_schema::{ResolvedTable, SinkKind};
use futures::SinkExt;
use tokio_postgres::Client;

use super::copy::{encode_batch, PgType, HEADER, TRAILER};
use super::quote_ident;
use crate::config::PostgresConfig;
use crate::runner::{
    halves, Chunk, CommittedRanges, DeadLetter, Refused, SinkError, Slice, StoreWriter, Written,
};

/// The sink's name: metrics label and WAL position key.
pub const PG_SINK: &str = "postgres";

/// The registered table whose rows are split into `metric_series` and `metrics_points`.
pub const METRICS_TABLE: &str = "metrics";

/// A bounded cache of `metric_series` ids: two generations, the older dropped when the
/// newer fills, so memory stays under twice `capacity` entries and hot keys survive.
struct SeriesCache {
    capacity: usize,
    hot: HashMap<(String, String), i64>,
    cold: HashMap<(String, String), i64>,
}

impl SeriesCache {
    fn get(&mut self, key: &(String, String)) -> Option<i64> {
        if let Some(id) = self.hot.get(key) {
            return Some(*id);
        }
        let id = self.cold.remove(key)?;
        self.insert(key.clone(), id);
        Some(id)
    }

    fn insert(&mut self, key: (String, String), id: i64) {
        if self.hot.len() >= self.capacity {
            self.cold = std::mem::take(&mut self.hot);
        }
        self.hot.insert(key, id);
    }
}

/// Writes chunks into PostgreSQL.
pub struct PgWriter {
    url: String,
    dead_letter: DeadLetter,
    wal_id: String,
    /// Whether the database has TimescaleDB ([`PgWriter::on_timescaledb`]).
    timescale: bool,
    /// Tables (and the version) whose PostgreSQL table is known to match.
    ensured: Mutex<HashMap<String, u64>>,
    /// Days (since the epoch) whose `metrics_points` partition exists.
    partitions: Mutex<HashSet<i64>>,
    series: Mutex<SeriesCache>,
}

/// Why a table could not be made ready for a chunk.
enum DdlError {
    /// Passing (connection, restart, lock, deadlock): retry the chunk.
    Retry(SinkError),
    /// It will fail again the same way (a refused statement, a column of another type):
    /// the chunk goes to the dead-letter files with this message.
    Permanent(String),
}

impl From<SinkError> for DdlError {
    fn from(e: SinkError) -> Self {
        DdlError::Retry(e)
    }
}

/// Whether an error may pass by itself: no server answer at all (the connection), or a
/// class that is about the server's state rather than the statement (08 connection, 40
/// rollback/deadlock, 53 resources, 57 shutdown/cancel, 58 system, 55P03 lock timeout).
fn is_transient(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else { return true };
    let c = code.code();
    ["08", "40", "53", "57", "58", "XX"]
        .iter()
        .any(|class| c.starts_with(class))
        || c == "55P03"
        || e.is_closed()
}

/// A failed DDL statement: retried when the error may pass, otherwise permanent with the
/// statement and the server's message.
fn ddl_err(context: &str, statement: &str, e: tokio_postgres::Error) -> DdlError {
    if is_transient(&e) {
        DdlError::Retry(SinkError::postgres(context, e))
    } else {
        DdlError::Permanent(format!(
            "{context}: `{statement}` failed: {}",
            data_message(&e)
        ))
    }
}

/// Whether an error is about the data (it will fail again the same way) rather than the
/// server or the connection. Those rows are dead-lettered; anything else is retried.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else { return false };
    let c = code.code();
    // 22: data exception, 23: integrity constraint violation, 42804/42P18-ish type
    // problems, 54: program limit exceeded (a row too large).
    c.starts_with("22") || c.starts_with("23") || c.starts_with("54") || c == "42804"
}

fn data_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{}: {}", db.code().code(), db.message());
            if let Some(d) = db.detail() {
                m.push_str(&format!(" ({d})"));
            }
            if let Some(w) = db.where_() {
                m.push_str(&format!(" [{w}]"));
            }
            m
        }
        None => e.to_string(),
    }
}

/// What PostgreSQL's `format_type` calls a column of this type.
fn format_type_name(t: &PgType) -> String {
    match t {
        PgType::Timestamptz => "timestamp with time zone".into(),
        other => other.sql_name(),
    }
}

fn types_match(expected: &PgType, actual: &str) -> bool {
    let want = format_type_name(expected);
    actual == want
        || (want == "text" && actual.starts_with("character varying"))
        || (matches!(expected, PgType::Numeric { .. }) && actual.starts_with("numeric"))
}

/// Canonical text of a labels value: keys sorted, no spaces; `{}` for null.
fn canonical_labels(text: Option<&str>) -> Result<String, serde_json::Error> {
    match text {
        None => Ok("{}".into()),
        Some(t) => serde_json::from_str::<serde_json::Value>(t).map(|v| v.to_string()),
    }
}

/// The `metric_series` ids of a `metrics` batch's rows, or why its rows cannot have any
/// (they are dead-lettered).
enum SeriesIds {
    Found(Int64Array),
    Refused(String),
}

/// The chunk's rows as the target table gets them, with the original rows beside them
/// (for the dead-letter files).
struct Prepared {
    target: String,
    columns: Vec<String>,
    types: Vec<PgType>,
    parts: Vec<Slice>,
}

impl PgWriter {
    pub fn new(url: String, cfg: PostgresConfig, dead_letter: DeadLetter, wal_id: String) -> Self {
        let capacity = cfg.series_cache_size;
        Self {
            url,
            dead_letter,
            wal_id,
            timescale: false,
            ensured: Mutex::new(HashMap::new()),
            partitions: Mutex::new(HashSet::new()),
            series: Mutex::new(SeriesCache {
                capacity,
                hot: HashMap::new(),
                cold: HashMap::new(),
            }),
        }
    }

    /// Writes for a database with TimescaleDB (as migrating found it): new tables become
    /// hypertables, and `metrics_points` needs no daily partitions.
    pub fn on_timescaledb(mut self, timescale: bool) -> Self {
        self.timescale = timescale;
        self
    }

    /// Creates the table from the registered schema if it is missing, adds registered
    /// columns it lacks, and refuses one whose type differs.
    async fn ensure_table(
        &self,
        client: &mut Client,
        table: &ResolvedTable,
    ) -> Result<(), DdlError> {
        let name = table.name();
        if name == METRICS_TABLE {
            return Ok(());
        }
        if self.ensured.lock().expect("ensured").get(name) == Some(&table.version) {
            return Ok(());
        }
        let qname = quote_ident(name);
        let tx = client
            .transaction()
            .await
            .map_err(|e| DdlError::Retry(SinkError::postgres("begin", e)))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('sluice.table.' || $1))",
            &[&name],
        )
        .await
        .map_err(|e| SinkError::postgres("lock", e))?;
        let existing: Vec<(String, String)> = tx
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                 FROM pg_attribute a
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&qname],
            )
            .await
            .map_err(|e| SinkError::postgres("reading columns", e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let timescale = self.timescale;
        if existing.is_empty() {
            let cols: Vec<String> = table
                .definition
                .columns
                .iter()
                .map(|c| {
                    let t = PgType::from_column_type(&c.column_type).sql_name();
                    let null = if table.is_nullable(c) {
                        ""
                    } else {
                        " NOT NULL"
                    };
                    format!("{} {t}{null}", quote_ident(&c.name))
                })
                .collect();
            let ddl = format!("CREATE TABLE IF NOT EXISTS {qname} ({})", cols.join(", "));
            tx.batch_execute(&ddl)
                .await
                .map_err(|e| ddl_err(&format!("creating table {name}"), &ddl, e))?;
            if timescale {
                // The text goes through `::text::regclass`: a parameter the server types
                // as regclass cannot be bound from a Rust string.
                let hyper = "SELECT create_hypertable($1::text::regclass, $2::text::name, \
                             if_not_exists => TRUE)";
                tx.execute(hyper, &[&qname, &table.time_column])
                    .await
                    .map_err(|e| {
                        ddl_err(
                            &format!("making {name} a hypertable"),
                            &format!(
                                "SELECT create_hypertable('{qname}', '{}', if_not_exists => TRUE)",
                                table.time_column
                            ),
                            e,
                        )
                    })?;
                if let Some(r) = &table.definition.retention {
                    tx.execute(
                        "SELECT add_retention_policy($1::text::regclass, $2::text::interval, \
                         if_not_exists => TRUE)",
                        &[&qname, r],
                    )
                    .await
                    .map_err(|e| {
                        ddl_err(
                            &format!("retention policy of {name}"),
                            &format!(
                                "SELECT add_retention_policy('{qname}', INTERVAL '{r}', if_not_exists => TRUE)"
                            ),
                            e,
                        )
                    })?;
                }
            } else {
                let idx = quote_ident(&format!("{name}_{}_idx", table.time_column));
                let sql = format!(
                    "CREATE INDEX IF NOT EXISTS {idx} ON {qname} ({} DESC)",
                    quote_ident(&table.time_column)
                );
                tx.batch_execute(&sql)
                    .await
                    .map_err(|e| ddl_err(&format!("indexing {name}"), &sql, e))?;
            }
            tracing::info!(
                table = name,
                timescale,
                "created PostgreSQL table from the registered schema"
            );
        } else {
            let have: HashMap<&str, &str> = existing
                .iter()
                .map(|(n, t)| (n.as_str(), t.as_str()))
                .collect();
            for c in &table.definition.columns {
                let want = PgType::from_column_type(&c.column_type);
                match have.get(c.name.as_str()) {
                    None => {
                        let sql = format!(
                            "ALTER TABLE {qname} ADD COLUMN IF NOT EXISTS {} {}",
                            quote_ident(&c.name),
                            want.sql_name()
                        );
                        tx.batch_execute(&sql).await.map_err(|e| {
                            ddl_err(&format!("adding column {} to {name}", c.name), &sql, e)
                        })?;
                    }
                    Some(actual) if !types_match(&want, actual) => {
                        // It will not pass by itself: the rows go to the dead-letter files
                        // (and /readyz says why) until one of the two is altered, rather
                        // than holding every other table's WAL release back.
                        return Err(DdlError::Permanent(format!(
                            "table '{name}' column '{}' is {actual} in PostgreSQL but {} ({}) in the registry; alter one of them",
                            c.name,
                            c.column_type.name(),
                            format_type_name(&want)
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        tx.commit()
            .await
            .map_err(|e| SinkError::postgres("commit", e))?;
        self.ensured
            .lock()
            .expect("ensured")
            .insert(name.to_string(), table.version);
        Ok(())
    }

    /// Series ids of each row of a `metrics` batch, upserting label sets not yet known.
    async fn series_ids(
        &self,
        client: &Client,
        batch: &RecordBatch,
    ) -> Result<SeriesIds, SinkError> {
        let names = batch
            .column_by_name("metric_name")
            .map(|c| c.as_string::<i32>().clone());
        let labels = batch
            .column_by_name("labels")
            .map(|c| c.as_string::<i32>().clone());
        let (Some(names), Some(labels)) = (names, labels) else {
            return Ok(SeriesIds::Refused(
                "the metrics table needs metric_name and labels columns".into(),
            ));
        };
        let mut keys = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            if names.is_null(i) {
                return Ok(SeriesIds::Refused(format!("row {i}: metric_name is null")));
            }
            let l = if labels.is_null(i) {
                None
            } else {
                Some(labels.value(i))
            };
            match canonical_labels(l) {
                Ok(c) => keys.push((names.value(i).to_string(), c)),
                Err(e) => {
                    return Ok(SeriesIds::Refused(format!(
                        "row {i}: labels are not JSON: {e}"
                    )))
                }
            }
        }
        let mut ids = vec![0i64; keys.len()];
        let mut missing: Vec<usize> = Vec::new();
        {
            let mut cache = self.series.lock().expect("series cache");
            for (i, k) in keys.iter().enumerate() {
                match cache.get(k) {
                    Some(id) => ids[i] = id,
                    None => missing.push(i),
                }
            }
        }
        if !missing.is_empty() {
            let mut uniq: Vec<&(String, String)> = missing.iter().map(|&i| &keys[i]).collect();
            uniq.sort();
            uniq.dedup();
            let n: Vec<&str> = uniq.iter().map(|k| k.0.as_str()).collect();
            let l: Vec<&str> = uniq.iter().map(|k| k.1.as_str()).collect();
            // Sorted input keeps concurrent upserts from deadlocking on each other.
            client
                .execute(
                    "INSERT INTO metric_series (metric_name, labels)
                     SELECT n, l::jsonb FROM unnest($1::text[], $2::text[]) AS t(n, l)
                     ORDER BY 1, 2
                     ON CONFLICT (metric_name, labels) DO NOTHING",
                    &[&n, &l],
                )
                .await
                .map_err(|e| SinkError::postgres("upserting metric_series", e))?;
            let rows = client
                .query(
                    "SELECT t.i, ms.series_id
                     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(n, l, i)
                     JOIN metric_series ms ON ms.metric_name = t.n AND ms.labels = t.l::jsonb",
                    &[&n, &l],
                )
                .await
                .map_err(|e| SinkError::postgres("reading metric_series ids", e))?;
            let mut found: HashMap<&(String, String), i64> = HashMap::new();
            for r in rows {
                let i: i64 = r.get(0);
                let id: i64 = r.get(1);
                found.insert(uniq[(i - 1) as usize], id);
            }
            let mut cache = self.series.lock().expect("series cache");
            for &i in &missing {
                let Some(id) = found.get(&keys[i]) else {
                    return Err(SinkError::Unexpected(format!(
                        "metric_series has no id for {:?} after the upsert",
                        keys[i]
                    )));
                };
                ids[i] = *id;
                cache.insert(keys[i].clone(), *id);
            }
        }
        Ok(SeriesIds::Found(Int64Array::from(ids)))
    }

    /// Makes sure `metrics_points` has a partition for every day of `batch`'s times
    /// (plain PostgreSQL only).
    async fn ensure_partitions(&self, client: &Client, times: &dyn Array) -> Result<(), SinkError> {
        if self.timescale {
            return Ok(());
        }
        let ts = times.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let mut days: Vec<i64> = ts
            .iter()
            .flatten()
            .map(|us| us.div_euclid(86_400_000_000))
            .collect();
        days.sort_unstable();
        days.dedup();
        let missing: Vec<i64> = {
            let known = self.partitions.lock().expect("partitions");
            days.into_iter().filter(|d| !known.contains(d)).collect()
        };
        for d in missing {
            let from = chrono::DateTime::from_timestamp(d * 86_400, 0).unwrap_or_default();
            let to = from + chrono::Duration::days(1) - chrono::Duration::microseconds(1);
            super::maintenance::ensure_partitions(client, from, to)
                .await
                .map_err(|e| {
                    SinkError::Unexpected(format!(
                        "creating the metrics_points partition for {}: {e}",
                        from.date_naive()
                    ))
                })?;
            self.partitions.lock().expect("partitions").insert(d);
        }
        Ok(())
    }

    /// Turns a chunk into what is copied; rows that cannot be turned (bad labels) are
    /// returned as refused.
    async fn prepare(
        &self,
        client: &Client,
        chunk: &Chunk,
    ) -> Result<(Prepared, Vec<Refused>), SinkError> {
        let table = &chunk.table;
        let mut refused = Vec::new();
        if table.name() != METRICS_TABLE {
            let columns: Vec<String> = table
                .definition
                .columns
                .iter()
                .map(|c| c.name.clone())
                .collect();
            let types = table
                .definition
                .columns
                .iter()
                .map(|c| PgType::from_column_type(&c.column_type))
                .collect();
            let parts = chunk
                .parts
                .iter()
                .map(|p| Slice::as_received(p.seq, p.batch.clone()))
                .collect();
            return Ok((
                Prepared {
                    target: table.name().to_string(),
                    columns,
                    types,
                    parts,
                },
                refused,
            ));
        }
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("series_id", DataType::Int64, false),
            Field::new("value", DataType::Float64, true),
        ]));
        let mut parts = Vec::new();
        for p in &chunk.parts {
            let ids = match self.series_ids(client, &p.batch).await? {
                SeriesIds::Found(ids) => ids,
                SeriesIds::Refused(e) => {
                    refused.push(Refused {
                        seq: p.seq,
                        rows: p.batch.clone(),
                        error: e,
                    });
                    continue;
                }
            };
            let time = arrow::compute::cast(
                p.batch.column_by_name("time").expect("metrics has time"),
                schema.field(0).data_type(),
            )
            .map_err(|e| SinkError::arrow("metrics time column", e))?;
            self.ensure_partitions(client, time.as_ref()).await?;
            let value = p
                .batch
                .column_by_name("value")
                .expect("metrics has value")
                .clone();
            let points = RecordBatch::try_new(schema.clone(), vec![time, Arc::new(ids), value])
                .map_err(|e| SinkError::arrow("metrics points", e))?;
            parts.push(Slice {
                seq: p.seq,
                rows: points,
                original: p.batch.clone(),
            });
        }
        Ok((
            Prepared {
                target: "metrics_points".into(),
                columns: vec!["time".into(), "series_id".into(), "value".into()],
                types: vec![PgType::Timestamptz, PgType::Int8, PgType::Float8],
                parts,
            },
            refused,
        ))
    }
}

impl PgWriter {
    /// Claims the chunk's WAL range in `sluice_sink_offsets` inside `tx`; false when it
    /// was claimed (committed) before.
    async fn claim(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        chunk: &Chunk,
    ) -> Result<bool, SinkError> {
        let claimed = tx
            .query_opt(
                "INSERT INTO sluice.sluice_sink_offsets (wal_id, table_name, first_seq, last_seq, rows)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING 1",
                &[
                    &self.wal_id,
                    &chunk.table.name(),
                    &(chunk.first_seq() as i64),
                    &(chunk.last_seq() as i64),
                    &(chunk.rows as i64),
                ],
            )
            .await
            .map_err(|e| SinkError::postgres("claiming the WAL range in sluice_sink_offsets", e))?;
        Ok(claimed.is_some())
    }

    /// The table cannot take rows for good: the whole chunk goes to the dead-letter files
    /// with `message`, committed with its WAL range (so a replay does not write it twice),
    /// and the WAL moves on for every other table.
    async fn dead_letter_chunk(
        &self,
        conn: &mut Client,
        chunk: &Chunk,
        message: String,
    ) -> Result<Written, SinkError> {
        let tx = conn
            .transaction()
            .await
            .map_err(|e| SinkError::postgres("begin", e))?;
        if !self.claim(&tx, chunk).await? {
            tx.rollback()
                .await
                .map_err(|e| SinkError::postgres("rollback", e))?;
            return Ok(Written {
                already_committed: true,
                table_error: Some(message),
                ..Default::default()
            });
        }
        let refused: Vec<Refused> = chunk
            .parts
            .iter()
            .map(|p| Refused {
                seq: p.seq,
                rows: p.batch.clone(),
                error: message.clone(),
            })
            .collect();
        let table = chunk.table.name();
        let dead_letter_rows = self
            .dead_letter
            .record(
                PG_SINK,
                table,
                chunk.first_seq(),
                chunk.last_seq(),
                &refused,
            )
            .await?;
        tx.commit()
            .await
            .map_err(|e| SinkError::postgres("commit", e))?;
        Ok(Written {
            dead_letter_rows,
            table_error: Some(message),
            ..Default::default()
        })
    }
}

/// Why a COPY did not go through.
enum CopyFailure {
    /// PostgreSQL (or the encoder) refused the rows for what they hold: narrow the rows
    /// down to the refused ones and dead-letter those.
    Data(String),
    /// The server or the connection failed: the chunk is retried.
    Sink(SinkError),
}

/// Classifies a COPY failure.
fn copy_failure(e: tokio_postgres::Error) -> CopyFailure {
    if is_data_error(&e) {
        CopyFailure::Data(data_message(&e))
    } else {
        CopyFailure::Sink(SinkError::postgres("COPY", e))
    }
}

/// One COPY of some rows, encoded batch by batch as it streams. Returns the bytes sent.
async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    types: &[PgType],
    rows: &[Slice],
) -> Result<u64, CopyFailure> {
    let sink = tx.copy_in::<_, Bytes>(sql).await.map_err(copy_failure)?;
    futures::pin_mut!(sink);
    sink.send(Bytes::from_static(HEADER))
        .await
        .map_err(copy_failure)?;
    let mut bytes = (HEADER.len() + TRAILER.len()) as u64;
    for slice in rows {
        let mut buf = Vec::new();
        if let Err(e) = encode_batch(&slice.rows, types, &mut buf) {
            // The batch does not fit the column types: data, not the server.
            return Err(CopyFailure::Data(e.to_string()));
        }
        bytes += buf.len() as u64;
        sink.send(Bytes::from(buf)).await.map_err(copy_failure)?;
    }
    sink.send(Bytes::from_static(TRAILER))
        .await
        .map_err(copy_failure)?;
    sink.finish().await.map_err(copy_failure)?;
    Ok(bytes)
}

#[async_trait::async_trait]
impl StoreWriter for PgWriter {
    type Conn = Client;

    fn name(&self) -> &'static str {
        PG_SINK
    }

    fn kind(&self) -> SinkKind {
        SinkKind::Postgres
    }

    async fn connect(&self) -> Result<Client, SinkError> {
        Ok(super::connect(&self.url).await?)
    }

    async fn committed(
        &self,
        conn: &mut Client,
        wal_id: &str,
    ) -> Result<CommittedRanges, SinkError> {
        let rows = conn
            .query(
                "SELECT table_name, first_seq, last_seq FROM sluice.sluice_sink_offsets WHERE wal_id = $1",
                &[&wal_id],
            )
            .await
            .map_err(|e| SinkError::postgres("reading sluice_sink_offsets", e))?;
        let mut c = CommittedRanges::default();
        for r in rows {
            let t: String = r.get(0);
            let first: i64 = r.get(1);
            let last: i64 = r.get(2);
            c.add(&t, first as u64, last as u64);
        }
        Ok(c.finish())
    }

    async fn forget_below(
        &self,
        conn: &mut Client,
        wal_id: &str,
        seq: u64,
    ) -> Result<(), SinkError> {
        conn.execute(
            "DELETE FROM sluice.sluice_sink_offsets WHERE wal_id = $1 AND last_seq < $2",
            &[&wal_id, &(seq as i64)],
        )
        .await
        .map_err(|e| SinkError::postgres("forgetting old sluice_sink_offsets", e))?;
        Ok(())
    }

    async fn write(&self, conn: &mut Client, chunk: &Chunk) -> Result<Written, SinkError> {
        match self.ensure_table(conn, &chunk.table).await {
            Ok(()) => {}
            Err(DdlError::Retry(e)) => return Err(e),
            Err(DdlError::Permanent(message)) => {
                return self.dead_letter_chunk(conn, chunk, message).await
            }
        }
        let (prepared, mut refused) = self.prepare(conn, chunk).await?;
        let table = chunk.table.name();
        let (first, last) = (chunk.first_seq(), chunk.last_seq());
        let cols: Vec<String> = prepared.columns.iter().map(|c| quote_ident(c)).collect();
        let sql = format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            quote_ident(&prepared.target),
            cols.join(", ")
        );
        let tx = conn
            .transaction()
            .await
            .map_err(|e| SinkError::postgres("begin", e))?;
        if !self.claim(&tx, chunk).await? {
            tx.rollback()
                .await
                .map_err(|e| SinkError::postgres("rollback", e))?;
            return Ok(Written {
                already_committed: true,
                ..Default::default()
            });
        }
        // Copy under savepoints; on a data error split the rows until the bad ones are
        // alone, and dead-letter those.
        let mut written = Written::default();
        let mut work: Vec<Vec<Slice>> = vec![prepared.parts];
        while let Some(rows) = work.pop() {
            if rows.is_empty() {
                continue;
            }
            tx.batch_execute("SAVEPOINT sluice_copy")
                .await
                .map_err(|e| SinkError::postgres("savepoint", e))?;
            match copy_rows(&tx, &sql, &prepared.types, &rows).await {
                Ok(bytes) => {
                    tx.batch_execute("RELEASE SAVEPOINT sluice_copy")
                        .await
                        .map_err(|e| SinkError::postgres("release savepoint", e))?;
                    written.rows += rows.iter().map(|r| r.rows.num_rows() as u64).sum::<u64>();
                    written.bytes += bytes;
                }
                Err(CopyFailure::Sink(e)) => return Err(e),
                Err(CopyFailure::Data(message)) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT sluice_copy")
                        .await
                        .map_err(|e| SinkError::postgres("rollback to savepoint", e))?;
                    let n: usize = rows.iter().map(|r| r.rows.num_rows()).sum();
                    if n == 1 {
                        let one = rows.into_iter().next().expect("one row");
                        refused.push(Refused {
                            seq: one.seq,
                            rows: one.original,
                            error: message,
                        });
                    } else {
                        let (l, r) = halves(rows);
                        work.push(r);
                        work.push(l);
                    }
                }
            }
        }
        written.dead_letter_rows = self
            .dead_letter
            .record(PG_SINK, table, first, last, &refused)
            .await?;
        tx.commit()
            .await
            .map_err(|e| SinkError::postgres("commit", e))?;
        Ok(written)
    }
}

/// The highest WAL sequence number of `wal_id` that PostgreSQL holds a range up to: a WAL
/// that lost its newest records must number new ones above it, or the sink would take
/// them for records it has.
pub async fn highest_committed(
    client: &tokio_postgres::Client,
    wal_id: &str,
) -> Result<u64, SinkError> {
    let row = client
        .query_one(
            "SELECT coalesce(max(last_seq), 0) FROM sluice.sluice_sink_offsets WHERE wal_id = $1",
            &[&wal_id],
        )
        .await
        .map_err(|e| SinkError::postgres("reading sluice_sink_offsets", e))?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}
