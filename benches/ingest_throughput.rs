//! Ingest throughput of `meterd serve` over loopback, fsync on.
//!
//! Generates events with `meterd gen` (outside the timed part), starts `meterd serve` on a fresh
//! data directory, and posts NDJSON batches from several concurrent connections. Reports
//! events/s and bytes/s, p50/p99 acknowledgement latency and the server's peak RSS, next to two
//! baselines measured in the same run on the same events: parsing them with serde_json on one
//! core, and appending their bytes to a file with one fdatasync per round of batches.
//!
//! With `--prefill-keys N`, the same events are then sent to a second fresh server whose dedup
//! index was first filled with N other keys (written directly, not over HTTP; same tenants, ids
//! interleaved with the sent ones), so the bench shows how ingest holds up as history grows,
//! beside the empty-index run as its baseline.
//!
//! With `--usage-metrics-ab R`, R rounds then each run two more fresh servers, one counting
//! usage for `/metrics` (the default) and one with `--usage-metrics false`, in alternating
//! order, and the bench reports the median rate of each and the exporter's cost: the server's
//! CPU per event, and the CPU of the log writer thread, where accepted events are counted (its
//! difference on and off is the counting's cost without the noise of the other threads).
//!
//! ```text
//! cargo bench --bench ingest_throughput -- [--events N] [--batch N] [--concurrency N] [--tenants N] [--prefill-keys N] [--usage-metrics-ab R]
//! ```

mod common;
use common::start_server;

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

struct Options {
    events: usize,
    batch: usize,
    concurrency: usize,
    prefill_keys: usize,
    tenants: usize,
    usage_metrics_ab: usize,
}

fn options() -> Result<Options> {
    let mut o = Options {
        events: 1_000_000,
        batch: 1_000,
        concurrency: 8,
        prefill_keys: 0,
        tenants: 50,
        usage_metrics_ab: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} must be a number"))
        };
        match a.as_str() {
            "--events" => o.events = value("--events")?,
            "--batch" => o.batch = value("--batch")?,
            "--concurrency" => o.concurrency = value("--concurrency")?,
            "--prefill-keys" => o.prefill_keys = value("--prefill-keys")?,
            "--tenants" => o.tenants = value("--tenants")?,
            "--usage-metrics-ab" => o.usage_metrics_ab = value("--usage-metrics-ab")?,
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

fn peak_rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM missing")?;
    Ok(kb * 1024)
}

/// CPU time (user and system) the process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// The name ingest gives the log writer thread.
const WRITER_THREAD: &str = "meterd-log-writer";

/// CPU time the server's log writer thread (where accepted events are counted) has used so
/// far, in seconds. Linux keeps 15 bytes of a thread's name.
fn writer_cpu_seconds(pid: u32) -> Result<f64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let name = std::fs::read_to_string(dir.join("comm"))?;
        if name.trim() == &WRITER_THREAD[..15] {
            return stat_cpu_seconds(&dir.join("stat").display().to_string());
        }
    }
    bail!("meterd {pid} has no log writer thread")
}

/// utime + stime of a `/proc/.../stat` file, in seconds.
fn stat_cpu_seconds(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the command name (which may hold spaces) in parentheses: utime and stime
    // are the 14th and 15th fields of the line, the 12th and 13th after it.
    let rest = stat.rsplit_once(')').context("/proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let mut ticks = 0.0;
    for f in fields.get(11..13).context("/proc stat fields")? {
        ticks += f.parse::<f64>().context("/proc stat: utime or stime")?;
    }
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    let per_second: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(ticks / per_second)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// One timed run against a server on `data_dir`.
struct Run {
    rate: f64,
    /// The server's CPU time (all its threads) per event, in seconds.
    cpu_per_event: f64,
    /// The log writer thread's CPU time per event, in seconds.
    writer_cpu_per_event: f64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    rss: u64,
}

impl Run {
    fn print(&self, label: &str, total_bytes: usize) {
        println!(
            "  {label:<20} {:>12.0} events/s  {:>8.1} MB/s  p50 {:>7.1} ms  p99 {:>7.1} ms  peak RSS {:.0} MiB",
            self.rate,
            total_bytes as f64 / self.elapsed.as_secs_f64() / 1e6,
            percentile(&self.latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&self.latencies, 0.99).as_secs_f64() * 1e3,
            self.rss as f64 / (1024.0 * 1024.0)
        );
    }
}

fn measure(
    data_dir: &std::path::Path,
    batches: &[bytes::Bytes],
    events: usize,
    o: &Options,
    extra: &[&str],
) -> Result<Run> {
    let server = start_server(data_dir, extra)?;
    let cpu_before = cpu_seconds(server.child.id())?;
    let writer_before = writer_cpu_seconds(server.child.id())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(o.concurrency)
        .build()?;
    let url = format!("{}/v1/events", server.url);
    let queue = Arc::new(std::sync::Mutex::new(
        batches.iter().cloned().enumerate().collect::<Vec<_>>(),
    ));
    let t = Instant::now();
    let (latencies, accepted) = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..o.concurrency {
            let (client, url, queue) = (client.clone(), url.clone(), Arc::clone(&queue));
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut accepted = 0u64;
                loop {
                    let next = queue.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop();
                    let Some((_, body)) = next else { break };
                    let sent = Instant::now();
                    let resp = client
                        .post(&url)
                        .header("content-type", "application/x-ndjson")
                        .body(body)
                        .send()
                        .await?;
                    let status = resp.status();
                    let answer: serde_json::Value = resp.json().await?;
                    if !status.is_success() {
                        bail!("ingest answered {status}: {answer}");
                    }
                    lat.push(sent.elapsed());
                    accepted += answer["accepted"].as_u64().unwrap_or(0);
                }
                Ok::<_, anyhow::Error>((lat, accepted))
            }));
        }
        let mut all = Vec::new();
        let mut accepted = 0;
        for task in tasks {
            let (lat, acc) = task.await??;
            all.extend(lat);
            accepted += acc;
        }
        Ok::<_, anyhow::Error>((all, accepted))
    })?;
    let elapsed = t.elapsed();
    let rss = peak_rss_bytes(server.child.id())?;
    let cpu = cpu_seconds(server.child.id())? - cpu_before;
    let writer_cpu = writer_cpu_seconds(server.child.id())? - writer_before;
    drop(server);
    let mut latencies = latencies;
    latencies.sort_unstable();
    if accepted != events as u64 {
        bail!("meterd accepted {accepted} of {events} events");
    }

    Ok(Run {
        rate: events as f64 / elapsed.as_secs_f64(),
        elapsed,
        latencies,
        rss,
        cpu_per_event: cpu / events as f64,
        writer_cpu_per_event: writer_cpu / events as f64,
    })
}

/// Fills the dedup index of a new data directory with `n` keys of the generator's tenants,
/// their ids interleaved with the generated ones, as if that many events had been accepted.
fn prefill(data_dir: &std::path::Path, n: usize) -> Result<()> {
    use meterd_ingest::dedup::{DedupIndex, Seen, index_key};
    let index = DedupIndex::open(&data_dir.join("dedup"))?;
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut keys = Vec::with_capacity(100_000);
    for start in (0..n).step_by(100_000) {
        keys.clear();
        for i in start..n.min(start + 100_000) {
            let tenant = format!("tenant-{:02}", i % 50);
            // Ids of another seed: the same shape as `meterd gen`'s, between them in key order.
            let id = format!(
                "evt-8-{:08x}-{i}",
                (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32
            );
            keys.push(index_key(&tenant, &id));
        }
        index.insert_batch(
            keys.iter().enumerate().map(|(j, k)| {
                (
                    k.as_slice(),
                    Seen {
                        hash: (start + j) as u128,
                        time_us: now_us,
                    },
                )
            }),
            0,
        )?;
    }
    index.persist()?;
    // A bulk load leaves compaction debt that gradual growth would have paid long ago.
    index.compact()?;
    index.persist()?;
    Ok(())
}

fn main() -> Result<()> {
    let o = options()?;
    let dir = tempfile::tempdir()?;

    // Setup: generate the events once, outside every timed section.
    let end = chrono::Utc::now();
    let start = end - chrono::Duration::hours(6);
    let ndjson_path = dir.path().join("events.ndjson");
    let status = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(["gen", "--seed", "7", "--duplicates", "0"])
        .args(["--tenants", &o.tenants.to_string()])
        .args(["--events", &o.events.to_string()])
        .args(["--start", &start.to_rfc3339(), "--end", &end.to_rfc3339()])
        .arg("--out")
        .arg(&ndjson_path)
        .status()
        .context("running meterd gen")?;
    if !status.success() {
        bail!("meterd gen failed: {status}");
    }
    let text = std::fs::read(&ndjson_path)?;
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let batches: Vec<bytes::Bytes> = lines
        .chunks(o.batch)
        .map(|chunk| {
            let mut b = Vec::with_capacity(chunk.iter().map(|l| l.len() + 1).sum());
            for l in chunk {
                b.extend_from_slice(l);
                b.push(b'\n');
            }
            bytes::Bytes::from(b)
        })
        .collect();
    let total_bytes: usize = batches.iter().map(bytes::Bytes::len).sum();
    let events = lines.len();

    // Baseline 1: serde_json parsing of the same events into values, one core.
    let t = Instant::now();
    let mut parsed = 0usize;
    for l in &lines {
        let v: serde_json::Value = serde_json::from_slice(l)?;
        parsed += usize::from(v.is_object());
    }
    let parse_rate = parsed as f64 / t.elapsed().as_secs_f64();

    // Baseline 2: appending the same bytes with one fdatasync per round of `concurrency` batches.
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(dir.path().join("baseline.log"))?;
        for round in batches.chunks(o.concurrency) {
            for b in round {
                f.write_all(b)?;
            }
            f.sync_data()?;
        }
    }
    let fsync_rate = events as f64 / t.elapsed().as_secs_f64();

    // The measurement: meterd serve over loopback.
    let empty = measure(&dir.path().join("data"), &batches, events, &o, &[])?;
    println!(
        "ingest_throughput: {events} events in batches of {}, {} connections, fsync on",
        o.batch, o.concurrency
    );
    empty.print("meterd serve", total_bytes);
    if o.prefill_keys > 0 {
        let data = dir.path().join("data-prefilled");
        let t = Instant::now();
        prefill(&data, o.prefill_keys)?;
        println!(
            "  prefilled the dedup index with {} keys in {:.1} s",
            o.prefill_keys,
            t.elapsed().as_secs_f64()
        );
        let full = measure(&data, &batches, events, &o, &[])?;
        full.print("  with prefilled index", total_bytes);
        println!(
            "  prefilled / empty index: {:.2}x the rate",
            full.rate / empty.rate
        );
    }
    if o.usage_metrics_ab > 0 {
        // Alternating order, so drift on a shared machine falls on both sides.
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for round in 0..o.usage_metrics_ab {
            for counting in [round % 2 == 0, round % 2 != 0] {
                let data = dir.path().join(format!("data-ab-{round}-{counting}"));
                let extra: &[&str] = if counting {
                    &[]
                } else {
                    &["--usage-metrics", "false"]
                };
                let run = measure(&data, &batches, events, &o, extra)?;
                println!(
                    "  round {round}, usage metrics {}: {:.0} events/s, server CPU {:.2} us/event, log writer {:.3} us/event",
                    if counting { "on " } else { "off" },
                    run.rate,
                    run.cpu_per_event * 1e6,
                    run.writer_cpu_per_event * 1e6
                );
                if counting { &mut on } else { &mut off }.push((
                    run.rate,
                    run.cpu_per_event,
                    run.writer_cpu_per_event,
                ));
                std::fs::remove_dir_all(&data)?;
            }
        }
        let median = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = v.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (rate_on, rate_off) = (median(&on, |r| r.0), median(&off, |r| r.0));
        let (cpu_on, cpu_off) = (median(&on, |r| r.1), median(&off, |r| r.1));
        println!(
            "  usage metrics on: {rate_on:.0} events/s, off: {rate_off:.0} events/s (medians): \
             throughput {:+.1}%",
            (rate_on / rate_off - 1.0) * 100.0
        );
        println!(
            "  server CPU per event on: {:.2} us, off: {:.2} us (medians): {:+.1}%",
            cpu_on * 1e6,
            cpu_off * 1e6,
            (cpu_on / cpu_off - 1.0) * 100.0
        );
        // The counting runs on the log writer thread: its CPU on less off is the cost, without
        // the noise of every other thread.
        let (writer_on, writer_off) = (median(&on, |r| r.2), median(&off, |r| r.2));
        println!(
            "  log writer CPU per event on: {:.3} us, off: {:.3} us (medians): the counting is \
             {:.1}% of the server's CPU per event (off)",
            writer_on * 1e6,
            writer_off * 1e6,
            (writer_on - writer_off) / cpu_off * 100.0
        );
    }
    println!("  baseline serde_json: {parse_rate:>12.0} events/s  (parse into Value, 1 core)");
    println!(
        "  baseline fdatasync:  {fsync_rate:>12.0} events/s  (append same bytes, 1 sync per {} batches)",
        o.concurrency
    );
    println!("  meterd / parse baseline: {:.2}", empty.rate / parse_rate);
    Ok(())
}
