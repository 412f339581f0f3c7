//! The same failure has the same class through every door: a query that fails over HTTP
//! with a 4xx fails over Flight DoGet with the matching gRPC code, never INTERNAL, and the
//! other way round (one mapping each, in `server/frontends/src/edge.rs`).

use crate::common::*;

/// The gRPC code an HTTP status stands for, in Sluice's one mapping.
fn grpc_code_of(http: u16) -> tonic::Code {
    match http {
        400 => tonic::Code::InvalidArgument,
        404 => tonic::Code::NotFound,
        409 => tonic::Code::FailedPrecondition,
        429 | 507 => tonic::Code::ResourceExhausted,
        503 => tonic::Code::Unavailable,
        504 => tonic::Code::DeadlineExceeded,
        _ => tonic::Code::Internal,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_query_has_one_class_over_http_and_flight() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(dir.path(), &[("QUERY__MEMORY_LIMIT", "64MiB")]);
    let mut client = server.flight().await;
    action(
        &mut client,
        "register_table",
        r#"{"name":"t","columns":[{"name":"time","type":"timestamp"},{"name":"v","type":"int64"},{"name":"s","type":"string"}]}"#,
    )
    .await
    .unwrap();
    let bad = [
        "SELEC 1",
        "SELECT * FROM no_such_table",
        "SELECT no_such_column FROM t",
        "SELECT CAST('x' AS INT)",
        "SELECT 1 / 0",
        "SELECT v + s FROM t",
        "SELECT sum(s) FROM t",
        "SELECT no_such_function(1)",
        "SELECT CAST('2026-13-45' AS TIMESTAMP)",
        // Past query.memory_limit: the same query fails again, so it is not "retry later".
        "SELECT length(repeat('x', 1000000000))",
        // Past query.max_depth.
        &format!("SELECT {}", vec!["1"; 950].join("+")),
    ];
    for sql in &bad {
        let r = reqwest::Client::new()
            .post(server.url("/query"))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "sql": sql }).to_string())
            .send()
            .await
            .expect("POST /query");
        let http = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        let flight = query(&mut client, sql)
            .await
            .expect_err("refused over Flight too");
        assert_eq!(
            grpc_code_of(http),
            flight.code(),
            "{sql}: HTTP {http} ({body}) but Flight {flight}"
        );
        assert_eq!(
            http, 400,
            "{sql}: a bad query is the client's error: {body}"
        );
    }
}
