//! Bounded memory: a client streams ten times the memory budget as fast as it can into a
//! server whose archive is slowed down; resident memory stays within the budget plus a
//! fixed overhead, every row arrives, and the memory is given back once ingest pauses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

use crate::common::*;
use futures::StreamExt;

const BUDGET_MIB: u64 = 64;
/// Fixed overhead beyond the budget, on top of the resident size right after start:
/// the HTTP/2 receive window (16 MiB per connection, 8 MiB per stream), the one decoded
/// batch a DoPut holds before it is charged, the Parquet encoder of a flush, and allocator
/// slack. Measured growth on this machine: 108 MiB for a 64 MiB budget (44 MiB overhead;
/// jemalloc as configured in main.rs).
const OVERHEAD_MIB: u64 = 56;
/// Freed memory sluice keeps for reuse (`memory.keep_freed`, by default an eighth of the
/// budget), beyond both.
const KEEP_FREED_MIB: u64 = BUDGET_MIB / 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_budget_under_a_fast_client_and_slow_sink() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(
        dir.path(),
        &[
            ("MEMORY__BUDGET", "64MiB"),
            ("SERVER__MAX_MESSAGE_SIZE", "8MiB"),
            ("BUFFER__MAX_BYTES", "16MiB"),
            ("ARCHIVE__THROTTLE_BYTES_PER_SEC", "48MiB"),
            ("WAL__FSYNC", "false"),
        ],
    );
    let mut client = server.flight().await;
    action(
        &mut client,
        "register_table",
        r#"{"name":"mem","columns":[{"name":"time","type":"timestamp"},{"name":"id","type":"int64"},{"name":"payload","type":"string"}]}"#,
    )
    .await
    .unwrap();
    let baseline_kb = server.proc_status_kb("VmRSS");

    // ~2 MiB batches, 10x the budget in total.
    let rows_per_batch = 8192i64;
    let payload = "x".repeat(240);
    let batch_bytes = rows_per_batch as u64 * (240 + 16);
    let n_batches = (10 * BUDGET_MIB * 1024 * 1024).div_ceil(batch_bytes) as i64;
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("id", DataType::Int64, true),
        Field::new("payload", DataType::Utf8, true),
    ]));
    let now = chrono::Utc::now().timestamp_micros();
    let batches = futures::stream::iter(0..n_batches).map(move |b| {
        let ids: Vec<i64> = (b * rows_per_batch..(b + 1) * rows_per_batch).collect();
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(ids.iter().map(|i| now + i))
                        .with_timezone("UTC"),
                ),
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                    payload.as_str(),
                    rows_per_batch as usize,
                ))),
            ],
        )
        .unwrap()
    });

    // Sample resident memory while streaming.
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pid = server.child.id();
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kb) = t
                        .lines()
                        .find(|l| l.starts_with("VmRSS"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        peak.fetch_max(kb, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = std::time::Instant::now();
    let out = put_stream(&mut client, "mem", batches).await;
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.rows(), (n_batches * rows_per_batch) as u64);

    let hwm_kb = server.proc_status_kb("VmHWM");
    let peak_kb = peak.load(Ordering::Relaxed).max(hwm_kb);
    let growth_mib = peak_kb.saturating_sub(baseline_kb) / 1024;
    eprintln!(
        "memory test: streamed {} MiB in {:.1} s; baseline RSS {} MiB, peak RSS {} MiB, growth {} MiB (budget {} MiB + overhead {} MiB + kept freed {} MiB)",
        (n_batches as u64 * batch_bytes) >> 20,
        elapsed.as_secs_f64(),
        baseline_kb / 1024,
        peak_kb / 1024,
        growth_mib,
        BUDGET_MIB,
        OVERHEAD_MIB,
        KEEP_FREED_MIB
    );
    assert!(
        growth_mib <= BUDGET_MIB + OVERHEAD_MIB + KEEP_FREED_MIB,
        "resident memory grew by {growth_mib} MiB, over the budget {BUDGET_MIB} MiB + overhead {OVERHEAD_MIB} MiB + kept freed {KEEP_FREED_MIB} MiB"
    );
    // The throttled archive could not have kept up without backpressure.
    assert!(
        elapsed >= Duration::from_secs(5),
        "streamed too fast for a throttled sink: {elapsed:?}"
    );
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM mem").await,
        n_batches * rows_per_batch
    );

    // Freed pages are kept for reuse while data flows, and given back once ingest pauses
    // (sluice::allocator, 10 s of stillness): at least half of the growth goes.
    let half = baseline_kb + (peak_kb - baseline_kb) / 2;
    eventually(
        Duration::from_secs(40),
        "resident memory falls after a pause",
        || {
            let rss = server.proc_status_kb("VmRSS");
            async move { rss < half }
        },
    )
    .await;
}
