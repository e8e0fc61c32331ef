//! Bad input to `POST /v1/events`: every case is a 4xx whose message names what is wrong, and
//! nothing of the request is stored.

use crate::common;

use std::io::Write;
use std::time::Duration;

use common::{CLOUDEVENT, JSON, NDJSON, Reply, Server, ago, llm_event, rfc3339};
use reqwest::StatusCode;
use serde_json::{Value, json};

const MIB: usize = 1024 * 1024;

/// A server holding one good event (`tenant = 'base'`), so "nothing stored" is checked against a
/// table that is not simply empty.
async fn server_with_baseline(args: &[&str]) -> Server {
    let server = Server::start(args);
    assert_eq!(
        server
            .post_json(&[llm_event("base", "baseline", 1, 1)])
            .await
            .accepted(),
        1
    );
    server
}

async fn assert_nothing_stored(server: &Server) {
    assert_eq!(
        server.count("true").await,
        1,
        "a rejected request must store nothing"
    );
}

/// Posts `event` (as a one-event JSON array) and checks the 400 names `field` with `reason`.
async fn rejects(server: &Server, event: Value, field: &str, reason: &str) -> Reply {
    let reply = server.post_json(&[event]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{field}: {reply:?}");
    assert!(reply.error().contains("nothing was stored"), "{reply:?}");
    reply.assert_field_error(field, reason);
    assert_eq!(reply.json["errors"][0]["index"], 0, "{reply:?}");
    reply
}

fn with(mut event: Value, pointer: &str, value: Value) -> Value {
    *event
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} exists")) = value;
    event
}

fn without(mut event: Value, parent: &str, key: &str) -> Value {
    event
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("object")
        .remove(key);
    event
}

fn good(id: &str) -> Value {
    llm_event("acme", id, 10, 5)
}

#[tokio::test]
async fn malformed_json() {
    let server = server_with_baseline(&[]).await;
    let reply = server
        .post_events(&b"[{\"id\": \"x\", "[..], JSON, false)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert!(reply.error().starts_with("malformed JSON"), "{reply:?}");

    // NDJSON names the line; the good line before it is not stored either.
    let mut body = serde_json::to_vec(&good("ok-line")).expect("json");
    body.extend_from_slice(b"\n{not json}\n");
    let reply = server.post_events(body, NDJSON, false).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert!(reply.error().contains("line 2"), "{reply:?}");
    assert_eq!(reply.json["errors"][0]["index"], 1, "{reply:?}");

    for (body, what) in [
        (&b"42"[..], "a number"),
        (&b"[]"[..], "an empty array"),
        (&b""[..], "an empty body"),
    ] {
        let reply = server.post_events(body, JSON, false).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{what}: {reply:?}");
    }
    let reply = server.post_events(&b"[1, \"two\"]"[..], JSON, false).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    reply.assert_field_error("", "expected a JSON object, got a number");
    assert_nothing_stored(&server).await;
}

#[tokio::test]
async fn wrong_types_and_string_numbers() {
    let server = server_with_baseline(&[]).await;
    rejects(
        &server,
        with(good("t1"), "/data/input_tokens", json!("1200")),
        "data.input_tokens",
        "got a string",
    )
    .await;
    rejects(
        &server,
        with(good("t2"), "/data/output_tokens", json!(true)),
        "data.output_tokens",
        "expected an integer",
    )
    .await;
    rejects(
        &server,
        with(good("t3"), "/data/input_tokens", json!(1.5)),
        "data.input_tokens",
        "not an integer",
    )
    .await;
    rejects(
        &server,
        with(good("t4"), "/id", json!(42)),
        "id",
        "expected a string",
    )
    .await;
    rejects(
        &server,
        with(good("t5"), "/time", json!(1_700_000_000)),
        "time",
        "expected an RFC 3339 string",
    )
    .await;
    rejects(
        &server,
        with(good("t6"), "/dimensions", json!(["a"])),
        "dimensions",
        "expected an object",
    )
    .await;
    rejects(
        &server,
        with(good("t7"), "/data", json!("x")),
        "data",
        "expected an object",
    )
    .await;
    rejects(
        &server,
        with(good("t8"), "/tenant", json!("a\nb")),
        "tenant",
        "not allowed",
    )
    .await;
    rejects(
        &server,
        with(good("t9"), "/data/provider", json!(null)),
        "data.provider",
        "required",
    )
    .await;
    rejects(
        &server,
        without(good("t10"), "", "tenant"),
        "tenant",
        "required",
    )
    .await;
    let mut extra = good("t11");
    extra["cost_usd"] = json!(0.1);
    rejects(&server, extra, "cost_usd", "unknown field").await;
    let mut extra = good("t12");
    extra["data"]["route"] = json!("/x");
    rejects(&server, extra, "data.route", "unknown field for llm.usage").await;
    assert_nothing_stored(&server).await;
}

#[tokio::test]
async fn negative_and_overflowing_counts() {
    let server = server_with_baseline(&[]).await;
    rejects(
        &server,
        with(good("n1"), "/data/input_tokens", json!(-1)),
        "data.input_tokens",
        "negative",
    )
    .await;
    rejects(
        &server,
        with(good("n2"), "/data/latency_ms", json!(-5)),
        "data.latency_ms",
        "negative",
    )
    .await;
    // Past u64 and past i64: neither may wrap or saturate into a stored value.
    for (i, raw) in ["18446744073709551616", "9223372036854775808", "1e30"]
        .iter()
        .enumerate()
    {
        let body = serde_json::to_string(&[good(&format!("o{i}"))])
            .expect("json")
            .replace("\"input_tokens\":10", &format!("\"input_tokens\":{raw}"));
        assert!(body.contains(raw), "{body}");
        let reply = server.post_events(body, JSON, false).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{raw}: {reply:?}");
        reply.assert_field_error("data.input_tokens", "out of range");
    }
    // i64::MAX itself fits.
    let max = with(good("max"), "/data/input_tokens", json!(i64::MAX));
    assert_eq!(server.post_json(&[max]).await.accepted(), 1);
    assert_eq!(
        server
            .scalar("SELECT input_tokens FROM events WHERE id = 'max'")
            .await,
        json!(i64::MAX)
    );
    assert_eq!(
        server.count("id <> 'max'").await,
        1,
        "only the baseline and i64::MAX are stored"
    );
}

#[tokio::test]
async fn id_bounds_and_unknown_type() {
    let server = server_with_baseline(&[]).await;
    rejects(
        &server,
        with(good("x"), "/id", json!("")),
        "id",
        "must not be empty",
    )
    .await;
    rejects(
        &server,
        with(good("x"), "/id", json!("i".repeat(129))),
        "id",
        "129 bytes; at most 128",
    )
    .await;
    rejects(&server, without(good("x"), "", "id"), "id", "required").await;
    rejects(
        &server,
        with(good("u1"), "/type", json!("llm.tokens")),
        "type",
        "unknown type",
    )
    .await;
    rejects(&server, without(good("u2"), "", "type"), "type", "required").await;
    assert_nothing_stored(&server).await;
    // The longest allowed id is fine.
    assert_eq!(
        server
            .post_json(&[with(good("x"), "/id", json!("i".repeat(128)))])
            .await
            .accepted(),
        1
    );
}

#[tokio::test]
async fn times_out_of_bounds() {
    let server = server_with_baseline(&[]).await;
    let future = rfc3339(chrono::Utc::now() + chrono::Duration::minutes(10));
    rejects(
        &server,
        with(good("f1"), "/time", json!(future)),
        "time",
        "in the future",
    )
    .await;
    let far_future = "2999-01-01T00:00:00Z";
    rejects(
        &server,
        with(good("f2"), "/time", json!(far_future)),
        "time",
        "in the future",
    )
    .await;
    let old = rfc3339(chrono::Utc::now() - chrono::Duration::days(401));
    rejects(
        &server,
        with(good("p1"), "/time", json!(old)),
        "time",
        "older than the accepted history",
    )
    .await;
    rejects(
        &server,
        with(good("p2"), "/time", json!("1970-01-01T00:00:00Z")),
        "time",
        "older than",
    )
    .await;
    rejects(
        &server,
        with(good("z"), "/time", json!("2026-11-21T10:00:00")),
        "time",
        "RFC 3339",
    )
    .await;
    rejects(
        &server,
        with(good("z2"), "/time", json!("yesterday")),
        "time",
        "RFC 3339",
    )
    .await;
    assert_nothing_stored(&server).await;
    // A little in the future (clock skew) is accepted.
    let near = rfc3339(chrono::Utc::now() + chrono::Duration::minutes(2));
    assert_eq!(
        server
            .post_json(&[with(good("near"), "/time", json!(near))])
            .await
            .accepted(),
        1
    );
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let server = server_with_baseline(&[]).await;
    // 11 MiB of otherwise valid events.
    let event = serde_json::to_vec(&good("big-0")).expect("json");
    let mut body = Vec::with_capacity(11 * MIB + event.len());
    let mut i = 0;
    while body.len() < 11 * MIB {
        body.extend_from_slice(&serde_json::to_vec(&good(&format!("big-{i}"))).expect("json"));
        body.push(b'\n');
        i += 1;
    }
    // A client that sends the whole body must get the 413, not a reset connection: hyper-based
    // clients (reqwest, and so `meterd gen`) report a broken pipe if the server closes early.
    let reply = match server.try_post_events_raw(body, NDJSON, None).await {
        Ok(r) => r,
        Err(e) => panic!("no answer to an 11 MiB body: {e:?}"),
    };
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text
    );
    assert_eq!(
        reply.error(),
        format!("body is larger than {} bytes", 10 * MIB)
    );
    assert_nothing_stored(&server).await;
    assert_eq!(server.get_status("/healthz").await, StatusCode::OK);
}

#[tokio::test]
async fn configured_body_limit_applies() {
    let server = server_with_baseline(&["--max-body-bytes", "1000"]).await;
    let events: Vec<Value> = (0..10).map(|i| good(&format!("s{i}"))).collect();
    let reply = server.post_json(&events).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{reply:?}");
    assert_eq!(reply.error(), "body is larger than 1000 bytes");
    // Small compressed, large inflated: still too large.
    let reply = server
        .post_events(serde_json::to_vec(&events).expect("json"), JSON, true)
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{reply:?}");
    assert_nothing_stored(&server).await;
}

#[tokio::test]
async fn gzip_bomb_is_413() {
    let server = server_with_baseline(&[]).await;
    // 200 MiB of zeros: about 200 KiB on the wire.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; MIB];
    for _ in 0..200 {
        enc.write_all(&zeros).expect("gzip");
    }
    let bomb = enc.finish().expect("gzip");
    assert!(
        bomb.len() < 2 * MIB,
        "the bomb is small on the wire: {} bytes",
        bomb.len()
    );
    let reply = server
        .try_post_events_raw(bomb, JSON, Some("gzip"))
        .await
        .expect("the server answers a gzip bomb rather than dropping the connection");
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{reply:?}");
    assert_eq!(
        reply.error(),
        format!("body is larger than {} bytes", 10 * MIB)
    );

    let reply = server
        .try_post_events_raw(&b"not gzip at all"[..], JSON, Some("gzip"))
        .await
        .expect("answer");
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert!(reply.error().contains("gzip"), "{reply:?}");
    let reply = server
        .try_post_events_raw(&b"[]"[..], JSON, Some("br"))
        .await
        .expect("answer");
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{reply:?}"
    );
    assert!(reply.error().contains("content encoding"), "{reply:?}");
    assert_nothing_stored(&server).await;
    assert!(server.get_status("/healthz").await.is_success());
}

#[tokio::test]
async fn megabyte_string_field_is_named() {
    let server = server_with_baseline(&[]).await;
    let big = "s".repeat(MIB);
    let reply = rejects(
        &server,
        with(good("m1"), "/subject", json!(big)),
        "subject",
        "1048576 bytes; at most 256",
    )
    .await;
    assert!(
        reply.text.len() < 64 * 1024,
        "the error does not echo the megabyte back: {} bytes",
        reply.text.len()
    );
    rejects(
        &server,
        with(good("m2"), "/data/model", json!(big)),
        "data.model",
        "1048576 bytes",
    )
    .await;
    rejects(
        &server,
        with(good("m3"), "/dimensions/agent", json!(big)),
        "dimensions.agent",
        "1048576 bytes",
    )
    .await;
    let reply = rejects(
        &server,
        with(good("m4"), "/type", json!(big)),
        "type",
        "unknown type",
    )
    .await;
    assert!(reply.text.len() < 64 * 1024, "{} bytes", reply.text.len());
    assert_nothing_stored(&server).await;
}

#[tokio::test]
async fn too_many_dimensions() {
    let server = server_with_baseline(&[]).await;
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    rejects(
        &server,
        with(good("d1"), "/dimensions", Value::Object(many)),
        "dimensions",
        "17 keys; at most 16",
    )
    .await;
    rejects(
        &server,
        with(good("d2"), "/dimensions", json!({"k": 3})),
        "dimensions.k",
        "expected a string",
    )
    .await;
    assert_nothing_stored(&server).await;
    let sixteen: serde_json::Map<String, Value> =
        (0..16).map(|i| (format!("k{i}"), json!("v"))).collect();
    assert_eq!(
        server
            .post_json(&[with(good("d3"), "/dimensions", Value::Object(sixteen))])
            .await
            .accepted(),
        1
    );
}

#[tokio::test]
async fn one_bad_event_rejects_the_whole_batch() {
    let server = server_with_baseline(&[]).await;
    let mut batch: Vec<Value> = (0..50).map(|i| good(&format!("g{i}"))).collect();
    batch[17]["data"]["output_tokens"] = json!(-3);
    batch[33]["time"] = json!("not a time");
    for (body, ct) in [
        (serde_json::to_vec(&batch).expect("json"), JSON),
        (common::ndjson(&batch), NDJSON),
    ] {
        let reply = server.post_events(body, ct, false).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{ct}: {reply:?}");
        assert_eq!(
            reply.error(),
            "2 of 50 events are invalid; nothing was stored"
        );
        let errors = reply.json["errors"].as_array().expect("errors");
        assert_eq!(errors.len(), 2, "{reply:?}");
        assert_eq!(
            errors[0],
            json!({"index": 17, "field": "data.output_tokens", "reason": "-3 is negative; must be >= 0"})
        );
        assert_eq!(errors[1]["index"], 33);
        assert_eq!(errors[1]["field"], "time");
    }
    // At most 100 problems are listed, however many there are.
    let all_bad: Vec<Value> = (0..300)
        .map(|i| with(good(&format!("b{i}")), "/data/input_tokens", json!(-1)))
        .collect();
    let reply = server.post_json(&all_bad).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.json["errors"].as_array().map(Vec::len),
        Some(100),
        "{}",
        reply.error()
    );
    assert!(reply.error().starts_with("300 of 300"), "{reply:?}");
    assert_nothing_stored(&server).await;
    // Fixed, the same batch goes through whole.
    batch[17]["data"]["output_tokens"] = json!(3);
    batch[33]["time"] = json!(rfc3339(ago(Duration::from_secs(5))));
    assert_eq!(server.post_json(&batch).await.accepted(), 50);
}

#[tokio::test]
async fn unsupported_content_type_is_415() {
    let server = server_with_baseline(&[]).await;
    let body = serde_json::to_vec(&good("ct")).expect("json");
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data",
        "application/x-www-form-urlencoded",
    ] {
        let reply = server.post_events(body.clone(), ct, false).await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{ct}: {reply:?}"
        );
        assert!(
            reply.error().contains("unsupported content type"),
            "{reply:?}"
        );
        assert!(
            reply.error().contains("application/x-ndjson"),
            "the error says what to send instead: {reply:?}"
        );
    }
    // A CloudEvent content type with a native event: the CloudEvents rules apply.
    let reply = server.post_events(body, CLOUDEVENT, false).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    reply.assert_field_error("specversion", "required");
    assert_nothing_stored(&server).await;
}

/// A key given twice in an event is refused, whichever copy a reader would believe, at any
/// depth and in every framing.
#[tokio::test]
async fn duplicate_keys_are_refused() {
    let server = server_with_baseline(&[]).await;
    let event = serde_json::to_string(&good("dup")).expect("json");
    let twice = event.replacen('{', "{\"tenant\": \"evil\", ", 1);
    let reply = server
        .post_events(format!("[{twice}]").into_bytes(), JSON, false)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert!(
        reply.error().contains("duplicate key \"tenant\""),
        "{reply:?}"
    );
    let nested = event.replacen("\"data\":{", "\"data\":{\"model\":\"x\",", 1);
    assert_ne!(nested, event, "the event has a data object");
    let reply = server
        .post_events(format!("{nested}\n").into_bytes(), NDJSON, false)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert!(
        reply.error().contains("duplicate key \"model\""),
        "{reply:?}"
    );
    assert_nothing_stored(&server).await;
}

/// A 400 names the offending value without echoing a megabyte of it back.
#[tokio::test]
async fn long_values_are_not_echoed() {
    let server = server_with_baseline(&[]).await;
    let huge = "x".repeat(1_000_000);
    let event = json!({
        "specversion": "1.0", "id": "ce-long", "source": "test", "type": "llm.usage",
        "tenant": "acme", "datacontenttype": format!("text/{huge}"),
        "data": {"provider": "openai", "model": "m", "input_tokens": 1, "output_tokens": 1},
    });
    let reply = server
        .post_events(serde_json::to_vec(&event).expect("json"), CLOUDEVENT, false)
        .await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "{}",
        reply.text.len()
    );
    reply.assert_field_error("datacontenttype", "is not supported");
    assert!(
        reply.text.len() < 4_096,
        "{} bytes echoed",
        reply.text.len()
    );
    let mut event = good("long-type");
    event["type"] = json!(huge);
    let reply = server.post_json(&[event]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.text.len() < 4_096,
        "{} bytes echoed",
        reply.text.len()
    );
    assert_nothing_stored(&server).await;
}
