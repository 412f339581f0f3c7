//! The ingest pipeline: what every protocol front end hands batches to.
//!
//! # What flows through it
//! A front end calls [`Ingest::submit`] with a table name and an Arrow batch. The
//! pipeline looks the table up in the registry, reshapes the batch to the registered
//! schema (`sluice_sql::reshape`; a refused batch stores nothing), charges its memory to
//! the budget (waiting while the budget is full: this is the backpressure), encodes it
//! as Arrow IPC and appends it to the WAL. The returned [`PendingWrite`] resolves with
//! the WAL sequence number once the batch is durable; by then it is also in the recent
//! buffer and queryable. Sinks (the Parquet archive now; PostgreSQL and ClickHouse later)
//! take it from there and report what they have made durable, which lets the WAL
//! release segments.

use std::sync::Arc;

use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
use arrow::ipc::CompressionType;
use arrow::record_batch::RecordBatch;
use flight_schema::{ResolvedTable, SinkKind};
use tokio::sync::oneshot;

use crate::buffer::{data_size, Buffers, MemoryBudget};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::wal::{Wal, WalEntry, WalError};

/// zstd level of compressed WAL records.
pub const WAL_ZSTD_LEVEL: i32 = 1;

/// A write that has been accepted and is on its way to the WAL.
pub struct PendingWrite {
    pub rows: u64,
    rx: oneshot::Receiver<std::result::Result<u64, WalError>>,
}

impl PendingWrite {
    /// Waits until the batch is durable; returns its WAL sequence number.
    pub async fn durable(self) -> Result<u64> {
        match self.rx.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::Unavailable(
                "the WAL stopped before the batch was durable".into(),
            )),
        }
    }
}

/// The Arrow IPC message a batch was decoded from, when the front end has it (Flight
/// DoPut). A batch the registered schema takes as it is goes to the WAL as these bytes,
/// without being encoded again.
pub struct RawIpc {
    pub header: bytes::Bytes,
    pub body: bytes::Bytes,
}

/// What the protocol front ends call; they never see stores.
#[async_trait::async_trait]
pub trait Ingest: Send + Sync {
    /// Validates `batch` for `table` and submits it to the WAL. Waits (without reading
    /// more input) while the memory budget is full. The returned write is not yet durable.
    async fn submit(
        &self,
        table: &str,
        batch: RecordBatch,
        raw: Option<RawIpc>,
        protocol: &str,
    ) -> Result<PendingWrite>;

    /// Checks that `table` can be written to at all (registered, routed to a sink).
    async fn check_table(&self, table: &str) -> Result<()>;
}

/// The pipeline of the embedded default: WAL, recent buffer, Parquet archive.
pub struct Pipeline {
    pub registry: Arc<Registry>,
    pub buffers: Arc<Buffers>,
    pub memory: Arc<MemoryBudget>,
    pub wal: Wal,
    /// Compression of WAL records.
    pub wal_compression: Option<CompressionType>,
    pub metrics: Arc<Metrics>,
    /// The stores this deployment has (the archive always).
    pub sinks: Vec<SinkKind>,
    /// Past this much WAL on disk, writes are refused until the sinks catch up.
    pub wal_disk_budget: Option<u64>,
}

impl Pipeline {
    /// [`Pipeline::table`], after re-reading the registry store once if the table is not
    /// known here (another process sharing the store may have registered it).
    async fn lookup(&self, table: &str) -> Result<Arc<ResolvedTable>> {
        if self.registry.get(table).is_none() {
            if let Err(e) = self.registry.reload_table(table).await {
                tracing::warn!(%table, error = %e, "cannot re-read the registry store");
            }
        }
        self.table(table)
    }

    fn wal_full_message(&self, used: u64, limit: u64) -> String {
        let last = self.wal.last_seq();
        let behind: Vec<String> = self
            .wal
            .sink_positions()
            .into_iter()
            .filter(|(_, p)| *p < last)
            .map(|(s, p)| format!("{s} has everything up to record {p} of {last}"))
            .collect();
        format!(
            "the WAL holds {used} bytes, over its disk budget of {limit} (wal.disk_budget): a sink is behind ({}); writes resume as it catches up",
            behind.join("; ")
        )
    }

    /// Looks a table up and checks it can be routed somewhere.
    pub fn table(&self, table: &str) -> Result<Arc<ResolvedTable>> {
        let t = self.registry.get(table).ok_or_else(|| {
            Error::NotFound(format!(
                "table '{table}' is not registered (register it with the register_table action or POST /schema/register)"
            ))
        })?;
        let routes = t.routes(&self.sinks).map_err(Error::FailedPrecondition)?;
        if routes.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "table '{table}' routes to no store (its sinks list is empty)"
            )));
        }
        if let Some(limit) = self.wal_disk_budget {
            let (_, used) = self.wal.disk_usage();
            if used > limit {
                return Err(Error::ResourceExhausted(self.wal_full_message(used, limit)));
            }
        }
        Ok(t)
    }

    fn refuse(&self, table: &str, batch: &RecordBatch, reason: &str) {
        self.metrics
            .refused_rows
            .with_label_values(&[table, reason])
            .inc_by(batch.num_rows() as u64);
        self.metrics
            .refused_bytes
            .with_label_values(&[table, reason])
            .inc_by(data_size(batch) as u64);
        self.metrics
            .refused_batches
            .with_label_values(&[table, reason])
            .inc();
    }
}

/// Encodes a batch (of a registered schema: no dictionaries) as one Arrow IPC message,
/// its buffers compressed with `compression`.
pub fn encode_ipc(
    batch: &RecordBatch,
    compression: Option<CompressionType>,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut tracker = DictionaryTracker::new(false);
    let mut options = IpcWriteOptions::default()
        .try_with_compression(compression)
        .map_err(Error::internal)?;
    if compression == Some(CompressionType::ZSTD) {
        // The WAL wants speed: zstd's fastest regular level still shrinks log-like
        // batches about 4x.
        options = options
            .try_with_compression_level(Some(WAL_ZSTD_LEVEL))
            .map_err(Error::internal)?;
    }
    let (dicts, data) = IpcDataGenerator::default()
        .encode(batch, &mut tracker, &options, &mut Default::default())
        .map_err(Error::internal)?;
    if !dicts.is_empty() {
        return Err(Error::Internal(
            "registered schemas have no dictionary columns".into(),
        ));
    }
    Ok((data.ipc_message, data.arrow_data))
}

#[async_trait::async_trait]
impl Ingest for Pipeline {
    async fn check_table(&self, table: &str) -> Result<()> {
        self.lookup(table).await.map(|_| ())
    }

    async fn submit(
        &self,
        table: &str,
        batch: RecordBatch,
        raw: Option<RawIpc>,
        protocol: &str,
    ) -> Result<PendingWrite> {
        let resolved = match self.lookup(table).await {
            Ok(t) => t,
            Err(e) => {
                self.refuse(table, &batch, "unknown_table");
                return Err(e);
            }
        };
        let reshaped = match sluice_sql::reshape::reshape(&resolved, &batch) {
            Ok(b) => b,
            Err(e) => {
                self.refuse(table, &batch, "invalid");
                return Err(e.into());
            }
        };
        // Columns the reshape kept are slices of the received message; new ones are copies.
        let changed = batch.num_columns() != reshaped.num_columns()
            || reshaped
                .columns()
                .iter()
                .any(|c| !batch.columns().iter().any(|o| Arc::ptr_eq(o, c)));
        // Taken as it came, column for column: the received message is the WAL record.
        let identical = batch.num_columns() == reshaped.num_columns()
            && batch
                .columns()
                .iter()
                .zip(reshaped.columns())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        drop(batch);
        let bytes = data_size(&reshaped);
        // In flight: the batch and its IPC encoding. Buffered: the batch, and the received
        // message too when reshape copied columns out of it.
        let mut charge = self.memory.charge(2 * bytes).await.ok_or_else(|| {
            Error::ResourceExhausted(format!(
                "table '{table}': a batch of {bytes} bytes does not fit the memory budget twice"
            ))
        })?;
        let (ipc_header, ipc_body) = match raw {
            Some(raw) if identical && self.wal_compression.is_none() => (raw.header, raw.body),
            _ => {
                let (h, b) = encode_ipc(&reshaped, self.wal_compression)?;
                (h.into(), b.into())
            }
        };
        let rows = reshaped.num_rows() as u64;
        let (tx, rx) = oneshot::channel();
        let buffers = self.buffers.clone();
        let metrics = self.metrics.clone();
        let name: Arc<str> = Arc::from(table);
        let proto = protocol.to_string();
        let entry = WalEntry {
            table: name.clone(),
            version: resolved.version,
            ipc_header,
            ipc_body,
            batch: Some(reshaped.clone()),
            on_durable: Box::new(move |seq| {
                metrics
                    .ingest_rows
                    .with_label_values(&[&*name, proto.as_str()])
                    .inc_by(rows);
                metrics
                    .ingest_bytes
                    .with_label_values(&[&*name, proto.as_str()])
                    .inc_by(bytes as u64);
                if !changed {
                    charge.release(bytes);
                }
                buffers.push(&name, seq, reshaped, bytes as u64, Some(charge));
            }),
            reply: tx,
        };
        self.wal.append(entry)?;
        Ok(PendingWrite { rows, rx })
    }
}
