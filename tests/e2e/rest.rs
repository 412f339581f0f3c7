//! REST JSON writes over real HTTP: `POST /write/{table}` with NDJSON and JSON arrays,
//! gzip and zstd, the seed routes, and every refusal naming what was wrong while storing
//! nothing of the request.

use std::io::Write;
use std::time::Duration;

use crate::common::*;

const EV: &str = r#"{"name":"ev","columns":[
    {"name":"time","type":"timestamp"},
    {"name":"id","type":"int64","nullable":false},
    {"name":"host","type":"string"},
    {"name":"labels","type":"jsonb"},
    {"name":"region","type":"string","default":"eu"}]}"#;

/// A request that must be refused: content type, encoding, body, status, message parts.
type Refusal = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
    Vec<&'static str>,
);

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

async fn post(
    server: &Sluice,
    path: &str,
    content_type: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let mut r = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", content_type);
    if let Some(e) = encoding {
        r = r.header("content-encoding", e);
    }
    let resp = r.body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, json, headers)
}

fn ndjson(from: i64, n: i64) -> Vec<u8> {
    let mut body = Vec::new();
    for i in from..from + n {
        writeln!(
            body,
            r#"{{"time": {}, "id": {i}, "host": "h{}", "labels": {{"k": {i}, "nested": [1, "x"]}}}}"#,
            1_796_119_200_000i64 + i,
            i % 3
        )
        .unwrap();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_writes_land_once_durable_and_refusals_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[("SERVER__MAX_BODY_SIZE", "256KiB")]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EV).await.unwrap();

    // NDJSON, gzip.
    let (status, body, _) = post(
        &server,
        "/write/ev",
        "application/x-ndjson",
        Some("gzip"),
        gzip(&ndjson(0, 1000)),
    )
    .await;
    assert_eq!((status, &body), (200, &serde_json::json!({"rows": 1000})));
    // A JSON array, zstd, RFC 3339 times.
    let array = br#"[
        {"time": "2026-12-01T10:00:00.000005Z", "id": 5000, "labels": "{\"s\": true}"},
        {"time": "2026-12-01T12:00:00+02:00", "id": 5001, "host": "x", "region": "us"}
    ]"#;
    let (status, body, _) = post(
        &server,
        "/write/ev",
        "application/json",
        Some("zstd"),
        zstd::encode_all(&array[..], 1).unwrap(),
    )
    .await;
    assert_eq!((status, &body), (200, &serde_json::json!({"rows": 2})));

    // Exact values back through SQL.
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM ev").await,
        1002
    );
    assert_eq!(
        query_i64(&mut client, "SELECT count(DISTINCT id) FROM ev").await,
        1002
    );
    let rows = get_rows(
        &server,
        "SELECT id, CAST(time AS BIGINT) AS t, host, labels, region FROM ev WHERE id IN (7, 5000, 5001) ORDER BY id",
    )
    .await;
    assert_eq!(
        rows,
        serde_json::json!([
            // jsonb keeps the object's text as sent; absent fields read as null (the
            // JSON answer leaves them out) or as the column's default (region).
            {"id": 7, "t": (1_796_119_200_000i64 + 7) * 1000, "host": "h1",
             "labels": r#"{"k": 7, "nested": [1, "x"]}"#, "region": "eu"},
            {"id": 5000, "t": 1_796_119_200_000_005i64, "labels": r#"{"s": true}"#, "region": "eu"},
            {"id": 5001, "t": 1_796_119_200_000_000i64, "host": "x", "region": "us"},
        ])
    );

    // Refusals: each names what was wrong, and nothing of the request is stored (the
    // good lines before the bad one included).
    let mut bad_line = ndjson(2000, 5);
    bad_line.extend_from_slice(b"{\"time\": 1, \"id\": \"seven\"}\n");
    let cases: Vec<Refusal> = vec![
        (
            "application/x-ndjson",
            None,
            bad_line,
            400,
            vec!["table 'ev'", "line 6", "field 'id'", "seven"],
        ),
        (
            "application/json",
            None,
            b"[{\"time\": 1, \"id\": 1},\n {\"time\": 2}]".to_vec(),
            400,
            vec!["column 'id', line 2: null in a non-null column"],
        ),
        (
            "application/json",
            None,
            b"{\"time\": 1, \"id\": 1, \"hots\": \"a\"}".to_vec(),
            400,
            vec!["line 1", "column 'hots' is not a column of the table"],
        ),
        (
            "application/json",
            None,
            b"[{\"time\": 1, \"id\": 1},\n\n {\"time\": 2, \"id\": 2}".to_vec(),
            400,
            vec!["line 3", "not closed"],
        ),
        (
            "application/json",
            None,
            b"{\"time\": \"yesterday\", \"id\": 1}".to_vec(),
            400,
            vec!["column 'time', line 1", "yesterday"],
        ),
        (
            "application/json",
            Some("gzip"),
            b"not gzip at all".to_vec(),
            400,
            vec!["not valid gzip"],
        ),
        (
            "application/json",
            Some("br"),
            ndjson(0, 1),
            415,
            vec!["Content-Encoding 'br'"],
        ),
        ("text/plain", None, ndjson(0, 1), 415, vec!["must be JSON"]),
        // Over server.max_body_size (256 KiB) as sent, and only once decompressed.
        (
            "application/x-ndjson",
            None,
            ndjson(0, 4000),
            413,
            vec!["larger than 262144 bytes"],
        ),
        (
            "application/x-ndjson",
            Some("gzip"),
            gzip(&[b' '; 8 << 20]),
            413,
            vec!["once decompressed"],
        ),
    ];
    for (content_type, encoding, body, code, parts) in cases {
        let (status, answer, _) = post(&server, "/write/ev", content_type, encoding, body).await;
        assert_eq!(status, code, "{answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        for p in parts {
            assert!(message.contains(p), "'{p}' not in: {message}");
        }
    }
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM ev").await,
        1002
    );

    // Hostile bodies: nesting deep enough to overflow a recursive decoder, a string
    // never closed, NUL bytes. Each is a 400 and the server stays up.
    for body in [
        format!(
            r#"{{"time": 1, "id": 1, "host": {}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        )
        .into_bytes(),
        b"{\"time\": 1, \"id\": 1, \"host\": \"".to_vec(),
        vec![0u8; 4096],
    ] {
        let (status, answer, _) = post(&server, "/write/ev", "application/json", None, body).await;
        assert_eq!(status, 400, "{answer}");
    }
    assert_eq!(
        reqwest::get(server.url("/healthz")).await.unwrap().status(),
        200
    );

    // Unknown table.
    let (status, answer, _) = post(
        &server,
        "/write/nope",
        "application/json",
        None,
        ndjson(0, 1),
    )
    .await;
    assert_eq!(status, 404, "{answer}");

    // The seed routes: /write/metrics in its friendly form, /write/logs into logs_events.
    let metrics =
        br#"{"name": "cpu_usage", "labels": {"host": "a"}, "value": 0.5, "time": 1796119200000}
{"name": "cpu_usage", "labels": {"host": "b"}, "value": 3, "time": "2026-12-01T10:00:01Z"}"#;
    let (status, answer, _) = post(
        &server,
        "/write/metrics",
        "application/x-ndjson",
        None,
        metrics.to_vec(),
    )
    .await;
    assert_eq!((status, &answer), (200, &serde_json::json!({"rows": 2})));
    let rows = get_rows(
        &server,
        "SELECT metric_name, labels, value FROM metrics ORDER BY value",
    )
    .await;
    assert_eq!(
        rows,
        serde_json::json!([
            {"metric_name": "cpu_usage", "labels": r#"{"host": "a"}"#, "value": 0.5},
            {"metric_name": "cpu_usage", "labels": r#"{"host": "b"}"#, "value": 3.0},
        ])
    );
    let logs = br#"[{"timestamp": "2026-12-01T10:00:00Z", "service": "api", "level": "info",
        "message": "hello", "labels": {"user": "u1", "n": 2}}]"#;
    let (status, answer, _) = post(
        &server,
        "/write/logs",
        "application/json",
        None,
        logs.to_vec(),
    )
    .await;
    assert_eq!((status, &answer), (200, &serde_json::json!({"rows": 1})));
    assert_eq!(
        query_i64(
            &mut client,
            "SELECT count(*) FROM logs_events WHERE message = 'hello' AND service = 'api'"
        )
        .await,
        1
    );

    // Who wrote what: the rest protocol label.
    let page = get_text(&server.url("/metrics")).await;
    assert!(
        page.contains(r#"sluice_ingest_rows_total{protocol="rest",table="ev"} 1002"#),
        "{page}"
    );
}

/// With the memory budget full (a stalled archive holds every buffered batch), a REST
/// write waits a moment and is then answered 429 with `Retry-After`, storing nothing of
/// that request, instead of holding the request open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_budget_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), MEMORY_FILLS_UP);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EV).await.unwrap();
    let mut stored = 0u64;
    let mut refused = None;
    for round in 0..200 {
        let (status, answer, headers) = post(
            &server,
            "/write/ev",
            "application/x-ndjson",
            None,
            ndjson(round * 5000, 5000),
        )
        .await;
        match status {
            200 => stored += answer["rows"].as_u64().unwrap(),
            429 => {
                refused = Some((answer, headers));
                break;
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    let (answer, headers) = refused.expect("a 429 once the memory budget is full");
    assert!(
        stored > 0,
        "some writes went through before the budget filled"
    );
    assert_eq!(headers["retry-after"], "1");
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains("memory budget (memory.budget) stayed full"),
        "{message}"
    );
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM ev").await as u64,
        stored,
        "nothing of the refused request is stored"
    );
    let page = get_text(&server.url("/metrics")).await;
    assert!(
        page.contains(r#"sluice_ingest_refused_batches_total{reason="memory_full",table="ev"} 1"#),
        "{page}"
    );

    // The client sends the refused request again once the store keeps up (here: a
    // restart without the stalled archive); nothing acked before is lost, nothing twice.
    let refused_round = (stored / 5000) as i64;
    let mut server = server;
    assert!(server.terminate().success());
    let server = Sluice::start(dir.path(), &[]);
    let (status, answer, _) = post(
        &server,
        "/write/ev",
        "application/x-ndjson",
        None,
        ndjson(refused_round * 5000, 5000),
    )
    .await;
    assert_eq!((status, &answer), (200, &serde_json::json!({"rows": 5000})));
    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM ev").await as u64,
        stored + 5000
    );
    assert_eq!(
        query_i64(&mut client, "SELECT count(DISTINCT id) FROM ev").await as u64,
        stored + 5000
    );
}

sluice_test_support::pg_test! {
/// `/write/metrics` in its friendly form lands in PostgreSQL's metric_series and
/// metrics_points, as the seed design asks: one series per name and label set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_metrics_lands_in_metric_series_and_points(flavor) {
    let pg = sluice_test_support::pg::PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(
        dir.path(),
        &[
            ("POSTGRES__URL", pg.url.as_str()),
            ("POSTGRES__LINGER", "50ms"),
        ],
    );
    let mut body = Vec::new();
    for i in 0..300i64 {
        let host = ["a", "b", "c"][(i % 3) as usize];
        writeln!(
            body,
            r#"{{"name": "cpu_usage", "labels": {{"host": "{host}", "dc": "x"}}, "value": {i}, "time": {}}}"#,
            1_796_119_200_000i64 + i * 1000
        )
        .unwrap();
    }
    let (status, answer, _) = post(
        &server,
        "/write/metrics",
        "application/x-ndjson",
        Some("gzip"),
        gzip(&body),
    )
    .await;
    assert_eq!((status, &answer), (200, &serde_json::json!({"rows": 300})));
    wait_sink_caught_up(&server, "postgres").await;
    let db = pg.client().await;
    let rows = db
        .query(
            "SELECT ms.metric_name, ms.labels->>'host', count(*), sum(mp.value)::float8,
                    min(mp.time) = '2026-12-01T10:00:00Z'::timestamptz
             FROM metrics_points mp JOIN metric_series ms USING (series_id)
             GROUP BY 1, 2 ORDER BY 2",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, i64, f64, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let sum = |k: i64| (0..300i64).filter(|i| i % 3 == k).sum::<i64>() as f64;
    assert_eq!(
        got,
        vec![
            ("cpu_usage".into(), "a".into(), 100, sum(0), true),
            ("cpu_usage".into(), "b".into(), 100, sum(1), false),
            ("cpu_usage".into(), "c".into(), 100, sum(2), false),
        ]
    );
}
}

/// Lists of timestamps and of maps, and a column named like a ClickHouse `Nested`
/// subcolumn (`Events.Timestamp`): written as JSON, read back through SQL from the recent
/// buffer and, once archived, from Parquet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_of_timestamp_and_map_columns_round_trip_through_buffer_and_archive() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[("BUFFER__MAX_AGE", "200ms")]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", &nest_table(None))
        .await
        .unwrap();
    write_ndjson(&server, "nest", NEST_ROWS).await;
    let sql = r#"SELECT id, CAST("Events.Timestamp"[1] AS BIGINT) AS first_ns,
                 cardinality("Events.Timestamp") AS n,
                 "Events.Attributes"[1]['a'] AS a, cardinality("Events.Attributes") AS m
                 FROM nest ORDER BY id"#;
    let want = serde_json::json!([
        {"id": 1, "first_ns": 1_796_119_200_000_000_001i64, "n": 2, "a": "1", "m": 2},
        // Nulls are left out of JSON rows: no first event time, no attribute list.
        {"id": 2, "n": 0},
    ]);
    assert_eq!(get_rows(&server, sql).await, want, "from the recent buffer");
    // Archived: the rows leave the buffer once their Parquet file is committed.
    eventually(
        Duration::from_secs(30),
        "the archive has the rows",
        || async {
            metric(
                &get_text(&server.url("/metrics")).await,
                r#"sluice_archive_rows_total{table="nest"}"#,
            ) >= 2.0
        },
    )
    .await;
    assert_eq!(get_rows(&server, sql).await, want, "from the archive");
}
