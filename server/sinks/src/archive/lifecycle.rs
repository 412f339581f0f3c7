//! The archive's background jobs, every `[archive] maintenance_interval`:
//!
//! - **compaction**: a partition (`<table>/date=…/hour=…/`) holding `compact_min_files` or
//!   more files under half of `compact_target_size` gets them merged, oldest first, into
//!   one file of at most that size;
//! - **retention**: files whose hour ended longer than `retention` ago are dropped.
//!
//! # What a reader sees
//! Both change a table's file list the way a flush does: the new manifest is written
//! (durable) and then, under the table's lock, the new list takes the old one's place, so
//! a query, which takes the list once when it starts, reads either the old files or the
//! new one, never both and never neither. The files taken out of the list are deleted
//! `grace` later (longer than a query may run), not at once, so a query that started
//! before still finds them. After a crash, files that no manifest names (a merged file
//! whose manifest was never written, or old files whose deletion was pending) are
//! deleted at start by [`super::ArchiveWriter::recover`]. Every change holds the
//! archive's commit lock, so a flush and a job never write a manifest over each other.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sluice_core::buffer::{Buffers, FileEntry};
use sluice_core::metrics::Metrics;
use sluice_core::registry::Registry;

use super::{encode_partitions, plain_columns, put_manifest, read_object, write_object};
use crate::config::ArchiveConfig;
use crate::error::SinkError;

type Result<T, E = SinkError> = std::result::Result<T, E>;

/// The jobs; made by [`super::ArchiveWriter::lifecycle`].
pub struct Lifecycle {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) buffers: Arc<Buffers>,
    pub(super) registry: Arc<Registry>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) cfg: ArchiveConfig,
    pub(super) commit_lock: Arc<tokio::sync::Mutex<()>>,
    pub(super) grace: Duration,
    /// Files out of every manifest, and when they may go.
    pub(super) garbage: Mutex<Vec<(Instant, String)>>,
}

/// `date=YYYY-MM-DD/hour=HH` of an archive file's path.
fn partition_of(path: &str) -> Option<&str> {
    let (dir, _file) = path.rsplit_once('/')?;
    let (_table, partition) = dir.split_once('/')?;
    Some(partition)
}

/// When the hour of a partition ends, in seconds since 1970.
fn hour_end(partition: &str) -> Option<i64> {
    let (date, hour) = partition.split_once('/')?;
    let date = chrono::NaiveDate::parse_from_str(date.strip_prefix("date=")?, "%Y-%m-%d").ok()?;
    let hour: u32 = hour.strip_prefix("hour=")?.parse().ok()?;
    let start = date.and_hms_opt(hour, 0, 0)?.and_utc().timestamp();
    Some(start + 3600)
}

impl Lifecycle {
    /// Runs the jobs every `maintenance_interval` until `shutdown` (not at all when it is
    /// zero), and deletes the files they took out once their grace is over.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let every = self.cfg.maintenance_interval;
        if every.is_zero() {
            return;
        }
        let tick = every.min(Duration::from_secs(5));
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => return,
            }
            if last.elapsed() >= every {
                last = Instant::now();
                self.run_once(chrono::Utc::now().timestamp()).await;
            }
            self.collect_garbage(Instant::now()).await;
        }
    }

    /// One round of both jobs over every table; failures are logged and counted, and the
    /// next round tries again.
    pub async fn run_once(&self, now_secs: i64) {
        for table in self.buffers.table_names() {
            if !self.cfg.retention.is_zero() {
                if let Err(e) = self.expire(&table, now_secs).await {
                    self.metrics
                        .archive_job_errors
                        .with_label_values(&["retention"])
                        .inc();
                    tracing::warn!(table, error = %e, "archive retention failed; trying again next round");
                }
            }
            if let Err(e) = self.compact(&table).await {
                self.metrics
                    .archive_job_errors
                    .with_label_values(&["compaction"])
                    .inc();
                tracing::warn!(table, error = %e, "archive compaction failed; trying again next round");
            }
        }
    }

    /// Groups of small files to merge in `files`: per partition, oldest first, while the
    /// sizes add up to at most the target.
    fn plan(&self, files: &[FileEntry]) -> Vec<(String, Vec<FileEntry>)> {
        let target = self.cfg.compact_target_size.as_u64();
        let mut small: BTreeMap<&str, Vec<&FileEntry>> = BTreeMap::new();
        for f in files {
            if f.size < target / 2 {
                if let Some(p) = partition_of(&f.path) {
                    small.entry(p).or_default().push(f);
                }
            }
        }
        let mut groups = Vec::new();
        for (partition, mut fs) in small {
            if fs.len() < self.cfg.compact_min_files.max(2) {
                continue;
            }
            fs.sort_by_key(|f| (f.min_seq, f.path.clone()));
            let mut group = Vec::new();
            let mut size = 0;
            for f in fs {
                if size + f.size > target && group.len() >= 2 {
                    break;
                }
                size += f.size;
                group.push(f.clone());
            }
            if group.len() >= 2 {
                groups.push((partition.to_string(), group));
            }
        }
        groups
    }

    /// `table`'s files as its state lists them now.
    fn files_of(&self, table: &str) -> Vec<FileEntry> {
        let state = self.buffers.table(table);
        let files = state.lock().expect("table lock").files.clone();
        files
    }

    /// Merges `table`'s small files, partition by partition; returns the files merged.
    pub async fn compact(&self, table: &str) -> Result<usize> {
        let Some(current) = self.registry.get(table) else {
            return Ok(0);
        };
        let files = self.files_of(table);
        let mut merged = 0;
        for (partition, group) in self.plan(&files) {
            let mut batches: Vec<RecordBatch> = Vec::new();
            for f in &group {
                let bytes = read_object(
                    self.store.as_ref(),
                    &ObjPath::from(f.path.as_str()),
                    &format!("reading {} to compact it", f.path),
                )
                .await?;
                let path = f.path.clone();
                let read = tokio::task::spawn_blocking(move || {
                    ParquetRecordBatchReaderBuilder::try_new(bytes)?
                        .build()?
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(parquet::errors::ParquetError::from)
                })
                .await
                .map_err(|e| SinkError::Unexpected(format!("the Parquet reader failed: {e}")))?
                .map_err(|source| SinkError::Parquet {
                    context: format!("reading {path} to compact it"),
                    source,
                })?;
                batches.extend(read);
            }
            let rows: u64 = group.iter().map(|f| f.rows).sum();
            let read_rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
            if read_rows != rows {
                return Err(SinkError::Unexpected(format!(
                    "{table}/{partition}: the files hold {read_rows} rows, their manifest says {rows}; not compacted"
                )));
            }
            let (schema, time_col) = (current.arrow_schema.clone(), current.time_column.clone());
            let (level, rg) = (self.cfg.zstd_level, self.cfg.row_group_rows);
            let plain = plain_columns(&current);
            let mut encoded = tokio::task::spawn_blocking(move || {
                encode_partitions(&batches, &schema, &time_col, level, rg, &plain)
            })
            .await
            .map_err(|e| SinkError::Unexpected(format!("the Parquet encoder failed: {e}")))??;
            if encoded.len() != 1 || encoded[0].0 != partition || encoded[0].1 != rows {
                return Err(SinkError::Unexpected(format!(
                    "{table}/{partition}: the merged rows do not make one file of that hour; not compacted"
                )));
            }
            let (_, _, data) = encoded.pop().expect("one file");
            let min_seq = group.iter().map(|f| f.min_seq).min().unwrap_or(0);
            let max_seq = group.iter().map(|f| f.max_seq).max().unwrap_or(0);
            let stamp = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
            let path =
                format!("{table}/{partition}/part-{min_seq:020}-{max_seq:020}-c{stamp}.parquet");
            let entry = FileEntry {
                path: path.clone(),
                size: data.len() as u64,
                rows,
                min_seq,
                max_seq,
            };
            write_object(self.store.as_ref(), &path, data).await?;
            let old: Vec<String> = group.iter().map(|f| f.path.clone()).collect();
            if !self.replace(table, &old, Some(entry)).await? {
                // Retention took some of them meanwhile: the merged file is not needed.
                let _ = self.store.delete(&ObjPath::from(path.as_str())).await;
                continue;
            }
            merged += group.len();
            self.metrics
                .archive_compactions
                .with_label_values(&[table])
                .inc();
            self.metrics
                .archive_compacted_files
                .with_label_values(&[table])
                .inc_by(group.len() as u64);
            tracing::info!(
                table,
                partition,
                files = group.len(),
                rows,
                "archive files compacted"
            );
        }
        Ok(merged)
    }

    /// Drops `table`'s files whose hour ended more than `retention` before `now_secs`;
    /// returns how many.
    pub async fn expire(&self, table: &str, now_secs: i64) -> Result<usize> {
        let cutoff = now_secs - self.cfg.retention.as_secs() as i64;
        let files = self.files_of(table);
        let old: Vec<String> = files
            .iter()
            .filter(|f| {
                partition_of(&f.path)
                    .and_then(hour_end)
                    .is_some_and(|end| end <= cutoff)
            })
            .map(|f| f.path.clone())
            .collect();
        if old.is_empty() || !self.replace(table, &old, None).await? {
            return Ok(0);
        }
        self.metrics
            .archive_expired_files
            .with_label_values(&[table])
            .inc_by(old.len() as u64);
        tracing::info!(
            table,
            files = old.len(),
            "archive files past the retention dropped"
        );
        Ok(old.len())
    }

    /// Takes `old` out of `table`'s file list (putting `new` where the first of them was),
    /// manifest first; false (nothing changed) when one of `old` is no longer listed.
    async fn replace(&self, table: &str, old: &[String], new: Option<FileEntry>) -> Result<bool> {
        let _commit = self.commit_lock.lock().await;
        let state = self.buffers.table(table);
        let (files, archived_seq) = {
            let s = state.lock().expect("table lock");
            if !old.iter().all(|o| s.files.iter().any(|f| &f.path == o)) {
                return Ok(false);
            }
            let mut files = Vec::with_capacity(s.files.len());
            let mut new = new;
            for f in &s.files {
                if old.contains(&f.path) {
                    files.extend(new.take());
                } else {
                    files.push(f.clone());
                }
            }
            (files, s.archived_seq)
        };
        put_manifest(self.store.as_ref(), table, archived_seq, files.clone()).await?;
        state.lock().expect("table lock").files = files;
        let due = Instant::now() + self.grace;
        self.garbage
            .lock()
            .expect("garbage")
            .extend(old.iter().map(|p| (due, p.clone())));
        Ok(true)
    }

    /// Deletes the files out of every manifest whose grace ended by `now`.
    pub async fn collect_garbage(&self, now: Instant) {
        let due: Vec<String> = {
            let mut g = self.garbage.lock().expect("garbage");
            let (due, keep): (Vec<_>, Vec<_>) = g.drain(..).partition(|(t, _)| *t <= now);
            *g = keep;
            due.into_iter().map(|(_, p)| p).collect()
        };
        for path in due {
            match self.store.delete(&ObjPath::from(path.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    // Deleted at the next start (no manifest names it).
                    tracing::warn!(file = path, error = %e, "cannot delete an archive file no manifest names any more");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_and_their_hours() {
        let p = partition_of("t/date=2026-12-07/hour=13/part-1-2-0.parquet").unwrap();
        assert_eq!(p, "date=2026-12-07/hour=13");
        assert_eq!(hour_end(p), Some(1_796_652_000));
        assert_eq!(partition_of("nope.parquet"), None);
        assert_eq!(hour_end("date=2026-13-07/hour=13"), None);
        assert_eq!(hour_end("date=2026-12-07/hour=24"), None);
    }
}
