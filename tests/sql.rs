//! `POST /v1/sql` against the real binary: only reading statements run, a heavy query times out
//! without starving ingest or health checks, the output formats, and the row cap.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{Server, llm_event};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::json;

/// Billions of rows, aggregated: far beyond any timeout in these tests, yet constant memory.
/// The filter keeps the row count from being answered from statistics.
const HEAVY: &str = "SELECT count(*) FROM generate_series(1, 3000000) AS a \
                     CROSS JOIN generate_series(1, 3000000) AS b WHERE (a.value * b.value) % 7 = 3";

async fn server_with_events(args: &[&str]) -> Server {
    let server = Server::start(args);
    let events: Vec<_> = (0..20)
        .map(|i| llm_event(["acme", "globex"][i % 2], &format!("e{i}"), i as i64, 1))
        .collect();
    assert_eq!(server.post_json(&events).await.accepted(), 20);
    server
}

#[tokio::test]
async fn only_reading_statements_run() {
    let server = server_with_events(&[]).await;
    let refused = [
        (
            "CREATE TABLE t (a INT)",
            "CREATE statements are not allowed",
        ),
        (
            "CREATE TABLE t AS SELECT * FROM events",
            "CREATE statements are not allowed",
        ),
        (
            "CREATE VIEW v AS SELECT 1",
            "CREATE statements are not allowed",
        ),
        (
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "CREATE EXTERNAL TABLE statements are not allowed",
        ),
        ("DROP TABLE events", "DROP statements are not allowed"),
        (
            "INSERT INTO events (tenant) VALUES ('x')",
            "INSERT statements are not allowed",
        ),
        ("DELETE FROM events", "DELETE statements are not allowed"),
        (
            "UPDATE events SET tenant = 'x'",
            "UPDATE statements are not allowed",
        ),
        (
            "COPY events TO '/tmp/meterd-copy-test.csv'",
            "COPY statements are not allowed",
        ),
        (
            "COPY (SELECT 1) TO '/tmp/meterd-copy-test.csv'",
            "COPY statements are not allowed",
        ),
        (
            "SET datafusion.execution.batch_size = 1",
            "SET statements are not allowed",
        ),
        (
            "EXPLAIN ANALYZE INSERT INTO events (tenant) VALUES ('x')",
            "INSERT statements are not allowed",
        ),
        (
            "SELECT 1; SELECT 2",
            "only one SELECT, WITH, EXPLAIN or SHOW statement per request; got 2 statements",
        ),
        ("SELECT 1; DROP TABLE events", "got 2 statements"),
        ("", "got 0 statements"),
        ("SELEC 1", "SELEC"),
        ("SELECT nope FROM events", "nope"),
        ("SELECT * FROM no_such_table", "no_such_table"),
    ];
    for (sql, reason) in refused {
        let reply = server.sql_reply(sql).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{sql:?}: {}",
            reply.text
        );
        assert!(
            reply.error().contains(reason),
            "{sql:?}: expected {reason:?} in {:?}",
            reply.error()
        );
    }
    assert!(
        !std::path::Path::new("/tmp/meterd-copy-test.csv").exists(),
        "COPY wrote a file"
    );
    // Nothing changed, and reading statements still work.
    assert_eq!(server.count("true").await, 20);
    for sql in [
        "SELECT tenant, count(*) FROM events GROUP BY tenant",
        "WITH t AS (SELECT * FROM events) SELECT count(*) FROM t",
        "EXPLAIN SELECT count(*) FROM events",
        "SHOW TABLES",
        "SHOW COLUMNS FROM events",
        "SELECT 1;",
    ] {
        let reply = server.sql_reply(sql).await;
        assert_eq!(reply.status, StatusCode::OK, "{sql:?}: {}", reply.text);
    }
    // The request body itself: {"sql": ...} and nothing else.
    let r = server
        .client
        .post(format!("{}/v1/sql", server.url))
        .json(&json!({"query": "SELECT 1"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn answer_shape() {
    let server = server_with_events(&[]).await;
    let v = server.sql("SELECT tenant, count(*) AS n, sum(input_tokens) AS tokens FROM events GROUP BY tenant ORDER BY tenant").await;
    assert_eq!(v["columns"][0], json!({"name": "tenant", "type": "Utf8"}));
    assert_eq!(v["columns"][1]["name"], "n");
    assert_eq!(v["columns"][2]["name"], "tokens");
    // 0+2+..+18 for acme, 1+3+..+19 for globex.
    assert_eq!(v["rows"], json!([["acme", 10, 90], ["globex", 10, 100]]));
    let time = server
        .scalar("SELECT time FROM events WHERE id = 'e0'")
        .await;
    let time = time.as_str().expect("timestamps are strings");
    chrono::DateTime::parse_from_rfc3339(time)
        .unwrap_or_else(|e| panic!("{time:?} is not RFC 3339: {e}"));
    assert!(time.ends_with('Z'), "{time}");
}

#[tokio::test]
async fn heavy_query_times_out_while_ingest_and_health_answer() {
    let server = Arc::new(server_with_events(&["--query-timeout-secs", "0.5"]).await);
    let in_flight = Arc::new(AtomicBool::new(false));
    let answered_during_query = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    // Probes: ingest and health, back to back, for as long as the heavy queries run.
    let probe = {
        let (server, in_flight, answered, stop) = (
            Arc::clone(&server),
            Arc::clone(&in_flight),
            Arc::clone(&answered_during_query),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let started_during_query = in_flight.load(Ordering::SeqCst);
                let health = server.get_status("/healthz").await;
                assert_eq!(health, StatusCode::OK, "/healthz during a heavy query");
                let reply = server
                    .post_json(&[llm_event("probe", &format!("p{i}"), 1, 1)])
                    .await;
                assert_eq!(
                    reply.accepted(),
                    1,
                    "ingest during a heavy query: {reply:?}"
                );
                if started_during_query && in_flight.load(Ordering::SeqCst) {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
            }
            i
        })
    };

    // Heavy queries one after another until probes have been answered while one was running.
    let mut timeouts = 0;
    while answered_during_query.load(Ordering::SeqCst) < 3 && timeouts < 20 {
        in_flight.store(true, Ordering::SeqCst);
        let reply = server.sql_reply(HEAVY).await;
        in_flight.store(false, Ordering::SeqCst);
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text);
        assert_eq!(reply.error(), "query exceeded the 500ms timeout");
        timeouts += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let probes = probe.await.expect("probe task");
    assert!(
        answered_during_query.load(Ordering::SeqCst) >= 3,
        "ingest and /healthz were starved: only {} of {probes} probes completed while a heavy query ran ({timeouts} queries)",
        answered_during_query.load(Ordering::SeqCst)
    );
    // The timed-out queries left nothing behind that stops later ones.
    assert_eq!(server.count("tenant = 'probe'").await, probes as u64);
    assert_eq!(server.get_status("/readyz").await, StatusCode::OK);
}

#[tokio::test]
async fn formats_have_their_content_types() {
    let server = server_with_events(&[]).await;
    let query = "SELECT id, tenant, input_tokens, time, dimensions FROM events ORDER BY id LIMIT 3";

    let r = server.sql_response(query, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[CONTENT_TYPE], "application/json");

    let r = server.sql_response(query, Some("ndjson")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[CONTENT_TYPE], "application/x-ndjson");
    let text = r.text().await.expect("body");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0]["id"], "e0");
    assert_eq!(lines[0]["tenant"], "acme");
    assert_eq!(lines[0]["dimensions"]["agent"], "faq");
    assert!(
        lines[0]["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{text}"
    );

    let r = server.sql_response(query, Some("csv")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()[CONTENT_TYPE]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(ct.starts_with("text/csv"), "{ct}");
    let text = r.text().await.expect("body");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "id,tenant,input_tokens,time,dimensions");
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[1].starts_with("e0,acme,0,"), "{text}");

    let r = server.sql_response(query, Some("arrow")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()[CONTENT_TYPE],
        "application/vnd.apache.arrow.stream"
    );
    let bytes = r.bytes().await.expect("body");
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes.to_vec()), None)
            .expect("an Arrow IPC stream");
    let schema = reader.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        ["id", "tenant", "input_tokens", "time", "dimensions"]
    );
    let rows: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 3);

    let r = server.sql_response(query, Some("xml")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.expect("body").contains("unknown format"));
}

#[tokio::test]
async fn row_cap_is_413() {
    let server = server_with_events(&["--query-max-rows", "10"]).await;
    let reply = server.sql_reply("SELECT * FROM events").await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text
    );
    assert!(
        reply.error().contains("more than 10 rows"),
        "{}",
        reply.text
    );
    for format in ["ndjson", "csv", "arrow"] {
        let r = server
            .sql_response("SELECT * FROM generate_series(1, 1000000)", Some(format))
            .await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{format}");
    }
    // At the cap is fine.
    let v = server
        .sql("SELECT id FROM events ORDER BY id LIMIT 10")
        .await;
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(10));
    assert_eq!(
        server.scalar("SELECT count(*) FROM events").await,
        json!(20)
    );
}

#[tokio::test]
async fn acknowledged_events_are_queryable_at_once() {
    // A long flush interval: everything read here comes from the unflushed tail.
    let server = Server::start(&["--flush-interval-ms", "600000"]);
    for i in 0..30 {
        let reply = server
            .post_json(&[llm_event("acme", &format!("now-{i}"), 1, 1)])
            .await;
        assert_eq!(reply.accepted(), 1);
        assert_eq!(
            server.count("true").await,
            i + 1,
            "event {i} is visible right after its 200"
        );
    }
}
