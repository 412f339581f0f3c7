//! OTLP logs through the real binary: the gRPC `LogsService` on the Flight port (gzip)
//! and `POST /v1/logs` (protobuf, gzip), landing in `logs_events` column by column,
//! with partial success and the refusals OTLP exporters understand.

use std::io::Write;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use crate::common::*;

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

/// `n` records of `service`, bodies "`service` i", one with a time past i64 nanoseconds
/// when `bad` is set.
fn request(service: &str, n: u64, bad: bool) -> ExportLogsServiceRequest {
    let mut records: Vec<LogRecord> = (0..n)
        .map(|i| LogRecord {
            time_unix_nano: 1_796_119_200_000_000_000 + i * 1_000_000,
            severity_number: 9,
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(format!("{service} {i}"))),
            }),
            attributes: vec![kv("i", &i.to_string())],
            trace_id: vec![0x0f; 16],
            ..Default::default()
        })
        .collect();
    if bad {
        records.push(LogRecord {
            time_unix_nano: u64::MAX,
            ..Default::default()
        });
    }
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service), kv("host.name", "h1")],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_logs_over_grpc_and_http_land_in_logs_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[]);

    // gRPC, gzip, with one record that cannot be stored: partial success.
    let mut grpc = LogsServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let resp = grpc
        .export(request("api", 100, true))
        .await
        .unwrap()
        .into_inner();
    let partial = resp.partial_success.expect("one record rejected");
    assert_eq!(partial.rejected_log_records, 1);
    assert!(
        partial.error_message.contains("log record 101"),
        "{}",
        partial.error_message
    );

    // HTTP protobuf, gzip: full success is an empty response.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&request("web", 50, false).encode_to_vec())
        .unwrap();
    let http = reqwest::Client::new();
    let r = http
        .post(server.url("/v1/logs"))
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-protobuf");
    let resp = ExportLogsServiceResponse::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(resp.partial_success, None);

    // The rows, column by column.
    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM logs_events").await,
        150
    );
    let rows = get_rows(
        &server,
        "SELECT CAST(timestamp AS BIGINT) AS t, service, host, level, trace_id, span_id, message
         FROM logs_events WHERE message IN ('api 3', 'web 0') ORDER BY service",
    )
    .await;
    assert_eq!(
        rows,
        serde_json::json!([
            {"t": 1_796_119_200_003i64, "service": "api", "host": "h1", "level": "info",
             "trace_id": "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f", "span_id": "", "message": "api 3"},
            {"t": 1_796_119_200_000i64, "service": "web", "host": "h1", "level": "info",
             "trace_id": "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f", "span_id": "", "message": "web 0"},
        ])
    );

    // Refusals an exporter understands, each with a google.rpc.Status body in the
    // request's own form; nothing stored.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Status {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(string, tag = "2")]
        message: String,
    }
    for (content_type, body, code, says) in [
        ("text/plain", b"{}".to_vec(), 415, "application/x-protobuf or application/json"),
        ("application/x-protobuf", vec![0xff; 64], 400, "not an OTLP ExportLogsServiceRequest"),
        ("application/json", b"{not json".to_vec(), 400, "the body is not JSON"),
        (
            "application/json",
            br#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"body":{"stringValue":"x"}},{"traceId":"zz"}]}]}]}"#.to_vec(),
            400,
            "resourceLogs[0].scopeLogs[0].logRecords[1].traceId: 'zz' is not hex",
        ),
        (
            "application/json",
            format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            400,
            "recursion limit",
        ),
    ] {
        let r = http
            .post(server.url("/v1/logs"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), code, "{content_type} {says}");
        let json = content_type == "application/json";
        assert_eq!(
            r.headers()["content-type"],
            if json { "application/json" } else { "application/x-protobuf" }
        );
        let bytes = r.bytes().await.unwrap();
        let (status_code, message) = if json {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            (v["code"].as_i64().unwrap() as i32, v["message"].as_str().unwrap().to_string())
        } else {
            let s = Status::decode(bytes).unwrap();
            (s.code, s.message)
        };
        assert_eq!(status_code, tonic::Code::InvalidArgument as i32, "{message}");
        assert!(message.contains(says), "'{says}' not in '{message}'");
    }
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM logs_events").await,
        150
    );
    // OTLP/JSON: hex ids in any case, int64 as strings; the answer in JSON, with the
    // partial success counted as a string.
    let r = http
        .post(server.url("/v1/logs"))
        .header("content-type", "application/json")
        .body(
            r#"{"resourceLogs":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"json"}}]},
                "scopeLogs":[{"logRecords":[
                  {"timeUnixNano":"1796119200007000000","severityNumber":"SEVERITY_NUMBER_WARN",
                   "body":{"kvlistValue":{"values":[{"key":"n","value":{"intValue":"9007199254740993"}}]}},
                   "traceId":"0F0F0F0F0F0F0F0F0F0F0F0F0F0F0F0F","spanId":"00f067aa0ba902b7"},
                  {"timeUnixNano":"18446744073709551615"}]}]}]}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        answer["partialSuccess"]["rejectedLogRecords"], "1",
        "{answer}"
    );
    assert!(
        answer["partialSuccess"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("log record 2"),
        "{answer}"
    );
    let rows = get_rows(
        &server,
        "SELECT CAST(timestamp AS BIGINT) AS t, level, trace_id, span_id, message
         FROM logs_events WHERE service = 'json'",
    )
    .await;
    assert_eq!(
        rows,
        serde_json::json!([{"t": 1_796_119_200_007i64, "level": "warn",
            "trace_id": "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f", "span_id": "00f067aa0ba902b7",
            "message": r#"{"n":9007199254740993}"#}])
    );
    let page = get_text(&server.url("/metrics")).await;
    for protocol in ["otlp_grpc", "otlp_http"] {
        let line =
            format!(r#"sluice_ingest_rows_total{{protocol="{protocol}",table="logs_events"}}"#);
        assert!(page.contains(&line), "{line} missing: {page}");
    }
}

/// OTLP traces over gRPC and HTTP: spans land in `spans`, their events in `span_events`,
/// links in `attr['links']`; one span past i64 nanoseconds is a partial success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_traces_land_in_spans_and_span_events() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

    let request = |service: &str, n: u64, bad: bool| {
        let mut spans: Vec<Span> = (0..n)
            .map(|i| Span {
                trace_id: vec![i as u8 + 1; 16],
                // Both requests use the same trace ids: the span ids tell them apart.
                span_id: vec![if service == "api" { 0x22 } else { 0x23 }; 8],
                name: format!("{service} op"),
                kind: 2,
                start_time_unix_nano: 1_796_119_200_000_000_000 + i * 1_000_000,
                end_time_unix_nano: 1_796_119_200_005_000_000 + i * 1_000_000,
                events: vec![Event {
                    time_unix_nano: 1_796_119_200_001_000_000,
                    name: "retry".into(),
                    attributes: vec![kv("attempt", "2")],
                    ..Default::default()
                }],
                links: vec![Link {
                    trace_id: vec![0x44; 16],
                    span_id: vec![0x55; 8],
                    ..Default::default()
                }],
                status: Some(Status {
                    code: if i == 0 { 2 } else { 1 },
                    message: String::new(),
                }),
                ..Default::default()
            })
            .collect();
        if bad {
            spans.push(Span {
                start_time_unix_nano: u64::MAX,
                ..Default::default()
            });
        }
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[]);
    let mut grpc = TraceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let resp = grpc
        .export(request("api", 10, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.partial_success.unwrap().rejected_spans, 1);
    let r = reqwest::Client::new()
        .post(server.url("/v1/traces"))
        .header("content-type", "application/x-protobuf")
        .body(request("web", 5, false).encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let resp = ExportTraceServiceResponse::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(resp.partial_success, None);

    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM spans").await,
        15
    );
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM span_events").await,
        15
    );
    let rows = get_rows(
        &server,
        "SELECT s.service, s.name, s.duration_ns, s.status_code, s.attr['span.kind'] AS kind,
                e.name AS event
         FROM spans s JOIN span_events e USING (trace_id, span_id)
         WHERE s.trace_id = '01010101010101010101010101010101' ORDER BY s.service",
    )
    .await;
    assert_eq!(
        rows,
        serde_json::json!([
            {"service": "api", "name": "api op", "duration_ns": 5_000_000, "status_code": "Error",
             "kind": "Server", "event": "retry"},
            {"service": "web", "name": "web op", "duration_ns": 5_000_000, "status_code": "Error",
             "kind": "Server", "event": "retry"},
        ])
    );
}

/// kill -9 while an OTLP exporter sends: every request answered with success is there
/// exactly once after the restart (and nothing is there twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_otlp_export_keeps_every_answered_request_once() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("WAL__SEGMENT_SIZE", "1MiB"), ("BUFFER__MAX_AGE", "300ms")];
    let mut server = Sluice::start(dir.path(), &env);
    let mut grpc = LogsServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    // Requests go out one after another from a task; the kill lands after 25 answers,
    // while the next request is in flight.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sender = tokio::spawn(async move {
        for k in 0..10_000u64 {
            let service = format!("r{k}");
            if grpc.export(request(&service, 200, false)).await.is_err() {
                return;
            }
            if tx.send(k).is_err() {
                return;
            }
        }
    });
    let mut answered = Vec::new();
    while answered.len() < 25 {
        answered.push(rx.recv().await.expect("answers before the kill"));
    }
    server.kill9();
    let _ = sender.await;
    while let Ok(k) = rx.try_recv() {
        answered.push(k);
    }

    let server = Sluice::start(dir.path(), &env);
    let rows = get_rows(
        &server,
        "SELECT service, count(*) AS n, count(DISTINCT message) AS d FROM logs_events GROUP BY service",
    )
    .await;
    let counts: std::collections::HashMap<String, (i64, i64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["service"].as_str().unwrap().to_string(),
                (r["n"].as_i64().unwrap(), r["d"].as_i64().unwrap()),
            )
        })
        .collect();
    for k in &answered {
        assert_eq!(
            counts.get(&format!("r{k}")),
            Some(&(200, 200)),
            "request {k} was answered with success"
        );
    }
    // A request cut off by the kill is there whole or not at all, never twice.
    for (service, (n, d)) in &counts {
        assert_eq!((*n, *d), (200, 200), "{service}");
    }
}

/// A full memory budget over OTLP: gRPC answers UNAVAILABLE with a 1 s RetryInfo, HTTP
/// 503 with `Retry-After: 1`; nothing of a refused request is stored, everything answered
/// with success is, and the refused request sent again later is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_budget_is_unavailable_with_a_retry_delay() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), MEMORY_FILLS_UP);
    let mut grpc = LogsServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let (mut stored, mut refused_round) = (0i64, None);
    for round in 0..200 {
        match grpc
            .export(request(&format!("r{round}"), 5000, false))
            .await
        {
            Ok(resp) => {
                assert_eq!(resp.into_inner().partial_success, None);
                stored += 5000;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    status.message().contains("memory budget"),
                    "{}",
                    status.message()
                );
                let delay = status.get_details_retry_info().and_then(|r| r.retry_delay);
                assert_eq!(delay, Some(std::time::Duration::from_secs(1)));
                refused_round = Some(round);
                break;
            }
        }
    }
    let refused_round = refused_round.expect("UNAVAILABLE once the memory budget is full");
    assert!(
        stored > 0,
        "some exports went through before the budget filled"
    );

    // OTLP/HTTP, while the budget is still full: 503 and Retry-After.
    let r = reqwest::Client::new()
        .post(server.url("/v1/logs"))
        .header("content-type", "application/x-protobuf")
        .body(request("http-full", 5000, false).encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");

    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM logs_events").await,
        stored,
        "nothing of a refused export is stored"
    );

    // Sent again once the store keeps up (a restart without the stalled archive).
    let mut server = server;
    assert!(server.terminate().success());
    let server = Sluice::start(dir.path(), &[]);
    let mut grpc = LogsServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let resp = grpc
        .export(request(&format!("r{refused_round}"), 5000, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.partial_success, None);
    let mut client = server.flight().await;
    assert_eq!(
        query_i64(&mut client, "SELECT count(*) FROM logs_events").await,
        stored + 5000
    );
    assert_eq!(
        query_i64(
            &mut client,
            "SELECT count(DISTINCT message) FROM logs_events"
        )
        .await,
        stored + 5000,
        "every record once"
    );
}
