//! What exact sums cost: `SELECT tenant, model, sum(input_tokens), sum(output_tokens) ...
//! GROUP BY tenant, model` over in-memory events, through meterd's SQL engine (where `sum` over
//! integers is exact, `DECIMAL(38, 0)`), next to two baselines in the same run on the same
//! batches: DataFusion's own session and `sum` (wrapping `BIGINT` arithmetic), and meterd's
//! engine summing the same columns as `DOUBLE` (neither exact nor wrapping). Building the events
//! is not timed; each query runs several times and the best and median times are reported.
//!
//! ```text
//! cargo bench -p meterd-query --bench exact_sum -- [--events N] [--runs N]
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use meterd_query::{EventsSource, QueryConfig, QueryService};
use meterd_schemas::{
    Event, EventData, EventsBatchBuilder, EventsSnapshot, LlmUsage, SnapshotPin, StoredEvent,
};

const TENANTS: usize = 50;
const MODELS: [&str; 8] = [
    "gpt-4o",
    "gpt-4o-mini",
    "o3",
    "claude-sonnet-4",
    "claude-haiku",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "llama-3.3",
];
const BATCH_ROWS: usize = 65_536;

/// In-memory events, every one in the snapshot.
#[derive(Debug)]
struct Batches(Vec<RecordBatch>);

impl EventsSource for Batches {
    fn snapshot(&self) -> EventsSnapshot {
        EventsSnapshot {
            parquet_files: Vec::new(),
            batches: self.0.clone(),
        }
    }

    fn pin(&self) -> SnapshotPin {
        Arc::new(())
    }
}

/// `n` `llm.usage` events with token counts from a small deterministic generator.
fn events(n: usize) -> Result<Vec<RecordBatch>> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        // xorshift64: enough spread for group sizes and token counts, and reproducible.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::new();
    let mut builder = EventsBatchBuilder::new();
    for i in 0..n {
        let r = next();
        let event = StoredEvent {
            ingested_at_us: 1_795_000_000_000_000 + i as i64,
            event: Event {
                tenant: format!("tenant-{:02}", r as usize % TENANTS),
                id: format!("e{i}"),
                time_us: 1_795_000_000_000_000 + i as i64 * 1_000,
                subject: None,
                source: None,
                dimensions: BTreeMap::new(),
                data: EventData::LlmUsage(LlmUsage {
                    provider: "p".to_owned(),
                    model: MODELS[(r >> 8) as usize % MODELS.len()].to_owned(),
                    input_tokens: (r >> 16) as i64 % 20_000,
                    output_tokens: (r >> 32) as i64 % 4_000,
                    cached_input_tokens: None,
                    cache_write_input_tokens: None,
                    reasoning_tokens: None,
                    latency_ms: None,
                    status: None,
                    run_id: None,
                }),
            },
        };
        builder.append(&event)?;
        if builder.len() == BATCH_ROWS {
            out.push(builder.finish()?);
        }
    }
    if !builder.is_empty() {
        out.push(builder.finish()?);
    }
    Ok(out)
}

/// Best and median of `runs` timings of `query`, and its row count.
async fn time<F, Fut>(runs: usize, mut query: F) -> Result<(Duration, Duration, usize)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize>>,
{
    let mut times = Vec::with_capacity(runs);
    let mut rows = 0;
    for _ in 0..runs {
        let started = Instant::now();
        rows = query().await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok((times[0], times[runs / 2], rows))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut n = 10_000_000usize;
    let mut runs = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--events" => n = args.next().context("--events N")?.parse()?,
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    let runs = runs.max(1);
    println!("building {n} events (not timed)");
    let batches = events(n)?;

    let config = QueryConfig {
        timeout: Duration::from_secs(600),
        threads: std::thread::available_parallelism().map_or(1, |p| p.get()),
        memory_limit_bytes: 4 << 30,
        ..QueryConfig::default()
    };
    let service = QueryService::new(Arc::new(Batches(batches.clone())), config.clone()).await?;
    let group = "FROM events GROUP BY tenant, model";
    let exact = format!("SELECT tenant, model, sum(input_tokens), sum(output_tokens) {group}");
    let float = format!(
        "SELECT tenant, model, sum(CAST(input_tokens AS DOUBLE)), \
         sum(CAST(output_tokens AS DOUBLE)) {group}"
    );
    let count = |r: (arrow::datatypes::SchemaRef, Vec<RecordBatch>)| -> usize {
        r.1.iter().map(RecordBatch::num_rows).sum()
    };

    let plain = SessionContext::new_with_config(
        SessionConfig::new().with_target_partitions(config.threads),
    );
    plain.register_table(
        "events",
        Arc::new(MemTable::try_new(
            meterd_schemas::events_schema(),
            vec![batches],
        )?),
    )?;

    let meterd_exact = time(runs, || async { Ok(count(service.query(&exact).await?)) }).await?;
    let meterd_float = time(runs, || async { Ok(count(service.query(&float).await?)) }).await?;
    let datafusion_wrapping = time(runs, || async {
        let batches = plain.sql(&exact).await?.collect().await?;
        Ok(batches.iter().map(RecordBatch::num_rows).sum())
    })
    .await?;

    println!();
    println!(
        "{n} events, {} groups, {runs} runs, {} query threads",
        meterd_exact.2, config.threads
    );
    println!("| | best | median | events/s (best) |");
    println!("|---|---|---|---|");
    for (name, (best, median, _)) in [
        ("meterd, exact sum (DECIMAL(38, 0))", meterd_exact),
        ("meterd, sum of DOUBLE", meterd_float),
        ("DataFusion, wrapping BIGINT sum", datafusion_wrapping),
    ] {
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} M |",
            best.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e3,
            n as f64 / best.as_secs_f64() / 1e6
        );
    }
    println!(
        "exact / wrapping (best): {:.2}x the time",
        meterd_exact.0.as_secs_f64() / datafusion_wrapping.0.as_secs_f64()
    );
    Ok(())
}
