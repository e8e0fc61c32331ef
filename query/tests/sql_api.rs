//! `POST /v1/sql` end to end on the Router (no socket): an `events` table made of Parquet files
//! in a tempdir plus in-memory batches, the output formats, the read-only guard and the limits.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode, header};
use meterd_query::{EventsSource, QueryConfig, QueryService};
use meterd_schemas::{
    ApiRequest, Event, EventData, EventsBatchBuilder, EventsSnapshot, LlmUsage, StoredEvent,
};
use parquet::arrow::ArrowWriter;
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt;

/// 2026-01-10T00:00:00Z in microseconds.
const JAN: i64 = 1_768_003_200_000_000;
/// 2026-02-10T00:00:00Z.
const FEB: i64 = 1_770_681_600_000_000;
/// 2026-03-10T00:00:00Z.
const MAR: i64 = 1_773_100_800_000_000;
const MINUTE: i64 = 60_000_000;

#[derive(Debug)]
struct FixedSource(Mutex<EventsSnapshot>);

impl EventsSource for FixedSource {
    fn snapshot(&self) -> EventsSnapshot {
        self.0.lock().expect("snapshot lock").clone()
    }

    fn pin(&self) -> meterd_schemas::SnapshotPin {
        // Fixed files are never deleted.
        Arc::new(())
    }
}

fn llm(tenant: &str, id: &str, time_us: i64, input: i64, output: i64) -> StoredEvent {
    StoredEvent {
        ingested_at_us: time_us + 1_000,
        event: Event {
            tenant: tenant.into(),
            id: id.into(),
            time_us,
            subject: Some("user-1".into()),
            source: None,
            dimensions: BTreeMap::from([
                ("region".into(), "eu".into()),
                ("plan".into(), "pro".into()),
            ]),
            data: EventData::LlmUsage(LlmUsage {
                provider: "openai".into(),
                model: "gpt-x".into(),
                input_tokens: input,
                output_tokens: output,
                cached_input_tokens: None,
                cache_write_input_tokens: None,
                reasoning_tokens: Some(7),
                latency_ms: Some(120),
                status: Some("ok".into()),
                run_id: None,
            }),
        },
    }
}

fn api(tenant: &str, id: &str, time_us: i64, status_code: i64) -> StoredEvent {
    StoredEvent {
        ingested_at_us: time_us + 1_000,
        event: Event {
            tenant: tenant.into(),
            id: id.into(),
            time_us,
            subject: None,
            source: Some("gateway".into()),
            dimensions: BTreeMap::new(),
            data: EventData::ApiRequest(ApiRequest {
                route: Some("/v1/chat".into()),
                method: Some("POST".into()),
                status_code,
                latency_ms: 35,
                request_bytes: Some(512),
                response_bytes: None,
            }),
        },
    }
}

fn batch(events: &[StoredEvent]) -> RecordBatch {
    let mut builder = EventsBatchBuilder::new();
    for e in events {
        builder.append(e).expect("append");
    }
    builder.finish().expect("batch")
}

fn write_parquet(dir: &Path, name: &str, batch: &RecordBatch) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create parquet file");
    let mut writer =
        ArrowWriter::try_new(file, meterd_schemas::events_schema(), None).expect("writer");
    writer.write(batch).expect("write");
    writer.close().expect("close");
    path
}

struct Fixture {
    _dir: TempDir,
    source: Arc<FixedSource>,
    service: Arc<QueryService>,
    router: Router,
}

/// 10 events: 4 in a January file, 3 in a February file, 3 in memory (March).
async fn fixture(config: QueryConfig) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let jan = batch(&[
        llm("acme", "j1", JAN, 100, 10),
        llm("acme", "j2", JAN + MINUTE, 200, 20),
        llm("globex", "j3", JAN + 2 * MINUTE, 300, 30),
        api("acme", "j4", JAN + 3 * MINUTE, 200),
    ]);
    let feb = batch(&[
        llm("acme", "f1", FEB, 1_000, 100),
        api("globex", "f2", FEB + MINUTE, 500),
        api("globex", "f3", FEB + 2 * MINUTE, 200),
    ]);
    let snapshot = EventsSnapshot {
        parquet_files: vec![
            write_parquet(dir.path(), "jan.parquet", &jan),
            write_parquet(dir.path(), "feb.parquet", &feb),
        ],
        batches: vec![
            batch(&[
                llm("acme", "m1", MAR + 123_000, 5, 1),
                api("initech", "m2", MAR + MINUTE, 404),
            ]),
            batch(&[llm("globex", "m3", MAR + 2 * MINUTE, 50, 5)]),
        ],
    };
    fixture_over(dir, snapshot, config).await
}

async fn fixture_over(dir: TempDir, snapshot: EventsSnapshot, config: QueryConfig) -> Fixture {
    let source = Arc::new(FixedSource(Mutex::new(snapshot)));
    let service = QueryService::new(Arc::clone(&source) as Arc<dyn EventsSource>, config)
        .await
        .expect("service");
    let router = service.router();
    Fixture {
        _dir: dir,
        source,
        service,
        router,
    }
}

async fn post(router: &Router, uri: &str, body: impl Into<Body>) -> (StatusCode, String, Bytes) {
    let request = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .expect("request");
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("infallible router");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().expect("ascii content type").to_owned())
        .unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, content_type, body)
}

async fn sql_as(router: &Router, format: &str, sql: &str) -> (StatusCode, String, Bytes) {
    let uri = if format.is_empty() {
        "/v1/sql".to_owned()
    } else {
        format!("/v1/sql?format={format}")
    };
    post(router, &uri, json!({ "sql": sql }).to_string()).await
}

async fn sql(router: &Router, sql: &str) -> (StatusCode, Value) {
    let (status, _, body) = sql_as(router, "", sql).await;
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{sql:?} answered non-JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, value)
}

async fn rows(router: &Router, query: &str) -> Value {
    let (status, body) = sql(router, query).await;
    assert_eq!(status, StatusCode::OK, "{query:?}: {body}");
    body["rows"].clone()
}

async fn error(router: &Router, query: &str, expected: StatusCode) -> String {
    let (status, body) = sql(router, query).await;
    assert_eq!(status, expected, "{query:?}: {body}");
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {body}"))
        .to_owned()
}

#[tokio::test]
async fn count_sees_parquet_files_and_memory_batches() {
    let f = fixture(QueryConfig::default()).await;
    let (status, body) = sql(&f.router, "SELECT count(*) AS n FROM events").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "columns": [{ "name": "n", "type": "BIGINT" }], "rows": [[10]] })
    );
}

#[tokio::test]
async fn each_query_takes_a_fresh_snapshot() {
    let f = fixture(QueryConfig::default()).await;
    assert_eq!(
        rows(&f.router, "SELECT count(*) FROM events").await,
        json!([[10]])
    );
    f.source.0.lock().expect("lock").batches.push(batch(&[api(
        "acme",
        "late",
        MAR + 9 * MINUTE,
        200,
    )]));
    assert_eq!(
        rows(&f.router, "SELECT count(*) FROM events").await,
        json!([[11]])
    );
}

#[tokio::test]
async fn empty_store_is_an_empty_table() {
    let f = fixture_over(
        tempfile::tempdir().expect("tempdir"),
        EventsSnapshot::default(),
        QueryConfig::default(),
    )
    .await;
    assert_eq!(
        rows(&f.router, "SELECT count(*) FROM events").await,
        json!([[0]])
    );
    let (status, body) = sql(&f.router, "SELECT * FROM events WHERE tenant = 'acme'").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], json!([]));
    assert_eq!(
        body["columns"].as_array().map(Vec::len),
        Some(meterd_schemas::columns::COLUMNS.len())
    );

    // Only Parquet files, no batches.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_parquet(
        dir.path(),
        "only.parquet",
        &batch(&[api("acme", "x", JAN, 200)]),
    );
    let snapshot = EventsSnapshot {
        parquet_files: vec![file],
        batches: vec![],
    };
    let f = fixture_over(dir, snapshot, QueryConfig::default()).await;
    assert_eq!(
        rows(&f.router, "SELECT count(*), max(status_code) FROM events").await,
        json!([[1, 200]])
    );
}

#[tokio::test]
async fn time_filters_prune_parquet_row_groups() {
    let f = fixture(QueryConfig::default()).await;
    let since_feb = "time >= '2026-02-01T00:00:00Z'";
    assert_eq!(
        rows(
            &f.router,
            &format!("SELECT count(*) FROM events WHERE {since_feb}")
        )
        .await,
        json!([[6]])
    );
    assert_eq!(
        rows(&f.router, "SELECT id FROM events WHERE time < '2026-02-01T00:00:00Z' AND tenant = 'acme' ORDER BY id")
            .await,
        json!([["j1"], ["j2"], ["j4"]])
    );

    // The January file's only row group is skipped on its statistics, never decoded.
    let explained = rows(
        &f.router,
        &format!("EXPLAIN ANALYZE SELECT count(*) FROM events WHERE {since_feb}"),
    )
    .await;
    let plan = explained.to_string();
    assert!(plan.contains("DataSourceExec"), "{plan}");
    assert!(
        plan.contains("predicate="),
        "filter not pushed into the Parquet scan: {plan}"
    );
    assert!(
        plan.contains("row_groups_pruned_statistics=2 total \\u2192 1 matched")
            || plan.contains("row_groups_pruned_statistics=2 total → 1 matched"),
        "{plan}"
    );
}

#[tokio::test]
async fn group_by_tenant() {
    let f = fixture(QueryConfig::default()).await;
    let query = "SELECT tenant, count(*) AS events, sum(input_tokens) AS input, count(status_code) AS requests \
                 FROM events GROUP BY tenant ORDER BY tenant";
    assert_eq!(
        rows(&f.router, query).await,
        json!([
            ["acme", 5, 1305, 1],
            ["globex", 4, 350, 2],
            ["initech", 1, null, 1]
        ])
    );
}

#[tokio::test]
async fn json_renders_every_events_column() {
    let f = fixture(QueryConfig::default()).await;
    let (status, body) = sql(
        &f.router,
        "SELECT * FROM events WHERE id IN ('m1', 'm2') ORDER BY id",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let names: Vec<&str> = body["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    let schema = meterd_schemas::events_schema();
    let expected: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, expected);
    assert_eq!(body["columns"][3]["type"], "TIMESTAMP WITH TIME ZONE");

    let row = |i: usize| -> BTreeMap<&str, Value> {
        names
            .iter()
            .copied()
            .zip(body["rows"][i].as_array().expect("row").iter().cloned())
            .collect()
    };
    let m1 = row(0);
    assert_eq!(m1["tenant"], "acme");
    assert_eq!(m1["type"], "llm.usage");
    assert_eq!(m1["time"], "2026-03-10T00:00:00.123Z");
    assert_eq!(m1["ingested_at"], "2026-03-10T00:00:00.124Z");
    assert_eq!(m1["dimensions"], json!({ "plan": "pro", "region": "eu" }));
    assert_eq!(m1["input_tokens"], 5);
    assert_eq!(m1["reasoning_tokens"], 7);
    assert_eq!(m1["cached_input_tokens"], Value::Null);
    assert_eq!(m1["source"], Value::Null);
    assert_eq!(m1["status_code"], Value::Null);

    let m2 = row(1);
    assert_eq!(m2["time"], "2026-03-10T00:01:00Z");
    assert_eq!(m2["dimensions"], json!({}));
    assert_eq!(m2["route"], "/v1/chat");
    assert_eq!(m2["status_code"], 404);
    assert_eq!(m2["response_bytes"], Value::Null);
    assert_eq!(m2["model"], Value::Null);
}

#[tokio::test]
async fn ndjson_is_one_object_per_row() {
    let f = fixture(QueryConfig::default()).await;
    let (status, content_type, body) = sql_as(
        &f.router,
        "ndjson",
        "SELECT tenant, id, time, dimensions, input_tokens FROM events ORDER BY time",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/x-ndjson");
    let lines: Vec<Value> = std::str::from_utf8(&body)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!(
        lines[0],
        json!({ "tenant": "acme", "id": "j1", "time": "2026-01-10T00:00:00Z", "dimensions": { "plan": "pro", "region": "eu" }, "input_tokens": 100 })
    );
    assert_eq!(lines[3]["input_tokens"], Value::Null);
    assert_eq!(lines[9]["id"], "m3");
}

#[tokio::test]
async fn csv_has_a_header_and_json_text_for_maps() {
    let f = fixture(QueryConfig::default()).await;
    let (status, content_type, body) = sql_as(
        &f.router,
        "csv",
        "SELECT id, time, dimensions, output_tokens FROM events ORDER BY time",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert!(content_type.starts_with("text/csv"), "{content_type}");

    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("time", DataType::Utf8, false),
        Field::new("dimensions", DataType::Utf8, false),
        Field::new("output_tokens", DataType::Int64, true),
    ]));
    let reader = arrow::csv::ReaderBuilder::new(schema)
        .with_header(true)
        .build(Cursor::new(body.to_vec()))
        .expect("csv reader");
    let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>().expect("parse csv back");
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).expect("concat");
    assert_eq!(batch.num_rows(), 10);
    let ids = batch.column(0).as_string::<i32>();
    let times = batch.column(1).as_string::<i32>();
    let dims = batch.column(2).as_string::<i32>();
    assert_eq!(ids.value(0), "j1");
    assert_eq!(times.value(0), "2026-01-10T00:00:00Z");
    let first: Value = serde_json::from_str(dims.value(0)).expect("map as JSON text");
    assert_eq!(first, json!({ "plan": "pro", "region": "eu" }));
    assert_eq!(dims.value(3), "{}");
    assert!(batch.column(3).is_null(3));
    assert_eq!(
        batch
            .column(3)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0),
        10
    );
}

#[tokio::test]
async fn arrow_is_an_ipc_stream() {
    let f = fixture(QueryConfig::default()).await;
    let (status, content_type, body) = sql_as(&f.router, "arrow", "SELECT * FROM events").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/vnd.apache.arrow.stream");
    let reader = arrow::ipc::reader::StreamReader::try_new(Cursor::new(body.to_vec()), None)
        .expect("ipc stream");
    let schema = reader.schema();
    assert_eq!(
        schema.fields().len(),
        meterd_schemas::columns::COLUMNS.len()
    );
    assert!(matches!(
        schema
            .field_with_name("dimensions")
            .expect("dimensions")
            .data_type(),
        DataType::Map(..)
    ));
    let total: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(total, 10);
}

#[tokio::test]
async fn show_tables_and_columns() {
    let f = fixture(QueryConfig::default()).await;
    let tables = rows(&f.router, "SHOW TABLES").await;
    assert!(
        tables
            .as_array()
            .expect("rows")
            .iter()
            .any(|r| r[2] == "events" && r[1] == "public"),
        "{tables}"
    );
    let columns = rows(&f.router, "SHOW COLUMNS FROM events").await;
    let names: Vec<&str> = columns
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[3].as_str().expect("column name"))
        .collect();
    assert_eq!(
        names.len(),
        meterd_schemas::columns::COLUMNS.len(),
        "{columns}"
    );
    assert!(
        names.contains(&"dimensions") && names.contains(&"tool_calls"),
        "{names:?}"
    );
    assert!(
        !rows(&f.router, "EXPLAIN SELECT tenant FROM events")
            .await
            .as_array()
            .expect("plan rows")
            .is_empty()
    );
}

#[tokio::test]
async fn writes_and_session_changes_are_refused() {
    let f = fixture(QueryConfig::default()).await;
    for (query, kind) in [
        ("CREATE TABLE t (a INT)", "CREATE"),
        ("CREATE VIEW v AS SELECT * FROM events", "CREATE"),
        ("DROP TABLE events", "DROP"),
        ("INSERT INTO events (tenant) VALUES ('x')", "INSERT"),
        ("UPDATE events SET tenant = 'x'", "UPDATE"),
        ("DELETE FROM events", "DELETE"),
        (
            "COPY (SELECT * FROM events) TO '/tmp/meterd-leak.csv'",
            "COPY",
        ),
        ("SET datafusion.execution.batch_size = 1", "SET"),
        (
            "EXPLAIN ANALYZE INSERT INTO events (tenant) VALUES ('x')",
            "INSERT",
        ),
    ] {
        let message = error(&f.router, query, StatusCode::BAD_REQUEST).await;
        assert_eq!(
            message,
            format!(
                "{kind} statements are not allowed: the SQL API is read-only (SELECT, WITH, EXPLAIN or SHOW)"
            ),
            "{query:?}"
        );
    }
    assert_eq!(
        error(
            &f.router,
            "SELECT 1; DROP TABLE events",
            StatusCode::BAD_REQUEST
        )
        .await,
        "only one SELECT, WITH, EXPLAIN or SHOW statement per request; got 2 statements"
    );
    for empty in ["", "   ", ";"] {
        let message = error(&f.router, empty, StatusCode::BAD_REQUEST).await;
        assert!(
            message.ends_with("got 0 statements"),
            "{empty:?}: {message}"
        );
    }
    // Still there, still readable.
    assert_eq!(
        rows(&f.router, "SELECT count(*) FROM events").await,
        json!([[10]])
    );
}

#[tokio::test]
async fn bad_sql_is_a_client_error_with_datafusion_message() {
    let f = fixture(QueryConfig::default()).await;
    let syntax = error(
        &f.router,
        "SELEC tenant FROM events",
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(syntax.contains("SELEC"), "{syntax}");
    let column = error(
        &f.router,
        "SELECT tenant, nope FROM events",
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(column.contains("nope"), "{column}");
    let table = error(
        &f.router,
        "SELECT * FROM usage_rollups",
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(table.contains("usage_rollups"), "{table}");
    let cast = error(
        &f.router,
        "SELECT CAST(tenant AS BIGINT) FROM events",
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(cast.to_lowercase().contains("cast"), "{cast}");
}

#[tokio::test]
async fn bad_requests_name_the_problem() {
    let f = fixture(QueryConfig::default()).await;
    let cases: [(&str, &str, &str); 4] = [
        ("/v1/sql", "", "the request body is empty"),
        ("/v1/sql", "SELECT 1", "must be a JSON object"),
        (
            "/v1/sql",
            r#"{"query": "SELECT 1"}"#,
            "unknown field `query`",
        ),
        (
            "/v1/sql?format=xml",
            r#"{"sql": "SELECT 1"}"#,
            "unknown format \"xml\"",
        ),
    ];
    for (uri, body, expected) in cases {
        let (status, content_type, response) = post(&f.router, uri, body.to_owned()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        assert_eq!(content_type, "application/json");
        let value: Value = serde_json::from_slice(&response).expect("error body is JSON");
        let message = value["error"].as_str().expect("error message");
        assert!(message.contains(expected), "{body:?}: {message}");
    }
}

#[tokio::test]
async fn results_over_the_row_cap_are_refused() {
    let f = fixture(QueryConfig {
        max_rows: 5,
        ..QueryConfig::default()
    })
    .await;
    let message = error(
        &f.router,
        "SELECT * FROM events",
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert_eq!(
        message,
        "the result has more than 5 rows (the row cap); add a LIMIT or aggregate further"
    );
    assert_eq!(
        rows(&f.router, "SELECT id FROM events ORDER BY id LIMIT 5")
            .await
            .as_array()
            .map(Vec::len),
        Some(5)
    );
    // A huge result is refused as soon as the cap is passed, long before it is produced.
    let message = error(
        &f.router,
        "SELECT * FROM generate_series(1, 1000000000000)",
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(message.contains("5 rows"), "{message}");
}

#[tokio::test]
async fn memory_hungry_queries_hit_the_pool_limit() {
    let f = fixture(QueryConfig {
        memory_limit_bytes: 1024 * 1024,
        ..QueryConfig::default()
    })
    .await;
    let message = error(
        &f.router,
        "SELECT cardinality(array_agg(value)) FROM generate_series(1, 5000000)",
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(message.contains("1 MiB query memory limit"), "{message}");
    assert_eq!(
        rows(&f.router, "SELECT count(*) FROM events").await,
        json!([[10]])
    );
}

#[tokio::test]
async fn slow_queries_time_out_and_stop() {
    let f = fixture(QueryConfig {
        timeout: Duration::from_secs(1),
        threads: 1,
        ..QueryConfig::default()
    })
    .await;
    let heavy = "SELECT count(*) FROM generate_series(1, 1000000) a CROSS JOIN generate_series(1, 1000000) b";
    let (status, body) = sql(&f.router, heavy).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, json!({ "error": "query exceeded the 1s timeout" }));
    // The single query thread is free again: the heavy query was cancelled, not left running.
    assert_eq!(
        rows(&f.router, "SELECT count(*) FROM events").await,
        json!([[10]])
    );
}

#[tokio::test]
async fn query_returns_batches() {
    let f = fixture(QueryConfig::default()).await;
    let (schema, batches) = f
        .service
        .query("SELECT tenant, id FROM events WHERE tenant = 'initech'")
        .await
        .expect("query");
    assert_eq!(schema.field(0).name(), "tenant");
    let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(total, 1);
    let err = f
        .service
        .query("DROP TABLE events")
        .await
        .expect_err("refused");
    assert_eq!(err.status_code(), StatusCode::BAD_REQUEST);
}

/// A table whose scan takes most of the memory pool and then blocks its thread without
/// yielding, as a large sort or hash build does: a query over it that times out is abandoned
/// but keeps the memory until its task next yields.
#[derive(Debug)]
struct HoggingPartition {
    schema: arrow::datatypes::SchemaRef,
    bytes: usize,
    blocks_for: Duration,
}

impl datafusion::physical_plan::streaming::PartitionStream for HoggingPartition {
    fn schema(&self) -> &arrow::datatypes::SchemaRef {
        &self.schema
    }

    fn execute(
        &self,
        ctx: Arc<datafusion::execution::TaskContext>,
    ) -> datafusion::execution::SendableRecordBatchStream {
        let schema = Arc::clone(&self.schema);
        let (bytes, blocks_for) = (self.bytes, self.blocks_for);
        let stream = futures::stream::once(async move {
            let reservation = datafusion::execution::memory_pool::MemoryConsumer::new("hog")
                .register(ctx.memory_pool());
            reservation.try_grow(bytes)?;
            std::thread::sleep(blocks_for);
            std::future::pending::<()>().await;
            drop(reservation);
            Ok(RecordBatch::new_empty(schema))
        });
        Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                Arc::clone(&self.schema),
                stream,
            ),
        )
    }
}

/// A query refused memory that an abandoned query still holds waits for that query to stop
/// and runs, instead of being told it is too large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_waits_for_the_memory_of_an_abandoned_query() {
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
    let hog = datafusion::catalog::streaming::StreamingTable::try_new(
        Arc::clone(&schema),
        vec![Arc::new(HoggingPartition {
            schema: Arc::clone(&schema),
            bytes: 3 * 1024 * 1024,
            blocks_for: Duration::from_secs(4),
        })],
    )
    .expect("streaming table");
    let service = QueryService::with_tables(
        vec![("hog".to_owned(), Arc::new(hog))],
        QueryConfig {
            timeout: Duration::from_secs(3),
            memory_limit_bytes: 4 * 1024 * 1024,
            max_rows: 1_000_000,
            ..QueryConfig::default()
        },
    )
    .expect("service");
    let abandoned = service.query("SELECT count(*) FROM hog").await;
    assert!(
        matches!(abandoned, Err(meterd_query::Error::Timeout { .. })),
        "{abandoned:?}"
    );
    // 200,000 BIGINTs held as the result: 1.6 MB, more than the pool has left while the
    // abandoned query holds its 3 MiB, well within it afterwards.
    let started = std::time::Instant::now();
    let (_, batches) = service
        .query("SELECT value FROM generate_series(1, 200000)")
        .await
        .expect("the query runs once the abandoned one stopped");
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 200_000);
    // It did wait: the abandoned query blocked for a second past its deadline.
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}
