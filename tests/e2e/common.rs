//! Test harness: starts the real `sluice` binary on free loopback ports with its own
//! data directory, and gives Flight and HTTP clients for it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{Action, FlightClient, FlightDescriptor, PutResult, Ticket};
use futures::{Stream, StreamExt, TryStreamExt};

pub struct Sluice {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

/// A `sluice` command for `data_dir` with `env` overrides (`("WAL__FSYNC", "false")` sets
/// `SLUICE__WAL__FSYNC`).
pub fn sluice_command(data_dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.env("SLUICE__SERVER__DATA_DIR", data_dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(format!("SLUICE__{k}"), v);
    }
    cmd
}

/// Runs `sluice <args>` for `data_dir` (the example config) to its end: (exit code,
/// stdout, stderr).
pub fn sluice_cli(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = sluice_command(data_dir, env)
        .args(args)
        .arg("--config")
        .arg(example_config())
        .output()
        .expect("run sluice");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A server whose memory budget fills up and stays full: 16 MiB of memory, small
/// messages and recent buffer, and an archive throttled to 1 KiB/s, so nothing frees it.
pub const MEMORY_FILLS_UP: &[(&str, &str)] = &[
    ("MEMORY__BUDGET", "16MiB"),
    ("SERVER__MAX_MESSAGE_SIZE", "4MiB"),
    ("BUFFER__MAX_BYTES", "4MiB"),
    ("ARCHIVE__THROTTLE_BYTES_PER_SEC", "1KiB"),
];

/// The repo's example config, loaded by every test server.
pub fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice.example.toml")
}

impl Sluice {
    /// Starts `sluice serve` with the example config, free ports, `data_dir`, and `env`
    /// overrides (`("WAL__FSYNC", "false")` sets `SLUICE__WAL__FSYNC`).
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Sluice {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("serve")
            .arg("--config")
            .arg(example_config())
            .env("SLUICE__SERVER__GRPC_ADDR", "127.0.0.1:0")
            .env("SLUICE__SERVER__HTTP_ADDR", "127.0.0.1:0")
            .env("SLUICE__SERVER__DATA_DIR", data_dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(format!("SLUICE__{k}"), v);
        }
        let mut child = cmd.spawn().expect("spawn sluice");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("sluice did not print SLUICE_READY within 60 s"));
        let mut grpc = None;
        let mut http = None;
        for part in line.split_whitespace() {
            if let Some(a) = part.strip_prefix("grpc=") {
                grpc = a.parse().ok();
            }
            if let Some(a) = part.strip_prefix("http=") {
                http = a.parse().ok();
            }
        }
        assert!(
            line.starts_with("SLUICE_READY"),
            "unexpected first line: {line}"
        );
        Sluice {
            child,
            grpc: grpc.expect("grpc addr"),
            http: http.expect("http addr"),
        }
    }

    /// Starts `sluice serve` as [`Sluice::start`] does, expecting it to refuse to start;
    /// returns what it printed on stderr.
    pub fn start_refused(data_dir: &Path, env: &[(&str, &str)]) -> String {
        let out = sluice_command(data_dir, env)
            .arg("serve")
            .arg("--config")
            .arg(example_config())
            .env("SLUICE__SERVER__GRPC_ADDR", "127.0.0.1:0")
            .env("SLUICE__SERVER__HTTP_ADDR", "127.0.0.1:0")
            .output()
            .expect("run sluice serve");
        assert!(
            !out.status.success(),
            "sluice serve started although it should not: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub async fn flight(&self) -> FlightClient {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .expect("connect flight");
        FlightClient::new_from_inner(
            FlightServiceClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for exit (at most 30 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A field of /proc/<pid>/status in kB (VmRSS, VmHWM).
    pub fn proc_status_kb(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        text.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{field} not in /proc status"))
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a Flight action and returns its single result body as JSON.
pub async fn action(
    client: &mut FlightClient,
    name: &str,
    body: &str,
) -> Result<serde_json::Value, tonic::Status> {
    let mut results = client
        .do_action(Action::new(name, body.to_string()))
        .await
        .map_err(to_status)?;
    let first = results
        .next()
        .await
        .expect("one result")
        .map_err(to_status)?;
    Ok(serde_json::from_slice(&first).expect("json result"))
}

pub fn to_status(e: arrow_flight::error::FlightError) -> tonic::Status {
    match e {
        arrow_flight::error::FlightError::Tonic(s) => *s,
        other => tonic::Status::unknown(other.to_string()),
    }
}

/// Acks of a DoPut, or the error that ended it after the acks before it.
pub struct PutOutcome {
    pub acks: Vec<serde_json::Value>,
    pub error: Option<tonic::Status>,
}

impl PutOutcome {
    pub fn rows(&self) -> u64 {
        self.acks.iter().map(|a| a["rows"].as_u64().unwrap()).sum()
    }
}

/// DoPut of a stream of batches to `table`; collects acks until the end or an error.
pub async fn put_stream(
    client: &mut FlightClient,
    table: &str,
    batches: impl Stream<Item = RecordBatch> + Send + 'static,
) -> PutOutcome {
    let data = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![table.to_string()])))
        .with_max_flight_data_size(usize::MAX)
        .build(batches.map(Ok));
    let mut acks = Vec::new();
    let mut error = None;
    match client.do_put(data).await {
        Ok(mut results) => loop {
            match results.next().await {
                Some(Ok(PutResult { app_metadata })) => {
                    acks.push(serde_json::from_slice(&app_metadata).expect("ack json"))
                }
                Some(Err(e)) => {
                    error = Some(to_status(e));
                    break;
                }
                None => break,
            }
        },
        Err(e) => error = Some(to_status(e)),
    }
    PutOutcome { acks, error }
}

pub async fn put(client: &mut FlightClient, table: &str, batches: Vec<RecordBatch>) -> PutOutcome {
    put_stream(client, table, futures::stream::iter(batches)).await
}

/// Runs SQL through DoGet and returns the batches.
pub async fn query(
    client: &mut FlightClient,
    sql: &str,
) -> Result<Vec<RecordBatch>, tonic::Status> {
    let stream = client
        .do_get(Ticket::new(sql.to_string()))
        .await
        .map_err(to_status)?;
    stream.try_collect().await.map_err(to_status)
}

/// One scalar of the first row of a query (integer).
pub async fn query_i64(client: &mut FlightClient, sql: &str) -> i64 {
    let batches = query(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let b = batches.iter().find(|b| b.num_rows() > 0).expect("a row");
    let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64).unwrap();
    col.as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0)
}

/// Waits until `f` returns true (polling every 100 ms) or panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows of a query as JSON, through `POST /query`.
pub async fn get_rows(server: &Sluice, sql: &str) -> serde_json::Value {
    reqwest::Client::new()
        .post(server.url("/query"))
        .json(&serde_json::json!({ "sql": sql }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// GET `url` and decode the JSON body.
pub async fn get_json(url: &str) -> serde_json::Value {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body is not JSON: {e}"))
}

/// Starts a DoPut of `batches` to `table` in the background. Each ack's JSON is sent on
/// the returned channel as it arrives; the task ends with the call's error, if any.
pub fn spawn_put(
    mut client: FlightClient,
    table: &str,
    batches: impl Stream<Item = RecordBatch> + Send + 'static,
) -> (
    tokio::task::JoinHandle<Option<tonic::Status>>,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let data = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![table.to_string()])))
        .build(batches.map(Ok));
    let task = tokio::spawn(async move {
        let mut results = match client.do_put(data).await {
            Ok(r) => r,
            Err(e) => return Some(to_status(e)),
        };
        while let Some(r) = results.next().await {
            match r {
                Ok(r) => {
                    let _ = tx.send(serde_json::from_slice(&r.app_metadata).expect("ack json"));
                }
                Err(e) => return Some(to_status(e)),
            }
        }
        None
    });
    (task, rx)
}

/// GET `url` and return the body as text (e.g. `/metrics`).
pub async fn get_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// The `events` table of the durability tests: a time and a unique id per row.
pub const EVENTS: &str = r#"{"name":"events","columns":[
    {"name":"time","type":"timestamp"},
    {"name":"id","type":"int64","nullable":false}]}"#;

/// Batch `i` of `events`: ids `i * rows .. (i + 1) * rows`, timestamped now.
pub fn events_batch(i: i64, rows: i64) -> RecordBatch {
    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("id", DataType::Int64, false),
    ]));
    let now = chrono::Utc::now().timestamp_micros();
    let ids: Vec<i64> = (i * rows..(i + 1) * rows).collect();
    RecordBatch::try_new(
        schema,
        vec![
            std::sync::Arc::new(
                TimestampMicrosecondArray::from_iter_values(ids.iter().map(|k| now + k))
                    .with_timezone("UTC"),
            ),
            std::sync::Arc::new(Int64Array::from(ids)),
        ],
    )
    .unwrap()
}

/// Streams `events` batches of `rows` rows, from batch `from` on, until `kill_after_acks`
/// acks arrived, then kill -9s the server; returns the indexes of the batches acked.
pub async fn stream_until_killed(
    server: &mut Sluice,
    from: i64,
    kill_after_acks: usize,
    rows: i64,
) -> Vec<i64> {
    let client = server.flight().await;
    let stream = futures::stream::iter(from..from + 1_000_000).map(move |i| events_batch(i, rows));
    let (task, mut rx) = spawn_put(client, "events", stream);
    let mut acked = Vec::new();
    while acked.len() < kill_after_acks {
        let ack = rx.recv().await.expect("acks before the kill");
        acked.push(ack["request_id"].as_i64().unwrap());
    }
    server.kill9();
    let _ = task.await;
    while let Ok(ack) = rx.try_recv() {
        acked.push(ack["request_id"].as_i64().unwrap());
    }
    // request_id is 1-based within this call.
    acked.into_iter().map(|r| from + r - 1).collect()
}

/// Streams 200 `events` batches of `rows` rows, 10 ms apart; after 30 acks calls `stop`
/// (a store goes down), checks that acks keep coming and that `/readyz` shows `sink`
/// retrying while the server stays ready, then calls `restart`. Returns the indexes of
/// the batches acked (all 200).
pub async fn stream_through_store_restart(
    server: &Sluice,
    sink: &str,
    rows: i64,
    stop: impl FnOnce(),
    restart: impl FnOnce(),
) -> Vec<i64> {
    let client = server.flight().await;
    let stream = futures::stream::iter(0..200i64).then(move |i| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        events_batch(i, rows)
    });
    let (task, mut rx) = spawn_put(client, "events", stream);
    let mut acked = Vec::new();
    while acked.len() < 30 {
        acked.push(
            rx.recv().await.expect("ack")["request_id"]
                .as_i64()
                .unwrap()
                - 1,
        );
    }
    stop();
    // Writes are still acked (into the WAL) while the store is down...
    while acked.len() < 90 {
        let ack = rx.recv().await.expect("acks while the store is down");
        acked.push(ack["request_id"].as_i64().unwrap() - 1);
    }
    // ...and the sink says it is retrying.
    let url = server.url("/readyz");
    eventually(
        Duration::from_secs(20),
        "the sink to report retrying",
        || async {
            let r = get_json(&url).await;
            r["sinks"][sink]["state"] == "retrying" && r["ready"] == true
        },
    )
    .await;
    restart();
    assert!(task.await.unwrap().is_none(), "the call completes");
    while let Some(ack) = rx.recv().await {
        acked.push(ack["request_id"].as_i64().unwrap() - 1);
    }
    assert_eq!(acked.len(), 200);
    acked
}

/// Waits until `sink` has taken everything in the WAL and its last attempt succeeded.
pub async fn wait_sink_caught_up(server: &Sluice, sink: &str) {
    let url = server.url("/readyz");
    eventually(Duration::from_secs(60), "the sink to catch up", || async {
        let r = get_json(&url).await;
        r["sinks"][sink]["lag_records"] == 0 && r["sinks"][sink]["state"] == "ok"
    })
    .await;
}

/// The rows of `sink`'s dead-letter files for `table` in the default archive under
/// `data_dir`: `(value of the int64 column `column`, _sluice_error)`, sorted.
pub fn dead_letter_rows(
    data_dir: &Path,
    sink: &str,
    table: &str,
    column: &str,
) -> Vec<(i64, String)> {
    use arrow::array::{Int64Array, StringArray};
    let dir = data_dir.join("archive/_deadletter").join(sink).join(table);
    let mut dead = Vec::new();
    for e in std::fs::read_dir(&dir).expect("dead-letter folder") {
        let f = std::fs::File::open(e.unwrap().path()).unwrap();
        for b in parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(f, 1024).unwrap() {
            let b = b.unwrap();
            let v = b
                .column_by_name(column)
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone();
            let err = b
                .column_by_name("_sluice_error")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone();
            dead.extend((0..b.num_rows()).map(|i| (v.value(i), err.value(i).to_string())));
        }
    }
    dead.sort();
    dead
}

/// The value of one sample (`name{labels}`, exactly as exposed) in a Prometheus text
/// page; 0 when absent.
pub fn metric(page: &str, sample: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A CA (`dir/ca.pem`) and a server certificate it signed for `san` (e.g. `DNS:localhost`,
/// `DNS:localhost,IP:127.0.0.1`), made with openssl (scripts/test installs it); returns
/// the server's (certificate, key) paths.
pub fn test_certificates(dir: &Path, san: &str) -> (PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/test installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("leaf.ext"),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    let ca = "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=sluice-test-ca \
              -keyout ca.key -out ca.pem";
    let csr = "req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout key.pem -out leaf.csr";
    let sign = "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
                -extfile leaf.ext -out cert.pem";
    for args in [ca, csr, sign] {
        openssl(&args.split_whitespace().collect::<Vec<_>>());
    }
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Every id of every acked batch (`batch * rows..(batch + 1) * rows`) is in `ids`, and no
/// id is there twice.
/// Every `id` of `events` through SQL (over Flight).
pub async fn event_ids(server: &Sluice) -> Vec<i64> {
    use arrow::array::AsArray;
    let mut client = server.flight().await;
    let batches = query(&mut client, "SELECT id FROM events ORDER BY id")
        .await
        .expect("query events");
    batches
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec()
        })
        .collect()
}

pub fn assert_each_acked_once(what: &str, ids: &[i64], acked_batches: &[i64], rows: i64) {
    let mut counts: std::collections::HashMap<i64, u32> = std::collections::HashMap::new();
    for id in ids {
        *counts.entry(*id).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(dups.is_empty(), "{what}: duplicated ids {dups:?}");
    for b in acked_batches {
        for id in b * rows..(b + 1) * rows {
            assert!(
                counts.contains_key(&id),
                "{what}: acked id {id} (batch {b}) is missing"
            );
        }
    }
}

/// A table `nest` with lists of timestamps and of maps in columns named like ClickHouse
/// `Nested` subcolumns, routed to `sinks` (a JSON list such as `["postgres"]`, or all).
pub fn nest_table(sinks: Option<&str>) -> String {
    let sinks = sinks.map_or(String::new(), |s| format!(r#""sinks":{s},"#));
    format!(
        r#"{{"name":"nest",{sinks}"columns":[
            {{"name":"time","type":"timestamp"}},
            {{"name":"id","type":"int64","nullable":false}},
            {{"name":"Events.Timestamp","type":"timestamp_ns[]","default":[]}},
            {{"name":"Events.Attributes","type":"map[]"}}]}}"#
    )
}

/// Two rows of [`nest_table`] as NDJSON: one with two event times (RFC 3339 and integer
/// nanoseconds) and two attribute maps, one with neither.
pub const NEST_ROWS: &str = r#"{"time": 1796119200000, "id": 1, "Events.Timestamp": ["2026-12-01T10:00:00.000000001Z", 1796119200000000002], "Events.Attributes": [{"a": "1"}, {}]}
{"time": 1796119200001, "id": 2}
"#;

/// `POST /write/{table}` of an NDJSON body, which must be answered 200.
pub async fn write_ndjson(server: &Sluice, table: &str, body: &str) {
    let resp = reqwest::Client::new()
        .post(server.url(&format!("/write/{table}")))
        .header("content-type", "application/x-ndjson")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

/// Starts sluice writing to `ch`, with small chunks and quick retries.
pub fn start_with_ch(
    dir: &Path,
    ch: &sluice_test_support::ch::ChServer,
    extra: &[(&str, &str)],
) -> Sluice {
    let mut env: Vec<(&str, &str)> = vec![
        ("CLICKHOUSE__URL", ch.url.as_str()),
        ("CLICKHOUSE__DATABASE", ch.database()),
        ("CLICKHOUSE__BATCH_ROWS", "5000"),
        ("CLICKHOUSE__LINGER", "50ms"),
        ("CLICKHOUSE__RETRY_INITIAL", "50ms"),
        ("CLICKHOUSE__RETRY_MAX", "500ms"),
    ];
    env.extend_from_slice(extra);
    Sluice::start(dir, &env)
}

/// A connection to the test PostgreSQL, in UTC.
pub async fn pg_client(pg: &sluice_test_support::pg::PgServer) -> tokio_postgres::Client {
    let c = sluice::postgres::connect(&pg.url)
        .await
        .expect("connect to the test PostgreSQL");
    c.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    c
}

/// The bigint a query answers, -1 on error.
pub async fn pg_count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1)
}
