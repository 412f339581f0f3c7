//! End-to-end tests: the real `sluice` binary on free ports, driven over Flight and HTTP.

mod archive_jobs;
mod ch_native;
mod clickhouse;
mod common;
mod crash_loop;
mod durability;
mod errors;
mod hostile;
mod memory;
mod otel_sdk;
mod otlp;
mod pg_copy;
mod postgres;
mod rest;
mod rollup;

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, DictionaryArray, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, TimestampNanosecondArray,
};
use arrow::datatypes::{DataType, Field, Int8Type, Schema, TimeUnit};
use common::*;

const CPU: &str = r#"{"name":"cpu","columns":[
    {"name":"time","type":"timestamp"},
    {"name":"host","type":"string","nullable":false},
    {"name":"value","type":"double"},
    {"name":"cores","type":"int32"},
    {"name":"labels","type":"jsonb"}]}"#;

/// A batch in a shape the client might send: reordered columns, a dictionary for host,
/// nanosecond timestamps in +02:00, int64 cores, no labels column.
fn client_batch(start: i64, n: usize) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("value", DataType::Float64, true),
        Field::new(
            "host",
            DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8)),
            false,
        ),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Nanosecond, Some("+02:00".into())),
            false,
        ),
        Field::new("cores", DataType::Int64, true),
    ]));
    let base_ns = 1_700_000_000_000_000_000i64;
    let ids: Vec<i64> = (start..start + n as i64).collect();
    let hosts: DictionaryArray<Int8Type> = ids
        .iter()
        .map(|i| if i % 2 == 0 { "a" } else { "b" })
        .collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Float64Array::from_iter_values(
                ids.iter().map(|i| *i as f64 * 0.5),
            )),
            Arc::new(hosts),
            Arc::new(
                TimestampNanosecondArray::from_iter_values(
                    ids.iter().map(|i| base_ns + i * 1_000_000_123),
                )
                .with_timezone("+02:00"),
            ),
            Arc::new(Int64Array::from_iter_values(ids.iter().map(|i| i % 8))),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_put_and_query_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[("WAL__FSYNC", "true")]);
    let mut client = server.flight().await;

    let reg = action(&mut client, "register_table", CPU).await.unwrap();
    assert_eq!(reg, serde_json::json!({"name": "cpu", "version": 1}));
    // Identical registration: same version, nothing new.
    let again = action(&mut client, "register_table", CPU).await.unwrap();
    assert_eq!(again["version"], 1);
    let got = action(&mut client, "get_table", r#"{"name":"cpu"}"#)
        .await
        .unwrap();
    assert_eq!(got["columns"][1]["name"], "host");
    assert_eq!(got["time_column"], "time");
    let list = action(&mut client, "list_tables", "").await.unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for seed in [
        "cpu",
        "logs_events",
        "metrics",
        "metrics_events",
        "span_events",
        "spans",
    ] {
        assert!(names.contains(&seed), "{seed} missing from {names:?}");
    }

    let out = put(
        &mut client,
        "cpu",
        vec![client_batch(0, 3), client_batch(3, 2), client_batch(5, 1)],
    )
    .await;
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.acks.len(), 3);
    for (i, ack) in out.acks.iter().enumerate() {
        assert_eq!(ack["request_id"], (i + 1) as u64);
    }
    assert_eq!(
        out.acks
            .iter()
            .map(|a| a["rows"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    let seqs: Vec<u64> = out
        .acks
        .iter()
        .map(|a| a["wal_seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "wal_seq increases: {seqs:?}"
    );

    // Queryable at once, exact values, timestamps converted to UTC µs (truncated).
    let batches = query(
        &mut client,
        "SELECT time, host, value, cores, labels FROM cpu ORDER BY time",
    )
    .await
    .unwrap();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(b.num_rows(), 6);
    assert_eq!(
        b.schema().field(0).data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );
    let times = b
        .column(0)
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    let expected: Vec<i64> = (0..6i64)
        .map(|i| (1_700_000_000_000_000_000 + i * 1_000_000_123) / 1000)
        .collect();
    assert_eq!(times.values().to_vec(), expected);
    let hosts: Vec<&str> = b
        .column(1)
        .as_string::<i32>()
        .iter()
        .map(|s| s.unwrap())
        .collect();
    assert_eq!(hosts, vec!["a", "b", "a", "b", "a", "b"]);
    let values = b.column(2).as_primitive::<arrow::datatypes::Float64Type>();
    assert_eq!(values.values().to_vec(), vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    let cores = b.column(3).as_any().downcast_ref::<Int32Array>().unwrap();
    assert_eq!(cores.values().to_vec(), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(
        b.column(4).null_count(),
        6,
        "missing nullable column is null"
    );

    // Aggregates.
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM cpu WHERE host = 'a'").await,
        3
    );

    // GetFlightInfo with a CMD descriptor returns a ticket that DoGet runs.
    let info = client
        .get_flight_info(arrow_flight::FlightDescriptor::new_cmd(
            "SELECT sum(cores) AS s FROM cpu",
        ))
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let batches: Vec<RecordBatch> =
        futures::TryStreamExt::try_collect(client.do_get(ticket).await.unwrap())
            .await
            .unwrap();
    assert_eq!(
        batches[0]
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0),
        15
    );

    // HTTP: /query JSON, /schema, /healthz, /metrics.
    let http = reqwest::Client::new();
    let rows = get_rows(
        &server,
        "SELECT host, count(*) AS n FROM cpu GROUP BY host ORDER BY host",
    )
    .await;
    assert_eq!(
        rows,
        serde_json::json!([{"host": "a", "n": 3}, {"host": "b", "n": 3}])
    );
    let arrow_resp = http
        .post(server.url("/query"))
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&serde_json::json!({"sql": "SELECT value FROM cpu ORDER BY value DESC LIMIT 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        arrow_resp.headers()["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    let bytes = arrow_resp.bytes().await.unwrap();
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
    let got: Vec<RecordBatch> = reader.collect::<Result<_, _>>().unwrap();
    assert_eq!(
        got[0]
            .column(0)
            .as_primitive::<arrow::datatypes::Float64Type>()
            .value(0),
        2.5
    );

    let schema = get_json(&server.url("/schema/cpu")).await;
    assert_eq!(schema["version"], 1);
    let all = get_json(&server.url("/schema")).await;
    assert!(all.as_array().unwrap().len() >= 6);
    assert_eq!(
        http.get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = get_json(&server.url("/readyz")).await;
    assert_eq!(ready["sinks"]["archive"]["state"], "ok");
    let metrics = get_text(&server.url("/metrics")).await;
    assert!(
        metrics.contains(r#"sluice_ingest_rows_total{protocol="flight",table="cpu"} 6"#),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_wal_segments"), "{metrics}");
    assert!(
        metrics.contains(r#"sluice_buffer_rows{table="cpu"} 6"#),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_archive_lag_seconds"), "{metrics}");

    // Schema evolution over HTTP: adding a nullable column is a new version; retyping is refused.
    let evolved = CPU.replace(
        r#"{"name":"labels","type":"jsonb"}"#,
        r#"{"name":"labels","type":"jsonb"},{"name":"dc","type":"string"}"#,
    );
    let r = http
        .post(server.url("/schema/register"))
        .header("content-type", "application/json")
        .body(evolved)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["version"], 2);
    let retyped = CPU.replace(
        r#""name":"cores","type":"int32""#,
        r#""name":"cores","type":"string""#,
    );
    let r = http
        .post(server.url("/schema/register"))
        .header("content-type", "application/json")
        .body(retyped)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("column 'cores' changes type from int32 to string"),
        "{e}"
    );
    // Old rows read with the new column as null.
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM cpu WHERE dc IS NULL").await,
        6
    );

    // Graceful shutdown exits cleanly.
    let mut server = server;
    assert!(server.terminate().success());
}

/// A batch of `time` (two rows), `host` and the extra column `name`.
fn with_column(name: &str, values: Arc<dyn Array>) -> RecordBatch {
    let n = values.len();
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("host", DataType::Utf8, true),
            Field::new(name, values.data_type().clone(), true),
        ])),
        vec![
            Arc::new(
                arrow::array::TimestampMicrosecondArray::from_iter_values(0..n as i64)
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("h{i}")),
            )),
            values,
        ],
    )
    .unwrap()
}

/// Puts `batches` and checks the call ends with `code` and a message holding every part.
async fn assert_refused(
    client: &mut arrow_flight::FlightClient,
    batches: Vec<RecordBatch>,
    code: tonic::Code,
    parts: &[&str],
) -> PutOutcome {
    let out = put(client, "cpu", batches).await;
    let e = out.error.as_ref().expect("the batch is refused");
    assert_eq!(e.code(), code, "{}", e.message());
    for p in parts {
        assert!(e.message().contains(p), "'{p}' not in: {}", e.message());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_table_column_and_row_and_keep_earlier_batches() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[("SERVER__MAX_MESSAGE_SIZE", "1MiB")]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", CPU).await.unwrap();
    let invalid = tonic::Code::InvalidArgument;

    let unknown = with_column("hots", Arc::new(StringArray::from(vec!["x", "y"])));
    assert_refused(
        &mut client,
        vec![unknown],
        invalid,
        &["table 'cpu'", "unknown column 'hots'"],
    )
    .await;

    // A good batch, then one with a null in a non-null column (same stream, same schema):
    // the good one is acked and stays, the bad one ends the call naming column and row.
    let good = with_column("value", Arc::new(Float64Array::from(vec![1.0, 2.0])));
    let mut nulls = with_column("value", Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0])));
    let hosts = Arc::new(StringArray::from(vec![Some("a"), Some("b"), None]));
    nulls = RecordBatch::try_new(
        nulls.schema(),
        vec![nulls.column(0).clone(), hosts, nulls.column(2).clone()],
    )
    .unwrap();
    let out = assert_refused(
        &mut client,
        vec![good.clone(), nulls],
        invalid,
        &["table 'cpu'", "column 'host'", "row 2"],
    )
    .await;
    assert_eq!(
        out.acks.len(),
        1,
        "the good batch before the bad one is acked"
    );

    // Lossy cast: an int64 value out of int32 range.
    let lossy = with_column("cores", Arc::new(Int64Array::from(vec![1, 1 << 40])));
    assert_refused(
        &mut client,
        vec![lossy],
        invalid,
        &["column 'cores'", "row 1"],
    )
    .await;

    // Text that is not a number in a double column.
    let text = with_column("value", Arc::new(StringArray::from(vec!["1.5", "abc"])));
    assert_refused(
        &mut client,
        vec![text],
        invalid,
        &["column 'value'", "row 1", "abc"],
    )
    .await;

    // Invalid JSON in a jsonb column.
    let json = with_column(
        "labels",
        Arc::new(StringArray::from(vec![r#"{"a":1}"#, "{nope"])),
    );
    assert_refused(
        &mut client,
        vec![json],
        invalid,
        &["column 'labels'", "row 1"],
    )
    .await;

    // Missing time column.
    let no_time = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("host", DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from(vec!["a"]))],
    )
    .unwrap();
    assert_refused(
        &mut client,
        vec![no_time],
        invalid,
        &["column 'time'", "time column"],
    )
    .await;

    // Unknown table.
    let e = put(&mut client, "nope", vec![good])
        .await
        .error
        .expect("refused");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(
        e.message().contains("table 'nope' is not registered"),
        "{}",
        e.message()
    );

    // A message over server.max_message_size (1 MiB here): refused with both sizes.
    let big = with_column(
        "value",
        Arc::new(Float64Array::from_iter_values((0..200_000).map(f64::from))),
    );
    assert_refused(
        &mut client,
        vec![big],
        tonic::Code::OutOfRange,
        &["table 'cpu'", "too large", "1048576"],
    )
    .await;

    // Nothing of a refused batch was stored; the good batch is there once.
    assert_eq!(query_i64(&mut client, "SELECT count(*) FROM cpu").await, 2);

    // SQL is read-only.
    for sql in [
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO cpu (host) VALUES ('z')",
        "DROP TABLE cpu",
    ] {
        let e = query(&mut client, sql).await.expect_err(sql);
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{sql}: {}",
            e.message()
        );
    }
    let e = query(&mut client, "SELECT * FROM missing_table")
        .await
        .unwrap_err();
    assert!(e.message().contains("missing_table"), "{}", e.message());

    // Bad registrations.
    let e = action(
        &mut client,
        "register_table",
        r#"{"name":"x","columns":[{"name":"v","type":"double"}]}"#,
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("time column"), "{}", e.message());

    // Metrics count refusals per table.
    let metrics = get_text(&server.url("/metrics")).await;
    assert!(
        metrics.contains(r#"sluice_ingest_refused_batches_total{reason="invalid",table="cpu"} 6"#),
        "{metrics}"
    );
}

/// `sluice healthcheck` (the container image's HEALTHCHECK): 0 against a live server, 1
/// with the reason against a port nobody listens on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_says_whether_the_server_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[]);
    let run = |url: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["healthcheck", "--url", &url, "--timeout", "2s"])
            .output()
            .unwrap()
    };
    let ok = run(server.url("/healthz"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let missing = run(server.url("/no-such-page"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("answered 404"));
    let closed = run(format!("http://127.0.0.1:{}/healthz", free_port()));
    assert_eq!(closed.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&closed.stderr).contains("sluice healthcheck: http://127.0.0.1:")
    );
}
