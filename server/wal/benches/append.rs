//! Criterion bench of the WAL's append path: 64 entries of 8,192 `metrics_events` rows each
//! (Arrow IPC, as the pipeline hands them over) appended and waited for, per iteration.
//! fsync and direct I/O are off, so the figure is the WAL's own cost (framing, crc32,
//! group commit hand-off, the write into the page cache), not the disk's; segments are
//! released after every iteration so the disk does not fill. Throughput is in bytes
//! appended. `cargo bench -p sluice-wal --bench append`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_wal::{encode_ipc, Wal, WalEntry, WalMetrics, WalOptions};
use tokio::sync::oneshot;

const ROWS: usize = 8_192;
const ENTRIES: usize = 64;

fn append(c: &mut Criterion) {
    let table = sluice_test_support::batches::seed("metrics_events");
    let batch = sluice_test_support::batches::sample(&table, ROWS, 11);
    let (header, body) = encode_ipc(&batch, None).expect("encodes");
    let (header, body) = (bytes::Bytes::from(header), bytes::Bytes::from(body));
    let dir = tempfile::tempdir().expect("temp dir");
    let wal = Wal::open(
        WalOptions {
            dir: dir.path().join("wal"),
            fsync: false,
            segment_size: 64 << 20,
            max_group_bytes: 64 << 20,
            feed_bytes: 0,
            direct_io: false,
        },
        WalMetrics::unregistered(),
        0,
    )
    .expect("opens");
    let name: Arc<str> = Arc::from("metrics_events");

    let mut group = c.benchmark_group("wal");
    group.throughput(Throughput::Bytes(
        (ENTRIES * (header.len() + body.len())) as u64,
    ));
    group.bench_function("append_64x8k_rows", |b| {
        b.iter(|| {
            let mut replies = Vec::with_capacity(ENTRIES);
            for _ in 0..ENTRIES {
                let (tx, rx) = oneshot::channel();
                wal.append(WalEntry {
                    table: name.clone(),
                    version: 1,
                    ipc_header: header.clone(),
                    ipc_body: body.clone(),
                    batch: None,
                    ticket: None,
                    reply: tx,
                })
                .expect("appends");
                replies.push(rx);
            }
            let mut last = 0;
            for rx in replies {
                last = rx.blocking_recv().expect("answered").expect("durable");
            }
            wal.release_upto(last);
            black_box(last)
        })
    });
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
