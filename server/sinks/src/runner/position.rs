//! The last stage: which records a sink still owes its store ([`Tracker`]), the position
//! that follows from it (published to the WAL, which releases segments below every
//! sink's position), and the sink's state for `/readyz` and `/metrics` ([`SinkStatus`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use sluice_core::metrics::Metrics;

/// State of one sink, for `/readyz` and `/metrics`.
pub struct SinkStatus {
    pub name: &'static str,
    inner: Mutex<StatusInner>,
}

struct StatusInner {
    up: bool,
    started: bool,
    last_error: Option<String>,
    retries: u64,
    since: Instant,
    position: u64,
    oldest_pending: Option<Instant>,
    /// Tables whose rows the store refuses for good (see [`super::Written::table_error`]).
    table_errors: BTreeMap<String, String>,
}

impl SinkStatus {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            inner: Mutex::new(StatusInner {
                up: false,
                started: false,
                last_error: None,
                retries: 0,
                since: Instant::now(),
                position: 0,
                oldest_pending: None,
                table_errors: BTreeMap::new(),
            }),
        }
    }

    pub(crate) fn set_up(&self, metrics: &Metrics) {
        let mut s = self.inner.lock().expect("sink status");
        if !s.up || !s.started {
            s.since = Instant::now();
        }
        s.up = true;
        s.started = true;
        s.last_error = None;
        metrics.sink_up.with_label_values(&[self.name]).set(1);
    }

    /// Records a failure; true if the sink was up until now (worth a warning; repeats
    /// of the same outage are logged at debug level).
    pub(crate) fn set_retrying(&self, metrics: &Metrics, error: &str) -> bool {
        let mut s = self.inner.lock().expect("sink status");
        let was_up = s.up || !s.started;
        if s.up || !s.started {
            s.since = Instant::now();
        }
        s.up = false;
        s.started = true;
        s.retries += 1;
        s.last_error = Some(error.to_string());
        metrics.sink_up.with_label_values(&[self.name]).set(0);
        metrics.sink_retries.with_label_values(&[self.name]).inc();
        was_up
    }

    /// Notes (or clears) a table the store refuses; true when the error is new, so it is
    /// logged once rather than per chunk.
    pub(super) fn set_table_error(
        &self,
        metrics: &Metrics,
        table: &str,
        error: Option<&str>,
    ) -> bool {
        let mut s = self.inner.lock().expect("sink status");
        let changed = match error {
            Some(e) => s.table_errors.get(table).map(String::as_str) != Some(e),
            None => s.table_errors.contains_key(table),
        };
        match error {
            Some(e) => s.table_errors.insert(table.to_string(), e.to_string()),
            None => s.table_errors.remove(table),
        };
        metrics
            .sink_failed_tables
            .with_label_values(&[self.name])
            .set(s.table_errors.len() as i64);
        changed
    }

    /// The sink's WAL position and when the oldest record it still owes was read.
    pub(crate) fn set_position(&self, position: u64, oldest_pending: Option<Instant>) {
        let mut s = self.inner.lock().expect("sink status");
        s.position = position;
        s.oldest_pending = oldest_pending;
    }

    /// Whether the store refuses some table for good.
    pub fn has_table_errors(&self) -> bool {
        !self
            .inner
            .lock()
            .expect("sink status")
            .table_errors
            .is_empty()
    }

    /// Whether the sink has failed since its last success (starting is not failing).
    pub fn is_failing(&self) -> bool {
        let s = self.inner.lock().expect("sink status");
        s.started && !s.up
    }

    /// Whether the sink's last attempt succeeded.
    pub fn is_up(&self) -> bool {
        self.inner.lock().expect("sink status").up
    }

    /// JSON for `/readyz`.
    pub fn json(&self, wal_last_seq: u64) -> serde_json::Value {
        let s = self.inner.lock().expect("sink status");
        let state = match (s.started, s.up) {
            (false, _) => "starting",
            (true, true) => "ok",
            (true, false) => "retrying",
        };
        serde_json::json!({
            "state": state,
            "for_seconds": s.since.elapsed().as_secs(),
            "last_error": s.last_error,
            "retries": s.retries,
            "wal_position": s.position,
            "lag_records": wal_last_seq.saturating_sub(s.position),
            "lag_seconds": s.oldest_pending.map_or(0.0, |o| o.elapsed().as_secs_f64()),
            "failed_tables": s.table_errors,
        })
    }
}

/// Which records a sink still owes its store.
#[derive(Default)]
pub struct Tracker {
    /// Seq → when it was read.
    pending: BTreeMap<u64, Instant>,
    /// Everything up to here has been read.
    pub(super) read_upto: u64,
}

impl Tracker {
    /// A record read and owed to the store.
    pub(super) fn owe(&mut self, seq: u64) {
        self.pending.insert(seq, Instant::now());
    }

    /// Records the store now holds.
    pub(super) fn paid(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            self.pending.remove(&seq);
        }
    }

    /// When the oldest record still owed was read.
    pub(super) fn oldest(&self) -> Option<Instant> {
        self.pending.first_key_value().map(|(_, at)| *at)
    }

    /// Every record up to this seq is durable in the store (or not routed to it).
    pub fn position(&self) -> u64 {
        self.pending
            .first_key_value()
            .map_or(self.read_upto, |(s, _)| s - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_is_below_the_oldest_pending_record() {
        let mut t = Tracker {
            read_upto: 50,
            ..Default::default()
        };
        assert_eq!(t.position(), 50);
        t.owe(12);
        t.owe(30);
        assert_eq!(t.position(), 11);
        t.paid([12]);
        assert_eq!(t.position(), 29);
        t.paid([30]);
        assert_eq!(t.position(), 50);
        assert!(t.oldest().is_none());
    }

    #[test]
    fn status_says_retrying_once_per_outage_and_names_refused_tables() {
        let metrics = Metrics::new();
        let s = SinkStatus::new("postgres");
        assert_eq!(s.json(0)["state"], "starting");
        assert!(
            s.set_retrying(&metrics, "connection refused"),
            "first failure is news"
        );
        assert!(
            !s.set_retrying(&metrics, "connection refused"),
            "a repeat is not"
        );
        assert_eq!(s.json(0)["state"], "retrying");
        assert_eq!(s.json(0)["last_error"], "connection refused");
        s.set_up(&metrics);
        assert!(s.is_up());
        assert!(s.set_table_error(&metrics, "t", Some("bad column")));
        assert!(!s.set_table_error(&metrics, "t", Some("bad column")));
        assert!(s.has_table_errors());
        assert_eq!(s.json(7)["failed_tables"]["t"], "bad column");
        assert!(s.set_table_error(&metrics, "t", None));
        assert!(!s.has_table_errors());
    }
}
