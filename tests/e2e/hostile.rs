//! Issue 10, "the ack is a promise": each case a hostile or careless user found, against
//! the real binary. Every test here failed on the main branch before the fix it pins.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

use crate::common::*;
use sluice_test_support::pg::PgServer;

fn wal_seqs(out: &PutOutcome) -> Vec<u64> {
    out.acks
        .iter()
        .map(|a| a["wal_seq"].as_u64().unwrap())
        .collect()
}

/// Files the process has open under `dir` that were deleted (`(deleted)` in /proc).
fn deleted_open_files(server: &Sluice, dir: &Path) -> Vec<String> {
    let fds = format!("/proc/{}/fd", server.child.id());
    let dir = dir.canonicalize().unwrap().display().to_string();
    std::fs::read_dir(fds)
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.starts_with(&dir) && p.ends_with("(deleted)"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_restarts_after_the_archive_caught_up_lose_no_ack() {
    // On main: after the archive caught up, two restarts with no writes between them
    // left the WAL writing into a deleted segment file (acks lost at the next kill -9),
    // and numbered new records from 1 again, below the archive's position.
    let dir = tempfile::tempdir().unwrap();
    let env = [("BUFFER__MAX_AGE", "200ms")];
    let server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let first = put(&mut client, "events", vec![events_batch(0, 100)]).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    let url = server.url("/readyz");
    eventually(
        Duration::from_secs(20),
        "the archive to catch up",
        || async {
            let r = get_json(&url).await;
            r["wal"]["segments"] == 1 && r["sinks"]["archive"]["lag_rows"] == 0
        },
    )
    .await;
    let mut server = server;
    server.terminate();
    for _ in 0..2 {
        let mut quiet = Sluice::start(dir.path(), &env);
        quiet.terminate();
    }
    let mut server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    let second = put(
        &mut client,
        "events",
        (1..4).map(|i| events_batch(i, 100)).collect(),
    )
    .await;
    assert!(second.error.is_none(), "{:?}", second.error);
    let (a, b) = (wal_seqs(&first), wal_seqs(&second));
    assert!(
        b.iter().all(|s| s > &a[0]),
        "numbers went backwards: {a:?} then {b:?}"
    );
    assert_eq!(
        deleted_open_files(&server, dir.path()),
        Vec::<String>::new(),
        "the WAL writes into a deleted file"
    );
    server.kill9();
    let server = Sluice::start(dir.path(), &env);
    let ids = event_ids(&server).await;
    assert_eq!(ids, (0..400).collect::<Vec<i64>>(), "every acked row once");
}

/// A batch of `events` with one row at `micros`.
fn events_at(micros: i64, id: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("id", DataType::Int64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampMicrosecondArray::from(vec![micros]).with_timezone("UTC")),
            Arc::new(Int64Array::from(vec![id])),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_timestamps_are_refused_and_the_archive_keeps_flushing() {
    // On main: one acked row at i64::MIN or i64::MAX microseconds made every archive
    // flush fail for good (`hour -2562047789 out of range`), /readyz 503, and the WAL
    // could no longer be released.
    let dir = tempfile::tempdir().unwrap();
    let env = [("BUFFER__MAX_AGE", "200ms")];
    let server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    for v in [i64::MIN, i64::MAX] {
        let out = put(&mut client, "events", vec![events_at(v, 1)]).await;
        let e = out.error.expect("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("column 'time', row 0") && e.message().contains(&v.to_string()),
            "{e}"
        );
    }
    // The oldest and newest instants that are accepted land and are archived.
    let out = put(
        &mut client,
        "events",
        vec![events_at(-8_000_000_000_000_000_000, 2), events_at(0, 3)],
    )
    .await;
    assert!(out.error.is_none(), "{:?}", out.error);
    let url = server.url("/readyz");
    eventually(Duration::from_secs(20), "the archive to flush", || async {
        let r = get_json(&url).await;
        r["ready"] == true && r["sinks"]["archive"]["lag_rows"] == 0
    })
    .await;
    assert_eq!(event_ids(&server).await, vec![2, 3]);
}

/// The place of record `seq` in the WAL of `data_dir`: (segment path, offset, length).
fn record_place(data_dir: &Path, seq: u64) -> (std::path::PathBuf, u64, u64) {
    let scan = sluice::wal::scan::scan_dir(&data_dir.join("wal")).unwrap();
    for seg in scan.segments {
        if let Some(r) = seg.records.iter().find(|r| r.seq == seq) {
            return (seg.path.clone(), r.offset, r.len);
        }
    }
    panic!("record {seq} is not in the WAL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_wal_record_stops_the_start_and_repair_keeps_the_others() {
    // On main: a flipped byte in one record dropped every later record although their
    // checksums were valid, and the log called them "never acknowledged".
    let dir = tempfile::tempdir().unwrap();
    let mut server = Sluice::start(dir.path(), &[]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..3 {
        let out = put(&mut client, "events", vec![events_batch(i, 100)]).await;
        seqs.extend(wal_seqs(&out));
    }
    server.terminate();
    let (path, offset, len) = record_place(dir.path(), seqs[1]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(offset + len / 2) as usize] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();

    let refused = Sluice::start_refused(dir.path(), &[]);
    assert!(
        refused.contains(&format!("records {} are unreadable", seqs[1])),
        "{refused}"
    );
    assert!(refused.contains("sluice wal repair"), "{refused}");
    assert!(!refused.contains("never acknowledged"), "{refused}");

    let (code, out, _) = sluice_cli(dir.path(), &[], &["wal", "check"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("damage:"), "{out}");
    let (code, out, err) = sluice_cli(dir.path(), &[], &["wal", "repair"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("lost: records {}..={}", seqs[1], seqs[1])),
        "{out}"
    );
    let (code, out, _) = sluice_cli(dir.path(), &[], &["wal", "check"]);
    assert_eq!(code, 0, "{out}");

    let server = Sluice::start(dir.path(), &[]);
    let ids = event_ids(&server).await;
    let expect: Vec<i64> = (0..100).chain(200..300).collect();
    assert_eq!(
        ids, expect,
        "the records around the damaged one are all there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_middle_segment_is_reported_with_its_records() {
    // On main: a missing segment between two others was skipped without a word.
    let dir = tempfile::tempdir().unwrap();
    // The smallest segments, and records bigger than them: one record each.
    let env = [("WAL__SEGMENT_SIZE", "1MiB")];
    let mut server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.extend(wal_seqs(
            &put(&mut client, "events", vec![events_batch(i, 70_000)]).await,
        ));
    }
    server.terminate();
    let (path, _, _) = record_place(dir.path(), seqs[1]);
    std::fs::remove_file(path).unwrap();
    let refused = Sluice::start_refused(dir.path(), &env);
    assert!(
        refused.contains(&format!("records {} are missing", seqs[1])),
        "{refused}"
    );
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_wal_id_is_restored_and_postgres_gets_no_row_twice(flavor) {
    // On main: a missing wal/ID was replaced by a new one, and the PostgreSQL sink wrote
    // the rows still in the WAL again under the new id.
    let pg = PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("POSTGRES__URL", pg.url.as_str()),
        ("POSTGRES__LINGER", "50ms"),
    ];
    let schema = EVENTS.replace(
        r#""name":"events","#,
        r#""name":"events","sinks":["postgres"],"#,
    );
    let mut server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    action(&mut client, "register_table", &schema)
        .await
        .unwrap();
    let out = put(
        &mut client,
        "events",
        (0..5).map(|i| events_batch(i, 100)).collect(),
    )
    .await;
    assert!(out.error.is_none(), "{:?}", out.error);
    wait_sink_caught_up(&server, "postgres").await;
    server.terminate();
    let id = std::fs::read_to_string(dir.path().join("wal/ID")).unwrap();
    std::fs::remove_file(dir.path().join("wal/ID")).unwrap();

    let server = Sluice::start(dir.path(), &env);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("wal/ID")).unwrap(),
        id,
        "the id comes back from the segment headers"
    );
    let mut client = server.flight().await;
    let more = put(&mut client, "events", vec![events_batch(5, 100)]).await;
    assert!(more.error.is_none(), "{:?}", more.error);
    wait_sink_caught_up(&server, "postgres").await;
    let db = pg.client().await;
    let row = db
        .query_one("SELECT count(*), count(DISTINCT id) FROM events", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (600, 600));
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _server = Sluice::start(dir.path(), &[]);
    let refused = Sluice::start_refused(dir.path(), &[]);
    assert!(
        refused.contains("in use by another sluice process"),
        "{refused}"
    );
    let (code, _, err) = sluice_cli(dir.path(), &[], &["wal", "repair"]);
    assert_ne!(code, 0);
    assert!(err.contains("in use by another sluice process"), "{err}");
}

/// POST /query with `sql`; returns (status, body).
async fn http_query(server: &Sluice, sql: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(server.url("/query"))
        .header("content-type", "application/json")
        .body(serde_json::json!({ "sql": sql }).to_string())
        .send()
        .await
        .expect("POST /query");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// `/healthz` answers, and how long it took.
async fn healthz_latency(server: &Sluice) -> Duration {
    let t = std::time::Instant::now();
    let r = reqwest::Client::new()
        .get(server.url("/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("/healthz answers");
    assert!(r.status().is_success());
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_long_queries_are_refused_and_the_server_lives() {
    // On main: `SELECT 1+1+...+1` with about 950 terms (1.9 KB) aborted the process with a
    // stack overflow, over HTTP and DoGet alike; long AND and UNION ALL chains too.
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[]);
    let mut client = server.flight().await;
    let deep = [
        format!("SELECT {}", vec!["1"; 950].join("+")),
        format!("SELECT 1 WHERE {}", vec!["true"; 700].join(" AND ")),
        vec!["SELECT 1"; 400].join(" UNION ALL "),
        format!("SELECT {}1{}", "(".repeat(300), ")".repeat(300)),
        format!("SELECT {}1{}", "abs(".repeat(300), ")".repeat(300)),
    ];
    for sql in &deep {
        let (status, body) = http_query(&server, sql).await;
        assert_eq!(status, 400, "{body}");
        let e = query(&mut client, sql)
            .await
            .expect_err("refused over Flight");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    }
    let (_, body) = http_query(&server, &deep[0]).await;
    assert!(body.contains("query.max_depth"), "{body}");
    // Text beyond query.max_sql_bytes is refused before it is parsed.
    let long = format!("SELECT {}", vec!["1"; 200_000].join(","));
    let (status, body) = http_query(&server, &long).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("query.max_sql_bytes"), "{body}");
    // Nesting within the limit works.
    let ok = format!("SELECT {} AS n", vec!["1"; 100].join("+"));
    let (status, body) = http_query(&server, &ok).await;
    assert_eq!((status, body.as_str()), (200, r#"[{"n":100}]"#));
    healthz_latency(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_query_neither_freezes_ingest_nor_outlives_its_time_limit() {
    // On main: a CROSS JOIN of two large tables stopped /healthz, new Flight connections
    // and the archive loop, ignored SIGTERM, and stayed frozen after the client left.
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("QUERY__TIMEOUT", "4s"),
        ("QUERY__MAX_CONCURRENT", "1"),
        ("SERVER__SHUTDOWN_TIMEOUT", "3s"),
    ];
    let mut server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let bomb = "SELECT count(*) FROM range(100000000) a CROSS JOIN range(100000000) b";
    let started = std::time::Instant::now();
    let running = {
        let mut c = server.flight().await;
        tokio::spawn(async move { query(&mut c, bomb).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While it burns CPU: health, a new connection and writes go on.
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        worst = worst.max(healthz_latency(&server).await);
        let mut fresh = server.flight().await;
        let out = put(&mut fresh, "events", vec![events_batch(i, 1000)]).await;
        assert!(out.error.is_none(), "{:?}", out.error);
    }
    assert!(
        worst < Duration::from_millis(100),
        "/healthz took {worst:?}"
    );
    let e = running
        .await
        .unwrap()
        .expect_err("stopped by its time limit");
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    assert!(e.message().contains("query.timeout"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A client that goes away frees its slot at once (max_concurrent = 1): the next query
    // does not wait for the abandoned one.
    {
        let mut c = server.flight().await;
        let abandoned = tokio::spawn(async move { query(&mut c, bomb).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        abandoned.abort();
    }
    let t = std::time::Instant::now();
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM events").await,
        10_000
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "waited {:?}",
        t.elapsed()
    );
    // SIGTERM with a query running: the query ends with an error saying why (never a
    // result cut short that looks complete), and the server exits well within its grace.
    let mut c = server.flight().await;
    let running = tokio::spawn(async move { query(&mut c, bomb).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = std::time::Instant::now();
    assert!(server.terminate().success());
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "exit took {:?}",
        t.elapsed()
    );
    let e = running.await.unwrap().expect_err("stopped, and told so");
    assert!(e.message().contains("shutting down"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_cannot_take_memory_without_bound() {
    // On main: `SELECT cardinality(range(100000000000))` grew past 8 GB in 25 s, and
    // /query built the whole JSON answer in memory (3.2 GB for 1e8 rows).
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[("QUERY__MEMORY_LIMIT", "64MiB")]);
    let bombs = [
        "SELECT cardinality(range(100000000000))",
        "SELECT length(repeat('x', 1000000000))",
        "SELECT length(lpad('x', 1000000000))",
        "SELECT cardinality(array_repeat(1, 1000000000))",
        // Doubling per level: 2^40 kB in 40 short steps.
        &format!(
            "WITH t0 AS (SELECT repeat('x', 1000) AS x), {} SELECT length(x) FROM t40",
            (1..=40)
                .map(|i| format!("t{i} AS (SELECT x || x AS x FROM t{})", i - 1))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        "SELECT count(*) FROM (SELECT * FROM range(30000000) ORDER BY 1 DESC) s",
    ];
    let rss_before = server.proc_status_kb("VmRSS");
    for sql in bombs {
        let (status, body) = http_query(&server, sql).await;
        assert!(
            (status == 400 && body.contains("query.memory_limit")) || status == 200,
            "{sql}: {status} {body}"
        );
        if status == 200 {
            // Only the sort may finish: by spilling to disk.
            assert!(sql.contains("ORDER BY"), "{sql}: {body}");
        }
    }
    let grown = server.proc_status_kb("VmHWM").saturating_sub(rss_before);
    assert!(grown < 400 * 1024, "resident memory grew by {grown} kB");
    // A large result is streamed: 5M rows of JSON (about 90 MB) without holding them.
    let mut r = reqwest::Client::new()
        .post(server.url("/query"))
        .header("content-type", "application/json")
        .body(r#"{"sql": "SELECT value AS v, value * 2 AS w FROM range(5000000)"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (mut bytes, mut peak) = (0usize, 0u64);
    while let Some(chunk) = r.chunk().await.unwrap() {
        bytes += chunk.len();
        peak = peak.max(server.proc_status_kb("VmRSS"));
    }
    assert!(bytes > 80_000_000, "{bytes} bytes");
    assert!(
        peak.saturating_sub(rss_before) < 300 * 1024,
        "RSS grew by {} kB while streaming",
        peak - rss_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_results_keep_non_finite_numbers_and_errors_are_never_a_200() {
    // On main: NaN and infinities came out as null, and a query failing while it ran
    // printed its error inside a 200.
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[]);
    let (status, body) = http_query(
        &server,
        "SELECT CAST('NaN' AS DOUBLE) AS a, CAST('inf' AS DOUBLE) AS b, \
         CAST('-inf' AS DOUBLE) AS c, 1.5 AS d, CAST(NULL AS DOUBLE) AS e",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!([{"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 1.5}])
    );
    let mut client = server.flight().await;
    action(
        &mut client,
        "register_table",
        r#"{"name":"words","columns":[{"name":"time","type":"timestamp"},{"name":"w","type":"string"}]}"#,
    )
    .await
    .unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("w", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampMicrosecondArray::from(vec![0, 1]).with_timezone("UTC")),
            Arc::new(arrow::array::StringArray::from(vec!["12", "twelve"])),
        ],
    )
    .unwrap();
    assert!(put(&mut client, "words", vec![batch]).await.error.is_none());
    let (status, body) = http_query(&server, "SELECT CAST(w AS INT) FROM words").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("twelve"), "{body}");
}

/// FlightData and FlightDescriptor as raw bytes on the wire: what a hostile client can
/// send that arrow-flight's typed messages cannot (a path that is not UTF-8).
mod raw {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Descriptor {
        #[prost(int32, tag = "1")]
        pub r#type: i32,
        #[prost(bytes = "vec", tag = "2")]
        pub cmd: Vec<u8>,
        #[prost(bytes = "vec", repeated, tag = "3")]
        pub path: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FlightData {
        #[prost(message, optional, tag = "1")]
        pub flight_descriptor: Option<Descriptor>,
        #[prost(bytes = "vec", tag = "2")]
        pub data_header: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub app_metadata: Vec<u8>,
        #[prost(bytes = "vec", tag = "1000")]
        pub data_body: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResult {
        #[prost(bytes = "vec", tag = "1")]
        pub app_metadata: Vec<u8>,
    }
}

/// DoPut of raw messages; returns the acks' JSON and how the call ended.
async fn raw_put(
    server: &Sluice,
    messages: Vec<raw::FlightData>,
) -> (Vec<serde_json::Value>, Result<(), tonic::Status>) {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/arrow.flight.protocol.FlightService/DoPut",
    );
    let codec = tonic_prost::ProstCodec::<raw::FlightData, raw::PutResult>::default();
    let response = grpc
        .streaming(
            tonic::Request::new(futures::stream::iter(messages)),
            path,
            codec,
        )
        .await;
    let mut stream = match response {
        Ok(r) => r.into_inner(),
        Err(s) => return (Vec::new(), Err(s)),
    };
    let mut acks = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(r)) => acks.push(serde_json::from_slice(&r.app_metadata).unwrap()),
            Ok(None) => return (acks, Ok(())),
            Err(s) => return (acks, Err(s)),
        }
    }
}

/// The raw messages of a DoPut of `batches` to `table`.
fn raw_messages(table: &str, batches: Vec<RecordBatch>) -> Vec<raw::FlightData> {
    use futures::StreamExt;
    let data: Vec<arrow_flight::FlightData> = futures::executor::block_on(
        arrow_flight::encode::FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(arrow_flight::FlightDescriptor::new_path(vec![
                table.to_string()
            ])))
            .build(futures::stream::iter(batches.into_iter().map(Ok)))
            .map(|d| d.unwrap())
            .collect::<Vec<_>>(),
    );
    data.into_iter()
        .map(|d| raw::FlightData {
            flight_descriptor: d.flight_descriptor.map(|fd| raw::Descriptor {
                r#type: fd.r#type,
                cmd: fd.cmd.to_vec(),
                path: fd.path.into_iter().map(String::into_bytes).collect(),
            }),
            data_header: d.data_header.to_vec(),
            app_metadata: d.app_metadata.to_vec(),
            data_body: d.data_body.to_vec(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_flight_data_ends_the_call_with_invalid_argument() {
    // On main: truncated bodies and garbage headers panicked inside arrow's decoder; the
    // call ended with status OK and no acks, and a valid batch sent after the bad one was
    // silently dropped.
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    let good = raw_messages("events", vec![events_batch(0, 100), events_batch(1, 100)]);
    let (schema, first, second) = (good[0].clone(), good[1].clone(), good[2].clone());
    let mut half_header = first.clone();
    half_header
        .data_header
        .truncate(half_header.data_header.len() / 2);
    let mut short_body = first.clone();
    short_body
        .data_body
        .truncate(short_body.data_body.len() / 3);
    let mut garbage = first.clone();
    garbage.data_header = b"\xde\xad\xbe\xef not flatbuffers".to_vec();
    let mut no_body = first.clone();
    no_body.data_body.clear();
    for bad in [half_header, short_body, garbage, no_body] {
        // The good batch is acked, the bad one ends the call with InvalidArgument, and
        // the good batch after it is not taken.
        let (acks, end) = raw_put(
            &server,
            vec![schema.clone(), first.clone(), bad, second.clone()],
        )
        .await;
        assert_eq!(acks.len(), 1, "{acks:?}");
        let e = end.expect_err("the call ends with an error, never OK");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("table 'events'"), "{e}");
    }
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM events").await,
        400,
        "only the acked batches are stored"
    );
    // A path that is not UTF-8 is the client's error, not INTERNAL.
    let mut bad_path = schema.clone();
    bad_path.flight_descriptor = Some(raw::Descriptor {
        r#type: 1,
        cmd: Vec::new(),
        path: vec![b"ev\xffents".to_vec()],
    });
    let (_, end) = raw_put(&server, vec![bad_path, first.clone()]).await;
    let e = end.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // The same in a unary call, which tonic decodes before any handler runs.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let e = grpc
        .unary(
            tonic::Request::new(raw::Descriptor {
                r#type: 1,
                cmd: Vec::new(),
                path: vec![b"ev\xffents".to_vec()],
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/arrow.flight.protocol.FlightService/GetFlightInfo",
            ),
            tonic_prost::ProstCodec::<raw::Descriptor, raw::PutResult>::default(),
        )
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    healthz_latency(&server).await;
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluices_own_names_cannot_be_registered(flavor) {
    // On main: a client could register tables named like Sluice's own PostgreSQL tables
    // (forged offset rows made the sink skip another table's writes, one injected
    // registry row made every restart fail), and a table named _deadletter had the
    // dead-letter files deleted at the next start.
    let pg = PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[("POSTGRES__URL", pg.url.as_str())]);
    let mut client = server.flight().await;
    for name in [
        "_deadletter",
        "_sluice",
        "sluice_sink_offsets",
        "Sluice_x",
        "table_registry",
        "table_registry_versions",
        "schema_migrations",
        "metric_series",
        "metrics_points",
        "metrics_1m",
        // The rollup's ClickHouse tables and views.
        "metrics_1h",
        "METRICS_15s",
        "metrics_1m_merged",
        "metric_range",
    ] {
        let schema = format!(
            r#"{{"name":"{name}","columns":[{{"name":"time","type":"timestamp"}},{{"name":"v","type":"double"}}]}}"#
        );
        let e = action(&mut client, "register_table", &schema)
            .await
            .expect_err("refused over Flight");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}: {e}");
        assert!(e.message().contains("cannot be registered"), "{name}: {e}");
        let r = reqwest::Client::new()
            .post(server.url("/schema/register"))
            .header("content-type", "application/json")
            .body(schema)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{name}");
    }
    // Sluice's bookkeeping is in its own schema, out of the registered tables' way.
    let db = pg.client().await;
    let own: Vec<String> = db
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'sluice' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        own,
        [
            "schema_migrations",
            "sluice_sink_offsets",
            "table_registry_versions"
        ]
    );
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archives_cleanup_deletes_only_files_a_flush_left() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Sluice::start(dir.path(), &[]);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    server.terminate();
    let archive = dir.path().join("archive");
    let keep = [
        archive.join("events/notes/mine.parquet"),
        archive.join("_deadletter/postgres/events/1-2.parquet"),
    ];
    let left = archive.join(
        "events/date=2026-01-01/hour=00/part-00000000000000000001-00000000000000000001-0.parquet",
    );
    for p in keep.iter().chain([&left]) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not really parquet").unwrap();
    }
    let _server = Sluice::start(dir.path(), &[]);
    for p in &keep {
        assert!(p.exists(), "{} was deleted", p.display());
    }
    assert!(
        !left.exists(),
        "a file an interrupted flush left is deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_form_posts_and_cross_site_requests_are_refused() {
    // On main: the HTTP endpoints ignored Content-Type, so any web page could post to a
    // local Sluice cross-site.
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[]);
    let http = reqwest::Client::new();
    let body = r#"{"name":"cpu","columns":[{"name":"time","type":"timestamp"}]}"#;
    let post = |content_type: Option<&str>, extra: Option<(&str, &str)>| {
        let mut r = http.post(server.url("/schema/register")).body(body);
        if let Some(ct) = content_type {
            r = r.header("content-type", ct);
        }
        if let Some((k, v)) = extra {
            r = r.header(k, v);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    for ct in [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
        Some("multipart/form-data; boundary=x"),
    ] {
        assert_eq!(post(ct, None).await, 415, "{ct:?}");
    }
    let json = Some("application/json");
    assert_eq!(
        post(json, Some(("sec-fetch-site", "cross-site"))).await,
        403
    );
    assert_eq!(
        post(json, Some(("origin", "http://evil.example"))).await,
        403
    );
    assert_eq!(post(json, Some(("origin", "null"))).await, 403);
    let own = format!("http://{}", server.http);
    assert_eq!(post(json, Some(("origin", own.as_str()))).await, 200);
    assert_eq!(
        post(Some("application/json; charset=utf-8"), None).await,
        200
    );
    let r = http
        .post(server.url("/query"))
        .header("content-type", "text/plain")
        .body(r#"{"sql":"SELECT 1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("Content-Type: application/json"));
}

fn open_fds(server: &Sluice) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.child.id()))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_bounded_and_closed() {
    // On main: HTTP had no header, body or idle timeouts and no connection limit: about
    // 20,000 idle connections exhausted the file descriptors and a WAL append then
    // failed with `Too many open files`.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SERVER__MAX_CONNECTIONS", "20"),
        ("SERVER__IDLE_TIMEOUT", "2s"),
        ("SERVER__HEADER_TIMEOUT", "1s"),
    ];
    let server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    drop(client);
    let baseline = open_fds(&server);
    // 300 connections that send nothing, to both doors.
    let mut idle = Vec::new();
    for i in 0..300 {
        let addr = if i % 2 == 0 { server.http } else { server.grpc };
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = open_fds(&server);
    assert!(
        held <= baseline + 20 + 4,
        "{held} descriptors open (baseline {baseline}, limit 20)"
    );
    // The accepted ones are closed once idle past the timeout: a read sees the end.
    let mut buf = [0u8; 16];
    let mut closed = 0;
    for c in idle.iter_mut().take(20) {
        if let Ok(Ok(0)) | Ok(Err(_)) =
            tokio::time::timeout(Duration::from_secs(6), c.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(closed > 0, "no idle connection was closed");
    drop(idle);
    // A client that dribbles its headers is cut off after the header timeout.
    let mut slow = tokio::net::TcpStream::connect(server.http).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: sluice\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut cut = false;
    for _ in 0..20 {
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            cut = true;
            break;
        }
        if slow.write_all(b"").await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(10), slow.read(&mut buf)).await
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "a slowloris client kept its connection");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut after {:?}",
        started.elapsed()
    );
    // And the server writes and answers as before.
    let mut client = server.flight().await;
    let out = put(&mut client, "events", vec![events_batch(0, 100)]).await;
    assert!(out.error.is_none(), "{:?}", out.error);
    healthz_latency(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_errors_name_table_and_column_and_check_defaults() {
    // On main: registry errors said `table '?' column '?'`; defaults that did not fit
    // their column were accepted, then every write lacking that column failed; a 50 MB
    // schema was accepted over Flight while HTTP capped at 2 MB.
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[]);
    let mut client = server.flight().await;
    let cases = [
        (
            r#"{"name":"t","columns":[{"name":"time","type":"timestamp"},{"name":"x","type":"doubel"}]}"#,
            "column 'x': unknown type 'doubel'",
        ),
        (
            r#"{"columns":[{"name":"time","type":"timestamp"}]}"#,
            "has no \"name\"",
        ),
        (r#"{"name":"t", "#, "not valid JSON"),
        (
            r#"{"name":"t","columns":[{"name":"time","type":"timestamp"},{"name":"d","type":"date","default":"someday"}]}"#,
            "table 't', column 'd': default \"someday\" does not fit type date",
        ),
        (
            r#"{"name":"t","columns":[{"name":"time","type":"timestamp"},{"name":"u","type":"uuid","default":"x"}]}"#,
            "column 'u': default \"x\" does not fit type uuid",
        ),
        (
            r#"{"name":"t","columns":[{"name":"time","type":"timestamp"},{"name":"n","type":"decimal(4,2)","default":123456}]}"#,
            "column 'n': default 123456 does not fit type decimal(4,2)",
        ),
        (
            r#"{"name":"t","retention":"1 day'; DROP TABLE x; --","columns":[{"name":"time","type":"timestamp"}]}"#,
            "retention '1 day'; DROP TABLE x; --' is not an interval",
        ),
    ];
    for (schema, expected) in cases {
        let e = action(&mut client, "register_table", schema)
            .await
            .expect_err(schema);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains(expected), "{schema}: {e}");
        assert!(!e.message().contains('?'), "{e}");
    }
    // Over 1 MiB: refused over Flight as over HTTP.
    let columns: Vec<String> = (0..30_000)
        .map(|i| format!(r#"{{"name":"c{i:05}_{}","type":"string"}}"#, "x".repeat(20)))
        .collect();
    let huge = format!(
        r#"{{"name":"wide","columns":[{{"name":"time","type":"timestamp"}},{}]}}"#,
        columns.join(",")
    );
    assert!(huge.len() > 1 << 20);
    let e = action(&mut client, "register_table", &huge)
        .await
        .expect_err("too big");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("bytes long"), "{e}");
    let r = reqwest::Client::new()
        .post(server.url("/schema/register"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert!(matches!(r.status().as_u16(), 400 | 413), "{}", r.status());
    // A default that fits is taken and fills the column.
    let ok = r#"{"name":"t","columns":[{"name":"time","type":"timestamp"},{"name":"d","type":"date","default":"2026-01-02"}]}"#;
    action(&mut client, "register_table", ok).await.unwrap();
}

/// A tmpfs of `mib` MiB, unmounted on drop (needs root, as CI runs).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test fills a small tmpfs and needs root to mount it (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_resource_exhausted_unready_and_recovers_without_restart() {
    // On main: a full disk was INTERNAL (not RESOURCE_EXHAUSTED / 507), /readyz said ready
    // while writes failed, and recovery after space was freed needed a restart.
    let fs = Tmpfs::mount(48);
    let data = fs.0.path().join("data");
    let env = [
        ("WAL__SEGMENT_SIZE", "1MiB"),
        ("WAL__DISK_BUDGET", "1GiB"),
        ("SERVER__MAX_MESSAGE_SIZE", "1MiB"),
    ];
    let mut server = Sluice::start(&data, &env);
    let mut client = server.flight().await;
    action(&mut client, "register_table", EVENTS).await.unwrap();
    // Most of the disk taken by something else.
    let filler = fs.0.path().join("filler");
    std::fs::write(&filler, vec![7u8; 36 << 20]).unwrap();
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..1000 {
        let out = put(&mut client, "events", vec![events_batch(i, 20_000)]).await;
        if !out.acks.is_empty() {
            acked.push(i);
        }
        if let Some(e) = out.error {
            refusal = Some(e);
            break;
        }
    }
    let e = refusal.expect("the disk fills up");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("full"), "{e}");
    let r = reqwest::get(server.url("/readyz")).await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["wal"]["disk_full"], true, "{body}");
    // Space comes back: ready again and writing, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let url = server.url("/readyz");
    eventually(Duration::from_secs(10), "ready again", || async {
        reqwest::get(&url).await.unwrap().status().as_u16() == 200
    })
    .await;
    // ids 10_000_000.. (batch 100_000 of 100 rows), apart from the 20_000-row batches'.
    let out = put(&mut client, "events", vec![events_batch(100_000, 100)]).await;
    assert!(out.error.is_none(), "{:?}", out.error);
    server.kill9();
    let server = Sluice::start(&data, &env);
    let ids = event_ids(&server).await;
    let mut expect: Vec<i64> = acked
        .iter()
        .flat_map(|&b| (b * 20_000..(b + 1) * 20_000).collect::<Vec<_>>())
        .collect();
    expect.extend(10_000_000..10_000_100);
    assert_eq!(ids.len(), expect.len(), "every acked row once");
    assert!(ids == expect, "the rows differ from the acked ones");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_table_options_are_parsed_and_written_again_never_pasted() {
    // On main: ClickHouse order_by, partition_by and ttl from a registration were pasted
    // into CREATE TABLE as they were.
    let ch = sluice_test_support::ch::ChServer::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(
        dir.path(),
        &[
            ("CLICKHOUSE__URL", ch.url.as_str()),
            ("CLICKHOUSE__DATABASE", ch.database()),
            ("CLICKHOUSE__LINGER", "50ms"),
        ],
    );
    let mut client = server.flight().await;
    let with = |key: &str, value: &str| {
        format!(
            r#"{{"name":"opts","sinks":["clickhouse"],"columns":[{{"name":"time","type":"timestamp"}},{{"name":"id","type":"int64"}}],"{key}":{}}}"#,
            serde_json::Value::String(value.into())
        )
    };
    for (key, value, why) in [
        (
            "order_by",
            "time) ENGINE = Log; DROP TABLE x; --",
            "';' is not accepted",
        ),
        (
            "order_by",
            "time SETTINGS index_granularity = 1",
            "unexpected",
        ),
        (
            "partition_by",
            "sleep(3)",
            "function 'sleep' is not accepted",
        ),
        ("ttl", "time + INTERVAL 1 DAY TO TABLE other", "VOLUME"),
        ("order_by", "(SELECT 1)", "not a column"),
    ] {
        let e = action(&mut client, "register_table", &with(key, value))
            .await
            .expect_err(value);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(
            e.message().contains(key) && e.message().contains(why),
            "{e}"
        );
    }
    let schema = r#"{"name":"opts","sinks":["clickhouse"],"columns":[{"name":"time","type":"timestamp"},{"name":"id","type":"int64","nullable":false}],
        "order_by":"(id, time)","partition_by":"toYYYYMMDD(time)","ttl":"toDateTime(time) + INTERVAL 30 DAY DELETE"}"#;
    action(&mut client, "register_table", schema).await.unwrap();
    let rows = events_batch(0, 10);
    let out = put(
        &mut client,
        "opts",
        vec![RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                rows.schema().field(0).clone(),
                Field::new("id", DataType::Int64, false),
            ])),
            rows.columns().to_vec(),
        )
        .unwrap()],
    )
    .await;
    assert!(out.error.is_none(), "{:?}", out.error);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = get_json(&server.url("/readyz")).await;
    assert_eq!(r["sinks"]["clickhouse"]["state"], "ok", "{r}");
    wait_sink_caught_up(&server, "clickhouse").await;
    let ddl = ch
        .query(&format!(
            "SELECT create_table_query FROM system.tables WHERE database = '{}' AND name = 'opts'",
            ch.database()
        ))
        .await;
    assert!(ddl.contains("PARTITION BY toYYYYMMDD(time)"), "{ddl}");
    assert!(ddl.contains("ORDER BY (id, time)"), "{ddl}");
    assert!(
        ddl.contains("TTL (toDateTime(time) + toIntervalDay(30))"),
        "{ddl}"
    );
    assert_eq!(ch.query("SELECT count() FROM opts").await.trim(), "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_versions_no_record_needs_are_compacted() {
    // On main: every version was kept; 10 versions of a 50 MB schema made 1.3 GB RSS and
    // a 5 s restart.
    let dir = tempfile::tempdir().unwrap();
    let env = [("WAL__SEGMENT_SIZE", "1MiB"), ("BUFFER__MAX_AGE", "200ms")];
    let server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    let mut columns = vec![
        r#"{"name":"time","type":"timestamp"}"#.to_string(),
        r#"{"name":"id","type":"int64","nullable":false}"#.to_string(),
    ];
    for v in 1..=10i64 {
        if v > 1 {
            columns.push(format!(r#"{{"name":"c{v}","type":"string"}}"#));
        }
        let schema = format!(r#"{{"name":"events","columns":[{}]}}"#, columns.join(","));
        let r = action(&mut client, "register_table", &schema)
            .await
            .unwrap();
        assert_eq!(r["version"], v);
        // A batch bigger than a segment, at this version.
        let out = put(&mut client, "events", vec![events_batch(v, 70_000)]).await;
        assert!(out.error.is_none(), "{:?}", out.error);
    }
    let registry = dir.path().join("registry/tables.jsonl");
    let versions_stored = || {
        std::fs::read_to_string(&registry)
            .unwrap()
            .lines()
            .filter(|l| l.contains(r#""name":"events""#))
            .count()
    };
    eventually(
        Duration::from_secs(30),
        "old versions to be compacted",
        || async { versions_stored() <= 3 },
    )
    .await;
    let mut server = server;
    server.terminate();
    let server = Sluice::start(dir.path(), &env);
    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(DISTINCT id) FROM events").await,
        10 * 70_000
    );
    let schema = action(&mut client, "get_table", r#"{"name":"events"}"#)
        .await
        .unwrap();
    assert_eq!(schema["version"], 10);
}
