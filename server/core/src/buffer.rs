//! The recent buffer and the memory budget.
//!
//! # What flows through it
//! Batches that are durable in the WAL are pushed into their table's [`TableState`] by the
//! WAL writer thread, in WAL order, each holding the memory permits it was charged when
//! it arrived. They stay queryable there until the archive sink has written them to
//! Parquet and committed the files; then, in one step under the table's lock, the files are added
//! to the table's archived-file list and the batches leave the buffer, releasing their
//! memory. A query snapshot therefore sees every row exactly once: either in the buffer
//! or in a committed file.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use sluice_sql::query::{ArchivedFile, SnapshotSource, TableSnapshot};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;
use crate::registry::Registry;

/// Memory is charged in units of this many bytes.
const UNIT: u64 = 1024;

/// The global memory budget for in-flight and buffered batches.
///
/// Acquiring waits while the budget is full; a DoPut that waits stops reading from its
/// client, so HTTP/2 flow control pushes back instead of memory growing.
pub struct MemoryBudget {
    sem: Arc<Semaphore>,
    total_units: u64,
    metrics: Arc<Metrics>,
}

/// Memory charged to the budget; released when dropped.
pub struct MemoryCharge {
    permit: OwnedSemaphorePermit,
    units: u32,
    metrics: Arc<Metrics>,
}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        self.metrics
            .memory_used_bytes
            .sub(self.units as i64 * UNIT as i64);
    }
}

impl MemoryCharge {
    /// Gives back about `bytes` of this charge now, keeping the rest.
    pub fn release(&mut self, bytes: usize) {
        let units = ((bytes as u64 / UNIT) as u32).min(self.units.saturating_sub(1));
        if units > 0 {
            if let Some(part) = self.permit.split(units as usize) {
                drop(part);
                self.units -= units;
                self.metrics
                    .memory_used_bytes
                    .sub(units as i64 * UNIT as i64);
            }
        }
    }
}

pub use flight_schema::data_size;

impl MemoryBudget {
    pub fn new(bytes: u64, metrics: Arc<Metrics>) -> Self {
        let total_units = (bytes / UNIT).max(1);
        metrics.memory_budget_bytes.set(bytes as i64);
        Self {
            sem: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
            metrics,
        }
    }

    /// Charges `bytes`, waiting while the budget is full. `None` if it can never fit.
    pub async fn charge(&self, bytes: usize) -> Option<MemoryCharge> {
        let units = (bytes as u64).div_ceil(UNIT).max(1);
        if units > self.total_units {
            return None;
        }
        let permit = self
            .sem
            .clone()
            .acquire_many_owned(units as u32)
            .await
            .ok()?;
        self.metrics
            .memory_used_bytes
            .add(units as i64 * UNIT as i64);
        Some(MemoryCharge {
            permit,
            units: units as u32,
            metrics: self.metrics.clone(),
        })
    }

    /// Fraction of the budget in use, 0.0 to 1.0.
    pub fn used_fraction(&self) -> f64 {
        1.0 - self.sem.available_permits() as f64 / self.total_units as f64
    }
}

/// One buffered batch.
pub struct BufferedBatch {
    pub seq: u64,
    pub batch: RecordBatch,
    pub bytes: u64,
    pub _charge: Option<MemoryCharge>,
}

/// A Parquet file committed to the archive.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub rows: u64,
    pub min_seq: u64,
    pub max_seq: u64,
}

/// Per-table state: the recent buffer and the committed archive files.
#[derive(Default)]
pub struct TableState {
    pub batches: VecDeque<BufferedBatch>,
    pub rows: u64,
    pub bytes: u64,
    /// When the oldest buffered batch arrived.
    pub oldest: Option<Instant>,
    pub files: Vec<FileEntry>,
    /// Every WAL record of this table with `seq <= archived_seq` is in `files`.
    pub archived_seq: u64,
}

/// All tables' states.
pub struct Buffers {
    tables: RwLock<BTreeMap<String, Arc<Mutex<TableState>>>>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl Buffers {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        Self {
            tables: RwLock::new(BTreeMap::new()),
            registry,
            metrics,
        }
    }

    /// The state of `table`, created empty on first use.
    pub fn table(&self, table: &str) -> Arc<Mutex<TableState>> {
        if let Some(t) = self.tables.read().expect("buffers lock").get(table) {
            return t.clone();
        }
        self.tables
            .write()
            .expect("buffers lock")
            .entry(table.to_string())
            .or_default()
            .clone()
    }

    /// Names of tables that have state.
    pub fn table_names(&self) -> Vec<String> {
        self.tables
            .read()
            .expect("buffers lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Adds a durable batch (called in WAL order); false, and nothing is added, when the
    /// archive has committed the record already (the archive reads the WAL on its own and
    /// may get there first: checked under the same lock its commit takes).
    pub fn push(
        &self,
        table: &str,
        seq: u64,
        batch: RecordBatch,
        bytes: u64,
        charge: Option<MemoryCharge>,
    ) -> bool {
        let state = self.table(table);
        let mut s = state.lock().expect("table lock");
        if seq <= s.archived_seq {
            return false;
        }
        s.rows += batch.num_rows() as u64;
        s.bytes += bytes;
        s.oldest.get_or_insert_with(Instant::now);
        s.batches.push_back(BufferedBatch {
            seq,
            batch,
            bytes,
            _charge: charge,
        });
        self.publish(table, &s);
        true
    }

    /// Publishes the table's buffer gauges.
    pub fn publish(&self, table: &str, s: &TableState) {
        self.metrics
            .buffer_rows
            .with_label_values(&[table])
            .set(s.rows as i64);
        self.metrics
            .buffer_bytes
            .with_label_values(&[table])
            .set(s.bytes as i64);
        self.metrics
            .archive_lag_seconds
            .with_label_values(&[table])
            .set(s.oldest.map_or(0, |o| o.elapsed().as_secs() as i64));
    }

    /// The highest sequence number such that every WAL record up to it is durable in the
    /// archive, given `wal_last_seq` read *before* calling.
    pub fn durable_seq(&self, wal_last_seq: u64) -> u64 {
        let tables = self.tables.read().expect("buffers lock");
        tables
            .values()
            .filter_map(|t| {
                t.lock()
                    .expect("table lock")
                    .batches
                    .front()
                    .map(|b| b.seq - 1)
            })
            .fold(wal_last_seq, u64::min)
    }
}

impl SnapshotSource for Buffers {
    fn table_names(&self) -> Vec<String> {
        self.registry
            .list()
            .iter()
            .map(|t| t.name().to_string())
            .collect()
    }

    fn snapshot(&self, table: &str) -> Option<TableSnapshot> {
        let schema = self.registry.get(table)?.arrow_schema.clone();
        let state = self.table(table);
        let s = state.lock().expect("table lock");
        Some(TableSnapshot {
            schema,
            batches: s.batches.iter().map(|b| b.batch.clone()).collect(),
            files: s
                .files
                .iter()
                .map(|f| ArchivedFile {
                    path: f.path.as_str().into(),
                    size: f.size,
                })
                .collect(),
        })
    }
}
