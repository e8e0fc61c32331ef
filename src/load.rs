//! `meterd load`: sends an NDJSON file of events (or standard input) to a running meterd.
//!
//! A file of any size goes in batches that stay under the server's body limit, with retries on
//! 429/503 and broken connections, a progress bar, and the totals at the end. Ingest is
//! idempotent, so loading a file twice, or again after an interruption, stores nothing twice:
//! what was already accepted is answered as duplicates. A gzip-compressed file is read as is.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use tokio::sync::mpsc;

use crate::send::{self, Batch, BatchSource, SendOptions, Unit};

/// Batches read ahead of the ones being sent.
const READ_AHEAD: usize = 4;

/// `meterd load` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// NDJSON file of events, one per line (gzip-compressed is fine); `-` reads standard input.
    #[arg(default_value = "-")]
    pub input: PathBuf,

    /// The meterd to send to (its ingest endpoint, or just the server address).
    #[arg(long, env = "METERD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: reqwest::Url,

    /// Events per request, at most.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,

    /// Bytes per request, at most (a single longer line goes alone); keep it under the server's
    /// --max-body-bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_bytes: u64,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,

    /// Events per second to send at most; 0 sends as fast as the server takes them.
    #[arg(long, default_value_t = 0.0, value_parser = send::parse_rate)]
    pub rate: f64,

    /// API key, sent as `Authorization: Bearer <KEY>`.
    #[arg(long, env = "METERD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Runs `meterd load`.
pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let options = SendOptions {
        url: SendOptions::ingest_url(args.url.clone()),
        batch: usize::try_from(args.batch).context("--batch is too large")?,
        rate: args.rate,
        concurrency: usize::try_from(args.concurrency).context("--concurrency is too large")?,
        api_key: args.api_key.clone(),
    };
    let max_bytes = usize::try_from(args.batch_bytes).context("--batch-bytes is too large")?;
    let (source, total) = FileSource::open(&args.input, options.batch, max_bytes)?;
    // Progress is input bytes read, out of the file's size when it has one.
    let totals = send::post_all("meterd load", source, options, total, Unit::Bytes).await?;
    if totals.events == 0 {
        bail!("{} holds no events", display(&args.input));
    }
    Ok(())
}

fn display(input: &Path) -> String {
    if input == Path::new("-") {
        "standard input".to_owned()
    } else {
        input.display().to_string()
    }
}

/// Batches cut from NDJSON lines by a reader thread (files and pipes are read with blocking
/// I/O), handed over through a bounded channel so reading stays a few batches ahead.
#[derive(Debug)]
struct FileSource {
    batches: mpsc::Receiver<anyhow::Result<Batch>>,
}

impl FileSource {
    /// Starts reading `input`; also returns its size in bytes when it is a file (the progress
    /// bar's total).
    fn open(
        input: &Path,
        max_events: usize,
        max_bytes: usize,
    ) -> anyhow::Result<(Self, Option<u64>)> {
        let name = display(input);
        let (raw, total): (Box<dyn Read + Send>, Option<u64>) = if input == Path::new("-") {
            (Box::new(std::io::stdin()), None)
        } else {
            let file = File::open(input).with_context(|| format!("opening {name}"))?;
            let size = file
                .metadata()
                .with_context(|| format!("reading the size of {name}"))?
                .len();
            (Box::new(file), Some(size))
        };
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        std::thread::Builder::new()
            .name("meterd-load-reader".into())
            .spawn(move || {
                let result = read_batches(raw, max_events, max_bytes, &tx);
                if let Err(e) = result {
                    // The receiver may be gone (the run failed); then nobody needs the error.
                    let _ = tx.blocking_send(Err(e.context(format!("reading {name}"))));
                }
            })
            .context("starting the reader thread")?;
        Ok((Self { batches: rx }, total))
    }
}

impl BatchSource for FileSource {
    async fn next_batch(&mut self, _max_events: usize) -> anyhow::Result<Option<Batch>> {
        // The reader cuts batches by the run's limits already.
        self.batches.recv().await.transpose()
    }
}

/// Counts the bytes read from the underlying file, so progress follows the file even when it
/// is gzip-compressed.
struct Counting<R> {
    inner: R,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads `raw` (gzip or plain) line by line into batches of at most `max_events` events and
/// `max_bytes` bytes, skipping blank lines, and sends them on `tx`.
fn read_batches(
    raw: Box<dyn Read + Send>,
    max_events: usize,
    max_bytes: usize,
    tx: &mpsc::Sender<anyhow::Result<Batch>>,
) -> anyhow::Result<()> {
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut counted = BufReader::new(Counting {
        inner: raw,
        read: std::sync::Arc::clone(&read),
    });
    let gzip = counted.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let mut lines: Box<dyn BufRead> = if gzip {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(
            counted,
        )))
    } else {
        Box::new(counted)
    };
    let mut line = Vec::new();
    let mut batch = Batch::default();
    let mut line_no = 0u64;
    let mut events = 0u64;
    let mut reported = 0u64;
    loop {
        line.clear();
        let n = lines.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let full = batch.events as usize >= max_events
            || (batch.events > 0 && batch.body.len() + text.len() + 1 > max_bytes);
        if full {
            let progress = read.load(std::sync::atomic::Ordering::Relaxed);
            batch.progress = progress - reported;
            reported = progress;
            let next = Batch {
                first_event: events,
                ..Batch::default()
            };
            if tx
                .blocking_send(Ok(std::mem::replace(&mut batch, next)))
                .is_err()
            {
                // The sender stopped (an error it reports itself).
                return Ok(());
            }
        }
        batch.body.extend_from_slice(text);
        batch.body.push(b'\n');
        batch.events += 1;
        batch.lines.push(line_no);
        events += 1;
    }
    if batch.events > 0 {
        batch.progress = read.load(std::sync::atomic::Ordering::Relaxed) - reported;
        // As above: a closed channel means the sender has stopped.
        let _ = tx.blocking_send(Ok(batch));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn batches_of(input: Vec<u8>, max_events: usize, max_bytes: usize) -> Vec<Batch> {
        let (tx, mut rx) = mpsc::channel(1024);
        read_batches(
            Box::new(std::io::Cursor::new(input)),
            max_events,
            max_bytes,
            &tx,
        )
        .expect("read");
        drop(tx);
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            out.push(b.expect("batch"));
        }
        out
    }

    #[test]
    fn lines_become_batches_within_both_limits() {
        let input = b"{\"a\":1}\n\n{\"a\":2}\r\n{\"a\":3}\n  \n{\"a\":4}".to_vec();
        let len = input.len() as u64;
        let batches = batches_of(input.clone(), 2, 1 << 20);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].body, b"{\"a\":1}\n{\"a\":2}\n");
        assert_eq!(batches[0].lines, [1, 3]);
        assert_eq!(batches[1].lines, [4, 6]);
        assert_eq!(batches[1].first_event, 2);
        assert_eq!(batches.iter().map(|b| b.progress).sum::<u64>(), len);
        // 16 bytes hold two 8-byte lines.
        let by_bytes = batches_of(input, 100, 16);
        assert_eq!(
            by_bytes.iter().map(|b| b.events).collect::<Vec<_>>(),
            [2, 2]
        );
        // One line longer than the limit still goes, alone.
        let long = batches_of(b"{\"a\":\"long line\"}\n{}\n".to_vec(), 100, 4);
        assert_eq!(long.iter().map(|b| b.events).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn gzip_input_is_inflated() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"{\"a\":1}\n{\"a\":2}\n").expect("gzip");
        let gz = enc.finish().expect("gzip");
        let len = gz.len() as u64;
        let batches = batches_of(gz, 10, 1 << 20);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].body, b"{\"a\":1}\n{\"a\":2}\n");
        assert_eq!(batches[0].progress, len, "progress counts compressed bytes");
    }
}
