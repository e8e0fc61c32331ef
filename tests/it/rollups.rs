//! `usage_hourly` and `usage_daily` on plain PostgreSQL equal a raw GROUP BY over
//! `meterd.events`, bucket by bucket and column by column, for a generated month plus events on
//! bucket edges written with non-UTC offsets, and again after late events; a refresh after late
//! events re-materialises exactly the buckets they touched. As with TimescaleDB's continuous
//! aggregates, buckets above the watermark are computed at query time and buckets below it are
//! as of the last refresh.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use common::pg::{self, TestDb};
use common::rollups::{assert_matches_raw, edge_events};
use common::{Server, distinct_keys, generated};
use serde_json::Value;

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(180);

async fn refresh(client: &tokio_postgres::Client, now: DateTime<Utc>) -> i64 {
    client
        .query_one("SELECT meterd.refresh_rollups($1)", &[&now])
        .await
        .expect("refresh_rollups")
        .get(0)
}

fn event_time(e: &Value) -> DateTime<Utc> {
    let text = e["time"].as_str().expect("time");
    DateTime::parse_from_rfc3339(text)
        .expect("rfc3339")
        .with_timezone(&Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_a_raw_group_by_through_late_events() {
    let db = TestDb::create("rollups").await;
    // meterd's own refresher runs once at startup and then not again during the test, so the
    // test's refreshes decide what is materialised when.
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(config.path(), "[postgres]\nrefresh_interval_secs = 3600\n")
        .expect("write config");
    let config_path = config.path().to_string_lossy().into_owned();
    let mut server = Server::start(&["--postgres-url", &db.url, "--config", &config_path]);
    let client = db.client().await;
    // Bucketing must not depend on the session's time zone.
    client
        .batch_execute("SET TimeZone = 'Asia/Kolkata'")
        .await
        .expect("set time zone");

    // A fixed "now" for every refresh, so the watermark does not move while the test runs.
    let now = Utc::now();
    let mut month = generated(61, 20_000, 10, Duration::from_secs(30 * 86_400), 0.02);
    let edge_day = (now - TimeDelta::days(12))
        .duration_trunc(TimeDelta::days(1))
        .expect("trunc");
    month.extend(edge_events(edge_day));
    let keys = distinct_keys(&month);
    let mut accepted = 0;
    for chunk in month.chunks(1_000) {
        accepted += server.post_ndjson(chunk).await.accepted();
    }
    assert_eq!(accepted as usize, keys.len());
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        keys.len() as i64,
        DELIVERY_TIMEOUT,
    )
    .await;

    // meterd's refresher ran while events arrived: buckets it materialised before their last
    // events came are invalidated, and this refresh brings them up to date.
    refresh(&client, now).await;
    let materialised = pg::int(
        &client,
        "SELECT count(DISTINCT bucket) FROM meterd.usage_hourly_mat",
    )
    .await;
    assert!(
        materialised > 24 * 29,
        "the month is materialised ({materialised} hours)"
    );
    assert_matches_raw(
        &client,
        "meterd.usage_hourly",
        "hour",
        "after the first refresh",
    )
    .await;
    assert_matches_raw(
        &client,
        "meterd.usage_daily",
        "day",
        "after the first refresh",
    )
    .await;
    // The edge events landed in the buckets their UTC times say.
    let edge_ten = pg::int(
        &client,
        &format!(
            "SELECT sum(events)::bigint FROM meterd.usage_hourly WHERE tenant = 'edge' \
             AND bucket = '{}'",
            edge_day + TimeDelta::hours(10)
        ),
    )
    .await;
    assert_eq!(edge_ten, 9, "three events of each type at exactly 10:00Z");
    assert_eq!(
        refresh(&client, now).await,
        0,
        "nothing changed, nothing refreshed"
    );

    // Late events: into buckets materialised above.
    let mut late = generated(62, 400, 6, Duration::from_secs(29 * 86_400), 0.0);
    for (i, e) in late.iter_mut().enumerate() {
        e["id"] = Value::String(format!("late-{i}"));
    }
    assert_eq!(server.post_ndjson(&late).await.accepted(), 400);
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        (keys.len() + 400) as i64,
        DELIVERY_TIMEOUT,
    )
    .await;
    let hour = TimeDelta::hours(1);
    let day = TimeDelta::days(1);
    let watermark = now.duration_trunc(hour).expect("trunc");
    let hours: BTreeSet<DateTime<Utc>> = late
        .iter()
        .map(|e| event_time(e).duration_trunc(hour).expect("trunc"))
        .filter(|h| *h < watermark)
        .collect();
    let days: BTreeSet<DateTime<Utc>> = hours
        .iter()
        .map(|h| h.duration_trunc(day).expect("trunc"))
        .filter(|d| *d < watermark.duration_trunc(day).expect("trunc"))
        .collect();
    let refreshed = refresh(&client, now).await;
    assert_eq!(
        refreshed,
        (hours.len() + days.len()) as i64,
        "a refresh re-materialises exactly the hours and days the late events touched"
    );
    assert_matches_raw(&client, "meterd.usage_hourly", "hour", "after late events").await;
    assert_matches_raw(&client, "meterd.usage_daily", "day", "after late events").await;

    // Percentiles can be read from the histogram: p50 of the edge tenant's api.request latency.
    let row = client
        .query_one(
            "SELECT sum(latency_count)::bigint, sum(latency_le_25)::bigint, sum(latency_le_500)::bigint \
             FROM meterd.usage_daily WHERE tenant = 'edge' AND type = 'api.request'",
            &[],
        )
        .await
        .expect("histogram");
    let (count, le_25, le_500): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((count, le_25, le_500), (8, 3, 6));

    // Retention drops whole daily partitions of raw events; the rollups keep their buckets.
    let cutoff = now.duration_trunc(day).expect("trunc") - TimeDelta::days(20);
    let before_cutoff = |relation: &str, measure: &str| {
        format!(
            "SELECT ({measure})::bigint FROM {relation} WHERE {} < '{cutoff}'",
            if relation == "meterd.events" {
                "time"
            } else {
                "bucket"
            }
        )
    };
    let old_events = pg::int(&client, &before_cutoff("meterd.events", "count(*)")).await;
    let old_rollup = pg::int(&client, &before_cutoff("meterd.usage_daily", "sum(events)")).await;
    assert!(old_events > 0);
    assert_eq!(old_rollup, old_events);
    let dropped: i32 = client
        .query_one("SELECT meterd.drop_event_partitions($1)", &[&cutoff])
        .await
        .expect("drop partitions")
        .get(0);
    assert!(dropped >= 9, "dropped {dropped} partitions");
    assert_eq!(
        pg::int(&client, &before_cutoff("meterd.events", "count(*)")).await,
        0
    );
    assert!(pg::int(&client, "SELECT count(*) FROM meterd.events").await > 0);
    refresh(&client, now).await;
    assert_eq!(
        pg::int(&client, &before_cutoff("meterd.usage_daily", "sum(events)")).await,
        old_rollup,
        "rollups keep the buckets of dropped partitions"
    );
    server.kill();
}
