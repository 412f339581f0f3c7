//! The WAL's own Prometheus metrics (`sluice_wal_*`): the WAL updates them, whoever serves
//! `/metrics` registers them ([`WalMetrics::register`]).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Handles to the WAL's metrics; cheap to clone (prometheus handles share their value).
#[derive(Clone)]
pub struct WalMetrics {
    /// Bytes in WAL segments on disk.
    pub bytes: IntGauge,
    /// WAL segment files on disk.
    pub segments: IntGauge,
    /// Bytes appended to the WAL.
    pub written_bytes: IntCounter,
    /// Group commits (one fsync each when fsync is on).
    pub fsyncs: IntCounter,
    /// Records tail readers took, by `source` (`memory` or `disk`).
    pub tail_records: IntCounterVec,
    /// The last durable sequence number.
    pub last_seq: IntGauge,
}

impl WalMetrics {
    /// The metrics, not registered anywhere (tests, tools).
    pub fn unregistered() -> Self {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        Self {
            bytes: gauge("sluice_wal_bytes", "Bytes in WAL segments on disk"),
            segments: gauge("sluice_wal_segments", "WAL segment files on disk"),
            written_bytes: counter(
                "sluice_wal_written_bytes_total",
                "Bytes appended to the WAL",
            ),
            fsyncs: counter(
                "sluice_wal_fsyncs_total",
                "Group commits (one fsync each when fsync is on)",
            ),
            tail_records: IntCounterVec::new(
                Opts::new(
                    "sluice_wal_tail_records_total",
                    "WAL records the store sinks read, from the in-memory feed or from disk",
                ),
                &["source"],
            )
            .expect("valid metric"),
            last_seq: gauge("sluice_wal_last_seq", "Last durable WAL sequence number"),
        }
    }

    /// The metrics, registered in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self::unregistered();
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.segments.clone()))?;
        registry.register(Box::new(m.written_bytes.clone()))?;
        registry.register(Box::new(m.fsyncs.clone()))?;
        registry.register(Box::new(m.tail_records.clone()))?;
        registry.register(Box::new(m.last_seq.clone()))?;
        Ok(m)
    }
}
