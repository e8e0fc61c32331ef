//! SLOs end to end: `[[slos]]` in the config file, `GET /v1/slos` counted from the stored
//! events, worked out by hand, and the same answer from the embedded store, PostgreSQL and
//! ClickHouse.

use crate::common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::ch::{self, PrivateClickHouse};
use common::pg::{self, TestDb};
use common::{Server, rfc3339};
use reqwest::StatusCode;
use serde_json::{Value, json};

const SLOS: &str = r#"
[[slos]]
name = "api-availability"
type = "api.request"
good = "status_code < 500"
valid = "route <> '/healthz'"
objective = 0.99
window = "30d"

[[slos]]
name = "api-strict"
type = "api.request"
good = "status_code < 500"
valid = "route <> '/healthz'"
objective = "0.999"
window = "30d"

[[slos]]
name = "agent-success"
type = "agent.run"
good = "status = 'succeeded'"
objective = 0.9
window = "1d"
per_tenant = true

[[slos]]
name = "nobody-availability"
type = "api.request"
good = "status_code < 500"
objective = 0.999
window = "7d"
tenant = "nobody"
"#;

fn config_file(extra: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(file.path(), format!("{extra}\n{SLOS}")).expect("write config");
    file
}

fn path(f: &tempfile::NamedTempFile) -> String {
    f.path().display().to_string()
}

fn request(tenant: &str, id: &str, t: DateTime<Utc>, route: &str, status: i64) -> Value {
    json!({
        "id": id, "tenant": tenant, "type": "api.request", "time": rfc3339(t),
        "data": {"route": route, "method": "GET", "status_code": status, "latency_ms": 20}
    })
}

fn run(tenant: &str, id: &str, t: DateTime<Utc>, status: Option<&str>) -> Value {
    let mut data = json!({"agent": "support", "run_id": id, "duration_ms": 10, "steps": 1});
    if let Some(s) = status {
        data["status"] = json!(s);
    }
    json!({"id": id, "tenant": tenant, "type": "agent.run", "time": rfc3339(t), "data": data})
}

/// The events of the test, relative to `now`: each well inside the windows it is counted in.
fn events(now: DateTime<Utc>) -> Vec<Value> {
    let minutes = |m: i64| now - chrono::Duration::minutes(m);
    let mut out = Vec::new();
    // Two minutes ago: 97 good, 2 errors, and a health check that errs (not valid).
    for i in 0..99 {
        let status = if i < 97 { 200 } else { 503 };
        out.push(request(
            "acme",
            &format!("a-{i}"),
            minutes(2),
            "/v1/chat",
            status,
        ));
    }
    out.push(request("acme", "health", minutes(2), "/healthz", 500));
    // 45 minutes ago: 100 good.
    for i in 0..100 {
        out.push(request(
            "initech",
            &format!("b-{i}"),
            minutes(45),
            "/v1/chat",
            201,
        ));
    }
    // Two days ago: 90 good, 10 errors.
    for i in 0..100 {
        let status = if i < 90 { 200 } else { 500 };
        out.push(request(
            "acme",
            &format!("c-{i}"),
            minutes(2 * 24 * 60),
            "/v1/embed",
            status,
        ));
    }
    // Agent runs: acme 8 succeeded, 1 failed, 1 without a status; initech 5 succeeded; and an
    // acme run two days ago, outside the 1d window.
    for i in 0..10 {
        let status = match i {
            0..8 => Some("succeeded"),
            8 => Some("failed"),
            _ => None,
        };
        out.push(run("acme", &format!("r-{i}"), minutes(10), status));
    }
    for i in 0..5 {
        out.push(run(
            "initech",
            &format!("s-{i}"),
            minutes(10),
            Some("succeeded"),
        ));
    }
    out.push(run("acme", "old", minutes(2 * 24 * 60), Some("failed")));
    out
}

async fn slos(server: &Server, query: &str) -> Value {
    let response = reqwest::get(format!("{}/v1/slos{query}", server.url))
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    response.json().await.expect("json")
}

fn by_name<'a>(answer: &'a Value, name: &str, tenant: Option<&str>) -> &'a Value {
    answer["slos"]
        .as_array()
        .expect("slos")
        .iter()
        .find(|s| s["name"] == name && s["tenant"].as_str() == tenant)
        .unwrap_or_else(|| panic!("no {name} {tenant:?} in {answer}"))
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-9)
}

/// Every figure of `GET /v1/slos` worked out by hand, on the embedded store with the README's
/// defaults otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slos_count_budgets_and_burn_rates_from_the_events() {
    // The tenants named, so the per-tenant SLO counters carry them from the first event.
    let cfg = config_file(r#"metrics_tenants = ["acme", "initech"]"#);
    let mut server = Server::start(&["--config", &path(&cfg)]);
    let now = Utc::now();
    let sent = events(now);
    assert_eq!(
        server.post_ndjson(&sent).await.accepted(),
        sent.len() as u64
    );

    let all = slos(&server, "").await;
    // 30d: valid 99 + 100 + 100 (the health check is not valid), good 97 + 100 + 90.
    let a = by_name(&all, "api-availability", None);
    assert_eq!(a["valid_events"], 299);
    assert_eq!(a["good_events"], 287);
    assert!(close(&a["sli"], 287.0 / 299.0), "{a}");
    assert!(close(&a["error_budget"]["total"], 2.99), "{a}");
    assert_eq!(a["error_budget"]["used"], 12);
    assert!(close(&a["error_budget"]["remaining"], -9.01), "{a}");
    // 5m and 30m: 2 bad of 99; 1h, 2h, 6h, 1d: 2 of 199; 3d: 12 of 299; over 1% allowed.
    let rates = &a["burn_rates"];
    for (window, bad, valid) in [
        ("5m", 2.0, 99.0),
        ("30m", 2.0, 99.0),
        ("1h", 2.0, 199.0),
        ("2h", 2.0, 199.0),
        ("6h", 2.0, 199.0),
        ("1d", 2.0, 199.0),
        ("3d", 12.0, 299.0),
    ] {
        assert!(close(&rates[window], bad / valid / 0.01), "{window}: {a}");
    }
    assert_eq!(a["alerts"], json!({"fast_burn": false, "slow_burn": false}));
    // At 99.9%: 5m and 30m burn at 20.2, 1h and 6h at 10.05: a ticket, not a page.
    let strict = by_name(&all, "api-strict", None);
    assert!(
        close(&strict["burn_rates"]["5m"], 2.0 / 99.0 / 0.001),
        "{strict}"
    );
    assert!(
        close(&strict["burn_rates"]["1h"], 2.0 / 199.0 / 0.001),
        "{strict}"
    );
    assert_eq!(
        strict["alerts"],
        json!({"fast_burn": false, "slow_burn": true})
    );
    // Per tenant: a run without a status is not good; the old run is outside the day.
    let acme = by_name(&all, "agent-success", Some("acme"));
    assert_eq!(
        (acme["valid_events"].as_u64(), acme["good_events"].as_u64()),
        (Some(10), Some(8))
    );
    assert!(close(&acme["error_budget"]["total"], 1.0), "{acme}");
    assert_eq!(acme["error_budget"]["used"], 2);
    assert!(close(&acme["burn_rates"]["5m"], 0.0), "{acme}");
    assert!(close(&acme["burn_rates"]["30m"], 2.0), "{acme}");
    assert!(close(&acme["burn_rates"]["3d"], 3.0 / 11.0 / 0.1), "{acme}");
    let initech = by_name(&all, "agent-success", Some("initech"));
    assert_eq!(initech["sli"], 1.0);
    // No events: nothing burns, nothing is used.
    let nobody = by_name(&all, "nobody-availability", Some("nobody"));
    assert_eq!(nobody["valid_events"], 0);
    assert_eq!(nobody["sli"], Value::Null);
    assert_eq!(nobody["error_budget"]["remaining_ratio"], 1.0);
    assert_eq!(nobody["burn_rates"]["1h"], 0.0);
    assert_eq!(all["slos"].as_array().map(Vec::len), Some(5));

    // One SLO; one tenant (the SLOs that can speak of it).
    let one = slos(&server, "?name=api-strict").await;
    assert_eq!(one["slos"].as_array().map(Vec::len), Some(1));
    let acme_only = slos(&server, "?tenant=acme").await;
    let names: Vec<(&str, &str)> = acme_only["slos"]
        .as_array()
        .expect("slos")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or(""),
                s["tenant"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(names, [("agent-success", "acme")]);
    let (status, body) = {
        let r = reqwest::get(format!("{}/v1/slos?name=nope", server.url))
            .await
            .expect("request");
        (r.status(), r.text().await.expect("body"))
    };
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("name:"), "{body}");

    // The SLO counters moved as the events were accepted, by the filters evaluated in meterd:
    // every event so far (no window), the same valid and good events the stores counted.
    let text = crate::metrics::scrape(&server).await;
    let counted = |slo: &str, kind: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("meterd_slo_events_total{")
                    && l.contains(&format!("slo=\"{slo}\""))
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    for (slo, valid, good) in [
        ("api-availability", 299.0, 287.0),
        ("api-strict", 299.0, 287.0),
        // acme 10 + initech 5 + the old acme run; a run without a status is not good.
        ("agent-success", 16.0, 13.0),
        ("nobody-availability", 0.0, 0.0),
    ] {
        assert_eq!(counted(slo, "valid"), valid, "{slo}\n{text}");
        assert_eq!(counted(slo, "good"), good, "{slo}\n{text}");
    }
    for line in [
        r#"meterd_slo_events_total{kind="valid",slo="nobody-availability",tenant="nobody"} 0"#,
        r#"meterd_slo_events_total{kind="valid",slo="agent-success",tenant="acme"} 11"#,
        r#"meterd_slo_events_total{kind="good",slo="agent-success",tenant="acme"} 8"#,
        r#"meterd_slo_events_total{kind="valid",slo="agent-success",tenant="initech"} 5"#,
        r#"meterd_slo_events_total{kind="good",slo="agent-success",tenant="initech"} 5"#,
        r#"meterd_slo_events_total{kind="valid",slo="api-availability",tenant=""} 299"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }

    // The SLO gauges of /metrics: counted when meterd starts and every 30 s after.
    server.stop();
    server.restart();
    let wanted = r#"meterd_slo_valid_events{slo="api-availability",tenant=""} 299"#;
    let mut text = String::new();
    for _ in 0..100 {
        text = crate::metrics::scrape(&server).await;
        if text.contains(wanted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains(wanted), "{text}");
    for line in [
        r#"meterd_slo_good_events{slo="api-availability",tenant=""} 287"#,
        r#"meterd_slo_valid_events{slo="agent-success",tenant="acme"} 10"#,
        r#"meterd_slo_sli{slo="agent-success",tenant="initech"} 1"#,
        r#"meterd_slo_error_budget_remaining_ratio{slo="nobody-availability",tenant="nobody"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    let burn = text
        .lines()
        .find(|l| l.starts_with(r#"meterd_slo_burn_rate{slo="api-strict",tenant="",window="5m"}"#))
        .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .expect("the 5m burn rate of api-strict");
    assert!((burn - 2.0 / 99.0 / 0.001).abs() < 1e-6, "{burn}");
    // No SLI without valid events.
    assert!(
        !text.contains(r#"meterd_slo_sli{slo="nobody-availability""#),
        "{text}"
    );
    crate::metrics::promtool_check(&text);
}

/// The same events give the same SLOs from the embedded store, PostgreSQL and ClickHouse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slos_are_the_same_on_every_store() {
    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("slo");
    let pgdb = TestDb::create("slo").await;
    let ch_section = format!(
        "[clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}\"\nbatch_rows = 700\nbatch_period_secs = 0.05\n"
    );
    let both = config_file(&ch_section);
    let writer = Server::start(&[
        "--config",
        &path(&both),
        "--postgres-url",
        &pgdb.url,
        "--sql-source",
        "embedded",
    ]);
    // Seven minutes back, every event is minutes away from each window's edge for as long as
    // delivery and three servers take: the stores answer at slightly different times.
    let sent = events(Utc::now() - chrono::Duration::minutes(7));
    let accepted = writer.post_ndjson(&sent).await.accepted();
    assert_eq!(accepted, sent.len() as u64);
    let wait = Duration::from_secs(180);
    pg::wait_for(
        &pgdb.client().await,
        "SELECT count(*) FROM meterd.events",
        accepted as i64,
        wait,
    )
    .await;
    ch::wait_for(
        &url,
        &format!("SELECT count() FROM {db}.events"),
        accepted as i64,
        wait,
    )
    .await;
    let pg_only = config_file("");
    let from_postgres = Server::start(&[
        "--config",
        &path(&pg_only),
        "--postgres-url",
        &pgdb.url,
        "--sql-source",
        "postgres",
    ]);
    let ch_only = config_file(&ch_section);
    let from_clickhouse =
        Server::start(&["--config", &path(&ch_only), "--sql-source", "clickhouse"]);
    let embedded = slos(&writer, "").await;
    assert_eq!(embedded["slos"].as_array().map(Vec::len), Some(5));
    assert_eq!(slos(&from_postgres, "").await, embedded, "PostgreSQL");
    assert_eq!(slos(&from_clickhouse, "").await, embedded, "ClickHouse");
}

/// An SLO that cannot be used stops `meterd serve` with exit code 2, naming the entry.
#[test]
fn a_bad_slo_stops_startup_naming_the_entry() {
    for (entry, needle) in [
        (
            "[[slos]]\nname = \"x\"\ntype = \"api.request\"\ngood = \"nope < 1\"\nobjective = 0.9\nwindow = \"1d\"\n",
            "good:",
        ),
        (
            "[[slos]]\nname = \"x\"\ntype = \"api.request\"\ngood = \"status_code < 500\"\nobjective = 1.5\nwindow = \"1d\"\n",
            "objective:",
        ),
    ] {
        let file = tempfile::NamedTempFile::new().expect("config");
        std::fs::write(file.path(), entry).expect("write");
        let dir = tempfile::tempdir().expect("dir");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meterd"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(file.path())
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .expect("run meterd");
        assert_eq!(out.status.code(), Some(2), "{entry}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("slos[0]") && stderr.contains(needle),
            "{stderr}"
        );
    }
}

/// The SLO counters evaluate each filter in meterd, event by event; `GET /v1/slos` counts with
/// SQL in the store. Over events with missing (NULL) columns and filters using every operator,
/// both count the same valid and good events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slo_counters_evaluate_filters_as_the_store_does() {
    let goods = [
        "route IN ('/a', '/b')",
        "route NOT IN ('/a')",
        "NOT (route = '/a')",
        "route = '/a' OR status_code >= 500",
        "route = '/a' AND status_code < 500",
        "route < '/b'",
        "route >= '/B'",
        "latency_ms BETWEEN 100 AND 200",
        "latency_ms NOT BETWEEN 100 AND 200",
        "method IS NULL",
        "NOT (method IS NOT NULL AND route = '/a')",
        "method >= 'HEAD'",
        "status_code = 200 OR NOT (latency_ms > 150)",
    ];
    let mut config = String::new();
    for (i, good) in goods.iter().enumerate() {
        config.push_str(&format!(
            "[[slos]]\nname = \"f{i}\"\ntype = \"api.request\"\ngood = \"{good}\"\n\
             objective = 0.99\nwindow = \"30d\"\n{}\n",
            if i % 2 == 0 {
                "valid = \"method <> 'HEAD'\"\n"
            } else {
                ""
            }
        ));
    }
    let file = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(file.path(), config).expect("write config");
    let server = Server::start(&["--config", &path(&file)]);
    let now = Utc::now();
    let routes = [Some("/a"), Some("/b"), Some("/B"), Some("/c"), None];
    let methods = [Some("GET"), Some("HEAD"), Some("POST"), None];
    let mut events = Vec::new();
    for i in 0..400usize {
        let status = [200, 404, 500, 503][i % 4];
        let mut data = json!({ "status_code": status, "latency_ms": (i * 37) % 300 });
        if let Some(r) = routes[i % routes.len()] {
            data["route"] = json!(r);
        }
        if let Some(m) = methods[(i / 5) % methods.len()] {
            data["method"] = json!(m);
        }
        events.push(json!({
            "id": format!("f-{i}"), "tenant": "acme", "type": "api.request",
            "time": rfc3339(now - chrono::Duration::minutes(1 + (i % 50) as i64)), "data": data
        }));
    }
    assert_eq!(server.post_ndjson(&events).await.accepted(), 400);
    let answer = slos(&server, "").await;
    let text = crate::metrics::scrape(&server).await;
    let counter = |name: &str, kind: &str| -> u64 {
        let line = format!(r#"meterd_slo_events_total{{kind="{kind}",slo="{name}",tenant=""}}"#);
        text.lines()
            .find_map(|l| l.strip_prefix(&line)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{line} in\n{text}"))
    };
    for (i, good) in goods.iter().enumerate() {
        let name = format!("f{i}");
        let stored = by_name(&answer, &name, None);
        let (valid, good_events) = (counter(&name, "valid"), counter(&name, "good"));
        assert_eq!(
            (Some(valid), Some(good_events)),
            (
                stored["valid_events"].as_u64(),
                stored["good_events"].as_u64()
            ),
            "{name}: {good}"
        );
        // Neither side is trivial: some events are good, some are not.
        assert!(
            good_events > 0 && good_events < valid,
            "{name}: {good}: {good_events} of {valid}"
        );
    }
}

/// One api.request of [`kept_counts_answer_as_raw_events_do`].
struct Sent {
    tenant: &'static str,
    time: DateTime<Utc>,
    healthz: bool,
    status: i64,
    latency_ms: i64,
}

impl Sent {
    fn json(&self, id: &str) -> Value {
        let mut e = request(
            self.tenant,
            id,
            self.time,
            if self.healthz { "/healthz" } else { "/v1/chat" },
            self.status,
        );
        e["data"]["latency_ms"] = json!(self.latency_ms);
        e
    }
}

/// Whole hours of an SLO's window are kept counted in memory and only the rest read from the
/// store: the answers still equal counts over the raw events, worked out here from what was
/// sent, before and after late events land in kept hours, once those are counted again, and
/// after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_counts_answer_as_raw_events_do() {
    const KEPT: &str = r#"
[[slos]]
name = "kept-api"
type = "api.request"
good = "status_code < 500"
valid = "route <> '/healthz'"
objective = 0.99
window = "3d"

[[slos]]
name = "kept-per-tenant"
type = "api.request"
good = "latency_ms <= 100"
objective = 0.9
window = "1d"
per_tenant = true

[[slos]]
name = "kept-acme"
type = "api.request"
good = "status_code < 500"
objective = 0.99
window = "2d"
tenant = "acme"
"#;
    let file = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(file.path(), KEPT).expect("write config");
    let mut server = Server::start(&["--config", &path(&file)]);
    let now = Utc::now();
    let tenants = ["acme", "initech", "umbrella"];
    let event = |i: i64, ago: i64| Sent {
        tenant: tenants[(i % 3) as usize],
        time: now - chrono::Duration::minutes(ago),
        healthz: i % 7 == 0,
        status: [200, 200, 503, 200, 500, 404][(i % 6) as usize],
        latency_ms: (i * 37) % 200,
    };
    // Every 23 minutes over three days, and a few in the last minutes.
    let mut sent: Vec<Sent> = (0..200i64)
        .map(|i| event(i, if i < 10 { i } else { 20 + i * 23 }))
        .collect();
    let post = |events: &[Sent], prefix: &str| {
        events
            .iter()
            .enumerate()
            .map(|(i, e)| e.json(&format!("{prefix}-{i}")))
            .collect::<Vec<_>>()
    };
    let first = post(&sent, "a");
    assert_eq!(
        server.post_ndjson(&first).await.accepted(),
        first.len() as u64
    );

    // The counts of each window (the SLO's, then 5m .. 3d) over `sent`, as the store would:
    // each ends at `end` (a whole minute) and starts its length before, at a whole minute, or
    // at a whole hour for a day or more.
    let windows = [1_440 * 3, 5, 30, 60, 120, 360, 1_440, 4_320];
    let expected = |sent: &[Sent],
                    end: DateTime<Utc>,
                    window_0: i64,
                    tenant: Option<&str>,
                    good: &dyn Fn(&Sent) -> bool,
                    valid: &dyn Fn(&Sent) -> bool| {
        let mut w = windows;
        w[0] = window_0;
        w.map(|minutes| {
            let unit = if minutes >= 1_440 { 3_600 } else { 60 };
            let from = (end - chrono::Duration::minutes(minutes)).timestamp();
            let from =
                DateTime::<Utc>::from_timestamp(from - from.rem_euclid(unit), 0).expect("a time");
            let counted: Vec<&Sent> = sent
                .iter()
                .filter(|e| e.time >= from && e.time < end)
                .filter(|e| tenant.is_none_or(|t| t == e.tenant) && valid(e))
                .collect();
            (
                counted.len() as u64,
                counted.iter().filter(|e| good(e)).count() as u64,
            )
        })
    };
    // `only`: the answer asked for one tenant's SLOs.
    let check = |answer: &Value, sent: &[Sent], only: Option<&str>| {
        let end = |s: &Value| -> DateTime<Utc> {
            s["window_end"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .unwrap_or_else(|| panic!("window_end in {s}"))
                .with_timezone(&Utc)
        };
        // An answer, its windows' (valid, good) counts, and the share of bad events allowed.
        type Case<'a> = (&'a Value, [(u64, u64); 8], f64);
        let mut cases: Vec<Case> = Vec::new();
        if only.is_none() {
            let api = by_name(answer, "kept-api", None);
            cases.push((
                api,
                expected(sent, end(api), 4_320, None, &|e| e.status < 500, &|e| {
                    !e.healthz
                }),
                0.01,
            ));
        }
        let acme = by_name(answer, "kept-acme", Some("acme"));
        cases.push((
            acme,
            expected(
                sent,
                end(acme),
                2_880,
                Some("acme"),
                &|e| e.status < 500,
                &|_| true,
            ),
            0.01,
        ));
        for t in tenants.iter().filter(|t| only.is_none_or(|o| o == **t)) {
            let s = by_name(answer, "kept-per-tenant", Some(t));
            cases.push((
                s,
                expected(
                    sent,
                    end(s),
                    1_440,
                    Some(t),
                    &|e| e.latency_ms <= 100,
                    &|_| true,
                ),
                0.1,
            ));
        }
        for (s, counts, allowed) in cases {
            // The window counted, as the answer states it.
            let start =
                DateTime::parse_from_rfc3339(s["window_start"].as_str().unwrap_or_default())
                    .expect("window_start");
            assert_eq!(start.timestamp() % 3_600, 0, "{s}");
            assert_eq!(end(s).timestamp() % 60, 0, "{s}");
            assert_eq!(
                (s["valid_events"].as_u64(), s["good_events"].as_u64()),
                (Some(counts[0].0), Some(counts[0].1)),
                "{s}"
            );
            for ((window, _), (valid, good)) in meterd_slo::BURN_WINDOWS.iter().zip(&counts[1..]) {
                let rate = if *valid == 0 {
                    0.0
                } else {
                    (valid - good) as f64 / *valid as f64 / allowed
                };
                assert!(
                    close(&s["burn_rates"][*window], rate),
                    "{window}: {} against {rate} ({good} of {valid}) in {s}",
                    s["burn_rates"][*window]
                );
            }
        }
    };
    // Until every whole hour of both windows is kept (one refresh counts them all).
    async fn wait_kept(server: &Server) {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let text = crate::metrics::scrape(server).await;
            let kept = |slo: &str| {
                text.lines()
                    .find_map(|l| {
                        l.strip_prefix(&format!("meterd_slo_kept_seconds{{slo=\"{slo}\"}} "))?
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            // Three days back to the hours read from the minutes' counts (7 hours on a new
            // store), at least.
            if ["kept-api", "kept-per-tenant", "kept-acme"]
                .iter()
                .all(|s| kept(s) >= 64 * 3_600)
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "SLO hours not kept after 90 s:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    wait_kept(&server).await;
    check(&slos(&server, "").await, &sent, None);
    // One tenant: its entry of the per-tenant SLO and its own SLO, counted alike.
    let acme = slos(&server, "?tenant=acme").await;
    assert_eq!(acme["slos"].as_array().map(Vec::len), Some(2), "{acme}");
    check(&acme, &sent, Some("acme"));

    // Late events into kept hours (bad ones, so each moves a burn rate): counted at once.
    let late: Vec<Sent> = (0..40i64)
        .map(|i| Sent {
            status: 500,
            latency_ms: 150,
            ..event(i, 200 + i * 97)
        })
        .collect();
    assert_eq!(
        server.post_ndjson(&post(&late, "late")).await.accepted(),
        late.len() as u64
    );
    sent.extend(late);
    check(&slos(&server, "").await, &sent, None);
    // Once those hours are counted again (every 10 s), and after a restart.
    tokio::time::sleep(Duration::from_secs(12)).await;
    check(&slos(&server, "").await, &sent, None);
    // Now every window is read from memory: a request runs no statement in the store (a
    // background count may run beside one, so a few tries).
    let statements = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("meterd_sql_queries_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let mut from_memory = false;
    for _ in 0..5 {
        let before = statements(&crate::metrics::scrape(&server).await);
        check(&slos(&server, "").await, &sent, None);
        if statements(&crate::metrics::scrape(&server).await) == before {
            from_memory = true;
            break;
        }
    }
    assert!(
        from_memory,
        "every GET /v1/slos ran statements in the store"
    );
    server.stop();
    server.restart();
    wait_kept(&server).await;
    check(&slos(&server, "").await, &sent, None);
}
