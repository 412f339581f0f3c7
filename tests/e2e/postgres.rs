//! The PostgreSQL sink through the real binary and a real PostgreSQL: every type value by
//! value, the metrics split, quoting, dead letters, and exactly-once across kill -9 of
//! sluice and a restart of PostgreSQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, FixedSizeBinaryArray, Float32Array,
    Float64Array, Float64Builder, Int32Array, Int64Array, ListBuilder, MapBuilder, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray, TimestampMillisecondArray,
    TimestampNanosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

use crate::common::*;
use sluice_test_support::pg::PgServer;

fn utc(unit: TimeUnit) -> DataType {
    DataType::Timestamp(unit, Some("UTC".into()))
}

/// Starts sluice writing to `pg`, with small chunks so commits happen often.
fn start_with_pg(dir: &std::path::Path, pg: &PgServer, extra: &[(&str, &str)]) -> Sluice {
    let mut env: Vec<(&str, &str)> = vec![
        ("POSTGRES__URL", pg.url.as_str()),
        ("POSTGRES__BATCH_ROWS", "5000"),
        ("POSTGRES__LINGER", "50ms"),
        ("POSTGRES__RETRY_INITIAL", "50ms"),
        ("POSTGRES__RETRY_MAX", "500ms"),
    ];
    env.extend_from_slice(extra);
    Sluice::start(dir, &env)
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_lands_in_postgres_value_by_value(flavor) {
    let pg = PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_pg(dir.path(), &pg, &[]);
    let mut client = server.flight().await;
    let schema_json = r#"{"name":"alltypes","sinks":["postgres"],"columns":[
        {"name":"time","type":"timestamp"},
        {"name":"b","type":"bool"},
        {"name":"i","type":"int32"},
        {"name":"l","type":"int64","nullable":false},
        {"name":"f","type":"float"},
        {"name":"d","type":"double"},
        {"name":"s","type":"string"},
        {"name":"tms","type":"timestamp_ms"},
        {"name":"tns","type":"timestamp_ns"},
        {"name":"dt","type":"date"},
        {"name":"u","type":"uuid"},
        {"name":"dec","type":"decimal(12,3)"},
        {"name":"j","type":"jsonb"},
        {"name":"m","type":"map"},
        {"name":"sa","type":"string[]"},
        {"name":"da","type":"double[]"}]}"#;
    action(&mut client, "register_table", schema_json)
        .await
        .unwrap();

    // 2024-01-02T03:04:05.123456Z
    let t0 = 1_704_164_645_123_456i64;
    let mut sa = ListBuilder::new(StringBuilder::new());
    sa.values().append_value("a");
    sa.values().append_value("b \"c\",{d}");
    sa.values().append_null();
    sa.append(true);
    sa.append(true); // empty list
    sa.append(false);
    let mut da = ListBuilder::new(Float64Builder::new());
    da.values().append_value(1.5);
    da.values().append_null();
    da.values().append_value(-2.0);
    da.append(true);
    da.append(false);
    da.values().append_value(1e300);
    da.append(true);
    let mut m = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    m.keys().append_value("k");
    m.values().append_value("v \"q\"");
    m.keys().append_value("n");
    m.values().append_null();
    m.append(true).unwrap();
    m.append(false).unwrap();
    m.append(true).unwrap();
    let uuid = |b: u8| -> [u8; 16] { std::array::from_fn(|i| b.wrapping_add(i as u8)) };
    let cols: Vec<(&str, ArrayRef)> = vec![
        (
            "time",
            Arc::new(
                TimestampMicrosecondArray::from(vec![t0, t0 + 1, t0 + 2]).with_timezone("UTC"),
            ),
        ),
        (
            "b",
            Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])),
        ),
        (
            "i",
            Arc::new(Int32Array::from(vec![Some(i32::MIN), None, Some(7)])),
        ),
        ("l", Arc::new(Int64Array::from(vec![1, 2, i64::MAX]))),
        (
            "f",
            Arc::new(Float32Array::from(vec![
                Some(0.1f32),
                Some(f32::INFINITY),
                None,
            ])),
        ),
        (
            "d",
            Arc::new(Float64Array::from(vec![
                Some(-1.25e-300),
                None,
                Some(f64::NAN),
            ])),
        ),
        (
            "s",
            Arc::new(StringArray::from(vec![
                Some("héllo\t\"w\"\n\\"),
                Some(""),
                None,
            ])),
        ),
        (
            "tms",
            Arc::new(
                TimestampMillisecondArray::from(vec![Some(-1i64), None, Some(1_704_164_645_123)])
                    .with_timezone("UTC"),
            ),
        ),
        (
            "tns",
            Arc::new(
                TimestampNanosecondArray::from(vec![
                    Some(1_704_164_645_123_456_789i64),
                    Some(-1),
                    None,
                ])
                .with_timezone("UTC"),
            ),
        ),
        (
            "dt",
            Arc::new(Date32Array::from(vec![Some(19724), Some(-1), None])),
        ),
        (
            "u",
            Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                    vec![Some(uuid(0x10)), None, Some(uuid(0xf0))].into_iter(),
                    16,
                )
                .unwrap(),
            ),
        ),
        (
            "dec",
            Arc::new(
                Decimal128Array::from(vec![Some(123_450i128), Some(-1), None])
                    .with_precision_and_scale(12, 3)
                    .unwrap(),
            ),
        ),
        (
            "j",
            Arc::new(StringArray::from(vec![
                Some(r#"{"a":[1,2,{"b":null}],"c":"x"}"#),
                None,
                Some("3"),
            ])),
        ),
        ("m", Arc::new(m.finish())),
        ("sa", Arc::new(sa.finish())),
        ("da", Arc::new(da.finish())),
    ];
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(schema, cols.into_iter().map(|(_, a)| a).collect()).unwrap();
    let out = put(&mut client, "alltypes", vec![batch]).await;
    assert_eq!(out.rows(), 3);

    let db = pg_client(&pg).await;
    eventually(Duration::from_secs(30), "3 rows in PostgreSQL", || async {
        pg_count(&db, "SELECT count(*) FROM alltypes").await == 3
    })
    .await;
    if flavor == Flavor::Timescale {
        // Issue 11: a lazily created table became no hypertable and never landed.
        assert_eq!(
            pg_count(
                &db,
                "SELECT count(*) FROM timescaledb_information.dimensions
                 WHERE hypertable_name = 'alltypes' AND column_name = 'time'"
            )
            .await,
            1,
            "alltypes is a hypertable on its time column"
        );
    }
    let rows = db
        .query(
            "SELECT time::text, b::text, i::text, l::text, f::text, d::text, s, tms::text,
                    tns::text, dt::text, u::text, dec::text, j::text, m::text, sa::text, da::text
             FROM alltypes ORDER BY l",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<Vec<Option<String>>> = rows
        .iter()
        .map(|r| (0..16).map(|i| r.get::<_, Option<String>>(i)).collect())
        .collect();
    let s = |v: &str| Some(v.to_string());
    let expected = vec![
        vec![
            s("2024-01-02 03:04:05.123456+00"),
            s("true"),
            s("-2147483648"),
            s("1"),
            s("0.1"),
            s("-1.25e-300"),
            s("héllo\t\"w\"\n\\"),
            s("1969-12-31 23:59:59.999+00"),
            // nanoseconds are rounded down to microseconds
            s("2024-01-02 03:04:05.123456+00"),
            s("2024-01-02"),
            s("10111213-1415-1617-1819-1a1b1c1d1e1f"),
            s("123.450"),
            s(r#"{"a": [1, 2, {"b": null}], "c": "x"}"#),
            s(r#"{"k": "v \"q\"", "n": null}"#),
            s(r#"{a,"b \"c\",{d}",NULL}"#),
            s("{1.5,NULL,-2}"),
        ],
        vec![
            s("2024-01-02 03:04:05.123457+00"),
            s("false"),
            None,
            s("2"),
            s("Infinity"),
            None,
            s(""),
            None,
            s("1969-12-31 23:59:59.999999+00"),
            s("1969-12-31"),
            None,
            s("-0.001"),
            None,
            None,
            s("{}"),
            None,
        ],
        vec![
            s("2024-01-02 03:04:05.123458+00"),
            None,
            s("7"),
            s("9223372036854775807"),
            None,
            s("NaN"),
            None,
            s("2024-01-02 03:04:05.123+00"),
            None,
            None,
            s("f0f1f2f3-f4f5-f6f7-f8f9-fafbfcfdfeff"),
            None,
            s("3"),
            s("{}"),
            None,
            s("{1e+300}"),
        ],
    ];
    for (r, (g, e)) in got.iter().zip(&expected).enumerate() {
        for (c, (gv, ev)) in g.iter().zip(e).enumerate() {
            assert_eq!(gv, ev, "row {r} column {c}");
        }
    }
}
}

sluice_test_support::pg_test! {
/// Lists of timestamps and of maps land in PostgreSQL as jsonb arrays, in columns named
/// like ClickHouse Nested subcolumns (`"Events.Timestamp"`, quoted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_and_map_lists_land_as_jsonb_arrays(flavor) {
    let pg = PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_pg(dir.path(), &pg, &[]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", &nest_table(Some(r#"["postgres"]"#)))
        .await
        .unwrap();
    write_ndjson(&server, "nest", NEST_ROWS).await;
    wait_sink_caught_up(&server, "postgres").await;
    let db = pg_client(&pg).await;
    let rows: Vec<(i64, String, Option<String>)> = db
        .query(
            r#"SELECT id, "Events.Timestamp"::text, "Events.Attributes"::text FROM nest ORDER BY id"#,
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                1,
                r#"["2026-12-01T10:00:00.000000001Z", "2026-12-01T10:00:00.000000002Z"]"#
                    .to_string(),
                Some(r#"[{"a": "1"}, {}]"#.to_string())
            ),
            (2, "[]".to_string(), None),
        ]
    );
}
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_split_into_series_and_points_and_rolled_up(flavor) {
    let pg = PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_pg(dir.path(), &pg, &[("POSTGRES__MAINTENANCE_INTERVAL", "1s")]);
    let mut client = server.flight().await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("time", utc(TimeUnit::Microsecond), false),
        Field::new("metric_name", DataType::Utf8, false),
        Field::new("labels", DataType::Utf8, true),
        Field::new("value", DataType::Float64, false),
    ]));
    // Five minutes ago, so the minute is closed and inside metrics_1m's refresh window.
    let minute = (chrono::Utc::now().timestamp() / 60 - 5) * 60_000_000;
    let n = 600usize;
    let names: Vec<&str> = (0..n)
        .map(|i| if i % 3 == 0 { "cpu" } else { "mem" })
        .collect();
    // Same label set in two key orders: one series.
    let labels: Vec<Option<&str>> = (0..n)
        .map(|i| match i % 3 {
            0 => Some(r#"{"host":"a","dc":"x"}"#),
            1 => Some(r#"{"dc":"x","host":"a"}"#),
            _ => Some(r#"{"host":"a","dc":"x"}"#),
        })
        .collect();
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    (0..n).map(|i| minute + i as i64 * 1000),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(names)),
            Arc::new(StringArray::from(labels)),
            Arc::new(Float64Array::from_iter_values((0..n).map(|i| i as f64))),
        ],
    )
    .unwrap();
    assert_eq!(
        put(&mut client, "metrics", vec![batch]).await.rows(),
        n as u64
    );

    let db = pg_client(&pg).await;
    eventually(
        Duration::from_secs(30),
        "points in metrics_points",
        || async { pg_count(&db, "SELECT count(*) FROM metrics_points").await == n as i64 },
    )
    .await;
    assert_eq!(pg_count(&db, "SELECT count(*) FROM metric_series").await, 2);
    let per_series = db
        .query(
            "SELECT ms.metric_name, ms.labels::text, count(*), sum(mp.value)::float8
             FROM metrics_points mp JOIN metric_series ms USING (series_id)
             GROUP BY 1, 2 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, i64, f64)> = per_series
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let cpu_sum: f64 = (0..n).filter(|i| i % 3 == 0).map(|i| i as f64).sum();
    let mem_sum: f64 = (0..n).filter(|i| i % 3 != 0).map(|i| i as f64).sum();
    assert_eq!(
        got,
        vec![
            (
                "cpu".into(),
                r#"{"dc": "x", "host": "a"}"#.into(),
                200,
                cpu_sum
            ),
            (
                "mem".into(),
                r#"{"dc": "x", "host": "a"}"#.into(),
                400,
                mem_sum
            ),
        ]
    );
    // metrics_1m: one bucket per series, avg/max/min of the minute. Sluice's maintenance
    // refreshes the plain table; on TimescaleDB the continuous aggregate is refreshed as
    // its policy would (its scheduled refresh is watched by tests/jobs).
    if flavor == Flavor::Timescale {
        // Sluice watches the store's jobs: the seed's three policies are in /readyz, each
        // either run by the store's scheduler or, where that fails (PostgreSQL 15.20),
        // run by sluice, with the store's error text.
        let readyz = server.url("/readyz");
        eventually(Duration::from_secs(60), "the seed's jobs watched and handled", || async {
            let r = get_json(&readyz).await;
            let jobs = r["sinks"]["postgres"]["timescaledb_jobs"]["jobs"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let policies = ["policy_compression", "policy_retention", "policy_refresh_continuous_aggregate"];
            let seen = policies.iter().all(|p| jobs.iter().any(|j| j["proc_name"] == *p));
            let handled = jobs.iter().all(|j| {
                j["sluice_error"].is_null()
                    && (j["store_last_run"] != "Failed"
                        || (j["sluice_runs"].as_u64() >= Some(1) && j["store_error"].is_string()))
            });
            seen && handled && jobs.iter().any(|j| !j["store_last_run"].is_null())
        })
        .await;
        let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
        assert!(metrics.contains("sluice_timescaledb_job_failing{"), "{metrics}");
        db.batch_execute("CALL refresh_continuous_aggregate('metrics_1m', NULL, now() - INTERVAL '1 minute')")
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(30), "metrics_1m refreshed", || async {
        pg_count(&db, "SELECT count(*) FROM metrics_1m").await == 2
    })
    .await;
    // The same as a direct aggregation over metrics_points.
    let direct: Vec<(String, String, f64, f64, f64)> = db
        .query(
            "SELECT date_bin('1 minute', mp.time, TIMESTAMPTZ '2000-01-01')::text,
                    ms.metric_name, avg(mp.value), max(mp.value), min(mp.value)
             FROM metrics_points mp JOIN metric_series ms USING (series_id)
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let rolled: Vec<(String, String, f64, f64, f64)> = db
        .query(
            "SELECT bucket::text, metric_name, avg_v, max_v, min_v FROM metrics_1m ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(rolled, direct);
    let agg = db
        .query(
            "SELECT metric_name, max_v, min_v FROM metrics_1m ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, f64, f64)> = agg.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        got,
        vec![("cpu".into(), 597.0, 0.0), ("mem".into(), 599.0, 1.0)]
    );
}
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_word_names_are_quoted_and_refused_rows_are_dead_lettered(flavor) {
    let pg = PgServer::start_on(flavor);
    let db = pg_client(&pg).await;
    // A table that exists already, with a constraint sluice does not know about.
    db.batch_execute(
        r#"CREATE TABLE "order" ("time" timestamptz NOT NULL, "select" bigint CHECK ("select" >= 0), "from" text)"#,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_pg(dir.path(), &pg, &[]);
    let mut client = server.flight().await;
    action(
        &mut client,
        "register_table",
        r#"{"name":"order","columns":[{"name":"time","type":"timestamp"},
            {"name":"select","type":"int64"},{"name":"from","type":"string"},
            {"name":"user","type":"string"}]}"#,
    )
    .await
    .unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("time", utc(TimeUnit::Microsecond), false),
        Field::new("select", DataType::Int64, true),
        Field::new("from", DataType::Utf8, true),
        Field::new("user", DataType::Utf8, true),
    ]));
    let now = chrono::Utc::now().timestamp_micros();
    let values = [1i64, -1, 2, -5, 3, 4, 5, 6];
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMicrosecondArray::from_iter_values((0..8).map(|i| now + i))
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from(values.to_vec())),
            Arc::new(StringArray::from_iter_values(
                values
                    .iter()
                    .map(|v| format!("'; DROP TABLE \"order\"; -- {v}")),
            )),
            Arc::new(StringArray::from_iter_values(
                values.iter().map(|v| format!("u{v}")),
            )),
        ],
    )
    .unwrap();
    assert_eq!(put(&mut client, "order", vec![batch]).await.rows(), 8);

    eventually(
        Duration::from_secs(30),
        "the good rows in PostgreSQL",
        || async { pg_count(&db, r#"SELECT count(*) FROM "order""#).await == 6 },
    )
    .await;
    let rows = db
        .query(
            r#"SELECT "select", "from", "user" FROM "order" ORDER BY "select""#,
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want: Vec<(i64, String, String)> = [1i64, 2, 3, 4, 5, 6]
        .iter()
        .map(|v| {
            (
                *v,
                format!("'; DROP TABLE \"order\"; -- {v}"),
                format!("u{v}"),
            )
        })
        .collect();
    assert_eq!(
        got, want,
        "the missing column 'user' was added, values intact"
    );

    // The two refused rows are in the dead-letter file with PostgreSQL's message.
    let dead = dead_letter_rows(dir.path(), "postgres", "order", "select");
    assert_eq!(dead.iter().map(|d| d.0).collect::<Vec<_>>(), vec![-5, -1]);
    for (_, e) in &dead {
        assert!(e.contains("23514") && e.contains("check constraint"), "{e}");
    }
    let m = get_text(&server.url("/metrics")).await;
    assert!(
        m.contains(r#"sluice_sink_dead_letter_rows_total{sink="postgres",table="order"} 2"#),
        "{m}"
    );
}
}

const BATCH: i64 = 500;

fn events_batch(i: i64) -> RecordBatch {
    crate::common::events_batch(i, BATCH)
}

/// Checks PostgreSQL holds every acked batch's ids exactly once (and nothing else twice).
async fn assert_pg_exactly_once(db: &tokio_postgres::Client, acked: &[i64]) {
    let rows = db
        .query("SELECT id, count(*) FROM events GROUP BY id", &[])
        .await
        .unwrap();
    let counts: HashMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let dups: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicated ids in PostgreSQL: {dups:?}");
    for b in acked {
        for id in b * BATCH..(b + 1) * BATCH {
            assert!(
                counts.contains_key(&id),
                "acked id {id} (batch {b}) is missing in PostgreSQL"
            );
        }
    }
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_is_exactly_once_in_postgres(flavor) {
    let pg = PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_with_pg(dir.path(), &pg, &[]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let mut acked = Vec::new();
    for (round, from) in [(0, 0i64), (1, 100_000)] {
        if round > 0 {
            server = start_with_pg(dir.path(), &pg, &[]);
        }
        acked.extend(stream_until_killed(&mut server, from, 80, BATCH).await);
    }
    let server = start_with_pg(dir.path(), &pg, &[]);
    wait_sink_caught_up(&server, "postgres").await;
    let db = pg_client(&pg).await;
    assert_pg_exactly_once(&db, &acked).await;
    // Every acked row is there, and nothing beyond what reached the WAL.
    let total = pg_count(&db, "SELECT count(*) FROM events").await;
    assert!(
        total >= acked.len() as i64 * BATCH,
        "{total} rows for {} acked batches",
        acked.len()
    );
    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM events").await,
        total,
        "PostgreSQL and the WAL (SQL over buffer and archive) agree"
    );
}
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_loses_and_duplicates_nothing(flavor) {
    let pg = PgServer::start_local_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_pg(dir.path(), &pg, &[]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let acked =
        stream_through_store_restart(&server, "postgres", BATCH, || pg.stop(), || pg.restart())
            .await;
    wait_sink_caught_up(&server, "postgres").await;
    let db = pg_client(&pg).await;
    assert_pg_exactly_once(&db, &acked).await;
    assert_eq!(
        pg_count(&db, "SELECT count(*) FROM events").await,
        200 * BATCH
    );
    let m = get_text(&server.url("/metrics")).await;
    let retries = m
        .lines()
        .find(|l| l.starts_with(r#"sluice_sink_retries_total{sink="postgres"}"#))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(retries > 0, "retries are counted: {m}");
}
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_disk_budget_refuses_writes_while_postgres_is_down(flavor) {
    let pg = PgServer::start_local_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_pg(
        dir.path(),
        &pg,
        &[
            ("WAL__SEGMENT_SIZE", "1MiB"),
            ("WAL__DISK_BUDGET", "3MiB"),
            ("BUFFER__MAX_AGE", "1s"),
        ],
    );
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    pg.stop();
    // ~8 KB per batch: the budget fills after a few hundred batches.
    let mut refused = None;
    let mut acked = Vec::new();
    for i in 0..2000i64 {
        let mut c = server.flight().await;
        let out = put(&mut c, "events", vec![events_batch(i)]).await;
        match out.error {
            None => acked.push(i),
            Some(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("writes are refused once the WAL is over its budget");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("wal.disk_budget") && status.message().contains("postgres"),
        "{}",
        status.message()
    );
    let r = get_json(&server.url("/readyz")).await;
    assert_eq!(r["ready"], false, "{r}");
    pg.restart();
    wait_sink_caught_up(&server, "postgres").await;
    // The sink caught up and released segments: writes are accepted again.
    let url = server.url("/readyz");
    eventually(
        Duration::from_secs(30),
        "the WAL back under its budget",
        || async { get_json(&url).await["ready"] == true },
    )
    .await;
    let mut c = server.flight().await;
    let out = put(&mut c, "events", vec![events_batch(5000)]).await;
    assert!(out.error.is_none(), "{:?}", out.error);
    acked.push(5000);
    wait_sink_caught_up(&server, "postgres").await;
    let db = pg_client(&pg).await;
    assert_pg_exactly_once(&db, &acked).await;
    assert_eq!(
        pg_count(&db, "SELECT count(*) FROM events").await,
        acked.len() as i64 * BATCH
    );
}
}

async fn public_columns(db: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    db.query(
        "SELECT table_name::text, column_name::text, data_type::text
         FROM information_schema.columns WHERE table_schema = 'public'
         ORDER BY 1, 2",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// `sluice migrate` through the binary: applies everything once, then nothing.
fn sluice_migrate(pg: &PgServer) -> String {
    sluice_migrate_url(&pg.url)
}

fn sluice_migrate_url(url: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("migrate")
        .arg("--config")
        .arg(example_config())
        .env("SLUICE__POSTGRES__URL", url)
        .output()
        .expect("run sluice migrate");
    assert!(
        out.status.success(),
        "sluice migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_a_no_op_and_says_which_path(flavor) {
    let pg = PgServer::start_on(flavor);
    let first = sluice_migrate(&pg);
    assert!(first.contains("0001_core"), "{first}");
    let path = match flavor {
        Flavor::Postgres => "plain PostgreSQL",
        Flavor::Timescale => "(TimescaleDB)",
        Flavor::TimescaleNotPreloaded => unreachable!("pg_test! runs the other two"),
    };
    assert!(first.contains(path), "{flavor:?}: {first}");
    let db = pg_client(&pg).await;
    let before = public_columns(&db).await;
    let migrations = pg_count(&db, "SELECT count(*) FROM sluice.schema_migrations").await;
    let second = sluice_migrate(&pg);
    assert!(second.contains("up to date"), "{second}");
    assert_eq!(
        public_columns(&db).await,
        before,
        "the second run changed nothing"
    );
    assert_eq!(
        pg_count(&db, "SELECT count(*) FROM sluice.schema_migrations").await,
        migrations
    );
    for t in [
        "metric_series",
        "metrics_points",
        "metrics_1m",
        "metrics_events",
        "table_registry",
    ] {
        assert!(
            before.iter().any(|(n, _, _)| n == t),
            "{t} exists: {before:?}"
        );
    }
}
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_registry_in_postgres(flavor) {
    let pg = PgServer::start_on(flavor);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_with_pg(d1.path(), &pg, &[]);
    let b = start_with_pg(d2.path(), &pg, &[]);
    let (mut ca, mut cb) = (a.flight().await, b.flight().await);
    // The same registrations raced from both processes, then a compatible evolution.
    for round in 0..10 {
        let t = format!(
            r#"{{"name":"shared_{round}","columns":[{{"name":"time","type":"timestamp"}},{{"name":"v","type":"int64"}}]}}"#
        );
        let (ra, rb) = tokio::join!(
            action(&mut ca, "register_table", &t),
            action(&mut cb, "register_table", &t)
        );
        assert_eq!(ra.unwrap()["version"], 1, "round {round}");
        assert_eq!(rb.unwrap()["version"], 1, "round {round}");
    }
    let evolved = r#"{"name":"shared_0","columns":[{"name":"time","type":"timestamp"},{"name":"v","type":"int64"},{"name":"note","type":"string"}]}"#;
    let (ra, rb) = tokio::join!(
        action(&mut ca, "register_table", evolved),
        action(&mut cb, "register_table", evolved)
    );
    assert_eq!(ra.unwrap()["version"], 2);
    assert_eq!(rb.unwrap()["version"], 2);
    let db = pg_client(&pg).await;
    assert_eq!(
        pg_count(
            &db,
            "SELECT count(*) FROM sluice.table_registry_versions WHERE table_name LIKE 'shared_%'"
        )
        .await,
        11,
        "one row per version, no duplicates"
    );
    assert_eq!(
        pg_count(
            &db,
            "SELECT max(version) FROM table_registry WHERE table_name = 'shared_0'"
        )
        .await,
        2
    );
    // A table registered only through one process is writable through the other.
    action(&mut ca, "register_table", EVENTS).await.unwrap();
    let out = put(&mut cb, "events", vec![events_batch(0)]).await;
    assert!(out.error.is_none(), "{:?}", out.error);
    let schema_b = get_json(&b.url("/schema/shared_0")).await;
    assert_eq!(schema_b["version"], 2, "{schema_b}");
}
}

/// Whether `db`'s own connection is encrypted, from the server's side.
async fn uses_tls(db: &tokio_postgres::Client) -> bool {
    db.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_follows_sslmode_and_sslrootcert() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("tls");
    std::fs::create_dir(&certs).unwrap();
    // Made out for `localhost` only: connecting to 127.0.0.1 passes verify-ca, not
    // verify-full.
    let (cert, key) = test_certificates(&certs, "DNS:localhost");
    let ca = certs.join("ca.pem").display().to_string();
    let pg = PgServer::start_local_tls(&cert, &key);
    let with = |params: &str| format!("{}?{params}", pg.url);

    // The server takes no plain-text TCP: a success below means TLS.
    let refused = sluice::postgres::connect(&with("sslmode=disable"))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("no encryption"), "{refused}");

    // prefer (the default) and require encrypt without checking the certificate.
    for url in [pg.url.clone(), with("sslmode=require")] {
        let db = sluice::postgres::connect(&url).await.unwrap();
        assert!(uses_tls(&db).await, "{url}");
    }
    // With the CA: verify-ca and require+sslrootcert check the chain only.
    for params in [
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslmode=require&sslrootcert={ca}"),
    ] {
        let db = sluice::postgres::connect(&with(&params)).await.unwrap();
        assert!(uses_tls(&db).await, "{params}");
    }
    // verify-full checks the name too: 127.0.0.1 is not on the certificate, localhost is.
    let wrong_name =
        sluice::postgres::connect(&with(&format!("sslmode=verify-full&sslrootcert={ca}")))
            .await
            .unwrap_err()
            .to_string();
    assert!(wrong_name.contains("not valid for name"), "{wrong_name}");
    let by_name = pg.url.replace("127.0.0.1", "localhost");
    let db = sluice::postgres::connect(&format!("{by_name}?sslmode=verify-full&sslrootcert={ca}"))
        .await
        .unwrap();
    assert!(uses_tls(&db).await);
    // Without our CA the system roots do not know the issuer.
    let unknown = sluice::postgres::connect(&with("sslmode=verify-ca"))
        .await
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("UnknownIssuer"), "{unknown}");

    // SCRAM over TLS is bound to the channel (SCRAM-SHA-256-PLUS, tls-server-end-point):
    // with channel_binding=require the login only succeeds if both sides hashed the same
    // certificate the same way.
    db.batch_execute("CREATE ROLE pw LOGIN PASSWORD 'secret'")
        .await
        .unwrap();
    let scram = with("sslmode=require&channel_binding=require").replace("postgres@", "pw:secret@");
    let pw = sluice::postgres::connect(&scram).await.unwrap();
    assert!(uses_tls(&pw).await);
    let wrong = scram.replace("pw:secret@", "pw:guess@");
    let denied = sluice::postgres::connect(&wrong)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        denied.contains("password authentication failed"),
        "{denied}"
    );

    // The binary: a bad sslrootcert is a config error at start; with the CA, `sluice
    // migrate` and the sink both go over verified TLS.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("migrate")
        .arg("--config")
        .arg(example_config())
        .env(
            "SLUICE__POSTGRES__URL",
            with("sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("postgres.url") && stderr.contains("/nonexistent/ca.pem"),
        "{stderr}"
    );
    let verified = with(&format!("sslmode=verify-ca&sslrootcert={ca}"));
    let out = sluice_migrate_url(&verified);
    assert!(out.contains("0001_core"), "{out}");
    let server = Sluice::start(
        dir.path(),
        &[
            ("POSTGRES__URL", verified.as_str()),
            ("POSTGRES__LINGER", "50ms"),
        ],
    );
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let out = put(&mut client, "events", vec![events_batch(0)]).await;
    assert_eq!(out.rows(), BATCH as u64);
    wait_sink_caught_up(&server, "postgres").await;
    assert_eq!(pg_count(&db, "SELECT count(*) FROM events").await, BATCH);
    let plain = pg_count(
        &db,
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.backend_type = 'client backend' AND NOT s.ssl",
    )
    .await;
    assert_eq!(
        plain, 0,
        "every connection, sluice's included, is encrypted"
    );
}

/// `rows` rows of (time = now, n = first..first+rows).
fn n_batch(first: i64, rows: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("time", utc(TimeUnit::Microsecond), false),
        Field::new("n", DataType::Int64, false),
    ]));
    let now = chrono::Utc::now().timestamp_micros();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMicrosecondArray::from_iter_values((0..rows).map(|i| now + i))
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from_iter_values(first..first + rows)),
        ],
    )
    .unwrap()
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_store_refuses_is_dead_lettered_and_the_others_keep_landing(flavor) {
    // Issue 11: a permanent DDL failure for one table stalled the sink's WAL position
    // (and so every table's WAL release) with retries forever.
    let pg = PgServer::start_on(flavor);
    let db = pg_client(&pg).await;
    // `typeclash`: CREATE TABLE fails (a type of that name is in the way); `clash`: the
    // table exists with n as text.
    db.batch_execute(
        "CREATE TYPE typeclash AS (a int);
         CREATE TABLE clash (time timestamptz NOT NULL, n text);",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_pg(dir.path(), &pg, &[]);
    let mut client = server.flight().await;
    for (name, extra) in [
        ("fine", r#","retention":"7 days""#),
        ("clash", ""),
        ("typeclash", ""),
    ] {
        let schema = format!(
            r#"{{"name":"{name}","sinks":["postgres"]{extra},"columns":[
                {{"name":"time","type":"timestamp"}},{{"name":"n","type":"int64","nullable":false}}]}}"#
        );
        action(&mut client, "register_table", &schema).await.unwrap();
    }
    for round in 0..3 {
        for t in ["fine", "clash", "typeclash"] {
            put(&mut client, t, vec![n_batch(round * 10, 10)]).await;
        }
    }
    eventually(Duration::from_secs(30), "fine's rows in PostgreSQL", || async {
        pg_count(&db, "SELECT count(*) FROM fine").await == 30
    })
    .await;
    // The refused tables' rows are in the dead-letter files with the statement and
    // PostgreSQL's message, and the sink's WAL position reached the end.
    let readyz = server.url("/readyz");
    eventually(Duration::from_secs(30), "the sink caught up", || async {
        let r = get_json(&readyz).await;
        r["sinks"]["postgres"]["lag_records"] == 0
    })
    .await;
    let r = get_json(&readyz).await;
    let failed = &r["sinks"]["postgres"]["failed_tables"];
    let typeclash = failed["typeclash"].as_str().unwrap_or_default();
    // The composite type has a relation of its name: the statement that fails is the
    // ALTER TABLE adding the registered columns.
    assert!(
        typeclash.contains("`ALTER TABLE \"typeclash\" ADD COLUMN")
            && typeclash.contains("failed: 42809: \"typeclash\" is a composite type"),
        "{r}"
    );
    let clash = failed["clash"].as_str().unwrap_or_default();
    assert!(clash.contains("column 'n' is text in PostgreSQL"), "{r}");
    assert_eq!(r["degraded"], true, "{r}");
    assert!(failed.get("fine").is_none(), "{r}");
    for t in ["clash", "typeclash"] {
        let dead = dead_letter_rows(dir.path(), "postgres", t, "n");
        let mut ns: Vec<i64> = dead.iter().map(|d| d.0).collect();
        ns.sort();
        assert_eq!(ns, (0..30).collect::<Vec<_>>(), "{t}");
        assert!(dead.iter().all(|(_, e)| e.contains(failed[t].as_str().unwrap())), "{dead:?}");
    }
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("sluice_sink_failed_tables{sink=\"postgres\"} 2"), "{metrics}");
    if flavor == Flavor::Timescale {
        // A hypertable on its time column, with the registry's retention.
        assert_eq!(
            pg_count(
                &db,
                "SELECT count(*) FROM timescaledb_information.jobs
                 WHERE hypertable_name = 'fine' AND proc_name = 'policy_retention'
                   AND config->>'drop_after' = '7 days'"
            )
            .await,
            1
        );
    }

    // Once the obstacle is gone, the next rows land and the table's error clears.
    db.batch_execute("DROP TYPE typeclash").await.unwrap();
    put(&mut client, "typeclash", vec![n_batch(100, 5)]).await;
    eventually(Duration::from_secs(30), "typeclash's new rows", || async {
        pg_count(&db, "SELECT count(*) FROM typeclash").await == 5
    })
    .await;
    let r = get_json(&readyz).await;
    assert!(r["sinks"]["postgres"]["failed_tables"].get("typeclash").is_none(), "{r}");
    assert!(r["sinks"]["postgres"]["failed_tables"].get("clash").is_some(), "{r}");
}
}

/// `rows` points of metric `name` (labels `{"h":"a"}`), `value = first + i`, at `time_us
/// + i` microseconds.
fn metric_points(name: &str, time_us: i64, first: i64, rows: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("time", utc(TimeUnit::Microsecond), false),
        Field::new("metric_name", DataType::Utf8, false),
        Field::new("labels", DataType::Utf8, true),
        Field::new("value", DataType::Float64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMicrosecondArray::from_iter_values((0..rows).map(|i| time_us + i))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values((0..rows).map(|_| name))),
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|_| r#"{"h":"a"}"#),
            )),
            Arc::new(Float64Array::from_iter_values(
                (first..first + rows).map(|v| v as f64),
            )),
        ],
    )
    .unwrap()
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rows_land_in_old_and_compressed_chunks(flavor) {
    let pg = PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_pg(dir.path(), &pg, &[]);
    let mut client = server.flight().await;
    let db = pg_client(&pg).await;
    // 20 days ago: past the seed's compress_after (7 days), inside its retention (30).
    let old = chrono::Utc::now().timestamp_micros() - 20 * 86_400_000_000;
    put(&mut client, "metrics", vec![metric_points("cpu", old, 0, 1000)]).await;
    eventually(Duration::from_secs(30), "the first points", || async {
        pg_count(&db, "SELECT count(*) FROM metrics_points").await == 1000
    })
    .await;
    if flavor == Flavor::Timescale {
        let compressed = pg_count(
            &db,
            "SELECT count(*) FROM (SELECT compress_chunk(c)
             FROM show_chunks('metrics_points', older_than => INTERVAL '7 days') c) x",
        )
        .await;
        assert_eq!(compressed, 1, "the old chunk is compressed");
    }
    // Late rows for the same hour, in the same (compressed) chunk.
    put(&mut client, "metrics", vec![metric_points("cpu", old + 500, 1000, 500)]).await;
    eventually(Duration::from_secs(30), "the late points", || async {
        pg_count(&db, "SELECT count(*) FROM metrics_points").await == 1500
    })
    .await;
    let row = db
        .query_one(
            "SELECT count(DISTINCT value)::int8, sum(value)::float8,
                    min(time) = TIMESTAMPTZ 'epoch' + $1::int8 * INTERVAL '1 microsecond'
             FROM metrics_points",
            &[&old],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1500);
    assert_eq!(row.get::<_, f64>(1), (0..1500).sum::<i64>() as f64);
    assert!(row.get::<_, bool>(2));
    if flavor == Flavor::Timescale {
        assert_eq!(
            pg_count(
                &db,
                "SELECT count(*) FROM timescaledb_information.chunks
                 WHERE hypertable_name = 'metrics_points' AND is_compressed"
            )
            .await,
            1,
            "the chunk is still compressed"
        );
    }
}
}
