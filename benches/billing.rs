//! Invoices over a month of events, on the embedded store, PostgreSQL and ClickHouse.
//!
//! Loads `--events` events of the last calendar month (UTC) for `--tenants` customers into a
//! `meterd serve` that delivers them to PostgreSQL and ClickHouse, then starts one server per
//! SQL source and times, on each: one tenant's invoice (median of 7), the invoice run of every
//! tenant (`GET /v1/invoices?period=`, one request), and as the baseline the month's usage grouped by tenant and
//! model run directly by the same store (DataFusion through `POST /v1/sql` for the embedded
//! store; the database itself for the others).
//!
//! ```text
//! cargo bench --bench billing -- [--events N] [--tenants N] --postgres-url URL --clickhouse-url URL
//! ```

mod common;
use common::start_server;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{Datelike, TimeZone, Utc};
use rand::{Rng, SeedableRng};

struct Options {
    events: usize,
    tenants: usize,
    postgres_url: String,
    clickhouse_url: String,
}

fn options() -> Result<Options> {
    let mut o = Options {
        events: 10_000_000,
        tenants: 100,
        postgres_url: String::new(),
        clickhouse_url: String::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--events" => o.events = value("--events")?.parse()?,
            "--tenants" => o.tenants = value("--tenants")?.parse()?,
            "--postgres-url" => o.postgres_url = value("--postgres-url")?,
            "--clickhouse-url" => o.clickhouse_url = value("--clickhouse-url")?,
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    if o.postgres_url.is_empty() || o.clickhouse_url.is_empty() {
        bail!("--postgres-url and --clickhouse-url are required");
    }
    Ok(o)
}

const MODELS: &[(&str, &str)] = &[
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-sonnet"),
    ("google", "gemini-pro"),
];

fn config(o: &Options, db: &str) -> String {
    let mut c = format!(
        "[clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n\n",
        o.clickhouse_url
    );
    for (provider, model) in MODELS {
        c.push_str(&format!(
            "[[prices]]\nprovider = \"{provider}\"\nmodel = \"{model}\"\n\
             effective_from = \"2020-01-01T00:00:00Z\"\ninput_per_million = \"2.50\"\n\
             output_per_million = \"10.00\"\ncached_input_per_million = \"1.25\"\n\n"
        ));
    }
    c.push_str(
        "[[meters]]\nname = \"runs\"\ntype = \"agent.run\"\naggregation = \"count\"\n\
         filter = \"status = 'succeeded'\"\n\n\
         [[meters]]\nname = \"steps\"\ntype = \"agent.run\"\naggregation = \"sum\"\nfield = \"steps\"\n\n\
         [[meters]]\nname = \"agents\"\ntype = \"agent.run\"\naggregation = \"unique_count\"\nfield = \"agent\"\n\n\
         [[plans]]\nname = \"pro\"\ncurrency = \"USD\"\nbase_fee = \"49.00\"\nminimum = \"100.00\"\n\
         [[plans.charges]]\nmeter = \"runs\"\nmodel = \"graduated\"\n\
         tiers = [{ up_to = 1000, unit_price = \"0\" }, { up_to = 10000, unit_price = \"0.01\" }, { unit_price = \"0.005\" }]\n\
         [[plans.charges]]\nmeter = \"steps\"\nmodel = \"package\"\npackage_size = 100\npackage_price = \"0.15\"\n\
         [[plans.charges]]\nmeter = \"agents\"\nmodel = \"per_unit\"\nunit_price = \"2.00\"\n\
         [[plans.charges]]\nmodel = \"llm_cost\"\nmarkup = \"0.20\"\n\n",
    );
    for t in 0..o.tenants {
        c.push_str(&format!(
            "[[customers]]\ntenant = \"tenant-{t:04}\"\nplan = \"pro\"\n"
        ));
    }
    c
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let o = options()?;
    let now = Utc::now();
    let (y, m) = if now.month() == 1 {
        (now.year() - 1, 12)
    } else {
        (now.year(), now.month() - 1)
    };
    let start = Utc
        .with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .context("month start")?;
    let end = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .context("month end")?;
    let period = format!("{y:04}-{m:02}");
    let span_ms = (end - start).num_milliseconds();
    let db = format!("meterd_bench_billing_{}", std::process::id());
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("meterd.toml");
    std::fs::write(&config_path, config(&o, &db))?;
    let config_arg = config_path.display().to_string();

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        // A fresh PostgreSQL schema: drop what an earlier run left.
        let (pg, connection) =
            deadpool_postgres::tokio_postgres::connect(&o.postgres_url, deadpool_postgres::tokio_postgres::NoTls)
                .await
                .context("connecting to PostgreSQL")?;
        tokio::spawn(connection);
        pg.batch_execute("DROP SCHEMA IF EXISTS meterd CASCADE").await?;
        let http = reqwest::Client::new();

        let writer = start_server(
            &dir.path().join("writer"),
            &[
                "--config", &config_arg, "--postgres-url", &o.postgres_url,
                "--sql-source", "embedded", "--close-grace-hours", "0",
            ],
        )?;
        let loading = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let batch = 20_000;
        let mut sent = 0;
        while sent < o.events {
            let n = batch.min(o.events - sent);
            let mut body = String::with_capacity(n * 300);
            for i in sent..sent + n {
                let tenant = format!("tenant-{:04}", rng.random_range(0..o.tenants));
                let time = start + chrono::Duration::milliseconds(rng.random_range(0..span_ms));
                let time = time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                if rng.random_bool(0.6) {
                    let (provider, model) = MODELS[rng.random_range(0..MODELS.len())];
                    body.push_str(&format!(
                        "{{\"id\":\"e{i}\",\"tenant\":\"{tenant}\",\"type\":\"llm.usage\",\"time\":\"{time}\",\
                         \"data\":{{\"provider\":\"{provider}\",\"model\":\"{model}\",\"input_tokens\":{},\
                         \"output_tokens\":{},\"cached_input_tokens\":{}}}}}\n",
                        rng.random_range(0..4000),
                        rng.random_range(0..1000),
                        rng.random_range(0..2000),
                    ));
                } else {
                    let status = if rng.random_bool(0.9) { "succeeded" } else { "failed" };
                    body.push_str(&format!(
                        "{{\"id\":\"e{i}\",\"tenant\":\"{tenant}\",\"type\":\"agent.run\",\"time\":\"{time}\",\
                         \"data\":{{\"agent\":\"agent-{}\",\"run_id\":\"r{i}\",\"status\":\"{status}\",\
                         \"duration_ms\":{},\"steps\":{}}}}}\n",
                        rng.random_range(0..20),
                        rng.random_range(1..60_000),
                        rng.random_range(1..30),
                    ));
                }
            }
            let response = http
                .post(format!("{}/v1/events", writer.url))
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("ingest answered {}: {}", response.status(), response.text().await?);
            }
            sent += n;
        }
        println!("loaded {} events in {:.1} s", o.events, loading.elapsed().as_secs_f64());
        // Wait for both stores to hold every event.
        let want = o.events as i64;
        loop {
            let in_pg: i64 = pg
                .query_one("SELECT count(*) FROM meterd.events", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            let in_ch: i64 = http
                .post(&o.clickhouse_url)
                .body(format!("SELECT count() FROM {db}.events"))
                .send()
                .await?
                .text()
                .await?
                .trim()
                .parse()
                .unwrap_or(0);
            if in_pg >= want && in_ch >= want {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        println!("delivered to PostgreSQL and ClickHouse after {:.1} s", loading.elapsed().as_secs_f64());

        let from_pg = start_server(
            &dir.path().join("pg"),
            &["--config", &config_arg, "--postgres-url", &o.postgres_url,
              "--sql-source", "postgres", "--close-grace-hours", "0"],
        )?;
        let from_ch = start_server(
            &dir.path().join("ch"),
            &["--config", &config_arg, "--sql-source", "clickhouse", "--close-grace-hours", "0"],
        )?;
        let (from, to) = (
            start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        println!(
            "{:<11} {:>16} {:>18} {:>22} {:>8}",
            "store", "one invoice (ms)", "all invoices (ms)", "month GROUP BY (ms)", "ratio"
        );
        for (name, server) in [("embedded", &writer), ("PostgreSQL", &from_pg), ("ClickHouse", &from_ch)] {
            let invoice = |tenant: String| {
                let url = format!("{}/v1/invoices?tenant={tenant}&period={period}", server.url);
                let http = http.clone();
                async move {
                    let r = http.get(url).send().await?;
                    if !r.status().is_success() {
                        bail!("invoice answered {}: {}", r.status(), r.text().await?);
                    }
                    r.bytes().await?;
                    Ok::<(), anyhow::Error>(())
                }
            };
            invoice("tenant-0000".to_owned()).await?; // warm
            let mut one = Vec::new();
            for _ in 0..7 {
                let t = Instant::now();
                invoice("tenant-0000".to_owned()).await?;
                one.push(t.elapsed());
            }
            // The invoice run: every customer's invoice in one request.
            let t = Instant::now();
            let r = http
                .get(format!("{}/v1/invoices?period={period}", server.url))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("the invoice run answered {}: {}", r.status(), r.text().await?);
            }
            let run: serde_json::Value = r.json().await?;
            let all = t.elapsed();
            let invoices = run["invoices"].as_array().map_or(0, Vec::len);
            if invoices != o.tenants {
                bail!("the invoice run gave {invoices} invoices, not {}", o.tenants);
            }
            let mut group_by = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                match name {
                    "embedded" => {
                        let r = http
                            .post(format!("{}/v1/sql", server.url))
                            .json(&serde_json::json!({"sql": format!(
                                "SELECT tenant, model, sum(input_tokens), sum(output_tokens), count(*) \
                                 FROM events WHERE time >= '{from}' AND time < '{to}' GROUP BY tenant, model")}))
                            .send()
                            .await?;
                        if !r.status().is_success() {
                            bail!("SQL answered {}", r.status());
                        }
                        r.bytes().await?;
                    }
                    "PostgreSQL" => {
                        pg.query(
                            &format!(
                                "SELECT tenant, model, sum(input_tokens), sum(output_tokens), count(*) \
                                 FROM meterd.events WHERE time >= '{from}' AND time < '{to}' GROUP BY tenant, model"
                            ),
                            &[],
                        )
                        .await?;
                    }
                    _ => {
                        let r = http
                            .post(&o.clickhouse_url)
                            .body(format!(
                                "SELECT tenant, model, sum(toDecimal128(input_tokens, 0)), \
                                 sum(toDecimal128(output_tokens, 0)), count() FROM {db}.events \
                                 WHERE time_us >= {} AND time_us < {} GROUP BY tenant, model",
                                start.timestamp_micros(),
                                end.timestamp_micros()
                            ))
                            .send()
                            .await?;
                        if !r.status().is_success() {
                            bail!("ClickHouse answered {}", r.status());
                        }
                        r.bytes().await?;
                    }
                }
                group_by.push(t.elapsed());
            }
            let group_by = median(group_by);
            println!(
                "{name:<11} {:>16.1} {:>18.0} {:>22.1} {:>8.2}",
                ms(median(one)),
                ms(all),
                ms(group_by),
                all.as_secs_f64() / group_by.as_secs_f64()
            );
        }
        let _ = http
            .post(&o.clickhouse_url)
            .body(format!("DROP DATABASE IF EXISTS {db}"))
            .send()
            .await;
        Ok(())
    })
}
