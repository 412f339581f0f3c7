//! What every store sink shares (PostgreSQL, ClickHouse): a pipeline of stages from the
//! WAL to the store, each in its own file and testable alone.
//!
//! # The stages one record passes
//! 1. **tail** ([`tail`]): a [`TailReader`] reads durable records from the sink's
//!    registered WAL position on (from memory while the sink keeps up, from disk when it
//!    does not).
//! 2. **route and chunk** ([`route`]): the [`Router`] skips records of tables not sent
//!    to this store and records the store committed before a restart ([`CommittedRanges`]),
//!    decodes the rest, brings them to the table's current schema and appends them to
//!    the table's open [`Chunk`] ([`chunk`]). A chunk is sealed when it reaches the row or
//!    byte target, or has waited `linger`. A store that [streams](StoreWriter::streams)
//!    gets a chunk as soon as it opens, if a worker is idle, and is fed its records as
//!    they arrive ([`LiveParts`]). Stores that rely on writing the same chunk again after
//!    a crash have each chunk planned in their [`PlanJournal`] ([`journal`]) first.
//! 3. **encode** ([`StoreWriter::write`], [`store`]): the store's writer turns the chunk
//!    into its wire format (binary COPY in `postgres::copy`, Native blocks in
//!    `clickhouse::native`).
//! 4. **send** ([`send`]): `workers` tasks, each with its own connection, send chunks and
//!    commit each with its WAL range; rows the store refuses for good go to the
//!    [`DeadLetter`] files ([`dead_letter`]); any other failure comes back as a
//!    [`SinkError`] and is retried with exponential backoff, reconnecting when it asks to.
//! 5. **publish position** ([`position`]): the [`Tracker`] knows which records are still
//!    owed; the highest seq below all of them is the sink's WAL position, which lets the
//!    WAL release segments. [`SinkStatus`] is what `/readyz` and `/metrics` show.
//!
//! [`SinkRunner::run`] below strings the stages together.

pub mod chunk;
pub mod dead_letter;
pub mod journal;
pub mod position;
pub mod route;
pub mod send;
pub mod store;
pub mod tail;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flight_schema::SinkKind;
use sluice_core::metrics::Metrics;
use sluice_core::registry::Registry;
use sluice_wal::Wal;
use tokio::sync::watch;

pub use crate::error::SinkError;
pub use chunk::{halves, Chunk, LiveParts, Part, Slice};
pub use dead_letter::{DeadLetter, Refused};
pub use journal::{Journaled, Plan, PlanJournal};
pub use position::{SinkStatus, Tracker};
pub use route::{ChunkTargets, Routed, Router};
pub use send::backoff;
pub use store::{CommittedRanges, StoreWriter, Written};
pub use tail::TailReader;

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

impl SinkOptions {
    fn targets(&self) -> ChunkTargets {
        ChunkTargets {
            rows: self.batch_rows,
            bytes: self.batch_bytes,
            linger: self.linger,
        }
    }
}

/// What every sink of one server shares: the WAL it reads, the registry its records are
/// decoded with, the metrics, and the stores configured (for routing).
#[derive(Clone)]
pub struct SinkContext {
    pub wal: Wal,
    /// The WAL's id, which the store's committed ranges are kept under.
    pub wal_id: String,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub configured: Vec<SinkKind>,
}

/// Runs one sink: the stages above, for one store.
pub struct SinkRunner<W: StoreWriter> {
    writer: Arc<W>,
    wal: Wal,
    wal_id: String,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    configured: Vec<SinkKind>,
    opts: SinkOptions,
    status: Arc<SinkStatus>,
    tracker: Mutex<Tracker>,
    /// For stores whose exactly-once rests on writing the same chunk again after a crash
    /// (ClickHouse's deduplication tokens): chunks are planned here before they are
    /// written, and re-formed exactly from the plan after a restart.
    journal: Option<PlanJournal>,
    /// Chunks handed to the workers and not yet finished (live ones included).
    in_flight: AtomicUsize,
    /// Woken when a worker finishes a chunk.
    worker_done: tokio::sync::Notify,
}

impl<W: StoreWriter> SinkRunner<W> {
    pub fn new(writer: W, ctx: SinkContext, opts: SinkOptions) -> Self {
        let status = Arc::new(SinkStatus::new(writer.name()));
        Self {
            writer: Arc::new(writer),
            wal: ctx.wal,
            wal_id: ctx.wal_id,
            registry: ctx.registry,
            metrics: ctx.metrics,
            configured: ctx.configured,
            opts,
            status,
            tracker: Mutex::default(),
            journal: None,
            in_flight: AtomicUsize::new(0),
            worker_done: tokio::sync::Notify::new(),
        }
    }

    /// Plans every chunk in `journal` before it is written (see [`PlanJournal`]).
    pub fn with_journal(mut self, journal: PlanJournal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// The sink's state, for `/readyz` and `/metrics`.
    pub fn status(&self) -> Arc<SinkStatus> {
        self.status.clone()
    }

    /// Publishes the sink's position to the WAL (releasing segments) and its lag.
    fn publish_position(&self) {
        let (position, oldest) = {
            let t = self.tracker.lock().expect("sink tracker");
            (t.position(), t.oldest())
        };
        self.wal.set_sink_position(self.writer.name(), position);
        self.status.set_position(position, oldest);
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

    /// Asks the store what it holds (retrying until it answers) and builds the router
    /// from it and from the journal; `None` on shutdown or an unreadable journal.
    async fn start_router(&self, shutdown: &mut watch::Receiver<bool>) -> Option<Router> {
        let name = self.writer.name();
        let mut delay = self.opts.retry_initial;
        let committed = loop {
            let attempt = async {
                let mut conn = self.writer.connect().await?;
                self.writer.committed(&mut conn, &self.wal_id).await
            };
            match attempt.await {
                Ok(c) => break c,
                Err(e) => {
                    if self.status.set_retrying(&self.metrics, &e.to_string()) {
                        tracing::warn!(sink = name, error = %e, "sink cannot reach its store; retrying");
                    }
                    if !backoff(&mut delay, self.opts.retry_max, shutdown).await {
                        return None;
                    }
                }
            }
        };
        let mut router = Router::new(
            self.registry.clone(),
            self.configured.clone(),
            self.writer.kind(),
            self.writer.streams(),
            self.opts.targets(),
        );
        if self.writer.every_table() {
            router = router.every_table();
        }
        let writer = self.writer.clone();
        let router = router.under_pressure(Box::new(move || writer.memory_pressed()));
        let writer = self.writer.clone();
        let router = router.with_cache(Box::new(move |table, seq| writer.cached(table, seq)));
        Some(match &self.journal {
            Some(j) => {
                let journaled = match j.load() {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::error!(sink = name, error = %e, "cannot read the sink's plan journal");
                        let _ = self.status.set_retrying(&self.metrics, &e.to_string());
                        return None;
                    }
                };
                let mut c = committed;
                c.merge(journaled.done);
                router.skip_committed(c.finish()).replay(journaled.plans)
            }
            None => router.skip_committed(committed),
        })
    }

    /// Forgets, in the background, what the store and the journal keep of records the
    /// WAL no longer holds.
    fn forget_old(&self) {
        let (writer, wal_id, below) = (
            self.writer.clone(),
            self.wal_id.clone(),
            self.wal.first_seq(),
        );
        if let Some(j) = &self.journal {
            if let Err(e) = j.compact(below) {
                tracing::warn!(sink = writer.name(), error = %e, "cannot compact the plan journal");
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

    /// Runs until `shutdown`. Chunks not committed by then are written after the next
    /// start, from the WAL.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let name = self.writer.name();
        let Some(mut router) = self.start_router(&mut shutdown).await else {
            return;
        };
        self.status.set_up(&self.metrics);
        let start = self
            .wal
            .sink_positions()
            .into_iter()
            .find(|(s, _)| *s == name)
            .map_or(self.wal.first_seq().saturating_sub(1), |(_, p)| p);
        tracing::info!(sink = name, from_seq = start + 1, "sink started");
        self.tracker.lock().expect("sink tracker").read_upto = start;

        // Unbounded: the runner never waits on the workers while a live chunk it alone can
        // seal is being streamed; it stops reading the WAL instead (see `in_flight`).
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Chunk>();
        let queue: send::ChunkQueue = Arc::new(tokio::sync::Mutex::new(rx));
        let mut workers = Vec::new();
        for _ in 0..self.opts.workers {
            workers.push(tokio::spawn(
                self.clone().worker(queue.clone(), shutdown.clone()),
            ));
        }

        let mut tail = TailReader::new(self.wal.clone(), start);
        let mut last_forget = Instant::now();
        let mut delay = self.opts.retry_initial;
        loop {
            if *shutdown.borrow() {
                break;
            }
            if last_forget.elapsed() >= FORGET_EVERY {
                last_forget = Instant::now();
                self.forget_old();
            }
            // Backpressure: with this many chunks queued or being written, read no more
            // of the WAL (live chunks still seal on time below).
            let busy = self.in_flight.load(Ordering::Acquire) >= 2 * self.opts.workers;
            // 1. tail
            let records = if busy {
                Vec::new()
            } else {
                match tail.read().await {
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
                }
            };
            let idle = records.is_empty();
            // 2. route and chunk
            let mut ready = Vec::new();
            for rec in records {
                let (seq, table) = (rec.seq, rec.table.clone());
                // Decoding happens here: the tracker is locked only after it, so the
                // workers settling chunks meanwhile do not wait on it.
                let routed = router.take(rec);
                let mut t = self.tracker.lock().expect("sink tracker");
                match routed {
                    Routed::Skipped => {}
                    Routed::Taken(chunks) => {
                        t.owe(seq);
                        ready.extend(chunks);
                    }
                    Routed::Stuck(e) => {
                        // It stays owed, so the WAL keeps it; say so loudly.
                        t.owe(seq);
                        tracing::error!(sink = name, seq, %table, error = %e,
                            "cannot decode a WAL record for the sink; it stays in the WAL");
                        let _ = self
                            .status
                            .set_retrying(&self.metrics, &format!("record {seq}: {e}"));
                    }
                }
                t.read_upto = seq;
            }
            let read_upto = self.tracker.lock().expect("sink tracker").read_upto;
            ready.extend(router.sealed(read_upto));
            for chunk in ready {
                if let Err(e) = self.plan(&chunk) {
                    tracing::error!(sink = name, error = %e, "cannot write the sink's plan journal");
                    let _ = self.status.set_retrying(&self.metrics, &e.to_string());
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
            let idle_workers = self
                .opts
                .workers
                .saturating_sub(self.in_flight.load(Ordering::Acquire));
            for copy in router.live_copies(idle_workers) {
                self.in_flight.fetch_add(1, Ordering::AcqRel);
                let _ = tx.send(copy);
            }
            // 5. publish position (the workers publish theirs as chunks commit)
            self.publish_position();
            let wait = (self.opts.linger / 5).min(Duration::from_millis(100));
            if busy {
                tokio::select! {
                    _ = self.worker_done.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
            } else if idle {
                tail.wait(wait, &mut shutdown).await;
            }
        }
        drop(tx);
        for w in workers {
            let _ = w.await;
        }
    }

    /// Records a chunk in the plan journal (fsynced) before it is written, unless it is a
    /// replay of a plan already there.
    fn plan(&self, chunk: &Chunk) -> Result<(), SinkError> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        if chunk.replayed || chunk.parts.is_empty() {
            return Ok(());
        }
        j.plan(chunk.table.name(), &chunk.seqs())
    }
}
