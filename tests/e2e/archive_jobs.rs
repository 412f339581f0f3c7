//! The archive's compaction and retention through the real binary: queries running all
//! the while see every row exactly once, before, during and after small files are merged
//! and the old ones deleted, and after a restart.

use std::time::{Duration, Instant};

use crate::common::*;

/// `count(*)`, `count(DISTINCT id)` and `sum(id)` of `events` over HTTP.
async fn totals(server: &Sluice) -> (i64, i64, i64) {
    let r = get_rows(
        server,
        "SELECT count(*) AS n, count(DISTINCT id) AS d, sum(id) AS s FROM events",
    )
    .await;
    let r = &r[0];
    (
        r["n"].as_i64().unwrap(),
        r["d"].as_i64().unwrap(),
        r["s"].as_i64().unwrap(),
    )
}

fn parquet_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_never_shows_a_row_twice_or_loses_one() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        // One archive file per 100-row batch.
        ("BUFFER__MAX_ROWS", "100"),
        ("ARCHIVE__MAINTENANCE_INTERVAL", "300ms"),
        ("ARCHIVE__COMPACT_MIN_FILES", "2"),
        // Old files are deleted query.timeout + 10 s after they were replaced.
        ("QUERY__TIMEOUT", "2s"),
    ];
    let server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let batches: Vec<_> = (0..40).map(|i| events_batch(i, 100)).collect();
    assert_eq!(put(&mut client, "events", batches).await.rows(), 4000);
    let want = (4000, 4000, (0..4000i64).sum::<i64>());
    let archive = dir.path().join("archive/events");
    let metrics = server.url("/metrics");
    // Queries all the while, until the merged files took over and the old ones are gone.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut polls = 0;
    loop {
        assert_eq!(totals(&server).await, want, "after {polls} queries");
        polls += 1;
        let m = get_text(&metrics).await;
        let merged = metric(
            &m,
            r#"sluice_archive_compacted_files_total{table="events"}"#,
        );
        if merged >= 30.0 && parquet_files(&archive) <= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "compaction did not finish: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        polls > 20,
        "queries ran while files were replaced ({polls})"
    );
    let mut server = server;
    assert!(server.terminate().success());
    let server = Sluice::start(dir.path(), &env);
    assert_eq!(totals(&server).await, want, "after a restart");
    assert!(parquet_files(&archive) <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_hours_past_it_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(
        dir.path(),
        &[
            ("BUFFER__MAX_ROWS", "100"),
            ("ARCHIVE__MAINTENANCE_INTERVAL", "300ms"),
            ("ARCHIVE__RETENTION", "2h"),
        ],
    );
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    // Rows of now, and rows timestamped three hours ago.
    let old: Vec<_> = (0..3)
        .map(|i| {
            let b = events_batch(i, 100);
            let shifted = arrow::compute::kernels::numeric::sub(
                b.column(0),
                &arrow::array::DurationMicrosecondArray::new_scalar(3 * 3_600_000_000),
            )
            .unwrap();
            arrow::array::RecordBatch::try_new(b.schema(), vec![shifted, b.column(1).clone()])
                .unwrap()
        })
        .collect();
    put(&mut client, "events", old).await;
    put(&mut client, "events", vec![events_batch(10, 100)]).await;
    let m = server.url("/metrics");
    eventually(Duration::from_secs(30), "old hours dropped", || async {
        metric(
            &get_text(&m).await,
            r#"sluice_archive_expired_files_total{table="events"}"#,
        ) >= 3.0
    })
    .await;
    let (n, _, s) = totals(&server).await;
    assert_eq!(
        (n, s),
        (100, (1000..1100i64).sum::<i64>()),
        "the recent rows stay"
    );
}
