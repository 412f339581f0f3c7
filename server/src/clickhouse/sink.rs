//! The ClickHouse side of the sink: idempotent Native-format inserts of coalesced chunks.
//!
//! # What flows through it
//! [`crate::sink::SinkRunner`] plans each [`Chunk`] in its journal and hands it to
//! [`ChWriter::write`], which:
//! 1. makes sure the table exists and matches: created lazily from the registered schema
//!    (MergeTree with the table's `order_by`, `partition_by` and `ttl`, and
//!    `non_replicated_deduplication_window` so replays are dropped); an existing table's
//!    columns are read from `system.columns`, registered columns it lacks are added, and
//!    a column whose type cannot take the registered data is reported with both types;
//! 2. streams the chunk as `INSERT INTO db.t (cols) FORMAT Native`, one Native block per WAL
//!    record, encoded from Arrow as the body is sent, with an `insert_deduplication_token`
//!    made of the WAL id and the chunk's WAL range. After a crash the runner forms the
//!    same chunk again from its plan, so ClickHouse drops an insert it already has.
//!
//! Errors ClickHouse marks as permanent (`Code: N` that is not about load or the
//! network) are narrowed down by inserting halves (each with its own derived token) until
//! the refused rows are alone; those go to the dead-letter files with ClickHouse's
//! message. Other errors go back to the runner, which retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use flight_schema::{ResolvedTable, SinkKind};
use futures::StreamExt;

use super::client::{ChClient, ChError};
use super::native::{ch_type_for, encode_block, ChType};
use crate::sink::{
    halves, Chunk, CommittedRanges, DeadLetter, Refused, Rows, SinkError, StoreWriter, Written,
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

fn sink_err(context: &str, e: &ChError) -> SinkError {
    SinkError {
        message: format!("{context}: {e}"),
        reconnect: false,
    }
}

/// The ClickHouse `CREATE TABLE` for a registered table.
pub fn create_table_sql(database: &str, table: &ResolvedTable, dedup_window: u64) -> String {
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
    let d = &table.definition;
    let order_by = d
        .order_by
        .clone()
        .unwrap_or_else(|| format!("({})", q(&table.time_column)));
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {}.{} ({}) ENGINE = MergeTree",
        q(database),
        q(table.name()),
        cols.join(", ")
    );
    if let Some(p) = &d.partition_by {
        sql.push_str(&format!(" PARTITION BY {p}"));
    }
    sql.push_str(&format!(" ORDER BY {order_by}"));
    if let Some(ttl) = &d.ttl {
        sql.push_str(&format!(" TTL {ttl}"));
    }
    sql.push_str(&format!(
        " SETTINGS non_replicated_deduplication_window = {dedup_window}"
    ));
    sql
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
            .map_err(|e| sink_err(&format!("reading the columns of {name}"), &e))?;
        if existing.is_none() {
            let ddl = create_table_sql(&db, table, self.dedup_window);
            self.client
                .execute(&ddl)
                .await
                .map_err(|e| sink_err(&format!("creating table {name}"), &e))?;
            tracing::info!(
                table = name,
                "created ClickHouse table from the registered schema"
            );
            existing = self
                .client
                .table_columns(name)
                .await
                .map_err(|e| sink_err(&format!("reading the columns of {name}"), &e))?;
        }
        let existing: HashMap<String, String> = existing.unwrap_or_default().into_iter().collect();
        let mut cols = Vec::new();
        for c in &table.definition.columns {
            let ty = match existing.get(&c.name) {
                Some(t) => ChType::parse(t).map_err(|e| SinkError {
                    message: format!(
                        "table '{name}' column '{}' has type {t}, which sluice cannot write: {e}",
                        c.name
                    ),
                    reconnect: false,
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
                            sink_err(&format!("adding column {} to {name}", c.name), &e)
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

    /// One insert of `parts` with `token`. `Err(Ok(message))`: ClickHouse refused the
    /// data for good; `Err(Err(e))`: retry later.
    async fn insert(
        &self,
        table: &str,
        columns: &Columns,
        token: &str,
        parts: &Rows,
    ) -> Result<u64, Result<String, SinkError>> {
        // Blocks are encoded one by one as the body streams; an encoding error ends the
        // body (ClickHouse then refuses the insert) and is reported as the reason.
        let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
        let batches: Vec<RecordBatch> = parts.iter().map(|(_, b, _)| b.clone()).collect();
        let cols = columns.clone();
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = bytes.clone();
        let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let err_slot = first_error.clone();
        let body = futures::stream::iter(batches).map(move |b| {
            let mut buf = Vec::new();
            match encode_block(&b, &cols, &mut buf) {
                Ok(()) => {
                    counter.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
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
            return Err(Ok(e));
        }
        match result {
            Ok(()) => Ok(bytes.load(std::sync::atomic::Ordering::Relaxed)),
            Err(e) if !e.transient && e.code.is_some() => Err(Ok(e.to_string())),
            Err(e) => Err(Err(sink_err(&format!("inserting into {table}"), &e))),
        }
    }

    fn token(&self, table: &str, first: u64, last: u64) -> String {
        format!("sluice:{}:{table}:{first}-{last}", self.wal_id)
    }
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
            .map_err(|e| sink_err("reaching ClickHouse", &e))
    }

    /// ClickHouse keeps no offsets: what it has is in the sink's plan journal.
    async fn committed(&self, _conn: &mut (), _wal_id: &str) -> Result<CommittedRanges, SinkError> {
        Ok(CommittedRanges::default())
    }

    async fn write(&self, _conn: &mut (), chunk: &Chunk) -> Result<Written, SinkError> {
        let table = chunk.table.name();
        let columns = self.ensure_table(&chunk.table).await?;
        // Types first: a column ClickHouse has with a type the registered data cannot
        // take stops the sink with both types named (the rows stay in the WAL until the
        // table or the registration is fixed), instead of dead-lettering the whole table.
        if let Some(p) = chunk.parts.first() {
            if let Err(e) = encode_block(&p.batch.slice(0, 0), &columns, &mut Vec::new()) {
                return Err(SinkError {
                    message: format!(
                        "table '{table}' in ClickHouse does not fit its registered schema: {e}"
                    ),
                    reconnect: false,
                });
            }
        }
        let (first, last) = (chunk.first_seq(), chunk.last_seq());
        let token = self.token(table, first, last);
        let mut written = Written::default();
        let mut refused = Vec::new();
        // (rows, token); the whole chunk first, halves under derived tokens on refusal.
        let all: Rows = chunk
            .parts
            .iter()
            .map(|p| (p.seq, p.batch.clone(), p.batch.clone()))
            .collect();
        let mut work = vec![(all, token)];
        while let Some((rows, token)) = work.pop() {
            let n: usize = rows.iter().map(|r| r.1.num_rows()).sum();
            if n == 0 {
                continue;
            }
            match self.insert(table, &columns, &token, &rows).await {
                Ok(bytes) => {
                    written.rows += n as u64;
                    written.bytes += bytes;
                }
                Err(Err(e)) => return Err(e),
                Err(Ok(message)) if n == 1 => {
                    let (seq, _, rows) = rows.into_iter().next().expect("one row");
                    refused.push(Refused {
                        seq,
                        rows,
                        error: message,
                    });
                }
                Err(Ok(_)) => {
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
