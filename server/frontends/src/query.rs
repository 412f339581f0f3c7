//! Where SQL runs: a runtime of its own, apart from ingest.
//!
//! # What flows through it
//! SQL text comes in from the front ends (HTTP `/query`, Flight DoGet, GetFlightInfo,
//! GetSchema); [`QueryService::run`] takes a slot (`query.max_concurrent`), and on the
//! query runtime (`query.threads` threads with a `query.stack_size` stack, at `nice`
//! `query.nice`) `sluice-sql` checks the statement against its limits, plans it and runs
//! it; record batches come back one at a time over a channel of one, as the client takes
//! them, so a result is never held whole in memory. The query ends when the client goes
//! away (the [`QueryStream`] is dropped, which aborts its task), when `query.timeout`
//! passes, or when the server stops (the runtime is shut down without waiting).
//!
//! Ingest never waits on a query: the two share no threads, and the query threads run
//! at a lower CPU priority, so a cross join or a huge `range` costs ingest little and
//! `/healthz` answers while it runs.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::{FutureExt, Stream, StreamExt};
use sluice_sql::limits::QueryGuard;
use sluice_sql::query::{QueryEngine, QueryError};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use serde::{Deserialize, Serialize};
use sluice_core::error::{Error, Result};
use sluice_core::ByteSize;

/// `[query]`: where SQL runs (threads of its own, apart from ingest) and what one query
/// may take.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// Worker threads that plan and run queries, apart from ingest's. 0: half the cores,
    /// at least 1.
    pub threads: usize,
    /// Stack of each query thread: planning recurses once per level of nesting.
    pub stack_size: ByteSize,
    /// CPU priority of the query threads, as `nice` (0 to 19): the higher, the more CPU
    /// goes to ingest while a query runs.
    pub nice: i32,
    /// A query still running after this is stopped (planning included).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Queries that run at once; more wait for a slot (up to `timeout`).
    pub max_concurrent: usize,
    /// Most memory one query's sorts, joins and aggregates may hold, and the largest value
    /// one function may compute; past it the query ends with a message naming this key
    /// (sorts spill to disk first).
    pub memory_limit: ByteSize,
    /// Most memory all running queries may hold together.
    pub total_memory: ByteSize,
    /// Longest SQL text accepted.
    pub max_sql_bytes: ByteSize,
    /// Deepest nesting of expressions, subqueries and `UNION`s accepted (`a + b + c`
    /// nests one level per term).
    pub max_depth: usize,
    /// Most expression nodes in one statement.
    pub max_nodes: usize,
    /// Most spill files of all queries together on the local disk (sorts and aggregates
    /// past their memory limit), in the system's temporary directory.
    pub max_spill: ByteSize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            stack_size: ByteSize::mib(64),
            nice: 10,
            timeout: Duration::from_secs(60),
            max_concurrent: 4,
            memory_limit: ByteSize::mib(256),
            total_memory: ByteSize::mib(512),
            max_sql_bytes: ByteSize(256 * 1024),
            max_depth: 128,
            max_nodes: 100_000,
            max_spill: ByteSize::gib(1),
        }
    }
}

impl QueryConfig {
    /// Worker threads: `threads`, or half the cores (at least 1).
    pub fn worker_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
    }
}

/// What the query task sends back.
enum Msg {
    Schema(SchemaRef),
    Batch(RecordBatch),
    Failed(Error),
    /// The result is complete (a channel closed without it means it is not).
    End,
}

/// Runs queries on the query runtime; cheap to share.
pub struct QueryService {
    engine: Arc<QueryEngine>,
    /// The running queries, to stop at shutdown.
    running: std::sync::Mutex<Vec<std::sync::Weak<QueryGuard>>>,
    runtime: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    slots: Arc<Semaphore>,
    timeout: Duration,
}

/// Lowers the calling thread's CPU priority to `nice` (Linux: per thread).
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority on the calling thread, no memory involved.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

impl QueryService {
    /// Starts the query runtime.
    pub fn new(engine: Arc<QueryEngine>, cfg: &QueryConfig) -> Result<Self> {
        let nice = cfg.nice;
        let threads = cfg.worker_threads();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(threads.max(2))
            .thread_name("sluice-query")
            .thread_stack_size(cfg.stack_size.as_usize())
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the query runtime: {e}")))?;
        Ok(Self {
            engine,
            running: Default::default(),
            handle: runtime.handle().clone(),
            runtime: std::sync::Mutex::new(Some(runtime)),
            slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
            timeout: cfg.timeout,
        })
    }

    /// Stops every running query (each ends its result with an error saying so) and
    /// the query threads, without waiting for them.
    pub fn shutdown(&self) {
        for guard in self.running.lock().expect("running queries").drain(..) {
            if let Some(g) = guard.upgrade() {
                g.cancel("the query was stopped: the server is shutting down");
            }
        }
        if let Some(rt) = self.runtime.lock().expect("query runtime").take() {
            rt.shutdown_background();
        }
    }

    /// Plans and starts `sql`; errors found before the first batch (bad SQL, limits) come
    /// back here, later ones out of the stream.
    pub async fn run(&self, sql: String) -> Result<QueryStream> {
        let timeout = self.timeout;
        let permit = tokio::time::timeout(timeout, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| {
                Error::ResourceExhausted(format!(
                    "{} queries are running and none finished within {} (query.max_concurrent, query.timeout)",
                    self.slots.available_permits().max(1),
                    humantime::format_duration(timeout)
                ))
            })?
            .map_err(|_| Error::Unavailable("the server is shutting down".into()))?;
        let (tx, mut rx) = mpsc::channel::<Msg>(1);
        let engine = self.engine.clone();
        let guard = QueryGuard::new(Some((timeout, "query.timeout")));
        {
            let mut running = self.running.lock().expect("running queries");
            running.retain(|g| g.strong_count() > 0);
            running.push(Arc::downgrade(&guard));
        }
        let work = {
            let tx = tx.clone();
            let guard = guard.clone();
            async move {
                let (schema, mut stream) =
                    engine.sql_guarded(&sql, guard).await.map_err(Error::from)?;
                if tx.send(Msg::Schema(schema)).await.is_err() {
                    return Ok(());
                }
                while let Some(batch) = stream.next().await {
                    let msg = match batch {
                        Ok(b) => Msg::Batch(b),
                        Err(e) => Msg::Failed(Error::from(QueryError::from(e))),
                    };
                    let failed = matches!(msg, Msg::Failed(_));
                    // The client went away: dropping the stream stops the plan.
                    if tx.send(msg).await.is_err() || failed {
                        return Ok(());
                    }
                }
                let _ = tx.send(Msg::End).await;
                Ok::<(), Error>(())
            }
        };
        let task = self.handle.spawn(async move {
            let ended =
                tokio::time::timeout(timeout, std::panic::AssertUnwindSafe(work).catch_unwind())
                    .await;
            let failure = match ended {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(e))) => Some(e),
                Ok(Err(panic)) => Some(Error::Internal(format!(
                    "the query failed: {}",
                    sluice_core::error::panic_message(&panic)
                ))),
                Err(_) => Some(Error::DeadlineExceeded(format!(
                    "the query ran longer than {} and was stopped (query.timeout)",
                    humantime::format_duration(timeout)
                ))),
            };
            if let Some(e) = failure {
                let _ = tx.send(Msg::Failed(e)).await;
            }
        });
        let task = AbortOnDrop(task, guard);
        match rx.recv().await {
            Some(Msg::Schema(schema)) => Ok(QueryStream {
                schema,
                rx,
                done: false,
                _task: task,
                _permit: permit,
            }),
            Some(Msg::Failed(e)) => Err(e),
            Some(Msg::Batch(_) | Msg::End) | None => Err(Error::Unavailable(
                "the query was stopped before it had a schema (the server is shutting down?)"
                    .into(),
            )),
        }
    }

    /// The schema `sql` would answer with (planned, not run to the end).
    pub async fn schema(&self, sql: String) -> Result<SchemaRef> {
        Ok(self.run(sql).await?.schema())
    }

    /// Memory the running queries' operators hold now.
    pub fn memory_used(&self) -> usize {
        self.engine.memory_used()
    }
}

impl Drop for QueryService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Stops the query when the stream is dropped (the client went away): its plan stops at
/// its next batch, and the task is aborted at its next wait.
struct AbortOnDrop(tokio::task::JoinHandle<()>, Arc<QueryGuard>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.1
            .cancel("the query was cancelled: its client went away");
        self.0.abort();
    }
}

/// A query's result, batch by batch. Dropping it stops the query.
pub struct QueryStream {
    schema: SchemaRef,
    rx: mpsc::Receiver<Msg>,
    /// Set once the end marker or an error came: nothing follows.
    done: bool,
    _task: AbortOnDrop,
    _permit: OwnedSemaphorePermit,
}

impl QueryStream {
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

impl Stream for QueryStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Msg::Batch(b))) => return Poll::Ready(Some(Ok(b))),
            Poll::Ready(Some(Msg::End)) => None,
            Poll::Ready(Some(Msg::Failed(e))) => Some(Err(e)),
            Poll::Ready(Some(Msg::Schema(_))) => {
                Some(Err(Error::Internal("a second schema in one query".into())))
            }
            // Closed without its end: the result is cut short, and says so.
            Poll::Ready(None) => Some(Err(Error::Unavailable(
                "the query was stopped before its result was complete".into(),
            ))),
        };
        self.done = true;
        Poll::Ready(item)
    }
}
