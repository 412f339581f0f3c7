//! Start-up, serving and graceful shutdown.
//!
//! Start: registry → archive manifests (orphan files removed) → WAL check → archiver
//! task → WAL replay into the recent buffer (records the archive already holds are
//! skipped, so nothing is duplicated) → listeners → one `SLUICE_READY` line on stdout.
//! Shutdown (SIGTERM/SIGINT): listeners stop taking new calls, in-flight calls finish
//! (their acks are sent) within `server.shutdown_timeout`, the archiver stops and the WAL
//! writer syncs and exits. Buffered rows stay in the WAL and are replayed on next start.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use sluice_sql::query::QueryEngine;
use tokio::net::TcpListener;

use crate::archive::{self, Archiver};
use crate::buffer::{Buffers, MemoryBudget};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::flight::FlightFrontEnd;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::registry::{FileRegistryStore, Registry};
use crate::state::{AppState, Readiness};
use crate::wal::{Wal, WalOptions};

struct ServerReadiness {
    archiver: Arc<Archiver>,
    wal: Wal,
    memory: Arc<MemoryBudget>,
    buffers: Arc<Buffers>,
}

impl Readiness for ServerReadiness {
    fn readiness(&self) -> (bool, serde_json::Value) {
        let (segments, bytes) = self.wal.disk_usage();
        let last_error = self.archiver.last_error.lock().expect("error lock").clone();
        let (mut rows, mut oldest) = (0u64, 0u64);
        for t in self.buffers.table_names() {
            let state = self.buffers.table(&t);
            let s = state.lock().expect("table lock");
            rows += s.rows;
            oldest = oldest.max(s.oldest.map_or(0, |o| o.elapsed().as_secs()));
        }
        let ready = last_error.is_none();
        (
            ready,
            serde_json::json!({
                "ready": ready,
                "wal": {"segments": segments, "bytes": bytes, "last_seq": self.wal.last_seq()},
                "memory": {"used_fraction": self.memory.used_fraction()},
                "sinks": {"archive": {
                    "state": if last_error.is_none() { "ok" } else { "retrying" },
                    "last_error": last_error,
                    "lag_rows": rows,
                    "lag_seconds": oldest,
                }},
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
    std::fs::create_dir_all(&data_dir).map_err(|e| {
        Error::Internal(format!(
            "cannot create data_dir {}: {e}",
            data_dir.display()
        ))
    })?;

    let registry = Arc::new(Registry::open(Box::new(FileRegistryStore::open(&data_dir)?)).await?);
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
    };
    let wal = {
        let m = metrics.clone();
        tokio::task::spawn_blocking(move || Wal::open(wal_opts, m))
            .await
            .map_err(Error::internal)??
    };
    let archiver = Arc::new(Archiver {
        store: store.clone(),
        buffers: buffers.clone(),
        registry: registry.clone(),
        wal: wal.clone(),
        metrics: metrics.clone(),
        cfg: config.archive.clone(),
        limits: config.buffer.clone(),
        memory: memory.clone(),
        replaying: AtomicBool::new(true),
        last_error: Default::default(),
    });
    archiver.recover().await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let archiver_task = tokio::spawn(archiver.clone().run(stop_rx));

    replay(&wal, &registry, &buffers, &memory).await?;
    archiver.replaying.store(false, Ordering::Release);
    archiver.release_wal();

    let query = Arc::new(QueryEngine::new(buffers.clone(), store, store_url));
    let pipeline = Arc::new(Pipeline {
        registry: registry.clone(),
        buffers: buffers.clone(),
        memory: memory.clone(),
        wal: wal.clone(),
        wal_compression: config.wal.compression.ipc(),
        metrics: metrics.clone(),
    });
    let state = Arc::new(AppState {
        ingest: pipeline,
        registry,
        query,
        metrics,
        readiness: Arc::new(ServerReadiness {
            archiver: archiver.clone(),
            wal: wal.clone(),
            memory,
            buffers,
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
    let mut grpc_shutdown = shutdown_tx.subscribe();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .tcp_nodelay(true)
            // Let clients send big HTTP/2 DATA frames: fewer frames per batch.
            .max_frame_size(Some(1 << 20))
            .add_service(flight)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                async move {
                    let _ = grpc_shutdown.recv().await;
                },
            ),
    );
    let mut http_shutdown = shutdown_tx.subscribe();
    let http = tokio::spawn(
        axum::serve(http_listener, crate::http::router(state.clone()))
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.recv().await;
            })
            .into_future(),
    );
    tracing::info!(grpc = %addrs.grpc, http = %addrs.http, data_dir = %data_dir.display(), "sluice is ready");
    on_ready(addrs);

    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = shutdown_tx.send(());
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
    let _ = archiver_task.await;
    tokio::task::spawn_blocking(move || wal.close())
        .await
        .map_err(Error::internal)?;
    tracing::info!("sluice stopped");
    Ok(())
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
                Error::Internal(format!(
                    "WAL record {} is for table '{}' version {}, which the registry does not have",
                    record.seq, record.table, record.version
                ))
            })?;
        let batch = record.decode(table.arrow_schema.clone()).map_err(|e| {
            Error::Internal(format!("WAL record {} cannot be decoded: {e}", record.seq))
        })?;
        let bytes = crate::buffer::data_size(&batch);
        let charge = memory.charge(bytes).await;
        rows += batch.num_rows() as u64;
        buffers.push(&record.table, record.seq, batch, bytes as u64, charge);
        replayed += 1;
    }
    reader.await.map_err(Error::internal)?;
    if replayed + skipped > 0 {
        tracing::info!(replayed, skipped, rows, "WAL replayed");
    }
    Ok(())
}
