//! The Parquet archive sink.
//!
//! # What flows through it
//! The archiver task watches every table's recent buffer ([`sluice_core::buffer`]). When a
//! buffer passes a bound (rows, bytes, age) or the memory budget runs over half full, it
//! takes the buffered batches, splits them by the hour of their time column, writes one
//! zstd Parquet file per hour to `<table>/date=YYYY-MM-DD/hour=HH/` in the object store,
//! and then commits: the table's manifest (`_sluice/manifests/<table>.json`, the list of
//! files and the last WAL sequence number they hold) is replaced, and in one step the
//! files become queryable and the batches leave the buffer. Files that no manifest names
//! (a flush cut off by a crash) are deleted at start and rewritten from the WAL, so every
//! acknowledged row lands exactly once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::config::{ArchiveConfig, BufferConfig};
use flight_schema::SinkKind;
use sluice_core::buffer::{Buffers, FileEntry};
use sluice_core::error::{Error, Result};
use sluice_core::metrics::Metrics;
use sluice_core::registry::Registry;
use sluice_wal::Wal;

const MANIFEST_DIR: &str = "_sluice/manifests";

/// The archive's name among the WAL's sinks.
pub const ARCHIVE_SINK: &str = "archive";

/// A table's committed archive state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub table: String,
    pub archived_seq: u64,
    pub files: Vec<FileEntry>,
}

/// Opens the archive's object store: the configured URL, or `<data_dir>/archive`.
/// Returns the store (rooted at the archive) and a URL naming it.
pub fn open_store(
    cfg: &ArchiveConfig,
    data_dir: &std::path::Path,
) -> Result<(Arc<dyn ObjectStore>, url::Url)> {
    match &cfg.url {
        None => {
            let dir = data_dir.join("archive");
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
            let dir = dir
                .canonicalize()
                .map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(Error::internal)?;
            let url = url::Url::from_directory_path(&dir)
                .map_err(|_| Error::Internal(format!("bad archive path {}", dir.display())))?;
            Ok((Arc::new(store), url))
        }
        Some(raw) => {
            let url = url::Url::parse(raw)
                .map_err(|e| Error::InvalidArgument(format!("archive.url '{raw}': {e}")))?;
            if url.scheme() == "file" {
                if let Ok(p) = url.to_file_path() {
                    std::fs::create_dir_all(&p).map_err(|e| {
                        Error::Internal(format!("cannot create {}: {e}", p.display()))
                    })?;
                }
            }
            let opts: Vec<(String, String)> = std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            let (store, prefix) = object_store::parse_url_opts(&url, opts)
                .map_err(|e| Error::InvalidArgument(format!("archive.url '{raw}': {e}")))?;
            let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
                Arc::from(store)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
            };
            Ok((store, url))
        }
    }
}

/// Whether `path` has the shape of a file a flush of `table` writes
/// (`<table>/date=…/hour=…/part-….parquet`): only those may be deleted as left over by
/// an interrupted flush, nothing else a folder of that name may hold.
fn is_flush_file(table: &str, path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts.as_slice(), [t, date, hour, file]
        if *t == table
            && date.starts_with("date=")
            && hour.starts_with("hour=")
            && file.starts_with("part-")
            && file.ends_with(".parquet"))
}

/// Every table's committed manifest, by table name.
pub async fn read_manifests(store: &dyn ObjectStore) -> Result<BTreeMap<String, Manifest>> {
    let mut manifests = BTreeMap::new();
    let listed: Vec<_> = store
        .list(Some(&ObjPath::from(MANIFEST_DIR)))
        .try_collect()
        .await
        .map_err(|e| Error::Internal(format!("cannot list archive manifests: {e}")))?;
    for meta in listed {
        if !meta.location.as_ref().ends_with(".json") {
            continue;
        }
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(Error::internal)?
            .bytes()
            .await
            .map_err(Error::internal)?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Internal(format!(
                "archive manifest {} is unreadable: {e}",
                meta.location
            ))
        })?;
        manifests.insert(m.table.clone(), m);
    }
    Ok(manifests)
}

/// The highest WAL sequence number any table's manifest records: a WAL must never
/// number new records at or below it (the archive would take them for records it has).
pub async fn archived_floor(store: &dyn ObjectStore) -> Result<u64> {
    Ok(read_manifests(store)
        .await?
        .values()
        .map(|m| m.archived_seq)
        .max()
        .unwrap_or(0))
}

fn manifest_path(table: &str) -> ObjPath {
    ObjPath::from(format!("{MANIFEST_DIR}/{table}.json"))
}

/// The archive sink: manifests, flushes and the background task.
pub struct Archiver {
    store: Arc<dyn ObjectStore>,
    buffers: Arc<Buffers>,
    registry: Arc<Registry>,
    wal: Wal,
    metrics: Arc<Metrics>,
    cfg: ArchiveConfig,
    /// When a table's buffer is due for a flush.
    limits: BufferConfig,
    memory: Arc<sluice_core::buffer::MemoryBudget>,
    /// While the WAL is being replayed, segments must not be released
    /// ([`Archiver::replay_done`]).
    replaying: AtomicBool,
    /// Set while a flush keeps failing; shown in /readyz.
    last_error: std::sync::Mutex<Option<String>>,
    /// The stores this deployment has (tables not routed to the archive are dropped
    /// from the buffer when due instead of written).
    sinks: Vec<SinkKind>,
}

/// What an [`Archiver`] reads from and writes to.
pub struct ArchiveParts {
    pub store: Arc<dyn ObjectStore>,
    pub buffers: Arc<Buffers>,
    pub registry: Arc<Registry>,
    pub wal: Wal,
    pub metrics: Arc<Metrics>,
    pub memory: Arc<sluice_core::buffer::MemoryBudget>,
}

impl Archiver {
    /// An archiver over `parts`, configured by `[archive]` and `[buffer]`, for a
    /// deployment with these `sinks`. It holds back WAL releases until
    /// [`Archiver::replay_done`].
    pub fn new(
        parts: ArchiveParts,
        cfg: ArchiveConfig,
        limits: BufferConfig,
        sinks: Vec<SinkKind>,
    ) -> Self {
        let ArchiveParts {
            store,
            buffers,
            registry,
            wal,
            metrics,
            memory,
        } = parts;
        Self {
            store,
            buffers,
            registry,
            wal,
            metrics,
            cfg,
            limits,
            memory,
            replaying: AtomicBool::new(true),
            last_error: Default::default(),
            sinks,
        }
    }

    /// The WAL replay is over: archived records may release WAL segments from now on.
    pub fn replay_done(&self) {
        self.replaying
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// The last flush failure, while flushes keep failing (for `/readyz`).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("error lock").clone()
    }

    /// Loads every table's manifest into the buffers' state and deletes Parquet files
    /// that no manifest names (left by a flush a crash cut off).
    pub async fn recover(&self) -> Result<()> {
        let mut manifests = read_manifests(self.store.as_ref()).await?;
        for table in self.registry.list() {
            let name = table.name().to_string();
            let m = manifests.remove(&name).unwrap_or_default();
            let known: std::collections::HashSet<&str> =
                m.files.iter().map(|f| f.path.as_str()).collect();
            let files: Vec<_> = self
                .store
                .list(Some(&ObjPath::from(name.as_str())))
                .try_collect()
                .await
                .map_err(Error::internal)?;
            for f in files {
                if is_flush_file(&name, f.location.as_ref()) && !known.contains(f.location.as_ref())
                {
                    tracing::warn!(file = %f.location, "deleting an archive file no manifest names (an interrupted flush; its rows are replayed from the WAL)");
                    self.store
                        .delete(&f.location)
                        .await
                        .map_err(Error::internal)?;
                }
            }
            let state = self.buffers.table(&name);
            let mut s = state.lock().expect("table lock");
            s.archived_seq = m.archived_seq;
            s.files = m.files;
        }
        Ok(())
    }

    /// Runs until `shutdown` fires: checks buffers every 100 ms and flushes those due.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            for table in self.due_tables() {
                if let Err(e) = self.flush(&table).await {
                    self.metrics.archive_errors.inc();
                    tracing::error!(%table, error = %e, "archive flush failed; will retry");
                    *self.last_error.lock().expect("error lock") = Some(format!("{table}: {e}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } else {
                    *self.last_error.lock().expect("error lock") = None;
                }
            }
        }
    }

    /// Tables whose buffer passed a bound, plus the largest buffer when memory is tight.
    fn due_tables(&self) -> Vec<String> {
        let mut due = Vec::new();
        let mut largest: Option<(u64, String)> = None;
        for name in self.buffers.table_names() {
            let state = self.buffers.table(&name);
            let s = state.lock().expect("table lock");
            self.buffers.publish(&name, &s);
            if s.batches.is_empty() {
                continue;
            }
            if s.rows >= self.limits.max_rows
                || s.bytes >= self.limits.max_bytes.as_u64()
                || s.oldest.is_some_and(|o| o.elapsed() >= self.limits.max_age)
            {
                due.push(name.clone());
            } else if largest.as_ref().is_none_or(|(b, _)| s.bytes > *b) {
                largest = Some((s.bytes, name.clone()));
            }
        }
        if due.is_empty() && self.memory.used_fraction() > 0.5 {
            due.extend(largest.map(|(_, n)| n));
        }
        due
    }

    /// Writes everything buffered for `table` to Parquet and commits it.
    pub async fn flush(&self, table: &str) -> Result<()> {
        let Some(current) = self.registry.get(table) else {
            return Ok(());
        };
        let schema = current.arrow_schema.clone();
        let state = self.buffers.table(table);
        let (batches, min_seq, max_seq, bytes) = {
            let s = state.lock().expect("table lock");
            if s.batches.is_empty() {
                return Ok(());
            }
            let batches: Vec<RecordBatch> = s.batches.iter().map(|b| b.batch.clone()).collect();
            (
                batches,
                s.batches.front().unwrap().seq,
                s.batches.back().unwrap().seq,
                s.bytes,
            )
        };
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        tracing::debug!(%table, rows, min_seq, max_seq, "archive flush");
        let time_col = current.time_column.clone();
        let level = self.cfg.zstd_level;
        let rg = self.cfg.row_group_rows;
        // A table routed away from the archive only passes through the recent buffer.
        let archived = current
            .routes(&self.sinks)
            .map_or(true, |r| r.contains(&SinkKind::Archive));
        let files = if archived {
            tokio::task::spawn_blocking(move || {
                encode_partitions(&batches, &schema, &time_col, level, rg)
            })
            .await
            .map_err(Error::internal)??
        } else {
            Vec::new()
        };

        let mut new_entries = Vec::new();
        for (i, (partition, rows, data)) in files.into_iter().enumerate() {
            let path = format!("{table}/{partition}/part-{min_seq:020}-{max_seq:020}-{i}.parquet");
            let size = data.len() as u64;
            self.store
                .put(&ObjPath::from(path.as_str()), PutPayload::from(data))
                .await
                .map_err(|e| Error::Unavailable(format!("archive write {path}: {e}")))?;
            self.metrics.archive_files.with_label_values(&[table]).inc();
            self.metrics
                .archive_bytes
                .with_label_values(&[table])
                .inc_by(size);
            self.metrics
                .archive_rows
                .with_label_values(&[table])
                .inc_by(rows);
            new_entries.push(FileEntry {
                path,
                size,
                rows,
                min_seq,
                max_seq,
            });
        }
        if let Some(rate) = self.cfg.throttle_bytes_per_sec {
            tokio::time::sleep(Duration::from_secs_f64(bytes as f64 / rate.as_u64() as f64)).await;
        }

        // Commit: the manifest first (durable), then the in-memory switch.
        let manifest = {
            let s = state.lock().expect("table lock");
            let mut files = s.files.clone();
            files.extend(new_entries.iter().cloned());
            Manifest {
                table: table.to_string(),
                archived_seq: max_seq,
                files,
            }
        };
        let body = serde_json::to_vec_pretty(&manifest).map_err(Error::internal)?;
        self.store
            .put(&manifest_path(table), PutPayload::from(body))
            .await
            .map_err(|e| Error::Unavailable(format!("archive manifest for {table}: {e}")))?;
        {
            let mut s = state.lock().expect("table lock");
            s.files.extend(new_entries);
            s.archived_seq = max_seq;
            while s.batches.front().is_some_and(|b| b.seq <= max_seq) {
                let b = s.batches.pop_front().unwrap();
                s.rows -= b.batch.num_rows() as u64;
                s.bytes -= b.bytes;
            }
            s.oldest = if s.batches.is_empty() {
                None
            } else {
                Some(std::time::Instant::now())
            };
            self.buffers.publish(table, &s);
        }
        self.release_wal();
        Ok(())
    }

    /// Deletes WAL segments every sink has made durable, then the registry versions no
    /// record left in the WAL needs.
    pub fn release_wal(&self) {
        if self.replaying.load(Ordering::Acquire) {
            return;
        }
        let last = self.wal.last_seq();
        let segments = self.wal.disk_usage().0;
        self.wal
            .set_sink_position(ARCHIVE_SINK, self.buffers.durable_seq(last));
        if self.wal.disk_usage().0 < segments {
            let (registry, oldest) = (self.registry.clone(), self.wal.oldest_versions());
            tokio::spawn(async move {
                if let Err(e) = registry.compact(&oldest).await {
                    tracing::warn!(error = %e, "cannot compact the registry");
                }
            });
        }
    }

    /// Flushes every table (used by tests and at shutdown when asked).
    pub async fn flush_all(&self) -> Result<()> {
        for t in self.buffers.table_names() {
            self.flush(&t).await?;
        }
        Ok(())
    }
}

/// Hour number (since the epoch) of each row's time value.
fn hour_of(values: &dyn Array) -> Result<Vec<i64>> {
    let (per_hour, arr) = match values.data_type() {
        DataType::Timestamp(unit, _) => {
            let per_sec: i64 = match unit {
                TimeUnit::Second => 1,
                TimeUnit::Millisecond => 1_000,
                TimeUnit::Microsecond => 1_000_000,
                TimeUnit::Nanosecond => 1_000_000_000,
            };
            let arr = arrow::compute::cast(values, &DataType::Int64).map_err(Error::internal)?;
            (per_sec * 3600, arr)
        }
        other => return Err(Error::Internal(format!("time column has type {other}"))),
    };
    let ints = arr.as_primitive::<arrow::datatypes::Int64Type>();
    Ok(ints
        .values()
        .iter()
        .map(|v| v.div_euclid(per_hour))
        .collect())
}

/// Splits batches by hour and encodes one Parquet file per hour.
/// Returns `(partition path, rows, file bytes)`.
fn encode_partitions(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    time_col: &str,
    zstd_level: i32,
    row_group_rows: usize,
) -> Result<Vec<(String, u64, Vec<u8>)>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(zstd_level).map_err(Error::internal)?,
        ))
        .set_max_row_group_row_count(Some(row_group_rows))
        .build();
    let mut writers: BTreeMap<i64, (ArrowWriter<Vec<u8>>, u64)> = BTreeMap::new();
    for batch in batches {
        let batch = sluice_sql::query::adapt_batch(batch, schema).map_err(Error::internal)?;
        if batch.num_rows() == 0 {
            continue;
        }
        let times = batch
            .column_by_name(time_col)
            .ok_or_else(|| Error::Internal(format!("batch lacks time column {time_col}")))?;
        let hours = hour_of(times.as_ref())?;
        let (lo, hi) = (*hours.iter().min().unwrap(), *hours.iter().max().unwrap());
        let mut parts: Vec<(i64, RecordBatch)> = Vec::new();
        if lo == hi {
            parts.push((lo, batch));
        } else {
            let mut keys: Vec<i64> = hours.clone();
            keys.sort_unstable();
            keys.dedup();
            for h in keys {
                let mask: arrow::array::BooleanArray =
                    hours.iter().map(|x| Some(*x == h)).collect();
                let part =
                    arrow::compute::filter_record_batch(&batch, &mask).map_err(Error::internal)?;
                parts.push((h, part));
            }
        }
        for (h, part) in parts {
            let entry = match writers.entry(h) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => v.insert((
                    ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props.clone()))
                        .map_err(Error::internal)?,
                    0,
                )),
            };
            entry.1 += part.num_rows() as u64;
            entry.0.write(&part).map_err(Error::internal)?;
        }
    }
    let mut out = Vec::new();
    for (h, (w, rows)) in writers {
        let data = w.into_inner().map_err(Error::internal)?;
        let start = chrono::DateTime::from_timestamp(h * 3600, 0)
            .ok_or_else(|| Error::Internal(format!("hour {h} out of range")))?;
        out.push((
            start.format("date=%Y-%m-%d/hour=%H").to_string(),
            rows,
            data,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};

    #[test]
    fn splits_rows_by_hour_into_partitions() {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("v", DataType::Float64, true),
        ]));
        let h = 3_600_000_000i64;
        // 2024-01-01T00:00Z = 1704067200 s
        let base = 1_704_067_200_000_000i64;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(
                    TimestampMicrosecondArray::from(vec![base, base + h + 5, base + 10, -1])
                        .with_timezone("UTC"),
                ),
                Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0, 4.0])),
            ],
        )
        .unwrap();
        let parts = encode_partitions(&[batch], &schema, "time", 3, 1024).unwrap();
        let names: Vec<_> = parts.iter().map(|(p, r, _)| (p.as_str(), *r)).collect();
        assert_eq!(
            names,
            vec![
                ("date=1969-12-31/hour=23", 1),
                ("date=2024-01-01/hour=00", 2),
                ("date=2024-01-01/hour=01", 1)
            ]
        );
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
            bytes::Bytes::from(parts[1].2.clone()),
            1024,
        )
        .unwrap();
        let got: Vec<RecordBatch> = reader.collect::<std::result::Result<_, _>>().unwrap();
        let v = got[0]
            .column(1)
            .as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!(v.values().to_vec(), vec![1.0, 3.0]);
    }
}
