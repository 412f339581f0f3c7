//! The send stage: `workers` tasks, each with its own store connection, take sealed (or
//! live) chunks and hand them to the store's [`StoreWriter::write`], which encodes them,
//! sends them and commits them with their WAL range (rows the store refuses for good go to
//! the dead-letter files inside that call). A failure is retried with exponential
//! backoff, on a new connection when the error asks for one, until it succeeds or the
//! server stops; the chunk's records then stay in the WAL for the next start.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Mutex};

use super::{Chunk, SinkRunner, StoreWriter, Written};
use crate::error::SinkError;

/// The queue of chunks the workers share.
pub type ChunkQueue = Arc<Mutex<mpsc::UnboundedReceiver<Chunk>>>;

/// Waits `delay` (doubling it up to `max`) unless shutdown comes first; false on shutdown.
pub async fn backoff(
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
    /// One worker: takes chunks off the queue until it closes or shutdown.
    pub(super) async fn worker(
        self: Arc<Self>,
        queue: ChunkQueue,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut conn: Option<W::Conn> = None;
        loop {
            let chunk = {
                let mut q = queue.lock().await;
                tokio::select! {
                    c = q.recv() => c,
                    _ = shutdown.changed() => None,
                }
            };
            let Some(chunk) = chunk else { return };
            let started = Instant::now();
            match self.send(&chunk, &mut conn, &mut shutdown).await {
                Some(written) => self.settle(&chunk, &written, started),
                None => return,
            }
        }
    }

    /// Writes one chunk, retrying until it is committed; `None` on shutdown.
    async fn send(
        &self,
        chunk: &Chunk,
        conn: &mut Option<W::Conn>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Written> {
        let mut delay = self.opts.retry_initial;
        loop {
            if conn.is_none() {
                match self.writer.connect().await {
                    Ok(c) => *conn = Some(c),
                    Err(e) => {
                        self.retrying(&e, None, "cannot connect to the store");
                        if !backoff(&mut delay, self.opts.retry_max, shutdown).await {
                            return None;
                        }
                        continue;
                    }
                }
            }
            let result = tokio::select! {
                r = self.writer.write(conn.as_mut().expect("connection"), chunk) => r,
                _ = shutdown.changed() => return None,
            };
            match result {
                Ok(w) => return Some(w),
                Err(e) => {
                    self.retrying(&e, Some(chunk.table.name()), "write failed");
                    if e.reconnect() {
                        *conn = None;
                    }
                    if !backoff(&mut delay, self.opts.retry_max, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Notes a failed attempt: a warning when the sink was up until now, debug for the
    /// repeats of one outage.
    fn retrying(&self, e: &SinkError, table: Option<&str>, what: &str) {
        let sink = self.writer.name();
        let table = table.unwrap_or("");
        if self.status.set_retrying(&self.metrics, &e.to_string()) {
            tracing::warn!(sink, table, error = %e, "{what}; retrying with backoff");
        } else {
            tracing::debug!(sink, table, error = %e, "{what}; retrying");
        }
    }

    /// What follows a committed chunk: metrics, the table's state, the journal, and the
    /// records it held are no longer owed (the position may move).
    fn settle(&self, chunk: &Chunk, w: &Written, started: Instant) {
        let name = self.writer.name();
        let table = chunk.table.name();
        self.status.set_up(&self.metrics);
        let labels = [name, table];
        self.metrics
            .sink_rows
            .with_label_values(&labels)
            .inc_by(w.rows);
        self.metrics
            .sink_bytes
            .with_label_values(&labels)
            .inc_by(w.bytes);
        self.metrics.sink_commits.with_label_values(&labels).inc();
        if w.dead_letter_rows > 0 {
            self.metrics
                .sink_dead_letter_rows
                .with_label_values(&labels)
                .inc_by(w.dead_letter_rows);
        }
        tracing::debug!(sink = name, %table, rows = w.rows, first_seq = chunk.first_seq(),
            last_seq = chunk.last_seq(), ms = started.elapsed().as_millis() as u64,
            "chunk written");
        let fresh = self
            .status
            .set_table_error(&self.metrics, table, w.table_error.as_deref());
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
            // Not fsynced: if it is lost, the chunk is replayed with the same token and
            // the store drops it as a duplicate.
            if let Err(e) = j.done(table, chunk.first_seq(), chunk.last_seq()) {
                tracing::warn!(sink = name, error = %e, "cannot note a written chunk in the plan journal");
            }
        }
        self.tracker
            .lock()
            .expect("sink tracker")
            .paid(chunk.seqs());
        self.publish_position();
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.worker_done.notify_waiters();
    }
}
