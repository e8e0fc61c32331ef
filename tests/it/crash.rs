//! Crash safety: `kill -9` at arbitrary moments while batches are being ingested never loses an
//! acknowledged event and never stores one twice, and re-sending everything afterwards counts
//! nothing twice.
//!
//! The kill points come from a seeded generator (override with `METERD_CRASH_SEED`), so a
//! failure names the seed that reproduces it.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{NDJSON, Server, generated, ndjson};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;

const WRITERS: usize = 4;
const BATCH_EVENTS: usize = 100;
/// Bounds each run, whatever the kill delay.
const MAX_BATCHES_PER_WRITER: usize = 100;

fn seed() -> u64 {
    std::env::var("METERD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d65_7465_7264)
}

/// One posted batch and whether meterd acknowledged it (answered 200).
#[derive(Debug)]
struct Batch {
    /// Every event id of the batch starts with `key` followed by `-`.
    key: String,
    events: Vec<Value>,
    acked: bool,
}

/// Generated events with ids made unique per run, writer and batch.
fn batch_events(key: &str, seed: u64) -> Vec<Value> {
    let mut events = generated(seed, BATCH_EVENTS, 5, Duration::from_secs(3 * 86_400), 0.0);
    for (j, e) in events.iter_mut().enumerate() {
        e["id"] = Value::String(format!("{key}-{j}"));
    }
    events
}

/// When to send SIGKILL.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// After this long.
    Delay(Duration),
    /// At the first new Parquet file in the data directory after this long: the store is in
    /// the middle of a flush or a compaction (writing, fsyncing, or publishing the file).
    FlushAfter(Duration),
}

/// Starts `WRITERS` tasks posting NDJSON batches as fast as they are answered, kills the server
/// with SIGKILL at `kill_at`, and returns every batch posted, acknowledged or not.
async fn ingest_until_killed(
    server: &mut Server,
    run: &str,
    kill_at: KillAt,
    seed: u64,
) -> Vec<Batch> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (client, url, stop) = (
            server.client.clone(),
            format!("{}/v1/events", server.url),
            Arc::clone(&stop),
        );
        let run = run.to_owned();
        writers.push(tokio::spawn(async move {
            let mut batches = Vec::new();
            for b in 0..MAX_BATCHES_PER_WRITER {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let key = format!("{run}w{w}b{b}");
                let events = batch_events(&key, seed ^ ((w as u64) << 32) ^ b as u64);
                let sent = client
                    .post(&url)
                    .header(CONTENT_TYPE, NDJSON)
                    .body(ndjson(&events))
                    .send()
                    .await;
                let acked = match sent {
                    Ok(r) if r.status() == StatusCode::OK => {
                        // The 200 is only an acknowledgement once its body says what was taken.
                        match r.json::<Value>().await {
                            Ok(body) => {
                                assert_eq!(
                                    body["accepted"], BATCH_EVENTS,
                                    "fresh ids are all accepted: {body}"
                                );
                                true
                            }
                            Err(_) => false,
                        }
                    }
                    Ok(r) => {
                        let status = r.status();
                        assert!(
                            status == StatusCode::SERVICE_UNAVAILABLE,
                            "only 503 (overload) may refuse valid events, got {status}: {:?}",
                            r.text().await
                        );
                        false
                    }
                    Err(_) => false,
                };
                batches.push(Batch { key, events, acked });
                if !acked {
                    // The server is gone (or refusing); stop this writer.
                    break;
                }
            }
            batches
        }));
    }
    match kill_at {
        KillAt::Delay(delay) => tokio::time::sleep(delay).await,
        KillAt::FlushAfter(delay) => {
            tokio::time::sleep(delay).await;
            let dir = server.data_dir();
            let before: HashSet<_> = common::files_ending_with(&dir, ".parquet")
                .into_iter()
                .collect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                if common::files_ending_with(&dir, ".parquet")
                    .iter()
                    .any(|f| !before.contains(f))
                {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no flush within 5 s at --flush-interval-ms 50"
                );
                // Polling on this thread keeps the kill as close to the file's creation as possible.
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    server.kill();
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.expect("writer task"));
    }
    all
}

/// After a restart: every acknowledged batch is present exactly once, nothing is present twice.
async fn assert_acked_present_once(server: &Server, batches: &[Batch], context: &str) {
    let twice = server.rows("SELECT tenant, id, count(*) FROM events GROUP BY tenant, id HAVING count(*) > 1 LIMIT 20").await;
    assert!(
        twice.is_empty(),
        "{context}: events stored more than once: {twice:?}"
    );
    let twice = server
        .rows("SELECT id, count(*) FROM events GROUP BY id HAVING count(*) > 1 LIMIT 20")
        .await;
    assert!(
        twice.is_empty(),
        "{context}: ids stored more than once: {twice:?}"
    );

    let present: HashMap<String, u64> = server
        .rows("SELECT split_part(id, '-', 1) AS batch, count(*) FROM events GROUP BY 1")
        .await
        .into_iter()
        .map(|r| {
            (
                r[0].as_str().expect("batch key").to_owned(),
                r[1].as_u64().expect("count"),
            )
        })
        .collect();
    let mut acked = 0;
    for b in batches {
        let n = present.get(&b.key).copied().unwrap_or(0);
        if b.acked {
            acked += 1;
            assert_eq!(
                n, BATCH_EVENTS as u64,
                "{context}: acknowledged batch {} has {n} of {BATCH_EVENTS} events",
                b.key
            );
        } else {
            assert!(
                n <= BATCH_EVENTS as u64,
                "{context}: batch {} has {n} events",
                b.key
            );
        }
    }
    let known: HashSet<&str> = batches.iter().map(|b| b.key.as_str()).collect();
    let strangers: Vec<&String> = present
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    assert!(
        strangers.is_empty(),
        "{context}: events from batches never sent: {strangers:?}"
    );
    eprintln!(
        "{context}: {acked} of {} batches acknowledged, all present once",
        batches.len()
    );
}

/// Re-sends every batch; nothing may be counted twice, and afterwards every event is stored
/// exactly once with its content intact.
async fn resend_all_and_check(server: &Server, batches: &[Batch], context: &str) {
    let before = server.count("true").await;
    let mut accepted_total = 0;
    for chunk in batches.chunks(WRITERS) {
        let replies =
            futures::future::join_all(chunk.iter().map(|b| server.post_ndjson(&b.events))).await;
        for (b, reply) in chunk.iter().zip(replies) {
            let (accepted, duplicates) = (reply.accepted(), reply.duplicates());
            assert!(
                reply.conflicts().is_empty(),
                "{context}: re-sent batch {} conflicts: {reply:?}",
                b.key
            );
            assert_eq!(
                accepted + duplicates,
                BATCH_EVENTS as u64,
                "{context}: batch {}: {reply:?}",
                b.key
            );
            if b.acked {
                assert_eq!(
                    accepted, 0,
                    "{context}: acknowledged batch {} was accepted again: {reply:?}",
                    b.key
                );
            }
            accepted_total += accepted;
        }
    }
    let total = (batches.len() * BATCH_EVENTS) as u64;
    assert_eq!(
        before + accepted_total,
        total,
        "{context}: re-sending accepted exactly what was missing"
    );
    let counts = server
        .rows("SELECT count(*), count(DISTINCT id), sum(input_tokens) FROM events")
        .await;
    let expected_tokens: i64 = batches
        .iter()
        .flat_map(|b| &b.events)
        .filter_map(|e| e["data"]["input_tokens"].as_i64())
        .sum();
    assert_eq!(
        counts[0][0].as_u64(),
        Some(total),
        "{context}: rows after re-sending everything"
    );
    assert_eq!(
        counts[0][1].as_u64(),
        Some(total),
        "{context}: distinct ids after re-sending everything"
    );
    assert_eq!(
        counts[0][2].as_i64().unwrap_or(0),
        expected_tokens,
        "{context}: input_tokens survive intact"
    );
}

/// Kill points spread from a few milliseconds to about 1.5 s: one per band of a log scale, with
/// a seeded jitter inside the band.
fn kill_delays(rng: &mut StdRng, n: usize) -> Vec<Duration> {
    let (lo, hi) = (3.0f64.ln(), 1_500.0f64.ln());
    (0..n)
        .map(|i| {
            let band = (hi - lo) / n as f64;
            let x = lo + band * (i as f64 + rng.random::<f64>());
            Duration::from_micros((x.exp() * 1_000.0) as u64)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_and_doubles_nothing() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let delays = kill_delays(&mut rng, 8);
    eprintln!("METERD_CRASH_SEED={seed}: kill delays {delays:?}");
    for (i, delay) in delays.into_iter().enumerate() {
        let context = format!("iteration {i} (seed {seed}, kill after {delay:?})");
        let mut server = Server::start(&[]);
        let batches = ingest_until_killed(
            &mut server,
            &format!("r{i}"),
            KillAt::Delay(delay),
            rng.random(),
        )
        .await;
        server.restart();
        assert_acked_present_once(&server, &batches, &context).await;
        resend_all_and_check(&server, &batches, &context).await;
        // Once more through a clean restart: the re-sent events are durable too.
        assert!(server.stop().success(), "{context}: graceful stop");
        server.restart();
        assert_eq!(
            server.count("true").await,
            (batches.len() * BATCH_EVENTS) as u64,
            "{context}: after a clean restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_the_store_flushes() {
    let seed = seed().wrapping_add(1);
    let mut rng = StdRng::seed_from_u64(seed);
    // Flushes (and with them compactions) happen all the time; each kill waits for a new
    // Parquet file, so it lands inside a flush, between writing a file and publishing it.
    let mut server = Server::start(&["--flush-interval-ms", "50"]);
    let mut batches = Vec::new();
    let cycles = 5;
    for cycle in 0..cycles {
        let delay = Duration::from_millis(rng.random_range(100..1_000));
        let context =
            format!("cycle {cycle} (seed {seed}, kill at the first flush after {delay:?})");
        if cycle > 0 {
            server.restart();
        }
        let run = format!("f{cycle}");
        batches.extend(
            ingest_until_killed(&mut server, &run, KillAt::FlushAfter(delay), rng.random()).await,
        );
        server.restart();
        let orphans = server
            .stderr()
            .matches("removed orphan parquet file")
            .count();
        eprintln!("{context}: recovery removed {orphans} unpublished Parquet files");
        // Everything acknowledged in this and the earlier cycles, across several crashes.
        assert_acked_present_once(&server, &batches, &context).await;
        server.kill();
    }
    server.restart();
    resend_all_and_check(
        &server,
        &batches,
        &format!("after {cycles} crashes (seed {seed})"),
    )
    .await;
}

/// A data directory written before the formats on disk carried versions (see
/// `tests/fixtures/make-data-v1.sh`: 58 events flushed to Parquet, 40 more only in the log
/// when the process was killed) opens with this build: the log replays, SQL serves every
/// event once, and a re-send of each event is a duplicate, not a conflict or a new event.
#[tokio::test]
async fn a_data_directory_of_the_first_format_opens_and_deduplicates() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let sent: Vec<Value> = ["data-v1.flushed.ndjson", "data-v1.logged.ndjson"]
        .iter()
        .flat_map(|name| {
            let text = std::fs::read_to_string(fixtures.join(name)).expect("fixture events");
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("a JSON event"))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut first: HashMap<(String, String), Value> = HashMap::new();
    for event in &sent {
        let key = (
            event["tenant"].as_str().expect("tenant").to_owned(),
            event["id"].as_str().expect("id").to_owned(),
        );
        first.entry(key).or_insert_with(|| event.clone());
    }
    assert_eq!(first.len(), 98, "the fixture's distinct events");
    let input_tokens: i64 = first
        .values()
        .filter_map(|e| e["data"]["input_tokens"].as_i64())
        .sum();

    // Old enough to be past the default horizons one day: keep them acceptable.
    let args = [
        "--max-event-age-days",
        "36500",
        "--dedup-horizon-days",
        "36500",
    ];
    let mut server = Server::start_from(&fixtures.join("data-v1"), &args);
    for round in ["opened", "restarted"] {
        assert_eq!(server.count("true").await, 98, "{round}");
        assert_eq!(
            server.scalar("SELECT sum(input_tokens) FROM events").await,
            serde_json::json!(input_tokens),
            "{round}"
        );
        let reply = server.post_json(&sent).await;
        assert_eq!(reply.accepted(), 0, "{round}: {reply:?}");
        assert_eq!(reply.duplicates(), sent.len() as u64, "{round}: {reply:?}");
        assert!(reply.conflicts().is_empty(), "{round}: {reply:?}");
        assert!(server.stop().success());
        server.restart();
    }
}
