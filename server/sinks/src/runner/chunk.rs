//! The unit a sink writes: a [`Chunk`] of consecutive WAL records of one table, brought
//! to one table version, and the [`Slice`]s a store narrows a refused write down to.
//!
//! A chunk fills in the route stage (`route.rs`) and is read by a worker (`send.rs`).
//! A store that streams gets it while it still fills: its parts then live in a shared
//! [`LiveParts`] the router appends to and seals.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::array::RecordBatch;
use flight_schema::ResolvedTable;

use sluice_core::buffer::data_size;

/// Rows of one WAL record, adapted to the chunk's table version.
pub struct Part {
    pub seq: u64,
    pub batch: RecordBatch,
}

/// The parts of a chunk that is still filling, shared by the runner (which appends to it
/// and seals it) and the worker already streaming it to the store (see
/// [`super::StoreWriter::streams`]).
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
    pub(super) fn push(&self, seq: u64, batch: RecordBatch) {
        self.inner
            .lock()
            .expect("live parts")
            .parts
            .push((seq, batch));
        self.changed.notify_waiters();
    }

    pub(super) fn seal(&self) {
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

    pub(super) fn seqs(&self) -> Vec<u64> {
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
    pub(super) opened: Instant,
    /// When the last record was added.
    pub(super) last_push: Instant,
    /// Opened right after the table's previous chunk filled up: the rest of a burst.
    pub(super) after_full: bool,
    /// Re-formed after a restart from a plan in the [`super::PlanJournal`]: already
    /// planned.
    pub(super) replayed: bool,
    /// Set when a worker streams the chunk while it fills: the parts as they come.
    pub live: Option<Arc<LiveParts>>,
    /// The router's copy of a live chunk has gone to a worker already.
    pub(super) dispatched: bool,
}

impl Chunk {
    pub(super) fn new(table: Arc<ResolvedTable>) -> Self {
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

    pub(super) fn push(&mut self, seq: u64, batch: RecordBatch) {
        self.rows += batch.num_rows();
        self.bytes += data_size(&batch);
        self.last_push = Instant::now();
        if let Some(live) = &self.live {
            live.push(seq, batch.clone());
        }
        self.parts.push(Part { seq, batch });
    }

    /// What a worker gets of a live chunk: the table and the shared parts.
    pub(super) fn live_copy(&self) -> Option<Chunk> {
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

/// Rows of one WAL record on their way into a store, as the store gets them and as they
/// were received (the two differ where a sink reshapes them, e.g. the metrics split into
/// `metrics_points`); a refused write is narrowed down by halving a list of these.
#[derive(Debug, Clone)]
pub struct Slice {
    pub seq: u64,
    /// The rows as the store gets them.
    pub rows: RecordBatch,
    /// The same rows as they were received (what a dead-letter file keeps).
    pub original: RecordBatch,
}

impl Slice {
    /// A slice whose rows go to the store as they were received.
    pub fn as_received(seq: u64, batch: RecordBatch) -> Self {
        Slice {
            seq,
            rows: batch.clone(),
            original: batch,
        }
    }

    fn split_at(self, n: usize) -> (Slice, Slice) {
        let len = self.rows.num_rows();
        (
            Slice {
                seq: self.seq,
                rows: self.rows.slice(0, n),
                original: self.original.slice(0, n),
            },
            Slice {
                seq: self.seq,
                rows: self.rows.slice(n, len - n),
                original: self.original.slice(n, len - n),
            },
        )
    }
}

/// Splits slices in two halves by row count (slicing a batch that straddles the middle),
/// for narrowing a refused write down to the refused rows.
pub fn halves(slices: Vec<Slice>) -> (Vec<Slice>, Vec<Slice>) {
    let total: usize = slices.iter().map(|s| s.rows.num_rows()).sum();
    let mut left_n = total / 2;
    let (mut left, mut right) = (Vec::new(), Vec::new());
    for s in slices {
        let n = s.rows.num_rows();
        if left_n == 0 {
            right.push(s);
        } else if n <= left_n {
            left_n -= n;
            left.push(s);
        } else {
            let (l, r) = s.split_at(left_n);
            left.push(l);
            right.push(r);
            left_n = 0;
        }
    }
    (left, right)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array};
    use std::time::Duration;

    fn batch(v: Vec<i64>) -> RecordBatch {
        RecordBatch::try_from_iter(vec![("v", Arc::new(Int64Array::from(v)) as ArrayRef)]).unwrap()
    }

    #[test]
    fn halves_split_by_rows_across_batches() {
        let rows = vec![
            Slice::as_received(1, batch(vec![1, 2, 3])),
            Slice::as_received(2, batch(vec![4, 5])),
        ];
        let (l, r) = halves(rows);
        let n = |x: &[Slice]| {
            x.iter()
                .map(|s| (s.seq, s.rows.num_rows(), s.original.num_rows()))
                .collect::<Vec<_>>()
        };
        assert_eq!(n(&l), vec![(1, 2, 2)]);
        assert_eq!(n(&r), vec![(1, 1, 1), (2, 2, 2)]);
    }

    #[tokio::test]
    async fn live_parts_reach_the_reader_as_they_come_and_end_at_the_seal() {
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
        live.push(7, batch(vec![1]));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The reader has the first part and waits for more.
        assert!(!reader.is_finished());
        live.push(9, batch(vec![2]));
        live.seal();
        assert_eq!(reader.await.unwrap(), vec![7, 9]);
        assert_eq!(live.sealed().await.len(), 2);
        assert_eq!(live.seqs(), vec![7, 9]);
    }
}
