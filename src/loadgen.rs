//! `meterd gen`: a deterministic generator of realistic usage events.
//!
//! Demos, tests and benchmarks need traffic that looks like the real thing: a few big tenants and a
//! long tail of small ones, a mix of LLM calls, API requests and agent runs with plausible token
//! counts and latencies, agent runs that spawn child runs, the odd error, late event and re-sent
//! duplicate. [`Generator`] produces such events from a seed alone, so the same [`GenConfig`]
//! always yields the same events, byte for byte: a failing test or a benchmark can be replayed
//! exactly. [`run`] writes them as NDJSON or posts them to a running meterd.
//!
//! Event ids are `evt-<seed>-<tag>-<n>` and run ids `run-<seed>-<tag>-<n>`, where the tag is a
//! hash of everything else that shapes the events (window, count, tenants, duplicate share): the
//! same configuration gives the same ids, so a re-run is answered as duplicates, and any other
//! configuration gives other ids, so two runs never send one id with two contents (a conflict).

mod catalog;
mod event;

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use chrono::{DateTime, DurationRound as _, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rand_distr::{Distribution as _, StandardNormal, Zipf};
use serde_json::Value;

use catalog::{AGENT_SOURCES, AGENTS, API_SOURCES, LLM_SOURCES, MODELS, PROVIDERS, ROUTES};
use event::{Data, Dimensions, Event, WireEvent};

use crate::send::{self, Batch, BatchSource, SendOptions, Unit};

/// Events encoded per write when producing a file.
const WRITE_CHUNK: usize = 4096;

/// Fresh events kept as candidates for deliberate duplicates.
const RECENT_EVENTS: usize = 1024;
/// Agent runs per tenant that LLM calls and child runs can refer to.
const RECENT_RUNS: usize = 8;
/// Zipf exponent of tenant sizes: tenant-00 gets about 30% of 20 tenants' traffic.
const TENANT_SKEW: f64 = 1.1;
/// Zipf exponent of activity over a tenant's users.
const USER_SKEW: f64 = 1.0;
/// Share of events that arrive late, with a time up to ten minutes before their neighbours.
const LATE_SHARE: f64 = 0.01;

/// `meterd gen` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct GenArgs {
    /// Seed of the generator: the same seed, --start and --end give byte-identical output.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Number of events to emit, deliberate duplicates included.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,

    /// Number of tenants (`tenant-00` is the biggest; sizes follow a Zipf law).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub tenants: u32,

    /// Start of the event time window (RFC 3339, inclusive) [default: --end minus 24 hours].
    #[arg(long, value_parser = parse_time)]
    pub start: Option<DateTime<Utc>>,

    /// End of the event time window (RFC 3339, exclusive) [default: now, truncated to the minute].
    #[arg(long, value_parser = parse_time)]
    pub end: Option<DateTime<Utc>>,

    /// Share of emitted events that are exact re-sends of an earlier event (0 to 1).
    #[arg(long, default_value_t = 0.02, value_parser = parse_fraction)]
    pub duplicates: f64,

    /// Where to write the NDJSON events; `-` is stdout.
    #[arg(long, default_value = "-")]
    pub out: PathBuf,

    /// POST the events in batches to this URL instead, e.g. http://127.0.0.1:8080/v1/events.
    #[arg(long, conflicts_with = "out")]
    pub url: Option<reqwest::Url>,

    /// Events per POST.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,

    /// Events per second to send at most; 0 sends as fast as the server takes them.
    #[arg(long, default_value_t = 0.0, value_parser = send::parse_rate)]
    pub rate: f64,

    /// POST requests in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,

    /// API key, sent as `Authorization: Bearer <KEY>`.
    #[arg(long)]
    pub api_key: Option<String>,
}

impl GenArgs {
    /// The generator configuration these arguments describe, with the time window resolved
    /// against the current time.
    pub fn config(&self) -> anyhow::Result<GenConfig> {
        self.config_at(Utc::now())
    }

    fn config_at(&self, now: DateTime<Utc>) -> anyhow::Result<GenConfig> {
        let end = match self.end {
            Some(end) => end,
            None => truncate_to_minute(now)?,
        };
        let start = match self.start {
            Some(start) => start,
            None => end - TimeDelta::hours(24),
        };
        if start >= end {
            bail!(
                "--start ({}) must be before --end ({})",
                start.to_rfc3339(),
                end.to_rfc3339()
            );
        }
        Ok(GenConfig {
            seed: self.seed,
            events: self.events,
            tenants: self.tenants,
            start,
            end,
            duplicates: self.duplicates,
        })
    }
}

fn truncate_to_minute(t: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    t.duration_trunc(TimeDelta::minutes(1))
        .context("truncating the current time to the minute")
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected an RFC 3339 time such as 2026-11-21T10:00:00Z ({e})"))
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err("expected a fraction between 0 and 1, e.g. 0.02".to_owned()),
    }
}

/// Runs `meterd gen`: writes the events as NDJSON to `--out`, or posts them to `--url`.
pub async fn run(args: GenArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let generator = Generator::new(config);
    match args.url {
        Some(url) => {
            let options = SendOptions {
                url: SendOptions::ingest_url(url),
                batch: usize::try_from(args.batch).context("--batch is too large")?,
                rate: args.rate,
                concurrency: usize::try_from(args.concurrency)
                    .context("--concurrency is too large")?,
                api_key: args.api_key,
            };
            let total = generator.remaining();
            send::post_all("meterd gen", generator, options, Some(total), Unit::Events).await?;
            Ok(())
        }
        None => {
            let out = args.out;
            tokio::task::spawn_blocking(move || write_ndjson(generator, &out))
                .await
                .context("the writer thread panicked")?
        }
    }
}

/// Writes every event of `generator` as NDJSON to `out` (`-` is stdout).
///
/// A closed pipe (`meterd gen | head`) ends the output quietly.
fn write_ndjson(mut generator: Generator, out: &Path) -> anyhow::Result<()> {
    let to_stdout = out == Path::new("-");
    let mut sink: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?)
    };
    let name = if to_stdout {
        "stdout".to_owned()
    } else {
        out.display().to_string()
    };
    let mut buf = Vec::with_capacity(WRITE_CHUNK * 512);
    loop {
        buf.clear();
        if generator.fill_ndjson(WRITE_CHUNK, &mut buf) == 0 {
            break;
        }
        match sink.write_all(&buf) {
            Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(()),
            other => other.with_context(|| format!("writing events to {name}"))?,
        }
    }
    match sink.flush() {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        other => other.with_context(|| format!("writing events to {name}")),
    }
}

impl BatchSource for Generator {
    async fn next_batch(&mut self, max_events: usize) -> anyhow::Result<Option<Batch>> {
        let first_event = self.emitted;
        let mut body = Vec::with_capacity(max_events.saturating_mul(512).min(64 << 20));
        let events = self.fill_ndjson(max_events, &mut body) as u64;
        Ok((events > 0).then_some(Batch {
            body,
            events,
            progress: events,
            lines: Vec::new(),
            first_event,
        }))
    }
}

/// What to generate. Plain data: tests and benchmarks fill it in directly.
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    /// Seed of the pseudo-random generator; also part of every event and run id.
    pub seed: u64,
    /// Number of events to emit, deliberate duplicates included.
    pub events: u64,
    /// Number of tenants, `tenant-00` (the biggest) upwards; 0 counts as 1.
    pub tenants: u32,
    /// Start of the time window, inclusive.
    pub start: DateTime<Utc>,
    /// End of the time window, exclusive. If it is not after `start`, every event gets `start`.
    pub end: DateTime<Utc>,
    /// Share of emitted events that re-send an earlier event exactly, clamped to [0, 1].
    pub duplicates: f64,
}

impl Default for GenConfig {
    /// The `meterd gen` defaults: 10,000 events of 20 tenants over the 24 hours before the current
    /// minute, 2% duplicates, seed 42. Set `start` and `end` for reproducible output.
    fn default() -> Self {
        let now = Utc::now();
        let end = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
        Self {
            seed: 42,
            events: 10_000,
            tenants: 20,
            start: end - TimeDelta::hours(24),
            end,
            duplicates: 0.02,
        }
    }
}

/// Produces the events of a [`GenConfig`], always the same ones in the same order.
#[derive(Debug)]
pub struct Generator {
    config: GenConfig,
    /// Identifies the configuration in every id; see the module documentation.
    tag: u32,
    duplicate_share: f64,
    rng: StdRng,
    tenants: Vec<Tenant>,
    tenant_sizes: Zipf<f64>,
    timeline: Timeline,
    emitted: u64,
    recent: VecDeque<Event>,
}

/// What makes one tenant's traffic its own.
#[derive(Debug)]
struct Tenant {
    name: String,
    users: Zipf<f64>,
    /// Index into [`PROVIDERS`] of the provider this tenant uses most.
    favourite_provider: usize,
    /// Index into [`catalog::REGIONS`] of where this tenant mostly runs.
    home_region: usize,
    recent_runs: VecDeque<Run>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    seq: u64,
    agent: &'static str,
}

impl Generator {
    /// A generator for `config`; nothing is generated until asked for.
    pub fn new(config: GenConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let tenant_count = config.tenants.max(1);
        let width = tenant_count.saturating_sub(1).to_string().len().max(2);
        let tenants = (0..tenant_count)
            .map(|rank| {
                // Bigger tenants have more users; the smallest still have a handful.
                let users = (3000.0 / f64::from(rank + 1).powf(0.9)).max(5.0).round();
                Tenant {
                    name: format!("tenant-{rank:0width$}"),
                    users: zipf(users, USER_SKEW),
                    favourite_provider: rng.random_range(0..PROVIDERS.len()),
                    home_region: rng.random_range(0..catalog::REGIONS.len()),
                    recent_runs: VecDeque::with_capacity(RECENT_RUNS),
                }
            })
            .collect();
        let timeline = Timeline::new(config.start, config.end);
        let duplicate_share = if config.duplicates.is_nan() {
            0.0
        } else {
            config.duplicates.clamp(0.0, 1.0)
        };
        Self {
            tenant_sizes: zipf(f64::from(tenant_count), TENANT_SKEW),
            tag: config_tag(&config),
            config,
            duplicate_share,
            rng,
            tenants,
            timeline,
            emitted: 0,
            recent: VecDeque::with_capacity(RECENT_EVENTS),
        }
    }

    /// The configuration this generator was built from.
    pub fn config(&self) -> &GenConfig {
        &self.config
    }

    /// Events still to come.
    pub fn remaining(&self) -> u64 {
        self.config.events - self.emitted
    }

    /// The next event as a JSON object; `None` after `events` events.
    pub fn next_event(&mut self) -> Option<Value> {
        let event = self.next_raw()?;
        let wire = self.wire(&event);
        // Serialising into a `Value` fails only on non-string map keys, which events never have.
        Some(serde_json::to_value(wire).expect("generated events serialise"))
    }

    /// Appends the next up to `n` events as NDJSON lines to `out`; returns how many.
    pub fn fill_ndjson(&mut self, n: usize, out: &mut Vec<u8>) -> usize {
        let mut written = 0;
        while written < n {
            let Some(event) = self.next_raw() else { break };
            let wire = self.wire(&event);
            // Writing into a Vec cannot fail and events have no non-string keys.
            serde_json::to_writer(&mut *out, &wire).expect("generated events serialise");
            out.push(b'\n');
            written += 1;
        }
        written
    }

    fn wire<'a>(&'a self, event: &'a Event) -> WireEvent<'a> {
        WireEvent {
            event,
            seed: self.config.seed,
            tag: self.tag,
            tenant: &self.tenants[event.tenant].name,
        }
    }

    fn next_raw(&mut self) -> Option<Event> {
        if self.emitted >= self.config.events {
            return None;
        }
        let seq = self.emitted;
        self.emitted += 1;
        if !self.recent.is_empty() && self.rng.random_bool(self.duplicate_share) {
            let pick = self.rng.random_range(0..self.recent.len());
            return Some(self.recent[pick]);
        }
        let event = self.fresh(seq);
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
        Some(event)
    }

    fn fresh(&mut self, seq: u64) -> Event {
        let rng = &mut self.rng;
        // Events march through the window in order; a jitter inside each slot keeps times
        // distinct and a few late arrivals break the order, as they do in real pipelines.
        let u = (seq as f64 + rng.random::<f64>()) / self.config.events as f64;
        let mut time_ms = self.timeline.at(u);
        if rng.random_bool(LATE_SHARE) {
            time_ms = (time_ms - rng.random_range(1_000..600_000)).max(self.timeline.start_ms);
        }
        let tenant_index = sample_rank(&self.tenant_sizes, rng, self.tenants.len());
        let tenant = &mut self.tenants[tenant_index];
        let subject = rng
            .random_bool(0.95)
            .then(|| sample_rank(&tenant.users, rng, usize::MAX) as u32 + 1);

        let kind = rng.random::<f64>();
        let (data, source, agent) = if kind < 0.60 {
            let run = if !tenant.recent_runs.is_empty() && rng.random_bool(0.35) {
                Some(tenant.recent_runs[rng.random_range(0..tenant.recent_runs.len())])
            } else {
                None
            };
            let source = match run {
                Some(_) => "agent-runtime",
                None => catalog::pick(rng, LLM_SOURCES, |s| s.1).0,
            };
            (
                llm_usage(rng, tenant.favourite_provider, run),
                source,
                run.map(|r| r.agent),
            )
        } else if kind < 0.85 {
            (
                api_request(rng),
                catalog::pick(rng, API_SOURCES, |s| s.1).0,
                None,
            )
        } else {
            let data = agent_run(rng, seq, tenant);
            let agent = match data {
                Data::Agent { agent, .. } => Some(agent),
                _ => None,
            };
            (data, catalog::pick(rng, AGENT_SOURCES, |s| s.1).0, agent)
        };
        let dimensions = dimensions(rng, &data, agent, tenant.home_region);
        Event {
            seq,
            tenant: tenant_index,
            time_ms,
            subject,
            source,
            dimensions,
            data,
        }
    }
}

impl Iterator for Generator {
    type Item = Value;

    fn next(&mut self) -> Option<Value> {
        self.next_event()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.remaining()).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

/// A stable hash of what shapes the events besides the seed (which ids carry on its own).
/// xxh3 rather than std's hasher, whose output may change between Rust releases: the ids must
/// stay the same for the same arguments.
fn config_tag(config: &GenConfig) -> u32 {
    let canonical = format!(
        "{}|{}|{}|{}|{}",
        config.events,
        config.tenants,
        config.start.timestamp_micros(),
        config.end.timestamp_micros(),
        config.duplicates.to_bits(),
    );
    // The low 32 bits are plenty to tell a handful of runs of one seed apart.
    xxhash_rust::xxh3::xxh3_64(canonical.as_bytes()) as u32
}

/// A Zipf distribution over `1..=n`; `n` is at least 1 and `s` non-negative by construction.
fn zipf(n: f64, s: f64) -> Zipf<f64> {
    Zipf::new(n.max(1.0), s.max(0.0)).expect("n >= 1 and s >= 0")
}

/// A 0-based rank drawn from `dist`, kept below `len`.
fn sample_rank(dist: &Zipf<f64>, rng: &mut StdRng, len: usize) -> usize {
    let rank = dist.sample(rng) as usize;
    rank.saturating_sub(1).min(len.saturating_sub(1))
}

/// `median * e^(sigma * N(0, 1))`: most values near the median, a long tail upwards.
fn log_normal(rng: &mut StdRng, median: f64, sigma: f64) -> f64 {
    let z: f64 = rng.sample(StandardNormal);
    median * (sigma * z).exp()
}

fn count(x: f64, min: u64, max: u64) -> u64 {
    (x.round() as u64).clamp(min, max)
}

fn llm_usage(rng: &mut StdRng, favourite_provider: usize, run: Option<Run>) -> Data {
    let favourite = PROVIDERS[favourite_provider];
    let model = catalog::pick(rng, MODELS, |m| {
        if m.provider == favourite {
            m.weight * 3
        } else {
            m.weight
        }
    });
    let failed = rng.random_bool(0.015);
    let input = count(log_normal(rng, model.input_median, 1.1), 5, model.max_input);
    let mut output = if model.output_median > 0.0 {
        count(log_normal(rng, model.output_median, 0.8), 1, 16_384)
    } else {
        0
    };
    let cached = model.reports_cache.then(|| {
        // Providers cache long prompts only, and only some requests hit the cache.
        if input >= 1024 && rng.random_bool(0.4) {
            (input as f64 * rng.random_range(0.3..0.95)) as u64
        } else {
            0
        }
    });
    let mut reasoning = (model.reasoning_median > 0.0)
        .then(|| count(log_normal(rng, model.reasoning_median, 1.0), 0, 65_536));
    let first_token = log_normal(rng, model.first_token_ms, 0.35);
    let mut latency = if failed {
        output = 0;
        reasoning = reasoning.map(|_| 0);
        if rng.random_bool(0.2) {
            // Timed out at the client's limit.
            60_000.0 + rng.random_range(0.0..500.0)
        } else {
            first_token * rng.random_range(0.2..1.0)
        }
    } else {
        let generated = (output + reasoning.unwrap_or(0)) as f64;
        first_token
            + generated * log_normal(rng, model.ms_per_token, 0.25)
            + input as f64 * model.ms_per_input_token
    };
    latency = latency.max(1.0);
    Data::Llm {
        provider: model.provider,
        model: model.name,
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        reasoning_tokens: reasoning,
        latency_ms: latency.round() as u64,
        status: if failed { "error" } else { "ok" },
        run: run.map(|r| r.seq),
    }
}

fn api_request(rng: &mut StdRng) -> Data {
    let route = catalog::pick(rng, ROUTES, |r| r.weight);
    let class = rng.random::<f64>();
    let status_code = if class < 0.01 {
        catalog::pick(rng, catalog::SERVER_ERRORS, |s| s.1).0
    } else if class < 0.06 {
        catalog::pick(rng, catalog::CLIENT_ERRORS, |s| s.1).0
    } else {
        route.ok_status
    };
    let mut latency = log_normal(rng, route.latency_median_ms, 0.6);
    if rng.random_bool(0.02) {
        // The long tail: cold caches, GC pauses, slow upstreams.
        latency *= rng.random_range(5.0..30.0);
    }
    let request_bytes = if route.request_median_bytes > 0.0 {
        count(
            log_normal(rng, route.request_median_bytes, 0.7),
            2,
            50_000_000,
        )
    } else {
        0
    };
    let response_bytes = match status_code {
        504 => {
            latency = rng.random_range(30_000.0..60_000.0);
            count(log_normal(rng, 150.0, 0.3), 20, 10_000)
        }
        400..=599 => {
            latency = latency * 0.1 + 2.0;
            count(log_normal(rng, 180.0, 0.4), 20, 10_000)
        }
        _ => count(
            log_normal(rng, route.response_median_bytes, 0.8),
            0,
            50_000_000,
        ),
    };
    Data::Api {
        route: route.template,
        method: route.method,
        status_code,
        latency_ms: count(latency, 1, 3_600_000),
        request_bytes,
        response_bytes,
    }
}

fn agent_run(rng: &mut StdRng, seq: u64, tenant: &mut Tenant) -> Data {
    let agent = catalog::pick(rng, AGENTS, |a| a.weight);
    // Researchers and coders delegate sub-tasks more often than the others.
    let delegation = if agent.delegates { 0.25 } else { 0.08 };
    let parent = (!tenant.recent_runs.is_empty() && rng.random_bool(delegation))
        .then(|| tenant.recent_runs[rng.random_range(0..tenant.recent_runs.len())].seq);
    let status = catalog::pick(rng, catalog::RUN_STATUSES, |s| s.1).0;
    let mut steps = 1 + count(log_normal(rng, agent.steps_median, 0.6), 0, 199);
    let mut duration = 150.0 + steps as f64 * log_normal(rng, agent.step_ms_median, 0.5);
    match status {
        "timeout" => duration = 300_000.0 + rng.random_range(0.0..2_000.0),
        "cancelled" => {
            let done = rng.random_range(0.1..0.7);
            duration *= done;
            steps = ((steps as f64 * done).ceil() as u64).max(1);
        }
        "failed" => {
            let done = rng.random_range(0.2..1.0);
            duration *= done;
            steps = ((steps as f64 * done).ceil() as u64).max(1);
        }
        _ => {}
    }
    let tool_calls = count(
        steps as f64 * agent.tools_per_step * log_normal(rng, 1.0, 0.4),
        0,
        1000,
    );
    if tenant.recent_runs.len() == RECENT_RUNS {
        tenant.recent_runs.pop_front();
    }
    tenant.recent_runs.push_back(Run {
        seq,
        agent: agent.name,
    });
    Data::Agent {
        agent: agent.name,
        run: seq,
        parent,
        status,
        duration_ms: count(duration, 1, 86_400_000),
        steps,
        tool_calls,
    }
}

/// 0 to 3 dimensions, keys in catalogue order, values from small fixed sets.
fn dimensions(
    rng: &mut StdRng,
    data: &Data,
    agent: Option<&'static str>,
    home_region: usize,
) -> Dimensions {
    let wanted = catalog::pick(rng, &[(0usize, 30u32), (1, 35), (2, 22), (3, 13)], |c| c.1).0;
    let mut dims = Dimensions::default();
    if wanted == 0 {
        return dims;
    }
    let mut usable = [""; catalog::DIMENSION_KEYS.len()];
    let mut candidates = 0;
    for key in catalog::DIMENSION_KEYS {
        let fits = match key {
            "agent" => agent.is_some(),
            "feature" => !matches!(data, Data::Agent { .. }),
            _ => true,
        };
        if fits {
            usable[candidates] = key;
            candidates += 1;
        }
    }
    // A partial Fisher-Yates shuffle picks the keys; sorting restores catalogue order.
    let mut order: [usize; catalog::DIMENSION_KEYS.len()] = std::array::from_fn(|i| i);
    let take = wanted.min(candidates);
    for i in 0..take {
        let j = rng.random_range(i..candidates);
        order.swap(i, j);
    }
    let chosen = &mut order[..take];
    chosen.sort_unstable();
    for key in chosen.iter().map(|&i| usable[i]) {
        let value = match key {
            "department" => catalog::pick(rng, catalog::DEPARTMENTS, |d| d.1).0,
            "environment" => catalog::pick(rng, catalog::ENVIRONMENTS, |e| e.1).0,
            "agent" => agent.unwrap_or("faq"),
            "region" => {
                if rng.random_bool(0.85) {
                    catalog::REGIONS[home_region]
                } else {
                    catalog::REGIONS[rng.random_range(0..catalog::REGIONS.len())]
                }
            }
            _ => catalog::pick(rng, catalog::FEATURES, |f| f.1).0,
        };
        dims.push(key, value);
    }
    dims
}

/// Maps a position in [0, 1) of the event sequence to a time, busier in the daytime (UTC) and on
/// weekdays, so dashboards show the daily cycle they would in production.
#[derive(Debug)]
struct Timeline {
    start_ms: i64,
    end_ms: i64,
    bucket_ms: f64,
    /// `cdf[i]` is the share of events before bucket `i`; `cdf[0] = 0`, last = 1.
    cdf: Vec<f64>,
}

impl Timeline {
    const MAX_BUCKETS: i64 = 4096;

    fn new(start: DateTime<Utc>, end: DateTime<Utc>) -> Self {
        // Round the start up, so no event falls before it at millisecond precision.
        let start_ms = start.timestamp_millis()
            + i64::from(!start.timestamp_subsec_nanos().is_multiple_of(1_000_000));
        let end_ms = end.timestamp_millis().max(start_ms);
        let span = end_ms - start_ms;
        let buckets = (span / 60_000).clamp(1, Self::MAX_BUCKETS);
        let bucket_ms = span as f64 / buckets as f64;
        let mut cdf = Vec::with_capacity(buckets as usize + 1);
        cdf.push(0.0);
        let mut total = 0.0;
        for i in 0..buckets {
            let mid = start_ms as f64 + (i as f64 + 0.5) * bucket_ms;
            total += activity(mid);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Self {
            start_ms,
            end_ms,
            bucket_ms,
            cdf,
        }
    }

    fn at(&self, u: f64) -> i64 {
        if self.end_ms <= self.start_ms {
            return self.start_ms;
        }
        let buckets = self.cdf.len() - 1;
        let i = self
            .cdf
            .partition_point(|&c| c <= u)
            .saturating_sub(1)
            .min(buckets - 1);
        let (lo, hi) = (self.cdf[i], self.cdf[i + 1]);
        let within = if hi > lo {
            ((u - lo) / (hi - lo)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let offset = ((i as f64 + within) * self.bucket_ms) as i64;
        (self.start_ms + offset).clamp(self.start_ms, self.end_ms - 1)
    }
}

/// Relative traffic at a UTC instant (milliseconds since the epoch).
fn activity(ms: f64) -> f64 {
    const HOUR: f64 = 3_600_000.0;
    const DAY: f64 = 24.0 * HOUR;
    let hour = (ms / HOUR).rem_euclid(24.0);
    let from_peak = (hour - 15.0).abs();
    let from_peak = from_peak.min(24.0 - from_peak);
    let daily = 0.3 + 0.7 * (-0.5 * (from_peak / 4.5).powi(2)).exp();
    // 1970-01-01 was a Thursday: day 0 -> 4 with Sunday = 0.
    let weekday = ((ms / DAY).floor() as i64 + 4).rem_euclid(7);
    let weekly = if weekday == 0 || weekday == 6 {
        0.6
    } else {
        1.0
    };
    daily * weekly
}

#[cfg(test)]
mod tests;
