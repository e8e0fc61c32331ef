//! Billing end to end: meters, the price book and plans from the config file, invoices over
//! the events meterd stored, on the embedded store, PostgreSQL and ClickHouse.

use crate::common;

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use chrono_tz::Tz;
use common::ch::{self, PrivateClickHouse};
use common::pg::{self, TestDb};
use common::{Server, rfc3339};
use meterd_billing::Period;
use reqwest::StatusCode;
use serde_json::{Value, json};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(180);

/// The billing sections of the config file: every aggregation and every charge model.
const BILLING: &str = r#"
[[prices]]
provider = "openai"
model = "gpt-4o"
effective_from = "2020-01-01T00:00:00Z"
input_per_million = "2.50"
output_per_million = "10.00"
cached_input_per_million = "1.25"
cache_write_per_million = "3.125"

[[prices]]
provider = "anthropic"
model = "claude-sonnet"
effective_from = "2020-01-01T00:00:00Z"
input_per_million = "3.00"
output_per_million = "15.00"
cached_input_per_million = "0.30"
cache_write_per_million = "3.75"

[[meters]]
name = "agent_runs"
type = "agent.run"
aggregation = "count"
filter = "status = 'succeeded' AND agent <> 'test'"

[[meters]]
name = "agent_steps"
type = "agent.run"
aggregation = "sum"
field = "steps"
group_by = ["agent", "status"]

[[meters]]
name = "active_agents"
type = "agent.run"
aggregation = "unique_count"
field = "agent"

[[meters]]
name = "peak_tool_calls"
type = "agent.run"
aggregation = "max"
field = "tool_calls"

[[meters]]
name = "last_duration"
type = "agent.run"
aggregation = "latest"
field = "duration_ms"

# Quotes and a backslash, which each store writes its own way.
[[meters]]
name = "quoted_agents"
type = "agent.run"
aggregation = "count"
filter = "agent = 'o''reilly\\path' OR agent IN ('x''y')"

# NOT IN and a negated OR over columns that can be NULL: unknown is neither true nor false.
[[meters]]
name = "not_support"
type = "agent.run"
aggregation = "count"
filter = "agent NOT IN ('support', 'billing') OR NOT (status = 'failed' OR steps > 30)"

[[plans]]
name = "pro"
currency = "USD"
base_fee = "49.00"
minimum = "100.00"
[[plans.charges]]
meter = "agent_runs"
model = "graduated"
tiers = [{ up_to = 5, unit_price = "0" }, { up_to = 20, unit_price = "0.75" }, { unit_price = "0.333" }]
[[plans.charges]]
meter = "agent_steps"
model = "package"
package_size = 10
package_price = "0.15"
included = 5
[[plans.charges]]
meter = "active_agents"
model = "per_unit"
unit_price = "2.00"
[[plans.charges]]
meter = "peak_tool_calls"
model = "volume"
tiers = [{ up_to = 3, unit_price = "0.10" }, { unit_price = "0.05", flat_price = "1.00" }]
[[plans.charges]]
meter = "last_duration"
model = "per_unit"
unit_price = "0.001"
[[plans.charges]]
meter = "quoted_agents"
model = "per_unit"
unit_price = "0.01"
[[plans.charges]]
meter = "not_support"
model = "per_unit"
unit_price = "0.01"
[[plans.charges]]
model = "llm_cost"
markup = "0.20"

[[customers]]
tenant = "acme"
plan = "pro"
timezone = "America/Sao_Paulo"

[[customers]]
tenant = "initech"
plan = "pro"
timezone = "Asia/Kolkata"

[[credits]]
tenant = "acme"
amount = "25.00"
priority = 1
"#;

fn config_file(extra: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(file.path(), format!("{extra}\n{BILLING}")).expect("write config");
    file
}

fn path(f: &tempfile::NamedTempFile) -> String {
    f.path().display().to_string()
}

/// The last whole calendar month before now in `tz`: its `YYYY-MM`, its first instant and the
/// first instant after it.
fn last_month(tz: Tz) -> (String, DateTime<Utc>, DateTime<Utc>) {
    let now = Utc::now().with_timezone(&tz);
    let (y, m) = if now.month() == 1 {
        (now.year() - 1, 12)
    } else {
        (now.year(), now.month() - 1)
    };
    let start = tz
        .with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .earliest()
        .expect("local midnight")
        .with_timezone(&Utc);
    let end = tz
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .earliest()
        .expect("local midnight")
        .with_timezone(&Utc);
    (format!("{y:04}-{m:02}"), start, end)
}

/// An agent run; `counts` are its steps, tool calls and duration in milliseconds.
fn agent_run(
    tenant: &str,
    id: &str,
    time: DateTime<Utc>,
    agent: &str,
    status: &str,
    counts: [i64; 3],
) -> Value {
    json!({
        "id": id, "tenant": tenant, "type": "agent.run", "time": rfc3339(time),
        "data": {"agent": agent, "run_id": id, "status": status, "duration_ms": counts[2],
                 "steps": counts[0], "tool_calls": counts[1]}
    })
}

fn llm(
    tenant: &str,
    id: &str,
    time: DateTime<Utc>,
    provider: &str,
    model: &str,
    tokens: [i64; 4],
) -> Value {
    json!({
        "id": id, "tenant": tenant, "type": "llm.usage", "time": rfc3339(time),
        "data": {"provider": provider, "model": model, "input_tokens": tokens[0],
                 "output_tokens": tokens[1], "cached_input_tokens": tokens[2],
                 "cache_write_input_tokens": tokens[3], "reasoning_tokens": 0,
                 "latency_ms": 100, "status": "ok"}
    })
}

async fn get(server: &Server, path: &str) -> (StatusCode, String) {
    let response = reqwest::get(format!("{}{path}", server.url))
        .await
        .expect("request");
    let status = response.status();
    (status, response.text().await.expect("body"))
}

async fn invoice(server: &Server, tenant: &str, period: &str) -> Value {
    let (status, body) = get(
        server,
        &format!("/v1/invoices?tenant={tenant}&period={period}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).expect("invoice JSON")
}

async fn usage(server: &Server, query: &str) -> Value {
    let (status, body) = get(server, &format!("/v1/usage?{}", query.replace('+', "%2B"))).await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    serde_json::from_str(&body).expect("usage JSON")
}

fn amount(invoice: &Value, charge: &str) -> String {
    invoice["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .filter(|l| l["charge"] == charge)
        .map(|l| l["amount"].as_str().expect("amount").to_owned())
        .next()
        .unwrap_or_else(|| panic!("no line {charge} in {invoice}"))
}

/// The invoice of a month in São Paulo time from events at its edges, every charge model
/// worked out by hand, on the embedded store with the README's defaults otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_counts_the_month_in_the_customers_zone() {
    let cfg = config_file("");
    let server = Server::start(&["--config", &path(&cfg), "--close-grace-hours", "0"]);
    let tz = Tz::America__Sao_Paulo;
    let (period, start, end) = last_month(tz);
    let ms = chrono::Duration::milliseconds;
    let mut events = vec![
        // In: the first instant and the last millisecond of the month, local time.
        agent_run(
            "acme",
            "r-first",
            start,
            "support",
            "succeeded",
            [12, 2, 900],
        ),
        agent_run(
            "acme",
            "r-last",
            end - ms(1),
            "support",
            "succeeded",
            [3, 7, 1500],
        ),
        // Out: a millisecond before, and the first instant of the next month.
        agent_run(
            "acme",
            "r-before",
            start - ms(1),
            "support",
            "succeeded",
            [100, 100, 1],
        ),
        agent_run(
            "acme",
            "r-after",
            end,
            "support",
            "succeeded",
            [100, 100, 1],
        ),
        // Counted by steps, agents, tools and duration, but not as a billable run.
        agent_run(
            "acme",
            "r-failed",
            start + ms(10),
            "billing",
            "failed",
            [4, 1, 50],
        ),
        agent_run(
            "acme",
            "r-test",
            start + ms(20),
            "test",
            "succeeded",
            [1, 1, 10],
        ),
        // Another tenant.
        agent_run(
            "globex",
            "r-other",
            start + ms(30),
            "support",
            "succeeded",
            [1000, 1000, 1],
        ),
        llm(
            "acme",
            "l-1",
            start + ms(40),
            "openai",
            "gpt-4o",
            [1_000_000, 200_000, 400_000, 80_000],
        ),
        llm(
            "acme",
            "l-2",
            end - ms(2),
            "anthropic",
            "claude-sonnet",
            [10_000, 5_000, 100_000, 0],
        ),
    ];
    for i in 0..20 {
        events.push(agent_run(
            "acme",
            &format!("r-{i}"),
            start + chrono::Duration::hours(i + 1),
            "support",
            "succeeded",
            [1, 0, 100],
        ));
    }
    assert_eq!(server.post_ndjson(&events).await.accepted(), 29);

    let inv = invoice(&server, "acme", &period).await;
    assert_eq!(inv["period"], json!(period));
    assert_eq!(inv["timezone"], "America/Sao_Paulo");
    assert_eq!(inv["status"], "draft");
    assert_eq!(inv["currency"], "USD");
    // 22 billable runs: 5 free, 15 at 0.75 (11.25), 2 at 0.333 (0.666): 11.916 -> 11.92.
    assert_eq!(amount(&inv, "agent_runs"), "11.92");
    // 12 + 3 + 4 + 1 + 20 = 40 steps, 5 included: 35 -> 4 packages of 10 at 0.15.
    assert_eq!(amount(&inv, "agent_steps"), "0.60");
    // support, billing, test: 3 agents at 2.00.
    assert_eq!(amount(&inv, "active_agents"), "6.00");
    // Peak 7 tool calls: the second tier, 7 x 0.05 + 1.00.
    assert_eq!(amount(&inv, "peak_tool_calls"), "1.35");
    // The latest run is r-last (1500 ms) at 0.001.
    assert_eq!(amount(&inv, "last_duration"), "1.50");
    // gpt-4o: 2.50 + 2.00 + 0.50 + 0.25 = 5.25, +20% = 6.30.
    // claude-sonnet: 0.03 + 0.075 + 0.03 = 0.135, +20% = 0.162 -> 0.16.
    let llm_lines: Vec<&Value> = inv["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .filter(|l| l["model"] == "llm_cost")
        .collect();
    let by_model: Vec<(String, String)> = llm_lines
        .iter()
        .map(|l| {
            (
                l["llm"]["model"].as_str().expect("model").to_owned(),
                l["amount"].as_str().expect("amount").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        by_model,
        [
            ("claude-sonnet".to_owned(), "0.16".to_owned()),
            ("gpt-4o".to_owned(), "6.30".to_owned())
        ]
    );
    // Not support nor billing (r-test), or neither failed nor over 30 steps (the 22 support
    // runs): 23 at 0.01.
    assert_eq!(amount(&inv, "not_support"), "0.23");
    // 49 + 11.92 + 0.60 + 6.00 + 1.35 + 1.50 + 0.23 + 0.16 + 6.30 = 77.06, raised to 100,
    // less 25.
    assert_eq!(inv["subtotal"], "77.06");
    assert_eq!(inv["minimum_adjustment"], "22.94");
    assert_eq!(inv["credits_applied"][0]["amount"], "25.00");
    assert_eq!(inv["total"], "75.00");
    let meters = &inv["inputs"]["meters"];
    assert_eq!(
        meters[0],
        json!({"meter": "agent_runs", "events": 22, "value": "22"})
    );
    assert_eq!(inv["inputs"]["source"], "embedded");

    // The same invoice's lines as CSV.
    let (status, csv) = get(
        &server,
        &format!("/v1/invoices?tenant=acme&period={period}&format=csv"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{csv}");
    assert_eq!(
        csv.lines().count(),
        1 + inv["lines"].as_array().map_or(0, Vec::len)
    );
    assert!(
        csv.contains(",agent_runs,graduated,agent_runs,,,22,0,22,,11.92"),
        "{csv}"
    );

    // Meters, and what a bad request is told.
    let (status, body) = get(&server, "/v1/meters").await;
    assert_eq!(status, StatusCode::OK);
    let listed: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        listed["meters"][0]["filter"],
        "(status = 'succeeded') AND (agent <> 'test')"
    );
    assert_eq!(listed["meters"].as_array().map(Vec::len), Some(7));
    assert_eq!(
        listed["meters"][5]["filter"],
        "(agent = 'o''reilly\\path') OR (agent IN ('x''y'))"
    );
    assert_eq!(amount(&inv, "quoted_agents"), "0.00");
    for (query, status, needle) in [
        (
            // Without a tenant: the invoice run of every customer, which needs a period too.
            "format=csv",
            StatusCode::BAD_REQUEST,
            "period: required",
        ),
        ("tenant=acme", StatusCode::BAD_REQUEST, "period: required"),
        (
            "tenant=acme&period=2026-13",
            StatusCode::BAD_REQUEST,
            "period:",
        ),
        (
            "tenant=acme&period=2026-10&format=xml",
            StatusCode::BAD_REQUEST,
            "format:",
        ),
        (
            "tenant=nobody&period=2026-10",
            StatusCode::NOT_FOUND,
            "not a customer",
        ),
    ] {
        let (got, body) = get(&server, &format!("/v1/invoices?{query}")).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body.contains(needle), "{query}: {body}");
    }

    // A preview under other prices changes the LLM lines and nothing else, and no later
    // invoice.
    let preview = reqwest::Client::new()
        .post(format!("{}/v1/invoices/preview", server.url))
        .json(&json!({
            "tenant": "acme",
            "period": period,
            "prices": [{"provider": "openai", "model": "gpt-4o",
                        "effective_from": "2020-01-01T00:00:00Z",
                        "input_per_million": "1.00", "output_per_million": "1.00"},
                       {"provider": "anthropic", "model": "claude-sonnet",
                        "effective_from": "2020-01-01T00:00:00Z",
                        "input_per_million": "0", "output_per_million": "0"}]
        }))
        .send()
        .await
        .expect("preview");
    assert_eq!(preview.status(), StatusCode::OK);
    let preview: Value = preview.json().await.expect("json");
    assert_eq!(preview["status"], "preview");
    // gpt-4o: (1,000,000 + 200,000 + 400,000 + 80,000) x 1.00 / 1M = 1.68, +20% = 2.016.
    assert_eq!(amount(&preview, "agent_runs"), "11.92");
    let preview_llm: Vec<&str> = preview["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .filter(|l| l["model"] == "llm_cost")
        .filter_map(|l| l["amount"].as_str())
        .collect();
    assert_eq!(preview_llm, ["0.00", "2.02"]);
    assert_eq!(invoice(&server, "acme", &period).await, inv);
}

/// The same month of events gives the same invoices, to the byte apart from naming its
/// source, from the embedded store, PostgreSQL and ClickHouse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_month_gives_the_same_invoice_on_every_store() {
    use rand::{Rng, SeedableRng};

    let clickhouse = PrivateClickHouse::start();
    let url = clickhouse.url();
    let db = ch::database("billing");
    let pgdb = TestDb::create("billing").await;
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
        "--close-grace-hours",
        "0",
    ]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut events = Vec::new();
    for (tenant, tz) in [
        ("acme", Tz::America__Sao_Paulo),
        ("initech", Tz::Asia__Kolkata),
    ] {
        let (_, start, end) = last_month(tz);
        // A day on either side, so the zone's edges matter.
        let from = start - chrono::Duration::days(1);
        let span = (end - from).num_milliseconds() + 86_400_000;
        for i in 0..1_500 {
            let t = from + chrono::Duration::milliseconds(rng.random_range(0..span));
            if t >= Utc::now() - chrono::Duration::seconds(5) {
                continue;
            }
            let id = format!("{tenant}-{i}");
            if rng.random_bool(0.5) {
                let agent =
                    ["support", "billing", "test", "o'reilly\\path"][rng.random_range(0..4)];
                let status = ["succeeded", "failed", "succeeded"][rng.random_range(0..3)];
                let mut run = agent_run(
                    tenant,
                    &id,
                    t,
                    agent,
                    status,
                    [
                        rng.random_range(0..40),
                        rng.random_range(0..12),
                        rng.random_range(1..100_000),
                    ],
                );
                // Optional fields left out, so filters meet NULLs on every store.
                if let Some(data) = run["data"].as_object_mut() {
                    for field in ["agent", "status", "steps"] {
                        if rng.random_bool(0.15) {
                            data.remove(field);
                        }
                    }
                }
                events.push(run);
            } else {
                let (provider, model) =
                    [("openai", "gpt-4o"), ("anthropic", "claude-sonnet")][rng.random_range(0..2)];
                events.push(llm(
                    tenant,
                    &id,
                    t,
                    provider,
                    model,
                    [
                        rng.random_range(0..200_000),
                        rng.random_range(0..50_000),
                        rng.random_range(0..400_000),
                        rng.random_range(0..20_000),
                    ],
                ));
            }
        }
    }
    let accepted = writer.post_ndjson(&events).await.accepted();
    assert_eq!(accepted, events.len() as u64);
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

    let pg_only = config_file("");
    let from_postgres = Server::start(&[
        "--config",
        &path(&pg_only),
        "--postgres-url",
        &pgdb.url,
        "--sql-source",
        "postgres",
        "--close-grace-hours",
        "0",
    ]);
    let ch_only = config_file(&ch_section);
    let from_clickhouse = Server::start(&[
        "--config",
        &path(&ch_only),
        "--sql-source",
        "clickhouse",
        "--close-grace-hours",
        "0",
    ]);
    // Windowed usage: every aggregation, zones with a clock change and a half hour, NULL
    // groups, every tenant at once.
    let (_, start, end) = last_month(Tz::America__Sao_Paulo);
    let (from, to) = (
        rfc3339(start - chrono::Duration::days(1)),
        rfc3339(end + chrono::Duration::days(1)),
    );
    let day_after = rfc3339(start + chrono::Duration::days(1));
    let asks = [
        format!(
            "meter=agent_steps&tenant=acme&from={from}&to={to}&window=day&tz=America/Sao_Paulo&group_by=agent,status"
        ),
        format!(
            "meter=active_agents&tenant=initech&from={from}&to={to}&window=hour&tz=Asia/Kolkata"
        ),
        format!(
            "meter=last_duration&from={from}&to={to}&window=month&tz=Asia/Kolkata&group_by=tenant"
        ),
        format!("meter=peak_tool_calls&from={from}&to={day_after}&window=minute&tz=Asia/Kolkata"),
        format!("meter=not_support&from={from}&to={to}&group_by=tenant"),
        format!(
            "meter=agent_runs&tenant=acme&from={from}&to={to}&window=hour&tz=America/Sao_Paulo"
        ),
    ];
    for ask in &asks {
        let ask = ask.replace('+', "%2B");
        let mut answers = Vec::new();
        for server in [&writer, &from_postgres, &from_clickhouse] {
            let (status, body) = get(server, &format!("/v1/usage?{ask}")).await;
            assert_eq!(status, StatusCode::OK, "{ask}: {body}");
            let mut answer: Value = serde_json::from_str(&body).expect("usage JSON");
            answer["source"] = json!("any");
            answers.push(answer);
        }
        let data = answers[0]["data"].as_array().expect("data");
        assert!(!data.is_empty(), "{ask}: no data");
        assert_eq!(
            answers[1], answers[0],
            "PostgreSQL and the embedded store: {ask}"
        );
        assert_eq!(
            answers[2], answers[0],
            "ClickHouse and the embedded store: {ask}"
        );
    }
    // The windows of a range add up to the range's value.
    let total = |v: &Value| -> (u64, u64) {
        v["data"]
            .as_array()
            .expect("data")
            .iter()
            .fold((0, 0), |(e, s), row| {
                (
                    e + row["events"].as_u64().expect("events"),
                    s + row["value"]
                        .as_str()
                        .expect("value")
                        .parse::<u64>()
                        .expect("sum"),
                )
            })
    };
    let windowed = usage(
        &from_clickhouse,
        &format!("meter=agent_steps&tenant=acme&from={from}&to={to}&window=hour&tz=Asia/Kolkata"),
    )
    .await;
    let whole = usage(
        &from_postgres,
        &format!("meter=agent_steps&tenant=acme&from={from}&to={to}"),
    )
    .await;
    assert_eq!(total(&windowed), total(&whole));
    assert_eq!(whole["data"].as_array().map(Vec::len), Some(1));

    for (tenant, tz) in [
        ("acme", Tz::America__Sao_Paulo),
        ("initech", Tz::Asia__Kolkata),
    ] {
        let (period, _, _) = last_month(tz);
        let mut embedded = invoice(&writer, tenant, &period).await;
        let mut postgres = invoice(&from_postgres, tenant, &period).await;
        let mut clickhouse = invoice(&from_clickhouse, tenant, &period).await;
        assert_eq!(embedded["inputs"]["source"], "embedded");
        assert_eq!(postgres["inputs"]["source"], "postgres");
        assert_eq!(clickhouse["inputs"]["source"], "clickhouse");
        for inv in [&mut embedded, &mut postgres, &mut clickhouse] {
            inv["inputs"]["source"] = json!("any");
        }
        // Every meter counted something, so the comparison covers every aggregation.
        for m in embedded["inputs"]["meters"].as_array().expect("meters") {
            assert!(m["events"].as_u64() > Some(0), "{m}");
        }
        assert_eq!(
            embedded["inputs"]["prices"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(
            postgres, embedded,
            "PostgreSQL and the embedded store, {tenant}"
        );
        assert_eq!(
            clickhouse, embedded,
            "ClickHouse and the embedded store, {tenant}"
        );
    }
    // The invoice run reads every customer's usage at once, and gives each the invoice it gets
    // alone.
    let (period, _, _) = last_month(Tz::America__Sao_Paulo);
    for server in [&writer, &from_postgres, &from_clickhouse] {
        let (status, body) = get(server, &format!("/v1/invoices?period={period}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let run: Value = serde_json::from_str(&body).expect("run JSON");
        assert_eq!(run["errors"], json!([]));
        let invoices = run["invoices"].as_array().expect("invoices");
        assert_eq!(invoices.len(), 2);
        for (i, tenant) in ["acme", "initech"].into_iter().enumerate() {
            assert_eq!(
                invoices[i],
                invoice(server, tenant, &period).await,
                "{tenant}"
            );
        }
        let (status, csv) = get(server, &format!("/v1/invoices?period={period}&format=csv")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            csv.matches("tenant,period,currency").count(),
            1,
            "one header"
        );
        assert!(
            csv.contains("\nacme,") && csv.contains("\ninitech,"),
            "{csv}"
        );
    }
}

/// A billing entry that cannot be used stops `meterd serve` before it listens, with exit code
/// 2 and a message naming the entry.
#[test]
fn bad_billing_configuration_stops_startup_naming_the_entry() {
    for (patch, message) in [
        (
            "[[plans]]\nname = \"x\"\ncurrency = \"USD\"\n[[plans.charges]]\nmeter = \"nope\"\n\
             model = \"per_unit\"\nunit_price = \"1\"\n",
            "billing: plans[0] (x): charges[0]: meter \"nope\" is not defined",
        ),
        (
            "[[plans]]\nname = \"x\"\ncurrency = \"USD\"\n[[plans.charges]]\n\
             meter = \"agent_runs\"\nmodel = \"volume\"\ntiers = [{ up_to = 10, unit_price = \"1\" }, \
             { up_to = 5, unit_price = \"1\" }, { unit_price = \"1\" }]\n",
            "billing: plans[0] (x): charges[0]: tiers[1] up_to 5 overlaps",
        ),
        (
            "[[customers]]\ntenant = \"z\"\nplan = \"pro\"\ntimezone = \"Europe/Atlantis\"\n",
            "billing: customers[0] (z): timezone \"Europe/Atlantis\" is not an IANA zone",
        ),
        (
            "[[meters]]\nname = \"m\"\ntype = \"api.request\"\naggregation = \"count\"\n\
             filter = \"colour = 'red'\"\n",
            "billing: meters[0] (m): filter: events has no column \"colour\"",
        ),
        (
            "[[meters]]\nname = \"m\"\ntype = \"api.request\"\naggregation = \"count\"\n\
             filter = \"route IN (SELECT route FROM events)\"\n",
            "billing: meters[0] (m): filter: subqueries are not allowed",
        ),
    ] {
        let file = config_file(patch);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meterd"))
            .args(["serve", "--config", &path(&file), "--listen", "127.0.0.1:0"])
            .output()
            .expect("run meterd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{patch}: {stderr}");
        assert!(
            stderr.contains(message),
            "{patch}: expected {message:?} in {stderr}"
        );
        assert!(out.stdout.is_empty(), "{patch}: nothing listens");
    }
    // A price written as a TOML number is refused while reading the file, naming the key.
    let file = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(
        file.path(),
        BILLING.replace(
            "output_per_million = \"10.00\"",
            "output_per_million = 10.0",
        ),
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(["serve", "--config", &path(&file), "--listen", "127.0.0.1:0"])
        .output()
        .expect("run meterd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("output_per_million") && stderr.contains("never a number"),
        "{stderr}"
    );
}

async fn get_bytes(server: &Server, path: &str) -> (StatusCode, Vec<u8>) {
    let response = reqwest::get(format!("{}{path}", server.url))
        .await
        .expect("request");
    let status = response.status();
    (status, response.bytes().await.expect("body").to_vec())
}

async fn close(server: &Server, period: &str, tenant: &str) -> Value {
    let response = reqwest::Client::new()
        .post(format!(
            "{}/v1/periods/{period}/close?tenant={tenant}",
            server.url
        ))
        .send()
        .await
        .expect("close");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("json")
}

/// Close a month, then send events late for it: the closed invoice stays byte-identical, the
/// next open invoice carries the difference as an adjustment naming the closed month, the
/// credit the closed invoice used is gone, and a restart in between changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_invoice_never_changes_and_late_events_adjust_the_next_one() {
    let cfg = config_file("");
    let mut server = Server::start(&["--config", &path(&cfg), "--close-grace-hours", "0"]);
    let tz = Tz::America__Sao_Paulo;
    let (period, start, end) = last_month(tz);
    let runs = |from: i64, to: i64| -> Vec<Value> {
        (from..to)
            .map(|i| {
                agent_run(
                    "acme",
                    &format!("r-{i}"),
                    start + chrono::Duration::hours(i + 1),
                    "support",
                    "succeeded",
                    [1, 0, 100],
                )
            })
            .collect()
    };
    assert_eq!(server.post_ndjson(&runs(0, 10)).await.accepted(), 10);
    let draft = invoice(&server, "acme", &period).await;
    let closing = close(&server, &period, "acme").await;
    assert_eq!(closing["closed"], json!(["acme"]));
    assert_eq!(
        close(&server, &period, "acme").await["already_closed"],
        json!(["acme"])
    );
    // The current month has not ended: it stays open.
    let current = Period::containing(Utc::now(), tz).to_string();
    assert_eq!(
        close(&server, &current, "acme").await["not_ended"],
        json!(["acme"])
    );

    let (status, closed) = get_bytes(
        &server,
        &format!("/v1/invoices?tenant=acme&period={period}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let closed_json: Value = serde_json::from_slice(&closed).expect("json");
    assert_eq!(closed_json["status"], "closed");
    assert!(closed_json["closed_at"].is_string());
    // Closing (which reads usage for every tenant it closes at once) froze what the draft of
    // the tenant alone said.
    let mut frozen = closed_json.clone();
    frozen["status"] = json!("draft");
    if let Some(o) = frozen.as_object_mut() {
        o.remove("closed_at");
    }
    assert_eq!(frozen, draft);
    // 10 runs: 5 free, 5 at 0.75.
    assert_eq!(amount(&closed_json, "agent_runs"), "3.75");
    assert_eq!(closed_json["credits_applied"][0]["amount"], "25.00");

    // Late events for the closed month, and one just inside its end.
    let mut late = runs(10, 40);
    late.push(agent_run(
        "acme",
        "r-edge",
        end - chrono::Duration::milliseconds(1),
        "support",
        "succeeded",
        [1, 0, 100],
    ));
    assert_eq!(server.post_ndjson(&late).await.accepted(), 31);
    let next = Period::containing(end, tz).to_string();
    let check = |server: &Server| {
        let (period, next, closed) = (period.clone(), next.clone(), closed.clone());
        let url = server.url.clone();
        async move {
            let response = reqwest::get(format!("{url}/v1/invoices?tenant=acme&period={period}"))
                .await
                .expect("request");
            assert_eq!(
                response.bytes().await.expect("body").to_vec(),
                closed,
                "the closed invoice is byte-identical"
            );
            let response = reqwest::get(format!("{url}/v1/invoices?tenant=acme&period={next}"))
                .await
                .expect("request");
            assert_eq!(response.status(), StatusCode::OK);
            let open: Value = response.json().await.expect("json");
            assert_eq!(open["status"], "draft");
            let adjustment: Vec<&Value> = open["lines"]
                .as_array()
                .expect("lines")
                .iter()
                .filter(|l| l["charge"] == "agent_runs" && l["adjusts"] == json!(period))
                .collect();
            // 41 runs rate 5 free + 15 x 0.75 + 21 x 0.333 = 18.243 -> 18.24; 3.75 was billed.
            assert_eq!(adjustment.len(), 1, "{open}");
            assert_eq!(adjustment[0]["amount"], "14.49");
            assert_eq!(adjustment[0]["quantity"], "31");
            // The closed invoice used the whole credit.
            assert_eq!(open["credits_applied"], json!([]));
            // The invoice run of every customer answers the same: the closed invoice byte for
            // byte, the open one with its adjustment.
            let run = reqwest::get(format!("{url}/v1/invoices?period={period}"))
                .await
                .expect("request")
                .bytes()
                .await
                .expect("body")
                .to_vec();
            assert!(
                run.windows(closed.len()).any(|w| w == closed.as_slice()),
                "the run holds the closed invoice verbatim: {}",
                String::from_utf8_lossy(&run)
            );
            let run: Value = reqwest::get(format!("{url}/v1/invoices?period={next}"))
                .await
                .expect("request")
                .json()
                .await
                .expect("json");
            assert_eq!(run["period"], json!(next));
            let invoices = run["invoices"].as_array().expect("invoices");
            assert_eq!(invoices.len(), 2, "acme and initech");
            assert_eq!(invoices[0], open);
            assert_eq!(invoices[1]["tenant"], "initech");
            open
        }
    };
    let before = check(&server).await;
    server.stop();
    server.restart();
    let after = check(&server).await;
    assert_eq!(before, after, "a restart changes nothing");
}

/// With a grace, a month that ended longer ago than the grace is closed without being asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_closes_itself_after_the_grace() {
    let cfg = config_file("");
    let server = Server::start(&["--config", &path(&cfg), "--close-grace-hours", "1"]);
    let tz = Tz::Asia__Kolkata;
    let (period, start, end) = last_month(tz);
    let run = agent_run("initech", "r-1", start, "support", "succeeded", [1, 0, 1]);
    assert_eq!(server.post_ndjson(&[run]).await.accepted(), 1);
    let due = Utc::now() >= end + chrono::Duration::hours(1) + chrono::Duration::seconds(5);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = invoice(&server, "initech", &period).await["status"].clone();
        if !due {
            // Within the grace of the month's end: it stays open.
            assert_eq!(status, "draft");
            break;
        }
        if status == "closed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{period} ended over an hour ago and is still {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// With PostgreSQL configured, closed invoices live there: a node that did not close the
/// period answers the same bytes as the one that did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_invoices_in_postgresql_are_the_same_on_every_node() {
    let pgdb = TestDb::create("billing_closed").await;
    let cfg = config_file("");
    let args = [
        "--config",
        &path(&cfg),
        "--postgres-url",
        &pgdb.url,
        "--sql-source",
        "postgres",
        "--close-grace-hours",
        "0",
    ];
    let first = Server::start(&args);
    let tz = Tz::America__Sao_Paulo;
    let (period, start, _) = last_month(tz);
    let run = agent_run("acme", "r-1", start, "support", "succeeded", [1, 0, 1]);
    assert_eq!(first.post_ndjson(&[run]).await.accepted(), 1);
    let client = pgdb.client().await;
    pg::wait_for(
        &client,
        "SELECT count(*) FROM meterd.events",
        1,
        DELIVERY_TIMEOUT,
    )
    .await;
    assert_eq!(
        close(&first, &period, "acme").await["closed"],
        json!(["acme"])
    );
    let second = Server::start(&args);
    let path = format!("/v1/invoices?tenant=acme&period={period}");
    let (status, from_first) = get_bytes(&first, &path).await;
    assert_eq!(status, StatusCode::OK);
    let (status, from_second) = get_bytes(&second, &path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(from_first, from_second);
    let stored = pg::int(
        &client,
        "SELECT count(*) FROM meterd.closed_invoices WHERE tenant = 'acme'",
    )
    .await;
    assert_eq!(stored, 1);
    // Closing on the other node finds it closed.
    assert_eq!(
        close(&second, &period, "acme").await["already_closed"],
        json!(["acme"])
    );
}

/// Invoices and closing need the query scope: an ingest key, bound to a tenant or not, is
/// refused. (Keys bound to a tenant cannot have the query scope yet; the handlers refuse them
/// another tenant's invoices all the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_need_the_query_scope() {
    let cfg = config_file(
        "[[api_keys]]\nname = \"analyst\"\nkey = \"qk-secret-0123456789\"\nscopes = [\"query\"]\n\
         [[api_keys]]\nname = \"acme-app\"\nkey = \"ik-acme-0123456789\"\ntenant = \"acme\"\n\
         scopes = [\"ingest\"]\n",
    );
    let server = Server::start(&["--config", &path(&cfg), "--close-grace-hours", "0"]);
    let (period, _, _) = last_month(Tz::America__Sao_Paulo);
    let status_as = |key: &'static str, post: bool, path: String| {
        let url = format!("{}{path}", server.url);
        let request = if post {
            server.client.post(url)
        } else {
            server.client.get(url)
        }
        .bearer_auth(key);
        async move { request.send().await.expect("request").status() }
    };
    let invoice = format!("/v1/invoices?tenant=acme&period={period}");
    let close = format!("/v1/periods/{period}/close?tenant=acme");
    assert_eq!(
        status_as("qk-secret-0123456789", false, invoice.clone()).await,
        StatusCode::OK
    );
    assert_eq!(
        status_as("ik-acme-0123456789", false, invoice).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_as("ik-acme-0123456789", true, close.clone()).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_as("qk-secret-0123456789", true, close).await,
        StatusCode::OK
    );
}

/// `GET /v1/usage` by the zone's clock, worked out by hand: the hour New York's clock is set
/// back is two windows, a +05:30 day starts at 18:30 UTC, the range's edges are exact, and
/// bad requests are refused naming the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_windows_follow_the_zones_clock() {
    let cfg = config_file("");
    let server = Server::start(&["--config", &path(&cfg), "--close-grace-hours", "0"]);
    let at = |s: &str| {
        DateTime::parse_from_rfc3339(s)
            .expect("instant")
            .with_timezone(&Utc)
    };
    let run = |tenant: &str, id: &str, t: &str, agent: &str, steps: i64| {
        agent_run(tenant, id, at(t), agent, "succeeded", [steps, 0, 1])
    };
    // 2026-11-01 in New York: 02:00 EDT (06:00 UTC) is 01:00 EST again.
    let events = vec![
        run("acme", "before", "2026-11-01T03:59:59.999Z", "support", 64),
        run("acme", "edt-0000", "2026-11-01T04:00:00Z", "support", 1),
        run("acme", "edt-0159", "2026-11-01T05:59:59.999Z", "support", 2),
        run("acme", "est-0100", "2026-11-01T06:00:00Z", "support", 4),
        run("acme", "est-0130", "2026-11-01T06:30:00Z", "billing", 8),
        run(
            "acme",
            "est-0259",
            "2026-11-01T07:59:59.999Z",
            "support",
            16,
        ),
        run("acme", "after", "2026-11-01T08:00:00Z", "support", 32),
        run("initech", "i-1", "2026-11-01T06:10:00Z", "support", 128),
        // 23:59:59.999 and 00:00 in Kolkata.
        run("initech", "i-2", "2026-11-01T18:29:59.999Z", "support", 256),
        run("initech", "i-3", "2026-11-01T18:30:00Z", "support", 512),
    ];
    assert_eq!(server.post_ndjson(&events).await.accepted(), 10);

    let rows = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {} {}",
                    r["window_start"].as_str().expect("start"),
                    r["window_end"].as_str().expect("end"),
                    r["group_by"],
                    r["events"],
                    r["value"].as_str().expect("value")
                )
            })
            .collect()
    };
    let range = "from=2026-11-01T04:00:00Z&to=2026-11-01T08:00:00Z";
    let hours = usage(
        &server,
        &format!(
            "meter=agent_steps&tenant=acme&{range}&window=hour&tz=America/New_York&group_by=agent"
        ),
    )
    .await;
    assert_eq!(
        rows(&hours),
        [
            r#"2026-11-01T04:00:00.000000Z 2026-11-01T05:00:00.000000Z {"agent":"support"} 1 1"#,
            r#"2026-11-01T05:00:00.000000Z 2026-11-01T06:00:00.000000Z {"agent":"support"} 1 2"#,
            r#"2026-11-01T06:00:00.000000Z 2026-11-01T07:00:00.000000Z {"agent":"billing"} 1 8"#,
            r#"2026-11-01T06:00:00.000000Z 2026-11-01T07:00:00.000000Z {"agent":"support"} 1 4"#,
            r#"2026-11-01T07:00:00.000000Z 2026-11-01T08:00:00.000000Z {"agent":"support"} 1 16"#,
        ]
    );
    assert_eq!(hours["window"], "hour");
    assert_eq!(hours["tz"], "America/New_York");
    // The day of the change is 25 hours long, cut to the range.
    let day = usage(
        &server,
        &format!("meter=agent_steps&tenant=acme&{range}&window=day&tz=America/New_York"),
    )
    .await;
    assert_eq!(
        rows(&day),
        ["2026-11-01T04:00:00.000000Z 2026-11-01T08:00:00.000000Z {} 5 31"]
    );
    // Every tenant, split by tenant, no windows.
    let tenants = usage(
        &server,
        &format!("meter=agent_steps&{range}&group_by=tenant"),
    )
    .await;
    assert_eq!(
        rows(&tenants),
        [
            r#"2026-11-01T04:00:00.000000Z 2026-11-01T08:00:00.000000Z {"tenant":"acme"} 5 31"#,
            r#"2026-11-01T04:00:00.000000Z 2026-11-01T08:00:00.000000Z {"tenant":"initech"} 1 128"#,
        ]
    );
    let kolkata = usage(
        &server,
        "meter=agent_steps&tenant=initech&from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:00Z&window=day&tz=Asia/Kolkata",
    )
    .await;
    assert_eq!(
        rows(&kolkata),
        [
            "2026-11-01T00:00:00.000000Z 2026-11-01T18:30:00.000000Z {} 2 384",
            "2026-11-01T18:30:00.000000Z 2026-11-02T18:30:00.000000Z {} 1 512",
        ]
    );

    for (query, status, names) in [
        (
            "from=2026-11-01T00:00:00Z",
            StatusCode::BAD_REQUEST,
            "meter:",
        ),
        (
            "meter=nope&from=2026-11-01T00:00:00Z",
            StatusCode::NOT_FOUND,
            "meter:",
        ),
        ("meter=agent_steps", StatusCode::BAD_REQUEST, "from:"),
        (
            "meter=agent_steps&from=yesterday",
            StatusCode::BAD_REQUEST,
            "from:",
        ),
        (
            "meter=agent_steps&from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z",
            StatusCode::BAD_REQUEST,
            "from:",
        ),
        (
            "meter=agent_steps&from=2026-11-01T00:00:00Z&window=week",
            StatusCode::BAD_REQUEST,
            "window:",
        ),
        (
            "meter=agent_steps&from=1970-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&window=minute",
            StatusCode::BAD_REQUEST,
            "window:",
        ),
        (
            "meter=agent_steps&from=2026-11-01T00:00:00Z&tz=Mars/Olympus",
            StatusCode::BAD_REQUEST,
            "tz:",
        ),
        (
            "meter=agent_steps&from=2026-11-01T00:00:00Z&group_by=model",
            StatusCode::BAD_REQUEST,
            "group_by:",
        ),
        (
            "meter=agent_runs&from=2026-11-01T00:00:00Z&group_by=agent",
            StatusCode::BAD_REQUEST,
            "group_by:",
        ),
    ] {
        let (got, body) = get(&server, &format!("/v1/usage?{query}")).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body.contains(names), "{query}: {body}");
    }
}

/// The invoice run answers every customer it can: one whose usage has a model without a price
/// is listed in `errors` with a 409 and the reason, the others' invoices are there; the CSV run,
/// which has no place for errors, is refused naming that customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invoice_run_answers_every_customer_it_can() {
    let cfg = config_file("");
    let server = Server::start(&["--config", &path(&cfg), "--close-grace-hours", "0"]);
    let (period, start, _) = last_month(Tz::America__Sao_Paulo);
    let middle = start + chrono::Duration::days(14);
    let events = vec![
        agent_run("acme", "r-1", middle, "support", "succeeded", [1, 1, 10]),
        llm(
            "initech",
            "l-1",
            middle,
            "mystery",
            "unpriced-1",
            [10, 10, 0, 0],
        ),
    ];
    assert_eq!(server.post_ndjson(&events).await.accepted(), 2);
    let (status, body) = get(&server, &format!("/v1/invoices?period={period}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let run: Value = serde_json::from_str(&body).expect("run JSON");
    let invoices = run["invoices"].as_array().expect("invoices");
    assert_eq!(invoices.len(), 1, "{run}");
    assert_eq!(invoices[0], invoice(&server, "acme", &period).await);
    let errors = run["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{run}");
    assert_eq!(errors[0]["tenant"], "initech");
    assert_eq!(errors[0]["status"], 409);
    assert!(
        errors[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("unpriced-1")),
        "{run}"
    );
    let (status, _) = get(
        &server,
        &format!("/v1/invoices?tenant=initech&period={period}"),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = get(&server, &format!("/v1/invoices?period={period}&format=csv")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("initech"), "{body}");
}
