use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::TimeZone as _;
use clap::Parser as _;
use meterd_schemas::{Limits, ValidationContext, validate_event};
use serde_json::json;

use super::*;
use crate::send::{SendOptions, Totals, post_batches};

fn at(y: i32, mo: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, 0, 0)
        .single()
        .expect("valid date")
}

fn config(seed: u64, events: u64) -> GenConfig {
    GenConfig {
        seed,
        events,
        tenants: 20,
        start: at(2026, 11, 20, 12),
        end: at(2026, 11, 21, 12),
        duplicates: 0.02,
    }
}

fn ndjson(config: GenConfig) -> Vec<u8> {
    let mut generator = Generator::new(config);
    let mut out = Vec::new();
    while generator.fill_ndjson(777, &mut out) > 0 {}
    out
}

fn events(config: GenConfig) -> Vec<Value> {
    Generator::new(config).collect()
}

fn str_field<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

#[test]
fn same_config_gives_the_same_bytes() {
    let a = ndjson(config(42, 5000));
    let b = ndjson(config(42, 5000));
    assert_eq!(a, b);
    assert_eq!(a.iter().filter(|&&b| b == b'\n').count(), 5000);
    // The iterator yields the same events as the NDJSON writer.
    let lines: Vec<Value> = a
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines, events(config(42, 5000)));
}

#[test]
fn different_seed_or_window_gives_different_events() {
    let base = ndjson(config(42, 2000));
    assert_ne!(base, ndjson(config(43, 2000)));
    let shifted = GenConfig {
        end: at(2026, 11, 21, 13),
        ..config(42, 2000)
    };
    assert_ne!(base, ndjson(shifted));
}

#[test]
fn an_id_never_comes_with_two_contents_across_runs_of_one_seed() {
    let base = config(42, 2000);
    let variants = [
        base.clone(),
        GenConfig {
            end: at(2026, 11, 21, 13),
            ..base.clone()
        },
        GenConfig {
            start: at(2026, 11, 19, 12),
            ..base.clone()
        },
        GenConfig {
            events: 3000,
            ..base.clone()
        },
        GenConfig {
            tenants: 5,
            ..base.clone()
        },
        GenConfig {
            duplicates: 0.1,
            ..base.clone()
        },
    ];
    let mut contents: HashMap<String, Value> = HashMap::new();
    for variant in variants {
        for event in events(variant.clone()) {
            let id = str_field(&event, "/id").to_owned();
            if let Some(earlier) = contents.insert(id.clone(), event.clone()) {
                assert_eq!(earlier, event, "{id} came with two contents ({variant:?})");
            }
        }
    }
    // The same configuration again gives the same ids: a re-run is all duplicates.
    let again: HashSet<String> = events(base.clone())
        .iter()
        .map(|e| str_field(e, "/id").to_owned())
        .collect();
    assert!(again.iter().all(|id| contents.contains_key(id)));
    assert!(
        again.iter().all(|id| id.starts_with("evt-42-")),
        "{:?}",
        again.iter().next()
    );
}

#[test]
fn emits_exactly_the_configured_number() {
    let mut generator = Generator::new(config(1, 10));
    assert_eq!(generator.size_hint(), (10, Some(10)));
    let mut out = Vec::new();
    assert_eq!(generator.fill_ndjson(4, &mut out), 4);
    assert!(generator.next_event().is_some());
    assert_eq!(generator.remaining(), 5);
    assert_eq!(generator.fill_ndjson(100, &mut out), 5);
    assert_eq!(generator.fill_ndjson(100, &mut out), 0);
    assert!(generator.next_event().is_none());
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 9);
    assert_eq!(Generator::new(config(1, 0)).count(), 0);
}

#[test]
fn duplicates_are_exact_copies_in_the_requested_share() {
    let n = 20_000;
    let all = events(GenConfig {
        duplicates: 0.05,
        ..config(7, n)
    });
    let mut seen: HashMap<(String, String), &Value> = HashMap::new();
    let mut duplicates = 0;
    for event in &all {
        let key = (
            str_field(event, "/tenant").to_owned(),
            str_field(event, "/id").to_owned(),
        );
        match seen.get(&key) {
            Some(earlier) => {
                assert_eq!(*earlier, event, "a re-sent event must be an exact copy");
                duplicates += 1;
            }
            None => {
                seen.insert(key, event);
            }
        }
    }
    let share = duplicates as f64 / n as f64;
    assert!((0.04..0.06).contains(&share), "duplicate share {share}");

    let none = events(GenConfig {
        duplicates: 0.0,
        ..config(7, 5000)
    });
    let ids: HashSet<&str> = none.iter().map(|e| str_field(e, "/id")).collect();
    assert_eq!(ids.len(), none.len(), "ids are unique without duplicates");
}

#[test]
fn every_event_is_valid() {
    let cfg = config(42, 20_000);
    let ctx = ValidationContext {
        now: cfg.end,
        limits: Limits::default(),
        bound_tenant: None,
    };
    for (i, event) in Generator::new(cfg).enumerate() {
        if let Err(errors) = validate_event(&event, &ctx) {
            panic!("event {i} is invalid: {errors:?}\n{event}");
        }
    }
}

#[test]
fn type_mix_and_tenant_skew_look_real() {
    let all = events(config(42, 20_000));
    let n = all.len() as f64;
    let mut types: HashMap<&str, usize> = HashMap::new();
    let mut tenants: HashMap<&str, usize> = HashMap::new();
    for e in &all {
        *types.entry(str_field(e, "/type")).or_default() += 1;
        *tenants.entry(str_field(e, "/tenant")).or_default() += 1;
    }
    let share = |t: &str| types.get(t).copied().unwrap_or(0) as f64 / n;
    assert!((0.56..0.64).contains(&share("llm.usage")), "{types:?}");
    assert!((0.22..0.28).contains(&share("api.request")), "{types:?}");
    assert!((0.12..0.18).contains(&share("agent.run")), "{types:?}");

    assert_eq!(tenants.len(), 20, "{tenants:?}");
    let size = |t: &str| tenants.get(t).copied().unwrap_or(0);
    let top = size("tenant-00") as f64 / n;
    assert!(
        (0.2..0.45).contains(&top),
        "tenant-00 has {top} of the traffic"
    );
    assert!(size("tenant-00") > size("tenant-01"));
    assert!(size("tenant-01") > size("tenant-05"));
    assert!(size("tenant-00") > 5 * size("tenant-19"), "{tenants:?}");
    let wide = Generator::new(GenConfig {
        tenants: 150,
        ..config(1, 10)
    });
    assert_eq!(wide.tenants[7].name, "tenant-007");
}

#[test]
fn times_fill_the_window_roughly_in_order() {
    let cfg = GenConfig {
        duplicates: 0.0,
        ..config(42, 20_000)
    };
    let (start, end) = (cfg.start, cfg.end);
    let all = events(cfg);
    let times: Vec<DateTime<Utc>> = all
        .iter()
        .map(|e| {
            let s = str_field(e, "/time");
            assert_eq!(s.len(), 24, "{s}");
            assert!(s.ends_with('Z'), "{s}");
            DateTime::parse_from_rfc3339(s)
                .expect("RFC 3339")
                .with_timezone(&Utc)
        })
        .collect();
    assert!(times.iter().all(|t| *t >= start && *t < end));
    let ordered = times.windows(2).filter(|w| w[0] <= w[1]).count() as f64;
    assert!(ordered / (times.len() - 1) as f64 > 0.97);
    assert!(
        ordered / ((times.len() - 1) as f64) < 1.0,
        "a few events arrive late"
    );
    // The whole window is used, busier in the (UTC) afternoon than at night.
    assert!(times[0] - start < TimeDelta::minutes(5));
    assert!(end - times[times.len() - 1] < TimeDelta::minutes(5));
    let hour_count = |h: u32| {
        times
            .iter()
            .filter(|t| chrono::Timelike::hour(*t) == h)
            .count()
    };
    assert!(hour_count(15) > 2 * hour_count(3));
}

#[test]
fn payloads_are_plausible_and_references_resolve() {
    let all = events(config(42, 20_000));
    let mut runs: HashMap<&str, &str> = HashMap::new();
    let (mut llm, mut llm_errors, mut api, mut api_5xx, mut children) = (0, 0, 0, 0, 0);
    let mut inputs = Vec::new();
    for e in &all {
        let tenant = str_field(e, "/tenant");
        let data = &e["data"];
        match str_field(e, "/type") {
            "llm.usage" => {
                llm += 1;
                let model = str_field(data, "/model");
                let reasoning = matches!(model, "o3" | "gemini-2.5-pro");
                assert_eq!(data.get("reasoning_tokens").is_some(), reasoning, "{e}");
                let input = data["input_tokens"].as_u64().expect("input_tokens");
                inputs.push(input);
                if let Some(cached) = data.get("cached_input_tokens") {
                    assert!(cached.as_u64().expect("cached") <= input);
                }
                if str_field(data, "/status") == "error" {
                    llm_errors += 1;
                }
                if let Some(run) = data.get("run_id").and_then(Value::as_str) {
                    assert_eq!(
                        runs.get(run),
                        Some(&tenant),
                        "run {run} of {tenant} not seen"
                    );
                }
            }
            "api.request" => {
                api += 1;
                let code = data["status_code"].as_u64().expect("status_code");
                if code >= 500 {
                    api_5xx += 1;
                }
            }
            _ => {
                if let Some(parent) = data.get("parent_run_id").and_then(Value::as_str) {
                    assert_eq!(runs.get(parent), Some(&tenant), "parent {parent} not seen");
                    children += 1;
                }
                runs.insert(str_field(data, "/run_id"), tenant);
            }
        }
    }
    let error_share = llm_errors as f64 / llm as f64;
    assert!(
        (0.005..0.03).contains(&error_share),
        "llm errors {error_share}"
    );
    let share_5xx = api_5xx as f64 / api as f64;
    assert!((0.002..0.025).contains(&share_5xx), "5xx {share_5xx}");
    assert!(children > 50, "{children} child runs");
    inputs.sort_unstable();
    let median = inputs[inputs.len() / 2];
    assert!((300..5000).contains(&median), "median input {median}");
    assert!(inputs[inputs.len() * 99 / 100] > 10_000);
}

#[derive(Debug, clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: GenArgs,
}

fn parse(args: &[&str]) -> Result<GenArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("gen").chain(args.iter().copied())).map(|c| c.args)
}

#[test]
fn arguments_have_the_documented_defaults() {
    let args = parse(&[]).expect("no arguments needed");
    assert_eq!((args.seed, args.events, args.tenants), (42, 10_000, 20));
    assert_eq!((args.batch, args.concurrency, args.rate), (1000, 4, 0.0));
    assert_eq!(args.duplicates, 0.02);
    assert_eq!(args.out, PathBuf::from("-"));
    assert!(args.url.is_none() && args.api_key.is_none());

    let now = Utc
        .with_ymd_and_hms(2026, 11, 21, 10, 30, 45)
        .single()
        .expect("valid");
    let cfg = args.config_at(now).expect("valid");
    assert_eq!(
        cfg.end,
        Utc.with_ymd_and_hms(2026, 11, 21, 10, 30, 0)
            .single()
            .expect("valid")
    );
    assert_eq!(cfg.start, cfg.end - TimeDelta::hours(24));

    let args = parse(&[
        "--seed",
        "7",
        "--start",
        "2026-11-01T00:00:00+01:00",
        "--end",
        "2026-11-02T00:00:00Z",
    ])
    .expect("valid");
    let cfg = args.config_at(now).expect("valid");
    assert_eq!(cfg.seed, 7);
    assert_eq!(cfg.start, at(2026, 10, 31, 23));
    assert_eq!(cfg.end, at(2026, 11, 2, 0));
    let only_end = parse(&["--end", "2026-11-02T00:00:00Z"])
        .expect("valid")
        .config_at(now)
        .expect("valid");
    assert_eq!(only_end.start, at(2026, 11, 1, 0));
}

#[test]
fn bad_arguments_are_rejected() {
    for bad in [
        &["--tenants", "0"][..],
        &["--duplicates", "1.5"],
        &["--rate", "-1"],
        &["--batch", "0"],
        &["--concurrency", "0"],
        &["--start", "yesterday"],
        &["--url", "not a url"],
        &[
            "--url",
            "http://127.0.0.1:8080/v1/events",
            "--out",
            "x.ndjson",
        ],
    ] {
        assert!(parse(bad).is_err(), "{bad:?} must be rejected");
    }
    let backwards = parse(&[
        "--start",
        "2026-11-02T00:00:00Z",
        "--end",
        "2026-11-01T00:00:00Z",
    ])
    .expect("parses");
    let err = backwards.config().expect_err("start after end");
    assert!(err.to_string().contains("--start"), "{err}");
}

/// A stand-in for meterd's ingest endpoint: the first request gets a 503, then each batch is
/// accepted except events already seen, which count as duplicates.
async fn fake_ingest(fail_with: Option<u16>) -> (reqwest::Url, Arc<AtomicU64>) {
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;

    let requests = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let counter = Arc::clone(&requests);
    let handler = move |headers: HeaderMap, body: axum::body::Bytes| {
        let counter = Arc::clone(&counter);
        let seen = Arc::clone(&seen);
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            assert_eq!(headers[header::CONTENT_TYPE], "application/x-ndjson");
            assert_eq!(headers[header::AUTHORIZATION], "Bearer secret");
            if let Some(code) = fail_with {
                let status = StatusCode::from_u16(code).expect("valid status");
                return (status, r#"{"error": "no such tenant"}"#).into_response();
            }
            if n == 0 {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "0")],
                    "full",
                )
                    .into_response();
            }
            let mut seen = seen.lock().expect("not poisoned");
            let (mut accepted, mut duplicates) = (0, 0);
            for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let v: Value = serde_json::from_slice(line).expect("JSON line");
                if seen.insert(str_field(&v, "/id").to_owned()) {
                    accepted += 1;
                } else {
                    duplicates += 1;
                }
            }
            axum::Json(json!({"accepted": accepted, "duplicates": duplicates, "conflicts": []}))
                .into_response()
        }
    };
    let app = axum::Router::new().route("/v1/events", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    let url = format!("http://{addr}/v1/events").parse().expect("url");
    (url, requests)
}

fn options(url: reqwest::Url) -> SendOptions {
    SendOptions {
        url,
        batch: 300,
        rate: 0.0,
        concurrency: 3,
        api_key: Some("secret".to_owned()),
    }
}

#[tokio::test]
async fn posting_retries_and_sums_the_answers() {
    let (url, requests) = fake_ingest(None).await;
    let cfg = GenConfig {
        duplicates: 0.05,
        ..config(3, 2000)
    };
    let unique: HashSet<String> = events(cfg.clone())
        .iter()
        .map(|e| str_field(e, "/id").to_owned())
        .collect();
    let totals = post_batches(
        Generator::new(cfg),
        &options(url),
        &indicatif::ProgressBar::hidden(),
    )
    .await
    .expect("all batches sent");
    assert_eq!(
        totals,
        Totals {
            events: 2000,
            batches: 7,
            accepted: unique.len() as u64,
            duplicates: 2000 - unique.len() as u64,
            conflicts: 0,
            retries: 1,
        }
    );
    assert_eq!(requests.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn posting_fails_on_a_client_error_with_the_body() {
    let (url, _) = fake_ingest(Some(400)).await;
    let err = post_batches(
        Generator::new(config(3, 100)),
        &options(url),
        &indicatif::ProgressBar::hidden(),
    )
    .await
    .expect_err("400 is final");
    let message = format!("{err:#}");
    assert!(
        message.contains("400") && message.contains("no such tenant"),
        "{message}"
    );
}

#[tokio::test]
async fn rate_limits_pace_the_batches() {
    let (url, _) = fake_ingest(None).await;
    let opts = SendOptions {
        rate: 2000.0,
        batch: 100,
        ..options(url)
    };
    let started = std::time::Instant::now();
    let totals = post_batches(
        Generator::new(config(3, 400)),
        &opts,
        &indicatif::ProgressBar::hidden(),
    )
    .await
    .expect("sent");
    assert_eq!(totals.events, 400);
    // The fourth batch may leave 150 ms after the start at 2000 events/s.
    assert!(started.elapsed() >= std::time::Duration::from_millis(140));
}

#[tokio::test]
async fn run_writes_ndjson_to_a_file() {
    let dir = std::env::temp_dir().join(format!("meterd-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("events.ndjson");
    let args = parse(&[
        "--events",
        "1500",
        "--start",
        "2026-11-20T12:00:00Z",
        "--end",
        "2026-11-21T12:00:00Z",
        "--out",
        path.to_str().expect("utf-8 path"),
    ])
    .expect("valid");
    run(args).await.expect("written");
    let written = std::fs::read(&path).expect("read back");
    std::fs::remove_dir_all(&dir).expect("clean up");
    assert_eq!(written, ndjson(config(42, 1500)));
}
