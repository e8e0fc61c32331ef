//! `POST /v1/events` against the real binary: counts, exactly-once (duplicates and conflicts
//! within a batch, across batches and across a restart), the four framings, gzip, and where
//! each field lands in SQL.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{FixedOffset, SecondsFormat};
use common::{
    CLOUDEVENT, CLOUDEVENTS_BATCH, JSON, NDJSON, Server, ago, distinct_keys, generated, llm_event,
    ndjson,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

const DAY: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn sql_count_equals_accepted() {
    let server = Server::start(&[]);
    let events = generated(1, 2_000, 5, 30 * DAY, 0.1);
    let keys = distinct_keys(&events);
    assert!(
        keys.len() < events.len(),
        "the generator re-sends some events"
    );

    let reply = server.post_ndjson(&events).await;
    assert_eq!(reply.accepted(), keys.len() as u64, "{reply:?}");
    assert_eq!(reply.accepted() + reply.duplicates(), events.len() as u64);
    assert!(
        reply.conflicts().is_empty(),
        "exact re-sends are duplicates, not conflicts: {reply:?}"
    );
    // Acknowledged means visible to SQL, without waiting for a flush.
    assert_eq!(server.count("true").await, keys.len() as u64);

    let per_tenant = server
        .rows("SELECT tenant, count(*) FROM events GROUP BY tenant ORDER BY tenant")
        .await;
    let mut expected: HashMap<String, u64> = HashMap::new();
    for (tenant, _) in &keys {
        *expected.entry(tenant.clone()).or_default() += 1;
    }
    assert_eq!(per_tenant.len(), expected.len(), "{per_tenant:?}");
    for row in per_tenant {
        let tenant = row[0].as_str().expect("tenant");
        assert_eq!(
            row[1].as_u64(),
            Some(expected[tenant]),
            "events of tenant {tenant}"
        );
    }
}

#[tokio::test]
async fn replaying_a_batch_stores_nothing_new() {
    let server = Server::start(&[]);
    let events = generated(2, 500, 3, 2 * DAY, 0.0);
    let first = server.post_json(&events).await;
    assert_eq!(first.accepted(), 500);
    assert_eq!(first.duplicates(), 0);

    let replay = server.post_json(&events).await;
    assert_eq!(replay.accepted(), 0, "{replay:?}");
    assert_eq!(replay.duplicates(), 500);
    assert!(replay.conflicts().is_empty());
    // The same batch as NDJSON is the same events.
    let again = server.post_ndjson(&events).await;
    assert_eq!((again.accepted(), again.duplicates()), (0, 500));
    assert_eq!(server.count("true").await, 500);
}

#[tokio::test]
async fn duplicates_and_conflicts_inside_one_batch() {
    let server = Server::start(&[]);
    let a = llm_event("acme", "a", 100, 10);
    let mut a_changed = a.clone();
    a_changed["data"]["input_tokens"] = json!(999);
    let b = llm_event("acme", "b", 200, 20);
    // Same id, other tenant: a different event, not a conflict.
    let a_other_tenant = llm_event("globex", "a", 300, 30);

    let reply = server
        .post_json(&[a.clone(), a.clone(), a_changed, b, a_other_tenant])
        .await;
    assert_eq!(reply.accepted(), 3, "{reply:?}");
    assert_eq!(reply.duplicates(), 1, "{reply:?}");
    assert_eq!(reply.conflicts(), vec!["a".to_owned()]);

    assert_eq!(server.count("true").await, 3);
    // The first occurrence wins.
    let stored = server
        .scalar("SELECT input_tokens FROM events WHERE tenant = 'acme' AND id = 'a'")
        .await;
    assert_eq!(stored, json!(100));
    assert_eq!(
        server
            .scalar("SELECT input_tokens FROM events WHERE tenant = 'globex' AND id = 'a'")
            .await,
        json!(300)
    );
}

#[tokio::test]
async fn duplicates_and_conflicts_across_batches() {
    let server = Server::start(&[]);
    let a = llm_event("acme", "a", 100, 10);
    assert_eq!(
        server.post_json(std::slice::from_ref(&a)).await.accepted(),
        1
    );

    let mut a_changed = a.clone();
    a_changed["subject"] = json!("someone-else");
    let c = llm_event("acme", "c", 5, 5);
    let reply = server.post_json(&[a.clone(), a_changed.clone(), c]).await;
    assert_eq!(reply.accepted(), 1, "{reply:?}");
    assert_eq!(reply.duplicates(), 1);
    assert_eq!(reply.conflicts(), vec!["a".to_owned()]);

    // A conflict is never stored, however often it is sent.
    let reply = server.post_json(&[a_changed]).await;
    assert_eq!(
        (reply.accepted(), reply.duplicates(), reply.conflicts()),
        (0, 0, vec!["a".to_owned()])
    );
    assert_eq!(server.count("true").await, 2);
    assert_eq!(
        server
            .scalar("SELECT subject FROM events WHERE id = 'a'")
            .await,
        json!("user-17")
    );
}

#[tokio::test]
async fn dedup_survives_a_graceful_restart() {
    let mut server = Server::start(&[]);
    let events = generated(3, 1_000, 4, 7 * DAY, 0.0);
    assert_eq!(server.post_ndjson(&events).await.accepted(), 1_000);

    let status = server.stop();
    assert!(
        status.success(),
        "SIGTERM must end meterd with exit code 0, got {status}"
    );
    server.restart();

    assert_eq!(
        server.count("true").await,
        1_000,
        "acknowledged events survive a restart"
    );
    let replay = server.post_ndjson(&events).await;
    assert_eq!(
        (replay.accepted(), replay.duplicates()),
        (0, 1_000),
        "{replay:?}"
    );
    let mut changed = events[0].clone();
    changed["subject"] = json!("changed-after-restart");
    assert_eq!(
        server.post_json(&[changed.clone()]).await.conflicts(),
        vec![changed["id"].as_str().expect("id")]
    );
    assert_eq!(server.count("true").await, 1_000);
}

/// A CloudEvent; the same arguments give the same event.
fn cloudevent(id: &str, tenant: &str, input_tokens: i64) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "support-bot",
        "type": "llm.usage",
        "time": ce_time(),
        "subject": "user-1",
        "tenant": tenant,
        "datacontenttype": "application/json",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "data": {"provider": "anthropic", "model": "claude", "input_tokens": input_tokens, "output_tokens": 7}
    })
}

/// One time for all CloudEvents of a test run: equal arguments make equal events.
fn ce_time() -> String {
    static TIME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TIME.get_or_init(|| common::rfc3339(ago(Duration::from_secs(120))))
        .clone()
}

#[tokio::test]
async fn cloudevents_single_and_batch() {
    let server = Server::start(&[]);
    let single = server
        .post_events(
            serde_json::to_vec(&cloudevent("ce-1", "acme", 11)).expect("json"),
            CLOUDEVENT,
            false,
        )
        .await;
    assert_eq!(single.accepted(), 1, "{single:?}");
    let row = server
        .rows("SELECT tenant, id, type, source, subject, provider, model, input_tokens, output_tokens FROM events")
        .await;
    assert_eq!(
        row,
        vec![vec![
            json!("acme"),
            json!("ce-1"),
            json!("llm.usage"),
            json!("support-bot"),
            json!("user-1"),
            json!("anthropic"),
            json!("claude"),
            json!(11),
            json!(7)
        ]]
    );

    let batch = vec![
        cloudevent("ce-2", "acme", 1),
        cloudevent("ce-3", "globex", 2),
        cloudevent("ce-1", "acme", 11),
    ];
    let reply = server
        .post_events(
            serde_json::to_vec(&batch).expect("json"),
            CLOUDEVENTS_BATCH,
            false,
        )
        .await;
    assert_eq!((reply.accepted(), reply.duplicates()), (2, 1), "{reply:?}");
    assert_eq!(server.count("tenant = 'globex'").await, 1);

    // A batch body sent as a single CloudEvent, and the reverse, are shape errors.
    let wrong = server
        .post_events(serde_json::to_vec(&batch).expect("json"), CLOUDEVENT, false)
        .await;
    assert_eq!(wrong.status, StatusCode::BAD_REQUEST, "{wrong:?}");
    let wrong = server
        .post_events(
            serde_json::to_vec(&batch[0]).expect("json"),
            CLOUDEVENTS_BATCH,
            false,
        )
        .await;
    assert_eq!(wrong.status, StatusCode::BAD_REQUEST, "{wrong:?}");
    assert!(wrong.error().contains("array"), "{wrong:?}");
    assert_eq!(server.count("true").await, 3);
}

#[tokio::test]
async fn cloudevents_need_specversion_source_and_tenant() {
    let server = Server::start(&[]);
    let cases: [(&str, Option<Value>, &str, &str); 4] = [
        ("specversion", None, "specversion", "required"),
        (
            "specversion",
            Some(json!("0.3")),
            "specversion",
            "expected \"1.0\"",
        ),
        ("source", None, "source", "required"),
        ("tenant", None, "tenant", "required"),
    ];
    for (i, (key, value, field, reason)) in cases.into_iter().enumerate() {
        let mut ce = cloudevent(&format!("bad-{i}"), "acme", 1);
        match value {
            Some(v) => ce[key] = v,
            None => {
                ce.as_object_mut().expect("object").remove(key);
            }
        }
        let reply = server
            .post_events(serde_json::to_vec(&ce).expect("json"), CLOUDEVENT, false)
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{key}: {reply:?}");
        reply.assert_field_error(field, reason);
    }
    assert_eq!(server.count("true").await, 0);
}

#[tokio::test]
async fn gzip_bodies_in_every_framing() {
    let server = Server::start(&[]);
    let events = generated(4, 300, 2, DAY, 0.0);
    let reply = server
        .post_events(ndjson(&events[..100]), NDJSON, true)
        .await;
    assert_eq!(reply.accepted(), 100, "{reply:?}");
    let reply = server
        .post_events(
            serde_json::to_vec(&events[100..200]).expect("json"),
            JSON,
            true,
        )
        .await;
    assert_eq!(reply.accepted(), 100, "{reply:?}");
    let ces: Vec<Value> = (0..5)
        .map(|i| cloudevent(&format!("gz-{i}"), "acme", i))
        .collect();
    let reply = server
        .post_events(
            serde_json::to_vec(&ces).expect("json"),
            CLOUDEVENTS_BATCH,
            true,
        )
        .await;
    assert_eq!(reply.accepted(), 5, "{reply:?}");
    // The same events uncompressed are duplicates: gzip changes the transport, not the content.
    let reply = server.post_ndjson(&events[..200]).await;
    assert_eq!(
        (reply.accepted(), reply.duplicates()),
        (0, 200),
        "{reply:?}"
    );
    assert_eq!(server.count("true").await, 205);
}

#[tokio::test]
async fn ndjson_tolerates_blank_lines_and_crlf() {
    let server = Server::start(&[]);
    let events = generated(5, 50, 2, DAY, 0.0);
    let mut body = Vec::new();
    for e in &events {
        body.extend_from_slice(&serde_json::to_vec(e).expect("json"));
        body.extend_from_slice(b"\r\n\n");
    }
    let reply = server.post_events(body, NDJSON, false).await;
    assert_eq!(reply.accepted(), 50, "{reply:?}");
    // One event as a bare object with application/json.
    let single = server
        .post_events(
            serde_json::to_vec(&llm_event("acme", "solo", 1, 1)).expect("json"),
            JSON,
            false,
        )
        .await;
    assert_eq!(single.accepted(), 1);
    assert_eq!(server.count("true").await, 51);
}

#[tokio::test]
async fn fields_land_in_their_columns() {
    let server = Server::start(&[]);
    // Sums per tenant over generated events must match what SQL computes.
    let events = generated(6, 1_500, 4, 10 * DAY, 0.0);
    assert_eq!(server.post_ndjson(&events).await.accepted(), 1_500);
    let mut input: HashMap<String, i64> = HashMap::new();
    let mut output: HashMap<String, i64> = HashMap::new();
    let mut by_type: HashMap<String, u64> = HashMap::new();
    for e in &events {
        let tenant = e["tenant"].as_str().expect("tenant").to_owned();
        *by_type
            .entry(e["type"].as_str().expect("type").to_owned())
            .or_default() += 1;
        if e["type"] == "llm.usage" {
            *input.entry(tenant.clone()).or_default() +=
                e["data"]["input_tokens"].as_i64().expect("input_tokens");
            *output.entry(tenant).or_default() +=
                e["data"]["output_tokens"].as_i64().expect("output_tokens");
        }
    }
    let rows = server
        .rows(
            "SELECT tenant, sum(input_tokens), sum(output_tokens) FROM events \
             WHERE type = 'llm.usage' GROUP BY tenant ORDER BY tenant",
        )
        .await;
    assert_eq!(rows.len(), input.len(), "{rows:?}");
    for row in &rows {
        let tenant = row[0].as_str().expect("tenant");
        assert_eq!(
            row[1].as_i64(),
            Some(input[tenant]),
            "input_tokens of {tenant}"
        );
        assert_eq!(
            row[2].as_i64(),
            Some(output[tenant]),
            "output_tokens of {tenant}"
        );
    }
    for (t, n) in &by_type {
        assert_eq!(
            server.count(&format!("type = '{t}'")).await,
            *n,
            "events of type {t}"
        );
    }
    // Type-specific columns are null for the other types.
    assert_eq!(
        server
            .count("type = 'api.request' AND input_tokens IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        server
            .count("type = 'llm.usage' AND duration_ms IS NOT NULL")
            .await,
        0
    );
}

#[tokio::test]
async fn each_type_fills_its_columns_and_time_is_utc() {
    let server = Server::start(&[]);
    let t = ago(Duration::from_secs(3_600)) + chrono::Duration::milliseconds(123);
    let plus_two = t.with_timezone(&FixedOffset::east_opt(2 * 3_600).expect("offset"));
    let sent_time = plus_two.to_rfc3339_opts(SecondsFormat::Millis, false);
    assert!(sent_time.ends_with("+02:00"), "{sent_time}");
    let utc_time = t.to_rfc3339_opts(SecondsFormat::Millis, true);

    let events = vec![
        json!({"id": "l1", "tenant": "acme", "type": "llm.usage", "time": sent_time,
               "subject": "user-17", "source": "support-bot",
               "dimensions": {"department": "customer_service", "agent": "faq"},
               "data": {"provider": "openai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300,
                        "cached_input_tokens": 100, "reasoning_tokens": 50, "latency_ms": 830,
                        "status": "ok", "run_id": "run-42"}}),
        json!({"id": "r1", "tenant": "acme", "type": "api.request", "time": sent_time,
               "data": {"route": "/v1/chat", "method": "POST", "status_code": 502, "latency_ms": 41,
                        "request_bytes": 100, "response_bytes": 2000}}),
        json!({"id": "g1", "tenant": "acme", "type": "agent.run", "time": sent_time,
               "data": {"agent": "faq", "run_id": "run-42", "parent_run_id": "run-41", "status": "succeeded",
                        "duration_ms": 5000, "steps": 4, "tool_calls": 2}}),
    ];
    assert_eq!(server.post_json(&events).await.accepted(), 3);

    let llm = server
        .rows(
            "SELECT time, subject, source, dimensions, provider, model, input_tokens, output_tokens, \
             cached_input_tokens, reasoning_tokens, latency_ms, status, run_id FROM events WHERE id = 'l1'",
        )
        .await;
    assert_eq!(
        llm,
        vec![vec![
            json!(utc_time),
            json!("user-17"),
            json!("support-bot"),
            json!({"agent": "faq", "department": "customer_service"}),
            json!("openai"),
            json!("gpt-4o"),
            json!(1200),
            json!(300),
            json!(100),
            json!(50),
            json!(830),
            json!("ok"),
            json!("run-42")
        ]]
    );
    let api = server
        .rows(
            "SELECT time, route, method, status_code, latency_ms, request_bytes, response_bytes, provider \
             FROM events WHERE id = 'r1'",
        )
        .await;
    assert_eq!(
        api,
        vec![vec![
            json!(utc_time),
            json!("/v1/chat"),
            json!("POST"),
            json!(502),
            json!(41),
            json!(100),
            json!(2000),
            Value::Null
        ]]
    );
    let agent = server
        .rows(
            "SELECT time, agent, run_id, parent_run_id, status, duration_ms, steps, tool_calls, latency_ms \
             FROM events WHERE id = 'g1'",
        )
        .await;
    assert_eq!(
        agent,
        vec![vec![
            json!(utc_time),
            json!("faq"),
            json!("run-42"),
            json!("run-41"),
            json!("succeeded"),
            json!(5000),
            json!(4),
            json!(2),
            Value::Null
        ]]
    );
    // Time filters compare instants, whatever offset the event was sent with.
    let filter = format!("time = TIMESTAMP '{utc_time}'");
    assert_eq!(server.count(&filter).await, 3, "{filter}");
    // ingested_at is set by meterd, at or after the request.
    assert_eq!(server.count("ingested_at >= time").await, 3);
}

#[tokio::test]
async fn health_readiness_and_openapi() {
    let server = Server::start(&[]);
    assert_eq!(server.get_status("/healthz").await, StatusCode::OK);
    assert_eq!(server.get_status("/readyz").await, StatusCode::OK);
    let doc: Value = server
        .client
        .get(format!("{}/openapi.json", server.url))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("OpenAPI is JSON");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')),
        "{doc}"
    );
    for path in ["/v1/events", "/v1/sql", "/healthz", "/readyz"] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
}

/// When the log holds more than `--max-log-bytes` that the stores have not confirmed, ingest
/// answers 503 with Retry-After, stores nothing of the refused batch, and readiness says why.
#[tokio::test]
async fn full_log_answers_503_and_stores_nothing() {
    let server = Server::start(&["--max-log-bytes", "1"]);
    let first = generated(11, 50, 3, DAY, 0.0);
    assert_eq!(server.post_ndjson(&first).await.accepted(), 50);

    let second = generated(12, 50, 3, DAY, 0.0);
    let reply = server.post_ndjson(&second).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert!(reply.headers.contains_key("retry-after"), "{reply:?}");
    assert!(reply.error().contains("log is full"), "{reply:?}");
    assert_eq!(
        server.get_status("/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        server.count("true").await,
        50,
        "the refused batch left nothing behind"
    );
}

/// Tenant names as users have them: any UTF-8 text without control characters, stored as sent,
/// found again by SQL; a control character is refused with the field named.
#[tokio::test]
async fn tenants_are_any_text_without_control_characters() {
    let server = Server::start(&[]);
    let tenants = [
        "user@example.com",
        "Acme Corp",
        "org/42",
        "café-ü",
        "O'Brien \"quoted\" \\ back; DROP TABLE events; --",
        "%_*?[]{}$`",
        "日本語のテナント",
        "../../etc/passwd",
    ];
    let events: Vec<Value> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| llm_event(t, &format!("t{i}"), 100 + i as i64, 1))
        .collect();
    assert_eq!(
        server.post_json(&events).await.accepted(),
        tenants.len() as u64
    );
    for (i, tenant) in tenants.iter().enumerate() {
        let rows = server
            .rows(&format!(
                "SELECT tenant, input_tokens FROM events WHERE tenant = {}",
                common::sql_str(tenant)
            ))
            .await;
        assert_eq!(rows, vec![vec![json!(tenant), json!(100 + i)]], "{tenant}");
    }
    for bad in ["acme\n", "a\tb", "\u{7f}x", "esc\u{1b}[31m"] {
        let reply = server.post_json(&[llm_event(bad, "bad", 1, 1)]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad:?}: {reply:?}");
        reply.assert_field_error("tenant", "control character");
    }
    assert_eq!(server.count("true").await, tenants.len() as u64);
}

/// CloudEvents binary mode: the attributes in `ce-*` headers (percent-encoded), the data as the
/// body, the tenant from `ce-tenant`; without `time`, the time received.
#[tokio::test]
async fn cloudevents_binary_mode() {
    let server = Server::start(&[]);
    let url = format!("{}/v1/events", server.url);
    let data =
        json!({"provider": "openai", "model": "gpt-4o", "input_tokens": 42, "output_tokens": 7});
    let time = common::rfc3339(ago(Duration::from_secs(30)));
    let send = |headers: Vec<(&'static str, String)>, body: Value| {
        let mut request = server.client.post(&url).body(body.to_string());
        for (k, v) in headers {
            request = request.header(k, v);
        }
        request.send()
    };
    let base = |id: &str| {
        vec![
            ("ce-specversion", "1.0".to_owned()),
            ("ce-id", id.to_owned()),
            ("ce-source", "support-bot".to_owned()),
            ("ce-type", "llm.usage".to_owned()),
            ("ce-tenant", "caf%C3%A9%20Corp".to_owned()),
            ("content-type", "application/json".to_owned()),
        ]
    };
    let mut timed = base("bin-1");
    timed.push(("ce-time", time.clone()));
    timed.push(("ce-subject", "user-9".to_owned()));
    timed.push(("ce-dimensions", r#"{"team":"support"}"#.to_owned()));
    let r = send(timed.clone(), data.clone()).await.expect("post");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"accepted": 1, "duplicates": 0, "conflicts": []})
    );
    let again = send(timed, data.clone()).await.expect("post");
    assert_eq!(
        again.json::<Value>().await.expect("json")["duplicates"],
        1,
        "the same binary event again is a duplicate"
    );
    let before = chrono::Utc::now();
    let r = send(base("bin-untimed"), data.clone()).await.expect("post");
    assert_eq!(r.status(), StatusCode::OK);
    let after = chrono::Utc::now();

    let rows = server
        .rows(
            "SELECT id, tenant, source, subject, input_tokens, dimensions['team'], \
             CAST(time AS VARCHAR) FROM events ORDER BY id",
        )
        .await;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0][..6],
        [
            json!("bin-1"),
            json!("café Corp"),
            json!("support-bot"),
            json!("user-9"),
            json!(42),
            json!("support")
        ]
    );
    let received = server
        .scalar("SELECT time FROM events WHERE id = 'bin-untimed'")
        .await;
    let received = chrono::DateTime::parse_from_rfc3339(received.as_str().expect("time"))
        .expect("rfc3339")
        .with_timezone(&chrono::Utc);
    assert!(
        received >= before - chrono::TimeDelta::milliseconds(1) && received <= after,
        "{received} not between {before} and {after}"
    );

    // Data that is not JSON, and a header that is not an attribute meterd can read.
    let mut text = base("bin-text");
    text.retain(|(k, _)| *k != "content-type");
    text.push(("content-type", "text/plain".to_owned()));
    let r = send(text, json!("hello")).await.expect("post");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let mut no_tenant = base("bin-2");
    no_tenant.retain(|(k, _)| *k != "ce-tenant");
    let r = send(no_tenant, data).await.expect("post");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errors"][0]["field"], "tenant", "{body}");
    assert_eq!(server.count("true").await, 2);
}

/// The CloudEvents Python SDK, as producers use it: binary mode by default, structured mode,
/// a batch; the tenant extension percent-encoded by the SDK.
#[tokio::test]
async fn the_cloudevents_sdk_is_understood() {
    let server = Server::start(&[]);
    let tenant = "café \"Corp\" 日本";
    let out = std::process::Command::new(common::clients_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/cloudevents_sdk.py"
        ))
        .arg(&server.url)
        .arg(tenant)
        .output()
        .expect("run the CloudEvents SDK");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: HashMap<String, Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json line");
            (v["mode"].as_str().expect("mode").to_owned(), v)
        })
        .collect();
    assert!(
        answers["binary"]["headers"]
            .as_array()
            .is_some_and(|h| h.contains(&json!("ce-tenant"))),
        "the SDK sent binary mode: {}",
        answers["binary"]
    );
    let expect = |mode: &str, accepted: u64, duplicates: u64| {
        let a = &answers[mode];
        assert_eq!(a["status"], 200, "{mode}: {a}");
        assert_eq!(a["body"]["accepted"], accepted, "{mode}: {a}");
        assert_eq!(a["body"]["duplicates"], duplicates, "{mode}: {a}");
    };
    expect("binary", 1, 0);
    expect("binary-again", 0, 1);
    expect("binary-untimed", 1, 0);
    expect("structured", 1, 0);
    expect("batch", 3, 0);
    let rows = server
        .rows(&format!(
            "SELECT type, count(*) FROM events WHERE tenant = {} GROUP BY type ORDER BY type",
            common::sql_str(tenant)
        ))
        .await;
    assert_eq!(
        rows,
        vec![
            vec![json!("agent.run"), json!(1)],
            vec![json!("api.request"), json!(3)],
            vec![json!("llm.usage"), json!(2)]
        ]
    );
}

/// schemathesis fuzzes every operation of `/openapi.json` with every check (responses match
/// the document; data the document calls valid is accepted, invalid refused; nothing is a
/// 5xx), from the document's examples too, and finds nothing. Its configuration and hooks are
/// in tests/clients/ (why each setting is there is written next to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure() {
    let mut server = Server::start(&[]);
    let clients = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
    let report = tempfile::tempdir().expect("report dir");
    let schemathesis = std::path::Path::new(&common::clients_python())
        .with_file_name("schemathesis")
        .to_string_lossy()
        .into_owned();
    let url = format!("{}/openapi.json", server.url);
    let out = tokio::task::spawn_blocking({
        let report = report.path().to_owned();
        move || {
            std::process::Command::new(&schemathesis)
                .arg("--config-file")
                .arg(format!("{clients}/schemathesis.toml"))
                .args(["run", &url, "--checks", "all", "--seed", "7", "--no-color"])
                .arg("--report")
                .arg("ndjson")
                .arg("--report-dir")
                .arg(&report)
                .env("SCHEMATHESIS_HOOKS", "meterd_hooks")
                .env("PYTHONPATH", clients)
                .output()
                .expect("run schemathesis")
        }
    })
    .await
    .expect("schemathesis task");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.is_running(), "meterd survived the fuzzing");
    // The document's own examples reach the business logic and succeed, and so do generated
    // events: the statuses each operation answered, by phase, from the run's NDJSON report.
    let mut statuses: HashMap<(String, String), Vec<u64>> = HashMap::new();
    for entry in std::fs::read_dir(report.path())
        .expect("report dir")
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).expect("report");
        for line in text.lines() {
            let event: Value = serde_json::from_str(line).expect("report line");
            let Some(done) = event.get("ScenarioFinished") else {
                continue;
            };
            let phase = done["phase"].as_str().unwrap_or_default().to_owned();
            let label = done["recorder"]["label"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if let Some(interactions) = done["recorder"]["interactions"].as_object() {
                statuses.entry((phase, label)).or_default().extend(
                    interactions
                        .values()
                        .filter_map(|i| i["response"]["status_code"].as_u64()),
                );
            }
        }
    }
    // (Generated SQL text is hardly ever a statement, so only the example reaches 200 there.)
    for (operation, phases) in [
        ("POST /v1/events", &["examples", "coverage", "fuzzing"][..]),
        ("POST /v1/sql", &["examples"][..]),
    ] {
        for &phase in phases {
            let seen = statuses
                .get(&(phase.to_owned(), operation.to_owned()))
                .cloned()
                .unwrap_or_default();
            assert!(
                seen.contains(&200),
                "{operation} never answered 200 in the {phase} phase: {seen:?}\n{stdout}"
            );
        }
    }
    assert!(server.count("true").await > 0);
}

/// API keys as a client sends them: the scheme in any case, scopes enforced, unknown paths a
/// 404 for everyone, and `/readyz` public in its status but detailed only for a key holder.
#[tokio::test]
async fn api_keys_guard_the_api_and_leave_probes_public() {
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(
        config.path(),
        "[[api_keys]]\nname = \"ingester\"\nkey = \"ik-secret-0123456789\"\nscopes = [\"ingest\"]\n\
         [[api_keys]]\nname = \"analyst\"\nkey = \"qk-secret-0123456789\"\nscopes = [\"query\"]\n",
    )
    .expect("write config");
    let server = Server::start(&["--config", &config.path().to_string_lossy()]);
    let client = &server.client;
    let post_event = |auth: Option<&'static str>, id: &'static str| {
        let mut request = client
            .post(format!("{}/v1/events", server.url))
            .json(&llm_event("acme", id, 1, 1));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    for (auth, id) in [
        ("Bearer ik-secret-0123456789", "k1"),
        ("bearer ik-secret-0123456789", "k2"),
        ("BEARER   ik-secret-0123456789", "k3"),
    ] {
        let response = post_event(Some(auth), id).await.expect("POST");
        assert_eq!(response.status(), StatusCode::OK, "{auth:?}");
    }
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic ik-secret-0123456789"),
        Some("ik-secret-0123456789"),
    ] {
        let response = post_event(auth, "k4").await.expect("POST");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
    }
    let sql = |auth: &'static str| {
        client
            .post(format!("{}/v1/sql", server.url))
            .header("authorization", auth)
            .json(&json!({"sql": "SELECT count(*) AS n FROM events"}))
            .send()
    };
    assert_eq!(
        sql("bearer ik-secret-0123456789")
            .await
            .expect("POST")
            .status(),
        StatusCode::FORBIDDEN
    );
    let answer: Value = sql("bearer qk-secret-0123456789")
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["rows"], json!([[3]]));

    // Unknown paths are unknown to everyone.
    for path in ["/nope", "/v1/nope", "/v1/events/x"] {
        assert_eq!(
            server.get_status(path).await,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    // Probes need no key; the detail of readiness does.
    assert_eq!(server.get_status("/healthz").await, StatusCode::OK);
    let public = client
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .expect("GET /readyz");
    assert_eq!(public.status(), StatusCode::OK);
    assert_eq!(
        public.json::<Value>().await.expect("json"),
        json!({"ready": true})
    );
    let detailed: Value = client
        .get(format!("{}/readyz", server.url))
        .header("authorization", "Bearer qk-secret-0123456789")
        .send()
        .await
        .expect("GET /readyz")
        .json()
        .await
        .expect("json");
    assert!(detailed["ingest"].is_object(), "{detailed}");
}

/// Reads from `stream` until the server closes it (or it errors), or `within` passes; whether
/// it was closed.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_elapsed) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Slow and idle clients cannot hold the server: unfinished headers, a stalled body and an
/// idle keep-alive connection are each closed after their timeout, and hundreds of slow
/// connections against a process limited to 256 file descriptors leave it alive and
/// answering `/healthz` once they time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    let server = Server::start(&[
        "--header-timeout-secs",
        "2",
        "--body-timeout-secs",
        "2",
        "--max-connections",
        "50",
    ]);
    let address = server.url.trim_start_matches("http://").to_owned();
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &server.pid().to_string(), "--nofile=256:256"])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(limited.success(), "prlimit failed: {limited}");

    // Unfinished headers.
    let mut slow = TcpStream::connect(&address).await.expect("connect");
    slow.write_all(b"POST /v1/events HTTP/1.1\r\nHost: meterd\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(&mut slow, Duration::from_secs(20)).await,
        "a connection with unfinished headers stayed open"
    );
    // A body that stops coming.
    let mut stalled = TcpStream::connect(&address).await.expect("connect");
    stalled
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: meterd\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n[{\"tenant\":",
        )
        .await
        .expect("write");
    assert!(
        closed_within(&mut stalled, Duration::from_secs(20)).await,
        "a connection with a stalled body stayed open"
    );
    // A body that trickles a byte every half second never stalls past the body timeout, but
    // is far slower than the slowest pace allowed after it.
    let trickling = TcpStream::connect(&address).await.expect("connect");
    let (mut reader, mut writer) = trickling.into_split();
    writer
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: meterd\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n[",
        )
        .await
        .expect("write");
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if writer.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let closed = {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, reader.read(&mut buf)).await {
                Err(_elapsed) => break false,
                Ok(Ok(0) | Err(_)) => break true,
                Ok(Ok(_)) => {}
            }
        }
    };
    assert!(closed, "a connection with a trickling body stayed open");
    trickle.abort();
    // An idle keep-alive connection after a complete request.
    let mut idle = TcpStream::connect(&address).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: meterd\r\n\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(&mut idle, Duration::from_secs(20)).await,
        "an idle keep-alive connection stayed open"
    );

    // More unfinished requests than the connection cap (past it, new connections are closed at
    // once) and than the process has descriptors.
    let mut held = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(&address).await {
            Ok(mut stream) => {
                let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: me").await;
                held.push(stream);
            }
            Err(_) => break,
        }
    }
    assert!(held.len() >= 256, "only {} connections opened", held.len());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let probe = server
            .client
            .get(format!("{}/healthz", server.url))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if probe.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/healthz did not answer within 60 s of 300 slow connections"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(held);
    let mut server = server;
    assert!(server.is_running(), "meterd exited under slow connections");
    assert_eq!(
        server
            .post_json(&[llm_event("acme", "after", 1, 1)])
            .await
            .accepted(),
        1
    );
}
