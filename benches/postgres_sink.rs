//! Delivery from meterd's log into PostgreSQL, against plain binary COPY of the same rows with no
//! service in between (into a table without indexes, and into one with a unique
//! `(tenant, id, time)` index), measured in the same run; and the cost of a rollup refresh
//! against the equivalent raw GROUP BY.
//!
//! A bench target of the ingest crate (so it builds without DataFusion), fed with events from
//! `meterd gen`:
//!
//! ```text
//! cargo run --release -- gen --events 2000000 --tenants 50 --seed 7 --out /tmp/events.ndjson
//! cargo bench -p meterd-store-postgres --bench postgres_sink -- --input /tmp/events.ndjson [--url URL]
//! ```
//!
//! `--url` (or `METERD_TEST_POSTGRES_URL`) is an administrative URL; the bench creates and drops
//! the database `meterd_bench`.

use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meterd_ingest::{Ingest, IngestConfig};
use meterd_schemas::{Limits, StoredEvent, ValidationContext, validate_event};
use meterd_store_postgres::{PostgresConfig, TimescaleMode, copy};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

const BATCH: usize = 10_000;
const DATABASE: &str = "meterd_bench";

struct Options {
    input: String,
    url: String,
}

fn options() -> Result<Options> {
    let mut input = None;
    let mut url = std::env::var("METERD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://meterd:meterd@127.0.0.1:5432/postgres".to_owned());
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

fn with_database(url: &str, database: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].ends_with(|c: char| c != '/') && url[..i].contains("://") => {
            format!("{}/{database}", &url[..i])
        }
        _ => format!("{url}/{database}"),
    }
}

async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
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
        // meterd dedups on the way in; the baselines get the same unique rows.
        if seen.insert((event.tenant.clone(), event.id.clone())) {
            events.push(event);
        }
    }
    Ok(events)
}

/// Plain binary COPY of `rows` into `table`, one transaction per batch, as the sink batches.
async fn plain_copy(client: &mut Client, table: &str, rows: &[StoredEvent]) -> Result<Duration> {
    let started = Instant::now();
    for chunk in rows.chunks(BATCH) {
        let tx = client.transaction().await?;
        let sink = tx.copy_in(&copy::copy_statement(table)).await?;
        let writer = BinaryCopyInWriter::new(sink, &copy::types());
        tokio::pin!(writer);
        for e in chunk {
            copy::write_event(writer.as_mut(), e).await?;
        }
        writer.finish().await?;
        tx.commit().await?;
    }
    Ok(started.elapsed())
}

/// Hourly buckets waiting for a refresh.
async fn invalidated(client: &Client) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM meterd.rollup_invalidations WHERE rollup = 'usage_hourly'",
            &[],
        )
        .await?
        .get(0))
}

async fn timed(client: &Client, sql: &str) -> Result<Duration> {
    let started = Instant::now();
    client
        .batch_execute(sql)
        .await
        .with_context(|| sql.to_owned())?;
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

    let admin = connect(&opts.url).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
        .await?;
    let url = with_database(&opts.url, DATABASE);
    let mut client = connect(&url).await?;
    let mut config = PostgresConfig::new(url.clone());
    config.timescaledb = TimescaleMode::Off;
    config.refresh_interval = Duration::from_secs(3600);
    let report = meterd_store_postgres::migrate(&mut client, &config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "schema: {} version {}",
        report.flavor.as_str(),
        report.version
    );

    // Baselines: the same rows, plain binary COPY, no service in between.
    let rows: Vec<StoredEvent> = events
        .iter()
        .map(|event| StoredEvent {
            ingested_at_us: chrono::Utc::now().timestamp_micros(),
            event: event.clone(),
        })
        .collect();
    client
        .batch_execute(
            "CREATE TABLE public.plain (LIKE meterd.events_data);
             CREATE TABLE public.uniq (LIKE meterd.events_data);
             CREATE UNIQUE INDEX ON public.uniq (tenant, id, time);",
        )
        .await?;
    // Each phase starts right after a checkpoint, so none pays for another's dirty pages.
    client.batch_execute("CHECKPOINT").await?;
    let plain = plain_copy(&mut client, "public.plain", &rows).await?;
    client.batch_execute("CHECKPOINT").await?;

    // Fill a log (not timed), the way ingest does: dedup, fsync, group commit.
    let dir = tempfile::tempdir()?;
    let mut ingest_config = IngestConfig::new(dir.path());
    ingest_config.sinks = vec!["postgres".to_owned()];
    ingest_config.max_log_bytes = u64::MAX;
    ingest_config.max_tail_rows = usize::MAX;
    let ingest = Ingest::open(ingest_config)?;
    for chunk in events.chunks(BATCH) {
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
        .sink_consumer("postgres")
        .context("postgres consumer")?;
    // Stop ingest's own threads (flush, compaction) so only the delivery is measured; the log
    // stays readable.
    let ing = Arc::clone(&ingest);
    tokio::task::spawn_blocking(move || ing.shutdown()).await??;
    println!("log filled: {end} bytes");

    // meterd: log -> PostgreSQL.
    let stop = CancellationToken::new();
    let started = Instant::now();
    let handle = meterd_store_postgres::spawn(
        Arc::clone(&log),
        consumer,
        ingest.node_id().to_owned(),
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
    client.batch_execute("CHECKPOINT").await?;
    let unique = plain_copy(&mut client, "public.uniq", &rows).await?;
    // The same COPY straight into meterd's table (partitions, index, invalidation trigger), no
    // log and no checkpoint: what the table costs, apart from the sink.
    client
        .batch_execute(
            "TRUNCATE meterd.events_data; TRUNCATE meterd.rollup_invalidations; CHECKPOINT;",
        )
        .await?;
    let into_meterd_table = plain_copy(&mut client, "meterd.events_data", &rows).await?;

    // Rollups: a full refresh of everything delivered against the same GROUP BY run raw.
    let hourly = meterd_rollups::rollup("usage_hourly").context("usage_hourly")?;
    let raw = meterd_store_postgres::rollups::select_sql(
        meterd_store_postgres::rollups::Flavor::Postgres,
        meterd_store_postgres::rollups::Sums::Exact,
        hourly,
        "meterd.events_data",
        None,
    );
    let raw_time = timed(&client, &format!("SELECT count(*) FROM ({raw}) AS g")).await?;
    let refresh_time = timed(&client, "SELECT meterd.refresh_rollups()").await?;
    let buckets: i64 = client
        .query_one(
            "SELECT count(DISTINCT bucket) FROM meterd.usage_hourly_mat",
            &[],
        )
        .await?
        .get(0);
    // Late events, 1,000 each: spread over the whole month (nearly every hour is touched), and
    // the realistic case, within the last few hours.
    timed(
        &client,
        "CREATE TEMP TABLE late AS SELECT * FROM public.plain ORDER BY random() LIMIT 1000;
         UPDATE late SET id = id || '-late';
         INSERT INTO meterd.events_data SELECT * FROM late;",
    )
    .await?;
    let spread_buckets = invalidated(&client).await?;
    let spread_time = timed(&client, "SELECT meterd.refresh_rollups()").await?;
    timed(
        &client,
        "CREATE TEMP TABLE recent AS SELECT * FROM public.plain ORDER BY random() LIMIT 1000;
         UPDATE recent SET id = id || '-recent',
             time = now() - INTERVAL '1 hour' - random() * INTERVAL '5 hours';
         SELECT meterd.ensure_event_partitions(ARRAY[now() - INTERVAL '6 hours', now()]);
         INSERT INTO meterd.events_data SELECT * FROM recent;",
    )
    .await?;
    let recent_buckets = invalidated(&client).await?;
    let recent_time = timed(&client, "SELECT meterd.refresh_rollups()").await?;

    println!();
    println!("delivery of {n} events, batches of {BATCH}:");
    println!(
        "  meterd log -> PostgreSQL (partitioned, indexed, exactly-once): {}",
        rate(n, meterd_time)
    );
    println!(
        "  plain binary COPY, no index:                                  {}",
        rate(n, plain)
    );
    println!(
        "  plain binary COPY, unique (tenant, id, time) index:           {}",
        rate(n, unique)
    );
    println!(
        "  plain binary COPY into meterd's table, no log, no checkpoint: {}",
        rate(n, into_meterd_table)
    );
    println!(
        "  meterd / plain: {:.2}x   meterd / unique-index: {:.2}x",
        plain.as_secs_f64() / meterd_time.as_secs_f64(),
        unique.as_secs_f64() / meterd_time.as_secs_f64()
    );
    println!();
    println!("rollups over {n} events ({buckets} hourly buckets):");
    println!(
        "  raw GROUP BY (hourly):                   {:.2} s",
        raw_time.as_secs_f64()
    );
    println!(
        "  full refresh (hourly + daily):           {:.2} s",
        refresh_time.as_secs_f64()
    );
    println!(
        "  refresh after 1,000 late events over the month ({spread_buckets} invalidated hours): {:.2} s",
        spread_time.as_secs_f64()
    );
    println!(
        "  refresh after 1,000 late events in the last 6 hours ({recent_buckets} invalidated hours): {:.3} s",
        recent_time.as_secs_f64()
    );

    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        .await?;
    Ok(())
}
