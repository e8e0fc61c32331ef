//! The PostgreSQL store against a real PostgreSQL 15: exactly-once delivery through replays,
//! restarts, an outage and `kill -9` mid-COPY; migrations; tenant isolation.
//!
//! Rollup correctness is in `tests/rollups.rs`, TimescaleDB conformance in
//! `tests/timescaledb.rs`.

use crate::common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::{self, PrivatePg, TestDb};
use common::{
    NDJSON, Server, distinct_keys, generated, llm_event, ndjson, post_until_gone, renamed,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// Every `(tenant, id)` in PostgreSQL's `meterd.events`.
async fn keys_in_postgres(client: &tokio_postgres::Client) -> Vec<(String, String)> {
    client
        .query("SELECT tenant, id FROM meterd.events", &[])
        .await
        .expect("read keys")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Asserts PostgreSQL holds exactly `want`, each once.
async fn assert_exactly(
    client: &tokio_postgres::Client,
    want: &HashSet<(String, String)>,
    context: &str,
) {
    let have = keys_in_postgres(client).await;
    let unique: HashSet<(String, String)> = have.iter().cloned().collect();
    assert_eq!(
        have.len(),
        unique.len(),
        "{context}: {} rows are duplicates",
        have.len() - unique.len()
    );
    let missing: Vec<_> = want.difference(&unique).take(5).collect();
    let extra: Vec<_> = unique.difference(want).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{context}: {} acknowledged events missing (e.g. {missing:?}), {} unexpected (e.g. {extra:?})",
        want.difference(&unique).count(),
        unique.difference(want).count()
    );
}

/// Per-column aggregates, the same question asked of PostgreSQL and of meterd's embedded store:
/// equal answers mean every column was carried over.
const COLUMN_DIGEST: &[(&str, &str)] = &[
    ("count(*)", "count(*)"),
    ("count(subject)", "count(subject)"),
    ("count(source)", "count(source)"),
    ("count(provider)", "count(provider)"),
    ("count(model)", "count(model)"),
    ("sum(input_tokens)", "sum(input_tokens)"),
    ("sum(output_tokens)", "sum(output_tokens)"),
    ("sum(cached_input_tokens)", "sum(cached_input_tokens)"),
    ("sum(reasoning_tokens)", "sum(reasoning_tokens)"),
    ("count(route)", "count(route)"),
    ("count(method)", "count(method)"),
    ("sum(status_code)", "sum(status_code)"),
    ("sum(request_bytes)", "sum(request_bytes)"),
    ("sum(response_bytes)", "sum(response_bytes)"),
    ("count(agent)", "count(agent)"),
    ("count(run_id)", "count(run_id)"),
    ("count(parent_run_id)", "count(parent_run_id)"),
    ("count(status)", "count(status)"),
    ("sum(latency_ms)", "sum(latency_ms)"),
    ("sum(duration_ms)", "sum(duration_ms)"),
    ("sum(steps)", "sum(steps)"),
    ("sum(tool_calls)", "sum(tool_calls)"),
    (
        "sum(floor(extract(epoch FROM time)))",
        "sum(arrow_cast(time, 'Int64') / 1000000)",
    ),
    (
        "count(*) FILTER (WHERE dimensions <> '{}'::jsonb)",
        "sum(CASE WHEN cardinality(map_keys(dimensions)) > 0 THEN 1 ELSE 0 END)",
    ),
];

/// `embedded` is a meterd without PostgreSQL that was sent the same events.
async fn assert_columns_match(embedded: &Server, client: &tokio_postgres::Client) {
    for (pg_expr, df_expr) in COLUMN_DIGEST {
        let in_pg: Option<i64> = client
            .query_one(
                &format!("SELECT ({pg_expr})::bigint FROM meterd.events"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{pg_expr}: {e}"))
            .get(0);
        let in_meterd = embedded
            .scalar(&format!("SELECT {df_expr} AS v FROM events"))
            .await
            .as_i64();
        assert_eq!(
            in_pg, in_meterd,
            "{pg_expr} differs between PostgreSQL and meterd"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_reaches_postgres_once() {
    let db = TestDb::create("delivery").await;
    let mut server = Server::start(&["--postgres-url", &db.url]);
    let client = db.client().await;

    // The same events also go to a meterd without PostgreSQL: its embedded store is the
    // reference for every column.
    let embedded = Server::start(&[]);
    let started = chrono::Utc::now() - chrono::Duration::seconds(1);
    let events = generated(21, 4_000, 8, Duration::from_secs(30 * 86_400), 0.05);
    let keys = distinct_keys(&events);
    let mut accepted = 0;
    for chunk in events.chunks(500) {
        accepted += server.post_ndjson(chunk).await.accepted();
        embedded.post_ndjson(chunk).await.accepted();
    }
    assert_eq!(accepted as usize, keys.len());
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        keys.len() as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_exactly(&client, &keys, "after the first delivery").await;
    assert_columns_match(&embedded, &client).await;
    // `ingested_at` is each node's own clock, so it is checked against the test's, not the
    // other node's.
    let outside = pg::int(
        &client,
        &format!(
            "SELECT count(*) FROM meterd.events \
             WHERE ingested_at < '{started}'::timestamptz OR ingested_at > now()"
        ),
    )
    .await;
    assert_eq!(
        outside, 0,
        "ingested_at lies between the test's start and now"
    );

    // Replays: the same events again add nothing, in meterd or in PostgreSQL.
    for chunk in events.chunks(700) {
        assert_eq!(server.post_ndjson(chunk).await.accepted(), 0);
    }
    // A graceful restart and a kill: the sink resumes from its committed checkpoint.
    assert!(server.stop().success(), "meterd exits cleanly");
    server.restart();
    server.kill();
    server.restart();
    let mut more = generated(22, 300, 3, Duration::from_secs(86_400), 0.0);
    renamed(&mut more, "after-restart");
    assert_eq!(server.post_ndjson(&more).await.accepted(), 300);
    let mut all = keys.clone();
    all.extend(distinct_keys(&more));
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        all.len() as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_exactly(&client, &all, "after replays and restarts").await;

    // One node, one checkpoint row.
    let checkpoints = pg::int(&client, "SELECT count(*) FROM meterd.sink_checkpoints").await;
    assert_eq!(checkpoints, 1, "one node, one checkpoint");
    let ready = server
        .client
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::OK);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["postgres"]["connected"], true, "{body}");

    // A checkpoint no meterd writes (a log position is never negative) is an error the sink
    // reports, not a reason to deliver everything again from position 0.
    assert!(server.stop().success());
    client
        .batch_execute(
            "ALTER TABLE meterd.sink_checkpoints DROP CONSTRAINT sink_checkpoints_lsn_check; \
             UPDATE meterd.sink_checkpoints SET lsn = -5",
        )
        .await
        .expect("damage the checkpoint past its constraint");
    server.restart();
    let deadline = std::time::Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let body: Value = server
            .client
            .get(format!("{}/readyz", server.url))
            .send()
            .await
            .expect("readyz")
            .json()
            .await
            .expect("json");
        if body["postgres"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("never negative"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the negative checkpoint was not reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_exactly(&client, &all, "a damaged checkpoint delivers nothing twice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_keeps_acknowledging_then_503_then_drains() {
    let pg = PrivatePg::start();
    let db = TestDb::create_on(&pg.url(), "outage").await;
    let mut server = Server::start(&["--postgres-url", &db.url, "--max-log-bytes", "3000000"]);
    let client = db.client().await;

    let mut acked: HashSet<(String, String)> = HashSet::new();
    let mut first = generated(31, 500, 4, Duration::from_secs(86_400), 0.0);
    renamed(&mut first, "before");
    assert_eq!(server.post_ndjson(&first).await.accepted(), 500);
    acked.extend(distinct_keys(&first));
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        500,
        DELIVERY_TIMEOUT,
    )
    .await;
    drop(client);

    pg.stop_server();
    // PostgreSQL is down: ingest keeps acknowledging into the log until the log is full.
    let mut saw_503 = false;
    for round in 0..200 {
        let mut batch = generated(1000 + round, 500, 4, Duration::from_secs(86_400), 0.0);
        renamed(&mut batch, &format!("during-{round}"));
        let reply = server
            .try_post_events(ndjson(&batch), NDJSON, false)
            .await
            .expect("meterd answers while PostgreSQL is down");
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                reply.headers.contains_key("retry-after"),
                "503 carries Retry-After"
            );
            saw_503 = true;
            break;
        }
        assert_eq!(reply.accepted(), 500, "round {round}");
        acked.extend(distinct_keys(&batch));
    }
    assert!(saw_503, "a full log answers 503");
    assert!(
        acked.len() > 1_000,
        "ingest kept acknowledging during the outage"
    );
    let ready = server
        .client
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready while PostgreSQL is down"
    );

    // PostgreSQL comes back: the backlog drains by itself and ingest takes events again.
    pg.start_server();
    let client = db.client().await;
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        acked.len() as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_exactly(&client, &acked, "after the outage").await;
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    let mut after = generated(99, 100, 2, Duration::from_secs(3600), 0.0);
    renamed(&mut after, "after");
    loop {
        let reply = server
            .try_post_events(ndjson(&after), NDJSON, false)
            .await
            .expect("answer");
        if reply.status == StatusCode::OK {
            assert_eq!(reply.accepted(), 100);
            acked.extend(distinct_keys(&after));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ingest never recovered: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        acked.len() as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_exactly(&client, &acked, "after recovery").await;
    server.kill();
}

/// Waits until every acknowledged key is in PostgreSQL, then checks nothing is there twice and
/// nothing is there that was never sent.
async fn assert_acked_once(
    client: &tokio_postgres::Client,
    acked: &HashSet<(String, String)>,
    sent: &HashSet<(String, String)>,
) {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let have: HashSet<(String, String)> = keys_in_postgres(client).await.into_iter().collect();
        if acked.is_subset(&have) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged events never reached PostgreSQL",
            acked.difference(&have).count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let anything durable but unacknowledged arrive too, then check the whole table.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let have = keys_in_postgres(client).await;
    let unique: HashSet<(String, String)> = have.iter().cloned().collect();
    assert_eq!(
        have.len(),
        unique.len(),
        "{} rows are duplicates",
        have.len() - unique.len()
    );
    let stray: Vec<_> = unique.difference(sent).take(5).collect();
    assert!(stray.is_empty(), "rows that were never sent: {stray:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_copy_delivers_each_event_once() {
    let db = TestDb::create("killcopy").await;
    let mut server = Server::start(&["--postgres-url", &db.url]);
    let client = db.client().await;
    let mut acked: HashSet<(String, String)> = HashSet::new();

    // Deterministic: hold this node's checkpoint row, so the sink's transaction stops after its
    // COPY, at the checkpoint update; kill meterd there; let go.
    let mut first = generated(41, 1_000, 4, Duration::from_secs(86_400), 0.0);
    renamed(&mut first, "held");
    assert_eq!(server.post_ndjson(&first).await.accepted(), 1_000);
    acked.extend(distinct_keys(&first));
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        1_000,
        DELIVERY_TIMEOUT,
    )
    .await;
    let mut locker = db.client().await;
    let tx = locker.transaction().await.expect("begin");
    tx.execute("SELECT * FROM meterd.sink_checkpoints FOR UPDATE", &[])
        .await
        .expect("lock checkpoint row");
    let mut second = generated(42, 1_000, 4, Duration::from_secs(86_400), 0.0);
    renamed(&mut second, "in-copy");
    assert_eq!(server.post_ndjson(&second).await.accepted(), 1_000);
    acked.extend(distinct_keys(&second));
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock' \
         AND query LIKE 'UPDATE meterd.sink_checkpoints%'",
        db.name
    );
    pg::wait_for(&client, &waiting, 1, DELIVERY_TIMEOUT).await;
    server.kill();
    tx.rollback().await.expect("release the row");
    // The killed session's COPY never commits.
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        1_000,
        DELIVERY_TIMEOUT,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pg::int(&client, "SELECT count(*) FROM meterd.events").await,
        1_000
    );
    server.restart();
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        2_000,
        DELIVERY_TIMEOUT,
    )
    .await;

    // Random: kill while batches stream in, three times, each as soon as a COPY is seen running
    // (or after 15 s). The held-row kill above is the case that is guaranteed to land inside a
    // delivery transaction; these add kills at whatever point the stream is at.
    let copying = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND state = 'active' \
         AND query LIKE 'COPY meterd.events_data%'",
        db.name
    );
    let mut kills_in_copy = 0;
    let mut sent = acked.clone();
    for round in 0..3 {
        let writer = tokio::spawn(post_until_gone(server.url.clone(), format!("r{round}")));
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if pg::int(&client, &copying).await > 0 {
                kills_in_copy += 1;
                break;
            }
        }
        server.kill();
        let round_result = writer.await.expect("writer");
        acked.extend(round_result.acked);
        sent.extend(round_result.sent);
        server.restart();
    }
    assert_acked_once(&client, &acked, &sent).await;
    eprintln!("{kills_in_copy} of 3 random kills landed while a COPY was running");
    server.kill();
}

fn meterd_migrate(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(["migrate", "--postgres-url", url])
        .output()
        .expect("run meterd migrate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_to_run_at_once() {
    let db = TestDb::create("migrate").await;
    // Four processes at once.
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            std::thread::spawn(move || meterd_migrate(&url))
        })
        .collect();
    let outputs: Vec<_> = runs
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let all: Vec<i32> = meterd_store_postgres::migrations::POSTGRES
        .iter()
        .map(|m| m.version)
        .collect();
    let mut applied_all = 0;
    for out in &outputs {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "meterd migrate failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if stdout.contains(&format!("applied now: {all:?}")) {
            applied_all += 1;
        } else {
            assert!(stdout.contains("applied now: []"), "{stdout}");
        }
    }
    assert_eq!(applied_all, 1, "exactly one process applied the migrations");
    let client = db.client().await;
    assert_eq!(
        pg::int(&client, "SELECT count(*) FROM meterd.schema_migrations").await,
        all.len() as i64
    );

    // Again: nothing to do.
    let again = meterd_migrate(&db.url);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("applied now: []"));

    // A migration changed after it was applied is refused, not silently re-run.
    client
        .execute(
            "UPDATE meterd.schema_migrations SET checksum = 'x' WHERE version = 2",
            &[],
        )
        .await
        .expect("tamper");
    let refused = meterd_migrate(&db.url);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("migration 2 (events) differs"), "{stderr}");

    // No URL at all is a configuration error.
    let none = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .arg("migrate")
        .env_remove("METERD_POSTGRES_URL")
        .output()
        .expect("run");
    assert_eq!(none.status.code(), Some(2));
}

/// Revokes what a test granted `role` in `db`, drops the database, then the role (roles are
/// shared by every database of the server).
async fn drop_tenant_role(admin: tokio_postgres::Client, db: TestDb, role: &str) {
    admin
        .batch_execute(&format!(
            "DELETE FROM meterd.tenant_roles WHERE role_name = '{role}';
             REVOKE ALL ON meterd.events, meterd.usage_hourly, meterd.usage_daily FROM {role};
             REVOKE ALL ON SCHEMA meterd FROM {role};
             REVOKE ALL ON DATABASE {db} FROM {role};",
            db = db.name
        ))
        .await
        .expect("clean up grants");
    drop(admin);
    drop(db);
    let cleanup = pg::connect(&pg::admin_url()).await;
    cleanup
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await
        .expect("drop role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_scoped_role_sees_only_its_tenant() {
    let db = TestDb::create("rls").await;
    let mut server = Server::start(&["--postgres-url", &db.url]);
    let admin = db.client().await;
    let events = generated(51, 2_000, 6, Duration::from_secs(10 * 86_400), 0.0);
    let accepted = server.post_ndjson(&events).await.accepted();
    pg::wait_for(
        &admin,
        "SELECT count(*) FROM meterd.events",
        accepted as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    admin
        .execute("SELECT meterd.refresh_rollups()", &[])
        .await
        .expect("refresh");

    let tenant: String = admin
        .query_one(
            "SELECT tenant FROM meterd.events GROUP BY tenant ORDER BY count(*) DESC LIMIT 1",
            &[],
        )
        .await
        .expect("a tenant")
        .get(0);
    let role = format!("reader_{}", db.name);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role};
             CREATE ROLE {role} LOGIN PASSWORD 'reader-secret';
             GRANT CONNECT ON DATABASE {db} TO {role};
             GRANT USAGE ON SCHEMA meterd TO {role};
             GRANT SELECT ON meterd.events, meterd.usage_hourly, meterd.usage_daily TO {role};
             INSERT INTO meterd.tenant_roles (role_name, tenant) VALUES ('{role}', '{tenant}');
             ALTER ROLE {role} SET meterd.tenant = '{tenant}';",
            db = db.name
        ))
        .await
        .expect("create the tenant role");
    let reader_url = db
        .url
        .replacen("meterd:meterd@", &format!("{role}:reader-secret@"), 1);
    let reader = pg::connect(&reader_url).await;

    for relation in ["meterd.events", "meterd.usage_hourly", "meterd.usage_daily"] {
        let (count_col, sum) = if relation == "meterd.events" {
            ("count(*)", "count(*)")
        } else {
            ("count(*)", "sum(events)")
        };
        let others = pg::int(
            &reader,
            &format!("SELECT {count_col} FROM {relation} WHERE tenant <> '{tenant}'"),
        )
        .await;
        assert_eq!(others, 0, "{relation}: the reader sees other tenants' rows");
        let seen = pg::int(
            &reader,
            &format!("SELECT coalesce(({sum})::bigint, 0) FROM {relation}"),
        )
        .await;
        let truth = pg::int(
            &admin,
            &format!("SELECT count(*) FROM meterd.events WHERE tenant = '{tenant}'"),
        )
        .await;
        assert!(truth > 0);
        assert_eq!(
            seen, truth,
            "{relation}: the reader sees all of its own tenant's events"
        );
    }
    // The tenant filter is evaluated once per query (InitPlans), not once per row.
    for relation in ["meterd.events", "meterd.usage_hourly", "meterd.usage_daily"] {
        let plan: Vec<String> = admin
            .query(&format!("EXPLAIN SELECT count(*) FROM {relation}"), &[])
            .await
            .expect("explain")
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("InitPlan"), "{relation}:\n{plan}");
        assert!(!plan.contains("tenant_visible"), "{relation}:\n{plan}");
    }
    // Switching the session's tenant to one not granted shows nothing.
    reader
        .batch_execute("SET meterd.tenant = 'someone-else'")
        .await
        .expect("set");
    assert_eq!(
        pg::int(&reader, "SELECT count(*) FROM meterd.events").await,
        0
    );
    assert_eq!(
        pg::int(&reader, "SELECT count(*) FROM meterd.usage_hourly").await,
        0
    );
    // The storage relations behind the views are not readable at all.
    for relation in [
        "meterd.events_data",
        "meterd.usage_hourly_mat",
        "meterd.usage_daily_mat",
        "meterd.rollup_invalidations",
        "meterd.sink_checkpoints",
    ] {
        let err = reader
            .query(&format!("SELECT count(*) FROM {relation}"), &[])
            .await
            .expect_err(relation);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{relation}: {err:?}"
        );
    }
    // Nor are the other roles' grants.
    assert_eq!(
        pg::int(&reader, "SELECT count(*) FROM meterd.tenant_roles").await,
        1
    );
    drop(reader);
    server.kill();
    drop_tenant_role(admin, db, &role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_is_served_from_postgres_with_filters_pushed_down() {
    let db = TestDb::create("sqlpg").await;
    let mut server = Server::start(&["--postgres-url", &db.url]);
    let client = db.client().await;
    let events = generated(81, 500, 4, Duration::from_secs(3 * 86_400), 0.0);
    let accepted = server.post_ndjson(&events).await.accepted();
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        accepted as i64,
        DELIVERY_TIMEOUT,
    )
    .await;

    // A row only PostgreSQL has: the answer can only come from there.
    client
        .batch_execute(
            "SELECT meterd.ensure_event_partitions(ARRAY[now()]);
             INSERT INTO meterd.events_data (tenant, id, type, time, ingested_at)
             VALUES ('only-in-postgres', 'x1', 'llm.usage', now(), now());",
        )
        .await
        .expect("insert directly");
    assert_eq!(server.count("tenant = 'only-in-postgres'").await, 1);
    assert_eq!(server.count("true").await, accepted + 1);

    // The rollups are relations of the SQL API too.
    client
        .execute("SELECT meterd.refresh_rollups()", &[])
        .await
        .expect("refresh");
    for relation in ["usage_hourly", "usage_daily"] {
        let total = server
            .scalar(&format!("SELECT sum(events) FROM {relation}"))
            .await;
        assert_eq!(total.as_u64(), Some(accepted + 1), "{relation}");
    }

    // Time and tenant filters run in PostgreSQL.
    let plan = server
        .sql(
            "EXPLAIN SELECT count(*) FROM events \
             WHERE tenant = 'tenant-01' AND time >= '2026-01-01T00:00:00Z'",
        )
        .await
        .to_string();
    assert!(plan.contains("PostgresScanExec"), "{plan}");
    assert!(
        plan.contains(r#"\"tenant\" = $"#),
        "tenant filter not pushed down: {plan}"
    );
    assert!(
        plan.contains(r#"\"time\" >= $"#),
        "time filter not pushed down: {plan}"
    );
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sent_to_two_nodes_is_stored_once() {
    let db = TestDb::create("twonodes").await;
    let mut first = Server::start(&["--postgres-url", &db.url]);
    let mut second = Server::start(&["--postgres-url", &db.url]);
    let client = db.client().await;

    let mut shared = generated(91, 300, 4, Duration::from_secs(86_400), 0.0);
    renamed(&mut shared, "shared");
    let mut only_first = generated(92, 200, 4, Duration::from_secs(86_400), 0.0);
    renamed(&mut only_first, "first");
    // The second node delivers the shared events; then the first node, which has never seen
    // them, accepts them too, in batches mixed with events only it has.
    assert_eq!(second.post_ndjson(&shared).await.accepted(), 300);
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        300,
        DELIVERY_TIMEOUT,
    )
    .await;
    let mut mixed = shared.clone();
    mixed.extend(only_first.iter().cloned());
    assert_eq!(first.post_ndjson(&mixed).await.accepted(), 500);

    let mut want = distinct_keys(&shared);
    want.extend(distinct_keys(&only_first));
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        500,
        DELIVERY_TIMEOUT,
    )
    .await;
    // Both nodes' checkpoints reached their log ends, and nothing more arrives.
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.sink_checkpoints",
        2,
        DELIVERY_TIMEOUT,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_exactly(&client, &want, "two nodes").await;
    client
        .execute("SELECT meterd.refresh_rollups()", &[])
        .await
        .expect("refresh");
    assert_eq!(
        pg::int(
            &client,
            "SELECT sum(events)::bigint FROM meterd.usage_daily"
        )
        .await,
        500,
        "the rollups count the shared events once"
    );
    assert!(
        first.stderr().contains("already had"),
        "the first node reports the events it found stored"
    );
    first.kill();
    second.kill();
}

/// A database left by a meterd of schema version 3 (rollup sums saturating at 2^63-1, a Grafana
/// role granted the rollup views) upgrades to exact sums: every rollup row and grant stays, the
/// saturated buckets are computed again exactly, and a tenant with quotes, a slash and an accent
/// still scopes its role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_to_exact_sums_keeps_the_rollups_and_their_grants() {
    let db = TestDb::create("exactupgrade").await;
    let mut admin = db.client().await;
    let mut config = meterd_store_postgres::PostgresConfig::new(db.url.clone());
    config.timescaledb = meterd_store_postgres::TimescaleMode::Off;
    meterd_store_postgres::migrate::migrate_to(&mut admin, &config, 3)
        .await
        .expect("the schema of version 3");

    // Events as the older meterd delivered them: two of 2^63-1 tokens in one closed hour for
    // one tenant, a few ordinary ones for another.
    let tenant = "O'Brien & Co/é";
    let hour = chrono::DurationRound::duration_trunc(
        chrono::Utc::now() - chrono::TimeDelta::hours(3),
        chrono::TimeDelta::hours(1),
    )
    .expect("trunc");
    admin
        .execute(
            "SELECT meterd.ensure_event_partitions(ARRAY[$1::timestamptz])",
            &[&hour],
        )
        .await
        .expect("partition");
    let insert = "INSERT INTO meterd.events_data (tenant, id, type, time, ingested_at, provider, \
                  model, input_tokens, output_tokens) \
                  VALUES ($1, $2, 'llm.usage', $3, $3, 'openai', 'gpt-4o', $4, 1)";
    for (t, id, tokens) in [
        (tenant, "max-1", i64::MAX),
        (tenant, "max-2", i64::MAX),
        ("acme", "a-1", 10),
        ("acme", "a-2", 20),
    ] {
        let at = hour + chrono::TimeDelta::minutes(5);
        admin
            .execute(insert, &[&t, &id, &at, &tokens])
            .await
            .expect("insert an event");
    }
    // A saturated bucket of an old day whose raw events retention then drops: its rollup row
    // is all that is left of them.
    let old_day = chrono::DurationRound::duration_trunc(
        chrono::Utc::now() - chrono::TimeDelta::days(5),
        chrono::TimeDelta::days(1),
    )
    .expect("trunc");
    admin
        .execute(
            "SELECT meterd.ensure_event_partitions(ARRAY[$1::timestamptz])",
            &[&old_day],
        )
        .await
        .expect("partition");
    for id in ["old-1", "old-2"] {
        let at = old_day + chrono::TimeDelta::hours(3);
        admin
            .execute(insert, &[&"old", &id, &at, &i64::MAX])
            .await
            .expect("insert an old event");
    }
    admin
        .execute("SELECT meterd.refresh_rollups(now())", &[])
        .await
        .expect("refresh");
    admin
        .execute(
            "SELECT meterd.drop_event_partitions($1)",
            &[&(old_day + chrono::TimeDelta::days(1))],
        )
        .await
        .expect("retention drops the old day");
    let saturated: i64 = admin
        .query_one(
            "SELECT input_tokens FROM meterd.usage_hourly_mat WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .expect("the saturated bucket")
        .get(0);
    assert_eq!(saturated, i64::MAX, "version 3 saturates");

    let role = format!("grafana_{}", db.name);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role};
             CREATE ROLE {role} LOGIN PASSWORD 'grafana-secret';
             GRANT CONNECT ON DATABASE {db} TO {role};
             GRANT USAGE ON SCHEMA meterd TO {role};
             GRANT SELECT ON meterd.events, meterd.usage_hourly, meterd.usage_daily TO {role};
             INSERT INTO meterd.tenant_roles (role_name, tenant) VALUES ('{role}', 'O''Brien & Co/é');
             ALTER ROLE {role} SET meterd.tenant = 'O''Brien & Co/é';",
            db = db.name
        ))
        .await
        .expect("the Grafana role");

    // A view of the user's own on a rollup view stops the upgrade, naming it, rather than
    // being dropped with it.
    admin
        .batch_execute(
            "CREATE VIEW public.my_tokens AS SELECT tenant, input_tokens FROM meterd.usage_hourly",
        )
        .await
        .expect("a user's view");
    let refused = meterd_migrate(&db.url);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("drop the views built on them first: my_tokens"),
        "{stderr}"
    );
    assert_eq!(
        pg::int(
            &admin,
            "SELECT max(version)::bigint FROM meterd.schema_migrations"
        )
        .await,
        3,
        "nothing of migration 4 stayed"
    );
    admin
        .batch_execute("DROP VIEW public.my_tokens")
        .await
        .expect("drop the user's view");

    // The new meterd migrates at startup, through version 4 to the last.
    let mut server = Server::start(&["--postgres-url", &db.url]);
    let last = meterd_store_postgres::migrations::POSTGRES
        .last()
        .map_or(0, |m| i64::from(m.version));
    assert!(last >= 4);
    assert_eq!(
        pg::int(
            &admin,
            "SELECT max(version)::bigint FROM meterd.schema_migrations"
        )
        .await,
        last
    );
    for view in ["meterd.usage_hourly", "meterd.usage_daily"] {
        let granted: bool = admin
            .query_one(
                "SELECT has_table_privilege($1, $2, 'SELECT')",
                &[&role, &view],
            )
            .await
            .expect("privilege")
            .get(0);
        assert!(granted, "{role} lost SELECT on {view}");
    }
    admin
        .execute("SELECT meterd.refresh_rollups(now())", &[])
        .await
        .expect("refresh after the upgrade");
    let exact = "18446744073709551614";
    for relation in ["meterd.usage_hourly", "meterd.usage_daily"] {
        let rows = admin
            .query(
                &format!(
                    "SELECT tenant, input_tokens::text, events FROM {relation} ORDER BY tenant COLLATE \"C\""
                ),
                &[],
            )
            .await
            .expect("rollup rows");
        let rows: Vec<(String, String, i64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            rows,
            [
                (tenant.to_owned(), exact.to_owned(), 2),
                ("acme".to_owned(), "30".to_owned(), 2),
                // Kept as it was: its raw events are gone, so it cannot be computed again.
                ("old".to_owned(), i64::MAX.to_string(), 2),
            ],
            "{relation}"
        );
    }

    // The role sees its own tenant only, exactly.
    let reader = pg::connect(&db.url.replacen(
        "meterd:meterd@",
        &format!("{role}:grafana-secret@"),
        1,
    ))
    .await;
    let seen: Vec<(String, String)> = reader
        .query(
            "SELECT tenant, input_tokens::text FROM meterd.usage_daily",
            &[],
        )
        .await
        .expect("the role reads the rollup")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(seen, [(tenant.to_owned(), exact.to_owned())]);
    drop(reader);

    // meterd's SQL reads the same from PostgreSQL, the tenant pushed down as a literal.
    let rows = server
        .rows(
            "SELECT CAST(input_tokens AS VARCHAR), CAST(sum(input_tokens) OVER () AS VARCHAR) \
             FROM usage_hourly WHERE tenant = 'O''Brien & Co/é'",
        )
        .await;
    assert_eq!(rows, vec![vec![Value::from(exact), Value::from(exact)]]);

    server.kill();
    drop_tenant_role(admin, db, &role).await;
}

/// Version 5 adds `cache_write_input_tokens`: a database of version 4 with events and a role
/// granted `meterd.events` gains the column, old rows NULL in it, the grant kept; new events
/// carry it to PostgreSQL and to SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_4_database_gains_cache_write_input_tokens() {
    let db = TestDb::create("cachewrite").await;
    let mut admin = db.client().await;
    let mut config = meterd_store_postgres::PostgresConfig::new(db.url.clone());
    config.timescaledb = meterd_store_postgres::TimescaleMode::Off;
    meterd_store_postgres::migrate::migrate_to(&mut admin, &config, 4)
        .await
        .expect("the schema of version 4");
    let reader = format!("{}_reader", db.name);
    admin
        .batch_execute(&format!(
            "SELECT meterd.ensure_event_partitions(ARRAY[now() - interval '1 minute']);
             INSERT INTO meterd.events_data (tenant, id, type, time, ingested_at, provider, model,
                 input_tokens, output_tokens)
             VALUES ('acme', 'before', 'llm.usage', now() - interval '1 minute', now(), 'anthropic',
                 'claude', 100, 10);
             DROP ROLE IF EXISTS {reader};
             CREATE ROLE {reader};
             GRANT USAGE ON SCHEMA meterd TO {reader};
             GRANT SELECT ON meterd.events TO {reader};"
        ))
        .await
        .expect("an event and a reader of version 4");

    let mut server = Server::start(&["--postgres-url", &db.url]);
    let mut written = llm_event("acme", "cache-write", 1000, 50);
    written["data"]["cache_write_input_tokens"] = json!(4000);
    assert_eq!(server.post_ndjson(&[written]).await.accepted(), 1);
    pg::wait_for(
        &admin,
        "SELECT count(*) FROM meterd.events",
        2,
        DELIVERY_TIMEOUT,
    )
    .await;
    let rows = admin
        .query(
            "SELECT id, cache_write_input_tokens FROM meterd.events ORDER BY id",
            &[],
        )
        .await
        .expect("read the column");
    let got: Vec<(String, Option<i64>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![
            ("before".to_owned(), None),
            ("cache-write".to_owned(), Some(4000))
        ]
    );
    let granted: bool = admin
        .query_one(
            "SELECT has_table_privilege($1, 'meterd.events', 'SELECT')",
            &[&reader],
        )
        .await
        .expect("privilege")
        .get(0);
    assert!(granted, "the view keeps its grants");
    assert_eq!(
        server
            .scalar("SELECT sum(cache_write_input_tokens) FROM events")
            .await,
        json!(4000)
    );
    // The table has the column last; `SELECT *` shows it where every store does.
    let shown: Vec<Value> = server.sql("SELECT * FROM events LIMIT 0").await["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    let canonical: Vec<Value> = meterd_schemas::columns::COLUMNS
        .iter()
        .map(|c| json!(c.name))
        .collect();
    assert_eq!(shown, canonical);
    server.kill();
    admin
        .batch_execute(&format!("DROP OWNED BY {reader}; DROP ROLE {reader};"))
        .await
        .expect("drop the reader");
}
