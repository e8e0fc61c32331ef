//! `GET /v1/slos` over a store holding millions of events.
//!
//! `meterd gen` writes `--events` events spread over the last 30 days for 100 tenants (outside
//! the timed part); they are posted to a `meterd serve` on a fresh data directory configured
//! with ten SLOs (availability, latency and agent success, over 30 days, 7 days and 1 day, two
//! of them per tenant). It times one `GET /v1/slos` right after the load (the hours the last
//! batches touched are counted raw), waits until every SLO's whole hours are counted again
//! (the background count runs every 10 s), then times `GET /v1/slos` (every SLO, each window and
//! burn-rate window; median of 5), and as the plain baseline in the same run one SQL statement
//! over the same store counting one SLO's valid and good events over its 30 days
//! (`POST /v1/sql`).
//!
//! ```text
//! cargo bench --bench slos -- [--events N]
//! ```

mod common;
use common::start_server;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const SLOS: &str = r#"
[[slos]]
name = "api-availability-30d"
type = "api.request"
good = "status_code < 500"
valid = "route <> '/healthz'"
objective = 0.999
window = "30d"

[[slos]]
name = "api-availability-7d"
type = "api.request"
good = "status_code < 500"
objective = 0.99
window = "7d"

[[slos]]
name = "api-latency-30d"
type = "api.request"
good = "latency_ms <= 500"
objective = 0.95
window = "30d"

[[slos]]
name = "api-latency-1d"
type = "api.request"
good = "latency_ms <= 250"
valid = "status_code < 500"
objective = 0.9
window = "1d"

[[slos]]
name = "api-availability-per-tenant"
type = "api.request"
good = "status_code < 500"
objective = 0.999
window = "30d"
per_tenant = true

[[slos]]
name = "agent-success-30d"
type = "agent.run"
good = "status = 'succeeded'"
objective = 0.99
window = "30d"

[[slos]]
name = "agent-success-7d"
type = "agent.run"
good = "status = 'succeeded'"
valid = "status IS NOT NULL"
objective = 0.95
window = "7d"

[[slos]]
name = "agent-success-per-tenant"
type = "agent.run"
good = "status = 'succeeded'"
objective = 0.9
window = "7d"
per_tenant = true

[[slos]]
name = "llm-errors-30d"
type = "llm.usage"
good = "status IS NULL OR status <> 'error'"
objective = 0.999
window = "30d"

[[slos]]
name = "llm-latency-1d"
type = "llm.usage"
good = "latency_ms <= 10000"
valid = "latency_ms IS NOT NULL"
objective = 0.99
window = "1d"
"#;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn main() -> Result<()> {
    let mut events = 10_000_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--events" => events = args.next().context("--events needs a value")?.parse()?,
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    let dir = tempfile::tempdir()?;
    let now = chrono::Utc::now();
    let ndjson = dir.path().join("events.ndjson");
    let status = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args([
            "gen",
            "--seed",
            "11",
            "--duplicates",
            "0",
            "--tenants",
            "100",
        ])
        .args(["--events", &events.to_string()])
        .args(["--start", &(now - chrono::Duration::days(30)).to_rfc3339()])
        .args(["--end", &now.to_rfc3339(), "--out"])
        .arg(&ndjson)
        .status()
        .context("running meterd gen")?;
    if !status.success() {
        bail!("meterd gen failed: {status}");
    }
    let config = dir.path().join("meterd.toml");
    std::fs::write(&config, SLOS)?;
    let config = config.display().to_string();
    let server = start_server(&dir.path().join("data"), &["--config", &config])?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let loaded = Instant::now();
    rt.block_on(async {
        let text = tokio::fs::read(&ndjson).await?;
        let mut batch = Vec::with_capacity(4 << 20);
        let mut lines = 0;
        let mut pending = Vec::new();
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            batch.extend_from_slice(line);
            batch.push(b'\n');
            lines += 1;
            if lines == 5_000 {
                pending.push(tokio::spawn(post(
                    client.clone(),
                    server.url.clone(),
                    std::mem::take(&mut batch),
                )));
                lines = 0;
                if pending.len() == 4 {
                    for p in pending.drain(..) {
                        p.await??;
                    }
                }
            }
        }
        if !batch.is_empty() {
            pending.push(tokio::spawn(post(
                client.clone(),
                server.url.clone(),
                batch,
            )));
        }
        for p in pending {
            p.await??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    println!(
        "slos: {events} events over 30 days, 100 tenants, loaded in {:.1} s; 10 SLOs",
        loaded.elapsed().as_secs_f64()
    );

    // Right after the load, /v1/slos counts raw events for the hours its last batches touched
    // (the whole window, when events arrive in no time order).
    let raw = rt.block_on(async {
        let t = Instant::now();
        let r = client.get(format!("{}/v1/slos", server.url)).send().await?;
        if !r.status().is_success() {
            bail!("/v1/slos answered {}", r.status());
        }
        r.bytes().await?;
        Ok::<_, anyhow::Error>(t.elapsed())
    })?;
    println!(
        "  GET /v1/slos right after the load: {:.1} ms",
        raw.as_secs_f64() * 1e3
    );
    // The hours are counted again in the background every 10 s: after one round started after
    // the load, every SLO's whole hours hold. Timed from the end of the load.
    let filled = Instant::now();
    std::thread::sleep(Duration::from_secs(11));
    rt.block_on(async {
        loop {
            let text = client
                .get(format!("{}/metrics", server.url))
                .send()
                .await?
                .text()
                .await?;
            let kept: Vec<u64> = text
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("meterd_slo_kept_seconds{")?
                        .rsplit_once(' ')?
                        .1
                        .parse()
                        .ok()
                })
                .collect();
            // Every SLO has a 3d burn window: its whole hours back to the last 7 hours (read
            // from the minutes' counts), 64 at least.
            if kept.len() == 10 && kept.iter().all(|k| *k >= 64 * 3_600) {
                break;
            }
            if filled.elapsed() > Duration::from_secs(1_800) {
                bail!("SLO hours not kept after 30 minutes: {kept:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    println!(
        "  every SLO's whole hours counted again within {:.1} s after the load",
        filled.elapsed().as_secs_f64()
    );

    let slos = rt.block_on(async {
        let mut times = Vec::new();
        let mut answer = serde_json::Value::Null;
        for _ in 0..5 {
            let t = Instant::now();
            let r = client.get(format!("{}/v1/slos", server.url)).send().await?;
            let status = r.status();
            answer = r.json().await?;
            if !status.is_success() {
                bail!("/v1/slos answered {status}: {answer}");
            }
            times.push(t.elapsed());
        }
        Ok::<_, anyhow::Error>((median(times), answer))
    })?;
    let (slos_time, answer) = slos;
    let valid: u64 = answer["slos"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["valid_events"].as_u64()).sum())
        .unwrap_or(0);
    let baseline = rt.block_on(async {
        let sql = "SELECT count(*) FILTER (WHERE route <> '/healthz'), \
             count(*) FILTER (WHERE route <> '/healthz' AND status_code < 500) \
             FROM events WHERE type = 'api.request' AND time >= now() - INTERVAL '30 days'";
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let r = client
                .post(format!("{}/v1/sql", server.url))
                .json(&serde_json::json!({ "sql": sql }))
                .send()
                .await?;
            let status = r.status();
            let body: serde_json::Value = r.json().await?;
            if !status.is_success() {
                bail!("/v1/sql answered {status}: {body}");
            }
            times.push(t.elapsed());
        }
        Ok::<_, anyhow::Error>(median(times))
    })?;
    println!(
        "  GET /v1/slos (10 SLOs, {} statuses, {valid} valid events in all): {:.1} ms (median of 5)",
        answer["slos"].as_array().map_or(0, Vec::len),
        slos_time.as_secs_f64() * 1e3
    );
    println!(
        "  baseline: one SLO's 30-day count in one SQL statement: {:.1} ms (median of 5)",
        baseline.as_secs_f64() * 1e3
    );
    Ok(())
}

async fn post(client: reqwest::Client, url: String, body: Vec<u8>) -> Result<()> {
    let r = client
        .post(format!("{url}/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("ingest answered {}", r.status());
    }
    Ok(())
}
