//! Delivery from meterd's log into ClickHouse, against a plain `clickhouse` crate insert of the
//! same rows into a table of the same structure as `events`, measured in the same run; and what
//! the rollups' materialized views cost at insert time (the same `Native` blocks into
//! `events_in`, which feeds every view, and into `repair_events`, which feeds `events` only).
//!
//! A bench target of the ingest crate (so it builds without DataFusion), fed with events from
//! `meterd gen`, against a running ClickHouse:
//!
//! ```text
//! cargo run --release -- gen --events 2000000 --tenants 50 --seed 7 --out /tmp/events.ndjson
//! cargo bench -p meterd-store-clickhouse --bench clickhouse_sink -- --input /tmp/events.ndjson \
//!     [--url http://127.0.0.1:8123]
//! ```
//!
//! The bench creates and drops the database `meterd_bench`.

use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meterd_ingest::{Ingest, IngestConfig};
use meterd_schemas::{Limits, StoredEvent, ValidationContext, validate_event};
use meterd_store_clickhouse::block::month_blocks;
use meterd_store_clickhouse::{ClickHouseConfig, client, schema};
use tokio_util::sync::CancellationToken;

const DATABASE: &str = "meterd_bench";
const BATCH: usize = 100_000;

struct Options {
    input: String,
    url: String,
}

fn options() -> Result<Options> {
    let mut input = None;
    let mut url = "http://127.0.0.1:8123".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--input" => input = Some(args.next().context("--input needs a file")?),
            "--url" => url = args.next().context("--url needs a value")?,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Options {
        input: input.context("--input <events.ndjson> (from `meterd gen`) is required")?,
        url,
    })
}

fn load(path: &str) -> Result<Vec<meterd_schemas::Event>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    let ctx = ValidationContext {
        now: chrono::Utc::now(),
        limits: Limits::default(),
        bound_tenant: None,
    };
    let mut events = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)?;
        let event = validate_event(&value, &ctx)
            .map_err(|e| anyhow::anyhow!("invalid event in {path}: {e:?}"))?;
        // meterd dedups on the way in; the baseline gets the same unique rows.
        if seen.insert((event.tenant.clone(), event.id.clone())) {
            events.push(event);
        }
    }
    Ok(events)
}

/// One row of `events` on ClickHouse 18.16 (`DateTime` as seconds), for the plain insert.
#[derive(Debug, clickhouse::Row, serde::Serialize)]
struct PlainRow<'a> {
    tenant: &'a str,
    id: &'a str,
    r#type: &'static str,
    time: u32,
    time_us: i64,
    ingested_at: u32,
    subject: Option<&'a str>,
    source: Option<&'a str>,
    dimensions: String,
    provider: Option<&'a str>,
    model: Option<&'a str>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cached_input_tokens: Option<i64>,
    cache_write_input_tokens: Option<i64>,
    reasoning_tokens: Option<i64>,
    route: Option<&'a str>,
    method: Option<&'a str>,
    status_code: Option<i64>,
    request_bytes: Option<i64>,
    response_bytes: Option<i64>,
    agent: Option<&'a str>,
    run_id: Option<&'a str>,
    parent_run_id: Option<&'a str>,
    status: Option<&'a str>,
    latency_ms: Option<i64>,
    duration_ms: Option<i64>,
    steps: Option<i64>,
    tool_calls: Option<i64>,
    _delivery: u64,
}

fn plain_row(e: &StoredEvent) -> PlainRow<'_> {
    use meterd_schemas::EventData;
    let ev = &e.event;
    let mut row = PlainRow {
        tenant: &ev.tenant,
        id: &ev.id,
        r#type: ev.event_type().as_str(),
        time: u32::try_from(ev.time_us.div_euclid(1_000_000)).unwrap_or(0),
        time_us: ev.time_us,
        ingested_at: u32::try_from(e.ingested_at_us.div_euclid(1_000_000)).unwrap_or(0),
        subject: ev.subject.as_deref(),
        source: ev.source.as_deref(),
        dimensions: serde_json::to_string(&ev.dimensions).unwrap_or_default(),
        provider: None,
        model: None,
        input_tokens: None,
        output_tokens: None,
        cached_input_tokens: None,
        cache_write_input_tokens: None,
        reasoning_tokens: None,
        route: None,
        method: None,
        status_code: None,
        request_bytes: None,
        response_bytes: None,
        agent: None,
        run_id: None,
        parent_run_id: None,
        status: None,
        latency_ms: None,
        duration_ms: None,
        steps: None,
        tool_calls: None,
        _delivery: 1,
    };
    match &ev.data {
        EventData::LlmUsage(u) => {
            row.provider = Some(&u.provider);
            row.model = Some(&u.model);
            row.input_tokens = Some(u.input_tokens);
            row.output_tokens = Some(u.output_tokens);
            row.cached_input_tokens = u.cached_input_tokens;
            row.cache_write_input_tokens = u.cache_write_input_tokens;
            row.reasoning_tokens = u.reasoning_tokens;
            row.latency_ms = u.latency_ms;
            row.status = u.status.as_deref();
            row.run_id = u.run_id.as_deref();
        }
        EventData::ApiRequest(r) => {
            row.route = r.route.as_deref();
            row.method = r.method.as_deref();
            row.status_code = Some(r.status_code);
            row.latency_ms = Some(r.latency_ms);
            row.request_bytes = r.request_bytes;
            row.response_bytes = r.response_bytes;
        }
        EventData::AgentRun(a) => {
            row.agent = a.agent.as_deref();
            row.run_id = Some(&a.run_id);
            row.parent_run_id = a.parent_run_id.as_deref();
            row.status = a.status.as_deref();
            row.duration_ms = Some(a.duration_ms);
            row.steps = a.steps;
            row.tool_calls = a.tool_calls;
        }
    }
    row
}

async fn exec(ch: &clickhouse::Client, sql: &str) -> Result<()> {
    ch.query(sql)
        .execute()
        .await
        .with_context(|| sql.to_owned())
}

async fn count(ch: &clickhouse::Client, sql: &str) -> Result<u64> {
    ch.query(sql)
        .fetch_one::<u64>()
        .await
        .with_context(|| sql.to_owned())
}

/// The plain insert: the crate's `RowBinary` insert, one `INSERT` per batch.
async fn plain_insert(
    ch: &clickhouse::Client,
    table: &str,
    rows: &[StoredEvent],
) -> Result<Duration> {
    let started = Instant::now();
    for chunk in rows.chunks(BATCH) {
        let mut insert = ch.insert_unescaped::<PlainRow<'_>>(table).await?;
        for e in chunk {
            insert.write(&plain_row(e)).await?;
        }
        insert.end().await?;
    }
    Ok(started.elapsed())
}

/// The month blocks of `rows`, in batches as the sink makes them, sent to `entry`.
async fn native_inserts(
    ch: &clickhouse::Client,
    entry: &str,
    rows: &[StoredEvent],
) -> Result<Duration> {
    let mut blocks = Vec::new();
    for (i, chunk) in rows.chunks(BATCH).enumerate() {
        blocks.extend(month_blocks("bench", i as u64, chunk)?);
    }
    let started = Instant::now();
    for block in &blocks {
        let mut insert = ch
            .insert_native_unescaped(&format!("{DATABASE}.{entry}"))
            .with_setting("group_by_two_level_threshold", "0")
            .with_setting("group_by_two_level_threshold_bytes", "0");
        insert.write(&block.block).await?;
        insert.end().await?;
    }
    Ok(started.elapsed())
}

fn rate(n: usize, d: Duration) -> String {
    format!(
        "{:>10.0} rows/s  ({:.2} s)",
        n as f64 / d.as_secs_f64(),
        d.as_secs_f64()
    )
}

fn main() -> Result<()> {
    let opts = options()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(opts))
}

async fn run(opts: Options) -> Result<()> {
    let events = load(&opts.input)?;
    let n = events.len();
    println!("{n} unique events from {}", opts.input);
    let rows: Vec<StoredEvent> = events
        .iter()
        .map(|event| StoredEvent {
            ingested_at_us: chrono::Utc::now().timestamp_micros(),
            event: event.clone(),
        })
        .collect();

    let mut config = ClickHouseConfig::new(opts.url.clone());
    config.database = DATABASE.to_owned();
    config.batch_rows = BATCH;
    let ch = client(&config);
    exec(&ch, &format!("DROP DATABASE IF EXISTS {DATABASE}")).await?;
    let version = schema::ensure(&ch, &config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .server;
    println!("ClickHouse {}", version.text);
    if version.dialect().datetime64 {
        bail!("the plain insert's row type is the ClickHouse 18.16 form of events");
    }

    // Baseline: the same rows, plain crate insert, into a table of `events`'s structure.
    exec(
        &ch,
        &format!("CREATE TABLE {DATABASE}.plain AS {DATABASE}.events"),
    )
    .await?;
    let plain = plain_insert(&ch, &format!("{DATABASE}.plain"), &rows).await?;

    // Fill a log (not timed), the way ingest does: dedup, fsync, group commit.
    let dir = tempfile::tempdir()?;
    let mut ingest_config = IngestConfig::new(dir.path());
    ingest_config.sinks = vec!["clickhouse".to_owned()];
    ingest_config.max_log_bytes = u64::MAX;
    ingest_config.max_tail_rows = usize::MAX;
    let ingest = Ingest::open(ingest_config)?;
    for chunk in events.chunks(10_000) {
        let outcome = ingest
            .submit(chunk.to_vec())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if outcome.accepted != chunk.len() {
            bail!(
                "the log took {} of {} events",
                outcome.accepted,
                chunk.len()
            );
        }
    }
    let log = Arc::clone(ingest.log());
    let end = log.durable_end();
    let consumer = ingest
        .sink_consumer("clickhouse")
        .context("clickhouse consumer")?;
    let ing = Arc::clone(&ingest);
    tokio::task::spawn_blocking(move || ing.shutdown()).await??;
    println!("log filled: {end} bytes");

    // meterd: log -> ClickHouse, every view attached.
    let stop = CancellationToken::new();
    let started = Instant::now();
    let handle = meterd_store_clickhouse::spawn(
        Arc::clone(&log),
        consumer,
        ingest.node_id().to_owned(),
        dir.path().to_owned(),
        config,
        stop.clone(),
    );
    while handle.status.delivered() < end {
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("delivery did not finish: {:?}", handle.status.last_error());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let meterd_time = started.elapsed();
    stop.cancel();
    handle.join().await;
    let stored = count(&ch, &format!("SELECT count() FROM {DATABASE}.events")).await?;
    let counted = count(
        &ch,
        &format!("SELECT toUInt64(sum(events)) FROM {DATABASE}.usage_daily"),
    )
    .await?;
    if stored != n as u64 || counted != n as u64 {
        bail!("meterd delivered {stored} events, the rollups count {counted}, of {n}");
    }

    // The views' cost: the same blocks into `events_in` (events and both rollups) and into
    // `repair_events` (events only), into emptied tables.
    for table in ["events", "usage_hourly_state", "usage_daily_state"] {
        exec(&ch, &format!("TRUNCATE TABLE {DATABASE}.{table}")).await?;
    }
    let with_views = native_inserts(&ch, "events_in", &rows).await?;
    exec(&ch, &format!("TRUNCATE TABLE {DATABASE}.events")).await?;
    let events_only = native_inserts(&ch, "repair_events", &rows).await?;

    println!();
    println!("delivery of {n} events, batches of {BATCH}:");
    println!(
        "  meterd log -> ClickHouse (events + rollup views, exactly-once): {}",
        rate(n, meterd_time)
    );
    println!(
        "  plain clickhouse-crate RowBinary insert into events' structure: {}",
        rate(n, plain)
    );
    println!(
        "  plain clickhouse-crate Native insert into events_in (same views): {}",
        rate(n, with_views)
    );
    println!(
        "  meterd / plain RowBinary (no views): {:.2}x   meterd / plain Native (same views): {:.2}x",
        plain.as_secs_f64() / meterd_time.as_secs_f64(),
        with_views.as_secs_f64() / meterd_time.as_secs_f64()
    );
    println!();
    println!("materialized views, the same Native blocks:");
    println!(
        "  into events_in (events + usage_hourly + usage_daily): {}",
        rate(n, with_views)
    );
    println!(
        "  into repair_events (events only):                     {}",
        rate(n, events_only)
    );
    println!(
        "  with views / without: {:.2}x",
        events_only.as_secs_f64() / with_views.as_secs_f64()
    );
    exec(&ch, &format!("DROP DATABASE IF EXISTS {DATABASE}")).await?;
    Ok(())
}
