//! The ClickHouse side of the sink: idempotent Native-format inserts of coalesced chunks.
//!
//! # What flows through it
//! [`crate::runner::SinkRunner`] plans each [`Chunk`] in its journal and hands it to
//! [`ChWriter::write`], which:
//! 1. makes sure the table exists and matches: created lazily from the registered schema
//!    (MergeTree with the table's `order_by`, `partition_by` and `ttl`, and
//!    `non_replicated_deduplication_window` so replays are dropped); an existing table's
//!    columns are read from `system.columns`, registered columns it lacks are added, and
//!    a column whose type cannot take the registered data is reported with both types;
//! 2. streams the chunk as `INSERT INTO db.t (cols) FORMAT Native`, one Native block per WAL
//!    record, encoded from Arrow as the body is sent. The writer [streams](StoreWriter::streams):
//!    a chunk goes to an idle worker as soon as it opens and its records are sent while it
//!    fills, so ClickHouse parses while sluice still ingests; the body ends only once the
//!    runner has sealed the chunk and fsynced its plan. The insert carries an
//!    `insert_deduplication_token` made of the WAL id and the chunk's first record, and
//!    settings that make the whole insert one block, so ClickHouse commits all of it at
//!    the end of the body or none of it. After a crash the runner forms a planned chunk
//!    again from its plan, so ClickHouse drops an insert it already has; an unplanned one
//!    was never committed.
//!
//! Errors ClickHouse marks as permanent (`Code: N` that is not about load or the
//! network) are narrowed down by inserting halves (each with its own derived token) until
//! the refused rows are alone; those go to the dead-letter files with ClickHouse's
//! message. Other errors go back to the runner, which retries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use flight_schema::{ResolvedTable, SinkKind};
use futures::StreamExt;

use super::client::ChClient;
use super::native::{ch_type_for, encode_block, ChType};
use crate::runner::{
    halves, Chunk, CommittedRanges, DeadLetter, Refused, SinkError, Slice, StoreWriter, Written,
};

/// A table's target columns and their ClickHouse types, in registry order.
type Columns = Arc<Vec<(String, ChType)>>;

/// The sink's name: metrics label and WAL position key.
pub const CH_SINK: &str = "clickhouse";

/// Writes chunks into ClickHouse.
pub struct ChWriter {
    pub client: ChClient,
    pub wal_id: String,
    pub dead_letter: DeadLetter,
    pub dedup_window: u64,
    /// Per table: the version checked and the target column types, in registry order.
    ensured: Mutex<HashMap<String, (u64, Columns)>>,
}

/// A table's ClickHouse option (`order_by`, `partition_by`, `ttl`) that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("table '{table}': {key} '{text}': {source}")]
pub struct OptionError {
    pub table: String,
    pub key: &'static str,
    pub text: String,
    #[source]
    pub source: super::expr::ExprError,
}

impl From<OptionError> for flight_schema::SchemaError {
    fn from(e: OptionError) -> Self {
        flight_schema::SchemaError::Invalid {
            reason: format!("{} '{}': {}", e.key, e.text, e.source),
            table: e.table,
        }
    }
}

/// The ClickHouse `CREATE TABLE` for a registered table. Its `order_by`, `partition_by`
/// and `ttl` are parsed and written again ([`super::expr`]), never pasted; an option that
/// does not parse (registered before the check existed) is an error naming it.
pub fn create_table_sql(
    database: &str,
    table: &ResolvedTable,
    dedup_window: u64,
) -> Result<String, OptionError> {
    let q = super::client::quote_ident;
    let cols: Vec<String> = table
        .definition
        .columns
        .iter()
        .map(|c| {
            let t = ch_type_for(&c.column_type, table.is_nullable(c), c.role);
            format!("{} {t}", q(&c.name))
        })
        .collect();
    let options = TableOptions::of(table)?;
    let order_by = options
        .order_by
        .unwrap_or_else(|| format!("({})", q(&table.time_column)));
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {}.{} ({}) ENGINE = MergeTree",
        q(database),
        q(table.name()),
        cols.join(", ")
    );
    if let Some(p) = &options.partition_by {
        sql.push_str(&format!(" PARTITION BY {p}"));
    }
    sql.push_str(&format!(" ORDER BY {order_by}"));
    if let Some(ttl) = &options.ttl {
        sql.push_str(&format!(" TTL {ttl}"));
    }
    sql.push_str(&format!(
        " SETTINGS non_replicated_deduplication_window = {dedup_window}"
    ));
    Ok(sql)
}

/// The OpenTelemetry Collector ClickHouse exporter's tables, created from the exporter's
/// own DDL (`migrations/clickhouse/otel/`) rather than from the registered schema: the
/// exporter's codecs, indexes, `Nested` columns and the trace-id lookup view come with it.
const OTEL_DDL: &[(&str, &str)] = &[
    (
        flight_schema::seeds::OTEL_LOGS,
        include_str!("../../../../migrations/clickhouse/otel/otel_logs.sql"),
    ),
    (
        flight_schema::seeds::OTEL_TRACES,
        include_str!("../../../../migrations/clickhouse/otel/otel_traces.sql"),
    ),
];

/// The statements that create `table` in ClickHouse: the exporter's DDL for `otel_logs`
/// and `otel_traces` when they are registered as Sluice registers them (a client's own
/// table of that name gets the usual DDL), else [`create_table_sql`].
pub fn create_table_statements(
    database: &str,
    table: &ResolvedTable,
    dedup_window: u64,
) -> Result<Vec<String>, OptionError> {
    let builtin = OTEL_DDL.iter().find(|(name, _)| *name == table.name());
    if let Some((_, sql)) = builtin {
        let ours = flight_schema::seeds::otel_tables()
            .into_iter()
            .find(|t| t.name == table.name());
        if ours.is_some_and(|t| t.columns == table.definition.columns) {
            let sql = sql.replace("{dedup_window}", &dedup_window.to_string());
            return Ok(super::migrate::split_statements(&sql));
        }
    }
    create_table_sql(database, table, dedup_window).map(|s| vec![s])
}

/// A table's ClickHouse options, parsed and written again.
#[derive(Debug, Default)]
pub struct TableOptions {
    pub order_by: Option<String>,
    pub partition_by: Option<String>,
    pub ttl: Option<String>,
}

impl TableOptions {
    /// The options of `table`, or an error naming the option and what is wrong with it.
    pub fn of(table: &ResolvedTable) -> Result<Self, OptionError> {
        let columns: Vec<String> = table
            .definition
            .columns
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let d = &table.definition;
        type Parse = fn(&str, &[String]) -> Result<String, super::expr::ExprError>;
        let check = |key: &'static str, text: &Option<String>, f: Parse| {
            text.as_deref()
                .map(|t| {
                    f(t, &columns).map_err(|source| OptionError {
                        table: table.name().to_string(),
                        key,
                        text: t.to_string(),
                        source,
                    })
                })
                .transpose()
        };
        Ok(Self {
            order_by: check("order_by", &d.order_by, super::expr::expression)?,
            partition_by: check("partition_by", &d.partition_by, super::expr::expression)?,
            ttl: check("ttl", &d.ttl, super::expr::ttl)?,
        })
    }
}

impl ChWriter {
    pub fn new(
        client: ChClient,
        wal_id: String,
        dead_letter: DeadLetter,
        dedup_window: u64,
    ) -> Self {
        Self {
            client,
            wal_id,
            dead_letter,
            dedup_window,
            ensured: Mutex::new(HashMap::new()),
        }
    }

    /// The target columns of a table, creating or extending it first if needed.
    async fn ensure_table(&self, table: &ResolvedTable) -> Result<Columns, SinkError> {
        let name = table.name();
        if let Some((v, cols)) = self.ensured.lock().expect("ensured").get(name) {
            if *v == table.version {
                return Ok(cols.clone());
            }
        }
        let q = super::client::quote_ident;
        let db = self.client.database().to_string();
        let mut existing = self
            .client
            .table_columns(name)
            .await
            .map_err(|e| SinkError::clickhouse(format!("reading the columns of {name}"), e))?;
        if existing.is_none() {
            for ddl in create_table_statements(&db, table, self.dedup_window)? {
                self.client
                    .execute(&ddl)
                    .await
                    .map_err(|e| SinkError::clickhouse(format!("creating table {name}"), e))?;
            }
            tracing::info!(
                table = name,
                "created ClickHouse table from the registered schema"
            );
            existing =
                self.client.table_columns(name).await.map_err(|e| {
                    SinkError::clickhouse(format!("reading the columns of {name}"), e)
                })?;
        }
        let existing: HashMap<String, String> = existing.unwrap_or_default().into_iter().collect();
        let mut cols = Vec::new();
        for c in &table.definition.columns {
            let ty = match existing.get(&c.name) {
                Some(t) => ChType::parse(t).map_err(|e| SinkError::TableShape {
                    table: name.to_string(),
                    reason: format!(
                        "column '{}' has type {t}, which sluice cannot write: {e}",
                        c.name
                    ),
                })?,
                None => {
                    let t = ch_type_for(&c.column_type, table.is_nullable(c), c.role);
                    self.client
                        .execute(&format!(
                            "ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS {} {t}",
                            q(&db),
                            q(name),
                            q(&c.name)
                        ))
                        .await
                        .map_err(|e| {
                            SinkError::clickhouse(format!("adding column {} to {name}", c.name), e)
                        })?;
                    t
                }
            };
            cols.push((c.name.clone(), ty));
        }
        let cols = Arc::new(cols);
        self.ensured
            .lock()
            .expect("ensured")
            .insert(name.to_string(), (table.version, cols.clone()));
        Ok(cols)
    }

    /// One insert of `batches` with `token`; returns the rows and Native bytes sent.
    async fn insert<S>(
        &self,
        table: &str,
        columns: &Columns,
        token: &str,
        batches: S,
    ) -> Result<(u64, u64), InsertFailure>
    where
        S: futures::Stream<Item = RecordBatch> + Send + 'static,
    {
        // Blocks are encoded one by one as the body streams; an encoding error ends the
        // body (ClickHouse then refuses the insert) and is reported as the reason.
        let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
        let cols = columns.clone();
        let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let counter = counts.clone();
        let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let err_slot = first_error.clone();
        let body = batches.map(move |b| {
            // About the Arrow size plus a length byte or so per value: no regrowing.
            let mut buf = Vec::with_capacity(
                sluice_core::buffer::data_size(&b) + b.num_rows() * (b.num_columns() + 8),
            );
            match encode_block(&b, &cols, &mut buf) {
                Ok(()) => {
                    counter.0.fetch_add(b.num_rows() as u64, Ordering::Relaxed);
                    counter.1.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    Ok(bytes::Bytes::from(buf))
                }
                Err(e) => {
                    *err_slot.lock().expect("error slot") = Some(e.to_string());
                    Err(std::io::Error::other(e.to_string()))
                }
            }
        });
        let result = self.client.insert_native(table, &names, token, body).await;
        if let Some(e) = first_error.lock().expect("error slot").take() {
            // The data did not fit the column types: refused for good.
            return Err(InsertFailure::Data(e));
        }
        match result {
            Ok(()) => Ok((
                counts.0.load(Ordering::Relaxed),
                counts.1.load(Ordering::Relaxed),
            )),
            Err(e) if !e.transient && e.code.is_some() => Err(InsertFailure::Data(e.to_string())),
            Err(e) => Err(InsertFailure::Sink(SinkError::clickhouse(
                format!("inserting into {table}"),
                e,
            ))),
        }
    }

    /// The deduplication token of a chunk: the WAL and the chunk's first record. A chunk
    /// is streamed before its last record is known; a replay re-forms it from the same
    /// first record (from its plan, or, if it was never planned, ClickHouse committed
    /// none of it).
    fn token(&self, table: &str, first: u64) -> String {
        format!("sluice:{}:{table}:{first}", self.wal_id)
    }
}

/// Why an insert did not go through.
enum InsertFailure {
    /// ClickHouse (or the encoder) refused the rows for what they hold: narrow them down
    /// to the refused ones and dead-letter those.
    Data(String),
    /// ClickHouse or the way to it failed: the chunk is retried.
    Sink(SinkError),
}

#[async_trait::async_trait]
impl StoreWriter for ChWriter {
    type Conn = ();

    fn name(&self) -> &'static str {
        CH_SINK
    }

    fn kind(&self) -> SinkKind {
        SinkKind::Clickhouse
    }

    async fn connect(&self) -> Result<(), SinkError> {
        self.client
            .ping()
            .await
            .map_err(|e| SinkError::clickhouse("reaching ClickHouse", e))
    }

    /// ClickHouse keeps no offsets: what it has is in the sink's plan journal.
    async fn committed(&self, _conn: &mut (), _wal_id: &str) -> Result<CommittedRanges, SinkError> {
        Ok(CommittedRanges::default())
    }

    /// Streaming: a live chunk is sent as it fills, a replayed one whole.
    fn streams(&self) -> bool {
        true
    }

    async fn write(&self, _conn: &mut (), chunk: &Chunk) -> Result<Written, SinkError> {
        let table = chunk.table.name();
        let columns = self.ensure_table(&chunk.table).await?;
        let first = match &chunk.live {
            Some(live) => live.get(0).await,
            None => chunk.parts.first().map(|p| (p.seq, p.batch.clone())),
        };
        let Some((first, first_batch)) = first else {
            return Ok(Written::default());
        };
        // Types first: a column ClickHouse has with a type the registered data cannot
        // take stops the sink with both types named (the rows stay in the WAL until the
        // table or the registration is fixed), instead of dead-lettering the whole table.
        if let Err(e) = encode_block(&first_batch.slice(0, 0), &columns, &mut Vec::new()) {
            return Err(SinkError::TableShape {
                table: table.to_string(),
                reason: format!("in ClickHouse, it does not fit its registered schema: {e}"),
            });
        }
        let token = self.token(table, first);
        // The whole chunk in one insert, streamed as its records arrive when it is live.
        let attempt = match &chunk.live {
            Some(live) => {
                let live = live.clone();
                let parts = futures::stream::unfold(0usize, move |i| {
                    let live = live.clone();
                    async move { live.get(i).await.map(|(_, b)| (b, i + 1)) }
                });
                self.insert(table, &columns, &token, parts).await
            }
            None => {
                let batches: Vec<RecordBatch> =
                    chunk.parts.iter().map(|p| p.batch.clone()).collect();
                self.insert(table, &columns, &token, futures::stream::iter(batches))
                    .await
            }
        };
        let mut written = Written::default();
        match attempt {
            Ok((rows, bytes)) => {
                written.rows = rows;
                written.bytes = bytes;
                return Ok(written);
            }
            Err(InsertFailure::Sink(e)) => return Err(e),
            Err(InsertFailure::Data(_)) => {}
        }
        // Refused: narrow it down by halves, each under a token derived from the chunk's.
        let all: Vec<Slice> = match &chunk.live {
            Some(live) => live
                .sealed()
                .await
                .into_iter()
                .map(|(seq, b)| Slice::as_received(seq, b))
                .collect(),
            None => chunk
                .parts
                .iter()
                .map(|p| Slice::as_received(p.seq, p.batch.clone()))
                .collect(),
        };
        let (first, last) = (chunk.first_seq(), chunk.last_seq());
        let mut refused = Vec::new();
        let (l, r) = halves(all);
        let mut work = vec![(r, format!("{token}/r")), (l, format!("{token}/l"))];
        while let Some((rows, token)) = work.pop() {
            let n: usize = rows.iter().map(|r| r.rows.num_rows()).sum();
            if n == 0 {
                continue;
            }
            let batches: Vec<RecordBatch> = rows.iter().map(|r| r.rows.clone()).collect();
            match self
                .insert(table, &columns, &token, futures::stream::iter(batches))
                .await
            {
                Ok((_, bytes)) => {
                    written.rows += n as u64;
                    written.bytes += bytes;
                }
                Err(InsertFailure::Sink(e)) => return Err(e),
                Err(InsertFailure::Data(message)) if n == 1 => {
                    let one = rows.into_iter().next().expect("one row");
                    refused.push(Refused {
                        seq: one.seq,
                        rows: one.original,
                        error: message,
                    });
                }
                Err(InsertFailure::Data(_)) => {
                    let (l, r) = halves(rows);
                    work.push((r, format!("{token}/r")));
                    work.push((l, format!("{token}/l")));
                }
            }
        }
        written.dead_letter_rows = self
            .dead_letter
            .record(CH_SINK, table, first, last, &refused)
            .await?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flight_schema::seeds::otel_tables;

    #[test]
    fn the_otel_tables_get_the_exporters_ddl_and_a_clients_table_of_that_name_does_not() {
        let [logs, traces] = <[_; 2]>::try_from(otel_tables()).unwrap();
        let logs = logs.validate(1).unwrap();
        let stmts = create_table_statements("db", &logs, 777).unwrap();
        assert_eq!(stmts.len(), 1);
        assert!(
            stmts[0].contains("TraceFlags         UInt8"),
            "{}",
            stmts[0]
        );
        assert!(stmts[0].contains("non_replicated_deduplication_window = 777"));
        assert!(
            !stmts[0].contains('{'),
            "every placeholder is filled: {}",
            stmts[0]
        );

        let traces = traces.validate(1).unwrap();
        let stmts = create_table_statements("db", &traces, 5).unwrap();
        assert_eq!(stmts.len(), 3, "{stmts:?}");
        assert!(stmts[0].contains("CREATE TABLE IF NOT EXISTS otel_traces ("));
        assert!(stmts[1].contains("CREATE TABLE IF NOT EXISTS otel_traces_trace_id_ts"));
        assert!(
            stmts[2].contains("CREATE MATERIALIZED VIEW IF NOT EXISTS otel_traces_trace_id_ts_mv")
        );

        // A client's own `otel_logs` (other columns) is created from its registration.
        let mine = flight_schema::TableSchema::from_json(
            br#"{"name":"otel_logs","columns":[{"name":"t","type":"timestamp"}]}"#,
            None,
        )
        .unwrap()
        .validate(1)
        .unwrap();
        let stmts = create_table_statements("db", &mine, 5).unwrap();
        assert_eq!(stmts, vec![create_table_sql("db", &mine, 5).unwrap()]);
    }
}
