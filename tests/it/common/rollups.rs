//! Rollup oracles and edge-case events for the rollup tests.
//!
//! The oracle is written independently of the rollups crate's SQL (`date_trunc` at UTC instead
//! of `date_bin`/`time_bucket`, `FILTER` instead of `CASE`), so a mistake in the renderer cannot
//! hide in both.

use chrono::{DateTime, Duration, FixedOffset, SecondsFormat, Utc};
use serde_json::{Value, json};

/// A raw GROUP BY over `meterd.events` with the rollup's columns, in its column order.
pub fn oracle(width: &str) -> String {
    let mut cols = vec![
        format!("date_trunc('{width}', time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket"),
        "tenant".to_owned(),
        "type".to_owned(),
        "coalesce(provider, '') AS provider".to_owned(),
        "coalesce(model, '') AS model".to_owned(),
        "coalesce(agent, '') AS agent".to_owned(),
        "coalesce(route, '') AS route".to_owned(),
        "CASE WHEN type = 'api.request' THEN (status_code / 100) || 'xx' \
         ELSE coalesce(status, '') END AS status_class"
            .to_owned(),
        "count(*) AS events".to_owned(),
    ];
    for c in [
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
    ] {
        cols.push(format!("coalesce(sum({c}), 0)::bigint AS {c}"));
    }
    cols.push(
        "count(*) FILTER (WHERE type = 'api.request' AND status_code >= 500 \
         OR type = 'llm.usage' AND status = 'error' \
         OR type = 'agent.run' AND status IN ('failed', 'timeout')) AS errors"
            .to_owned(),
    );
    cols.push("count(latency_ms) AS latency_count".to_owned());
    cols.push("coalesce(sum(latency_ms), 0)::bigint AS latency_ms_sum".to_owned());
    cols.push("count(duration_ms) AS duration_count".to_owned());
    cols.push("coalesce(sum(duration_ms), 0)::bigint AS duration_ms_sum".to_owned());
    for b in meterd_rollups::LATENCY_BOUNDS_MS {
        cols.push(format!(
            "count(*) FILTER (WHERE latency_ms <= {b}) AS latency_le_{b}"
        ));
    }
    format!(
        "SELECT {} FROM meterd.events GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
        cols.join(",\n       ")
    )
}

/// Rows of `relation` and the oracle that differ (both directions, at most 10), and how many
/// rows `relation` has.
pub async fn differences(
    client: &tokio_postgres::Client,
    relation: &str,
    width: &str,
) -> (Vec<Value>, i64) {
    let sql = format!(
        "WITH r AS (SELECT * FROM {relation}), o AS ({oracle})
         SELECT * FROM (
             (SELECT 'only in the rollup' AS side, * FROM (SELECT * FROM r EXCEPT ALL SELECT * FROM o) a)
             UNION ALL
             (SELECT 'only in the raw GROUP BY', * FROM (SELECT * FROM o EXCEPT ALL SELECT * FROM r) b)
         ) d LIMIT 10",
        oracle = oracle(width)
    );
    let diffs = super::pg::rows(client, &sql).await;
    let n = super::pg::int(client, &format!("SELECT count(*) FROM {relation}")).await;
    (diffs, n)
}

/// Asserts `relation` equals the raw GROUP BY, bucket by bucket and column by column.
pub async fn assert_matches_raw(
    client: &tokio_postgres::Client,
    relation: &str,
    width: &str,
    context: &str,
) {
    let (diffs, n) = differences(client, relation, width).await;
    assert!(n > 0, "{context}: {relation} is empty");
    assert!(
        diffs.is_empty(),
        "{context}: {relation} differs from a raw GROUP BY over meterd.events:\n{}",
        diffs
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn at(t: DateTime<Utc>, offset_secs: i32) -> String {
    let offset = FixedOffset::east_opt(offset_secs).expect("offset");
    t.with_timezone(&offset)
        .to_rfc3339_opts(SecondsFormat::Millis, false)
}

/// Events exactly on and around hour and day edges, written with non-UTC offsets, of every
/// type and status class, on the day `day` (a UTC midnight).
pub fn edge_events(day: DateTime<Utc>) -> Vec<Value> {
    let ten = day + Duration::hours(10);
    let midnight = day + Duration::days(1);
    let ms = Duration::milliseconds(1);
    let times = [
        at(ten, 0),
        at(ten - ms, 0),
        at(ten, 5 * 3600 + 1800), // 15:30+05:30 is 10:00Z
        at(ten, -8 * 3600),       // 02:00-08:00 is 10:00Z
        at(ten - ms, 14 * 3600),  // 23:59:59.999+14:00 is 09:59:59.999Z
        at(midnight - ms, -3600), // 22:59:59.999-01:00 is 23:59:59.999Z
        at(midnight, 9 * 3600),   // 09:00+09:00 is the next day's 00:00Z
        at(midnight, 0),
    ];
    let llm_latency = [5, 6, 100, 101, 60000, 60001, 0, 250];
    let status_codes = [200, 299, 404, 499, 500, 503, 599, 301];
    let api_latency = [1, 10, 25, 26, 499, 500, 501, 9999];
    let agent_status = ["succeeded", "failed", "timeout", "cancelled"];
    let mut out = Vec::new();
    for (i, time) in times.iter().enumerate() {
        let (llm_latency, status_code, api_latency) =
            (llm_latency[i], status_codes[i], api_latency[i]);
        let agent_status = agent_status[i % 4];
        let llm_status = if i % 3 == 0 { "error" } else { "ok" };
        out.push(json!({
            "id": format!("edge-llm-{i}"), "tenant": "edge", "type": "llm.usage", "time": time,
            "data": {"provider": "anthropic", "model": "claude", "input_tokens": 100 + i,
                     "output_tokens": 10, "latency_ms": llm_latency, "status": llm_status}
        }));
        out.push(json!({
            "id": format!("edge-api-{i}"), "tenant": "edge", "type": "api.request", "time": time,
            "data": {"route": "/v1/chat", "method": "POST",
                     "status_code": status_code, "latency_ms": api_latency}
        }));
        out.push(json!({
            "id": format!("edge-agent-{i}"), "tenant": "edge", "type": "agent.run", "time": time,
            "data": {"agent": "triage", "run_id": format!("run-{i}"), "duration_ms": 1000 * i,
                     "status": agent_status}
        }));
    }
    out
}
