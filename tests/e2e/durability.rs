//! kill -9 while a client streams, restart, and every acknowledged row is there exactly
//! once, in SQL results and in the Parquet archive.

use std::path::Path;
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;

use crate::common::*;
use futures::StreamExt;

const BATCH: i64 = 1000;

fn batch(i: i64) -> RecordBatch {
    events_batch(i, BATCH)
}

fn archive_ids(data_dir: &Path) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut stack = vec![data_dir.join("archive/events")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let file = std::fs::File::open(&p).unwrap();
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 8192)
                        .unwrap();
                for b in reader {
                    let b = b.unwrap();
                    ids.extend(
                        b.column_by_name("id")
                            .unwrap()
                            .as_primitive::<Int64Type>()
                            .values()
                            .iter(),
                    );
                }
            }
        }
    }
    ids
}

/// Waits (max_age is short in these tests) until the buffer has drained to the archive,
/// then checks the Parquet files hold `rows_in_sql` rows, every acked one once.
async fn assert_archive_holds_each_once(
    server: &Sluice,
    data_dir: &Path,
    rows_in_sql: usize,
    acked: &[i64],
    rows: i64,
) {
    let url = server.url("/metrics");
    eventually(
        Duration::from_secs(60),
        "the buffer to drain to the archive",
        || async {
            get_text(&url)
                .await
                .contains(r#"sluice_buffer_rows{table="events"} 0"#)
        },
    )
    .await;
    let archived = archive_ids(data_dir);
    assert_eq!(
        archived.len(),
        rows_in_sql,
        "archive and SQL hold the same rows"
    );
    assert_each_acked_once("archive", &archived, acked, rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Small buffer bounds so archive flushes happen while the client streams.
    let env = [("BUFFER__MAX_ROWS", "20000"), ("WAL__SEGMENT_SIZE", "1MiB")];
    let mut server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();

    let mut acked = stream_until_killed(&mut server, 0, 60, BATCH).await;
    // Second round: restart (replays the WAL), stream more, kill again.
    let mut server = Sluice::start(dir.path(), &env);
    acked.extend(stream_until_killed(&mut server, 100_000, 45, BATCH).await);
    assert!(acked.len() >= 105);

    let server = Sluice::start(dir.path(), &[("BUFFER__MAX_AGE", "1s")]);
    let mut client = server.flight().await;
    let ids = event_ids(&server).await;
    assert_each_acked_once("SQL", &ids, &acked, BATCH);

    // Everything reaches the archive (max_age 1s), each row once.
    assert_archive_holds_each_once(&server, dir.path(), ids.len(), &acked, BATCH).await;
    // And SQL still answers the same after the move to Parquet.
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM events").await as usize,
        ids.len()
    );
    assert_eq!(
        query_i64(&mut client, "SELECT count(DISTINCT id) FROM events").await as usize,
        ids.len()
    );
    // WAL segments are released once archived: only the live segment remains.
    let m = get_text(&server.url("/metrics")).await;
    assert!(m.contains("sluice_wal_segments 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_keeps_buffered_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Sluice::start(dir.path(), &[]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let out = put(&mut client, "events", (0..5).map(batch).collect()).await;
    assert_eq!(out.rows(), 5 * BATCH as u64);
    assert!(server.terminate().success());
    let server = Sluice::start(dir.path(), &[]);
    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(DISTINCT id) FROM events").await,
        5 * BATCH
    );
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM events").await,
        5 * BATCH
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_finishes_the_call_and_its_acks() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Sluice::start(dir.path(), &[("SERVER__SHUTDOWN_TIMEOUT", "20s")]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();

    // A slow client: 40 batches, 50 ms apart; SIGTERM arrives after the fifth ack.
    let stream = futures::stream::iter(0..40i64).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        batch(i)
    });
    let (put, mut rx) = spawn_put(client, "events", stream);
    let mut acked = 0u64;
    for _ in 0..5 {
        acked += rx.recv().await.expect("early acks")["rows"]
            .as_u64()
            .unwrap();
    }
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(server.child.id().to_string())
        .status();
    let error = put.await.unwrap();
    assert!(
        error.is_none(),
        "the call in flight is finished, not cut off: {error:?}"
    );
    while let Ok(ack) = rx.try_recv() {
        acked += ack["rows"].as_u64().unwrap();
    }
    assert_eq!(
        acked,
        40 * BATCH as u64,
        "every batch of the call in flight is acked"
    );
    assert!(server.terminate().success());

    let server = Sluice::start(dir.path(), &[]);
    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(DISTINCT id) FROM events").await,
        40 * BATCH
    );
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM events").await,
        40 * BATCH
    );
}

/// kill -9 while the WAL is being replayed into the recent buffer and the archive, running
/// meanwhile, is writing replayed records to Parquet; then again after the restart: every
/// acknowledged row is there once, in SQL and in the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_replay_while_the_archive_runs_keeps_every_ack_once() {
    const ROWS: i64 = 50_000;
    const BATCHES: i64 = 50;
    let dir = tempfile::tempdir().unwrap();
    // 1. 50 batches of 50,000 rows (40 MB decoded) acked and left in the WAL: the buffer
    //    bounds are far off, so nothing is archived before the kill.
    {
        let mut server = Sluice::start(dir.path(), &[("WAL__SEGMENT_SIZE", "4MiB")]);
        let mut client = server.flight().await;
        action(&mut client, "register_table", EVENTS).await.unwrap();
        let out = put(
            &mut client,
            "events",
            (0..BATCHES).map(|i| events_batch(i, ROWS)).collect(),
        )
        .await;
        assert_eq!(out.rows(), (BATCHES * ROWS) as u64);
        server.kill9();
    }
    assert!(archive_ids(dir.path()).is_empty(), "nothing archived yet");

    // 2. Restart with a 16 MiB memory budget and a slow archive (8 MiB/s): the replay can
    //    only go on as the archive frees memory, so it takes seconds. Killed once the
    //    archive has written some of it, before the server is ready (the replay not done).
    let slow = [
        ("WAL__SEGMENT_SIZE", "4MiB"),
        ("MEMORY__BUDGET", "16MiB"),
        ("SERVER__MAX_MESSAGE_SIZE", "8MiB"),
        ("BUFFER__MAX_BYTES", "2MiB"),
        ("ARCHIVE__THROTTLE_BYTES_PER_SEC", "8MiB"),
    ];
    let mut child = sluice_command(dir.path(), &slow)
        .arg("serve")
        .arg("--config")
        .arg(example_config())
        .env("SLUICE__SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("SLUICE__SERVER__HTTP_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let stdout = child.stdout.take().unwrap();
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = ready.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("SLUICE_READY") {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while archive_ids(dir.path()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the archive wrote nothing during the replay within 60 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "sluice exited during the replay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !ready.load(std::sync::atomic::Ordering::SeqCst),
        "the kill came after the replay (the server was ready): the test proves nothing"
    );
    let partly = archive_ids(dir.path()).len();
    assert!(
        partly > 0 && partly < (BATCHES * ROWS) as usize,
        "{partly} rows archived before the kill"
    );

    // 3. A plain restart: everything acked is there once; drained to the archive, once.
    let acked: Vec<i64> = (0..BATCHES).collect();
    let server = Sluice::start(
        dir.path(),
        &[("WAL__SEGMENT_SIZE", "4MiB"), ("BUFFER__MAX_AGE", "1s")],
    );
    let ids = event_ids(&server).await;
    assert_eq!(ids.len(), (BATCHES * ROWS) as usize);
    assert_each_acked_once("SQL", &ids, &acked, ROWS);
    assert_archive_holds_each_once(&server, dir.path(), ids.len(), &acked, ROWS).await;
}
