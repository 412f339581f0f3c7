//! The interface a store implements to be a sink, and what it reports back: the encode
//! and send stage of the runner lives behind [`StoreWriter::write`] (binary COPY for
//! PostgreSQL, Native blocks for ClickHouse), committed together with the chunk's WAL
//! range so that a retried or replayed chunk is stored once.

use std::collections::HashMap;

use flight_schema::SinkKind;

use super::Chunk;
use crate::error::SinkError;

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
    /// Whether the sink takes the records of every table, not only of those routed to
    /// it: the archive does, so that the recent buffer also lets go of tables routed
    /// away from it.
    fn every_table(&self) -> bool {
        false
    }
    /// Whether memory runs short: the largest open chunk is then sealed at once, whatever
    /// its size and age (the archive, whose commits free the recent buffer).
    fn memory_pressed(&self) -> bool {
        false
    }
    /// The decoded rows of a record the sink holds already (the archive: the recent
    /// buffer), so that a record read back from disk need not be decoded again.
    fn cached(&self, _table: &str, _seq: u64) -> Option<arrow::array::RecordBatch> {
        None
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
}
