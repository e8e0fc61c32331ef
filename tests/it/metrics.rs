//! `GET /metrics` on a real meterd: the ingest and SQL families count what happened, a replay
//! leaves them unchanged, and `promtool check metrics` (Prometheus's own linter) finds nothing
//! in the scrape.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::Server;
use reqwest::StatusCode;

fn promtool() -> String {
    std::env::var("METERD_TEST_PROMTOOL").unwrap_or_else(|_| "promtool".to_owned())
}

pub(crate) async fn scrape(server: &Server) -> String {
    let response = reqwest::get(format!("{}/metrics", server.url))
        .await
        .expect("scrape");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.expect("body")
}

/// The value of the sample `series` (name and labels as exposed), or a failure naming it.
pub(crate) fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{scrape}"))
}

pub(crate) fn promtool_check(scrape: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e}. This test needs promtool (Debian's prometheus package; \
                 scripts/test.sh installs it, or set METERD_TEST_PROMTOOL)",
                promtool()
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("write scrape");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check metrics: {said}");
    assert!(said.trim().is_empty(), "promtool check metrics: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_pass_promtool() {
    let mut server = Server::start(&[]);
    let first = vec![
        common::llm_event("acme", "m-1", 100, 10),
        common::llm_event("acme", "m-2", 200, 20),
        common::llm_event("initech", "m-3", 300, 30),
    ];
    assert_eq!(server.post_ndjson(&first).await.accepted(), 3);
    // The same again: duplicates; one id again with other content: a conflict.
    assert_eq!(server.post_ndjson(&first).await.accepted(), 0);
    let conflict = vec![common::llm_event("acme", "m-1", 999, 10)];
    let reply = server.post_ndjson(&conflict).await;
    assert_eq!(reply.json["conflicts"], serde_json::json!(["m-1"]));
    server.sql("SELECT count(*) FROM events").await;
    assert_eq!(
        server.sql_reply("SELEKT nothing").await.status,
        StatusCode::BAD_REQUEST
    );

    let text = scrape(&server).await;
    assert_eq!(
        sample(&text, r#"meterd_ingest_events_total{outcome="accepted"}"#),
        3.0
    );
    assert_eq!(
        sample(&text, r#"meterd_ingest_events_total{outcome="duplicate"}"#),
        3.0
    );
    assert_eq!(
        sample(&text, r#"meterd_ingest_events_total{outcome="conflict"}"#),
        1.0
    );
    assert_eq!(
        sample(&text, r#"meterd_ingest_batches_total{result="ok"}"#),
        3.0
    );
    assert_eq!(
        sample(&text, r#"meterd_ingest_batches_total{result="log_full"}"#),
        0.0
    );
    assert_eq!(
        sample(&text, "meterd_ingest_ack_duration_seconds_count"),
        3.0
    );
    assert!(sample(&text, "meterd_ingest_log_bytes") > 0.0);
    assert!(
        sample(&text, "meterd_ingest_log_limit_bytes") > sample(&text, "meterd_ingest_log_bytes")
    );
    assert!(sample(&text, r#"meterd_sql_queries_total{result="ok"}"#) >= 1.0);
    assert!(sample(&text, r#"meterd_sql_queries_total{result="bad_request"}"#) >= 1.0);
    assert_eq!(
        sample(
            &text,
            r#"meterd_http_requests_total{code="200",method="POST",route="/v1/events"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            r#"meterd_http_requests_total{code="400",method="POST",route="/v1/sql"}"#
        ),
        1.0
    );
    promtool_check(&text);

    // After a restart the counters start again; a replay of what is stored moves only the
    // duplicate count.
    server.stop();
    server.restart();
    assert_eq!(server.post_ndjson(&first).await.accepted(), 0);
    let text = scrape(&server).await;
    assert_eq!(
        sample(&text, r#"meterd_ingest_events_total{outcome="accepted"}"#),
        0.0
    );
    assert_eq!(
        sample(&text, r#"meterd_ingest_events_total{outcome="duplicate"}"#),
        3.0
    );
    promtool_check(&text);
}

/// The sum of every series of a family (optionally only samples whose labels contain `with`).
fn family_sum(scrape: &str, family: &str, with: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(with))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The usage families count a generated stream exactly (their folded series add up to what SQL
/// counts), a replay moves none of them, and 300 tenants stay within the default limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counters_equal_the_stored_totals() {
    let server = Server::start(&[]);
    let events = common::generated(21, 3_000, 300, std::time::Duration::from_secs(86_400), 0.05);
    let accepted = server.post_ndjson(&events).await.accepted();
    let before = scrape(&server).await;
    let again = server.post_ndjson(&events).await.accepted();
    assert_eq!(again, 0);
    let text = scrape(&server).await;
    // The replay moved no usage series.
    let usage = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("meterd_usage_") || l.starts_with("meterd_agent_runs_"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(usage(&text), usage(&before));
    let stored = server
        .sql(
            "SELECT count(*) AS n, sum(input_tokens) AS i, sum(cached_input_tokens) AS c, \
             count(*) FILTER (WHERE type = 'agent.run') AS r, sum(output_tokens) AS o, \
             sum(cache_write_input_tokens) AS w FROM events",
        )
        .await;
    let row = &stored["rows"][0];
    let number = |v: &serde_json::Value| -> f64 {
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0.0)
    };
    assert_eq!(number(&row[0]), accepted as f64);
    assert_eq!(
        family_sum(&text, "meterd_usage_events_total", ""),
        accepted as f64
    );
    assert_eq!(
        family_sum(&text, "meterd_usage_tokens_total", r#"direction="input""#),
        number(&row[1])
    );
    assert_eq!(
        family_sum(
            &text,
            "meterd_usage_tokens_total",
            r#"direction="cached_input""#
        ),
        number(&row[2])
    );
    assert_eq!(
        family_sum(&text, "meterd_agent_runs_total", ""),
        number(&row[3])
    );
    assert_eq!(
        family_sum(&text, "meterd_usage_tokens_total", r#"direction="output""#),
        number(&row[4])
    );
    assert_eq!(
        family_sum(
            &text,
            "meterd_usage_tokens_total",
            r#"direction="cache_write_input""#
        ),
        number(&row[5])
    );
    let tenants: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("meterd_usage_events_total{"))
        .filter_map(|l| l.split("tenant=\"").nth(1)?.split('"').next())
        .collect();
    assert!(tenants.contains("other"), "{tenants:?}");
    assert!(tenants.len() <= 21, "{tenants:?}");
    promtool_check(&text);
}

/// An external store's delivery in the metrics: connected, and no lag once everything is
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_delivery_is_in_the_metrics() {
    let db = common::pg::TestDb::create("metrics").await;
    let server = Server::start(&["--postgres-url", &db.url]);
    let events = common::generated(22, 500, 5, std::time::Duration::from_secs(3_600), 0.0);
    let accepted = server.post_ndjson(&events).await.accepted();
    common::pg::wait_for(
        &db.client().await,
        "SELECT count(*) FROM meterd.events",
        accepted as i64,
        std::time::Duration::from_secs(120),
    )
    .await;
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(&server).await;
        if text.contains(r#"meterd_store_delivery_lag_bytes{store="postgres"} 0"#)
            && text.contains(r#"meterd_store_rollup_refresh_lag_seconds{store="postgres"}"#)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        sample(
            &text,
            r#"meterd_store_delivery_lag_bytes{store="postgres"}"#
        ),
        0.0
    );
    assert_eq!(
        sample(&text, r#"meterd_store_connected{store="postgres"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"meterd_store_delivery_errors_total{store="postgres"}"#
        ),
        0.0
    );
    assert_eq!(
        sample(
            &text,
            r#"meterd_store_delivery_lag_seconds{store="postgres"}"#
        ),
        0.0
    );
    assert_eq!(
        sample(
            &text,
            r#"meterd_store_delivery_lag_events{store="postgres"}"#
        ),
        0.0
    );
    // Plain PostgreSQL: meterd's refresher ran right after the migrations (every 30 s after).
    let refreshed = sample(
        &text,
        r#"meterd_store_rollup_refresh_lag_seconds{store="postgres"}"#,
    );
    assert!((0.0..60.0).contains(&refreshed), "{refreshed}");
    promtool_check(&text);

    // A store that cannot be reached: what it lacks grows older, and is counted in events.
    let mut down = Server::start(&[
        "--postgres-url",
        "postgres://meterd:meterd@127.0.0.1:9/none",
    ]);
    let lacking = down.post_ndjson(&events).await.accepted();
    assert!(lacking > 0);
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let text = scrape(&down).await;
    assert_eq!(
        sample(
            &text,
            r#"meterd_store_delivery_lag_events{store="postgres"}"#
        ),
        lacking as f64
    );
    let age = sample(
        &text,
        r#"meterd_store_delivery_lag_seconds{store="postgres"}"#,
    );
    assert!((1.5..120.0).contains(&age), "{age}\n{text}");
    assert!(
        sample(
            &text,
            r#"meterd_store_delivery_lag_bytes{store="postgres"}"#
        ) > 0.0
    );
    assert_eq!(
        sample(&text, r#"meterd_store_connected{store="postgres"}"#),
        0.0
    );
    // After a kill and a restart, the events the log held from before are counted too (once
    // the log has been read), with those accepted since.
    down.kill();
    down.restart();
    let more = common::generated(23, 50, 2, std::time::Duration::from_secs(600), 0.0);
    let more = down.post_ndjson(&more).await.accepted();
    let series = r#"meterd_store_delivery_lag_events{store="postgres"}"#;
    let mut text = scrape(&down).await;
    for _ in 0..100 {
        if text.lines().any(|l| l.starts_with(series)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        text = scrape(&down).await;
    }
    assert_eq!(sample(&text, series), (lacking + more) as f64, "{text}");
}

/// The metrics name every tenant with a series of its own: a key bound to one tenant may not
/// read them; a key with the query scope may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_bound_to_a_tenant_may_not_read_the_metrics() {
    let config = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(
        config.path(),
        "[[api_keys]]\nname = \"prometheus\"\nkey = \"pk-scrape-0123456789\"\nscopes = [\"query\"]\n\
         [[api_keys]]\nname = \"acme\"\nkey = \"ak-acme-0123456789\"\ntenant = \"acme\"\n\
         scopes = [\"ingest\"]\n",
    )
    .expect("write");
    let server = Server::start(&["--config", &config.path().display().to_string()]);
    let status = |key: &'static str| {
        let request = server
            .client
            .get(format!("{}/metrics", server.url))
            .bearer_auth(key);
        async move { request.send().await.expect("request").status() }
    };
    assert_eq!(status("pk-scrape-0123456789").await, StatusCode::OK);
    // Lacking the query scope, and bound to a tenant: refused either way.
    assert_eq!(status("ak-acme-0123456789").await, StatusCode::FORBIDDEN);
    let anonymous = reqwest::get(format!("{}/metrics", server.url))
        .await
        .expect("request")
        .status();
    assert_eq!(anonymous, StatusCode::UNAUTHORIZED);
}

/// Cost at the price book's list price and the latency and duration histograms count what was
/// accepted: the cost of each priced model at the entry in force at the event's time (a price
/// change in between), nothing for an unpriced model, and a replay moves none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_and_histograms_count_accepted_events() {
    let now = chrono::Utc::now();
    let change = common::rfc3339(now - chrono::Duration::days(1));
    let (before, after) = (
        common::rfc3339(now - chrono::Duration::days(1) - chrono::Duration::seconds(1)),
        common::rfc3339(now - chrono::Duration::hours(1)),
    );
    let config = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(
        config.path(),
        r#"
[[prices]]
provider = "openai"
model = "gpt-4o"
effective_from = "2020-01-01T00:00:00Z"
input_per_million = "2.50"
output_per_million = "10.00"
cached_input_per_million = "1.25"

[[prices]]
provider = "openai"
model = "gpt-4o"
effective_from = "CHANGE"
input_per_million = "5"
output_per_million = "20"
cache_write_per_million = "6.25"

[[prices]]
provider = "mistral"
model = "large"
effective_from = "2020-01-01T00:00:00Z"
currency = "EUR"
input_per_million = "2"
output_per_million = "6"
"#
        .replace("CHANGE", &change),
    )
    .expect("write config");
    let server = Server::start(&["--config", &config.path().display().to_string()]);
    let llm = |id: &str, tenant: &str, time: &str, model: (&str, &str), tokens: [i64; 4]| {
        serde_json::json!({
            "id": id, "tenant": tenant, "type": "llm.usage", "time": time,
            "data": {"provider": model.0, "model": model.1, "input_tokens": tokens[0],
                     "output_tokens": tokens[1], "cached_input_tokens": tokens[2],
                     "cache_write_input_tokens": tokens[3]}
        })
    };
    let gpt = ("openai", "gpt-4o");
    let events = vec![
        // Before the price change: 1000 x 2.5 + 200 x 10 + 400 x 1.25 + 100 x 2.5 (cache
        // writes at the input price) = 5,250 per million.
        llm("a", "acme", &before, gpt, [1000, 200, 400, 100]),
        // After: 1000 x 5 + 200 x 20 + 400 x 5 (cached at the input price) + 100 x 6.25.
        llm("b", "acme", &change, gpt, [1000, 200, 400, 100]),
        llm(
            "c",
            "initech",
            &after,
            ("mistral", "large"),
            [500, 50, 0, 0],
        ),
        // Unpriced: no cost.
        llm("d", "acme", &after, ("openai", "gpt-9"), [7, 7, 0, 0]),
        serde_json::json!({"id": "e", "tenant": "acme", "type": "api.request",
            "time": &after,
            "data": {"route": "/v1/chat", "status_code": 200, "latency_ms": 30}}),
        serde_json::json!({"id": "f", "tenant": "initech", "type": "api.request",
            "time": &after,
            "data": {"route": "/v1/chat", "status_code": 500, "latency_ms": 2500}}),
        serde_json::json!({"id": "g", "tenant": "acme", "type": "agent.run",
            "time": &after,
            "data": {"agent": "support", "run_id": "r1", "duration_ms": 45000}}),
    ];
    assert_eq!(server.post_ndjson(&events).await.accepted(), 7);
    let text = scrape(&server).await;
    let usd = (5_250.0 + 5_000.0 + 4_000.0 + 2_000.0 + 625.0) / 1e6;
    let eur = (500.0 * 2.0 + 50.0 * 6.0) / 1e6;
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.max(1.0);
    let got_usd = family_sum(&text, "meterd_usage_cost_total", r#"currency="USD""#);
    let got_eur = family_sum(&text, "meterd_usage_cost_total", r#"currency="EUR""#);
    assert!(near(got_usd, usd), "{got_usd} USD, want {usd}\n{text}");
    assert!(near(got_eur, eur), "{got_eur} EUR, want {eur}\n{text}");
    // Two api.request events (0.03 s and 2.5 s), one agent.run (45 s).
    let count = |family: &str| family_sum(&text, &format!("{family}_count"), "");
    let sum = |family: &str| family_sum(&text, &format!("{family}_sum"), "");
    assert_eq!(count("meterd_usage_api_request_duration_seconds"), 2.0);
    assert!(near(sum("meterd_usage_api_request_duration_seconds"), 2.53));
    assert_eq!(count("meterd_usage_agent_run_duration_seconds"), 1.0);
    assert!(near(sum("meterd_usage_agent_run_duration_seconds"), 45.0));
    assert_eq!(
        family_sum(
            &text,
            "meterd_usage_api_request_duration_seconds_bucket",
            r#"le="0.05""#
        ),
        1.0
    );
    // A replay moves nothing.
    assert_eq!(server.post_ndjson(&events).await.accepted(), 0);
    let again = scrape(&server).await;
    let usage = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("meterd_usage_"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(usage(&again), usage(&text));
    promtool_check(&again);
}

/// `--usage-metrics false`: no per-event counting, so no usage, cost or SLO event families;
/// ingest's own families still count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_metrics_can_be_turned_off() {
    let config = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(
        config.path(),
        "[[slos]]\nname = \"api\"\ntype = \"api.request\"\ngood = \"status_code < 500\"\n\
         objective = 0.99\nwindow = \"1d\"\n",
    )
    .expect("write");
    let server = Server::start(&[
        "--usage-metrics",
        "false",
        "--config",
        &config.path().display().to_string(),
    ]);
    let events = common::generated(23, 300, 5, std::time::Duration::from_secs(3_600), 0.0);
    let accepted = server.post_ndjson(&events).await.accepted();
    let text = scrape(&server).await;
    for family in [
        "meterd_usage_",
        "meterd_agent_runs_total",
        "meterd_slo_events_total",
    ] {
        assert!(
            !text.lines().any(|l| l.starts_with(family)),
            "{family} in\n{text}"
        );
    }
    assert_eq!(
        sample(&text, r#"meterd_ingest_events_total{outcome="accepted"}"#),
        accepted as f64
    );
    promtool_check(&text);
}
