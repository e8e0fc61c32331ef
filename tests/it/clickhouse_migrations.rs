//! ClickHouse schema migrations against a real ClickHouse (Debian's 18.16): a database set up
//! before versions were recorded reaches the current version with its rows, a node of the
//! older build cannot write half a delivery to it, and nodes starting at once migrate once.

use crate::clickhouse_store::{assert_rollups_match_raw, config, path};
use crate::common;

use std::time::Duration;

use common::ch::{self, PrivateClickHouse};
use common::{Server, llm_event};
use meterd_store_clickhouse::rollups::Dialect;
use meterd_store_clickhouse::{ClickHouseConfig, client, schema};
use serde_json::{Value, json};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(180);

/// Creates `db` as meterd did before versions were recorded: the version 1 tables, no
/// `schema_migrations`.
async fn first_version_database(url: &str, db: &str) {
    for sql in schema::statements_at(db, &Dialect::LEGACY, None, 1) {
        if !sql.contains("schema_migrations") {
            ch::exec(url, &sql).await;
        }
    }
}

/// An insert into the first version's `events_in`, as a meterd of that version sends it.
fn first_version_insert(db: &str, id: &str, delivery: u64) -> String {
    let now_us = chrono::Utc::now().timestamp_micros() - 120_000_000;
    format!(
        "INSERT INTO {db}.events_in (tenant, id, type, time_us, ingested_at_us, dimensions, \
         provider, model, input_tokens, output_tokens, _delivery, _marker) VALUES \
         ('acme', '{id}', 'llm.usage', {now_us}, {now_us}, '{{}}', 'anthropic', 'claude', 100, 10, \
         {delivery}, 0), ('', '', '', {now_us}, 0, '', NULL, NULL, NULL, NULL, {delivery}, 1)"
    )
}

async fn versions(url: &str, db: &str) -> Vec<Vec<Value>> {
    ch::rows(
        url,
        &format!(
            "SELECT version, count() FROM {db}.schema_migrations GROUP BY version ORDER BY version"
        ),
    )
    .await
}

fn once_each() -> Vec<Vec<Value>> {
    schema::MIGRATIONS
        .iter()
        .map(|m| vec![json!(m.version), json!(1)])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_version_database_is_migrated_with_its_rows() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("migrate");
    first_version_database(&url, &db).await;
    ch::exec(&url, &first_version_insert(&db, "before", 11)).await;

    let cfg = config(&url, &db, "");
    let mut server = Server::start(&["--config", &path(&cfg)]);
    let mut written = llm_event("acme", "cache-write", 1000, 50);
    written["data"]["cache_write_input_tokens"] = json!(4000);
    let plain = llm_event("acme", "no-cache-write", 10, 5);
    assert_eq!(server.post_ndjson(&[written, plain]).await.accepted(), 2);
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events"),
        3,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_eq!(versions(&url, &db).await, once_each());
    let stored = ch::rows(
        &url,
        &format!("SELECT id, cache_write_input_tokens FROM {db}.events ORDER BY id"),
    )
    .await;
    assert_eq!(
        stored,
        vec![
            vec![json!("before"), Value::Null],
            vec![json!("cache-write"), json!(4000)],
            vec![json!("no-cache-write"), Value::Null],
        ]
    );
    // The column sits where a fresh database has it.
    let columns: Vec<Value> = ch::rows(&url, &format!("DESCRIBE TABLE {db}.events"))
        .await
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let at = columns
        .iter()
        .position(|c| c == "cached_input_tokens")
        .expect("cached_input_tokens");
    assert_eq!(
        columns[at + 1],
        json!("cache_write_input_tokens"),
        "{columns:?}"
    );

    assert_rollups_match_raw(&url, &db, "after the migration").await;

    // A node still running the first version inserts into the old table. ClickHouse 18.16
    // refuses a view whose table gained a column it does not select, so its delivery fails,
    // whole for `events`, until it runs the new build (its log keeps the events; settling then
    // completes the delivery). Current releases fill the missing column with NULL instead.
    let refused = ch::try_exec(&url, &first_version_insert(&db, "older-node", 12)).await;
    let message = refused.expect_err("18.16 refuses the older view");
    assert!(message.contains("Expected column"), "{message}");
    assert_eq!(
        ch::int(
            &url,
            &format!("SELECT count() FROM {db}.events WHERE id = 'older-node'")
        )
        .await,
        0
    );

    // SQL over ClickHouse serves the new column.
    let served = server
        .scalar("SELECT sum(cache_write_input_tokens) FROM events")
        .await;
    assert_eq!(served, json!(4000), "{served}");

    // A restart finds the current version and migrates nothing again.
    server.kill();
    server.restart();
    let mut later = llm_event("acme", "after-restart", 1, 1);
    later["data"]["cache_write_input_tokens"] = json!(2);
    assert_eq!(server.post_ndjson(&[later]).await.accepted(), 1);
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events"),
        4,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_eq!(versions(&url, &db).await, once_each());
    assert_eq!(
        ch::int(
            &url,
            &format!("SELECT sum(cache_write_input_tokens) FROM {db}.events")
        )
        .await,
        4002
    );
    server.kill();
}

/// Runs `ensure` from `nodes` tasks at once against database `db`; each must find
/// `insert_table` to write.
async fn ensure_at_once(url: &str, db: &str, nodes: usize, insert_table: &str) {
    let mut config = ClickHouseConfig::new(url.to_owned());
    config.database = db.to_owned();
    let tasks: Vec<_> = (0..nodes)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move {
                let client = client(&config);
                schema::ensure(&client, &config).await
            })
        })
        .collect();
    for task in tasks {
        let schema = task
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("ensure failed: {e:?}"));
        assert_eq!(schema.entries.name("events_in"), insert_table);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_at_once_migrate_once() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();

    let fresh = ch::database("at_once_fresh");
    ensure_at_once(&url, &fresh, 4, "events_in").await;
    assert_eq!(versions(&url, &fresh).await, once_each());

    // Without the guard, two nodes would both add the column, and one would fail.
    let old = ch::database("at_once_old");
    first_version_database(&url, &old).await;
    ensure_at_once(&url, &old, 4, "events_in_v2").await;
    assert_eq!(versions(&url, &old).await, once_each());
    let added = ch::int(
        &url,
        &format!(
            "SELECT count() FROM system.columns WHERE database = '{old}' AND table = 'events' \
             AND name = 'cache_write_input_tokens'"
        ),
    )
    .await;
    assert_eq!(added, 1);
    // The guard is released: nothing of it is left running.
    let guards = ch::int(
        &url,
        "SELECT count() FROM system.processes WHERE startsWith(query_id, 'meterd-schema-')",
    )
    .await;
    assert_eq!(guards, 0);
}
