//! The real OpenTelemetry Python SDK (from PyPI) exporting to the real binary with each of
//! its OTLP exporters: gRPC (gzip), HTTP/protobuf (gzip) and HTTP/JSON
//! (`opentelemetry-exporter-otlp-json-http`). `tests/otel/send.py` sends logs (attributes,
//! trace context, a non-string body), spans (an event, a link, an error status) and one
//! of each metric instrument (the histogram inside the span, so it carries exemplars);
//! every value is then read back from ClickHouse (logs, spans, span events), PostgreSQL
//! (metric_series, metrics_points, and metrics_events for the exemplars) and Sluice's own
//! SQL.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use sluice_test_support::ch::ChServer;

use crate::common::*;

const PROTOCOLS: [&str; 3] = ["grpc", "http-protobuf", "http-json"];
/// The script's base time, 2026-12-01T10:00:00Z, in microseconds.
const T0_US: i64 = 1_796_119_200_000_000;

/// The Python with the OpenTelemetry SDK: `$SLUICE_TEST_PYTHON`, else the repo's `.venv`
/// (which `scripts/test` fills).
fn python() -> PathBuf {
    std::env::var_os("SLUICE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the SDK script for `protocol` against `server` as service `service`; returns the
/// ids it reports.
fn send(server: &Sluice, protocol: &str, service: &str) -> Value {
    let out = Command::new(python())
        .arg(repo().join("tests/otel/send.py"))
        .args(["--protocol", protocol, "--service", service])
        .args(["--grpc", &server.grpc.to_string()])
        .args(["--http", &server.url("")])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (run scripts/test, which installs the OpenTelemetry SDK into .venv): {e}",
                python().display()
            )
        });
    assert!(
        out.status.success(),
        "the {protocol} SDK run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the {protocol} SDK run printed no ids ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn service(protocol: &str) -> String {
    format!("sdk-{protocol}")
}

/// A JSON text column as its value (the log body that was not a string).
fn as_json(v: &Value) -> Value {
    v.as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| v.clone())
}

/// The two log records each run sends, as `logs_events` rows (time in ms).
fn expected_logs(protocol: &str, ids: &Value) -> Vec<Value> {
    let svc = service(protocol);
    let context = |extra: Value| {
        let mut labels = json!({
            "resource.service.name": svc,
            "resource.host.name": "sdk-host",
            "resource.deployment.environment": "test",
            "scope.name": "sdk.logger",
            "scope.version": "2.0",
        });
        labels
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        labels
    };
    vec![
        json!({
            "ms": T0_US / 1000 + 3, "service": svc, "host": "sdk-host", "level": "WARN",
            "trace_id": ids["trace_id"], "span_id": ids["parent_span_id"],
            "message": {"msg": "slow cart", "ms": 1500},
            "labels": context(json!({"user": "u1", "attempt": "3", "ratio": "0.5", "ok": "false"})),
        }),
        json!({
            "ms": T0_US / 1000 + 4, "service": svc, "host": "sdk-host", "level": "error",
            "trace_id": ids["trace_id"], "span_id": ids["parent_span_id"],
            "message": "card declined",
            "labels": context(json!({"user": "u2"})),
        }),
    ]
}

/// Keeps only the resource labels the test sets (the SDK adds `telemetry.sdk.*`).
fn known_labels(mut labels: Value) -> Value {
    if let Some(m) = labels.as_object_mut() {
        m.retain(|k, _| {
            !k.starts_with("resource.telemetry.") && !k.starts_with("resource.service.instance")
        });
    }
    labels
}

/// The spans of each run, as `spans` rows (times in µs), and their one event.
fn expected_spans(protocol: &str, ids: &Value) -> (Vec<Value>, Vec<Value>) {
    let svc = service(protocol);
    let links = json!([{
        "trace_id": ids["link_trace_id"], "span_id": ids["link_span_id"],
        "trace_state": "", "attributes": {"link.reason": "retry"},
    }]);
    let spans = vec![
        json!({
            "trace_id": ids["trace_id"], "span_id": ids["parent_span_id"], "parent_span_id": "",
            "service": svc, "name": "GET /cart", "start_us": T0_US, "end_us": T0_US + 10_000,
            "duration_ns": 10_000_000, "status_code": "Error", "status_message": "payment failed",
            "kind": "Server", "route": "/cart", "retries": "2", "links": links,
        }),
        json!({
            "trace_id": ids["trace_id"], "span_id": ids["child_span_id"],
            "parent_span_id": ids["parent_span_id"], "service": svc, "name": "SELECT carts",
            "start_us": T0_US + 2_000, "end_us": T0_US + 5_000, "duration_ns": 3_000_000,
            "status_code": "Unset", "status_message": "", "kind": "Client",
            "route": null, "retries": null, "links": null,
        }),
    ];
    let events = vec![json!({
        "trace_id": ids["trace_id"], "span_id": ids["parent_span_id"], "ts_us": T0_US + 1_000,
        "name": "cache.miss", "attr": {"key": "cart:42", "size": "3"},
    })];
    (spans, events)
}

/// The metric rows each run makes, `(metric_name, labels without the resource/scope ones,
/// value)`, sorted; the exponential histogram's buckets are checked on their own.
fn expected_metrics() -> Vec<(String, Value, f64)> {
    let mut rows = vec![
        (
            "orders",
            json!({"region": "eu", "otel.temporality": "cumulative", "otel.monotonic": "true", "otel.unit": "{order}"}),
            7.0,
        ),
        (
            "orders",
            json!({"region": "us", "otel.temporality": "cumulative", "otel.monotonic": "true", "otel.unit": "{order}"}),
            1.0,
        ),
        (
            "queue.depth",
            json!({"otel.temporality": "cumulative", "otel.monotonic": "false"}),
            7.0,
        ),
        (
            "temperature",
            json!({"room": "a", "otel.unit": "Cel"}),
            21.5,
        ),
    ];
    let hist = |extra: Value| {
        let mut m = json!({"route": "/cart", "otel.temporality": "delta", "otel.unit": "ms"});
        m.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        m
    };
    // The SDK's default explicit bounds; 3, 7, 7 and 120 recorded.
    let bounds = [
        "0", "5", "10", "25", "50", "75", "100", "250", "500", "750", "1000", "2500", "5000",
        "7500", "10000", "+Inf",
    ];
    let cumulative = [
        0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0,
    ];
    for (le, v) in bounds.iter().zip(cumulative) {
        rows.push(("latency_bucket", hist(json!({ "le": le })), v));
    }
    for (suffix, v) in [("sum", 137.0), ("count", 4.0), ("min", 3.0), ("max", 120.0)] {
        rows.push((
            match suffix {
                "sum" => "latency_sum",
                "count" => "latency_count",
                "min" => "latency_min",
                _ => "latency_max",
            },
            hist(json!({})),
            v,
        ));
    }
    let exp = json!({"otel.temporality": "delta", "otel.unit": "By"});
    for (name, v) in [
        ("payload.size_sum", 1007.0),
        ("payload.size_count", 4.0),
        ("payload.size_min", 1.0),
        ("payload.size_max", 1000.0),
    ] {
        rows.push((name, exp.clone(), v));
    }
    let mut rows: Vec<(String, Value, f64)> = rows
        .into_iter()
        .map(|(n, l, v)| (n.to_string(), l, v))
        .collect();
    rows.sort_by(|a, b| (&a.0, a.1.to_string()).cmp(&(&b.0, b.1.to_string())));
    rows
}

/// The exemplars of the histogram recorded inside the server span: the SDK keeps the last
/// measurement of each bucket it hit (3, 7 and 120), each pointing at the span.
fn expected_exemplars(ids: &Value) -> Vec<Value> {
    [3.0, 7.0, 120.0]
        .iter()
        .map(|v| {
            json!({"value": v, "trace_id": ids["trace_id"], "level": "exemplar", "host": "sdk-host",
                   "labels": {"metric_name": "latency", "span_id": ids["parent_span_id"]}})
        })
        .collect()
}

/// Splits the metric rows of one service into the fixed ones (compared with
/// [`expected_metrics`]) and checks the exponential histogram's buckets: each is the count
/// of the recorded values (1, 2, 4, 1000) at or below its `le`.
fn check_metrics(protocol: &str, rows: Vec<(String, Value, f64)>) {
    let svc = service(protocol);
    let mut fixed = Vec::new();
    let mut buckets = 0;
    for (name, labels, value) in rows {
        let mut labels = known_labels(labels);
        let m = labels.as_object_mut().unwrap();
        assert_eq!(
            m.remove("resource.service.name"),
            Some(json!(svc)),
            "{name}"
        );
        assert_eq!(m.remove("resource.host.name"), Some(json!("sdk-host")));
        assert_eq!(
            m.remove("resource.deployment.environment"),
            Some(json!("test"))
        );
        assert_eq!(m.remove("scope.name"), Some(json!("sdk.meter")));
        assert_eq!(m.remove("scope.version"), Some(json!("3.0")));
        if name == "payload.size_bucket" {
            let le = m.remove("le").unwrap();
            assert_eq!(
                labels,
                json!({"otel.temporality": "delta", "otel.unit": "By"})
            );
            let le: f64 = match le.as_str().unwrap() {
                "+Inf" => f64::INFINITY,
                s => s.parse().unwrap(),
            };
            let below = [1.0, 2.0, 4.0, 1000.0].iter().filter(|v| **v <= le).count();
            assert_eq!(
                value, below as f64,
                "{protocol}: payload.size_bucket le={le}"
            );
            buckets += 1;
        } else {
            fixed.push((name, labels, value));
        }
    }
    assert!(buckets >= 3, "{protocol}: {buckets} exponential buckets");
    fixed.sort_by(|a, b| (&a.0, a.1.to_string()).cmp(&(&b.0, b.1.to_string())));
    assert_eq!(fixed, expected_metrics(), "{protocol}");
}

/// Every OTLP table read back through Sluice's SQL (`POST /query`).
async fn check_sql(server: &Sluice, protocol: &str, ids: &Value) {
    let svc = service(protocol);
    let logs = get_rows(
        server,
        &format!(
            "SELECT level, trace_id, span_id, host, message FROM logs_events \
             WHERE service = '{svc}' ORDER BY timestamp"
        ),
    )
    .await;
    let got: Vec<Value> = logs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            json!({"level": r["level"], "trace_id": r["trace_id"], "span_id": r["span_id"],
                   "host": r["host"], "message": as_json(&r["message"])})
        })
        .collect();
    let want: Vec<Value> = expected_logs(protocol, ids)
        .into_iter()
        .map(|r| {
            json!({"level": r["level"], "trace_id": r["trace_id"], "span_id": r["span_id"],
                   "host": r["host"], "message": r["message"]})
        })
        .collect();
    assert_eq!(got, want, "{protocol}: logs_events through SQL");

    let spans = get_rows(
        server,
        &format!(
            "SELECT name, span_id, parent_span_id, duration_ns, status_code, status_message \
             FROM spans WHERE service = '{svc}' ORDER BY start_time"
        ),
    )
    .await;
    let (want_spans, want_events) = expected_spans(protocol, ids);
    let want: Vec<Value> = want_spans
        .iter()
        .map(|s| {
            json!({"name": s["name"], "span_id": s["span_id"], "parent_span_id": s["parent_span_id"],
                   "duration_ns": s["duration_ns"], "status_code": s["status_code"],
                   "status_message": s["status_message"]})
        })
        .collect();
    assert_eq!(spans, json!(want), "{protocol}: spans through SQL");
    let events = get_rows(
        server,
        &format!(
            "SELECT name, span_id FROM span_events WHERE trace_id = '{}'",
            ids["trace_id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(
        events,
        json!([{"name": want_events[0]["name"], "span_id": want_events[0]["span_id"]}]),
        "{protocol}: span_events through SQL"
    );

    let metrics = get_rows(
        server,
        &format!(
            "SELECT metric_name, labels, value FROM metrics \
             WHERE labels LIKE '%\"resource.service.name\":\"{svc}\"%'"
        ),
    )
    .await;
    let rows = metrics
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metric_name"].as_str().unwrap().to_string(),
                as_json(&r["labels"]),
                r["value"].as_f64().unwrap(),
            )
        })
        .collect();
    check_metrics(protocol, rows);

    let exemplars = get_rows(
        server,
        &format!(
            "SELECT value, trace_id, level, host, labels FROM metrics_events \
             WHERE app = '{svc}' ORDER BY value"
        ),
    )
    .await;
    let got: Vec<Value> = exemplars
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["labels"] = as_json(&r["labels"]);
            r
        })
        .collect();
    assert_eq!(
        got,
        expected_exemplars(ids),
        "{protocol}: exemplars through SQL"
    );
}

async fn check_clickhouse(ch: &ChServer, protocol: &str, ids: &Value) {
    let svc = service(protocol);
    let lines = |text: String| -> Vec<Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let settings = "SETTINGS output_format_json_quote_64bit_integers = 0 FORMAT JSONEachRow";
    let logs = lines(
        ch.query(&format!(
            "SELECT toUnixTimestamp64Milli(timestamp) AS ms, service, host, level, trace_id, \
             span_id, message, labels FROM logs_events WHERE service = '{svc}' ORDER BY ms {settings}"
        ))
        .await,
    );
    let got: Vec<Value> = logs
        .into_iter()
        .map(|mut r| {
            r["message"] = as_json(&r["message"]);
            r["labels"] = known_labels(r["labels"].take());
            r
        })
        .collect();
    assert_eq!(
        got,
        expected_logs(protocol, ids),
        "{protocol}: logs_events in ClickHouse"
    );

    let spans = lines(
        ch.query(&format!(
            "SELECT trace_id, span_id, parent_span_id, service, name, \
             toUnixTimestamp64Micro(start_time) AS start_us, toUnixTimestamp64Micro(end_time) AS end_us, \
             duration_ns, status_code, status_message, attr['span.kind'] AS kind, \
             if(mapContains(attr, 'http.route'), attr['http.route'], NULL) AS route, \
             if(mapContains(attr, 'retries'), attr['retries'], NULL) AS retries, \
             if(mapContains(attr, 'links'), attr['links'], NULL) AS links \
             FROM spans WHERE service = '{svc}' ORDER BY start_us {settings}"
        ))
        .await,
    );
    let got: Vec<Value> = spans
        .into_iter()
        .map(|mut r| {
            r["links"] = as_json(&r["links"]);
            r
        })
        .collect();
    let (want_spans, want_events) = expected_spans(protocol, ids);
    assert_eq!(got, want_spans, "{protocol}: spans in ClickHouse");

    let events = lines(
        ch.query(&format!(
            "SELECT trace_id, span_id, toUnixTimestamp64Micro(ts) AS ts_us, name, attr \
             FROM span_events WHERE trace_id = '{}' {settings}",
            ids["trace_id"].as_str().unwrap()
        ))
        .await,
    );
    assert_eq!(events, want_events, "{protocol}: span_events in ClickHouse");
}

async fn check_postgres(db: &tokio_postgres::Client, protocol: &str, ids: &Value) {
    let exemplars: Vec<Value> = db
        .query(
            "SELECT value, trace_id, level, host, labels::text FROM metrics_events \
             WHERE app = $1 ORDER BY value",
            &[&service(protocol)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let labels: String = r.get(4);
            json!({"value": r.get::<_, f64>(0), "trace_id": r.get::<_, String>(1),
                   "level": r.get::<_, String>(2), "host": r.get::<_, String>(3),
                   "labels": serde_json::from_str::<Value>(&labels).unwrap()})
        })
        .collect();
    assert_eq!(
        exemplars,
        expected_exemplars(ids),
        "{protocol}: exemplars in PostgreSQL"
    );
    let rows = db
        .query(
            "SELECT ms.metric_name, ms.labels::text, mp.value \
             FROM metrics_points mp JOIN metric_series ms USING (series_id) \
             WHERE ms.labels->>'resource.service.name' = $1",
            &[&service(protocol)],
        )
        .await
        .unwrap();
    let got = rows
        .iter()
        .map(|r| {
            let labels: String = r.get(1);
            (
                r.get::<_, String>(0),
                serde_json::from_str::<Value>(&labels).unwrap(),
                r.get::<_, f64>(2),
            )
        })
        .collect();
    check_metrics(protocol, got);
}

/// The embedded default (no database): every exporter's data is in SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_exports_over_every_otlp_exporter_land_in_sql() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[]);
    for protocol in PROTOCOLS {
        let ids = send(&server, protocol, &service(protocol));
        check_sql(&server, protocol, &ids).await;
    }
    let metrics = get_text(&server.url("/metrics")).await;
    for (protocol, table) in [
        ("otlp_grpc", "logs_events"),
        ("otlp_http", "spans"),
        ("otlp_http", "metrics"),
    ] {
        assert!(
            metrics.contains(&format!(
                r#"sluice_ingest_rows_total{{protocol="{protocol}",table="{table}"}}"#
            )),
            "{protocol} {table}: {metrics}"
        );
    }
}

/// The settings of a server writing to `ch`, its sink quick to send.
fn with_clickhouse<'a>(ch: &'a ChServer, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("CLICKHOUSE__URL", ch.url.as_str()),
        ("CLICKHOUSE__DATABASE", ch.database()),
        ("CLICKHOUSE__LINGER", "50ms"),
    ];
    env.extend_from_slice(more);
    env
}

sluice_test_support::pg_test! {
/// With both stores: logs and traces in ClickHouse, metrics in PostgreSQL, value by value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_exports_land_in_clickhouse_and_postgres(flavor) {
    let ch = ChServer::start();
    let pg = sluice_test_support::pg::PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(
        dir.path(),
        &with_clickhouse(
            &ch,
            &[("POSTGRES__URL", pg.url.as_str()), ("POSTGRES__LINGER", "50ms")],
        ),
    );
    let mut sent = Vec::new();
    for protocol in PROTOCOLS {
        sent.push((protocol, send(&server, protocol, &service(protocol))));
    }
    wait_sink_caught_up(&server, "clickhouse").await;
    wait_sink_caught_up(&server, "postgres").await;
    let db = pg.client().await;
    for (protocol, ids) in &sent {
        check_clickhouse(&ch, protocol, ids).await;
        check_postgres(&db, protocol, ids).await;
    }
}
}

/// Every column of `table` as ClickHouse reports it: `name type` in table order.
async fn ch_columns(ch: &ChServer, table: &str) -> Vec<String> {
    ch.query(&format!(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase() \
         AND table = '{table}' ORDER BY position FORMAT TSV"
    ))
    .await
    .lines()
    .map(|l| l.replace('\t', " "))
    .collect()
}

/// `[otlp] otel_tables`: the SDK's logs and spans also land in the OpenTelemetry
/// Collector ClickHouse exporter's tables, with that exporter's column types, and the
/// queries the Grafana ClickHouse plugin runs over them (trace lookup by id through
/// `otel_traces_trace_id_ts`, the span tree with events and links, log rows by service)
/// answer with the SDK's values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_exports_also_land_in_the_otel_collector_exporter_tables() {
    let ch = ChServer::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(
        dir.path(),
        &with_clickhouse(&ch, &[("OTLP__OTEL_TABLES", "true")]),
    );
    let mut sent = Vec::new();
    for protocol in ["grpc", "http-json"] {
        sent.push((protocol, send(&server, protocol, &service(protocol))));
    }
    wait_sink_caught_up(&server, "clickhouse").await;

    // The exporter's column names and types, exactly.
    assert_eq!(
        ch_columns(&ch, "otel_logs").await,
        [
            "Timestamp DateTime64(9)",
            "TimestampTime DateTime",
            "TraceId String",
            "SpanId String",
            "TraceFlags UInt8",
            "SeverityText LowCardinality(String)",
            "SeverityNumber UInt8",
            "ServiceName LowCardinality(String)",
            "Body String",
            "ResourceSchemaUrl LowCardinality(String)",
            "ResourceAttributes Map(LowCardinality(String), String)",
            "ScopeSchemaUrl LowCardinality(String)",
            "ScopeName String",
            "ScopeVersion LowCardinality(String)",
            "ScopeAttributes Map(LowCardinality(String), String)",
            "LogAttributes Map(LowCardinality(String), String)",
        ]
    );
    assert_eq!(
        ch_columns(&ch, "otel_traces").await,
        [
            "Timestamp DateTime64(9)",
            "TraceId String",
            "SpanId String",
            "ParentSpanId String",
            "TraceState String",
            "SpanName LowCardinality(String)",
            "SpanKind LowCardinality(String)",
            "ServiceName LowCardinality(String)",
            "ResourceAttributes Map(LowCardinality(String), String)",
            "ScopeName String",
            "ScopeVersion String",
            "SpanAttributes Map(LowCardinality(String), String)",
            "Duration UInt64",
            "StatusCode LowCardinality(String)",
            "StatusMessage String",
            "Events.Timestamp Array(DateTime64(9))",
            "Events.Name Array(LowCardinality(String))",
            "Events.Attributes Array(Map(LowCardinality(String), String))",
            "Links.TraceId Array(String)",
            "Links.SpanId Array(String)",
            "Links.TraceState Array(String)",
            "Links.Attributes Array(Map(LowCardinality(String), String))",
        ]
    );
    assert_eq!(
        ch_columns(&ch, "otel_traces_trace_id_ts").await,
        ["TraceId String", "Start DateTime", "End DateTime"]
    );

    let settings = "SETTINGS output_format_json_quote_64bit_integers = 0 FORMAT JSONEachRow";
    let rows = |text: String| -> Vec<Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    for (protocol, ids) in &sent {
        let svc = service(protocol);
        let trace = ids["trace_id"].as_str().unwrap();
        // The log view: a service's records, newest last, with their context.
        let logs = rows(
            ch.query(&format!(
                "SELECT toUnixTimestamp64Nano(Timestamp) AS ns, TraceId, SpanId, TraceFlags, \
                 SeverityText, SeverityNumber, Body, ScopeName, ScopeVersion, \
                 ResourceAttributes['host.name'] AS host, LogAttributes \
                 FROM otel_logs WHERE ServiceName = '{svc}' ORDER BY Timestamp {settings}"
            ))
            .await,
        );
        let t0 = T0_US * 1000;
        let log = |ns: i64, text: &str, number: u8, body: Value, attrs: Value| {
            json!({"ns": ns, "TraceId": trace, "SpanId": ids["parent_span_id"], "TraceFlags": ids["trace_flags"],
                   "SeverityText": text, "SeverityNumber": number, "Body": body,
                   "ScopeName": "sdk.logger", "ScopeVersion": "2.0", "host": "sdk-host",
                   "LogAttributes": attrs})
        };
        let got: Vec<Value> = logs
            .into_iter()
            .map(|mut r| {
                r["Body"] = as_json(&r["Body"]);
                r
            })
            .collect();
        assert_eq!(
            got,
            [
                log(
                    t0 + 3_000_000,
                    "WARN",
                    13,
                    json!({"msg": "slow cart", "ms": 1500}),
                    json!({"user": "u1", "attempt": "3", "ratio": "0.5", "ok": "false"})
                ),
                log(
                    t0 + 4_000_000,
                    "",
                    17,
                    json!("card declined"),
                    json!({"user": "u2"})
                ),
            ],
            "{protocol}: otel_logs"
        );

        // The trace view: find the trace's time range by id, then its spans with their
        // events and links, as the Grafana plugin's trace query does.
        let spans = rows(
            ch.query(&format!(
                "WITH '{trace}' AS id, \
                   (SELECT min(Start) FROM otel_traces_trace_id_ts WHERE TraceId = id) AS first, \
                   (SELECT max(End) + 1 FROM otel_traces_trace_id_ts WHERE TraceId = id) AS last \
                 SELECT SpanId, ParentSpanId, ServiceName, SpanName, SpanKind, \
                   toUnixTimestamp64Nano(Timestamp) AS start_ns, Duration, StatusCode, StatusMessage, \
                   ScopeName, SpanAttributes, \
                   arrayMap((n, t, a) -> (n, toUnixTimestamp64Nano(t), a), \
                            Events.Name, Events.Timestamp, Events.Attributes) AS events, \
                   arrayMap((t, s, a) -> (t, s, a), Links.TraceId, Links.SpanId, Links.Attributes) AS links \
                 FROM otel_traces \
                 WHERE TraceId = id AND Timestamp >= first AND Timestamp <= last \
                 ORDER BY Timestamp {settings}"
            ))
            .await,
        );
        assert_eq!(
            spans,
            [
                json!({"SpanId": ids["parent_span_id"], "ParentSpanId": "", "ServiceName": svc,
                       "SpanName": "GET /cart", "SpanKind": "SPAN_KIND_SERVER",
                       "start_ns": t0, "Duration": 10_000_000,
                       "StatusCode": "STATUS_CODE_ERROR", "StatusMessage": "payment failed",
                       "ScopeName": "sdk.tracer",
                       "SpanAttributes": {"http.route": "/cart", "retries": "2"},
                       "events": [["cache.miss", t0 + 1_000_000, {"key": "cart:42", "size": "3"}]],
                       "links": [[ids["link_trace_id"], ids["link_span_id"], {"link.reason": "retry"}]]}),
                json!({"SpanId": ids["child_span_id"], "ParentSpanId": ids["parent_span_id"],
                       "ServiceName": svc, "SpanName": "SELECT carts",
                       "SpanKind": "SPAN_KIND_CLIENT", "start_ns": t0 + 2_000_000,
                       "Duration": 3_000_000, "StatusCode": "STATUS_CODE_UNSET",
                       "StatusMessage": "", "ScopeName": "sdk.tracer", "SpanAttributes": {},
                       "events": [], "links": []}),
            ],
            "{protocol}: otel_traces"
        );
    }
    // The seed tables got the same records as always.
    let seed_logs = ch.query("SELECT count() FROM logs_events FORMAT TSV").await;
    assert_eq!(seed_logs.trim(), "4");
}

/// A client's own `otel_logs` (other columns) is not Sluice's to change: with
/// `otel_tables` on, the server refuses to start and says why; without ClickHouse the
/// switch is refused as a configuration error naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_tables_never_take_over_a_clients_table_of_that_name() {
    let dir = tempfile::tempdir().unwrap();
    let err = Sluice::start_refused(dir.path(), &[("OTLP__OTEL_TABLES", "true")]);
    assert!(
        err.contains("otlp.otel_tables") && err.contains("[clickhouse] url"),
        "{err}"
    );

    let ch = ChServer::start();
    {
        let server = Sluice::start(dir.path(), &with_clickhouse(&ch, &[]));
        let mut client = server.flight().await;
        action(
            &mut client,
            "register_table",
            r#"{"name":"otel_logs","columns":[{"name":"t","type":"timestamp"},{"name":"msg","type":"string"}]}"#,
        )
        .await
        .unwrap();
    }
    let err = Sluice::start_refused(
        dir.path(),
        &with_clickhouse(&ch, &[("OTLP__OTEL_TABLES", "true")]),
    );
    assert!(
        err.contains("a table named 'otel_logs' is already registered with other columns"),
        "{err}"
    );
}
