//! The ClickHouse sink through the real binary and a real ClickHouse: every type value
//! by value, and exactly-once across kill -9 of sluice and a restart of ClickHouse.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, FixedSizeBinaryArray, Float32Array,
    Float64Array, Float64Builder, Int32Array, Int64Array, ListBuilder, MapBuilder, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray, TimestampMillisecondArray,
    TimestampNanosecondArray,
};
use arrow::datatypes::{Field, Schema};

use crate::common::*;
use sluice_test_support::ch::ChServer;

/// Lines of a TabSeparatedRaw answer (no escaping; NULL is `\N`), split into fields.
async fn rows(ch: &ChServer, sql: &str) -> Vec<Vec<String>> {
    ch.query(&format!("{sql} FORMAT TabSeparatedRaw"))
        .await
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

async fn count(ch: &ChServer, sql: &str) -> i64 {
    ch.query(sql).await.trim().parse().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_lands_in_clickhouse_value_by_value() {
    let ch = ChServer::start();
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_ch(dir.path(), &ch, &[]);
    let mut client = server.flight().await;
    let schema_json = r#"{"name":"ch_types","sinks":["clickhouse"],"columns":[
        {"name":"time","type":"timestamp_ms"},
        {"name":"tus","type":"timestamp"},
        {"name":"tns","type":"timestamp_ns"},
        {"name":"host","type":"string","role":"tag","nullable":false},
        {"name":"level","type":"string","role":"tag"},
        {"name":"msg","type":"string"},
        {"name":"i","type":"int32"},
        {"name":"l","type":"int64","nullable":false},
        {"name":"f","type":"float"},
        {"name":"d","type":"double"},
        {"name":"b","type":"bool"},
        {"name":"u","type":"uuid"},
        {"name":"dec","type":"decimal(12,3)"},
        {"name":"dt","type":"date"},
        {"name":"j","type":"jsonb"},
        {"name":"m","type":"map"},
        {"name":"sa","type":"string[]"},
        {"name":"da","type":"double[]"}],
        "order_by":"(host, time)"}"#;
    action(&mut client, "register_table", schema_json)
        .await
        .unwrap();

    // 2024-01-02T03:04:05.123Z
    let ms = 1_704_164_645_123i64;
    let mut sa = ListBuilder::new(StringBuilder::new());
    sa.values().append_value("a");
    sa.values().append_value("b 'c'");
    sa.append(true);
    sa.append(true);
    sa.append(false);
    let mut da = ListBuilder::new(Float64Builder::new());
    da.values().append_value(1.5);
    da.values().append_value(-2.0);
    da.append(true);
    da.append(false);
    da.append(true);
    let mut m = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    m.keys().append_value("k");
    m.values().append_value("v");
    m.keys().append_value("k2");
    m.values().append_value("w 'x'");
    m.append(true).unwrap();
    m.append(false).unwrap();
    m.append(true).unwrap();
    let uuid = |b: u8| -> [u8; 16] { std::array::from_fn(|i| b.wrapping_add(i as u8)) };
    let cols: Vec<(&str, ArrayRef)> = vec![
        (
            "time",
            Arc::new(
                TimestampMillisecondArray::from(vec![ms, ms + 1, ms + 2]).with_timezone("UTC"),
            ),
        ),
        (
            "tus",
            Arc::new(
                TimestampMicrosecondArray::from(vec![Some(ms * 1000 + 456), None, Some(-1)])
                    .with_timezone("UTC"),
            ),
        ),
        (
            "tns",
            Arc::new(
                TimestampNanosecondArray::from(vec![
                    Some(ms * 1_000_000 + 456_789),
                    Some(-1),
                    None,
                ])
                .with_timezone("UTC"),
            ),
        ),
        (
            "host",
            Arc::new(StringArray::from(vec!["web-1", "web-2", "web-1"])),
        ),
        (
            "level",
            Arc::new(StringArray::from(vec![Some("INFO"), None, Some("WARN")])),
        ),
        (
            "msg",
            Arc::new(StringArray::from(vec![
                Some("héllo \"w\" 'q'"),
                Some(""),
                None,
            ])),
        ),
        (
            "i",
            Arc::new(Int32Array::from(vec![Some(i32::MIN), None, Some(7)])),
        ),
        ("l", Arc::new(Int64Array::from(vec![1, 2, i64::MAX]))),
        (
            "f",
            Arc::new(Float32Array::from(vec![
                Some(0.5f32),
                Some(f32::INFINITY),
                None,
            ])),
        ),
        (
            "d",
            Arc::new(Float64Array::from(vec![Some(-1.25), None, Some(f64::NAN)])),
        ),
        (
            "b",
            Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])),
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
            "dt",
            Arc::new(Date32Array::from(vec![Some(19724), Some(-1), None])),
        ),
        (
            "j",
            Arc::new(StringArray::from(vec![
                Some(r#"{"a":[1,2]}"#),
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
    assert_eq!(put(&mut client, "ch_types", vec![batch]).await.rows(), 3);

    let readyz = server.url("/readyz");
    eventually(Duration::from_secs(30), "the table in ClickHouse", || async {
        count(&ch, "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'ch_types'").await == 1
    })
    .await;
    eventually(Duration::from_secs(30), "3 rows in ClickHouse", || async {
        count(&ch, "SELECT count() FROM ch_types").await == 3
    })
    .await;
    assert_eq!(
        get_json(&readyz).await["sinks"]["clickhouse"]["state"],
        "ok"
    );
    let types = rows(&ch, "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'ch_types' ORDER BY position").await;
    let types: Vec<String> = types.iter().map(|r| format!("{} {}", r[0], r[1])).collect();
    assert_eq!(
        types,
        vec![
            "time DateTime64(3, 'UTC')",
            "tus Nullable(DateTime64(6, 'UTC'))",
            "tns Nullable(DateTime64(9, 'UTC'))",
            "host LowCardinality(String)",
            "level LowCardinality(Nullable(String))",
            "msg Nullable(String)",
            "i Nullable(Int32)",
            "l Int64",
            "f Nullable(Float32)",
            "d Nullable(Float64)",
            "b Nullable(Bool)",
            "u Nullable(UUID)",
            "dec Nullable(Decimal(12, 3))",
            "dt Nullable(Date32)",
            "j Nullable(String)",
            "m Map(String, String)",
            "sa Array(String)",
            "da Array(Float64)",
        ]
    );
    let got = rows(
        &ch,
        "SELECT toString(time), toString(tus), toString(tns), host, level, msg, i, l, f, d, b,
                toString(u), toString(dec), toString(dt), j, toString(m), toString(sa), toString(da)
         FROM ch_types ORDER BY l",
    )
    .await;
    let expected: Vec<Vec<&str>> = vec![
        vec![
            "2024-01-02 03:04:05.123",
            "2024-01-02 03:04:05.123456",
            "2024-01-02 03:04:05.123456789",
            "web-1",
            "INFO",
            "héllo \"w\" 'q'",
            "-2147483648",
            "1",
            "0.5",
            "-1.25",
            "true",
            "10111213-1415-1617-1819-1a1b1c1d1e1f",
            "123.45",
            "2024-01-02",
            r#"{"a":[1,2]}"#,
            r"{'k':'v','k2':'w \'x\''}",
            r"['a','b \'c\'']",
            "[1.5,-2]",
        ],
        vec![
            "2024-01-02 03:04:05.124",
            "\\N",
            "1969-12-31 23:59:59.999999999",
            "web-2",
            "\\N",
            "",
            "\\N",
            "2",
            "inf",
            "\\N",
            "false",
            "\\N",
            "-0.001",
            "1969-12-31",
            "\\N",
            "{}",
            "[]",
            "[]",
        ],
        vec![
            "2024-01-02 03:04:05.125",
            "1969-12-31 23:59:59.999999",
            "\\N",
            "web-1",
            "WARN",
            "\\N",
            "7",
            "9223372036854775807",
            "\\N",
            "nan",
            "\\N",
            "f0f1f2f3-f4f5-f6f7-f8f9-fafbfcfdfeff",
            "\\N",
            "\\N",
            "3",
            "{}",
            "[]",
            "[]",
        ],
    ];
    for (r, (g, e)) in got.iter().zip(&expected).enumerate() {
        for (c, (gv, ev)) in g.iter().zip(e).enumerate() {
            assert_eq!(gv, ev, "row {r} column {c}: {g:?}");
        }
    }
    assert_eq!(got.len(), 3);
}

const CH_EVENTS: &str = r#"{"name":"events","sinks":["clickhouse","archive"],"columns":[
    {"name":"time","type":"timestamp"},
    {"name":"id","type":"int64","nullable":false}]}"#;
const BATCH: i64 = 500;

/// Lists of timestamps and of maps, in columns named like Nested subcolumns, in a table
/// the sink creates from the registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_and_map_lists_land_as_clickhouse_arrays() {
    let ch = ChServer::start();
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_ch(dir.path(), &ch, &[]);
    let mut client = server.flight().await;
    action(
        &mut client,
        "register_table",
        &nest_table(Some(r#"["clickhouse"]"#)),
    )
    .await
    .unwrap();
    write_ndjson(&server, "nest", NEST_ROWS).await;
    wait_sink_caught_up(&server, "clickhouse").await;
    assert_eq!(
        rows(
            &ch,
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() \
             AND table = 'nest' AND name LIKE 'Events.%' ORDER BY position"
        )
        .await,
        [
            ["Events.Timestamp", "Array(DateTime64(9, 'UTC'))"],
            ["Events.Attributes", "Array(Map(String, String))"],
        ]
    );
    assert_eq!(
        rows(
            &ch,
            "SELECT id, arrayMap(t -> toUnixTimestamp64Nano(t), `Events.Timestamp`), \
             `Events.Attributes` FROM nest ORDER BY id"
        )
        .await,
        [
            [
                "1",
                "[1796119200000000001,1796119200000000002]",
                "[{'a':'1'},{}]"
            ],
            ["2", "[]", "[]"],
        ]
    );
}

async fn assert_ch_exactly_once(ch: &ChServer, acked: &[i64]) {
    let got = rows(ch, "SELECT id, count() FROM events GROUP BY id").await;
    let counts: HashMap<i64, i64> = got
        .iter()
        .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
        .collect();
    let dups: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicated ids in ClickHouse: {dups:?}");
    for b in acked {
        for id in b * BATCH..(b + 1) * BATCH {
            assert!(
                counts.contains_key(&id),
                "acked id {id} (batch {b}) is missing in ClickHouse"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_is_exactly_once_in_clickhouse() {
    let ch = ChServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_with_ch(dir.path(), &ch, &[]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", CH_EVENTS)
        .await
        .unwrap();
    let mut acked = Vec::new();
    for (round, from) in [(0, 0i64), (1, 100_000)] {
        if round > 0 {
            server = start_with_ch(dir.path(), &ch, &[]);
        }
        acked.extend(stream_until_killed(&mut server, from, 80, BATCH).await);
    }
    let server = start_with_ch(dir.path(), &ch, &[]);
    wait_sink_caught_up(&server, "clickhouse").await;
    assert_ch_exactly_once(&ch, &acked).await;
    // What the crashed processes had not sent was read back from the WAL on disk (the
    // in-memory feed starts empty).
    let m = get_text(&server.url("/metrics")).await;
    assert!(
        metric(&m, r#"sluice_wal_tail_records_total{source="disk"}"#) > 0.0,
        "{m}"
    );
    let total = count(&ch, "SELECT count() FROM events").await;
    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM events").await,
        total,
        "ClickHouse and the WAL (SQL over buffer and archive) agree"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_restart_mid_stream_loses_and_duplicates_nothing() {
    let ch = ChServer::start_local();
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_ch(dir.path(), &ch, &[]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", CH_EVENTS)
        .await
        .unwrap();
    let acked =
        stream_through_store_restart(&server, "clickhouse", BATCH, || ch.stop(), || ch.restart())
            .await;
    wait_sink_caught_up(&server, "clickhouse").await;
    assert_ch_exactly_once(&ch, &acked).await;
    assert_eq!(count(&ch, "SELECT count() FROM events").await, 200 * BATCH);
    // A running sink takes records from memory, not from the WAL files.
    let m = get_text(&server.url("/metrics")).await;
    let (memory, disk) = (
        metric(&m, r#"sluice_wal_tail_records_total{source="memory"}"#),
        metric(&m, r#"sluice_wal_tail_records_total{source="disk"}"#),
    );
    assert!(
        memory >= 200.0 && disk == 0.0,
        "memory {memory}, disk {disk}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_of_another_type_is_reported_with_both_types() {
    let ch = ChServer::start();
    ch.query("CREATE TABLE clash (time DateTime64(6, 'UTC'), v Array(String)) ENGINE = MergeTree ORDER BY time")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_ch(dir.path(), &ch, &[]);
    let mut client = server.flight().await;
    action(
        &mut client,
        "register_table",
        r#"{"name":"clash","sinks":["clickhouse"],"columns":[{"name":"time","type":"timestamp"},{"name":"v","type":"int64"}]}"#,
    )
    .await
    .unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "time",
            arrow::datatypes::DataType::Timestamp(
                arrow::datatypes::TimeUnit::Microsecond,
                Some("UTC".into()),
            ),
            false,
        ),
        Field::new("v", arrow::datatypes::DataType::Int64, true),
    ]));
    let b = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMicrosecondArray::from(vec![1_700_000_000_000_000]).with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from(vec![5])),
        ],
    )
    .unwrap();
    assert_eq!(put(&mut client, "clash", vec![b]).await.rows(), 1);
    // The sink stops on the table with a message naming the column and both types; the
    // row stays in the WAL and nothing reaches the table.
    let url = server.url("/readyz");
    eventually(
        Duration::from_secs(30),
        "the mismatch reported in /readyz",
        || async {
            let r = get_json(&url).await;
            let e = r["sinks"]["clickhouse"]["last_error"]
                .as_str()
                .unwrap_or("")
                .to_string();
            r["sinks"]["clickhouse"]["state"] == "retrying"
                && e.contains("v")
                && e.contains("Array(String)")
                && e.contains("Int64")
        },
    )
    .await;
    assert_eq!(count(&ch, "SELECT count() FROM clash").await, 0);
    assert!(
        get_json(&url).await["sinks"]["clickhouse"]["lag_records"]
            .as_u64()
            .unwrap()
            > 0,
        "the row is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_clickhouse_refuses_are_dead_lettered_and_the_rest_inserted() {
    let ch = ChServer::start();
    ch.query(
        "CREATE TABLE checked (time DateTime64(6, 'UTC'), v Int64, CONSTRAINT positive CHECK v >= 0)
         ENGINE = MergeTree ORDER BY time SETTINGS non_replicated_deduplication_window = 100",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_ch(dir.path(), &ch, &[]);
    let mut client = server.flight().await;
    action(
        &mut client,
        "register_table",
        r#"{"name":"checked","sinks":["clickhouse"],"columns":[{"name":"time","type":"timestamp"},{"name":"v","type":"int64","nullable":false}]}"#,
    )
    .await
    .unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "time",
            arrow::datatypes::DataType::Timestamp(
                arrow::datatypes::TimeUnit::Microsecond,
                Some("UTC".into()),
            ),
            false,
        ),
        Field::new("v", arrow::datatypes::DataType::Int64, false),
    ]));
    let now = chrono::Utc::now().timestamp_micros();
    let values = vec![1i64, -1, 2, -5, 3, 4, 5, 6];
    let b = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMicrosecondArray::from_iter_values((0..8).map(|i| now + i))
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from(values)),
        ],
    )
    .unwrap();
    assert_eq!(put(&mut client, "checked", vec![b]).await.rows(), 8);
    eventually(
        Duration::from_secs(30),
        "the good rows in ClickHouse",
        || async { count(&ch, "SELECT count() FROM checked").await == 6 },
    )
    .await;
    let got = rows(&ch, "SELECT v FROM checked ORDER BY v").await;
    assert_eq!(
        got.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(),
        vec!["1", "2", "3", "4", "5", "6"]
    );
    let dead = dead_letter_rows(dir.path(), "clickhouse", "checked", "v");
    assert_eq!(dead.iter().map(|d| d.0).collect::<Vec<_>>(), vec![-5, -1]);
    for (_, e) in &dead {
        assert!(
            e.contains("469") || e.contains("VIOLATED_CONSTRAINT"),
            "{e}"
        );
    }
    let m = get_text(&server.url("/metrics")).await;
    assert!(
        m.contains(r#"sluice_sink_dead_letter_rows_total{sink="clickhouse",table="checked"} 2"#),
        "{m}"
    );
}

/// A TLS proxy (socat) in front of ClickHouse's HTTP port: chdb-core has no HTTPS
/// listener of its own. Killed on drop.
struct TlsProxy {
    child: std::process::Child,
    port: u16,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private CA (`ca.pem`) and a certificate it signed for `localhost` (cert.pem,
/// key.pem) in `dir`, and a TLS proxy with them in front of `ch`.
fn tls_proxy(dir: &std::path::Path, ch: &ChServer) -> TlsProxy {
    let (cert, key) = crate::common::test_certificates(dir, "DNS:localhost");
    let upstream = url::Url::parse(&ch.url).unwrap();
    let port = free_port();
    let child = std::process::Command::new("socat")
        .arg(format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            cert.display(),
            key.display()
        ))
        .arg(format!(
            "TCP:{}:{}",
            upstream.host_str().unwrap(),
            upstream.port_or_known_default().unwrap()
        ))
        .spawn()
        .expect("socat (scripts/test installs it)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "socat did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsProxy { child, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_go_over_https_trusting_clickhouse_tls_ca_file() {
    let ch = ChServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let proxy = tls_proxy(&tls, &ch);
    let https = format!("https://localhost:{}", proxy.port);
    let ca = tls.join("ca.pem").display().to_string();

    // Not trusted: `sluice migrate` fails and says why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("migrate")
        .env("SLUICE__CLICKHOUSE__URL", &https)
        .env("SLUICE__CLICKHOUSE__DATABASE", ch.database())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // Trusted through clickhouse.tls_ca_file: rows land over TLS.
    let server = start_with_ch(
        dir.path(),
        &ch,
        &[
            ("CLICKHOUSE__URL", https.as_str()),
            ("CLICKHOUSE__TLS_CA_FILE", ca.as_str()),
        ],
    );
    let mut client = server.flight().await;
    action(&mut client, "register_table", CH_EVENTS)
        .await
        .unwrap();
    let out = put(&mut client, "events", vec![events_batch(0, 300)]).await;
    assert_eq!(out.rows(), 300);
    wait_sink_caught_up(&server, "clickhouse").await;
    assert_eq!(count(&ch, "SELECT count() FROM events").await, 300);
}
