//! The first stage: the sink's reader of the WAL, from its registered position on.
//! Records come from the WAL's in-memory feed while the sink keeps up, from disk when it
//! does not; reading from disk runs on a blocking thread.

use std::time::Duration;

use sluice_wal::{Wal, WalError, WalRecord, WalTail};
use tokio::sync::watch;

/// Most bytes of records one read returns.
const READ_BYTES: usize = 32 << 20;

/// The tail stage; see the module doc.
pub struct TailReader {
    wal: Wal,
    /// Taken while a read runs on a blocking thread.
    tail: Option<WalTail>,
}

impl TailReader {
    /// A reader of the records after `after_seq`.
    pub fn new(wal: Wal, after_seq: u64) -> Self {
        let tail = Some(wal.tail(after_seq));
        Self { wal, tail }
    }

    /// The next records that are durable (none at the end of the WAL).
    pub async fn read(&mut self) -> Result<Vec<WalRecord>, WalError> {
        let mut t = self.tail.take().expect("the tail is back after every read");
        let (t, read) = tokio::task::spawn_blocking(move || {
            let r = t.read(READ_BYTES);
            (t, r)
        })
        .await
        .expect("WAL reader thread");
        self.tail = Some(t);
        read
    }

    /// Waits up to `wait` for more records to become durable, unless some did since the
    /// last read (a commit between the read and the wait would not wake it) or shutdown
    /// comes first.
    pub async fn wait(&self, wait: Duration, shutdown: &mut watch::Receiver<bool>) {
        let next = self.tail.as_ref().map_or(0, |t| t.next_seq());
        if self.wal.last_seq() < next {
            tokio::select! {
                _ = self.wal.wait_durable(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
