//! The route-and-chunk stage: each WAL record the tail stage reads is routed (is its
//! table sent to this store? did the store commit it before a restart?), decoded at the
//! version it was written at, brought to the table's current schema, and appended to the
//! table's open [`Chunk`]. Out come the chunks ready to write: full (row or byte target),
//! old enough (`linger`), ended by a new table version, or re-formed exactly from a plan
//! the journal kept across a restart.
//!
//! The router owns its open chunks and needs neither a store nor a WAL: records in,
//! chunks out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use flight_schema::{ResolvedTable, SinkKind};
use sluice_core::registry::Registry;
use sluice_wal::WalRecord;

use super::{Chunk, CommittedRanges, LiveParts, Plan};
use crate::error::SinkError;

/// When a chunk is full and how long it may wait (from the sink's options).
#[derive(Debug, Clone, Copy)]
pub struct ChunkTargets {
    pub rows: usize,
    pub bytes: usize,
    pub linger: Duration,
}

/// What became of one record.
pub enum Routed {
    /// Not for this store (another store's table, a table no longer registered), or
    /// committed before a restart: nothing is owed for it.
    Skipped,
    /// Owed to the store; these chunks are ready to write (often none yet).
    Taken(Vec<Chunk>),
    /// Owed to the store but it does not decode: it stays in the WAL (the sink's
    /// position stops below it) and the error says why.
    Stuck(SinkError),
}

/// The route-and-chunk stage; see the module doc.
pub struct Router {
    registry: Arc<Registry>,
    /// The stores this deployment has (a table routes only to configured ones).
    configured: Vec<SinkKind>,
    /// This sink's store.
    kind: SinkKind,
    /// Whether chunks are streamed to the store while they fill.
    streams: bool,
    targets: ChunkTargets,
    /// What the store already holds.
    committed: CommittedRanges,
    replans: Option<Replans>,
    open: BTreeMap<String, Chunk>,
    /// Tables whose last chunk was sealed full (at the row or byte target).
    filled: HashSet<String>,
    /// Take every table's records, routed here or not ([`super::StoreWriter::every_table`]).
    every_table: bool,
    /// Whether memory runs short ([`super::StoreWriter::memory_pressed`]).
    pressure: Option<Pressure>,
    /// Decoded rows the sink holds already ([`super::StoreWriter::cached`]).
    cache: Option<Cache>,
}

/// Looks up the decoded rows of `(table, seq)`.
pub type Cache = Box<dyn Fn(&str, u64) -> Option<RecordBatch> + Send>;

/// Asks whether memory runs short.
pub type Pressure = Box<dyn Fn() -> bool + Send>;

impl Router {
    pub fn new(
        registry: Arc<Registry>,
        configured: Vec<SinkKind>,
        kind: SinkKind,
        streams: bool,
        targets: ChunkTargets,
    ) -> Self {
        Self {
            registry,
            configured,
            kind,
            streams,
            targets,
            committed: CommittedRanges::default(),
            replans: None,
            open: BTreeMap::new(),
            filled: HashSet::new(),
            every_table: false,
            pressure: None,
            cache: None,
        }
    }

    /// Takes a record's rows from `cache` when it has them instead of decoding them.
    pub fn with_cache(mut self, cache: Cache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Takes the records of every table, routed to this store or not.
    pub fn every_table(mut self) -> Self {
        self.every_table = true;
        self
    }

    /// Seals the largest open chunk whenever `pressed` says memory runs short.
    pub fn under_pressure(mut self, pressed: Pressure) -> Self {
        self.pressure = Some(pressed);
        self
    }

    /// Records the store holds (read from it at start): they are skipped.
    pub fn skip_committed(mut self, committed: CommittedRanges) -> Self {
        self.committed = committed;
        self
    }

    /// Plans a journal kept across a restart: their records form exactly those chunks
    /// again.
    pub fn replay(mut self, plans: Vec<Plan>) -> Self {
        self.replans = Some(Replans::new(plans));
        self
    }

    /// Routes one record; see [`Routed`].
    pub fn take(&mut self, rec: WalRecord) -> Routed {
        let Some(current) = self.registry.get(&rec.table) else {
            return Routed::Skipped;
        };
        let routed_here = current
            .routes(&self.configured)
            .is_ok_and(|r| r.contains(&self.kind));
        if !routed_here && !self.every_table {
            return Routed::Skipped;
        }
        if self.committed.contains(&rec.table, rec.seq) {
            return Routed::Skipped;
        }
        let batch = match self.decode(&rec, &current) {
            Ok(b) => b,
            Err(e) => return Routed::Stuck(e),
        };
        let mut ready = Vec::new();
        // A new table version seals the chunk of the older one.
        if self
            .open
            .get(&rec.table)
            .is_some_and(|c| c.table.version != current.version)
        {
            ready.extend(self.open.remove(&rec.table));
        }
        if let Some(replans) = self.replans.as_mut() {
            if let Some(chunk) = replans.take(rec.seq, &current, batch.clone()) {
                return Routed::Taken(vec![chunk]);
            }
            if replans.contains(rec.seq) {
                return Routed::Taken(vec![]);
            }
        }
        let (streams, after_full) = (self.streams, self.filled.remove(&rec.table));
        let chunk = self.open.entry(rec.table.clone()).or_insert_with(|| {
            let mut c = Chunk::new(current.clone());
            if streams {
                c.live = Some(Arc::new(LiveParts::default()));
            }
            c.after_full = after_full;
            c
        });
        chunk.push(rec.seq, batch);
        if chunk.rows >= self.targets.rows || chunk.bytes >= self.targets.bytes {
            ready.extend(self.open.remove(&rec.table));
            self.filled.insert(rec.table);
        }
        Routed::Taken(ready)
    }

    /// The record's rows at the version it was written at, brought to the table's
    /// current schema. A CRC-checked record that does not decode is damage or a bug.
    fn decode(&self, rec: &WalRecord, current: &ResolvedTable) -> Result<RecordBatch, SinkError> {
        let written = self
            .registry
            .get_version(&rec.table, rec.version)
            .ok_or_else(|| SinkError::UnknownVersion {
                table: rec.table.clone(),
                version: rec.version,
            })?;
        let cached = match (&rec.batch, &self.cache) {
            (None, Some(cache)) => cache(&rec.table, rec.seq),
            _ => None,
        };
        let batch = match cached {
            Some(b) => b,
            None => rec.decode(written.arrow_schema.clone())?,
        };
        sluice_sql::query::adapt_batch(&batch, &current.arrow_schema).map_err(|source| {
            SinkError::Adapt {
                table: rec.table.clone(),
                source,
            }
        })
    }

    /// Chunks to seal now: those [`Router::due`] (or, when none is and memory runs short,
    /// the largest), and replayed plans whose records are all read (`read_upto`) but some
    /// of which no longer route here.
    pub fn sealed(&mut self, read_upto: u64) -> Vec<Chunk> {
        let due: Vec<String> = self
            .open
            .iter()
            .filter(|(_, c)| self.due(c))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out: Vec<Chunk> = due.iter().filter_map(|k| self.open.remove(k)).collect();
        if out.is_empty() && self.pressure.as_ref().is_some_and(|pressed| pressed()) {
            let largest = self
                .open
                .iter()
                .max_by_key(|(_, c)| c.bytes)
                .map(|(k, _)| k.clone());
            out.extend(largest.and_then(|k| self.open.remove(&k)));
        }
        if let Some(r) = self.replans.as_mut() {
            out.extend(r.overdue(read_upto));
        }
        out
    }

    /// Whether an open chunk is to be sealed now: it is `linger` old; or it is being
    /// streamed, is part of a burst (it holds a quarter of the row or byte target, or the
    /// table's previous chunk filled up), and no record came for a fifth of `linger`. A
    /// burst that ended is committed without waiting out `linger`, while a trickle still
    /// gathers into inserts of a useful size.
    fn due(&self, c: &Chunk) -> bool {
        let t = &self.targets;
        c.opened.elapsed() >= t.linger
            || (c.live.is_some()
                && (c.after_full || c.rows >= t.rows / 4 || c.bytes >= t.bytes / 4)
                && c.last_push.elapsed() >= t.linger / 5)
    }

    /// Up to `idle` open chunks of a streaming store not yet given to a worker: the
    /// worker's copies, streamed to the store as they fill.
    pub fn live_copies(&mut self, idle: usize) -> Vec<Chunk> {
        let mut out = Vec::new();
        for c in self.open.values_mut() {
            if out.len() >= idle {
                break;
            }
            if c.dispatched {
                continue;
            }
            if let Some(copy) = c.live_copy() {
                c.dispatched = true;
                out.push(copy);
            }
        }
        out
    }
}

/// Plans read back from the journal at start, being formed again record by record.
struct Replans {
    by_seq: HashMap<u64, usize>,
    plans: Vec<(Vec<u64>, Option<Chunk>)>,
}

impl Replans {
    fn new(plans: Vec<Plan>) -> Self {
        let mut by_seq = HashMap::new();
        let mut out = Vec::new();
        for (i, Plan { seqs, .. }) in plans.into_iter().enumerate() {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sluice_core::registry::FileRegistryStore;
    use sluice_test_support::batches::sample;

    /// A registry in `dir` with the seed tables and `t (time timestamp, v int64)`.
    pub(crate) async fn registry(dir: &std::path::Path) -> Arc<Registry> {
        let reg = Registry::open(Box::new(FileRegistryStore::open(dir).unwrap()))
            .await
            .unwrap();
        let schema = flight_schema::TableSchema::from_json(
            br#"{"name": "t", "columns": [{"name": "time", "type": "timestamp"},
                                          {"name": "v", "type": "int64"}]}"#,
            None,
        )
        .unwrap();
        reg.register(schema).await.unwrap();
        Arc::new(reg)
    }

    fn record(reg: &Registry, table: &str, version: u64, seq: u64, rows: usize) -> WalRecord {
        let t = reg.get_version(table, version).expect("registered");
        WalRecord {
            seq,
            table: table.into(),
            version,
            ipc_header: Default::default(),
            ipc_body: Default::default(),
            batch: Some(sample(&t, rows, seq)),
        }
    }

    fn router(reg: &Arc<Registry>, kind: SinkKind, rows: usize, linger: Duration) -> Router {
        Router::new(
            reg.clone(),
            vec![SinkKind::Postgres, SinkKind::Clickhouse, SinkKind::Archive],
            kind,
            false,
            ChunkTargets {
                rows,
                bytes: usize::MAX,
                linger,
            },
        )
    }

    fn taken(r: Routed) -> Vec<Chunk> {
        match r {
            Routed::Taken(c) => c,
            Routed::Skipped => panic!("skipped"),
            Routed::Stuck(e) => panic!("stuck: {e}"),
        }
    }

    #[tokio::test]
    async fn records_gather_into_chunks_sealed_at_the_row_target() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut r = router(&reg, SinkKind::Postgres, 10, Duration::from_secs(3600));
        assert!(taken(r.take(record(&reg, "t", 1, 1, 4))).is_empty());
        assert!(taken(r.take(record(&reg, "t", 1, 2, 4))).is_empty());
        let ready = taken(r.take(record(&reg, "t", 1, 3, 4)));
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].seqs(), vec![1, 2, 3]);
        assert_eq!(ready[0].rows, 12);
        assert_eq!((ready[0].first_seq(), ready[0].last_seq()), (1, 3));
        // Nothing open is due before `linger`.
        assert!(taken(r.take(record(&reg, "t", 1, 4, 1))).is_empty());
        assert!(r.sealed(4).is_empty());
    }

    #[tokio::test]
    async fn a_chunk_that_waited_linger_is_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut r = router(&reg, SinkKind::Postgres, 1000, Duration::ZERO);
        assert!(taken(r.take(record(&reg, "t", 1, 7, 3))).is_empty());
        let sealed = r.sealed(7);
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].seqs(), vec![7]);
        assert!(r.sealed(7).is_empty(), "sealed once");
    }

    #[tokio::test]
    async fn records_of_other_stores_committed_ones_and_unknown_tables_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        // `t` goes to PostgreSQL (and the archive), not ClickHouse.
        let mut ch = router(&reg, SinkKind::Clickhouse, 10, Duration::from_secs(3600));
        assert!(matches!(
            ch.take(record(&reg, "t", 1, 1, 2)),
            Routed::Skipped
        ));
        let mut committed = CommittedRanges::default();
        committed.add("t", 5, 6);
        let mut pg = router(&reg, SinkKind::Postgres, 10, Duration::from_secs(3600))
            .skip_committed(committed.finish());
        assert!(matches!(
            pg.take(record(&reg, "t", 1, 5, 2)),
            Routed::Skipped
        ));
        assert!(matches!(
            pg.take(record(&reg, "t", 1, 6, 2)),
            Routed::Skipped
        ));
        assert!(taken(pg.take(record(&reg, "t", 1, 7, 2))).is_empty());
        let mut gone = record(&reg, "t", 1, 8, 2);
        gone.table = "dropped".into();
        assert!(matches!(pg.take(gone), Routed::Skipped));
    }

    #[tokio::test]
    async fn every_table_and_memory_pressure() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        // The archive sees ClickHouse's table too; under pressure the largest chunk goes.
        let pressed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = pressed.clone();
        let mut r = router(&reg, SinkKind::Archive, 1000, Duration::from_secs(3600))
            .every_table()
            .under_pressure(Box::new(move || {
                p.load(std::sync::atomic::Ordering::Relaxed)
            }));
        let u = flight_schema::TableSchema::from_json(
            br#"{"name": "u", "columns": [{"name": "time", "type": "timestamp"}]}"#,
            None,
        )
        .unwrap();
        reg.register(u).await.unwrap();
        assert!(taken(r.take(record(&reg, "u", 1, 1, 3))).is_empty());
        assert!(taken(r.take(record(&reg, "t", 1, 2, 50))).is_empty());
        assert!(r.sealed(2).is_empty(), "nothing due, no pressure");
        pressed.store(true, std::sync::atomic::Ordering::Relaxed);
        let sealed = r.sealed(2);
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].table.name(), "t", "the largest chunk");
        assert_eq!(r.sealed(2)[0].table.name(), "u");
        // A table routed away from the archive: only an every-table router takes it.
        let pgonly = flight_schema::TableSchema::from_json(
            br#"{"name": "pgonly", "sinks": ["postgres"],
                 "columns": [{"name": "time", "type": "timestamp"}]}"#,
            None,
        )
        .unwrap();
        reg.register(pgonly).await.unwrap();
        let pg_rec = |seq| record(&reg, "pgonly", 1, seq, 2);
        let mut only = router(&reg, SinkKind::Archive, 1000, Duration::from_secs(3600));
        assert!(matches!(only.take(pg_rec(3)), Routed::Skipped));
        assert!(taken(r.take(pg_rec(4))).is_empty());
    }

    #[tokio::test]
    async fn a_record_of_an_unknown_version_is_stuck_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut r = router(&reg, SinkKind::Postgres, 10, Duration::from_secs(3600));
        let mut rec = record(&reg, "t", 1, 3, 2);
        rec.version = 9;
        match r.take(rec) {
            Routed::Stuck(e) => {
                assert!(
                    matches!(e, SinkError::UnknownVersion { version: 9, .. }),
                    "{e:?}"
                );
                assert_eq!(e.to_string(), "version 9 of table 't' is not registered");
            }
            _ => panic!("an undecodable record must stay owed"),
        }
    }

    #[tokio::test]
    async fn a_new_table_version_seals_the_older_chunk_and_adapts_rows() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut r = router(&reg, SinkKind::Postgres, 100, Duration::from_secs(3600));
        assert!(taken(r.take(record(&reg, "t", 1, 1, 2))).is_empty());
        let v2 = flight_schema::TableSchema::from_json(
            br#"{"name": "t", "columns": [{"name": "time", "type": "timestamp"},
                                          {"name": "v", "type": "int64"},
                                          {"name": "w", "type": "string"}]}"#,
            None,
        )
        .unwrap();
        reg.register(v2).await.unwrap();
        // A record written at version 1 after the change is adapted to version 2 (`w`
        // null) and seals the chunk still at version 1.
        let ready = taken(r.take(record(&reg, "t", 1, 2, 2)));
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].table.version, 1);
        assert_eq!(ready[0].seqs(), vec![1]);
        let open = r.sealed(2);
        assert!(open.is_empty());
        let mut r = Router {
            targets: ChunkTargets {
                linger: Duration::ZERO,
                ..r.targets
            },
            ..r
        };
        let last = r.sealed(2);
        assert_eq!(last[0].table.version, 2);
        assert_eq!(last[0].parts[0].batch.num_columns(), 3);
        assert_eq!(last[0].parts[0].batch.column(2).null_count(), 2);
    }

    #[tokio::test]
    async fn a_replayed_plan_forms_the_same_chunk_again() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut r =
            router(&reg, SinkKind::Postgres, 2, Duration::from_secs(3600)).replay(vec![Plan {
                table: "t".into(),
                seqs: vec![10, 12],
            }]);
        // 10 and 12 belong to the plan; 11 fills an ordinary chunk of its own.
        assert!(taken(r.take(record(&reg, "t", 1, 10, 5))).is_empty());
        assert!(taken(r.take(record(&reg, "t", 1, 11, 1))).is_empty());
        let ready = taken(r.take(record(&reg, "t", 1, 12, 5)));
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].seqs(), vec![10, 12], "exactly the planned records");
        assert!(ready[0].replayed, "planned already: not planned again");
        assert_eq!(ready[0].rows, 10, "not cut at the row target");
    }
}
