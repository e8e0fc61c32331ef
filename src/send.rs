//! Delivery of generated events: NDJSON to a file or stdout, or batches POSTed to meterd.

use std::io::{ErrorKind, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::Rng as _;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Generator;

/// Events encoded per write when producing a file.
const WRITE_CHUNK: usize = 4096;
/// Retries of one batch before giving up.
const MAX_RETRIES: u32 = 20;
/// First retry delay without a Retry-After; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A Retry-After longer than this is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of an error body goes into an error message.
const BODY_EXCERPT: usize = 2000;

/// Writes every event of `generator` as NDJSON to `out` (`-` is stdout).
///
/// A closed pipe (`meterd gen | head`) ends the output quietly.
pub(super) fn write_ndjson(mut generator: Generator, out: &Path) -> anyhow::Result<()> {
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

/// How to POST events.
#[derive(Debug, Clone)]
pub(super) struct SendOptions {
    pub url: reqwest::Url,
    pub batch: usize,
    /// Events per second; 0 = unlimited.
    pub rate: f64,
    pub concurrency: usize,
    pub api_key: Option<String>,
}

/// What the server said about everything sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Totals {
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

/// POSTs every event of `generator` with a progress bar, then prints the totals to stderr.
pub(super) async fn post_all(generator: Generator, options: SendOptions) -> anyhow::Result<()> {
    let total = generator.remaining();
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events ({per_sec}, eta {eta})",
    )
    .context("progress bar template")?;
    bar.set_style(style);
    let started = Instant::now();
    let result = post_events(generator, &options, &bar).await;
    bar.finish_and_clear();
    let totals = result?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "meterd gen: sent {} events in {} batches to {} in {:.1}s ({:.0} events/s): \
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
    Ok(())
}

/// Sends the batches, at most `concurrency` in flight, paced to `rate`; stops at the first
/// batch that fails for good.
pub(super) async fn post_events(
    mut generator: Generator,
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
    loop {
        let mut body = Vec::with_capacity(options.batch.saturating_mul(512).min(64 << 20));
        let n = generator.fill_ndjson(options.batch.max(1), &mut body) as u64;
        if n == 0 {
            break;
        }
        if options.rate > 0.0 {
            let due = started + Duration::from_secs_f64(queued as f64 / options.rate);
            tokio::time::sleep_until(due).await;
        }
        queued += n;
        let permit = Arc::clone(&in_flight)
            .acquire_owned()
            .await
            .context("send queue closed")?;
        let client = client.clone();
        let url = options.url.clone();
        let api_key = options.api_key.clone();
        let bar = bar.clone();
        tasks.spawn(async move {
            let (answer, retries) = post_batch(&client, &url, api_key.as_deref(), body).await?;
            drop(permit);
            bar.inc(n);
            Ok((n, answer, retries))
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
    body: Vec<u8>,
) -> anyhow::Result<(IngestAnswer, u32)> {
    let mut retries = 0;
    loop {
        let (after, reason) = match attempt(client, url, api_key, body.clone()).await? {
            Attempt::Done(answer) => return Ok((answer, retries)),
            Attempt::Retry { after, reason } => (after, reason),
        };
        if retries >= MAX_RETRIES {
            bail!("POST {url}: giving up after {MAX_RETRIES} retries; last: {reason}");
        }
        let delay = after.unwrap_or_else(|| backoff(retries));
        tracing::warn!(%url, %reason, delay_ms = delay.as_millis() as u64, retry = retries + 1, "retrying batch");
        tokio::time::sleep(delay).await;
        retries += 1;
    }
}

async fn attempt(
    client: &reqwest::Client,
    url: &reqwest::Url,
    api_key: Option<&str>,
    body: Vec<u8>,
) -> anyhow::Result<Attempt> {
    let mut request = client
        .post(url.clone())
        .header(CONTENT_TYPE, "application/x-ndjson")
        .body(body);
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
        bail!("POST {url} answered {status}: {}", excerpt(&text));
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

/// Exponential backoff with jitter, so senders that failed together do not retry together.
fn backoff(retries: u32) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(1 << retries.min(16))
        .min(MAX_BACKOFF);
    base.mul_f64(rand::rng().random_range(0.5..1.0))
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
