//! `POST /v1/sql` over PostgreSQL tables (`meterd_store_postgres::sql`), against a real
//! PostgreSQL: answers are compared with the same question asked of PostgreSQL directly, and
//! EXPLAIN shows which filters went into the SQL sent to it.
//!
//! Each test creates its own database, `meterd_query_<test>_<pid>`, and drops it at the end.
//! PostgreSQL comes from `METERD_TEST_POSTGRES_URL` (a superuser; default
//! `postgres://meterd:meterd@127.0.0.1:5432/postgres`); if it is unreachable the tests fail.
//! The databases use an ICU `en-US` collation, where `'Zeta' > 'acme'`, unlike DataFusion's
//! byte order, so a text range filter that ignored collations would give a wrong answer.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Decimal128Type, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType,
};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use datafusion::catalog::TableProvider;
use deadpool_postgres::{Manager, Pool};
use meterd_query::{QueryConfig, QueryService};
use serde_json::{Value, json};
use tokio_postgres::NoTls;
use tower::ServiceExt;

const DEFAULT_URL: &str = "postgres://meterd:meterd@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("METERD_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = url
        .parse()
        .unwrap_or_else(|e| panic!("METERD_TEST_POSTGRES_URL is not a PostgreSQL URL: {e}"));
    connect_to(&config).await
}

async fn connect_to(config: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, connection) = config.connect(NoTls).await.unwrap_or_else(|e| {
        // Hosts and ports only: the URL may carry a password.
        panic!(
            "PostgreSQL at {:?} port {:?} is unreachable ({}); these tests need a running \
             PostgreSQL (set METERD_TEST_POSTGRES_URL to a superuser URL)",
            config.get_hosts(),
            config.get_ports(),
            chain(&e),
        )
    });
    // The connection ends with an error when the test drops its database under it; queries
    // report their own failures.
    tokio::spawn(connection);
    client
}

/// The server's message, which `Display` of a `tokio_postgres::Error` leaves out.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => e.to_string(),
    }
}

/// A database of its own for one test, dropped (with its connections) when this is dropped,
/// even when the test fails.
struct TestDb {
    name: String,
    /// A direct connection, for setup and for asking PostgreSQL the expected answers.
    client: tokio_postgres::Client,
    pool: Pool,
}

impl TestDb {
    async fn create(test: &str) -> Self {
        let admin_url = admin_url();
        let name = format!("meterd_query_{test}_{}", std::process::id());
        let admin = connect(&admin_url).await;
        // Separate statements: a multi-statement string would be one transaction, which
        // CREATE DATABASE refuses.
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!(
                "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' \
                 LOCALE 'C.UTF-8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            ),
        ] {
            admin
                .batch_execute(&statement)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {}", pg_error(&e)));
        }
        let mut config: tokio_postgres::Config = admin_url.parse().expect("PostgreSQL URL");
        config.dbname(&name);
        let client = connect_to(&config).await;
        let pool = Pool::builder(Manager::new(config, NoTls))
            .max_size(4)
            .build()
            .expect("pool");
        Self { name, client, pool }
    }

    async fn execute(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", pg_error(&e)));
    }

    /// Runs a PostgreSQL query whose only column is one JSON array per row.
    async fn json_rows(&self, sql: &str) -> Value {
        let rows = self
            .client
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", pg_error(&e)));
        Value::Array(rows.iter().map(|row| row.get::<_, Value>(0)).collect())
    }

    async fn service(&self, tables: &[&str], config: QueryConfig) -> Arc<QueryService> {
        with_postgres(self.pool.clone(), tables, config)
            .await
            .unwrap_or_else(|e| panic!("with_postgres: {}", chain(e.as_ref())))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be gone: drop the database from a
        // thread with a runtime of its own.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let admin = connect(&admin_url()).await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("dropping test database {}: {dropped:?}", self.name);
        }
    }
}

/// The `meterd` schema as the service sees it: `events` (the real column list), the
/// `usage_hourly` view over it and a `usage_daily` table.
const SCHEMA: &str = r#"
CREATE SCHEMA meterd;
CREATE TABLE meterd.events (
    tenant text NOT NULL,
    id text NOT NULL,
    type text NOT NULL,
    time timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL,
    subject text,
    source text,
    dimensions jsonb NOT NULL DEFAULT '{}',
    provider text,
    model text,
    input_tokens bigint,
    output_tokens bigint,
    cached_input_tokens bigint,
    reasoning_tokens bigint,
    route text,
    method text,
    status_code bigint,
    request_bytes bigint,
    response_bytes bigint,
    agent text,
    run_id text,
    parent_run_id text,
    status text,
    latency_ms bigint,
    duration_ms bigint,
    steps bigint,
    tool_calls bigint
);
CREATE VIEW meterd.usage_hourly AS
SELECT date_trunc('hour', time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket,
       tenant,
       count(*) AS events,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens
FROM meterd.events
GROUP BY 1, 2;
CREATE TABLE meterd.usage_daily (
    day timestamptz NOT NULL,
    tenant text NOT NULL,
    events bigint NOT NULL,
    input_tokens numeric(20, 0),
    cost_usd numeric(12, 4)
);
"#;

/// Ten events: NULLs, a quote, unicode, JSON with quotes, times a microsecond apart.
const EVENTS: &str = r#"
INSERT INTO meterd.events
    (tenant, id, type, time, ingested_at, subject, dimensions, provider, model,
     input_tokens, output_tokens, cached_input_tokens, route, method, status_code,
     request_bytes, agent, run_id, status, latency_ms, duration_ms, steps, tool_calls)
VALUES
    ('acme', 'e01', 'llm_usage', '2026-01-10 00:00:00Z', '2026-01-10 00:00:01Z', 'user-1',
     '{"region": "eu", "plan": "pro"}', 'openai', 'gpt-x', 100, 10, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, 'ok', 120, NULL, NULL, NULL),
    ('acme', 'e02', 'llm_usage', '2026-01-10 00:30:00Z', '2026-01-10 00:30:01Z', NULL,
     '{}', 'anthropic', 'claude', 200, 20, 50, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, 90, NULL, NULL, NULL),
    ('acme', 'e03', 'api_request', '2026-01-10 01:15:00Z', '2026-01-10 01:15:01Z', NULL,
     '{}', NULL, NULL, NULL, NULL, NULL, '/v1/chat', 'POST', 200,
     512, NULL, NULL, NULL, 35, NULL, NULL, NULL),
    ('acme', 'e04', 'api_request', '2026-01-10 01:15:00.000001Z', '2026-01-10 01:15:01Z', NULL,
     '{}', NULL, NULL, NULL, NULL, NULL, '/v1/chat', 'POST', 500,
     NULL, NULL, NULL, NULL, 40, NULL, NULL, NULL),
    ('o''brien', 'e05', 'llm_usage', '2026-01-10 02:00:00Z', '2026-01-10 02:00:01Z', 'o''brien',
     '{"note": "it''s \"quoted\""}', 'openai', 'gpt-x', 300, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    ('Zeta', 'e06', 'llm_usage', '2026-01-11 00:00:00Z', '2026-01-11 00:00:01Z', 'user-2',
     '{"region": "us"}', 'openai', 'gpt-y', 50, 5, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    ('zürich', 'e07', 'agent_run', '2026-01-11 05:00:00Z', '2026-01-11 05:00:01Z',
     'ünïcødé ✓ 日本', '{"städte": ["zürich", "genève"]}', NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, 'planner', 'r1', 'ok', NULL, 1500, 3, 2),
    ('beta', 'e08', 'api_request', '2026-01-12 00:00:00Z', '2026-01-12 00:00:01Z', NULL,
     '{}', NULL, NULL, NULL, NULL, NULL, NULL, 'GET', 404,
     NULL, NULL, NULL, NULL, 12, NULL, NULL, NULL),
    ('acme', 'e09', 'llm_usage', '2026-02-01 00:00:00Z', '2026-02-01 00:00:01Z', 'user-1',
     '{"plan": "free"}', 'openai', 'gpt-x', NULL, 7, 5, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    ('beta', 'e10', 'llm_usage', '2025-12-31 23:59:59.999999Z', '2026-01-01 00:00:00Z', NULL,
     '{}', 'openai', 'gpt-x', 1, 1, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO meterd.usage_daily VALUES
    ('2026-01-10 00:00:00Z', 'acme', 4, 300, 12.3456),
    ('2026-01-11 00:00:00Z', 'acme', 0, NULL, NULL),
    ('2026-01-10 00:00:00Z', 'beta', 1, 99999999999999999999, -0.0001);
"#;

const TABLES: &[&str] = &["events", "usage_hourly", "usage_daily"];

/// A database with [`SCHEMA`] and [`EVENTS`], and the service and router over it.
async fn fixture(test: &str, config: QueryConfig) -> (TestDb, Arc<QueryService>, Router) {
    let db = TestDb::create(test).await;
    db.execute(SCHEMA).await;
    db.execute(EVENTS).await;
    let service = db.service(TABLES, config).await;
    let router = service.router();
    (db, service, router)
}

async fn post_sql(router: &Router, sql: &str) -> (StatusCode, Value) {
    let request = Request::post("/v1/sql")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({ "sql": sql }).to_string()))
        .expect("request");
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("infallible router");
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{sql:?} answered non-JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, value)
}

async fn rows(router: &Router, sql: &str) -> Value {
    let (status, body) = post_sql(router, sql).await;
    assert_eq!(status, StatusCode::OK, "{sql:?}: {body}");
    body["rows"].clone()
}

/// The physical plan of `sql`, as EXPLAIN shows it.
async fn physical_plan(router: &Router, sql: &str) -> String {
    let plan = rows(router, &format!("EXPLAIN {sql}")).await;
    plan.as_array()
        .expect("EXPLAIN rows")
        .iter()
        .find(|row| row[0] == "physical_plan")
        .and_then(|row| row[1].as_str())
        .unwrap_or_else(|| panic!("no physical plan for {sql:?}: {plan}"))
        .to_owned()
}

/// The ids of the events matching `condition` as DataFusion alone decides: filters do not move
/// below a LIMIT, so the scan sends PostgreSQL no WHERE and DataFusion evaluates `condition`.
/// The reference an exact pushdown must agree with.
async fn datafusion_answer(router: &Router, condition: &str) -> Value {
    let sql = format!(
        "SELECT id FROM (SELECT * FROM events LIMIT 1000000) AS e WHERE {condition} ORDER BY id"
    );
    let plan = physical_plan(router, &sql).await;
    assert!(
        plan.contains("FilterExec") && !scan_line(&plan).contains(" WHERE "),
        "{condition} is not evaluated by DataFusion:\n{plan}"
    );
    rows(router, &sql).await
}

/// The `PostgresScanExec` line of a plan.
fn scan_line(plan: &str) -> &str {
    plan.lines()
        .find(|line| line.contains("PostgresScanExec"))
        .unwrap_or_else(|| panic!("no PostgresScanExec in\n{plan}"))
}

/// The query service over the PostgreSQL relations `meterd.<table>`, as the store serves them.
async fn with_postgres(
    pool: Pool,
    tables: &[&str],
    config: QueryConfig,
) -> Result<Arc<QueryService>, Box<dyn std::error::Error>> {
    let mut registered: Vec<(String, Arc<dyn TableProvider>)> = Vec::new();
    for &table in tables {
        let provider =
            meterd_store_postgres::sql::discover(pool.clone(), "meterd", table, config.timeout)
                .await?;
        registered.push((table.to_owned(), Arc::new(provider)));
    }
    Ok(QueryService::with_tables(registered, config)?)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_match_postgres() {
    let (db, _service, router) = fixture("answers", QueryConfig::default()).await;

    // (DataFusion SQL, the same question asked of PostgreSQL as one JSON array per row).
    // PostgreSQL orders text by the database's collation; DataFusion by bytes, like "C".
    let cases = [
        (
            "SELECT tenant, count(*), sum(input_tokens), max(output_tokens) FROM events \
             GROUP BY tenant ORDER BY tenant",
            "SELECT json_build_array(tenant, count(*), sum(input_tokens)::bigint, \
             max(output_tokens)) FROM meterd.events GROUP BY tenant ORDER BY tenant COLLATE \"C\"",
        ),
        (
            "SELECT id, tenant, subject, dimensions FROM events WHERE subject IS NOT NULL \
             ORDER BY id",
            "SELECT json_build_array(id, tenant, subject, dimensions::text) FROM meterd.events \
             WHERE subject IS NOT NULL ORDER BY id",
        ),
        (
            "SELECT id, status_code, request_bytes, cached_input_tokens, agent, steps \
             FROM events WHERE type <> 'llm_usage' ORDER BY id",
            "SELECT json_build_array(id, status_code, request_bytes, cached_input_tokens, agent, \
             steps) FROM meterd.events WHERE type <> 'llm_usage' ORDER BY id",
        ),
        (
            "SELECT CAST(bucket AS BIGINT), tenant, events, CAST(input_tokens AS BIGINT), \
             output_tokens FROM usage_hourly \
             WHERE tenant = 'acme' AND bucket >= '2026-01-10T00:00:00Z' \
             AND bucket < '2026-01-11T00:00:00Z' ORDER BY 1",
            "SELECT json_build_array((extract(epoch FROM bucket) * 1000000)::bigint, tenant, \
             events, input_tokens::bigint, output_tokens) FROM meterd.usage_hourly \
             WHERE tenant = 'acme' AND bucket >= '2026-01-10T00:00:00Z' \
             AND bucket < '2026-01-11T00:00:00Z' ORDER BY bucket",
        ),
        (
            "SELECT tenant, sum(events) FROM usage_daily GROUP BY tenant ORDER BY tenant",
            "SELECT json_build_array(tenant, sum(events)::bigint) FROM meterd.usage_daily \
             GROUP BY tenant ORDER BY tenant COLLATE \"C\"",
        ),
        (
            "SELECT e.id, h.events FROM events e JOIN usage_hourly h \
             ON h.tenant = e.tenant AND h.bucket = date_trunc('hour', e.time) \
             WHERE e.tenant = 'acme' ORDER BY e.id",
            "SELECT json_build_array(e.id, h.events) FROM meterd.events e \
             JOIN meterd.usage_hourly h \
             ON h.tenant = e.tenant AND h.bucket = date_trunc('hour', e.time AT TIME ZONE 'UTC') \
             AT TIME ZONE 'UTC' WHERE e.tenant = 'acme' ORDER BY e.id",
        ),
    ];
    for (ours, theirs) in cases {
        let expected = db.json_rows(theirs).await;
        assert!(
            expected.as_array().is_some_and(|rows| !rows.is_empty()),
            "{theirs}"
        );
        assert_eq!(rows(&router, ours).await, expected, "{ours}");
    }

    // The awkward values survive as they are.
    assert_eq!(
        rows(
            &router,
            "SELECT tenant, subject, dimensions FROM events WHERE id IN ('e05', 'e07') ORDER BY id"
        )
        .await,
        json!([
            ["o'brien", "o'brien", r#"{"note": "it's \"quoted\""}"#],
            [
                "zürich",
                "ünïcødé ✓ 日本",
                r#"{"städte": ["zürich", "genève"]}"#
            ],
        ])
    );
    assert_eq!(
        rows(
            &router,
            "SELECT id FROM events WHERE subject = 'ünïcødé ✓ 日本' OR subject = 'o''brien' \
             ORDER BY id"
        )
        .await,
        json!([["e05"], ["e07"]])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_types_map_to_arrow() {
    let db = TestDb::create("types").await;
    db.execute(SCHEMA).await;
    db.execute(EVENTS).await;
    db.execute(
        r#"
        CREATE TABLE meterd.kinds (
            small int2 NOT NULL,
            medium int4,
            big int8,
            real4 float4,
            real8 float8,
            money numeric(10, 2),
            wide numeric(50, 2),
            free numeric,
            flag bool,
            naive timestamp,
            day date,
            uid uuid,
            code varchar(8),
            doc json,
            tags text[]
        );
        INSERT INTO meterd.kinds VALUES
            (3, 40000, 5000000000, 1.5, 2.25, -12.5, 1.25, 0.125, true,
             '2026-01-10 12:00:00.5', '2026-01-10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
             'abc', '{"a":  1}', '{x,"y z"}'),
            (-1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
             NULL);
        "#,
    )
    .await;
    let service = db
        .service(&["kinds", "usage_daily"], QueryConfig::default())
        .await;

    let (schema, batches) = service
        .query("SELECT * FROM kinds ORDER BY small DESC")
        .await
        .expect("query");
    let types: Vec<(&str, DataType, bool)> = schema
        .fields()
        .iter()
        .map(|f| (f.name().as_str(), f.data_type().clone(), f.is_nullable()))
        .collect();
    assert_eq!(
        types,
        vec![
            ("small", DataType::Int64, false),
            ("medium", DataType::Int64, true),
            ("big", DataType::Int64, true),
            ("real4", DataType::Float64, true),
            ("real8", DataType::Float64, true),
            ("money", DataType::Decimal128(38, 2), true),
            ("wide", DataType::Float64, true),
            ("free", DataType::Float64, true),
            ("flag", DataType::Boolean, true),
            (
                "naive",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true
            ),
            ("day", DataType::Utf8, true),
            ("uid", DataType::Utf8, true),
            ("code", DataType::Utf8, true),
            ("doc", DataType::Utf8, true),
            ("tags", DataType::Utf8, true),
        ]
    );
    let batch = arrow::compute::concat_batches(&schema, &batches).expect("concat");
    assert_eq!(batch.num_rows(), 2);
    let int = |name: &str| batch[name].as_primitive::<Int64Type>().value(0);
    let float = |name: &str| batch[name].as_primitive::<Float64Type>().value(0);
    let text = |name: &str| batch[name].as_string::<i32>().value(0).to_owned();
    assert_eq!(
        (int("small"), int("medium"), int("big")),
        (3, 40_000, 5_000_000_000)
    );
    assert_eq!(
        (float("real4"), float("real8"), float("wide"), float("free")),
        (1.5, 2.25, 1.25, 0.125)
    );
    assert_eq!(
        batch["money"].as_primitive::<Decimal128Type>().value(0),
        -1250
    );
    assert!(batch["flag"].as_boolean().value(0));
    assert_eq!(
        batch["naive"]
            .as_primitive::<TimestampMicrosecondType>()
            .value(0),
        1_768_046_400_500_000
    );
    assert_eq!(text("day"), "2026-01-10");
    assert_eq!(text("uid"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(text("code"), "abc");
    assert_eq!(text("doc"), r#"{"a":  1}"#);
    assert_eq!(text("tags"), r#"{x,"y z"}"#);
    for column in batch.columns().iter().skip(1) {
        assert!(column.is_null(1), "second row is NULL but for `small`");
    }

    // numeric(p, s) keeps every digit, up to 38 of them.
    let (_, batches) = service
        .query("SELECT input_tokens, cost_usd FROM usage_daily ORDER BY tenant, day")
        .await
        .expect("query");
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).expect("concat");
    let tokens = batch["input_tokens"].as_primitive::<Decimal128Type>();
    let cost = batch["cost_usd"].as_primitive::<Decimal128Type>();
    assert_eq!(tokens.data_type(), &DataType::Decimal128(38, 0));
    assert_eq!(cost.data_type(), &DataType::Decimal128(38, 4));
    assert_eq!(
        (tokens.value(0), cost.value(0)),
        (300, 123_456),
        "acme 2026-01-10"
    );
    assert!(tokens.is_null(1) && cost.is_null(1), "acme 2026-01-11");
    assert_eq!(
        (tokens.value(2), cost.value(2)),
        (99_999_999_999_999_999_999, -1),
        "beta"
    );

    // Narrow integers and naive timestamps filter in PostgreSQL too.
    let router = service.router();
    let sql = "SELECT small FROM kinds WHERE small = 3 AND naive >= '2026-01-10T12:00:00' \
               AND code IN ('abc', 'x') AND flag AND doc IS NOT NULL AND free IS NOT NULL";
    assert_eq!(rows(&router, sql).await, json!([[3]]));
    let plan = physical_plan(&router, sql).await;
    assert!(!plan.contains("FilterExec"), "{plan}");
    assert!(scan_line(&plan).contains(r#""small" = $1::int8"#), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_and_tenant_filters_run_in_postgres() {
    let (db, _service, router) = fixture("pushdown", QueryConfig::default()).await;

    // (DataFusion condition, PostgreSQL condition): the same question; both must select the
    // same ids, and DataFusion must not filter anything itself.
    let cases = [
        ("tenant = 'acme'", "tenant = 'acme'"),
        ("'acme' = tenant", "tenant = 'acme'"),
        ("tenant <> 'acme'", "tenant <> 'acme'"),
        // Byte order: only 'Zeta' sorts before 'a' (not so in the database's en-US collation).
        ("tenant < 'a'", "tenant COLLATE \"C\" < 'a'"),
        ("tenant >= 'b'", "tenant COLLATE \"C\" >= 'b'"),
        (
            "tenant BETWEEN 'Z' AND 'b'",
            "tenant COLLATE \"C\" BETWEEN 'Z' AND 'b'",
        ),
        (
            "tenant IN ('acme', 'o''brien')",
            "tenant IN ('acme', 'o''brien')",
        ),
        (
            "tenant NOT IN ('acme', 'beta')",
            "tenant NOT IN ('acme', 'beta')",
        ),
        (
            "time >= '2026-01-10T00:30:00Z' AND time < '2026-01-11T00:00:00Z'",
            "time >= '2026-01-10T00:30:00Z' AND time < '2026-01-11T00:00:00Z'",
        ),
        (
            "time BETWEEN TIMESTAMP '2026-01-10 00:00:00' AND TIMESTAMP '2026-01-10 01:15:00'",
            "time BETWEEN '2026-01-10 00:00:00Z' AND '2026-01-10 01:15:00Z'",
        ),
        (
            "time NOT BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-31T00:00:00Z'",
            "time NOT BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-31T00:00:00Z'",
        ),
        // DataFusion itself truncates a nanosecond literal to the column's microseconds
        // before comparing; the pushed-down filter agrees.
        (
            "time >= TIMESTAMP '2026-01-10 01:15:00.0000005'",
            "time >= '2026-01-10 01:15:00Z'",
        ),
        (
            "time = TIMESTAMP '2026-01-10 01:15:00.0000005'",
            "time = '2026-01-10 01:15:00Z'",
        ),
        (
            "time > to_timestamp_millis(1768003200000)",
            "time > '2026-01-10 00:00:00Z'",
        ),
        ("time < now()", "time < now()"),
        (
            "time = '2026-01-10T01:15:00.000001Z' OR time = '2025-12-31T23:59:59.999999Z'",
            "time IN ('2026-01-10T01:15:00.000001Z', '2025-12-31T23:59:59.999999Z')",
        ),
        (
            "tenant = 'acme' AND time >= '2026-01-10T01:00:00Z' AND time < '2026-02-01T00:00:00Z'",
            "tenant = 'acme' AND time >= '2026-01-10T01:00:00Z' AND time < '2026-02-01T00:00:00Z'",
        ),
        ("subject IS NULL", "subject IS NULL"),
        ("input_tokens IS NOT NULL", "input_tokens IS NOT NULL"),
        (
            "route IS NOT NULL OR method IS NULL",
            "route IS NOT NULL OR method IS NULL",
        ),
        ("input_tokens > 100", "input_tokens > 100"),
        (
            "status_code >= 400 OR input_tokens <= 50",
            "status_code >= 400 OR input_tokens <= 50",
        ),
        ("NOT (tenant = 'acme')", "NOT (tenant = 'acme')"),
        ("NOT (output_tokens > 5)", "NOT (output_tokens > 5)"),
        (
            "(output_tokens > 5) IS NOT TRUE",
            "(output_tokens > 5) IS NOT TRUE",
        ),
        ("status_code IN (200, 404)", "status_code IN (200, 404)"),
        ("subject = 'o''brien'", "subject = 'o''brien'"),
    ];
    for (ours, theirs) in cases {
        let expected = db
            .json_rows(&format!(
                "SELECT json_build_array(id) FROM meterd.events WHERE {theirs} ORDER BY id"
            ))
            .await;
        let sql = format!("SELECT id FROM events WHERE {ours} ORDER BY id");
        assert_eq!(rows(&router, &sql).await, expected, "{ours}");
        assert_eq!(datafusion_answer(&router, ours).await, expected, "{ours}");
        let plan = physical_plan(&router, &sql).await;
        assert!(
            !plan.contains("FilterExec"),
            "{ours} is filtered by DataFusion:\n{plan}"
        );
        assert!(scan_line(&plan).contains(" WHERE "), "{ours}:\n{plan}");
    }

    // The usual dashboard question: both filters are in the SQL sent to PostgreSQL, with the
    // values as parameters.
    let plan = physical_plan(
        &router,
        "SELECT count(*) FROM events WHERE tenant = 'acme' \
         AND time >= '2026-01-10T00:00:00Z' AND time < '2026-01-11T00:00:00Z'",
    )
    .await;
    let scan = scan_line(&plan);
    for part in [
        r#"FROM "meterd"."events" WHERE ("tenant" = $1::text)"#,
        r#"("time" >= $2::timestamptz)"#,
        r#"("time" < $3::timestamptz)"#,
        "$1='acme'",
        "$2=2026-01-10T00:00:00Z",
        "$3=2026-01-11T00:00:00Z",
    ] {
        assert!(scan.contains(part), "{part} missing from {scan}");
    }
    assert!(!plan.contains("FilterExec"), "{plan}");

    // Views take the filters as well.
    let plan = physical_plan(
        &router,
        "SELECT events FROM usage_hourly WHERE tenant = 'acme' AND bucket >= '2026-01-10T00:00:00Z'",
    )
    .await;
    assert!(
        scan_line(&plan).contains(
            r#"FROM "meterd"."usage_hourly" WHERE ("tenant" = $1::text) AND ("bucket" >= $2::timestamptz)"#
        ),
        "{plan}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untranslatable_filters_are_applied_by_datafusion() {
    let (db, _service, router) = fixture("untranslatable", QueryConfig::default()).await;
    let cases = [
        ("lower(tenant) = 'acme'", "lower(tenant) = 'acme'"),
        ("tenant LIKE 'a%'", "tenant LIKE 'a%'"),
        ("dimensions LIKE '%eu%'", "dimensions::text LIKE '%eu%'"),
        (
            "input_tokens + output_tokens > 100",
            "input_tokens + output_tokens > 100",
        ),
        ("tenant = subject", "tenant = subject"),
        (
            "CAST(time AS DATE) = DATE '2026-01-10'",
            "(time AT TIME ZONE 'UTC')::date = '2026-01-10'",
        ),
        // One translatable part and one not: the pair is left to DataFusion.
        (
            "tenant = 'acme' OR upper(tenant) = 'BETA'",
            "tenant = 'acme' OR upper(tenant) = 'BETA'",
        ),
    ];
    for (ours, theirs) in cases {
        let expected = db
            .json_rows(&format!(
                "SELECT json_build_array(id) FROM meterd.events WHERE {theirs} ORDER BY id"
            ))
            .await;
        let sql = format!("SELECT id FROM events WHERE {ours} ORDER BY id");
        assert_eq!(rows(&router, &sql).await, expected, "{ours}");
        assert_eq!(datafusion_answer(&router, ours).await, expected, "{ours}");
        let plan = physical_plan(&router, &sql).await;
        assert!(plan.contains("FilterExec"), "{ours}:\n{plan}");
    }

    // A conjunction is split: the translatable half still goes to PostgreSQL.
    let sql = "SELECT id FROM events WHERE lower(tenant) = 'acme' AND time < '2026-01-10T01:00:00Z' \
               ORDER BY id";
    assert_eq!(rows(&router, sql).await, json!([["e01"], ["e02"]]));
    let plan = physical_plan(&router, sql).await;
    assert!(plan.contains("FilterExec"), "{plan}");
    assert!(
        scan_line(&plan).contains(r#"WHERE ("time" < $1::timestamptz)"#),
        "{plan}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_literals_cannot_inject_sql() {
    let (db, _service, router) = fixture("injection", QueryConfig::default()).await;
    for attempt in [
        "SELECT id FROM events WHERE tenant = 'acme'' OR ''1''=''1'",
        "SELECT id FROM events WHERE tenant = 'x''; DROP TABLE meterd.events; --'",
        "SELECT id FROM events WHERE tenant IN ('x''); DELETE FROM meterd.events; --')",
        "SELECT id FROM events WHERE tenant > 'zz' AND subject = '$1'",
        "SELECT id FROM events WHERE tenant = 'nul\u{0}'",
    ] {
        assert_eq!(rows(&router, attempt).await, json!([]), "{attempt}");
    }
    let left = db
        .json_rows("SELECT json_build_array(count(*)) FROM meterd.events")
        .await;
    assert_eq!(left, json!([[10]]));
    assert_eq!(
        rows(&router, "SELECT count(*) FROM events").await,
        json!([[10]])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_and_limit_are_pushed_down() {
    let (_db, _service, router) = fixture("projection", QueryConfig::default()).await;

    let sql = "SELECT id, dimensions FROM events WHERE tenant = 'acme' LIMIT 2";
    let plan = physical_plan(&router, sql).await;
    assert!(
        scan_line(&plan).contains(
            r#"sql=SELECT "id", "dimensions"::text AS "dimensions" FROM "meterd"."events" WHERE ("tenant" = $1::text) LIMIT 2"#
        ),
        "{plan}"
    );
    let answer = rows(&router, sql).await;
    assert_eq!(answer.as_array().map(Vec::len), Some(2), "{answer}");

    // No column at all is needed to count.
    let sql = "SELECT count(*) FROM events WHERE time >= '2026-01-11T00:00:00Z'";
    assert!(
        scan_line(&physical_plan(&router, sql).await)
            .contains(r#"sql=SELECT FROM "meterd"."events" WHERE"#),
    );
    assert_eq!(rows(&router, sql).await, json!([[4]]));

    // A limit above a filter DataFusion applies is not pushed down.
    let sql = "SELECT id FROM events WHERE lower(tenant) = 'beta' LIMIT 1";
    assert!(!scan_line(&physical_plan(&router, sql).await).contains("LIMIT"));
    assert_eq!(rows(&router, sql).await.as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_stream_in_batches() {
    let db = TestDb::create("streaming").await;
    db.execute(SCHEMA).await;
    db.execute(
        "INSERT INTO meterd.events (tenant, id, type, time, ingested_at, input_tokens)
         SELECT 'bulk', 'b' || lpad(n::text, 6, '0'), 'llm_usage',
                '2026-01-01'::timestamptz + n * interval '1 second', now(), n
         FROM generate_series(1, 20000) AS n",
    )
    .await;
    let service = db.service(TABLES, QueryConfig::default()).await;

    let (_, batches) = service
        .query("SELECT id, input_tokens FROM events")
        .await
        .expect("query");
    let sizes: Vec<usize> = batches.iter().map(RecordBatch::num_rows).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 20_000);
    assert!(
        sizes.len() >= 3 && sizes.iter().all(|&n| n <= 8192),
        "{sizes:?}"
    );
    let total: i64 = batches
        .iter()
        .map(|b| arrow::compute::sum(b["input_tokens"].as_primitive::<Int64Type>()).unwrap_or(0))
        .sum();
    assert_eq!(total, 20_000 * 20_001 / 2);

    // Stopping early (a limit DataFusion applies) leaves the pool usable.
    for _ in 0..6 {
        let (_, batches) = service
            .query("SELECT id FROM events WHERE lower(id) LIKE 'b%' LIMIT 3")
            .await
            .expect("query");
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
    }
    let (_, batches) = service
        .query("SELECT count(*) FROM events WHERE time >= '2026-01-01T01:00:00Z'")
        .await
        .expect("query");
    assert_eq!(
        batches[0].column(0).as_primitive::<Int64Type>().value(0),
        20_000 - 3_599
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_cap_answers_413() {
    let config = QueryConfig {
        max_rows: 3,
        ..QueryConfig::default()
    };
    let (_db, service, router) = fixture("rowcap", config).await;
    let (status, body) = post_sql(&router, "SELECT id FROM events").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("row cap")),
        "{body}"
    );
    let e = service
        .query("SELECT id FROM events")
        .await
        .expect_err("over the cap");
    assert_eq!(e.status_code(), StatusCode::PAYLOAD_TOO_LARGE);
    // Under the cap is fine.
    assert_eq!(
        rows(
            &router,
            "SELECT id FROM events WHERE tenant = 'beta' ORDER BY id"
        )
        .await,
        json!([["e08"], ["e10"]])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_is_named_in_the_error() {
    let db = TestDb::create("missing").await;
    db.execute(SCHEMA).await;
    let e = with_postgres(
        db.pool.clone(),
        &["events", "usage_weekly"],
        QueryConfig::default(),
    )
    .await
    .expect_err("usage_weekly does not exist");
    let text = chain(e.as_ref());
    assert!(text.contains("meterd.usage_weekly"), "{text}");
}
