//! meterd's ingest path: usage events come in over HTTP, are deduplicated by `(tenant, id)`,
//! made durable in the log (fsync, group commit) before the answer, and handed to the stores.
//!
//! The pieces: [`log`] (segmented, CRC-framed, torn-tail recovery, per-consumer checkpoints),
//! [`dedup`] (the fjall-backed key index), the group-commit writer, [`embedded`] (Parquet files
//! plus the unflushed tail, meterd's default store) and [`http`] (`POST /v1/events`). [`Ingest`]
//! ties them together and owns their threads.

pub mod backlog;
pub mod decode;
pub mod dedup;
pub mod embedded;
pub mod error;
pub mod http;
pub mod lock;
pub mod log;
pub mod metrics;
pub mod record;
pub mod sink;
mod state_file;
mod strict_json;
pub mod tailer;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meterd_schemas::{Event, Limits};
use tokio::sync::{mpsc, oneshot};

pub use crate::embedded::{EmbeddedOptions, EmbeddedStore};
pub use crate::error::{Error, Result};
use crate::log::{Consumer, LogOptions, LogShared, LogWriter};
pub use crate::writer::{ChangeObserver, Changes, Outcome, decode_record};
use crate::writer::{Submission, Writer, index_replayed, push_to_store};

/// Settings of the ingest path.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Root of meterd's files: `log/`, `dedup/`, `events/`.
    pub data_dir: PathBuf,
    /// Largest accepted request body, also after gzip inflation.
    pub max_body_bytes: usize,
    /// Past this many bytes of log not yet confirmed by every store, ingest answers 503.
    pub max_log_bytes: u64,
    /// Size at which the log starts a new segment.
    pub segment_bytes: u64,
    /// Accepted event times.
    pub limits: Limits,
    /// How long keys stay in the dedup index, by event time.
    pub dedup_horizon: chrono::Duration,
    /// Batches that may wait for the writer before ingest answers 503.
    pub queue_depth: usize,
    /// Past this many unflushed rows in the embedded store, ingest answers 503.
    pub max_tail_rows: usize,
    /// Flush and compaction settings of the embedded store.
    pub embedded: EmbeddedOptions,
    /// Names of the external stores fed from the log (`postgres`, `clickhouse`). Each gets a
    /// log consumer whose checkpoint is kept under `sinks/`, so the log keeps what it has not
    /// confirmed across restarts.
    pub sinks: Vec<String>,
    /// How many label values the usage metrics give series of their own.
    pub metric_labels: metrics::LabelLimits,
    /// Count every accepted event into the per-tenant usage families and tell `observers`;
    /// off, ingest does none of that counting (`changes` are told regardless).
    pub usage_metrics: bool,
    /// Told of every accepted batch (SLO events, cost), when `usage_metrics` is on.
    pub observers: metrics::Observers,
    /// Told of every batch accepted from now on and its log position, whether or not
    /// `usage_metrics` is on.
    pub changes: Changes,
}

impl IngestConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            max_body_bytes: 10 * 1024 * 1024,
            max_log_bytes: 2 * 1024 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            limits: Limits::default(),
            dedup_horizon: chrono::Duration::days(400),
            queue_depth: 256,
            max_tail_rows: 2_000_000,
            embedded: EmbeddedOptions::default(),
            sinks: Vec::new(),
            metric_labels: metrics::LabelLimits::default(),
            usage_metrics: true,
            observers: metrics::Observers::default(),
            changes: Changes::default(),
        }
    }
}

/// Why a batch could not be taken right now. Each maps to a status in [`http`].
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the durable log is full ({retained} bytes) because stores are behind")]
    LogFull { retained: u64 },
    #[error("ingest is overloaded: {reason}")]
    Overloaded { reason: &'static str },
    #[error("meterd is shutting down")]
    ShuttingDown,
    #[error("ingest failed")]
    Failed(#[source] Error),
}

/// Readiness of the ingest side.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub log_bytes: u64,
    pub log_full: bool,
    pub writer_failed: bool,
    pub unflushed_rows: usize,
    pub last_maintenance_error: Option<String>,
}

/// The running ingest path.
#[derive(Debug)]
pub struct Ingest {
    config: IngestConfig,
    /// Held while this process uses the data directory.
    _lock: lock::DataDirLock,
    tx: Mutex<Option<mpsc::Sender<Submission>>>,
    log: Arc<LogShared>,
    index: Arc<dedup::DedupIndex>,
    store: Arc<EmbeddedStore>,
    index_consumer: Consumer,
    sinks: Vec<Consumer>,
    node_id: String,
    failed: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    maintenance_error: Mutex<Option<String>>,
    flush_error: Mutex<Option<String>>,
    metrics: metrics::IngestMetrics,
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl Ingest {
    /// Opens the log, the index and the store, replays what they have not seen yet, and starts
    /// the writer and maintenance threads.
    pub fn open(mut config: IngestConfig) -> Result<Arc<Self>> {
        // Absolute from here on: paths of files under it reach DataFusion and the logs, and the
        // default `./meterd-data` is relative.
        config.data_dir = std::path::absolute(&config.data_dir).map_err(|e| Error::DataDir {
            path: config.data_dir.clone(),
            source: e,
        })?;
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::DataDir {
            path: dir.clone(),
            source: e,
        })?;
        let lock = lock::DataDirLock::acquire(dir)?;
        let (log_writer, log, recovery) = LogWriter::open(
            &dir.join("log"),
            LogOptions {
                segment_bytes: config.segment_bytes,
            },
        )?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(
                bytes = recovery.truncated_bytes,
                "cut a torn tail from the log (a crash mid-write; those events were never acknowledged)"
            );
        }
        let index = Arc::new(dedup::DedupIndex::open(&dir.join("dedup"))?);
        let store = Arc::new(EmbeddedStore::open(
            &dir.join("events"),
            &log,
            config.embedded,
        )?);

        // Bring the index and the store up to the log's end.
        let replayed_index = replay(&log, index.applied()?, |events, end| {
            index_replayed(&index, events, end)
        })?;
        let replayed_store = replay(&log, store.flushed_lsn(), |events, end| {
            push_to_store(&store, events, end)
        })?;
        let index_consumer = log.register("dedup", index.persist()?);
        // Registered before the maintenance thread starts, so no trim passes them.
        let sinks = config
            .sinks
            .iter()
            .map(|name| {
                let saved = sink::load_checkpoint(dir, name)?;
                Ok(log.register(name, saved.unwrap_or(0).max(log.start())))
            })
            .collect::<Result<Vec<_>>>()?;
        let node_id = sink::node_id(dir)?;
        tracing::info!(
            log_start = log.start(),
            log_end = log.durable_end(),
            replayed_index,
            replayed_store,
            "ingest recovered"
        );

        let metrics = metrics::IngestMetrics::new(
            &config.metric_labels,
            config.usage_metrics,
            config.observers.clone(),
        )
        .map_err(Error::Metrics)?;
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        let failed = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            log: log_writer,
            index: Arc::clone(&index),
            store: Arc::clone(&store),
            failed: Arc::clone(&failed),
            clock: now_us,
            metrics: metrics.clone(),
            changes: config.changes.clone(),
        };
        let writer_thread = std::thread::Builder::new()
            .name("meterd-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::LogIo {
                path: dir.join("log"),
                source: e,
            })?;
        let ingest = Arc::new(Self {
            config,
            _lock: lock,
            tx: Mutex::new(Some(tx)),
            log,
            index,
            store,
            index_consumer,
            sinks,
            node_id,
            failed,
            stopping: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(vec![writer_thread]),
            maintenance_error: Mutex::new(None),
            flush_error: Mutex::new(None),
            metrics,
        });
        let weak = Arc::downgrade(&ingest);
        let stopping = Arc::clone(&ingest.stopping);
        let maintenance = std::thread::Builder::new()
            .name("meterd-maintenance".into())
            .spawn(move || maintenance_loop(weak, stopping))
            .map_err(|e| Error::LogIo {
                path: ingest.config.data_dir.clone(),
                source: e,
            })?;
        let weak = Arc::downgrade(&ingest);
        let stopping = Arc::clone(&ingest.stopping);
        let flusher = std::thread::Builder::new()
            .name("meterd-flush".into())
            .spawn(move || flush_loop(weak, stopping))
            .map_err(|e| Error::LogIo {
                path: ingest.config.data_dir.clone(),
                source: e,
            })?;
        ingest
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend([maintenance, flusher]);
        Ok(ingest)
    }

    /// The configuration in force.
    pub fn config(&self) -> &IngestConfig {
        &self.config
    }

    /// The embedded store, for queries.
    pub fn store(&self) -> &Arc<EmbeddedStore> {
        &self.store
    }

    /// The log's shared state, for stores that read it.
    pub fn log(&self) -> &Arc<LogShared> {
        &self.log
    }

    /// This node's identity: a UUID created with the data directory. External stores keep one
    /// delivery checkpoint per node.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The log consumer of the external store `name` (one of [`IngestConfig::sinks`]).
    pub fn sink_consumer(&self, name: &str) -> Option<Consumer> {
        self.sinks.iter().find(|c| c.name() == name).cloned()
    }

    /// Submits validated events; resolves once they are durable (or known duplicates).
    pub async fn submit(&self, events: Vec<Event>) -> Result<Outcome, SubmitError> {
        let started = std::time::Instant::now();
        let result = self.submit_counted(events).await;
        match &result {
            Ok(_) => {
                self.metrics.batch("ok");
                self.metrics.acknowledged(started.elapsed().as_secs_f64());
            }
            Err(SubmitError::LogFull { .. }) => self.metrics.batch("log_full"),
            Err(SubmitError::Overloaded { .. }) => self.metrics.batch("overloaded"),
            Err(SubmitError::ShuttingDown) => self.metrics.batch("shutting_down"),
            Err(SubmitError::Failed(_)) => self.metrics.batch("failed"),
        }
        result
    }

    /// Ingest's Prometheus families (`meterd_ingest_*`), the gauges read now.
    pub fn metrics_registry(&self) -> &prometheus::Registry {
        let r = self.readiness();
        let m = &self.metrics;
        m.log_bytes
            .set(i64::try_from(r.log_bytes).unwrap_or(i64::MAX));
        m.log_limit_bytes
            .set(i64::try_from(self.config.max_log_bytes).unwrap_or(i64::MAX));
        m.unflushed_rows
            .set(i64::try_from(r.unflushed_rows).unwrap_or(i64::MAX));
        m.registry()
    }

    async fn submit_counted(&self, events: Vec<Event>) -> Result<Outcome, SubmitError> {
        let retained = self.log.retained_bytes();
        if retained > self.config.max_log_bytes {
            return Err(SubmitError::LogFull { retained });
        }
        if self.store.tail_rows() > self.config.max_tail_rows {
            return Err(SubmitError::Overloaded {
                reason: "the embedded store is behind on flushing",
            });
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(SubmitError::Failed(Error::WriterStopped));
        }
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(SubmitError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        tx.try_send(Submission { events, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::Overloaded {
                    reason: "too many batches waiting for the log",
                },
                mpsc::error::TrySendError::Closed(_) => SubmitError::ShuttingDown,
            })?;
        match rx.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => Err(SubmitError::Failed(e)),
            // The writer dropped the batch unanswered: it failed (a panic), or it stopped.
            Err(_) if self.failed.load(Ordering::Acquire) => {
                Err(SubmitError::Failed(Error::WriterStopped))
            }
            Err(_) => Err(SubmitError::ShuttingDown),
        }
    }

    /// Whether ingest can take events.
    pub fn readiness(&self) -> Readiness {
        let log_bytes = self.log.retained_bytes();
        let log_full = log_bytes > self.config.max_log_bytes;
        let writer_failed = self.failed.load(Ordering::Acquire);
        let unflushed_rows = self.store.tail_rows();
        let accepting = self
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        Readiness {
            ready: accepting
                && !log_full
                && !writer_failed
                && unflushed_rows <= self.config.max_tail_rows,
            log_bytes,
            log_full,
            writer_failed,
            unflushed_rows,
            last_maintenance_error: [&self.flush_error, &self.maintenance_error]
                .iter()
                .find_map(|slot| slot.lock().unwrap_or_else(PoisonError::into_inner).clone()),
        }
    }

    /// Stops taking events, lets the writer finish what it holds, flushes the embedded store
    /// and persists the index. Blocking; call from a blocking context.
    pub fn shutdown(&self) -> Result<()> {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.stopping.store(true, Ordering::Release);
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for t in threads {
            if t.join().is_err() {
                tracing::error!("an ingest thread panicked");
            }
        }
        self.store.flush()?;
        self.index.persist()?;
        self.save_sink_checkpoints()?;
        Ok(())
    }

    fn save_sink_checkpoints(&self) -> Result<()> {
        for c in &self.sinks {
            sink::save_checkpoint(&self.config.data_dir, c.name(), c.checkpoint())?;
        }
        Ok(())
    }

    /// One round of the slow upkeep: compact, checkpoint the index, trim the log, expire dedup
    /// keys.
    fn maintain(&self, last_slow: &mut Instant, last_expiry: &mut Option<Instant>) -> Result<()> {
        if last_slow.elapsed() >= Duration::from_secs(5) {
            *last_slow = Instant::now();
            self.store.compact()?;
            self.index_consumer.advance(self.index.persist()?);
            self.save_sink_checkpoints()?;
            let freed = self.log.trim()?;
            if freed > 0 {
                tracing::debug!(freed, "trimmed log");
            }
        }
        if last_expiry.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            *last_expiry = Some(Instant::now());
            let cutoff = chrono::Utc::now() - self.config.dedup_horizon;
            let expired = self.index.expire(cutoff.timestamp_micros())?;
            if expired > 0 {
                tracing::info!(expired, "expired dedup keys past the horizon");
            }
        }
        Ok(())
    }
}

/// Background upkeep on its own thread, so a long compaction or dedup expiry never holds up a
/// flush: the slow work (compaction, checkpoints, log trimming, dedup expiry).
fn maintenance_loop(ingest: std::sync::Weak<Ingest>, stopping: Arc<AtomicBool>) {
    let mut last_slow = Instant::now();
    let mut last_expiry = None;
    upkeep_loop(&ingest, &stopping, |ingest| {
        (
            &ingest.maintenance_error,
            ingest.maintain(&mut last_slow, &mut last_expiry),
        )
    });
}

/// Flushes the embedded store's tail to Parquet when due.
fn flush_loop(ingest: std::sync::Weak<Ingest>, stopping: Arc<AtomicBool>) {
    upkeep_loop(&ingest, &stopping, |ingest| {
        let result = if ingest.store.flush_due() {
            ingest.store.flush().map(|rows| {
                tracing::debug!(rows, "flushed embedded store");
            })
        } else {
            Ok(())
        };
        (&ingest.flush_error, result)
    });
}

/// Runs `round` every 100 ms until ingest stops, keeping the last error of each round in the
/// slot it names (for `/readyz`).
fn upkeep_loop(
    ingest: &std::sync::Weak<Ingest>,
    stopping: &AtomicBool,
    mut round: impl FnMut(&Ingest) -> (&Mutex<Option<String>>, Result<()>),
) {
    while !stopping.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        let Some(ingest) = ingest.upgrade() else {
            return;
        };
        let (slot, result) = round(&ingest);
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) => *slot = None,
            Err(e) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "ingest upkeep failed; will retry");
                *slot = Some(e.to_string());
            }
        }
    }
}

/// Feeds every durable record from `from` to `apply`; returns the number of events replayed.
fn replay(
    log: &Arc<LogShared>,
    from: log::Lsn,
    mut apply: impl FnMut(&[meterd_schemas::StoredEvent], log::Lsn) -> Result<()>,
) -> Result<usize> {
    let mut reader = log.reader(from)?;
    let mut payload = Vec::new();
    let mut n = 0;
    while let Some((lsn, end)) = reader.next_record(&mut payload)? {
        let events = decode_record(lsn, &payload)?;
        n += events.len();
        apply(&events, end)?;
    }
    Ok(n)
}
