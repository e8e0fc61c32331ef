//! `POST /v1/sql` against the real binary: only reading statements run, a heavy query times out
//! without starving ingest or health checks, the output formats, and the row cap.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{Server, llm_event};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;
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
    assert_eq!(
        v["columns"][0],
        json!({"name": "tenant", "type": "VARCHAR"})
    );
    assert_eq!(v["columns"][1]["type"], "BIGINT");
    assert_eq!(v["columns"][2]["type"], "DECIMAL(38, 0)");
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
    // Sent in pieces, with its length known from the start.
    let length: usize = r.headers()[reqwest::header::CONTENT_LENGTH]
        .to_str()
        .ok()
        .and_then(|l| l.parse().ok())
        .expect("a Content-Length");
    let text = r.text().await.expect("body");
    assert_eq!(text.len(), length);
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

/// Runs `tests/clients/<script>` with `args`; its stdout as JSON.
fn client_script(script: &str, args: &[&str]) -> Value {
    let path = format!("{}/tests/clients/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(common::clients_python())
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Sums of counts up to 2^63-1 are exact (never wrapped, never rounded), in `events` and in
/// the embedded store's rollups; types are SQL names; every timestamp has an offset.
#[tokio::test]
async fn sums_are_exact_and_answers_read_as_sql() {
    let server = Server::start(&[]);
    let mut events: Vec<Value> = (0..3)
        .map(|i| llm_event("big", &format!("max-{i}"), i64::MAX, i64::MAX))
        .collect();
    events.push(llm_event("big", "one", 1, 0));
    events.push(llm_event("small", "two", 2, 3));
    assert_eq!(server.post_json(&events).await.accepted(), 5);

    // 3 * (2^63 - 1) + 1, which wraps to -2 in BIGINT arithmetic.
    let exact = "27670116110564327422";
    let v = server
        .sql(
            "SELECT tenant, CAST(sum(input_tokens) AS VARCHAR) AS total, sum(output_tokens) AS out \
             FROM events GROUP BY tenant ORDER BY tenant",
        )
        .await;
    assert_eq!(v["rows"][0][0], "big");
    assert_eq!(v["rows"][0][1], exact);
    assert_eq!(v["columns"][2]["type"], "DECIMAL(38, 0)");
    assert_eq!(v["rows"][1], json!(["small", "2", 3]));
    for relation in ["usage_hourly", "usage_daily"] {
        let rows = server
            .rows(&format!(
                "SELECT CAST(sum(input_tokens) AS VARCHAR), sum(events) FROM {relation} \
                 WHERE tenant = 'big'"
            ))
            .await;
        assert_eq!(rows, vec![vec![json!(exact), json!(4)]], "{relation}");
    }
    // The same in the text formats: digits, not a float.
    let csv = server
        .sql_response(
            "SELECT sum(input_tokens) AS total FROM events WHERE tenant = 'big'",
            Some("csv"),
        )
        .await
        .text()
        .await
        .expect("csv");
    assert_eq!(csv, format!("total\n{exact}\n"));
    let json_text = server
        .sql_response(
            "SELECT sum(input_tokens) AS total FROM events WHERE tenant = 'big'",
            None,
        )
        .await
        .text()
        .await
        .expect("json");
    assert!(json_text.contains(&format!("[[{exact}]]")), "{json_text}");

    // SQL type names, and an offset on every timestamp, now() included.
    let v = server
        .sql(
            "SELECT tenant, input_tokens, time, dimensions, now() AS now, \
             CAST('2026-11-29 10:00:00' AS TIMESTAMP) AS naive FROM events LIMIT 1",
        )
        .await;
    let types: Vec<&str> = v["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "VARCHAR",
            "BIGINT",
            "TIMESTAMP WITH TIME ZONE",
            "MAP(VARCHAR, VARCHAR)",
            "TIMESTAMP WITH TIME ZONE",
            "TIMESTAMP"
        ]
    );
    for i in [2, 4, 5] {
        let text = v["rows"][0][i].as_str().expect("timestamp text");
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339 with an offset: {e}"));
        assert!(text.ends_with('Z'), "{text}");
    }
    assert_eq!(v["rows"][0][5], "2026-11-29T10:00:00Z");
    for format in ["ndjson", "csv"] {
        let text = server
            .sql_response("SELECT now() AS now", Some(format))
            .await
            .text()
            .await
            .expect("body");
        let stamp = text
            .trim()
            .rsplit(['\n', '"'])
            .find(|part| part.len() > 20)
            .unwrap_or_else(|| panic!("no timestamp in {text:?}"));
        chrono::DateTime::parse_from_rfc3339(stamp)
            .unwrap_or_else(|e| panic!("{format}: {stamp:?} has no offset: {e}"));
    }
}

/// The embedded store serves `usage_hourly` and `usage_daily`, equal to a GROUP BY over
/// `events` written independently of the rollup definitions, also when a query bounds `bucket`
/// (which the rollup turns into bounds on `time`).
#[tokio::test]
async fn the_embedded_store_serves_the_rollups() {
    let server = Server::start(&["--flush-interval-ms", "200"]);
    let now = chrono::Utc::now();
    let mut events = common::generated(
        17,
        4_000,
        5,
        std::time::Duration::from_secs(6 * 86_400),
        0.0,
    );
    let edge_day = chrono::DurationRound::duration_trunc(
        now - chrono::TimeDelta::days(2),
        chrono::TimeDelta::days(1),
    )
    .expect("trunc");
    events.extend(common::rollups::edge_events(edge_day));
    let keys = common::distinct_keys(&events).len() as u64;
    let mut accepted = 0;
    for chunk in events.chunks(500) {
        accepted += server.post_ndjson(chunk).await.accepted();
    }
    assert_eq!(accepted, keys);
    // Some events in Parquet files, the latest in memory: the rollups read both.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    events.push(llm_event("late", "late-1", 7, 7));
    server
        .post_json(&events[events.len() - 1..])
        .await
        .accepted();

    let measures = meterd_rollups::measures()
        .iter()
        .map(|m| m.name.clone())
        .collect::<Vec<_>>();
    let mut oracle_measures = vec![
        "count(*)".to_owned(),
        "sum(coalesce(input_tokens, 0))".to_owned(),
        "sum(coalesce(output_tokens, 0))".to_owned(),
        "sum(coalesce(cached_input_tokens, 0))".to_owned(),
        "sum(coalesce(reasoning_tokens, 0))".to_owned(),
        "count(*) FILTER (WHERE type = 'api.request' AND status_code >= 500 \
         OR type = 'llm.usage' AND status = 'error' \
         OR type = 'agent.run' AND status IN ('failed', 'timeout'))"
            .to_owned(),
        "count(latency_ms)".to_owned(),
        "sum(coalesce(latency_ms, 0))".to_owned(),
        "count(duration_ms)".to_owned(),
        "sum(coalesce(duration_ms, 0))".to_owned(),
    ];
    for b in meterd_rollups::LATENCY_BOUNDS_MS {
        oracle_measures.push(format!("count(*) FILTER (WHERE latency_ms <= {b})"));
    }
    assert_eq!(oracle_measures.len(), measures.len());
    for (relation, unit) in [("usage_hourly", "hour"), ("usage_daily", "day")] {
        let rollup = format!(
            "SELECT to_char(bucket, '%Y-%m-%dT%H:%M:%S') AS b, tenant, type, provider, model, \
             agent, route, status_class, {} FROM {relation}",
            measures
                .iter()
                .map(|m| format!("CAST({m} AS VARCHAR)"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let oracle = format!(
            "SELECT to_char(date_bin(INTERVAL '1 {unit}', time, TIMESTAMP '2000-01-01T00:00:00Z'), \
             '%Y-%m-%dT%H:%M:%S') AS b, tenant, type, coalesce(provider, ''), \
             coalesce(model, ''), coalesce(agent, ''), coalesce(route, ''), \
             CASE WHEN type = 'api.request' THEN concat(CAST(status_code / 100 AS VARCHAR), 'xx') \
             ELSE coalesce(status, '') END, {} FROM events GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
            oracle_measures
                .iter()
                .map(|m| format!("CAST({m} AS VARCHAR)"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let sorted = |mut rows: Vec<Vec<Value>>| {
            rows.sort_by_key(|r| r.iter().map(Value::to_string).collect::<Vec<_>>());
            rows
        };
        let got = sorted(server.rows(&format!("{rollup} ORDER BY 1")).await);
        let want = sorted(server.rows(&format!("{oracle} ORDER BY 1")).await);
        assert!(got.len() > 10, "{relation}: {} rows", got.len());
        assert!(
            got == want,
            "{relation} differs from the raw GROUP BY: first difference {:?}",
            got.iter().zip(&want).find(|(a, b)| a != b)
        );
        // A bounded query gives the same rows as the whole rollup cut to those bounds.
        let lo = got[got.len() / 3][0].as_str().expect("bucket").to_owned();
        let hi = got[2 * got.len() / 3][0]
            .as_str()
            .expect("bucket")
            .to_owned();
        let bounded = sorted(
            server
                .rows(&format!(
                    "{rollup} WHERE bucket >= TIMESTAMP '{lo}Z' AND bucket < TIMESTAMP '{hi}Z'"
                ))
                .await,
        );
        let cut: Vec<Vec<Value>> = got
            .iter()
            .filter(|r| {
                let b = r[0].as_str().expect("bucket");
                b >= lo.as_str() && b < hi.as_str()
            })
            .cloned()
            .collect();
        assert!(!cut.is_empty());
        assert_eq!(bounded, cut, "{relation} between {lo} and {hi}");
        let plan = server
            .sql(&format!(
                "EXPLAIN SELECT count(*) FROM {relation} WHERE bucket >= TIMESTAMP '{lo}Z'"
            ))
            .await
            .to_string();
        assert!(
            plan.contains("pruning_predicate=") && plan.contains("time_max@"),
            "the bound on bucket does not prune the Parquet files of events by time: {plan}"
        );
    }
    let types = server.sql("SELECT * FROM usage_daily LIMIT 1").await["columns"].clone();
    assert_eq!(
        types[0],
        json!({"name": "bucket", "type": "TIMESTAMP WITH TIME ZONE"})
    );
    assert_eq!(types[8], json!({"name": "events", "type": "BIGINT"}));
    assert_eq!(
        types[9],
        json!({"name": "input_tokens", "type": "DECIMAL(38, 0)"})
    );
}

/// After compactions and a graceful stop, DuckDB, pandas and polars reading the Parquet folder
/// see every accepted event exactly once: replaced files are gone, and the folder holds exactly
/// the files `_manifest.json` lists.
#[tokio::test]
async fn outside_readers_see_the_table_in_the_parquet_folder() {
    let mut server = Server::start(&["--flush-interval-ms", "50"]);
    let mut events = Vec::new();
    // One small file per batch, all on one day: the compaction's candidates.
    for batch in 0..12 {
        let chunk: Vec<Value> = (0..50)
            .map(|i| llm_event("acme", &format!("b{batch}-{i}"), 10 + i, 1))
            .collect();
        assert_eq!(server.post_json(&chunk).await.accepted(), 50);
        events.extend(chunk);
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    // The files `_manifest.json` lists, and their rows.
    let manifest = |server: &Server| -> (usize, u64) {
        let text = std::fs::read_to_string(server.data_dir().join("events/_manifest.json"))
            .unwrap_or_default();
        let files = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|m| m["files"].as_array().cloned())
            .unwrap_or_default();
        let rows = files.iter().filter_map(|f| f["rows"].as_u64()).sum();
        (files.len(), rows)
    };
    let events_dir = server.data_dir().join("events");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // Every event flushed (a dozen small files), then compacted into a few.
    while manifest(&server) != (1, 600) {
        assert!(
            std::time::Instant::now() < deadline,
            "no compaction within 60 s: {:?} (files, rows) listed",
            manifest(&server)
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A query right after the compaction still reads its snapshot whole.
    assert_eq!(server.count("true").await, 600);
    // A plan names the files it reads below the store's directory, not where that is.
    let plan = server
        .sql_reply("EXPLAIN SELECT count(*) FROM events WHERE tenant = 'acme'")
        .await;
    assert_eq!(plan.status, StatusCode::OK, "{}", plan.text);
    assert!(plan.text.contains(".parquet"), "{}", plan.text);
    let data_dir = std::fs::canonicalize(server.data_dir()).expect("data dir");
    for dir in [server.data_dir(), data_dir] {
        let dir = dir.to_string_lossy().into_owned();
        assert!(!plan.text.contains(&dir), "{dir} in {}", plan.text);
    }
    assert!(server.stop().success());

    let on_disk = common::files_ending_with(&events_dir, ".parquet").len();
    assert_eq!(on_disk, manifest(&server).0, "only the listed files remain");
    let seen = client_script(
        "read_parquet.py",
        &[server.data_dir().to_str().expect("utf-8 path")],
    );
    let input_tokens: i64 = events
        .iter()
        .map(|e| e["data"]["input_tokens"].as_i64().expect("tokens"))
        .sum();
    for reader in ["duckdb", "pandas", "polars"] {
        assert_eq!(
            seen[reader],
            json!({"rows": 600, "keys": 600, "input_tokens": input_tokens}),
            "{reader} reading meterd-data/events: {seen}"
        );
    }
    assert_eq!(seen["manifest"]["rows"], 600, "{seen}");
    assert_eq!(seen["manifest"]["rows_listed"], 600, "{seen}");
}

/// pyarrow reads `?format=arrow` with the types the JSON answer names.
#[tokio::test]
async fn pyarrow_reads_the_arrow_format() {
    let server = Server::start(&[]);
    let events = vec![
        llm_event("acme", "a1", i64::MAX, 1),
        llm_event("acme", "a2", 5, 1),
    ];
    server.post_json(&events).await.accepted();
    let answer = client_script(
        "arrow_sql.py",
        &[
            server.url.as_str(),
            "SELECT tenant, sum(input_tokens) AS total, max(time) AS last FROM events GROUP BY tenant",
        ],
    );
    assert_eq!(
        answer["schema"],
        json!([
            ["tenant", "string"],
            ["total", "decimal128(38, 0)"],
            ["last", "timestamp[us, tz=UTC]"]
        ])
    );
    assert_eq!(answer["rows"][0][0], "acme");
    assert_eq!(answer["rows"][0][1], "9223372036854775812");
    let last = answer["rows"][0][2].as_str().expect("timestamp");
    assert!(last.ends_with("+00:00"), "{last}");
}

/// The server's peak resident memory so far (`VmHWM`), in bytes.
fn peak_rss_bytes(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .expect("read /proc/<pid>/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib * 1024
}

/// `SELECT 1<op>1<op>...` with `terms` ones.
fn chain(op: &str, terms: usize) -> String {
    format!("SELECT {}", vec!["1"; terms].join(op))
}

/// A bounded adversarial suite: every statement shape that once aborted the process (stack
/// overflow) or held the query thread, at the sizes that did and far past them, hostile
/// literals and memory-heavy functions. Each gets an answer of one of the expected statuses,
/// and after each the process is alive and `/healthz` answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_statements_leave_the_process_answering() {
    let server = server_with_events(&[
        "--query-timeout-secs",
        "5",
        "--query-memory-bytes",
        "536870912",
    ])
    .await;
    let ok: &[u16] = &[200];
    let refused: &[u16] = &[400];
    let too_big: &[u16] = &[400, 413];
    let stopped: &[u16] = &[400, 413, 504];
    // Forty WITH steps, each computing `step` over the previous step's `s`.
    let doubling = |first: &str, step: &str| {
        let mut sql = format!("WITH t0 AS (SELECT {first} AS s FROM generate_series(1, 1000))");
        for i in 1..=40 {
            sql.push_str(&format!(", t{i} AS (SELECT {step} AS s FROM t{})", i - 1));
        }
        sql + " SELECT max(length(CAST(s AS VARCHAR))) FROM t40"
    };
    let ors = |op: &str, n: usize| {
        format!(
            "SELECT count(*) FROM events WHERE {}",
            (0..n)
                .map(|i| format!("tenant = 't{i}'"))
                .collect::<Vec<_>>()
                .join(op)
        )
    };
    let unions = |n: usize| vec!["SELECT 1 AS x"; n].join(" UNION ALL ");
    let joins = |n: usize| {
        let mut sql = "SELECT count(*) FROM (SELECT 1 AS x) t0".to_owned();
        for i in 1..=n {
            sql.push_str(&format!(
                " JOIN (SELECT 1 AS x) t{i} ON t{i}.x = t{}.x",
                i - 1
            ));
        }
        sql
    };
    let columns = |n: usize| {
        format!(
            "SELECT {}",
            (0..n)
                .map(|i| format!("{i} AS c{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let cases: Vec<(&str, String, &[u16], &str)> = vec![
        // Sizes that overflowed a 2 MiB stack now plan and answer.
        ("937 + terms", chain(" + ", 937), ok, ""),
        ("990 + terms", chain(" + ", 990), ok, ""),
        (
            "937 || terms",
            format!("SELECT {}", vec!["'a'"; 937].join(" || ")),
            ok,
            "",
        ),
        ("718 OR terms", ors(" OR ", 718), ok, ""),
        ("718 AND terms", ors(" AND ", 718), ok, ""),
        (
            "EXPLAIN of 990 terms",
            format!("EXPLAIN {}", chain(" + ", 990)),
            ok,
            "",
        ),
        ("200 UNION ALL", unions(200), ok, ""),
        ("60 joins", joins(60), ok, ""),
        (
            "parenthesised 20 deep",
            format!("SELECT {}1{}", "(".repeat(20), ")".repeat(20)),
            ok,
            "",
        ),
        // Past the limits: a 400 that names the limit.
        (
            "5,000 + terms",
            chain(" + ", 5_000),
            refused,
            "nested deeper than 1000",
        ),
        (
            "2,000 OR terms",
            ors(" OR ", 2_000),
            refused,
            "nested deeper than 1000",
        ),
        (
            "425 UNION ALL",
            unions(425),
            refused,
            "UNION, INTERSECT and EXCEPT",
        ),
        ("350 joins", joins(350), refused, "joins"),
        (
            "a refused INSERT of 5,468 terms",
            format!(
                "INSERT INTO events VALUES ({})",
                vec!["1"; 5_468].join(" + ")
            ),
            refused,
            "",
        ),
        (
            "32,500 terms that do not parse",
            format!("{} +", chain(" + ", 32_500)),
            refused,
            "tokens",
        ),
        (
            "1,001 columns",
            columns(1_001),
            refused,
            "items in a SELECT list",
        ),
        ("100,000 columns", columns(100_000), refused, "bytes"),
        (
            "a 300 KB literal",
            format!("SELECT length('{}')", "x".repeat(300_000)),
            refused,
            "bytes, more than the limit of 262144",
        ),
        (
            "deep parentheses",
            format!("SELECT {}1{}", "(".repeat(3_000), ")".repeat(3_000)),
            refused,
            "",
        ),
        // Functions that allocate far more than their arguments.
        (
            "repeat to a gigabyte",
            "SELECT length(repeat('a', 1000000000))".to_owned(),
            refused,
            "repeat would produce",
        ),
        (
            "lpad to two gigabytes",
            "SELECT length(lpad('a', 2000000000))".to_owned(),
            refused,
            "lpad would produce",
        ),
        (
            "range of a billion",
            "SELECT cardinality(range(1, 1000000000))".to_owned(),
            refused,
            "range would produce",
        ),
        (
            "constants that add up",
            format!(
                "SELECT {}",
                vec!["length(repeat('a', 16000000))"; 64].join(" + ")
            ),
            refused,
            "constant values of this query would pass its memory limit",
        ),
        // A constant is copied into every row of a batch that selects it: large constants
        // make small batches, and the result is what the pool refuses.
        (
            "a large constant copied into every row",
            "SELECT repeat('x', 16000000) FROM generate_series(1, 134)".to_owned(),
            too_big,
            "",
        ),
        (
            "a 200 KB literal in a million rows",
            format!(
                "SELECT '{}' AS s FROM generate_series(1, 1000000)",
                "x".repeat(200_000)
            ),
            too_big,
            "",
        ),
        // Operators and casts grow their input by a small factor, which chained steps
        // multiply: each step is measured, and the first one past the limit stops the query.
        (
            "|| that doubles at every step",
            doubling("repeat('x', 100000) || CAST(value AS VARCHAR)", "s || s"),
            refused,
            "bytes per batch",
        ),
        (
            "|| that doubles a constant at every step",
            doubling("repeat('x', 1000000)", "s || s"),
            refused,
            "bytes per",
        ),
        (
            "arrays that double at every step",
            doubling("range(value, value + 1000)", "s || s"),
            refused,
            "bytes per batch",
        ),
        (
            "casts of lists that triple at every step",
            doubling(
                "CAST(value AS VARCHAR) || repeat('ab', 1000)",
                "CAST(string_to_array(s, NULL) AS VARCHAR)",
            ),
            refused,
            "bytes per batch",
        ),
        (
            "WITH queries that double at every step",
            {
                let mut sql = "WITH t0 AS (SELECT 1 AS x)".to_owned();
                for i in 1..=40 {
                    sql.push_str(&format!(
                        ", t{i} AS (SELECT a.x FROM t{p} a, t{p} b)",
                        p = i - 1
                    ));
                }
                sql + " SELECT count(*) FROM t40"
            },
            refused,
            "table references",
        ),
        (
            "a deeply nested array type",
            format!("SELECT CAST(NULL AS INT{})", "[]".repeat(20_000)),
            refused,
            "brackets",
        ),
        (
            "a deeply nested ARRAY< type",
            format!(
                "SELECT CAST(NULL AS {}INT{})",
                "ARRAY<".repeat(5_000),
                ">".repeat(5_000)
            ),
            refused,
            "nested types",
        ),
        (
            "a gigabyte of repeated rows",
            "SELECT repeat('x', 10000) FROM generate_series(1, 100000)".to_owned(),
            too_big,
            "",
        ),
        (
            "a window over 200 million random rows",
            "SELECT max(r) FROM (SELECT row_number() OVER (ORDER BY random()) AS r \
             FROM generate_series(1, 200000000))"
                .to_owned(),
            stopped,
            "",
        ),
        (
            "input_file_name",
            "SELECT input_file_name() FROM events".to_owned(),
            refused,
            "input_file_name",
        ),
    ];
    for (name, sql, statuses, message) in &cases {
        let reply = server.sql_reply(sql).await;
        assert!(
            statuses.contains(&reply.status.as_u16()),
            "{name}: answered {} ({}), expected one of {statuses:?}",
            reply.status,
            reply.text.chars().take(500).collect::<String>()
        );
        assert!(
            reply.text.contains(message),
            "{name}: {message:?} not in {}",
            reply.text.chars().take(500).collect::<String>()
        );
        assert!(
            reply.status == StatusCode::OK || reply.text.len() < 4_096,
            "{name}: the error echoes the statement ({} bytes)",
            reply.text.len()
        );
        assert_eq!(
            server.get_status("/healthz").await,
            StatusCode::OK,
            "/healthz after {name}"
        );
    }
    // A query stopped at its deadline gives its memory and its thread back only when its task
    // next yields, which on a busy machine can be seconds later. A query refused memory
    // meanwhile is not too large: it waits for the abandoned one and runs (a 413 here is the
    // defect this checks). It may time out itself while the abandoned query holds the CPU.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    for (sql, answer) in [
        ("SELECT count(*) FROM events WHERE true".to_owned(), 20),
        (chain(" + ", 937), 937),
    ] {
        loop {
            let reply = server.sql_reply(&sql).await;
            if reply.status == StatusCode::GATEWAY_TIMEOUT && std::time::Instant::now() < deadline {
                continue;
            }
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
            assert_eq!(reply.json["rows"][0][0], json!(answer));
            break;
        }
    }
    // The 512 MiB pool held: what the queries built stayed within it, with room for the
    // process itself (ingest, caches, the runtime).
    let peak = peak_rss_bytes(&server);
    assert!(
        peak < 1536 * 1024 * 1024,
        "peak RSS {} MiB with a 512 MiB query pool",
        peak / (1024 * 1024)
    );
    assert_eq!(server.count("true").await, 20);
}

/// Collected rows and the encoded answer count against the memory pool and the response cap.
#[tokio::test]
async fn results_and_responses_are_bounded() {
    let server = server_with_events(&[
        "--query-memory-bytes",
        "16000000",
        "--query-max-rows",
        "10000000",
        "--query-max-response-bytes",
        "3000000",
    ])
    .await;
    // 2 million rows of two BIGINTs: 32 MB of result, far past the 16 MB pool, though no
    // operator buffers anything.
    let reply = server
        .sql_reply("SELECT value, value * 2 FROM generate_series(1, 2000000)")
        .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text
    );
    assert!(
        reply.error().contains("query memory limit"),
        "{}",
        reply.text
    );
    // 500,000 rows fit the pool (4 MB), their encodings do not fit the 3 MB response cap.
    let reply = server
        .sql_reply("SELECT value * 1000000000 AS big FROM generate_series(1, 500000)")
        .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text
    );
    assert!(reply.error().contains("response cap"), "{}", reply.text);
    for format in ["csv", "ndjson", "arrow"] {
        let response = server
            .sql_response(
                "SELECT value * 1000000000 AS big FROM generate_series(1, 500000)",
                Some(format),
            )
            .await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "{format}");
    }
    // What fits is answered, and the pool is free again afterwards.
    for _ in 0..20 {
        let rows = server
            .rows("SELECT value FROM generate_series(1, 100000) WHERE value % 1000 = 0")
            .await;
        assert_eq!(rows.len(), 100);
    }
}

/// Queries that time out give their threads back: after more timed-out queries at once than
/// the query runtime has threads (one and a spare), the next query is answered, not timed out
/// behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_query_frees_the_query_thread() {
    let server = server_with_events(&["--query-timeout-secs", "1"]).await;
    for _ in 0..3 {
        let heavy = (0..4).map(|_| server.sql_reply(HEAVY));
        for reply in futures::future::join_all(heavy).await {
            assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text);
        }
        let reply = server.sql_reply("SELECT count(*) FROM events").await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "after timeouts: {}",
            reply.text
        );
    }
}

/// Copies of one value into many rows stay within the per-batch limit whatever the source's
/// batches: a constant over one unflushed group commit of 20,000 events is computed in batches
/// sized for it, a value joined beside every row is refused before it is copied, and
/// aggregates whose window results grow with their frame are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_a_value_into_many_rows_are_bounded() {
    let server = Server::start(&["--query-memory-bytes", "536870912"]);
    let events = common::generated(71, 20_000, 3, std::time::Duration::from_secs(3_600), 0.0);
    let longest_id = events
        .iter()
        .filter_map(|e| e["id"].as_str())
        .map(str::len)
        .max()
        .expect("events");
    // One request, one group commit: one tail batch of 20,000 rows.
    assert_eq!(server.post_ndjson(&events).await.accepted(), 20_000);

    let reply = server
        .sql_reply("SELECT max(length(repeat('x', 30000) || id)) AS n FROM events")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["rows"][0][0], json!(30_000 + longest_id));

    let values = format!(
        "SELECT max(length(s)) FROM (SELECT repeat(arrow_cast('x', 'LargeUtf8'), 16000000) AS s \
         FROM (VALUES {}) AS t(n))",
        vec!["(1)"; 200].join(", ")
    );
    let reply = server.sql_reply(&values).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["rows"][0][0], json!(16_000_000));

    let joined = "SELECT max(length(l.s)) FROM (SELECT string_agg(id, '') AS s FROM events) l \
                  CROSS JOIN events";
    let reply = server.sql_reply(joined).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert!(
        reply.error().contains("would be copied 8192 times"),
        "{}",
        reply.text
    );

    // Ordinary joins and windows over events, dimensions included, are not refused.
    let reply = server
        .sql_reply(
            "SELECT count(*) FROM (SELECT tenant, dimensions, \
             row_number() OVER (PARTITION BY tenant ORDER BY time) AS n FROM events)",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["rows"][0][0], json!(20_000));
    let reply = server
        .sql_reply(
            "SELECT count(*) FROM events a JOIN events b ON a.id = b.id AND a.tenant = b.tenant",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["rows"][0][0], json!(20_000));

    // unnest repeats a row's other values once per element of its list.
    let reply = server
        .sql_reply(
            "SELECT max(length(s)) FROM (SELECT s, unnest(range(1000000)) AS n \
             FROM (SELECT string_agg(id, '') AS s FROM events))",
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert!(
        reply.error().contains("would be copied 1000000 times"),
        "{}",
        reply.text
    );

    let window = "SELECT length(string_agg(id, ',') OVER (ORDER BY id)) FROM events";
    let reply = server.sql_reply(window).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert!(
        reply.error().contains("not available as a window function"),
        "{}",
        reply.text
    );

    assert_eq!(server.get_status("/healthz").await, StatusCode::OK);
    let peak = peak_rss_bytes(&server);
    assert!(
        peak < 1536 * 1024 * 1024,
        "peak RSS {} MiB with a 512 MiB query pool",
        peak / (1024 * 1024)
    );
}

/// `cache_write_input_tokens` in the embedded store: validated, stored, served by SQL, and
/// kept across a restart (the log replayed into the store).
#[tokio::test]
async fn cache_write_input_tokens_reach_the_embedded_store() {
    let mut server = Server::start(&[]);
    let mut written = llm_event("acme", "cw-1", 1000, 50);
    written["data"]["cache_write_input_tokens"] = json!(4000);
    let plain = llm_event("acme", "cw-2", 10, 5);
    assert_eq!(server.post_ndjson(&[written, plain]).await.accepted(), 2);
    let mut negative = llm_event("acme", "cw-3", 1, 1);
    negative["data"]["cache_write_input_tokens"] = json!(-1);
    let refused = server.post_ndjson(&[negative]).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused.text.contains("data.cache_write_input_tokens"),
        "{}",
        refused.text
    );
    let query = "SELECT id, cache_write_input_tokens FROM events ORDER BY id";
    let expected = vec![
        vec![json!("cw-1"), json!(4000)],
        vec![json!("cw-2"), Value::Null],
    ];
    assert_eq!(server.rows(query).await, expected);
    server.kill();
    server.restart();
    assert_eq!(server.rows(query).await, expected);
    server.kill();
}
