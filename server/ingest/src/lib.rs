//! # sluice-ingest
//!
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

use arrow::ipc::CompressionType;
use arrow::record_batch::RecordBatch;
use flight_schema::{ResolvedTable, SinkKind};
use tokio::sync::oneshot;

use sluice_core::buffer::{data_size, Buffers, MemoryBudget, MemoryCharge};
use sluice_core::error::{Error, Result};
use sluice_core::metrics::Metrics;
use sluice_core::registry::Registry;
use sluice_wal::{Durable, Subscriber, Wal, WalEntry, WalError};

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

/// How long a write may wait for room in the memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryWait {
    /// Until there is room: the caller's stream stalls (Flight: the client's DoPut waits,
    /// which is the backpressure of a stream).
    Forever,
    /// At most this long; then the write is refused as `ResourceExhausted` (HTTP 429
    /// with `Retry-After`), so that a request/response client sends it again later
    /// instead of holding a request open.
    AtMost(std::time::Duration),
}

/// What the protocol front ends call; they never see stores.
#[async_trait::async_trait]
pub trait Ingest: Send + Sync {
    /// Validates `batch` for `table` and submits it to the WAL. Waits (without reading
    /// more input) while the memory budget is full, as `wait` allows. The returned write
    /// is not yet durable.
    async fn submit(
        &self,
        table: &str,
        batch: RecordBatch,
        raw: Option<RawIpc>,
        protocol: &str,
        wait: MemoryWait,
    ) -> Result<PendingWrite>;

    /// Checks that `table` can be written to at all (registered, routed to a sink).
    async fn check_table(&self, table: &str) -> Result<()>;
}

/// The pipeline every deployment runs: registry, reshape, memory budget, WAL; durable
/// batches go to the recent buffer ([`RecentFeed`]) and on to the sinks from the WAL.
pub struct Pipeline {
    registry: Arc<Registry>,
    memory: Arc<MemoryBudget>,
    wal: Wal,
    /// Compression of WAL records.
    wal_compression: Option<CompressionType>,
    metrics: Arc<Metrics>,
    /// The stores this deployment has (the archive always).
    sinks: Vec<SinkKind>,
    /// Past this much WAL on disk, writes are refused until the sinks catch up.
    wal_disk_budget: Option<u64>,
}

/// The parts a [`Pipeline`] is built from; the knobs have setters with defaults.
pub struct PipelineBuilder {
    registry: Arc<Registry>,
    buffers: Arc<Buffers>,
    memory: Arc<MemoryBudget>,
    wal: Wal,
    metrics: Arc<Metrics>,
    wal_compression: Option<CompressionType>,
    sinks: Vec<SinkKind>,
    wal_disk_budget: Option<u64>,
}

impl PipelineBuilder {
    /// Compression of WAL records (default none).
    pub fn wal_compression(mut self, c: Option<CompressionType>) -> Self {
        self.wal_compression = c;
        self
    }

    /// The stores this deployment writes to (default: the archive alone).
    pub fn sinks(mut self, sinks: Vec<SinkKind>) -> Self {
        self.sinks = sinks;
        self
    }

    /// Refuse writes while the WAL holds more than this many bytes (default: no limit).
    pub fn wal_disk_budget(mut self, bytes: Option<u64>) -> Self {
        self.wal_disk_budget = bytes;
        self
    }

    /// The pipeline, subscribed to the WAL so that durable batches reach the buffer.
    pub fn build(self) -> Pipeline {
        self.wal.subscribe(Arc::new(RecentFeed {
            buffers: self.buffers,
            metrics: self.metrics.clone(),
        }));
        Pipeline {
            registry: self.registry,
            memory: self.memory,
            wal: self.wal,
            wal_compression: self.wal_compression,
            metrics: self.metrics,
            sinks: self.sinks,
            wal_disk_budget: self.wal_disk_budget,
        }
    }
}

/// What the pipeline attaches to a WAL entry ([`WalEntry::ticket`]) and gets back once
/// the entry is durable.
struct Admission {
    protocol: String,
    rows: u64,
    bytes: usize,
    /// Whether reshape copied columns out of the received message (which then stays
    /// charged until the buffer lets the batch go).
    changed: bool,
    charge: MemoryCharge,
}

/// The pipeline's [`Subscriber`]: counts each durable batch as accepted and puts it in
/// the recent buffer, in WAL order, with its memory charge.
struct RecentFeed {
    buffers: Arc<Buffers>,
    metrics: Arc<Metrics>,
}

impl Subscriber for RecentFeed {
    fn durable(&self, record: &mut Durable) {
        let Some(admission) = record
            .ticket
            .take()
            .and_then(|t| t.downcast::<Admission>().ok())
        else {
            return;
        };
        let Admission {
            protocol,
            rows,
            bytes,
            changed,
            mut charge,
        } = *admission;
        let labels = [&*record.table, protocol.as_str()];
        self.metrics
            .ingest_rows
            .with_label_values(&labels)
            .inc_by(rows);
        self.metrics
            .ingest_bytes
            .with_label_values(&labels)
            .inc_by(bytes as u64);
        if !changed {
            charge.release(bytes);
        }
        if let Some(batch) = record.batch.take() {
            self.buffers
                .push(&record.table, record.seq, batch, bytes as u64, Some(charge));
        }
    }
}

impl Pipeline {
    /// A pipeline over these parts; see [`PipelineBuilder`] for the rest.
    pub fn builder(
        registry: Arc<Registry>,
        buffers: Arc<Buffers>,
        memory: Arc<MemoryBudget>,
        wal: Wal,
        metrics: Arc<Metrics>,
    ) -> PipelineBuilder {
        PipelineBuilder {
            registry,
            buffers,
            memory,
            wal,
            metrics,
            wal_compression: None,
            sinks: vec![SinkKind::Archive],
            wal_disk_budget: None,
        }
    }

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
        let routes = t
            .routes(&self.sinks)
            .map_err(|e| Error::FailedPrecondition(e.to_string()))?;
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
        wait: MemoryWait,
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
        let charge = self.memory.charge(2 * bytes);
        let charge = match wait {
            MemoryWait::Forever => charge.await,
            MemoryWait::AtMost(limit) => match tokio::time::timeout(limit, charge).await {
                Ok(charge) => charge,
                Err(_) => {
                    self.refuse(table, &reshaped, "memory_full");
                    return Err(Error::ResourceExhausted(format!(
                            "table '{table}': the memory budget (memory.budget) stayed full for {limit:?}: the sinks are behind; send again later"
                        )));
                }
            },
        };
        let charge = charge.ok_or_else(|| {
            Error::ResourceExhausted(format!(
                "table '{table}': a batch of {bytes} bytes does not fit the memory budget twice"
            ))
        })?;
        let (ipc_header, ipc_body) = match raw {
            Some(raw) if identical && self.wal_compression.is_none() => (raw.header, raw.body),
            _ => {
                let (h, b) = sluice_wal::encode_ipc(&reshaped, self.wal_compression)
                    .map_err(Error::internal)?;
                (h.into(), b.into())
            }
        };
        let rows = reshaped.num_rows() as u64;
        let (tx, rx) = oneshot::channel();
        let entry = WalEntry {
            table: Arc::from(table),
            version: resolved.version,
            ipc_header,
            ipc_body,
            batch: Some(reshaped),
            ticket: Some(Box::new(Admission {
                protocol: protocol.to_string(),
                rows,
                bytes,
                changed,
                charge,
            })),
            reply: tx,
        };
        self.wal.append(entry)?;
        Ok(PendingWrite { rows, rx })
    }
}
