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

async fn scrape(server: &Server) -> String {
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
fn sample(scrape: &str, series: &str) -> f64 {
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

fn promtool_check(scrape: &str) {
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
