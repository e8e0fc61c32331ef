//! Sending NDJSON events to a running meterd in batches: `meterd gen --url` and `meterd load`
//! share it. At most `concurrency` requests are in flight; 429, 503 and broken connections are
//! retried (ingest is idempotent, so a batch that did arrive is only answered as duplicates);
//! anything else stops the run with the server's reasons.

use std::future::Future;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use backon::{BackoffBuilder, ExponentialBuilder};
use indicatif::{HumanBytes, HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Retries of one batch before giving up.
const MAX_RETRIES: u32 = 20;
/// First retry delay without a Retry-After; doubles up to [`MAX_BACKOFF`], and jitter adds up to
/// as much again.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A Retry-After longer than this is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of an error body goes into an error message.
const BODY_EXCERPT: usize = 2000;
/// How often progress is reported as a line when stderr is not a terminal (a CI log, a file).
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(5);
/// Rejected events named in an error, at most.
const MAX_NAMED_REJECTIONS: usize = 20;

/// Parses `--rate` (of `meterd gen --url` and `meterd load`): events per second, 0 unlimited.
pub(crate) fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err("expected events per second, >= 0 (0 = unlimited)".to_owned()),
    }
}

/// How to POST events.
#[derive(Debug, Clone)]
pub(crate) struct SendOptions {
    pub url: reqwest::Url,
    /// Events per batch, at most.
    pub batch: usize,
    /// Events per second; 0 = unlimited.
    pub rate: f64,
    pub concurrency: usize,
    pub api_key: Option<String>,
}

impl SendOptions {
    /// `url` with a bare server address (`http://host:8080`) meaning its ingest endpoint.
    pub(crate) fn ingest_url(mut url: reqwest::Url) -> reqwest::Url {
        if url.path() == "/" {
            url.set_path("/v1/events");
        }
        url
    }
}

/// One request's worth of NDJSON events.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub body: Vec<u8>,
    pub events: u64,
    /// How far the progress bar moves once the batch is acknowledged (events or input bytes).
    pub progress: u64,
    /// The input line of each event, to name rejected events by line; empty names them by
    /// their position in the run.
    pub lines: Vec<u64>,
    /// How many events of the run came before this batch.
    pub first_event: u64,
}

/// Where batches come from.
pub(crate) trait BatchSource: Send {
    /// The next batch of at most `max_events` events; `None` at the end.
    fn next_batch(
        &mut self,
        max_events: usize,
    ) -> impl Future<Output = anyhow::Result<Option<Batch>>> + Send;
}

/// What the progress bar counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Events,
    Bytes,
}

/// What the server said about everything sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    pub events: u64,
    pub batches: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub conflicts: u64,
    pub retries: u64,
}

/// The ingest answer, `{"accepted": N, "duplicates": M, "conflicts": [...]}`.
#[derive(Debug, Deserialize)]
struct IngestAnswer {
    accepted: u64,
    #[serde(default)]
    duplicates: u64,
    #[serde(default)]
    conflicts: Vec<serde_json::Value>,
}

/// A progress bar on stderr when it is a terminal, redrawn as time passes even while a batch
/// waits for its answer; hidden otherwise (then [`post_all`] prints a line now and then).
fn progress_bar(total: Option<u64>, unit: Unit) -> anyhow::Result<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return Ok(ProgressBar::hidden());
    }
    let template = match (total, unit) {
        (Some(_), Unit::Events) => {
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events ({per_sec}, eta {eta})"
        }
        (Some(_), Unit::Bytes) => {
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})"
        }
        (None, Unit::Events) => "{spinner} [{elapsed_precise}] {human_pos} events ({per_sec})",
        (None, Unit::Bytes) => "{spinner} [{elapsed_precise}] {bytes} ({bytes_per_sec})",
    };
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template(template).context("progress bar template")?);
    bar.enable_steady_tick(Duration::from_millis(200));
    Ok(bar)
}

/// POSTs every batch of `source` with a progress bar (or, off a terminal, a progress line every
/// few seconds), then prints the totals to stderr. `command` names the run in what it prints.
pub(crate) async fn post_all(
    command: &str,
    source: impl BatchSource,
    options: SendOptions,
    total: Option<u64>,
    unit: Unit,
) -> anyhow::Result<Totals> {
    let bar = progress_bar(total, unit)?;
    let started = Instant::now();
    let reporter = (bar.is_hidden()).then(|| {
        let bar = bar.clone();
        let command = command.to_owned();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PROGRESS_LINE_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                let done = match unit {
                    Unit::Events => format!("{} events", HumanCount(bar.position())),
                    Unit::Bytes => format!("{}", HumanBytes(bar.position())),
                };
                let of = match (total, unit) {
                    (Some(t), Unit::Events) => format!(" of {}", HumanCount(t)),
                    (Some(t), Unit::Bytes) => format!(" of {}", HumanBytes(t)),
                    (None, _) => String::new(),
                };
                eprintln!(
                    "{command}: {done}{of} sent after {:.0}s",
                    started.elapsed().as_secs_f64()
                );
            }
        })
    });
    let result = post_batches(source, &options, &bar).await;
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    bar.finish_and_clear();
    let totals = result?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{command}: sent {} events in {} batches to {} in {:.1}s ({:.0} events/s): \
         accepted {}, duplicates {}, conflicts {}, retries {}",
        totals.events,
        totals.batches,
        options.url,
        secs,
        totals.events as f64 / secs.max(1e-9),
        totals.accepted,
        totals.duplicates,
        totals.conflicts,
        totals.retries,
    );
    Ok(totals)
}

/// Sends the batches, at most `concurrency` in flight, paced to `rate`; stops at the first
/// batch that fails for good.
pub(crate) async fn post_batches(
    mut source: impl BatchSource,
    options: &SendOptions,
    bar: &ProgressBar,
) -> anyhow::Result<Totals> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let in_flight = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks: JoinSet<anyhow::Result<(u64, IngestAnswer, u32)>> = JoinSet::new();
    let mut totals = Totals::default();
    let started = Instant::now();
    let mut queued = 0u64;
    while let Some(batch) = source.next_batch(options.batch.max(1)).await? {
        if batch.events == 0 {
            continue;
        }
        if options.rate > 0.0 {
            let due = started + Duration::from_secs_f64(queued as f64 / options.rate);
            tokio::time::sleep_until(due).await;
        }
        queued += batch.events;
        let permit = Arc::clone(&in_flight)
            .acquire_owned()
            .await
            .context("send queue closed")?;
        let client = client.clone();
        let url = options.url.clone();
        let api_key = options.api_key.clone();
        let bar = bar.clone();
        tasks.spawn(async move {
            let (answer, retries) = post_batch(&client, &url, api_key.as_deref(), &batch).await?;
            drop(permit);
            bar.inc(batch.progress);
            Ok((batch.events, answer, retries))
        });
        while let Some(done) = tasks.try_join_next() {
            add(&mut totals, done)?;
        }
    }
    while let Some(done) = tasks.join_next().await {
        add(&mut totals, done)?;
    }
    Ok(totals)
}

fn add(
    totals: &mut Totals,
    done: Result<anyhow::Result<(u64, IngestAnswer, u32)>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    let (events, answer, retries) = done.context("a sending task failed")??;
    totals.events += events;
    totals.batches += 1;
    totals.accepted += answer.accepted;
    totals.duplicates += answer.duplicates;
    totals.conflicts += answer.conflicts.len() as u64;
    totals.retries += u64::from(retries);
    Ok(())
}

enum Attempt {
    Done(IngestAnswer),
    Retry {
        after: Option<Duration>,
        reason: String,
    },
}

/// POSTs one batch, retrying on 429, 503 and connection failures; ingest is idempotent, so a
/// batch that did arrive before the connection broke is merely counted as duplicates.
async fn post_batch(
    client: &reqwest::Client,
    url: &reqwest::Url,
    api_key: Option<&str>,
    batch: &Batch,
) -> anyhow::Result<(IngestAnswer, u32)> {
    let mut retries = 0;
    // Exponential with jitter, so senders that failed together do not retry together.
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let (after, reason) = match attempt(client, url, api_key, batch).await? {
            Attempt::Done(answer) => return Ok((answer, retries)),
            Attempt::Retry { after, reason } => (after, reason),
        };
        if retries >= MAX_RETRIES {
            bail!("POST {url}: giving up after {MAX_RETRIES} retries; last: {reason}");
        }
        let backoff = delays.next().unwrap_or(MAX_BACKOFF);
        let delay = after.unwrap_or(backoff);
        tracing::warn!(%url, %reason, delay_ms = delay.as_millis() as u64, retry = retries + 1, "retrying batch");
        tokio::time::sleep(delay).await;
        retries += 1;
    }
}

async fn attempt(
    client: &reqwest::Client,
    url: &reqwest::Url,
    api_key: Option<&str>,
    batch: &Batch,
) -> anyhow::Result<Attempt> {
    let mut request = client
        .post(url.clone())
        .header(CONTENT_TYPE, "application/x-ndjson")
        .body(batch.body.clone());
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) if is_transient(&e) => {
            return Ok(Attempt::Retry {
                after: None,
                reason: format!("{e}"),
            });
        }
        Err(e) => return Err(e).with_context(|| format!("POST {url}")),
    };
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        let after = retry_after(response.headers());
        return Ok(Attempt::Retry {
            after,
            reason: format!("server answered {status}"),
        });
    }
    let text = match response.text().await {
        Ok(text) => text,
        Err(e) if is_transient(&e) => {
            return Ok(Attempt::Retry {
                after: None,
                reason: format!("reading the answer: {e}"),
            });
        }
        Err(e) => return Err(e).with_context(|| format!("reading the answer of POST {url}")),
    };
    if !status.is_success() {
        bail!("POST {url} answered {status}: {}", rejection(&text, batch));
    }
    let answer = serde_json::from_str(&text)
        .with_context(|| format!("POST {url} answered {status} with {}", excerpt(&text)))?;
    Ok(Attempt::Done(answer))
}

fn is_transient(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
}

/// Retry-After in seconds (the HTTP-date form falls back to our own backoff).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// The server's error answer, with each rejected event named by its input line (or its
/// position in the run) rather than its index in the batch.
fn rejection(text: &str, batch: &Batch) -> String {
    #[derive(Deserialize)]
    struct Rejected {
        error: String,
        #[serde(default)]
        errors: Vec<FieldError>,
    }
    #[derive(Deserialize)]
    struct FieldError {
        index: u64,
        field: String,
        reason: String,
    }
    let Ok(rejected) = serde_json::from_str::<Rejected>(text) else {
        return excerpt(text).to_owned();
    };
    let mut out = rejected.error;
    for e in rejected.errors.iter().take(MAX_NAMED_REJECTIONS) {
        let at = usize::try_from(e.index)
            .ok()
            .and_then(|i| batch.lines.get(i))
            .map_or_else(
                || format!("event {}", batch.first_event + e.index + 1),
                |line| format!("line {line}"),
            );
        let field = if e.field.is_empty() {
            ""
        } else {
            e.field.as_str()
        };
        out.push_str(&format!(
            "\n  {at}: {field}{}{}",
            if field.is_empty() { "" } else { ": " },
            e.reason
        ));
    }
    if rejected.errors.len() > MAX_NAMED_REJECTIONS {
        out.push_str(&format!(
            "\n  ... and {} more",
            rejected.errors.len() - MAX_NAMED_REJECTIONS
        ));
    }
    out
}

fn excerpt(text: &str) -> &str {
    if text.len() <= BODY_EXCERPT {
        return text;
    }
    let mut end = BODY_EXCERPT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
