//! What every store sink that keeps its own position shares (PostgreSQL now, ClickHouse
//! next): reading the WAL, coalescing per table, parallel writers, retries, positions.
//!
//! # What flows through it
//! A [`SinkRunner`] tails the WAL ([`sluice_wal::WalTail`]) from the sink's registered
//! position. Each record of a table routed to the sink, and not already committed in the
//! store (the [`CommittedRanges`] the store reports at start), is decoded, brought to the
//! table's current schema and appended to that table's open [`Chunk`]. A chunk is sealed
//! when it reaches the row or byte target, or when it has waited `linger`, and goes to one
//! of `workers` tasks, each with its own store connection, that hand it to the store's
//! [`StoreWriter`]. A store that [streams](StoreWriter::streams) gets a chunk as soon as
//! it opens, if a worker is idle, and is fed its records as they arrive ([`LiveParts`]).
//! Records come from the WAL's in-memory feed while the sink keeps up, from disk when it
//! does not. The writer commits the chunk together with its WAL range (or writes
//! rows the store refuses to the [`DeadLetter`] files first); failures it cannot settle
//! come back as [`SinkError`] and are retried with exponential backoff, reconnecting when
//! asked, until they succeed. A [`Tracker`] knows which records are still pending; the
//! highest seq below all of them is the sink's WAL position, which lets the WAL release
//! segments. [`SinkStatus`] is what `/readyz` and `/metrics` show.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use flight_schema::{ResolvedTable, SinkKind};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::watch;

use sluice_core::buffer::data_size;
use sluice_core::metrics::Metrics;
use sluice_core::registry::Registry;
use sluice_wal::{Wal, WalRecord};

/// Rows of one WAL record, adapted to the chunk's table version.
pub struct Part {
    pub seq: u64,
    pub batch: RecordBatch,
}

/// The parts of a chunk that is still filling, shared by the runner (which appends to it
/// and seals it) and the worker already streaming it to the store (see
/// [`StoreWriter::streams`]).
#[derive(Default)]
pub struct LiveParts {
    inner: Mutex<Filling>,
    changed: tokio::sync::Notify,
}

/// What a [`LiveParts`] holds so far.
#[derive(Default)]
struct Filling {
    /// `(WAL seq, rows)` in seq order.
    parts: Vec<(u64, RecordBatch)>,
    /// No more parts will come.
    sealed: bool,
}

impl LiveParts {
    fn push(&self, seq: u64, batch: RecordBatch) {
        self.inner
            .lock()
            .expect("live parts")
            .parts
            .push((seq, batch));
        self.changed.notify_waiters();
    }

    fn seal(&self) {
        self.inner.lock().expect("live parts").sealed = true;
        self.changed.notify_waiters();
    }

    /// Part `i` once it is there; `None` once the chunk is sealed with fewer parts.
    pub async fn get(&self, i: usize) -> Option<(u64, RecordBatch)> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let g = self.inner.lock().expect("live parts");
                if let Some(p) = g.parts.get(i) {
                    return Some(p.clone());
                }
                if g.sealed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Every part, once the chunk is sealed.
    pub async fn sealed(&self) -> Vec<(u64, RecordBatch)> {
        let mut i = 0;
        while self.get(i).await.is_some() {
            i += 1;
        }
        self.inner.lock().expect("live parts").parts.clone()
    }

    fn seqs(&self) -> Vec<u64> {
        let g = self.inner.lock().expect("live parts");
        g.parts.iter().map(|(seq, _)| *seq).collect()
    }
}

/// Consecutive records of one table, written to the store in one transaction.
pub struct Chunk {
    /// The table version every part has been adapted to.
    pub table: Arc<ResolvedTable>,
    /// The parts (empty in the copy of a live chunk a worker streams: see `live`).
    pub parts: Vec<Part>,
    pub rows: usize,
    pub bytes: usize,
    opened: Instant,
    /// When the last record was added.
    last_push: Instant,
    /// Opened right after the table's previous chunk filled up: the rest of a burst.
    after_full: bool,
    /// Re-formed after a restart from a plan in the [`PlanJournal`]: already planned.
    replayed: bool,
    /// Set when a worker streams the chunk while it fills: the parts as they come.
    pub live: Option<Arc<LiveParts>>,
    /// The runner's copy of a live chunk has gone to a worker already.
    dispatched: bool,
}

impl Chunk {
    fn new(table: Arc<ResolvedTable>) -> Self {
        Self {
            table,
            parts: Vec::new(),
            rows: 0,
            bytes: 0,
            opened: Instant::now(),
            last_push: Instant::now(),
            after_full: false,
            replayed: false,
            live: None,
            dispatched: false,
        }
    }

    fn push(&mut self, seq: u64, batch: RecordBatch) {
        self.rows += batch.num_rows();
        self.bytes += data_size(&batch);
        self.last_push = Instant::now();
        if let Some(live) = &self.live {
            live.push(seq, batch.clone());
        }
        self.parts.push(Part { seq, batch });
    }

    /// What a worker gets of a live chunk: the table and the shared parts.
    fn live_copy(&self) -> Option<Chunk> {
        let live = self.live.clone()?;
        Some(Chunk {
            live: Some(live),
            opened: self.opened,
            ..Chunk::new(self.table.clone())
        })
    }

    /// The WAL seqs of the chunk's records (of a live chunk: those it has so far).
    pub fn seqs(&self) -> Vec<u64> {
        match &self.live {
            Some(l) if self.parts.is_empty() => l.seqs(),
            _ => self.parts.iter().map(|p| p.seq).collect(),
        }
    }

    /// The first and last WAL seq (0 while empty).
    fn ends(&self) -> (u64, u64) {
        let seq = |p: Option<&Part>| p.map_or(0, |p| p.seq);
        match &self.live {
            Some(l) if self.parts.is_empty() => {
                let g = l.inner.lock().expect("live parts");
                (
                    g.parts.first().map_or(0, |(seq, _)| *seq),
                    g.parts.last().map_or(0, |(seq, _)| *seq),
                )
            }
            _ => (seq(self.parts.first()), seq(self.parts.last())),
        }
    }

    pub fn first_seq(&self) -> u64 {
        self.ends().0
    }

    pub fn last_seq(&self) -> u64 {
        self.ends().1
    }
}

/// A failure the sink retries: the store is down, a connection broke, a lock timed out.
#[derive(Debug, Clone)]
pub struct SinkError {
    pub message: String,
    /// Drop the connection and open a new one before retrying.
    pub reconnect: bool,
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a committed chunk did.
#[derive(Debug, Default, Clone)]
pub struct Written {
    pub rows: u64,
    pub bytes: u64,
    pub dead_letter_rows: u64,
    /// The store already had this chunk (committed before a crash): nothing was written.
    pub already_committed: bool,
    /// The store cannot take this table's rows for good (its table cannot be created or
    /// altered): the whole chunk went to the dead-letter files. The message names the
    /// statement and the store's answer; it stays in `/readyz` until a chunk of the table
    /// is written again.
    pub table_error: Option<String>,
}

/// WAL ranges a store already holds, per table (`first..=last` of a committed chunk).
#[derive(Debug, Default, Clone)]
pub struct CommittedRanges {
    ranges: HashMap<String, Vec<(u64, u64)>>,
}

impl CommittedRanges {
    pub fn add(&mut self, table: &str, first: u64, last: u64) {
        self.ranges
            .entry(table.to_string())
            .or_default()
            .push((first, last));
    }

    /// Adds every range of `other`.
    pub fn merge(&mut self, other: CommittedRanges) {
        for (t, v) in other.ranges {
            self.ranges.entry(t).or_default().extend(v);
        }
    }

    /// Sorts the ranges and merges overlapping ones; call once after the last `add`.
    ///
    /// Ranges can overlap: a chunk re-formed after a restart skips the records a later
    /// chunk had already committed, so its range spans that one. Every record of the
    /// table inside either range is committed, so the union is what counts.
    pub fn finish(mut self) -> Self {
        for v in self.ranges.values_mut() {
            v.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
            for &(first, last) in v.iter() {
                match merged.last_mut() {
                    Some(m) if first <= m.1.saturating_add(1) => m.1 = m.1.max(last),
                    _ => merged.push((first, last)),
                }
            }
            *v = merged;
        }
        self
    }

    pub fn contains(&self, table: &str, seq: u64) -> bool {
        let Some(v) = self.ranges.get(table) else {
            return false;
        };
        let i = v.partition_point(|(first, _)| *first <= seq);
        i > 0 && v[i - 1].1 >= seq
    }

    pub fn len(&self) -> usize {
        self.ranges.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A store's side of a sink.
#[async_trait::async_trait]
pub trait StoreWriter: Send + Sync + 'static {
    /// A connection (or client) one worker uses.
    type Conn: Send;

    /// The sink's name (`postgres`, `clickhouse`): metrics label, WAL position key.
    fn name(&self) -> &'static str;
    fn kind(&self) -> SinkKind;
    /// Whether [`StoreWriter::write`] takes live chunks: a chunk then goes to an idle
    /// worker as soon as it opens and is streamed to the store as it fills (its
    /// [`Chunk::live`] parts). The store must not commit any of it before the stream
    /// ends, which happens only after the chunk is sealed and planned.
    fn streams(&self) -> bool {
        false
    }
    async fn connect(&self) -> Result<Self::Conn, SinkError>;
    /// The WAL ranges of `wal_id` the store already holds.
    async fn committed(
        &self,
        conn: &mut Self::Conn,
        wal_id: &str,
    ) -> Result<CommittedRanges, SinkError>;
    /// Writes a chunk exactly once: commits it with its WAL range, or finds that range
    /// already committed. Rows the store refuses for good go to the dead-letter files.
    async fn write(&self, conn: &mut Self::Conn, chunk: &Chunk) -> Result<Written, SinkError>;
    /// Forgets committed ranges wholly below `seq` (records no longer in the WAL, so never
    /// read again); keeps the store's bookkeeping from growing without bound.
    async fn forget_below(
        &self,
        _conn: &mut Self::Conn,
        _wal_id: &str,
        _seq: u64,
    ) -> Result<(), SinkError> {
        Ok(())
    }
}

/// How often a sink forgets committed ranges the WAL no longer holds.
const FORGET_EVERY: Duration = Duration::from_secs(30);

/// Sizes and timings of a sink (from its config section).
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub workers: usize,
    pub batch_rows: usize,
    pub batch_bytes: usize,
    pub linger: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// State of one sink, for `/readyz` and `/metrics`.
pub struct SinkStatus {
    pub name: &'static str,
    inner: Mutex<StatusInner>,
}

struct StatusInner {
    up: bool,
    started: bool,
    last_error: Option<String>,
    retries: u64,
    since: Instant,
    position: u64,
    oldest_pending: Option<Instant>,
    /// Tables whose rows the store refuses for good (see [`Written::table_error`]).
    table_errors: BTreeMap<String, String>,
}

impl SinkStatus {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            inner: Mutex::new(StatusInner {
                up: false,
                started: false,
                last_error: None,
                retries: 0,
                since: Instant::now(),
                position: 0,
                oldest_pending: None,
                table_errors: BTreeMap::new(),
            }),
        }
    }

    fn set_up(&self, metrics: &Metrics) {
        let mut s = self.inner.lock().expect("sink status");
        if !s.up || !s.started {
            s.since = Instant::now();
        }
        s.up = true;
        s.started = true;
        s.last_error = None;
        metrics.sink_up.with_label_values(&[self.name]).set(1);
    }

    /// Records a failure; true if the sink was up until now (worth a warning; repeats
    /// of the same outage are logged at debug level).
    fn set_retrying(&self, metrics: &Metrics, error: &str) -> bool {
        let mut s = self.inner.lock().expect("sink status");
        let was_up = s.up || !s.started;
        if s.up || !s.started {
            s.since = Instant::now();
        }
        s.up = false;
        s.started = true;
        s.retries += 1;
        s.last_error = Some(error.to_string());
        metrics.sink_up.with_label_values(&[self.name]).set(0);
        metrics.sink_retries.with_label_values(&[self.name]).inc();
        was_up
    }

    /// Notes (or clears) a table the store refuses; true when the error is new, so it is
    /// logged once rather than per chunk.
    fn set_table_error(&self, metrics: &Metrics, table: &str, error: Option<&str>) -> bool {
        let mut s = self.inner.lock().expect("sink status");
        let changed = match error {
            Some(e) => s.table_errors.get(table).map(String::as_str) != Some(e),
            None => s.table_errors.contains_key(table),
        };
        match error {
            Some(e) => s.table_errors.insert(table.to_string(), e.to_string()),
            None => s.table_errors.remove(table),
        };
        metrics
            .sink_failed_tables
            .with_label_values(&[self.name])
            .set(s.table_errors.len() as i64);
        changed
    }

    /// Whether the store refuses some table for good.
    pub fn has_table_errors(&self) -> bool {
        !self
            .inner
            .lock()
            .expect("sink status")
            .table_errors
            .is_empty()
    }

    /// Whether the sink's last attempt succeeded.
    pub fn is_up(&self) -> bool {
        self.inner.lock().expect("sink status").up
    }

    /// JSON for `/readyz`.
    pub fn json(&self, wal_last_seq: u64) -> serde_json::Value {
        let s = self.inner.lock().expect("sink status");
        let state = match (s.started, s.up) {
            (false, _) => "starting",
            (true, true) => "ok",
            (true, false) => "retrying",
        };
        serde_json::json!({
            "state": state,
            "for_seconds": s.since.elapsed().as_secs(),
            "last_error": s.last_error,
            "retries": s.retries,
            "wal_position": s.position,
            "lag_records": wal_last_seq.saturating_sub(s.position),
            "lag_seconds": s.oldest_pending.map_or(0.0, |o| o.elapsed().as_secs_f64()),
            "failed_tables": s.table_errors,
        })
    }
}

/// Which records a sink still owes its store.
#[derive(Default)]
pub struct Tracker {
    /// Seq → when it was read.
    pending: BTreeMap<u64, Instant>,
    /// Everything up to here has been read.
    read_upto: u64,
}

impl Tracker {
    /// Every record up to this seq is durable in the store (or not routed to it).
    pub fn position(&self) -> u64 {
        self.pending
            .first_key_value()
            .map_or(self.read_upto, |(s, _)| s - 1)
    }
}

/// Rows being written, per WAL record: `(seq, rows as the store gets them, rows as they
/// were received)` (the two differ where a sink reshapes, e.g. the metrics split).
pub type Rows = Vec<(u64, RecordBatch, RecordBatch)>;

/// Splits rows in two halves by row count (slicing batches), for narrowing a refused
/// write down to the refused rows.
pub fn halves(rows: Rows) -> (Rows, Rows) {
    let total: usize = rows.iter().map(|r| r.1.num_rows()).sum();
    let mut left_n = total / 2;
    let (mut left, mut right) = (Vec::new(), Vec::new());
    for (seq, b, o) in rows {
        let n = b.num_rows();
        if left_n == 0 {
            right.push((seq, b, o));
        } else if n <= left_n {
            left_n -= n;
            left.push((seq, b, o));
        } else {
            left.push((seq, b.slice(0, left_n), o.slice(0, left_n)));
            right.push((
                seq,
                b.slice(left_n, n - left_n),
                o.slice(left_n, n - left_n),
            ));
            left_n = 0;
        }
    }
    (left, right)
}

/// What a plan journal holds at start: done ranges, and plans `(table, seqs)` not done.
pub type Journaled = (CommittedRanges, Vec<(String, Vec<u64>)>);

/// Rows a store refused for good, kept as Parquet beside the archive:
/// `_deadletter/<sink>/<table>/<first seq>-<last seq>.parquet`, with the table's
/// columns plus `_sluice_wal_seq` and `_sluice_error` (the store's message). Writing the
/// same range again replaces the file, so a retried chunk does not duplicate them.
pub struct DeadLetter {
    pub store: Arc<dyn ObjectStore>,
}

/// One refused row (or run of rows refused with the same error).
pub struct Refused {
    pub seq: u64,
    pub rows: RecordBatch,
    pub error: String,
}

impl DeadLetter {
    pub fn path(sink: &str, table: &str, first: u64, last: u64) -> String {
        format!("_deadletter/{sink}/{table}/{first:020}-{last:020}.parquet")
    }

    /// Writes the refused rows of a chunk (if any) and logs where they went; returns how
    /// many rows were dead-lettered.
    pub async fn record(
        &self,
        sink: &str,
        table: &str,
        first: u64,
        last: u64,
        refused: &[Refused],
    ) -> Result<u64, SinkError> {
        if refused.is_empty() {
            return Ok(0);
        }
        let n: u64 = refused.iter().map(|r| r.rows.num_rows() as u64).sum();
        let path = self
            .write(sink, table, first, last, refused)
            .await
            .map_err(|e| SinkError {
                message: e,
                reconnect: false,
            })?;
        tracing::warn!(sink, %table, rows = n, %path, first_error = %refused[0].error,
            "the store refused rows; they are in the dead-letter file");
        Ok(n)
    }

    /// Writes the refused rows of one chunk; returns the file's path.
    pub async fn write(
        &self,
        sink: &str,
        table: &str,
        first: u64,
        last: u64,
        refused: &[Refused],
    ) -> Result<String, String> {
        let Some(first_batch) = refused.first() else {
            return Err("nothing to dead-letter".into());
        };
        let base = first_batch.rows.schema();
        let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("_sluice_wal_seq", DataType::Int64, false));
        fields.push(Field::new("_sluice_error", DataType::Utf8, false));
        let schema = Arc::new(Schema::new(fields));
        let mut batches = Vec::new();
        for r in refused {
            let n = r.rows.num_rows();
            let mut cols: Vec<ArrayRef> = r.rows.columns().to_vec();
            cols.push(Arc::new(Int64Array::from(vec![r.seq as i64; n])));
            cols.push(Arc::new(StringArray::from(vec![r.error.as_str(); n])));
            batches.push(RecordBatch::try_new(schema.clone(), cols).map_err(|e| e.to_string())?);
        }
        let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), schema, None)
            .map_err(|e| e.to_string())?;
        for b in &batches {
            w.write(b).map_err(|e| e.to_string())?;
        }
        let data = w.into_inner().map_err(|e| e.to_string())?;
        let path = Self::path(sink, table, first, last);
        self.store
            .put(&ObjPath::from(path.as_str()), PutPayload::from(data))
            .await
            .map_err(|e| format!("dead-letter write {path}: {e}"))?;
        Ok(path)
    }
}

/// A sink's plan journal: JSON lines `{"plan": table, "seqs": [...]}` written (and
/// fsynced) before a chunk is sent, `{"done": table, "first": n, "last": n}` after the
/// store took it. After a crash, done chunks are skipped and planned ones are formed again
/// from exactly the same records, so a store that deduplicates by a token derived from
/// the chunk's WAL range drops what it already had.
pub struct PlanJournal {
    path: std::path::PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum JournalLine {
    Plan { plan: String, seqs: Vec<u64> },
    Done { done: String, first: u64, last: u64 },
}

impl PlanJournal {
    pub fn new(path: std::path::PathBuf) -> Self {
        Self {
            path,
            file: Mutex::new(None),
        }
    }

    fn append(&self, line: &JournalLine, sync: bool) -> Result<(), String> {
        use std::io::Write;
        let mut text = serde_json::to_vec(line).map_err(|e| e.to_string())?;
        text.push(b'\n');
        let mut f = self.file.lock().expect("journal");
        if f.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            *f = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .map_err(|e| format!("{}: {e}", self.path.display()))?,
            );
        }
        let file = f.as_mut().expect("open journal");
        file.write_all(&text)
            .and_then(|_| if sync { file.sync_data() } else { Ok(()) })
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    pub fn plan(&self, table: &str, seqs: &[u64]) -> Result<(), String> {
        self.append(
            &JournalLine::Plan {
                plan: table.to_string(),
                seqs: seqs.to_vec(),
            },
            true,
        )
    }

    pub fn done(&self, table: &str, first: u64, last: u64) -> Result<(), String> {
        self.append(
            &JournalLine::Done {
                done: table.to_string(),
                first,
                last,
            },
            false,
        )
    }

    /// Done ranges and the plans not known to be done, in the order they were planned.
    /// A torn last line (a crash mid-append) is ignored.
    pub fn load(&self) -> Result<Journaled, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let mut done = CommittedRanges::default();
        let mut plans: Vec<(String, Vec<u64>)> = Vec::new();
        let mut done_keys = std::collections::HashSet::new();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<JournalLine>(line) {
                Ok(JournalLine::Plan { plan, seqs }) => plans.push((plan, seqs)),
                Ok(JournalLine::Done {
                    done: t,
                    first,
                    last,
                }) => {
                    done.add(&t, first, last);
                    done_keys.insert((t, first));
                }
                Err(_) if i + 1 == lines.len() => {}
                Err(e) => return Err(format!("{} line {}: {e}", self.path.display(), i + 1)),
            }
        }
        plans.retain(|(t, seqs)| !seqs.is_empty() && !done_keys.contains(&(t.clone(), seqs[0])));
        Ok((done, plans))
    }

    /// The highest sequence number any plan or done range names (0 without a journal): a
    /// WAL that lost its newest records must number new ones above it, or ClickHouse's
    /// deduplication would take a new insert for one it has.
    pub fn highest_seq(&self) -> Result<u64, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        Ok(text
            .lines()
            .filter_map(|l| match serde_json::from_str::<JournalLine>(l) {
                Ok(JournalLine::Plan { seqs, .. }) => seqs.last().copied(),
                Ok(JournalLine::Done { last, .. }) => Some(last),
                Err(_) => None,
            })
            .max()
            .unwrap_or(0))
    }

    /// Rewrites the journal without entries wholly below `seq` (no longer in the WAL).
    pub fn compact(&self, below: u64) -> Result<(), String> {
        let mut f = self.file.lock().expect("journal");
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(_) => return Ok(()),
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| match serde_json::from_str::<JournalLine>(l) {
                Ok(JournalLine::Plan { seqs, .. }) => seqs.last().is_some_and(|s| *s >= below),
                Ok(JournalLine::Done { last, .. }) => last >= below,
                Err(_) => false,
            })
            .collect();
        let tmp = self.path.with_extension("tmp");
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        *f = None;
        Ok(())
    }
}

/// Plans read back from the journal at start, being formed again record by record.
pub struct Replans {
    by_seq: HashMap<u64, usize>,
    plans: Vec<(Vec<u64>, Option<Chunk>)>,
}

impl Replans {
    fn new(plans: Vec<(String, Vec<u64>)>) -> Self {
        let mut by_seq = HashMap::new();
        let mut out = Vec::new();
        for (i, (_, seqs)) in plans.into_iter().enumerate() {
            for s in &seqs {
                by_seq.insert(*s, i);
            }
            out.push((seqs, None));
        }
        Self { by_seq, plans: out }
    }

    fn contains(&self, seq: u64) -> bool {
        self.by_seq.contains_key(&seq)
    }

    /// Adds a record to its plan; returns the chunk once it holds every planned record.
    fn take(&mut self, seq: u64, table: &Arc<ResolvedTable>, batch: RecordBatch) -> Option<Chunk> {
        let i = *self.by_seq.get(&seq)?;
        let (seqs, chunk) = &mut self.plans[i];
        let c = chunk.get_or_insert_with(|| {
            let mut c = Chunk::new(table.clone());
            c.replayed = true;
            c
        });
        c.push(seq, batch);
        if c.parts.len() == seqs.len() {
            self.by_seq.retain(|_, v| *v != i);
            return chunk.take();
        }
        None
    }

    /// Plans whose last record has been read but that are incomplete (records no longer
    /// routed here): written as they are.
    fn overdue(&mut self, read_upto: u64) -> Vec<Chunk> {
        let mut out = Vec::new();
        for (i, (seqs, chunk)) in self.plans.iter_mut().enumerate() {
            if chunk.is_some() && seqs.last().is_some_and(|l| *l <= read_upto) {
                out.push(chunk.take().expect("chunk"));
                self.by_seq.retain(|_, v| *v != i);
            }
        }
        out
    }
}

/// Runs one sink: the WAL reader and its workers.
pub struct SinkRunner<W: StoreWriter> {
    pub writer: Arc<W>,
    pub wal: Wal,
    pub wal_id: String,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// The stores this deployment has (for routing).
    pub configured: Vec<SinkKind>,
    pub opts: SinkOptions,
    pub status: Arc<SinkStatus>,
    pub tracker: Mutex<Tracker>,
    /// For stores whose exactly-once rests on writing the same chunk again after a crash
    /// (ClickHouse's deduplication tokens): chunks are planned here before they are
    /// written, and re-formed exactly from the plan after a restart.
    pub journal: Option<PlanJournal>,
    /// Chunks handed to the workers and not yet finished (live ones included).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Woken when a worker finishes a chunk.
    pub worker_done: tokio::sync::Notify,
    /// Tables whose last chunk was sealed full (at `batch_rows` or `batch_bytes`).
    pub filled: Mutex<std::collections::HashSet<String>>,
}

/// Waits `delay` (doubling it up to `max`) unless shutdown comes first; false on shutdown.
async fn backoff(
    delay: &mut Duration,
    max: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let wait = *delay;
    *delay = (*delay * 2).min(max);
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = shutdown.changed() => false,
    }
}

impl<W: StoreWriter> SinkRunner<W> {
    /// Publishes the sink's position to the WAL (releasing segments) and its lag.
    fn publish_position(&self) {
        let (position, oldest) = {
            let t = self.tracker.lock().expect("sink tracker");
            (t.position(), t.pending.first_key_value().map(|(_, at)| *at))
        };
        self.wal.set_sink_position(self.writer.name(), position);
        {
            let mut s = self.status.inner.lock().expect("sink status");
            s.position = position;
            s.oldest_pending = oldest;
        }
        let name = self.writer.name();
        self.metrics
            .sink_lag_records
            .with_label_values(&[name])
            .set(self.wal.last_seq().saturating_sub(position) as i64);
        self.metrics
            .sink_lag_seconds
            .with_label_values(&[name])
            .set(oldest.map_or(0, |o| o.elapsed().as_secs() as i64));
    }

    /// Runs until `shutdown`. Chunks not committed by then are written after the next
    /// start, from the WAL.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let name = self.writer.name();
        let mut delay = self.opts.retry_initial;
        // What the store already has.
        let committed = loop {
            let attempt = async {
                let mut conn = self.writer.connect().await?;
                self.writer.committed(&mut conn, &self.wal_id).await
            };
            match attempt.await {
                Ok(c) => break c,
                Err(e) => {
                    if self.status.set_retrying(&self.metrics, &e.message) {
                        tracing::warn!(sink = name, error = %e, "sink cannot reach its store; retrying");
                    }
                    if !backoff(&mut delay, self.opts.retry_max, &mut shutdown).await {
                        return;
                    }
                }
            }
        };
        let (committed, mut replans) = match &self.journal {
            Some(j) => {
                let (done, plans) = match j.load() {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::error!(sink = name, error = %e, "cannot read the sink's plan journal");
                        let _ = self.status.set_retrying(&self.metrics, &e);
                        return;
                    }
                };
                let mut c = committed;
                c.merge(done);
                (c.finish(), Some(Replans::new(plans)))
            }
            None => (committed, None),
        };
        self.status.set_up(&self.metrics);
        let start = self
            .wal
            .sink_positions()
            .into_iter()
            .find(|(s, _)| *s == name)
            .map_or(self.wal.first_seq().saturating_sub(1), |(_, p)| p);
        tracing::info!(
            sink = name,
            from_seq = start + 1,
            committed_ranges = committed.len(),
            "sink started"
        );
        self.tracker.lock().expect("sink tracker").read_upto = start;

        // Unbounded: the runner never waits on the workers while a live chunk it alone can
        // seal is being streamed; it stops reading the WAL instead (see `in_flight`).
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Chunk>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let mut workers = Vec::new();
        for _ in 0..self.opts.workers {
            workers.push(tokio::spawn(
                self.clone().worker(rx.clone(), shutdown.clone()),
            ));
        }

        let mut tail = Some(self.wal.tail(start));
        let mut open: BTreeMap<String, Chunk> = BTreeMap::new();
        let mut last_forget = Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if last_forget.elapsed() >= FORGET_EVERY {
                last_forget = Instant::now();
                let (writer, wal_id, below) = (
                    self.writer.clone(),
                    self.wal_id.clone(),
                    self.wal.first_seq(),
                );
                if let Some(j) = &self.journal {
                    if let Err(e) = j.compact(below) {
                        tracing::warn!(sink = name, error = %e, "cannot compact the plan journal");
                    }
                }
                tokio::spawn(async move {
                    let r = async {
                        let mut conn = writer.connect().await?;
                        writer.forget_below(&mut conn, &wal_id, below).await
                    };
                    if let Err(e) = r.await {
                        tracing::debug!(sink = writer.name(), error = %e, "cannot forget old committed ranges now");
                    }
                });
            }
            // Backpressure: with this many chunks queued or being written, read no more
            // of the WAL (live chunks still seal on time below).
            let busy = self.in_flight.load(Ordering::Acquire) >= 2 * self.opts.workers;
            let read = if busy {
                Ok(Vec::new())
            } else {
                let mut t = tail.take().expect("tail");
                let (t, read) = tokio::task::spawn_blocking(move || {
                    let r = t.read(32 << 20);
                    (t, r)
                })
                .await
                .expect("WAL reader thread");
                tail = Some(t);
                read
            };
            let records = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(sink = name, error = %e, "sink cannot read the WAL; retrying");
                    let _ = self
                        .status
                        .set_retrying(&self.metrics, &format!("reading the WAL: {e}"));
                    if !backoff(&mut delay, self.opts.retry_max, &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let idle = records.is_empty();
            let mut ready = Vec::new();
            for rec in records {
                let seq = rec.seq;
                ready.extend(self.take_record(rec, &committed, &mut open, replans.as_mut()));
                self.tracker.lock().expect("sink tracker").read_upto = seq;
            }
            // Seal chunks that waited long enough, and replayed plans whose records are
            // all read (some may no longer be routed here).
            let due: Vec<String> = open
                .iter()
                .filter(|(_, c)| self.due(c))
                .map(|(k, _)| k.clone())
                .collect();
            for k in due {
                ready.push(open.remove(&k).expect("open chunk"));
            }
            if let Some(r) = replans.as_mut() {
                let read_upto = self.tracker.lock().expect("sink tracker").read_upto;
                ready.extend(r.overdue(read_upto));
            }
            for chunk in ready {
                if let Err(e) = self.plan(&chunk).await {
                    tracing::error!(sink = name, error = %e, "cannot write the sink's plan journal");
                    let _ = self.status.set_retrying(&self.metrics, &e);
                    // Without a plan the chunk cannot be replayed exactly: stop here; the
                    // records stay pending in the WAL and are read again after a restart.
                    // Live chunks being streamed are cut off unfinished, so the store
                    // commits none of them.
                    drop(tx);
                    for w in workers {
                        w.abort();
                        let _ = w.await;
                    }
                    return;
                }
                if let Some(live) = &chunk.live {
                    live.seal();
                }
                if chunk.dispatched {
                    continue;
                }
                let send = chunk.live_copy().unwrap_or(chunk);
                self.in_flight.fetch_add(1, Ordering::AcqRel);
                if tx.send(send).is_err() {
                    break;
                }
            }
            // Chunks of a streaming store go to a worker as soon as one is idle.
            for c in open.values_mut() {
                if c.dispatched || self.in_flight.load(Ordering::Acquire) >= self.opts.workers {
                    continue;
                }
                if let Some(copy) = c.live_copy() {
                    c.dispatched = true;
                    self.in_flight.fetch_add(1, Ordering::AcqRel);
                    let _ = tx.send(copy);
                }
            }
            self.publish_position();
            let wait = (self.opts.linger / 5).min(Duration::from_millis(100));
            if busy {
                tokio::select! {
                    _ = self.worker_done.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
            } else if idle {
                // Only if nothing became durable since the read (a commit between the
                // read and the wait would not wake it).
                let next = tail.as_ref().map_or(0, |t| t.next_seq());
                if self.wal.last_seq() < next {
                    tokio::select! {
                        _ = self.wal.wait_durable(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
        drop(tx);
        for w in workers {
            let _ = w.await;
        }
    }

    /// Whether an open chunk is to be sealed now: it is `linger` old; or it is being
    /// streamed, is part of a burst (it holds a quarter of the row or byte target, or the
    /// table's previous chunk filled up), and no record came for a fifth of `linger`. A
    /// burst that ended is committed without waiting out `linger`, while a trickle still
    /// gathers into inserts of a useful size.
    fn due(&self, c: &Chunk) -> bool {
        let o = &self.opts;
        c.opened.elapsed() >= o.linger
            || (c.live.is_some()
                && (c.after_full || c.rows >= o.batch_rows / 4 || c.bytes >= o.batch_bytes / 4)
                && c.last_push.elapsed() >= o.linger / 5)
    }

    /// Records a chunk in the plan journal (fsynced) before it is written, unless it is a
    /// replay of a plan already there.
    async fn plan(&self, chunk: &Chunk) -> Result<(), String> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        if chunk.replayed || chunk.parts.is_empty() {
            return Ok(());
        }
        let seqs = chunk.seqs();
        j.plan(chunk.table.name(), &seqs)
    }

    /// Adds a record to its table's open chunk; returns the chunks ready to write.
    fn take_record(
        &self,
        rec: WalRecord,
        committed: &CommittedRanges,
        open: &mut BTreeMap<String, Chunk>,
        replans: Option<&mut Replans>,
    ) -> Vec<Chunk> {
        let name = self.writer.name();
        let Some(current) = self.registry.get(&rec.table) else {
            return vec![];
        };
        match current.routes(&self.configured) {
            Ok(r) if r.contains(&self.writer.kind()) => {}
            _ => return vec![],
        }
        if committed.contains(&rec.table, rec.seq) {
            return vec![];
        }
        let decoded = self
            .registry
            .get_version(&rec.table, rec.version)
            .ok_or_else(|| {
                format!(
                    "version {} of table '{}' is not registered",
                    rec.version, rec.table
                )
            })
            .and_then(|v| rec.decode(v.arrow_schema.clone()))
            .and_then(|b| {
                sluice_sql::query::adapt_batch(&b, &current.arrow_schema).map_err(|e| e.to_string())
            });
        let batch = match decoded {
            Ok(b) => b,
            Err(e) => {
                // A CRC-checked record that does not decode is a bug; keep it pending so
                // the WAL keeps it, and say so loudly.
                tracing::error!(sink = name, seq = rec.seq, table = %rec.table, error = %e,
                    "cannot decode a WAL record for the sink; it stays in the WAL");
                let _ = self.status.set_retrying(
                    &self.metrics,
                    &format!("record {} of '{}': {e}", rec.seq, rec.table),
                );
                self.tracker
                    .lock()
                    .expect("sink tracker")
                    .pending
                    .insert(rec.seq, Instant::now());
                return vec![];
            }
        };
        self.tracker
            .lock()
            .expect("sink tracker")
            .pending
            .insert(rec.seq, Instant::now());
        let mut ready = Vec::new();
        // A new table version seals the chunk of the older one.
        if open
            .get(&rec.table)
            .is_some_and(|c| c.table.version != current.version)
        {
            ready.extend(open.remove(&rec.table));
        }
        if let Some(replans) = replans {
            if let Some(chunk) = replans.take(rec.seq, &current, batch.clone()) {
                return vec![chunk];
            }
            if replans.contains(rec.seq) {
                return vec![];
            }
        }
        let streams = self.writer.streams();
        let chunk = open.entry(rec.table.clone()).or_insert_with(|| {
            let mut c = Chunk::new(current.clone());
            if streams {
                c.live = Some(Arc::new(LiveParts::default()));
            }
            c.after_full = self.filled.lock().expect("filled").remove(&rec.table);
            c
        });
        chunk.push(rec.seq, batch);
        if chunk.rows >= self.opts.batch_rows || chunk.bytes >= self.opts.batch_bytes {
            ready.extend(open.remove(&rec.table));
            self.filled
                .lock()
                .expect("filled")
                .insert(rec.table.clone());
        }
        ready
    }

    async fn worker(
        self: Arc<Self>,
        rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Chunk>>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let name = self.writer.name();
        let mut conn: Option<W::Conn> = None;
        loop {
            let chunk = {
                let mut r = rx.lock().await;
                tokio::select! {
                    c = r.recv() => c,
                    _ = shutdown.changed() => None,
                }
            };
            let Some(chunk) = chunk else { return };
            let table = chunk.table.name().to_string();
            let started = Instant::now();
            let mut delay = self.opts.retry_initial;
            loop {
                if conn.is_none() {
                    match self.writer.connect().await {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            if self.status.set_retrying(&self.metrics, &e.message) {
                                tracing::warn!(sink = name, error = %e, "cannot connect to the store; retrying with backoff");
                            } else {
                                tracing::debug!(sink = name, error = %e, "cannot connect; retrying");
                            }
                            if !backoff(&mut delay, self.opts.retry_max, &mut shutdown).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
                let result = tokio::select! {
                    r = self.writer.write(conn.as_mut().expect("connection"), &chunk) => Some(r),
                    _ = shutdown.changed() => None,
                };
                match result {
                    None => return,
                    Some(Ok(w)) => {
                        self.status.set_up(&self.metrics);
                        self.metrics
                            .sink_rows
                            .with_label_values(&[name, &table])
                            .inc_by(w.rows);
                        self.metrics
                            .sink_bytes
                            .with_label_values(&[name, &table])
                            .inc_by(w.bytes);
                        self.metrics
                            .sink_commits
                            .with_label_values(&[name, &table])
                            .inc();
                        if w.dead_letter_rows > 0 {
                            self.metrics
                                .sink_dead_letter_rows
                                .with_label_values(&[name, &table])
                                .inc_by(w.dead_letter_rows);
                        }
                        tracing::debug!(sink = name, %table, rows = w.rows, first_seq = chunk.first_seq(),
                            last_seq = chunk.last_seq(), ms = started.elapsed().as_millis() as u64,
                            "chunk written");
                        let fresh = self.status.set_table_error(
                            &self.metrics,
                            &table,
                            w.table_error.as_deref(),
                        );
                        match &w.table_error {
                            Some(e) if fresh => tracing::error!(sink = name, %table, error = %e,
                                "the store refuses this table: its rows go to the dead-letter files until it is fixed"),
                            None if fresh => tracing::info!(sink = name, %table,
                                "the store takes this table's rows again"),
                            _ => {}
                        }
                        if w.already_committed {
                            tracing::info!(sink = name, %table, first_seq = chunk.first_seq(), last_seq = chunk.last_seq(),
                                "chunk was already committed before a restart; skipped");
                        }
                        if let Some(j) = &self.journal {
                            // Not fsynced: if it is lost, the chunk is replayed with the
                            // same token and the store drops it as a duplicate.
                            if let Err(e) = j.done(&table, chunk.first_seq(), chunk.last_seq()) {
                                tracing::warn!(sink = name, error = %e, "cannot note a written chunk in the plan journal");
                            }
                        }
                        {
                            let mut t = self.tracker.lock().expect("sink tracker");
                            for seq in chunk.seqs() {
                                t.pending.remove(&seq);
                            }
                        }
                        self.publish_position();
                        self.in_flight.fetch_sub(1, Ordering::AcqRel);
                        self.worker_done.notify_waiters();
                        break;
                    }
                    Some(Err(e)) => {
                        if self.status.set_retrying(&self.metrics, &e.message) {
                            tracing::warn!(sink = name, %table, error = %e, "write failed; retrying with backoff");
                        } else {
                            tracing::debug!(sink = name, %table, error = %e, "write failed; retrying");
                        }
                        if e.reconnect {
                            conn = None;
                        }
                        if !backoff(&mut delay, self.opts.retry_max, &mut shutdown).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_ranges_answer_membership() {
        let mut c = CommittedRanges::default();
        c.add("t", 10, 20);
        c.add("t", 1, 3);
        c.add("u", 5, 5);
        let c = c.finish();
        assert!(c.contains("t", 1) && c.contains("t", 3) && c.contains("t", 15));
        assert!(!c.contains("t", 4) && !c.contains("t", 21) && !c.contains("t", 0));
        assert!(c.contains("u", 5) && !c.contains("u", 6) && !c.contains("v", 5));
        assert_eq!(c.len(), 3);

        // A re-formed chunk spanning one committed before it.
        let mut c = CommittedRanges::default();
        c.add("t", 10, 35);
        c.add("t", 21, 30);
        c.add("t", 40, 41);
        let c = c.finish();
        assert!(c.contains("t", 33) && c.contains("t", 25) && c.contains("t", 41));
        assert!(!c.contains("t", 36) && !c.contains("t", 9));
    }

    #[tokio::test]
    async fn live_parts_reach_the_reader_as_they_come_and_end_at_the_seal() {
        let b = |v: i64| {
            RecordBatch::try_from_iter(vec![("v", Arc::new(Int64Array::from(vec![v])) as ArrayRef)])
                .unwrap()
        };
        let live = Arc::new(LiveParts::default());
        let reader = {
            let live = live.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut i = 0;
                while let Some((seq, _)) = live.get(i).await {
                    got.push(seq);
                    i += 1;
                }
                got
            })
        };
        live.push(7, b(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The reader has the first part and waits for more.
        assert!(!reader.is_finished());
        live.push(9, b(2));
        live.seal();
        assert_eq!(reader.await.unwrap(), vec![7, 9]);
        assert_eq!(live.sealed().await.len(), 2);
        assert_eq!(live.seqs(), vec![7, 9]);
    }

    #[test]
    fn position_is_below_the_oldest_pending_record() {
        let mut t = Tracker {
            read_upto: 50,
            ..Default::default()
        };
        assert_eq!(t.position(), 50);
        t.pending.insert(12, Instant::now());
        t.pending.insert(30, Instant::now());
        assert_eq!(t.position(), 11);
        t.pending.remove(&12);
        assert_eq!(t.position(), 29);
    }
}

#[cfg(test)]
mod halves_tests {
    use super::*;
    use arrow::array::Int64Array;

    #[test]
    fn halves_split_by_rows_across_batches() {
        let b = |v: Vec<i64>| {
            RecordBatch::try_from_iter(vec![("v", Arc::new(Int64Array::from(v)) as ArrayRef)])
                .unwrap()
        };
        let rows: Rows = vec![
            (1, b(vec![1, 2, 3]), b(vec![1, 2, 3])),
            (2, b(vec![4, 5]), b(vec![4, 5])),
        ];
        let (l, r) = halves(rows);
        let n = |x: &Rows| x.iter().map(|r| (r.0, r.1.num_rows())).collect::<Vec<_>>();
        assert_eq!(n(&l), vec![(1, 2)]);
        assert_eq!(n(&r), vec![(1, 1), (2, 2)]);
    }
}
