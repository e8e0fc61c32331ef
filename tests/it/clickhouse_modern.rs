//! The form of meterd's ClickHouse tables for current releases (21.8 and later:
//! `LowCardinality`, `DateTime64`, `TTL`), run on a current ClickHouse: chDB 4.4 (ClickHouse
//! 26.9 embedded in Python, from PyPI; `scripts/test.sh` installs it into
//! `tests/clickhouse/.venv`). No ClickHouse server newer than Debian's 18.16 can be installed
//! from this machine's package registries, and chDB runs the same engine in-process.
//!
//! The test creates meterd's tables in the modern form, inserts generated events (a month plus
//! hour and day edges, then late events) the way meterd does, one insert per month with its
//! delivery marker, and checks the column types, the TTL, that markers stay out of `events`
//! and of the rollup views, and that `usage_hourly` and `usage_daily` equal a raw GROUP BY
//! over `events`, bucket by bucket and column by column.

use crate::common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeDelta};
use common::ch::{normalised, raw_group_by, rollup_rows};
use common::{generated, renamed};
use meterd_store_clickhouse::rollups::Dialect;
use meterd_store_clickhouse::schema;
use serde_json::{Value, json};

const DB: &str = "meterd";

fn python() -> String {
    std::env::var("METERD_TEST_CHDB_PYTHON").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clickhouse/.venv/bin/python"
        )
        .to_owned()
    })
}

const PAYLOAD_COLUMNS: [&str; 20] = [
    "provider",
    "model",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "reasoning_tokens",
    "route",
    "method",
    "status_code",
    "request_bytes",
    "response_bytes",
    "agent",
    "run_id",
    "parent_run_id",
    "status",
    "latency_ms",
    "duration_ms",
    "steps",
    "tool_calls",
];

fn time_us(event: &Value) -> i64 {
    let text = event["time"].as_str().expect("time");
    DateTime::parse_from_rfc3339(text)
        .expect("RFC 3339 time")
        .timestamp_micros()
}

/// The `events_in` row of an event, as meterd fills it.
fn input_row(event: &Value, delivery: u64) -> Value {
    let mut row = json!({
        "tenant": event["tenant"],
        "id": event["id"],
        "type": event["type"],
        "time_us": time_us(event),
        "ingested_at_us": 1_700_000_000_000_000i64,
        "subject": event.get("subject").cloned().unwrap_or(Value::Null),
        "source": event.get("source").cloned().unwrap_or(Value::Null),
        "dimensions": event.get("dimensions").map_or("{}".to_owned(), Value::to_string),
        "_delivery": delivery,
        "_marker": 0,
    });
    for column in PAYLOAD_COLUMNS {
        row[column] = event["data"].get(column).cloned().unwrap_or(Value::Null);
    }
    row
}

/// One insert per month of event time, each closed by its marker row, as meterd sends a batch.
fn inserts(events: &[Value], batch: u64) -> Vec<String> {
    let mut months: BTreeMap<(i32, u32), Vec<&Value>> = BTreeMap::new();
    for e in events {
        let t = DateTime::from_timestamp_micros(time_us(e)).expect("time");
        months.entry((t.year(), t.month())).or_default().push(e);
    }
    months
        .into_values()
        .enumerate()
        .map(|(i, month)| {
            let delivery = batch * 1_000 + i as u64 + 1;
            let mut body = format!("INSERT INTO {DB}.events_in FORMAT JSONEachRow\n");
            for e in &month {
                body.push_str(&input_row(e, delivery).to_string());
                body.push('\n');
            }
            let marker_time = month.iter().map(|e| time_us(e)).min().unwrap_or(0);
            let marker = json!({
                "tenant": "", "id": "", "type": "", "time_us": marker_time,
                "ingested_at_us": 0, "dimensions": "", "_delivery": delivery, "_marker": 1,
            });
            body.push_str(&marker.to_string());
            body
        })
        .collect()
}

/// Keeps the first event of each `(tenant, id)`, as meterd's dedup does.
fn unique(events: Vec<Value>) -> Vec<Value> {
    let mut seen = HashSet::new();
    events
        .into_iter()
        .filter(|e| {
            seen.insert((
                e["tenant"].as_str().unwrap_or_default().to_owned(),
                e["id"].as_str().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

/// Runs `steps` in a fresh chDB session; the rows of each step that asks for them. Checks chDB
/// runs a ClickHouse that gets the modern form.
fn run_chdb(steps: Vec<Value>) -> Vec<Vec<Vec<Value>>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let request = json!({ "path": dir.path().join("chdb"), "steps": steps });
    let runner = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clickhouse/run_chdb.py");
    let mut child = Command::new(python())
        .arg(runner)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e}. This test needs chDB; `bash scripts/test.sh` installs it into \
                 tests/clickhouse/.venv (or set METERD_TEST_CHDB_PYTHON)",
                python()
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write request");
    let out = child.wait_with_output().expect("chDB runner");
    assert!(
        out.status.success(),
        "the chDB runner failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("runner output");
    let version = answer["version"].as_str().unwrap_or_default();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        Dialect::for_version(major, 0) == Dialect::MODERN,
        "chDB runs ClickHouse {version}, which should get the modern form"
    );
    answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("rows")
                .iter()
                .map(|row| row.as_array().cloned().unwrap_or_default())
                .collect()
        })
        .collect()
}

/// A database of the first version in the modern form migrates as on 18.16: the column is
/// added after `cached_input_tokens`, the new insert tables carry it, and on a current release
/// a node still writing the old insert table goes on delivering, its rows NULL in the column.
#[test]
fn the_modern_form_migrates_from_the_first_version() {
    let mut steps: Vec<Value> = schema::statements_at(DB, &Dialect::MODERN, Some(400), 1)
        .into_iter()
        .filter(|sql| !sql.contains("schema_migrations"))
        .map(|sql| json!({ "sql": sql }))
        .collect();
    let mut before = common::llm_event("acme", "before", 100, 10);
    let mut written = common::llm_event("acme", "cache-write", 1000, 50);
    written["data"]["cache_write_input_tokens"] = json!(4000);
    let mut older = common::llm_event("acme", "older-node", 7, 1);
    for (event, delivery) in [(&mut before, 1), (&mut older, 3)] {
        // The first version's insert table has no such column.
        let mut row = input_row(event, delivery);
        row.as_object_mut()
            .expect("row")
            .remove("cache_write_input_tokens");
        event["row"] = row;
    }
    steps.push(json!({ "sql": format!(
        "INSERT INTO {DB}.events_in FORMAT JSONEachRow\n{}", before["row"]
    ) }));
    let v1_columns: Vec<String> = schema::statements_at(DB, &Dialect::MODERN, Some(400), 1)
        .iter()
        .find(|sql| sql.contains(&format!("CREATE TABLE IF NOT EXISTS {DB}.events (")))
        .expect("the events table")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(!v1_columns.iter().any(|c| c == "cache_write_input_tokens"));
    let upgrade = schema::upgrade_statements(DB, &Dialect::MODERN, 1, &v1_columns)
        .unwrap_or_else(|e| panic!("upgrade statements: {e}"));
    steps.extend(upgrade.into_iter().map(|sql| json!({ "sql": sql })));
    steps.push(json!({ "sql": format!(
        "INSERT INTO {DB}.events_in_v2 FORMAT JSONEachRow\n{}", input_row(&written, 2)
    ) }));
    steps.push(json!({ "sql": format!(
        "INSERT INTO {DB}.events_in FORMAT JSONEachRow\n{}", older["row"]
    ) }));
    steps.push(json!({
        "sql": format!("SELECT id, cache_write_input_tokens FROM {DB}.events ORDER BY id"),
        "rows": true,
    }));
    steps.push(json!({
        "sql": format!(
            "SELECT name FROM system.columns WHERE database = '{DB}' AND table = 'events' \
             ORDER BY position"
        ),
        "rows": true,
    }));
    steps.push(json!({
        "sql": format!("SELECT toInt64(sum(events)) FROM {DB}.usage_daily"),
        "rows": true,
    }));
    let results = run_chdb(steps);
    assert_eq!(
        results[0],
        vec![
            vec![json!("before"), Value::Null],
            vec![json!("cache-write"), json!(4000)],
            vec![json!("older-node"), Value::Null],
        ]
    );
    let names: Vec<&str> = results[1]
        .iter()
        .map(|r| r[0].as_str().unwrap_or_default())
        .collect();
    let at = names
        .iter()
        .position(|n| *n == "cached_input_tokens")
        .expect("cached_input_tokens");
    assert_eq!(names[at + 1], "cache_write_input_tokens", "{names:?}");
    assert_eq!(results[2], vec![vec![json!(3)]]);
}

#[test]
fn the_modern_form_runs_on_current_clickhouse_with_the_same_rollups() {
    let now = chrono::Utc::now();
    let mut month = generated(111, 8_000, 6, Duration::from_secs(30 * 86_400), 0.02);
    let edge_day =
        chrono::DurationRound::duration_trunc(now - TimeDelta::days(9), TimeDelta::days(1))
            .expect("trunc");
    month.extend(common::rollups::edge_events(edge_day));
    let month = unique(month);
    let mut late = generated(112, 1_000, 6, Duration::from_secs(25 * 86_400), 0.0);
    renamed(&mut late, "late");
    let total = month.len() + late.len();

    let mut steps: Vec<Value> = schema::statements(DB, &Dialect::MODERN, Some(400))
        .into_iter()
        .map(|sql| json!({ "sql": sql }))
        .collect();
    for (batch, events) in [month.as_slice(), late.as_slice()].into_iter().enumerate() {
        for chunk in events.chunks(3_000) {
            for sql in inserts(chunk, batch as u64 * 100 + steps.len() as u64) {
                steps.push(json!({ "sql": sql }));
            }
        }
    }
    let queries = [
        format!(
            "SELECT name, type FROM system.columns WHERE database = '{DB}' AND table = 'events' \
             AND name IN ('tenant', 'time', 'ingested_at', 'provider') ORDER BY name"
        ),
        format!(
            "SELECT create_table_query FROM system.tables WHERE database = '{DB}' AND name = 'events'"
        ),
        format!("SELECT count(), countIf(_delivery = 0 OR tenant = '') FROM {DB}.events"),
        format!("SELECT count() FROM {DB}.usage_hourly_state WHERE _delivery != 0"),
        format!("SELECT toInt64(sum(events)) FROM {DB}.usage_daily"),
        rollup_rows(DB, "usage_hourly"),
        raw_group_by(DB, "toStartOfHour"),
        rollup_rows(DB, "usage_daily"),
        raw_group_by(DB, "toStartOfDay"),
    ];
    for sql in &queries {
        steps.push(json!({ "sql": sql, "rows": true }));
    }

    let results = run_chdb(steps);

    let types: Vec<(String, String)> = results[0]
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap_or_default().to_owned(),
                r[1].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        types,
        vec![
            ("ingested_at".to_owned(), "DateTime64(6, 'UTC')".to_owned()),
            (
                "provider".to_owned(),
                "LowCardinality(Nullable(String))".to_owned()
            ),
            ("tenant".to_owned(), "LowCardinality(String)".to_owned()),
            ("time".to_owned(), "DateTime64(6, 'UTC')".to_owned()),
        ]
    );
    let create = results[1][0][0].as_str().unwrap_or_default();
    assert!(create.contains("TTL"), "events has a TTL: {create}");
    assert_eq!(
        results[2][0],
        vec![json!(total), json!(0)],
        "every event once, no marker"
    );
    assert!(
        results[3][0][0].as_i64().unwrap_or(0) > 0,
        "state tables hold markers"
    );
    assert_eq!(
        results[4][0][0],
        json!(total),
        "usage_daily counts every event once"
    );
    for (rollup, raw, name) in [(5, 6, "usage_hourly"), (7, 8, "usage_daily")] {
        let have = normalised(results[rollup].clone());
        let want = normalised(results[raw].clone());
        assert!(!want.is_empty());
        assert!(
            have == want,
            "{name} differs from a raw GROUP BY: {} rows against {}; first difference {:?}",
            have.len(),
            want.len(),
            have.iter().zip(&want).find(|(a, b)| a != b)
        );
    }
}

/// The billing statements (every aggregation, a filter meeting NULLs, token sums, and windows
/// of a +05:30 zone split by a column) run on a current ClickHouse and give exactly what the
/// events hold, worked out here without SQL.
#[test]
fn billing_statements_run_on_current_clickhouse() {
    use meterd_billing::config::MeterConfig;
    use meterd_billing::usage::{Scope, Tenants, UsageQuery, meter_sql, tokens_sql, windows_sql};
    use meterd_billing::{Meter, WindowSize, Windows};
    use meterd_store_clickhouse::billing::ClickHouseDialect;

    let events = unique(generated(
        131,
        6_000,
        3,
        Duration::from_secs(20 * 86_400),
        0.0,
    ));
    let mut steps: Vec<Value> = schema::statements(DB, &Dialect::MODERN, Some(400))
        .into_iter()
        .map(|sql| json!({ "sql": sql }))
        .collect();
    for chunk in events.chunks(3_000) {
        for sql in inserts(chunk, steps.len() as u64) {
            steps.push(json!({ "sql": sql }));
        }
    }
    let meter = |name: &str, aggregation: &str, field: Option<&str>, filter: Option<&str>| {
        Meter::new(&MeterConfig {
            name: name.to_owned(),
            event_type: "agent.run".to_owned(),
            aggregation: serde_json::from_value(json!(aggregation)).expect("aggregation"),
            field: field.map(str::to_owned),
            filter: filter.map(str::to_owned),
            group_by: vec!["agent".to_owned()],
            description: None,
        })
        .expect("meter")
    };
    let meters = [
        meter("runs", "count", None, Some("status = 'succeeded'")),
        meter(
            "not_support",
            "count",
            None,
            Some("agent NOT IN ('support')"),
        ),
        meter("steps", "sum", Some("steps"), None),
        meter("agents", "unique_count", Some("agent"), None),
        meter("peak", "max", Some("tool_calls"), None),
        meter("last", "latest", Some("duration_ms"), None),
    ];
    let tenant = events[0]["tenant"].as_str().expect("tenant").to_owned();
    let tz = chrono_tz::Tz::Asia__Kolkata;
    let to = chrono::Utc::now();
    let from = to - TimeDelta::days(10) + TimeDelta::minutes(17);
    let scope = Scope {
        tenant: &tenant,
        from_us: from.timestamp_micros(),
        to_us: to.timestamp_micros(),
    };
    let windows = Windows::new(WindowSize::Hour, tz, from, to).expect("windows");
    let d = ClickHouseDialect::new(DB);
    for m in &meters {
        steps.push(json!({ "sql": meter_sql(&d, m, scope), "rows": true }));
    }
    steps.push(json!({ "sql": tokens_sql(&d, scope), "rows": true }));
    let group_by = meters[2].group_by.clone();
    steps.push(json!({
        "sql": windows_sql(&d, UsageQuery {
            meter: &meters[2],
            tenants: Tenants::One(&tenant),
            from_us: scope.from_us,
            to_us: scope.to_us,
            windows: Some(&windows),
            group_by: &group_by,
        }),
        "rows": true,
    }));
    let results = run_chdb(steps);
    let results = &results[results.len() - (meters.len() + 2)..];

    // The same, from the events.
    let in_scope: Vec<&Value> = events
        .iter()
        .filter(|e| {
            let t = time_us(e);
            e["tenant"] == tenant.as_str() && t >= scope.from_us && t < scope.to_us
        })
        .collect();
    let runs: Vec<&Value> = in_scope
        .iter()
        .copied()
        .filter(|e| e["type"] == "agent.run")
        .collect();
    let field = |e: &Value, f: &str| e["data"].get(f).filter(|v| !v.is_null()).cloned();
    let int = |e: &Value, f: &str| field(e, f).and_then(|v| v.as_i64());
    let text = |v: String| json!(v);
    let count = |keep: &dyn Fn(&Value) -> bool| runs.iter().filter(|e| keep(e)).count();
    let mut agents: Vec<String> = runs
        .iter()
        .filter_map(|e| field(e, "agent").and_then(|v| v.as_str().map(str::to_owned)))
        .collect();
    agents.sort();
    agents.dedup();
    let latest = runs
        .iter()
        .filter(|e| int(e, "duration_ms").is_some())
        .max_by_key(|e| (time_us(e), e["id"].as_str().unwrap_or_default().to_owned()))
        .and_then(|e| int(e, "duration_ms"));
    let expected = [
        (
            count(&|e| field(e, "status") == Some(json!("succeeded"))),
            None,
        ),
        (
            count(&|e| field(e, "agent").is_some_and(|a| a != json!("support"))),
            None,
        ),
        (
            runs.len(),
            Some(runs.iter().filter_map(|e| int(e, "steps")).sum::<i64>()),
        ),
        (runs.len(), Some(agents.len() as i64)),
        (
            runs.len(),
            runs.iter().filter_map(|e| int(e, "tool_calls")).max(),
        ),
        (runs.len(), latest),
    ];
    assert!(runs.len() > 100, "{} runs in scope", runs.len());
    for (i, (events, value)) in expected.iter().enumerate() {
        let value = value.map_or_else(|| events.to_string(), |v| v.to_string());
        assert_eq!(
            results[i],
            vec![vec![text(events.to_string()), text(value)]],
            "meter {}",
            meters[i].name
        );
    }
    // Token sums per provider and model.
    let mut tokens: BTreeMap<(String, String), [i64; 5]> = BTreeMap::new();
    for e in in_scope.iter().filter(|e| e["type"] == "llm.usage") {
        let key = (
            e["data"]["provider"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            e["data"]["model"].as_str().unwrap_or_default().to_owned(),
        );
        let sums = tokens.entry(key).or_default();
        sums[0] += 1;
        for (j, f) in [
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "cache_write_input_tokens",
        ]
        .into_iter()
        .enumerate()
        {
            sums[j + 1] += int(e, f).unwrap_or(0);
        }
    }
    // A sum over only NULLs is NULL in SQL; meterd reads it as no tokens.
    let mut got: Vec<Vec<String>> = normalised(results[meters.len()].clone())
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|v| if v == "null" { "0".to_owned() } else { v })
                .collect()
        })
        .collect();
    got.sort();
    let want: Vec<Vec<String>> = tokens
        .iter()
        .map(|((p, m), s)| {
            let mut row = vec![p.clone(), m.clone()];
            row.extend(s.iter().map(i64::to_string));
            row
        })
        .collect();
    assert_eq!(got, want, "token sums");
    // Steps per hour of Kolkata's clock and agent.
    let mut hours: BTreeMap<(usize, String), (usize, i64)> = BTreeMap::new();
    for e in &runs {
        let t = chrono::DateTime::from_timestamp_micros(time_us(e)).expect("time");
        let window = (0..windows.len())
            .find(|&i| windows.get(i).is_some_and(|(a, b)| a <= t && t < b))
            .expect("a window holds every event");
        let agent = field(e, "agent").map_or("null".to_owned(), |a| {
            a.as_str().unwrap_or_default().to_owned()
        });
        let cell = hours.entry((window, agent)).or_default();
        cell.0 += 1;
        cell.1 += int(e, "steps").unwrap_or(0);
    }
    let mut got: Vec<Vec<String>> = normalised(results[meters.len() + 1].clone());
    got.sort_by_key(|r| (r[0].parse::<usize>().unwrap_or(usize::MAX), r[1].clone()));
    let want: Vec<Vec<String>> = hours
        .iter()
        .map(|((w, a), (n, s))| vec![w.to_string(), a.clone(), n.to_string(), s.to_string()])
        .collect();
    assert_eq!(got, want, "windows");
}
