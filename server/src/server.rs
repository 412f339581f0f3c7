//! Start-up, serving and graceful shutdown.
//!
//! Start: registry → archive manifests (orphan files removed) → WAL check → the archive's
//! sink runner → WAL replay into the recent buffer (records the archive already holds are
//! skipped, so nothing is duplicated) → the stores' sink runners → listeners → one
//! `SLUICE_READY` line on stdout. Shutdown (SIGTERM/SIGINT): listeners stop taking new
//! calls, in-flight calls finish (their acks are sent) within `server.shutdown_timeout`,
//! the sinks stop and the WAL writer syncs and exits. Buffered rows stay in the WAL and are replayed on next start.

use std::net::SocketAddr;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use sluice_sql::query::QueryEngine;
use tokio::net::TcpListener;

use crate::config::Config;
use sluice_core::buffer::{Buffers, MemoryBudget};
use sluice_core::error::{Error, Result};
use sluice_core::metrics::Metrics;
use sluice_core::registry::{FileRegistryStore, Registry};
use sluice_frontends::flight::FlightFrontEnd;
use sluice_frontends::state::{AppState, Readiness};
use sluice_ingest::Pipeline;
use sluice_sinks::archive::{self, ArchiveWriter};
use sluice_sinks::postgres::sink::{PgWriter, PG_SINK};
use sluice_sinks::rollup::{self, Rollup};
use sluice_sinks::runner::{
    DeadLetter, PlanJournal, SinkContext, SinkOptions, SinkRunner, SinkStatus, StoreWriter,
};
use sluice_wal::{Wal, WalOptions};

struct ServerReadiness {
    archive: Arc<SinkStatus>,
    wal: Wal,
    memory: Arc<MemoryBudget>,
    buffers: Arc<Buffers>,
    sinks: Vec<Arc<SinkStatus>>,
    /// TimescaleDB's jobs, where PostgreSQL is configured.
    jobs: Option<Arc<sluice_sinks::postgres::jobs::JobsWatch>>,
    wal_disk_budget: u64,
    /// Free space the WAL's disk needs, after a write failed for lack of it, to be ready
    /// again (room for a batch of the largest size, twice).
    wal_disk_room: u64,
}

impl Readiness for ServerReadiness {
    fn readiness(&self) -> (bool, serde_json::Value) {
        let (segments, bytes) = self.wal.disk_usage();
        // The archive failing makes the server unready (other stores only degrade it):
        // the embedded default has no other store.
        let archive_failing = self.archive.is_failing();
        let (mut rows, mut oldest) = (0u64, 0u64);
        for t in self.buffers.table_names() {
            let state = self.buffers.table(&t);
            let s = state.lock().expect("table lock");
            rows += s.rows;
            oldest = oldest.max(s.oldest.map_or(0, |o| o.elapsed().as_secs()));
        }
        // Ready means writes are accepted: the WAL has room. A store that is down makes
        // the server degraded, not unready: the WAL keeps taking writes for it.
        let wal_full = bytes > self.wal_disk_budget;
        // A write failed for a full disk: unready until the space is back (no restart
        // needed: the next write goes to a new segment).
        let write_error = self.wal.write_error();
        let disk_free = self.wal.disk_free();
        let disk_full = write_error.as_ref().is_some_and(|(_, full)| *full)
            && disk_free.is_none_or(|f| f < self.wal_disk_room);
        let ready = !archive_failing && !wal_full && !disk_full;
        let last_seq = self.wal.last_seq();
        let mut sinks = serde_json::Map::new();
        let mut archive = self.archive.json(last_seq);
        if let serde_json::Value::Object(a) = &mut archive {
            if !archive_failing {
                a.insert("state".into(), "ok".into());
            }
            a.insert("lag_rows".into(), rows.into());
            a.insert("lag_seconds".into(), oldest.into());
        }
        sinks.insert("archive".into(), archive);
        let mut degraded = false;
        for s in &self.sinks {
            degraded |= !s.is_up() || s.has_table_errors();
            sinks.insert(s.name.to_string(), s.json(last_seq));
        }
        if let Some(jobs) = self.jobs.as_ref().filter(|j| !j.jobs().is_empty()) {
            degraded |= jobs.degraded();
            if let Some(serde_json::Value::Object(pg)) =
                sinks.get_mut(sluice_sinks::postgres::sink::PG_SINK)
            {
                pg.insert("timescaledb_jobs".into(), jobs.json());
            }
        }
        (
            ready,
            serde_json::json!({
                "ready": ready,
                "degraded": degraded,
                "wal": {"segments": segments, "bytes": bytes, "last_seq": last_seq,
                        "disk_budget": self.wal_disk_budget, "full": wal_full,
                        "disk_full": disk_full, "disk_free": disk_free,
                        "last_write_error": write_error.map(|(m, _)| m)},
                "memory": {"used_fraction": self.memory.used_fraction()},
                "sinks": sinks,
            }),
        )
    }
}

/// Addresses the listeners are bound to.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Runs the server until SIGTERM/SIGINT; `on_ready` is called once both listeners accept.
pub async fn run(config: Config, on_ready: impl FnOnce(BoundAddrs)) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let data_dir = config.server.data_dir.clone();
    // Held until the process exits: a second server, or `sluice wal repair`, on the same
    // directory would interleave writes to the WAL.
    let _lock = DataDirLock::acquire(&data_dir, "serve")?;

    // PostgreSQL first: it may hold the registry.
    let postgres = match &config.postgres.url {
        Some(url) => Some(prepare_postgres(url, &config).await?),
        None => None,
    };
    let clickhouse = match &config.clickhouse.url {
        Some(_) => Some(prepare_clickhouse(&config).await?),
        None => None,
    };
    let registry_store: Box<dyn sluice_core::registry::RegistryStore> = match &postgres {
        Some(pg) => {
            Box::new(sluice_sinks::postgres::registry::PgRegistryStore::connect(&pg.url).await?)
        }
        None => Box::new(FileRegistryStore::open(&data_dir)?),
    };
    let mut registry = Registry::open(registry_store).await?;
    // Checked whether or not ClickHouse is configured: a table registered now may be
    // routed there once it is.
    registry.add_check(Box::new(|t| {
        sluice_sinks::clickhouse::sink::TableOptions::of(t)
            .map(|_| ())
            .map_err(Into::into)
    }));
    if config.otlp.otel_tables {
        register_otel_tables(&registry).await?;
    }
    let registry = Arc::new(registry);
    let (store, store_url) = archive::open_store(&config.archive, &data_dir)?;
    let buffers = Arc::new(Buffers::new(registry.clone(), metrics.clone()));
    let memory = Arc::new(MemoryBudget::new(
        config.memory.budget.as_u64(),
        metrics.clone(),
    ));
    let wal_opts = WalOptions {
        dir: data_dir.join("wal"),
        fsync: config.wal.fsync,
        segment_size: config.wal.segment_size.as_u64(),
        max_group_bytes: config.wal.max_group_bytes.as_u64(),
        feed_bytes: config.wal.feed_bytes.as_u64(),
        direct_io: config.wal.direct_io,
    };
    let floor = wal_floor(&config, store.as_ref(), &data_dir.join("wal")).await?;
    let wal = {
        let m = metrics.wal.clone();
        tokio::task::spawn_blocking(move || Wal::open(wal_opts, m, floor))
            .await
            .map_err(Error::internal)??
    };
    let wal_id = wal.id().to_string();
    // Every sink starts at the oldest record on disk; none can be released before the
    // sink has looked at it.
    let start = wal.first_seq().saturating_sub(1);
    wal.register_sink(archive::ARCHIVE_SINK, start);
    let mut sinks_configured = vec![flight_schema::SinkKind::Archive];
    if postgres.is_some() {
        sinks_configured.push(flight_schema::SinkKind::Postgres);
        wal.register_sink(PG_SINK, start);
    }
    if clickhouse.is_some() {
        sinks_configured.push(flight_schema::SinkKind::Clickhouse);
        wal.register_sink(sluice_sinks::clickhouse::sink::CH_SINK, start);
    }
    // The rollup reads the WAL from where its checkpoint says, with or without PostgreSQL.
    let rollup = match (&clickhouse, config.rollup.enabled) {
        (Some(client), true) => {
            let r = Arc::new(Rollup::new(
                client.clone(),
                wal.clone(),
                registry.clone(),
                metrics.clone(),
                config.rollup.clone(),
                &data_dir,
                (config.clickhouse.retry_initial, config.clickhouse.retry_max),
            )?);
            let checkpoint = rollup::load_checkpoint(r.dir())?;
            let from = rollup::start_seq(checkpoint.as_ref(), &wal);
            wal.register_sink(rollup::ROLLUP_SINK, from);
            Some((r, checkpoint, from))
        }
        _ => None,
    };
    let archive_writer = ArchiveWriter::new(
        archive::ArchiveParts {
            store: store.clone(),
            buffers: buffers.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            memory: memory.clone(),
        },
        config.archive.clone(),
        sinks_configured.clone(),
    );
    archive_writer.recover().await?;
    // Compaction and retention; a file they take out of a manifest is deleted once no
    // query that started before can still be reading it.
    let archive_jobs =
        archive_writer.lifecycle(config.query.timeout + std::time::Duration::from_secs(10));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sinks = SinkSpawner {
        ctx: SinkContext {
            wal: wal.clone(),
            wal_id: wal_id.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            configured: sinks_configured.clone(),
        },
        stop: stop_rx.clone(),
    };
    let mut sink_statuses = Vec::new();
    let mut sink_tasks = Vec::new();
    // The archive runs during the replay, so that memory the replayed records take is
    // freed as they are archived; the replay holds the WAL's segments until it is done.
    wal.register_sink(REPLAY_HOLD, start);
    let (archive_status, task) =
        sinks.spawn(archive_writer, archive::sink_options(&config.buffer), None);
    sink_tasks.push(task);
    sink_tasks.push(tokio::spawn(archive::publish_gauges(
        buffers.clone(),
        stop_rx.clone(),
    )));
    sink_tasks.push(tokio::spawn(compact_registry(
        registry.clone(),
        wal.clone(),
        stop_rx.clone(),
    )));
    let activity = {
        let wal = wal.clone();
        move || {
            let sinks: u64 = wal.sink_positions().iter().map(|(_, p)| *p).sum();
            wal.last_seq().wrapping_add(sinks)
        }
    };
    tokio::spawn(crate::allocator::bound_freed_memory(
        activity,
        config.memory.keep_freed(),
        stop_rx.clone(),
    ));

    replay(&wal, &registry, &buffers, &memory).await?;
    wal.unregister_sink(REPLAY_HOLD);
    sink_tasks.push(tokio::spawn(archive_jobs.run(stop_rx.clone())));

    let mut jobs = None;
    if let Some(pg) = &postgres {
        let writer = PgWriter::new(
            pg.url.clone(),
            config.postgres.clone(),
            DeadLetter::new(store.clone()),
            wal_id.clone(),
        )
        .on_timescaledb(pg.timescale);
        let opts = SinkOptions {
            workers: config.postgres.pool_size,
            batch_rows: config.postgres.batch_rows,
            batch_bytes: config.postgres.batch_bytes.as_usize(),
            linger: config.postgres.linger,
            retry_initial: config.postgres.retry_initial,
            retry_max: config.postgres.retry_max,
        };
        let (status, task) = sinks.spawn(writer, opts, None);
        sink_statuses.push(status);
        sink_tasks.push(task);
        // Partitions, retention and metrics_1m on plain PostgreSQL; on TimescaleDB, the
        // watch over its jobs (run from here where its scheduler fails).
        let watch = Arc::new(sluice_sinks::postgres::jobs::JobsWatch::new(
            config.postgres.timescaledb_jobs,
            Some(metrics.clone()),
        ));
        jobs = Some(watch.clone());
        sink_tasks.push(tokio::spawn(sluice_sinks::postgres::maintenance::run(
            pg.url.clone(),
            config.postgres.clone(),
            watch,
            stop_rx.clone(),
        )));
        // Other processes sharing the registry may register tables: pick them up.
        let (reg, mut stop) = (registry.clone(), stop_rx.clone());
        sink_tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(REGISTRY_REFRESH) => {}
                    _ = stop.changed() => return,
                }
                if let Err(e) = reg.refresh().await {
                    tracing::warn!(error = %e, "cannot re-read the registry from PostgreSQL");
                }
            }
        }));
    }

    if let Some(client) = &clickhouse {
        let writer = sluice_sinks::clickhouse::sink::ChWriter::new(
            client.clone(),
            wal_id.clone(),
            DeadLetter::new(store.clone()),
            config.clickhouse.dedup_window,
        );
        let opts = SinkOptions {
            workers: config.clickhouse.pool_size,
            batch_rows: config.clickhouse.batch_rows,
            batch_bytes: config.clickhouse.batch_bytes.as_usize(),
            linger: config.clickhouse.linger,
            retry_initial: config.clickhouse.retry_initial,
            retry_max: config.clickhouse.retry_max,
        };
        let journal = PlanJournal::new(data_dir.join("wal").join("clickhouse.plans"));
        let (status, task) = sinks.spawn(writer, opts, Some(journal));
        sink_statuses.push(status);
        sink_tasks.push(task);
    }

    if let Some((r, checkpoint, from)) = rollup {
        sink_statuses.push(r.status());
        sink_tasks.push(tokio::spawn(r.run(checkpoint, from, stop_rx.clone())));
    }

    let limits = sluice_sql::QueryLimits {
        max_sql_bytes: config.query.max_sql_bytes.as_usize(),
        max_depth: config.query.max_depth,
        max_nodes: config.query.max_nodes,
        memory_per_query: config.query.memory_limit.as_usize(),
        memory_total: config.query.total_memory.as_usize(),
        max_spill: config.query.max_spill.as_u64(),
    };
    let engine = Arc::new(QueryEngine::with_config(
        buffers.clone(),
        store,
        store_url,
        datafusion::prelude::SessionConfig::new(),
        limits,
    ));
    let query = Arc::new(sluice_frontends::query::QueryService::new(
        engine,
        &config.query,
    )?);
    let pipeline = Arc::new(
        Pipeline::builder(
            registry.clone(),
            buffers.clone(),
            memory.clone(),
            wal.clone(),
            metrics.clone(),
        )
        .wal_compression(config.wal.compression.ipc())
        .sinks(sinks_configured.clone())
        .wal_disk_budget(Some(config.wal.disk_budget.as_u64()))
        .build(),
    );
    let state = Arc::new(AppState {
        ingest: pipeline,
        registry,
        query,
        metrics,
        max_body_size: config.server.max_body_size.as_usize(),
        otel_tables: config.otlp.otel_tables,
        readiness: Arc::new(ServerReadiness {
            archive: archive_status,
            wal: wal.clone(),
            memory,
            buffers,
            sinks: sink_statuses,
            jobs,
            wal_disk_budget: config.wal.disk_budget.as_u64(),
            wal_disk_room: 2 * config.server.max_message_size.as_u64(),
        }),
    });

    let grpc_listener = listen("server.grpc_addr", config.server.grpc_addr).await?;
    let http_listener = listen("server.http_addr", config.server.http_addr).await?;
    let addrs = BoundAddrs {
        grpc: grpc_listener.local_addr().map_err(Error::internal)?,
        http: http_listener.local_addr().map_err(Error::internal)?,
    };

    let (shutdown_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let max_msg = config.server.max_message_size.as_usize();
    let flight = FlightServiceServer::new(FlightFrontEnd::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(usize::MAX);
    let conns = sluice_frontends::listen::Connections::new(
        config.server.max_connections,
        config.server.idle_timeout,
    );
    tracing::info!(
        max_connections = conns.max,
        "accepting at most this many connections, HTTP and gRPC together"
    );
    let mut grpc_shutdown = shutdown_tx.subscribe();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .tcp_nodelay(true)
            // Let clients send big HTTP/2 DATA frames: fewer frames per batch.
            .max_frame_size(Some(1 << 20))
            .layer(sluice_frontends::edge::GrpcEdgeLayer)
            .add_service(flight)
            .add_service(sluice_frontends::otlp::logs_service(state.clone(), max_msg))
            .add_service(sluice_frontends::otlp::traces::trace_service(
                state.clone(),
                max_msg,
            ))
            .add_service(sluice_frontends::otlp::metrics::metrics_service(
                state.clone(),
                max_msg,
            ))
            .serve_with_incoming_shutdown(conns.clone().incoming(grpc_listener), async move {
                let _ = grpc_shutdown.recv().await;
            }),
    );
    let mut http_shutdown = shutdown_tx.subscribe();
    let http = tokio::spawn(sluice_frontends::listen::serve_http(
        http_listener,
        sluice_frontends::http::router(state.clone()),
        conns,
        sluice_frontends::listen::HttpTimeouts {
            header: config.server.header_timeout,
            body: config.server.body_timeout,
        },
        async move {
            let _ = http_shutdown.recv().await;
        },
    ));
    tracing::info!(grpc = %addrs.grpc, http = %addrs.http, data_dir = %data_dir.display(), "sluice is ready");
    on_ready(addrs);

    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = shutdown_tx.send(());
    // Queries end at once, each with an error saying why: reads need no grace.
    state.query.shutdown();
    let deadline = config.server.shutdown_timeout;
    let finished = tokio::time::timeout(deadline, async {
        let _ = grpc.await;
        let _ = http.await;
    })
    .await;
    if finished.is_err() {
        tracing::warn!(timeout = ?deadline, "in-flight requests did not finish in time; cutting them off");
    }
    let _ = stop_tx.send(true);
    for t in sink_tasks {
        let _ = t.await;
    }
    tokio::task::spawn_blocking(move || wal.close())
        .await
        .map_err(Error::internal)?;
    tracing::info!("sluice stopped");
    Ok(())
}

/// The WAL position that holds every segment while the WAL is replayed into the recent
/// buffer (the archive, running meanwhile, would otherwise release them under the reader).
const REPLAY_HOLD: &str = "replay";

/// Registers `otel_logs` and `otel_traces` (`otlp.otel_tables`) unless they are there
/// already. A table of that name registered with other columns is not Sluice's to change:
/// the server refuses to start and says so.
async fn register_otel_tables(registry: &Registry) -> Result<()> {
    for table in flight_schema::seeds::otel_tables() {
        match registry.get(&table.name) {
            None => {
                registry.register(table).await?;
            }
            Some(t) if t.definition.columns == table.columns => {}
            Some(_) => {
                return Err(Error::InvalidArgument(format!(
                    "otlp.otel_tables: a table named '{}' is already registered with other \
                     columns; the OTLP doors cannot write the OpenTelemetry exporter's rows \
                     into it, and Sluice does not change a client's table. Turn \
                     otel_tables off to start",
                    table.name
                )))
            }
        }
    }
    Ok(())
}

/// Compacts the registry (versions no record in the WAL needs any more) whenever the WAL
/// has released segments, until `stop`.
async fn compact_registry(
    registry: Arc<Registry>,
    wal: Wal,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Segments are released from the oldest on: the first record on disk moves up.
    let mut first = wal.first_seq();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        let now = wal.first_seq();
        if now > first {
            if let Err(e) = registry.compact(&wal.oldest_versions()).await {
                tracing::warn!(error = %e, "cannot compact the registry");
            }
        }
        first = now;
    }
}

/// What every store sink's runner shares at start-up.
struct SinkSpawner {
    ctx: SinkContext,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl SinkSpawner {
    /// Starts a sink's runner; returns its status (for /readyz) and its task.
    fn spawn<W: StoreWriter>(
        &self,
        writer: W,
        opts: SinkOptions,
        journal: Option<PlanJournal>,
    ) -> (Arc<SinkStatus>, tokio::task::JoinHandle<()>) {
        let mut runner = SinkRunner::new(writer, self.ctx.clone(), opts);
        if let Some(j) = journal {
            runner = runner.with_journal(j);
        }
        let runner = Arc::new(runner);
        (runner.status(), tokio::spawn(runner.run(self.stop.clone())))
    }
}

/// How often a registry kept in PostgreSQL is re-read for tables other processes added.
const REGISTRY_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// Tries `attempt` every second for up to 30 s while a store is starting; the error
/// names the store and its config key.
async fn wait_for<T, E, F, Fut>(store: &str, key: &str, mut attempt: F) -> Result<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "{store} ({key}) is not reachable yet; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(Error::Unavailable(format!(
                    "cannot reach {store} at {key}: {e}"
                )))
            }
        }
    }
}

/// What start-up learned about the configured PostgreSQL.
struct PostgresInfo {
    url: String,
    timescale: bool,
}

/// Connects to PostgreSQL (waiting up to 30 s for it), applies the migrations when
/// `postgres.migrate_on_start` is set, and finds out whether TimescaleDB is there.
async fn prepare_postgres(url: &str, config: &Config) -> Result<PostgresInfo> {
    let mut client = wait_for("PostgreSQL", "postgres.url", || {
        sluice_sinks::postgres::connect(url)
    })
    .await?;
    if config.postgres.migrate_on_start {
        let report =
            sluice_sinks::postgres::migrate::migrate_with(&mut client, config.postgres.timescaledb)
                .await?;
        tracing::info!(applied = ?report.applied, timescaledb = report.timescaledb, "PostgreSQL migrations");
    }
    // TimescaleDB's path: the extension is on and metrics_points is a hypertable rather
    // than the plain path's partitioned table (a database keeps the path it was
    // migrated on).
    let partitioned = client
        .query_opt(
            "SELECT 1 FROM pg_class WHERE oid = to_regclass('metrics_points') AND relkind = 'p'",
            &[],
        )
        .await
        .map_err(|e| Error::Unavailable(format!("PostgreSQL: {e}")))?
        .is_some();
    let timescale =
        !partitioned && sluice_sinks::postgres::migrate::timescaledb_enabled(&client).await?;
    sluice_sinks::postgres::maintenance::run_once(&client, &config.postgres, chrono::Utc::now())
        .await?;
    tracing::info!(timescale, "PostgreSQL sink enabled");
    Ok(PostgresInfo {
        url: url.to_string(),
        timescale,
    })
}

/// Reaches ClickHouse (waiting up to 30 s for it) and applies the migrations when
/// `clickhouse.migrate_on_start` is set.
async fn prepare_clickhouse(config: &Config) -> Result<sluice_sinks::clickhouse::client::ChClient> {
    let client = sluice_sinks::clickhouse::client::ChClient::new(&config.clickhouse)
        .map_err(|e| Error::InvalidArgument(format!("clickhouse: {e}")))?;
    wait_for("ClickHouse", "clickhouse.url", || client.ping()).await?;
    if config.clickhouse.migrate_on_start {
        let report = sluice_sinks::clickhouse::migrate::migrate(&client).await?;
        tracing::info!(applied = ?report.applied, "ClickHouse migrations");
        sluice_sinks::clickhouse::migrate::set_dedup_window(
            &client,
            config.clickhouse.dedup_window,
        )
        .await?;
    }
    tracing::info!("ClickHouse sink enabled");
    Ok(client)
}

/// The highest WAL sequence number the archive or a store has recorded for this data
/// directory's WAL. The WAL numbers new records above it, so that a WAL which lost its
/// newest records never hands out a number a store already took for another record.
pub async fn wal_floor(
    config: &Config,
    store: &dyn object_store::ObjectStore,
    wal_dir: &std::path::Path,
) -> Result<u64> {
    let mut floor = archive::archived_floor(store).await?;
    let Some(id) = sluice_wal::scan::peek_id(wal_dir) else {
        return Ok(floor);
    };
    if let Some(url) = &config.postgres.url {
        let client = sluice_sinks::postgres::connect(url).await.map_err(|e| {
            Error::Unavailable(format!("cannot connect to PostgreSQL at postgres.url: {e}"))
        })?;
        // A database not migrated yet has no offsets.
        let has_offsets = client
            .query_opt(
                "SELECT 1 FROM pg_class WHERE oid = to_regclass('sluice.sluice_sink_offsets')",
                &[],
            )
            .await
            .map_err(|e| Error::Unavailable(format!("PostgreSQL: {e}")))?
            .is_some();
        if has_offsets {
            floor = floor.max(sluice_sinks::postgres::sink::highest_committed(&client, &id).await?);
        }
    }
    if config.clickhouse.url.is_some() {
        let journal = PlanJournal::new(wal_dir.join("clickhouse.plans"));
        floor = floor.max(journal.highest_seq().map_err(Error::from)?);
    }
    Ok(floor)
}

/// An exclusive lock on the data directory (`flock` on `<data_dir>/LOCK`), released when
/// dropped or when the process ends, however it ends.
pub struct DataDirLock {
    /// Holds the lock while open.
    _file: std::fs::File,
}

impl DataDirLock {
    /// Creates the directory if needed and locks it; fails at once, naming the other user,
    /// if another process holds it.
    pub fn acquire(data_dir: &std::path::Path, what: &str) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(data_dir).map_err(|e| {
            Error::Internal(format!(
                "cannot create data_dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join("LOCK");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::Internal(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor this File owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::FailedPrecondition(format!(
                "data_dir {} is in use by another sluice process ({}); stop it first",
                data_dir.display(),
                holder.trim()
            )));
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "sluice {what}, pid {}", std::process::id());
        Ok(Self { _file: file })
    }
}

/// Binds a listener; the error names the config key.
async fn listen(key: &str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot listen on {key} {addr}: {e}")))
}

/// Replays WAL records the archive does not hold yet into the recent buffer.
async fn replay(
    wal: &Wal,
    registry: &Registry,
    buffers: &Buffers,
    memory: &MemoryBudget,
) -> Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let records = wal.replay();
    let reader = tokio::task::spawn_blocking(move || {
        for r in records {
            if tx.blocking_send(r).is_err() {
                break;
            }
        }
    });
    let (mut replayed, mut skipped, mut rows) = (0u64, 0u64, 0u64);
    while let Some(record) = rx.recv().await {
        let record = record?;
        let archived = buffers
            .table(&record.table)
            .lock()
            .expect("table lock")
            .archived_seq;
        if record.seq <= archived {
            skipped += 1;
            continue;
        }
        let table = registry
            .get_version(&record.table, record.version)
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "WAL record {} is for table '{}' version {}, which the registry does not \
                     have (an entry left out as unreadable? the log says which): the start \
                     stops rather than skip acknowledged rows; restore the registry entry",
                    record.seq, record.table, record.version
                ))
            })?;
        let batch = record.decode(table.arrow_schema.clone()).map_err(|e| {
            Error::Internal(format!("WAL record {} cannot be decoded: {e}", record.seq))
        })?;
        let bytes = sluice_core::buffer::data_size(&batch);
        let charge = memory.charge(bytes).await;
        rows += batch.num_rows() as u64;
        // Skipped if the archive, running meanwhile, has taken the record already.
        if buffers.push(&record.table, record.seq, batch, bytes as u64, charge) {
            replayed += 1;
        } else {
            skipped += 1;
        }
    }
    reader.await.map_err(Error::internal)?;
    if replayed + skipped > 0 {
        tracing::info!(replayed, skipped, rows, "WAL replayed");
    }
    Ok(())
}
