//! Rollups into ClickHouse `metrics_1m` (and `metrics_1h`) through the real binary: equal
//! to PostgreSQL's own aggregation of `metrics_points` across late and out-of-order
//! points, kill -9 and a ClickHouse restart; without PostgreSQL; and the tiered range
//! function `sluice_metric_range` on both PostgreSQL flavors.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use futures::StreamExt;

use crate::common::*;
use sluice_test_support::ch::ChServer;
use sluice_test_support::pg::PgServer;

/// 2026-11-30T10:00:00Z: fixed, so the points are hours old (backfill-like) and outside
/// PostgreSQL's own metrics_1m refresh window.
const T0: i64 = 1_796_032_800;

/// Settings that make the rollup write soon and save often.
const FAST_ROLLUP: &[(&str, &str)] = &[
    ("ROLLUP__DELAY", "300ms"),
    ("ROLLUP__CHECKPOINT_EVERY", "200ms"),
    ("ROLLUP__LATENESS", "2m"),
    ("ROLLUP__INTERVALS", r#"["1m", "1h"]"#),
];

/// One metric point: seconds after [`T0`] and microseconds, series index, value.
type Point = (i64, i64, usize, f64);

/// The label texts of series `i`, in varying key order and spacing: PostgreSQL's jsonb and
/// the rollup must see one series per (name, label set) all the same.
fn series(i: usize) -> (&'static str, String) {
    let name = ["cpu", "mem", "disk"][i % 3];
    let host = format!("h{}", i / 3);
    let labels = if i.is_multiple_of(2) {
        format!(r#"{{"host":"{host}","dc":"x"}}"#)
    } else {
        format!(r#"{{ "dc" : "x", "host" : "{host}" }}"#)
    };
    (name, labels)
}

const SERIES: usize = 12;

fn batch(points: &[Point]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("metric_name", DataType::Utf8, false),
        Field::new("labels", DataType::Utf8, true),
        Field::new("value", DataType::Float64, false),
    ]));
    let names: Vec<&str> = points.iter().map(|p| series(p.2).0).collect();
    let labels: Vec<String> = points.iter().map(|p| series(p.2).1).collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    points.iter().map(|p| (T0 + p.0) * 1_000_000 + p.1),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(names)),
            Arc::new(StringArray::from(labels)),
            Arc::new(Float64Array::from_iter_values(points.iter().map(|p| p.3))),
        ],
    )
    .unwrap()
}

/// Batch `i` of a deterministic stream: 40 points at random within the first `minutes`
/// minutes after T0 (so out of order, and late for buckets written already), with values
/// that are multiples of 1/4 (sums are exact in any order).
fn random_batch(i: u64, minutes: i64) -> RecordBatch {
    let mut x = i
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let points: Vec<Point> = (0..40)
        .map(|_| {
            let secs = (next() % (minutes as u64 * 60)) as i64;
            let micros = (next() % 1_000_000) as i64;
            let s = (next() % SERIES as u64) as usize;
            let v = (next() % 4000) as f64 * 0.25 - 300.0;
            (secs, micros, s, v)
        })
        .collect();
    batch(&points)
}

/// `(bucket seconds, metric, labels, count, sum, min, max)` rows, sorted.
type Agg = Vec<(i64, String, String, i64, f64, f64, f64)>;

/// The rows of a `FORMAT JSONCompact` answer.
async fn ch_json_rows(ch: &ChServer, sql: &str) -> Vec<serde_json::Value> {
    let body = ch.query(&format!("{sql} FORMAT JSONCompact")).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"].as_array().unwrap().clone()
}

/// Field `i` of a JSONCompact row as a number (64-bit integers come quoted).
fn num(r: &serde_json::Value, i: usize) -> f64 {
    r[i].as_f64()
        .or_else(|| r[i].as_str().and_then(|s| s.parse().ok()))
        .unwrap()
}

async fn ch_aggregates(ch: &ChServer, table: &str) -> Agg {
    ch_json_rows(
        ch,
        &format!(
            "SELECT toUnixTimestamp(bucket), metric_name, labels, sum(count_v), sum(sum_v), \
             min(min_v), max(max_v) FROM {table} GROUP BY ALL ORDER BY ALL"
        ),
    )
    .await
    .iter()
    .map(|r| {
        let n = |i: usize| num(r, i);
        (
            n(0) as i64,
            r[1].as_str().unwrap().to_string(),
            r[2].as_str().unwrap().to_string(),
            n(3) as i64,
            n(4),
            n(5),
            n(6),
        )
    })
    .collect()
}

async fn pg_aggregates(db: &tokio_postgres::Client, unit: &str) -> Agg {
    db.query(
        &format!(
            "SELECT extract(epoch FROM date_trunc('{unit}', mp.time))::bigint, ms.metric_name,
                    ms.labels::text, count(*), sum(mp.value), min(mp.value), max(mp.value)
             FROM metrics_points mp JOIN metric_series ms USING (series_id)
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        )
    })
    .collect()
}

/// Waits until the rollup has read every WAL record and written every bucket.
async fn wait_rollup_done(server: &Sluice) {
    wait_sink_caught_up(server, "rollup").await;
    let url = server.url("/metrics");
    eventually(
        Duration::from_secs(30),
        "every rollup bucket written",
        || async { metric(&get_text(&url).await, "sluice_rollup_open_buckets") == 0.0 },
    )
    .await;
}

/// Streams `random_batch(i, minutes)` for `i` in `from..`, 5 ms apart, in the background.
fn stream(
    server: &Sluice,
    client: arrow_flight::FlightClient,
    from: u64,
    count: u64,
    minutes: i64,
) -> (
    tokio::task::JoinHandle<Option<tonic::Status>>,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    let _ = server;
    let batches = futures::stream::iter(from..from + count).then(move |i| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        random_batch(i, minutes)
    });
    spawn_put(client, "metrics", batches)
}

sluice_test_support::pg_test! {
/// Points spread over ten minutes, out of order and late (after their bucket was written),
/// through a kill -9 mid-stream and a ClickHouse restart mid-stream: ClickHouse's
/// metrics_1m and metrics_1h hold exactly PostgreSQL's aggregation of metrics_points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_postgres_across_late_points_kill_9_and_a_clickhouse_restart(flavor) {
    let pg = PgServer::start_on(flavor);
    let ch = ChServer::start_local();
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(&str, &str)> = vec![
        ("POSTGRES__URL", pg.url.as_str()),
        ("POSTGRES__LINGER", "50ms"),
        ("POSTGRES__RETRY_INITIAL", "50ms"),
        ("POSTGRES__RETRY_MAX", "500ms"),
    ];
    env.extend_from_slice(FAST_ROLLUP);
    let mut server = start_with_ch(dir.path(), &ch, &env);

    // 1. Minutes 0-4, then wait until they are written.
    let mut client = server.flight().await;
    let first: Vec<RecordBatch> = (0..30).map(|i| random_batch(i, 5)).collect();
    assert_eq!(put(&mut client, "metrics", first).await.rows(), 30 * 40);
    wait_rollup_done(&server).await;
    assert!(
        ch_aggregates(&ch, "metrics_1m").await.len() >= 5 * SERIES - 5,
        "the first minutes are written"
    );

    // 2. Minutes 0-9 (late points for the buckets written above), kill -9 mid-stream.
    let (task, mut acks) = stream(&server, server.flight().await, 1000, 100_000, 10);
    for _ in 0..60 {
        acks.recv().await.expect("acks before the kill");
    }
    server.kill9();
    let _ = task.await;

    // 3. Restarted: more points while ClickHouse goes down and comes back.
    let server = start_with_ch(dir.path(), &ch, &env);
    let (task, mut acks) = stream(&server, server.flight().await, 200_000, 150, 10);
    for _ in 0..30 {
        acks.recv().await.expect("ack");
    }
    ch.stop();
    let url = server.url("/readyz");
    eventually(
        Duration::from_secs(30),
        "the rollup to report retrying",
        || async { get_json(&url).await["sinks"]["rollup"]["state"] == "retrying" },
    )
    .await;
    ch.restart();
    assert!(task.await.unwrap().is_none(), "the call completes");

    wait_sink_caught_up(&server, "postgres").await;
    wait_rollup_done(&server).await;
    let db = pg_client(&pg).await;
    let expected = pg_aggregates(&db, "minute").await;
    assert!(expected.len() >= 10 * SERIES - 2, "{} buckets", expected.len());
    assert_eq!(ch_aggregates(&ch, "metrics_1m").await, expected);
    assert_eq!(
        ch_aggregates(&ch, "metrics_1h").await,
        pg_aggregates(&db, "hour").await
    );
    // Late points made more than one row for some buckets; the merged view has one.
    let multi: i64 = ch
        .query(
            "SELECT count() FROM (SELECT count() AS c FROM metrics_1m \
             GROUP BY bucket, metric_name, labels HAVING c > 1)",
        )
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(multi > 0, "no bucket got a second row");
    let merged: i64 = ch
        .query("SELECT count() FROM metrics_1m_merged")
        .await
        .trim()
        .parse()
        .unwrap();
    assert_eq!(merged, expected.len() as i64);
    let avg_ok: i64 = ch
        .query(
            "SELECT countIf(abs(avg_v - sum_v / count_v) < 1e-9 AND count_v > 0) = count() \
             FROM metrics_1m_merged",
        )
        .await
        .trim()
        .parse()
        .unwrap();
    assert_eq!(avg_ok, 1);
    // The series' labels read the same in both stores.
    let (name, labels) = (&expected[0].1, &expected[0].2);
    assert_eq!(labels, r#"{"dc": "x", "host": "h0"}"#);
    let one: i64 = ch
        .query(&format!(
            "SELECT count() FROM metric_range(metric_name = '{name}', labels = '{labels}', \
             t_from = '2026-11-30 10:00:00', t_to = '2026-11-30 10:10:00')"
        ))
        .await
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        one,
        expected.iter().filter(|r| &r.1 == name && &r.2 == labels).count() as i64
    );
    let m = get_text(&server.url("/metrics")).await;
    assert!(metric(&m, r#"sluice_rollup_late_points_total{interval="1m"}"#) > 0.0, "{m}");
    assert!(
        metric(&m, r#"sluice_rollup_watermark_seconds{interval="1m"}"#) >= (T0 + 7 * 60) as f64,
        "{m}"
    );
}
}

/// The embedded default plus ClickHouse, no PostgreSQL: the rollup's rows equal what SQL
/// over the archive says of the same points, for points 200 days old (a backfill) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_run_without_postgres_and_take_backfilled_points() {
    let ch = ChServer::start();
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_ch(dir.path(), &ch, FAST_ROLLUP);
    let mut client = server.flight().await;
    let mut batches: Vec<RecordBatch> = (0..20).map(|i| random_batch(i, 3)).collect();
    // 200 days before T0 (within metrics_1m's TTL of 365 days: ClickHouse deletes older
    // rows as they come), and a point before 1970 that ClickHouse's DateTime cannot hold.
    let old = -200 * 86400;
    batches.push(batch(&[
        (old, 0, 0, 1.5),
        (old + 30, 0, 0, 2.5),
        (old + 61, 0, 1, 4.0),
        (-T0 - 10, 0, 2, 9.0),
    ]));
    put(&mut client, "metrics", batches).await;
    wait_rollup_done(&server).await;
    let sql = "SELECT CAST(date_trunc('minute', time) AS BIGINT) / 1000000 AS b, metric_name, \
               count(*) AS n, sum(value) AS s, min(value) AS lo, max(value) AS hi \
               FROM metrics WHERE time >= TIMESTAMP '1970-01-01T00:00:00Z' \
               GROUP BY 1, 2 ORDER BY 1, 2";
    let archive = get_rows(&server, sql).await;
    // Both label spellings are one series per metric and host; sum per (bucket, metric).
    let got: Vec<(i64, String, i64, f64, f64, f64)> = ch_json_rows(
        &ch,
        "SELECT toUnixTimestamp(bucket) AS b, metric_name, sum(count_v), sum(sum_v), \
         min(min_v), max(max_v) FROM metrics_1m GROUP BY b, metric_name ORDER BY b, metric_name",
    )
    .await
    .iter()
    .map(|r| {
        let n = |i: usize| num(r, i);
        (
            n(0) as i64,
            r[1].as_str().unwrap().into(),
            n(2) as i64,
            n(3),
            n(4),
            n(5),
        )
    })
    .collect();
    let want: Vec<(i64, String, i64, f64, f64, f64)> = archive
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["b"].as_i64().unwrap(),
                r["metric_name"].as_str().unwrap().into(),
                r["n"].as_i64().unwrap(),
                r["s"].as_f64().unwrap(),
                r["lo"].as_f64().unwrap(),
                r["hi"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        got[0],
        ((T0 + old) / 60 * 60, "cpu".into(), 2, 4.0, 1.5, 2.5)
    );
    // The point before 1970 is counted as refused, not lost without a word (it is in the
    // archive all the same).
    let m = get_text(&server.url("/metrics")).await;
    assert_eq!(
        metric(
            &m,
            r#"sluice_rollup_refused_points_total{reason="time_range"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "sluice_rollup_points_total"), 20.0 * 40.0 + 3.0);
}

sluice_test_support::pg_test! {
/// `sluice_metric_range` reads raw points where they still exist and metrics_1m before
/// them, with no bucket twice and none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_range_reads_raw_points_then_rollups_beyond_them(flavor) {
    let pg = PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[("POSTGRES__URL", pg.url.as_str())]);
    let mut client = server.flight().await;
    // 2020-01-01T00:00:00Z, minutes 0-5, two points a minute; another series beside it.
    let base = 1_577_836_800 - T0;
    let points: Vec<Point> = (0..12)
        .flat_map(|i| [(base + i * 30, 0, 0, i as f64), (base + i * 30, 0, 1, 100.0)])
        .collect();
    put(&mut client, "metrics", vec![batch(&points)]).await;
    wait_sink_caught_up(&server, "postgres").await;
    let db = pg_client(&pg).await;
    // metrics_1m gets the minutes as TimescaleDB's refresh (or sluice's plain-PostgreSQL
    // refresh) would make them; then retention takes the first three minutes' raw points.
    let refresh = if flavor == Flavor::Postgres {
        "INSERT INTO metrics_1m SELECT date_trunc('minute', mp.time), ms.metric_name, ms.labels,
                avg(mp.value), max(mp.value), min(mp.value)
         FROM metrics_points mp JOIN metric_series ms USING (series_id)
         WHERE mp.time < '2020-01-02' GROUP BY 1, 2, 3"
    } else {
        "CALL refresh_continuous_aggregate('metrics_1m', '2020-01-01', '2020-01-02')"
    };
    db.batch_execute(refresh).await.unwrap();
    db.batch_execute("DELETE FROM metrics_points WHERE time < '2020-01-01T00:02:30Z'")
        .await
        .unwrap();
    let rows = db
        .query(
            "SELECT extract(epoch FROM \"time\")::bigint - 1577836800, value, min_v, max_v, tier
             FROM sluice_metric_range('cpu', '{\"dc\": \"x\", \"host\": \"h0\"}',
                                      '2020-01-01', '2020-01-01T00:06:00Z')",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, f64, f64, f64, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    // Raw points from 00:02:30 on, so from minute 3 on; minutes 0-2 from metrics_1m.
    let mut want: Vec<(i64, f64, f64, f64, String)> = (0..3)
        .map(|m| {
            let (a, b) = (2.0 * m as f64, 2.0 * m as f64 + 1.0);
            (m * 60, (a + b) / 2.0, a, b, "1m".to_string())
        })
        .collect();
    want.extend((6..12).map(|i| (i * 30, i as f64, i as f64, i as f64, "raw".to_string())));
    assert_eq!(got, want);
}
}
