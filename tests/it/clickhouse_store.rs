//! The ClickHouse store against a real ClickHouse (Debian's 18.16): every acknowledged event
//! once in `events` (read without FINAL) and rollups equal to a raw GROUP BY, through replays,
//! restarts, `kill -9` of meterd between an insert and its checkpoint, ClickHouse killed
//! mid-ingest, a view that fails after another has written, and with PostgreSQL alongside.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::ch::{self, BOUNDS, PrivateClickHouse, normalised, raw_group_by, rollup_rows};
use common::pg::{self, TestDb};
use common::{NDJSON, Server, distinct_keys, generated, ndjson, post_until_gone, renamed};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(180);

/// A meterd config file for ClickHouse at `url`, database `db`, small batches.
pub(crate) fn config(url: &str, db: &str, extra: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(
        file.path(),
        format!(
            "[clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}\"\nbatch_rows = 700\n\
             batch_period_secs = 0.05\n{extra}"
        ),
    )
    .expect("write config");
    file
}

pub(crate) fn path(file: &tempfile::NamedTempFile) -> String {
    file.path().to_string_lossy().into_owned()
}

/// Every `(tenant, id)` in `events`, read without FINAL; an error while meterd has not created
/// the table yet.
async fn try_keys_in_clickhouse(url: &str, db: &str) -> Result<Vec<(String, String)>, String> {
    Ok(
        ch::try_rows(url, &format!("SELECT tenant, id FROM {db}.events"))
            .await?
            .into_iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap_or_default().to_owned(),
                    r[1].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
    )
}

async fn keys_in_clickhouse(url: &str, db: &str) -> Vec<(String, String)> {
    try_keys_in_clickhouse(url, db)
        .await
        .unwrap_or_else(|e| panic!("reading the keys in ClickHouse: {e}"))
}

/// Waits until every acknowledged key is in `events`, then (after a moment for anything durable
/// but unacknowledged) checks that no row is there twice and none was never sent.
async fn assert_once(
    url: &str,
    db: &str,
    acked: &HashSet<(String, String)>,
    sent: &HashSet<(String, String)>,
    context: &str,
) {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let have: HashSet<_> = try_keys_in_clickhouse(url, db)
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        if acked.is_subset(&have) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: {} acknowledged events never reached ClickHouse",
            acked.difference(&have).count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let have = keys_in_clickhouse(url, db).await;
    let unique: HashSet<_> = have.iter().cloned().collect();
    assert_eq!(
        have.len(),
        unique.len(),
        "{context}: {} rows are duplicates",
        have.len() - unique.len()
    );
    let stray: Vec<_> = unique.difference(sent).take(5).collect();
    assert!(stray.is_empty(), "{context}: rows never sent: {stray:?}");
}

/// Asserts `usage_hourly` and `usage_daily` equal a raw GROUP BY over `events`, bucket by
/// bucket and column by column, within a minute: a repair of the rollups may land after the
/// events it covers (they can already be in `events` when a later view failed). A double count
/// never converges, so waiting hides nothing.
pub(crate) async fn assert_rollups_match_raw(url: &str, db: &str, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for (relation, bucket) in [
        ("usage_hourly", "toStartOfHour"),
        ("usage_daily", "toStartOfDay"),
    ] {
        loop {
            let rollup = normalised(ch::rows(url, &rollup_rows(db, relation)).await);
            let raw = normalised(ch::rows(url, &raw_group_by(db, bucket)).await);
            assert!(!raw.is_empty(), "{context}: no events");
            if rollup == raw {
                break;
            }
            if Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            let only_rollup: Vec<_> = rollup.iter().filter(|r| !raw.contains(r)).take(3).collect();
            let only_raw: Vec<_> = raw.iter().filter(|r| !rollup.contains(r)).take(3).collect();
            panic!(
                "{context}: {relation} ({} rows) differs from a raw GROUP BY ({} rows):\n\
                 only in the rollup: {only_rollup:?}\nonly in the raw GROUP BY: {only_raw:?}",
                rollup.len(),
                raw.len()
            );
        }
    }
}

async fn readyz(server: &Server) -> (StatusCode, Value) {
    let reply = server
        .client
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .expect("readyz");
    let status = reply.status();
    (status, reply.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_reaches_clickhouse_once() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("delivery");
    let cfg = config(&url, &db, "");
    let mut server = Server::start(&["--config", &path(&cfg)]);

    let events = generated(41, 5_000, 8, Duration::from_secs(30 * 86_400), 0.05);
    let keys = distinct_keys(&events);
    let mut accepted = 0;
    for chunk in events.chunks(500) {
        accepted += server.post_ndjson(chunk).await.accepted();
    }
    assert_eq!(accepted as usize, keys.len());
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events"),
        keys.len() as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_once(&url, &db, &keys, &keys, "after the first delivery").await;
    assert_rollups_match_raw(&url, &db, "after the first delivery").await;
    let (status, body) = readyz(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["clickhouse"]["connected"], true, "{body}");

    // Replays add nothing; a graceful restart and a kill resume from the delivery record.
    for chunk in events.chunks(700) {
        assert_eq!(server.post_ndjson(chunk).await.accepted(), 0);
    }
    assert!(server.stop().success(), "meterd exits cleanly");
    server.restart();
    server.kill();
    server.restart();
    let mut more = generated(42, 1_500, 3, Duration::from_secs(86_400), 0.0);
    renamed(&mut more, "after-restart");
    for chunk in more.chunks(100) {
        assert_eq!(server.post_ndjson(chunk).await.accepted(), 100);
    }
    server.kill();
    server.restart();
    let mut all = keys.clone();
    all.extend(distinct_keys(&more));
    assert_once(&url, &db, &all, &all, "after replays, restarts and kills").await;
    assert_rollups_match_raw(&url, &db, "after replays, restarts and kills").await;

    // Every event row carries its delivery; the marker rows stay out of `events` and out of
    // the rollups' views.
    let untagged = ch::int(
        &url,
        &format!("SELECT count() FROM {db}.events WHERE _delivery = 0 OR tenant = ''"),
    )
    .await;
    assert_eq!(untagged, 0);
    let markers = ch::int(
        &url,
        &format!("SELECT count() FROM {db}.usage_hourly_state WHERE _delivery != 0"),
    )
    .await;
    assert!(markers > 0, "state tables hold delivery markers");
    server.kill();
}

/// A TCP proxy in front of ClickHouse that forwards requests and, while `hold` is set, keeps
/// the answers from meterd: the server has done the insert, meterd never hears of it.
async fn holding_proxy(target: u16, hold: Arc<AtomicBool>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let hold = Arc::clone(&hold);
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while hold.load(Ordering::Acquire) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = up => {}
                    () = down => {}
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_insert_and_checkpoint_inserts_nothing_twice() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("killinsert");
    let hold = Arc::new(AtomicBool::new(false));
    let proxy = holding_proxy(clickhouse.http_port, Arc::clone(&hold)).await;
    let via_proxy = config(&format!("http://127.0.0.1:{proxy}"), &db, "");
    let mut server = Server::start(&["--config", &path(&via_proxy)]);

    let mut first = generated(51, 800, 4, Duration::from_secs(3 * 86_400), 0.0);
    renamed(&mut first, "first");
    assert_eq!(server.post_ndjson(&first).await.accepted(), 800);
    let mut all = distinct_keys(&first);
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events"),
        800,
        DELIVERY_TIMEOUT,
    )
    .await;
    // ...and meterd has heard back about them, so the hold catches the next insert only.
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while readyz(&server).await.1["clickhouse"]["delivered_lsn"].as_u64() == Some(0) {
        assert!(
            Instant::now() < deadline,
            "meterd never confirmed the first batch"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // ClickHouse does the next inserts; meterd never hears back, and is killed waiting.
    hold.store(true, Ordering::Release);
    let mut second = generated(52, 1_200, 4, Duration::from_secs(40 * 86_400), 0.0);
    renamed(&mut second, "second");
    assert_eq!(server.post_ndjson(&second).await.accepted(), 1_200);
    all.extend(distinct_keys(&second));
    ch::wait_for(
        &url,
        &format!("SELECT count() > 800 FROM {db}.events"),
        1,
        DELIVERY_TIMEOUT,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    let record = std::fs::read_to_string(server.data_dir().join("sinks/clickhouse.delivery"))
        .expect("delivery record");
    let record_json: serde_json::Value =
        serde_json::from_str(&record).expect("a delivery record is JSON");
    let bounds: Vec<u64> = ["checkpoint", "in_flight_end"]
        .iter()
        .map(|field| record_json[field].as_u64().expect("lsn"))
        .collect();
    assert!(
        bounds[1] > bounds[0],
        "the killed node recorded a batch in flight: {record}"
    );

    // Restarted (straight to ClickHouse), meterd settles the batch it never heard back about:
    // the server has it, so nothing is sent again.
    hold.store(false, Ordering::Release);
    let direct = config(&url, &db, "");
    server.set_args(&["--config", &path(&direct)]);
    server.restart();
    let mut third = generated(53, 300, 2, Duration::from_secs(3600), 0.0);
    renamed(&mut third, "third");
    assert_eq!(server.post_ndjson(&third).await.accepted(), 300);
    all.extend(distinct_keys(&third));
    assert_once(
        &url,
        &db,
        &all,
        &all,
        "after the kill between insert and checkpoint",
    )
    .await;
    assert_rollups_match_raw(&url, &db, "after the kill between insert and checkpoint").await;
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_failing_after_another_wrote_is_repaired_without_double_counting() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("partial");
    let cfg = config(&url, &db, "");
    let mut server = Server::start(&["--config", &path(&cfg)]);
    let mut first = generated(61, 500, 3, Duration::from_secs(86_400), 0.0);
    renamed(&mut first, "first");
    assert_eq!(server.post_ndjson(&first).await.accepted(), 500);
    let mut all = distinct_keys(&first);
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events"),
        500,
        DELIVERY_TIMEOUT,
    )
    .await;

    // A view that fails on tenant `poison`. ClickHouse runs a table's views in name order, so
    // on `events_in` `events_mv` writes before `f_poison` fails and the rollups' views never
    // run: an insert that errors after part of it was written. The same view on the rollups'
    // repair entries keeps meterd from repairing until the test lets it.
    ch::exec(
        &url,
        &format!("CREATE TABLE {db}.poison_sink (x UInt8) ENGINE = Null"),
    )
    .await;
    for entry in ["events_in", "repair_usage_hourly", "repair_usage_daily"] {
        ch::exec(
            &url,
            &format!(
                "CREATE MATERIALIZED VIEW {db}.f_poison_{entry} TO {db}.poison_sink AS \
                 SELECT throwIf(tenant = 'poison') AS x FROM {db}.{entry}"
            ),
        )
        .await;
    }
    let mut poisoned = generated(62, 400, 2, Duration::from_secs(86_400), 0.0);
    renamed(&mut poisoned, "poisoned");
    for e in poisoned.iter_mut().take(1) {
        e["tenant"] = Value::String("poison".to_owned());
    }
    assert_eq!(server.post_ndjson(&poisoned).await.accepted(), 400);
    all.extend(distinct_keys(&poisoned));
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events WHERE tenant = 'poison'"),
        1,
        DELIVERY_TIMEOUT,
    )
    .await;
    // The partial state this test is about: the event is in `events`, not in the rollups, and
    // meterd reports the failure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let in_rollup = ch::int(
        &url,
        &format!("SELECT count() FROM {db}.usage_hourly WHERE tenant = 'poison'"),
    )
    .await;
    assert_eq!(in_rollup, 0, "the rollups' views did not run");
    let (status, body) = readyz(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error = body["clickhouse"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("throwIf") || error.contains("poison"),
        "{body}"
    );

    // The views go away: meterd settles the batch, sending it only where it is missing.
    for entry in ["events_in", "repair_usage_hourly", "repair_usage_daily"] {
        ch::exec(&url, &format!("DROP TABLE {db}.f_poison_{entry}")).await;
    }
    assert_once(&url, &db, &all, &all, "after the repair").await;
    assert_rollups_match_raw(&url, &db, "after the repair").await;
    let poison_events = ch::int(
        &url,
        &format!("SELECT sum(events) FROM {db}.usage_daily WHERE tenant = 'poison'"),
    )
    .await;
    assert_eq!(poison_events, 1, "counted once in the rollups");
    assert!(
        server
            .stderr()
            .contains("settled an insert whose outcome was unknown"),
        "meterd logged the repair"
    );
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clickhouse_killed_mid_ingest_loses_and_doubles_nothing() {
    let mut clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("chkill");
    let cfg = config(&url, &db, "");
    let server = Server::start(&["--config", &path(&cfg), "--max-log-bytes", "4000000"]);

    // A writer posts until told to stop, while ClickHouse is killed and restarted under it.
    let writer = tokio::spawn(post_until_gone(server.url.clone(), "w".to_owned()));
    for round in 0..4u64 {
        tokio::time::sleep(Duration::from_millis(700 + 450 * round)).await;
        clickhouse.kill();
        tokio::time::sleep(Duration::from_millis(300 * round)).await;
        clickhouse.start_server();
    }
    // Down long enough for the log to fill: ingest answers 503, readiness says why.
    clickhouse.kill();
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    let mut saw_503 = false;
    while Instant::now() < deadline {
        let (status, body) = readyz(&server).await;
        if status == StatusCode::SERVICE_UNAVAILABLE && body["ingest"]["log_full"] == true {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_503, "a full log makes ingest unready");
    clickhouse.start_server();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut stopping = server;
    stopping.kill();
    let sent = writer.await.expect("writer");
    assert!(
        sent.acked.len() > 2_000,
        "ingest kept acknowledging ({} events)",
        sent.acked.len()
    );

    // A fresh start drains the rest of the log; every acknowledged event is there once.
    stopping.restart();
    assert_once(
        &url,
        &db,
        &sent.acked,
        &sent.sent,
        "after ClickHouse was killed mid-ingest",
    )
    .await;
    assert_rollups_match_raw(&url, &db, "after ClickHouse was killed mid-ingest").await;
    stopping.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_a_raw_group_by_for_a_month_with_late_events() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("rollups");
    let cfg = config(&url, &db, "");
    let server = Server::start(&["--config", &path(&cfg)]);
    let now = chrono::Utc::now();
    let mut month = generated(71, 20_000, 10, Duration::from_secs(30 * 86_400), 0.02);
    let edge_day = chrono::DurationRound::duration_trunc(
        now - chrono::TimeDelta::days(12),
        chrono::TimeDelta::days(1),
    )
    .expect("trunc");
    month.extend(common::rollups::edge_events(edge_day));
    let mut keys = distinct_keys(&month);
    for chunk in month.chunks(1_000) {
        server.post_ndjson(chunk).await.accepted();
    }
    assert_once(&url, &db, &keys, &keys, "the month").await;
    assert_rollups_match_raw(&url, &db, "the month").await;
    let edge_ten = ch::int(
        &url,
        &format!(
            "SELECT sum(events) FROM {db}.usage_hourly WHERE tenant = 'edge' \
             AND bucket = toDateTime('{}', 'UTC')",
            (edge_day + chrono::TimeDelta::hours(10)).format("%Y-%m-%d %H:%M:%S")
        ),
    )
    .await;
    assert_eq!(edge_ten, 9, "three events of each type at exactly 10:00Z");

    // Late events, into buckets that already have rows, and again from a second batch.
    let mut late = generated(72, 2_000, 10, Duration::from_secs(25 * 86_400), 0.0);
    renamed(&mut late, "late");
    for chunk in late.chunks(250) {
        assert_eq!(server.post_ndjson(chunk).await.accepted(), 250);
    }
    keys.extend(distinct_keys(&late));
    assert_once(&url, &db, &keys, &keys, "after late events").await;
    assert_rollups_match_raw(&url, &db, "after late events").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_clickhouse_hold_the_same_events_and_rollups() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("both");
    let pgdb = TestDb::create("bothstores").await;
    let cfg = config(&url, &db, "");
    let server = Server::start(&["--config", &path(&cfg), "--postgres-url", &pgdb.url]);
    let events = generated(81, 6_000, 6, Duration::from_secs(20 * 86_400), 0.03);
    let keys = distinct_keys(&events);
    for chunk in events.chunks(600) {
        server.post_ndjson(chunk).await.accepted();
    }
    let client = pgdb.client().await;
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        keys.len() as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_once(&url, &db, &keys, &keys, "ClickHouse").await;

    // The same events, column by column.
    let columns = "tenant, id, type, time_us, subject, source, provider, model, input_tokens, \
                   output_tokens, cached_input_tokens, reasoning_tokens, route, method, \
                   status_code, request_bytes, response_bytes, agent, run_id, parent_run_id, \
                   status, latency_ms, duration_ms, steps, tool_calls";
    let pg_columns = columns.replace("time_us", "(extract(epoch FROM time) * 1000000)::bigint");
    let in_pg = normalised(
        pg::rows(
            &client,
            &format!("SELECT json_build_array({pg_columns}) AS r FROM meterd.events"),
        )
        .await
        .into_iter()
        .map(|v| v["r"].as_array().cloned().unwrap_or_default())
        .collect(),
    );
    let in_ch = normalised(ch::rows(&url, &format!("SELECT {columns} FROM {db}.events")).await);
    assert_eq!(in_pg.len(), keys.len());
    assert!(
        in_pg == in_ch,
        "PostgreSQL and ClickHouse hold different events"
    );

    // The same rollups, bucket by bucket and column by column (PostgreSQL's as of a refresh
    // now: its refresher runs every 30 s).
    client
        .execute("SELECT meterd.refresh_rollups()", &[])
        .await
        .expect("refresh the PostgreSQL rollups");
    let mut rollups_of_both = Vec::new();
    for relation in ["usage_hourly", "usage_daily"] {
        let pg_rows = normalised(
            pg::rows(
                &client,
                &format!(
                    "SELECT json_build_array(to_char(bucket AT TIME ZONE 'UTC', \
                     'YYYY-MM-DD HH24:MI:SS'), tenant, type, provider, model, agent, route, \
                     status_class, events, input_tokens, output_tokens, cached_input_tokens, \
                     reasoning_tokens, errors, latency_count, latency_ms_sum, duration_count, \
                     duration_ms_sum, {}) AS r FROM meterd.{relation}",
                    BOUNDS
                        .iter()
                        .map(|b| format!("latency_le_{b}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .await
            .into_iter()
            .map(|v| v["r"].as_array().cloned().unwrap_or_default())
            .collect(),
        );
        let ch_rows = normalised(ch::rows(&url, &rollup_rows(&db, relation)).await);
        assert!(!pg_rows.is_empty());
        assert!(
            pg_rows == ch_rows,
            "{relation}: PostgreSQL has {} rows, ClickHouse {}; first differing: {:?}",
            pg_rows.len(),
            ch_rows.len(),
            pg_rows.iter().zip(&ch_rows).find(|(a, b)| a != b)
        );
        rollups_of_both.push((relation, pg_rows));
    }
    let (status, body) = readyz(&server).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The embedded store serves the same rollups over the same events.
    let mut server = server;
    server.stop();
    server.set_args(&[
        "--config",
        &path(&cfg),
        "--postgres-url",
        &pgdb.url,
        "--sql-source",
        "embedded",
    ]);
    server.restart();
    for (relation, pg_rows) in rollups_of_both {
        let measures = meterd_rollups::measures()
            .iter()
            .map(|m| format!("CAST({} AS VARCHAR)", m.name))
            .collect::<Vec<_>>()
            .join(", ");
        let embedded = normalised(
            server
                .rows(&format!(
                    "SELECT to_char(bucket, '%Y-%m-%d %H:%M:%S'), tenant, type, provider, model, \
                     agent, route, status_class, {measures} FROM {relation}"
                ))
                .await,
        );
        assert!(
            embedded == pg_rows,
            "{relation}: the embedded store has {} rows, PostgreSQL and ClickHouse {}; \
             first differing: {:?}",
            embedded.len(),
            pg_rows.len(),
            embedded.iter().zip(&pg_rows).find(|(a, b)| a != b)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_at_startup_then_schema_and_backlog_arrive() {
    let mut clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("downatstart");
    clickhouse.kill();
    let cfg = config(&url, &db, "");
    let server = Server::start(&["--config", &path(&cfg)]);
    let mut during = generated(91, 300, 2, Duration::from_secs(3600), 0.0);
    renamed(&mut during, "during");
    let reply = server
        .try_post_events(ndjson(&during), NDJSON, false)
        .await
        .expect("meterd answers while ClickHouse is down");
    assert_eq!(reply.accepted(), 300, "the log takes events meanwhile");
    let (status, body) = readyz(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["clickhouse"]["connected"], false, "{body}");
    clickhouse.start_server();
    let keys = distinct_keys(&during);
    assert_once(&url, &db, &keys, &keys, "after ClickHouse came up").await;
    assert_rollups_match_raw(&url, &db, "after ClickHouse came up").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_expired_months_and_keeps_the_rollups() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("retention");
    let cfg = config(&url, &db, "");
    let mut server = Server::start(&["--config", &path(&cfg)]);
    let mut recent = generated(95, 400, 2, Duration::from_secs(5 * 86_400), 0.0);
    renamed(&mut recent, "recent");
    assert_eq!(server.post_ndjson(&recent).await.accepted(), 400);
    let keys = distinct_keys(&recent);
    assert_once(&url, &db, &keys, &keys, "before retention").await;
    // A month long past, written around meterd (events older than meterd accepts): what
    // retention must drop from `events`, while its rollup rows stay.
    ch::exec(
        &url,
        &format!(
            "INSERT INTO {db}.events_in (tenant, id, type, time_us, ingested_at_us, dimensions, \
             _delivery, _marker) VALUES ('old', 'o1', 'llm.usage', 1577880000000000, 0, '{{}}', \
             1, 0), ('', '', '', 1577880000000000, 0, '', 1, 1)"
        ),
    )
    .await;
    assert_eq!(
        ch::int(
            &url,
            &format!("SELECT count() FROM {db}.events WHERE tenant = 'old'")
        )
        .await,
        1
    );
    server.kill();
    let with_retention = config(&url, &db, "retention_days = 60\n");
    std::fs::write(
        with_retention.path(),
        format!(
            "max_event_age_days = 30\n{}",
            std::fs::read_to_string(with_retention.path()).expect("read config")
        ),
    )
    .expect("write config");
    server.set_args(&["--config", &path(&with_retention)]);
    server.restart();
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events WHERE tenant = 'old'"),
        0,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_eq!(
        ch::int(&url, &format!("SELECT count() FROM {db}.events")).await,
        400,
        "recent months are kept"
    );
    assert_eq!(
        ch::int(
            &url,
            &format!("SELECT sum(events) FROM {db}.usage_daily WHERE tenant = 'old'")
        )
        .await,
        1,
        "the rollups keep the dropped month"
    );
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_is_served_from_clickhouse_with_filters_pushed_down() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("sqlch");
    let cfg = config(&url, &db, "");
    let server = Server::start(&["--config", &path(&cfg)]);
    let events = generated(101, 600, 4, Duration::from_secs(3 * 86_400), 0.0);
    let accepted = server.post_ndjson(&events).await.accepted();
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events"),
        accepted as i64,
        DELIVERY_TIMEOUT,
    )
    .await;

    // A row only ClickHouse has: the answer can only come from there.
    ch::exec(
        &url,
        &format!(
            "INSERT INTO {db}.events_in (tenant, id, type, time_us, ingested_at_us, dimensions, \
             _delivery, _marker) VALUES ('only-in-clickhouse', 'x1', 'llm.usage', \
             1763800000123456, 1763800000000000, '{{}}', 7, 0)"
        ),
    )
    .await;
    assert_eq!(server.count("tenant = 'only-in-clickhouse'").await, 1);
    assert_eq!(server.count("true").await, accepted + 1);
    // `time` is exact to the microsecond (from `time_us`), and filters on it are exact too.
    let time = server
        .scalar("SELECT CAST(time AS VARCHAR) FROM events WHERE tenant = 'only-in-clickhouse'")
        .await;
    assert_eq!(time.as_str(), Some("2025-11-22T08:26:40.123456Z"), "{time}");
    assert_eq!(
        server
            .count("tenant = 'only-in-clickhouse' AND time >= '2025-11-22T08:26:40.123456Z'")
            .await,
        1
    );
    assert_eq!(
        server
            .count("tenant = 'only-in-clickhouse' AND time > '2025-11-22T08:26:40.123456Z'")
            .await,
        0
    );
    // Quotes, backslashes and question marks in literals stay literals.
    assert_eq!(server.count("tenant = 'a''b'' OR ''1''=''1'").await, 0);
    assert_eq!(
        server
            .count("tenant = 'x\\' OR tenant = 'only-in-clickhouse'")
            .await,
        1,
        "a backslash ending a literal"
    );
    assert_eq!(server.count("tenant = '?' OR tenant = '??fields'").await, 0);
    // Bounds beyond ClickHouse's DateTime range (1970 to 2106) do not wrap around.
    for bounds in [
        "time >= '1900-01-01T00:00:00Z'",
        "time < '2200-01-01T00:00:00Z'",
        "time BETWEEN '1900-01-01T00:00:00Z' AND '2200-01-01T00:00:00Z'",
    ] {
        assert_eq!(
            server
                .count(&format!("tenant = 'only-in-clickhouse' AND {bounds}"))
                .await,
            1,
            "{bounds}"
        );
    }

    // The rollups are relations of the SQL API too.
    for relation in ["usage_hourly", "usage_daily"] {
        let total = server
            .scalar(&format!("SELECT sum(events) FROM {relation}"))
            .await;
        assert_eq!(total.as_u64(), Some(accepted + 1), "{relation}");
    }

    // Time and tenant filters run in ClickHouse.
    let plan = server
        .sql(
            "EXPLAIN SELECT count(*) FROM events \
             WHERE tenant = 'tenant-01' AND time >= '2026-01-01T00:00:00Z'",
        )
        .await
        .to_string();
    assert!(plan.contains("ClickHouseScanExec"), "{plan}");
    assert!(
        plan.contains("`tenant` = 'tenant-01'"),
        "tenant filter not pushed down: {plan}"
    );
    assert!(
        plan.contains("`time_us` >= 1767225600000000"),
        "time filter not pushed down: {plan}"
    );
}

/// A ClickHouse string literal.
fn ch_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Sums past 2^63 are exact in PostgreSQL's and ClickHouse's rollups and in meterd's SQL over
/// each store (embedded, PostgreSQL, ClickHouse), and a tenant with quotes, backslashes,
/// `LIKE` wildcards and non-ASCII text is found by the same SQL everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_sums_exactly_and_finds_any_tenant() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("exact");
    let pgdb = TestDb::create("exactstores").await;
    let cfg = config(&url, &db, "");
    let args = ["--config", &path(&cfg), "--postgres-url", &pgdb.url];
    let mut server = Server::start(&args);
    let tenant = "O'Brien \"Corp\" \\ café/日本 %_";
    let at = common::rfc3339(common::ago(Duration::from_secs(3 * 3600)));
    let mut events: Vec<Value> = (0..3)
        .map(|i| {
            let mut e = common::llm_event(tenant, &format!("max-{i}"), i64::MAX, 1);
            e["time"] = Value::from(at.clone());
            e
        })
        .collect();
    let mut others = generated(83, 300, 3, Duration::from_secs(2 * 86_400), 0.0);
    renamed(&mut others, "other");
    events.extend(others);
    let keys = distinct_keys(&events);
    assert_eq!(
        server.post_ndjson(&events).await.accepted() as usize,
        keys.len()
    );
    let client = pgdb.client().await;
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        keys.len() as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_once(&url, &db, &keys, &keys, "ClickHouse").await;
    client
        .execute("SELECT meterd.refresh_rollups()", &[])
        .await
        .expect("refresh the PostgreSQL rollups");

    // 3 * (2^63 - 1): BIGINT sums wrap to -3, saturating ones stop at 2^63 - 1.
    let exact = "27670116110564327421";
    for relation in ["usage_hourly", "usage_daily"] {
        let in_pg: String = client
            .query_one(
                &format!("SELECT sum(input_tokens)::text FROM meterd.{relation} WHERE tenant = $1"),
                &[&tenant],
            )
            .await
            .expect("PostgreSQL rollup")
            .get(0);
        assert_eq!(in_pg, exact, "PostgreSQL {relation}");
        let in_ch = ch::rows(
            &url,
            &format!(
                "SELECT toString(sum(input_tokens)) FROM {db}.{relation} WHERE tenant = {}",
                ch_str(tenant)
            ),
        )
        .await;
        assert_eq!(
            in_ch,
            vec![vec![Value::from(exact)]],
            "ClickHouse {relation}"
        );
    }

    let quoted = common::sql_str(tenant);
    let queries = [
        format!(
            "SELECT CAST(sum(input_tokens) AS VARCHAR), count(*) FROM events WHERE tenant = {quoted}"
        ),
        format!(
            "SELECT CAST(sum(input_tokens) AS VARCHAR), sum(events) FROM usage_hourly \
             WHERE tenant = {quoted}"
        ),
        format!(
            "SELECT CAST(sum(input_tokens) AS VARCHAR), sum(events) FROM usage_daily \
             WHERE tenant IN ({quoted}, 'nobody')"
        ),
    ];
    let mut answers = Vec::new();
    for source in ["clickhouse", "postgres", "embedded"] {
        server.stop();
        let mut with_source = args.to_vec();
        with_source.extend(["--sql-source", source]);
        server.set_args(&with_source);
        server.restart();
        let mut rows = Vec::new();
        for q in &queries {
            rows.push(server.rows(q).await);
        }
        assert_eq!(
            rows[0],
            vec![vec![Value::from(exact), Value::from(3)]],
            "{source}: events"
        );
        answers.push((source, rows));
    }
    for (source, rows) in &answers[1..] {
        assert_eq!(
            rows, &answers[0].1,
            "{source} and ClickHouse answer differently"
        );
    }
}

/// A column of `events` the differential queries filter on, with values seen in the data.
struct DiffColumn {
    name: String,
    kind: DiffKind,
    /// SQL literals of values the column holds, and one it does not.
    values: Vec<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum DiffKind {
    Text,
    Int,
    Time,
}

/// A random predicate on `column`: every comparison operator, IN and NOT IN lists of one to
/// six items (ClickHouse turns short lists into comparisons and long ones into sets), BETWEEN,
/// NULL tests, negations.
fn predicate(rng: &mut rand::rngs::StdRng, column: &DiffColumn) -> String {
    use rand::Rng;
    use rand::seq::IndexedRandom;
    let c = &column.name;
    let value =
        |rng: &mut rand::rngs::StdRng| column.values.choose(rng).cloned().unwrap_or_default();
    let list = |rng: &mut rand::rngs::StdRng| {
        let n = rng.random_range(1..=6);
        (0..n).map(|_| value(rng)).collect::<Vec<_>>().join(", ")
    };
    match rng.random_range(0..14) {
        0 => format!("{c} = {}", value(rng)),
        1 => format!("{c} <> {}", value(rng)),
        2 => format!("{c} < {}", value(rng)),
        3 => format!("{c} <= {}", value(rng)),
        4 => format!("{c} > {}", value(rng)),
        5 => format!("{c} >= {}", value(rng)),
        6 => format!("{c} IN ({})", list(rng)),
        7 => format!("{c} NOT IN ({})", list(rng)),
        8 => format!("NOT ({c} IN ({}))", list(rng)),
        9 => {
            let (a, b) = (value(rng), value(rng));
            format!("{c} BETWEEN {a} AND {b}")
        }
        10 => format!("{c} IS NULL"),
        11 => format!("{c} IS NOT NULL"),
        12 => format!("NOT ({c} = {})", value(rng)),
        _ => format!("({c} = {} OR {c} IS NULL)", value(rng)),
    }
}

/// The same events in the embedded store, PostgreSQL and ClickHouse, and a few hundred
/// generated queries (filters of every operator on every text, integer and time column, NULLs,
/// time bounds with and without the column selected, projections, limits, aggregates) whose
/// answers must be identical from all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_sql_gives_the_same_answer_on_every_store() {
    use rand::seq::IndexedRandom;
    use rand::{Rng, SeedableRng};

    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("differential");
    let pgdb = TestDb::create("differential").await;
    let cfg = config(&url, &db, "");
    let writer = Server::start(&[
        "--config",
        &path(&cfg),
        "--postgres-url",
        &pgdb.url,
        "--sql-source",
        "embedded",
    ]);
    let mut events = generated(4242, 3_000, 5, Duration::from_secs(10 * 86_400), 0.0);
    renamed(&mut events, "diff");
    let accepted = writer.post_ndjson(&events).await.accepted();
    assert_eq!(accepted, 3_000);
    let client = pgdb.client().await;
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        accepted as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events"),
        accepted as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    let from_postgres = Server::start(&["--postgres-url", &pgdb.url, "--sql-source", "postgres"]);
    let ch_only = config(&url, &db, "");
    let from_clickhouse =
        Server::start(&["--config", &path(&ch_only), "--sql-source", "clickhouse"]);
    let stores = [
        ("embedded", &writer),
        ("PostgreSQL", &from_postgres),
        ("ClickHouse", &from_clickhouse),
    ];

    // The columns to filter on, and literals of values each holds (plus one it does not).
    let mut columns = Vec::new();
    for row in writer
        .rows(
            "SELECT column_name, data_type FROM information_schema.columns \
             WHERE table_name = 'events' ORDER BY ordinal_position",
        )
        .await
    {
        let (Some(name), Some(ty)) = (row[0].as_str(), row[1].as_str()) else {
            panic!("unexpected information_schema row {row:?}");
        };
        let kind = match ty {
            "Utf8" | "Utf8View" | "LargeUtf8" => DiffKind::Text,
            t if t.starts_with("Int") || t.starts_with("UInt") => DiffKind::Int,
            t if t.starts_with("Timestamp") => DiffKind::Time,
            _ => continue,
        };
        let seen = writer
            .rows(&format!(
                "SELECT DISTINCT CAST({name} AS VARCHAR) FROM events \
                 WHERE {name} IS NOT NULL ORDER BY 1 LIMIT 6"
            ))
            .await;
        let mut values: Vec<String> = seen
            .iter()
            .filter_map(|r| r[0].as_str())
            .map(|v| match kind {
                DiffKind::Text => format!("'{}'", v.replace('\'', "''")),
                DiffKind::Int => v.to_owned(),
                DiffKind::Time => format!("TIMESTAMP '{v}'"),
            })
            .collect();
        values.push(match kind {
            DiffKind::Text => "'no-such-value'".to_owned(),
            DiffKind::Int => "-1".to_owned(),
            DiffKind::Time => "TIMESTAMP '2001-02-03T04:05:06.789012Z'".to_owned(),
        });
        columns.push(DiffColumn {
            name: name.to_owned(),
            kind,
            values,
        });
    }
    assert!(
        columns.iter().any(|c| c.kind == DiffKind::Time)
            && columns.iter().filter(|c| c.kind == DiffKind::Int).count() >= 5
            && columns.iter().filter(|c| c.kind == DiffKind::Text).count() >= 5,
        "too few columns to filter on"
    );
    let ints: Vec<&DiffColumn> = columns.iter().filter(|c| c.kind == DiffKind::Int).collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut queries = vec![
        // Bounds on a time column that is also selected (ClickHouse once read them as
        // bounds on the microseconds it selects under the column's name).
        "SELECT id, time FROM events WHERE time < now()".to_owned(),
        // Fixed bounds: `now()` would be a different moment on each store.
        format!(
            "SELECT id, time FROM events WHERE time BETWEEN TIMESTAMP '{}' AND TIMESTAMP '{}'",
            (chrono::Utc::now() - chrono::Duration::days(3)).to_rfc3339(),
            chrono::Utc::now().to_rfc3339()
        ),
        "SELECT id, ingested_at FROM events WHERE ingested_at < now()".to_owned(),
        "SELECT count(*) FROM events WHERE source NOT IN ('a', 'b', 'c', 'd')".to_owned(),
        "SELECT count(*) FROM events WHERE steps NOT IN (7, 8, 9, 10)".to_owned(),
        "SELECT count(*) FROM events WHERE NOT (model IN ('a', 'b', 'c', 'd'))".to_owned(),
    ];
    while queries.len() < 300 {
        let column = columns.choose(&mut rng).expect("columns");
        let mut filter = predicate(&mut rng, column);
        if rng.random_bool(0.3) {
            let other = columns.choose(&mut rng).expect("columns");
            let joiner = if rng.random_bool(0.5) { "AND" } else { "OR" };
            filter = format!("({filter}) {joiner} ({})", predicate(&mut rng, other));
        }
        let measure = ints.choose(&mut rng).expect("integer columns");
        let name = &column.name;
        queries.push(match rng.random_range(0..5) {
            0 => format!("SELECT count(*) FROM events WHERE {filter}"),
            1 => format!("SELECT tenant, id, {name} AS v FROM events WHERE {filter}"),
            2 => format!(
                "SELECT {name}, count(*), sum({m}), min({m}), max({m}) FROM events \
                 WHERE {filter} GROUP BY {name}",
                m = measure.name
            ),
            3 => format!(
                "SELECT tenant, id FROM events WHERE {filter} ORDER BY tenant, id LIMIT {}",
                rng.random_range(1..50)
            ),
            _ => format!(
                "SELECT count(*), sum({m}), count({m}) FROM events WHERE {filter}",
                m = measure.name
            ),
        });
    }

    let mut differing = Vec::new();
    let mut informative = 0;
    for sql in &queries {
        let mut answers = Vec::new();
        for (store, server) in stores {
            let reply = server.sql_reply(sql).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{store}: {sql}: {}",
                reply.text
            );
            let rows: Vec<Vec<Value>> =
                serde_json::from_value(reply.json["rows"].clone()).expect("rows");
            answers.push((store, normalised(rows)));
        }
        let (_, first) = &answers[0];
        if !first.is_empty()
            && first
                .iter()
                .any(|row| row.iter().any(|v| v != "0" && v != "null"))
        {
            informative += 1;
        }
        for (store, answer) in &answers[1..] {
            if answer != first {
                differing.push(format!(
                    "{store}: {sql}\n  embedded: {} rows {:?}\n  {store}: {} rows {:?}",
                    first.len(),
                    first.iter().take(3).collect::<Vec<_>>(),
                    answer.len(),
                    answer.iter().take(3).collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(
        differing.is_empty(),
        "{} of {} answers differ:\n{}",
        differing.len(),
        queries.len() * 2,
        differing.join("\n")
    );
    // Statements too large or too deep for ClickHouse are the client's: a 400 with a short
    // reason, never a 500 echoing the statement. A backslash is one byte in DataFusion's SQL and
    // two in ClickHouse's, so this list passes meterd's 256 KiB and not ClickHouse's.
    let backslashes = (0..1_000)
        .map(|i| format!("'{}{i:04}'", "\\".repeat(250)))
        .collect::<Vec<_>>()
        .join(", ");
    let long_in = format!("SELECT count(*) FROM events WHERE tenant IN ({backslashes})");
    assert!(long_in.len() < 262_144, "{} bytes", long_in.len());
    let deep_or = format!(
        "SELECT count(*) FROM events WHERE {}",
        (0..990)
            .map(|i| format!("tenant = 't{i}'"))
            .collect::<Vec<_>>()
            .join(" OR ")
    );
    for (what, sql) in [("a long IN list", long_in), ("a deep OR", deep_or)] {
        let reply = from_clickhouse.sql_reply(&sql).await;
        match reply.status {
            // The OR of equalities becomes an IN list ClickHouse takes; the long list must not.
            StatusCode::OK if what == "a deep OR" => {
                assert_eq!(reply.json["rows"], json!([[0]]), "{what}");
            }
            StatusCode::BAD_REQUEST => {
                assert!(
                    reply.text.len() < 1_000,
                    "{what}: {} bytes",
                    reply.text.len()
                );
                assert!(
                    reply.error().contains("ClickHouse"),
                    "{what}: {}",
                    reply.text
                );
            }
            other => panic!(
                "{what}: {other}: {}",
                reply.text.chars().take(300).collect::<String>()
            ),
        }
    }
    let log = from_clickhouse.stderr();
    assert!(
        log.lines().all(|line| line.len() < 8_192),
        "a log line carries a whole statement"
    );

    // Most queries found something: an answer of nothing everywhere tells no store apart.
    assert!(
        informative * 2 > queries.len(),
        "only {informative} of {} queries found rows",
        queries.len()
    );
}
